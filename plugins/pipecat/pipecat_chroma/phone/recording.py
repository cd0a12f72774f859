"""Call recordings (`--record DIR`): one stereo WAV per call, the caller on the left and the
agent on the right, as the caller heard it, plus the call's JSON metadata.

    recording = CallRecording(record_dir, call_id, started=call_started)   # at the call's start
    serializer.audio_taps.append(recording.tap)                            # SafeMedia's taps
    ...
    wav_path = await recording.close({"provider": "twilio", "direction": "inbound"})

Files, mode 0600, never an existing file nor through a symlink: `DIR/<stem>.wav` (16-bit PCM,
2 channels at `rate`: left the caller, right the agent) and `DIR/<stem>.json`. The stem is the
call's start time in UTC and a hash of its id (`20260102T100001Z-3f9a1c2b7d`, `-2`, `-3`, ...
if taken): a call id comes from the client, so it is never part of a path; the JSON holds it.

Alignment: each side's audio is placed by wall time since `started` (`clock()` when it is
tapped): a caller packet ends when it arrives (it was spoken during the packet's length before),
an agent packet starts when it is written to the carrier (Pipecat's output transport writes at
up to twice real time; the carrier plays it back to back, so a side's packets that come back
to back are placed back to back, `max(continuation, wall time)`, and only a pause over GAP_S
starts the side again at its wall time: scheduling noise never jitters the audio). A barge-in
(`tap("interrupt", b"", 0)` when the serializer sends the carrier its clear message) cuts the
agent's audio at that moment: what the carrier had buffered and dropped was never heard.
Silence fills every gap. Limitation: a burst of caller packets held up over GAP_S by the
network is placed when it arrives (later than it was spoken) and the caller's side keeps that
delay while its packets come back to back.

Memory is bounded whatever the call's length: taps only queue the packets' bytes (no I/O, no
resampling on the event loop); about once a second a writer thread resamples them (soxr),
lays them into a window of a few seconds and appends what neither side can change any more
to the WAV. A call is recorded for at most `max_seconds` (MAX_SECONDS, 4 hours): past it the
recording stops and its metadata says `"truncated": true`.

If the process dies mid-call, the WAV's header is rewritten after each append, so any reader
sees a valid file holding the call up to about a second before the end; its JSON, written at
the first append, says `"complete": false`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soundfile as sf
import soxr
from loguru import logger

from chroma_agent.serving.private_dir import prepare_private_dir
from chroma_agent.serving.log_safety import carrier_id, printable

SIDES = ("caller", "agent")        # the WAV's channels, left to right
INTERRUPT = "interrupt"            # tap(INTERRUPT, b"", 0): the carrier's buffer was cleared (barge-in)
GAP_S = 0.06                       # a side's pause longer than this starts it again at its wall time
FLUSH_S = 1.0                      # how often taps hand their packets to the writer
AHEAD_S = 30.0                     # agent audio placed further ahead of wall time is dropped (a 30 s reply at 2x pace is 15 s ahead)
MAX_PENDING_BYTES = 2 * 1024 * 1024   # packets waiting for a slow disk: past this they are dropped (counted)
MAX_SECONDS = 4 * 3600             # per call
CALL_ID_CHARS = 256                # of the call id kept in the JSON
RATES = (4000, 96000)              # the sample rates a tap may carry
_HEADER = 44                       # libsndfile's WAV header for 16-bit PCM, 1 or 2 channels

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _writer_pool() -> ThreadPoolExecutor:
    """The threads every call's recording writes from (two: a recording's writes are
    sequential, and a second of audio takes about a millisecond to write)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="call-recording")
        return _pool


def prepare_record_dir(directory: str | os.PathLike) -> Path:
    """The recordings folder, made (0700) if missing and checked writable now, so that a
    server fails at start, not at its first call (ValueError naming the problem)."""
    return prepare_private_dir(directory, "--record", "recordings")


def recording_stem(call_id: str, started_wall: float) -> str:
    """A recording's file name without its suffix: the start time (UTC) and a hash of the
    call id, never the id itself (it comes from the client)."""
    stamp = datetime.fromtimestamp(started_wall, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    digest = hashlib.sha256(str(call_id).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{stamp}-{digest}"


class _Side:
    """One side's placement, on the event loop: its current run of back-to-back packets
    starts at output sample `start` and holds `taken` samples at `rate`."""

    __slots__ = ("open", "start", "taken", "rate", "samples", "packets")

    def __init__(self):
        self.open, self.start, self.taken, self.rate = False, 0, 0, 0
        self.samples = 0    # placed, at the recording's rate
        self.packets = 0

    def end(self, out_rate: int) -> float:
        return self.start + (self.taken * out_rate / self.rate if self.rate else 0)


class CallRecording:
    """One call's stereo recording (see the module's docstring): `tap(side, pcm, rate)` for
    each packet, `await close(metadata)` when the call ends.

    `directory`: where the files go (see `prepare_record_dir`); `call_id`: the carrier's
    call id (kept in the JSON only); `started`: `clock()` at the call's start (default now);
    `rate`: the WAV's sample rate; `clock`: time.monotonic, or a fake one in tests;
    `max_seconds`: the longest recording. Nothing touches the disk until the first second
    of audio is handed to the writer thread."""

    def __init__(self, directory: str | os.PathLike, call_id: str, started: float | None = None,
                 rate: int = 16000, *, clock: Callable[[], float] = time.monotonic,
                 max_seconds: float = MAX_SECONDS):
        if not RATES[0] <= rate <= RATES[1]:
            raise ValueError(f"rate {rate} out of {RATES[0]}..{RATES[1]}")
        if not 0 < max_seconds * rate * 4 < 2**32 - _HEADER:   # a WAV holds at most 4 GiB
            raise ValueError(f"max_seconds {max_seconds} out of range for a WAV at {rate} Hz")
        self.directory = Path(directory)
        self.call_id = str(call_id)[:CALL_ID_CHARS]
        self.rate = rate
        self.max_seconds = max_seconds
        self._clock = clock
        self.started = clock() if started is None else started
        self.started_wall = time.time() - (clock() - self.started)
        self.stem = recording_stem(call_id, self.started_wall)
        self.path = self.directory / f"{self.stem}.wav"   # final once a file is made (-2, ... if taken)
        self.truncated = False
        self.dropped_packets = 0
        self.error: str | None = None
        self._max_samples = int(max_seconds * rate)
        self._sides = {name: _Side() for name in SIDES}
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._handoff_at = 0.0
        self._inflight: Future | None = None
        self._stopped = False                  # truncated, failed or closing: taps are ignored
        self._closing: asyncio.Future | None = None
        self._writer = _Writer(self)

    # -- on the event loop ------------------------------------------------------------------
    def tap(self, side: str, pcm: bytes, rate: int) -> None:
        """A packet of 16-bit mono PCM at `rate` of `side` ("caller": inbound, as decoded;
        "agent": outbound, as written to the carrier), or `INTERRUPT` (the carrier was told
        to drop the agent's audio it had buffered). Cheap: it only queues the bytes."""
        if self._stopped:
            return
        now = max(0.0, self._clock() - self.started) * self.rate    # in output samples
        if side == INTERRUPT:
            self._cut(now)
            return
        placement = self._sides.get(side)
        if placement is None:
            raise ValueError(f"unknown side {printable(side, 20)!r}: one of {SIDES} or {INTERRUPT!r}")
        n = len(pcm) // 2
        if n == 0 or not RATES[0] <= rate <= RATES[1]:
            self.dropped_packets += 1
            return
        out = n * self.rate / rate
        wall = now - min(out, GAP_S * self.rate) if side == "caller" else now
        end = placement.end(self.rate)
        start = -1                                  # continues the side's run
        if not placement.open or rate != placement.rate or wall - end > GAP_S * self.rate:
            start = int(round(max(wall, end)))
        position = start if start >= 0 else end
        if position >= self._max_samples:
            self.truncated = self._stopped = True
            logger.info(f"recording {self.stem}: {self.max_seconds:g} s reached; the rest of the call is not recorded")
            return
        if position > now + AHEAD_S * self.rate or self._pending_bytes + len(pcm) > MAX_PENDING_BYTES:
            self.dropped_packets += 1
            placement.open = False                  # the next packet starts the side again
            return
        if start >= 0:
            placement.open, placement.start, placement.taken, placement.rate = True, start, 0, rate
        placement.taken += n
        placement.samples += round(out)
        placement.packets += 1
        self._pending.append((side, start, rate, bytes(pcm[:2 * n])))
        self._pending_bytes += 2 * n
        if now - self._handoff_at >= FLUSH_S * self.rate:
            self._handoff(now)

    def interrupt(self) -> None:
        """The agent's audio is cut now (a barge-in): same as `tap(INTERRUPT, b"", 0)`."""
        self.tap(INTERRUPT, b"", 0)

    def _cut(self, now: float) -> None:
        agent = self._sides["agent"]
        if agent.end(self.rate) > now:          # audio written ahead: the carrier dropped it
            agent.open, agent.start, agent.taken, agent.rate = False, int(round(now)), 0, 0
            self._pending.append(("agent", agent.start, 0, None))
        elif agent.open:                        # all of it was heard: the run just ends
            agent.open = False
            self._pending.append(("agent", -2, 0, None))

    def _handoff(self, now: float, final: bool = False) -> None:
        """Hand the queued packets to the writer thread unless a write is in flight (then
        they wait for the next packet's hand-off)."""
        if self._inflight is not None and not self._inflight.done():
            return
        for name, placement in self._sides.items():   # a side quiet since long: its run ended
            if placement.open and (final or now - placement.end(self.rate) > 2 * GAP_S * self.rate):
                placement.open = False
                self._pending.append((name, -2, 0, None))
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._handoff_at = now
        self._inflight = _writer_pool().submit(self._writer.write, batch, int(round(now)), final)

    @property
    def buffered_bytes(self) -> int:
        """Memory held for this call's audio: packets queued plus the writer's window."""
        return self._pending_bytes + self._writer.window_bytes

    def sides(self) -> dict[str, dict[str, int]]:
        """Each side's packets and samples (at `rate`) recorded so far."""
        return {name: {"packets": s.packets, "samples": s.samples} for name, s in self._sides.items()}

    async def settle(self) -> None:
        """Wait for the write in flight, if any (tests: a server never needs it)."""
        if self._inflight is not None:
            await asyncio.wrap_future(self._inflight)

    async def close(self, metadata: dict[str, Any] | None = None) -> Path:
        """Finish the call's files (in the writer thread): the WAV, padded with silence to
        the call's end (or to the end of agent audio already sent, if later), and the JSON: `metadata` plus the recording's own fields (`call_id`,
        `file`, `started_at`, `ended_at`, `duration_s`, `rate`, `channels`, `channel_layout`,
        `sides` (packets and samples), `dropped_packets`, `truncated`, `max_seconds`,
        `complete`, and `error` when writing failed). Returns the WAV's path. Idempotent:
        later calls wait for the first and return the same path. Never raises for a failed
        write: it is logged and in the metadata's `error` (when the JSON can be written)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(dict(metadata or {})))
        return await asyncio.shield(self._closing)

    async def _close(self, metadata: dict[str, Any]) -> Path:
        self._stopped = True
        now = max(0.0, self._clock() - self.started) * self.rate
        self.truncated = self.truncated or now >= self._max_samples
        await self.settle()
        self._inflight = None
        self._handoff(now, final=True)
        await self.settle()
        fields = {"call_id": self.call_id, "ended_at": _iso(self.started_wall + now / self.rate),
                  "sides": self.sides(), "dropped_packets": self.dropped_packets,
                  "truncated": self.truncated, "complete": True}
        await asyncio.wrap_future(_writer_pool().submit(self._writer.finish, {**metadata, **fields}))
        return self.path

    def header(self) -> dict[str, Any]:
        """The JSON fields known from the start."""
        return {"call_id": self.call_id, "file": self.path.name, "started_at": _iso(self.started_wall),
                "rate": self.rate, "channels": len(SIDES), "channel_layout": list(SIDES),
                "max_seconds": self.max_seconds, "complete": False}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class _Writer:
    """The recording's files and window, used only from the writer thread (one batch at a
    time): resamples each side's runs, lays them into the window, appends to the WAV what
    neither side can change any more."""

    def __init__(self, recording: CallRecording):
        self.rec = recording
        self.file: sf.SoundFile | None = None
        self.fd = -1
        self.patch_header = False
        self.base = 0                                   # samples written to the WAV
        self.used = 0                                   # window samples holding audio
        self.window = np.zeros((0, len(SIDES)), np.int16)
        self.streams: list[soxr.ResampleStream | None] = [None] * len(SIDES)
        self.next = [0] * len(SIDES)                    # where each side's next sample goes
        self.open = [False] * len(SIDES)
        self.hold = int(GAP_S * recording.rate)
        self.cap = int((AHEAD_S + 4 * FLUSH_S) * recording.rate)   # the window's longest

    @property
    def window_bytes(self) -> int:
        return self.window.nbytes

    def write(self, batch: list[tuple], now: int, final: bool) -> None:
        if self.rec.error is not None:
            return
        try:
            self._open()
            for side in range(len(SIDES)):
                self._lay(side, [event for event in batch if event[0] == SIDES[side]])
            if final:
                self._commit(min(max([now, *self.next]), self.rec._max_samples))
                return
            # final: before what a side's run still holds back (its resampler's tail) and
            # before where a side's next packet can land (a little before now)
            self._commit(min([now - self.hold, *(self.next[s] for s in range(len(SIDES)) if self.open[s])]))
        except Exception as e:   # a full disk, a folder gone: the call goes on unrecorded
            self._fail(e)

    def _open(self) -> None:
        if self.file is not None:
            return
        rec = self.rec
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        for n in range(1, 1000):
            stem = rec.stem if n == 1 else f"{rec.stem}-{n}"
            try:
                self.fd = os.open(rec.directory / f"{stem}.wav", flags, 0o600)
            except FileExistsError:
                continue
            rec.stem, rec.path = stem, rec.directory / f"{stem}.wav"
            break
        else:
            raise FileExistsError(f"{rec.stem}.wav and 998 more of that name exist")
        self.file = sf.SoundFile(self.fd, "w", samplerate=rec.rate, channels=len(SIDES), subtype="PCM_16",
                                 format="WAV", closefd=True)
        head = os.pread(self.fd, _HEADER, 0)
        self.patch_header = head[:4] == b"RIFF" and head[8:12] == b"WAVE" and head[36:40] == b"data"
        _write_json(rec.directory / f"{rec.stem}.json", rec.header())

    def _lay(self, side: int, events: list[tuple]) -> None:
        """Resample and place one side's events: runs of back-to-back packets, their starts,
        ends and cuts."""
        chunk: list[bytes] = []
        for _, start, rate, data in events:
            if start != -1 or data is None:
                self._feed(side, chunk)
                chunk = []
                self._end_run(side)
            if data is None:
                if start >= 0:      # a cut: what was laid past it was never heard
                    a = max(0, start - self.base)
                    self.window[a:self.used, side] = 0
                    self.next[side] = min(self.next[side], start)
                continue
            if start >= 0:
                self.next[side], self.open[side] = start, True
                self.streams[side] = None if rate == self.rec.rate else soxr.ResampleStream(
                    rate, self.rec.rate, 1, dtype="int16", quality="HQ")
            chunk.append(data)
        self._feed(side, chunk)

    def _feed(self, side: int, chunk: list[bytes]) -> None:
        if not chunk:
            return
        x = np.frombuffer(b"".join(chunk), "<i2")
        stream = self.streams[side]
        self._place(side, stream.resample_chunk(x) if stream is not None else x)

    def _end_run(self, side: int) -> None:
        stream = self.streams[side]
        if stream is not None:
            self._place(side, stream.resample_chunk(np.zeros(0, np.int16), last=True))
        self.streams[side], self.open[side] = None, False

    def _place(self, side: int, samples: np.ndarray) -> None:
        start = self.next[side]
        self.next[side] = start + len(samples)
        end = min(start + len(samples), self.rec._max_samples)
        if end - self.base > self.cap:               # never more than `cap` in memory
            self._commit(end - self.cap)
        a = max(start, self.base)
        if end <= a:
            return
        self._reserve(end)
        self.window[a - self.base:end - self.base, side] = samples[a - start:end - start]

    def _reserve(self, end: int) -> None:
        size = end - self.base
        if size > len(self.window):
            grown = np.zeros((max(size, 2 * len(self.window), self.rec.rate), len(SIDES)), np.int16)
            grown[:self.used] = self.window[:self.used]
            self.window = grown
        self.used = max(self.used, size)

    def _commit(self, upto: int) -> None:
        """Append the window's samples before `upto` to the WAV (silence where none)."""
        n = upto - self.base
        if n <= 0 or self.file is None:
            return
        self._reserve(upto)
        self.file.write(self.window[:n])
        rest = self.used - n
        self.window[:rest] = self.window[n:self.used]
        self.window[rest:self.used] = 0
        self.used, self.base = rest, upto
        if len(self.window) > 4 * max(rest, self.rec.rate):    # after a long reply written ahead
            self.window = self.window[:2 * max(rest, self.rec.rate)].copy()
        if self.patch_header:      # a valid WAV up to here, whatever happens next
            data = self.base * 2 * len(SIDES)
            os.pwrite(self.fd, struct.pack("<I", 36 + data), 4)
            os.pwrite(self.fd, struct.pack("<I", data), 40)

    def finish(self, fields: dict[str, Any]) -> None:
        rec = self.rec
        try:
            if self.file is None and rec.error is None:
                self._open()
        except Exception as e:
            self._fail(e)
        if self.file is not None:
            try:
                self.file.close()
            except Exception as e:
                self._fail(e)
        duration = self.base / rec.rate
        doc = {**fields, **{k: v for k, v in rec.header().items() if k != "complete"},
               "duration_s": round(duration, 3), "truncated": rec.truncated}
        if rec.error is not None:
            doc["error"], doc["complete"] = rec.error, False
        try:
            _write_json(rec.directory / f"{rec.stem}.json", doc)
        except Exception as e:
            self._fail(e)
        self.window = np.zeros((0, len(SIDES)), np.int16)

    def _fail(self, e: Exception) -> None:
        rec = self.rec
        if rec.error is None:
            rec.error = f"{type(e).__name__}: {getattr(e, 'strerror', None) or ''}".strip(": ")
            rec._stopped = True
            sid = carrier_id(rec.call_id)
            logger.error(f"recording {rec.stem}{f' of call {sid}' if sid else ''} failed: {rec.error}; "
                         "the call goes on unrecorded")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it), mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
