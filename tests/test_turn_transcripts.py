"""Caller transcripts beside the reply, in a lone conversation and in the engine: the
reply's first audio comes before any transcript work, the audio tower runs once per turn,
the engine's batched transcript rows give the same tokens as a pass alone, a cancelled or
closed reply still gets its transcript, and a failed pass ends only its transcript."""
import asyncio

import numpy as np

import pytest

from chroma_agent import ChromaEngine
from chroma_agent.events import AudioChunk, ResponseDone, TranscriptDelta, TranscriptDone
from chroma_agent.runtime import transcription
from chroma_agent.runtime.transcription import transcribe


@pytest.fixture(scope="module")
def clip(model, speech):
    return model.processor.load_user_audio(speech["question"])


@pytest.fixture(scope="module")
def alone(model, clip):
    """The transcript of the clip by a pass alone (greedy), at a small token cap."""
    features = model.processor.features(clip)
    return list(transcribe(model, *features, max_tokens=12))[-1]


@pytest.fixture(scope="module")
def engine(model):
    with ChromaEngine(model, max_conversations=8) as engine:
        yield engine


@pytest.fixture
def small_cap(monkeypatch):
    """Transcript passes made by conversations stop at 12 tokens (the tiny model never ends)."""
    real = transcription.TranscriptPass.__init__

    def capped(self, *a, **kw):
        kw["max_tokens"] = 12
        real(self, *a, **kw)

    monkeypatch.setattr(transcription.TranscriptPass, "__init__", capped)


def check_order(events, alone):
    kinds = [type(e) for e in events]
    first_words = min(kinds.index(TranscriptDelta) if TranscriptDelta in kinds else len(kinds),
                      kinds.index(TranscriptDone))
    assert kinds.index(AudioChunk) < first_words  # the first audio never waits for the transcript
    assert kinds[-1] is ResponseDone and kinds.count(TranscriptDone) == 1
    done = next(e for e in events if isinstance(e, TranscriptDone))
    deltas = [e for e in events if isinstance(e, TranscriptDelta)]
    assert "".join(d.text for d in deltas) == done.text
    assert (done.text, done.truncated, done.output_tokens) == (alone.text, alone.truncated, alone.output_tokens)
    assert done.audio_tokens > 0 and done.input_tokens > done.audio_tokens
    return done


def test_lone_conversation_transcribes_beside_the_reply(model, voice, clip, alone, small_cap, tower_calls):
    conv = model.conversation(voice=voice, frame_graphs=False, transcribe=True)
    response = conv.respond(clip, 16000, max_frames=20, greedy=True)
    events = list(response)
    done = check_order(events, alone)
    assert len(tower_calls) == 1  # the reply's prefill and the transcript share one audio-tower pass
    assert response.transcript.result == done and done.turn == 0
    # off for a turn: no transcript events, and the next transcribed turn is numbered 2
    events = list(conv.respond(clip, 16000, max_frames=3, greedy=True, transcribe=False))
    assert not any(isinstance(e, (TranscriptDelta, TranscriptDone)) for e in events)
    response = conv.respond(clip, 16000, max_frames=3, greedy=True)
    assert [e for e in response if isinstance(e, TranscriptDone)][0].turn == 2


def test_off_by_default_and_text_turns_have_none(model, voice, clip):
    conv = model.conversation(voice=voice, frame_graphs=False)
    response = conv.respond(clip, 16000, max_frames=2, greedy=True)
    assert response.transcript is None
    assert not any(isinstance(e, TranscriptDone) for e in response)
    conv = model.conversation(voice=voice, frame_graphs=False, transcribe=True)
    assert conv.respond(text="hello", max_frames=2).transcript is None


def test_engine_transcript_equals_alone(engine, voice, clip, alone, small_cap, tower_calls):
    with engine.conversation(voice=voice) as conv:
        response = conv.respond(clip, 16000, max_frames=20, greedy=True, transcribe=True)
        check_order(list(response), alone)
    assert len(tower_calls) == 1


def test_engine_batched_transcripts_equal_alone(engine, voice, clip, alone, small_cap):
    async def one():
        with engine.conversation(voice=voice) as conv:
            return [e async for e in conv.respond(clip, 16000, max_frames=12, greedy=True, transcribe=True)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[one() for _ in range(4)]), 120)

    for events in asyncio.run(main()):
        check_order(events, alone)


@pytest.mark.parametrize("where", ["lone", "engine"])
def test_closed_or_cancelled_reply_keeps_its_transcript(model, engine, voice, clip, alone, small_cap, where):
    conv = (model.conversation(voice=voice, frame_graphs=False, transcribe=True) if where == "lone"
            else engine.conversation(voice=voice))
    response = conv.respond(clip, 16000, max_frames=50, greedy=True, transcribe=True)
    for event in response:
        if isinstance(event, AudioChunk):
            break  # the consumer leaves after the first frame: the reply is closed
    assert response.transcript.wait(60).text == alone.text
    # cancelled: its transcript still comes in the stream, before ResponseDone
    response = conv.respond(clip, 16000, max_frames=50, greedy=True, transcribe=True)
    events = []
    for event in response:
        events.append(event)
        if isinstance(event, AudioChunk):
            conv.cancel()
    assert events[-1].stop_reason == "cancelled"
    assert [e for e in events if isinstance(e, TranscriptDone)][0].text == alone.text
    if where == "engine":
        conv.close()


def test_async_readers_and_standalone_transcribe(engine, voice, clip, alone, small_cap):
    async def main():
        with engine.conversation(voice=voice) as conv:
            transcript = conv.transcribe(clip, 16000)
            events = [e async for e in transcript]
            return events, await transcript.done()

    events, done = asyncio.run(asyncio.wait_for(main(), 60))
    assert events[-1] == done and done.text == alone.text


def test_a_failed_pass_ends_only_its_transcript(engine, voice, clip, small_cap, monkeypatch):
    def broken(self, *a, **kw):
        raise RuntimeError("recognition broke")

    monkeypatch.setattr(transcription, "recognition_prompt", broken)
    with engine.conversation(voice=voice) as conv:
        events = list(conv.respond(clip, 16000, max_frames=6, greedy=True, transcribe=True))
    done = [e for e in events if isinstance(e, TranscriptDone)][0]
    assert done.error == "recognition broke" and done.text == ""
    assert events[-1].stop_reason == "max_frames" and sum(isinstance(e, AudioChunk) for e in events) == 6


@pytest.mark.parametrize("noise", [False, True])
def test_silence_or_noise_is_an_empty_transcript(model, voice, tower_calls, noise):
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.05 if noise else 0.001, 32000).astype(np.float32)  # hiss, or room tone
    conv = model.conversation(voice=voice, frame_graphs=False, transcribe=True)
    events = list(conv.respond(audio, 16000, max_frames=3, greedy=True))
    done = [e for e in events if isinstance(e, TranscriptDone)][0]
    assert (done.text, done.error, done.truncated, done.output_tokens) == ("", None, False, 0)
    assert events[-1].stop_reason in ("max_frames", "eos") and len(tower_calls) == 1  # the reply still heard it


def test_has_speech_from_the_callers_vad(model, voice, clip, monkeypatch):
    """A caller whose VAD found speech skips the Silero check; one that found none gets an empty transcript."""
    checks = []
    real = transcription.speech_spans
    monkeypatch.setattr(transcription, "speech_spans", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    conv = model.conversation(voice=voice, frame_graphs=False, transcribe=True, max_transcript_tokens=3)
    events = list(conv.respond(clip, 16000, max_frames=3, greedy=True, has_speech=True))
    assert checks == [] and [e for e in events if isinstance(e, TranscriptDone)][0].output_tokens == 3
    events = list(conv.respond(clip, 16000, max_frames=3, greedy=True, has_speech=False))
    assert checks == [] and [e for e in events if isinstance(e, TranscriptDone)][0].text == ""
    list(conv.respond(clip, 16000, max_frames=3, greedy=True))
    assert checks == [1]
