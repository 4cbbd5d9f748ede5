"""fastpath/kernels.py against the plain-PyTorch statements in its docstrings, on fresh random inputs.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before the
first kernel is built): the same kernel source and semantics, executed with numpy. With a GPU they are compiled and
run on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it on Linux "
                                              "x86-64); the kernels need it, on the CPU through its interpreter")

from conftest import infer_inputs, load_batch, reference_model  # noqa: E402
from fastpath import kernels  # noqa: E402
from fastpath.decoder import FastDecoder  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU conftest.py has set TRITON_INTERPRET=1

# float32 throughout: the kernels accumulate in float32 in another order than the float64 statements, so results
# agree to a few float32 ulps of the O(1) outputs (observed <= 2.7e-7 over 30 random draws, interpreted); 2e-6
# leaves room for other shapes without hiding a wrong term (a dropped key or prior moves outputs by >= 1e-3).
ATOL32 = 2e-6
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _attention_ref(q, K, V, lens, scale, prefix_len=None, prefix_row=0):
    out = []
    for r, n in enumerate(lens.tolist()):
        k, v = K[r, :n].clone(), V[r, :n].clone()
        if prefix_len is not None:
            p = int(prefix_len[r])
            k[:p], v[:p] = K[prefix_row, :p], V[prefix_row, :p]
        s = torch.einsum("hd,lhd->hl", q[r].double(), k.double()) * scale
        out.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v.double()))
    return torch.stack(out).float()


@HYP
@given(data=st.data())
def test_decode_attention_with_shared_prefix_and_cache_write(data):
    """Every row's softmax attention over its first lens[r] keys; keys [0, prefix_len[r]) come from the shared row;
    with k_new/v_new the kernel stores them at lens - 1 first and leaves every other cache entry as it was."""
    shared = data.draw(st.booleans())
    rows = data.draw(st.integers(2, 5))
    H = data.draw(st.sampled_from([1, 2, 3]))
    D = data.draw(st.sampled_from([8, 16]))
    kps = data.draw(st.sampled_from([8, 16, 32, 128]))  # 128: one split for every length here (no combine kernel)
    L = data.draw(st.integers(1, 70))
    lens = torch.tensor(data.draw(st.lists(st.integers(1, L), min_size=rows, max_size=rows)), dtype=torch.int32)
    prow = data.draw(st.integers(0, rows - 1))
    write = data.draw(st.booleans())
    head_major = data.draw(st.booleans())  # (rows, H, L, D) storage passed as its (rows, L, H, D) view
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    K, V = (torch.randn(rows, L, H, D, generator=g) for _ in range(2))
    qkv = torch.randn(rows, 3, H, D, generator=g)
    pre = None
    if shared:  # no longer than the row or the shared row, and (with a write) short of the keys being written
        hi = [max(0, min(n, int(lens[prow])) - (1 if write else 0)) for n in lens.tolist()]
        pre = torch.tensor([data.draw(st.integers(0, h)) for h in hi], dtype=torch.int32)
    K0, V0 = K.clone(), V.clone()
    if write:  # the reference: write first, then attend
        Kr, Vr = K0.clone(), V0.clone()
        for r, n in enumerate(lens.tolist()):
            Kr[r, n - 1], Vr[r, n - 1] = qkv[r, 1], qkv[r, 2]
    else:
        Kr, Vr = K0, V0
    dv = lambda t: t.to(DEV)  # noqa: E731
    Kd, Vd = dv(K), dv(V)
    if head_major:
        Kd, Vd = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (Kd, Vd))
    out = kernels.decode_attention(dv(qkv)[:, 0], Kd, Vd, dv(lens), D**-0.5, kps, min(8, kps),
                                   k_new=dv(qkv)[:, 1] if write else None, v_new=dv(qkv)[:, 2] if write else None,
                                   prefix_len=dv(pre) if shared else None, prefix_row=prow)
    ref = _attention_ref(qkv[:, 0], Kr, Vr, lens, D**-0.5, pre, prow)
    torch.testing.assert_close(out.cpu(), ref, atol=ATOL32, rtol=0)
    assert torch.equal(Kd.cpu(), Kr) and torch.equal(Vd.cpu(), Vr)


def test_shared_prefix_reads_the_shared_row_not_its_own():
    """Rows whose own prefix holds other values get the shared row's prefix attended (a mutation reading their
    own keys would give the plain kernel's result); the rows before the shared one are untouched."""
    g = torch.Generator().manual_seed(3)
    K, V = torch.randn(4, 40, 2, 16, generator=g), torch.randn(4, 40, 2, 16, generator=g)
    q = torch.randn(4, 2, 16, generator=g)
    lens = torch.tensor([40, 36, 33, 21], dtype=torch.int32)
    pre = torch.tensor([0, 20, 20, 20], dtype=torch.int32)
    own = kernels.decode_attention(q.to(DEV), K.to(DEV), V.to(DEV), lens.to(DEV), 0.25, 16, 16)
    sh = kernels.decode_attention(q.to(DEV), K.to(DEV), V.to(DEV), lens.to(DEV), 0.25, 16, 16,
                                  prefix_len=pre.to(DEV), prefix_row=1)
    torch.testing.assert_close(sh.cpu()[:2], own.cpu()[:2], atol=ATOL32, rtol=0)
    assert (sh.cpu()[2:] - own.cpu()[2:]).abs().max() > 1e-3
    torch.testing.assert_close(sh.cpu(), _attention_ref(q, K, V, lens, 0.25, pre, 1), atol=ATOL32, rtol=0)


def _fp8_draw(g, *shape):
    """Values over 12 binades (per-vector magnitudes 1e-3..1e3, a few exact zeros): roundings that carry into the
    next binade, float8 subnormals and all-zero vectors all occur."""
    x = torch.randn(*shape, generator=g) * 10 ** (torch.rand(*shape[:-1], 1, generator=g) * 6 - 3)
    x[torch.rand(*shape, generator=g) < 0.02] = 0.0
    if x.dim() > 1:
        x.view(-1, shape[-1])[0] = 0.0  # one all-zero vector
    return x


@HYP
@given(seed=st.integers(0, 2**31), D=st.sampled_from([4, 16, 64]))
def test_fp8_quantize_format_and_error_bound(seed, D):
    """Scale 2**(floor(log2 max|x|) - 7) per vector; |x / scale| < 256 (no saturation); the dequantized value is x
    rounded to float8 e4m3: within 2**-4 relative for normal quotients, 2**-10 * scale absolute for subnormal ones;
    zero stays zero; a power of two times a float8 value comes back exactly."""
    g = torch.Generator().manual_seed(seed)
    x = _fp8_draw(g, 7, D)
    q8, e = kernels.fp8_quantize(x)
    assert q8.dtype == torch.float8_e4m3fn and e.dtype == torch.uint8 and q8.shape == x.shape and e.shape == (7,)
    amax = x.abs().amax(-1)
    nz = amax > 0
    assert torch.equal(e[nz].int() - 127 + 7, torch.floor(torch.log2(amax[nz])).int())
    assert (e[~nz] == 1).all()
    scale = (e.int() << 23).view(torch.float32)[:, None]
    quot = x / scale
    assert quot.abs().max() < 256 and torch.equal(q8.float(), quot.to(torch.float8_e4m3fn).float())
    err = (kernels.fp8_dequantize(q8, e) - x).abs()
    normal = quot.abs() >= 2**-6
    assert (err[normal] <= 2**-4 * x.abs()[normal]).all()
    assert (err[~normal] <= 2**-10 * scale.expand_as(x)[~normal]).all()
    assert (kernels.fp8_dequantize(q8, e)[x == 0] == 0).all()
    # float8 values times a power of two come back exactly, where the scale stays the same: a vector whose largest
    # quotient rounded up to 256 gets the next binade's scale, and its smallest values then lose a bit as subnormals
    same = q8.float().abs().amax(-1) < 256
    exact = q8.float()[same] * 2.0**-5
    assert torch.equal(kernels.fp8_dequantize(*kernels.fp8_quantize(exact)), exact)


@HYP
@given(data=st.data())
def test_decode_attention_float8_cache(data):
    """float8 cache: the kernel quantizes k_new / v_new bit for bit as fp8_quantize does (values and scale
    exponents, across binade carries and subnormals), stores them at lens - 1, leaves every other entry, and
    attends the dequantized keys (the shared row's for the prefix) as the float64 statement does."""
    shared = data.draw(st.booleans())
    rows = data.draw(st.integers(2, 4))
    H = data.draw(st.sampled_from([1, 3]))
    D = data.draw(st.sampled_from([8, 16]))
    kps = data.draw(st.sampled_from([8, 32, 128]))
    L = data.draw(st.integers(2, 50))
    lens = torch.tensor(data.draw(st.lists(st.integers(1, L), min_size=rows, max_size=rows)), dtype=torch.int32)
    prow = data.draw(st.integers(0, rows - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    head_major = data.draw(st.booleans())
    (k8, ke), (v8, ve) = (kernels.fp8_quantize(_fp8_draw(g, rows, L, H, D)) for _ in range(2))
    ke, ve = ke.transpose(1, 2).contiguous(), ve.transpose(1, 2).contiguous()  # (rows, H, L)
    kn, vn = _fp8_draw(g, rows, H, D), _fp8_draw(g, rows, H, D)
    # scores of O(1): with keys up to 1e3 a float32 score's rounding (~1e-4 absolute at |s| ~ 1e3) would move the
    # softmax more than the tolerance below allows on the GPU (seen: 6e-5 relative), whatever the kernel's maths
    kmax = max(kernels.fp8_dequantize(k8, ke.transpose(1, 2)).abs().max().item(), kn.abs().max().item(), 1.0)
    q = torch.randn(rows, H, D, generator=g) / kmax
    pre = None
    if shared:
        hi = [max(0, min(n, int(lens[prow])) - 1) for n in lens.tolist()]
        pre = torch.tensor([data.draw(st.integers(0, h)) for h in hi], dtype=torch.int32)
    r, pos = torch.arange(rows), lens.long() - 1
    want = [t.clone() for t in (k8, v8, ke, ve)]
    (kq, kqe), (vq, vqe) = kernels.fp8_quantize(kn), kernels.fp8_quantize(vn)
    want[0][r, pos], want[1][r, pos] = kq, vq
    want[2].transpose(1, 2)[r, pos], want[3].transpose(1, 2)[r, pos] = kqe, vqe
    got = [t.to(DEV) for t in (k8, v8, ke, ve)]
    if head_major:
        got[0], got[1] = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in got[:2])
    out = kernels.decode_attention(q.to(DEV), got[0], got[1], lens.to(DEV), D**-0.5, kps, min(8, kps),
                                   k_new=kn.to(DEV), v_new=vn.to(DEV), k_exp=got[2], v_exp=got[3],
                                   prefix_len=pre.to(DEV) if shared else None, prefix_row=prow)
    for a, b in zip(got, want):  # bit for bit (float8 compared as bytes: -0 and +0 differ)
        assert torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8))
    Kd = kernels.fp8_dequantize(want[0], want[2].transpose(1, 2))
    Vd = kernels.fp8_dequantize(want[1], want[3].transpose(1, 2))
    # values here reach 1e3 (magnitudes over 12 binades) and outputs are weighted sums of them: float32's rounding
    # scales with the largest value, so ATOL32 is applied per unit of max |V| (observed 2.9e-6 at max |V| ~ 1e3)
    torch.testing.assert_close(out.cpu(), _attention_ref(q, Kd, Vd, lens, D**-0.5, pre, prow),
                               atol=ATOL32 * max(1.0, Vd.abs().max().item()), rtol=0)


def test_decode_attention_float8_needs_its_exponents():
    K = torch.zeros(2, 4, 1, 8, dtype=torch.float8_e4m3fn, device=DEV)
    q, lens = torch.randn(2, 1, 8, device=DEV), torch.ones(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="needs k_exp and v_exp"):
        kernels.decode_attention(q, K, K.clone(), lens, 1.0)
    bad = torch.zeros(2, 4, 1, dtype=torch.uint8, device=DEV)  # (rows, L, H), not (rows, H, L)
    with pytest.raises(ValueError, match=r"k_exp must be a contiguous uint8 \(2, 1, 4\)"):
        kernels.decode_attention(q, K, K.clone(), lens, 1.0, k_exp=bad, v_exp=bad)


def _xattn_ref(q, mk, mv, valid, prior, scale):
    """fastpath.decoder._xattn's steps in float64 (the reference module's own order)."""
    rows, H, T, D = mk.shape
    s = torch.einsum("rhd,rhtd->rht", q.view(rows, H, D).double(), mk.double()) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = s.softmax(-1)
    if prior is not None:
        p = p * (prior.double()[:, None, :] + torch.finfo(torch.float32).tiny)
        p = p / p.sum(-1, keepdim=True)
    p = p.masked_fill(~valid[:, None, :], 0.0)
    return torch.einsum("rht,rhtd->rhd", p, mv.double()).reshape(rows, H * D).float(), p.float()


@HYP
@given(data=st.data())
def test_cross_attention_matches_the_reference_steps(data):
    rows = data.draw(st.integers(1, 4))
    H = data.draw(st.sampled_from([1, 2, 4]))
    D = data.draw(st.sampled_from([4, 16]))
    T = data.draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q = torch.randn(rows, H * D, generator=g)
    mk, mv = torch.randn(rows, H, T, D, generator=g), torch.randn(rows, H, T, D, generator=g)
    valid = torch.rand(rows, T, generator=g) < 0.7
    valid[:, 0] |= data.draw(st.booleans())  # rows with no valid key happen too (then: zeros)
    prior = None
    if data.draw(st.booleans()):  # NeMo's prior: 1 in a window, epsilon elsewhere
        prior = torch.where(torch.rand(rows, T, generator=g) < 0.3, 1.0, 1e-8).float()
    y, p = kernels.cross_attention(q.to(DEV), mk.to(DEV), mv.to(DEV), valid.to(DEV),
                                   prior.to(DEV) if prior is not None else None, D**-0.5,
                                   d_chunk=data.draw(st.sampled_from([None, 4, 8])))
    y_ref, p_ref = _xattn_ref(q, mk, mv, valid, prior, D**-0.5)
    torch.testing.assert_close(y.cpu(), y_ref, atol=ATOL32, rtol=0)
    torch.testing.assert_close(p.cpu(), p_ref, atol=ATOL32, rtol=0)
    assert torch.isfinite(y).all()


@HYP
@given(data=st.data())
def test_topk_threshold_is_torch_topk_kth_value(data):
    """The same float as torch.topk's k-th value, with ties, -inf (masked tokens), signed zeros and tiny values."""
    n_rows = data.draw(st.integers(1, 6))
    V = data.draw(st.integers(1, 300))
    k = data.draw(st.integers(1, V))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    kind = data.draw(st.sampled_from(["normal", "ties", "specials"]))
    x = torch.randn(n_rows, V, generator=g) * data.draw(st.sampled_from([1e-30, 1.0, 1e30]))
    if kind == "ties":
        x = torch.randint(-3, 4, (n_rows, V), generator=g).float()
    elif kind == "specials":
        pick = torch.randint(0, 5, (n_rows, V), generator=g)
        x = torch.where(pick == 0, float("-inf"), x)
        x = torch.where(pick == 1, 0.0, x)
        x = torch.where(pick == 2, -0.0, x)
    out = kernels.topk_threshold(x.to(DEV), k).cpu()
    ref = torch.topk(x, k, dim=-1).values[..., -1:]
    assert torch.equal(out, ref), (out, ref)


def test_topk_threshold_rejects_bad_k_and_dtype():
    x = torch.randn(2, 10, device=DEV)
    with pytest.raises(ValueError, match="k=11"):
        kernels.topk_threshold(x, 11)
    with pytest.raises(ValueError, match="float32"):
        kernels.topk_threshold(x.double(), 3)


# ---- the whole fast path with these kernels (on the CPU: interpreted) ---------------------------------------------

# as tests/reference/test_fast.py: the step's float32 ops in another order (observed 1.2e-6 / 1.1e-6 on
# released_small / four_codebooks, interpreted kernels on the CPU); on a GPU
# the eager reference's cuBLAS/cuDNN kernels sum in other orders again (observed 1.4e-5 with TF32 off): 1e-4 there
ATOL_LOGITS = 1e-5 if DEV == "cpu" else 1e-4


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 on a GPU means float32: TF32 off for matmuls and cuDNN convolutions during each test."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.parametrize("case", ["released_small", "multihead_xattn", "four_codebooks", "decoder_kernel3"])
def test_fast_path_with_triton_kernels_equals_eager(case):
    """triton=True (the GPU's default: split-KV attention writing the step's key/value into the head-major cache,
    the unconditional rows' shared prefix, cross-attention and top-k kernels, the unconditional rows skipping the
    cross-attention): the eager reference's codes, lengths, attended positions at topk=1, per-step logits within
    1e-5; sampled codes (topk 20) equal for the same seed."""
    model = copy.deepcopy(reference_model(case)).to(DEV)
    batch = {k: v.to(DEV) for k, v in infer_inputs(load_batch(case)).items()}
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    fd = FastDecoder(model, 4, model.config.decoder.max_length_causal_mask, triton=True)
    fd.cuda_graphs = False
    # 32 keys a split in two 16-key tiles: the fixtures' ~20-40 keys span splits and tiles (fewer interpreted programs)
    fd.attn_tile = (32, 16, 1)
    assert fd.triton and fd.k_cache[0].transpose(1, 2).is_contiguous()  # head-major storage
    out = fd.generate(batch, **kw)
    assert torch.equal(ref.predicted_codes, out.predicted_codes)
    assert torch.equal(ref.predicted_codes_lens, out.predicted_codes_lens)
    assert ref.attended_text_positions == out.attended_text_positions
    for a, b in zip(ref.step_logits, out.step_logits):
        torch.testing.assert_close(b, a, atol=ATOL_LOGITS, rtol=0)
    if case == "released_small" and DEV == "cpu":
        # what the GPU compiles (the layer tail fused with the next layer's norm + qkv, or with
        # norm_out + final_proj): one graph per function (fullgraph, eager backend), the same codes and logits
        fns = ("_fn_embed", "_fn_pre", "_fn_xq", "_fn_xo_ffn", "_fn_head", "_fn_post_a", "_fn_post_b")
        for name in fns:
            f = getattr(fd, name)
            f.compiled = torch.compile(f.fn, fullgraph=True, dynamic=False, backend="eager")
        out_c = fd.generate(batch, **kw)
        assert fd.compile_errors == {} and torch.equal(out_c.predicted_codes, out.predicted_codes)
        for a, b in zip(out.step_logits, out_c.step_logits):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        for name in fns:
            getattr(fd, name).compiled = None
    # sampling: one case (interpreted kernels are slow), on the CPU only: there the one (2*S*C, B, V) noise draw is
    # the reference's per-codebook stream; CUDA's Philox offsets differ by draw shape (fastpath/decoder.py docstring)
    if case == "released_small" and DEV == "cpu":
        torch.manual_seed(5)
        ref_s = model.infer_batch(batch, use_kv_cache=True, use_cfg=True, topk=20, max_decoder_steps=12)
        torch.manual_seed(5)
        out_s = fd.generate(batch, use_cfg=True, topk=20, max_decoder_steps=12)
        assert torch.equal(ref_s.predicted_codes, out_s.predicted_codes)


def test_unconditional_prefix_keys_are_the_same_in_every_row():
    """What share_uncond_prefix relies on: after step 0 the unconditional rows' first T_ctx + 1 keys and values
    are equal in every layer (same inputs, row-independent maths), here checked on the reference's own prefill."""
    model = reference_model("four_codebooks")  # mixed context lengths: the conditional rows differ in length
    batch = infer_inputs(load_batch("four_codebooks"))
    fd = FastDecoder(model, 4, model.config.decoder.max_length_causal_mask)  # math: no sharing, every row its own
    fd.generate(batch, use_cfg=True, topk=1, max_decoder_steps=4)
    B = batch["text"].shape[0]
    w = next(iter(fd._works.values()))
    n = int(batch["context_audio_codes_lens"].max()) + 2 + 1  # context + its two specials + BOS
    for i in range(model.config.decoder.n_layers):
        for cache in (fd.k_cache[i], fd.v_cache[i]):  # (rows, H, L, Dh)
            for r in range(B + 1, 2 * B):
                assert torch.equal(cache[r, :, :n], cache[B, :, :n])
    assert int(w.kv_len[B]) >= n


def test_fast_path_float8_kv_cache_tracks_eager():
    """kv_cache_dtype=float8_e4m3fn, teacher-forced on the eager reference's codes: step 0 (which attends the
    unrounded prefill keys) within ATOL_LOGITS of eager; later steps move, but little."""
    case = "released_small"
    model = copy.deepcopy(reference_model(case)).to(DEV)
    batch = {k: v.to(DEV) for k, v in infer_inputs(load_batch(case)).items()}
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    fd = FastDecoder(model, 4, model.config.decoder.max_length_causal_mask, triton=True,
                     kv_cache_dtype=torch.float8_e4m3fn)
    fd.cuda_graphs = False
    fd.attn_tile = (32, 16, 1)  # splits and tiles at the fixture's lengths
    assert fd.k_cache[0].dtype == torch.float8_e4m3fn and fd.k_exp[0].dtype == torch.uint8
    assert fd.k_cache[0].transpose(1, 2).is_contiguous()  # head-major storage
    codes = ref.predicted_codes
    forced = torch.cat([codes, codes.new_zeros(*codes.shape[:2], ref.num_steps * 2)], 2)
    out = fd.generate(batch, forced_codes=forced, **kw)
    a, b = torch.stack(ref.step_logits), torch.stack(out.step_logits[: ref.num_steps])
    torch.testing.assert_close(b[0], a[0], atol=ATOL_LOGITS, rtol=0)
    rel = ((b[1:] - a[1:]).norm() / a[1:].norm()).item()
    # Each cached key/value is rounded to 3 mantissa bits (<= 2**-4 relative); on this fixture the logits move by
    # 1.9e-4 relative L2 (CPU, interpreted). The bound is 10x that: loose for roundings that average out, tight
    # enough to catch a wrong scale (a factor-2 exponent error moves them by > 1e-1). > 0: the cache is rounded.
    assert 0 < rel < 2e-3, rel
