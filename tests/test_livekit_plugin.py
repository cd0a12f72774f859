"""livekit-plugins-chroma through a real AgentSession, offline: no LiveKit server or room.

A fake microphone feeds espeak-ng speech in 10 ms frames in real time, a fake speaker
plays the agent's audio in real time (stalling when frames run out, as a jitter buffer
would) and reports how much it played, and the tiny checkpoint speaks short replies.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents import Agent, AgentSession, io  # noqa: E402
from livekit.plugins import chroma  # noqa: E402

from chroma_agent.model.audio import resample  # noqa: E402
from tests.conftest import speak  # noqa: E402

pytestmark = pytest.mark.timeout(90)  # a stream left open fails the test instead of hanging CI

REPO = Path(__file__).resolve().parents[1]
MIC_RATE = 24000  # what RoomIO hands the agent
FRAMES = 6        # reply length in 80 ms frames: short, the tiny model is slow on a CPU


class Mic(io.AudioInput):
    """A microphone: 10 ms frames in real time, silence unless `speak()` queued speech."""

    def __init__(self) -> None:
        super().__init__(label="test-mic")
        self._pending = np.zeros(0, np.int16)
        self._start: float | None = None
        self._frames = 0

    def speak(self, pcm: np.ndarray) -> float:
        """Queue int16 speech at MIC_RATE; returns when it will have been heard (loop time)."""
        self._pending = np.concatenate([self._pending, pcm])
        return time.monotonic() + self._pending.size / MIC_RATE

    async def __anext__(self) -> rtc.AudioFrame:
        self._start = self._start or time.monotonic()
        self._frames += 1
        await asyncio.sleep(max(0.0, self._start + self._frames * 0.01 - time.monotonic()))
        step = MIC_RATE // 100
        chunk, self._pending = self._pending[:step], self._pending[step:]
        chunk = np.pad(chunk, (0, step - chunk.size))
        return rtc.AudioFrame(chunk.tobytes(), MIC_RATE, 1, step)


class Speaker(io.AudioOutput):
    """Plays captured audio in real time and reports the playback position of each segment."""

    def __init__(self) -> None:
        super().__init__(label="test-speaker", capabilities=io.AudioOutputCapabilities(pause=False))
        self.frames: list[rtc.AudioFrame] = []
        self.finished: list[tuple[float, bool]] = []  # (playback position, interrupted) per segment
        self.started = asyncio.Event()
        self._captured = self._played = 0.0
        self._flushed = False
        self._player: asyncio.Task | None = None

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._player is None:
            self._captured = self._played = 0.0
            self._flushed = False
            self._player = asyncio.create_task(self._play())
            self.on_playback_started(created_at=time.time())
            self.started.set()
        self.frames.append(frame)
        self._captured += frame.duration

    def flush(self) -> None:
        super().flush()
        self._flushed = True

    def clear_buffer(self) -> None:
        if self._player is not None:
            self._player.cancel()
            self._finish(interrupted=True)

    async def _play(self) -> None:
        last = time.monotonic()
        while not (self._flushed and self._played >= self._captured):
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self._played = min(self._captured, self._played + now - last)  # stalls when starved
            last = now
        self._finish(interrupted=False)

    def _finish(self, interrupted: bool) -> None:
        self._player = None
        self.finished.append((self._played, interrupted))
        self.on_playback_finished(playback_position=self._played, interrupted=interrupted)


class Transcript(io.TextOutput):
    def __init__(self) -> None:
        super().__init__(label="test-transcript", next_in_chain=None)
        self.text = ""

    async def capture_text(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


@dataclass
class Call:
    session: AgentSession
    mic: Mic
    speaker: Speaker
    errors: list = field(default_factory=list)
    metrics: list = field(default_factory=list)

    def assistant_messages(self):
        return [m for m in self.session.history.messages() if m.role == "assistant"]

    async def assistant_message(self, interrupted: bool = False, timeout: float = 10.0):
        """The first assistant message with this `interrupted` flag, waiting for it: the session
        adds a reply to its history a few loop turns after the speaker reports its end."""
        deadline = time.monotonic() + timeout
        while not (found := [m for m in self.assistant_messages() if m.interrupted == interrupted]):
            assert time.monotonic() < deadline, f"no assistant message with interrupted={interrupted}"
            await asyncio.sleep(0.02)
        return found[0]

    async def played(self, segments: int = 1, timeout: float = 40.0) -> None:
        """Wait until `segments` replies have finished playing."""
        deadline = time.monotonic() + timeout
        while len(self.speaker.finished) < segments:
            assert time.monotonic() < deadline, f"only {len(self.speaker.finished)} of {segments} replies played"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def call(llm=None, tts=None, turn_detection: str = "manual", instructions="You are a helpful agent."):
    """An AgentSession on the fake mic and speaker, with the built-in (offline) VAD."""
    session = AgentSession(llm=llm, tts=tts, aec_warmup_duration=None,
                           turn_handling={"turn_detection": turn_detection})
    c = Call(session, Mic(), Speaker())
    session.input.audio, session.output.audio = c.mic, c.speaker
    session.output.transcription = Transcript()
    session.on("error", c.errors.append)
    session.on("metrics_collected", lambda ev: c.metrics.append(ev.metrics))
    await session.start(Agent(instructions=instructions))
    try:
        yield c
    finally:
        await session.aclose()


def audio_of(frames: list[rtc.AudioFrame]) -> np.ndarray:
    for f in frames:  # Chroma's frames, untouched: 80 ms of int16 mono at 24 kHz
        assert (f.sample_rate, f.num_channels, f.samples_per_channel) == (24000, 1, 1920)
    return np.concatenate([np.frombuffer(f.data, np.int16) for f in frames])


def realtime(model, voice, frames: int = FRAMES, **options) -> chroma.RealtimeModel:
    return chroma.RealtimeModel(model=model, voice=voice, max_frames=frames, seed=0, **options)


class Spy:
    """The tiny model as `model=`: records the conversations it makes, their calls
    (respond/say keyword arguments, truncations) and how each reply ended. `fail_first`
    makes the first reply fail after one frame, the way a plain conversation does
    ("raise": an exception) or an engine's does ("error": ResponseDone(stop_reason="error"))."""

    def __init__(self, model, fail_first: str | None = None):
        self.model, self.fail_next = model, fail_first
        self.conversations, self.prompts, self.calls, self.ends, self.truncations = [], [], [], [], []

    def conversation(self, voice, system_prompt=None):
        conv = self.model.conversation(voice=voice, system_prompt=system_prompt)
        self.conversations.append(conv)
        self.prompts.append(system_prompt)
        respond, say, truncate = conv.respond, conv.say, conv.truncate

        def spied(method, name):
            def call(*args, **kwargs):
                self.calls.append((name, args, kwargs))
                fail, self.fail_next = self.fail_next, None
                return _Recorded(method(*args, **kwargs), self.ends, fail)
            return call

        def recording_truncate(played_ms):
            self.truncations.append(played_ms)
            truncate(played_ms)

        conv.respond, conv.say, conv.truncate = spied(respond, "respond"), spied(say, "say"), recording_truncate
        return conv


class _Recorded:
    """A reply that records its ResponseDone; with `fail`, its device fails after one frame
    (the conversation itself is cancelled and ends cleanly first)."""

    FAILURE = "CUDA error: an illegal memory access was encountered (simulated)"

    def __init__(self, response, ends: list, fail: str | None):
        self.response, self.ends, self.fail = response, ends, fail

    def cancel(self):
        self.response.cancel()

    async def __aiter__(self):
        frames = 0
        async for event in self.response:
            if type(event).__name__ == "ResponseDone":
                if self.fail == "error":
                    event = dataclasses.replace(event, stop_reason="error", error=self.FAILURE)
                self.ends.append(event)
            elif type(event).__name__ == "AudioChunk":
                frames += 1
                if self.fail and frames == 2:
                    self.response.cancel()
            if not (self.fail and frames >= 2) or (self.fail == "error" and event in self.ends):
                yield event  # after the failure only an engine's ResponseDone gets out
        if self.fail == "raise":
            raise RuntimeError(self.FAILURE)


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    """'What time does the store open on Saturday?' as int16 at the mic's rate."""
    clip, rate = sf.read(speak("What time does the store open on Saturday?",
                               tmp_path_factory.mktemp("lk") / "q.wav"), dtype="float32")
    return (resample(clip, rate, MIC_RATE) * 32767).astype(np.int16)


# -- importing --
def test_import_loads_nothing_and_leaves_cuda_alone():
    code = ("import sys\n"
            "from livekit.plugins import chroma\n"
            "from livekit.agents import Plugin\n"
            "assert any(p.package == 'livekit.plugins.chroma' for p in Plugin.registered_plugins)\n"
            "torch = sys.modules.get('torch')\n"
            "assert torch is None or not torch.cuda.is_initialized()\n"
            "assert 'chroma_agent.model.weights' not in sys.modules, 'no model code at import'\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", "importing the plugin should not even import torch"


# -- the realtime model through AgentSession --
async def test_say_greets_in_the_cloned_voice(model, voice):
    async with call(realtime(model, voice)) as c:
        handle = c.session.say("Hello, thanks for calling!")
        await asyncio.wait_for(handle.wait_for_playout(), 40)
        pcm = audio_of(c.speaker.frames)
        assert pcm.size == FRAMES * 1920 and np.abs(pcm).max() > 0
        assert c.speaker.finished == [(pytest.approx(FRAMES * 0.08, abs=0.02), False)]
        [greeting] = c.assistant_messages()
        assert greeting.text_content and not greeting.interrupted
        assert [m.request_id for m in c.metrics if hasattr(m, "ttft")] and not c.errors


def _chroma_samples() -> dict:
    """The chroma_ samples of prometheus_client's default registry (a worker's /metrics)."""
    from prometheus_client import REGISTRY

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in REGISTRY.collect() if f.name.startswith("chroma_") for s in f.samples}


async def test_spoken_turn_committed_by_hand(model, voice, question):
    spy = Spy(model)
    before = _chroma_samples()
    async with call(realtime(spy, voice)) as c:
        heard_at = c.mic.speak(question)
        await asyncio.sleep(heard_at - time.monotonic() + 0.3)
        c.session.commit_user_turn()
        await c.played()
        assert audio_of(c.speaker.frames).size == FRAMES * 1920
        reply = await c.assistant_message()
        assert reply.text_content and len(c.assistant_messages()) == 1
        [metrics] = [m for m in c.metrics if getattr(m, "request_id", None)]
        assert metrics.ttft > 0 and metrics.output_token_details.audio_tokens == FRAMES
        assert metrics.input_tokens > 0 and not metrics.cancelled and not c.errors
        # the model heard the question, at 16 kHz, without the silence around it in the buffer
        [(name, _, kwargs)] = spy.calls
        speech = question.size / MIC_RATE
        assert name == "respond" and kwargs["sample_rate"] == 16000 and kwargs["text"] is None
        assert speech - 0.4 < kwargs["audio"].size / 16000 < speech + 0.2
    # and on prometheus_client's default registry, what a LiveKit worker's /metrics serves
    after = _chroma_samples()

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("chroma_calls_total", outcome="completed") == 1 and moved("chroma_calls_active") == 0   # the registry is the process's
    assert moved("chroma_time_to_first_audio_seconds_count") == 1
    assert 0 < moved("chroma_time_to_first_audio_seconds_sum") < 30
    assert moved("chroma_turns_total", status="completed") == 1 and moved("chroma_audio_frames_sent_total") == FRAMES


async def test_spoken_turn_through_the_builtin_vad(model, voice, question):
    async with call(realtime(model, voice), turn_detection="vad") as c:
        c.mic.speak(question)  # then silence: the VAD ends the turn and the session commits it
        await c.played(timeout=60)
        assert audio_of(c.speaker.frames).size == FRAMES * 1920
        assert (await c.assistant_message()).text_content and not c.errors


@pytest.mark.parametrize("by", ["the caller's voice", "session.interrupt()"])
async def test_barge_in_interrupts_and_truncates_to_what_played(model, voice, question, by):
    spy = Spy(model)
    frames = 250  # far longer than the test: only the interruption ends it
    async with call(realtime(spy, voice, frames=frames), turn_detection="vad") as c:
        c.session.say("Our store opens at nine on Saturdays and closes at six in the evening.")
        await asyncio.wait_for(c.speaker.started.wait(), 40)
        if by == "session.interrupt()":
            await asyncio.sleep(0.5)
            await asyncio.wait_for(c.session.interrupt(), 10)
        else:
            c.mic.speak(question)  # the caller talks over the agent: the VAD hears 0.5 s of it
        await c.played(timeout=40)
        position, interrupted = c.speaker.finished[0]
        assert interrupted and 0 < position < frames * 0.08
        said = await c.assistant_message(interrupted=True)
        assert said.text_content and len([m for m in c.assistant_messages() if m.interrupted]) == 1
        # the model keeps what was heard: truncated at the speaker's position...
        await asyncio.sleep(0.5)
        assert spy.truncations == [pytest.approx(position * 1000, abs=1)]
        # ...and stopped generating within a frame of the interruption
        [said_metrics] = [m for m in c.metrics if getattr(m, "request_id", None)][:1]
        assert said_metrics.cancelled and spy.ends[0].stop_reason == "cancelled"
        assert spy.ends[0].stats.frames <= said_metrics.output_token_details.audio_tokens + 1 < frames
        assert not c.errors


async def test_instructions_greet_and_change_the_system_prompt_from_the_next_turn(model, voice):
    spy = Spy(model)
    async with call(realtime(spy, voice), instructions="You answer for a bakery.") as c:
        await asyncio.wait_for(c.session.generate_reply(instructions="Greet the caller."), 40)
        await c.played()
        assert spy.calls[0][0] == "respond" and spy.calls[0][2]["text"] == "Greet the caller."
        assert spy.calls[0][2]["audio"] is None  # no audio was committed: a text turn
        await c.session.current_agent.update_instructions("You answer for a flower shop.")
        await asyncio.wait_for(c.session.run(user_input="What do you sell?"), 40)
        await c.played(2)
        assert spy.prompts == ["You answer for a bakery.", "You answer for a flower shop."]
        assert spy.calls[1][2]["text"] == "What do you sell?" and not c.errors


async def test_turn_given_up_before_its_reply_starts_goes_to_the_next_reply(model, voice, question):
    from livekit.agents import llm

    spy = Spy(model)
    rt = realtime(spy, voice).session()  # the session alone, as AgentSession drives it
    step = MIC_RATE // 100
    for i in range(0, question.size - step, step):
        rt.push_audio(rtc.AudioFrame(question[i:i + step].tobytes(), MIC_RATE, 1, step))
    rt.commit_audio()
    rt.generate_reply().cancel()  # the caller went on talking before the reply began
    event = await asyncio.wait_for(rt.generate_reply(), 30)
    [message] = [m async for m in event.message_stream]
    assert len([f async for f in message.audio_stream]) == FRAMES
    [(name, _, kwargs)] = spy.calls
    assert name == "respond" and 1.5 * 16000 < kwargs["audio"].size < 3.5 * 16000  # the question, trimmed
    with pytest.raises(llm.RealtimeError, match="no speech"):  # nothing left to answer
        await asyncio.wait_for(rt.generate_reply(), 30)
    await rt.aclose()


async def test_typed_turn_is_answered(model, voice):
    async with call(realtime(model, voice)) as c:
        result = await asyncio.wait_for(c.session.run(user_input="When do you open on Saturday?"), 40)
        result.expect.next_event().is_message(role="assistant")
        await c.played()
        assert audio_of(c.speaker.frames).size == FRAMES * 1920
        assert [m.text_content for m in c.session.history.messages() if m.role == "user"] == \
            ["When do you open on Saturday?"]


@pytest.mark.parametrize("failure", ["raise", "error"])
async def test_failed_reply_is_an_error_event_and_the_next_turn_works(model, voice, failure):
    async with call(realtime(Spy(model, fail_first=failure), voice)) as c:
        await asyncio.wait_for(c.session.run(user_input="Hello?"), 40)
        await c.played()
        [error] = c.errors
        assert error.error.recoverable and _Recorded.FAILURE in str(error.error.error)
        assert len(c.speaker.frames) == 1  # the frame before the failure; then its streams closed
        assert [m.interrupted for m in c.assistant_messages()] == [False]  # what played stays in the history
        result = await asyncio.wait_for(c.session.run(user_input="Are you there?"), 40)
        result.expect.next_event().is_message(role="assistant")
        await c.played(2)
        assert len(c.speaker.frames) == 1 + FRAMES and len(c.errors) == 1


async def test_two_sessions_share_one_model_at_once(model, voice):
    first, second = Spy(model), Spy(model)
    async with call(realtime(first, voice)) as a, call(realtime(second, voice)) as b:
        await asyncio.wait_for(asyncio.gather(a.session.run(user_input="Hi, this is Ann."),
                                              b.session.run(user_input="Hi, this is Bob.")), 60)
        await asyncio.gather(a.played(), b.played())
        assert audio_of(a.speaker.frames).size == audio_of(b.speaker.frames).size == FRAMES * 1920
        assert first.conversations[0].model is second.conversations[0].model is model
        assert chroma.active_sessions() == 2
    assert chroma.active_sessions() == 0


async def test_sessions_on_an_engine_hold_a_slot_each_until_they_close(model, voice):
    from chroma_agent.runtime.engine import ChromaEngine

    with ChromaEngine(model, max_conversations=2) as engine:
        async with call(realtime(engine, voice)) as a, call(realtime(engine, voice)) as b:
            await asyncio.wait_for(asyncio.gather(a.session.run(user_input="Hi, this is Ann."),
                                                  b.session.run(user_input="Hi, this is Bob.")), 60)
            await asyncio.gather(a.played(), b.played())
            assert audio_of(a.speaker.frames).size == audio_of(b.speaker.frames).size == FRAMES * 1920
            assert engine.active == 2 and engine.load == 1.0
        assert engine.active == 0  # closing a session closes its engine conversation
        async with call(realtime(engine, voice)) as c:  # so a new call gets a slot
            await asyncio.wait_for(c.session.run(user_input="Hello?"), 40)
            await c.played()
            assert not c.errors


def test_paths_load_once_per_process(monkeypatch, tmp_path):
    """Jobs asking for the same checkpoint at once load it once; another dtype is another copy."""
    from concurrent.futures import ThreadPoolExecutor

    import chroma_agent
    from livekit.plugins.chroma import models

    loads = []

    def from_pretrained(path, device=None, dtype=None, revision=None):
        loads.append((path, dtype))
        time.sleep(0.2)
        return object()

    monkeypatch.setattr(chroma_agent.ChromaModel, "from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "_loaded", {})
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: chroma.load_model(tmp_path, device="cpu"), range(4)))
    assert len(loads) == 1 and all(g is got[0] for g in got)
    assert chroma.load_model(str(tmp_path) + "/", device="cpu") is got[0]
    assert chroma.load_model(tmp_path, device="cpu", dtype="bfloat16") is not got[0] and len(loads) == 2


# -- the TTS --
async def test_tts_greets_in_the_cloned_voice(model, voice):
    tts = chroma.TTS(model=model, voice=voice, max_frames=FRAMES, seed=0)
    async with call(tts=tts) as c:
        handle = c.session.say("Hello, thanks for calling!")
        await asyncio.wait_for(handle.wait_for_playout(), 40)
        pcm = np.concatenate([np.frombuffer(f.data, np.int16) for f in c.speaker.frames])
        assert pcm.size == FRAMES * 1920 and np.abs(pcm).max() > 0
        assert c.speaker.finished == [(pytest.approx(FRAMES * 0.08, abs=0.03), False)] and not c.errors


async def test_tts_chunked_and_streamed(model, voice):
    tts = chroma.TTS(model=model, voice=voice, max_frames=3, seed=0)
    async with tts.synthesize("Thanks for calling the store.") as chunked:
        audio = [ev.frame async for ev in chunked]
    assert sum(f.samples_per_channel for f in audio) == 3 * 1920
    stream = tts.stream()
    for part in ["Thanks for calling the store. ", "How can I ", "help you today?"]:  # 20+ characters each
        stream.push_text(part)
    stream.end_input()
    audio = [ev.frame async for ev in stream]
    await stream.aclose()
    assert sum(f.samples_per_channel for f in audio) == 2 * 3 * 1920  # two sentences, three frames each
    assert {f.sample_rate for f in audio} == {24000}


def test_input_buffer_resamples_folds_and_keeps_the_latest_30_s():
    # what push_audio() does with each frame: int16 folded to float mono, into the voice session's buffer
    from chroma_agent.serving.pcm import InputBuffer, from_int16

    buffer, rate = InputBuffer(), 48000
    t = np.arange(rate // 100) / rate
    for i in range(3500):  # 35 s of 10 ms stereo frames; the last 5 s louder
        level = 0.5 if i >= 3000 else 0.1
        tone = level * np.sin(2 * np.pi * 440 * (t + i / 100))
        stereo = (np.repeat(tone[:, None], 2, axis=1) * 32767).astype(np.int16)
        frame = rtc.AudioFrame(stereo.tobytes(), rate, 2, t.size)
        buffer.push(from_int16(frame.data, frame.num_channels), frame.sample_rate)
    pcm = buffer.take()
    assert abs(pcm.size - 30 * 16000) <= 16000 // 100
    assert np.sqrt(np.mean(pcm[-16000:] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    assert np.sqrt(np.mean(pcm[16000:32000] ** 2)) == pytest.approx(0.1 / np.sqrt(2), rel=0.02)
    assert buffer.take().size == 0


def test_download_files_for_a_local_checkpoint(monkeypatch, tiny_checkpoint):
    from livekit.agents import Plugin

    [plugin] = [p for p in Plugin.registered_plugins if p.package == "livekit.plugins.chroma"]
    monkeypatch.setenv("CHROMA_MODEL", str(tiny_checkpoint))
    plugin.download_files()  # a local directory: nothing to fetch, no network
    monkeypatch.setenv("CHROMA_MODEL", str(tiny_checkpoint / "missing"))
    with pytest.raises(Exception, match="missing"):
        plugin.download_files()


# -- the worker example --
def test_worker_example_help():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "livekit_agent.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "start" in out.stdout and "dev" in out.stdout


def test_worker_prewarm_loads_the_checkpoint(monkeypatch, tiny_checkpoint):
    import importlib.util

    spec = importlib.util.spec_from_file_location("livekit_agent_example", REPO / "examples" / "livekit_agent.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setenv("CHROMA_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("CHROMA_DEVICE", "cpu")
    monkeypatch.setenv("CHROMA_AGENT_MATMUL", "linear")  # skip timing the CPU matmul paths: a faster load

    class Proc:
        userdata: dict = {}

    proc = Proc()
    example.prewarm(proc)
    from chroma_agent import ChromaModel

    assert isinstance(proc.userdata["model"], ChromaModel)
    assert Path(proc.userdata["model"].source) == Path(tiny_checkpoint)
    assert example.load(None) == 0.0  # no calls yet
    monkeypatch.setitem(example._shared, "model", type("Engine", (), {"load": 0.5})())
    assert example.load(None) == 0.5  # a ChromaEngine reports open conversations / capacity itself


async def test_a_turn_or_instructions_too_long_for_the_model_are_error_events(model, voice):
    from livekit.agents import llm

    from chroma_agent import PromptTooLong

    long = "please tell me everything about the opening hours of the store " * 320  # ~8.6k tokens
    rt = realtime(model, voice, instructions="You answer for a bakery.").session()
    errors = []
    rt.on("error", errors.append)
    with pytest.raises(llm.RealtimeError, match="over its limit"):  # that generation fails
        await asyncio.wait_for(rt.generate_reply(instructions=long), 30)
    assert errors[0].recoverable and isinstance(errors[0].error, PromptTooLong)
    await rt.update_instructions(long)  # refused when the next turn makes its conversation
    event = await asyncio.wait_for(rt.generate_reply(instructions="Hello?"), 30)
    [message] = [m async for m in event.message_stream]
    assert len([f async for f in message.audio_stream]) == FRAMES  # the session goes on, as it was
    assert len(errors) == 2 and errors[1].recoverable and "over its limit of 4096" in str(errors[1].error)
    await rt.aclose()
    # instructions that never fit: the session has no conversation, said once per turn
    rt = realtime(model, voice, instructions=long).session()
    rt.on("error", errors.append)
    with pytest.raises(llm.RealtimeError, match="no Chroma conversation.*over its limit of 4096"):
        await asyncio.wait_for(rt.generate_reply(instructions="Hello?"), 30)
    assert not errors[-1].recoverable
    await rt.aclose()
