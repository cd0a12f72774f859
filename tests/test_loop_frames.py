"""Engine replies reach `async for` consumers through the event loop: while a reply speaks,
its consumer holds no worker thread (a frame made already is taken on the loop; one not
made yet is awaited there), so a server's threads do not grow with its calls. The sync
API and the lone conversation are unchanged."""
import asyncio

import pytest

from chroma_agent import ChromaEngine
from chroma_agent.events import AudioChunk, ResponseDone
from chroma_agent.runtime import conversation as conversation_module


@pytest.fixture(scope="module")
def engine(model):
    with ChromaEngine(model, max_conversations=8) as engine:
        yield engine


@pytest.fixture
def thread_steps(monkeypatch):
    """Counts the reply steps taken on worker threads."""
    counted = []
    real = asyncio.to_thread

    async def to_thread(fn, *args, **kwargs):
        counted.append(getattr(fn, "__name__", ""))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(conversation_module.asyncio, "to_thread", to_thread)
    return counted


@pytest.mark.timeout(300)
@pytest.mark.parametrize("calls", [1, 6])
def test_speaking_replies_hold_no_threads(engine, voice, thread_steps, calls):
    frames = 24

    async def one(paced: bool):
        with engine.conversation(voice=voice) as conv:
            events = []
            async for event in conv.respond(text="Tell me about the store.", max_frames=frames, greedy=True):
                events.append(event)
                if paced and isinstance(event, AudioChunk):
                    await asyncio.sleep(0.01)  # a consumer slower than the engine: frames wait for it
            return events

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[one(i % 2 == 0) for i in range(calls)]), 240)

    results = asyncio.run(main())
    for events in results:
        assert isinstance(events[-1], ResponseDone) and events[-1].stop_reason == "max_frames"
        assert sum(isinstance(e, AudioChunk) for e in events) == frames
    # per reply, threads only for its start (prefill: until its first frame) and its end, never per frame
    assert len(thread_steps) <= 3 * calls, (len(thread_steps), calls)


def test_sync_and_lone_paths_unchanged(model, engine, voice):
    with engine.conversation(voice=voice) as conv:
        sync = list(conv.respond(text="Hi", max_frames=5, greedy=True))
    assert sync[-1].stop_reason == "max_frames" and sum(isinstance(e, AudioChunk) for e in sync) == 5

    async def lone():
        conv = model.conversation(voice=voice, frame_graphs=False)
        return [e async for e in conv.respond(text="Hi", max_frames=5, greedy=True)]

    events = asyncio.run(asyncio.wait_for(lone(), 120))
    assert sum(isinstance(e, AudioChunk) for e in events) == 5 and events[-1].stop_reason == "max_frames"
