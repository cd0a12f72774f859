"""Finding speech in a buffer: the library's one speech-finding helper, on Silero VAD.

    spans = speech_spans(pcm, 48000)        # [(start, end), ...] in samples of the input
    turn = trim_silence(pcm, 48000)         # leading/trailing non-speech cut; empty if none

Every entry point that must find the caller's speech in a buffer (the LiveKit plugin's
committed turn, for one) uses these, so they all agree on what counts as speech. The model
is the `silero-vad` package's (its ONNX file, offline, on the CPU), scored in the process's
batched VAD steps (vad_batch.py) with a state of the buffer's own, so buffers of many calls
are scored together and none waits for another's; its speech stretches are Silero's own
`get_speech_timestamps_from_probs`. They block (briefly), so run them off an event loop.
"""
from __future__ import annotations

import numpy as np

from ..model.audio import resample, to_mono
from .vad_batch import BATCHER, WINDOW, StreamState

VAD_RATE = 16000  # Silero's native rate: every input is resampled to it once

def _silero():
    """The `silero-vad` package (its speech-stretch rules), imported without its side effect."""
    import torch

    threads = torch.get_num_threads()
    import silero_vad  # its import calls torch.set_num_threads(1): a process-wide side effect

    torch.set_num_threads(threads)  # ...which would slow every model in the process; undo it
    return silero_vad


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
    windows = np.zeros(-(-audio.size // WINDOW) * WINDOW, np.float32)   # the last window zero-padded, as Silero does
    windows[:audio.size] = audio
    probs = BATCHER.score(StreamState(), windows.reshape(-1, WINDOW))
    found = _silero().get_speech_timestamps_from_probs(probs.tolist(), sampling_rate=VAD_RATE, threshold=threshold,
                                             min_speech_duration_ms=min_speech_ms, min_silence_duration_ms=min_silence_ms,
                                             speech_pad_ms=pad_ms, audio_length_samples=audio.size)
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
    ends as they happen (the decisions of Silero's `VADIterator`, on 512-sample windows at
    16 kHz).

        vad = StreamingVAD(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
        for kind, sample in vad.push(pcm16k):   # ("start", n) / ("end", n): offsets in the stream
            ...

    A start is reported `prefix_padding_ms` before the first speech window; an end after
    `silence_duration_ms` of silence, at the end of the speech (no padding). Every stream
    of the process is scored by one Silero session, the windows that streams hand in at
    about the same time as one batch (vad_batch.py); each stream keeps its own state.
    `push` blocks (its windows' turn in the next batched step): call it off an event loop, or
    await `push_async` on one.
    """

    WINDOW = WINDOW

    def __init__(self, *, threshold: float = 0.5, prefix_padding_ms: int = 300, silence_duration_ms: int = 500):
        self.threshold = threshold
        self._min_silence = VAD_RATE * silence_duration_ms / 1000
        self._stream = StreamState()
        self._pad = int(prefix_padding_ms * VAD_RATE / 1000)
        self._rest = np.zeros(0, np.float32)
        self._temp_end = 0        # where the silence that may end the speech began (0: none)
        self.samples = 0          # fed so far
        self.speaking = False

    def push(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        """Feed float32 mono samples at 16 kHz; the starts and ends they complete. Blocking."""
        return self._decide_all(BATCHER.score(self._stream, self._windows(pcm)))

    async def push_async(self, pcm: np.ndarray) -> list[tuple[str, int]]:
        """`push`, its windows' turn in the batched step awaited on the running event loop."""
        return self._decide_all(await BATCHER.score_async(self._stream, self._windows(pcm)))

    def _windows(self, pcm: np.ndarray) -> np.ndarray:
        """The whole windows of what is buffered with `pcm` (the rest kept for the next push)."""
        audio = np.concatenate([self._rest, np.asarray(pcm, np.float32)])
        whole = audio.size // WINDOW * WINDOW
        self._rest = audio[whole:]
        return audio[:whole].reshape(-1, WINDOW)

    def _decide_all(self, probs: np.ndarray) -> list[tuple[str, int]]:
        found = []
        for prob in probs.tolist():
            self.samples += WINDOW
            if hit := self._decide(prob):
                found.append(hit)
        return found

    def _decide(self, prob: float) -> tuple[str, int] | None:
        """Silero's VADIterator rule for one window's probability (speech_pad 0)."""
        if prob >= self.threshold:
            self._temp_end = 0
            if not self.speaking:
                self.speaking = True
                return "start", max(0, self.samples - WINDOW - self._pad)
        elif prob < self.threshold - 0.15 and self.speaking:
            self._temp_end = self._temp_end or self.samples
            if self.samples - self._temp_end >= self._min_silence:
                end, self._temp_end, self.speaking = self._temp_end - WINDOW, 0, False
                return "end", end
        return None

    def reset(self) -> None:
        """Forget the stream's state (a new turn from scratch), keeping the sample count."""
        self._stream.reset()
        self._temp_end = 0
        self.speaking = False
