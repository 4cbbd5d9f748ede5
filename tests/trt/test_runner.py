"""trt.runner: the pure parts (prompt/flat ids, requests from a reference batch, CFG and sampling settings,
output decoding) are tested here; run_engine itself only where TensorRT-LLM exists (marker trtllm)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trt.build import BackendUnavailable
from trt.runner import (RunnerInputError, bos_embedding, build_requests, decode_outputs, decoder_engine_dir,
                        flat_ids, generate_kwargs, prompt_codes, reference_context_features,
                        reference_encoder_features, run_engine, runner_kwargs, sampling_kwargs,
                        uncond_context_features, unflatten_ids)

CASES = ["released_small", "four_codebooks"]
DCE_CASES = ["dce_context", "dce_baked_v2607", "dce_baked_v2602", "dce_maskgit"]


def _model_batch(case):
    from conftest import infer_inputs, load_batch, reference_model

    return reference_model(case), infer_inputs(load_batch(case))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(0, 12), st.integers(2, 3000), st.data())
def test_flat_ids_round_trip_and_layout(C, T, V, data):
    codes = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=T, max_size=T),
                                            min_size=C, max_size=C)), dtype=torch.long).reshape(C, T)
    ids = flat_ids(codes, V)
    assert ids.dtype == torch.int32 and ids.numel() == C * T
    for t in range(T):  # frame-major, codebook c offset by c * V (the fork's layout)
        assert ids[t * C:(t + 1) * C].tolist() == [int(codes[c, t]) + c * V for c in range(C)]
    assert torch.equal(unflatten_ids(ids, C, V), codes)


def test_flat_ids_rejects_out_of_range_codes():
    with pytest.raises(RunnerInputError, match=r"\[0, 10\)"):
        flat_ids(torch.tensor([[3, 10]]), 10)
    with pytest.raises(RunnerInputError, match="whole frames"):
        unflatten_ids(torch.arange(5), 2, 10)


@pytest.mark.parametrize("case", CASES)
def test_prompt_is_the_reference_step0_input(case):
    """Prompt codes = context framed by the context specials + BOS frame; as features they equal the reference's
    step-0 decoder input rows (cond) for every item."""
    model, batch = _model_batch(case)
    c = model.config
    framed, lens = model.add_special_tokens(batch["context_audio_codes"], batch["context_audio_codes_lens"],
                                            c.context_audio_bos_id, c.context_audio_eos_id)
    feats = reference_context_features(model, batch)
    with model.capture(["decoder_input"]) as cap:
        model.infer_batch(batch, use_cfg=True, use_kv_cache=True, topk=1, max_decoder_steps=4)
    dec_in = cap.get("decoder_input", 0)
    T = dec_in.shape[1]
    for b in range(len(lens)):
        n = int(batch["context_audio_codes_lens"][b])
        p = prompt_codes(c, batch["context_audio_codes"][b], n)
        assert p.shape == (c.num_audio_codebooks, n + 3)
        assert torch.equal(p[:, :-1], framed[b, :, :int(lens[b])])
        assert (p[:, -1] == c.audio_bos_id).all()
        ctx_rows = int(lens[b])
        assert torch.equal(feats[b][:-1], dec_in[b, :ctx_rows]) and torch.equal(feats[b][-1], dec_in[b, T - 1])
        assert feats[b].abs().max() > 0


@pytest.mark.parametrize("case", CASES)
def test_requests_from_a_reference_batch(case):
    model, batch = _model_batch(case)
    c = model.config
    enc = reference_encoder_features(model, batch)
    with torch.no_grad():
        full = model.encode_text(batch["text"], batch["text_lens"]).output
    reqs = build_requests(c, batch, enc)
    for b, r in enumerate(reqs):
        n_text = int(batch["text_lens"][b])
        assert r.encoder_input_features.dtype == torch.float16 and r.encoder_output_length == n_text
        assert torch.equal(r.encoder_input_features, full[b, :n_text].half())
        n = int(batch["context_audio_codes_lens"][b])
        assert r.input_ids.numel() == (n + 3) * c.num_audio_codebooks
        codes = unflatten_ids(r.input_ids, c.num_audio_codebooks, c.num_all_tokens_per_codebook)
        assert torch.equal(codes, prompt_codes(c, batch["context_audio_codes"][b], n))
        assert r.decoder_context_features is None
    feats = reference_context_features(model, batch)
    reqs = build_requests(c, batch, enc, context_features=feats, context_as_features=True, dtype=torch.float32)
    for b, r in enumerate(reqs):
        assert torch.equal(r.decoder_context_features, feats[b])
        assert r.input_ids.numel() == feats[b].shape[0] * c.num_audio_codebooks and not r.input_ids.any()
    kw = generate_kwargs(reqs, sampling_kwargs(use_cfg=True, cfg_scale=2.5, temperature=0.6, top_k=80,
                                               end_id=c.audio_eos_id, max_new_tokens=7), context_as_features=True)
    assert kw["cfg_scale"] == 2.5 and kw["end_id"] == kw["pad_id"] == c.audio_eos_id
    assert len(kw["decoder_context_features"]) == len(kw["batch_input_ids"]) == len(reqs)
    with pytest.raises(RunnerInputError, match="encoder feature tensors"):
        build_requests(c, batch, enc[:1])
    with pytest.raises(RunnerInputError, match="encoder features"):
        build_requests(c, batch, [e[:-1] for e in enc])
    with pytest.raises(RunnerInputError, match="context feature"):
        build_requests(c, batch, enc, context_as_features=True)


def test_cfg_and_sampling_settings():
    kw = sampling_kwargs(use_cfg=False, cfg_scale=2.5, temperature=0.6, top_k=80, end_id=2017, max_new_tokens=440)
    assert "cfg_scale" not in kw
    assert kw == dict(max_new_tokens=440, end_id=2017, pad_id=2017, temperature=0.6, top_k=80, streaming=False,
                      return_dict=True, output_sequence_lengths=True)
    assert sampling_kwargs(use_cfg=True, cfg_scale=2.5, temperature=0.6, top_k=80, end_id=2017,
                           max_new_tokens=1)["cfg_scale"] == 2.5
    with pytest.raises(RunnerInputError, match="cfg_scale=1.0 turns CFG off"):
        sampling_kwargs(use_cfg=True, cfg_scale=1.0, temperature=0.6, top_k=80, end_id=2017, max_new_tokens=1)
    with pytest.raises(RunnerInputError, match="> -10"):
        sampling_kwargs(use_cfg=True, cfg_scale=-10, temperature=0.6, top_k=80, end_id=2017, max_new_tokens=1)
    with pytest.raises(RunnerInputError, match="max_new_tokens"):
        sampling_kwargs(use_cfg=False, cfg_scale=1, temperature=0.6, top_k=80, end_id=2017, max_new_tokens=0)


def test_runner_kwargs_match_the_fork_runner(tmp_path):
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({}))
    kw = runner_kwargs(tmp_path, multi_block_mode=False, debug=True)
    assert kw == dict(engine_dir=str(tmp_path / "decoder"), is_enc_dec=False, max_input_len=512, rank=0,
                      multi_block_mode=False, debug_mode=True, cross_kv_cache_fraction=0.5,
                      kv_cache_free_gpu_memory_fraction=0.7)
    assert decoder_engine_dir(tmp_path / "decoder") == tmp_path / "decoder"
    with pytest.raises(RunnerInputError, match="no decoder engine"):
        decoder_engine_dir(tmp_path / "nothing")


def test_decode_outputs_like_the_fork_runner():
    C, V, eos = 2, 10, 7
    prompt = flat_ids(torch.tensor([[1, 2], [3, 4]]), V)  # 2 frames
    gen = torch.tensor([[5, 6, 7], [1, 2, 3]])  # frame 2 holds EOS in codebook 0
    ids0 = torch.cat([prompt, flat_ids(gen, V), torch.tensor([7, 17], dtype=torch.int32)])
    gen1 = torch.tensor([[1], [2]])
    ids1 = torch.cat([prompt, flat_ids(gen1, V), torch.zeros(6, dtype=torch.int32)])
    out = torch.stack([ids0, ids1]).unsqueeze(1)
    lens = torch.tensor([[ids0.numel()], [prompt.numel() + 2]])
    codes = decode_outputs(out, lens, [prompt.numel()] * 2, C, V, eos)
    assert torch.equal(codes[0], gen[:, :2]) and torch.equal(codes[1], gen1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 6), st.integers(2, 50), st.data())
def test_stacked_flat_ids_round_trip_and_layout(C, S, P, V, data):
    """Frame stacking: a position holds S frames of C codebooks, frame s codebook c in vocabulary c + s * C
    (anand-nv@0c0df9f0 run_decoder_multiling_executor.py's de-offset (i + f * books_num) * book_size)."""
    T = P * S
    codes = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=C * T, max_size=C * T)),
                         dtype=torch.long).reshape(C, T)
    ids = flat_ids(codes, V, S)
    assert ids.numel() == C * T
    for p in range(P):
        for s in range(S):
            for c in range(C):
                assert int(ids[p * C * S + s * C + c]) == int(codes[c, p * S + s]) + (c + s * C) * V
    assert torch.equal(unflatten_ids(ids, C, V, S), codes)
    if S > 1:
        with pytest.raises(RunnerInputError, match="whole stacks"):
            flat_ids(torch.zeros(C, S + 1, dtype=torch.long), V, S)
        with pytest.raises(RunnerInputError, match="stacked frames"):
            unflatten_ids(torch.zeros(C * S + C, dtype=torch.int32), C, V, S)


@pytest.mark.parametrize("tail", [None, 33])
def test_stacked_prompt_is_the_reference_step0_input(tail):
    """decoder_context_tts with frame stacking (stacked_lt, S = 2): prompt ids and features are the reference's
    step-0 decoder input, NeMo's padding of the last context stack included (the batch row's frames after the
    context's end: ``tail`` fills them with a code that is not 0)."""
    model, batch = _model_batch("stacked_lt")
    c = model.config
    if tail is not None:
        batch = dict(batch, context_audio_codes=batch["context_audio_codes"].clone())
        for b, n in enumerate(batch["context_audio_codes_lens"].tolist()):
            batch["context_audio_codes"][b, :, n:] = tail
    S, C, V = c.frame_stacking_factor, c.num_audio_codebooks, c.num_all_tokens_per_codebook
    assert S == 2
    feats = reference_context_features(model, batch)
    with model.capture(["decoder_input"]) as cap:
        model.infer_batch(batch, use_cfg=True, use_kv_cache=True, topk=1, max_decoder_steps=4)
    dec_in = cap.get("decoder_input", 0)
    B, T = batch["text"].shape[0], dec_in.shape[1]
    enc = reference_encoder_features(model, batch)
    reqs = build_requests(c, batch, enc)
    for b in range(B):
        n = int(batch["context_audio_codes_lens"][b])
        P = -(-(n + 2) // S)
        p = prompt_codes(c, batch["context_audio_codes"][b], n)
        assert p.shape == (C, (P + 1) * S) and (p[:, -S:] == c.audio_bos_id).all()
        assert feats[b].shape[0] == P + 1
        assert torch.equal(feats[b][:-1], dec_in[b, :P]) and torch.equal(feats[b][-1], dec_in[b, T - 1])
        assert torch.equal(feats[b][-1:], bos_embedding(model))
        assert torch.equal(unflatten_ids(reqs[b].input_ids, C, V, S), p)
        assert reqs[b].input_ids.numel() == (P + 1) * C * S


@pytest.mark.parametrize("case", DCE_CASES)
def test_decoder_ce_requests_are_the_reference_prefix_and_bos(case):
    """decoder_ce: decoder_context_features = the reference's decoder_context rows (valid length) + the BOS-frame
    embedding, dummy zero ids P * C * S; with CFG the unconditional rows are NeMo's (zero prefix, BOS kept): both
    equal the reference's step-0 decoder input, conditional and unconditional rows."""
    model, batch = _model_batch(case)
    c = model.config
    S, C = c.frame_stacking_factor, c.num_audio_codebooks
    B = batch["text"].shape[0]
    feats = reference_context_features(model, batch)
    with model.capture(["decoder_input"]) as cap:
        model.infer_batch(batch, use_cfg=True, use_kv_cache=True, topk=1, max_decoder_steps=4)
    dec_in = cap.get("decoder_input", 0)  # (2B, T_ctx + 1, D): cond rows, then uncond rows
    T = dec_in.shape[1]
    with torch.no_grad():
        emb, mask = model.decoder_context(batch)
    enc = reference_encoder_features(model, batch)
    reqs = build_requests(c, batch, enc, context_features=feats, context_as_features=True, use_cfg=True,
                          dtype=torch.float32)
    for b in range(B):
        n = int(mask[b].sum())
        assert feats[b].shape == (n + 1, c.d_model) and feats[b].abs().max() > 0
        assert torch.equal(feats[b][:n], emb[b, :n]) and torch.equal(feats[b][:n], dec_in[b, :n])
        assert torch.equal(feats[b][-1], dec_in[b, T - 1])
        unc = reqs[b].decoder_context_features[n + 1:]
        assert torch.equal(reqs[b].decoder_context_features[:n + 1], feats[b])
        assert torch.equal(unc, uncond_context_features(feats[b]))
        assert torch.equal(unc[:n], dec_in[B + b, :n]) and torch.equal(unc[-1], dec_in[B + b, T - 1])
        assert reqs[b].input_ids.numel() == (n + 1) * C * S and not reqs[b].input_ids.any()
        assert reqs[b].input_ids.dtype == torch.int32
    # cond rows only (run_decoder_multiling(_executor).py), the engine dtype
    half = build_requests(c, batch, enc, context_features=feats, context_as_features=True, use_cfg=True,
                          cfg_uncond_features=False)
    assert all(torch.equal(r.decoder_context_features, f.half()) for r, f in zip(half, feats))
    kw = generate_kwargs(half, sampling_kwargs(use_cfg=True, cfg_scale=2.5, temperature=0.6, top_k=80,
                                               end_id=c.audio_eos_id, max_new_tokens=5), context_as_features=True)
    assert [t.shape[0] for t in kw["decoder_context_features"]] == [f.shape[0] for f in feats]
    with pytest.raises(RunnerInputError, match=r"^decoder_ce: the engine (holds no baked speaker table|cannot run the "
                                               r"context encoder); its prompt is decoder_context_features .*pass "
                                               r"context_as_features=True$"):
        build_requests(c, batch, enc)


def test_baked_speakers_select_their_rows():
    model, batch = _model_batch("dce_baked_v2607")
    c = model.config
    b2 = dict(batch, speaker_indices=torch.tensor([3, 0, 3]))
    feats = reference_context_features(model, b2)
    table = model.baked_context_embedding.weight.detach().view(c.baked_speakers, c.baked_frames, c.d_model)
    for f, k in zip(feats, [3, 0, 3]):
        assert torch.equal(f[:-1], table[k]) and torch.equal(f[-1:], bos_embedding(model))
    assert not torch.equal(feats[0], feats[1]) and torch.equal(feats[0], feats[2])
    no_idx = {k: v for k, v in batch.items() if k != "speaker_indices"}  # None: speaker 0 for every item, as NeMo
    assert all(torch.equal(f[:-1], table[0]) for f in reference_context_features(model, no_idx))


def test_decode_stacked_outputs_like_the_fork_runner():
    """S = 2: each step emits 2 frames of C codebooks; EOS in the second frame of a step keeps the first."""
    C, V, S, eos = 2, 10, 2, 7
    prompt = torch.zeros(2 * C * S, dtype=torch.int32)  # 2 positions of dummy ids
    gen = torch.tensor([[1, 2, 3, 7], [4, 5, 6, 1]])  # frames 0..3, frame 3 holds EOS
    ids = torch.cat([prompt, flat_ids(gen, V, S)])
    out = ids.view(1, 1, -1)
    codes = decode_outputs(out, torch.tensor([[ids.numel()]]), [prompt.numel()], C, V, eos, S)
    assert torch.equal(codes[0], gen[:, :3])
    with pytest.raises(RunnerInputError, match="whole stacks"):
        flat_ids(gen[:, :3], V, S)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_run_engine_on_decoder_ce_needs_features_and_then_the_backend(tmp_path):
    model, batch = _model_batch("dce_baked_v2602")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunnerInputError, match="holds no baked speaker table"):
        run_engine(tmp_path, batch, use_cfg=True, cfg_scale=2.5, max_new_tokens=4, temperature=0.6, top_k=80,
                   model=model)
    with pytest.raises(BackendUnavailable, match="TensorRT-LLM is not importable"):
        run_engine(tmp_path, batch, use_cfg=True, cfg_scale=2.5, max_new_tokens=4, temperature=0.6, top_k=80,
                   model=model, context_as_features=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_run_engine_without_tensorrt_llm_raises_backend_unavailable(tmp_path):
    model, batch = _model_batch("released_small")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackendUnavailable, match="TensorRT-LLM is not importable"):
        run_engine(tmp_path, batch, use_cfg=True, cfg_scale=2.5, max_new_tokens=4, temperature=0.6, top_k=80,
                   model=model)
    with pytest.raises(RunnerInputError, match="needs model="):
        run_engine(tmp_path, batch, use_cfg=True, cfg_scale=2.5, max_new_tokens=4, temperature=0.6, top_k=80)


@pytest.mark.trtllm
def test_run_engine_on_a_real_engine(request, tmp_path):
    """Needs TensorRT-LLM (the t5tts fork), a GPU and --engine-dir built from fixtures/data/released_small.nemo
    with --debug-output; the plugin skips it otherwise. Checks that a debug run ingests into a canonical dump."""
    from parity.dump import DumpReader

    model, batch = _model_batch("released_small")
    run = run_engine(request.config.getoption("--engine-dir"), batch, use_cfg=True, cfg_scale=2.5, debug=True,
                     max_new_tokens=4, temperature=0.6, top_k=1, model=model, dump_out=tmp_path / "dump")
    assert len(run.codes) == 3 and run.dump is not None
    assert DumpReader(run.dump).source == "trtllm"
