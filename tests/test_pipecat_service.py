"""The Pipecat speech-to-speech service (plugins/pipecat) on the tiny checkpoint, driven by
pipecat's own `run_test` with espeak-ng speech. The tiny model's replies are noise, but
every frame, timing, cancellation and history operation is the real one."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

pytest.importorskip("pipecat")
from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    LLMServiceMetadataFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData, ProcessingMetricsData, TTFBMetricsData  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from pipecat_chroma import ChromaSpeechToSpeechService  # noqa: E402

from chroma_agent import AudioChunk, ResponseDone  # noqa: E402

REPLY_FRAMES = (LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame, LLMTextFrame, TTSTextFrame,
                TTSStoppedFrame, LLMFullResponseEndFrame)
METRICS = PipelineParams(enable_metrics=True, enable_usage_metrics=True)


# -- helpers --

def input_frames(samples: np.ndarray, rate: int = 16000, ms: int = 20) -> list[InputAudioRawFrame]:
    """int16 mono samples as the 20 ms InputAudioRawFrames a transport delivers."""
    step = rate * ms // 1000
    pcm = samples.astype(np.int16)
    return [InputAudioRawFrame(pcm[i:i + step].tobytes(), rate, 1) for i in range(0, len(pcm), step)]


@pytest.fixture(scope="module")
def question(speech) -> np.ndarray:
    """The spoken question at 16 kHz, int16."""
    data, rate = sf.read(speech["question"], dtype="float32")
    return (soxr.resample(data, rate, 16000) * 32767).astype(np.int16)


def turn(question: np.ndarray) -> list:
    return [UserStartedSpeakingFrame(), *input_frames(question), UserStoppedSpeakingFrame()]


def wait_until(condition, timeout: float = 60.0):
    """SleepFrames until `condition()` holds: `run_test` sends frames lazily, so a test can
    wait for the service (e.g. for its first audio) before sending the next frame."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        yield SleepFrame(0.01)


def kinds(frames, only=REPLY_FRAMES) -> list[type]:
    return [type(f) for f in frames if isinstance(f, only)]


class Player(FrameProcessor):
    """Stands in for the output transport: records when each frame arrives and, like the
    transport, pushes a BotStartedSpeakingFrame upstream when a reply's audio starts."""

    def __init__(self):
        super().__init__()
        self.arrivals: list[tuple[float, object]] = []
        self.speaking_since: float | None = None

    def times(self, kind) -> list[float]:
        return [t for t, f in self.arrivals if isinstance(f, kind)]

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.arrivals.append((time.monotonic(), frame))
            if isinstance(frame, TTSAudioRawFrame) and self.speaking_since is None:
                self.speaking_since = time.monotonic()
                await self.push_frame(BotStartedSpeakingFrame(), FrameDirection.UPSTREAM)
        await self.push_frame(frame, direction)


class SpyModel:
    """The real model, with every conversation wrapped in a `SpyConversation`."""

    def __init__(self, model, fail_first_reply: bool = False):
        self.model = model
        self.fail_first_reply = fail_first_reply
        self.conversations: list[SpyConversation] = []

    def conversation(self, **kwargs):
        spy = SpyConversation(self.model.conversation(**kwargs), kwargs.get("system_prompt"), self)
        spy.made_at, spy.made_on = time.monotonic(), threading.get_ident()
        self.conversations.append(spy)
        return spy


class SpyConversation:
    """Records the calls the service makes and the events it gets."""

    def __init__(self, real, system_prompt, model: SpyModel):
        self.real, self.system_prompt, self.model = real, system_prompt, model
        self.calls: list[tuple] = []
        self.events: list = []
        self.truncated: list[dict] = []
        self.event_times: list[float] = []
        self.closed = False

    async def _recorded(self, response):
        async for event in response:
            self.events.append(event)
            self.event_times.append(time.monotonic())   # when the conversation produced it
            yield event

    def respond(self, **kwargs):
        self.calls.append(("respond", kwargs))
        self.respond_on = threading.get_ident()
        if self.model.fail_first_reply:
            self.model.fail_first_reply = False
            raise RuntimeError("the model fell over")
        return self._recorded(self.real.respond(**kwargs))

    def say(self, text, **kwargs):
        self.calls.append(("say", text, kwargs))
        return self._recorded(self.real.say(text, **kwargs))

    def cancel(self):
        self.calls.append(("cancel",))
        self.real.cancel()

    def truncate(self, played_ms):
        before = self.real.history_tokens
        self.real.truncate(played_ms)
        self.truncated.append({"played_ms": played_ms, "at": time.monotonic(), "tokens_before": before,
                               "tokens_after": self.real.history_tokens})

    @property
    def history_tokens(self):
        return self.real.history_tokens

    def close(self):
        self.closed = True


@pytest.fixture
def logs():
    """(level, message) of the INFO and higher log lines while the test runs."""
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    yield lines
    logger.remove(sink)


def service(model, voice, **settings) -> ChromaSpeechToSpeechService:
    settings.setdefault("max_frames", 16)
    settings.setdefault("seed", 0)
    return ChromaSpeechToSpeechService(model=model, voice=voice,
                                       settings=ChromaSpeechToSpeechService.Settings(**settings))


# -- tests --

@pytest.mark.timeout(120)
async def test_reply_frames_stream_in_order(model, voice, question, logs):
    spy, player = SpyModel(model), Player()
    down, up = await run_test(Pipeline([service(spy, voice), player]), frames_to_send=turn(question),
                              pipeline_params=METRICS)

    assert isinstance(down[0], LLMServiceMetadataFrame) and down[0].is_realtime_service
    assert any(isinstance(f, LLMServiceMetadataFrame) for f in up)
    reply = kinds(down)
    assert reply[:3] == [LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame]
    assert reply[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    assert set(reply[2:-2]) <= {TTSAudioRawFrame, LLMTextFrame, TTSTextFrame}
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert 1 <= len(audio) <= 16
    assert all(f.sample_rate == 24000 and f.num_channels == 1 and len(f.audio) == 1920 * 2 for f in audio)
    assert any(np.frombuffer(f.audio, np.int16).any() for f in audio)
    texts = [f for f in down if isinstance(f, TTSTextFrame)]
    assert all(f.includes_inter_frame_spaces and f.append_to_context for f in texts)

    # streamed: each frame is pushed as it is decoded, not the reply at once at its end: the
    # first frame is heard before the conversation has produced the last one (whatever the
    # machine's speed; a fixed time span failed on a quiet CPU that made 16 frames in 0.247 s)
    conversation = spy.conversations[0]
    produced = [t for t, e in zip(conversation.event_times, conversation.events) if isinstance(e, AudioChunk)]
    assert len(audio) >= 8 and len(produced) == len(audio)
    assert player.times(TTSAudioRawFrame)[0] < produced[-1]
    assert all(heard >= made for heard, made in zip(player.times(TTSAudioRawFrame), produced))

    metrics = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    assert any(isinstance(d, TTFBMetricsData) and d.value > 0 for d in metrics)
    assert any(isinstance(d, ProcessingMetricsData) and d.value > 0 for d in metrics)
    usage = [d.value for d in metrics if isinstance(d, LLMUsageMetricsData)]
    assert usage and usage[0].total_tokens > usage[0].completion_tokens > 0
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    errors = [m for level, m in logs if level == "ERROR"]
    assert not errors, errors  # every settings field is filled (pipecat logs NOT_GIVEN ones as errors)


@pytest.mark.timeout(120)
async def test_interruption_stops_audio_and_truncates_history(model, voice, question):
    spy, player = SpyModel(model), Player()
    interrupted_at = []

    def interrupt():
        interrupted_at.append(time.monotonic())
        return InterruptionFrame()

    # frames go out lazily: interrupt once the caller has heard a few frames
    frames = itertools.chain(turn(question), wait_until(lambda: len(player.times(TTSAudioRawFrame)) >= 6),
                             (interrupt() for _ in range(1)), [SleepFrame(0.3)])
    down, up = await run_test(Pipeline([service(spy, voice, max_frames=300), player]), frames_to_send=frames)

    conv = spy.conversations[0]
    assert ("cancel",) in conv.calls
    assert conv.events[-1].stop_reason == "cancelled"
    # the InterruptionFrame goes on at once (the transport drops queued audio), the reply's
    # closing frames follow; audio stops within a frame: at most the one in flight
    reply = kinds(down, REPLY_FRAMES + (InterruptionFrame,))
    assert reply[-3:] == [InterruptionFrame, TTSStoppedFrame, LLMFullResponseEndFrame]
    assert reply[:-3].count(InterruptionFrame) == 0
    assert len([t for t in player.times(TTSAudioRawFrame) if t > interrupted_at[0]]) <= 1
    pushed_ms = 80 * len(player.times(TTSAudioRawFrame))
    assert pushed_ms < 300 * 80

    # history = what was heard: min(time since playback started, audio pushed)
    [cut] = conv.truncated
    heard_ms = (cut["at"] - player.speaking_since) * 1000
    assert 0 < cut["played_ms"] <= pushed_ms
    assert cut["played_ms"] <= heard_ms + 1
    assert cut["played_ms"] >= min((interrupted_at[0] - player.speaking_since) * 1000, pushed_ms - 80) - 1
    assert cut["tokens_after"] <= cut["tokens_before"]
    assert not [f for f in up if isinstance(f, ErrorFrame)]


@pytest.mark.timeout(60)
async def test_short_turns_are_ignored(model, voice, question):
    spy = SpyModel(model)
    # half a second of speech before the turn (the pre-roll), then a 0.1 s turn
    frames = [*input_frames(question[:8000]), UserStartedSpeakingFrame(), *input_frames(question[8000:9600]),
              UserStoppedSpeakingFrame()]
    down, up = await run_test(service(spy, voice), frames_to_send=frames)
    assert kinds(down) == []
    assert not any(c.calls for c in spy.conversations)
    assert not [f for f in up if isinstance(f, ErrorFrame)]


@pytest.mark.timeout(120)
async def test_tts_speak_frame_is_spoken_in_the_voice(model, voice, tmp_path):
    spy = SpyModel(model)
    voice.save(tmp_path / "voice.safetensors")   # a voice file path works too
    down, up = await run_test(service(spy, str(tmp_path / "voice.safetensors"), max_frames=40),
                              frames_to_send=[TTSSpeakFrame("Thanks for calling!")])
    assert not any(isinstance(f, TTSSpeakFrame) for f in down)   # consumed, not passed on
    assert spy.conversations[0].calls[0][:2] == ("say", "Thanks for calling!")
    reply = kinds(down)
    assert reply[:3] == [LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame]
    assert reply[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    done = spy.conversations[0].events[-1]
    assert isinstance(done, ResponseDone) and done.stop_reason != "cancelled"
    spoken = "".join(f.text for f in down if isinstance(f, TTSTextFrame))
    assert spoken == done.text and "Thanks for calling!".startswith(spoken) and spoken


class OutOfMemoryModel:
    """A model that cannot make a conversation (a GPU out of memory on a new call)."""

    def __init__(self):
        self.attempts = 0

    def conversation(self, **kwargs):
        self.attempts += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.timeout(60)
async def test_no_conversation_makes_the_service_unusable_and_a_cancel_policy_ends_the_call(voice):
    # what the servers run: a call whose conversation cannot be made is refused (cancelled
    # at once, its slot freed), instead of staying connected and mute
    broken = OutOfMemoryModel()
    worker = PipelineWorker(Pipeline([service(broken, voice)]), enable_rtvi=False,
                            processor_unusable_policy=ProcessorUnusablePolicy.CANCEL)
    errors = []

    @worker.event_handler("on_pipeline_error")
    async def on_error(worker, frame):
        errors.append(frame)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 20)   # ends by itself (cancelled): the conversation is made at start
    assert worker.has_finished()
    assert errors and "out of memory" in errors[0].error and not errors[0].processor.is_usable
    assert broken.attempts >= 1


@pytest.mark.timeout(120)
async def test_failed_reply_reports_an_error_and_the_next_turn_works(model, voice, question):
    spy = SpyModel(model, fail_first_reply=True)
    down, up = await run_test(service(spy, voice, max_frames=4),
                              frames_to_send=[*turn(question), SleepFrame(0.2), *turn(question)])
    [error] = [f for f in up if isinstance(f, ErrorFrame)]
    assert "the model fell over" in error.error and not error.fatal
    assert error.processor.is_usable
    reply = kinds(down)
    # the failed reply is closed at once, the second one speaks
    assert reply[:2] == [LLMFullResponseStartFrame, LLMFullResponseEndFrame]
    assert reply[2:5] == [LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame]
    assert reply[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]


@pytest.mark.timeout(120)
async def test_event_loop_stays_responsive_during_a_reply(model, voice, question):
    gaps: list[float] = []
    replying = asyncio.Event()

    async def heartbeat():
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            if replying.is_set():
                gaps.append(now - last)
            last = now

    class Watch(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMFullResponseStartFrame):
                replying.set()
            elif isinstance(frame, LLMFullResponseEndFrame):
                replying.clear()
            await self.push_frame(frame, direction)

    spy = SpyModel(model)
    beat = asyncio.create_task(heartbeat())
    try:
        down, _ = await run_test(Pipeline([service(spy, voice), Watch()]), frames_to_send=turn(question))
    finally:
        beat.cancel()
    assert TTSAudioRawFrame in kinds(down) and len(gaps) > 20
    # reading the turn, the prefill and every frame run in worker threads; on the loop, the
    # prefill alone (most of the time to first audio) would stall it
    first_audio = spy.conversations[0].events[-1].stats.time_to_first_audio_s
    print(f"event loop: max gap {max(gaps) * 1000:.0f} ms over {len(gaps)} beats; first audio {first_audio:.3f} s")
    assert max(gaps) < max(0.1, first_audio / 2), f"the event loop stalled for {max(gaps) * 1000:.0f} ms"


@pytest.mark.timeout(120)
async def test_one_model_serves_concurrent_pipelines(model, voice, question):
    spies = [SpyModel(model), SpyModel(model)]
    results = await asyncio.gather(*(run_test(service(spy, voice, max_frames=8), frames_to_send=turn(question))
                                     for spy in spies))
    for (down, up), spy in zip(results, spies):
        assert kinds(down).count(TTSAudioRawFrame) >= 1 and not [f for f in up if isinstance(f, ErrorFrame)]
        assert spy.conversations[0].events[-1].stop_reason in ("eos", "max_frames")


@pytest.mark.timeout(120)
async def test_a_turn_past_the_model_limit_keeps_its_last_part(model, voice, question, logs):
    spy = SpyModel(model)
    long = np.tile(question, int(31 * 16000 / len(question)) + 1)   # over 31 s
    await run_test(service(spy, voice, max_frames=2), frames_to_send=turn(long))
    audio = spy.conversations[0].calls[0][1]["audio"]
    assert 29.9 <= len(audio) / 16000 <= 30.0
    assert np.array_equal(audio[-16000:, 0], long[-16000:])
    assert [m for _, m in logs if "longer than the 30 s" in m]


@pytest.mark.timeout(120)
async def test_system_prompt_from_settings_and_context(model, voice):
    spy = SpyModel(model)
    context = LLMContext([{"role": "system", "content": "Answer in one sentence."}])
    frames = [LLMContextFrame(context), TTSSpeakFrame("Hello."),
              LLMMessagesAppendFrame([{"role": "system", "content": "Speak slowly."}]), TTSSpeakFrame("Hi again.")]
    down, _ = await run_test(service(spy, voice, max_frames=3, system_instruction="You are Ada."),
                             frames_to_send=frames)
    # made at the start with the settings' prompt; the conversation API takes the prompt at
    # creation, so a changed prompt starts a new one
    at_start, first, second = spy.conversations
    assert at_start.system_prompt == "You are Ada." and not at_start.calls
    assert first.system_prompt == "You are Ada.\n\nAnswer in one sentence."
    assert second.system_prompt == "You are Ada.\n\nAnswer in one sentence.\n\nSpeak slowly."
    assert at_start.closed and first.closed and second.closed   # replaced, then closed at the end
    assert [c[:2] for c in first.calls + second.calls] == [("say", "Hello."), ("say", "Hi again.")]
    assert kinds(down).count(LLMFullResponseStartFrame) == 2


@pytest.mark.timeout(180)
async def test_turns_from_the_user_aggregator_with_silero_and_smart_turn(model, voice, question):
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    context = LLMContext()
    pair = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=0.2)),
        user_turn_strategies=UserTurnStrategies(
            stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=LocalSmartTurnAnalyzerV3())])))
    spy, player = SpyModel(model), Player()
    pipeline = Pipeline([pair.user(), service(spy, voice, max_frames=8), player, pair.assistant()])

    # the caller: silence, the question, silence; 20 ms frames at 16 kHz, paced in real time
    silence = np.zeros(16000, np.int16)
    audio = input_frames(np.concatenate([silence // 2, question, silence, silence]))
    replied = lambda: any(isinstance(e, ResponseDone) for c in spy.conversations for e in c.events)  # noqa: E731
    frames = itertools.chain(*((f, SleepFrame(0.02)) for f in audio), wait_until(replied))
    down, up = await run_test(pipeline, frames_to_send=frames)

    assert [c[0] for c in spy.conversations[0].calls] == ["respond"]   # one turn, one reply
    turn_audio = spy.conversations[0].calls[0][1]["audio"]
    assert len(question) / 16000 - 0.5 < len(turn_audio) / 16000 < len(audio) * 0.02   # the whole question
    reply = kinds(f for _, f in player.arrivals)   # the assistant aggregator consumes some
    assert reply[:3] == [LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame]
    assert reply[-2:] == [TTSStoppedFrame, LLMFullResponseEndFrame]
    # realtime mode: the assistant aggregator writes the reply's transcript into the context
    spoken = "".join(f.text for f in down if isinstance(f, TTSTextFrame))
    if spoken.strip():
        assert {"role": "assistant", "content": spoken.strip()} in context.get_messages()
    assert not [f for f in up if isinstance(f, ErrorFrame)]


def audio_frames(frames) -> list[TTSAudioRawFrame]:
    return [f for f in frames if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.timeout(120)
async def test_the_conversation_is_made_at_start_off_the_event_loop(model, voice, question):
    spy, player = SpyModel(model), Player()
    ready = lambda: spy.conversations  # noqa: E731
    stopped_at = []
    frames = itertools.chain(wait_until(ready, 10), [SleepFrame(0.1), UserStartedSpeakingFrame(),
                                                     *input_frames(question)],
                             (stopped_at.append(time.monotonic()) or UserStoppedSpeakingFrame() for _ in range(1)))
    down, _ = await run_test(Pipeline([service(spy, voice, max_frames=4), player]), frames_to_send=frames)
    [conv] = spy.conversations   # the first turn found it made
    loop_thread = threading.get_ident()
    assert conv.made_at < stopped_at[0] and conv.made_on != loop_thread
    assert conv.respond_on != loop_thread   # the turn's recording is joined and read in a thread too
    assert conv.calls[0][0] == "respond" and TTSAudioRawFrame in kinds(down)
    assert conv.closed   # at the EndFrame


def reply_audio(player: Player, n: int) -> list[TTSAudioRawFrame]:
    """The audio of the player's `n`th reply (0: the first), as far as it has arrived."""
    replies, current = [], None
    for _, f in player.arrivals:
        if isinstance(f, LLMFullResponseStartFrame):
            current = []
            replies.append(current)
        elif isinstance(f, TTSAudioRawFrame) and current is not None:
            current.append(f)
    return replies[n] if n < len(replies) else []


@pytest.mark.timeout(120)
async def test_an_uninterruptible_tts_speak_frame_survives_barge_in(model, voice):
    spy, player = SpyModel(model), Player()
    ended = lambda n: lambda: len(player.times(LLMFullResponseEndFrame)) >= n  # noqa: E731
    line = TTSSpeakFrame("Please hold while I look that up for you.")
    line.interruptible = False   # pipecat 1.14: a Frame field, set after construction
    frames = itertools.chain(
        [line], wait_until(lambda: len(reply_audio(player, 0)) >= 3), [InterruptionFrame()],
        wait_until(ended(1)), [SleepFrame(0.1)],
        # an interruptible line is cut by the next barge-in
        [TTSSpeakFrame("Thanks for calling, goodbye and have a good day.")],
        wait_until(lambda: len(reply_audio(player, 1)) >= 3), [InterruptionFrame()], wait_until(ended(2)))
    down, up = await run_test(Pipeline([service(spy, voice, max_frames=12), player]), frames_to_send=frames)

    conv = spy.conversations[0]
    first, second = [e for e in conv.events if isinstance(e, ResponseDone)]
    assert [c[0] for c in conv.calls] == ["say", "say", "cancel"]   # only the second line was cancelled
    assert first.stop_reason in ("eos", "max_frames") and second.stop_reason == "cancelled"
    # the whole first line went on past the interruption, its frames uninterruptible, and
    # the history kept it whole (the one truncation is the second line's)
    heard = [f for f in audio_frames(down) if f in reply_audio(player, 0)]
    assert len(heard) == first.stats.frames >= 4 and all(not f.interruptible for f in heard)
    assert len(conv.truncated) == 1
    assert len(reply_audio(player, 1)) < 12 and all(f.interruptible for f in reply_audio(player, 1))
    assert not [f for f in up if isinstance(f, ErrorFrame)]


@pytest.mark.timeout(120)
async def test_a_greeting_and_a_caller_who_is_already_talking(model, voice, question):
    spy = SpyModel(model)
    notice = TTSSpeakFrame("This call is recorded.")
    notice.interruptible = False
    # the greetings arrive while the caller speaks: the interruptible one is dropped (the
    # caller's turn interrupted it before it began), the uninterruptible one is spoken, and
    # the caller's turn is answered after it
    frames = [UserStartedSpeakingFrame(), *input_frames(question[:8000]), TTSSpeakFrame("Hello, welcome!"),
              notice, SleepFrame(0.2), *input_frames(question[8000:]), UserStoppedSpeakingFrame()]
    down, up = await run_test(service(spy, voice, max_frames=4), frames_to_send=frames)
    conv = spy.conversations[0]
    assert [c[:2] for c in conv.calls] == [("say", "This call is recorded."), ("respond", conv.calls[-1][1])]
    dones = [e for e in conv.events if isinstance(e, ResponseDone)]
    assert len(dones) == 2 and all(d.stop_reason != "cancelled" for d in dones)
    assert kinds(down).count(LLMFullResponseStartFrame) == 2

    # a greeting already playing when the caller starts is cut at once, as any reply
    spy, player = SpyModel(model), Player()
    frames = itertools.chain([TTSSpeakFrame("Hello, welcome to the store, how can I help you today?")],
                             wait_until(lambda: len(player.times(TTSAudioRawFrame)) >= 2),
                             [UserStartedSpeakingFrame(), InterruptionFrame(), *turn(question)[1:]])
    down, up = await run_test(Pipeline([service(spy, voice, max_frames=12), player]), frames_to_send=frames)
    conv = spy.conversations[0]
    assert [c[0] for c in conv.calls] == ["say", "cancel", "respond"]
    assert len(conv.truncated) == 1 and conv.truncated[0]["played_ms"] < 12 * 80
    assert not [f for f in up if isinstance(f, ErrorFrame)]


@pytest.mark.timeout(120)
async def test_llm_run_frame_answers_the_contexts_new_user_text(model, voice):
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair

    # without an aggregator: messages appended, then LLMRunFrame; a second run has nothing new
    spy = SpyModel(model)
    frames = [LLMMessagesAppendFrame([{"role": "user", "content": "What are your opening hours?"}]), LLMRunFrame(),
              SleepFrame(0.3), LLMRunFrame()]
    down, _ = await run_test(service(spy, voice, max_frames=3), frames_to_send=frames)
    [conv] = spy.conversations
    assert [(c[0], c[1].get("text")) for c in conv.calls] == [("respond", "What are your opening hours?")]
    assert kinds(down).count(TTSAudioRawFrame) >= 1 and any(isinstance(f, LLMRunFrame) for f in down)

    # pipecat's way: the user aggregator turns LLMRunFrame (and messages appended with
    # run_llm) into the context frame that runs the service
    spy = SpyModel(model)
    context = LLMContext([{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "Say hi."}])
    pair = LLMContextAggregatorPair(context)
    frames = [LLMRunFrame(), SleepFrame(0.5),
              LLMMessagesAppendFrame([{"role": "user", "content": "Now say goodbye."}], run_llm=True), SleepFrame(0.5)]
    down, up = await run_test(Pipeline([pair.user(), service(spy, voice, max_frames=3), pair.assistant()]),
                              frames_to_send=frames)
    texts = [c[1].get("text") for conv in spy.conversations for c in conv.calls]
    assert texts == ["Say hi.", "Now say goodbye."]
    assert spy.conversations[-1].system_prompt == "You are Ada."
    assert not [f for f in up if isinstance(f, ErrorFrame)]


@pytest.mark.timeout(120)
async def test_the_service_runs_on_a_chroma_engine(model, voice, question):
    from pipecat.frames.frames import CancelFrame

    from chroma_agent.runtime.engine import ChromaEngine

    with ChromaEngine(model, max_conversations=2) as engine:
        players, seen_active = [Player(), Player()], []

        def caller(i):
            yield from wait_until(lambda: engine.active == 2, 10)   # both pipelines hold a slot from their start
            seen_active.append(engine.active)
            yield from turn(question)
            yield from wait_until(lambda: players[i].times(LLMFullResponseEndFrame))

        results = await asyncio.gather(*(
            run_test(Pipeline([service(engine, voice, max_frames=4), players[i]]), frames_to_send=caller(i))
            for i in range(2)))
        for down, up in results:
            assert kinds(down)[:3] == [LLMFullResponseStartFrame, TTSStartedFrame, TTSAudioRawFrame]
            assert not [f for f in up if isinstance(f, ErrorFrame)]
        assert seen_active == [2, 2]
        assert engine.active == 0   # each pipeline's EndFrame closed its conversation

        # a cancelled pipeline frees its slot too, its reply stopped
        player = Player()
        await run_test(Pipeline([service(engine, voice, max_frames=300), player]), send_end_frame=False,
                       frames_to_send=itertools.chain(
                           turn(question), wait_until(lambda: player.times(TTSAudioRawFrame)), [CancelFrame()]))
        assert engine.active == 0


@pytest.mark.timeout(60)
async def test_a_pipeline_that_ends_while_its_conversation_is_made_closes_it(model, voice):
    class SlowModel(SpyModel):
        def conversation(self, **kwargs):
            time.sleep(0.5)   # in the worker thread; the pipeline ends meanwhile
            return super().conversation(**kwargs)

    spy = SlowModel(model)
    down, up = await run_test(service(spy, voice), frames_to_send=[])
    for _ in wait_until(lambda: spy.conversations and spy.conversations[0].closed, 5):
        await asyncio.sleep(0.01)
    assert spy.conversations[0].closed   # made after the end: closed at once (an engine slot freed)
    assert not [f for f in up if isinstance(f, ErrorFrame)]   # and no error for it


LONG = "please tell me everything about the opening hours of the store " * 320  # ~8.6k tokens


@pytest.mark.timeout(120)
async def test_a_prompt_too_long_for_the_model_is_a_non_fatal_error_and_the_next_turn_works(model, voice):
    spy = SpyModel(model)
    frames = [LLMMessagesAppendFrame([{"role": "user", "content": LONG}], run_llm=True), SleepFrame(0.3),
              LLMMessagesAppendFrame([{"role": "system", "content": LONG}]),
              LLMMessagesAppendFrame([{"role": "user", "content": "Say hi."}], run_llm=True), SleepFrame(0.5)]
    down, up = await run_test(service(spy, voice, max_frames=3, system_instruction="You are Ada."),
                              frames_to_send=frames)
    turn_error, prompt_error = [f for f in up if isinstance(f, ErrorFrame)]
    assert "reply refused: the turn is" in turn_error.error and "max_history_tokens=8192" in turn_error.error
    assert "system prompt was refused" in prompt_error.error and "over its limit of 4096" in prompt_error.error
    assert not turn_error.fatal and not prompt_error.fatal and prompt_error.processor.is_usable
    # the refused prompt never made a conversation; the next turn speaks under the one that fit
    assert [c.system_prompt for c in spy.conversations] == ["You are Ada.", "You are Ada."]
    assert [(c[0], c[1]["text"]) for c in spy.conversations[-1].calls] == [("respond", "Say hi.")]
    assert kinds(down).count(LLMFullResponseStartFrame) == 2 and kinds(down).count(TTSAudioRawFrame) >= 1


@pytest.mark.timeout(60)
async def test_a_system_prompt_too_long_at_start_is_a_clear_error(model, voice):
    _, up = await run_test(service(model, voice, system_instruction=LONG), frames_to_send=[SleepFrame(0.5)])
    [error] = [f for f in up if isinstance(f, ErrorFrame)]
    assert "could not start a conversation: the system prompt is" in error.error
    assert "over its limit of 4096" in error.error and not error.processor.is_usable
