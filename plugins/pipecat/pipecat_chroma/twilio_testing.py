"""Twilio's side of a phone call, for testing a phone server without a phone.

    async with TwilioCall("ws://127.0.0.1:8765/ws") as call:     # sends `connected`, `start`
        spoken_until = await call.say(pcm, 16000)                  # 20 ms mu-law `media`, in real time
        first = await call.next_media(after=spoken_until, timeout=10)
        await call.stop()                                          # Twilio's `stop`

Like Twilio, the line never goes quiet: between `say`s the call streams silence every
20 ms. Everything the server sends back is kept in `received` as (arrival time, message).

Like Twilio, a call follows the webhook's TwiML: `TwilioCall.from_twiml(twiml, ...)` dials
its `<Stream url>` (or `connect_to`, the server's local address), signs the upgrade, and
hands the `<Parameter>`s (the server's stream token) back in `start.customParameters`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import xml.etree.ElementTree as ElementTree
from typing import Any

import numpy as np
import soxr
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect

RATE = 8000
PACKET = 160                       # 20 ms at 8 kHz, what Twilio sends
PACKET_S = PACKET / RATE
SILENCE = b"\xff" * PACKET         # mu-law zero


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 mu-law of float samples in [-1, 1] (or int16)."""
    x = np.asarray(pcm)
    x = x.astype(np.float64) / 32768.0 if x.dtype == np.int16 else x.astype(np.float64)
    s = np.clip(np.round(x * 32767), -32635, 32635).astype(np.int32)
    sign = np.where(s < 0, 0x80, 0)
    s = np.abs(s) + 0x84
    exponent = np.floor(np.log2(s)).astype(np.int32) - 7
    mantissa = (s >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """Float samples of G.711 mu-law bytes."""
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84) / 32768.0


def sign(auth_token: str, url: str, params: dict | None = None) -> str:
    """The X-Twilio-Signature Twilio would send for `url` (and a webhook's form `params`)."""
    return RequestValidator(auth_token).compute_signature(url, params or {})


def twiml_stream(twiml: str) -> tuple[str, dict[str, str]]:
    """The `<Connect><Stream>` of a TwiML answer: its url and its `<Parameter>`s (name ->
    value); ValueError when the answer has no stream (e.g. `<Reject>`)."""
    stream = ElementTree.fromstring(twiml).find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise ValueError(f"no <Connect><Stream url> in the TwiML: {twiml[:200]!r}")
    return stream.get("url"), {p.get("name"): p.get("value", "") for p in stream.findall("Parameter")}


class ArrivalWaits:
    """Waits on what a test call received, and the ends of its line (TwilioCall here, the
    other carriers' calls in phone/testing.py): the class gives `events(kind, after)`
    (arrival time, message), its websocket `_ws` and its tasks `_tasks`, and sets `arrived`
    (an asyncio.Event) at each message and `closed` when the stream ends."""

    def events(self, kind: str, after: float = 0.0) -> list[tuple[float, Any]]:
        raise NotImplementedError

    async def next_event(self, kind: str, *, after: float = 0.0, timeout: float) -> tuple[float, Any]:
        """The first `kind` message ("media", "clear", ...) that arrived at or after `after`."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(kind, after)):
            if self.closed.is_set():
                raise ConnectionError(f"the server closed the stream before a {kind!r} arrived")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise TimeoutError(f"no {kind!r} from the server within {timeout} s") from None
        return found[0]

    async def next_media(self, *, after: float = 0.0, timeout: float) -> tuple[float, Any]:
        return await self.next_event("media", after=after, timeout=timeout)

    async def until_quiet(self, quiet: float = 0.5, *, timeout: float) -> None:
        """Until no `media` has arrived for `quiet` seconds: what the server was saying has
        played out (it sends audio in real time)."""
        deadline = time.monotonic() + timeout
        while self.events("media", after=time.time() - quiet):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was still sending audio after {timeout} s")
            await asyncio.sleep(0.05)

    def drop(self) -> None:
        """The line drops: the TCP connection goes away with no `stop` and no close handshake."""
        self._cancel_tasks()
        self._ws.transport.abort()

    async def close(self) -> None:
        self._cancel_tasks()
        if self._ws is not None:
            await self._ws.close()

    @property
    def close_code(self) -> int | None:
        """The close code of a closed stream (1009: a message over the server's size limit)."""
        return None if self._ws is None else self._ws.close_code

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _speech_failed(self, done: asyncio.Future | None, error: Exception) -> None:
        """The stream closed while speaking: whoever waits on speech (`done`, and what is
        queued in `_speech`) hears why."""
        pending = [done] if done is not None else []
        while not self._speech.empty():
            pending.append(self._speech.get_nowait()[1])
        for future in pending:
            if not future.done():
                future.set_exception(ConnectionError(f"the stream closed: {error!r}"))


class TwilioCall(ArrivalWaits):
    """One Media Stream to `url`, speaking Twilio's protocol.

    `headers`: extra upgrade headers (X-Twilio-Signature, ...); `custom_parameters`: the
    `start` message's `customParameters`; `line=False`: after `start` the line is dead (no
    silence streamed; a `say` never finishes)."""

    def __init__(self, url: str, *, call_sid: str | None = None, stream_sid: str | None = None,
                 headers: dict[str, str] | None = None, custom_parameters: dict | None = None, line: bool = True):
        self.url = url
        self.line = line
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.stream_sid = stream_sid or "MZ" + uuid.uuid4().hex
        self.headers = headers or {}
        self.custom_parameters = custom_parameters or {}
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.closed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._speech: asyncio.Queue[tuple[bytes, asyncio.Future]] = asyncio.Queue()
        self.arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._seq = 0

    @classmethod
    def from_twiml(cls, twiml: str, *, call_sid: str, auth_token: str | None = None, connect_to: str | None = None,
                   **kwargs) -> "TwilioCall":
        """The stream Twilio opens for a webhook's TwiML answer to call `call_sid`: to its
        `<Stream url>` (dialled at `connect_to` when given: the server's local address behind
        its public URL), signed for that url with `auth_token` (when given), the TwiML's
        `<Parameter>`s in `start.customParameters`. `kwargs`: TwilioCall's."""
        url, parameters = twiml_stream(twiml)
        headers = dict(kwargs.pop("headers", None) or {})
        if auth_token is not None:
            headers["X-Twilio-Signature"] = sign(auth_token, url)
        return cls(connect_to or url, call_sid=call_sid, headers=headers, custom_parameters=parameters, **kwargs)

    async def __aenter__(self) -> "TwilioCall":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the call --
    async def connect(self) -> None:
        """Open the stream (raises websockets' InvalidStatus on a refused upgrade) and send
        `connected` + `start`, then stream silence until told otherwise."""
        self._ws = await connect(self.url, additional_headers=self.headers, proxy=None, compression=None,
                                 open_timeout=10, max_size=None)
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send({"event": "start", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                         "start": {"streamSid": self.stream_sid, "callSid": self.call_sid, "accountSid": "AC" + "0" * 32,
                                   "tracks": ["inbound"], "customParameters": self.custom_parameters,
                                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1}}})
        self._tasks = [asyncio.create_task(self._receive())]
        if self.line:
            self._tasks.append(asyncio.create_task(self._line()))

    async def say(self, pcm: np.ndarray, sample_rate: int) -> float:
        """Queue speech on the line; returns (time.time()) when its last packet was sent,
        i.e. when the caller stopped talking."""
        audio = soxr.resample(np.asarray(pcm, np.float32), sample_rate, RATE) if sample_rate != RATE else pcm
        data = mulaw_encode(audio)
        data += SILENCE[: (-len(data)) % PACKET]
        done = asyncio.get_running_loop().create_future()
        await self._speech.put((data, done))
        return await done

    async def send(self, message: dict | str | bytes) -> None:
        """Send a message: a dict as JSON, a str or bytes as is (a text or a binary frame)."""
        await self._ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def stop(self) -> None:
        """Twilio's `stop`: the caller hung up."""
        await self.send({"event": "stop", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                         "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}})

    # -- what came back --
    def media(self, after: float = 0.0) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.received if m.get("event") == "media" and t >= after]

    def events(self, kind: str, after: float = 0.0) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.received if m.get("event") == kind and t >= after]

    def received_audio(self, after: float = 0.0) -> np.ndarray:
        """The server's audio (8 kHz float) that arrived after `after`."""
        chunks = [base64.b64decode(m["media"]["payload"]) for _, m in self.media(after)]
        return mulaw_decode(b"".join(chunks)) if chunks else np.zeros(0)

    # -- internals --
    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _line(self) -> None:
        """Send one 20 ms packet per tick on an absolute schedule: queued speech, else silence."""
        data, done, pos = b"", None, 0
        tick, timestamp = time.monotonic(), 0
        try:
            while True:
                if pos >= len(data) and not self._speech.empty():
                    data, done = self._speech.get_nowait()
                    pos = 0
                packet = data[pos:pos + PACKET] if pos < len(data) else SILENCE
                pos += PACKET
                await self.send({"event": "media", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                                 "media": {"track": "inbound", "chunk": str(timestamp // 20 + 1),
                                           "timestamp": str(timestamp), "payload": base64.b64encode(packet).decode()}})
                timestamp += 20
                if done is not None and pos >= len(data):
                    if not done.done():  # a say() that timed out is cancelled
                        done.set_result(time.time())
                    done = None
                tick += PACKET_S
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
        except Exception as e:  # the server closed the stream
            self._speech_failed(done, e)

    async def _receive(self) -> None:
        try:
            async for raw in self._ws:
                self.received.append((time.time(), json.loads(raw)))
                self.arrived.set()
        except Exception:  # a dropped or refused connection ends the call; `closed` says so
            pass
        finally:
            self.closed.set()
            self.arrived.set()
