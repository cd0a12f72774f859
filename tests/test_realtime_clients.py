"""The two unmodified OpenAI Realtime clients against the real `chroma-agent serve realtime`
process on the tiny checkpoint, over loopback, with espeak-ng speech: livekit-plugins-openai's
`RealtimeModel` in an offline AgentSession, and pipecat's `OpenAIRealtimeLLMService` in a
pipeline. Only `base_url` (and a key) changes. The tiny model's replies are noise, but every
event the clients need, in the order they need it, is the real one: a missing or malformed
one makes these clients hang, drop audio or die (see the module's notes)."""
from __future__ import annotations

import asyncio
import itertools
import signal
import time

import numpy as np
import pytest
import soundfile as sf
import soxr

pytest.importorskip("livekit.plugins.openai")
pytest.importorskip("pipecat")

from livekit.agents import AgentSession  # noqa: E402
from livekit.plugins import openai as lk_openai  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.services.openai.realtime import events as pc_events  # noqa: E402
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from tests.realtime_helpers import Client, ServerProcess, get  # noqa: E402
from tests.test_livekit_plugin import Mic, Speaker, Transcript, audio_of  # noqa: E402
from tests.test_pipecat_service import Player, input_frames, wait_until  # noqa: E402

from livekit.agents import Agent  # noqa: E402

KEY = "test-key-for-clients"
MAX_FRAMES = 40   # 3.2 s replies: long enough to talk over, short on a slow CPU
pytestmark = pytest.mark.timeout(150, func_only=True)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voice, tmp_path_factory):
    d = tmp_path_factory.mktemp("rt_clients")
    voice_path = voice.save(d / "tiny.voice.safetensors")
    proc = ServerProcess(tiny_checkpoint, voice_path, d / "server.log", "--max-frames", str(MAX_FRAMES),
                         "--max-calls", "2", "--drain-seconds", "3",
                         # pipecat's run_test pushes a file's frames at once, not at a microphone's pace
                         env={"CHROMA_AGENT_API_KEY": KEY, "CHROMA_AGENT_REALTIME_MAX_AUDIO_AHEAD_S": "0"})
    proc.wait_ready()
    yield proc
    proc.stop()
    assert KEY not in proc.log.read_text(), "the key must never be logged"


@pytest.fixture(scope="module")
def question16(speech) -> np.ndarray:
    data, rate = sf.read(speech["question"], dtype="float32")
    return (soxr.resample(data, rate, 16000) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def question24(speech) -> np.ndarray:
    data, rate = sf.read(speech["question"], dtype="float32")
    return (soxr.resample(data, rate, 24000) * 32767).astype(np.int16)


async def _sessions_back_to_zero(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while get(server.base, "/health")[1]["active_calls"]:
        assert time.monotonic() < deadline, "a closed client's session was not freed"
        await asyncio.sleep(0.1)


# -- livekit-plugins-openai --

async def test_livekit_realtime_model_greets_answers_is_interrupted_and_takes_a_typed_turn(server, question24):
    # the plugin asks for input transcription by default: the caller's words come as user_input_transcribed
    model = lk_openai.realtime.RealtimeModel(base_url=f"{server.base}/v1", api_key=KEY, model="chroma",
                                             voice="tiny")
    session = AgentSession(llm=model, aec_warmup_duration=None, turn_handling={"turn_detection": "vad"})
    mic, speaker = Mic(), Speaker()
    session.input.audio, session.output.audio = mic, speaker
    session.output.transcription = Transcript()
    errors, heard = [], []
    session.on("error", errors.append)
    session.on("user_input_transcribed", heard.append)
    await session.start(Agent(instructions="You answer for a bakery."))
    try:
        async def played(n: int, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            while len(speaker.finished) < n:
                assert time.monotonic() < deadline, f"only {len(speaker.finished)} of {n} replies played"
                await asyncio.sleep(0.05)

        # greeting: generate_reply resolves only if response.created echoes its metadata
        await asyncio.wait_for(session.generate_reply(instructions="Greet the caller."), 20)
        await played(1)
        greeting = audio_of(speaker.frames)
        assert greeting.size > 0 and np.abs(greeting).max() > 0
        assert speaker.finished[0][1] is False

        # a spoken turn: the client's VAD commits it and asks for the reply
        before = len(speaker.frames)
        mic.speak(question24)
        await played(2)
        assert len(speaker.frames) > before and speaker.finished[1][1] is False

        # barge-in: the caller talks over the next reply; LiveKit's VAD interrupts it (response.cancel
        # twice, conversation.item.truncate); response.done cancelled closes its streams
        before = len(speaker.frames)
        session.generate_reply(instructions="Tell me about your bread.")  # not awaited: that is its playout
        while len(speaker.frames) <= before + 1:
            await asyncio.sleep(0.02)
        mic.speak(question24)
        await played(3)
        position, interrupted = speaker.finished[2]
        assert interrupted and 0 < position < MAX_FRAMES * 0.08 - 0.5
        await played(4)  # the barge-in is a turn of its own, answered

        # a typed turn: conversation.item.create -> conversation.item.added -> response.create
        await asyncio.wait_for(session.run(user_input="What do you sell?"), 60)
        await played(5)
        assistant = [m for m in session.history.messages() if m.role == "assistant"]
        assert [m.interrupted for m in assistant] == [False, False, True, False, False]
        # the two spoken turns' words: interim text grows to each item's final transcript, kept in the history
        deadline = time.monotonic() + 30
        while len([e for e in heard if e.is_final]) < 2:
            assert time.monotonic() < deadline, f"{len(heard)} user_input_transcribed events, not 2 final ones"
            await asyncio.sleep(0.05)
        finals = {e.item_id: e.transcript for e in heard if e.is_final}
        assert len(finals) == 2 and None not in finals and all(isinstance(t, str) for t in finals.values())
        assert all(finals[e.item_id].startswith(e.transcript) for e in heard if e.item_id in finals)
        users = {m.id: m.text_content for m in session.history.messages() if m.role == "user"}
        assert all(users.get(item_id) == text for item_id, text in finals.items() if text), (users, finals)
        assert not errors, errors
    finally:
        await session.aclose()
        await model.aclose()
    await _sessions_back_to_zero(server)


# -- pipecat --

def pipecat_service(server, manual: bool = False, transcribe: bool = False) -> OpenAIRealtimeLLMService:
    words = pc_events.InputAudioTranscription(language="en") if transcribe else None
    properties = pc_events.SessionProperties(audio=pc_events.AudioConfiguration(input=pc_events.AudioInput(
        turn_detection=False if manual else None, transcription=words))) if manual or transcribe else None
    settings = OpenAIRealtimeLLMService.Settings(session_properties=properties) if properties else None
    return OpenAIRealtimeLLMService(api_key=KEY, base_url=server.url, model="chroma", settings=settings)


class Barge:
    """Marks when the caller barges in, and counts the reply audio before and after."""

    def __init__(self, player: Player):
        self.player, self.at = player, None

    def now(self):
        self.at = time.monotonic()
        return SleepFrame(0.0)

    def audio(self, after: bool) -> int:
        times = self.player.times(TTSAudioRawFrame)
        return len([t for t in times if (t > self.at + 0.2) == after]) if self.at else (0 if after else len(times))


async def test_pipecat_spoken_turn_with_server_vad_and_an_interruption(server, question16):
    player = Player()
    barge = Barge(player)
    silence = np.zeros(16000, np.int16)
    speech = np.concatenate([silence[:4000], question16, silence])
    # a turn the server's VAD finds; then talking over the reply: the server cancels it itself
    frames = itertools.chain(wait_until(lambda: False, 1.0), input_frames(speech),
                             wait_until(lambda: barge.audio(after=False) >= 3),
                             (barge.now() for _ in range(1)), input_frames(speech),
                             wait_until(lambda: barge.audio(after=True) >= 8, 60), [SleepFrame(0.3)])
    down, up = await run_test(Pipeline([pipecat_service(server), player]), frames_to_send=frames)
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert all(f.sample_rate == 24000 for f in audio) and any(np.frombuffer(f.audio, np.int16).any() for f in audio)
    assert 3 <= barge.audio(after=False) < MAX_FRAMES  # the first reply was cut short (interrupt_response)
    assert barge.audio(after=True) >= 8               # and the barge-in was answered
    await _sessions_back_to_zero(server)


async def test_pipecat_with_its_own_turn_detection_and_an_interruption(server, question16):
    player = Player()
    barge = Barge(player)
    turn = [UserStartedSpeakingFrame(), *input_frames(question16), UserStoppedSpeakingFrame()]
    frames = itertools.chain(wait_until(lambda: False, 1.0), turn,
                             wait_until(lambda: barge.audio(after=False) >= 3),
                             (barge.now() for _ in range(1)), [InterruptionFrame()], turn,
                             wait_until(lambda: barge.audio(after=True) >= 8, 60), [SleepFrame(0.3)])
    down, up = await run_test(Pipeline([pipecat_service(server, manual=True), player]), frames_to_send=frames)
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert 3 <= barge.audio(after=False) < MAX_FRAMES  # commit + response.create; then cancel + truncate
    assert barge.audio(after=True) >= 8               # the next turn, committed by hand, answered
    await _sessions_back_to_zero(server)


async def test_pipecat_shows_the_callers_words_as_transcription_frames(server, question16):
    service, updated = pipecat_service(server, transcribe=True), []
    # a completed transcript updates its item with None (pipecat's own handler call)
    service.event_handler("on_conversation_item_updated")(lambda _service, item_id, item: updated.append(item))
    silence = np.zeros(16000, np.int16)
    frames = itertools.chain(wait_until(lambda: False, 1.0), input_frames(np.concatenate([silence[:4000], question16,
                                                                                          silence])),
                             wait_until(lambda: None in updated, 60), [SleepFrame(0.3)])
    down, up = await run_test(Pipeline([service, Player()]), frames_to_send=frames)
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    finals = [f for f in up if isinstance(f, TranscriptionFrame)]
    assert len(finals) == 1 and isinstance(finals[0].text, str)   # the server VAD's turn, transcribed once
    interim = "".join(f.text for f in up if isinstance(f, InterimTranscriptionFrame))
    assert interim == finals[0].text   # the deltas join to the transcript
    assert any(isinstance(f, TTSAudioRawFrame) for f in down)   # and the turn was answered
    await _sessions_back_to_zero(server)


# -- deploys (last: it ends the server) --

async def test_sigterm_drains_then_exits_0(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    c = await Client.connect(server.url, {"Authorization": f"Bearer {KEY}"})
    assert (await c.recv())["type"] == "session.created"
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while get(server.base, "/health") != (503, {**get(server.base, "/health")[1], "status": "draining"}):
        assert time.monotonic() < deadline, "/health never said draining"
        await asyncio.sleep(0.05)
    with pytest.raises(InvalidStatus) as refused:  # no new sessions
        await Client.connect(server.url, {"Authorization": f"Bearer {KEY}"})
    assert refused.value.response.status_code == 503
    await c.send("session.update", session={"type": "realtime", "instructions": "still served"})
    assert (await c.recv())["session"]["instructions"] == "still served"  # the running one goes on
    with pytest.raises(ConnectionClosed) as closed:  # ...until --drain-seconds (3) are up
        while True:
            await c.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert await asyncio.to_thread(server.proc.wait, 15) == 0
