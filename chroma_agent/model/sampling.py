"""How a frame's audio codes are chosen: `SamplingOptions` (greedy, or top-k with a
temperature and a seed) and `CodeSampler`, which draws them from logits. Below the model
(whose decoder pass calls a sampler) and the reply scheduler (which owns one per reply)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


# Frames of noise a sampler draws per generator call: the calls' fixed cost, not the numbers,
# dominated at one frame's 400 (a 256-row CPU tick spent ~15 ms in them)
NOISE_FRAMES = 16


class CodeSampler:
    """Picks a frame's codes from logits [batch, vocab]; ids >= `allowed` (the specials)
    never come out.

    Sampling takes all of a frame's randomness at once (`new_frame`; drawn NOISE_FRAMES frames
    at a time) and then picks by the Gumbel-max trick: argmax(logits / T + G) with
    G ~ Gumbel(0, 1) is a draw from softmax(logits / T), here over the top k. So the per-codebook work is a few tensor ops
    with no RNG call and no host sync (CUDA-graph safe), and a seeded generator makes
    replies repeatable.
    """

    def __init__(self, options: SamplingOptions, allowed: int, device: torch.device, codebooks: int = 8):
        self.options = options
        self.allowed = allowed
        self.top_k = min(options.top_k, allowed)
        self.generator = options.generator(device)
        # the Gumbel noise of NOISE_FRAMES frames, drawn in one go (`new_frame` hands out the next frame's)
        self._block = None if options.greedy else torch.empty(NOISE_FRAMES, codebooks, 1, self.top_k, device=device)
        self._drawn = NOISE_FRAMES  # frames of the block handed out
        self.noise = None if options.greedy else self._block[0]  # this frame's [codebooks, 1, top_k]
        # what its codes' pick depends on (not its seed): samplers with one key pick together
        self.key = (allowed, True) if options.greedy else (allowed, False, self.top_k, options.temperature)

    def new_frame(self) -> None:
        """Move to the next frame's randomness (`noise`), drawing the next NOISE_FRAMES
        frames' when the block is used up."""
        if self._block is None:
            return
        if self._drawn == NOISE_FRAMES:
            self.draw()
        self.noise = self._block[self._drawn]
        self._drawn += 1

    def draw(self) -> None:
        """Draw the next NOISE_FRAMES frames' Gumbel noise from this sampler's generator:
        -log(-log U), U uniform on [0, 1) (U = 0 gives -inf: never picked)."""
        self._block.uniform_(generator=self.generator).log_().neg_().log_().neg_()
        self._drawn = 0

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
    return sampler.key


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
        if len(self.keys) == 1:  # every row picks alike: only the noise, if any, to load
            if self.noise[0] is not None:
                _load_noise(self.noise[0], rows, samplers)
            return
        groups = [0] * self.group.shape[0]
        members = [([], []) for _ in self.keys]  # per group: its rows and their samplers
        for row, sampler in zip(rows, samplers):
            g = groups[row] = self.index[sampler.key]
            members[g][0].append(row)
            members[g][1].append(sampler)
        for noise, (mine, theirs) in zip(self.noise, members):
            if noise is not None and mine:
                _load_noise(noise, mine, theirs)
        self.group.copy_(long_tensor(groups, self.group.device))

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


def _load_noise(noise: torch.Tensor, rows: list[int], samplers: list[CodeSampler]) -> None:
    """Each sampler's drawn noise [codebooks, 1, top_k] into its row of `noise` [codebooks,
    rows, top_k]: one copy for all of them."""
    drawn = torch.cat([sampler.noise for sampler in samplers], dim=1)
    if rows == list(range(len(rows))):
        noise[:, : len(rows)].copy_(drawn)
    else:
        noise[:, rows] = drawn


def long_tensor(values: list[int], device: torch.device | str) -> torch.Tensor:
    """`values` as a 1-D int64 tensor on `device`, through numpy (`torch.tensor` of a Python
    list reads it element by element: several times slower at hundreds of rows)."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)
