"""cuDNN conv1d against F.linear for the decoder's kernel-1 FFN convolutions over one frame per row (a cached
decode step at 128 rows): microseconds per call on the GPU, fp32 (TF32 off) and bf16.

    python bench/conv_vs_linear.py

The eager reference keeps NeMo's conv1d (bit-identical to NeMo on the GPU too); NOTES-fast.md says why.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def conv_vs_linear(dtype, reps: int = 50) -> list[tuple]:
    """(label, us per call) for the two FFN products of one decode step's layer at 128 rows."""
    out = []
    for c_in, c_out in ((768, 3072), (3072, 768)):
        conv = torch.nn.Conv1d(c_in, c_out, 1, bias=False).cuda().to(dtype)
        x_rows = torch.randn(128, 1, c_in, device="cuda", dtype=dtype)
        cases = {"conv1d, input (B, C, 1) contiguous": lambda: conv(x_rows.transpose(1, 2).contiguous()),
                 "conv1d, input transposed view of (B, 1, C)": lambda: conv(x_rows.transpose(1, 2)),
                 "F.linear on (B, 1, C)": lambda: F.linear(x_rows, conv.weight[:, :, 0])}
        for label, fn in cases.items():
            for _ in range(5):
                fn()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(reps):
                fn()
            e1.record()
            torch.cuda.synchronize()
            out.append((f"{c_in}->{c_out} {label}", e0.elapsed_time(e1) * 1e3 / reps))
    return out


def main(argv=None) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"[info] {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    print("| dtype | product | us per call |\n| --- | --- | --- |")
    for dt in (torch.float32, torch.bfloat16):
        for label, us in conv_vs_linear(dt):
            print(f"| {str(dt).split('.')[-1]} | {label} | {us:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
