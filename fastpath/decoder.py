"""Fast cached decoding for the reference MagpieTTS: static KV cache, device-side sampling and prior, CUDA graphs.

    from fastpath import FastDecoder
    fast = FastDecoder(model, max_batch=64, max_len=160 + 2 + 480, dtype=torch.bfloat16)
    out = fast.generate(batch, use_cfg=True, topk=80, max_decoder_steps=480)  # like model.infer_batch(...)

What it computes is the eager reference's *cached* path (``reference.inference.infer_batch(use_kv_cache=True)``):
step 0 (context prefix + BOS frame) runs through the reference's own ``Transformer.forward_cached`` into this
decoder's static buffers; every later step is one new frame per row, written here without any host sync:

* **KV cache**: one static buffer per layer for ``max_batch`` requests (x2 rows with CFG) and ``max_len``
  positions, preallocated once. Keys are stored *compacted* per row: the valid context frames, then the BOS
  frame and the generated frames, so padded context keys are never stored or read (with
  ``nemo_unmasked_padded_keys=True`` the padded keys are kept and attended, as NeMo's cached path does).
  Attention reads only each row's own length: flash attention with per-row ``seqused_k`` (``attn_impl="flash"``,
  fp16/bf16 on CUDA, one graph for every step) or, for ``"sdpa"`` / ``"math"``, a key-length mask over a
  bucket ``[:, :, :L_bucket]`` (``bucket`` positions granularity, one CUDA graph per bucket).
* **cross-attention** K/V are computed once per request (``layer.memory_kv``) into static buffers.
* **CFG's unconditional half** (NeMo's ``prepare_dummy_cond_for_cfg``): its memory is zero and no layer has a bias,
  so its cross-attention adds exactly 0 -- decode steps run the cross-attention on the conditional rows only
  (``skip_uncond_xattn``); and its rows all start with the same inputs (zero context, every position valid, BOS), so
  they share one copy of those T_ctx + 1 keys (``share_uncond_prefix``, triton attention).
* ``attn_impl="triton"``: the attention, the cross-attention core and the sampler's top-k threshold are Triton
  kernels (fastpath/kernels.py, each tested against a plain-PyTorch statement; on the CPU under Triton's
  interpreter).
* **sampling** on the device: CFG combine, special-token masks, top-k, temperature, and the draw as
  ``argmax(p / Exp(1))`` -- exactly what ``torch.multinomial(p, 1)`` computes, without its host-side validity
  checks (which sync). The exponential noise is drawn in the reference's order and shape (per step: sampled
  pass then the argmax pass, codebook by codebook), so on the CPU the sampled codes equal the eager reference's
  for the same ``torch.manual_seed``.
* **attention prior** (``PriorState`` of reference/inference.py) as tensors: last attended position, a
  ``(B, T_text + 1)`` table of visit counters (sink >= 8, stuck >= 10), finished counters and flags, EOS indices.
* **stopping**: whether every item has ended is kept on the device; the host looks only every ``sync_every``
  steps and the output is truncated to the step where the reference would have stopped (identical results).

Known differences from the eager reference (documented and tested in tests/fastpath/test_decoder.py):

* the argmax pass (``sample_codes(temperature=0.01, topk=1)``) is an ``argmax`` here: the reference's
  multinomial over the top-1 set differs only where two logits tie exactly (it draws among the tied ones);
* float rounding: the step's matrix products run on one new row (the reference runs final_proj over the whole
  step-0 prefix and conv1d for the FFN), so logits agree to float32 rounding (~1e-6), not bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

import fastpath.kernels as kernels
from reference.inference import (EOS_METHODS, InferOutput, InferenceError, check_parameters, dummy_cfg_conditioning,
                                 forbidden_tokens, resolve_parameters)
from reference.batch import validate_batch
from reference.model import ConvFFState, DecoderState, LayerKVCache

BIG = 1 << 40  # "no EOS yet" / "not done" sentinel on the device


def _flash_works(device, dtype) -> bool:
    """Whether this torch build runs varlen flash attention with per-row ``seqused_k`` (else: sdpa)."""
    try:
        q = torch.randn(2, 2, 64, device=device, dtype=dtype)
        k = torch.randn(8, 2, 64, device=device, dtype=dtype)
        cu = torch.arange(3, device=device, dtype=torch.int32)
        used = torch.tensor([3, 2], device=device, dtype=torch.int32)
        y = torch.ops.aten._flash_attention_forward(q, k, k, cu, cu * 4, 1, 4, 0.0, False, False, seqused_k=used)[0]
        ref = torch.stack([F.scaled_dot_product_attention(q[i, :, None].float(), k[4 * i : 4 * i + n].transpose(0, 1).float(),
                                                          k[4 * i : 4 * i + n].transpose(0, 1).float())[:, 0]
                           for i, n in enumerate((3, 2))])
        return bool((y.float() - ref).abs().max() < 1e-2)
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


def _f_pre(x, ln_w, eps: float, w_qkv):
    """norm_self + qkv_net of one layer (the reference's ops)."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, None, eps), w_qkv)


def _lin(x, w, tile: Optional[tuple]):
    """``F.linear(x, w)``; with a tile (BLOCK_N, BLOCK_K, split_k, warps, stages) the Triton split-K product
    (``kernels.linear_partials``), its float32 partials summed here (under compile: inside the next fused kernel)."""
    if tile is None:
        return F.linear(x, w)
    p = kernels.linear_partials(x.reshape(-1, x.shape[-1]), w, tile[2], tile[0], tile[1], tile[3], tile[4])
    y = p[0] if p.shape[0] == 1 else p.sum(0).to(x.dtype)  # (M, N)
    return y.view(*x.shape[:-1], w.shape[0])


def _f_xq(x, y_sa, w_o, ln_xq, eps_xq: float, w_q, n_cond: int, tiles: Optional[dict] = None):
    """o_net + residual, then the cross-attention query of the first ``n_cond`` rows (norm_xattn_query + q_net).
    The norm runs over every row and is sliced after (row-wise: the same values), so it fuses with the add.
    tiles: Triton split-K tiles for "o_net" / "xq" (``_lin``), else cuBLAS."""
    t = tiles or {}
    x = x + _lin(y_sa, w_o, t.get("o_net"))
    return x, _lin(F.layer_norm(x, (x.shape[-1],), ln_xq, None, eps_xq)[:n_cond], w_q, t.get("xq"))


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
              b_next=None, tiles: Optional[dict] = None, gelu_bias: Optional[torch.Tensor] = None):
    """Cross-attention o_net + residual for the first ``len(y)`` rows (the others attend no memory: CFG's
    unconditional rows, whose memory is zero, get exactly 0 from it), then (kernel-1 decoders) the FFN + residual.
    With ``w_next``: also what follows the layer -- the next layer's norm_self + qkv_net, or norm_out (``ln_next``
    None: none) + final_proj -- so the residual add and that norm fuse into one kernel; returns (x, projection).
    tiles: Triton split-K tiles for "xo" / "ffn_out" (``_lin``), else cuBLAS. gelu_bias (zeros, the FFN's width): the
    FFN's first product and its tanh-GELU as one cuBLASLt call with a GELU epilogue (``torch._addmm_activation``;
    inductor keeps it as one extern call), the GELU applied to the float32 accumulator before rounding."""
    t = tiles or {}
    n_cond = y.shape[0]
    xc = x[:n_cond] + _lin(y, w_xo, t.get("xo"))
    x = xc if n_cond == x.shape[0] else torch.cat([xc, x[n_cond:]])
    if ffn:
        h = F.layer_norm(x, (x.shape[-1],), ln_ff, None, eps_ff)
        if gelu_bias is None:
            a = F.gelu(F.linear(h, w1), approximate="tanh")
        else:
            a = torch._addmm_activation(gelu_bias, h.reshape(-1, h.shape[-1]), w1.t(), use_gelu=True)
            a = a.view(*h.shape[:-1], w1.shape[0])
        x = x + _lin(a, w2, t.get("ffn_out"))
    if w_next is None:
        return x
    h = x if ln_next is None else F.layer_norm(x, (x.shape[-1],), ln_next, None, eps_next)
    return x, F.linear(h, w_next, b_next)


def _f_post(x, y_sa, w_o, ln_xq, eps_xq: float, w_q, mem_k, mem_v, cond_neg, prior: Optional[torch.Tensor],
            w_xo, ln_ff, eps_ff: float, w1, w2, scale: float, n_heads: int, d_head: int, need_prob: bool, ffn: bool,
            n_cond: int):
    """Everything of one decoder layer after the self-attention kernel: o_net + residual, cross-attention (mask,
    softmax, prior, mask) + residual, and (kernel-1 decoders) the FFN + residual. The reference's ops in its
    order (for ``n_cond`` = all rows, the same numbers as the reference); ``compile=True`` fuses it on the GPU.
    Only the first ``n_cond`` rows attend the memory (see ``_f_xo_ffn``); mem_k/mem_v/cond_neg/prior cover them."""
    x, q = _f_xq(x, y_sa, w_o, ln_xq, eps_xq, w_q, n_cond)
    y, prob = _xattn(q, mem_k, mem_v, cond_neg, prior, scale, n_heads, d_head)
    x = _f_xo_ffn(x, y, w_xo, ln_ff, eps_ff, w1, w2, ffn)
    return x, (prob.mean(dim=1) if need_prob else None)


def _f_embed(codes_in, offsets, table, n_codes: int, cfg: bool, pos_table, pos, dtype: torch.dtype, kv_len,
             ln_w=None, eps: float = 0.0, w_qkv=None):
    """A decode step's prologue: the new frame (NeMo's embed_audio_tokens: the mean of the C*S code embeddings),
    CFG's unconditional copy, the position embedding, cast to the model dtype; each row's key count after this step's
    write (long and int32); with ``w_qkv`` also the first layer's norm_self + qkv_net.
    -> (x (rows, 1, D), new_len, new_len int32, qkv or None)."""
    emb = F.embedding(codes_in + offsets, table)  # (B, C, S, D)
    x = emb.sum(dim=(1, 2)) / n_codes
    if cfg:
        x = torch.cat([x, x])
    x = x.unsqueeze(1)  # (rows, 1, D)
    if pos_table is not None:
        x = x + pos_table.index_select(0, pos)
    x = x.to(dtype)
    new_len = kv_len + 1
    return x, new_len, new_len.to(torch.int32), (None if w_qkv is None else _f_pre(x, ln_w, eps, w_qkv))


def _f_head(x, ln_w, eps: float, w, b):
    """norm_out (or identity) + final_proj of the newest position."""
    if ln_w is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_w, None, eps)
    return F.linear(x, w, b)[:, 0]


class _MaybeCompiled:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` when enabled; on a compile error (outside a CUDA-graph
    capture) warn once and run ``fn`` itself. fullgraph: an error surfaces before anything ran, so nothing is
    executed twice."""

    def __init__(self, fn, enabled: bool, mode: Optional[str] = None):
        self.fn = fn
        self.error: Optional[str] = None
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode) if enabled else None

    def __call__(self, *args, **kw):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kw)
            except Exception as e:  # noqa: BLE001 - fall back to the plain function
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                import warnings

                self.error = f"{type(e).__name__}: {e}"[:2000]
                warnings.warn(f"FastDecoder compile=True: {self.fn.__name__} runs uncompiled ({self.error[:300]})")
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
    ff_in: list
    ff_hidden: list
    kv_len: torch.Tensor  # (rows,) long: keys stored per row (compacted)
    pos: torch.Tensor  # (1,) long: absolute decoder position of the next input frame
    step: torch.Tensor  # (1,) long: the step index idx
    codes_in: torch.Tensor  # (B, C, S) long: the frame fed at the next step
    out_codes: torch.Tensor  # (B, C, S * max_steps) long
    text_lens: torch.Tensor  # (B,) long
    prior: torch.Tensor  # (rows, T_text) float32
    last: torch.Tensor  # (B,) long
    counters: torch.Tensor  # (B, T_text + 1) long
    fin_present: torch.Tensor  # (B,) bool: in NeMo's finished_texts_counter
    fin_count: torch.Tensor  # (B,) long
    unfinished: torch.Tensor  # (B,) bool
    end_idx: torch.Tensor  # (B,) long, BIG = none
    ended: torch.Tensor  # (B,) bool
    done_step: torch.Tensor  # (1,) long: first step after which the reference stops, BIG = none
    attended: torch.Tensor  # (max_steps, B) long
    noise: torch.Tensor  # (2 * S * C, B, V) float32: exponential noise, reference draw order
    logits_buf: Optional[torch.Tensor] = None  # (max_steps, B, C*V*S) float32 when keep_logits
    forced: Optional[torch.Tensor] = None  # (B, C, >= S * max_steps) long
    cond_neg: Optional[torch.Tensor] = None  # (rows, 1, 1, T_text) bool: ~cond_mask, once per request
    row_base: Optional[torch.Tensor] = None  # (rows,) long: row * max_len (flash / triton cache rows)
    cu_q: Optional[torch.Tensor] = None  # (rows + 1,) int32
    cu_k: Optional[torch.Tensor] = None  # (rows + 1,) int32
    pre_len: Optional[torch.Tensor] = None  # (rows,) int32: leading keys read from row B (share_uncond_prefix)
    graphs: dict = field(default_factory=dict)


class FastDecoder:
    """Cached MagpieTTS decoding with static buffers; CUDA graphs on the GPU, the same code eagerly on the CPU.

    model: a reference ``MagpieTTS`` (copied and cast to ``dtype``; the original is untouched).
    max_batch: requests per call (rows = 2 x max_batch with CFG). max_len: decoder positions per row
    (context frames + 2 specials + BOS... i.e. ``T_ctx + 1 + max_steps`` must fit).
    attn_impl: "auto" (flash on CUDA for fp16/bf16, else "sdpa" on CUDA, "math" on the CPU), "flash", "sdpa", "math",
    or "triton" (CUDA: a split-KV decode kernel over the compacted cache, one graph for all steps).
    cuda_graphs: None = on for CUDA. nemo_unmasked_padded_keys: as in ``infer_batch``.
    compile: torch.compile (inductor, fullgraph, static shapes) the per-layer work around the attention kernel and
    the sampling/prior step, inside the CUDA graphs. CUDA only: elsewhere it is ignored (the plain functions run);
    a compile error falls back to the plain function with a warning (``compile_errors``).
    keys_per_split, attn_block_n, attn_num_warps, attn_num_stages: the triton attention's keys per program, keys per
    loaded tile, warps per program and software-pipeline stages (None: Triton's default) (bench/attn_sweep.py times
    a few). fused_kv_write: the triton kernel writes the step's key/value into the cache itself (else two
    index_copy_ kernels a layer before it). xattn_num_warps, xattn_d_chunk: the cross-attention kernel's warps and
    head dims per tile (None: all). fuse_layer_tails (with xattn_kernel, kernel-1 FFN): each layer's compiled tail
    also computes the next layer's norm + qkv (the last: norm_out + final_proj), so the residual add and that norm
    are one kernel under compile=True; the same ops in the same order either way. The step's prologue (the new
    frame's embedding, CFG copy, position, the key counts) is one compiled function under compile=True;
    fuse_step_ends adds the first layer's norm + qkv to it and runs the epilogue's layer average of the alignment
    scores and the key count / position advance inside the compiled sampler (``_post_a``). The same ops either way;
    with both, 167 kernels a step instead of 174 and 14 us less GPU time (H100, run AX), but no measurable change in
    the step time (same-process A/B of fuse_step_ends within +-0.011 ms, runs AX, AZ).
    compile_mode: torch.compile's mode for compile=True (None = default; "max-autotune-no-cudagraphs" lets inductor
    time Triton GEMM templates with fused epilogues against cuBLAS: minutes of compilation).

    Structural savings with CFG (both exact in what they skip; see NOTES-fast.md round 5):
    skip_uncond_xattn: the unconditional rows' memory is zero and no layer has a bias, so their cross-attention
    adds exactly 0: decode steps run the cross-attention (query, scores, prior, o_net) on the conditional rows only.
    share_uncond_prefix (triton attention): the unconditional rows all start with the same inputs (zero context,
    every position valid, then BOS), so their first ``T_ctx + 1`` keys/values are the same; the kernel reads them
    from one row (which stays in L2) instead of each row's own copy.
    Kernels (fastpath/kernels.py; None = on with ``attn_impl="triton"``): xattn_kernel -- the cross-attention core
    (scores, mask, softmax, prior, weighted values) in one kernel instead of two batched products and a fused
    softmax chain; topk_kernel -- the sampler's k-th largest logit by a bitwise search instead of torch.topk's sort
    (the same float: exact).
    kv_cache_dtype: None (the model's dtype: the exact path above) or ``torch.float8_e4m3fn`` (``attn_impl="triton"``
    with fused_kv_write): the self-attention cache holds float8 e4m3 keys/values, each (position, head) vector with
    its own power-of-two scale (``kernels.fp8_quantize``): half the bytes the attention reads in bf16. **Not exact**:
    every cached key/value is rounded to 3 mantissa bits (relative error <= 2**-4), so the logits move (tolerance
    measured and tested in tests/fastpath/test_kernels.py; bench/RESULTS-seed.md for the seed workload). Step 0
    (prefill) attends its unrounded keys, as a TensorRT-LLM context phase with an FP8 KV cache does; every later step
    reads them rounded, the newest key included.
    kv_head_major (None = on with ``attn_impl="triton"`` and fused_kv_write, the only paths that can take it): the
    cache is stored (rows, H, L, Dh) -- each head's keys contiguous -- instead of (rows, L, H, Dh); ``k_cache[i]``
    stays a (rows, L, H, Dh) view either way. Each tile then reads one contiguous block (a float8 head vector is 64
    bytes, half a cache line); bench/attn_sweep.py: 55.1 vs 56.1 us a layer in bf16, 38.3 vs 39.9 in float8 (H100).
    The attention tiles' defaults (None) are the sweeps' best on an H100: 32 keys a split and a tile, 1 warp (run X);
    with the float8 cache 64 keys, 1 warp (run AE: 31.4 vs 34.2 us a layer).
    gelu_epilogue (None = on with CUDA and the cross-attention kernel, which it needs): the FFN's first product and its
    tanh-GELU as one cuBLASLt GEMM with a GELU epilogue (``torch._addmm_activation`` with a zero bias; CUDA's is the
    tanh GELU, the CPU's the erf one, hence CUDA only), one kernel instead of two a layer: -0.021 ms/step bf16,
    -0.034 with the float8 cache (run AK, H100). The GELU then sees the float32 accumulator instead of its rounding
    to the model dtype (float32: the same to ~1e-5, the epilogue's tanh vs torch's).
    gemm_kernel (off by default; needs the cross-attention kernel): four of a layer's GEMMs -- o_net, the
    cross-attention's q_net and o_net, the FFN's o_net -- run as Triton split-K products (``kernels.linear_partials``:
    float32 partials over K slices, summed in a fixed order) instead of cuBLAS. Alone they are faster
    (bench/gemm_sweep.py, run Y, weights from HBM: 4.2 -> 3.4, 3.9 -> 2.3, 3.0 -> 2.2, 7.4 -> 5.7 us), but in the
    compiled step they were not (run AB, one process: 1.381 ms/step vs 1.299 without; the float32 partials, up to
    3 MB a product, are written and read back, and the sums did not all fuse): kept as an option for other cards and
    sizes, measured, not the default. qkv, the FFN's first product and final_proj always use cuBLAS. gemm_tiles:
    per-product (BLOCK_N, BLOCK_K, split_k, warps, stages) overriding ``GEMM_TILES``. In float32 the products are
    IEEE float32, not TF32.
    """

    # the best tiles of bench/gemm_sweep.py on an H100 (run Y) at the released sizes: (BLOCK_N, BLOCK_K, split_k,
    # warps, stages)
    GEMM_TILES = {"o_net": (32, 64, 4, 4, 4), "xq": (16, 64, 8, 4, 3), "xo": (16, 64, 2, 4, 3),
                  "ffn_out": (64, 128, 8, 4, 3)}

    def __init__(
        self,
        model,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        attn_impl: str = "auto",
        cuda_graphs: Optional[bool] = None,
        bucket: int = 64,
        sync_every: int = 32,
        nemo_unmasked_padded_keys: bool = False,
        compile: bool = False,
        keys_per_split: Optional[int] = None,
        fused_kv_write: bool = True,
        compile_mode: Optional[str] = None,
        attn_block_n: Optional[int] = None,
        attn_num_warps: Optional[int] = None,
        attn_num_stages: Optional[int] = None,
        xattn_num_warps: int = 4,
        xattn_d_chunk: Optional[int] = None,
        fuse_layer_tails: bool = True,
        skip_uncond_xattn: bool = True,
        share_uncond_prefix: bool = True,
        xattn_kernel: Optional[bool] = None,
        topk_kernel: Optional[bool] = None,
        kv_cache_dtype: Optional[torch.dtype] = None,
        kv_head_major: Optional[bool] = None,
        gemm_kernel: bool = False,
        gemm_tiles: Optional[dict] = None,
        gelu_epilogue: Optional[bool] = None,
        fuse_step_ends: bool = True,
    ):
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
        self.nemo_unmasked = bool(nemo_unmasked_padded_keys)
        is_cuda = self.device.type == "cuda"
        if attn_impl == "auto":
            half = is_cuda and dtype in (torch.float16, torch.bfloat16)
            attn_impl = "flash" if half and _flash_works(self.device, dtype) else ("sdpa" if is_cuda else "math")
        if attn_impl not in ("flash", "sdpa", "math", "triton"):
            raise ValueError(f"attn_impl must be auto, flash, sdpa, math or triton, got {attn_impl!r}")
        if kv_cache_dtype not in (None, dtype, torch.float8_e4m3fn):
            raise ValueError(f"kv_cache_dtype must be None, the model dtype or torch.float8_e4m3fn, "
                             f"got {kv_cache_dtype}")
        self.kv_fp8 = kv_cache_dtype == torch.float8_e4m3fn
        keys_per_split = (64 if self.kv_fp8 else 32) if keys_per_split is None else keys_per_split
        attn_block_n = (64 if self.kv_fp8 else 32) if attn_block_n is None else attn_block_n
        attn_num_warps = 1 if attn_num_warps is None else attn_num_warps
        if attn_impl == "triton":
            pow2 = lambda n: n >= 1 and not n & (n - 1)  # noqa: E731 - Triton tiles are powers of two
            if not (pow2(keys_per_split) and pow2(attn_block_n) and attn_num_warps in (1, 2, 4, 8, 16)):
                raise ValueError(
                    f"triton attention tiles: keys_per_split ({keys_per_split}) and attn_block_n ({attn_block_n}) must "
                    f"be powers of two (tiles of min(attn_block_n, keys_per_split) keys), attn_num_warps "
                    f"({attn_num_warps}) one of 1, 2, 4, 8, 16")
            if not kernels.usable(self.device):
                raise ValueError("attn_impl='triton' needs CUDA and triton (or, on the CPU, TRITON_INTERPRET=1)")
            if d.sa_d_head & (d.sa_d_head - 1):
                raise ValueError("attn_impl='triton' needs a power-of-two head size")
        self.keys_per_split = int(keys_per_split)
        self.fused_kv_write = bool(fused_kv_write)
        self.attn_block_n, self.attn_num_warps = int(attn_block_n), int(attn_num_warps)
        self.attn_num_stages = attn_num_stages
        self.xattn_num_warps, self.xattn_d_chunk = int(xattn_num_warps), xattn_d_chunk
        self.fuse_layer_tails = bool(fuse_layer_tails)
        self.fuse_step_ends = bool(fuse_step_ends)
        if attn_impl == "flash" and not (is_cuda and dtype in (torch.float16, torch.bfloat16)):
            raise ValueError("attn_impl='flash' needs CUDA and fp16/bf16")
        self.attn_impl = attn_impl
        self.cuda_graphs = is_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not is_cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        self.skip_uncond_xattn = bool(skip_uncond_xattn)
        self.share_uncond_prefix = bool(share_uncond_prefix) and attn_impl == "triton"
        use_k = lambda v: attn_impl == "triton" if v is None else bool(v)  # noqa: E731
        self.xattn_kernel, self.topk_kernel = use_k(xattn_kernel), use_k(topk_kernel)
        if (self.xattn_kernel or self.topk_kernel) and not kernels.usable(self.device):
            raise ValueError("xattn_kernel / topk_kernel need CUDA and triton (or, on the CPU, TRITON_INTERPRET=1)")
        if self.xattn_kernel and d.xa_head_dim & (d.xa_head_dim - 1):
            raise ValueError(f"xattn_kernel needs a power-of-two cross-attention head size, got {d.xa_head_dim}")
        if self.kv_fp8 and not (attn_impl == "triton" and self.fused_kv_write):
            raise ValueError(f"kv_cache_dtype=float8_e4m3fn needs attn_impl='triton' with fused_kv_write=True (the "
                             f"kernel quantizes what it writes), got attn_impl={attn_impl!r}, "
                             f"fused_kv_write={self.fused_kv_write}")
        if kv_head_major is None:
            kv_head_major = attn_impl == "triton" and self.fused_kv_write
        self.kv_head_major = bool(kv_head_major)
        if self.kv_head_major and not (attn_impl == "triton" and self.fused_kv_write):
            raise ValueError(f"kv_head_major needs attn_impl='triton' with fused_kv_write=True (the other paths view "
                             f"the cache as (rows * L, H, Dh)), got attn_impl={attn_impl!r}, "
                             f"fused_kv_write={self.fused_kv_write}")
        self.gemm_kernel = bool(gemm_kernel)
        if self.gemm_kernel and not (self.xattn_kernel and kernels.usable(self.device)):
            raise ValueError("gemm_kernel needs xattn_kernel and CUDA with triton (or, on the CPU, TRITON_INTERPRET=1)")
        self._gemm_tiles = dict(self.GEMM_TILES, **(gemm_tiles or {})) if self.gemm_kernel else None
        self.gelu_epilogue = (is_cuda and self.xattn_kernel) if gelu_epilogue is None else bool(gelu_epilogue)
        if self.gelu_epilogue and not (self.xattn_kernel and is_cuda):
            raise ValueError("gelu_epilogue needs CUDA and xattn_kernel (on the CPU torch._addmm_activation applies "
                             "the erf GELU, not the model's tanh one)")
        self.bucket = max(1, int(bucket))
        self.sync_every = max(1, int(sync_every))
        # Static self-attention KV cache. flash: (rows, L, H, Dh) so that the rows pack into (rows * L, H, Dh);
        # sdpa / math: (rows, H, L, Dh) so that [:, :, :L_bucket] keeps (rows * H) one batch stride.
        H, Dh = d.sa_n_heads, d.sa_d_head
        self.flat_cache = attn_impl in ("flash", "triton")
        shape = (self.max_rows, max_len, H, Dh) if self.flat_cache else (self.max_rows, H, max_len, Dh)
        cdt = torch.float8_e4m3fn if self.kv_fp8 else dtype
        if self.kv_head_major:  # (rows, H, L, Dh) storage seen as (rows, L, H, Dh)
            hm = (self.max_rows, H, max_len, Dh)
            self.k_cache = [torch.zeros(hm, device=self.device, dtype=cdt).transpose(1, 2) for _ in range(d.n_layers)]
            self.v_cache = [torch.zeros(hm, device=self.device, dtype=cdt).transpose(1, 2) for _ in range(d.n_layers)]
        else:
            self.k_cache = [torch.zeros(shape, device=self.device, dtype=cdt) for _ in range(d.n_layers)]
            self.v_cache = [torch.zeros(shape, device=self.device, dtype=cdt) for _ in range(d.n_layers)]
        # float8 cache: the biased exponent of each (row, head, position)'s power-of-two scale (kernels.fp8_quantize)
        e_shape = (self.max_rows, H, max_len)
        self.k_exp = [torch.zeros(e_shape, device=self.device, dtype=torch.uint8) for _ in range(d.n_layers)] \
            if self.kv_fp8 else None
        self.v_exp = [torch.zeros(e_shape, device=self.device, dtype=torch.uint8) for _ in range(d.n_layers)] \
            if self.kv_fp8 else None
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
        w1 = self._layer_w[0]["w1"]  # None for a kernel-3 FFN (every layer alike): no epilogue, no bias
        self._gelu_bias = torch.zeros(w1.shape[0], device=self.device, dtype=dtype) \
            if self.gelu_epilogue and w1 is not None else None
        no = m.decoder.norm_out
        self._head_w = (no.weight.detach() if isinstance(no, torch.nn.LayerNorm) else None,
                        getattr(no, "eps", 0.0), m.final_proj.weight.detach(),
                        m.final_proj.bias.detach() if m.final_proj.bias is not None else None)
        self.compile = bool(compile) and is_cuda
        self.compile_mode = compile_mode
        if self.compile:
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        mode = self.compile_mode
        self._fn_pre = _MaybeCompiled(_f_pre, self.compile, mode)
        self._fn_post = _MaybeCompiled(_f_post, self.compile, mode)
        self._fn_xq = _MaybeCompiled(_f_xq, self.compile, mode)  # the two halves around xattn_kernel
        self._fn_xo_ffn = _MaybeCompiled(_f_xo_ffn, self.compile, mode)
        self._fn_head = _MaybeCompiled(_f_head, self.compile, mode)
        self._fn_embed = _MaybeCompiled(_f_embed, self.compile, mode)
        self._fn_post_a = _MaybeCompiled(self._post_a, self.compile)  # no GEMMs: the default mode
        self._fn_post_b = _MaybeCompiled(self._post_b, self.compile)

    @property
    def compile_errors(self) -> dict:
        fns = dict(embed=self._fn_embed, pre=self._fn_pre, post=self._fn_post, xq=self._fn_xq, xo_ffn=self._fn_xo_ffn,
                   head=self._fn_head, post_a=self._fn_post_a, post_b=self._fn_post_b)
        return {k: f.error for k, f in fns.items() if f.error}

    # ------------------------------------------------------------------------------------------------------
    # buffers
    # ------------------------------------------------------------------------------------------------------

    def _work(self, B: int, rows: int, T_text: int, max_steps: int) -> _Work:
        key = (B, rows, T_text)
        w = self._works.get(key)
        if w is not None and w.out_codes.shape[2] >= max_steps * self.config.frame_stacking_factor:
            return w
        c, d, dev = self.config, self.config.decoder, self.device
        C, S, V = c.num_audio_codebooks, c.frame_stacking_factor, c.num_all_tokens_per_codebook
        Hx, dhx = d.xa_n_heads, d.xa_head_dim
        z = lambda *s, dt=self.dtype: torch.zeros(*s, device=dev, dtype=dt)  # noqa: E731
        L = torch.long
        w = _Work(
            B=B, rows=rows, T_text=T_text,
            mem_k=[z(rows, Hx, T_text, dhx) for _ in range(d.n_layers)],
            mem_v=[z(rows, Hx, T_text, dhx) for _ in range(d.n_layers)],
            cond_mask=z(rows, T_text, dt=torch.bool),
            ff_in=[z(rows, self.max_len, d.d_model) if d.kernel_size > 1 else None for _ in range(d.n_layers)],
            ff_hidden=[z(rows, self.max_len, d.d_ffn) if d.kernel_size > 1 else None for _ in range(d.n_layers)],
            kv_len=z(rows, dt=L), pos=z(1, dt=L), step=z(1, dt=L), codes_in=z(B, C, S, dt=L),
            out_codes=z(B, C, S * max_steps, dt=L), text_lens=z(B, dt=L), prior=z(rows, T_text, dt=torch.float32),
            last=z(B, dt=L), counters=z(B, T_text + 1, dt=L), fin_present=z(B, dt=torch.bool), fin_count=z(B, dt=L),
            unfinished=z(B, dt=torch.bool), end_idx=z(B, dt=L), ended=z(B, dt=torch.bool), done_step=z(1, dt=L),
            attended=z(max_steps, B, dt=L), noise=z(2 * S * C, B, V, dt=torch.float32),
            cond_neg=z(rows, 1, 1, T_text, dt=torch.bool), row_base=torch.arange(rows, device=dev) * self.max_len,
            cu_q=torch.arange(rows + 1, device=dev, dtype=torch.int32),
            cu_k=torch.arange(rows + 1, device=dev, dtype=torch.int32) * self.max_len,
            pre_len=z(rows, dt=torch.int32),
        )
        self._works[key] = w
        return w

    # ------------------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, torch.Tensor],
        use_cfg: bool = False,
        keep_logits: bool = False,
        forced_codes: Optional[torch.Tensor] = None,
        run_all_steps: bool = False,
        **params: Any,
    ) -> InferOutput:
        """``infer_batch(batch, use_cfg, use_kv_cache=True, **params)`` on the fast path.

        Returns an ``InferOutput`` with predicted_codes, predicted_codes_lens, num_steps, attended_text_positions
        (per prior step) and, with keep_logits, step_logits (CFG-combined, float32). run_all_steps: decode
        max_decoder_steps frames even when every item ended (benchmarks); the outputs are still truncated where
        the reference stops.
        """
        c = self.config
        p = resolve_parameters(c.inference, **params)
        check_parameters(p, c)
        validate_batch(batch, c, require_audio=False)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        C, S = c.num_audio_codebooks, c.frame_stacking_factor
        B = batch["text"].shape[0]
        if B > self.max_batch:
            raise ValueError(f"batch of {B} requests > max_batch {self.max_batch}")
        rows = 2 * B if use_cfg else B
        max_steps = p.max_decoder_steps // S
        T_ctx = int(batch["context_audio_codes_lens"].max()) + 2  # BOS + EOS specials around the context
        if T_ctx + 1 + max_steps > self.max_len:
            raise ValueError(f"context {T_ctx} + 1 + {max_steps} steps > max_len {self.max_len}")
        if forced_codes is not None and forced_codes.shape[2] < max_steps * S:
            raise InferenceError(f"forced_codes has {forced_codes.shape[2]} frames; {max_steps * S} are needed")
        T_text = batch["text"].shape[1]
        w = self._work(B, rows, T_text, max_steps)
        if keep_logits and (w.logits_buf is None or w.logits_buf.shape[0] < max_steps):
            w.logits_buf = torch.zeros(max_steps, B, C * c.num_all_tokens_per_codebook * S, device=self.device)
        if forced_codes is not None:
            if w.forced is None or w.forced.shape[2] < forced_codes.shape[2]:
                w.forced = torch.zeros(B, C, forced_codes.shape[2], dtype=torch.long, device=self.device)
            w.forced[:, :, : forced_codes.shape[2]].copy_(forced_codes)
        self._prefill(w, batch, use_cfg, p)
        opts = (keep_logits, forced_codes is not None)
        self._post(w, self._prefill_out, 0, p, opts)  # step 0's sampling and prior, on the device
        host_done = False
        n = 1
        for idx in range(1, max_steps):
            if not run_all_steps and idx % self.sync_every == 0 and int(w.done_step) < BIG:
                host_done = True
                break
            self._decode(w, idx, T_ctx, p, opts)
            n = idx + 1
        return self._finish(w, p, max_steps, n, keep_logits, host_done)

    # ------------------------------------------------------------------------------------------------------
    # step 0: the reference's own forward_cached, writing into the static buffers
    # ------------------------------------------------------------------------------------------------------

    def _prefill(self, w: _Work, batch, use_cfg: bool, p) -> None:
        m, c = self.model, self.config
        d = c.decoder
        B, rows, S = w.B, w.rows, c.frame_stacking_factor
        dev = self.device
        text_lens = batch["text_lens"]
        enc = m.encode_text(batch["text"], text_lens)
        ctx_emb, ctx_mask = m.context_embedding(batch["context_audio_codes"], batch["context_audio_codes_lens"])
        cond, cond_mask = enc.output, enc.mask
        if use_cfg:
            cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask)
        T_ctx = ctx_mask.shape[1]
        # reset the state (in place: graphs hold these addresses)
        w.cond_mask.copy_(cond_mask)
        w.cond_neg.copy_(~cond_mask[:, None, None, :])
        w.text_lens.copy_(text_lens)
        w.prior.fill_(p.attention_prior_epsilon)
        w.last.fill_(1)
        w.counters.zero_()
        w.fin_present.zero_()
        w.fin_count.zero_()
        w.unfinished.zero_()
        w.end_idx.fill_(BIG)
        w.ended.zero_()
        w.done_step.fill_(BIG)
        w.attended.zero_()
        w.step.zero_()
        kv = []
        ff = []
        memory_kv = []
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
            if self.nemo_unmasked:
                return
            for j in range(bos_emb.shape[1]):
                if self.flat_cache:
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
            pre_k = [c[:rows] for c in self.k_cache]
            pre_v = [c[:rows] for c in self.v_cache]
        for i, layer in enumerate(m.decoder.layers):
            mk, mv = layer.memory_kv(cond)
            w.mem_k[i].copy_(mk)
            w.mem_v[i].copy_(mv)
            memory_kv.append((w.mem_k[i], w.mem_v[i]))
            if self.kv_fp8:  # flat cache: (rows, H, T_new, Dh) views, what the reference's LayerKVCache expects
                kv.append(_StagedKV(pre_k[i].transpose(1, 2), pre_v[i].transpose(1, 2), pending,
                                    lambda i=i: flush(i)))
            elif self.flat_cache:  # (rows, H, L, Dh) views, what the reference's LayerKVCache expects
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
        dec = m.decoder.forward_cached(x, x_mask, state, key_mask, cond_mask, None, probs_out=probs)
        logits = m.final_proj(dec[:, -1:])[:, 0]
        scores = self._scores([pr[:, :, -1:] for pr in probs], p)
        # Compact the keys (compact(); float8: done per layer by its flush, the last one's here)
        while pending:
            pending.pop()()
        if not self.kv_fp8:
            for i in range(d.n_layers):
                compact(pre_k[i])
                compact(pre_v[i])
        if self.nemo_unmasked:
            w.kv_len.fill_(T_new)
        else:
            w.kv_len.copy_(ctx_len + bos_emb.shape[1])
        # CFG's unconditional rows: the same inputs up to and including BOS (zero context, all positions valid),
        # hence the same T_new keys in every layer; the triton kernel reads them from row B
        w.pre_len.zero_()
        if use_cfg and self.share_uncond_prefix:
            w.pre_len[B:] = T_new
        w.pos.fill_(T_new)
        self._prefill_out = (logits, scores)

    # ------------------------------------------------------------------------------------------------------
    # one decode step (idx >= 1): graph-capturable, no host syncs
    # ------------------------------------------------------------------------------------------------------

    def _flags(self, idx: int, p) -> tuple:
        prior_in = p.apply_attention_prior and idx >= 1 and idx - 1 >= p.start_prior_after_n_audio_steps
        update = p.apply_attention_prior and idx >= p.start_prior_after_n_audio_steps
        forbid_eos = idx * self.config.frame_stacking_factor < p.min_generated_frames
        return bool(prior_in), bool(update), bool(forbid_eos)

    def _bucket_len(self, w: _Work, T_ctx: int, idx: int) -> int:
        if self.attn_impl == "flash":
            return self.max_len
        need = T_ctx + 1 + idx  # keys after this step's write (upper bound over rows)
        return min(self.max_len, -(-need // self.bucket) * self.bucket)

    def _decode(self, w: _Work, idx: int, T_ctx: int, p, opts) -> None:
        flags = self._flags(idx, p)
        Lb = self._bucket_len(w, T_ctx, idx)
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
        prior_in, _, _ = flags
        rows, B = w.rows, w.B
        C, S = c.num_audio_codebooks, c.frame_stacking_factor
        # the new frame, its positions and CFG rows; with fuse_step_ends one compiled function that also computes
        # the key counts and the first layer's norm + qkv
        lw0 = self._layer_w[0]
        pos_emb = m.decoder.position_embeddings
        pre = (lw0["ln_sa"], lw0["eps_sa"], lw0["qkv"]) if self.fuse_step_ends else ()
        x, new_len, new_len32, qkv = self._fn_embed(w.codes_in, self.emb_offsets, self.emb_table, C * S, rows != B,
                                                    None if pos_emb is None else pos_emb.weight, w.pos, self.dtype,
                                                    w.kv_len, *pre)
        layer_prior = p.apply_prior_to_layers
        est = p.estimate_alignment_from_layers
        # per-step attention indices, once for all layers
        if self.flat_cache:
            # the flat cache index of the new key: only the separate cache writes use it (the fused triton write
            # stores at lens - 1 itself)
            fused = self.attn_impl == "triton" and self.fused_kv_write
            actx = (None if fused else w.kv_len + w.row_base, new_len32)
        else:
            H, Dh = c.decoder.sa_n_heads, c.decoder.sa_d_head
            actx = (w.kv_len.view(rows, 1, 1, 1).expand(rows, H, 1, Dh),
                    torch.arange(Lb, device=x.device)[None, :] < new_len[:, None])  # (rows, Lb)
        probs = []
        nc = B if self.skip_uncond_xattn else rows  # rows that attend the memory (module docstring)
        n_layers = len(m.decoder.layers)
        logits = None
        for i, layer in enumerate(m.decoder.layers):
            lw = self._layer_w[i]
            if qkv is None:  # else the previous layer's compiled tail computed it
                qkv = self._fn_pre(x, lw["ln_sa"], lw["eps_sa"], lw["qkv"])
            y_sa = self._self_attention(i, layer, qkv, w, actx, Lb)
            qkv = None
            use_prior = prior_in and (layer_prior is None or i in layer_prior)
            need = est is None or i in est
            xa = layer.cross_attention
            k1 = lw["w1"] is not None
            prior = w.prior[:nc] if use_prior else None
            if self.xattn_kernel:
                x, q = self._fn_xq(x, y_sa, lw["w_o"], lw["ln_xq"], lw["eps_xq"], lw["w_q"], nc, self._gemm_tiles)
                y, prob = kernels.cross_attention(q.view(nc, -1), w.mem_k[i][:nc], w.mem_v[i][:nc], w.cond_mask[:nc],
                                                  prior, xa.scale, self.xattn_num_warps, self.xattn_d_chunk)
                if k1 and self.fuse_layer_tails:  # the layer's tail + the next layer's norm and qkv (or the head)
                    x, proj = self._fn_xo_ffn(x, y.view(nc, 1, -1), lw["w_xo"], lw["ln_ff"], lw["eps_ff"], lw["w1"],
                                              lw["w2"], True, *self._after_layer(i), tiles=self._gemm_tiles,
                                              gelu_bias=self._gelu_bias)
                    if i + 1 < n_layers:
                        qkv = proj
                    else:
                        logits = proj[:, 0]
                else:
                    x = self._fn_xo_ffn(x, y.view(nc, 1, -1), lw["w_xo"], lw["ln_ff"], lw["eps_ff"], lw["w1"], lw["w2"],
                                        k1, tiles=self._gemm_tiles, gelu_bias=self._gelu_bias)
                if need:  # (nc, 1, T_text), as the torch path's; one head: a view, not a reduction kernel
                    prob = prob if prob.shape[1] == 1 else prob.mean(dim=1, keepdim=True)
            else:
                x, prob = self._fn_post(x, y_sa, lw["w_o"], lw["ln_xq"], lw["eps_xq"], lw["w_q"], w.mem_k[i][:nc],
                                        w.mem_v[i][:nc], w.cond_neg[:nc], prior, lw["w_xo"], lw["ln_ff"],
                                        lw["eps_ff"], lw["w1"], lw["w2"], xa.scale, xa.n_heads, xa.d_head, need, k1,
                                        nc)
            if need:
                probs.append(prob)
            if not k1:
                x = x + self._ffn(i, layer, x, w)
        if logits is None:
            logits = self._fn_head(x, *self._head_w)
        self._post(w, (logits, probs), None, p, opts, flags=flags, advance=True)

    def _after_layer(self, i: int) -> tuple:
        """(norm weight or None, eps, projection weight, bias or None) of what follows decoder layer i: the next
        layer's norm_self + qkv_net, or after the last layer norm_out + final_proj."""
        if i + 1 < len(self._layer_w):
            nw = self._layer_w[i + 1]
            return nw["ln_sa"], nw["eps_sa"], nw["qkv"], None
        return self._head_w

    def _self_attention(self, i, layer, qkv, w: _Work, actx, Lb: int):
        """Cache write of the new key/value and attention over each row's keys -> (rows, 1, H*Dh) (before o_net)."""
        sa = layer.self_attention
        rows = w.rows
        H, Dh = sa.n_heads, sa.d_head
        qkv = qkv.reshape(rows, 3, H, Dh)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (rows, H, Dh)
        K, Vc = self.k_cache[i], self.v_cache[i]
        if self.flat_cache:
            flat, seq = actx
            L = self.max_len
            if self.attn_impl == "triton" and self.fused_kv_write:
                shared = self.share_uncond_prefix and rows > w.B
                fp8 = dict(k_exp=self.k_exp[i][:rows], v_exp=self.v_exp[i][:rows]) if self.kv_fp8 else {}
                y = kernels.decode_attention(q, K[:rows], Vc[:rows], seq, sa.scale, self.keys_per_split,
                                             self.attn_block_n, max_keys=Lb, k_new=k, v_new=v,
                                             num_warps=self.attn_num_warps, prefix_len=w.pre_len if shared else None,
                                             prefix_row=w.B, num_stages=self.attn_num_stages, **fp8)
                return y.reshape(rows, 1, H * Dh)
            Kf, Vf = K[:rows].view(rows * L, H, Dh), Vc[:rows].view(rows * L, H, Dh)
            Kf.index_copy_(0, flat, k)
            Vf.index_copy_(0, flat, v)
            if self.attn_impl == "triton":
                shared = self.share_uncond_prefix and rows > w.B
                y = kernels.decode_attention(q, K[:rows], Vc[:rows], seq, sa.scale, self.keys_per_split,
                                             self.attn_block_n, max_keys=Lb, num_warps=self.attn_num_warps,
                                             prefix_len=w.pre_len if shared else None, prefix_row=w.B,
                                             num_stages=self.attn_num_stages)
            else:
                y = torch.ops.aten._flash_attention_forward(
                    q.contiguous(), Kf, Vf, w.cu_q, w.cu_k, 1, L, 0.0, False, False, scale=sa.scale, seqused_k=seq,
                )[0]  # (rows, H, Dh)
            return y.reshape(rows, 1, H * Dh)
        index, valid = actx
        K[:rows].scatter_(2, index, k.unsqueeze(2))
        Vc[:rows].scatter_(2, index, v.unsqueeze(2))
        Kb, Vb = K[:rows, :, :Lb], Vc[:rows, :, :Lb]
        q = q.unsqueeze(2)  # (rows, H, 1, Dh)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, Kb, Vb, attn_mask=valid[:, None, None, :], scale=sa.scale)
        else:  # the reference's _attend, op for op
            score = torch.matmul(q, Kb.transpose(2, 3)) * sa.scale
            score = score.masked_fill(~valid[:, None, None, :], float("-inf"))
            y = torch.matmul(F.softmax(score, dim=-1), Vb)
        return y.transpose(1, 2).reshape(rows, 1, H * Dh)

    def _ffn(self, i, layer, x, w: _Work):
        ff = layer.pos_ff
        h = layer.norm_pos_ff(x)
        k = ff.proj.kernel_size
        if k == 1:
            a = F.gelu(F.linear(h, ff.proj.conv.weight[:, :, 0]), approximate="tanh")
            return F.linear(a, ff.o_net.conv.weight[:, :, 0])
        # causal conv over the last k positions (the reference's _forward_cached with the static history)
        win = w.pos + torch.arange(-(k - 1), 1, device=x.device)  # (k,) absolute positions
        w.ff_in[i].index_copy_(1, w.pos, h)
        a = F.gelu(F.conv1d(w.ff_in[i].index_select(1, win).transpose(1, 2), ff.proj.conv.weight), approximate="tanh")
        w.ff_hidden[i].index_copy_(1, w.pos, a.transpose(1, 2))
        y = F.conv1d(w.ff_hidden[i].index_select(1, win).transpose(1, 2), ff.o_net.conv.weight)
        return y.transpose(1, 2)

    # ------------------------------------------------------------------------------------------------------
    # CFG, prior state machine, sampling, EOS: device tensors only
    # ------------------------------------------------------------------------------------------------------

    def _scores(self, probs: list, p) -> torch.Tensor:
        est = p.estimate_alignment_from_layers
        per_layer = [pr.mean(dim=1) for i, pr in enumerate(probs) if est is None or i in est]
        return torch.stack(per_layer, dim=1).mean(dim=1)[:, -1, :]

    def _post(self, w: _Work, out, idx0: Optional[int], p, opts, flags: Optional[tuple] = None,
              advance: bool = False) -> None:
        keep_logits, forced = opts
        if flags is None:
            flags = self._flags(idx0, p)
        _, update, forbid_eos = flags
        logits, scores = out
        if advance and not self.fuse_step_ends:  # else inside the compiled sampler
            scores, advance = self._end_of_step(w, scores, True), False
        lg = self._fn_post_a(w, logits, scores, p, keep_logits, update, forbid_eos, advance)
        # the top-k threshold: the k-th largest logit of each (item, codebook), the same float either way
        kth = kernels.topk_threshold(lg, p.topk) if self.topk_kernel else None
        # torch.multinomial(probs, 1) is argmax(probs / Exp(1)); the reference draws (B, V) per codebook for the
        # sampled pass, then again for its argmax pass: one (2*S*C, B, V) draw is the same stream on the CPU.
        # outside any compiled function: the eager RNG stream. On CUDA only the sampled pass's half: the argmax pass
        # draws nothing here, and CUDA's stream differs from the reference's per-codebook draws anyway
        if self.device.type == "cuda":
            c = self.config
            w.noise[: c.frame_stacking_factor * c.num_audio_codebooks].exponential_()
        else:
            w.noise.exponential_()
        self._fn_post_b(w, lg, kth, p, forced)

    @staticmethod
    def _end_of_step(w: _Work, scores, advance: bool):
        """A decode step's end: with ``advance`` the key count and position move on by one; scores given per layer
        ((rows', 1, T_text) each) are averaged over the layers -> (rows', T_text)."""
        if advance:
            w.kv_len.add_(1)
            w.pos.add_(1)
        if isinstance(scores, (list, tuple)):
            scores = torch.stack(scores, dim=1).mean(dim=1)[:, -1, :]
        return scores

    def _post_a(self, w: _Work, logits, scores, p, keep_logits: bool, update: bool, forbid_eos: bool,
                advance: bool = False):
        """CFG combine, logits record, prior state machine, special-token masks -> (B, S*C, V) float32 logits.
        scores: the alignment scores, or (fuse_step_ends) the estimating layers' probabilities, averaged here;
        advance: the decode step's key count and position move on by one."""
        c = self.config
        B, S, C, V = w.B, c.frame_stacking_factor, c.num_audio_codebooks, c.num_all_tokens_per_codebook
        logits = logits.float()
        if w.rows != B:
            logits = (1 - p.cfg_scale) * logits[B:] + p.cfg_scale * logits[:B]
        if keep_logits:
            w.logits_buf.index_copy_(0, w.step, logits.unsqueeze(0))
        scores = self._end_of_step(w, scores, advance)
        if update:
            self._prior_update(w, scores.float(), p)
        lg = logits.view(B, S * C, V)  # j = s*C + c, NeMo's layout (c + C*s) * V
        if not p.ignore_finished_sentence_tracking:
            eos = c.audio_eos_id
            finished = w.fin_present & (w.fin_count >= 20)
            lg = lg.clone()
            lg[:, :, eos] = lg[:, :, eos].masked_fill(w.unfinished[:, None], float("-inf"))
            fin = finished[:, None, None]
            lg = torch.where(fin, torch.where(self.only_eos, 0.0, float("-inf")), lg)
        return lg.masked_fill(self.forbid_all if forbid_eos else self.forbid_no_eos, float("-inf"))

    def _post_b(self, w: _Work, lg, kth: Optional[torch.Tensor], p, forced: bool) -> None:
        """Top-k (kth: the k-th largest logit per row, if already known), temperature, the draw, the argmax pass,
        EOS bookkeeping, next input."""
        c = self.config
        B, S, C = w.B, c.frame_stacking_factor, c.num_audio_codebooks
        step = w.step
        eos = c.audio_eos_id
        if kth is None:
            kth = torch.topk(lg, p.topk, dim=-1)[0][..., -1:]
        lg_k = lg.masked_fill(lg < kth, float("-inf"))
        probs = torch.softmax(lg_k / p.temperature, dim=-1)  # (B, S*C, V)
        sampled = (probs / w.noise[: S * C].transpose(0, 1)).argmax(dim=-1)  # (B, S*C)
        top1 = lg.argmax(dim=-1)  # the argmax pass (temperature 0.01, top-1)
        sampled = sampled.view(B, S, C).transpose(1, 2)  # (B, C, S)
        top1 = top1.view(B, S, C).transpose(1, 2)
        # EOS bookkeeping
        method, detection = EOS_METHODS[p.eos_detection_method]
        frames = torch.arange(S, device=lg.device)

        def first_eos(codes):
            hit = codes == eos
            if detection == "any":
                per_frame = hit.any(dim=1)
            elif detection == "all":
                per_frame = hit.all(dim=1)
            else:  # zero_cb
                per_frame = hit[:, 0]
            return torch.where(per_frame, frames, BIG).min(dim=1).values

        e = first_eos(top1)
        if method == "argmax_or_multinomial":
            e = torch.minimum(e, first_eos(sampled))
        new_end = (~w.ended) & (e < BIG)
        w.end_idx.copy_(torch.where(new_end, step * S + e, w.end_idx))
        w.ended.logical_or_(new_end)
        done = w.ended.all() & (step + 1 >= 4)  # MIN_FRAMES_FOR_CODEC
        w.done_step.copy_(torch.where(done & (w.done_step == BIG), step, w.done_step))
        nxt = sampled
        frame_ids = step * S + frames
        if forced:
            nxt = w.forced.index_select(2, frame_ids)
        w.out_codes.index_copy_(2, frame_ids, nxt)
        w.codes_in.copy_(nxt)
        w.step.add_(1)

    def _prior_update(self, w: _Work, scores: torch.Tensor, p) -> None:
        """PriorState.most_attended + build_prior as tensor ops (see reference/inference.py)."""
        B, T = w.B, w.T_text
        scores = scores[:B]
        n = w.text_lens
        L = p.attention_prior_lookahead_window
        eps = p.attention_prior_epsilon
        ar = torch.arange(T, device=scores.device)
        last = w.last + (w.counters.gather(1, w.last[:, None])[:, 0] >= 8).long()  # attention sink: move on
        end = torch.minimum(last + L, n - 3)
        end = torch.where(end < 0, (end + T).clamp(min=0), end)  # Python slice semantics of scores[b, a:end]
        inwin = (ar[None] >= last[:, None]) & (ar[None] < end[:, None])
        t = scores.masked_fill(~inwin, float("-inf")).argmax(dim=1)
        t = torch.where(end > last, t, n - 1)
        w.attended.index_copy_(0, w.step, t[None])
        w.counters.scatter_add_(1, t[:, None], torch.ones_like(t[:, None]))
        w.last.copy_(t)
        # the prior for the next step
        ones = (ar[None] == torch.clamp(t - 1, min=1)[:, None]) | (
            (ar[None] >= t[:, None]) & (ar[None] <= torch.minimum(t + L, n - 1)[:, None]))
        ones = ones | (n[:, None] <= 5)
        stuck = torch.where(w.counters[:, :T] >= 10, ar[None], -1).max(dim=1).values  # last stuck position
        ones = ones & (ar[None] > stuck[:, None])
        w.prior[:B].copy_(torch.where(ones, 1.0, eps))
        w.unfinished.copy_((t < n - 3) & ~w.ended)
        w.fin_present.logical_or_((t >= n - 2) | w.ended)
        w.fin_count.add_(w.fin_present.long())
        w.unfinished.logical_and_(~(w.fin_present & (w.fin_count > 5)))

    # ------------------------------------------------------------------------------------------------------

    def _finish(self, w: _Work, p, max_steps: int, n: int, keep_logits: bool, host_done: bool) -> InferOutput:
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


def floor_bytes(model, rows: int, mean_keys: float, dtype_bytes: int, T_text: int,
                kv_bytes: Optional[float] = None) -> dict:
    """Bytes one decode step must move at least: every decoder weight and final_proj read once, each row's
    self-attention K and V at the mean length read once per layer, the cross-attention K/V read once.
    kv_bytes: bytes per cached self-attention element (default dtype_bytes; the float8 cache: 1 + 1/d_head, its
    values and one scale exponent per head vector)."""
    d = model.config.decoder
    weights = sum(p.numel() for n, p in model.decoder.named_parameters() if "position_embeddings" not in n)
    weights += model.final_proj.weight.numel()
    kv = d.n_layers * rows * mean_keys * 2 * d.d_model
    xkv = d.n_layers * rows * T_text * 2 * d.xa_n_heads * d.xa_head_dim
    kvb = dtype_bytes if kv_bytes is None else kv_bytes
    return {"weights": weights * dtype_bytes, "kv": kv * kvb, "xkv": xkv * dtype_bytes,
            "total": (weights + xkv) * dtype_bytes + kv * kvb}
