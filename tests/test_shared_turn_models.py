"""Every call's turn detection runs on one ONNX session per model: nothing heavy is built
per call, each call keeps its own state, and the shared analyzers score exactly as
Pipecat's own."""
import numpy as np
import pytest
import soundfile as sf
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer

from chroma_agent.runtime.vad_batch import BATCHER, StreamState
from pipecat_chroma.call_pipeline import turn_detection
from pipecat_chroma.shared_turn_models import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzerV3


def windows(speech, rate=16000):
    audio, source_rate = sf.read(speech["question"], dtype="float32")
    import soxr
    audio = soxr.resample(audio, source_rate, rate)
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    return [pcm[i:i + 512].tobytes() for i in range(0, len(pcm) - 512, 512)]


def test_calls_share_one_session_per_model():
    a, b = turn_detection(), turn_detection()
    vad_a, vad_b = a.vad_analyzer, b.vad_analyzer
    turn_a, turn_b = (params.user_turn_strategies.stop[0]._turn_analyzer for params in (a, b))
    assert vad_a is not vad_b and vad_a._model is not vad_b._model  # each call its own state
    assert vad_a._model.session is vad_b._model.session              # one session
    assert isinstance(turn_a, SharedSmartTurnAnalyzerV3) and turn_a is not turn_b
    assert turn_a._session is turn_b._session


def test_shared_vad_scores_as_pipecats_own_and_streams_stay_apart(speech):
    ours, theirs, other = SharedSileroVADAnalyzer(sample_rate=16000), SileroVADAnalyzer(sample_rate=16000), \
        SharedSileroVADAnalyzer(sample_rate=16000)
    chunks = windows(speech)
    noise = (np.random.default_rng(0).normal(0, 3000, 512)).astype(np.int16).tobytes()
    for chunk in chunks:
        other.voice_confidence(noise)  # a second stream on the same session in between
        assert ours.voice_confidence(chunk) == pytest.approx(theirs.voice_confidence(chunk), abs=1e-6)


def test_shared_smart_turn_scores_as_pipecats_own(speech):
    audio, rate = sf.read(speech["question"], dtype="float32")
    import soxr
    audio = soxr.resample(audio, rate, 16000).astype(np.float32)
    ours, theirs = SharedSmartTurnAnalyzerV3(), LocalSmartTurnAnalyzerV3()
    assert ours._predict_endpoint(audio) == theirs._predict_endpoint(audio)


def test_batched_vad_on_the_loop_decides_as_pipecats_own_with_no_thread_per_call(speech):
    # 20 ms packets (a phone call's), several calls at once: the same VAD states packet by
    # packet as Pipecat's analyzer on its own thread, and no thread started per call
    import asyncio
    import threading

    from pipecat.audio.vad.vad_analyzer import VADParams

    pcm = np.frombuffer(b"".join(windows(speech)), np.int16)
    silence = np.zeros(16000, np.int16)
    stream = np.concatenate([silence, pcm, silence, pcm, silence, silence, silence, silence])  # past a model reset
    packets = [stream[i:i + 320].tobytes() for i in range(0, len(stream) - 320, 320)]
    params = VADParams(stop_secs=0.2)

    async def states(analyzer):
        analyzer.set_sample_rate(16000)   # as the pipeline's StartFrame does
        return [await analyzer.analyze_audio(p) for p in packets]

    async def main():
        before = threading.active_count()
        calls = [SharedSileroVADAnalyzer(sample_rate=16000, params=params) for _ in range(4)]
        got = await asyncio.gather(*(states(a) for a in calls))
        return got, threading.active_count() - before

    theirs = asyncio.run(asyncio.wait_for(states(SileroVADAnalyzer(sample_rate=16000, params=params)), 120))
    BATCHER.score(StreamState(), np.zeros((1, 512), np.float32))   # the batcher's one thread is running
    ours, new_threads = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(set(map(str, theirs))) > 1  # speech found: the states change
    assert all(o == theirs for o in ours)
    assert new_threads <= 0
