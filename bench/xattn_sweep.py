"""The cross-attention kernel (reference/kernels.py) alone at the seed's shape: 64 conditional rows, 1 head x 128
dims, 128 text positions, bf16, prior on; microseconds per call (CUDA-graph replays) for a few (num_warps, d_chunk),
and the torch ops it replaces (two batched products and the softmax/prior chain, unfused) for comparison.

    python bench/xattn_sweep.py      (last line: BEST {...} -- FastDecoder keywords)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastpath import kernels  # noqa: E402
from fastpath.decoder import _xattn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

CONFIGS = [(4, None), (8, None), (16, None), (2, None), (4, 64), (8, 64), (4, 32), (8, 32)]  # (num_warps, d_chunk)


def main() -> int:
    torch.manual_seed(0)
    rows, H, T, D = 64, 1, 128, 128
    dt = torch.bfloat16
    q = torch.randn(rows, H * D, device="cuda", dtype=dt)
    mk, mv = (torch.randn(rows, H, T, D, device="cuda", dtype=dt) for _ in range(2))
    valid = torch.ones(rows, T, dtype=torch.bool, device="cuda")
    prior = torch.where(torch.rand(rows, T, device="cuda") < 0.05, 1.0, 1e-8).float()
    neg = ~valid[:, None, None, :]
    t_torch = replay_us(lambda i: _xattn(q[:, None], mk, mv, neg, prior, D**-0.5, H, D))
    print(f"| config | us/call |\n| --- | --- |\n| torch ops (bmm, softmax/prior chain, bmm; separate kernels) | {t_torch:.2f} |")
    best = None
    for nw, dc in CONFIGS:
        us = replay_us(lambda i: kernels.cross_attention(q, mk, mv, valid, prior, D**-0.5, nw, dc))
        best = min(best or (us, nw, dc), (us, nw, dc), key=lambda b: b[0])
        print(f"| kernel num_warps={nw} d_chunk={dc or D} | {us:.2f} |", flush=True)
    print("BEST " + json.dumps(dict(xattn_num_warps=best[1], xattn_d_chunk=best[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
