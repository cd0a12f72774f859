"""Prompt token budgets: a system prompt or a turn that cannot fit `max_history_tokens` even
with the history dropped is refused (`PromptTooLong`) before anything changes, and the
largest prompt that fits prefills in the engine without stalling the calls speaking."""
import threading
import time

import numpy as np
import pytest

from chroma_agent import ChromaEngine, PromptTooLong
from chroma_agent.events import AudioChunk, ResponseDone, TextDelta

UNIT = "please tell me everything about the opening hours of the store "


def summary(response):
    events = list(response)
    assert isinstance(events[-1], ResponseDone)
    pcm = [e.pcm for e in events if isinstance(e, AudioChunk)]
    return pcm, "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1].stop_reason


def state(conv):
    return (conv.reasoner.length, conv.reasoner.next_position, [list(s.ids) for s in conv._history],
            [list(s.ids) for s in conv._pending], conv.history_tokens)


def test_a_system_prompt_over_half_the_budget_is_refused_at_creation(model, voice):
    with pytest.raises(PromptTooLong) as refused:
        model.conversation(voice, system_prompt=UNIT * 10, max_history_tokens=200)
    e = refused.value
    assert e.limit == 100 and e.tokens > 100 and isinstance(e, ValueError)
    assert f"{e.tokens} tokens" in str(e) and f"limit of {e.limit}" in str(e) and "max_history_tokens" in str(e)
    model.conversation(voice, system_prompt=UNIT, max_history_tokens=200)  # one that fits
    with ChromaEngine(model, max_conversations=1) as engine:
        with pytest.raises(PromptTooLong):
            engine.conversation(voice, system_prompt=UNIT * 10, max_history_tokens=200)
        assert engine.active == 0  # no slot held: the one conversation still opens
        engine.conversation(voice, max_history_tokens=200).close()


def test_a_turn_that_cannot_fit_is_refused_and_changes_nothing(model, voice):
    conv, fresh = model.conversation(voice, max_history_tokens=300), model.conversation(voice, max_history_tokens=300)
    for c in (conv, fresh):
        summary(c.respond(text="Hello there.", max_frames=4, seed=1))
    before = state(conv)
    limit = 300 - len(conv._template.system)
    for ask in (lambda: conv.respond(text=UNIT * 20, max_frames=4, seed=2),
                lambda: conv.say(UNIT * 20, max_frames=4, seed=2)):
        with pytest.raises(PromptTooLong) as refused:
            ask()
        assert refused.value.limit == limit and refused.value.tokens > limit
        assert state(conv) == before
    # the conversation answers the next turn exactly as one never asked the long turns
    a, b = summary(conv.respond(text="When do you open?", max_frames=4, seed=3)), \
        summary(fresh.respond(text="When do you open?", max_frames=4, seed=3))
    assert a[1:] == b[1:] and len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))


def test_a_reply_cancelled_in_its_prefill_leaves_the_history_as_it_was(model, voice):
    with ChromaEngine(model, max_conversations=1, prefill_chunk=8, prefill_budget=8) as engine:
        conv = engine.conversation(voice)
        summary(conv.respond(text="Hi", max_frames=2, greedy=True))
        before = state(conv)
        response = iter(conv.respond(text=UNIT * 60, max_frames=2, greedy=True))
        threading.Timer(0.3, conv.cancel).start()  # the 1.6k-token prompt takes seconds in 8-token steps
        events = list(response)
        assert events[-1].stop_reason == "cancelled" and not any(isinstance(e, AudioChunk) for e in events)
        assert state(conv) == before  # the reasoner holds none of the cut prompt
        assert summary(conv.respond(text="Hi", max_frames=2, greedy=True))[2] == "max_frames"
        conv.close()


@pytest.mark.timeout(150)
def test_the_largest_prompt_prefills_without_stalling_a_call_speaking(model, voice):
    """A prompt just under the cap (~8k tokens) prefills while another call speaks: that
    call's ticks stay within a few times its ticks alone; one over the cap is refused."""
    with ChromaEngine(model, max_conversations=2) as engine:
        a, b = engine.conversation(voice), engine.conversation(voice)
        stop, windows = threading.Event(), {}

        def speak():
            while not stop.is_set():
                for event in a.respond(text="Hi", max_frames=400, greedy=True):
                    if isinstance(event, AudioChunk) and "a" not in windows:
                        windows["a"] = time.perf_counter()
                    if stop.is_set():
                        break

        speaker = threading.Thread(target=speak)
        speaker.start()
        try:
            while "a" not in windows:
                time.sleep(0.01)
            time.sleep(3.0)  # a alone
            alone_end = time.perf_counter()
            units = 8192 // 27 + 40
            with pytest.raises(PromptTooLong) as refused:
                b.respond(text=UNIT * units, max_frames=2, greedy=True)
            while True:  # the largest turn that fits, found from the refusals
                try:
                    response = b.respond(text=UNIT * units, max_frames=2, greedy=True)
                    break
                except PromptTooLong as e:
                    units -= max(1, (e.tokens - e.limit) // 27)
            assert refused.value.limit == 8192 - len(b._template.system)
            start = time.perf_counter()
            first_audio = None
            for event in response:
                if isinstance(event, AudioChunk) and first_audio is None:
                    first_audio = time.perf_counter()
        finally:
            stop.set()
            speaker.join(timeout=60)
        assert b.history_tokens >= refused.value.limit - 60  # it was all prefilled: the turn was near the cap
        ticks = list(engine.tick_times)
        alone = [ms for end, ms in ticks if windows["a"] + 0.5 < end <= alone_end]
        busy = [ms for end, ms in ticks if start < end < first_audio]
        assert len(alone) > 20 and len(busy) > 50  # the prefill spread over many ticks
        p95_busy, p95_alone = np.percentile(busy, 95), np.percentile(alone, 95)
        assert p95_busy < 3 * p95_alone, f"ticks p95 {p95_busy:.0f} ms while prefilling, {p95_alone:.0f} ms alone"
        a.close()
        b.close()
