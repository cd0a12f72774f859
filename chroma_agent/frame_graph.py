"""One replay per frame: CUDA graphs over the backbone step and the decoder pass.

At batch 1 a frame's GPU work is hundreds of small kernels (16 backbone layers, then 7
decoder passes of 4 layers, heads and sampling); launched one by one from Python they
cost more than they compute. `FrameRunner` runs the same math with fixed shapes (a
static backbone KV cache over the model's whole context, device-side slot indices,
masks instead of slices, sampling noise in a static buffer) and, on CUDA, captures it
once per (input length, sampling options) into a `torch.cuda.CUDAGraph`; a frame is then
a buffer copy and one replay. On the CPU it runs eagerly (tests hold it equal to the
dynamic path). The runner belongs to one conversation and is reused by its replies.
"""
from __future__ import annotations

import torch

from .model import ChromaWeights, VoicePrefix
from .sampling import CodeSampler
from .transformer import KVCache


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
