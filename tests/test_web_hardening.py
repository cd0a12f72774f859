"""`serve web` against other web pages and oversized bodies, on the real process over
loopback: a foreign Host (DNS rebinding) is refused on every route, an offer from another
site's page or not sent as JSON is refused, a body over the cap is refused without being
read (the server's memory stays flat), and the server's own page still gets its answer."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import sys
import time
import types

import pytest

pytest.importorskip("pipecat")   # the plugin, with aiortc
from pipecat_chroma.web_guard import ENV_ALLOWED_HOSTS, AllowedHosts, split_host  # noqa: E402

from .health_schema import check_health  # noqa: E402
from .server_process import START_TIMEOUT_S, ServerProcess  # noqa: E402

AUDIO_OFFER = json.dumps({"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"})
NO_AUDIO = json.dumps({"sdp": "v=0\r\n", "type": "offer"})   # passes every check but its own: 400, nothing held
EXTRA_HOSTS = "voice.test.example, alias.test.example:1"   # any port; only port 1
http_test = pytest.mark.timeout(60, func_only=True)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voice, tmp_path_factory):
    d = tmp_path_factory.mktemp("web_hardening")
    voice.save(d / "tiny.voice.safetensors")
    server = ServerProcess("web", ["--model", str(tiny_checkpoint), "--voice", str(d / "tiny.voice.safetensors"),
                                   "--max-frames", "40", "--max-calls", "1"], d / "server.log",
                           env={ENV_ALLOWED_HOSTS: EXTRA_HOSTS}, base_host="localhost")
    server.wait_ready()
    yield server
    server.stop()


def ask(server, method: str, path: str, body: str | bytes | None = None, **headers: str) -> tuple[int, dict, dict]:
    """(status, lower-case headers, JSON body or {}) of one request; `Host` defaults to the
    server's own (localhost:PORT); header names with _ for -."""
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    headers.setdefault("Host", f"localhost:{server.port}")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        found = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    is_json = found.get("content-type", "").startswith("application/json")
    return response.status, found, json.loads(data) if is_json else {}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def raw_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What the server sent back until it closed the connection (the guard's refusals close it)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):   # a close with our bytes unread resets, after the reply
        while chunk := sock.recv(65536):
            data += chunk
    return data


# -- the host list (no server) --

def test_allowed_hosts_are_the_loopback_names_on_the_own_port_and_the_entries():
    allowed = AllowedHosts(["Voice.Example.com", "gpu-box:8443", "[fd00::1]", " "])
    assert allowed.allows("localhost:8765", 8765) and allowed.allows("127.0.0.1:8765", 8765)
    assert allowed.allows("[::1]:8765", 8765)
    assert not allowed.allows("localhost:9999", 8765) and not allowed.allows("localhost", 8765)
    assert allowed.allows("voice.example.com", 8765) and allowed.allows("VOICE.example.com:443", 8765)   # any port
    assert allowed.allows("gpu-box:8443", 8765) and not allowed.allows("gpu-box:8765", 8765)
    assert allowed.allows("[fd00::1]:8765", 8765)
    for foreign in ("rebind.evil.example:8765", "voice.example.com.evil.example", "", "localhost:8765@evil",
                    "voice.example.com/x", "[::1", "localhost:0", "localhost:x"):
        assert not allowed.allows(foreign, 8765), foreign
    assert split_host("[::1]:80") == ("[::1]", 80) and split_host("a.b") == ("a.b", None)
    for bad in ("http://a.b", "a.b/", "a:b:c", "a.b:70000", "*", ":80"):
        with pytest.raises(ValueError):
            AllowedHosts([bad])


def test_serve_web_passes_allowed_host_options(tiny_checkpoint, voice, tmp_path, monkeypatch):
    """`--allowed-host` (repeatable) reaches the plugin's `serve` as `allowed_hosts`."""
    from chroma_agent.cli import build_parser, main

    voice.save(tmp_path / "me.voice.safetensors")
    args = ["serve", "web", "--model", str(tiny_checkpoint), "--device", "cpu", "--voice",
            str(tmp_path / "me.voice.safetensors"), "--allowed-host", "voice.example.com", "--allowed-host", "gpu-box:8443"]
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.skip("chroma_agent/cli.py has no --allowed-host for serve web yet")
    calls = []
    plugin = types.ModuleType("pipecat_chroma.web_server")
    plugin.serve = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "pipecat_chroma.web_server", plugin)
    assert main(args) == 0
    assert calls[0]["allowed_hosts"] == ["voice.example.com", "gpu-box:8443"]


# -- the real server --

@http_test
def test_refusals_are_logged_escaped_and_rate_limited(server):
    """First of the server's tests: the refusals' log budget (10 lines a minute) is unspent."""
    assert ask(server, "GET", "/", Host="flood.evil.example", User_Agent="evil\tagent")[0] == 421
    log = server.log.read_text()
    assert "refused GET / from 127.0.0.1 (421): Host flood.evil.example" in log
    assert "user agent evil\\tagent" in log and "evil\tagent" not in log   # the client's tab cannot shape the line
    for _ in range(40):
        assert ask(server, "GET", "/", Host="flood.evil.example")[0] == 421
    assert server.log.read_text().count("refused GET") <= 10   # 41 refusals, the burst's 10 lines


@http_test
def test_an_offer_from_another_site_or_not_json_is_refused(server):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{server.port}.evil.example"},
                    {"Sec-Fetch-Site": "cross-site"}):
        status, found, body = ask(server, "POST", "/api/offer", AUDIO_OFFER, Content_Type="application/json", **headers)
        assert status == 403 and ("another site" in body["error"] or "cross-site" in body["error"]), (headers, body)
        assert not any(name.startswith("access-control-") for name in found), found   # no CORS, ever
    # the form a page may post without a preflight: text/plain (no Origin needed to refuse it)
    status, _, body = ask(server, "POST", "/api/offer", AUDIO_OFFER, Content_Type="text/plain")
    assert status == 415 and "application/json" in body["error"]
    assert ask(server, "POST", "/api/offer", AUDIO_OFFER)[0] == 415   # no Content-Type at all
    # a preflight is not granted
    status, found, _ = ask(server, "OPTIONS", "/api/offer", Origin="http://evil.example",
                           Access_Control_Request_Method="POST", Access_Control_Request_Headers="content-type")
    assert status >= 400 and not any(name.startswith("access-control-") for name in found), (status, found)
    assert server.health()["active_calls"] == 0


@http_test
def test_a_foreign_host_is_refused_on_every_route(server):
    rebind = f"rebind.evil.example:{server.port}"   # a name made to resolve to 127.0.0.1
    for method, path, body in (("GET", "/", None), ("GET", "/health", None), ("POST", "/api/offer", AUDIO_OFFER)):
        status, found, answer = ask(server, method, path, body, Host=rebind, Origin=f"http://{rebind}",
                                    Content_Type="application/json")
        assert status == 421 and "--allowed-host" in answer["error"], (path, status, answer)
        assert found.get("connection") == "close"
    assert ask(server, "GET", "/", Host=f"localhost:{server.port + 1}")[0] == 421   # the own names, another port
    assert ask(server, "GET", "/", Host=f"alias.test.example:{server.port}")[0] == 421   # allowed on port 1 only
    for own in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert ask(server, "GET", "/health", Host=own)[0] == 200, own


@http_test
def test_an_allowed_host_is_answered_and_its_page_may_post(server):
    host = f"voice.test.example:{server.port}"   # from $CHROMA_AGENT_WEB_ALLOWED_HOSTS, any port
    status, found, _ = ask(server, "GET", "/", Host=host)
    assert status == 200 and found["content-type"].startswith("text/html")
    status, _, body = ask(server, "POST", "/api/offer", NO_AUDIO, Host=host, Origin=f"https://{host}",
                          Content_Type="application/json; charset=utf-8", Sec_Fetch_Site="same-origin")
    assert status == 400 and "no audio" in body["error"]   # past the guard, refused by the offer's own check


@http_test
def test_an_oversized_body_is_refused_unread_and_memory_stays_flat(server):
    head = (f"POST /api/offer HTTP/1.1\r\nHost: localhost:{server.port}\r\nContent-Type: application/json\r\n"
            f"Origin: http://localhost:{server.port}\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:   # the refusal's code path, warmed
        sock.sendall((head + "Content-Length: 70000\r\n\r\n").encode())
        assert raw_response(sock).startswith(b"HTTP/1.1 413")
    pid, base = server.proc.pid, rss_kib(server.proc.pid)
    # declared: 300 MB by Content-Length, refused before a byte of it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((head + "Content-Length: 300000000\r\n\r\n").encode())
        started = time.monotonic()
        reply = raw_response(sock)
        assert reply.startswith(b"HTTP/1.1 413") and b"over 65536 bytes" in reply, reply[:300]
        assert time.monotonic() - started < 5
    # undeclared: chunked, read up to the cap, then refused and the connection closed
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        with pytest.raises((BrokenPipeError, ConnectionResetError)):   # the server closed it: the writes fail
            while sent < 300 << 20:
                sock.sendall(chunk)
                sent += 1 << 20
    assert sent < 64 << 20, f"{sent >> 20} MiB went in before the server closed the connection"
    grown = rss_kib(pid) - base
    assert grown < 16 * 1024, f"the server's RSS grew by {grown} KiB"   # unread: the bodies were hundreds of MiB
    # a chunked body under the cap is read whole and reaches the route
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        payload = NO_AUDIO.encode()
        sock.sendall((head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        reply = raw_response(sock)
    assert reply.startswith(b"HTTP/1.1 400") and b"no audio" in reply, reply[:300]
    health = server.health()
    check_health(health, "web")
    assert health["status"] == "ok" and health["active_calls"] == 0


@pytest.mark.timeout(START_TIMEOUT_S, func_only=True)
async def test_the_own_pages_offer_still_gets_an_answer(server):
    """What the page sends (JSON, its own Origin, Sec-Fetch-Site same-origin) gets an SDP
    answer and a session, which ends when the peer connection closes."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection()
    try:
        pc.addTrack(AudioStreamTrack())
        remote = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: remote.done() or remote.set_result(track))
        await pc.setLocalDescription(await pc.createOffer())
        offer = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"})
        status, _, answer = await asyncio.to_thread(
            ask, server, "POST", "/api/offer", offer, Content_Type="application/json",
            Origin=f"http://localhost:{server.port}", Sec_Fetch_Site="same-origin")
        assert status == 200 and answer["type"] == "answer" and "m=audio" in answer["sdp"], answer
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        track = await asyncio.wait_for(remote, 10)
        await asyncio.wait_for(track.recv(), 20)   # connected: the server's audio arrives
        assert server.health()["active_calls"] == 1
    finally:
        await pc.close()
    deadline = time.monotonic() + 20
    while server.health()["active_calls"]:
        assert time.monotonic() < deadline, "the session outlived its peer connection"
        await asyncio.sleep(0.2)
    assert ask(server, "GET", "/health")[0] == 200
