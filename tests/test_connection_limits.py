"""Every server's connections, through `chroma_agent.serving.runner.run` in a real process with a
minimal app (no model): half-sent requests and silent connections are closed within the
request deadline while a well-behaved client is served; a client's control characters never
start a log line (the access log and the app's own lines)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from chroma_agent.serving.connection_limits import REQUEST_TIMEOUT_S
from chroma_agent.serving.log_safety import LogLimiter, printable

from .server_process import REPO, free_port

pytest.importorskip("fastapi")

APP = """
import logging, sys
from fastapi import FastAPI
from chroma_agent.serving.runner import run

logging.basicConfig(level=logging.INFO, format="LINE %(name)s %(message)s")
log = logging.getLogger("app")
app = FastAPI()

@app.get("/hello")
async def hello(name: str):
    log.info("hello %s", name)
    return {"hello": name}

run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("limits") / "server.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", APP, str(port)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello?name=ready", timeout=2):
                break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"the server did not start: {log_path.read_text()[-2000:]}")
    yield port, log_path
    proc.terminate()
    proc.wait(15)


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` within `within` seconds (reads EOF or a reset)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.mark.timeout(60)
def test_half_sent_requests_and_silent_connections_are_closed(server):
    port, _ = server
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in partial:   # a request line and one header, never the blank line that ends them
        s.sendall(b"GET /hello?name=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(b"POST /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nabc")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello?name=neighbour", timeout=2) as r:
            assert r.status == 200   # served beside them at once
        start = time.monotonic()
        assert all(_closed(s, REQUEST_TIMEOUT_S + 5 - (time.monotonic() - start)) for s in silent + partial)
        assert _closed(slow_body, 3)
        assert time.monotonic() - start < REQUEST_TIMEOUT_S + 5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello?name=after", timeout=2) as r:
            assert r.status == 200
    finally:
        for s in silent + partial + [slow_body]:
            s.close()


@pytest.mark.timeout(30)
def test_a_whole_request_on_a_slow_but_live_connection_is_served(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /hello?name=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(REQUEST_TIMEOUT_S / 3)
        s.sendall(b"\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


@pytest.mark.timeout(30)
def test_control_characters_from_a_client_never_start_a_log_line(server):
    port, log_path = server
    with socket.create_connection(("127.0.0.1", port)) as s:   # %0A is a newline once uvicorn decodes the path
        s.sendall(b"GET /hello?name=a%0ALINE%20forged%20127.0.0.1%20-%20%22GET%20/admin%22%20200 HTTP/1.1\r\n"
                  b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)
    lines = log_path.read_text().splitlines()
    assert not any(line.startswith("LINE forged") or line.startswith("forged") for line in lines)
    assert any("hello a\\nLINE forged" in line for line in lines)       # the app's own line, escaped
    # uvicorn's access line, its query string left out (a carrier's GET webhook carries the caller's number there)
    assert any('"GET /hello?... HTTP/1.1" 200' in line for line in lines)
    assert not any("name=a" in line for line in lines if "GET /hello" in line)


def test_printable_escapes_and_cuts():
    assert printable("id\r\nINFO forged\x1b[2J") == "id\\r\\nINFO forged\\x1b[2J"
    assert printable("x" * 200, limit=10) == "x" * 10 + "..."
    assert printable(42) == "42"


def test_log_limiter_writes_a_burst_then_counts(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("chroma_agent.serving.log_safety.time.monotonic", lambda: now[0])
    lines = []
    limiter = LogLimiter(lambda msg, *args: lines.append(msg % args), burst=3, period=60)
    for i in range(10):
        limiter("refused %d", i)
    assert lines == ["refused 0", "refused 1", "refused 2"] and limiter.suppressed == 7
    now[0] += 61   # the next period
    limiter("refused %d", 10)
    assert lines[-1] == "refused 10 (7 more like it not logged)"
