"""One Realtime response: what it is (`Reply`), how it starts on an engine conversation
(`start_reply`, the voice session's `answer_turn`) and how its events become the
protocol's output events (`stream_reply`)."""
from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..events import AudioChunk, TextDelta, TranscriptDelta, TranscriptDone
from ..model.audio import AudioError
from ..runtime.vad import VAD_RATE
from . import realtime_protocol as rp
from .realtime_audio import To8k
from .realtime_protocol import event
from .realtime_responses import input_audio_tokens
from .realtime_transcripts import no_words
from .tracing import NO_TURN
from .voice_session import NothingToAnswer, VoiceReply, answer_turn

FRAME_MS = 80
LATE_S = FRAME_MS / 1000   # a frame sent over a frame past its time to play: a client's one-frame buffer ran dry


# -- one reply ---------------------------------------------------------------------------

@dataclass
class Reply:
    """One response: its ids, the client's metadata, and what has been sent of it."""

    id: str = field(default_factory=lambda: rp.new_id("resp"))
    item_id: str = field(default_factory=lambda: rp.new_id("item"))
    metadata: Any = None
    extra: str = ""                  # per-response instructions beyond the session's
    max_frames: int = 375            # the server's cap, or the client's max_output_tokens (one per frame)
    cancel_reason: str | None = None
    audio_ms: int = 0                # audio sent to the client
    transcript: str = ""
    finished: bool = False
    task: asyncio.Task | None = None
    out_of_band: bool = False        # response.conversation "none": its output joins no conversation
    given: tuple | None = None       # an out-of-band reply's own input (audio, text), else the pending input's
    took_input: bool = False         # it has its input (the pending input taken): later commits wait for the next
    voice_reply: VoiceReply | None = None   # what it runs as on its conversation, once it has one
    asked_at: float = field(default_factory=time.monotonic)   # its time to first audio counts from here
    speech_ended_at: float | None = None    # when the caller's last speech arrived (a server-VAD turn)
    frames_sent: int = 0             # audio frames that reached the client (set when its stream ends)
    trace: Any = NO_TURN             # its turn span (realtime_tracing), when traces are on

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        if self.voice_reply is not None:
            self.voice_reply.cancel()  # ends within a frame; the stream drains to response.done


def start_reply(conv, audio: list[np.ndarray], text: str, max_frames: int, **options):
    """The conversation's reply to the pending input: audio (each piece already cut to its
    speech) and/or text; `options` (transcribe, language) when it transcribes its audio.
    Blocking (audio features): run in a thread. (A module function:
    benchmarks/bench_realtime.py times it.)"""
    return answer_turn(conv, audio, text, sample_rate=VAD_RATE, max_frames=max_frames, **options)


async def stream_reply(session, reply: Reply, cfg: rp.SessionConfig, voice: VoiceReply):
    """`reply`, running as `voice` on its conversation, streamed to `session`'s client as the
    Realtime output events; an out-of-band one joins no conversation. (status,
    status_details, output, usage counts)."""
    in_band, conv = not reply.out_of_band, voice.conversation
    audio, text, taken = (*reply.given, []) if reply.given is not None else session.pending_input(take=in_band)
    reply.took_input = True
    # the committed item it hears alone is transcribed by this reply (one audio-tower pass)
    words = session.transcripts.for_reply(taken if in_band else [])
    options = {"transcribe": True, "language": session.voice_session.language} if words else {}
    text = "\n".join(t for t in (text, reply.extra) if t)
    reply.voice_reply = voice
    if reply.cancel_reason is not None:
        voice.cancel()
    try:
        await voice.start(lambda: start_reply(conv, audio, text, reply.max_frames, **options))
    except NothingToAnswer:
        if words:
            await session.transcripts.on_event(words, no_words())
        return "completed", None, [], (0, 0, 0)
    except (AudioError, ValueError) as e:  # ValueError: e.g. conversation.PromptTooLong
        session.transcripts.alone([words] if words else [])  # its words, from a pass of their own
        return "failed", {"type": "failed", "error": {"type": "invalid_request_error", "message": str(e)}}, \
            [], (0, 0, 0)
    except Exception:
        session.transcripts.alone([words] if words else [])
        raise
    if words and voice.transcript is None:  # under 100 ms of audio: the reply heard none
        await session.transcripts.on_event(words, no_words())
        words = None

    item_id, fmt = reply.item_id, cfg.output_format
    where = {"response_id": reply.id, "item_id": item_id, "output_index": 0, "content_index": 0}
    item = rp.assistant_item(item_id, "in_progress")
    previous = session.items.last()
    if in_band:
        session.items.put(item)
        session.last = reply
    await session.send(event("response.output_item.added", response_id=reply.id, output_index=0, item=item))
    if in_band:
        await session.send(event("conversation.item.added", previous_item_id=previous, item=item))
    await session.send(event("response.content_part.added", **where, part={"type": "audio", "transcript": ""}))
    resampler = None if fmt["type"] == "audio/pcm" else To8k()
    sent = late = dropped = 0
    first = None   # when its first frame went out: frame n is due to play FRAME_MS * n later
    try:
        async for out in voice:  # after a cancel: only the caller's words and its ResponseDone
            if isinstance(out, AudioChunk):
                pcm = out.pcm if resampler is None else resampler(out.pcm)
                delta = rp.encode_audio(pcm, fmt)
                reply.audio_ms += FRAME_MS
                await session.send(event("response.output_audio.delta", **where,
                                         delta=base64.b64encode(delta).decode()))
                if session.closed:  # not sent: the client went away
                    dropped += 1
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                    _first_audio(session.metrics, reply, now)
                elif now - first > sent * FRAME_MS / 1000 + LATE_S:
                    late += 1
                sent += 1
            elif isinstance(out, TextDelta):
                reply.transcript += out.text
                await session.send(event("response.output_audio_transcript.delta", **where, delta=out.text))
            elif isinstance(out, (TranscriptDelta, TranscriptDone)) and words:  # the caller's words, as they come
                await session.transcripts.on_event(words, out)
    finally:
        session.metrics.frames(sent=sent, late=late, dropped=dropped)   # once per reply: cheap per frame
        reply.frames_sent = sent
        if words:
            session.transcripts.follow_rest(words, voice.transcript)
    done = voice.done
    stop = done.stop_reason if done is not None else "error"
    if reply.cancel_reason is not None or stop == "cancelled":
        status, details = "cancelled", {"type": "cancelled", "reason": reply.cancel_reason or "client_cancelled"}
    elif stop == "max_frames" and reply.max_frames < session.server.max_frames:  # the client's own cap
        status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    elif stop == "error":
        status, details = "failed", {"type": "failed", "error": {
            "type": "server_error", "message": (done.error if done else None) or "the reply failed"}}
    else:
        status, details = "completed", None
    final = rp.assistant_item(item_id, "completed" if status == "completed" else "incomplete", reply.transcript)
    if in_band and item_id in session.items:
        session.items.put(final)
    await session.send(event("response.output_audio.done", **where))
    await session.send(event("response.output_audio_transcript.done", **where, transcript=reply.transcript))
    await session.send(event("response.content_part.done", **where,
                          part={"type": "audio", "transcript": reply.transcript}))
    await session.send(event("response.output_item.done", response_id=reply.id, output_index=0, item=final))
    if in_band:
        await session.send(event("conversation.item.done", previous_item_id=previous, item=final))
    frames = reply.audio_ms // FRAME_MS
    counted = not getattr(conv, "closed", False) and (session.conv is conv or not in_band)
    input_tokens = max(0, voice.input_tokens - frames) if counted else 0
    return status, details, [final], (input_tokens, voice.text_tokens, frames, input_audio_tokens(audio))


def _first_audio(metrics, reply: Reply, now: float) -> None:
    """The reply's first audio is out: its time to first audio, and end of speech -> first
    audio where the server's VAD saw the end."""
    metrics.first_audio(now - reply.asked_at)
    reply.trace.first_audio(at=now)
    if reply.speech_ended_at is not None:
        metrics.speech_end_to_first_audio(now - reply.speech_ended_at)
