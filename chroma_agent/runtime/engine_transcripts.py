"""The engine's caller transcripts: which passes wait for their reply, which are prefilling
(their prompts' rows batched together, a step at a time, with what the replies' prefills
leave of a tick's budget), and which are making tokens (rows of the tick's batched
reasoner steps, engine.py). All of it runs on the scheduler's thread except `submit`."""
from __future__ import annotations

import threading
import time
from typing import Callable

from .engine_jobs import Job
from .transcription import TranscriptPass


def may_start(after: Job | None) -> bool:
    """A transcript starts once its reply has put out its first frame (or ended): its first
    audio never waits for it, and the reply's prefill has run the audio tower it reuses."""
    return after is None or after.spoken or after.finished.is_set()


class TranscriptQueue:
    """The transcripts of one engine, from `submit` to their last token."""

    def __init__(self, lock: threading.Condition):
        self._lock = lock                    # the engine's wakeup condition: `submit` comes from other threads
        self.waiting: list[tuple[TranscriptPass, Job | None]] = []
        self.prefilling: list[TranscriptPass] = []   # their prompts going in, a batched step at a time
        self.making: list[TranscriptPass] = []

    def submit(self, job: TranscriptPass, after: Job | None) -> None:
        """Under the engine's lock."""
        self.waiting.append((job, after))

    def has_work(self) -> bool:
        """Anything for a tick to do (under the engine's lock)."""
        return bool(self.prefilling or self.making or any(may_start(after) for _, after in self.waiting))

    def prefill(self, budget: float, rows: int, steps: Callable[[object], object], isolated: Callable,
                sync: Callable[[], None]) -> None:
        """Start the passes whose reply has spoken, then run batched prefill steps (about
        `rows` prompt rows each, shared out among the prefilling passes) for up to `budget`
        seconds. `steps(reasoner)`: the engine's `batch.ReasonerSteps`; `isolated(jobs, run)`:
        the engine's batch runner that fails only the rows that fail alone."""
        with self._lock:
            ready = [(job, after) for job, after in self.waiting if may_start(after)]
            for pair in ready:
                self.waiting.remove(pair)
        for job, after in ready:
            if after is not None and after.prompt_end is not None:
                job.adopt(after.reply.prompt)  # the reply's audio-tower output: the tower runs once per turn
            if job.begin_rows():
                self.prefilling.append(job)
        while self.prefilling and budget > 0:
            start = time.perf_counter()
            each = max(8, rows // len(self.prefilling))
            pieces = {job: job.next_rows(each) for job in self.prefilling}
            batch = steps(pieces[self.prefilling[0]][0])
            jobs, tokens = isolated(list(pieces), lambda jobs: batch.prefill(
                [pieces[j][0] for j in jobs], [pieces[j][1] for j in jobs], [pieces[j][2] for j in jobs]))
            for job, token in zip(jobs, tokens):
                job.rows_done(pieces[job][1].shape[1], token)
            for job in [job for job in self.prefilling if job.prefilled or job.finished]:
                self.prefilling.remove(job)
                if not job.finished:
                    self.making.append(job)
            sync()
            budget -= time.perf_counter() - start

    def active(self) -> list[TranscriptPass]:
        """The passes making tokens (finished ones dropped)."""
        self.making = [job for job in self.making if not job.finished]
        return self.making

    def fail_all(self, failure: BaseException) -> None:
        """End every transcript (the engine is closing)."""
        with self._lock:
            jobs = [job for job, _ in self.waiting] + list(self.prefilling) + self.making
            self.waiting, self.making = [], []
            self.prefilling.clear()
        for job in jobs:
            job.fail(failure)
