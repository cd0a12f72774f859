"""The phone server's Prometheus metrics and its admin-only `GET /calls`, in-process (a
`PhoneServer` with Twilio signatures on, one call at a time, its own registry, under uvicorn
in a thread) with `TwilioCall` speaking Twilio's protocol: `/metrics` parses as Prometheus
text; refused calls are counted by reason (an unsigned webhook and stream upgrade: auth; a
second call while one runs: capacity; a stream that never says `start`: invalid); after
one answered call, one call completed and each of its turns' time to first audio and end
of speech -> first audio observed (as many as its record at `/calls` has), the reply audio
sent counted in 80 ms frames, a malformed message counted by kind; `/calls` needs the
admin key (404 without one set); no label carries a sid, a number or a key. Plus the
watcher's and the outcome counts' units, without a server."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("pipecat")
from prometheus_client import CollectorRegistry  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from chroma_agent.serving import metrics as m  # noqa: E402
from pipecat_chroma.twilio_testing import TwilioCall, sign  # noqa: E402

from . import server_process  # noqa: E402
from .prometheus_samples import moved as samples_moved  # noqa: E402
from .prometheus_samples import registry_samples, scrape, value  # noqa: E402
from .test_twilio_server import REPLY_TIMEOUT_S, phone_speech  # noqa: E402,F401  (a fixture)

TOKEN, ADMIN = "metrics-twilio-token", "metrics-admin-key"
PUBLIC_URL = "https://phone.example.test"
FORM = {"CallSid": "CA" + "7" * 32, "AccountSid": "AC" + "2" * 32, "From": "+15550001111", "To": "+15550002222"}


@pytest.fixture(scope="module")
def phone(model, voice):
    """A PhoneServer (TWILIO_AUTH_TOKEN set, max_calls 1, admin key, 3 s media timeout) on its own registry."""
    from chroma_agent.runtime.engine import ChromaEngine
    from pipecat_chroma.phone.server import PhoneServer
    from pipecat_chroma.phone.twilio import TwilioCarrier

    engine = ChromaEngine(model, max_conversations=1)
    server = PhoneServer(engine, voice, carrier=TwilioCarrier(PUBLIC_URL, env={"TWILIO_AUTH_TOKEN": TOKEN}),
                         public_url=PUBLIC_URL, max_calls=1, max_frames=25, admin_key=ADMIN, media_timeout_s=3,
                         metrics=m.ServerMetrics(CollectorRegistry()))
    running = server_process.AppThread(server.app()).start()
    server.base, server.ws_url = running.base, f"ws://127.0.0.1:{running.port}/ws"
    yield server
    running.stop()
    engine.close()


def _get(base: str, path: str, key: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def post_twiml(base: str, form: dict, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(base + "/twiml", data=urllib.parse.urlencode(form).encode(), headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120, func_only=True)
async def test_one_call_and_its_refusals_move_the_metrics_and_calls_needs_the_admin_key(phone, phone_speech):
    base, signed = phone.base, {"X-Twilio-Signature": sign(TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws")}
    before = await asyncio.to_thread(scrape, base)
    assert value(before, "chroma_engine_capacity") == 1 and value(before, "chroma_calls_active") == 0
    assert value(before, "process_resident_memory_bytes") > 0
    assert (await asyncio.to_thread(post_twiml, base, FORM))[0] == 403                       # unsigned: auth
    with pytest.raises(InvalidStatus) as unsigned:                                            # auth
        await TwilioCall(phone.ws_url).connect()
    assert unsigned.value.response.status_code == 403
    async with connect(phone.ws_url, additional_headers=signed, proxy=None) as junk:          # invalid
        await junk.send("not a Twilio handshake")
        await asyncio.wait_for(junk.wait_closed(), 10)
    twiml_signature = {"X-Twilio-Signature": sign(TOKEN, f"{PUBLIC_URL}/twiml", FORM)}
    status, twiml = await asyncio.to_thread(post_twiml, base, FORM, twiml_signature)
    assert status == 200, twiml
    dialled = TwilioCall.from_twiml(twiml, call_sid=FORM["CallSid"], auth_token=TOKEN, connect_to=phone.ws_url)
    async with dialled as call:
        await _until(lambda: any(c.worker is not None for c in list(phone.active.values())), 30, "no pipeline")
        await asyncio.sleep(1.0)
        busy = await asyncio.to_thread(post_twiml, base, FORM, twiml_signature)              # capacity
        assert busy[0] == 200 and "<Stream" not in busy[1]
        with pytest.raises(InvalidStatus) as full:                                            # capacity
            await TwilioCall(phone.ws_url, headers=signed).connect()
        assert full.value.response.status_code == 503
        during = await asyncio.to_thread(scrape, base)
        assert value(during, "chroma_calls_active") == 1
        await call.send("not JSON")                                                           # an invalid message
        spoken = await call.say(*phone_speech["question"])
        await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
        await call.until_quiet(timeout=REPLY_TIMEOUT_S)
        # GET /calls: the admin's (the sids), with the admin key only
        for key in (None, "not-the-key", TOKEN):
            status, _, body = await asyncio.to_thread(_get, base, "/calls", key)
            assert status == 401 and call.call_sid not in body, (key, status)
        status, _, body = await asyncio.to_thread(_get, base, "/calls", ADMIN)
        assert status == 200 and call.call_sid in [c["call_sid"] for c in json.loads(body)["active"]]
        await call.stop()
    await _until(lambda: not phone.active, 10, "the call's slot was not freed")
    status, _, body = await asyncio.to_thread(_get, base, "/calls", ADMIN)
    [record] = [c for c in json.loads(body)["finished"] if c["call_sid"] == call.call_sid]
    phone.admin.key = None
    try:
        assert (await asyncio.to_thread(_get, base, "/calls", ADMIN))[0] == 404   # no admin key: off
    finally:
        phone.admin.key = ADMIN
    after = await asyncio.to_thread(scrape, base)

    def moved(name, **labels):
        return samples_moved(before, after, name, **labels)

    assert moved("chroma_calls_total", outcome="completed") == 1 and moved("chroma_calls_total", outcome="failed") == 0
    assert value(after, "chroma_calls_active") == 0
    assert moved("chroma_calls_refused_total", reason="auth") == 2
    assert moved("chroma_calls_refused_total", reason="capacity") == 2
    assert moved("chroma_calls_refused_total", reason="invalid") == 1
    assert moved("chroma_invalid_messages_total", kind="not_json") == 1
    answered = [t for t in record["turns"] if t["time_to_first_audio_s"] is not None]
    assert answered and moved("chroma_time_to_first_audio_seconds_count") == len(answered)
    assert moved("chroma_time_to_first_audio_seconds_sum") == pytest.approx(
        sum(t["time_to_first_audio_s"] for t in answered), abs=1e-3)
    assert moved("chroma_speech_end_to_first_audio_seconds_count") == len(answered)
    assert moved("chroma_speech_end_to_first_audio_seconds_sum") >= moved("chroma_time_to_first_audio_seconds_sum")
    assert sum(moved("chroma_turns_total", status=s) for s in m.TURN_STATUSES) == len(answered)
    # mu-law: one byte a sample, 8 kHz
    reply_s = sum(len(base64.b64decode(msg["media"]["payload"])) for _, msg in call.media()) / 8000
    assert moved("chroma_audio_frames_sent_total") == pytest.approx(reply_s / 0.08, abs=1.01)
    assert moved("chroma_engine_tick_seconds_count") >= 1
    # labels from fixed sets: no sid, no number, no key
    for (name, labels), _ in after.items():
        for label, v in labels:
            for secret in (call.call_sid, call.stream_sid, FORM["From"], FORM["To"], TOKEN, ADMIN, "not JSON"):
                assert secret not in v, (name, label, v)


def test_the_watcher_counts_turns_frames_and_cut_ins_and_outbound_outcomes_are_counted():
    from pipecat.frames.frames import (
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
        TTSAudioRawFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection

    from pipecat_chroma.phone.records import CallRecord, CallWatcher, OutcomeCounts, message_kind

    registry = CollectorRegistry()
    metrics = m.ServerMetrics(registry)
    watcher = CallWatcher(CallRecord("CA1", "MZ1"), metrics)
    down = FrameDirection.DOWNSTREAM
    audio = TTSAudioRawFrame(b"\0" * 3840, 24000, 1)

    def turn(cut_in: bool) -> None:
        for frame in (UserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time()),
                      UserStoppedSpeakingFrame(), audio, BotStartedSpeakingFrame()):
            watcher(frame, down)
        for _ in range(5):   # five 80 ms frames written at once (none late)
            watcher.written(0.08)
        if cut_in:
            watcher(UserStartedSpeakingFrame(), down)
        watcher(BotStoppedSpeakingFrame(), down)

    turn(cut_in=False)
    turn(cut_in=True)
    watcher(UserStoppedSpeakingFrame(), down)
    watcher(audio, down)
    watcher(BotStartedSpeakingFrame(), down)   # a reply still playing when the call ends
    watcher.close()
    outcomes = OutcomeCounts(metrics)
    for name in ("answered", "machine", "no-answer"):
        outcomes.setdefault(name, 0)   # what outbound.py does first
    outcomes["machine"] = outcomes.get("machine", 0) + 1
    outcomes["answered"] = outcomes.get("answered", 0) + 2
    samples = registry_samples(registry)
    assert value(samples, "chroma_turns_total", status="completed") == 1
    assert value(samples, "chroma_turns_total", status="cancelled") == 1
    assert value(samples, "chroma_turns_total", status="incomplete") == 1
    assert value(samples, "chroma_time_to_first_audio_seconds_count") == 3
    assert value(samples, "chroma_speech_end_to_first_audio_seconds_count") == 2
    assert value(samples, "chroma_audio_frames_sent_total") == 10
    assert value(samples, "chroma_outbound_calls_total", outcome="answered") == 2
    assert value(samples, "chroma_outbound_calls_total", outcome="machine") == 1
    assert ("chroma_outbound_calls_total", (("outcome", "no-answer"),)) in samples   # at 0 from the start
    assert message_kind("not JSON") == "not_json" and message_kind("unknown event") == "unknown_event"
    assert message_kind("!!!") == "other"


@pytest.mark.timeout(30)
async def test_reply_audio_written_late_or_dropped_is_counted_in_frames():
    from pipecat.frames.frames import OutputAudioRawFrame, TTSStartedFrame
    from pipecat.processors.frame_processor import FrameDirection

    from pipecat_chroma.phone.records import CallRecord, CallWatcher, meter_output

    registry = CollectorRegistry()
    watcher = CallWatcher(CallRecord("CA1", "MZ1"), m.ServerMetrics(registry))
    watcher(TTSStartedFrame(), FrameDirection.DOWNSTREAM)
    for n in range(4):                  # on time: frame n written n frames after the first
        watcher.written(0.08, at=100.0 + 0.08 * n)
    watcher.written(0.08, at=100.0 + 0.32 + 0.5)   # the model fell 0.5 s behind: late
    watcher.written(0.08, at=100.0 + 0.40 + 0.5)   # still behind the reply's clock: late
    watcher(TTSStartedFrame(), FrameDirection.DOWNSTREAM)   # the next reply has its own clock
    watcher.written(0.08, at=200.0)
    watcher.written(0.08, at=200.08)

    class Output:   # a transport whose connection goes away after two chunks
        def __init__(self):
            self.taken = 0

        async def write_audio_frame(self, frame) -> bool:
            self.taken += 1
            return self.taken <= 2

    output = Output()
    meter_output(output, watcher)
    watcher(TTSStartedFrame(), FrameDirection.DOWNSTREAM)   # a third reply, written now
    chunk = OutputAudioRawFrame(b"\0" * 2560, 16000, 1)   # 80 ms at 16 kHz
    written = [await output.write_audio_frame(chunk) for _ in range(5)]
    assert written == [True, True, False, False, False]
    watcher.close()
    samples = registry_samples(registry)
    assert value(samples, "chroma_audio_frames_sent_total") == 10
    assert value(samples, "chroma_audio_frames_late_total") == 2
    assert value(samples, "chroma_audio_frames_dropped_total") == 3
