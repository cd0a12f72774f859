"""The backbone and the decoder: stacks of transformers' Llama layers over a static KV cache.

Neither consumes token ids (they take embeddings), so instead of `LlamaModel` (which owns
an embedding table the checkpoint does not have) we hold its parts: `LlamaDecoderLayer`s,
the final `LlamaRMSNorm` and `LlamaRotaryEmbedding`. The step runs them gpt-fast style:
the layers' own weights and norms, a hand-written attention over a preallocated
`KVCache` that the caller owns (so one set of weights serves many conversations), and no
per-call mask or cache objects. `reference_forward` runs the same step through
transformers' own layer forward; tests hold the two equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .matmul import Projection


class KVCache:
    """Preallocated keys and values for one layer stack: [layers][batch, kv_heads, capacity, head_dim].

    Entries are appended at slots `length, length + 1, ...`; a query sees the slots up to
    its own (causal by slot, not by RoPE position: the decoder feeds two inputs at
    position 0). `update` duck-types transformers' `Cache` for `reference_forward`.
    """

    def __init__(self, config, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0  # slots filled so far
        self._n = 0      # slots being written by the running forward

    def reserve(self, needed: int) -> None:
        """Grow (doubling) so that `needed` slots fit; for caches whose length is open-ended."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                store[i] = new
        self.capacity = capacity

    def copy_from(self, other: "KVCache", length: int) -> None:
        """Take the first `length` slots of `other` (a shared prefix) and drop the rest."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:, :, :length].copy_(theirs[:, :, :length])
        self.length = length

    def first_rows(self, rows: int) -> "KVCache":
        """A view of batch rows 0..rows-1: same storage (writes land here), same capacity."""
        view = KVCache.__new__(KVCache)
        view.keys, view.values = [k[:rows] for k in self.keys], [v[:rows] for v in self.values]
        view.capacity, view.length, view._n = self.capacity, self.length, 0
        return view

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        end = self.length + self._n
        self.keys[layer_idx][:, :, self.length:end] = key_states
        self.values[layer_idx][:, :, self.length:end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2 RMSNorm forward (see `rms`)."""
    return rms(x, norm.weight, norm.variance_epsilon)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused op: float32 statistics and the weight applied in the input's
    dtype, as transformers does (equal to it in float32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input, and make
    each linear's parameters views into the result: one matmul then does the work of all
    (fewer ops per step), the parameters keep their names, and in-place edits of them show
    in the fused tensors. Returns (weight, bias)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    start = 0
    for lin in linears:
        end = start + lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


class LayerStep:
    """A Llama or Qwen2 decoder layer's weights as the step reads them, gathered once:
    fused q/k/v and gate/up (`fuse_linears`), a `Projection` per matmul, the norms' weights
    and the attention's constants. A step then does no module or attribute lookups.
    Build again after the layer's parameters are replaced (moved or cast)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Projection(*fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = Projection(attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = Projection(*fuse_linears(mlp.gate_proj, mlp.up_proj))
        self.down = Projection(mlp.down_proj.weight, mlp.down_proj.bias)
        # the activation module's own forward, without the module call (silu: F.silu)
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.scaling = attn.scaling

    @staticmethod
    def of(layer: nn.Module) -> "LayerStep":
        """The layer's step weights (built on first use)."""
        step = layer.__dict__.get("step")
        if step is None:
            step = layer.__dict__["step"] = LayerStep(layer)
        return step

    def projections(self) -> tuple[Projection, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    @staticmethod
    def rebuild(layer: nn.Module) -> None:
        layer.__dict__["step"] = LayerStep(layer)


def attention_mask(n: int, start: int, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for n new queries after `start` filled slots: one query sees every
    filled slot; a block of queries is causal among itself."""
    if n == 1:
        return None, False
    if start == 0:
        return None, True
    return torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start), False


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RoPE tables [batch, n, head_dim] made ready for `apply_rope`: a heads
    axis, and rotate_half's sign folded into sin (so a rotation is a roll, not a cat)."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the same arithmetic in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention_block(step: LayerStep, index: int, x: torch.Tensor, cache: KVCache,
                    rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, causal: bool,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
    """x + self-attention of one pre-norm layer, writing its keys/values at slots
    `cache.length ...` (the caller advances `cache.length` once all layers ran). `rope`:
    tables from `rope_tables`.

    With `slots` (a device tensor of slot indices, [n] or one row per batch row [batch, n])
    the shapes are fixed instead: keys and values are written at `slots`, and attention
    reads the whole cache under `mask` ([n, capacity], or [batch, 1, n, capacity]).
    Nothing then depends on host-side lengths (CUDA-graph safe)."""
    heads = step.qkv(rms(x, *step.norm1))
    return x + step.o(attend(step, index, heads, cache, rope, mask, causal, slots))


def attend(step: LayerStep, index: int, qkv: torch.Tensor, cache: KVCache,
           rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, causal: bool,
           slots: torch.Tensor | None = None) -> torch.Tensor:
    """The one attention of the backbone, the decoder and the reasoner (the middle of
    `attention_block`): projected q/k/v rows `qkv` [batch, n, (heads + 2 kv_heads) *
    head_dim] -> RoPE, keys/values into layer `index` of `cache`, attention; returns
    [batch, n, heads * head_dim] for the output projection. Separate so that a batch of
    ragged sequences can share the projections and attend one by one."""
    batch, n, _ = qkv.shape
    keys, values = cache.keys[index], cache.values[index]
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    heads = qkv.view(batch, n, -1, head_dim).transpose(1, 2)
    qk = apply_rope(heads[:, : -kv_heads], *rope)  # [batch, q + k heads, n, head_dim]: both at once
    q, k, v = qk[:, : -kv_heads], qk[:, -kv_heads:], heads[:, -kv_heads:]
    if slots is None:
        end = cache.length + n
        keys.narrow(2, cache.length, n).copy_(k)
        values.narrow(2, cache.length, n).copy_(v)
        keys, values = keys[:, :, :end], values[:, :, :end]
    elif slots.dim() == 1:
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
    else:  # each batch row at its own slots
        rows = torch.arange(batch, device=slots.device)[:, None].expand(batch, n)
        keys.transpose(1, 2).index_put_((rows, slots), k.transpose(1, 2))
        values.transpose(1, 2).index_put_((rows, slots), v.transpose(1, 2))
    if qkv.device.type == "cpu" and n <= 8 and not causal and keys.shape[2] >= 128:
        o = attend_few(q, keys, values, mask, step.scaling)
    elif mask is not None and mask.dim() == 4:
        o = attend_grouped(q, keys, values, mask, step.scaling)
    else:
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=step.scaling,
                                           enable_gqa=True)
    return o.transpose(1, 2).reshape(batch, n, -1)


def attend_grouped(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """SDPA with a mask per batch row [batch, 1, n, L]: the query heads sharing a key/value
    head as rows of one head, so no GQA expansion of the cache (SDPA's fused kernels take
    the mask then)."""
    batch, heads, n, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    o = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, group * n, dim), keys, values,
                                       attn_mask=mask.repeat(1, 1, group, 1), scale=scale)
    return o.view(batch, heads, n, dim)


def attend_few(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """SDPA for a few queries over a long cache on the CPU: the query heads that share a
    key/value head are stacked as rows, so it is two matmuls over the cache (faster than
    the CPU flash kernel over a long cache, slower over a short one: `attend` uses it from
    128 keys on).
    q [batch, heads, n, dim]; keys/values [batch, kv_heads, L, dim]; `mask` [n, L] or None
    (every key visible), or [batch, n, L] / [batch, 1, n, L] (a mask per row)."""
    batch, heads, n, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scores = (q.reshape(batch, kv_heads, group * n, dim) @ keys.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dim() == 4:
            mask = mask[:, 0]
        mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, group, 1)[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(values.dtype)
    return (weights @ values).view(batch, heads, n, dim)


def mlp_block(step: LayerStep, x: torch.Tensor) -> torch.Tensor:
    """x + the gated MLP of one pre-norm layer."""
    gate, up = step.gate_up(rms(x, *step.norm2)).chunk(2, dim=-1)
    return x + step.down(step.act(gate) * up)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, cache: KVCache,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pre-norm decoder layers (Llama's, or Qwen2's, which add q/k/v biases) over `x`
    [batch, n, hidden], appending n slots to `cache`; returns the last layer's output
    (before any final norm). `rope`: the positions' tables from `rope_tables`."""
    mask, causal = attention_mask(x.shape[1], cache.length, x.device)
    for i, layer in enumerate(layers):
        step = LayerStep.of(layer)
        x = mlp_block(step, attention_block(step, i, x, cache, rope, mask, causal))
    cache.length += x.shape[1]
    return x


class LlamaStack(nn.Module):
    """`layers` + `norm` of a Llama decoder (the checkpoint's `<part>.model.*` tensors)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def _check(self, cache: KVCache, n: int) -> None:
        if cache.length + n > cache.capacity:
            raise RuntimeError(f"KV cache full: {cache.length} + {n} positions exceed its capacity of {cache.capacity}")

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (`rope_tables`) for `positions` [n], from transformers' rotary embedding."""
        return rope_tables(*self.rotary_emb(like, positions[None]))

    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at RoPE `positions` [n], appending to `cache`.
        Returns the final-norm hidden states [batch, n, hidden]. `rope`: precomputed
        `self.rope(positions)` for callers that reuse the same positions every frame."""
        self._check(cache, embeds.shape[1])
        x = run_layers(self.layers, embeds, cache, rope if rope is not None else self.rope(positions, embeds))
        return rms_norm(self.norm, x)

    def forward_static(self, embeds: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """`forward` with fixed shapes: final-norm `run_static`. For CUDA graphs; equal to
        `forward` (tests run it eagerly on the CPU)."""
        return rms_norm(self.norm, self.run_static(embeds, cache, slots))

    def run_static(self, embeds: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """The layers with fixed shapes, before the final norm: `embeds` [batch, n, hidden]
        go to the device-side `slots` ([n], or [batch, n]: each row at its own), which are
        also their RoPE positions, and attend over the whole cache, masked to slots <= their
        own. `cache.length` is left to the caller."""
        if slots.dim() == 1:
            rope = self.rope(slots, embeds)
            mask = torch.arange(cache.capacity, device=slots.device)[None, :] <= slots[:, None]
        else:
            rope = rope_tables(*self.rotary_emb(embeds, slots))
            mask = (torch.arange(cache.capacity, device=slots.device) <= slots[:, :, None])[:, None]
        x = embeds
        for i, layer in enumerate(self.layers):
            step = LayerStep.of(layer)
            x = mlp_block(step, attention_block(step, i, x, cache, rope, mask, False, slots))
        return x

    def reference_forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """The same step through transformers' own `LlamaDecoderLayer.forward` (for tests)."""
        n = embeds.shape[1]
        self._check(cache, n)
        start = cache.length
        mask = None
        if n > 1:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=embeds.device).tril(start)[None, None]
        cache._n = n
        hidden = embeds
        cos_sin = self.rotary_emb(embeds, positions[None])
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=cache)
        cache.length = start + n
        return self.norm(hidden)
