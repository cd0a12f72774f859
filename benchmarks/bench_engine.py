#!/usr/bin/env python3
"""ChromaEngine under load: N conversations batched per tick vs the same N one after another.

For each N of the sweep, on the same weights and prompts (greedy, a fixed frame count):

- sequential: the N replies through the engine one at a time (batch 1 every tick);
- batched: the N replies at once, each consumed on its own thread as a client would;
- joining: the same, but reply i joins `--stagger` x i ticks after the first (joins
  mid-stream): its time to first audio includes waiting for the running batch.

Each count first runs one untimed batched pass (steady state: what a first use costs is
not timed).
Checks that every reply's codes are identical all three ways (batch invariance), then
records the wall time of each way and their ratio (of the medians, and of the best runs),
the batched ticks' p50/p99 (ms), the joining run's time to first audio (hand-over to the
first frame's audio) p50/p95, the real-time margin (80 ms / tick p99), and peak memory.
Runs alternate sequential / batched (`--runs`), so machine drift hits both. JSON (+ PNG
with matplotlib). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing

from chroma_agent import ChromaEngine, ChromaModel, SamplingOptions, Voice  # noqa: E402
from chroma_agent.model.processor import ReasonerInput  # noqa: E402

FRAME_S = 0.080


def prompts_and_voices(model, n: int, seed: int):
    """N prompts of different lengths (random ids, no tokenizer needed) and two voices."""
    g = np.random.default_rng(seed)
    cfg = model.config
    vocab = min(cfg.text_start_token_id, 900)
    voices = [Voice(g.integers(0, cfg.codec_vocab, (frames, cfg.num_codebooks)), "voice", tuple(g.integers(0, vocab, 12)))
              for frames in (25, 38)]
    prompts = [ReasonerInput(torch.tensor([g.integers(0, vocab, 24 + 17 * (i % 5)).tolist()])) for i in range(n)]
    return prompts, [voices[i % 2] for i in range(n)]


def run_reply(engine, voice, prompt, frames, out, key, started_at=None):
    start = time.perf_counter() if started_at is None else started_at
    job = engine.reply_frames(voice, prompt, frames, SamplingOptions(greedy=True))
    codes, ttfa = [], None
    for frame in job:
        if ttfa is None:
            ttfa = time.perf_counter() - start
        codes.append(frame.codes.tolist())
    out[key] = {"codes": codes, "ttfa_s": ttfa}


def sequential(engine, prompts, voices, frames):
    out, start = {}, time.perf_counter()
    for i, (p, v) in enumerate(zip(prompts, voices)):
        run_reply(engine, v, p, frames, out, i)
    return time.perf_counter() - start, out


def batched(engine, prompts, voices, frames, stagger):
    out = {}
    engine.tick_times.clear()
    ticks0 = engine.ticks

    def joiner(i):
        if i:  # join mid-stream: once the engine has run `stagger * i` ticks of this run
            while engine.ticks - ticks0 < stagger * i and len(out) < len(prompts):
                time.sleep(0.001)
        run_reply(engine, voices[i], prompts[i], frames, out, i)

    start = time.perf_counter()
    threads = [threading.Thread(target=joiner, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, out, [ms for _, ms in engine.tick_times]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a Chroma checkpoint directory (e.g. the tiny one)")
    src.add_argument("--config", help="a config.json: random weights (full size on a GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--sweep", default="1,2,4,8", help="conversation counts")
    ap.add_argument("--frames", type=int, default=40, help="frames per reply (80 ms each)")
    ap.add_argument("--stagger", type=int, default=3, help="ticks between joins in the batched run")
    ap.add_argument("--runs", type=int, default=1, help="alternating sequential/batched runs per count")
    ap.add_argument("--frame-graphs", choices=["auto", "on", "off"], default="auto",
                    help="the fixed-shape batched step (CUDA graphs per batch bucket); auto: on CUDA only")
    ap.add_argument("--out", default="benchmarks/results/engine_tiny_cpu.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = ChromaModel.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    else:
        model = ChromaModel.from_config(args.config, device=args.device, dtype=args.dtype)
    sweep = [int(n) for n in args.sweep.split(",")]
    engine = ChromaEngine(model, max_conversations=max(sweep),
                          frame_graphs=None if args.frame_graphs == "auto" else args.frame_graphs == "on")
    prompts, voices = prompts_and_voices(model, max(sweep), 0)
    run_reply(engine, voices[0], prompts[0], 4, {}, 0)  # warm-up

    results = []
    for n in sweep:
        batched(engine, prompts[:n], voices[:n], args.frames, 0)  # warm-up at this count, untimed
        seq_times, bat_times, ticks, ttfas, identical = [], [], [], [], True
        for _ in range(args.runs):
            t_seq, seq_out = sequential(engine, prompts[:n], voices[:n], args.frames)
            t_bat, bat_out, tick_ms = batched(engine, prompts[:n], voices[:n], args.frames, 0)
            _, join_out, join_ticks = batched(engine, prompts[:n], voices[:n], args.frames, args.stagger)
            identical &= all(seq_out[i]["codes"] == bat_out[i]["codes"] == join_out[i]["codes"] for i in range(n))
            seq_times.append(t_seq)
            bat_times.append(t_bat)
            ticks += tick_ms + join_ticks
            ttfas += [join_out[i]["ttfa_s"] * 1000 for i in range(n)]
        row = {
            "conversations": n,
            "sequential_s": float(np.median(seq_times)), "batched_s": float(np.median(bat_times)),
            "speedup": float(np.median(seq_times) / np.median(bat_times)),
            # the fastest run of each way: other load on the machine only ever slows a run down
            "speedup_best": float(min(seq_times) / min(bat_times)),
            "identical_greedy_codes": identical,
            "tick_p50_ms": float(np.percentile(ticks, 50)), "tick_p99_ms": float(np.percentile(ticks, 99)),
            "ttfa_p50_ms": float(np.percentile(ttfas, 50)), "ttfa_p95_ms": float(np.percentile(ttfas, 95)),
            "realtime_margin": float(FRAME_S * 1000 / np.percentile(ticks, 99)),
            "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda"
                            else peak_rss_mb()),
        }
        results.append(row)
        print(json.dumps(row))
    engine.close()
    report = {
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(model.dtype),
        "source": args.checkpoint or args.config, "frames": args.frames, "stagger_ticks": args.stagger,
        "runs": args.runs, "frame_graphs": engine.frame_step.fixed,
        "peak_mem_kind": "cuda max allocated" if model.device.type == "cuda" else "process ru_maxrss",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out} (no matplotlib: no plot)")
        return
    ns = [r["conversations"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ns, [r["tick_p50_ms"] for r in results], "o-", label="tick p50")
    ax1.plot(ns, [r["tick_p99_ms"] for r in results], "o-", label="tick p99")
    ax1.plot(ns, [r["ttfa_p95_ms"] for r in results], "s--", label="TTFA p95")
    ax1.axhline(80, color="gray", lw=0.8, label="80 ms frame")
    ax1.set_xlabel("conversations")
    ax1.set_ylabel("ms")
    ax1.legend()
    ax2.plot(ns, [r["speedup"] for r in results], "o-")
    ax2.set_xlabel("conversations")
    ax2.set_ylabel("sequential / batched wall time")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
