"""`chroma-agent serve phone`: the provider-agnostic phone server (pipecat_chroma.phone).

- the real `chroma-agent serve phone --provider twilio` process answers a Twilio call end
  to end (`TwilioCall`, espeak-ng speech, the tiny checkpoint), as `serve twilio` does;
- an unknown provider is refused (exit 2, naming the choices) before any model loads;
- call control in-process (a PhoneServer subclass under uvicorn in a thread): the caller's
  DTMF keys reach `on_dtmf`, `say` speaks a scripted line and returns once it was heard,
  `hangup` ends the call and frees its slot, `--transfer-digit` transfers through the
  carrier and frees the slot without hanging up, an outbound call's greeting waits.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("pipecat")
from pipecat_chroma.twilio_testing import TwilioCall  # noqa: E402

from . import server_process  # noqa: E402
from .health_schema import check_health  # noqa: E402
from .test_twilio_server import ADMIN_KEY, REPLY_TIMEOUT_S, phone_speech  # noqa: E402,F401  (a fixture)

call_test = pytest.mark.timeout(120, func_only=True)


# -- the real process --

@pytest.fixture(scope="module")
def voice_file(voice, tmp_path_factory):
    path = tmp_path_factory.mktemp("phone_voice") / "tiny.voice.safetensors"
    voice.save(path)
    return path


@call_test
async def test_serve_phone_twilio_answers_a_call_end_to_end(tiny_checkpoint, voice_file, tmp_path, phone_speech):
    server = server_process.ServerProcess(
        "phone", ["--provider", "twilio", "--model", str(tiny_checkpoint), "--voice", str(voice_file),
                  "--host", "127.0.0.1", "--max-frames", "40", "--max-calls", "2"], tmp_path / "server.log",
        env={"CHROMA_AGENT_ADMIN_KEY": ADMIN_KEY}, drop_env=("TWILIO_", "CHROMA_AGENT_"))
    try:
        await asyncio.to_thread(server.wait_ready)
        health = server.health()
        check_health(health, "twilio")
        assert health["max_calls"] == 2 and health["signatures"] is False
        form = urllib.parse.urlencode({"CallSid": "CA1"}).encode()
        with urllib.request.urlopen(urllib.request.Request(server.base + "/twiml", data=form), timeout=5) as r:
            assert f'<Connect><Stream url="wss://127.0.0.1:{server.port}/ws"/>' in r.read().decode()
        async with TwilioCall(f"ws://127.0.0.1:{server.port}/ws") as call:
            # the call's pipeline running first (its conversation open): a question asked while it
            # still starts (a cold server warms its engine) comes as a burst and is partly lost
            deadline = time.monotonic() + 60
            while server.health()["engine"]["conversations"] < 1:
                assert time.monotonic() < deadline, "the call's pipeline did not start"
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            spoken = await call.say(*phone_speech["question"])
            _, reply = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
            assert reply["streamSid"] == call.stream_sid
            await call.stop()
            await asyncio.wait_for(call.closed.wait(), 10)
        deadline = time.monotonic() + 10
        while server.health()["active_calls"]:
            assert time.monotonic() < deadline, "the call's slot was not freed"
            await asyncio.sleep(0.1)
        log = server.log.read_text()
        assert re.search(r"call [0-9a-f]{16} ended", log) and "the Twilio number's voice webhook: POST" in log
        assert call.call_sid not in log   # the carrier's call id only when the operator asks
    finally:
        server.stop()


def test_an_unknown_provider_is_refused_before_the_model_loads(tmp_path, capsys):
    from chroma_agent.cli import main
    from pipecat_chroma.phone.server import check_serve_args

    with pytest.raises(SystemExit) as exited:   # argparse: exit 2, before anything loads
        main(["serve", "phone", "--provider", "nope", "--model", str(tmp_path / "no-model"), "--voice", "x"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'twilio', 'telnyx', 'plivo', 'exotel', 'vonage'" in err
    with pytest.raises(ValueError, match="choose one of twilio, telnyx, plivo, exotel, vonage"):
        check_serve_args(provider="nope")
    for bad, match in ((dict(transfer_to="5550100"), "E.164"), (dict(transfer_to="+15105550100", transfer_digit="x"),
                       "one key"), (dict(transfer_digit="1"), "needs --transfer-to"),
                       (dict(voicemail_message=" "), "is empty")):
        with pytest.raises(ValueError, match=match):
            check_serve_args(provider="twilio", **bad)


def test_serve_phone_hands_every_option_over(tiny_checkpoint, voice_file, tmp_path, monkeypatch):
    """The CLI side: the module's `serve` gets each option, the API key from
    $CHROMA_AGENT_PHONE_API_KEY (not the realtime server's variable)."""
    import sys
    import types

    from chroma_agent.cli import main

    calls = []
    plugin = types.ModuleType("pipecat_chroma.phone.server")
    plugin.serve = lambda **kwargs: calls.append(kwargs)
    plugin.check_serve_args = lambda **kwargs: calls.append(("checked", kwargs))
    monkeypatch.setitem(sys.modules, "pipecat_chroma.phone.server", plugin)
    monkeypatch.setenv("CHROMA_AGENT_PHONE_API_KEY", "phone-key")
    monkeypatch.setenv("CHROMA_AGENT_API_KEY", "realtime-key")
    assert main(["serve", "phone", "--provider", "telnyx", "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--voice", str(voice_file), "--record", str(tmp_path / "rec"), "--transfer-to", "+15105550123",
                 "--transfer-digit", "#", "--voicemail-message", "Call us back.", "--greeting", "Hi!"]) == 0
    (checked, options), served = calls
    assert checked == "checked" and options == {k: v for k, v in served.items() if k not in ("model", "voice")}
    assert options == {"provider": "telnyx", "host": "0.0.0.0", "port": 8765, "system_prompt": None, "max_frames": None,
                       "public_url": None, "media_timeout_s": None, "max_calls": None, "greeting": "Hi!",
                       "drain_seconds": 30, "record_dir": str(tmp_path / "rec"), "transfer_to": "+15105550123",
                       "transfer_digit": "#", "voicemail_message": "Call us back.", "api_key": "phone-key"}


def test_the_cli_names_each_carriers_routes():
    """`serve phone --help` (static, no framework loaded) says what each carrier class serves."""
    import importlib

    from chroma_agent.cli_serve import PHONE_ROUTES
    from pipecat_chroma.phone.carrier import PROVIDERS

    assert list(PHONE_ROUTES) == list(PROVIDERS)
    for name, (hook, stream) in PHONE_ROUTES.items():
        carrier = importlib.import_module(f"pipecat_chroma.phone.{PROVIDERS[name]}").CARRIER
        assert carrier.stream_path == stream, name
        if carrier.webhook_path is None:
            assert hook.startswith("none"), name
        else:
            assert hook.endswith(" " + carrier.webhook_path) and all(m in hook for m in carrier.webhook_methods), name


# -- call control, in-process --

class Transfers:
    """A carrier stand-in's REST API: records transfers and hang-ups instead of calling Twilio."""

    def __init__(self):
        self.transferred, self.hung_up = [], []


@pytest.fixture(scope="module")
def controlled(model, voice, tmp_path_factory):
    """A PhoneServer subclass under uvicorn in its own thread: key 1 says a line, key 9
    hangs up, key 0 (--transfer-digit) transfers to +15105550123; every key is recorded,
    every call too (`record_dir`)."""
    from chroma_agent.runtime.engine import ChromaEngine
    from pipecat_chroma.phone.server import PhoneServer
    from pipecat_chroma.phone.twilio import TwilioCarrier

    rest = Transfers()

    class Carrier(TwilioCarrier):
        async def transfer(self, start, number):
            rest.transferred.append((start.call_id, number))

        async def hangup(self, start):
            rest.hung_up.append(start.call_id)

    class Controlled(PhoneServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.keys, self.said, self.events = [], [], threading.Event()

        async def on_dtmf(self, call, digit):
            self.keys.append((call.record.call_sid, digit))
            if digit == "1":
                spoken = await self.say(call, "Thanks for calling.", timeout=REPLY_TIMEOUT_S)
                self.said.append((spoken, time.time()))
            elif digit == "9":
                await self.hangup(call)
            else:
                await super().on_dtmf(call, digit)
            self.events.set()

    engine = ChromaEngine(model, max_conversations=2)
    phone = Controlled(engine, voice, carrier=Carrier(env={}), max_calls=2, max_frames=25,
                       transfer_to="+15105550123", transfer_digit="0",
                       record_dir=tmp_path_factory.mktemp("recordings"))
    running = server_process.AppThread(phone.app()).start()
    yield phone, rest, f"ws://127.0.0.1:{running.port}/ws"
    running.stop()
    engine.close()


async def _running(phone, call_sid: str, timeout: float = 30) -> None:
    """Until the call's pipeline runs (its worker exists) and has heard a moment of the line."""
    deadline = time.monotonic() + timeout
    while not any(c.worker is not None and c.record.call_sid == call_sid for c in list(phone.active.values())):
        assert time.monotonic() < deadline, "the call's pipeline did not start"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def _dtmf(call: TwilioCall, digit: str) -> dict:
    return {"event": "dtmf", "streamSid": call.stream_sid, "sequenceNumber": "9", "dtmf": {"track": "inbound_track",
                                                                                          "digit": digit}}


@call_test
async def test_dtmf_keys_reach_on_dtmf_and_say_speaks(controlled):
    phone, _, url = controlled
    async with TwilioCall(url) as call:
        await _running(phone, call.call_sid)
        for digit in "5#":
            await call.send(_dtmf(call, digit))
        await _until(lambda: [d for s, d in phone.keys if s == call.call_sid] == ["5", "#"], 10, "keys not handled")
        assert not call.media()   # nothing said yet

        pressed = time.time()
        await call.send(_dtmf(call, "1"))
        _, line = await call.next_media(after=pressed, timeout=REPLY_TIMEOUT_S)   # the scripted line plays
        assert line["streamSid"] == call.stream_sid
        await _until(lambda: phone.said, REPLY_TIMEOUT_S, "say() did not return")
        (spoken, returned), = phone.said
        assert spoken is True
        await call.until_quiet(timeout=REPLY_TIMEOUT_S)
        assert max(t for t, _ in call.media()) < returned   # it returned once the line had played out
        await call.stop()
    await _until(lambda: not phone.active, 10, "the call's slot was not freed")
    # the call's recording hook: a WAV and its JSON, which names the call (the file name never does)
    import json

    recorded = [json.loads(p.read_text()) for p in phone.record_dir.glob("*.json")]
    assert [r for r in recorded if call.call_sid in json.dumps(r)], recorded
    assert not [p for p in phone.record_dir.iterdir() if call.call_sid in p.name]
    assert list(phone.record_dir.glob("*.wav"))


@call_test
async def test_hangup_ends_the_call_and_frees_its_slot(controlled):
    phone, rest, url = controlled
    async with TwilioCall(url) as call:
        await _running(phone, call.call_sid)
        assert len(phone.active) == 1
        await call.send(_dtmf(call, "9"))
        await asyncio.wait_for(call.closed.wait(), 15)   # the server closed the stream
    await _until(lambda: not phone.active, 10, "the hung-up call's slot was not freed")
    assert rest.hung_up == [call.call_sid]
    record = next(r for r in phone.finished if r.call_sid == call.call_sid)
    assert record.ended is not None and not record.transferred_to


@call_test
async def test_the_transfer_digit_transfers_through_the_carrier_and_frees_the_slot(controlled):
    phone, rest, url = controlled
    async with TwilioCall(url) as call:
        await _running(phone, call.call_sid)
        await call.send(_dtmf(call, "0"))
        await asyncio.wait_for(call.closed.wait(), 15)
    await _until(lambda: not phone.active, 10, "the transferred call's slot was not freed")
    assert (call.call_sid, "+15105550123") in rest.transferred
    assert call.call_sid not in rest.hung_up   # the person and the caller stay connected
    record = next(r for r in phone.finished if r.call_sid == call.call_sid)
    assert record.transferred_to is True and record.as_dict()["transferred_to"] is True
    assert phone.call_metrics()["transferred"] >= 1 and "+1510" not in str(phone.call_metrics(per_call=True))


@pytest.mark.timeout(30)
async def test_an_outbound_calls_greeting_waits_for_the_callee_or_a_pause():
    from pipecat.frames.frames import TTSSpeakFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame
    from pipecat.tests.utils import SleepFrame, run_test

    from pipecat_chroma.phone.greeting import HeldGreeting

    # the callee says "Hello?": that turn is not answered by the model, the greeting is said
    down, _ = await asyncio.wait_for(run_test(HeldGreeting("Hi, this is the bakery.", pause_s=5), frames_to_send=[
        UserStartedSpeakingFrame(), SleepFrame(0.1), UserStoppedSpeakingFrame(), SleepFrame(0.1),
        UserStartedSpeakingFrame(), UserStoppedSpeakingFrame()]), 20)   # later turns pass
    assert [type(f) for f in down] == [TTSSpeakFrame, UserStartedSpeakingFrame, UserStoppedSpeakingFrame]
    assert down[0].text == "Hi, this is the bakery."
    # a callee who says nothing hears it after the pause, not before
    down, _ = await asyncio.wait_for(run_test(HeldGreeting("Hi.", pause_s=0.5), frames_to_send=[SleepFrame(0.2)]), 20)
    assert down == []   # 0.2 s: still held
    down, _ = await asyncio.wait_for(run_test(HeldGreeting("Hi.", pause_s=0.3), frames_to_send=[SleepFrame(0.8)]), 20)
    assert [type(f) for f in down] == [TTSSpeakFrame]


@call_test
async def test_an_outbound_call_is_marked_and_greeted(controlled):
    phone, _, url = controlled

    async def mark_outbound(call):
        call.outbound = True

    phone.greeting = "Hello, this is the bakery."
    phone.call_started_hooks.append(mark_outbound)
    try:
        async with TwilioCall(url) as call:
            _, greeting = await call.next_media(timeout=REPLY_TIMEOUT_S)   # the callee said nothing
            assert greeting["streamSid"] == call.stream_sid
            await call.stop()
        await _until(lambda: not phone.active, 10, "the call's slot was not freed")
        record = next(r for r in phone.finished if r.call_sid == call.call_sid)
        assert record.direction == "outbound" and record.provider == "twilio"
    finally:
        phone.call_started_hooks.remove(mark_outbound)
        phone.greeting = None
