"""``magpie-parity calibrate`` and ``compare --tolerances CALIBRATION``: a reduced-precision reference run against
NeMo's float32 run is within the precision's own noise on a seed the calibration never saw, and an error planted
at twice the envelope in one layer at one step is the headline (name and step), through the CLI with exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from parity.cli import main
from parity.dump import DumpReader, write_dump

CKPT = str(FIXTURES / "released_small.nemo")
BATCH = str(FIXTURES / "released_small.batch.safetensors")
# The fixture's sampled runs (released_small.infer_sampled_cfg): topk 20 of its 72 tokens, temperature 0.7, CFG
RUN = ["--use-cfg", "--param", "topk=20", "--param", "temperature=0.7"]
UNSEEN = "11"  # calibrated on seeds 0..3
PLANT = ("decoder.layers.1.pos_ff", 5)  # one layer, one step


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
    """bfloat16 and float16 calibrations of released_small, four seeds, every layer (about 2 s each)."""
    d = tmp_path_factory.mktemp("cal")
    out = {}
    for dtype in ("bfloat16", "float16"):
        out[dtype] = d / f"{dtype}.json"
        assert main(["calibrate", "--checkpoint", CKPT, "--batch", BATCH, "--dtype", dtype, "--seeds", "4", *RUN,
                     "--out", str(out[dtype])]) == 0
    return out


def _dump(out, *extra) -> str:
    assert main(["dump", "--checkpoint", CKPT, "--batch", BATCH, "--mode", "infer", "--layers", "--seed", UNSEEN,
                 *RUN, *extra, "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def nemo_dump(tmp_path_factory):
    """Live NeMo's float32 infer run with every layer, on the unseen seed."""
    from conftest import nemo_available

    if not nemo_available():
        pytest.skip("NeMo is not installed")
    return _dump(tmp_path_factory.mktemp("nemo") / "nemo", "--source", "nemo")


def _plant(src: str, dst, name: str, step: int, size: float) -> None:
    """A copy of dump ``src`` whose (name, step) differs from ``reference`` by ``size`` more at one element."""
    r = DumpReader(src)
    ts = []
    for e in r.entries:
        t = r.load(e.name, e.step)
        if (e.name, e.step) == (name, step):
            t = t.to(torch.float32).clone()
            t.view(-1)[7] += size
        ts.append((e.name, e.step, t))
    write_dump(dst, ts, source=r.source, config_hash=r.config_hash, dtype=r.dtype, inputs=r.inputs, layout=r.layout)


def _calibration(path) -> dict:
    return json.loads(open(path).read())


@pytest.mark.nemo
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_run_within_noise_and_planted_error_is_the_headline(tmp_path, capsys, calibrations,
                                                                               nemo_dump, dtype):
    tol = calibrations[dtype]
    cal = _calibration(tol)
    assert cal["format"] == "magpie-parity-calibration" and cal["precision"] == dtype
    assert cal["seeds"] == [0, 1, 2, 3] and cal["safety_factor"] == 4.0 and cal["params"]["topk"] == 20
    assert int(UNSEEN) not in cal["seeds"]
    # the reference in dtype, teacher-forced on NeMo's float32 codes with NeMo's seed
    low = _dump(tmp_path / "low", "--dtype", dtype, "--codes", nemo_dump)
    assert DumpReader(low).dtype == dtype
    capsys.readouterr()
    report = tmp_path / "r.json"
    assert main(["compare", low, nemo_dump, "--tolerances", str(tol), "--json", str(report), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(report.read_text())
    n = len(rep["tensors"])
    assert out.startswith(f"PASS: {n}/{n} calibrated tensors within {dtype} noise")
    assert rep["passed"] and rep["calibration"]["within"] == n and rep["calibration"]["headline"] is None
    # without the calibration the float32-stored logits are judged at the dtype's default, not float32's 1e-5
    logits = next(t for t in rep["tensors"] if t["name"] == "logits")
    assert logits["dtype_a"] == "float32" and logits["envelope_ratio"] <= 1

    # an error of twice the envelope in one layer at one step: the headline, by name and step
    envelope = cal["per_name"][PLANT[0]]["atol"]
    bad = tmp_path / "planted"
    _plant(low, bad, *PLANT, size=2 * envelope + _max_abs(rep, *PLANT))
    assert main(["compare", str(bad), nemo_dump, "--tolerances", str(tol), "--json", str(report),
                 "--no-progress"]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"FAIL: beyond {dtype} noise first at {PLANT[0]} step {PLANT[1]} (max |a - b| ")
    assert "x 2." in first or "x 3." in first
    rep = json.loads(report.read_text())
    assert rep["first_divergence"] == {"name": PLANT[0], "step": PLANT[1]}
    head = rep["calibration"]["headline"]
    assert (head["name"], head["step"]) == PLANT and 2 <= head["envelope_ratio"] < 4
    assert [(b["name"], b["step"]) for b in rep["calibration"]["beyond"]] == [PLANT]
    shape = next(t["shape"] for t in rep["tensors"] if (t["name"], t["step"]) == PLANT)
    assert head["worst_index"] == [int(i) for i in torch.unravel_index(torch.tensor(7), tuple(shape))]


def _max_abs(rep: dict, name: str, step: int) -> float:
    """The run's own error at the planted tensor: the planted size adds to it (one element, either sign)."""
    return next(t["max_abs"] for t in rep["tensors"] if (t["name"], t["step"]) == (name, step))


def test_calibration_refuses_dumps_of_another_precision_or_model(tmp_path, capsys, calibrations):
    """Without NeMo: the float32 reference stands in for NeMo (they are bit-identical on the CPU)."""
    ref = _dump(tmp_path / "ref")
    half = _dump(tmp_path / "half", "--dtype", "float16", "--codes", ref)
    tol = calibrations["bfloat16"]
    capsys.readouterr()
    assert main(["compare", half, ref, "--tolerances", str(tol), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tol) in err
    assert "calibrated for bfloat16 against float32" in err and "float16 (a) and float32 (b)" in err
    # the float16 calibration takes it
    assert main(["compare", half, ref, "--tolerances", str(calibrations["float16"]), "--no-progress", "-q"]) == 0
    other = tmp_path / "other.json"
    cal = _calibration(calibrations["float16"])
    cal["config_hash"] = "0" * 16
    other.write_text(json.dumps(cal))
    assert main(["compare", half, ref, "--tolerances", str(other), "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err
    assert "another model's calibration" in err and str(other) in err


def test_default_tolerances_follow_the_run_precision_through_the_cli(tmp_path, capsys):
    """A bfloat16 run's float32-stored logits are judged at the bfloat16 default (was: float32's 1e-5, and a
    headline 'first divergence: logits step 0' that was an artefact)."""
    g = torch.Generator().manual_seed(0)
    ref = [("decoder.layers.0", 0, torch.randn(2, 1, 8, generator=g)), ("logits", 0, torch.randn(2, 1, 16, generator=g))]
    low = [(n, s, t + 1e-2) for n, s, t in ref]
    low[0] = (low[0][0], 0, low[0][2].bfloat16())  # hidden states stored in the run's precision
    a = write_dump(tmp_path / "a", low, source="reference", dtype="bfloat16")
    b = write_dump(tmp_path / "b", ref, source="nemo", dtype="float32")
    assert main(["compare", str(a), str(b), "--no-progress", "-q"]) == 0
    c = write_dump(tmp_path / "c", [(n, s, t.float()) for n, s, t in low], source="reference", dtype="float32")
    assert main(["compare", str(c), str(b), "--no-progress", "-q"]) == 1  # two float32 runs: 1e-5
    assert "FAIL: 0/2" in capsys.readouterr().err


def test_integer_codes_rank_by_mismatch_count_with_their_index(tmp_path, capsys):
    """Codes an engine stored as floats against integer codes: a mismatch count with the first differing element,
    never a ratio to a zero tolerance (was '4.3e+39 predicted_codes')."""
    codes = torch.randint(0, 70, (2, 4, 9), generator=torch.Generator().manual_seed(1))
    engine = codes.to(torch.float32)
    engine[1, 2, 6] += 3
    a = write_dump(tmp_path / "a", [("predicted_codes", None, engine)], source="trtllm")
    b = write_dump(tmp_path / "b", [("predicted_codes", None, codes)], source="reference")
    report = tmp_path / "r.json"
    assert main(["compare", str(a), str(b), "--no-progress", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "e+39" not in out and "e+38" not in out
    t = json.loads(report.read_text())["tensors"][0]
    assert t["exact"] and t["n_failed"] == 1 and t["tol_ratio"] is None and t["worst_index"] == [1, 2, 6]


def test_calibrate_refusals_are_one_line(tmp_path, capsys, calibrations):
    base = ["calibrate", "--checkpoint", CKPT, "--batch", BATCH, "--dtype", "bfloat16"]
    existing = calibrations["bfloat16"]
    assert main([*base, "--out", str(existing)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    user = tmp_path / "mine.json"
    user.write_text("{}")
    assert main([*base, "--out", str(user), "--overwrite"]) == 2
    assert "is not a calibration file" in capsys.readouterr().err
    assert main([*base, "--seeds", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert main([*base, "--param", "topk=500", "--out", str(tmp_path / "x.json")]) == 2
    assert "topk" in capsys.readouterr().err
    assert main([*base, "--mode", "teacher-forced", "--use-cfg", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
    # dump --codes: only the reference's infer mode, codes that fit
    dump = ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(tmp_path / "d")]
    assert main([*dump, "--codes", str(existing)]) == 2
    assert "--codes: only with --source reference --mode infer" in capsys.readouterr().err
    assert main([*dump, "--mode", "infer", *RUN, "--codes", str(FIXTURES / "released_small.nemo_dump")]) == 2
    assert "holds no predicted_codes" in capsys.readouterr().err
    assert main([*dump, "--source", "nemo", "--dtype", "bfloat16"]) == 2


def test_teacher_forced_calibration(tmp_path, capsys):
    """mode teacher-forced: one process_batch pair; step '-' entries; the bfloat16 process_batch dump passes."""
    tol = tmp_path / "tf.json"
    assert main(["calibrate", "--checkpoint", CKPT, "--batch", BATCH, "--dtype", "bfloat16", "--mode",
                 "teacher-forced", "--out", str(tol)]) == 0
    cal = _calibration(tol)
    assert cal["mode"] == "teacher-forced" and cal["seeds"] == []
    assert all(list(steps) == ["-"] for steps in cal["per_step"].values())
    low = tmp_path / "low"
    assert main(["dump", "--checkpoint", CKPT, "--batch", BATCH, "--dtype", "bfloat16", "--out", str(low)]) == 0
    capsys.readouterr()
    assert main(["compare", str(low), str(FIXTURES / "released_small.nemo_dump"), "--tolerances", str(tol),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("PASS: ")
