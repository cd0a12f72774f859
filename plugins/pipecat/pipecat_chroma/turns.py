"""What `ChromaSpeechToSpeechService` keeps of each user turn's audio (`TurnAudio`) and of
each reply (`ReplyState`), and what it reads of the context's turns: plain state, no frames
pushed from here."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pipecat.frames.frames import InputAudioRawFrame, UserAudioRawFrame
from pipecat.processors.aggregators.llm_context import standard_message_text

from chroma_agent.serving.voice_session import VoiceReply

from .transcripts import TranscriptRelay

__all__ = ["ReplyState", "TurnAudio", "system_texts", "unanswered_user_texts"]


@dataclass
class ReplyState:
    """One reply of the conversation and what the caller has heard of it."""

    voice: VoiceReply             # the reply on the voice session (cancel() drains it: the history stays exact)
    interruptible: bool = True    # False: a TTSSpeakFrame with interruptible=False, heard in full
    transcript: TranscriptRelay | None = None   # the caller's words of the turn it answers, when transcribed
    settled: bool = False         # heard in full, or already truncated
    pushed_ms: float = 0.0        # audio pushed downstream
    playing_since: float | None = None   # the output transport's first BotStartedSpeakingFrame

    @property
    def cancelled(self) -> bool:
        return self.voice.cancelled

    @property
    def done(self) -> bool:
        """It ended (ResponseDone)."""
        return self.voice.done is not None

    def played_ms(self) -> float:
        """Audio pushed is not audio played: the transport plays it in real time."""
        if self.playing_since is None:
            return 0.0
        return min((time.monotonic() - self.playing_since) * 1000, self.pushed_ms)


class TurnAudio:
    """`InputAudioRawFrame`s and their duration, trimmed from the oldest."""

    def __init__(self):
        self.frames: deque[InputAudioRawFrame] = deque()
        self.secs = 0.0

    def append(self, frame: InputAudioRawFrame):
        self.frames.append(frame)
        self.secs += frame.num_frames / frame.sample_rate

    def trim(self, max_secs: float) -> float:
        """Drop the oldest frames past `max_secs`; returns the seconds dropped."""
        dropped = 0.0
        while self.frames and self.secs > max_secs:
            old = self.frames.popleft()
            secs = old.num_frames / old.sample_rate
            self.secs -= secs
            dropped += secs
        return dropped

    @property
    def user_id(self) -> str:
        """Who spoke, as Pipecat's STT services name them: the `user_id` of a
        `UserAudioRawFrame` (Daily, LiveKit), "" for plain input audio (SmallWebRTC, Twilio)."""
        last = self.frames[-1] if self.frames else None
        return last.user_id if isinstance(last, UserAudioRawFrame) else ""

    def pcm(self) -> tuple[np.ndarray, int]:
        """int16 samples [n, channels] at the latest frame's rate (frames at another rate are left out)."""
        rate, channels = self.frames[-1].sample_rate, self.frames[-1].num_channels
        pcm = np.frombuffer(b"".join(f.audio for f in self.frames if f.sample_rate == rate), np.int16)
        return pcm.reshape(-1, channels), rate


def system_texts(messages) -> list[str]:
    """The text of each system message in `messages`."""
    return [standard_message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "system"]


def unanswered_user_texts(messages, answered) -> list[tuple[dict, str]]:
    """(message, text) of the user messages with text after the last assistant message or
    message in `answered` (compared by identity), oldest first."""
    pending = []
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" or any(message is m for m in answered):
            break
        if role == "user" and (text := standard_message_text(message).strip()):
            pending.insert(0, (message, text))
    return pending
