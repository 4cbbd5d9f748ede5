"""The seed benchmark's one command, on the CPU with a tiny model (``--cpu-smoke``): every part of the default table
runs and reports (a broken part would otherwise only show up on the GPU machine, where device time is scarce).
Nothing here depends on timing or machine load: the table's structure and the parity results are checked, never a
measured time (on a loaded CPU a per-step time, a difference of two wall times, can even come out negative).
The released shape and the batch sweep (issue 19) likewise: every part reports, the fast path with the local
transformer gives the eager reference's codes, and the merged table has one row per shape x batch size plus NeMo's
loop per shape, card and date on every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import nemo_available

REPO = Path(__file__).resolve().parents[2]


def _bench(*args):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "seed_benchmark.py"), *map(str, args)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_seed_benchmark_cpu_smoke(tmp_path):
    """As bench/gpu_check.sh runs it: the eager part in a fresh process, the other parts in a second one, then one
    merged table."""
    out = _bench("--cpu-smoke", "--parts", "eager", "--eager-reps", "2", "--out", tmp_path / "eager")
    out += _bench("--cpu-smoke", "--parts", "parity,fast,fast_fp8,nemo", "--out", tmp_path / "rest")
    _bench("--merge", tmp_path / "eager", tmp_path / "rest", "--out", tmp_path)
    fails = [line for line in out.splitlines() if line.startswith("[fail]")]
    allowed = () if nemo_available() else ("[fail] nemo",)  # without NeMo its part reports and the rest goes on
    assert all(f.startswith(allowed) for f in fails) if allowed else not fails, fails
    assert "[skip] fast_fp8" in out  # the float8 cache needs the Triton kernels: CUDA only
    res = json.loads((tmp_path / "results.json").read_text())
    # parity on the CPU: the fast path (the reference's attention ops) gives the eager reference's codes
    (label, p), = res["parity"]["fp32"].items()
    assert label == "reference attention ops" and p["codes_identical"] is True and p["attended_identical"] is True
    assert p["max_abs_logit_diff"] < 1e-4 and res["parity"]["forced"] == {}
    assert set(res["eager"]) == {"float32", "bfloat16"}
    assert all(len(r["ms_per_step_runs"]) == 2 and r["steps_run"] > 4 for r in res["eager"].values())
    assert [(r["label"], r["dtype"]) for r in res["fast"]] == [("FastDecoder (reference attention ops)", "float32")]
    if nemo_available():
        assert set(res["nemo"]) == {"float32", "bf16 autocast"}
        assert res["nemo_vs_reference_decoder_max_abs"] == 0.0
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = "| path | dtype | ms/step | frames/s | x real time | GB/s (floor bytes / step time) | x floor | card, date | notes |"
    assert lines[0].startswith("card: cpu") and lines[2] == header
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| path", "| ---"))]
    assert all(row.count("|") == header.count("|") and "| cpu, 20" in row for row in rows)
    eager = [row for row in rows if row.startswith("| eager reference, cached |")]
    assert [row.split(" | ")[1] for row in eager] == ["float32", "bfloat16"]
    assert all("median of 2 runs" in row for row in eager)
    assert any(row.startswith("| FastDecoder (reference attention ops) | float32 |") for row in rows)
    assert any(line.startswith("parity (TF32 off, 4 requests x 24 steps, topk=1): fp32 fast vs eager cached, "
                               "reference attention ops: codes identical = True") for line in lines)


@pytest.mark.slow
def test_released_shape_and_sweep_quick(tmp_path):
    parts = "sweep,parity" + (",nemo" if nemo_available() else "")
    out = _bench("--quick", "--shape", "released", "--parts", parts, "--out", tmp_path / "released")
    out += _bench("--quick", "--parts", "sweep" + (",nemo" if nemo_available() else ""), "--nemo-dtypes", "float32",
                  "--out", tmp_path / "seed")
    _bench("--merge", tmp_path / "released", tmp_path / "seed", "--out", tmp_path)
    assert not [line for line in out.splitlines() if line.startswith("[fail]")]
    res = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["shape"], r["requests"]) for r in res["sweep"]) == [
        ("released", 1), ("released", 4), ("seed", 1), ("seed", 4)]
    assert all(r["frames_per_step"] == r["requests"] * (2 if r["shape"] == "released" else 1) for r in res["sweep"])
    assert all(r["first_frame_ms"] > 0 and not r["compile_errors"] for r in res["sweep"])
    p = res["parity_released"]
    # fp32 on the CPU: the fast step's products over one new row against the eager prefix ops, ~1e-6 apart on these
    # tiny sizes; 1e-4 is the seed shape's bound above
    assert p["codes_identical"] is True and p["attended_identical"] is True and p["max_abs_logit_diff"] < 1e-4
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines()
            if line.startswith(("| released", "| seed"))]
    assert len(rows) == 4 + (2 if nemo_available() else 0)
    assert all("| cpu, 20" in row for row in rows)
    if nemo_available():
        assert res["nemo_released"]["requests"] == 4 and res["nemo"]["float32"]["requests"] == 4
        assert sum("NeMo 3.0.0's loop (fp32)" in row for row in rows) == 2
