"""magpie-parity closed-loop: an emulated engine's free-running codes (multi_block_mode: the prior skipped) against
the reference's, then the teacher-forced replay naming the behaviour and the first layer beyond tolerance.
Self-consistency only: the "engine" is the reference under an emulated policy (trt/engine.py)."""

from __future__ import annotations

import pytest

from parity.cli import main

FIX = "fixtures/data"
CKPT = f"{FIX}/released_small.nemo"
BATCH = f"{FIX}/released_small.batch.safetensors"
RUN = ["--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=16"]


# the CLI is given repo-relative fixture paths
pytestmark = pytest.mark.usefixtures("repo_cwd")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import REPO

    d = tmp_path_factory.mktemp("closed_loop")
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["emulate", "--checkpoint", CKPT, "--batch", BATCH, "--engine", "multi_block_mode=true", *RUN,
                     "--out", str(d / "emulated"), "--debug-tree", str(d / "run"),
                     "--codes-out", str(d / "engine.safetensors")]) == 0
        assert main(["ingest-trtllm", str(d / "run"), "--out", str(d / "engine_dump"), "--checkpoint", CKPT,
                     "--cfg-scale", "2.5"]) == 0
        assert main(["infer", "--checkpoint", CKPT, "--inputs", BATCH, *RUN, "--kv-cache", "on",
                     "--out", str(d / "ref.safetensors")]) == 0
    finally:
        os.chdir(cwd)
    return d


def test_closed_loop_reports_the_first_divergence_and_replays(runs, capsys):
    capsys.readouterr()
    rc = main(["closed-loop", str(runs / "engine.safetensors"), str(runs / "ref.safetensors"), "--checkpoint", CKPT,
               "--dump", str(runs / "engine_dump"), "--batch", BATCH, "--param", "topk=1"])
    out = capsys.readouterr().out
    assert rc == 1, out  # the codes differ
    # greedy, without the prior from step 5 on (start_prior_after_n_audio_steps=4): item 0 flips at step 14
    assert "step 14 frame 14 codebook 0: engine 38 vs reference 29" in out
    assert "EOS never fired" in out and "identical" in out  # item 2 never flips within 16 steps
    assert "Explained by: multi_block_mode (prior skipped)" in out
    assert "first tensor beyond tolerance: decoder.layers.0.cross_attention at step 5" in out
    assert "at the first divergence step 14: first layer beyond tolerance: decoder.layers.0.cross_attention" in out


def test_closed_loop_of_a_run_against_itself_and_dumps(runs, capsys):
    assert main(["closed-loop", str(runs / "ref.safetensors"), str(runs / "ref.safetensors"),
                 str(runs / "emulated"), str(runs / "engine.safetensors")]) == 0  # a dump holds predicted_codes too
    assert "0 diverge" in capsys.readouterr().out


def test_closed_loop_bad_input_is_one_line(runs, tmp_path, capsys):
    def line():
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert main(["closed-loop", str(runs / "ref.safetensors")]) == 2
    assert "pairs ENGINE REF" in line()
    assert main(["closed-loop", str(runs / "engine_dump"), str(runs / "ref.safetensors")]) == 2
    assert "holds no predicted_codes" in line()
    assert main(["closed-loop", str(tmp_path / "none"), str(runs / "ref.safetensors")]) == 2
    assert "none" in line()
    assert main(["closed-loop", str(runs / "ref.safetensors"), str(runs / "ref.safetensors"),
                 "--dump", str(runs / "engine_dump")]) == 2
    assert "needs --checkpoint and --batch" in line()
    assert main(["closed-loop", str(runs / "ref.safetensors"), str(runs / "ref.safetensors"),
                 "--param", "topk=1"]) == 2
    assert "--param is for the replay" in line()
    assert main(["closed-loop", str(runs / "ref.safetensors"), f"{FIX}/four_codebooks.infer_greedy_cfg"]) == 2
    assert "differ in batch or codebooks" in line()


def test_closed_loop_json_report(runs, tmp_path, capsys):
    import json

    out = tmp_path / "closed.json"
    assert main(["closed-loop", str(runs / "engine.safetensors"), str(runs / "ref.safetensors"), "--checkpoint", CKPT,
                 "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert data["format"] == "magpie-parity-closed-loop-report"
    first = data["items"][0]["first"]  # the divergence the table states for item 0
    assert (first["step"], first["codebook"], first["engine_token"], first["reference_token"]) == (14, 0, 38, 29)
    assert data["summary"]["diverged"] >= 1
    capsys.readouterr()
    assert main(["closed-loop", str(runs / "engine.safetensors"), str(runs / "ref.safetensors"), "--checkpoint", CKPT,
                 "--json", str(out)]) == 1  # its own report is replaced
    (tmp_path / "mine.json").write_text("{}")
    assert main(["closed-loop", str(runs / "ref.safetensors"), str(runs / "ref.safetensors"),
                 "--json", str(tmp_path / "mine.json")]) == 2  # a user's file is not
    assert "--json" in capsys.readouterr().err and (tmp_path / "mine.json").read_text() == "{}"
    assert main(["closed-loop", str(runs / "ref.safetensors"), str(runs / "ref.safetensors"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["diverged"] == 0
