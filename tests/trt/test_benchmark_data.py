"""trt.benchmark_data: fork-format JSON round trip, validation errors, conversion to a reference batch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.model import MagpieTTS
from trt import benchmark_data as bd

ROOT = Path(__file__).resolve().parents[2]


def test_seed_defaults_and_fork_layout(tmp_path):
    ds = bd.generate_dataset(num_samples=3, seed=1)  # seed lengths, fork stride 2048, 8 codebooks, 768-dim features
    s = ds.samples[0]
    assert (s.input_len, s.output_len, s.task_id) == (128, 480, -1)
    assert len(s.input_feat) == 128 * 768 and s.input_ids is None
    assert len(s.context_ids) == 160 * 8
    assert s.context_ids[:8] == [k * 2048 for k in range(8)]  # first frame: code 0 of every codebook
    codes = s.context_codes(8, 2048)
    assert codes.shape == (8, 160) and codes.min() >= 0 and codes.max() < 2048 and codes[:, 1:].any()
    path = bd.write_dataset(ds, tmp_path / "b.json")
    blob = json.loads(path.read_text())
    assert set(blob) == {"metadata", "samples"}
    md = blob["metadata"]
    assert md["workload_type"] == "token-norm-dist" and md["tokenize_vocabsize"] == 8 * 2048
    assert md["num_requests"] == 3 and md["max_input_len"] == 128 and md["max_output_len"] == 480
    assert list(blob["samples"][0])[:3] == ["input_len", "output_len", "task_id"]
    assert bd.SEED_NUM_SAMPLES == 512 and bd.generate_dataset.__defaults__[0] == 512


samples_strategy = st.integers(1, 3).flatmap(lambda nv: st.tuples(
    st.just(nv), st.integers(2, 9), st.booleans(), st.integers(1, 4),
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(0, 4), st.integers(0, 2**31 - 1)),
             min_size=0, max_size=4)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples_strategy)
def test_round_trip_random(tmp_path, spec):
    nv, V, use_ids, dim, rows = spec
    rng = np.random.default_rng(0)
    samples = []
    for n, out_len, ctx_len, seed in rows:
        r = np.random.default_rng(seed)
        ctx = (r.integers(0, V, size=(ctx_len, nv)) + np.arange(nv) * V).reshape(-1).tolist()
        s = bd.BenchmarkSample(n, out_len, ctx, task_id=int(r.integers(-1, 3)))
        if use_ids:
            s.input_ids = r.integers(0, 50, size=n).tolist()
        else:
            s.input_feat = r.standard_normal(n * dim).tolist()
        samples.append(s)
    ds = bd.BenchmarkDataset(samples, nv, V, None if use_ids else dim)
    back = bd.read_dataset(bd.write_dataset(ds, tmp_path / "r.json"))
    assert back.samples == samples
    assert (back.num_vocabs, back.audio_vocab_size) == (nv, V)
    if samples and not use_ids:
        assert back.feature_dim == dim
    del rng


def write_raw(tmp_path, blob) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(blob if isinstance(blob, str) else json.dumps(blob))
    return p


def good_blob():
    ds = bd.generate_dataset(num_samples=2, text_len=3, context_frames=2, output_frames=4, num_vocabs=2,
                             audio_vocab_size=10, text_vocab_size=7, seed=3)
    return {"metadata": bd.make_metadata(ds.samples, 2, 10, None), "samples": [s.to_json() for s in ds.samples]}


@pytest.mark.parametrize("edit,match", [
    (lambda b: "{not json", r"not valid JSON"),
    (lambda b: [1, 2], r"top level must be an object"),
    (lambda b: {**b, "samples": {}}, r"'samples' must be a list"),
    (lambda b: b["samples"][1].pop("output_len") and b, r"samples\[1\]\.output_len: missing"),
    (lambda b: b["samples"][0].update(input_len=0) or b, r"samples\[0\]\.input_len: must be a positive integer"),
    (lambda b: b["samples"][1].update(input_len=True) or b, r"samples\[1\]\.input_len: must be a positive integer"),
    (lambda b: b["samples"][0].update(input_ids=[1, 2]) or b, r"samples\[0\]\.input_ids: 2 ids but input_len is 3"),
    (lambda b: b["samples"][0].update(input_ids=[1, -2, 3]) or b, r"samples\[0\]\.input_ids: must be a list of non-negative"),
    (lambda b: b["samples"][1].update(input_feat=[0.5] * 3) or b, r"samples\[1\]: needs exactly one of"),
    (lambda b: b["samples"][1].pop("input_ids") and b, r"samples\[1\]: needs exactly one of"),
    (lambda b: b["samples"][0].update(context_ids=[0, 10, 1]) or b, r"samples\[0\]\.context_ids: length 3 is not a multiple of num_vocabs 2"),
    (lambda b: b["samples"][1].update(context_ids=[0, 10, 3, 5]) or b, r"samples\[1\]\.context_ids: frame 1 codebook 1 id 5 is outside \[10, 20\)"),
    (lambda b: b["samples"][0].pop("context_ids") and b, r"samples\[0\]\.context_ids: missing"),
    (lambda b: b["samples"][0].update(task_id="x") or b, r"samples\[0\]\.task_id: must be an integer"),
    (lambda b: b["samples"][0].update(extra=1) or b, r"samples\[0\]: unknown fields \['extra'\]"),
    (lambda b: b["metadata"].update(num_requests=5) or b, r"metadata.num_requests 5 != 2 samples"),
    (lambda b: b["metadata"].update(tokenize_vocabsize=21) or b, r"tokenize_vocabsize 21"),
    (lambda b: b["metadata"].pop("num_vocabs") and b, r"pass num_vocabs= and audio_vocab_size="),
])
def test_malformed_json_errors(tmp_path, edit, match):
    with pytest.raises(bd.BenchmarkDataError, match=match):
        bd.read_dataset(write_raw(tmp_path, edit(good_blob())))


def test_feature_errors(tmp_path):
    ds = bd.generate_dataset(num_samples=2, text_len=3, context_frames=2, output_frames=4, num_vocabs=2,
                             audio_vocab_size=10, feature_dim=4, seed=3)
    blob = {"metadata": bd.make_metadata(ds.samples, 2, 10, 4), "samples": [s.to_json() for s in ds.samples]}
    blob["samples"][1]["input_feat"] = blob["samples"][1]["input_feat"][:-1]
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[1\]\.input_feat: 11 values is not input_len 3 x feature_dim 4"):
        bd.read_dataset(write_raw(tmp_path, blob))
    blob["samples"][1]["input_feat"] = [float("nan")] * 12
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[1\]\.input_feat: must be a list of finite numbers"):
        bd.read_dataset(write_raw(tmp_path, blob))
    with pytest.raises(bd.BenchmarkDataError, match="no such file"):
        bd.read_dataset(tmp_path / "missing.json")


def test_fork_file_without_our_metadata(tmp_path):
    blob = good_blob()
    for k in ("num_vocabs", "audio_vocab_size"):
        blob["metadata"].pop(k)
    ds = bd.read_dataset(write_raw(tmp_path, blob), num_vocabs=2, audio_vocab_size=10)
    assert len(ds.samples) == 2


def test_to_reference_batch_runs_the_reference(tmp_path):
    fx = ROOT / "fixtures" / "data" / "released_small.nemo"
    if not fx.is_file():
        pytest.fail("fixtures/data/released_small.nemo is missing: the bundled fixtures are part of the repository")
    model = MagpieTTS.from_nemo(fx)
    c = model.config
    ds = bd.generate_dataset(num_samples=3, text_len=5, context_frames=4, output_frames=6, config=c, seed=2)
    ds = bd.read_dataset(bd.write_dataset(ds, tmp_path / "b.json"))
    batch = bd.to_reference_batch(ds, c, audio_seed=0)
    assert batch["text"].shape == (3, 5) and batch["context_audio_codes"].shape == (3, c.num_audio_codebooks, 4)
    assert torch.equal(batch["context_audio_codes"][:, :, 0], torch.zeros(3, c.num_audio_codebooks, dtype=torch.long))
    assert int(batch["context_audio_codes"].max()) < c.codebook_size
    sample0 = ds.samples[0]
    assert batch["text"][0].tolist() == sample0.input_ids
    with torch.no_grad():
        out = model.process_batch(batch)["logits"]
    assert out.shape[:2] == (3, 7) and torch.isfinite(out).all()
    with pytest.raises(bd.BenchmarkDataError, match="offsets codebooks by 2048"):
        bd.to_reference_batch(bd.generate_dataset(num_samples=1, num_vocabs=c.num_audio_codebooks,
                                                  text_vocab_size=5, text_len=2, context_frames=2), c)
    with pytest.raises(bd.BenchmarkDataError, match="has input_feat"):
        bd.to_reference_batch(bd.generate_dataset(num_samples=1, config=c, feature_dim=4, text_len=2,
                                                  context_frames=2), c)


# ------------------------------------------------------------------------------------ decoder_ce

DCE_CASES = ["dce_context", "dce_baked_v2607", "dce_baked_v2602", "dce_maskgit"]


def _dce_model(case):
    fx = ROOT / "fixtures" / "data" / f"{case}.nemo"
    if not fx.is_file():
        pytest.fail(f"fixtures/data/{case}.nemo is missing: the bundled fixtures are part of the repository")
    return MagpieTTS.from_nemo(fx)


@pytest.mark.parametrize("case", DCE_CASES)
def test_decoder_ce_dataset_is_the_runners_requests(case, tmp_path):
    """A decoder_ce dataset in the fork's feature layout (input_feat, context_ids, context_feat), read back: the batch
    to_reference_batch rebuilds gives the reference (and the runner) exactly the written features; the ids are the
    forks' dummy zeros over (P + 1) positions of C * S vocabularies."""
    from trt.runner import reference_context_features, reference_encoder_features

    model = _dce_model(case)
    c = model.config
    C, S, D = c.num_audio_codebooks, c.frame_stacking_factor, c.d_model
    speakers = [2, 0] if c.baked else None
    ds = bd.decoder_ce_dataset(model, num_samples=3, text_len=5, context_frames=4, output_frames=6,
                               speakers=speakers, seed=1)
    path = bd.write_dataset(ds, tmp_path / "b.json")
    blob = json.loads(path.read_text())
    s0 = blob["samples"][0]
    assert list(s0) == ["input_len", "output_len", "task_id", "input_feat", "context_ids", "context_feat", "magpie"]
    md = blob["metadata"]
    assert md["num_vocabs"] == C * S and md["feature_dim"] == D and md["model_type"] == "decoder_ce"
    assert md["context"] == ("baked" if c.baked else "context_encoder") and md["config_hash"] == c.hash()
    back = bd.read_dataset(path)
    batch = bd.to_reference_batch(back, c, audio_seed=0)
    if c.baked:
        assert batch["speaker_indices"].tolist() == [2, 0, 2] and "context_audio_codes" not in batch
    else:
        assert batch["context_audio_codes"].shape == (3, C, 4) and batch["context_audio_codes_lens"].tolist() == [4] * 3
    enc, ctx = reference_encoder_features(model, batch), reference_context_features(model, batch)
    for s, e, f in zip(back.samples, enc, ctx):
        assert torch.equal(torch.tensor(s.input_feat).view(-1, D), e)
        assert torch.equal(torch.tensor(s.context_feat).view(-1, D), f)
        assert s.context_ids == [0] * (f.shape[0] * C * S)
        assert (s.input_len, s.output_len) == (5, 6)
    with torch.no_grad():
        out = model.process_batch(batch)["logits"]
    assert torch.isfinite(out).all()


def test_decoder_ce_dataset_and_batch_errors(tmp_path):
    baked, ctx_model = _dce_model("dce_baked_v2602"), _dce_model("dce_context")
    with pytest.raises(bd.BenchmarkDataError, match=r"speakers \[3\] outside \[0, 2\] \(the checkpoint bakes 3"):
        bd.decoder_ce_dataset(baked, num_samples=1, text_len=2, speakers=[0, 3])
    with pytest.raises(bd.BenchmarkDataError, match="has a context encoder, not baked speakers"):
        bd.decoder_ce_dataset(ctx_model, num_samples=1, text_len=2, speakers=[0])
    plain = MagpieTTS.from_nemo(ROOT / "fixtures" / "data" / "released_small.nemo")
    with pytest.raises(bd.BenchmarkDataError, match="is not decoder_ce"):
        bd.decoder_ce_dataset(plain, num_samples=1)
    ds = bd.decoder_ce_dataset(baked, num_samples=2, text_len=3, output_frames=2, seed=0)
    good = json.loads(bd.write_dataset(ds, tmp_path / "g.json").read_text())

    def read(edit):
        blob = json.loads(json.dumps(good))
        edit(blob)
        return bd.read_dataset(write_raw(tmp_path, blob))

    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[0\]\.context_feat: needs input_feat"):
        read(lambda b: b["samples"][0].update(input_ids=[1, 2, 3]) or b["samples"][0].pop("input_feat"))
    with pytest.raises(bd.BenchmarkDataError,
                       match=r"samples\[1\]\.context_feat: 31 values is not the prompt's 9 rows"):
        read(lambda b: b["samples"][1].update(context_feat=b["samples"][1]["context_feat"][:31]))
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[0\]\.context_ids: with context_feat the ids are "
                                                    r"placeholders but must lie in \[0, 144\)"):
        read(lambda b: b["samples"][0]["context_ids"].__setitem__(0, 144))
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[0\]\.magpie: needs exactly one of"):
        read(lambda b: b["samples"][0]["magpie"].update(context_codes=[[1], [2]]))
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[1\]\.magpie\.text_ids: must be input_len 3"):
        read(lambda b: b["samples"][1]["magpie"].update(text_ids=[1]))
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[0\]\.magpie: unknown fields \['x'\]"):
        read(lambda b: b["samples"][0]["magpie"].update(x=1))
    c = baked.config
    no_extras = read(lambda b: [s.pop("magpie") for s in b["samples"]])
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[0\]: no 'magpie' extras .* bench-data --checkpoint"):
        bd.to_reference_batch(no_extras, c)
    far = read(lambda b: b["samples"][1]["magpie"].update(speaker_index=7))
    with pytest.raises(bd.BenchmarkDataError, match=r"samples\[1\]\.magpie\.speaker_index: 7 outside \[0, 2\]"):
        bd.to_reference_batch(far, c)
    other = read(lambda b: b["metadata"].update(config_hash="0" * 16))
    with pytest.raises(bd.BenchmarkDataError, match="was written for another checkpoint"):
        bd.to_reference_batch(other, c)
    with pytest.raises(bd.BenchmarkDataError, match="dataset metadata.context is 'baked', the checkpoint's context is "
                                                    "'context_encoder'"):
        bd.to_reference_batch(bd.read_dataset(tmp_path / "g.json"), ctx_model.config)
    with pytest.raises(bd.BenchmarkDataError, match="was written for a decoder_ce checkpoint"):
        plain_c = dataclasses.replace(c, model_type="decoder_context_tts", baked_speakers=0, baked_frames=0)
        bd.to_reference_batch(bd.read_dataset(tmp_path / "g.json"), plain_c)
