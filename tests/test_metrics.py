"""Prometheus metrics (`chroma_agent.serving.metrics`): `serve realtime`'s `GET /metrics`
parses as Prometheus text and after one session with one server-VAD turn its counters and
histograms moved by the right amounts (a call completed, a turn's time to first audio and
end of speech -> first audio observed, frames, refusals by reason, a refused event by its
code); `GET /calls` needs the admin key; no label carries an id, a key or text. Plus
`CallServer`'s accounting and the recording's guards, without a server."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from chroma_agent.runtime.engine import ChromaEngine  # noqa: E402
from chroma_agent.serving import metrics as m  # noqa: E402
from chroma_agent.serving.call_server import CallServer, admin_refusal  # noqa: E402
from chroma_agent.serving.realtime_server import Limits, RealtimeServer  # noqa: E402
from tests.prometheus_samples import moved as samples_moved  # noqa: E402
from tests.prometheus_samples import registry_samples, scrape, value  # noqa: E402
from tests.realtime_helpers import Client, InProcessServer, get, speech_pcm24  # noqa: E402

KEY, ADMIN = "sk-metrics-0123456789", "admin-metrics-9876"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.timeout(90, func_only=True)


@pytest.fixture(scope="module")
def server(model, voice):
    engine = ChromaEngine(model, max_conversations=1)
    realtime = RealtimeServer(engine, voice, api_key=KEY, admin_key=ADMIN, max_frames=8,
                              metrics=m.ServerMetrics(CollectorRegistry()),   # this server's own numbers
                              limits=Limits(max_message_bytes=256 * 1024, max_append_s=2.0, max_audio_ahead_s=None))
    srv = InProcessServer(realtime)
    yield srv
    srv.stop()
    engine.close()


def calls(base: str, key: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(base + "/calls", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


async def test_one_session_moves_the_counters_and_histograms_by_the_right_amounts(server, speech):
    before = await asyncio.to_thread(scrape, server.base)
    assert value(before, "chroma_engine_capacity") == 1 and value(before, "chroma_calls_active") == 0
    assert value(before, "process_resident_memory_bytes") > 0 and value(before, "process_threads") >= 1
    with pytest.raises(InvalidStatus) as wrong_key:
        await Client.connect(server.url, {"Authorization": "Bearer sk-wrong"})
    assert wrong_key.value.response.status_code == 401
    c = await Client.connect(server.url, AUTH)
    try:
        session_id = (await c.recv())["session"]["id"]
        with pytest.raises(InvalidStatus) as full:   # one conversation: a second session is over capacity
            await Client.connect(server.url, AUTH)
        assert full.value.response.status_code == 503
        # GET /calls: the admin's, with the admin key only; off (404) without one
        assert (await asyncio.to_thread(calls, server.base, None))[0] == 401
        assert (await asyncio.to_thread(calls, server.base, KEY))[0] == 401
        status, listed = await asyncio.to_thread(calls, server.base, ADMIN)
        assert status == 200 and [s["id"] for s in listed["sessions"]] == [session_id]
        server.realtime.admin_key = None
        try:
            assert (await asyncio.to_thread(calls, server.base, ADMIN))[0] == 404
        finally:
            server.realtime.admin_key = ADMIN
        during = await asyncio.to_thread(scrape, server.base)
        assert value(during, "chroma_calls_active") == 1
        await c.raw("{not json")
        assert (await c.recv())["error"]["code"] == "invalid_json"
        await c.stream(speech_pcm24(speech["question"], lead_s=0.8, tail_s=1.2), chunk_ms=100)
        events = await c.until("response.done", timeout=60)
        assert events[-1]["response"]["status"] == "completed", events[-1]
    finally:
        await c.close()
    for _ in range(100):
        if not server.realtime.sessions:
            break
        await asyncio.sleep(0.05)
    after = await asyncio.to_thread(scrape, server.base)

    def moved(name, **labels):
        return samples_moved(before, after, name, **labels)

    assert moved("chroma_calls_total", outcome="completed") == 1 and moved("chroma_calls_total", outcome="failed") == 0
    assert value(after, "chroma_calls_active") == 0
    assert moved("chroma_calls_refused_total", reason="auth") == 1
    assert moved("chroma_calls_refused_total", reason="capacity") == 1
    assert moved("chroma_invalid_messages_total", kind="invalid_json") == 1
    assert moved("chroma_turns_total", status="completed") == 1
    assert moved("chroma_time_to_first_audio_seconds_count") == 1
    assert moved("chroma_speech_end_to_first_audio_seconds_count") == 1
    first_audio = moved("chroma_time_to_first_audio_seconds_sum")
    assert 0 < first_audio <= moved("chroma_speech_end_to_first_audio_seconds_sum")   # the speech ended first
    deltas = sum(e["type"] == "response.output_audio.delta" for e in events)
    assert deltas >= 1 and moved("chroma_audio_frames_sent_total") == deltas
    assert moved("chroma_audio_frames_dropped_total") == 0
    assert moved("chroma_engine_tick_seconds_count") >= deltas
    assert value(after, "chroma_engine_tick_seconds_bucket", le="+Inf") == value(after, "chroma_engine_tick_seconds_count")
    # labels come from fixed sets: no session or item id, no key, no text
    allowed = {"outcome": set(m.OUTCOMES), "reason": set(m.REFUSALS), "status": set(m.TURN_STATUSES)}
    for (name, labels), _ in after.items():
        if not name.startswith("chroma_"):
            continue
        for label, v in labels:
            assert session_id not in v and KEY not in v and ADMIN not in v and " " not in v, (name, label, v)
            assert not v.startswith(("sess_", "item_", "resp_")), (name, v)
            if label in allowed:
                assert v in allowed[label], (name, label, v)
            elif label == "kind":
                assert v in ("invalid_json", "other") or v.replace("_", "").isalpha(), v
            else:
                assert label == "le", (name, label)
    assert get(server.base, "/health")[1]["calls_total"] >= 1


async def test_call_server_counts_calls_and_refusals_and_shares_its_families():   # release() needs a loop
    class Engine:   # a stand-in with a capacity: no ticks yet
        capacity, active = 1, 0

    class Server(CallServer):
        async def end_calls(self):
            pass

    registry = CollectorRegistry()
    server = Server(Engine(), metrics=m.ServerMetrics(registry))
    assert m.ServerMetrics(registry).families is server.metrics.families   # a second server: no duplicate names
    m.ServerMetrics()   # the default registry, twice in one process
    m.ServerMetrics()
    reserved = object()
    server.hold(reserved, None, count=False)   # a slot reserved while a call is set up is no call yet
    assert server.refusal() == "busy"
    server.calls.pop(reserved)
    server.hold("a", "call")
    server.hold("a", "call")                   # held again once started (web_server's pattern): counted once
    server.fail("a")
    server.release("a")
    server.hold("b", "call")
    server.release("b")
    server.release("b")                        # twice: counted once
    server.draining = True
    assert server.refusal() == "draining"
    server.count_refusal("rate_limit_exceeded")
    samples = registry_samples(registry)
    assert value(samples, "chroma_calls_active") == 0
    assert value(samples, "chroma_calls_total", outcome="failed") == 1
    assert value(samples, "chroma_calls_total", outcome="completed") == 1
    for reason in ("capacity", "draining", "rate_limit"):
        assert value(samples, "chroma_calls_refused_total", reason=reason) == 1, reason
    assert value(samples, "chroma_engine_capacity") == 1 and value(samples, "chroma_engine_load") == 0


def test_recording_never_raises_and_labels_stay_bounded():
    registry = CollectorRegistry()
    metrics = m.ServerMetrics(registry)
    metrics.call_ended("??")                  # unknown outcome: failed
    metrics.refused("a caller's text")        # unknown reason: other
    metrics.frames(sent=-3, late=2)           # a negative count is ignored, not raised
    metrics.first_audio(-1.0)
    metrics.invalid_message("Robert'); DROP TABLE")
    for i in range(m.MAX_KINDS + 10):
        metrics.invalid_message(f"code_{i}")
    metrics.families.calls_active.inc = None  # a broken client library: logged once, never raised
    metrics.call_started()
    m.NO_METRICS.frames(sent=1)
    kinds = {s.labels["kind"] for f in text_string_to_metric_families(m.exposition(registry)[0].decode())
             if f.name == "chroma_invalid_messages" for s in f.samples}
    assert "other" in kinds and len(kinds) <= m.MAX_KINDS + 1 and not any(" " in k for k in kinds)
    assert metrics.failed
    assert admin_refusal(None, None) == 404 and admin_refusal("Bearer x", "y") == 401
    assert admin_refusal("Bearer y", "y") is None


async def test_transcripts_are_counted_by_outcome():
    from types import SimpleNamespace

    from chroma_agent.serving.realtime_transcripts import InputTranscripts, ItemTranscript, failed, no_words

    registry = CollectorRegistry()

    async def send(ev):
        pass

    session = SimpleNamespace(metrics=m.ServerMetrics(registry), items={}, send=send, config=SimpleNamespace(id="s"))
    words = InputTranscripts(session)
    await asyncio.wait_for(words.on_event(ItemTranscript("item_1", None), no_words()), 5)
    await asyncio.wait_for(words.on_event(ItemTranscript("item_2", None), failed("no audio tower")), 5)
    samples = registry_samples(registry)
    assert samples[("chroma_transcripts_total", (("outcome", "completed"),))] == 1
    assert samples[("chroma_transcripts_total", (("outcome", "failed"),))] == 1
