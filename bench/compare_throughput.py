"""Throughput and peak memory of ``parity.compare.compare_dumps`` on two large fp16 dumps.

    python bench/compare_throughput.py                 # 2 x 4 GB in a temp dir, deleted afterwards
    python bench/compare_throughput.py --size-gb 2 --dir /scratch/bench --keep

Writes dump A (random, layer-like tensors) and dump B = A + small noise, then runs the comparison in
fresh subprocesses (so the peak RSS is the comparison's alone, not the generator's):

* "cold": right after ``posix_fadvise(DONTNEED)`` on every shard, i.e. read from disk
  (best effort: the kernel may keep some pages);
* "warm": a second run with the shards in the page cache.

Bytes compared count both dumps. Peak RSS is the comparing process's VmHWM (``ru_maxrss`` as a fallback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Layer-like shapes (elements): a mix of big activations, attention maps and small per-step tensors.
SHAPES = [(4, 1024, 2048), (4, 1024, 1024), (4, 8, 1024, 128), (4, 1, 2048), (4, 256, 768), (4, 64, 64, 16)]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def generate(root: pathlib.Path, size_gb: float, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path, int, float]:
    import torch

    from parity.dump import DumpWriter

    target = int(size_gb * 1e9)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    written = n = 0
    with DumpWriter(root / "a", source="reference", dtype="float16") as wa, DumpWriter(
        root / "b", source="trtllm", dtype="float16"
    ) as wb:
        while written < target:
            shape = SHAPES[n % len(SHAPES)]
            layer, step = divmod(n, len(SHAPES))
            name = f"decoder.layers.{layer % 24}.{['self_attention', 'cross_attention', 'pos_ff', 'x', 'y', 'z'][n % 6]}"
            a = torch.randn(shape, generator=g)
            b = a + 1e-3 * torch.randn(shape, generator=g)
            wa.add(name, a.half(), step=layer // 24)
            wb.add(name, b.half(), step=layer // 24)
            written += a.numel() * 2
            n += 1
    return root / "a", root / "b", n, time.perf_counter() - t0


def drop_cache(dirs: list[pathlib.Path]) -> None:
    os.sync()
    for d in dirs:
        for f in d.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(a: pathlib.Path, b: pathlib.Path, workers: int | None, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(a), str(b), "--chunk-elems", str(chunk)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak RSS of this process image. ru_maxrss would include the parent's RSS inherited at fork,
    so prefer VmHWM (per address space, reset by exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(a: str, b: str, workers: int | None, chunk: int) -> None:
    from parity.compare import compare_dumps

    t0 = time.perf_counter()
    r = compare_dumps(a, b, progress=False, workers=workers, chunk_elems=chunk)
    dt = time.perf_counter() - t0
    rss_mb = peak_rss_mb()
    worst = max(t.max_abs for t in r.tensors)
    print(json.dumps({"bytes": r.bytes_compared, "seconds": dt, "rss_mb": rss_mb, "tensors": len(r.tensors),
                      "passed": r.passed, "worst_max_abs": worst}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=4.0, help="size of EACH dump (GB, 1e9 bytes)")
    ap.add_argument("--dir", type=pathlib.Path, help="where to write the dumps (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the dumps afterwards")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to time (warm)")
    ap.add_argument("--chunk-elems", type=int, default=1 << 20)
    ap.add_argument("--child", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, workers=args.workers[0] if args.workers else None, chunk=args.chunk_elems)
        return 0

    root = pathlib.Path(tempfile.mkdtemp(prefix="parity-bench-", dir=args.dir))
    try:
        print(f"machine: {machine()}")
        print(f"date: {datetime.date.today().isoformat()}, torch threads default, chunk_elems={args.chunk_elems}")
        a, b, n, gen_s = generate(root, args.size_gb)
        size = sum(f.stat().st_size for d in (a, b) for f in d.iterdir())
        print(f"generated 2 dumps, {n} tensors each, {size / 1e9:.2f} GB on disk in {gen_s:.1f} s "
              f"({size / 1e9 / gen_s:.2f} GB/s incl. randn)")
        rows = []
        drop_cache([a, b])
        rows.append(("cold (fadvise DONTNEED)", args.workers[0], run_child(a, b, args.workers[0], args.chunk_elems)))
        for w in args.workers:
            rows.append(("warm (page cache)", w, run_child(a, b, w, args.chunk_elems)))
        print()
        print(f"| run | workers | bytes compared | seconds | GB/s | peak RSS (MB) | tensors | passed |")
        print(f"|---|---|---|---|---|---|---|---|")
        for label, w, r in rows:
            print(f"| {label} | {w} | {r['bytes'] / 1e9:.2f} GB | {r['seconds']:.2f} | {r['bytes'] / 1e9 / r['seconds']:.2f} | "
                  f"{r['rss_mb']:.0f} | {r['tensors']} | {r['passed']} |")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
