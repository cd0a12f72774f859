"""The caller's words for LiveKit: each answered audio turn's transcript (Chroma's
`TranscriptDelta`s and `TranscriptDone`, among its reply's events) as
`input_audio_transcription_completed` events on that turn's user message item, the way
LiveKit's OpenAI realtime model reports them: interim events carry the text so far, one
final event the whole text, and AgentSession adds the final one to its history.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from chroma_agent.events import TranscriptDelta, TranscriptDone
from livekit.agents import llm, utils

from .log import logger

TRANSCRIPT_WAIT_S = 30.0  # how long a transcript left running by a failed reply is waited for


@dataclass
class UserTurn:
    """One answered audio turn's user message: its item id, when it was committed (the
    caller had stopped speaking; LiveKit places the message there, before its reply) and
    its transcript so far. `event()` turns each Chroma transcript event into LiveKit's."""

    committed_at: float
    item_id: str = field(default_factory=lambda: utils.shortuuid("item_"))
    text: str = ""
    seen: int = 0        # transcript events taken, to resume from the transcript handle
    final: bool = False  # its last event is taken: nothing more is reported

    def event(self, event: TranscriptDelta | TranscriptDone) -> llm.InputTranscriptionCompleted | None:
        """LiveKit's event for `event`, or None when there is nothing to report."""
        self.seen += 1
        if self.final:
            return None
        if isinstance(event, TranscriptDelta):
            if not event.text:
                return None
            self.text += event.text
            return llm.InputTranscriptionCompleted(item_id=self.item_id, transcript=self.text, is_final=False)
        return self.end(event.text, event.error)

    def end(self, text: str, error: str | None = None) -> llm.InputTranscriptionCompleted | None:
        """The final event: `text` ("" for silence), or after a failed pass (`error`) what
        had streamed (none when nothing had: the turn then has no user message)."""
        self.final = True
        if error is not None:
            # the failure only, never the words (personal data); the reply and the call go on
            logger.warning("the caller's transcript of a turn failed: %s", error)
            if not self.text:
                return None
            text = self.text  # as LiveKit's OpenAI model does: close the interim stream with it
        return llm.InputTranscriptionCompleted(item_id=self.item_id, transcript=text, is_final=True,
                                               turn_started_at=self.committed_at)

    def message(self, transcript: str) -> llm.ChatMessage:
        """The user message of the turn, as AgentSession records it."""
        return llm.ChatMessage(role="user", content=[transcript], id=self.item_id, created_at=self.committed_at)
