"""Caller transcripts in the Realtime protocol: with `audio.input.transcription` set in
`session.update`, each user audio item committed from the input buffer (a client's
`input_audio_buffer.commit` or the server VAD's) gets its
`conversation.item.input_audio_transcription.delta` events and then one `.completed` (the
whole `transcript`, token `usage`) or `.failed` (an `error`; that item only, the session
goes on), and the kept item's `input_audio.transcript` is set, for
`conversation.item.retrieve`. The model's own reasoner writes them (runtime/transcription.py).

Which pass makes an item's transcript, so that the audio tower runs once a turn in the
usual case (one committed item answered by one reply):

- the reply that answers it, when the item is the only audio that reply hears: its events
  come among the reply's, as they are made, also after a `response.cancel`;
- a pass of its own (`conversation.transcribe`) when a reply hears it together with other
  audio items, when that reply cannot start, or when no reply has taken it
  `ALONE_AFTER_S` after its commit while no reply is about to (e.g. `turn_detection: null`
  and no `response.create`, or `create_response: false`);
- none for an item with under 100 ms of speech: its transcript is "" at once. Silence or
  noise is an empty transcript, never a failure.

Transcript text is personal data: it goes to the client only, never to the log.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from ..events import TranscriptDelta, TranscriptDone
from ..runtime.vad import VAD_RATE
from . import realtime_protocol as rp
from .log_safety import printable
from .realtime_protocol import event
from .voice_session import MIN_SPEECH_S

log = logging.getLogger(__name__)

ALONE_AFTER_S = 1.0   # clients that commit by hand send response.create within milliseconds


@dataclass
class ItemTranscript:
    """One committed item's transcript as it is sent: its 16 kHz audio, the transcript
    events handed on so far, and whether its last event (completed or failed) is out."""

    item_id: str
    audio: np.ndarray
    seen: int = 0
    ended: bool = False


def transcription_usage(done: TranscriptDone) -> dict:
    """The `.completed` event's token usage (the SDK's `UsageTranscriptTextUsageTokens`)."""
    return {"type": "tokens", "input_tokens": done.input_tokens, "output_tokens": done.output_tokens,
            "total_tokens": done.input_tokens + done.output_tokens,
            "input_token_details": {"audio_tokens": done.audio_tokens,
                                    "text_tokens": done.input_tokens - done.audio_tokens}}


def no_words() -> TranscriptDone:
    """The transcript of an item without speech enough for a pass: empty, not an error."""
    return TranscriptDone("", 0, "", False)


def failed(message: str) -> TranscriptDone:
    return TranscriptDone("", 0, "", False, error=message)


class InputTranscripts:
    """The transcripts of one Realtime session's committed user audio items."""

    def __init__(self, session):   # session: the realtime_session.Session
        self.session = session
        self.wanted: set[str] = set()          # committed while transcription was on, no pass chosen yet
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.tasks: set[asyncio.Task] = set()

    # -- which pass --
    def committed(self, item_id: str) -> None:
        """A user audio item was committed: it is transcribed if the session says so now."""
        if self.session.voice_session.transcribe:
            self.wanted.add(item_id)
            self._arm(item_id)

    def forget(self, item_id: str) -> None:
        """No pass is to be chosen for the item any more: one was, or it was deleted (then it has none)."""
        self.wanted.discard(item_id)
        timer = self.timers.pop(item_id, None)
        if timer is not None:
            timer.cancel()

    def for_reply(self, taken: list[tuple[str, np.ndarray]]) -> ItemTranscript | None:
        """A reply takes these pending items (id, 16 kHz audio): the item whose transcript
        the reply makes (it is the one audio the reply hears), or None; the other wanted
        items are transcribed on their own."""
        mine = [ItemTranscript(item_id, audio) for item_id, audio in taken if item_id in self.wanted]
        for item in mine:
            self.forget(item.item_id)
        heard = [item_id for item_id, audio in taken if audio.size]
        by_reply = next((item for item in mine if heard == [item.item_id]), None)
        self.alone([item for item in mine if item is not by_reply])
        return by_reply

    def _arm(self, item_id: str) -> None:
        self.timers[item_id] = asyncio.get_running_loop().call_later(ALONE_AFTER_S, self._check, item_id)

    def _check(self, item_id: str) -> None:
        """ALONE_AFTER_S after the commit: a reply about to take the item makes its
        transcript; if none is, a pass of its own does."""
        self.timers.pop(item_id, None)
        if item_id not in self.wanted:
            return
        pending = {entry[0]: entry[1] for entry in self.session.pending}
        if item_id not in pending:
            return self.forget(item_id)
        reply = self.session.active
        if reply is not None and not reply.out_of_band and not reply.took_input and not reply.finished:
            return self._arm(item_id)
        self.forget(item_id)
        chunks = pending[item_id]
        self.alone([ItemTranscript(item_id, np.concatenate(chunks) if chunks else np.zeros(0, np.float32))])

    # -- passes of their own --
    def alone(self, items: list[ItemTranscript]) -> None:
        """Transcribe each of `items` on its own (in order, in a task of its own)."""
        if items and not self.session.closed:
            task = asyncio.create_task(self._alone(items))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug: this session's transcripts alone
            log.error("session %s: a transcript task failed", self.session.config.id, exc_info=task.exception())

    async def _alone(self, items: list[ItemTranscript]) -> None:
        for item in items:
            if item.audio.size < MIN_SPEECH_S * VAD_RATE:
                await self.on_event(item, no_words())
                continue
            try:
                conv = await self.session.transcript_conversation()
                transcript = await asyncio.to_thread(conv.transcribe, item.audio, VAD_RATE,
                                                     language=self.session.voice_session.language)
            except Exception as e:  # noqa: BLE001 - one item's transcript fails, the session goes on
                await self.on_event(item, failed(str(e) or type(e).__name__))
                continue
            await self.follow(item, transcript)

    async def follow(self, item: ItemTranscript, transcript) -> None:
        """Hand on `transcript`'s (a runtime `Transcript`) events from the first not yet sent."""
        events = 0
        async for out in transcript:
            events += 1
            if events > item.seen:
                await self.on_event(item, out)

    def follow_rest(self, item: ItemTranscript, transcript) -> None:
        """A reply's stream ended (or broke) before its transcript did: the rest comes from
        its handle (the pass goes on without the reply)."""
        if not item.ended and transcript is not None and not self.session.closed:
            task = asyncio.create_task(self.follow(item, transcript))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)

    # -- the events --
    async def on_event(self, item: ItemTranscript, out: TranscriptDelta | TranscriptDone) -> None:
        """One transcript event of `item` as the protocol's event."""
        if item.ended:
            return
        item.seen += 1
        where = {"item_id": item.item_id, "content_index": 0}
        if isinstance(out, TranscriptDelta):
            if out.text:
                await self.session.send(event("conversation.item.input_audio_transcription.delta", **where,
                                              delta=out.text))
            return
        item.ended = True
        self.session.metrics.transcript("failed" if out.error is not None else "completed")
        if out.error is not None:
            log.info("session %s: the transcript of %s failed: %s", self.session.config.id, item.item_id,
                     printable(out.error, 200))
            error = {"type": "transcription_error", "code": "transcription_failed", "message": out.error[:500],
                     "param": None}
            await self.session.send(event("conversation.item.input_audio_transcription.failed", **where, error=error))
            return
        if item.item_id in self.session.items:  # kept (not deleted): retrieve gives its words
            self.session.items.put(rp.user_audio_item(item.item_id, out.text))
        await self.session.send(event("conversation.item.input_audio_transcription.completed", **where,
                                      transcript=out.text, usage=transcription_usage(out)))

    def close(self) -> None:
        """The session ended: nothing more is sent (the passes running end on their own)."""
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        self.wanted.clear()
        for task in list(self.tasks):
            task.cancel()
