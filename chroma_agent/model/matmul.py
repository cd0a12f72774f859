"""How the per-frame step runs a matmul on this machine: `Projection` measures the
candidate CPU paths once per weight shape (plans cached on disk per machine), and
`batch_invariant()` makes every row's result independent of how many rows run together
(the engine's batched == alone). Weights stay where the model holds them."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F


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


def batch_invariant_active() -> bool:
    """Whether this thread is inside `batch_invariant()`."""
    return _MODE.invariant


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


def rows_matmul(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, n, in] @ weight_t [in, out] (+ bias) as one matrix product per row (`bmm`):
    unlike a flattened [B * n, in] matmul, a row's result is the same at every batch size."""
    out = weight_t.shape[1]
    if out == 1:  # one output column takes a matrix-vector kernel that differs between batch sizes
        weight_t = F.pad(weight_t, (0, 1))
        bias = None if bias is None else F.pad(bias, (0, 1))
    w = weight_t.expand(x.shape[0], *weight_t.shape)
    y = torch.bmm(x, w) if bias is None else torch.baddbmm(bias, x, w)
    return y[..., :out] if out == 1 else y


def linear_in_mode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over x [B, n, in]; batch-invariant (`rows_matmul`) in that mode."""
    return rows_matmul(x, weight.T, bias) if batch_invariant_active() else F.linear(x, weight, bias)
