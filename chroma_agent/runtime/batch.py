"""Batched steps over ragged sequences, for the engine: many conversations' rows in one
matmul, each sequence attending over its own KV cache at its own positions.

The rows of all sequences are stacked into one [1, N, hidden] tensor; projections, norms
and MLPs run on all N rows at once, and attention runs sequence by sequence (`attend`)
over that sequence's cache length only, so no padding and no position drift. Run inside
`batch_invariant()` (transformer.py), every row then gets exactly the bits it gets when
its sequence runs alone: attention is per sequence by construction, norms are row-wise,
and the projections use a kernel whose rows do not depend on the row count.

The decoder pass needs no raggedness (every frame's decoder sees the same 8 positions),
so `FrameStep` (frame_step.py) batches it through `ChromaWeights.decode_frame` as it is.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..model.sampling import long_tensor
from ..model.transformer import KVCache, LayerStep, rms, attend, attention_mask, mlp_block, rms_norm, rope_tables


@dataclass
class Ragged:
    """One sequence of a ragged batch: its `rows` new positions, appended to `cache`."""

    cache: KVCache
    rope: tuple[torch.Tensor, torch.Tensor]  # `rope_tables` of its new positions
    rows: int


def ragged_blocks(layers: nn.ModuleList, blocks: list[tuple[int, str]], x: torch.Tensor,
                  seqs: list[Ragged]) -> torch.Tensor:
    """Run `blocks` ((layer, "attention" | "mlp"), in order) of pre-norm `layers` over the
    stacked rows `x` [1, N, hidden] of `seqs`. Cache lengths are left to the caller (a
    step may stop half-way through its blocks)."""
    for k, kind in blocks:
        step = LayerStep.of(layers[k])
        if kind == "mlp":
            x = mlp_block(step, x)
            continue
        qkv = step.qkv(rms(x, *step.norm1))
        outs, start = [], 0
        for seq in seqs:
            mask, causal = attention_mask(seq.rows, seq.cache.length, x.device)
            outs.append(attend(step, k, qkv[:, start: start + seq.rows], seq.cache, seq.rope, mask, causal))
            start += seq.rows
        x = x + step.o(torch.cat(outs, dim=1))
    return x


def all_blocks(layers: nn.ModuleList) -> list[tuple[int, str]]:
    return [(k, kind) for k in range(len(layers)) for kind in ("attention", "mlp")]


def backbone_step(model, inputs: list[torch.Tensor], caches: list[KVCache]) -> torch.Tensor:
    """One backbone step of several sequences: `inputs[i]` [1, n_i, hidden] appended to
    `caches[i]` at its own positions. Returns each sequence's last final-norm hidden
    state, [batch, hidden] (what starts its decoder pass)."""
    stack = model.backbone.model
    x = torch.cat(inputs, dim=1)
    positions = []
    for seq_x, cache in zip(inputs, caches):
        n = seq_x.shape[1]
        if cache.length + n > cache.capacity:
            raise RuntimeError(f"the reply outgrew its backbone cache of {cache.capacity} positions")
        positions += range(cache.length, cache.length + n)
    cos, sin = stack.rope(long_tensor(positions, x.device), x)  # all rows' tables at once
    seqs, start = [], 0
    for seq_x, cache in zip(inputs, caches):
        n = seq_x.shape[1]
        seqs.append(Ragged(cache, (cos[:, :, start: start + n], sin[:, :, start: start + n]), n))
        start += n
    x = ragged_blocks(stack.layers, all_blocks(stack.layers), x, seqs)
    for seq in seqs:
        seq.cache.length += seq.rows
    return rms_norm(stack.norm, x[0, _last_rows(seqs, x.device)])


@dataclass
class ReasonerRows:
    """A batched reasoner step's results, a row per reasoner: `h` [rows, hidden] (final-norm
    hidden states), `tokens` (each one's next token) and `embedded` [rows, hidden] (T(token))."""

    h: torch.Tensor
    tokens: list[int]
    embedded: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def join(parts: list["ReasonerRows"]) -> "ReasonerRows":
        """Several batches' rows as one batch, in order."""
        return ReasonerRows(torch.cat([p.h for p in parts]), [t for p in parts for t in p.tokens],
                            torch.cat([p.embedded for p in parts]))


class ReasonerSteps:
    """Batched greedy reasoner steps of several conversations, in two halves as
    `Reasoner.step_in_halves` runs them (half of the weights after each of two frames):
    `first` embeds each token and runs the blocks before the half-way point, `second` the
    rest and the head. Between the halves each step's rows wait in `x` [1, 1, hidden]."""

    def __init__(self, reasoner):
        lm = reasoner.lm
        self.layers, self.norm, self.head = lm.layers, lm.norm, reasoner.head
        self.embed, self.rotary = lm.embed_tokens, lm.rotary_emb
        self.halves = reasoner.halves()

    def _seqs(self, reasoners, x: torch.Tensor) -> list[Ragged]:
        """Each reasoner's one new position (the same on all three mRoPE axes), its RoPE
        tables sliced from one rotary call over all of them."""
        opened = [r.open_step() for r in reasoners]
        positions = long_tensor([position for _, position in opened], x.device)
        cos, sin = rope_tables(*self.rotary(x, positions.view(1, 1, -1).expand(3, 1, -1)))
        return [Ragged(cache, (cos[:, :, i: i + 1], sin[:, :, i: i + 1]), 1) for i, (cache, _) in enumerate(opened)]

    def first(self, reasoners: list, tokens: list[int]) -> list[torch.Tensor]:
        x = self.embed(long_tensor(tokens, self.head.weight.device)[None])  # [1, batch, hidden]
        x = ragged_blocks(self.layers, self.halves[0], x, self._seqs(reasoners, x))
        return list(x.split(1, dim=1))

    def second(self, reasoners: list, xs: list[torch.Tensor]) -> "ReasonerRows":
        """The rows' final-norm hidden states h, their next tokens t (each reasoner moved past
        its step) and T(t), the tokens embedded for all rows at once (what a reply's next
        backbone step appends after h)."""
        x = torch.cat(xs, dim=1)
        x = ragged_blocks(self.layers, self.halves[1], x, self._seqs(reasoners, x))
        h = rms_norm(self.norm, x)[0]  # [batch, hidden]
        ids = self.head(h).argmax(dim=-1).tolist()
        tokens = [reasoner.close_step(i) for reasoner, i in zip(reasoners, ids)]
        return ReasonerRows(h, tokens, self.embed(long_tensor(tokens, h.device)))

    def prefill(self, reasoners: list, embeds: list[torch.Tensor], positions: list[torch.Tensor]) -> list[int]:
        """One batched prefill step of several reasoners (caller transcripts): `embeds[i]`
        [1, n_i, hidden] at 3-D `positions[i]` [3, 1, n_i] appended to reasoner i's cache.
        Returns each one's argmax after its last row (its next token, once its prompt is all in)."""
        x = torch.cat(embeds, dim=1)
        seqs = []
        for reasoner, e, p in zip(reasoners, embeds, positions):
            seqs.append(Ragged(reasoner.open_rows(e.shape[1]), rope_tables(*self.rotary(e, p)), e.shape[1]))
        x = ragged_blocks(self.layers, all_blocks(self.layers), x, seqs)
        for reasoner, seq, p in zip(reasoners, seqs, positions):
            reasoner.close_rows(seq.rows, int(p.max()) + 1)
        return self.head(rms_norm(self.norm, x[0, _last_rows(seqs, x.device)])).argmax(dim=-1).tolist()


def _last_rows(seqs: list[Ragged], device) -> torch.Tensor:
    """The index of each sequence's last row in the stacked rows (running sums: O(sequences))."""
    return long_tensor(list(itertools.accumulate((s.rows for s in seqs), initial=-1))[1:], device)
