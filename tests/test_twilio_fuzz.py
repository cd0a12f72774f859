"""Fuzzing the phone server's Twilio message handling (`SafeTwilioSerializer.deserialize`)
with hypothesis: whatever a caller sends, a message gives a frame or is dropped, never an
exception (one would end the call's receive loop, and the call), each kind of fault is
logged once per call, and well-formed audio still comes through whole."""
from __future__ import annotations

import asyncio
import base64
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("pipecat")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from loguru import logger  # noqa: E402
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame  # noqa: E402
from pipecat.serializers.twilio import TwilioFrameSerializer  # noqa: E402

from pipecat_chroma.twilio_server import MAX_MEDIA_BYTES, SafeTwilioSerializer  # noqa: E402

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EVENTS = ["connected", "start", "media", "dtmf", "mark", "stop", "clear", "", "MEDIA"]
KINDS = {"binary frame", "not JSON", "not a Twilio event (a JSON object with a string 'event')",
         "media without a payload string", f"media payload over {MAX_MEDIA_BYTES} bytes",
         "media payload that is not base64", "audio arriving faster than real time (over 2 s ahead)",
         "dtmf without a keypad digit", "unknown event"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
payloads = (st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode())        # valid audio
            | st.binary(min_size=1, max_size=300).map(lambda b: base64.b64encode(b).decode()[:-1])  # wrong length
            | st.text(max_size=40) | json_values)
twilio_like = st.fixed_dictionaries(
    {"event": st.sampled_from(EVENTS) | json_values},
    optional={"media": st.fixed_dictionaries({}, optional={"payload": payloads, "track": json_values}) | json_values,
              "dtmf": st.fixed_dictionaries({}, optional={"digit": st.sampled_from(list("0123456789*#")) | json_values})
              | json_values,
              "streamSid": json_values, "sequenceNumber": json_values, "start": json_values})
messages = (
    twilio_like.map(json.dumps)
    | st.tuples(twilio_like.map(json.dumps), st.integers(0, 200)).map(lambda t: t[0][:t[1]])   # truncated
    | st.integers(1, 5000).map(lambda n: '{"event": "media", "media": ' * n)                  # deeply nested
    | st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)
    | json_values.map(json.dumps)
    | st.text(max_size=200)
    | st.binary(max_size=200)
)


def _serializer(stops: list | None = None) -> SafeTwilioSerializer:
    serializer = SafeTwilioSerializer(stream_sid="MZfuzz", call_sid="CAfuzz",
                                      params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
                                      on_stop=(lambda: stops.append(1)) if stops is not None else None)
    asyncio.run(serializer.setup(SimpleNamespace(audio_in_sample_rate=16000)))
    return serializer


def _check(frame, message) -> None:
    assert frame is None or isinstance(frame, (InputAudioRawFrame, InputDTMFFrame)), (frame, message)
    if isinstance(frame, InputAudioRawFrame):  # mu-law 8 kHz -> int16 16 kHz: 4 bytes per byte in
        payload = base64.b64decode(json.loads(message)["media"]["payload"])
        assert frame.sample_rate == 16000 and len(frame.audio) == 4 * len(payload)


@pytest.mark.timeout(120)
def test_no_message_raises_and_each_fault_is_logged_once_per_call():
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    serializer = _serializer()   # one call that receives every message
    loop = asyncio.new_event_loop()
    try:
        @FUZZ
        @given(st.lists(messages, min_size=1, max_size=5))
        def run(batch):
            for message in batch:
                _check(loop.run_until_complete(serializer.deserialize(message)), message)

        run()
    finally:
        loop.close()
        logger.remove(sink)
    assert set(serializer.ignored) <= KINDS, set(serializer.ignored) - KINDS   # a fixed set, whatever is sent
    ignoring = [w for w in warnings if "ignoring a message from Twilio" in w]
    assert len(ignoring) == len(serializer.ignored)   # once per kind, not once per message
    assert sum(serializer.ignored.values()) > len(ignoring)


@pytest.mark.timeout(120)
@FUZZ
@given(audio=st.binary(min_size=1, max_size=MAX_MEDIA_BYTES), extra=json_values)
def test_well_formed_audio_comes_through_whole_whatever_else_the_message_holds(audio, extra):
    serializer = _serializer()   # a fresh call: no audio ahead of real time yet
    message = json.dumps({"event": "media", "streamSid": "MZfuzz", "extra": extra,
                          "media": {"track": "inbound", "payload": base64.b64encode(audio).decode()}})
    frame = asyncio.run(serializer.deserialize(message))
    assert isinstance(frame, InputAudioRawFrame) and len(frame.audio) == 4 * len(audio)
    assert not serializer.ignored


@pytest.mark.timeout(60)
@FUZZ
@given(twilio_like)
def test_stop_ends_the_call_exactly_on_a_stop_event(message):
    stops: list = []
    serializer = _serializer(stops)
    asyncio.run(serializer.deserialize(json.dumps(message)))
    assert len(stops) == (message["event"] == "stop")


def test_over_the_limits_is_dropped():
    serializer = _serializer()
    too_big = base64.b64encode(b"\xff" * (MAX_MEDIA_BYTES + 1)).decode()
    assert asyncio.run(serializer.deserialize(json.dumps({"event": "media", "media": {"payload": too_big}}))) is None
    second = base64.b64encode(b"\xff" * 8000).decode()   # 1 s each: 2 s ahead are taken, the third is not
    frames = [asyncio.run(serializer.deserialize(json.dumps({"event": "media", "media": {"payload": second}})))
              for _ in range(3)]
    assert [f is not None for f in frames] == [True, True, False]
    assert serializer.ignored == {f"media payload over {MAX_MEDIA_BYTES} bytes": 1,
                                  "audio arriving faster than real time (over 2 s ahead)": 1}
