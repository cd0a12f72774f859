"""The backbone and the decoder: stacks of transformers' Llama layers over a static KV cache.

Neither consumes token ids (they take embeddings), so instead of `LlamaModel` (which owns
an embedding table the checkpoint does not have) we hold its parts: `LlamaDecoderLayer`s,
the final `LlamaRMSNorm` and `LlamaRotaryEmbedding`. Attention state lives in a
`KVCache` the caller owns, so one set of weights serves many conversations.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class KVCache:
    """Preallocated keys and values for one layer stack: [layers][batch, kv_heads, capacity, head_dim].

    Entries are written at explicit slots; queries see slots `<=` their own (causal by
    slot, not by RoPE position: the decoder feeds two inputs at position 0).
    Duck-types the part of transformers' `Cache` that the attention layers call.
    """

    def __init__(self, config: LlamaConfig, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0              # slots filled so far
        self._slots: torch.Tensor | None = None
        self._visible = 0

    def copy_from(self, other: "KVCache", length: int) -> None:
        """Take the first `length` slots of `other` (a shared prefix) and drop the rest."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:, :, :length].copy_(theirs[:, :, :length])
        self.length = length

    # -- the transformers Cache interface used by LlamaAttention --
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self.keys[layer_idx].index_copy_(2, self._slots, key_states)
        self.values[layer_idx].index_copy_(2, self._slots, value_states)
        return self.keys[layer_idx][:, :, :self._visible], self.values[layer_idx][:, :, :self._visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class LlamaStack(nn.Module):
    """`layers` + `norm` of a Llama decoder (the checkpoint's `<part>.model.*` tensors)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at RoPE `positions` [n], appending to `cache`.
        Returns the final-norm hidden states [batch, n, hidden]."""
        n = embeds.shape[1]
        start = cache.length
        if start + n > cache.capacity:
            raise RuntimeError(f"KV cache full: {start} + {n} positions exceed its capacity of {cache.capacity}")
        cache._slots = torch.arange(start, start + n, device=embeds.device)
        cache._visible = start + n
        if n == 1:
            mask = None  # a single query sees every filled slot
        else:
            keys = torch.arange(start + n, device=embeds.device)
            mask = (keys[None, :] <= cache._slots[:, None])[None, None]
        cos_sin = self.rotary_emb(embeds, positions[None])
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=cache)
        cache.length = start + n
        return self.norm(hidden)
