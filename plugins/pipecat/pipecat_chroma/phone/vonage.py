"""Vonage (Voice API): the application's answer URL returns an NCCO that connects the call to
a websocket, which speaks the Voice API's websocket protocol through Pipecat's
`VonageFrameSerializer`.

- Answer (`GET` or `POST /vonage/answer`; events: `POST /vonage/event`, verified, 204):
  `[{"action": "connect", "endpoint": [{"type": "websocket", "uri": "wss://HOST/ws",
  "content-type": "audio/l16;rate=16000", "headers": {...}}]}]`; busy: an empty NCCO (the
  call ends). The endpoint's `headers` carry the call's uuid and the stream token: Vonage
  hands them back in its first message.
- The stream: first a text `{"event": "websocket:connected", "content-type":
  "audio/l16;rate=16000", <headers>}` (the handshake here: Pipecat's telephony parser does not
  know Vonage, and Pipecat's serializer, written for the Video API's audio connector, only
  logs it), then binary 16-bit PCM at 16 kHz in 20 ms frames (640 bytes) both ways (the
  server packs replies in 640-byte messages: `fixed_audio_packet_size`); text events
  (`websocket:dtmf`, `websocket:cleared`, `websocket:notify`). Barge-in: `{"action": "clear"}`.
  The call's end closes the websocket (no stop event).
- Authentication (VONAGE_SIGNATURE_SECRET, the account's signature secret, with signed
  webhooks on for the application): webhooks carry `Authorization: Bearer JWT` (HS256 with
  the secret, `iat` within MAX_AGE_S, `payload_hash` the SHA-256 of the payload); the NCCO
  asks for the same JWT on the websocket's upgrade (`"authorization": {"type": "vonage"}`).
- Call control (VONAGE_APPLICATION_ID and VONAGE_PRIVATE_KEY, the application's private key
  or its file): `PUT /v1/calls/{uuid}` with `hangup`, or `transfer` to an NCCO that connects
  the caller to a phone number, authorized by an RS256 JWT of the application.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping
from urllib.parse import quote

import jwt
from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pipecat.frames.frames import AudioRawFrame, Frame, InterruptionFrame
from pipecat.serializers.vonage import VonageFrameSerializer

from chroma_agent.serving.log_safety import printable

from ..twilio_stream_token import TOKEN_PARAMETER
from .carrier import Carrier, HandshakeError, StreamStart
from .media import MAX_MEDIA_BYTES, SafeMedia
from .telnyx import api_request, string_parameters

RATE = 16000                          # what the NCCO asks for: 16 kHz L16, the pipeline's own rate
CONTENT_TYPE = f"audio/l16;rate={RATE}"
PACKET_BYTES = 2 * RATE // 50         # 20 ms
MAX_AGE_S = 300                       # a JWT older than this (by its iat): a replay
CALL_HEADER = "call_uuid"
VONAGE_EVENTS = {"websocket:connected", "websocket:cleared", "websocket:notify", "websocket:dtmf",
                 "websocket:error"}
CONTENT_RE = re.compile(r"audio/l16;\s*rate=(8000|16000|24000)$", re.IGNORECASE)


class SafeVonageSerializer(SafeMedia, VonageFrameSerializer):
    """`VonageFrameSerializer` for the Voice API: never raises on a bad message (dropped,
    counted in `ignored`, logged once per kind), bounds inbound audio, taps audio both ways
    and resamples once (SafeMedia). Binary messages are the caller's 16-bit PCM; barge-in:
    Pipecat's `{"action": "clear"}`."""

    carrier_title = "Vonage"

    def __init__(self, params: VonageFrameSerializer.InputParams, *, stream_id: str,
                 on_stop: Callable[[], None] | None = None):
        super().__init__(params, on_stop=on_stop)
        self.rate = params.vonage_sample_rate
        self.stream_id = stream_id   # Vonage names no stream: ours, for log lines
        self._packet = 2 * self.rate // 50   # 20 ms: Vonage takes whole frames
        self._pending = b""

    def stream_label(self) -> str:
        return self.stream_id

    async def serialize(self, frame: Frame) -> str | bytes | None:
        """Binary 16-bit PCM in whole 20 ms frames (the remainder carried to the next frame,
        dropped at a barge-in; the transport sends each 20 ms as a message of its own)."""
        if isinstance(frame, InterruptionFrame):
            self._pending = b""
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)   # clear on InterruptionFrame, messages
        pcm = self._pending + await self.agent_pcm(frame, self.rate)
        whole = len(pcm) - len(pcm) % self._packet
        self._pending = pcm[whole:]
        return pcm[:whole] or None

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Vonage message, or None; never raises (a raise ends the call)."""
        if isinstance(data, bytes):
            if len(data) > MAX_MEDIA_BYTES:
                return self._ignore(f"audio message over {MAX_MEDIA_BYTES} bytes")
            if len(data) % 2:
                return self._ignore("audio of an odd number of bytes (not 16-bit PCM)")
            if not data or not self.take_audio(len(data) / 2 / self.rate):
                return None
            return await self.caller_frame(data, self.rate)
        parsed = self.json_event(data, "a Vonage event")
        if parsed is None:
            return None
        event, message = parsed
        if event == "websocket:dtmf":   # {"digit": "5"}, or {"dtmf": {"digit": "5"}}
            dtmf = message.get("dtmf") if isinstance(message.get("dtmf"), dict) else message
            digit = dtmf.get("digit")
            return self.dtmf_frame({"digit": str(digit) if isinstance(digit, int) else digit})
        if event not in VONAGE_EVENTS:
            return self._ignore(f"unknown event {printable(event, 40)!r}", kind="unknown event")
        return None   # connected (again), cleared, notify, error


def ncco_connect(stream_url: str, headers: dict[str, str], signed: bool) -> list[dict]:
    """The answer's NCCO: the call connected to `stream_url` in 16 kHz L16, `headers` handed
    back in the websocket's first message; `signed`: the upgrade carries Vonage's JWT."""
    endpoint: dict[str, Any] = {"type": "websocket", "uri": stream_url, "content-type": CONTENT_TYPE,
                                "headers": headers}
    if signed:
        endpoint["authorization"] = {"type": "vonage"}
    return [{"action": "connect", "endpoint": [endpoint]}]


class VonageCarrier(Carrier):
    """The Vonage Voice API (see the module's docstring). `clock`: wall-clock seconds (the
    JWT's age); `api_base`: the REST API's origin."""

    name = "vonage"
    title = "Vonage"
    webhook_path = "/vonage/answer"
    webhook_methods = ("GET", "POST")
    event_path = "/vonage/event"          # the application's event URL: call status, answered with 204
    secret_env = ("VONAGE_SIGNATURE_SECRET",)
    signature_name = "signed JWT (Authorization: Bearer)"
    fixed_audio_packet_size: ClassVar[int] = PACKET_BYTES   # the output transport's message size
    api_base = "https://api.nexmo.com"

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        super().__init__(public_url, env)
        self.clock: Callable[[], float] = time.time

    @property
    def auth_enabled(self) -> bool:
        return bool(self.env.get("VONAGE_SIGNATURE_SECRET"))

    def check_config(self) -> None:
        if self.env.get("VONAGE_PRIVATE_KEY") or self.env.get("VONAGE_APPLICATION_ID"):
            if not self.env.get("VONAGE_APPLICATION_ID"):
                raise ValueError("VONAGE_PRIVATE_KEY is set without VONAGE_APPLICATION_ID (the application's id)")
            self.private_key()

    def private_key(self) -> str | None:
        """VONAGE_PRIVATE_KEY: the PEM itself or a file holding it (ValueError when neither)."""
        value = self.env.get("VONAGE_PRIVATE_KEY", "")
        if not value:
            return None
        if "-----BEGIN" in value:
            return value.replace("\\n", "\n")
        try:
            return Path(value).expanduser().read_text()
        except OSError as e:
            raise ValueError(f"VONAGE_PRIVATE_KEY: cannot read the key file ({e.strerror})") from None

    # -- signed webhooks --
    def _claims(self, authorization: str) -> dict | None:
        """The claims of a valid `Bearer JWT` (HS256, the signature secret, fresh), else None."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > 4096:
            return None
        try:
            claims = jwt.decode(token.strip(), self.env["VONAGE_SIGNATURE_SECRET"], algorithms=["HS256"],
                                options={"require": ["iat"], "verify_iat": False, "verify_aud": False}, leeway=30)
        except jwt.PyJWTError:
            return None
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or not -30 <= self.clock() - iat <= MAX_AGE_S:
            return None
        return claims

    async def verify_webhook(self, request: Request, body: bytes) -> bool:
        """Bearer JWT (HS256 with VONAGE_SIGNATURE_SECRET, iat recent), its payload_hash the
        SHA-256 of the payload: the body, or the query's parameters as compact JSON (GET)."""
        if not self.auth_enabled:
            return True
        claims = self._claims(request.headers.get("authorization", ""))
        if claims is None:
            return False
        expected = claims.get("payload_hash")
        if expected is None:
            return True
        payloads = [body] if body else []
        try:   # Vonage hashes the payload as compact JSON
            parsed = json.loads(body) if body else dict(request.query_params)
            payloads.append(json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode())
        except (ValueError, RecursionError):
            pass
        return isinstance(expected, str) and any(
            hmac.compare_digest(hashlib.sha256(p).hexdigest(), expected.lower()) for p in payloads)

    def verify_upgrade(self, websocket: WebSocket) -> bool:
        """The upgrade's Bearer JWT (the NCCO asks Vonage for it)."""
        return not self.auth_enabled or self._claims(websocket.headers.get("authorization", "")) is not None

    # -- answering --
    def answer(self, request: Request, form: dict[str, str], stream_url: str, token: str | None) -> Response:
        headers = {CALL_HEADER: self.webhook_call_id(form)}
        if token is not None:
            headers[TOKEN_PARAMETER] = token
        return JSONResponse(ncco_connect(stream_url, headers, self.auth_enabled))

    def busy(self, request: Request, form: dict[str, str]) -> Response:
        return JSONResponse([])   # nothing to do: Vonage ends the call

    def webhook_call_id(self, form: dict[str, str]) -> str:
        value = form.get("uuid", "")
        return value if isinstance(value, str) else ""

    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """Vonage's first message, `websocket:connected`: its content-type (16-bit PCM at
        8, 16 or 24 kHz) and the NCCO's headers (the call's uuid, the stream token)."""
        message = await websocket.receive()
        text = message.get("text") if message.get("type") == "websocket.receive" else None
        if not isinstance(text, str):
            raise HandshakeError("no Vonage websocket:connected (closed, or audio first)")
        try:
            connected = json.loads(text)
        except (ValueError, RecursionError):
            raise HandshakeError("no Vonage websocket:connected (not JSON)") from None
        if not isinstance(connected, dict) or connected.get("event") != "websocket:connected":
            raise HandshakeError("not a Vonage handshake (no websocket:connected)")
        match = CONTENT_RE.match(str(connected.get("content-type", "")))
        if match is None:
            raise HandshakeError("a Vonage stream not in 16-bit PCM at 8, 16 or 24 kHz")
        parameters = string_parameters({k: v for k, v in connected.items() if k not in ("event", "content-type")})
        return StreamStart(stream_id=f"vonage-{uuid.uuid4().hex[:16]}", call_id=parameters.get(CALL_HEADER, ""),
                           parameters=parameters, encoding="L16", sample_rate=int(match.group(1)))

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> SafeVonageSerializer:
        params = VonageFrameSerializer.InputParams(vonage_sample_rate=start.sample_rate)
        return SafeVonageSerializer(params, stream_id=start.stream_id, on_stop=on_stop)

    # -- the Voice API --
    def _bearer(self) -> str | None:
        application, key = self.env.get("VONAGE_APPLICATION_ID"), self.private_key()
        if not (application and key):
            return None
        now = int(self.clock())
        claims = {"application_id": application, "iat": now, "exp": now + 300, "jti": secrets.token_hex(16)}
        return jwt.encode(claims, key, algorithm="RS256")

    async def _update(self, start: StreamStart, body: dict) -> None:
        await api_request(self.title, "PUT", f"{self.api_base}/v1/calls/{quote(start.call_id, safe='')}",
                          headers={"Authorization": f"Bearer {self._bearer()}"}, json_body=body)

    async def hangup(self, start: StreamStart) -> None:
        """`PUT /v1/calls/{uuid}` hangup (VONAGE_APPLICATION_ID, VONAGE_PRIVATE_KEY); without
        them: NotSupported."""
        if self._bearer() is None or not start.call_id:
            return await super().hangup(start)
        await self._update(start, {"action": "hangup"})

    async def transfer(self, start: StreamStart, number: str) -> None:
        """`PUT /v1/calls/{uuid}` transfer to an NCCO connecting the caller to `number`
        (E.164; Vonage writes it without the "+")."""
        if self._bearer() is None or not start.call_id:
            return await super().transfer(start, number)
        ncco = [{"action": "connect", "endpoint": [{"type": "phone", "number": number.lstrip("+")}]}]
        await self._update(start, {"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}})


CARRIER = VonageCarrier
