"""benchmarks/gpu_check.py cannot rot: its `--smoke` run (CPU, tiny sizes) runs every step and
each produces its figures; without CUDA and without --smoke it stops at once with status 2."""
import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.timeout(60)
def test_without_cuda_it_stops_at_once():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # no GPU, even on a machine with one
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=50, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--smoke" in proc.stderr
    assert time.monotonic() - start < 45


@pytest.mark.timeout(280)
def test_smoke_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
                           "--speech-cache", str(tmp_path / "speech")],
                          capture_output=True, text=True, timeout=270, cwd=REPO)
    report = json.loads(out.read_text()) if out.is_file() else None
    assert report is not None, proc.stdout[-5000:] + proc.stderr[-5000:]
    steps = report["steps"]
    assert list(steps) == ["tiny_checkpoint", "golden", "streaming", "engine", "realtime"]
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step.get("error"), step.get("log_tail"))
    assert proc.returncode == 0 and report["all_ok"], proc.stdout[-3000:]

    golden = steps["golden"]["figures"]["float32"]   # the CPU in float32: the stored values exactly
    assert golden["cases"] == 4 and golden["codes_equal"] == 4 and golden["thinker_tokens_equal"] == 4
    assert golden["frame_step_codes_equal"] == golden["frame_step_cases"] == 3
    assert golden["max_audio_head_abs_diff"] < 1e-4

    streaming = steps["streaming"]["figures"]
    for side in ("ours", "baseline"):
        s = streaming[side]
        assert s["ttfa_p50_ms"] > 0 and 0 < s["frame_p50_ms"] <= s["frame_p99_ms"], (side, s)
    assert streaming["verification"]["codes_equal"]

    engine = steps["engine"]["figures"]
    assert [r["conversations"] for r in engine["rows"]] == [1, 2]
    for row in engine["rows"]:
        assert "error" not in row and "refused" not in row, row
        assert row["full_width_ticks"] > 0 and 0 < row["tick_p50_ms"] <= row["tick_p99_ms"], row
        assert isinstance(row["real_time"], bool)
    assert engine["calls_kept_in_real_time"] in (0, 1, 2)

    (row,) = steps["realtime"]["figures"]["rows"]
    assert row["sessions"] == 2 and row["turns_timed"] == 2 and row["refused"] == 0 and row["failures"] == 0, row
    for key in ("ttfa_ms", "after_stop_ms", "engine_ttfa_ms", "overhead_ms"):
        assert row[key]["n"] == 2 and row[key]["p50"] <= row[key]["p95"], (key, row)
    for key in ("ttfa_ms", "after_stop_ms", "engine_ttfa_ms"):   # the overhead, a difference, may be ~0 or below
        assert row[key]["p50"] > 0, (key, row)

    table = report["table_markdown"]
    assert table in proc.stdout and "| step | setting | figure | value |" in table
    for name in steps:
        assert f"| {name} |" in table
    assert report["wall_s"] < 180, f"the smoke run took {report['wall_s']:.0f} s (target: under 3 minutes)"
