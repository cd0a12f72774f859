"""A Twilio phone number that answers in the cloned voice: FastAPI + uvicorn, one Pipecat
pipeline per call.

    from pipecat_chroma.twilio_server import serve
    serve(model=model, voice=voice, port=8765, public_url="https://abc.ngrok.app")   # blocks

`serve` runs one `ChromaEngine` over the model: every call's conversation is a slot of it,
and its capacity is the default call limit.

Routes:
- `POST /twiml`: Twilio's voice webhook (its body capped at 16 KiB: 413). Answers
  `<Connect><Stream url="wss://HOST/ws">` (with a stream token as a `<Parameter>` when
  signatures are on), or `<Reject reason="busy"/>` when `max_calls` calls are running or
  the server drains.
- `WS /ws`: Twilio Media Streams. Per call: the Twilio serializer (8 kHz mu-law), the user
  aggregator with Silero VAD and Smart Turn v3, `ChromaSpeechToSpeechService`, the output,
  the assistant aggregator. Over capacity or draining: HTTP 503 at the upgrade. No `start`
  within 10 s, or no audio for 10 s after it (CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S): ended.
- `GET /health`: the schema of every server (`chroma_agent.serving.call_server`:
  `{"status", "active_calls", "max_calls", "calls_total", "engine": {"load", "capacity",
  "conversations", "frame_ms"}}`; `frame_ms`: the last 30 s of engine ticks, p50/p95, a
  p95 over 80 ms is replies behind real time) plus `"signatures"`; 503 with status
  "draining" after SIGTERM.
- `GET /metrics`: aggregate numbers; with `Authorization: Bearer $CHROMA_AGENT_ADMIN_KEY`
  also the running and the last finished calls (their sids, per-turn timestamps), for
  dashboards and `benchmarks/bench_call.py` (`PhoneServer.metrics`).

With `TWILIO_AUTH_TOKEN` set, `public_url` is required, `/twiml` and the websocket upgrade
need a valid `X-Twilio-Signature` for it (else 403), and a stream's `start` must carry the
single-use token of its call that the webhook's TwiML named (else closed: 1008;
`twilio_stream_token`). With `TWILIO_ACCOUNT_SID` too, a call the server ends is hung up
through Twilio's REST API.

Limits (MAX_* below) and SIGTERM drain (`run_app`): README, "Running in production".
`serve` is `chroma-agent serve twilio` (entry point `chroma_agent.servers`: `twilio`);
`check_serve_args` runs before the model loads.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketState
import numpy as np
from loguru import logger
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.audio.utils import pcm_to_ulaw, ulaw_to_pcm
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    AudioRawFrame,
    BotStartedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner
from twilio.request_validator import RequestValidator

from chroma_agent.serving.call_server import CallServer, engine_over
from chroma_agent.serving.body_limit import BodyLimit
from chroma_agent.serving.log_safety import printable
from chroma_agent.serving.runner import DEFAULT_DRAIN_S, END_TIMEOUT_S

from .call_pipeline import chroma_service, turn_detection, voice_pipeline
from .call_transcript import CallTranscripts, TranscriptRecorder, prepare_transcripts_dir
from .service import ChromaSpeechToSpeechService
from .twilio_guards import MAX_WEBHOOK_BYTES, AdminKey, Refusals, end_when_silent, require_public_url
from .twilio_guards import media_timeout_s as default_media_timeout_s
from .twilio_stream_token import TOKEN_PARAMETER, StreamTokens, connect_twiml

# Phone audio (8 kHz mu-law): 0.1 s of speech starts a turn and a lower volume floor lets a
# quiet line through, so a one-word barge-in ("Wait.") is caught; pipecat's defaults (0.2 s,
# volume 0.6) missed 3-6 of 16 test phrases. 0.2 s of silence hands the turn to Smart Turn,
# as by default. Measured: `benchmarks/bench_call.py --vad-sweep` (benchmarks/README.md).
PHONE_VAD = VADParams(confidence=0.7, start_secs=0.1, stop_secs=0.2, min_volume=0.3)
# Limits (README "Running in production"). Twilio's messages are ~400 bytes of JSON with
# 20 ms of audio: anything far larger is not Twilio.
MAX_MESSAGE_BYTES = 64 * 1024                 # one websocket message; past it uvicorn closes with 1009
MAX_MEDIA_BYTES = 8000                        # one media payload: 1 s of 8 kHz mu-law
MAX_MEDIA_BASE64 = 4 * -(-MAX_MEDIA_BYTES // 3)
MAX_AUDIO_AHEAD_S = 2.0                       # per call: inbound audio accepted ahead of real time
FINISHED_CALLS_KEPT = 50     # in /metrics
TWILIO_EVENTS = {"connected", "start", "media", "dtmf", "mark", "stop"}

TWIML_BUSY = '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy"/></Response>'


# -- signatures --------------------------------------------------------------------------

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
        websocket = route == "/ws"
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


def stream_url(request: Request, public_url: str | None) -> str:
    """The `<Stream url>` of the TwiML: wss on the public host (ws only for an explicit
    http:// public URL, for local tests)."""
    if public_url:
        public = urlsplit(public_url)
        scheme = "ws" if public.scheme == "http" else "wss"
        return f"{scheme}://{public.netloc}{public.path.rstrip('/')}/ws"
    return f"wss://{request.headers.get('host', request.url.netloc)}/ws"


# -- the serializer -----------------------------------------------------------------------

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


class SafeTwilioSerializer(TwilioFrameSerializer):
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
      rates: pipecat's resampler).
    - Outbound audio is resampled to 8 kHz here with soxr "MQ" (14 ms of delay on 80 ms
      frames, flat to 3.7 kHz): give the output transport the service's own rate and 80 ms
      chunks (see PhoneServer), since pipecat's VHQ stream resampler in the output
      transport emits nothing until a reply's second 80 ms frame exists."""

    def __init__(self, *args, on_stop: Callable[[], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_stop = on_stop
        self.ignored: Counter[str] = Counter()
        self._upsample = Upsampler2x()
        self._passthrough = SOXRStreamAudioResampler()    # 8 -> 8 kHz: ulaw_to_pcm only decodes
        self._out_resampler = SOXRStreamAudioResampler(quality="MQ",
                                                       clear_after_secs=self._params.resampler_clear_after_secs)
        self._in_rate = 0
        self._inbound = AudioBudget(MAX_AUDIO_AHEAD_S)
        self.last_media = time.monotonic()   # the last audio taken: a line silent too long is ended

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._in_rate = self._params.sample_rate or setup.audio_in_sample_rate

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if not isinstance(frame, AudioRawFrame):
            return await super().serialize(frame)  # clear (InterruptionFrame), hang-up on End/Cancel
        rate = self._params.twilio_sample_rate
        ulaw = await pcm_to_ulaw(frame.audio, frame.sample_rate, rate, self._out_resampler)
        if not ulaw:
            return None
        return json.dumps({"event": "media", "streamSid": self._stream_sid,
                           "media": {"payload": base64.b64encode(ulaw).decode()}})

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """A frame of one Twilio message, or None; never raises (a raise would end the
        call's receive loop, and with it the call)."""
        if not isinstance(data, str):   # Twilio sends only text frames
            return self._ignore("binary frame")
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):   # not JSON, truncated, or nested past Python's limit
            return self._ignore("not JSON")
        event = message.get("event") if isinstance(message, dict) else None
        if not isinstance(event, str):
            return self._ignore("not a Twilio event (a JSON object with a string 'event')")
        if event == "media":
            return await self._media(message.get("media"))
        if event == "stop":
            if self.on_stop is not None:
                self.on_stop()
            return None
        if event == "dtmf":
            dtmf = message.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            try:
                return InputDTMFFrame(KeypadEntry(digit))
            except (ValueError, TypeError):
                return self._ignore("dtmf without a keypad digit")
        if event not in TWILIO_EVENTS:
            return self._ignore(f"unknown event {event[:40]!r}", kind="unknown event")
        return None   # connected, start (the handshake is over), mark: nothing for the pipeline

    async def _media(self, media: Any) -> Frame | None:
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            return self._ignore("media without a payload string")
        too_big = f"media payload over {MAX_MEDIA_BYTES} bytes"
        if len(payload) > MAX_MEDIA_BASE64:   # before decoding it
            return self._ignore(too_big)
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            return self._ignore("media payload that is not base64")
        if len(ulaw) > MAX_MEDIA_BYTES:
            return self._ignore(too_big)
        if not ulaw:
            return None
        rate = self._params.twilio_sample_rate
        if not self._inbound.take(len(ulaw) / rate):
            return self._ignore(f"audio arriving faster than real time (over {MAX_AUDIO_AHEAD_S:g} s ahead)")
        self.last_media = time.monotonic()
        if self._in_rate == 2 * rate:
            pcm = self._upsample(await ulaw_to_pcm(ulaw, rate, rate, self._passthrough))
        else:
            pcm = await ulaw_to_pcm(ulaw, rate, self._in_rate, self._input_resampler)
        return InputAudioRawFrame(audio=pcm, sample_rate=self._in_rate, num_channels=1) if pcm else None

    def _ignore(self, what: str, kind: str | None = None) -> None:
        """Drop a message: logged the first time per kind of fault (the kinds are a fixed
        set, whatever the caller sends), counted always."""
        kind = kind or what
        self.ignored[kind] += 1
        if self.ignored[kind] == 1:
            logger.warning(f"stream {printable(self._stream_sid)}: ignoring a Twilio message ({what}); "
                           "later ones are counted")
        return None


class AudioBudget:
    """Inbound audio may run at most `ahead_s` ahead of the wall-clock time since the stream
    started, so no call buffers unbounded audio. Twilio streams in real time, never ahead
    (audio held up by the network, or while the call's pipeline starts, comes late and in
    a burst: that is allowed, since it is not ahead)."""

    def __init__(self, ahead_s: float):
        self.ahead_s = ahead_s
        self.started = time.monotonic()
        self.taken_s = 0.0

    def take(self, seconds: float) -> bool:
        if self.taken_s + seconds > time.monotonic() - self.started + self.ahead_s:
            return False
        self.taken_s += seconds
        return True


# -- per-call records ---------------------------------------------------------------------

@dataclass
class Turn:
    """One caller turn and the reply to it; times are wall-clock seconds (time.time()).

    started: the user turn began; speech_end: when the caller stopped talking, by the VAD
    (its decision minus stop_secs); vad_stop: the VAD's decision; turn_end: the end of the
    user turn (after Smart Turn); first_audio: the service's first reply audio; audio_out:
    the output transport's first write of it to the socket (BotStartedSpeakingFrame);
    model_ttfb_s: the service's TTFB metric (turn end -> first audio pushed)."""

    started: float
    speech_end: float | None = None
    vad_stop: float | None = None
    turn_end: float | None = None
    first_audio: float | None = None
    audio_out: float | None = None
    model_ttfb_s: float | None = None

    @property
    def time_to_first_audio_s(self) -> float | None:
        """End of the user turn -> first reply audio written to the caller."""
        if self.turn_end is None or self.audio_out is None:
            return None
        return self.audio_out - self.turn_end


@dataclass
class CallRecord:
    call_sid: str
    stream_sid: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    turns: list[Turn] = field(default_factory=list)
    ignored_messages: int = 0

    def summary(self) -> str:
        """The call's log line: sid, duration, turns, time to first audio per turn."""
        duration = (self.ended or time.time()) - self.started
        ttfa = [t.time_to_first_audio_s for t in self.turns if t.turn_end is not None]
        shown = ", ".join("-" if s is None else f"{s:.2f}" for s in ttfa) or "-"
        extra = f", {self.ignored_messages} malformed messages ignored" if self.ignored_messages else ""
        return (f"call {printable(self.call_sid)} ended: {duration:.1f} s, {len(ttfa)} turns, "
                f"time to first audio per turn [s]: {shown}{extra}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for turn, t in zip(d["turns"], self.turns):
            turn["time_to_first_audio_s"] = t.time_to_first_audio_s
        return d


class CallWatcher:
    """Fills a CallRecord's turns from the frames the call's service pushes on (its
    `frame_watchers`: a pipeline observer would see every frame at every processor through a
    queue and a task, a few ms of CPU per call-second)."""

    def __init__(self, record: CallRecord):
        self.record = record

    def __call__(self, frame: Frame, direction: FrameDirection) -> None:
        turns = self.record.turns
        turn = turns[-1] if turns else None
        if isinstance(frame, UserStartedSpeakingFrame):
            turns.append(Turn(started=time.time()))
        elif turn is None:
            return
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and turn.turn_end is None:
            turn.vad_stop, turn.speech_end = frame.timestamp, frame.timestamp - frame.stop_secs
        elif isinstance(frame, UserStoppedSpeakingFrame) and turn.turn_end is None:
            turn.turn_end = time.time()
        elif turn.turn_end is None:
            return
        elif isinstance(frame, TTSAudioRawFrame) and turn.first_audio is None:
            turn.first_audio = time.time()
        elif isinstance(frame, BotStartedSpeakingFrame) and turn.audio_out is None and turn.first_audio:
            turn.audio_out = time.time()   # upstream from the output transport: it wrote the audio
        elif isinstance(frame, MetricsFrame) and turn.model_ttfb_s is None:
            ttfb = [m.value for m in frame.data if isinstance(m, TTFBMetricsData) and m.value > 0]
            if ttfb:
                turn.model_ttfb_s = ttfb[0]


# -- the server ---------------------------------------------------------------------------

@dataclass
class LiveCall:
    """A media stream that holds a slot: its call record once Twilio's `start` arrived, and
    how to end it (the drain's deadline)."""

    websocket: WebSocket
    task: asyncio.Task | None
    record: CallRecord | None = None
    end: Callable[[], None] | None = None   # cancels the call's pipeline, once it runs
    transcript: TranscriptRecorder | None = None


class PhoneServer(CallTranscripts, CallServer):
    """The phone server: its routes (`app()`), the calls in flight, the per-call pipeline;
    admission, drain and `/health` are `CallServer`'s.

    `model`: a `ChromaEngine` (what `serve` runs: every call's conversation is a slot of
    it), or a loaded ChromaModel (or anything with its `conversation(...)`), shared by all
    calls; `voice`: a Voice or a voice file path; `public_url`: the https URL Twilio reaches
    this server at (required with TWILIO_AUTH_TOKEN, else ValueError; without a token the
    TwiML's stream URL uses the request's Host); `max_calls`: None -> the engine's
    `capacity`, else `call_server.DEFAULT_MAX_CALLS` (never more than an engine's capacity);
    `system_prompt`, `max_frames` (80 ms each): per reply (None: the service's defaults);
    `greeting`: a line spoken in the voice when a call connects; `vad_params`: the VAD's
    settings (PHONE_VAD); `media_timeout_s`: a stream without `start`, or without audio
    after it, this long is ended (None: `twilio_guards.media_timeout_s()`, 10 s);
    `admin_key`: the key of per-call data in /metrics (None: CHROMA_AGENT_ADMIN_KEY);
    `transcripts_dir`: a JSON Lines file per call's transcript there (hooks: `call_transcript`).

    `drain(seconds)` (what SIGTERM runs under `serve`): no new calls, the running ones
    may finish for `seconds`, then their streams are closed."""

    def __init__(self, model, voice, *, public_url: str | None = None, max_calls: int | None = None,
                 system_prompt: str | None = None, max_frames: int | None = None, greeting: str | None = None,
                 vad_params: VADParams = PHONE_VAD, media_timeout_s: float | None = None,
                 admin_key: str | None = None, transcripts_dir: str | None = None):
        super().__init__(model, max_calls=max_calls, what="calls", say=logger.info)
        self.init_transcripts(transcripts_dir, server="phone")   # the folder made and checked now: ValueError
        self.model, self.voice = model, voice
        self.public_url = public_url if not public_url or "://" in public_url else f"https://{public_url}"
        self.system_prompt, self.max_frames, self.greeting = system_prompt, max_frames, greeting
        self.vad_params = vad_params
        weights = getattr(model, "model", model)   # an engine's model
        self.out_rate = int(getattr(weights, "sample_rate", 24000))   # the service's audio, resampled once
        self.signatures = TwilioSignatures(os.environ.get("TWILIO_AUTH_TOKEN"), self.public_url)
        self.tokens = StreamTokens() if self.signatures.enabled else None   # without signatures nothing is checked
        self.media_timeout_s = media_timeout_s if media_timeout_s is not None else default_media_timeout_s()
        self.admin = AdminKey(admin_key)
        self.account_sid = os.environ.get("TWILIO_ACCOUNT_SID")
        self.finished: deque[CallRecord] = deque(maxlen=FINISHED_CALLS_KEPT)
        self._refused = Refusals(logger.warning)

    @property
    def active(self) -> dict[int, LiveCall]:
        """The calls holding a slot, per websocket."""
        return self.calls

    def health_extras(self) -> dict[str, Any]:
        return {"signatures": self.signatures.enabled}

    def metrics(self, per_call: bool = False) -> dict[str, Any]:
        """Aggregates: `active_calls`, `calls_total`, `finished_calls` (kept), `turns` and
        `time_to_first_audio_s` ({"p50", "p95"} or null) over the kept calls. `per_call`
        (the admin's view) adds `active` and `finished`: each call's record, sids included."""
        records = list(self.finished)
        ttfa = [t.time_to_first_audio_s for r in records for t in r.turns if t.time_to_first_audio_s is not None]
        quantiles = {"p50": float(np.percentile(ttfa, 50)), "p95": float(np.percentile(ttfa, 95))} if ttfa else None
        metrics = {"active_calls": len(self.active), "calls_total": self.calls_total, "finished_calls": len(records),
                   "turns": sum(len(r.turns) for r in records), "time_to_first_audio_s": quantiles}
        if per_call:
            metrics["active"] = [c.record.as_dict() for c in self.active.values() if c.record is not None]
            metrics["finished"] = [r.as_dict() for r in records]
        return metrics

    async def handle_stream(self, websocket: WebSocket) -> None:
        """One Media Stream: refuse it at the upgrade when unsigned (HTTP 403), draining or
        over capacity (HTTP 503), else take a slot and run the call (closed with 1008 when its
        `start` lacks a valid, unused token of its call), releasing the slot however it ends."""
        if not self.signatures.valid(websocket, "/ws"):
            self._refused("a media stream", "missing or invalid X-Twilio-Signature")
            await websocket.close(code=1008)
            return
        if reason := self.refusal():
            self._refused("a media stream", reason, f"{len(self.active)} of {self.max_calls} calls running")
            await _deny(websocket, reason)
            return
        key = id(websocket)
        call = LiveCall(websocket, asyncio.current_task())
        self.hold(key, call)   # no await since the check
        try:
            await websocket.accept()
            await self._run_call(call)
        except asyncio.CancelledError:
            if not self.draining:   # the drain's last resort cancels a call that would not end
                raise
        except Exception:  # one call's failure stays in that call
            logger.exception("a call failed")
        finally:
            try:
                await self.end_transcript(call.record, call.transcript)   # before the slot goes: a drain waits
            finally:
                self.release(key)
            if call.record is not None:
                call.record.ended = time.time()
                self.finished.append(call.record)
                logger.info(call.record.summary())

    async def _run_call(self, call: LiveCall) -> None:
        websocket = call.websocket
        try:
            _, data = await asyncio.wait_for(parse_telephony_websocket(websocket), self.media_timeout_s)
            stream_sid = data.stream_id
        except Exception as e:  # timed out, closed, binary, not JSON, nested too deep, wrong types
            why = f"{type(e).__name__}: {printable(e, 200) or 'timed out'}"
            self._refused("a stream", "no Twilio start", why)
            await _close(websocket, 1008)
            return
        if not isinstance(stream_sid, str) or not stream_sid:
            self._refused("a stream", "no Twilio start", "no streamSid")
            await _close(websocket, 1008)
            return
        call_sid = data.call_id if isinstance(data.call_id, str) else "?"
        if self.tokens is not None:   # the upgrade's signature is replayable: the token is one call's, once
            parameters = data.body if isinstance(data.body, dict) else {}
            if problem := self.tokens.redeem(parameters.get(TOKEN_PARAMETER), data.call_id):
                self._refused("a media stream", problem, f"call {printable(call_sid)}, stream {printable(stream_sid)}")
                await _close(websocket, 1008)
                return
        record = call.record = CallRecord(call_sid, stream_sid)
        logger.info(f"call {printable(record.call_sid)} started (stream {printable(record.stream_sid)})")

        worker: PipelineWorker | None = None
        ending: list[asyncio.Task] = []

        def end_call() -> None:  # from the receive loop: cancel in a task, not under our own feet
            if worker is not None and not ending:
                ending.append(asyncio.get_running_loop().create_task(worker.cancel(reason="call ended")))

        serializer = self._serializer(record, end_call)
        # Twilio sends no Origin: a PIPECAT_ALLOWED_ORIGINS must not refuse it. Output at the
        # model's rate in whole 80 ms frames: the serializer resamples each to 8 kHz at once
        transport = FastAPIWebsocketTransport(websocket, FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer,
            allowed_origins=[], audio_out_10ms_chunks=8))
        # the ONNX sessions load in ~70 ms: off the event loop, which other calls share
        user_params = await asyncio.to_thread(self.make_user_params)
        call.transcript = self.transcript_recorder(record, call_sid)
        service = self.make_service()
        service.frame_watchers.append(CallWatcher(record))
        pipeline = voice_pipeline(transport, service, user_params, call.transcript)
        worker = PipelineWorker(
            pipeline, enable_rtvi=False,
            # a processor that cannot work (no conversation: e.g. out of GPU memory) refuses
            # this call at once, not a connected and mute line; the other calls go on
            processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
            params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=self.out_rate,
                                  enable_metrics=True, enable_usage_metrics=True))
        call.end = end_call

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, websocket):  # a dropped line: free the call now
            end_call()

        if self.greeting:
            @transport.event_handler("on_client_connected")
            async def greet(transport, websocket):
                await worker.queue_frame(TTSSpeakFrame(self.greeting))

        runner = WorkerRunner(handle_sigint=False)   # uvicorn owns the signals
        await runner.add_workers(worker)
        serializer.last_media = time.monotonic()   # the pipeline's start is not the caller's silence
        watchdog = asyncio.create_task(end_when_silent(
            lambda: serializer.last_media, self.media_timeout_s, end_call,
            lambda why: logger.warning(f"call {printable(call_sid)}: {why}")))
        try:
            await runner.run()
        finally:
            watchdog.cancel()
            record.ignored_messages = sum(serializer.ignored.values())
            if ending:
                await asyncio.gather(*ending, return_exceptions=True)

    async def end_calls(self) -> None:
        """The drain's deadline: each call's pipeline is cancelled (its conversation and
        engine slot freed) and its stream closed; one still in the handshake is closed."""
        for call in list(self.active.values()):
            if call.end is not None:
                call.end()
            else:
                await _close(call.websocket, 1001)

    async def cancel_calls(self) -> None:
        """A call that would not end: its task goes."""
        for call in list(self.active.values()):
            if call.task is not None:
                call.task.cancel()

    def app(self) -> FastAPI:
        """The routes: POST /twiml, WS /ws, GET /health, GET /metrics."""
        if not self.signatures.enabled:
            logger.warning("TWILIO_AUTH_TOKEN is not set: requests are NOT verified as coming from Twilio; "
                           "anyone who finds this server can place calls on it")
        app = FastAPI(title="chroma-agent phone server")
        app.state.phone = self
        # every body is capped before a route reads it (413): Twilio's form is ~1-2 KiB
        app.add_middleware(BodyLimit, max_bytes=MAX_WEBHOOK_BYTES,
                           on_refused=lambda reason: self._refused("a request", reason))

        @app.post("/twiml")
        async def twiml(request: Request) -> Response:
            body = await request.body()   # capped by BodyLimit
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200))
            if not self.signatures.valid(request, "/twiml", form):   # before any other work
                self._refused("a webhook", "missing or invalid X-Twilio-Signature")
                return Response("invalid Twilio signature", status_code=403)
            call_sid = form.get("CallSid", "")
            if reason := self.refusal():
                self._refused("a call", reason, f"call {printable(call_sid or '?')}")
                return Response(TWIML_BUSY, media_type="application/xml")
            token = None if self.tokens is None else self.tokens.issue(call_sid)
            return Response(connect_twiml(stream_url(request, self.public_url), token), media_type="application/xml")

        @app.websocket("/ws")
        async def media_stream(websocket: WebSocket) -> None:
            await self.handle_stream(websocket)

        self.add_health(app)

        @app.get("/metrics")
        async def metrics(request: Request) -> JSONResponse:
            """Aggregates for anyone; each call's record (its sids) only with the admin key
            (`Authorization: Bearer $CHROMA_AGENT_ADMIN_KEY`); a wrong key: 401."""
            admin = self.admin.check(request.headers.get("authorization"))
            if admin is False:
                self._refused("a metrics request", "a wrong admin key")
                return JSONResponse({"error": "invalid admin key"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return JSONResponse(self.metrics(per_call=bool(admin)))

        return app

    # -- per call: override these to change the pipeline --
    def make_service(self) -> ChromaSpeechToSpeechService:
        """The speech-to-speech service of one call (the model and voice are shared); it
        transcribes the caller only when something takes the transcripts (a hook, a folder)."""
        return chroma_service(self.model, self.voice, system_prompt=self.system_prompt, max_frames=self.max_frames,
                              transcribe=self.records_transcripts)

    def make_user_params(self) -> LLMUserAggregatorParams:
        """Turn detection of one call: Silero VAD + Smart Turn v3, both local ONNX (built off
        the event loop). There is no speech-to-text, so the stop strategy must not wait for
        a transcript."""
        return turn_detection(self.vad_params)

    def _serializer(self, record: CallRecord, on_stop: Callable[[], None]) -> SafeTwilioSerializer:
        token = os.environ.get("TWILIO_AUTH_TOKEN")
        hang_up = bool(self.account_sid and token)   # else the caller hangs up, or Twilio does on close
        return SafeTwilioSerializer(
            stream_sid=record.stream_sid, call_sid=record.call_sid,
            account_sid=self.account_sid if hang_up else None, auth_token=token if hang_up else None,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up), on_stop=on_stop)


async def _close(websocket: WebSocket, code: int) -> None:
    """Close an accepted stream, unless the caller already has."""
    if websocket.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError):  # the caller's close crossed ours
        await websocket.close(code=code)


async def _deny(websocket: WebSocket, reason: str) -> None:
    """Refuse a stream at the upgrade with HTTP 503 (a server without the ASGI denial
    response extension: 403)."""
    try:
        await websocket.send_denial_response(JSONResponse({"error": reason}, status_code=503))
    except RuntimeError:
        await websocket.close(code=1013)


def create_app(model, voice, *, public_url: str | None = None, max_calls: int | None = None,
               system_prompt: str | None = None, max_frames: int | None = None,
               greeting: str | None = None, media_timeout_s: float | None = None,
               admin_key: str | None = None, transcripts_dir: str | None = None) -> FastAPI:
    """The phone server as a FastAPI app (run it with uvicorn, or add routes of your own);
    the arguments are PhoneServer's. To change the pipeline, subclass PhoneServer and call
    its `app()` (examples/twilio_phone_agent.py)."""
    return PhoneServer(model, voice, public_url=public_url, max_calls=max_calls, system_prompt=system_prompt,
                       max_frames=max_frames, greeting=greeting, media_timeout_s=media_timeout_s,
                       admin_key=admin_key, transcripts_dir=transcripts_dir).app()


def run_app(app: FastAPI, *, host: str, port: int, drain_seconds: float = DEFAULT_DRAIN_S) -> None:
    """Run a phone server's app with uvicorn (blocks), with the limits in place
    (MAX_MESSAGE_BYTES per websocket message) and SIGTERM as a drain: `app.state.phone`
    drains for `drain_seconds`, then the process exits normally (0)."""
    app.state.phone.serve_app(app, host=host, port=port, drain_seconds=drain_seconds, ws_max_size=MAX_MESSAGE_BYTES,
                              timeout_graceful_shutdown=END_TIMEOUT_S)


def check_serve_args(*, public_url: str | None = None, media_timeout_s: float | None = None,
                     transcripts_dir: str | None = None, **_other) -> None:
    """What `serve` refuses (ValueError, naming the fix), checked without a model so that a
    command line can fail before it loads one: TWILIO_AUTH_TOKEN without `public_url`, a
    media timeout (given, or CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S) that is not above 0, a
    transcripts folder that cannot be made or written. Takes `serve`'s options."""
    require_public_url(os.environ.get("TWILIO_AUTH_TOKEN"), public_url)
    prepare_transcripts_dir(transcripts_dir)
    if media_timeout_s is None:
        default_media_timeout_s()
    elif not media_timeout_s > 0:
        raise ValueError(f"the media timeout must be above 0 seconds, got {media_timeout_s}")


def serve(*, model, voice, host: str = "0.0.0.0", port: int = 8765, public_url: str | None = None,
          max_calls: int | None = None, system_prompt: str | None = None, max_frames: int | None = None,
          greeting: str | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          media_timeout_s: float | None = None, transcripts_dir: str | None = None) -> None:
    """Run the phone server until SIGTERM (drained, see `run_app`) or Ctrl-C (blocks). The
    model is loaded by the caller, before the port opens; the server runs one `ChromaEngine`
    over it (a given engine is used as is), whose capacity is `max_calls` when given, else
    measured at start (and then the default `max_calls`). See `create_app` for the rest.
    First `check_serve_args` (ValueError, before the engine starts)."""
    check_serve_args(public_url=public_url, media_timeout_s=media_timeout_s, transcripts_dir=transcripts_dir)
    with engine_over(model, max_calls) as engine:
        app = create_app(engine, voice, public_url=public_url, max_calls=max_calls, system_prompt=system_prompt,
                         max_frames=max_frames, greeting=greeting, media_timeout_s=media_timeout_s,
                         transcripts_dir=transcripts_dir)
        public = (public_url or "https://<this server's public host>").rstrip("/")
        logger.info(f"phone server on {host}:{port}, up to {app.state.phone.max_calls} calls at once; "
                    f"the Twilio number's voice webhook: POST {public}/twiml")
        run_app(app, host=host, port=port, drain_seconds=drain_seconds)
