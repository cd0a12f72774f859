"""A reply left early (a cancelled task, a `break`) ends where it was left: the
conversation's lock is released, its history keeps what was generated, and the next reply
is the one a conversation stopped at the same point would give."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from chroma_agent.events import AudioChunk, ResponseDone


def consistent(conv) -> bool:
    """The reasoner cache holds exactly the system prompt and the recorded history."""
    return conv.reasoner.length == len(conv._template.system) + sum(len(s.ids) for s in conv._history)


def reference_reply(model, voice, first_events: int) -> list:
    """The second reply of a conversation whose first reply stopped after `first_events`
    events (sync iteration, `break`: closed at once)."""
    conv = model.conversation(voice)
    for i, _ in enumerate(conv.respond(text="One", max_frames=12, seed=1)):
        if i + 1 == first_events:
            break
    return list(conv.respond(text="Two", max_frames=3, seed=2))


def same_audio(a: list, b: list) -> bool:
    pa, pb = [e.pcm for e in a if isinstance(e, AudioChunk)], [e.pcm for e in b if isinstance(e, AudioChunk)]
    return len(pa) == len(pb) > 0 and all(np.array_equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.timeout(120)
async def test_a_cancelled_async_for_frees_the_conversation(model, voice):
    conv = model.conversation(voice)
    response = conv.respond(text="One", max_frames=12, seed=1)
    seen, audio = [], asyncio.Event()

    async def consume():
        async for event in response:
            seen.append(event)
            if sum(isinstance(e, AudioChunk) for e in seen) == 2:
                audio.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(audio.wait(), 60)
    task.cancel()   # it is waiting for the next frame, computed in a worker thread
    with pytest.raises(asyncio.CancelledError):
        await task
    # the cancellation went on only once the reply was closed
    assert not conv.busy.locked() and consistent(conv)
    assert not any(isinstance(e, ResponseDone) for e in seen)
    assert [e async for e in response] == []   # a closed reply yields nothing more

    second = [e async for e in conv.respond(text="Two", max_frames=3, seed=2)]
    assert isinstance(second[-1], ResponseDone) and second[-1].stop_reason in ("eos", "max_frames")
    # the frame in flight when it was cancelled was computed: the generator stopped after it
    produced = len(seen) + (response._step.result() is not None)
    assert same_audio(second, reference_reply(model, voice, produced))


@pytest.mark.timeout(120)
async def test_an_abandoned_async_for_is_closed_before_the_next_reply(model, voice):
    conv = model.conversation(voice)
    seen = []
    # `break` without aclose(): the reply is closed on the loop, and the next reply,
    # started at once, waits for that instead of failing with "already replying"
    async for event in conv.respond(text="One", max_frames=12, seed=1):
        seen.append(event)
        if sum(isinstance(e, AudioChunk) for e in seen) == 2:
            break
    second = [e async for e in conv.respond(text="Two", max_frames=3, seed=2)]
    assert consistent(conv) and isinstance(second[-1], ResponseDone)
    assert same_audio(second, reference_reply(model, voice, len(seen)))

    # explicit aclose(): the reply is closed when it returns; a task cancelled in its body too
    response = conv.respond(text="Three", max_frames=12, seed=3)
    async for event in response:
        break
    await asyncio.wait_for(response.aclose(), 30)
    assert not conv.busy.locked() and consistent(conv)

    async def stalls():
        async for event in conv.respond(text="Four", max_frames=12, seed=4):
            await asyncio.sleep(60)   # cancelled here, between two events

    task = asyncio.create_task(stalls())
    await asyncio.sleep(0)
    while not conv.busy.locked():
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    last = [e async for e in conv.respond(text="Five", max_frames=2, seed=5)]
    assert consistent(conv) and isinstance(last[-1], ResponseDone)


@pytest.mark.timeout(60)
def test_break_out_of_a_sync_for_frees_the_conversation(model, voice):
    conv = model.conversation(voice)
    response = conv.respond(text="One", max_frames=12, seed=1)
    for _ in response:
        break
    assert not conv.busy.locked() and consistent(conv)
    assert list(conv.respond(text="Two", max_frames=2, seed=2))[-1].stop_reason in ("eos", "max_frames")
