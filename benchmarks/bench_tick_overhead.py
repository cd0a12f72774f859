#!/usr/bin/env python3
"""An engine tick's own work (scheduling, bookkeeping, samplers) apart from the model's.

For each row count N of `--rows` (default 1, 64, 256), N greedy replies (prompts of 24-92
random token ids, two voices, `--frames` frames each) are handed to one `ChromaEngine` at
once, with a prefill budget large enough that all of them prefill in the first tick: every
later tick steps all N rows together until they end. Only those "steady" ticks (N rows
speaking, nothing prefilling) are measured.

The method. The model's work in a tick is a handful of calls, each wrapped here with a
timer (a few per tick: no measurable cost): the backbone step (`batch.backbone_step`;
fixed shapes: `FrameStep._fixed`, the CUDA-graph region, decoder pass included), the
decoder pass (`FrameStep._decode`, its code picks included), the frame embeddings
(`embed_frame`), the codec (`decode_frames`) and the reasoner halves
(`ReasonerSteps.first/second`, the second embedding the new tokens). **The tick's own work**
is the rest of the tick's wall time: the scheduler (`_tick`, `_frame`, `_reason`, `_isolated`,
`_end`), each reply's plan and apply (`ReplyFrames`), `FrameStep.step`'s bookkeeping, the
next inputs staged (`FrameStep.stage`: copies), the samplers' loading (`RowSamplers.load`,
their noise drawn in each reply's plan), the queues to the consumers; on the GPU this is
what stays on the host when the step is a CUDA graph. It is measured without any profiler:
tick wall minus the wrapped calls, tick by tick. The issue's bar: under 5 ms at 256 rows.

Then, per pass, each the same N replies:

1. warm-up (untimed): oneDNN builds its kernels for the row counts it meets;
2. timed (`--repeats` passes, their ticks pooled): per steady tick, its wall and each
   wrapped call's time, and the time of Python's garbage collections inside it (they
   count where they happen, mostly in the own work);
3. torch.profiler (CPU activity): what inside each part is kernels and what is Python.
   A part's kernels are its top-level torch ops' durations (ops nested in no other op),
   split into ops that compute and "metadata" ops that compute nothing (views, shape
   changes, reading a scalar: `METADATA_OPS`); the rest of its time is Python. The
   profiler costs ~1-2 us per op, so these are shares, read against the timed pass;
4. cProfile, off inside the model's calls: the Python functions of the tick's own work
   (by own time). Tensor arithmetic written as operators (`x * y`, `x[i]`) is not a call
   cProfile sees: it counts in its caller's own time. cProfile also slows Python calls
   several times: shares, not times.

It also checks that each pass gives every reply the same codes (greedy, or `--sampled`
with a seed per reply: it must), and
reports the fixed-shape step's static memory (`FrameStep(fixed=True)`, the CUDA-graph
path's KV cache with a row per reply) at each N for the loaded model and for the full-size
Chroma-4B config in bfloat16 (computed, not allocated).

    python3 -m chroma_agent.testing.tiny_checkpoint /tmp/tiny_chroma
    python3 benchmarks/bench_tick_overhead.py --checkpoint /tmp/tiny_chroma --rows 1,64,256
    python3 benchmarks/bench_tick_overhead.py --checkpoint /tmp/tiny_chroma --rows 1,64,256 --frame-graphs on \\
        --fixed-capacity 256 --out benchmarks/results/tick_overhead_fixed_tiny_cpu.json

JSON (`--out`) + a printed summary. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import json
import platform
import pstats
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing

from chroma_agent import ChromaEngine, ChromaModel, SamplingOptions, Voice  # noqa: E402
from chroma_agent.model.config import ChromaConfig  # noqa: E402
from chroma_agent.model.processor import ReasonerInput  # noqa: E402
from chroma_agent.model.sampling import CodeSampler  # noqa: E402
from chroma_agent.runtime import engine as engine_module, frame_step as frame_step_module  # noqa: E402
from chroma_agent.runtime.batch import ReasonerSteps  # noqa: E402
from chroma_agent.runtime.engine_jobs import END  # noqa: E402
from chroma_agent.runtime.frame_graph import bucket  # noqa: E402
from chroma_agent.runtime.frame_step import FrameStep, fixed_step_bytes  # noqa: E402
from chroma_agent.testing.tiny_checkpoint import FULL_SIZE_CONFIG  # noqa: E402

BUDGET_MS = 5.0  # the bar for the tick's own work at 256 rows
OWN = "own work"
# torch ops that compute nothing (views, shape changes, reading a scalar, empty buffers)
METADATA_OPS = {f"aten::{name}" for name in (
    "slice", "select", "view", "_unsafe_view", "_reshape_alias", "reshape", "unbind", "split", "split_with_sizes",
    "chunk", "as_strided", "unsqueeze", "squeeze", "expand", "transpose", "permute", "t", "narrow", "alias",
    "detach", "lift_fresh", "item", "_local_scalar_dense", "is_nonzero", "empty", "empty_strided", "resolve_conj",
    "resolve_neg", "numpy_T", "unfold")}


def prompts_and_voices(model, n: int, seed: int = 0):
    """N prompts of different lengths (random ids, no tokenizer needed) and two voices."""
    g = np.random.default_rng(seed)
    cfg = model.config
    vocab = min(cfg.text_start_token_id, 900)
    voices = [Voice(g.integers(0, cfg.codec_vocab, (frames, cfg.num_codebooks)), "voice",
                    tuple(g.integers(0, vocab, 12))) for frames in (25, 38)]
    prompts = [ReasonerInput(torch.tensor([g.integers(0, vocab, 24 + 17 * (i % 5)).tolist()])) for i in range(n)]
    return prompts, [voices[i % 2] for i in range(n)]


def computes_nothing(event) -> bool:
    """A metadata op whose nested ops are all metadata ops too (a reshape that copies is not)."""
    return event.name in METADATA_OPS and all(computes_nothing(child) for child in event.cpu_children)


class TickMeter:
    """Stands in for the engine's `_tick` (the scheduler thread calls it) and wraps the
    model's calls (`wrap`): runs the real tick, measured in the current `mode` when it is
    steady (`rows` speaking, nothing waiting to prefill)."""

    def __init__(self, engine: ChromaEngine):
        self.engine, self.tick = engine, engine._tick
        self.mode: str | None = None
        self.active = None  # the mode of the tick being measured, else None
        self.depth = 0      # wrapped calls in progress (only the outermost counts)
        self.rows = 0
        self._gc_start = 0.0
        self.reset()
        engine._tick = self
        gc.callbacks.append(self._collected)

    def _collected(self, phase: str, info: dict) -> None:
        """Python's cyclic garbage collections inside a measured tick: their time, per generation."""
        if self.active is None:
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_tick[info["generation"]] += (time.perf_counter() - self._gc_start) * 1000

    def reset(self) -> None:
        self.ticks: list[dict] = []    # timed pass: per tick {"wall": ms, part: ms}
        self.gc_ticks: list[dict] = []  # timed pass: per tick {generation: ms of garbage collection}
        self.gc_tick: collections.Counter = collections.Counter()
        self.profiled: list[dict] = []  # torch pass: per tick {part: {"ms", "kernels", "metadata", "ops"}}
        self.op_ms: collections.Counter = collections.Counter()   # own work's top-level ops: ms
        self.op_calls: collections.Counter = collections.Counter()
        self.profile = cProfile.Profile()
        self.cprofile_ticks = 0
        self.parts: collections.Counter = collections.Counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self.active is None or self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            if self.active == "cprofile":  # cProfile sees the own work only
                self.profile.disable()
            start = time.perf_counter()
            try:
                if self.active == "torch":
                    with torch.profiler.record_function(f"part::{name}"):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                self.parts[name] += (time.perf_counter() - start) * 1000
                self.depth -= 1
                if self.active == "cprofile":
                    self.profile.enable()
        return timed

    def steady(self) -> bool:
        e = self.engine
        return not e._submitted and not e._prefilling and len(e._speaking) == self.rows

    def __call__(self) -> None:
        if self.mode is None or not self.steady():
            return self.tick()
        self.parts.clear()
        self.gc_tick = collections.Counter()
        self.active = self.mode
        try:
            if self.mode == "time":
                start = time.perf_counter()
                self.tick()
                self.ticks.append({"wall": (time.perf_counter() - start) * 1000, **self.parts})
                self.gc_ticks.append(dict(self.gc_tick))
            elif self.mode == "torch":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    self.tick()
                    wall = (time.perf_counter() - start) * 1000
                self.profiled.append(self._split(prof.events(), wall))
                del prof
                gc.collect()  # the profile's many objects: collected now, not in a later tick
            else:  # cProfile: this thread only
                self.profile.enable()
                self.tick()
                self.profile.disable()
                self.cprofile_ticks += 1
        finally:
            self.active = None

    def _split(self, events, wall: float) -> dict:
        """Per part (and the own work): wall ms, kernels ms, metadata ops ms, op count."""
        out = {name: {"ms": ms, "kernels": 0.0, "metadata": 0.0, "ops": 0} for name, ms in self.parts.items()}
        out[OWN] = {"ms": wall - sum(self.parts.values()), "kernels": 0.0, "metadata": 0.0, "ops": 0}
        for e in events:
            if e.cpu_parent is not None:
                continue
            if e.name.startswith("part::"):
                part, ops = out[e.name[6:]], e.cpu_children
            else:
                part, ops = out[OWN], [e]
                self.op_ms[e.name] += e.cpu_time_total / 1000
                self.op_calls[e.name] += 1
            for op in ops:
                part["kernels"] += op.cpu_time_total / 1000
                part["metadata"] += op.cpu_time_total / 1000 if computes_nothing(op) else 0.0
                part["ops"] += 1
        return out


def instrument(engine: ChromaEngine) -> TickMeter:
    """A meter on the engine's tick, its timers on the model's calls."""
    meter, step = TickMeter(engine), engine.frame_step
    frame_step_module.backbone_step = meter.wrap("backbone step", frame_step_module.backbone_step)
    step._decode = meter.wrap("decoder pass", step._decode)
    step._fixed = meter.wrap("backbone step + decoder pass (fixed shapes)", step._fixed)
    engine_module.decode_frames = meter.wrap("codec", engine_module.decode_frames)
    engine.model.embed_frame = meter.wrap("frame embeddings", engine.model.embed_frame)
    ReasonerSteps.first = meter.wrap("reasoner halves", ReasonerSteps.first)
    ReasonerSteps.second = meter.wrap("reasoner halves", ReasonerSteps.second)
    CodeSampler.draw = meter.wrap("noise draws (sampled replies' RNG, 16 frames a call)", CodeSampler.draw)
    return meter


def run_batch(engine: ChromaEngine, prompts, voices, frames: int, sampled: bool = False) -> list[list]:
    """The replies all at once (submitted under the scheduler's lock: they start on one
    tick), greedy or (`sampled`) each top-k sampled with a seed of its own; waits for them and
    returns each one's codes."""
    jobs = [engine.reply_frames(v, p, frames, SamplingOptions(seed=i) if sampled else SamplingOptions(greedy=True))
            for i, (p, v) in enumerate(zip(prompts, voices))]
    with engine._wakeup:
        for job in jobs:
            engine.submit(job)
    codes = []
    for job in jobs:
        job.finished.wait()
        mine = []
        while (item := job.out.get()) is not END:
            if isinstance(item, BaseException):
                raise item
            mine.append(item.codes.tolist())
        codes.append(mine)
    return codes


def mean(values, ticks: int) -> float:
    """Per tick over `ticks` ticks (a part absent from a tick counts 0 there)."""
    return round(sum(values) / ticks, 3) if ticks else 0.0


def summary(meter: TickMeter) -> dict:
    """Per part, means over the steady ticks (they add up to the tick): the timed pass's
    wall, and the profiled pass's kernels / metadata ops / Python."""
    names = sorted({k for t in meter.ticks for k in t if k != "wall"})
    own = [t["wall"] - sum(t.get(n, 0.0) for n in names) for t in meter.ticks]
    parts, timed_n, prof_n = {}, len(meter.ticks), len(meter.profiled)
    for name in [OWN, *names]:
        timed = own if name == OWN else [t.get(name, 0.0) for t in meter.ticks]
        prof = [p[name] for p in meter.profiled if name in p]
        parts[name] = {
            "ms": mean(timed, timed_n),
            "profiled_ms": mean((p["ms"] for p in prof), prof_n),
            "kernels_ms": mean((p["kernels"] - p["metadata"] for p in prof), prof_n),
            "metadata_ops_ms": mean((p["metadata"] for p in prof), prof_n),
            "python_ms": mean((p["ms"] - p["kernels"] for p in prof), prof_n),
            "ops": mean((p["ops"] for p in prof), prof_n),
        }
    return parts


def parts_total(parts: dict) -> float:
    return round(sum(p["ms"] for p in parts.values()), 3)


def python_functions(profile: cProfile.Profile, ticks: int, top: int) -> tuple[list, dict]:
    """The own work's Python functions by own time, and its own time per source file
    (shares; C functions and torch ops apart)."""
    stats = pstats.Stats(profile).stats
    functions, files = [], collections.Counter()
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.items():
        short = "(C: torch ops, built-ins)" if path == "~" else "/".join(Path(path).parts[-2:])
        files[short] += tottime
        if path != "~":
            functions.append({"function": f"{short}:{line}({name})", "calls_per_tick": round(calls / ticks, 1),
                              "own_ms_per_tick": round(tottime * 1000 / ticks, 3),
                              "cum_ms_per_tick": round(cumtime * 1000 / ticks, 3)})
    functions.sort(key=lambda f: -f["own_ms_per_tick"])
    total = sum(files.values())
    shares = {k: round(v / total, 4) for k, v in files.most_common(15)}
    return functions[:top], {"total_ms_per_tick": round(total * 1000 / ticks, 3), **shares}


def fixed_memory(model, rows: list[int], capacity: int | None) -> dict:
    """The fixed-shape step's static buffers at each row count (its bucket): this model
    (its dtype, at `capacity` positions per row) and the full-size config in bfloat16 over
    its whole context, computed (nothing allocated)."""
    full = ChromaConfig.from_file(FULL_SIZE_CONFIG)
    return {str(n): {"this_model_mb": round(fixed_step_bytes(model.config, bucket(n), model.dtype, capacity) / 2**20, 1),
                     "full_size_bf16_gib": round(fixed_step_bytes(full, bucket(n), torch.bfloat16) / 2**30, 2)}
            for n in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a Chroma checkpoint directory (e.g. the tiny one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--rows", default="1,64,256", help="row counts (replies speaking at once)")
    ap.add_argument("--frames", type=int, default=8, help="frames per reply: steady ticks per pass")
    ap.add_argument("--frame-graphs", choices=["auto", "on", "off"], default="auto",
                    help="the fixed-shape step (CUDA graphs per batch bucket); auto: on CUDA only")
    ap.add_argument("--fixed-capacity", type=int, default=None,
                    help="backbone positions per fixed-shape row (default: the model's context); the "
                         "tick's own work does not depend on it, the kernels' time and memory do")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (their steady ticks pooled)")
    ap.add_argument("--sampled", action="store_true",
                    help="top-k sampled replies (each its own seed: repeatable) instead of greedy ones")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() again once the engine is warm (the engine freezes what is alive at its "
                         "start: the model, the libraries; this adds the benchmark's own objects)")
    ap.add_argument("--top", type=int, default=20, help="Python functions to list")
    ap.add_argument("--out", default="benchmarks/results/tick_overhead_tiny_cpu.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ChromaModel.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    rows = [int(n) for n in args.rows.split(",")]
    engine = ChromaEngine(model, max_conversations=max(rows), prefill_budget=10**9, max_buffered=args.frames + 2,
                          frame_graphs=None if args.frame_graphs == "auto" else args.frame_graphs == "on")
    if engine.frame_step.fixed and args.fixed_capacity:  # before any reply has a row
        engine.frame_step = FrameStep(model, max(rows), fixed=True, capacity=args.fixed_capacity)
    meter = instrument(engine)
    prompts, voices = prompts_and_voices(model, max(rows))
    run_batch(engine, prompts[:1], voices[:1], 2)  # the engine is started and warm
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    results = []
    try:
        for n in rows:
            meter.rows, meter.mode = n, None
            reference = run_batch(engine, prompts[:n], voices[:n], args.frames, args.sampled)  # warm-up
            meter.reset()
            same = True
            for mode in ["time"] * args.repeats + ["torch", "cprofile"]:
                meter.mode = mode
                same &= run_batch(engine, prompts[:n], voices[:n], args.frames, args.sampled) == reference
            meter.mode = None
            parts = summary(meter)
            functions, files = python_functions(meter.profile, meter.cprofile_ticks, args.top)
            own = parts[OWN]
            own_ticks = [t["wall"] - sum(v for k, v in t.items() if k != "wall") for t in meter.ticks]
            row = {
                "rows": n, "steady_ticks": len(meter.ticks), "identical_codes": same,
                "tick_ms": parts_total(parts),
                "tick_ms_p50": round(float(np.median([t["wall"] for t in meter.ticks])), 3),
                "own_work_ms": own["ms"], "own_work_per_row_us": round(own["ms"] * 1000 / n, 1),
                "own_work_ms_p50": round(float(np.median(own_ticks)), 3),
                "own_work_ms_max": round(float(np.max(own_ticks)), 3),
                "own_work_ms_ticks": [round(t, 3) for t in own_ticks],  # each steady tick, in order
                # Python's garbage collections inside the timed ticks (anywhere in the tick)
                "gc_ms_mean": round(sum(sum(g.values()) for g in meter.gc_ticks) / len(meter.gc_ticks), 3),
                "gc_ms_max": round(max(sum(g.values()) for g in meter.gc_ticks), 3),
                "gc_ms_ticks": [round(sum(g.values()), 3) for g in meter.gc_ticks],
                "gc_collections": dict(collections.Counter(k for g in meter.gc_ticks for k in g)),
                "parts": parts,
                "own_work_top_ops": [{"op": name, "calls_per_tick": round(meter.op_calls[name] / len(meter.profiled), 1),
                                      "ms_per_tick": round(ms / len(meter.profiled), 3)}
                                     for name, ms in meter.op_ms.most_common(12)],
                "own_work_python_functions": functions,
                "own_work_cprofile_by_file": files,   # its total under cProfile, and each file's share
            }
            results.append(row)
            print(f"rows {n:4d}: tick {row['tick_ms']:8.2f} ms, own work p50 {row['own_work_ms_p50']:6.2f} "
                  f"mean {own['ms']:6.2f} max {row['own_work_ms_max']:6.2f} ms (gc mean {row['gc_ms_mean']:.2f} "
                  f"max {row['gc_ms_max']:.2f}; profiled: Python {own['python_ms']:.2f}, torch ops "
                  f"{own['kernels_ms'] + own['metadata_ops_ms']:.2f} ms in {own['ops']:.0f}); identical codes: {same}",
                  flush=True)
    finally:
        engine.close()
    report = {
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(model.dtype),
        "source": args.checkpoint, "frames": args.frames, "frame_graphs": engine.frame_step.fixed,
        "repeats": args.repeats, "gc_freeze": args.gc_freeze, "sampled": args.sampled,
        "fixed_capacity": engine.frame_step.capacity if engine.frame_step.fixed else None,
        "method": "own work = steady tick wall - the model's calls (backbone step, decoder pass, frame embeddings, "
                  "codec, reasoner halves), timed with perf_counter, no profiler; per part, the torch.profiler "
                  "pass splits it into kernels (top-level ops that compute), metadata ops (views, shapes, "
                  "scalars) and Python (the rest); medians over the steady ticks",
        "budget_own_work_ms_at_256": BUDGET_MS,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fixed_step_memory": fixed_memory(model, rows, engine.frame_step.capacity if engine.frame_step.fixed else None),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for row in results:
        print(f"\nrows {row['rows']}: part: timed ms | profiled: kernels, metadata ops, Python ms")
        for name, p in row["parts"].items():
            print(f"  {name:45s} {p['ms']:8.2f} | {p['kernels_ms']:8.2f} {p['metadata_ops_ms']:7.2f} {p['python_ms']:7.2f}")
        print("  own work's top torch ops (ms/tick, calls):",
              ", ".join(f"{o['op']} {o['ms_per_tick']} ({o['calls_per_tick']:.0f})" for o in row["own_work_top_ops"][:6]))
        print("  own work's Python functions (cProfile own ms/tick, calls/tick):")
        for f in row["own_work_python_functions"][:10]:
            print(f"    {f['own_ms_per_tick']:7.3f}  {f['calls_per_tick']:7.0f}  {f['function']}")
    print(f"\nfixed-shape step memory: {json.dumps(report['fixed_step_memory'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
