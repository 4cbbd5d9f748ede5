"""parity.tolerances: the one home of the tolerances, its named policies, and who draws from it."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import tolerances as tl
from parity.tolerances import (
    DIAGNOSE,
    DTYPE_DEFAULTS,
    POLICIES,
    PolicyError,
    Tolerance,
    TolerancePolicy,
    diagnose_tolerance,
    load_policy,
    policy,
)


def test_compare_re_exports_the_same_objects():
    import parity.compare as c

    for name in ("Tolerance", "TolerancePolicy", "PolicyError", "dtype_default", "DTYPE_DEFAULTS", "CHECKS"):
        assert getattr(c, name) is getattr(tl, name), name


def test_named_policies_keep_the_figures():
    assert set(POLICIES) == {"", "parity", "fixtures", "steps"}
    # "": the per-dtype defaults (compare without --tolerances)
    assert policy("").lookup("x", "float32", "float32") == Tolerance(1e-5, 1e-5)
    assert policy("").lookup("x", "bfloat16", "float32") == Tolerance(5e-2, 5e-2)
    # "parity": float32 reference vs NeMo (check, the plugin); integers exact
    p = policy("parity")
    assert p.lookup("decoder.layers.0", "float32", "float32") == Tolerance(1e-5, 1e-5) == DTYPE_DEFAULTS["float32"]
    assert p.lookup("inference.attended_text_position", "int64", "int64") == Tolerance(0, 0)
    # the tests' own figures
    assert policy("fixtures").lookup("anything", "int64", "int64") == Tolerance(1e-6, 0.0)
    assert policy("steps").lookup("logits", "float32", "float32") == Tolerance(1e-5, 0.0)


def test_policy_is_a_copy_and_unknown_names_are_errors():
    p = policy("parity")
    p.per_name["logits"] = Tolerance(1, 1)
    assert "logits" not in POLICIES["parity"].per_name
    with pytest.raises(PolicyError, match="known"):
        policy("bogus")


def test_default_key_wins_over_dtype_defaults():
    assert TolerancePolicy({"": Tolerance(7, 7)}).lookup("anything", "float16", "float16") == Tolerance(7, 7)
    assert TolerancePolicy({"a.*": Tolerance(1, 1), "": Tolerance(7, 7)}).lookup("a.b") == Tolerance(1, 1)


def test_load_policy_name_file_or_default(tmp_path, monkeypatch):
    assert load_policy(None, default="parity") == POLICIES["parity"]
    assert load_policy("fixtures") == POLICIES["fixtures"]
    f = tmp_path / "tol.json"
    f.write_text(json.dumps({"per_name": {"logits": {"atol": 2, "rtol": 0}}}))
    assert load_policy(str(f)).lookup("logits") == Tolerance(2, 0)
    with pytest.raises(PolicyError, match="nope.json"):
        load_policy(str(tmp_path / "nope.json"))
    # a file named like a policy wins over the name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "steps").write_text(json.dumps({"default": {"atol": 3, "rtol": 3}}))
    assert load_policy("steps").lookup("x") == Tolerance(3, 3)


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("float16", 2e-2), ("bfloat16", 2e-2), (None, 2e-2)])
def test_diagnose_tolerance_is_trt_diagnose_figure(dtype, rel):
    """The figure trt.diagnose used inline: 1e-5 of the logits' scale for float32 engines, 2e-2 otherwise,
    never below the absolute figure (scale floored at 1)."""
    assert diagnose_tolerance(dtype, 0.3) == rel
    assert math.isclose(diagnose_tolerance(dtype, 40.0), rel * 40.0)
    assert DIAGNOSE.get(dtype, DIAGNOSE[""]).rel == rel


def test_diagnose_default_matches_the_module(tmp_path):
    """trt.diagnose's default tolerance equals parity.tolerances' figure for the dump's dtype."""
    from conftest import infer_inputs, load_batch, reference_model
    from parity.dump import write_dump
    from trt.diagnose import diagnose

    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    out = model.infer_batch(batch, use_cfg=False, topk=1, max_decoder_steps=5, keep_logits=True)
    tensors = [("logits", k, lg[:, None]) for k, lg in enumerate(out.step_logits)]
    tensors.append(("predicted_codes", None, out.predicted_codes))
    dump = write_dump(tmp_path / "d", tensors, source="trtllm", dtype="float32", layout={"use_cfg": False, "params": {"topk": 1}})
    d = diagnose(model, dump, batch)
    scale = max(lg.abs().max().item() for lg in out.step_logits)
    assert d.tolerance == diagnose_tolerance("float32", scale)


# ------------------------------------------------------------------------------------------- crafted files


@pytest.mark.parametrize("data, key", [
    ({"default": {"atol": "1e-3", "rtol": 0}}, "default.atol"),
    ({"default": {"atol": True, "rtol": 0}}, "default.atol"),
    ({"default": {"atol": [1], "rtol": 0}}, "default.atol"),
    ({"default": {"atol": float("nan"), "rtol": 0}}, "default.atol"),
    ({"default": {"atol": float("inf"), "rtol": 0}}, "default.atol"),
    ({"default": {"atol": 1, "rtol": -1}}, "default.rtol"),
    ({"default": {"atol": 1, "rtol": 10**400}}, "default.rtol"),
    ({"default": {"atol": 1, "rtol": 1, "quantile": 2}}, "default.quantile"),
    ({"default": {"atol": 1, "rtol": 1, "check": 3}}, "default.check"),
    ({"default": {"atol": 1, "rtol": 1, "tolerance": 3}}, "'tolerance'"),
    ({"per_name": {"logits": {"atol": 1, "rtol": "x"}}}, "per_name['logits'].rtol"),
    ({"per_name": {"logits": 1}}, "per_name['logits']"),
    ({"per_name": [1]}, "per_name"),
    ({"defaults": {}}, "'defaults'"),
    ([{"atol": 1}], "top level"),
    ("1e-3", "top level"),
])
def test_a_malformed_policy_is_one_line_naming_the_file_and_key(tmp_path, data, key):
    f = tmp_path / "tol.json"
    f.write_text(json.dumps(data))  # json.dumps writes NaN / Infinity, which json.loads reads back
    with pytest.raises(PolicyError) as e:
        load_policy(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}: ") and key in msg and "\n" not in msg, msg


def test_a_fifo_deep_nesting_or_binary_tolerance_file_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="fifo.json: tolerance file is not a regular file"):
        load_policy(str(fifo))  # would block forever in read_text()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyError, match="deep.json: tolerance file is not valid JSON"):
        load_policy(str(deep))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PolicyError, match="bin.json: tolerance file is not UTF-8"):
        load_policy(str(binary))


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["atol", "rtol", "check", "quantile", "x", ""]), inner,
                                            max_size=4)),
    max_leaves=10)
TOL_LIKE = st.fixed_dictionaries({}, optional={"atol": JSONISH | st.floats(0, 1), "rtol": JSONISH | st.floats(0, 1),
                                               "check": JSONISH | st.sampled_from(tl.CHECKS),
                                               "quantile": JSONISH | st.floats(0, 1), "extra": JSONISH})
POLICY_LIKE = st.one_of(
    JSONISH,
    st.fixed_dictionaries({}, optional={"default": st.none() | TOL_LIKE | JSONISH,
                                        "per_name": st.dictionaries(st.text(max_size=6), TOL_LIKE | JSONISH,
                                                                    max_size=3) | JSONISH,
                                        "bogus": JSONISH}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(POLICY_LIKE)
def test_any_policy_json_loads_or_is_one_policy_error(tmp_path, data):
    """Every JSON value gives a usable policy (finite, non-negative figures, known checks) or one PolicyError whose
    single line starts with the file's path; never a TypeError, OverflowError or a NaN tolerance."""
    f = tmp_path / "tol.json"
    f.write_text(json.dumps(data))
    try:
        p = load_policy(str(f))
    except PolicyError as e:
        assert str(e).startswith(f"{f}: ") and "\n" not in str(e)
        return
    for t in [p.default, *p.per_name.values()]:
        if t is not None:
            assert math.isfinite(t.atol) and math.isfinite(t.rtol) and t.atol >= 0 and t.rtol >= 0
            assert t.check in tl.CHECKS and 0 < t.quantile <= 1
