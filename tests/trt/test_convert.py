"""trt.convert: NeMo fixtures -> TensorRT-LLM t5tts checkpoint -> reference, bit for bit; TP shards; errors."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from reference.config import InferenceParameters, MagpieConfig, TransformerConfig
from reference.model import MagpieTTS
from trt.convert import (
    ConversionError,
    convert_checkpoint,
    convert_in_memory,
    load_converted,
    nemo_config_from_magpie,
    reference_from_trtllm,
)

ROOT = Path(__file__).resolve().parents[2]
CASES = ["released_small", "bidir_encoder", "multihead_xattn", "decoder_kernel3", "four_codebooks"]


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
    """fixtures/data when it holds every case, else the cases built here with NeMo (skipped without NeMo)."""
    data = ROOT / "fixtures" / "data"
    if all((data / f"{c}.nemo").is_file() and (data / f"{c}.batch.safetensors").is_file() for c in CASES):
        return data
    pytest.importorskip("nemo", reason="fixtures/data is incomplete and NeMo is not installed to build it")
    sys.path.insert(0, str(ROOT / "fixtures"))
    import make_fixtures as mf

    mf._quiet_nemo()
    out = tmp_path_factory.mktemp("fixtures")
    codecs = {}
    for i, (case, spec) in enumerate(mf.CASES.items()):
        nc = spec["codebooks"]
        if nc not in codecs:
            codecs[nc] = out / f"codec_{nc}cb.nemo"
            mf.build_codec(codecs[nc], nc, seed=mf.BASE_SEED + nc)
        seed = mf.BASE_SEED + 100 * (i + 1)
        path = mf.build_model(case, copy.deepcopy(spec), codecs[nc], out, seed)
        mf.save_batch(mf.make_batch(mf.load_model(path), seed=seed + 1), out / f"{case}.batch.safetensors")
    return out


def load_case(fixture_dir, case):
    model = MagpieTTS.from_nemo(fixture_dir / f"{case}.nemo")
    batch = load_file(str(fixture_dir / f"{case}.batch.safetensors"))
    return model, batch


def logits(model, batch):
    with torch.no_grad():
        return model.process_batch(batch)["logits"]


# ---------------------------------------------------------------------------------------------------------------
# Round trip on every fixture case
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_round_trip_logits_identical(fixture_dir, case, tmp_path):
    model, batch = load_case(fixture_dir, case)
    out = convert_checkpoint(fixture_dir / f"{case}.nemo", tmp_path / "ckpt", dtype="float32")
    back = reference_from_trtllm(out)
    assert back.config == model.config
    ref = logits(model, batch)
    assert ref.abs().max() > 0
    assert torch.equal(logits(back, batch), ref)
    # every tensor returns exactly, bias included
    _, sd = load_converted(out)
    orig = model.state_dict()
    assert set(sd) == set(orig)
    for k in orig:
        assert torch.equal(sd[k], orig[k]), k


@pytest.mark.parametrize("case", CASES)
def test_minimal_nemo_config_rebuilds_config(fixture_dir, case):
    model, _ = load_case(fixture_dir, case)
    cfg = nemo_config_from_magpie(model.config)
    json.dumps(cfg)  # JSON-clean
    assert MagpieConfig.from_nemo(cfg, model.state_dict()) == model.config


def expected_names(c: MagpieConfig, component: str) -> set[str]:
    """The fork's weight names (examples/models/contrib/t5tts/convert_checkpoint.py), plus lm_head.bias."""
    if component == "encoder":
        names = {"embedding.vocab_embedding.weight", "embedding.position_embedding.weight", "final_layernorm.weight"}
        for i in range(c.encoder.n_layers):
            names |= {f"encoder_layers.{i}.{s}" for s in (
                "attention_layernorm.weight", "attention.qkv.weight", "attention.dense.weight",
                "pos_ff_layernorm.weight", "pos_ff.proj.weight", "pos_ff.o_net.weight")}
        return names
    names = {"embedding.vocab_embedding.weight", "embedding.position_embedding.weight", "final_layernorm.weight",
             "lm_head.weight", "lm_head.bias"}
    for i in range(c.decoder.n_layers):
        names |= {f"decoder_layers.{i}.{s}" for s in (
            "self_attention_layernorm.weight", "self_attention.qkv.weight", "self_attention.dense.weight",
            "cross_attention_layernorm.weight", "cross_attention.qkv.weight", "cross_attention.dense.weight",
            "pos_ff_layernorm.weight", "pos_ff.proj.weight", "pos_ff.o_net.weight")}
        if c.decoder.apply_norm_to_cond:
            names.add(f"decoder_layers.{i}.cross_attention_memory_layernorm.weight")
    return names


@pytest.mark.parametrize("case", ["released_small", "four_codebooks"])
def test_names_shapes_and_config_keys(fixture_dir, case):
    model, _ = load_case(fixture_dir, case)
    c = model.config
    conv = convert_in_memory(model)
    enc, dec = conv.encoder_ranks[0], conv.decoder_ranks[0]
    assert set(enc) == expected_names(c, "encoder")
    assert set(dec) == expected_names(c, "decoder")
    sd = model.state_dict()
    # conv kernels get a trailing unit dim
    assert enc["encoder_layers.0.pos_ff.proj.weight"].shape == (c.encoder.d_ffn, c.d_model, c.encoder.kernel_size, 1)
    assert torch.equal(enc["encoder_layers.0.pos_ff.proj.weight"][..., 0], sd["encoder.layers.0.pos_ff.proj.conv.weight"])
    # C codebook tables + one zero row; config vocab_size excludes the zero row
    C, V = c.num_audio_codebooks, c.num_all_tokens_per_codebook
    table = dec["embedding.vocab_embedding.weight"]
    assert table.shape == (C * V + 1, c.d_model)
    assert torch.equal(table[-1], torch.zeros(c.d_model))
    for k in range(C):
        assert torch.equal(table[k * V:(k + 1) * V], sd[f"audio_embeddings.{k}.weight"])
    # cross qkv = [q_net; kv_net]
    assert torch.equal(dec["decoder_layers.1.cross_attention.qkv.weight"],
                       torch.cat([sd["decoder.layers.1.cross_attention.q_net.weight"],
                                  sd["decoder.layers.1.cross_attention.kv_net.weight"]]))
    assert torch.equal(dec["lm_head.bias"], sd["final_proj.bias"])
    e, d = conv.encoder_config, conv.decoder_config
    assert e["architecture"] == "T5TTSEncoderModel" and d["architecture"] == "T5TTSDecoderModel"
    assert e["num_hidden_layers"] == c.encoder.n_layers and d["num_hidden_layers"] == c.decoder.n_layers
    assert e["vocab_size"] == c.num_text_tokens
    assert d["vocab_size"] == C * V and d["vocab_sizes"] == [V] * C and d["num_vocabs"] == C
    assert d["has_lm_head_bias"] is True and e["q_scaling"] == 1.0 and d["q_scaling"] == 1.0
    assert e["intermediate_size"] == c.encoder.d_ffn and e["head_size"] == c.encoder.sa_d_head
    assert d["encoder_num_heads"] == c.decoder.xa_n_heads and d["encoder_head_size"] == c.decoder.xa_head_dim
    assert d["encoder_hidden_size"] == c.decoder.xa_d_memory
    assert d["has_encoder_input_layernorm"] == c.decoder.apply_norm_to_cond
    assert e["is_causal"] == c.encoder.is_causal and e["pos_ff_kernel_size"] == c.encoder.kernel_size
    assert d["position_embedding_type"] == "learned_absolute"
    assert e["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    for key in ("compute_attention_prior_from_layers", "apply_attention_prior_to_layers", "attention_prior_lookahead",
                "attention_prior_window_left", "attention_prior_window_right", "use_attention_prior"):
        assert key in d
    meta = d["magpie_parity"]
    assert meta["source_config_hash"] == c.hash()
    assert meta["special_ids"]["cfg_service_token_id"] == C * V
    assert math.isclose(meta["fork_q_scaling"]["encoder"], 1 / math.sqrt(c.encoder.sa_d_head))


# ---------------------------------------------------------------------------------------------------------------
# dtype and lm_head bias
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_reduced_precision_weights(fixture_dir, dtype, tol, tmp_path):
    """Weights rounded to fp16/bf16, computed in fp32: max |d logits| <= tol * max |logits|."""
    model, batch = load_case(fixture_dir, "released_small")
    out = convert_checkpoint(model, tmp_path / dtype, dtype=dtype)
    w = load_file(str(out / "decoder" / "rank0.safetensors"))
    assert all(t.dtype == getattr(torch, dtype) for t in w.values())
    assert json.loads((out / "decoder" / "config.json").read_text())["dtype"] == dtype
    ref, got = logits(model, batch), logits(reference_from_trtllm(out), batch)
    err = (got - ref).abs().max().item()
    assert 0 < err <= tol * ref.abs().max().item()


def test_drop_lm_head_bias_shifts_logits_by_the_bias(fixture_dir, tmp_path):
    model, batch = load_case(fixture_dir, "released_small")
    out = convert_checkpoint(model, tmp_path / "fork", drop_lm_head_bias=True)
    dec = json.loads((out / "decoder" / "config.json").read_text())
    assert dec["has_lm_head_bias"] is False and dec["magpie_parity"]["lm_head_bias"] == "dropped"
    assert "lm_head.bias" not in load_file(str(out / "decoder" / "rank0.safetensors"))
    fork = reference_from_trtllm(out)
    assert fork.final_proj.bias is None
    bias = model.final_proj.bias.detach()
    assert bias.abs().max() > 0
    diff = logits(model, batch) - logits(fork, batch)
    # addmm vs mm + add: equal up to one float32 rounding of each sum
    assert torch.allclose(diff, bias.expand_as(diff), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------------------------


def test_tp2_shards_merge_to_identical_logits(fixture_dir, tmp_path):
    model, batch = load_case(fixture_dir, "multihead_xattn")  # sa 2 heads, xa 4 heads: divisible by 2
    out = convert_checkpoint(model, tmp_path / "tp2", tp_size=2)
    assert sorted(p.name for p in (out / "decoder").iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    r0 = load_file(str(out / "decoder" / "rank0.safetensors"))
    c = model.config
    assert r0["decoder_layers.0.self_attention.qkv.weight"].shape == (3 * c.d_model // 2, c.d_model)
    assert r0["decoder_layers.0.cross_attention.qkv.weight"].shape[0] == 3 * 2 * c.decoder.xa_head_dim
    assert r0["lm_head.weight"].shape[0] == c.num_audio_codebooks * c.num_all_tokens_per_codebook // 2
    assert torch.equal(logits(reference_from_trtllm(out), batch), logits(model, batch))


def tiny_config(**dec) -> MagpieConfig:
    enc = TransformerConfig(n_layers=2, d_model=16, d_ffn=24, sa_n_heads=4, kernel_size=3, is_causal=False,
                            apply_norm_out=True, max_length_causal_mask=32, use_learnable_pos_emb=True)
    d = dict(n_layers=2, d_model=16, d_ffn=24, sa_n_heads=4, kernel_size=1, is_causal=True, apply_norm_out=True,
             max_length_causal_mask=32, use_learnable_pos_emb=True, has_xattn=True, xa_d_memory=16, xa_n_heads=2,
             xa_d_head=6)
    d.update(dec)
    return MagpieConfig(model_type="decoder_context_tts", d_model=16, num_text_tokens=11, num_audio_codebooks=3,
                        codebook_size=8, num_all_tokens_per_codebook=16, frame_stacking_factor=1, audio_bos_id=8,
                        audio_eos_id=9, context_audio_bos_id=10, context_audio_eos_id=11, mask_token_id=12,
                        encoder=enc, decoder=TransformerConfig(**d), inference=InferenceParameters())


def tiny_model(seed=0, **dec) -> MagpieTTS:
    torch.manual_seed(seed)
    m = MagpieTTS(tiny_config(**dec)).eval()
    with torch.no_grad():
        for p in m.parameters():  # LayerNorm weights start at ones; make every tensor distinct
            p.add_(0.1 * torch.randn_like(p))
    return m


def tiny_batch(c: MagpieConfig, seed=1):
    g = torch.Generator().manual_seed(seed)
    text_lens, ctx_lens, audio_lens = torch.tensor([6, 4]), torch.tensor([3, 5]), torch.tensor([7, 5])
    text = torch.randint(0, c.num_text_tokens, (2, 6), generator=g)
    return {"text": text, "text_lens": text_lens,
            "context_audio_codes": torch.randint(0, c.codebook_size, (2, c.num_audio_codebooks, 5), generator=g),
            "context_audio_codes_lens": ctx_lens,
            "audio_codes": torch.randint(0, c.codebook_size, (2, c.num_audio_codebooks, 7), generator=g),
            "audio_codes_lens": audio_lens}


@pytest.mark.parametrize("tp,ffn_split", [(2, "replicate"), (2, "split"), (4, "replicate")])
def test_tiny_tp_round_trip(tp, ffn_split, tmp_path):
    xa = 4 if tp == 4 else 2
    m = tiny_model(xa_n_heads=xa)
    out = convert_checkpoint(m, tmp_path / "ck", tp_size=tp, ffn_split=ffn_split)
    b = tiny_batch(m.config)
    assert torch.equal(logits(reference_from_trtllm(out), b), logits(m, b))


def test_tp_shards_compute_the_full_layer():
    """Row/column-parallel semantics: per-rank partial outputs summed (dense, o_net) or concatenated
    (lm_head) equal the unsplit computation, as TensorRT-LLM's all-reduce / all-gather would produce."""
    m = tiny_model()
    c, tp = m.config, 2
    conv = convert_in_memory(m, tp_size=tp, ffn_split="split")
    full = convert_in_memory(m)
    x = torch.randn(5, c.d_model, generator=torch.Generator().manual_seed(3))

    def attn(qkv, dense, H, Dh):
        q, k, v = qkv.reshape(3, H, Dh, -1)
        qh, kh, vh = ((x @ w.reshape(H * Dh, -1).T).reshape(5, H, Dh).transpose(0, 1) for w in (q, k, v))
        p = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(Dh), -1)
        return (p @ vh).transpose(0, 1).reshape(5, H * Dh) @ dense.T

    name = "decoder_layers.1.self_attention"
    want = attn(full.decoder_ranks[0][f"{name}.qkv.weight"], full.decoder_ranks[0][f"{name}.dense.weight"],
                c.decoder.sa_n_heads, c.decoder.sa_d_head)
    got = sum(attn(r[f"{name}.qkv.weight"], r[f"{name}.dense.weight"], c.decoder.sa_n_heads // tp,
                   c.decoder.sa_d_head) for r in conv.decoder_ranks)
    assert torch.allclose(got, want, atol=1e-6)

    def ffn(w):  # kernel 1 decoder conv as a matmul
        h = F.gelu(x @ w["decoder_layers.0.pos_ff.proj.weight"][..., 0, 0].T, approximate="tanh")
        return h @ w["decoder_layers.0.pos_ff.o_net.weight"][..., 0, 0].T

    assert torch.allclose(sum(ffn(r) for r in conv.decoder_ranks), ffn(full.decoder_ranks[0]), atol=1e-6)
    head = lambda w: x @ w["lm_head.weight"].T + w["lm_head.bias"]  # noqa: E731
    assert torch.equal(torch.cat([head(r) for r in conv.decoder_ranks], -1), head(full.decoder_ranks[0]))


def test_tp_errors(fixture_dir):
    model, _ = load_case(fixture_dir, "released_small")  # 1-head cross-attention
    with pytest.raises(ConversionError, match=r"xa_n_heads.*=1.*cannot be tensor-parallel"):
        convert_in_memory(model, tp_size=2)
    with pytest.raises(ConversionError, match=r"tp_size=3 does not divide encoder.sa_n_heads=4"):
        convert_in_memory(tiny_model(), tp_size=3)
    with pytest.raises(ConversionError, match=r"decoder.sa_n_heads"):
        convert_in_memory(tiny_model(sa_n_heads=2, xa_n_heads=4), tp_size=4)
    with pytest.raises(ConversionError, match=r"decoder.d_ffn=21"):
        convert_in_memory(tiny_model(d_ffn=21), tp_size=2, ffn_split="split")
    convert_in_memory(tiny_model(d_ffn=21), tp_size=2)  # replicated conv FFN: any d_ffn
    with pytest.raises(ConversionError, match=r"tp_size must be a positive integer"):
        convert_in_memory(tiny_model(), tp_size=0)
    with pytest.raises(ConversionError, match=r"dtype must be one of"):
        convert_in_memory(tiny_model(), dtype="float64")


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def tp2_ckpt(tmp_path):
    return convert_checkpoint(tiny_model(), tmp_path / "ck", tp_size=2)


def edit_config(path: Path, **kv):
    cfg = json.loads(path.read_text())
    cfg.update(kv)
    path.write_text(json.dumps(cfg))


def test_missing_shard_is_named(tp2_ckpt):
    (tp2_ckpt / "decoder" / "rank1.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"decoder/rank1\.safetensors: missing shard"):
        load_converted(tp2_ckpt)


def test_extra_shard_rejected(tp2_ckpt):
    (tp2_ckpt / "encoder" / "rank2.safetensors").write_bytes((tp2_ckpt / "encoder" / "rank1.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"rank2\.safetensors.*beyond mapping.tp_size=2"):
        load_converted(tp2_ckpt)


@pytest.mark.parametrize("component,key,value", [
    ("encoder", "num_hidden_layers", 3), ("decoder", "intermediate_size", 48), ("decoder", "vocab_size", 49),
    ("decoder", "encoder_num_heads", 1), ("encoder", "q_scaling", 0.25), ("decoder", "has_lm_head_bias", False),
])
def test_config_inconsistent_names_the_key(tp2_ckpt, component, key, value):
    edit_config(tp2_ckpt / component / "config.json", **{key: value})
    with pytest.raises(ConversionError, match=rf"config key '{key}'"):
        load_converted(tp2_ckpt)


def test_weight_shape_mismatch_names_tensor_and_key(tmp_path):
    out = convert_checkpoint(tiny_model(), tmp_path / "ck")
    f = out / "decoder" / "rank0.safetensors"
    w = load_file(str(f))
    w["decoder_layers.0.pos_ff.proj.weight"] = torch.randn(20, 16, 1, 1)
    save_file(w, str(f))
    with pytest.raises(ConversionError, match=r"'decoder_layers.0.pos_ff.proj.weight' has shape \(20, 16, 1, 1\).*'intermediate_size'"):
        load_converted(out)


def test_unknown_and_missing_tensor_names(tmp_path):
    out = convert_checkpoint(tiny_model(), tmp_path / "ck")
    f = out / "encoder" / "rank0.safetensors"
    w = load_file(str(f))
    w["encoder_layers.0.mlp.fc.weight"] = torch.randn(3, 3)
    save_file(w, str(f))
    with pytest.raises(ConversionError, match=r"unknown tensor names \['encoder_layers.0.mlp.fc.weight'\]"):
        load_converted(out)
    del w["encoder_layers.0.mlp.fc.weight"], w["encoder_layers.1.attention.dense.weight"]
    save_file(w, str(f))
    with pytest.raises(ConversionError, match=r"'encoder_layers.1.attention.dense.weight' is missing"):
        load_converted(out)


def test_replicated_shards_must_agree(tp2_ckpt):
    f = tp2_ckpt / "decoder" / "rank1.safetensors"
    w = load_file(str(f))
    w["final_layernorm.weight"] = w["final_layernorm.weight"] + 1
    save_file(w, str(f))
    with pytest.raises(ConversionError, match=r"'final_layernorm.weight' differs between rank0 and rank1"):
        load_converted(tp2_ckpt)


def test_service_row_must_be_zero(tmp_path):
    out = convert_checkpoint(tiny_model(), tmp_path / "ck")
    f = out / "decoder" / "rank0.safetensors"
    w = load_file(str(f))
    w["embedding.vocab_embedding.weight"][-1] = 1.0
    save_file(w, str(f))
    with pytest.raises(ConversionError, match=r"CFG service token"):
        load_converted(out)


def test_fork_checkpoint_without_metadata_is_refused(tmp_path):
    out = convert_checkpoint(tiny_model(), tmp_path / "ck")
    cfg = json.loads((out / "encoder" / "config.json").read_text())
    del cfg["magpie_parity"]
    (out / "encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"no 'magpie_parity' metadata"):
        load_converted(out)
    with pytest.raises(ConversionError, match=r"not a directory"):
        load_converted(tmp_path / "nope")
    (out / "decoder" / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"decoder/config.json: missing"):
        load_converted(out)


def test_atomic_write(tmp_path, monkeypatch):
    m = tiny_model()
    target = tmp_path / "ck"
    convert_checkpoint(m, target)
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(m, target)
    before = load_file(str(target / "decoder" / "rank0.safetensors"))

    import safetensors.torch as st

    calls = {"n": 0}
    real = st.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tiny_model(seed=5), target, overwrite=True)
    monkeypatch.setattr(st, "save_file", real)
    # the old checkpoint is untouched and no temporary directory is left behind
    after = load_file(str(target / "decoder" / "rank0.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    convert_checkpoint(tiny_model(seed=5), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not torch.equal(load_file(str(target / "decoder" / "rank0.safetensors"))["lm_head.weight"],
                           before["lm_head.weight"])


def test_bad_source():
    with pytest.raises(ConversionError, match="expected a .nemo/.ckpt path or a reference MagpieTTS"):
        convert_in_memory(42)


def test_overwrite_replaces_only_a_converted_checkpoint(fixture_dir, tmp_path):
    """overwrite=True must never delete a folder this tool did not write: a folder of notes stays as it was."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ConversionError, match="is not a checkpoint magpie-parity converted"):
        convert_checkpoint(fixture_dir / "released_small.nemo", notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    out = convert_checkpoint(fixture_dir / "released_small.nemo", tmp_path / "ckpt")
    assert convert_checkpoint(fixture_dir / "four_codebooks.nemo", out, overwrite=True) == out  # its own: replaced
    assert reference_from_trtllm(out).config.num_audio_codebooks == 4


# ---------------------------------------------------------------------------------------------------------------
# decoder_ce (baked speaker tables, context encoders), local transformers, frame stacking
# ---------------------------------------------------------------------------------------------------------------

DCE_CASES = ["dce_context", "dce_baked_v2607", "dce_baked_v2602", "dce_maskgit"]
DATA = ROOT / "fixtures" / "data"


def dce_case(case):
    if not (DATA / f"{case}.nemo").is_file():
        pytest.skip(f"fixtures/data/{case}.nemo is not built")
    return MagpieTTS.from_nemo(DATA / f"{case}.nemo"), load_file(str(DATA / f"{case}.batch.safetensors"))


@pytest.mark.parametrize("case", DCE_CASES + ["stacked_lt"])
def test_decoder_ce_and_local_transformer_round_trip(case, tmp_path):
    """Every dce fixture (and the decoder_context_tts one with a local transformer): refused in one line without
    without_local_transformer; with it, the engine weights hold only what the forks' decoder engine holds, the rest is
    kept beside, and the reference rebuilt from the converted folder is the original, logits bit for bit."""
    model, batch = dce_case(case)
    c = model.config
    with pytest.raises(ConversionError, match=r"local_transformer_type='(autoregressive|maskgit)': the forks' decoder "
                                              r"engine has no local transformer .*without_local_transformer=True") as e:
        convert_checkpoint(DATA / f"{case}.nemo", tmp_path / "refused")
    assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()
    out = convert_checkpoint(DATA / f"{case}.nemo", tmp_path / "ck", without_local_transformer=True)
    back = reference_from_trtllm(out)
    assert back.config == c
    sd, orig = back.state_dict(), model.state_dict()
    assert set(sd) == set(orig) and all(torch.equal(sd[k], orig[k]) for k in orig)
    ref = logits(model, batch)
    assert ref.abs().max() > 0 and torch.equal(logits(back, batch), ref)
    # the engine's weights: the fork's names only (no baked table, context encoder or local transformer)
    dec_w = load_file(str(out / "decoder" / "rank0.safetensors"))
    assert set(dec_w) == expected_names(c, "decoder")
    assert set(load_file(str(out / "encoder" / "rank0.safetensors"))) == expected_names(c, "encoder")
    # beside it, NeMo's names, the original values and dtypes
    side = load_file(str(out / "magpie_parity" / "outside_engine.safetensors"))
    assert all(torch.equal(side[k], orig[k]) and side[k].dtype == orig[k].dtype for k in side)
    want = {k for k in orig if k.startswith("local_transformer")}
    if c.baked:
        want |= {"baked_context_embedding.weight", "_baked_embedding_T", "_baked_embedding_D",
                 "baked_context_embedding_len"}
    want |= {k for k in orig if k.startswith("context_encoder.")}
    assert set(side) == want
    d = json.loads((out / "decoder" / "config.json").read_text())
    S, C, V = c.frame_stacking_factor, c.num_audio_codebooks, c.num_all_tokens_per_codebook
    assert d["vocab_sizes"] == [V] * (C * S) and d["num_vocabs"] == C * S and d["stacking_factor"] == S
    assert d["localtransformer_path"] is None  # the fork's converter without --localtransformer_path
    meta = d["magpie_parity"]
    assert meta["outside_engine"]["file"] == "magpie_parity/outside_engine.safetensors"
    assert meta["outside_engine"]["tensors"] == sorted(want)
    if c.model_type == "decoder_ce":
        assert d["use_context_embeddings"] is True  # anand-nv@0c0df9f0 convert_checkpoint.py
        assert meta["context"] == ("baked" if c.baked else "context_encoder")
    else:
        assert "use_context_embeddings" not in d and meta["context"] == "codes"


@pytest.mark.parametrize("case", DCE_CASES)
def test_minimal_nemo_config_rebuilds_decoder_ce_configs(case):
    model, _ = dce_case(case)
    cfg = nemo_config_from_magpie(model.config)
    json.dumps(cfg)
    assert MagpieConfig.from_nemo(cfg, model.state_dict()) == model.config


def test_decoder_ce_in_reduced_precision_keeps_the_side_tensors_exact(tmp_path):
    model, batch = dce_case("dce_baked_v2607")
    out = convert_checkpoint(model, tmp_path / "fp16", dtype="float16", without_local_transformer=True)
    side = load_file(str(out / "magpie_parity" / "outside_engine.safetensors"))
    assert side["baked_context_embedding.weight"].dtype == torch.float32
    back = reference_from_trtllm(out)
    assert torch.equal(back.baked_context_embedding.weight, model.baked_context_embedding.weight)
    ref, got = logits(model, batch), logits(back, batch)
    assert 0 < (got - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


def test_side_file_missing_or_disagreeing_is_one_error(tmp_path):
    model, _ = dce_case("dce_baked_v2602")
    out = convert_checkpoint(model, tmp_path / "ck", without_local_transformer=True)
    side = out / "magpie_parity" / "outside_engine.safetensors"
    tensors = load_file(str(side))
    side.unlink()
    with pytest.raises(ConversionError, match=r"outside_engine.safetensors: missing: the baked speaker table, "
                                              r"autoregressive local transformer the engine does not hold"):
        load_converted(out)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(side))
    with pytest.raises(ConversionError, match=r"tensors do not match the config: missing \[\], unknown \['extra"):
        load_converted(out)
    side.write_bytes(b"garbage")
    with pytest.raises(ConversionError, match=r"unreadable safetensors file"):
        load_converted(out)
    # a side file the metadata does not list
    plain = convert_checkpoint(tiny_model(), tmp_path / "plain")
    (plain / "magpie_parity").mkdir()
    save_file(tensors, str(plain / "magpie_parity" / "outside_engine.safetensors"))
    with pytest.raises(ConversionError, match=r"present, but magpie_parity in config.json lists nothing"):
        load_converted(plain)


def test_decoder_ce_config_key_is_checked(tmp_path):
    model, _ = dce_case("dce_context")
    out = convert_checkpoint(model, tmp_path / "ck", without_local_transformer=True)
    p = out / "decoder" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["use_context_embeddings"] = False
    p.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"config key 'use_context_embeddings' is False but the checkpoint "
                                              r"metadata implies True"):
        load_converted(out)
