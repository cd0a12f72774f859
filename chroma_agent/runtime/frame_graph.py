"""One replay per frame: CUDA graphs over the backbone step and the decoder pass.

At batch 1 a frame's GPU work is hundreds of small kernels, which cost more to launch one
by one from Python than they compute. `FrameRunner` (one per conversation, reused by its
replies) runs the same math with fixed shapes (a static KV cache over the whole context,
device-side slot indices, masks instead of slices, sampling noise in a static buffer) and,
on CUDA, captures it once per (input length, sampling options) as a `torch.cuda.CUDAGraph`,
so a frame is a buffer copy and one replay; on the CPU it runs eagerly (tests hold it equal
to the dynamic path). `BatchedFrameRunner` is the same for the engine: many replies' steps
in one fixed-shape batch, a graph per batch-size bucket (`BUCKETS`) with padded rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.weights import ChromaWeights, VoicePrefix
from ..model.sampling import CodeSampler, SamplingOptions
from ..model.transformer import KVCache, LayerStep, rms, apply_rope, mlp_block, rms_norm, rope_tables


class FrameRunner:
    """Fixed-shape (and on CUDA, graph-replayed) backbone step + decoder pass."""

    def __init__(self, model: ChromaWeights, capacity: int | None = None, graphs: bool | None = None):
        cfg = model.config
        self.model = model
        self.capacity = capacity or cfg.backbone.max_position_embeddings
        self.graphs_enabled = model.device.type == "cuda" if graphs is None else graphs
        if self.graphs_enabled and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        device, dtype = model.device, model.dtype
        self.cache = KVCache(cfg.backbone, self.capacity, device=device, dtype=dtype)
        self.decoder_cache = KVCache(cfg.decoder, cfg.num_codebooks, device=device, dtype=dtype)
        self.length = torch.zeros(1, dtype=torch.long, device=device)  # filled slots, on the device
        self.codes = torch.zeros(1, cfg.num_codebooks, dtype=torch.long, device=device)
        self._inputs: dict[int, torch.Tensor] = {}
        self._samplers: dict[tuple, CodeSampler] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def start(self, prefix: VoicePrefix | None) -> None:
        """Begin a reply: the voice prefix's KV (if any) is the start of the cache."""
        if prefix is None:
            self.cache.length = 0
        else:
            if prefix.length > self.capacity:
                raise RuntimeError(f"the voice prefix ({prefix.length} positions) exceeds the context "
                                   f"of {self.capacity}; use a shorter reference clip")
            self.cache.copy_from(prefix.cache, prefix.length)
        self.length.fill_(self.cache.length)

    def step(self, embeds: torch.Tensor, sampler: CodeSampler) -> torch.Tensor:
        """Append `embeds` [1, n, hidden] to the backbone and return the frame's codes
        [1, codebooks] (a static buffer, overwritten by the next step)."""
        n = embeds.shape[1]
        if self.cache.length + n > self.capacity:
            raise RuntimeError(f"the reply outgrew the backbone context of {self.capacity} positions; "
                               "lower max_frames or use a shorter voice reference")
        key = (n, sampler.options.greedy, sampler.options.temperature, sampler.top_k)
        static = self._samplers.get(key)
        if static is None:
            static = self._samplers[key] = CodeSampler(sampler.options, sampler.allowed, self.model.device,
                                                       self.model.config.num_codebooks)
        self._input(n).copy_(embeds)
        static.new_frame(sampler.generator)  # this reply's generator draws into the captured buffer
        if self.graphs_enabled:
            graph = self._graphs.get(key) or self._capture(key, static)
            graph.replay()
        else:
            self._run(n, static)
        self.cache.length += n
        return self.codes

    def _input(self, n: int) -> torch.Tensor:
        if n not in self._inputs:
            hidden = self.model.config.backbone.hidden_size
            self._inputs[n] = torch.zeros(1, n, hidden, device=self.model.device, dtype=self.model.dtype)
        return self._inputs[n]

    def _run(self, n: int, sampler: CodeSampler) -> None:
        m = self.model
        slots = self.length + torch.arange(n, device=self.length.device)
        hidden = m.backbone.model.forward_static(self._input(n), self.cache, slots)[:, -1]
        self.codes.copy_(m.decode_frame(hidden, sampler, self.decoder_cache, new_frame=False))
        self.length += n

    def _capture(self, key: tuple, sampler: CodeSampler) -> "torch.cuda.CUDAGraph":
        n = key[0]
        saved = self.length.clone()
        # warm up on a side stream (lazy cuBLAS/SDPA initialisation must not be captured);
        # the writes land on slots the real step overwrites, and the length is restored
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(n, sampler)
                self.length.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(n, sampler)
        self.length.copy_(saved)
        self._graphs[key] = graph
        return graph


BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes a batched step is captured at
STEP_INPUTS = 3  # positions a reply feeds per step: a frame's embedding, or it and a reasoner pair


def bucket(rows: int) -> int:
    """The smallest batch bucket holding `rows` rows (a multiple of 64 past the last)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return -(-rows // BUCKETS[-1]) * BUCKETS[-1]


class BatchedFrameRunner:
    """The engine's batched step with fixed shapes: many replies' backbone steps and one
    decoder pass, each reply in a slot (a row) of one static KV cache, captured on CUDA
    as one graph per batch-size bucket (gpt-fast style; run eagerly on the CPU).

    A step runs the first `bucket(highest slot in use + 1)` rows: the rows of replies
    not stepping this tick (free slots, replies sitting out) are padding, with no input
    positions. Every row gets `STEP_INPUTS` input positions, its real ones first; the
    padding positions write keys past the row's length, which no real query sees (the
    mask is causal by position) and the row's next step overwrites. So a reply's codes do
    not depend on the padding, nor (in batch-invariant mode, on the CPU) on the other
    rows: tests hold padded == unpadded and batched == alone.

    Sampling reads static buffers (`_StepSamplers`: each row's options group and noise,
    copied in before the step), so one graph per (bucket, set of sampling options in the
    batch) serves every assignment of replies to rows; `capture` makes the usual ones
    ahead of the first call.
    """

    def __init__(self, model: ChromaWeights, rows: int, capacity: int | None = None, graphs: bool | None = None):
        cfg = model.config
        self.model = model
        self.rows = bucket(rows)
        self.capacity = capacity or cfg.backbone.max_position_embeddings
        self.graphs_enabled = model.device.type == "cuda" if graphs is None else graphs
        if self.graphs_enabled and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        device, dtype = model.device, model.dtype
        # STEP_INPUTS spare slots (the padding positions of a row at the end of its context),
        # rounded up to 16 (SDPA's memory-efficient kernel wants its mask rows aligned)
        self.cache = KVCache(cfg.backbone, -(-(self.capacity + STEP_INPUTS) // 16) * 16, self.rows, device, dtype)
        self.inputs = torch.zeros(self.rows, STEP_INPUTS, cfg.backbone.hidden_size, device=device, dtype=dtype)
        self.counts = torch.zeros(self.rows, dtype=torch.long, device=device)   # real inputs per row, this step
        self.lengths = torch.zeros(self.rows, dtype=torch.long, device=device)  # filled positions per row
        self.codes = torch.zeros(self.rows, cfg.num_codebooks, dtype=torch.long, device=device)
        self._offsets = torch.arange(STEP_INPUTS, device=device)
        self._host_lengths = [0] * self.rows
        self._free = list(range(self.rows))  # lowest first: the rows in use stay in a small bucket
        self._decoder_caches: dict[int, KVCache] = {}
        self._samplers: dict[tuple, _StepSamplers] = {}  # (bucket, options in the batch) -> their buffers
        self._graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}

    # -- slots --
    def acquire(self, prefix: VoicePrefix, needed: int) -> int:
        """A slot for a new reply that starts with `prefix`'s KV and needs `needed`
        positions in all; raises RuntimeError when none is free or it cannot fit."""
        if needed > self.capacity:
            raise RuntimeError(f"the reply needs {needed} backbone positions, more than the context of "
                               f"{self.capacity}; lower max_frames or use a shorter voice reference")
        if not self._free:
            self._grow()
        slot = min(self._free)
        self._free.remove(slot)
        for mine, theirs in zip(self.cache.keys + self.cache.values, prefix.cache.keys + prefix.cache.values):
            mine[slot, :, :prefix.length].copy_(theirs[0, :, :prefix.length])
        self.lengths[slot] = self._host_lengths[slot] = prefix.length
        return slot

    def _grow(self) -> None:
        """Twice the rows (more replies than the engine's capacity, e.g. `reply_frames`
        outside conversations): new static buffers, so the captured graphs go."""
        old, rows = self.rows, bucket(self.rows + 1)
        cache = KVCache(self.model.config.backbone, self.cache.capacity, rows, self.model.device, self.model.dtype)
        for mine, theirs in zip(cache.keys + cache.values, self.cache.keys + self.cache.values):
            mine[:old].copy_(theirs)
        self.cache = cache
        grown = lambda t: torch.cat([t, t.new_zeros(rows - old, *t.shape[1:])])  # noqa: E731
        self.inputs, self.counts, self.lengths, self.codes = map(grown, (self.inputs, self.counts, self.lengths,
                                                                          self.codes))
        self._host_lengths += [0] * (rows - old)
        self._free += list(range(old, rows))
        self.rows = rows
        self._graphs.clear()

    def release(self, slot: int) -> None:
        """Give a finished reply's slot back."""
        if slot not in self._free:
            self._free.append(slot)

    def trial(self, rows: int, length: int) -> torch.Tensor:
        """A step of rows 0..rows-1 as if each held `length` positions, with zero inputs,
        that leaves no trace (its writes land past the rows' lengths): for timing
        capacity before any reply has a row. Its codes [rows, codebooks]."""
        if len(self._free) != self.rows:
            raise RuntimeError("a trial step needs every row free")
        saved = self.lengths.clone()
        self.lengths[:rows] = length
        self._host_lengths[:rows] = [length] * rows
        hidden = self.inputs.shape[-1]
        greedy = CodeSampler(SamplingOptions(greedy=True), self.model.config.codec_vocab, self.model.device)
        try:
            zeros = torch.zeros(1, 2, hidden, device=self.inputs.device, dtype=self.inputs.dtype)
            return self.step(list(range(rows)), [zeros] * rows, [greedy] * rows)
        finally:
            self.lengths.copy_(saved)
            self._host_lengths = [0] * self.rows

    # -- the step --
    def step(self, slots: list[int], inputs: list[torch.Tensor], samplers: list[CodeSampler]) -> torch.Tensor:
        """One backbone step (`inputs[i]` [1, n_i <= STEP_INPUTS, hidden] appended to slot
        `slots[i]`) and decoder pass: the rows' codes [len(slots), codebooks]. Each
        sampler's noise for this frame must be drawn already (`new_frame`)."""
        for slot, x in zip(slots, inputs):
            if not 1 <= x.shape[1] <= STEP_INPUTS:
                raise ValueError(f"a step takes 1..{STEP_INPUTS} input positions per reply, got {x.shape[1]}")
            if self._host_lengths[slot] + x.shape[1] > self.capacity:
                raise RuntimeError(f"the reply outgrew the backbone context of {self.capacity} positions")
        size = bucket(max(slots) + 1)
        counts = [0] * size
        for slot, x in zip(slots, inputs):
            self.inputs[slot, : x.shape[1]].copy_(x[0])
            counts[slot] = x.shape[1]
        self.counts[:size].copy_(torch.tensor(counts))
        key = (size, tuple(dict.fromkeys(_pick_key(s.options) for s in samplers)))  # distinct, in order
        static = self._samplers.get(key)
        if static is None:
            static = self._samplers[key] = _StepSamplers(key[1], size, self.model)
        static.load(slots, samplers)
        if not self.graphs_enabled:
            self._run(size, static)
        else:
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = self._capture(size, static)
            graph.replay()
        self.lengths[:size] += self.counts[:size]
        for slot, x in zip(slots, inputs):
            self._host_lengths[slot] += x.shape[1]
        return self.codes[torch.tensor(slots, device=self.codes.device)]

    def capture(self, options: list[SamplingOptions]) -> None:
        """Capture ahead (CUDA) the graph of every bucket up to `rows` for batches whose
        replies all sample with one of `options` (e.g. greedy, and the default), so that
        no first use of a bucket stalls a tick."""
        if not self.graphs_enabled:
            return
        size = 1
        while size <= self.rows:
            for option in options:
                key = (size, (_pick_key(option),))
                if key not in self._graphs:
                    static = self._samplers.setdefault(key, _StepSamplers(key[1], size, self.model))
                    self._graphs[key] = self._capture(size, static)
            size = bucket(size + 1)

    def _run(self, size: int, samplers: "_StepSamplers") -> None:
        """The step over rows 0..size-1 (fixed shapes: CUDA-graph safe)."""
        m = self.model
        stack = m.backbone.model
        x, counts = self.inputs[:size], self.counts[:size]
        positions = self.lengths[:size, None] + self._offsets                     # [size, STEP_INPUTS]
        rope = rope_tables(*stack.rotary_emb(x, positions))                      # [size, 1, STEP_INPUTS, dim]
        slots = torch.arange(self.cache.capacity, device=x.device)
        mask = (slots <= positions[:, :, None])[:, None]                         # causal by position
        rows = torch.arange(size, device=x.device)[:, None].expand(size, STEP_INPUTS)
        for i, layer in enumerate(stack.layers):
            step = LayerStep.of(layer)
            keys, values = self.cache.keys[i][:size], self.cache.values[i][:size]
            kv_heads, head_dim = keys.shape[1], keys.shape[3]
            heads = step.qkv(rms(x, *step.norm1)).view(size, STEP_INPUTS, -1, head_dim).transpose(1, 2)
            qk = apply_rope(heads[:, :-kv_heads], *rope)
            keys.transpose(1, 2).index_put_((rows, positions), qk[:, -kv_heads:].transpose(1, 2))
            values.transpose(1, 2).index_put_((rows, positions), heads[:, -kv_heads:].transpose(1, 2))
            # the query heads sharing a key/value head as rows of one head: plain SDPA (no
            # GQA expansion of the cache), with the mask repeated over them
            q = qk[:, :-kv_heads]
            group = q.shape[1] // kv_heads
            o = F.scaled_dot_product_attention(q.reshape(size, kv_heads, group * STEP_INPUTS, head_dim), keys,
                                               values, attn_mask=mask.repeat(1, 1, group, 1), scale=step.scaling)
            x = x + step.o(o.view(size, -1, STEP_INPUTS, head_dim).transpose(1, 2).reshape(size, STEP_INPUTS, -1))
            x = mlp_block(step, x)
        last = x[torch.arange(size, device=x.device), (counts - 1).clamp(min=0)]  # each row's last real input
        hidden = rms_norm(stack.norm, last)
        decoder_cache = self._decoder_caches.get(size)
        if decoder_cache is None:
            cfg = m.config
            decoder_cache = self._decoder_caches[size] = KVCache(cfg.decoder, cfg.num_codebooks, size,
                                                                 m.device, m.dtype)
        self.codes[:size].copy_(m.decode_frame(hidden, samplers, decoder_cache, new_frame=False))

    def _capture(self, size: int, samplers: "_StepSamplers") -> "torch.cuda.CUDAGraph":
        # warm up on a side stream (lazy cuBLAS/SDPA set-up must not be captured); the
        # warm-up's writes land where the real step writes again, and lengths are untouched
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(size, samplers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(size, samplers)
        return graph


class _StepSamplers:
    """The samplers of a fixed-shape step, in static buffers: for each distinct
    `SamplingOptions` of the batch, the pick of every row (argmax, or top-k with the
    row's Gumbel noise, as `CodeSampler`), and each row keeps its own options' pick (its
    group id). Row-wise ops only, so a row's codes are those its own sampler gives."""

    def __init__(self, picks: tuple[tuple, ...], rows: int, model: ChromaWeights):
        cfg, device = model.config, model.device
        self.allowed = cfg.codec_vocab
        options = [SamplingOptions(greedy=True) if p[0] else SamplingOptions(top_k=p[1], temperature=p[2])
                   for p in picks]
        self.samplers = [CodeSampler(o, self.allowed, device, cfg.num_codebooks) for o in options]
        self.group = torch.zeros(rows, dtype=torch.long, device=device)
        self.noise = [None if s.noise is None else torch.zeros(cfg.num_codebooks, rows, s.top_k, device=device)
                      for s in self.samplers]
        self.index = {p: i for i, p in enumerate(picks)}

    def load(self, slots: list[int], samplers: list[CodeSampler]) -> None:
        """This step's rows: their options group and this frame's noise (drawn already)."""
        groups = [0] * self.group.shape[0]
        for slot, sampler in zip(slots, samplers):
            g = groups[slot] = self.index[_pick_key(sampler.options)]
            if self.noise[g] is not None:
                self.noise[g][:, slot: slot + 1].copy_(sampler.noise)
        if len(self.samplers) > 1:
            self.group.copy_(torch.tensor(groups))

    def __call__(self, logits: torch.Tensor, codebook: int) -> torch.Tensor:
        logits = logits[..., :self.allowed]
        codes = None
        for g, (sampler, noise) in enumerate(zip(self.samplers, self.noise)):
            if noise is None:
                pick = logits.argmax(dim=-1)
            else:
                values, indices = torch.topk(logits, sampler.top_k, dim=-1, sorted=False)
                choice = (values.float() / sampler.options.temperature + noise[codebook]).argmax(dim=-1, keepdim=True)
                pick = indices.gather(-1, choice).squeeze(-1)
            codes = pick if codes is None else torch.where(self.group == g, pick, codes)
        return codes


def _pick_key(options: SamplingOptions) -> tuple:
    """What of a reply's options its codes' pick depends on (not its seed)."""
    return (True,) if options.greedy else (False, options.top_k, options.temperature)
