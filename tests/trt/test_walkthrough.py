"""docs/trtllm-walkthrough.md runs as written: every command of its ``console`` blocks, in order, through
parity.cli.main in an empty folder holding a copy of the two fixture files the page names (the only thing changed:
the working folder), each with the exit status the page states (``# exit N``; 0 otherwise). The engine part is
emulated (the page says so); the final diagnose report must name the emulated behaviour."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from parity.cli import main

DOC = "docs/trtllm-walkthrough.md"
_BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
_EXIT = re.compile(r"#\s*exit\s+(\d+)\b")


def doc_commands(text: str) -> list[tuple[list[str], int]]:
    """(argv after 'magpie-parity', expected exit status) of every '$ ' line of the console blocks."""
    out = []
    for block in _BLOCK.findall(text):
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            m = _EXIT.search(line)
            argv = shlex.split(line[2:], comments=True)
            assert argv[0] == "magpie-parity", line
            out.append((argv[1:], int(m.group(1)) if m else 0))
    return out


def test_the_doc_parser_reads_commands_and_exit_statuses():
    cmds = doc_commands("x\n```console\n$ magpie-parity compare a b --intersect  # exit 1\n$ magpie-parity inspect a\n"
                        "output line\n```\n```python\n$ magpie-parity not-this\n```\n")
    assert cmds == [(["compare", "a", "b", "--intersect"], 1), (["inspect", "a"], 0)]


def test_walkthrough_runs_end_to_end_on_the_bundled_fixtures(tmp_path, monkeypatch, capsys):
    from conftest import REPO

    text = (REPO / DOC).read_text()
    cmds = doc_commands(text)
    assert [c[0][0] for c in cmds][:1] == ["check"] and cmds[-1][0][0] == "diagnose"
    named = sorted({a for argv, _ in cmds for a in argv if a.startswith("fixtures/")})
    assert named == ["fixtures/data/released_small.batch.safetensors", "fixtures/data/released_small.nemo"]
    for rel in named:  # the working folder: the page's relative fixture paths, nothing else
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for argv, expected in cmds:
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == expected, f"magpie-parity {shlex.join(argv)}: exit {rc}, the page says {expected}\n{out.err}"
        outputs.append(out.out)
    assert "emulated" in text.lower() and "EMULATED engine" in outputs[[a[0] for a, _ in cmds].index("emulate")]
    ingest_out = outputs[[a[0] for a, _ in cmds].index("ingest-trtllm")]
    # what the engine does not export is listed with its reason, not as a bare list that reads like a failure
    assert "not ingested: decoder.norm_out@0, final_proj@0: the engine gathers only the last prompt token" in ingest_out
    final = outputs[-1]
    assert "Explained by: multi_block_mode (prior skipped)" in final and "Nothing remains" in final
    assert "the calibrated float16 noise of the logits (tol.json)" in final  # not the default float16 tolerance
    diagnoses = [o for (a, _), o in zip(cmds, outputs) if a[0] == "diagnose"]
    assert len(diagnoses) == 2 and all("Explained by: multi_block_mode (prior skipped)" in o for o in diagnoses)
    # diagnose --tolerances takes a calibration of the engine dump's precision only: one line, exit 2
    base = ["diagnose", "engine_dump", "--checkpoint", named[1], "--batch", named[0], "--codes",
            "engine_codes.safetensors", "--param", "topk=1"]
    import json

    other = json.loads((tmp_path / "tol.json").read_text())
    other["config_hash"] = "0" * 16
    (tmp_path / "tol_other.json").write_text(json.dumps(other))
    fp16 = ["diagnose", "fp16_engine_dump", *base[2:6], "--codes", "fp16_codes.safetensors", "--param", "topk=1"]
    assert main(fp16 + ["--tolerances", "tol_other.json"]) == 2
    err = capsys.readouterr().err
    assert "tol_other.json: calibrated on the model of config hash '0000000000000000', --checkpoint has" in err
    assert "another model's calibration" in err and len(err.strip().splitlines()) == 1, err
    for extra, words in ((["--tolerances", "tol.json"], "calibrated for float16, but engine_dump computed in float32"),
                         (["--tolerances", "parity"], "not a calibration file"),
                         (["--tolerances", "tol.json", "--tolerance", "0.1"], "give one")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    compare_out = outputs[[a[0] for a, _ in cmds].index("compare")]
    assert "first divergence: decoder.layers.0.cross_attention step 5" in compare_out  # what step 4 says
    replay = next(o for (a, _), o in zip(cmds, outputs) if a[0] == "closed-loop" and "--dump" in a)
    assert "calibrated noise envelope of the logits" in replay and "Explained by: multi_block_mode" in replay
    # a behaviour whose own error is beyond the (loose, float16) tolerance is never "indistinguishable" from it
    assert "Indistinguishable" not in replay
    assert "error born (input within tolerance, output not): decoder.layers.1.cross_attention@15" in "".join(outputs)
    assert (tmp_path / "errors.png").is_file() and (tmp_path / "engine_run" / "EMULATED.txt").is_file()
