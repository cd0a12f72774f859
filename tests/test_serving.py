"""`chroma_agent.serving.runner.run`'s signals, in a real process with a minimal app (no model):
SIGTERM drains and exits 0, a second signal during the drain stops at once, a signal that
does not drain is uvicorn's own."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from chroma_agent.serving import runner as serving

from .server_process import REPO, free_port

pytest.importorskip("fastapi")

# A server whose drain takes DRAIN_S unless interrupted; /health says "draining" meanwhile.
APP = """
import asyncio, sys
from fastapi import FastAPI
from chroma_agent.serving.runner import add_health, run

class Server:
    draining = False
    def health(self):
        return {"status": "draining" if self.draining else "ok"}
    async def drain(self):
        self.draining = True
        print("drain started", flush=True)
        await asyncio.sleep(float(sys.argv[2]))
        print("drain ended", flush=True)

server, app = Server(), FastAPI()
add_health(app, server)
@app.get("/parallel")
async def parallel():   # 12 blocking waits of 0.3 s at once through asyncio.to_thread
    import time
    start = time.monotonic()
    await asyncio.gather(*[asyncio.to_thread(time.sleep, 0.3) for _ in range(12)])
    return {"seconds": time.monotonic() - start}

@app.get("/call")
async def call():   # a call's objects in a reference cycle, old enough to sit in the oldest generation
    import gc, weakref
    import numpy as np
    from chroma_agent.serving.runner import call_ended

    class Call:
        pass

    c = Call()
    c.me, c.audio = c, np.ones(50 * 2**20 // 8)   # 50 MB
    gc.collect(1)
    gc.collect(1)
    ref = weakref.ref(c)
    del c
    call_ended()
    for _ in range(50):
        if ref() is None:
            return {"freed": True, "frozen": gc.get_freeze_count()}
        await asyncio.sleep(0.01)
    return {"freed": False, "frozen": gc.get_freeze_count()}

calls = int(sys.argv[3]) if len(sys.argv) > 3 else None
run(app, host="127.0.0.1", port=int(sys.argv[1]), drain=server.drain, log_level="warning", calls=calls)
"""


def _health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _start(drain_s: float, *calls: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), str(drain_s), *calls], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            assert _health(port) == (200, '{"status":"ok"}')
            return proc, port
        except OSError:
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.1)


@contextlib.contextmanager
def _app(drain_s: float, *calls: str):
    """The app in its process, killed at the end whatever happened."""
    proc, port = _start(drain_s, *calls)
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def _sigterm(proc: subprocess.Popen, port: int) -> float:
    """SIGTERM, then until /health says draining (503); when it was sent."""
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while _health(port)[0] != 503:
        assert time.monotonic() - signalled < 5, "/health did not turn 503 after SIGTERM"
        time.sleep(0.05)
    assert _health(port) == (503, '{"status":"draining"}')
    return signalled


@pytest.mark.timeout(60)
def test_sigterm_drains_then_exits_0():
    with _app(drain_s=1.5) as (proc, port):
        signalled = _sigterm(proc, port)
        assert proc.wait(15) == 0 and time.monotonic() - signalled > 1.4   # it waited for the drain
        out = proc.stdout.read()
        assert "drain started" in out and "drain ended" in out


@pytest.mark.timeout(60)
def test_a_second_signal_during_the_drain_stops_at_once():
    with _app(drain_s=60) as (proc, port):
        _sigterm(proc, port)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0 and time.monotonic() - stopped < 10
        assert "drain ended" not in proc.stdout.read()


@pytest.mark.timeout(60)
def test_ctrl_c_is_uvicorns_own_when_it_does_not_drain():
    with _app(drain_s=60) as (proc, _):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) != 0   # re-raised after uvicorn's shutdown: KeyboardInterrupt
        assert "drain started" not in proc.stdout.read()


def _parallel_seconds(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/parallel", timeout=20) as r:
        return json.loads(r.read())["seconds"]


@pytest.mark.timeout(60)
def test_a_call_server_starts_its_worker_threads_up_front():
    # calls' blocking work (a turn's features, a reply's start and end) runs in worker
    # threads: 12 waits of 0.3 s at once take one round (not asyncio's default pool, CPU
    # cores + 4: several rounds on a small machine), and the threads are all there before
    # the first call, so the process's thread count does not move with the calls
    assert serving.WORKER_THREADS >= 12
    with _app(60, "8") as (proc, port):
        threads = _threads(proc.pid)
        assert _parallel_seconds(port) < 0.55
        assert _threads(proc.pid) == threads
    if (os.cpu_count() or 1) + 4 < 12:
        with _app(60) as (_, port):
            assert _parallel_seconds(port) >= 0.55


def _threads(pid: int) -> int:
    return int(open(f"/proc/{pid}/status").read().split("Threads:")[1].split()[0])


def test_freed_heap_memory_goes_back_to_the_os():
    import numpy as np

    def rss() -> int:   # bytes resident (Linux)
        status = open("/proc/self/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    pieces = [np.ones(100_000 // 8) for _ in range(2000)]   # 200 MB in heap-sized pieces
    kept = pieces[::100]   # a few live ones in between, as a server's heap has
    del pieces
    freed = rss()
    assert serving.release_free_memory()
    assert freed - rss() > 100 * 2**20
    assert len(kept) == 20


_LARGE_BLOCKS = """
import ctypes, sys
from chroma_agent.serving import runner as serving

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "fixed":
    assert serving.keep_large_blocks_out_of_the_heap()
libc.free(libc.malloc(1 << 20))      # a 1 MB block freed: glibc's default raises its threshold past it
block = libc.malloc(1 << 20)         # the next one: from the heap (default) or its own mapping
print(libc.mallinfo2().hblkhd >= 1 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
@pytest.mark.parametrize("mode, mapped", [("default", False), ("fixed", True)])
def test_large_blocks_stay_out_of_the_heap(mode, mapped):
    """After `keep_large_blocks_out_of_the_heap` a large block is its own mapping even after
    one was freed (so its pages go back when it is freed); glibc's default moves such blocks
    into the heap once one is freed, where freed pages stay with the process."""
    out = subprocess.run([sys.executable, "-c", _LARGE_BLOCKS, mode], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    if "mallinfo2" in out.stderr:
        pytest.skip("not glibc 2.33+")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(mapped)


@pytest.mark.timeout(60)
def test_a_call_that_ended_is_collected_at_once_and_the_loaded_objects_are_frozen():
    # what was loaded before serving is frozen out of the full collections (each ~230 ms
    # with a model loaded, the event loop stopped); an ended call's cycles go at once
    with _app(60) as (_, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/call", timeout=20) as r:
            answer = json.loads(r.read())
        assert answer["freed"] and answer["frozen"] > 10_000


def test_the_model_leaves_one_core_to_the_calls():
    import torch

    default = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    assert serving.share_cpu_with_calls() == torch.get_num_threads() == max(1, min(default, cores - 1))
    assert serving.share_cpu_with_calls(3) == torch.get_num_threads() == 3   # --torch-threads 3
