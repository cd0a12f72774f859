"""pipecat-chroma: Chroma 1.0 speech-to-speech for Pipecat (tested with pipecat-ai 1.14)."""
from .service import ChromaSpeechToSpeechService, ChromaSpeechToSpeechSettings

__all__ = ["ChromaSpeechToSpeechService", "ChromaSpeechToSpeechSettings"]
__version__ = "0.1.0"
