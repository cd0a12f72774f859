"""FlashLabs Chroma 1.0 for LiveKit Agents: a local realtime model that answers in a cloned
voice, and that voice as a plain TTS.

    from livekit.plugins import chroma
    session = AgentSession(llm=chroma.RealtimeModel(model="FlashLabs/Chroma-4B", voice="me.voice.safetensors"))

Importing this package loads no weights and never touches CUDA (the worker imports every
plugin in its forkserver): models load on first use, or in a setup function with
`chroma.load_model(...)`. Its sessions and replies are counted in prometheus_client's default
registry (`chroma_calls_active`, `chroma_time_to_first_audio_seconds`, ...: metrics.py), which a
worker started with `prometheus_port` serves at its `/metrics`.
"""
import os

from livekit.agents import Plugin

from .log import logger
from .models import DEFAULT_MODEL, load_model
from .realtime import RealtimeModel, RealtimeSession, active_sessions
from .tts import TTS
from .version import __version__

__all__ = ["RealtimeModel", "RealtimeSession", "TTS", "load_model", "active_sessions", "DEFAULT_MODEL",
           "__version__"]


class ChromaPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)

    def download_files(self) -> None:
        """Fetch the checkpoint (`CHROMA_MODEL`, default FlashLabs/Chroma-4B) into the Hugging
        Face cache, for `python -m livekit.agents download-files`."""
        from .models import download_model

        download_model(os.environ.get("CHROMA_MODEL", DEFAULT_MODEL))


Plugin.register_plugin(ChromaPlugin())
