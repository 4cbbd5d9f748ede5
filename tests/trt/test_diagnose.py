"""diagnose names a planted engine deviation and reports none for a clean dump.

Self-consistency only: the "engine" dumps here are the reference under an emulated engine policy
(trt/engine.py), not a TensorRT-LLM engine (none can run here)."""

from __future__ import annotations

import pytest

from conftest import FIXTURES, infer_inputs, load_batch, reference_model
from trt.engine import EnginePolicy, dump_engine_emulation
from trt.diagnose import DiagnoseError, diagnose

PARAMS = dict(topk=1, max_decoder_steps=14, start_prior_after_n_audio_steps=2)


def _dump(tmp_path, name, sem, case="released_small"):
    model = reference_model(case)
    dump_engine_emulation(model, infer_inputs(load_batch(case)), tmp_path / name, sem, use_cfg=True, seed=0,
                          **PARAMS)
    return tmp_path / name


def test_clean_dump_has_no_deviation(tmp_path):
    d = diagnose(reference_model("released_small"), _dump(tmp_path, "clean", EnginePolicy()),
                 infer_inputs(load_batch("released_small")))
    assert d.baseline.max_abs == 0 and d.explanation == [] and "No deviation" in d.report()


def test_planted_multi_block_engine_is_named(tmp_path):
    """An engine dump made with multi_block_mode=True (prior skipped) and the engine's KV cache. Without a prior,
    cached and recomputed decoding agree to rounding, so multi-block mode alone explains the dump."""
    dump = _dump(tmp_path, "planted", EnginePolicy(kv_cache=True, multi_block_mode=True))
    d = diagnose(reference_model("released_small"), dump, infer_inputs(load_batch("released_small")))
    assert d.baseline.max_abs > d.tolerance
    assert d.explanation == ["multi_block_mode (prior skipped)"], d.report()
    assert d.explained and d.final.max_abs <= 1e-5


def test_planted_kernel_prior_engine_needs_two_behaviours(tmp_path):
    """Kernel prior in a cached engine with a zero CFG prompt: two behaviours, both found."""
    dump = _dump(tmp_path, "kernel", EnginePolicy(kv_cache=True, lm_head_bias=False, cfg_prompt="zeros"))
    d = diagnose(reference_model("released_small"), dump, infer_inputs(load_batch("released_small")))
    assert set(d.explanation) == {"lm_head_bias=False", "cfg_prompt=zeros", "kv_cache"}, d.report()
    assert d.explained


def test_planted_dropped_bias_is_named_alone(tmp_path):
    dump = _dump(tmp_path, "bias", EnginePolicy(lm_head_bias=False))
    d = diagnose(reference_model("released_small"), dump, infer_inputs(load_batch("released_small")))
    assert d.explanation == ["lm_head_bias=False"], d.report()
    assert d.baseline.first_bad_step == 0


def test_unexplained_error_is_located(tmp_path):
    """A perturbation no known behaviour explains: the report names the first step where it appears."""
    from parity.dump import DumpReader, DumpWriter

    src = DumpReader(_dump(tmp_path, "clean", EnginePolicy()))
    with DumpWriter(tmp_path / "perturbed", source="trtllm", layout=src.layout, inputs=src.inputs) as w:
        for e in src.entries:
            t = src.load(e.name, e.step)
            if e.name == "logits" and e.step == 6:
                t = t.clone()
                t[0, 0, 3] += 0.5
            w.add(e.name, t, step=e.step)
    d = diagnose(reference_model("released_small"), tmp_path / "perturbed", infer_inputs(load_batch("released_small")))
    assert not d.explained and d.final.first_bad_step == 6, d.report()


def test_cli_diagnose(tmp_path, capsys):
    from parity.cli import main

    dump = _dump(tmp_path, "planted", EnginePolicy(lm_head_bias=False))
    rc = main(["diagnose", str(dump), "--checkpoint", str(FIXTURES / "released_small.nemo"),
               "--batch", str(FIXTURES / "released_small.batch.safetensors")])
    assert rc == 0 and "lm_head_bias=False" in capsys.readouterr().out
    assert main(["diagnose", str(tmp_path / "absent"), "--checkpoint", str(FIXTURES / "released_small.nemo"),
                 "--batch", str(FIXTURES / "released_small.batch.safetensors")]) == 2


def test_dump_without_logits_is_rejected(tmp_path):
    from parity.dump import write_dump

    import torch

    p = write_dump(tmp_path / "d", [("encoder.norm_out", None, torch.randn(2, 3))], source="trtllm")
    with pytest.raises(DiagnoseError, match="logits"):
        diagnose(reference_model("released_small"), p, infer_inputs(load_batch("released_small")))
