"""The caller's words through livekit-plugins-chroma, offline: each answered audio turn's
transcript (made by the model beside its reply) fires AgentSession's `user_input_transcribed`
(interim, then final) and becomes the user message in `session.history`, under the item id
the realtime session reports; a failed transcript ends only that transcript; silence is an
empty transcript, not an error. The tiny model's words are garbage, so each transcript is
compared with a reference pass over the same audio.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents import llm  # noqa: E402

from chroma_agent.events import TranscriptDelta, TranscriptDone  # noqa: E402
from chroma_agent.model.audio import resample  # noqa: E402
from chroma_agent.runtime import transcription  # noqa: E402
from chroma_agent.runtime.transcription import transcribe  # noqa: E402
from chroma_agent.serving.voice_session import speech_of  # noqa: E402
from tests.test_livekit_plugin import FRAMES, MIC_RATE, Spy, audio_of, call, question, realtime  # noqa: E402,F401

pytestmark = pytest.mark.timeout(90)  # a stream left open fails the test instead of hanging CI

CAP = 12  # transcript tokens: the tiny model never ends a transcript on its own


@pytest.fixture(autouse=True)
def passes(monkeypatch) -> list:
    """The transcript passes made, in order; each stops at CAP tokens (448 otherwise: slow
    on a shared CPU)."""
    real, made = transcription.TranscriptPass.__init__, []

    def capped(self, *a, **kw):
        kw["max_tokens"] = CAP
        real(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(transcription.TranscriptPass, "__init__", capped)
    return made


def reference(model, audio_16k: np.ndarray, language: str = "English") -> TranscriptDone:
    """A pass alone over the audio the model was given."""
    clip = model.processor.load_user_audio(audio_16k, 16000)
    return list(transcribe(model, *model.processor.features(clip), language=language, max_tokens=CAP))[-1]


async def until(check, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return found


async def speak_and_commit(c, pcm: np.ndarray) -> None:
    heard_at = c.mic.speak(pcm)
    await asyncio.sleep(heard_at - time.monotonic() + 0.3)
    c.session.commit_user_turn()


def user_messages(c):
    return [m for m in c.session.history.messages() if m.role == "user"]


# -- through AgentSession --
async def test_spoken_turn_fires_user_input_transcribed_and_keeps_its_text_in_history(model, voice, question):
    spy = Spy(model)
    async with call(realtime(spy, voice)) as c:
        assert c.session.llm.capabilities.user_transcription
        heard = []
        c.session.on("user_input_transcribed", heard.append)
        await speak_and_commit(c, question)
        await c.played()
        [final] = await until(lambda: [e for e in heard if e.is_final], what="the final transcript")
        [user] = await until(lambda: user_messages(c), what="the user message")
        # the model was asked for it, in the plugin's language, and wrote what a pass alone writes
        [(_, _, kwargs)] = spy.calls
        assert kwargs["transcribe"] is True and kwargs["language"] == "en"
        expected = reference(model, kwargs["audio"])
        assert expected.text and expected.error is None  # something to compare
        assert final.transcript == expected.text
        interim = [e.transcript for e in heard if not e.is_final]
        assert interim and interim[-1] == expected.text  # the text so far, growing to the final one
        assert all(b.startswith(a) for a, b in zip(interim, interim[1:]))
        assert {e.item_id for e in heard} == {final.item_id}
        # the history keeps it under the reported id, before the reply it prompted
        assert user.id == final.item_id and user.text_content == expected.text
        reply = await c.assistant_message()
        items = [m.id for m in c.session.history.messages()]
        assert items.index(user.id) < items.index(reply.id)
        assert c.session.current_agent.chat_ctx.get_by_id(user.id) is not None
        assert not c.errors
        # a typed turn after it is answered as typed text, the transcribed one is not sent again
        await asyncio.wait_for(c.session.run(user_input="And on Sunday?"), 40)
        await c.played(2)
        assert spy.calls[1][2]["text"] == "And on Sunday?" and spy.calls[1][2]["audio"] is None
        assert [m.text_content for m in user_messages(c)] == [expected.text, "And on Sunday?"]


async def test_spoken_turn_on_an_engine_is_transcribed_the_same(model, voice, question):
    from chroma_agent.runtime.engine import ChromaEngine

    with ChromaEngine(model, max_conversations=2) as engine:
        async with call(realtime(engine, voice)) as c:
            heard = []
            c.session.on("user_input_transcribed", heard.append)
            await speak_and_commit(c, question)
            await c.played()
            [final] = await until(lambda: [e for e in heard if e.is_final], what="the final transcript")
            [user] = await until(lambda: user_messages(c), what="the user message")
            assert user.id == final.item_id and not c.errors
    # the engine's batched pass writes what a pass alone writes over the same (trimmed) audio
    trimmed = speech_of(resample(question.astype(np.float32) / 32767, MIC_RATE, 16000))
    assert final.transcript == user.text_content == reference(model, trimmed).text


@pytest.mark.parametrize("where", ["at its start", "midway"])
async def test_failed_transcript_ends_only_that_transcript(model, voice, question, monkeypatch, passes, where):
    class Broken:  # a reasoner whose every use fails (a device error, say)
        def __getattr__(self, name):
            raise RuntimeError("simulated transcript failure")

    if where == "at its start":  # the first pass's reasoner fails as it is prefilled
        make = transcription.Reasoner
        monkeypatch.setattr(transcription, "Reasoner",
                            lambda *a, **kw: make(*a, **kw) if len(passes) > 1 else Broken())
    else:  # the first pass fails after half its tokens
        step = transcription.TranscriptPass.step

        def failing_step(self):
            if self is passes[0] and self.tokens >= CAP // 2:
                self.reasoner = Broken()
            return step(self)

        monkeypatch.setattr(transcription.TranscriptPass, "step", failing_step)
    spy = Spy(model)
    async with call(realtime(spy, voice)) as c:
        heard = []
        c.session.on("user_input_transcribed", heard.append)
        await speak_and_commit(c, question)
        await c.played()
        assert audio_of(c.speaker.frames).size == FRAMES * 1920  # the reply is whole
        await c.assistant_message()
        await asyncio.sleep(0.2)
        assert not c.errors  # logged, not an error event: the call goes on
        streamed = passes[0].transcript.text
        assert passes[0].transcript.result.error == "simulated transcript failure"
        if where == "at its start":  # no words: no user message, no final event
            assert heard == [] and user_messages(c) == [] and streamed == ""
        else:  # what had streamed closes it, as LiveKit's OpenAI model does
            assert streamed
            [final] = [e for e in heard if e.is_final]
            assert final.transcript == streamed
            assert [m.text_content for m in user_messages(c)] == [streamed]
        # the next turn is transcribed whole
        heard.clear()
        await speak_and_commit(c, question)
        await c.played(2)
        [final] = await until(lambda: [e for e in heard if e.is_final], what="the next final transcript")
        assert final.transcript == reference(model, spy.calls[1][2]["audio"]).text
        assert user_messages(c)[-1].id == final.item_id and not c.errors


async def test_transcript_of_a_reply_that_raised_is_read_from_its_handle(model, voice, question, monkeypatch):
    from tests import test_livekit_plugin

    # the failing reply hides every event after its failure; its transcript handle is still there
    monkeypatch.setattr(test_livekit_plugin._Recorded, "transcript",
                        property(lambda self: self.response.transcript), raising=False)
    spy = Spy(model, fail_first="raise")
    async with call(realtime(spy, voice)) as c:
        heard = []
        c.session.on("user_input_transcribed", heard.append)
        await speak_and_commit(c, question)
        await c.played()
        [final] = await until(lambda: [e for e in heard if e.is_final], what="the final transcript")
        assert final.transcript == reference(model, spy.calls[0][2]["audio"]).text
        [user] = await until(lambda: user_messages(c), what="the user message")
        assert user.id == final.item_id and user.text_content == final.transcript
        [error] = c.errors  # the reply's failure, reported as before
        assert error.error.recoverable and test_livekit_plugin._Recorded.FAILURE in str(error.error.error)


class Hush:
    """The tiny model as `model=`, every spoken turn replaced by the same length of faint
    noise once the plugin has trimmed it (as a noise burst with no speech would reach the model)."""

    def __init__(self, model):
        self.model = model

    def conversation(self, voice, system_prompt=None):
        conv = self.model.conversation(voice=voice, system_prompt=system_prompt)
        respond = conv.respond

        def silenced(*args, audio=None, has_speech=None, **kwargs):  # the model looks for speech itself
            noise = None if audio is None else np.random.default_rng(0).normal(0, 0.003, audio.size)
            return respond(*args, audio=None if audio is None else noise.astype(np.float32), **kwargs)

        conv.respond = silenced
        return conv


async def test_silence_is_an_empty_transcript_not_an_error(model, voice, question):
    async with call(realtime(Hush(model), voice)) as c:
        heard = []
        c.session.on("user_input_transcribed", heard.append)
        await speak_and_commit(c, question)
        await c.played()
        [final] = await until(lambda: [e for e in heard if e.is_final], what="the final transcript")
        assert final.transcript == "" and [e for e in heard if not e.is_final] == []
        [user] = await until(lambda: user_messages(c), what="the user message")
        assert user.id == final.item_id and user.text_content == "" and not c.errors


# -- the realtime session alone, as AgentSession drives it --
@pytest.mark.parametrize("on", [True, False])
async def test_session_reports_the_transcript_on_the_user_item_of_its_chat_ctx(model, voice, question, on):
    spy = Spy(model)
    rt = realtime(spy, voice, user_transcription=on, language="fr").session()
    assert rt.realtime_model.capabilities.user_transcription is on
    events: list[llm.InputTranscriptionCompleted] = []
    rt.on("input_audio_transcription_completed", events.append)
    await rt.update_chat_ctx(llm.ChatContext.empty())  # as AgentSession starts it
    step = MIC_RATE // 100
    for i in range(0, question.size - step, step):
        rt.push_audio(rtc.AudioFrame(question[i:i + step].tobytes(), MIC_RATE, 1, step))
    committed = time.time()
    rt.commit_audio()
    generation = await asyncio.wait_for(rt.generate_reply(), 30)

    async def drain():
        async for message in generation.message_stream:
            [_ async for _ in message.audio_stream]
            return message.message_id
    reply_id = await asyncio.wait_for(drain(), 30)
    await asyncio.sleep(0.1)  # the stream's last events are handled after its channels close
    [(_, _, kwargs)] = spy.calls
    if not on:
        assert "transcribe" not in kwargs and events == []
        assert [m.role for m in rt.chat_ctx.messages()] == ["assistant"]
    else:
        assert kwargs["transcribe"] is True and kwargs["language"] == "fr"
        [final] = [e for e in events if e.is_final]
        assert final.transcript == reference(model, kwargs["audio"], "French").text
        assert final.turn_started_at == pytest.approx(committed, abs=0.5)  # placed before its reply
        user, reply = rt.chat_ctx.messages()
        assert (user.role, user.id, user.text_content) == ("user", final.item_id, final.transcript)
        assert reply.id == reply_id != final.item_id
        # the message back in a chat context (after a stale copy without it): not a typed turn to answer
        ctx = rt.chat_ctx
        await rt.update_chat_ctx(llm.ChatContext.empty())
        await rt.update_chat_ctx(ctx)
        with pytest.raises(llm.RealtimeError, match="no speech"):
            await asyncio.wait_for(rt.generate_reply(), 30)
    await rt.aclose()


# -- the events, one by one --
def test_user_turn_maps_transcript_events_to_livekit_events():
    from livekit.plugins.chroma.transcripts import UserTurn

    turn = UserTurn(committed_at=12.5)
    assert turn.event(TranscriptDelta("", 0)) is None
    first, second = turn.event(TranscriptDelta("what ", 0)), turn.event(TranscriptDelta("time", 0))
    assert (first.transcript, second.transcript, first.is_final, second.is_final) == ("what ", "what time",
                                                                                      False, False)
    final = turn.event(TranscriptDone("what time", 0, "English", False))
    assert (final.transcript, final.is_final, final.turn_started_at, final.item_id) == \
        ("what time", True, 12.5, turn.item_id)
    assert turn.event(TranscriptDelta("late", 0)) is None and turn.seen == 5  # nothing after the final
    silent = UserTurn(committed_at=1.0).event(TranscriptDone("", 0, "English", False))
    assert silent.is_final and silent.transcript == ""  # silence: an empty transcript, no error
    failed = UserTurn(committed_at=1.0)
    assert failed.event(TranscriptDone("", 0, "English", False, error="boom")) is None and failed.final
    partial = UserTurn(committed_at=1.0)
    partial.event(TranscriptDelta("what", 0))
    closed = partial.event(TranscriptDone("what", 0, "English", False, error="boom"))
    assert closed.is_final and closed.transcript == "what"
