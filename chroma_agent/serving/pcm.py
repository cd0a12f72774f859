"""PCM conversions and the caller's input buffer, shared by the voice adapters: float32 <->
int16 PCM bytes, and `InputBuffer`, the caller's audio at 16 kHz capped at its latest 30 s.
Framework-free and torch-free (the LiveKit plugin imports it without loading the model)."""
from __future__ import annotations

import numpy as np
import soxr

from ..runtime.vad import VAD_RATE

MAX_TURN_S = 30.0   # the reasoner's audio encoder hears at most this much of a turn


def int16_samples(pcm: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] as int16 samples (clipped): the one float -> int16."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


def to_int16(pcm: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] as int16 PCM bytes (what the frameworks carry)."""
    return int16_samples(pcm).tobytes()


def from_int16(data: bytes, channels: int = 1) -> np.ndarray:
    """Interleaved int16 PCM bytes as float32 mono samples (channels averaged)."""
    pcm = np.frombuffer(data, np.int16).reshape(-1, channels).mean(axis=1, dtype=np.float32)
    pcm /= 32768.0
    return pcm


class InputBuffer:
    """The caller's audio since the last `take()`, at 16 kHz, keeping only its latest
    `max_s` seconds. `total` counts the samples pushed since the buffer was made."""

    def __init__(self, max_s: float = MAX_TURN_S):
        self.max_samples = int(max_s * VAD_RATE)
        self.chunks: list[np.ndarray] = []
        self.size = 0
        self.total = 0
        self.overflowed = False        # it outgrew max_s since the last take/clear
        self._resampler: soxr.ResampleStream | None = None
        self._rate = VAD_RATE

    def push(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """Append float32 mono samples at `rate`; returns them at 16 kHz. Blocking (resampling)."""
        if rate != VAD_RATE:
            if self._resampler is None or rate != self._rate:  # streamed: no clicks at the seams of 10 ms frames
                self._resampler = soxr.ResampleStream(rate, VAD_RATE, 1, dtype="float32")
                self._rate = rate
            samples = self._resampler.resample_chunk(samples)
        self.chunks.append(samples)
        self.size += samples.size
        self.total += samples.size
        if self.size > self.max_samples:
            self.keep(self.max_samples)
            self.overflowed = True
        return samples

    def keep(self, n: int) -> None:
        """Drop the oldest whole chunks while at least `n` samples stay."""
        while self.chunks and self.size - self.chunks[0].size >= n:
            self.size -= self.chunks.pop(0).size

    def since(self, offset: int, until: int | None = None) -> np.ndarray:
        """The buffered audio from stream offset `offset` (to `until`), which is then cleared."""
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        first = self.total - audio.size
        start = max(0, offset - first, audio.size - self.max_samples)   # at most max_s of it
        self.clear()
        return audio[start:] if until is None else audio[start:max(start, until - first)]

    def take(self) -> np.ndarray:
        """The buffered audio (at most `max_s` of it), which is then cleared (a commit)."""
        return self.since(0)

    def clear(self) -> None:
        self.chunks, self.size, self.overflowed = [], 0, False

    @property
    def ms(self) -> int:
        return self.size * 1000 // VAD_RATE
