"""The backbone and the decoder: stacks of transformers' Llama layers over a static KV cache.

Neither consumes token ids (they take embeddings), so instead of `LlamaModel` (which owns
an embedding table the checkpoint does not have) we hold its parts: `LlamaDecoderLayer`s,
the final `LlamaRMSNorm` and `LlamaRotaryEmbedding`. The step runs them gpt-fast style:
the layers' own weights and norms, a hand-written attention over a preallocated
`KVCache` that the caller owns (so one set of weights serves many conversations), and no
per-call mask or cache objects. `reference_forward` runs the same step through
transformers' own layer forward; tests hold the two equal.
"""
from __future__ import annotations

import functools
import json
import logging
import contextlib
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding


class KVCache:
    """Preallocated keys and values for one layer stack: [layers][batch, kv_heads, capacity, head_dim].

    Entries are appended at slots `length, length + 1, ...`; a query sees the slots up to
    its own (causal by slot, not by RoPE position: the decoder feeds two inputs at
    position 0). `update` duck-types transformers' `Cache` for `reference_forward`.
    """

    def __init__(self, config, capacity: int, batch: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0  # slots filled so far
        self._n = 0      # slots being written by the running forward

    def reserve(self, needed: int) -> None:
        """Grow (doubling) so that `needed` slots fit; for caches whose length is open-ended."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                store[i] = new
        self.capacity = capacity

    def copy_from(self, other: "KVCache", length: int) -> None:
        """Take the first `length` slots of `other` (a shared prefix) and drop the rest."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:, :, :length].copy_(theirs[:, :, :length])
        self.length = length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        end = self.length + self._n
        self.keys[layer_idx][:, :, self.length:end] = key_states
        self.values[layer_idx][:, :, self.length:end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2 RMSNorm forward (see `_rms`)."""
    return _rms(x, norm.weight, norm.variance_epsilon)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused op: float32 statistics and the weight applied in the input's
    dtype, as transformers does (equal to it in float32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears that read the same input, and make
    each linear's parameters views into the result: one matmul then does the work of all
    (fewer ops per step), the parameters keep their names, and in-place edits of them show
    in the fused tensors. Returns (weight, bias)."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None
    start = 0
    for lin in linears:
        end = start + lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def pad_rows(rows: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """`rows` [..., n, k] copied into a zero-padded [..., n', k] with n' the next multiple of
    `multiple` (so that `Projection` can split it; the extra outputs are zeros to slice off)."""
    n = rows.shape[-2]
    padded = rows.new_zeros(*rows.shape[:-2], -(-n // multiple) * multiple, rows.shape[-1])
    padded[..., :n, :] = rows
    return padded


INVARIANT_CHUNK = 128   # rows per oneDNN call in batch-invariant mode; more run as several calls


def invariant_rows(n: int) -> int:
    """The row count at which a batch-invariant oneDNN call runs `n` rows (1 to
    INVARIANT_CHUNK): 2-8 as they are (one row as two: a lone row takes a kernel that
    reduces in another order), then 16, then the next multiple of 32.

    Why buckets: oneDNN (and torch's ideep layer over it, per thread) keeps a compiled
    kernel for every shape it has run, for good, so unbucketed row counts made a server
    grow call after call. Bucketed, every count (`INVARIANT_ROW_COUNTS`) is made at the
    engine's start (`warm_invariant`), and the padding rows cost little (benchmarks/README.md,
    "Findings behind the code")."""
    if n <= 8:
        return max(n, 2)
    return 16 if n <= 16 else -(-n // 32) * 32


INVARIANT_ROW_COUNTS = tuple(sorted({invariant_rows(n) for n in range(1, INVARIANT_CHUNK + 1)}))

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_PACK = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN_LINEAR is not None else None
_PLAN_BYTES = 64 << 20  # weight copies a plan cycles through: more than a CPU cache holds, as in the frame loop
_PLAN_GAIN = 0.9        # a path other than F.linear must take under 90% of its time to be chosen
_PLAN_SWEEPS = 3        # timed sweeps per path (after a warm-up one): the best of their medians counts
_PLANS: dict[tuple, str] = {}  # (out, in, dtype, bias, rows class, threads) -> path, per process
_STORED: dict[Path, dict[str, str]] = {}  # plan cache file -> its plans, read once per process
plans_measured = 0  # plans timed in this process (the others came from the plan cache)
logger = logging.getLogger(__name__)


class Projection:
    """y = x W^T + b for the per-frame step, with the fastest way to run it measured once
    per weight shape.

    On the CPU a step's 1-8 rows make every matmul a matrix-vector product that reads the
    whole weight from memory (the frame's other weights have evicted it from the caches),
    and which kernel streams fastest depends on the CPU and its BLAS (the "split" below
    wins on some CPUs and loses on others). So the first call with one row, and the first
    with 2-8 rows, times the candidate paths on copies of the weight (cycled so that each
    call reads from memory, `_PLAN_BYTES` in all) and keeps the fastest for that shape,
    dtype and thread count (`projection_plans()` lists the choices; `ChromaModel` plans
    all its projections at load). Choices are kept on disk (`plan_cache_file()`, keyed
    by CPU model and torch version too), so each is measured once per machine, not at
    every load. The paths:

    - "linear": F.linear (always on CUDA, and for more than 8 rows);
    - "split" (one row): W's rows as 8 (4, 2) blocks in one `bmm`, whose blocks run on
      all cores; the rows must split evenly (pad odd-sized heads with `pad_rows`);
    - "weight_first" (2-8 rows): `W @ x^T`, which MKL can run as a streaming
      multi-vector product where `x @ W^T` first repacks W;
    - "onednn" (2-8 rows, fp32/bf16): oneDNN's linear on a copy of W in its own blocked
      layout (`packed`, made at the first such call: a second copy of the weight).

    A path other than F.linear is chosen only when clearly faster (`_PLAN_GAIN`). All give
    F.linear's result up to float rounding, so results can differ in their last bits
    between machines (or, where two paths time alike, between processes); the environment
    variable CHROMA_AGENT_MATMUL=linear skips the timing and runs F.linear everywhere.
    `weight` stays the caller's tensor: views and in-place edits hold, except that the
    packed copy is not refreshed (`forget_packed`). `one_row` / `few_rows` force a path
    (tests, and the planner's own trials).
    """

    __slots__ = ("weight", "bias", "blocks", "one_row", "few_rows", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 one_row: str | None = None, few_rows: str | None = None):
        self.weight, self.bias, self.packed = weight, bias, None
        out_features, in_features = weight.shape
        split = next((b for b in (8, 4, 2) if out_features % b == 0), 0)
        self.blocks = weight.view(split, out_features // split, in_features) if split else None
        self.one_row, self.few_rows = one_row, few_rows
        if weight.device.type != "cpu" or not weight.is_contiguous():
            self.one_row = self.few_rows = "linear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _MODE.invariant:
            return self.invariant(x)
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            path = self.one_row or self.plan(1)
        elif rows <= 8:
            path = self.few_rows or self.plan(2)
        else:
            path = "linear"
        if path == "linear":
            return F.linear(x, self.weight, self.bias)
        if path == "split":
            blocks = self.blocks
            # x as a transposed [in, 1] view: MKL takes a much slower path for a contiguous column
            out = torch.bmm(blocks, x.reshape(1, -1).T.expand(blocks.shape[0], -1, -1))
            out = out.view(*x.shape[:-1], self.weight.shape[0])  # [blocks, n, 1] is the output's layout
            return out if self.bias is None else out + self.bias
        if path == "onednn":
            if self.packed is None:
                self.packed = _ONEDNN_PACK(self.weight, 8) if _ONEDNN_PACK is not None else self.weight
            return _ONEDNN_LINEAR(x, self.packed, self.bias, "none", [], "")
        columns = x.reshape(rows, -1).T  # "weight_first"; a transposed view, as for the blocks
        out = self.weight @ columns if self.bias is None else torch.addmm(self.bias[:, None], self.weight, columns)
        return out.T.reshape(*x.shape[:-1], self.weight.shape[0])

    def candidates(self, rows: int) -> list[str]:
        """The paths that can run `rows` rows of this weight."""
        if self.weight.device.type != "cpu" or not self.weight.is_contiguous() or rows > 8:
            return ["linear"]
        if rows == 1:
            return ["linear"] + (["split"] if self.blocks is not None else [])
        return ["linear", "weight_first"] + (["onednn"] if self._onednn_runs() else [])

    def _onednn_runs(self) -> bool:
        """Whether oneDNN's linear can run this weight (this torch has it; float32 or
        bfloat16, no float16)."""
        return _ONEDNN_LINEAR is not None and self.weight.dtype in (torch.float32, torch.bfloat16)

    @torch.inference_mode()
    def plan(self, rows: int) -> str:
        """Choose (measuring once per machine, shape, dtype and thread count) and set the
        path for one row (`rows` 1) or for 2-8 rows; returns it."""
        w = self.weight
        key = (*w.shape, w.dtype, self.bias is not None, rows > 1, torch.get_num_threads())
        pinned = os.environ.get("CHROMA_AGENT_MATMUL", "auto")
        if pinned not in ("auto", "linear"):
            raise ValueError(f"CHROMA_AGENT_MATMUL={pinned!r}: use 'auto' (measure each matmul's fastest path) "
                             "or 'linear' (F.linear everywhere)")
        if pinned == "linear":
            path = "linear"
        elif key not in _PLANS:
            path = _PLANS[key] = self._choose(key, rows)
        else:
            path = _PLANS[key]
        if rows == 1:
            self.one_row = path
        else:
            self.few_rows = path
        return path

    def _choose(self, key: tuple, rows: int) -> str:
        """This machine's stored plan for `key`, else a measured one (then stored)."""
        global plans_measured
        candidates = self.candidates(rows)
        if len(candidates) == 1:
            return candidates[0]
        name, file = f"{_machine()} | {_describe(key)}", plan_cache_file()
        path = _stored_plans(file).get(name)
        if path not in candidates:  # never measured here (or a path this torch lacks)
            path = _measure(self.weight, self.bias, rows if rows == 1 else 3, candidates)
            plans_measured += 1
            _store_plan(file, name, path)
        return path

    def invariant(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b where each row's result does not depend on the other rows or their
        number (batch invariance; what `batch_invariant()` switches every call to).

        F.linear, `W @ x^T` and the bmm split change a row's last bits with the row count
        (other kernels, other blockings of the reduction); oneDNN's linear on the packed
        weight gives a row the same bits at every count from 2 to `INVARIANT_CHUNK`, so it
        runs here, and a lone row (whose gemv kernel reduces in another order) is computed
        as two. Without oneDNN (or for float16) each row runs alone through F.linear:
        invariant, but the weight is read once per row. On CUDA this is plain F.linear:
        cuBLAS gives no such guarantee."""
        if self.weight.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        if not self._onednn_runs():
            out = torch.cat([F.linear(row, self.weight, self.bias) for row in flat.split(1)])
        else:
            if self.packed is None:
                self.packed = _ONEDNN_PACK(self.weight, 8)
            parts = [self._onednn_rows(part) for part in flat.split(INVARIANT_CHUNK)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.view(*x.shape[:-1], self.weight.shape[0])

    def _onednn_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """oneDNN's linear over `rows` [n, in] (n <= INVARIANT_CHUNK), run at
        `invariant_rows(n)` rows (zero rows pad the rest; a row's bits do not depend on the
        count, so padding changes none)."""
        n = rows.shape[0]
        count = invariant_rows(n)
        if count != n:
            rows = pad_rows(rows, count)   # n <= count: exactly `count` rows
        return _ONEDNN_LINEAR(rows, self.packed, self.bias, "none", [], "")[:n]

    @torch.inference_mode()
    def warm_invariant(self, every_count: bool = True) -> None:
        """Make now what batch-invariant calls would make at their first use: the packed
        weight, and (`every_count`) oneDNN's kernel for each of `INVARIANT_ROW_COUNTS`, so
        that serving allocates none of it later. Run it on the thread that will make the
        calls: part of oneDNN's cache is per thread. Nothing without oneDNN or on CUDA."""
        if self.weight.device.type != "cpu" or not self._onednn_runs():
            return
        with batch_invariant():
            for count in INVARIANT_ROW_COUNTS if every_count else (2,):
                self(self.weight.new_zeros(count, self.weight.shape[1]))

    def forget_packed(self) -> None:
        """Drop the packed copy (after an in-place edit of the weight)."""
        self.packed = None


def _measure(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, paths: list[str]) -> str:
    """The fastest of `paths` for `rows` rows, F.linear unless another is clearly faster.
    Each path runs over copies of the weight (the weight itself when it alone exceeds the
    caches), the paths interleaved sweep by sweep so that drift hits all alike. A path's
    time is the best over the sweeps of the median call in a sweep: robust to calls
    delayed by other work on a busy machine, which only ever make a path look slower."""
    if len(paths) == 1:
        return paths[0]
    copies = _PLAN_BYTES // (weight.numel() * weight.element_size())
    weights = list(weight.detach().repeat(copies, 1, 1)) if copies >= 2 else [weight]
    inputs = torch.Generator().manual_seed(0)  # not the global generator: loading a model leaves its state alone
    x = torch.randn(1, rows, weight.shape[1], generator=inputs).to(weight.dtype) / weight.shape[1] ** 0.5
    trials = {path: [Projection(w, bias, path, path) for w in weights] for path in paths}
    best = dict.fromkeys(paths, float("inf"))
    for sweep in range(1 + _PLAN_SWEEPS):  # the first sweep makes the packed copies and is not counted
        for path, projections in trials.items():
            calls = []
            for projection in projections:
                start = time.perf_counter()
                projection(x)
                calls.append(time.perf_counter() - start)
            if sweep:
                best[path] = min(best[path], statistics.median(calls))
    return _fastest(best)


def _fastest(seconds: dict[str, float]) -> str:
    """The path with the least time, if under `_PLAN_GAIN` of F.linear's; else "linear"."""
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] < _PLAN_GAIN * seconds["linear"] else "linear"


def _describe(key: tuple) -> str:
    out, inputs, dtype, bias, few, threads = key
    return (f"{out}x{inputs} {str(dtype).replace('torch.', '')} {'bias' if bias else 'no-bias'} "
            f"{'2-8 rows' if few else '1 row'} {threads} threads")


class _Mode(threading.local):
    invariant = False  # per thread: the engine's scheduler thread turns it on for itself only


_MODE = _Mode()


@contextlib.contextmanager
def batch_invariant():
    """Within this block, on this thread, every `Projection` gives each row the result it
    would give that row alone (`Projection.invariant`). With attention run per sequence
    and row-wise norms, a batched step then produces, bit for bit, what each of its
    sequences produces on its own: the engine's batched == alone."""
    previous, _MODE.invariant = _MODE.invariant, True
    try:
        yield
    finally:
        _MODE.invariant = previous


def projection_plans() -> dict[str, str]:
    """The paths chosen so far in this process, as 'out x in dtype bias rows threads': path."""
    return {_describe(key): path for key, path in _PLANS.items()}


def plan_cache_file() -> Path:
    """Where measured matmul plans are kept: $CHROMA_AGENT_CACHE_DIR, else
    $XDG_CACHE_HOME/chroma-agent, else ~/.cache/chroma-agent; file matmul-plans.json.
    Deleting it makes the next load measure again."""
    root = os.environ.get("CHROMA_AGENT_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chroma-agent"
    return Path(root) / "matmul-plans.json"


@functools.cache
def _machine() -> str:
    """What a plan depends on besides the matmul itself: the CPU model and torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:  # not Linux
        pass
    return f"{cpu} | torch {torch.__version__}"


def _read_plan_file(file: Path, warn: bool = True) -> dict[str, str]:
    try:
        plans = json.loads(file.read_text())["plans"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in plans.items()):
            raise ValueError("plans must map strings to strings")
        return plans
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if warn:
            logger.warning("ignoring the matmul plan cache %s, which cannot be read (%s); the plans are "
                           "measured again and the file rewritten", file, e)
        return {}


def _stored_plans(file: Path) -> dict[str, str]:
    if file not in _STORED:
        _STORED[file] = _read_plan_file(file)
    return _STORED[file]


def _store_plan(file: Path, name: str, path: str) -> None:
    """Add a plan to the cache file, atomically (other processes may read or write it too)."""
    plans = _stored_plans(file)
    plans[name] = path
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        on_disk = _read_plan_file(file, warn=False)  # plans other processes stored meanwhile
        tmp.write_text(json.dumps({"version": 1, "plans": {**on_disk, **plans}}, indent=0, sort_keys=True))
        os.replace(tmp, file)
    except OSError as e:  # a read-only home: plans are measured again next time, nothing worse
        logger.warning("cannot save the matmul plans to %s: %s", file, e)
        tmp.unlink(missing_ok=True)


class LayerStep:
    """A Llama or Qwen2 decoder layer's weights as the step reads them, gathered once:
    fused q/k/v and gate/up (`fuse_linears`), a `Projection` per matmul, the norms' weights
    and the attention's constants. A step then does no module or attribute lookups.
    Build again after the layer's parameters are replaced (moved or cast)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = Projection(*fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = Projection(attn.o_proj.weight, attn.o_proj.bias)
        self.gate_up = Projection(*fuse_linears(mlp.gate_proj, mlp.up_proj))
        self.down = Projection(mlp.down_proj.weight, mlp.down_proj.bias)
        # the activation module's own forward, without the module call (silu: F.silu)
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.scaling = attn.scaling

    @staticmethod
    def of(layer: nn.Module) -> "LayerStep":
        """The layer's step weights (built on first use)."""
        step = layer.__dict__.get("step")
        if step is None:
            step = layer.__dict__["step"] = LayerStep(layer)
        return step

    def projections(self) -> tuple[Projection, ...]:
        return self.qkv, self.o, self.gate_up, self.down

    @staticmethod
    def rebuild(layer: nn.Module) -> None:
        layer.__dict__["step"] = LayerStep(layer)


def attention_mask(n: int, start: int, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for n new queries after `start` filled slots: one query sees every
    filled slot; a block of queries is causal among itself."""
    if n == 1:
        return None, False
    if start == 0:
        return None, True
    return torch.ones(n, start + n, dtype=torch.bool, device=device).tril(start), False


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RoPE tables [batch, n, head_dim] made ready for `apply_rope`: a heads
    axis, and rotate_half's sign folded into sin (so a rotation is a roll, not a cat)."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with the same arithmetic in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention_block(step: LayerStep, index: int, x: torch.Tensor, cache: KVCache,
                    rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, causal: bool,
                    slots: torch.Tensor | None = None) -> torch.Tensor:
    """x + self-attention of one pre-norm layer, writing its keys/values at slots
    `cache.length ...` (the caller advances `cache.length` once all layers ran). `rope`:
    tables from `rope_tables`.

    With `slots` (a device tensor of slot indices) the shapes are fixed instead: keys and
    values are written at `slots`, and attention reads the whole cache under `mask`
    [n, capacity]. Nothing then depends on host-side lengths (CUDA-graph safe)."""
    heads = step.qkv(_rms(x, *step.norm1))
    return x + step.o(attend(step, index, heads, cache, rope, mask, causal, slots))


def attend(step: LayerStep, index: int, qkv: torch.Tensor, cache: KVCache,
           rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, causal: bool,
           slots: torch.Tensor | None = None) -> torch.Tensor:
    """The middle of `attention_block`: projected q/k/v rows `qkv` [batch, n, (heads +
    2 kv_heads) * head_dim] -> RoPE, keys/values into layer `index` of `cache`, attention;
    returns [batch, n, heads * head_dim] for the output projection. Separate so that a
    batch of ragged sequences can share the projections and attend one by one."""
    batch, n, _ = qkv.shape
    keys, values = cache.keys[index], cache.values[index]
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    heads = qkv.view(batch, n, -1, head_dim).transpose(1, 2)
    qk = apply_rope(heads[:, : -kv_heads], *rope)  # [batch, q + k heads, n, head_dim]: both at once
    q, k, v = qk[:, : -kv_heads], qk[:, -kv_heads:], heads[:, -kv_heads:]
    if slots is None:
        end = cache.length + n
        keys.narrow(2, cache.length, n).copy_(k)
        values.narrow(2, cache.length, n).copy_(v)
        keys, values = keys[:, :, :end], values[:, :, :end]
    else:
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
    if qkv.device.type == "cpu" and n <= 8 and not causal and keys.shape[2] >= 128:
        o = _attend_few(q, keys, values, mask, step.scaling)
    else:
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=step.scaling,
                                           enable_gqa=True)
    return o.transpose(1, 2).reshape(batch, n, -1)


def _attend_few(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """SDPA for a few queries over a long cache on the CPU: the query heads that share a
    key/value head are stacked as rows, so it is two matmuls over the cache (faster than
    the CPU flash kernel over a long cache, slower over a short one: `attend` uses it from
    128 keys on).
    q [batch, heads, n, dim]; keys/values [batch, kv_heads, L, dim]; `mask` [n, L] or None
    (every key visible), or [batch, n, L] (a mask per row)."""
    batch, heads, n, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scores = (q.reshape(batch, kv_heads, group * n, dim) @ keys.transpose(-1, -2)) * scale
    if mask is not None:
        mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, group, 1)[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(values.dtype)
    return (weights @ values).view(batch, heads, n, dim)


def mlp_block(step: LayerStep, x: torch.Tensor) -> torch.Tensor:
    """x + the gated MLP of one pre-norm layer."""
    gate, up = step.gate_up(_rms(x, *step.norm2)).chunk(2, dim=-1)
    return x + step.down(step.act(gate) * up)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, cache: KVCache,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Pre-norm decoder layers (Llama's, or Qwen2's, which add q/k/v biases) over `x`
    [batch, n, hidden], appending n slots to `cache`; returns the last layer's output
    (before any final norm). `rope`: the positions' tables from `rope_tables`."""
    mask, causal = attention_mask(x.shape[1], cache.length, x.device)
    for i, layer in enumerate(layers):
        step = LayerStep.of(layer)
        x = mlp_block(step, attention_block(step, i, x, cache, rope, mask, causal))
    cache.length += x.shape[1]
    return x


class LlamaStack(nn.Module):
    """`layers` + `norm` of a Llama decoder (the checkpoint's `<part>.model.*` tensors)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def _check(self, cache: KVCache, n: int) -> None:
        if cache.length + n > cache.capacity:
            raise RuntimeError(f"KV cache full: {cache.length} + {n} positions exceed its capacity of {cache.capacity}")

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (`rope_tables`) for `positions` [n], from transformers' rotary embedding."""
        return rope_tables(*self.rotary_emb(like, positions[None]))

    def forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at RoPE `positions` [n], appending to `cache`.
        Returns the final-norm hidden states [batch, n, hidden]. `rope`: precomputed
        `self.rope(positions)` for callers that reuse the same positions every frame."""
        self._check(cache, embeds.shape[1])
        x = run_layers(self.layers, embeds, cache, rope if rope is not None else self.rope(positions, embeds))
        return rms_norm(self.norm, x)

    def forward_static(self, embeds: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """`forward` with fixed shapes: `embeds` [batch, n, hidden] go to the device-side
        `slots` [n] (which are also their RoPE positions) and attend over the whole cache,
        masked to slots <= their own. `cache.length` is left to the caller. For CUDA graphs;
        equal to `forward` (tests run it eagerly on the CPU)."""
        rope = self.rope(slots, embeds)
        mask = torch.arange(cache.capacity, device=slots.device)[None, :] <= slots[:, None]
        x = embeds
        for i, layer in enumerate(self.layers):
            step = LayerStep.of(layer)
            x = mlp_block(step, attention_block(step, i, x, cache, rope, mask, False, slots))
        return rms_norm(self.norm, x)

    def reference_forward(self, embeds: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        """The same step through transformers' own `LlamaDecoderLayer.forward` (for tests)."""
        n = embeds.shape[1]
        self._check(cache, n)
        start = cache.length
        mask = None
        if n > 1:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=embeds.device).tril(start)[None, None]
        cache._n = n
        hidden = embeds
        cos_sin = self.rotary_emb(embeds, positions[None])
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=cache)
        cache.length = start + n
        return self.norm(hidden)
