"""chroma-agent: real-time voice agents on FlashLabs Chroma 1.0."""
from .audio import AudioError
from .checkpoint import CheckpointError
from .config import ChromaConfig, ConfigError
from .conversation import AudioChunk, Conversation, ResponseDone, ResponseStats, TextDelta
from .generation import Frame, ReplyFrames
from .sampling import SamplingOptions
from .api import ChromaModel, Reply
from .processor import ChromaProcessor
from .voice import Voice

__all__ = ["AudioChunk", "AudioError", "CheckpointError", "ChromaConfig", "ChromaModel", "ChromaProcessor",
           "ConfigError", "Conversation", "Frame", "Reply", "ReplyFrames", "ResponseDone", "ResponseStats",
           "SamplingOptions", "TextDelta", "Voice"]
__version__ = "0.1.0"
