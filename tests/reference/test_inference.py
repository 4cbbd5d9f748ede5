"""Reference inference equals NeMo's infer_batch on the bundled fixtures (codes, lengths, per-step tensors)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import FIXTURES, infer_inputs, load_batch, reference_model
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.tolerances import policy
from reference.inference import InferenceError, draw_codes, invalid_probabilities

# Per-step logits: float32, same op order as NeMo's recompute path; 1e-5 allows rounding accumulated over
# up to 24 recomputed steps (observed: exact).
ATOL_STEP = policy("steps").default.atol  # 1e-5


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
def test_draw_codes_is_torch_multinomial(rows, vocab, topk, seed, temperature):
    """The sync-free draw equals torch.multinomial(probs, 1) for the same seed and leaves the generator in the
    same state (same numbers consumed), on top-k-masked softmax probabilities like the sampler's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    kth = torch.topk(logits, min(topk, vocab), dim=-1)[0][:, -1:]
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")) / temperature, dim=-1)
    g1, g2 = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    assert torch.equal(draw_codes(probs.unsqueeze(1), g1), torch.multinomial(probs, 1, generator=g2))
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


def _sampler_cfg(C, V, S):
    from types import SimpleNamespace

    return SimpleNamespace(num_audio_codebooks=C, num_all_tokens_per_codebook=V, frame_stacking_factor=S,
                           codebook_size=V - 8, audio_eos_id=V - 7)


def _two_passes_equal_sample_step(logits, cfg, temperature, topk, unfinished, finished, forbid_eos, make_gen):
    """NeMo's step makes two sample_codes calls (sampled, then argmax = temperature 0.01, top-1); sample_step
    must give the same codes, flag the same validity and leave the generator where they leave it."""
    from reference.inference import sample_codes, sample_step

    g1, g2 = make_gen(), make_gen()
    invalid: list = []
    want_next = sample_codes(logits, cfg, temperature, topk, unfinished, finished, forbid_eos, generator=g1,
                             invalid=invalid)
    want_argmax = sample_codes(logits, cfg, 0.01, 1, unfinished, finished, forbid_eos, generator=g1, invalid=invalid)
    got = sample_step(logits, cfg, temperature, topk, unfinished, finished, forbid_eos, generator=g2)
    assert torch.equal(got.valid.cpu(), ~torch.stack(invalid).cpu())
    if bool(got.valid.all()):  # with invalid probabilities the draws are garbage on both sides: never used
        assert torch.equal(got.sampled, want_next)
        assert torch.equal(got.argmax, want_argmax)
    assert torch.equal(torch.rand(3, generator=g1, device=logits.device), torch.rand(3, generator=g2, device=logits.device))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), B=st.integers(1, 4), C=st.integers(1, 4), S=st.integers(1, 2), V=st.integers(10, 60),
       seed=st.integers(0, 2**31 - 1), forbid_eos=st.booleans())
def test_sample_step_equals_the_two_sampling_passes(data, B, C, S, V, seed, forbid_eos):
    """The shared-work step sampler (one edit, one top-k, 2 x C*S draws) equals NeMo's two separate passes for
    random logits, item sets, top-k and temperature, ties included (logits rounded to a coarse grid)."""
    cfg = _sampler_cfg(C, V, S)
    topk = data.draw(st.integers(1, V - 8))
    temperature = data.draw(st.floats(0.05, 2.0))
    unfinished = {b: True for b in data.draw(st.sets(st.integers(0, B - 1)))}
    finished = {b: 20 for b in data.draw(st.sets(st.integers(0, B - 1)))}
    # scale 0.02: logits within a few hundredths, so the argmax pass (temperature 0.01) draws more than the maximum
    scale = data.draw(st.sampled_from([3.0, 0.02]))
    logits = torch.randn(B, C * V * S, generator=torch.Generator().manual_seed(seed)) * scale
    if data.draw(st.booleans()):
        logits = (logits / scale).round() * scale  # many equal logits: ties at the k-th value and at the maximum
    _two_passes_equal_sample_step(logits, cfg, temperature, topk, unfinished, finished, forbid_eos,
                                  lambda: torch.Generator().manual_seed(seed + 1))


@pytest.mark.gpu
def test_sample_step_and_draws_equal_torch_multinomial_on_cuda():
    """On CUDA too (Philox offsets follow each call's size): the per-codebook draws of draw_codes equal
    torch.multinomial call by call, and sample_step equals the two passes, at the seed benchmark's sizes."""
    from reference.inference import draw_codes

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for B, C, V in ((64, 8, 2024), (3, 4, 40)):
        cfg = _sampler_cfg(C, V, 1)
        logits = torch.randn(B, C * V, generator=g, device=dev) * 3
        kth = torch.topk(logits.view(B, C, V), 80 if V > 80 else 5, dim=-1)[0][..., -1:]
        probs = torch.softmax(logits.view(B, C, V).masked_fill(logits.view(B, C, V) < kth, float("-inf")) / 0.7, -1)
        g1, g2 = (torch.Generator(device=dev).manual_seed(B) for _ in range(2))
        want = torch.cat([torch.multinomial(probs[:, j], 1, generator=g1) for j in range(C)], dim=1)
        assert torch.equal(draw_codes(probs, g2), want)
        assert torch.equal(torch.rand(5, generator=g1, device=dev), torch.rand(5, generator=g2, device=dev))
        _two_passes_equal_sample_step(logits, cfg, 0.7, 80 if V > 80 else 5, {0: True}, {}, False,
                                      lambda: torch.Generator(device=dev).manual_seed(7))


def _naive_prior(counters, attended, text_lens, T_text, epsilon, lookahead):
    """NeMo's construct_inference_prior, loop for loop: the window around the attended position, then every
    position counted >= 10 times suppresses the prior up to and including itself."""
    prior = torch.full((len(counters), T_text), epsilon, dtype=torch.float32)
    for b, d in enumerate(counters):
        n, a = text_lens[b], attended[b]
        if n <= 5:
            prior[b, :] = 1.0
        else:
            prior[b, max(1, a - 1)] = 1.0
            prior[b, a] = 1.0
            for i in range(1, lookahead + 1):
                prior[b, min(a + i, n - 1)] = 1.0
        for t, count in d.items():
            if count >= 10:
                prior[b, : t + 1] = epsilon
    return prior


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 4), n=st.integers(8, 24), steps=st.integers(1, 60), seed=st.integers(0, 2**31 - 1),
       split=st.integers(0, 60))
def test_prior_state_stuck_positions_equal_nemos_counter_loop(B, n, steps, seed, split):
    """PriorState keeps 'the last position visited >= 10 times' as the counters grow instead of looping over all
    counters each step; the prior it builds suppresses the same positions as NeMo's loop, including when the
    counters were filled from outside (a state copied mid-run)."""
    from reference.inference import PriorState

    g = torch.Generator().manual_seed(seed)
    st_ = PriorState.new(B)
    text_lens = [n] * B
    for i in range(steps):
        if i == split:  # a state rebuilt from its counters mid-run derives the same marks
            st_ = PriorState(list(st_.last_attended), [dict(d) for d in st_.counters])
        scores = torch.rand(B, n, generator=g)
        scores[:, : n // 3] += 2 * (torch.rand(B, 1, generator=g) > 0.5)  # often stuck near the start
        attended = st_.most_attended(scores, text_lens, 3)
        prior = st_.build_prior(B, n, text_lens, attended, 1e-3, 3, {}, "cpu")[:, 0]
        assert torch.equal(prior, _naive_prior(st_.counters, attended, text_lens, n, 1e-3, 3))
        assert st_.stuck_end == [max((t + 1 for t, c in d.items() if c >= 10), default=0) for d in st_.counters]
