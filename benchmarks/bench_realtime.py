#!/usr/bin/env python3
"""Realtime-server latency: N concurrent Realtime sessions over loopback against
`chroma-agent serve realtime`, end of speech -> first `response.output_audio.delta`, and
what the server adds on top of the engine's own time to first audio.

The server is the real `chroma-agent serve realtime` command (the CLI's own `main`, the
model loaded before the port opens, one `ChromaEngine` for every session), started by
soak.py's `Server` in its own process through this script's `--serve` mode, which only
adds timing hooks: per reply, the server-side times of the turn's end (the append that
ended it, `speech_stopped` sent), the reply's start (`_start_reply`, `respond()` called),
the conversation's own `time_to_first_audio_s` (the engine's TTFA), the first frame on the
event loop and the first delta sent, appended to a JSON-lines file. The clients are
soak.py's `RealtimeCall` (40 ms pcm16 appends in real time, server VAD on, as clients
run it) speaking espeak-ng questions (soak.py's `Speech`), each reply heard to its end
before the next question. Per session count, every session first has one untimed turn
(warm-up: it also makes the session's conversation), then `--turns` timed turns. All
clocks are time.time() on one machine. Per turn:

  ttfa         first delta received - (last speech append sent + the session's silence_duration_ms)
  after_stop   first delta received - `input_audio_buffer.speech_stopped` received
  engine_ttfa  the conversation's own time_to_first_audio_s (respond() -> first 80 ms frame),
               measured in the server process for that same reply
  overhead     after_stop - engine_ttfa: what the server adds after its VAD decided (target:
               p95 <= 20 ms); overhead_from_eos (ttfa - engine_ttfa) also holds the VAD's
               granularity around the silence window

    PYTHONPATH=.:plugins/pipecat python3 benchmarks/bench_realtime.py --model /tmp/tiny_chroma \
        --sessions 1 4 8 --out benchmarks/results/realtime_tiny_cpu.json

See benchmarks/README.md ("Realtime server").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]   # run from anywhere without installing

import soak  # noqa: E402  (benchmarks/soak.py: the server process, the Realtime client, the speech)

TARGET_OVERHEAD_P95_MS = 20.0
REPLY_TIMEOUT_S = 120.0
RAW_MS = ("silence_ms", "speech_end_audio_ms", "vad_audio_end_ms")   # per-turn facts, not latencies


# -- the server process: `chroma-agent serve realtime` with timing hooks ----------------------

METRICS_ENV = "CHROMA_BENCH_METRICS"   # "off": the server process records no metrics (--metrics off)


def serve_timed(timings: str, argv: list[str]) -> int:
    """`chroma-agent serve realtime ARGV`, each reply's timings appended to `timings` (JSON
    lines). The hooks wrap the server's own functions; they add a clock read per event sent."""
    import contextvars

    from chroma_agent import cli
    from chroma_agent.serving import realtime_reply as reply_module
    from chroma_agent.serving import realtime_server as rs
    from chroma_agent.events import AudioChunk, ResponseDone

    out = open(timings, "a", buffering=1)
    current = contextvars.ContextVar("bench_reply")   # the reply whose task runs (copied into to_thread)
    speak, send, start_reply, serve = rs.Session._speak, rs.Session.send, reply_module.start_reply, rs.serve
    append = rs.HANDLERS["input_audio_buffer.append"]

    def timed_serve(*, model, **kwargs):
        out.write(json.dumps({"server": {"device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                                         "pid": os.getpid()}}) + "\n")
        return serve(model=model, **kwargs)

    async def timed_append(self, ev):
        self._bench_append_at = time.time()
        await append(self, ev)

    async def timed_send(self, ev):
        await send(self, ev)
        kind = ev.get("type")
        if kind == "input_audio_buffer.speech_stopped":
            self._bench_turn = {"append_received": getattr(self, "_bench_append_at", None),
                                "speech_stopped_sent": time.time()}
        elif kind == "response.output_audio.delta":
            record = current.get(None)
            if record is not None and "first_delta_sent" not in record:
                record["first_delta_sent"] = time.time()

    async def timed_speak(self, reply, cfg):
        record = {"response_id": reply.id, "session_id": cfg.id, **getattr(self, "_bench_turn", {})}
        self._bench_turn = {}
        current.set(record)
        try:
            return await speak(self, reply, cfg)
        finally:
            out.write(json.dumps(record) + "\n")

    class Respond:   # the conversation as _start_reply sees it: respond() timed
        def __init__(self, conv, record):
            self.conv, self.record = conv, record

        def respond(self, *args, **kwargs):
            self.record["respond_called"] = time.time()
            return TimedResponse(self.conv.respond(*args, **kwargs), self.record)

    class TimedResponse:
        def __init__(self, response, record):
            self.response, self.record = response, record

        def __getattr__(self, name):
            return getattr(self.response, name)

        async def __aiter__(self):
            async for item in self.response:
                if isinstance(item, AudioChunk) and "first_chunk" not in self.record:
                    self.record["first_chunk"] = time.time()
                elif isinstance(item, ResponseDone):
                    self.record.update(engine_ttfa_s=item.stats.time_to_first_audio_s, frames=item.stats.frames,
                                       stop_reason=item.stop_reason)
                yield item

    def timed_start_reply(conv, audio, text, max_frames):
        record = current.get(None)
        if record is None:
            return start_reply(conv, audio, text, max_frames)
        record["start_reply"] = time.time()
        return start_reply(Respond(conv, record), audio, text, max_frames)

    if os.environ.get(METRICS_ENV) == "off":   # --metrics off: the server records nothing
        from chroma_agent.serving.metrics import NO_METRICS

        server_init = rs.RealtimeServer.__init__

        def init_without_metrics(self, *args, **kwargs):
            server_init(self, *args, **{**kwargs, "metrics": NO_METRICS})

        rs.RealtimeServer.__init__ = init_without_metrics
    rs.serve, rs.Session._speak, rs.Session.send = timed_serve, timed_speak, timed_send
    reply_module.start_reply = timed_start_reply
    rs.HANDLERS["input_audio_buffer.append"] = timed_append
    return cli.main(argv)


class TimedServer(soak.Server):
    """soak.py's server process, run through `--serve` (the timing hooks above)."""

    def __init__(self, timings: Path, *args):
        self.launcher = [sys.executable, str(Path(__file__).resolve()), "--serve", str(timings)]
        super().__init__(*args)


def read_timings(path: Path) -> tuple[dict, dict[str, dict]]:
    info, replies = {}, {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "server" in row:
            info = row["server"]
        else:
            replies[row["response_id"]] = row
    return info, replies


# -- the clients --------------------------------------------------------------------------

async def run_session(server: soak.Server, index: int, clips: list[soak.Clip], turns: int, rng: random.Random,
                      warmup: int) -> dict:
    """One session: a random lead (sessions do not all speak at once), then `warmup` + `turns`
    questions, each reply heard to its end (real time) and a pause before the next."""
    call = soak.RealtimeCall(server.ws_url, pcmu=False)
    try:
        await asyncio.wait_for(call.connect(), 30)
    except Exception as e:   # 503 past --max-calls
        await soak._quietly(call.close())
        return {"session": index, "refused": f"{type(e).__name__}: {str(e)[:200]}", "turns": []}
    mic_start = time.time()   # connect() has just started the microphone: append k is sent at + k x 40 ms
    step, short_ms = int(soak.RT_CHUNK_S * 24000), 0.0
    silence_ms = call.first("session.created")[1]["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"]
    rows, failure = [], None
    try:
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        for turn in range(warmup + turns):
            clip = clips[(index + turn) % len(clips)]
            spoken = await asyncio.wait_for(call.say(clip), clip.seconds + 10)
            # where the speech ends in the session's audio stream (the server's offsets): its last
            # append's tick plus that append's length, less what the shorter last appends of the
            # earlier questions did not fill (approximate if the sender ran over 20 ms late)
            last = (clip.pcm24.size % step or step) / 24
            end_ms = round((spoken - mic_start) / soak.RT_CHUNK_S) * soak.RT_CHUNK_S * 1000 + last - short_ms
            short_ms += soak.RT_CHUNK_S * 1000 - last
            response = await call.until(lambda: next((r for r in call.responses.values()
                                                      if r.created > spoken and r.chunks), None), REPLY_TIMEOUT_S)
            stopped = [(t, e) for t, e in call.events if e["type"] == "input_audio_buffer.speech_stopped"
                       and t <= response.created]
            await call.until(lambda: response.done, REPLY_TIMEOUT_S)
            await asyncio.sleep(max(0.0, call.playout_end(response) - time.time()))
            rows.append({"session": index, "turn": turn, "warmup": turn < warmup, "response_id": response.id,
                         "phrase": clip.text, "speech_s": round(clip.seconds, 3), "silence_ms": silence_ms,
                         "speech_end_sent": spoken, "speech_stopped_received": stopped[-1][0] if stopped else None,
                         "speech_end_audio_ms": round(end_ms),
                         "vad_audio_end_ms": stopped[-1][1].get("audio_end_ms") if stopped else None,
                         "first_delta_received": response.chunks[0][0], "status": response.status,
                         "reply_audio_s": round(sum(s for _, s in response.chunks), 3)})
            await asyncio.sleep(rng.uniform(0.6, 1.2))
        if call.errors:
            failure = f"error event: {call.errors[0]}"
    except Exception as e:
        failure = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        await soak._quietly(call.close())
    unasked = len(call.responses) - len(rows)
    return {"session": index, "turns": rows, "failure": failure, "unasked_responses": unasked}


def split(row: dict, server: dict | None) -> dict:
    """One turn's latencies (ms) from the client's and the server's timestamps."""
    ms = lambda a, b: None if a is None or b is None else 1000 * (a - b)  # noqa: E731
    arrival = row["first_delta_received"]
    eos = row["speech_end_sent"] + row["silence_ms"] / 1000
    out = {"ttfa_ms": ms(arrival, eos), "after_stop_ms": ms(arrival, row["speech_stopped_received"])}
    # the turn's end as the server VAD saw it: speech_stopped later than the silence window by
    # this much, and its audio_end_ms past the speech's real end by this much
    out["vad_decision_ms"] = ms(row["speech_stopped_received"], eos)
    if row["vad_audio_end_ms"] is not None:
        out["vad_end_lag_ms"] = row["vad_audio_end_ms"] - row["speech_end_audio_ms"]
    engine = None if not server or server.get("engine_ttfa_s") is None else 1000 * server["engine_ttfa_s"]
    out["engine_ttfa_ms"] = engine
    out["overhead_ms"] = None if engine is None or out["after_stop_ms"] is None else out["after_stop_ms"] - engine
    out["overhead_from_eos_ms"] = None if engine is None else out["ttfa_ms"] - engine
    if server:   # where the overhead goes
        s = server
        out["vad_ms"] = ms(s.get("speech_stopped_sent"), s.get("append_received"))
        out["stop_to_reply_start_ms"] = ms(s.get("start_reply"), s.get("speech_stopped_sent"))
        out["start_reply_ms"] = ms(s.get("respond_called"), s.get("start_reply"))
        to_loop = ms(s.get("first_chunk"), s.get("respond_called"))
        out["frame_to_loop_ms"] = None if engine is None or to_loop is None else to_loop - engine
        out["encode_send_ms"] = ms(s.get("first_delta_sent"), s.get("first_chunk"))
        out["socket_ms"] = ms(arrival, s.get("first_delta_sent"))
        out["stopped_socket_ms"] = ms(row["speech_stopped_received"], s.get("speech_stopped_sent"))
    return {k: (round(v, 2) if v is not None else None) for k, v in out.items()}


def summarize(rows: list[dict]) -> dict:
    """p50/p95 (and n) of each latency (the keys `split` makes) over `rows`."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms") and k not in RAW_MS))
    summary = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            summary[k] = {"p50": round(float(np.percentile(values, 50)), 2),
                          "p95": round(float(np.percentile(values, 95)), 2), "n": len(values)}
    return summary


async def run_count(server: soak.Server, n: int, clips: list[soak.Clip], turns: int, warmup: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}/{n}")
    return await asyncio.gather(*(run_session(server, i, clips, turns, random.Random(rng.random()), warmup)
                                  for i in range(n)))


def wait_for_free_slots(server: soak.Server, timeout: float = 30.0) -> None:
    """The previous count's sessions have all been closed on the server (else the next
    count's last session may be refused at --max-calls)."""
    deadline = time.monotonic() + timeout
    while server.health().get("active_calls") and time.monotonic() < deadline:
        time.sleep(0.2)


# -- the report ---------------------------------------------------------------------------

def plot(result: dict, path: Path) -> None:
    """Left: the latencies' p50 (solid) and p95 (dashed) over the session count. Right: the
    overhead by where it goes (medians, stacked) and its p95 against the target."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    rows = [r for r in result["results"] if r["summary_ms"]]
    if not rows:
        return
    ns = [r["sessions"] for r in rows]
    x = np.arange(len(ns))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for key, label, color in [("ttfa_ms", "end of speech + silence window -> first delta", "C0"),
                              ("after_stop_ms", "speech_stopped -> first delta", "C1"),
                              ("engine_ttfa_ms", "engine TTFA (same reply, server process)", "C2"),
                              ("overhead_ms", "overhead (after_stop - engine)", "C3")]:
        for pct, style in (("p50", "o-"), ("p95", "s--")):
            left.plot(x, [r["summary_ms"].get(key, {}).get(pct, np.nan) for r in rows], style, color=color,
                      label=f"{label} {pct}")
    left.set_xticks(x, [str(n) for n in ns])
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("ms")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    parts = [("stop_to_reply_start_ms", "speech_stopped sent -> reply started"),
             ("start_reply_ms", "the turn's audio joined -> respond()"),
             ("frame_to_loop_ms", "first frame -> event loop"),
             ("encode_send_ms", "encode + send the delta"),
             ("socket_ms", "socket -> client (loopback)")]   # less speech_stopped's own trip (~0)
    bottom = np.zeros(len(rows))
    for key, label in parts:
        values = np.array([max(0.0, r["summary_ms"].get(key, {}).get("p50", 0.0)) for r in rows])
        right.bar(x, values, bottom=bottom, label=f"{label} (p50)")
        bottom += values
    right.plot(x, [r["summary_ms"].get("overhead_ms", {}).get("p95", np.nan) for r in rows], "kD", label="overhead p95")
    right.axhline(TARGET_OVERHEAD_P95_MS, color="r", ls="--", lw=1, label=f"target: p95 <= {TARGET_OVERHEAD_P95_MS:.0f} ms")
    right.set_xticks(x, [str(n) for n in ns])
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("overhead (ms)")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:   # the server process (TimedServer)
        return serve_timed(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    soak.add_server_options(ap)   # --model --device --dtype --voice --speech-cache --start-timeout --torch-threads --out
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8], help="concurrent session counts (1 4 8)")
    ap.add_argument("--turns", type=int, default=5, help="timed turns per session (default 5)")
    ap.add_argument("--warmup-turns", type=int, default=1, help="untimed first turns per session (default 1)")
    ap.add_argument("--max-frames", type=int, default=25, help="reply cap, 80 ms frames (default 25 = 2 s)")
    ap.add_argument("--seed", type=int, default=0, help="the sessions' leads and pauses")
    ap.add_argument("--metrics", choices=("on", "off"), default="on",
                    help="the server's Prometheus metrics (off: recorded nowhere, to measure what they cost)")
    args = ap.parse_args(argv)
    os.environ[METRICS_ENV] = args.metrics   # the server process inherits it
    if min(args.sessions) < 1 or args.turns < 1 or args.warmup_turns < 0:
        ap.error("--sessions must be at least 1, --turns at least 1, --warmup-turns at least 0")

    speech = soak.Speech(Path(args.speech_cache))
    clips = [speech.clip(text, 175) for text in soak.QUESTIONS]
    logs = Path(tempfile.mkdtemp(prefix="bench_realtime_"))
    timings = logs / "timings.jsonl"
    server_args = argparse.Namespace(model=args.model, dtype=args.dtype, device=args.device, max_frames=args.max_frames,
                                     torch_threads=args.torch_threads,
                                     max_calls=max(args.sessions), capacity_fraction=None, calls=max(args.sessions))
    load_before = os.getloadavg()
    server = TimedServer(timings, "realtime", server_args, soak.voice_args(args, speech), logs / "realtime.log")
    results = []
    try:
        ready_s = server.wait_ready(args.start_timeout)
        print(f"server ready in {ready_s:.1f} s (log: {server.log})", file=sys.stderr)
        for n in args.sessions:
            wait_for_free_slots(server)
            sessions = asyncio.run(run_count(server, n, clips, args.turns, args.warmup_turns, args.seed))
            results.append({"sessions": n, "clients": sessions, "load_average_1min": os.getloadavg()[0]})
            print(f"{n} sessions: {sum(len(s['turns']) for s in sessions)} turns", file=sys.stderr)
    finally:
        exit_code = server.stop()
    info, replies = read_timings(timings)
    for r in results:
        clients = r.pop("clients")
        rows = [{**t, **split(t, replies.get(t["response_id"]))} for s in clients for t in s["turns"]]
        timed = [row for row in rows if not row["warmup"]]
        r.update({"refused": sum(1 for s in clients if s.get("refused")),
                  "failures": [s.get("refused") or s["failure"] for s in clients if s.get("refused") or s.get("failure")],
                  "unasked_responses": sum(s.get("unasked_responses", 0) for s in clients),
                  "turns_timed": len(timed), "summary_ms": summarize(timed),
                  "first_turn_ms": summarize([row for row in rows if row["warmup"]]), "per_turn": rows})
        o = r["summary_ms"].get("overhead_ms")
        r["target_met"] = None if o is None else o["p95"] <= TARGET_OVERHEAD_P95_MS
    device, dtype = info.get("device", args.device), info.get("dtype", args.dtype)
    result = {
        "benchmark": "bench_realtime.py: concurrent Realtime sessions over loopback against `chroma-agent serve realtime`",
        "title": f"{args.model} on {device} ({dtype}): {args.turns} timed turns per session, "
                 f"replies up to {args.max_frames} frames",
        "measures": {
            "ttfa_ms": "first response.output_audio.delta received - (last speech append sent + silence_duration_ms)",
            "after_stop_ms": "first delta received - input_audio_buffer.speech_stopped received",
            "engine_ttfa_ms": "the same reply's conversation time_to_first_audio_s (respond() -> first frame), "
                              "in the server process",
            "overhead_ms": "after_stop_ms - engine_ttfa_ms",
            "overhead_from_eos_ms": "ttfa_ms - engine_ttfa_ms (also the VAD's granularity around the silence window)",
        },
        "args": vars(args), "git_commit": soak.git_commit(), "device": device, "dtype": dtype,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": {"before": load_before, "after": os.getloadavg()}},
        "server": {"ready_s": round(ready_s, 1), "exit_code": exit_code, "log": {"path": str(server.log),
                                                                                **server.log_errors()}},
        "target": {"overhead_p95_ms_at_most": TARGET_OVERHEAD_P95_MS},
        "results": results,
    }
    for r in results:
        s = r["summary_ms"]
        line = "  ".join(f"{k[:-3]} {s[k]['p50']:.1f}/{s[k]['p95']:.1f}" for k in
                         ("ttfa_ms", "after_stop_ms", "engine_ttfa_ms", "overhead_ms") if k in s)
        print(f"{r['sessions']:3d} sessions, {r['turns_timed']} turns, p50/p95 ms: {line}; "
              f"refused {r['refused']}, failures {len(r['failures'])}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        plot(result, out.with_suffix(".png"))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
