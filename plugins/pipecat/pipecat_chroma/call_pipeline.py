"""The per-call Pipecat pipeline that the servers share (phone and browser): the transport's
input, the user aggregator with Silero VAD and Smart Turn v3, `ChromaSpeechToSpeechService`,
the transport's output, the assistant aggregator; and the call's transcript recorder, when
it has one (`call_transcript`)."""
from __future__ import annotations

from typing import Sequence

from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from .service import ChromaSpeechToSpeechService
from .shared_turn_models import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzerV3


def chroma_service(model, voice, *, system_prompt: str | None = None, max_frames: int | None = None,
                   transcribe: bool | None = None) -> ChromaSpeechToSpeechService:
    """The speech-to-speech service of one call; the model and voice are shared by all
    calls. None leaves a setting at the service's default."""
    given = {"system_instruction": system_prompt, "max_frames": max_frames, "transcribe": transcribe}
    settings = ChromaSpeechToSpeechService.Settings(**{k: v for k, v in given.items() if v is not None})
    return ChromaSpeechToSpeechService(model=model, voice=voice, settings=settings)


def turn_detection(vad_params: VADParams | None = None) -> LLMUserAggregatorParams:
    """Turn detection of one call: Silero VAD + Smart Turn v3, both local ONNX, on the
    process's one session of each (shared_turn_models.py: the first call loads them, ~70 ms;
    later calls build nothing heavy). The caller's transcript comes after the reply starts,
    so the stop strategy must not wait for one."""
    return LLMUserAggregatorParams(
        vad_analyzer=SharedSileroVADAnalyzer(params=vad_params),
        # the start strategy named too: the default's transcription one has no transcript
        # here (realtime mode would drop it, with a warning on every call)
        user_turn_strategies=UserTurnStrategies(start=[VADUserTurnStartStrategy()], stop=[
            TurnAnalyzerUserTurnStopStrategy(turn_analyzer=SharedSmartTurnAnalyzerV3(), wait_for_transcript=False)]))


def voice_pipeline(transport: BaseTransport, service: ChromaSpeechToSpeechService,
                   user_params: LLMUserAggregatorParams, recorder: FrameProcessor | None = None,
                   before_service: Sequence[FrameProcessor] = ()) -> Pipeline:
    """input -> user aggregator (turns) -> [before_service] -> service -> [recorder] ->
    output -> assistant aggregator. `recorder`: the call's `call_transcript.TranscriptRecorder`,
    right after the service, which sees what the service pushes before the output plays (or
    drops) it; `before_service`: e.g. an outbound call's `phone.greeting.HeldGreeting`."""
    user, assistant = LLMContextAggregatorPair(LLMContext(), user_params=user_params)
    recorded = [recorder] if recorder is not None else []
    return Pipeline([transport.input(), user, *before_service, service, *recorded, transport.output(), assistant])
