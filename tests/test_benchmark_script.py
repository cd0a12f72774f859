"""The benchmark scripts keep working (tiny, untimed runs): bench_streaming.py checks itself
that the original-style baseline computes the same codes as the runtime, and writes its JSON;
bench_realtime.py measures a turn against the real Realtime server."""
import json
import subprocess
import sys

import pytest

from .conftest import REPO


def test_benchmark_runs_and_verifies_the_baseline(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_streaming.py"),
                           "--checkpoint", str(tiny_checkpoint), "--frames", "4", "--runs", "1",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["verification"]["codes_equal"] and result["verification"]["reasoner_tokens_equal"]
    for side in ("ours", "baseline"):
        assert result[side]["frames_per_run"] == [4]
        assert len(result[side]["frame_ms"]) == 3 and result[side]["ttfa_p50_ms"] > 0
    assert result["ours"]["ttfa_p50_ms"] < result["baseline"]["ttfa_p50_ms"]  # streaming: audio before the end


@pytest.mark.timeout(150)
def test_realtime_benchmark_runs_against_the_real_server(tiny_checkpoint, tmp_path):
    """bench_realtime.py with one session and one timed turn against `chroma-agent serve
    realtime` (~30 s): every latency it reports is there, positive and consistent."""
    out = tmp_path / "realtime.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_realtime.py"),
                           "--model", str(tiny_checkpoint), "--dtype", "float32", "--sessions", "1", "--turns", "1",
                           "--speech-cache", str(tmp_path / "speech"), "--out", str(out)],
                          capture_output=True, text=True, timeout=140, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["server"]["exit_code"] == 0 and result["server"]["log"]["error_lines"] == 0, result["server"]
    (row,) = result["results"]
    assert row["sessions"] == 1 and row["turns_timed"] == 1 and row["refused"] == 0 and not row["failures"], row
    s = row["summary_ms"]
    for key in ("ttfa_ms", "after_stop_ms", "engine_ttfa_ms", "overhead_ms", "overhead_from_eos_ms"):
        assert s[key]["n"] == 1 and 0 < s[key]["p50"] <= s[key]["p95"] < 60_000, (key, s)
    # the engine's time lies inside the server's: speech_stopped -> first delta holds it
    assert s["engine_ttfa_ms"]["p50"] < s["after_stop_ms"]["p50"]
    assert abs(s["after_stop_ms"]["p50"] - s["engine_ttfa_ms"]["p50"] - s["overhead_ms"]["p50"]) < 0.1
    (turn,) = [t for t in row["per_turn"] if not t["warmup"]]
    assert turn["status"] == "completed" and turn["reply_audio_s"] > 0, turn
    assert row["first_turn_ms"]["engine_ttfa_ms"]["n"] == 1   # the untimed warm-up turn, reported apart


@pytest.mark.timeout(300)
def test_transcripts_benchmark_compares_on_and_off(tiny_checkpoint, tmp_path):
    """bench_transcripts.py, 1 and 2 calls, one short run each way: every reply on gets its transcript."""
    out = tmp_path / "transcripts.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_transcripts.py"),
                           "--checkpoint", str(tiny_checkpoint), "--sweep", "1,2", "--runs", "1", "--frames", "6",
                           "--transcript-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["calls"] for r in rows] == [1, 2]
    for row in rows:
        assert "transcript_after_first_audio_ms_max" in row["on"] and row["on"]["transcript_after_first_audio_ms_max"] > 0
        assert "transcript_after_first_audio_ms_max" not in row["off"] and row["off"]["ttfa_ms_p95"] > 0
