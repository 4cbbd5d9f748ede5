"""fastpath.FastDecoder equals the eager reference's cached path (CPU: the same code without CUDA graphs or compile,
attention by the reference's ops; tests/fastpath/test_kernels.py runs it with the Triton kernels, interpreted)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import CASES, infer_inputs, load_batch, reference_model  # decoder_ce cases: by name below
from fastpath.decoder import FastDecoder
from reference.inference import InferenceError

# Per-step CFG-combined logits: the fast step runs the same float32 ops on one new row; observed <= 2e-6.
ATOL_LOGITS = 1e-5


def _max_len(model) -> int:
    return model.config.decoder.max_length_causal_mask


def _compare(ref, out, logits=True):
    assert torch.equal(ref.predicted_codes, out.predicted_codes)
    assert torch.equal(ref.predicted_codes_lens, out.predicted_codes_lens)
    assert ref.num_steps == out.num_steps
    assert ref.attended_text_positions == out.attended_text_positions
    if logits:
        assert len(ref.step_logits) == len(out.step_logits)
        for a, b in zip(ref.step_logits, out.step_logits):
            torch.testing.assert_close(b, a, atol=ATOL_LOGITS, rtol=0)


@pytest.mark.parametrize("case", CASES + ["dce_context", "dce_baked_v2607", "dce_baked_v2602"])
@pytest.mark.parametrize("use_cfg", [True, False])
def test_greedy_codes_equal_eager_cached(case, use_cfg):
    """topk=1, float32, default semantics (padded context keys masked): codes, lengths, attended positions and
    per-step logits equal model.infer_batch(use_kv_cache=True)."""
    model = reference_model(case)
    batch = infer_inputs(load_batch(case))
    kw = dict(use_cfg=use_cfg, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    out = FastDecoder(model, batch["text"].shape[0], _max_len(model)).generate(batch, **kw)
    _compare(ref, out)


def test_nemo_unmasked_padded_keys():
    """four_codebooks mixes context lengths: NeMo's cached semantics (padded keys attended) are reproduced too,
    and differ from the masked default."""
    model = reference_model("four_codebooks")
    batch = infer_inputs(load_batch("four_codebooks"))
    assert len(set(batch["context_audio_codes_lens"].tolist())) > 1
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, nemo_unmasked_padded_keys=True, **kw)
    fast = FastDecoder(model, 4, _max_len(model))
    out = fast.generate(batch, nemo_unmasked_padded_keys=True, **kw)
    _compare(ref, out)
    masked = fast.generate(batch, **kw)  # the same decoder, the default again
    assert max((a - b).abs().max().item() for a, b in zip(out.step_logits[1:], masked.step_logits[1:])) > 1e-6


@pytest.mark.parametrize("case", ["released_small", "four_codebooks"])
def test_sampled_codes_equal_eager_same_seed(case):
    """Sampling as argmax(p / Exp(1)) with the noise drawn in the reference's order is torch.multinomial's own
    algorithm: on the CPU the sampled codes equal the eager reference's for the same seed."""
    model = reference_model(case)
    batch = infer_inputs(load_batch(case))
    kw = dict(use_cfg=True, topk=20, temperature=0.7, keep_logits=True)
    torch.manual_seed(11)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    torch.manual_seed(11)
    out = FastDecoder(model, batch["text"].shape[0], _max_len(model)).generate(batch, **kw)
    _compare(ref, out)


@pytest.mark.parametrize(
    "params",
    [
        dict(topk=5, ignore_finished_sentence_tracking=False, max_decoder_steps=40),
        dict(topk=1, start_prior_after_n_audio_steps=3, estimate_alignment_from_layers=[1, 2], apply_prior_to_layers=[0]),
        dict(topk=3, eos_detection_method="argmax_all"),
        dict(topk=1, eos_detection_method="argmax_zero_cb", apply_attention_prior=False),
        dict(topk=2, eos_detection_method="argmax_or_multinomial_zero_cb", min_generated_frames=8),
    ],
    ids=["finished-tracking", "prior-layers", "eos-all", "eos-zero-cb-noprior", "min-frames"],
)
def test_parameters(params):
    model = reference_model("decoder_kernel3")  # kernel 3: the conv FFN history is on the fast path too
    batch = infer_inputs(load_batch("decoder_kernel3"))
    kw = dict(use_cfg=True, keep_logits=True, **params)
    torch.manual_seed(3)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    torch.manual_seed(3)
    out = FastDecoder(model, 4, _max_len(model)).generate(batch, **kw)
    _compare(ref, out)


@pytest.mark.parametrize("sync_every", [1, 3, 1000])
def test_stopping_is_independent_of_host_sync_interval(sync_every):
    """The host looks at the device's done flag only every sync_every steps; outputs are cut where the
    reference stops, so results do not depend on it (nor on run_all_steps)."""
    model = reference_model("multihead_xattn")
    batch = infer_inputs(load_batch("multihead_xattn"))
    kw = dict(use_cfg=False, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    assert ref.num_steps < model.config.inference.max_decoder_steps  # this case stops early
    fast = FastDecoder(model, 4, _max_len(model))
    fast.sync_every = sync_every
    _compare(ref, fast.generate(batch, **kw))
    _compare(ref, fast.generate(batch, run_all_steps=True, **kw))


def test_forced_codes_and_reuse():
    """Teacher forcing matches the eager reference's forced run; one decoder serves several calls (buffers are
    reset in place), including a smaller batch."""
    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    fast = FastDecoder(model, 4, _max_len(model))
    free = fast.generate(batch, use_cfg=True, topk=1)
    codes = torch.randint(0, model.config.codebook_size, (batch["text"].shape[0], 2, 12))
    kw = dict(use_cfg=True, topk=1, keep_logits=True, max_decoder_steps=12, forced_codes=codes)
    _compare(model.infer_batch(batch, use_kv_cache=True, **kw), fast.generate(batch, **kw))
    again = fast.generate(batch, use_cfg=True, topk=1)
    assert torch.equal(free.predicted_codes, again.predicted_codes)
    from make_fixtures import single_item

    one = single_item(batch, 1)
    _compare(model.infer_batch(one, use_kv_cache=True, use_cfg=True, topk=1, keep_logits=True),
             fast.generate(one, use_cfg=True, topk=1, keep_logits=True))


def test_bad_sizes():
    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    with pytest.raises(ValueError, match="max_batch"):
        FastDecoder(model, 1, _max_len(model)).generate(batch, topk=1)
    with pytest.raises(ValueError, match="max_len"):
        FastDecoder(model, 4, 20).generate(batch, topk=1)
    with pytest.raises(ValueError, match="learned positions"):
        FastDecoder(model, 4, _max_len(model) + 1)
    with pytest.raises(ValueError, match="kv_cache_dtype=float8_e4m3fn needs the triton kernels"):
        FastDecoder(model, 4, _max_len(model), kv_cache_dtype=torch.float8_e4m3fn)  # the CPU's default: no triton
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        FastDecoder(model, 4, _max_len(model), kv_cache_dtype=torch.float16)


# ---- the GPU path: compiled steps in CUDA graphs, Triton kernels ------------------------------------------------


def _rel_l2_vs_fp32_teacher_forced(dtypes, **fast_kw):
    """released_small on the GPU: the fp32 fast path's own codes, then a FastDecoder of each of ``dtypes``
    (``fast_kw``) teacher-forced on them. -> {dtype: (that decoder, relative L2 of its per-step logits to fp32's)}."""
    model = copy.deepcopy(reference_model("released_small")).cuda()
    batch = {k: v.cuda() for k, v in infer_inputs(load_batch("released_small")).items()}
    kw = dict(use_cfg=True, topk=1, keep_logits=True, max_decoder_steps=24)
    f32 = FastDecoder(model, 4, _max_len(model), **fast_kw)
    own = f32.generate(batch, **kw)
    codes = torch.nn.functional.pad(own.predicted_codes, (0, 24 - own.predicted_codes.shape[2])).cuda()
    ref = f32.generate(batch, forced_codes=codes, **kw)
    res = {}
    for dt in dtypes:
        fd = FastDecoder(model, 4, _max_len(model), dt, **fast_kw)
        out = fd.generate(batch, forced_codes=codes, **kw)
        a, b = torch.stack(ref.step_logits), torch.stack(out.step_logits[: len(ref.step_logits)])
        res[dt] = fd, ((a - b).norm() / a.norm()).item()
    return res


@pytest.mark.gpu
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "math"])
def test_compiled_graphs_equal_eager_reference_on_gpu(triton):
    """On a GPU, fp32 with TF32 off, the GPU's path (the step compiled and captured in CUDA graphs; with the Triton
    kernels, the default, or the reference's attention ops): codes equal the eager reference's at topk=1 and logits
    within 1e-4 on three fixtures (kernel-1 and kernel-3 FFN, multi-head cross-attention); the same decoder with its
    graphs off (the same steps run eagerly) gives the same codes; nothing falls back to uncompiled code (user Triton
    kernels inside the compiled functions included); graph replays draw fresh noise each step; bf16 stays within rel
    L2 2e-2 of fp32 (teacher-forced)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for case in ("released_small", "multihead_xattn", "decoder_kernel3"):  # compiles per shape: three cases
            model = copy.deepcopy(reference_model(case)).cuda()
            batch = {k: v.cuda() for k, v in infer_inputs(load_batch(case)).items()}
            kw = dict(use_cfg=True, topk=1, keep_logits=True)
            ref = model.infer_batch(batch, use_kv_cache=True, **kw)
            fd = FastDecoder(model, 4, _max_len(model), triton=triton)
            assert fd.cuda_graphs and fd.compile and fd.triton == triton
            # the GELU epilogue goes with the triton kernels where the FFN is kernel-1 (not decoder_kernel3)
            assert (fd._gelu_bias is not None) == (triton and case != "decoder_kernel3")
            out = fd.generate(batch, **kw)
            assert fd.compile_errors == {}
            assert sum(len(w.graphs) for w in fd._works.values()) > 0
            assert torch.equal(ref.predicted_codes, out.predicted_codes.to(ref.predicted_codes.device))
            for a, b in zip(ref.step_logits, out.step_logits):
                torch.testing.assert_close(b, a.to(b.device), atol=1e-4, rtol=0)
            fd.cuda_graphs = False
            plain = fd.generate(batch, **kw)
            fd.cuda_graphs = True
            assert torch.equal(out.predicted_codes, plain.predicted_codes)
            for a, b in zip(out.step_logits, plain.step_logits):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
            if case == "released_small":  # sampled: the graph replays draw fresh noise each step (no frozen RNG)
                torch.manual_seed(0)
                s = fd.generate(batch, use_cfg=True, topk=20, run_all_steps=True)
                codes = s.predicted_codes
                assert len({tuple(codes[:, :, k].flatten().tolist()) for k in range(codes.shape[2])}) > 1
        ((fd, rel),) = _rel_l2_vs_fp32_teacher_forced((torch.bfloat16,), triton=triton).values()
        assert rel < 2e-2 and fd.compile_errors == {}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
def test_half_precision_close_to_fp32_on_gpu():
    """fp16/bf16 on the GPU's defaults, teacher-forced on the fp32 codes: logits within a relative L2 of 2e-2 of the
    fp32 fast path (bf16 has 8 mantissa bits)."""
    for fd, rel in _rel_l2_vs_fp32_teacher_forced((torch.float16, torch.bfloat16)).values():
        assert fd.triton and fd.compile_errors == {}
        assert rel < 2e-2


def test_the_decoder_copy_records_no_autograd_history():
    """FastDecoder's copy of the model has no parameter requiring grad (the caller's model keeps its own), so even
    its internal steps called under grad mode build no autograd graph (what made the compiled layer tail fall back
    when a profiler harness called them without no_grad)."""
    model = reference_model("released_small")
    before = [p.requires_grad for p in model.parameters()]
    fd = FastDecoder(model, 2, _max_len(model))
    assert not any(p.requires_grad for p in fd.model.parameters()) and not fd.emb_table.requires_grad
    assert [p.requires_grad for p in model.parameters()] == before and any(before)


def test_float8_prefill_staging_is_flushed_layer_by_layer():
    """_StagedKV (the float8 cache's prefill): a layer's staged keys go to the cache when the next layer first
    writes the shared buffer, each layer once and in order, before that write; the last layer's stay pending (the
    prefill flushes it after the decoder)."""
    from fastpath.decoder import _StagedKV

    stage = torch.randn(2, 3, 2, 5, 4)  # (K/V, rows, H, T, Dh)
    pending, log = [], []
    layers = [_StagedKV(stage[0], stage[1], pending, lambda i=i: log.append((i, stage[0, 0, 0, 0, 0].item())))
              for i in range(3)]
    for i, kv in enumerate(layers):
        new = torch.full((3, 2, 5, 4), float(i + 1))
        k, v = kv.append(new, -new)
        assert torch.equal(k, new) and torch.equal(v, -new) and kv.length == 5
    # layer i was flushed while the buffer still held its own keys (value i + 1), before layer i + 1 wrote
    assert log == [(0, 1.0), (1, 2.0)] and len(pending) == 1
    pending.pop()()
    assert log[-1] == (2, 3.0)


def test_gelu_epilogue_layer_tail_traces_fullgraph():
    """The layer tail with the GELU epilogue (used on CUDA only: the CPU's torch._addmm_activation applies the erf
    GELU, not the model's tanh one) traces as one graph (what the GPU's compile needs), the same values as called
    directly."""
    from fastpath.decoder import _f_xo_ffn

    model = reference_model("released_small")
    assert FastDecoder(model, 4, _max_len(model))._gelu_bias is None  # off on the CPU
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    D, F_ = 16, 40
    x, y = torch.randn(3, 1, D, generator=g), torch.randn(2, 1, 8, generator=g)
    ws = [torch.randn(*s, generator=g) for s in ((D, 8), (D,), (F_, D), (D, F_))]
    args = (x, y, ws[0], ws[1], 1e-5, ws[2], ws[3], True)
    kw = dict(gelu_bias=torch.zeros(F_))
    traced = torch.compile(_f_xo_ffn, fullgraph=True, dynamic=False, backend="eager")
    torch.testing.assert_close(traced(*args, **kw), _f_xo_ffn(*args, **kw), atol=0, rtol=0)


COMPILED = ("_fn_embed", "_fn_pre", "_fn_xq", "_fn_xo_ffn", "_fn_head", "_fn_post_a", "_fn_post_b")


def test_nothing_compiled_on_the_cpu_and_the_pieces_trace_fullgraph():
    """Off CUDA the step runs uncompiled, without graphs or Triton (the reference's attention ops); the functions the
    GPU compiles trace as one graph each (torch.compile fullgraph with the eager backend, so no graph breaks on the
    GPU either) and give the same codes and logits. triton=True without the interpreter is a clear error."""
    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    fd = FastDecoder(model, 4, _max_len(model))
    assert not (fd.compile or fd.cuda_graphs or fd.triton)
    _compare(ref, fd.generate(batch, **kw))
    for name in COMPILED:
        f = getattr(fd, name)
        f.compiled = torch.compile(f.fn, fullgraph=True, dynamic=False, backend="eager")
    _compare(ref, fd.generate(batch, **kw))
    assert fd.compile_errors == {}
    with pytest.MonkeyPatch.context() as mp:  # the CPU without Triton's interpreter: a clear error
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="triton=True needs CUDA and triton"):
            FastDecoder(model, 4, _max_len(model), triton=True)


@pytest.mark.gpu
def test_gelu_epilogue_is_the_tanh_gelu_on_gpu():
    """What FastDecoder's GELU epilogue relies on: CUDA's torch._addmm_activation(use_gelu=True) applies the tanh
    GELU (the model's), not the erf one, to float32 products (IEEE, TF32 off); fresh random data at the seed's FFN
    width. The two GELUs differ by up to ~5e-4 here, so 2e-5 tells them apart."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
        h = torch.randn(64, 768, device="cuda", generator=g)
        w = torch.randn(3072, 768, device="cuda", generator=g) / 768**0.5
        a = torch._addmm_activation(torch.zeros(3072, device="cuda"), h, w.t(), use_gelu=True)
        ref = torch.nn.functional.linear(h.double(), w.double())
        torch.testing.assert_close(a.double(), torch.nn.functional.gelu(ref, approximate="tanh"), atol=2e-5, rtol=0)
        assert (a.double() - torch.nn.functional.gelu(ref)).abs().max() > 1e-4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
def test_triton_decode_attention_matches_sdpa_on_gpu():
    """The split-KV kernel against sdpa per row, fresh random data, lengths at and around split boundaries."""
    from fastpath.kernels import decode_attention as triton_decode_attention

    torch.manual_seed(0)
    rows, L, H, D = 7, 300, 12, 64
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        K = torch.randn(rows, L, H, D, device="cuda", dtype=dt)
        V = torch.randn(rows, L, H, D, device="cuda", dtype=dt)
        q = torch.randn(rows, 3, H, D, device="cuda", dtype=dt)[:, 0]
        lens = torch.tensor([1, 63, 64, 65, 128, 200, 300], device="cuda", dtype=torch.int32)
        for kps in (64, 128):
            out = triton_decode_attention(q, K, V, lens, D**-0.5, kps)
            for r, n in enumerate(lens.tolist()):
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[r, :, None].float(), K[r, :n].transpose(0, 1).float(), V[r, :n].transpose(0, 1).float())[:, 0]
                torch.testing.assert_close(out[r].float(), ref, atol=tol, rtol=0)


@pytest.mark.gpu
def test_triton_fused_cache_write_on_gpu():
    """The kernel's cache write: it stores this step's key/value at position len - 1 and attends them, whatever the
    cache held there before (stale values are overwritten, not read); every other cache entry is untouched."""
    from fastpath.kernels import decode_attention as triton_decode_attention

    torch.manual_seed(1)
    rows, L, H, D = 6, 200, 12, 64
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        K = torch.randn(rows, L, H, D, device="cuda", dtype=dt)
        V = torch.randn(rows, L, H, D, device="cuda", dtype=dt)
        qkv = torch.randn(rows, 3, H, D, device="cuda", dtype=dt)
        q, k_new, v_new = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        lens = torch.tensor([1, 64, 65, 128, 129, 200], device="cuda", dtype=torch.int32)
        K0, V0 = K.clone(), V.clone()
        out = triton_decode_attention(q, K, V, lens, D**-0.5, 64, k_new=k_new, v_new=v_new)
        for r, n in enumerate(lens.tolist()):
            assert torch.equal(K[r, n - 1], k_new[r]) and torch.equal(V[r, n - 1], v_new[r])
            keep = torch.ones(L, dtype=torch.bool, device="cuda")
            keep[n - 1] = False
            assert torch.equal(K[r, keep], K0[r, keep]) and torch.equal(V[r, keep], V0[r, keep])
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[r, :, None].float(), K[r, :n].transpose(0, 1).float(), V[r, :n].transpose(0, 1).float())[:, 0]
            torch.testing.assert_close(out[r].float(), ref, atol=tol, rtol=0)


def test_topk_beyond_the_codebook_is_a_clear_error():
    model = reference_model("released_small")  # its checkpoint's default topk (80) exceeds its 72 tokens
    with pytest.raises(InferenceError, match="topk \\(80\\) exceeds the 72 tokens"):
        FastDecoder(model, 4, _max_len(model)).generate(infer_inputs(load_batch("released_small")))


def test_maskgit_is_refused_in_one_line():
    """The fast path runs the autoregressive local transformer; MaskGit is refused before any work."""
    model = reference_model("dce_maskgit")
    batch = infer_inputs(load_batch("dce_maskgit"))
    fd = FastDecoder(model, 3, _max_len(model))
    with pytest.raises(InferenceError, match="the fast path runs the autoregressive local transformer only, not "
                                             "MaskGit"):
        fd.generate(batch, use_local_transformer_for_inference=True)
    assert fd._works == {}
    with pytest.raises(InferenceError, match="needs a local transformer"):  # the reference's own message
        FastDecoder(reference_model("released_small"), 4, 64).generate(
            infer_inputs(load_batch("released_small")), topk=1, use_local_transformer_for_inference=True)


# ---- the autoregressive local transformer inside the step (the released checkpoints' sampler) ---------------------

LT_CASES = ["dce_baked_v2607", "dce_baked_v2602", "stacked_lt", "dce_context"]


@pytest.mark.parametrize("case", LT_CASES)
@pytest.mark.parametrize("sampling", [dict(topk=1), dict(topk=20, temperature=0.7)], ids=["greedy", "sampled"])
def test_local_transformer_codes_equal_eager(case, sampling):
    """use_local_transformer_for_inference=True (NeMo's per-codebook loop, CFG on its logits, the forbidden-token
    edits) on the four fixtures with an autoregressive local transformer (baked v2607: stacking 2, 2 layers x 2
    heads as wide as the decoder; v2602: 1 narrow layer; the context encoder; stacked_lt): codes, lengths, steps,
    attended positions and logits equal infer_batch(use_kv_cache=True)'s at float32, greedy and sampled with the
    same torch.manual_seed (the noise is drawn in the reference's order: the sub-steps' (rows, V) draws, then the
    argmax pass's)."""
    model = reference_model(case)
    batch = infer_inputs(load_batch(case))
    fast = FastDecoder(model, batch["text"].shape[0], _max_len(model))
    for use_cfg in (True, False):
        kw = dict(use_cfg=use_cfg, keep_logits=True, use_local_transformer_for_inference=True, **sampling)
        torch.manual_seed(5)
        ref = model.infer_batch(batch, use_kv_cache=True, **kw)
        torch.manual_seed(5)
        _compare(ref, fast.generate(batch, **kw))


def test_local_transformer_with_sentence_tracking_and_min_frames():
    """The local transformer's edits with NeMo's sentence tracking (EOS banned for unfinished items, forced for
    finished ones) and EOS forbidden over the first frames: the same codes as the eager reference."""
    model = reference_model("dce_baked_v2607")
    batch = infer_inputs(load_batch("dce_baked_v2607"))
    kw = dict(use_cfg=True, keep_logits=True, use_local_transformer_for_inference=True, topk=5,
              ignore_finished_sentence_tracking=False, min_generated_frames=6, max_decoder_steps=24)
    torch.manual_seed(2)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    torch.manual_seed(2)
    _compare(ref, FastDecoder(model, 3, _max_len(model)).generate(batch, **kw))


def test_local_transformer_gpu_form_on_the_cpu():
    """What the GPU runs: every sub-step attends all C*S key slots with the unwritten ones masked (one shape, one
    compiled graph for all sub-steps), and each piece traces as one graph (torch.compile fullgraph, eager backend):
    the same codes as the eager reference, greedy and sampled."""
    model = reference_model("dce_baked_v2607")
    batch = infer_inputs(load_batch("dce_baked_v2607"))
    fd = FastDecoder(model, 3, _max_len(model))
    fd.lt_full_keys = True
    for name in COMPILED + ("_fn_lt_in", "_fn_lt_sub"):
        f = getattr(fd, name)
        f.compiled = torch.compile(f.fn, fullgraph=True, dynamic=False, backend="eager")
    for sampling in (dict(topk=1), dict(topk=20)):
        kw = dict(use_cfg=True, use_local_transformer_for_inference=True, **sampling)
        torch.manual_seed(9)
        ref = model.infer_batch(batch, use_kv_cache=True, **kw)
        torch.manual_seed(9)
        out = fd.generate(batch, **kw)
        assert torch.equal(ref.predicted_codes, out.predicted_codes)
        assert torch.equal(ref.predicted_codes_lens, out.predicted_codes_lens)
    assert fd.compile_errors == {}


@pytest.mark.gpu
def test_local_transformer_compiled_graphs_equal_eager_on_gpu():
    """On a GPU, fp32 with TF32 off: the local transformer inside the compiled, graph-captured step gives the eager
    reference's codes at topk=1 on the four fixtures with one, with CFG; nothing falls back to uncompiled code;
    sampled runs draw fresh codes per replay."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for case in LT_CASES:
            model = copy.deepcopy(reference_model(case)).cuda()
            batch = {k: v.cuda() for k, v in infer_inputs(load_batch(case)).items()}
            kw = dict(use_cfg=True, topk=1, keep_logits=True, use_local_transformer_for_inference=True)
            ref = model.infer_batch(batch, use_kv_cache=True, **kw)
            fd = FastDecoder(model, batch["text"].shape[0], _max_len(model))
            assert fd.cuda_graphs and fd.compile and fd.lt_full_keys
            out = fd.generate(batch, **kw)
            assert fd.compile_errors == {}
            assert torch.equal(ref.predicted_codes, out.predicted_codes.to(ref.predicted_codes.device)), case
            assert torch.equal(ref.predicted_codes_lens, out.predicted_codes_lens), case
            for a, b in zip(ref.step_logits, out.step_logits):
                torch.testing.assert_close(b, a.to(b.device), atol=1e-4, rtol=0)
            fd.cuda_graphs = False
            plain = fd.generate(batch, **kw)
            assert torch.equal(out.predicted_codes, plain.predicted_codes), case
            fd.cuda_graphs = True
        s = fd.generate(batch, use_cfg=True, topk=20, run_all_steps=True, use_local_transformer_for_inference=True)
        codes = s.predicted_codes
        assert len({tuple(codes[:, :, k].flatten().tolist()) for k in range(codes.shape[2])}) > 1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# ---- generate_speech: NeMo's chunked generation, one text chunk per call (what do_tts runs) -----------------------

GEN_CASES = ["dce_baked_v2607", "dce_baked_v2602", "dce_context"]
# shorter chunks of the gen3 texts (B = 3): windows under the short-sentence threshold, so items reach their text's
# end within the fixtures' 16 frames (near-end counting, forced chunk ends, finished limits)
SHORT_LENS = [[6, 12, 9], [1, 8, 14], [1, 1, 10]]


def _chunks(case: str, name: str, lens=None) -> list[dict]:
    """The fixture's chunk set (parity.chunks, as the CLI reads it); lens: each call's text_lens cut shorter."""
    from conftest import FIXTURES
    from parity.chunks import read_chunk_set

    chunks = read_chunk_set(FIXTURES / f"{case}.chunks.safetensors", name).chunks
    if lens is None:
        return chunks
    out = []
    for ch, ls in zip(chunks, lens):
        b = dict(ch["batch"], text_lens=torch.tensor(ls), text=ch["batch"]["text"][:, : max(ls)].clone())
        out.append(dict(ch, batch=b))
    return out


def _state(s) -> dict:
    return dict(left_offset=list(s.left_offset), end_indices=dict(s.end_indices), overall_idx=s.overall_idx,
                previous_attn_len=list(s.previous_attn_len),
                last_attended_timesteps=[[int(t) for t in x] for x in s.last_attended_timesteps])


def _calls_equal(model, fast, chunks, seed: int, device: str = "cpu", **kw) -> list:
    """One chunk state each, the chunks in turn through model.generate_speech (cached) and fast.generate_speech,
    seeded alike before every call: codes, lengths, steps, attended positions and the chunk state (spliced encoder
    output and text window included) equal after every call; a call where the reference raises raises the same
    one-line error on the fast path (and ends the run). -> the calls' lengths."""
    B = int(chunks[0]["batch"]["text"].shape[0])
    sr, sf = model.create_chunk_state(B), model.create_chunk_state(B)
    lens = []
    for k, ch in enumerate(chunks):
        batch = {n: v.to(device) for n, v in ch["batch"].items()}
        args = (ch["end_of_text"], ch["beginning_of_text"])
        torch.manual_seed(seed + k)
        try:
            ref = model.generate_speech(batch, sr, *args, use_kv_cache=True, **kw)
        except InferenceError as e:
            torch.manual_seed(seed + k)
            with pytest.raises(InferenceError) as got:
                fast.generate_speech(batch, sf, *args, **kw)
            assert str(got.value) == str(e)
            lens.append(str(e))
            return lens
        torch.manual_seed(seed + k)
        out = fast.generate_speech(batch, sf, *args, **kw)
        assert torch.equal(ref.predicted_codes_lens, out.predicted_codes_lens.to(ref.predicted_codes_lens.device)), k
        assert out.predicted_codes_lens.dtype == torch.long
        assert torch.equal(ref.predicted_codes, out.predicted_codes.to(ref.predicted_codes.device)), k
        assert ref.num_steps == out.num_steps, k
        assert ref.attended_text_positions == out.attended_text_positions, k
        assert _state(sr) == _state(sf), k
        for name in ("history_text", "history_text_lens", "history_context_tensor"):
            assert torch.equal(getattr(sr, name), getattr(sf, name).to(getattr(sr, name).device)), (k, name)
        lens.append(ref.predicted_codes_lens.tolist())
    return lens


@pytest.mark.parametrize("case", GEN_CASES)
@pytest.mark.parametrize("lt", [False, True], ids=["decoder", "local-transformer"])
def test_generate_speech_chunks_equal_eager(case, lt):
    """fast.generate_speech (CFG on) equals the eager reference's model.generate_speech on the fixtures' chunk files
    (gen1: one first chunk; gen3: three calls, items ending their text in different calls, later chunks with their
    window's left_offset, first prior and NeMo's multi-chunk prior), greedy and seeded top-k: codes, lengths, steps,
    attended positions and the chunk state after every call."""
    model = reference_model(case)
    fast = FastDecoder(model, 3, _max_len(model))
    for name in ("gen1", "gen3"):
        for sampling in (dict(topk=1), dict(topk=20, temperature=0.7)):
            _calls_equal(model, fast, _chunks(case, name), 3, use_cfg=True, use_local_transformer_for_inference=lt,
                         **sampling)


@pytest.mark.parametrize("case", GEN_CASES)
def test_generate_speech_rules_equal_eager(case):
    """The chunk rules where texts end within the call (shorter chunks): sentence tracking on (the finished limits of
    a first and a later chunk, forced chunk ends of items not at their text's end), start_prior_after_n_audio_steps
    ignored as NeMo does, the prior off (a later chunk keeps its first prior), a short lookahead; with and without
    the local transformer, several seeds. dce_context's lookahead-2 run reaches NeMo's multi-chunk-prior IndexError:
    the same one-line error."""
    model = reference_model(case)
    fast = FastDecoder(model, 3, _max_len(model))
    errors = 0
    for chunks in (_chunks(case, "gen3"), _chunks(case, "gen3", SHORT_LENS)):
        for params in (dict(topk=20, temperature=0.7, ignore_finished_sentence_tracking=False),
                       dict(topk=1, ignore_finished_sentence_tracking=False, start_prior_after_n_audio_steps=3),
                       dict(topk=20, apply_attention_prior=False),
                       dict(topk=5, attention_prior_lookahead_window=2, eos_detection_method="argmax_any")):
            for lt in (False, True):
                for seed in (0, 10):
                    lens = _calls_equal(model, fast, chunks, seed, use_cfg=True,
                                        use_local_transformer_for_inference=lt, **params)
                    errors += isinstance(lens[-1], str)
    assert errors == (2 if case == "dce_context" else 0)


def test_generate_speech_gpu_form_on_the_cpu(monkeypatch):
    """What the GPU compiles: every piece traces as one graph (torch.compile fullgraph, eager backend) with the chunk
    rules inside, and the local transformer attends all key slots masked: the eager reference's codes and state.
    (Each text window width is its own work buffers and compiled variants: the recompile limit FastDecoder sets on
    CUDA, 64, holds them.)"""
    import torch._dynamo as dynamo

    monkeypatch.setattr(dynamo.config, "cache_size_limit", 64)
    model = reference_model("dce_baked_v2607")
    fd = FastDecoder(model, 3, _max_len(model))
    fd.lt_full_keys = True
    for name in COMPILED + ("_fn_lt_in", "_fn_lt_sub"):
        f = getattr(fd, name)
        f.compiled = torch.compile(f.fn, fullgraph=True, dynamic=False, backend="eager")
    for lt in (False, True):
        _calls_equal(model, fd, _chunks("dce_baked_v2607", "gen3"), 1, use_cfg=True,
                     use_local_transformer_for_inference=lt, topk=20, ignore_finished_sentence_tracking=False)
    assert fd.compile_errors == {}


def test_generate_speech_refusals_are_one_line():
    """MaskGit, the recompute path, a first chunk on a used state: refused before any work (the state untouched);
    the reference's own checks (end_of_text per item, a later chunk on a fresh state) come first, in its words."""
    from reference.batch import BatchError

    model = reference_model("dce_maskgit")
    ch = _chunks("dce_maskgit", "gen1")[0]
    fd = FastDecoder(model, 3, _max_len(model))
    state = model.create_chunk_state(3)
    with pytest.raises(InferenceError, match="the fast path runs the autoregressive local transformer only, not "
                                             "MaskGit"):
        fd.generate_speech(ch["batch"], state, ch["end_of_text"], True, use_local_transformer_for_inference=True)
    assert fd._works == {} and state.history_text is None
    model = reference_model("dce_baked_v2607")
    fd = FastDecoder(model, 3, _max_len(model))
    ch = _chunks("dce_baked_v2607", "gen1")[0]
    state = model.create_chunk_state(3)
    with pytest.raises(InferenceError, match="the fast path is the cached path"):
        fd.generate_speech(ch["batch"], state, ch["end_of_text"], True, use_kv_cache=False, topk=1)
    with pytest.raises(BatchError, match="end_of_text must hold one bool per item"):
        fd.generate_speech(ch["batch"], state, [True], True, topk=1)
    with pytest.raises(InferenceError, match="beginning_of_text=False on a fresh chunk_state"):
        fd.generate_speech(ch["batch"], state, ch["end_of_text"], False, topk=1)
    fd.generate_speech(ch["batch"], state, ch["end_of_text"], True, topk=1)
    before = _state(state)
    with pytest.raises(InferenceError, match="beginning_of_text=True on a used chunk_state"):
        fd.generate_speech(ch["batch"], state, ch["end_of_text"], True, topk=1)
    assert _state(state) == before


@pytest.mark.gpu
def test_generate_speech_compiled_graphs_equal_eager_on_gpu():
    """On a GPU, fp32 with TF32 off: generate_speech's steps compiled and captured in CUDA graphs (the chunk rules
    inside the step, no host sync per step) give the eager reference's codes, lengths and chunk state at topk=1,
    CFG on, with and without the local transformer, over the three calls of each fixture's gen3 chunk set and the
    shorter chunks with sentence tracking; nothing falls back to uncompiled code; the graphs off give the same."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for case in GEN_CASES:
            torch._dynamo.reset()  # every window width compiles its own variants: a fresh recompile budget per case
            model = copy.deepcopy(reference_model(case)).cuda()
            fd = FastDecoder(model, 3, _max_len(model))
            assert fd.cuda_graphs and fd.compile
            for lt in (False, True):
                kw = dict(use_cfg=True, use_local_transformer_for_inference=lt, topk=1)
                _calls_equal(model, fd, _chunks(case, "gen3"), 0, "cuda", **kw)
                _calls_equal(model, fd, _chunks(case, "gen3", SHORT_LENS), 0, "cuda",
                             ignore_finished_sentence_tracking=False, **kw)
            assert fd.compile_errors == {}, case
            assert sum(len(w.graphs) for w in fd._works.values()) > 0
            fd.cuda_graphs = False
            _calls_equal(model, fd, _chunks(case, "gen3"), 0, "cuda", use_cfg=True, topk=1)
            fd.cuda_graphs = True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
