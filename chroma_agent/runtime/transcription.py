"""Caller transcripts from the reasoner itself: a side pass over a user audio turn with
Qwen2.5-Omni's documented speech-recognition prompt, so no second model is needed.

    for event in transcribe(model, turn.input_features, turn.feature_attention_mask, turn=3):
        ...  # TranscriptDelta(text, turn) ..., then TranscriptDone(text, turn, language, truncated)

The prompt is rendered with the checkpoint's own chat template and tokenizer and reuses the
turn's Whisper features (no feature extraction here) and, when the reply's prefill has run
the audio tower on them already, its output (`ReasonerInput.audio_embeds`): the tower runs
once per turn. The pass runs greedily on a `Reasoner` of its own, so a conversation's KV
cache is never touched, and stops at the model's im_end / eos tokens or after `max_tokens`
tokens (then `truncated`). Its text is streamed through the incremental detokenizer: the
deltas join to exactly the final text.

A `TranscriptPass` is the pass as a state machine that its driver steps: a lone
conversation between its reply's frames, the engine as reasoner rows batched with the
tick's other reasoner work (engine.py). Its `Transcript` is the thread-safe handle the
consumers read, sync or async. `transcribe` runs a pass alone and is blocking (one reasoner
step per token): callers on an event loop run it off the loop.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from ..events import TranscriptDelta, TranscriptDone
from ..model.processor import ReasonerInput, audio_token_count
from ..model.weights import ChromaWeights
from .detokenizer import IncrementalDetokenizer
from .generation import Reasoner
from .vad import speech_spans

RECOGNITION_SYSTEM = "You are a speech recognition model."
MAX_TRANSCRIPT_TOKENS = 448  # Whisper's decoder limit: well over 30 s of speech

__all__ = ["MAX_TRANSCRIPT_TOKENS", "RECOGNITION_SYSTEM", "Transcript", "TranscriptPass", "language_name",
           "recognition_instruction",
           "recognition_messages", "recognition_prompt", "stop_token_ids", "transcribe", "turn_audio_embeds"]


def language_name(language: str | None) -> str:
    """The language to ask for in the recognition prompt: an ISO-639-1 code as clients send
    it ("en", "pt-BR") becomes Whisper's name for it ("English", "Portuguese"); a name is
    kept as given; none is English."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES  # the field's table of 100
    if not language or not language.strip():
        return "English"
    code = language.strip().split("-")[0].split("_")[0].lower()
    return LANGUAGES[code].title() if code in LANGUAGES else language.strip()


def recognition_instruction(language: str = "English") -> str:
    """The documented recognition instruction for `language`."""
    return f"Transcribe the {language} audio into text without any punctuation marks."


def recognition_messages(language: str = "English") -> list[dict]:
    """The recognition prompt in chat-template form: system, then the audio and the instruction."""
    return [{"role": "system", "content": RECOGNITION_SYSTEM},
            {"role": "user", "content": [{"type": "audio"},
                                         {"type": "text", "text": recognition_instruction(language)}]}]


def _one_clip(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`features` as [1, bins, frames] and `mask` as [1, frames] (unbatched ones are accepted)."""
    features = features if features.dim() == 3 else features[None]
    mask = mask if mask.dim() == 2 else mask[None]
    if features.shape[0] != 1 or mask.shape[0] != 1:
        raise ValueError(f"transcribe one clip at a time: got features of {features.shape[0]} clips")
    if mask.shape[-1] != features.shape[-1]:
        raise ValueError(f"the mask has {mask.shape[-1]} frames but the features {features.shape[-1]}")
    return features, mask


def recognition_prompt(processor, features: torch.Tensor, mask: torch.Tensor,
                       language: str = "English", audio_embeds: torch.Tensor | None = None) -> ReasonerInput:
    """The recognition prompt for one clip's Whisper `features` [1, bins, frames] and their
    `mask` [1, frames] (as `ChromaProcessor.features` or a turn's `ReasonerInput` hold them):
    the messages rendered with the checkpoint's chat template and the generation prompt,
    the audio placeholder expanded to the clip's encoder length, the features reused as given
    (and the audio tower's output for them, `audio_embeds`, when it has run already)."""
    features, mask = _one_clip(features, mask)
    text = processor.render(recognition_messages(language), add_generation_prompt=True)
    if text.count(processor.audio_token) != 1:
        raise ValueError(f"the chat template renders {text.count(processor.audio_token)} audio placeholders "
                         "for one audio part; cannot build the recognition prompt")
    # the same expansion as ChromaProcessor.reasoner_input, from the mask instead of new features
    expanded = text.replace(processor.audio_token, processor.audio_token * audio_token_count(int(mask.sum())))
    ids = processor.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if audio_embeds is not None and audio_embeds.shape[0] != audio_token_count(int(mask.sum())):
        raise ValueError(f"audio_embeds has {audio_embeds.shape[0]} rows for a clip of "
                         f"{audio_token_count(int(mask.sum()))} audio tokens")
    return ReasonerInput(ids, features, mask, audio_embeds)


def turn_audio_embeds(prompt: ReasonerInput, mask: torch.Tensor) -> torch.Tensor | None:
    """The audio tower's output for a turn's clip (the last clip of a reply's `prompt`, whose
    mask is `mask`), once the reply's prefill has computed it; None before."""
    if prompt.audio_embeds is None:
        return None
    return prompt.audio_embeds[-audio_token_count(int(mask.sum())):]


def stop_token_ids(model: ChromaWeights) -> set[int]:
    """Tokens that end a transcript: the model's im_end and the tokenizer's eos."""
    eos = model.processor.tokenizer.eos_token_id
    return {model.config.im_end_token_id} | ({eos} if eos is not None else set())


class Transcript:
    """A user turn's transcript as it is made: its events (`TranscriptDelta`s, then one
    `TranscriptDone`), readable from any thread while its pass runs on another.

        for event in transcript: ...          # blocking, every event from the first
        async for event in transcript: ...    # on an event loop, no thread held
        done = await transcript.done()        # or transcript.wait(timeout) from a thread
    """

    def __init__(self, turn: int, language: str):
        self.turn, self.language = turn, language
        self._events: list = []
        self._changed = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.result: TranscriptDone | None = None

    def put(self, event: TranscriptDelta | TranscriptDone) -> None:
        """Add the next event (from the pass's thread); wakes every reader."""
        with self._changed:
            if self.result is not None:
                return  # ended already: nothing follows its TranscriptDone
            self._events.append(event)
            if isinstance(event, TranscriptDone):
                self.result = event
            self._changed.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def events(self, start: int = 0) -> list:
        """The events from index `start` on, as far as they exist now."""
        with self._changed:
            return self._events[start:]

    @property
    def text(self) -> str:
        """The text so far (the final text once done)."""
        with self._changed:
            return self.result.text if self.result else "".join(e.text for e in self._events)

    def wait(self, timeout: float | None = None) -> TranscriptDone | None:
        """Block until the transcript ends (or `timeout` passes: None)."""
        with self._changed:
            self._changed.wait_for(lambda: self.result is not None, timeout)
            return self.result

    def __iter__(self) -> Iterator[TranscriptDelta | TranscriptDone]:
        return self.follow()

    def follow(self, seen: int = 0) -> Iterator[TranscriptDelta | TranscriptDone]:
        """The events from index `seen` on, blocking for each until the last."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(self._events) > seen or self.result is not None)
                new = self._events[seen:]
            seen += len(new)
            yield from new
            if self.result is not None and seen >= len(self.events()):
                return

    async def _changed_async(self, seen: int) -> None:
        """Return once there are more than `seen` events."""
        future = asyncio.get_running_loop().create_future()
        with self._changed:
            if len(self._events) > seen:
                return
            self._waiters.append((asyncio.get_running_loop(), future))
        await future

    async def __aiter__(self):
        seen = 0
        while True:
            await self._changed_async(seen)
            new = self.events(seen)
            seen += len(new)
            for event in new:
                yield event
            if new and isinstance(new[-1], TranscriptDone):
                return

    async def done(self) -> TranscriptDone:
        """The final event, once there is one (no thread held while waiting)."""
        while self.result is None:
            await self._changed_async(len(self.events()))
        return self.result


# one thread for every conversation's speech checks: Silero runs one clip at a time anyway (vad.py)
_speech_checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chroma-speech-check")


def after_speech_check(job: "TranscriptPass", then) -> None:
    """Call `then()` once `job`'s speech check is done: at once when it needs none, else on
    the shared speech-check thread, so that no reply's thread waits for Silero."""
    if job.speech_known:
        then()
        return

    def check():
        try:
            job.hears_speech()
        except Exception as failure:  # noqa: BLE001 - a failed check fails this transcript only
            job.fail(failure)
        then()
    _speech_checks.submit(check)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TranscriptPass:
    """One transcript being made, stepped by its driver: `prefill()` once (the recognition
    prompt, with the reply's audio-tower output when `adopt` gave it), then, while not
    `finished`, one greedy token at a time: `step()` alone, or from outside (the engine's
    batched rows: its `reasoner` fed `token`, then `take` the next). Every result goes to
    `transcript`; any failure ends it there with `error`, never as an exception."""

    def __init__(self, model: ChromaWeights, features: torch.Tensor | None, mask: torch.Tensor | None, *,
                 language: str = "English", turn: int = 0, max_tokens: int = MAX_TRANSCRIPT_TOKENS,
                 audio=None):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if model.processor is None:
            raise RuntimeError("the model has no processor; load it with ChromaModel.from_pretrained")
        if features is not None and mask is None:
            raise ValueError("the features need their attention mask")
        self.model, self.features, self.mask = model, features, mask
        self.audio = audio                 # the clip at 16 kHz, when given: checked for speech first
        self._speech: bool | None = None
        self._filling: list | None = None  # a prefill run from outside: [reasoner, embeds, positions, rows fed]
        self.max_tokens = max_tokens
        self.transcript = Transcript(turn, language)
        self.audio_embeds: torch.Tensor | None = None
        self.reasoner: Reasoner | None = None
        self.token: int | None = None      # the token to feed next
        self.prompt_tokens = self.audio_tokens = self.tokens = 0
        self._detok = IncrementalDetokenizer(model.processor.decode)
        self._stop = stop_token_ids(model)

    @property
    def finished(self) -> bool:
        return self.transcript.result is not None

    @property
    def prefilled(self) -> bool:
        return self.reasoner is not None

    @property
    def speech_known(self) -> bool:
        """Whether `hears_speech` would answer without running Silero."""
        return self.audio is None or self._speech is not None or self.finished

    def hears_speech(self) -> bool:
        """Whether the clip holds speech (Silero; once): silence or noise has no words to
        write, so its transcript is empty. Blocking: drivers call it on a consumer's thread."""
        if self._speech is None:
            self._speech = self.audio is None or bool(speech_spans(self.audio, 16000, min_speech_ms=100))
        return self._speech

    def adopt(self, prompt: ReasonerInput) -> None:
        """Reuse the audio tower's output of the reply whose `prompt` ends with this turn's clip."""
        if self.mask is not None and self.audio_embeds is None:
            self.audio_embeds = turn_audio_embeds(prompt, self.mask)

    def _start(self) -> tuple[Reasoner, ReasonerInput] | None:
        """The recognition prompt and a reasoner sized for the whole pass; None when the
        transcript ended instead (no audio, no speech in it, a failure)."""
        if self.finished or self.prefilled or self._filling is not None:
            return None
        if self.features is None or not self.hears_speech():
            self._end(False)
            return None
        try:
            features, mask = _one_clip(self.features, self.mask)
            prompt = recognition_prompt(self.model.processor, features, mask, self.transcript.language,
                                        self.audio_embeds)
            self.prompt_tokens = prompt.input_ids.shape[1]
            self.audio_tokens = audio_token_count(int(mask.sum()))
            # sized for the whole pass up front: the cache never regrows
            return Reasoner(self.model, capacity=self.prompt_tokens + self.max_tokens + 1), prompt
        except Exception as failure:  # noqa: BLE001 - a transcript that fails must not take the call down
            self.fail(failure)
            return None

    def prefill(self) -> None:
        """Run the recognition prompt and take its first token (an empty transcript without
        audio or without speech in it)."""
        started = self._start()
        if started is None:
            return
        reasoner, prompt = started
        try:
            with torch.inference_mode():
                _, token = reasoner.prefill(prompt)
        except Exception as failure:  # noqa: BLE001
            return self.fail(failure)
        self.reasoner = reasoner
        self.take(token)

    # -- the prefill run from outside, a chunk of rows at a time (the engine batches them) --
    def begin_rows(self) -> bool:
        """Start a prefill run from outside: the prompt's embeddings (the audio tower runs
        here unless `adopt` gave its output); False when the transcript ended instead."""
        started = self._start()
        if started is None:
            return False
        reasoner, prompt = started
        try:
            embeds, positions = reasoner.prompt_embeddings(prompt)
        except Exception as failure:  # noqa: BLE001
            self.fail(failure)
            return False
        self._filling = [reasoner, embeds, positions, 0]
        return True

    def next_rows(self, n: int) -> tuple[Reasoner, torch.Tensor, torch.Tensor]:
        """The reasoner and the next (at most) `n` prompt rows: embeddings [1, k, hidden]
        and positions [3, 1, k]."""
        reasoner, embeds, positions, fed = self._filling
        return reasoner, embeds[:, fed: fed + n], positions[..., fed: fed + n]

    def rows_done(self, n: int, token: int) -> None:
        """`n` rows are in the cache; `token`, the argmax after the last, counts once all are."""
        self._filling[3] += n
        reasoner, embeds, _, fed = self._filling
        if fed >= embeds.shape[1]:
            self._filling = None
            self.reasoner = reasoner
            self.take(token)

    def step(self) -> None:
        """One greedy token, alone."""
        if self.finished:
            return
        try:
            with torch.inference_mode():
                _, token = self.reasoner.step(self.token)
        except Exception as failure:  # noqa: BLE001
            return self.fail(failure)
        self.take(token)

    def take(self, token: int) -> None:
        """The model's next token: the end, or text to stream and the next token to feed."""
        if token in self._stop:
            return self._end(False)
        if self.tokens == self.max_tokens:
            return self._end(True)
        self.tokens += 1
        if text := self._detok.push([token]):
            self.transcript.put(TranscriptDelta(text, self.transcript.turn))
        self.token = token

    def run(self) -> TranscriptDone:
        """The whole pass on this thread."""
        self.prefill()
        while not self.finished:
            self.step()
        return self.transcript.result

    def fail(self, failure: BaseException) -> None:
        self._end(False, str(failure) or type(failure).__name__)

    def _end(self, truncated: bool, error: str | None = None) -> None:
        if self.finished:
            return
        try:
            rest = self._detok.flush()
        except Exception:  # noqa: BLE001 - a detokenizer failure still ends the transcript
            rest = ""
        if rest:
            self.transcript.put(TranscriptDelta(rest, self.transcript.turn))
        self.reasoner = self.token = self._filling = None  # its KV cache goes now, not with the handle
        self.transcript.put(TranscriptDone(self._detok.text, self.transcript.turn, self.transcript.language,
                                           truncated, error, self.prompt_tokens, self.audio_tokens, self.tokens))


def transcribe(model: ChromaWeights, features: torch.Tensor | None, mask: torch.Tensor | None, *,
               language: str = "English", turn: int = 0,
               max_tokens: int = MAX_TRANSCRIPT_TOKENS) -> Iterator[TranscriptDelta | TranscriptDone]:
    """The transcript of one user audio turn, from its Whisper `features` and `mask`:
    `TranscriptDelta`s, then one `TranscriptDone` whose text is their join. At most
    `max_tokens` tokens; `truncated` when the model had not ended by then. No audio
    (`features` None) gives an empty transcript; a failure inside ends it with
    `TranscriptDone(error=...)` holding the text so far, never an exception.

    Blocking: run it off the event loop. Bad arguments raise here, before anything runs."""
    return _events(TranscriptPass(model, features, mask, language=language, turn=turn, max_tokens=max_tokens))


def _events(job: TranscriptPass) -> Iterator[TranscriptDelta | TranscriptDone]:
    seen = 0
    job.prefill()
    while True:
        new = job.transcript.events(seen)
        seen += len(new)
        yield from new
        if job.finished:
            if seen < len(job.transcript.events()):
                yield from job.transcript.events(seen)
            return
        job.step()


class InlineTranscript:
    """A turn's transcript made on its reply's own thread (a lone conversation): the pass
    starts once the reply's prefill has run (reusing its audio-tower output), takes
    `steps_per_frame` tokens after each frame, and what is left runs when the reply ends
    (`rest`) or is closed early (`abandon`). Each method returns the events that are new."""

    def __init__(self, job: TranscriptPass, reply, steps_per_frame: int = 2):
        self.job, self.reply, self.steps_per_frame = job, reply, steps_per_frame
        self._seen = 0

    def _new(self) -> list:
        new = self.job.transcript.events(self._seen)
        self._seen += len(new)
        return new

    def _advance(self, steps: int) -> None:
        if not self.job.prefilled and not self.job.finished:
            if self.reply.prompt_end is not None:  # the reply's prefill ran the audio tower: reuse it
                self.job.adopt(self.reply.prompt)
            self.job.prefill()
            return
        for _ in range(steps):
            self.job.step()

    def between_frames(self) -> list:
        if self.reply.prompt_end is not None and not self.job.finished:
            self._advance(self.steps_per_frame)
        return self._new()

    def rest(self) -> Iterator[TranscriptDelta | TranscriptDone]:
        try:
            yield from self._new()
            while not self.job.finished:
                self._advance(1)
                yield from self._new()
        except GeneratorExit:
            self.abandon()
            raise

    def abandon(self) -> None:
        """No reader is left: finish the pass here, for `Transcript` readers."""
        while not self.job.finished:
            self._advance(1)
