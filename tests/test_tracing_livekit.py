"""OpenTelemetry traces of livekit-plugins-chroma through a real AgentSession, offline: each
reply of the realtime model is a `chroma.turn` span inside LiveKit's own `agent_turn`, in the
same trace; LiveKit's `realtime_inference` span carries the usage and time to first chunk it
takes from the plugin's RealtimeModelMetrics; each TTS synthesis is a `chroma.turn` under
LiveKit's `tts_node` and moves the plugin's Prometheus counters; no span carries words
without the GenAI content opt-in; and with no tracer provider nothing is even made.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("livekit.agents")
pytest.importorskip("opentelemetry.sdk")

from livekit.plugins import chroma  # noqa: E402

from tests.span_capture import capture_spans, wait_spans  # noqa: E402
from tests import test_livekit_plugin as lk  # noqa: E402
from tests.test_livekit_plugin import FRAMES, REPO, audio_of, call, realtime  # noqa: E402

question = lk.question  # the fixture: the spoken question, at the mic's rate

pytestmark = pytest.mark.timeout(120)  # a stream left open fails the test instead of hanging CI

OPT_IN = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def named(spans: list, name: str) -> list:
    return [s for s in spans if s.name == name]


def ancestors(spans: list, span) -> list:
    """`span`'s parent, its parent's parent, ..., as far as the captured spans go."""
    by_id = {s.context.span_id: s for s in spans}
    chain = []
    while span.parent is not None and (span := by_id.get(span.parent.span_id)) is not None:
        chain.append(span)
    return chain


def ended_turns(spans: list, count: int = 1):
    """Wait for `count` chroma.turn spans and the agent_turn spans, which end after playout."""
    return lambda got: len(named(got, "chroma.turn")) >= count and len(named(got, "agent_turn")) >= count \
        and len(named(got, "realtime_inference")) >= count


def _chroma_samples() -> dict:
    from prometheus_client import REGISTRY

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in REGISTRY.collect() if f.name.startswith("chroma_") for s in f.samples}


def _moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_spoken_turn_is_a_chroma_turn_inside_livekits_agent_turn(model, voice, question, monkeypatch):
    monkeypatch.delenv(OPT_IN, raising=False)
    with capture_spans() as spans:
        async with call(realtime(model, voice)) as c:
            heard_at = c.mic.speak(question)
            await asyncio.sleep(heard_at - time.monotonic() + 0.3)
            c.session.commit_user_turn()
            await c.played()
            assert audio_of(c.speaker.frames).size == FRAMES * 1920 and not c.errors
            got = await asyncio.to_thread(wait_spans, spans, ended_turns(spans), 20)
        [metrics] = [m for m in c.metrics if getattr(m, "request_id", None)]
    [turn], [agent_turn], [inference] = named(got, "chroma.turn"), named(got, "agent_turn"), \
        named(got, "realtime_inference")
    # ours, in LiveKit's trace: directly under its agent_turn, beside its realtime_inference
    assert turn.context.trace_id == agent_turn.context.trace_id == inference.context.trace_id
    assert agent_turn in ancestors(got, turn) and turn.parent.span_id == agent_turn.context.span_id
    assert agent_turn.start_time <= turn.start_time < turn.end_time <= agent_turn.end_time
    a = turn.attributes
    assert a["chroma.turn.status"] == "completed" and a["chroma.turn.cancelled"] is False
    assert a["chroma.turn.frames"] == FRAMES and a["chroma.turn.stop_reason"] == "max_frames"
    assert a["metrics.ttfb"] > 0 and a["metrics.ttfb"] == pytest.approx(metrics.ttft)
    assert a["chroma.turn.time_to_first_audio_s"] == a["metrics.ttfb"] and "first_audio" in [e.name for e in turn.events]
    assert a["gen_ai.response.id"] == metrics.request_id and a["chroma.turn.trigger"] == "generate_reply"
    assert a["gen_ai.usage.input_tokens"] == metrics.input_tokens > 0
    assert a["gen_ai.usage.output_tokens"] == metrics.output_tokens
    assert a["gen_ai.provider.name"] == "flashlabs" and a["gen_ai.operation.name"] == "generate_content"
    # LiveKit's inference span, matched to the reply by its response id, from our RealtimeModelMetrics
    i = inference.attributes
    assert i["gen_ai.response.id"] == metrics.request_id
    assert i["gen_ai.usage.input_tokens"] == metrics.input_tokens and i["gen_ai.usage.output_tokens"] == metrics.output_tokens
    assert i["gen_ai.usage.audio.output_tokens"] == i["gen_ai.usage.output_audio_tokens"] == FRAMES
    assert i["gen_ai.response.time_to_first_chunk"] == pytest.approx(metrics.ttft) and metrics.ttft > 0
    assert json.loads(i["lk.realtime_model_metrics"])["duration"] == pytest.approx(metrics.duration)
    assert metrics.duration > metrics.ttft
    assert i["gen_ai.request.model"] == metrics.metadata.model_name
    # no words without the opt-in, and nothing of a room or a participant on ours
    assert not [k for k in a if k.endswith("_text") or k.startswith(("lk.", "room", "participant"))]


async def test_words_go_on_the_turn_span_only_with_the_opt_in(model, voice, monkeypatch):
    monkeypatch.setenv(OPT_IN, "true")
    with capture_spans() as spans:
        async with call(realtime(model, voice)) as c:
            await asyncio.wait_for(c.session.run(user_input="When do you open on Saturday?"), 40)
            await c.played()
            reply = await c.assistant_message()
            got = await asyncio.to_thread(wait_spans, spans, ended_turns(spans), 20)
    [turn] = named(got, "chroma.turn")
    assert turn.attributes["chroma.turn.reply_text"] == reply.text_content
    assert "chroma.turn.caller_text" not in turn.attributes  # a typed turn: no transcript of the caller


async def test_interrupted_reply_ends_its_span_cancelled(model, voice):
    frames = 250  # far longer than the test: only the interruption ends it
    with capture_spans() as spans:
        async with call(realtime(model, voice, frames=frames)) as c:
            c.session.say("Our store opens at nine on Saturdays and closes at six in the evening.")
            await asyncio.wait_for(c.speaker.started.wait(), 40)
            await asyncio.sleep(0.3)
            await asyncio.wait_for(c.session.interrupt(), 10)
            await c.played()
            got = await asyncio.to_thread(wait_spans, spans, ended_turns(spans), 20)
    [turn], [agent_turn] = named(got, "chroma.turn"), named(got, "agent_turn")
    assert agent_turn in ancestors(got, turn) and agent_turn.attributes["lk.interrupted"] is True
    a = turn.attributes
    assert a["chroma.turn.status"] == "cancelled" and a["chroma.turn.cancelled"] is True
    assert a["chroma.turn.stop_reason"] == "cancelled" and 0 < a["chroma.turn.frames"] < frames
    assert a["chroma.turn.trigger"] == "say" and a["metrics.ttfb"] > 0


async def test_a_reply_goes_under_its_first_readers_context_or_else_the_sessions(model, voice):
    """The reply's span is parented where its message stream is first read (in AgentSession:
    the agent_turn); a reply nobody read goes under the context the session was made in."""
    from opentelemetry import trace

    app = trace.get_tracer("app")
    with capture_spans() as spans:
        with app.start_as_current_span("job") as job:
            rt = realtime(model, voice).session()
        event = await asyncio.wait_for(rt.say("Hello there."), 30)
        with app.start_as_current_span("reader") as reader:
            [message] = [m async for m in event.message_stream]
        assert len([f async for f in message.audio_stream]) == FRAMES
        await asyncio.wait_for(rt.say("Goodbye now."), 30)  # never read: closing the session cancels it
        await asyncio.wait_for(rt.aclose(), 30)
        got = await asyncio.to_thread(wait_spans, spans, lambda s: len(named(s, "chroma.turn")) == 2, 20)
    read, unread = sorted(named(got, "chroma.turn"), key=lambda s: s.start_time)
    assert read.parent.span_id == reader.get_span_context().span_id
    assert read.attributes["chroma.turn.status"] == "completed" and read.attributes["chroma.turn.frames"] == FRAMES
    assert read.attributes["chroma.turn.trigger"] == "say"
    assert unread.parent.span_id == job.get_span_context().span_id
    assert unread.attributes["chroma.turn.status"] == "cancelled" and unread.attributes["chroma.turn.cancelled"]


async def test_tts_syntheses_are_turn_spans_and_move_the_prometheus_counters(model, voice):
    from opentelemetry import trace

    tts = chroma.TTS(model=model, voice=voice, max_frames=FRAMES, seed=0)
    before = _chroma_samples()
    with capture_spans() as spans:
        async with call(tts=tts) as c:  # a plain LiveKit TTS: its stream, in LiveKit's tts_node
            handle = c.session.say("Hello, thanks for calling!")
            await asyncio.wait_for(handle.wait_for_playout(), 40)
            assert sum(f.samples_per_channel for f in c.speaker.frames) == FRAMES * 1920 and not c.errors
        got = await asyncio.to_thread(wait_spans, spans, lambda s: named(s, "chroma.turn") and named(s, "tts_node"), 20)
        [turn], [node] = named(got, "chroma.turn"), named(got, "tts_node")
        assert node in ancestors(got, turn) and turn.context.trace_id == node.context.trace_id
        a = turn.attributes
        assert a["chroma.turn.trigger"] == "tts" and a["chroma.turn.status"] == "completed"
        assert a["chroma.turn.frames"] == FRAMES and a["metrics.ttfb"] > 0 and a["chroma.turn.stop_reason"]
        assert "chroma.turn.reply_text" not in a or os.environ.get(OPT_IN)
        # a chunked synthesis goes under whatever span is current, here the application's
        with trace.get_tracer("app").start_as_current_span("app") as app:
            async with tts.synthesize("Thanks for calling the store.") as chunked:
                audio = [ev.frame async for ev in chunked]
        assert sum(f.samples_per_channel for f in audio) == FRAMES * 1920
        got = await asyncio.to_thread(wait_spans, spans, lambda s: len(named(s, "chroma.turn")) == 2, 20)
    [chunked_turn] = [s for s in named(got, "chroma.turn") if s is not turn]
    assert chunked_turn.context.trace_id == app.get_span_context().trace_id
    assert chunked_turn.attributes["chroma.turn.frames"] == FRAMES
    after = _chroma_samples()
    assert _moved(before, after, "chroma_turns_total", status="cancelled") == 0, "a reply of another test ended here"
    assert _moved(before, after, "chroma_turns_total", status="completed") == 2
    assert _moved(before, after, "chroma_audio_frames_sent_total") == 2 * FRAMES
    assert _moved(before, after, "chroma_time_to_first_audio_seconds_count") == 2
    assert 0 < _moved(before, after, "chroma_time_to_first_audio_seconds_sum") < 30


def test_without_a_tracer_provider_no_span_is_made(tiny_checkpoint, voice, tmp_path):
    """No provider installed (the default): a reply and a synthesis make no span at all, and
    the reply's stream is the plain channel (nothing wrapped)."""
    voice_file = voice.save(tmp_path / "v.voice.safetensors")
    code = textwrap.dedent(f"""
        import asyncio
        import chroma_agent.serving.tracing as core
        from opentelemetry import trace
        from livekit.agents import utils
        from livekit.plugins import chroma

        def boom(*a, **k):
            raise AssertionError("a span was made without a tracer provider")
        core.tracer = boom

        async def main():
            rt = chroma.RealtimeModel(model={str(tiny_checkpoint)!r}, voice={str(voice_file)!r}, device="cpu",
                                      max_frames=2, seed=0).session()
            event = await asyncio.wait_for(rt.say("Hello there."), 60)
            assert isinstance(event.message_stream, utils.aio.Chan), type(event.message_stream)
            [message] = [m async for m in event.message_stream]
            assert len([f async for f in message.audio_stream]) == 2
            await rt.aclose()
            tts = chroma.TTS(model={str(tiny_checkpoint)!r}, voice={str(voice_file)!r}, device="cpu", max_frames=2)
            async with tts.synthesize("Thanks for calling.") as stream:
                assert sum([ev.frame.samples_per_channel async for ev in stream]) == 2 * 1920
            assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
            print("no spans")

        asyncio.run(main())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["CHROMA_AGENT_MATMUL"] = "linear"  # skip timing the CPU matmul paths: a faster load
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("no spans")
