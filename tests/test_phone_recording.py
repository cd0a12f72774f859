"""Call recordings (`pipecat_chroma.phone.recording.CallRecording`), in process, with a fake
clock (exact and fast) and one short run in real time: known tones fed as a phone server's
serializer taps them (the caller's 20 ms packets as they arrive, the agent's 80 ms chunks as
Pipecat's output transport writes them, at twice real time) land on the right channel at
the right time; a pause is silence; a barge-in cuts what the carrier had buffered; the
metadata; safe file names for hostile call ids; memory that does not grow with the call;
a WAV readable mid-call; the length cap; close twice."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import stat
import time
import wave
from datetime import datetime

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pipecat")
from pipecat_chroma.phone import recording  # noqa: E402
from pipecat_chroma.phone.recording import INTERRUPT, CallRecording, prepare_record_dir  # noqa: E402

RATE = 16000
AMP = 8000
TOL_S = 0.02           # the bound on alignment
LEVEL = AMP // 4       # a sample louder than this is the tone, not silence or filter ringing


class Clock:
    """A fake time.monotonic: the test sets `t`."""

    def __init__(self, t: float = 5000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def tone(freq: float, seconds: float, rate: int) -> bytes:
    t = np.arange(int(round(seconds * rate))) / rate
    return (AMP * np.sin(2 * np.pi * freq * t)).astype(np.int16).tobytes()


def silence(seconds: float, rate: int) -> bytes:
    return bytes(2 * int(round(seconds * rate)))


def caller_packets(pcm: bytes, rate: int, start: float, jitter: float = 0.0, seed: int = 0):
    """The caller's 20 ms packets of `pcm`, spoken from `start`: each arrives when its last
    sample was spoken (plus up to `jitter` s of scheduling noise, in order)."""
    rng = random.Random(seed)
    size = 2 * rate // 50
    events, last = [], 0.0
    for k in range(0, len(pcm) // size):
        last = max(last, start + (k + 1) * 0.02 + rng.uniform(0, jitter))
        events.append((last, "caller", pcm[k * size:(k + 1) * size], rate))
    return events


def agent_chunks(pcm: bytes, rate: int, start: float):
    """The agent's 80 ms chunks of `pcm` as Pipecat's websocket output transport writes
    them from `start`: one every 40 ms (it paces at twice real time)."""
    size = 2 * rate * 80 // 1000
    return [(start + j * 0.04, "agent", pcm[i:i + size], rate)
            for j, i in enumerate(range(0, len(pcm), size))]


async def feed(rec: CallRecording, clock: Clock, events, after_each=None) -> None:
    """Feed `events` (time since the call's start, side, pcm, rate) at their times, the
    writer thread given its turn every simulated half second as it has in real time;
    `after_each(at)` after each event."""
    settled = 0.0
    for at, side, pcm, rate in sorted(events, key=lambda e: e[0]):
        clock.t = rec.started + at
        rec.tap(side, pcm, rate)
        if at - settled >= 0.5:
            await rec.settle()
            settled = at
        if after_each is not None:
            after_each(at)


async def play(rec: CallRecording, clock: Clock, events, until: float, metadata=None):
    """`feed` the events, then close at `until`. Returns the WAV's channels (float arrays)
    and the metadata."""
    await feed(rec, clock, events)
    clock.t = rec.started + until
    path = await rec.close(metadata or {})
    audio, rate = sf.read(path, dtype="int16")
    assert rate == rec.rate and audio.shape[1] == 2
    meta = json.loads(path.with_suffix(".json").read_text())
    return audio[:, 0].astype(float), audio[:, 1].astype(float), meta


def loud(channel, rate=RATE) -> np.ndarray:
    """The times (s) of the samples that are the tone."""
    return np.flatnonzero(np.abs(channel) > LEVEL) / rate


def quiet(channel, a: float, b: float, rate=RATE) -> bool:
    """No tone between a and b seconds (filter ringing aside)."""
    return not np.any(np.abs(channel[int(a * rate):int(b * rate)]) > LEVEL / 4)


def recorder(tmp_path, call_id="CA0123456789abcdef", **kwargs):
    clock = Clock()
    return CallRecording(tmp_path, call_id, clock=clock, **kwargs), clock


@pytest.mark.timeout(30, func_only=True)
async def test_caller_left_agent_right_each_at_its_time(tmp_path):
    rec, clock = recorder(tmp_path)
    caller = silence(1.0, 8000) + tone(440, 1.0, 8000) + silence(1.0, 8000)   # 8 kHz, as a carrier's
    agent = tone(1000, 0.8, 24000)                                            # the service's 24 kHz
    left, right, _ = await play(rec, clock, caller_packets(caller, 8000, 0.0) + agent_chunks(agent, 24000, 0.5), 3.0)
    assert len(left) == 3 * RATE
    on = loud(left)
    assert abs(on[0] - 1.0) <= TOL_S and abs(on[-1] - 2.0) <= TOL_S, (on[0], on[-1])
    on = loud(right)
    assert abs(on[0] - 0.5) <= TOL_S and abs(on[-1] - 1.3) <= TOL_S, (on[0], on[-1])
    assert quiet(left, 0, 0.98) and quiet(left, 2.02, 3.0)          # no cross-talk between channels
    assert quiet(right, 0, 0.48) and quiet(right, 1.32, 3.0)


@pytest.mark.timeout(30, func_only=True)
async def test_scheduling_noise_never_jitters_the_audio(tmp_path):
    rec, clock = recorder(tmp_path)
    caller = tone(440, 2.0, RATE)
    events = caller_packets(caller, RATE, 0.0, jitter=0.04, seed=1)
    left, _, _ = await play(rec, clock, events, 2.5)
    first = round((events[0][0] - 0.02) * RATE)      # the first packet ends when it arrives
    pcm = np.frombuffer(caller, np.int16)
    assert np.array_equal(left[first:first + len(pcm)], pcm)   # then back to back, sample for sample


@pytest.mark.timeout(30, func_only=True)
async def test_a_pause_is_silence_and_the_side_starts_again_at_its_time(tmp_path):
    rec, clock = recorder(tmp_path)
    events = caller_packets(tone(440, 1.0, RATE), RATE, 0.0) + caller_packets(tone(440, 0.5, RATE), RATE, 1.5)
    left, _, _ = await play(rec, clock, events, 2.5)
    assert not np.any(left[int(1.0 * RATE) + 1:int(1.5 * RATE)])      # nothing was sent: digital silence
    on = loud(left)
    resumed = on[on > 1.2][0]
    assert abs(resumed - 1.5) <= TOL_S and abs(on[-1] - 2.0) <= TOL_S


@pytest.mark.timeout(30, func_only=True)
async def test_a_barge_in_cuts_the_agent_where_the_caller_stopped_hearing_it(tmp_path):
    rec, clock = recorder(tmp_path)
    reply = agent_chunks(tone(1000, 3.0, 24000), 24000, 0.5)      # written by 2.0 s, plays to 3.5 s
    cut_at = 1.2
    written = [e for e in reply if e[0] < cut_at]                 # the transport stops writing
    assert len(written) * 0.08 > 1.4                              # 0.5 .. 1.94 s written, 1.2 s heard
    events = written + [(cut_at, INTERRUPT, b"", 0)]
    events += agent_chunks(tone(1000, 0.5, 24000), 24000, 2.5)    # the next reply
    _, right, meta = await play(rec, clock, events, 4.0)
    on = loud(right)
    assert abs(on[0] - 0.5) <= TOL_S
    first = on[on < 2.0]
    assert abs(first[-1] - cut_at) <= TOL_S, first[-1]            # not up to the 1.94 s written
    assert quiet(right, cut_at + TOL_S, 2.48)
    second = on[on > 2.0]
    assert abs(second[0] - 2.5) <= TOL_S and abs(second[-1] - 3.0) <= TOL_S


@pytest.mark.timeout(30, func_only=True)
async def test_without_a_barge_in_the_agent_plays_out_what_was_written_ahead(tmp_path):
    rec, clock = recorder(tmp_path)
    _, right, _ = await play(rec, clock, agent_chunks(tone(1000, 3.0, 24000), 24000, 0.5), 4.0)
    on = loud(right)
    assert abs(on[0] - 0.5) <= TOL_S and abs(on[-1] - 3.5) <= TOL_S
    assert np.all(np.diff(on) < 0.005)                            # one unbroken reply


@pytest.mark.timeout(30, func_only=True)
async def test_the_metadata(tmp_path):
    rec, clock = recorder(tmp_path)
    events = caller_packets(tone(440, 2.0, RATE), RATE, 0.0) + agent_chunks(tone(1000, 0.8, 24000), 24000, 0.5)
    wall = time.time()
    _, _, meta = await play(rec, clock, events, 2.5, {"provider": "twilio", "direction": "inbound",
                                                       "call_id": "not this one", "rate": 1})
    assert meta["provider"] == "twilio" and meta["direction"] == "inbound"
    assert meta["call_id"] == "CA0123456789abcdef"                # the recording's own fields win
    assert meta["rate"] == RATE and meta["channels"] == 2 and meta["channel_layout"] == ["caller", "agent"]
    assert meta["duration_s"] == 2.5 and meta["complete"] is True and meta["truncated"] is False
    assert meta["sides"] == {"caller": {"packets": 100, "samples": 2 * RATE},
                             "agent": {"packets": 10, "samples": int(0.8 * RATE)}}
    assert meta["dropped_packets"] == 0 and meta["max_seconds"] == recording.MAX_SECONDS
    assert meta["file"] == rec.path.name and "error" not in meta
    started = datetime.fromisoformat(meta["started_at"]).timestamp()
    assert abs(started - wall) < 5
    assert datetime.fromisoformat(meta["ended_at"]).timestamp() - started == pytest.approx(2.5, abs=0.002)
    for path in (rec.path, rec.path.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.timeout(30, func_only=True)
async def test_hostile_call_ids_never_reach_a_path(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    hostile = ["../../etc/passwd", "a/b\\c", "/abs/x", "..", "x" * 10_000, "\x00\n\x1b[2J", "CA1"]
    paths = []
    for call_id in hostile + ["CA1"]:                      # the same id twice: a second file
        rec, clock = recorder(folder, call_id)
        rec.tap("caller", tone(440, 0.02, RATE), RATE)
        paths.append(await rec.close({}))
        meta = json.loads(paths[-1].with_suffix(".json").read_text())
        assert meta["call_id"] == call_id[:recording.CALL_ID_CHARS]
    assert {p.parent for p in paths} == {folder}
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{10}(-\d+)?\.wav", p.name), p.name
    assert sorted(os.listdir(tmp_path)) == ["rec"]
    assert len(os.listdir(folder)) == 2 * len(paths)     # a WAV and a JSON each, nothing else


@pytest.mark.timeout(60, func_only=True)
async def test_memory_stays_bounded_and_the_file_is_valid_mid_call(tmp_path):
    rec, clock = recorder(tmp_path)
    minutes = 5
    peaks = []
    events = caller_packets(tone(440, 60 * minutes, RATE), RATE, 0.0)
    for start in range(2, 60 * minutes - 10, 10):            # a 5 s reply every 10 s
        events += agent_chunks(tone(1000, 5.0, 24000), 24000, start)

    def watch(at: float) -> None:
        peaks.append((at, rec.buffered_bytes))
        if len(peaks) == 1000 * 60 * minutes // 20 // 2:     # half way: the WAV so far is on disk, valid
            with wave.open(str(rec.path)) as w:
                assert w.getnchannels() == 2 and w.getframerate() == RATE
                assert w.getnframes() >= (at - 2) * RATE

    await feed(rec, clock, events, watch)
    early = max(b for at, b in peaks if at < 60)
    late = max(b for at, b in peaks if at >= 60)
    assert late <= 1.5 * early and early < 1_500_000, (early, late)   # ~4 s around now, not the call
    clock.t = rec.started + 60 * minutes
    path = await rec.close({})
    assert sf.info(path).frames == 60 * minutes * RATE
    assert rec.buffered_bytes == 0


@pytest.mark.timeout(30, func_only=True)
async def test_a_recording_stops_at_its_cap_and_says_so(tmp_path):
    rec, clock = recorder(tmp_path, max_seconds=2)
    left, _, meta = await play(rec, clock, caller_packets(tone(440, 3.0, RATE), RATE, 0.0), 3.0)
    assert len(left) == 2 * RATE and meta["truncated"] is True and meta["duration_s"] == 2.0


@pytest.mark.timeout(30, func_only=True)
async def test_close_is_idempotent(tmp_path):
    rec, clock = recorder(tmp_path)
    for at, side, pcm, rate in caller_packets(tone(440, 0.5, RATE), RATE, 0.0):
        clock.t = rec.started + at
        rec.tap(side, pcm, rate)
    clock.t += 0.1
    first, second = await asyncio.gather(rec.close({"n": 1}), rec.close({"n": 2}))
    rec.tap("caller", tone(440, 0.5, RATE), RATE)          # after the end: ignored
    assert await rec.close({"n": 3}) == first == second
    assert sorted(os.listdir(tmp_path)) == sorted([first.name, first.with_suffix(".json").name])
    assert json.loads(first.with_suffix(".json").read_text())["n"] == 1
    assert sf.info(first).frames == int(0.6 * RATE)


@pytest.mark.timeout(30, func_only=True)
async def test_bad_taps(tmp_path):
    rec, clock = recorder(tmp_path)
    with pytest.raises(ValueError):
        rec.tap("nobody", b"\x00\x00", RATE)
    rec.tap("caller", b"", RATE)
    rec.tap("caller", b"\x01", RATE)                      # not a whole sample
    rec.tap("agent", b"\x00" * 640, 10**9)                # no such rate
    rec.interrupt()                                       # nothing to cut
    clock.t += 1.0
    path = await rec.close({})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["dropped_packets"] == 3 and meta["duration_s"] == 1.0


@pytest.mark.timeout(30, func_only=True)
async def test_a_folder_that_goes_away_fails_the_recording_not_the_call(tmp_path):
    folder = tmp_path / "gone"
    rec = CallRecording(folder, "CA1")                    # never made
    rec.tap("caller", tone(440, 0.02, RATE), RATE)
    path = await asyncio.wait_for(rec.close({}), 10)
    assert rec.error and not path.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--record"):
        prepare_record_dir(tmp_path / "file" / "x")
    assert stat.S_IMODE(prepare_record_dir(tmp_path / "new").stat().st_mode) == 0o700


@pytest.mark.timeout(30, func_only=True)
async def test_in_real_time(tmp_path):
    """The default clock: packets paced by the event loop land where their arrival says."""
    started = time.monotonic()
    rec = CallRecording(tmp_path, "CA1", started=started)
    packet = 2 * RATE // 50
    pcm = silence(0.2, RATE) + tone(440, 0.4, RATE)
    arrived = []
    for k in range(len(pcm) // packet):
        await asyncio.sleep(max(0.0, started + (k + 1) * 0.02 - time.monotonic()))
        arrived.append(time.monotonic() - started)
        rec.tap("caller", pcm[k * packet:(k + 1) * packet], RATE)
    path = await rec.close({})
    left = sf.read(path, dtype="int16")[0][:, 0].astype(float)
    onset = loud(left)[0]
    nominal = arrived[0] - 0.02 + 0.2              # the first packet's place, then back to back
    # ... unless the loop stalled over GAP_S: then a packet starts again where it arrived
    latest = max(arrived[k] - 0.02 + (10 - k) * 0.02 for k in range(11))
    assert nominal - TOL_S <= onset <= latest + TOL_S, (onset, nominal, latest)


def test_the_tap_side_for_a_barge_in_is_the_serializers():
    from pipecat_chroma.phone import media

    assert media.INTERRUPT == INTERRUPT
