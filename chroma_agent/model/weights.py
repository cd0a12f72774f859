"""ChromaWeights: the four parts of FlashLabs Chroma 1.0 loaded from a checkpoint, and the
per-frame math on them (embeddings, voice prefix, decoder pass, Mimi).

The bottom layer of the package: weights only, importing nothing that schedules replies.
Every piece of per-reply state (KV caches, the reasoner's position, the sampler) lives in
the objects of `generation.py` and above, so many calls can share one model. The public
`ChromaModel` (api.py) is this class plus the reply-level entry points (`generate`,
`reply_frames`, `conversation`), which need the modules above.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
import numpy as np
import torch
from torch import nn
from transformers import MimiModel, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.initialization import no_init_weights

from . import checkpoint, matmul
from .codec import forget_derived
from .config import ChromaConfig
from .device import check_device
from .processor import ChromaProcessor
from .sampling import CodeSampler
from .transformer import KVCache, LayerStep, LlamaStack
from .matmul import Projection, pad_rows
from .voice import Voice

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA + bfloat16 when a GPU is present, else CPU + float32. A device this
    machine lacks raises `DeviceError`."""
    device = check_device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return device, dtype


_log = logging.getLogger(__name__)


class _Stages:
    """Logs how long each step of loading took."""

    def __init__(self):
        self.last = time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        _log.info("%s in %.1f s", what, now - self.last)
        self.last = now


class Backbone(nn.Module):
    """Llama decoder over embeddings; `codebook0_head` predicts each frame's first code."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        self.model = LlamaStack(config.backbone)
        self.codebook0_head = nn.Linear(config.backbone.hidden_size, config.codebook_vocab, bias=False)
        self.head: Projection | None = None

    def pack(self) -> None:
        """Pad the head's rows for `Projection` (the parameter becomes a view into them)."""
        head = self.codebook0_head
        rows = pad_rows(head.weight.detach())
        head.weight = nn.Parameter(rows[: head.out_features], requires_grad=False)
        self.head = Projection(rows)

    def codebook0_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of each frame's first code, [..., vocab]."""
        if self.head is None:
            return self.codebook0_head(hidden)
        return self.head(hidden)[..., : self.codebook0_head.out_features]


class AudioEmbedding(nn.Module):
    """The audio code table E, [codebooks x vocab, dim]; row `c + k * vocab` embeds code c
    of codebook k. Shared by the backbone (frame embeddings) and the decoder."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        self.embed_audio_tokens = nn.Embedding(config.num_codebooks * config.codebook_vocab,
                                               config.audio_embedding_dim)


class CodebookHeads(nn.Module):
    """One [hidden, vocab] head per codebook 1..7, published as a single [7, hidden, vocab]
    weight. `pack` stores it as padded rows [7, vocab', hidden] for `Projection`; the
    parameter then is a view into them."""

    def __init__(self, heads: int, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, hidden, vocab))
        self.heads: list[Projection] | None = None

    def pack(self) -> None:
        vocab = self.weight.shape[-1]
        rows = pad_rows(self.weight.detach().transpose(1, 2))
        self.weight = nn.Parameter(rows[:, :vocab].transpose(1, 2), requires_grad=False)
        self.heads = [Projection(r) for r in rows]

    def forward(self, hidden: torch.Tensor, head: int) -> torch.Tensor:
        if self.heads is None:
            return hidden @ self.weight[head]
        return self.heads[head](hidden)[..., : self.weight.shape[-1]]


class Decoder(nn.Module):
    """Small Llama decoder that fills in codebooks 1..7 of a frame from the backbone state."""

    def __init__(self, config: ChromaConfig):
        super().__init__()
        hidden = config.decoder.hidden_size
        self.projection = nn.Linear(config.audio_embedding_dim, hidden, bias=False)
        self.model = LlamaStack(config.decoder)
        self.codebook_head = CodebookHeads(config.num_codebooks - 1, hidden, config.codebook_vocab)
        self.audio_embedding = AudioEmbedding(config)
        self.input_projection: Projection | None = None

    def pack(self) -> None:
        self.input_projection = Projection(self.projection.weight)
        self.codebook_head.pack()


@dataclass
class VoicePrefix:
    """The backbone KV of a voice prefix, computed once and copied into each reply's cache."""

    cache: KVCache
    length: int


class ChromaWeights(nn.Module):
    """FlashLabs Chroma 1.0: reasoner (Qwen2.5-Omni thinker), backbone, decoder, Mimi codec.

    The weights and the per-frame math. Users load `ChromaModel` (api.py), which adds the
    reply-level entry points: `ChromaModel.from_pretrained("FlashLabs/Chroma-4B")` or a
    local directory.
    """

    def __init__(self, config: ChromaConfig, processor: ChromaProcessor | None = None):
        super().__init__()
        self.config = config
        self.processor = processor
        self.thinker = Qwen2_5OmniThinkerForConditionalGeneration(config.thinker)
        self.thinker.model.visual = None  # speech only: the vision tower is never loaded
        self.backbone = Backbone(config)
        self.decoder = Decoder(config)
        self.codec_model = MimiModel(config.codec)
        self.published_names: dict[str, str] = {}
        self._prefixes: "weakref.WeakKeyDictionary[Voice, VoicePrefix]" = weakref.WeakKeyDictionary()
        self._projected_audio: torch.Tensor | None = None
        self.register_buffer("_codebook_offsets",
                             torch.arange(config.num_codebooks) * config.codebook_vocab, persistent=False)

    # -- loading --
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None) -> "ChromaWeights":
        """Load a Chroma checkpoint.

        `path_or_hub_id`: a local directory (loads offline) or a hub id such as
        "FlashLabs/Chroma-4B" (downloaded with progress bars into the Hugging Face cache;
        `revision`, `cache_dir` and `token` are passed on). `device` defaults to CUDA when
        present, `dtype` to bfloat16 on CUDA and float32 on CPU. The Mimi codec always
        runs in float32. Raises `CheckpointError` naming any missing or unexpected tensor,
        and `DeviceError`, before any download, for a device this machine lacks. Logs (INFO)
        what loading spends its time on.
        """
        device, dtype = resolve_device_dtype(device, dtype)
        stage = _Stages()
        directory = checkpoint.resolve(path_or_hub_id, revision=revision, cache_dir=cache_dir, token=token)
        stage.done(f"found the checkpoint files ({directory})")
        config = ChromaConfig.from_file(directory / "config.json")
        processor = ChromaProcessor.from_pretrained(directory, config)
        stage.done("read the config and the tokenizer")
        with no_init_weights():
            model = cls(config, processor)
        stage.done("built the model's parts")
        model.published_names = checkpoint.load_weights(model, directory, device, dtype, keep_float32=("codec_model.",))
        model.to(device)  # the parameters are already there; this moves the computed buffers
        stage.done(f"read the weights onto {device}")
        model._ready()
        stage.done("prepared the weights for streaming (fused projections, derived tables, CPU matmul plans)")
        model.source = str(directory)
        return model

    @classmethod
    def from_config(cls, config: ChromaConfig | str | os.PathLike, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, seed: int = 0) -> "ChromaWeights":
        """A model with random weights (for speed and memory measurements), built directly on
        `device`. It has no processor: drive it with `reply_frames` and a `ReasonerInput`."""
        if not isinstance(config, ChromaConfig):
            config = ChromaConfig.from_file(config)
        device, dtype = resolve_device_dtype(device, dtype)
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the target dtype: no float32 copy of 4B parameters
        try:
            with torch.device(device):
                model = cls(config)
        finally:
            torch.set_default_dtype(default)
        model.codec_model.float()  # Mimi runs in float32 (its parameters and buffers)
        for module in model.modules():  # RoPE frequencies stay float32, as transformers builds them
            if hasattr(module, "inv_freq"):
                module.inv_freq = module.inv_freq.float()
        model.thinker.lm_head.weight = model.thinker.model.language_model.embed_tokens.weight
        model._ready()
        return model

    def _ready(self) -> None:
        """Weights in place: inference mode, fused projections, derived tables, CPU matmul plans."""
        self.eval().requires_grad_(False)
        self.pack_weights()
        self.refresh_derived()
        self.plan_projections()

    @property
    def device(self) -> torch.device:
        return self.backbone.codebook0_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.codebook0_head.weight.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def parameter_by_published_name(self, name: str) -> torch.Tensor:
        """The loaded tensor behind a checkpoint tensor name (e.g. 'thinker.model.embed_tokens.weight')."""
        if name not in self.published_names:
            raise KeyError(f"{name!r} is not a tensor of the loaded checkpoint")
        return self.get_parameter(self.published_names[name])

    def pack_weights(self) -> None:
        """Lay weights out for the per-frame step: one q/k/v and one gate/up matmul per layer
        (`LayerStep`) and the code heads padded for `Projection` (`pad_rows`). The parameters
        become views into the packed tensors, so names and in-place edits still work."""
        for layers in (self.backbone.model.layers, self.decoder.model.layers,
                       self.thinker.model.language_model.layers):
            for layer in layers:
                LayerStep.rebuild(layer)
        self.backbone.pack()
        self.decoder.pack()
        self.reasoner_head = Projection(self.thinker.lm_head.weight)
        self._packed = True

    def _projections(self):
        for layers in (self.backbone.model.layers, self.decoder.model.layers,
                       self.thinker.model.language_model.layers):
            for layer in layers:
                yield from LayerStep.of(layer).projections()
        yield from (self.backbone.head, self.decoder.input_projection, self.reasoner_head, *self.decoder.codebook_head.heads)

    def plan_projections(self) -> None:
        """On the CPU, choose now how each per-frame matmul runs (`Projection.plan`: timed
        once per weight shape and machine, then read from the plan cache) for the row counts
        the frame loop uses, so that the first reply does not pay for it. Nothing on CUDA."""
        if self.device.type != "cpu":
            return
        start, measured = time.perf_counter(), matmul.plans_measured
        for projection in self._projections():
            projection.plan(1)
        # 2-8 rows: the backbone's even steps (3), the decoder's first pass (2), and the reasoner
        # feeding a reply's last tokens and the turn closing (else the first reply's end plans them)
        for layers in (self.backbone.model.layers, self.decoder.model.layers, self.thinker.model.language_model.layers):
            for layer in layers:
                for projection in LayerStep.of(layer).projections():
                    projection.plan(2)
        _log.info("CPU matmul plans in %.1f s (%d measured now, the others known; cached in %s)",
                  time.perf_counter() - start, matmul.plans_measured - measured, matmul.plan_cache_file())

    def warm_invariant(self) -> None:
        """On the CPU, make now what the engine's batch-invariant matmuls would make call
        by call (`Projection.warm_invariant`: each projection's packed weight, and oneDNN's
        kernel for each weight shape at each of its row counts), so that a server's memory
        is taken before its first call. Run it on the thread that runs the engine's ticks
        (part of oneDNN's cache is per thread). Nothing on CUDA."""
        if self.device.type != "cpu":
            return
        start, shapes = time.perf_counter(), set()
        for projection in self._projections():
            key = (tuple(projection.weight.shape), projection.weight.dtype, projection.bias is not None)
            projection.warm_invariant(every_count=key not in shapes)
            shapes.add(key)
        _log.info("batch-invariant matmuls ready in %.1f s (%d weight shapes x %d row counts)",
                  time.perf_counter() - start, len(shapes), len(matmul.INVARIANT_ROW_COUNTS))

    def _apply(self, fn, recurse=True):
        # moving or casting replaces each parameter on its own: pack, derive and plan again afterwards
        result = super()._apply(fn, recurse)
        if getattr(self, "_packed", False):
            self._ready()
        return result

    @torch.inference_mode()
    def refresh_derived(self) -> None:
        """Recompute what is derived from the weights (call after editing weights in place):
        the decoder's projection of every audio embedding row, so that a decoder input is one
        row lookup instead of a [dim x hidden] matmul per codebook per frame; the voice
        prefix caches; the packed weight copies of `Projection`s; and what streaming decoders
        derive from the codec's weights."""
        for projection in self._projections():
            projection.forget_packed()
        table = self.decoder.audio_embedding.embed_audio_tokens.weight
        self._projected_audio = self.decoder.projection(table)
        # the decoder's RoPE positions are the same every frame: [0, 0], then 1 ... 6
        stack, like = self.decoder.model, table[:1, None]
        positions = [[0, 0]] + [[k] for k in range(1, self.config.num_codebooks - 1)]
        self._decoder_rope = [stack.rope(torch.tensor(p, device=self.device), like) for p in positions]
        self._prefixes.clear()
        forget_derived(self.codec_model)

    # -- embeddings --
    def embed_text(self, ids: list[int]) -> torch.Tensor:
        """T(ids): rows of the reasoner's token table, [1, n, hidden]."""
        table = self.thinker.model.language_model.embed_tokens
        return table(torch.tensor([ids], device=self.device, dtype=torch.long))

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """A(codes): sum over codebooks of E[c_k + k * vocab]; codes [..., codebooks] -> [..., dim]."""
        return self.decoder.audio_embedding.embed_audio_tokens(codes + self._codebook_offsets).sum(dim=-2)

    def voice_prefix(self, voice: Voice) -> torch.Tensor:
        """The backbone prefix of a voice: T(start), T(transcript), T(end), A(frames...), zeros."""
        cfg = self.config
        if voice.codes.shape[1] != cfg.num_codebooks:
            raise ValueError(f"voice has {voice.codes.shape[1]} codebooks, this model uses {cfg.num_codebooks}")
        if int(voice.codes.max()) >= cfg.codec_vocab or int(voice.codes.min()) < 0:
            raise ValueError("voice codes are outside Mimi's code range; was it made for another codec?")
        text = self.embed_text([cfg.text_start_token_id, *voice.transcript_ids, cfg.text_end_token_id])
        frames = self.embed_frame(voice.codes_tensor(self.device))[None]
        zeros = torch.zeros(1, 1, text.shape[-1], device=self.device, dtype=text.dtype)
        return torch.cat([text, frames.to(text.dtype), zeros], dim=1)

    @torch.inference_mode()
    def prefix_state(self, voice: Voice) -> VoicePrefix:
        """The backbone KV of `voice`'s prefix: computed on first use, then shared (read-only)
        by every reply in that voice."""
        state = self._prefixes.get(voice)
        if state is None:
            embeds = self.voice_prefix(voice)
            cache = KVCache(self.config.backbone, embeds.shape[1], device=self.device, dtype=self.dtype)
            self.backbone.model(embeds, cache, torch.arange(embeds.shape[1], device=self.device))
            state = self._prefixes[voice] = VoicePrefix(cache, embeds.shape[1])
        return state

    # -- decoder pass --
    def decode_frame(self, backbone_hidden: torch.Tensor, sampler: CodeSampler,
                     cache: KVCache | None = None, new_frame: bool = True) -> torch.Tensor:
        """All codes of one frame from the backbone's last hidden state [batch, hidden].

        Inputs: projection(hb) and projection(E[c0]) together at RoPE position 0, then
        projection(E[c_{k-1} + (k-1) * vocab]) at position k - 1 (the original's positions
        [0, 0, 1, ..., 6]); head k-1 on the last output gives c_k. Returns [batch, codebooks].
        `new_frame=False`: the sampler's noise for this frame was drawn by the caller.
        """
        cfg, dec = self.config, self.decoder
        batch = backbone_hidden.shape[0]
        if cache is None:
            cache = KVCache(cfg.decoder, cfg.num_codebooks, batch, self.device, self.dtype)
        cache.length = 0
        projected = self._projected_audio
        if new_frame:
            sampler.new_frame()
        code = sampler(self.backbone.codebook0_logits(backbone_hidden), 0)
        codes = [code]
        x = torch.stack([dec.input_projection(backbone_hidden), projected[code]], dim=1)
        for k in range(1, cfg.num_codebooks):
            out = dec.model(x, cache, None, rope=self._decoder_rope[k - 1])[:, -1]
            code = sampler(dec.codebook_head(out, k - 1), k)
            codes.append(code)
            if k < cfg.num_codebooks - 1:
                x = projected[code + k * cfg.codebook_vocab][:, None]
        return torch.stack(codes, dim=-1)

    # -- codec --
    @torch.inference_mode()
    def encode_audio(self, audio_24k: np.ndarray) -> np.ndarray:
        """Mimi codes [frames, codebooks] of 24 kHz mono audio (ceil(samples / 1920) frames)."""
        wave = torch.as_tensor(audio_24k, dtype=torch.float32, device=self.device)[None, None]
        codes = self.codec_model.encode(wave).audio_codes[0, : self.config.num_codebooks]
        return np.ascontiguousarray(codes.T.cpu().numpy(), dtype=np.int64)

    @torch.inference_mode()
    def decode_audio(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Full-sequence Mimi decode of codes [frames, codebooks] to 24 kHz float32 audio."""
        codes = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes, device=self.device)
        if codes.numel() == 0:
            return np.zeros(0, dtype=np.float32)
        if int(codes.max()) >= self.config.codec_vocab:
            raise ValueError("codes hold special ids (>= 2048) that Mimi cannot decode")
        audio = self.codec_model.decode(codes.T[None].long()).audio_values
        return audio[0, 0].float().cpu().numpy()

    # -- voices --
    @torch.inference_mode()
    def voice_from_audio(self, audio, transcript: str | list[int], sample_rate: int | None = None) -> Voice:
        """Clone a voice from a few seconds of reference `audio` (a path, encoded bytes, or an
        array with its `sample_rate`; any rate, mono or stereo) and its `transcript` (the
        words it says, or their token ids). Mimi-encodes it once; save the result with
        `voice.save(path)`."""
        if self.processor is None:
            raise RuntimeError("this model was built without a processor; load it with from_pretrained")
        wave = self.processor.load_voice_audio(audio, sample_rate)
        if isinstance(transcript, str):
            ids = self.processor.transcript_ids(transcript)
        else:
            ids, transcript = list(transcript), self.processor.decode(list(transcript))
        return Voice(self.encode_audio(wave), transcript, tuple(ids),
                     {"seconds": round(wave.size / self.sample_rate, 3), "model": getattr(self, "source", "")})
