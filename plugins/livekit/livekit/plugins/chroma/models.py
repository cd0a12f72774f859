"""Loading the model and voice: once per process, on first need, never at import.

A worker runs many jobs (with `JobExecutorType.THREAD`, as threads of one process); each
creates its own `RealtimeModel`/`TTS`, and they all share one loaded copy of the weights
through `load_model`'s cache. The model's code (and torch) is imported here only when a load
happens, so importing the plugin stays cheap and never touches CUDA.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .log import logger

DEFAULT_MODEL = "FlashLabs/Chroma-4B"

_cache_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}
_loaded: dict[tuple, Any] = {}


def _key(model: str | os.PathLike, device: str | None, dtype: str | None, revision: str | None) -> tuple:
    path = os.path.expanduser(os.fspath(model))
    return (os.path.abspath(path) if os.path.isdir(path) else path, str(device or "auto"),
            str(dtype or "auto"), revision)


def load_model(model: str | os.PathLike = DEFAULT_MODEL, *, device: str | None = None, dtype: str | None = None,
               revision: str | None = None) -> Any:
    """The `ChromaModel` at `model` (a hub id or a local checkpoint directory) on `device`
    in `dtype` (defaults: CUDA and bfloat16 when present, else CPU float32). Blocking; the
    first call per (path, device, dtype) loads it, every later call (from any thread)
    returns the same object, and two jobs asking at once load it once."""
    key = _key(model, device, dtype, revision)
    with _cache_lock:
        if key in _loaded:
            return _loaded[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:  # one load per key; other keys load in parallel
        if key not in _loaded:
            from chroma_agent import ChromaModel

            logger.info("loading Chroma from %s", key[0])
            loaded = ChromaModel.from_pretrained(model, device=device, dtype=dtype, revision=revision)
            with _cache_lock:
                _loaded[key] = loaded
        return _loaded[key]


def download_model(model: str | os.PathLike = DEFAULT_MODEL, revision: str | None = None) -> None:
    """Fetch a hub checkpoint into the Hugging Face cache (a local directory: nothing to do)."""
    from chroma_agent.model.checkpoint import resolve

    resolve(model, revision=revision)


class ModelSource:
    """The model and voice a RealtimeModel or TTS speaks with, resolved on first `load()`.

    `model`: a hub id, a local directory, or a loaded object with
    `.conversation(voice=..., system_prompt=...)` (a `ChromaModel`, or an engine serving
    many conversations); `voice`: a `chroma_agent.Voice` or the path of one saved with
    `chroma-agent voice ... --output me.voice.safetensors`.
    """

    def __init__(self, model: Any, voice: Any, *, device: str | None, dtype: str | None, revision: str | None):
        if voice is None:
            raise ValueError("voice is required: a chroma_agent.Voice or the path of a saved .voice.safetensors")
        self._model, self._voice = model, voice
        self._device, self._dtype, self._revision = device, dtype, revision
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model's name for metrics: the hub id or directory it came from."""
        if isinstance(self._model, (str, os.PathLike)):
            return os.fspath(self._model)
        loaded = getattr(self._model, "model", self._model)  # an engine's model
        source = getattr(loaded, "source", None)
        return os.fspath(source) if source is not None else type(self._model).__name__

    def load(self) -> tuple[Any, Any]:
        """(model, voice), loading what is not loaded yet. Blocking: call it off the event loop."""
        with self._lock:
            if isinstance(self._model, (str, os.PathLike)):
                self._model = load_model(self._model, device=self._device, dtype=self._dtype, revision=self._revision)
            if isinstance(self._voice, (str, os.PathLike)):
                from chroma_agent import Voice

                self._voice = Voice.load(self._voice)
            return self._model, self._voice


class UsesChroma:
    """What the plugin's LiveKit classes (RealtimeModel, TTS) share: a `ModelSource` in
    `_source`, reported as their model and provider, and loadable ahead of time."""

    _source: ModelSource

    @property
    def model(self) -> str:
        return self._source.name

    @property
    def provider(self) -> str:
        return "FlashLabs"

    def load(self) -> None:
        """Load the model and voice now (blocking; for a worker's setup function)."""
        self._source.load()

