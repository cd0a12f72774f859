"""Plivo: the application's answer URL returns Plivo XML `<Stream>`, the audio stream speaks
Plivo's JSON protocol through Pipecat's `PlivoFrameSerializer`.

- Answer (`POST /plivo/answer`): `<Stream bidirectional="true" keepCallAlive="true"
  contentType="audio/x-mulaw;rate=8000">wss://HOST/ws</Stream>` (Plivo assumes 8 kHz L16
  without the contentType; the serializer speaks 8 kHz mu-law both ways), the stream token
  in `extraHeaders` (which allows only letters and digits: the token's dots are sent as
  "x", which its hex never holds); busy: `<Hangup reason="busy"/>`.
- Authentication (PLIVO_AUTH_TOKEN; the public URL is then required, since Plivo signs the
  URL it calls): every webhook must carry `X-Plivo-Signature-V3` (or `-Ma-V3`) with
  `X-Plivo-Signature-V3-Nonce`: base64 HMAC-SHA256 with the auth token over the URL (query
  sorted; for POST then "." and the sorted form fields as key+value, see `signature_base`),
  "." and the nonce, as Plivo's SDKs compute it. The stream is admitted by the single-use
  token of the signed webhook's answer.
- Hang-up (PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN): `DELETE /v1/Account/{auth_id}/Call/{uuid}/`.
  Transfer needs an XML URL of its own on Plivo (no direct API): not supported.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Callable, Mapping
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import escape, quoteattr

from fastapi import Request, WebSocket
from fastapi.responses import Response
from pipecat.audio.utils import pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import AudioRawFrame, Frame
from pipecat.serializers.plivo import PlivoFrameSerializer


from ..twilio_stream_token import TOKEN_PARAMETER
from .carrier import Carrier, StreamStart, xml_response
from .media import SafeMedia
from .telnyx import api_request, read_start, string_parameters

RATE = 8000
TOKEN_HEADER = "chromastreamtoken"      # extraHeaders: letters and digits only
PLIVO_EVENTS = {"start", "media", "dtmf", "playedStream", "clearedAudio", "stop"}
STREAM_ATTRIBUTES = 'bidirectional="true" keepCallAlive="true" contentType="audio/x-mulaw;rate=8000"'
PLIVO_BUSY = '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup reason="busy"/></Response>'


def signature_base(method: str, url: str, params: Mapping[str, str]) -> str:
    """The URL Plivo's V3 signature covers, as Plivo's SDKs build it: the URL without its
    query, then "?" and the query's pairs sorted ("k=v&..."); for a POST with fields, "?"
    even without a query, a "." after a query, and the fields sorted as "kv" with no
    separator. (GET: `params` are the query's, merged with the URL's.)"""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    query = {k: list(v) for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    fields = dict(params)
    if method.upper() == "GET":
        for k, v in fields.items():
            query[k] = [v]
        fields = {}

    def pairs(mapping, joiner):
        return [f"{k}{joiner}{v}" for k in sorted(mapping)
                for v in sorted(mapping[k] if isinstance(mapping[k], list) else [mapping[k]])]

    query_string = "&".join(pairs(query, "="))
    if query_string or fields:
        base += "?" + query_string
    if query_string and fields:
        base += "."
    return base + "".join(pairs(fields, ""))


def v3_signature(auth_token: str, method: str, url: str, nonce: str, params: Mapping[str, str]) -> str:
    """X-Plivo-Signature-V3 of a request (base64 HMAC-SHA256 over "{signature_base}.{nonce}";
    Plivo's SDKs read the base's UTF-8 bytes back as Latin-1 before encoding it again, and
    so does this, so non-ASCII fields sign alike)."""
    base = signature_base(method, url, params).encode("utf-8").decode("latin-1")
    payload = f"{base}.{nonce.encode('utf-8').decode('latin-1')}".encode("utf-8")
    return base64.b64encode(hmac.new(auth_token.encode("utf-8"), payload, hashlib.sha256).digest()).decode()


def encode_token(token: str) -> str:
    """The stream token as extraHeaders allows it (its dots as "x")."""
    return token.replace(".", "x")


def decode_token(value: str) -> str:
    return value.replace("x", ".")


def extra_headers(raw: object) -> dict[str, str]:
    """A start message's `extra_headers` ("k=v,k=v" or "k=v;k=v", or an object) as pairs."""
    if isinstance(raw, str):
        pairs = (item.split("=", 1) for item in raw.replace(";", ",").split(",")[:20] if "=" in item)
        raw = {k.strip(): v.strip() for k, v in pairs}
    return string_parameters(raw)


class SafePlivoSerializer(SafeMedia, PlivoFrameSerializer):
    """`PlivoFrameSerializer` that never raises on a bad message (dropped, counted in
    `ignored`, logged once per kind), bounds inbound audio, ends on Plivo's `stop`, taps audio
    both ways and resamples once (SafeMedia). Barge-in: Pipecat's `clearAudio`."""

    carrier_title = "Plivo"
    known_events = frozenset(PLIVO_EVENTS)

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)   # clearAudio on InterruptionFrame, messages
        pcm = await self.agent_pcm(frame, RATE)
        audio = await pcm_to_ulaw(pcm, RATE, RATE, self._out_resampler) if pcm else b""   # encoded only
        if not audio:
            return None
        return json.dumps({"event": "playAudio", "streamId": self._stream_id,
                           "media": {"contentType": "audio/x-mulaw", "sampleRate": RATE,
                                     "payload": base64.b64encode(audio).decode()}})

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Plivo message, or None; never raises (a raise ends the call)."""
        return await self.event_frame(data, "a Plivo event")   # start, playedStream, clearedAudio: nothing

    async def media_frame(self, message: dict) -> Frame | None:
        audio = self.media_payload(message.get("media"))
        if not audio or not self.take_audio(len(audio) / RATE):
            return None
        return await self.caller_frame(await ulaw_to_pcm(audio, RATE, RATE, self._in_resampler), RATE)


class PlivoCarrier(Carrier):
    """Plivo XML + audio streaming (see the module's docstring); `api_base`: the REST API's
    origin."""

    name = "plivo"
    title = "Plivo"
    webhook_path = "/plivo/answer"
    webhook_methods = ("POST", "GET")
    secret_env = ("PLIVO_AUTH_TOKEN",)
    signature_name = "X-Plivo-Signature-V3"
    busy_xml, call_id_field = PLIVO_BUSY, "CallUUID"
    api_base = "https://api.plivo.com"

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        super().__init__(public_url, env)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.env.get("PLIVO_AUTH_TOKEN"))

    def check_config(self) -> None:
        if not self.auth_enabled:
            return
        parts = urlsplit(self.public_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("PLIVO_AUTH_TOKEN is set but no public URL is given: start with --public-url "
                             "https://YOUR-PUBLIC-HOST (the URL Plivo calls; its signatures are checked against it, "
                             "never against a request's Host header)")

    def signed_url(self, request: Request) -> str:
        """The URL Plivo called: the public URL's origin and path prefix, the request's path
        and query (never its Host header)."""
        public = urlsplit(self.public_url or "")
        query = request.url.query
        return f"{public.scheme}://{public.netloc}{public.path.rstrip('/')}{request.url.path}" + (
            f"?{query}" if query else "")

    async def verify_webhook(self, request: Request, body: bytes) -> bool:
        """X-Plivo-Signature-V3 (or -Ma-V3, each possibly a comma-separated list) for this
        request's URL, nonce and form."""
        token = self.env.get("PLIVO_AUTH_TOKEN")
        if not token:
            return True
        nonce = request.headers.get("x-plivo-signature-v3-nonce", "")
        given = ",".join(request.headers.get(h, "") for h in ("x-plivo-signature-v3", "x-plivo-signature-ma-v3"))
        if not nonce or len(nonce) > 200 or not given.strip(","):
            return False
        params = {}
        if request.method == "POST":
            parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200)
            params = {k: v[0] for k, v in parsed.items()}
        expected = v3_signature(token, request.method, self.signed_url(request), nonce, params)
        return any(hmac.compare_digest(expected, s.strip()) for s in given.split(",") if s.strip())

    def answer(self, request: Request, form: dict[str, str], stream_url: str, token: str | None) -> Response:
        headers = "" if token is None else f" extraHeaders={quoteattr(f'{TOKEN_HEADER}={encode_token(token)}')}"
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Stream {STREAM_ATTRIBUTES}{headers}>'
               f"{escape(stream_url)}</Stream></Response>")
        return xml_response(xml)

    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """Plivo's `start` (and the first `media`, which Pipecat's parser reads too): stream
        and call ids, the token of `extra_headers`."""
        data, raw = await read_start(websocket, "plivo", self.title)
        headers = extra_headers(raw["message"].get("extra_headers"))
        parameters = {k: v for k, v in headers.items() if k != TOKEN_HEADER}
        if TOKEN_HEADER in headers:
            parameters[TOKEN_PARAMETER] = decode_token(headers[TOKEN_HEADER])
        return StreamStart(stream_id=data.stream_id, call_id=data.call_id, encoding="PCMU", sample_rate=RATE,
                           parameters=parameters)

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> SafePlivoSerializer:
        # no auto hang-up: the server ends calls (`hangup`); a closed stream ends the XML
        return SafePlivoSerializer(start.stream_id, call_id=start.call_id,
                                   params=PlivoFrameSerializer.InputParams(auto_hang_up=False), on_stop=on_stop)

    async def hangup(self, start: StreamStart) -> None:
        """`DELETE .../Call/{uuid}/` (PLIVO_AUTH_ID, PLIVO_AUTH_TOKEN); without them:
        NotSupported. A call already over (404) is not an error."""
        auth_id, token = self.env.get("PLIVO_AUTH_ID"), self.env.get("PLIVO_AUTH_TOKEN")
        if not (auth_id and token):
            return await super().hangup(start)
        url = f"{self.api_base}/v1/Account/{quote(auth_id, safe='')}/Call/{quote(start.call_id, safe='')}/"
        await api_request(self.title, "DELETE", url, basic_auth=(auth_id, token), ok=(200, 204, 404))


CARRIER = PlivoCarrier
