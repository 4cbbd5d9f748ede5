"""The released shape on the fast path (issue 19): decoder_ce with a baked speaker table, frame stacking and the
autoregressive local transformer, on small random-weight models whose sizes hypothesis draws (decoder width and
heads, the local transformer's width, heads and layers, stacking 1 or 2: v2602-like and v2607-like), built by the
seed benchmark's own ``released_config``. Codes, lengths, steps, attended positions and logits equal the eager
reference's ``infer_batch(use_kv_cache=True, use_local_transformer_for_inference=True)`` at float32, greedy and
sampled with the same ``torch.manual_seed``, with and without CFG."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.seed_benchmark import released_config, released_model, released_requests  # noqa: E402
from fastpath.decoder import FastDecoder  # noqa: E402
from test_decoder import _compare  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_released_shape_random_sizes_equal_eager(data):
    heads = data.draw(st.sampled_from([1, 2, 4]), label="heads")
    d = heads * data.draw(st.sampled_from([4, 8, 16]), label="d_head")
    lt_heads = data.draw(st.sampled_from([1, 2]), label="lt_heads")
    lt_hidden = data.draw(st.sampled_from([None, 8 * lt_heads, 24 * lt_heads]), label="lt_hidden")  # None: = d
    if lt_hidden is None and d % lt_heads:
        lt_heads = 1
    stacking = data.draw(st.sampled_from([1, 2]), label="stacking")
    cfg = released_config(d=d, heads=heads, lt_hidden=lt_hidden, lt_heads=lt_heads,
                          lt_layers=data.draw(st.integers(1, 2), label="lt_layers"), stacking=stacking,
                          baked_frames=data.draw(st.integers(1, 6), label="baked_frames"), speakers=3, frames=12,
                          n_enc=1, n_dec=data.draw(st.integers(1, 3), label="n_dec"), C=2, cb=24)
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    model = released_model(cfg)
    B = data.draw(st.integers(1, 3), label="B")
    batch = released_requests(cfg, B, B, data.draw(st.integers(4, 10), label="text"),
                              seed=data.draw(st.integers(0, 99), label="batch_seed"))[0]
    fast = FastDecoder(model, B, cfg.baked_frames + 2 + 12 // stacking)
    topk = data.draw(st.sampled_from([1, 5]), label="topk")
    use_cfg = data.draw(st.booleans(), label="use_cfg")
    kw = dict(use_cfg=use_cfg, topk=topk, keep_logits=True, use_local_transformer_for_inference=True)
    torch.manual_seed(7)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    torch.manual_seed(7)
    _compare(ref, fast.generate(batch, **kw))
