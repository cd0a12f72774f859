"""The carriers' side of a phone call, for testing a phone server without a phone: one
client per carrier speaking its media-stream protocol, as `twilio_testing.TwilioCall` does
Twilio's (TelnyxCall, PlivoCall, ExotelCall, VonageCall).

    async with TelnyxCall("ws://127.0.0.1:8765/ws") as call:     # its opening messages
        spoken_until = await call.say(pcm, 16000)   # in the carrier's format, 20 ms packets in real time
        first, _ = await call.next_media(after=spoken_until, timeout=10)
        reply = call.received_audio(first)          # the server's audio, decoded to float PCM at `call.rate`
        await call.next_event("clear", after=first, timeout=10)   # the carrier's barge-in message
        await call.hang_up()                        # its stop event (Vonage: the websocket closes)

Like a carrier, the line never goes quiet (silence between `say`s) and a call follows the
answer document: `TelnyxCall.from_texml`, `PlivoCall.from_xml`, `VonageCall.from_ncco` dial
its stream URL (or `connect_to`) with its parameters (the server's stream token). What the
carriers send with their webhooks: `telnyx_signed`, `plivo_signed`, `vonage_jwt`.
Everything the server sends back is kept in `received` as (arrival time, kind, message),
kind "media" (the carrier's audio message), "clear" (its barge-in message) or the event.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
import xml.etree.ElementTree as ElementTree
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import numpy as np
import soxr
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect

from ..twilio_testing import ArrivalWaits, mulaw_decode, mulaw_encode


def pcm16(x: np.ndarray) -> bytes:
    """16-bit little-endian PCM of float samples in [-1, 1]."""
    return (np.clip(np.asarray(x, np.float64), -1, 1) * 32767).round().astype("<i2").tobytes()


def pcm16_decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data[: len(data) // 2 * 2], "<i2") / 32768.0


class CarrierCall(ArrivalWaits):
    """One media stream to `url`, speaking a carrier's protocol (the subclasses). `headers`:
    extra upgrade headers; `parameters`: what the answer document passes back (the stream
    token); `line=False`: after the opening the line is dead (no silence streamed)."""

    rate = 8000
    packet_ms = 20

    def __init__(self, url: str, *, call_id: str | None = None, stream_id: str | None = None,
                 headers: dict[str, str] | None = None, parameters: dict[str, str] | None = None, line: bool = True):
        self.url, self.line = url, line
        self.call_id = call_id or str(uuid.uuid4())
        self.stream_id = stream_id or str(uuid.uuid4())
        self.headers, self.parameters = dict(headers or {}), dict(parameters or {})
        self.received: list[tuple[float, str, Any]] = []
        self.closed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._speech: asyncio.Queue[tuple[bytes, asyncio.Future]] = asyncio.Queue()
        self.arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.seq = 0
        self.packet_bytes = len(self.encode(np.zeros(self.rate * self.packet_ms // 1000)))

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the carrier's protocol (subclasses) --
    def opening(self) -> list[dict | str | bytes]:
        raise NotImplementedError

    def media(self, packet: bytes, timestamp_ms: int) -> dict | bytes:
        raise NotImplementedError

    def stop_message(self) -> dict | None:
        """The carrier's hang-up event (None: it closes the websocket)."""
        raise NotImplementedError

    def dtmf_message(self, digit: str) -> dict:
        raise NotImplementedError

    def classify(self, raw: str | bytes) -> tuple[str, Any]:
        """(kind, message) of what the server sent: "media", "clear", else its event."""
        message = json.loads(raw)
        return message.get("event", "?"), message

    def audio_of(self, message: Any) -> bytes:
        """The carrier-format audio bytes of a "media" message."""
        return base64.b64decode(message["media"]["payload"])

    def encode(self, audio: np.ndarray) -> bytes:
        return mulaw_encode(audio)

    def decode(self, data: bytes) -> np.ndarray:
        return mulaw_decode(data)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- the call --
    async def connect(self) -> None:
        """Open the stream (websockets' InvalidStatus on a refused upgrade), send the
        carrier's opening, then stream silence until told otherwise."""
        self._ws = await connect(self.url, additional_headers=self.headers, proxy=None, compression=None,
                                 open_timeout=10, max_size=None)
        for message in self.opening():
            await self.send(message)
        self._tasks = [asyncio.create_task(self._receive())]
        if self.line:
            self._tasks.append(asyncio.create_task(self._line()))

    async def say(self, pcm: np.ndarray, sample_rate: int) -> float:
        """Queue speech on the line; returns (time.time()) when its last packet was sent."""
        audio = soxr.resample(np.asarray(pcm, np.float32), sample_rate, self.rate) if sample_rate != self.rate else pcm
        data = self.encode(np.asarray(audio))
        silence = self.encode(np.zeros(self.rate * self.packet_ms // 1000))
        data += silence[: (-len(data)) % self.packet_bytes]
        done = asyncio.get_running_loop().create_future()
        await self._speech.put((data, done))
        return await done

    async def send(self, message: dict | str | bytes) -> None:
        """A dict as JSON, a str or bytes as is (a text or a binary message)."""
        await self._ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def press(self, digit: str) -> None:
        """The caller presses a key: the carrier's DTMF event."""
        await self.send(self.dtmf_message(digit))

    async def hang_up(self) -> None:
        """The caller hangs up: the carrier's stop event, or the websocket closed."""
        message = self.stop_message()
        if message is None:
            await self.close()
        else:
            await self.send(message)

    # -- what came back --
    def events(self, kind: str, after: float = 0.0) -> list[tuple[float, Any]]:
        return [(t, m) for t, k, m in self.received if k == kind and t >= after]

    def media_bytes(self, after: float = 0.0) -> list[bytes]:
        """Each media message's audio bytes (the carrier's format), in order."""
        return [self.audio_of(m) for _, m in self.events("media", after)]

    def received_audio(self, after: float = 0.0) -> np.ndarray:
        """The server's audio that arrived after `after`, as float samples at `rate`."""
        chunks = self.media_bytes(after)
        return self.decode(b"".join(chunks)) if chunks else np.zeros(0)

    # -- internals --
    async def _line(self) -> None:
        """One packet per tick on an absolute schedule: queued speech, else silence."""
        silence = self.encode(np.zeros(self.rate * self.packet_ms // 1000))
        data, done, pos, tick, timestamp = b"", None, 0, time.monotonic(), 0
        try:
            while True:
                if pos >= len(data) and not self._speech.empty():
                    (data, done), pos = self._speech.get_nowait(), 0
                packet = data[pos:pos + self.packet_bytes] if pos < len(data) else silence
                pos += self.packet_bytes
                await self.send(self.media(packet, timestamp))
                timestamp += self.packet_ms
                if done is not None and pos >= len(data):
                    if not done.done():
                        done.set_result(time.time())
                    done = None
                tick += self.packet_ms / 1000
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
        except Exception as e:  # the stream closed
            self._speech_failed(done, e)

    async def _receive(self) -> None:
        try:
            async for raw in self._ws:
                self.received.append((time.time(), *self.classify(raw)))
                self.arrived.set()
        except Exception:  # a dropped or refused connection ends the call; `closed` says so
            pass
        finally:
            self.closed.set()
            self.arrived.set()


class TelnyxCall(CarrierCall):
    """Telnyx media streaming: `connected`, `start` (call_control_id, custom_parameters,
    8 kHz PCMU), base64 `media`, `dtmf`, `stop`; back: `media`, `clear`."""

    @classmethod
    def from_texml(cls, texml: str, *, call_id: str, connect_to: str | None = None, **kwargs) -> "TelnyxCall":
        """The stream Telnyx opens for a TeXML answer: to its `<Connect><Stream url>` (dialled
        at `connect_to`), its `<Parameter>`s as custom_parameters (ValueError without a stream)."""
        stream = ElementTree.fromstring(texml).find("./Connect/Stream")
        if stream is None or not stream.get("url"):
            raise ValueError(f"no <Connect><Stream url> in the TeXML: {texml[:200]!r}")
        parameters = {p.get("name"): p.get("value", "") for p in stream.findall("Parameter")}
        return cls(connect_to or stream.get("url"), call_id=call_id, parameters=parameters, **kwargs)

    def opening(self):
        return [{"event": "connected", "version": "1.0.0"},
                {"event": "start", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                 "start": {"user_id": str(uuid.uuid4()), "call_control_id": self.call_id,
                           "call_session_id": str(uuid.uuid4()), "from": "+15550001111", "to": "+15550002222",
                           "client_state": None, "custom_parameters": self.parameters,
                           "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}]

    def media(self, packet, timestamp_ms):
        return {"event": "media", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                "media": {"track": "inbound", "chunk": str(timestamp_ms // self.packet_ms + 1),
                          "timestamp": str(timestamp_ms), "payload": base64.b64encode(packet).decode()}}

    def stop_message(self):
        return {"event": "stop", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                "stop": {"user_id": str(uuid.uuid4()), "call_control_id": self.call_id}}

    def dtmf_message(self, digit):
        return {"event": "dtmf", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                "occurred_at": "2026-01-01T00:00:00Z", "dtmf": {"digit": digit}}


class PlivoCall(CarrierCall):
    """Plivo audio streaming: `start` (callId, streamId, mu-law 8 kHz, `extra_headers`),
    base64 `media`, `dtmf`, `stop`; back: `playAudio`, `clearAudio`."""

    def __init__(self, url: str, *, extra_headers: str = "", **kwargs):
        super().__init__(url, **kwargs)
        self.extra_headers = extra_headers

    @classmethod
    def from_xml(cls, xml: str, *, call_id: str, connect_to: str | None = None, **kwargs) -> "PlivoCall":
        """The stream Plivo opens for an XML answer: to its `<Stream>` URL (dialled at
        `connect_to`), with its `extraHeaders` (ValueError without a stream)."""
        stream = ElementTree.fromstring(xml).find("./Stream")
        if stream is None or not (stream.text or "").strip():
            raise ValueError(f"no <Stream> in the Plivo XML: {xml[:200]!r}")
        return cls(connect_to or stream.text.strip(), call_id=call_id,
                   extra_headers=stream.get("extraHeaders", ""), **kwargs)

    def opening(self):
        return [{"event": "start", "sequenceNumber": self.next_seq(),
                 "start": {"callId": self.call_id, "streamId": self.stream_id, "accountId": "MA" + "0" * 18,
                           "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
                 "extra_headers": self.extra_headers}]

    def media(self, packet, timestamp_ms):
        return {"event": "media", "sequenceNumber": self.next_seq(), "streamId": self.stream_id,
                "media": {"track": "inbound", "timestamp": str(int(time.time() * 1000)),
                          "chunk": timestamp_ms // self.packet_ms + 1, "payload": base64.b64encode(packet).decode()},
                "extra_headers": self.extra_headers}

    def stop_message(self):
        return {"event": "stop", "sequenceNumber": self.next_seq(), "streamId": self.stream_id}

    def dtmf_message(self, digit):
        return {"event": "dtmf", "sequenceNumber": self.next_seq(), "streamId": self.stream_id,
                "dtmf": {"track": "inbound", "digit": digit, "timestamp": str(int(time.time() * 1000))}}

    def classify(self, raw):
        message = json.loads(raw)
        kind = {"playAudio": "media", "clearAudio": "clear"}.get(message.get("event"), message.get("event", "?"))
        return kind, message


class ExotelCall(CarrierCall):
    """Exotel's Voicebot applet stream: `connected`, `start` (stream_sid, call_sid,
    account_sid, custom_parameters), base64 16-bit PCM `media` (8 kHz, ~100 ms chunks),
    `dtmf`, `stop`; back: `media`, `clear`, `mark`."""

    packet_ms = 100

    def encode(self, audio):
        return pcm16(audio)

    def decode(self, data):
        return pcm16_decode(data)

    def opening(self):
        return [{"event": "connected"},
                {"event": "start", "sequence_number": self.next_seq(), "stream_sid": self.stream_id,
                 "start": {"stream_sid": self.stream_id, "call_sid": self.call_id, "account_sid": "exotel-test",
                           "from": "09000000001", "to": "09000000002", "custom_parameters": self.parameters,
                           "media_format": {"encoding": "base64", "sample_rate": str(self.rate),
                                            "bit_rate": "128kbps"}}}]

    def media(self, packet, timestamp_ms):
        return {"event": "media", "sequence_number": self.next_seq(), "stream_sid": self.stream_id,
                "media": {"chunk": timestamp_ms // self.packet_ms + 1, "timestamp": str(timestamp_ms),
                          "payload": base64.b64encode(packet).decode()}}

    def stop_message(self):
        return {"event": "stop", "sequence_number": self.next_seq(), "stream_sid": self.stream_id,
                "stop": {"call_sid": self.call_id, "account_sid": "exotel-test", "reason": "callended"}}

    def dtmf_message(self, digit):
        return {"event": "dtmf", "sequence_number": self.next_seq(), "stream_sid": self.stream_id,
                "dtmf": {"duration": "120", "digit": digit}}


class VonageCall(CarrierCall):
    """The Vonage Voice API websocket: a text `websocket:connected` (content-type, the NCCO's
    headers), then binary 16-bit PCM at 16 kHz in 20 ms frames, `websocket:dtmf`; the call's
    end closes the websocket; back: binary audio, `{"action": "clear"}`."""

    rate = 16000

    @classmethod
    def from_ncco(cls, ncco: str | list, *, connect_to: str | None = None, authorization: str | None = None,
                  **kwargs) -> "VonageCall":
        """The websocket Vonage opens for an NCCO answer: to its websocket endpoint's uri
        (dialled at `connect_to`), its `headers` in the first message; `authorization` (a
        signed JWT) sent as `Authorization: Bearer` when the endpoint asks for Vonage's."""
        ncco = json.loads(ncco) if isinstance(ncco, str) else ncco
        endpoint = next(e for action in ncco if action.get("action") == "connect"
                        for e in action.get("endpoint", []) if e.get("type") == "websocket")
        headers = dict(kwargs.pop("headers", None) or {})
        if authorization is not None and (endpoint.get("authorization") or {}).get("type") == "vonage":
            headers["Authorization"] = f"Bearer {authorization}"
        call = cls(connect_to or endpoint["uri"], parameters=endpoint.get("headers", {}), headers=headers, **kwargs)
        call.content_type = endpoint.get("content-type", call.content_type)
        return call

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self.content_type = f"audio/l16;rate={self.rate}"

    def encode(self, audio):
        return pcm16(audio)

    def decode(self, data):
        return pcm16_decode(data)

    def opening(self):
        return [{"event": "websocket:connected", "content-type": self.content_type, **self.parameters}]

    def media(self, packet, timestamp_ms):
        return packet

    def stop_message(self):
        return None

    def dtmf_message(self, digit):
        return {"event": "websocket:dtmf", "digit": digit, "duration": 120}

    def classify(self, raw):
        if isinstance(raw, bytes):
            return "media", raw
        message = json.loads(raw)
        return ("clear" if message.get("action") == "clear" else message.get("event", message.get("action", "?"))), \
            message

    def audio_of(self, message):
        return message


# -- what the carriers sign --

def telnyx_signed(private_key: Ed25519PrivateKey, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers Telnyx sends with a webhook: ed25519 over "{timestamp}|{body}"."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = private_key.sign(f"{timestamp}|".encode() + body)
    return {"telnyx-timestamp": str(timestamp), "telnyx-signature-ed25519": base64.b64encode(signature).decode()}


def plivo_signed(auth_token: str, url: str, params: dict[str, str], method: str = "POST",
                 nonce: str | None = None) -> dict[str, str]:
    """The headers Plivo sends with a request to `url` (V3), following Plivo's SDK step by
    step: the base URL with the query sorted, for POST "." and the fields sorted as "kv",
    then "." and the nonce, HMAC-SHA256, base64."""
    nonce = nonce or secrets.token_hex(10)
    parts = urlsplit(url)
    query = {k: sorted(v) for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if method == "GET":
        query.update({k: [v] for k, v in params.items()})
    query_string = "&".join(f"{k}={v}" for k in sorted(query) for v in query[k])
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    post = method == "POST" and bool(params)
    if query_string or post:
        base += "?" + query_string
    if query_string and post:
        base += "."
    if post:
        base += "".join(f"{k}{params[k]}" for k in sorted(params))
    digest = hmac.new(auth_token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256).digest()
    return {"X-Plivo-Signature-V3": base64.b64encode(digest).decode(), "X-Plivo-Signature-V3-Nonce": nonce}


def vonage_jwt(secret: str, payload: bytes | None = None, iat: float | None = None) -> str:
    """The JWT of a Vonage signed webhook (HS256 with the signature secret), its
    payload_hash the SHA-256 of `payload` when given."""
    claims = {"iat": int(time.time() if iat is None else iat), "jti": str(uuid.uuid4()), "iss": "Vonage",
              "api_key": "abcd1234", "application_id": str(uuid.uuid4())}
    if payload is not None:
        claims["payload_hash"] = hashlib.sha256(payload).hexdigest()
    return jwt.encode(claims, secret, algorithm="HS256")
