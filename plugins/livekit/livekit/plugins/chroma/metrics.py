"""The plugin's Prometheus metrics: its realtime sessions, replies and TTS syntheses recorded on a
`chroma_agent.serving.metrics.ServerMetrics` in prometheus_client's default registry, the one
a LiveKit worker serves at its own `/metrics` (`WorkerOptions(prometheus_port=...)`), beside
LiveKit's: `chroma_calls_active` and `chroma_calls_total{outcome}` (realtime sessions),
`chroma_turns_total{status}` (replies and syntheses), `chroma_time_to_first_audio_seconds`
(the turn committed, the reply or the synthesis asked for, -> its first audio frame),
`chroma_audio_frames_sent_total`, and an engine's load, capacity and ticks when the model is
a `ChromaEngine`. Made on first use: importing the plugin registers nothing. Labels never
carry a room, a participant or text.
"""
from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_metrics: Any = None


def plugin_metrics():
    """The plugin's `ServerMetrics` on prometheus_client's REGISTRY (made once per process)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from chroma_agent.serving.metrics import ServerMetrics   # prometheus_client: only once a session runs

            _metrics = ServerMetrics()
        return _metrics


def reply_ended(asked_at: float, first_audio_at: float | None, frames: int, status: str) -> None:
    """One reply's (or synthesis's) numbers: asked at `asked_at`, first audio at
    `first_audio_at` (the same clock; None: none came), `frames` 80 ms frames sent;
    `status`: "completed", "cancelled", "failed"."""
    metrics = plugin_metrics()
    if first_audio_at is not None:
        metrics.first_audio(first_audio_at - asked_at)
    metrics.frames(sent=frames)
    metrics.turn(status)
