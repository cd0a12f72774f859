"""Server VAD for every stream of a process in one Silero inference per 32 ms step.

Each stream's `StreamingVAD.push` used to run its own Silero model window by window (one
model load per stream, one inference per 512-sample window per stream). Here one
onnxruntime session of the `silero-vad` package's model serves every stream, and the
windows that streams hand in at about the same time go through it as one batch: Silero's
state (2 x 128 per stream) and its 64-sample context are inputs and outputs, kept per
stream, so a batch is simply the streams' rows stacked. A stream's own windows stay in
order (one window per stream per step); streams come and go between steps.

`VADBatcher.score(stream, windows)` blocks its caller until its windows are scored;
`await VADBatcher.score_async(...)` waits on the caller's event loop instead (no thread held,
each loop woken once per step for all of its streams). One daemon thread per process runs the
steps.
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading

import numpy as np

WINDOW = 512          # samples per window at 16 kHz (Silero's 32 ms)
CONTEXT = 64          # samples of the previous window each window is scored with


@functools.cache
def _session():
    import importlib.util

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1  # many small batches: one core, no spin-up
    # found without importing the package: its import sets torch's threads to 1 process-wide
    package = importlib.util.find_spec("silero_vad").submodule_search_locations[0]
    path = os.path.join(package, "data", "silero_vad.onnx")
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class StreamState:
    """One stream's Silero state between windows."""

    def __init__(self):
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)

    def reset(self) -> None:
        self.state[:] = 0
        self.context[:] = 0


class _Request:
    def __init__(self, stream: StreamState, windows: np.ndarray, loop: asyncio.AbstractEventLoop | None = None):
        self.stream, self.windows = stream, windows      # [n, WINDOW]
        self.probs = np.zeros(len(windows), np.float32)
        self.next = 0
        self.error: BaseException | None = None
        self.loop = loop                                 # an async caller's loop, else a thread waits on `done`
        self.future = loop.create_future() if loop is not None else None
        self.done = threading.Event() if loop is None else None

    def result(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.probs


class VADBatcher:
    """Scores windows of many streams, one batched Silero step per window position."""

    def __init__(self):
        self._pending: list[_Request] = []
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0       # batched inferences run (for tests and benchmarks)
        self.rows = 0        # windows scored

    def score(self, stream: StreamState, windows: np.ndarray) -> np.ndarray:
        """Speech probabilities of `windows` [n, WINDOW] (float32, 16 kHz), in order, on
        `stream`'s state. Blocking. A stream must not be scored from two threads at once."""
        if not len(windows):
            return np.zeros(0, np.float32)
        request = self._queue(_Request(stream, np.asarray(windows, np.float32)))
        request.done.wait()
        return request.result()

    async def score_async(self, stream: StreamState, windows: np.ndarray) -> np.ndarray:
        """`score`, awaited on the running event loop (no thread held while it waits)."""
        if not len(windows):
            return np.zeros(0, np.float32)
        request = self._queue(_Request(stream, np.asarray(windows, np.float32), asyncio.get_running_loop()))
        await request.future
        return request.result()

    def _queue(self, request: _Request) -> _Request:
        with self._wakeup:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chroma-vad", daemon=True)
                self._thread.start()
            self._pending.append(request)
            self._wakeup.notify()
        return request

    def _run(self) -> None:
        session = _session()
        sr = np.array(16000, dtype=np.int64)
        while True:
            with self._wakeup:
                while not self._pending:
                    self._wakeup.wait()
                batch = list(self._pending)  # one window of each waiting stream
            try:
                x = np.stack([np.concatenate([r.stream.context, r.windows[r.next]]) for r in batch])
                state = np.concatenate([r.stream.state for r in batch], axis=1)
                probs, state = session.run(None, {"input": x, "state": state, "sr": sr})
            except Exception as failure:  # noqa: BLE001 - its requests fail, the batcher goes on
                for request in batch:
                    request.error = failure
                probs = None
            self.steps += 1
            self.rows += len(batch)
            finished = []
            for i, request in enumerate(batch):
                if probs is not None:
                    request.probs[request.next] = probs[i, 0]
                    request.stream.state = state[:, i: i + 1].copy()
                    request.stream.context = x[i, -CONTEXT:].copy()
                    request.next += 1
                if request.error is not None or request.next == len(request.windows):
                    finished.append(request)
            with self._wakeup:
                for request in finished:
                    self._pending.remove(request)
            loops: dict = {}   # an event loop's finished requests, woken in one call
            for request in finished:
                if request.loop is None:
                    request.done.set()
                else:
                    loops.setdefault(request.loop, []).append(request.future)
            for loop, futures in loops.items():
                try:
                    loop.call_soon_threadsafe(_resolve, futures)
                except RuntimeError:  # its loop has closed: nobody waits any more
                    pass


def _resolve(futures: list) -> None:
    for future in futures:
        if not future.done():  # a cancelled waiter (its session went away) is skipped
            future.set_result(None)


BATCHER = VADBatcher()   # the process's one
