"""parity.tolerances: the one home of the tolerances, its named policies, and who draws from it."""

from __future__ import annotations

import json
import math

import pytest

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
