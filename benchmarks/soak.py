#!/usr/bin/env python3
"""Soak test: N concurrent calls against a real server process for M minutes, with
real espeak-ng speech, barge-ins, hang-ups in the middle of a reply, silent callers and
dropped lines; it reports what held and what did not.

Servers (each a separate `chroma-agent serve KIND` process on a loopback port):
  twilio    Twilio Media Streams (`pipecat_chroma.twilio_testing.TwilioCall`: 20 ms mu-law
            packets in real time, silence between turns, `stop` on hang-up)
  realtime  the OpenAI Realtime (GA) protocol (a small client here: 40 ms appends in real
            time, server VAD turns, `conversation.item.truncate` on a barge-in, pipecat-style)
`--protocol both` runs the two servers side by side, `--calls` lines on each.

Each line places calls back to back for `--minutes`; each call follows a scenario drawn
from `--seed` (normal turns, a barge-in, a hang-up in the middle of a reply, a silent
caller, a line that drops without `stop` or a close). The same seed gives the same calls.

Reported (JSON, and a PNG beside it): calls completed/failed and why, replies started/
finished/cancelled, time to first audio (end of the caller's speech -> first reply audio
received) p50/p95/p99 per minute, audio pacing (a caller plays each reply in real time
from its first audio on; a gap over 100 ms in that playout counts as a dropped frame),
the server's RSS, open file descriptors and threads per minute (/proc/PID), its idle
fds/threads before and after, its /health at the end, error lines in its log. `--check`
exits 1 when a target fails (benchmarks/README.md, "Soak").

    PYTHONPATH=.:plugins/pipecat python3 benchmarks/soak.py --model /tmp/tiny_chroma \
        --protocol twilio --calls 8 --minutes 10 --out benchmarks/results/soak_twilio_tiny_cpu.json --check
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "plugins" / "pipecat")]   # run from anywhere without installing

QUESTIONS = ["What time does the store open on Saturday?", "Can I change my delivery address?",
             "How much is the monthly plan?", "Is there a branch near the train station?",
             "I would like to book a table for two tonight.", "Could you tell me more about the warranty?"]
# a caller cutting in with a new question (a reply is due); no commas: a pause inside the
# phrase may end a phone turn early, and a "stop" alone rightly gets no answer
BARGE_INS = ["Sorry can you say that again?", "What about next Sunday?", "How much would that cost me?",
             "Hold on I have another question about my order."]
VOICE_TEXT = "Hello, thanks for calling. How can I help you today?"
SPEAKING_RATES = (165, 195)          # espeak-ng words per minute
# scenario -> weight; what each does: see CallPlan
SCENARIOS = {"normal": 0.35, "barge_in": 0.2, "hangup": 0.2, "silent": 0.1, "dropped": 0.15}
FIRST_CALLS = ("barge_in", "hangup", "dropped", "silent", "normal")
GAP_S = 0.100                        # a longer silence inside a reply's playout: a dropped frame
FRAME_BUDGET_MS = 80.0               # an engine tick p95 over this: replies behind real time (over capacity)
QUIET_S = 1.0                        # Twilio: no audio for this long -> the reply is over
REPLY_TIMEOUT_S = 45.0               # end of speech -> first reply audio, generous for a shared CPU
CALL_TIMEOUT_S = 180.0               # one call, whole
SLOT_WAIT_S = 10.0                   # a line waits this long at most for a free slot
SLOTS_TIMEOUT_S = 30.0               # after the last call: the server's slots back to 0 within this
SETTLE_S = 20.0                      # ... and its fds/threads back to idle within this
RSS_FLAT = 0.05                      # RSS after warm-up: growth at the same load within 5%
RT_CHUNK_S = 0.040                   # Realtime client: one append per 40 ms of microphone audio


# -- speech -------------------------------------------------------------------------------

class Speech:
    """espeak-ng phrases, leading and trailing silence cut (the speech ends where the audio
    ends), cached as WAVs in `cache_dir`; at 8 kHz float (Twilio) and 24 kHz int16
    (Realtime pcm16)."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    def wav(self, text: str, wpm: int = 175) -> Path:
        key = hashlib.sha1(f"{text}|{wpm}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"{key}.wav"
        if not path.is_file():
            import soundfile as sf

            with tempfile.TemporaryDirectory(dir=self.cache_dir) as d:   # another soak may write it too
                raw, cut = Path(d) / "raw.wav", Path(d) / "cut.wav"
                subprocess.run(["espeak-ng", "-s", str(wpm), "-w", str(raw), text], check=True, capture_output=True)
                samples, rate = sf.read(raw, dtype="float32")
                loud = np.flatnonzero(np.abs(samples) > 0.02)
                sf.write(cut, samples[loud[0]:loud[-1] + 1], rate)
                os.replace(cut, path)
        return path

    def clip(self, text: str, wpm: int) -> "Clip":
        import soundfile as sf
        import soxr

        samples, rate = sf.read(self.wav(text, wpm), dtype="float32")
        pcm8 = soxr.resample(samples, rate, 8000).astype(np.float32)
        pcm24 = (np.clip(soxr.resample(samples, rate, 24000), -1, 1) * 32767).astype(np.int16)
        return Clip(text, pcm8, pcm24)


@dataclass
class Clip:
    text: str
    pcm8: np.ndarray       # float32, 8 kHz
    pcm24: np.ndarray      # int16, 24 kHz

    @property
    def seconds(self) -> float:
        return self.pcm8.size / 8000


# -- the plan: what each call does, from the seed -------------------------------------------

@dataclass
class Turn:
    phrase: str                 # "q3@165": QUESTIONS[3] at 165 wpm, "b1@195": BARGE_INS[1]
    after: str = "listen"       # what the caller does once the reply's first audio arrived:
    #                             listen (to its end), barge (the next turn cuts in), hangup, drop
    wait_s: float = 0.0         # barge/hangup/drop: seconds of reply audio before doing it
    pause_s: float = 0.8        # listen: silence before the next turn


@dataclass
class CallPlan:
    """normal: 2-3 turns, each reply heard to its end, then `stop`; barge_in: the caller
    cuts into the first reply with a short phrase and hears the answer to it; hangup: the
    last reply is cut by a hang-up 0.2-1.2 s into it; silent: only line silence for 4-10 s;
    dropped: the line drops (no `stop`, no close) in a reply or between turns."""

    scenario: str
    turns: list[Turn]
    lead_s: float               # line open before the first word
    silent_s: float = 0.0
    drop_between: bool = False  # dropped: after the last reply ended instead of in it
    next_call_s: float = 1.5    # the line's pause before its next call
    pcmu: bool = False          # Realtime: G.711 mu-law both ways instead of pcm16 24 kHz


def plan_calls(seed: int, protocol: str, line: int):
    """The line's calls, forever (the soak stops taking them); the same for the same seed."""
    rng = random.Random(f"{seed}/{protocol}/{line}")

    def phrase(kind: str) -> str:
        pool = QUESTIONS if kind == "q" else BARGE_INS
        return f"{kind}{rng.randrange(len(pool))}@{rng.choice(SPEAKING_RATES)}"

    names, weights = zip(*SCENARIOS.items())
    first = True
    while True:
        # each line's first call is a different fault, so a short soak has them all
        scenario = FIRST_CALLS[line % len(FIRST_CALLS)] if first else rng.choices(names, weights)[0]
        first = False
        lead, pause = rng.uniform(0.5, 1.5), lambda: rng.uniform(0.5, 1.5)   # noqa: E731
        turns: list[Turn] = []
        plan = CallPlan(scenario, turns, lead, next_call_s=rng.uniform(1.5, 3.0), pcmu=rng.random() < 0.25)
        if scenario == "normal":
            turns += [Turn(phrase("q"), pause_s=pause()) for _ in range(rng.randint(2, 3))]
        elif scenario == "barge_in":
            turns += [Turn(phrase("q"), "barge", rng.uniform(0.3, 1.0)), Turn(phrase("b"), pause_s=pause())]
        elif scenario == "hangup":
            turns += [Turn(phrase("q"), pause_s=pause()) for _ in range(rng.randint(0, 1))]
            turns.append(Turn(phrase("q"), "hangup", rng.uniform(0.2, 1.2)))
        elif scenario == "silent":
            plan.silent_s = rng.uniform(4.0, 10.0)
        else:
            turns += [Turn(phrase("q"), pause_s=pause()) for _ in range(rng.randint(0, 1))]
            plan.drop_between = rng.random() < 0.5
            turns.append(Turn(phrase("q"), "listen" if plan.drop_between else "drop", rng.uniform(0.2, 1.5),
                              pause_s=pause()))
        yield plan


def warmup_plan(seed: int, protocol: str, line: int):
    """Warm-up calls: the soak's mix (another stream of the seed), so the server's thread
    pools see what the soak will make them do. The first caller waits 3 s before it speaks:
    on a cold server the first calls' pipelines take seconds to start, and what a caller
    says before that is not answered (see benchmarks/README.md, "Soak")."""
    for i, plan in enumerate(plan_calls(seed, f"{protocol}/warmup", line)):
        if i == 0:
            plan.lead_s = 3.0
        yield plan


# -- results ------------------------------------------------------------------------------

@dataclass
class Reply:
    """One reply as the caller heard it. Times are time.time(); chunks (arrival, seconds)."""

    speech_end: float
    first_audio: float | None = None
    outcome: str = "none"             # finished, cancelled (barge_in/hangup/dropped), none
    reason: str | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)
    after_turn_end_s: float | None = None   # Realtime: speech_stopped -> first audio

    def analyse(self) -> dict:
        gaps = playout_gaps(self.chunks)
        return {"speech_end": self.speech_end, "first_audio": self.first_audio,
                "ttfa_ms": None if self.first_audio is None else 1000 * (self.first_audio - self.speech_end),
                "ttfa_after_turn_end_ms": None if self.after_turn_end_s is None else 1000 * self.after_turn_end_s,
                "outcome": self.outcome, "reason": self.reason, "audio_s": round(sum(s for _, s in self.chunks), 3),
                "chunks": len(self.chunks), "gaps_ms": [round(1000 * g, 1) for g in gaps if g > GAP_S],
                "max_gap_ms": round(1000 * max(gaps, default=0.0), 1),
                "dropped_frames": sum(1 for g in gaps if g > GAP_S)}


def playout_gaps(chunks: list[tuple[float, float]]) -> list[float]:
    """Silences a listener hears when each chunk is played as soon as it arrived, in order,
    from the first chunk's arrival: a chunk that comes after the audio before it has played
    out leaves a gap. Audio sent ahead of real time (Realtime) leaves none while it stays
    ahead; audio paced in real time (Twilio) leaves its lateness."""
    gaps, clock = [], None
    for arrival, seconds in sorted(chunks):
        if clock is None:
            clock = arrival
        elif arrival > clock:
            gaps.append(arrival - clock)
            clock = arrival
        clock += seconds
    return gaps


@dataclass
class CallResult:
    protocol: str
    line: int
    scenario: str
    phase: str
    started: float
    ended: float | None = None
    failure: str | None = None
    replies: list[Reply] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # oddities that do not fail the call

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "replies"}
        d["replies"] = [r.analyse() for r in self.replies]
        return d


# -- the servers --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    """`chroma-agent serve KIND` in its own process, its log in a file; reads its /proc."""

    launcher = [sys.executable, "-m", "chroma_agent.cli"]   # what runs `serve KIND ...` (bench_realtime: timed)

    def __init__(self, kind: str, args, voice_args: list[str], log: Path):
        self.kind, self.log = kind, log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}" + ("/ws" if kind == "twilio" else "/v1/realtime?model=chroma")
        cmd = [*self.launcher, "serve", kind, "--model", args.model, "--dtype", args.dtype,
               *voice_args, "--host", "127.0.0.1", "--port", str(self.port), "--max-frames", str(args.max_frames)]
        cmd += ["--device", args.device] if args.device else []
        cmd += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
        if args.max_calls != 0 and args.capacity_fraction is None:   # else the server measures its capacity
            cmd += ["--max-calls", str(args.max_calls or args.calls)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_") and k != "CHROMA_AGENT_API_KEY"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "plugins" / "pipecat"), env.get("PYTHONPATH", "")])
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.started = time.time()
        self.ready_s = 0.0

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the {self.kind} server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                http_json(self.base + "/health")
                return time.time() - self.started
            except OSError:
                time.sleep(0.3)
        self.stop()
        sys.exit(f"the {self.kind} server did not start within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def health(self) -> dict:
        status, body = http_json(self.base + "/health")
        return {"http_status": status, **body}

    # every server's /health has one schema (chroma_agent.serving.call_server)
    def capacity(self, health: dict) -> int:
        """The engine's capacity, as /health reports it."""
        return int((health.get("engine") or {}).get("capacity") or health["max_calls"])

    def slots(self, health: dict) -> int:
        """Calls the server takes at once."""
        return int(health["max_calls"])

    def active(self, health: dict) -> int:
        """Calls holding a slot, or engine conversations still open (a call's is closed
        in a worker thread after its slot is freed)."""
        return max(health.get("active_calls", 0), (health.get("engine") or {}).get("conversations", 0))

    def frame_p95(self, health: dict) -> float | None:
        """The engine's tick p95 over the last 30 s (ms): over 80, replies fall behind real time."""
        frames = (health.get("engine") or {}).get("frame_ms")
        return frames["p95"] if frames else None

    def resources(self) -> dict:
        """RSS (MB), open file descriptors and threads of the server process."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        value = lambda key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1))  # noqa: E731
        return {"rss_mb": round(value("VmRSS") / 1024, 1), "threads": value("Threads"),
                "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd"))}

    def stop(self) -> int | None:
        """SIGTERM (the server drains, with no call left: at once), its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def log_errors(self) -> dict:
        text = self.log.read_text(errors="replace").splitlines()
        errors = [line for line in text if re.search(r"\bERROR\b|CRITICAL|Traceback \(most recent call last\)", line)]
        warnings = [line for line in text if re.search(r"\bWARNING\b", line)]
        return {"error_lines": len(errors), "first_errors": [e[:300] for e in errors[:10]],
                "warning_lines": len(warnings), "first_warnings": [w[:300] for w in warnings[:5]]}


# -- Twilio calls -------------------------------------------------------------------------

def _twilio_chunks(call, start: float, end: float) -> list[tuple[float, float]]:
    return [(t, len(base64.b64decode(m["media"]["payload"])) / 8000) for t, m in call.media(start) if t <= end]


async def twilio_call(server: Server, plan: CallPlan, clips: dict[str, Clip], result: CallResult) -> None:
    """One call over Twilio's protocol, as `plan` says; fills `result`."""
    from pipecat_chroma.twilio_testing import TwilioCall

    call = TwilioCall(server.ws_url)
    if not await _connect(call, result):
        return
    ended_by_us = False
    try:
        await _lead_in(plan)
        if plan.scenario == "silent" and call.media():
            result.failure = "a reply to a silent caller"
        windows = []   # (first audio, end) of each reply, to find audio outside all of them
        previous: Reply | None = None
        for i, turn in enumerate(plan.turns):
            clip = clips[turn.phrase]
            say_at = time.time()
            if previous is not None and previous.outcome == "playing":   # a barge-in on the previous reply
                previous.outcome = "barge_in_pending"
            spoken = await asyncio.wait_for(call.say(clip.pcm8, 8000), clip.seconds + 10)
            if previous is not None and previous.outcome == "barge_in_pending":
                # the server clears the caller's audio on the barge-in (Twilio's `clear`)
                cleared = call.events("clear", after=say_at)
                last_media = max((t for t, _ in call.media(previous.first_audio) if t < say_at), default=0.0)
                if cleared:
                    previous.outcome, previous.reason, end = "cancelled", "barge_in", cleared[0][0]
                elif say_at - last_media > 0.2:
                    previous.outcome, end = "finished", say_at      # it had ended before the caller cut in
                else:
                    previous.outcome, previous.reason, end = "cancelled", "barge_in", spoken
                    result.notes.append("barge-in with no `clear` from the server")
                previous.chunks = _twilio_chunks(call, previous.first_audio, end)
                windows.append((previous.first_audio, end))
            reply = Reply(speech_end=spoken)
            result.replies.append(reply)
            after = max([spoken] + [t for t, _ in call.events("clear", after=say_at)])
            reply.first_audio, _ = await call.next_media(after=after, timeout=REPLY_TIMEOUT_S)
            if turn.after == "listen":
                await call.until_quiet(QUIET_S, timeout=120)
                end = time.time()
                reply.chunks, reply.outcome = _twilio_chunks(call, reply.first_audio, end), "finished"
                windows.append((reply.first_audio, end))
                if i < len(plan.turns) - 1:
                    await asyncio.sleep(turn.pause_s)
            else:
                await asyncio.sleep(turn.wait_s)
                if turn.after == "barge":
                    reply.outcome = "playing"
                    previous = reply
                    continue
                cut = time.time()
                playing = bool(call.media(cut - 0.2))
                reply.chunks = _twilio_chunks(call, reply.first_audio, cut)
                reply.outcome, reply.reason = ("cancelled", "hangup" if turn.after == "hangup" else "dropped") \
                    if playing else ("finished", None)
                windows.append((reply.first_audio, cut))
            previous = reply
        stray = [t for t, _ in call.media() if not any(a <= t <= b for a, b in windows)]
        if stray and plan.scenario != "silent":
            # audio after a reply was judged over (a stall over QUIET_S), or before the caller finished
            result.notes.append(f"{len(stray)} audio chunks outside any reply")
        if call.closed.is_set():
            result.failure = result.failure or "the server closed the stream"
        ended_by_us = True
        if plan.scenario == "dropped" or (plan.turns and plan.turns[-1].after == "drop"):
            call.drop()      # no `stop`, no close handshake
        else:
            await call.stop()
            await call.close()
    except Exception as e:
        result.failure = result.failure or f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        if not ended_by_us:
            await _quietly(call.close())


async def _quietly(coro) -> None:
    try:
        await asyncio.wait_for(coro, 5)
    except Exception:
        pass


async def _connect(call, result: CallResult) -> bool:
    """Open a call of either protocol within 20 s. A refusal (503 at capacity, 401 or 403,
    a refused socket) is the call's failure in `result`, and the call is closed: False."""
    try:
        await asyncio.wait_for(call.connect(), 20)
        return True
    except Exception as e:
        result.failure = f"connect: {type(e).__name__}: {str(e)[:200]}"
        await _quietly(call.close())
        return False


async def _lead_in(plan: CallPlan) -> None:
    """What a caller waits before speaking, and a silent caller's silence after it."""
    await asyncio.sleep(plan.lead_s)
    if plan.scenario == "silent":
        await asyncio.sleep(plan.silent_s)


# -- Realtime calls -----------------------------------------------------------------------

@dataclass
class RtResponse:
    id: str
    created: float
    item_id: str | None = None
    chunks: list[tuple[float, float]] = field(default_factory=list)
    done: float | None = None
    status: str | None = None


class RealtimeCall:
    """A Realtime client: a microphone that streams `RT_CHUNK_S` appends in real time
    (queued speech, else silence), the server's events kept with their arrival times, each
    response's audio deltas, a pipecat-style truncate of the playing reply on
    `speech_started`."""

    def __init__(self, url: str, pcmu: bool):
        self.url, self.pcmu = url, pcmu
        self.rate = 8000 if pcmu else 24000
        self.events: list[tuple[float, dict]] = []
        self.responses: dict[str, RtResponse] = {}
        self.errors: list[str] = []
        self.closed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.playing: RtResponse | None = None       # the reply the caller is listening to
        self._speech: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._ws = None

    async def connect(self) -> None:
        """Open the session; with `pcmu`, G.711 mu-law both ways (a phone-side client)."""
        from websockets.asyncio.client import connect

        self._ws = await connect(self.url, max_size=None, open_timeout=15, proxy=None, compression=None)
        self._tasks.append(asyncio.create_task(self._receive()))
        await self.until(lambda: self.first("session.created"), 15)
        if self.pcmu:
            fmt = {"type": "audio/pcmu"}
            await self.send({"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": fmt}, "output": {"format": fmt}}}})
            await self.until(lambda: self.first("session.updated"), 15)
        self._tasks.append(asyncio.create_task(self._microphone()))

    async def send(self, event: dict) -> None:
        await self._ws.send(json.dumps(event))

    def first(self, kind: str, after: float = 0.0):
        return next(((t, e) for t, e in self.events if e["type"] == kind and t >= after), None)

    async def until(self, condition, timeout: float):
        """Until `condition()` is truthy (returns it); raises on timeout or a closed socket."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if self.closed.is_set():
                raise ConnectionError("the server closed the websocket")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise TimeoutError(f"waited {timeout} s") from None
        return value

    async def say(self, clip: Clip) -> float:
        """Queue speech on the microphone; returns when its last sample was sent."""
        from chroma_agent.serving.realtime_protocol import pcm_to_ulaw

        pcm = clip.pcm24 if not self.pcmu else (np.clip(clip.pcm8, -1, 1) * 32767).astype(np.int16)
        data = pcm_to_ulaw(pcm) if self.pcmu else pcm.astype("<i2").tobytes()
        done = asyncio.get_running_loop().create_future()
        await self._speech.put((data, done))
        return await done

    def played_ms(self, response: RtResponse, at: float) -> int:
        """Audio of `response` a caller playing it in real time has heard by `at`."""
        clock, heard = None, 0.0
        for arrival, seconds in response.chunks:
            if arrival > at:
                break
            clock = arrival if clock is None else max(clock, arrival)
            heard += max(0.0, min(seconds, at - clock))
            clock += seconds
        return int(1000 * heard)

    def playout_end(self, response: RtResponse) -> float:
        clock = None
        for arrival, seconds in response.chunks:
            clock = (arrival if clock is None else max(clock, arrival)) + seconds
        return clock or time.time()

    def drop(self) -> None:
        self._cancel()
        self._ws.transport.abort()

    async def close(self) -> None:
        self._cancel()
        if self._ws is not None:
            await self._ws.close()

    def _cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _microphone(self) -> None:
        width = 1 if self.pcmu else 2
        step = int(self.rate * RT_CHUNK_S) * width
        silence = (b"\xff" if self.pcmu else b"\x00\x00") * int(self.rate * RT_CHUNK_S)
        data, done, pos, tick = b"", None, 0, time.monotonic()
        try:
            while True:
                if pos >= len(data) and not self._speech.empty():
                    data, done = self._speech.get_nowait()
                    pos = 0
                chunk = data[pos:pos + step] if pos < len(data) else silence
                pos += step
                await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()})
                if done is not None and pos >= len(data):
                    if not done.done():
                        done.set_result(time.time())
                    done = None
                tick += RT_CHUNK_S
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
        except Exception as e:
            pending = [done] if done is not None else []
            while not self._speech.empty():
                pending.append(self._speech.get_nowait()[1])
            for future in pending:
                if not future.done():
                    future.set_exception(ConnectionError(f"the websocket closed: {e!r}"))

    async def _receive(self) -> None:
        seconds_per_byte = 1 / (self.rate * (1 if self.pcmu else 2))
        try:
            async for raw in self._ws:
                now = time.time()
                ev = json.loads(raw)
                kind = ev.get("type")
                if kind == "response.output_audio.delta":
                    response = self.responses.get(ev.get("response_id"))
                    if response is not None:
                        response.item_id = ev.get("item_id")
                        response.chunks.append((now, len(base64.b64decode(ev["delta"])) * seconds_per_byte))
                    continue   # not kept in `events`: the deltas are in their response
                self.events.append((now, ev))
                if kind == "response.created":
                    self.responses[ev["response"]["id"]] = RtResponse(ev["response"]["id"], now)
                elif kind == "response.done":
                    response = self.responses.get(ev["response"]["id"])
                    if response is not None:
                        response.done, response.status = now, ev["response"]["status"]
                elif kind == "input_audio_buffer.speech_started":
                    await self._barge_in(now)
                elif kind == "error":
                    self.errors.append(str(ev.get("error"))[:300])
                self.arrived.set()
        except Exception:
            pass
        finally:
            self.closed.set()
            self.arrived.set()

    async def _barge_in(self, now: float) -> None:
        """The caller spoke over the reply it hears: what it heard stays in the history
        (pipecat: truncate at min(wall clock since the first delta, audio received))."""
        playing = self.playing
        if playing is None or not playing.chunks or self.playout_end(playing) <= now or playing.item_id is None:
            return
        heard = min(self.played_ms(playing, now), int(1000 * (now - playing.chunks[0][0])))
        await self.send({"type": "conversation.item.truncate", "item_id": playing.item_id, "content_index": 0,
                         "audio_end_ms": heard})


async def realtime_call(server: Server, plan: CallPlan, clips: dict[str, Clip], result: CallResult,
                        pcmu: bool) -> None:
    """One session over the Realtime protocol, as `plan` says; fills `result`."""
    call = RealtimeCall(server.ws_url, pcmu)
    if not await _connect(call, result):
        return
    ended_by_us = False
    try:
        await _lead_in(plan)
        expected: set[str] = set()
        previous: tuple[Reply, RtResponse] | None = None
        for i, turn in enumerate(plan.turns):
            clip = clips[turn.phrase]
            spoken = await asyncio.wait_for(call.say(clip), clip.seconds + 10)
            if previous is not None:   # a barge-in: how the reply it cut into ended
                reply, response = previous
                await call.until(lambda: response.done, REPLY_TIMEOUT_S)
                cut = call.first("input_audio_buffer.speech_started", after=response.created)
                cut_at = cut[0] if cut else spoken
                reply.chunks = [c for c in response.chunks if c[0] <= cut_at]
                heard_all = call.playout_end(response) <= cut_at
                reply.outcome, reply.reason = ("finished", None) if heard_all else ("cancelled", "barge_in")
            reply = Reply(speech_end=spoken)
            result.replies.append(reply)
            response = await call.until(lambda: next((r for r in call.responses.values()
                                                      if r.created > spoken and r.chunks), None), REPLY_TIMEOUT_S)
            expected.add(response.id)
            call.playing = response
            reply.first_audio = response.chunks[0][0]
            stopped = [t for t, e in call.events if e["type"] == "input_audio_buffer.speech_stopped" and t <= response.created]
            if stopped:
                reply.after_turn_end_s = reply.first_audio - stopped[-1]
            if turn.after == "listen":
                await call.until(lambda: response.done, REPLY_TIMEOUT_S + 60)
                if response.status == "failed":
                    raise RuntimeError("response.done with status failed")
                await asyncio.sleep(max(0.0, call.playout_end(response) - time.time()))
                reply.chunks = list(response.chunks)
                reply.outcome = "finished" if response.status in ("completed", "incomplete") else "cancelled"
                reply.reason = None if reply.outcome == "finished" else f"server: {response.status}"
                if i < len(plan.turns) - 1:
                    await asyncio.sleep(turn.pause_s)
                previous = None
            else:
                await asyncio.sleep(turn.wait_s)
                if turn.after == "barge":
                    previous = (reply, response)
                    continue
                cut = time.time()
                reply.chunks = [c for c in response.chunks if c[0] <= cut]
                playing = response.done is None or call.playout_end(response) > cut
                reply.outcome, reply.reason = ("cancelled", "hangup" if turn.after == "hangup" else "dropped") \
                    if playing else ("finished", None)
                previous = None
        others = [r for r in call.responses.values() if r.id not in expected]
        if plan.scenario == "silent" and others:
            result.failure = "a reply to a silent caller"
        elif others:
            result.notes.append(f"{len(others)} responses the caller did not ask for (a turn split by the VAD)")
        if call.errors:
            result.failure = result.failure or f"error event: {call.errors[0]}"
        if call.closed.is_set():
            result.failure = result.failure or "the server closed the websocket"
        ended_by_us = True
        if plan.scenario == "dropped" or (plan.turns and plan.turns[-1].after == "drop"):
            call.drop()
        else:
            await call.close()
    except Exception as e:
        result.failure = result.failure or f"{type(e).__name__}: {str(e)[:200]}"
        if call.errors:
            result.notes.append(f"error events: {call.errors[:3]}")
    finally:
        if not ended_by_us:
            await _quietly(call.close())


# -- one server's soak --------------------------------------------------------------------

class ServerSoak:
    """Runs one server's phases: idle (cold), warm-up calls, idle (the baseline), the soak,
    the slots back to 0, idle (after); samples the process all along."""

    def __init__(self, kind: str, server: Server, args, clips: dict[str, Clip]):
        self.kind, self.server, self.args, self.clips = kind, server, args, clips
        self.lines = args.calls
        self.slot_waits: list[float] = []
        self.calls: list[CallResult] = []
        self.samples: list[dict] = []
        self.idle: dict[str, dict] = {}
        self.t0 = self.until = 0.0
        self.calls_ended = 0.0
        self.final_health: dict = {}
        self.slots_free_after_s: float | None = None
        self.settle_s: float | None = None

    async def free_slot(self) -> float:
        """Wait (up to SLOT_WAIT_S) until /health shows a free slot: a line redials only once
        the server has let go of its last call (how long that took is reported)."""
        start = time.monotonic()
        while time.monotonic() - start < SLOT_WAIT_S:
            health = await asyncio.to_thread(self.server.health)
            if self.server.active(health) < self.server.slots(health):
                break
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    async def line(self, line: int, plans, phase: str, until: float) -> None:
        await asyncio.sleep(0.6 * line)   # the lines' first calls staggered
        for plan in plans:
            if time.time() >= until:
                return
            self.slot_waits.append(await self.free_slot())
            result = CallResult(self.kind, line, plan.scenario, phase, time.time())
            self.calls.append(result)
            place = twilio_call(self.server, plan, self.clips, result) if self.kind == "twilio" else \
                realtime_call(self.server, plan, self.clips, result, plan.pcmu)
            try:
                await asyncio.wait_for(place, CALL_TIMEOUT_S)
            except asyncio.TimeoutError:
                result.failure = result.failure or f"the call took over {CALL_TIMEOUT_S:g} s"
            result.ended = time.time()
            await asyncio.sleep(plan.next_call_s)

    async def sample(self, stop: asyncio.Event) -> None:
        """Every `--sample-s`: the process's RSS, fds, threads and /health's active calls."""
        while not stop.is_set():
            try:
                health = await asyncio.to_thread(self.server.health)
                self.samples.append({"t": time.time(), **self.server.resources(), "active": self.server.active(health),
                                     "frame_p95": self.server.frame_p95(health)})
            except (OSError, AttributeError):   # the process is gone: the soak will say so
                pass
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_s)
            except asyncio.TimeoutError:
                pass

    async def quiet_resources(self) -> dict:
        """fds and threads once they hold still (the same over 3 readings 0.5 s apart)."""
        readings = []
        for _ in range(20):
            readings.append(self.server.resources())
            if len(readings) >= 3 and all((r["fds"], r["threads"]) == (readings[-1]["fds"], readings[-1]["threads"])
                                          for r in readings[-3:]):
                break
            await asyncio.sleep(0.5)
        return readings[-1]

    async def slots_free(self) -> bool:
        start = time.monotonic()
        while time.monotonic() - start < SLOTS_TIMEOUT_S:
            self.final_health = await asyncio.to_thread(self.server.health)
            if self.server.active(self.final_health) == 0:
                self.slots_free_after_s = round(time.monotonic() - start, 2)
                return True
            await asyncio.sleep(0.25)
        return False

    async def run(self) -> None:
        args = self.args
        if args.capacity_fraction is not None:
            health = await asyncio.to_thread(self.server.health)
            self.lines = max(1, int(args.capacity_fraction * self.server.capacity(health)))
        n = self.lines
        await asyncio.sleep(2.0)
        self.idle["cold"] = await self.quiet_resources()
        if args.warmup_calls > 0:   # every line at once: thread pools and caches grow to their working size
            await asyncio.gather(*(self.line(i, islice(warmup_plan(args.seed, self.kind, i), args.warmup_calls),
                                             "warmup", float("inf")) for i in range(n)))
            await self.slots_free()
        self.idle["before"] = await self.quiet_resources()
        stop = asyncio.Event()
        sampler = asyncio.create_task(self.sample(stop))
        self.t0 = time.time()
        self.until = self.t0 + 60 * args.minutes
        await asyncio.gather(*(self.line(i, plan_calls(args.seed, self.kind, i), "soak", self.until) for i in range(n)))
        self.calls_ended = time.time()
        self.slots_free_after_s = None
        await self.slots_free()
        # back to idle: the fds and threads of ended calls go within SETTLE_S
        start = time.monotonic()
        while True:
            after = self.server.resources()
            if after["fds"] <= self.idle["before"]["fds"] and after["threads"] <= self.idle["before"]["threads"]:
                self.settle_s = round(time.monotonic() - start, 2)
                break
            if time.monotonic() - start > SETTLE_S:
                after = await self.quiet_resources()
                break
            await asyncio.sleep(0.5)
        self.idle["after"] = after
        if after["threads"] > self.idle["before"]["threads"]:
            # more threads than the baseline: a pool that kept growing (bounded: the event
            # loop's executor, each worker's OpenMP team), or threads left by each call? One
            # more round of calls tells: a pool is full by now, a per-call leak grows again.
            await asyncio.gather(*(self.line(i, islice(plan_calls(args.seed, f"{self.kind}/probe", i), 1),
                                             "probe", float("inf")) for i in range(n)))
            await self.slots_free()
            await asyncio.sleep(2.0)
            self.idle["after_probe_round"] = await self.quiet_resources()
        stop.set()
        await sampler

    # -- the figures --
    def minute(self, t: float) -> int:
        return min(int((t - self.t0) // 60), max(0, int(np.ceil(self.args.minutes)) - 1))

    def summary(self) -> dict:
        soak = [c for c in self.calls if c.phase == "soak"]
        warm = [c for c in self.calls if c.phase == "warmup"]
        replies = [(c, r, r.analyse()) for c in soak for r in c.replies]
        minutes = range(max(1, int(np.ceil(self.args.minutes))))

        def pct(values: list[float]) -> dict:
            if not values:
                return {"n": 0}
            return {"n": len(values), **{f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)},
                    "max": round(max(values), 1)}

        ttfa = [(r.first_audio, a["ttfa_ms"]) for _, r, a in replies if a["ttfa_ms"] is not None]
        after_turn = [a["ttfa_after_turn_end_ms"] for _, _, a in replies if a["ttfa_after_turn_end_ms"] is not None]
        gaps = sorted(((g, c.line, round(r.first_audio - self.t0, 1)) for c, r, a in replies for g in a["gaps_ms"]),
                      reverse=True)
        soak_samples = [s for s in self.samples if s["t"] <= self.calls_ended]
        flat_from = self.t0 + (60 if self.args.minutes >= 3 else 0)   # plus the warm-up calls before t0
        rss = [s["rss_mb"] for s in soak_samples if s["t"] >= flat_from]
        per_minute = []
        for m in minutes:
            ms = [s for s in soak_samples if self.minute(s["t"]) == m]
            per_minute.append({
                "minute": m + 1,
                "ttfa_ms": pct([v for t, v in ttfa if self.minute(t) == m]),
                "dropped_frames": sum(a["dropped_frames"] for _, r, a in replies if r.first_audio and self.minute(r.first_audio) == m),
                "rss_mb_mean": round(float(np.mean([s["rss_mb"] for s in ms])), 1) if ms else None,
                "rss_mb_max": max((s["rss_mb"] for s in ms), default=None),
                "fds_max": max((s["fds"] for s in ms), default=None),
                "threads_max": max((s["threads"] for s in ms), default=None),
                "active_calls_max": max((s["active"] for s in ms), default=None),
                "engine_frame_ms_p95_max": max((s["frame_p95"] for s in ms if s.get("frame_p95") is not None),
                                               default=None),
            })
        outcomes = Counter(a["outcome"] if a["outcome"] != "cancelled" else f"cancelled_{a['reason']}"
                           for _, _, a in replies)
        cancelled = {k.removeprefix("cancelled_"): v for k, v in outcomes.items() if k.startswith("cancelled")}
        return {
            "server": self.server.kind, "command": " ".join(self.server.cmd[1:]), "lines": self.lines,
            "ready_after_s": round(self.server.ready_s, 1),
            "calls": {"total": len(soak), "completed": sum(1 for c in soak if not c.failure),
                      "failed": sum(1 for c in soak if c.failure),
                      "by_scenario": {k: {"calls": v, "failed": sum(1 for c in soak if c.scenario == k and c.failure)}
                                      for k, v in sorted(Counter(c.scenario for c in soak).items())},
                      "failures": dict(Counter(c.failure for c in soak if c.failure)),
                      "notes": dict(Counter(n for c in soak for n in c.notes)),
                      # the first calls pay one-time costs (imports, pools): reported, not a target
                      "warmup": {"total": len(warm), "failed": sum(1 for c in warm if c.failure),
                                 "failures": dict(Counter(c.failure for c in warm if c.failure))},
                      "probe": {"total": sum(1 for c in self.calls if c.phase == "probe"),
                                "failed": sum(1 for c in self.calls if c.phase == "probe" and c.failure)}},
            "replies": {"started": sum(1 for _, r, _ in replies if r.first_audio is not None),
                        "finished": outcomes.get("finished", 0), "cancelled": sum(cancelled.values()),
                        "cancelled_by": cancelled, "without_audio": outcomes.get("none", 0)},
            "ttfa_ms": pct([v for _, v in ttfa]),
            "ttfa_after_turn_end_ms": pct(after_turn) if after_turn else None,
            # a line waits for a free slot before it redials: how long the server held a slot
            # after the call on it had ended (at most SLOT_WAIT_S, then it dials anyway)
            "wait_for_free_slot_s": {"over_1s": sum(1 for w in self.slot_waits if w > 1.0),
                                     "max": round(max(self.slot_waits, default=0.0), 2)},
            "dropped_frames": sum(a["dropped_frames"] for _, _, a in replies),
            # the minutes when /health's engine tick p95 went over 80 ms: the machine carried
            # less than the calls asked (behind real time); the target counts the other minutes
            "over_capacity_minutes": [m["minute"] for m in per_minute if _over_capacity(m)],
            "dropped_frames_under_capacity": sum(m["dropped_frames"] for m in per_minute if not _over_capacity(m)),
            "worst_gaps_ms": [{"gap_ms": g, "line": line, "reply_at_s": at} for g, line, at in gaps[:10]],
            "per_minute": per_minute,
            "rss_mb": {"from_s": round(flat_from - self.t0), "min": min(rss, default=None), "max": max(rss, default=None),
                       "spread": round(max(rss) / min(rss) - 1, 4) if rss else None,
                       **rss_growth(self.idle, per_minute, first=round((flat_from - self.t0) / 60),
                                    last=int(np.ceil(self.args.minutes)) - 1)},
            "idle": self.idle,
            "settled_after_s": self.settle_s,
            "slots_free_after_s": self.slots_free_after_s,
            "final_health": self.final_health,
            "samples": [{**s, "t": round(s["t"] - self.t0, 2)} for s in self.samples],
        }


def rss_growth(idle: dict, per_minute: list[dict], first: int, last: int) -> dict:
    """RSS growth at the same load: idle after the calls vs the idle baseline, and the mean
    of the soak's last minute vs its first counted one (each minute holds the same mix of
    calls). RSS follows the calls running (each holds its pipeline and caches), so max/min
    over the samples (`spread`) mixes loads; these two compare like with like."""
    before, after = idle.get("before", {}).get("rss_mb"), idle.get("after", {}).get("rss_mb")
    means = {m["minute"] - 1: m["rss_mb_mean"] for m in per_minute if m["rss_mb_mean"] is not None}
    first_mean, last_mean = means.get(first), means.get(last)
    out = {"idle_growth": round(after / before - 1, 4) if before and after else None,
           "minute_trend": round(last_mean / first_mean - 1, 4) if first_mean and last_mean and last > first else None}
    known = [abs(v) for v in out.values() if v is not None]
    return {**out, "growth": max(known) if known else None}


def threads_back(idle: dict) -> tuple[bool, str]:
    """Threads after the calls <= the idle baseline; or, when over it, no more again after
    one more round of calls (the growth was a bounded pool filling up, not per call)."""
    before, after, probe = idle["before"]["threads"], idle["after"]["threads"], idle.get("after_probe_round")
    if after <= before:
        return True, f"{before} idle -> {after} after"
    if probe is None:
        return False, f"{before} idle -> {after} after"
    return probe["threads"] <= after, (f"{before} idle -> {after} after -> {probe['threads']} after one more "
                                       "round of calls" + (" (a pool that filled up)" if probe["threads"] <= after
                                                           else " (growing with the calls)"))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def _over_capacity(minute: dict) -> bool:
    p95 = minute.get("engine_frame_ms_p95_max")
    return p95 is not None and p95 > FRAME_BUDGET_MS


def targets(s: dict) -> dict[str, tuple[bool, str]]:
    """The soak's targets for one server: name -> (met, what was measured)."""
    before, after = s["idle"].get("before", {}), s["idle"].get("after", {})
    failed = s["calls"]["failed"]
    rss = s["rss_mb"]
    growth = rss.get("growth")
    active = s["final_health"].get("active_calls")
    return {
        "zero failed calls": (failed == 0, f"{failed} failed"),
        "zero dropped frames under capacity": (
            s["dropped_frames_under_capacity"] == 0 and len(s["over_capacity_minutes"]) < len(s["per_minute"]),
            f"{s['dropped_frames']} gaps over {1000 * GAP_S:.0f} ms, {s['dropped_frames_under_capacity']} of them in "
            f"minutes the engine kept real time; over capacity (tick p95 > {FRAME_BUDGET_MS:.0f} ms) in minutes "
            f"{s['over_capacity_minutes'] or 'none'}"),
        f"RSS after warm-up flat within {100 * RSS_FLAT:.0f}%": (
            growth is not None and growth <= RSS_FLAT,
            f"idle {before.get('rss_mb')} -> {after.get('rss_mb')} MB ({_pct(rss.get('idle_growth'))}), "
            f"first -> last minute mean {_pct(rss.get('minute_trend'))}; under calls {rss['min']}-{rss['max']} MB"),
        "fds back to idle": (after.get("fds", 1 << 30) <= before.get("fds", -1),
                             f"{before.get('fds')} idle -> {after.get('fds')} after"),
        "threads back to idle": threads_back(s["idle"]),
        "slots back to 0": (s["slots_free_after_s"] is not None, f"/health active {active} at the end"),
    }


def plot(result: dict, path: Path) -> None:
    """Per server: TTFA p50/p95/p99 per minute, RSS, fds and threads over time, active
    calls and dropped frames."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    servers = result["servers"]
    fig, axes = plt.subplots(len(servers), 4, figsize=(18, 3.8 * len(servers)), squeeze=False)
    for row, (kind, s) in zip(axes, servers.items()):
        minutes = [m["minute"] for m in s["per_minute"]]
        ax = row[0]
        for q in ("p50", "p95", "p99"):
            ax.plot(minutes, [m["ttfa_ms"].get(q, np.nan) for m in s["per_minute"]], marker="o", label=q)
        ax.set(xlabel="minute", ylabel="end of speech -> first audio (ms)", title=f"{kind}: time to first audio")
        ax.legend(fontsize=8)
        t = np.array([x["t"] for x in s["samples"]]) / 60
        ax = row[1]
        ax.plot(t, [x["rss_mb"] for x in s["samples"]])
        ax.set(xlabel="minute", ylabel="RSS (MB)", title=f"RSS (growth at the same load: {_pct(s['rss_mb'].get('growth'))})")
        ax = row[2]
        ax.plot(t, [x["fds"] for x in s["samples"]], label="open fds")
        ax.plot(t, [x["threads"] for x in s["samples"]], label="threads")
        for key, style in (("fds", "C0"), ("threads", "C1")):
            ax.axhline(s["idle"]["before"][key], color=style, ls="--", lw=1)
            ax.plot([t.max() if t.size else 0], [s["idle"]["after"][key]], "x", color=style)
        ax.set(xlabel="minute", title="fds, threads (dashed: idle before; x: idle after)")
        ax.legend(fontsize=8)
        ax = row[3]
        ax.step(t, [x["active"] for x in s["samples"]], where="post", label="active calls")
        ax.bar(np.array(minutes) - 0.5, [m["dropped_frames"] for m in s["per_minute"]], width=0.8, alpha=0.4,
               color="r", label="dropped frames")
        ax.set(xlabel="minute", title=f"calls {s['calls']['completed']}/{s['calls']['total']} ok; "
                                      f"{s['dropped_frames']} dropped frames")
        ax.legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


# -- main ---------------------------------------------------------------------------------

async def soak_all(runs: list[ServerSoak], stalls: list[tuple[float, float]]) -> None:
    """The servers' soaks at once; meanwhile, this process's own event-loop stalls (a late
    receive looks like a late frame: the JSON says how often the caller side was late)."""
    async def watch() -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(0.05)
            if (late := time.monotonic() - start - 0.05) > 0.05:
                stalls.append((time.time(), late))

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(r.run() for r in runs))
    finally:
        watcher.cancel()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """The options of a script that starts a server process and speaks to it (this one and
    bench_realtime.py): --model, --device, --dtype, --voice, --speech-cache,
    --start-timeout, --torch-threads, --out."""
    ap.add_argument("--model", default="/tmp/tiny_chroma", help="checkpoint directory or hub id")
    ap.add_argument("--device", default=None, help="cpu, cuda ... (default: the server's)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ap.add_argument("--voice", help="voice file (default: cloned by the server from an espeak-ng clip)")
    ap.add_argument("--speech-cache", default=str(Path(tempfile.gettempdir()) / "chroma-agent-soak-speech"),
                    help="where the espeak-ng WAVs are kept")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds for a server to load the model")
    ap.add_argument("--torch-threads", type=int, default=None, help="the server's model threads (default: the server's)")
    ap.add_argument("--out", help="JSON to write (and a PNG beside it)")


def voice_args(args, speech: Speech) -> list[str]:
    """The server's voice options: --voice, else a clone of an espeak-ng clip."""
    if args.voice:
        return ["--voice", args.voice]
    return ["--voice-audio", str(speech.wav(VOICE_TEXT)), "--voice-text", VOICE_TEXT]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(ap)
    ap.add_argument("--protocol", choices=("twilio", "realtime", "both"), default="both",
                    help="which server(s); both: the two side by side, --calls lines on each")
    ap.add_argument("--calls", type=int, default=8, help="concurrent calls (lines) per server (default 8)")
    ap.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    ap.add_argument("--warmup-calls", type=int, default=3,
                    help="warm-up calls per line, all lines at once, before the idle baseline (default 3)")
    ap.add_argument("--max-frames", type=int, default=40, help="reply cap, 80 ms frames (default 40 = 3.2 s)")
    ap.add_argument("--max-calls", type=int, default=None,
                    help="the server's --max-calls (default: --calls; 0: the server decides, i.e. its engine's "
                         "measured capacity)")
    ap.add_argument("--capacity-fraction", type=float, default=None, metavar="F",
                    help="instead of --calls: F x the engine's capacity (the server measures it at start), "
                         "e.g. 0.9")
    ap.add_argument("--seed", type=int, default=0, help="the calls' plan (scenarios, phrases, timings)")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples of the server")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.minutes <= 0:
        ap.error("--calls must be at least 1 and --minutes above 0")

    kinds = ["twilio", "realtime"] if args.protocol == "both" else [args.protocol]
    if "twilio" in kinds:   # a heavy import (pipecat, torch): here, not on the event loop mid-soak
        import pipecat_chroma.twilio_testing  # noqa: F401
    speech = Speech(Path(args.speech_cache))
    clips = {f"{kind}{i}@{wpm}": speech.clip(text, wpm) for kind, pool in (("q", QUESTIONS), ("b", BARGE_INS))
             for i, text in enumerate(pool) for wpm in (*SPEAKING_RATES, 175)}
    logs = Path(tempfile.mkdtemp(prefix="soak_"))
    load_before = os.getloadavg()
    servers = [Server(kind, args, voice_args(args, speech), logs / f"{kind}.log") for kind in kinds]
    runs, stalls = [], []
    try:
        for server in servers:
            server.ready_s = server.wait_ready(args.start_timeout)
            print(f"{server.kind} server ready in {server.ready_s:.1f} s (log: {server.log})", file=sys.stderr)
        runs = [ServerSoak(s.kind, s, args, clips) for s in servers]
        asyncio.run(soak_all(runs, stalls))
    finally:
        exits = {s.kind: s.stop() for s in servers}
    calls = args.calls if args.capacity_fraction is None else f"{args.capacity_fraction:g} x capacity"
    result = {
        "benchmark": "soak.py: concurrent calls against a real server process",
        "title": f"{args.model}, {calls} calls per server, {args.minutes:g} min, seed {args.seed}",
        "args": vars(args), "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average": {"before": load_before, "after": os.getloadavg()}},
        "gap_ms": 1000 * GAP_S, "servers": {}, "targets": {},
        "client_loop_stalls": {"over_50ms": len(stalls), "over_100ms": sum(1 for _, s in stalls if s > 0.1),
                               "max_ms": round(1000 * max((s for _, s in stalls), default=0.0), 1)},
    }
    ok = True
    for run in runs:
        s = run.summary()
        s["exit_code"] = exits[run.kind]
        s["log"] = {"path": str(run.server.log), **run.server.log_errors()}
        result["servers"][run.kind] = s
        met = targets(s)
        result["targets"][run.kind] = {name: {"met": m, "measured": what} for name, (m, what) in met.items()}
        ok &= all(m for m, _ in met.values())
        c, r = s["calls"], s["replies"]
        print(f"\n{run.kind}: calls {c['completed']}/{c['total']} completed, {c['failed']} failed "
              f"(warm-up {c['warmup']['total']}, {c['warmup']['failed']} failed); replies {r['started']} started, "
              f"{r['finished']} finished, {r['cancelled']} cancelled {r['cancelled_by']}; TTFA ms {s['ttfa_ms']}; "
              f"server exit {s['exit_code']}, {s['log']['error_lines']} error lines", file=sys.stderr)
        for reason, n in {**c["failures"], **c["notes"]}.items():
            print(f"  {n} x {reason}", file=sys.stderr)
        for m in s["per_minute"]:
            t = m["ttfa_ms"]
            print(f"  minute {m['minute']:3d}: TTFA p50/p95/p99 {t.get('p50', '-')}/{t.get('p95', '-')}/"
                  f"{t.get('p99', '-')} ms (n={t['n']}), dropped frames {m['dropped_frames']}, RSS {m['rss_mb_mean']} MB, "
                  f"fds {m['fds_max']}, threads {m['threads_max']}, engine tick p95 {m['engine_frame_ms_p95_max']} ms",
                  file=sys.stderr)
        for name, (m, what) in met.items():
            print(f"  {'PASS' if m else 'FAIL'}  {name}: {what}", file=sys.stderr)
    result["calls"] = [c.as_dict() for run in runs for c in run.calls]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        plot(result, out.with_suffix(".png"))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
