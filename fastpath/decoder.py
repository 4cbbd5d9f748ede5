"""Fast cached decoding for the reference MagpieTTS: static KV cache, device-side sampling and prior, CUDA graphs.

    from fastpath import FastDecoder
    fast = FastDecoder(model, max_batch=64, max_len=160 + 3 + 480, dtype=torch.bfloat16)
    out = fast.generate(batch, use_cfg=True, topk=80, max_decoder_steps=480)  # like model.infer_batch(...)
    state = model.create_chunk_state(batch_size=3)  # NeMo's chunked generation, one call per text chunk:
    out = fast.generate_speech(chunk, state, end_of_text=[True] * 3, beginning_of_text=True,
                               use_local_transformer_for_inference=True)  # like model.generate_speech(...)

What it computes is the eager reference's *cached* path (``reference.inference.infer_batch(use_kv_cache=True)``):
step 0 (context prefix + BOS frame) runs through the reference's own ``Transformer.forward_cached`` into this
decoder's static buffers; every later step is one new frame per row, written here without any host sync. The rules
come from the reference (``resolve_parameters`` / ``check_parameters``, ``EOS_METHODS``, ``forbidden_tokens``,
``dummy_cfg_conditioning``, ``cross_attention_scores``); three of them exist here a second time as device-tensor
ops, because the reference's run on the host: the prior state machine (:func:`_prior_update`, ``PriorState``), the
sampling edits and draw (:func:`_edit_logits`, :func:`_sample`; ``edit_logits``, ``sample_step``), the local
transformer's sampler (:func:`_f_lt_sub`; ``sample_local_transformer``) and the EOS scan (:func:`_eos_index`;
``eos_frames``). tests/fastpath/test_rules.py holds each copy equal to the reference's function
on random inputs (hypothesis); the local transformer's is held by whole runs against the eager reference
(tests/fastpath/test_decoder.py on the fixtures, test_released_shape.py on hypothesis-drawn sizes).

* **KV cache**: one static buffer per layer for ``max_batch`` requests (x2 rows with CFG) and ``max_len``
  positions, preallocated once. Keys are stored *compacted* per row: the valid context frames, then the BOS frame
  and the generated frames, so padded context keys are never stored or read (``generate(...,
  nemo_unmasked_padded_keys=True)`` keeps and attends them, as NeMo's cached path does). The attention reads each
  row's own keys, launched over a bucket of :data:`BUCKET` positions (one CUDA graph per bucket).
* **cross-attention** K/V are computed once per request (``layer.memory_kv``) into static buffers.
* **CFG's unconditional half** (NeMo's ``prepare_dummy_cond_for_cfg``): its memory is zero and no layer has a bias,
  so its cross-attention adds exactly 0 -- decode steps run the cross-attention on the conditional rows only; and
  its rows all start with the same inputs (zero context, every position valid, BOS), so the Triton attention reads
  those T_ctx + 1 keys from one row (which stays in L2) for all of them.
* ``triton`` (the default on CUDA): the self-attention (split-KV, writing the step's key/value itself, head-major
  cache), the cross-attention core and the sampler's top-k threshold are Triton kernels (fastpath/kernels.py, each
  tested against a plain-PyTorch statement; on the CPU under Triton's interpreter). Without: the reference's own
  attention ops over a length mask (the CPU's default).
* **on CUDA** the per-layer work around those kernels and the sampling/prior step run under
  ``torch.compile(fullgraph=True)`` (a compile error falls back to the plain function: ``compile_errors``) inside
  CUDA graphs; each layer's compiled tail also computes the next layer's norm + qkv (the last: norm_out +
  final_proj), and the FFN's first product and its tanh-GELU are one cuBLASLt GEMM with a GELU epilogue.
* **sampling** on the device: CFG combine, special-token masks, top-k, temperature, and the draw as
  ``argmax(p / Exp(1))`` -- exactly what ``torch.multinomial(p, 1)`` computes, without its host-side validity
  checks (which sync). The exponential noise is drawn in the reference's order and shape (per step: sampled pass
  then the argmax pass, codebook by codebook), so on the CPU the sampled codes equal the eager reference's for the
  same ``torch.manual_seed``.
* **the local transformer** (``use_local_transformer_for_inference=True``, autoregressive; the released checkpoints'
  sampler): NeMo's per-codebook loop (``sample_local_transformer``) runs inside the step as C*S sub-steps
  (:func:`_f_lt_sub`: one new position through the local transformer with a static per-step K/V buffer, CFG of its
  logits, the sampling edits, top-k, temperature, the draw), no host round trip per sub-step, so the whole step,
  sub-steps included, is one CUDA graph. On the CPU the noise is drawn in the reference's order, so sampled codes
  equal the eager reference's for the same seed. MaskGit is refused in one line. Decoder_ce prefixes (baked
  speakers, the context encoder) and frame stacking (S frames a step, C*S heads) come from the reference's prefill.
* **generate_speech** (NeMo's chunked generation, one text chunk per call, a ``ChunkState`` carried across calls):
  the call's checks and setup are the reference's (``reference.chunked.check_call`` / ``start_call``: the text
  window, the encoder-output splice, the window's ``left_offset`` move, a later chunk's first prior, applied in
  the prefill); per step, inside the captured step, the first chunk's prior rule (:func:`_prior_update`) or a
  later chunk's (:func:`_chunk_prior_update`: ``build_chunk_prior`` with ``left_offset``, the sink penalty, the
  per-item finished limits), and NeMo's chunk-end rules (forced ends, the stop rule) in ``_post_b``; the chunk
  state is updated once after the call. NeMo's multi-chunk-prior IndexError is flagged on the device and raised
  after the call, in the reference's words. A first chunk runs on a fresh state only. Each text window width is
  its own set of work buffers (compiled variants and CUDA graphs), as each text width is for ``generate``.
* **stopping**: whether every item has ended is kept on the device; the host looks only every ``sync_every``
  steps and the output is truncated to the step where the reference would have stopped (identical results).

Known differences from the eager reference (tested in tests/fastpath/test_decoder.py):

* the argmax pass (``sample_codes(temperature=0.01, topk=1)``) is an ``argmax`` here: the reference's multinomial
  over the top-1 set differs only where two logits tie exactly (it draws among the tied ones);
* float rounding: the step's matrix products run on one new row (the reference runs final_proj over the whole
  step-0 prefix and conv1d for the FFN), so logits agree to float32 rounding (~1e-6), not bit for bit.

Every measurement behind these choices, and the options tried and removed, is in bench/RESULTS.md.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

import fastpath.kernels as kernels
from reference.batch import validate_batch
from reference.chunked import ChunkedInferenceConfig, check_call, start_call
from reference.inference import (EOS_METHODS, MIN_FRAMES_FOR_CODEC, InferOutput, InferenceError, PriorState,
                                 check_parameters, checked_call, cross_attention_scores, dummy_cfg_conditioning,
                                 forbidden_tokens, layer_priors, local_transformer_mode, resolve_parameters)
from reference.model import ConvFFState, DecoderState, LayerKVCache

BIG = 1 << 40  # "no EOS yet" / "not done" sentinel on the device

# The split-KV attention's tiles, (keys a split, keys a loaded tile, warps a program): the sweeps' best on an H100 at
# the seed's sizes (bench/RESULTS.md). bf16: 32/32/1 (runs W, X: 56.1-56.3 us a layer against 57.4 for round 5's
# 64/64/2; step 1.303 vs 1.334 ms, run X). Float8 cache: 64/64/1 (run AE, with the newest key apart: 31.4 us a layer
# against 34.2 for 32/32/1).
ATTN_TILE = (32, 32, 1)
ATTN_TILE_FP8 = (64, 64, 1)
# The attention launches its splits over the step's key count rounded up to this: one CUDA graph per bucket (10 for the
# seed's 163..643 keys), splits past a bucket never launched (run D: -0.27 ms/step against launching all of them).
BUCKET = 64
# The host reads the device's "every item ended" flag every this many steps (not a speed option: the outputs are cut
# where the reference stops, whatever the interval).
SYNC_EVERY = 32
# Lookahead windows up to this fit the counters a _Work is made with (a longer one reallocates them once)
COUNTER_SLACK = 64


def _f_pre(x, ln_w, eps: float, w_qkv):
    """norm_self + qkv_net of one layer (the reference's ops)."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, None, eps), w_qkv)


def _f_xq(x, y_sa, w_o, ln_xq, eps_xq: float, w_q, n_cond: int):
    """o_net + residual, then the cross-attention query of the first ``n_cond`` rows (norm_xattn_query + q_net).
    The norm runs over every row and is sliced after (row-wise: the same values), so it fuses with the add."""
    x = x + F.linear(y_sa, w_o)
    return x, F.linear(F.layer_norm(x, (x.shape[-1],), ln_xq, None, eps_xq)[:n_cond], w_q)


def _xattn(q, mem_k, mem_v, cond_neg, prior: Optional[torch.Tensor], scale: float, n_heads: int, d_head: int):
    """The reference's cross-attention core (mask, softmax, prior, mask) for one query per row -> (y, prob)."""
    rows = q.shape[0]
    q = q.reshape(rows, 1, n_heads, d_head).transpose(1, 2)
    score = torch.matmul(q, mem_k.transpose(2, 3)) * scale
    score = score.masked_fill(cond_neg, float("-inf"))
    prob = F.softmax(score, dim=-1)
    if prior is not None:
        pr = prior[:, None, None, :] + torch.finfo(torch.float32).tiny
        pf = prob.float() * pr
        prob = (pf / pf.sum(dim=-1, keepdim=True)).to(prob.dtype)
    prob = prob.masked_fill(cond_neg, 0.0)
    y = torch.matmul(prob, mem_v).transpose(1, 2).reshape(rows, 1, -1)
    return y, prob


def _f_xo_ffn(x, y, w_xo, ln_ff, eps_ff: float, w1, w2, ffn: bool, ln_next=None, eps_next: float = 0.0, w_next=None,
              b_next=None, gelu_bias: Optional[torch.Tensor] = None):
    """Cross-attention o_net + residual for the first ``len(y)`` rows (the others attend no memory: CFG's
    unconditional rows, whose memory is zero, get exactly 0 from it), then (kernel-1 decoders) the FFN + residual.
    With ``w_next``: also what follows the layer -- the next layer's norm_self + qkv_net, or norm_out (``ln_next``
    None: none) + final_proj -- so the residual add and that norm fuse into one kernel; returns (x, projection).
    gelu_bias (zeros, the FFN's width): the FFN's first product and its tanh-GELU as one cuBLASLt call with a GELU
    epilogue (``torch._addmm_activation``; inductor keeps it as one extern call), the GELU applied to the float32
    accumulator before rounding (CUDA only: the CPU's epilogue is the erf GELU)."""
    n_cond = y.shape[0]
    xc = x[:n_cond] + F.linear(y, w_xo)
    x = xc if n_cond == x.shape[0] else torch.cat([xc, x[n_cond:]])
    if ffn:
        h = F.layer_norm(x, (x.shape[-1],), ln_ff, None, eps_ff)
        if gelu_bias is None:
            a = F.gelu(F.linear(h, w1), approximate="tanh")
        else:
            a = torch._addmm_activation(gelu_bias, h.reshape(-1, h.shape[-1]), w1.t(), use_gelu=True)
            a = a.view(*h.shape[:-1], w1.shape[0])
        x = x + F.linear(a, w2)
    if w_next is None:
        return x
    h = x if ln_next is None else F.layer_norm(x, (x.shape[-1],), ln_next, None, eps_next)
    return x, F.linear(h, w_next, b_next)


def _f_embed(codes_in, offsets, table, n_codes: int, cfg: bool, pos_table, pos, dtype: torch.dtype, kv_len, ln_w,
             eps: float, w_qkv):
    """A decode step's prologue: the new frame (NeMo's embed_audio_tokens: the mean of the C*S code embeddings),
    CFG's unconditional copy, the position embedding, cast to the model dtype; each row's key count after this step's
    write (long and int32); the first layer's norm_self + qkv_net. -> (x (rows, 1, D), new_len, new_len int32, qkv)."""
    emb = F.embedding(codes_in + offsets, table)  # (B, C, S, D)
    x = emb.sum(dim=(1, 2)) / n_codes
    if cfg:
        x = torch.cat([x, x])
    x = x.unsqueeze(1)  # (rows, 1, D)
    if pos_table is not None:
        x = x + pos_table.index_select(0, pos)
    x = x.to(dtype)
    new_len = kv_len + 1
    return x, new_len, new_len.to(torch.int32), _f_pre(x, ln_w, eps, w_qkv)


def _f_head(x, ln_w, eps: float, w, b):
    """norm_out (or identity) + final_proj of the newest position."""
    if ln_w is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_w, None, eps)
    return F.linear(x, w, b)[:, 0]


def _f_lt_in(x, ln_w, eps: float, w_in, b_in):
    """The local transformer's first input: the decoder output of the newest position (norm_out, or identity, of
    the residual stream x (rows, 1, D)) through ``local_transformer_in_projection`` (a Linear, or identity: w_in
    None) -> ((rows, 1, H), the decoder output (rows, 1, D))."""
    dec = x if ln_w is None else F.layer_norm(x, (x.shape[-1],), ln_w, None, eps)
    return (dec if w_in is None else F.linear(dec, w_in, b_in)), dec


def _f_lt_sub(new, pos, key_valid, n_keys: int, pos_table, layers: list, n_heads: int, scale: float, w_out, b_out,
              B: int, cfg_scale: float, eos: int, unfinished, finished, only_eos, forbidden, topk: int,
              temperature: float, noise, emb, w_in, b_in):
    """One sub-step of NeMo's autoregressive local transformer (``reference.inference.sample_local_transformer``,
    cached: ``Transformer.forward_cached`` over one new position) as device-tensor ops, no host sync:

    new (rows, 1, H): the position's input; pos (1,) long: its index (the sub-step, codebook j = c + C*s);
    each layer's self-attention key/value is written at pos into its k/v buffers (rows, H_lt, C*S, Dh) and the first
    ``n_keys`` are attended -- pos + 1 (the reference's keys, exact), or all C*S with ``key_valid`` (C*S,) bool
    masking those past pos (one shape for every sub-step: one compiled graph; the masked keys add exact zeros).
    Then the codebook's output projection, CFG (NeMo's LT order: s * cond + (1 - s) * uncond), the sampling edits
    (``edit_logits``: EOS ban / forced EOS by the (B,) masks, forbidden tokens), top-k, temperature and the draw
    ``argmax(p / noise)`` (noise (B, V): ``torch.multinomial``'s Exp(1) draws) of the B conditional rows; the
    unconditional rows take the same code (NeMo: ``pred[B:] = pred[:B]``). emb: this codebook's audio embedding
    table -> (code (B,), the next sub-step's input (rows, 1, H))."""
    rows = new.shape[0]
    x = new + pos_table.index_select(0, pos)
    for lw in layers:
        h = F.layer_norm(x, (x.shape[-1],), lw["ln_sa"], None, lw["eps_sa"])
        qkv = F.linear(h, lw["qkv"]).view(rows, 1, 3, n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (rows, H, 1, Dh)
        K, V = lw["k"], lw["v"]
        K.index_copy_(2, pos, k)
        V.index_copy_(2, pos, v)
        score = torch.matmul(q, K[:, :, :n_keys].transpose(2, 3)) * scale
        if key_valid is not None:
            score = score.masked_fill(~key_valid, float("-inf"))
        y = torch.matmul(F.softmax(score, dim=-1), V[:, :, :n_keys])
        x = x + F.linear(y.transpose(1, 2).reshape(rows, 1, -1), lw["w_o"])
        h = F.layer_norm(x, (x.shape[-1],), lw["ln_ff"], None, lw["eps_ff"])
        x = x + F.linear(F.gelu(F.linear(h, lw["w1"]), approximate="tanh"), lw["w2"])
    lg = F.linear(x[:, 0], w_out, b_out)  # (rows, V)
    if rows != B:
        lg = cfg_scale * lg[:B] + (1.0 - cfg_scale) * lg[B:]
    lg = _edit_logits(lg.float()[:, None], eos, unfinished, finished, only_eos, forbidden)[:, 0]
    kth = torch.topk(lg, topk, dim=-1)[0][..., -1:]
    probs = torch.softmax(lg.masked_fill(lg < kth, float("-inf")) / temperature, dim=-1)
    code = (probs / noise).argmax(dim=-1)  # (B,)
    e = F.embedding(code, emb)[:, None]
    if w_in is not None:
        e = F.linear(e, w_in, b_in)
    if rows != B:
        e = torch.cat([e, e])
    return code, e


# ---- the reference's host-side rules as device-tensor ops (tests/fastpath/test_rules.py holds them equal) ----------


def _edit_logits(lg, eos: int, unfinished: Optional[torch.Tensor], finished: Optional[torch.Tensor], only_eos,
                 forbidden) -> torch.Tensor:
    """``reference.inference.edit_logits`` with the item sets as (B,) bool masks (None: no sentence tracking):
    lg (B, J, V) -> an edited copy: EOS banned for unfinished items, only EOS (logit 0) for finished ones, then the
    forbidden tokens (``forbidden_tokens``) masked, in NeMo's order. only_eos: (V,) bool, True at EOS."""
    if unfinished is not None:
        lg = lg.clone()
        lg[:, :, eos] = lg[:, :, eos].masked_fill(unfinished[:, None], float("-inf"))
        lg = torch.where(finished[:, None, None], torch.where(only_eos, 0.0, float("-inf")), lg)
    return lg.masked_fill(forbidden, float("-inf"))


def _sample(lg, kth, temperature: float, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.inference.sample_step``'s two passes on edited logits lg (B, J, V), kth (B, J, 1) the k-th largest
    logit, noise (J, B, V) the sampled pass's Exp(1) draws: -> (sampled (B, J), argmax (B, J)). The sampled pass is
    its top-k softmax and ``draw_codes`` (``argmax(p / q)``); the argmax pass (temperature 0.01, top-1) is an argmax."""
    probs = torch.softmax(lg.masked_fill(lg < kth, float("-inf")) / temperature, dim=-1)
    return (probs / noise.transpose(0, 1)).argmax(dim=-1), lg.argmax(dim=-1)


def _first_eos(codes, eos: int, detection: str):
    """``reference.inference.find_eos`` on the device: codes (B, C, S) -> (B,) long, the first frame with EOS (by
    ``detection``: any / all / zero_cb codebook), BIG where none."""
    hit = codes == eos
    per_frame = hit.any(dim=1) if detection == "any" else hit.all(dim=1) if detection == "all" else hit[:, 0]
    frames = torch.arange(codes.shape[2], device=codes.device)
    return torch.where(per_frame, frames, BIG).min(dim=1).values


def _eos_index(argmax_codes, sampled_codes, eos: int, eos_detection_method: str):
    """``reference.inference.eos_frames`` on the device: this step's EOS frame per item (the argmax pass's first EOS
    frame, or for the "argmax_or_multinomial" methods the earlier of both passes'), BIG where none."""
    method, detection = EOS_METHODS[eos_detection_method]
    e = _first_eos(argmax_codes, eos, detection)
    if method == "argmax_or_multinomial":
        e = torch.minimum(e, _first_eos(sampled_codes, eos, detection))
    return e


def _most_attended(w: "_Work", scores: torch.Tensor, lookahead: int) -> torch.Tensor:
    """``PriorState.most_attended`` (reference/inference.py) as tensor ops, without host sync, with ``left_offset``
    (``w.left_offset``: zeros for ``infer_batch``, each item's window start for ``generate_speech``): the attended
    position (attention sink >= 8 visits moves the window on, the last 3 positions never searched, Python slice
    semantics of ``scores[b, last - off : end]`` for a negative start or end), absolute, recorded at this step; its
    visit counted. The counters are kept per window-relative position r = t - off at column r + T + lookahead (r
    lies in (-T - lookahead, T): see ``_counter_width``) -> t (B,)."""
    B, T = w.B, w.T_text
    scores = scores[:B]
    n, off = w.text_lens, w.left_offset
    shift, width = T + lookahead, w.counters.shape[1]
    ar = torch.arange(T, device=scores.device)
    col = w.last - off + shift  # the previous position's counter; one outside the counters was never visited
    seen = (col >= 0) & (col < width)
    count = torch.where(seen, w.counters.gather(1, col.clamp(0, width - 1)[:, None])[:, 0], 0)
    last = w.last + (count >= 8).long()  # attention sink: move on
    start = last - off
    end = torch.minimum(start + lookahead, n - 3)
    a = torch.where(start < 0, (start + T).clamp(min=0), start).clamp(max=T)  # Python slice semantics
    e = torch.where(end < 0, (end + T).clamp(min=0), end).clamp(max=T)
    inwin = (ar[None] >= a[:, None]) & (ar[None] < e[:, None])
    i = scores.masked_fill(~inwin, float("-inf")).argmax(dim=1)
    t = torch.where(e > a, i - a + last, n - 1 + off)
    w.attended.index_copy_(0, w.step, t[None])
    w.counters.scatter_add_(1, (t - off + shift)[:, None], torch.ones_like(t[:, None]))
    w.last.copy_(t)
    return t


def _counter_width(T_text: int, lookahead: int) -> int:
    """Counter columns _most_attended needs: a visited window-relative position r = idx - a + start (window
    [a, e) non-empty, idx in it) is >= start > -T - lookahead, and < T."""
    return 2 * T_text + lookahead + 1


def _prior_update(w: "_Work", scores: torch.Tensor, p) -> None:
    """``PriorState.most_attended`` + ``build_prior`` (reference/inference.py) as tensor ops, without host sync
    (``infer_batch``, and ``generate_speech``'s first chunk: left_offset 0): :func:`_most_attended`, the next
    step's prior (stuck >= 10 visits suppresses up to the last stuck position), the finished counters and
    unfinished flags (``w.in_end``: NeMo's end_indices)."""
    B, T = w.B, w.T_text
    n = w.text_lens
    L = p.attention_prior_lookahead_window
    eps = p.attention_prior_epsilon
    ar = torch.arange(T, device=scores.device)
    t = _most_attended(w, scores, L)
    # the prior for the next step
    ones = (ar[None] == torch.clamp(t - 1, min=1)[:, None]) | (
        (ar[None] >= t[:, None]) & (ar[None] <= torch.minimum(t + L, n - 1)[:, None]))
    ones = ones | (n[:, None] <= 5)
    shift = T + L
    stuck = torch.where(w.counters[:, shift: shift + T] >= 10, ar[None], -1).max(dim=1).values  # last stuck position
    ones = ones & (ar[None] > stuck[:, None])
    w.prior[:B].copy_(torch.where(ones, 1.0, eps))
    w.unfinished.copy_((t < n - 3) & ~w.in_end)
    w.fin_present.logical_or_((t >= n - 2) | w.in_end)
    w.fin_count.add_(w.fin_present.long())
    w.unfinished.logical_and_(~(w.fin_present & (w.fin_count > 5)))


def _chunk_prior_update(w: "_Work", scores: torch.Tensor, p, cc) -> None:
    """A later ``generate_speech`` chunk's bookkeeping after a step as tensor ops, without host sync:
    :func:`_most_attended` with the window's ``left_offset``, ``PriorState.build_chunk_prior`` (NeMo's
    ``construct_multi_chunk_prior``: its writes in its order, negative window indices wrapped as numpy does; the
    attention-sink penalty from the counters; finished items: ``w.ended``, the items ended in an earlier call or
    whose chunk ended in this one) and ``advance_finished`` with the per-item limit (``cc``: NeMo's
    ``ChunkedInferenceConfig``). NeMo's IndexError (an attended position more than the window behind its start)
    is flagged in ``w.chunk_err`` (the step + 1), raised by the host after the call."""
    B, T = w.B, w.T_text
    n, off = w.text_lens, w.left_offset
    L = p.attention_prior_lookahead_window
    eps = p.attention_prior_epsilon
    eps_sq = eps * eps  # a Python double, rounded once to float32 on store (as NeMo's)
    ar = torch.arange(T, device=scores.device)[None]
    t = _most_attended(w, scores, L)
    pos = (t - off)[:, None]
    wrap = lambda x: torch.where(x < 0, x + T, x)  # noqa: E731 - numpy's negative index
    wts = cc.prior_weights
    hist_end = pos.sub(1).clamp(min=1)
    v = torch.full((B, T), eps, dtype=torch.float32, device=scores.device)
    v = torch.where(ar < hist_end, eps_sq, v)
    v = torch.where(ar == hist_end, wts[0], v)
    v = torch.where(ar == wrap(pos), wts[1], v)
    for k, wk in enumerate(wts[2:], start=1):
        v = torch.where((pos + k < n[:, None]) & (ar == wrap(pos + k)), wk, v)
    fs = pos + len(wts) - 1
    v = torch.where((fs < n[:, None]) & (ar >= torch.where(fs < 0, (fs + T).clamp(min=0), fs)), eps_sq, v)
    v = torch.where(n[:, None] <= cc.short_sentence_threshold, 1.0, v)
    w.chunk_err.copy_(torch.where((w.chunk_err == 0) & ((n > cc.short_sentence_threshold) & (pos[:, 0] < -T)).any(),
                                  w.step + 1, w.chunk_err))
    # the sink penalty: up to the last window position (r > 0) visited >= sink_threshold times
    shift = T + L
    if T > 1:
        r = torch.arange(1, T, device=scores.device)[None]
        sink = torch.where(w.counters[:, shift + 1: shift + T] >= cc.attention_sink_threshold, r, -1).max(dim=1).values
    else:
        sink = torch.full_like(t, -1)
    finished = w.ended
    v = torch.where((~finished)[:, None] & (ar <= sink[:, None]), eps_sq, v)
    w.prior[:B].copy_(v)
    near = pos[:, 0] >= n - cc.near_end_threshold
    w.unfinished.copy_(~near & ~finished)
    w.fin_present.logical_or_(near | finished)
    # advance_finished, the limit per item (the loop's, after the prior)
    w.fin_count.add_(w.fin_present.long())
    limit = torch.where(w.eot, cc.finished_limit_with_eot, cc.finished_limit_without_eot)
    w.unfinished.logical_and_(~(w.fin_present & (w.fin_count > limit)))


def _finished_limit(chunk) -> int:
    """Steps near the text's end after which sampling forces EOS (NeMo's finished_texts_counter threshold):
    infer_batch's 20; generate_speech's first chunk finished_limit_first_chunk, later ones finished_limit_with_eot."""
    if chunk is None:
        return 20
    later, cc = chunk
    return cc.finished_limit_with_eot if later else cc.finished_limit_first_chunk


def _end_of_step(w: "_Work", scores, advance: bool):
    """A decode step's end: with ``advance`` the key count and position move on by one; scores given per layer
    ((rows', H, 1, T_text) each, the estimating layers only) are averaged by ``cross_attention_scores`` -> (rows', T)."""
    if advance:
        w.kv_len.add_(1)
        w.pos.add_(1)
    if isinstance(scores, (list, tuple)):
        scores = cross_attention_scores(scores, None)
    return scores


class _MaybeCompiled:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` when enabled; on a compile error (outside a CUDA-graph
    capture) warn once and run ``fn`` itself. fullgraph: an error surfaces before anything ran, so nothing is
    executed twice."""

    def __init__(self, fn, enabled: bool):
        self.fn = fn
        self.error: Optional[str] = None
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False) if enabled else None

    def __call__(self, *args, **kw):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kw)
            except Exception as e:  # noqa: BLE001 - fall back to the plain function
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                self.error = f"{type(e).__name__}: {e}"[:2000]
                warnings.warn(f"FastDecoder: {self.fn.__name__} runs uncompiled ({self.error[:300]})")
                self.compiled = None
        return self.fn(*args, **kw)


class _StaticKV(LayerKVCache):
    """The reference's LayerKVCache over this decoder's static buffers (views (rows, H, max_len, Dh))."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):  # noqa: D107 - no allocation, unlike the parent
        self.k, self.v, self.length = k, v, 0
        self.kv = None  # two buffers of their own: written with two copies


class _StagedKV(_StaticKV):
    """Prefill keys/values of one layer bound for the float8 cache: written, in the model's dtype, into a staging
    buffer that every layer shares (the prefill attends them unrounded). When the next layer first writes the
    buffer -- and once after the last layer -- ``flush`` moves this layer's into the float8 cache, so the prefill
    holds one layer's staging at a time instead of all of them (64 MB instead of 0.77 GB at the seed's
    sizes in bf16)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pending: list, flush):  # noqa: D107
        super().__init__(k, v)
        self.pending, self.flush = pending, flush

    def append(self, k, v, kv=None):
        if self.length == 0:  # this layer's first write: the previous layer is done with the buffer
            while self.pending:
                self.pending.pop()()
            self.pending.append(self.flush)
        return super().append(k, v, kv)


class _StaticFF(ConvFFState):
    def __init__(self, ff_in: torch.Tensor, ff_hidden: torch.Tensor):  # noqa: D107
        self.ff_in, self.ff_hidden, self.length = ff_in, ff_hidden, 0


@dataclass
class _Work:
    """Every tensor one decode step reads or writes: static addresses, so a CUDA graph can replay the step."""

    B: int
    rows: int
    T_text: int
    mem_k: list
    mem_v: list
    cond_mask: torch.Tensor  # (rows, T_text) bool
    cond_neg: torch.Tensor  # (rows, 1, 1, T_text) bool: ~cond_mask, once per request
    ff_in: list
    ff_hidden: list
    kv_len: torch.Tensor  # (rows,) long: keys stored per row (compacted)
    pre_len: torch.Tensor  # (rows,) int32: leading keys read from row B (CFG's shared unconditional prefix)
    pos: torch.Tensor  # (1,) long: absolute decoder position of the next input frame
    step: torch.Tensor  # (1,) long: the step index idx
    codes_in: torch.Tensor  # (B, C, S) long: the frame fed at the next step
    out_codes: torch.Tensor  # (B, C, S * max_steps) long
    text_lens: torch.Tensor  # (B,) long
    prior: torch.Tensor  # (rows, T_text) float32
    last: torch.Tensor  # (B,) long
    counters: torch.Tensor  # (B, >= _counter_width(T_text, lookahead)) long: visits per window-relative position
    fin_present: torch.Tensor  # (B,) bool: in NeMo's finished_texts_counter
    fin_count: torch.Tensor  # (B,) long
    unfinished: torch.Tensor  # (B,) bool
    end_idx: torch.Tensor  # (B,) long, BIG = none
    ended: torch.Tensor  # (B,) bool: EOS seen (generate_speech: the chunk ended, or the item ended in an earlier call)
    in_end: torch.Tensor  # (B,) bool: NeMo's end_indices (infer_batch: = ended; generate_speech: ended texts)
    eot: torch.Tensor  # (B,) bool: end_of_text (infer_batch: all True)
    left_offset: torch.Tensor  # (B,) long: each item's window start (infer_batch: 0)
    chunk_err: torch.Tensor  # (1,) long: 1 + the first step with NeMo's multi-chunk-prior IndexError, 0 = none
    done_step: torch.Tensor  # (1,) long: first step after which the reference stops, BIG = none
    attended: torch.Tensor  # (max_steps, B) long
    noise: torch.Tensor  # (2 * S * C, B, V) float32: exponential noise, reference draw order
    logits_buf: Optional[torch.Tensor] = None  # (max_steps, B, C*V*S) float32 when keep_logits
    forced: Optional[torch.Tensor] = None  # (B, C, >= S * max_steps) long
    lt_layers: list = field(default_factory=list)  # the local transformer's layer weights + k/v (rows, H, C*S, Dh)
    lt_noise: Optional[torch.Tensor] = None  # (C*S, rows, V) float32: its draws' Exp(1) noise (reference order)
    graphs: dict = field(default_factory=dict)


class FastDecoder:
    """Cached MagpieTTS decoding with static buffers; CUDA graphs on the GPU, the same code eagerly on the CPU.

    model: a reference ``MagpieTTS`` (copied and cast to ``dtype``; the original is untouched).
    max_batch: requests per call (rows = 2 x max_batch with CFG). max_len: decoder positions per row
    (``T_ctx + 1 + max_steps`` must fit: context frames + 2 specials, BOS, one position per step).
    kv_cache_dtype: None (the model's dtype: the exact path) or ``torch.float8_e4m3fn`` (needs ``triton``): the
    self-attention cache holds float8 e4m3 keys/values, each (position, head) vector with its own power-of-two scale
    (``kernels.fp8_quantize``), written by the attention kernel itself: half the bytes the attention reads in bf16.
    **Not exact**: every cached key/value is rounded to 3 mantissa bits (relative error <= 2**-4), so the logits move
    (tests/fastpath/test_kernels.py; bench/RESULTS.md for the seed workload). Step 0 (prefill) attends its unrounded
    keys, as a TensorRT-LLM context phase with an FP8 KV cache does; every later step reads them rounded.
    triton: the Triton kernels (module docstring); None = on where they run (CUDA with triton, power-of-two head
    sizes), off on the CPU, where True runs them under Triton's interpreter (``TRITON_INTERPRET=1``; slow, for tests).

    On CUDA the step is compiled and captured in CUDA graphs (``compile``, ``cuda_graphs``: on with CUDA, off on
    the CPU; ``cuda_graphs`` may be switched off on an instance to run the same steps eagerly).
    """

    sync_every = SYNC_EVERY

    def __init__(self, model, max_batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None, kv_cache_dtype: Optional[torch.dtype] = None,
                 triton: Optional[bool] = None):
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.dtype = dtype
        # an inference copy: no parameter requires grad, so nothing traced or run here records autograd history
        # whatever the caller's grad mode (generate() also runs under no_grad)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        c = self.config = self.model.config
        d = c.decoder
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if d.use_learnable_pos_emb and max_len > d.max_length_causal_mask:
            raise ValueError(f"max_len {max_len} exceeds the model's {d.max_length_causal_mask} learned positions")
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        self.max_rows = 2 * self.max_batch
        is_cuda = self.device.type == "cuda"
        pow2 = not (d.sa_d_head & (d.sa_d_head - 1) or d.xa_head_dim & (d.xa_head_dim - 1))
        if triton is None:
            triton = is_cuda and pow2 and kernels.usable(self.device)
        elif triton and not kernels.usable(self.device):
            raise ValueError("triton=True needs CUDA and triton (or, on the CPU, TRITON_INTERPRET=1)")
        elif triton and not pow2:
            raise ValueError(f"triton=True needs power-of-two head sizes, got {d.sa_d_head} (self-attention) and "
                             f"{d.xa_head_dim} (cross-attention)")
        self.triton = bool(triton)
        if kv_cache_dtype not in (None, dtype, torch.float8_e4m3fn):
            raise ValueError(f"kv_cache_dtype must be None, the model dtype or torch.float8_e4m3fn, "
                             f"got {kv_cache_dtype}")
        self.kv_fp8 = kv_cache_dtype == torch.float8_e4m3fn
        if self.kv_fp8 and not self.triton:
            raise ValueError("kv_cache_dtype=float8_e4m3fn needs the triton kernels (the attention kernel quantizes "
                             "what it writes)")
        self.attn_tile = ATTN_TILE_FP8 if self.kv_fp8 else ATTN_TILE
        self.cuda_graphs = self.compile = is_cuda
        # Static self-attention KV cache, ``k_cache[i]`` seen as (rows, L, H, Dh) with the triton kernels (stored
        # head-major, (rows, H, L, Dh): each head's keys contiguous, whole cache lines a tile; bench/RESULTS.md),
        # else (rows, H, L, Dh), so that [:, :, :L_bucket] keeps (rows * H) one batch stride.
        H, Dh = d.sa_n_heads, d.sa_d_head
        cdt = torch.float8_e4m3fn if self.kv_fp8 else dtype
        zeros = lambda *s, dt=cdt: torch.zeros(*s, device=self.device, dtype=dt)  # noqa: E731
        hm = (self.max_rows, H, max_len, Dh)
        self.k_cache = [zeros(*hm).transpose(1, 2) if self.triton else zeros(*hm) for _ in range(d.n_layers)]
        self.v_cache = [zeros(*hm).transpose(1, 2) if self.triton else zeros(*hm) for _ in range(d.n_layers)]
        # float8 cache: the biased exponent of each (row, head, position)'s power-of-two scale (kernels.fp8_quantize)
        e_shape = (self.max_rows, H, max_len)
        self.k_exp = [zeros(*e_shape, dt=torch.uint8) for _ in range(d.n_layers)] if self.kv_fp8 else None
        self.v_exp = [zeros(*e_shape, dt=torch.uint8) for _ in range(d.n_layers)] if self.kv_fp8 else None
        m = self.model
        C, S, V = c.num_audio_codebooks, c.frame_stacking_factor, c.num_all_tokens_per_codebook
        self.emb_table = torch.cat([e.weight for e in m.audio_embeddings], 0)  # (S*C*V, D), table j = c + i*C
        self.emb_offsets = (torch.arange(C * S, device=self.device) * V).view(1, S, C).transpose(1, 2)  # (1, C, S)
        # special-token masks of the sampler: all 8 specials (EOS too while min_generated_frames are not out)
        self.forbid_all = forbidden_tokens(c, True, self.device)  # the eager sampler's masks (made once per device)
        self.forbid_no_eos = forbidden_tokens(c, False, self.device)
        self.only_eos = torch.zeros(V, dtype=torch.bool, device=self.device)
        self.only_eos[c.audio_eos_id] = True
        self._works: dict = {}
        self._pool = None
        # per-layer weights as plain tensors (one compiled function serves every layer: no per-module guards)
        self._layer_w = []
        for layer in m.decoder.layers:
            ff = layer.pos_ff
            k1 = ff.proj.kernel_size == 1
            self._layer_w.append(dict(
                ln_sa=layer.norm_self.weight.detach(), eps_sa=layer.norm_self.eps,
                qkv=layer.self_attention.qkv_net.weight.detach(), w_o=layer.self_attention.o_net.weight.detach(),
                ln_xq=layer.norm_xattn_query.weight.detach(), eps_xq=layer.norm_xattn_query.eps,
                w_q=layer.cross_attention.q_net.weight.detach(), w_xo=layer.cross_attention.o_net.weight.detach(),
                ln_ff=layer.norm_pos_ff.weight.detach(), eps_ff=layer.norm_pos_ff.eps,
                w1=ff.proj.conv.weight[:, :, 0].detach() if k1 else None,
                w2=ff.o_net.conv.weight[:, :, 0].detach() if k1 else None))
        # The FFN's GELU as a cuBLASLt epilogue (CUDA with the triton kernels, kernel-1 FFN: every layer alike): -0.021
        # ms/step bf16, -0.034 float8 (run AK); CUDA's epilogue is the tanh GELU (a GPU test), the CPU's the erf one
        w1 = self._layer_w[0]["w1"]
        self._gelu_bias = torch.zeros(w1.shape[0], device=self.device, dtype=dtype) \
            if is_cuda and self.triton and w1 is not None else None
        no = m.decoder.norm_out
        self._head_w = (no.weight.detach() if isinstance(no, torch.nn.LayerNorm) else None,
                        getattr(no, "eps", 0.0), m.final_proj.weight.detach(),
                        m.final_proj.bias.detach() if m.final_proj.bias is not None else None)
        # The autoregressive local transformer (NeMo's per-codebook sampler, inside the step): its weights as plain
        # tensors, and per sub-step j its position index and key mask (static tensors: CUDA graphs keep them)
        self.lt = c.local_transformer if c.local_transformer_type == "autoregressive" else None
        if self.lt is not None:
            lt = m.local_transformer
            assert not isinstance(lt.norm_out, torch.nn.LayerNorm) and self.lt.kernel_size == 1
            self._lt_w = [dict(
                ln_sa=layer.norm_self.weight.detach(), eps_sa=layer.norm_self.eps,
                qkv=layer.self_attention.qkv_net.weight.detach(), w_o=layer.self_attention.o_net.weight.detach(),
                ln_ff=layer.norm_pos_ff.weight.detach(), eps_ff=layer.norm_pos_ff.eps,
                w1=layer.pos_ff.proj.conv.weight[:, :, 0].detach(), w2=layer.pos_ff.o_net.conv.weight[:, :, 0].detach())
                for layer in lt.layers]
            inp = m.local_transformer_in_projection
            self._lt_in = (inp.weight.detach(), inp.bias.detach()) if isinstance(inp, torch.nn.Linear) else (None, None)
            self._lt_out = [(o.weight.detach(), o.bias.detach()) for o in m.local_transformer_out_projections]
            self._lt_emb = [e.weight.detach() for e in m.audio_embeddings]
            self._lt_pos_table = lt.position_embeddings.weight.detach()
            J = C * S
            self._lt_pos = [torch.tensor([j], device=self.device) for j in range(J)]
            self._lt_valid = [torch.arange(J, device=self.device) <= j for j in range(J)]
        # on CUDA every sub-step attends all C*S key slots, those not yet written masked (one compiled graph for
        # all sub-steps); on the CPU the written ones only, as the reference (its exact ops)
        self.lt_full_keys = is_cuda
        if self.compile:
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        self._fn_embed = _MaybeCompiled(_f_embed, self.compile)
        self._fn_pre = _MaybeCompiled(_f_pre, self.compile)
        self._fn_xq = _MaybeCompiled(_f_xq, self.compile)  # the two halves around the cross-attention core
        self._fn_xo_ffn = _MaybeCompiled(_f_xo_ffn, self.compile)
        self._fn_head = _MaybeCompiled(_f_head, self.compile)
        self._fn_post_a = _MaybeCompiled(self._post_a, self.compile)
        self._fn_post_b = _MaybeCompiled(self._post_b, self.compile)
        self._fn_lt_in = _MaybeCompiled(_f_lt_in, self.compile)
        self._fn_lt_sub = _MaybeCompiled(_f_lt_sub, self.compile)

    @property
    def compile_errors(self) -> dict:
        fns = dict(embed=self._fn_embed, pre=self._fn_pre, xq=self._fn_xq, xo_ffn=self._fn_xo_ffn,
                   head=self._fn_head, post_a=self._fn_post_a, post_b=self._fn_post_b, lt_in=self._fn_lt_in,
                   lt_sub=self._fn_lt_sub)
        return {k: f.error for k, f in fns.items() if f.error}

    def _work(self, B: int, rows: int, T_text: int, max_steps: int) -> _Work:
        key = (B, rows, T_text)
        w = self._works.get(key)
        if w is not None and w.out_codes.shape[2] >= max_steps * self.config.frame_stacking_factor:
            return w
        c, d, dev = self.config, self.config.decoder, self.device
        C, S, V = c.num_audio_codebooks, c.frame_stacking_factor, c.num_all_tokens_per_codebook
        z = lambda *s, dt=self.dtype: torch.zeros(*s, device=dev, dtype=dt)  # noqa: E731
        L, bl = torch.long, torch.bool
        w = _Work(
            B=B, rows=rows, T_text=T_text,
            mem_k=[z(rows, d.xa_n_heads, T_text, d.xa_head_dim) for _ in range(d.n_layers)],
            mem_v=[z(rows, d.xa_n_heads, T_text, d.xa_head_dim) for _ in range(d.n_layers)],
            cond_mask=z(rows, T_text, dt=bl), cond_neg=z(rows, 1, 1, T_text, dt=bl),
            ff_in=[z(rows, self.max_len, d.d_model) if d.kernel_size > 1 else None for _ in range(d.n_layers)],
            ff_hidden=[z(rows, self.max_len, d.d_ffn) if d.kernel_size > 1 else None for _ in range(d.n_layers)],
            kv_len=z(rows, dt=L), pre_len=z(rows, dt=torch.int32), pos=z(1, dt=L), step=z(1, dt=L),
            codes_in=z(B, C, S, dt=L), out_codes=z(B, C, S * max_steps, dt=L), text_lens=z(B, dt=L),
            prior=z(rows, T_text, dt=torch.float32), last=z(B, dt=L),
            counters=z(B, _counter_width(T_text, COUNTER_SLACK), dt=L),
            fin_present=z(B, dt=bl), fin_count=z(B, dt=L), unfinished=z(B, dt=bl), end_idx=z(B, dt=L),
            ended=z(B, dt=bl), in_end=z(B, dt=bl), eot=z(B, dt=bl), left_offset=z(B, dt=L), chunk_err=z(1, dt=L),
            done_step=z(1, dt=L), attended=z(max_steps, B, dt=L),
            noise=z(2 * S * C, B, V, dt=torch.float32),
        )
        if self.lt is not None:
            H = self.lt.sa_n_heads
            w.lt_layers = [dict(lw, k=z(rows, H, C * S, self.lt.sa_d_head), v=z(rows, H, C * S, self.lt.sa_d_head))
                           for lw in self._lt_w]
            w.lt_noise = z(C * S, rows, V, dt=torch.float32)
        self._works[key] = w
        return w

    # ------------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], use_cfg: bool = False, keep_logits: bool = False,
                 forced_codes: Optional[torch.Tensor] = None, nemo_unmasked_padded_keys: bool = False,
                 run_all_steps: bool = False, use_local_transformer_for_inference: bool = False,
                 **params: Any) -> InferOutput:
        """``infer_batch(batch, use_cfg, use_kv_cache=True, ...)`` on the fast path (the same arguments and
        ``InferOutput``: predicted_codes, predicted_codes_lens, num_steps, attended_text_positions per prior step and,
        with keep_logits, step_logits CFG-combined in float32). run_all_steps: decode max_decoder_steps frames even
        when every item ended (benchmarks); the outputs are still truncated where the reference stops."""
        c = self.config
        p = resolve_parameters(c.inference, **params)
        check_parameters(p, c)
        validate_batch(batch, c, require_audio=False)
        lt_mode = local_transformer_mode(c, use_local_transformer_for_inference)
        if lt_mode == "maskgit":
            raise InferenceError("the fast path runs the autoregressive local transformer only, not MaskGit; run "
                                 "model.infer_batch(..., use_local_transformer_for_inference=True)")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        B = batch["text"].shape[0]
        if B > self.max_batch:
            raise ValueError(f"batch of {B} requests > max_batch {self.max_batch}")
        S = c.frame_stacking_factor
        if forced_codes is not None and forced_codes.shape[2] < p.max_decoder_steps // S * S:
            raise InferenceError(f"forced_codes has {forced_codes.shape[2]} frames; {p.max_decoder_steps // S * S} are "
                                 "needed")
        m = self.model
        enc = m.encode_text(batch["text"], batch["text_lens"])
        ctx_emb, ctx_mask = m.decoder_context(batch)  # the reference's prefix: embeddings, context encoder or baked
        cond, cond_mask = enc.output, enc.mask
        if use_cfg:
            cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask)
        w = self._start(B, cond, ctx_mask, p, keep_logits)
        if forced_codes is not None:
            if w.forced is None or w.forced.shape[2] < forced_codes.shape[2]:
                w.forced = torch.zeros(B, c.num_audio_codebooks, forced_codes.shape[2], dtype=torch.long,
                                       device=self.device)
            w.forced[:, :, : forced_codes.shape[2]].copy_(forced_codes)
        opts = (keep_logits, forced_codes is not None, lt_mode is not None, None)
        out0 = self._prefill(w, cond, cond_mask, ctx_emb, ctx_mask, batch["text_lens"], p, nemo_unmasked_padded_keys)
        n = self._run(w, out0, p, opts, ctx_mask.shape[1], run_all_steps)
        return self._finish(w, p, n, keep_logits)

    @torch.no_grad()
    def generate_speech(self, batch: dict[str, torch.Tensor], chunk_state, end_of_text, beginning_of_text: bool,
                        use_cfg: bool = True, use_local_transformer_for_inference: bool = False,
                        maskgit_n_steps: int = 3, maskgit_noise_scale: float = 0.0, maskgit_fixed_schedule=None,
                        maskgit_dynamic_cfg_scale: bool = False, maskgit_sampling_type: Optional[str] = None,
                        use_kv_cache: Optional[bool] = None, nemo_unmasked_padded_keys: bool = False,
                        chunked_config: Optional[ChunkedInferenceConfig] = None, **params: Any) -> InferOutput:
        """``model.generate_speech(batch, chunk_state, end_of_text, beginning_of_text, ...)``
        (:func:`reference.chunked.generate_speech`: NeMo's chunked generation, one text chunk per call) on the fast
        path: the same arguments, ``InferOutput`` (predicted_codes, predicted_codes_lens on the device, num_steps,
        attended_text_positions) and ``chunk_state`` updates. The call's checks and setup are the reference's own
        (:func:`reference.chunked.check_call`, :func:`~reference.chunked.start_call`: text window, encoder-output
        splice, the window's move, a later chunk's first prior, applied at step 0); the per-step rules run on the
        device inside the step (the first chunk: :func:`_prior_update`; later chunks: :func:`_chunk_prior_update`;
        the chunk-end rules in ``_post_b``), no host round trip per step. The fast path is the cached path
        (``use_kv_cache=False`` is refused) and runs a first chunk (``beginning_of_text=True``) on a fresh state
        only; MaskGit is refused in one line."""
        c = self.config
        cc = chunked_config if chunked_config is not None else ChunkedInferenceConfig()
        p, lt_mode, _ = checked_call(c, batch, params, use_cfg, use_local_transformer_for_inference, maskgit_n_steps,
                                     maskgit_noise_scale, maskgit_fixed_schedule, maskgit_dynamic_cfg_scale,
                                     maskgit_sampling_type)
        if lt_mode == "maskgit":
            raise InferenceError("the fast path runs the autoregressive local transformer only, not MaskGit; run "
                                 "model.generate_speech(..., use_local_transformer_for_inference=True)")
        if use_kv_cache is not None and not use_kv_cache:
            raise InferenceError("the fast path is the cached path (use_kv_cache=False: run model.generate_speech)")
        B = int(batch["text"].shape[0])
        eot = check_call(chunk_state, B, end_of_text, beginning_of_text)
        later = not bool(beginning_of_text)
        if not later and chunk_state.previous_attn_len:
            raise InferenceError("beginning_of_text=True on a used chunk_state: the fast path runs a first chunk on a "
                                 "fresh state (create_chunk_state) only; run model.generate_speech")
        if B > self.max_batch:
            raise ValueError(f"batch of {B} requests > max_batch {self.max_batch}")
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        pre_ended = [b in chunk_state.end_indices for b in range(B)]
        last = list(chunk_state.last_attended_timesteps[-1])
        call = start_call(self.model, batch, chunk_state, not later, use_cfg, p.attention_prior_epsilon, cc)
        w = self._start(B, call.cond, call.ctx_mask, p, False)
        prior = call.prior
        out0 = self._prefill(w, call.cond, call.cond_mask, call.ctx_emb, call.ctx_mask,
                             torch.tensor(call.window_lens, device=self.device), p, nemo_unmasked_padded_keys, prior)
        # the call's own state (after _prefill's reset)
        dev = self.device
        w.eot.copy_(torch.tensor(eot, device=dev))
        w.ended.copy_(torch.tensor(pre_ended, device=dev))
        w.in_end.copy_(w.ended)
        w.left_offset.copy_(torch.tensor(chunk_state.left_offset, device=dev))
        w.last.copy_(torch.tensor(last, device=dev))
        if prior is not None:
            w.prior[:B].copy_(prior[:B, 0])
        opts = (False, False, lt_mode is not None, (later, cc))
        n = self._run(w, out0, p, opts, call.ctx_mask.shape[1], False)
        return self._finish_chunk(w, p, n, chunk_state, pre_ended, call.window_lens, prior)

    def _start(self, B: int, cond, ctx_mask, p, keep_logits: bool) -> _Work:
        """The call's work buffers (sizes checked)."""
        c = self.config
        if B > self.max_batch:
            raise ValueError(f"batch of {B} requests > max_batch {self.max_batch}")
        S = c.frame_stacking_factor
        max_steps = p.max_decoder_steps // S
        T_ctx = ctx_mask.shape[1]  # the decoder prefix: baked frames, or the context codes framed by specials
        if T_ctx + 1 + max_steps > self.max_len:
            raise ValueError(f"context {T_ctx} + 1 + {max_steps} steps > max_len {self.max_len}")
        w = self._work(B, cond.shape[0], cond.shape[1], max_steps)
        width = _counter_width(w.T_text, p.attention_prior_lookahead_window)
        if w.counters.shape[1] < width:  # a longer lookahead than COUNTER_SLACK: new counters, new graphs
            w.counters = torch.zeros(B, width, dtype=torch.long, device=self.device)
            w.graphs.clear()
        if keep_logits and (w.logits_buf is None or w.logits_buf.shape[0] < max_steps):
            w.logits_buf = torch.zeros(max_steps, B, c.num_audio_codebooks * c.num_all_tokens_per_codebook * S,
                                       device=self.device)
        return w

    def _run(self, w: _Work, out0, p, opts, T_ctx: int, run_all_steps: bool) -> int:
        """Step 0's sampling on the prefill's output ``out0``, then the decode steps until the reference would stop
        (looked at every ``sync_every`` steps) -> the steps run."""
        self._post(w, out0, self._flags(0, p, opts[3]), p, opts)
        n = 1
        for idx in range(1, p.max_decoder_steps // self.config.frame_stacking_factor):
            if not run_all_steps and idx % self.sync_every == 0 and int(w.done_step) < BIG:
                break
            self._decode(w, idx, T_ctx, p, opts)
            n = idx + 1
        return n

    # ------------------------------------------------------------------------------------------------------
    # step 0: the reference's own forward_cached, writing into the static buffers
    # ------------------------------------------------------------------------------------------------------

    def _prefill(self, w: _Work, cond, cond_mask, ctx_emb, ctx_mask, text_lens, p, nemo_unmasked: bool,
                 prior: Optional[torch.Tensor] = None) -> tuple:
        """Step 0 over [context prefix | BOS] (cond, cond_mask, ctx_emb, ctx_mask: CFG's rows appended when it is
        on), the per-layer ``prior`` (rows, 1, T_text) applied if given (a later chunk's first prior); resets the
        call's state (infer_batch's: every item from text position 1, no offset, end_of_text all true)."""
        m, c = self.model, self.config
        d = c.decoder
        B, rows, S = w.B, w.rows, c.frame_stacking_factor
        dev = self.device
        use_cfg = rows != B
        T_ctx = ctx_mask.shape[1]
        # reset the state (in place: graphs hold these addresses)
        w.cond_mask.copy_(cond_mask)
        w.cond_neg.copy_(~cond_mask[:, None, None, :])
        w.text_lens.copy_(text_lens)
        w.prior.fill_(p.attention_prior_epsilon)
        w.last.fill_(1)
        for t in (w.counters, w.fin_present, w.fin_count, w.unfinished, w.ended, w.in_end, w.left_offset,
                  w.chunk_err, w.attended, w.step):
            t.zero_()
        w.eot.fill_(True)
        w.end_idx.fill_(BIG)
        w.done_step.fill_(BIG)
        kv, ff, memory_kv = [], [], []
        codes_in = torch.full((B, c.num_audio_codebooks, S), c.audio_bos_id, dtype=torch.long, device=dev)
        bos_emb, _ = m.embed_audio_tokens(codes_in, torch.full((B,), S, device=dev))  # (B, 1, D): S codes, 1 frame
        if use_cfg:
            bos_emb = torch.cat([bos_emb, bos_emb])
        T_new = T_ctx + bos_emb.shape[1]  # context, then BOS
        # (rows, T_new, H, Dh) caches of the prefill itself: the static ones, or with a float8 cache one model-dtype
        # staging pair shared by the layers, each layer's quantized into the cache when it is done (_StagedKV; step 0
        # attends its unrounded keys)
        ctx_len = ctx_mask.sum(1)  # contiguous prefix (lengths_to_mask)
        r_all = torch.arange(rows, device=dev)

        def compact(cache):  # row r keeps its ctx_len valid context keys, then the BOS key(s) (from position T_ctx)
            if nemo_unmasked:
                return
            for j in range(bos_emb.shape[1]):
                if self.triton:  # (rows, L, H, Dh) views
                    cache[r_all, ctx_len + j] = cache[r_all, T_ctx + j]
                else:
                    cache[r_all, :, ctx_len + j] = cache[r_all, :, T_ctx + j]

        pending: list = []
        if self.kv_fp8:
            H, Dh = d.sa_n_heads, d.sa_d_head
            stage = torch.zeros(2, rows, T_new, H, Dh, device=dev, dtype=self.dtype)
            pre_k, pre_v = [stage[0]] * d.n_layers, [stage[1]] * d.n_layers

            def flush(i):  # positions past a row's kv_len hold stale keys: never read
                for src, cache, exp in ((stage[0], self.k_cache[i], self.k_exp[i]),
                                        (stage[1], self.v_cache[i], self.v_exp[i])):
                    compact(src)
                    q8, e = kernels.fp8_quantize(src)  # (rows, T_new, H, Dh), (rows, T_new, H)
                    cache[:rows, :T_new] = q8
                    exp[:rows, :, :T_new] = e.transpose(1, 2)
        else:
            pre_k = [k[:rows] for k in self.k_cache]
            pre_v = [v[:rows] for v in self.v_cache]
        for i, layer in enumerate(m.decoder.layers):
            mk, mv = layer.memory_kv(cond)
            w.mem_k[i].copy_(mk)
            w.mem_v[i].copy_(mv)
            memory_kv.append((w.mem_k[i], w.mem_v[i]))
            if self.kv_fp8:  # (rows, H, T_new, Dh) views, what the reference's LayerKVCache expects
                kv.append(_StagedKV(pre_k[i].transpose(1, 2), pre_v[i].transpose(1, 2), pending,
                                    lambda i=i: flush(i)))
            elif self.triton:
                kv.append(_StaticKV(pre_k[i].transpose(1, 2), pre_v[i].transpose(1, 2)))
            else:
                kv.append(_StaticKV(pre_k[i], pre_v[i]))
            if d.kernel_size > 1:
                w.ff_in[i].zero_()
                w.ff_hidden[i].zero_()
                ff.append(_StaticFF(w.ff_in[i], w.ff_hidden[i]))
            else:
                ff.append(None)
        state = DecoderState(kv, ff, memory_kv, 0)
        x = m.decoder_input(torch.cat([ctx_emb, bos_emb], dim=1))
        x_mask = torch.cat([ctx_mask, torch.ones(rows, bos_emb.shape[1], dtype=torch.bool, device=dev)], 1)
        key_mask = (x_mask.unsqueeze(1) * x_mask.unsqueeze(2)).unsqueeze(1)
        probs: list = []
        layer_prior = None if prior is None else layer_priors(prior, p, d.n_layers)
        dec = m.decoder.forward_cached(x, x_mask, state, key_mask, cond_mask, layer_prior, probs_out=probs)
        logits = m.final_proj(dec[:, -1:])[:, 0]
        scores = cross_attention_scores([pr[:, :, -1:] for pr in probs], p.estimate_alignment_from_layers)

        # Compact the keys (compact(); float8: done per layer by its flush, the last one's here)
        while pending:
            pending.pop()()
        if not self.kv_fp8:
            for i in range(d.n_layers):
                compact(pre_k[i])
                compact(pre_v[i])
        if nemo_unmasked:
            w.kv_len.fill_(T_new)
        else:
            w.kv_len.copy_(ctx_len + bos_emb.shape[1])
        # CFG's unconditional rows: the same inputs up to and including BOS (zero context, all positions valid),
        # hence the same T_new keys in every layer; the triton kernel reads them from row B
        w.pre_len.zero_()
        if use_cfg:
            w.pre_len[B:] = T_new
        w.pos.fill_(T_new)
        return logits, scores, (dec[:, -1:], True)  # the local transformer's input: (rows, 1, D), after norm_out

    # ------------------------------------------------------------------------------------------------------
    # one decode step (idx >= 1): graph-capturable, no host syncs
    # ------------------------------------------------------------------------------------------------------

    def _flags(self, idx: int, p, chunk=None) -> tuple:
        """(prior in use at step idx, prior update after it, EOS forbidden): the reference loop's conditions.
        chunk (generate_speech: (later chunk, ChunkedInferenceConfig)): NeMo's chunked loop updates the prior from
        step 0 whatever start_prior_after_n_audio_steps says, and a later chunk keeps its first prior at every step
        when the prior is off (step 0 applies it in the prefill)."""
        forbid_eos = idx * self.config.frame_stacking_factor < p.min_generated_frames
        if chunk is not None:
            return bool(idx >= 1 and (p.apply_attention_prior or chunk[0])), bool(p.apply_attention_prior), \
                bool(forbid_eos)
        prior_in = p.apply_attention_prior and idx >= 1 and idx - 1 >= p.start_prior_after_n_audio_steps
        update = p.apply_attention_prior and idx >= p.start_prior_after_n_audio_steps
        return bool(prior_in), bool(update), bool(forbid_eos)

    def _decode(self, w: _Work, idx: int, T_ctx: int, p, opts) -> None:
        flags = self._flags(idx, p, opts[3])
        need = T_ctx + 1 + idx  # keys after this step's write (upper bound over rows)
        Lb = min(self.max_len, -(-need // BUCKET) * BUCKET)
        if not self.cuda_graphs:
            self._step(w, Lb, flags, p, opts)
            return
        key = (Lb, flags, opts, dataclasses.replace(p, max_decoder_steps=0))  # graphs never freed: pool stays valid
        g = w.graphs.get(key)
        if g is not None:
            g.replay()
            return
        # First use of this shape: run the step eagerly (it is the real step, and the warm-up the capture
        # needs), then record it for later steps. Recording does not execute, so state is not advanced twice.
        self._step(w, Lb, flags, p, opts)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g, pool=self._pool):
            self._step(w, Lb, flags, p, opts)
        w.graphs[key] = g

    def _step(self, w: _Work, Lb: int, flags: tuple, p, opts) -> None:
        m, c = self.model, self.config
        prior_in = flags[0]
        rows, B = w.rows, w.B
        C, S = c.num_audio_codebooks, c.frame_stacking_factor
        # the new frame, its position, CFG rows, the key counts and the first layer's norm + qkv: one compiled function
        lw0 = self._layer_w[0]
        pos_emb = m.decoder.position_embeddings
        x, new_len, new_len32, qkv = self._fn_embed(w.codes_in, self.emb_offsets, self.emb_table, C * S, rows != B,
                                                    None if pos_emb is None else pos_emb.weight, w.pos, self.dtype,
                                                    w.kv_len, lw0["ln_sa"], lw0["eps_sa"], lw0["qkv"])
        if not self.triton:  # the cache index of the new key and each row's valid keys, once for all layers
            H, Dh = c.decoder.sa_n_heads, c.decoder.sa_d_head
            index = w.kv_len.view(rows, 1, 1, 1).expand(rows, H, 1, Dh)
            valid = torch.arange(Lb, device=x.device)[None, :] < new_len[:, None]  # (rows, Lb)
        layer_prior = p.apply_prior_to_layers
        est = p.estimate_alignment_from_layers
        probs = []
        nc = B  # rows that attend the memory (module docstring: CFG's unconditional rows get exactly 0 from it)
        n_layers = len(m.decoder.layers)
        logits = None
        for i, layer in enumerate(m.decoder.layers):
            lw = self._layer_w[i]
            if qkv is None:  # else the prologue or the previous layer's compiled tail computed it
                qkv = self._fn_pre(x, lw["ln_sa"], lw["eps_sa"], lw["qkv"])
            if self.triton:
                y_sa = self._attention_triton(i, layer, qkv, w, new_len32, Lb)
            else:
                y_sa = self._attention_math(i, layer, qkv, w, index, valid, Lb)
            qkv = None
            use_prior = prior_in and (layer_prior is None or i in layer_prior)
            need = est is None or i in est
            xa = layer.cross_attention
            k1 = lw["w1"] is not None
            prior = w.prior[:nc] if use_prior else None
            x, q = self._fn_xq(x, y_sa, lw["w_o"], lw["ln_xq"], lw["eps_xq"], lw["w_q"], nc)
            if self.triton:
                # the kernel's defaults, 4 warps and all head dims a tile: the sweep's best (run R: 4.40 us a call
                # against 6.1-6.2 for 2, 8 or 16 warps and 4.62 for 64-dim chunks)
                y, prob = kernels.cross_attention(q.view(nc, -1), w.mem_k[i][:nc], w.mem_v[i][:nc], w.cond_mask[:nc],
                                                  prior, xa.scale)
                y, prob = y.view(nc, 1, -1), prob[:, :, None]  # prob (nc, H, 1, T_text), as the reference's
            else:
                y, prob = _xattn(q, w.mem_k[i][:nc], w.mem_v[i][:nc], w.cond_neg[:nc], prior, xa.scale, xa.n_heads,
                                 xa.d_head)
            if k1:  # the layer's tail + the next layer's norm and qkv (or the head): one compiled function
                x, proj = self._fn_xo_ffn(x, y, lw["w_xo"], lw["ln_ff"], lw["eps_ff"], lw["w1"], lw["w2"], True,
                                          *self._after_layer(i), gelu_bias=self._gelu_bias)
                if i + 1 < n_layers:
                    qkv = proj
                else:
                    logits = proj[:, 0]
            else:
                x = self._fn_xo_ffn(x, y, lw["w_xo"], lw["ln_ff"], lw["eps_ff"], lw["w1"], lw["w2"], False)
            if need:
                probs.append(prob)
            if not k1:
                x = x + self._ffn(i, layer, x, w)
        if logits is None:
            logits = self._fn_head(x, *self._head_w)
        # x: the residual stream, before norm_out (_f_lt_in applies it for the local transformer)
        self._post(w, (logits, probs, (x, False)), flags, p, opts, advance=True)

    def _after_layer(self, i: int) -> tuple:
        """(norm weight or None, eps, projection weight, bias or None) of what follows decoder layer i: the next
        layer's norm_self + qkv_net, or after the last layer norm_out + final_proj."""
        if i + 1 < len(self._layer_w):
            nw = self._layer_w[i + 1]
            return nw["ln_sa"], nw["eps_sa"], nw["qkv"], None
        return self._head_w

    def _attention_triton(self, i, layer, qkv, w: _Work, new_len32, Lb: int):
        """The split-KV kernel writes the new key/value at each row's new length - 1 and attends every key of the row
        (CFG's unconditional rows: their shared prefix from row B) -> (rows, 1, H*Dh) (before o_net)."""
        sa = layer.self_attention
        rows = w.rows
        qkv = qkv.reshape(rows, 3, sa.n_heads, sa.d_head)
        fp8 = dict(k_exp=self.k_exp[i][:rows], v_exp=self.v_exp[i][:rows]) if self.kv_fp8 else {}
        keys_per_split, block_n, warps = self.attn_tile
        y = kernels.decode_attention(qkv[:, 0], self.k_cache[i][:rows], self.v_cache[i][:rows], new_len32, sa.scale,
                                     keys_per_split, block_n, max_keys=Lb, k_new=qkv[:, 1], v_new=qkv[:, 2],
                                     num_warps=warps, prefix_len=w.pre_len if rows > w.B else None, prefix_row=w.B,
                                     **fp8)
        return y.reshape(rows, 1, -1)

    def _attention_math(self, i, layer, qkv, w: _Work, index, valid, Lb: int):
        """Cache write of the new key/value, then the reference's ``_attend`` op for op over the bucket's keys, those
        past each row's length masked -> (rows, 1, H*Dh) (before o_net)."""
        sa = layer.self_attention
        rows = w.rows
        qkv = qkv.reshape(rows, 3, sa.n_heads, sa.d_head)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (rows, H, Dh)
        K, Vc = self.k_cache[i], self.v_cache[i]
        K[:rows].scatter_(2, index, k.unsqueeze(2))
        Vc[:rows].scatter_(2, index, v.unsqueeze(2))
        score = torch.matmul(q.unsqueeze(2), K[:rows, :, :Lb].transpose(2, 3)) * sa.scale
        score = score.masked_fill(~valid[:, None, None, :], float("-inf"))
        y = torch.matmul(F.softmax(score, dim=-1), Vc[:rows, :, :Lb])
        return y.transpose(1, 2).reshape(rows, 1, -1)

    def _ffn(self, i, layer, x, w: _Work):
        """A kernel-3 (causal conv) FFN over the last k positions (the reference's _forward_cached with the static
        history)."""
        ff = layer.pos_ff
        h = layer.norm_pos_ff(x)
        k = ff.proj.kernel_size
        win = w.pos + torch.arange(-(k - 1), 1, device=x.device)  # (k,) absolute positions
        w.ff_in[i].index_copy_(1, w.pos, h)
        a = F.gelu(F.conv1d(w.ff_in[i].index_select(1, win).transpose(1, 2), ff.proj.conv.weight), approximate="tanh")
        w.ff_hidden[i].index_copy_(1, w.pos, a.transpose(1, 2))
        y = F.conv1d(w.ff_hidden[i].index_select(1, win).transpose(1, 2), ff.o_net.conv.weight)
        return y.transpose(1, 2)

    # ------------------------------------------------------------------------------------------------------
    # CFG, prior state machine, sampling, EOS: device tensors only
    # ------------------------------------------------------------------------------------------------------

    def _post(self, w: _Work, out, flags: tuple, p, opts, advance: bool = False) -> None:
        """out: (logits, scores, (the decoder's newest output (rows, 1, D), whether norm_out is applied))."""
        keep_logits, forced, use_lt, chunk = opts
        _, update, forbid_eos = flags
        logits, scores, dec = out
        lg = self._fn_post_a(w, logits, scores, p, keep_logits, update, forbid_eos, advance, chunk)
        if use_lt:
            self._fn_post_b(w, lg, None, p, forced, self._local_transformer(w, dec, p, forbid_eos, chunk), chunk)
            return
        # the top-k threshold: the k-th largest logit of each (item, codebook), the same float either way
        kth = kernels.topk_threshold(lg, p.topk) if self.triton else None
        # torch.multinomial(probs, 1) is argmax(probs / Exp(1)); the reference draws (B, V) per codebook for the
        # sampled pass, then again for its argmax pass: one (2*S*C, B, V) draw is the same stream on the CPU.
        # outside any compiled function: the eager RNG stream. On CUDA only the sampled pass's half: the argmax pass
        # draws nothing here, and CUDA's stream differs from the reference's per-codebook draws anyway
        if self.device.type == "cuda":
            c = self.config
            w.noise[: c.frame_stacking_factor * c.num_audio_codebooks].exponential_()
        else:
            w.noise.exponential_()
        self._fn_post_b(w, lg, kth, p, forced, None, chunk)

    def _post_a(self, w: _Work, logits, scores, p, keep_logits: bool, update: bool, forbid_eos: bool,
                advance: bool = False, chunk=None):
        """CFG combine, logits record, prior state machine, sampling edits -> (B, S*C, V) float32 logits.
        scores: the alignment scores, or (a decode step) the estimating layers' probabilities, averaged here;
        advance: the decode step's key count and position move on by one; chunk: generate_speech's (later chunk,
        ChunkedInferenceConfig), None for infer_batch."""
        c = self.config
        B, S, C, V = w.B, c.frame_stacking_factor, c.num_audio_codebooks, c.num_all_tokens_per_codebook
        logits = logits.float()
        if w.rows != B:
            logits = (1 - p.cfg_scale) * logits[B:] + p.cfg_scale * logits[:B]
        if keep_logits:
            w.logits_buf.index_copy_(0, w.step, logits.unsqueeze(0))
        scores = _end_of_step(w, scores, advance)
        if update:
            if chunk is not None and chunk[0]:
                _chunk_prior_update(w, scores.float(), p, chunk[1])
            else:
                _prior_update(w, scores.float(), p)
        lg = logits.view(B, S * C, V)  # j = s*C + c, NeMo's layout (c + C*s) * V
        track = not p.ignore_finished_sentence_tracking
        return _edit_logits(lg, c.audio_eos_id, w.unfinished if track else None,
                            (w.fin_present & (w.fin_count >= _finished_limit(chunk))) if track else None,
                            self.only_eos, self.forbid_all if forbid_eos else self.forbid_no_eos)

    def _local_transformer(self, w: _Work, dec, p, forbid_eos: bool, chunk=None) -> torch.Tensor:
        """NeMo's autoregressive local transformer (``sample_local_transformer``) on the decoder's newest output:
        C*S sub-steps (:func:`_f_lt_sub`), each code fed back, device tensors only -> (B, C, S) the sampled codes.
        The noise: on the CPU the reference's draws, (rows, V) per sub-step (NeMo draws for the unconditional rows
        too, then copies the conditional rows' codes), before the argmax pass's; on CUDA the B rows used."""
        c, lt = self.config, self.lt
        B, rows, J = w.B, w.rows, c.num_audio_codebooks * c.frame_stacking_factor
        if self.device.type == "cuda":
            w.lt_noise[:, :B].exponential_()
        else:
            w.lt_noise.exponential_()
            w.noise[J:].exponential_()  # the argmax pass's draws (an argmax here), after the sub-steps'
        x, normed = dec
        ln, eps = (None, 0.0) if normed else self._head_w[:2]
        new, _ = self._fn_lt_in(x, ln, eps, *self._lt_in)
        track = not p.ignore_finished_sentence_tracking
        unfinished = w.unfinished if track else None
        finished = (w.fin_present & (w.fin_count >= _finished_limit(chunk))) if track else None
        forbidden = self.forbid_all if forbid_eos else self.forbid_no_eos
        full = self.lt_full_keys
        codes = []
        for j in range(J):
            code, new = self._fn_lt_sub(
                new, self._lt_pos[j], self._lt_valid[j] if full else None, J if full else j + 1, self._lt_pos_table,
                w.lt_layers, lt.sa_n_heads, lt.sa_d_head ** -0.5, *self._lt_out[j], B, p.cfg_scale, c.audio_eos_id,
                unfinished, finished, self.only_eos, forbidden, p.topk, p.temperature, w.lt_noise[j, :B],
                self._lt_emb[j], *self._lt_in)
            codes.append(code)
        return torch.stack(codes, 1).view(B, c.frame_stacking_factor, c.num_audio_codebooks).transpose(1, 2)

    def _post_b(self, w: _Work, lg, kth: Optional[torch.Tensor], p, forced: bool,
                sampled: Optional[torch.Tensor] = None, chunk=None) -> None:
        """Top-k (kth: the k-th largest logit per row, if already known), temperature, the draw, the argmax pass,
        EOS bookkeeping, next input. sampled: the local transformer's codes (B, C, S), if it sampled them (then
        only the argmax pass runs here). chunk (generate_speech): NeMo's chunk-end rules
        (``_check_eos_and_update_state``: an item not at its text's end whose finished counter reached
        forceful_chunk_end_threshold ends its chunk with the step's frames) and its stop rule
        (``_should_terminate_loop``: every item at its chunk's end, or its text's for end_of_text items; no minimum
        of frames)."""
        c = self.config
        B, S, C = w.B, c.frame_stacking_factor, c.num_audio_codebooks
        step = w.step
        if sampled is None:
            if kth is None:
                kth = torch.topk(lg, p.topk, dim=-1)[0][..., -1:]
            sampled, top1 = _sample(lg, kth, p.temperature, w.noise[: S * C])
            sampled = sampled.view(B, S, C).transpose(1, 2)  # (B, C, S)
        else:
            top1 = lg.argmax(dim=-1)
        top1 = top1.view(B, S, C).transpose(1, 2)
        e = _eos_index(top1, sampled, c.audio_eos_id, p.eos_detection_method)
        new_end = (~w.ended) & (e < BIG)
        w.end_idx.copy_(torch.where(new_end, step * S + e, w.end_idx))
        if chunk is not None:
            cut = (~w.ended) & ~new_end & ~w.eot & w.fin_present & (
                w.fin_count >= chunk[1].forceful_chunk_end_threshold)
            w.end_idx.copy_(torch.where(cut, (step + 1) * S, w.end_idx))
            new_end = new_end | cut
        w.ended.logical_or_(new_end)
        w.in_end.logical_or_(new_end & w.eot)
        if chunk is not None:
            done = torch.where(w.eot, w.in_end, w.ended).all()
        else:
            done = w.ended.all() & (step + 1 >= MIN_FRAMES_FOR_CODEC)
        w.done_step.copy_(torch.where(done & (w.done_step == BIG), step, w.done_step))
        nxt = sampled
        frame_ids = step * S + torch.arange(S, device=lg.device)
        if forced:
            nxt = w.forced.index_select(2, frame_ids)
        w.out_codes.index_copy_(2, frame_ids, nxt)
        w.codes_in.copy_(nxt)
        w.step.add_(1)

    # ------------------------------------------------------------------------------------------------------

    def _finish_chunk(self, w: _Work, p, n: int, state, pre_ended: list, window_lens: list,
                      prior: Optional[torch.Tensor]) -> InferOutput:
        """generate_speech's result and the chunk state's updates after the loop (NeMo's: per step the attended
        positions, end_indices at the global step of an end_of_text item's EOS, overall_idx by the steps the loop
        did not break after); NeMo's multi-chunk-prior IndexError, flagged on the device, raised here in the
        reference's words."""
        S, B = self.config.frame_stacking_factor, w.B
        done = int(w.done_step)
        num_steps = done + 1 if done < BIG else n
        att = w.attended[:num_steps].cpu().tolist()
        err = int(w.chunk_err)
        if err:  # the reference's rule on that step's positions raises its own message
            PriorState([0] * B, [{} for _ in range(B)]).build_chunk_prior(
                w.rows, w.T_text, window_lens, att[err - 1], p.attention_prior_epsilon, state.left_offset, (), "cpu")
            raise InferenceError(f"step {err - 1}: NeMo's multi-chunk prior fails (construct_multi_chunk_prior)")
        end_idx = w.end_idx.cpu().tolist()
        in_end = w.in_end.cpu().tolist()
        new = sorted((end_idx[b] // S, b) for b in range(B) if in_end[b] and not pre_ended[b])
        for step, b in new:
            state.end_indices[b] = state.overall_idx + step
        if p.apply_attention_prior:
            state.last_attended_timesteps.extend(att)
        state.overall_idx += num_steps - (1 if done < BIG else 0)
        lens = torch.tensor([e if e < BIG else num_steps * S for e in end_idx], device=self.device)
        codes = w.out_codes[:, :, : num_steps * S].clone()
        out = InferOutput(codes[:, :, : int(lens.max())], lens, num_steps)
        if p.apply_attention_prior:
            out.attended_text_positions = att
            out.attended_by_step = dict(enumerate(att))
        if prior is not None:
            out.step_priors = [prior]
        return out

    def _finish(self, w: _Work, p, n: int, keep_logits: bool) -> InferOutput:
        S = self.config.frame_stacking_factor
        done = int(w.done_step)
        num_steps = done + 1 if done < BIG else n
        codes = w.out_codes[:, :, : num_steps * S].clone()
        lens = torch.where(w.ended, w.end_idx, p.max_decoder_steps)
        out = InferOutput(codes[:, :, : int(lens.max())], lens.cpu(), num_steps)  # codes on the device, as eager
        prior_steps = [k for k in range(num_steps) if p.apply_attention_prior and k >= p.start_prior_after_n_audio_steps]
        att = w.attended.cpu()
        out.attended_text_positions = [att[k].tolist() for k in prior_steps]
        out.attended_by_step = {k: att[k].tolist() for k in prior_steps}
        if keep_logits:
            out.step_logits = [w.logits_buf[k].clone() for k in range(num_steps)]
        return out
