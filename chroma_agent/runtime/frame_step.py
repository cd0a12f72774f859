"""`FrameStep`: the one per-frame step, a backbone step and a decoder pass for N rows.

Every reply's frame goes through one: a lone conversation's (N = 1, built by the
conversation, or by `ReplyFrames` itself outside one) and the engine's (a row per speaking
reply). Built once and handed in; a reply holds a row (`acquire` ... `release`) and each
`step` appends some rows' inputs to their backbone context and returns their codes.

Two ways to hold the rows' context, one interface:

- ragged (default on the CPU): each row its own `KVCache` sized to its reply, and the
  backbone step runs all rows' positions in one matmul, attending row by row over that
  row's cache only (`batch.backbone_step`). Inside `batch_invariant()` every row gets the
  bits it gets alone; a lone reply's step is this with one row.
- fixed (default on CUDA): one static KV cache with a row per reply, every row fed
  `STEP_INPUTS` positions (its real ones first), steps padded to a batch bucket, so the
  shapes never change and on CUDA each (bucket, sampling options) is one captured graph
  (frame_graph.py); on the CPU it runs eagerly (tests hold it equal to the ragged step).
  A padding position writes keys past its row's length, which no real query sees (the
  mask is causal by position) and the row's next step overwrites: padded == unpadded.

The decoder pass is the same either way (`ChromaWeights.decode_frame` over all rows, each
row's codes picked by its own reply's sampler: `RowSamplers`). A scheduler of many rows can
stage their next inputs in a buffer of the step's (`stage`: one copy for all rows, where the
fixed step reads them in place) instead of handing it a tensor per row.
"""
from __future__ import annotations

import heapq
import operator

import torch

from ..model.sampling import CodeSampler, RowSamplers, SamplingOptions, long_tensor
from ..model.transformer import KVCache, rms_norm
from ..model.weights import ChromaWeights, VoicePrefix
from .batch import backbone_step
from .frame_graph import STEP_INPUTS, bucket, capture


_key = operator.attrgetter("key")  # a sampler's `pick_key`, read in C


def _slots(capacity: int) -> int:
    """A fixed row's cache slots: `capacity` positions and STEP_INPUTS spare ones (a row's
    padding at the end of its context), rounded up to 16 (SDPA's memory-efficient kernel
    wants its mask rows aligned)."""
    return -(-(capacity + STEP_INPUTS) // 16) * 16


def fixed_step_bytes(config, rows: int, dtype: torch.dtype, capacity: int | None = None) -> int:
    """The static memory of a fixed-shape `FrameStep` of `rows` rows (a bucket: what it
    allocates) for a model of `config` (`ChromaConfig`) in `dtype`: the backbone KV cache
    (the bulk: layers x 2 x kv_heads x slots x head_dim per row), the step's inputs and the
    largest bucket's decoder cache. Nothing is allocated (a full-size figure on any machine)."""
    size = torch.empty((), dtype=dtype).element_size()

    def kv(sub, slots: int) -> int:
        head_dim = getattr(sub, "head_dim", None) or sub.hidden_size // sub.num_attention_heads
        return 2 * sub.num_hidden_layers * sub.num_key_value_heads * slots * head_dim * size

    backbone = config.backbone
    per_row = (kv(backbone, _slots(capacity or backbone.max_position_embeddings))
               + kv(config.decoder, config.num_codebooks) + STEP_INPUTS * backbone.hidden_size * size)
    return rows * per_row


class FrameStep:
    """Backbone step + decoder pass of N rows, eager or CUDA-graphed (see the module).

    `rows`: rows to make room for (fixed: grows past it, new graphs then); `fixed`: static
    shapes (default: on CUDA); `graphs`: capture CUDA graphs of the fixed step (default:
    fixed on CUDA); `capacity`: backbone positions a fixed row holds (default: the
    backbone's context)."""

    def __init__(self, model: ChromaWeights, rows: int = 1, *, fixed: bool | None = None,
                 graphs: bool | None = None, capacity: int | None = None):
        cfg, device, dtype = model.config, model.device, model.dtype
        self.model = model
        self.fixed = device.type == "cuda" if fixed is None else fixed
        self.graphs_enabled = self.fixed and device.type == "cuda" if graphs is None else graphs
        if self.graphs_enabled and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if self.graphs_enabled and not self.fixed:
            raise ValueError("CUDA graphs need the fixed-shape step")
        self.capacity = capacity or cfg.backbone.max_position_embeddings
        self.rows = bucket(rows) if self.fixed else 0
        self._free = list(range(self.rows))  # a heap, lowest first: the rows in use stay in a small bucket
        self._taken: set[int] = set()
        self._host_lengths = [0] * self.rows
        self._caches: dict[int, KVCache] = {}  # ragged: each row's own backbone cache
        self._decoder_caches: dict[int, KVCache] = {}
        self._samplers: dict[tuple, RowSamplers] = {}  # (rows, picks in the batch) -> their buffers
        self._graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}
        self._staged: torch.Tensor | None = None  # ragged: the rows' next inputs (`stage`); fixed: `inputs`
        if self.fixed:
            self.cache = KVCache(cfg.backbone, _slots(self.capacity), self.rows, device, dtype)
            self.inputs = torch.zeros(self.rows, STEP_INPUTS, cfg.backbone.hidden_size, device=device, dtype=dtype)
            self.counts = torch.zeros(self.rows, dtype=torch.long, device=device)   # real inputs per row, this step
            self.lengths = torch.zeros(self.rows, dtype=torch.long, device=device)  # filled positions per row
            self.codes = torch.zeros(self.rows, cfg.num_codebooks, dtype=torch.long, device=device)
            self._offsets = torch.arange(STEP_INPUTS, device=device)
            self._views: dict[int, KVCache] = {}

    # -- rows --
    def acquire(self, prefix: VoicePrefix | None, positions: int) -> int:
        """A row for a new reply whose backbone starts with `prefix`'s KV (None: empty, its
        first step brings the voice prefix; ragged only) and needs `positions` in all;
        raises RuntimeError when it cannot fit."""
        cfg, m = self.model.config, self.model
        if not self.fixed:
            row = heapq.heappop(self._free) if self._free else len(self._caches)
            self._taken.add(row)
            cache = self._caches[row] = KVCache(cfg.backbone, positions, device=m.device, dtype=m.dtype)
            if prefix is not None:
                cache.copy_from(prefix.cache, prefix.length)
            return row
        if prefix is None:
            raise ValueError("the fixed-shape step starts a reply from its voice prefix's KV")
        if positions > self.capacity:
            raise RuntimeError(f"the reply needs {positions} backbone positions, more than the context of "
                               f"{self.capacity}; lower max_frames or use a shorter voice reference")
        if not self._free:
            self._grow()
        row = heapq.heappop(self._free)
        self._taken.add(row)
        for mine, theirs in zip(self.cache.keys + self.cache.values, prefix.cache.keys + prefix.cache.values):
            mine[row, :, :prefix.length].copy_(theirs[0, :, :prefix.length])
        self.lengths[row] = self._host_lengths[row] = prefix.length
        return row

    def release(self, row: int) -> None:
        """Give a finished reply's row back (ragged: its cache goes)."""
        self._caches.pop(row, None)
        if row in self._taken:
            self._taken.remove(row)
            heapq.heappush(self._free, row)

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
        self._free += list(range(old, rows))  # still a heap: each above every row before it
        self.rows = rows
        self._views.clear()
        self._graphs.clear()

    # -- the step --
    def stage(self, rows: list[int], start: int, columns: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Put the next step's inputs of `rows` at positions start, start + 1, ... (`columns[j]`
        [len(rows), hidden]: position start + j of every row), in one copy per column into a
        buffer of this step's own (fixed: its input buffer, which a step then reads in place),
        and return each row's inputs 0 .. start + len(columns) - 1 [1, n, hidden], views: what
        the row's reply appends at its next step (its earlier positions are those staged for
        it before). None when a column is not of the buffer's dtype (nothing is staged)."""
        end, n = start + len(columns), len(rows)
        if end > STEP_INPUTS:
            raise ValueError(f"a step takes at most {STEP_INPUTS} input positions per reply")
        buffer = self.inputs if self.fixed else self._staging(max(rows) + 1)
        if any(column.dtype != buffer.dtype for column in columns):
            return None
        if rows == list(range(n)):  # the usual case: slices, no index
            for j, column in enumerate(columns):
                buffer[:n, start + j] = column
            return buffer[:n, None, :end].unbind(0)
        index = long_tensor(rows, buffer.device)
        for j, column in enumerate(columns):
            buffer[index, start + j] = column
        views = buffer[:, None, :end].unbind(0)
        return [views[row] for row in rows]

    def _staging(self, rows: int) -> torch.Tensor:
        """The ragged step's staging buffer, with room for `rows` rows (kept: no fresh memory per tick)."""
        staged = self._staged
        if staged is None or staged.shape[0] < rows:
            m = self.model
            hidden = m.config.backbone.hidden_size
            grown = torch.empty(bucket(rows), STEP_INPUTS, hidden, device=m.device, dtype=m.dtype)
            if staged is not None:
                grown[: staged.shape[0]] = staged
            staged = self._staged = grown
        return staged

    def step(self, rows: list[int], inputs: list[torch.Tensor], samplers: list[CodeSampler]) -> torch.Tensor:
        """One backbone step (`inputs[i]` [1, n_i, hidden] appended to row `rows[i]`) and
        decoder pass: the rows' codes [len(rows), codebooks]. Each sampler's noise for this
        frame must be drawn already (`CodeSampler.new_frame`). A step that fails leaves
        every row as it was (a retry writes the same slots again)."""
        if not self.fixed:
            return self._ragged([self._caches[row] for row in rows], inputs, samplers)
        size, host = bucket(max(rows) + 1), self._host_lengths
        counts, groups = [0] * size, {}  # groups: inputs per row -> (rows, their inputs)
        base, row_bytes = self.inputs.data_ptr(), self.inputs.stride(0) * self.inputs.element_size()
        for i, (row, x) in enumerate(zip(rows, inputs)):
            n = x.shape[1]
            if not 1 <= n <= STEP_INPUTS:
                raise ValueError(f"a step takes 1..{STEP_INPUTS} input positions per reply, got {n}")
            if host[row] + n > self.capacity:
                raise RuntimeError(f"the reply outgrew the backbone context of {self.capacity} positions; "
                                   "lower max_frames or use a shorter voice reference")
            counts[row] = n
            if x.data_ptr() == base + row * row_bytes:  # staged in its row already (`stage`): no copy
                continue
            group = groups.setdefault(n, ([], []))
            group[0].append(i)
            group[1].append(x)
        index, dense = long_tensor(rows, self.codes.device), rows == list(range(len(rows)))
        for n, (picked, xs) in groups.items():  # one copy per input count, not one per row
            if dense and len(picked) == len(rows) and all(x.dtype == self.inputs.dtype for x in xs):
                torch.cat(xs, out=self.inputs[: len(rows), :n])  # rows 0..n-1: straight into the buffer
            else:
                where = index if len(picked) == len(rows) else index[picked]
                self.inputs[where, :n] = torch.cat(xs).to(self.inputs.dtype)
        self.counts[:size].copy_(long_tensor(counts, self.counts.device))
        static = self._row_samplers(size, samplers)
        static.load(rows, samplers)
        if not self.graphs_enabled:
            self._fixed(size, static)
        else:
            key = (size, static.keys)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = capture(lambda: self._fixed(size, static))
            graph.replay()
        self.lengths[:size] += self.counts[:size]
        for row in rows:
            host[row] += counts[row]
        return self.codes[index]

    def _row_samplers(self, size: int, samplers: list[CodeSampler]) -> RowSamplers:
        keys = tuple(dict.fromkeys(map(_key, samplers)))  # distinct, in order
        static = self._samplers.get((size, keys))
        if static is None:
            cfg = self.model.config
            static = self._samplers[(size, keys)] = RowSamplers(keys, size, cfg.num_codebooks, self.model.device)
        return static

    def _decode(self, hidden: torch.Tensor, samplers: RowSamplers) -> torch.Tensor:
        """The decoder pass of `hidden` [rows, hidden]: their codes [rows, codebooks]."""
        m, rows = self.model, hidden.shape[0]
        cache = self._decoder_caches.get(rows)
        if cache is None:
            cfg = m.config
            cache = self._decoder_caches[rows] = KVCache(cfg.decoder, cfg.num_codebooks, rows, m.device, m.dtype)
        return m.decode_frame(hidden, samplers, cache, new_frame=False)

    def _ragged(self, caches: list[KVCache], inputs: list[torch.Tensor], samplers: list[CodeSampler]) -> torch.Tensor:
        saved = [c.length for c in caches]
        try:
            hidden = backbone_step(self.model, inputs, caches)
            static = self._row_samplers(len(caches), samplers)
            static.load(list(range(len(caches))), samplers)
            return self._decode(hidden, static)
        except Exception:
            for cache, length in zip(caches, saved):
                cache.length = length
            raise

    def _fixed(self, size: int, samplers: RowSamplers) -> None:
        """The fixed-shape step over rows 0..size-1 (CUDA-graph safe)."""
        stack = self.model.backbone.model
        view = self._views.get(size)
        if view is None:
            view = self._views[size] = self.cache.first_rows(size)
        positions = self.lengths[:size, None] + self._offsets                     # [size, STEP_INPUTS]
        x = stack.run_static(self.inputs[:size], view, positions)
        last = x[torch.arange(size, device=x.device), (self.counts[:size] - 1).clamp(min=0)]  # last real input
        self.codes[:size].copy_(self._decode(rms_norm(stack.norm, last), samplers))

    # -- ahead of use --
    def trial(self, rows: int, length: int) -> torch.Tensor:
        """A greedy step of `rows` rows as if each held `length` positions, with zero
        inputs, that leaves no trace: for timing capacity before any reply has a row.
        Its codes [rows, codebooks]."""
        m = self.model
        greedy = [CodeSampler(SamplingOptions(greedy=True), m.config.codec_vocab, m.device)] * rows
        zeros = [torch.zeros(1, 2, m.config.backbone.hidden_size, device=m.device, dtype=m.dtype)] * rows
        if not self.fixed:
            caches = [KVCache(m.config.backbone, length + 4, device=m.device, dtype=m.dtype) for _ in range(rows)]
            for cache in caches:
                cache.length = length
            return self._ragged(caches, zeros, greedy)
        if len(self._free) != self.rows:
            raise RuntimeError("a trial step needs every row free")
        while self.rows < rows:
            self._grow()
        saved = self.lengths.clone()
        self.lengths[:rows] = length
        self._host_lengths[:rows] = [length] * rows
        try:
            return self.step(list(range(rows)), zeros, greedy)
        finally:
            self.lengths.copy_(saved)
            self._host_lengths = [0] * self.rows

    def capture(self, options: list[SamplingOptions]) -> None:
        """Capture ahead (CUDA) the graph of every bucket up to `rows` for batches whose
        replies all sample with one of `options` (e.g. greedy, and the default), so that
        no first use of a bucket stalls a tick."""
        if not self.graphs_enabled:
            return
        m, size = self.model, 1
        while size <= self.rows:
            for option in options:
                static = self._row_samplers(size, [CodeSampler(option, m.config.codec_vocab, m.device)])
                key = (size, static.keys)
                if key not in self._graphs:
                    self._graphs[key] = capture(lambda: self._fixed(size, static))
            size = bucket(size + 1)
