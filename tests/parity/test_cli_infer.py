"""magpie-parity infer: codes from a checkpoint and an inputs file, progress, optional per-step dump."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, infer_inputs, load_batch, reference_model
from parity.cli import main


def test_infer_writes_the_reference_codes(tmp_path):
    inputs = tmp_path / "inputs.safetensors"
    save_file(infer_inputs(load_batch("released_small")), str(inputs))
    out = tmp_path / "codes.safetensors"
    rc = main(["infer", "--checkpoint", str(FIXTURES / "released_small.nemo"), "--inputs", str(inputs),
               "--out", str(out), "--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=10",
               "--dump", str(tmp_path / "steps")])
    assert rc == 0
    got = load_file(str(out))
    want = reference_model("released_small").infer_batch(infer_inputs(load_batch("released_small")), use_cfg=True,
                                                         topk=1, max_decoder_steps=10)
    assert torch.equal(got["predicted_codes"], want.predicted_codes)
    assert torch.equal(got["predicted_codes_lens"], want.predicted_codes_lens)
    from parity.dump import DumpReader

    steps = {e.step for e in DumpReader(tmp_path / "steps").entries if e.name == "decoder.layers.0"}
    assert steps == set(range(10))


def test_infer_bad_input_exits_2(tmp_path, capsys):
    inputs = tmp_path / "inputs.safetensors"
    save_file(infer_inputs(load_batch("released_small")), str(inputs))
    base = ["infer", "--checkpoint", str(FIXTURES / "released_small.nemo"), "--inputs", str(inputs),
            "--out", str(tmp_path / "c.safetensors")]
    assert main(base + ["--param", "topk=0"]) == 2
    assert "topk" in capsys.readouterr().err
    assert main(base + ["--param", "temperature=nan"]) == 2
    assert main(["infer", "--checkpoint", str(tmp_path / "none.nemo"), "--inputs", str(inputs), "--out", "x"]) == 2


def test_dump_infer_of_a_baked_checkpoint_keeps_the_speakers(tmp_path):
    """A baked checkpoint's batch selects its speakers with speaker_indices: dump --mode infer keeps them (it used to
    drop them, so every item spoke as speaker 0) and equals NeMo's recorded infer_batch dump."""
    out = tmp_path / "d"
    rc = main(["dump", "--checkpoint", str(FIXTURES / "dce_baked_v2607.nemo"), "--batch",
               str(FIXTURES / "dce_baked_v2607.batch.safetensors"), "--mode", "infer", "--use-cfg", "--param", "topk=1",
               "--seed", "2036", "--out", str(out)])
    assert rc == 0
    assert main(["compare", str(out), str(FIXTURES / "dce_baked_v2607.infer_greedy_cfg"), "-q"]) == 0
