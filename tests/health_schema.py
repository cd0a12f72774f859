"""The one `/health` schema of every `chroma-agent serve KIND` (chroma_agent.serving.call_server),
for each server's tests to check its own `/health` against."""
from __future__ import annotations

HEALTH_KEYS = {"status", "active_calls", "max_calls", "calls_total", "engine"}
ENGINE_KEYS = {"load", "capacity", "conversations", "frame_ms"}
FRAME_KEYS = {"p50", "p95", "ticks"}
# each server's own keys besides the shared ones
EXTRAS = {"twilio": {"signatures"}, "web": set(), "realtime": {"auth"}}


def check_health(health: dict, kind: str, engine: bool = True) -> None:
    """`health` has exactly the shared keys plus `kind`'s extras, with the shared types;
    `engine`: the server runs on an engine (else its `engine` is null)."""
    assert set(health) == HEALTH_KEYS | EXTRAS[kind], (kind, sorted(health))
    assert health["status"] in ("ok", "draining")
    assert all(isinstance(health[k], int) and health[k] >= 0 for k in ("active_calls", "max_calls", "calls_total"))
    if not engine:
        assert health["engine"] is None
        return
    assert set(health["engine"]) == ENGINE_KEYS, health["engine"]
    assert 0 <= health["engine"]["load"] <= 1 and health["engine"]["capacity"] >= health["max_calls"] >= 1
    frames = health["engine"]["frame_ms"]
    assert frames is None or set(frames) == FRAME_KEYS, frames
