"""One set of ONNX sessions for every call's turn detection, instead of a set per call, and
no thread per call.

Pipecat's `SileroVADAnalyzer` and `LocalSmartTurnAnalyzerV3` each build their own
onnxruntime session when made (~70 ms, and the session's memory, per call), and each runs
it on a thread of its own (a one-worker executor per analyzer: a thread per call, and a
thread hop per 20 ms packet for the VAD). Neither model keeps state inside its session:
Silero's state is an input and an output, kept per stream, and Smart Turn scores a whole
turn at once. So one session per model serves every call, and each call keeps only its
own state. The analyzers below are Pipecat's own, made around the shared sessions: at
16 kHz the VAD's windows of every call are scored together, one batched Silero inference
per step (the core's `vad_batch`, awaited on the event loop), and Smart Turn runs on one
small pool of threads for the process.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import onnxruntime as ort
from chroma_agent.runtime.vad_batch import BATCHER, StreamState
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

SMART_TURN_THREADS = 2   # a turn's end is scored in ~10-30 ms, a few times a minute per call


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
    state (the model's recurrent state and context) stays in this object. At 16 kHz its
    windows are scored in the process's batched steps, awaited on the event loop (Pipecat's
    decisions, volume and state resets unchanged); at 8 kHz it runs as Pipecat's own."""

    def __init__(self, *, sample_rate: int | None = None, params: VADParams | None = None):
        # not SileroVADAnalyzer.__init__: it builds a session of its own; the rest of its setup is here
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        model = SileroOnnxModel.__new__(SileroOnnxModel)
        model.session, model.sample_rates = silero_session(), [8000, 16000]
        model.reset_states()
        self._model = model
        self._windows_since_reset = 0
        self._low_confidence_windows = 0
        self._stream = StreamState()          # the batched path's Silero state (16 kHz)
        self._scored: float | None = None     # the next window's confidence, scored on the batcher

    async def analyze_audio(self, buffer: bytes) -> VADState:
        """Pipecat's analysis of `buffer`, window by window: a window's confidence is scored
        in the next batched step (no thread of its own), then Pipecat's own logic runs on it."""
        if self.sample_rate != 16000:
            return await super().analyze_audio(buffer)
        state, size = self._vad_state, self._vad_frames_num_bytes
        while buffer:
            piece, buffer = buffer[:size - len(self._vad_buffer)], buffer[size - len(self._vad_buffer):]
            if len(self._vad_buffer) + len(piece) == size:   # completes a window: score it first
                window = np.frombuffer(bytes(self._vad_buffer) + piece, np.int16).astype(np.float32) / 32768.0
                self._scored = float((await BATCHER.score_async(self._stream, window[None]))[0])
            state = self._run_analyzer(piece)   # at most one window: Pipecat's state machine, volume, resets
        return state

    def voice_confidence(self, buffer) -> float:
        if self._scored is None:   # 8 kHz, or called directly: Pipecat's own, on the shared session
            return super().voice_confidence(buffer)
        confidence, self._scored = self._scored, None
        self._maybe_reset_model(confidence)
        return confidence

    def _maybe_reset_model(self, confidence: float):
        windows = self._windows_since_reset
        super()._maybe_reset_model(confidence)
        if self._windows_since_reset < windows:   # Pipecat reset its model: the batched state too
            self._stream.reset()


@functools.cache
def smart_turn_pool() -> ThreadPoolExecutor:
    """The process's Smart Turn threads (Pipecat starts one per analyzer: a thread per call)."""
    return ThreadPoolExecutor(max_workers=SMART_TURN_THREADS, thread_name_prefix="smart-turn")


class SharedSmartTurnAnalyzerV3(LocalSmartTurnAnalyzerV3):
    """Pipecat's local Smart Turn v3 analyzer on the process's one session (the turn's audio,
    its only state, stays in this object)."""

    def __init__(self, **kwargs):
        BaseSmartTurn.__init__(self, **kwargs)  # not LocalSmartTurnAnalyzerV3's: a session per call
        self._log_data = False  # pipecat's PIPECAT_SMART_TURN_LOG_DATA debugging aid writes callers' audio to disk
        self._session = smart_turn_session()

    @property
    def _model_executor(self) -> ThreadPoolExecutor:
        return smart_turn_pool()   # shared: Pipecat's cleanup() shuts down only an executor of its own
