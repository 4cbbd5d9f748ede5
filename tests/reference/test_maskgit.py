"""MaskGit local-transformer sampling (``reference.inference.sample_maskgit``) against NeMo 3.0.0's
``LocalTransformerHelper.sample_maskgit``: the sampler alone and inside ``infer_batch``, greedy (top-1) and seeded
top-k, CFG on and off, frame stacking 1 and 2, every NeMo option (steps, fixed schedule, dynamic CFG, noise, the
sampling types); the codes and the random stream after the call must be identical. Where NeMo crashes the reference
raises a one-line InferenceError. The schedule (float32 cosine) is checked for all sizes without NeMo."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.inference import (InferenceError, MaskGitOptions, maskgit_process_batch_draws, maskgit_unmasked_counts,
                                 sample_maskgit)
from test_chunked import build_pair, nemo_parameters

# min_generated_frames 8: NeMo's infer_batch decodes its codes with the tiny codec, which needs >= 7 frames
PARAMS = dict(max_decoder_steps=30, min_generated_frames=8, start_prior_after_n_audio_steps=0)
OPTIONS = [dict(), dict(n_steps=1), dict(n_steps=5), dict(fixed_schedule=[0, 1, 2]), dict(fixed_schedule=[0, 2, 1]),
           dict(dynamic_cfg_scale=True), dict(sampling_type="causal"), dict(sampling_type="purity_default"),
           dict(sampling_type="purity_causal"), dict(noise_scale=0.5, n_steps=4)]


@pytest.fixture(scope="module")
def maskgit_pairs():
    """fsf -> (NeMo model, reference model, batch of 3 with audio codes)."""
    from make_fixtures import make_batch

    out = {}
    for fsf, seed in ((1, 9), (2, 13)):
        nemo, ref, context = build_pair(fsf, "maskgit", seed)
        batch = make_batch(nemo, seed=3)
        out[fsf] = nemo, ref, batch
    return out


def _infer_inputs(batch):
    return {k: v for k, v in batch.items() if k.startswith(("text", "context"))}


def _opts(kw):
    return {f"maskgit_{k}": v for k, v in kw.items()}


def _valid_for(kw, use_cfg):
    return not (kw.get("noise_scale", 0) > 0 and not use_cfg)


# ---- live: NeMo's infer_batch and sampler ----------------------------------------------------------------------

INFER = [(fsf, cfg, topk, i) for fsf in (1, 2) for cfg in (False, True) for topk in (1, 20)
         for i, kw in enumerate(OPTIONS) if _valid_for(kw, cfg)]


@pytest.mark.nemo
@pytest.mark.parametrize("fsf, use_cfg, topk, option", INFER,
                         ids=[f"s{f}-{'cfg' if c else 'nocfg'}-top{k}-{'-'.join(f'{a}={b}' for a, b in OPTIONS[i].items()) or 'default'}"
                              for f, c, k, i in INFER])
def test_infer_batch_with_maskgit_equals_nemo(maskgit_pairs, fsf, use_cfg, topk, option):
    nemo, ref, batch = maskgit_pairs[fsf]
    kw = _opts(OPTIONS[option])
    params = dict(PARAMS, topk=topk)
    with nemo_parameters(nemo, **params):
        torch.manual_seed(3)
        with torch.no_grad():
            want = nemo.infer_batch(_infer_inputs(batch), use_cfg=use_cfg, use_local_transformer_for_inference=True, **kw)
        rng = torch.rand(3)
    torch.manual_seed(3)
    got = ref.infer_batch(_infer_inputs(batch), use_cfg=use_cfg, use_local_transformer_for_inference=True, **kw, **params)
    assert torch.equal(rng, torch.rand(3)), "the random stream differs after the call"
    assert torch.equal(got.predicted_codes_lens, want.predicted_codes_lens.cpu())
    assert torch.equal(got.predicted_codes, want.predicted_codes)


SAMPLER = [(fsf, cfg, fin, forbid, i) for fsf in (1, 2) for cfg in (False, True) for fin in (False, True)
           for forbid in (False, True) for i, kw in enumerate(OPTIONS) if _valid_for(kw, cfg)]


@pytest.mark.nemo
@pytest.mark.parametrize("fsf, use_cfg, finished, forbid, option", SAMPLER)
def test_sampler_equals_nemos(maskgit_pairs, fsf, use_cfg, finished, forbid, option):
    """The sampler alone on random decoder outputs: a finished item's forced EOS comes after the forbidden tokens'
    edit (NeMo's MaskGit order), so it wins even while EOS is forbidden."""
    nemo, ref, _ = maskgit_pairs[fsf]
    o = OPTIONS[option]
    g = torch.Generator().manual_seed(fsf * 100 + option)
    B = 3
    dec = torch.randn(2 * B if use_cfg else B, ref.config.d_model, generator=g)
    fin = {1: True} if finished else {}
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            want = nemo._lt_helper.sample_maskgit(dec.clone(), temperature=0.7, topk=20, unfinished_items={},
                                                  finished_items=fin, use_cfg=use_cfg, cfg_scale=2.5,
                                                  n_steps=o.get("n_steps", 3), noise_scale=o.get("noise_scale", 0.0),
                                                  fixed_schedule=o.get("fixed_schedule"),
                                                  dynamic_cfg_scale=o.get("dynamic_cfg_scale", False),
                                                  sampling_type=o.get("sampling_type"), forbid_audio_eos=forbid)
        rng = torch.rand(3)
        torch.manual_seed(seed)
        with torch.inference_mode():
            got = sample_maskgit(ref, dec.clone(), 0.7, 20, {}, fin, use_cfg, 2.5, forbid,
                                 MaskGitOptions.from_args(**o))
        assert torch.equal(rng, torch.rand(3))
        assert torch.equal(got, want)
        if finished:
            assert (got[1] == ref.config.audio_eos_id).all()


NEMO_CRASHES = [
    # (maskgit options, use_cfg, NeMo's exception, the reference's message)
    (dict(noise_scale=0.5), False, UnboundLocalError, "needs use_cfg=True"),
    (dict(dynamic_cfg_scale=True, n_steps=1), True, ZeroDivisionError, "at least 2 MaskGit steps"),
    (dict(dynamic_cfg_scale=True, fixed_schedule=[0]), True, ZeroDivisionError, "at least 2 MaskGit steps"),
    (dict(fixed_schedule=[1, 3, 4]), True, AssertionError, "starting at 0"),
    (dict(n_steps=0), False, AssertionError, "maskgit_n_steps must be an integer >= 1"),
    (dict(noise_scale=40.0), True, AssertionError, "pushed a MaskGit confidence"),
]


@pytest.mark.nemo
@pytest.mark.parametrize("kw, use_cfg, nemo_error, message", NEMO_CRASHES)
def test_where_nemo_crashes_the_reference_says_why(maskgit_pairs, kw, use_cfg, nemo_error, message):
    nemo, ref, batch = maskgit_pairs[2]
    with nemo_parameters(nemo, **dict(PARAMS, topk=20)):
        torch.manual_seed(0)
        with pytest.raises(nemo_error), torch.no_grad():
            nemo.infer_batch(_infer_inputs(batch), use_cfg=use_cfg, use_local_transformer_for_inference=True, **_opts(kw))
    torch.manual_seed(0)
    with pytest.raises(InferenceError, match=message) as e:
        ref.infer_batch(_infer_inputs(batch), use_cfg=use_cfg, use_local_transformer_for_inference=True, **_opts(kw),
                        **dict(PARAMS, topk=20))
    assert "\n" not in str(e.value)


@pytest.mark.nemo
def test_unfinished_items_crash_nemo_and_are_refused(maskgit_pairs):
    """Sentence tracking on with the prior running: NeMo's MaskGit indexes the codebook axis with the EOS id."""
    nemo, ref, batch = maskgit_pairs[1]
    params = dict(PARAMS, topk=20, ignore_finished_sentence_tracking=False)
    with nemo_parameters(nemo, **params), pytest.raises(IndexError), torch.no_grad():
        nemo.infer_batch(_infer_inputs(batch), use_cfg=True, use_local_transformer_for_inference=True)
    with pytest.raises(InferenceError, match="ignore_finished_sentence_tracking"):
        ref.infer_batch(_infer_inputs(batch), use_cfg=True, use_local_transformer_for_inference=True, **params)
    # with the prior off there is no unfinished item: NeMo runs, and so does the reference, identically
    params["apply_attention_prior"] = False
    with nemo_parameters(nemo, **params):
        torch.manual_seed(1)
        with torch.no_grad():
            want = nemo.infer_batch(_infer_inputs(batch), use_cfg=True, use_local_transformer_for_inference=True)
    torch.manual_seed(1)
    got = ref.infer_batch(_infer_inputs(batch), use_cfg=True, use_local_transformer_for_inference=True, **params)
    assert torch.equal(got.predicted_codes, want.predicted_codes)


@pytest.mark.nemo
@pytest.mark.parametrize("fsf", [1, 2])
def test_process_batch_logits_and_nemos_random_masking(maskgit_pairs, fsf):
    """NeMo's process_batch draws the MaskGit training mask in eval too; its logits do not depend on it. The
    reference draws nothing; maskgit_process_batch_draws puts the random stream where NeMo's is."""
    nemo, ref, batch = maskgit_pairs[fsf]
    if fsf == 2:
        # NeMo's MaskGit logits need the padded frames + 1 to be a multiple of the stacking (else its process_batch
        # fails: "size of tensor a (14) must match ... (13)"): 11 frames, not the batch's 12
        batch = dict(batch, audio_codes=batch["audio_codes"][:, :, :11],
                     audio_codes_lens=batch["audio_codes_lens"].clamp(max=11))
    torch.manual_seed(5)
    with torch.no_grad():
        want = nemo.process_batch(copy.deepcopy(batch))
    after_nemo = torch.rand(4)
    torch.manual_seed(5)
    got = ref.process_batch(batch)
    assert not torch.equal(torch.rand(4), after_nemo)  # NeMo did draw
    torch.manual_seed(5)
    ref.process_batch(batch)
    maskgit_process_batch_draws(batch, ref.config)
    assert torch.equal(torch.rand(4), after_nemo)
    assert torch.equal(got["logits"], want["logits"])


# ---- no NeMo -------------------------------------------------------------------------------------------------------


def nemo_schedule(L, n_steps, fixed_schedule=None, sampling_type=None):
    """NeMo 3.0.0's per-step count of kept positions (sample_maskgit's head, transcribed; float32 as NeMo)."""
    if fixed_schedule is not None:
        n_steps = len(fixed_schedule)
    out = []
    for step in range(n_steps):
        progress = step / n_steps
        frac_masked = torch.cos(torch.tensor(progress, dtype=torch.float32) * (torch.pi / 2))
        if sampling_type in ("causal", "purity_causal"):
            frac_masked = torch.ones_like(frac_masked) * (1.0 - progress)
        n_masked = torch.ceil(L * frac_masked).long() if fixed_schedule is None else L - fixed_schedule[step]
        out.append(int(L - n_masked))
    return out


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 64), st.integers(1, 24), st.sampled_from([None, "causal", "purity_causal", "purity_default", "x"]))
def test_schedule_is_nemos_float32_cosine(L, n_steps, sampling_type):
    counts = maskgit_unmasked_counts(L, n_steps, None, sampling_type)
    assert counts == nemo_schedule(L, n_steps, None, sampling_type)
    assert counts[0] == 0 and all(0 <= c <= L for c in counts)


def test_schedule_float32_counts():
    """The spec's table: float32 (NeMo) gives fewer masked positions at the last of 3 steps than float64 would."""
    for L, masked in ((4, [4, 4, 2]), (8, [8, 7, 4]), (16, [16, 14, 8])):
        assert [L - n for n in maskgit_unmasked_counts(L, 3)] == masked


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16), st.lists(st.integers(0, 16), min_size=1, max_size=6))
def test_fixed_schedule_is_the_kept_counts(L, tail):
    sched = [0] + [min(n, L) for n in tail]
    assert maskgit_unmasked_counts(L, 3, sched) == nemo_schedule(L, 3, sched) == sched


@pytest.mark.nemo
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(1, 24))
def test_schedule_uses_nemos_cosine(L, n_steps):
    from nemo.collections.tts.modules.magpietts_modules import cosine_schedule

    want = [L - int(torch.ceil(L * cosine_schedule(torch.tensor(s / n_steps))).long()) for s in range(n_steps)]
    assert maskgit_unmasked_counts(L, n_steps) == want


def test_options_are_checked_in_one_line():
    for kw, cfg, msg in [(dict(n_steps=0), True, "maskgit_n_steps"), (dict(n_steps=2.5), True, "maskgit_n_steps"),
                         (dict(fixed_schedule=[]), True, "maskgit_fixed_schedule"),
                         (dict(fixed_schedule=[0, 9]), True, "maskgit_fixed_schedule"),
                         (dict(fixed_schedule=[0, -1]), True, "maskgit_fixed_schedule"),
                         (dict(fixed_schedule="ab"), True, "maskgit_fixed_schedule"),
                         (dict(noise_scale=0.1), False, "maskgit_noise_scale"),
                         (dict(noise_scale="x"), True, "maskgit_noise_scale"),
                         (dict(dynamic_cfg_scale=True, n_steps=1), True, "maskgit_dynamic_cfg_scale")]:
        with pytest.raises(InferenceError, match=msg) as e:
            MaskGitOptions.from_args(**kw).check(4, cfg)
        assert "\n" not in str(e.value)
    MaskGitOptions.from_args(dynamic_cfg_scale=True, n_steps=1).check(4, False)  # NeMo's branch needs CFG
    MaskGitOptions.from_args(noise_scale=-1.0).check(4, False)  # no noise unless > 0, as NeMo


def test_maskgit_options_are_ignored_without_a_maskgit_model():
    """NeMo ignores the maskgit_* arguments unless the checkpoint's LT is MaskGit; so does the reference."""
    from conftest import infer_inputs, load_batch, reference_model

    model = reference_model("stacked_lt")  # an AR local transformer
    b = infer_inputs(load_batch("stacked_lt"))
    torch.manual_seed(0)
    a = model.infer_batch(b, use_cfg=True, use_local_transformer_for_inference=True, topk=20, max_decoder_steps=8)
    torch.manual_seed(0)
    c = model.infer_batch(b, use_cfg=True, use_local_transformer_for_inference=True, topk=20, max_decoder_steps=8,
                          maskgit_n_steps=0, maskgit_noise_scale=3.0)
    assert torch.equal(a.predicted_codes, c.predicted_codes)
