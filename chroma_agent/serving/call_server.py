"""The skeleton every `chroma-agent serve KIND` shares: admission, totals, the SIGTERM
drain and one `/health` schema. Each server subclasses `CallServer` and adds its routes.

    class PhoneServer(CallServer):
        async def end_calls(self): ...            # the drain's deadline: end every call
    server = PhoneServer(engine, max_calls=8, what="calls")
    if reason := server.refusal():                # "draining" or "busy": refuse at the door
        ...
    server.hold(key, call)                        # the slot: no await since `refusal()`
    try:
        ...                                       # the call
    finally:
        server.release(key)                       # the slot back, the call's memory freed
    server.serve_app(app, host=..., port=..., drain_seconds=30)   # blocks; SIGTERM drains

Metrics (`metrics.ServerMetrics`, `self.metrics`): `hold` (a counted call) and `release`
keep `chroma_calls_active` and `chroma_calls_total{outcome}` (completed; "failed" after
`fail(key)`), `refusal()` counts the refusal it returns (`count_refusal` the server's own:
auth, rate limits, ...); `add_metrics(app)` mounts `GET /metrics` (Prometheus text), and
`admin_refusal` is the check of an admin-only route such as `GET /calls`.

`health()`, the same keys for every server (HTTP 503 while draining, `add_health`):

    {"status": "ok" | "draining", "active_calls", "max_calls", "calls_total",
     "engine": {"load", "capacity", "conversations", "frame_ms": {"p50", "p95", "ticks"} | null} | null,
     ...the server's own `health_extras()`}

`engine` is null for a server run on a plain model (no engine: `bench_call.py`'s timed
model). Framework-free: `runner` imports FastAPI and uvicorn inside the functions that
need them.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from typing import Any, Callable, Iterator

from .log_format import uvicorn_log_config
from .runner import DEFAULT_DRAIN_S, add_health, call_ended, drain_calls, run

log = logging.getLogger(__name__)

# Without a batched engine every call steps the one model in turn, frame by frame: a
# handful of calls keeps each in real time on one GPU. A model with `capacity` says its own.
DEFAULT_MAX_CALLS = 4


def default_max_calls(model) -> int:
    """The model's own `capacity` (a batched engine knows it), else DEFAULT_MAX_CALLS."""
    return int(getattr(model, "capacity", None) or DEFAULT_MAX_CALLS)


def calls_at_once(model, max_calls: int | None, what: str = "calls") -> int:
    """A server's limit of `what` ("calls", "sessions") at once: `max_calls`, else
    `default_max_calls(model)`; at least 1 (else ValueError), and never over an engine's
    capacity (past it a call would get no conversation: capped, with a warning)."""
    limit = max_calls if max_calls is not None else default_max_calls(model)
    if limit < 1:
        raise ValueError(f"max_calls must be >= 1, got {limit}")
    capacity = getattr(model, "capacity", None)
    if capacity is not None and limit > capacity:
        log.warning("max_calls %d is over the engine's capacity: %d %s at once", limit, capacity, what)
        return capacity
    return limit


def bearer_key_matches(header: str | None, key: str) -> bool:
    """`Authorization: Bearer <key>` carries `key`, compared in constant time (the API key
    of `serve realtime`, the admin key of `serve twilio`'s per-call data)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                              key.encode("utf-8"))


def admin_refusal(header: str | None, admin_key: str | None) -> int | None:
    """The HTTP status refusing an admin-only route (per-call data names callers): 404 when
    no admin key is set (the route is off), 401 for a missing or wrong `Authorization:
    Bearer <key>`; None when the key matches."""
    if not admin_key:
        return 404
    return None if bearer_key_matches(header, admin_key) else 401


def add_metrics_route(app, metrics) -> None:
    """`GET /metrics` on a FastAPI `app`: `metrics`' registry (a `ServerMetrics`) in
    Prometheus' text format (made in a worker thread: the event loop never waits on it)."""
    from fastapi.responses import Response

    from .metrics import exposition

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = await asyncio.to_thread(exposition, metrics.registry)
        return Response(body, media_type=content_type)


@contextlib.contextmanager
def engine_over(model, max_calls: int | None = None) -> Iterator[Any]:
    """A `ChromaEngine` over a loaded `model` for a server's life, closed after; a given
    engine (anything with `capacity`) is used as is and left open. `max_calls`: the
    engine's conversations (None: measured at start)."""
    if hasattr(model, "capacity"):
        yield model
        return
    from ..runtime.engine import ChromaEngine

    engine = ChromaEngine(model, max_conversations=max_calls)
    try:
        yield engine
    finally:
        engine.close()


def engine_health(engine) -> dict[str, Any] | None:
    """`/health`'s `engine`: load (0..1), capacity, open conversations and the last 30 s of
    tick times; None without an engine (a plain model has no capacity)."""
    capacity = getattr(engine, "capacity", None)
    if not capacity:
        return None
    conversations = int(getattr(engine, "active", 0))
    load = getattr(engine, "load", conversations / capacity)
    frames = engine.frame_times() if hasattr(engine, "frame_times") else None
    return {"load": round(load, 3), "capacity": capacity, "conversations": conversations, "frame_ms": frames}


class CallServer:
    """Admission, totals, drain and health over one engine (or model), for a server whose
    calls are kept in `calls` (key -> the server's own record of the call).

    `engine`: a `ChromaEngine` (or a loaded model: then `health()`'s `engine` is null);
    `max_calls`: calls at once (`calls_at_once`); `what`: the word for a call in the log
    ("calls", "sessions"); `drain_seconds`: what `drain()` waits by default; `say`: the
    drain's log lines (default: this module's logger); `metrics`: where the calls are
    counted (default: a `ServerMetrics` on prometheus_client's REGISTRY). Subclasses
    implement `end_calls` (and `cancel_calls`, the drain's last resort) and may add
    `health_extras`."""

    def __init__(self, engine, *, max_calls: int | None = None, what: str = "calls",
                 drain_seconds: float = DEFAULT_DRAIN_S, say: Callable[[str], None] | None = None,
                 metrics=None):
        self.engine = engine
        self.max_calls = calls_at_once(engine, max_calls, what)
        self.what = what
        self.drain_seconds = drain_seconds
        self.log_line = say or log.info   # the drain's lines (not `say`: a phone server's `say` speaks)
        self.calls: dict[Any, Any] = {}
        self.calls_total = 0
        self.draining = False
        from .metrics import ServerMetrics   # prometheus_client: a server's dependency, as FastAPI is

        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.watch_engine(engine)
        self._started: set = set()   # keys of the calls counted as started (a reserved slot is not)
        self._failed: set = set()    # keys whose call failed (`fail`)

    # -- admission --
    @property
    def busy(self) -> bool:
        return len(self.calls) >= self.max_calls

    def refusal(self) -> str | None:
        """Why a new call is refused now ("draining", "busy"), or None; a refusal is counted
        (`chroma_calls_refused_total`: draining, capacity): call it once per call asking."""
        reason = "draining" if self.draining else "busy" if self.busy else None
        if reason is not None:
            self.metrics.refused(reason)
        return reason

    def count_refusal(self, reason: str) -> None:
        """Count a call refused for a reason of the server's own: one of `metrics.REFUSALS`
        (capacity, auth, draining, rate_limit, invalid, other) or a word of
        `metrics.REFUSAL_ALIASES` (e.g. a protocol's error code)."""
        self.metrics.refused(reason)

    def hold(self, key, call: Any = None, *, count: bool = True) -> None:
        """Take a slot for `key` (after `refusal()`, with no await between); `count`: a call
        started (a slot only reserved while a call is set up counts later, `count_call`)."""
        self.calls[key] = call
        if count:
            self.calls_total += 1
            if key not in self._started:
                self._started.add(key)
                self.metrics.call_started()

    def count_call(self) -> None:
        self.calls_total += 1

    def fail(self, key) -> None:
        """`key`'s call failed (a server error, not the caller hanging up): its `release`
        counts it as "failed"."""
        if key in self._started:
            self._failed.add(key)

    def release(self, key, outcome: str | None = None) -> None:
        """Free `key`'s slot and hand the ended call's memory back (from the event loop);
        a started call is counted by `outcome` (default: "failed" after `fail(key)`, else
        "completed")."""
        self.calls.pop(key, None)
        if key in self._started:
            self._started.discard(key)
            failed = key in self._failed
            self._failed.discard(key)
            self.metrics.call_ended(outcome or ("failed" if failed else "completed"))
        call_ended()

    # -- health --
    def health(self) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "ok", "active_calls": len(self.calls),
                "max_calls": self.max_calls, "calls_total": self.calls_total,
                "engine": engine_health(self.engine), **self.health_extras()}

    def health_extras(self) -> dict[str, Any]:
        """The server's own `/health` keys (e.g. whether auth is on)."""
        return {}

    def add_health(self, app) -> None:
        """`GET /health` on a FastAPI app: `health()`, 503 while draining."""
        add_health(app, self)

    def add_metrics(self, app) -> None:
        """`GET /metrics` on a FastAPI app: Prometheus' text format (`add_metrics_route`)."""
        add_metrics_route(app, self.metrics)

    # -- drain --
    async def end_calls(self) -> None:
        """The drain's deadline: end every running call (each frees its own slot)."""
        raise NotImplementedError

    async def cancel_calls(self) -> None:
        """The drain's last resort, for calls that `end_calls` did not end: nothing here."""

    async def drain(self, seconds: float | None = None) -> None:
        """Stop taking calls (`/health` says draining, `refusal()` "draining"), let the
        running ones go on for up to `seconds` (None: `drain_seconds`), then end them
        (`end_calls`, then `cancel_calls`). Returns when none is left."""
        self.draining = True
        await drain_calls(lambda: len(self.calls), self.drain_seconds if seconds is None else seconds,
                          [self.end_calls, self.cancel_calls], self.log_line, self.what)

    def serve_app(self, app, *, host: str, port: int, drain_seconds: float | None = None,
                  drain_signals: tuple[int, ...] = (signal.SIGTERM,), **config) -> None:
        """Run `app` with uvicorn until it stops (blocks; `runner.run`): the first of
        `drain_signals` drains for `drain_seconds` (None: `self.drain_seconds`), then the
        process exits 0; the loop gets worker threads for `max_calls` calls; `config`: more
        uvicorn options (log_level "info" unless given, ws_max_size, ...); in JSON log mode
        (`log_format.configure_logging("json")`) uvicorn logs through the root logger."""
        run(app, host=host, port=port, drain=lambda: self.drain(drain_seconds), drain_signals=drain_signals,
            calls=self.max_calls, **{"log_level": "info", **uvicorn_log_config(), **config})
