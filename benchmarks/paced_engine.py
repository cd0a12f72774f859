#!/usr/bin/env python3
"""A benchmark tool, never a product path: `PacedEngine`, a `ChromaEngine` whose model
compute is replaced by a paced stand-in, and the launcher that runs a real server on it.

What stays real: the engine's scheduler thread and its loop (`ChromaEngine._loop`, its
condition, admission and capacity), `EngineConversation` (the conversation's prompt
building, audio features, detokenizer, history, cancel/truncate), each reply's `Job` and
its queue, `Response`'s hops to worker threads, and everything above them (the servers).
What is a stand-in:

- the tick (`_tick`): no model runs. Every `tick_ms` (default 80: an engine exactly at
  real time, as at its capacity) every speaking reply gets its next frame, all in one
  burst as the real engine hands a tick's frames out; the time between is a condition
  wait (a sleep), so the server process spends no CPU on it, as a GPU tick spends the GPU's.
  A tick more than a whole period late re-anchors the grid (the lost time stays lost).
- the frames: one real reply made at start with the loaded (tiny) model in the served
  voice (`RecordedReply`: codes, `text_ids` as the reasoner fed them, `pcm` decoded once),
  handed out in order (cycled when the model's reply was shorter than `reply_frames`), each
  frame a fresh copy of its audio. A reply ends after `reply_frames` (stop reason "eos") or
  its `max_frames` ("max_frames").
- the prefill: none. A reply's first frame comes exactly `first_frame_ms` after its job
  was submitted (a timed wake of the scheduler, off the tick grid; the stand-in's own time
  to first audio, which `call_cost.py` subtracts), then it joins the grid. Its prompt's
  tokens are only counted (`NullReasoner`), so `prompt_end` and the history's length are
  what the real engine would set.
- the reasoner: `NullReasoner` keeps a conversation's token count (length, mark/restore,
  rewind, feed) and no KV cache: closing a turn (`_finish_turn`) computes nothing.
- transcripts: off. A transcript asked for ends at once with an error (the reply goes on);
  the servers ask for none unless told to (a transcripts folder, `audio.input.transcription`).

Capacity is given (the harness's N), never calibrated. `stats()` (and `--stats FILE`,
rewritten every second) reports the ticks and how late first frames came.

    python benchmarks/paced_engine.py --tick-ms 80 --first-frame-ms 40 --reply-frames 40 \\
        serve realtime --model /tmp/tiny --voice-audio me.wav --voice-text "..." --max-calls 64

runs `chroma-agent serve KIND ...` itself (the CLI's own `main`: its checks, CPU sharing,
model load, voice), with the server module's `serve` given a `PacedEngine` over the loaded
model instead of the model (`engine_over` uses a ready engine as is). `--max-calls` is the
engine's capacity. benchmarks/call_cost.py starts it and drives calls through it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "plugins" / "pipecat"), str(HERE)]   # run from anywhere

from chroma_agent.runtime.engine import ChromaEngine  # noqa: E402
from chroma_agent.runtime.generation import Frame  # noqa: E402

QUESTION = "What time does the store open on Saturday?"
SERVER_MODULES = {"realtime": "chroma_agent.serving.realtime_server", "twilio": "pipecat_chroma.twilio_server",
                  "web": "pipecat_chroma.web_server"}


class RecordedReply:
    """One real reply of the loaded model in `voice`: per frame its codes, the reasoner
    tokens fed at it and its decoded 80 ms of audio (float32, the model's rate)."""

    def __init__(self, frames: list[tuple], length: int, source_frames: int):
        self.frames = frames                  # (codes, text_ids, pcm)
        self.length = length                  # frames per paced reply
        self.source_frames = source_frames    # frames the model's reply had

    @classmethod
    def record(cls, model, voice, length: int = 40, seed: int = 0) -> "RecordedReply":
        import torch

        from chroma_agent.model.codec import StreamingMimiDecoder
        from chroma_agent.model.processor import DEFAULT_SYSTEM_PROMPT
        from chroma_agent.model.sampling import SamplingOptions

        prompt = model.processor.user_turn(None, QUESTION, DEFAULT_SYSTEM_PROMPT)
        frames: list[tuple] = []
        with torch.inference_mode():
            for attempt in range(8):   # random weights may end a reply at once: another seed
                decoder = StreamingMimiDecoder(model.codec_model, model.config.num_codebooks)
                frames = []
                for frame in model.reply_frames(voice, prompt, length, SamplingOptions(seed=seed + attempt)):
                    pcm = decoder.decode_frame(frame.codes[None])[0].float().cpu().numpy()
                    frames.append((frame.codes.clone(), list(frame.text_ids), np.ascontiguousarray(pcm)))
                if len(frames) >= min(length, 8):
                    break
        if not frames:
            raise RuntimeError("the model made no frame to record")
        return cls(frames, length, len(frames))

    def frame(self, index: int) -> Frame:
        codes, text_ids, pcm = self.frames[index % len(self.frames)]
        return Frame(index, codes, list(text_ids), pcm.copy())   # a fresh array per frame, as the engine's


class NullReasoner:
    """A conversation's reasoner as bookkeeping only: token count and positions, no cache."""

    def __init__(self):
        self.length = 0
        self.next_position = 0
        self.forced: list[int] = []

    def mark(self) -> tuple[int, int]:
        return self.length, self.next_position

    def restore(self, mark: tuple[int, int]) -> None:
        self.length, self.next_position = mark

    def feed(self, ids) -> None:
        self.length += len(ids)
        self.next_position += len(ids)

    def rewind(self, length: int) -> None:
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot rewind to {length}: only {self.length} tokens are counted")
        self.length, self.next_position = length, self.next_position - drop


class PacedEngine(ChromaEngine):
    """A `ChromaEngine` with a paced stand-in for the model (module docstring): `capacity`
    conversations, a tick every `tick_ms`, each reply's first frame `first_frame_ms` after
    its submission, frames from `reply` (a `RecordedReply`)."""

    def __init__(self, model, capacity: int, reply: RecordedReply, *, tick_ms: float = 80.0,
                 first_frame_ms: float = 40.0, **options):
        if tick_ms <= 0 or first_frame_ms < 0:
            raise ValueError("tick_ms must be > 0 and first_frame_ms >= 0")
        self.recorded = reply
        self.tick_s, self.first_frame_s = tick_ms / 1000, first_frame_ms / 1000
        self._next_tick: float | None = None
        self._scheduled: float | None = None
        self.first_frame_late_ms: collections.deque[float] = collections.deque(maxlen=20000)
        self.frames_out = 0
        super().__init__(model, max_conversations=capacity, frame_graphs=False, **options)

    # -- what the stand-in replaces --
    def conversation(self, *args, **kwargs):
        conv = super().conversation(*args, **kwargs)
        conv.reasoner = NullReasoner()   # its real one (allocated by Conversation) is dropped here
        return conv

    def submit(self, job) -> None:
        job.paced_due = time.perf_counter() + self.first_frame_s
        super().submit(job)

    def submit_transcript(self, job, after=None) -> None:
        job.fail(RuntimeError("transcripts are off in the paced benchmark engine"))

    def _time_chunk(self) -> float:
        return 0.0   # no prefill is ever timed or run

    def _tick(self) -> None:
        now = time.perf_counter()
        for job in [j for j in list(self._prefilling) + self._speaking if j.cancelled.is_set()]:
            self._end(job, "cancelled")
        with self._wakeup:   # the loop moves them too; a wake in `_wait` may come first
            while self._submitted:
                self._prefilling.append(self._submitted.popleft())
        started = []
        for job in [j for j in self._prefilling if j.paced_due <= now]:   # first frames, off the grid
            self._prefilling.remove(job)
            if self._start(job):
                self.first_frame_late_ms.append(1000 * (time.perf_counter() - job.paced_due))
                started.append(job)
        if self._speaking and self._next_tick is None:   # the grid starts at this first frame
            self._scheduled, self._next_tick = now, now + self.tick_s
        if self._next_tick is not None and now >= self._next_tick:
            self._grid_tick(now, started)
        self._wait()

    def _grid_tick(self, now: float, started: list) -> None:
        """Every speaking reply's next frame (not those whose first frame just went out)."""
        for job in [j for j in self._speaking if j.runnable and j not in started]:
            self._give(job)
        end = time.perf_counter()
        self.tick_times.append((end, 1000 * (end - self._scheduled)))   # since the last tick: > tick_ms is late
        self.ticks += 1
        late = now - self._next_tick
        self._scheduled = self._next_tick if late < self.tick_s else now
        self._next_tick = self._scheduled + self.tick_s
        if not self._speaking:
            self._next_tick = self._scheduled = None

    def _wait(self) -> None:
        """Until the next grid tick or first frame due (a submit, cancel or read wakes it)."""
        due = [job.paced_due for job in self._prefilling]
        if self._next_tick is not None and any(job.runnable for job in self._speaking):
            due.append(self._next_tick)
        if not due:
            return   # the loop waits on its condition
        with self._wakeup:
            timeout = min(due) - time.perf_counter()
            if timeout > 0 and not (self._submitted or self._stopping):
                self._wakeup.wait(timeout)

    def _start(self, job) -> bool:
        """The reply speaks at once: its prompt only counted, its first frame out."""
        reply = job.reply
        if not isinstance(reply.reasoner, NullReasoner):
            self._fail(job, RuntimeError("the paced engine needs its NullReasoner (a history cap made a real one)"))
            return False
        tokens = sum(len(p) if isinstance(p, list) else p.input_ids.shape[1] for p in reply.head)
        reply.reasoner.feed(range(tokens + reply.prompt.input_ids.shape[1]))
        reply.prompt_end = reply.reasoner.length
        job.prefill.close()
        self._speaking.append(job)
        self._give(job)
        return True

    def _give(self, job) -> None:
        reply = job.reply
        frame = self.recorded.frame(reply.index)
        reply.index += 1
        reply.text_ids += frame.text_ids
        job.deliver(frame)  # wakes a reader awaiting it on its loop
        job.spoken = True
        self.frames_out += 1
        if reply.index >= reply.max_frames:
            self._end(job, "max_frames")
        elif reply.index >= self.recorded.length:
            self._end(job, "eos")

    def stats(self) -> dict:
        """Ticks and first frames so far: the stand-in's own pacing, for the harness."""
        periods = [ms for _, ms in list(self.tick_times)]
        late = list(self.first_frame_late_ms)
        pct = lambda xs: None if not xs else {  # noqa: E731
            "p50": round(float(np.percentile(xs, 50)), 2), "p95": round(float(np.percentile(xs, 95)), 2),
            "max": round(float(max(xs)), 2), "n": len(xs)}
        return {"ticks": self.ticks, "frames_out": self.frames_out, "tick_ms": self.tick_s * 1000,
                "first_frame_ms": self.first_frame_s * 1000, "tick_period_ms": pct(periods),
                "first_frame_late_ms": pct(late), "active": self.active, "capacity": self.capacity,
                "recorded_frames": self.recorded.source_frames, "reply_frames": self.recorded.length}


# -- the launcher: `chroma-agent serve KIND` on a PacedEngine ----------------------------------

def _write_stats(engine: PacedEngine, path: str) -> None:
    while True:
        time.sleep(1.0)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "time": time.time(), **engine.stats()}, f)
        os.replace(tmp, path)


def patch_server(kind: str, options: argparse.Namespace) -> None:
    """The server module's `serve` runs on a `PacedEngine` over the model the CLI loaded."""
    import importlib

    module = importlib.import_module(SERVER_MODULES[kind])
    serve = module.serve

    def paced_serve(*, model, voice, **kwargs):
        capacity = kwargs.get("max_calls")
        if not capacity:
            raise SystemExit("the paced engine needs --max-calls (its capacity)")
        t0 = time.perf_counter()
        reply = RecordedReply.record(model, voice, options.reply_frames)
        engine = PacedEngine(model, capacity, reply, tick_ms=options.tick_ms, first_frame_ms=options.first_frame_ms)
        print(f"paced engine: capacity {capacity}, tick {options.tick_ms:g} ms, first frame {options.first_frame_ms:g}"
              f" ms, {reply.length}-frame replies from a recorded {reply.source_frames}-frame one "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        if options.stats:
            threading.Thread(target=_write_stats, args=(engine, options.stats), daemon=True,
                             name="paced-stats").start()
        try:
            return serve(model=engine, voice=voice, **kwargs)
        finally:
            engine.close()

    module.serve = paced_serve


# -- LiveKit: AgentSessions on a PacedEngine, in this process -----------------------------------

def livekit_host(options: argparse.Namespace, rest: list[str]) -> int:
    """`livekit`: N `AgentSession`s, each with the plugin's `RealtimeModel` on one PacedEngine
    and the session's built-in VAD, on a fake microphone (10 ms frames in real time, as
    RoomIO hands them) and speaker (captures, plays out in real time); each caller speaks
    the question, hears the reply, pauses, again. No LiveKit server: this process is the
    worker, its load generator in it. Measures itself as call_cost.py measures a server
    and writes call_cost's raw figures (JSON) to `--out`."""
    ap = argparse.ArgumentParser(prog="paced_engine.py livekit")
    for name, kind, default in (("--model", str, None), ("--voice", str, None), ("--voice-audio", str, None), ("--voice-text", str, None),
                                ("--question", str, None), ("--out", str, None), ("--calls", int, 2),
                                ("--idle-s", float, 3.0), ("--ramp-s", float, 4.0), ("--warmup-s", float, 2.0),
                                ("--seconds", float, 30.0), ("--pause-s", float, 1.0), ("--seed", int, 0)):
        ap.add_argument(name, type=kind, default=default)
    args = ap.parse_args(rest)
    import asyncio

    return asyncio.run(_livekit_run(options, args))


async def _livekit_run(options, args) -> int:
    import asyncio
    import random

    import soundfile as sf
    from livekit import rtc
    from livekit.agents import Agent, AgentSession, io
    from livekit.plugins import chroma

    import call_cost as cc
    from chroma_agent import ChromaModel
    from chroma_agent.model.audio import resample
    from chroma_agent.serving.runner import freeze_loaded_objects, keep_large_blocks_out_of_the_heap

    model = ChromaModel.from_pretrained(args.model, device="cpu", dtype="float32")
    if args.voice:
        from chroma_agent import Voice

        voice = Voice.load(args.voice)
    else:
        voice = model.voice_from_audio(args.voice_audio, args.voice_text)
    engine = PacedEngine(model, args.calls, RecordedReply.record(model, voice, options.reply_frames),
                         tick_ms=options.tick_ms, first_frame_ms=options.first_frame_ms)
    data, rate = sf.read(args.question, dtype="float32")
    question = (np.clip(resample(data, rate, 24000), -1, 1) * 32767).astype(np.int16)

    class Mic(io.AudioInput):
        def __init__(self):
            super().__init__(label="bench-mic")
            self.pending, self.start, self.frames = np.zeros(0, np.int16), None, 0

        async def __anext__(self):
            self.start = self.start or time.monotonic()
            self.frames += 1
            await asyncio.sleep(max(0.0, self.start + self.frames * 0.01 - time.monotonic()))
            chunk, self.pending = self.pending[:240], self.pending[240:]
            return rtc.AudioFrame(np.pad(chunk, (0, 240 - chunk.size)).tobytes(), 24000, 1, 240)

    class Speaker(io.AudioOutput):
        def __init__(self):
            super().__init__(label="bench-speaker", capabilities=io.AudioOutputCapabilities(pause=False))
            self.segments: list[list] = []   # per reply: (arrival, seconds) of each frame
            self.done = 0
            self.player, self.flushed, self.captured = None, False, 0.0

        async def capture_frame(self, frame):
            await super().capture_frame(frame)
            if self.player is None:
                self.segments.append([])
                self.flushed, self.captured = False, 0.0
                self.player = asyncio.create_task(self._play(time.monotonic()))
                self.on_playback_started(created_at=time.time())
            self.segments[-1].append((time.time(), frame.duration))
            self.captured += frame.duration

        def flush(self):
            super().flush()
            self.flushed = True

        def clear_buffer(self):
            if self.player is not None:
                self.player.cancel()
                self._finish(interrupted=True)

        async def _play(self, start):   # real time from the first frame; a late frame waits (a gap)
            played, last = 0.0, start
            while not (self.flushed and played >= self.captured):
                await asyncio.sleep(min(0.08, max(0.01, self.captured - played)))
                now = time.monotonic()
                played, last = min(self.captured, played + now - last), now
            self._finish(interrupted=False, played=played)

        def _finish(self, interrupted, played=None):
            self.player = None
            self.done += 1
            self.on_playback_finished(playback_position=played or self.captured, interrupted=interrupted)

    load = cc.Load()
    load.commit_lead = []   # the session's commit -> its generate_reply (turn policy), ms

    async def one_call(rng):
        rt = chroma.RealtimeModel(model=engine, voice=voice, max_frames=375, user_transcription=False)
        commits, sessions = [], []
        make = rt.session

        def session(**kw):
            s = make(**kw)
            commit, generate = s.commit_audio, s.generate_reply

            def committed():
                commits.append(("commit", time.time()))
                commit()

            def asked(**options):   # the session's end of the turn: a reply is asked for
                commits.append(("reply", time.time()))
                return generate(**options)
            s.commit_audio, s.generate_reply = committed, asked
            sessions.append(s)
            return s
        rt.session = session
        agent_session = AgentSession(llm=rt, aec_warmup_duration=None, turn_handling={"turn_detection": "vad"})
        mic, speaker = Mic(), Speaker()
        agent_session.input.audio, agent_session.output.audio = mic, speaker
        try:
            await agent_session.start(Agent(instructions="You are a helpful agent."))
            load.connected += 1
            await asyncio.sleep(rng.uniform(0, args.pause_s))
            while time.time() < load.stop_at:
                mic.pending = np.concatenate([mic.pending, question])
                spoken = time.time() + question.size / 24000
                heard = speaker.done
                deadline = time.monotonic() + question.size / 24000 + cc.REPLY_TIMEOUT_S
                while speaker.done == heard:
                    if time.monotonic() > deadline:
                        raise TimeoutError("no reply played")
                    await asyncio.sleep(0.05)
                chunks = speaker.segments[-1]
                ends = [t for what, t in commits if what == "reply" and spoken - 0.5 <= t <= chunks[0][0]]
                committed = [t for what, t in commits if what == "commit" and spoken - 0.5 <= t <= chunks[0][0]]
                load.commit_lead.extend([1000 * (ends[-1] - committed[-1])] if ends and committed else [])
                load.heard.append(cc.Heard(str(id(mic)), spoken, chunks[0][0], list(chunks), ends[-1] if ends else None))
                load.settled.add(id(mic))
                await asyncio.sleep(args.pause_s)
            load.done += 1
            await load.hangup.wait()
        except Exception as e:
            load.failed.append(f"{type(e).__name__}: {str(e)[:160]}")
        finally:
            await agent_session.aclose()

    keep_large_blocks_out_of_the_heap()
    freeze_loaded_objects()
    pid = os.getpid()
    await asyncio.sleep(1.0)
    idle, cpu0, t0 = cc.proc_status(pid), cc.cpu_seconds(), time.monotonic()
    await asyncio.sleep(args.idle_s)
    idle_cpu = (cc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    rng, tasks = random.Random(args.seed), []
    for _ in range(args.calls):
        tasks.append(asyncio.create_task(one_call(random.Random(rng.random()))))
        await asyncio.sleep(min(args.ramp_s / args.calls, 0.5))
    deadline = time.monotonic() + 90
    while len(load.settled) + len(load.failed) < args.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(args.warmup_s)
    stop, lags, samples = asyncio.Event(), [], []
    watchers = [asyncio.create_task(cc.loop_lag(lags, stop)), asyncio.create_task(cc.sample_server(pid, samples, stop))]
    w0, c0, b0 = time.time(), cc.cpu_seconds(), cc.machine_ticks()
    await asyncio.sleep(args.seconds)
    w1, c1, b1 = time.time(), cc.cpu_seconds(), cc.machine_ticks()
    stop.set()
    load.stop_at = w1
    engine_stats, frame_ms = engine.stats(), engine.frame_times()
    deadline = time.monotonic() + cc.REPLY_TIMEOUT_S + options.reply_frames * 0.08 + 30
    while load.done + len(load.failed) < args.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    load.hangup.set()
    await asyncio.wait(tasks, timeout=30)
    await asyncio.gather(*watchers, return_exceptions=True)
    raw = {"w0": w0, "w1": w1, "cpu_s": c1 - c0, "idle": idle, "idle_cpu": idle_cpu, "samples": samples, "lags": lags,
           "busy": (b1[0] - b0[0]) / max(1, b1[1] - b0[1]), "engine": engine_stats, "frame_ms": frame_ms,
           "connected": load.connected, "failed": load.failed, "commit_to_reply_ms": cc.pct(load.commit_lead),
           "heard": [vars(h) for h in load.heard if w0 <= h.speech_end <= w1]}
    Path(args.out).write_text(json.dumps(raw))
    engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="chroma-agent serve KIND on a paced stand-in engine (benchmarks only)")
    ap.add_argument("--tick-ms", type=float, default=80.0, help="one tick (every speaking reply's frame), ms")
    ap.add_argument("--first-frame-ms", type=float, default=40.0, help="submit -> a reply's first frame, ms")
    ap.add_argument("--reply-frames", type=int, default=40, help="frames per reply (80 ms each)")
    ap.add_argument("--stats", help="a JSON file rewritten every second with the engine's stats()")
    options, rest = ap.parse_known_args(argv)
    if rest[:1] == ["livekit"]:
        return livekit_host(options, rest[1:])
    if len(rest) < 2 or rest[0] != "serve" or rest[1] not in SERVER_MODULES:
        ap.error(f"then: serve {{{','.join(SERVER_MODULES)}}} and chroma-agent's options, or livekit and its own")
    patch_server(rest[1], options)
    from chroma_agent import cli

    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
