"""parity.names: one-to-one over the capture points, round trips, NeMo paths, unknown names rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity.names import (CANONICAL, ENGINE_IO, GENERATION_INFO, GENERATIONS, INFERENCE, TRT_NAMES, NameMap,
                          NemoPoint, UnknownNameError, canonical_names, engine_io, generation_info, markdown_table,
                          nemo_hook_points, nemo_return_points)
from reference.config import MagpieConfig, TransformerConfig
from reference.model import MagpieTTS

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_MODELS = sorted(p for p in (ROOT / "fixtures" / "data").glob("*.nemo") if not p.name.startswith("codec_"))


def layer_counts(path: Path) -> tuple[int, int, int]:
    """(encoder, decoder, context-encoder) layers of a fixture checkpoint, read from its config and weights (not
    from the reference): the context encoder counts only in a decoder_ce model that runs it (0 when baked)."""
    from reference.checkpoint import read_checkpoint

    ck = read_checkpoint(path)
    cfg, sd = ck.config, ck.state_dict
    n_ctx = 0
    if cfg.get("model_type") == "decoder_ce" and "baked_context_embedding.weight" not in sd:
        n_ctx = int(cfg["context_encoder"]["n_layers"])
    return int(cfg["encoder"]["n_layers"]), int(cfg["decoder"]["n_layers"]), n_ctx


def reference_model_or_skip(path: Path) -> MagpieTTS:
    """The reference model of a fixture; skipped (not failed) for a model type the reference does not load yet."""
    from reference.config import ConfigError

    try:
        return MagpieTTS.from_nemo(path)
    except ConfigError as e:
        if "is not supported" in str(e) and "model_type" in str(e):
            pytest.skip(f"{path.name}: {e}")
        raise


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


def _nemo_model(case: str):
    fx = ROOT / "fixtures" / "data" / f"{case}.nemo"
    if not fx.is_file():
        pytest.fail(f"fixtures/data/{case}.nemo is missing: the bundled fixtures are part of the repository")
    import sys

    sys.path.insert(0, str(ROOT / "fixtures"))
    import make_fixtures as mf

    mf._quiet_nemo()
    return mf.load_model(fx)


@pytest.mark.nemo
@pytest.mark.parametrize("case", ["released_small", "dce_context", "dce_baked_v2607"])
def test_nemo_paths_match_nemo_capture_on_a_real_nemo_model(case):
    from parity.nemo_capture import _nemo_capture_points, nemo_context_encoder_layers

    model = _nemo_model(case)
    n_ctx = nemo_context_encoder_layers(model)
    # decoder_ce with context codes runs its context encoder; a baked table replaces it; other types have none
    assert n_ctx == {"released_small": 0, "dce_context": 2, "dce_baked_v2607": 0}[case]
    points = _nemo_capture_points(model)
    nm = NameMap(len(model.encoder.layers), len(model.decoder.layers), n_ctx)
    assert [p[0] for p in points] == nm.all_canonical()[:-1]  # 'logits' is the process_batch return value
    assert any(p[0].startswith("context_encoder.") for p in points) == (n_ctx > 0)
    for name, module, _select, kind in points:
        p = nm.nemo_path(name)
        assert model.get_submodule(p.module) is module, name
        assert (kind == "pre") == (p.hook == "forward_pre"), name
        # the class the table names is the module's class in NeMo 3.0.0
        owner, cls = p.cls.rsplit(".", 1)
        t = type(module)
        if owner == "torch.nn":
            assert t is getattr(torch.nn, cls), (name, p.cls, t)
        else:
            assert t.__module__ == f"nemo.collections.tts.modules.{owner}" and t.__qualname__ == cls, (name, p.cls, t)
    assert [n for n, _ in nemo_return_points()] == ["logits"]
    assert callable(getattr(type(model), "process_batch"))


@pytest.mark.nemo
@pytest.mark.parametrize("case", [p.stem for p in FIXTURE_MODELS])
def test_nemo_dump_from_the_table_is_byte_identical_to_the_fixture(tmp_path, case):
    """parity/nemo_capture.py takes its hooks from the table: its teacher-forced dump of each fixture model holds
    the same names, steps, shapes, dtypes and values (torch.equal) as the bundled NeMo dump."""
    from safetensors.torch import load_file

    from parity.dump import DumpReader
    from parity.nemo_capture import dump_nemo_process_batch

    model = _nemo_model(case)
    batch = load_file(str(ROOT / "fixtures" / "data" / f"{case}.batch.safetensors"))
    want = DumpReader(ROOT / "fixtures" / "data" / f"{case}.nemo_dump")
    # MaskGit draws random numbers in process_batch: the fixture dump records the seed it was made with
    got = DumpReader(dump_nemo_process_batch(model, batch, tmp_path / "nemo", seed=want.layout.get("seed")))
    key = lambda e: (e.name, e.step, e.shape, e.dtype)  # noqa: E731
    assert [key(e) for e in got] == [key(e) for e in want]
    for a, b in zip(got, want):
        assert torch.equal(got.load(a.name, a.step), want.load(b.name, b.step)), a.name


# ------------------------------------------------------------------------------------ the one table


@pytest.mark.parametrize("path", FIXTURE_MODELS, ids=lambda p: p.stem)
def test_table_expands_to_the_reference_capture_points_of_every_fixture(path):
    """The table's canonical templates, expanded for each fixture model, are exactly the reference's capture
    points, in order: reference/model.py and parity/names.py cannot drift apart. The layer counts come from the
    checkpoint; a model type the reference does not load yet (decoder_ce until it does) is skipped."""
    m = reference_model_or_skip(path)
    n_enc, n_dec, n_ctx = layer_counts(path)
    assert (n_enc, n_dec) == (m.config.encoder.n_layers, m.config.decoder.n_layers)
    assert canonical_names(n_enc, n_dec, n_ctx) == m.capture_points()
    assert NameMap(n_enc, n_dec, n_ctx).all_canonical() == m.capture_points()
    mods = dict(m.named_modules())
    assert all(n in mods for n in m.capture_points())  # module paths, as reference/capture.py needs


def test_fixture_models_are_all_covered():
    import make_fixtures

    assert sorted(p.stem for p in FIXTURE_MODELS) == sorted(make_fixtures.ALL_CASES)


def test_context_encoder_points():
    """decoder_ce: the context encoder's points sit between the text encoder's output and the decoder input, one
    block per layer, only when the model runs its context encoder; NeMo hooks them as it hooks the encoder's."""
    names = canonical_names(1, 1, 2)
    i, j = names.index("encoder.norm_out"), names.index("decoder_input")
    per_layer = [f"context_encoder.layers.{k}{x}" for k in range(2) for x in (".self_attention", ".pos_ff", "")]
    assert names[i + 1:j] == per_layer + ["context_encoder.norm_out"]
    assert canonical_names(2, 3) == canonical_names(2, 3, 0) == small_model().capture_points()
    assert not [n for n in canonical_names(2, 3, 0) if "context" in n]
    nm = NameMap(1, 1, 2)
    for kind, select in (("self_attention", "output[0]"), ("pos_ff", "output")):
        p, q = nm.nemo_path(f"context_encoder.layers.1.{kind}"), nm.nemo_path(f"encoder.layers.0.{kind}")
        assert (p.module, p.select, p.hook, p.cls) == (f"context_encoder.layers.1.{kind}", select, q.hook, q.cls)
    assert nm.nemo_path("context_encoder.layers.0").select == "output['output']"
    assert nm.nemo_path("context_encoder.norm_out").module == "context_encoder.norm_out"
    with pytest.raises(UnknownNameError, match=r"layer 2 does not exist \(the model has 2 layers"):
        nm.nemo_path("context_encoder.layers.2.pos_ff")
    with pytest.raises(UnknownNameError, match="exists only in decoder_ce models that run a context encoder"):
        NameMap(1, 1, 0).nemo_path("context_encoder.norm_out")
    assert NameMap().nemo_path("context_encoder.layers.7").module == "context_encoder.layers.7"  # counts unknown
    for g in GENERATIONS:  # no engine runs a context encoder
        assert g not in nm.generations_with("context_encoder.norm_out")
    names = [n for n, _ in nemo_hook_points(1, 1, 2)] + [n for n, _ in nemo_return_points()]
    assert names == canonical_names(1, 1, 2)


def _resolve(location: str):
    """'reference/model.py: CrossAttention.forward' -> the object (the module is imported by its file path)."""
    import importlib

    file, qual = (x.strip() for x in location.split(":", 1))
    assert file.startswith("reference/") and file.endswith(".py"), location
    obj = importlib.import_module(file[:-3].replace("/", "."))
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def test_reference_code_locations_exist():
    for p in CANONICAL:
        assert callable(_resolve(p.reference)), p.template
    for p in INFERENCE:
        if p.reference:
            assert callable(_resolve(p.reference)), p.name
    # the HookPoints the table relies on sit where it says
    m = small_model()
    assert type(m.decoder.layers[0].cross_attention.attn_probs).__name__ == "HookPoint"
    assert type(m.decoder_input).__name__ == "HookPoint" and type(m.logits).__name__ == "HookPoint"


def test_nemo_selectors():
    p = NemoPoint("decoder.layers.0.cross_attention", "output[1][0]", "forward")
    assert p.keys() == (1, 0) and p.pick(("y", ["prob", "score"])) == "prob"
    assert NemoPoint("x", "output['output']", "forward").pick({"output": 3}) == 3
    assert NemoPoint("decoder", "args[0]", "forward_pre").pick((5, 6)) == 5
    assert NemoPoint(None, "output['logits']", "return").pick({"logits": 7}) == 7
    with pytest.raises(ValueError, match="not of the form"):
        NemoPoint("x", "out.put[0]", "forward").keys()
    for p in CANONICAL:
        p.nemo.keys()  # every selector of the table parses
        assert p.nemo.hook in ("forward", "forward_pre", "return") and p.nemo.cls
    names = [n for n, _ in nemo_hook_points(2, 3)] + [n for n, _ in nemo_return_points()]
    assert names == small_model().capture_points()


def test_every_row_cites_its_source_and_names_known_things():
    templates = {p.template for p in CANONICAL}
    for g in GENERATION_INFO:
        assert g.repo.count("/") == 1 and g.commit and g.path.endswith(".py") and g.detection
    for r in TRT_NAMES:
        assert r.canonical in templates and r.generation in GENERATIONS and r.where
        assert r.source.startswith(f"{generation_info(r.generation).source} ("), r
    inference = {p.name for p in INFERENCE}
    for r in ENGINE_IO:
        assert r.canonical in inference and r.generation in GENERATIONS and r.direction in ("input", "output")
        assert r.layout in ("per_sequence", "per_sequence_rows", "per_gen_sequence", "per_gen_sequence_rows",
                            "per_sequence_block")
        assert engine_io(r.trt, r.generation) is r
    assert len({(r.trt, r.generation) for r in ENGINE_IO}) == len(ENGINE_IO)
    # the commits of the generations added from the forks' sources
    assert generation_info("fork_19ff87be").source == (
        "anand-nv/TensorRT-LLM@19ff87beb765923aba3fdfca0606cdb7d1b37802:tensorrt_llm/models/t5tts/model.py")
    assert generation_info("fork_e7109d5").commit == "e7109d5b53686dda8363697e3ffb54eccac84197"


def test_fork_19ff87be_and_e7109d5_scores():
    """anand-nv@19ff87be: encoder debug outputs, real lm_head logits, no decoder debug outputs, the prior
    tensors as inputs over generation sequences; rmittal@e7109d5's 'scores' is ingested as the layer mean of the
    raw cross-attention logits."""
    nm = NameMap(2, 3)
    g = "fork_19ff87be"
    assert nm.from_canonical("encoder.layers.1.self_attention", g)[0] == "encoder_layers.1.attention_output"
    assert nm.from_canonical("encoder.layers.1.pos_ff", g)[0] == "encoder_layers.1.pos_ff_output"
    assert nm.from_canonical("encoder.norm_out", g)[0] == "encoder_output"
    assert nm.to_canonical("logits", generation=g)[0] == "logits"
    for name in ("decoder.layers.0.self_attention", "decoder.norm_out", "text_embedding", "decoder_input"):
        assert g not in nm.generations_with(name), name
    focus, scores = engine_io("attention_prior_focus", g), engine_io("attention_prior_scores", g)
    assert (focus.direction, focus.layout, focus.canonical) == ("input", "per_gen_sequence",
                                                                "inference.attention_prior_focus")
    assert (scores.direction, scores.layout) == ("input", "per_gen_sequence_rows")
    assert engine_io("attention_prior_scores", "fork_497d0e69").direction == "output"
    io = engine_io("scores", "fork_e7109d5")
    assert (io.canonical, io.layout, io.direction) == ("inference.cross_attention_logits_mean", "per_sequence_block",
                                                       "output")
    assert engine_io("scores", g) is None


def test_every_name_in_the_fixture_dumps_is_in_the_table():
    from parity.dump import DumpReader

    known = {p.name for p in INFERENCE}
    dumps = sorted(p for p in (ROOT / "fixtures" / "data").iterdir() if p.is_dir())
    assert dumps
    for d in dumps:
        case = d.name.split(".")[0]
        names = set(canonical_names(*layer_counts(ROOT / "fixtures" / "data" / f"{case}.nemo"))) | known
        unknown = [n for n in DumpReader(d).names() if n not in names]
        assert not unknown, (d.name, unknown)


def test_docs_names_md_is_generated_from_the_table():
    doc = ROOT / "docs" / "names.md"
    text = markdown_table()
    assert doc.read_text() == text + "\n", (
        "docs/names.md is stale; regenerate it: "
        "python -c \"from parity.names import markdown_table; print(markdown_table())\" > docs/names.md")
    # one row per canonical template, per generation column; every TRT name appears
    for p in CANONICAL:
        assert f"| `{p.template}` |" in text
    for g in GENERATIONS:
        assert f"`{g}`" in text
    for r in TRT_NAMES + ENGINE_IO:
        assert f"`{r.trt}`" in text
