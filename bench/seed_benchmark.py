"""The seed's decoding workload on one GPU: NeMo 3.0.0's loop, the eager reference (cached) and the fast path.

    python bench/seed_benchmark.py [--out DIR] [--parts eager,parity,fast,fast_fp8,nemo] [--quick]
    python bench/seed_benchmark.py --merge DIR ... --out DIR      # one table from runs in separate processes
    python bench/seed_benchmark.py --cpu-smoke ...                 # a tiny model on the CPU: checks the script
    python bench/seed_benchmark.py --shape released --parts sweep,nemo,parity [--sweep 1,8,32,64] [--quick]

Issue 19 adds the **released shape** (``--shape released``: v2607-like decoder_ce, 217 baked context frames, frame
stacking 2, the 2-layer autoregressive local transformer inside the fast step; :data:`RELEASED`) and, for both shapes,
the ``sweep`` part: the fast path at 1, 8, 32 and 64 requests (ms per decoder step, frames/s, x real time, time to
the first frame), beside NeMo's own loop on the same shape (``nemo``; on the released shape with NeMo's local
transformer module). ``--quick`` without a GPU runs the tiny CPU sizes (checks the script end to end in seconds).

``bash bench/gpu_check.sh`` runs it on the device (the eager part in a fresh process, the rest in a second one, one
merged table); bench/RESULTS.md keeps the tables.

Workload (issue #6): 512 requests, 64 per batch, CFG 2.5 (128 rows), attention prior on, 128 text tokens,
160 context frames, 480 generated frames, top-k 80 / temperature 0.7; a released-size random-weight model
(d_model 768, 12 heads, 6 encoder + 12 decoder layers, FFN 3072, encoder kernel 3, decoder kernel 1,
cross-attention 1 head x 128, 8 codebooks x 2024 tokens, 2048 learned positions) built from a MagpieConfig.

Parts: ``eager`` the eager reference (``infer_batch(use_kv_cache=True)``) in fp32 and in bf16 (a bf16 copy of the
model), ``--eager-reps`` interleaved runs each, and a profile of a bf16 step; ``parity`` (TF32 off) the fp32 fast
path against the eager reference at topk=1, and on CUDA bf16 and the float8 K/V cache teacher-forced against fp32;
``fast`` / ``fast_fp8`` the fast path's defaults (bf16 on CUDA) over all requests, without / with the float8 K/V
cache; ``nemo`` NeMo's own loop at sampled steps, extrapolated; ``profile`` torch.profiler over 40 decode steps of the
fast path (``--profile-from``, ``--profile-fp8``). Prints ms per decode step, frames/s, x real time (21.5 frames =
1 s of audio), achieved GB/s against the step's byte floor and the copy bandwidth measured on the card in the same
run. Writes results.json and table.md (card and date on every row) under --out.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fastpath import FastDecoder  # noqa: E402
from parity.nemo_capture import nemo_decoder  # noqa: E402
from reference.config import InferenceParameters, MagpieConfig, TransformerConfig  # noqa: E402
from reference.model import MagpieTTS  # noqa: E402

FRAMES_PER_SECOND = 21.5
N_REQ, BATCH, T_TEXT, T_CTX_FRAMES, N_FRAMES = 512, 64, 128, 160, 480
PARAMS = dict(cfg_scale=2.5, topk=80, temperature=0.7, apply_attention_prior=True, max_decoder_steps=N_FRAMES)
FLOAT8 = dict(kv_cache_dtype=torch.float8_e4m3fn)


def seed_config(tiny: bool = False) -> MagpieConfig:
    """The released model's sizes (768 wide, 12 heads, 6 + 12 layers, xattn 1 x 128, 8 x 2016 codes), or a tiny
    model of the same shape for the CPU smoke run."""
    if tiny:
        d, heads, ffn, n_enc, n_dec, xa_head, pos, C, cb, text = 32, 2, 64, 1, 2, 16, 128, 2, 120, 40
    else:
        d, heads, ffn, n_enc, n_dec, xa_head, pos, C, cb, text = 768, 12, 3072, 6, 12, 128, 2048, 8, 2016, 256
    common = dict(d_model=d, d_ffn=ffn, sa_n_heads=heads, is_causal=True, apply_norm_out=True,
                  max_length_causal_mask=pos, use_learnable_pos_emb=True)
    enc = TransformerConfig(n_layers=n_enc, kernel_size=3, **common)
    dec = TransformerConfig(n_layers=n_dec, kernel_size=1, has_xattn=True, xa_d_memory=d, xa_n_heads=1,
                            xa_d_head=xa_head, apply_norm_to_cond=True, **common)
    return MagpieConfig(
        model_type="decoder_context_tts", d_model=d, num_text_tokens=text, num_audio_codebooks=C, codebook_size=cb,
        num_all_tokens_per_codebook=cb + 8, frame_stacking_factor=1, audio_bos_id=cb, audio_eos_id=cb + 1,
        context_audio_bos_id=cb + 2, context_audio_eos_id=cb + 3, mask_token_id=cb + 4, encoder=enc, decoder=dec,
        use_kv_cache_for_inference=True, inference=InferenceParameters(max_decoder_steps=N_FRAMES),
    )


# The released shape (issue 19): nvidia/magpie_tts_multilingual_357m v2607 as users run it -- decoder_ce with a baked
# speaker table of 217 context frames, frame stacking 2 (2 frames a decoder step, 8 x 2 codebook heads), a 2-layer
# autoregressive local transformer (16 sequential sub-steps a decoder step, CFG on its logits), its causal k=3 text
# encoder, the prior on decoder layers 2-10 and the alignment read from layers 4, 5, 8, 9 (the v2607 fixture's
# scaled-down shape, fixtures/make_fixtures.py). The local transformer as wide as the decoder (the fixture's: no
# in-projection) with 12 heads. Random weights; 128 text tokens, 480 frames = 240 decoder steps, top-k 80,
# temperature 0.6, CFG 2.5, prior on.
RELEASED = dict(baked_frames=217, stacking=2, lt_layers=2, text=128, frames=480,
                params=dict(cfg_scale=2.5, topk=80, temperature=0.6, apply_attention_prior=True))


def released_config(tiny: bool = False, d: int = 768, heads: int = 12, lt_hidden: Optional[int] = None,
                    lt_heads: Optional[int] = None, lt_layers: int = 2, stacking: int = 2, baked_frames: int = 217,
                    speakers: int = 4, frames: int = 480, n_enc: int = 6, n_dec: int = 12, C: int = 8,
                    cb: int = 2016) -> MagpieConfig:
    """The released (v2607-like) decoder_ce shape above; ``tiny`` (or smaller sizes: tests draw them) for the CPU."""
    if tiny:
        d, heads, n_enc, n_dec, C, cb, baked_frames = 32, 2, 1, 3, 2, 120, 12
    lt_hidden = d if lt_hidden is None else lt_hidden
    lt_heads = heads if lt_heads is None else lt_heads
    pos = 2048 if not tiny else 256
    common = dict(d_model=d, d_ffn=4 * d, sa_n_heads=heads, is_causal=True, apply_norm_out=True,
                  max_length_causal_mask=pos, use_learnable_pos_emb=True)
    enc = TransformerConfig(n_layers=n_enc, kernel_size=3, **common)
    dec = TransformerConfig(n_layers=n_dec, kernel_size=1, has_xattn=True, xa_d_memory=d, xa_n_heads=1,
                            xa_d_head=min(128, d), apply_norm_to_cond=True, **common)
    ctx = TransformerConfig(n_layers=1, d_model=d, d_ffn=4 * d, sa_n_heads=heads, kernel_size=1, is_causal=False,
                            max_length_causal_mask=pos, use_learnable_pos_emb=True)
    lt = TransformerConfig(n_layers=lt_layers, d_model=lt_hidden, d_ffn=4 * lt_hidden, sa_n_heads=lt_heads,
                           kernel_size=1, is_causal=True, apply_norm_out=False,
                           max_length_causal_mask=stacking * C + 2, use_learnable_pos_emb=True)
    prior_layers = tuple(i for i in range(2, 11) if i < n_dec) or None
    align = tuple(i for i in (4, 5, 8, 9) if i < n_dec) or None
    return MagpieConfig(
        model_type="decoder_ce", d_model=d, num_text_tokens=256 if not tiny else 40, num_audio_codebooks=C,
        codebook_size=cb, num_all_tokens_per_codebook=cb + 8, frame_stacking_factor=stacking, audio_bos_id=cb,
        audio_eos_id=cb + 1, context_audio_bos_id=cb + 2, context_audio_eos_id=cb + 3, mask_token_id=cb + 4,
        encoder=enc, decoder=dec, use_kv_cache_for_inference=True, local_transformer_type="autoregressive",
        local_transformer=lt, context_encoder=ctx, baked_speakers=speakers, baked_frames=baked_frames,
        inference=InferenceParameters(max_decoder_steps=frames, apply_prior_to_layers=prior_layers,
                                      estimate_alignment_from_layers=align),
    )


def released_model(cfg: MagpieConfig, device="cpu") -> MagpieTTS:
    """A random-weight model of a released-shape config; every baked speaker as long as the table (NeMo's
    baked_context_embedding_len)."""
    model = MagpieTTS(cfg)
    model.baked_context_embedding_len.fill_(cfg.baked_frames)
    return model.to(device).eval()


def released_requests(cfg: MagpieConfig, n: int, batch: int, text: int, seed: int = 0) -> list[dict]:
    """n requests (baked speakers in turn, ``text`` tokens each), in batches of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.num_text_tokens - 2, (n, text), generator=g)
    tokens[:, -1] = cfg.text_eos_id
    spk = torch.arange(n) % cfg.baked_speakers
    return [{"text": tokens[i : i + batch], "text_lens": torch.full((min(batch, n - i),), text),
             "speaker_indices": spk[i : i + batch]} for i in range(0, n, batch)]


def make_requests(cfg: MagpieConfig, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, cfg.num_text_tokens - 2, (n, T_TEXT), generator=g)
    text[:, -1] = cfg.text_eos_id
    ctx = torch.randint(0, cfg.codebook_size, (n, cfg.num_audio_codebooks, T_CTX_FRAMES), generator=g)
    out = []
    for i in range(0, n, BATCH):
        b = min(BATCH, n - i)
        out.append({"text": text[i : i + b], "text_lens": torch.full((b,), T_TEXT),
                    "context_audio_codes": ctx[i : i + b], "context_audio_codes_lens": torch.full((b,), T_CTX_FRAMES)})
    return out


def floor_bytes(model, rows: int, mean_keys: float, dtype_bytes: int, T_text: int,
                kv_bytes: float | None = None) -> dict:
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


DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t, r


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written, median of 10 (GB/s)."""
    n = 2**29
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        sync()
        ts.append(e0.elapsed_time(e1) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(ts) / 1e9


def fast_path_name(fd: FastDecoder) -> str:
    how = "Triton kernels + compile + CUDA graphs" if fd.triton and fd.compile else \
        "Triton kernels, interpreted" if fd.triton else "reference attention ops"
    return f"FastDecoder ({how}{', float8 K/V cache' if fd.kv_fp8 else ''})"


# ---- NeMo's decoder, driven the way MagpieTTSModel.infer_batch drives it --------------------------------------


@torch.no_grad()
def nemo_step_times(model: MagpieTTS, dec, req: dict, steps: list[int], reps: int, autocast_dtype=None) -> dict:
    """Time NeMo's cached step (whole growing sequence in, reset_cache(use_cache=True)) at chosen step indices.

    For step k: reset the cache, run the prefix of T_ctx + k positions once (fills NeMo's cache, untimed), then
    time `reps` consecutive steps, each as infer_batch runs it: embed all audio codes so far, decoder over the
    whole sequence, final_proj over the whole output, CFG, prior state machine, two sampling passes, EOS scan
    (host code: the reference's, which gives NeMo's values; its sampler draws without NeMo's two host syncs per
    codebook since 2026-11-25 round 3, a few ms at most against NeMo's 100+ ms step: the NeMo rows of
    bench/RESULTS.md history were timed before that).
    """
    from reference.inference import PriorState, cross_attention_scores, dummy_cfg_conditioning, find_eos, sample_codes

    c = model.config
    p = InferenceParameters(**{**c.inference.__dict__, **PARAMS})
    dev = next(model.parameters()).device
    req = {k: v.to(dev) for k, v in req.items()}
    B = req["text"].shape[0]
    enc = model.encode_text(req["text"], req["text_lens"])
    ctx_emb, ctx_mask = model.context_embedding(req["context_audio_codes"], req["context_audio_codes_lens"])
    cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(enc.output, enc.mask, ctx_emb, ctx_mask)
    rows, T_text = 2 * B, cond.shape[1]
    text_lens = req["text_lens"].tolist()
    g = torch.Generator(device=dev).manual_seed(1)
    out = {}
    ac = torch.autocast(DEV, dtype=autocast_dtype) if autocast_dtype else torch.autocast(DEV, enabled=False)
    for k in steps:
        codes = torch.randint(0, c.codebook_size, (B, c.num_audio_codebooks, k + 1 + reps), device=dev, generator=g)
        codes[:, :, 0] = c.audio_bos_id
        dec.reset_cache(use_cache=True)
        prior_state = PriorState.new(B)
        prior = torch.full((rows, 1, T_text), p.attention_prior_epsilon, device=dev)

        def run(n_frames):
            emb, lens = model.embed_audio_tokens(codes[:, :, :n_frames], torch.full((B,), n_frames, device=dev))
            emb = torch.cat([emb, emb])
            x = torch.cat([ctx_emb, emb], 1)
            x_mask = torch.cat([ctx_mask, torch.ones(rows, n_frames, dtype=torch.bool, device=dev)], 1)
            with ac:
                o = dec(x, x_mask, cond=cond, cond_mask=cond_mask, attn_prior=prior)
                logits = model.final_proj(o["output"].to(model.final_proj.weight.dtype)) if autocast_dtype is None \
                    else model.final_proj(o["output"])
            lt = logits[:, -1].float()
            lt = (1 - p.cfg_scale) * lt[B:] + p.cfg_scale * lt[:B]
            probs = [a["cross_attn_probabilities"][0].float() for a in o["attn_probabilities"]]
            scores = cross_attention_scores(probs, None)
            att = prior_state.most_attended(scores, text_lens, p.attention_prior_lookahead_window)
            pr = prior_state.build_prior(rows, T_text, text_lens, att, p.attention_prior_epsilon,
                                         p.attention_prior_lookahead_window, {}, dev)
            prior.copy_(pr)
            nxt = sample_codes(lt, c, p.temperature, p.topk, {}, {}, False)
            am = sample_codes(lt, c, 0.01, 1, {}, {}, False)
            find_eos(am, c.audio_eos_id, "any")  # batch-wide (B, C, S) scans, as the reference's loop does
            find_eos(nxt, c.audio_eos_id, "any")
            return nxt

        # The prefix (cache init, untimed): T_ctx + k + 1 positions in one call. NeMo returns every layer's
        # self-attention probabilities and scores, (rows, H, T, T) each: at T ~ 640 that is 56 GB, which infer_batch
        # never holds (its first call is T_ctx + 1 long). Drop them in this untimed call only.
        hooks = [layer.self_attention.register_forward_hook(lambda m, i, o: (o[0], [None, None])) for layer in dec.layers]
        try:
            run(k + 1)
        finally:
            for h in hooks:
                h.remove()
        ts = []
        for r in range(reps):
            dt, _ = timed(lambda: run(k + 2 + r))
            ts.append(dt)
        out[k] = statistics.median(ts)
        del codes
    dec.reset_cache(use_cache=False)
    return out


# ---- parity ---------------------------------------------------------------------------------------------------


def _vs_eager(ref, f, V: int) -> dict:
    """A fast run against the eager one at topk=1: codes, attended positions, the first divergent step (and how close
    to a tie the flip was), the largest logit difference up to it."""
    rc, fc = ref.predicted_codes.cpu(), f.predicted_codes.cpu()
    T = min(rc.shape[2], fc.shape[2])
    diverge = next((k for k in range(T) if not torch.equal(rc[:, :, k], fc[:, :, k])), None)
    if diverge is None and (rc.shape != fc.shape or not torch.equal(ref.predicted_codes_lens, f.predicted_codes_lens)):
        diverge = T
    upto = min(ref.num_steps, f.num_steps) if diverge is None else diverge + 1
    r = {"codes_identical": diverge is None, "first_divergent_step": diverge,
         "attended_identical": ref.attended_text_positions == f.attended_text_positions,
         "max_abs_logit_diff": max((a.to(b.device) - b).abs().max().item()
                                   for a, b in zip(ref.step_logits[:upto], f.step_logits[:upto]))}
    if diverge is not None and diverge < len(ref.step_logits):
        lg = ref.step_logits[diverge].cpu().view(rc.shape[0], -1, V)
        bad = (rc[:, :, diverge] != fc[:, :, diverge]).nonzero()
        if len(bad):
            top2 = lg[bad[0, 0], bad[0, 1]].topk(2).values
            r["flip_top2_gap"] = (top2[0] - top2[1]).item()
    return r


def parity_checks(model: MagpieTTS, req: dict, steps: int) -> dict:
    """TF32 off. fp32 fast vs the eager cached reference at topk=1: the path with the reference's attention ops
    (``triton=False``) and, on CUDA, the defaults (Triton kernels + compile + graphs). Then (CUDA), teacher-forced on
    the fp32 defaults' own codes with the prior off and on: bf16, and the float8 K/V cache in fp32 (its rounding
    alone) and in bf16: relative L2 of the per-step logits, max abs, step 0's relative L2, argmax agreement."""
    B, V = req["text"].shape[0], model.config.num_all_tokens_per_codebook
    max_len = T_CTX_FRAMES + 3 + steps
    kw = dict(use_cfg=True, topk=1, cfg_scale=2.5, apply_attention_prior=True, max_decoder_steps=steps, keep_logits=True)
    ref = model.infer_batch(req, use_kv_cache=True, **kw)
    res = {"steps": steps, "requests": B, "fp32": {}, "forced": {}}
    for label, fkw in [("reference attention ops", dict(triton=False))] + ([("defaults", {})] if DEV == "cuda" else []):
        fd = FastDecoder(model, B, max_len, torch.float32, **fkw)
        f = fd.generate(req, **kw)
        r = res["fp32"][label] = dict(_vs_eager(ref, f, V), path=fast_path_name(fd), compile_errors=fd.compile_errors)
        print(f"[parity] fp32 {r['path']} vs eager cached, topk=1, {B} requests x {steps} steps: {r}", flush=True)
    if DEV != "cuda":
        return res
    own = f.predicted_codes.cpu()  # the fp32 defaults' codes, padded past EOS
    codes = torch.cat([own, torch.zeros(B, own.shape[1], steps).long()], 2)[:, :, :steps].to(DEV)
    teacher = {pr: fd.generate(req, forced_codes=codes, **dict(kw, apply_attention_prior=pr)) for pr in (False, True)}
    del fd
    for label, dt, fkw in [("bf16", torch.bfloat16, {}), ("fp32 + float8 K/V cache", torch.float32, FLOAT8),
                           ("bf16 + float8 K/V cache", torch.bfloat16, FLOAT8)]:
        fd = FastDecoder(model, B, max_len, dt, **fkw)
        res["forced"][label] = {}
        for pr in (False, True):
            o = fd.generate(req, forced_codes=codes, **dict(kw, apply_attention_prior=pr))
            want = torch.stack(teacher[pr].step_logits[: o.num_steps])
            got = torch.stack(o.step_logits[: want.shape[0]])
            agree = (got.view(*got.shape[:2], -1, V).argmax(-1) == want.view(*want.shape[:2], -1, V).argmax(-1))
            r = res["forced"][label][f"prior {'on' if pr else 'off'}"] = {
                "rel_l2": ((got - want).norm() / want.norm()).item(), "max_abs": (got - want).abs().max().item(),
                "logit_scale": want.abs().max().item(), "argmax_agree": agree.float().mean().item(),
                "step0_rel_l2": ((got[0] - want[0]).norm() / want[0].norm()).item(), "compile_errors": fd.compile_errors}
            print(f"[parity] {label} vs fp32, teacher-forced, prior {'on' if pr else 'off'}: {r}", flush=True)
        del fd
    return res


# ---- the fast path ----------------------------------------------------------------------------------------------


def time_fast(model, reqs, dtype, n_batches, results, bw, **fast_kw) -> None:
    """The fast path over n_batches batches x 480 steps (the first batch before them captures the graphs and
    compiles): ms/step = (a 480-step batch - a 4-step batch) / 476, host loop and graph replays included."""
    fd = FastDecoder(model, BATCH, T_CTX_FRAMES + 3 + N_FRAMES, dtype, **fast_kw)
    kw = dict(use_cfg=True, run_all_steps=True, **PARAMS)
    short = dict(kw, max_decoder_steps=4)
    t_first, _ = timed(lambda: fd.generate(reqs[0], **kw))  # captures the graphs
    t_short = statistics.median([timed(lambda: fd.generate(reqs[0], **short))[0] for _ in range(3)])
    totals = []
    if DEV == "cuda":  # peak memory over the timed batches (weights, caches, graph pools, prefill staging)
        torch.cuda.reset_peak_memory_stats()
    for r in reqs[:n_batches]:
        totals.append(timed(lambda: fd.generate(r, **kw))[0])
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    t_full = statistics.median(totals)
    ms_step = (t_full - t_short) / (N_FRAMES - 4) * 1e3
    mean_keys = T_CTX_FRAMES + 2 + 1 + (N_FRAMES - 1) / 2
    db = torch.finfo(dtype).bits // 8
    fb = floor_bytes(fd.model, 2 * BATCH, mean_keys, db, T_TEXT)  # the floor: K/V in the model's dtype
    # a float8 cache moves fewer bytes: its own floor too (values + one scale exponent per head vector)
    fb_own = floor_bytes(fd.model, 2 * BATCH, mean_keys, db, T_TEXT, 1 + 1 / fd.config.decoder.sa_d_head) \
        if fd.kv_fp8 else fb
    r = {"label": fast_path_name(fd), "dtype": str(dtype).split(".")[-1], "triton": fd.triton, "compile": fd.compile,
         "kv_fp8": fd.kv_fp8, "batches_timed": len(totals), "ms_per_step": ms_step, "prefill_and_3_steps_s": t_short,
         "batch_total_s": t_full, "first_batch_s": t_first, "graphs": sum(len(w.graphs) for w in fd._works.values()),
         "compile_errors": fd.compile_errors, "floor_bytes": fb["total"], "floor_ms": fb["total"] / (bw * 1e9) * 1e3,
         "floor_ms_own_cache": fb_own["total"] / (bw * 1e9) * 1e3, "peak_gib": peak_gib}
    r["gbps"] = fb_own["total"] / (ms_step / 1e3) / 1e9  # the bytes this configuration must move
    r["x_floor"] = ms_step / r["floor_ms"]
    r["frames_per_s"] = BATCH / (ms_step / 1e3)
    r["x_realtime"] = r["frames_per_s"] / FRAMES_PER_SECOND
    r["all_512_s"] = t_full * math.ceil(N_REQ / BATCH)
    results.append(r)
    print(f"[fast] {r['label']}, {r['dtype']}: {ms_step:.3f} ms/step, {r['frames_per_s']:.0f} frames/s, "
          f"{r['x_realtime']:.0f}x real time, {r['gbps']:.0f} GB/s = {r['x_floor']:.2f}x floor ({r['floor_ms']:.3f} ms)"
          f"{own_floor(r)}; batch {t_full:.2f} s (prefill+3 steps {t_short:.3f} s), {len(totals)} batches timed, "
          f"first batch {t_first:.1f} s, peak {peak_gib:.2f} GiB allocated, compile errors "
          f"{fd.compile_errors or 'none'}", flush=True)


def profile_fast(model, req, out_dir: Path, fp8: bool, start: int) -> None:
    """torch.profiler over 40 decode steps of the fast path's defaults from step ``start`` (the keys a real run has
    there; CUDA graphs replayed), under no_grad as generate() runs them -> profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from reference.inference import resolve_parameters

    fd = FastDecoder(model, BATCH, T_CTX_FRAMES + 3 + N_FRAMES, torch.bfloat16 if DEV == "cuda" else torch.float32,
                     **(FLOAT8 if fp8 else {}))
    kw = dict(use_cfg=True, run_all_steps=True, **dict(PARAMS, max_decoder_steps=8))
    fd._work(req["text"].shape[0], 2 * req["text"].shape[0], T_TEXT, N_FRAMES)  # buffers for 480 steps
    fd.generate(req, **kw)
    w = next(iter(fd._works.values()))
    p = resolve_parameters(model.config.inference, **dict(PARAMS, max_decoder_steps=8))
    T_ctx = T_CTX_FRAMES + 2
    start = min(start, N_FRAMES // 2)
    end = min(start + 40, N_FRAMES)
    with torch.no_grad():
        for idx in range(8, end):  # warm: every graph the profiled steps replay is captured here
            fd._decode(w, idx, T_ctx, p, (False, False))
        back = end - start  # rewind to step `start`: the profiled steps then read the keys a real run reads there
        w.kv_len.sub_(back), w.pos.sub_(back), w.step.sub_(back)
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
        with profile(activities=acts) as prof:
            for idx in range(start, end):
                fd._decode(w, idx, T_ctx, p, (False, False))
            sync()
    txt = prof.key_averages().table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=40)
    text = (f"{fast_path_name(fd)}, decode steps {start}..{end - 1} ({end - start} steps, keys ~{T_ctx + 1 + start}-"
            f"{T_ctx + end} per row), {2 * BATCH} rows, cuda_graphs={fd.cuda_graphs}\n"
            + (f"compile errors (these ran uncompiled): {fd.compile_errors}\n" if fd.compile_errors else "") + txt)
    (out_dir / "profile.txt").write_text(text)
    print(text[:6000])


# ---- the eager reference ----------------------------------------------------------------------------------------


def run_eager(a, model, reqs, res, bw, t0):
    """Eager cached reference in fp32 and bf16 (a bf16 copy of the model), 480 steps a run, ``--eager-reps`` runs of
    each interleaved (fp32, bf16, fp32, ...): the host-bound step drifts with the lent host by tens of percent within
    minutes, so the table gives the median and the range. Then where a bf16 step's time goes (profiled, CUDA)."""
    steps = (a.eager_steps or N_FRAMES) if not a.quick else 32
    kw = dict(use_cfg=True, use_kv_cache=True, **dict(PARAMS, max_decoder_steps=steps))
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    res["eager"] = {}
    runs: dict[str, list] = {name: [] for name in models}
    t_short = {}
    for name, m in models.items():  # the prefill and first 4 steps, timed apart: the per-step time excludes them
        try:
            m.infer_batch(reqs[1], **dict(kw, max_decoder_steps=4))
            t_short[name] = statistics.median(
                [timed(lambda: m.infer_batch(reqs[1], **dict(kw, max_decoder_steps=4)))[0] for _ in range(2)])
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] eager {name}: {type(e).__name__}: {e}", flush=True)
    for rep in range(max(1, a.eager_reps)):
        for name, m in models.items():
            if name not in t_short:
                continue
            t_e, eo = timed(lambda: m.infer_batch(reqs[0], **kw))
            runs[name].append(((t_e - t_short[name]) / max(1, eo.num_steps - 4) * 1e3, eo.num_steps, t_e))
            print(f"[eager] {name} rep {rep + 1}: {runs[name][-1][0]:.2f} ms/step", flush=True)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if not runs[name]:
            continue
        ms = [r[0] for r in runs[name]]
        e_ms, n_steps = statistics.median(ms), runs[name][0][1]
        fb = floor_bytes(model, 2 * BATCH, T_CTX_FRAMES + 3 + (n_steps - 1) / 2, 4 if dt == torch.float32 else 2, T_TEXT)
        r = {"ms_per_step": e_ms, "ms_per_step_runs": ms, "steps_run": n_steps, "batch_s": runs[name][0][2],
             "frames_per_s": BATCH / (e_ms / 1e3), "gbps": fb["total"] / (e_ms / 1e3) / 1e9,
             "floor_ms": fb["total"] / (bw * 1e9) * 1e3}
        r["x_realtime"] = r["frames_per_s"] / FRAMES_PER_SECOND
        if dt == torch.bfloat16 and DEV == "cuda":
            r["split"] = eager_split(models[name], reqs[0], 48)
            print(r["split"].pop("kernels_table"), flush=True)
        res["eager"][name] = r
        print(f"[eager] {name} cached: {e_ms:.2f} ms/step (median of {len(ms)}: {', '.join(f'{x:.2f}' for x in ms)}) "
              f"over {n_steps} steps, {r['x_realtime']:.0f}x real time; {r.get('split', '')}", flush=True)
    print(f"[t] {time.time() - t0:.0f} s", flush=True)


def eager_split(m, req, steps: int) -> dict:
    """torch.profiler over `steps` eager steps, the host functions of the loop wrapped in record_function:
    wall ms/step (profiler on), GPU kernel ms/step (sum of kernel durations), host ms/step inside each wrapped
    function, device-to-host copies + syncs per step."""
    import reference.inference as inf
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    saved = []

    def wrap(obj, name, label):
        f = getattr(obj, name, None)
        if f is None:  # a function the loop no longer has
            return
        saved.append((obj, name, f, name in vars(obj)))

        def g(*x, **k):
            with record_function(label):
                return f(*x, **k)

        setattr(obj, name, g)

    wrap(inf, "sample_step", "host:sample_step")
    wrap(inf, "find_eos", "host:find_eos")
    wrap(inf.PriorState, "most_attended", "host:prior.most_attended")
    wrap(inf.PriorState, "build_prior", "host:prior.build_prior")
    wrap(type(m.decoder), "forward_cached", "host:decoder.forward_cached")  # class level: infer_batch may copy m
    kw = dict(use_cfg=True, use_kv_cache=True, **dict(PARAMS, max_decoder_steps=steps))
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall, out = timed(lambda: m.infer_batch(req, **kw))
    finally:
        for obj, name, f, own in saved:
            if own:
                setattr(obj, name, f)
            else:
                delattr(obj, name)
    n = out.num_steps
    ev = prof.events()
    # CUDA-side events, less the GPU ranges the profiler draws for the host:* record_function annotations (which
    # would count every kernel inside them a second time)
    gpu = [e for e in ev if e.device_type == DeviceType.CUDA and not e.name.startswith("host:")]
    host: dict = {}
    syncs, sync_us = 0, 0.0
    for e in ev:
        if e.name.startswith("host:"):
            host[e.name[5:]] = host.get(e.name[5:], 0.0) + e.cpu_time_total / 1e3 / n
        if e.device_type == DeviceType.CPU and e.name in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize"):
            syncs += 1
            sync_us += e.time_range.elapsed_us()
    return {"kernels_table": prof.key_averages().table(sort_by="cuda_time_total", row_limit=30),
            "steps": n, "wall_ms_per_step_profiled": wall * 1e3 / n,
            "gpu_kernel_ms_per_step": sum(e.time_range.elapsed_us() for e in gpu) / 1e3 / n,
            "host_ms_per_step_in": host, "memcpy_sync_calls_per_step": syncs / n,
            "memcpy_sync_ms_per_step": sync_us / 1e3 / n, "cuda_kernels_per_step": len(gpu) / n}


# ---- NeMo's loop --------------------------------------------------------------------------------------------------


def run_nemo(a, model, cfg, reqs, res, t0):
    """NeMo's loop: time its step at sampled step indices, extrapolate to 480 steps x 8 batches."""
    steps = [int(s) for s in a.nemo_steps.split(",")] if not a.quick else [1, N_FRAMES // 2, N_FRAMES - 2]
    try:
        dec = nemo_decoder(model)
        # sanity: NeMo's decoder with the reference's weights gives the reference decoder's output
        r0 = {k: v[:2] for k, v in reqs[0].items()}
        with torch.no_grad():
            enc = model.encode_text(r0["text"], r0["text_lens"])
            x = torch.randn(2, 40, cfg.d_model, device=DEV)
            xm = torch.ones(2, 40, dtype=torch.bool, device=DEV)
            a_ = model.decoder(x, xm, enc.output, enc.mask)
            dec.reset_cache(use_cache=False)
            b_ = dec(x, xm, cond=enc.output, cond_mask=enc.mask)["output"]
        res["nemo_vs_reference_decoder_max_abs"] = (a_ - b_).abs().max().item()
        print(f"[nemo] decoder output vs reference decoder (fp32, TF32 off): max|d| = "
              f"{res['nemo_vs_reference_decoder_max_abs']:.2e}", flush=True)
        res["nemo"] = {}
        for name, ad in (("float32", None), ("bf16 autocast", torch.bfloat16)):
            if name not in a.nemo_dtypes.split(","):
                continue
            if time.time() - t0 > a.budget_s + 60:
                print(f"[skip] nemo {name}: budget", flush=True)
                continue
            st = nemo_step_times(model, dec, reqs[0], steps, 2, ad)
            mean_s = statistics.mean(st.values())  # the sampled steps are evenly spaced over the 480
            r = {"requests": reqs[0]["text"].shape[0], "step_s": {str(k): v for k, v in st.items()},
                 "ms_per_step": mean_s * 1e3,
                 "frames_per_s": BATCH / mean_s, "x_realtime": BATCH / mean_s / FRAMES_PER_SECOND,
                 "all_512_s_extrapolated": mean_s * N_FRAMES * math.ceil(N_REQ / BATCH)}
            fb = floor_bytes(model, 2 * BATCH, T_CTX_FRAMES + 3 + (N_FRAMES - 1) / 2, 4 if ad is None else 2, T_TEXT)
            r["gbps_vs_floor"] = fb["total"] / mean_s / 1e9
            res["nemo"][name] = r
            print(f"[nemo] {name}: steps {steps}: " + ", ".join(f"{k}:{v*1e3:.1f}ms" for k, v in st.items()) +
                  f" -> mean {mean_s*1e3:.1f} ms/step", flush=True)
        del dec
    except Exception as e:
        print(f"[fail] nemo: {type(e).__name__}: {e}", flush=True)
        res["nemo_error"] = f"{type(e).__name__}: {e}"


# ---- issue 19: the batch sweep (both shapes) and the released shape's parity and NeMo loop -----------------------

SWEEP = (1, 8, 32, 64)
SAVE: Optional[Path] = None  # --out: results.json rewritten after every sweep row and part (a timeout keeps them)


def save_partial(res: dict) -> None:
    if SAVE is not None:
        (SAVE / "results.json").write_text(json.dumps(res, indent=1, default=str))


def shape_workload(shape: str) -> dict:
    """The decoding workload of a shape: context frames, text tokens, frames, frames a decoder step, parameters."""
    if shape == "released":
        return dict(ctx=RELEASED["baked_frames"], text=RELEASED["text"], frames=RELEASED["frames"],
                    stacking=RELEASED["stacking"], params=dict(RELEASED["params"], max_decoder_steps=RELEASED["frames"]),
                    lt=True)
    return dict(ctx=T_CTX_FRAMES + 2, text=T_TEXT, frames=N_FRAMES, stacking=1, params=dict(PARAMS), lt=False)


def shape_requests(shape: str, cfg, n: int, batch: int) -> list[dict]:
    if shape == "released":
        return [{k: v.to(DEV) for k, v in r.items()} for r in released_requests(cfg, n, batch, shape_workload(shape)["text"])]
    global BATCH
    saved, BATCH = BATCH, batch
    try:
        return [{k: v.to(DEV) for k, v in r.items()} for r in make_requests(cfg, n)]
    finally:
        BATCH = saved


def run_sweep(shape: str, model, cfg, sizes, res: dict, t0: float, budget_s: float) -> None:
    """The fast path's defaults (bf16 on CUDA) at each batch size: ms per decoder step = (a full run - a 4-step run)
    / (steps - 4), frames/s = requests x frames a step / step time, x real time = frames/s / 21.5, and the time to
    the first frame = a request's wall time to its first decoder step's frames after the prefill and one decode step
    (``max_decoder_steps`` = 2 steps, median of 3, host read included). One FastDecoder serves every size (each size
    compiles and captures its own graphs on its first run, untimed)."""
    wl = shape_workload(shape)
    S, steps = wl["stacking"], wl["frames"] // wl["stacking"]
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    fd = FastDecoder(model, max(sizes), wl["ctx"] + 1 + steps, dtype)
    kw = dict(use_cfg=True, run_all_steps=True, use_local_transformer_for_inference=wl["lt"], **wl["params"])
    short = dict(kw, max_decoder_steps=4 * S)
    # the first frame: the prefill and one decode step (EOS allowed from the start: a 2-step run must be valid)
    first = dict(kw, max_decoder_steps=2 * S, min_generated_frames=min(2 * S, kw["min_generated_frames"])
                 if "min_generated_frames" in kw else min(2 * S, model.config.inference.min_generated_frames))
    for B in sizes:
        if time.time() - t0 > budget_s:
            print(f"[skip] sweep {shape} {B}: past the --budget-s", flush=True)
            continue
        req = shape_requests(shape, cfg, B, B)[0]
        t_compile, _ = timed(lambda: fd.generate(req, **kw))  # compiles and captures every bucket's graph
        fd.generate(req, **first)  # its own graphs (other flags) captured, untimed
        ttff = statistics.median([timed(lambda: fd.generate(req, **first))[0] for _ in range(3)])
        t_short = statistics.median([timed(lambda: fd.generate(req, **short))[0] for _ in range(3)])
        t_full = statistics.median([timed(lambda: fd.generate(req, **kw))[0] for _ in range(2)])
        ms = (t_full - t_short) / (steps - 4) * 1e3
        r = {"shape": shape, "requests": B, "label": fast_path_name(fd), "dtype": str(dtype).split(".")[-1],
             "ms_per_step": ms, "frames_per_step": B * S, "frames_per_s": B * S / (ms / 1e3),
             "first_frame_ms": ttff * 1e3, "batch_s": t_full, "first_run_s": t_compile, "steps": steps,
             "compile_errors": fd.compile_errors, "graphs": sum(len(w.graphs) for w in fd._works.values())}
        r["x_realtime"] = r["frames_per_s"] / FRAMES_PER_SECOND
        res.setdefault("sweep", []).append(r)
        save_partial(res)
        print(f"[sweep] {shape} {B} requests: {ms:.3f} ms/decoder step, {r['frames_per_s']:.0f} frames/s, "
              f"{r['x_realtime']:.0f}x real time, first frame {ttff * 1e3:.1f} ms; first run {t_compile:.1f} s, "
              f"compile errors {fd.compile_errors or 'none'}", flush=True)
    del fd


def released_parity(model, cfg, res: dict, steps: int) -> None:
    """TF32 off, fp32: the fast path's defaults with the local transformer against the eager reference
    (``infer_batch(use_kv_cache=True, use_local_transformer_for_inference=True)``) at topk=1, 4 requests."""
    wl = shape_workload("released")
    req = shape_requests("released", cfg, 4, 4)[0]
    kw = dict(use_cfg=True, keep_logits=True, use_local_transformer_for_inference=True,
              **dict(wl["params"], topk=1, max_decoder_steps=steps))
    ref = model.infer_batch(req, use_kv_cache=True, **kw)
    fd = FastDecoder(model, 4, wl["ctx"] + 1 + steps // wl["stacking"], torch.float32)
    f = fd.generate(req, **kw)
    r = dict(_vs_eager(ref, f, cfg.num_all_tokens_per_codebook), path=fast_path_name(fd), steps=steps,
             compile_errors=fd.compile_errors)
    res["parity_released"] = r
    print(f"[parity] released shape, fp32 {r['path']} (local transformer) vs eager cached, topk=1, 4 requests x "
          f"{steps} frames: {r}", flush=True)


def nemo_transformer(tcfg, module):
    """NeMo's transformer_2501.Transformer of a reference Transformer config, loaded with its weights."""
    from parity.nemo_capture import load_nemo_transformer_2501

    t2501 = load_nemo_transformer_2501()
    m = t2501.Transformer(
        n_layers=tcfg.n_layers, d_model=tcfg.d_model, d_ffn=tcfg.d_ffn, sa_n_heads=tcfg.sa_n_heads,
        kernel_size=tcfg.kernel_size, p_dropout=0.0, has_xattn=tcfg.has_xattn, xa_d_memory=tcfg.xa_d_memory,
        xa_n_heads=tcfg.xa_n_heads, xa_d_head=tcfg.xa_d_head, is_causal=tcfg.is_causal,
        apply_norm_to_cond=tcfg.apply_norm_to_cond, apply_norm_out=tcfg.apply_norm_out,
        max_length_causal_mask=tcfg.max_length_causal_mask, use_learnable_pos_emb=tcfg.use_learnable_pos_emb)
    missing, unexpected = m.load_state_dict(module.state_dict(), strict=False)
    if unexpected or not all(k.endswith("causal_mask") for k in missing):
        raise ValueError(f"NeMo's transformer does not take the weights: missing {missing}, unexpected {unexpected}")
    return m.to(device=next(module.parameters()).device).eval()


@torch.no_grad()
def nemo_released_step_times(model, dec, lt, req: dict, steps: list[int], reps: int) -> dict:
    """NeMo's loop on the released shape, a decoder step as MagpieTTSModel.infer_batch runs it with its cached
    decoder (as nemo_step_times: every stacked frame embedded, NeMo's decoder over the whole growing sequence with
    reset_cache(use_cache=True), final_proj over the whole output, CFG, the prior state machine on the prior layers)
    and then NeMo's local transformer sampler (LocalTransformerHelper.sample_autoregressive: NeMo's own LT module,
    reset_cache(use_cache=True), over the growing C*S sequence, sub-step by sub-step; each codebook's projection, CFG
    of its logits, the edits, top-k, temperature, torch.multinomial, the code fed back) and the argmax pass; the
    prefix of each timed step is run once untimed (fills NeMo's caches)."""
    from reference.inference import PriorState, cross_attention_scores, find_eos, restrict_logits, sample_codes
    from reference.inference import dummy_cfg_conditioning, forbidden_tokens, layer_priors

    c = model.config
    wl = shape_workload("released")
    p = InferenceParameters(**{**c.inference.__dict__, **wl["params"]})
    C, S = c.num_audio_codebooks, c.frame_stacking_factor
    dev = next(model.parameters()).device
    B = req["text"].shape[0]
    enc = model.encode_text(req["text"], req["text_lens"])
    ctx_emb, ctx_mask = model.decoder_context(req)
    cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(enc.output, enc.mask, ctx_emb, ctx_mask)
    rows, T_text = 2 * B, cond.shape[1]
    text_lens = req["text_lens"].tolist()
    forbidden = forbidden_tokens(c, False, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    out = {}
    for k in steps:
        codes = torch.randint(0, c.codebook_size, (B, C, S * (k + 1 + reps)), device=dev, generator=g)
        codes[:, :, :S] = c.audio_bos_id
        dec.reset_cache(use_cache=True)
        prior_state = PriorState.new(B)
        prior = torch.full((rows, 1, T_text), p.attention_prior_epsilon, device=dev)

        def run(n_steps):
            emb, _ = model.embed_audio_tokens(codes[:, :, : n_steps * S], torch.full((B,), n_steps * S, device=dev))
            emb = torch.cat([emb, emb])
            x = torch.cat([ctx_emb, emb], 1)
            x_mask = torch.cat([ctx_mask, torch.ones(rows, emb.shape[1], dtype=torch.bool, device=dev)], 1)
            o = dec(x, x_mask, cond=cond, cond_mask=cond_mask, attn_prior=layer_priors(prior, p, c.decoder.n_layers))
            logits = model.final_proj(o["output"])
            lg = logits[:, -1].float()
            lg = (1 - p.cfg_scale) * lg[B:] + p.cfg_scale * lg[:B]
            probs = [a["cross_attn_probabilities"][0].float() for a in o["attn_probabilities"]]
            scores = cross_attention_scores(probs, p.estimate_alignment_from_layers)
            att = prior_state.most_attended(scores, text_lens, p.attention_prior_lookahead_window)
            prior.copy_(prior_state.build_prior(rows, T_text, text_lens, att, p.attention_prior_epsilon,
                                                p.attention_prior_lookahead_window, {}, dev))
            # NeMo's local transformer sampler
            lt.reset_cache(use_cache=True)
            seq = model.local_transformer_in_projection(o["output"][:, -1:])
            preds = []
            for cb in range(C * S):
                h = lt(seq, torch.ones(rows, seq.shape[1], dtype=torch.bool, device=dev))["output"]
                lgc = model.local_transformer_out_projections[cb](h[:, -1])
                lgc[:B] = p.cfg_scale * lgc[:B] + (1.0 - p.cfg_scale) * lgc[B:]
                lgc = restrict_logits(lgc, c, p.topk, {}, {}, forbidden)
                pred = torch.multinomial(torch.softmax(lgc / p.temperature, dim=-1), 1)
                pred[B:] = pred[:B]
                preds.append(pred)
                e = model.local_transformer_in_projection(model.audio_embeddings[cb](pred[:, 0])[:, None])
                seq = torch.cat([seq, e], 1)
            nxt = torch.cat(preds, 1)[:B].reshape(B, S, C).transpose(1, 2)
            am = sample_codes(lg, c, 0.01, 1, {}, {}, False)
            find_eos(am, c.audio_eos_id, "any")
            find_eos(nxt, c.audio_eos_id, "any")
            return nxt

        hooks = [layer.self_attention.register_forward_hook(lambda m, i, o: (o[0], [None, None])) for layer in dec.layers]
        try:
            run(k + 1)  # the prefix, untimed (see nemo_step_times)
        finally:
            for h in hooks:
                h.remove()
        out[k] = statistics.median([timed(lambda: run(k + 2 + r))[0] for r in range(reps)])
        del codes
    dec.reset_cache(use_cache=False)
    lt.reset_cache(use_cache=False)
    return out


def run_nemo_released(a, model, cfg, res: dict, t0: float) -> None:
    """NeMo's loop on the released shape, fp32, 64 requests (the sweep's largest batch): steps timed at a few decoder
    step indices, the mean extrapolated to the 240 steps."""
    wl = shape_workload("released")
    n_steps = wl["frames"] // wl["stacking"]
    steps = [int(s) for s in a.nemo_released_steps.split(",") if int(s) < n_steps - 3]
    B = max(a.sweep_sizes)
    dec = nemo_decoder(model)
    lt = nemo_transformer(cfg.local_transformer, model.local_transformer)
    req = shape_requests("released", cfg, B, B)[0]
    st = nemo_released_step_times(model, dec, lt, req, steps, 2)
    mean_s = statistics.mean(st.values())
    r = {"requests": B, "step_s": {str(k): v for k, v in st.items()}, "ms_per_step": mean_s * 1e3,
         "frames_per_s": B * wl["stacking"] / mean_s, "batch_s_extrapolated": mean_s * n_steps}
    r["x_realtime"] = r["frames_per_s"] / FRAMES_PER_SECOND
    res["nemo_released"] = r
    print(f"[nemo] released shape, fp32, {B} requests: steps {steps}: " +
          ", ".join(f"{k}:{v*1e3:.1f}ms" for k, v in st.items()) + f" -> mean {mean_s*1e3:.1f} ms/decoder step",
          flush=True)


def render_sweep(res: dict) -> list[str]:
    """The issue-19 table: both shapes x the batch sizes, NeMo's loop on each shape as the baseline."""
    rows = res.get("sweep") or []
    nemo = {"seed": (res.get("nemo") or {}).get("float32"), "released": res.get("nemo_released")}
    if not rows and not nemo["released"] and not res.get("parity_released"):  # the seed benchmark alone: its table
        return []
    where = f"{res['info']['card']}, {res['info']['date'][:10]}"
    lines = ["", "Batch sweep (CFG: 2 rows a request; x real time = frames/s / 21.5; released shape: 2 frames a "
             "decoder step):", "",
             "| shape | path | requests | ms/decoder step | frames/s | x real time | first frame (ms) | x NeMo's loop "
             "| card, date | notes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rw, sw = res.get("workload_released") or RELEASED, res["workload"]
    names = {"released": f"released (v2607-like: decoder_ce, {rw['baked_frames']} baked frames, stacking "
                         f"{rw['stacking']}, {rw['lt_layers']}-layer AR LT, {rw['frames']} frames)",
             "seed": f"seed (decoder_context_tts, {sw.get('context', T_CTX_FRAMES)} context frames, no LT, "
                     f"{sw.get('frames', N_FRAMES)} frames)"}
    for shape in ("released", "seed"):
        n = nemo.get(shape)
        if n:
            B = n.get("requests", BATCH)
            lines.append(f"| {names[shape]} | NeMo 3.0.0's loop (fp32) | {B} | {n['ms_per_step']:.1f} | "
                         f"{n['frames_per_s']:.0f} | {n['x_realtime']:.1f} | - | 1 | {where} | steps "
                         f"{list(n['step_s'])} timed, mean extrapolated |")
        for r in sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["requests"]):
            x = n['ms_per_step'] / r['ms_per_step'] * r['requests'] / n.get('requests', BATCH) if n else None
            vs = "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2f}"
            lines.append(f"| {names[shape]} | {r['label']}, {r['dtype']} | {r['requests']} | {r['ms_per_step']:.3f} | "
                         f"{r['frames_per_s']:.0f} | {r['x_realtime']:.0f} | {r['first_frame_ms']:.1f} | {vs} | "
                         f"{where} | {r['steps']} steps, first run (compile + capture) {r['first_run_s']:.1f} s"
                         f"{', compile errors' if r['compile_errors'] else ''} |")
    p = res.get("parity_released")
    if p:
        lines += ["", f"released-shape parity (fp32, TF32 off, 4 requests x {p['steps']} frames, topk=1, local "
                  f"transformer): {p['path']} vs eager cached: codes identical = {p['codes_identical']}, first "
                  f"divergent step = {p['first_divergent_step']}, max |dlogit| = {p['max_abs_logit_diff']:.2e}"]
    return lines


# ---- the table --------------------------------------------------------------------------------------------------


def merge_results(dirs: list[Path], out_dir: Path) -> int:
    """One table from runs made in separate processes (gpu_check.sh times the eager reference in a fresh one):
    later runs add their parts; their fast rows are appended."""
    res: dict = {}
    for d in dirs:
        if not (d / "results.json").exists():  # a process that ended before its first result
            print(f"[skip] merge: no results under {d}", flush=True)
            continue
        part = json.loads((d / "results.json").read_text())
        fast = res.get("fast", []) + part.pop("fast", [])
        sweep = res.get("sweep", []) + part.pop("sweep", [])
        errors = {**res.get("errors", {}), **part.pop("errors", {})}  # each run's failures, none overwritten
        res.update(part)
        res["fast"], res["sweep"] = fast, sweep
        if errors:
            res["errors"] = errors
    table = render_table(res)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "table.md").write_text(table)
    print(table)
    return 0


def own_floor(r: dict) -> str:
    """A float8-cache row's speed against the floor of the bytes it moves (the x floor column: the issue's)."""
    own = r.get("floor_ms_own_cache")
    return "" if own is None or abs(own - r["floor_ms"]) < 1e-9 else \
        f"; {r['ms_per_step'] / own:.2f}x its own floor ({own:.3f} ms, float8 K/V)"


def render_table(res: dict) -> str:
    info = res["info"]
    if not (res.get("fast") or res.get("eager") or res.get("nemo") or res.get("parity")):  # the sweep alone
        return f"card: {info['card']} ({info['sms']} SMs), torch {info['torch']}, {info['date']}\n" + \
            "\n".join(render_sweep(res)) + "\n"
    where = f"{info['card']}, {info['date'][:10]}"
    lines = [f"card: {info['card']} ({info['sms']} SMs), torch {info['torch']}, {info['date']}; copy bandwidth "
             f"{info['copy_gbps']:.0f} GB/s (read+write); {2 * res['workload']['batch']} rows "
             f"({res['workload']['batch']} requests x CFG)", "",
             "| path | dtype | ms/step | frames/s | x real time | GB/s (floor bytes / step time) | x floor | card, date "
             "| notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    nemo_ms = (res.get("nemo") or {}).get("float32", {}).get("ms_per_step")
    wl = res["workload"]
    frames, n_batches = wl["frames"], math.ceil(wl["requests"] / wl["batch"])
    for name, r in (res.get("nemo") or {}).items():
        lines.append(f"| NeMo 3.0.0 transformer_2501 loop | {name} | {r['ms_per_step']:.1f} | {r['frames_per_s']:.0f} | "
                     f"{r['x_realtime']:.1f} | {r['gbps_vs_floor']:.0f} | - | {where} | steps {list(r['step_s'])} timed, "
                     f"mean extrapolated to {frames} steps x {n_batches} batches = {r['all_512_s_extrapolated']:.0f} s |")
    for name, e in (res.get("eager") or {}).items():
        ms = e["ms_per_step_runs"]
        xrt = lambda t: e["x_realtime"] * e["ms_per_step"] / t  # noqa: E731  (frames per step fixed)
        spread = (f"median of {len(ms)} runs ({min(ms):.2f}-{max(ms):.2f} ms/step = {xrt(max(ms)):.0f}-{xrt(min(ms)):.0f}x)"
                  if len(ms) > 1 else "1 run")
        lines.append(f"| eager reference, cached | {name} | {e['ms_per_step']:.2f} | {e['frames_per_s']:.0f} | "
                     f"{e['x_realtime']:.0f} | {e['gbps']:.0f} | {e['ms_per_step']/e['floor_ms']:.1f} | {where} | "
                     f"1 batch x {e['steps_run']} steps, {spread} |")
    for r in res["fast"]:
        vs = f", {nemo_ms / r['ms_per_step']:.0f}x NeMo fp32" if nemo_ms else ""
        peak = "" if math.isnan(r["peak_gib"]) else f"; peak {r['peak_gib']:.2f} GiB allocated"
        lines.append(f"| {r['label']} | {r['dtype']} | {r['ms_per_step']:.3f} | {r['frames_per_s']:.0f} | "
                     f"{r['x_realtime']:.0f} | {r['gbps']:.0f} | {r['x_floor']:.2f} | {where} | {r['batches_timed']} "
                     f"batch(es) x {frames} steps, {r['graphs']} graph(s){vs}; {wl['requests']} requests "
                     f"{r['all_512_s']:.1f} s{peak}{own_floor(r)} |")
    p = res.get("parity")
    if p:
        fp32 = "; ".join(f"{k}: codes identical = {r['codes_identical']}, first divergent step = "
                         f"{r['first_divergent_step']}, max |dlogit| = {r['max_abs_logit_diff']:.2e}"
                         for k, r in p["fp32"].items())
        lines += ["", f"parity (TF32 off, {p['requests']} requests x {p['steps']} steps, topk=1): fp32 fast vs eager "
                  f"cached, {fp32}"]
        if p["forced"]:
            lines[-1] += ("; teacher-forced on the fp32 defaults' codes, rel L2 prior off / on (argmax agreement): " +
                          ", ".join(f"{k} {r['prior off']['rel_l2']:.2e} / {r['prior on']['rel_l2']:.2e} "
                                    f"({r['prior off']['argmax_agree']:.4f} / {r['prior on']['argmax_agree']:.4f})"
                                    for k, r in p["forced"].items()))
    if "nemo_vs_reference_decoder_max_abs" in res:
        lines.append(f"NeMo's decoder with the reference's weights vs the reference decoder (fp32): max |d| = "
                     f"{res['nemo_vs_reference_decoder_max_abs']:.2e}")
    lines += render_sweep(res)
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    global DEV, N_REQ, N_FRAMES, T_CTX_FRAMES, T_TEXT, BATCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--parts", default="eager,parity,fast,fast_fp8,nemo",
                    help="comma-separated subset of: eager, parity, fast, fast_fp8, nemo, profile")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge the results.json of these earlier runs into one table under --out")
    ap.add_argument("--quick", action="store_true", help="fewer batches and steps")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, times nothing")
    ap.add_argument("--parity-steps", type=int, default=96)
    ap.add_argument("--eager-steps", type=int, default=None, help="default: all 480")
    ap.add_argument("--eager-reps", type=int, default=3, help="runs of each eager dtype, interleaved")
    ap.add_argument("--nemo-steps", default="1,80,160,240,320,400,478")
    ap.add_argument("--profile-from", type=int, default=220, help="first decode step profiled (40 steps)")
    ap.add_argument("--profile-fp8", action="store_true", help="profile the float8 K/V cache instead")
    ap.add_argument("--budget-s", type=float, default=480, help="skip NeMo's bf16 row once this much time has passed")
    ap.add_argument("--shape", choices=("seed", "released"), default="seed",
                    help="seed: the workload above; released: the v2607-like decoder_ce shape (issue 19), parts "
                         "sweep, parity, nemo")
    ap.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="batch sizes of the sweep part")
    ap.add_argument("--nemo-dtypes", default="float32,bf16 autocast", help="NeMo loop rows of the seed shape")
    ap.add_argument("--nemo-released-steps", default="1,60,120,180,235",
                    help="decoder steps timed of NeMo's loop on the released shape")
    a = ap.parse_args(argv)
    t0 = time.time()
    global SAVE
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.merge:
        return merge_results([Path(d) for d in a.merge], out_dir)
    a.sweep_sizes = [int(b) for b in a.sweep.split(",")]
    SAVE = out_dir
    if a.quick and not torch.cuda.is_available():  # --quick without a GPU: the tiny CPU model
        a.cpu_smoke = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.cpu_smoke:  # a tiny model and workload, to check the script without a GPU
        DEV, N_REQ, BATCH, N_FRAMES, T_CTX_FRAMES, T_TEXT = "cpu", 8, 4, 24, 10, 12
        PARAMS["max_decoder_steps"] = N_FRAMES
        a.nemo_steps = "1,10,20"
        RELEASED.update(baked_frames=12, text=12, frames=24)
        a.sweep_sizes = [min(b, 4) for b in a.sweep_sizes][:2] if a.quick else [1, 4]
        a.nemo_released_steps = "1,5"
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, sms, mem = props.name, props.multi_processor_count, props.total_memory / 2**30
    else:
        card, sms, mem = "cpu", 0, 0
    info = {"card": card, "sms": sms, "mem_gib": mem, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print("[info]", info, flush=True)
    bw = copy_bandwidth() if DEV == "cuda" else 10.0
    info["copy_gbps"] = bw
    print(f"[info] device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    torch.manual_seed(0)
    if a.shape == "released":
        return main_released(a, info, out_dir, t0)
    cfg = seed_config(tiny=a.cpu_smoke)
    model = MagpieTTS(cfg).to(DEV).eval()
    n_batches = 2 if a.quick else math.ceil(N_REQ / BATCH)
    reqs = [{k: v.to(DEV) for k, v in r.items()} for r in make_requests(cfg, N_REQ)]
    res = {"info": info, "workload": dict(requests=N_REQ, batch=BATCH, rows=2 * BATCH, text=T_TEXT, context=T_CTX_FRAMES,
                                          frames=N_FRAMES, **PARAMS), "fast": []}
    parts = set(a.parts.split(","))
    unknown = parts - {"eager", "parity", "fast", "fast_fp8", "nemo", "profile", "sweep"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}")
    import gc

    def attempt(name: str, fn) -> None:
        """Run one part; a failure is printed (traceback and a [fail] line), not raised."""
        try:
            fn()
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] {name}: {type(e).__name__}: {e}", flush=True)
        save_partial(res)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        print(f"[t] {time.time() - t0:.0f} s", flush=True)

    main_dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    if "eager" in parts:
        attempt("eager", lambda: run_eager(a, model, reqs, res, bw, t0))
    if "parity" in parts:
        attempt("parity", lambda: res.__setitem__(
            "parity", parity_checks(model, reqs[0], 16 if a.quick else min(a.parity_steps, N_FRAMES))))
    if "fast" in parts:
        attempt("fast", lambda: time_fast(model, reqs, main_dt, n_batches, res["fast"], bw))
    if "fast_fp8" in parts:
        if DEV == "cuda":
            attempt("fast fp8", lambda: time_fast(model, reqs, main_dt, n_batches, res["fast"], bw, **FLOAT8))
        else:
            print("[skip] fast_fp8: the float8 K/V cache needs the Triton kernels (CUDA)", flush=True)
    if "sweep" in parts:
        attempt("sweep", lambda: run_sweep("seed", model, cfg, a.sweep_sizes, res, t0, a.budget_s))
    if "nemo" in parts:
        attempt("nemo", lambda: run_nemo(a, model, cfg, reqs, res, t0))
    if "profile" in parts:
        attempt("profile", lambda: profile_fast(model, reqs[0], out_dir, a.profile_fp8, a.profile_from))
    table = render_table(res)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "table.md").write_text(table)
    print(table)
    return 0


def main_released(a, info: dict, out_dir: Path, t0: float) -> int:
    """--shape released: the sweep, parity and NeMo's loop on the v2607-like shape; results.json and table.md."""
    import gc

    cfg = released_config(tiny=a.cpu_smoke, frames=RELEASED["frames"], baked_frames=RELEASED["baked_frames"])
    model = released_model(cfg, DEV)
    wl = shape_workload("released")
    res = {"info": info, "workload": dict(requests=max(a.sweep_sizes), batch=max(a.sweep_sizes), text=wl["text"],
                                          context=wl["ctx"], frames=wl["frames"], **wl["params"]),
           "workload_released": dict(shape="released", **{k: v for k, v in RELEASED.items()}), "fast": []}
    parts = set(a.parts.split(",")) & {"sweep", "parity", "nemo"}
    for name, fn in (("sweep", lambda: run_sweep("released", model, cfg, a.sweep_sizes, res, t0, a.budget_s)),
                     ("nemo", lambda: run_nemo_released(a, model, cfg, res, t0)),
                     ("parity", lambda: released_parity(model, cfg, res, 16 if a.quick else 48))):
        if name not in parts:
            continue
        try:
            fn()
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] released {name}: {type(e).__name__}: {e}", flush=True)
            res.setdefault("errors", {})[f"released {name}"] = f"{type(e).__name__}: {e}"
        save_partial(res)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
        print(f"[t] {time.time() - t0:.0f} s", flush=True)
    table = render_table(res)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
