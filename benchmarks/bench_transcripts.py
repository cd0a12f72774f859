#!/usr/bin/env python3
"""Caller transcripts on vs off: what the transcript pass costs the replies beside it.

For each N of the sweep (default 1 and 8), N engine conversations answer the same spoken
question at once (greedy, a fixed frame count, each consumed on its own thread as a
client would: in real time, a frame per 80 ms once its first audio is out, as a caller
hears it; `--free-running` reads as fast as the engine makes frames), first with
transcripts off, then on; runs alternate off / on (`--runs`)
so machine drift hits both. Per run: every reply's time to first audio (respond() ->
its first AudioChunk), the engine's tick times while it ran, and with transcripts on the
time from each reply's first audio to its TranscriptDone.

The issue's bar: with transcripts on, time to first audio p95 and tick p95 rise by at
most one tick (80 ms), and each transcript is complete within 1 s of its reply's first
audio. The tiny checkpoint never ends a transcript by itself, so each is capped at
`--transcript-tokens` (default 24: a 5 s sentence is ~15-25 tokens for the real model).

JSON (+ PNG with matplotlib). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from anywhere without installing

from chroma_agent import ChromaEngine, ChromaModel  # noqa: E402
from chroma_agent.events import AudioChunk, TranscriptDone  # noqa: E402

QUESTION = "What time does the store open on Saturday morning?"


def spoken_question(path: str | None) -> tuple[np.ndarray, int]:
    """The user turn: `path`, or the question spoken by espeak-ng."""
    import soundfile as sf

    if path is None:
        if shutil.which("espeak-ng") is None:
            sys.exit("espeak-ng is not installed: give --audio FILE (a spoken question)")
        path = str(Path(tempfile.mkdtemp()) / "question.wav")
        subprocess.run(["espeak-ng", "-w", path, QUESTION], check=True)
    audio, rate = sf.read(path, dtype="float32")
    return audio, rate


def one_call(engine, voice, audio, rate, frames, transcribe, cap, out, i, go, paced):
    with engine.conversation(voice=voice, transcribe=transcribe, max_transcript_tokens=cap) as conv:
        go.wait()
        start = time.perf_counter()
        first_audio = transcript_done = None
        # has_speech: as the servers do, whose VAD has found the turn (else Silero checks it first)
        for event in conv.respond(audio, rate, max_frames=frames, greedy=True, has_speech=True):
            now = time.perf_counter()
            if isinstance(event, AudioChunk):
                first_audio = first_audio or now
                if paced:  # played in real time: the next frame is wanted 80 ms after this one starts
                    time.sleep(max(0.0, first_audio + (event.frame_index + 1) * 0.080 - now))
            elif isinstance(event, TranscriptDone):
                transcript_done = now
        out[i] = {"ttfa_s": first_audio - start,
                  "transcript_after_first_audio_s": None if transcript_done is None else transcript_done - first_audio}


def run(engine, voice, audio, rate, n, frames, transcribe, cap, paced=True) -> dict:
    out, go = [None] * n, threading.Event()
    threads = [threading.Thread(target=one_call, args=(engine, voice, audio, rate, frames, transcribe, cap, out, i, go,
                                                       paced))
               for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # all conversations open
    ticks_before, started = len(engine.tick_times), time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    ticks = [ms for end, ms in list(engine.tick_times)[ticks_before:] if end >= started]
    ttfa = [r["ttfa_s"] * 1000 for r in out]
    after = [r["transcript_after_first_audio_s"] for r in out if r["transcript_after_first_audio_s"] is not None]
    result = {"ttfa_ms_p50": float(np.percentile(ttfa, 50)), "ttfa_ms_p95": float(np.percentile(ttfa, 95)),
              "tick_ms_p50": float(np.percentile(ticks, 50)), "tick_ms_p95": float(np.percentile(ticks, 95)),
              "ticks": len(ticks)}
    if transcribe:
        if len(after) != n:
            raise SystemExit(f"{n - len(after)} of {n} replies came without their transcript")
        result["transcript_after_first_audio_ms_max"] = max(after) * 1000
        result["transcript_after_first_audio_ms_p50"] = float(np.percentile(after, 50)) * 1000
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a checkpoint, not random weights: its processor writes the recognition prompt
    ap.add_argument("--checkpoint", required=True, help="a Chroma checkpoint (the tiny one, or FlashLabs/Chroma-4B)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--sweep", default="1,8", help="simultaneous calls")
    ap.add_argument("--frames", type=int, default=40, help="frames per reply (80 ms each)")
    ap.add_argument("--transcript-tokens", type=int, default=24, help="cap on each transcript's tokens")
    ap.add_argument("--runs", type=int, default=2, help="alternating off/on runs per count")
    ap.add_argument("--audio", help="the user turn (default: a question spoken by espeak-ng)")
    ap.add_argument("--free-running", action="store_true", help="consumers read frames as fast as they come")
    ap.add_argument("--out", default="benchmarks/results/transcripts_tiny_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ChromaModel.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    audio, rate = spoken_question(args.audio)
    voice_clip = np.asarray(audio[: rate * 2], np.float32)
    voice = model.voice_from_audio(voice_clip, "What time does the store", sample_rate=rate)
    counts = [int(n) for n in args.sweep.split(",")]
    results = []
    with ChromaEngine(model, max_conversations=max(counts)) as engine:
        run(engine, voice, audio, rate, 1, 4, True, args.transcript_tokens)  # first use: not timed
        for n in counts:
            runs = {"off": [], "on": []}
            for _ in range(args.runs):
                for mode in ("off", "on"):
                    runs[mode].append(run(engine, voice, audio, rate, n, args.frames, mode == "on",
                                          args.transcript_tokens, not args.free_running))
            best = {mode: {k: min(r[k] for r in rs) if "ms" in k else rs[0][k] for k in rs[0]}
                    for mode, rs in runs.items()}  # the best of the runs: drift and noise only add
            added = {k: best["on"][k] - best["off"][k] for k in ("ttfa_ms_p95", "tick_ms_p95")}
            row = {"calls": n, "off": best["off"], "on": best["on"], "added_ms": added, "runs": runs,
                   "within_one_tick": all(v <= 80 for v in added.values()),
                   "transcript_within_1s": best["on"]["transcript_after_first_audio_ms_max"] <= 1000}
            results.append(row)
            print(f"{n} calls: ttfa p95 {best['off']['ttfa_ms_p95']:.0f} -> {best['on']['ttfa_ms_p95']:.0f} ms, "
                  f"tick p95 {best['off']['tick_ms_p95']:.1f} -> {best['on']['tick_ms_p95']:.1f} ms, "
                  f"transcript done <= {best['on']['transcript_after_first_audio_ms_max']:.0f} ms after first audio")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"source": args.checkpoint, "device": str(model.device),
                               "machine": platform.processor() or platform.machine(), "threads": args.threads,
                               "frames": args.frames, "transcript_tokens": args.transcript_tokens,
                               "consumers": "free-running" if args.free_running else "real time",
                               "results": results}, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(results))
    for k, (key, label) in enumerate([("ttfa_ms_p95", "first audio p95"), ("tick_ms_p95", "tick p95")]):
        ax.bar(x + k * 0.4 - 0.3, [r["off"][key] for r in results], 0.2, label=f"{label}, off")
        ax.bar(x + k * 0.4 - 0.1, [r["on"][key] for r in results], 0.2, label=f"{label}, on")
    ax.set_xticks(x, [f"{r['calls']} calls" for r in results])
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
