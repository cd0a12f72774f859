"""Exotel: no answer webhook: the call flow's Voicebot applet (Exotel dashboard, App Bazaar)
is pointed at this server's stream URL, `wss://HOST/ws`, and the stream speaks Exotel's JSON
protocol (`connected`, `start`, `media`, `dtmf`, `mark`, `stop`; `media`/`mark`/`clear` back)
through Pipecat's `ExotelFrameSerializer`: 16-bit little-endian PCM ("raw/slin") at 8 kHz,
or 16 / 24 kHz when the applet's URL asks for it (`?sample-rate=16000`), base64 in JSON.

Exotel signs nothing. What it offers, and what this carrier checks when
EXOTEL_STREAM_AUTH="KEY:SECRET" is set: Basic credentials in the applet's URL
(`wss://KEY:SECRET@HOST/ws`), which Exotel sends as `Authorization: Basic ...` on the upgrade
(else 403); or the carrier's IP allow-list, set up by Exotel, in front of this server.

Exotel plays what it gets in chunks of whole 20 ms (multiples of 320 bytes at 8 kHz): the
serializer sends each reply frame cut to that, the remainder carried to the next frame and
dropped at a barge-in. There is no REST call to hang up or transfer a Voicebot call: closing
the stream hands the call to the flow's next applet (NotSupported, the server closes).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from typing import Callable, Mapping

from fastapi import WebSocket
from pipecat.frames.frames import AudioRawFrame, Frame, InterruptionFrame
from pipecat.serializers.exotel import ExotelFrameSerializer


from .carrier import Carrier, HandshakeError, StreamStart
from .media import SafeMedia
from .telnyx import read_start, string_parameters

RATES = (8000, 16000, 24000)            # the applet URL's ?sample-rate=
EXOTEL_EVENTS = {"connected", "start", "media", "dtmf", "mark", "clear", "stop"}
COMPANDED = ("ulaw", "mulaw", "pcmu", "alaw", "pcma")   # not what Pipecat's serializer speaks (PCM)


class SafeExotelSerializer(SafeMedia, ExotelFrameSerializer):
    """`ExotelFrameSerializer` that never raises on a bad message (dropped, counted in
    `ignored`, logged once per kind), bounds inbound audio, ends on Exotel's `stop`, taps audio
    both ways, resamples once (SafeMedia), and sends whole 20 ms. Barge-in: Pipecat's
    `{"event": "clear", "stream_sid"}`."""

    carrier_title = "Exotel"
    known_events = frozenset(EXOTEL_EVENTS)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rate = self._params.exotel_sample_rate
        self._packet = 2 * self._rate // 50        # 20 ms of 16-bit PCM
        self._pending = b""

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, InterruptionFrame):
            self._pending = b""                    # the rest of the interrupted reply
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)
        pcm = self._pending + await self.agent_pcm(frame, self._rate)
        whole = len(pcm) - len(pcm) % self._packet
        self._pending = pcm[whole:]
        if not whole:
            return None
        return json.dumps({"event": "media", "stream_sid": self._stream_sid,
                           "media": {"payload": base64.b64encode(pcm[:whole]).decode()}})

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Exotel message, or None; never raises (a raise ends the call)."""
        return await self.event_frame(data, "an Exotel event")   # connected, start, mark, clear: nothing

    async def media_frame(self, message: dict) -> Frame | None:
        audio = self.media_payload(message.get("media"))
        if audio and len(audio) % 2:
            return self._ignore("media of an odd number of bytes (not 16-bit PCM)")
        if not audio or not self.take_audio(len(audio) / 2 / self._rate):
            return None
        return await self.caller_frame(audio, self._rate)


class ExotelCarrier(Carrier):
    """Exotel's Voicebot applet stream (see the module's docstring)."""

    name = "exotel"
    title = "Exotel"
    webhook_path = None
    secret_env = ("EXOTEL_STREAM_AUTH",)
    signature_name = "Authorization: Basic (EXOTEL_STREAM_AUTH)"
    stream_tokens = False                   # no answer document to pass one

    def __init__(self, public_url: str | None = None, env: Mapping[str, str] = os.environ):
        super().__init__(public_url, env)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.env.get("EXOTEL_STREAM_AUTH"))

    def auth_warning(self) -> str:
        return ("EXOTEL_STREAM_AUTH is not set: streams are NOT checked as coming from Exotel (Exotel signs "
                "nothing: set EXOTEL_STREAM_AUTH=KEY:SECRET and put wss://KEY:SECRET@HOST/ws in the Voicebot "
                "applet, or have Exotel's IP ranges allowed in front of this server)")

    def check_config(self) -> None:
        credentials = self.env.get("EXOTEL_STREAM_AUTH", "")
        if credentials and (":" not in credentials or not credentials.split(":", 1)[0]):
            raise ValueError("EXOTEL_STREAM_AUTH must be KEY:SECRET, the credentials of the Voicebot applet's "
                             "URL (wss://KEY:SECRET@HOST/ws)")

    def verify_upgrade(self, websocket: WebSocket) -> bool:
        """`Authorization: Basic` with EXOTEL_STREAM_AUTH's KEY:SECRET (when set)."""
        credentials = self.env.get("EXOTEL_STREAM_AUTH")
        if not credentials:
            return True
        scheme, _, value = websocket.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (ValueError, binascii.Error):
            return False
        return scheme.lower() == "basic" and hmac.compare_digest(given, credentials.encode("utf-8"))

    async def handshake(self, websocket: WebSocket) -> StreamStart:
        """Exotel's `connected` and `start`: stream and call ids, the applet's custom
        parameters, the audio's rate (8 or 16 kHz PCM)."""
        data, raw = await read_start(websocket, "exotel", self.title)
        media_format = raw["start"].get("media_format")
        media_format = media_format if isinstance(media_format, dict) else {}
        encoding = str(media_format.get("encoding", "raw/slin")).lower()
        rate = str(media_format.get("sample_rate", 8000))
        if any(c in encoding for c in COMPANDED) or rate not in {str(r) for r in RATES}:
            raise HandshakeError("an Exotel stream not in 16-bit PCM at 8, 16 or 24 kHz (set the applet's "
                                 "media format to PCM)")
        return StreamStart(stream_id=data.stream_id, call_id=data.call_id, encoding="L16", sample_rate=int(rate),
                           parameters=string_parameters(raw["start"].get("custom_parameters")))

    def serializer(self, start: StreamStart, on_stop: Callable[[], None]) -> SafeExotelSerializer:
        params = ExotelFrameSerializer.InputParams(exotel_sample_rate=start.sample_rate)
        return SafeExotelSerializer(start.stream_id, call_sid=start.call_id, params=params, on_stop=on_stop)


CARRIER = ExotelCarrier
