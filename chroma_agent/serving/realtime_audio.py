"""The Realtime server's audio and voices: the caller's input buffer with server VAD
(`InputAudio`, the voice session's `InputBuffer` plus turn detection), 24 -> 8 kHz for the
G.711 output formats (`To8k`), and the voices clients may name (`Voices`).
"""
from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.vad import VAD_RATE, StreamingVAD
from .pcm import InputBuffer

MODEL_RATE = 24000           # the model's output rate and the API's pcm rate


class Voices:
    """The server's voices: the default one and the `*.safetensors` files of `--voices DIR`,
    by name (the file name without `.voice.safetensors` / `.safetensors`). A client's name
    is only ever looked up in this list, never joined into a path."""

    def __init__(self, default, directory: str | os.PathLike | None = None, default_name: str = "default"):
        self.default_name = default_name
        self._loaded = {default_name: default}
        self._files: dict[str, Path] = {}
        if directory is not None:
            for path in sorted(Path(directory).glob("*.safetensors")):
                name = path.name.removesuffix(".safetensors").removesuffix(".voice")
                if name != default_name:
                    self._files[name] = path

    @property
    def names(self) -> list[str]:
        return [self.default_name, *self._files]

    def get(self, name: str):
        """(name, Voice) for `name`; an unknown name gives the default (the caller warns).
        Loads a file once, on first use: call it off the event loop."""
        if name in self._loaded:
            return name, self._loaded[name]
        if name not in self._files:
            return self.default_name, self._loaded[self.default_name]
        from ..model.voice import Voice

        self._loaded[name] = Voice.load(self._files[name])
        return name, self._loaded[name]

    def known(self, name: str) -> bool:
        return name in self._loaded or name in self._files


# -- the caller's audio ------------------------------------------------------------------

INLINE_SAMPLES = MODEL_RATE // 4   # up to 250 ms at 24 kHz: resampled on the loop (tens of us)
END_PAD = VAD_RATE // 10   # a server-VAD turn keeps 100 ms after its speech, as `trim_silence` would


class InputAudio(InputBuffer):
    """The caller's audio since the last commit (the voice session's input buffer, capped at
    `max_turn_s`) and the server VAD over the stream. Sample offsets count from the
    session's first appended sample."""

    def __init__(self, limits):
        super().__init__(limits.max_turn_s)
        self.vad: StreamingVAD | None = None
        self._vad_base = 0
        self.speech_start: int | None = None
        # (samples so far, time.monotonic()) after each recent append: when a sample arrived
        self.arrivals: collections.deque[tuple[int, float]] = collections.deque(maxlen=256)

    async def append(self, samples: np.ndarray, rate: int, turn_detection: dict | None = None) -> list[tuple[str, int, Any]]:
        """Append float32 samples at `rate`; with `turn_detection`, the VAD's ("start",
        offset, None) and ("end", offset, the turn's audio) as they happen. On the event
        loop: a usual append (tens of ms) is resampled in place, a long one in a thread; the
        VAD's windows wait for their batched step on the loop (no thread per append)."""
        if samples.size <= INLINE_SAMPLES:
            samples = super().push(samples, rate)
        else:
            samples = await asyncio.to_thread(super().push, samples, rate)
        self.arrivals.append((self.total, time.monotonic()))
        found = []
        if turn_detection is not None:
            if self.vad is None:
                self.vad = StreamingVAD(threshold=turn_detection["threshold"],
                                        prefix_padding_ms=turn_detection["prefix_padding_ms"],
                                        silence_duration_ms=turn_detection["silence_duration_ms"])
                self._vad_base = self.total - samples.size
            for kind, at in await self.vad.push_async(samples):
                at += self._vad_base
                if kind == "start":
                    self.speech_start = at
                    found.append(("start", at, None))
                elif self.speech_start is not None:
                    found.append(("end", at, self.since(self.speech_start, at + END_PAD)))
                    self.speech_start = None
            if self.speech_start is None:  # between turns only the padding a start may reach back for
                self.keep(int((turn_detection["prefix_padding_ms"] + 500) * VAD_RATE / 1000))
        return found

    def arrived(self, offset: int) -> float | None:
        """time.monotonic() when the sample at `offset` arrived (the append that carried it),
        or None when that append is no longer remembered."""
        for total, at in self.arrivals:
            if total > offset:
                return at
        return None

    def clear(self) -> None:
        super().clear()
        self.speech_start = None
        if self.vad is not None and self.vad.speaking:
            self.vad.reset()

    def reset_vad(self) -> None:
        """Turn detection settings changed: the next push starts a fresh detector."""
        self.vad, self.speech_start = None, None


class To8k:
    """24 kHz -> 8 kHz for the G.711 formats, frame by frame with its state carried: a
    windowed-sinc low-pass (3.4 kHz, 63 taps, 1.3 ms delay) then every third sample, so each
    80 ms frame gives exactly 640 samples (a resampling stream would hold some back)."""

    TAPS = 63

    def __init__(self):
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        taps = np.sinc(2 * 3400 / MODEL_RATE * n) * np.hamming(self.TAPS)
        self.taps = (taps / taps.sum()).astype(np.float32)
        self.history = np.zeros(self.TAPS - 1, np.float32)
        self.phase = 0

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        x = np.concatenate([self.history, np.asarray(pcm, np.float32)])
        self.history = x[-(self.TAPS - 1):]
        filtered = np.convolve(x, self.taps, mode="valid")
        out = filtered[self.phase::3]
        self.phase = (self.phase - filtered.size) % 3
        return out
