"""Reference inference equals NeMo's infer_batch on the bundled fixtures (codes, lengths, per-step tensors)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import FIXTURES, infer_inputs, load_batch, reference_model
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.inference import InferenceError, invalid_probabilities, multinomial1

# Per-step logits: float32, same op order as NeMo's recompute path; 1e-5 allows rounding accumulated over
# up to 24 recomputed steps (observed: exact).
ATOL_STEP = 1e-5


def _runs():
    prov = json.loads((FIXTURES / "provenance.json").read_text())
    for case, info in prov["cases"].items():
        for label, run in info["infer_runs"].items():
            yield pytest.param(case, label, run, id=f"{case}-{label}")


def _reference_run(case, run, **kw):
    model = reference_model(case)
    batch = infer_inputs(load_batch(case))
    if run.get("single_item") is not None:
        from make_fixtures import single_item

        batch = single_item(batch, run["single_item"])
    torch.manual_seed(run["seed"])
    return model.infer_batch(batch, use_cfg=run["use_cfg"], use_kv_cache=run["use_kv_cache"],
                             nemo_unmasked_padded_keys=True, keep_logits=True,
                             use_local_transformer_for_inference=run.get("use_local_transformer_for_inference", False),
                             **run["params"])


@pytest.mark.parametrize("case, label, run", list(_runs()))
def test_codes_and_steps_equal_nemo(case, label, run):
    from parity.dump import DumpReader

    nemo = DumpReader(FIXTURES / f"{case}.infer_{label}")
    out = _reference_run(case, run)
    assert torch.equal(out.predicted_codes, nemo.load("predicted_codes"))
    assert torch.equal(out.predicted_codes_lens, nemo.load("predicted_codes_lens"))
    steps = sorted({e.step for e in nemo.entries if e.name == "logits"})
    assert len(steps) == out.num_steps
    for k in steps:
        torch.testing.assert_close(out.step_logits[k], nemo.load("logits", k)[:, 0], atol=ATOL_STEP, rtol=0)
    prior_steps = sorted({e.step for e in nemo.entries if e.name == "inference.attn_prior"})
    attended = [nemo.load("inference.attended_text_position", k).tolist() for k in prior_steps]
    assert attended == out.attended_text_positions
    for i, k in enumerate(prior_steps):
        # the prior built at step k is the one used at step k + 1
        if k + 1 < out.num_steps:
            assert torch.equal(out.step_priors[k + 1], nemo.load("inference.attn_prior", k))


def test_every_layer_matches_nemo_during_recompute_decoding():
    """The recompute path's per-step tensors (whole sequences) equal NeMo's, layer by layer."""
    from parity.dump import DumpReader

    nemo = DumpReader(FIXTURES / "released_small.infer_layers_cfg")
    run = json.loads((FIXTURES / "provenance.json").read_text())["cases"]["released_small"]["infer_runs"]["layers_cfg"]
    model = reference_model("released_small")
    names = [n for n in model.capture_points() if n.startswith("decoder") or n == "final_proj"]
    with model.capture(names) as cap:
        _reference_run("released_small", run)
    mine = cap.as_dict()
    compared = 0
    for e in nemo.entries:
        if e.name not in names:
            continue
        torch.testing.assert_close(mine[(e.name, e.step)], nemo.load(e.name, e.step), atol=ATOL_STEP, rtol=0,
                                   msg=lambda m: f"{e.name}@{e.step}: {m}")
        compared += 1
    assert compared >= 8 * (len(names) - 1)


def test_teacher_forced_codes_reproduce_nemo_steps():
    """Feeding NeMo's codes back (instead of our samples) gives NeMo's per-step logits and attended positions."""
    from parity.dump import DumpReader

    nemo = DumpReader(FIXTURES / "released_small.infer_sampled_cfg")
    codes = nemo.load("predicted_codes")
    model = reference_model("released_small")
    torch.manual_seed(0)  # deliberately not NeMo's seed: our own samples are discarded
    out = model.infer_batch(infer_inputs(load_batch("released_small")), use_cfg=True, topk=20, temperature=0.7,
                            forced_codes=codes, keep_logits=True, max_decoder_steps=codes.shape[2])
    for k in range(codes.shape[2]):
        torch.testing.assert_close(out.step_logits[k], nemo.load("logits", k)[:, 0], atol=ATOL_STEP, rtol=0)


@pytest.mark.parametrize("use_cfg", [False, True])
def test_cached_equals_recompute_without_prior(use_cfg):
    """Where the semantics agree (no prior), KV-cached decoding equals full recomputation to float32 rounding."""
    model = reference_model("decoder_kernel3")  # kernel 3: exercises the cached causal-conv history too
    batch = infer_inputs(load_batch("decoder_kernel3"))
    kw = dict(use_cfg=use_cfg, topk=1, apply_attention_prior=False, keep_logits=True, max_decoder_steps=16)
    a = model.infer_batch(batch, use_kv_cache=False, **kw)
    b = model.infer_batch(batch, use_kv_cache=True, **kw)
    assert torch.equal(a.predicted_codes, b.predicted_codes)
    worst = max((x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits))
    assert worst <= 1e-6, worst


def test_cached_vs_recompute_with_prior_differs_by_design():
    """With the prior on, NeMo's recompute path re-applies the newest prior row to every past query position;
    a KV cache (and every TensorRT-LLM engine) applies it to the newest position only. Measure the gap."""
    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    kw = dict(use_cfg=True, topk=1, keep_logits=True, start_prior_after_n_audio_steps=2, max_decoder_steps=16)
    a = model.infer_batch(batch, use_kv_cache=False, **kw)
    b = model.infer_batch(batch, use_kv_cache=True, **kw)
    gaps = [(x - y).abs().max().item() for x, y in zip(a.step_logits, b.step_logits)]
    assert max(gaps[:3]) <= 1e-6  # steps 0..2 run before any prior exists
    assert max(gaps[4:]) > 1e-4  # a real, systematic difference once the prior applies
    print(f"cached vs recompute with prior: max |dlogit| per step = {[f'{g:.2e}' for g in gaps]}")


def test_nemo_cached_path_attends_padded_context_keys():
    """four_codebooks decodes with NeMo's KV cache on a batch of unequal context lengths. NeMo's cached steps
    do not mask padded context keys: the reference reproduces that behind a switch and masks them by default."""
    from parity.dump import DumpReader

    nemo = DumpReader(FIXTURES / "four_codebooks.infer_greedy_cfg")
    model = reference_model("four_codebooks")
    batch = infer_inputs(load_batch("four_codebooks"))
    assert model.config.use_kv_cache_for_inference and len(set(batch["context_audio_codes_lens"].tolist())) > 1
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    nemo_like = model.infer_batch(batch, nemo_unmasked_padded_keys=True, **kw)
    correct = model.infer_batch(batch, **kw)
    full_ctx = int(batch["context_audio_codes_lens"].argmax())  # the longest context has no padding
    for k in range(1, 6):
        ref = nemo.load("logits", k)[:, 0]
        torch.testing.assert_close(nemo_like.step_logits[k], ref, atol=ATOL_STEP, rtol=0)
        torch.testing.assert_close(correct.step_logits[k][full_ctx], ref[full_ctx], atol=ATOL_STEP, rtol=0)
    drift = max((correct.step_logits[k] - nemo_like.step_logits[k]).abs().max().item() for k in range(1, 6))
    assert drift > 1e-6
    print(f"padded-key drift on the shorter-context items: {drift:.2e}")


def test_maskgit_or_missing_local_transformer_is_a_clear_error():
    model = reference_model("released_small")
    with pytest.raises(InferenceError, match="local transformer"):
        model.infer_batch(infer_inputs(load_batch("released_small")), use_local_transformer_for_inference=True, topk=5)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(topk=0), "topk"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(max_decoder_steps=2, min_generated_frames=4), "max_decoder_steps"),
        (dict(eos_detection_method="sometimes"), "eos_detection_method"),
        (dict(apply_prior_to_layers=[0, 99]), "apply_prior_to_layers"),
        (dict(cfg_scale=float("inf")), "cfg_scale"),
        (dict(not_a_param=1), "unknown"),
        (dict(topk=73), "topk \\(73\\) exceeds the 72 tokens"),  # the fixture's checkpoint default is 80 > 72
    ],
)
def test_invalid_parameters(params, match):
    model = reference_model("released_small")
    with pytest.raises(InferenceError, match=match):
        model.infer_batch(infer_inputs(load_batch("released_small")), **params)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 300), topk=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       temperature=st.floats(0.05, 3.0))
def test_multinomial1_is_torch_multinomial(rows, vocab, topk, seed, temperature):
    """The sync-free draw equals torch.multinomial(probs, 1) for the same seed and leaves the generator in the
    same state (same numbers consumed), on top-k-masked softmax probabilities like the sampler's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    kth = torch.topk(logits, min(topk, vocab), dim=-1)[0][:, -1:]
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")) / temperature, dim=-1)
    g1, g2 = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    assert torch.equal(multinomial1(probs, g1), torch.multinomial(probs, 1, generator=g2))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_invalid_probabilities_flags_what_multinomial_refuses():
    p = torch.softmax(torch.randn(3, 7), dim=-1)
    assert not bool(invalid_probabilities(p))
    for bad in (float("nan"), float("inf")):
        lg = torch.randn(3, 7)
        lg[1, 2] = bad
        assert bool(invalid_probabilities(torch.softmax(lg, dim=-1)))
    assert bool(invalid_probabilities(torch.softmax(torch.full((2, 5), float("-inf")), dim=-1)))


def test_non_finite_logits_stop_inference_with_the_step():
    """NaN logits never become codes: the step's deferred validity check raises (NeMo's multinomial would)."""
    model = copy.deepcopy(reference_model("released_small"))  # the loaded model is shared between tests
    with torch.no_grad():
        model.final_proj.weight[5, 0] = float("nan")
    for use_kv_cache in (False, True):
        with pytest.raises(InferenceError, match="step 0: the sampling probabilities"):
            model.infer_batch(infer_inputs(load_batch("released_small")), use_kv_cache=use_kv_cache, topk=5)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 4), C=st.integers(1, 4), S=st.integers(1, 2), V=st.integers(10, 60),
       seed=st.integers(0, 2**31 - 1), forbid_eos=st.booleans())
def test_sampler_equals_the_per_codebook_loop(data, B, C, S, V, seed, forbid_eos):
    """sample_codes (all codebooks edited at once, sync-free draws) equals NeMo's structure -- per codebook: clone,
    EOS ban for unfinished items, forced EOS for finished ones, forbidden specials, top-k, softmax, torch.multinomial
    -- for random logits, item sets, top-k and temperature, with the same seed (same codes, same generator state)."""
    from types import SimpleNamespace

    from reference.inference import forbidden_tokens, sample_codes

    cfg = SimpleNamespace(num_audio_codebooks=C, num_all_tokens_per_codebook=V, frame_stacking_factor=S,
                          codebook_size=V - 8, audio_eos_id=V - 7)
    topk = data.draw(st.integers(1, V - 8))
    temperature = data.draw(st.floats(0.05, 2.0))
    unfinished = {b: True for b in data.draw(st.sets(st.integers(0, B - 1)))}
    finished = {b: 20 for b in data.draw(st.sets(st.integers(0, B - 1)))}
    logits = torch.randn(B, C * V * S, generator=torch.Generator().manual_seed(seed)) * 3

    def per_codebook(g):
        forbidden = forbidden_tokens(cfg, forbid_eos)
        per_stack = []
        for s in range(S):
            preds = []
            for c in range(C):
                lg = logits[:, (c + C * s) * V : (c + C * s + 1) * V].clone()
                for b in unfinished:
                    lg[b, cfg.audio_eos_id] = float("-inf")
                for b in finished:
                    lg[b, :] = float("-inf")
                    lg[b, cfg.audio_eos_id] = 0.0
                lg[:, forbidden] = float("-inf")
                kth = torch.topk(lg, topk, dim=-1)[0][:, -1:]
                probs = torch.softmax(lg.masked_fill(lg < kth, float("-inf")) / temperature, dim=-1)
                preds.append(torch.multinomial(probs, 1, generator=g))
            per_stack.append(torch.cat(preds, dim=1))
        return torch.stack(per_stack, dim=2)

    g1, g2 = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    if finished and forbid_eos:  # a finished item may only say EOS, which is forbidden: no token left
        with pytest.raises(RuntimeError, match="probability tensor"):
            per_codebook(g2)
        with pytest.raises(InferenceError, match="probability tensor"):
            sample_codes(logits, cfg, temperature, topk, unfinished, finished, forbid_eos, generator=g1)
        return
    got = sample_codes(logits, cfg, temperature, topk, unfinished, finished, forbid_eos, generator=g1)
    assert torch.equal(got, per_codebook(g2))
    assert torch.equal(torch.rand(2, generator=g1), torch.rand(2, generator=g2))
