"""OpenTelemetry traces of the Pipecat plugin, on the tiny checkpoint:

- a Pipecat pipeline with `PipelineWorker(enable_tracing=True)` around the service, in
  process under `capture_spans()`: each reply is a `chroma.turn` span under Pipecat's own
  `turn` span, in the `conversation` span's trace, with its time to first audio, frames and
  status (an interruption: "cancelled"), and the conversation's admission under the
  conversation; without `enable_tracing` no `chroma.*` span at all;
- the real `chroma-agent serve phone --provider twilio` process with the OTEL_ variables
  pointing at a loopback collector: a call is one trace, conversation > turn > chroma.turn,
  and no span carries the call's sids or phone numbers; without the variables a call's
  worker does not trace (`call_tracing` in a fresh process);
- the real `chroma-agent serve web` process and its page in headless Chromium (as
  test_web_server.py drives it): a browser session is one trace the same way;
- a call's worker (`call_worker`): a fresh conversation id per call, the kind of call.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("pipecat")
pytest.importorskip("opentelemetry.sdk")
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from . import server_process, test_pipecat_service, test_twilio_server, test_web_server  # noqa: E402
from .span_capture import OtlpCollector, capture_spans, wait_spans  # noqa: E402
from .test_pipecat_service import Player, service, turn  # noqa: E402
from .test_twilio_server import REPLY_TIMEOUT_S  # noqa: E402
from .test_web_server import MESSAGES, Chromium, needs_chromium  # noqa: E402

# the fixtures of the service's, the Twilio server's and the browser server's tests
question, phone_speech, microphone = test_pipecat_service.question, test_twilio_server.phone_speech, \
    test_web_server.microphone

METRICS = PipelineParams(enable_metrics=True, enable_usage_metrics=True)
CALLER, CALLED = "+15105550123", "+14155550199"   # numbers a webhook carries: never on a span


# -- a traced pipeline in process --

async def run_pipeline(processors: list, frames, *, enable_tracing: bool, until, timeout: float = 60.0) -> None:
    """Run `processors` under a PipelineWorker, queue `frames` (an iterable: a callable in it
    is awaited, a wait), wait for `until()` and end the pipeline."""
    worker = PipelineWorker(Pipeline(processors), params=METRICS, enable_rtvi=False, cancel_on_idle_timeout=False,
                            enable_tracing=enable_tracing, conversation_id="pipecat-test-conversation",
                            additional_span_attributes={"chroma.call.kind": "test"})
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    try:
        for frame in frames:
            if callable(frame):
                await frame()
            else:
                await worker.queue_frame(frame)
        await until_true(until, timeout)
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(asyncio.shield(running), 30)
    finally:
        if not running.done():
            await worker.cancel()
            await asyncio.wait_for(running, 10)


async def until_true(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def one(spans, name: str):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


@pytest.mark.timeout(120)
async def test_a_reply_is_a_chroma_turn_inside_pipecats_turn_span(model, voice, question):
    player = Player()
    with capture_spans() as spans:
        await run_pipeline([service(model, voice), player], turn(question), enable_tracing=True,
                           until=lambda: player.times(LLMFullResponseEndFrame))
        wait_spans(spans, lambda got: {"conversation", "chroma.turn", "chroma.engine.admission"}
                   <= {s.name for s in got})

    conversation = one(spans, "conversation")
    reply = one(spans, "chroma.turn")
    [pipecat_turn] = [s for s in spans if s.name == "turn" and s.context.span_id == reply.parent.span_id]
    assert pipecat_turn.parent.span_id == conversation.context.span_id
    assert {s.context.trace_id for s in (conversation, pipecat_turn, reply)} == {conversation.context.trace_id}
    assert conversation.attributes["conversation.id"] == "pipecat-test-conversation"

    attrs = reply.attributes
    assert attrs["gen_ai.provider.name"] == "flashlabs" and attrs["gen_ai.operation.name"] == "generate_content"
    assert attrs["gen_ai.request.model"] and attrs["service.operation"] == "llm_response"
    assert attrs["metrics.ttfb"] > 0 and attrs["chroma.turn.time_to_first_audio_s"] == attrs["metrics.ttfb"]
    assert attrs["chroma.turn.speech_end_to_first_audio_s"] >= attrs["metrics.ttfb"] - 0.01 > 0
    audio = player.times(TTSAudioRawFrame)
    assert attrs["chroma.turn.frames"] == len(audio) > 0
    assert attrs["chroma.turn.status"] == "completed" and attrs["chroma.turn.cancelled"] is False
    assert attrs["chroma.turn.stop_reason"] in ("eos", "max_frames")
    assert attrs["gen_ai.usage.output_tokens"] >= 0 and attrs["gen_ai.usage.input_tokens"] > 0
    assert [e.name for e in reply.events] == ["first_audio"]
    assert "chroma.turn.reply_text" not in attrs   # transcripts only with the GenAI content opt-in
    # it starts at the end of the caller's speech, within Pipecat's turn, and ends after its audio
    assert pipecat_turn.start_time <= reply.start_time < reply.end_time
    assert reply.events[0].timestamp - reply.start_time == pytest.approx(attrs["metrics.ttfb"] * 1e9, abs=5e6)

    admission = one(spans, "chroma.engine.admission")
    assert admission.parent.span_id == conversation.context.span_id
    assert admission.context.trace_id == conversation.context.trace_id


@pytest.mark.timeout(120)
async def test_an_interrupted_reply_is_cancelled(model, voice, question):
    player = Player()

    async def heard_a_few_frames():
        await until_true(lambda: len(player.times(TTSAudioRawFrame)) >= 4)

    frames = itertools.chain(turn(question), [heard_a_few_frames, InterruptionFrame()])
    with capture_spans() as spans:
        await run_pipeline([service(model, voice, max_frames=300), player], frames, enable_tracing=True,
                           until=lambda: player.times(LLMFullResponseEndFrame))
        wait_spans(spans, lambda got: "conversation" in {s.name for s in got})
    reply = one(spans, "chroma.turn")
    assert reply.attributes["chroma.turn.status"] == "cancelled" and reply.attributes["chroma.turn.cancelled"]
    assert reply.attributes["chroma.turn.stop_reason"] == "cancelled"
    assert 4 <= reply.attributes["chroma.turn.frames"] < 300
    assert reply.parent is not None and reply.parent.span_id in {s.context.span_id for s in spans if s.name == "turn"}


@pytest.mark.timeout(120)
async def test_without_pipecat_tracing_nothing_of_ours_is_recorded(model, voice, question):
    player = Player()
    with capture_spans() as spans:   # a provider records, but the pipeline does not trace
        await run_pipeline([service(model, voice), player], turn(question), enable_tracing=False,
                           until=lambda: player.times(LLMFullResponseEndFrame))
        await asyncio.sleep(0.2)
    assert player.times(TTSAudioRawFrame)
    assert not [s.name for s in spans if s.name.startswith("chroma.") or s.name in ("conversation", "turn")]


# -- the servers, out of process --

def nests(spans, kind: str) -> bool:
    """A finished chroma.turn under a turn under a conversation of `kind`, in one trace."""
    by_id = {s.span_id: s for s in spans}
    for reply in spans:
        if reply.name == "chroma.turn" and "chroma.turn.status" in reply.attributes:
            turn_span = by_id.get(reply.parent_id)
            call = by_id.get(turn_span.parent_id) if turn_span is not None else None
            if turn_span is not None and turn_span.name == "turn" and call is not None \
                    and call.name == "conversation" and call.attributes.get("chroma.call.kind") == kind:
                return True
    return False


def check_call_trace(spans, kind: str, secrets: tuple[str, ...] = ()) -> dict:
    """The call's trace (see `nests`): its conversation, turn, chroma.turn and admission,
    and none of `secrets` in any attribute, event or resource; the chroma.turn's attributes."""
    [conversation] = [s for s in spans if s.name == "conversation"]
    in_trace = [s for s in spans if s.trace_id == conversation.trace_id]
    assert {"turn", "chroma.turn", "chroma.engine.admission"} <= {s.name for s in in_trace}
    assert all(s.trace_id == conversation.trace_id for s in spans if s.name.startswith("chroma."))
    [admission] = [s for s in in_trace if s.name == "chroma.engine.admission"]
    assert admission.parent_id == conversation.span_id
    assert admission.attributes["chroma.engine.capacity"] >= 1
    assert re.fullmatch("[0-9a-f]{16,32}", conversation.attributes["conversation.id"])   # an id of ours
    turns = {s.span_id for s in in_trace if s.name == "turn" and s.parent_id == conversation.span_id}
    replies = [s for s in in_trace if s.name == "chroma.turn"]   # one a turn the VAD heard (a pause may split one)
    assert all(s.parent_id in turns and s.attributes["chroma.turn.status"] for s in replies)
    attrs = replies[0].attributes
    assert attrs["metrics.ttfb"] > 0 and attrs["chroma.turn.frames"] > 0
    assert attrs["gen_ai.provider.name"] == "flashlabs" and "first_audio" in replies[0].events
    everything = json.dumps([[s.attributes, s.events, s.resource] for s in spans], default=str)
    for secret in secrets:
        assert secret not in everything, f"{secret!r} is on a span"
    return conversation.attributes


@pytest.mark.timeout(180, func_only=True)
async def test_a_phone_call_is_one_trace_without_its_sids_or_numbers(tiny_checkpoint, voice, tmp_path, phone_speech):
    voice.save(tmp_path / "tiny.voice.safetensors")
    with OtlpCollector() as collector:
        server = server_process.ServerProcess(
            "phone", ["--provider", "twilio", "--model", str(tiny_checkpoint), "--voice",
                      str(tmp_path / "tiny.voice.safetensors"), "--host", "127.0.0.1", "--max-frames", "40",
                      "--max-calls", "1"], tmp_path / "server.log",
            env=collector.env("chroma-phone-test"), drop_env=("TWILIO_", "CHROMA_AGENT_", "OTEL_"))
        try:
            await asyncio.to_thread(server.wait_ready)
            call = TwilioCall(f"ws://127.0.0.1:{server.port}/ws", custom_parameters={"from": CALLER})
            form = urllib.parse.urlencode({"CallSid": call.call_sid, "From": CALLER, "To": CALLED}).encode()
            with urllib.request.urlopen(urllib.request.Request(server.base + "/twiml", data=form), timeout=5) as r:
                assert r.status == 200
            async with call:
                deadline = time.monotonic() + 60
                while server.health()["engine"]["conversations"] < 1:   # the call's pipeline runs
                    assert time.monotonic() < deadline, "the call's pipeline did not start"
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                spoken = await call.say(*phone_speech["question"])
                await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
                await call.until_quiet(timeout=REPLY_TIMEOUT_S)
                await call.stop()
                await asyncio.wait_for(call.closed.wait(), 10)
            spans = await asyncio.to_thread(
                collector.wait_for, lambda got: nests(got, "phone") and "conversation" in {s.name for s in got}, 30)
        finally:
            server.stop()
    attributes = check_call_trace(spans, "phone", (call.call_sid, call.stream_sid, CALLER, CALLED, CALLER[1:]))
    assert attributes["chroma.carrier"] == "twilio"
    assert f"call {attributes['conversation.id']} ended" in server.log.read_text()   # logs and traces name it alike
    assert spans[0].resource["service.name"] == "chroma-phone-test"


@needs_chromium
@pytest.mark.timeout(180, func_only=True)
async def test_a_browser_session_is_one_trace(tiny_checkpoint, voice, tmp_path, microphone):
    voice.save(tmp_path / "tiny.voice.safetensors")
    with OtlpCollector() as collector:
        server = server_process.ServerProcess(
            "web", ["--model", str(tiny_checkpoint), "--voice", str(tmp_path / "tiny.voice.safetensors"),
                    "--max-frames", "40", "--max-calls", "1"], tmp_path / "server.log",
            env=collector.env("chroma-web-test"), drop_env=("CHROMA_AGENT_", "OTEL_"), base_host="localhost")
        browser = None
        try:
            await asyncio.to_thread(server.wait_ready)
            browser = await Chromium(server.base + "/", microphone, tmp_path / "profile").start()
            await browser.evaluate("document.getElementById('connect').click()")
            await browser.wait_for(f"{MESSAGES}.includes('bot-ready')", 30, "the call connected (RTVI bot-ready)")
            await browser.wait_for(f"{MESSAGES}.includes('bot-stopped-speaking')", 2 * REPLY_TIMEOUT_S,
                                   "a reply was played")
            await browser.evaluate("document.getElementById('connect').click()")   # hang up
            spans = await asyncio.to_thread(
                collector.wait_for, lambda got: nests(got, "web") and "conversation" in {s.name for s in got}, 30)
        finally:
            if browser is not None:
                await browser.close()
            server.stop()
    check_call_trace(spans, "web")
    assert spans[0].resource["service.name"] == "chroma-web-test"


def test_without_the_otel_variables_a_calls_worker_does_not_trace():
    # a fresh process: this one's tests install a recording provider
    code = ("import json; from chroma_agent.serving.tracing import configure_tracing; "
            "from pipecat_chroma.call_worker import call_tracing; "
            "print(json.dumps([configure_tracing(), call_tracing('phone', carrier='twilio')]))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, {"enable_tracing": False}]


def test_a_traced_calls_worker_gets_a_fresh_conversation_id_and_its_kind():
    from pipecat_chroma.call_worker import call_tracing, call_worker

    with capture_spans():
        first, second = call_tracing("web"), call_tracing("phone", "0123456789abcdef", carrier="telnyx", absent=None)
        worker = call_worker(Pipeline([]), kind="web", out_rate=24000)
    assert first["enable_tracing"] and first["additional_span_attributes"] == {"chroma.call.kind": "web"}
    assert second["additional_span_attributes"] == {"chroma.call.kind": "phone", "chroma.carrier": "telnyx"}
    assert len(first["conversation_id"]) == 32 and first["conversation_id"] != call_tracing("web")["conversation_id"]
    assert second["conversation_id"] == "0123456789abcdef"
    assert worker.turn_trace_observer is not None and worker.params.audio_in_sample_rate == 16000
