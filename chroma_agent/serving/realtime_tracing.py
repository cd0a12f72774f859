"""The Realtime server's OpenTelemetry spans (`tracing.py`): a session is a call
(`chroma.call`, kind "realtime", its id the session's own `sess_...`), the making of its
engine conversation is the admission (`chroma.engine.admission`), and each response is a
turn (`chroma.turn`: its end of speech where the server's VAD saw it, first audio, frames
sent, stop reason, usage, response id). With nothing recording every call is `NO_TRACE`
and each helper here returns at once."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from .tracing import NO_TRACE, CallTrace, NoTrace


def start_call(session_id: str) -> CallTrace | NoTrace:
    """A session's call trace (NO_TRACE when nothing records)."""
    return CallTrace.start("realtime", id=session_id)


def admission(call: CallTrace | NoTrace, engine: Any, fresh: bool, **attributes: Any) -> ContextManager:
    """The span around the wait for an engine conversation, with the engine's load and
    capacity where it has them; none when `fresh` is False (the session's conversation is
    reused: nothing is admitted)."""
    if call is NO_TRACE or not fresh:
        return contextlib.nullcontext()
    return call.admission(load=getattr(engine, "load", None), capacity=getattr(engine, "capacity", None),
                          conversations=getattr(engine, "active", None), **attributes)


def start_turn(call: CallTrace | NoTrace, reply) -> None:
    """`reply`'s (a realtime_reply.Reply) turn span, kept on it as `reply.trace`."""
    if call is NO_TRACE:
        return
    reply.trace = call.turn(speech_end=reply.speech_ended_at, asked_at=reply.asked_at,
                            trigger="server_vad" if reply.speech_ended_at is not None else "client")


def end_turn(reply, status: str, details: dict | None, counts: tuple) -> None:
    """`reply`'s turn ends with the status and usage counts its `response.done` carries
    (input tokens, text tokens, audio frames, ...); once."""
    turn = reply.trace
    if turn.ended:
        return
    voice = reply.voice_reply
    done = voice.done if voice is not None else None
    error = ((details or {}).get("error") or {}).get("message") if status == "failed" else None
    input_tokens, text_tokens, frames = counts[:3]
    turn.end(status, stop_reason=done.stop_reason if done is not None else None, frames=reply.frames_sent,
             response_id=reply.id, input_tokens=input_tokens, output_tokens=text_tokens + frames,
             reply_text=reply.transcript, caller_text=caller_text(voice), error=error)


def caller_text(voice) -> str | None:
    """The caller's words the reply transcribed, when that pass has ended without failing."""
    transcript = voice.transcript if voice is not None else None
    done = getattr(transcript, "result", None)
    return done.text if done is not None and done.error is None else None
