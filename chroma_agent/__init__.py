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
    "AudioError": "audio",
    "CheckpointError": "checkpoint",
    "ChromaConfig": "config", "ConfigError": "config",
    "AudioChunk": "conversation", "Conversation": "conversation", "PromptTooLong": "conversation",
    "ResponseDone": "conversation",
    "ResponseStats": "conversation", "TextDelta": "conversation",
    "DeviceError": "device",
    "CapacityError": "engine", "ChromaEngine": "engine",
    "Frame": "generation", "ReplyFrames": "generation",
    "SamplingOptions": "sampling",
    "ChromaModel": "api", "Reply": "api",
    "ChromaProcessor": "processor",
    "Voice": "voice",
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
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .config import ChromaConfig, ConfigError
    from .conversation import AudioChunk, Conversation, PromptTooLong, ResponseDone, ResponseStats, TextDelta
    from .device import DeviceError
    from .engine import CapacityError, ChromaEngine
    from .generation import Frame, ReplyFrames
    from .processor import ChromaProcessor
    from .sampling import SamplingOptions
    from .voice import Voice
