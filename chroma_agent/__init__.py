"""chroma-agent: real-time voice agents on FlashLabs Chroma 1.0.

The public names are imported on first use (PEP 562), so that `import chroma_agent`, the
CLI's `--help` and the plugins' worker processes do not pay for torch and transformers
until they need a model.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "AudioError": "model.audio",
    "CheckpointError": "model.checkpoint",
    "ChromaConfig": "model.config", "ConfigError": "model.config",
    "AudioChunk": "events", "Conversation": "runtime.conversation", "PromptTooLong": "events",
    "ResponseDone": "events", "ResponseStats": "events", "TextDelta": "events",
    "TranscriptDelta": "events", "TranscriptDone": "events",
    "DeviceError": "model.device",
    "CapacityError": "runtime.engine", "ChromaEngine": "runtime.engine",
    "Frame": "runtime.generation", "ReplyFrames": "runtime.generation",
    "SamplingOptions": "model.sampling",
    "ChromaModel": "api", "Reply": "api",
    "ChromaProcessor": "model.processor",
    "Voice": "model.voice",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chroma_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import ChromaModel, Reply
    from .model.audio import AudioError
    from .model.checkpoint import CheckpointError
    from .model.config import ChromaConfig, ConfigError
    from .events import (AudioChunk, PromptTooLong, ResponseDone, ResponseStats, TextDelta, TranscriptDelta,
                         TranscriptDone)
    from .runtime.conversation import Conversation
    from .model.device import DeviceError
    from .runtime.engine import CapacityError, ChromaEngine
    from .runtime.generation import Frame, ReplyFrames
    from .model.processor import ChromaProcessor
    from .model.sampling import SamplingOptions
    from .model.voice import Voice
