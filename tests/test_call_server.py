"""`chroma_agent.serving.call_server.CallServer`, the skeleton of every `serve KIND`, without a
model or a socket: admission and totals, the drain's steps, and the one `/health` schema that
the realtime, phone and browser servers share (each server's own process checks its live
`/health` against the same schema in its test module)."""
from __future__ import annotations

import asyncio

import pytest

from chroma_agent.serving.call_server import DEFAULT_MAX_CALLS, CallServer, calls_at_once, engine_health

from .health_schema import check_health

pytestmark = pytest.mark.timeout(30, func_only=True)


class Engine:
    """What the servers read of a `ChromaEngine`: capacity, open conversations, tick times."""

    def __init__(self, capacity: int = 3, active: int = 0):
        self.capacity, self.active = capacity, active

    @property
    def load(self) -> float:
        return self.active / self.capacity

    def frame_times(self):
        return {"p50": 40.0, "p95": 60.0, "ticks": 12}


class Server(CallServer):
    def __init__(self, engine, **kwargs):
        super().__init__(engine, **kwargs)
        self.steps: list[str] = []

    async def end_calls(self) -> None:
        self.steps.append("end")

    async def cancel_calls(self) -> None:
        self.steps.append("cancel")
        self.calls.clear()


def test_the_limit_is_the_engines_capacity_at_most():
    assert calls_at_once(Engine(3), None) == 3 and calls_at_once(Engine(3), 2) == 2
    assert calls_at_once(Engine(3), 8) == 3   # a call past capacity would get no conversation
    assert calls_at_once(object(), None) == DEFAULT_MAX_CALLS
    with pytest.raises(ValueError):
        calls_at_once(Engine(3), 0)


async def test_admission_totals_and_health():
    server = Server(Engine(2, active=1), max_calls=2)
    assert server.refusal() is None
    server.hold("a", "call a")
    server.hold("b", None, count=False)   # reserved while it is set up: counted once it starts
    assert server.refusal() == "busy" and server.calls_total == 1
    server.hold("b", "call b")
    health = server.health()
    check_health(health, "web")   # no extras: the shared keys alone
    assert health == {"status": "ok", "active_calls": 2, "max_calls": 2, "calls_total": 2,
                      "engine": {"load": 0.5, "capacity": 2, "conversations": 1,
                                 "frame_ms": {"p50": 40.0, "p95": 60.0, "ticks": 12}}}
    server.release("a")
    assert server.refusal() is None and server.health()["active_calls"] == 1
    server.draining = True
    assert server.refusal() == "draining" and server.health()["status"] == "draining"


def test_a_plain_model_has_no_engine_in_health():
    assert engine_health(object()) is None
    check_health(Server(object()).health(), "web", engine=False)


async def test_the_drain_ends_then_cancels_the_calls_it_could_not_wait_for():
    server = Server(Engine(), drain_seconds=0.2)
    server.hold("a", "call")
    await asyncio.wait_for(server.drain(), 15)   # drain_seconds, then end_calls, then up to 5 s, then cancel_calls
    assert server.draining and server.steps == ["end", "cancel"] and not server.calls
    quiet = Server(Engine())
    await asyncio.wait_for(quiet.drain(5), 5)   # nothing running: over at once
    assert quiet.steps == [] and quiet.refusal() == "draining"


def test_the_three_servers_share_one_health_schema(monkeypatch):
    """`serve realtime`, `serve twilio` and `serve web` report the same keys, each with its
    own extras, and take their limit from the engine the same way."""
    pytest.importorskip("pipecat")
    for name in ("TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID", "CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    from pipecat_chroma.twilio_server import PhoneServer
    from pipecat_chroma.web_server import WebServer

    from chroma_agent.serving.realtime_server import RealtimeServer

    servers = {"realtime": RealtimeServer(Engine(3), "a voice", max_calls=8),
               "twilio": PhoneServer(Engine(3), "a voice", max_calls=8),
               "web": WebServer(Engine(3), "a voice", max_calls=8)}
    for kind, server in servers.items():
        assert isinstance(server, CallServer)
        health = server.health()
        check_health(health, kind)
        assert health["max_calls"] == 3 and health["engine"]["capacity"] == 3, (kind, health)
    assert servers["realtime"].health()["auth"] is False and servers["twilio"].health()["signatures"] is False
