"""Audio in: read files or arrays, fold to mono, resample with soxr, and refuse bad input
with an error that says what is wrong and how to fix it."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

AudioSource = "str | os.PathLike | bytes | np.ndarray"
SILENCE_PEAK = 1e-4  # -80 dBFS: below this a clip carries no usable signal


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, silent, too short or too long."""


@dataclass(frozen=True)
class AudioLimits:
    """Accepted duration of one clip, in seconds."""

    what: str
    min_seconds: float
    max_seconds: float


VOICE_LIMITS = AudioLimits("voice reference", 0.5, 30.0)
USER_LIMITS = AudioLimits("user audio", 0.1, 30.0)  # the reasoner's audio encoder sees at most 30 s


def read_audio(source, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Return (float32 samples, rate) from a path, encoded bytes, or an array with its
    `sample_rate`. Arrays may be int16/int32 PCM or float, mono or [frames, channels]."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise AudioError(f"audio file {os.fspath(source)!r} does not exist")
        try:
            data, rate = sf.read(os.fspath(source), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioError(f"cannot read audio file {os.fspath(source)!r}: {e}. Use WAV, FLAC or OGG.") from None
        if sample_rate is not None and sample_rate != rate:
            raise AudioError(f"{os.fspath(source)!r} is {rate} Hz but sample_rate={sample_rate} was given; "
                             "leave sample_rate out for files, the file's own rate is used")
        return data, int(rate)
    if isinstance(source, (bytes, bytearray)):
        try:
            data, rate = sf.read(io.BytesIO(source), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioError(f"cannot decode the audio bytes: {e}. Pass WAV/FLAC/OGG bytes, or a "
                             "numpy array with its sample_rate.") from None
        return data, int(rate)
    array = np.asarray(source)
    if sample_rate is None:
        raise AudioError("an audio array needs its sample_rate (for example sample_rate=16000)")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
        raise AudioError(f"sample_rate={sample_rate!r} is not a valid audio rate in Hz")
    if array.dtype == np.int16:
        array = array.astype(np.float32) / 32768.0
    elif array.dtype == np.int32:
        array = array.astype(np.float32) / 2147483648.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"audio arrays must be float or int16/int32 PCM, not {array.dtype}")
    return array.astype(np.float32, copy=False), int(sample_rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels; accepts [frames], [frames, channels] or [channels, frames]."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"audio must be 1-D or 2-D (frames x channels), got shape {samples.shape}")
    if samples.shape[1] > 8 >= samples.shape[0]:  # channels first
        samples = samples.T
    return samples.mean(axis=1)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """High-quality resampling (soxr); a no-op when the rates agree."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(source, sample_rate: int | None, target_rate: int, limits: AudioLimits) -> np.ndarray:
    """Read, fold to mono, check and resample one clip to `target_rate` float32 samples."""
    data, rate = read_audio(source, sample_rate)
    mono = to_mono(data)
    if mono.size == 0:
        raise AudioError(f"{limits.what} is empty (0 samples)")
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{limits.what} contains NaN or infinite samples")
    seconds = mono.size / rate
    if seconds < limits.min_seconds:
        raise AudioError(f"{limits.what} is too short: {seconds:.3f} s, at least {limits.min_seconds} s is needed")
    if seconds > limits.max_seconds:
        raise AudioError(f"{limits.what} is too long: {seconds:.1f} s, at most {limits.max_seconds} s is accepted; "
                         "trim it first")
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        raise AudioError(f"{limits.what} is silent (peak below -80 dBFS); check the recording or the input device")
    return resample(mono, rate, target_rate)
