"""JSON log lines (`chroma_agent.serving.log_format`): each line one JSON object with time,
level, logger, message and the call / session id of its context (stdlib logging and
loguru alike); `serve realtime`'s session lines carry the session id and never the API
key; the default stays human-readable text."""
from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

pytest.importorskip("fastapi")
from chroma_agent.runtime.engine import ChromaEngine  # noqa: E402
from chroma_agent.serving import log_format  # noqa: E402
from chroma_agent.serving.log_format import call_context, configure_logging  # noqa: E402
from chroma_agent.serving.realtime_server import Limits, RealtimeServer  # noqa: E402
from tests.realtime_helpers import Client, InProcessServer  # noqa: E402

KEY = "sk-logs-0123456789"
pytestmark = pytest.mark.timeout(60, func_only=True)


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_the_default_is_text_and_json_lines_carry_the_context_ids():
    assert log_format.current_format() == "text" and log_format.uvicorn_log_config() == {}
    handlers = list(logging.getLogger().handlers)
    configure_logging("text")()
    assert logging.getLogger().handlers == handlers   # text: the human-readable setup as it was
    with pytest.raises(ValueError):
        configure_logging("xml")
    out = io.StringIO()
    undo = configure_logging("json", stream=out)
    try:
        assert log_format.uvicorn_log_config() == {"log_config": None}
        log = logging.getLogger("chroma_agent.test")
        log.info("outside any call")
        with call_context(call_id="CA123", session_id="sess_1"):
            log.warning("a client's %s", "name\nforged line")
            from loguru import logger   # Pipecat's logger: the same JSON

            logger.info("from loguru")

            async def in_a_task_and_a_thread():
                await asyncio.to_thread(log.info, "in a thread")
            asyncio.run(in_a_task_and_a_thread())
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")
    finally:
        undo()
    assert log_format.current_format() == "text" and logging.getLogger().handlers == handlers
    got = lines(out)
    assert [g["message"] for g in got] == ["outside any call", "a client's name\\nforged line", "from loguru",
                                           "in a thread", "it failed"]
    assert all(g["time"].endswith("+00:00") and g["level"] and g["logger"] for g in got)
    assert "call_id" not in got[0] and "session_id" not in got[0] and "call_id" not in got[4]
    assert all(g["call_id"] == "CA123" and g["session_id"] == "sess_1" for g in got[1:4])
    assert got[1]["level"] == "WARNING" and got[2]["logger"] == __name__
    assert "RuntimeError: boom" in got[4]["exception"]


@pytest.fixture(scope="module")
def server(model, voice):
    engine = ChromaEngine(model, max_conversations=1)
    realtime = RealtimeServer(engine, voice, api_key=KEY, max_frames=4, limits=Limits(max_audio_ahead_s=None))
    srv = InProcessServer(realtime)
    yield srv
    srv.stop()
    engine.close()


async def test_realtime_session_lines_carry_the_session_id_and_never_the_key(server):
    out = io.StringIO()
    undo = configure_logging("json", stream=out)
    try:
        c = await Client.connect(server.url, {"Authorization": f"Bearer {KEY}"})
        session_id = (await c.recv())["session"]["id"]
        await c.raw("{not json")
        assert (await c.recv())["type"] == "error"
        await c.close()
        for _ in range(100):
            if "ended after" in out.getvalue():
                break
            await asyncio.sleep(0.05)
    finally:
        undo()
    got = lines(out)
    mine = [g for g in got if g.get("session_id") == session_id]
    assert any("refused an event" in g["message"] for g in mine), got
    assert any("ended after" in g["message"] for g in mine), got
    assert KEY not in out.getvalue()
