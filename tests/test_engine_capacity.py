"""Engine capacity to 256 rows (issue 23): batch buckets 128 and 256, calibration up to 256
(a row count out of memory ends it; the fixed step keeps only the rows kept), the fixed
step's memory, 256 replies in one batch == each alone on both steps (ragged, and fixed
shapes as the CUDA graphs run them), and the tick-overhead benchmark's smoke run."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from chroma_agent import ChromaEngine, SamplingOptions, Voice
from chroma_agent.model.processor import ReasonerInput
from chroma_agent.model.transformer import KVCache
from chroma_agent.runtime import engine as engine_module
from chroma_agent.runtime.engine_jobs import END
from chroma_agent.runtime.frame_graph import BUCKETS, bucket
from chroma_agent.runtime.frame_step import FrameStep, fixed_step_bytes

from .conftest import REPO

ROWS = 256
FRAMES = 6          # frame 0, a reasoner step's two halves over frames 0 and 1, its pair fed at frame 2, ...
ALONE = [*range(0, ROWS, 4), ROWS - 1]   # the replies also run alone: every prompt length with both voices


def test_buckets_reach_256():
    assert BUCKETS[-1] == 256 == engine_module._MAX_CAPACITY
    assert [bucket(n) for n in (1, 3, 64, 65, 128, 129, 256, 257, 600)] == [1, 4, 64, 128, 128, 256, 256, 512, 768]


def test_fixed_step_memory_is_what_it_allocates(model):
    step = FrameStep(model, 3, fixed=True, capacity=100)
    cfg = model.config
    decoder = KVCache(cfg.decoder, cfg.num_codebooks, step.rows, model.device, model.dtype)
    tensors = step.cache.keys + step.cache.values + decoder.keys + decoder.values + [step.inputs]
    assert step.rows == 4
    assert fixed_step_bytes(cfg, 4, model.dtype, capacity=100) == sum(t.numel() * t.element_size() for t in tensors)
    # the tiny model at 256 rows, float32, its whole 2048-position context: ~2.1 GB
    assert 2.0e9 < fixed_step_bytes(cfg, ROWS, torch.float32) < 2.3e9


def test_calibration_stops_at_a_row_count_out_of_memory_and_keeps_only_the_rows_kept(model, monkeypatch):
    trial = FrameStep.trial

    def short_of_memory_at_4(self, rows, length):
        codes = trial(self, rows, length)   # grows the fixed step to 4 rows first
        if rows >= 4:
            raise torch.OutOfMemoryError("simulated")
        return codes

    monkeypatch.setattr(engine_module, "_TICK_BUDGET_S", 1e9)   # only memory limits it
    monkeypatch.setattr(FrameStep, "trial", short_of_memory_at_4)
    with ChromaEngine(model, frame_graphs=True) as engine:
        assert engine.capacity == 2
        assert engine.frame_step.fixed and engine.frame_step.rows == 2 and engine.frame_step.cache.keys[0].shape[0] == 2


def prompts_and_voices(model, n: int):
    """N prompts of five lengths (21-89 random token ids) and two random voices."""
    g = np.random.default_rng(23)
    cfg = model.config
    vocab = min(cfg.text_start_token_id, 900)
    voices = [Voice(g.integers(0, cfg.codec_vocab, (frames, cfg.num_codebooks)), "voice", tuple(g.integers(0, vocab, 9)))
              for frames in (11, 17)]
    prompts = [ReasonerInput(torch.tensor([g.integers(0, vocab, 21 + 17 * (i % 5)).tolist()])) for i in range(n)]
    return prompts, [voices[(i // 4) % 2] for i in range(n)]


def run(engine, calls) -> list[tuple[list, list]]:
    """The (prompt, voice) replies submitted on one tick (greedy, FRAMES frames): each one's
    codes and audio frames."""
    jobs = [engine.reply_frames(v, p, FRAMES, SamplingOptions(greedy=True)) for p, v in calls]
    with engine._wakeup:    # all at once: with an unbounded prefill budget they all speak from one tick on
        for job in jobs:
            engine.submit(job)
    out = []
    for job in jobs:
        assert job.finished.wait(300)
        frames = []
        while (item := job.out.get()) is not END:
            assert not isinstance(item, BaseException), item
            frames.append(item)
        out.append(([f.codes.tolist() for f in frames], [f.pcm for f in frames]))
    return out


def same(a, b) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fixed", [False, True], ids=["ragged", "fixed"])
def test_256_replies_batched_equal_alone(model, fixed):
    """256 replies speak in one batch (every tick 256 rows: the fixed step's bucket 256,
    eagerly as its CUDA graph runs it); each gives bit for bit the codes and audio it
    gives alone (a quarter of them run alone: ~10 s)."""
    prompts, voices = prompts_and_voices(model, ROWS)
    with ChromaEngine(model, max_conversations=1, prefill_budget=10**9, max_buffered=FRAMES + 1,
                      frame_graphs=fixed) as engine:
        if fixed:   # 256 rows of a short context (the whole 2048 positions would be 2.1 GB of float32 KV)
            engine.frame_step = FrameStep(model, ROWS, fixed=True, capacity=128)
        sizes, step = [], engine.frame_step.step
        engine.frame_step.step = lambda rows, *rest: sizes.append(len(rows)) or step(rows, *rest)
        together = run(engine, list(zip(prompts, voices)))
        assert sizes[:FRAMES] == [ROWS] * FRAMES   # all 256 in every tick
        if fixed:
            assert engine.frame_step.rows == ROWS
        assert all(len(codes) == FRAMES for codes, _ in together)
        assert len({str(codes) for codes, _ in together}) > 1   # the replies differ
        for i in ALONE:
            alone = run(engine, [(prompts[i], voices[i])])[0]
            assert same(together[i], alone), i
        assert sizes[FRAMES:] == [1] * FRAMES * len(ALONE)


@pytest.mark.timeout(300)
def test_tick_overhead_benchmark_runs(tiny_checkpoint, tmp_path):
    """bench_tick_overhead.py at 1 and 4 rows, 3 frames: every figure is there and adds up."""
    out = tmp_path / "tick.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_tick_overhead.py"),
                           "--checkpoint", str(tiny_checkpoint), "--rows", "1,4", "--frames", "3", "--repeats", "2", "--top", "5",
                           "--out", str(out)], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["identical_codes"] and row["steady_ticks"] == 2 * 3
        assert row["own_work_ms_p50"] <= row["own_work_ms_max"] and row["gc_ms_max"] >= 0
        parts = row["parts"]
        assert {"own work", "backbone step", "decoder pass", "codec", "reasoner halves"} <= set(parts)
        assert row["tick_ms"] == pytest.approx(sum(p["ms"] for p in parts.values()), abs=0.01)
        assert 0 < row["own_work_ms"] == parts["own work"]["ms"] < row["tick_ms"]
        for p in parts.values():
            assert p["kernels_ms"] >= 0 and p["metadata_ops_ms"] >= 0 and p["ops"] >= 0
        assert parts["backbone step"]["kernels_ms"] > 0 and parts["own work"]["ops"] > 0
        assert len(row["own_work_python_functions"]) == 5 and row["own_work_top_ops"]
    memory = report["fixed_step_memory"]
    assert memory["4"]["full_size_bf16_gib"] == pytest.approx(4 * memory["1"]["full_size_bf16_gib"], rel=0.05)
