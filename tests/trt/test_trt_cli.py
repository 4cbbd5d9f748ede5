"""magpie-parity convert / build / ingest-trtllm / bench-data through parity.cli.main: exit codes and outputs."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from parity.cli import main
from parity.compare import compare_dumps
from parity.dump import DumpReader

FIX = "fixtures/data"


# the CLI is given repo-relative fixture paths
pytestmark = pytest.mark.usefixtures("repo_cwd")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, for CI greps
    return err[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(out)]) == 0
    return out


def test_convert_prints_deviations_and_writes_both_engines(converted, tmp_path, capsys):
    assert json.loads((converted / "decoder" / "config.json").read_text())["architecture"]
    assert (converted / "encoder" / "rank0.safetensors").is_file()
    out = tmp_path / "fp16"
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(out), "--dtype", "float16",
                 "--drop-lm-head-bias"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "lm_head bias dropped" in text
    assert "the fork's converter drops it" not in text  # dropping the bias is what the fork does
    assert "final_proj.bias dropped" in text and "fork hard-codes 1 x 128" in text


def test_convert_bad_input_exits_2(tmp_path, capsys, converted):
    assert main(["convert", "--checkpoint", str(tmp_path / "missing.nemo"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.nemo: no such file" in _err_line(capsys)
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"\x00not an archive")
    assert main(["convert", "--checkpoint", str(junk), "--out", str(tmp_path / "o")]) == 2
    assert "junk.nemo" in _err_line(capsys)
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(converted)]) == 2
    line = _err_line(capsys)
    assert "already exists" in line and "--overwrite" in line and "overwrite=True" not in line
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(tmp_path / "o"),
                 "--tp-size", "0"]) == 2


def test_convert_decoder_ce_refuses_the_local_transformer_in_one_line_then_converts_without_it(tmp_path, capsys):
    for case in ("dce_baked_v2607", "dce_context"):
        out = tmp_path / case
        assert main(["convert", "--checkpoint", f"{FIX}/{case}.nemo", "--out", str(out)]) == 2
        line = _err_line(capsys)
        assert "local_transformer_type='autoregressive': the forks' decoder engine has no local transformer" in line
        assert "--without-local-transformer" in line and "without_local_transformer=True" not in line
        assert not out.exists()
        assert main(["convert", "--checkpoint", f"{FIX}/{case}.nemo", "--out", str(out),
                     "--without-local-transformer"]) == 0
        text = capsys.readouterr().out
        kind = "baked speaker table" if "baked" in case else "context encoder"
        assert f"decoder_ce ({kind}): the engine takes the context prefix as decoder_context_features" in text
        assert f"kept beside the engine for the reference: {kind}, autoregressive local transformer" in text
        assert "as NeMo with use_local_transformer_for_inference=False" in text
        assert (out / "magpie_parity" / "outside_engine.safetensors").is_file()
    assert "frame_stacking_factor=2: written as 4 vocabularies" not in text  # dce_context: fsf 1


def test_build_prints_commands(converted, tmp_path, capsys):
    eng = tmp_path / "engines"
    assert main(["build", "--ckpt-dir", str(converted), "--engine-dir", str(eng), "--profile", "parity",
                 "--debug-output", "--set", "max_input_len=64", "--set", "decoder_max_input_len=32",
                 "--set", "max_seq_len=64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    enc, dec = lines
    assert enc.startswith(f"trtllm-build --checkpoint_dir {converted / 'encoder'} --output_dir {eng / 'encoder'}")
    assert dec.startswith(f"trtllm-build --checkpoint_dir {converted / 'decoder'} --output_dir {eng / 'decoder'}")
    assert "--enable_debug_output" in enc and "--enable_debug_output" in dec
    assert "--max_input_len 32" in dec and "--max_seq_len 64" in dec and "--max_input_len 64" in enc
    assert not eng.exists()  # printing builds nothing


def test_build_bad_input_exits_2(converted, tmp_path, capsys):
    base = ["build", "--ckpt-dir", str(converted), "--engine-dir", str(tmp_path / "e")]
    assert main(base) == 2  # the seed profile builds float16 plugins
    assert "checkpoint dtype is float32" in _err_line(capsys)
    assert main(base + ["--profile", "parity"]) == 2  # max_input_len 128 > this tiny model's 64 positions
    assert "max_position_embeddings 64" in _err_line(capsys)
    assert main(base + ["--set", "no_such_flag=1"]) == 2
    assert "no_such_flag" in _err_line(capsys)
    assert main(base + ["--set", "oops"]) == 2
    assert "KEY=VALUE" in _err_line(capsys)
    assert main(["build", "--ckpt-dir", str(tmp_path / "none"), "--engine-dir", str(tmp_path / "e")]) == 2
    line = _err_line(capsys)
    assert "config.json: missing" in line and "--ckpt-dir" in line
    assert f"magpie-parity convert --checkpoint CKPT --out {tmp_path / 'none'}" in line and "trt.convert" not in line
    assert main(base + ["--profile", "parity", "--set", "max_input_len=64", "--set", "max_seq_len=64",
                        "--set", "decoder_max_encoder_input_len=none"]) == 2  # "none" removes the flag
    assert "--max_encoder_input_len is required" in _err_line(capsys)


def test_build_tells_the_user_commands_not_python(converted, tmp_path, capsys):
    """The seed profile's float16 plugins on a float32 checkpoint: the fix is a command line."""
    assert main(["build", "--ckpt-dir", str(converted), "--engine-dir", str(tmp_path / "e")]) == 2
    line = _err_line(capsys)
    assert "--gemm_plugin float16" in line and "magpie-parity convert --dtype float16" in line
    assert "--set gemm_plugin=auto" in line and "dtype=" not in line


@pytest.mark.skipif(shutil.which("trtllm-build") is not None, reason="trtllm-build is installed here")
def test_build_run_without_tensorrt_llm_exits_2(converted, tmp_path, capsys):
    assert main(["build", "--ckpt-dir", str(converted), "--engine-dir", str(tmp_path / "e"), "--profile", "parity",
                 "--set", "max_input_len=64", "--set", "decoder_max_input_len=32", "--set", "max_seq_len=64",
                 "--run"]) == 2
    line = _err_line(capsys)
    assert "trtllm-build is not on the PATH" in line and "build_commands()" not in line
    assert not (tmp_path / "e").exists()


def test_ingest_trtllm_of_a_tree_matches_the_reference(tmp_path, capsys):
    import test_ingest as ti

    ref_path = ti.reference_dump("released_small", tmp_path)
    ref = DumpReader(ref_path)
    rows, steps, text_lens = ti.sequence_rows(ref, 3, use_cfg=True)
    tree = ti.write_executor_tree(tmp_path / "t", rows, 3, True, ti.executor_schedule(3, steps, late=0), [1, 2, 3],
                                  text_lens=text_lens)
    out = tmp_path / "ing"
    assert main(["ingest-trtllm", str(tree), "--out", str(out), "--cfg-scale", "2.5", "--batch-size", "3"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "generation fork_c6ff2312" in text and "host_kv_cache_pool_pointers" in text
    res = compare_dumps(out, ref_path, progress=False)
    assert not res.missing_in_b and res.tensors and all(t.max_abs == 0 for t in res.tensors)
    assert DumpReader(out).config_hash is None  # no --checkpoint: nothing to record
    # --checkpoint records the checkpoint's reference config hash: compare then refuses a dump of another model
    hashed = tmp_path / "ing_hashed"
    assert main(["ingest-trtllm", str(tree), "--out", str(hashed), "--cfg-scale", "2.5",
                 "--checkpoint", f"{FIX}/released_small.nemo"]) == 0
    capsys.readouterr()
    assert DumpReader(hashed).config_hash == ref.config_hash is not None
    assert main(["compare", str(hashed), str(ref_path), "--intersect", "-q", "--no-progress"]) == 0
    other = tmp_path / "ing_other"
    assert main(["ingest-trtllm", str(tree), "--out", str(other), "--cfg-scale", "2.5",
                 "--checkpoint", f"{FIX}/four_codebooks.nemo"]) == 0
    capsys.readouterr()
    assert main(["compare", str(other), str(ref_path), "--intersect", "--no-progress"]) == 2
    assert "dumps of different models" in _err_line(capsys)
    assert main(["ingest-trtllm", str(tree), "--out", str(tmp_path / "x"), "--checkpoint",
                 str(tmp_path / "nope.nemo")]) == 2
    assert "nope.nemo" in _err_line(capsys) and not (tmp_path / "x").exists()
    # existing output, bad tree: exit 2, one line naming the file
    assert main(["ingest-trtllm", str(tree), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert f"--out {out}: already exists" in line and "--overwrite" in line and "overwrite=True" not in line
    bad = tree / "PP_1" / "TP_1" / "iteration_2" / "decoder_layer_0_output.npy"
    bad.write_bytes(b"garbage")
    assert main(["ingest-trtllm", str(tree), "--out", str(tmp_path / "ing2")]) == 2
    assert "decoder_layer_0_output.npy: unreadable .npy" in _err_line(capsys)
    assert main(["ingest-trtllm", str(tmp_path / "nothing"), "--out", str(tmp_path / "ing3")]) == 2
    assert "not a folder" in _err_line(capsys)


def test_bench_data_round_trip(tmp_path, capsys):
    from trt.benchmark_data import read_dataset

    out = tmp_path / "bench.json"
    assert main(["bench-data", "--out", str(out), "--samples", "4", "--text-len", "6", "--context-frames", "5",
                 "--output-frames", "7"]) == 0
    assert f"wrote {out}: 4 samples" in capsys.readouterr().out
    ds = read_dataset(out)
    assert len(ds.samples) == 4 and ds.num_vocabs == 8 and ds.feature_dim == 768
    s = ds.samples[0]
    assert (s.input_len, s.output_len, len(s.context_ids)) == (6, 7, 5 * 8)
    assert np.array(s.input_feat).std() > 0
    out2 = tmp_path / "bench4.json"
    assert main(["bench-data", "--out", str(out2), "--samples", "2", "--text-len", "3", "--context-frames", "2",
                 "--output-frames", "2", "--checkpoint", f"{FIX}/four_codebooks.nemo"]) == 0
    ds = read_dataset(out2)
    assert ds.num_vocabs == 4 and ds.feature_dim is None and len(ds.samples[1].input_ids) == 3
    assert "num_vocabs 4" in capsys.readouterr().out


def test_ingest_trtllm_refuses_context_features_with_real_logits_in_one_line(tmp_path, capsys):
    d = tmp_path / "tllm_debug" / "PP_1" / "TP_1" / "iteration_0"
    d.mkdir(parents=True)
    for name, arr in (("request_ids", np.array([1], np.uint64)), ("host_request_types", np.zeros(1, np.int32)),
                      ("host_context_lengths", np.array([3], np.int32)),
                      ("decoder_context_features", np.ones((3, 8), np.float16)),
                      ("decoder_context_features_mask", np.ones(3, bool)),
                      ("attention_prior_focus", np.zeros(1, np.int32)), ("logits", np.zeros((1, 40), np.float16)),
                      ("encoder_output", np.zeros((5, 8), np.float16))):
        np.save(d / f"{name}.npy", arr)
    assert main(["ingest-trtllm", str(tmp_path / "tllm_debug"), "--out", str(tmp_path / "ing")]) == 2
    line = _err_line(capsys)
    assert "decoder_context_features with 'logits' wider than 'encoder_output'" in line and "pass generation=" in line
    assert not (tmp_path / "ing").exists()


def test_convert_overwrites_a_decoder_ce_checkpoint_it_wrote(tmp_path, capsys):
    out = tmp_path / "ck"
    for case in ("dce_baked_v2602", "dce_context"):
        assert main(["convert", "--checkpoint", f"{FIX}/{case}.nemo", "--out", str(out), "--without-local-transformer",
                     "--overwrite"]) == 0
    from trt.convert import reference_from_trtllm

    assert reference_from_trtllm(out).config.context_encoder is not None  # the second one replaced the first


def test_bench_data_decoder_ce(tmp_path, capsys):
    from trt.benchmark_data import read_dataset

    out = tmp_path / "dce.json"
    assert main(["bench-data", "--out", str(out), "--samples", "3", "--text-len", "4", "--output-frames", "5",
                 "--checkpoint", f"{FIX}/dce_baked_v2607.nemo", "--speakers", "1,3"]) == 0
    assert "+ context_feat (baked, conditional rows: context prefix + BOS row), num_vocabs 4" in capsys.readouterr().out
    ds = read_dataset(out)
    assert [s.magpie["speaker_index"] for s in ds.samples] == [1, 3, 1] and ds.feature_dim == 32
    out2 = tmp_path / "dce_ctx.json"
    assert main(["bench-data", "--out", str(out2), "--samples", "2", "--text-len", "4", "--context-frames", "3",
                 "--output-frames", "5", "--checkpoint", f"{FIX}/dce_context.nemo"]) == 0
    assert len(read_dataset(out2).samples[0].magpie["context_codes"][0]) == 3
    for argv, want in (
            (["--checkpoint", f"{FIX}/dce_context.nemo", "--speakers", "0"],
             "--speakers: fixtures/data/dce_context.nemo bakes no speakers (model_type decoder_ce, context encoder)"),
            (["--checkpoint", f"{FIX}/dce_baked_v2607.nemo", "--speakers", "0,4"],
             "speakers [4] outside [0, 3] (the checkpoint bakes 4 speakers)"),
            (["--checkpoint", f"{FIX}/dce_baked_v2607.nemo", "--speakers", "a"], "expected comma-separated"),
            (["--speakers", "1"], "--speakers needs --checkpoint")):
        assert main(["bench-data", "--out", str(tmp_path / "x.json"), "--samples", "1", "--text-len", "2"] + argv) == 2
        assert want in _err_line(capsys)
    assert not (tmp_path / "x.json").exists()


def test_bench_data_bad_input_exits_2(tmp_path, capsys):
    assert main(["bench-data", "--out", str(tmp_path / "b.json"), "--samples", "0"]) == 2
    assert "num_samples must be >= 1" in _err_line(capsys)
    assert main(["bench-data", "--out", str(tmp_path / "b.json"), "--checkpoint", str(tmp_path / "x.nemo")]) == 2
    assert "x.nemo: no such file" in _err_line(capsys)


def test_outputs_under_a_regular_file_are_one_line(tmp_path, capsys):
    f = tmp_path / "somefile"
    f.write_text("x")
    for argv in (["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(f / "ckpt")],
                 ["bench-data", "--out", str(f / "b.json"), "--samples", "1"],
                 ["ingest-trtllm", str(tmp_path / "tree"), "--out", str(f / "ing")]):
        assert main(argv) == 2, argv
        line = _err_line(capsys)
        assert str(f) in line and "not a folder" in line and "--out" in line, line
    assert main(["bench-data", "--out", str(tmp_path / "none" / "b.json"), "--samples", "1"]) == 2
    assert "does not exist" in _err_line(capsys)


def test_outputs_honour_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["bench-data", "--out", str(tmp_path / "b.json"), "--samples", "1", "--text-len", "2",
                     "--context-frames", "2", "--output-frames", "2"]) == 0
        assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(tmp_path / "ck")]) == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "b.json") == 0o640  # not mkstemp's 0600
    assert mode(tmp_path / "ck") == 0o750  # not mkdtemp's 0700
    assert mode(tmp_path / "ck" / "decoder" / "config.json") == 0o640


def test_convert_write_error_names_the_out_folder(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".ck.tmp-abc/decoder/rank0.safetensors"))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "ck"
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert f"--out {out}: cannot write: No space left on device" in line and ".tmp" not in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- outputs never touch inputs


def _tree_state(root):
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_convert_out_the_checkpoints_folder_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "models" / "m.nemo"
    ckpt.parent.mkdir()
    shutil.copy(f"{FIX}/released_small.nemo", ckpt)
    before = _tree_state(tmp_path)
    for out in (ckpt.parent, tmp_path, ckpt):
        assert main(["convert", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 2
        line = _err_line(capsys)
        assert f"--out {out}:" in line and f"--checkpoint {ckpt}" in line
    assert _tree_state(tmp_path) == before


def test_convert_overwrite_onto_a_folder_of_notes_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    import reference.checkpoint

    monkeypatch.setattr(reference.checkpoint, "read_checkpoint", lambda *a, **k: pytest.fail("read before refusing"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    assert main(["convert", "--checkpoint", f"{FIX}/released_small.nemo", "--out", str(notes), "--overwrite"]) == 2
    assert "exists and is not a checkpoint magpie-parity converted or an empty folder" in _err_line(capsys)
    assert (notes / "todo.txt").read_text() == "keep me"


def test_ingest_out_onto_its_own_tree_or_the_trees_parent_is_refused(tmp_path, capsys):
    from crafted import small_tree as _small_tree

    root = tmp_path / "run"
    _small_tree(root)
    before = _tree_state(tmp_path)
    for out, how in ((root, "is the input TREE"), (tmp_path, "contains the input TREE"),
                     (root / "tllm_debug" / "ing", "lies inside the input TREE")):
        assert main(["ingest-trtllm", str(root), "--out", str(out), "--overwrite"]) == 2
        line = _err_line(capsys)
        assert f"--out {out}: {how} {root}" in line, line
    assert _tree_state(tmp_path) == before


def test_bench_data_replaces_only_a_dataset(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["bench-data", "--out", str(out), "--samples", "1", "--text-len", "2", "--context-frames", "2",
            "--output-frames", "2"]
    assert main(argv) == 0 and main(argv) == 0  # its own kind of file: replaced
    capsys.readouterr()
    out.write_text("my notes")
    assert main(argv) == 2
    assert f"--out {out}: exists and is not a benchmark dataset JSON" in _err_line(capsys)
    assert out.read_text() == "my notes"


def test_build_engine_dir_inside_the_checkpoint_is_refused(converted, tmp_path, capsys):
    assert main(["build", "--ckpt-dir", str(converted), "--engine-dir", str(converted / "engines")]) == 2
    assert f"--engine-dir {converted / 'engines'}: lies inside the input --ckpt-dir {converted}" in _err_line(capsys)


def test_ingest_then_diagnose_from_the_cli_alone(tmp_path, capsys):
    """An ingested engine tree has no codes and no inference parameters: diagnose names --codes, then the
    checkpoint's default that does not fit with --param, and with both runs (the 'engine' is the reference here:
    no deviation)."""
    from safetensors.torch import save_file

    import test_ingest as ti

    ref_path = ti.reference_dump("released_small", tmp_path)
    ref = DumpReader(ref_path)
    rows, steps, text_lens = ti.sequence_rows(ref, 3, use_cfg=True)
    tree = ti.write_executor_tree(tmp_path / "t", rows, 3, True, ti.executor_schedule(3, steps, late=0), [1, 2, 3],
                                  text_lens=text_lens)
    ing = tmp_path / "ing"
    ckpt = f"{FIX}/released_small.nemo"
    assert main(["ingest-trtllm", str(tree), "--out", str(ing), "--cfg-scale", "2.5", "--checkpoint", ckpt]) == 0
    batch = tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in ti._equal_context_batch("released_small").items()}, str(batch))
    codes = tmp_path / "codes.safetensors"
    save_file({"predicted_codes": ref.load("predicted_codes").contiguous()}, str(codes))
    capsys.readouterr()
    base = ["diagnose", str(ing), "--checkpoint", ckpt, "--batch", str(batch)]
    assert main(base) == 2
    line = _err_line(capsys)
    assert "holds no 'predicted_codes'" in line and "--codes CODES.safetensors" in line
    assert main([*base, "--codes", str(codes)]) == 2
    line = _err_line(capsys)
    assert line.startswith("magpie-parity diagnose: error: topk from the checkpoint's inference_parameters")
    assert "exceeds the" in line and "--param topk=VALUE" in line
    assert main([*base, "--codes", str(codes), "--param", "topk=99"]) == 2
    assert _err_line(capsys).startswith("magpie-parity diagnose: error: --param: topk (99) exceeds")
    assert main([*base, "--codes", str(codes), "--param", "topk"]) == 2
    assert "--param 'topk': expected KEY=VALUE" in _err_line(capsys)
    assert main([*base, "--codes", str(codes), "--param", "topk=1", "--param", "cfg_scale=2.5"]) == 0
    out = capsys.readouterr().out
    assert "codes: --codes" in out and "--param topk=1 cfg_scale=2.5" in out
    assert "No deviation" in out
    # a dump recording another model's config hash is refused before any work
    import torch

    from parity.dump import write_dump

    other = write_dump(tmp_path / "other", [("logits", 0, torch.zeros(3, 1, 8))], source="trtllm",
                       config_hash="0123456789abcdef")
    assert main(["diagnose", str(other), "--checkpoint", ckpt, "--batch", str(batch), "--codes", str(codes)]) == 2
    line = _err_line(capsys)
    assert "records config_hash '0123456789abcdef'" in line and "the dump is of another model" in line
