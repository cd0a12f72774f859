"""`ChromaEngine`: many conversations on one model, their frames computed together.

At batch 1 a frame reads every weight for a few rows of work, so the hardware idles most
of the 80 ms budget. The engine owns the model and one scheduler thread; every tick it
advances every speaking conversation by one frame in one batched step (vLLM-style: replies
join and leave between steps):

1. new replies' reasoner prefills, a step at a time, in turn, for at most the time
   `prefill_budget` tokens take at an empty context per tick, so a long prompt never
   stalls the calls already speaking (a reply starts speaking on the tick after its
   prefill ends). Steps are timed: deep in a long context, where a token costs more
   (attention), a step feeds fewer tokens (`Job.pace`); text is embedded a step at a
   time, and each audio clip (at most 30 s) goes through the audio tower in a step of its own;
2. one `FrameStep` over all speaking replies (one backbone step, ragged: each over its
   own cache, at its own positions; one decoder pass, each row its own sampler), one
   codec pass for all their frames (`codec.decode_frames`);
3. the reasoner steps that are due, batched per half (`batch.ReasonerSteps`), with a row
   per caller transcript being made (`submit_transcript`: a greedy token each);
4. when no reply waits to prefill, the transcripts' own work: their recognition prompts'
   prefill steps (batched; once their reply has spoken; they reuse its prefill's
   audio-tower output) and more batched tokens, while the tick is under half of its 80 ms
   budget, or under all of it when every speaking reply is 3 frames or more ahead of its
   reader (engine_transcripts.py). Replies come first: a full engine gives transcripts only
   their one row per tick and what the replies' prefill budget leaves.

The engine and a reply talk through plans (generation.py): the reply says what its row
needs (`row_plan`), what its next frame needs (`plan`) and which reasoner half is due
(`reasoner_plan`); the engine runs them for all replies at once and hands each reply its
results (`apply`, `apply_reasoner`).

Batched == alone: the scheduler thread runs in `batch_invariant()` mode, where every row
of every op gets the bits it would get alone, so a conversation's codes and audio do not
depend on who shares its ticks (tests/test_engine.py). A reply's state between ticks is
its `ReplyFrames` (the same schedule `Conversation` runs alone) plus its caches.

Isolation: a failure in one reply's own work ends that reply with
`ResponseDone(stop_reason="error")`; when a batched op fails, each of its rows is run
again alone (the same bits, by batch invariance) to find the culprit, and the others go
on. Admission: at most `capacity` open conversations (`max_conversations`, or measured at
start), past which `conversation()` raises `CapacityError`.

GPU: on CUDA each tick's backbone step and decoder pass are one CUDA-graph replay per
batch-size bucket (`FrameStep`'s fixed shapes: a static KV cache with a row per
reply, padded to 1, 2, 4, ... 256 rows); reasoner halves, prefills and the codec run
eagerly. cuBLAS rows are not batch-invariant, so there batched greedy replies can differ
from alone in rare near-ties. On the CPU the same runner runs eagerly when asked
(`frame_graphs=True`; tests), the ragged step otherwise.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np
import torch

from .batch import ReasonerRows, ReasonerSteps
from ..model.codec import StreamingMimiDecoder, decode_frames
from .engine_jobs import END, EngineConversation, Job, engines_running, isolated, wake_readers
from .frame_graph import bucket
from .frame_step import FrameStep
from .generation import Reasoner, ReplyFrames, apply_reasoners
from .engine_transcripts import TranscriptQueue
from .transcription import TranscriptPass
from ..model.weights import ChromaWeights
from ..model.processor import DEFAULT_SYSTEM_PROMPT, ReasonerInput
from ..model.sampling import SamplingOptions
from ..model.matmul import batch_invariant
from ..model.voice import Voice

__all__ = ["CapacityError", "ChromaEngine", "EngineConversation"]

_log = logging.getLogger(__name__)
_TICK_BUDGET_S = 0.080   # one frame of audio: a tick must fit in it to be real time
_MAX_CAPACITY = 256       # rows calibration tries at most (the last batch bucket, frame_graph.BUCKETS)
_TRANSCRIPT_STEPS = 8     # most full transcript steps per tick beyond the one batched with the replies'
_TRANSCRIPT_SHARE = 0.5  # transcript work beyond that one step only while a tick is under this share of its budget
_AHEAD_FRAMES = 3         # ... or the whole budget, when every speaking reply is this many frames ahead of its reader


class CapacityError(RuntimeError):
    """The engine already serves as many conversations as it can keep real time."""


class ChromaEngine:
    """Serves many conversations on one loaded model, their frames batched per tick.

        engine = ChromaEngine(model, max_conversations=16)
        with engine.conversation(voice=voice, system_prompt="...") as conv:
            async for event in conv.respond(audio=pcm, sample_rate=8000):
                ...

    `max_conversations`: the admission limit; None measures at start how many rows a tick
    can carry within half of an 80 ms frame (the rest is headroom for reasoner steps and
    prefills). `prefill_chunk` / `prefill_budget`: reasoner prefill tokens per chunk and
    per tick, counted as the time they take at an empty context (measured at start).
    One engine per process: it owns a scheduler thread (`close()` stops it).

    Backpressure: a reply runs ahead of its consumer by at most `max_buffered` frames
    (default 64, about 5 s of audio). Past that its row sits out the ticks (its state
    kept, the other rows unaffected) until the consumer reads again, so a caller that
    stops reading holds its slot but neither grows memory nor slows anyone; `cancel()`,
    `close()` or closing the reply's iterator frees the row.

    `frame_graphs` (default: on CUDA) runs each tick's backbone step and decoder pass with
    fixed shapes (`FrameStep(fixed=True)`: one static KV cache, a row per reply, padded to
    a batch bucket 1, 2, 4, ... 256), captured on CUDA as one graph per bucket; on the CPU
    it runs eagerly (slower than the ragged step there: for tests).
    """

    def __init__(self, model: ChromaWeights, max_conversations: int | None = None, *,
                 prefill_chunk: int = 32, prefill_budget: int = 64, max_buffered: int = 64,
                 frame_graphs: bool | None = None):
        if max_conversations is not None and max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.model = model
        self.max_buffered = max_buffered
        self.prefill_chunk, self.prefill_budget = prefill_chunk, max(prefill_budget, prefill_chunk)
        self.chunk_s = 0.0  # a prefill_chunk's time at an empty context: measured on the scheduler thread
        self._reasoner_steps: ReasonerSteps | None = None
        self.frame_step = FrameStep(model, max_conversations or 1,  # fixed: calibration grows it
                                    fixed=model.device.type == "cuda" if frame_graphs is None else frame_graphs)
        self.capacity = max_conversations or self.calibrate()
        self._conversations: set[EngineConversation] = set()
        self._submitted: collections.deque[Job] = collections.deque()
        self._prefilling: collections.deque[Job] = collections.deque()
        self._speaking: list[Job] = []
        self._wakeup = threading.Condition()
        self._transcripts = TranscriptQueue(self._wakeup)
        self._lock = threading.Lock()
        self._stopping = False
        self.ticks = 0
        # (end, wall ms) of each tick that stepped replies: frame_times() and the benchmarks
        self.tick_times: collections.deque[tuple[float, float]] = collections.deque(maxlen=10000)
        self._thread = threading.Thread(target=self._loop, name="chroma-engine", daemon=True)
        self._thread.start()

    # -- admission --
    def conversation(self, voice: Voice, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                     max_history_tokens: int = 8192, *, transcribe: bool = False,
                     language: str = "English", max_transcript_tokens: int = 448) -> EngineConversation:
        """A new conversation (the `model.conversation` API plus `close()`); raises
        `CapacityError` when `capacity` conversations are already open."""
        self._admit()
        conv = EngineConversation(self, voice, system_prompt, max_history_tokens,  # unlocked: tokenizing
                                  transcribe=transcribe, language=language,
                                  max_transcript_tokens=max_transcript_tokens)
        with self._lock:
            self._admit()
            self._conversations.add(conv)
        return conv

    def _admit(self) -> None:
        if self._stopping:
            raise RuntimeError("the engine is closed")
        if len(self._conversations) >= self.capacity:
            raise CapacityError(f"the engine is at capacity: {len(self._conversations)} of {self.capacity} "
                                "conversations are open; close one (conv.close()) or start the engine "
                                "with a larger max_conversations")

    def reply_frames(self, voice: Voice, prompt: ReasonerInput, max_frames: int = 375,
                     sampling: SamplingOptions | None = None) -> Job:
        """One reply to a prepared reasoner `prompt`, outside any conversation (as
        `model.reply_frames`), made in the engine's batch: iterate it for `Frame`s (with
        their `pcm`); then `.reply.text_ids` and `.stop_reason`. It holds no slot."""
        reply = ReplyFrames(self.model, voice, prompt, max_frames, sampling or SamplingOptions(),
                            prefix=self.model.prefix_state(voice))
        return Job(self, reply)

    @property
    def active(self) -> int:
        """Open conversations."""
        return len(self._conversations)

    @property
    def load(self) -> float:
        """Open conversations / capacity, 0..1 (e.g. a worker's load report)."""
        return len(self._conversations) / self.capacity

    def frame_times(self, window_s: float = 30.0) -> dict[str, float] | None:
        """The ticks that stepped replies in the last `window_s` seconds: {"p50", "p95"} wall
        time in ms and their count, or None without any. A tick gives each speaking reply its
        next 80 ms frame, so a p95 over 80 means replies fall behind real time: the machine
        carries less than it is asked (other work on it, or too many calls), whatever the
        free slots say."""
        since = time.perf_counter() - window_s
        ms = [t for end, t in list(self.tick_times) if end >= since]
        if not ms:
            return None
        p50, p95 = np.percentile(ms, [50, 95])
        return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "ticks": len(ms)}

    def release_conversation(self, conv: EngineConversation) -> None:
        with self._lock:
            self._conversations.discard(conv)

    def close(self) -> None:
        """Stop the scheduler: running replies end as cancelled; no new conversations."""
        with self._lock:
            self._stopping = True
        self.wake()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @torch.inference_mode()
    def calibrate(self) -> int:
        """How many conversations a tick can carry: times the batched backbone step,
        decoder pass and codec frames for 1, 2, 4, ... rows over a 256-position cache and
        keeps the largest within half of an 80 ms frame (at least 1, at most 256; a row count
        that runs out of memory ends the search); with `frame_graphs`, the fixed-shape step
        (on CUDA its graphs, captured on the way), which then keeps that many rows' buffers."""
        m, cfg = self.model, self.model.config
        best, rows = 1, 1
        with batch_invariant():
            while rows <= _MAX_CAPACITY:
                codecs = [StreamingMimiDecoder(m.codec_model, cfg.num_codebooks) for _ in range(rows)]
                times = []
                try:
                    for _ in range(2):
                        start = time.perf_counter()
                        codes = self.frame_step.trial(rows, 256)
                        decode_frames(codecs, codes.clamp(max=cfg.codec_vocab - 1))
                        times.append(time.perf_counter() - start)
                except torch.OutOfMemoryError:  # e.g. the fixed step's KV cache at this many rows
                    break
                if min(times) > _TICK_BUDGET_S / 2:
                    break
                best, rows = rows, rows * 2
        if self.frame_step.fixed and self.frame_step.rows > bucket(best):  # grown past the rows kept: smaller buffers
            self.frame_step = FrameStep(m, best, fixed=True)
        _log.info("engine capacity: %d conversations", best)
        return best

    # -- the scheduler --
    def submit(self, job: Job) -> None:
        with self._wakeup:
            self._submitted.append(job)
            self._wakeup.notify()

    def submit_transcript(self, job: TranscriptPass, after: Job | None = None) -> None:
        """Make `job`'s transcript, starting once `after` (its turn's reply) has prefilled or ended."""
        with self._wakeup:
            if self._stopping:
                job.fail(RuntimeError("the engine is closed"))
                return
            self._transcripts.submit(job, after)
            self._wakeup.notify()

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _loop(self) -> None:
        with torch.inference_mode(), batch_invariant():
            self.model.warm_invariant()  # the CPU's kernels now, on this thread: memory taken before the first call
            self.chunk_s = self._time_chunk()
            if self.frame_step.graphs_enabled:  # CUDA: the usual graphs now, not at a bucket's first tick
                try:
                    self.frame_step.capture([SamplingOptions(greedy=True), SamplingOptions()])
                except Exception:  # each is captured at its first use instead
                    _log.exception("capturing the engine's CUDA graphs ahead failed")
            engines_running(+1)  # the loaded model frozen out of garbage collections, the young collected less often
            while True:
                with self._wakeup:
                    while not (self._stopping or self._submitted or self._prefilling or self._transcripts.has_work()
                               or any(job.runnable for job in self._speaking)):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    while self._submitted:
                        self._prefilling.append(self._submitted.popleft())
                try:
                    self._tick()
                except Exception:  # a bug outside any one reply: keep serving the others
                    _log.exception("engine tick failed")
                    for job in list(self._prefilling) + self._speaking + self._transcripts.active():
                        self._fail(job, RuntimeError("the engine's step failed"))
            for job in list(self._submitted) + list(self._prefilling) + self._speaking:
                self._end(job, "cancelled")
            self._transcripts.fail_all(RuntimeError("the engine is closed"))
        engines_running(-1)

    def _tick(self) -> None:
        start = time.perf_counter()
        cancelled = [job for job in self._prefilling if job.cancelled.is_set()]
        speaking, full = [], self.max_buffered
        for job in self._speaking:  # one pass: the cancelled, and those whose consumer has room (`Job.runnable`)
            if job.cancelled.is_set():
                cancelled.append(job)
            elif job.out.qsize() < full:
                speaking.append(job)
        for job in cancelled:
            self._end(job, "cancelled")  # cancel frees the slot at the frame boundary
        # replies that finish prefilling now speak from the next tick; a full queue sits out
        budget = self._prefill()
        if speaking:
            self._frame(speaking)
        else:
            self._reason([], [])  # transcripts only
        # replies running ahead of their callers have time to spare: transcripts may fill the tick
        ahead = all(job.out.qsize() >= _AHEAD_FRAMES for job in speaking)
        until = start + (1.0 if ahead else _TRANSCRIPT_SHARE) * _TICK_BUDGET_S
        if not self._prefilling:  # replies first: a caller waiting for first audio never waits for a transcript
            self._transcripts.prefill(max(budget, until - time.perf_counter()), 4 * self.prefill_chunk, self._steps,
                                      self._isolated, self._sync)
        self._more_transcript_steps(until)
        if speaking:  # the whole tick: every bit of work delays the next frame
            end = time.perf_counter()
            self.tick_times.append((end, (end - start) * 1000))
        self.ticks += 1

    def _time_chunk(self) -> float:
        """The time of a `prefill_chunk`-token prefill step at an empty context (best of 3)."""
        reasoner, times = Reasoner(self.model), []
        for _ in range(4):
            start = time.perf_counter()
            reasoner.feed([0] * self.prefill_chunk)
            self._sync()
            times.append(time.perf_counter() - start)
            reasoner.rewind(0)
        return min(times[1:])

    def _sync(self) -> None:
        if self.model.device.type == "cuda":  # a step is timed once its kernels ran
            torch.cuda.synchronize(self.model.device)

    def _prefill(self) -> float:
        """Prefill steps, round-robin over the waiting replies, for up to the tick's budget
        (the time `prefill_budget` tokens take at an empty context); what is left of it."""
        budget = self.chunk_s * self.prefill_budget / self.prefill_chunk
        while self._prefilling and budget > 0:
            job = self._prefilling.popleft()
            before, start = job.reply.context_tokens, time.perf_counter()
            try:
                next(job.prefill)
                self._prefilling.append(job)  # more chunks to go: back of the line
            except StopIteration:
                try:
                    self._start_speaking(job)
                except Exception as failure:
                    self._fail(job, failure)
            except Exception as failure:
                self._fail(job, failure)
            self._sync()
            spent = time.perf_counter() - start
            job.pace(job.reply.context_tokens - before, spent)
            budget -= spent
        return budget

    def _more_transcript_steps(self, until: float) -> None:
        """Full transcript steps, batched, until `until` (the tick's share for them) while no
        reply waits to prefill."""
        if self._prefilling:
            return
        for _ in range(_TRANSCRIPT_STEPS):
            if not self._transcripts.active() or time.perf_counter() > until:
                return
            self._reason([], [])
            self._sync()

    def _start_speaking(self, job: Job) -> None:
        plan = job.reply.row_plan()
        job.slot = self.frame_step.acquire(plan.prefix, plan.positions)
        self._speaking.append(job)

    def _frame(self, jobs: list[Job]) -> None:
        """One frame of every speaking reply: backbone, decoder, codec, reasoner halves."""
        plans = {}
        for job in jobs:
            try:
                plans[job] = job.reply.plan()  # noise drawn once, outside any retry below
            except Exception as failure:
                self._fail(job, failure)
        jobs, codes = self._isolated(list(plans), lambda js: self.frame_step.step(  # [rows, codebooks]
            [j.slot for j in js], [plans[j].inputs for j in js], [plans[j].sampler for j in js]), torch.cat)
        if not jobs:
            return self._reason([], [])
        # for all rows at once: end of speech, and each frame's embedding (staged: its reply's next input)
        cfg = self.model.config
        eos = (codes[:, : cfg.num_codebooks - 1] == cfg.eos_token_id).all(dim=1).tolist()
        embeddings = self.model.embed_frame(codes)
        staged = self.frame_step.stage([j.slot for j in jobs], 0, [embeddings]) or embeddings[:, None, None].unbind(0)
        rows, where = codes.unbind(0), dict(zip(jobs, range(len(jobs))))
        speaking = jobs if True not in eos else [job for job, end in zip(jobs, eos) if not end]
        for job in (() if speaking is jobs else [job for job, end in zip(jobs, eos) if end]):  # no frame: the end
            try:
                job.reply.apply_row(None, None, True)
                self._end(job, "eos")
            except Exception as failure:
                self._fail(job, failure)
        # one codec pass for every frame (each row its own stream state), then the frames out
        streams, audio = self._isolated(speaking, lambda js: decode_frames([j.codec for j in js], (
            codes if js is jobs else codes[[where[j] for j in js]])).float().cpu().numpy(), np.concatenate)
        due_first, due_second = [], []
        wakes: dict = {}   # each consumer loop woken once for the tick's frames
        for i, pcm in zip(range(len(jobs)) if streams is jobs else [where[j] for j in streams], audio):
            job = jobs[i]
            reply = job.reply
            try:
                frame = reply.apply_row(rows[i], staged[i], False)
            except Exception as failure:
                self._fail(job, failure)
                continue
            frame.pcm = pcm
            job.deliver(frame, wakes)
            job.spoken = True
            try:
                if reply.stop_reason is not None:
                    self._end(job, reply.stop_reason)
                elif plan := reply.reasoner_plan():
                    (due_first if plan.half == "first" else due_second).append((job, plan))
            except Exception as failure:
                self._fail(job, failure)
        wake_readers(wakes)  # before the reasoner halves: the frames go out now
        self._reason(due_first, due_second)

    def _reason(self, starting: list, finishing: list) -> None:
        """The due reasoner halves, batched: (job, its `ReasonerPlan`) each, plus one whole
        greedy step of every transcript being made (its rows in both halves' batches)."""
        transcripts = list(self._transcripts.active())
        if not (starting or finishing or transcripts):
            return
        steps = self._steps(((starting or finishing)[0][1] if starting or finishing else transcripts[0]).reasoner)
        plans = dict(starting) if starting or transcripts else {}  # the first half's (none: nothing to build)
        for job in transcripts:
            plans[job] = job  # a transcript is its own plan: its `reasoner` and the `token` to feed
        rows, xs = self._isolated([j for j, _ in starting] + transcripts, lambda js: steps.first(
            [plans[j].reasoner for j in js], [plans[j].token for j in js]))
        held = {}
        for job, x in zip(rows, xs):
            if isinstance(job, TranscriptPass):
                held[job] = x
            else:
                job.reasoner_x = x
        batch, reasoners, xs = [], [], []  # replies first
        for job, plan in finishing:
            batch.append(job)
            reasoners.append(plan.reasoner)
            xs.append(job.reasoner_x)
            job.reasoner_x = None
        for job, x in held.items():
            batch.append(job)
            reasoners.append(job.reasoner)
            xs.append(x)
        def second(js: list) -> ReasonerRows:  # all of `batch`, or (a retry) one of its jobs
            picked = range(len(batch)) if js is batch else [batch.index(js[0])]
            return steps.second([reasoners[i] for i in picked], [xs[i] for i in picked])
        rows, out = self._isolated(batch, second, ReasonerRows.join)
        replies, slots = [], []
        for job, token in zip(rows, out.tokens if rows else ()):
            if isinstance(job, TranscriptPass):
                job.take(token)
            else:
                replies.append(job.reply)
                slots.append(job.slot)
        if replies:  # h and T(t) staged after each one's frame embedding: its next input, whole
            h, embedded = out.h[: len(replies)], out.embedded[: len(replies)]
            apply_reasoners(replies, h, out.tokens, embedded, self.frame_step.stage(slots, 1, [h, embedded]))

    def _steps(self, reasoner: Reasoner) -> ReasonerSteps:
        """The batched reasoner steps (made from the first reasoner seen: they share the weights)."""
        if self._reasoner_steps is None:
            self._reasoner_steps = ReasonerSteps(reasoner)
        return self._reasoner_steps

    def _isolated(self, jobs: list, run, join=None) -> tuple[list, list]:
        """`engine_jobs.isolated` failing each job that fails alone with `_fail`."""
        return isolated(jobs, run, self._fail, join)

    def _fail(self, job: Job | TranscriptPass, failure: BaseException) -> None:
        if isinstance(job, TranscriptPass):  # its transcript ends failed; the reply goes on
            _log.warning("a transcript failed in the engine: %r", failure)
            job.fail(failure)
            return
        _log.warning("a reply failed in the engine: %r", failure)
        job.deliver(failure)
        self._end(job, "error")

    def _end(self, job: Job, reason: str) -> None:
        job.prefill.close()
        job.reply.end(reason)  # cut short in its prefill: the reasoner forgets it
        if job.slot is not None or job in self._speaking:  # a reply with a row speaks: one scan, not two
            self._speaking.remove(job)
        elif job in self._prefilling:
            self._prefilling.remove(job)
        if job.slot is not None:
            self.frame_step.release(job.slot)
        job.codec = job.reasoner_x = job.slot = None  # its caches go with it
        job.deliver(END)
        job.finished.set()
