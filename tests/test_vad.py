"""chroma_agent.runtime.vad: speech found in espeak-ng speech padded with silence and noise."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from chroma_agent.model.audio import resample
from chroma_agent.runtime.vad import speech_spans, trim_silence
from tests.conftest import speak

pytestmark = pytest.mark.timeout(60)

RATE = 48000  # a room's rate: not Silero's


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """(buffer, start, end): 1.5 s of silence, the speech, 1 s of low noise, at 48 kHz;
    start and end bound the speech (espeak-ng's clip is clean: its own pauses are near zero)."""
    clip, rate = sf.read(speak("What time does the store open on Saturday?",
                               tmp_path_factory.mktemp("vad") / "q.wav"), dtype="float32")
    clip = resample(clip, rate, RATE)
    voiced = np.flatnonzero(np.abs(clip) > 0.02)
    noise = np.random.default_rng(0).normal(0, 0.005, RATE).astype(np.float32)
    lead = np.zeros(int(1.5 * RATE), np.float32)
    return np.concatenate([lead, clip, noise]), lead.size + voiced[0], lead.size + voiced[-1]


def test_speech_spans_find_the_speech(padded):
    buffer, start, end = padded
    spans = speech_spans(buffer, RATE)
    assert spans, "no speech found in espeak speech"
    first, last = spans[0][0], spans[-1][1]
    assert start - 0.1 * RATE < first < start + 0.3 * RATE   # Silero's defaults may skip a short first word
    assert end - 0.1 * RATE < last < end + 0.3 * RATE
    assert all(a < b for a, b in spans) and all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def test_trim_silence_cuts_both_ends_and_keeps_dtype(padded):
    buffer, start, end = padded
    pcm16 = (buffer * 32767).astype(np.int16)
    trimmed = trim_silence(pcm16, RATE)
    assert trimmed.dtype == np.int16
    # espeak's first word "What" is a short burst before a pause: trimming keeps it
    assert start - 0.15 * RATE < trimmed_start(pcm16, trimmed) <= start + 0.02 * RATE
    assert end - 0.1 * RATE < trimmed_start(pcm16, trimmed) + trimmed.size < end + 0.3 * RATE


def trimmed_start(buffer, trimmed):
    """Where `trimmed` (a slice of `buffer`) starts in it."""
    assert np.shares_memory(buffer, trimmed)
    return (trimmed.ctypes.data - buffer.ctypes.data) // buffer.itemsize


def test_no_speech_gives_nothing():
    silence = np.zeros(RATE, np.float32)
    noise = np.random.default_rng(1).normal(0, 0.01, 2 * RATE).astype(np.float32)
    assert speech_spans(silence, RATE) == [] and speech_spans(noise, RATE) == []
    assert trim_silence(noise, RATE).size == 0 and trim_silence(np.zeros(0, np.float32), RATE).size == 0


def test_spans_are_silero_get_speech_timestamps_own(padded):
    # scored in the batched ONNX steps; the stretches as Silero's TorchScript model finds them
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    audio = resample(padded[0], RATE, 16000)
    with torch.inference_mode():
        theirs = get_speech_timestamps(torch.from_numpy(audio), load_silero_vad(), sampling_rate=16000,
                                       min_speech_duration_ms=100, speech_pad_ms=100)
    ours = speech_spans(audio, 16000, min_speech_ms=100, pad_ms=100)
    assert len(ours) == len(theirs) >= 1
    assert all(abs(a - t["start"]) <= 512 and abs(b - t["end"]) <= 512 for (a, b), t in zip(ours, theirs))


def test_threads_share_one_model_and_agree(padded):
    buffer = padded[0]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: speech_spans(buffer, RATE), range(4)))
    assert all(r == results[0] for r in results)


def test_lazy_load_leaves_torch_threads_alone():
    code = ("import sys, numpy as np, torch, chroma_agent.runtime.vad as vad\n"
            "assert 'silero_vad' not in sys.modules  # loaded on first use, not at import\n"
            "torch.set_num_threads(3)\n"
            "vad.speech_spans(np.zeros(16000, np.float32), 16000)\n"
            "vad.StreamingVAD().push(np.zeros(16000, np.float32))\n"
            "assert torch.get_num_threads() == 3, torch.get_num_threads()  # silero_vad's import sets 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
