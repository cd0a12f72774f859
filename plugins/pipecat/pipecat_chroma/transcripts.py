"""The caller's words as Pipecat frames: what `ChromaSpeechToSpeechService` makes of the
`TranscriptDelta` / `TranscriptDone` events of each transcribed user turn.

    name, language = transcript_language(settings.language)   # "English", Language.EN
    relay = TranscriptRelay(service, user_id="", language=language)
    await relay.push(event)    # each TranscriptDelta / TranscriptDone of the turn's reply

Frames (the fields as Pipecat's STT and realtime services fill them):
- `InterimTranscriptionFrame(text, user_id, timestamp, language, result=TranscriptDelta)`
  for each delta that adds words: `text` is the turn's words so far (cumulative, as an STT's
  interim results are), stripped.
- `TranscriptionFrame(text, user_id, timestamp, language, result=TranscriptDone)` once per
  turn: the whole transcript, stripped (the exact text is `result.text`); uninterruptible,
  so a barge-in that follows cannot drop the record of what was said.
`timestamp` is `time_now_iso8601()` when the frame is made. Each is broadcast, as sibling
frames: downstream (processors after the service, RTVI's observer, which reports the
downstream one only) and upstream (the user context aggregator, which in realtime mode
writes the user turn to the context, as it does for OpenAI Realtime's and Gemini Live's
upstream transcription frames).

Silence, noise or a turn with no words gives an empty transcript: no frame at all (an empty
TranscriptionFrame would record a turn nobody spoke). A failed pass is a non-fatal
`ErrorFrame` for that turn and nothing more; the call goes on. The text is never logged.
"""
from __future__ import annotations

from pipecat.frames.frames import Frame, InterimTranscriptionFrame, TranscriptionFrame
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601

from chroma_agent.events import TranscriptDelta, TranscriptDone
from chroma_agent.runtime.transcription import language_name

__all__ = ["TranscriptRelay", "transcript_language"]


def transcript_language(language: Language | str | None) -> tuple[str, Language | None]:
    """The language to transcribe in, from the service's `language` setting: the name the
    recognition prompt asks for ("English", "Portuguese") and the Pipecat `Language` the
    frames carry (None when Pipecat has none for it). The setting may be a Pipecat
    `Language`, an ISO-639-1 code ("fr", "pt-BR") or a name ("French"); None is English."""
    if language is None:
        return "English", Language.EN
    if isinstance(language, Language):
        return language_name(language.value), language
    name = language_name(language)
    for candidate in (language.strip(), language.strip().lower(), _whisper_code(name)):
        try:
            return name, Language(candidate)
        except ValueError:
            continue
    return name, None


def _whisper_code(name: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES  # code -> name, as language_name
    return next((code for code, known in LANGUAGES.items() if known.title() == name), "")


class TranscriptRelay:
    """One user turn's transcript events, pushed by `processor` as transcription frames."""

    def __init__(self, processor: FrameProcessor, user_id: str = "", language: Language | None = None):
        self.processor, self.user_id, self.language = processor, user_id, language
        self.text = ""   # the deltas so far

    async def push(self, event: TranscriptDelta | TranscriptDone) -> None:
        """Push what `event` adds: an interim frame, the final frame, or an error."""
        if isinstance(event, TranscriptDelta):
            self.text += event.text
            if event.text.strip():  # whitespace adds no words to show
                await self._broadcast(InterimTranscriptionFrame(
                    self.text.strip(), self.user_id, time_now_iso8601(), self.language, result=event))
        elif isinstance(event, TranscriptDone):
            if event.error is not None:
                # the failure only (never the text): this turn has no transcript, the call goes on
                await self.processor.push_error(f"the caller's transcript failed: {event.error}")
            elif event.text.strip():  # "" (silence, noise, no words): an empty transcript, no frame
                frame = TranscriptionFrame(event.text.strip(), self.user_id, time_now_iso8601(), self.language,
                                           result=event)
                frame.interruptible = False
                await self._broadcast(frame)

    async def _broadcast(self, frame: Frame) -> None:
        # sibling copies down and up (the copies keep `interruptible`)
        await self.processor.broadcast_frame_instance(frame)
