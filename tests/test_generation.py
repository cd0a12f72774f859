"""The frame generator: sampling, the special ids, stopping, and the one-shot reply."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from chroma_agent import SamplingOptions
from chroma_agent.runtime.generation import CodeSampler
from chroma_agent.model.processor import ReasonerInput


def frames_of(model, voice, ids, n, sampling):
    with torch.inference_mode():
        it = model.reply_frames(voice, ReasonerInput(torch.tensor([ids])), n, sampling)
        return torch.stack([f.codes for f in it]) if n else None, it


@contextmanager
def edited(tensor, fn):
    saved = tensor.detach().clone()
    with torch.inference_mode():
        fn(tensor)
    try:
        yield
    finally:
        with torch.inference_mode():
            tensor.copy_(saved)


def test_seeded_sampling_is_repeatable_and_seed_dependent(model, voice, golden_cases):
    ids = golden_cases[0]["thinker_input_ids"]
    a, _ = frames_of(model, voice, ids, 6, SamplingOptions(seed=1))
    b, _ = frames_of(model, voice, ids, 6, SamplingOptions(seed=1))
    c, _ = frames_of(model, voice, ids, 6, SamplingOptions(seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_equals_greedy(model, voice, golden_cases):
    ids = golden_cases[0]["thinker_input_ids"]
    greedy, _ = frames_of(model, voice, ids, 4, SamplingOptions(greedy=True))
    top1, _ = frames_of(model, voice, ids, 4, SamplingOptions(top_k=1, temperature=0.5, seed=3))
    assert torch.equal(greedy, top1)


def test_sampler_draws_from_the_top_k_softmax():
    """Empirical frequencies match softmax(top-k logits / T); the rest, and the ids past
    `allowed`, never come out."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 9.0, 9.0]])  # 6 and 7 are special
    sampler = CodeSampler(SamplingOptions(top_k=4, temperature=0.7, seed=0), 6, torch.device("cpu"), codebooks=1)
    draws = 20000
    counts = torch.zeros(8)
    for _ in range(draws):
        sampler.new_frame()
        counts[sampler(logits, 0)] += 1
    expected = torch.zeros(8)
    top = torch.tensor([5, 0, 1, 2])
    expected[top] = torch.softmax(logits[0, top] / 0.7, dim=0)
    assert counts[[3, 4, 6, 7]].sum() == 0
    assert torch.allclose(counts / draws, expected, atol=0.012)


def test_heads_follow_edits_of_their_published_weights(model):
    """The code heads are stored padded for the CPU step; the checkpoint-named parameters
    are views into that storage, so in-place edits of them change the logits."""
    head0 = model.parameter_by_published_name("backbone.codebook0_head.weight")
    heads = model.parameter_by_published_name("decoder.codebook_head.weight")
    h0 = torch.randn(1, head0.shape[1], generator=torch.Generator().manual_seed(0))
    h = torch.randn(1, heads.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model.backbone.codebook0_logits(h0), model.decoder.codebook_head(h, 2)
    with edited(head0, lambda t: t[77].mul_(-3)), edited(heads, lambda t: t[2, :, 1234].mul_(-3)):
        with torch.inference_mode():
            logits0, logits2 = model.backbone.codebook0_logits(h0), model.decoder.codebook_head(h, 2)
        assert logits0.shape == (1, 2051) and logits2.shape == (1, 2051)
        torch.testing.assert_close(logits0, h0 @ head0.T)
        torch.testing.assert_close(logits2, h @ heads[2])
    assert not torch.equal(logits0[0, 77], before[0][0, 77]) and not torch.equal(logits2[0, 1234], before[1][0, 1234])
    torch.testing.assert_close(logits0[0, :77], before[0][0, :77])


def test_refresh_derived_after_editing_a_layer_weight(model, monkeypatch):
    """A few-row backbone step may read a packed copy of a big weight (oneDNN's layout);
    after an in-place edit, `refresh_derived` makes it read the edited weight."""
    from chroma_agent.model import matmul
    from chroma_agent.model.transformer import KVCache, LayerStep

    stack = model.backbone.model
    if matmul._ONEDNN_LINEAR is not None:  # the path with a packed copy, whichever path the plan chose
        monkeypatch.setattr(LayerStep.of(stack.layers[0]).qkv, "few_rows", "onednn")
    q_proj = model.parameter_by_published_name("backbone.model.layers.0.self_attn.q_proj.weight")
    x = torch.randn(1, 3, stack.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def step(reference=False):
        cache = KVCache(stack.config, 4)
        with torch.inference_mode():
            run = stack.reference_forward if reference else stack
            return run(x, cache, torch.arange(3))

    before = step()  # the 3-row step (and its packed copies) before the edit
    torch.testing.assert_close(before, step(reference=True), atol=1e-5, rtol=1e-5)
    try:
        with edited(q_proj, lambda t: t.mul_(-2)):
            model.refresh_derived()
            after = step()
            torch.testing.assert_close(after, step(reference=True), atol=1e-5, rtol=1e-5)
            assert (after - before).abs().max() > 1e-2  # the edit matters
    finally:
        model.refresh_derived()  # the session's model reads the restored weight again
    torch.testing.assert_close(step(), before)


@pytest.mark.parametrize("greedy", [True, False])
def test_special_ids_are_never_emitted(model, voice, golden_cases, greedy):
    """Make the pad id (2050) the overwhelming favourite of codebook 0 and of head 1."""
    ids = golden_cases[0]["thinker_input_ids"]
    head0 = model.backbone.codebook0_head.weight
    heads = model.decoder.codebook_head.weight

    def boost(t):
        t[2048:] = 0
        t[2050] = 50 * head0[0].sign()

    with edited(head0, boost), edited(heads, lambda t: t[0, :, 2049].mul_(1000)):
        codes, _ = frames_of(model, voice, ids, 4, SamplingOptions(greedy=greedy, seed=0))
    assert int(codes.max()) < 2048


def test_end_of_speech_frame_stops_the_reply(model, voice, golden_cases):
    """Force code 0 on codebooks 0..6: the first frame is an end frame and is not audio."""
    ids = golden_cases[0]["thinker_input_ids"]
    head0 = model.backbone.codebook0_head.weight
    heads = model.decoder.codebook_head.weight

    # all-zero heads give all-equal logits, and argmax takes the first: code 0
    with edited(head0, lambda t: t.zero_()), edited(heads, lambda t: t.zero_()):
        with torch.inference_mode():
            it = model.reply_frames(voice, ReasonerInput(torch.tensor([ids])), 10, SamplingOptions(greedy=True))
            frames = list(it)
    assert frames == [] and it.stop_reason == "eos"


def test_frame_cap_and_reasoner_schedule(model, voice, golden_cases):
    ids = golden_cases[0]["thinker_input_ids"]
    with torch.inference_mode():
        it = model.reply_frames(voice, ReasonerInput(torch.tensor([ids])), 5, SamplingOptions(greedy=True))
        frames = list(it)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4] and it.stop_reason == "max_frames"
    # a reasoner token is fed on every even step (the golden model never says im_end here)
    assert [len(f.text_ids) for f in frames] == [1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="max_frames"):
        model.reply_frames(voice, ReasonerInput(torch.tensor([ids])), 0)


def test_sampling_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingOptions(top_k=0)


def test_one_shot_reply_from_speech(model, voice, speech):
    reply = model.generate(voice, audio=speech["question"], max_frames=8, sampling=SamplingOptions(seed=0))
    assert reply.codes.shape == (8, 8)
    assert reply.audio.dtype == np.float32 and reply.audio.size == 8 * 1920
    assert np.array_equal(reply.audio, model.decode_audio(reply.codes))
    assert reply.stop_reason == "max_frames"
    assert reply.text == model.processor.decode(reply.text_ids)
    assert reply.timings["frames"] == 8


def test_user_turn_template_expands_audio(model, speech):
    proc = model.processor
    audio = proc.load_user_audio(speech["question"])
    turn = proc.user_turn(audio, text="Please answer.")
    ids = turn.input_ids[0].tolist()
    cfg = model.config.thinker
    n_audio = ids.count(cfg.audio_token_index)
    from chroma_agent.model.processor import audio_token_count
    assert n_audio == audio_token_count(int(turn.feature_attention_mask.sum()))
    start = ids.index(cfg.audio_start_token_id)
    assert ids[start + 1: start + 1 + n_audio] == [cfg.audio_token_index] * n_audio
    assert ids[start + 1 + n_audio] == cfg.audio_end_token_id
    assert proc.decode(ids).endswith("assistant\n")
