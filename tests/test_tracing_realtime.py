"""OpenTelemetry traces of `chroma-agent serve realtime`: in this process (`capture_spans`)
a session is one `chroma.call` with its engine admission and a `chroma.turn` per response
(time to first audio, frames, stop reason, cancelled, the response id the client got;
transcripts only with the GenAI opt-in); the real server process run with the standard
OTEL_ variables exports the call and its turn as one trace to a loopback OTLP collector,
and without them exports nothing."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("opentelemetry.sdk")

from chroma_agent.runtime.engine import ChromaEngine  # noqa: E402
from chroma_agent.serving.realtime_server import Limits, RealtimeServer  # noqa: E402
from chroma_agent.serving.tracing import CONTENT_OPT_IN  # noqa: E402
from tests import server_process  # noqa: E402
from tests.realtime_helpers import Client, InProcessServer, speech_pcm24  # noqa: E402
from tests.span_capture import OtlpCollector, capture_spans, children, wait_spans  # noqa: E402

SHORT = {"max_output_tokens": 6}   # 6 frames (0.48 s): quick on a CPU
pytestmark = pytest.mark.timeout(120, func_only=True)


@pytest.fixture(scope="module")
def server(model, voice):
    engine = ChromaEngine(model, max_conversations=2)
    realtime = RealtimeServer(engine, voice, max_frames=60,
                              limits=Limits(max_message_bytes=256 * 1024, max_append_s=2.0, max_audio_ahead_s=None))
    srv = InProcessServer(realtime)
    yield srv
    srv.stop()
    engine.close()


@pytest.fixture(autouse=True)
def no_content_opt_in(monkeypatch):
    monkeypatch.delenv(CONTENT_OPT_IN, raising=False)


async def open_session(url: str, **session) -> tuple[Client, str]:
    """A client whose session is updated with `session`; (client, the session's id)."""
    c = await Client.connect(url)
    created = await c.recv()
    assert created["type"] == "session.created"
    await c.send("session.update", session={"type": "realtime", **session})
    assert (await c.recv())["type"] == "session.updated"
    return c, created["session"]["id"]


async def text_turn(c: Client, text: str, **response) -> list[dict]:
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": text}]})
    await c.send("response.create", response=response)
    return await c.until("response.done", timeout=60)


def call_of(spans: list, session_id: str):
    calls = [s for s in spans if s.name == "chroma.call" and s.attributes.get("chroma.call.id") == session_id]
    assert len(calls) == 1, [s.name for s in spans]
    return calls[0]


def ended_call(spans: list, session_id: str) -> bool:
    return any(s.name == "chroma.call" and s.attributes.get("chroma.call.id") == session_id for s in spans)


def audio_deltas(events: list[dict]) -> int:
    return sum(e["type"] == "response.output_audio.delta" for e in events)


# -- in this process --

async def test_a_server_vad_turn_is_a_call_with_its_admission_and_turn(server, speech):
    with capture_spans() as spans:
        c, session_id = await open_session(server.url, max_output_tokens=6)
        await c.stream(speech_pcm24(speech["question"], lead_s=0.5, tail_s=1.0), chunk_ms=100)
        events = await c.until("response.done", timeout=60)
        await c.close()
        got = await asyncio.to_thread(wait_spans, spans, lambda s: ended_call(s, session_id))
    done = events[-1]["response"]
    call = call_of(got, session_id)
    assert call.parent is None   # a root: the session's own trace
    assert call.attributes["chroma.call.kind"] == "realtime"
    assert call.attributes["chroma.call.outcome"] == "completed" and call.attributes["chroma.call.turns"] == 1
    below = children(got, call)
    admissions = [s for s in below if s.name == "chroma.engine.admission"]
    turns = [s for s in below if s.name == "chroma.turn"]
    assert len(admissions) == 1 and len(turns) == 1, [s.name for s in below]
    assert admissions[0].attributes["chroma.engine.capacity"] == 2
    assert 0 <= admissions[0].attributes["chroma.engine.load"] <= 1
    turn = turns[0].attributes
    assert {s.context.trace_id for s in (call, *below)} == {call.context.trace_id}
    assert turn["gen_ai.response.id"] == done["id"]
    assert turn["chroma.turn.trigger"] == "server_vad"
    assert turn["chroma.turn.status"] == done["status"] and turn["chroma.turn.cancelled"] is False
    assert turn["chroma.turn.stop_reason"] in ("eos", "max_frames")
    assert turn["chroma.turn.frames"] == audio_deltas(events) > 0
    assert turn["metrics.ttfb"] > 0 and turn["chroma.turn.speech_end_to_first_audio_s"] >= turn["metrics.ttfb"]
    assert [e.name for e in turns[0].events] == ["first_audio"]
    assert turn["gen_ai.usage.input_tokens"] == done["usage"]["input_tokens"] > 0
    assert turn["gen_ai.usage.output_tokens"] == done["usage"]["output_tokens"]
    assert turns[0].start_time < admissions[0].start_time   # it starts at the end of speech
    assert not [k for k in turn if k.endswith("_text")]   # no transcript without the opt-in


async def test_transcripts_with_the_opt_in_and_a_cancelled_response(server, monkeypatch):
    monkeypatch.setenv(CONTENT_OPT_IN, "true")
    with capture_spans() as spans:
        c, session_id = await open_session(server.url, audio={"input": {"turn_detection": None}})
        first = await text_turn(c, "Hello there", **SHORT)
        await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": "Tell a story"}]})
        await c.send("response.create")   # 60 frames: cancelled after its first
        second = await c.until("response.output_audio.delta", timeout=30)
        await c.send("response.cancel")
        second += await c.until("response.done", timeout=20)
        await c.close()
        got = await asyncio.to_thread(wait_spans, spans, lambda s: ended_call(s, session_id))
    call = call_of(got, session_id)
    assert call.attributes["chroma.call.turns"] == 2
    below = children(got, call)
    assert [s.name for s in below].count("chroma.engine.admission") == 1   # the second reuses the conversation
    turns = {s.attributes["gen_ai.response.id"]: s.attributes for s in below if s.name == "chroma.turn"}
    said, stopped = first[-1]["response"], second[-1]["response"]
    assert set(turns) == {said["id"], stopped["id"]}
    turn = turns[said["id"]]
    assert turn["chroma.turn.trigger"] == "client" and turn["chroma.turn.cancelled"] is False
    transcript = said["output"][0]["content"][0]["transcript"]
    assert transcript and turn["chroma.turn.reply_text"] == transcript
    assert "chroma.turn.caller_text" not in turn   # a typed turn: no caller transcript
    assert stopped["status"] == "cancelled"
    cancelled = turns[stopped["id"]]
    assert cancelled["chroma.turn.cancelled"] is True and cancelled["chroma.turn.status"] == "cancelled"
    assert cancelled["chroma.turn.stop_reason"] == "cancelled"
    assert 1 <= cancelled["chroma.turn.frames"] == audio_deltas(second) <= 3


async def test_a_failed_reply_still_ends_its_turn_span_as_an_error(server, monkeypatch):
    engine = server.realtime.engine

    def out_of_memory(**kwargs):
        raise MemoryError("out of memory making the conversation")

    monkeypatch.setattr(engine, "conversation", out_of_memory)
    with capture_spans() as spans:
        c, session_id = await open_session(server.url, audio={"input": {"turn_detection": None}})
        done = (await text_turn(c, "Hello there", **SHORT))[-1]["response"]
        await c.close()
        got = await asyncio.to_thread(wait_spans, spans, lambda s: ended_call(s, session_id))
    assert done["status"] == "failed"
    call = call_of(got, session_id)
    assert call.attributes["chroma.call.outcome"] == "completed"   # the session went on: one reply failed
    [admission] = [s for s in children(got, call) if s.name == "chroma.engine.admission"]
    [turn] = [s for s in children(got, call) if s.name == "chroma.turn"]
    assert not admission.status.is_ok and not turn.status.is_ok
    assert "out of memory" in turn.status.description
    assert turn.attributes["chroma.turn.status"] == "failed" and turn.attributes["gen_ai.response.id"] == done["id"]
    assert "metrics.ttfb" not in turn.attributes and turn.attributes["chroma.turn.frames"] == 0


# -- the server process --

def realtime_process(tiny_checkpoint, voice, d, env: dict) -> server_process.ServerProcess:
    """`chroma-agent serve realtime` with `env` and no OTEL_ variables of this process."""
    return server_process.ServerProcess(
        "realtime", ["--model", str(tiny_checkpoint), "--voice", str(voice.save(d / "v.voice.safetensors")),
                     "--host", "127.0.0.1", "--max-frames", "6", "--max-calls", "1", "--drain-seconds", "1"],
        d / "server.log", env=env, drop_env=("CHROMA_AGENT_API_KEY", "OTEL_"), stop_wait_s=30)


async def one_call(proc) -> tuple[str, dict]:
    c, session_id = await open_session(f"ws://127.0.0.1:{proc.port}/v1/realtime",
                                       audio={"input": {"turn_detection": None}})
    done = (await text_turn(c, "Hello there"))[-1]["response"]
    await c.close()
    return session_id, done


@pytest.mark.timeout(300, func_only=True)
async def test_the_server_process_exports_the_call_and_its_turn_as_one_trace(tiny_checkpoint, voice, tmp_path):
    with OtlpCollector() as collector:
        proc = realtime_process(tiny_checkpoint, voice, tmp_path, collector.env())
        try:
            await asyncio.to_thread(proc.wait_ready)
            session_id, done = await one_call(proc)
            got = await asyncio.to_thread(collector.wait_for, lambda spans: any(
                s.name == "chroma.call" and s.attributes.get("chroma.call.id") == session_id for s in spans), 20)
        finally:
            await asyncio.to_thread(proc.stop)
    [call] = [s for s in got if s.name == "chroma.call"]
    [turn] = [s for s in got if s.name == "chroma.turn"]
    [admission] = [s for s in got if s.name == "chroma.engine.admission"]
    assert call.parent_id == "" and call.attributes["chroma.call.kind"] == "realtime"
    assert turn.trace_id == admission.trace_id == call.trace_id
    assert turn.parent_id == admission.parent_id == call.span_id
    assert turn.attributes["gen_ai.response.id"] == done["id"] and turn.attributes["chroma.turn.frames"] > 0
    assert turn.attributes["metrics.ttfb"] > 0 and "first_audio" in turn.events
    assert {s.resource.get("service.name") for s in got} == {"chroma-test"}


@pytest.mark.timeout(300, func_only=True)
async def test_without_otel_variables_the_server_exports_nothing(tiny_checkpoint, voice, tmp_path):
    with OtlpCollector() as collector:   # running, but no process is told of it
        proc = realtime_process(tiny_checkpoint, voice, tmp_path, {})
        try:
            await asyncio.to_thread(proc.wait_ready)
            _, done = await one_call(proc)
            assert done["status"] in ("completed", "incomplete")
        finally:
            await asyncio.to_thread(proc.stop)   # its exit would flush any spans batched
        assert proc.proc.returncode == 0, proc.log.read_text()[-2000:]
        assert collector.exports == 0 and collector.spans == []


def test_without_otel_variables_a_call_is_no_trace_and_the_sdk_is_not_loaded():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = ("import sys\n"
            "from chroma_agent.serving.realtime_server import serve\n"
            "from chroma_agent.serving.tracing import NO_TRACE, configure_tracing\n"
            "from chroma_agent.serving.realtime_tracing import start_call\n"
            "assert configure_tracing() is False\n"
            "assert start_call('sess_x') is NO_TRACE\n"
            "assert 'opentelemetry.sdk' not in sys.modules, 'the SDK was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=server_process.REPO)
    assert run.returncode == 0, run.stderr[-2000:]
