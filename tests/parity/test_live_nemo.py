"""Against live NeMo: the CLI's NeMo dump and reference dump of the same fixture agree in float32."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURES

pytestmark = pytest.mark.nemo


@pytest.mark.parametrize("case", ["released_small", "four_codebooks"])
def test_reference_dump_equals_live_nemo_dump(tmp_path, case):
    from parity.cli import main

    args = ["--checkpoint", str(FIXTURES / f"{case}.nemo"), "--batch", str(FIXTURES / f"{case}.batch.safetensors")]
    assert main(["dump", *args, "--source", "nemo", "--out", str(tmp_path / "nemo")]) == 0
    assert main(["dump", *args, "--source", "reference", "--out", str(tmp_path / "ref")]) == 0
    report = tmp_path / "report.json"
    assert main(["compare", str(tmp_path / "ref"), str(tmp_path / "nemo"), "--json", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    from reference import MagpieTTS

    model = MagpieTTS.from_nemo(FIXTURES / f"{case}.nemo")
    names = model.capture_points()
    assert data["passed"] and [t["name"] for t in data["tensors"]] == names  # every layer compared
    from parity.dump import DumpReader

    # NeMo's dump records the checkpoint's reference config hash, as the reference's does
    assert DumpReader(tmp_path / "nemo").config_hash == DumpReader(tmp_path / "ref").config_hash \
        == model.config.hash()


def test_infer_dumps_agree(tmp_path):
    from parity.cli import main

    args = ["--checkpoint", str(FIXTURES / "released_small.nemo"), "--batch",
            str(FIXTURES / "released_small.batch.safetensors"), "--mode", "infer", "--use-cfg", "--seed", "7",
            "--param", "topk=20", "--param", "max_decoder_steps=12"]
    assert main(["dump", *args, "--source", "nemo", "--out", str(tmp_path / "nemo")]) == 0
    assert main(["dump", *args, "--source", "reference", "--out", str(tmp_path / "ref")]) == 0
    assert main(["compare", str(tmp_path / "ref"), str(tmp_path / "nemo"), "-q"]) == 0
