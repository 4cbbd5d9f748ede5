"""The seed benchmark's one command, on the CPU with a tiny model (``--cpu-smoke``): every part of the default table
runs and reports (a broken part would otherwise only show up on the GPU machine, where device time is scarce)."""

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
    out = _bench("--cpu-smoke", "--parts", "eager2", "--eager-reps", "2", "--out", tmp_path / "eager")
    out += _bench("--cpu-smoke", "--parts", "parity,fast,nemo", "--out", tmp_path / "rest")
    _bench("--merge", tmp_path / "eager", tmp_path / "rest", "--out", tmp_path)
    fails = [line for line in out.splitlines() if line.startswith("[fail]")]
    allowed = () if nemo_available() else ("[fail] nemo",)  # without NeMo its part reports and the rest goes on
    assert all(f.startswith(allowed) for f in fails) if allowed else not fails, fails
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["parity"]["fp32_codes_identical"] is True
    assert set(res["eager2"]) == {"float32", "bfloat16"}
    assert all(r["ms_per_step"] > 0 and len(r["ms_per_step_runs"]) == 2 for r in res["eager2"].values())
    assert [r["label"] for r in res["fast"]] == ["fast"] and res["fast"][0]["ms_per_step"] > 0
    if nemo_available():
        assert set(res["nemo"]) == {"float32", "bf16 autocast"}
        assert res["nemo_vs_reference_decoder_max_abs"] == 0.0
    table = (tmp_path / "table.md").read_text()
    assert "| eager reference, cached | float32 |" in table and "median of 2 runs" in table
    assert "| fast (math) | float32 |" in table
