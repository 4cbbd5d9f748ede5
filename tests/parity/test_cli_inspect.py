"""``magpie-parity inspect DUMP``: the manifest as a table; a non-dump is one line, exit 2."""

from __future__ import annotations

import torch

from conftest import FIXTURES
from parity.cli import main
from parity.dump import write_dump


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_inspect_prints_the_manifest_and_tensors_per_name(tmp_path, capsys):
    ts = [("encoder.norm_out", None, torch.zeros(2, 3, 4)), *[("logits", k, torch.zeros(2, 1, 8)) for k in range(5)],
          ("predicted_codes", None, torch.zeros(2, 2, 5, dtype=torch.int64))]
    d = write_dump(tmp_path / "d", ts, source="reference", config_hash="abc123", dtype="float32",
                   layout={"mode": "infer", "use_cfg": True, "seed": 7, "params": {"topk": 1, "cfg_scale": 2.5}},
                   inputs={"text": [2, 11]})
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in out.splitlines()
            if "  " in line}
    assert rows["source"] == "reference" and rows["mode"] == "infer" and rows["config hash"] == "abc123"
    assert rows["precision"] == "float32" and rows["use_cfg"] == "True" and rows["seed"] == "7"
    assert rows["params"] == "topk=1 cfg_scale=2.5" and rows["inputs"] == "text [2, 11]"
    total = 2 * 3 * 4 * 4 + 5 * 2 * 8 * 4 + 2 * 2 * 5 * 8
    assert rows["tensors"] == f"7 in 3 names, steps 0..4, {total} B"
    logits = next(line for line in out.splitlines() if line.startswith("logits"))
    assert logits.split() == ["logits", "0..4", "5", "2x1x8", "float32", "320", "B"]
    assert next(line for line in out.splitlines() if line.startswith("predicted_codes")).split()[1:5] == \
        ["-", "1", "2x2x5", "int64"]
    assert main(["inspect", str(d), "--names", "log*"]) == 0
    out = capsys.readouterr().out
    assert "\nlogits " in out and "\nencoder.norm_out" not in out
    assert main(["inspect", str(d), "--names", "nosuch"]) == 2
    assert "--names nosuch: matches no tensor" in _err_line(capsys)


def test_inspect_a_committed_fixture_without_a_config_hash(capsys):
    assert main(["inspect", str(FIXTURES / "released_small.infer_greedy_cfg")]) == 0
    out = capsys.readouterr().out
    assert "KiB (" in out and " bytes)" in out
    assert "config hash" in out and "none recorded" in out and "params" in out and "topk=1" in out


def test_inspect_a_non_dump_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for p in (f, tmp_path / "absent", tmp_path):
        assert main(["inspect", str(p)]) == 2
        line = _err_line(capsys)
        assert line.startswith("magpie-parity inspect: error: ") and str(p) in line
