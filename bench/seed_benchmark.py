"""The seed's decoding workload on one GPU: eager reference (cached), FastDecoder, and NeMo 3.0.0's loop.

    python bench/seed_benchmark.py [--out DIR] [--quick]

Workload (issue #6): 512 requests, 64 per batch, CFG 2.5 (128 rows), attention prior on, 128 text tokens,
160 context frames, 480 generated frames, top-k 80 / temperature 0.7; a released-size random-weight model
(d_model 768, 12 heads, 6 encoder + 12 decoder layers, FFN 3072, encoder kernel 3, decoder kernel 1,
cross-attention 1 head x 128, 8 codebooks x 2024 tokens, 2048 learned positions) built from a MagpieConfig.

Prints ms per decode step, frames/s, x real time (21.5 frames = 1 s of audio), achieved GB/s against the
step's byte floor and the copy bandwidth measured on the card in the same run. Parity checks run first with
TF32 off. Writes results.json, table.md and profile.txt under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if os.environ.get("REFERENCE_PATH"):  # time another copy of reference/ (e.g. the previous commit's) on the same card
    sys.path.insert(0, os.environ["REFERENCE_PATH"])

from reference.config import InferenceParameters, MagpieConfig, TransformerConfig  # noqa: E402
from fastpath.decoder import FastDecoder, floor_bytes  # noqa: E402
from parity.nemo_capture import nemo_decoder  # noqa: E402
from reference.model import MagpieTTS  # noqa: E402

FRAMES_PER_SECOND = 21.5
N_REQ, BATCH, T_TEXT, T_CTX_FRAMES, N_FRAMES = 512, 64, 128, 160, 480
PARAMS = dict(cfg_scale=2.5, topk=80, temperature=0.7, apply_attention_prior=True, max_decoder_steps=N_FRAMES)


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


# ---- NeMo's decoder, driven the way MagpieTTSModel.infer_batch drives it --------------------------------------


@torch.no_grad()
def nemo_step_times(model: MagpieTTS, dec, req: dict, steps: list[int], reps: int, autocast_dtype=None) -> dict:
    """Time NeMo's cached step (whole growing sequence in, reset_cache(use_cache=True)) at chosen step indices.

    For step k: reset the cache, run the prefix of T_ctx + k positions once (fills NeMo's cache, untimed), then
    time `reps` consecutive steps, each as infer_batch runs it: embed all audio codes so far, decoder over the
    whole sequence, final_proj over the whole output, CFG, prior state machine, two sampling passes, EOS scan
    (host code: the reference's, which gives NeMo's values; its sampler draws without NeMo's two host syncs per
    codebook since 2026-11-25 round 3, a few ms at most against NeMo's 100+ ms step: the NeMo rows of
    RESULTS-seed.md were timed before that).
    """
    from reference.inference import PriorState, cross_attention_scores, find_eos, sample_codes

    c = model.config
    p = InferenceParameters(**{**c.inference.__dict__, **PARAMS})
    dev = next(model.parameters()).device
    req = {k: v.to(dev) for k, v in req.items()}
    B = req["text"].shape[0]
    enc = model.encode_text(req["text"], req["text_lens"])
    ctx_emb, ctx_mask = model.context_embedding(req["context_audio_codes"], req["context_audio_codes_lens"])
    dummy = torch.zeros_like(enc.mask)
    dummy[:, 0] = True
    cond, cond_mask = torch.cat([enc.output, torch.zeros_like(enc.output)]), torch.cat([enc.mask, dummy])
    ctx_emb = torch.cat([ctx_emb, torch.zeros_like(ctx_emb)])
    ctx_mask = torch.cat([ctx_mask, torch.ones_like(ctx_mask)])
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


def parity_checks(model: MagpieTTS, req: dict, steps: int) -> dict:
    res = {}
    # "triton+compile": the fast path's default configuration (the table's fast row), here in float32
    for impl in ("math", "auto") + (("triton+compile",) if DEV == "cuda" else ()):
        res.update(_parity(model, req, steps, impl))
    return res


def _parity(model: MagpieTTS, req: dict, steps: int, impl: str) -> dict:
    """fp32 fast vs eager cached reference at topk=1 (codes, logits); fp16/bf16 fast logits vs fp32 fast logits
    teacher-forced on the fp32 codes. TF32 is off here."""
    res = {}
    kw = dict(use_cfg=True, topk=1, cfg_scale=2.5, apply_attention_prior=True, max_decoder_steps=steps, keep_logits=True)
    t, ref = timed(lambda: model.infer_batch(req, use_kv_cache=True, **kw))
    B = req["text"].shape[0]
    fast32 = FastDecoder(model, B, T_CTX_FRAMES + 3 + steps, torch.float32, attn_impl=impl.split("+")[0],
                         compile=impl.endswith("+compile"))
    f = fast32.generate(req, **kw)
    same = torch.equal(ref.predicted_codes.cpu(), f.predicted_codes.cpu()) and torch.equal(ref.predicted_codes_lens, f.predicted_codes_lens)
    n = min(ref.num_steps, f.num_steps)
    # first divergence (if any) and the logit gap up to it
    rc, fc = ref.predicted_codes.cpu(), f.predicted_codes.cpu()
    T = min(rc.shape[2], fc.shape[2])
    diverge = next((k for k in range(T) if not torch.equal(rc[:, :, k], fc[:, :, k])), None)
    upto = n if diverge is None else diverge + 1
    dl = max((a.to(b.device) - b).abs().max().item() for a, b in zip(ref.step_logits[:upto], f.step_logits[:upto]))
    if diverge is not None:  # how close to a tie was the flip?
        lg = ref.step_logits[diverge].cpu().view(B, -1, model.config.num_all_tokens_per_codebook)
        bad = (rc[:, :, diverge] != fc[:, :, diverge]).nonzero()[0].tolist()
        top2 = lg[bad[0], bad[1]].topk(2).values
        res["fp32_divergence_top2_gap"] = (top2[0] - top2[1]).item()
        print(f"[parity] first flip at step {diverge}, item {bad[0]} codebook {bad[1]}: eager top-2 logit gap "
              f"{res['fp32_divergence_top2_gap']:.2e}")
    res.update(fp32_codes_identical=bool(same), fp32_first_divergent_step=diverge, fp32_max_abs_logit_diff=dl,
               fp32_compile_errors=fast32.compile_errors)
    if impl != "auto":
        res = {f"{k}_{impl}": v for k, v in res.items()}
        print(f"[parity] ({impl} attention) fp32 codes identical={same}, max|dlogit|={dl:.2e}, first divergence={diverge}")
        return res
    res["fp32_attn_impl"] = fast32.attn_impl
    res["fp32_attended_identical"] = ref.attended_text_positions == f.attended_text_positions
    res["steps"] = steps
    res["eager_steps_run"] = ref.num_steps
    print(f"[parity] fp32 fast vs eager cached, topk=1, {B} requests x {steps} steps: codes identical={same}, "
          f"attended identical={res['fp32_attended_identical']}, max|dlogit|={dl:.2e}, first divergence={diverge}")
    codes = torch.cat([f.predicted_codes.cpu(), torch.zeros(B, f.predicted_codes.shape[1], steps)
                       .long()], 2)[:, :, :steps].to(DEV)  # fp32's own codes, padded past EOS
    codes32 = fast32.generate(req, forced_codes=codes, **kw)
    kw_np = dict(kw, apply_attention_prior=False)
    codes32_np = fast32.generate(req, forced_codes=codes, **kw_np)
    del fast32
    for name, dt, prior in [(n, d, pr) for pr in (True, False) for n, d in (("fp16", torch.float16), ("bf16", torch.bfloat16))
                            ] if DEV == "cuda" else ():
        fd = FastDecoder(model, B, T_CTX_FRAMES + 3 + steps, dt)
        o = fd.generate(req, forced_codes=codes, **(kw if prior else kw_np))
        ref_l = torch.stack((codes32 if prior else codes32_np).step_logits[: o.num_steps])
        if not prior:
            name = name + "_noprior"
        got = torch.stack(o.step_logits[: ref_l.shape[0]])
        rel = ((got - ref_l).norm() / ref_l.norm()).item()
        mx = (got - ref_l).abs().max().item()
        agree = (got.view(*got.shape[:2], -1, model.config.num_all_tokens_per_codebook).argmax(-1) ==
                 ref_l.view(*ref_l.shape[:2], -1, model.config.num_all_tokens_per_codebook).argmax(-1)).float().mean().item()
        res[f"{name}_rel_l2"] = rel
        res[f"{name}_max_abs"] = mx
        res[f"{name}_logit_scale"] = ref_l.abs().max().item()
        res[f"{name}_argmax_agree"] = agree
        res[f"{name}_attn_impl"] = fd.attn_impl
        res[f"{name}_step0_rel_l2"] = ((got[0] - ref_l[0]).norm() / ref_l[0].norm()).item()
        print(f"[parity] {name} ({fd.attn_impl}) vs fp32 fast, teacher-forced: step-0 rel L2={res[f'{name}_step0_rel_l2']:.2e}, rel L2={rel:.2e}, max|d|={mx:.3f} "
              f"(max|logit|={res[f'{name}_logit_scale']:.2f}), argmax agreement={agree:.4f}")
        del fd
    return res


# ---- the fast path ----------------------------------------------------------------------------------------------


def time_fast(model, reqs, dtype, attn_impl, n_batches, label, results, bw, T_text, **fast_kw) -> dict:
    fd = FastDecoder(model, BATCH, T_CTX_FRAMES + 3 + N_FRAMES, dtype, attn_impl=attn_impl, **fast_kw)
    kw = dict(use_cfg=True, run_all_steps=True, **PARAMS)
    short = dict(kw, max_decoder_steps=4)
    t_first, _ = timed(lambda: fd.generate(reqs[0], **kw))  # captures the graphs
    t_short = statistics.median([timed(lambda: fd.generate(reqs[0], **short))[0] for _ in range(3)])
    totals = []
    if DEV == "cuda":  # peak memory over the timed batches (weights, caches, graph pools, prefill staging)
        torch.cuda.reset_peak_memory_stats()
    for r in reqs[:n_batches]:
        dt, out = timed(lambda: fd.generate(r, **kw))
        totals.append(dt)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    t_full = statistics.median(totals)
    ms_step = (t_full - t_short) / (N_FRAMES - 4) * 1e3
    rows = 2 * BATCH
    mean_keys = T_CTX_FRAMES + 2 + 1 + (N_FRAMES - 1) / 2
    db = torch.finfo(dtype).bits // 8
    fb = floor_bytes(fd.model, rows, mean_keys, db, T_text)  # the issue's floor: K/V in the model's dtype
    # a float8 cache moves fewer bytes: its own floor too (values + one scale exponent per head vector)
    fb_own = floor_bytes(fd.model, rows, mean_keys, db, T_text, 1 + 1 / fd.config.decoder.sa_d_head) if fd.kv_fp8 \
        else fb
    r = {
        "label": label, "dtype": str(dtype).split(".")[-1], "attn_impl": fd.attn_impl, "batches_timed": len(totals),
        "ms_per_step": ms_step, "prefill_and_3_steps_s": t_short, "batch_total_s": t_full, "first_batch_s": t_first,
        "graphs": sum(len(w.graphs) for w in fd._works.values()), "compile": fd.compile,
        "compile_errors": fd.compile_errors,
        **{k: str(v) if isinstance(v, torch.dtype) else v for k, v in fast_kw.items() if k != "compile"},
        "floor_bytes": fb["total"], "floor_ms": fb["total"] / (bw * 1e9) * 1e3,
        "floor_ms_own_cache": fb_own["total"] / (bw * 1e9) * 1e3, "peak_gib": peak_gib,
    }
    r["gbps"] = fb_own["total"] / (ms_step / 1e3) / 1e9  # the bytes this configuration must move
    r["x_floor"] = ms_step / r["floor_ms"]
    r["frames_per_s"] = BATCH / (ms_step / 1e3)
    r["x_realtime"] = r["frames_per_s"] / FRAMES_PER_SECOND
    r["all_512_s"] = t_full * math.ceil(N_REQ / BATCH)
    results.append(r)
    own = (f", {ms_step / r['floor_ms_own_cache']:.2f}x its float8-cache floor ({r['floor_ms_own_cache']:.3f} ms)"
           if fd.kv_fp8 else "")
    print(f"[fast] {label}: {ms_step:.3f} ms/step, {r['frames_per_s']:.0f} frames/s, {r['x_realtime']:.0f}x real time, "
          f"{r['gbps']:.0f} GB/s = {r['x_floor']:.2f}x floor ({r['floor_ms']:.3f} ms){own}; batch {t_full:.2f} s "
          f"(prefill+3 steps {t_short:.3f} s), {len(totals)} batches timed, peak {peak_gib:.2f} GiB allocated",
          flush=True)
    return fd


def run_nemo(a, model, cfg, reqs, res, t0):
    """NeMo's loop: time its step at sampled step indices, extrapolate to 480 steps x 8 batches."""
    if not a.skip_nemo:
        steps = [int(s) for s in a.nemo_steps.split(",")] if not a.quick else [1, 240, 478]
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
                if time.time() - t0 > a.budget_s + 60:
                    print(f"[skip] nemo {name}: budget", flush=True)
                    continue
                st = nemo_step_times(model, dec, reqs[0], steps, 2, ad)
                mean_s = statistics.mean(st.values())  # the sampled steps are evenly spaced over the 480
                r = {"step_s": {str(k): v for k, v in st.items()}, "ms_per_step": mean_s * 1e3,
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


def profile_fast(model, req, out_dir: Path, fast_kw=None, graphs_list=None, fname="profile.txt", start: int = 24) -> None:
    from torch.profiler import ProfilerActivity, profile

    from reference.inference import resolve_parameters

    text = ""
    fast_kw = fast_kw or {}
    for graphs in graphs_list or ((False, True) if DEV == "cuda" else (False,)):
        fd = FastDecoder(model, BATCH, T_CTX_FRAMES + 3 + N_FRAMES, torch.bfloat16 if DEV == "cuda" else torch.float32,
                         cuda_graphs=graphs, **fast_kw)
        kw = dict(use_cfg=True, run_all_steps=True, **dict(PARAMS, max_decoder_steps=8))
        fd._work(req["text"].shape[0], 2 * req["text"].shape[0], T_TEXT, N_FRAMES)  # buffers for 480 steps
        fd.generate(req, **kw)
        w = next(iter(fd._works.values()))
        p = resolve_parameters(model.config.inference, **dict(PARAMS, max_decoder_steps=8))
        T_ctx = T_CTX_FRAMES + 2
        start = min(start, N_FRAMES // 2)
        end = min(start + 40, N_FRAMES)
        # no_grad as generate() runs: under grad mode the compiled functions would be traced again for it, and the
        # GELU epilogue (torch._addmm_activation, no autograd formula) would fall back to uncompiled code
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
        if os.environ.get("PROFILE_TRACE"):  # the kernels' timeline (which streams overlap): bench/trace_overlap.py
            prof.export_chrome_trace(str(out_dir / f"trace-{fname.rsplit('.', 1)[0]}-graphs{int(graphs)}.json"))
        txt = prof.key_averages().table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=40)
        text += (f"bf16 fast path {fast_kw}, attn {fd.attn_impl}, decode steps {start}..{end - 1} only "
                 f"({end - start} steps, keys ~{T_ctx + 1 + start}-{T_ctx + end} per row), 128 rows, "
                 f"cuda_graphs={graphs}\n"
                 + (f"compile errors (these ran uncompiled): {fd.compile_errors}\n" if fd.compile_errors else "")
                 + f"{txt}\n\n")
        del fd, w
    (out_dir / fname).write_text(text)
    print(text[:6000])


def main(argv=None) -> int:
    global DEV, N_REQ, N_FRAMES, T_CTX_FRAMES, T_TEXT, BATCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true", help="fewer batches and steps (smoke test)")
    ap.add_argument("--parity-steps", type=int, default=96)
    ap.add_argument("--eager-steps", type=int, default=None, help="default: all 480")
    ap.add_argument("--eager-reps", type=int, default=3, help="runs of each eager dtype (eager2 part), interleaved")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="only merge the results.json of these earlier runs into one table under --out")
    ap.add_argument("--nemo-steps", default="1,80,160,240,320,400,478")
    ap.add_argument("--skip-nemo", action="store_true")
    ap.add_argument("--opt-only", default="", help="comma-separated labels of OPT_VARIANTS to time (default all)")
    ap.add_argument("--profile-attn", default="sdpa", help="attention of the profile_opt part")
    ap.add_argument("--profile-from", type=int, default=24, help="first decode step profiled (40 steps) by profile_opt")
    ap.add_argument("--opt-batches", type=int, default=2, help="batches timed per speed-up variant")
    ap.add_argument("--parts", default="parity,fast,nemo,eager2",
                    help="comma-separated subset (default: the headline table); also: variants, eager (fp32 only), "
                         "profile, fast_sdpa, fast_fp8, parity_opt, opt, profile_opt")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, times nothing")
    ap.add_argument("--budget-s", type=float, default=480, help="skip optional parts once this much time has passed")
    a = ap.parse_args(argv)
    t0 = time.time()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.merge:
        return merge_results([Path(d) for d in a.merge], out_dir)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if os.environ.get("BENCH_BLAS"):  # e.g. cublaslt: which BLAS torch's GEMMs go to (bench/gpu_round10.sh)
        torch.backends.cuda.preferred_blas_library(os.environ["BENCH_BLAS"])
        print(f"[t] preferred BLAS library: {torch.backends.cuda.preferred_blas_library()}", flush=True)
    if a.cpu_smoke:  # a tiny model and workload, to check the script without a GPU
        DEV, N_REQ, BATCH, N_FRAMES, T_CTX_FRAMES, T_TEXT = "cpu", 8, 4, 24, 10, 12
        PARAMS["max_decoder_steps"] = N_FRAMES
        a.nemo_steps = "1,10,20"
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        card, sms, mem = props.name, props.multi_processor_count, props.total_memory / 2**30
    else:
        card, sms, mem = "cpu", 0, 0
    info = {"card": card, "sms": sms, "mem_gib": mem,
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print("[info]", info, flush=True)
    bw = copy_bandwidth() if DEV == "cuda" else 10.0
    info["copy_gbps"] = bw
    print(f"[info] device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    torch.manual_seed(0)
    cfg = seed_config(tiny=a.cpu_smoke)
    model = MagpieTTS(cfg).to(DEV).eval()
    n_batches = 2 if a.quick else math.ceil(N_REQ / BATCH)
    reqs = [{k: v.to(DEV) for k, v in r.items()} for r in make_requests(cfg, N_REQ)]
    res = {"info": info, "workload": dict(requests=N_REQ, batch=BATCH, rows=2 * BATCH, text=T_TEXT, context=T_CTX_FRAMES,
                                          frames=N_FRAMES, **PARAMS), "fast": []}
    parts = set(a.parts.split(","))
    if "parity" in parts:
        res["parity"] = parity_checks(model, reqs[0], 16 if a.quick else min(a.parity_steps, N_FRAMES))
    print(f"[t] {time.time() - t0:.0f} s", flush=True)

    # fast path variants (TF32 stays off: fp32 numbers are true fp32)
    import gc

    main_dt = torch.bfloat16 if DEV == "cuda" else torch.float32

    def attempt(name: str, fn) -> None:
        """Run one fast-path timing; a failure is printed (traceback and a [fail] line), not raised."""
        try:
            fn()
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] {name}: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()

    if "fast" in parts:  # the defaults (NOTES-fast.md): split-KV Triton attention + compiled layer work
        if DEV == "cuda":
            attempt("fast bf16", lambda: time_fast(model, reqs, main_dt, "triton", n_batches, "fast bf16 triton+compile",
                                                   res["fast"], bw, T_TEXT, compile=True))
        else:
            attempt("fast", lambda: time_fast(model, reqs, main_dt, "auto", n_batches, "fast", res["fast"], bw, T_TEXT))
    if "fast_fp8" in parts:  # the float8 K/V cache over all batches, with the tiles of $ATTN_KW_FP8 (attn_sweep --fp8)
        attempt("fast fp8", lambda: time_fast(model, reqs, main_dt, "triton", n_batches,
                                              "fast bf16 triton+compile, float8 K/V cache", res["fast"], bw, T_TEXT,
                                              compile=True, kv_cache_dtype=torch.float8_e4m3fn,
                                              **json.loads(os.environ.get("ATTN_KW_FP8") or "{}")))
    if "fast_sdpa" in parts:  # the bucketed sdpa path over all batches too
        attempt("fast bf16 sdpa", lambda: time_fast(model, reqs, main_dt, "sdpa", n_batches, "fast bf16 sdpa+buckets",
                                                    res["fast"], bw, T_TEXT))
    if "nemo" in parts:
        run_nemo(a, model, cfg, reqs, res, t0)
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    variants = ((torch.float16, "auto", "fast fp16"), (torch.bfloat16, "sdpa", "fast bf16 sdpa+buckets"),
                (torch.float32, "auto", "fast fp32")) if DEV == "cuda" else ((torch.float32, "math", "fast fp32"),)
    for dt, impl, label in variants if "variants" in parts else ():
        if time.time() - t0 > a.budget_s:
            print(f"[skip] {label}: budget", flush=True)
            continue
        try:
            time_fast(model, reqs, dt, impl, 1, label, res["fast"], bw, T_TEXT)
        except Exception as e:  # report, keep going
            print(f"[fail] {label}: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print(f"[t] {time.time() - t0:.0f} s", flush=True)

    if "parity_opt" in parts:
        try:
            res["parity_opt"] = parity_opt(model, reqs[0], 16 if a.quick else min(a.parity_steps, N_FRAMES))
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] parity_opt: {type(e).__name__}: {e}", flush=True)
        print(f"[t] {time.time() - t0:.0f} s", flush=True)
    if "opt" in parts:
        run_opt(a, model, reqs, res, bw, t0)
    if "eager" in parts:
        run_eager(a, model, reqs, res, bw, t0)
    if "eager2" in parts:
        run_eager2(a, model, reqs, res, bw, t0)
    if "profile" in parts and time.time() - t0 < a.budget_s + 90:
        try:
            profile_fast(model, reqs[0], out_dir)
        except Exception as e:
            print(f"[fail] profile: {type(e).__name__}: {e}", flush=True)
    if "profile_opt" in parts:
        try:
            kw = dict(attn_impl=a.profile_attn if DEV == "cuda" else "math", compile=True)
            if kw["attn_impl"] == "triton" and os.environ.get("PROFILE_FP8"):  # the float8 cache (gpu_round8.sh)
                kw.update(kv_cache_dtype=torch.float8_e4m3fn, **json.loads(os.environ.get("ATTN_KW_FP8") or "{}"))
            elif kw["attn_impl"] == "triton":  # the sweeps' best tiles, when given (bench/gpu_round7.sh)
                kw.update(**json.loads(os.environ.get("ATTN_KW") or "{}"), **json.loads(os.environ.get("XATTN_KW") or "{}"))
            kw.update(json.loads(os.environ.get("PROFILE_KW") or "{}"))  # FastDecoder options, JSON (gpu_round11.sh)
            profile_fast(model, reqs[0], out_dir, kw, (True,) if DEV == "cuda" else (False,), "profile-opt.txt",
                         start=a.profile_from)
        except Exception as e:
            print(f"[fail] profile_opt: {type(e).__name__}: {e}", flush=True)
    table = render_table(res)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "table.md").write_text(table)
    print(table)
    return 0


def run_eager(a, model, reqs, res, bw, t0):
    """Eager reference, cached path, fp32, one batch (extrapolated to 512 requests)."""
    ekw = dict(use_cfg=True, use_kv_cache=True, **dict(PARAMS, max_decoder_steps=(a.eager_steps or N_FRAMES) if not a.quick else 32))
    model.infer_batch(reqs[1], **dict(ekw, max_decoder_steps=4))
    t_short, _ = timed(lambda: model.infer_batch(reqs[1], **dict(ekw, max_decoder_steps=4)))
    t_e, eo = timed(lambda: model.infer_batch(reqs[0], **ekw))
    e_ms = (t_e - t_short) / max(1, eo.num_steps - 4) * 1e3
    mean_keys = T_CTX_FRAMES + 3 + (eo.num_steps - 1) / 2
    fb = floor_bytes(model, 2 * BATCH, mean_keys, 4, T_TEXT)
    res["eager"] = {"ms_per_step": e_ms, "steps_run": eo.num_steps, "batch_s": t_e, "dtype": "float32",
                    "frames_per_s": BATCH / (e_ms / 1e3), "gbps": fb["total"] / (e_ms / 1e3) / 1e9,
                    "floor_ms": fb["total"] / (bw * 1e9) * 1e3}
    res["eager"]["x_realtime"] = res["eager"]["frames_per_s"] / FRAMES_PER_SECOND
    print(f"[eager] fp32 cached: {e_ms:.2f} ms/step over {eo.num_steps} steps, {res['eager']['x_realtime']:.0f}x real time",
          flush=True)
    print(f"[t] {time.time() - t0:.0f} s", flush=True)


# FastDecoder's round-5 options all off: the round-4 fast path
R4_OFF = dict(skip_uncond_xattn=False, share_uncond_prefix=False, xattn_kernel=False, topk_kernel=False,
              attn_num_warps=4, fuse_layer_tails=False, keys_per_split=64, attn_block_n=64, kv_head_major=False)
# round 5's attention tiles and cache layout (the defaults until round 6 made 32/32/1 and head-major the defaults)
R5_TILES = dict(keys_per_split=64, attn_block_n=64, attn_num_warps=2, kv_head_major=False)

OPT_VARIANTS = [  # label, attn_impl, FastDecoder keywords
    ("fast bf16 sdpa+buckets", "sdpa", {}),
    ("fast bf16 flash", "flash", {}),
    ("fast bf16 triton", "triton", {}),
    ("fast bf16 sdpa+buckets+compile", "sdpa", {"compile": True}),
    ("fast bf16 flash+compile", "flash", {"compile": True}),
    ("fast bf16 triton+compile", "triton", {"compile": True}),
    ("fast bf16 triton128+compile", "triton", {"compile": True, "keys_per_split": 128}),
    ("fast bf16 triton+compile (separate kv write)", "triton", {"compile": True, "fused_kv_write": False}),
    ("fast bf16 triton+compile+autotune", "triton", {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}),
    # round 5 (NOTES-fast.md), cumulative: round 4's configuration, then each CFG saving / kernel added in turn; the
    # last equals "fast bf16 triton+compile" (the defaults)
    ("R5.0 triton+compile as round 4", "triton", {"compile": True, **R4_OFF}),
    ("R5.1 + 2 warps", "triton", {"compile": True, **dict(R4_OFF, attn_num_warps=2)}),
    ("R5.2 + uncond rows skip xattn", "triton", {"compile": True, **dict(R4_OFF, attn_num_warps=2,
                                                                         skip_uncond_xattn=True)}),
    ("R5.3 + shared uncond prefix", "triton", {"compile": True, **dict(R4_OFF, attn_num_warps=2, skip_uncond_xattn=True,
                                                                       share_uncond_prefix=True)}),
    ("R5.4 + xattn kernel", "triton", {"compile": True, **dict(R4_OFF, attn_num_warps=2, skip_uncond_xattn=True,
                                                                share_uncond_prefix=True, xattn_kernel=True)}),
    ("R5.5 + topk kernel", "triton", {"compile": True, "fuse_layer_tails": False, **R5_TILES}),
    ("R5.6 + fused layer tails (= round-5 defaults)", "triton", {"compile": True, **R5_TILES}),
    # the defaults with the best of bench/attn_sweep.py ($ATTN_KW) and bench/xattn_sweep.py ($XATTN_KW), JSON
    ("R5.7 defaults + ATTN_KW + XATTN_KW", "triton", {"compile": True, **R5_TILES,
                                                      **json.loads(os.environ.get("ATTN_KW") or "{}"),
                                                      **json.loads(os.environ.get("XATTN_KW") or "{}")}),
    # round 6: the float8 K/V cache (not exact: NOTES-fast.md), with the defaults' tiles and with the best of
    # bench/attn_sweep.py --fp8 ($ATTN_KW_FP8)
    ("R6.0 defaults + float8 K/V cache", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn,
                                                    **R5_TILES}),
    ("R6.1 float8 K/V cache + ATTN_KW_FP8", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn, **R5_TILES,
                                                        **json.loads(os.environ.get("ATTN_KW_FP8") or "{}")}),
    ("R6.2 defaults + head-major cache + ATTN_KW", "triton", {"compile": True, **dict(R5_TILES, kv_head_major=True),
                                                              **json.loads(os.environ.get("ATTN_KW") or "{}")}),
    # the defaults since round 6 (32-key splits and tiles, 1 warp, head-major cache), exact; with the float8 cache;
    # with split-K Triton GEMMs for four products a layer (labels: no commas, --opt-only splits on them)
    ("R6.3 defaults (round 6)", "triton", {"compile": True}),
    ("R6.4 defaults (round 6) + float8 K/V cache", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn}),
    ("R6.5 defaults (round 6) + split-K Triton GEMMs", "triton", {"compile": True, "gemm_kernel": True}),
    # round 7: the FFN's GELU as a cuBLASLt epilogue (gelu_epilogue, the default on CUDA since); bench/gpu_round10.sh
    # runs these rows also with BENCH_BLAS=cublaslt and with inductor's programmatic dependent launch
    # (TORCHINDUCTOR_ENABLE_PDL=1, a whole process). PDL of the triton kernels too: 92948d4, removed (no gain, run AM)
    ("R7.0 round-6 defaults (no GELU epilogue)", "triton", {"compile": True, "gelu_epilogue": False}),
    ("R7.1 + GELU epilogue (round-7 default)", "triton", {"compile": True, "gelu_epilogue": True}),
    ("R7.2 float8 K/V cache without GELU epilogue", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn,
                                                               "gelu_epilogue": False}),
    ("R7.3 float8 K/V cache + GELU epilogue", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn,
                                                         "gelu_epilogue": True}),
    # split-K Triton GEMMs one product at a time (gemm_tiles None: that product stays on cuBLAS); R6.5 had all four
    ("R7.6 split-K for the FFN's o_net only", "triton", {"compile": True, "gemm_kernel": True, "gemm_tiles": {
        "o_net": None, "xq": None, "xo": None}}),
    ("R7.7 split-K for the FFN's o_net only in 4 slices", "triton", {"compile": True, "gemm_kernel": True, "gemm_tiles": {
        "o_net": None, "xq": None, "xo": None, "ffn_out": (64, 128, 4, 4, 3)}}),
    ("R7.8 split-K for the self-attention's o_net only", "triton", {"compile": True, "gemm_kernel": True, "gemm_tiles": {
        "xq": None, "xo": None, "ffn_out": None}}),
    ("R7.9 split-K for the cross-attention's q_net and o_net only", "triton", {
        "compile": True, "gemm_kernel": True, "gemm_tiles": {"o_net": None, "ffn_out": None}}),
    # round 8: CFG's halves as two chains of layers on two streams inside the graph (cfg_streams, with three stream
    # priority schemes; fe3644b, removed: slower in every form, run AV) -- R8.0 / R8.2 are the defaults it was timed against
    ("R8.0 round-7 defaults", "triton", {"compile": True}),
    ("R8.2 float8 K/V cache", "triton", {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn}),
    # fuse_step_ends (the default since) off and on: the first layer's norm + qkv inside the step's compiled prologue
    # (embedding, key counts: compiled in both rows), the score average and counter advance inside the compiled sampler
    ("R8.7 round-7 defaults without fused step ends", "triton", {"compile": True, "fuse_step_ends": False}),
    ("R8.8 + fused step ends", "triton", {"compile": True, "fuse_step_ends": True}),
    ("R8.9 float8 without fused step ends", "triton", {"compile": True, "fuse_step_ends": False,
                                                       "kv_cache_dtype": torch.float8_e4m3fn}),
    ("R8.10 float8 + fused step ends", "triton", {"compile": True, "fuse_step_ends": True,
                                                  "kv_cache_dtype": torch.float8_e4m3fn}),

    # the triton attention with the keys_per_split / attn_block_n / attn_num_warps in $ATTN_KW (JSON), e.g. the best
    # of bench/attn_sweep.py
    ("fast bf16 triton+compile (ATTN_KW)", "triton", {"compile": True, **json.loads(os.environ.get("ATTN_KW") or "{}")}),
]


def run_opt(a, model, reqs, res, bw, t0):
    """The speed-up variants, bf16, each over a.opt_batches batches x 480 steps (first batch: capture + compile)."""
    import gc

    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    res.setdefault("opt", [])
    only = set(a.opt_only.split(",")) if a.opt_only else None
    for label, impl, kw in OPT_VARIANTS:
        if only is not None and label not in only:
            continue
        if DEV != "cuda":
            impl = "math"
        if time.time() - t0 > a.budget_s:
            print(f"[skip] {label}: budget", flush=True)
            continue
        try:
            time_fast(model, reqs, dt, impl, a.opt_batches, label, res["opt"], bw, T_TEXT, **kw)
            r = res["opt"][-1]
            print(f"[opt] {label}: first batch {r['first_batch_s']:.1f} s (capture/compile), compile errors "
                  f"{r['compile_errors'] or 'none'}", flush=True)
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] {label}: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print(f"[t] {time.time() - t0:.0f} s", flush=True)


def parity_opt(model: MagpieTTS, req: dict, steps: int) -> dict:
    """fp32 (TF32 off) fast variants vs the eager cached reference at topk=1 (codes, first flip, logit gap), then
    half-precision variants vs fp32 sdpa teacher-forced on its codes (prior off and on)."""
    res = {}
    B = req["text"].shape[0]
    V = model.config.num_all_tokens_per_codebook
    kw = dict(use_cfg=True, topk=1, cfg_scale=2.5, apply_attention_prior=True, max_decoder_steps=steps, keep_logits=True)
    ref = model.infer_batch(req, use_kv_cache=True, **kw)
    rc = ref.predicted_codes.cpu()
    forced = None
    # $PARITY_ONLY: comma-separated labels of the variants below to run (default all; fp32 sdpa always runs: it
    # gives the teacher-forcing codes and logits)
    only = set(filter(None, os.environ.get("PARITY_ONLY", "").split(",")))
    fp32 = [("math", "math", {}), ("sdpa", "sdpa", {})]
    if DEV == "cuda":
        fp32 += [("triton", "triton", {}), ("sdpa+compile", "sdpa", {"compile": True}),
                 ("triton+compile", "triton", {"compile": True})]
    for label, impl, fkw in fp32:
        if only and label != "sdpa" and f"fp32 {label}" not in only:
            continue
        t = time.time()
        fd = FastDecoder(model, B, T_CTX_FRAMES + 3 + steps, torch.float32, attn_impl=impl, **fkw)
        f = fd.generate(req, **kw)
        fc = f.predicted_codes.cpu()
        T = min(rc.shape[2], fc.shape[2])
        diverge = next((k for k in range(T) if not torch.equal(rc[:, :, k], fc[:, :, k])), None)
        if diverge is None and (rc.shape != fc.shape or not torch.equal(ref.predicted_codes_lens, f.predicted_codes_lens)):
            diverge = T
        upto = min(ref.num_steps, f.num_steps) if diverge is None else diverge + 1
        dl = max((x.to(y.device) - y).abs().max().item() for x, y in zip(ref.step_logits[:upto], f.step_logits[:upto]))
        r = {"codes_identical": diverge is None, "first_divergent_step": diverge, "max_abs_logit_diff": dl,
             "attended_identical": ref.attended_text_positions == f.attended_text_positions,
             "compile_errors": fd.compile_errors, "s": time.time() - t}
        if diverge is not None and diverge < len(ref.step_logits):
            lg = ref.step_logits[diverge].cpu().view(B, -1, V)
            bad = (rc[:, :, diverge] != fc[:, :, diverge]).nonzero()
            if len(bad):
                top2 = lg[bad[0, 0], bad[0, 1]].topk(2).values
                r["flip_top2_gap"] = (top2[0] - top2[1]).item()
        res[f"fp32_{label}"] = r
        print(f"[parity_opt] fp32 {label} vs eager, topk=1, {B} req x {steps} steps: {r}", flush=True)
        if label == "sdpa":
            forced = torch.cat([fc, torch.zeros(B, fc.shape[1], steps).long()], 2)[:, :, :steps].to(DEV)
            teacher = {pr: fd.generate(req, forced_codes=forced, **dict(kw, apply_attention_prior=pr)) for pr in (False, True)}
        del fd
    if DEV != "cuda":
        return res
    for name, dt, impl, fkw in [("fp16 flash", torch.float16, "flash", {}), ("bf16 flash", torch.bfloat16, "flash", {}),
                                ("bf16 triton", torch.bfloat16, "triton", {}),
                                ("bf16 triton+compile", torch.bfloat16, "triton", {"compile": True}),
                                ("bf16 sdpa+compile", torch.bfloat16, "sdpa", {"compile": True}),
                                # the float8 K/V cache alone (fp32 elsewhere), then with bf16
                                ("fp32 triton+compile fp8 K/V", torch.float32, "triton",
                                 {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn}),
                                ("bf16 triton+compile fp8 K/V", torch.bfloat16, "triton",
                                 {"compile": True, "kv_cache_dtype": torch.float8_e4m3fn})]:
        if only and name not in only:
            continue
        fd = FastDecoder(model, B, T_CTX_FRAMES + 3 + steps, dt, attn_impl=impl, **fkw)
        for pr in (False, True):
            o = fd.generate(req, forced_codes=forced, **dict(kw, apply_attention_prior=pr))
            ref_l = torch.stack(teacher[pr].step_logits[: o.num_steps])
            got = torch.stack(o.step_logits[: ref_l.shape[0]])
            agree = (got.view(*got.shape[:2], -1, V).argmax(-1) == ref_l.view(*ref_l.shape[:2], -1, V).argmax(-1)).float().mean().item()
            r = {"rel_l2": ((got - ref_l).norm() / ref_l.norm()).item(), "max_abs": (got - ref_l).abs().max().item(),
                 "step0_rel_l2": ((got[0] - ref_l[0]).norm() / ref_l[0].norm()).item(), "argmax_agree": agree,
                 "compile_errors": fd.compile_errors}
            res[f"{name}{'' if pr else ' noprior'}"] = r
            print(f"[parity_opt] {name} prior={'on' if pr else 'off'} vs fp32 sdpa, teacher-forced: {r}", flush=True)
        del fd
    return res


def run_eager2(a, model, reqs, res, bw, t0):
    """Eager cached reference in fp32 and bf16, 480 steps a run, ``--eager-reps`` runs of each interleaved
    (fp32, bf16, fp32, ...): the host-bound step drifts with the lent host by tens of percent within minutes, so
    the table gives the median and the range. Then where a bf16 step's time goes (profiled)."""
    from reference.semantics import Semantics

    steps = (a.eager_steps or N_FRAMES) if not a.quick else 32
    base = dict(use_cfg=True, use_kv_cache=True, **dict(PARAMS, max_decoder_steps=steps))
    res["eager2"] = {}
    import gc

    if os.environ.get("EAGER_GC") == "freeze":  # round 6's experiment: every object so far out of the collector's sight
        gc.collect()
        gc.freeze()
    print(f"[eager2] python objects tracked by gc: {len(gc.get_objects())}, modules: {len(sys.modules)}", flush=True)
    # the eager reference runs in reduced precision through its semantics; the bf16 copy is made per call, in both
    # the 4-step and the full run, so it cancels in the per-step time
    kws = {name: dict(base, semantics=Semantics(dtype=name)) for name in ("float32", "bfloat16")}
    runs: dict[str, list] = {name: [] for name in kws}
    t_short = {}
    for name, kw in kws.items():
        try:
            model.infer_batch(reqs[1], **dict(kw, max_decoder_steps=4))
            t_short[name] = statistics.median(
                [timed(lambda: model.infer_batch(reqs[1], **dict(kw, max_decoder_steps=4)))[0] for _ in range(2)])
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"[fail] eager2 {name}: {type(e).__name__}: {e}", flush=True)
    for rep in range(max(1, a.eager_reps)):
        for name, kw in kws.items():
            if name not in t_short:
                continue
            t_e, eo = timed(lambda: model.infer_batch(reqs[0], **kw))
            runs[name].append(((t_e - t_short[name]) / max(1, eo.num_steps - 4) * 1e3, eo.num_steps, t_e))
            print(f"[eager2] {name} rep {rep + 1}: {runs[name][-1][0]:.2f} ms/step", flush=True)
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
            r["split"] = eager_split(model, reqs[0], 48, kws[name]["semantics"])
            print(r["split"].pop("kernels_table"), flush=True)
        res["eager2"][name] = r
        print(f"[eager2] {name} cached: {e_ms:.2f} ms/step (median of {len(ms)}: {', '.join(f'{x:.2f}' for x in ms)}) "
              f"over {n_steps} steps, {r['x_realtime']:.0f}x real time; {r.get('split', '')}", flush=True)
    print(f"[t] {time.time() - t0:.0f} s", flush=True)


def eager_split(m, req, steps: int, semantics=None) -> dict:
    """torch.profiler over `steps` eager steps, the host functions of the loop wrapped in record_function:
    wall ms/step (profiler on), GPU kernel ms/step (sum of kernel durations), host ms/step inside each wrapped
    function, device-to-host copies + syncs per step."""
    import reference.inference as inf
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    saved = []

    def wrap(obj, name, label):
        f = getattr(obj, name)
        saved.append((obj, name, f, name in vars(obj)))

        def g(*x, **k):
            with record_function(label):
                return f(*x, **k)

        setattr(obj, name, g)

    wrap(inf, "sample_codes", "host:sample_codes")
    if hasattr(inf, "sample_step"):  # both sampling passes of a step (third session on)
        wrap(inf, "sample_step", "host:sample_step")
    wrap(inf, "find_eos", "host:find_eos")
    wrap(inf.PriorState, "most_attended", "host:prior.most_attended")
    wrap(inf.PriorState, "build_prior", "host:prior.build_prior")
    wrap(type(m.decoder), "forward_cached", "host:decoder.forward_cached")  # class level: infer_batch may copy m
    kw = dict(use_cfg=True, use_kv_cache=True, semantics=semantics, **dict(PARAMS, max_decoder_steps=steps))
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
    gpu_us = sum(e.time_range.elapsed_us() for e in ev if e.device_type == DeviceType.CUDA and not e.name.startswith("host:"))
    host = {}
    syncs = 0
    sync_us = 0.0
    sync_from: dict[str, int] = {}
    for e in ev:
        if e.name.startswith("host:"):
            host[e.name[5:]] = host.get(e.name[5:], 0.0) + e.cpu_time_total / 1e3 / n
        if e.device_type == DeviceType.CPU and e.name in ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize"):
            syncs += 1
            sync_us += e.time_range.elapsed_us()
            # which op asked for it (the runtime call's enclosing aten op, if any), per step
            parent = e.cpu_parent.name if e.cpu_parent is not None else "(no op)"
            sync_from[f"{e.name} <- {parent}"] = sync_from.get(f"{e.name} <- {parent}", 0) + 1
    kernels = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    return {"kernels_table": kernels,
            "steps": n, "wall_ms_per_step_profiled": wall * 1e3 / n, "gpu_kernel_ms_per_step": gpu_us / 1e3 / n,
            "host_ms_per_step_in": host, "memcpy_sync_calls_per_step": syncs / n, "memcpy_sync_ms_per_step": sync_us / 1e3 / n,
            "memcpy_sync_per_step_by_caller": {k: round(v / n, 2) for k, v in sorted(sync_from.items(), key=lambda kv: -kv[1])},
            "cuda_kernels_per_step": sum(1 for e in ev if e.device_type == DeviceType.CUDA
                                         and not e.name.startswith("host:")) / n}


def merge_results(dirs: list[Path], out_dir: Path) -> int:
    """One table from runs made in separate processes (gpu_check.sh times the eager reference in a fresh one):
    later runs add their parts; their fast rows are appended."""
    res: dict = {}
    for d in dirs:
        part = json.loads((d / "results.json").read_text())
        fast = res.get("fast", []) + part.pop("fast", [])
        res.update(part)
        res["fast"] = fast
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
    lines = [f"card: {info['card']} ({info['sms']} SMs), torch {info['torch']}, {info['date']}; "
             f"copy bandwidth {info['copy_gbps']:.0f} GB/s (read+write); 128 rows (64 requests x CFG)", "",
             "| path | dtype | ms/step | frames/s | x real time | GB/s (floor bytes / step time) | x floor | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    nemo_ms = None
    if "nemo" in res and "float32" in res["nemo"]:
        nemo_ms = res["nemo"]["float32"]["ms_per_step"]
    for name, r in (res.get("nemo") or {}).items():
        lines.append(f"| NeMo 3.0.0 transformer_2501 loop | {name} | {r['ms_per_step']:.1f} | {r['frames_per_s']:.0f} | "
                     f"{r['x_realtime']:.1f} | {r['gbps_vs_floor']:.0f} | - | steps {list(r['step_s'])} timed, mean "
                     f"extrapolated to 480 steps x 8 batches = {r['all_512_s_extrapolated']:.0f} s |")
    if "eager" in res:
        e = res["eager"]
        lines.append(f"| eager reference, cached | float32 | {e['ms_per_step']:.2f} | {e['frames_per_s']:.0f} | "
                     f"{e['x_realtime']:.0f} | {e['gbps']:.0f} | {e['ms_per_step']/e['floor_ms']:.1f} | 1 batch, "
                     f"{e['steps_run']} steps |")
    for name, e in (res.get("eager2") or {}).items():
        ms = e.get("ms_per_step_runs") or [e["ms_per_step"]]
        xrt = lambda t: e["x_realtime"] * e["ms_per_step"] / t  # noqa: E731  (frames per step fixed)
        spread = (f"median of {len(ms)} runs ({min(ms):.2f}-{max(ms):.2f} ms/step = {xrt(max(ms)):.0f}-{xrt(min(ms)):.0f}x)"
                  if len(ms) > 1 else "1 run")
        lines.append(f"| eager reference, cached | {name} | {e['ms_per_step']:.2f} | {e['frames_per_s']:.0f} | "
                     f"{e['x_realtime']:.0f} | {e['gbps']:.0f} | {e['ms_per_step']/e['floor_ms']:.1f} | 1 batch x "
                     f"{e['steps_run']} steps, {spread} |")
    for r in res["fast"] + res.get("opt", []):
        vs = f", {nemo_ms / r['ms_per_step']:.0f}x NeMo fp32" if nemo_ms else ""
        lines.append(f"| {r['label']} ({r['attn_impl']}) | {r['dtype']} | {r['ms_per_step']:.3f} | {r['frames_per_s']:.0f} | "
                     f"{r['x_realtime']:.0f} | {r['gbps']:.0f} | {r['x_floor']:.2f} | {r['batches_timed']} batch(es) x 480 "
                     f"steps, {r['graphs']} graph(s){vs}; 512 requests {r['all_512_s']:.1f} s{own_floor(r)} |")
    p = res.get("parity", {})
    if p:
        lines += ["", f"parity (TF32 off): fp32 fast vs eager cached at topk=1, 64 requests x {p['steps']} steps: codes "
                  f"identical = {p['fp32_codes_identical']}, first divergent step = {p['fp32_first_divergent_step']}, "
                  f"max |dlogit| = {p['fp32_max_abs_logit_diff']:.2e}; fp16 rel L2 {p.get('fp16_rel_l2', float('nan')):.2e} "
                  f"(argmax agree {p.get('fp16_argmax_agree', float('nan')):.4f}), bf16 rel L2 "
                  f"{p.get('bf16_rel_l2', float('nan')):.2e} (argmax agree {p.get('bf16_argmax_agree', float('nan')):.4f}) "
                  f"vs fp32 fast, teacher-forced"]
        if "fp32_codes_identical_triton+compile" in p:
            lines[-1] += (f"; the default fast path in fp32 (triton+compile): codes identical = "
                          f"{p['fp32_codes_identical_triton+compile']}, max |dlogit| = "
                          f"{p['fp32_max_abs_logit_diff_triton+compile']:.2e}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
