"""The OpenAI Realtime server's protocol over a loopback websocket: `RealtimeServer`'s app
under uvicorn in this process (one engine on the tiny checkpoint), a plain protocol client,
espeak-ng speech. Reply event order and payloads, cancel, truncate, items, server VAD, auth,
capacity, hostile input, voice names, G.711, and the parsers fuzzed with hypothesis."""
from __future__ import annotations

import asyncio
import base64
import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from chroma_agent.serving import realtime_protocol as rp  # noqa: E402
from chroma_agent.runtime.engine import ChromaEngine  # noqa: E402
from chroma_agent.serving.realtime_server import Limits, RealtimeServer, Voices  # noqa: E402
from tests.realtime_helpers import Client, InProcessServer, b64, get, speech_pcm24  # noqa: E402

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT = {"max_output_tokens": 6}   # a reply of 6 frames (0.48 s): enough to check, quick on a CPU
pytestmark = pytest.mark.timeout(60, func_only=True)


@pytest.fixture(scope="module")
def server(model, voice, tmp_path_factory):
    voices = tmp_path_factory.mktemp("voices")
    voice.save(voices / "alt.voice.safetensors")
    engine = ChromaEngine(model, max_conversations=2)
    realtime = RealtimeServer(engine, voice, voices_dir=voices, api_key=KEY, max_frames=60,
                              # these tests stream recorded speech faster than real time: no pacing bound here
                              limits=Limits(max_message_bytes=256 * 1024, max_append_s=2.0, max_audio_ahead_s=None))
    srv = InProcessServer(realtime)
    yield srv
    srv.stop()
    engine.close()


OPEN: list[Client] = []


@pytest.fixture(autouse=True)
async def close_clients():
    """A failed test's clients are closed, so their slots never leak into the next test."""
    yield
    while OPEN:
        await OPEN.pop().close()


async def session(server, manual: bool = True) -> Client:
    c = await Client.connect(server.url + "?model=anything", AUTH)
    OPEN.append(c)
    created = await c.recv()
    assert created["type"] == "session.created"
    if manual:
        await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        assert (await c.recv())["type"] == "session.updated"
    return c


async def slots_free(server, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not server.realtime.sessions:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(server.realtime.sessions)} sessions still hold a slot")


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


# -- a reply --

async def test_session_created_first_and_session_updated_with_the_whole_session(server):
    c = await Client.connect(server.url, AUTH)
    created = await c.recv()
    assert created["type"] == "session.created"
    s = created["session"]
    assert s["type"] == "realtime" and s["object"] == "realtime.session" and s["instructions"]
    assert s["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # on by default
    assert s["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    await c.send("session.update", session={"type": "realtime", "instructions": "Be brief.",
                                            "audio": {"output": {"voice": "alt", "format": {"type": "audio/pcmu"}}}})
    updated = (await c.recv())["session"]
    assert updated["instructions"] == "Be brief." and updated["audio"]["output"]["voice"] == "alt"
    assert updated["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert updated["audio"]["input"]["turn_detection"] == s["audio"]["input"]["turn_detection"]  # untouched
    await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "high"}}}})
    td = (await c.recv())["session"]["audio"]["input"]["turn_detection"]
    assert td["type"] == "semantic_vad" and td["silence_duration_ms"] == 500
    await c.close()


async def test_text_turn_reply_events_in_order_with_ids_and_payloads(server):
    c = await session(server)
    await c.send("conversation.item.create", item={"id": "item_mine", "type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Hello there"}]})
    added, done = await c.recv(), await c.recv()
    assert added["type"] == "conversation.item.added" and added["item"]["id"] == "item_mine"
    assert done["type"] == "conversation.item.done"
    await c.send("response.create", response={"metadata": {"client_event_id": "abc"}, **SHORT})
    events = await c.until("response.done")
    head = types(events[:4])
    assert head == ["response.created", "response.output_item.added", "conversation.item.added",
                    "response.content_part.added"]
    tail = ["response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
            "response.output_item.done", "conversation.item.done", "response.done"]
    assert types(events[-6:]) == tail
    middle = events[4:-6]
    assert middle and set(types(middle)) <= {"response.output_audio.delta", "response.output_audio_transcript.delta"}
    created, finished = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["metadata"] == {"client_event_id": "abc"}
    assert finished["id"] == created["id"] and finished["metadata"] == {"client_event_id": "abc"}
    item_id = events[1]["item"]["id"]
    deltas = [e for e in middle if e["type"] == "response.output_audio.delta"]
    assert 1 <= len(deltas) <= 6
    for d in deltas:  # each an 80 ms frame of pcm16 at 24 kHz, with the ids the clients index by
        assert (d["response_id"], d["item_id"], d["output_index"], d["content_index"]) == (created["id"], item_id, 0, 0)
        assert len(base64.b64decode(d["delta"])) == 1920 * 2
    transcript = "".join(e["delta"] for e in middle if e["type"] == "response.output_audio_transcript.delta")
    assert events[-5]["transcript"] == transcript
    assert finished["status"] in ("completed", "incomplete") and finished["output"][0]["id"] == item_id
    assert finished["output"][0]["content"] == [{"type": "output_audio", "transcript": transcript}]
    usage = finished["usage"]
    assert usage["output_token_details"]["audio_tokens"] == len(deltas) and usage["input_tokens"] > 0
    await c.close()


async def test_cancel_ends_the_reply_within_a_frame_with_response_done_cancelled(server):
    c = await session(server)
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Tell me a story"}]})
    await c.send("response.create")
    await c.until("response.output_audio.delta", timeout=20)
    await c.send("response.cancel")
    events = await c.until("response.done", timeout=10)
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and done["status_details"] == {"type": "cancelled",
                                                                      "reason": "client_cancelled"}
    assert len([e for e in events if e["type"] == "response.output_audio.delta"]) <= 2  # the one in flight
    assert "response.output_item.done" in types(events)
    # nothing active now: the real API's code, and a message LiveKit recognises
    await c.send("response.cancel")
    error = (await c.recv())["error"]
    assert error["code"] == "response_cancel_not_active" and error["message"].startswith("Cancellation failed")
    # a second response.create while one runs is refused; the first goes on
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Go on"}]})
    await c.send("response.create")  # 60 frames: still running when the next one comes
    await c.until("response.created")
    await c.send("response.create", response=SHORT)
    refused = await c.until("error", timeout=20)
    assert refused[-1]["error"]["code"] == "conversation_already_has_active_response"
    assert "response.done" not in types(refused)
    await c.send("response.cancel")
    assert (await c.until("response.done", timeout=20))[-1]["response"]["status"] == "cancelled"
    await c.close()


async def test_truncate_is_clamped_to_the_audio_sent_and_unknown_items_are_errors(server):
    c = await session(server)
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Hi"}]})
    await c.send("response.create", response=SHORT)
    events = await c.until("response.done")
    item_id = events[-1]["response"]["output"][0]["id"]
    sent_ms = 80 * len([e for e in events if e["type"] == "response.output_audio.delta"])
    await c.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=60_000)
    truncated = await c.recv()
    assert truncated["type"] == "conversation.item.truncated"
    assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, sent_ms)
    await c.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=80)
    assert (await c.recv())["audio_end_ms"] == 80
    await c.send("conversation.item.truncate", item_id="item_nope", content_index=0, audio_end_ms=0)
    assert (await c.recv())["error"]["code"] == "item_truncate_invalid_item_id"
    # the history kept what was heard: the next turn still works
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "And?"}]})
    await c.send("response.create", response=SHORT)
    assert (await c.until("response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    await c.close()


async def test_items_create_retrieve_delete_with_the_clients_ids(server):
    c = await session(server)
    item = {"id": "item_a1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    await c.send("conversation.item.create", item=item, previous_item_id="root")
    added = await c.recv()
    assert added["item"]["id"] == "item_a1" and added["item"]["content"][0]["text"] == "x"
    await c.recv()  # .done
    await c.send("conversation.item.create", item=item)
    assert (await c.recv())["error"]["code"] == "item_already_exists"
    await c.send("conversation.item.retrieve", item_id="item_a1")
    assert (await c.recv())["item"]["id"] == "item_a1"
    await c.send("conversation.item.delete", item_id="item_a1")
    assert await c.recv() == {**c.events[-1], "type": "conversation.item.deleted", "item_id": "item_a1"}
    await c.send("conversation.item.retrieve", item_id="item_a1")
    assert (await c.recv())["error"]["code"] == "item_retrieve_invalid_item_id"
    await c.send("conversation.item.delete", item_id="item_a1")
    assert (await c.recv())["error"]["code"] == "item_delete_invalid_item_id"
    # a deleted user item is not answered: nothing pending, a completed empty response
    await c.send("response.create")
    events = await c.until("response.done")
    assert types(events) == ["response.created", "response.done"] and events[-1]["response"]["output"] == []
    await c.close()


async def test_an_out_of_band_reply_leaves_the_conversation_and_its_history_untouched(server):
    # it runs on a short-lived engine conversation of its own: the session's conversation keeps
    # the same KV history, its items and its pending input; the side conversation's slot is freed
    c = await session(server)
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Hi"}]})
    await c.send("response.create", response=SHORT)
    await c.until("response.done")
    (s,) = list(server.realtime.sessions)
    conv, history = s.conv, s.conv.history_tokens
    await c.send("conversation.item.create", item={"id": "item_wait", "type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Later"}]})
    await c.send("response.create", response={"conversation": "none", "instructions": "Say yes.", **SHORT})
    events = await c.until("response.done")
    events = events[types(events).index("response.created"):]   # after the item's own events
    assert "response.output_audio.delta" in types(events) and "conversation.item.added" not in types(events)
    assert s.conv is conv and conv.history_tokens == history and not conv.closed
    assert [p[0] for p in s.pending] == ["item_wait"] and events[-1]["response"]["output"][0]["id"] not in s.items
    assert server.realtime.engine.active == 1
    await c.close()
    await slots_free(server)


# -- turns from speech --

async def test_server_vad_turn_with_spoken_audio(server, speech):
    c = await session(server, manual=False)
    pcm = speech_pcm24(speech["question"], lead_s=0.8, tail_s=1.2)
    await c.stream(pcm, chunk_ms=100)
    events = await c.until("response.done", timeout=60)
    kinds = types(events)
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added", "response.created",
             "response.output_audio.delta", "response.done"]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    started, stopped = events[kinds.index(order[0])], events[kinds.index(order[1])]
    speech_ms = (pcm.size / 24 - 2000)
    assert 300 <= started["audio_start_ms"] <= 800          # 0.8 s lead minus the 300 ms padding, give or take
    assert speech_ms - 600 < stopped["audio_end_ms"] - started["audio_start_ms"] < speech_ms + 900
    assert started["item_id"] == stopped["item_id"] == events[kinds.index(order[2])]["item_id"]
    assert events[kinds.index("response.created")]["response"]["metadata"] is None  # made by the server
    await c.close()


def test_a_server_vad_turn_is_cut_to_its_speech_once(speech):
    # the turn the VAD found is what the model hears: the prefix padding, the speech and
    # 100 ms after it, not the silence that ended the turn (no second Silero pass needed)
    from chroma_agent.serving.realtime_audio import InputAudio

    pcm = speech_pcm24(speech["question"], lead_s=0.8, tail_s=1.2).astype(np.float32) / 32768
    audio, found = InputAudio(Limits()), []
    td = {"threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}

    async def hear():
        for i in range(0, pcm.size, 2400):   # 100 ms appends
            found.extend(await audio.append(pcm[i:i + 2400], 24000, td))

    asyncio.run(asyncio.wait_for(hear(), 60))
    assert [k for k, _, _ in found] == ["start", "end"]
    (_, start, _), (_, end, turn) = found
    assert turn.size == end + 1600 - start   # 16 kHz: to 100 ms past the end of the speech
    speech_s = pcm.size / 24000 - 2.0
    assert speech_s - 0.4 < turn.size / 16000 < speech_s + 0.3 + 0.1 + 0.3   # + padding, give or take


async def test_g711_in_and_out(server, speech):
    c = await session(server)
    await c.send("session.update", session={"type": "realtime", "audio": {
        "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcma"}}}})
    await c.recv()
    pcm = speech_pcm24(speech["question"], lead_s=0.1, tail_s=0.1)
    ulaw = rp.pcm_to_ulaw(pcm[::3])  # 8 kHz (a crude decimation is fine for a commit)
    for i in range(0, len(ulaw), 1600):
        await c.send("input_audio_buffer.append", audio=b64(ulaw[i:i + 1600]))
    await c.send("input_audio_buffer.commit")
    assert (await c.recv())["type"] == "input_audio_buffer.committed"
    await c.send("response.create", response=SHORT)
    events = await c.until("response.done")
    deltas = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"]
    assert deltas and all(len(d) == 640 for d in deltas)  # each 80 ms frame at 8 kHz, one byte a sample
    await c.close()


def test_g711_matches_the_itu_reference():
    audioop = pytest.importorskip("audioop")  # the stdlib's C codec, still in Python 3.11
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    assert rp.pcm_to_ulaw(pcm) == audioop.lin2ulaw(pcm.tobytes(), 2)
    assert rp.pcm_to_alaw(pcm) == audioop.lin2alaw(pcm.tobytes(), 2)
    codes = bytes(range(256))
    assert rp.ULAW_TO_PCM.tobytes() == audioop.ulaw2lin(codes, 2)
    assert rp.ALAW_TO_PCM.tobytes() == audioop.alaw2lin(codes, 2)


# -- who gets in --

async def test_missing_or_wrong_key_is_refused_at_the_upgrade_and_never_logged(server, caplog):
    caplog.set_level(logging.DEBUG)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        with pytest.raises(InvalidStatus) as refused:
            await Client.connect(server.url, headers)
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    assert not server.realtime.sessions
    served = [r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client")]
    assert served and not any(KEY in line for line in served)  # the server's own logs never hold the key


async def test_a_model_failure_fails_that_reply_only_and_the_sessions_go_on(server, monkeypatch):
    # e.g. CUDA out of memory when a new call's conversation is made: that reply fails
    # (response.done "failed", server_error), the other session is untouched, and the
    # failed session's next reply gets a conversation
    engine = server.realtime.engine
    real, failures = engine.conversation, []

    def out_of_memory_once(**kwargs):
        if not failures:
            failures.append(kwargs)
            raise __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    monkeypatch.setattr(engine, "conversation", out_of_memory_once)
    a, b = await session(server), await session(server)
    await a.send("response.create", response={"instructions": "Say hi.", **SHORT})
    done = (await a.until("response.done"))[-1]["response"]
    assert done["status"] == "failed" and done["status_details"]["error"]["type"] == "server_error"
    assert "out of memory" in done["status_details"]["error"]["message"]
    await b.send("response.create", response={"instructions": "Say hi.", **SHORT})
    await a.send("response.create", response={"instructions": "Say hi.", **SHORT})
    for c in (b, a):
        events = await c.until("response.done")
        assert events[-1]["response"]["status"] in ("completed", "incomplete")
        assert "response.output_audio.delta" in types(events)
    await a.close()
    await b.close()
    await slots_free(server)
    for _ in range(100):   # the engine's slots too (closed in a worker thread)
        if engine.active == 0:
            break
        await asyncio.sleep(0.05)
    assert len(failures) == 1 and engine.active == 0


async def test_capacity_503_and_a_dropped_connection_frees_its_slot_at_once(server):
    a, b = await session(server), await session(server)
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server.url, AUTH)
    assert refused.value.response.status_code == 503 and refused.value.response.headers["Retry-After"]
    status, health = get(server.base, "/health")
    from tests.health_schema import check_health   # the /health schema every server shares
    check_health(health, "realtime")
    assert status == 200 and health["active_calls"] == health["max_calls"] == 2 and health["auth"] is True
    assert health["engine"]["frame_ms"] is None or health["engine"]["frame_ms"]["p95"] > 0
    # one caller drops mid-reply (no close handshake); the other is untouched
    await a.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Go on"}]})
    await a.send("response.create")
    await a.until("response.output_audio.delta")
    a.ws.transport.abort()
    for _ in range(100):
        if len(server.realtime.sessions) == 1:
            break
        await asyncio.sleep(0.05)
    assert len(server.realtime.sessions) == 1
    c = await session(server)  # the slot is free again
    await b.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Hi"}]})
    await b.send("response.create", response=SHORT)
    assert (await b.until("response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    await b.close()
    await c.close()
    await slots_free(server)


async def test_voice_names_are_looked_up_never_joined_into_a_path(server, voice, tmp_path, caplog):
    (tmp_path / "secret.safetensors").write_bytes(b"not a voice")
    voices = Voices(voice, server.realtime.voices._files["alt"].parent)
    assert voices.names == ["default", "alt"]
    for name in ("../alt", "/etc/passwd", str(tmp_path / "secret"), "alt/../alt", "a\\b", "", "ALT"):
        assert voices.get(name) == ("default", voice) and not voices.known(name)
    assert voices.get("alt")[0] == "alt"
    caplog.set_level(logging.WARNING, logger="chroma_agent.serving")
    c = await session(server)
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": "../../etc/passwd"}}})
    assert (await c.recv())["type"] == "session.updated"  # never an error event: pipecat takes any as fatal
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Hi"}]})
    await c.send("response.create", response=SHORT)
    assert (await c.until("response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    assert "unknown voice '../../etc/passwd'" in caplog.text
    # a listed name is the voice the next reply speaks in (loaded from the folder then)
    assert "alt" not in server.realtime.voices._loaded
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": "alt"}}})
    await c.recv()
    await c.send("conversation.item.create", item={"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": "Again"}]})
    await c.send("response.create", response=SHORT)
    await c.until("response.done")
    assert "alt" in server.realtime.voices._loaded
    assert get(server.base, "/v1/voices")[1] == {"default": "default", "voices": ["default", "alt"]}
    await c.close()


def test_refusals_per_client_address_and_while_draining(model, voice):
    from types import SimpleNamespace

    class Engine:
        capacity = 4

        def frame_times(self):
            return None

    realtime = RealtimeServer(Engine(), voice, limits=Limits(max_sessions_per_client=1))
    ws = lambda host: SimpleNamespace(headers={}, client=SimpleNamespace(host=host))  # noqa: E731
    assert realtime._refusal(ws("10.0.0.1")) is None
    realtime.sessions[object()] = "10.0.0.1"
    assert realtime._refusal(ws("10.0.0.1"))[0] == 429
    assert realtime._refusal(ws("10.0.0.2")) is None
    realtime.draining = True
    assert realtime._refusal(ws("10.0.0.2"))[0] == 503 and realtime.health()["status"] == "draining"


# -- hostile input --

async def test_malformed_input_gets_error_events_and_the_session_goes_on(server):
    c = await session(server)
    bad = [b"\x00\x01binary", "not json", "[" * 5000 + "]" * 5000, json.dumps({"no": "type"}), "42",
           json.dumps({"type": "nope.nothing"}), json.dumps({"type": "session.update", "session": 5}),
           json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
               "type": "server_vad", "threshold": "high"}}}}}),
           json.dumps({"type": "input_audio_buffer.append", "audio": 123}),
           json.dumps({"type": "input_audio_buffer.append", "audio": "!!notbase64!!"}),
           json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}),  # 3 bytes: not whole samples
           json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.zeros(24000, np.int16))[:9_999]}),
           json.dumps({"type": "input_audio_buffer.commit"}),
           json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "god",
                                                                   "content": []}}),
           json.dumps({"type": "conversation.item.truncate", "item_id": 7, "audio_end_ms": "x"}),
           json.dumps({"type": "response.create", "response": "now"})]
    errors = 0
    for message in bad:
        await c.raw(message)
        ev = await c.recv()
        if ev["type"] == "error":
            errors += 1
            assert ev["error"]["type"] == "invalid_request_error" and ev["error"]["message"]
    assert errors == len(bad)
    too_long = json.dumps({"type": "input_audio_buffer.append", "audio": b64(np.zeros(24000 * 5 // 2, np.int16))})
    await c.raw(too_long)  # 2.5 s in one append, over this server's 2 s (and under its message size)
    assert (await c.recv())["error"]["param"] == "audio"
    await c.send("session.update", session={"type": "realtime", "instructions": "still here"})
    assert (await c.recv())["session"]["instructions"] == "still here"
    # a message over the size limit closes the websocket (1009); the server goes on
    await c.raw("x" * (300 * 1024))
    with pytest.raises(ConnectionClosed) as closed:
        await c.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    await slots_free(server)
    d = await session(server)
    await d.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.text(max_size=200), st.binary(max_size=100),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                  st.sampled_from(["type", "session", "audio", "item", "input", "output", "format",
                                                   "turn_detection", "voice", "content", "role", "id", "text",
                                                   "rate", "threshold", "instructions", "response"]) | st.text(max_size=5),
                                  inner, max_size=5), max_leaves=30).map(json.dumps)))
def test_parsers_fuzzed_raise_only_protocol_errors(data):
    try:
        ev = rp.parse_event(data)
    except rp.ProtocolError:
        return
    for part in (ev, ev.get("session"), ev.get("item")):
        try:
            rp.SessionConfig().updated(part).as_dict()
        except rp.ProtocolError:
            pass
        try:
            rp.parse_item(part, rp.PCM_FORMAT)
        except rp.ProtocolError:
            pass
        try:
            rp.decode_audio(rp.decode_base64(part if isinstance(part, str) else ev.get("audio")), rp.PCM_FORMAT)
        except rp.ProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["session.update", "input_audio_buffer.append", "conversation.item.create",
                        "conversation.item.truncate", "response.create", "response.cancel",
                        "conversation.item.delete", "input_audio_buffer.commit"]),
       st.dictionaries(st.sampled_from(["session", "audio", "item", "item_id", "audio_end_ms", "response",
                                        "content_index", "response_id"]),
                       st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3)
                       | st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=5), max_size=3),
                       max_size=4))
def test_session_handlers_fuzzed_answer_with_events_not_exceptions(kind, payload):
    """Each handler on a session with a fake socket: wrong field types are ProtocolErrors."""
    from chroma_agent.serving.realtime_session import HANDLERS, Session

    class Socket:
        sent: list = []

        async def send_text(self, text):
            self.sent.append(json.loads(text))

    class Server:
        voices = Voices(object())
        limits, system_prompt, max_frames, engine = Limits(), "", 6, None

    async def run():
        s = Session(Server(), Socket(), "test")
        try:
            await HANDLERS[kind](s, {"type": kind, **payload})
        except rp.ProtocolError:
            pass
        for task in list(s.tasks):  # a response needs an engine: here it fails alone, as a failed reply
            await asyncio.wait_for(task, 5)

    asyncio.run(run())


def test_cli_checks_before_loading_the_model(voice, tmp_path, capsys):
    from chroma_agent.cli import main

    path = voice.save(tmp_path / "v.voice.safetensors")
    assert main(["serve", "realtime", "--voice", str(path), "--voices", str(tmp_path / "missing")]) == 2
    assert "--voices" in capsys.readouterr().err
    assert main(["serve", "realtime", "--voices", str(tmp_path)]) == 2  # no voice at all
