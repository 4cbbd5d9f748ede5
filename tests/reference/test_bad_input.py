"""Bad checkpoints and batches give clear errors that name the file, key or field."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from conftest import FIXTURES, load_batch, reference_model
from reference import BatchError, CheckpointError, ConfigError, MagpieTTS


def _rewrite_nemo(src, dst, edit_config=None, edit_weights=None, extra_members=()):
    with tarfile.open(src) as tf:
        cfg = tf.extractfile("./model_config.yaml").read().decode()
        sd = torch.load(io.BytesIO(tf.extractfile("./model_weights.ckpt").read()), weights_only=True)
    if edit_config:
        cfg = edit_config(cfg)
    if edit_weights:
        edit_weights(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    with tarfile.open(dst, "w") as tf:
        for name, data in [("./model_config.yaml", cfg.encode()), ("./model_weights.ckpt", buf.getvalue()), *extra_members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_truncated_nemo(tmp_path):
    data = (FIXTURES / "released_small.nemo").read_bytes()
    p = tmp_path / "cut.nemo"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.nemo"):
        MagpieTTS.from_nemo(p)


def test_truncated_ckpt(tmp_path):
    data = (FIXTURES / "released_small.ckpt").read_bytes()
    p = tmp_path / "cut.ckpt"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        MagpieTTS.from_nemo(p)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.nemo"
    p.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.nemo"):
        MagpieTTS.from_nemo(p)
    with pytest.raises(CheckpointError, match="no such file"):
        MagpieTTS.from_nemo(tmp_path / "absent.nemo")


def test_codec_archive_is_not_magpie():
    with pytest.raises((CheckpointError, ConfigError), match="codec_2cb.nemo"):
        MagpieTTS.from_nemo(FIXTURES / "codec_2cb.nemo")


def test_missing_and_unexpected_keys(tmp_path):
    def drop(sd):
        del sd["decoder.layers.1.cross_attention.q_net.weight"]
        sd["decoder.layers.1.surprise.weight"] = torch.randn(3)

    p = tmp_path / "keys.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p, edit_weights=drop)
    with pytest.raises(CheckpointError) as e:
        MagpieTTS.from_nemo(p)
    assert "decoder.layers.1.cross_attention.q_net.weight" in str(e.value)
    assert "decoder.layers.1.surprise.weight" in str(e.value)


def test_shape_mismatch_names_the_weight(tmp_path):
    def grow(sd):
        sd["encoder.layers.0.pos_ff.proj.conv.weight"] = torch.randn(64, 32, 5)

    p = tmp_path / "shape.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p, edit_weights=grow)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.pos_ff\.proj\.conv\.weight"):
        MagpieTTS.from_nemo(p)


def test_config_disagrees_with_weights(tmp_path):
    p = tmp_path / "cfg.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p, edit_config=lambda c: c.replace("d_ffn: 64", "d_ffn: 48"))
    with pytest.raises(CheckpointError, match="pos_ff"):
        MagpieTTS.from_nemo(p)


def test_unsupported_model_type(tmp_path):
    p = tmp_path / "type.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p,
                  edit_config=lambda c: c.replace("model_type: decoder_context_tts", "model_type: multi_encoder_context_tts"))
    with pytest.raises(ConfigError, match="multi_encoder_context_tts"):
        MagpieTTS.from_nemo(p)


def test_nan_weight_rejected(tmp_path):
    def poison(sd):
        sd["final_proj.bias"][3] = float("nan")

    p = tmp_path / "nan.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p, edit_weights=poison)
    with pytest.raises(CheckpointError, match="final_proj.bias"):
        MagpieTTS.from_nemo(p)


def test_archive_with_traversal_and_links_is_never_extracted(tmp_path):
    """Members like ../evil are read in memory only; a link named like a required member is refused."""
    p = tmp_path / "evil.nemo"
    _rewrite_nemo(FIXTURES / "released_small.nemo", p, extra_members=[("../../evil.txt", b"x")])
    m = MagpieTTS.from_nemo(p)  # loads fine; nothing written outside
    assert not (tmp_path.parent / "evil.txt").exists() and m is not None
    q = tmp_path / "link.nemo"
    with tarfile.open(q, "w") as tf:
        info = tarfile.TarInfo("./model_config.yaml")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(CheckpointError, match="link"):
        MagpieTTS.from_nemo(q)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": Evil()}}, p)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        MagpieTTS.from_nemo(p)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda b: b.update(text_lens=b["text_lens"] + 1), "text_lens"),
        (lambda b: b["audio_codes"].__setitem__((0, 0, 0), 10_000), "audio_codes"),
        (lambda b: b.update(context_audio_codes_lens=b["context_audio_codes_lens"][:2]), "context_audio_codes_lens"),
        (lambda b: b.update(audio_codes=b["audio_codes"][:, :1]), "audio_codes"),
        (lambda b: b.pop("text"), "text"),
        (lambda b: b.update(audio_codes=torch.cat([b["audio_codes"], b["audio_codes"][:, :, :2]], 2)), "padded to"),
        (lambda b: b.update(text=b["text"].float()), "text"),
        (lambda b: b["text"].__setitem__((0, 0), -1), "text"),
        (lambda b: b["align_prior_matrix"].__setitem__((0, 0, 0), float("nan")), "align_prior_matrix"),
    ],
)
def test_bad_batches(edit, match):
    model = reference_model("released_small")
    batch = load_batch("released_small")
    edit(batch)
    with pytest.raises(BatchError, match=match):
        model.process_batch(batch)
