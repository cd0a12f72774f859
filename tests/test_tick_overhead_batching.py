"""The engine tick's batched bookkeeping (benchmarks/bench_tick_overhead.py): the next inputs
staged in one buffer (`FrameStep.stage`, read in place by the fixed step), reasoner results
applied for many replies at once, a job's frame queue, and the batch runner that joins the
rows of lone retries. Replies in different phases, sampled and held back by their readers
stay bit for bit what they are alone."""
import asyncio
import gc
import threading
import time

import numpy as np
import pytest
import torch

from chroma_agent import ChromaEngine, SamplingOptions, Voice
from chroma_agent.model.matmul import batch_invariant
from chroma_agent.model.processor import ReasonerInput
from chroma_agent.runtime.engine_jobs import END, isolated
from chroma_agent.runtime.frame_step import FrameStep
from chroma_agent.runtime.generation import Frame, ReplyFrames, apply_reasoners

FRAMES = 7


def replies(model, n: int):
    """N prompts (random ids, four lengths), two voices, and each one's sampling (greedy or seeded)."""
    g = np.random.default_rng(5)
    cfg = model.config
    vocab = min(cfg.text_start_token_id, 900)
    voices = [Voice(g.integers(0, cfg.codec_vocab, (frames, cfg.num_codebooks)), "voice",
                    tuple(g.integers(0, vocab, 7))) for frames in (9, 14)]
    return [(ReasonerInput(torch.tensor([g.integers(0, vocab, 15 + 11 * (i % 4)).tolist()])), voices[i % 2],
             SamplingOptions(greedy=True) if i % 3 else SamplingOptions(seed=i, top_k=7 + i))
            for i in range(n)]


def read(job) -> tuple[list, list]:
    """A submitted job's frames as they come (its row runs while its reader makes room)."""
    frames = []
    while (item := job.out.get(timeout=300)) is not END:
        assert not isinstance(item, BaseException), item
        frames.append(item)
        job.engine.wake()  # room again: its row steps at the next tick
    return [f.codes.tolist() for f in frames], [f.pcm for f in frames]


def run_in_groups(engine, calls, delay_s: float) -> tuple[list, dict]:
    """Three groups of the replies, each submitted once the one before speaks (and `delay_s`
    more), each reply read by its own thread, the fifth one's late: the jobs and their frames."""
    jobs, together, readers = [], {}, []
    for group in (calls[:3], calls[3:6], calls[6:]):
        for p, v, s in group:
            job = engine.reply_frames(v, p, FRAMES, s)
            late = len(jobs) == 4
            readers.append(threading.Thread(target=lambda j=job, late=late: together.__setitem__(
                j, time.sleep(0.5 * late) or read(j))))
            jobs.append(job)
            engine.submit(job)
            readers[-1].start()
        start = time.monotonic()
        while not jobs[-1].spoken and time.monotonic() - start < 120:  # this group speaks: the next joins later
            time.sleep(0.005)
        time.sleep(delay_s)
    for reader in readers:
        reader.join(300)
    return jobs, together


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fixed", [False, True], ids=["ragged", "fixed"])
def test_replies_in_different_phases_held_back_and_sampled_equal_alone(model, fixed):
    """Three groups of replies join a tick or more apart (their reasoner halves fall on different
    ticks: a tick stages h and T(t) for some of its rows only), two of every three sampled, each
    read by its own thread, one reader late (its reply sits out ticks with its next input
    staged): each reply's codes and audio are those it gives alone."""
    calls = replies(model, 9)
    with ChromaEngine(model, max_conversations=1, prefill_budget=10**9, max_buffered=2, frame_graphs=fixed) as engine:
        if fixed:
            engine.frame_step = FrameStep(model, 16, fixed=True, capacity=128)
        staged, stage = [], engine.frame_step.stage
        engine.frame_step.stage = lambda rows, start, columns: staged.append((start, len(rows))) or stage(
            rows, start, columns)
        # where the groups' phases fall depends on the ticks between their starts: a few tries
        # until some tick staged reasoner rows (start 1) for fewer rows than its frames (start 0)
        for attempt in range(4):
            staged.clear()
            jobs, together = run_in_groups(engine, calls, delay_s=0.02 * attempt)
            if any(s == 1 and staged[i - 1][0] == 0 and n < staged[i - 1][1] for i, (s, n) in enumerate(staged) if i):
                break
        else:
            pytest.fail("no tick mixed the replies' phases in 4 tries")
        for (p, v, s), job in zip(calls, jobs):
            mine, alone = together[job], read(engine.submit(job := engine.reply_frames(v, p, FRAMES, s)) or job)
            assert mine[0] == alone[0] and all(np.array_equal(a, b) for a, b in zip(mine[1], alone[1]))
            with torch.inference_mode(), batch_invariant():  # and the reply's own iterator, outside any engine
                lone = model.reply_frames(v, p, FRAMES, s, prefix=model.prefix_state(v))
                assert mine[0] == [f.codes.tolist() for f in lone]
            assert len(mine[0]) == FRAMES


def test_the_frame_queue_says_a_frame_is_ready_only_when_one_is_next(model, voice):
    with ChromaEngine(model, max_conversations=1, max_buffered=2) as engine:
        job = engine.reply_frames(voice, ReasonerInput(torch.tensor([[1, 2, 3]])), 3)   # never submitted
        frame = Frame(0, torch.zeros(8, dtype=torch.long))
        assert not job.frame_ready() and job.runnable
        job.deliver(frame)
        job.deliver(frame)
        assert job.frame_ready() and not job.runnable   # two unread: its row sits out
        assert job.out.get() is frame and job.frame_ready() and job.runnable
        job.deliver(RuntimeError("failed"))
        job.deliver(END)
        assert job.frame_ready() and job.out.get() is frame
        assert not job.frame_ready() and job.out.qsize() == 2   # a failure, then the end: not frames
        assert isinstance(job.out.get(), RuntimeError) and not job.frame_ready()
        asyncio.run(asyncio.wait_for(job.until_item(), 5))   # END queued: nothing to wait for
        assert job.out.get() is END and not job.frame_ready()


def test_the_batch_runner_joins_the_rows_of_the_jobs_that_run_alone():
    failed = []

    def run(jobs):  # a row per job; "b" breaks any batch it is in
        if "b" in jobs:
            raise ValueError("b")
        return torch.tensor([[ord(j)] for j in jobs])

    kept, rows = isolated(["a", "b", "c"], run, lambda job, e: failed.append(job), torch.cat)
    assert kept == ["a", "c"] and rows.tolist() == [[97], [99]] and failed == ["b"]
    assert isolated(["a", "c"], run, None, torch.cat)[1].tolist() == [[97], [99]]
    assert isolated(["b"], run, lambda job, e: failed.append(job), torch.cat) == ([], []) and failed == ["b", "b"]


@pytest.mark.parametrize("fixed", [False, True], ids=["ragged", "fixed"])
def test_staged_reasoner_rows_give_the_inputs_a_reply_joins_alone(model, voice, fixed):
    """`apply_reasoners` with each reply's frame embedding, h and T(t) staged side by side gives
    the next input `apply_reasoner` gives one reply at a time (a reply whose pending input is not
    staged falls back to that); the fixed step reads staged inputs in place, to the same codes."""
    cfg, hidden = model.config, model.config.backbone.hidden_size
    g = torch.Generator().manual_seed(3)
    frames, h = torch.randn(3, hidden, generator=g), torch.randn(3, hidden, generator=g)
    tokens = [5, 9, cfg.im_end_token_id]
    made = [ReplyFrames(model, voice, ReasonerInput(torch.tensor([[1, 2]])), 4, SamplingOptions(greedy=True),
                        prefix=model.prefix_state(voice)) for _ in range(6)]
    step = FrameStep(model, 3, fixed=fixed)
    rows = [step.acquire(model.prefix_state(voice), 40) for _ in range(3)]
    for reply, x in zip(made[:3], step.stage(rows, 0, [frames])):
        reply.pending = [x]
    for reply, x in zip(made[3:], frames[:, None, None].unbind(0)):
        reply.pending = [x.clone()]
    made[2].pending = [frames[2, None, None].clone()]   # not where its row is staged: one at a time
    embedded = model.embed_text(tokens)[0]
    apply_reasoners(made[:3], h, tokens, embedded, step.stage(rows, 1, [h, embedded]))
    for i, (t, reply) in enumerate(zip(tokens, made[3:])):
        reply.apply_reasoner(h[i: i + 1], t)
    for staged, alone in zip(made[:3], made[3:]):
        assert torch.equal(staged.next_input(), alone.next_input()) and staged.next_input().shape[1] == 3
        assert (staged.token, staged.fed, staged.reasoner_done) == (alone.token, alone.fed, alone.reasoner_done)
    assert made[2].reasoner_done and len(made[2].pending) == 2 and len(made[0].pending) == 1
    with torch.inference_mode(), batch_invariant():
        samplers = [r.plan().sampler for r in made[:3]]
        codes = step.step(rows, [r.next_input() for r in made[:3]], samplers)
        other = FrameStep(model, 3, fixed=fixed)
        again = [other.acquire(model.prefix_state(voice), 40) for _ in range(3)]
        assert torch.equal(codes, other.step(again, [r.next_input().clone() for r in made[3:]], samplers))


def test_a_running_engine_keeps_the_loaded_model_out_of_garbage_collections(model):
    """Once started the engine freezes the objects alive (a full collection over a loaded model
    takes ~200 ms: a stalled tick) and collects the youngest generation less often; when the
    last engine stops both are as they were."""
    before = gc.get_threshold()
    with ChromaEngine(model, max_conversations=1) as engine:
        start = time.monotonic()
        while not gc.get_freeze_count() and time.monotonic() - start < 60:
            time.sleep(0.01)
        assert gc.get_freeze_count() > 0 and engine._thread.is_alive()
        assert gc.get_threshold()[0] >= 10_000 and gc.get_threshold()[1:] == before[1:]
        gc.collect()
        assert gc.get_freeze_count() > 0   # a collection leaves them frozen
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
