"""Host-side cost of the eager reference's decode step, measured on the CPU without a GPU.

The eager step on the lent H100 is bound by the host (run I: 3.4 ms of kernels in a ~10.9 ms step), so its time
follows the number of ops the loop dispatches. This runs the seed workload's *shape* (12 decoder layers, 8 x 2024
codes, 64 requests with CFG = 128 rows, prior on, top-k 80) with tiny widths on the CPU, where each op costs about
its dispatch, and prints the ops per decode step by name and the wall time per step. A change that removes ops
shows up here before device time is spent on it.

    python bench/host_ops.py [--steps 24] [--width 16] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.seed_benchmark import BATCH, PARAMS, make_requests, seed_config  # noqa: E402
from reference.model import MagpieTTS  # noqa: E402


def count_step_ops(steps: int = 24, width: int = 16, rows: int = 64) -> tuple[float, int, collections.Counter]:
    """-> (CPU ms per decode step, decode steps counted, top-level ATen calls over those steps by name).

    The counted steps are the difference between a run of ``steps`` and one of 4 steps (encoder, prefill and the
    first steps cancel); EOS is forbidden throughout so that both runs decode every step."""
    if not 1 <= rows <= BATCH:
        raise ValueError(f"rows must lie in [1, {BATCH}] (one batch of the seed workload), got {rows}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dispatch cost, not the CPU's parallel maths
    try:
        torch.manual_seed(0)
        cfg = seed_config()
        narrow = dict(d_model=width, d_ffn=2 * width, sa_n_heads=2)
        cfg = dataclasses.replace(cfg, d_model=width, encoder=dataclasses.replace(cfg.encoder, **narrow),
                                  decoder=dataclasses.replace(cfg.decoder, xa_d_memory=width, xa_d_head=width, **narrow))
        model = MagpieTTS(cfg).eval()
        req = make_requests(cfg, rows)[0]  # the seed's requests: 128 text tokens, 160 context frames
        kw = dict(use_cfg=True, use_kv_cache=True, **PARAMS)

        def run(n):
            t = time.perf_counter()
            out = model.infer_batch(req, **dict(kw, max_decoder_steps=n, min_generated_frames=n))
            return time.perf_counter() - t, out

        run(4)
        t_short = min(run(4)[0] for _ in range(3))
        t_long, out = min((run(steps) for _ in range(3)), key=lambda r: r[0])
        n = out.num_steps - 4
        from torch.profiler import ProfilerActivity, profile

        counts: collections.Counter = collections.Counter()
        for n_run, sign in ((steps, 1), (4, -1)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(n_run)
            for e in prof.events():
                if e.name.startswith("aten::") and e.cpu_parent is None:  # top-level ops: one dispatch each
                    counts[e.name] += sign
        return (t_long - t_short) / n * 1e3, n, counts
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="decode steps per run (the first 4 are not counted)")
    ap.add_argument("--width", type=int, default=16, help="d_model of the tiny model (seed: 768)")
    ap.add_argument("--rows", type=int, default=64, help="requests per batch (x2 rows with CFG)")
    ap.add_argument("--top", type=int, default=25, help="op names listed")
    a = ap.parse_args(argv)
    ms, n, counts = count_step_ops(a.steps, a.width, a.rows)
    print(f"rows {2 * a.rows}, width {a.width}, {n} decode steps counted: {ms:.2f} ms/step on the CPU (1 thread), "
          f"{sum(counts.values()) / n:.1f} top-level aten ops/step")
    for name, c in counts.most_common(a.top):
        print(f"  {c / n:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
