"""Each engine-policy field has a visible, explained effect relative to NeMo's behaviour.

These check self-consistency of the emulation (trt/engine.py: the reference's loop under hooks), not a real
engine: the real-engine suite is marked ``trtllm`` (tests/trt/test_engine_suite.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import infer_inputs, load_batch, reference_model
from reference.inference import PriorState
from trt.engine import EnginePolicy, KernelPrior, infer, kernel_prior_rows

STEPS = 12
# Effects are asserted to exceed 1e-5: float32 rounding of these O(1) logits is ~1e-7, and the random-weight
# fixtures (std 0.02 init) make genuine effects small but far above rounding.


def run(case, sem=None, use_cfg=True, batch=None, **kw):
    model = reference_model(case)
    batch = batch or infer_inputs(load_batch(case))
    kw = {"topk": 1, "max_decoder_steps": STEPS, "start_prior_after_n_audio_steps": 2, **kw}
    if sem is None:  # NeMo's loop itself, no policy
        return model.infer_batch(batch, use_cfg=use_cfg, keep_logits=True, **kw)
    return infer(model, batch, sem, use_cfg=use_cfg, keep_logits=True, **kw)


def max_gap(a, b, steps=None):
    pairs = list(zip(a.step_logits, b.step_logits))
    if steps is not None:
        pairs = [pairs[k] for k in steps]
    return max((x - y).abs().max().item() for x, y in pairs)


def test_default_policy_is_nemo():
    assert EnginePolicy().differences() == []
    a, b = run("released_small"), run("released_small", EnginePolicy())
    assert max_gap(a, b) == 0


def test_lm_head_without_bias_shifts_logits_by_the_bias():
    model = reference_model("released_small")
    a = run("released_small", EnginePolicy(kv_cache=True))
    b = run("released_small", EnginePolicy(kv_cache=True, lm_head_bias=False), forced_codes=a.predicted_codes)
    # CFG combines two rows that both lose the bias: (1-s)(u-b) + s(c-b) = combined - b (up to rounding)
    for x, y in zip(a.step_logits, b.step_logits):
        torch.testing.assert_close(x - y, model.final_proj.bias.expand_as(x), atol=1e-5, rtol=0)


def test_bidirectional_encoder_matches_a_bidirectional_checkpoint_and_changes_a_causal_one():
    assert max_gap(run("bidir_encoder"), run("bidir_encoder", EnginePolicy(encoder="bidirectional"))) < 1e-6
    assert max_gap(run("released_small"), run("released_small", EnginePolicy(encoder="bidirectional"))) > 1e-5


def test_packed_encoder_conv_leaks_only_across_requests():
    case = "bidir_encoder"
    batch = infer_inputs(load_batch(case))
    single = {k: (v[:1, ..., : int(batch["text_lens"][0])] if k == "text" else v[:1]) for k, v in batch.items()}
    single["context_audio_codes"] = single["context_audio_codes"][..., : int(single["context_audio_codes_lens"][0])]
    sem = EnginePolicy(encoder="bidirectional", packed_encoder_conv=True)
    assert max_gap(run(case, batch=single), run(case, sem, batch=single)) < 1e-6  # one request: nothing to leak into
    assert max_gap(run(case), run(case, sem)) > 1e-5


def test_unpadded_requests_equal_separate_runs():
    """The engine packs requests without padding; NeMo pads contexts, which shifts the decoder positions."""
    case = "released_small"
    batch = infer_inputs(load_batch(case))
    unpadded = run(case, EnginePolicy(unpadded_requests=True))
    for b in range(3):
        n_text, n_ctx = int(batch["text_lens"][b]), int(batch["context_audio_codes_lens"][b])
        item = {"text": batch["text"][b : b + 1, :n_text], "text_lens": batch["text_lens"][b : b + 1],
                "context_audio_codes": batch["context_audio_codes"][b : b + 1, :, :n_ctx],
                "context_audio_codes_lens": batch["context_audio_codes_lens"][b : b + 1]}
        alone = run(case, batch=item)
        assert torch.equal(alone.predicted_codes, unpadded.predicted_codes[b : b + 1, :, : alone.predicted_codes.shape[2]])
    assert max_gap(run(case), unpadded) > 1e-5


def test_cfg_zero_prompt_changes_only_guided_runs():
    case = "released_small"
    sem = EnginePolicy(kv_cache=True, cfg_prompt="zeros")
    assert max_gap(run(case, EnginePolicy(kv_cache=True), use_cfg=False), run(case, sem, use_cfg=False)) == 0
    assert max_gap(run(case, EnginePolicy(kv_cache=True)), run(case, sem), steps=[0]) > 1e-5


def test_multi_block_mode_skips_the_prior():
    case = "released_small"
    kernel = EnginePolicy(kv_cache=True, prior="kernel")
    off = run(case, EnginePolicy(kv_cache=True, prior="off"))
    multi = run(case, dataclasses.replace(kernel, multi_block_mode=True))
    assert max_gap(off, multi) == 0
    assert max_gap(run(case, kernel), multi, steps=range(4, STEPS)) > 1e-5  # the prior is in force from step 3


def test_kernel_prior_window_equals_nemo_prior_away_from_the_edges():
    """Same window and epsilon as NeMo's {t-1 .. t+5} except NeMo clamps the left edge at index 1 and ignores
    short texts; the kernel does neither."""
    T, n = 20, 20
    kp = KernelPrior()
    for t in range(2, n - 6):
        nemo = PriorState.new(1).build_prior(1, T, [n], [t], 0.1, 5, {}, "cpu")
        assert torch.equal(nemo, kernel_prior_rows(1, T, [t], kp, "cpu")), t
    nemo = PriorState.new(1).build_prior(1, T, [n], [1], 0.1, 5, {}, "cpu")
    kernel = kernel_prior_rows(1, T, [1], kp, "cpu")
    assert nemo[0, 0, 0] == pytest.approx(0.1) and kernel[0, 0, 0] == 1.0  # index 0: outside NeMo's, inside the kernel's
    short = PriorState.new(1).build_prior(1, 5, [5], [2], 0.1, 5, {}, "cpu")
    assert torch.all(short == 1.0)  # NeMo: no prior for texts of <= 5 tokens


def test_kernel_prior_first_focus_changes_alignment():
    case = "released_small"
    a = run(case, EnginePolicy(kv_cache=True, prior="kernel"))
    b = run(case, EnginePolicy(kv_cache=True, prior="kernel", kernel_prior=KernelPrior(first_focus=4)))
    assert a.attended_text_positions != b.attended_text_positions


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_reduced_precision_stays_near_float32(dtype, tol):
    """fp16 keeps ~11 bits, bf16 ~8: relative to the logits' scale, a few layers of rounding stay within
    ~2e-2 (fp16) and ~1e-1 (bf16) of float32 on these small models (teacher-forced, same codes)."""
    case = "released_small"
    ref = run(case, EnginePolicy(kv_cache=True), apply_attention_prior=False)
    low = run(case, EnginePolicy(kv_cache=True, dtype=dtype), apply_attention_prior=False, forced_codes=ref.predicted_codes)
    scale = max(x.abs().max().item() for x in ref.step_logits)
    assert 0 < max_gap(ref, low) <= tol * scale


def test_engine_preset_from_converted_config(tmp_path):
    import json

    from trt.convert import convert_checkpoint
    from conftest import FIXTURES

    out = convert_checkpoint(FIXTURES / "released_small.nemo", tmp_path / "ckpt")
    cfg = json.loads((out / "decoder" / "config.json").read_text())
    sem = EnginePolicy.from_trtllm_config(cfg)
    assert sem.kv_cache is True and sem.encoder == "bidirectional" and sem.cfg_prompt == "zeros"
    assert sem.lm_head_bias is bool(cfg.get("has_lm_head_bias", False))
    assert set(sem.differences()) >= {"kv_cache", "cfg_prompt", "encoder", "unpadded_requests"}


def test_the_packed_encoder_reuses_the_reference_layers():
    """The engine's encoder is the reference's Transformer rebuilt with the engine's options and the same weights:
    with nothing to change it is the model's own encoder, and with one request the packed conv equals the padded one."""
    from trt.engine import encode_text, engine_encoder

    model = reference_model("bidir_encoder")
    assert engine_encoder(model, EnginePolicy()) is model.encoder
    batch = load_batch("bidir_encoder")
    n = int(batch["text_lens"][0])
    text, lens = batch["text"][:1, :n], batch["text_lens"][:1]
    with torch.no_grad():
        own = model.encode_text(text, lens).output
        packed = encode_text(model, text, lens, EnginePolicy(encoder="bidirectional", packed_encoder_conv=True)).output
    assert torch.equal(own, packed)  # bidirectional checkpoint, one request: the same ops on the same values


@pytest.mark.parametrize("case, policy", [("dce_baked_v2607", EnginePolicy(kv_cache=True)),
                                          ("dce_baked_v2607", EnginePolicy(kv_cache=True, cfg_prompt="zeros")),
                                          ("dce_context", EnginePolicy(kv_cache=True, unpadded_requests=True)),
                                          ("dce_context", EnginePolicy(kv_cache=True, unpadded_requests=True,
                                                                       cfg_prompt="zeros"))])
def test_decoder_ce_prompt_is_what_the_runner_feeds(case, policy):
    """decoder_ce: the emulated engine's step-0 prompt (the decoder input before positions) is, per request, what
    trt.runner feeds as ``decoder_context_features``: the ``decoder_context`` rows of valid length + the BOS-frame
    embedding; with CFG the unconditional rows are NeMo's (zero prefix, BOS kept: the runner's [cond; uncond]
    rows) or, with ``cfg_prompt="zeros"``, all zero (the service token of a runtime given the conditional rows
    only). Baked: one padded batch (no context padding to remove); context encoder: one run per unpadded request."""
    from trt.runner import reference_context_features, uncond_context_features

    model = reference_model(case)
    batch = infer_inputs(load_batch(case))
    seen = []
    handle = model.decoder_input.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        infer(model, batch, policy, use_cfg=True, topk=1, max_decoder_steps=4)
    finally:
        handle.remove()
    feats = reference_context_features(model, batch)
    B = len(feats)
    prompts = [t for t in seen if t.shape[1] > 1]  # the cached steps after the prompt feed one row
    assert len(prompts) == (B if policy.unpadded_requests else 1)
    for b, f in enumerate(feats):
        rows = prompts[0][[b, B + b]] if len(prompts) == 1 else prompts[b]
        assert rows.shape[1] == f.shape[0], (rows.shape, f.shape)
        uncond = torch.zeros_like(f) if policy.cfg_prompt == "zeros" else uncond_context_features(f)
        torch.testing.assert_close(rows[0], f, atol=1e-6, rtol=0)
        torch.testing.assert_close(rows[1], uncond, atol=0, rtol=0)
