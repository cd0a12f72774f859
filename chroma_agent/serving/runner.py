"""What every `chroma-agent serve KIND` shares: uvicorn with a graceful drain on SIGTERM.

    from chroma_agent.serving.runner import run
    run(app, host="0.0.0.0", port=8765, drain=lambda: server.drain(30.0))   # blocks

`add_health(app, server)` is the `/health` route, 503 while the server drains (FastAPI is
imported inside it); `call_server.CallServer` is the skeleton every server builds on
(admission, drain, `/health`'s one schema) over these pieces.
`drain_calls` is the drain itself, over a server's own calls: stop taking new ones (the
server's job, before it calls this), let the running ones go on up to a deadline, then end
them. `call_ended()` hands a finished call's freed memory back to the operating system.
`share_cpu_with_calls()` leaves the calls' audio a core the model's threads never take.
uvicorn is imported inside `run`: importing this module imports no framework.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Sequence


log = logging.getLogger(__name__)
_trim_lock = threading.Lock()
_trim = None

DEFAULT_DRAIN_S = 30.0   # SIGTERM: running calls may finish for this long
END_TIMEOUT_S = 5.0      # an ended call's pipeline and stream are gone within this


async def until(done: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Wait until `done()` is true, for at most `timeout` seconds; whether it is."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    return done()


async def drain_calls(running: Callable[[], int], seconds: float, ends: Sequence[Callable[[], Awaitable[None]]],
                      say: Callable[[str], None], what: str = "calls") -> int:
    """Let the `running()` calls go on for up to `seconds`, then end them: each of `ends`
    in turn (e.g. end each call politely, then cancel the tasks of those that would not),
    until none is left, waiting up to END_TIMEOUT_S after each. `say` logs a line.
    Returns how many calls are left."""
    say(f"draining: no new {what}; {running()} running may go on for up to {seconds:g} s")
    if await until(lambda: not running(), seconds, poll=0.1):
        say(f"drained: no {what} running")
        return 0
    say(f"drain time is over: ending {running()} {what}")
    for end in ends:
        await end()
        if await until(lambda: not running(), END_TIMEOUT_S):
            break
    say(f"drained: {running()} {what} left")
    return running()


def add_health(app, server) -> None:
    """`GET /health` on a FastAPI `app`: `server.health()` as JSON, with HTTP 503 while
    `server.draining`, so a load balancer's health check takes it out of rotation."""
    from fastapi.responses import JSONResponse

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(server.health(), status_code=503 if server.draining else 200)


def run(app, *, host: str, port: int, drain: Callable[[], Awaitable[None]] | None = None,
        drain_signals: tuple[int, ...] = (signal.SIGTERM,), calls: int | None = None, **config) -> None:
    """Serve an ASGI `app` with uvicorn until it stops (blocks); `config`: more
    `uvicorn.Config` options (log_level, ws_max_size, ...).

    With `drain` (a coroutine function that returns once no call is left), the first of
    `drain_signals` drains instead of stopping: `drain()` runs, then uvicorn stops and the
    process exits normally (0), where uvicorn alone would close every connection at once
    and re-raise the signal. A signal during the drain stops at once (a SIGINT without
    waiting for open connections). Other signals are uvicorn's own.

    Every connection is bounded (`connection_limits.uvicorn_limits`: a request must arrive
    whole within a few seconds, header size, connections) and every log line escapes the
    client's strings. `calls` (the most calls at once), when given: the event loop gets
    `worker_pool()`'s threads, started up front, for `asyncio.to_thread`."""
    import uvicorn

    base = _call_server(uvicorn.Server, WORKER_THREADS if calls else None)
    server = base if drain is None else _draining_server(base, drain, drain_signals)
    from .connection_limits import escape_client_strings, uvicorn_limits

    settings = uvicorn.Config(app, host=host, port=port, **{**uvicorn_limits(), **config})
    escape_client_strings()   # after uvicorn has set up its log handlers
    server(settings).run()


WORKER_THREADS = 16  # a call server's loop's worker threads, however many calls it takes


def worker_pool(threads: int = WORKER_THREADS) -> ThreadPoolExecutor:
    """The worker threads of a call server's loop, all started now, so the process's thread
    count is the same with one call or a hundred. A speaking reply holds none (its frames
    reach the loop through it, runtime/engine_jobs.py), nor does a call's audio (the VAD
    runs batched on the loop); a call takes one for its short blocking work (a turn's audio
    features, a reply's start and end, a close) only while it runs. asyncio's default (CPU
    cores + 4, e.g. 6 on 2 cores, started one by one as work comes) was too few when every
    waiting reply held a thread."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chroma-worker")
    together = threading.Barrier(threads)   # each task holds its thread until all have one: `threads` threads
    for started in [pool.submit(together.wait, 10) for _ in range(threads)]:
        started.result()
    return pool


def _call_server(base, threads: int | None):
    class CallServer(base):
        """uvicorn, its loop given the worker threads, large blocks kept out of glibc's heap,
        and what is loaded by now (the model, the libraries: ~450k objects) frozen out of the
        garbage collector's full passes."""

        async def serve(self, sockets=None):
            if threads:
                asyncio.get_running_loop().set_default_executor(worker_pool(threads))
            keep_large_blocks_out_of_the_heap()
            freeze_loaded_objects()
            await super().serve(sockets)

    return CallServer


def _draining_server(base, drain: Callable[[], Awaitable[None]], drain_signals: tuple[int, ...]):
    class DrainingServer(base):
        """uvicorn, whose drain signal drains the calls first."""

        draining = False

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()   # before uvicorn's signal handlers are set
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            # a signal handler: flags and a thread-safe call only (no logging: its lock)
            if self.draining:
                self.should_exit = True
                self.force_exit = sig == signal.SIGINT
            elif sig in drain_signals and not self.should_exit:
                self.draining = True
                self.loop.call_soon_threadsafe(self._start_drain)
            else:
                super().handle_exit(sig, frame)

        def _start_drain(self) -> None:
            self.drain_task = asyncio.create_task(self._drain())   # held: a task only weakly referenced may vanish

        async def _drain(self) -> None:
            try:
                await drain()
            except Exception:   # stop all the same: a drain that failed must not keep the process up
                log.exception("the drain failed")
            finally:
                self.should_exit = True

    return DrainingServer


# -- CPU ---------------------------------------------------------------------------------

def share_cpu_with_calls(threads: int | None = None) -> int:
    """Set torch's intra-op threads for a server process; the number set. By default one
    fewer than the cores this process may use (at least 1), never more than torch's own
    default. The model's steps share the CPU with every call's audio (the event loop,
    VAD and turn models, codecs); torch's parallel regions wait for all of their threads,
    so one thread preempted by a call's work stalls the whole step, and every call's audio
    with it (paired soaks: benchmarks/README.md, "Soak")."""
    import torch

    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, min(torch.get_num_threads(), cores - 1))
    torch.set_num_threads(threads)
    return threads


# -- memory --------------------------------------------------------------------------------
# A call's pipeline, codec state and buffers are freed when it ends (its reference cycles by
# the collection in `call_ended`), but glibc keeps freed heap pages (large tensors too: its
# mmap threshold grows with use) for reuse, spread over per-thread arenas, so a server's
# resident memory creeps up call after call although nothing leaks (measured on the phone
# server: +100 MB over 12 sequential calls; with a trim after each, flat within 1%).
# `malloc_trim` returns those pages; elsewhere than glibc, a no-op.

def _glibc(name: str, argtypes: list, restype):
    """libc's function `name` with its signature set; None where libc has none (not
    glibc: macOS, musl)."""
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def _load_trim():
    global _trim
    if _trim is None:   # False once found missing: nothing to trim
        _trim = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int) or False
    return _trim


M_MMAP_THRESHOLD = -3                # glibc's mallopt parameter
LARGE_BLOCK_BYTES = 256 << 10        # blocks from this size up: their own mappings, always


def keep_large_blocks_out_of_the_heap(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """glibc: allocate every block of `threshold` bytes or more as its own mapping, which
    goes back to the OS the moment it is freed; True if set (False elsewhere than glibc).
    By default glibc raises that threshold to the size of each large block freed (up to
    32 MB), after which such blocks (a call's tensors, audio buffers) come from the heap
    arenas, where freed pages stay with the process between live neighbours that
    `malloc_trim` cannot move: with heaptrack, a realtime soak's server held 2 MB more
    live memory after its calls than before, its RSS 62 MB more. Fixing the threshold
    stops the drift; each call's large blocks cost an mmap/munmap instead (microseconds)."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1


def release_free_memory() -> bool:
    """Return freed heap pages to the OS (glibc `malloc_trim(0)`); True if any went back.
    It walks the heap (a few ms): call it from a worker thread, never on an event loop.
    Calls at the same time coalesce into one."""
    trim = _load_trim()
    if not trim or not _trim_lock.acquire(blocking=False):
        return False
    try:
        return bool(trim(0))
    except Exception:   # housekeeping never fails a call's teardown
        log.debug("malloc_trim failed", exc_info=True)
        return False
    finally:
        _trim_lock.release()


def freeze_loaded_objects() -> None:
    """Move every object alive now (a loaded server: model, libraries) out of the garbage
    collector's reach (`gc.freeze`). Python's full collection walks all tracked objects:
    ~230 ms with the event loop stopped, every couple of minutes under calls (a gap in
    every call's audio), and a call's pipeline is in reference cycles, so its memory (two
    ONNX sessions, ~35 MB) waited for it: RSS climbed ~20 MB/s with 8 phone calls, then
    fell. Frozen, a full collection sees only the calls' objects (about a millisecond)."""
    gc.collect()
    gc.freeze()


def _collect_and_trim() -> None:
    gc.collect()   # the ended call's cycles (cheap once `freeze_loaded_objects` ran)
    release_free_memory()


def call_ended() -> None:
    """A call has ended and its objects are dropped: collect its reference cycles and
    release the freed memory, in a worker thread (from a running event loop; returns at
    once)."""
    asyncio.get_running_loop().run_in_executor(None, _collect_and_trim)
