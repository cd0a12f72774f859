"""Finding speech in a buffer: the library's one speech-finding helper, on Silero VAD.

    spans = speech_spans(pcm, 48000)        # [(start, end), ...] in samples of the input
    turn = trim_silence(pcm, 48000)         # leading/trailing non-speech cut; empty if none

Every entry point that must find the caller's speech in a buffer (the LiveKit plugin's
committed turn, for one) uses these, so they all agree on what counts as speech. The model
is the `silero-vad` package's TorchScript model, which ships in its wheel and runs offline
on the CPU. It is loaded once per process on first use (not at import) and is stateful, so
calls are serialised by a lock; they block (briefly), so run them off an event loop.
"""
from __future__ import annotations

import threading

import numpy as np

from ..model.audio import resample, to_mono

VAD_RATE = 16000  # Silero's native rate: every input is resampled to it once

_lock = threading.Lock()
_silero = None  # (model, get_speech_timestamps) once loaded


def _load():
    global _silero
    if _silero is None:
        import torch

        threads = torch.get_num_threads()
        import silero_vad  # its import calls torch.set_num_threads(1): a process-wide side effect

        torch.set_num_threads(threads)  # ...which would slow every model in the process; undo it
        _silero = silero_vad.load_silero_vad(), silero_vad.get_speech_timestamps
    return _silero


def _as_float(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        pcm = pcm.astype(np.float32) / 32768.0
    return to_mono(pcm.astype(np.float32, copy=False))


def speech_spans(pcm: np.ndarray, sample_rate: int, *, threshold: float = 0.5, min_speech_ms: int = 250,
                 min_silence_ms: int = 100, pad_ms: int = 30) -> list[tuple[int, int]]:
    """The stretches of speech in `pcm` (float or int16, mono or [frames, channels], any
    rate) as (start, end) sample offsets into `pcm`, in order. Silero's options: a stretch
    needs `min_speech_ms` of speech, ends after `min_silence_ms` of silence, and is widened
    by `pad_ms` each side."""
    samples = _as_float(pcm)
    if samples.size == 0:
        return []
    audio = resample(samples, sample_rate, VAD_RATE)
    import torch

    with _lock:
        model, get_speech_timestamps = _load()
        with torch.inference_mode():
            found = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(audio)), model, threshold=threshold,
                                          sampling_rate=VAD_RATE, min_speech_duration_ms=min_speech_ms,
                                          min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms)
    scale = sample_rate / VAD_RATE
    return [(min(samples.size, round(s["start"] * scale)), min(samples.size, round(s["end"] * scale)))
            for s in found]


def trim_silence(pcm: np.ndarray, sample_rate: int, *, min_speech_ms: int = 100, pad_ms: int = 100,
                 **options) -> np.ndarray:
    """`pcm` from the start of its first speech to the end of its last (pauses between
    stretches are kept), in the input's own dtype and layout; an empty array when it holds
    no speech. It errs toward keeping speech (a clipped word costs more than 100 ms of
    silence): stretches from 100 ms count, so a short first word such as "What" before a
    pause is not dropped, and the ends are widened by 100 ms. `options` as for `speech_spans`."""
    spans = speech_spans(pcm, sample_rate, min_speech_ms=min_speech_ms, pad_ms=pad_ms, **options)
    if not spans:
        return np.asarray(pcm)[:0]
    return np.asarray(pcm)[spans[0][0]:spans[-1][1]]


class StreamingVAD:
    """Turn detection on a live stream: feed audio as it arrives, get speech starts and
    ends as they happen (Silero's `VADIterator`, which needs 512-sample windows at 16 kHz).

        vad = StreamingVAD(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
        for kind, sample in vad.push(pcm16k):   # ("start", n) / ("end", n): offsets in the stream
            ...

    A start is reported `prefix_padding_ms` before the first speech window; an end after
    `silence_duration_ms` of silence, at the end of the speech (no padding). Each stream
    has its own Silero model (the model keeps state between windows; a load is cheap), so
    streams never share state or a lock. Blocking (a small fraction of real time per
    window): call it off an event loop.
    """

    WINDOW = 512

    def __init__(self, *, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500):
        import torch

        threads = torch.get_num_threads()
        import silero_vad  # see _load: its import changes the process's torch threads

        torch.set_num_threads(threads)
        self._iterator = silero_vad.VADIterator(silero_vad.load_silero_vad(), threshold=threshold,
                                                sampling_rate=VAD_RATE, min_silence_duration_ms=silence_duration_ms,
                                                speech_pad_ms=0)
        self._pad = int(prefix_padding_ms * VAD_RATE / 1000)
        self._rest = np.zeros(0, np.float32)
        self.samples = 0          # fed so far
        self.speaking = False

    def push(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        """Feed float32 mono samples at 16 kHz; the starts and ends they complete."""
        import torch

        audio = np.concatenate([self._rest, np.asarray(pcm, np.float32)])
        whole = audio.size // self.WINDOW * self.WINDOW
        self._rest = audio[whole:]
        found = []
        with torch.inference_mode():
            for i in range(0, whole, self.WINDOW):
                hit = self._iterator(torch.from_numpy(audio[i:i + self.WINDOW]))
                if hit and "start" in hit:
                    self.speaking = True
                    found.append(("start", max(0, hit["start"] - self._pad)))
                elif hit and "end" in hit:
                    self.speaking = False
                    found.append(("end", hit["end"]))
        self.samples += whole
        return found

    def reset(self) -> None:
        """Forget the stream's state (a new turn from scratch), keeping the sample count."""
        self._iterator.reset_states()
        self._iterator.current_sample = self.samples
        self.speaking = False
