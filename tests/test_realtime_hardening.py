"""The Realtime server's bounds against the real `chroma-agent serve realtime` process: token
budgets of instructions and text, per-session item and pending caps, audio ahead of real
time, idle and maximum-length timeouts, log lines that escape client strings, and protocol
fidelity (a GA voice object, out-of-band replies, usage's audio tokens, the 401 body).
Each attack runs beside a well-behaved client, whose first audio must come within its usual
time while /health stays 200. One server per module (a second, short-lived one with small
time bounds); the parser's depth check is timed in-process."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from chroma_agent.serving import realtime_protocol as rp  # noqa: E402
from chroma_agent.serving.realtime_limits import Limits  # noqa: E402
from tests.realtime_helpers import Client, ServerProcess, b64, get, speech_pcm24  # noqa: E402

KEY = "sk-hardening-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHORT = {"max_output_tokens": 6}   # 6 frames: quick on a CPU
LIMITS = Limits()                  # the server runs with the defaults
pytestmark = pytest.mark.timeout(150, func_only=True)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voice, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt_hardening")
    (d / "voices").mkdir()
    voice.save(d / "voices" / "alice.voice.safetensors")
    proc = ServerProcess(tiny_checkpoint, voice.save(d / "default.voice.safetensors"), d / "server.log",
                         "--voices", str(d / "voices"), "--max-frames", "40", "--max-calls", "4",
                         "--drain-seconds", "2", env={"CHROMA_AGENT_API_KEY": KEY})
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tokens(model):
    """A text of exactly n tokens of the model's tokenizer."""
    tokenizer = model.processor.tokenizer

    def text(n: int) -> str:
        out = "x" * n
        assert len(tokenizer(out, add_special_tokens=False)["input_ids"]) == n
        return out

    return text


async def session(url: str, manual: bool = True) -> Client:
    c = await Client.connect(url, AUTH)
    assert (await c.recv())["type"] == "session.created"
    if manual:
        await c.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        assert (await c.recv())["type"] == "session.updated"
    return c


def user_text(text: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return {**item, "id": item_id} if item_id else item


async def error_of(c: Client, timeout: float = 30.0) -> dict:
    events = await c.until("error", timeout)
    return events[-1]["error"]


async def first_audio_s(url: str) -> float:
    """A well-behaved client's turn: seconds from response.create to its first audio."""
    c = await session(url)
    try:
        await c.send("conversation.item.create", item=user_text("Hello there"))
        await c.send("response.create", response=SHORT)
        started = time.monotonic()
        await c.until("response.output_audio.delta", timeout=60)
        took = time.monotonic() - started
        assert (await c.until("response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
        return took
    finally:
        await c.close()


@pytest.fixture(scope="module")
def usual_s(server) -> float:
    """The well-behaved client's first audio on the idle server (the slower of two)."""
    return max(asyncio.run(first_audio_s(server.url)) for _ in range(2))


async def beside_a_good_client(server, usual_s: float, attack) -> None:
    """Run `attack()` with a well-behaved client beside it: its first audio within its usual
    time (generously: the CPU is shared), /health 200 after."""
    took, _ = await asyncio.gather(first_audio_s(server.url), attack())
    assert took < 3 * usual_s + 3.0, f"the good client's first audio took {took:.2f} s (usually {usual_s:.2f} s)"
    status, health = get(server.base, "/health")
    assert status == 200 and health["status"] == "ok"


# -- token budgets --

async def test_largest_instructions_answered_and_longer_ones_refused_changing_nothing(server, usual_s, tokens):
    async def attack():
        c = await session(server.url)
        largest = tokens(LIMITS.max_instructions_tokens)
        await c.send("session.update", session={"type": "realtime", "instructions": largest})
        assert (await c.recv())["session"]["instructions"] == largest
        await c.send("conversation.item.create", item=user_text("Hi"))
        await c.send("response.create", response=SHORT)
        events = await c.until("response.done", timeout=90)
        assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]["response"]["status_details"]
        assert "response.output_audio.delta" in [e["type"] for e in events]
        # one token more, with a voice change: refused whole
        over = LIMITS.max_instructions_tokens + 1
        await c.send("session.update", session={"type": "realtime", "instructions": tokens(over),
                                                "audio": {"output": {"voice": "alice"}}})
        error = await error_of(c)
        assert error["type"] == "invalid_request_error" and error["param"] == "session.instructions"
        assert f"{over - 1} tokens" in error["message"] and f"{over} tokens" in error["message"]
        await c.send("session.update", session={"type": "realtime"})
        kept = (await c.recv())["session"]
        assert kept["instructions"] == largest and kept["audio"]["output"]["voice"] == "default"
        # 1.5 MB: refused by its length, without tokenizing it
        started = time.monotonic()
        await c.send("session.update", session={"type": "realtime", "instructions": "x" * 1_500_000})
        error = await error_of(c)
        assert error["param"] == "session.instructions" and "characters" in error["message"]
        assert time.monotonic() - started < 2.0
        # a system message sets the instructions: the same budget
        await c.send("conversation.item.create", item={"type": "message", "role": "system", "content": [
            {"type": "input_text", "text": tokens(over)}]})
        error = await error_of(c)
        assert error["param"] == "item.content[0].text" and f"{over - 1} tokens" in error["message"]
        await c.close()

    await beside_a_good_client(server, usual_s, attack)


async def test_text_items_response_instructions_and_the_pending_turn_are_bounded(server, usual_s, tokens):
    async def attack():
        c = await session(server.url)
        await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "fine"}, {"type": "input_text", "text": tokens(2049)}]})
        error = await error_of(c)
        assert error["param"] == "item.content[1].text" and "2048 tokens" in error["message"]
        await c.send("response.create", response={"instructions": tokens(2049), **SHORT})
        error = await error_of(c)
        assert error["param"] == "response.instructions" and "2048 tokens" in error["message"]
        # each within its own budget, but together over what one reply may take (3072)
        await c.send("conversation.item.create", item=user_text(tokens(2000), "item_p1"))
        assert (await c.recv())["type"] == "conversation.item.added"
        await c.recv()
        await c.send("conversation.item.create", item=user_text(tokens(2000), "item_p2"))
        error = await error_of(c)
        assert error["param"] == "item.content" and "3072" in error["message"]
        await c.send("response.create", response={"instructions": tokens(1500), **SHORT})
        error = await error_of(c)
        assert error["param"] == "response.instructions" and "3072" in error["message"]
        # the session goes on: the pending 2000 tokens are answered
        await c.send("response.create", response=SHORT)
        done = (await c.until("response.done", timeout=90))[-1]["response"]
        assert done["status"] in ("completed", "incomplete") and done["usage"]["input_tokens"] >= 2000
        await c.close()

    await beside_a_good_client(server, usual_s, attack)


# -- per-session bounds --

async def test_item_count_item_bytes_and_pending_caps(server, usual_s, speech):
    async def attack():
        c = await session(server.url)
        for i in range(LIMITS.max_pending_items):   # pending inputs: the 65th is refused
            await c.send("conversation.item.create", item=user_text(f"n{i}"))
        await c.send("conversation.item.create", item=user_text("one too many"))
        events = await c.until("error")
        assert sum(e["type"] == "conversation.item.added" for e in events) == LIMITS.max_pending_items
        assert events[-1]["error"]["param"] == "item" and "64 user inputs" in events[-1]["error"]["message"]
        # items that wait for nothing (function calls) count toward the item cap: 1000 kept
        for i in range(LIMITS.max_items - LIMITS.max_pending_items):
            await c.send("conversation.item.create", item={"type": "function_call_output", "call_id": f"c{i}",
                                                           "output": "ok"})
        await c.send("conversation.item.create", item={"type": "function_call_output", "call_id": "x", "output": ""})
        events = await c.until("error")
        assert events[-1]["error"]["param"] == "item" and "1000 conversation items" in events[-1]["error"]["message"]
        await c.close()
        # bytes: big function call outputs fill the 4 MiB of kept items
        c = await session(server.url)
        big = "y" * (1024 * 1024)
        for i in range(4):
            await c.send("conversation.item.create", item={"type": "function_call_output", "call_id": f"b{i}",
                                                           "output": big})
        events = await c.until("error")
        assert sum(e["type"] == "conversation.item.added" for e in events) == 3
        assert events[-1]["error"]["param"] == "item" and "bytes" in events[-1]["error"]["message"]
        # pending bytes: 30 s spoken items (~1.9 MB each at 16 kHz float32) fill the 8 MiB of pending input
        pcm = np.tile(speech_pcm24(speech["question"], lead_s=0.1, tail_s=0.1), 10)[:24000 * 30]
        audio = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": b64(pcm)}]}
        for _ in range(5):
            await c.send("conversation.item.create", item=audio)
        events = await c.until("error", timeout=60)
        assert 3 <= sum(e["type"] == "conversation.item.added" for e in events) <= 4
        assert events[-1]["error"]["param"] == "item.content" and "bytes" in events[-1]["error"]["message"]
        await c.send("conversation.item.delete", item_id="nope")   # the session goes on
        assert (await c.recv())["error"]["code"] == "item_delete_invalid_item_id"
        await c.close()

    await beside_a_good_client(server, usual_s, attack)


async def test_audio_ahead_of_real_time_is_refused_and_not_buffered(server, usual_s, speech):
    async def attack():
        c = await session(server.url)
        pcm = np.tile(speech_pcm24(speech["question"], lead_s=0.0, tail_s=0.0), 3)[:24000 * 6]
        started = time.monotonic()
        await c.stream(pcm, chunk_ms=100)   # 6 s of speech as fast as it goes
        await c.send("input_audio_buffer.commit")
        events = await c.until("input_audio_buffer.committed")
        elapsed = time.monotonic() - started
        errors = [e["error"] for e in events if e["type"] == "error"]
        accepted = 60 - len(errors)
        assert 20 <= accepted <= 20 + elapsed * 10 + 1, (accepted, elapsed)
        assert all(e["param"] == "audio" and e["code"] == "input_audio_ahead_of_real_time" for e in errors)
        assert "2 s ahead of real time" in errors[0]["message"]
        # what was refused was not buffered: the turn the model hears is what was accepted (~25 tokens a second)
        await c.send("response.create", response=SHORT)
        heard = (await c.until("response.done"))[-1]["response"]["usage"]["input_token_details"]["audio_tokens"]
        assert 0 < heard <= 25 * accepted / 10 + 5, (heard, accepted)
        # paced again, appends are taken
        await asyncio.sleep(0.5)
        await c.stream(pcm[:2400 * 3], chunk_ms=100)
        await c.send("input_audio_buffer.clear")
        assert (await c.recv())["type"] == "input_audio_buffer.cleared"
        await c.close()

    await beside_a_good_client(server, usual_s, attack)


# -- logs --

async def test_client_strings_are_escaped_in_the_log_and_refused_upgrades_rate_limited(server):
    c = await session(server.url)
    await c.send("conversation.item.retrieve", item_id="item_x\nFORGED-LINE retrieve")
    assert (await c.recv())["error"]["code"] == "item_retrieve_invalid_item_id"
    await c.send("nope\nFORGED-LINE type")
    assert (await c.recv())["error"]["param"] == "type"
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": "v\nFORGED-LINE"}}})
    assert (await c.recv())["type"] == "session.updated"
    await c.close()
    for _ in range(25):
        with pytest.raises(InvalidStatus):
            await Client.connect(server.url, {"Authorization": "Bearer wrong"})
    await asyncio.sleep(0.5)
    lines = server.log.read_text().splitlines()
    assert not [line for line in lines if line.startswith("FORGED-LINE")]
    assert sum("\\nFORGED-LINE" in line for line in lines) >= 3   # logged, escaped
    assert 1 <= sum("refused a session" in line for line in lines) <= 11


# -- protocol fidelity --

async def test_401_body_names_the_invalid_api_key(server):
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server.url, {"Authorization": "Bearer nope"})
    assert refused.value.response.status_code == 401
    error = json.loads(refused.value.response.body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["message"]


async def test_a_voice_object_is_echoed_as_given_and_used(server):
    c = await session(server.url)
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": {"id": "alice"}}}})
    assert (await c.recv())["session"]["audio"]["output"]["voice"] == {"id": "alice"}
    await c.send("conversation.item.create", item=user_text("Hi"))
    await c.send("response.create", response=SHORT)
    events = await c.until("response.done")
    created = next(e for e in events if e["type"] == "response.created")
    assert created["response"]["audio"]["output"]["voice"] == {"id": "alice"}
    assert "response.output_audio.delta" in [e["type"] for e in events]
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": {"id": "nobody"}}}})
    assert (await c.recv())["type"] == "session.updated"   # an unknown id: the default voice, a warning
    await c.send("session.update", session={"type": "realtime", "audio": {"output": {"voice": 5}}})
    assert (await c.recv())["error"]["param"] == "session.audio.output.voice"
    await c.close()
    log = server.log.read_text()
    assert "unknown voice 'nobody'" in log and "unknown voice 'alice'" not in log


async def test_out_of_band_reply_is_answered_and_joins_no_conversation(server):
    c = await session(server.url)
    await c.send("conversation.item.create", item=user_text("What is the weather?", "item_q"))
    await c.until("conversation.item.done")
    await c.send("response.create", response={"conversation": "none", "instructions": "Say yes.",
                                              "metadata": {"topic": "side"}, **SHORT})
    events = await c.until("response.done")
    kinds = [e["type"] for e in events]
    assert "response.output_audio.delta" in kinds and "conversation.item.added" not in kinds
    assert "conversation.item.done" not in kinds
    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"topic": "side"}
    await c.send("conversation.item.retrieve", item_id=done["output"][0]["id"])
    assert (await c.recv())["error"]["code"] == "item_retrieve_invalid_item_id"
    # the pending question is still the conversation's to answer
    await c.send("response.create", response=SHORT)
    events = await c.until("response.done")
    assert "conversation.item.added" in [e["type"] for e in events]
    assert events[-1]["response"]["output"] and events[-1]["response"]["conversation_id"] == "conv_default"
    await c.close()


async def test_usage_counts_input_audio_as_audio_tokens(server, speech):
    c = await session(server.url)
    pcm = speech_pcm24(speech["question"], lead_s=0.2, tail_s=0.2)
    await c.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": b64(pcm)}]})
    await c.until("conversation.item.done")
    await c.send("response.create", response=SHORT)
    spoken = (await c.until("response.done"))[-1]["response"]["usage"]
    details = spoken["input_token_details"]
    assert details["audio_tokens"] > 10 and details["text_tokens"] > 0   # ~25 a second; the template is text
    assert details["audio_tokens"] + details["text_tokens"] == spoken["input_tokens"]
    await c.send("conversation.item.create", item=user_text("And in writing?"))
    await c.send("response.create", response=SHORT)
    typed = (await c.until("response.done"))[-1]["response"]["usage"]
    assert typed["input_token_details"]["audio_tokens"] == 0 and typed["input_tokens"] > 0
    await c.close()


# -- time bounds (a server of their own, with small values) --

async def test_idle_and_maximum_length_timeouts_end_the_session_with_an_error_first(tiny_checkpoint, voice,
                                                                                   tmp_path):
    proc = ServerProcess(tiny_checkpoint, voice.save(tmp_path / "v.voice.safetensors"), tmp_path / "server.log",
                         "--max-calls", "3", "--drain-seconds", "1",
                         env={"CHROMA_AGENT_API_KEY": KEY, "CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S": "2",
                              "CHROMA_AGENT_REALTIME_MAX_SESSION_S": "7"})
    try:
        await asyncio.to_thread(proc.wait_ready)

        async def idle() -> float:
            c = await session(proc.url)
            started = time.monotonic()
            error = await error_of(c, timeout=10)
            assert error["code"] == "idle_timeout" and "2 s" in error["message"]
            with pytest.raises(ConnectionClosed):
                await c.recv(5)
            return time.monotonic() - started

        async def busy() -> float:
            c = await session(proc.url)
            created = c.events[0]["session"]["expires_at"]
            assert abs(created - (time.time() + 7)) < 3
            started = time.monotonic()
            while True:   # an event a second: never idle
                try:
                    ev = await c.recv(1.0)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ConnectionClosed):
                        await c.send("input_audio_buffer.clear")
                    continue
                if ev["type"] == "error":
                    assert ev["error"]["code"] == "session_expired" and "7 s" in ev["error"]["message"]
                    break
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.recv(5)
            return time.monotonic() - started

        async def replying() -> None:   # while a reply plays the session is not idle; after it, it is
            c = await session(proc.url)
            await c.send("conversation.item.create", item=user_text("Tell me a story"))
            await c.send("response.create")   # up to 30 s: ended by its stop, or the session's end
            seen: dict[str, float] = {}
            while True:
                ev = await c.recv(10)
                seen.setdefault(ev["type"], time.monotonic())
                if ev["type"] == "error":
                    break
            assert "response.output_audio.delta" in seen
            if ev["error"]["code"] == "idle_timeout":   # only once the reply was over, and idle for 2 s
                assert "response.done" in seen and seen["error"] - seen["response.done"] > 1.5
            else:
                assert ev["error"]["code"] == "session_expired"

        idle_s, busy_s, _ = await asyncio.gather(idle(), busy(), replying())
        assert 1.5 < idle_s < 5.0 and 6.0 < busy_s < 10.0
        deadline = time.monotonic() + 10
        while get(proc.base, "/health")[1]["active_calls"]:
            assert time.monotonic() < deadline, "an ended session kept its slot"
            await asyncio.sleep(0.1)
        assert (await first_audio_s(proc.url)) < 30   # the slots serve again
    finally:
        await asyncio.to_thread(proc.stop)


# -- the parser --

def test_depth_check_costs_about_what_parsing_costs():
    """2 MB of brackets: the depth scan (C: regex, translate, numpy) adds at most about what
    json.loads takes (measured: +11 ms on 139 ms); the old per-character loop took +119 ms."""
    wide = json.dumps({"type": "x", "a": [[[]] for _ in range(300_000)]})
    deep = "[" * 1_000_000 + "]" * 1_000_000
    audio = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(1_500_000)).decode()})

    def best(f, n=3):
        times = []
        for _ in range(n):
            started = time.perf_counter()
            f()
            times.append(time.perf_counter() - started)
        return min(times)

    assert rp.parse_event(wide)["type"] == "x"
    assert best(lambda: rp.parse_event(wide)) < 1.35 * best(lambda: json.loads(wide)) + 0.01   # old scan: ~1.85x
    with pytest.raises(rp.ProtocolError, match="nested"):
        rp.parse_event(deep)
    assert best(lambda: pytest.raises(rp.ProtocolError, rp.parse_event, deep)) < 0.1
    assert best(lambda: rp.parse_event(audio)) < 0.02
    # brackets inside strings are not nesting
    assert rp.parse_event(json.dumps({"type": "x", "s": "[{" * 100, "t": [[1]]}))["s"] == "[{" * 100


def test_serve_options_and_environment_set_the_limits(monkeypatch):
    from chroma_agent.serving.realtime_limits import limits_for_serve

    monkeypatch.setenv("CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S", "5")
    monkeypatch.setenv("CHROMA_AGENT_REALTIME_MAX_SESSION_S", "0")   # 0: no limit
    limits = limits_for_serve(None, max_instructions_tokens=1000, max_session_s=None)
    assert (limits.idle_timeout_s, limits.max_session_s, limits.max_instructions_tokens) == (5.0, None, 1000)
    assert limits_for_serve(None, idle_timeout_s=9).idle_timeout_s == 9   # an option wins over the variable
    assert limits_for_serve(None).max_text_item_tokens == Limits().max_text_item_tokens == 2048
    monkeypatch.setenv("CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S"):
        limits_for_serve(None)
