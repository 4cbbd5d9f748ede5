"""The engine-debugging path on decoder_ce checkpoints (the released ``magpie_tts_multilingual_357m`` kind): baked
speakers (dce_baked_v2607: frame stacking 2; dce_baked_v2602) and a context encoder (dce_context), through the CLI:
emulate -> ingest-trtllm -> diagnose, and closed-loop.

Self-consistency only: every "engine" here is the reference under an emulated engine policy (trt/engine.py), whose
decoder_ce prompt is the reference's ``decoder_context`` rows + the BOS frame as the forks' engines take
``decoder_context_features``; no TensorRT-LLM engine ran (none can here)."""

from __future__ import annotations

import json

import pytest
import torch

from parity.cli import main

FIX = "fixtures/data"
# max_decoder_steps counts frames: 8 frames are 4 decoder steps of v2607 (frame stacking 2), 8 steps otherwise;
# the prior starts at step 2 so that skipping it (multi_block_mode) shows within them.
RUN = ["--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=8", "--param",
       "start_prior_after_n_audio_steps=2"]
DIAG = ["--param", "topk=1", "--param", "start_prior_after_n_audio_steps=2"]


# the CLI is given repo-relative fixture paths
pytestmark = pytest.mark.usefixtures("repo_cwd")


def _pipeline(tmp_path, capsys, case: str, *engine: str) -> tuple[int, str]:
    """emulate (the engine's debug tree and codes) -> ingest-trtllm -> diagnose; diagnose's exit status and report."""
    ckpt, batch = f"{FIX}/{case}.nemo", f"{FIX}/{case}.batch.safetensors"
    eng = [a for e in engine for a in ("--engine", e)]
    assert main(["emulate", "--checkpoint", ckpt, "--batch", batch, *eng, *RUN, "--out", str(tmp_path / "em"),
                 "--debug-tree", str(tmp_path / "run"), "--codes-out", str(tmp_path / "codes.safetensors")]) == 0
    assert main(["ingest-trtllm", str(tmp_path / "run" / "tllm_debug"), "--out", str(tmp_path / "ed"),
                 "--checkpoint", ckpt, "--cfg-scale", "2.5"]) == 0
    capsys.readouterr()
    rc = main(["diagnose", str(tmp_path / "ed"), "--checkpoint", ckpt, "--batch", batch,
               "--codes", str(tmp_path / "codes.safetensors"), *DIAG])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("case, steps", [("dce_baked_v2607", "4 steps (8 frames, 2 a step)"),
                                         ("dce_context", "8 steps"), ("dce_baked_v2602", "8 steps")])
def test_multi_block_engine_is_explained(tmp_path, capsys, case, steps):
    """The prior skipped (multi_block_mode): diagnose names it alone and nothing remains; steps are decoder steps
    (frames / frame stacking) in the ingested dump and in the report."""
    rc, out = _pipeline(tmp_path, capsys, case, "multi_block_mode=true")
    assert rc == 0, out
    assert "Explained by: multi_block_mode (prior skipped)\n" in out and "Nothing remains" in out, out
    assert f"over {steps} " in out
    unpadded = "Left out (cannot change this run): unpadded_requests: every baked speaker of the batch has"
    if case == "dce_context":  # contexts of 5, 8, 6 frames: the engine's unpadded prompts are a candidate
        assert "\nunpadded_requests " in out and "Left out (cannot change this run): unpadded_requests" not in out
    else:  # every baked speaker has the table's frame count: nothing to unpad, said in one line
        assert sum(unpadded in line for line in out.splitlines()) == 1, out


def test_zero_cfg_prompt_engine_is_explained_on_stacked_codes_cut_by_eos(tmp_path, capsys):
    """The zero service token as CFG's unconditional prompt (BOS included): on v2607 it makes every item emit EOS
    after 4 frames, so the codes teacher-force only the first 4 / 2 + 1 steps; the dump's later step is left out
    with a stated reason rather than scored as unexplained."""
    rc, out = _pipeline(tmp_path, capsys, "dce_baked_v2607", "cfg_prompt=zeros")
    assert rc == 0, out
    assert "Explained by: cfg_prompt=zeros\n" in out and "Nothing remains" in out, out
    assert "left out: the codes hold 4 frames (2 a step), which teacher-force steps 0..2 only" in out
    # EOS fired for every item (length 4 < max_decoder_steps 8, recorded in the codes file), though the length is
    # the codes' width: closed-loop does not call it "EOS never fired"
    items = _codes_report(capsys, str(tmp_path / "codes.safetensors"), str(tmp_path / "codes.safetensors"),
                          "--checkpoint", f"{FIX}/dce_baked_v2607.nemo")
    assert [(i["engine_len"], i["engine_eos_missing"]) for i in items] == [(4, False)] * 3


def test_dropped_lm_head_bias_is_explained_with_a_context_encoder(tmp_path, capsys):
    rc, out = _pipeline(tmp_path, capsys, "dce_context", "lm_head_bias=false")
    assert rc == 0, out
    assert "Explained by: lm_head_bias=False\n" in out and "Nothing remains" in out, out


def test_unpadded_decoder_ce_engine_is_explained(tmp_path):
    """An engine that feeds each request its own context rows (dce_context: contexts of 5, 8, 6 frames), emulated
    without the debug tree (per-request runs capture no layers): diagnose names unpadded_requests."""
    from conftest import infer_inputs, load_batch, reference_model
    from trt.diagnose import diagnose
    from trt.engine import EnginePolicy, dump_engine_emulation

    case, params = "dce_context", dict(topk=1, max_decoder_steps=6, start_prior_after_n_audio_steps=2)
    model, batch = reference_model(case), infer_inputs(load_batch(case))
    dump_engine_emulation(model, batch, tmp_path / "engine", EnginePolicy(unpadded_requests=True), use_cfg=True,
                          seed=0, **params)
    d = diagnose(model, tmp_path / "engine", batch)
    assert d.explanation == ["unpadded_requests"] and d.explained, d.report()
    assert "decoder_context" not in vars(model)  # the per-request prompt rows were handed over, then removed


def _codes_report(capsys, *argv) -> list[dict]:
    capsys.readouterr()
    main(["closed-loop", *argv, "--json", "-"])
    return json.loads(capsys.readouterr().out)["items"]


def test_closed_loop_counts_decoder_steps_of_two_frames(tmp_path, capsys):
    """v2607 stacks 2 frames a decoder step: closed-loop --checkpoint reports frame f at step f // 2, for the
    emulated bfloat16 engine's codes against the reference's ``infer --kv-cache on`` codes, and for a planted
    difference at frame 5 (step 2)."""
    from safetensors.torch import load_file, save_file

    ckpt, batch = f"{FIX}/dce_baked_v2607.nemo", f"{FIX}/dce_baked_v2607.batch.safetensors"
    run = ["--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=16"]
    engine, ref = str(tmp_path / "engine.safetensors"), str(tmp_path / "ref.safetensors")
    assert main(["emulate", "--checkpoint", ckpt, "--batch", batch, "--engine", "dtype=bfloat16", *run,
                 "--out", str(tmp_path / "em"), "--codes-out", engine]) == 0
    assert main(["infer", "--checkpoint", ckpt, "--inputs", batch, *run, "--kv-cache", "on", "--out", ref]) == 0
    items = _codes_report(capsys, engine, ref, "--checkpoint", ckpt)
    assert [i["engine_len"] for i in items] == [16, 16, 16] == [i["reference_len"] for i in items]
    for i in items:
        if i["first"] is not None:
            assert i["first"]["step"] == i["first"]["frame"] // 2, i
    planted = load_file(ref)
    planted["predicted_codes"] = planted["predicted_codes"].clone()
    planted["predicted_codes"][1, 0, 5] += 1
    save_file(planted, str(tmp_path / "planted.safetensors"))
    items = _codes_report(capsys, str(tmp_path / "planted.safetensors"), ref, "--checkpoint", ckpt)
    assert [i["first"] and (i["first"]["step"], i["first"]["frame"]) for i in items] == [None, (2, 5), None]


def test_unpadded_requests_on_decoder_ce():
    """Baked speakers all have the table's frame count: unpadding changes nothing but the rounding of the unpadded
    text. With a context encoder each request's prompt is its own rows of the batch's context encoder output, as
    the runner feeds decoder_context_features: a request run alone on those rows gives the same logits."""
    from conftest import infer_inputs, load_batch, reference_model
    from reference.inference import infer_batch
    from trt.engine import EnginePolicy, _prompt_rows, infer, request_items

    kw = dict(use_cfg=True, keep_logits=True, topk=1, max_decoder_steps=6, start_prior_after_n_audio_steps=2)
    for case in ("dce_baked_v2607", "dce_context"):
        model, batch = reference_model(case), infer_inputs(load_batch(case))
        padded = infer(model, batch, EnginePolicy(kv_cache=True), **kw)
        unpadded = infer(model, batch, EnginePolicy(kv_cache=True, unpadded_requests=True),
                         forced_codes=padded.predicted_codes, **kw)
        gap = max((a - b).abs().max().item() for a, b in zip(padded.step_logits, unpadded.step_logits))
        if case == "dce_baked_v2607":
            assert gap < 1e-5
            continue
        assert gap > 1e-3  # NeMo's padded contexts shift the decoder positions
        for b, (item, rows) in enumerate(request_items(model, batch)):
            assert rows[0].shape[1] == int(batch["context_audio_codes_lens"][b]) + 2  # CONTEXT_BOS/EOS framed
            with _prompt_rows(model, rows):
                alone = infer_batch(model, item, use_kv_cache=True, forced_codes=padded.predicted_codes[b : b + 1],
                                    **kw)
            for x, y in zip(alone.step_logits, unpadded.step_logits):
                torch.testing.assert_close(x, y[b : b + 1], atol=1e-6, rtol=0)
        assert "decoder_context" not in vars(model)


def doc_sh_commands(text: str, heading: str) -> list[list[str]]:
    """argv after 'magpie-parity' of every line of the ``sh`` blocks under ``heading`` (up to the next heading)."""
    import re
    import shlex

    section = text.split(heading + "\n", 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.M)[0]
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            assert argv[0] == "magpie-parity", line
            out.append(argv[1:])
    return out


def test_the_walkthrough_decoder_ce_commands_run(tmp_path, monkeypatch, capsys):
    """docs/trtllm-walkthrough.md's decoder_ce example (``sh`` blocks, which test_walkthrough.py leaves alone), run
    as written in an empty folder holding a copy of the fixture files it names; each exits 0."""
    import shutil

    from conftest import REPO

    text = (REPO / "docs" / "trtllm-walkthrough.md").read_text()
    cmds = doc_sh_commands(text, "### Debugging a decoder_ce engine (emulated)")
    assert [c[0] for c in cmds] == ["emulate", "ingest-trtllm", "diagnose", "infer", "closed-loop"]
    named = sorted({a for argv in cmds for a in argv if a.startswith("fixtures/")})
    assert named == [f"{FIX}/dce_baked_v2607.batch.safetensors", f"{FIX}/dce_baked_v2607.nemo"]
    for rel in named:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for argv in cmds:
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"magpie-parity {' '.join(argv)}: exit {rc}\n{out.err}"
        outputs[argv[0]] = out.out
    assert "(12 decoder steps of 2 frames)" in outputs["emulate"]
    assert "decoder_ce: the prompt is the decoder_context rows + the BOS-frame embedding" in outputs["emulate"]
    assert "steps [0]..[11] (decoder steps of 2 frames: 24 frames)" in outputs["ingest-trtllm"]
    diag = outputs["diagnose"]
    assert "over 12 steps (24 frames, 2 a step)" in diag and "Nothing remains" in diag
    assert "Explained by: multi_block_mode (prior skipped)\n" in diag
    assert "Left out (cannot change this run): unpadded_requests: every baked speaker of the batch has 5" in diag
    assert "0 diverge" in outputs["closed-loop"] and "24/24" in outputs["closed-loop"]


def test_float16_engine_judged_by_calibrated_noise(tmp_path, capsys):
    """A float16 engine in multi-block mode on v2607, judged by calibrate's float16 noise of the same checkpoint and
    batch (steps of 2 frames on both sides): exit 0, and nothing is named beyond what the emulation switched on
    (on this tiny model the skipped prior stays within float16 noise)."""
    ckpt, batch = f"{FIX}/dce_baked_v2607.nemo", f"{FIX}/dce_baked_v2607.batch.safetensors"
    run = ["--use-cfg", "--param", "topk=1", "--param", "max_decoder_steps=16"]
    assert main(["emulate", "--checkpoint", ckpt, "--batch", batch, "--engine", "multi_block_mode=true",
                 "--engine", "dtype=float16", *run, "--out", str(tmp_path / "em"), "--debug-tree", str(tmp_path / "t"),
                 "--codes-out", str(tmp_path / "codes.safetensors")]) == 0
    assert main(["ingest-trtllm", str(tmp_path / "t" / "tllm_debug"), "--out", str(tmp_path / "ed"),
                 "--checkpoint", ckpt, "--cfg-scale", "2.5"]) == 0
    assert main(["calibrate", "--checkpoint", ckpt, "--batch", batch, "--dtype", "float16", "--seeds", "2", *run,
                 "--kv-cache", "on", "--out", str(tmp_path / "tol.json")]) == 0
    capsys.readouterr()
    rc = main(["diagnose", str(tmp_path / "ed"), "--checkpoint", ckpt, "--batch", batch,
               "--codes", str(tmp_path / "codes.safetensors"), "--param", "topk=1",
               "--tolerances", str(tmp_path / "tol.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "the calibrated float16 noise of the logits" in out and "over 8 steps (16 frames, 2 a step)" in out
    named = next(line for line in out.splitlines() if line.startswith(("Explained by:", "No deviation")))
    assert named.startswith("No deviation") or set(named.split(": ", 1)[1].split(", ")) <= {
        "multi_block_mode (prior skipped)", "dtype=float16"}, out
