"""One caller's voice session, framework-free: what the OpenAI Realtime session, the Pipecat
service and the LiveKit RealtimeModel each do per call, written once. They translate their
framework's frames and events to and from it.

    session = VoiceSession(model, voice, system_prompt)
    session.push(pcm, rate)                           # the caller's audio, kept at 16 kHz (30 s at most)
    conv = await session.conversation()               # anew when the voice or the prompt changed
    reply = session.reply(conv)
    await reply.respond(audio=[session.take()], trim=True, max_frames=375)   # or reply.say(line)
    async for event in reply:                         # TextDelta, AudioChunk, ..., ResponseDone
        ...                                           # reply.cancel(): nothing more but ResponseDone
    await session.truncate(reply, played_ms)          # the history keeps what the caller heard
    session.close()

`model` is anything with `conversation(voice=..., system_prompt=...)` whose conversations
have `respond`/`say`/`cancel`/`truncate` (optionally `close` and `history_tokens`): a
`ChromaModel`, a `ChromaEngine`, or a test's wrapper. Model work runs in worker threads.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import soxr

from ..events import AudioChunk, PromptTooLong, ResponseDone, TextDelta, TranscriptDelta, TranscriptDone
from ..runtime.vad import VAD_RATE, trim_silence
from .pcm import InputBuffer

MIN_SPEECH_S = 0.1   # the shortest user audio the model takes (USER_LIMITS): less is no audio


class NothingToAnswer(Exception):
    """A reply asked with no audio (or under 100 ms of it, or only silence) and no text."""


def speech_of(pcm: np.ndarray, rate: int = VAD_RATE) -> np.ndarray:
    """`pcm` at 16 kHz with its leading and trailing silence trimmed (empty: no speech). Blocking."""
    if rate != VAD_RATE:
        pcm = soxr.resample(pcm, rate, VAD_RATE)
    return trim_silence(pcm, VAD_RATE)


def answer_turn(conversation: Any, audio: Sequence[np.ndarray] = (), text: str | None = None, *,
                sample_rate: int = VAD_RATE, trim: bool = False, **options) -> Any:
    """`conversation.respond(...)` to a user turn: `audio` pieces (joined; `trim`: its
    silence trimmed) at `sample_rate`, and/or `text`; under 100 ms of audio counts as none.
    Raises NothingToAnswer without either; the conversation's errors (PromptTooLong,
    AudioError) as they are. Blocking (Silero, audio features): run it in a worker thread."""
    pcm = np.concatenate(list(audio)) if len(audio) else np.zeros(0, np.float32)
    if trim and pcm.size:
        pcm, sample_rate = speech_of(pcm, sample_rate), VAD_RATE
    heard = len(pcm) >= sample_rate * MIN_SPEECH_S
    if not heard and not text:
        raise NothingToAnswer("no speech in the audio and no text to answer")
    if trim and heard and options.get("transcribe"):
        options["has_speech"] = True  # Silero just found it: the transcript need not look again
    return conversation.respond(audio=pcm if heard else None, sample_rate=sample_rate, text=text or None, **options)


def close_conversation(conversation: Any) -> None:
    """Close a conversation that has `close()` (an engine's frees its slot; cheap, does not wait)."""
    if conversation is not None and hasattr(conversation, "close"):
        conversation.close()


class VoiceReply:
    """One reply on one conversation: started with `respond()` or `say()`, then iterated with
    `async for`. After `cancel()` it yields nothing but its ResponseDone: the conversation
    drains to it (at most a frame more), so the history stays exact."""

    def __init__(self, session: "VoiceSession", conversation: Any):
        self.session, self.conversation = session, conversation
        self.response: Any = None
        self.cancelled = False
        self.done: ResponseDone | None = None
        self._running = False            # an event has come: the reply's start (which clears a cancel) is past
        self._recancel = False           # cancelled before that: cancel again at the next event
        self.frames = 0                  # AudioChunks yielded
        self.text_tokens = 0             # tokens of the TextDeltas yielded
        self.history_before = 0          # the conversation's history_tokens when it started

    async def respond(self, audio: Sequence[np.ndarray] = (), text: str | None = None, *,
                      sample_rate: int = VAD_RATE, trim: bool = False, **options) -> "VoiceReply":
        """Answer a user turn (see `answer_turn`), started in a worker thread; with the
        session's `transcribe` on, its audio is transcribed beside the reply."""
        if self.session.transcribe and len(audio):
            options.setdefault("transcribe", True)
            options.setdefault("language", self.session.language)
        return await self.start(lambda: answer_turn(self.conversation, audio, text, sample_rate=sample_rate,
                                                    trim=trim, **options))

    async def say(self, line: str, **options) -> "VoiceReply":
        """Speak `line` in the voice (it joins the history as an assistant turn)."""
        return await self.start(lambda: self.conversation.say(line, **options))

    async def start(self, start: Callable[[], Any]) -> "VoiceReply":
        """Start it with `start()` (the conversation's respond/say), run in a worker thread:
        it joins, trims and reads the audio."""
        self.history_before = _history_tokens(self.conversation)
        self.response = await asyncio.to_thread(start)
        return self

    def cancel(self) -> None:
        """Stop it: within a frame it ends (as "cancelled") and nothing but ResponseDone follows."""
        self.cancelled = True
        self._recancel = not self._running
        self.conversation.cancel()

    @property
    def transcript(self) -> Any:
        """The caller's words of the turn it answers (a `Transcript`), when transcribed; else None."""
        return getattr(self.response, "transcript", None)

    @property
    def truncatable(self) -> bool:
        """It ended (not failing), so `truncate()` may cut the history to what was heard of it."""
        return self.done is not None and self.done.stop_reason != "error"

    async def __aiter__(self):
        if self.conversation is self.session.conv:  # a reply started but never run leaves the history as it was
            self.session.last = self
        async for event in self.response:   # each frame is computed in a worker thread
            if self._recancel:  # a cancel before the reply started was cleared by its start
                self._recancel = False
                self.conversation.cancel()
            self._running = True
            if isinstance(event, ResponseDone):
                self.done = event
            elif isinstance(event, (TranscriptDelta, TranscriptDone)):
                pass  # the caller's words: never cut by a cancel of the reply
            elif self.cancelled:
                continue
            elif isinstance(event, TextDelta):
                self.text_tokens += len(event.token_ids)
            elif isinstance(event, AudioChunk):
                self.frames += 1
            yield event

    @property
    def input_tokens(self) -> int:
        """The prompt tokens it added to the history (its own text left out)."""
        return max(0, _history_tokens(self.conversation) - self.history_before - self.text_tokens)


class VoiceSession:
    """One caller's session on `model` in `voice` with `system_prompt`: the conversation (a
    new one when either changes), the caller's input audio, the replies and truncations.

    `system_prompt`: None gives the model's default, "" none. `load_voice(voice)`, run in a
    worker thread, turns `voice` into a `Voice` (e.g. a name looked up in a server's voices).
    `keep_fitting_prompt`: a new prompt too long for the model (PromptTooLong) is refused
    and remembered (not tried again), and the conversation starts anew under the last prompt
    that fit, the refusal left in `take_refusal()`; without it, or with no prompt that fit
    yet, `conversation()` raises it. `input`: the input buffer (a subclass may add a VAD).
    `transcribe` / `language` (changeable any time): each answered audio turn is transcribed
    in that language (a name or an ISO-639-1 code), its events among the reply's.
    """

    def __init__(self, model: Any = None, voice: Any = None, system_prompt: str | None = None, *,
                 load_voice: Callable[[Any], Any] | None = None, keep_fitting_prompt: bool = True,
                 input: InputBuffer | None = None, transcribe: bool = False, language: str = "English"):
        self.model, self.voice, self.system_prompt = model, voice, system_prompt
        self.transcribe, self.language = transcribe, language
        self.load_voice = load_voice
        self.keep_fitting_prompt = keep_fitting_prompt
        self.input = input if input is not None else InputBuffer()
        self.conv: Any = None            # the current conversation
        self.last: VoiceReply | None = None   # its latest reply, the one truncate() may cut
        self.turns = asyncio.Lock()      # replies and truncations, one at a time in call order
        self.closed = False
        self._key: tuple | None = None   # (voice, system_prompt) of the last conversation made
        self._refused: set[tuple] = set()
        self._refusal: PromptTooLong | None = None
        self._making = asyncio.Lock()    # one conversation made at a time

    # -- the caller's audio --
    def push(self, pcm: np.ndarray, rate: int) -> None:
        """Append float32 mono samples at `rate` to the input buffer. Blocking (resampling)."""
        if not self.closed:
            self.input.push(pcm, rate)

    def take(self) -> np.ndarray:
        """The buffered audio at 16 kHz (its latest 30 s), which is then cleared."""
        return self.input.take()

    def clear(self) -> None:
        self.input.clear()

    # -- the conversation --
    async def conversation(self) -> Any:
        """The conversation for the next reply: the current one, or a new one (in a worker
        thread, the old one closed first, freeing its engine slot) when the voice or the
        prompt changed since it was made."""
        async with self._making:
            key = (self.voice, self.system_prompt)
            if key in self._refused:
                key = self._key
            if self.conv is not None and key == self._key:
                return self.conv
            fitted = self._key if self.conv is not None else None
            old, self.conv, self.last = self.conv, None, None
            try:
                return await self._make(key, old)
            except PromptTooLong as e:
                if fitted is None or not self.keep_fitting_prompt:
                    raise
                self._refused.add(key)
                self._refusal = e
                return await self._make(fitted, None)

    def take_refusal(self) -> PromptTooLong | None:
        """The prompt refused by the last `conversation()` that fell back, once."""
        refusal, self._refusal = self._refusal, None
        return refusal

    async def side_conversation(self) -> Any:
        """A new conversation of the current voice and prompt, not the session's (the caller
        closes it): a reply that joins no conversation."""
        return await self._open((self.voice, self.system_prompt), None)

    async def _make(self, key: tuple, old: Any) -> Any:
        self.conv = await self._open(key, old)
        self._key = key
        return self.conv

    async def _open(self, key: tuple, old: Any) -> Any:
        if self.closed:
            raise RuntimeError("the session is closed")
        voice, prompt = key

        def make():
            close_conversation(old)
            kwargs = {} if prompt is None else {"system_prompt": prompt}
            return self.model.conversation(voice=self.load_voice(voice) if self.load_voice else voice, **kwargs)

        making = asyncio.ensure_future(asyncio.to_thread(make))
        try:
            conversation = await asyncio.shield(making)
        except asyncio.CancelledError:  # the thread goes on: close what it makes (an engine slot)
            making.add_done_callback(_close_made)
            raise
        if self.closed:  # closed meanwhile
            close_conversation(conversation)
            raise RuntimeError("the session is closed")
        return conversation

    # -- replies --
    def reply(self, conversation: Any = None) -> VoiceReply:
        """A reply on `conversation` (default: the session's), to start with `respond()`/`say()`."""
        return VoiceReply(self, conversation if conversation is not None else self.conv)

    async def truncate(self, reply: VoiceReply, played_ms: float) -> bool:
        """Cut the history to the `played_ms` the caller heard of `reply`, after the replies
        before it (turn order); only the session's latest reply, once it ended, on the
        conversation it ran on. Returns whether it did; the conversation's errors are raised."""
        async with self.turns:
            if reply is not self.last or not reply.truncatable or self.conv is None or self.closed \
                    or reply.conversation is not self.conv:
                return False
            await asyncio.to_thread(self.conv.truncate, played_ms)
            return True

    def cancel(self) -> None:
        """Stop the latest reply (see VoiceReply.cancel)."""
        if self.last is not None and self.last.done is None:
            self.last.cancel()

    def close(self) -> None:
        """End the session: no new conversation; the current one is closed (its running reply
        cancelled, its engine slot freed). Idempotent; cheap."""
        self.closed = True
        conv, self.conv = self.conv, None
        close_conversation(conv)


def _history_tokens(conversation: Any) -> int:
    tokens = getattr(conversation, "history_tokens", 0)  # not part of the minimal conversation API
    return tokens if isinstance(tokens, int) else 0


def _close_made(making: asyncio.Future) -> None:
    if not making.cancelled() and making.exception() is None:
        close_conversation(making.result())
