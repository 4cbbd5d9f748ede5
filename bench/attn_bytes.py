"""What sets the split-KV attention's time: the bytes it reads from HBM, or all the bytes it touches (HBM + L2)?
The fast path's kernel at the seed's mean step (128 rows, 12 heads x 64, 402 keys, head-major cache, the step's
key/value written) in three forms with its default tiles, bf16 and float8:

* shared: rows 64..127 read their first 163 keys from row 64 (the fast path: those reads hit L2);
* own: every row reads its own 402 keys (every byte from HBM);
* skipped: rows 64..127 attend only their last 239 keys (the HBM bytes of "shared", without its L2 reads).

Prints microseconds per call, and GB/s over the bytes touched and over the HBM bytes.

    python bench/attn_bytes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastpath.kernels import decode_attention, fp8_quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

ROWS, L, H, D, MEAN, PRE = 128, 643, 12, 64, 402, 163


def main() -> int:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}\n| cache | form | us/call | GB/s touched | GB/s from HBM |\n"
          "| --- | --- | --- | --- | --- |")
    for fp8 in (False, True):
        K = torch.randn(ROWS, L, H, D, device="cuda", dtype=torch.bfloat16)
        V = torch.randn_like(K)
        qkv = torch.randn(ROWS, 3, H, D, device="cuda", dtype=torch.bfloat16)
        exps = {}
        per_key = H * D * 2 * 2  # K + V bytes a key-row
        if fp8:
            (K, ke), (V, ve) = fp8_quantize(K), fp8_quantize(V)
            exps = dict(k_exp=ke.transpose(1, 2).contiguous(), v_exp=ve.transpose(1, 2).contiguous())
            per_key = H * (D + 1) * 2
        K, V = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (K, V))  # head-major
        kps, bn = (64, 64) if fp8 else (32, 32)
        half = ROWS // 2
        pre = torch.zeros(ROWS, device="cuda", dtype=torch.int32)
        pre[half:] = PRE
        full = torch.full((ROWS,), MEAN, device="cuda", dtype=torch.int32)
        short = full.clone()
        short[half:] = MEAN - PRE
        Lb = -(-MEAN // 64) * 64
        forms = {
            "shared": (full, dict(prefix_len=pre, prefix_row=half), ROWS * MEAN, ROWS * MEAN - (half - 1) * PRE),
            "own": (full, {}, ROWS * MEAN, ROWS * MEAN),
            "skipped": (short, {}, ROWS * MEAN - half * PRE, ROWS * MEAN - half * PRE),
        }
        for form, (lens, kw, touched, hbm) in forms.items():
            def call(i, lens=lens, kw=kw):
                return decode_attention(qkv[:, 0], K, V, lens, D**-0.5, kps, bn, max_keys=Lb, k_new=qkv[:, 1],
                                        v_new=qkv[:, 2], num_warps=1, **kw, **exps)
            us = replay_us(call, calls=20, reps=10)
            print(f"| {'float8' if fp8 else 'bf16'} | {form} | {us:.1f} | {touched * per_key / us / 1e3:.0f} | "
                  f"{hbm * per_key / us / 1e3:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
