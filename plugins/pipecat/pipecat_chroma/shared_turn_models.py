"""One set of ONNX sessions for every call's turn detection, instead of a set per call.

Pipecat's `SileroVADAnalyzer` and `LocalSmartTurnAnalyzerV3` each build their own
onnxruntime session when made (~70 ms, and the session's memory, per call). Neither model
keeps state inside its session: Silero's state is an input and an output, kept per stream
by its wrapper, and Smart Turn scores a whole turn at once. So one session per model serves
every call (onnxruntime runs a session from many threads at once), and each call keeps
only its own state. The analyzers below are Pipecat's own, made around the shared sessions.
"""
from __future__ import annotations

import functools
from importlib import resources

import onnxruntime as ort
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams


@functools.cache
def silero_session() -> ort.InferenceSession:
    """Pipecat's bundled Silero VAD, with the options its own wrapper uses (one thread)."""
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1
    path = str(resources.files("pipecat.audio.vad.data").joinpath("silero_vad.onnx"))
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


@functools.cache
def smart_turn_session() -> ort.InferenceSession:
    """Pipecat's bundled Smart Turn v3 model, with the options its own analyzer uses."""
    opts = ort.SessionOptions()
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = str(resources.files("pipecat.audio.turn.smart_turn.data").joinpath("smart-turn-v3.2-cpu.onnx"))
    return ort.InferenceSession(path, sess_options=opts)


class SharedSileroVADAnalyzer(SileroVADAnalyzer):
    """Pipecat's Silero VAD analyzer on the process's one Silero session: the stream's own
    state (the model's recurrent state and context) stays in this object."""

    def __init__(self, *, sample_rate: int | None = None, params: VADParams | None = None):
        # not SileroVADAnalyzer.__init__: it builds a session of its own; the rest of its setup is here
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        model = SileroOnnxModel.__new__(SileroOnnxModel)
        model.session, model.sample_rates = silero_session(), [8000, 16000]
        model.reset_states()
        self._model = model
        self._windows_since_reset = 0
        self._low_confidence_windows = 0


class SharedSmartTurnAnalyzerV3(LocalSmartTurnAnalyzerV3):
    """Pipecat's local Smart Turn v3 analyzer on the process's one session (the turn's audio,
    its only state, stays in this object)."""

    def __init__(self, **kwargs):
        BaseSmartTurn.__init__(self, **kwargs)  # not LocalSmartTurnAnalyzerV3's: a session per call
        self._log_data = False  # pipecat's PIPECAT_SMART_TURN_LOG_DATA debugging aid writes callers' audio to disk
        self._session = smart_turn_session()
