"""magpie-parity emulate: an engine-like run from the CLI (the reference under an emulated EnginePolicy; no
TensorRT-LLM engine runs here), its dump, codes file and tllm_debug tree, which ingest-trtllm reads back exactly."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from parity.cli import main
from parity.compare import compare_dumps
from parity.dump import DumpReader
from trt.engine import EnginePolicy, KernelPrior, policy_from_settings

FIX = "fixtures/data"
CKPT = f"{FIX}/released_small.nemo"
BATCH = f"{FIX}/released_small.batch.safetensors"
RUN = ["--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=8"]


# the CLI is given repo-relative fixture paths
pytestmark = pytest.mark.usefixtures("repo_cwd")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_emulate_writes_a_marked_dump_codes_and_a_tree_that_ingests_exactly(tmp_path, capsys):
    out, tree, codes = tmp_path / "emulated", tmp_path / "engine_run", tmp_path / "codes.safetensors"
    assert main(["emulate", "--checkpoint", CKPT, "--batch", BATCH, "--engine", "multi_block_mode=true", *RUN,
                 "--out", str(out), "--debug-tree", str(tree), "--codes-out", str(codes)]) == 0
    text = capsys.readouterr().out
    assert "EMULATED engine" in text and "multi_block_mode=True" in text and "--cfg-scale 2.5" in text
    d = DumpReader(out)
    assert "no TensorRT-LLM engine ran" in d.layout["emulated"]
    assert d.layout["engine_behaviours"] == ["kv_cache", "multi_block_mode"] and d.layout["use_kv_cache"] is True
    with safe_open(str(codes), "pt") as f:
        assert "no TensorRT-LLM engine ran" in f.metadata()["emulated"]
        assert f.get_tensor("predicted_codes").equal(d.load("predicted_codes"))
    assert "magpie-parity emulate" in (tree / "EMULATED.txt").read_text()
    assert main(["ingest-trtllm", str(tree), "--out", str(tmp_path / "ing"), "--checkpoint", CKPT,
                 "--cfg-scale", "2.5"]) == 0
    res = compare_dumps(tmp_path / "ing", out, progress=False, intersect=True)
    assert res.passed and res.tensors and all(t.max_abs == 0 for t in res.tensors)  # the tree is the run's numbers
    assert {"decoder.layers.0.cross_attention", "logits", "encoder.norm_out"} <= {t.name for t in res.tensors}


def test_emulate_bad_input_is_one_line(tmp_path, capsys):
    base = ["emulate", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(tmp_path / "o")]
    assert main(base + ["--engine", "multi_block=true"]) == 2
    assert "unknown engine behaviour 'multi_block'" in _err_line(capsys)
    assert main(base + ["--engine", "multi_block_mode=yes"]) == 2
    assert "multi_block_mode='yes': expected true or false" in _err_line(capsys)
    assert main(base + ["--engine", "prior=fast"]) == 2
    assert "prior must be one of" in _err_line(capsys)
    assert main(base + ["--engine", "kv_cache=false", "--debug-tree", str(tmp_path / "t")]) == 2
    assert "needs a KV-cached run" in _err_line(capsys)
    assert main(base + ["--engine", "unpadded_requests=true", "--debug-tree", str(tmp_path / "t")]) == 2
    assert "captures no layers" in _err_line(capsys)
    assert main(base + ["--param", "topk=100000"]) == 2
    assert "topk" in _err_line(capsys)
    assert not (tmp_path / "o").exists()


def test_policy_from_settings():
    assert policy_from_settings({}) == EnginePolicy()
    p = policy_from_settings({"prior": "kernel", "kernel_prior.first_focus": 4,
                              "kernel_prior.apply_layers": [0, 1], "kernel_prior.epsilon": 0})
    assert p.prior == "kernel" and p.kernel_prior == KernelPrior(first_focus=4, apply_layers=(0, 1), epsilon=0)
    with pytest.raises(ValueError, match="kernel_prior.first_focus"):
        policy_from_settings({"kernel_prior.first_focus": "x"})
    with pytest.raises(ValueError, match="kv_cache"):
        policy_from_settings({"kv_cache": 1})
