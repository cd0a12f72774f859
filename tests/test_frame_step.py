"""The one per-frame step (`FrameStep`) and the plan/apply pair a reply is run through."""
import torch

from chroma_agent import SamplingOptions
from chroma_agent.model.matmul import batch_invariant
from chroma_agent.model.processor import ReasonerInput
from chroma_agent.model.sampling import CodeSampler, RowSamplers, pick, pick_key
from chroma_agent.runtime.frame_step import FrameStep
from chroma_agent.runtime.generation import ReplyFrames


def prompt_of(golden_cases):
    return ReasonerInput(torch.tensor([golden_cases[0]["thinker_input_ids"]]))


def run_planned(model, voice, prompt, frames, step, sampling):
    """A reply driven by hand through plan -> FrameStep -> apply (what the engine does)."""
    reply = ReplyFrames(model, voice, prompt, frames, sampling, prefix=model.prefix_state(voice))
    for _ in reply.prefill(4):
        pass
    needs = reply.row_plan()
    row = step.acquire(needs.prefix, needs.positions)
    codes, pending = [], None
    while reply.stop_reason is None:
        plan = reply.plan()
        frame = reply.apply(step.step([row], [plan.inputs], [plan.sampler]))
        if frame is None:
            break
        codes.append(frame.codes)
        due = reply.reasoner_plan()
        if due is not None and due.half == "first":
            pending = due.reasoner.step_in_halves(due.token)
            next(pending)
        elif due is not None:
            try:
                next(pending)
            except StopIteration as done:
                reply.apply_reasoner(*done.value)
    step.release(row)
    return torch.stack(codes), reply.text_ids


def test_planned_reply_equals_the_iterator_on_both_steps(model, voice, golden_cases):
    """Bit for bit under `batch_invariant()`, as the engine runs: outside it a projection may
    take another path for the step's padded rows than for the iterator's (sampled codes then
    part at a near tie)."""
    prompt = prompt_of(golden_cases)
    with torch.inference_mode(), batch_invariant():
        alone = [f.codes for f in model.reply_frames(voice, prompt, 6, SamplingOptions(seed=3),
                                                     prefix=model.prefix_state(voice))]
        for fixed in (False, True):
            codes, _ = run_planned(model, voice, prompt, 6, FrameStep(model, fixed=fixed), SamplingOptions(seed=3))
            assert torch.equal(codes, torch.stack(alone))


def test_ragged_rows_batched_equal_alone(model, voice):
    """Two rows at different lengths with different samplers: each row's codes are the ones
    it gets alone (batch invariance)."""
    cfg, prefix = model.config, model.prefix_state(voice)
    hidden = cfg.backbone.hidden_size
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 2, hidden, generator=gen), torch.randn(1, 3, hidden, generator=gen)]
    options = [SamplingOptions(greedy=True), SamplingOptions(seed=1)]

    def run(rows):
        step = FrameStep(model, fixed=False)
        slots = [step.acquire(prefix, prefix.length + 10) for _ in rows]
        samplers = [CodeSampler(options[i], cfg.codec_vocab, model.device) for i in rows]
        for s in samplers:
            s.new_frame()
        return step.step(slots, [xs[i] for i in rows], samplers)

    with torch.inference_mode(), batch_invariant():
        both = run([0, 1])
        assert torch.equal(both[0], run([0])[0]) and torch.equal(both[1], run([1])[0])


def test_row_samplers_pick_each_row_as_its_own_sampler(model):
    cfg = model.config
    logits = torch.randn(3, cfg.codec_vocab + 3, generator=torch.Generator().manual_seed(2))
    samplers = [CodeSampler(o, cfg.codec_vocab, model.device) for o in
                (SamplingOptions(seed=1), SamplingOptions(greedy=True), SamplingOptions(seed=2, top_k=5))]
    for s in samplers:
        s.new_frame()
    rows = RowSamplers(tuple(dict.fromkeys(pick_key(s) for s in samplers)), 3, cfg.num_codebooks, model.device)
    rows.load([0, 1, 2], samplers)
    got = rows(logits, 4)
    for i, s in enumerate(samplers):
        assert int(got[i]) == int(s(logits[i: i + 1], 4)[0])
    assert int(pick(logits[1:2], cfg.codec_vocab, 0, 1.0, None)[0]) == int(logits[1, :cfg.codec_vocab].argmax())
