"""StreamingMimiDecoder must reproduce transformers' full-sequence `MimiModel.decode` exactly,
one 1920-sample chunk per frame, on a tiny random Mimi built from the tiny Chroma config."""
import json
import math

import pytest
import torch
from transformers import MimiConfig, MimiModel

from chroma_agent.model import codec as streaming
from chroma_agent.model.codec import StreamingMimiDecoder
from chroma_agent.testing.tiny_checkpoint import CONFIG
FRAME = 1920
ATOL = 1e-4


def make_codec(**overrides) -> MimiModel:
    """A tiny Mimi with deterministic random weights that make every part of the decoder matter.

    transformers' init leaves the codebooks at zero (every code decodes to the same latent,
    so the transformer would see a constant input and no test could tell frames apart); we
    fill them with random centroids. Conv/linear weights are uniform with variance 1/fan_in,
    so the audio stays O(1), and the layer scales are 1.0 rather than 0.01 so that attention
    matters: an off-by-one sliding window then changes the audio by ~5e-3, far above ATOL.
    """
    raw = json.loads(CONFIG.read_text())["codec_config"]
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    raw.update(overrides)
    torch.manual_seed(0)
    codec = MimiModel(MimiConfig(**raw)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in list(codec.named_parameters()) + list(codec.named_buffers()):
            u = torch.rand(tensor.shape, generator=gen) * 2 - 1
            if name.endswith("codebook.embed_sum"):
                tensor.copy_(u)
            elif name.endswith("codebook.cluster_usage"):
                tensor.copy_(1.0 + 0.5 * u)
            elif not isinstance(tensor, torch.nn.Parameter):
                continue  # other buffers: RoPE frequencies, conv geometry
            elif name.endswith("layer_scale.scale"):
                tensor.fill_(1.0)
            elif tensor.dim() >= 2:
                tensor.copy_(u * math.sqrt(3.0 / tensor[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * u)
            else:
                tensor.copy_(0.02 * u)
    return codec


def random_codes(batch: int, frames: int, num_codebooks: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, frames, num_codebooks), generator=torch.Generator().manual_seed(seed))


def full_decode(codec: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    """transformers' reference: the whole sequence at once. codes [B, T, K] -> [B, T * 1920]."""
    with torch.no_grad():
        return codec.decode(codes.transpose(1, 2)).audio_values[:, 0]


def stream(decoder: StreamingMimiDecoder, codes: torch.Tensor) -> torch.Tensor:
    chunks = [decoder.decode_frame(codes[:, t]) for t in range(codes.shape[1])]
    for chunk in chunks:  # each frame's samples exist the moment its codes do
        assert chunk.shape == (codes.shape[0], FRAME) and chunk.dtype == torch.float32
    return torch.cat(chunks, dim=-1)


@pytest.fixture(scope="module")
def codec() -> MimiModel:
    return make_codec()


def test_frame_by_frame_equals_full_decode(codec):
    codes = random_codes(batch=2, frames=20)
    reference = full_decode(codec, codes)
    assert reference.abs().max() > 0.1  # a real signal, not silence

    streamed = stream(StreamingMimiDecoder(codec, num_codebooks=8), codes)
    diff = (streamed - reference).abs().max().item()
    print(f"max |stream - full| over 20 frames, batch 2: {diff:.3g}")
    assert diff < ATOL

    # Why this module exists: transformers' own per-frame decode keeps no conv state.
    with torch.no_grad():
        naive = torch.cat([codec.decode(codes[:, t:t + 1].transpose(1, 2)).audio_values[:, 0]
                           for t in range(codes.shape[1])], dim=-1)
    assert (naive - reference).abs().max() > 100 * ATOL


def test_stream_longer_than_sliding_window(codec):
    # 140 frames = 280 transformer positions > sliding_window (250): the window is active,
    # and the KV ring (252 slots) wraps around.
    assert codec.config.sliding_window == 250
    codes = random_codes(batch=1, frames=140, seed=2)
    reference = full_decode(codec, codes)
    decoder = StreamingMimiDecoder(codec, num_codebooks=8)
    diff = (decoder.decode(codes) - reference).abs().max().item()
    print(f"max |stream - full| over 140 frames: {diff:.3g}")
    assert diff < ATOL
    assert decoder.frames_decoded == 140

    # The test can see a wrong window: the full decode with window 251 differs well above ATOL.
    assert (full_decode(make_codec(sliding_window=251), codes) - reference).abs().max() > 10 * ATOL


def test_rope_tables_across_blocks(codec, monkeypatch):
    # RoPE tables are computed a block of frames at a time: crossing blocks changes nothing.
    monkeypatch.setattr(streaming, "_ROPE_BLOCK", 3)
    codes = random_codes(batch=1, frames=10, seed=9)
    assert (stream(StreamingMimiDecoder(codec, 8), codes) - full_decode(codec, codes)).abs().max() < ATOL


def test_weight_edits_show_after_forget_derived():
    codec = make_codec()
    codes = random_codes(batch=1, frames=4, seed=10)
    stream(StreamingMimiDecoder(codec, 8), codes)  # derives tables, taps and fused q/k/v
    with torch.no_grad():  # edit a weight of each derived kind in place
        codec.decoder.upsample.conv.weight.mul_(-1.5)
        codec.decoder.decoder_transformer.layers[0].self_attn.k_proj.weight.mul_(2.0)
        codec.quantizer.acoustic_residual_vector_quantizer.output_proj.weight.mul_(0.5)
    reference = full_decode(codec, codes)
    assert (stream(StreamingMimiDecoder(codec, 8), codes) - reference).abs().max() > 100 * ATOL  # stale
    streaming.forget_derived(codec)
    assert (stream(StreamingMimiDecoder(codec, 8), codes) - reference).abs().max() < ATOL


@pytest.mark.parametrize("window, kv_heads, num_codebooks", [(9, 2, 8), (10, 4, 5)])
def test_small_window_gqa_and_fewer_codebooks(window, kv_heads, num_codebooks):
    # A short window wraps the KV ring many times; grouped-query attention; a codebook prefix.
    codec = make_codec(sliding_window=window, num_key_value_heads=kv_heads)
    codes = random_codes(batch=2, frames=24, num_codebooks=num_codebooks, seed=3)
    reference = full_decode(codec, codes)
    diff = (stream(StreamingMimiDecoder(codec, num_codebooks), codes) - reference).abs().max().item()
    assert diff < ATOL


def test_max_frames_bounds_the_stream(codec):
    codes = random_codes(batch=1, frames=4, seed=4)
    decoder = StreamingMimiDecoder(codec, num_codebooks=8, max_frames=3)
    assert (stream(decoder, codes[:, :3]) - full_decode(codec, codes[:, :3])).abs().max() < ATOL
    with pytest.raises(RuntimeError, match="max_frames"):
        decoder.decode_frame(codes[:, 3])


def test_reset_starts_a_fresh_stream(codec):
    first, second = random_codes(2, 6, seed=5), random_codes(1, 8, seed=6)
    decoder = StreamingMimiDecoder(codec, num_codebooks=8)
    stream(decoder, first)
    decoder.reset()
    again = stream(decoder, second)  # a new stream, even with another batch size
    fresh = stream(StreamingMimiDecoder(codec, num_codebooks=8), second)
    assert torch.equal(again, fresh)
    assert (again - full_decode(codec, second)).abs().max() < ATOL
    with pytest.raises(ValueError, match="batch size changed"):
        decoder.decode_frame(first[:, 0])


def test_shared_codec_is_not_mutated(codec):
    before = {name: t.detach().clone() for name, t in codec.state_dict(keep_vars=True).items()}
    training, grads = codec.training, {n: p.requires_grad for n, p in codec.named_parameters()}
    a, b = StreamingMimiDecoder(codec, 8), StreamingMimiDecoder(codec, 8)  # two streams share the weights
    codes = random_codes(1, 5, seed=7)
    out_a = stream(a, codes)
    stream(b, random_codes(1, 5, seed=8))
    after = codec.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert codec.training == training
    assert grads == {n: p.requires_grad for n, p in codec.named_parameters()}
    assert all(p.grad is None for p in codec.parameters())
    # Interleaving another stream did not disturb this one.
    assert (out_a - full_decode(codec, codes)).abs().max() < ATOL


def test_rejects_bad_input(codec):
    decoder = StreamingMimiDecoder(codec, num_codebooks=8)
    with pytest.raises(ValueError):
        decoder.decode_frame(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError):
        StreamingMimiDecoder(codec, num_codebooks=9)
