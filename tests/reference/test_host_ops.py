"""The eager decode step's host work, counted (not timed): on a GPU the step is bound by the host, whose cost
follows the number of ATen calls a step dispatches (bench/host_ops.py, bench/NOTES-fast.md round 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.host_ops import count_step_ops  # noqa: E402

# 676 top-level calls a step at the seed's shape (12 decoder layers, 8 codebooks, CFG, prior on) after the third
# session, 1086 before; the budget leaves room for a few calls, not for a per-item or per-codebook loop (each
# of those adds >= 8 a step).
STEP_OP_BUDGET = 700


@pytest.mark.slow
def test_eager_step_dispatches_within_its_op_budget():
    _, n, counts = count_step_ops(steps=8, width=8, rows=2)
    per_step = sum(counts.values()) / n
    assert n == 4
    assert per_step <= STEP_OP_BUDGET, (f"{per_step:.0f} ATen calls per eager decode step (budget {STEP_OP_BUDGET}); "
                                        f"most frequent: {counts.most_common(8)}")
    # no .item() in a step (on a GPU each is a sync; the step reads its results with one copy)
    assert counts["aten::item"] == 0, counts
