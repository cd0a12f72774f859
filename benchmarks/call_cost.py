#!/usr/bin/env python3
"""What a call costs the serving layer: N simultaneous calls through a real server process
whose model compute is a paced stand-in (benchmarks/paced_engine.py), per N: the server
process's CPU time per call-second, its threads, RSS per call, late and dropped frames, and
the latency the server adds between the end of a turn and the reply's first audio.

Servers (each its own process, `chroma-agent serve KIND` run by paced_engine.py on a
`PacedEngine` of capacity N, tiny checkpoint, transcripts off):
  realtime  `serve realtime`: N websocket clients (soak.py's `RealtimeCall`: 40 ms pcm16
            appends in real time, server VAD on, as clients run it)
  twilio    `serve twilio`: N `pipecat_chroma.twilio_testing.TwilioCall`s (20 ms mu-law
            packets in real time; the server's pipeline with Silero VAD and Smart Turn)
  livekit   N `AgentSession`s with the plugin's `RealtimeModel` and the built-in VAD, in one
            process with their callers (fake mic and speaker: no LiveKit server), measured alike
`serve web` is not driven: a headless WebRTC caller (aiortc: Opus, DTLS/SRTP in Python)
per call would cost the 2 cores more than the server it measures.
Each call speaks an espeak-ng question, hears the reply to its end (a paced reply of
`--reply-frames` frames, 80 ms each, one per `--tick-ms`), pauses `--pause-s`, and asks
again, until the window ends. Calls start spread over `--ramp-s`; once every call has
heard its first reply, `--warmup-s`, then the measured window of `--seconds`; the replies
to turns that ended in the window are counted, each heard to its end.

Per N (JSON; a PNG of CPU per call-second vs N beside it):
  cpu_ms_per_call_s   server CPU (utime+stime of /proc/PID/stat, all threads) over the window
                      / (calls x window seconds); `idle_cpu_ms_per_s`: the server alone before
  server_cpu_cores    the same CPU / window seconds (2.0 = both cores of this machine)
  threads_idle/_max   /proc/PID/status Threads before the calls / the most during the window
  rss_mb_per_call     (mean VmRSS in the window - VmRSS idle) / calls
  frames, late_frames, dropped_frames, max_gap_ms
                      the replies' audio as a caller hears it, played in real time from its
                      first chunk: a chunk after the audio before it ran out leaves a gap; a
                      gap over `--late-ms` (20) is a late frame, over 100 ms (soak.py) dropped
  server_added_ms     p50/p95: the server's end of the turn (realtime: `speech_stopped`
                      received; twilio: the pipeline's UserStoppedSpeakingFrame, from /calls)
                      -> the reply's first audio received, minus the stand-in's own time to
                      its first frame (`--first-frame-ms`): what the serving path adds
  from_speech_end_ms  the caller's last speech packet -> first audio (turn detection included)
  engine              the stand-in's own pacing (tick period, first frames' lateness): over
                      `--tick-ms`, the scheduler thread itself ran late
  client, machine_busy, saturated
                      the load generator's CPU and event-loop lag (it runs on the same cores),
                      the machine's busy share (/proc/stat); saturated: over 90% busy, where a
                      server's figures say what it got, not what it would take
  over_capacity       why the server did not carry N (calls failed, no reply in the window, the
                      stand-in's ticks 25% late: its thread starved), else null; larger N are
                      then skipped (`--no-stop-when-over` drives them anyway)

    python benchmarks/call_cost.py --kinds realtime,twilio --sweep 8,32,64,128 --seconds 30 \\
        --out benchmarks/results/call_cost_before.json

See benchmarks/README.md ("Call cost").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins" / "pipecat"), str(HERE)]   # run from anywhere

import soak  # noqa: E402  (the server process, the Realtime client, the speech, playout gaps)

KINDS = ("realtime", "twilio", "livekit")
DROP_S = soak.GAP_S                 # a playout gap over this: a dropped frame (audible)
REPLY_TIMEOUT_S = 30.0
ADMIN_KEY = "call-cost-admin"       # the twilio server's per-call records (GET /calls)
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIELDS = ("n", "calls_connected", "calls_failed", "window_s", "replies", "cpu_ms_per_call_s", "server_cpu_cores",
          "idle_cpu_ms_per_s", "threads_idle", "threads_max", "rss_mb_idle", "rss_mb_mean", "rss_mb_per_call",
          "fds_max", "frames", "late_frames", "dropped_frames", "max_gap_ms", "server_added_ms",
          "from_speech_end_ms", "engine", "client", "machine_busy", "saturated", "over_capacity", "errors")


# -- /proc -----------------------------------------------------------------------------------

def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def proc_status(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    value = lambda key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1))  # noqa: E731
    return {"rss_mb": value("VmRSS") / 1024, "threads": value("Threads"), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def pct(values: list[float]) -> dict | None:
    if not values:
        return None
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "max": round(float(max(values)), 1),
            "n": len(values)}


# -- the server ------------------------------------------------------------------------------

class PacedServer(soak.Server):
    """`chroma-agent serve KIND` on a PacedEngine of capacity `n` (paced_engine.py), its
    log in a file."""

    def __init__(self, kind: str, args, n: int, voice_args: list[str], log: Path):
        self.stats_path = str(log.with_suffix(".stats.json"))
        self.launcher = [sys.executable, str(HERE / "paced_engine.py"), "--tick-ms", str(args.tick_ms),
                         "--first-frame-ms", str(args.first_frame_ms), "--reply-frames", str(args.reply_frames),
                         "--stats", self.stats_path]
        options = SimpleNamespace(model=args.model, dtype="float32", max_frames=args.max_frames, device="cpu",
                                  torch_threads=args.torch_threads, max_calls=n, capacity_fraction=None, calls=n)
        os.environ.setdefault("CHROMA_AGENT_ADMIN_KEY", ADMIN_KEY)   # the server inherits it
        super().__init__(kind, options, voice_args, log)

    def engine_stats(self) -> dict | None:
        try:
            return json.loads(Path(self.stats_path).read_text())
        except (OSError, ValueError):
            return None

    def calls(self) -> dict:
        """GET /calls: the phone server's per-call records (admin key)."""
        request = urllib.request.Request(self.base + "/calls",
                                         headers={"Authorization": f"Bearer {os.environ['CHROMA_AGENT_ADMIN_KEY']}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())


# -- the calls -------------------------------------------------------------------------------

@dataclass
class Heard:
    """One reply as its caller heard it (time.time() on this machine)."""

    call: str
    speech_end: float
    first_audio: float
    chunks: list[tuple[float, float]]
    turn_end: float | None = None     # the server's end of the turn


@dataclass
class Load:
    """What the callers share: when to stop asking, what they heard, what went wrong."""

    stop_at: float = float("inf")
    heard: list[Heard] = field(default_factory=list)
    connected: int = 0
    failed: list[str] = field(default_factory=list)
    settled: set = field(default_factory=set)    # callers that heard their first reply
    done: int = 0                                 # callers through with their turns (still connected)
    hangup: asyncio.Event = field(default_factory=asyncio.Event)


async def realtime_caller(url: str, clip: soak.Clip, load: Load, args, rng: random.Random) -> None:
    call = soak.RealtimeCall(url, pcmu=False)
    try:
        await asyncio.wait_for(call.connect(), 60)
        load.connected += 1
        await asyncio.sleep(rng.uniform(0, args.pause_s))
        while time.time() < load.stop_at:
            spoken = await asyncio.wait_for(call.say(clip), clip.seconds + 20)
            response = await call.until(lambda: next((r for r in call.responses.values()
                                                      if r.created > spoken and r.chunks), None), REPLY_TIMEOUT_S)
            await call.until(lambda: response.done, REPLY_TIMEOUT_S + args.reply_frames * 0.08)
            await asyncio.sleep(max(0.0, call.playout_end(response) - time.time()))
            stopped = [t for t, e in call.events if e["type"] == "input_audio_buffer.speech_stopped"
                       and spoken - 0.5 <= t <= response.created]
            load.heard.append(Heard(str(id(call)), spoken, response.chunks[0][0], list(response.chunks),
                                    stopped[-1] if stopped else None))
            load.settled.add(id(call))
            await asyncio.sleep(args.pause_s)
        load.done += 1
        await load.hangup.wait()
    except Exception as e:
        load.failed.append(f"{type(e).__name__}: {str(e)[:160]}")
    finally:
        await soak._quietly(call.close())


async def twilio_caller(url: str, clip: soak.Clip, load: Load, args, rng: random.Random) -> None:
    from pipecat_chroma.twilio_testing import TwilioCall

    call = TwilioCall(url)
    try:
        await asyncio.wait_for(call.connect(), 60)
        load.connected += 1
        await asyncio.sleep(rng.uniform(0, args.pause_s))
        while time.time() < load.stop_at:
            spoken = await asyncio.wait_for(call.say(clip.pcm8, 8000), clip.seconds + 20)
            first, _ = await call.next_media(after=spoken, timeout=REPLY_TIMEOUT_S)
            await call.until_quiet(0.5, timeout=REPLY_TIMEOUT_S + args.reply_frames * 0.08)
            load.heard.append(Heard(call.call_sid, spoken, first, soak._twilio_chunks(call, first, time.time())))
            load.settled.add(id(call))
            await asyncio.sleep(args.pause_s)
        load.done += 1
        await load.hangup.wait()   # the server's records of this call are read first
        await soak._quietly(call.stop())
    except Exception as e:
        load.failed.append(f"{type(e).__name__}: {str(e)[:160]}")
    finally:
        await soak._quietly(call.close())


def twilio_turn_ends(server: PacedServer, load: Load) -> None:
    """Each reply's server-side end of turn, from GET /calls' per-call records (admin key)."""
    records = server.calls()
    calls = {c["call_sid"]: c for c in records.get("active", []) + records.get("finished", [])}
    for heard in load.heard:
        turns = (calls.get(heard.call) or {}).get("turns", [])
        ends = [t["turn_end"] for t in turns if t.get("turn_end") and heard.speech_end - 0.5 <= t["turn_end"]
                <= heard.first_audio]
        heard.turn_end = ends[-1] if ends else None


# -- one point: a server, N calls ------------------------------------------------------------

async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    """The load generator's own event loop: how late a 20 ms sleep wakes."""
    while not stop.is_set():
        start = time.monotonic()
        await asyncio.sleep(0.02)
        samples.append(1000 * (time.monotonic() - start - 0.02))


async def sample_server(pid: int, samples: list[dict], stop: asyncio.Event, every: float = 0.5) -> None:
    while not stop.is_set():
        try:
            samples.append(proc_status(pid))
        except OSError:
            return
        await asyncio.sleep(every)


async def drive(kind: str, server: PacedServer, n: int, clip: soak.Clip, args) -> dict:
    caller = {"realtime": realtime_caller, "twilio": twilio_caller}[kind]
    pid, load, rng = server.proc.pid, Load(), random.Random(args.seed)
    await asyncio.sleep(1.0)
    idle = proc_status(pid)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(args.idle_s)
    idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    tasks = []
    for i in range(n):   # spread over a few seconds: calls arrive, not all in one instant
        tasks.append(asyncio.create_task(caller(server.ws_url, clip, load, args, random.Random(rng.random()))))
        await asyncio.sleep(min(args.ramp_s / n, 0.5))
    deadline = time.monotonic() + 90   # warm: every call has heard its first reply
    while len(load.settled) + len(load.failed) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(args.warmup_s)
    stop, lags, samples = asyncio.Event(), [], []
    watchers = [asyncio.create_task(loop_lag(lags, stop)), asyncio.create_task(sample_server(pid, samples, stop))]
    w0, cpu0, me0, busy0 = time.time(), cpu_seconds(pid), cpu_seconds(), machine_ticks()
    await asyncio.sleep(args.seconds)
    w1, cpu1, me1, busy1 = time.time(), cpu_seconds(pid), cpu_seconds(), machine_ticks()
    stop.set()
    load.stop_at = w1
    health = server.health()
    engine = server.engine_stats()
    deadline = time.monotonic() + REPLY_TIMEOUT_S + args.reply_frames * 0.08 + 30
    while load.done + len(load.failed) < n and time.monotonic() < deadline:   # the last turns heard to their end
        await asyncio.sleep(0.1)
    if kind == "twilio":
        try:
            await asyncio.to_thread(twilio_turn_ends, server, load)
        except Exception as e:
            load.failed.append(f"/calls: {type(e).__name__}: {e}")
    load.hangup.set()
    await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    window = w1 - w0
    busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    return summarize(n, load, window, cpu1 - cpu0, idle, idle_cpu, samples, lags, (me1 - me0) / window, busy,
                     health, engine, [h for h in load.heard if w0 <= h.speech_end <= w1], args)


def summarize(n, load, window, cpu, idle, idle_cpu, samples, lags, client_cores, busy, health, engine, heard,
              args) -> dict:
    connected = max(1, load.connected)
    gaps = [g for h in heard for g in soak.playout_gaps(h.chunks)]
    added = [1000 * (h.first_audio - h.turn_end) - args.first_frame_ms for h in heard if h.turn_end is not None]
    rss = [s["rss_mb"] for s in samples] or [idle["rss_mb"]]
    return {
        "n": n, "calls_connected": load.connected, "calls_failed": len(load.failed), "window_s": round(window, 2),
        "replies": len(heard), "cpu_ms_per_call_s": round(1000 * cpu / (connected * window), 2),
        "server_cpu_cores": round(cpu / window, 3), "idle_cpu_ms_per_s": round(1000 * idle_cpu, 2),
        "threads_idle": idle["threads"], "threads_max": max([s["threads"] for s in samples], default=idle["threads"]),
        "rss_mb_idle": round(idle["rss_mb"], 1), "rss_mb_mean": round(float(np.mean(rss)), 1),
        "rss_mb_per_call": round((float(np.mean(rss)) - idle["rss_mb"]) / connected, 2),
        "fds_max": max([s["fds"] for s in samples], default=idle["fds"]),
        "frames": int(round(sum(s for h in heard for _, s in h.chunks) / 0.08)),
        "late_frames": sum(1 for g in gaps if g > args.late_ms / 1000),
        "dropped_frames": sum(1 for g in gaps if g > DROP_S),
        "max_gap_ms": round(1000 * max(gaps, default=0.0), 1),
        "server_added_ms": pct(added), "from_speech_end_ms": pct([1000 * (h.first_audio - h.speech_end) for h in heard]),
        "engine": {"health_frame_ms": (health.get("engine") or {}).get("frame_ms"),
                   "tick_period_ms": (engine or {}).get("tick_period_ms"),
                   "first_frame_late_ms": (engine or {}).get("first_frame_late_ms")},
        "client": {"cpu_cores": None if client_cores is None else round(client_cores, 3), "loop_lag_ms": pct(lags)},
        "machine_busy": round(busy, 3), "saturated": busy > 0.9, "errors": load.failed[:5],
        "other_cores": round(busy * (os.cpu_count() or 1) - cpu / window - (client_cores or 0), 3),   # other processes
        "over_capacity": over_capacity(load, heard, engine, args),
    }


def over_capacity(load, heard, engine, args) -> str | None:
    """Why the server did not carry these calls (None: it did): calls failed, no reply in
    the window, or the stand-in's own ticks a quarter late at the median (its scheduler
    thread starved of CPU or of the GIL: every reply behind real time)."""
    if load.failed:
        return f"{len(load.failed)} calls failed"
    if not heard:
        return "no reply in the window"
    period = ((engine or {}).get("tick_period_ms") or {}).get("p50")
    if period is not None and period > 1.25 * args.tick_ms:
        return f"the stand-in's ticks took {period:.0f} ms (p50) for {args.tick_ms:g}"
    return None


def run_livekit(n: int, args, speech: soak.Speech, logs: Path) -> dict:
    """LiveKit: the AgentSessions and their callers in one process (paced_engine.py livekit),
    which measures itself; summarized here as a server's point."""
    import subprocess

    out, log = logs / f"livekit_{n}.json", logs / f"livekit_{n}.log"
    cmd = [sys.executable, str(HERE / "paced_engine.py"), "--tick-ms", str(args.tick_ms), "--first-frame-ms",
           str(args.first_frame_ms), "--reply-frames", str(args.reply_frames), "livekit", "--model", args.model,
           *soak.voice_args(args, speech), "--question", str(speech.wav(soak.QUESTIONS[0], 175)), "--calls", str(n),
           "--out", str(out), *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                 ("idle_s", "ramp_s", "warmup_s", "seconds", "pause_s", "seed")]]
    with log.open("wb") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              timeout=args.start_timeout + 4 * args.seconds + 240)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the livekit host exited {proc.returncode}: {log.read_text()[-1500:]}")
    raw = json.loads(out.read_text())
    load = Load(connected=raw["connected"], failed=raw["failed"], heard=[Heard(**h) for h in raw["heard"]])
    point = summarize(n, load, raw["w1"] - raw["w0"], raw["cpu_s"], raw["idle"], raw["idle_cpu"], raw["samples"],
                      raw["lags"], None, raw["busy"], {"engine": {"frame_ms": raw["frame_ms"]}}, raw["engine"],
                      load.heard, args)
    point["commit_to_reply_ms"] = raw["commit_to_reply_ms"]   # AgentSession's own wait after the turn's commit
    point["exit_code"], point["log_errors"] = proc.returncode, len(re.findall(r"\bERROR\b|Traceback", log.read_text()))
    return point


def run_point(kind: str, n: int, args, speech: soak.Speech, clip: soak.Clip, logs: Path) -> dict:
    if kind == "livekit":
        return run_livekit(n, args, speech, logs)
    log = logs / f"{kind}_{n}.log"
    server = PacedServer(kind, args, n, soak.voice_args(args, speech), log)
    try:
        ready = server.wait_ready(args.start_timeout)
        point = asyncio.run(drive(kind, server, n, clip, args))
        point["server_ready_s"] = round(ready, 1)
    finally:
        point_exit = server.stop()
    point["exit_code"] = point_exit
    point["log_errors"] = server.log_errors()["error_lines"]
    return point


# -- the report ------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, data in result["kinds"].items():
        points = [p for p in data["points"] if "cpu_ms_per_call_s" in p]
        if points:
            line, = ax.plot([p["n"] for p in points], [p["cpu_ms_per_call_s"] for p in points], "o-", label=kind)
            over = [p for p in points if p.get("over_capacity")]   # hollow: the server did not carry them
            ax.plot([p["n"] for p in over], [p["cpu_ms_per_call_s"] for p in over], "o", mfc="white",
                    color=line.get_color())
    for target, label in ((15, "realtime target"), (50, "twilio target")):
        ax.axhline(target, ls=":", lw=1, color="grey")
        ax.text(1.01, target, label, transform=ax.get_yaxis_transform(), fontsize=7, va="center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simultaneous calls N")
    ax.set_ylabel("server CPU, ms per call-second (hollow: over capacity)")
    ax.set_title(f"call cost on a paced engine ({result['config']['tick_ms']:g} ms ticks), {result['machine']['cores']} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="realtime,twilio", help=f"servers, comma-separated: {','.join(KINDS)}")
    ap.add_argument("--sweep", default="8,32,64,128", help="simultaneous calls N, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="the measured window per N")
    ap.add_argument("--warmup-s", type=float, default=2.0,
                    help="once every call has heard its first reply, before the window")
    ap.add_argument("--ramp-s", type=float, default=4.0, help="calls start spread over this")
    ap.add_argument("--idle-s", type=float, default=3.0, help="the idle server's CPU, before the calls")
    ap.add_argument("--pause-s", type=float, default=1.0, help="a caller's pause between a reply and its next turn")
    ap.add_argument("--tick-ms", type=float, default=80.0, help="the stand-in's tick (a frame per reply per tick)")
    ap.add_argument("--first-frame-ms", type=float, default=40.0, help="the stand-in's time to a reply's first frame")
    ap.add_argument("--reply-frames", type=int, default=40, help="frames per reply (80 ms each)")
    ap.add_argument("--max-frames", type=int, default=375, help="the servers' --max-frames")
    ap.add_argument("--late-ms", type=float, default=20.0, help="a playout gap over this: a late frame")
    ap.add_argument("--model", default=None, help="checkpoint (default: the tiny one, built in --cache)")
    ap.add_argument("--voice", help="voice file (default: cloned by the server from an espeak-ng clip)")
    ap.add_argument("--torch-threads", type=int, default=None, help="the servers' --torch-threads")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "chroma-agent-call-cost"),
                    help="the tiny checkpoint and the espeak-ng WAVs")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stop-when-over", dest="stop_when_over", action="store_false",
                    help="drive every N even past one the server did not carry (default: those are skipped)")
    ap.add_argument("--out", default=str(HERE / "results" / "call_cost_before.json"))
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := [k for k in kinds if k not in KINDS]:
        ap.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    sweep = [int(n) for n in args.sweep.split(",") if n]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model = str(cache / "tiny")
        if not (cache / "tiny" / "model.safetensors").is_file():
            from chroma_agent.testing.tiny_checkpoint import make_tiny_checkpoint

            make_tiny_checkpoint(args.model)
    speech = soak.Speech(cache / "speech")
    clip = speech.clip(soak.QUESTIONS[0], 175)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="call_cost_"))
    result = {"machine": machine(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "config": {k: getattr(args, k) for k in ("seconds", "warmup_s", "tick_ms", "first_frame_ms",
                                                        "reply_frames", "late_ms", "pause_s", "seed")}
              | {"question_s": round(clip.seconds, 2), "transcripts": "off", "load_generator": "same machine"},
              "kinds": {}}
    for kind in kinds:
        result["kinds"][kind] = {"points": []}
        over = None
        for n in sweep:
            if over is not None and args.stop_when_over:
                result["kinds"][kind]["points"].append({"n": n, "skipped": over})
                continue
            print(f"{kind}: {n} calls ...", file=sys.stderr, flush=True)
            try:
                point = run_point(kind, n, args, speech, clip, logs)
            except (Exception, SystemExit) as e:
                point = {"n": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["kinds"][kind]["points"].append(point)
            if point.get("over_capacity") or "error" in point:
                over = f"over capacity at {n} calls: {point.get('over_capacity') or point.get('error')}"
            print(json.dumps({k: point.get(k) for k in ("n", "cpu_ms_per_call_s", "server_cpu_cores", "threads_max",
                                                        "rss_mb_per_call", "late_frames", "dropped_frames",
                                                        "server_added_ms", "machine_busy", "over_capacity", "error", "skipped")}),
                  file=sys.stderr, flush=True)
            out.write_text(json.dumps(result, indent=1))
    result["logs"] = str(logs)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
