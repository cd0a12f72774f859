"""The streaming runtime: events, multi-turn memory, cache reuse, say, cancel, truncate."""
import asyncio

import numpy as np
import pytest
import torch

from chroma_agent import AudioError
from chroma_agent.model.codec import StreamingMimiDecoder
from chroma_agent.events import AudioChunk, ResponseDone, TextDelta
from chroma_agent.runtime.generation import SamplingOptions
from chroma_agent.model.processor import ReasonerInput


def assert_consistent(conv):
    """The reasoner cache holds exactly the system prompt and the recorded history."""
    assert conv.reasoner.length == len(conv._template.system) + sum(len(s.ids) for s in conv._history)


def run(response):
    events = list(response)
    assert isinstance(events[-1], ResponseDone) and not any(isinstance(e, ResponseDone) for e in events[:-1])
    return events, events[-1]


def audio_of(events):
    return [e for e in events if isinstance(e, AudioChunk)]


def test_respond_streams_text_then_audio_frames(model, voice, speech):
    conv = model.conversation(voice)
    events, done = run(conv.respond(audio=speech["question"], max_frames=5, seed=0))
    chunks = audio_of(events)
    assert [c.frame_index for c in chunks] == [0, 1, 2, 3, 4]
    assert all(c.pcm.shape == (1920,) and c.pcm.dtype == np.float32 and c.sample_rate == 24000 for c in chunks)
    # the reasoner's text for a frame comes before that frame's audio
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert first_text < events.index(chunks[0]) or not events[first_text].token_ids
    assert done.stop_reason == "max_frames" and done.stats.frames == 5
    assert done.stats.time_to_first_audio_s > 0 and len(done.stats.frame_ms) == 5
    assert done.stats.real_time_factor == pytest.approx(done.stats.generation_s / 0.4)
    assert done.text == "".join(e.text for e in events if isinstance(e, TextDelta))


def test_streamed_audio_equals_full_decode_of_the_same_codes(model, voice, golden_cases):
    """The conversation's chunks are the streaming decode of its codes, equal to the full decode."""
    case = golden_cases[1]
    prompt = ReasonerInput(torch.tensor([case["thinker_input_ids"]]))
    with torch.inference_mode():
        codes = torch.stack([f.codes for f in model.reply_frames(voice, prompt, 10, SamplingOptions(seed=4))])
        decoder = StreamingMimiDecoder(model.codec_model, 8)
        chunks = [decoder.decode_frame(c[None])[0] for c in codes]
    assert all(c.shape == (1920,) for c in chunks)
    np.testing.assert_allclose(torch.cat(chunks).numpy(), model.decode_audio(codes.numpy()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("index", range(4))
def test_streaming_decode_equals_full_decode_on_golden_codes(model, golden_cases, index):
    codes = torch.tensor(golden_cases[index]["expected"]["codes"])
    decoder = StreamingMimiDecoder(model.codec_model, 8)
    with torch.inference_mode():
        streamed = torch.cat([decoder.decode_frame(c[None])[0] for c in codes]).numpy()
    np.testing.assert_allclose(streamed, model.decode_audio(codes.numpy()), atol=1e-4, rtol=0)


def test_voice_prefix_kv_reuse_equals_recomputing_it(model, voice, golden_cases):
    prompt = ReasonerInput(torch.tensor([golden_cases[0]["thinker_input_ids"]]))
    greedy = SamplingOptions(greedy=True)
    with torch.inference_mode():
        fresh = [f.codes for f in model.reply_frames(voice, prompt, 12, greedy)]
        state = model.prefix_state(voice)
        assert model.prefix_state(voice) is state  # computed once per voice
        for _ in range(2):  # and reused, unchanged, by every reply
            reused = [f.codes for f in model.reply_frames(voice, prompt, 12, greedy, prefix=state)]
            assert torch.equal(torch.stack(fresh), torch.stack(reused))


def codes_and_text(events):
    return [e.pcm for e in audio_of(events)], events[-1].text


def test_multi_turn_cache_equals_prefilling_the_whole_history(model, voice, speech):
    """Turn 2 on the carried reasoner cache == turn 2 after prefilling all history anew."""
    opts = dict(max_frames=6, greedy=True)
    carried = model.conversation(voice)
    run(carried.respond(audio=speech["question"], **opts))
    run(carried.respond(audio=speech["reference"], **opts))  # a second clip, of another length
    events_a, _ = run(carried.respond(text="And on Sunday?", **opts))
    rebuilt = model.conversation(voice)
    run(rebuilt.respond(audio=speech["question"], **opts))
    run(rebuilt.respond(audio=speech["reference"], **opts))
    rebuilt.forget_cache()  # the next turn prefills the history anew: both clips, padded into one batch
    events_b, _ = run(rebuilt.respond(text="And on Sunday?", **opts))
    pcm_a, text_a = codes_and_text(events_a)
    pcm_b, text_b = codes_and_text(events_b)
    assert text_a == text_b
    np.testing.assert_allclose(np.concatenate(pcm_a), np.concatenate(pcm_b), atol=1e-5, rtol=0)
    assert_consistent(carried)


def test_history_cap_drops_oldest_turns_and_keeps_the_system_prompt(model, voice):
    conv = model.conversation(voice, max_history_tokens=150)
    system = len(conv._template.system)
    for i in range(4):
        run(conv.respond(text=f"Question number {i}, please answer.", max_frames=4, seed=i))
        assert conv.history_tokens <= 150 + 20  # a turn's own reply may pass the cap until the next turn
    assert conv._pending == [] and conv.reasoner.length >= system
    kept = [seg.ids for seg in conv._history]
    assert len(kept) < 4  # the oldest exchanges went


def test_say_teacher_forces_the_text(model, voice):
    conv = model.conversation(voice)
    line = "Thanks for calling, how can I help?"
    events, done = run(conv.say(line, max_frames=40, seed=0))
    ids = model.processor.tokenizer(line, add_special_tokens=False)["input_ids"]
    said = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    assert said == ids and done.text == line
    # it joined the history as an assistant turn: header + line + closing
    assert conv._history[-1].ids == conv._template.assistant_header + ids + conv._template.close
    assert_consistent(conv)


def test_cancel_stops_within_one_frame_and_the_conversation_goes_on(model, voice):
    conv = model.conversation(voice)
    response = conv.respond(text="Tell me a long story.", max_frames=50, seed=0)
    seen = []
    for event in response:
        seen.append(event)
        if isinstance(event, AudioChunk) and event.frame_index == 2:
            response.cancel()
    done = seen[-1]
    assert done.stop_reason == "cancelled"
    assert [c.frame_index for c in audio_of(seen)] == [0, 1, 2]
    # the reasoner holds what was fed up to the cut, closed, and nothing more
    fed = [t for _, t in conv._last["fed"]]
    assert len(fed) == 2  # reasoner tokens were fed at steps 0 and 2
    assert conv._history[-1].ids[-len(fed) - len(conv._template.close):] == fed + conv._template.close
    assert_consistent(conv)
    events, done2 = run(conv.respond(text="Never mind.", max_frames=3, seed=1))
    assert done2.stop_reason == "max_frames" and len(audio_of(events)) == 3


def test_truncate_keeps_only_what_was_heard(model, voice):
    conv = model.conversation(voice)
    run(conv.respond(text="Hello there", max_frames=8, greedy=True))
    full = conv.history_tokens
    fed = list(conv._last["fed"])
    conv.truncate(played_ms=100)  # frames 0 and 1 were heard
    heard = [t for f, t in fed if f < 2 and t != model.config.im_end_token_id]
    assert conv.history_tokens == full - (len([t for _, t in fed if t != model.config.im_end_token_id]) - len(heard))
    assert conv._history[-1].ids[-len(heard) - len(conv._template.close):] == heard + conv._template.close
    assert_consistent(conv)
    # equal to a conversation whose history was that from the start (prefilled anew)
    events_a, _ = run(conv.respond(text="Again?", max_frames=4, greedy=True))
    conv._history.pop()  # drop "Again?" and replay it on a rebuilt cache
    conv.forget_cache()
    events_b, _ = run(conv.respond(text="Again?", max_frames=4, greedy=True))
    np.testing.assert_allclose(np.concatenate(codes_and_text(events_a)[0]),
                               np.concatenate(codes_and_text(events_b)[0]), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="nothing to truncate"):
        model.conversation(voice).truncate(10)


def test_async_iteration_matches_sync(model, voice):
    async def collect():
        conv = model.conversation(voice)
        return [e async for e in conv.respond(text="Hi", max_frames=4, seed=7)]

    async_events = asyncio.run(collect())
    sync_events = list(model.conversation(voice).respond(text="Hi", max_frames=4, seed=7))
    assert [type(e) for e in async_events] == [type(e) for e in sync_events]
    for a, b in zip(audio_of(async_events), audio_of(sync_events)):
        assert np.array_equal(a.pcm, b.pcm)


def test_conversations_share_the_model_without_sharing_state(model, voice):
    """Two interleaved conversations equal the same two run one after the other."""
    a, b = model.conversation(voice), model.conversation(voice)
    ra, rb = iter(a.respond(text="One", max_frames=4, seed=1)), iter(b.respond(text="Two", max_frames=4, seed=2))
    interleaved_a, interleaved_b = [], []
    for ea, eb in zip(ra, rb):
        interleaved_a.append(ea)
        interleaved_b.append(eb)
    interleaved_a += list(ra)
    interleaved_b += list(rb)
    alone_a = list(model.conversation(voice).respond(text="One", max_frames=4, seed=1))
    alone_b = list(model.conversation(voice).respond(text="Two", max_frames=4, seed=2))
    for x, y in [(interleaved_a, alone_a), (interleaved_b, alone_b)]:
        assert all(np.array_equal(p.pcm, q.pcm) for p, q in zip(audio_of(x), audio_of(y)))


def test_bad_audio_fails_before_anything_changes(model, voice):
    conv = model.conversation(voice)
    with pytest.raises(AudioError, match="silent"):
        conv.respond(audio=np.zeros(16000, np.float32), sample_rate=16000)
    assert conv.history_tokens == len(conv._template.system) and conv._history == []


def test_one_reply_at_a_time(model, voice):
    conv = model.conversation(voice)
    first = iter(conv.respond(text="One", max_frames=3, seed=0))
    next(first)
    with pytest.raises(RuntimeError, match="already replying"):
        next(iter(conv.respond(text="Two", max_frames=3)))
    conv.cancel()
    list(first)
    assert audio_of(list(conv.respond(text="Two", max_frames=2, seed=0)))


def test_conversation_on_the_frame_runner_matches_the_dynamic_step(model, voice):
    a = model.conversation(voice, frame_graphs=True)   # fixed shapes (eager here; graphs on CUDA)
    b = model.conversation(voice, frame_graphs=False)
    for text in ("Hello", "And again"):
        ea, _ = run(a.respond(text=text, max_frames=5, seed=11))
        eb, _ = run(b.respond(text=text, max_frames=5, seed=11))
        np.testing.assert_allclose(np.concatenate([c.pcm for c in audio_of(ea)]),
                                   np.concatenate([c.pcm for c in audio_of(eb)]), atol=1e-5, rtol=0)


def test_a_reply_that_fails_early_loses_no_history(model, voice, monkeypatch):
    conv = model.conversation(voice)
    run(conv.respond(text="First", max_frames=3, greedy=True))
    before = (conv.history_tokens, [list(s.ids) for s in conv._history])
    with pytest.raises(ValueError, match="max_frames"):
        conv.respond(text="Second", max_frames=0)
    from chroma_agent.runtime.generation import Reasoner

    def broken(self, inputs):
        raise RuntimeError("device lost")
    monkeypatch.setattr(Reasoner, "prefill", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        list(conv.respond(text="Second", max_frames=3))
    monkeypatch.undo()
    assert (conv.history_tokens, [list(s.ids) for s in conv._history]) == before
    events, done = run(conv.respond(text="Second", max_frames=3, greedy=True))
    assert done.stop_reason == "max_frames"
    assert_consistent(conv)
