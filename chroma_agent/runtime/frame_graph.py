"""CUDA graphs for the fixed-shape frame step: batch-size buckets and graph capture.

At batch 1 a frame's GPU work is hundreds of small kernels, which cost more to launch one
by one from Python than they compute. `FrameStep` in its fixed-shape mode (frame_step.py)
runs the same math with fixed shapes (a static KV cache with a row per reply, device-side
slot indices, masks instead of slices, sampling noise in static buffers) and, on CUDA,
captures it once per (batch bucket, sampling options in the batch) with `capture`, so a
frame is a buffer copy and one replay; on the CPU it runs eagerly (tests hold it equal to
the ragged step).
"""
from __future__ import annotations

from typing import Callable

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # batch sizes a batched step is captured at
STEP_INPUTS = 3  # positions a reply feeds per step: a frame's embedding, or it and a reasoner pair


def bucket(rows: int) -> int:
    """The smallest batch bucket holding `rows` rows (a multiple of the last past it)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return -(-rows // BUCKETS[-1]) * BUCKETS[-1]


def capture(run: Callable[[], None], restore: Callable[[], None] = lambda: None) -> "torch.cuda.CUDAGraph":
    """`run` (fixed shapes, device-side state only) captured as a CUDA graph. `restore`
    undoes a run's state changes, after each warm-up run and the capture."""
    # warm up on a side stream: lazy cuBLAS/SDPA initialisation must not be captured
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            restore()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    restore()
    return graph
