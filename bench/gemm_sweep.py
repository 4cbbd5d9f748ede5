"""The decode step's GEMMs alone (bf16, 128 rows; 64 for the cross-attention's conditional rows): cuBLAS through
``F.linear`` against a plain Triton ``tl.dot`` kernel over a few tile shapes, with the weights read from HBM as in
the real step (copies of each weight used in turn, >= 100 MB of them: twice what the 50 MB L2 holds), the
activation hot in L2. (Run P, the first run of this script, used 16 copies of every weight: the weights under 3 MB
then fit in L2, so its o_net / cross-attention rows were L2-warm.)

    python bench/gemm_sweep.py

Prints one table (microseconds per call; GB/s = weight bytes / time) and the best Triton tile per shape. This is a
measurement for NOTES-fast.md, not used by the fast path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

# (name, rows M, N out, K in) of one decoder layer at the seed's sizes, and final_proj
SHAPES = [("qkv_net", 128, 2304, 768), ("o_net", 128, 768, 768), ("xattn q_net", 64, 128, 768),
          ("xattn o_net", 64, 768, 128), ("ffn proj", 128, 3072, 768), ("ffn o_net", 128, 768, 3072),
          ("final_proj", 128, 16192, 768)]
TILES = [(16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (16, 128, 4, 4),
         (32, 64, 4, 5)]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
MIN_BYTES = 100e6  # weight copies per shape: at least this many bytes, so they cannot stay in L2


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def mm(X, W, OUT, M, N, K, sxm, swn, som, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # OUT (M, N) = X (M, K) @ W (N, K)^T, float32 accumulation
        pn = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(X + rm[:, None] * sxm + (k0 + rk)[None, :], mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K),
                        other=0.0)
            b = tl.load(W + rn[None, :] * swn + (k0 + rk)[:, None], mask=(rn[None, :] < N) & ((k0 + rk)[:, None] < K),
                        other=0.0)
            acc += tl.dot(a, b)
        tl.store(OUT + rm[:, None] * som + rn[None, :], acc.to(OUT.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return mm, triton.next_power_of_2


def _time(fn, copies: int, n=200) -> float:
    """us per call, the weight copies used in turn (one graph of ``copies`` calls, replayed ~n/copies times)."""
    return replay_us(fn, calls=copies, reps=max(1, n // copies), warmup=5)


def main() -> int:
    mm, p2 = _kernel()
    torch.manual_seed(0)
    dt = torch.bfloat16
    print("| GEMM | M x N x K | weights MB | cuBLAS us | GB/s | best triton us (BLOCK_N, BLOCK_K, warps, stages) | "
          "GB/s | max abs diff |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    total_cublas = total_best = 0.0
    for name, M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        copies = max(4, int(-(-MIN_BYTES // (N * K * 2))))
        ws = [torch.randn(N, K, device="cuda", dtype=dt) / K**0.5 for _ in range(copies)]
        outs = [torch.empty(M, N, device="cuda", dtype=dt) for _ in range(copies)]
        mb = N * K * 2 / 1e6
        t_cublas = _time(lambda i: torch.mm(x, ws[i].t(), out=outs[i]), copies)
        ref = F.linear(x, ws[0]).float()
        best = None
        for bn, bk, nw, ns in TILES:
            def run(i, bn=bn, bk=bk, nw=nw, ns=ns):
                mm[(-(-N // bn),)](x, ws[i], outs[i], M, N, K, x.stride(0), ws[i].stride(0), outs[i].stride(0),
                                   BLOCK_M=max(16, p2(M)), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            try:
                t = _time(run, copies)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit: skip it, say so
                print(f"[skip] {name} tile {(bn, bk, nw, ns)}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            run(0)
            err = (outs[0].float() - ref).abs().max().item()
            if best is None or t < best[0]:
                best = (t, (bn, bk, nw, ns), err)
        total_cublas += t_cublas
        total_best += best[0] if best else t_cublas
        bt = f"{best[0]:.2f} {best[1]}" if best else "-"
        print(f"| {name} | {M} x {N} x {K} | {mb:.2f} | {t_cublas:.2f} | {mb * 1e-3 / (t_cublas * 1e-6):.0f} | {bt} | "
              f"{(mb * 1e-3 / (best[0] * 1e-6)) if best else 0:.0f} | {best[2] if best else 0:.1e} |", flush=True)
    print(f"sum over the table's {len(SHAPES)} GEMMs: cuBLAS {total_cublas:.1f} us, best triton tile each "
          f"{total_best:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
