"""The cross-attention kernel (reference/kernels.py) alone at the seed's shape: 64 conditional rows, 1 head x 128
dims, 128 text positions, bf16, prior on; microseconds per call (CUDA-graph replays) for a few (num_warps, d_chunk),
and the torch ops it replaces (two batched products and the softmax/prior chain, unfused) for comparison.
``--block``: the whole sub-block after its norm instead -- cuBLAS q_net + the kernel + cuBLAS o_net (three launches,
FastDecoder's default) against ``kernels.cross_attention_block`` (one kernel, one program a row) for a few
(num_warps, d_chunk, block_k, block_n).

    python bench/xattn_sweep.py [--block]     (last line: BEST {...} -- FastDecoder keywords)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference import kernels  # noqa: E402
from reference.fast import _xattn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

CONFIGS = [(4, None), (8, None), (16, None), (2, None), (4, 64), (8, 64), (4, 32), (8, 32)]  # (num_warps, d_chunk)
# (num_warps, d_chunk, block_k, block_n) of cross_attention_block
BLOCK_CONFIGS = [(4, None, 64, 64), (8, None, 64, 64), (8, None, 128, 128), (16, None, 128, 128), (16, None, 256, 256),
                 (8, 32, 256, 256), (16, 32, 256, 256), (32, None, 256, 256), (16, 64, 768, 256), (32, 64, 768, 768)]


def block(q_in, mk, mv, valid, prior, D, dt) -> int:
    """--block: the sub-block after norm_xattn_query, three launches vs one."""
    torch.manual_seed(1)
    rows, DM = q_in.shape[0], 768
    x = torch.randn(rows, DM, device="cuda", dtype=dt)
    w_q = torch.randn(D, DM, device="cuda", dtype=dt) / DM**0.5
    w_o = torch.randn(DM, D, device="cuda", dtype=dt) / D**0.5

    def three():
        y, p = kernels.cross_attention(torch.nn.functional.linear(x, w_q), mk, mv, valid, prior, D**-0.5, 4, None)
        return torch.nn.functional.linear(y, w_o), p

    ref = three()[0].float()
    t3 = replay_us(lambda i: three())
    print(f"| config | us/call | max abs vs three launches |\n| --- | --- | --- |\n| cuBLAS q_net + kernel + cuBLAS "
          f"o_net (default) | {t3:.2f} | - |", flush=True)
    best = None
    for nw, dc, bk, bn in BLOCK_CONFIGS:
        fn = lambda i: kernels.cross_attention_block(x, w_q, mk, mv, valid, prior, w_o, D**-0.5, nw, dc, bk, bn)  # noqa
        try:
            err = (fn(0)[0].float() - ref).abs().max().item()
            us = replay_us(fn)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile (registers, shared memory): say so
            print(f"| block num_warps={nw} d_chunk={dc or D} block_k={bk} block_n={bn} | failed: "
                  f"{str(e).splitlines()[0][:120]} | - |", flush=True)
            continue
        best = min(best or (us, nw, dc, bk, bn), (us, nw, dc, bk, bn), key=lambda b: b[0])
        print(f"| block num_warps={nw} d_chunk={dc or D} block_k={bk} block_n={bn} | {us:.2f} | {err:.1e} |", flush=True)
    if best:
        print(f"BEST_BLOCK {json.dumps(dict(zip(('us', 'num_warps', 'd_chunk', 'block_k', 'block_n'), best)))}")
    return 0


def main() -> int:
    torch.manual_seed(0)
    rows, H, T, D = 64, 1, 128, 128
    dt = torch.bfloat16
    q = torch.randn(rows, H * D, device="cuda", dtype=dt)
    mk, mv = (torch.randn(rows, H, T, D, device="cuda", dtype=dt) for _ in range(2))
    valid = torch.ones(rows, T, dtype=torch.bool, device="cuda")
    prior = torch.where(torch.rand(rows, T, device="cuda") < 0.05, 1.0, 1e-8).float()
    neg = ~valid[:, None, None, :]
    if "--block" in sys.argv[1:]:
        return block(q, mk, mv, valid, prior, D, dt)
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
