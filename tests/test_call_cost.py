"""benchmarks/call_cost.py and its paced stand-in engine (benchmarks/paced_engine.py) cannot
rot: the stand-in paces real conversations' frames as it says, and a smoke run (2 then 8
calls on each of `serve realtime` and `serve twilio`, a few seconds each) reports every
field per kind; the servers' thread counts are flat in the calls."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "call_cost.py"
# what every point of every kind reports (benchmarks/README.md, "Call cost")
FIELDS = ("n", "calls_connected", "calls_failed", "window_s", "replies", "cpu_ms_per_call_s", "server_cpu_cores",
          "idle_cpu_ms_per_s", "threads_idle", "threads_max", "rss_mb_idle", "rss_mb_mean", "rss_mb_per_call",
          "fds_max", "frames", "late_frames", "dropped_frames", "max_gap_ms", "server_added_ms",
          "from_speech_end_ms", "engine", "client", "machine_busy", "saturated", "over_capacity", "errors")


@pytest.fixture(scope="module")
def paced():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import paced_engine
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return paced_engine


@pytest.mark.timeout(120)
def test_paced_engine_speaks_recorded_frames_on_its_tick(model, voice, paced):
    from chroma_agent import AudioChunk, ResponseDone
    from chroma_agent.runtime.engine import CapacityError

    reply = paced.RecordedReply.record(model, voice, length=6)
    assert reply.length == 6 and 1 <= reply.source_frames <= 6
    engine = paced.PacedEngine(model, 2, reply, tick_ms=40, first_frame_ms=30)
    try:
        with engine.conversation(voice) as conv, engine.conversation(voice):
            assert isinstance(conv.reasoner, paced.NullReasoner)
            with pytest.raises(CapacityError):
                engine.conversation(voice)
            for turn in range(2):
                before, start, times, done = conv.history_tokens, time.perf_counter(), [], None
                for event in conv.respond(text="What time does the store open?"):
                    if isinstance(event, AudioChunk):
                        times.append(time.perf_counter() - start)
                        assert event.pcm.shape == (1920,) and event.pcm.dtype == np.float32
                    elif isinstance(event, ResponseDone):
                        done = event
                assert done is not None and done.stop_reason == "eos" and done.stats.frames == 6, done
                assert times[0] >= 0.030                       # the stand-in's own time to first frame
                gaps = np.diff(times)
                assert 0.030 <= float(np.median(gaps)) <= 0.060, gaps   # one frame per 40 ms tick
                assert conv.history_tokens > before            # the prompt and the reply's tokens counted
        stats = engine.stats()
        assert stats["frames_out"] == 12 and stats["capacity"] == 2
        assert stats["first_frame_late_ms"]["n"] == 2
    finally:
        engine.close()


@pytest.mark.timeout(240)
def test_smoke_on_each_server_reports_every_field_and_threads_stay_flat(tiny_checkpoint, tmp_path, paced):
    # 2 then 8 calls on each of `serve realtime` and `serve twilio`: every field reported,
    # and the server process has as many threads with 8 calls as with 2 (no thread per call:
    # the worker pool is started up front, the VAD runs batched on the loop)
    out = tmp_path / "call_cost.json"
    cmd = [sys.executable, str(SCRIPT), "--kinds", "realtime,twilio", "--sweep", "2,8", "--seconds", "3",
           "--idle-s", "0.5", "--warmup-s", "0.3", "--ramp-s", "0.3", "--pause-s", "0.3", "--reply-frames", "8",
           "--model", str(tiny_checkpoint), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, cwd=REPO)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["config"]["transcripts"] == "off" and report["machine"]["cores"] >= 1
    assert set(report["kinds"]) == {"realtime", "twilio"}
    for kind, data in report["kinds"].items():
        assert [p["n"] for p in data["points"]] == [2, 8], (kind, data["points"])
        for point in data["points"]:
            assert "error" not in point, (kind, point)
            missing = [f for f in FIELDS if f not in point]
            assert not missing, (kind, missing)
            n = point["n"]
            assert point["calls_connected"] == n and point["calls_failed"] == 0, (kind, point)
            assert point["replies"] >= 1 and point["frames"] >= 8, (kind, point)
            assert point["cpu_ms_per_call_s"] > 0 and point["threads_max"] >= point["threads_idle"] > 0
            assert point["server_added_ms"] is not None and point["server_added_ms"]["n"] >= 1, (kind, point)
            assert point["engine"]["tick_period_ms"] is not None, (kind, point)
            assert point["exit_code"] == 0, (kind, point)
        two, eight = data["points"]
        assert eight["threads_max"] <= two["threads_max"] + 1, (kind, two["threads_max"], eight["threads_max"])


@pytest.mark.timeout(90)
def test_smoke_livekit_sessions_report_every_field(tiny_checkpoint, tmp_path):
    pytest.importorskip("livekit.agents")
    out = tmp_path / "call_cost.json"
    cmd = [sys.executable, str(SCRIPT), "--kinds", "livekit", "--sweep", "2", "--seconds", "3", "--idle-s", "0.5",
           "--warmup-s", "0.3", "--ramp-s", "0.3", "--pause-s", "0.3", "--reply-frames", "8",
           "--model", str(tiny_checkpoint), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, cwd=REPO)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-5000:]
    (point,) = json.loads(out.read_text())["kinds"]["livekit"]["points"]
    assert "error" not in point and not [f for f in FIELDS if f not in point], point
    assert point["calls_connected"] == 2 and point["calls_failed"] == 0 and point["replies"] >= 1, point
    assert point["server_added_ms"] is not None and point["exit_code"] == 0, point
