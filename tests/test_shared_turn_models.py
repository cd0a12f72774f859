"""Every call's turn detection runs on one ONNX session per model: nothing heavy is built
per call, each call keeps its own state, and the shared analyzers score exactly as
Pipecat's own."""
import numpy as np
import pytest
import soundfile as sf
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer

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
