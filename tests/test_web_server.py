"""The browser server end to end: the real `chroma-agent serve web` process on the tiny
checkpoint, over loopback, and its own page in headless Chromium (Debian's `chromium`,
driven over the DevTools protocol) with a fake microphone that plays espeak-ng speech.
The tiny model's replies are noise, but the page, the WebRTC call, the turn and the
teardown are the real ones."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

pytest.importorskip("pipecat")   # the plugin; with it aiortc (pipecat-ai[webrtc]) must be there
from websockets.asyncio.client import connect  # noqa: E402

from .conftest import speak  # noqa: E402
from .health_schema import check_health  # noqa: E402
from .server_process import START_TIMEOUT_S, ServerProcess  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
REPLY_TIMEOUT_S = 60      # connect, speak, turn end, reply: generous for a shared 2-core CI machine
browser_test = pytest.mark.timeout(150, func_only=True)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


# -- the server process --

class WebServerProcess(ServerProcess):
    """`chroma-agent serve web` on a free loopback port; its log in a file."""

    def __init__(self, checkpoint: Path, voice: Path, log: Path, *extra: str):
        super().__init__("web", ["--model", str(checkpoint), "--voice", str(voice), "--max-frames", "40", *extra],
                         log, base_host="localhost")   # the page's origin: browsers give http://localhost the microphone

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, str]:
        """(status, headers, body text) of one request."""
        request = urllib.request.Request(self.base + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    async def wait_active(self, n: int, timeout: float = 10.0) -> None:
        """Until /health says `n` sessions are running."""
        await super().wait_active(n, timeout, poll_s=0.2)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voice, tmp_path_factory):
    d = tmp_path_factory.mktemp("web_server")
    voice.save(d / "tiny.voice.safetensors")
    server = WebServerProcess(tiny_checkpoint, d / "tiny.voice.safetensors", d / "server.log", "--max-calls", "1")
    server.wait_ready()
    yield server
    server.stop()


# -- the browser --

class Chromium:
    """Headless Chromium on one page, driven over the DevTools protocol (a websocket)."""

    def __init__(self, url: str, microphone: Path, profile: Path):
        self.profile = profile
        (profile / "DevToolsActivePort").unlink(missing_ok=True)   # a stale one names another browser's port
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
               "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
               f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required",
               "--allow-loopback-in-peer-connection", url]
        self.log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ws = None
        self._id = 0

    async def start(self, timeout: float = 30.0) -> Chromium:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.proc.poll() is None, f"chromium exited ({self.proc.returncode})"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        while True:
            targets = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/json/list"))
            pages = [t for t in targets if t["type"] == "page" and t["url"].startswith("http")]
            if pages:
                break
            assert time.monotonic() < deadline, f"chromium opened no page: {targets}"
            await asyncio.sleep(0.2)
        self.ws = await connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('connect')",
                            max(deadline - time.monotonic(), 5), "the page loaded")
        return self

    async def evaluate(self, expression: str, timeout: float = 10.0):
        """The value of a JS expression in the page (a promise is awaited)."""
        self._id += 1
        await self.ws.send(json.dumps({"id": self._id, "method": "Runtime.evaluate", "params": {
            "expression": expression, "awaitPromise": True, "returnByValue": True}}))
        async with asyncio.timeout(timeout):
            while True:
                message = json.loads(await self.ws.recv())
                if message.get("id") == self._id:
                    break
        result = message["result"]
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        """Poll a JS expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.evaluate(expression)):
            if time.monotonic() > deadline:
                page = await self.evaluate("JSON.stringify({url: location.href, state: (document.getElementById("
                                           "'state') || {}).textContent, messages: window.chromaCall && "
                                           "Array.from(window.chromaCall.seen)})")
                raise AssertionError(f"{what}: not within {timeout} s; page: {page}")
            await asyncio.sleep(0.25)
        return value

    def kill(self) -> None:
        """Gone at once, as a crashed browser or a dead laptop: nothing is closed politely."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def microphone(tmp_path_factory) -> Path:
    """What the fake microphone plays (Chromium loops it): 1 s of silence, a question, then
    silence long enough for the reply to end before the question comes round again."""
    d = tmp_path_factory.mktemp("web_speech")
    samples, rate = sf.read(speak("What time does the store open on Saturday?", d / "question.wav"), dtype="float32")
    speech = soxr.resample(samples, rate, 48000)
    silence = np.zeros(48000, np.float32)
    sf.write(d / "microphone.wav", np.concatenate([silence, speech, np.zeros(20 * 48000, np.float32)]), 48000,
             subtype="PCM_16")
    return d / "microphone.wav"


# JS: the reply audio that reached the page, from WebRTC's own statistics
INBOUND_AUDIO = """(async () => {
  const stats = await window.chromaCall.pc.getStats();
  for (const s of stats.values()) if (s.type === "inbound-rtp" && s.kind === "audio")
    return {energy: s.totalAudioEnergy || 0, level: s.audioLevel || 0, samples: s.totalSamplesReceived || 0};
  return null;
})()"""
AUDIO_OFFER = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"   # enough to be read; refused before it is parsed
MESSAGES = "(window.chromaCall ? Array.from(window.chromaCall.seen) : [])"   # the RTVI message types seen


# -- tests --

def test_serve_web_loads_once_then_hands_over_on_localhost(tiny_checkpoint, voice, tmp_path, monkeypatch):
    """The CLI side of `serve web`: the plugin's `serve` gets the loaded model, the voice and
    the web options, on 127.0.0.1 unless told otherwise."""
    from chroma_agent.cli import main

    calls = []
    plugin = types.ModuleType("pipecat_chroma.web_server")
    plugin.serve = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "pipecat_chroma.web_server", plugin)
    voice.save(tmp_path / "me.voice.safetensors")
    assert main(["serve", "web", "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--voice", str(tmp_path / "me.voice.safetensors"), "--max-calls", "2"]) == 0
    (kwargs,) = calls
    assert kwargs.pop("model").device.type == "cpu" and np.array_equal(kwargs.pop("voice").codes, voice.codes)
    assert kwargs.pop("allowed_hosts", None) in (None, [])   # --allowed-host not given (once cli.py has it)
    assert kwargs == {"host": "127.0.0.1", "port": 8765, "max_calls": 2, "system_prompt": None, "max_frames": None,
                      "drain_seconds": 30}


def test_an_engine_serves_every_session_up_to_its_capacity(model, voice):
    from pipecat_chroma.web_server import WebServer

    from chroma_agent.runtime.engine import ChromaEngine

    engine = ChromaEngine(model, max_conversations=2)
    try:
        health = WebServer(engine, voice).health()
        check_health(health, "web")
        assert health["max_calls"] == 2 and health["engine"]["capacity"] == 2
        server = WebServer(engine, voice, max_calls=5)   # more would get no conversation
        assert server.max_calls == 2 and server.out_rate == model.sample_rate
    finally:
        engine.close()


def test_the_page_is_self_contained(server):
    status, headers, html = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert '<button id="connect"' in html and "RTCPeerConnection" in html and "/api/offer" in html
    # no CDN, no external script, style or font: nothing is fetched from anywhere but this server
    assert not re.search(r"""<script[^>]*\ssrc\s*=|<link\b|@import|\burl\(|\bimport\s*\(""", html, re.I)
    assert not re.search(r"""(https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", html, re.I), "a URL of another host"


def scrape(server: WebServerProcess) -> dict[tuple[str, tuple], float]:
    """GET /metrics (Prometheus text) parsed: (sample name, sorted labels) -> value."""
    from .prometheus_samples import samples_of

    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, headers)
    return samples_of(text)


def test_bad_offers_are_refused_and_hold_no_session(server):
    before = scrape(server)
    assert server.request("POST", "/api/offer", b"not json")[0] == 400
    assert server.request("POST", "/api/offer", json.dumps({"type": "offer"}).encode())[0] == 400
    status, _, body = server.request("POST", "/api/offer", json.dumps({"sdp": "v=0\r\n", "type": "offer"}).encode())
    assert status == 400 and "no audio" in json.loads(body)["error"]   # aiortc would answer it: a session of nothing
    status, _, body = server.request("POST", "/api/offer", json.dumps({"sdp": "v=0\r\nm=audio x", "type": "offer"}).encode())
    assert status == 400 and "could not be answered" in json.loads(body)["error"]
    assert server.request("POST", "/api/offer", b"{" + b" " * 70000 + b"}")[0] == 413
    health = server.health()
    check_health(health, "web")   # the process runs on an engine, as the other servers do
    assert health["active_calls"] == 0 and health["max_calls"] == 1 and health["engine"]["conversations"] == 0
    after, invalid = scrape(server), ("chroma_calls_refused_total", (("reason", "invalid"),))
    assert after[invalid] - before[invalid] == 1   # the offer aiortc could not answer
    assert after[("chroma_calls_active", ())] == 0 and after[("chroma_engine_capacity", ())] == 1


@needs_chromium
@browser_test
async def test_a_browser_call_gets_a_spoken_reply_and_hanging_up_frees_it(server, microphone, tmp_path):
    browser = await Chromium(server.base + "/", microphone, tmp_path / "profile").start()
    metrics_before = scrape(server)
    try:
        assert await browser.evaluate("document.getElementById('state').textContent") == "idle"
        await browser.evaluate("document.getElementById('connect').click()")
        await browser.wait_for(f"{MESSAGES}.includes('bot-ready')", 30, "the call connected (RTVI bot-ready)")
        assert await browser.evaluate("window.chromaCall.pc.connectionState") == "connected"
        assert server.health()["active_calls"] == 1
        # past --max-calls 1 another offer is refused, and this call goes on
        status, headers, _ = server.request("POST", "/api/offer", json.dumps({"sdp": AUDIO_OFFER, "type": "offer"}).encode())
        assert status == 503 and int(headers["retry-after"]) > 0

        before = await browser.evaluate(INBOUND_AUDIO)   # the server's silence so far
        # the fake microphone's question reached the server: its VAD opened and closed a turn
        await browser.wait_for(f"{MESSAGES}.includes('user-stopped-speaking')", REPLY_TIMEOUT_S, "the server heard the turn")
        await browser.wait_for(f"{MESSAGES}.includes('bot-started-speaking')", REPLY_TIMEOUT_S, "a reply was generated")
        await browser.wait_for(f"{MESSAGES}.includes('bot-stopped-speaking')", REPLY_TIMEOUT_S, "the reply was played")
        after = await browser.evaluate(INBOUND_AUDIO)
        assert after["samples"] > before["samples"]
        # the reply was audible: the server's silence between replies has no energy at all, and the tiny
        # model's ~3 s reply at about -36 dBFS has ~8e-4 (the sum of level^2 x seconds)
        assert after["energy"] - before["energy"] > 1e-4, (before, after)
        # the transcript: the caller's turn (its words, now transcribed: the tiny model's are random
        # tokens), and the reply's text as it played (often only whitespace: its length is what can be checked)
        transcript = await browser.evaluate("document.getElementById('transcript').innerText")
        assert "You: " in transcript and "Voice:" in transcript, transcript
        assert await browser.evaluate("document.querySelector('#transcript .voice span').textContent.length") > 0
        assert await browser.evaluate(f"{MESSAGES}.includes('bot-output')")

        await browser.evaluate("document.getElementById('connect').click()")   # hang up
        assert await browser.evaluate("document.getElementById('connect').textContent") == "Connect"
        await server.wait_active(0)
    finally:
        await browser.close()
    assert "browser session" in server.log.read_text() and "ended after" in server.log.read_text()
    metrics = scrape(server)   # /metrics: the session, the refused offer, the turn's time to first audio
    for name, labels, moved in (("chroma_calls_total", (("outcome", "completed"),), 1),
                                ("chroma_calls_refused_total", (("reason", "capacity"),), 1)):
        assert metrics[(name, labels)] - metrics_before.get((name, labels), 0) == moved, name
    assert metrics[("chroma_time_to_first_audio_seconds_count", ())] > metrics_before[
        ("chroma_time_to_first_audio_seconds_count", ())]


@needs_chromium
@browser_test
async def test_a_killed_browser_frees_its_session(server, microphone, tmp_path):
    browser = await Chromium(server.base + "/", microphone, tmp_path / "profile").start()
    try:
        await browser.evaluate("document.getElementById('connect').click()")
        await browser.wait_for(f"{MESSAGES}.includes('bot-ready')", 30, "the call connected (RTVI bot-ready)")
        assert server.health()["active_calls"] == 1
        killed = time.monotonic()
        browser.kill()   # no goodbye: no DTLS close, no RTCP BYE, its packets just stop
        await server.wait_active(0, timeout=25)   # the server's DROP_AFTER_S (10 s) plus slack
        assert time.monotonic() - killed > 5   # freed by the silence, not by anything the browser sent
    finally:
        await browser.close()
    assert "no audio from the browser" in server.log.read_text()


# -- deploys --

DRAIN_S = 5   # room to check the drain's refusals, short enough for CI


@pytest.mark.timeout(START_TIMEOUT_S + 60, func_only=True)
async def test_sigterm_drains_running_sessions_then_exits_0(tiny_checkpoint, voice, tmp_path):
    """A real WebRTC session (aiortc as the browser: a silent microphone, the server's audio
    received) goes on through SIGTERM while new offers are refused, and is ended at
    --drain-seconds; the process exits 0."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

    voice.save(tmp_path / "tiny.voice.safetensors")
    server = WebServerProcess(tiny_checkpoint, tmp_path / "tiny.voice.safetensors", tmp_path / "server.log",
                              "--max-calls", "2", "--drain-seconds", str(DRAIN_S))
    pc = RTCPeerConnection()
    try:
        await asyncio.to_thread(server.wait_ready)
        pc.addTrack(AudioStreamTrack())   # silence, as a quiet microphone: the session stays up
        remote = asyncio.get_running_loop().create_future()
        pc.on("track", lambda track: remote.done() or remote.set_result(track))
        await pc.setLocalDescription(await pc.createOffer())   # with every ICE candidate gathered
        offer = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode()
        status, _, body = await asyncio.to_thread(server.request, "POST", "/api/offer", offer)
        assert status == 200, body
        answer = json.loads(body)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        track = await asyncio.wait_for(remote, 10)
        await asyncio.wait_for(track.recv(), 20)   # connected: the server's audio arrives
        await server.wait_active(1)

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while (health := server.request("GET", "/health"))[0] != 503:
            assert time.monotonic() - signalled < 5, f"/health still says {health} after SIGTERM"
            await asyncio.sleep(0.05)
        assert json.loads(health[2])["status"] == "draining" and json.loads(health[2])["active_calls"] == 1
        status, headers, body = server.request("POST", "/api/offer", json.dumps({"sdp": AUDIO_OFFER, "type": "offer"}).encode())
        assert status == 503 and "shutting down" in body and int(headers["retry-after"]) > 0

        frames = 0   # the running session goes on: the server's audio keeps coming...
        while time.monotonic() - signalled < DRAIN_S - 1.5:
            await asyncio.wait_for(track.recv(), 5)
            frames += 1
        assert frames >= 20 and json.loads(server.request("GET", "/health")[2])["active_calls"] == 1
        with pytest.raises(MediaStreamError):   # ...until the drain time is over: the server ends it
            while True:
                await asyncio.wait_for(track.recv(), DRAIN_S + 10)
        assert DRAIN_S - 0.5 < time.monotonic() - signalled < DRAIN_S + 8
        assert await asyncio.to_thread(server.proc.wait, 20) == 0, server.log.read_text()[-3000:]
        log = server.log.read_text()
        assert "drain time is over: ending 1 sessions" in log and "ended after" in log
    finally:
        await pc.close()
        server.stop()
