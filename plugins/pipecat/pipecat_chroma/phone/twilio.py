"""Twilio: the voice webhook (`POST /twiml`) answers `<Connect><Stream url="wss://HOST/ws">`,
and Twilio Media Streams (8 kHz mu-law JSON messages) carry the call.

With TWILIO_AUTH_TOKEN set, `public_url` is required, the webhook and the stream's upgrade
need a valid `X-Twilio-Signature` for it (else 403), and a stream's `start` must carry the
single-use token of its call that the webhook's TwiML named (`twilio_stream_token`). With
TWILIO_ACCOUNT_SID too, hang-up, transfer and outbound calls go through Twilio's REST API
(`twilio_rest.TwilioREST`; CHROMA_AGENT_TWILIO_API_URL points it elsewhere, for tests).
"""
from __future__ import annotations

import base64
import json
import os
from typing import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

from fastapi import Request, WebSocket
from fastapi.responses import Response
from pipecat.audio.utils import pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import AudioRawFrame, Frame
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from twilio.request_validator import RequestValidator

from ..twilio_guards import require_public_url
from ..twilio_stream_token import connect_twiml
from .carrier import Carrier, HandshakeError, NotSupported, StreamStart, xml_response
from .media import SafeMedia

TWILIO_EVENTS = {"connected", "start", "media", "dtmf", "mark", "stop"}
TWIML_BUSY = '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy"/></Response>'
API_URL_ENV = "CHROMA_AGENT_TWILIO_API_URL"   # the REST API's base URL (tests: a loopback stand-in)


class TwilioSignatures:
    """Checks `X-Twilio-Signature` on the webhook and the stream upgrade.

    Twilio signs the URL it called, query string included, and TLS usually ends in front of
    the server (ngrok, a load balancer), so that URL is rebuilt from `public_url` and the
    request's path and query, never from its Host or X-Forwarded-Proto headers (those
    would let a signature made for another app of the same account pass): with a token,
    `public_url` is required (ValueError). `RequestValidator` tries the URL with and
    without the port."""

    def __init__(self, auth_token: str | None, public_url: str | None):
        require_public_url(auth_token, public_url)
        self.validator = RequestValidator(auth_token) if auth_token else None
        self.public = urlsplit(public_url) if public_url else None

    @property
    def enabled(self) -> bool:
        return self.validator is not None

    def url(self, scope: Request | WebSocket, route: str) -> str:
        """The URL Twilio called for `route` ("/twiml" or "/ws"), as Twilio wrote it."""
        websocket = isinstance(scope, WebSocket)
        scheme, host, path = self.public.scheme, self.public.netloc, self.public.path.rstrip("/") + route
        if websocket:  # an https front door means a wss stream
            scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
        query = scope.url.query
        return f"{scheme}://{host}{path}" + (f"?{query}" if query else "")

    def valid(self, scope: Request | WebSocket, route: str, params: dict | None = None) -> bool:
        if self.validator is None:
            return True
        signature = scope.headers.get("x-twilio-signature", "")
        return bool(signature) and self.validator.validate(self.url(scope, route), params or {}, signature)


class SafeTwilioSerializer(SafeMedia, TwilioFrameSerializer):
    """`TwilioFrameSerializer` that a bad message cannot hang up, that ends on `stop`, and
    that adds no buffering delay to the audio in either direction.

    - The stock `deserialize` raises on a payload that is not base64, and the websocket
      input stops receiving on any exception, so one bad message would end the call: here
      what cannot be used (binary frames, not JSON or nested too deep, not an object, fields
      of the wrong type, unknown events, bad base64, a payload over MAX_MEDIA_BYTES, audio
      more than MAX_AUDIO_AHEAD_S ahead of real time) is dropped, logged once per kind of
      fault and counted in `ignored`. Fuzzed in tests/test_twilio_fuzz.py.
    - Twilio's `stop` (the caller hung up) calls `on_stop`.
    - Inbound 8 kHz audio goes to a 16 kHz pipeline through `Upsampler2x` (other pipeline
      rates: soxr); outbound audio is resampled to 8 kHz here with soxr "MQ" (`SafeMedia`).
    - Audio both ways is handed to `audio_taps` (recordings)."""

    carrier_title = "Twilio"
    known_events = frozenset(TWILIO_EVENTS)

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)  # clear (InterruptionFrame), hang-up on End/Cancel
        rate = self._params.twilio_sample_rate
        pcm = await self.agent_pcm(frame, rate)
        ulaw = await pcm_to_ulaw(pcm, rate, rate, self.passthrough) if pcm else b""
        if not ulaw:
            return None
        return json.dumps({"event": "media", "streamSid": self._stream_sid,
                           "media": {"payload": base64.b64encode(ulaw).decode()}})

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Twilio message, or None; never raises (a raise would end the
        call's receive loop, and with it the call)."""
        return await self.event_frame(data, "a Twilio event")   # Twilio sends only JSON text frames

    async def media_frame(self, message: dict) -> Frame | None:
        ulaw = self.media_payload(message.get("media"))
        if not ulaw:
            return None
        rate = self._params.twilio_sample_rate
        if not self.take_audio(len(ulaw) / rate):   # over MAX_AUDIO_AHEAD_S: ignored and counted
            return None
        return await self.caller_frame(await ulaw_to_pcm(ulaw, rate, rate, self.passthrough), rate)


class TwilioCarrier(Carrier):
    """Twilio's webhook, signatures, stream tokens, TwiML, Media Streams and REST API."""

    name = "twilio"
    title = "Twilio"
    webhook_path = "/twiml"
    webhook_methods = ("POST",)
    stream_path = "/ws"
    secret_env = ("TWILIO_AUTH_TOKEN",)
    signature_name = "X-Twilio-Signature"
    busy_xml, call_id_field = TWIML_BUSY, "CallSid"

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        super().__init__(public_url, env)
        self.auth_token = self.env.get("TWILIO_AUTH_TOKEN") or None
        self.account_sid = self.env.get("TWILIO_ACCOUNT_SID") or None
        self.api_url = self.env.get(API_URL_ENV) or None
        self.signatures = TwilioSignatures(self.auth_token, public_url)   # ValueError: a token, no public URL

    @property
    def auth_enabled(self) -> bool:
        return self.signatures.enabled

    def auth_warning(self) -> str:
        return ("TWILIO_AUTH_TOKEN is not set: requests are NOT verified as coming from Twilio; "
                "anyone who finds this server can place calls on it")

    def check_config(self) -> None:
        require_public_url(self.auth_token, self.public_url)

    def webhook_form(self, request: Request, body: bytes) -> dict[str, str]:
        """The form-encoded body (what Twilio signs), at most 200 fields."""
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200))

    async def verify_webhook(self, request: Request, body: bytes) -> bool:
        if not self.signatures.enabled:   # before parsing: an unsigned body is never read further
            return True
        return self.signatures.valid(request, request.url.path, self.webhook_form(request, body))

    def verify_upgrade(self, websocket: WebSocket) -> bool:
        return self.signatures.valid(websocket, self.stream_path)

    def answer(self, request: Request, form: dict[str, str], stream_url: str, token: str | None) -> Response:
        return xml_response(connect_twiml(stream_url, token))

    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """`connected` and `start` (pipecat's parse_telephony_websocket; its errors pass on)."""
        kind, data = await parse_telephony_websocket(websocket)
        if kind != "twilio":
            raise HandshakeError("not a Twilio start message")
        stream_sid = data.stream_id
        if not isinstance(stream_sid, str) or not stream_sid:
            raise HandshakeError("no streamSid")
        parameters = data.body if isinstance(data.body, dict) else {}
        return StreamStart(stream_id=stream_sid, call_id=data.call_id if isinstance(data.call_id, str) else "?",
                           parameters=parameters, encoding="PCMU", sample_rate=8000)

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> SafeTwilioSerializer:
        hang_up = bool(self.account_sid and self.auth_token)   # else the caller hangs up, or Twilio does on close
        return SafeTwilioSerializer(
            stream_sid=start.stream_id, call_sid=start.call_id,
            account_sid=self.account_sid if hang_up else None, auth_token=self.auth_token if hang_up else None,
            base_url=self.api_url if hang_up else None,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up), on_stop=on_stop)

    def rest(self):
        """Twilio's REST API for this account (`twilio_rest.TwilioREST`); NotSupported
        without TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN."""
        if not (self.account_sid and self.auth_token):
            raise NotSupported("Twilio: call control needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
        from .twilio_rest import TwilioREST   # the REST client only where call control is used

        return TwilioREST(self.account_sid, self.auth_token, base_url=self.api_url)

    async def hangup(self, start: StreamStart) -> None:
        await self.rest().hangup(start.call_id)

    async def transfer(self, start: StreamStart, number: str) -> None:
        await self.rest().transfer(start.call_id, number)

    async def place_call(self, to: str, from_: str, answer_url: str, status_url: str | None,
                         machine_detection: bool, amd_url: str | None = None) -> str:
        return await self.rest().place_call(to, from_, answer_url, status_url, machine_detection, amd_url=amd_url)


CARRIER = TwilioCarrier
