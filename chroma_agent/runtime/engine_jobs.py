"""What the engine schedules: a `Job` (one reply's frames, made by the engine's scheduler
and handed to its consumer through a queue) and an `EngineConversation` (a `Conversation`
whose replies are jobs of a `ChromaEngine`); and the scheduler's helpers: its batch runner
(`isolated`), the wake-ups of a tick's readers, the garbage-collection freeze of a process
serving an engine (`engines_running`)."""
from __future__ import annotations

import asyncio
import gc
import queue
import threading

import torch

from ..model.codec import StreamingMimiDecoder
from ..model.processor import ReasonerInput, stack_features
from ..model.sampling import SamplingOptions
from ..model.voice import Voice
from ..events import ReplyError
from .conversation import WAITING, Conversation
from .generation import Frame, ReplyFrames
from .transcription import TranscriptPass, after_speech_check

END = object()          # a job's last queue item


class Job:
    """One reply in the engine: its schedule (`ReplyFrames`, stepped by the scheduler), its
    row of the engine's `FrameStep`, its codec, and the queue its frames go out on. Iterated by the conversation's
    `_reply` on the consumer's thread, like a `ReplyFrames`."""

    def __init__(self, engine, reply: ReplyFrames, announce: bool = False):   # engine: its ChromaEngine
        model, cfg = engine.model, engine.model.config
        self.engine, self.reply = engine, reply
        self.announce = announce  # iterating yields WAITING first, once submitted (a conversation's reply)
        self.step_tokens = engine.prefill_chunk  # tokens per prefill step, paced by their time
        self.prefill = reply.prefill(lambda: self.step_tokens)  # a step per `next()`
        self.slot: int | None = None       # its row of the engine's `FrameStep`, once speaking
        self.spoken = False                # its first frame is out
        self.codec = StreamingMimiDecoder(model.codec_model, cfg.num_codebooks)
        self.reasoner_x: torch.Tensor | None = None  # a reasoner step's rows between its halves
        # frames (at most `max_buffered` unread), then a failure and/or END: put, get and qsize in C
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self._unframed = 0  # items other than frames put in `out` (they come after every frame)
        self._readers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # awaiting an item
        self._reading = threading.Lock()
        self._out_ended = False  # END is queued: nothing more comes
        self.cancelled = threading.Event()
        self.finished = threading.Event()

    def deliver(self, item, wakes: dict | None = None) -> None:
        """Queue `item` for the consumer (the scheduler's thread), waking a reader that
        awaits it on its event loop. With `wakes` (loop -> futures, see `wake_readers`) the
        wake is only collected, so a tick wakes each loop once for all of its frames."""
        if not isinstance(item, Frame):
            self._unframed += 1  # counted before it is queued: `frame_ready` never takes it for a frame
        self.out.put(item)
        with self._reading:
            if item is END:
                self._out_ended = True
            readers = self._readers
            if not readers:
                return
            self._readers = []
        collected = {} if wakes is None else wakes
        for loop, future in readers:
            collected.setdefault(loop, []).append(future)
        if wakes is None:
            wake_readers(collected)

    def frame_ready(self) -> bool:
        """The next item is a frame (not the end or a failure): taking it blocks on nothing.
        Frames come before any other item, so the head is a frame while more items are queued
        than non-frames were put."""
        return self.out.qsize() > self._unframed

    async def until_item(self) -> None:
        """Return once an item is queued (or the last one was), waiting on the event loop
        (no thread held)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._reading:
            if self.out.qsize() or self._out_ended:
                return
            self._readers.append((loop, future))
        await future

    def pace(self, tokens: int, seconds: float) -> None:
        """Size the next step to take as long as `prefill_chunk` tokens at an empty context,
        with at least a quarter of them (a step's fixed cost: fewer would gain little)."""
        chunk = self.engine.prefill_chunk
        if tokens > 0 and seconds > 0:
            paced = (self.step_tokens + tokens * self.engine.chunk_s / seconds) / 2  # averaged: one slow step is noise
            self.step_tokens = min(max(round(paced), chunk // 4, 1), chunk)

    @property
    def runnable(self) -> bool:
        """Whether the scheduler steps it this tick: not while its consumer has
        `max_buffered` frames unread (backpressure: it waits, the others go on)."""
        return self.out.qsize() < self.engine.max_buffered or self.cancelled.is_set()

    @property
    def prompt_end(self) -> int | None:
        return self.reply.prompt_end

    @property
    def stop_reason(self) -> str | None:
        return self.reply.stop_reason

    def __iter__(self):
        self.engine.submit(self)
        try:
            if self.announce:
                yield WAITING  # submitted: an async consumer waits for the first frame on its loop
            while (item := self.out.get()) is not END:
                if isinstance(item, BaseException):
                    raise ReplyError(f"{type(item).__name__}: {item}") from item
                if self.out.qsize() == self.engine.max_buffered - 1:
                    self.engine.wake()  # it was held back for a full queue: room again
                yield item
        finally:  # consumer done or cancelled: the scheduler lets go of it at the next tick
            self.cancelled.set()
            self.engine.wake()
            self.finished.wait()


class EngineConversation(Conversation):
    """A conversation served by a `ChromaEngine`: the API of `Conversation` (respond, say,
    cancel, truncate; sync and async events), its frames made by the engine's scheduler
    together with the other conversations'. `close()` (or `with` / `async with`) frees its
    slot and caches."""

    def __init__(self, engine, voice: Voice, system_prompt: str | None, max_history_tokens: int, **options):
        super().__init__(engine.model, voice, system_prompt, max_history_tokens, frame_graphs=False, **options)
        self.engine = engine
        self.closed = False
        self._job: Job | None = None

    def frame_ready(self, mid_frame: bool) -> bool:
        job = self._job
        return job is not None and not self._cancel.is_set() and (mid_frame or job.frame_ready())

    async def until_frame(self) -> bool:
        job = self._job
        if job is None or self._cancel.is_set():
            return False
        await job.until_item()
        return True

    def transcript_driver(self, job: TranscriptPass, reply: Job) -> "QueuedTranscript":
        """The turn's transcript runs in the engine: its rows join the scheduler's reasoner
        steps once `reply`'s prefill is done."""
        return QueuedTranscript(self.engine, job, reply)

    def run_transcript(self, job: TranscriptPass) -> None:
        job.hears_speech()  # Silero on the caller's thread, not the scheduler's
        self.engine.submit_transcript(job)

    def frame_source(self, segments: list, max_frames: int, sampling: SamplingOptions,
                forced: list[int] | None) -> Job:
        head, prompt = pieces(segments, max(1, self.engine.prefill_chunk // 4))
        reply = ReplyFrames(self.model, self.voice, prompt, max_frames, sampling, reasoner=self.reasoner,
                            prefix=self.model.prefix_state(self.voice), forced_ids=forced, head=head)
        self._job = Job(self.engine, reply, announce=True)
        return self._job

    def start_reply(self, *args):
        if self.closed:
            raise RuntimeError("this conversation is closed")
        return super().start_reply(*args)

    def run_locked(self, *args):
        try:
            yield from super().run_locked(*args)
        finally:
            self._job = None
            if self.closed:
                self.reasoner = None  # its KV cache

    def cancel(self) -> None:
        """Stop the running reply: the engine drops it at the next frame."""
        super().cancel()
        if self._job is not None:
            self._job.cancelled.set()
            self.engine.wake()  # it may be sitting out ticks for a full queue

    def close(self) -> None:
        """Cancel any running reply and free this conversation's slot and caches (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.cancel()
        if not self.busy.locked():
            self.reasoner = None
        self.engine.release_conversation(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


class QueuedTranscript:
    """A turn's transcript made by the engine beside its reply: handed to the scheduler
    (`ChromaEngine.submit_transcript`) once the reply's first frame is out (or it ended)
    and its speech check is done; this, the reply's consumer's, thread only hands on the
    events that are new."""

    def __init__(self, engine, job: TranscriptPass, reply: Job):
        self.engine, self.job, self.reply = engine, job, reply
        self._seen = 0
        self._submitted = False

    def _submit(self) -> None:
        if not self._submitted:
            self._submitted = True
            # Silero on the shared speech-check thread: neither this reply nor the scheduler waits for it
            after_speech_check(self.job, lambda: self.engine.submit_transcript(self.job, after=self.reply))

    def between_frames(self) -> list:
        self._submit()
        new = self.job.transcript.events(self._seen)
        self._seen += len(new)
        return new

    def rest(self):
        """The events still to come, as they come (blocking until the transcript ends)."""
        self._submit()
        yield from self.job.transcript.follow(self._seen)

    def abandon(self) -> None:
        self._submit()  # the engine finishes it for `Transcript` readers


def isolated(jobs: list, run, fail, join=None) -> tuple[list, list]:
    """`run(jobs)` -> one result per job (replies or transcripts). If it fails, each job
    is run alone (the same bits, by batch invariance) and only those that fail alone fail
    (`fail(job, failure)`). With `join` (e.g. `torch.cat`), `run` returns one batch whose rows
    are the jobs' results, returned as it is (`join` puts the lone runs' batches together)."""
    if not jobs:
        return [], []
    try:
        return jobs, (run(jobs) if join else list(run(jobs)))
    except Exception as failure:
        if len(jobs) == 1:
            fail(jobs[0], failure)
            return [], []
    kept, results = [], []
    for job in jobs:
        try:
            results.append(run([job]) if join else run([job])[0])
            kept.append(job)
        except Exception as failure:
            fail(job, failure)
    return kept, (join(results) if join and results else results)


def wake_readers(wakes: dict) -> None:
    """Wake the readers `Job.deliver` collected: one call into each event loop (a
    cross-thread call costs a syscall and a loop wake-up; a tick's frames share them)."""
    for loop, futures in wakes.items():
        loop.call_soon_threadsafe(_wake, futures)


def _wake(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def pieces(segments: list, tail: int) -> tuple[list, ReasonerInput]:
    """A prompt's pieces: runs of text as token lists, each segment with audio whole; the
    last (at most `tail` tokens of text, or a segment with audio) is the reply's prompt."""
    pieces, text = [], []
    for segment in segments:
        if not segment.features:
            text += segment.ids
            continue
        pieces += [text] if text else []
        pieces.append(ReasonerInput(torch.tensor([segment.ids]), *stack_features(segment.features, segment.masks)))
        text = []
    if text:
        pieces += [text[:-tail], text[-tail:]] if len(text) > tail else [text]
    last = pieces.pop()
    return pieces, last if isinstance(last, ReasonerInput) else ReasonerInput(torch.tensor([last]))


_engines = [0, threading.Lock(), None]  # engines running in this process, its lock, the thresholds before
_GC_YOUNG = 10_000  # the youngest generation's threshold while engines run (Python's default: 700)


def engines_running(change: int) -> None:
    """An engine starts (+1) or stops (-1). While engines run, the objects alive at an engine's
    start (the loaded model's) are out of Python's garbage collections (a full one over them
    would stall a tick), and the youngest generation is collected after `_GC_YOUNG`
    allocations instead of 700: a 256-row tick makes thousands of short-lived objects, and a
    collection's cost is the objects still alive at it. The last one to stop restores both."""
    with _engines[1]:
        _engines[0] += change
        if change > 0:
            if _engines[2] is None:
                _engines[2] = gc.get_threshold()
                gc.set_threshold(max(_GC_YOUNG, _engines[2][0]), *_engines[2][1:])
            gc.collect()
            gc.freeze()
        elif not _engines[0]:
            gc.unfreeze()
            gc.set_threshold(*_engines[2])
            _engines[2] = None
