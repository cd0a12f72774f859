"""The framework-free voice session the three adapters (Realtime, Pipecat, LiveKit) share:
the conversation made anew on a voice or prompt change, the 16 kHz input buffer, the
nothing-to-answer rule, cancel -> drain -> ResponseDone, and truncation of the latest reply."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import soundfile as sf

from chroma_agent.events import AudioChunk, PromptTooLong, ResponseDone, TextDelta
from chroma_agent.serving.pcm import InputBuffer, from_int16, to_int16
from chroma_agent.serving.voice_session import NothingToAnswer, VoiceSession, answer_turn

LONG = "please tell me everything about the opening hours of the store " * 320  # ~8.6k tokens


class Counting:
    """The model as `model=`: counts the conversations made, their threads, and closes them."""

    def __init__(self, model):
        self.model, self.made, self.closed, self.threads = model, [], [], set()

    def conversation(self, **kwargs):
        self.threads.add(threading.get_ident())
        conv = self.model.conversation(**kwargs)
        conv.close = lambda conv=conv: self.closed.append(conv)
        self.made.append((conv, kwargs.get("system_prompt", "<default>")))
        return conv


def test_int16_round_trip_and_channels_folded():
    pcm = np.array([0.0, 0.5, -0.5, 1.5], np.float32)
    data = to_int16(pcm)
    assert np.frombuffer(data, np.int16).tolist() == [0, 16383, -16383, 32767]   # clipped to [-1, 1]
    stereo = np.array([[16384, 0], [-16384, -16384]], np.int16).tobytes()
    assert from_int16(stereo, 2).tolist() == [0.25, -0.5]


def test_input_buffer_resamples_and_keeps_the_latest_part():
    buffer = InputBuffer(max_s=1.0)
    for _ in range(15):   # 1.5 s at 48 kHz, 100 ms at a time
        buffer.push(np.full(4800, 0.1, np.float32), 48000)
    assert buffer.overflowed
    audio = buffer.take()
    assert audio.size == 16000 and audio.dtype == np.float32
    assert buffer.size == 0 and not buffer.overflowed and buffer.take().size == 0


def test_nothing_to_answer_under_100_ms_without_text(model, voice):
    conv = model.conversation(voice=voice)
    with pytest.raises(NothingToAnswer):
        answer_turn(conv, [np.zeros(1000, np.float32)])
    with pytest.raises(NothingToAnswer):   # only silence: trimmed away
        answer_turn(conv, [np.zeros(16000, np.float32)], trim=True)
    response = answer_turn(conv, [np.zeros(1000, np.float32)], "Hi", max_frames=2)  # text alone is answered
    assert isinstance(list(response)[-1], ResponseDone)


@pytest.mark.timeout(120)
async def test_a_new_conversation_on_a_prompt_or_voice_change_made_off_the_loop(model, voice):
    counting = Counting(model)
    session = VoiceSession(counting, voice, None)
    first = await session.conversation()
    assert await session.conversation() is first and counting.made[0][1] == "<default>"
    session.system_prompt = "You answer for a bakery."
    second = await session.conversation()
    assert second is not first and counting.closed == [first]   # the old one closed first (its engine slot)
    session.system_prompt = ""   # "": no system prompt at all (not the model's default)
    third = await session.conversation()
    assert counting.made[-1][1] == "" and third.system_prompt == ""
    assert threading.get_ident() not in counting.threads
    session.close()
    assert counting.closed[-1] is third and session.conv is None
    with pytest.raises(RuntimeError, match="closed"):
        await session.conversation()


@pytest.mark.timeout(120)
async def test_a_refused_prompt_keeps_the_last_that_fit_or_raises(model, voice):
    counting = Counting(model)
    session = VoiceSession(counting, voice, "You are Ada.")
    await session.conversation()
    session.system_prompt = LONG
    conv = await session.conversation()
    refused = session.take_refusal()
    assert isinstance(refused, PromptTooLong) and session.take_refusal() is None
    assert [p for _, p in counting.made] == ["You are Ada.", "You are Ada."]   # made anew under the one that fit
    assert await session.conversation() is conv   # not tried again
    strict = VoiceSession(counting, voice, "You are Ada.", keep_fitting_prompt=False)
    await strict.conversation()
    strict.system_prompt = LONG
    with pytest.raises(PromptTooLong):
        await strict.conversation()
    with pytest.raises(PromptTooLong):   # no prompt that fit yet: raised either way
        await VoiceSession(counting, voice, LONG).conversation()


@pytest.mark.timeout(120)
async def test_a_reply_streams_then_a_cancelled_one_drains_to_response_done(model, voice, speech):
    session = VoiceSession(model, voice)
    conv = await session.conversation()
    pcm, rate = sf.read(speech["question"], dtype="float32")
    session.push(pcm, rate)
    reply = await session.reply(conv).respond([session.take()], trim=True, max_frames=4, seed=0)
    events = [e async for e in reply]
    assert isinstance(events[-1], ResponseDone) and reply.done is events[-1]
    assert reply.frames == sum(isinstance(e, AudioChunk) for e in events) >= 1
    assert reply.text_tokens == sum(len(e.token_ids) for e in events if isinstance(e, TextDelta))
    assert reply.input_tokens > 0 and reply.truncatable and session.last is reply

    reply = await session.reply(conv).say("One two three four five six seven eight.", max_frames=40, seed=0)
    reply.cancel()   # before its first frame: the reply's start clears it, so it is sent again
    events = [e async for e in reply]
    assert [type(e) for e in events] == [ResponseDone] and events[0].stop_reason == "cancelled"
    assert events[0].stats.frames <= 2   # drained within a frame or so, not run to max_frames
    before = conv.history_tokens
    assert await session.truncate(reply, 0) and conv.history_tokens <= before
    session.close()


@pytest.mark.timeout(120)
async def test_only_the_latest_reply_of_the_current_conversation_is_truncated(model, voice):
    session = VoiceSession(model, voice)
    conv = await session.conversation()
    first = await session.reply(conv).respond(text="Hi", max_frames=2, seed=0)
    [e async for e in first]
    second = await session.reply(conv).respond(text="Hello", max_frames=2, seed=0)
    assert not await session.truncate(second, 0)   # not run yet
    [e async for e in second]
    assert not await session.truncate(first, 0)    # no longer the latest
    session.system_prompt = "You are Ada."
    await session.conversation()
    assert not await session.truncate(second, 0)   # its conversation is gone
    side = await session.side_conversation()
    assert side is not session.conv
    reply = await session.reply(side).respond(text="Hi", max_frames=2, seed=0)
    [e async for e in reply]
    assert session.last is None   # a side conversation's reply is not the session's
    await asyncio.to_thread(session.close)
