"""Helpers for the Realtime server tests: the app run by uvicorn in a thread on a free
loopback port, the real `chroma-agent serve realtime` process, and a small client that
speaks the protocol (JSON events over the websocket)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

from chroma_agent.model.audio import resample

from . import server_process


def get(base: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class InProcessServer(server_process.AppThread):
    """A `RealtimeServer`'s app under uvicorn in a daemon thread, started."""

    def __init__(self, realtime):
        super().__init__(realtime.app(), log_level=os.environ.get("RT_TEST_LOG", "warning"),
                         ws_max_size=realtime.limits.max_message_bytes)
        self.realtime = realtime
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        self.start(timeout=20)


class ServerProcess(server_process.ServerProcess):
    """`chroma-agent serve realtime` on a free loopback port, its log in a file; `stop`
    waits out the drain."""

    def __init__(self, checkpoint: Path, voice: Path, log: Path, *extra: str, env: dict | None = None):
        super().__init__("realtime", ["--model", str(checkpoint), "--voice", str(voice), "--host", "127.0.0.1", *extra],
                         log, env=env, drop_env=("CHROMA_AGENT_API_KEY",), stop_wait_s=45)
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime"


def speech_pcm24(path: Path, lead_s: float = 0.3, tail_s: float = 1.2) -> np.ndarray:
    """An espeak-ng WAV as int16 at 24 kHz with silence around it."""
    data, rate = sf.read(path, dtype="float32")
    pcm = resample(data, rate, 24000)
    pad = lambda s: np.zeros(int(s * 24000), np.float32)  # noqa: E731
    return (np.concatenate([pad(lead_s), pcm, pad(tail_s)]) * 32767).astype(np.int16)


def b64(pcm: np.ndarray | bytes) -> str:
    return base64.b64encode(pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()).decode()


class Client:
    """A protocol client: send events, read events (by type), with timeouts."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []

    @classmethod
    async def connect(cls, url: str, headers: dict | None = None, **kw) -> "Client":
        from websockets.asyncio.client import connect

        ws = await connect(url, additional_headers=headers or {}, max_size=None, open_timeout=10, **kw)
        return cls(ws)

    async def send(self, type_: str, **payload) -> None:
        await self.ws.send(json.dumps({"type": type_, **payload}))

    async def raw(self, data) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = 30.0) -> dict:
        ev = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        assert isinstance(ev.get("event_id"), str) and ev["event_id"], ev
        self.events.append(ev)
        return ev

    async def until(self, type_: str, timeout: float = 60.0) -> list[dict]:
        """Events up to and including the first of `type_`."""
        got, deadline = [], time.monotonic() + timeout
        while True:
            try:
                ev = await self.recv(max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(f"no {type_} within {timeout} s; got {[e['type'] for e in got][-30:]}") from None
            got.append(ev)
            if ev["type"] == type_:
                return got

    async def stream(self, pcm: np.ndarray, chunk_ms: int = 100, realtime: float = 0.0) -> None:
        """Append int16 24 kHz audio in chunks (paced at `realtime` x speed when > 0)."""
        step = 24 * chunk_ms
        for i in range(0, pcm.size, step):
            await self.send("input_audio_buffer.append", audio=b64(pcm[i:i + step]))
            if realtime:
                await asyncio.sleep(chunk_ms / 1000 / realtime)

    async def close(self) -> None:
        await self.ws.close()
