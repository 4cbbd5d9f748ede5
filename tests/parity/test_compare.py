"""Comparison metrics and tolerance policies (parity.tolerances). Data is random (never all-zero) and drawn per
example."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.compare import compare_dumps, compare_streams, compare_tensors
from parity.dump import DumpError, write_dump
from parity.tolerances import DTYPE_DEFAULTS, PolicyError, Tolerance, TolerancePolicy, dtype_default, policy

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def tensor_pairs(draw, dtypes=FLOAT_DTYPES):
    """(a, b) of one shape: b random with a spread of magnitudes, a = b + noise; some exact zeros in b."""
    n = draw(st.integers(1, 400))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
    noise = draw(st.sampled_from([0.0, 1e-7, 1e-3, 1.0]))
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * scale * torch.exp(torch.randn(n, generator=g))
    zeros = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.2]))
    b[zeros] = 0.0
    b[0] = b[0] if b[0] != 0 else 1.0  # never all zero
    a = b + noise * torch.randn(n, generator=g)
    # keep inputs finite in the target dtype (1e3 * exp(randn) can exceed float16's 65504)
    lim = min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 4
    return a.clamp(-lim, lim).to(dtype), b.clamp(-lim, lim).to(dtype)


FIELDS_EXACT = ("passed", "n_failed", "numel", "nan_a", "nan_b", "inf_a", "inf_b", "q99_abs", "median_abs")
FIELDS_CLOSE = ("max_abs", "mean_abs", "max_rel", "mean_rel", "cosine")


@SETTINGS
@given(tensor_pairs())
def test_zero_error_iff_equal(pair):
    a, b = pair
    r = compare_tensors(a, b)
    assert (r.max_abs == 0.0) == torch.equal(a, b)
    same = compare_tensors(b, b.clone())
    assert same.max_abs == 0 and same.mean_abs == 0 and same.q99_abs == 0 and same.passed
    assert same.cosine == pytest.approx(1.0, abs=1e-6)


@SETTINGS
@given(tensor_pairs())
def test_max_abs_symmetric(pair):
    a, b = pair
    assert compare_tensors(a, b).max_abs == compare_tensors(b, a).max_abs


@SETTINGS
@given(tensor_pairs(), st.sampled_from([1e-30, 1e-38, 1e-45, 0.0]))
def test_rel_finite_near_zero_denominators(pair, tiny_ref):
    a, b = pair
    b = b.clone()
    b[: max(1, b.numel() // 3)] = tiny_ref  # zero and subnormal references
    r = compare_tensors(a, b)
    for f in ("max_abs", "mean_abs", "max_rel", "mean_rel", "cosine", "q99_abs", "median_abs", "tol_ratio"):
        assert math.isfinite(getattr(r, f)), f


@SETTINGS
@given(tensor_pairs())
def test_cosine_in_range(pair):
    a, b = pair
    for x, y in ((a, b), (a, -b), (b, a)):
        c = compare_tensors(x, y).cosine
        assert -1.0 <= c <= 1.0


@SETTINGS
@given(tensor_pairs(), st.data())
def test_streaming_equals_one_shot(pair, data):
    a, b = pair
    tol = Tolerance(data.draw(st.sampled_from([0.0, 1e-4, 1e-2])), data.draw(st.sampled_from([0.0, 1e-3, 0.1])))
    whole = compare_tensors(a, b, tol)
    ca = data.draw(st.integers(1, a.numel()))
    cb = data.draw(st.integers(1, a.numel()))  # the two streams need not share chunk boundaries
    split = lambda t, c: [t[i : i + c] for i in range(0, t.numel(), c)]  # noqa: E731
    streamed = compare_streams(split(a, ca), split(b, cb), tol, dtype_a=a.dtype, dtype_b=b.dtype, shape=b.shape)
    for f in FIELDS_EXACT:
        assert getattr(streamed, f) == getattr(whole, f), f
    for f in FIELDS_CLOSE:
        # cosine is a ratio of chunked float32 dot products: different chunk boundaries round differently, by up
        # to ~sqrt(n) * 2^-24 of |a||b| (~1e-6 at n = 400), which near-orthogonal pairs make large *relative* error.
        atol = 1e-6 if f == "cosine" else 1e-12
        assert getattr(streamed, f) == pytest.approx(getattr(whole, f), rel=1e-5, abs=atol), f


@SETTINGS
@given(tensor_pairs(), st.data())
def test_n_failed_matches_definition(pair, data):
    a, b = pair
    tol = Tolerance(data.draw(st.sampled_from([0.0, 1e-3, 1e-1])), data.draw(st.sampled_from([0.0, 1e-2])))
    r = compare_tensors(a, b, tol)
    d = (a.double() - b.double()).abs()
    expect = ((d > tol.atol) & (d > tol.rtol * b.double().abs())).sum().item()
    # float32 math (fp16/bf16 inputs) may round a boundary element differently from float64
    assert abs(r.n_failed - expect) <= (0 if a.dtype in (torch.float32, torch.float64) else max(1, expect // 100))
    assert r.passed == (r.n_failed == 0)


@SETTINGS
@given(tensor_pairs(dtypes=[torch.float32, torch.float16]), st.data())
def test_nan_in_both_at_same_place_fails(pair, data):
    a, b = pair
    a, b = a.clone(), b.clone()
    i = data.draw(st.integers(0, a.numel() - 1))
    a[i] = b[i] = float("nan")
    r = compare_tensors(a, b, Tolerance(1e9, 1e9))
    assert not r.passed and r.nan_a == 1 and r.nan_b == 1 and r.n_failed >= 1
    assert not compare_tensors(a, b, Tolerance(1e9, 1e9, check="max")).passed


@SETTINGS
@given(st.integers(2, 300), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_inf_matching_passes_and_is_counted(n, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g).to(dtype)
    a = b.clone()
    a[0] = b[0] = float("inf")
    a[-1] = b[-1] = float("-inf")
    r = compare_tensors(a, b)
    assert r.passed and r.inf_a == 2 and r.inf_b == 2 and r.max_abs == 0.0 and r.n_failed == 0
    assert r.cosine == pytest.approx(1.0, abs=1e-6)
    a2 = a.clone()
    a2[0] = 1.0  # Inf vs finite
    bad = compare_tensors(a2, b)
    assert not bad.passed and bad.n_failed == 1 and bad.max_abs == math.inf
    a3 = a.clone()
    a3[0] = float("-inf")  # opposite-signed Inf
    assert not compare_tensors(a3, b, Tolerance(1e9, 1e9)).passed


def test_shape_mismatch_fails_with_reason():
    a = torch.randn(2, 3)
    r = compare_tensors(a, a.reshape(3, 2))
    assert not r.passed and "shape" in r.reason and r.shape_a == (2, 3) and r.shape == (3, 2)


def test_stream_length_mismatch_fails_with_reason():
    a = torch.randn(10)
    r = compare_streams([a], [a[:7]], Tolerance(0, 0), dtype_a=a.dtype, dtype_b=a.dtype, shape=(10,))
    assert not r.passed and "length" in r.reason


@pytest.mark.parametrize("check", ["max", "mean", "median", "quantile"])
def test_statistic_checks(check):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(10_000, generator=g)
    a = b + 1e-4 * torch.randn(10_000, generator=g)
    a[17] += 1.0  # one outlier: fails max and elemwise, passes mean/median/quantile
    r = compare_tensors(a, b, Tolerance(1e-3, 0.0, check=check))
    assert r.passed == (check != "max")
    assert not compare_tensors(a, b, Tolerance(1e-3, 0.0)).passed


def test_quantiles_close_to_exact():
    g = torch.Generator().manual_seed(4)
    b = torch.randn(100_000, generator=g)
    a = b + torch.randn(100_000, generator=g) * 1e-3
    r = compare_tensors(a, b)
    d = (a.double() - b.double()).abs()
    for got, q in ((r.q99_abs, 0.99), (r.median_abs, 0.5)):
        exact = torch.quantile(d, q).item()
        assert exact * 0.99 <= got <= exact * 1.13


def test_policy_lookup_and_dtype_defaults(tmp_path):
    f = tmp_path / "tol.json"
    f.write_text(
        json.dumps(
            {
                "default": {"atol": 1e-3, "rtol": 1e-3},
                "per_name": {
                    "decoder.layers.*.cross_attention.attn_probs": {"atol": 0.1, "rtol": 0, "check": "max"},
                    "logits": {"atol": 2, "rtol": 2},
                },
            }
        )
    )
    p = TolerancePolicy.from_file(f)
    assert p.lookup("decoder.layers.11.cross_attention.attn_probs") == Tolerance(0.1, 0, "max")
    assert p.lookup("logits").atol == 2
    assert p.lookup("encoder.norm_out") == Tolerance(1e-3, 1e-3)
    empty = TolerancePolicy()
    assert empty.lookup("x", "float32", "float32") == Tolerance(1e-5, 1e-5)
    assert empty.lookup("x", "float16", "float32") == Tolerance(1e-2, 1e-2)
    assert empty.lookup("x", "bfloat16", "float16") == Tolerance(5e-2, 5e-2)
    assert dtype_default("int64", "int64") == Tolerance(0, 0)
    assert TolerancePolicy({"": Tolerance(7, 7)}).lookup("anything") == Tolerance(7, 7)


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"default": {"atol": -1, "rtol": 0}}', '{"per_name": {"x": {"atol": 1}}}', '{"defaults": {}}',
     '{"default": {"atol": 1, "rtol": 1, "check": "bogus"}}'],
)
def test_bad_policy_file_names_it(tmp_path, content):
    f = tmp_path / "tol.json"
    f.write_text(content)
    with pytest.raises(PolicyError, match="tol.json"):
        TolerancePolicy.from_file(f)
    with pytest.raises(PolicyError, match="nope.json"):
        TolerancePolicy.from_file(tmp_path / "nope.json")


def _pair(tmp_path, perturb=None, **kw_a):
    g = torch.Generator().manual_seed(7)
    ts = [
        ("text_embedding", None, torch.randn(2, 5, 8, generator=g)),
        ("encoder.layers.0", None, torch.randn(2, 5, 8, generator=g)),
        ("decoder.layers.0.cross_attention", 0, torch.randn(2, 1, 8, generator=g)),
        ("decoder.layers.0.cross_attention", 1, torch.randn(2, 1, 8, generator=g)),
        ("logits", 1, torch.randn(2, 1, 11, generator=g)),
    ]
    b = write_dump(tmp_path / "b", ts, source="reference", config_hash="h")
    ts_a = [(n, s, perturb(n, s, t) if perturb else t) for n, s, t in ts]
    a = write_dump(tmp_path / "a", ts_a, **{"source": "trtllm", "config_hash": "h", **kw_a})
    return a, b


def test_compare_dumps_order_and_first_divergence(tmp_path):
    def perturb(n, s, t):
        return t + 1e-2 if (n, s) in {("decoder.layers.0.cross_attention", 1), ("logits", 1)} else t

    a, b = _pair(tmp_path, perturb)
    r = compare_dumps(a, b, progress=False, workers=2)
    assert [t.key for t in r.tensors][:2] == [("text_embedding", None), ("encoder.layers.0", None)]
    assert r.first_divergence == ("decoder.layers.0.cross_attention", 1)
    assert not r and not r.passed and len(r.failed) == 2
    only = compare_dumps(a, b, names=["encoder.*", "text_*"], progress=False)
    assert only.passed and len(only.tensors) == 2


def test_compare_dumps_missing_and_shape_mismatch(tmp_path):
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 3, generator=g), torch.randn(5, generator=g)
    b = write_dump(tmp_path / "b", [("x", None, x), ("y", 0, y), ("z", None, y)], source="nemo")
    a = write_dump(tmp_path / "a", [("x", None, x.reshape(3, 4)), ("y", 0, y), ("w", 2, y)], source="reference")
    r = compare_dumps(a, b, progress=False)
    assert r.missing_in_a == [("z", None)] and r.missing_in_b == [("w", 2)]
    assert r.first_divergence == ("x", None) and "shape" in r.tensors[0].reason
    assert r.tensors[1].passed and not r.passed


def test_compare_dumps_incompatible_config_hash(tmp_path):
    a, b = _pair(tmp_path, config_hash="other")
    with pytest.raises(DumpError, match="config_hash"):
        compare_dumps(a, b, progress=False)


def test_compare_dumps_defaults_to_the_empty_named_policy(tmp_path):
    """No policy: the "" policy of parity.tolerances (per-dtype defaults) decides and is reported per tensor."""
    g = torch.Generator().manual_seed(0)
    b16 = torch.randn(64, generator=g).half()
    a = write_dump(tmp_path / "a", [("x", None, b16 + 5e-3), ("n", None, torch.arange(4))], source="reference")
    b = write_dump(tmp_path / "b", [("x", None, b16), ("n", None, torch.arange(4))], source="reference")
    res = compare_dumps(a, b, progress=False)
    assert [t.tolerance for t in res.tensors] == [policy("").lookup("x", "float16", "float16"), Tolerance(0, 0)]
    assert res.passed
    strict = compare_dumps(a, b, policy=policy("steps"), progress=False)
    assert not strict.passed and strict.first_divergence == ("x", None)


# ------------------------------------------------------------------------------------------- exact dtypes

INT_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def test_int64_beyond_float64_precision_fails():
    """2**62 and 2**62 + 100 are one float64; compared in int64 they differ (the old float64 path said 'match')."""
    a, b = torch.tensor([2**62, 7]), torch.tensor([2**62 + 100, 7])
    r = compare_tensors(a, b)
    assert not r.passed and r.exact and r.n_failed == 1 and r.tol_ratio is None
    assert r.max_abs == 100.0 and r.tolerance == Tolerance(0, 0)
    # whatever the policy says for the name: integers are equal or not
    loose = compare_tensors(a, b, Tolerance(1e30, 1e30))
    assert not loose.passed and loose.tolerance == Tolerance(0, 0)


def test_int64_differences_that_overflow_int64_are_reported():
    a = torch.tensor([-2**63, 2**63 - 1, 0])
    b = torch.tensor([2**63 - 1, -2**63, 0])
    r = compare_tensors(a, b)
    assert r.n_failed == 2 and r.max_abs == pytest.approx(2.0**64) and not r.passed


def test_exact_dumps_fail_through_compare_dumps_and_report_mismatch_counts(tmp_path):
    from parity.report import format_table, to_json

    a = write_dump(tmp_path / "a", [("predicted_codes", None, torch.tensor([[2**62, 1, 2]]))], source="trtllm")
    b = write_dump(tmp_path / "b", [("predicted_codes", None, torch.tensor([[2**62 + 100, 1, 2]]))],
                   source="reference")
    res = compare_dumps(a, b, policy=policy("steps"), progress=False)
    t = res.tensors[0]
    assert not res.passed and t.exact and t.n_failed == 1 and t.tol_ratio is None
    table = format_table(res)
    assert "1/3 elements differ (exact int64 vs int64)" in table and "1 differ" in table
    rep = to_json(res)
    assert rep["tensors"][0]["exact"] is True and rep["tensors"][0]["n_failed"] == 1


@st.composite
def int_pairs(draw):
    da, db = draw(st.sampled_from(INT_DTYPES)), draw(st.sampled_from(INT_DTYPES))

    def values(dt):
        if dt == torch.bool:
            return st.booleans()
        info = torch.iinfo(dt)
        edges = st.sampled_from([info.min, info.max, 0, -1 if info.min < 0 else 1, info.max - 1])
        return st.one_of(edges, st.integers(info.min, info.max))

    n = draw(st.integers(1, 40))
    xs = draw(st.lists(values(da), min_size=n, max_size=n))
    same = draw(st.booleans())
    ys = [y for y in xs] if same and da == db else draw(st.lists(values(db), min_size=n, max_size=n))
    if same and da == db and draw(st.booleans()):  # one element off by the smallest step the dtype allows
        i = draw(st.integers(0, n - 1))
        ys[i] = (not ys[i]) if db == torch.bool else (ys[i] - 1 if ys[i] > torch.iinfo(db).min else ys[i] + 1)
    return torch.tensor(xs, dtype=da), torch.tensor(ys, dtype=db)


@settings(max_examples=300, deadline=None)
@given(int_pairs(), st.integers(1, 50))
def test_integer_verdict_is_torch_equal(pair, chunk):
    """For every pair of integer/bool dtypes and values (extremes included), compare's verdict is torch.equal on
    the values (widened to int64: exact for every dtype here), and n_failed counts the differing elements."""
    a, b = pair
    wa, wb = a.to(torch.int64), b.to(torch.int64)
    r = compare_tensors(a, b, chunk_elems=chunk)
    assert r.exact and r.passed == torch.equal(wa, wb)
    assert r.n_failed == int((wa != wb).sum())
    assert (r.max_abs == 0.0) == torch.equal(wa, wb)


def test_worst_index_is_where_the_largest_error_is_across_chunks():
    b = torch.zeros(3, 4, 5)
    a = b.clone()
    a[2, 1, 3] = 0.5
    a[0, 0, 1] = 0.25
    for chunk in (None, 7):
        r = compare_tensors(a, b, Tolerance(1e-3, 0), chunk_elems=chunk)
        assert r.worst_index == (2, 1, 3) and r.max_abs == 0.5
    a[1, 2, 0] = float("nan")  # NaN counts as the largest error
    assert compare_tensors(a, b, chunk_elems=7).worst_index == (1, 2, 0)
    assert compare_tensors(b, b.clone()).worst_index is None  # nothing differs


def test_exact_worst_index_is_the_first_differing_element():
    b = torch.arange(24).reshape(2, 3, 4)
    a = b.clone()
    a[1, 0, 2] += 1
    a[1, 2, 3] += 9
    r = compare_tensors(a, b, chunk_elems=5)
    assert r.exact and r.n_failed == 2 and r.worst_index == (1, 0, 2) and r.tol_ratio is None


def test_codes_against_float_codes_and_zero_tolerance_count_mismatches():
    codes = torch.randint(0, 70, (2, 4, 9))
    as_float = codes.to(torch.float32)
    as_float[1, 3, 8] = 0.5 + as_float[1, 3, 8]
    r = compare_tensors(as_float, codes)
    assert r.exact and r.n_failed == 1 and r.tol_ratio is None and r.worst_index == (1, 3, 8)
    x = torch.zeros(4)
    y = x.clone()
    y[2] = 1e-3  # a zero tolerance on floats: a count of differing elements, never 1e-3 / 0
    r = compare_tensors(y, x, Tolerance(0, 0))
    assert r.exact and r.n_failed == 1 and r.tol_ratio is None and r.tolerance == Tolerance(0, 0)


def test_default_tolerance_follows_the_runs_precision_not_the_stored_dtype(tmp_path):
    from parity.dump import write_dump

    b = torch.randn(2, 8)
    a = b + 1e-2  # bfloat16 noise on float32-stored logits of a bfloat16 run
    ra = write_dump(tmp_path / "a", [("logits", 0, a), ("hidden", 0, a.bfloat16())], source="reference",
                    dtype="bfloat16")
    rb = write_dump(tmp_path / "b", [("logits", 0, b), ("hidden", 0, b.bfloat16())], source="nemo",
                    dtype="float32")
    res = compare_dumps(ra, rb, progress=False)
    assert res.passed and [t.tolerance for t in res.tensors] == [DTYPE_DEFAULTS["bfloat16"]] * 2
    assert (res.precision_a, res.precision_b) == ("bfloat16", "float32")
    rc = write_dump(tmp_path / "c", [("logits", 0, a), ("hidden", 0, a.bfloat16())], source="reference",
                    dtype="float32")
    res = compare_dumps(rc, rb, progress=False)  # both float32 runs: the float32-stored logits get 1e-5
    assert res.tensors[0].tolerance == DTYPE_DEFAULTS["float32"] and not res.tensors[0].passed
