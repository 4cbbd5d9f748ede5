"""Triton kernels of the fast decode step (fastpath/decoder.py).

Each kernel has a plain-PyTorch statement of what it computes in its docstring and a test against that statement
(tests/fastpath/test_kernels.py). On a CUDA device they compile with Triton; on the CPU they run under Triton's
interpreter when ``TRITON_INTERPRET=1`` is set before the first call (that is how CI checks them: slow, exact
semantics, no GPU). Kernels are built on first use, so importing this module needs no Triton.

* :func:`decode_attention` -- split-KV ("flash-decoding") self-attention for one query per row over the compacted
  ``(rows, L, H, Dh)`` cache, optionally writing this step's key/value itself, optionally reading each row's first
  ``prefix_len[r]`` keys from one shared row (CFG's unconditional rows all start with the same prefix).
* :func:`cross_attention` -- one query per row against the text memory: masked softmax, the attention prior
  (multiply and renormalise), the weighted sum of values; returns the probabilities too.
* :func:`topk_threshold` -- the k-th largest value of each row (``torch.topk(x, k).values[..., -1]``), found by a
  bitwise search over the floats' order-preserving integer images instead of a sort.
* :func:`fp8_quantize` / :func:`fp8_dequantize` (plain PyTorch) -- the float8 K/V cache's format: e4m3 values with
  one power-of-two scale per (position, head); decode_attention reads it and writes new entries in it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

_BUILT: dict = {}

# float32's smallest normal, added to the prior as NeMo does (``prior + torch.finfo(torch.float32).tiny``)
_TINY = torch.finfo(torch.float32).tiny


def interpreted() -> bool:
    """Whether Triton runs in its interpreter (``TRITON_INTERPRET=1``): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(device: torch.device | str) -> bool:
    """Whether these kernels can run on ``device`` here (CUDA with Triton, or the interpreter on the CPU)."""
    dev = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return dev.type == "cuda" or (dev.type == "cpu" and interpreted())


def _kernels() -> dict:
    key = interpreted()
    if key in _BUILT:
        return _BUILT[key]
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # a missing optional backend: say which and why
        raise RuntimeError("the triton kernels of fastpath.kernels need the 'triton' package (CUDA builds of torch "
                           "ship it; on the CPU install it and set TRITON_INTERPRET=1)") from e

    @triton.jit
    def split_kernel(Q, K, V, LENS, MO, LO, OO, KN, VN, PRE, KE, VE, prefix_off, prefix_off_e, scale, stride_qr,
                     stride_kr, stride_kl, stride_kh, stride_nr, stride_er, stride_eh, H: tl.constexpr, D: tl.constexpr,
                     NSPLIT: tl.constexpr, KPS: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_NEW: tl.constexpr,
                     SHARED: tl.constexpr, I64: tl.constexpr, OUT_DIRECT: tl.constexpr, FP8: tl.constexpr,
                     NEW_APART: tl.constexpr):
        # SHARED: keys [0, pre) are read from the shared row, [pre, n) from row r's own. OUT_DIRECT (one split):
        # MO is the output, written normalised (no combine kernel). FP8: K/V hold float8 e4m3 values, KE/VE
        # (rows, H, L) uint8 the biased exponents of their per-(position, head) power-of-two scales. NEW_APART
        # (with WRITE_NEW; used for float8, where it is 18% faster -- the float8 kernel is bound by instruction issue,
        # the bf16 one by HBM, where it is 1-2% slower): the newest key's terms are added per key instead of by a
        # select on every element of every tile
        rh = tl.program_id(0)
        sp = tl.program_id(1)
        r = rh // H
        h = rh % H
        n = tl.load(LENS + r)
        start = sp * KPS
        end = tl.minimum(n, start + KPS)
        d = tl.arange(0, D)
        q = tl.load(Q + r * stride_qr + h * D + d).to(tl.float32)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        if I64:  # caches of >= 2**31 elements: 64-bit offsets (else 32-bit: cheaper per element)
            own = r.to(tl.int64) * stride_kr + h * stride_kh
            own_e = r.to(tl.int64) * stride_er + h * stride_eh
        else:
            own = r * stride_kr + h * stride_kh
            own_e = r * stride_er + h * stride_eh
        newest = n - 1
        if WRITE_NEW:
            # This step's key/value (position n - 1) come in KN/VN: the program whose split holds that position
            # stores them in the cache and uses them in place of the (not yet written) cache entry; no other
            # program reads that position, so no separate cache-write kernel is needed.
            k_new = tl.load(KN + r * stride_nr + h * D + d)
            v_new = tl.load(VN + r * stride_nr + h * D + d)
            if FP8:  # stored and used as the cache holds them: float8 values and their scales' exponents
                # bits of the power-of-two scale 2**(E - 7), E = floor(log2(max |x|)) (fp8_quantize): x / scale lies
                # in (-256, 256), inside e4m3's +-448, and the division is exact; an all-zero vector: 2**-126
                kb = tl.max(tl.abs(k_new.to(tl.float32)), axis=0).to(tl.int32, bitcast=True) & 0x7F800000
                vb = tl.max(tl.abs(v_new.to(tl.float32)), axis=0).to(tl.int32, bitcast=True) & 0x7F800000
                kb = tl.maximum(kb - (7 << 23), 1 << 23)
                vb = tl.maximum(vb - (7 << 23), 1 << 23)
                kx = k_new.to(tl.float32) * ((254 << 23) - kb).to(tl.float32, bitcast=True)  # x / scale, exact
                vx = v_new.to(tl.float32) * ((254 << 23) - vb).to(tl.float32, bitcast=True)
                # Rounded to e4m3 (nearest, ties to even) in float32 arithmetic, so that the conversion below is
                # exact: Triton 3.6's interpreter rounds e.g. 127 to 64 when the rounding carries into the exponent.
                # Normal e4m3 (|x| >= 2**-6): keep 3 of the 23 mantissa bits; subnormal: multiples of 2**-9, by
                # adding and removing 1.5 * 2**14 (whose float32 ulp is 2**-9), the sign kept from x.
                kx_b = kx.to(tl.int32, bitcast=True)
                vx_b = vx.to(tl.int32, bitcast=True)
                k_sub = ((tl.abs(kx) + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (kx_b & -0x80000000)
                v_sub = ((tl.abs(vx) + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (vx_b & -0x80000000)
                k_rn = tl.where(tl.abs(kx) >= 0.015625, (kx_b + 0x7FFFF + ((kx_b >> 20) & 1)) & -0x100000, k_sub)
                v_rn = tl.where(tl.abs(vx) >= 0.015625, (vx_b + 0x7FFFF + ((vx_b >> 20) & 1)) & -0x100000, v_sub)
                k_new = k_rn.to(tl.float32, bitcast=True).to(K.dtype.element_ty)
                v_new = v_rn.to(tl.float32, bitcast=True).to(V.dtype.element_ty)
            if NEW_APART:
                # the newest key's dot product once, here; in the loop its slot is not read, and its score and
                # weighted value are put in per key (no per-element select in every tile)
                s_new = tl.sum(k_new.to(tl.float32) * q, axis=0)
                v_new_f = v_new.to(tl.float32)
            if (newest >= start) & (newest < start + KPS):
                tl.store(K + own + newest * stride_kl + d, k_new)
                tl.store(V + own + newest * stride_kl + d, v_new)
                if FP8:
                    tl.store(KE + own_e + newest, (kb >> 23).to(tl.uint8))
                    tl.store(VE + own_e + newest, (vb >> 23).to(tl.uint8))
        if SHARED:
            pre = tl.load(PRE + r)
            shared = prefix_off + h * stride_kh  # prefix_off: the shared row's offset (host int)
            shared_e = prefix_off_e + h * stride_eh
        for j in range(0, KPS // BLOCK_N):  # static trip count; keys past the row's length are masked
            idx = start + j * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = idx < end
            if SHARED:
                # keys [0, pre) of this row are those of the shared row (the same inputs gave the same keys): all
                # rows that share them read one copy, which stays in L2
                off = tl.where(idx < pre, shared, own)[:, None] + idx[:, None] * stride_kl + d[None, :]
            else:
                off = own + idx[:, None] * stride_kl + d[None, :]
            if NEW_APART:
                ld = valid & (idx != newest)
            else:
                ld = valid
            k = tl.load(K + off, mask=ld[:, None], other=0.0).to(tl.float32)
            v = tl.load(V + off, mask=ld[:, None], other=0.0).to(tl.float32)
            if WRITE_NEW and not NEW_APART:
                is_new = (idx == newest)[:, None]
                k = tl.where(is_new, k_new.to(tl.float32)[None, :], k)
                v = tl.where(is_new, v_new.to(tl.float32)[None, :], v)
            s = tl.sum(k * q[None, :], axis=1)
            if NEW_APART:
                s = tl.where(idx == newest, s_new, s)
            if FP8:
                # each key's and value's scale 2**(e - 127), applied to its dot product / its softmax weight
                if SHARED:
                    off_e = tl.where(idx < pre, shared_e, own_e) + idx
                else:
                    off_e = own_e + idx
                ke = tl.load(KE + off_e, mask=valid, other=127).to(tl.int32)
                ve = tl.load(VE + off_e, mask=valid, other=127).to(tl.int32)
                if WRITE_NEW:
                    ke = tl.where(idx == newest, kb >> 23, ke)
                    ve = tl.where(idx == newest, vb >> 23, ve)
                s = s * (ke << 23).to(tl.float32, bitcast=True)
            s = tl.where(valid, s * scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a split with no keys: everything stays 0
            alpha = tl.exp(m_i - m_safe)
            pexp = tl.exp(s - m_safe)
            pv = pexp * (ve << 23).to(tl.float32, bitcast=True) if FP8 else pexp
            acc = acc * alpha + tl.sum(pv[:, None] * v, axis=0)
            if NEW_APART:
                acc += tl.sum(tl.where(idx == newest, pv, 0.0), axis=0) * v_new_f
            l_i = l_i * alpha + tl.sum(pexp, axis=0)
            m_i = m_new
        if OUT_DIRECT:
            tl.store(MO + rh * D + d, (acc / l_i).to(MO.dtype.element_ty))
        else:
            o = rh * NSPLIT + sp
            tl.store(MO + o, m_i)
            tl.store(LO + o, l_i)
            tl.store(OO + o * D + d, acc)

    @triton.jit
    def combine_kernel(MO, LO, OO, OUT, NSPLIT: tl.constexpr, NS_P2: tl.constexpr, D: tl.constexpr):
        rh = tl.program_id(0)
        s = tl.arange(0, NS_P2)
        sm = s < NSPLIT
        m = tl.load(MO + rh * NSPLIT + s, mask=sm, other=-float("inf"))
        l = tl.load(LO + rh * NSPLIT + s, mask=sm, other=0.0)
        mx = tl.max(m, axis=0)  # finite: split 0 holds >= 1 key
        wgt = tl.where(sm & (m > -float("inf")), tl.exp(m - mx), 0.0)
        d = tl.arange(0, D)
        acc = tl.load(OO + (rh * NSPLIT + s)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
        num = tl.sum(acc * wgt[:, None], axis=0)
        den = tl.sum(l * wgt, axis=0)
        tl.store(OUT + rh * D + d, (num / den).to(OUT.dtype.element_ty))

    @triton.jit
    def xattn_kernel(Q, K, V, VALID, PRIOR, OUT, PROB, T, scale, tiny, stride_qr, stride_kr, stride_kh, stride_kt,
                     stride_vr, stride_vh, stride_vt, stride_mr, stride_pr, stride_or,
                     H: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BLOCK_T: tl.constexpr,
                     HAS_PRIOR: tl.constexpr):
        rh = tl.program_id(0)
        r = rh // H
        h = rh % H
        t = tl.arange(0, BLOCK_T)
        dc = tl.arange(0, DC)
        tin = t < T
        valid = (tl.load(VALID + r * stride_mr + t, mask=tin, other=0) != 0) & tin
        # the head's D dims in chunks of DC: a (BLOCK_T, DC) tile at a time stays in registers
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c in tl.static_range(D // DC):
            q = tl.load(Q + r * stride_qr + h * D + c * DC + dc).to(tl.float32)
            k = tl.load(K + r * stride_kr + h * stride_kh + t[:, None] * stride_kt + (c * DC + dc)[None, :],
                        mask=tin[:, None], other=0.0).to(tl.float32)
            s += tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s * scale, -float("inf"))
        mx = tl.max(s, axis=0)
        e = tl.where(valid, tl.exp(s - tl.where(mx == -float("inf"), 0.0, mx)), 0.0)
        if HAS_PRIOR:
            # softmax, times (prior + tiny), renormalised: the softmax's own denominator cancels
            e = e * (tl.load(PRIOR + r * stride_pr + t, mask=tin, other=0.0) + tiny)
        den = tl.sum(e, axis=0)
        p = e / tl.where(den > 0, den, 1.0)  # a row with no valid key: zeros, as NeMo's masked_fill leaves it
        tl.store(PROB + rh * T + t, p, mask=tin)
        for c in tl.static_range(D // DC):
            v = tl.load(V + r * stride_vr + h * stride_vh + t[:, None] * stride_vt + (c * DC + dc)[None, :],
                        mask=tin[:, None], other=0.0).to(tl.float32)
            y = tl.sum(p[:, None] * v, axis=0)
            tl.store(OUT + r * stride_or + h * D + c * DC + dc, y.to(OUT.dtype.element_ty))

    @triton.jit
    def kth_kernel(X, OUT, N, k, stride_r, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        inb = c < N
        x = tl.load(X + r * stride_r + c, mask=inb, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True)
        # order-preserving image in int32: a negative float's magnitude bits are flipped, so larger floats give
        # larger integers (-0.0 sits just below +0.0; +NaN above +inf, as torch.topk orders NaN first)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        # the k-th largest key = the largest t with count(key >= t) >= k, built bit by bit from the sign down
        n_nonneg = tl.sum(tl.where(inb & (key >= 0), 1, 0), axis=0)
        t = tl.where(n_nonneg >= k, 0, -2147483647 - 1)
        for i in tl.static_range(31):
            cand = t + (1 << (30 - i))
            cnt = tl.sum(tl.where(inb & (key >= cand), 1, 0), axis=0)
            t = tl.where(cnt >= k, cand, t)
        out = tl.where(t < 0, t ^ 0x7FFFFFFF, t)
        tl.store(OUT + r, out.to(tl.float32, bitcast=True))

    _BUILT[key] = dict(split=split_kernel, combine=combine_kernel, xattn=xattn_kernel, kth=kth_kernel,
                       next_pow2=triton.next_power_of_2)
    return _BUILT[key]


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    if not usable(dev):
        raise RuntimeError(f"fastpath.kernels: tensors on {dev} need CUDA with triton, or TRITON_INTERPRET=1 on "
                           "the CPU")
    for t in ts:
        if t.device != dev:
            raise ValueError(f"fastpath.kernels: tensors on {t.device} and {dev}")


def decode_attention(q, k_cache, v_cache, lens, scale: float, keys_per_split: int = 64, block_n: int = 64,
                     max_keys: Optional[int] = None, k_new=None, v_new=None, num_warps: int = 2,
                     prefix_len: Optional[torch.Tensor] = None, prefix_row: int = 0, num_stages: Optional[int] = None,
                     k_exp: Optional[torch.Tensor] = None, v_exp: Optional[torch.Tensor] = None):
    """Softmax attention of one query per row over that row's first ``lens[r]`` cached keys.

    q (rows, H, Dh) (any row stride, inner dims contiguous), k/v_cache (rows, L, H, Dh) with a contiguous last dim
    and equal strides: position-major storage (rows, L, H, Dh), or head-major (rows, H, L, Dh) passed as its
    ``transpose(1, 2)`` view (each head's keys then contiguous: whole cache lines per tile, which matters for float8),
    lens (rows,) int32 >= 1, all <= max_keys (default L) -> (rows, H, Dh) in q's dtype; fp32 accumulation.
    max_keys sets the number of splits launched (ceil(max_keys / keys_per_split)); with one split the kernel
    writes the output itself (no combine kernel).
    k_new / v_new (rows, H, Dh), same layout rules as q: this step's key and value, written into the cache at
    position lens - 1 by the kernel itself (one kernel instead of two cache writes and the attention).
    prefix_len (rows,) int32: row r's keys [0, prefix_len[r]) are read from row ``prefix_row`` instead of its own
    (0 = none; the caller vouches that those keys are equal, and that lens - 1 lies past the prefix when writing);
    the rows that share them read one copy, which stays in L2.

    float8 cache: k/v_cache of dtype float8_e4m3fn and k_exp / v_exp (rows, H, L) uint8 contiguous, the biased
    exponents of each (position, head)'s power-of-two scale (see :func:`fp8_quantize`); K and V are then the
    dequantized ``fp8_dequantize`` values, and k_new / v_new (in q's dtype) are quantized by the kernel before it
    stores and uses them, exactly as ``fp8_quantize`` does.

    Equals, per row r and head h: ``softmax(q[r, h] @ K[r, :lens[r], h].T * scale) @ V[r, :lens[r], h]`` with
    K[r, j] replaced by K[prefix_row, j] for j < prefix_len[r], after the k_new/v_new write.
    """
    kern = _kernels()
    _check_device(q, k_cache, v_cache, lens)
    rows, L, H, D = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == D and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    assert (k_cache.stride(1), k_cache.stride(2)) in ((H * D, D), (D, L * D)) and k_cache.stride(0) == L * H * D
    assert lens.dtype == torch.int32 and lens.shape == (rows,)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_exp is not None) or (k_exp is None) != (v_exp is None) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"decode_attention: a float8_e4m3fn cache needs k_exp and v_exp (and only it): got caches of "
                         f"{k_cache.dtype} / {v_cache.dtype}, k_exp {k_exp is not None}, v_exp {v_exp is not None}")
    if fp8:
        for name, e in (("k_exp", k_exp), ("v_exp", v_exp)):
            if e.shape != (rows, H, L) or e.dtype != torch.uint8 or not e.is_contiguous():
                raise ValueError(f"decode_attention: {name} must be a contiguous uint8 ({rows}, {H}, {L}) tensor, got "
                                 f"{e.dtype} {tuple(e.shape)}")
    block_n = min(block_n, keys_per_split)
    assert keys_per_split % block_n == 0
    ns = -(-min(L, max_keys or L) // keys_per_split)
    dev = q.device
    out = torch.empty(rows, H, D, device=dev, dtype=q.dtype)
    if ns == 1:
        mo = lo = oo = out
    else:
        mo = torch.empty(rows * H * ns, device=dev, dtype=torch.float32)
        lo = torch.empty_like(mo)
        oo = torch.empty(rows * H * ns * D, device=dev, dtype=torch.float32)
    write = k_new is not None
    if write:
        assert v_new is not None and k_new.stride() == v_new.stride() and k_new.stride(2) == 1 and k_new.stride(1) == D
        assert k_new.dtype == v_new.dtype == (q.dtype if fp8 else k_cache.dtype)
    kn, vn = (k_new, v_new) if write else (q, q)
    shared = prefix_len is not None
    if shared:
        assert prefix_len.dtype == torch.int32 and prefix_len.shape == (rows,) and 0 <= prefix_row < rows
    pre = prefix_len if shared else lens
    prefix_off = int(prefix_row) * k_cache.stride(0)
    ke, ve = (k_exp, v_exp) if fp8 else (lens, lens)  # unused without FP8
    stride_er, stride_eh = (ke.stride(0), ke.stride(1)) if fp8 else (H, 1)
    i64 = k_cache.numel() >= 2**31 or q.numel() >= 2**31
    stages = {} if num_stages is None else {"num_stages": int(num_stages)}
    kern["split"][(rows * H, ns)](q, k_cache, v_cache, lens, mo, lo, oo, kn, vn, pre, ke, ve, prefix_off,
                                  int(prefix_row) * stride_er, scale, q.stride(0), k_cache.stride(0),
                                  k_cache.stride(1), k_cache.stride(2), kn.stride(0), stride_er, stride_eh, H=H, D=D,
                                  NSPLIT=ns, KPS=keys_per_split, BLOCK_N=block_n, WRITE_NEW=write, SHARED=shared,
                                  I64=i64, OUT_DIRECT=ns == 1, FP8=fp8, NEW_APART=write and fp8,
                                  num_warps=num_warps, **stages)
    if ns > 1:
        kern["combine"][(rows * H,)](mo, lo, oo, out, NSPLIT=ns, NS_P2=kern["next_pow2"](ns), D=D, num_warps=2)
    return out


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (float8_e4m3fn (..., D), uint8 (...)): each D-vector divided by its own power-of-two scale
    ``2 ** (e - 127)`` (e the returned biased exponent), ``2 ** (floor(log2(max |x|)) - 7)``, and rounded to float8
    e4m3 (to nearest even). The quotients lie in (-256, 256), so nothing saturates, and dividing by a power of two is
    exact: the only error is float8's rounding (3 mantissa bits: relative 2**-4 at most; values below the vector's
    max / 2**14 lose more as float8 subnormals). An all-zero vector gets scale 2**-126. The fast path's float8 K/V
    cache stores this (``FastDecoder(kv_cache_dtype=torch.float8_e4m3fn)``); the attention kernel quantizes the new
    key and value the same way, bit for bit."""
    xf = x.float()
    field = xf.abs().amax(-1).view(torch.int32) & 0x7F800000
    bits = torch.clamp(field - (7 << 23), min=1 << 23)
    inv = ((254 << 23) - bits).view(torch.float32)  # 1 / scale, exact
    return (xf * inv[..., None]).to(torch.float8_e4m3fn), (bits >> 23).to(torch.uint8)


def fp8_dequantize(q8: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """The float32 values ``fp8_quantize`` stands for: q8 (..., D) float8_e4m3fn times 2 ** (exp (...) - 127)."""
    return q8.float() * (exp.to(torch.int32) << 23).view(torch.float32)[..., None]


def cross_attention(q, mem_k, mem_v, valid, prior: Optional[torch.Tensor], scale: float, num_warps: int = 4,
                    d_chunk: Optional[int] = None):
    """Cross-attention of one query per row: q (rows, H*Dh), mem_k / mem_v (rows, H, T, Dh) (any strides with a
    contiguous last dim), valid (rows, T) bool, prior (rows, T) float32 or None
    -> (out (rows, H*Dh) in q's dtype, prob (rows, H, T) float32). d_chunk: head dims a tile holds (default all).

    Per row r and head h, in float32: ``s = q[r, h] @ mem_k[r, h].T * scale``, masked to -inf where not valid;
    ``p = softmax(s)``; with a prior ``p = p * (prior[r] + tiny) / sum(p * (prior[r] + tiny))``; p = 0 where not
    valid (a row with no valid key gives zeros); ``out[r, h] = p @ mem_v[r, h]``. This is the fast path's
    ``_xattn`` (the reference's cross-attention core), which runs the same steps in the model's dtype.
    """
    kern = _kernels()
    _check_device(q, mem_k, mem_v, valid)
    rows, H, T, D = mem_k.shape
    if D & (D - 1):
        raise ValueError(f"cross_attention needs a power-of-two head size, got {D}")
    assert q.shape == (rows, H * D) and q.stride(1) == 1 and mem_k.stride(3) == 1 and mem_v.stride(3) == 1
    assert mem_v.shape == mem_k.shape and valid.shape == (rows, T) and valid.dtype == torch.bool
    if prior is not None:
        assert prior.shape == (rows, T) and prior.dtype == torch.float32 and prior.stride(1) == 1
    vm = valid.view(torch.uint8)
    assert vm.stride(1) == 1
    out = torch.empty(rows, H * D, device=q.device, dtype=q.dtype)
    prob = torch.empty(rows, H, T, device=q.device, dtype=torch.float32)
    pr = prior if prior is not None else prob
    kern["xattn"][(rows * H,)](q, mem_k, mem_v, vm, pr, out, prob, T, scale, _TINY, q.stride(0), mem_k.stride(0),
                               mem_k.stride(1), mem_k.stride(2), mem_v.stride(0), mem_v.stride(1), mem_v.stride(2),
                               vm.stride(0), pr.stride(0), out.stride(0), H=H, D=D,
                               DC=min(D, d_chunk or D), BLOCK_T=kern["next_pow2"](T), HAS_PRIOR=prior is not None,
                               num_warps=num_warps)
    return out, prob


def topk_threshold(x: torch.Tensor, k: int, num_warps: int = 4) -> torch.Tensor:
    """``torch.topk(x, k, dim=-1).values[..., -1:]`` for float32 x (..., V) with a contiguous last dim: the k-th
    largest value of each row (ties counted with their multiplicity), the same float; -> (..., 1) float32."""
    kern = _kernels()
    _check_device(x)
    V = x.shape[-1]
    if x.dtype != torch.float32:
        raise ValueError(f"topk_threshold takes float32, got {x.dtype}")
    if not 1 <= k <= V:
        raise ValueError(f"topk_threshold: k={k} outside 1..{V}")
    x2 = x.reshape(-1, V)
    assert x2.stride(1) == 1
    out = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    kern["kth"][(x2.shape[0],)](x2, out, V, int(k), x2.stride(0), BLOCK=kern["next_pow2"](V), num_warps=num_warps)
    return out.view(*x.shape[:-1], 1)
