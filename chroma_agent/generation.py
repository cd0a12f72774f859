"""The interleaved scheduler: one backbone step per 80 ms frame, the reasoner advanced
on every other step, and the per-frame decoder pass that fills in codebooks 1..7.

`ReplyFrames` yields each frame's codes (and the reasoner tokens fed at that step) the
moment they exist, so the streaming runtime can sit on it; `ChromaModel.generate` is the
one-shot convenience built on the same iterator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import DynamicCache

from .processor import ReasonerInput
from .transformer import KVCache

if TYPE_CHECKING:
    from .model import ChromaModel
    from .voice import Voice


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


class CodeSampler:
    """Picks codes from logits [batch, vocab]; ids >= `allowed` (the specials) never come out."""

    def __init__(self, options: SamplingOptions, allowed: int, device: torch.device):
        self.options = options
        self.allowed = allowed
        self.generator = None
        if not options.greedy:
            self.generator = torch.Generator(device=device)
            if options.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(options.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., :self.allowed]
        if self.options.greedy:
            return logits.argmax(dim=-1)
        top = torch.topk(logits.float() / self.options.temperature, min(self.options.top_k, self.allowed), dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return top.indices.gather(-1, choice).squeeze(-1)


class Reasoner:
    """Greedy decoding of the Qwen2.5-Omni thinker with a KV cache owned by this object.

    Each call returns (h, t): the next token `t` and the final-norm hidden state `h`
    [1, hidden] at the position that predicted it.
    """

    def __init__(self, model: "ChromaModel"):
        self.thinker = model.thinker
        self.cache = DynamicCache(config=self.thinker.config.text_config)
        self.next_position = 0  # RoPE position of the next token (the same on all three mRoPE axes)

    def _predict(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        h = hidden[:, -1]
        return h, int(self.thinker.lm_head(h).argmax(dim=-1))

    def prefill(self, inputs: ReasonerInput) -> tuple[torch.Tensor, int]:
        device = self.thinker.lm_head.weight.device
        ids = inputs.input_ids.to(device)
        mask = torch.ones_like(ids)
        audio_lengths = None
        if inputs.feature_attention_mask is not None:
            audio_lengths = inputs.feature_attention_mask.sum(-1).to(device)
        positions, _ = self.thinker.model.get_rope_index(ids, None, None, mask, False, audio_lengths)
        positions = positions + self.next_position
        features = None
        if inputs.input_features is not None:
            features = inputs.input_features.to(device, self.thinker.lm_head.weight.dtype)
        out = self.thinker.model(
            input_ids=ids, input_features=features,
            feature_attention_mask=None if features is None else inputs.feature_attention_mask.to(device),
            position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.next_position = int(positions.max()) + 1
        return self._predict(out.last_hidden_state)

    def step(self, token: int) -> tuple[torch.Tensor, int]:
        lm = self.thinker.model.language_model
        device = self.thinker.lm_head.weight.device
        embeds = lm.embed_tokens(torch.tensor([[token]], device=device))
        # explicit 3-D positions: transformers' own decode-step positions fail with a full mask
        positions = torch.full((3, 1, 1), self.next_position, device=device, dtype=torch.long)
        out = lm(inputs_embeds=embeds, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.next_position += 1
        return self._predict(out.last_hidden_state)


@dataclass
class Frame:
    """One 80 ms frame of a reply: its codes and the reasoner tokens fed at its step."""

    index: int
    codes: torch.Tensor                   # [num_codebooks] long, on the model's device
    text_ids: list[int] = field(default_factory=list)


class ReplyFrames:
    """Iterator over the frames of one reply, in the original's exact schedule:

        step 0:  voice prefix + [h_1, T(t_1)]
        step 1:  [A(frame 0)]
        step 2:  [A(frame 1), h_2, T(t_2)]      (a reasoner pair on every even step,
        ...                                       until the pair that carries im_end)

    Stops on an end-of-speech frame (codes 0..6 all `codebook_eos_token_id`, not yielded)
    or after `max_frames`; `stop_reason` then says which.
    """

    def __init__(self, model: "ChromaModel", voice: "Voice", prompt: ReasonerInput,
                 max_frames: int, sampling: SamplingOptions):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.model = model
        self.voice = voice
        self.prompt = prompt
        self.max_frames = max_frames
        self.sampler = CodeSampler(sampling, model.config.codec_vocab, model.device)
        self.reasoner = Reasoner(model)
        self.stop_reason: str | None = None
        self.text_ids: list[int] = []

    def __iter__(self) -> Iterator[Frame]:
        m, cfg = self.model, self.model.config
        prefix = m.voice_prefix(self.voice)
        capacity = prefix.shape[1] + 2 + self.max_frames + (self.max_frames + 1) // 2 * 2
        cache = KVCache(cfg.backbone, capacity, device=m.device, dtype=m.dtype)
        h, t = self.reasoner.prefill(self.prompt)
        pending, fed = [prefix, h[:, None], m.embed_text([t])], [t]
        reasoner_done = t == cfg.im_end_token_id
        for index in range(self.max_frames):
            self.text_ids += fed
            x = torch.cat(pending, dim=1)
            positions = torch.arange(cache.length, cache.length + x.shape[1], device=m.device)
            hidden = m.backbone.model(x, cache, positions)[:, -1]
            codes = m.decode_frame(hidden, self.sampler)
            if bool((codes[0, : cfg.num_codebooks - 1] == cfg.eos_token_id).all()):
                self.stop_reason = "eos"
                return
            yield Frame(index, codes[0], fed)
            pending, fed = [m.embed_frame(codes)[:, None]], []
            if index % 2 == 1 and not reasoner_done:  # the next step is even: feed a reasoner pair
                h, t = self.reasoner.step(t)
                pending += [h[:, None], m.embed_text([t])]
                fed = [t]
                reasoner_done = t == cfg.im_end_token_id
        self.stop_reason = "max_frames"
