"""trt.build: the seed profile's exact flags, validation against the converted config, backend detection."""

from __future__ import annotations

import json
import shutil

import pytest

from reference.config import MagpieConfig, TransformerConfig
from trt import build as B
from trt.convert import build_configs


def magpie_config(positions=2048) -> MagpieConfig:
    enc = TransformerConfig(n_layers=1, d_model=16, d_ffn=32, sa_n_heads=2, kernel_size=3, is_causal=False,
                            apply_norm_out=True, max_length_causal_mask=positions, use_learnable_pos_emb=True)
    dec = TransformerConfig(n_layers=1, d_model=16, d_ffn=32, sa_n_heads=2, kernel_size=1, is_causal=True,
                            apply_norm_out=True, max_length_causal_mask=positions, use_learnable_pos_emb=True,
                            has_xattn=True, xa_d_memory=16, xa_n_heads=1, xa_d_head=8)
    return MagpieConfig(model_type="decoder_context_tts", d_model=16, num_text_tokens=11, num_audio_codebooks=2,
                        codebook_size=8, num_all_tokens_per_codebook=16, frame_stacking_factor=1, audio_bos_id=8,
                        audio_eos_id=9, context_audio_bos_id=10, context_audio_eos_id=11, mask_token_id=12,
                        encoder=enc, decoder=dec)


@pytest.fixture()
def ckpt(tmp_path):
    def make(dtype="float16", positions=2048):
        d = tmp_path / f"ck_{dtype}_{positions}"
        enc, dec = build_configs(magpie_config(positions), dtype=dtype)
        for comp, cfg in (("encoder", enc), ("decoder", dec)):
            (d / comp).mkdir(parents=True, exist_ok=True)
            (d / comp / "config.json").write_text(json.dumps(cfg))
        return d

    return make


SEED_COMMON = ["--moe_plugin", "disable", "--max_beam_width", "1", "--gemm_plugin", "float16",
               "--bert_attention_plugin", "float16", "--gpt_attention_plugin", "float16",
               "--remove_input_padding", "enable", "--use_paged_context_fmha", "enable"]


def test_seed_profile_matches_the_fork_readme(ckpt, tmp_path):
    d = ckpt()
    enc, dec = B.build_commands(d, tmp_path / "eng", "seed")
    assert enc == ["trtllm-build", "--checkpoint_dir", str(d / "encoder"), "--output_dir", str(tmp_path / "eng" / "encoder"),
                   "--paged_kv_cache", "enable", *SEED_COMMON, "--max_batch_size", "256", "--max_input_len", "128"]
    assert dec == ["trtllm-build", "--checkpoint_dir", str(d / "decoder"), "--output_dir", str(tmp_path / "eng" / "decoder"),
                   *SEED_COMMON, "--max_batch_size", "64", "--max_input_len", "192", "--max_seq_len", "512",
                   "--max_encoder_input_len", "512"]


def test_debug_output_and_overrides(ckpt, tmp_path):
    d = ckpt()
    enc, dec = B.build_commands(d, tmp_path, "seed", debug_output=True, max_batch_size=8,
                                decoder_max_seq_len=640, max_encoder_input_len=256, encoder_max_input_len=256)
    assert enc[-1] == "--enable_debug_output" and dec[-1] == "--enable_debug_output"
    assert enc[enc.index("--max_batch_size") + 1] == "8" and dec[dec.index("--max_batch_size") + 1] == "8"
    assert dec[dec.index("--max_seq_len") + 1] == "640" and "--max_seq_len" not in enc
    assert dec[dec.index("--max_encoder_input_len") + 1] == "256" and "--max_encoder_input_len" not in enc
    enc, _ = B.build_commands(d, tmp_path, "seed", paged_kv_cache=None)
    assert "--paged_kv_cache" not in enc


def test_parity_profile_builds_a_float32_checkpoint(ckpt, tmp_path):
    enc, dec = B.build_commands(ckpt("float32"), tmp_path, "parity", debug_output=True, workload=B.Workload(100, 150, 300))
    assert enc[enc.index("--gemm_plugin") + 1] == "auto"
    assert "--enable_debug_output" in dec


@pytest.mark.parametrize("kwargs,match", [
    (dict(profile="nope"), r"unknown build profile 'nope'"),
    (dict(max_batchsize=3), r"unknown trtllm-build option 'max_batchsize'"),
    (dict(decoder_max_input_len=600), r"--max_input_len 600 > --max_seq_len 512"),
    (dict(max_encoder_input_len=100), r"--max_encoder_input_len 100 < encoder --max_input_len 128"),
    (dict(max_batch_size=0), r"--max_batch_size must be a positive integer"),
    (dict(max_beam_width=2), r"--max_beam_width must be 1"),
    (dict(decoder_max_seq_len=None), r"--max_seq_len is required"),
])
def test_setting_errors(ckpt, tmp_path, kwargs, match):
    with pytest.raises(B.BuildConfigError, match=match):
        B.build_commands(ckpt(), tmp_path, **kwargs)


def test_checkpoint_errors(ckpt, tmp_path):
    with pytest.raises(B.BuildConfigError, match=r"gemm_plugin float16 but the checkpoint dtype is float32"):
        B.build_commands(ckpt("float32"), tmp_path, "seed")
    with pytest.raises(B.BuildConfigError, match=r"--max_seq_len 512 exceeds the decoder's max_position_embeddings 300"):
        B.build_commands(ckpt(positions=300), tmp_path, "seed", encoder_max_input_len=128)
    with pytest.raises(B.BuildConfigError, match=r"encoder: --max_input_len 128 exceeds the encoder's max_position_embeddings 64"):
        B.build_commands(ckpt(positions=64), tmp_path, "seed")
    with pytest.raises(B.BuildConfigError, match=r"encoder/config.json: missing"):
        B.build_commands(tmp_path / "nothing", tmp_path, "seed")


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", "a JSON list, not the object"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"{not json", "not valid JSON"),
    (b'{"dtype": "float16", "max_position_embeddings": "abc"}', "max_position_embeddings must be a positive integer"),
    (b'{"dtype": 3}', "dtype must be a string"),
])
def test_a_crafted_config_json_is_one_build_config_error(ckpt, tmp_path, content, match):
    d = ckpt()
    (d / "encoder" / "config.json").write_bytes(content)
    with pytest.raises(B.BuildConfigError, match=match):
        B.build_commands(d, tmp_path / "engines", "seed", encoder_max_input_len=128)


def test_position_errors_name_the_set_that_fixes_them(ckpt, tmp_path):
    with pytest.raises(B.BuildConfigError, match=r"\(pass --set encoder_max_input_len=64\)"):
        B.build_commands(ckpt(positions=64), tmp_path, "seed")
    # and following the hint gets past that check
    with pytest.raises(B.BuildConfigError, match="max_seq_len 512 exceeds .* \\(pass --set max_seq_len=64"):
        B.build_commands(ckpt(positions=64), tmp_path, "seed", encoder_max_input_len=64)


def test_workload_validation(ckpt, tmp_path):
    d = ckpt()
    # The seed workload (160 context + 1 + 480 generated frames) does not fit the README decoder's max_seq_len 512.
    with pytest.raises(B.BuildConfigError, match=r"--max_seq_len 512 < context frames \+ 1 \+ generated frames = 641"):
        B.build_commands(d, tmp_path, "seed", workload=B.SEED_WORKLOAD)
    B.build_commands(d, tmp_path, "seed", workload=B.SEED_WORKLOAD, decoder_max_seq_len=641)
    with pytest.raises(B.BuildConfigError, match=r"encoder: --max_input_len 128 < longest text 129"):
        B.build_commands(d, tmp_path, "seed", workload=B.Workload(129, 10, 10))
    with pytest.raises(B.BuildConfigError, match=r"--max_input_len 192 < context frames \+ 1 = 193"):
        B.build_commands(d, tmp_path, "seed", workload=B.Workload(100, 192, 10))
    # a workload longer than the learned positions cannot get a max_seq_len that fits both
    with pytest.raises(B.BuildConfigError, match=r"--max_seq_len 2048 < context frames \+ 1 \+ generated frames = 2101"):
        B.build_commands(d, tmp_path, "seed", workload=B.Workload(100, 100, 2000), decoder_max_seq_len=2048)
    with pytest.raises(B.BuildConfigError, match=r"--max_seq_len 2101 exceeds the decoder's max_position_embeddings 2048"):
        B.build_commands(d, tmp_path, "seed", workload=B.Workload(100, 100, 2000), decoder_max_seq_len=2101)


def test_run_build_without_backend(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(B.BackendUnavailable, match="trtllm-build is not on the PATH"):
        B.run_build(ckpt(), tmp_path / "eng", "seed")
    with pytest.raises(B.BuildConfigError):  # settings are still validated first
        B.run_build(ckpt(), tmp_path / "eng", "seed", max_beam_width=4)


def test_run_build_executes_the_commands(ckpt, tmp_path, monkeypatch):
    """With a stand-in trtllm-build on the PATH, both commands run in order; a failure raises BuildError."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.txt"
    exe = bindir / "trtllm-build"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\ncase \"$*\" in *FAIL*) echo boom >&2; exit 3;; esac\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    cmds = B.run_build(ckpt(), tmp_path / "eng", "seed")
    lines = log.read_text().splitlines()
    assert lines == [" ".join(c[1:]) for c in cmds] and "encoder" in lines[0] and "decoder" in lines[1]
    with pytest.raises(B.BuildError, match=r"exit code 3:\nboom"):
        B.run_build(ckpt("float16", 4096), tmp_path / "FAIL", "seed")


def test_baked_speakers_prompt_must_fit_the_decoder_input(tmp_path):
    """A baked-speaker checkpoint (v2607: 217 frames) fixes its prompt: the speaker's frames + the BOS position. The
    seed profile's decoder --max_input_len 192 cannot take it; the error names the --set that fixes it."""
    import dataclasses

    from conftest import reference_model

    c = dataclasses.replace(reference_model("dce_baked_v2607").config, baked_frames=217)
    d = tmp_path / "ck"
    enc, dec = build_configs(c, dtype="float16")
    assert dec["magpie_parity"]["baked_context_frames"] == 217
    for comp, cfg in (("encoder", enc), ("decoder", dec)):
        (d / comp).mkdir(parents=True)
        (d / comp / "config.json").write_text(json.dumps(cfg))
    over = dict(encoder_max_input_len=32, max_seq_len=32, decoder_max_encoder_input_len=32)  # the fixture's positions
    with pytest.raises(B.BuildConfigError, match=r"< the baked speakers' 217 context frames \+ the BOS position = 218 "
                                                 r"\(pass --set decoder_max_input_len=218\)"):
        B.build_commands(d, tmp_path / "e", "seed", **over, decoder_max_input_len=30)
    positions = dict(encoder_max_input_len=32, decoder_max_encoder_input_len=32)
    c2 = dataclasses.replace(c, decoder=dataclasses.replace(c.decoder, max_length_causal_mask=1024))
    enc, dec = build_configs(c2, dtype="float16")
    (d / "decoder" / "config.json").write_text(json.dumps(dec))
    with pytest.raises(B.BuildConfigError, match=r"pass --set decoder_max_input_len=218"):
        B.build_commands(d, tmp_path / "e", "seed", **positions)  # the README's 192
    with pytest.raises(B.BuildConfigError, match=r"--max_seq_len 218 leaves no room to generate"):
        B.build_commands(d, tmp_path / "e", "seed", **positions, decoder_max_input_len=218, max_seq_len=218)
    B.build_commands(d, tmp_path / "e", "seed", **positions, decoder_max_input_len=218, max_seq_len=700)
