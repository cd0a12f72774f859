"""`chroma_agent.serving.run`'s signals, in a real process with a minimal app (no model):
SIGTERM drains and exits 0, a second signal during the drain stops at once, a signal that
does not drain is uvicorn's own."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from .server_process import REPO, free_port

pytest.importorskip("fastapi")

# A server whose drain takes DRAIN_S unless interrupted; /health says "draining" meanwhile.
APP = """
import asyncio, sys
from fastapi import FastAPI
from chroma_agent.serving import add_health, run

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
run(app, host="127.0.0.1", port=int(sys.argv[1]), drain=server.drain, log_level="warning")
"""


def _health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _start(drain_s: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), str(drain_s)], cwd=REPO,
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


def _until_draining(port: int) -> None:
    deadline = time.monotonic() + 5
    while _health(port)[0] != 503:
        assert time.monotonic() < deadline, "/health did not turn 503 after SIGTERM"
        time.sleep(0.05)
    assert _health(port) == (503, '{"status":"draining"}')


@pytest.mark.timeout(60)
def test_sigterm_drains_then_exits_0():
    proc, port = _start(drain_s=1.5)
    try:
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _until_draining(port)
        assert proc.wait(15) == 0
        assert time.monotonic() - signalled > 1.4   # it waited for the drain
        out = proc.stdout.read()
        assert "drain started" in out and "drain ended" in out
    finally:
        proc.kill()


@pytest.mark.timeout(60)
def test_a_second_signal_during_the_drain_stops_at_once():
    proc, port = _start(drain_s=60)
    try:
        proc.send_signal(signal.SIGTERM)
        _until_draining(port)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0 and time.monotonic() - stopped < 10
        assert "drain ended" not in proc.stdout.read()
    finally:
        proc.kill()


@pytest.mark.timeout(60)
def test_ctrl_c_is_uvicorns_own_when_it_does_not_drain():
    proc, port = _start(drain_s=60)
    try:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(15)
        assert code != 0 and "drain started" not in proc.stdout.read()   # re-raised: KeyboardInterrupt
    finally:
        proc.kill()
