"""The engine's caller transcripts: which passes wait for their reply, which are prefilling
(a `prefill_chunk` at a time, with what the replies' prefills leave of a tick's budget),
and which are making tokens (rows of the tick's batched reasoner steps, engine.py).
All of it runs on the scheduler's thread except `submit`."""
from __future__ import annotations

import collections
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
        self.prefilling: collections.deque = collections.deque()  # (pass, its prefill steps)
        self.making: list[TranscriptPass] = []

    def submit(self, job: TranscriptPass, after: Job | None) -> None:
        """Under the engine's lock."""
        self.waiting.append((job, after))

    def has_work(self) -> bool:
        """Anything for a tick to do (under the engine's lock)."""
        return bool(self.prefilling or self.making or any(may_start(after) for _, after in self.waiting))

    def prefill(self, budget: float, chunk: int, sync: Callable[[], None]) -> None:
        """Start the passes whose reply has spoken, then run prefill steps round-robin for
        up to `budget` seconds."""
        with self._lock:
            ready = [(job, after) for job, after in self.waiting if may_start(after)]
            for pair in ready:
                self.waiting.remove(pair)
        for job, after in ready:
            if after is not None and after.prompt_end is not None:
                job.adopt(after.reply.prompt)  # the reply's audio-tower output: the tower runs once per turn
            self.prefilling.append((job, job.prefill_steps(chunk)))
        while self.prefilling and budget > 0:
            job, steps = self.prefilling.popleft()
            start = time.perf_counter()
            try:
                next(steps)
                self.prefilling.append((job, steps))
            except StopIteration:
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
            jobs = [job for job, _ in self.waiting] + [job for job, _ in self.prefilling] + self.making
            self.waiting, self.making = [], []
            self.prefilling.clear()
        for job in jobs:
            job.fail(failure)
