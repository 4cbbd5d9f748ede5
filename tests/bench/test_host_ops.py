"""The eager decode step's host work, counted (not timed): on a GPU the step is bound by the host, whose cost
follows the number of ATen calls a step dispatches (bench/RESULTS.md, round 4). The seed workload's *shape* (12 decoder
layers, 8 x 2024 codes, CFG, prior on, top-k 80) with tiny widths on the CPU, where each op costs about its dispatch:
a change that adds ops shows up here before device time is spent on it."""

from __future__ import annotations

import collections
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.seed_benchmark import PARAMS, make_requests, seed_config  # noqa: E402
from reference.model import MagpieTTS  # noqa: E402

# 676 top-level calls a step at the seed's shape (12 decoder layers, 8 codebooks, CFG, prior on) after the third
# session, 1086 before; the budget leaves room for a few calls, not for a per-item or per-codebook loop (each
# of those adds >= 8 a step).
STEP_OP_BUDGET = 700


def count_step_ops(steps: int, width: int, rows: int) -> tuple[int, collections.Counter]:
    """-> (decode steps counted, top-level ATen calls over those steps by name): a run of ``steps`` steps less one of
    4 (encoder, prefill and the first steps cancel); EOS is forbidden throughout so that both runs decode every step."""
    torch.manual_seed(0)
    cfg = seed_config()
    narrow = dict(d_model=width, d_ffn=2 * width, sa_n_heads=2)
    cfg = dataclasses.replace(cfg, d_model=width, encoder=dataclasses.replace(cfg.encoder, **narrow),
                              decoder=dataclasses.replace(cfg.decoder, xa_d_memory=width, xa_d_head=width, **narrow))
    model = MagpieTTS(cfg).eval()
    req = make_requests(cfg, rows)[0]  # the seed's requests: 128 text tokens, 160 context frames
    kw = dict(use_cfg=True, use_kv_cache=True, **PARAMS)
    from torch.profiler import ProfilerActivity, profile

    counts: collections.Counter = collections.Counter()
    n = 0
    for n_run, sign in ((steps, 1), (4, -1)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model.infer_batch(req, **dict(kw, max_decoder_steps=n_run, min_generated_frames=n_run))
        n += sign * out.num_steps
        for e in prof.events():
            if e.name.startswith("aten::") and e.cpu_parent is None:  # top-level ops: one dispatch each
                counts[e.name] += sign
    return n, counts


@pytest.mark.slow
def test_eager_step_dispatches_within_its_op_budget():
    n, counts = count_step_ops(steps=8, width=8, rows=2)
    per_step = sum(counts.values()) / n
    assert n == 4
    assert per_step <= STEP_OP_BUDGET, (f"{per_step:.0f} ATen calls per eager decode step (budget {STEP_OP_BUDGET}); "
                                        f"most frequent: {counts.most_common(8)}")
    # no .item() in a step (on a GPU each is a sync; the step reads its results with one copy)
    assert counts["aten::item"] == 0, counts
