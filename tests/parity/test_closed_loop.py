"""parity.closed_loop: the closed-loop report's pure functions (engine codes vs reference codes)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.closed_loop import (compare_codes, compare_item, first_divergence, format_report, histogram, summarize,
                                to_dict, trailing_repeats)


@st.composite
def runs(draw):
    B, C, T = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 5, (B, C, T), generator=g)
    lens = torch.tensor([draw(st.integers(1, T)) for _ in range(B)])
    return codes, lens


@settings(max_examples=60, deadline=None)
@given(runs(), st.integers(1, 3))
def test_identical_codes_never_diverge(run, stacking):
    codes, lens = run
    items = compare_codes(codes, lens, codes.clone(), lens.clone(), frame_stacking=stacking)
    assert all(i.first is None and i.match_rate == 1.0 and i.length_diff == 0 for i in items)
    assert summarize(items).diverged == 0 and first_divergence(items) is None
    assert "identical" in format_report(items)


@settings(max_examples=80, deadline=None)
@given(runs(), st.data(), st.integers(1, 3))
def test_a_planted_change_is_found_exactly(run, data, stacking):
    codes, lens = run
    B, C, _T = codes.shape
    b = data.draw(st.integers(0, B - 1))
    t = data.draw(st.integers(0, int(lens[b]) - 1))
    c = data.draw(st.integers(0, C - 1))
    eng = codes.clone()
    eng[b, c, t] = codes[b, c, t] + 7  # codes are < 5: always a different token
    items = compare_codes(eng, lens, codes, lens, frame_stacking=stacking)
    d = items[b].first
    assert (d.kind, d.frame, d.step, d.codebook) == ("token", t, t // stacking, c)
    assert (d.engine_token, d.reference_token) == (int(codes[b, c, t]) + 7, int(codes[b, c, t]))
    assert items[b].match_rate == 1 - 1 / (C * int(lens[b]))
    assert all(i.first is None for k, i in enumerate(items) if k != b)
    assert first_divergence(items) is items[b]


@settings(max_examples=40, deadline=None)
@given(runs(), st.integers(1, 5))
def test_equal_prefix_and_a_shorter_run_is_a_length_divergence(run, cut):
    codes, lens = run
    short = (lens - cut).clamp_min(0)
    items = compare_codes(codes, short, codes, lens)
    for i, n, m in zip(items, short.tolist(), lens.tolist()):
        assert i.length_diff == n - m
        assert (i.first is None) == (n == m)
        if i.first is not None:
            assert (i.first.kind, i.first.frame) == ("length", n)


def test_trailing_repeats_eos_and_summary():
    ref = torch.tensor([[[1, 2, 3, 3, 3, 0]]])  # (1, 1, 6): length 5, the last three frames equal
    eng = torch.tensor([[[1, 2, 3, 3, 3, 3]]])  # length 6 = the run's max_decoder_steps: EOS never fired
    (i,) = compare_codes(eng, torch.tensor([6]), ref, torch.tensor([5]), max_steps=(6, 6))
    assert (i.engine_repeats, i.reference_repeats) == (3, 2)
    assert i.engine_eos_missing is True and i.reference_eos_missing is False
    # a length at the codes' width says nothing by itself (NeMo cuts the width where the last item's EOS fired)
    (i,) = compare_codes(eng, torch.tensor([6]), ref, torch.tensor([5]))
    assert i.engine_eos_missing is None and i.reference_eos_missing is None
    (i,) = compare_codes(eng, torch.tensor([6]), ref, torch.tensor([5]), max_steps=(12, None))
    assert i.engine_eos_missing is False and i.reference_eos_missing is None
    assert "engine?" not in format_report([i]) and "reference?" in format_report([i])
    assert i.first.kind == "length" and i.first.frame == 5 and i.match_rate == 1.0
    assert trailing_repeats(torch.tensor([[4]]), 1) == 0


def test_several_seeds_give_the_distribution_of_first_divergence_steps():
    ref = torch.zeros(2, 2, 10, dtype=torch.long)
    items = []
    for seed, frames in enumerate([(3, None), (7, 3), (9, None)]):
        eng = ref.clone()
        for b, f in enumerate(frames):
            if f is not None:
                eng[b, 1, f] = 1
        items += compare_codes(eng, None, ref, None, run=f"seed{seed}")
    s = summarize(items)
    assert (s.runs, s.items, s.diverged, s.first_steps) == (3, 6, 4, (3, 3, 7, 9))
    assert (s.min_step, s.median_step, s.max_step) == (3, 5.0, 9)
    assert sum(c for _lo, _hi, c in s.histogram) == 4
    text = format_report(items)
    assert "min 3, median 5, max 9" in text and "steps" in text
    assert to_dict(items)["summary"]["first_steps"] == [3, 3, 7, 9]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=30), st.integers(1, 10))
def test_histogram_puts_every_step_in_one_bin(steps, bins):
    h = histogram(steps, bins)
    assert sum(c for *_b, c in h) == len(steps) and len(h) <= bins
    assert h[0][0] == min(steps) and h[-1][1] == max(steps)
    assert all(a[1] + 1 == b[0] for a, b in zip(h, h[1:]))


def test_shape_mismatch_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="codebooks"):
        compare_codes(torch.zeros(1, 2, 3), None, torch.zeros(1, 3, 3), None)
    with pytest.raises(ValueError, match="codebooks"):
        compare_item(torch.zeros(2, 3), 3, torch.zeros(3, 3), 3)
