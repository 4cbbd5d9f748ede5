"""Microseconds per call of GPU work as the fast path runs it: captured in a CUDA graph and replayed, so host
launch time is not in the figure (bench/attn_sweep.py, xattn_sweep.py, gemm_sweep.py)."""

from __future__ import annotations

from typing import Callable

import torch


def replay_us(fn: Callable[[int], object], calls: int = 20, reps: int = 20, warmup: int = 3) -> float:
    """Capture ``fn(0) .. fn(calls - 1)`` in one graph (after ``warmup`` eager calls of ``fn(0)``: compiles,
    allocations), replay it ``reps`` times, return microseconds per call."""
    for _ in range(warmup):
        fn(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (reps * calls)
