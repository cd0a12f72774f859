"""OpenTelemetry spans of `ChromaSpeechToSpeechService`, inside Pipecat's own traces.

When the pipeline traces (`PipelineWorker(enable_tracing=True)` with a recording tracer
provider), each reply is a `chroma.turn` span (`chroma_agent.serving.tracing`) under
Pipecat's current `turn` span, or under its `conversation` span between turns, as
Pipecat's realtime services place their spans (`traced_openai_realtime`: the turn's
context, else the conversation's); each conversation the model opens (an engine's slot) is a
`chroma.engine.admission` span under the conversation. A pipeline that does not trace, or
a process where nothing records, gets nothing (`NO_TRACE`): no span, no work per frame.

    traces = ReplyTraces()
    if traces.setup(enabled, tracing_context):        # the service's setup(): AIService's fields
        session.model = traces.admitting(session.model)
    traces.start(asked_at=stopped_at, speech_end=vad_end)   # a reply asked (wall-clock times)
    traces.first_audio()                              # its first audio frame pushed
    traces.end(voice_reply, failure)                  # it ended; close() at the pipeline's end
"""
from __future__ import annotations

import time
from typing import Any

from chroma_agent.serving.tracing import NO_TRACE, NO_TURN, CallTrace, monotonic_of, tracing_on
from chroma_agent.serving.voice_session import NothingToAnswer, VoiceReply

__all__ = ["ReplyTraces"]


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ReplyTraces:
    """One service's spans: its replies' `chroma.turn`s, one open at a time (the service
    runs one reply at a time), and its conversations' admissions."""

    def __init__(self):
        self.context = None          # Pipecat's TracingContext, when the pipeline traces
        self.turn = NO_TURN          # the running reply's span
        self._asked = 0.0            # when it was asked (time.time(): Pipecat's TTFB start)
        self._call, self._parent = NO_TRACE, None

    def setup(self, enabled: bool, tracing_context) -> bool:
        """The pipeline's tracing (AIService's `_tracing_enabled` / `_tracing_context`):
        whether this service's replies are traced."""
        self.context = tracing_context if enabled and tracing_context is not None and tracing_on() else None
        return self.context is not None

    def call(self) -> CallTrace | Any:
        """The call's trace, under Pipecat's conversation span; NO_TRACE without one."""
        context = self.context
        parent = context.get_conversation_context() if context is not None else None
        if parent is None:   # never a span of our own outside Pipecat's conversation
            return NO_TRACE
        if parent is not self._parent:   # a new conversation span (its context is made once)
            self._call, self._parent = CallTrace.start("pipecat", parent=parent), parent
        return self._call

    def start(self, *, asked_at: float, speech_end: float | None = None) -> None:
        """A reply asked at `asked_at` (time.time()), for speech that ended at `speech_end`
        (time.time(), or None for a text turn or a scripted line): its span, under Pipecat's
        current turn, starting at the end of speech."""
        self.close()
        call = self.call()
        if call is NO_TRACE:
            return
        self._asked = asked_at
        self.turn = call.turn(speech_end=monotonic_of(speech_end), asked_at=monotonic_of(asked_at),
                              parent=self.context.get_turn_context(),
                              trigger="turn_detector" if speech_end is not None else None)

    def first_audio(self) -> None:
        """The reply's first audio frame was pushed: `metrics.ttfb` is the service's TTFB."""
        if not self.turn.ended:
            self.turn.first_audio(model_s=time.time() - self._asked)

    def end(self, voice: VoiceReply, failure: BaseException | None = None) -> None:
        """The reply ended (its ResponseDone, or `failure`): status, stop reason, frames."""
        turn, self.turn = self.turn, NO_TURN
        if turn.ended:
            return
        done = voice.done
        stop = done.stop_reason if done is not None else None
        error = str(failure) if failure is not None else (done.error if done is not None else None)
        if isinstance(failure, NothingToAnswer):
            status, stop = "incomplete", "nothing_to_answer"
        elif failure is not None or stop == "error":
            status = "failed"
        elif voice.cancelled or stop in ("cancelled", None):   # an interruption (None: the pipeline ended)
            status = "cancelled"
        else:
            status = "completed"
        # token counts where the conversation has them (history_tokens: not the minimal API)
        counted = done is not None and _count(getattr(voice.conversation, "history_tokens", None)) is not None
        transcript = getattr(voice.transcript, "result", None)
        turn.end(status, stop_reason=stop, frames=voice.frames, error=error,
                 input_tokens=voice.input_tokens if counted else None,
                 output_tokens=voice.text_tokens if counted else None,
                 reply_text=done.text if done is not None else None, caller_text=getattr(transcript, "text", None))

    def close(self) -> None:
        """A reply still open (its task cancelled, the pipeline ended) ends as cancelled."""
        turn, self.turn = self.turn, NO_TURN
        if not turn.ended:
            turn.end("cancelled")

    def admitting(self, model: Any) -> "AdmittedModel":
        """`model` with each new conversation (the engine's admission) traced."""
        return AdmittedModel(model, self)


class AdmittedModel:
    """A model whose `conversation(...)` (an engine's slot: a `CapacityError` when full)
    is a `chroma.engine.admission` span, with the engine's open conversations and capacity;
    everything else is the model's."""

    def __init__(self, model: Any, traces: ReplyTraces):
        self.model, self.traces = model, traces

    def conversation(self, **kwargs) -> Any:
        model = self.model
        with self.traces.call().admission(active=_count(getattr(model, "active", None)),
                                          capacity=_count(getattr(model, "capacity", None))):
            return model.conversation(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
