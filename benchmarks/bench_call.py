#!/usr/bin/env python3
"""Phone-call latency benchmark: end of the caller's speech -> first reply audio on the wire,
over a loopback call to the phone server (`pipecat_chroma.phone.server`), in the protocol of
the carrier given by `--provider` (twilio by default; telnyx, plivo, exotel, vonage).

The script starts the phone server in a second process (the same `create_app` that
`chroma-agent serve phone --provider NAME` runs, the model loaded before the port opens) and
calls it with the carrier's test client (`pipecat_chroma.twilio_testing.TwilioCall`, Twilio's
Media Streams: 20 ms mu-law packets; `pipecat_chroma.phone.testing`'s TelnyxCall, PlivoCall,
ExotelCall, VonageCall for the others), audio in real time, silence between turns, espeak-ng
questions. The server runs without the carriers' secrets (nothing is signed on loopback).
Per turn it splits the
wait into
  turn detection  caller's last packet sent -> end of the user turn (VAD stop_secs + Smart Turn)
  model TTFA      the conversation's own time to first audio (respond() -> first 80 ms frame)
  overhead        everything else: the plugin, the pipeline, resampling, the socket both ways
from the server's per-turn timestamps (GET /calls) and the model's (a timing wrapper around
the model's conversations in the server process, served at GET /bench/model). All clocks are
time.time() on one machine.

    PYTHONPATH=.:plugins/pipecat python3 benchmarks/bench_call.py --model /tmp/tiny_chroma \
        --out benchmarks/results/call_tiny_cpu.json
    PYTHONPATH=.:plugins/pipecat python3 benchmarks/bench_call.py --model /tmp/tiny_chroma \
        --provider vonage --turns 6 --out benchmarks/results/call_vonage_tiny_cpu.json
    PYTHONPATH=.:plugins/pipecat python3 benchmarks/bench_call.py --model FlashLabs/Chroma-4B \
        --device cuda --dtype bfloat16 --max-frames 50 --out benchmarks/results/call_gpu.json
    PYTHONPATH=.:plugins/pipecat python3 benchmarks/bench_call.py --vad-sweep   # phone-audio VAD settings

See benchmarks/README.md ("Phone calls").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins" / "pipecat")]   # run from anywhere without installing

QUESTIONS = ["What time does the store open on Saturday?", "Can I change my delivery address?",
             "How much is the monthly plan?", "Is there a branch near the train station?",
             "I would like to book a table for two tonight."]
VOICE_TEXT = "Hello, thanks for calling. How can I help you today?"
TARGET_OVERHEAD_P95_MS = 30.0
# --provider -> the carrier's test client (module, class)
CLIENTS = {"twilio": ("pipecat_chroma.twilio_testing", "TwilioCall"),
           "telnyx": ("pipecat_chroma.phone.testing", "TelnyxCall"),
           "plivo": ("pipecat_chroma.phone.testing", "PlivoCall"),
           "exotel": ("pipecat_chroma.phone.testing", "ExotelCall"),
           "vonage": ("pipecat_chroma.phone.testing", "VonageCall")}
TITLES = {"twilio": "Twilio", "telnyx": "Telnyx", "plivo": "Plivo", "exotel": "Exotel", "vonage": "Vonage"}


def espeak(text: str, path: Path, rate: int | None = None, words_per_minute: int = 175) -> tuple[np.ndarray, int]:
    """espeak-ng speech, leading and trailing silence cut (the speech ends where the audio ends)."""
    import soundfile as sf
    import soxr

    subprocess.run(["espeak-ng", "-s", str(words_per_minute), "-w", str(path), text], check=True, capture_output=True)
    samples, sr = sf.read(path, dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    samples = samples[loud[0]:loud[-1] + 1]
    if rate and rate != sr:
        samples, sr = soxr.resample(samples, sr, rate).astype(np.float32), rate
    return samples, sr


# -- the server process ---------------------------------------------------------------------

class TimedModel:
    """The model, with each reply's timings recorded: when respond() was called and returned
    (it computes the features on the caller's thread), when the first audio chunk reached
    the caller, and the conversation's own time_to_first_audio_s."""

    def __init__(self, model):
        self._model = model
        self.replies: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def conversation(self, **kwargs):
        return _TimedConversation(self._model.conversation(**kwargs), self.replies)


class _TimedConversation:
    def __init__(self, conversation, replies: list[dict]):
        self._conversation, self._replies = conversation, replies

    def __getattr__(self, name):
        return getattr(self._conversation, name)

    def respond(self, *args, **kwargs):
        called = time.time()
        response = self._conversation.respond(*args, **kwargs)
        record = {"called": called, "returned": time.time(), "first_chunk": None, "model_ttfa_s": None}
        self._replies.append(record)
        return _TimedResponse(response, record)


class _TimedResponse:
    def __init__(self, response, record: dict):
        self._response, self._record = response, record

    def __getattr__(self, name):
        return getattr(self._response, name)

    async def __aiter__(self):
        from chroma_agent import AudioChunk, ResponseDone

        async for event in self._response:
            if isinstance(event, AudioChunk) and self._record["first_chunk"] is None:
                self._record["first_chunk"] = time.time()
            elif isinstance(event, ResponseDone):
                self._record["model_ttfa_s"] = event.stats.time_to_first_audio_s
            yield event


METRICS_ENV = "CHROMA_BENCH_METRICS"   # "off": the server process records no metrics (--metrics off)


def run_server(args) -> None:
    """The phone server with a timed model (this script's `--serve` mode)."""
    import torch
    import uvicorn
    from chroma_agent import ChromaModel, Voice
    from fastapi.responses import JSONResponse
    from pipecat_chroma.phone.server import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ChromaModel.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.voice:
        voice = Voice.load(args.voice)
    else:
        with tempfile.TemporaryDirectory() as d:
            clip, rate = espeak(VOICE_TEXT, Path(d) / "voice.wav")
        voice = model.voice_from_audio(clip, VOICE_TEXT, sample_rate=rate)
    timed = TimedModel(model)
    from chroma_agent.serving.metrics import NO_METRICS

    metrics = NO_METRICS if os.environ.get(METRICS_ENV) == "off" else None   # --metrics off: nothing recorded
    app = create_app(timed, voice, provider=args.provider, max_calls=1, max_frames=args.max_frames, metrics=metrics)

    @app.get("/bench/model")
    async def bench_model() -> JSONResponse:
        return JSONResponse({"replies": timed.replies, "device": str(model.device),
                             "dtype": str(model.dtype).replace("torch.", "")})

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--model", args.model, "--dtype", args.dtype,
           "--provider", args.provider,
           "--max-frames", str(args.max_frames), "--threads", str(args.threads)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--voice", args.voice] if args.voice else []
    log = Path(tempfile.mkdtemp(prefix="bench_call_")) / "server.log"
    # no carrier's secret: on loopback nothing is signed, as in the Twilio runs before carriers
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWILIO_", "TELNYX_", "PLIVO_", "EXOTEL_", "VONAGE_"))}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            get_json(base + "/health")
            return proc, base, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"the server did not start within {args.start_timeout} s:\n{log.read_text()[-3000:]}")


# GET /calls shows per-call records only with the admin key; the --serve process inherits it
ADMIN_KEY = os.environ.setdefault("CHROMA_AGENT_ADMIN_KEY", secrets.token_hex(16))


def get_json(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


# -- the call -------------------------------------------------------------------------------

def carrier_call(provider: str, url: str):
    """The carrier's test client for one call to `url` (ws://.../ws), with a call id of its own."""
    import importlib

    module, name = CLIENTS[provider]
    cls = getattr(importlib.import_module(module), name)
    call_id = f"bench-{uuid.uuid4().hex[:12]}"
    if provider == "twilio":
        return cls(url)
    if provider == "vonage":   # Vonage's call id comes in the NCCO's headers
        call = cls(url, parameters={"call_uuid": call_id})
        call.call_id = call_id
        return call
    return cls(url, call_id=call_id)


async def place_call(base: str, turns: int, questions: list[tuple[np.ndarray, int]],
                     provider: str = "twilio") -> list[dict]:
    """One call of `turns` turns: ask, wait for the first reply audio, let the reply play out,
    pause, ask the next. Returns per turn the caller's speech end and first audio received."""
    results = []
    async with carrier_call(provider, base.replace("http://", "ws://") + "/ws") as call:
        rate = getattr(call, "rate", 8000)   # the carrier's audio (TwilioCall: 8 kHz)
        await asyncio.sleep(1.0)  # the line is open: Silero and Smart Turn see silence first
        for i in range(turns):
            spoken = await call.say(*questions[i % len(questions)])
            heard, _ = await call.next_media(after=spoken, timeout=120)
            await call.until_quiet(timeout=120)  # the reply plays out (real time)
            results.append({"speech_end": spoken, "first_media": heard,
                            "reply_audio_s": call.received_audio(heard).size / rate})
            print(f"turn {i + 1}: {1000 * (heard - spoken):.0f} ms to first audio", file=sys.stderr)
            await asyncio.sleep(0.8)
        if provider == "twilio":
            call_sid = call.call_sid
            await call.stop()
        else:   # the carrier's stop event (Vonage: the websocket closes)
            call_sid = call.call_id
            await call.hang_up()
    for _ in range(100):  # the call's record is complete once it has finished
        if any(c["call_sid"] == call_sid for c in get_json(base + "/calls")["finished"]):
            break
        await asyncio.sleep(0.1)
    return results


def split_turns(client: list[dict], server_turns: list[dict], replies: list[dict]) -> list[dict]:
    """Per asked turn: the server turn that ended after its speech, the reply that followed."""
    rows = []
    for c in client:
        turn = next(t for t in server_turns if t["turn_end"] and t["turn_end"] > c["speech_end"] - 0.3
                    and t["audio_out"])
        reply = next(r for r in replies if r["called"] >= turn["turn_end"])
        total = c["first_media"] - c["speech_end"]
        detection = turn["turn_end"] - c["speech_end"]
        model = reply["model_ttfa_s"]
        rows.append({
            "total_ms": 1000 * total,
            "turn_detection_ms": 1000 * detection,
            "vad_stop_ms": 1000 * (turn["vad_stop"] - c["speech_end"]),
            "smart_turn_ms": 1000 * (turn["turn_end"] - turn["vad_stop"]),
            "model_ttfa_ms": 1000 * model,
            "overhead_ms": 1000 * (total - detection - model),
            # where the overhead goes
            "service_before_model_ms": 1000 * (reply["called"] - turn["turn_end"]),
            "service_after_model_ms": 1000 * (turn["first_audio"] - reply["called"] - model),
            "output_to_socket_ms": 1000 * (turn["audio_out"] - turn["first_audio"]),
            "socket_to_caller_ms": 1000 * (c["first_media"] - turn["audio_out"]),
            "respond_call_ms": 1000 * (reply["returned"] - reply["called"]),
            "service_ttfb_ms": 1000 * turn["model_ttfb_s"] if turn["model_ttfb_s"] else None,
            "reply_audio_s": c["reply_audio_s"],
        })
    return rows


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k.endswith("_ms") and all(r[k] is not None for r in rows)]
    return {k: {"p50": float(np.percentile([r[k] for r in rows], 50)),
                "p95": float(np.percentile([r[k] for r in rows], 95))} for k in keys}


def plot(rows: list[dict], summary: dict, path: Path, title: str) -> None:
    """Left: each turn's wait, stacked. Right: the overhead alone, by where it goes, against
    the target."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    x = np.arange(1, len(rows) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))

    def stack(ax, parts):
        bottom = np.zeros(len(rows))
        for key, label in parts:
            values = np.array([r[key] for r in rows])
            ax.bar(x, values, bottom=bottom, label=label)
            bottom += values
        ax.set_xlabel("turn")
        ax.set_xticks(x)

    stack(left, [(k, f"{label}: p50 {summary[k]['p50']:.0f}, p95 {summary[k]['p95']:.0f} ms") for k, label in
                 [("turn_detection_ms", "turn detection (VAD + Smart Turn)"), ("model_ttfa_ms", "model TTFA"),
                  ("overhead_ms", "overhead")]])
    left.set_ylabel("end of caller speech -> first reply audio received (ms)")
    left.set_title(f"total p50 {summary['total_ms']['p50']:.0f} ms, p95 {summary['total_ms']['p95']:.0f} ms", fontsize=9)
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)

    stack(right, [("service_before_model_ms", "service, turn end -> respond()"),
                  ("service_after_model_ms", "service, first frame -> pushed"),
                  ("output_to_socket_ms", "output transport -> socket"),
                  ("socket_to_caller_ms", "socket -> caller (loopback)")])
    right.axhline(TARGET_OVERHEAD_P95_MS, color="r", ls="--", lw=1, label=f"target: p95 < {TARGET_OVERHEAD_P95_MS:.0f} ms")
    right.set_ylabel("overhead (ms)")
    right.set_title(f"overhead p50 {summary['overhead_ms']['p50']:.1f} ms, p95 {summary['overhead_ms']['p95']:.1f} ms",
                    fontsize=9)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def bench(args) -> None:
    load_before = os.getloadavg()[0]
    proc, base, log = start_server(args)
    try:
        with tempfile.TemporaryDirectory() as d:
            questions = [espeak(q, Path(d) / f"q{i}.wav") for i, q in enumerate(QUESTIONS)]
        client = asyncio.run(place_call(base, args.turns, questions, args.provider))
        record = get_json(base + "/calls")["finished"][-1]
        model_info = get_json(base + "/bench/model")
    finally:
        proc.terminate()
        proc.wait(15)
    from pipecat_chroma.phone.server import PHONE_VAD

    rows = split_turns(client, record["turns"], model_info["replies"])
    summary = summarize(rows)
    overhead_p95 = summary["overhead_ms"]["p95"]
    result = {
        "benchmark": "bench_call.py: end of caller speech -> first reply audio on the wire "
                     f"(loopback {TITLES[args.provider]} call)",
        "provider": args.provider,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "vad": PHONE_VAD.model_dump(),
        "model": args.model, "device": model_info["device"], "dtype": model_info["dtype"],
        "threads": args.threads, "metrics": args.metrics, "max_frames": args.max_frames, "turns": args.turns,
        "summary_ms": summary,
        # the first turn of a call also creates its conversation (the service does it lazily)
        "summary_ms_after_first_turn": summarize(rows[1:]) if len(rows) > 2 else None,
        "target": {"overhead_p95_ms_below": TARGET_OVERHEAD_P95_MS, "met": overhead_p95 < TARGET_OVERHEAD_P95_MS},
        "per_turn": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_turn"}, indent=1))
    for key in ("total_ms", "turn_detection_ms", "model_ttfa_ms", "overhead_ms"):
        print(f"{key:20s} p50 {summary[key]['p50']:7.1f}  p95 {summary[key]['p95']:7.1f}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        plot(rows, summary, out.with_suffix(".png"),
             f"{args.model} on {model_info['device']} ({model_info['dtype']}), {args.turns} turns over a loopback "
             f"{TITLES[args.provider]} call")


# -- phone-audio VAD settings ----------------------------------------------------------------

SWEEP_PHRASES = ["What time does the store open on Saturday?", "Wait.", "No.", "Stop, stop.", "Hello, can you hear me?",
                 "I would like to book a table for two tonight.", "Yes please.", "Hang on a second."]


async def vad_sweep() -> dict:
    """How soon Silero sees speech start and end on phone audio: espeak-ng phrases (two
    speaking rates, two levels) as Twilio sends them (8 kHz mu-law, 20 ms packets) through
    the server's serializer, pipecat's stock one (VHQ resampler) for comparison. A phrase
    never seen as speech is missed; white noise must never trigger."""
    import base64

    from loguru import logger
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat_chroma.twilio_server import PHONE_VAD, SafeTwilioSerializer
    from pipecat_chroma.twilio_testing import mulaw_encode

    logger.remove()

    class Setup:
        audio_in_sample_rate = 16000

    async def run(clip: np.ndarray, params: VADParams, stock: bool) -> tuple[float | None, float | None]:
        packets = mulaw_encode(np.concatenate([np.zeros(8000), clip, np.zeros(12000)]))
        serializer = (TwilioFrameSerializer if stock else SafeTwilioSerializer)(
            "MZ", params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
        await serializer.setup(Setup())
        vad = SileroVADAnalyzer(sample_rate=16000, params=params)
        vad.set_sample_rate(16000)
        onset = offset = None
        previous = VADState.QUIET
        for i in range(0, len(packets), 160):
            message = {"event": "media", "media": {"payload": base64.b64encode(packets[i:i + 160]).decode()}}
            frame = await serializer.deserialize(json.dumps(message))
            if frame is None:
                continue
            state = vad._run_analyzer(frame.audio)  # synchronously: audio time, not wall time
            arrived = (i + 160) / 8000
            if state == VADState.SPEAKING and onset is None:
                onset = arrived - 1.0
            if onset is not None and offset is None and state == VADState.QUIET and previous != VADState.QUIET:
                offset = arrived - 1.0 - len(clip) / 8000
            previous = state
        return onset, offset

    configs = {"pipecat defaults, stock serializer": (VADParams(), True),
               "pipecat defaults, SafeTwilioSerializer": (VADParams(), False),
               "PHONE_VAD, SafeTwilioSerializer": (PHONE_VAD, False)}
    with tempfile.TemporaryDirectory() as d:
        clips = [espeak(p, Path(d) / "p.wav", 8000, wpm)[0] for p in SWEEP_PHRASES for wpm in (175, 220)]
    noise = np.random.default_rng(0).normal(0, 10 ** (-20 / 20), 24000)
    results = {}
    for name, (params, stock) in configs.items():
        row = {"params": params.model_dump()}
        for level in (1.0, 0.3):
            seen = [await run(c * level, params, stock) for c in clips]
            onsets = [s[0] for s in seen if s[0] is not None]
            offsets = [s[1] for s in seen if s[1] is not None]
            row[f"level_{level}"] = {"missed": len(clips) - len(onsets), "phrases": len(clips),
                                     "onset_ms_p50": 1000 * float(np.median(onsets)), "onset_ms_max": 1000 * max(onsets),
                                     "end_ms_p50": 1000 * float(np.median(offsets)), "end_ms_max": 1000 * max(offsets)}
        row["noise_-20dBFS_triggers"] = (await run(noise, params, stock))[0] is not None
        results[name] = row
        for level in (1.0, 0.3):
            r = row[f"level_{level}"]
            print(f"{name:40s} level {level}: missed {r['missed']}/{r['phrases']}, speech seen after "
                  f"{r['onset_ms_p50']:.0f} ms (max {r['onset_ms_max']:.0f}), end seen after {r['end_ms_p50']:.0f} ms "
                  f"(max {r['end_ms_max']:.0f})", file=sys.stderr)
        print(f"{name:40s} white noise at -20 dBFS seen as speech: {row['noise_-20dBFS_triggers']}", file=sys.stderr)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/tiny_chroma", help="checkpoint directory or hub id")
    ap.add_argument("--provider", default="twilio", choices=list(CLIENTS),
                    help="the carrier whose media-stream protocol the call speaks (default twilio)")
    ap.add_argument("--voice", help="voice file (default: cloned from an espeak-ng clip)")
    ap.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server (0: torch's default)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-frames", type=int, default=25, help="reply length cap, 80 ms frames (default 25 = 2 s)")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to load the model")
    ap.add_argument("--out", help="JSON to write (and a PNG beside it)")
    ap.add_argument("--metrics", choices=("on", "off"), default="on",
                    help="the server's Prometheus metrics (off: recorded nowhere, to measure what they cost)")
    ap.add_argument("--vad-sweep", action="store_true", help="measure the VAD settings on phone audio instead")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)   # the server process
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.serve:
        os.environ[METRICS_ENV] = args.metrics   # the server process inherits it
    if args.serve:
        run_server(args)
    elif args.vad_sweep:
        results = asyncio.run(vad_sweep())
        if args.out:
            Path(args.out).write_text(json.dumps({"vad_sweep": results}, indent=1) + "\n")
    else:
        bench(args)


if __name__ == "__main__":
    main()
