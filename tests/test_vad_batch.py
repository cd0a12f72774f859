"""Server VAD for all streams in one Silero inference per step: the same turns as Silero's
own VADIterator, streams apart from each other, and concurrent streams batched."""
import asyncio
import threading

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from chroma_agent.runtime.vad import VAD_RATE, StreamingVAD
from chroma_agent.runtime.vad_batch import BATCHER


@pytest.fixture(scope="module")
def turns(speech):
    """Two spoken turns with silence around and between them, at 16 kHz."""
    audio, rate = sf.read(speech["question"], dtype="float32")
    audio = soxr.resample(audio, rate, VAD_RATE).astype(np.float32)
    gap = np.zeros(VAD_RATE, np.float32)
    return np.concatenate([gap, audio, gap, audio, gap])


def reference(pcm, threshold=0.5, pad_ms=300, silence_ms=500):
    """Silero's own VADIterator on its TorchScript model, as StreamingVAD ran before."""
    import silero_vad

    it = silero_vad.VADIterator(silero_vad.load_silero_vad(), threshold=threshold, sampling_rate=VAD_RATE,
                                min_silence_duration_ms=silence_ms, speech_pad_ms=0)
    found, pad = [], int(pad_ms * VAD_RATE / 1000)
    with torch.inference_mode():
        for i in range(0, pcm.size // 512 * 512, 512):
            hit = it(torch.from_numpy(pcm[i:i + 512]))
            if hit and "start" in hit:
                found.append(("start", max(0, hit["start"] - pad)))
            elif hit and "end" in hit:
                found.append(("end", hit["end"]))
    return found


def stream(pcm, chunk=320):
    vad, found = StreamingVAD(), []
    for i in range(0, pcm.size, chunk):
        found += vad.push(pcm[i:i + chunk])
    return found


def test_same_turns_as_silero_vad_iterator(turns):
    ours, theirs = stream(turns), reference(turns)
    assert [k for k, _ in ours] == [k for k, _ in theirs] == ["start", "end", "start", "end"]
    assert all(abs(a - b) <= 2 * 512 for (_, a), (_, b) in zip(ours, theirs))  # within two windows


def test_concurrent_streams_are_batched_and_kept_apart(turns):
    noise = np.random.default_rng(0).normal(0, 0.01, turns.size).astype(np.float32)
    results, go = {}, threading.Event()

    def run(i):
        go.wait()
        results[i] = stream(turns if i % 2 == 0 else noise)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    steps, rows = BATCHER.steps, BATCHER.rows
    go.set()
    for t in threads:
        t.join(120)
    steps, rows = BATCHER.steps - steps, BATCHER.rows - rows
    assert rows == 8 * (turns.size // 512)
    assert steps < rows / 2, (steps, rows)  # most steps carried several streams
    alone = stream(turns)
    for i in range(8):
        assert results[i] == (alone if i % 2 == 0 else [])


def test_async_streams_wait_on_their_loop_and_match_the_blocking_path(turns):
    # server VAD on an event loop: no thread per push, the same decisions as `push`
    noise = np.random.default_rng(1).normal(0, 0.01, turns.size).astype(np.float32)

    async def stream_async(pcm, chunk=640):
        vad, found = StreamingVAD(), []
        for i in range(0, pcm.size, chunk):
            found += await vad.push_async(pcm[i:i + chunk])
        return found

    async def main():
        before = threading.active_count()
        results = await asyncio.gather(*(stream_async(turns if i % 2 == 0 else noise) for i in range(6)))
        return results, threading.active_count() - before

    stream(turns[:1024])   # the batcher's thread is running
    steps, rows = BATCHER.steps, BATCHER.rows
    results, new_threads = asyncio.run(asyncio.wait_for(main(), 120))
    steps, rows = BATCHER.steps - steps, BATCHER.rows - rows
    assert new_threads <= 0   # the batcher's one thread and the loop: nothing per stream
    assert steps < rows / 2, (steps, rows)
    alone = stream(turns, chunk=640)
    assert [r for r in results[::2]] == [alone] * 3 and results[1::2] == [[]] * 3
