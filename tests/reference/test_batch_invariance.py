"""Property: a sample's outputs do not depend on what else is in its batch or how far it is padded.

It holds for text and target-audio padding. It does NOT hold for context padding, in NeMo and so in the
reference: the decoder's learned positions run over the padded context prefix, so a sample's audio frames
sit at positions that depend on the longest context in the batch (the second test pins this down).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import reference_model
from parity.tolerances import policy

# Different batch sizes change BLAS blocking, so results may differ by rounding only: a few ulps of O(1)
# values accumulated over a handful of layers stays far below 1e-5.
ATOL = policy("steps").default.atol  # 1e-5


def _random_item(c, g, T_text, T_ctx, T_audio):
    text = torch.randint(0, c.num_text_tokens - 2, (T_text,), generator=g)
    text[-1] = c.text_eos_id
    ctx = torch.randint(0, c.codebook_size, (c.num_audio_codebooks, T_ctx), generator=g)
    audio = torch.randint(0, c.codebook_size, (c.num_audio_codebooks, T_audio), generator=g)
    return text, ctx, audio


def _pad_batch(items, c, g):
    # NeMo requires every padded dimension to equal the longest length (its masks are max(lens) wide).
    B = len(items)
    Tt = max(len(t) for t, _, _ in items)
    Tc = max(x.shape[1] for _, x, _ in items)
    Ta = max(a.shape[1] for _, _, a in items)
    # Padding is filled with random valid ids, not zeros: the model must ignore it whatever it holds.
    text = torch.randint(0, c.num_text_tokens, (B, Tt), generator=g)
    ctx = torch.randint(0, c.codebook_size, (B, c.num_audio_codebooks, Tc), generator=g)
    audio = torch.randint(0, c.codebook_size, (B, c.num_audio_codebooks, Ta), generator=g)
    for b, (t, x, a) in enumerate(items):
        text[b, : len(t)] = t
        ctx[b, :, : x.shape[1]] = x
        audio[b, :, : a.shape[1]] = a
    return {
        "text": text, "text_lens": torch.tensor([len(t) for t, _, _ in items]),
        "context_audio_codes": ctx, "context_audio_codes_lens": torch.tensor([x.shape[1] for _, x, _ in items]),
        "audio_codes": audio, "audio_codes_lens": torch.tensor([a.shape[1] for _, _, a in items]),
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(["released_small", "bidir_encoder", "decoder_kernel3", "four_codebooks"]),
    lens=st.lists(st.tuples(st.integers(2, 12), st.integers(1, 10)), min_size=2, max_size=4),
    ctx_len=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_alone_equals_sample_in_padded_batch(case, lens, ctx_len, seed):
    model = reference_model(case)
    c = model.config
    g = torch.Generator().manual_seed(seed)
    items = [_random_item(c, g, t, ctx_len, a) for t, a in lens]
    batch = _pad_batch(items, c, g)
    with torch.no_grad():
        together = model.process_batch(batch)["logits"]
        for b, (t, x, a) in enumerate(items):
            alone = model.process_batch(_pad_batch([(t, x, a)], c, g))["logits"][0]
            n = a.shape[1] + 1  # BOS + codes positions carry logits
            torch.testing.assert_close(together[b, :n], alone[:n], atol=ATOL, rtol=0)


def test_mixed_context_lengths_shift_decoder_positions_like_nemo():
    """NeMo pads the context prefix to the batch's longest context; the audio frames' positions move with it."""
    model = reference_model("released_small")
    c = model.config
    g = torch.Generator().manual_seed(0)
    short = _random_item(c, g, 6, 2, 5)
    long = _random_item(c, g, 6, 7, 5)
    with torch.no_grad():
        alone = model.process_batch(_pad_batch([short], c, g))["logits"][0]
        mixed = model.process_batch(_pad_batch([short, long], c, g))["logits"][0]
    assert (alone - mixed).abs().max() > 1e-3  # not a rounding effect: a different computation
