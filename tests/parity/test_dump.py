"""Dump format: round trip, atomic publish, and rejection of damaged or hostile dumps."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from parity.compare import compare_dumps
from parity.dump import DumpError, DumpExistsError, DumpReader, DumpWriter, MissingTensorError, write_dump

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=g, dtype=dtype)


def sample_tensors(seed=0):
    return [
        ("text_embedding", None, rand((2, 7, 16), torch.float32, seed)),
        ("encoder.layers.0.self_attention", None, rand((2, 7, 16), torch.float16, seed + 1)),
        ("decoder.layers.0.cross_attention.attn_probs", 0, rand((2, 1, 7), torch.bfloat16, seed + 2)),
        ("decoder.layers.0.cross_attention.attn_probs", 1, rand((2, 1, 7), torch.bfloat16, seed + 3)),
        ("logits", 3, rand((2, 1, 33), torch.float32, seed + 4)),
        ("tokens", None, rand((5,), torch.int64, seed + 5)),
    ]


@pytest.fixture
def dump(tmp_path):
    return write_dump(tmp_path / "d", sample_tensors(), source="reference", config_hash="abc", dtype="float32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", [None, 0, 17])
def test_round_trip(tmp_path, dtype, step):
    t = rand((3, 5, 4), dtype, seed=11)
    other = rand((9,), torch.float32, seed=12)
    out = write_dump(
        tmp_path / "d",
        [("encoder.layers.3.pos_ff", step, t), ("final_proj", None, other)],
        source="nemo",
        inputs={"text": "hello"},
        layout={"batch": "B,T,D"},
        meta={"k": 1},
    )
    r = DumpReader(out)
    assert r.source == "nemo" and r.inputs == {"text": "hello"} and r.layout == {"batch": "B,T,D"}
    assert [(e.name, e.step) for e in r.entries] == [("encoder.layers.3.pos_ff", step), ("final_proj", None)]
    e = r.entry("encoder.layers.3.pos_ff", step)
    assert e.shape == (3, 5, 4) and e.dtype == str(dtype).removeprefix("torch.")
    assert ("encoder.layers.3.pos_ff", step) in r
    got = r.load("encoder.layers.3.pos_ff", step)
    assert got.dtype == dtype and torch.equal(got, t)
    for chunk in (1, 7, 60, 1000):
        assert torch.equal(torch.cat(list(r.iter_chunks(e, chunk))), t.reshape(-1))
    assert torch.equal(r.load("final_proj"), other)


def test_many_shards_keep_execution_order(tmp_path):
    ts = [(f"decoder.layers.{i}", s, rand((64,), torch.float32, i * 10 + s)) for s in range(3) for i in range(4)]
    out = write_dump(tmp_path / "d", ts, source="trtllm", shard_bytes=600)
    r = DumpReader(out)
    assert len({e.file for e in r.entries}) > 1
    assert [(e.name, e.step) for e in r.entries] == [(n, s) for n, s, _ in ts]
    for n, s, t in ts:
        assert torch.equal(r.load(n, s), t)


def test_add_snapshots_tensor_and_rejects_duplicates(tmp_path):
    t = rand((4,), torch.float32, 1)
    expect = t.clone()
    with DumpWriter(tmp_path / "d", source="reference") as w:
        w.add("x", t, step=2)
        t.add_(1.0)  # a reused buffer changing later must not change the dump
        with pytest.raises(ValueError, match="duplicate"):
            w.add("x", t, step=2)
        w.add("x", t, step=3)
    assert torch.equal(DumpReader(tmp_path / "d").load("x", 2), expect)


def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with DumpWriter(tmp_path / "d", source="reference") as w:
            w.add("x", rand((1000,), torch.float32, 3))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_unclosed_writer_is_not_a_dump(tmp_path):
    w = DumpWriter(tmp_path / "d", source="reference")
    w.add("x", rand((10,), torch.float32, 3))
    assert not (tmp_path / "d").exists()
    (tmp_path / "d").mkdir()
    with pytest.raises(DumpError, match="manifest.json"):
        DumpReader(tmp_path / "d")
    w.abort()
    assert os.listdir(tmp_path) == ["d"]


def _rewrite_manifest(path, edit):
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    m.pop("manifest_sha256", None)  # hand-made manifest: exercise the specific check, not the digest
    edit(m)
    mpath.write_text(json.dumps(m))


def test_incomplete_manifest_rejected(dump):
    _rewrite_manifest(dump, lambda m: m.update(complete=False))
    with pytest.raises(DumpError, match="complete"):
        DumpReader(dump)


def test_edited_manifest_rejected_by_digest(dump):
    mpath = dump / "manifest.json"
    m = json.loads(mpath.read_text())
    m["meta"] = {"edited": True}
    mpath.write_text(json.dumps(m))
    with pytest.raises(DumpError, match="manifest_sha256"):
        DumpReader(dump)


def test_overwrite(tmp_path, dump):
    with pytest.raises(DumpExistsError):
        DumpWriter(dump, source="reference")
    t = rand((3,), torch.float32, 9)
    write_dump(dump, [("y", None, t)], source="nemo", overwrite=True)
    r = DumpReader(dump)
    assert r.source == "nemo" and torch.equal(r.load("y"), t) and ("x", None) not in r
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temp or old directories left


@pytest.mark.parametrize("make", ["notes", "file", "link"])
def test_overwrite_replaces_only_a_dump(tmp_path, dump, make):
    """--overwrite must never delete what this tool did not write: a folder of notes, a file, a link (even to a
    dump); each is refused before anything is written and left as it was."""
    target = tmp_path / "out"
    if make == "notes":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif make == "file":
        target.write_text("mine")
    else:
        target.symlink_to(dump)
    with pytest.raises(DumpExistsError, match="is not a magpie-parity dump"):
        DumpWriter(target, source="reference", overwrite=True)
    if make == "notes":
        assert (target / "notes.txt").read_text() == "mine"
    elif make == "file":
        assert target.read_text() == "mine"
    else:
        assert target.is_symlink() and DumpReader(dump).source == "reference"
    assert sorted(os.listdir(tmp_path)) == sorted(["d", "out"])  # no temp directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dump(empty, [("y", None, torch.ones(2))], source="nemo", overwrite=True)  # an empty folder may be used


def test_shard_header_larger_than_the_writers_reserve_is_refused(tmp_path):
    """A crafted shard whose header lists a million empty tensors would cost gigabytes to parse: refused by size."""
    import struct

    from parity.dump import HEADER_RESERVE

    d = write_dump(tmp_path / "d", [("x", None, torch.ones(1))], source="reference")
    shard = next(p for p in d.iterdir() if p.suffix == ".safetensors")
    header = {f"e{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)}
    header["x"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = json.dumps(header).encode()
    assert len(raw) > HEADER_RESERVE
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + torch.ones(1).numpy().tobytes())
    with pytest.raises(DumpError, match="larger than a dump's .*-byte reserve"):
        DumpReader(d)


def test_missing_tensor_lists_close_names(dump):
    r = DumpReader(dump)
    with pytest.raises(MissingTensorError, match="logits") as ei:
        r.entry("logit", 3)
    assert isinstance(ei.value, KeyError)
    with pytest.raises(DumpError, match=r"steps \[0, 1\]"):
        r.entry("decoder.layers.0.cross_attention.attn_probs", 5)


def _shard(dump):
    return sorted(p for p in dump.iterdir() if p.suffix == ".safetensors")[0]


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_file_names_it(dump, keep):
    f = _shard(dump)
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(DumpError, match=f.name):
        DumpReader(dump)


def test_truncated_after_open_names_it(dump):
    r = DumpReader(dump)
    f = _shard(dump)
    os.truncate(f, f.stat().st_size - 3)
    with pytest.raises(DumpError, match=f.name):
        for e in r.entries:
            list(r.iter_chunks(e, 4))


def test_corrupt_data_detected_lazily(dump):
    r = DumpReader(dump)
    e = r.entry("logits", 3)
    with open(dump / e.file, "r+b") as fh:
        fh.seek(e.data_offset + 5)
        b = fh.read(1)
        fh.seek(e.data_offset + 5)
        fh.write(bytes([b[0] ^ 0x10]))
    r = DumpReader(dump)  # headers intact: opens fine
    with pytest.raises(DumpError, match="crc32"):
        r.load("logits", 3)
    with pytest.raises(DumpError, match=e.file):
        list(r.iter_chunks(e, 8))
    # load() touches only the requested tensor: its neighbours are still readable
    assert r.load("tokens").shape == (5,)


@pytest.mark.parametrize("bad", ["../escape.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_path_traversal_rejected(dump, bad):
    _rewrite_manifest(dump, lambda m: m["tensors"][0].update(file=bad))
    with pytest.raises(DumpError, match="plain file name"):
        DumpReader(dump)


def test_symlink_leaving_dump_rejected(tmp_path, dump):
    f = _shard(dump)
    outside = tmp_path / "outside.safetensors"
    shutil.move(f, outside)
    f.symlink_to(outside)
    with pytest.raises(DumpError, match="symlink"):
        DumpReader(dump)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return write_dump(root / "d", sample_tensors(seed=5), source="reference", config_hash="cfg")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["manifest", "shard"]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    payload=st.binary(min_size=1, max_size=8),
    data_bias=st.booleans(),
)
def test_random_corruption_never_passes(tmp_path_factory, pristine, target, where, payload, data_bias):
    work = tmp_path_factory.mktemp("corrupt") / "d"
    shutil.copytree(pristine, work)
    f = work / "manifest.json" if target == "manifest" else _shard(work)
    raw = bytearray(f.read_bytes())
    if target == "shard" and data_bias:
        # Half the time aim past the (mostly padding) header area, at tensor bytes.
        start = len(raw) - sum(e.nbytes for e in DumpReader(pristine).entries)
        pos = start + int(where * (len(raw) - start))
    else:
        pos = int(where * len(raw))
    new = raw[:pos] + payload + raw[pos + len(payload) :]
    new = new[: len(raw)] if pos + len(payload) <= len(raw) else new
    assume(bytes(new) != bytes(raw))
    if target == "manifest":
        # Whitespace edits (e.g. a newline turned into a space) leave the same JSON document: not a corruption.
        try:
            assume(json.loads(bytes(new)) != json.loads(bytes(raw)))
        except (ValueError, UnicodeDecodeError):
            pass
    f.write_bytes(bytes(new))
    try:
        result = compare_dumps(work, pristine, progress=False)
    except DumpError as exc:
        assert str(exc)
        return
    assert not result.passed, "a corrupted dump compared as identical"
