"""A real `chroma-agent serve KIND` process for the end-to-end server tests: started on a
free loopback port with its log in a file, ready once `/health` answers, stopped with
SIGTERM (the server drains) and killed if it does not exit in time."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240     # a model load on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppThread:
    """A FastAPI app under uvicorn in a daemon thread (no signals there), on loopback `port`
    (default: a free one); `config`: more uvicorn options. `start()` returns once uvicorn
    listens, `stop()` ends it."""

    def __init__(self, app, port: int | None = None, **config):
        import uvicorn

        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    **{"log_level": "warning", **config}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30) -> "AppThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


class ServerProcess:
    """`chroma-agent serve KIND ARGS... --port P`. `env` is added to this process's
    environment less the variables starting with one of `drop_env`; `base_host` is the
    host of `base` (the server's address); `stop_wait_s`: how long `stop` waits for the
    exit after SIGTERM (the drain) before it kills."""

    def __init__(self, kind: str, args: Sequence[str], log: Path, *, env: dict | None = None,
                 drop_env: tuple[str, ...] = (), base_host: str = "127.0.0.1", stop_wait_s: float = 15):
        self.port = free_port()
        self.base = f"http://{base_host}:{self.port}"
        self.log = log
        self.stop_wait_s = stop_wait_s
        cmd = [sys.executable, "-m", "chroma_agent.cli", "serve", kind, *args, "--port", str(self.port)]
        environment = {k: v for k, v in os.environ.items() if not k.startswith(drop_env)}
        environment.update(env or {})
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def health(self) -> dict:
        """/health's JSON (an HTTPError, an OSError, on a 503)."""
        with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
            return json.loads(r.read())

    async def wait_active(self, n: int, timeout: float = 10.0, poll_s: float = 0.1) -> None:
        """Until /health says `n` calls (sessions) are running; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while (active := self.health()["active_calls"]) != n:
            assert time.monotonic() < deadline, f"active_calls stayed {active}, expected {n} within {timeout} s"
            await asyncio.sleep(poll_s)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
