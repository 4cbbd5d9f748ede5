"""Crafted inputs through the command line: every class of hostile or careless input the loaders refuse, run as
``python -m parity.cli`` in a child process bounded in time (killed after TIMEOUT_S) and memory (address space
capped with prlimit where it exists; the child's peak RSS from ``os.wait4`` must stay under RSS_LIMIT_KB).

Each case asserts: the exit status (2: one line on stderr naming the file or field), no input changed (every input
file hashed before and after), nothing written outside the output path (the case's folder, its TMPDIR and the
working directory listed before and after). The children run a few at a time (they spend most of their time
importing torch), so the whole module stays well under a minute on two cores.

Where the input space is wide (config fields and values, .npy headers, dump manifests) hypothesis drives the same
commands in-process (``parity.cli.main``), asserting exit 0/1 or one line naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, REPO
from crafted import (JUNK, TOP_KEYS, TRANSFORMER_KEYS, alias_bomb_yaml, gzip_bomb_nemo, nemo_from_bytes,
                     npy_raw_header, small_tree, sparse_nemo, weights_bytes, write_nemo)

CKPT = FIXTURES / "released_small.nemo"
BATCH = FIXTURES / "released_small.batch.safetensors"
RSS_LIMIT_KB = 500 * 1024  # inputs here are under 1 MB; a bare CLI that imports torch peaks near 300 MB
TIMEOUT_S = 90  # a child that blocks (on a FIFO, say) is killed: the test fails instead of hanging
ADDRESS_SPACE_CAP = 8 * 2**30  # prlimit --as: an allocation gone wild fails in the child, not on the machine
WORKERS = min(4, max(2, os.cpu_count() or 2))  # children mostly import torch (CPU-bound)
SECRET = "hunter2-must-never-be-printed"


# ------------------------------------------------------------------------------------------------ harness


@dataclass
class Run:
    rc: int
    out: str
    err: str
    maxrss_kb: int
    seconds: float
    timed_out: bool


# Reaps the CLI with os.wait4 and writes its peak RSS (KB) to argv[1]. The CLI is forked from this small helper,
# not from pytest: a child's ru_maxrss starts from the memory it was forked with (Linux records the parent's
# resident set at exec), so a child forked from a pytest holding torch and models would report pytest's size.
_REAP = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_cli(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = TIMEOUT_S) -> Run:
    """``python -m parity.cli ARGV`` in ``cwd`` (stdout/stderr to files outside it), under prlimit's address-space
    cap where prlimit exists, reaped by a small helper with os.wait4 for its own peak RSS; killed (its whole
    session) after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "parity.cli", *map(str, argv)]
    if shutil.which("prlimit"):
        cmd = ["prlimit", f"--as={ADDRESS_SPACE_CAP}", *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="cli-run-") as side:
        rss_file = Path(side) / "rss"
        with open(Path(side) / "out", "w+b") as fo, open(Path(side) / "err", "w+b") as fe:
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", _REAP, str(rss_file), *cmd], cwd=cwd, env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            fo.seek(0)
            fe.seek(0)
            out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
        rss = int(rss_file.read_text()) if rss_file.exists() else -1
        return Run(proc.returncode, out, err, rss, time.monotonic() - t0, timed_out)


def listing(root: Path) -> set[str]:
    """Every path under root (links not followed), with its kind."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file" if p.is_file() else "special"
            out.add(f"{p.relative_to(root)} ({kind})")
    return out


def digests(paths: list[Path]) -> dict[str, str]:
    """sha256 of every regular file at or under the given paths (links and FIFOs recorded, never read)."""
    out = {}
    for top in paths:
        items = [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*"))
        for p in items:
            if p.is_symlink():
                out[str(p)] = f"link -> {os.readlink(p)}"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif not p.is_dir() and os.path.lexists(p):
                out[str(p)] = "special"
    return out


@dataclass
class Case:
    argv: list
    inputs: list  # files/folders whose bytes must not change
    names: tuple = ()  # what the one stderr line must name
    rc: int = 2
    out: Path | None = None  # the output path: the only place the command may write
    env: dict = field(default_factory=dict)
    never: tuple = ()  # text that must appear nowhere in the output (a secret)
    stdout_has: tuple = ()
    after: Callable | None = None  # further checks on the finished run
    rss_limit_kb: int = RSS_LIMIT_KB


CASES: dict[str, Callable] = {}
SLOW: set[str] = set()


def case(cid: str, slow: bool = False):
    def register(builder):
        assert cid not in CASES
        CASES[cid] = builder
        if slow:
            SLOW.add(cid)
        return builder

    return register


@pytest.fixture(scope="module")
def raw():
    from reference.checkpoint import read_checkpoint

    return read_checkpoint(CKPT)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, raw):
    """Build the selected cases, run their children a few at a time, snapshot before and after each."""
    wanted = sorted({it.callspec.params["cid"] for it in request.session.items
                     if it.module is request.module and "cid" in getattr(getattr(it, "callspec", None), "params", {})})
    base = tmp_path_factory.mktemp("crafted")
    built, results = {}, {}
    t_start = time.monotonic()
    try:
        for cid in wanted:
            root = base / cid
            (root / "tmp").mkdir(parents=True)
            try:
                c = CASES[cid](root, raw)
            except _Skip as s:
                results[cid] = s
                continue
            built[cid] = (root, c, listing(root), digests([Path(p) for p in c.inputs]))

        def one(cid):
            root, c, _, _ = built[cid]
            env = {"TMPDIR": str(root / "tmp"), **c.env}
            return cid, run_cli(c.argv, cwd=root, env=env)

        t_built = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            for cid, run in pool.map(one, sorted(built)):
                root, c, before_list, before_dig = built[cid]
                results[cid] = (c, run, root, before_list, listing(root), before_dig,
                                digests([Path(p) for p in c.inputs]))
        print(f"\n{len(built)} CLI children built in {t_built - t_start:.1f} s, run in {time.monotonic() - t_built:.1f} s "
              f"({WORKERS} at a time)", file=sys.stderr)
        yield results
    finally:
        while _MOUNTS:
            subprocess.run(["umount", str(_MOUNTS.pop())], check=False)


class _Skip(Exception):
    pass


_MOUNTS: list[Path] = []  # tmpfs mounted by the full-disk cases, unmounted when the module's runs are done


def pytest_generate_tests(metafunc):
    if "cid" in metafunc.fixturenames:  # every case, registered below by @case
        metafunc.parametrize("cid", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                     for c in sorted(CASES)])


def test_crafted_input_through_the_cli(cid, runs):
    res = runs[cid]
    if isinstance(res, _Skip):
        pytest.skip(str(res))
    c, run, root, before_list, after_list, before_dig, after_dig = res
    assert not run.timed_out, f"killed after {TIMEOUT_S} s: {run.err[-500:]}"
    assert run.rc == c.rc, run.err[-2000:]
    assert 0 < run.maxrss_kb < c.rss_limit_kb, f"peak RSS {run.maxrss_kb} KB"
    lines = run.err.strip().splitlines()
    if c.rc == 2:
        assert len(lines) == 1, lines  # one line: no traceback, no usage block
        for name in c.names:
            assert str(name) in lines[0], (name, lines[0])
    else:
        assert "Traceback" not in run.err
    for s in c.never:
        assert s not in run.out and s not in run.err
    for s in c.stdout_has:
        assert s in run.out
    assert after_dig == before_dig, "an input changed"
    written = after_list - before_list
    if c.out is not None:
        rel = str(Path(c.out).relative_to(root))
        written = {w for w in written if not (w.startswith(rel + "/") or w.split(" (")[0] == rel)}
    assert not written, f"written outside the output path: {sorted(written)}"
    if c.after:
        c.after(root, run)


def test_peak_rss_of_the_cli_children(runs, record_property):
    """The largest peak RSS among the children refusing a crafted input (printed with -s; each case asserts its own
    bound, the full-disk cases a larger one since they load and run the model before the write fails)."""
    done = {cid: r[1] for cid, r in runs.items() if not isinstance(r, _Skip)}
    refused = [r.maxrss_kb for cid, r in done.items() if cid not in SLOW]
    if not refused:
        pytest.skip("no case selected")
    record_property("max_child_rss_kb", max(refused))
    print(f"\nCLI children: {len(done)}; peak RSS of those refusing a crafted input: max {max(refused) / 1024:.0f} MB")
    for cid, r in sorted(done.items(), key=lambda kv: kv[1].maxrss_kb):
        print(f"  {cid:<44} {r.seconds:5.1f} s {r.maxrss_kb / 1024:6.0f} MB")
    assert max(refused) < RSS_LIMIT_KB


# ------------------------------------------------------------------------------------------ checkpoints


def _nemo_with(root: Path, raw, name: str, edit=None, sd=None, text: str | None = None) -> Path:
    cfg = copy.deepcopy(raw.config)
    if edit:
        edit(cfg)
    return write_nemo(root / name, text if text is not None else yaml.safe_dump(cfg),
                      sd if sd is not None else raw.state_dict)


def _dump_argv(ckpt, root, *more):
    return ["dump", "--checkpoint", ckpt, "--batch", BATCH, "--out", root / "out", *more]


@case("checkpoint-fifo")
def _(root, raw):
    fifo = root / "model.nemo"
    os.mkfifo(fifo)
    return Case(["infer", "--checkpoint", fifo, "--inputs", BATCH, "--out", root / "codes.safetensors"],
                [fifo, BATCH], names=("model.nemo", "not a regular file"), out=root / "codes.safetensors")


@case("checkpoint-sparse-member")
def _(root, raw):
    dst = sparse_nemo(root / "sparse.nemo", raw.config)
    return Case(_dump_argv(dst, root), [dst, BATCH], names=("sparse.nemo", "sparse"), out=root / "out")


@case("checkpoint-gzip-bomb")
def _(root, raw):
    dst = gzip_bomb_nemo(root / "bomb.nemo")
    assert dst.stat().st_size < 1_000_000
    return Case(["convert", "--checkpoint", dst, "--out", root / "out"], [dst], names=("bomb.nemo", "bomb"),
                out=root / "out")


@case("checkpoint-expanded-view")
def _(root, raw):
    sd = dict(raw.state_dict)
    sd["text_embedding.weight"] = torch.zeros(1).expand(15_000_000, 32)
    dst = _nemo_with(root, raw, "expand.nemo", sd=sd)
    assert dst.stat().st_size < 1_000_000
    return Case(["infer", "--checkpoint", dst, "--inputs", BATCH, "--out", root / "c.safetensors"], [dst, BATCH],
                names=("expand.nemo", "text_embedding.weight"), out=root / "c.safetensors")


CONFIGS = {
    "n_layers-1000000": (lambda c: c["encoder"].__setitem__("n_layers", 1_000_000), "n_layers"),
    "d_ffn-1500000": (lambda c: c["decoder"].__setitem__("d_ffn", 1_500_000), "d_ffn"),
    "sa_n_heads-0": (lambda c: c["encoder"].__setitem__("sa_n_heads", 0), "sa_n_heads"),
    "encoder-list": (lambda c: c.__setitem__("encoder", [1, 2]), "encoder"),
    "frame_stacking_factor-0": (lambda c: c.__setitem__("frame_stacking_factor", 0), "frame_stacking_factor"),
    "d_model-abc": (lambda c: c["decoder"].__setitem__("d_model", "abc"), "d_model"),
}


def _config_case(key):
    edit, field_name = CONFIGS[key]

    def build(root, raw):
        dst = _nemo_with(root, raw, "crafted.nemo", edit)
        return Case(_dump_argv(dst, root), [dst, BATCH], names=("crafted.nemo", field_name), out=root / "out")

    return build


for _key in CONFIGS:
    case(f"config-{_key}")(_config_case(_key))


@case("config-yaml-alias-bomb")
def _(root, raw):
    dst = _nemo_with(root, raw, "alias.nemo", text=alias_bomb_yaml())
    return Case(["bench-data", "--checkpoint", dst, "--out", root / "b.json"], [dst],
                names=("alias.nemo", "YAML aliases"), out=root / "b.json")


@case("config-resolver-secret")
def _(root, raw):
    dst = _nemo_with(root, raw, "env.nemo", lambda c: c.__setitem__("model_type", "${oc.env:MAGPIE_TEST_SECRET}"))
    return Case(_dump_argv(dst, root), [dst, BATCH], names=("env.nemo", "model_type", "resolver"), out=root / "out",
                env={"MAGPIE_TEST_SECRET": SECRET}, never=(SECRET,))


# ---------------------------------------------------------------------------------------------- convert


CONVERT_CONFIGS = {
    "encoder.n_layers--1": (lambda c: c["encoder"].__setitem__("n_layers", -1), "n_layers"),
    "kernel_size-0": (lambda c: c["decoder"].__setitem__("kernel_size", 0), "kernel_size"),
    "d_ffn-1e9": (lambda c: c["encoder"].__setitem__("d_ffn", 1e9), "d_ffn"),
}
WEIGHT_KINDS = {
    "bool": (lambda w: w.bool(), "dtype bool"),
    "complex": (lambda w: w.to(torch.complex64), "dtype complex64"),
    "float8": (lambda w: w.to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
}


def _convert_config_case(key):
    edit, field_name = CONVERT_CONFIGS[key]

    def build(root, raw):
        dst = _nemo_with(root, raw, "crafted.nemo", edit)
        return Case(["convert", "--checkpoint", dst, "--out", root / "ckpt"], [dst], names=("crafted.nemo", field_name),
                    out=root / "ckpt")

    return build


def _convert_weight_case(key):
    make, what = WEIGHT_KINDS[key]

    def build(root, raw):
        sd = dict(raw.state_dict)
        sd["final_proj.weight"] = make(sd["final_proj.weight"])
        dst = _nemo_with(root, raw, "kind.nemo", sd=sd)
        return Case(["convert", "--checkpoint", dst, "--out", root / "ckpt"], [dst],
                    names=("kind.nemo", "final_proj.weight", what), out=root / "ckpt")

    return build


for _key in CONVERT_CONFIGS:
    case(f"convert-config-{_key}")(_convert_config_case(_key))
for _key in WEIGHT_KINDS:
    case(f"convert-weights-{_key}")(_convert_weight_case(_key))


# ------------------------------------------------------------------------------------------------ dumps


def _small_dump(path: Path, values=None, name="logits", step=0):
    from parity.dump import write_dump

    t = values if values is not None else torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return write_dump(path, [(name, step, t)], source="reference")


@case("dump-shard-header-million-entries")
def _(root, raw):
    a = _small_dump(root / "A")
    shard = a / "tensors-00000.safetensors"
    entry = '"e{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(10**6)) + "}").encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    b = _small_dump(root / "B")
    return Case(["compare", a, b, "--no-progress"], [a, b], names=("tensors-00000.safetensors",))


@case("dump-int64-beyond-float64")
def _(root, raw):
    """2**62 vs 2**62 + 100: one float64, two int64 codes: compare must FAIL (exit 1), report written."""
    a = _small_dump(root / "A", torch.tensor([[2**62, 5]]), "predicted_codes", None)
    b = _small_dump(root / "B", torch.tensor([[2**62 + 100, 5]]), "predicted_codes", None)
    out = root / "r.json"

    def after(root, run):
        t = json.loads(out.read_text())["tensors"][0]
        assert t["passed"] is False and t["n_failed"] == 1 and t["exact"] is True

    return Case(["compare", a, b, "--json", out, "--no-progress"], [a, b], rc=1, out=out,
                stdout_has=("FAIL", "1/2 elements differ"), after=after)


@case("tolerances-fifo")
def _(root, raw):
    a = _small_dump(root / "A")
    fifo = root / "tol.json"
    os.mkfifo(fifo)
    return Case(["compare", a, a, "--tolerances", fifo, "--no-progress"], [a, fifo],
                names=("tol.json", "not a regular file"))


@case("tolerances-string-number")
def _(root, raw):
    a = _small_dump(root / "A")
    tol = root / "tol.json"
    tol.write_text(json.dumps({"per_name": {"logits": {"atol": "1e-3", "rtol": 0}}}))
    return Case(["compare", a, a, "--tolerances", tol, "--no-progress"], [a, tol],
                names=("tol.json", "per_name['logits'].atol"))


@case("plot-tex-names")
def _(root, raw):
    from parity.dump import write_dump

    names = ["$\\frac{a}{$", "a$b$", "$\\nosuchcommand$"]
    a = write_dump(root / "A", [(n, None, torch.ones(2)) for n in names], source="reference")
    b = write_dump(root / "B", [(n, None, torch.ones(2) * 3) for n in names], source="reference")
    png = root / "p.png"

    def after(root, run):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mplrc = Path(tempfile.mkdtemp(prefix="mplconfig-", dir=root.parent))  # matplotlib's own cache goes there

    (mplrc / "matplotlibrc").write_text("text.usetex: True\n")  # the user's rc asks for LaTeX (absent here)
    return Case(["compare", a, b, "--plot", png, "-q", "--no-progress"], [a, b, mplrc / "matplotlibrc"], rc=1,
                out=png, env={"MPLCONFIGDIR": str(mplrc)}, after=after)


# ------------------------------------------------------------------------------------------- debug trees


GEN = ["--generation", "fork_c6ff2312", "--no-cfg"]  # the generation small_tree's names belong to


def _ingest(root: Path, *more) -> list:
    return ["ingest-trtllm", root / "run", "--out", root / "ing", *GEN, *more]


@case("tree-fifo-logits")
def _(root, raw):
    d = small_tree(root / "run")
    it1 = d.parent / "iteration_1"
    it1.mkdir()
    os.mkfifo(it1 / "logits.npy")
    return Case(_ingest(root), [root / "run"], names=("iteration_1", "logits.npy", "FIFO"), out=root / "ing")


NPY_KINDS = {
    "big-endian": np.ones(3, ">f4"),
    "float128": np.ones(3, np.longdouble),
    "structured": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]),
    "datetime": np.array(["2020-01-01"], dtype="datetime64[D]"),
    "unicode": np.array(["abc"]),
}


def _npy_case(kind):
    def build(root, raw):
        d = small_tree(root / "run")
        np.save(d / "decoder_layer_1_output.npy", NPY_KINDS[kind])
        return Case(_ingest(root), [root / "run"], names=("decoder_layer_1_output.npy", ".npy dtype"),
                    out=root / "ing")

    return build


for _key in NPY_KINDS:
    case(f"tree-npy-{_key}")(_npy_case(_key))


@case("tree-unicode-digit-iteration")
def _(root, raw):
    d = small_tree(root / "run")
    (d.parent / "iteration_\u00b2").mkdir()
    return Case(_ingest(root), [root / "run"], names=("non-numeric iteration",), out=root / "ing")


@case("tree-symlinked-logits")
def _(root, raw):
    d = small_tree(root / "run")
    (root / "elsewhere.npy").write_bytes(b"secret bytes outside the tree")
    it1 = d.parent / "iteration_1"
    it1.mkdir()
    (it1 / "logits.npy").symlink_to(root / "elsewhere.npy")
    return Case(_ingest(root), [root / "run", root / "elsewhere.npy"], names=("logits.npy", "symbolic link"),
                out=root / "ing")


@case("tree-symlinked-iteration")
def _(root, raw):
    d = small_tree(root / "run")
    outside = root / "outside"
    outside.mkdir()
    np.save(outside / "decoder_layer_0_output.npy", np.ones((3, 4), np.float32))
    (d.parent / "iteration_1").symlink_to(outside, target_is_directory=True)
    return Case(_ingest(root), [root / "run", outside], names=("iteration_1", "symbolic link"), out=root / "ing")


# ---------------------------------------------------------------------------------------------- build


def _build_case(content: bytes, what: str):
    def build(root, raw):
        ck = root / "ckpt"
        for comp in ("encoder", "decoder"):
            (ck / comp).mkdir(parents=True)
            (ck / comp / "config.json").write_bytes(content)
        return Case(["build", "--ckpt-dir", ck, "--engine-dir", root / "engines"], [ck],
                    names=("config.json", what), out=root / "engines")

    return build


case("build-config-is-a-list")(_build_case(b"[1, 2, 3]", "object"))
case("build-config-not-utf8")(_build_case(b"\xff\xfe\x00{bad", "UTF-8"))


# ------------------------------------------------------------------------------ outputs never touch inputs


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


@case("loss-compare-json-onto-manifest")
def _(root, raw):
    a = _small_dump(root / "A")
    return Case(["compare", a, a, "--json", a / "manifest.json"], [a], names=("--json", "dump a", "manifest.json"))


@case("loss-compare-plot-onto-shard")
def _(root, raw):
    a, b = _small_dump(root / "A"), _small_dump(root / "B")
    shard = a / "tensors-00000.safetensors"
    return Case(["compare", a, b, "--plot", shard], [a, b], names=("--plot", "dump a", shard))


@case("loss-compare-json-onto-users-file")
def _(root, raw):
    a = _small_dump(root / "A")
    notes = root / "notes.json"
    notes.write_text('{"my": "notes"}')
    return Case(["compare", a, a, "--json", notes, "-q"], [a, notes], names=("--json", notes, "refusing to replace"))


@case("loss-ingest-out-is-its-tree")
def _(root, raw):
    small_tree(root / "run")
    return Case(["ingest-trtllm", root / "run", "--out", root / "run", "--overwrite"], [root / "run"],
                names=("--out", "TREE", root / "run"))


@case("loss-ingest-out-is-the-trees-parent")
def _(root, raw):
    small_tree(root / "work" / "run")
    return Case(["ingest-trtllm", root / "work" / "run", "--out", root / "work", "--overwrite"], [root / "work"],
                names=("--out", "contains the input TREE"))


@case("loss-dump-out-holds-its-checkpoint")
def _(root, raw):
    ck = _copy(CKPT, root / "work" / "m.nemo")
    return Case(["dump", "--checkpoint", ck, "--batch", BATCH, "--out", root / "work", "--overwrite"], [ck, BATCH],
                names=("--out", "contains the input --checkpoint", ck))


@case("loss-dump-out-holds-its-batch")
def _(root, raw):
    b = _copy(BATCH, root / "work" / "b.safetensors")
    return Case(["dump", "--checkpoint", CKPT, "--batch", b, "--out", root, "--overwrite"], [CKPT, b],
                names=("--out", "contains the input --batch", b))


@case("loss-convert-out-the-checkpoints-parent")
def _(root, raw):
    ck = _copy(CKPT, root / "models" / "m.nemo")
    return Case(["convert", "--checkpoint", ck, "--out", root / "models", "--overwrite"], [ck],
                names=("--out", "contains the input --checkpoint"))


@case("loss-infer-out-is-its-inputs")
def _(root, raw):
    b = _copy(BATCH, root / "b.safetensors")
    return Case(["infer", "--checkpoint", CKPT, "--inputs", b, "--out", b], [CKPT, b],
                names=("--out", "is the input --inputs", b))


@case("loss-check-plot-inside-fixtures")
def _(root, raw):
    fx = root / "fx"
    for suffix in (".nemo", ".batch.safetensors", ".nemo_dump"):
        _copy(FIXTURES / f"released_small{suffix}", fx / f"released_small{suffix}")
    return Case(["check", "--fixtures", fx, "--plot", fx / "plots"], [fx], names=("--plot", "--fixtures"))


@case("loss-dump-overwrite-onto-notes")
def _(root, raw):
    notes = root / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    return Case(["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", notes, "--overwrite"], [notes, CKPT, BATCH],
                names=("--out", notes, "not a magpie-parity dump"))


@case("loss-infer-out-onto-users-file")
def _(root, raw):
    f = root / "keep.safetensors"
    shutil.copy(BATCH, f)
    return Case(["infer", "--checkpoint", CKPT, "--inputs", BATCH, "--out", f], [CKPT, BATCH, f],
                names=("--out", f, "not a codes file"))


@case("loss-bench-data-onto-users-file")
def _(root, raw):
    f = root / "keep.json"
    f.write_text('{"mine": 1}')
    return Case(["bench-data", "--out", f, "--samples", "1"], [f], names=("--out", f, "not a benchmark dataset"))


# ------------------------------------------------------------------------------------------ full disk


def _full_tmpfs(root: Path) -> Path:
    """A 256 KB tmpfs at root/full, filled to the last byte: every write there fails with ENOSPC."""
    full = root / "full"
    full.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True)
    if proc.returncode != 0:
        raise _Skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode}); the full-disk "
                    "paths are covered by the monkeypatched tests in tests/parity and tests/trt")
    _MOUNTS.append(full)
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return full


def _enospc_case(make_argv, out_name: str):
    def build(root, raw):
        full = _full_tmpfs(root)
        out = full / out_name
        argv, inputs = make_argv(root, out)
        return Case(argv, inputs, names=(f"{out}: cannot write", "No space left on device"), out=out,
                    rss_limit_kb=2 * RSS_LIMIT_KB)  # these build and run the model before the write fails

    return build


def _enospc_compare(flag):
    def make(root, out):
        a = _small_dump(root / "A")
        return ["compare", a, a, flag, out, "-q", "--no-progress"], [a]

    return make


ENOSPC = {
    "infer-dump": (lambda root, out: (["infer", "--checkpoint", CKPT, "--inputs", BATCH, "--out",
                                       root / "c.safetensors", "--dump", out, "--param", "topk=1",
                                       "--param", "max_decoder_steps=5"], [CKPT, BATCH]), "d"),
    "infer-out": (lambda root, out: (["infer", "--checkpoint", CKPT, "--inputs", BATCH, "--out", out,
                                      "--param", "topk=1", "--param", "max_decoder_steps=5"], [CKPT, BATCH]),
                  "c.safetensors"),
    "dump": (lambda root, out: (["dump", "--checkpoint", CKPT, "--batch", BATCH, "--out", out], [CKPT, BATCH]), "d"),
    "convert": (lambda root, out: (["convert", "--checkpoint", CKPT, "--out", out], [CKPT]), "ckpt"),
    "ingest": (lambda root, out: (["ingest-trtllm", small_tree(root / "run").parents[3], "--out", out, *GEN],
                                  [root / "run"]), "ing"),
    "compare-json": (_enospc_compare("--json"), "r.json"),
    "compare-plot": (_enospc_compare("--plot"), "r.png"),
    "bench-data": (lambda root, out: (["bench-data", "--out", out, "--samples", "2"], []), "b.json"),
}
for _key, (_make, _name) in ENOSPC.items():
    case(f"enospc-{_key}", slow=True)(_enospc_case(_make, _name))


# ------------------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_mid_dump_leaves_no_temp_folder(tmp_path):
    """A CI timeout's SIGTERM while a dump is being written: the writer's cleanup runs, exit 143, nothing left."""
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "parity.cli", "dump", "--mode", "infer", "--checkpoint", str(CKPT), "--batch",
           str(BATCH), "--out", str(out), "--layers", "--param", "topk=1", "--param", "max_decoder_steps=400"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".d.tmp-") for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the dump never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- hypothesis, in-process


def _main(argv) -> tuple[int, str, str]:
    from parity.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line_naming(err: str, *names) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert any(str(n) in lines[0] for n in names), (names, lines[0])


HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])


@pytest.fixture(scope="module")
def raw_weights(raw):
    return weights_bytes(raw.state_dict)


FIELDS = st.one_of(st.tuples(st.just("top"), st.sampled_from(TOP_KEYS)),
                   st.tuples(st.sampled_from(["encoder", "decoder"]), st.sampled_from(TRANSFORMER_KEYS)))


@settings(HYPOTHESIS, max_examples=60)
@given(field_=FIELDS, value=JUNK)
def test_any_config_value_through_convert(tmp_path, raw, raw_weights, field_, value):
    """convert on a checkpoint whose config holds any value in any field: exit 0, or 2 with one line naming the
    checkpoint; never a traceback."""
    where, key = field_
    cfg = copy.deepcopy(raw.config)
    (cfg if where == "top" else cfg[where])[key] = value
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    ck = nemo_from_bytes(work / "crafted.nemo", yaml.safe_dump(cfg), raw_weights)
    rc, _, err = _main(["convert", "--checkpoint", ck, "--out", work / "out"])
    event(f"exit {rc}")
    assert rc in (0, 2), err
    if rc == 2:
        _one_line_naming(err, ck)
    shutil.rmtree(work)


NPY_DESCR = st.one_of(st.sampled_from(["<f4", "<f2", "<i8", "|b1", "|u1", ">f4", "<f16", "|O", "<U3", "<M8[D]",
                                       "<c8", "V8", "bogus", ""]),
                      st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["<f4", "<i4"])), max_size=2),
                      JUNK)
NPY_SHAPE = st.one_of(st.tuples(st.integers(-2, 5), st.integers(-2, 5)), st.tuples(st.integers(0, 10**12)),
                      st.lists(st.integers(0, 4), max_size=3), JUNK)


# headers the tree accepts (3 tokens, any width, a float dtype) among everything else
SANE_HEADER = st.tuples(st.sampled_from(["<f4", "<f2", "<f8"]), st.just(False), st.tuples(st.just(3),
                                                                                          st.integers(1, 6)))
ANY_HEADER = st.tuples(NPY_DESCR, st.one_of(st.booleans(), JUNK), NPY_SHAPE)


@settings(HYPOTHESIS, max_examples=60)
@given(parts=st.one_of(SANE_HEADER, ANY_HEADER),
       extra=st.dictionaries(st.sampled_from(["x", "descr2"]), st.integers(), max_size=1),
       data=st.one_of(st.none(), st.binary(max_size=64)),
       raw_text=st.one_of(st.none(), st.none(), st.binary(max_size=80)),
       major=st.sampled_from([1, 2]))
def test_any_npy_header_through_ingest(tmp_path, parts, extra, data, raw_text, major):
    """ingest-trtllm on a tree holding one .npy with any header (parsed dict or raw bytes, any version) and any
    data (or exactly the bytes a sane header declares): exit 0, or 2 with one line naming that file (or its tree);
    never a traceback, never an allocation the file cannot back."""
    descr, fortran, shape = parts
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    d = small_tree(work / "run")
    if data is None:  # the bytes the header declares, where that is computable
        try:
            data = bytes(int(np.dtype(descr).itemsize) * int(np.prod(shape, dtype=np.int64)))
        except Exception:
            data = b""
        data = data[:4096]
    header = raw_text if raw_text is not None else repr(
        {"descr": descr, "fortran_order": fortran, "shape": shape, **extra}).encode()
    npy_raw_header(d / "decoder_layer_0_output.npy", header, data, major=major)
    rc, _, err = _main(["ingest-trtllm", work / "run", "--out", work / "ing", *GEN])
    event(f"exit {rc}")
    assert rc in (0, 2), err
    if rc == 2:
        _one_line_naming(err, "decoder_layer_0_output.npy", work / "run")
    shutil.rmtree(work)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def dump_pair(tmp_path_factory):
    from parity.dump import write_dump

    root = tmp_path_factory.mktemp("manifests")
    ts = [("logits", 0, torch.randn(2, 3)), ("predicted_codes", None, torch.arange(4)),
          ("decoder.layers.0", 1, torch.randn(1, 2, 4).half())]
    return (write_dump(root / "A", ts, source="trtllm", config_hash="h", layout={"use_cfg": False}),
            write_dump(root / "B", ts, source="reference", config_hash="h", layout={"use_cfg": False}))


@HYPOTHESIS
@given(data=st.data(), value=JUNK, delete=st.booleans(), fix_digest=st.booleans())
def test_any_manifest_edit_through_compare(tmp_path, dump_pair, data, value, delete, fix_digest):
    """compare on a dump whose manifest has any one field replaced by any value (or deleted), its digest fixed up
    or not: exit 0/1, or 2 with one line naming the dump; never a traceback."""
    from parity.dump import MANIFEST_NAME, _manifest_digest

    a, b = dump_pair
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    crafted = shutil.copytree(a, work / "A")
    manifest = json.loads((crafted / MANIFEST_NAME).read_text())
    paths = [p for p, _ in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    if fix_digest and isinstance(manifest, dict):
        manifest.pop("manifest_sha256", None)
        manifest["manifest_sha256"] = _manifest_digest(manifest)
    (crafted / MANIFEST_NAME).write_text(json.dumps(manifest))
    rc, _, err = _main(["compare", crafted, b, "-q", "--no-progress"])
    event(f"exit {rc}")
    assert rc in (0, 1, 2), err
    if rc == 2:
        _one_line_naming(err, crafted)
    shutil.rmtree(work)
