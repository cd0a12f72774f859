"""The events of a reply and the errors a conversation raises, with no torch or framework
behind them: adapters and servers import these without loading the model's libraries.

    async for event in conv.respond(...):   # TextDelta, AudioChunk, ..., then ResponseDone
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextDelta:
    """Reasoner text, as soon as its tokens exist (before the audio that speaks them).

    The deltas of a reply join to exactly its whole text: a character split across tokens
    (accents, CJK, emoji) is held back until complete. `token_ids` are the tokens this text
    completes: the frame's own, plus any held back from earlier frames."""

    text: str
    token_ids: list[int]


@dataclass
class AudioChunk:
    """One 80 ms frame of the reply: `pcm` float32 mono at `sample_rate` (1920 samples)."""

    pcm: np.ndarray
    frame_index: int
    sample_rate: int = 24000


@dataclass
class ResponseStats:
    """Timings of one reply. `time_to_first_audio_s` runs from the respond()/say() call (the
    end of the user's audio) to the first chunk out; `real_time_factor` is generation time
    over audio time (below 1: faster than real time)."""

    time_to_first_audio_s: float | None = None
    frames: int = 0
    audio_s: float = 0.0
    generation_s: float = 0.0
    real_time_factor: float = 0.0
    frame_ms: list[float] = field(default_factory=list)


@dataclass
class ResponseDone:
    """The last event of a reply. `stop_reason`: "eos", "max_frames", "cancelled", or
    "error" (an engine conversation's reply that failed on its own: `error` says why)."""

    text: str
    stop_reason: str
    stats: ResponseStats
    error: str | None = None


@dataclass
class TranscriptDelta:
    """Caller transcript text of user turn `turn`, as soon as its tokens exist. The deltas
    of a transcript join to exactly its `TranscriptDone.text` (split characters held back)."""

    text: str
    turn: int


@dataclass
class TranscriptDone:
    """The last event of a user turn's transcript: its whole `text` ("" for silence or a
    turn with no words), the `language` asked, `truncated` when it hit the token limit, and
    `error` when the pass failed (`text` is then what was transcribed before the failure)."""

    text: str
    turn: int
    language: str
    truncated: bool
    error: str | None = None
    input_tokens: int = 0      # the recognition prompt's tokens (audio included)
    audio_tokens: int = 0      # of which audio
    output_tokens: int = 0     # the transcript's tokens


class PromptTooLong(ValueError):
    """A prompt that cannot fit `max_history_tokens` even with all the history dropped,
    refused before anything changes: the conversation goes on as if it had not been asked.
    `tokens`: the prompt's; `limit`: the most it may have (a system prompt: half of
    `max_history_tokens`; a turn: `max_history_tokens` less the system prompt's tokens)."""

    def __init__(self, what: str, tokens: int, limit: int, max_history_tokens: int):
        super().__init__(f"{what} is {tokens} tokens, over its limit of {limit} (max_history_tokens="
                         f"{max_history_tokens}): shorten it, or give the conversation a larger max_history_tokens")
        self.tokens, self.limit = tokens, limit


class ReplyError(RuntimeError):
    """A failure confined to one reply, raised by its frame source (the engine's): the
    reply ends with ResponseDone(stop_reason="error") instead of an exception."""
