"""Every user error of the parity commands is one line on stderr naming the file/flag/field, exit 2, no traceback;
``python -m parity.cli`` behaves as the console script; outputs honour the umask."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, REPO, infer_inputs, load_batch
from parity.cli import main

CKPT = str(FIXTURES / "released_small.nemo")
BATCH = str(FIXTURES / "released_small.batch.safetensors")


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1, lines  # one line, for CI greps: no traceback, no usage block
    return lines[0]


@pytest.fixture
def inputs(tmp_path):
    p = tmp_path / "inputs.safetensors"
    save_file(infer_inputs(load_batch("released_small")), str(p))
    return str(p)


@pytest.fixture
def not_loaded(monkeypatch):
    """Fails the test if a command loads a checkpoint: the error must come before any work."""
    import parity.commands

    def boom(*a, **k):
        raise AssertionError("the checkpoint was loaded before the user error was found")

    monkeypatch.setattr(parity.commands, "load_reference", boom)


# ------------------------------------------------------------------------------------ python -m parity.cli


def _module_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_python_m_parity_cli_user_error_is_exit_2_and_one_line(tmp_path):
    """Run as __main__, the module's commands raise the same BadInput its main() catches (no exit 3)."""
    out = tmp_path / "d"
    out.mkdir()
    proc = _module_cli("dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(out) in lines[0], lines
    proc = _module_cli("compare", str(tmp_path / "nope"), str(tmp_path / "nope2"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "nope" in proc.stderr
    assert "internal error" not in proc.stderr


def test_python_m_parity_cli_help_lists_every_command():
    from parity.cli import COMMANDS

    proc = _module_cli("--help")
    assert proc.returncode == 0
    for c in COMMANDS:
        assert c.name in proc.stdout


def test_usage_error_is_one_line(capsys):
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT])
    assert "--batch" in line and "--out" in line and "usage:" not in line
    assert "bogus" in one_line_error(capsys, ["bogus"])


# -------------------------------------------------------------------------------------------------- dump


def test_dump_into_an_existing_folder_names_the_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(out)]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(out)])
    assert str(out) in line and "--overwrite" in line and "overwrite=True" not in line
    assert main(["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(out), "--overwrite"]) == 0


def test_dump_source_nemo_with_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.nemo"
    line = one_line_error(capsys, ["dump", "--source", "nemo", "--checkpoint", str(missing), "--batch", BATCH,
                                   "--out", str(tmp_path / "o")])
    assert str(missing) in line and "no such file" in line


def test_dump_source_nemo_with_a_text_file(tmp_path, capsys):
    text = tmp_path / "notes.nemo"
    text.write_text("this is not a NeMo archive, only some text that is long enough to look like a file\n" * 20)
    line = one_line_error(capsys, ["dump", "--source", "nemo", "--checkpoint", str(text), "--batch", BATCH,
                                   "--out", str(tmp_path / "o")])
    assert str(text) in line


def test_dump_source_nemo_with_a_ckpt(tmp_path, capsys):
    ckpt = FIXTURES / "released_small.ckpt"
    line = one_line_error(capsys, ["dump", "--source", "nemo", "--checkpoint", str(ckpt), "--batch", BATCH,
                                   "--out", str(tmp_path / "o")])
    assert str(ckpt) in line and ".nemo" in line and "--source reference" in line
    assert not (tmp_path / "o").exists()


def test_what_nemo_cannot_restore_is_one_line(tmp_path):
    """Archives the reference reads but NeMo's restore_from rejects: tar errors, a member missing in NeMo's temp
    folder; the message names the user's archive, not NeMo's temporary folder."""
    import tarfile

    from parity.cli_support import BadInput
    from parity.commands import _nemo_restore

    def tar_error(path, **kw):
        raise tarfile.ReadError("not a gzip file")

    def missing_member(path, **kw):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/tmpab12cd/model_config.yaml")

    for restore in (tar_error, missing_member):
        with pytest.raises(BadInput) as e:
            _nemo_restore(restore, "my.nemo", "my.nemo", return_config=True)
        msg = str(e.value)
        assert msg.startswith("my.nemo: NeMo cannot restore it") and "\n" not in msg and "/tmp/tmpab12cd" not in msg


@pytest.mark.parametrize("source", ["reference", "nemo"])
@pytest.mark.parametrize("mode", ["teacher-forced", "infer"])
def test_dump_with_another_models_batch(tmp_path, capsys, source, mode):
    """released_small's batch (2 codebooks) with four_codebooks' checkpoint: found before any run (and before NeMo is
    imported), naming both files and the field."""
    ckpt = str(FIXTURES / "four_codebooks.nemo")
    line = one_line_error(capsys, ["dump", "--source", source, "--mode", mode, "--checkpoint", ckpt, "--batch", BATCH,
                                   "--out", str(tmp_path / "o")])
    assert BATCH in line and ckpt in line and "context_audio_codes" in line and "C=4" in line
    assert not (tmp_path / "o").exists()


def test_dump_bad_inference_parameter(tmp_path, capsys):
    line = one_line_error(capsys, ["dump", "--mode", "infer", "--checkpoint", CKPT, "--batch", BATCH,
                                   "--out", str(tmp_path / "o"), "--param", "max_decoder_steps=3"])
    assert "--param" in line and "max_decoder_steps" in line
    line = one_line_error(capsys, ["dump", "--mode", "infer", "--checkpoint", CKPT, "--batch", BATCH,
                                   "--out", str(tmp_path / "o"), "--param", "topk"])
    assert "--param 'topk': expected KEY=VALUE" in line


def test_dump_under_a_regular_file(tmp_path, capsys, not_loaded):
    f = tmp_path / "somefile"
    f.write_text("x")
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(f / "x")])
    assert "--out" in line and str(f) in line and "not a folder" in line


def test_dump_write_error_names_the_out_folder_not_the_temp_folder(tmp_path, capsys, monkeypatch):
    import parity.dump

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".d.tmp-123456/manifest.json"))

    monkeypatch.setattr(parity.dump.os, "fsync", full_disk)
    out = tmp_path / "d"
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(out)])
    assert f"--out {out}: cannot write: No space left on device" in line and ".tmp" not in line
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_dump_into_a_read_only_folder(tmp_path, capsys, not_loaded):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(ro / "x")])
    finally:
        ro.chmod(0o755)
    assert str(ro) in line and "not writable" in line


# ------------------------------------------------------------------------------------------------- infer


def test_infer_out_in_a_missing_folder_is_found_before_decoding(tmp_path, capsys, inputs, not_loaded):
    out = tmp_path / "no_such_folder" / "codes.safetensors"
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(out)])
    assert "--out" in line and str(out.parent) in line and "does not exist" in line


def test_infer_out_under_a_file_or_onto_a_folder(tmp_path, capsys, inputs, not_loaded):
    f = tmp_path / "somefile"
    f.write_text("x")
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(f / "c")])
    assert str(f) in line and "not a folder" in line
    folder = tmp_path / "folder"
    folder.mkdir()
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(folder)])
    assert str(folder) in line and "is a folder" in line
    # the folder holding --inputs: refused as an output that contains an input, naming both
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(tmp_path)])
    assert f"--out {tmp_path}: contains the input --inputs {inputs}" in line


def test_infer_existing_dump_folder_is_found_before_decoding(tmp_path, capsys, inputs, not_loaded):
    existing = tmp_path / "existing"
    existing.mkdir()
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs,
                                   "--out", str(tmp_path / "c.safetensors"), "--dump", str(existing)])
    assert f"--dump {existing}: already exists" in line and "--overwrite" not in line  # infer has no such flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_infer_device_cuda_without_cuda(tmp_path, capsys, inputs, not_loaded):
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs,
                                   "--out", str(tmp_path / "c.safetensors"), "--device", "cuda"])
    assert "--device cuda" in line and "CUDA is not available" in line


def test_infer_unknown_device(tmp_path, capsys, inputs, not_loaded):
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs,
                                   "--out", str(tmp_path / "c.safetensors"), "--device", "bogus"])
    assert "--device bogus" in line


def test_infer_with_another_models_inputs(tmp_path, capsys, inputs):
    ckpt = str(FIXTURES / "four_codebooks.nemo")
    line = one_line_error(capsys, ["infer", "--checkpoint", ckpt, "--inputs", inputs,
                                   "--out", str(tmp_path / "c.safetensors")])
    assert inputs in line and ckpt in line and "context_audio_codes" in line
    assert not (tmp_path / "c.safetensors").exists()


def test_infer_parameter_of_the_wrong_type(tmp_path, capsys, inputs):
    for bad, field in (("max_decoder_steps=abc", "max_decoder_steps"), ("bogus=1", "bogus")):
        line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs,
                                       "--out", str(tmp_path / "c.safetensors"), "--param", bad])
        assert "--param" in line and field in line


def test_infer_output_honours_the_umask(tmp_path, capsys, inputs):
    old = os.umask(0o027)
    try:
        out = tmp_path / "c.safetensors"
        assert main(["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(out), "--param", "topk=1",
                     "--param", "max_decoder_steps=5"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "inputs.safetensors"]


# ----------------------------------------------------------------------------------------- compare / check


def _dump(tmp_path):
    from parity.dump import write_dump

    return write_dump(tmp_path / "a", [("logits", 0, torch.randn(2, 3))], source="reference")


def test_compare_outputs_checked_before_comparing(tmp_path, capsys):
    a = _dump(tmp_path)
    f = tmp_path / "somefile"
    f.write_text("x")
    for flag in ("--json", "--plot"):
        line = one_line_error(capsys, ["compare", str(a), str(a), flag, str(f / "r"), "--no-progress"])
        assert line.startswith(f"magpie-parity compare: error: {flag} {f / 'r'}") and "not a folder" in line
        line = one_line_error(capsys, ["compare", str(a), str(a), flag, str(tmp_path / "none" / "r"), "-q"])
        assert str(tmp_path / "none") in line and "does not exist" in line


def test_compare_write_error_names_the_json_path_not_the_temp_file(tmp_path, capsys, monkeypatch):
    import parity.files

    a = _dump(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(parity.files.os, "replace", replace)
    out = tmp_path / "r.json"
    line = one_line_error(capsys, ["compare", str(a), str(a), "--json", str(out), "-q"])
    assert f"--json {out}: cannot write: Read-only file system" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # the temp file is gone


def test_compare_json_honours_the_umask(tmp_path, capsys):
    a = _dump(tmp_path)
    old = os.umask(0o002)
    try:
        assert main(["compare", str(a), str(a), "--json", str(tmp_path / "r.json"), "-q"]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o664


def test_compare_named_tolerance_policy(tmp_path, capsys):
    from parity.dump import write_dump

    b = write_dump(tmp_path / "b", [("logits", 0, torch.ones(4))], source="reference")
    a = write_dump(tmp_path / "a2", [("logits", 0, torch.ones(4) + 5e-6)], source="reference")
    assert main(["compare", str(a), str(b), "-q", "--tolerances", "parity"]) == 0  # 1e-5 / 1e-5
    assert main(["compare", str(a), str(b), "-q", "--tolerances", "fixtures"]) == 1  # 1e-6 / 0
    assert capsys.readouterr().err == "FAIL: 0/1 tensors within tolerance\n"  # -q: the verdict, one line
    line = one_line_error(capsys, ["compare", str(a), str(b), "-q", "--tolerances", "bogus"])
    assert "bogus" in line and "parity" in line


def test_check_bad_arguments(tmp_path, capsys):
    f = tmp_path / "somefile"
    f.write_text("x")
    assert "--fixtures" in one_line_error(capsys, ["check", "--fixtures", str(tmp_path / "none")])
    line = one_line_error(capsys, ["check", "--cases", "released_small", "--plot", str(f / "plots")])
    assert "--plot" in line and "not a folder" in line
    assert "nope.nemo" in one_line_error(capsys, ["check", "--cases", "nope"])


# ------------------------------------------------------------------------------------------------ diagnose


def test_diagnose_with_another_models_batch(tmp_path, capsys):
    ckpt = str(FIXTURES / "four_codebooks.nemo")
    line = one_line_error(capsys, ["diagnose", str(tmp_path / "absent"), "--checkpoint", ckpt, "--batch", BATCH])
    assert BATCH in line and ckpt in line
    line = one_line_error(capsys, ["diagnose", str(tmp_path / "absent"), "--checkpoint", CKPT, "--batch", BATCH,
                                   "--tolerance", "nan"])
    assert "--tolerance" in line


@pytest.mark.nemo
def test_dump_source_nemo_with_a_missing_codec(tmp_path, capsys):
    line = one_line_error(capsys, ["dump", "--source", "nemo", "--checkpoint", CKPT, "--batch", BATCH,
                                   "--out", str(tmp_path / "o"), "--codec", str(tmp_path / "codec.nemo")])
    assert f"--codec {tmp_path / 'codec.nemo'}: no such file" in line


# ------------------------------------------------------------------------------- outputs never touch inputs


def _tree_state(root):
    """Every path under root with its bytes (files) or None (folders): what a command must leave unchanged."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("flag, target", [("--json", "manifest.json"), ("--plot", "tensors-00000.safetensors"),
                                          ("--json", "")])
def test_compare_never_writes_into_or_over_an_input_dump(tmp_path, capsys, flag, target):
    a = _dump(tmp_path)
    before = _tree_state(tmp_path)
    out = a / target if target else a
    line = one_line_error(capsys, ["compare", str(a), str(a), flag, str(out), "-q"])
    assert f"{flag} {out}:" in line and f"dump a {a}" in line
    assert _tree_state(tmp_path) == before


def test_compare_replaces_only_its_own_report_and_plot(tmp_path, capsys):
    a = _dump(tmp_path)
    rep, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["compare", str(a), str(a), "--json", str(rep), "--plot", str(png), "-q"]) == 0
    assert json.loads(rep.read_text())["format"] == "magpie-parity-compare-report"
    assert main(["compare", str(a), str(a), "--json", str(rep), "--plot", str(png), "-q"]) == 0  # its own: replaced
    notes, photo = tmp_path / "notes.json", tmp_path / "photo.png"
    notes.write_text('{"my": "notes"}')
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG magpie-parity did not draw
    for flag, path in (("--json", notes), ("--plot", photo)):
        before = path.read_bytes()
        line = one_line_error(capsys, ["compare", str(a), str(a), flag, str(path), "-q"])
        assert f"{flag} {path}: exists and is not a" in line and "refusing to replace it" in line
        assert path.read_bytes() == before


def test_infer_out_equal_to_inputs_or_a_foreign_file_is_refused_before_loading(tmp_path, capsys, inputs,
                                                                               not_loaded):
    before = open(inputs, "rb").read()
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", inputs])
    assert f"--out {inputs}: is the input --inputs {inputs}" in line
    other = tmp_path / "other.safetensors"
    other.write_bytes(before)  # a safetensors file, but a batch, not codes infer wrote
    line = one_line_error(capsys, ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(other)])
    assert f"--out {other}: exists and is not a codes file magpie-parity infer wrote" in line
    assert open(inputs, "rb").read() == before == other.read_bytes()


def test_infer_replaces_its_own_codes_file(tmp_path, inputs):
    from parity.commands import is_codes_file

    out = tmp_path / "c.safetensors"
    argv = ["infer", "--checkpoint", CKPT, "--inputs", inputs, "--out", str(out), "--param", "topk=1",
            "--param", "max_decoder_steps=5"]
    assert main(argv) == 0 and is_codes_file(out)
    assert main(argv) == 0


def test_dump_out_containing_its_checkpoint_or_batch_is_refused_before_loading(tmp_path, capsys, not_loaded):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    ckpt, batch = work / "m.nemo", work / "b.safetensors"
    shutil.copy(CKPT, ckpt)
    shutil.copy(BATCH, batch)
    before = _tree_state(tmp_path)
    for out, flag in ((work, "--checkpoint"), (tmp_path, "--checkpoint")):
        line = one_line_error(capsys, ["dump", "--checkpoint", str(ckpt), "--batch", str(batch), "--out", str(out),
                                       "--overwrite"])
        assert f"--out {out}: contains the input {flag} {ckpt}" in line
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", str(batch), "--out", str(work),
                                   "--overwrite"])
    assert f"--out {work}: contains the input --batch {batch}" in line
    assert _tree_state(tmp_path) == before


def test_dump_overwrite_onto_a_folder_of_notes_is_refused_before_loading(tmp_path, capsys, not_loaded):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    line = one_line_error(capsys, ["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", str(notes),
                                   "--overwrite"])
    assert f"--out {notes}: exists and is not a magpie-parity dump or an empty folder" in line
    assert (notes / "todo.txt").read_text() == "keep me"


def test_check_plot_inside_the_fixtures_or_onto_a_foreign_png(tmp_path, capsys):
    import shutil

    fx = tmp_path / "fx"
    fx.mkdir()
    for suffix in (".nemo", ".batch.safetensors"):
        shutil.copy(FIXTURES / f"released_small{suffix}", fx / f"released_small{suffix}")
    shutil.copytree(FIXTURES / "released_small.nemo_dump", fx / "released_small.nemo_dump")
    line = one_line_error(capsys, ["check", "--fixtures", str(fx), "--plot", str(fx / "plots")])
    assert f"--plot {fx / 'plots'}: lies inside the input --fixtures {fx}" in line
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "released_small.png").write_bytes(b"a user's picture")
    line = one_line_error(capsys, ["check", "--fixtures", str(fx), "--plot", str(plots)])
    assert f"--plot {plots / 'released_small.png'}: exists and is not a plot magpie-parity drew" in line
    assert (plots / "released_small.png").read_bytes() == b"a user's picture"
