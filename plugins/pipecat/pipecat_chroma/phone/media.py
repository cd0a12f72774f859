"""What every carrier's media stream shares: the limits on inbound audio, the 8 -> 16 kHz
upsampler, and `SafeMedia`, the mixin that makes a Pipecat serializer safe for a phone
server (first base class, before Pipecat's serializer):

    class SafeTelnyxSerializer(SafeMedia, TelnyxFrameSerializer):
        carrier_title, known_events = "Telnyx", frozenset(TELNYX_EVENTS)
        async def deserialize(self, data):        # JSON events: media, stop, dtmf, the rest
            return await self.event_frame(data, "a Telnyx event")
        async def media_frame(self, message):
            ulaw = self.media_payload(message.get("media"))   # bad: None, already ignored and counted
            if not ulaw or not self.take_audio(len(ulaw) / 8000):
                return None                       # over budget: already ignored and counted
            return await self.caller_frame(pcm, 8000)   # resampled, tapped "caller"
        async def serialize(self, frame):
            pcm = await self.agent_pcm(frame, 8000)      # tapped "agent", resampled once
            ...
    serializer = SafeTelnyxSerializer(..., on_stop=end_call)

`SafeMedia` holds: `ignored` (Counter of dropped messages per kind), `_ignore(what, kind)`,
`on_stop` (call `stopped()` when the carrier says the call ended), `last_media`
(time.monotonic() of the last audio taken: the server's silence watchdog reads it),
`budget` / `take_audio(seconds)` (at most MAX_AUDIO_AHEAD_S ahead of real time), and
`audio_taps` (callables `tap(side, pcm16, rate)`, side "caller" or "agent", or INTERRUPT
with no audio when a barge-in cleared the carrier's buffer: recordings),
`hang_up_on_end` (the server sets it False after a transfer: a subclass's `serialize` hands
End/Cancel frames to `super().serialize`, which then hangs nothing up).
"""
from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from typing import Any, Callable, ClassVar

import numpy as np
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.frames.frames import (
    AudioRawFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterruptionFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup

from chroma_agent.serving.log_safety import carrier_id, printable

# Limits shared by every carrier: one packet is 20 ms in practice, anything far larger is
# not a carrier's media; a carrier streams in real time, never ahead
MAX_MEDIA_BYTES = 8000          # one packet's audio bytes: 1 s of 8 kHz mu-law
MAX_AUDIO_AHEAD_S = 2.0         # per call: inbound audio accepted ahead of real time
MAX_MEDIA_BASE64 = 4 * -(-MAX_MEDIA_BYTES // 3)   # MAX_MEDIA_BYTES as base64: checked before decoding

AudioTap = Callable[[str, bytes, int], None]
INTERRUPT = "interrupt"         # a tap's side for a barge-in: the agent's audio not yet played is dropped


class Upsampler2x:
    """Streaming 8 -> 16 kHz for phone audio: a 48-tap windowed-sinc FIR, 1.5 ms of delay.

    soxr's stream resamplers hold 20 ms packets back and hand audio on in 60-95 ms blocks
    (VHQ, pipecat's default: ~95 ms), which the VAD would see late at both ends of every
    turn; cubic interpolation ("QQ") has no delay but mirrors 3 kHz speech at 5 kHz (-11 dB).
    Here: flat to 3.4 kHz (the phone band), -53 dB at 4.7 kHz, below -70 dB from 5 kHz."""

    TAPS = 48

    def __init__(self):
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        h = np.sinc(n / 2) * np.kaiser(self.TAPS, 7.0)
        h *= 2 / h.sum()                                   # unity gain once zeros are stuffed in
        self._phases = h[0::2], h[1::2]                    # even and odd output samples
        self._history = np.zeros(self.TAPS // 2 - 1)

    def __call__(self, pcm: bytes) -> bytes:
        x = np.concatenate([self._history, np.frombuffer(pcm, np.int16)])
        self._history = x[len(x) - len(self._history):]
        out = np.empty(2 * (len(x) - len(self._history)))
        out[0::2] = np.convolve(x, self._phases[0], mode="valid")
        out[1::2] = np.convolve(x, self._phases[1], mode="valid")
        return np.clip(np.round(out), -32768, 32767).astype(np.int16).tobytes()


class AudioBudget:
    """Inbound audio may run at most `ahead_s` ahead of the wall-clock time since the stream
    started, so no call buffers unbounded audio. Carriers stream in real time, never ahead
    (audio held up by the network, or while the call's pipeline starts, comes late and in
    a burst: that is allowed, since it is not ahead)."""

    def __init__(self, ahead_s: float):
        self.ahead_s = ahead_s
        self.started = time.monotonic()
        self.taken_s = 0.0

    def take(self, seconds: float) -> bool:
        """Take `seconds` of audio: False (nothing taken) when that would run ahead."""
        if self.taken_s + seconds > time.monotonic() - self.started + self.ahead_s:
            return False
        self.taken_s += seconds
        return True


class SafeMedia:
    """Mixin for a carrier's Pipecat serializer (the first base class): bad messages dropped
    and counted, never raised (a raise ends the call's receive loop, and the call), inbound
    audio bounded, audio tapped for recordings, the carrier's end of the call reported.

    Subclasses set `carrier_title` (in log lines) and, a JSON carrier, `known_events`, and
    call, from `deserialize`: `event_frame(data, what)` (which reads the message with
    `json_event`, hands "media" to their `media_frame(message)`, and handles "stop" and
    "dtmf"), `media_payload(media)` for a message's base64 audio (bounded), `dtmf_frame`,
    `_ignore(what)` for a message they cannot use (returns None, to return at once),
    `take_audio(seconds)` before they decode audio, `caller_frame(pcm, rate)` to make the
    pipeline's frame, `stopped()` when the carrier says the call ended; from `serialize`:
    `agent_pcm(frame, rate)` for the audio to send."""

    carrier_title: ClassVar[str] = "carrier"
    known_events: ClassVar[frozenset[str]] = frozenset()   # a JSON carrier's events (`event_frame`)

    def __init__(self, *args, on_stop: Callable[[], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_stop = on_stop
        self.ignored: Counter[str] = Counter()
        self.last_media = time.monotonic()   # the last audio taken: a line silent too long is ended
        self.budget = AudioBudget(MAX_AUDIO_AHEAD_S)
        self.audio_taps: list[AudioTap] = []
        self.hang_up_on_end = True           # False after a transfer (see serialize)
        self.in_rate = 0                     # the pipeline's input rate, from setup()
        self.call_id = "?"                   # the call's own id (CallRecord.id), for log lines
        # for pipecat's codec helpers at one rate (ulaw_to_pcm(data, r, r, self.passthrough)): no resampling
        self.passthrough = SOXRStreamAudioResampler()
        self._upsample = Upsampler2x()
        self._in_resampler = SOXRStreamAudioResampler()
        params = getattr(self, "_params", None)
        # outbound: soxr "MQ", 14 ms of delay on 80 ms frames, flat to 3.7 kHz (pipecat's VHQ
        # emits nothing until a reply's second 80 ms frame exists)
        self._out_resampler = SOXRStreamAudioResampler(
            quality="MQ", clear_after_secs=getattr(params, "resampler_clear_after_secs", 0.2))

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self.in_rate = getattr(self._params, "sample_rate", None) or setup.audio_in_sample_rate

    async def serialize(self, frame: Frame) -> str | bytes | None:
        """Pipecat's serializer, except that with `hang_up_on_end` False (after a transfer:
        the carrier handed the caller on) the pipeline's end hangs nothing up; a barge-in
        (InterruptionFrame: the carrier's clear message) is tapped as side INTERRUPT."""
        if not self.hang_up_on_end and isinstance(frame, (EndFrame, CancelFrame)):
            return None
        if isinstance(frame, InterruptionFrame) and self.audio_taps:   # a barge-in: the carrier drops its buffer
            self.tap(INTERRUPT, b"", 0)
        return await super().serialize(frame)

    def stream_label(self) -> str:
        """The carrier's stream id (in log lines only when the operator asked: `log_label`)."""
        return str(getattr(self, "_stream_sid", None) or getattr(self, "_stream_id", None) or "?")

    def log_label(self) -> str:
        """The stream in a log line: its call's own id (`call_id`, set by the server), and the
        carrier's stream id only when the operator asked (`log_safety.carrier_ids_logged`)."""
        sid = carrier_id(self.stream_label())
        return self.call_id if sid is None else f"{self.call_id} ({sid})"

    def _ignore(self, what: str, kind: str | None = None) -> None:
        """Drop a message: logged the first time per kind of fault (the kinds are a fixed
        set, whatever the caller sends: `what` must not hold the client's text beyond a
        short, escaped excerpt), counted always."""
        kind = kind or what
        self.ignored[kind] += 1
        if self.ignored[kind] == 1:
            logger.warning(f"call {self.log_label()}: ignoring a message from {self.carrier_title} "
                           f"({printable(what)}); later ones are counted")
        return None

    async def event_frame(self, data: str | bytes, what: str) -> Frame | None:
        """The frame of one JSON carrier message (a carrier's `deserialize`; `what` names its
        kind of message, "a Twilio event"): "media" -> `media_frame(message)`, "stop" ->
        `stopped()`, "dtmf" -> `dtmf_frame`; any other of `known_events` gives nothing, an
        unknown event is ignored. Never raises."""
        parsed = self.json_event(data, what)
        if parsed is None:
            return None
        event, message = parsed
        if event == "media":
            return await self.media_frame(message)
        if event == "stop":
            self.stopped()
            return None
        if event == "dtmf":
            return self.dtmf_frame(message.get("dtmf"))
        if event not in self.known_events:
            return self._ignore(f"unknown event {printable(event, 40)!r}", kind="unknown event")
        return None   # e.g. connected, start (the handshake is over), mark: nothing for the pipeline

    async def media_frame(self, message: dict) -> Frame | None:
        """The pipeline's frame of a "media" message (`event_frame`), or None."""
        raise NotImplementedError

    def dtmf_frame(self, dtmf: Any) -> InputDTMFFrame | None:
        """The keypad frame of a {"digit": ...} object, or None (ignored)."""
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        try:
            return InputDTMFFrame(KeypadEntry(digit))
        except (ValueError, TypeError):
            return self._ignore("dtmf without a keypad digit")

    def json_event(self, data: str | bytes, what: str) -> tuple[str, dict] | None:
        """(event, message) of a JSON text message with a string "event", or None (ignored
        and counted): binary, not JSON, not an object with a string "event" (`what` names
        the carrier's kind of message, "a Twilio event")."""
        if not isinstance(data, str):
            return self._ignore("binary frame")
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):   # not JSON, truncated, or nested past Python's limit
            return self._ignore("not JSON")
        event = message.get("event") if isinstance(message, dict) else None
        if not isinstance(event, str):
            return self._ignore(f"not {what} (a JSON object with a string 'event')")
        return event, message

    def media_payload(self, media: Any) -> bytes | None:
        """The audio bytes of a JSON media message's `media` object (its base64 `payload`), or
        None when unusable (ignored and counted): not a string, over MAX_MEDIA_BYTES (checked
        before decoding), not base64."""
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return self._ignore("media without a payload string")
        too_big = f"media payload over {MAX_MEDIA_BYTES} bytes"
        if len(payload) > MAX_MEDIA_BASE64:
            return self._ignore(too_big)
        try:
            audio = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            return self._ignore("media payload that is not base64")
        return self._ignore(too_big) if len(audio) > MAX_MEDIA_BYTES else audio

    def take_audio(self, seconds: float) -> bool:
        """Take `seconds` of inbound audio: True (and `last_media` now), or False when it runs
        over MAX_AUDIO_AHEAD_S ahead of real time (already ignored and counted)."""
        if not self.budget.take(seconds):
            self._ignore(f"audio arriving faster than real time (over {MAX_AUDIO_AHEAD_S:g} s ahead)")
            return False
        self.last_media = time.monotonic()
        return True

    def stopped(self) -> None:
        """The carrier says the call ended: `on_stop`, when set."""
        if self.on_stop is not None:
            self.on_stop()

    def tap(self, side: str, pcm: bytes, rate: int) -> None:
        """Hand 16-bit PCM of `side` ("caller", "agent") to each of `audio_taps`; a tap that
        raises is logged and removed (a recording's fault never ends the call)."""
        for tap in list(self.audio_taps):
            try:
                tap(side, pcm, rate)
            except Exception:
                logger.exception(f"call {self.log_label()}: an audio tap failed; it is removed")
                self.audio_taps.remove(tap)

    async def caller_frame(self, pcm: bytes, rate: int) -> InputAudioRawFrame | None:
        """The pipeline's frame of the caller's 16-bit PCM at `rate`: at twice the rate
        through `Upsampler2x`, at the same rate as is, else soxr; tapped "caller" as the
        pipeline hears it."""
        if not pcm:
            return None
        target = self.in_rate or rate
        if target == 2 * rate:
            pcm = self._upsample(pcm)
        elif target != rate:
            pcm = await self._in_resampler.resample(pcm, rate, target)
        if not pcm:
            return None
        if self.audio_taps:
            self.tap("caller", pcm, target)
        return InputAudioRawFrame(audio=pcm, sample_rate=target, num_channels=1)

    async def agent_pcm(self, frame: AudioRawFrame, rate: int) -> bytes:
        """The agent's audio of `frame` as 16-bit PCM at the carrier's `rate`, resampled
        once here (give the output transport the service's own rate and 80 ms chunks);
        tapped "agent" before, at the frame's rate, as it is sent."""
        if self.audio_taps and frame.audio:
            self.tap("agent", frame.audio, frame.sample_rate)
        return await self._out_resampler.resample(frame.audio, frame.sample_rate, rate)
