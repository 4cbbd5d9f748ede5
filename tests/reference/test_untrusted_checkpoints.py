"""Crafted checkpoints are refused with one CheckpointError / ConfigError naming the file and the field, before any
large allocation, without blocking, and without resolving anything from the environment."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from crafted import JUNK, TOP_KEYS, TRANSFORMER_KEYS, alias_bomb_yaml, gzip_bomb_nemo, sparse_nemo, write_nemo
from reference import CheckpointError, ConfigError, MagpieConfig, MagpieTTS
from reference.checkpoint import read_checkpoint

SRC = FIXTURES / "released_small.nemo"


@pytest.fixture(scope="module")
def raw():
    return read_checkpoint(SRC)


@pytest.fixture
def bounded():
    """Every test here must finish: a read that blocks (a FIFO) fails the test instead of hanging the suite."""
    def timeout(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_fifo_is_refused_without_opening_it(tmp_path, bounded):
    fifo = tmp_path / "model.nemo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="model.nemo: not a regular file"):
        MagpieTTS.from_nemo(fifo)


def test_a_link_to_a_regular_file_is_read_as_that_file(tmp_path):
    """A hub cache's snapshot is a link to its blob: the link is resolved, the target must be a regular file."""
    link = tmp_path / "linked.nemo"
    link.symlink_to(SRC)
    assert MagpieTTS.from_nemo(link).config == MagpieTTS.from_nemo(SRC).config


def test_sparse_member_is_refused(tmp_path, raw):
    """A PAX sparse member may declare gigabytes in a few bytes of archive."""
    dst = sparse_nemo(tmp_path / "sparse.nemo", raw.config)
    assert dst.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match="sparse.nemo: member '.*model_weights.ckpt' is a sparse file"):
        MagpieTTS.from_nemo(dst)


def test_compressed_bomb_is_refused_before_decompressing(tmp_path):
    dst = gzip_bomb_nemo(tmp_path / "bomb.nemo", 64 * 2**20)  # compresses ~1000x
    assert dst.stat().st_size < 200_000
    with pytest.raises(CheckpointError, match="bomb.nemo: members declare 67108864 bytes .* decompression bomb"):
        MagpieTTS.from_nemo(dst)


def test_alias_bomb_in_the_config_is_refused(tmp_path, raw):
    dst = write_nemo(tmp_path / "alias.nemo", alias_bomb_yaml(), raw.state_dict)
    with pytest.raises(CheckpointError, match="alias.nemo:model_config.yaml: .*more than 64 YAML aliases"):
        MagpieTTS.from_nemo(dst)


def test_resolvers_are_never_called_and_secrets_never_printed(tmp_path, raw, monkeypatch):
    monkeypatch.setenv("MAGPIE_TEST_SECRET", "hunter2-do-not-print")
    cfg = dict(raw.config, model_type="${oc.env:MAGPIE_TEST_SECRET}")
    dst = write_nemo(tmp_path / "env.nemo", yaml.safe_dump(cfg), raw.state_dict)
    with pytest.raises(CheckpointError, match="'model_type' calls an omegaconf resolver") as e:
        MagpieTTS.from_nemo(dst)
    assert "hunter2" not in str(e.value)


def test_node_interpolations_still_resolve(tmp_path, raw):
    """NeMo configs refer to their own keys (``${...}``): those keep working."""
    cfg = copy.deepcopy(raw.config)
    cfg["shared_dim"] = cfg["embedding_dim"]
    cfg["embedding_dim"] = "${shared_dim}"
    dst = write_nemo(tmp_path / "interp.nemo", yaml.safe_dump(cfg), raw.state_dict)
    assert MagpieTTS.from_nemo(dst).config.d_model == cfg["shared_dim"]


def test_an_expanded_view_is_refused_before_it_is_materialised(tmp_path, raw):
    sd = dict(raw.state_dict)
    sd["text_embedding.weight"] = torch.zeros(1).expand(15_000_000, 32)
    dst = write_nemo(tmp_path / "expand.nemo", yaml.safe_dump(raw.config), sd)
    assert dst.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match="'text_embedding.weight' of shape \\(15000000, 32\\) is a view its "
                                              "storage does not back"):
        MagpieTTS.from_nemo(dst)


@pytest.mark.parametrize("make, what", [
    (lambda w: w.bool(), "dtype bool"),
    (lambda w: w.to(torch.complex64), "dtype complex64"),
    (lambda w: w.to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
    (lambda w: w.to_sparse(), "sparse_coo"),
])
def test_weight_kinds_that_are_not_dense_floats_are_refused(tmp_path, raw, make, what):
    sd = dict(raw.state_dict)
    sd["final_proj.weight"] = make(sd["final_proj.weight"])
    dst = write_nemo(tmp_path / "kind.nemo", yaml.safe_dump(raw.config), sd)
    with pytest.raises(CheckpointError, match=f"kind.nemo:model_weights.ckpt: weight 'final_proj.weight' .*{what}"):
        MagpieTTS.from_nemo(dst)


def test_a_config_larger_than_its_weights_is_refused_before_building(raw):
    for stack, n in (("encoder", 10**6), ("decoder", raw.config["decoder"]["n_layers"] + 1)):
        cfg = copy.deepcopy(raw.config)
        cfg[stack]["n_layers"] = n
        with pytest.raises(ConfigError, match=f"{stack}.n_layers is {n} but the weights hold"):
            MagpieConfig.from_nemo(cfg, raw.state_dict)
    cfg = copy.deepcopy(raw.config)
    cfg["decoder"]["d_ffn"] = 1_500_000
    with pytest.raises(ConfigError, match="'d_ffn' must lie in"):
        MagpieConfig.from_nemo(cfg, raw.state_dict)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["encoder", "decoder", "top"]), key=st.sampled_from(TRANSFORMER_KEYS + TOP_KEYS),
       value=JUNK)
def test_any_config_value_loads_or_gives_one_config_error(raw, where, key, value):
    """The loader either builds a model the weights fit or raises ConfigError / CheckpointError naming the file;
    never another exception (ZeroDivisionError, TypeError, a 10**6-layer allocation ...)."""
    cfg = copy.deepcopy(raw.config)
    if where == "top":
        if key in TRANSFORMER_KEYS:
            return
        cfg[key] = value
    else:
        if key not in TRANSFORMER_KEYS:
            return
        cfg[where][key] = value
    try:
        MagpieTTS.from_state_dict(cfg, raw.state_dict, where="crafted.nemo")
    except (ConfigError, CheckpointError) as e:
        assert str(e).startswith("crafted.nemo") and "\n" not in str(e)
