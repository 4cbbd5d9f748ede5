"""How much of a profiled stretch of decode steps ran kernels side by side: reads a torch.profiler chrome trace
(``PROFILE_TRACE=1`` with seed_benchmark's profile parts) and prints, per CUDA stream, its kernels' busy time, then the
time any kernel ran (the union over streams), the sum of kernel times and the part of it that overlapped another
stream's kernel, and the kernels grouped by name with their mean duration.

    python bench/trace_overlap.py TRACE.json [--steps N]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def union_us(intervals: list) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=40, help="decode steps in the trace (for per-step figures)")
    a = ap.parse_args(argv)
    events = json.load(open(a.trace))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise SystemExit(f"{a.trace}: no kernel events (a CUDA trace of torch.profiler is needed)")
    by_stream = defaultdict(list)
    by_name = defaultdict(list)
    for e in kernels:
        by_stream[e.get("args", {}).get("stream", e.get("tid"))].append((e["ts"], e["ts"] + e["dur"]))
        by_name[e["name"][:60]].append(e["dur"])
    all_iv = [iv for ivs in by_stream.values() for iv in ivs]
    span = max(b for _, b in all_iv) - min(a for a, _ in all_iv)
    busy = union_us(all_iv)
    total = sum(b - a for a, b in all_iv)
    n = a.steps
    print(f"{len(kernels)} kernels on {len(by_stream)} streams; per step: span {span / n:.1f} us, "
          f"some kernel running {busy / n:.1f} us, kernel time summed {total / n:.1f} us "
          f"(overlapped {(total - busy) / n:.1f} us, {100 * (total - busy) / max(total, 1e-9):.1f}%)")
    for s, ivs in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        print(f"  stream {s}: {len(ivs)} kernels, busy {union_us(ivs) / n:.1f} us a step")
    print("kernels by name (mean us, calls):")
    for name, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:16]:
        print(f"  {sum(d) / len(d):7.2f} us x {len(d):5d}  {sum(d) / n:7.1f} us a step  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
