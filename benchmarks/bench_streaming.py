#!/usr/bin/env python3
"""Streaming latency benchmark: chroma_agent's runtime vs an original-style loop.

Both loops run in the same process, on the same weights and the same inputs:

* ours: what `Conversation` does per reply (without its event wrapping): Whisper
  features of the user turn -> `ReplyFrames` (reasoner prefill, backbone + decoder per
  frame, voice-prefix KV computed once per voice before timing) -> one
  `StreamingMimiDecoder` per reply, each frame decoded to a numpy chunk of 1920 samples
  the moment its codes exist;
* baseline: `benchmarks/original_loop.py`, the ORIGINAL FlashLabs implementation's
  per-frame structure (stock transformers `LlamaModel` forwards over `DynamicCache`s,
  a fresh decoder cache and 7 decoder calls per frame, voice prefix recomputed per reply,
  full-sequence Mimi decode at the end).

Before timing, the script checks (greedy decoding, a few frames) that both loops produce
exactly the same codes and reasoner tokens.

    PYTHONPATH=. python3 benchmarks/bench_streaming.py --checkpoint /tmp/tiny --frames 100 \
        --out benchmarks/results/tiny_cpu.json
    PYTHONPATH=. python3 benchmarks/bench_streaming.py --config chroma_agent/testing/data/full_size_config.json \
        --device cuda --dtype bfloat16 --frames 200 --out benchmarks/results/full_h100.json

See benchmarks/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing
sys.path.insert(0, str(HERE))

import transformers  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402

from chroma_agent import ChromaConfig, ChromaModel, ReplyFrames, SamplingOptions, Voice  # noqa: E402
from chroma_agent.model.codec import StreamingMimiDecoder  # noqa: E402
from chroma_agent.runtime.frame_step import FrameStep  # noqa: E402
from chroma_agent.runtime.generation import Reasoner  # noqa: E402
from chroma_agent.model.processor import ReasonerInput, audio_token_count  # noqa: E402
from chroma_agent.model.matmul import projection_plans  # noqa: E402
from original_loop import OriginalStyleLoop  # noqa: E402

FRAME_S = 0.08            # one frame = 1920 samples at 24 kHz
USER_SECONDS = 5.0
USER_RATE = 16000
VOICE_FRAMES = 63         # ceil(5 s * 12.5 frames/s)
VERIFY_FRAMES = 8
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# ----------------------------------------------------------------------------- inputs
def make_user_audio(seconds: float = USER_SECONDS, rate: int = USER_RATE) -> np.ndarray:
    """A deterministic sine/noise mix, float32 mono at 16 kHz."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(1234)
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.15 * np.sin(2 * np.pi * 523.25 * t) \
        + 0.05 * rng.standard_normal(t.size)
    return (wave * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))).astype(np.float32)


def make_voice(seed: int = 0) -> Voice:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2048, size=(VOICE_FRAMES, 8), dtype=np.int64)
    ids = tuple(int(i) for i in rng.integers(100, 900, size=20))
    return Voice(codes=codes, transcript="benchmark", transcript_ids=ids)


class UserTurn:
    """Turns the user's 16 kHz audio into the reasoner's prefill input (timed per reply)."""

    def __init__(self, model: ChromaModel, audio: np.ndarray):
        self.audio = audio
        self.extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=USER_RATE)
        thinker = model.config.thinker
        self.start, self.token, self.end = (thinker.audio_start_token_id, thinker.audio_token_index,
                                            thinker.audio_end_token_id)
        self.text_ids = [int(i) for i in np.random.default_rng(7).integers(100, 900, size=16)]

    def __call__(self) -> ReasonerInput:
        feats = self.extractor(self.audio, sampling_rate=USER_RATE, padding=False,
                               return_attention_mask=True, return_tensors="pt")
        mask = feats["attention_mask"]
        n = audio_token_count(int(mask.sum()))
        ids = torch.tensor([self.text_ids + [self.start] + [self.token] * n + [self.end]])
        return ReasonerInput(ids, feats["input_features"], mask)


# ----------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one phase. CUDA: `max_memory_allocated` (reset at the phase start).
    CPU: the peak RSS of the whole process (`ru_maxrss`) during the phase, after resetting
    it through /proc/self/clear_refs (which resets VmHWM and ru_maxrss together) when the
    kernel lets us, else the process's lifetime peak; `process_peak_rss_mb` keeps the
    lifetime peak either way."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phase_reset = False
        self.lifetime_kb = 0     # ru_maxrss is reset along with VmHWM: keep the lifetime peak here

    def _maxrss_kb(self) -> int:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.lifetime_kb = max(self.lifetime_kb, kb)
        return kb

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._maxrss_kb()
        try:  # "5" resets the peak RSS (VmHWM, and with it ru_maxrss) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.phase_reset = True
        except OSError:
            self.phase_reset = False

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {"peak_mem_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "peak_mem_kind": "torch.cuda.max_memory_allocated during the timed replies "
                                     "(weights included)"}
        kb = self._maxrss_kb()
        kind = ("peak RSS of the whole process during the timed replies (ru_maxrss, reset at the "
                "phase start through /proc/self/clear_refs; weights, Python and libraries included)"
                if self.phase_reset else
                "peak RSS of the whole process since it started (ru_maxrss; could not reset it per phase)")
        return {"peak_mem_mb": kb / 1024, "peak_mem_kind": kind,
                "process_peak_rss_mb": self.lifetime_kb / 1024}


class ForeignLoad:
    """CPU time that OTHER processes used during a phase, in CPUs (from /proc/stat minus
    this process's own CPU time): on a small machine, anything else running skews the
    timings, so the result records it."""

    def _busy(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / hz

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), time.process_time()

    def stop(self):
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        foreign = (busy - self.busy0) - (time.process_time() - self.own0)
        return max(0.0, foreign / wall) if wall > 0 else None


def _rounded(value, digits: int = 4):
    """Floats to `digits` decimals (times are in ms: 0.1 us resolution), for a readable JSON."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _median(values):
    return float(np.median(values)) if values else None


def _cpus(load) -> str:
    return "unknown" if load is None else f"{load:.2f} CPUs"


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


# ----------------------------------------------------------------------------- the two loops
def run_ours(model, voice, prefix, user_turn, frames, sampling, frame_step=None) -> dict:
    """One reply on our runtime. Times are from the hand-over of the user's audio.
    `frame_step`: the conversation's FrameStep (fixed shapes, CUDA graphs on GPU), as `Conversation` builds it."""
    device = model.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        prompt = user_turn()
        reply = ReplyFrames(model, voice, prompt, frames, sampling, prefix=prefix, reasoner=Reasoner(model),
                            frame_step=frame_step)
        decoder = StreamingMimiDecoder(model.codec_model, model.config.num_codebooks)
        stamps, gen_ms, codec_ms, samples = [], [], [], 0
        last = t0
        for frame in reply:  # the frame's codes exist (its end-of-speech check synced)
            coded = time.perf_counter()
            pcm = decoder.decode_frame(frame.codes[None])[0].float().cpu().numpy()  # syncs on CUDA
            stamps.append(time.perf_counter())
            gen_ms.append((coded - last) * 1000)
            codec_ms.append((stamps[-1] - coded) * 1000)
            last = stamps[-1]
            samples += pcm.shape[0]
        sync(device)
        t1 = time.perf_counter()
    out = _timings(t0, t1, stamps, samples, reply.stop_reason)
    out["frame_gen_ms"] = gen_ms[1:]   # codes only (what the baseline's frame_ms measures)
    out["codec_ms"] = codec_ms
    return out


def run_baseline(loop: OriginalStyleLoop, voice, user_turn, frames, sampling) -> dict:
    device = loop.model.device
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        prompt = user_turn()
        reply = loop.reply(voice, prompt, frames, sampling, decode=True)   # audio: numpy, on the host
        sync(device)
        t1 = time.perf_counter()
    out = _timings(t0, t1, reply.frame_done, int(reply.audio.shape[0]), reply.stop_reason)
    out["ttfa_ms"] = (t1 - t0) * 1000   # no audio before the whole reply is decoded
    out["decode_ms"] = (t1 - reply.frame_done[-1]) * 1000 if reply.frame_done else None
    return out


def _timings(t0, t1, stamps, samples, stop_reason) -> dict:
    return {"ttfa_ms": (stamps[0] - t0) * 1000 if stamps else None,
            "frame_ms": [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])],
            "total_ms": (t1 - t0) * 1000, "frames": len(stamps), "samples": samples,
            "rtf": (t1 - t0) / (len(stamps) * FRAME_S) if stamps else None, "stop_reason": stop_reason}


def verify(model, loop, voice, prefix, user_turn, strict: bool) -> dict:
    """Greedy, a few frames: both loops must give the same codes and reasoner tokens.

    In float32 they do exactly (the tiny golden cases pin both to the original). In
    bfloat16/float16 the two loops reduce in different orders (the baseline runs the voice
    prefix and the first step as one block), so a near-tie argmax may flip: unless `strict`,
    a mismatch there is reported (how many leading frames agree) instead of failing; the
    timing comparison stays like for like, as both loops do the same work per frame."""
    greedy = SamplingOptions(greedy=True)
    with torch.inference_mode():
        reply = ReplyFrames(model, voice, user_turn(), VERIFY_FRAMES, greedy, prefix=prefix, reasoner=Reasoner(model))
        decoder = StreamingMimiDecoder(model.codec_model, model.config.num_codebooks)
        ours, chunks = [], []
        for frame in reply:
            ours.append(frame.codes.cpu())
            chunks.append(decoder.decode_frame(frame.codes[None])[0].float().cpu().numpy())
        base = loop.reply(voice, user_turn(), VERIFY_FRAMES, greedy, decode=True)
    ours = torch.stack(ours).numpy()
    theirs = base.codes.cpu().numpy()
    codes_equal = ours.shape == theirs.shape and np.array_equal(ours, theirs)
    tokens_equal = list(reply.text_ids) == list(base.text_ids)
    out = {"frames": VERIFY_FRAMES, "codes_equal": codes_equal, "reasoner_tokens_equal": tokens_equal,
           "reasoner_tokens": list(reply.text_ids)}
    if not (codes_equal and tokens_equal):
        n = min(len(ours), len(theirs))
        same = next((i for i in range(n) if not np.array_equal(ours[i], theirs[i])), n)
        message = (f"baseline differs from the runtime (greedy, {VERIFY_FRAMES} frames, {model.dtype}): "
                   f"{same} leading frames equal; ours={ours.tolist()} baseline={theirs.tolist()}; "
                   f"reasoner tokens ours={reply.text_ids} baseline={base.text_ids}")
        out.update(leading_frames_equal=same, ours_codes=ours.tolist(), baseline_codes=theirs.tolist(),
                   baseline_reasoner_tokens=list(base.text_ids))
        if strict or model.dtype == torch.float32:
            raise AssertionError(message)
        warnings.warn(message + " (reduced precision: continuing; --strict-verify makes this fatal)", stacklevel=1)
        return out
    audio = np.concatenate(chunks)
    out["streaming_vs_full_decode_max_abs_diff"] = (float(np.abs(audio - base.audio).max())
                                                    if audio.shape == base.audio.shape else None)
    return out


# ----------------------------------------------------------------------------- reporting
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    extra = ""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = fields.get("Model name", name)
        family = (f"family {fields['CPU family']} model {fields['Model']}"
                  if "CPU family" in fields and "Model" in fields else "")
        parts = [family,
                 f"{fields['CPU(s)']} logical CPUs" if "CPU(s)" in fields else "",
                 f"{fields['Hypervisor vendor']} guest" if "Hypervisor vendor" in fields else ""]
        extra = ", ".join(p for p in parts if p)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return f"{name or platform.machine()} ({extra})" if extra else (name or platform.machine())


def summarize(runs: list[dict], mem: dict) -> dict:
    frame_ms = [x for r in runs for x in r["frame_ms"]]
    ttfa = [r["ttfa_ms"] for r in runs]
    out = {"ttfa_ms": ttfa, "ttfa_p50_ms": float(np.median(ttfa)),
           "frame_ms": frame_ms, "frame_ms_per_run": [r["frame_ms"] for r in runs],
           **{k: v for k, v in percentiles(frame_ms).items()},
           # frame_ms[i] ends at frame i + 1; an even frame carries a reasoner step and a
           # 3-position backbone input (while the reasoner has not emitted im_end)
           "p50_even_frames": _median([x for r in runs for i, x in enumerate(r["frame_ms"]) if (i + 1) % 2 == 0]),
           "p50_odd_frames": _median([x for r in runs for i, x in enumerate(r["frame_ms"]) if (i + 1) % 2 == 1]),
           "rtf": float(np.mean([r["rtf"] for r in runs])), "rtf_per_run": [r["rtf"] for r in runs],
           "total_ms": [r["total_ms"] for r in runs], "frames_per_run": [r["frames"] for r in runs],
           "stop_reasons": [r["stop_reason"] for r in runs],
           "foreign_cpu_load_per_run": [r.get("foreign_cpu_load") for r in runs]}
    if "decode_ms" in runs[0]:
        out["final_decode_ms"] = [r["decode_ms"] for r in runs]
    if "frame_gen_ms" in runs[0]:  # ours: the frame's codes alone, and its streaming codec decode
        gen = [x for r in runs for x in r["frame_gen_ms"]]
        out["frame_gen_ms"] = gen
        out["gen"] = percentiles(gen)
        out["codec_ms_p50"] = _median([x for r in runs for x in r["codec_ms"]])
    out.update(mem)
    return out


def fmt(x, unit="", digits=2):
    if x is None:
        return "-"
    return f"{x:.{digits}f}{unit}"


def print_table(result: dict) -> None:
    ours, base = result["ours"], result.get("baseline")
    rows = [("TTFA p50 (ms)", "ttfa_p50_ms", 1), ("frame p50 (ms)", "p50", 2), ("frame p95 (ms)", "p95", 2),
            ("frame p99 (ms)", "p99", 2), ("  p50 even frames", "p50_even_frames", 2),
            ("  p50 odd frames", "p50_odd_frames", 2), ("RTF", "rtf", 3), ("peak mem (MB)", "peak_mem_mb", 0)]
    print()
    print(f"{'':22s}{'ours':>14s}{'baseline':>14s}")
    for label, key, d in rows:
        print(f"{label:22s}{fmt(ours.get(key), digits=d):>14s}{fmt(base.get(key) if base else None, digits=d):>14s}")
    gen = ours.get("gen", {})
    print(f"{'codes-only p50/p99':22s}{fmt(gen.get('p50')) + ' / ' + fmt(gen.get('p99')):>14s}"
          f"   (ours without its streaming codec decode, {fmt(ours.get('codec_ms_p50'))} ms p50)")
    if base:
        s = result["speedup"]
        print(f"{'speed-up frame p50':22s}{fmt(s['frame_p50'], 'x'):>14s}")
        print(f"{'speed-up codes p50':22s}{fmt(s['frame_gen_p50'], 'x'):>14s}")
        print(f"{'speed-up TTFA p50':22s}{fmt(s['ttfa_p50'], 'x'):>14s}")
    print(f"(peak mem: {ours['peak_mem_kind']})")
    if result["device"] == "cpu":
        loads = {k: result[k].get("foreign_cpu_load") for k in ("ours", "baseline") if result.get(k)}
        print("other processes' CPU use during the timed replies: "
              + ", ".join(f"{k} {v:.2f} CPUs" if v is not None else f"{k} unknown" for k, v in loads.items()))
        if any(v is not None and v > 0.2 for v in loads.values()):
            print(f"WARNING: other processes competed for this machine's {os.cpu_count()} CPUs: "
                  "the timings are not representative; rerun on a quiet machine")


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install matplotlib, or the 'bench' extra): "
                      "skipping the plot", stacklevel=1)
        return False
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    sides = [("ours", "tab:blue")] + ([("baseline", "tab:red")] if result.get("baseline") else [])
    for side, color in sides:
        per_run = result[side]["frame_ms_per_run"]
        n = min(len(r) for r in per_run)
        if n == 0:
            continue
        arr = np.array([r[:n] for r in per_run])
        idx = np.arange(1, n + 1)
        for r in arr:
            ax.plot(idx, r, color=color, alpha=0.25, lw=0.8)
        ax.plot(idx, np.median(arr, axis=0), color=color, lw=1.6,
                label=f"{side} (median of {len(arr)} runs; p50 {result[side]['p50']:.2f} ms)")
    ax.set_xlabel("frame index")
    ax.set_ylabel("time since previous frame (ms)")
    all_ms = [x for side, _ in sides for x in result[side]["frame_ms"] if x > 0]
    if all_ms and max(all_ms) / min(all_ms) > 10:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_title("per-frame latency (interval ending at each frame)")
    if all_ms and max(all_ms) > 40:
        ax.axhline(80, color="gray", ls="--", lw=0.8)
        ax.text(1, 80, " 80 ms = real time", va="bottom", fontsize=8, color="gray")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    names = [s for s, _ in sides]
    vals = [result[s]["ttfa_p50_ms"] for s in names]
    bars = bx.bar(names, vals, color=[c for _, c in sides])
    for b, v in zip(bars, vals):
        bx.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} ms", ha="center", va="bottom", fontsize=9)
    bx.set_ylabel("time to first audio, p50 (ms)")
    bx.set_title("TTFA after a 5 s user turn")
    fig.suptitle(f"{result['device_name']} | {result['dtype']} | {result['config']} | "
                 f"{result['frames']} frames x {result['runs']} runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
def _check_host_memory(config: str, bytes_per_param: int) -> None:
    """Refuse early (instead of meeting the OOM killer) when the weights alone exceed the
    host's available memory."""
    try:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    with torch.device("meta"):
        params = sum(p.numel() for p in ChromaModel(ChromaConfig.from_file(config)).parameters())
    need = params * bytes_per_param * 1.1
    if need > avail:
        sys.exit(f"{config}: {params / 1e9:.1f}B parameters need about {need / 2**30:.1f} GiB at "
                 f"{bytes_per_param} bytes each, but only {avail / 2**30:.1f} GiB are available"
                 + ("; try --dtype bfloat16" if bytes_per_param == 4 else ""))


def load_random(config: str, device: torch.device, dtype: str) -> ChromaModel:
    """`ChromaModel.from_config` (random weights, built directly in the target dtype)."""
    wanted = _DTYPES.get(dtype) if dtype not in (None, "auto") else None
    if device.type == "cpu":
        _check_host_memory(config, 4 if wanted in (None, torch.float32) else 2)
    return ChromaModel.from_config(config, device=device, dtype=dtype)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a Chroma checkpoint directory (real or tiny)")
    src.add_argument("--config", help="a Chroma config.json, random weights "
                                      "(e.g. chroma_agent/testing/data/full_size_config.json)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--frames", type=int, default=100, help="frames per reply, default 100 (random weights never emit EOS)")
    ap.add_argument("--runs", type=int, default=3, help="timed replies per loop, after one untimed warm-up reply (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2 on CPU)")
    ap.add_argument("--out", default=None, help="JSON path (a PNG plot is written next to it)")
    ap.add_argument("--skip-baseline", action="store_true", help="time only our runtime (no verification either)")
    ap.add_argument("--skip-verify", action="store_true", help="do not check that both loops give the same codes")
    ap.add_argument("--strict-verify", action="store_true",
                    help="fail on a code mismatch in bfloat16/float16 too (always fatal in float32)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the timed replies (default 0)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    elif args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.checkpoint:
        model = ChromaModel.from_pretrained(args.checkpoint, device=device, dtype=args.dtype)
        config_label = f"checkpoint {args.checkpoint}"
    else:
        model = load_random(args.config, device, args.dtype)
        config_label = f"random weights from {args.config}"
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    arch = (f"backbone {cfg.backbone.num_hidden_layers}L/{cfg.backbone.hidden_size}, "
            f"decoder {cfg.decoder.num_hidden_layers}L/{cfg.decoder.hidden_size}, "
            f"reasoner {cfg.thinker.text_config.num_hidden_layers}L/{cfg.thinker.text_config.hidden_size}")
    layers = cfg.backbone.num_hidden_layers
    size = "tiny" if layers <= 2 else "full" if layers >= 16 else "custom"
    print(f"loaded {config_label} ({size}: {arch}; {params / 1e6:.0f}M params) on {device} "
          f"{model.dtype} in {time.perf_counter() - t:.1f} s; threads={torch.get_num_threads()}", flush=True)

    voice = make_voice()
    user_turn = UserTurn(model, make_user_audio())
    prompt_len = user_turn().input_ids.shape[1]
    t = time.perf_counter()
    prefix = model.prefix_state(voice)   # once per voice, as in production (not timed)
    # as Conversation does: on CUDA each frame is a graph replay (captured in the warm-up reply)
    frame_step = FrameStep(model)  # as a conversation builds it: fixed shapes and graphs on CUDA
    sync(device)
    print(f"voice prefix KV: {time.perf_counter() - t:.3f} s (once per voice, not timed); "
          f"user turn: {USER_SECONDS:.0f} s audio -> {prompt_len} reasoner input ids", flush=True)
    loop = None if args.skip_baseline else OriginalStyleLoop(model)
    sampling = SamplingOptions(seed=args.seed)

    verification = None
    if loop is not None and not args.skip_verify:
        verification = verify(model, loop, voice, prefix, user_turn, args.strict_verify)
        if verification["codes_equal"] and verification["reasoner_tokens_equal"]:
            print(f"verified: baseline codes == runtime codes exactly (greedy, {VERIFY_FRAMES} frames, "
                  f"reasoner tokens {verification['reasoner_tokens']}); streaming vs full-sequence Mimi decode "
                  f"max |diff| = {verification['streaming_vs_full_decode_max_abs_diff']:.2e}", flush=True)

    mem = PeakMemory(device)
    result = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "dtype": str(model.dtype).replace("torch.", ""),
              "config": size, "config_source": config_label, "architecture": arch, "params": params,
              "frames": args.frames, "runs": args.runs, "user_audio_s": USER_SECONDS,
              "user_turn_input_ids": prompt_len, "voice_frames": VOICE_FRAMES, "sampling": {
                  "greedy": sampling.greedy, "temperature": sampling.temperature, "top_k": sampling.top_k,
                  "seed": sampling.seed},
              "verification": verification}

    # warm-up replies, then timed replies alternating ours / baseline, so that drift in this
    # machine's speed (other tenants, clocks) hits both loops alike
    sides = {"ours": lambda: run_ours(model, voice, prefix, user_turn, args.frames, sampling, frame_step)}
    if loop is not None:
        sides["baseline"] = lambda: run_baseline(loop, voice, user_turn, args.frames, sampling)
    for side, run in sides.items():
        t = time.perf_counter()
        warm = ForeignLoad()
        warm.start()
        run()
        print(f"{side}: warm-up reply {time.perf_counter() - t:.1f} s (other processes: {_cpus(warm.stop())})",
              flush=True)
    runs = {side: [] for side in sides}
    peaks = {side: [] for side in sides}
    for i in range(args.runs):
        for side, run in sides.items():
            run_load = ForeignLoad()
            mem.start()
            run_load.start()
            r = run()
            r["foreign_cpu_load"] = run_load.stop()
            peaks[side].append(mem.stop())
            runs[side].append(r)
            what = "TTFA (= whole reply)" if side == "baseline" else "TTFA"
            print(f"{side} run {i + 1}: {what} {r['ttfa_ms']:.1f} ms, frame p50 {fmt(_median(r['frame_ms']))} ms, "
                  f"RTF {r['rtf']:.3f} ({r['frames']} frames, {r['stop_reason']}; "
                  f"other processes: {_cpus(r['foreign_cpu_load'])})", flush=True)
    for side in sides:
        result[side] = summarize(runs[side], max(peaks[side], key=lambda m: m.get("peak_mem_mb") or 0))
        loads = [r["foreign_cpu_load"] for r in runs[side] if r["foreign_cpu_load"] is not None]
        result[side]["foreign_cpu_load"] = float(np.mean(loads)) if loads else None

    if loop is not None:
        ratio = lambda key: (result["baseline"][key] / result["ours"][key]  # noqa: E731
                             if result["baseline"][key] and result["ours"][key] else None)
        result["speedup"] = {"frame_p50": ratio("p50"), "ttfa_p50": ratio("ttfa_p50_ms"),
                             # like for like: the baseline's frames hold no codec work, these neither
                             "frame_gen_p50": result["baseline"]["p50"] / result["ours"]["gen"]["p50"]}

    result["projection_plans"] = projection_plans()  # how each CPU matmul shape ran (measured at load)
    print_table(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_rounded(result), indent=1))
        print(f"wrote {out}")
        png = out.with_suffix(".png")
        if plot(result, png):
            print(f"wrote {png}")
    return result


if __name__ == "__main__":
    main()
