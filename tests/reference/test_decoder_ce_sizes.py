"""decoder_ce models whose sizes differ from the bundled fixtures, built by NeMo 3.0.0 in-process: other codebook
counts, cross-attention heads and head sizes, layer counts, context-encoder depth and causality, context lengths,
prior layers from ``inference_parameters``; a context encoder and a baked table. The reference (loaded from NeMo's
config and state dict; it imports no NeMo) must give NeMo's teacher-forced logits bit for bit, and NeMo's
``infer_batch`` and ``generate_speech`` codes and lengths (greedy and seeded top-k, local transformer off and on)."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES
from test_chunked import END_OF_TEXT, bake, run_both, text_chunks

# Float32 on one CPU thread: the reference runs NeMo's op sequence, so 0 is expected; 1e-5 is the bound.
ATOL = 1e-5

VARIANTS = {
    # 4 codebooks, 2-head cross-attention with 8-wide heads, 4 decoder layers, a causal 2-layer context encoder,
    # frame stacking 2, a 2-layer AR local transformer as wide as the model (v2607-like), prior on layers 1..2
    "cb4_xa2_ctx": dict(codec="codec_4cb.nemo", fsf=2, xa=(2, 8), dec_layers=4, ctx=(2, True), lt=(2, 32, 2),
                        prior=dict(apply_prior_to_layers=[1, 2], estimate_alignment_from_layers=[2, 3],
                                   attention_prior_lookahead_window=6), baked=False),
    # the same sizes, baked (4 speakers baked at 9 frames), frame stacking 1, a narrow 1-layer LT (v2602-like)
    "cb4_xa2_baked": dict(codec="codec_4cb.nemo", fsf=1, xa=(2, 8), dec_layers=2, ctx=(1, False), lt=(1, 16, 1),
                          prior=dict(apply_prior_to_layers=[0], attention_prior_lookahead_window=6), baked=True),
}


def build(spec: dict, seed: int):
    from make_fixtures import _decoder, _quiet_nemo, magpie_config, make_batch, transformer_cfg
    from omegaconf import OmegaConf

    _quiet_nemo()
    from nemo.collections.tts.models import MagpieTTSModel

    from reference import MagpieTTS

    n_ctx, ctx_causal = spec["ctx"]
    lt_layers, lt_hidden, lt_heads = spec["lt"]
    extra = dict(model_type="decoder_ce", frame_stacking_factor=spec["fsf"], local_transformer_type="autoregressive",
                 local_transformer_n_layers=lt_layers, local_transformer_hidden_dim=lt_hidden,
                 local_transformer_n_heads=lt_heads,
                 context_encoder=transformer_cfg(kernel_size=3, is_causal=ctx_causal, n_layers=n_ctx,
                                                 apply_norm_out=True, max_length_causal_mask=64))
    if spec["fsf"] > 1:
        extra.update(prior_scaling_factor=None, alignment_loss_scale=0.0)
    cfg = magpie_config(str(FIXTURES / spec["codec"]),
                        encoder=transformer_cfg(kernel_size=3, is_causal=True, max_length_causal_mask=128),
                        decoder=_decoder(n_layers=spec["dec_layers"], xa_n_heads=spec["xa"][0], xa_d_head=spec["xa"][1],
                                         max_length_causal_mask=128), **extra)
    cfg["inference_parameters"].update(topk=20, **spec["prior"])
    torch.manual_seed(seed)
    nemo = MagpieTTSModel(cfg=OmegaConf.create(cfg))
    nemo.eval()
    batch = make_batch(nemo, seed=seed + 1)
    if spec["baked"]:
        g = torch.Generator().manual_seed(seed)
        bake(nemo, torch.randint(0, nemo.codebook_size, (4, nemo.num_audio_codebooks, 7), generator=g), torch.full((4,), 7))
        context = {"speaker_indices": [3, 0, 2]}
        batch = {k: v for k, v in batch.items() if not k.startswith("context")}
        batch.update(speaker_indices=torch.tensor([3, 0, 2]))
    else:
        context = {k: v for k, v in batch.items() if k.startswith("context")}
    ref = MagpieTTS.from_state_dict(OmegaConf.to_container(nemo.cfg, resolve=True), dict(nemo.state_dict()), where="nemo")
    return nemo, ref, batch, context


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request):
    return (request.param, *build(VARIANTS[request.param], seed=21))


@pytest.mark.nemo
def test_sizes_and_config_come_from_the_checkpoint(pair):
    name, nemo, ref, _, _ = pair
    c = ref.config
    assert c.num_audio_codebooks == nemo.num_audio_codebooks == 4
    assert (c.decoder.xa_n_heads, c.decoder.xa_head_dim) == VARIANTS[name]["xa"]
    assert c.baked == VARIANTS[name]["baked"] and c.frame_stacking_factor == VARIANTS[name]["fsf"]
    assert list(c.inference.apply_prior_to_layers) == VARIANTS[name]["prior"]["apply_prior_to_layers"]


@pytest.mark.nemo
def test_teacher_forced_logits_equal_nemo(pair):
    _, nemo, ref, batch, _ = pair
    with torch.no_grad():
        a = nemo.process_batch(batch)["logits"]
        b = ref.process_batch(batch)["logits"]
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert torch.equal(a, b), (a - b).abs().max()  # observed: bit-identical


@pytest.mark.nemo
@pytest.mark.parametrize("lt", [False, True], ids=["nolt", "lt"])
@pytest.mark.parametrize("topk, seed", [(1, 0), (20, 123)], ids=["greedy", "topk"])
def test_infer_batch_codes_equal_nemo(pair, lt, topk, seed):
    _, nemo, ref, batch, _ = pair
    ib = {k: v for k, v in batch.items() if k.startswith(("text", "context", "speaker"))}
    params = dict(max_decoder_steps=16, min_generated_frames=6, topk=topk)
    for k, v in params.items():
        setattr(nemo.inference_parameters, k, v)
    nemo.codes_to_audio = lambda codes, lens, **kw: (torch.zeros(codes.shape[0], 1), lens)  # no codec decoding
    torch.manual_seed(seed)
    with torch.no_grad():
        a = nemo.infer_batch(ib, use_cfg=True, use_local_transformer_for_inference=lt)
    torch.manual_seed(seed)
    b = ref.infer_batch(ib, use_cfg=True, use_local_transformer_for_inference=lt, **params)
    assert torch.equal(a.predicted_codes_lens.cpu(), b.predicted_codes_lens)
    assert torch.equal(a.predicted_codes, b.predicted_codes)


@pytest.mark.nemo
def test_generate_speech_one_and_three_chunks_equal_nemo(pair):
    _, nemo, ref, _, context = pair
    params = dict(max_decoder_steps=16, min_generated_frames=4, temperature=0.7, topk=20)
    one = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, [[11, 7, 9]], seed=5)
    run_both(nemo, ref, context, one, [[True] * 3], True, True, params, seed=6)
    three = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, [[40, 30, 38], [1, 41, 20], [1, 1, 25]],
                        seed=7)
    run_both(nemo, ref, context, three, END_OF_TEXT, True, True, params, seed=8)
