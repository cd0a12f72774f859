"""The original FlashLabs implementation's outputs, reproduced exactly through the production path."""
import json

import numpy as np
import pytest
import torch

from chroma_agent.testing.golden import run_case

from .conftest import GOLDEN

CASES = json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(model, case):
    got = run_case(model, case)
    want = case["expected"]
    assert got["prompt_audio_codes"] == want["prompt_audio_codes"]
    assert got["codes"] == want["codes"]
    assert got["thinker_tokens"] == want["thinker_tokens"]
    audio = got["audio"]
    assert len(audio) == want["decoded_audio_len"]
    np.testing.assert_allclose(audio[: len(want["decoded_audio_head"])], want["decoded_audio_head"], atol=1e-4, rtol=0)
    assert float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) == pytest.approx(want["decoded_audio_rms"], abs=1e-5)


def test_weight_edits_are_undone(model, golden_cases):
    case = next(c for c in golden_cases if c["weight_edits"])
    edit = case["weight_edits"][0]
    tensor = model.parameter_by_published_name(edit["tensor"])
    before = tensor.detach().clone()
    run_case(model, case)
    assert (tensor == before).all()


def test_user_audio_features_match_the_original(model, golden_cases):
    case = next(c for c in golden_cases if c.get("user_audio_16k"))
    audio = model.processor.load_user_audio(np.asarray(case["user_audio_16k"], np.float32), 16000)
    features, mask = model.processor.features(audio)
    assert list(features.shape) == case["thinker_input_features_shape"]
    assert float(features.sum()) == pytest.approx(case["thinker_input_features_sum"], rel=1e-5)
    assert float(features.abs().sum()) == pytest.approx(case["thinker_input_features_abs_sum"], rel=1e-5)
    from chroma_agent.model.processor import audio_token_count
    assert audio_token_count(int(mask.sum())) == case["audio_token_count"]


@pytest.mark.parametrize("case", [c for c in CASES if not c["weight_edits"]], ids=lambda c: c["name"])
def test_golden_codes_through_the_fixed_shape_frame_runner(model, case):
    """The CUDA-graph step's math (run eagerly here) reproduces the original too."""
    from chroma_agent import SamplingOptions
    from chroma_agent.runtime.frame_step import FrameStep
    from chroma_agent.model.processor import ReasonerInput

    voice = model.voice_from_audio(np.asarray(case["prompt_audio_24k"], np.float32), case["prompt_text_ids"],
                                   sample_rate=24000)
    prompt = ReasonerInput(torch.tensor([case["thinker_input_ids"]]))
    if case.get("user_audio_16k"):
        audio = model.processor.load_user_audio(np.asarray(case["user_audio_16k"], np.float32), 16000)
        prompt.input_features, prompt.feature_attention_mask = model.processor.features(audio)
    step = FrameStep(model, fixed=True)
    assert not step.graphs_enabled  # CPU: eager
    with torch.inference_mode():
        frames = model.reply_frames(voice, prompt, case["max_new_frames"], SamplingOptions(greedy=True),
                                    frame_step=step)
        assert [f.codes.tolist() for f in frames] == case["expected"]["codes"]
        assert frames.text_ids == case["expected"]["thinker_tokens"]
        sampled = [f.codes for f in model.reply_frames(voice, prompt, 8, SamplingOptions(seed=5), frame_step=step)]
        dynamic = [f.codes for f in model.reply_frames(voice, prompt, 8, SamplingOptions(seed=5))]
    assert torch.equal(torch.stack(sampled), torch.stack(dynamic))


def test_cuda_graphs_need_cuda(model):
    from chroma_agent.runtime.frame_step import FrameStep

    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        FrameStep(model, fixed=True, graphs=True)
