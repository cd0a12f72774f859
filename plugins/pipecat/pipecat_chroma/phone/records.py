"""Each phone call's record: `CallRecord` (its ids, times, turns, how it ended), filled by
`CallWatcher` from the frames the call's service pushes on, and `LiveCall`, a call that
holds a slot of the server (what call control acts on).

`GET /calls` shows a call's record only to the admin (its ids); never a phone number, never
a transcript. The watcher also records each turn on the server's Prometheus metrics
(`chroma_agent.serving.metrics.ServerMetrics`): time to first audio, end of speech -> first
audio, the turn's status and the reply audio written to the caller (`meter_output`): sent,
late or dropped."""
from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.processors.frame_processor import FrameDirection

from chroma_agent.serving.log_safety import carrier_id
from chroma_agent.serving.metrics import NO_METRICS, ServerMetrics

if TYPE_CHECKING:   # annotations only: the server builds these
    from fastapi import WebSocket
    from pipecat.pipeline.worker import PipelineWorker

    from ..call_transcript import TranscriptRecorder
    from ..service import ChromaSpeechToSpeechService
    from .carrier import StreamStart


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
    """One call: `call_sid` and `stream_sid` (the carrier's call and stream ids), `id` (the
    server's own: log lines and traces name the call by it), `provider` ("twilio", ...),
    `direction` ("inbound" or "outbound"), `outcome` (an outbound call's: "answered",
    "machine", ...; set by `outbound`), `transferred_to` (True once the call was transferred:
    never the number), times, turns and the malformed messages dropped."""

    call_sid: str
    stream_sid: str
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    started: float = field(default_factory=time.time)
    ended: float | None = None
    turns: list[Turn] = field(default_factory=list)
    ignored_messages: int = 0
    provider: str = "twilio"
    direction: str = "inbound"
    outcome: str | None = None
    transferred_to: bool = False

    @property
    def label(self) -> str:
        """The call in a log line: its own id, and the carrier's call id only when the operator
        asked (`log_safety.carrier_ids_logged`)."""
        sid = carrier_id(self.call_sid)
        return self.id if sid is None else f"{self.id} ({sid})"

    def summary(self) -> str:
        """The call's log line: sid, duration, turns, time to first audio per turn."""
        duration = (self.ended or time.time()) - self.started
        ttfa = [t.time_to_first_audio_s for t in self.turns if t.turn_end is not None]
        shown = ", ".join("-" if s is None else f"{s:.2f}" for s in ttfa) or "-"
        extra = f", {self.ignored_messages} malformed messages ignored" if self.ignored_messages else ""
        if self.transferred_to:
            extra += ", transferred"
        return (f"call {self.label} ended: {duration:.1f} s, {len(ttfa)} turns, "
                f"time to first audio per turn [s]: {shown}{extra}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for turn, t in zip(d["turns"], self.turns):
            turn["time_to_first_audio_s"] = t.time_to_first_audio_s
        return d


FRAME_S = 0.08   # "frames sent" counts the reply audio sent in the model's 80 ms frames, whatever the carrier's packets
LATE_S = FRAME_S  # audio written over a frame past its time to play: the caller's buffer ran dry, a gap was heard


def message_kind(kind: str) -> str:
    """A serializer's kind of dropped message ("not JSON", "unknown event") as a metric
    label ("not_json"): the kinds are the serializers' fixed phrases, never the client's text."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")[:48] or "other"


def meter_output(output, watcher: "CallWatcher") -> None:
    """Count the reply audio a Pipecat output transport (`transport.output()`) writes on
    `watcher`: sent (late when past its time to play) or dropped (the connection was gone).
    The transport's own `write_audio_frame` is wrapped on this instance: one call per chunk."""
    write = output.write_audio_frame

    async def write_audio_frame(frame) -> bool:
        at = time.monotonic()   # before the write: a websocket transport sleeps out the chunk after sending it
        ok = await write(frame)
        rate = frame.sample_rate * max(1, frame.num_channels)
        if rate > 0:
            watcher.written(len(frame.audio) / (2 * rate), ok, at)
        return ok

    output.write_audio_frame = write_audio_frame


class CallWatcher:
    """Fills a CallRecord's turns from the frames the call's service pushes on (its
    `frame_watchers`: a pipeline observer would see every frame at every processor through a
    queue and a task, a few ms of CPU per call-second), and records them on `metrics`: a
    turn's time to first audio and end of speech -> first audio once its audio went out, its
    status ("completed", "cancelled" when the caller cut in) when the agent stopped speaking.
    The reply audio written to the caller (`meter_output`) is counted in 80 ms frames: sent,
    late (written over a frame past its time to play, counted from the reply's first audio)
    and dropped (the connection gone), added to the metrics per reply; `close()` at the call's
    end adds what is left."""

    def __init__(self, record: CallRecord, metrics: ServerMetrics = NO_METRICS):
        self.record, self.metrics = record, metrics
        self.held = {"sent": 0.0, "late": 0.0, "dropped": 0.0}   # reply audio (s) not yet added to the metrics
        self._reply_t0: float | None = None   # when the reply's first audio was written (time.monotonic())
        self._reply_s = 0.0                   # the reply's audio written since
        self._playing: Turn | None = None     # the turn whose reply went out and has no status yet
        self._cut_in = False                  # the caller talked over that reply

    def written(self, seconds: float, ok: bool = True, at: float | None = None) -> None:
        """`seconds` of reply audio handed to the caller's connection at `at` (default now),
        or not (`ok` False: dropped)."""
        if not ok:
            self.held["dropped"] += seconds
            return
        at = time.monotonic() if at is None else at
        if self._reply_t0 is None:
            self._reply_t0, self._reply_s = at, 0.0
        elif at - self._reply_t0 > self._reply_s + LATE_S:
            self.held["late"] += seconds
        self._reply_s += seconds
        self.held["sent"] += seconds

    def flush(self) -> None:
        """Add the reply audio written so far to the metrics, in whole 80 ms frames."""
        counts = {}
        for kind, seconds in self.held.items():
            frames = int(seconds / FRAME_S + 0.5)
            if frames > 0:
                self.held[kind] = max(0.0, seconds - frames * FRAME_S)
                counts[kind] = frames
        if counts:
            self.metrics.frames(**counts)

    def close(self) -> None:
        """The call ended: the reply audio not added yet, and a reply still playing
        ("incomplete")."""
        self.flush()
        if self._playing is not None:
            self._playing = None
            self.metrics.turn("incomplete")

    def _audio_out(self, turn: Turn) -> None:
        turn.audio_out = time.time()   # upstream from the output transport: it wrote the audio
        self.metrics.first_audio(turn.audio_out - turn.turn_end)
        if turn.speech_end is not None:
            self.metrics.speech_end_to_first_audio(turn.audio_out - turn.speech_end)
        self._playing, self._cut_in = turn, False

    def __call__(self, frame: Frame, direction: FrameDirection) -> None:
        turns = self.record.turns
        turn = turns[-1] if turns else None
        if isinstance(frame, (UserStartedSpeakingFrame, InterruptionFrame)) and self._playing is not None:
            self._cut_in = True   # the caller talks over the reply
        if isinstance(frame, (TTSStartedFrame, InterruptionFrame)):
            self._reply_t0 = None   # a reply starts (or was cut): its audio's clock starts at its first write
        if isinstance(frame, UserStartedSpeakingFrame):
            turns.append(Turn(started=time.time()))
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.flush()
            if self._playing is not None:
                self._playing = None
                self.metrics.turn("cancelled" if self._cut_in else "completed")
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
            self._audio_out(turn)
        elif isinstance(frame, MetricsFrame) and turn.model_ttfb_s is None:
            ttfb = [m.value for m in frame.data if isinstance(m, TTFBMetricsData) and m.value > 0]
            if ttfb:
                turn.model_ttfb_s = ttfb[0]


@dataclass
class LiveCall:
    """A media stream that holds a slot of the server. Set as the call goes on: `start` (the
    carrier's opening, StreamStart) and `record` once the stream is taken; `worker`,
    `service`, `serializer`, `end` (cancels the pipeline) once it runs; `recording` with
    `record_dir`. `outbound`: the server placed this call (set by `outbound` in a
    `call_started` hook, from the stream's custom parameter or the call id); `data`: room
    for hooks' own per-call state. `ended` is set when the call is over."""

    websocket: WebSocket
    task: asyncio.Task | None
    record: CallRecord | None = None
    end: Callable[[], None] | None = None
    transcript: TranscriptRecorder | None = None
    start: StreamStart | None = None
    worker: PipelineWorker | None = None
    service: ChromaSpeechToSpeechService | None = None
    serializer: Any = None
    recording: Any = None
    outbound: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    bot_speaking: bool = False
    speech: list[tuple[str, float]] = field(default_factory=list)   # ("started"/"stopped", monotonic), recent

    def watch_speech(self, frame: Frame, direction: FrameDirection) -> None:
        """A frame watcher: the agent's audio starting and stopping at the caller's end
        (what `PhoneServer.say` waits on)."""
        if isinstance(frame, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame)):
            self.bot_speaking = isinstance(frame, BotStartedSpeakingFrame)
            self.speech.append(("started" if self.bot_speaking else "stopped", time.monotonic()))
            del self.speech[:-16]   # bounded: say() looks only at what came after it


class OutcomeCounts(dict):
    """Outbound calls per outcome (`PhoneServer.outcomes`, which `outbound` counts in): each
    count added is also added to `chroma_outbound_calls_total{outcome}`."""

    def __init__(self, metrics: ServerMetrics = NO_METRICS):
        super().__init__()
        self.metrics = metrics

    def __setitem__(self, outcome: str, count: int) -> None:
        added = count - self.get(outcome, 0)
        super().__setitem__(outcome, count)
        if added > 0:
            self.metrics.outbound(outcome, added)

    def setdefault(self, outcome: str, default: int = 0) -> int:
        if outcome not in self:
            self.metrics.outbound(outcome, 0)   # the series exists from the start (rate() needs it)
        return super().setdefault(outcome, default)


def calls_report(server, per_call: bool = False) -> dict[str, Any]:
    """A phone server's calls (`PhoneServer.call_metrics`, `GET /calls`): `active_calls`,
    `calls_total`, `finished_calls` (kept), `turns` and `time_to_first_audio_s` ({"p50",
    "p95"} or null) over the kept calls, `transferred` (kept calls), `outbound` (outbound
    calls per outcome, when there were any). `per_call` (the admin's view) adds `active`
    and `finished`: each call's record, sids included."""
    records = list(server.finished)
    ttfa = [t.time_to_first_audio_s for r in records for t in r.turns if t.time_to_first_audio_s is not None]
    quantiles = {"p50": float(np.percentile(ttfa, 50)), "p95": float(np.percentile(ttfa, 95))} if ttfa else None
    report = {"active_calls": len(server.active), "calls_total": server.calls_total, "finished_calls": len(records),
              "turns": sum(len(r.turns) for r in records), "time_to_first_audio_s": quantiles,
              "transferred": sum(r.transferred_to for r in records)}
    if any(server.outcomes.values()):
        report["outbound"] = dict(server.outcomes)
    if per_call:
        report["active"] = [c.record.as_dict() for c in list(server.active.values()) if c.record is not None]
        report["finished"] = [r.as_dict() for r in records]
    return report
