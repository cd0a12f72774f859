"""Loading: single file or shards, every tensor accounted for, clear errors otherwise."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chroma_agent import CheckpointError, ChromaModel, ConfigError, SamplingOptions
from chroma_agent.model.processor import ReasonerInput


def copy_without_weights(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def greedy_codes(model, voice, ids, frames=6):
    prompt = ReasonerInput(torch.tensor([ids]))
    with torch.inference_mode():
        return torch.stack([f.codes for f in model.reply_frames(voice, prompt, frames, SamplingOptions(greedy=True))])


@pytest.fixture(scope="module")
def tensors(tiny_checkpoint):
    return load_file(str(tiny_checkpoint / "model.safetensors"))


def test_sharded_checkpoint_generates_the_same_codes(tiny_checkpoint, tmp_path, tensors, model, voice, golden_cases):
    sharded = copy_without_weights(tiny_checkpoint, tmp_path / "sharded")
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names), 3)):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = ChromaModel.from_pretrained(sharded, device="cpu")
    ids = golden_cases[0]["thinker_input_ids"]
    assert torch.equal(greedy_codes(loaded, voice, ids), greedy_codes(model, voice, ids))


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path, tensors):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    dropped = "backbone.model.layers.0.self_attn.q_proj.weight"
    save_file({n: t for n, t in tensors.items() if n != dropped}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors.*backbone.model.layers.0.self_attn.q_proj.weight"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_extra_tensor_is_named(tiny_checkpoint, tmp_path, tensors):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    save_file({**tensors, "decoder.surprise.weight": torch.zeros(3)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors.*decoder.surprise.weight"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path, tensors):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    bad = dict(tensors)
    bad["decoder.projection.weight"] = torch.zeros(4, 4)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder.projection.weight: checkpoint \(4, 4\)"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_vision_tower_is_skipped_and_lm_head_tied(model, tensors):
    assert any(n.startswith("thinker.visual.") for n in tensors)
    assert model.thinker.model.visual is None
    assert model.thinker.lm_head.weight is model.thinker.model.language_model.embed_tokens.weight
    # every published tensor that is loaded landed unchanged on its module
    for name in ["thinker.model.layers.0.mlp.up_proj.weight", "codec_model.decoder.layers.0.conv.weight",
                 "codec_model.encoder_transformer.layers.0.mlp.fc1.weight", "decoder.codebook_head.weight"]:
        assert torch.equal(model.parameter_by_published_name(name), tensors[name])


def test_no_weights_and_no_config(tiny_checkpoint, tmp_path):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="holds no weights"):
        ChromaModel.from_pretrained(d, device="cpu")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_not_a_chroma_config(tiny_checkpoint, tmp_path):
    d = copy_without_weights(tiny_checkpoint, tmp_path / "ckpt")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ChromaModel.from_pretrained(d, device="cpu")


def test_unknown_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download 'nobody/not-a-model'"):
        ChromaModel.from_pretrained("nobody/not-a-model", device="cpu", cache_dir=str(tmp_path))


def test_bad_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        ChromaModel.from_pretrained(str(tmp_path / "nope" / "deeper"), device="cpu")


def test_bfloat16_load_keeps_codec_float32(tiny_checkpoint, voice, golden_cases):
    m = ChromaModel.from_pretrained(tiny_checkpoint, device="cpu", dtype="bf16")
    assert m.dtype == torch.bfloat16
    assert m.thinker.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.codec_model.decoder.decoder_seanet.layers[0].conv.weight.dtype == torch.float32
    codes = greedy_codes(m, voice, golden_cases[0]["thinker_input_ids"], frames=3)
    assert codes.shape == (3, 8) and int(codes.max()) < 2048
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ChromaModel.from_pretrained(tiny_checkpoint, device="cpu", dtype="int8")


def test_moving_or_casting_a_loaded_model_rederives_its_tables(tiny_checkpoint, voice, golden_cases):
    """`model.to(...)` after loading packs, derives and plans again (the projected audio
    table, the RoPE tables, the Mimi codebooks' cached tables): a cast to float64 and back
    replies exactly as before, audio included."""
    m = ChromaModel.from_pretrained(tiny_checkpoint, device="cpu")
    sampling = SamplingOptions(greedy=True)
    before = m.generate(voice, text="hello there", max_frames=4, sampling=sampling)
    m.to(torch.float64)
    assert m.dtype == torch.float64 and m._projected_audio.dtype == torch.float64
    wide = m.generate(voice, text="hello there", max_frames=4, sampling=sampling)  # runs in float64 throughout
    assert wide.audio.dtype == np.float32 and wide.codes.shape[1] == 8
    m.to(torch.float32)
    after = m.generate(voice, text="hello there", max_frames=4, sampling=sampling)
    np.testing.assert_array_equal(after.codes, before.codes)
    np.testing.assert_array_equal(after.audio, before.audio)
