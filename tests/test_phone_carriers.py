"""Telnyx, Plivo, Exotel and Vonage end to end: one real `chroma-agent serve phone --provider X`
process per carrier (tiny checkpoint, its secret set, loopback), called by the carrier's client
(`pipecat_chroma.phone.testing`) with espeak-ng speech. Per carrier: the answer document (parsed),
signatures refused and accepted, a call from the answer gets reply audio in the carrier's format
and its barge-in message, a key press and the call leave no message unread, the slot is freed at
the hang-up; another carrier's handshake is closed (1008) and logged while the call goes on.
In-process (no model): REST calls against a loopback stand-in, the serializers, the handshakes."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pipecat")
from aiohttp import web  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from pipecat.frames.frames import InputAudioRawFrame, InterruptionFrame, OutputAudioRawFrame  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from pipecat_chroma.phone.carrier import HandshakeError, NotSupported, StreamStart, carrier_for  # noqa: E402
from pipecat_chroma.phone.telnyx import CarrierAPIError  # noqa: E402
from pipecat_chroma.phone.testing import (ExotelCall, PlivoCall, TelnyxCall, VonageCall,  # noqa: E402
                                          plivo_signed, telnyx_signed, vonage_jwt)
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from . import server_process  # noqa: E402
from .conftest import speak  # noqa: E402

ADMIN_KEY = "test-admin-key"
PUBLIC_URL = "https://phone.example.test"   # behind TLS: what the carriers call; the tests dial the loopback port
REPLY_TIMEOUT_S = 30
TELNYX_KEY = Ed25519PrivateKey.generate()
TELNYX_PUBLIC = base64.b64encode(TELNYX_KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
PLIVO_TOKEN = "plivo-test-token"
VONAGE_SECRET = "vonage-test-signature-secret-0123456789"
EXOTEL_AUTH = "exotel-key:exotel-secret"
SECRETS = {"telnyx": {"TELNYX_PUBLIC_KEY": TELNYX_PUBLIC}, "plivo": {"PLIVO_AUTH_TOKEN": PLIVO_TOKEN},
           "vonage": {"VONAGE_SIGNATURE_SECRET": VONAGE_SECRET}, "exotel": {"EXOTEL_STREAM_AUTH": EXOTEL_AUTH}}
call_test = pytest.mark.timeout(120, func_only=True)


class CarrierServer(server_process.ServerProcess):
    """`chroma-agent serve phone --provider NAME` with the carrier's secret, on a loopback port."""

    def __init__(self, provider: str, checkpoint: Path, voice: Path, log: Path):
        super().__init__("phone", ["--provider", provider, "--model", str(checkpoint), "--voice", str(voice),
                                   "--host", "127.0.0.1", "--max-frames", "40", "--max-calls", "2",
                                   "--public-url", PUBLIC_URL], log,
                         env={"CHROMA_AGENT_ADMIN_KEY": ADMIN_KEY, **SECRETS[provider]},
                         drop_env=("TWILIO_", "TELNYX_", "PLIVO_", "VONAGE_", "EXOTEL_", "CHROMA_AGENT_ADMIN_KEY",
                                   "CHROMA_AGENT_TWILIO_", "CHROMA_AGENT_PHONE_"))
        self.provider = provider
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def finished(self, call_id: str) -> dict:
        request = urllib.request.Request(self.base + "/calls", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return next(c for c in json.loads(r.read())["finished"] if c["call_sid"] == call_id)


@pytest.fixture(scope="module")
def voice_file(voice, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("carrier_voice") / "tiny.voice.safetensors"
    voice.save(path)
    return path


def _server_fixture(provider: str):
    """A module's server for `provider`, started when a test first asks for it."""
    @pytest.fixture(scope="module")
    def server(tiny_checkpoint, voice_file, tmp_path_factory):
        started = CarrierServer(provider, tiny_checkpoint, voice_file,
                                tmp_path_factory.mktemp(f"{provider}_server") / "server.log")
        started.wait_ready()
        yield started
        started.stop()
    return server


telnyx_server, plivo_server, exotel_server, vonage_server = map(_server_fixture,
                                                                 ("telnyx", "plivo", "exotel", "vonage"))


@pytest.fixture(scope="module")
def phone_speech(tmp_path_factory) -> dict[str, tuple[np.ndarray, int]]:
    d = tmp_path_factory.mktemp("carrier_speech")
    spoken = {}
    for name, text in (("question", "What time does the store open on Saturday?"),
                       ("barge_in", "Hold on a second please")):
        samples, rate = sf.read(speak(text, d / f"{name}.wav"), dtype="float32")
        loud = np.flatnonzero(np.abs(samples) > 0.02)   # the speech ends where the audio ends
        spoken[name] = samples[loud[0]:loud[-1] + 1], rate
    return spoken


async def converse(server: CarrierServer, call, phone_speech, check_media) -> dict:
    """A whole call: the caller asks, the reply comes in the carrier's format (`check_media`
    of each message), a stream with another carrier's handshake is closed meanwhile, the
    caller presses a key and talks over the reply (the carrier's clear message), hangs up;
    the slot is freed and nothing the caller sent was dropped."""
    async with call:
        await server.wait_active(1)
        # another carrier's stream on this server: closed, logged, and this call goes on
        alien_cls = TwilioCall if server.provider != "telnyx" else PlivoCall
        alien = alien_cls(server.ws_url, line=False, headers=upgrade_headers(server.provider))
        await alien.connect()
        with contextlib.suppress(Exception):   # Pipecat's parser reads two messages (unless closed already)
            await alien.send(json.dumps({"event": "media", "media": {"payload": ""}}))
        await asyncio.wait_for(alien.closed.wait(), 10)
        assert alien.close_code == 1008
        spoken = await call.say(*phone_speech["question"])
        first, _ = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        await call.press("5")
        barge_in = asyncio.create_task(call.say(*phone_speech["barge_in"]))
        cleared, clear = await call.next_event("clear", after=first, timeout=15)
        await asyncio.wait_for(barge_in, 15)
        media = call.events("media", after=first)
        assert call.received_audio(first).size > 0 and np.abs(call.received_audio(first)).max() > 0
        for _, message in media:
            check_media(message)
        await call.hang_up()
        await asyncio.wait_for(call.closed.wait(), 10)   # the server ends the call
    await server.wait_active(0)
    record = server.finished(call.call_id)
    assert record["provider"] == server.provider and record["ended"] is not None
    assert record["ignored_messages"] == 0, record   # the opening, media, the key press, the stop: all understood
    log = server.log.read_text()
    assert f"refused a stream: no {server.provider.capitalize()} start" in log
    return clear


def upgrade_headers(provider: str) -> dict[str, str]:
    """What the carrier sends with the stream's upgrade (Exotel: Basic, Vonage: its JWT)."""
    if provider == "exotel":
        return {"Authorization": "Basic " + base64.b64encode(EXOTEL_AUTH.encode()).decode()}
    if provider == "vonage":
        return {"Authorization": f"Bearer {vonage_jwt(VONAGE_SECRET)}"}
    return {}


# -- Telnyx --

FORM = {"CallSid": "v3:abcdefghijklmnop", "AccountSid": str(uuid.uuid4()), "From": "+15550001111",
        "To": "+15550002222", "CallStatus": "ringing"}


def telnyx_answer(server: CarrierServer, form: dict, headers: dict | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode(form).encode()
    return server.request("POST", "/telnyx/texml", body, {"Content-Type": "application/x-www-form-urlencoded",
                                                          **(telnyx_signed(TELNYX_KEY, body) if headers is None
                                                             else headers)})


@call_test
async def test_telnyx_texml_signatures_and_a_call(telnyx_server, phone_speech):
    server = telnyx_server
    body = urllib.parse.urlencode(FORM).encode()
    other_key = Ed25519PrivateKey.generate()
    stale = telnyx_signed(TELNYX_KEY, body, timestamp=int(time.time()) - 600)
    for headers in ({}, telnyx_signed(other_key, body), stale,
                    telnyx_signed(TELNYX_KEY, body + b"&x=1")):   # unsigned, another key, a replay, another body
        assert telnyx_answer(server, FORM, headers)[0] == 403
    call_id = "v3:" + uuid.uuid4().hex
    status, texml = telnyx_answer(server, {**FORM, "CallSid": call_id})
    assert status == 200, texml
    stream = ElementTree.fromstring(texml).find("./Connect/Stream")
    assert stream.get("url") == "wss://phone.example.test/ws"
    assert (stream.get("bidirectionalMode"), stream.get("bidirectionalCodec"), stream.get("codec")) == (
        "rtp", "PCMU", "PCMU")   # not mp3: the serializer speaks 8 kHz PCMU
    assert [p.get("name") for p in stream.findall("Parameter")] == ["chroma_stream_token"]

    def check(message):
        assert set(message) == {"event", "media"} and base64.b64decode(message["media"]["payload"])

    call = TelnyxCall.from_texml(texml, call_id=call_id, connect_to=server.ws_url)
    clear = await converse(server, call, phone_speech, check)
    assert clear == {"event": "clear"}
    with pytest.raises(ConnectionError):   # the token was used: a replayed stream is closed
        async with TelnyxCall.from_texml(texml, call_id=call_id, connect_to=server.ws_url) as replay:
            await replay.next_media(timeout=10)


# -- Plivo --

def plivo_answer(server: CarrierServer, form: dict, headers: dict | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode(form).encode()
    signed = plivo_signed(PLIVO_TOKEN, f"{PUBLIC_URL}/plivo/answer", form) if headers is None else headers
    return server.request("POST", "/plivo/answer", body, {"Content-Type": "application/x-www-form-urlencoded",
                                                          **signed})


@call_test
async def test_plivo_xml_signatures_and_a_call(plivo_server, phone_speech):
    server = plivo_server
    form = {"CallUUID": str(uuid.uuid4()), "From": "15550001111", "To": "15550002222", "Direction": "inbound"}
    url = f"{PUBLIC_URL}/plivo/answer"
    for headers in ({}, plivo_signed("other-token", url, form), plivo_signed(PLIVO_TOKEN, url, {**form, "To": "1"}),
                    plivo_signed(PLIVO_TOKEN, "https://elsewhere.test/plivo/answer", form)):
        assert plivo_answer(server, form, headers)[0] == 403
    status, xml = plivo_answer(server, form)
    assert status == 200, xml
    stream = ElementTree.fromstring(xml).find("./Stream")
    assert stream.text == "wss://phone.example.test/ws"
    assert (stream.get("bidirectional"), stream.get("keepCallAlive"), stream.get("contentType")) == (
        "true", "true", "audio/x-mulaw;rate=8000")   # not L16: the serializer speaks mu-law
    name, _, token = stream.get("extraHeaders").partition("=")
    assert name == "chromastreamtoken" and token.isalnum()   # Plivo allows letters and digits only
    get_signed = plivo_signed(PLIVO_TOKEN, f"{url}?CallUUID=abc", {}, method="GET")
    assert server.request("GET", "/plivo/answer?CallUUID=abc", headers=get_signed)[0] == 200

    def check(message):
        assert message["event"] == "playAudio" and message["streamId"] == call.stream_id
        assert message["media"]["contentType"] == "audio/x-mulaw" and message["media"]["sampleRate"] == 8000

    call = PlivoCall.from_xml(xml, call_id=form["CallUUID"], connect_to=server.ws_url)
    clear = await converse(server, call, phone_speech, check)
    assert clear == {"event": "clearAudio", "streamId": call.stream_id}


# -- Exotel --

@call_test
async def test_exotel_basic_auth_and_a_call(exotel_server, phone_speech):
    server = exotel_server
    wrong = {"Authorization": "Basic " + base64.b64encode(b"exotel-key:wrong").decode()}
    for headers in ({}, wrong):
        with pytest.raises(InvalidStatus) as refused:
            await ExotelCall(server.ws_url, headers=headers).connect()
        assert refused.value.response.status_code == 403
    assert server.request("POST", "/telnyx/texml", b"")[0] == 404   # no answer webhook

    def check(message):
        assert message["event"] == "media" and message["stream_sid"] == call.stream_id
        assert len(base64.b64decode(message["media"]["payload"])) % 320 == 0   # whole 20 ms

    call = ExotelCall(server.ws_url, headers=upgrade_headers("exotel"), parameters={"tenant": "a"})
    clear = await converse(server, call, phone_speech, check)
    assert clear == {"event": "clear", "stream_sid": call.stream_id}


# -- Vonage --

@call_test
async def test_vonage_ncco_signed_jwt_and_a_call(vonage_server, phone_speech):
    server = vonage_server
    call_uuid = str(uuid.uuid4())
    query = urllib.parse.urlencode({"from": "15550001111", "to": "15550002222", "uuid": call_uuid})
    query_json = json.dumps({"from": "15550001111", "to": "15550002222", "uuid": call_uuid},
                            separators=(",", ":")).encode()
    path = f"/vonage/answer?{query}"
    for token in (None, vonage_jwt("another-signature-secret-0123456789", query_json),
                  vonage_jwt(VONAGE_SECRET, query_json, iat=time.time() - 900),
                  vonage_jwt(VONAGE_SECRET, b'{"uuid":"another call"}')):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        assert server.request("GET", path, headers=headers)[0] == 403
    body = json.dumps({"uuid": call_uuid, "from": "15550001111", "to": "15550002222"}).encode()
    posted = {"Content-Type": "application/json", "Authorization": f"Bearer {vonage_jwt(VONAGE_SECRET, body)}"}
    assert server.request("POST", "/vonage/answer", body, posted)[0] == 200
    signed = {"Authorization": f"Bearer {vonage_jwt(VONAGE_SECRET, query_json)}"}
    status, text = server.request("GET", path, headers=signed)
    assert status == 200, text
    ncco = json.loads(text)
    endpoint = ncco[0]["endpoint"][0]
    assert ncco[0]["action"] == "connect" and endpoint["type"] == "websocket"
    assert endpoint["uri"] == "wss://phone.example.test/ws" and endpoint["content-type"] == "audio/l16;rate=16000"
    assert endpoint["headers"]["call_uuid"] == call_uuid and "chroma_stream_token" in endpoint["headers"]
    assert endpoint["authorization"] == {"type": "vonage"}
    with pytest.raises(InvalidStatus) as refused:   # the upgrade without Vonage's JWT
        await VonageCall.from_ncco(ncco, connect_to=server.ws_url).connect()
    assert refused.value.response.status_code == 403

    def check(message):   # whole 20 ms of 16 kHz 16-bit PCM (640 bytes a message where the server packs them)
        assert isinstance(message, bytes) and message and len(message) % 640 == 0

    call = VonageCall.from_ncco(ncco, connect_to=server.ws_url, authorization=vonage_jwt(VONAGE_SECRET))
    call.call_id = call_uuid
    clear = await converse(server, call, phone_speech, check)
    assert clear == {"action": "clear"}


# -- REST (in-process, a loopback stand-in of each API) --

class StandIn:
    """A loopback HTTP server that records requests and answers `status`."""

    def __init__(self, status: int = 200):
        self.status, self.requests = status, []

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = server_process.free_port()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    async def handle(self, request):
        body = await request.read()
        self.requests.append((request.method, request.raw_path, dict(request.headers),
                              json.loads(body) if body else None))
        return web.json_response({"errors": [{"detail": "nope"}]}, status=self.status) if self.status >= 400 \
            else web.Response(status=self.status)


@pytest.mark.timeout(30, func_only=True)
async def test_rest_hangup_and_transfer_against_a_stand_in(tmp_path):
    start = StreamStart(stream_id="s1", call_id="v3:call/1")
    telnyx = carrier_for("telnyx", env={"TELNYX_API_KEY": "KEY123"})
    async with StandIn() as api:
        telnyx.api_base = api.base
        await telnyx.hangup(start)
        await telnyx.transfer(start, "+15550003333")
    (m1, p1, h1, b1), (m2, p2, _, b2) = api.requests
    assert (m1, p1, h1["Authorization"], m2, p2, b2) == (
        "POST", "/v2/calls/v3:call%2F1/actions/hangup", "Bearer KEY123",
        "POST", "/v2/calls/v3:call%2F1/actions/transfer",
        {"to": "+15550003333"})
    plivo = carrier_for("plivo", env={"PLIVO_AUTH_ID": "MA123", "PLIVO_AUTH_TOKEN": "tok"})
    async with StandIn(status=204) as api:
        plivo.api_base = api.base
        await plivo.hangup(start)
    method, path, headers, _ = api.requests[0]
    assert (method, path, headers["Authorization"]) == (
        "DELETE", "/v1/Account/MA123/Call/v3:call%2F1/", "Basic " + base64.b64encode(b"MA123:tok").decode())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    (tmp_path / "private.key").write_text(pem)
    vonage = carrier_for("vonage", env={"VONAGE_APPLICATION_ID": "app-1",
                                        "VONAGE_PRIVATE_KEY": str(tmp_path / "private.key")})
    vonage.check_config()
    async with StandIn() as api:
        vonage.api_base = api.base
        await vonage.hangup(StreamStart(stream_id="s", call_id="uuid-1"))
        await vonage.transfer(StreamStart(stream_id="s", call_id="uuid-1"), "+15550003333")
    import jwt
    (m1, p1, h1, b1), (_, _, _, b2) = api.requests
    claims = jwt.decode(h1["Authorization"].split()[1], key.public_key(), algorithms=["RS256"])
    assert (m1, p1, b1, claims["application_id"]) == ("PUT", "/v1/calls/uuid-1", {"action": "hangup"}, "app-1")
    assert b2["destination"]["ncco"][0]["endpoint"] == [{"type": "phone", "number": "15550003333"}]
    async with StandIn(status=500) as api:   # the API's error: a clear message, no key in it
        telnyx.api_base = api.base
        with pytest.raises(CarrierAPIError, match="Telnyx API: HTTP 500") as failed:
            await telnyx.hangup(start)
        assert "KEY123" not in str(failed.value)
    for carrier in (carrier_for("telnyx", env={}), carrier_for("plivo", env={}), carrier_for("exotel", env={})):
        with pytest.raises(NotSupported):   # no credentials, or no such API
            await carrier.transfer(start, "+15550003333")


# -- the serializers (in-process) --

@pytest.mark.timeout(30, func_only=True)
async def test_each_serializer_speaks_its_carrier_and_drops_junk():
    junk = ["not json", "[1, 2]", json.dumps({"event": 5}), json.dumps({"event": "media", "media": "x"}),
            json.dumps({"event": "media", "media": {"payload": "%%%"}}), json.dumps({"event": "nope"}),
            json.dumps({"event": "dtmf", "dtmf": {"digit": "X"}}), "[" * 20000]
    extras = {"telnyx": [b"\x00\x01"], "plivo": [b"\x00\x01"], "exotel": [b"\x00\x01"],
              "vonage": [b"\x00" * 9, b"\x00" * 9000]}
    clients = {"telnyx": TelnyxCall, "plivo": PlivoCall, "exotel": ExotelCall, "vonage": VonageCall}
    for provider, extra in extras.items():
        client = clients[provider]("ws://x", stream_id="s1")
        start = StreamStart(stream_id="s1", call_id="c1", encoding="PCMU" if provider == "telnyx" else "L16",
                            sample_rate=client.rate)
        stopped, tapped = [], []
        serializer = carrier_for(provider, env={}).serializer(start, lambda: stopped.append(1))
        serializer.in_rate = 16000   # the pipeline's (setup() sets it)
        serializer.audio_taps.append(lambda side, pcm, rate: tapped.append((side, len(pcm), rate)))
        for message in junk + extra:
            assert await serializer.deserialize(message) is None
        assert sum(serializer.ignored.values()) == len(junk + extra), (provider, serializer.ignored)
        media = client.media(client.encode(np.full(client.rate // 50, 0.1)), 0)   # 20 ms
        frame = await serializer.deserialize(media if isinstance(media, bytes) else json.dumps(media))
        assert isinstance(frame, InputAudioRawFrame) and frame.sample_rate == 16000 and len(frame.audio) == 640
        sent = [await serializer.serialize(OutputAudioRawFrame(b"\x10\x00" * 1920, 24000, 1)) for _ in range(2)]
        sent = [client.classify(m) for m in sent if m]
        assert sent and all(kind == "media" and client.audio_of(m) for kind, m in sent), (provider, sent)
        assert client.classify(await serializer.serialize(InterruptionFrame()))[0] == "clear"
        assert tapped[:3] == [("caller", 640, 16000)] + [("agent", 3840, 24000)] * 2   # then the barge-in's mark
        if provider != "vonage":   # Vonage's end is the websocket's close
            await serializer.deserialize(json.dumps({"event": "stop"}))
            assert stopped == [1]


# -- the handshakes (in-process) --

def _openings() -> dict[str, list]:
    """Each carrier's opening messages as its client sends them (plus one media message:
    Pipecat's parser reads two), the stream token passed as that carrier passes it."""
    token = "1700000000.0123abcd.cafe"
    calls = {"telnyx": TelnyxCall("ws://x", call_id="c-telnyx", stream_id="s1",
                                  parameters={"chroma_stream_token": token}),
             "plivo": PlivoCall("ws://x", call_id="c-plivo", stream_id="s1",
                                extra_headers=f"chromastreamtoken={token.replace('.', 'x')}"),
             "exotel": ExotelCall("ws://x", call_id="c-exotel", stream_id="s1", parameters={"tenant": "a"}),
             "vonage": VonageCall("ws://x", parameters={"call_uuid": "c-vonage", "chroma_stream_token": token})}
    openings = {name: call.opening() + [call.media(call.encode(np.zeros(160)), 0)] for name, call in calls.items()}
    openings["twilio"] = [{"event": "connected", "protocol": "Call", "version": "1.0.0"},
                          {"event": "start", "streamSid": "s1", "start": {"streamSid": "s1", "callSid": "c-twilio"}}]
    openings["eval"] = [{"label": "rtvi-ai", "type": "client-message", "data": {"t": "eval-connect", "d": {}}}]
    return openings


@pytest.mark.timeout(60, func_only=True)
def test_each_handshake_takes_its_carrier_and_refuses_the_others():
    app = FastAPI()

    @app.websocket("/ws/{provider}")
    async def stream(websocket: WebSocket, provider: str):
        await websocket.accept()
        try:
            start = await carrier_for(provider, env={}).handshake(websocket)
            answer = {"ok": True, "call": start.call_id, "parameters": start.parameters, "rate": start.sample_rate}
        except HandshakeError as e:
            answer = {"ok": False, "why": str(e)}
        await websocket.send_json(answer)
        await websocket.close()

    openings = _openings()
    with TestClient(app) as client:
        for provider in ("telnyx", "plivo", "exotel", "vonage"):
            for sender, messages in openings.items():
                with client.websocket_connect(f"/ws/{provider}") as ws:
                    for message in messages:
                        ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(json.dumps(message))
                    answer = ws.receive_json()
                assert answer["ok"] == (sender == provider), (provider, sender, answer)
                if sender != provider:
                    assert answer["why"] and "c-" not in answer["why"]   # a fixed phrase, not the client's text
                    continue
                assert answer["call"] == f"c-{provider}"
                expected = {"telnyx": {"chroma_stream_token"}, "plivo": {"chroma_stream_token"},
                            "exotel": {"tenant"}, "vonage": {"call_uuid", "chroma_stream_token"}}[provider]
                assert set(answer["parameters"]) == expected, answer
                if "chroma_stream_token" in expected:
                    assert answer["parameters"]["chroma_stream_token"] == "1700000000.0123abcd.cafe"
                assert answer["rate"] == (16000 if provider == "vonage" else 8000)
        for junk in (b"\x00\x01", "not json", json.dumps([1, 2])):   # refused, never raised
            for provider in ("telnyx", "vonage"):
                with client.websocket_connect(f"/ws/{provider}") as ws:
                    for _ in range(2):
                        ws.send_bytes(junk) if isinstance(junk, bytes) else ws.send_text(junk)
                    assert ws.receive_json()["ok"] is False


def test_a_configuration_that_cannot_work_is_refused_before_the_model_loads():
    cases = [("plivo", {"PLIVO_AUTH_TOKEN": "t"}, "public URL"),
             ("telnyx", {"TELNYX_PUBLIC_KEY": "nokey"}, "ed25519"),
             ("exotel", {"EXOTEL_STREAM_AUTH": "nocolon"}, "KEY:SECRET"),
             ("vonage", {"VONAGE_PRIVATE_KEY": "x"}, "VONAGE_APPLICATION_ID"),
             ("vonage", {"VONAGE_PRIVATE_KEY": "/no.key", "VONAGE_APPLICATION_ID": "a"}, "read")]
    for provider, env, match in cases:
        with pytest.raises(ValueError, match=match):
            carrier_for(provider, env=env).check_config()
        assert list(env)[0] in carrier_for(provider, env={}).auth_warning() or provider == "vonage"
    carrier_for("plivo", PUBLIC_URL, env={"PLIVO_AUTH_TOKEN": "t"}).check_config()
    carrier_for("telnyx", env={"TELNYX_PUBLIC_KEY": TELNYX_PUBLIC}).check_config()
