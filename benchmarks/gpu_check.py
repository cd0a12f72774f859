#!/usr/bin/env python3
"""One GPU check: every GPU figure the benchmarks want, in one run of under 8 minutes on one H100.

Steps, each a subprocess with its own timeout (a step that fails or runs out of time is
recorded with its error and the next one runs; the whole run keeps to `--budget-s`):

  tiny_checkpoint  `python -m chroma_agent.testing.tiny_checkpoint DIR` (a temp dir): the
                   golden cases and the Realtime server run on it
  golden           tests/data/golden/tiny_seed0.json (the original implementation's outputs,
                   float32 on the CPU) run on the GPU, float32 and bfloat16: per case whether
                   the codes, reasoner tokens and voice codes are equal (first differing frame),
                   the largest audio difference, and the codes through the fixed-shape frame
                   step (one CUDA-graph replay per frame on the GPU)
  streaming        bench_streaming.py, full-size architecture (random weights), bf16:
                   time to first audio, per-frame p50 / p99, ours and the original-style loop
  engine           bench_engine.py's replies (its prompts and voices) through one
                   `ChromaEngine`, full size, bf16, CUDA graphs, at 1, 8, 32, 64, 128, 256
                   conversations: tick p50 / p99 while all N speak, and the most calls kept in
                   real time (tick p99 <= 80 ms). Not bench_engine.py itself: its one-after-
                   another runs would take minutes at 256; a count the engine refuses is recorded
                   as refused
  realtime         bench_realtime.py at 32 sessions against `chroma-agent serve realtime` on the
                   TINY checkpoint on the GPU (a server needs a processor: the full size has none
                   offline), espeak-ng speech

It writes one JSON (default benchmarks/results/gpu_check_<device>.json) and prints a
markdown table ready to paste into benchmarks/README.md.

    python benchmarks/gpu_check.py                      # on a CUDA machine
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json
                                                        # CPU, tiny sizes, every step (< 3 min, a test)
    python benchmarks/gpu_check.py --prepare-speech     # espeak-ng clips for a GPU machine without it

Without CUDA and without --smoke it exits at once with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOLDEN = REPO / "tests" / "data" / "golden" / "tiny_seed0.json"
FULL_CONFIG = REPO / "chroma_agent" / "testing" / "data" / "full_size_config.json"
TINY_CONFIG = REPO / "chroma_agent" / "testing" / "data" / "tiny_config.json"
SPEECH_CACHE = HERE / "results" / "gpu_check_speech"   # WAVs: git-ignored; carry it to a machine without espeak-ng
FRAME_MS = 80.0
NO_CUDA = ("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
           "`--smoke` runs every step on the CPU with tiny sizes instead.")

# sizes per mode: the GPU run fits 8 minutes on one H100, the smoke run 3 on a 2-core CPU
SIZES = {
    "cuda": {"budget_s": 450, "config": FULL_CONFIG, "device": "cuda", "dtype": "bfloat16",
             "golden_dtypes": "float32,bfloat16", "streaming_frames": 100, "streaming_runs": 3,
             "engine_sweep": "1,8,32,64,128,256", "engine_frames": 50, "engine_warmup_frames": 8,
             "engine_count_timeout_s": 90, "realtime_sessions": 32, "realtime_turns": 2,
             "realtime_dtype": "auto", "threads": None},
    "smoke": {"budget_s": 170, "config": TINY_CONFIG, "device": "cpu", "dtype": "float32",
              "golden_dtypes": "float32", "streaming_frames": 4, "streaming_runs": 1,
              "engine_sweep": "1,2", "engine_frames": 6, "engine_warmup_frames": 3,
              "engine_count_timeout_s": 60, "realtime_sessions": 2, "realtime_turns": 1,
              "realtime_dtype": "float32", "threads": 1},
}
# step -> (timeout s, the least it needs: kept free for it while the earlier steps run)
STEP_TIME = {"cuda": {"tiny_checkpoint": (90, 15), "golden": (120, 30), "streaming": (180, 60),
                      "engine": (240, 80), "realtime": (150, 60)},
             "smoke": {"tiny_checkpoint": (60, 10), "golden": (60, 15), "streaming": (60, 15),
                       "engine": (60, 15), "realtime": (90, 40)}}
STEPS = ("tiny_checkpoint", "golden", "streaming", "engine", "realtime")


# ============================================================================ workers
# `gpu_check.py --worker golden|engine ...`: the steps that are not a benchmark script of their own

def _dump(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def golden_worker(args) -> int:
    """The golden cases on `args.device`, per dtype: how far this machine's results lie from
    the stored ones (recorded by the original implementation, float32 on the CPU)."""
    import numpy as np
    import torch

    from chroma_agent import ChromaModel, SamplingOptions
    from chroma_agent.model.processor import ReasonerInput
    from chroma_agent.runtime.frame_step import FrameStep
    from chroma_agent.testing.golden import run_case

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = json.loads(GOLDEN.read_text())["cases"]
    out = {"golden": str(GOLDEN.relative_to(REPO)), "checkpoint": args.checkpoint, "device": args.device,
           "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "dtypes": {}}

    def first_difference(a, b):
        n = min(len(a), len(b))
        return next((i for i in range(n) if a[i] != b[i]), None if len(a) == len(b) else n)

    for dtype in args.dtypes.split(","):
        model = ChromaModel.from_pretrained(args.checkpoint, device=args.device, dtype=dtype)
        rows = []
        for case in cases:
            t = time.perf_counter()
            got, want = run_case(model, case), case["expected"]
            audio = np.asarray(got["audio"], np.float64)
            head = np.asarray(want["decoded_audio_head"], np.float64)
            n = min(len(audio), len(head))
            codes = np.asarray(got["codes"]), np.asarray(want["codes"])
            voice_codes = np.asarray(got["prompt_audio_codes"]), np.asarray(want["prompt_audio_codes"])
            row = {
                "case": case["name"], "frames": len(want["codes"]),
                "prompt_codes_equal": got["prompt_audio_codes"] == want["prompt_audio_codes"],
                "prompt_codes_entries_differing": int((voice_codes[0] != voice_codes[1]).sum())
                if voice_codes[0].shape == voice_codes[1].shape else None,
                "codes_equal": got["codes"] == want["codes"],
                "first_differing_frame": first_difference(got["codes"], want["codes"]),
                "code_entries_differing": int((codes[0] != codes[1]).sum()) if codes[0].shape == codes[1].shape
                else None,
                "thinker_tokens_equal": got["thinker_tokens"] == want["thinker_tokens"],
                "audio_len_equal": len(audio) == want["decoded_audio_len"],
                "audio_head_max_abs_diff": float(np.abs(audio[:n] - head[:n]).max()) if n else None,
                "audio_rms_diff": abs(float(np.sqrt(np.mean(audio ** 2))) - want["decoded_audio_rms"])
                if len(audio) else None,
            }
            if not case["weight_edits"]:   # the fixed-shape step: on CUDA each frame is a graph replay
                step = FrameStep(model, fixed=True)
                voice = model.voice_from_audio(np.asarray(case["prompt_audio_24k"], np.float32),
                                               case["prompt_text_ids"], sample_rate=24000)
                prompt = ReasonerInput(torch.tensor([case["thinker_input_ids"]]))
                if case.get("user_audio_16k"):
                    pcm = model.processor.load_user_audio(np.asarray(case["user_audio_16k"], np.float32), 16000)
                    prompt.input_features, prompt.feature_attention_mask = model.processor.features(pcm)
                with torch.inference_mode():
                    frames = model.reply_frames(voice, prompt, case["max_new_frames"], SamplingOptions(greedy=True),
                                                frame_step=step)
                    step_codes = [f.codes.tolist() for f in frames]
                row.update(frame_step_graphs=step.graphs_enabled, frame_step_codes_equal=step_codes == want["codes"],
                           frame_step_first_differing_frame=first_difference(step_codes, want["codes"]),
                           frame_step_thinker_tokens_equal=list(frames.text_ids) == want["thinker_tokens"])
            row["wall_s"] = round(time.perf_counter() - t, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        diffs = [r["audio_head_max_abs_diff"] for r in rows if r["audio_head_max_abs_diff"] is not None]
        same = [r["audio_head_max_abs_diff"] for r in rows if r["codes_equal"] and r["audio_head_max_abs_diff"] is not None]
        stepped = [r for r in rows if "frame_step_codes_equal" in r]
        out["dtypes"][dtype] = {
            "cases": len(rows), "codes_equal": sum(r["codes_equal"] for r in rows),
            "thinker_tokens_equal": sum(r["thinker_tokens_equal"] for r in rows),
            "prompt_codes_equal": sum(r["prompt_codes_equal"] for r in rows),
            "frame_step_cases": len(stepped), "frame_step_codes_equal": sum(r["frame_step_codes_equal"] for r in stepped),
            "frame_step_graphs": any(r["frame_step_graphs"] for r in stepped),
            "max_audio_head_abs_diff": max(diffs) if diffs else None,
            "max_audio_head_abs_diff_codes_equal": max(same) if same else None,
            "max_audio_rms_diff": max((r["audio_rms_diff"] for r in rows if r["audio_rms_diff"] is not None), default=None),
            "max_code_entries_differing": max((r["code_entries_differing"] or 0 for r in rows), default=0),
            "cases_detail": rows}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name()
    _dump(Path(args.out), out)
    return 0


def engine_worker(args) -> int:
    """bench_engine.py's greedy replies (its prompts and voices), N at once through one
    ChromaEngine, per N of the sweep: an untimed pass, then a timed one. The figures are the
    ticks while all N replies speak (prefills all done: the engine's prefill budget is raised
    so that every reply starts on the same tick), and over the whole run. Written after each
    count, so a run cut short keeps what it measured."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from bench_engine import prompts_and_voices   # the same inputs as bench_engine.py

    from chroma_agent import ChromaEngine, ChromaModel, SamplingOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    t = time.perf_counter()
    model = ChromaModel.from_config(args.config, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t
    sweep = [int(n) for n in args.sweep.split(",")]
    out_path = Path(args.out)
    report = {"source": args.config, "device": args.device, "dtype": str(model.dtype).replace("torch.", ""),
              "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "frames": args.frames,
              "warmup_frames": args.warmup_frames, "sweep": sweep, "model_load_s": round(load_s, 1),
              "method": "greedy replies of bench_engine.py's prompts_and_voices, all N submitted at once (one "
                        "consumer thread each); prefill_budget raised so all N start on the same tick; "
                        "full-width ticks: those ending while every reply had its first frame and none had its "
                        "last; real time: full-width tick p99 <= 80 ms",
              "engine": None, "results": []}
    prompts, voices = prompts_and_voices(model, max(sweep), 0)
    with torch.inference_mode():
        for v in voices[:2]:
            model.prefix_state(v)   # computed here, not in a consumer thread while the engine captures graphs

    engine, refused = None, {}
    for cap in sorted(set(sweep), reverse=True):   # the largest count the engine accepts
        try:
            t = time.perf_counter()
            engine = ChromaEngine(model, max_conversations=cap, prefill_budget=1 << 20)
            report["engine"] = {"max_conversations": cap, "capacity": engine.capacity,
                                "frame_graphs": engine.frame_step.fixed,
                                "cuda_graphs": engine.frame_step.graphs_enabled,
                                "start_s": round(time.perf_counter() - t, 1)}
            break
        except Exception as e:   # noqa: BLE001 (refused: too many, out of memory, ...)
            refused[cap] = f"ChromaEngine(max_conversations={cap}): {type(e).__name__}: {str(e)[:300]}"
            print(refused[cap], flush=True)
            engine = None
            if cuda:
                torch.cuda.empty_cache()
    if engine is None:
        report["results"] = [{"conversations": n, "refused": refused[n]} for n in sweep]
        _dump(out_path, report)
        return 1

    def run(n: int, frames: int, timeout: float) -> dict:
        """N replies at once; per reply its frame times, or its error."""
        replies: dict[int, dict] = {}
        engine.tick_times.clear()

        def consume(i):
            r = replies[i] = {"times": [], "error": None, "stop_reason": None}
            try:
                job = engine.reply_frames(voices[i], prompts[i], frames, SamplingOptions(greedy=True))
                for _ in job:
                    r["times"].append(time.perf_counter())
                r["stop_reason"] = job.stop_reason
            except Exception as e:   # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"

        start = time.perf_counter()
        threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        deadline = start + timeout
        for th in threads:
            th.join(max(0.0, deadline - time.perf_counter()))
        wall = time.perf_counter() - start
        return {"wall_s": wall, "timed_out": any(th.is_alive() for th in threads), "replies": replies,
                "ticks": list(engine.tick_times)}

    report["engine"]["idle_after_start_s"] = round(wait_until_idle(engine, 180), 1)
    try:
        warm = run(1, 4, args.count_timeout_s)   # first use
        report["engine"]["first_reply_s"] = round(warm["wall_s"], 2)
        stuck = None
        for n in sweep:
            row = {"conversations": n}
            if n in refused or n > report["engine"]["max_conversations"]:
                row["refused"] = refused.get(n, f"not run: the engine refused {min(refused)} conversations")
            elif stuck:
                row["error"] = f"not run: the engine did not finish {stuck} conversations in time"
            else:
                try:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    w = run(n, args.warmup_frames, args.count_timeout_s)   # untimed: this count's first use
                    r = run(n, args.frames, args.count_timeout_s) if not w["timed_out"] else w
                    replies = list(r["replies"].values())
                    errors = [x["error"] for x in replies if x["error"]]
                    firsts = [x["times"][0] for x in replies if x["times"]]
                    lasts = [x["times"][-1] for x in replies if x["times"]]
                    ticks = [ms for _, ms in r["ticks"]]
                    full = ([ms for end, ms in r["ticks"] if max(firsts) < end < min(lasts)]
                            if len(firsts) == n and not errors else [])
                    pct = lambda v, q: float(np.percentile(v, q)) if v else None  # noqa: E731
                    row.update({
                        "wall_s": round(r["wall_s"], 3), "timed_out": r["timed_out"],
                        "replies_with_frames": len(firsts),
                        "frames_delivered": sum(len(x["times"]) for x in replies),
                        "short_replies": sum(1 for x in replies if len(x["times"]) < args.frames),
                        "stop_reasons": {k: sum(1 for x in replies if x["stop_reason"] == k)
                                         for k in sorted({str(x["stop_reason"]) for x in replies if x["stop_reason"]})},
                        "errors": errors[:5], "error_count": len(errors),
                        "ticks": len(ticks), "full_width_ticks": len(full),
                        "tick_p50_ms": pct(full, 50), "tick_p99_ms": pct(full, 99), "tick_max_ms": max(full, default=None),
                        "all_ticks_p50_ms": pct(ticks, 50), "all_ticks_p99_ms": pct(ticks, 99),
                        "first_frame_spread_ms": (max(firsts) - min(firsts)) * 1000 if firsts else None,
                        "frames_per_s": sum(len(x["times"]) for x in replies) / r["wall_s"] if r["wall_s"] else None,
                        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                    })
                    if row["tick_p99_ms"] is not None:
                        row["realtime_margin"] = FRAME_MS / row["tick_p99_ms"]
                        row["real_time"] = row["tick_p99_ms"] <= FRAME_MS
                    if r["timed_out"]:
                        stuck = n
                        row["error"] = f"the {n} replies did not finish within {args.count_timeout_s} s"
                    elif errors:
                        row["error"] = f"{len(errors)} of {n} replies failed: {errors[0]}"
                except Exception as e:   # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            _dump(out_path, report)
    finally:
        if not any(row.get("timed_out") for row in report["results"]):
            engine.close()
    ok = [row["conversations"] for row in report["results"] if row.get("real_time")]
    report["calls_kept_in_real_time"] = max(ok) if ok else 0
    _dump(out_path, report)
    return 0


def wait_until_idle(engine, timeout: float) -> float:
    """Until the engine's thread has finished its start (prefill timing, CUDA graphs captured
    ahead) and waits for work: a reply's kernels launched from another thread while a graph is
    being captured could break the capture. Seconds waited."""
    start = time.perf_counter()
    ident = getattr(getattr(engine, "_thread", None), "ident", None)
    while ident is not None and time.perf_counter() - start < timeout:
        frame = sys._current_frames().get(ident)
        if frame is None or (frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("threading.py")):
            break
        time.sleep(0.05)
    return time.perf_counter() - start


# ============================================================================ the steps

class Step:
    """`fallback`: (setting, command) run instead when the command fails (not on a timeout)."""

    def __init__(self, name: str, setting: str, cmd: list[str], json_path: Path | None,
                 fallback: tuple[str, list[str]] | None = None):
        self.name, self.setting, self.cmd, self.json_path = name, setting, cmd, json_path
        self.fallback = fallback
        self.record: dict = {"setting": setting, "status": "pending"}


def run_step(step: Step, timeout: float, logs: Path, env: dict) -> dict:
    """Run the step's command in its own process group (a benchmark's server goes with it on
    a timeout), stdout+stderr to a log; its JSON, if any, parsed even when it failed."""
    rec = step.record
    rec.update(command=" ".join(step.cmd), timeout_s=round(timeout))
    log = logs / f"{step.name}.log"
    print(f"\n== {step.name}: {step.setting} (timeout {timeout:.0f} s)\n   {rec['command']}", flush=True)
    start = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    rec["wall_s"] = round(time.perf_counter() - start, 1)
    rec["returncode"] = rc
    text = log.read_text(errors="replace")
    if rc is None:
        rec.update(status="timeout", error=f"ran past its {timeout:.0f} s (killed)")
    elif rc != 0:
        lines = [x for x in text.strip().splitlines() if x.strip()]
        rec.update(status="failed", error=f"exit status {rc}: {lines[-1][:400] if lines else '(no output)'}")
    else:
        rec["status"] = "ok"
    if rc != 0:
        rec["log_tail"] = text[-4000:]
    if step.json_path is not None:
        try:
            rec["result"] = json.loads(step.json_path.read_text())
        except (OSError, ValueError) as e:
            if rec["status"] == "ok":
                rec.update(status="failed", error=f"no JSON from the step: {type(e).__name__}: {e}")
    print(f"   {rec['status']} in {rec['wall_s']} s" + (f": {rec['error']}" if rec.get("error") else ""), flush=True)
    return rec


def speech_ready(cache: Path) -> str | None:
    """None when bench_realtime.py can have its speech, else why not."""
    if shutil.which("espeak-ng"):
        return None
    sys.path.insert(0, str(HERE))
    import hashlib

    import soak
    texts = list(soak.QUESTIONS) + [soak.VOICE_TEXT]
    missing = [t for t in texts if not (cache / f"{hashlib.sha1(f'{t}|175'.encode()).hexdigest()[:16]}.wav").is_file()]
    if missing:
        return (f"espeak-ng is not installed and {len(missing)} of its {len(texts)} clips are not in {cache}: "
                "make them where espeak-ng is (`python benchmarks/gpu_check.py --prepare-speech`) and bring that "
                "folder along (e.g. the device tool's carry)")
    return None


def prepare_speech(cache: Path) -> int:
    sys.path.insert(0, str(HERE))
    import soak
    speech = soak.Speech(cache)
    for text in list(soak.QUESTIONS) + [soak.VOICE_TEXT]:
        speech.wav(text, 175)
    print(f"wrote {len(soak.QUESTIONS) + 1} espeak-ng clips to {cache}")
    return 0


# ============================================================================ summaries and the table

def _f(x, digits=1, unit=""):
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def _g(x):
    return "-" if x is None else f"{x:.1e}"


def summarize(name: str, result: dict | None) -> dict:
    """The figures the table shows, from a step's JSON."""
    if not result:
        return {}
    if name == "golden":
        return {dtype: {k: v for k, v in d.items() if k != "cases_detail"} |
                {"first_differing_frames": {r["case"]: r["first_differing_frame"] for r in d["cases_detail"]
                                            if not r["codes_equal"]}}
                for dtype, d in result["dtypes"].items()}
    if name == "streaming":
        def side(s):
            if not s:
                return None
            gen = s.get("gen") or {}
            return {"ttfa_p50_ms": s.get("ttfa_p50_ms"), "frame_p50_ms": s.get("p50"), "frame_p99_ms": s.get("p99"),
                    "frame_gen_p50_ms": gen.get("p50"), "frame_gen_p99_ms": gen.get("p99"), "rtf": s.get("rtf"),
                    "peak_mem_mb": s.get("peak_mem_mb")}
        v = result.get("verification") or {}
        return {"ours": side(result.get("ours")), "baseline": side(result.get("baseline")),
                "speedup": result.get("speedup"), "dtype": result.get("dtype"), "config": result.get("config"),
                "frames": result.get("frames"), "runs": result.get("runs"),
                "verification": {k: v.get(k) for k in ("codes_equal", "reasoner_tokens_equal", "leading_frames_equal")
                                 if k in v} or None}
    if name == "engine":
        keys = ("conversations", "refused", "error", "tick_p50_ms", "tick_p99_ms", "full_width_ticks",
                "all_ticks_p50_ms", "all_ticks_p99_ms", "real_time", "realtime_margin", "frames_per_s", "peak_mem_mb",
                "short_replies")
        return {"engine": result.get("engine"), "calls_kept_in_real_time": result.get("calls_kept_in_real_time"),
                "rows": [{k: r[k] for k in keys if k in r} for r in result.get("results", [])]}
    if name == "realtime":
        return {"device": result.get("device"), "dtype": result.get("dtype"),
                "rows": [{"sessions": r["sessions"], "turns_timed": r["turns_timed"], "refused": r["refused"],
                          "failures": len(r["failures"]), "target_met": r.get("target_met"),
                          **{k: r["summary_ms"].get(k) for k in ("ttfa_ms", "after_stop_ms", "engine_ttfa_ms",
                                                                  "overhead_ms")}}
                         for r in result.get("results", [])]}
    return {}


def table(report: dict) -> str:
    """One markdown table: a row per figure, the step's status and time at its first row."""
    steps = report["steps"]
    head = [f"GPU check: {report['device_name']}, torch {report['torch']}, {report['date']}, "
            f"commit {(report.get('git_commit') or '?')[:7]}, {report['wall_s']:.0f} s"
            + (" (SMOKE: CPU, tiny sizes)" if report["smoke"] else ""), "",
            "| step | setting | figure | value |", "|---|---|---|---|"]
    rows = []

    def status(name):
        s = steps.get(name, {})
        st = s.get("status", "not run")
        return f"{st}, {s['wall_s']:.0f} s" if "wall_s" in s else st

    def add(name, setting, figure, value):
        rows.append(f"| {name} | {setting} | {figure} | {value} |")

    for name in STEPS:
        s = steps.get(name)
        if s is None:
            continue
        fig = s.get("figures") or {}
        setting = s["setting"]
        if s["status"] != "ok" and not fig:
            add(name, setting, status(name), (s.get("error") or "").replace("|", "/")[:300])
            continue
        if name == "tiny_checkpoint":
            add(name, setting, "built", status(name))
        elif name == "golden":
            add(name, setting, "status", status(name))
            for dtype, d in fig.items():
                first = ", ".join(f"{c} @{f}" for c, f in d["first_differing_frames"].items())
                add(name, dtype, "codes / reasoner tokens / voice codes equal",
                    f"{d['codes_equal']} / {d['thinker_tokens_equal']} / {d['prompt_codes_equal']} of {d['cases']} cases"
                    + (f" (first differing frame: {first})" if first else ""))
                add(name, dtype, "fixed-shape step" + (" (CUDA graphs)" if d["frame_step_graphs"] else " (eager)")
                    + ": codes equal", f"{d['frame_step_codes_equal']} of {d['frame_step_cases']} cases")
                add(name, dtype, "largest audio diff (all / cases with equal codes), RMS diff",
                    f"{_g(d['max_audio_head_abs_diff'])} / {_g(d['max_audio_head_abs_diff_codes_equal'])}, "
                    f"{_g(d['max_audio_rms_diff'])}")
        elif name == "streaming":
            o, b = fig.get("ours") or {}, fig.get("baseline")
            add(name, setting, "status", status(name))
            add(name, "ours", "TTFA p50 (ms)", _f(o.get("ttfa_p50_ms")))
            add(name, "ours", "frame p50 / p99 (ms)", f"{_f(o.get('frame_p50_ms'), 2)} / {_f(o.get('frame_p99_ms'), 2)}")
            add(name, "ours", "codes only p50 / p99 (ms)",
                f"{_f(o.get('frame_gen_p50_ms'), 2)} / {_f(o.get('frame_gen_p99_ms'), 2)}")
            add(name, "ours", "RTF, peak memory (MB)", f"{_f(o.get('rtf'), 3)}, {_f(o.get('peak_mem_mb'), 0)}")
            if b:
                sp = fig.get("speedup") or {}
                add(name, "original-style loop", "TTFA p50 (ms, whole reply)", _f(b.get("ttfa_p50_ms")))
                add(name, "original-style loop", "frame p50 / p99 (ms)",
                    f"{_f(b.get('frame_p50_ms'), 2)} / {_f(b.get('frame_p99_ms'), 2)}")
                add(name, "baseline / ours", "frame p50, codes p50, TTFA p50",
                    f"{_f(sp.get('frame_p50'), 2, 'x')}, {_f(sp.get('frame_gen_p50'), 2, 'x')}, "
                    f"{_f(sp.get('ttfa_p50'), 1, 'x')}")
            v = fig.get("verification")
            if v:
                add(name, "greedy check", "codes / reasoner tokens equal to the baseline",
                    f"{v.get('codes_equal')} / {v.get('reasoner_tokens_equal')}"
                    + (f" ({v['leading_frames_equal']} leading frames equal)" if "leading_frames_equal" in v else ""))
        elif name == "engine":
            e = fig.get("engine") or {}
            add(name, setting, "status", status(name) + (f"; engine built for {e.get('max_conversations')}, "
                                                         f"CUDA graphs {e.get('cuda_graphs')}" if e else ""))
            for r in fig.get("rows", []):
                n = r["conversations"]
                if "refused" in r:
                    add(name, f"N = {n}", "refused", r["refused"].replace("|", "/")[:200])
                    continue
                value = (f"{_f(r.get('tick_p50_ms'), 2)} / {_f(r.get('tick_p99_ms'), 2)} "
                         f"({r.get('full_width_ticks', 0)} ticks); real time: "
                         f"{'yes' if r.get('real_time') else 'no' if 'real_time' in r else '-'}")
                if r.get("error"):
                    value += f"; ERROR: {r['error'].replace('|', '/')[:150]}"
                add(name, f"N = {n}", "tick p50 / p99 (ms), all N speaking", value)
            add(name, setting, "calls kept in real time (tick p99 <= 80 ms)", str(fig.get("calls_kept_in_real_time")))
        elif name == "realtime":
            add(name, setting, "status", status(name))
            for r in fig.get("rows", []):
                def pp(k):
                    v = r.get(k)
                    return f"{_f(v['p50'])} / {_f(v['p95'])}" if v else "-"
                add(name, f"{r['sessions']} sessions, {r['turns_timed']} timed turns",
                    "ttfa / after_stop / engine_ttfa / overhead, p50 / p95 (ms)",
                    f"{pp('ttfa_ms')}; {pp('after_stop_ms')}; {pp('engine_ttfa_ms')}; {pp('overhead_ms')}")
                add(name, f"{r['sessions']} sessions", "refused, failed sessions; overhead target met",
                    f"{r['refused']}, {r['failures']}; {r['target_met']}")
    return "\n".join(head + rows)


# ============================================================================ main

def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        wp = argparse.ArgumentParser(prog="gpu_check.py --worker")
        wp.add_argument("kind", choices=("golden", "engine"))
        wp.add_argument("--checkpoint")
        wp.add_argument("--config")
        wp.add_argument("--device", required=True)
        wp.add_argument("--dtype", default="auto")
        wp.add_argument("--dtypes", default="float32")
        wp.add_argument("--sweep", default="1")
        wp.add_argument("--frames", type=int, default=50)
        wp.add_argument("--warmup-frames", type=int, default=8)
        wp.add_argument("--count-timeout-s", type=float, default=90)
        wp.add_argument("--threads", type=int, default=None)
        wp.add_argument("--out", required=True)
        wargs = wp.parse_args(argv[1:])
        return golden_worker(wargs) if wargs.kind == "golden" else engine_worker(wargs)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, every step (a test; < 3 min on 2 cores)")
    ap.add_argument("--out", help="the JSON (default: benchmarks/results/gpu_check_<device>.json; with --smoke a temp file)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's time (default 450 on CUDA, 170 with --smoke): steps get what is left")
    ap.add_argument("--steps", default=",".join(STEPS[1:]),
                    help=f"which steps, comma-separated (default all: {','.join(STEPS[1:])})")
    ap.add_argument("--speech-cache", default=str(SPEECH_CACHE), help="bench_realtime.py's espeak-ng clips")
    ap.add_argument("--prepare-speech", action="store_true",
                    help="only write the espeak-ng clips to --speech-cache (for a GPU machine without espeak-ng)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (tiny checkpoint, step logs)")
    args = ap.parse_args(argv)
    if args.prepare_speech:
        return prepare_speech(Path(args.speech_cache))
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; the steps are {', '.join(STEPS[1:])}")

    import torch   # after the arguments: --help and --prepare-speech stay light
    if not args.smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "cuda"
    size, times = SIZES[mode], STEP_TIME[mode]
    budget = args.budget_s or size["budget_s"]
    t0 = time.monotonic()
    device_name = torch.cuda.get_device_name() if mode == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    if args.out:
        out = Path(args.out)
    elif mode == "cuda":
        out = HERE / "results" / f"gpu_check_{device_slug(device_name)}.json"
    else:
        out = Path(tempfile.gettempdir()) / "gpu_check_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    logs = work / "logs"
    logs.mkdir()
    ckpt = work / "tiny_chroma"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "plugins" / "pipecat")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    py, me = sys.executable, str(Path(__file__).resolve())
    dev, dtype, threads = size["device"], size["dtype"], size["threads"]
    thr = ["--threads", str(threads)] if threads else []
    config_label = "full size (random weights)" if mode == "cuda" else "tiny config (random weights)"

    steps = []
    if {"golden", "realtime"} & set(wanted):
        steps.append(Step("tiny_checkpoint", "tiny checkpoint (seed 0), built on this machine",
                          [py, "-m", "chroma_agent.testing.tiny_checkpoint", str(ckpt)], None))
    if "golden" in wanted:
        steps.append(Step("golden", f"tiny checkpoint on {dev}, {len(json.loads(GOLDEN.read_text())['cases'])} cases",
                          [py, me, "--worker", "golden", "--checkpoint", str(ckpt), "--device", dev,
                           "--dtypes", size["golden_dtypes"], *thr, "--out", str(work / "golden.json")],
                          work / "golden.json"))
    if "streaming" in wanted:
        streaming_cmd = [py, str(HERE / "bench_streaming.py"), "--config", str(size["config"]), "--device", dev,
                         "--dtype", dtype, "--frames", str(size["streaming_frames"]),
                         "--runs", str(size["streaming_runs"]), *thr, "--out", str(work / "streaming.json")]
        steps.append(Step("streaming", f"{config_label}, {dtype}, {size['streaming_frames']} frames x "
                                       f"{size['streaming_runs']} runs",
                          streaming_cmd, work / "streaming.json",
                          fallback=(f"{config_label}, {dtype}, {size['streaming_frames']} frames x "
                                    f"{size['streaming_runs']} runs, ours only (the run with the original-style "
                                    "loop failed)", streaming_cmd + ["--skip-baseline"])))
    if "engine" in wanted:
        graphs = "CUDA graphs" if mode == "cuda" else "eager"
        steps.append(Step("engine", f"{config_label}, {dtype}, {graphs}, {size['engine_frames']} frames",
                          [py, me, "--worker", "engine", "--config", str(size["config"]), "--device", dev,
                           "--dtype", dtype, "--sweep", size["engine_sweep"], "--frames", str(size["engine_frames"]),
                           "--warmup-frames", str(size["engine_warmup_frames"]),
                           "--count-timeout-s", str(size["engine_count_timeout_s"]), *thr,
                           "--out", str(work / "engine.json")],
                          work / "engine.json"))
    if "realtime" in wanted:
        n = size["realtime_sessions"]
        steps.append(Step("realtime", f"TINY checkpoint on {dev} (the full size has no processor offline), "
                                      f"{size['realtime_dtype']}, {n} sessions",
                          [py, str(HERE / "bench_realtime.py"), "--model", str(ckpt), "--device", dev,
                           "--dtype", size["realtime_dtype"], "--sessions", str(n),
                           "--turns", str(size["realtime_turns"]), "--warmup-turns", "1",
                           "--speech-cache", args.speech_cache, "--start-timeout", "120",
                           *(["--torch-threads", str(threads)] if threads else []),
                           "--out", str(work / "realtime.json")],
                          work / "realtime.json"))

    print(f"gpu_check ({'SMOKE: CPU, tiny sizes' if args.smoke else device_name}): steps "
          f"{', '.join(s.name for s in steps)}; budget {budget:.0f} s; work folder {work}", flush=True)
    report = {"gpu_check": 1, "smoke": args.smoke, "device_name": device_name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": None,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "budget_s": budget,
              "steps": {}}
    try:
        report["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass

    for i, step in enumerate(steps):
        report["steps"][step.name] = step.record
        needs_ckpt = step.name in ("golden", "realtime")
        left = budget - (time.monotonic() - t0)
        later = sum(times[s.name][1] for s in steps[i + 1:])
        timeout = min(times[step.name][0], left - later)
        if needs_ckpt and report["steps"].get("tiny_checkpoint", {}).get("status") != "ok":
            step.record.update(status="skipped", error="no tiny checkpoint (its step failed)")
        elif step.name == "realtime" and (why := speech_ready(Path(args.speech_cache))):
            step.record.update(status="skipped", error=why)
        elif timeout < min(times[step.name][1], 10):
            step.record.update(status="skipped", error=f"out of the time budget ({budget:.0f} s)")
        else:
            run_step(step, timeout, logs, env)
            left = budget - (time.monotonic() - t0) - later
            if step.record["status"] == "failed" and step.fallback and left >= times[step.name][1]:
                first = {k: step.record.get(k) for k in ("setting", "command", "error", "wall_s", "log_tail")}
                step.setting, step.cmd = step.fallback
                step.record = {"setting": step.setting, "status": "pending", "first_attempt": first}
                report["steps"][step.name] = step.record
                if step.json_path is not None:
                    step.json_path.unlink(missing_ok=True)
                run_step(step, min(times[step.name][0], left), logs, env)
            step.record["figures"] = summarize(step.name, step.record.get("result"))
        if step.record["status"] == "skipped":
            print(f"\n== {step.name}: skipped: {step.record['error']}", flush=True)
        report["wall_s"] = time.monotonic() - t0
        out.write_text(json.dumps(report, indent=1))   # after each step: a run cut short keeps the rest

    report["wall_s"] = time.monotonic() - t0
    report["table_markdown"] = table(report)
    report["all_ok"] = all(s["status"] == "ok" for s in report["steps"].values())
    out.write_text(json.dumps(report, indent=1))
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report["table_markdown"] + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f} s; "
          + ", ".join(f"{k} {v['status']}" for k, v in report["steps"].items()) + ")", flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
