"""fastpath.FastDecoder equals the eager reference's cached path (CPU: the same code without CUDA graphs)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CASES, infer_inputs, load_batch, reference_model
from fastpath.decoder import BIG, FastDecoder
from reference.inference import InferenceError, PriorState

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


@pytest.mark.parametrize("case", CASES)
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
    fast = FastDecoder(model, 4, _max_len(model), nemo_unmasked_padded_keys=True)
    out = fast.generate(batch, **kw)
    _compare(ref, out)
    masked = FastDecoder(model, 4, _max_len(model)).generate(batch, **kw)
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
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_parameters_and_attention_impls(params, attn_impl):
    model = reference_model("decoder_kernel3")  # kernel 3: the conv FFN history is on the fast path too
    batch = infer_inputs(load_batch("decoder_kernel3"))
    kw = dict(use_cfg=True, keep_logits=True, **params)
    torch.manual_seed(3)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    torch.manual_seed(3)
    # fuse_step_ends off for "math": both the fused and the separate step prologue / epilogue are checked
    out = FastDecoder(model, 4, _max_len(model), attn_impl=attn_impl, bucket=8,
                      fuse_step_ends=attn_impl == "sdpa").generate(batch, **kw)
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
    fast = FastDecoder(model, 4, _max_len(model), sync_every=sync_every)
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
    with pytest.raises(ValueError, match="flash"):
        FastDecoder(model, 4, _max_len(model), attn_impl="flash")


# ---- the prior state machine on tensors equals PriorState, step by step -------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_prior_state_machine_on_device_equals_prior_state(data):
    """Random attention scores, text lengths (including the n <= 5 and n < 3 edge cases), windows and EOS
    events: FastDecoder._prior_update equals PriorState.most_attended + build_prior over many steps, counters
    (sinks >= 8, stuck >= 10), finished counters and unfinished flags included."""
    model = reference_model("released_small")
    fast = FastDecoder(model, 4, _max_len(model))
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(2, 14))
    lens = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    lens[0] = T
    lookahead = data.draw(st.integers(1, 6))
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    steps = data.draw(st.integers(1, 40))
    p = model.config.inference.__class__(attention_prior_lookahead_window=lookahead, attention_prior_epsilon=eps)
    rows = 2 * B
    w = fast._work(B, rows, T, steps)
    w.text_lens.copy_(torch.tensor(lens))
    w.prior.fill_(eps), w.last.fill_(1), w.counters.zero_(), w.fin_present.zero_(), w.fin_count.zero_()
    w.unfinished.zero_(), w.ended.zero_(), w.end_idx.fill_(BIG), w.step.zero_()
    ref = PriorState.new(B)
    end_indices: dict = {}
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for k in range(steps):
        # peaked scores so that the attended position moves, sticks and sinks
        scores = torch.rand(rows, T, generator=g) ** 8
        if data.draw(st.booleans()):
            scores[:, : max(1, T // 2)] += 1.0
        att = ref.most_attended(scores, lens, lookahead)
        prior = ref.build_prior(rows, T, lens, att, eps, lookahead, end_indices, "cpu")
        fast._prior_update(w, scores, p)
        assert w.attended[k].tolist() == att, k
        torch.testing.assert_close(w.prior, prior[:, 0], atol=0, rtol=0)
        assert w.fin_present.tolist() == [b in ref.finished_counter for b in range(B)]
        assert w.fin_count.tolist() == [ref.finished_counter.get(b, 0) for b in range(B)]
        assert w.unfinished.tolist() == [bool(ref.unfinished.get(b, False)) for b in range(B)]
        # an EOS event now and then (the fast path's EOS bookkeeping sets `ended`)
        b = data.draw(st.integers(0, 3 * B))
        if b < B and b not in end_indices:
            end_indices[b] = k
            w.ended[b] = True
        w.step.add_(1)


# ---- the CUDA-graph path ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_cuda_graphs_equal_eager_reference_on_gpu(attn_impl):
    """On a GPU, float32 with TF32 off: the captured-graph fast path equals its own eager steps and the eager
    reference's cached path (codes at topk=1; logits to float32 rounding)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for case in CASES:
            model = copy.deepcopy(reference_model(case)).cuda()
            batch = {k: v.cuda() for k, v in infer_inputs(load_batch(case)).items()}
            kw = dict(use_cfg=True, topk=1, keep_logits=True)
            ref = model.infer_batch(batch, use_kv_cache=True, **kw)
            graphs = FastDecoder(model, 4, _max_len(model), attn_impl=attn_impl, bucket=8)
            assert graphs.cuda_graphs
            out = graphs.generate(batch, **kw)
            assert sum(len(w.graphs) for w in graphs._works.values()) > 0
            plain = FastDecoder(model, 4, _max_len(model), attn_impl=attn_impl, bucket=8, cuda_graphs=False)
            out2 = plain.generate(batch, **kw)
            assert torch.equal(out.predicted_codes, out2.predicted_codes)
            assert torch.equal(ref.predicted_codes, out.predicted_codes.to(ref.predicted_codes.device))
            for a, b in zip(ref.step_logits, out.step_logits):
                torch.testing.assert_close(b, a.to(b.device), atol=1e-4, rtol=0)
            # sampled: the graph replays draw fresh noise each step (no frozen RNG)
            torch.manual_seed(0)
            s = graphs.generate(batch, use_cfg=True, topk=20, run_all_steps=True)
            assert len({tuple(s.predicted_codes[:, :, k].flatten().tolist()) for k in range(s.predicted_codes.shape[2])}) > 1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _rel_l2_vs_fp32_teacher_forced(dtype, **fast_kw):
    """released_small on the GPU: the fp32 fast path's own codes, then a ``dtype`` FastDecoder (``fast_kw``)
    teacher-forced on them. Returns (that decoder, relative L2 of its per-step logits against fp32)."""
    model = copy.deepcopy(reference_model("released_small")).cuda()
    batch = {k: v.cuda() for k, v in infer_inputs(load_batch("released_small")).items()}
    kw = dict(use_cfg=True, topk=1, keep_logits=True, max_decoder_steps=24)
    f32 = FastDecoder(model, 4, _max_len(model)).generate(batch, **kw)
    codes = torch.nn.functional.pad(f32.predicted_codes, (0, 24 - f32.predicted_codes.shape[2])).cuda()
    ref = FastDecoder(model, 4, _max_len(model)).generate(batch, forced_codes=codes, **kw)
    fd = FastDecoder(model, 4, _max_len(model), dtype, **fast_kw)
    out = fd.generate(batch, forced_codes=codes, **kw)
    a, b = torch.stack(ref.step_logits), torch.stack(out.step_logits[: len(ref.step_logits)])
    return fd, ((a - b).norm() / a.norm()).item()


@pytest.mark.gpu
def test_flash_half_precision_close_to_fp32_on_gpu():
    """fp16/bf16 with flash attention (one graph for all steps), teacher-forced on the fp32 codes: logits within
    a relative L2 of 2e-2 of the fp32 fast path (bf16 has 8 mantissa bits)."""
    for dt in (torch.float16, torch.bfloat16):
        fd, rel = _rel_l2_vs_fp32_teacher_forced(dt)
        assert fd.attn_impl == "flash"
        assert rel < 2e-2


# ---- compile=True and the triton attention ------------------------------------------------------------------


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


def test_gelu_epilogue_needs_cuda_and_traces_fullgraph():
    """gelu_epilogue is refused off CUDA (the CPU's torch._addmm_activation applies the erf GELU); the layer tail
    with it traces as one graph (what compile=True needs on the GPU), the same values as called directly."""
    from fastpath.decoder import _f_xo_ffn

    model = reference_model("released_small")
    with pytest.raises(ValueError, match="gelu_epilogue needs CUDA"):
        FastDecoder(model, 4, _max_len(model), gelu_epilogue=True)
    assert not FastDecoder(model, 4, _max_len(model)).gelu_epilogue  # the default on the CPU
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    D, F_ = 16, 40
    x, y = torch.randn(3, 1, D, generator=g), torch.randn(2, 1, 8, generator=g)
    ws = [torch.randn(*s, generator=g) for s in ((D, 8), (D,), (F_, D), (D, F_))]
    args = (x, y, ws[0], ws[1], 1e-5, ws[2], ws[3], True)
    kw = dict(gelu_bias=torch.zeros(F_))
    traced = torch.compile(_f_xo_ffn, fullgraph=True, dynamic=False, backend="eager")
    torch.testing.assert_close(traced(*args, **kw), _f_xo_ffn(*args, **kw), atol=0, rtol=0)


def test_compile_flag_is_ignored_on_cpu_and_pieces_trace_fullgraph():
    """compile=True is a no-op off CUDA (same results); the functions it compiles trace as one graph each
    (torch.compile fullgraph with the eager backend, so no graph breaks on the GPU either) and give the same codes
    and logits."""
    model = reference_model("released_small")
    batch = infer_inputs(load_batch("released_small"))
    kw = dict(use_cfg=True, topk=1, keep_logits=True)
    ref = model.infer_batch(batch, use_kv_cache=True, **kw)
    fd = FastDecoder(model, 4, _max_len(model), compile=True)
    assert not fd.compile
    _compare(ref, fd.generate(batch, **kw))
    for name in ("_fn_embed", "_fn_pre", "_fn_post", "_fn_xq", "_fn_xo_ffn", "_fn_head", "_fn_post_a", "_fn_post_b"):
        f = getattr(fd, name)
        f.compiled = torch.compile(f.fn, fullgraph=True, dynamic=False, backend="eager")
    _compare(ref, fd.generate(batch, **kw))
    assert fd.compile_errors == {}
    with pytest.MonkeyPatch.context() as mp:  # the CPU without Triton's interpreter: a clear error
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="triton"):
            FastDecoder(model, 4, _max_len(model), attn_impl="triton")
    for bad in (dict(keys_per_split=48), dict(attn_block_n=96), dict(attn_num_warps=3)):
        with pytest.raises(ValueError, match="triton attention tiles"):
            FastDecoder(model, 4, _max_len(model), attn_impl="triton", **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("attn_impl", ["triton", "sdpa"])
def test_compiled_and_triton_paths_on_gpu(attn_impl):
    """fp32 (TF32 off), compile=True with the triton split-KV attention or sdpa: codes equal the eager reference's
    at topk=1 and logits within 1e-4 on three fixtures (kernel-1 and kernel-3 FFN, multi-head cross-attention); bf16
    within rel L2 2e-2 of fp32 (teacher-forced); nothing falls back to uncompiled code (user Triton kernels inside
    the compiled functions included)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for case in ("released_small", "multihead_xattn", "decoder_kernel3"):  # compiles per shape: three cases
            model = copy.deepcopy(reference_model(case)).cuda()
            batch = {k: v.cuda() for k, v in infer_inputs(load_batch(case)).items()}
            kw = dict(use_cfg=True, topk=1, keep_logits=True)
            ref = model.infer_batch(batch, use_kv_cache=True, **kw)
            # triton: the split-K Triton GEMMs too (on by default only in fp16/bf16; here IEEE float32 products)
            fd = FastDecoder(model, 4, _max_len(model), attn_impl=attn_impl, bucket=8, compile=True, keys_per_split=16,
                             gemm_kernel=attn_impl == "triton")
            assert fd.gelu_epilogue == (attn_impl == "triton")  # used where the FFN is kernel-1 (not decoder_kernel3)
            out = fd.generate(batch, **kw)
            assert fd.compile_errors == {}
            assert torch.equal(ref.predicted_codes, out.predicted_codes.to(ref.predicted_codes.device))
            for a, b in zip(ref.step_logits, out.step_logits):
                torch.testing.assert_close(b, a.to(b.device), atol=1e-4, rtol=0)
        fd, rel = _rel_l2_vs_fp32_teacher_forced(torch.bfloat16, attn_impl=attn_impl, compile=True,
                                                 gemm_kernel=attn_impl == "triton")
        assert rel < 2e-2 and fd.compile_errors == {}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
def test_gelu_epilogue_is_the_tanh_gelu_on_gpu():
    """What FastDecoder's gelu_epilogue relies on: CUDA's torch._addmm_activation(use_gelu=True) applies the tanh
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
    """fused_kv_write: the kernel stores this step's key/value at position len - 1 and attends them, whatever the
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
