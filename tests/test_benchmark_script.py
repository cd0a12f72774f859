"""The benchmark script keeps working (a tiny, untimed run): it checks itself that the
original-style baseline computes the same codes as the runtime, and writes its JSON."""
import json
import subprocess
import sys

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
