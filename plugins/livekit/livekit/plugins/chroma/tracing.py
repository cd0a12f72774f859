"""OpenTelemetry spans for the plugin: a `chroma.turn` (chroma_agent.serving.tracing) per
reply of a realtime session and per TTS synthesis, inside LiveKit's own spans, with the
plugin's Prometheus numbers for each synthesis (metrics.py).

A realtime reply: LiveKit opens its `agent_turn` (and, beside our span, its
`realtime_inference`, which is never made current) only once the plugin has created the
reply, in the task that reads it. So a reply's span is made when LiveKit starts reading its
message stream (`ReplyTrace.messages`), under the context that reading starts in: the
`agent_turn`. A reply LiveKit never read ends under the context the session was made in.
LiveKit's `realtime_inference` span takes its `gen_ai.usage.*`, time to first chunk and
`lk.realtime_model_metrics` from the RealtimeModelMetrics the session emits (realtime.py),
matched by the response id.

A TTS synthesis runs in LiveKit's `tts_request_run` span (under `tts_node`): its span goes
under the current context.

No room, participant or words go on a span (words only with the GenAI content opt-in, which
chroma_agent.serving.tracing checks). Nothing records without a recording tracer provider:
then every trace here is `NO_TRACE`'s, at no cost.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from chroma_agent.serving.tracing import NO_TRACE, NO_TURN, CallTrace, monotonic_of, tracing_on

from .metrics import reply_ended


def _here() -> Any:
    """The current call: none of its own (LiveKit's spans are the call), turns under the current context."""
    if not tracing_on():
        return NO_TRACE
    from opentelemetry import context

    return CallTrace.start("livekit", parent=context.get_current())


def session_trace() -> Any:
    """A realtime session's call, made where the session is made; NO_TRACE when nothing records."""
    return _here()


class ReplyTrace:
    """One realtime reply's `chroma.turn`: made when its reader starts (`messages`), or at its
    end if nothing read it. Times are time.time() readings, as the session keeps them."""

    def __init__(self, call: Any, asked_at: float, trigger: str) -> None:
        self.call, self.asked_at, self.trigger = call, asked_at, trigger
        self.turn: Any = None
        self.audio: tuple[float, float] | None = None   # (first audio at, the model's time to it)

    def messages(self, channel: AsyncIterable[Any]) -> AsyncIterable[Any]:
        """The reply's message stream as LiveKit gets it."""
        return channel if self.call is NO_TRACE else _Reading(channel, self)

    def opened(self, parent: Any) -> None:
        """Start the span under `parent` (an OpenTelemetry Context), once."""
        if self.turn is not None or self.call is NO_TRACE:
            return
        from opentelemetry import trace

        asked_at: float | None = monotonic_of(self.asked_at)
        parent_start = getattr(trace.get_current_span(parent), "start_time", None)  # an SDK span's
        if parent_start and parent_start > self.asked_at * 1e9:
            asked_at = None   # now, never before its parent: LiveKit opens its turn once the reply exists
        self.turn = self.call.turn(asked_at=asked_at, parent=parent, trigger=self.trigger)
        if self.audio is not None:
            self.first_audio(*self.audio)

    def first_audio(self, at: float, model_s: float) -> None:
        """The first audio frame, at `at`, `model_s` after the model's response began."""
        self.audio = (at, model_s)
        if self.turn is not None:
            self.turn.first_audio(at=monotonic_of(at), model_s=model_s)

    def end(self, status: str, **fields: Any) -> None:
        """The reply ended: `status` and TurnTrace.end's fields."""
        if self.call is NO_TRACE:
            return
        self.opened(self.call.context)
        self.turn.end(status, **fields)


class _Reading:
    """A reply's messages, whose first reader's context parents the reply's span: LiveKit
    starts reading in its `agent_turn`."""

    def __init__(self, channel: AsyncIterable[Any], reply: ReplyTrace) -> None:
        self.channel, self.reply = channel, reply

    def __aiter__(self) -> AsyncIterator[Any]:
        from opentelemetry import context

        self.reply.opened(context.get_current())
        return self.channel.__aiter__()


class SynthesisTrace:
    """One TTS synthesis, from `start()` (its first line) to the end of its `with` block: its
    `chroma.turn` under the current context and the plugin's Prometheus numbers (time to
    first audio, frames, status). Not started: nothing is recorded."""

    def __init__(self) -> None:
        self.turn: Any = None
        self.asked_at = 0.0
        self.first_audio_at: float | None = None
        self.frames = 0
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.text: list[str] = []

    def start(self) -> None:
        """Its first line is asked for now (once)."""
        if self.turn is None:
            self.asked_at = time.monotonic()
            call = _here()
            self.turn = NO_TURN if call is NO_TRACE else call.turn(asked_at=self.asked_at, trigger="tts")

    def frame(self) -> None:
        """An 80 ms frame went out."""
        self.frames += 1
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
            self.turn.first_audio(at=self.first_audio_at)

    def done(self, stop_reason: str, error: str | None = None) -> None:
        """A line's ResponseDone: the last one's stop reason is the synthesis's."""
        self.stop_reason = stop_reason
        self.error = error or self.error

    def __enter__(self) -> "SynthesisTrace":
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        """The synthesis ended; `error`: what stopped it (CancelledError: it was closed)."""
        if self.turn is None:
            return
        if isinstance(error, asyncio.CancelledError) or self.stop_reason == "cancelled":
            status = "cancelled"
        elif error is not None or self.stop_reason == "error":
            status = "failed"
        else:
            status = "completed"
        reply_ended(self.asked_at, self.first_audio_at, self.frames, status)
        self.turn.end(status, stop_reason=self.stop_reason or ("cancelled" if status == "cancelled" else None),
                      frames=self.frames, reply_text=" ".join(self.text) or None,
                      error=self.error or (None if error is None else f"{type(error).__name__}: {error}"))
