"""The settings of `ChromaSpeechToSpeechService` (Pipecat's `Service.Settings` convention:
`settings=ChromaSpeechToSpeechService.Settings(...)` gives the fields to change) and their
defaults."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipecat.services.settings import LLMSettings
from pipecat.transcriptions.language import Language
from pipecat.utils.types import NOT_GIVEN, NotGiven

__all__ = ["ChromaSpeechToSpeechSettings", "defaults"]


@dataclass
class ChromaSpeechToSpeechSettings(LLMSettings):
    """Settings for `ChromaSpeechToSpeechService`.

    The common LLM fields that apply: `system_instruction`, `temperature` and `top_k`
    (None: Chroma's defaults, 0.9 and 50), `seed`. The others are unsupported (None).

    Parameters:
        max_frames: Longest reply, in 80 ms frames.
        greedy: Greedy audio-code decoding instead of sampling.
        min_turn_secs: User turns with less audio than this (between the user started
            and stopped speaking) are ignored: coughs, clicks, a lone "uh".
        transcribe: Transcribe each user audio turn beside its reply (the model's own
            reasoner) and push the words as transcription frames (`transcripts.py`).
        language: The language to transcribe: a Pipecat `Language`, an ISO-639-1 code
            or a name; None is English.
    """

    max_frames: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    greedy: bool | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    min_turn_secs: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    transcribe: bool | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    language: Language | str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


def defaults() -> ChromaSpeechToSpeechSettings:
    """Every field filled (Pipecat logs a field left NOT_GIVEN as an error)."""
    return ChromaSpeechToSpeechSettings(
        model="FlashLabs/Chroma-4B",
        system_instruction=None,
        temperature=None,
        max_tokens=None,
        top_p=None,
        top_k=None,
        frequency_penalty=None,
        presence_penalty=None,
        seed=None,
        filter_incomplete_user_turns=False,
        user_turn_completion_config=None,
        max_frames=375,
        greedy=False,
        min_turn_secs=0.3,
        transcribe=True,
        language=None,
    )
