"""Telnyx: a TeXML application's voice webhook answers `<Connect><Stream>`, the media stream
speaks Telnyx's JSON protocol through Pipecat's `TelnyxFrameSerializer`.

- Answer (`POST /telnyx/texml`): `<Connect><Stream url="wss://HOST/ws" bidirectionalMode="rtp"
  bidirectionalCodec="PCMU">` (Telnyx streams and plays mp3 unless bidirectionalMode="rtp";
  with it, 8 kHz PCMU both ways, what the serializer speaks), with the stream token as a
  `<Parameter>` (handed back in `start.custom_parameters`); busy: `<Reject reason="busy"/>`.
- Authentication (TELNYX_PUBLIC_KEY, the account's base64 ed25519 public key): every webhook
  must carry `telnyx-signature-ed25519` over `"{telnyx-timestamp}|{raw body}"`, the timestamp
  within MAX_SKEW_S of now (else 403). The stream's upgrade is not signed by Telnyx: the
  single-use stream token of the signed webhook's answer is what admits it.
- Call control (TELNYX_API_KEY): hang-up and transfer through the Call Control API
  (`POST /v2/calls/{call_control_id}/actions/hangup|transfer`).

Also here, shared by the other carriers (plivo, exotel, vonage): `read_start` (Pipecat's
`parse_telephony_websocket`, the detected carrier checked) and `api_request` (a carrier's
REST call, bounded in time, its failure a `CarrierAPIError`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from typing import Any, Callable, Mapping
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request, WebSocket
from fastapi.responses import Response
from pipecat.audio.utils import alaw_to_pcm, pcm_to_alaw, pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import AudioRawFrame, Frame
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.telnyx import TelnyxFrameSerializer

from chroma_agent.serving.log_safety import printable

from ..twilio_stream_token import TOKEN_PARAMETER
from .carrier import Carrier, HandshakeError, StreamStart, xml_response
from .media import SafeMedia

RATE = 8000                              # PCMU / PCMA, both ways
MAX_SKEW_S = 300                         # a webhook's telnyx-timestamp this far from now: a replay
API_TIMEOUT_S = 10.0                     # one REST call to a carrier
MAX_PARAMETERS = 20                      # custom parameters kept from a stream's start
MAX_PARAMETER_CHARS = 512
TELNYX_EVENTS = {"connected", "start", "media", "dtmf", "mark", "error", "stop"}
# the caller's private fields in a start message: never handed to Pipecat's parser, which
# logs what it parsed (phone numbers, our stream token) at DEBUG
PRIVATE_START_FIELDS = ("from", "to", "custom_parameters", "customParameters", "client_state", "tags")
CALL_ID_KEYS = {"telnyx": "call_control_id", "plivo": "callId", "exotel": "call_sid"}   # in a start's "start"


class CarrierAPIError(RuntimeError):
    """A carrier's REST API refused a request, failed or did not answer in time; the message
    names the carrier and the HTTP status (the body escaped and cut short), never a key."""


async def api_request(title: str, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      json_body: Any = None, basic_auth: tuple[str, str] | None = None,
                      ok: tuple[int, ...] = (200, 201, 202, 204)) -> int:
    """One REST call to a carrier (aiohttp, on the event loop without blocking it), bounded
    by API_TIMEOUT_S: its HTTP status when in `ok`, else CarrierAPIError."""
    sent = dict(headers or {})
    if basic_auth:
        sent["Authorization"] = "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S)) as session:
            async with session.request(method, url, headers=sent, json=json_body) as r:
                if r.status in ok:
                    return r.status
                detail = (await r.content.read(2000)).decode("utf-8", "replace")
                raise CarrierAPIError(f"{title} API: HTTP {r.status}: {printable(detail, 200)}")
    except asyncio.TimeoutError:
        raise CarrierAPIError(f"{title} API: no answer within {API_TIMEOUT_S:g} s") from None
    except aiohttp.ClientError as e:
        raise CarrierAPIError(f"{title} API unreachable ({type(e).__name__})") from None


class _Peek:
    """The websocket as Pipecat's parser reads it: every text message kept as this carrier
    sent it (`messages`, the JSON objects), and handed on without the caller's private
    fields."""

    def __init__(self, websocket: WebSocket):
        self._websocket = websocket
        self.messages: list[dict] = []

    async def iter_text(self):
        async for text in self._websocket.iter_text():   # a binary message raises: not a handshake
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):  # Pipecat's parser decides what junk means
                yield text
                continue
            if isinstance(message, dict):
                self.messages.append(message)
                message = {k: v for k, v in message.items() if k != "extra_headers"}
                if isinstance(message.get("start"), dict):
                    message["start"] = {k: v for k, v in message["start"].items() if k not in PRIVATE_START_FIELDS}
            yield json.dumps(message)


async def read_start(websocket: WebSocket, kind: str, title: str) -> tuple[Any, dict]:
    """The opening of a `kind` ("telnyx", "plivo", "exotel") stream through Pipecat's
    `parse_telephony_websocket`: (its CallData, the raw start message's "start" object and
    the message itself as {"start": ..., "message": ...}). HandshakeError when it is closed,
    not JSON, of the wrong shape, or another carrier's (or an eval's) handshake."""
    peek = _Peek(websocket)
    try:
        detected, data = await parse_telephony_websocket(peek)
    except Exception as e:  # closed, binary, not JSON, nested too deep, wrong types
        raise HandshakeError(f"no {title} start ({type(e).__name__})") from None
    if detected != kind:   # Pipecat's fixed names: twilio, telnyx, plivo, exotel, eval, unknown
        raise HandshakeError(f"not the {title} handshake ({detected})")
    if not isinstance(data.stream_id, str) or not data.stream_id or not isinstance(data.call_id, str):
        raise HandshakeError(f"a {title} start without its stream and call ids")
    call_key = CALL_ID_KEYS[kind]   # the start Pipecat read: the one naming its call
    message = next((m for m in peek.messages if isinstance(m.get("start"), dict)
                    and m["start"].get(call_key) == data.call_id), {})
    return data, {"start": message.get("start", {}), "message": message}


def string_parameters(raw: Any) -> dict[str, str]:
    """Custom parameters as sent ({name: value}, or [{"name", "value"}]): string pairs only,
    at most MAX_PARAMETERS, each cut to MAX_PARAMETER_CHARS."""
    if isinstance(raw, list):
        raw = {p.get("name"): p.get("value") for p in raw[:MAX_PARAMETERS] if isinstance(p, dict)}
    if not isinstance(raw, dict):
        return {}
    pairs = [(k, v) for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)][:MAX_PARAMETERS]
    return {k[:MAX_PARAMETER_CHARS]: v[:MAX_PARAMETER_CHARS] for k, v in pairs}


class SafeTelnyxSerializer(SafeMedia, TelnyxFrameSerializer):
    """`TelnyxFrameSerializer` that never raises on a bad message (dropped, counted in
    `ignored`, logged once per kind), bounds inbound audio, ends on Telnyx's `stop`, taps
    audio both ways, and resamples once (SafeMedia). Barge-in: Pipecat's `{"event": "clear"}`."""

    carrier_title = "Telnyx"
    known_events = frozenset(TELNYX_EVENTS)

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)   # clear on InterruptionFrame, messages
        pcm = await self.agent_pcm(frame, RATE)
        encode = pcm_to_alaw if self._params.inbound_encoding == "PCMA" else pcm_to_ulaw
        audio = await encode(pcm, RATE, RATE, self._out_resampler) if pcm else b""   # same rate: encoded only
        if not audio:
            return None
        return json.dumps({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}})

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Telnyx message, or None; never raises (a raise ends the call)."""
        return await self.event_frame(data, "a Telnyx event")   # connected, start, mark, error: nothing

    async def media_frame(self, message: dict) -> Frame | None:
        media = message.get("media")
        if isinstance(media, dict) and media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return self._ignore("media of another track")
        audio = self.media_payload(media)
        if not audio or not self.take_audio(len(audio) / RATE):
            return None
        decode = alaw_to_pcm if self._params.outbound_encoding == "PCMA" else ulaw_to_pcm
        return await self.caller_frame(await decode(audio, RATE, RATE, self._in_resampler), RATE)


def texml_connect(stream_url: str, token: str | None = None) -> str:
    """The TeXML answer: a bidirectional RTP stream, 8 kHz PCMU both ways, with `token` as
    the stream's TOKEN_PARAMETER `<Parameter>` when given."""
    stream = (f"<Stream url={quoteattr(stream_url)} track=\"inbound_track\" codec=\"PCMU\" "
              'bidirectionalMode="rtp" bidirectionalCodec="PCMU" bidirectionalSamplingRate="8000"')
    if token is None:
        stream += "/>"
    else:   # Telnyx hands it back in the start message's custom_parameters
        stream += f"><Parameter name={quoteattr(TOKEN_PARAMETER)} value={quoteattr(token)}/></Stream>"
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>{stream}</Connect></Response>'


TEXML_BUSY = '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy"/></Response>'


class TelnyxCarrier(Carrier):
    """Telnyx TeXML + media streaming (see the module's docstring). `clock`: wall-clock
    seconds, for the webhook timestamp check; `api_base`: the REST API's origin."""

    name = "telnyx"
    title = "Telnyx"
    webhook_path = "/telnyx/texml"
    secret_env = ("TELNYX_PUBLIC_KEY",)
    signature_name = "telnyx-signature-ed25519"
    busy_xml, call_id_field = TEXML_BUSY, "CallSid"   # TeXML's CallSid: the call_control_id the stream's start names
    api_base = "https://api.telnyx.com"

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        super().__init__(public_url, env)
        self.clock: Callable[[], float] = time.time
        self._key: Ed25519PublicKey | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.env.get("TELNYX_PUBLIC_KEY"))

    def public_key(self) -> Ed25519PublicKey:
        """TELNYX_PUBLIC_KEY as a key (ValueError naming the fix when it is not one)."""
        if self._key is None:
            text = self.env.get("TELNYX_PUBLIC_KEY", "")
            try:
                raw = base64.b64decode(text.strip(), validate=True)
                self._key = Ed25519PublicKey.from_public_bytes(raw)
            except (ValueError, binascii.Error):
                raise ValueError("TELNYX_PUBLIC_KEY is not an ed25519 public key: paste the base64 key of "
                                 "Mission Control > Account Settings > Keys & Credentials > Public Key") from None
        return self._key

    def check_config(self) -> None:
        if self.auth_enabled:
            self.public_key()

    async def verify_webhook(self, request: Request, body: bytes) -> bool:
        """`telnyx-signature-ed25519` over "{telnyx-timestamp}|{body}", the timestamp within
        MAX_SKEW_S of now."""
        if not self.auth_enabled:
            return True
        timestamp = request.headers.get("telnyx-timestamp", "")
        if not timestamp.isdigit() or len(timestamp) > 12 or abs(self.clock() - int(timestamp)) > MAX_SKEW_S:
            return False
        try:
            signature = base64.b64decode(request.headers.get("telnyx-signature-ed25519", ""), validate=True)
            self.public_key().verify(signature, timestamp.encode() + b"|" + body)
        except (ValueError, binascii.Error, InvalidSignature):
            return False
        return True

    def answer(self, request: Request, form: dict[str, str], stream_url: str, token: str | None) -> Response:
        return xml_response(texml_connect(stream_url, token))

    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """Telnyx's `connected` and `start`: the stream id, the call_control_id, the
        custom parameters, the inbound codec (PCMU, or PCMA where the call's codec is)."""
        data, raw = await read_start(websocket, "telnyx", self.title)
        media_format = raw["start"].get("media_format")
        encoding = media_format.get("encoding") if isinstance(media_format, dict) else None
        rate = media_format.get("sample_rate", RATE) if isinstance(media_format, dict) else RATE
        if encoding not in ("PCMU", "PCMA") or str(rate) != str(RATE):
            raise HandshakeError("a Telnyx stream not in 8 kHz PCMU or PCMA")
        return StreamStart(stream_id=data.stream_id, call_id=data.call_id, encoding=encoding, sample_rate=RATE,
                           parameters=string_parameters(raw["start"].get("custom_parameters")))

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> SafeTelnyxSerializer:
        # no auto hang-up: the server ends calls (`hangup`), and a closed stream ends the TeXML
        return SafeTelnyxSerializer(start.stream_id, outbound_encoding=start.encoding, inbound_encoding="PCMU",
                                    call_control_id=start.call_id,
                                    params=TelnyxFrameSerializer.InputParams(auto_hang_up=False), on_stop=on_stop)

    # -- Call Control --
    def _headers(self) -> dict[str, str] | None:
        key = self.env.get("TELNYX_API_KEY")
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} if key else None

    async def _action(self, start: StreamStart, action: str, body: dict | None = None) -> None:
        call = quote(start.call_id, safe=":")   # call_control_ids are "v3:..."
        await api_request(self.title, "POST", f"{self.api_base}/v2/calls/{call}/actions/{action}",
                          headers=self._headers(), json_body=body or {})

    async def hangup(self, start: StreamStart) -> None:
        """Call Control hang-up (TELNYX_API_KEY); without a key: NotSupported."""
        if self._headers() is None:
            return await super().hangup(start)
        await self._action(start, "hangup")

    async def transfer(self, start: StreamStart, number: str) -> None:
        """Call Control transfer of the caller to `number` (TELNYX_API_KEY); without a key:
        NotSupported."""
        if self._headers() is None:
            return await super().transfer(start, number)
        await self._action(start, "transfer", {"to": number})


CARRIER = TelnyxCarrier
