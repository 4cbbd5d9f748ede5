"""The decode step's GEMMs alone (bf16, 128 rows; 64 for the cross-attention's conditional rows): cuBLAS through
``torch.mm`` against ``reference.kernels.linear_partials`` (Triton: narrow column blocks times split-K slices, the
float32 partials summed by whatever follows), over a grid of (BLOCK_N, BLOCK_K, split_k, warps, stages), with the
weights read from HBM as in the real step (copies of each weight used in turn, >= 100 MB of them: twice what the
50 MB L2 holds), the activation hot in L2. Triton times include writing the partials, not summing them (the fast
path sums them inside the next fused elementwise kernel). Run U's plain ``tl.dot`` kernel is the split_k = 1 rows.

    python bench/gemm_sweep.py

Prints one table (microseconds per call; GB/s = weight bytes / time), the best tile per shape, and a ``BEST_GEMM``
JSON line (shape name -> [BLOCK_N, BLOCK_K, split_k, warps, stages]).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastpath.kernels import linear_partials  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

# (name, rows M, N out, K in) of one decoder layer at the seed's sizes, and final_proj
SHAPES = [("qkv_net", 128, 2304, 768), ("o_net", 128, 768, 768), ("xattn q_net", 64, 128, 768),
          ("xattn o_net", 64, 768, 128), ("ffn proj", 128, 3072, 768), ("ffn o_net", 128, 768, 3072),
          ("final_proj", 128, 16192, 768)]
MIN_BYTES = 100e6  # weight copies per shape: at least this many bytes, so they cannot stay in L2


def tiles(K: int) -> list:
    """(BLOCK_N, BLOCK_K, split_k, warps, stages) tried for a K: every split leaves >= 64 columns of K."""
    out = []
    for bn in (16, 32, 64):
        for sk in (1, 2, 4, 8):
            if K // sk >= 64:
                out.append((bn, 128 if K // sk >= 128 else 64, sk, 4, 3))
    return out + [(32, 64, 4, 4, 4), (64, 64, 1, 8, 3)]


def _time(fn, copies: int, n=200) -> float:
    """us per call, the weight copies used in turn (one graph of ``copies`` calls, replayed ~n/copies times)."""
    return replay_us(fn, calls=copies, reps=max(1, n // copies), warmup=5)


def main() -> int:
    torch.manual_seed(0)
    dt = torch.bfloat16
    print("| GEMM | M x N x K | weights MB | cuBLAS us | GB/s | best triton us (BLOCK_N, BLOCK_K, split_k, warps, stages) "
          "| GB/s | max abs diff |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    total_cublas = total_best = 0.0
    best_all = {}
    for name, M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        copies = max(4, int(-(-MIN_BYTES // (N * K * 2))))
        ws = [torch.randn(N, K, device="cuda", dtype=dt) / K**0.5 for _ in range(copies)]
        outs = [torch.empty(M, N, device="cuda", dtype=dt) for _ in range(copies)]
        mb = N * K * 2 / 1e6
        t_cublas = _time(lambda i: torch.mm(x, ws[i].t(), out=outs[i]), copies)
        ref = F.linear(x, ws[0]).float()
        best = None
        for cfg in tiles(K):
            bn, bk, sk, nw, ns = cfg
            run = lambda i, c=cfg: linear_partials(x, ws[i], c[2], c[0], c[1], c[3], c[4])  # noqa: E731
            try:
                t = _time(run, copies)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit: skip it, say so
                print(f"[skip] {name} tile {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            err = (run(0).float().sum(0) - ref).abs().max().item()
            print(f"[tile] {name} {cfg}: {t:.2f} us", flush=True)
            if best is None or t < best[0]:
                best = (t, cfg, err)
        total_cublas += t_cublas
        total_best += min(best[0], t_cublas) if best else t_cublas
        if best:
            best_all[name] = list(best[1])
        bt = f"{best[0]:.2f} {best[1]}" if best else "-"
        print(f"| {name} | {M} x {N} x {K} | {mb:.2f} | {t_cublas:.2f} | {mb * 1e-3 / (t_cublas * 1e-6):.0f} | {bt} | "
              f"{(mb * 1e-3 / (best[0] * 1e-6)) if best else 0:.0f} | {best[2] if best else 0:.1e} |", flush=True)
    print(f"sum over the table's {len(SHAPES)} GEMMs: cuBLAS {total_cublas:.1f} us, the faster of cuBLAS and the best "
          f"triton tile each {total_best:.1f} us")
    print("BEST_GEMM " + json.dumps(best_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
