"""A baseline reply loop in the style of the ORIGINAL FlashLabs Chroma 1.0 implementation.

The original drives its parts through transformers' generic machinery. This module
reproduces that per-frame structure on the weights of a loaded `ChromaModel` (shared, not
copied), so the benchmark compares two loops over the very same weights and inputs:

* backbone: a stock `transformers.LlamaModel` forward per step (the full transformers
  path: output capturing, config-default merging, `create_causal_mask`, rotary
  embedding, ...) over a `DynamicCache` that grows by concatenation;
* the voice prefix is recomputed in the first backbone step of every reply (no prefix
  KV reuse across replies);
* decoder: per frame, as the original's `decoder.generate` did, a fresh `DynamicCache`
  and 7 forward calls of a stock `LlamaModel`; every input is projected with
  `decoder.projection` at that step (no precomputed projected table); RoPE positions
  [0, 0], [1], ..., [6];
* reasoner: transformers' thinker text model with a `DynamicCache`
  (`chroma_agent.runtime.generation.Reasoner`, the same greedy reasoner the runtime uses);
* the whole reply is decoded at the end with the full-sequence Mimi decode
  (`model.decode_audio`): no audio exists before the reply is complete.

It is a lower bound on the original's cost: `generate()`'s own per-step bookkeeping
(logits processors, stopping criteria objects, `prepare_inputs_for_generation`, output
dataclasses) is not reproduced, only its forward calls and cache handling.

The stock `LlamaModel`s are built on the meta device (no weights are allocated); their
`layers` and `norm` are then pointed at the `ChromaModel`'s own modules and their
`embed_tokens` dropped (the parts consume embeddings, passed as `inputs_embeds`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from chroma_agent.runtime.generation import Reasoner


def shared_llama(config, layers, norm, device) -> LlamaModel:
    """A stock `LlamaModel` for `config` whose layers and final norm are the given modules."""
    config = copy.deepcopy(config)  # LlamaModel's init may touch its config; ours stays untouched
    with torch.device("meta"):
        lm = LlamaModel(config)
    lm.layers = layers
    lm.norm = norm
    lm.embed_tokens = None
    with torch.device(device):
        lm.rotary_emb = LlamaRotaryEmbedding(config=config)
    lm.eval().requires_grad_(False)
    meta = [n for n, p in list(lm.named_parameters()) + list(lm.named_buffers()) if p.is_meta]
    if meta:
        raise RuntimeError(f"baseline LlamaModel still holds meta tensors: {meta[:5]}")
    return lm


class TopKSampler:
    """Code sampling as the original's `generate` did it: top-k after temperature, then a
    multinomial draw per codebook from a seeded generator (or greedy argmax). Ids >=
    `allowed` (the specials, which Mimi cannot decode) never come out, as in the runtime.
    In sampled mode the runtime draws its randomness differently, so the two loops' sampled
    codes differ; the work per frame does not (fixed frame count, same shapes)."""

    def __init__(self, sampling, allowed: int, device):
        self.sampling, self.allowed, self.generator = sampling, allowed, sampling.generator(device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[..., :self.allowed]
        if self.sampling.greedy:
            return logits.argmax(dim=-1)
        top = torch.topk(logits.float() / self.sampling.temperature, min(self.sampling.top_k, self.allowed), dim=-1)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return top.indices.gather(-1, choice).squeeze(-1)


@dataclass
class BaselineReply:
    codes: torch.Tensor                                  # [frames, codebooks] long
    text_ids: list[int]
    audio: object = None                                 # np.ndarray, full-sequence decode
    frame_done: list[float] = field(default_factory=list)  # perf_counter() when each frame's codes existed
    stop_reason: str = "max_frames"


class OriginalStyleLoop:
    """Generates replies the way the original implementation's loop did (see module doc)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        device = model.device
        self.backbone = shared_llama(cfg.backbone, model.backbone.model.layers, model.backbone.model.norm, device)
        self.decoder = shared_llama(cfg.decoder, model.decoder.model.layers, model.decoder.model.norm, device)
        self.text_table = model.thinker.model.language_model.embed_tokens
        self.audio_table = model.decoder.audio_embedding.embed_audio_tokens
        self.offsets = torch.arange(cfg.num_codebooks, device=device) * cfg.codebook_vocab

    # embeddings, recomputed per use as the original did
    def _text(self, ids) -> torch.Tensor:
        return self.text_table(torch.tensor([list(ids)], device=self.model.device, dtype=torch.long))

    def _frame(self, codes: torch.Tensor) -> torch.Tensor:
        """A(codes) = sum_k E[c_k + k * vocab]; codes [codebooks] -> [1, 1, dim]."""
        return self.audio_table(codes + self.offsets).sum(dim=0)[None, None]

    def _voice_prefix(self, voice) -> torch.Tensor:
        cfg, device = self.cfg, self.model.device
        text = self._text([cfg.text_start_token_id, *voice.transcript_ids, cfg.text_end_token_id])
        codes = torch.as_tensor(voice.codes, device=device, dtype=torch.long)
        frames = self.audio_table(codes + self.offsets).sum(dim=1)[None].to(text.dtype)
        zeros = torch.zeros(1, 1, text.shape[-1], device=device, dtype=text.dtype)
        return torch.cat([text, frames, zeros], dim=1)

    def _decoder_pass(self, hb: torch.Tensor, sampler) -> torch.Tensor:
        """codes [codebooks] of one frame from the backbone's last hidden state hb [1, hidden]."""
        cfg, dec = self.cfg, self.model.decoder
        device = hb.device
        c0 = sampler(self.model.backbone.codebook0_head(hb))            # [1]
        codes = [c0]
        cache = DynamicCache(config=self.decoder.config)                  # fresh every frame
        raw = torch.cat([hb[:, None], self.audio_table(c0)[:, None].to(hb.dtype)], dim=1)  # [1, 2, dim]
        positions = torch.zeros(1, 2, dtype=torch.long, device=device)
        for k in range(1, cfg.num_codebooks):
            out = self.decoder(inputs_embeds=dec.projection(raw), position_ids=positions,
                               past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            code = sampler(out @ dec.codebook_head.weight[k - 1])
            codes.append(code)
            if k < cfg.num_codebooks - 1:
                raw = self.audio_table(code + k * cfg.codebook_vocab)[:, None].to(hb.dtype)
                positions = torch.full((1, 1), k, dtype=torch.long, device=device)
        return torch.cat(codes)

    @torch.inference_mode()
    def reply(self, voice, prompt, frames: int, sampling, decode: bool = True) -> BaselineReply:
        cfg, model = self.cfg, self.model
        device = model.device
        sampler = TopKSampler(sampling, cfg.codec_vocab, device)
        reasoner = Reasoner(model)
        h, t = reasoner.prefill(prompt)
        cache = DynamicCache(config=self.backbone.config)
        pending = [self._voice_prefix(voice), h[:, None], self._text([t])]   # prefix recomputed per reply
        text_ids, reasoner_done = [t], t == cfg.im_end_token_id
        out_codes, done_at = [], []
        stop = "max_frames"
        for index in range(frames):
            if index > 0:
                pending = [self._frame(out_codes[-1])]
                if index % 2 == 0 and not reasoner_done:  # a reasoner pair on every even step
                    h, t = reasoner.step(t)
                    pending += [h[:, None], self._text([t])]
                    text_ids.append(t)
                    reasoner_done = t == cfg.im_end_token_id
            x = torch.cat(pending, dim=1)
            past = cache.get_seq_length()
            positions = torch.arange(past, past + x.shape[1], device=device)[None]
            hb = self.backbone(inputs_embeds=x, position_ids=positions, past_key_values=cache,
                               use_cache=True).last_hidden_state[:, -1]
            codes = self._decoder_pass(hb, sampler)
            # the original's stop check (a host sync every frame)
            if bool((codes[: cfg.num_codebooks - 1] == cfg.eos_token_id).all()):
                stop = "eos"
                break
            out_codes.append(codes)
            done_at.append(time.perf_counter())
        codes = (torch.stack(out_codes) if out_codes
                 else torch.zeros(0, cfg.num_codebooks, dtype=torch.long, device=device))
        reply = BaselineReply(codes, text_ids, frame_done=done_at, stop_reason=stop)
        if decode:
            reply.audio = model.decode_audio(codes)   # full-sequence Mimi decode, at the end
        return reply
