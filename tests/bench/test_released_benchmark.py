"""The seed benchmark's released shape and batch sweep (issue 19) on the CPU with tiny sizes (``--quick`` without a
GPU): every part reports, the fast path with the local transformer gives the eager reference's codes, and the merged
table has one row per shape x batch size plus NeMo's loop per shape, card and date on every row. No timing is
asserted."""

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
    assert p["codes_identical"] is True and p["attended_identical"] is True and p["max_abs_logit_diff"] < 1e-4
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines()
            if line.startswith(("| released", "| seed"))]
    assert len(rows) == 4 + (2 if nemo_available() else 0)
    assert all("| cpu, 20" in row for row in rows)
    if nemo_available():
        assert res["nemo_released"]["requests"] == 4 and res["nemo"]["float32"]["requests"] == 4
        assert sum("NeMo 3.0.0's loop (fp32)" in row for row in rows) == 2
