"""The streaming runtime: a multi-turn conversation that speaks each reply frame by frame.

    conv = model.conversation(voice=voice, system_prompt="...")
    async for event in conv.respond(audio=pcm, sample_rate=8000):   # or `for` (sync)
        ...  # TextDelta, AudioChunk (1920 samples at 24 kHz per 80 ms frame), ResponseDone

With `transcribe=True` (per conversation or per `respond()`), the caller's words come too:
`TranscriptDelta`s and a `TranscriptDone` among the reply's events (transcription.py).

State lives here, weights in the shared `ChromaModel`: the reasoner's KV cache carries the
conversation across turns (a new turn prefills only its own tokens), the voice prefix's
backbone KV is computed once per voice, and each reply owns its backbone/decoder caches
and a streaming Mimi decoder.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..model.codec import StreamingMimiDecoder
from .detokenizer import IncrementalDetokenizer
from .generation import FrameStep, Reasoner, ReplyFrames
from .transcription import MAX_TRANSCRIPT_TOKENS, InlineTranscript, Transcript, TranscriptPass, language_name
from ..model.weights import ChromaWeights
from ..model.processor import DEFAULT_SYSTEM_PROMPT, ReasonerInput, stack_features
from ..model.sampling import SamplingOptions
from ..model.voice import Voice
from ..events import AudioChunk, PromptTooLong, ReplyError, ResponseDone, ResponseStats, TextDelta

FRAME_MS = 80
WAITING = object()  # a frame source's first item: submitted, its first frame not made yet (never handed out)


@dataclass
class _Segment:
    """Reasoner input of one exchange, kept so the history can be rebuilt when capped."""

    ids: list[int]
    features: list[torch.Tensor] = field(default_factory=list)   # [1, bins, frames] per clip
    masks: list[torch.Tensor] = field(default_factory=list)


def _merge(segments: list[_Segment]) -> ReasonerInput:
    ids = torch.tensor([[i for s in segments for i in s.ids]])
    feats = [f for s in segments for f in s.features]
    masks = [m for s in segments for m in s.masks]
    if not feats:
        return ReasonerInput(ids)
    return ReasonerInput(ids, *stack_features(feats, masks))


class Response:
    """The events of one reply: iterate with `for` or `async for` (not both). Each frame is
    computed on demand, so a consumer that stops iterating stops generation.

    A reply left early ends where it was left: the history keeps what was generated so far
    and the conversation is free for the next `respond()`/`say()`. `break` out of a `for`
    closes it at once; out of an `async for`, call `await response.aclose()` (otherwise it
    is closed on the event loop as soon as its iteration is dropped, and the next reply
    waits for that). A cancelled `async for` closes it before the cancellation goes on."""

    def __init__(self, conversation: "Conversation", events: Iterator, transcript: Transcript | None = None):
        self._conversation = conversation
        self._events = events
        self.transcript = transcript                  # the caller's words, when transcribed: read it any time
        self._step: asyncio.Future | None = None      # the event being computed, in a worker thread
        self._closing: asyncio.Future | None = None   # aclose() under way or done
        self._started = False
        self._ended = False                           # the generator is finished or closed
        self._abandoned = False                       # its `async for` was dropped before the end
        self._stepping = threading.Lock()             # held by a step; close() waits for it
        self._mid_frame = False                       # the last event was a frame's text: its audio is next

    def _next(self, done):
        with self._stepping, torch.inference_mode():  # inference mode is thread-local: entered per step
            return next(self._events, done)

    def __iter__(self):
        done = object()
        try:
            while (event := self._next(done)) is not done:
                if event is not WAITING:
                    yield event
        finally:
            self.close()

    def __aiter__(self):
        return _AsyncEvents(self)

    async def _anext(self):
        if self._ended or self._closing is not None:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            previous, self._conversation._response = self._conversation._response, self
            if previous is not None and (previous._abandoned or previous._closing is not None):
                await previous.aclose()  # an `async for` left early: its reply ends before this one starts
        done, event = object(), WAITING
        try:
            while event is WAITING:  # a reply waiting for its first frame waits on the loop, below
                if await self._ready_on_loop():
                    self._step = None
                    event = self._next(done)  # the next event exists already: taking it is bookkeeping, no thread
                else:
                    self._step = asyncio.ensure_future(asyncio.to_thread(self._next, done))  # keeps the loop free
                    # shielded: cancelled, the step still runs to its end in the thread; aclose() waits for it
                    event = await asyncio.shield(self._step)
        except asyncio.CancelledError:
            await self.aclose()
            raise
        except BaseException:
            self._ended = True  # a generator that raised is finished
            raise
        self._mid_frame = isinstance(event, TextDelta)  # its frame's audio follows at once
        if event is done:
            self._ended = True
            raise StopAsyncIteration
        return event

    async def _ready_on_loop(self) -> bool:
        """Whether the next event can be taken on the event loop: its frame is made already
        (an engine reply; a frame of a lone conversation is computed by taking it). While an
        engine reply speaks, its consumer waits for the next frame here, holding no thread."""
        conv = self._conversation
        if conv.frame_ready(self._mid_frame):
            return True
        return await conv.until_frame() and conv.frame_ready(False)

    def close(self) -> None:
        """End the reply here, on this thread (sync use): it stops generating, the history
        keeps what it generated so far, and the conversation can reply again. Idempotent."""
        with self._stepping, torch.inference_mode():  # after the step in flight, if any
            self._ended = True
            self._events.close()

    async def aclose(self) -> None:
        """`close()` for `async for`: waits for the frame being computed, then ends the reply
        in a worker thread. Idempotent; safe to call from another task."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_async())
        await asyncio.shield(self._closing)  # a second cancellation leaves the close running

    async def _close_async(self) -> None:
        if self._step is not None:
            await asyncio.wait([self._step])
            if not self._step.cancelled() and self._step.exception() is not None:
                self._ended = True  # it raised (and was not awaited: its consumer was cancelled)
        if not self._ended:
            await asyncio.to_thread(self.close)  # waits there for a step still running (a cancelled loop's)

    def cancel(self) -> None:
        self._conversation.cancel()


class _AsyncEvents:
    """The `async for` iterator of a `Response`. When it is dropped before the reply's end
    (a `break`), the reply is closed on the event loop, as asyncio does for async generators."""

    def __init__(self, response: Response):
        self.response = response

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.response._anext()

    def __del__(self):
        response = self.response
        if response._ended or response._closing is not None or not response._started:
            return
        response._abandoned = True  # the next reply of the conversation closes it first, at the latest
        try:
            response._closing = asyncio.get_running_loop().create_task(response._close_async())
        except Exception:  # noqa: BLE001 - no running loop (or the interpreter is exiting): leave it to the next reply
            pass


class Conversation:
    """A multi-turn spoken conversation in one voice; create with `model.conversation(...)`.

    History policy: the reasoner keeps the whole conversation in its KV cache. When a new
    turn would take it past `max_history_tokens`, the oldest exchanges are dropped whole
    (the system prompt always stays) and the kept history is prefilled once, anew, with
    the new turn. One reply runs at a time per conversation.

    Budget: the system prompt may take at most half of `max_history_tokens` (the rest is
    for a turn and its reply), and a turn at most what the system prompt leaves; larger
    ones raise `PromptTooLong` (at creation; in `respond()`/`say()`, changing nothing).

    `frame_graphs` (default: on CUDA) runs each frame's backbone step and decoder pass as
    one CUDA-graph replay over fixed-shape caches owned by the conversation.

    `transcribe` (off by default; per turn: `respond(transcribe=...)`) has the reasoner write
    down each user audio turn in `language` (a hint in the recognition prompt; at most
    `max_transcript_tokens`, then it ends marked truncated) beside the
    reply: `TranscriptDelta`s and a `TranscriptDone` among the reply's events, and
    `response.transcript` to read it any time. The reply's first audio never waits for it:
    its pass starts after the reply's prefill, a few tokens between frames, and what is left
    when the reply ends runs before `ResponseDone`; a reply closed early leaves it running
    on (in the engine) or finishes it on the closing thread (alone).
    """

    def __init__(self, model: ChromaWeights, voice: Voice, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 max_history_tokens: int = 8192, frame_graphs: bool | None = None, *,
                 transcribe: bool = False, language: str = "English",
                 max_transcript_tokens: int = MAX_TRANSCRIPT_TOKENS):
        if model.processor is None:
            raise RuntimeError("the model has no processor; load it with ChromaModel.from_pretrained")
        self.model = model
        self.voice = voice
        self.system_prompt = system_prompt
        self.max_history_tokens = max_history_tokens
        self.transcribe_turns, self.language = transcribe, language
        self.max_transcript_tokens = max_transcript_tokens
        self.user_turns = 0                             # user audio turns so far: a transcript's `turn`
        self._template = _TemplateParts(model.processor, system_prompt)
        if len(self._template.system) > max_history_tokens // 2:  # before any cache is allocated
            raise PromptTooLong("the system prompt", len(self._template.system), max_history_tokens // 2,
                                max_history_tokens)
        self.reasoner = Reasoner(model)
        self._history: list[_Segment] = []              # exchanges, as the reasoner has seen them
        self._pending = [_Segment(list(self._template.system))]  # not yet in the reasoner cache
        self.busy = threading.Lock()
        self._cancel = threading.Event()
        self._last: dict | None = None                  # what the last reply fed, for truncate()
        self._response: Response | None = None          # the latest reply iterated with `async for`
        # on CUDA each frame is one graph replay (frame_graph.py); on the CPU the ragged step is faster
        self.frame_step = FrameStep(model, fixed=model.device.type == "cuda" if frame_graphs is None else frame_graphs)

    # -- public API --
    def respond(self, audio=None, sample_rate: int | None = None, text: str | None = None, *,
                max_frames: int = 375, greedy: bool = False, temperature: float = 0.9, top_k: int = 50,
                seed: int | None = None, transcribe: bool | None = None, language: str | None = None,
                has_speech: bool | None = None) -> Response:
        """Reply to a user turn: `audio` (a path, bytes, or an array with its `sample_rate`)
        and/or `text`. Bad audio raises `AudioError` here, before anything changes.
        `transcribe` / `language`: this turn's transcript (None: the conversation's setting).
        `has_speech`: what the caller's own VAD found in `audio` (None: Silero checks it
        before transcribing; silence or noise has an empty transcript)."""
        started = time.perf_counter()
        proc = self.model.processor
        clip = None if audio is None else proc.load_user_audio(audio, sample_rate)
        if clip is None and not text:
            raise ValueError("respond() needs audio or text")
        content = ([{"type": "audio"}] if clip is not None else []) + ([{"type": "text", "text": text}] if text else [])
        turn = proc.reasoner_input(self._template.history + [{"role": "user", "content": content}],
                                   [] if clip is None else [clip], add_generation_prompt=True,
                                   after=self._template.history_text)
        segment = _Segment(turn.input_ids[0].tolist(),
                           [] if turn.input_features is None else [turn.input_features],
                           [] if turn.feature_attention_mask is None else [turn.feature_attention_mask])
        self._check_turn(len(segment.ids))
        sampling = SamplingOptions(greedy=greedy, temperature=temperature, top_k=top_k, seed=seed)
        job = None
        if clip is not None and (self.transcribe_turns if transcribe is None else transcribe):
            job = TranscriptPass(self.model, None if has_speech is False else segment.features[0], segment.masks[0],
                                 audio=clip if has_speech is None else None,
                                 language=language_name(language or self.language), turn=self.user_turns,
                                 max_tokens=self.max_transcript_tokens)
        self.user_turns += clip is not None
        return Response(self, self.start_reply(segment, None, max_frames, sampling, started, job),
                        job and job.transcript)

    def transcribe(self, audio, sample_rate: int | None = None, *, language: str | None = None) -> Transcript:
        """The transcript of `audio` alone, outside any reply (its audio tower runs for it):
        a `Transcript` to iterate or await, made on a thread of its own here, by the
        scheduler in an engine. It joins no history. Bad audio raises `AudioError` here."""
        proc = self.model.processor
        clip = proc.load_user_audio(audio, sample_rate)
        features, mask = proc.features(clip)
        job = TranscriptPass(self.model, features, mask, audio=clip, language=language_name(language or self.language),
                             turn=self.user_turns, max_tokens=self.max_transcript_tokens)
        self.run_transcript(job)
        return job.transcript

    def run_transcript(self, job: TranscriptPass) -> None:
        """Make a transcript outside any reply (`transcribe`)."""
        threading.Thread(target=job.run, name="chroma-transcript", daemon=True).start()

    def say(self, text: str, *, max_frames: int = 375, greedy: bool = False, temperature: float = 0.9,
            top_k: int = 50, seed: int | None = None) -> Response:
        """Speak `text` in the voice (greetings, scripted lines): the reasoner is teacher-forced
        on its tokens, and the line joins the history as an assistant turn."""
        if not text or not text.strip():
            raise ValueError("say() needs some text")
        forced = self.model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        segment = _Segment(list(self._template.assistant_header))
        self._check_turn(len(segment.ids) + len(forced))
        sampling = SamplingOptions(greedy=greedy, temperature=temperature, top_k=top_k, seed=seed)
        return Response(self, self.start_reply(segment, forced, max_frames, sampling, time.perf_counter()))

    def cancel(self) -> None:
        """Stop the running reply: it ends within one frame with stop_reason "cancelled"
        (its caches are freed when it ends)."""
        self._cancel.set()

    def truncate(self, played_ms: float) -> None:
        """Keep in the history only what the caller heard of the last reply: the reasoner
        tokens fed up to frame ceil(played_ms / 80). Call once that reply has ended."""
        if self.busy.locked():
            raise RuntimeError("a reply is still running: cancel() it and let it finish first")
        if self._last is None:
            raise RuntimeError("nothing to truncate: no reply yet")
        heard_frames = max(0, math.ceil(played_ms / FRAME_MS))
        im_end = self.model.config.im_end_token_id
        heard = [t for frame, t in self._last["fed"] if frame < heard_frames and t != im_end]
        with torch.inference_mode():
            self.reasoner.rewind(self._last["start"])
            self.reasoner.feed(heard + self._template.close)
        segment = self._last["segment"]
        segment.ids = segment.ids[: self._last["prompt_length"]] + heard + self._template.close
        self._last["fed"] = [(f, t) for f, t in self._last["fed"] if f < heard_frames]

    @property
    def history_tokens(self) -> int:
        """Tokens of history the next turn builds on."""
        return self.reasoner.length + sum(len(s.ids) for s in self._pending)

    def _check_turn(self, tokens: int) -> None:
        """Refuse a turn that would not fit even with every earlier exchange dropped."""
        limit = self.max_history_tokens - len(self._template.system)
        if tokens > limit:
            raise PromptTooLong("the turn", tokens, limit, self.max_history_tokens)

    # -- one reply --
    def start_reply(self, segment: _Segment, forced: list[int] | None, max_frames: int, sampling: SamplingOptions,
                    started: float, transcript: TranscriptPass | None = None) -> Iterator:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        return self.run_locked(segment, forced, max_frames, sampling, started, transcript)

    def run_locked(self, segment, forced, max_frames, sampling, started, transcript=None) -> Iterator:
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("this conversation is already replying: cancel() the running reply first")
        self._cancel.clear()
        try:
            yield from self._reply(segment, forced, max_frames, sampling, started, transcript)
        finally:
            self.busy.release()

    def frame_ready(self, mid_frame: bool) -> bool:
        """Whether the running reply's next event blocks on nothing, its frame made already
        (`mid_frame`: the last event was a frame's text, its audio comes next): never here,
        where taking a frame computes it (an engine conversation: when its job has the frame,
        decoded, queued)."""
        return False

    async def until_frame(self) -> bool:
        """Wait on the event loop for the running reply's next item; False when that cannot
        be waited for here (then the caller takes it on a worker thread)."""
        return False

    def transcript_driver(self, job: TranscriptPass, reply):
        """What makes a turn's transcript beside its reply: here its pass, stepped between the
        reply's frames on the consumer's thread (an engine conversation: the scheduler)."""
        return InlineTranscript(job, reply)

    def _reply(self, segment: _Segment, forced, max_frames, sampling, started, transcript=None):
        model, cfg = self.model, self.model.config
        self._cap_history(len(segment.ids))
        pending, self._pending = self._pending, []
        reply = self.frame_source(pending + [segment], max_frames, sampling, forced)
        words = transcript and self.transcript_driver(transcript, reply)
        frames = iter(reply)
        decoder = StreamingMimiDecoder(model.codec_model, cfg.num_codebooks)
        stats, fed, held = ResponseStats(), [], []
        detok = IncrementalDetokenizer(model.processor.decode)
        last = time.perf_counter()
        error = None
        try:
            for frame in frames:
                if frame is WAITING:  # the engine has it: the consumer may wait for the first frame elsewhere
                    yield WAITING
                    continue
                fed += [(frame.index, t) for t in frame.text_ids]
                spoken = [t for t in frame.text_ids if t != cfg.im_end_token_id]
                held += spoken
                if spoken and (text := detok.push(spoken)):
                    yield TextDelta(text, held)
                    held = []
                pcm = frame.pcm  # the engine decodes its frames itself
                if pcm is None:
                    pcm = decoder.decode_frame(frame.codes[None])[0].float().cpu().numpy()
                now = time.perf_counter()
                stats.frame_ms.append((now - last) * 1000)
                if stats.time_to_first_audio_s is None:
                    stats.time_to_first_audio_s = now - started
                stats.frames += 1
                yield AudioChunk(pcm, frame.index, model.sample_rate)
                if words:  # after the frame is out: the reply never waits for the transcript
                    yield from words.between_frames()
                last = time.perf_counter()
                if self._cancel.is_set():
                    break
        except ReplyError as failure:
            error = str(failure)
        except GeneratorExit:  # closed early: no more events can go out
            if words:
                words.abandon()
            raise
        finally:
            frames.close()  # a cancelled reply stops here: no further reasoner or backbone step
            if reply.prompt_end is not None:
                self._finish_turn(reply, segment, fed)
            else:  # it failed before the reasoner saw anything: the next turn brings it all again
                self._pending = pending
        if words:
            yield from words.rest()
        stop = "error" if error else "cancelled" if self._cancel.is_set() else reply.stop_reason
        stats.audio_s = stats.frames * cfg.frame_size / model.sample_rate
        stats.generation_s = time.perf_counter() - started
        stats.real_time_factor = stats.generation_s / stats.audio_s if stats.audio_s else float("inf")
        if text := detok.flush():
            yield TextDelta(text, held)
        yield ResponseDone(detok.text, stop, stats, error)

    def frame_source(self, segments: list[_Segment], max_frames: int, sampling: SamplingOptions,
                forced: list[int] | None) -> ReplyFrames:
        """Where a reply's frames come from, its prompt made of `segments`: here `ReplyFrames`,
        run on the consumer's thread one frame per request; an engine conversation has the
        engine's scheduler make them, batched with other conversations' (engine.py). Either
        way the result is iterated for `Frame`s and then read for `prompt_end` and `stop_reason`."""
        return ReplyFrames(self.model, self.voice, _merge(segments), max_frames, sampling, reasoner=self.reasoner,
                           prefix=self.model.prefix_state(self.voice), forced_ids=forced, frame_step=self.frame_step)

    def _finish_turn(self, reply: ReplyFrames, segment: _Segment, fed: list[tuple[int, int]]) -> None:
        """Close the assistant turn: the reasoner cache and the history end with exactly the
        tokens this reply fed the backbone in the frames it yielded, then the turn closing."""
        im_end = self.model.config.im_end_token_id
        tokens = [t for _, t in fed if t != im_end]
        # the cache holds the reply's tokens in order, possibly one predicted past the last frame
        keep = min(self.reasoner.length - reply.prompt_end, len(tokens))
        with torch.inference_mode():
            self.reasoner.rewind(reply.prompt_end + keep)
            self.reasoner.feed(tokens[keep:] + self._template.close)
        prompt_length = len(segment.ids)
        segment.ids = segment.ids + tokens + self._template.close
        self._history.append(segment)
        self._last = {"start": reply.prompt_end, "fed": fed, "segment": segment, "prompt_length": prompt_length}

    def _cap_history(self, incoming: int) -> None:
        """Apply the history policy before a turn of `incoming` tokens is prefilled."""
        if self.history_tokens + incoming <= self.max_history_tokens:
            return
        system = len(self._template.system)
        while self._history and system + sum(len(s.ids) for s in self._history) + incoming > self.max_history_tokens:
            self._history.pop(0)
        self._drop_cache()

    def forget_cache(self) -> None:
        """Drop the reasoner's KV cache; the next turn prefills the system prompt and the kept
        history anew (what the history cap does; equal to carrying the cache)."""
        if self.busy.locked():
            raise RuntimeError("a reply is running: cancel() it first")
        self._drop_cache()

    def _drop_cache(self) -> None:
        self.reasoner = Reasoner(self.model)
        self._pending = [_Segment(list(self._template.system))] + self._history
        self._last = None  # its reasoner positions are gone


class _TemplateParts:
    """Token pieces of the checkpoint's chat template, so that turns can be appended one at
    a time: the system segment, the assistant header and the turn closing."""

    def __init__(self, processor, system_prompt: str | None):
        tok = processor.tokenizer
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
        user, reply = {"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}
        self.system = encode(processor.render(prefix)) if prefix else []
        asked = processor.render(prefix + [user], add_generation_prompt=True)
        self.assistant_header = encode(asked[len(processor.render(prefix + [user])):])
        # a finished exchange to render new turns after; its tail past the reply is the closing
        self.history = prefix + [user, reply]
        self.history_text = processor.render(self.history)
        self.close = encode(self.history_text[len(asked) + len("x"):])
