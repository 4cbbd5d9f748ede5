"""The parity suite over the engine's kernel and runtime settings.

Each setting combination gives an engine dump, from a real TensorRT-LLM engine when ``--engine-dir`` is given
(marker ``trtllm``; skipped here, where TensorRT-LLM cannot be installed) and from the reference's emulation of
the engine everywhere (self-consistency: the emulated dumps are the reference under an engine policy). The suite asserts what a user wants of an engine: its departure from NeMo is fully
explained by known, documented behaviours, and by no behaviour the settings did not switch on.
"""

from __future__ import annotations

import itertools

import pytest

from conftest import infer_inputs, load_batch, reference_model
from trt.engine import EnginePolicy, dump_engine_emulation
from trt.diagnose import diagnose

CASE = "released_small"
PARAMS = dict(topk=1, max_decoder_steps=10, start_prior_after_n_audio_steps=2)

# (multi_block_mode, prior on, CFG on, remove_input_padding) in float32, plus reduced-precision engines.
GRID = [(*s, "float32") for s in itertools.product([False, True], [True, False], [True, False], [True, False])]
GRID += [(False, True, True, True, "float16"), (True, True, True, True, "bfloat16")]


def _ids(s):
    mb, prior, cfg, rip, dtype = s
    return f"mb{int(mb)}-prior{int(prior)}-cfg{int(cfg)}-rip{int(rip)}-{dtype}"


def engine_semantics(multi_block, prior, remove_input_padding, dtype) -> EnginePolicy:
    """The fork's engine: KV cache, zero CFG prompt, lm_head without bias, packed (unpadded) requests; with
    remove_input_padding the encoder conv also sees neighbouring requests."""
    return EnginePolicy(kv_cache=True, prior="kernel" if prior else "off", multi_block_mode=multi_block,
                     cfg_prompt="zeros", lm_head_bias=False, unpadded_requests=True,
                     packed_encoder_conv=remove_input_padding, dtype=dtype)


PLANTED_NAMES = {
    "kv_cache": lambda s: s.kv_cache, "prior=kernel": lambda s: s.prior == "kernel",
    "multi_block_mode (prior skipped)": lambda s: s.multi_block_mode, "cfg_prompt=zeros": lambda s: s.cfg_prompt == "zeros",
    "lm_head_bias=False": lambda s: not s.lm_head_bias, "packed_encoder_conv": lambda s: s.packed_encoder_conv,
    "unpadded_requests": lambda s: s.unpadded_requests, "dtype=float16": lambda s: s.dtype == "float16",
    "dtype=bfloat16": lambda s: s.dtype == "bfloat16", "encoder=bidirectional": lambda s: s.encoder == "bidirectional",
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", GRID, ids=[_ids(s) for s in GRID])
def test_emulated_engine_is_explained_by_its_settings(tmp_path, setting):
    mb, prior, cfg, rip, dtype = setting
    sem = engine_semantics(mb, prior, rip, dtype)
    batch = infer_inputs(load_batch(CASE))
    model = reference_model(CASE)
    dump = dump_engine_emulation(model, batch, tmp_path / "engine", sem, use_cfg=cfg, seed=0,
                                 apply_attention_prior=prior, **PARAMS)
    d = diagnose(model, tmp_path / "engine", batch, params={**PARAMS, "apply_attention_prior": prior})
    assert d.explained, d.report()
    planted = {name for name, on in PLANTED_NAMES.items() if on(sem)}
    assert set(d.explanation) <= planted, d.report()
    assert dump.predicted_codes.shape[0] == batch["text"].shape[0]


@pytest.mark.trtllm
@pytest.mark.parametrize("setting", GRID, ids=[_ids(s) for s in GRID])
def test_real_engine_is_explained_by_its_settings(tmp_path, setting, pytestconfig):
    """Needs a built engine (``--engine-dir``) of the released_small fixture; not run here (no TensorRT-LLM)."""
    from trt.runner import run_engine

    mb, prior, cfg, rip, dtype = setting
    batch = infer_inputs(load_batch(CASE))
    run = run_engine(pytestconfig.getoption("--engine-dir"), batch, use_cfg=cfg, cfg_scale=2.5, multi_block_mode=mb,
                     debug=True, max_new_tokens=PARAMS["max_decoder_steps"], temperature=1.0, top_k=1,
                     dump_out=tmp_path / "engine", model=reference_model(CASE))
    d = diagnose(reference_model(CASE), tmp_path / "engine", batch, codes=run.codes)
    assert d.explained, d.report()


@pytest.mark.parametrize("case", ["dce_baked_v2607", "dce_context"])
@pytest.mark.parametrize("mb", [False, True], ids=["mb0", "mb1"])
def test_emulated_decoder_ce_engine_is_explained_by_its_settings(tmp_path, case, mb):
    """decoder_ce (baked speakers with frame stacking 2; a context encoder): the fork's engine with the prior, CFG
    and remove_input_padding, its prompt the decoder_context rows + BOS (self-consistency: an emulated engine).
    Explained by no behaviour it did not switch on; on the baked batch unpadded_requests is left out (no context
    padding to remove), said in one line."""
    sem = engine_semantics(mb, True, True, "float32")
    batch = infer_inputs(load_batch(case))
    model = reference_model(case)
    dump_engine_emulation(model, batch, tmp_path / "engine", sem, use_cfg=True, seed=0, **PARAMS)
    d = diagnose(model, tmp_path / "engine", batch, params=PARAMS)
    assert d.explained, d.report()
    planted = {name for name, on in PLANTED_NAMES.items() if on(sem)}
    assert set(d.explanation) <= planted, d.report()
    left_out = [n for n in d.notes if n.startswith("Left out (cannot change this run): unpadded_requests")]
    assert len(left_out) == (1 if model.config.baked else 0), d.report()
