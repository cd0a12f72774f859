"""The original FlashLabs implementation's outputs, reproduced exactly through the production path."""
import json

import numpy as np
import pytest

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
    from chroma_agent.processor import audio_token_count
    assert audio_token_count(int(mask.sum())) == case["audio_token_count"]
