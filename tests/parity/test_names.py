"""parity.names: one-to-one over the capture points, round trips, NeMo paths, unknown names rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity.names import GENERATIONS, NameMap, UnknownNameError
from reference.config import MagpieConfig, TransformerConfig
from reference.model import MagpieTTS

ROOT = Path(__file__).resolve().parents[2]


def small_model(n_enc=2, n_dec=3) -> MagpieTTS:
    enc = TransformerConfig(n_layers=n_enc, d_model=8, d_ffn=16, sa_n_heads=2, kernel_size=3, is_causal=False,
                            apply_norm_out=True, max_length_causal_mask=16, use_learnable_pos_emb=True)
    dec = TransformerConfig(n_layers=n_dec, d_model=8, d_ffn=16, sa_n_heads=2, kernel_size=1, is_causal=True,
                            apply_norm_out=True, max_length_causal_mask=16, use_learnable_pos_emb=True,
                            has_xattn=True, xa_d_memory=8, xa_n_heads=1, xa_d_head=4)
    return MagpieTTS(MagpieConfig(model_type="decoder_context_tts", d_model=8, num_text_tokens=7,
                                  num_audio_codebooks=2, codebook_size=4, num_all_tokens_per_codebook=12,
                                  frame_stacking_factor=1, audio_bos_id=4, audio_eos_id=5, context_audio_bos_id=6,
                                  context_audio_eos_id=7, mask_token_id=8, encoder=enc, decoder=dec))


EXPECTED_C6FF = {  # fork c6ff2312 model.py register_network_output names (architecture.md 10)
    "text_embedding": "embedding_layer_output",
    "encoder.layers.1.self_attention": "encoder_layers.1.attention_output",
    "encoder.layers.1.pos_ff": "encoder_layers.1.pos_ff_output",
    "encoder.norm_out": "encoder_output",
    "decoder_input": "embedding_layer_output",
    "decoder.layers.2.self_attention": "decoder_layers.2.self_attention_output",
    "decoder.layers.2.cross_attention": "decoder_layers.2.cross_attention_output",
    "decoder.layers.2.pos_ff": "decoder_layers.2.pos_ff_output",
    "decoder.layers.2": "decoder_layer_2_output",
    "decoder.norm_out": "logits_before_lmhead",
    "logits": "logits",
}


def test_all_canonical_is_the_models_capture_points():
    m = small_model()
    assert NameMap().all_canonical(2, 3) == m.capture_points()
    assert NameMap(2, 3).all_canonical() == m.capture_points()


@pytest.mark.parametrize("generation", GENERATIONS)
def test_one_to_one_and_round_trip(generation):
    nm = NameMap(2, 3)
    m = small_model()
    seen = {}
    for name in m.capture_points():
        if generation not in nm.generations_with(name):
            with pytest.raises(UnknownNameError, match="has no TensorRT-LLM debug tensor"):
                nm.from_canonical(name, generation)
            continue
        trt, info = nm.from_canonical(name, generation)
        key = (trt, info.engine)
        assert key not in seen, f"{name} and {seen.get(key)} share {key}"
        seen[key] = name
        back, layer, info2 = nm.to_canonical(trt, generation=generation, engine=info.engine)
        assert back == name and info2 == info
        assert layer == (int(name.split(".")[2]) if ".layers." in name else None)
    assert seen  # every generation has at least the encoder output


def test_fork_c6ff2312_names_and_layouts():
    nm = NameMap(2, 3)
    for canon, trt in EXPECTED_C6FF.items():
        assert nm.from_canonical(canon, "fork_c6ff2312")[0] == trt
    assert nm.from_canonical("encoder.layers.0.self_attention", "fork_e7109d5")[0] == "encoder_layers.0.attention_output"
    assert nm.from_canonical("encoder.layers.0.pos_ff", "upstream_new")[0] == "transformer.layers.0.mlp_output"
    assert nm.from_canonical("decoder.layers.1.pos_ff", "upstream_old")[0] == "decoder_layers.1.mlp_output"
    _, info = nm.from_canonical("encoder.norm_out", "fork_e7109d5")
    assert info.final_ln == "post" and info.engine == "encoder" and not info.cfg_pairs
    _, info = nm.from_canonical("decoder.norm_out", "fork_c6ff2312")
    assert info.final_ln == "post" and info.layout == "last_token" and info.cfg_pairs
    _, info = nm.from_canonical("decoder.layers.0.cross_attention", "fork_c6ff2312")
    assert info.final_ln == "pre" and info.layout == "packed_tokens" and info.per_step
    assert nm.from_canonical("decoder_input", "fork_c6ff2312")[1].add_positions
    # the 497d0e69 'logits' output is the final-LN hidden state
    assert nm.to_canonical("logits", generation="fork_497d0e69")[0] == "decoder.norm_out"
    assert nm.to_canonical("logits", generation="fork_e7109d5")[0] == "logits"
    # the later fork decoders register no debug tensors
    assert nm.generations_with("decoder.layers.0.self_attention") == ["fork_c6ff2312", "upstream_old", "upstream_new"]
    # no engine exposes these
    assert nm.generations_with("encoder.layers.0") == [] and nm.generations_with("final_proj") == []
    assert nm.generations_with("decoder.layers.0.cross_attention.attn_probs") == []


def test_ambiguous_names_need_engine_or_generation():
    nm = NameMap()
    with pytest.raises(UnknownNameError, match=r"'embedding_layer_output' is ambiguous.*pass engine="):
        nm.to_canonical("embedding_layer_output")
    assert nm.to_canonical("embedding_layer_output", engine="decoder")[0] == "decoder_input"
    assert nm.to_canonical("embedding_layer_output", engine="encoder")[0] == "text_embedding"
    with pytest.raises(UnknownNameError, match="ambiguous"):
        nm.to_canonical("transformer.layers.4.mlp_output")
    assert nm.to_canonical("transformer.layers.4.mlp_output", engine="decoder")[:2] == ("decoder.layers.4.pos_ff", 4)
    with pytest.raises(UnknownNameError, match="ambiguous"):
        nm.to_canonical("logits")
    assert nm.to_canonical("encoder_layers.11.pos_ff_output") [:2] == ("encoder.layers.11.pos_ff", 11)


def test_unknown_names_rejected_with_near_matches():
    nm = NameMap(2, 3)
    with pytest.raises(UnknownNameError, match=r"unknown TensorRT-LLM debug tensor 'decoder_layers.1.self_attn_output'.*"
                                               r"near matches: \[.*'decoder_layers.\{i\}.self_attention_output'"):
        nm.to_canonical("decoder_layers.1.self_attn_output")
    with pytest.raises(UnknownNameError, match=r"unknown canonical name 'decoder.layer.0.pos_ff'.*decoder.layers.\{i\}.pos_ff"):
        nm.from_canonical("decoder.layer.0.pos_ff", "fork_c6ff2312")
    with pytest.raises(UnknownNameError, match=r"layer 3 does not exist \(the model has 3 layers"):
        nm.from_canonical("decoder.layers.3.pos_ff", "fork_c6ff2312")
    with pytest.raises(UnknownNameError, match=r"layer 2 does not exist"):
        nm.to_canonical("encoder_layers.2.attention_output")
    with pytest.raises(UnknownNameError, match=r"unknown generation 'fork_x'"):
        nm.from_canonical("logits", "fork_x")
    with pytest.raises(UnknownNameError, match=r"'decoder_layer_0_output'.*generation=fork_e7109d5"):
        nm.to_canonical("decoder_layer_0_output", generation="fork_e7109d5")
    with pytest.raises(ValueError, match="engine must be"):
        nm.to_canonical("logits", engine="both")
    with pytest.raises(ValueError, match="needs the encoder and decoder layer counts"):
        NameMap().all_canonical()


def test_nemo_paths_follow_the_model_and_nemo_capture():
    nm = NameMap(2, 3)
    p = nm.nemo_path("decoder_input")
    assert (p.module, p.select, p.hook) == ("decoder", "args[0]", "forward_pre")
    p = nm.nemo_path("decoder.layers.1.cross_attention.attn_probs")
    assert (p.module, p.select) == ("decoder.layers.1.cross_attention", "output[1][0]")
    assert nm.nemo_path("encoder.layers.0").select == "output['output']"
    assert nm.nemo_path("encoder.layers.0.self_attention").select == "output[0]"
    assert nm.nemo_path("logits").module is None
    # every NeMo module path exists in the reference too (same module tree as NeMo's names)
    m = small_model()
    mods = dict(m.named_modules())
    for name in m.capture_points():
        p = nm.nemo_path(name)
        if p.module is not None:
            assert p.module in mods, name


@pytest.mark.nemo
def test_nemo_paths_match_nemo_capture_on_a_real_nemo_model():
    fx = ROOT / "fixtures" / "data" / "released_small.nemo"
    if not fx.is_file():
        pytest.fail("fixtures/data/released_small.nemo is missing: the bundled fixtures are part of the repository")
    import sys

    sys.path.insert(0, str(ROOT / "fixtures"))
    import make_fixtures as mf
    from parity.nemo_capture import _nemo_capture_points

    mf._quiet_nemo()
    model = mf.load_model(fx)
    points = _nemo_capture_points(model)
    nm = NameMap(len(model.encoder.layers), len(model.decoder.layers))
    assert [p[0] for p in points] == nm.all_canonical()[:-1]  # 'logits' is the process_batch return value
    for name, module, _select, kind in points:
        p = nm.nemo_path(name)
        assert model.get_submodule(p.module) is module, name
        assert (kind == "pre") == (p.hook == "forward_pre"), name
