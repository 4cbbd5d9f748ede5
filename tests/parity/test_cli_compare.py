"""``magpie-parity compare``: exit statuses, JSON report, error messages."""

from __future__ import annotations

import json

import pytest
import torch

from parity.cli import main
from parity.dump import write_dump

NAMES = [
    ("text_embedding", None),
    ("encoder.layers.0.self_attention", None),
    ("encoder.layers.0.pos_ff", None),
    ("encoder.layers.0", None),
    ("encoder.norm_out", None),
    ("decoder_input", 0),
    ("decoder.layers.0.cross_attention.attn_probs", 0),
    ("decoder.layers.0", 0),
    ("decoder_input", 1),
    ("decoder.layers.0.cross_attention.attn_probs", 1),
    ("decoder.layers.0", 1),
    ("logits", 1),
]


def make(tmp_path, name, *, dtype=torch.float32, edit=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = []
    for n, s in NAMES:
        t = torch.randn(2, 3, 8, generator=g).to(dtype)
        if edit:
            t = edit(n, s, t)
        ts.append((n, s, t))
    return write_dump(tmp_path / name, ts, source="reference", dtype=str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_identical_dumps_exit_0(tmp_path, dtype, capsys):
    a, b = make(tmp_path, "a", dtype=dtype), make(tmp_path, "b", dtype=dtype)
    out = tmp_path / "r.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert rep["passed"] is True and rep["first_divergence"] is None and len(rep["tensors"]) == len(NAMES)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("target", [NAMES[2], NAMES[9], NAMES[-1]])
def test_perturbation_is_first_divergence(tmp_path, target):
    def edit(n, s, t):
        if (n, s) == target:
            t = t.clone()
            t[1, 2, 5] += 0.05
        return t

    a, b = make(tmp_path, "a", edit=edit), make(tmp_path, "b")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["compare", str(a), str(b), "--json", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 1
    rep = json.loads(out.read_text())
    assert rep["passed"] is False
    assert rep["first_divergence"] == {"name": target[0], "step": target[1]}
    bad = [t for t in rep["tensors"] if not t["passed"]]
    assert [(t["name"], t["step"]) for t in bad] == [target] and bad[0]["n_failed"] == 1
    assert bad[0]["max_abs"] == pytest.approx(0.05, rel=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perturbation_within_tolerance_file_passes(tmp_path):
    a = make(tmp_path, "a", edit=lambda n, s, t: t + 1e-3 if n == "logits" else t)
    b = make(tmp_path, "b")
    tol = tmp_path / "tol.json"
    tol.write_text(json.dumps({"per_name": {"logits": {"atol": 1e-2, "rtol": 0}}}))
    assert main(["compare", str(a), str(b), "--no-progress", "-q"]) == 1
    assert main(["compare", str(a), str(b), "--tolerances", str(tol), "--no-progress", "-q"]) == 0
    assert main(["compare", str(a), str(b), "--names", "encoder.*", "--no-progress", "-q"]) == 0


def test_nan_in_both_exit_1(tmp_path):
    def edit(n, s, t):
        if n == "encoder.norm_out":
            t = t.clone()
            t[0, 0, 0] = float("nan")
        return t

    a, b = make(tmp_path, "a", edit=edit), make(tmp_path, "b", edit=edit)
    out = tmp_path / "r.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--no-progress", "-q"]) == 1
    rep = json.loads(out.read_text())
    assert rep["first_divergence"] == {"name": "encoder.norm_out", "step": None}


def test_truncated_file_exit_2_names_it(tmp_path, capsys):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    shard = next(p for p in a.iterdir() if p.suffix == ".safetensors")
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["compare", str(a), str(b), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert shard.name in err and len(err.splitlines()) == 1


def test_bad_inputs_exit_2(tmp_path, capsys):
    b = make(tmp_path, "b")
    assert main(["compare", str(tmp_path / "nope"), str(b), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
    tol = tmp_path / "tol.json"
    tol.write_text("{")
    assert main(["compare", str(b), str(b), "--tolerances", str(tol), "--no-progress"]) == 2
    assert "tol.json" in capsys.readouterr().err
    assert main(["compare", str(b)]) == 2  # usage error


def test_missing_tensor_exit_1(tmp_path):
    a = write_dump(tmp_path / "a", [("logits", 1, torch.randn(3))], source="trtllm")
    b = make(tmp_path, "b")
    out = tmp_path / "r.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--no-progress", "-q"]) == 1
    rep = json.loads(out.read_text())
    assert {"name": "text_embedding", "step": None} in rep["missing_in_a"]


def test_help_is_zero():
    assert main(["--help"]) == 0


def test_int64_codes_beyond_float64_precision_exit_1(tmp_path, capsys):
    """2**62 vs 2**62 + 100: equal as float64, different as the int64 codes they are: compare fails (exit 1) and
    counts the differing elements."""
    a = write_dump(tmp_path / "a", [("predicted_codes", None, torch.tensor([[2**62, 3]]))], source="trtllm")
    b = write_dump(tmp_path / "b", [("predicted_codes", None, torch.tensor([[2**62 + 100, 3]]))], source="reference")
    out = tmp_path / "r.json"
    assert main(["compare", str(a), str(b), "--json", str(out), "--no-progress"]) == 1
    assert "1/2 elements differ" in capsys.readouterr().out
    t = json.loads(out.read_text())["tensors"][0]
    assert t["passed"] is False and t["exact"] is True and t["n_failed"] == 1 and t["max_abs"] == 100.0


TEX_NAMES = ["$\\frac{a}{$", "a$b$", "$\\nosuchcommand$", "$^^$", "x_{1}^2", "%100 & #$"]


def test_plot_draws_tensor_names_literally_even_with_usetex(tmp_path, monkeypatch):
    """Names matplotlib would read as mathtext/TeX (and a matplotlibrc asking for usetex, with no LaTeX here) are
    drawn as text: no traceback, a PNG comes out."""
    import matplotlib

    from parity.report import is_report_png

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    a = write_dump(tmp_path / "a", [(n, None, torch.ones(3)) for n in TEX_NAMES], source="reference")
    b = write_dump(tmp_path / "b", [(n, None, torch.ones(3) * 2) for n in TEX_NAMES], source="reference")
    png = tmp_path / "p.png"
    assert main(["compare", str(a), str(b), "--plot", str(png), "-q", "--no-progress"]) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and is_report_png(png)
    assert matplotlib.rcParams["text.usetex"] is True  # the user's setting is left as it was


def test_plot_of_thousands_of_tensors_has_a_bounded_width(tmp_path):
    import struct

    from parity.compare import compare_dumps
    from parity.report import MAX_PLOT_WIDTH, plot

    ts = [(f"t{i}", None, torch.ones(1)) for i in range(3000)]
    a = write_dump(tmp_path / "a", ts, source="reference")
    res = compare_dumps(a, a, progress=False)
    png = plot(res, tmp_path / "p.png")
    width = struct.unpack(">I", png.read_bytes()[16:20])[0]
    assert width <= MAX_PLOT_WIDTH * 100


# ------------------------------------------------------------------------------ verdicts that cannot mislead


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_names_matching_nothing_is_exit_2_not_a_0_of_0_fail(tmp_path, capsys):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert main(["compare", str(a), str(b), "--names", "nosuch.*", "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "--names nosuch.*: matches no tensor of either dump" in line and "0/0" not in line


def test_dumps_sharing_no_tensor_are_exit_2(tmp_path, capsys):
    a = write_dump(tmp_path / "a", [("x", None, torch.ones(2))], source="trtllm")
    b = write_dump(tmp_path / "b", [("y", None, torch.ones(2))], source="reference")
    for extra in ([], ["--intersect"]):
        assert main(["compare", str(a), str(b), "--no-progress", *extra]) == 2
        line = _one_line(capsys)
        assert "no tensor is present in both" in line and "a holds 1 (x)" in line and "b holds 1 (y)" in line


def test_missing_tensors_are_counted_apart_and_named(tmp_path, capsys):
    """27 of b's tensors absent from a: the verdict counts them apart from the numeric check and hints at
    --intersect; never 'FAIL: N/N tensors within tolerance'."""
    b = make(tmp_path, "b")
    keep = {("logits", 1), ("decoder.layers.0", 1)}
    a = write_dump(tmp_path / "a", [(n, s, t) for n, s, t in _tensors() if (n, s) in keep], source="trtllm")
    assert main(["compare", str(a), str(b), "--no-progress"]) == 1
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    n_missing = len(NAMES) - 2
    assert first.startswith(f"FAIL: {n_missing} tensors missing in a (pass --intersect to compare the 2 present in "
                            "both); 2/2 present tensors within tolerance")
    assert "FAIL: 2/2 tensors within tolerance" not in out
    assert f"missing in a ({n_missing}, only in b): text_embedding@-, " in out and f"and {n_missing - 5} more" in out
    assert main(["compare", str(a), str(b), "--no-progress", "--intersect"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"PASS: 2/2 present tensors within tolerance (--intersect: {n_missing} tensors missing in "
                            "a, not compared)")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [(n, s, torch.randn(2, 3, 8, generator=g)) for n, s in NAMES]


def test_quiet_failure_prints_the_one_line_verdict(tmp_path, capsys):
    a = make(tmp_path, "a", edit=lambda n, s, t: t + 1 if n == "logits" else t)
    b = make(tmp_path, "b")
    assert main(["compare", str(a), str(b), "--no-progress", "-q"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.strip() == f"FAIL: {len(NAMES) - 1}/{len(NAMES)} tensors within tolerance"
    assert main(["compare", str(a), str(b), "--no-progress", "--json", "-"]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["passed"] is False and cap.err.startswith("FAIL: ")
    assert main(["compare", str(b), str(b), "--no-progress", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_dumps_of_different_models_are_refused_before_comparing(tmp_path, capsys):
    ts = _tensors()
    a = write_dump(tmp_path / "a", ts, source="nemo", config_hash="1111")
    b = write_dump(tmp_path / "b", ts, source="reference", config_hash="2222")
    assert main(["compare", str(a), str(b), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "dumps of different models" in line and "'1111'" in line and "'2222'" in line
    # one side without a hash (the committed fixtures): compared
    c = write_dump(tmp_path / "c", ts, source="nemo")
    assert main(["compare", str(c), str(b), "--no-progress", "-q"]) == 0


def test_exact_codes_rank_by_mismatch_count_never_a_ratio_to_zero(tmp_path, capsys):
    codes = torch.randint(0, 70, (2, 4, 9))
    other = codes.clone()
    other[0, 1, 3] += 5
    a = write_dump(tmp_path / "a", [("predicted_codes", None, other), ("logits", 0, torch.ones(3))], source="trtllm")
    b = write_dump(tmp_path / "b", [("predicted_codes", None, codes), ("logits", 0, torch.ones(3))],
                   source="reference")
    assert main(["compare", str(a), str(b), "--no-progress"]) == 1
    out = capsys.readouterr().out
    worst = out.split("worst (")[1].splitlines()[1]
    assert worst.split()[:5] == ["1", "differ", "predicted_codes", "step", "-"]  # (the table may add where)
    assert "e+" not in out.split("worst (")[1].split("\n  ")[1]
