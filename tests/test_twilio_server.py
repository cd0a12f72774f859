"""The phone server end to end: the real `chroma-agent serve twilio` process on the tiny
checkpoint, over loopback, called by a client that speaks Twilio's Media Streams protocol
(`pipecat_chroma.twilio_testing.TwilioCall`: `connected`, `start`, 20 ms mu-law `media`
in real time, `stop`) with espeak-ng speech. The tiny model's replies are noise, but the
call, the turns, the barge-in and the teardown are the real ones.

Two server processes, one per configuration: `open_server` (no token) and `locked_server`
(TWILIO_AUTH_TOKEN set, `--public-url`, `--max-calls 1`, a greeting). Both have an admin
key, which `GET /calls` needs (per-call records); `GET /metrics` is Prometheus text. The attacks on the locked server's
credentials and limits: tests/test_twilio_hardening.py."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pipecat")
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from pipecat_chroma.twilio_testing import TwilioCall, sign, twiml_stream  # noqa: E402

from . import server_process  # noqa: E402
from .conftest import speak  # noqa: E402
from .health_schema import check_health  # noqa: E402
from .server_process import START_TIMEOUT_S  # noqa: E402

TOKEN = "test-auth-token"
ADMIN_KEY = "test-admin-key"
PUBLIC_URL = "https://phone.example.test"   # behind TLS: Twilio signs this URL, the tests dial the loopback port
REPLY_TIMEOUT_S = 30      # end of speech -> first reply audio, generous for a shared CI machine
call_test = pytest.mark.timeout(90, func_only=True)


# -- the server process --

class ServerProcess(server_process.ServerProcess):
    """`chroma-agent serve twilio` on a free loopback port; its log in a file."""

    def __init__(self, checkpoint: Path, voice: Path, log: Path, *extra: str, env: dict | None = None):
        super().__init__("twilio", ["--model", str(checkpoint), "--voice", str(voice), "--host", "127.0.0.1",
                                    "--max-frames", "40", *extra], log,
                         env={"CHROMA_AGENT_ADMIN_KEY": ADMIN_KEY, **(env or {})},
                         drop_env=("TWILIO_", "CHROMA_AGENT_ADMIN_KEY", "CHROMA_AGENT_TWILIO_"))
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def get(self, path: str, key: str | None = ADMIN_KEY) -> dict:
        """A GET's JSON, with `Authorization: Bearer KEY` (the admin's: GET /calls)."""
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        with urllib.request.urlopen(urllib.request.Request(self.base + path, headers=headers), timeout=5) as r:
            return json.loads(r.read())

    def health_status(self) -> tuple[int, dict]:
        """/health's HTTP status (503 while draining) and its JSON."""
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def call_id(self, stream_sid: str) -> str:
        """The server's own id of the call on `stream_sid` (what its log lines name it by)."""
        calls = self.get("/calls")
        return next(c["id"] for c in calls["active"] + calls["finished"] if c["stream_sid"] == stream_sid)

    def ignored_kinds(self, stream_sid: str) -> list[str]:
        """The kinds of dropped message the server logged for one stream, one entry per line."""
        marker = f"call {self.call_id(stream_sid)}: ignoring a message from Twilio ("
        return [line.split(marker, 1)[1].split("); later ones", 1)[0]
                for line in self.log.read_text().splitlines() if marker in line]

    def post_twiml(self, form: dict, headers: dict | None = None, query: str = "") -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(f"{self.base}/twiml{query}", data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def finished(self, call_sid: str) -> dict:
        return next(c for c in self.get("/calls")["finished"] if c["call_sid"] == call_sid)


@pytest.fixture(scope="module")
def voice_file(voice, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phone_voice") / "tiny.voice.safetensors"
    voice.save(path)
    return path


def _server(tiny_checkpoint, voice_file, tmp_path_factory, *extra, env=None):
    log = tmp_path_factory.mktemp("phone_server") / "server.log"
    server = ServerProcess(tiny_checkpoint, voice_file, log, *extra, env=env)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def open_server(tiny_checkpoint, voice_file, tmp_path_factory):
    server = _server(tiny_checkpoint, voice_file, tmp_path_factory, "--max-calls", "4")   # no calibration
    yield server
    server.stop()


@pytest.fixture(scope="module")
def locked_server(tiny_checkpoint, voice_file, tmp_path_factory):
    server = _server(tiny_checkpoint, voice_file, tmp_path_factory, "--max-calls", "1", "--greeting", "Hello!",
                     "--public-url", PUBLIC_URL, env={"TWILIO_AUTH_TOKEN": TOKEN})
    yield server
    server.stop()


def _spoken(text: str, path: Path) -> tuple[np.ndarray, int]:
    """espeak-ng speech without its leading and trailing silence (the caller's speech ends
    where the audio ends)."""
    samples, rate = sf.read(speak(text, path), dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return samples[loud[0]:loud[-1] + 1], rate


@pytest.fixture(scope="module")
def phone_speech(tmp_path_factory) -> dict[str, tuple[np.ndarray, int]]:
    d = tmp_path_factory.mktemp("phone_speech")
    return {"question": _spoken("What time does the store open on Saturday?", d / "question.wav"),
            "barge_in": _spoken("Hold on a second please", d / "barge_in.wav")}


# -- calls --

@call_test
async def test_a_call_gets_the_reply_and_a_clear_when_the_caller_talks_over_it(open_server, phone_speech):
    twiml_status, twiml = open_server.post_twiml({"CallSid": "CA1"})
    assert twiml_status == 200
    assert f'<Connect><Stream url="wss://127.0.0.1:{open_server.port}/ws"/></Connect>' in twiml

    async with TwilioCall(open_server.ws_url) as call:
        spoken = await call.say(*phone_speech["question"])
        first_audio, first = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert call.received_audio(first_audio).size > 0
        assert open_server.health()["active_calls"] == 1

        barge_in_start = time.time()
        barge_in = asyncio.create_task(call.say(*phone_speech["barge_in"]))
        cleared, clear = await call.next_event("clear", after=first_audio, timeout=10)
        barge_in_end = await asyncio.wait_for(barge_in, 10)
        assert [t for t, _ in call.media(after=barge_in_start) if t < cleared]  # the caller talked over the reply
        # the interrupted reply stopped: nothing more of it after the clear (its in-flight frame aside)
        assert not [t for t, _ in call.media(after=cleared + 0.3) if t < barge_in_end]
        assert {m["streamSid"] for _, m in call.received if m["event"] in ("media", "clear")} == {call.stream_sid}

        await call.stop()
        await asyncio.wait_for(call.closed.wait(), 10)  # the server ends the call on `stop`
    await open_server.wait_active(0)

    record = open_server.finished(call.call_sid)
    answered = [t for t in record["turns"] if t["time_to_first_audio_s"] is not None]
    assert answered and 0 < answered[0]["time_to_first_audio_s"] < REPLY_TIMEOUT_S
    turn = answered[0]   # every mark of the turn, read off the frames the service pushes on
    assert turn["started"] < turn["turn_end"] <= turn["first_audio"] <= turn["audio_out"]
    assert turn["speech_end"] < turn["vad_stop"] and turn["model_ttfb_s"] > 0, turn
    log = open_server.log.read_text()
    assert f"call {record['id']} ended" in log  # the per-call log line, by the server's own id
    assert call.call_sid not in log and call.stream_sid not in log   # the carrier's ids only when asked


@call_test
async def test_malformed_messages_are_ignored_and_the_call_goes_on(open_server, phone_speech):
    async with TwilioCall(open_server.ws_url) as call:
        bad = ["not json at all", "[1, 2, 3]", json.dumps({"event": "no-such-event"}),
               json.dumps({"event": "media", "streamSid": call.stream_sid, "media": {"payload": "%%% not base64 %%%"}}),
               json.dumps({"event": "media", "streamSid": call.stream_sid})]
        for message in bad:
            await call.send(message)
        spoken = await call.say(*phone_speech["question"])
        _, reply = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert reply["streamSid"] == call.stream_sid
        await call.stop()
    await open_server.wait_active(0)
    assert open_server.finished(call.call_sid)["ignored_messages"] == len(bad)


@call_test
async def test_a_dropped_line_frees_its_call_and_the_other_calls_go_on(open_server, phone_speech):
    async with TwilioCall(open_server.ws_url) as other:
        dropped = TwilioCall(open_server.ws_url)
        await dropped.connect()
        spoken = await dropped.say(*phone_speech["question"])
        await dropped.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)  # mid-reply
        await open_server.wait_active(2)
        dropped.drop()  # no `stop`, no close handshake
        await open_server.wait_active(1, timeout=5)
        assert open_server.finished(dropped.call_sid)["ended"] is not None

        async with connect(open_server.ws_url, proxy=None) as junk:  # never a Twilio `start`: closed alone
            await junk.send("not a Twilio handshake")
            await junk.send("still not")
            await asyncio.wait_for(junk.wait_closed(), 10)
            assert junk.close_code == 1008

        spoken = await other.say(*phone_speech["question"])  # the other call is untouched
        _, reply = await other.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert reply["streamSid"] == other.stream_sid
        await other.stop()
    await open_server.wait_active(0)


# -- signatures, capacity, greeting (TWILIO_AUTH_TOKEN set, --max-calls 1, --greeting) --

FORM = {"CallSid": "CA" + "1" * 32, "AccountSid": "AC" + "2" * 32, "From": "+15550001111", "To": "+15550002222"}


def signed() -> dict:
    """The upgrade's signature: the same for every stream of the server (hence the token)."""
    return {"X-Twilio-Signature": sign(TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws")}


def answer(server: ServerProcess, call_sid: str | None = None, query: str = "") -> tuple[str, str]:
    """Twilio's signed webhook for a new call: (its CallSid, the TwiML answer)."""
    form = {**FORM, "CallSid": call_sid or "CA" + uuid.uuid4().hex}
    status, twiml = server.post_twiml(form, {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml{query}", form)},
                                      query=query)
    assert status == 200, twiml
    return form["CallSid"], twiml


def answered_call(server: ServerProcess, **kwargs) -> TwilioCall:
    """The stream Twilio opens for a signed webhook's answer: to the TwiML's stream, dialled
    at the loopback port, with the TwiML's token in `start.customParameters`."""
    call_sid, twiml = answer(server)
    return TwilioCall.from_twiml(twiml, call_sid=call_sid, auth_token=TOKEN, connect_to=server.ws_url, **kwargs)


@call_test
async def test_the_webhook_needs_a_valid_signature(locked_server):
    url = f"{PUBLIC_URL}/twiml"
    health = locked_server.health()
    check_health(health, "twilio")
    assert health["signatures"] is True and health["max_calls"] == 1
    refused_before = _refused_auth(locked_server)
    assert locked_server.post_twiml(FORM)[0] == 403                                            # unsigned
    assert locked_server.post_twiml(FORM, {"X-Twilio-Signature": sign("other-token", url, FORM)})[0] == 403
    assert locked_server.post_twiml(FORM, {"X-Twilio-Signature": sign(TOKEN, url, {**FORM, "From": "+1"})})[0] == 403

    status, twiml = locked_server.post_twiml(FORM, {"X-Twilio-Signature": sign(TOKEN, url, FORM)})
    assert status == 200 and f'<Connect><Stream url="wss://phone.example.test/ws"><Parameter ' in twiml
    # the public URL's query string is signed too
    tenant_a = {"X-Twilio-Signature": sign(TOKEN, f"{url}?tenant=a", FORM)}
    assert locked_server.post_twiml(FORM, tenant_a, query="?tenant=a")[0] == 200
    assert locked_server.post_twiml(FORM, tenant_a, query="?tenant=b")[0] == 403
    assert _refused_auth(locked_server) == refused_before + 4   # /metrics (Prometheus): by reason


def _refused_auth(server: ServerProcess) -> float:
    """`chroma_calls_refused_total{reason="auth"}` from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "chroma_calls_refused_total" and s.labels == {"reason": "auth"})


@call_test
async def test_the_stream_upgrade_needs_a_valid_signature(locked_server):
    for headers in ({}, {"X-Twilio-Signature": sign("other-token", locked_server.ws_url)},
                    {"X-Twilio-Signature": sign(TOKEN, locked_server.ws_url)}):   # not the public URL
        with pytest.raises(InvalidStatus) as refused:
            await TwilioCall(locked_server.ws_url, headers=headers).connect()
        assert refused.value.response.status_code == 403

    async with answered_call(locked_server) as call:
        await locked_server.wait_active(1)
        await call.stop()
    await locked_server.wait_active(0)
    call_sid, twiml = answer(locked_server)   # a stream URL with a query string: signed with it
    url, parameters = twiml_stream(twiml)
    headers = {"X-Twilio-Signature": sign(TOKEN, f"{url}?tenant=a")}
    async with TwilioCall(f"{locked_server.ws_url}?tenant=a", call_sid=call_sid, headers=headers,
                          custom_parameters=parameters) as call:
        await locked_server.wait_active(1)
        await call.stop()
    await locked_server.wait_active(0)


@call_test
async def test_the_greeting_is_spoken_when_the_call_connects(locked_server):
    async with answered_call(locked_server) as call:
        _, greeting = await call.next_media(timeout=REPLY_TIMEOUT_S)  # before the caller says a word
        assert greeting["streamSid"] == call.stream_sid
        await call.stop()
    await locked_server.wait_active(0)


@call_test
async def test_past_max_calls_calls_are_refused_and_the_running_one_is_untouched(locked_server, phone_speech):
    twiml_signature = {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml", FORM)}
    async with answered_call(locked_server) as first:
        await locked_server.wait_active(1)
        status, twiml = locked_server.post_twiml(FORM, twiml_signature)
        assert status == 200 and '<Reject reason="busy"/>' in twiml and "<Stream" not in twiml
        with pytest.raises(InvalidStatus) as refused:  # a stream that connects anyway
            await TwilioCall(locked_server.ws_url, headers=signed()).connect()
        assert refused.value.response.status_code == 503
        assert locked_server.health()["active_calls"] == 1

        await first.next_media(timeout=REPLY_TIMEOUT_S)         # the greeting
        await first.until_quiet(timeout=REPLY_TIMEOUT_S)
        spoken = await first.say(*phone_speech["question"])
        _, reply = await first.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert reply["streamSid"] == first.stream_sid
        await first.stop()
    await locked_server.wait_active(0)
    assert "<Connect><Stream" in locked_server.post_twiml(FORM, twiml_signature)[1]   # free again


# -- hostile input, limits, drain (issue 15) --

def _media(stream_sid: str, payload) -> str:
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"track": "inbound", "payload": payload}})


def _reply_gaps(call: TwilioCall, start: float, end: float) -> list[float]:
    """Gaps between the server's consecutive media messages that arrived in [start, end]."""
    times = [t for t, _ in call.media(after=start) if t <= end]
    return list(np.diff(times))


@call_test
async def test_hostile_messages_are_dropped_logged_once_and_the_call_goes_on(open_server, phone_speech):
    async with TwilioCall(open_server.ws_url) as call:
        sid = call.stream_sid
        hostile = {  # the kind the server logs -> messages of that kind
            "binary frame": [b"\x00\xff" * 100],
            "not JSON": ['{"event": "media", "media": {"payl', "[" * 20000],   # truncated; nested past any parser
            "not a Twilio event (a JSON object with a string 'event')": [
                "[1, 2]", json.dumps({"event": 5}), json.dumps({"event": ["media"]}), json.dumps({"event": None})],
            "media without a payload string": [json.dumps({"event": "media", "media": "x"}), _media(sid, 7),
                                               _media(sid, ["AAAA"])],
            "media payload that is not base64": [_media(sid, "abc"), _media(sid, "%%%%")],   # wrong length, junk
            "media payload over 8000 bytes": [_media(sid, base64.b64encode(b"\xff" * 40000).decode())],
            "dtmf without a keypad digit": [json.dumps({"event": "dtmf", "dtmf": {"digit": 5}})],
        }
        for _ in range(3):  # logged once per kind, however often it comes
            for messages in hostile.values():
                for message in messages:
                    await call.send(message)
        for _ in range(500):  # 10 s of audio at once: ~2 s of it is taken, the rest dropped
            await call.send(_media(sid, base64.b64encode(b"\xff" * 160).decode()))
        spoken = await call.say(*phone_speech["question"])
        _, reply = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert reply["streamSid"] == sid
        await call.stop()
    await open_server.wait_active(0)

    logged = open_server.ignored_kinds(sid)
    flood = "audio arriving faster than real time (over 2 s ahead)"
    assert sorted(logged) == sorted([*hostile, flood])   # each kind exactly once
    ignored = open_server.finished(call.call_sid)["ignored_messages"]
    # the flood less the ~2 s taken, and less the time the call had been streaming before it
    assert 3 * sum(map(len, hostile.values())) + 300 <= ignored <= 3 * sum(map(len, hostile.values())) + 500


@pytest.mark.timeout(120, func_only=True)
async def test_oversized_messages_and_a_flood_of_dropped_connections_leave_other_calls_alone(open_server,
                                                                                            phone_speech):
    async with TwilioCall(open_server.ws_url) as other:
        spoken = await other.say(*phone_speech["question"])
        first, _ = await other.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)   # its reply plays meanwhile

        oversized = TwilioCall(open_server.ws_url)
        await oversized.connect()
        await oversized.send(_media(oversized.stream_sid, "A" * 100_000))   # over the 64 KiB message limit
        await asyncio.wait_for(oversized.closed.wait(), 10)
        assert oversized.close_code == 1009   # "message too big", from the server

        flood = [TwilioCall(open_server.ws_url) for _ in range(12)]
        results = await asyncio.gather(*(c.connect() for c in flood), return_exceptions=True)
        connected = [c for c, r in zip(flood, results) if r is None]
        refused = [r for r in results if r is not None]
        assert all(isinstance(r, InvalidStatus) and r.response.status_code == 503 for r in refused), refused
        assert 1 <= len(connected) <= 3 and len(connected) + len(refused) == 12   # 4 slots, one is `other`'s
        for call in connected:
            call.drop()   # all at once, no `stop`, no close handshake
        await open_server.wait_active(1, timeout=10)

        await other.until_quiet(timeout=REPLY_TIMEOUT_S)
        end = max(t for t, _ in other.media())
        gaps = _reply_gaps(other, first, end)
        assert gaps and max(gaps) < 0.5, f"the other call's reply stalled: gaps up to {max(gaps):.2f} s"
        spoken = await other.say(*phone_speech["question"])   # and it still answers
        _, reply = await other.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        assert reply["streamSid"] == other.stream_sid
        await other.stop()
    await open_server.wait_active(0)
    await _until_engine_idle(open_server)
    refusals = [line for line in open_server.log.read_text().splitlines() if "refused a media stream: busy" in line]
    assert 1 <= len(refusals) <= 2   # one line for the burst (and its count), not one per connection


async def _until_engine_idle(server: ServerProcess, timeout: float = 10.0) -> None:
    """Until every engine slot is back (the conversations of ended calls are closed)."""
    deadline = time.monotonic() + timeout
    while (open_now := server.health()["engine"]["conversations"]) != 0:
        assert time.monotonic() < deadline, f"{open_now} engine conversations still open after the calls ended"
        await asyncio.sleep(0.1)


DRAIN_S = 15   # room for a whole turn after SIGTERM on a slow CI machine


@pytest.mark.timeout(START_TIMEOUT_S + 90, func_only=True)
async def test_sigterm_drains_running_calls_then_exits_0(tiny_checkpoint, voice_file, tmp_path_factory,
                                                          phone_speech):
    # no --max-calls: the engine measures its capacity at start, and that is the limit
    server = await asyncio.to_thread(_server, tiny_checkpoint, voice_file, tmp_path_factory,
                                     "--drain-seconds", str(DRAIN_S), "--greeting", "Hi!")
    try:
        health = server.health()
        check_health(health, "twilio")
        assert health["status"] == "ok" and health["max_calls"] == health["engine"]["capacity"] >= 1
        async with TwilioCall(server.ws_url) as call:
            await call.next_media(timeout=REPLY_TIMEOUT_S)   # the greeting: the call's pipeline runs
            await call.until_quiet(timeout=REPLY_TIMEOUT_S)
            spoken = await call.say(*phone_speech["question"])
            await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)   # a reply is playing
            assert server.health()["engine"]["conversations"] == 1
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            deadline = signalled + 5
            while (status := server.health_status())[1]["status"] != "draining":
                assert time.monotonic() < deadline, f"/health still says {status} after SIGTERM"
                await asyncio.sleep(0.05)
            assert status[0] == 503 and status[1]["active_calls"] == 1
            twiml_status, twiml = server.post_twiml(FORM)
            assert twiml_status == 200 and '<Reject reason="busy"/>' in twiml and "<Stream" not in twiml
            with pytest.raises(InvalidStatus) as refused:
                await TwilioCall(server.ws_url).connect()
            assert refused.value.response.status_code == 503 and b"draining" in refused.value.response.body

            spoken = await call.say(*phone_speech["question"])   # the running call goes on: a new turn
            _, reply = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
            assert reply["streamSid"] == call.stream_sid
            assert time.monotonic() - signalled < DRAIN_S, "the test spoke past the drain time: raise DRAIN_S"

            await asyncio.wait_for(call.closed.wait(), DRAIN_S + 10)   # the server ends it at the drain time
            closed = time.monotonic() - signalled
            assert DRAIN_S - 0.5 < closed < DRAIN_S + 8
        code = await asyncio.to_thread(server.proc.wait, 20)
        assert code == 0, server.log.read_text()[-3000:]
        assert time.monotonic() - signalled < DRAIN_S + 15
        log = server.log.read_text()
        assert "drain time is over: ending 1 calls" in log and re.search(r"call [0-9a-f]{16} ended", log)
    finally:
        server.stop()


# -- a failure of the model itself --

@call_test
async def test_a_call_the_model_cannot_take_is_refused_and_the_other_calls_go_on(model, voice, phone_speech):
    # e.g. CUDA out of memory when a call's conversation is made: that call's stream is
    # closed at once with its slot freed, not left connected and mute; the next call answers
    import torch

    from chroma_agent.runtime.engine import ChromaEngine
    from pipecat_chroma.twilio_server import create_app

    engine = ChromaEngine(model, max_conversations=2)
    real, failures = engine.conversation, []

    def out_of_memory_once(**kwargs):
        if not failures:
            failures.append(kwargs)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    engine.conversation = out_of_memory_once
    app = create_app(engine, voice, max_calls=2, max_frames=25)
    running = server_process.AppThread(app)
    try:
        await asyncio.to_thread(running.start)
        phone, url = app.state.phone, f"ws://127.0.0.1:{running.port}/ws"
        async with TwilioCall(url) as refused:
            for _ in range(200):   # 10 s
                if refused.close_code is not None:
                    break
                await asyncio.sleep(0.05)
            assert refused.close_code is not None, "the call without a conversation was left open"
        assert failures and not phone.active and engine.active == 0
        async with TwilioCall(url) as call:
            spoken = await call.say(*phone_speech["question"])
            await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
            await call.stop()
        assert phone.calls_total == 2 and len(failures) == 1
    finally:
        await asyncio.to_thread(running.stop)
        engine.close()
