"""A/B timings of the eager reference on the seed workload, in one process, alternating the settings so that a
drifting host or clock hits both sides alike; plus cuDNN conv1d against F.linear for the decoder's kernel-1
convolutions over one frame per row.

    python bench/eager_ab.py [--steps 480] [--reps 2]

Prints a table; times with torch.cuda.synchronize around each whole call (4-step runs subtracted, as in
seed_benchmark.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reference.model as ref_model  # noqa: E402
from bench.seed_benchmark import BATCH, FRAMES_PER_SECOND, PARAMS, make_requests, seed_config, timed  # noqa: E402
from reference.model import MagpieTTS  # noqa: E402
from reference.semantics import Semantics  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=480)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"[info] {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for dt in (torch.float32, torch.bfloat16):
        for label, us in conv_vs_linear(dt):
            print(f"[conv] {str(dt).split('.')[-1]:8s} {label}: {us:.1f} us", flush=True)
    torch.manual_seed(0)
    model = MagpieTTS(seed_config()).cuda().eval()
    reqs = [{k: v.cuda() for k, v in r.items()} for r in make_requests(model.config, 2 * BATCH)]
    kw = dict(use_cfg=True, use_kv_cache=True, **dict(PARAMS, max_decoder_steps=a.steps, min_generated_frames=a.steps))
    times: dict = {}
    for dtype in ("float32", "bfloat16"):
        sem = Semantics(dtype=dtype)
        for rep in range(a.reps):
            for linear in (True, False):
                ref_model.LINEAR_1X1_ON_CUDA = linear
                model.infer_batch(reqs[1], semantics=sem, **dict(kw, max_decoder_steps=4, min_generated_frames=4))
                t4 = statistics.median([timed(lambda: model.infer_batch(reqs[1], semantics=sem, **dict(
                    kw, max_decoder_steps=4, min_generated_frames=4)))[0] for _ in range(2)])
                t, out = timed(lambda: model.infer_batch(reqs[0], semantics=sem, **kw))
                ms = (t - t4) / (out.num_steps - 4) * 1e3
                times.setdefault((dtype, linear), []).append(ms)
                print(f"[eager] {dtype} kernel-1 conv as {'F.linear' if linear else 'cuDNN conv1d'} rep {rep}: "
                      f"{ms:.2f} ms/step over {out.num_steps} steps, {BATCH / ms * 1e3 / FRAMES_PER_SECOND:.0f}x real time",
                      flush=True)
    ref_model.LINEAR_1X1_ON_CUDA = True
    print("\n| dtype | kernel-1 conv | ms/step (each rep) | x real time (best) |\n| --- | --- | --- | --- |")
    for (dtype, linear), ms in times.items():
        print(f"| {dtype} | {'F.linear' if linear else 'cuDNN conv1d'} | {' / '.join(f'{m:.2f}' for m in ms)} | "
              f"{BATCH / min(ms) * 1e3 / FRAMES_PER_SECOND:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
