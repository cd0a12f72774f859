"""ChromaEngine: batched == alone (greedy and seeded), golden cases through the batch,
isolation of failures, admission control, fairness, cancel and close."""
import asyncio
import json
import threading
import time

import numpy as np
import pytest
import torch

from chroma_agent import CapacityError, ChromaEngine, SamplingOptions
from chroma_agent.events import AudioChunk, ResponseDone, TextDelta
from chroma_agent.runtime.engine import EngineConversation
from chroma_agent.model.processor import ReasonerInput
from chroma_agent.testing.golden import weight_edits

from .conftest import GOLDEN

CASES = json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="module")
def engine(model):
    engine = ChromaEngine(model, max_conversations=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def voice2(model, speech):
    return model.voice_from_audio(speech["reference"], "Hello, thanks for calling. How can I help you today?")


def pcm(events):
    return [e.pcm for e in events if isinstance(e, AudioChunk)]


def summary(events):
    """What a reply produced: its audio frames, its text, how it stopped."""
    done = events[-1]
    assert isinstance(done, ResponseDone)
    return pcm(events), "".join(e.text for e in events if isinstance(e, TextDelta)), done.stop_reason


def same(a, b):
    (pa, ta, sa), (pb, tb, sb) = a, b
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb)) and ta == tb and sa == sb


def run_alone(engine, voice, turn):
    with engine.conversation(voice) as conv:
        return summary(list(conv.respond(**turn)))


def run_together(engine, calls, join_after=None):
    """Run the (voice, turn) calls at once, each on its own thread; call i > 0 starts once
    call 0 has produced `join_after[i]` frames (joins mid-stream)."""
    results, progress = {}, threading.Condition()
    frames0 = [0]

    def run(i, voice, turn):
        if join_after and i:
            with progress:
                progress.wait_for(lambda: frames0[0] >= join_after[i] or 0 in results, timeout=120)
        with engine.conversation(voice) as conv:
            events = []
            for event in conv.respond(**turn):
                events.append(event)
                if i == 0 and isinstance(event, AudioChunk):
                    with progress:
                        frames0[0] += 1
                        progress.notify_all()
            results[i] = summary(events)
        with progress:
            progress.notify_all()

    threads = [threading.Thread(target=run, args=(i, v, t)) for i, (v, t) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [results[i] for i in range(len(calls))]


def test_batched_greedy_equals_alone(engine, model, voice, voice2, speech):
    """Different prompt lengths (text, audio), voices and join times: every reply in the
    batch is bit for bit the reply it gives alone."""
    calls = [(voice, dict(text="Tell me about the weather tomorrow.", max_frames=14, greedy=True)),
             (voice2, dict(audio=speech["question"], max_frames=10, greedy=True)),
             (voice, dict(text="Hi", max_frames=8, greedy=True)),
             (voice2, dict(text="What time does the store open on Saturday, and on Sunday?", max_frames=9,
                           greedy=True))]
    together = run_together(engine, calls, join_after=[0, 0, 3, 6])
    for (v, turn), got in zip(calls, together):
        alone = run_alone(engine, v, turn)
        assert same(got, alone)
        assert len(got[0]) == turn["max_frames"]
    # and the engine's reply equals the plain conversation's (to float rounding; the
    # engine's batch-invariant matmuls round their last bits differently)
    plain = summary(list(model.conversation(voice).respond(**calls[0][1])))
    assert together[0][1] == plain[1]
    np.testing.assert_allclose(np.concatenate(together[0][0]), np.concatenate(plain[0]), atol=1e-5, rtol=0)


def test_seeded_sampling_is_repeatable_in_any_batch(engine, voice, voice2):
    calls = [(voice, dict(text="One", max_frames=8, seed=1)), (voice2, dict(text="Two words", max_frames=8, seed=2)),
             (voice, dict(text="Three", max_frames=8, seed=1, top_k=5, temperature=0.7))]
    first = run_together(engine, calls)
    second = run_together(engine, calls, join_after=[0, 2, 5])
    for a, b, (v, turn) in zip(first, second, calls):
        assert same(a, b) and same(a, run_alone(engine, v, turn))
    assert not same(first[0], run_alone(engine, voice, dict(text="One", max_frames=8, seed=3)))


def golden_prompt(model, case):
    prompt = ReasonerInput(torch.tensor([case["thinker_input_ids"]]))
    if case.get("user_audio_16k"):
        audio = model.processor.load_user_audio(np.asarray(case["user_audio_16k"], np.float32), 16000)
        prompt.input_features, prompt.feature_attention_mask = model.processor.features(audio)
    return prompt


def check_golden(model, case, job, frames):
    want = case["expected"]
    assert [f.codes.tolist() for f in frames] == want["codes"]
    assert job.reply.text_ids == want["thinker_tokens"]
    audio = np.concatenate([f.pcm for f in frames])
    assert len(audio) == want["decoded_audio_len"]
    np.testing.assert_allclose(audio[: len(want["decoded_audio_head"])], want["decoded_audio_head"], atol=1e-4, rtol=0)


def test_golden_cases_through_the_engine(engine, model):
    """The plain cases all at once in one batch, then the weight-edited one."""
    plain = [c for c in CASES if not c["weight_edits"]]
    jobs, frames = [], {}
    for case in plain:
        voice = model.voice_from_audio(np.asarray(case["prompt_audio_24k"], np.float32), case["prompt_text_ids"],
                                       sample_rate=24000)
        jobs.append(engine.reply_frames(voice, golden_prompt(model, case), case["max_new_frames"],
                                        SamplingOptions(greedy=True)))
    threads = [threading.Thread(target=lambda j=j: frames.__setitem__(j, list(j))) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for case, job in zip(plain, jobs):
        check_golden(model, case, job, frames[job])
    for case in [c for c in CASES if c["weight_edits"]]:
        with weight_edits(model, case["weight_edits"]), torch.inference_mode():
            voice = model.voice_from_audio(np.asarray(case["prompt_audio_24k"], np.float32),
                                           case["prompt_text_ids"], sample_rate=24000)
            job = engine.reply_frames(voice, golden_prompt(model, case), case["max_new_frames"],
                                      SamplingOptions(greedy=True))
            check_golden(model, case, job, list(job))


def test_a_failing_reply_ends_with_an_error_and_the_others_go_on(engine, voice, monkeypatch):
    good_turn = dict(text="Tell me about the weather tomorrow.", max_frames=10, greedy=True)
    alone = run_alone(engine, voice, good_turn)
    results = {}

    def broken_input(conv):  # its next backbone input is malformed: the batched step fails with it in
        original = EngineConversation.frame_source

        def frames(self, *args):
            job = original(self, *args)
            if self is conv:
                steps = [0]
                real = job.reply.next_input

                def next_input():
                    steps[0] += 1
                    x = real()
                    return x[..., :7] if steps[0] == 3 else x
                job.reply.next_input = next_input
            return job
        return frames

    with engine.conversation(voice) as good, engine.conversation(voice) as bad, engine.conversation(voice) as early:
        monkeypatch.setattr(EngineConversation, "frame_source", broken_input(bad))
        monkeypatch.setattr(early.reasoner, "prefill_in_chunks", lambda *a: (_ for _ in ()).throw(ValueError("bad input")))
        runs = [(good, good_turn), (bad, dict(text="Hello there", max_frames=10, greedy=True)),
                (early, dict(text="Hi", max_frames=10, greedy=True))]
        threads = [threading.Thread(target=lambda c=c, t=t: results.__setitem__(c, list(c.respond(**t))))
                   for c, t in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert same(summary(results[good]), alone)
        bad_done, early_done = results[bad][-1], results[early][-1]
        assert bad_done.stop_reason == "error" and "RuntimeError" in bad_done.error
        assert len(pcm(results[bad])) == 2  # the frames before the failure were delivered
        assert early_done.stop_reason == "error" and "bad input" in early_done.error
        monkeypatch.undo()
        assert engine._thread.is_alive()
        # the failed conversations go on: their history holds what was heard
        again = summary(list(bad.respond(text="Again", max_frames=3, greedy=True)))
        assert again[2] == "max_frames" and len(again[0]) == 3


def test_admission_control(model, voice):
    with ChromaEngine(model, max_conversations=2) as engine:
        assert engine.capacity == 2 and engine.load == 0
        a, b = engine.conversation(voice), engine.conversation(voice)
        assert engine.active == 2 and engine.load == 1.0
        with pytest.raises(CapacityError, match="at capacity: 2 of 2"):
            engine.conversation(voice)
        streaming = iter(a.respond(text="Keep talking", max_frames=6, greedy=True))
        next(streaming)  # running calls are untouched by a refused one
        with pytest.raises(CapacityError):
            engine.conversation(voice)
        assert list(streaming)[-1].stop_reason == "max_frames"
        b.close()
        b.close()  # idempotent
        assert engine.active == 1 and engine.load == 0.5 and b.reasoner is None
        with pytest.raises(RuntimeError, match="closed"):
            b.respond(text="Hello")
        c = engine.conversation(voice)  # the slot is free again
        assert engine.active == 2
        a.close(), c.close()
    calibrated = ChromaEngine(model)  # no max_conversations: measured at start
    try:
        assert 1 <= calibrated.capacity <= 64
    finally:
        calibrated.close()


def test_frame_times_are_the_recent_ticks_that_spoke(model, voice):
    with ChromaEngine(model, max_conversations=2) as engine:
        assert engine.frame_times() is None   # nothing has spoken yet
        conv = engine.conversation(voice)
        frames = list(conv.respond(text="Keep talking", max_frames=6, greedy=True))
        times = engine.frame_times()
        spoken = sum(type(f).__name__ == "AudioChunk" for f in frames)
        assert spoken == 6 and times["ticks"] >= spoken   # a tick per frame (prefill ticks do not count)
        recent = [ms for _, ms in engine.tick_times][-times["ticks"]:]
        assert 0 < times["p50"] <= times["p95"] <= max(recent) + 0.1
        time.sleep(0.2)
        assert engine.frame_times(window_s=0.1) is None   # only the window's ticks
        conv.close()


def test_prefill_is_chunked_and_fair(model, voice):
    """A long prompt prefills a chunk per tick while a reply already speaking gets a frame
    every tick; prompts waiting together prefill in turn (round robin)."""
    log = []
    with ChromaEngine(model, max_conversations=4, prefill_chunk=16, prefill_budget=16) as engine:
        frame = engine._frame

        def logged(jobs):
            log.append((engine.ticks, {id(j) for j in jobs}))
            frame(jobs)
        engine._frame = logged
        long_text = " ".join(["please tell me everything about the opening hours of the store"] * 6)
        a = engine.conversation(voice)
        first = iter(a.respond(text="Hi", max_frames=30, greedy=True))
        head = [next(first)]  # a is speaking
        speaking = {id(j) for j in engine._speaking}
        convs = [engine.conversation(voice) for _ in range(3)]
        held, hold, submitted = [], threading.Lock(), []

        def submit_together(job):  # the three prompts arrive in one tick, however threads are scheduled
            with hold:
                held.append(job)
                if len(held) == 3:
                    submitted.append(engine.ticks)
                    with engine._wakeup:
                        engine._submitted.extend(held)
                        engine._wakeup.notify()
        engine.submit = submit_together
        results = {}
        threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, list(c.respond(
            text=long_text, max_frames=2, greedy=True)))) for c in convs]
        for t in threads:
            t.start()
        rest = list(first)
        for t in threads:
            t.join(timeout=300)
        ticks = [tick for tick, jobs in log if jobs & speaking]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # a frame every tick: never stalled
        assert len(pcm(head + rest)) == 30
        # the three long prompts took turns: they started speaking close together (in turn, one
        # after the other, the first would speak a third of the way in); steps are paced by time
        assert all(results[conv][-1].stop_reason == "max_frames" for conv in convs)
        first_tick = {}
        for tick, jobs in log:
            for j in jobs - speaking:
                first_tick.setdefault(j, tick)
        span = min(first_tick.values()) - submitted[0]
        assert len(first_tick) == 3 and max(first_tick.values()) - min(first_tick.values()) <= max(2, span // 5)
        for conv in [a, *convs]:
            conv.close()


def test_cancel_frees_the_slot_at_the_next_frame(engine, voice):
    with engine.conversation(voice) as conv:
        response = conv.respond(text="Tell me a long story.", max_frames=60, greedy=True)
        seen = []
        for event in response:
            seen.append(event)
            if isinstance(event, AudioChunk) and event.frame_index == 2:
                response.cancel()
        assert seen[-1].stop_reason == "cancelled"
        assert len(pcm(seen)) <= 4 and not engine._speaking
        # the conversation goes on, with the heard part in its history
        assert summary(list(conv.respond(text="Never mind.", max_frames=3, greedy=True)))[2] == "max_frames"


def test_async_with_and_async_iteration(engine, voice):
    async def talk():
        async with engine.conversation(voice) as conv:
            events = [e async for e in conv.respond(text="Hi", max_frames=4, greedy=True)]
        return conv, events

    conv, events = asyncio.run(talk())
    assert conv.closed and summary(events)[2] == "max_frames"
    assert same(summary(events), run_alone(engine, voice, dict(text="Hi", max_frames=4, greedy=True)))


def test_batched_codec_frame_equals_each_stream_alone(model):
    """One `decode_frames` pass over streams at different frames (joining late, leaving
    early) gives each stream, bit for bit in batch-invariant mode, its own decode."""
    from chroma_agent.model.codec import StreamingMimiDecoder, decode_frames
    from chroma_agent.model.matmul import batch_invariant

    codec, k = model.codec_model, model.config.num_codebooks
    codes = torch.randint(0, 2048, (5, 9, k), generator=torch.Generator().manual_seed(0))
    spans = [(0, 9), (0, 5), (2, 9), (4, 9), (6, 8)]  # (first tick, last tick + 1) of each stream
    with torch.inference_mode(), batch_invariant():
        alone = []
        for i, (a, b) in enumerate(spans):
            decoder = StreamingMimiDecoder(codec, k)
            alone.append(torch.cat([decoder.decode_frame(codes[i: i + 1, t]) for t in range(b - a)], -1)[0])
        streams = [StreamingMimiDecoder(codec, k) for _ in spans]
        got = [[] for _ in spans]
        for tick in range(9):
            rows = [i for i, (a, b) in enumerate(spans) if a <= tick < b]
            audio = decode_frames([streams[i] for i in rows], torch.stack([codes[i, tick - spans[i][0]] for i in rows]))
            for row, i in enumerate(rows):
                got[i].append(audio[row])
    for i in range(len(spans)):
        assert torch.equal(torch.cat(got[i]), alone[i])
    with torch.inference_mode():  # the plain (oneDNN conv) form agrees to float rounding
        plain = StreamingMimiDecoder(codec, k).decode(codes[:1])[0]
    torch.testing.assert_close(plain, alone[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="codes must be"):
        decode_frames(streams[:2], codes[:3, 0])


def test_a_consumer_that_stops_reading_holds_no_one_up(model, voice):
    """Backpressure: a reply whose consumer stops reading buffers at most `max_buffered`
    frames and sits out the ticks; another conversation finishes meanwhile, and the
    stalled reply resumes where it was, with the audio it gives alone."""
    turn = dict(text="Tell me about the weather tomorrow.", max_frames=16, greedy=True)
    with ChromaEngine(model, max_conversations=2, max_buffered=3) as engine:
        expected = run_alone(engine, voice, turn)
        with engine.conversation(voice) as slow, engine.conversation(voice) as other:
            stalled = iter(slow.respond(**turn))
            events = [next(stalled)]
            while not isinstance(events[-1], AudioChunk):
                events.append(next(stalled))
            job = slow._job
            done = summary(list(other.respond(text="Hi", max_frames=12, greedy=True)))
            assert done[2] == "max_frames" and len(done[0]) == 12  # it ran on while `slow` sat out
            assert job.out.qsize() <= 3 and job.reply.index <= 1 + 3  # bounded: no frames beyond the buffer
            assert slow._job is job and job in engine._speaking
            events += list(stalled)
        assert same(summary(events), expected)


def test_a_cancelled_async_consumer_frees_its_row(engine, voice):
    """An `async for` over an engine reply, cancelled mid-reply: the reply ends at the next
    frame (its row leaves the batch) and the conversation can reply again."""
    async def main():
        with engine.conversation(voice) as conv:
            got = []

            async def consume():
                async for event in conv.respond(text="Tell me a long story.", max_frames=200, greedy=True):
                    got.append(event)
            task = asyncio.create_task(consume())
            while len(pcm(got)) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(500):
                if not engine._speaking:
                    break
                await asyncio.sleep(0.01)
            assert not engine._speaking and not conv.busy.locked()
            again = [e async for e in conv.respond(text="Hi", max_frames=3, greedy=True)]
            assert summary(again)[2] == "max_frames"
    asyncio.run(asyncio.wait_for(main(), 120))


def test_bucketed_fixed_shape_step_padded_equals_unpadded(model, voice, voice2, speech):
    """The CUDA-graph path's fixed-shape batched step (`frame_graphs=True`), run eagerly on
    the CPU: a reply alone in bucket 1 gives bit for bit the audio it gives in row 3 of a
    bucket of 4 padded with idle rows, and in a batch of others joining mid-stream; and
    the same audio (to float rounding) as the ragged step."""
    turn = dict(text="Tell me about the weather tomorrow.", max_frames=10, greedy=True)
    with ChromaEngine(model, max_conversations=8, frame_graphs=True) as engine:
        runner = engine.frame_step
        assert runner.fixed and runner.rows == 8
        assert runner.trial(8, 300).shape == (8, model.config.num_codebooks)  # calibration's step: no trace
        assert int(runner.lengths.abs().sum()) == 0 and len(runner._free) == 8
        alone = run_alone(engine, voice, turn)
        prefix = model.prefix_state(voice2)
        held = [runner.acquire(prefix, prefix.length + 40) for _ in range(3)]  # rows 0-2: idle padding
        padded = run_alone(engine, voice, turn)
        assert same(padded, alone)
        for slot in held:
            runner.release(slot)
        calls = [(voice, turn), (voice2, dict(audio=speech["question"], max_frames=8, greedy=True)),
                 (voice, dict(text="Hi", max_frames=6, greedy=True)),
                 (voice2, dict(text="Two words", max_frames=6, seed=2))]  # sampled: two options groups
        together = run_together(engine, calls, join_after=[0, 2, 4, 1])
        assert same(together[0], alone)
        for (v, t), got in list(zip(calls, together))[2:]:
            assert same(got, run_alone(engine, v, t))
        rows = [runner.acquire(prefix, prefix.length + 40) for _ in range(9)]  # more replies than rows: it grows
        assert runner.rows == 16 and sorted(rows) == list(range(9))
        for slot in rows:
            runner.release(slot)
    with ChromaEngine(model, max_conversations=2) as ragged:
        reference = run_alone(ragged, voice, turn)
    assert alone[1] == reference[1]
    np.testing.assert_allclose(np.concatenate(alone[0]), np.concatenate(reference[0]), atol=1e-5, rtol=0)


def test_livekit_worker_shares_one_engine_per_process(monkeypatch, tiny_checkpoint, voice):
    """examples/livekit_agent.py with CHROMA_ENGINE=1: every job executor's prewarm gets the
    process's one engine, and the worker's load is the engine's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "livekit_agent.py"
    spec = importlib.util.spec_from_file_location("livekit_agent_engine_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for name, value in {"CHROMA_MODEL": str(tiny_checkpoint), "CHROMA_DEVICE": "cpu", "CHROMA_ENGINE": "1",
                        "CHROMA_MAX_SESSIONS": "2", "CHROMA_AGENT_MATMUL": "linear"}.items():
        monkeypatch.setenv(name, value)
    procs = [type("Proc", (), {"userdata": {}})() for _ in range(2)]
    for proc in procs:
        example.prewarm(proc)
    engine = procs[0].userdata["model"]
    try:
        assert isinstance(engine, ChromaEngine) and procs[1].userdata["model"] is engine
        assert engine.capacity == 2 and example.load(None) == 0.0
        conv = engine.conversation(voice)
        assert example.load(None) == 0.5
        conv.close()
    finally:
        engine.close()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_replies_make_no_new_matmul_kernels(engine, voice, speech, capfd):
    """The engine makes its oneDNN matmul kernels when it starts (`warm_invariant`): prompts
    of new lengths (text, audio, a second turn) then make none. Each new kernel is cached
    for good (~0.5 MB), so a server that made them per prompt length grew call after call."""
    run_alone(engine, voice, dict(text="Hi", max_frames=2, greedy=True))   # the engine is started and warm
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        with engine.conversation(voice) as conv:
            for turn in (dict(text="What time does the store open on Saturday, and what about on Sunday?"),
                         dict(audio=speech["question"]), dict(text="Thanks, bye.")):
                summary(list(conv.respond(**turn, max_frames=3, greedy=True)))
    log = capfd.readouterr().out
    assert "inner_product" in log   # the log is on: it lists the kernels the replies ran
    assert [line for line in log.splitlines() if "cache_miss" in line and "inner_product" in line] == []
