"""How a frame's audio codes are chosen: `SamplingOptions` (greedy, or top-k with a
temperature and a seed) and `CodeSampler`, which draws them from logits. Below the model
(whose decoder pass calls a sampler) and the reply scheduler (which owns one per reply)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """How audio codes are chosen. The reasoner always decodes greedily (as the original).

    `greedy=True` takes the argmax of every codebook (deterministic). Otherwise codes are
    drawn from the `top_k` most likely after dividing logits by `temperature`, from a
    generator seeded with `seed` (None: a fresh random seed).
    """

    greedy: bool = False
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None

    def __post_init__(self):
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}; use greedy=True for argmax")
            if self.top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator for sampled codes on `device`, seeded with `seed` (None: a fresh
        random seed); None when greedy."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


class CodeSampler:
    """Picks a frame's codes from logits [batch, vocab]; ids >= `allowed` (the specials)
    never come out.

    Sampling draws all of a frame's randomness at once (`new_frame`) and then picks by the
    Gumbel-max trick: argmax(logits / T + G) with G ~ Gumbel(0, 1) is a draw from
    softmax(logits / T), here over the top k. So the per-codebook work is a few tensor ops
    with no RNG call and no host sync (CUDA-graph safe), and a seeded generator makes
    replies repeatable.
    """

    def __init__(self, options: SamplingOptions, allowed: int, device: torch.device, codebooks: int = 8):
        self.options = options
        self.allowed = allowed
        self.top_k = min(options.top_k, allowed)
        self.generator = options.generator(device)
        self.noise = None if options.greedy else torch.empty(codebooks, 1, self.top_k, device=device)

    def new_frame(self, generator: torch.Generator | None = None) -> None:
        """Draw the randomness of the next frame's codes (from `generator`, default this
        sampler's own)."""
        if self.noise is not None:
            self.noise.exponential_(generator=generator or self.generator).log_().neg_()  # -log Exp(1): Gumbel

    def __call__(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        noise = None if self.noise is None else self.noise[codebook]
        return pick(logits, self.allowed, self.top_k, self.options.temperature, noise)


def pick(logits: torch.Tensor, allowed: int, top_k: int, temperature: float,
         noise: torch.Tensor | None) -> torch.Tensor:
    """The one code pick: the argmax of `logits[..., :allowed]` (`noise` None), or the
    Gumbel-max draw over their top k, `noise` [rows, top_k] holding each row's Gumbel draws."""
    logits = logits[..., :allowed]
    if noise is None:
        return logits.argmax(dim=-1)
    values, indices = torch.topk(logits, top_k, dim=-1, sorted=False)  # order is irrelevant to a draw
    choice = (values.float() / temperature + noise).argmax(dim=-1, keepdim=True)
    return indices.gather(-1, choice).squeeze(-1)


def pick_key(sampler: CodeSampler) -> tuple:
    """What a sampler's codes' pick depends on (not its seed): samplers with one key pick together."""
    if sampler.options.greedy:
        return (sampler.allowed, True)
    return (sampler.allowed, False, sampler.top_k, sampler.options.temperature)


class RowSamplers:
    """Each row of a batched decoder pass sampled by its own reply's `CodeSampler` (its
    options, its noise), exactly as alone; `decode_frame` calls it like one sampler.

    Static buffers (CUDA-graph safe): for each distinct pick of the batch (`pick_key`),
    every row is picked with it and each row keeps its own group's codes; all ops are
    row-wise, so a row's codes are those its own sampler gives. One object serves every
    step with the same `keys` over `rows` rows: `load` copies a step's groups and noise in."""

    def __init__(self, keys: tuple[tuple, ...], rows: int, codebooks: int, device: torch.device):
        self.keys = keys
        self.index = {key: g for g, key in enumerate(keys)}
        self.group = torch.zeros(rows, dtype=torch.long, device=device)
        self.noise = [None if key[1] else torch.zeros(codebooks, rows, key[2], device=device) for key in keys]

    def load(self, rows: list[int], samplers: list[CodeSampler]) -> None:
        """This step's rows (`rows[i]` sampled by `samplers[i]`, its frame's noise drawn already)."""
        groups = [0] * self.group.shape[0]
        for row, sampler in zip(rows, samplers):
            g = groups[row] = self.index[pick_key(sampler)]
            if self.noise[g] is not None:
                self.noise[g][:, row: row + 1].copy_(sampler.noise)
        if len(self.keys) > 1:
            self.group.copy_(torch.tensor(groups))

    def __call__(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        codes = None
        for g, (key, noise) in enumerate(zip(self.keys, self.noise)):
            allowed, greedy = key[:2]
            if greedy:
                chosen = pick(logits, allowed, 0, 1.0, None)
            else:
                chosen = pick(logits, allowed, key[2], key[3], noise[codebook])
            codes = chosen if codes is None else torch.where(self.group == g, chosen, codes)
        return codes
