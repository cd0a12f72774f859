"""The servers' Prometheus metrics (`prometheus_client`, text exposition at `GET /metrics`).

    metrics = ServerMetrics()                 # one per server, on prometheus_client's REGISTRY
    metrics.watch_engine(engine)              # its gauges and tick histogram, read at scrape time
    metrics.call_started(); ...; metrics.call_ended("completed")
    metrics.first_audio(0.31); metrics.frames(sent=40, late=1)
    body, content_type = exposition(metrics.registry)

The metric families live once per registry (`families_on`): a second server or test in the
same process shares them instead of registering the names again (which prometheus_client
refuses). Names follow Prometheus' conventions: the `chroma_` prefix, base units (seconds),
`_total` counters. Label values come from fixed sets (`OUTCOMES`, `REFUSALS`, ...) or, for
invalid client messages, the protocol's own error codes, checked and capped: never a call
id, a number or text. Recording never raises into a call (a failure is logged once) and
costs a lock and an add: per-frame counts are added once per reply (`frames`).

What is defined (`NAMES` lists them):

- `chroma_calls_active` (gauge), `chroma_calls_total{outcome}` (completed, failed),
  `chroma_calls_refused_total{reason}` (capacity, auth, draining, rate_limit, invalid, other)
- `chroma_turns_total{status}` (completed, cancelled, incomplete, failed)
- `chroma_time_to_first_audio_seconds` (histogram): a turn asked (end of speech detected,
  or the client's request) -> its first audio sent
- `chroma_speech_end_to_first_audio_seconds` (histogram): the caller's last speech sample
  arrived -> the reply's first audio sent (the detector's silence window included), where
  the server sees both
- `chroma_audio_frames_sent_total`, `chroma_audio_frames_late_total` (sent after its time
  to play, counted from the reply's first frame), `chroma_audio_frames_dropped_total`
- `chroma_invalid_messages_total{kind}` (the protocol's error code)
- `chroma_transcripts_total{outcome}` (completed, failed)
- `chroma_outbound_calls_total{outcome}` (`OUTBOUND_OUTCOMES`: answered, machine, busy,
  no-answer, failed, other): calls a phone server placed, by how they settled; the series
  appear where a server places calls (`outbound`)
- `chroma_engine_tick_seconds` (histogram), `chroma_engine_load`, `chroma_engine_capacity`,
  `chroma_engine_conversations` (gauges): read from the watched engines when scraped
- the client's process collector (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
  ...) and `process_threads`
"""
from __future__ import annotations

import logging
import re
import threading
import weakref
from typing import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

OUTCOMES = ("completed", "failed")
REFUSALS = ("capacity", "auth", "draining", "rate_limit", "invalid", "other")
TURN_STATUSES = ("completed", "cancelled", "incomplete", "failed")
OUTBOUND_OUTCOMES = ("answered", "machine", "busy", "no-answer", "failed", "other")
# a refusal's words in the servers (CallServer.refusal's "busy", the protocols' codes) -> its reason
REFUSAL_ALIASES = {"busy": "capacity", "server_at_capacity": "capacity", "at_capacity": "capacity",
                   "invalid_api_key": "auth", "unauthorized": "auth", "forbidden": "auth",
                   "server_shutting_down": "draining", "shutting_down": "draining",
                   "rate_limit_exceeded": "rate_limit", "rate_limited": "rate_limit"}

FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
SPEECH_END_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
# 80 ms is the frame budget: a tick over it means the replies fall behind real time
TICK_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0)

MAX_KINDS = 64                          # distinct `kind` values; past it: "other"
_KIND = re.compile(r"[a-z][a-z0-9_.]{0,47}")

NAMES = ("chroma_calls_active", "chroma_calls_total", "chroma_calls_refused_total", "chroma_turns_total",
         "chroma_time_to_first_audio_seconds", "chroma_speech_end_to_first_audio_seconds",
         "chroma_audio_frames_sent_total", "chroma_audio_frames_late_total", "chroma_audio_frames_dropped_total",
         "chroma_invalid_messages_total", "chroma_transcripts_total", "chroma_engine_tick_seconds",
         "chroma_engine_load", "chroma_engine_capacity", "chroma_engine_conversations",
         "chroma_outbound_calls_total")


class EngineCollector:
    """The watched engines' gauges and tick histogram, read when scraped: the ticks added to
    each engine's `tick_times` ((end, ms) of its last 10,000 ticks) since the last scrape go
    into cumulative buckets here. Several engines in one process (tests) are summed."""

    def __init__(self):
        self.engines: weakref.WeakSet = weakref.WeakSet()
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # engine -> last tick end counted
        self._lock = threading.Lock()
        self._counts = [0] * len(TICK_BUCKETS)   # per bucket, not cumulative
        self._over = 0                           # over the last bucket
        self._sum = 0.0

    def watch(self, engine) -> None:
        """Report `engine` (anything with `capacity`; a plain model is skipped) while it lives."""
        if getattr(engine, "capacity", None):
            with self._lock:
                self.engines.add(engine)
                self._seen.setdefault(engine, float("-inf"))

    def describe(self) -> list:
        return []   # no collect() at registration: the engines are read at scrape time only

    def _take_ticks(self) -> None:
        for engine in list(self.engines):
            ticks = getattr(engine, "tick_times", None)
            if ticks is None:
                continue
            since = self._seen.get(engine, float("-inf"))
            snapshot, new = list(ticks), []
            for end, ms in reversed(snapshot):   # newest first: stop at the last one counted
                if end <= since:
                    break
                new.append(ms / 1000.0)
            if new:
                self._seen[engine] = snapshot[-1][0]
            for seconds in new:
                self._sum += seconds
                for i, le in enumerate(TICK_BUCKETS):
                    if seconds <= le:
                        self._counts[i] += 1
                        break
                else:
                    self._over += 1

    def collect(self) -> Iterable:
        with self._lock:
            try:
                self._take_ticks()
            except Exception:  # noqa: BLE001 - a scrape shows what it has; never an error page
                log.exception("reading the engines' tick times failed")
            cumulative, total = [], 0
            for le, n in zip(TICK_BUCKETS, self._counts):
                total += n
                cumulative.append((repr(float(le)), total))
            cumulative.append(("+Inf", total + self._over))
            tick_sum = self._sum
            engines = list(self.engines)
        yield HistogramMetricFamily("chroma_engine_tick_seconds", "Wall time of the engine's ticks that stepped "
                                    "replies (one 80 ms frame per speaking reply)", buckets=cumulative,
                                    sum_value=tick_sum)
        capacity = sum(int(getattr(e, "capacity", 0) or 0) for e in engines)
        conversations = sum(int(getattr(e, "active", 0) or 0) for e in engines)
        yield GaugeMetricFamily("chroma_engine_capacity", "Conversations the engines can hold at once",
                                value=capacity)
        yield GaugeMetricFamily("chroma_engine_conversations", "Open engine conversations", value=conversations)
        yield GaugeMetricFamily("chroma_engine_load", "Open conversations / capacity (0..1)",
                                value=conversations / capacity if capacity else 0.0)


class ThreadsCollector:
    """`process_threads`: the process's OS threads (the model's, the loop's workers' and
    the rest), which the client's process collector does not report; from /proc where
    there is one, else Python's threads."""

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable:
        try:
            with open("/proc/self/stat", "rb") as f:   # field 20, after the ")" that ends the name
                threads = int(f.read().rsplit(b")", 1)[1].split()[17])
        except (OSError, IndexError, ValueError):
            threads = threading.active_count()
        yield GaugeMetricFamily("process_threads", "Threads of this process", value=threads)


class Families:
    """The metric families on one registry (made once: `families_on`)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        on = {"registry": registry}
        self.calls_active = Gauge("chroma_calls_active", "Calls (sessions) running now", **on)
        self.calls = Counter("chroma_calls", "Calls (sessions) ended, by outcome", ["outcome"], **on)
        self.refused = Counter("chroma_calls_refused", "Calls (sessions) refused at the door, by reason",
                               ["reason"], **on)
        self.turns = Counter("chroma_turns", "Replies ended, by status", ["status"], **on)
        self.first_audio = Histogram("chroma_time_to_first_audio_seconds", "A turn asked (end of speech "
                                     "detected, or the client's request) -> its first audio sent",
                                     buckets=FIRST_AUDIO_BUCKETS, **on)
        self.speech_end = Histogram("chroma_speech_end_to_first_audio_seconds", "The caller's last speech "
                                    "arrived -> the reply's first audio sent", buckets=SPEECH_END_BUCKETS, **on)
        self.frames_sent = Counter("chroma_audio_frames_sent", "Reply audio frames sent", **on)
        self.frames_late = Counter("chroma_audio_frames_late", "Reply audio frames sent after their time "
                                   "to play (counted from the reply's first frame)", **on)
        self.frames_dropped = Counter("chroma_audio_frames_dropped", "Reply audio frames made and not sent", **on)
        self.invalid = Counter("chroma_invalid_messages", "Client messages refused, by the protocol's error code",
                               ["kind"], **on)
        self.transcripts = Counter("chroma_transcripts", "Caller transcripts ended, by outcome", ["outcome"], **on)
        self.outbound = Counter("chroma_outbound_calls", "Calls placed by the server, by how they settled",
                                ["outcome"], **on)
        self.engines = EngineCollector()
        registry.register(self.engines)
        registry.register(ThreadsCollector())
        if registry is not REGISTRY:   # prometheus_client puts its process collector on REGISTRY itself
            ProcessCollector(registry=registry)
        for outcome in OUTCOMES:   # every fixed series exists from the start, at 0 (rate() needs it)
            self.calls.labels(outcome)
            self.transcripts.labels(outcome)
        for reason in REFUSALS:
            self.refused.labels(reason)
        for status in TURN_STATUSES:
            self.turns.labels(status)
        self.kinds: set[str] = set()


_families: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def families_on(registry: CollectorRegistry | None = None) -> Families:
    """The metric families on `registry` (default: prometheus_client's REGISTRY), made on
    first use and shared after: the names are never registered twice."""
    registry = REGISTRY if registry is None else registry
    with _families_lock:
        families = _families.get(registry)
        if families is None:
            families = _families[registry] = Families(registry)
        return families


def _quiet(method):
    """A recording method that never raises into a call: a failure is logged once."""
    def recording(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - metrics must never break a call
            if not self.failed:
                self.failed = True
                log.exception("recording a metric failed (logged once)")
    recording.__name__, recording.__doc__ = method.__name__, method.__doc__
    return recording


class ServerMetrics:
    """One server's recording of the metrics, on `registry` (default: REGISTRY; a test may
    pass its own `CollectorRegistry`). Every method is cheap and never raises."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.families = families_on(registry)
        self.registry = self.families.registry
        self.failed = False
        f = self.families
        self._calls = {o: f.calls.labels(o) for o in OUTCOMES}
        self._refused = {r: f.refused.labels(r) for r in REFUSALS}
        self._turns = {s: f.turns.labels(s) for s in TURN_STATUSES}
        self._transcripts = {o: f.transcripts.labels(o) for o in OUTCOMES}

    def watch_engine(self, engine) -> None:
        """Report `engine`'s load, capacity, conversations and ticks at scrape time."""
        try:
            self.families.engines.watch(engine)
        except Exception:  # noqa: BLE001 - e.g. an object that takes no weak reference: not reported
            log.warning("this engine's metrics are not reported", exc_info=True)

    @_quiet
    def call_started(self) -> None:
        self.families.calls_active.inc()

    @_quiet
    def call_ended(self, outcome: str = "completed") -> None:
        """A started call ended: "completed" or "failed"."""
        self.families.calls_active.dec()
        self._calls.get(outcome, self._calls["failed"]).inc()

    @_quiet
    def refused(self, reason: str) -> None:
        """A call refused at the door: one of REFUSALS (or a word of REFUSAL_ALIASES; else "other")."""
        reason = REFUSAL_ALIASES.get(reason, reason)
        self._refused.get(reason, self._refused["other"]).inc()

    @_quiet
    def turn(self, status: str) -> None:
        """A reply ended: one of TURN_STATUSES (else counted as "failed")."""
        self._turns.get(status, self._turns["failed"]).inc()

    @_quiet
    def first_audio(self, seconds: float) -> None:
        """A turn's time to first audio: asked -> its first audio sent."""
        self.families.first_audio.observe(max(0.0, seconds))

    @_quiet
    def speech_end_to_first_audio(self, seconds: float) -> None:
        """The caller's last speech arrived -> the reply's first audio sent."""
        self.families.speech_end.observe(max(0.0, seconds))

    @_quiet
    def frames(self, sent: int = 0, late: int = 0, dropped: int = 0) -> None:
        """Audio frames, added in a batch (e.g. once per reply)."""
        f = self.families
        if sent > 0:
            f.frames_sent.inc(sent)
        if late > 0:
            f.frames_late.inc(late)
        if dropped > 0:
            f.frames_dropped.inc(dropped)

    @_quiet
    def invalid_message(self, kind: str | None, count: int = 1) -> None:
        """`count` client messages refused (default one); `kind`: the protocol's error code (a
        fixed word; anything else, and any past MAX_KINDS distinct ones, is "other")."""
        if count <= 0:
            return
        f = self.families
        kind = kind if isinstance(kind, str) and _KIND.fullmatch(kind) else "other"
        if kind not in f.kinds:
            if len(f.kinds) >= MAX_KINDS:
                kind = "other"
            f.kinds.add(kind)
        f.invalid.labels(kind).inc(count)

    @_quiet
    def transcript(self, outcome: str) -> None:
        """A caller transcript ended: "completed" or "failed"."""
        self._transcripts.get(outcome, self._transcripts["failed"]).inc()

    @_quiet
    def outbound(self, outcome: str, count: int = 1) -> None:
        """`count` placed calls settled with `outcome` (one of OUTBOUND_OUTCOMES, else
        "other"); `count=0` makes the series exist at 0 (a server that places calls)."""
        if count >= 0:
            self.families.outbound.labels(outcome if outcome in OUTBOUND_OUTCOMES else "other").inc(count)


class NoMetrics(ServerMetrics):
    """Records nothing (a session run without a server's metrics, e.g. in a unit test)."""

    def __init__(self):
        self.failed = False

    def watch_engine(self, engine) -> None:
        pass

    def _nothing(self, *args, **kwargs) -> None:
        pass

    call_started = call_ended = refused = turn = first_audio = speech_end_to_first_audio = _nothing
    frames = invalid_message = transcript = outbound = _nothing


NO_METRICS = NoMetrics()


def metrics_of(server) -> ServerMetrics:
    """`server.metrics`, or NO_METRICS for a server without (a test's stand-in)."""
    metrics = getattr(server, "metrics", None)
    return metrics if isinstance(metrics, ServerMetrics) else NO_METRICS


def exposition(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """`registry`'s metrics (default: REGISTRY) in the text format, and its content type."""
    return generate_latest(REGISTRY if registry is None else registry), CONTENT_TYPE_LATEST
