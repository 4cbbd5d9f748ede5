"""No file under fixtures/ records anything of the machine that made it (absolute paths, user names, times).

Every file is scanned as bytes; archives are also opened in memory (never extracted) and every member scanned,
recursively: a ``.nemo`` is a tar whose ``model_weights.ckpt`` is a zip, a Lightning ``.ckpt`` is a zip.
The MagpieTTS archives record their codec (``codecmodel_path``) relative to the fixture folder.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import FIXTURES, REPO

# Literal markers of a machine path. They are long enough not to turn up by chance in the tensors' bytes
# (a bare drive letter such as b"C:\\" is not: random float32 data holds such 3-byte runs).
MARKERS = [
    b"/work/", b"/tmp/", b"/root/", b"/home/", b"/Users/", b"/var/folders/", b"/private/var/", b"/mnt/",
    b"/scratch/", b"file://", b"C:\\\\", b"\\Users\\", b"\\\\Users\\\\",
]
WINDOWS = re.compile(rb"[A-Za-z]:(?:\\\\|\\|/)(?:Users|Windows|Documents and Settings|ProgramData|Temp)\b", re.I)

FILES = sorted(p for p in (REPO / "fixtures").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _hits(data: bytes) -> list[bytes]:
    found = []
    for m in MARKERS:
        i = data.find(m)
        if i >= 0:
            found.append(data[max(0, i - 40) : i + 80])
    found += [data[max(0, m.start() - 40) : m.end() + 80] for m in WINDOWS.finditer(data)]
    return found


def _members(name: str, data: bytes):
    """(name, bytes) of ``data`` and, recursively, of every member of a tar or zip archive, read in memory."""
    yield name, data
    if data[257:262] == b"ustar" or name.endswith(".nemo"):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for m in tf.getmembers():
                meta = " ".join([m.name, m.linkname, m.uname, m.gname, *map(str, m.pax_headers.values())])
                yield f"{name}:{m.name} (tar header)", meta.encode()
                if m.isfile():
                    yield from _members(f"{name}:{m.name}", tf.extractfile(m).read())
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                yield f"{name}:{info.filename} (zip header)", (info.filename + info.comment.decode(errors="replace")).encode()
                yield from _members(f"{name}:{info.filename}", zf.read(info))


def test_fixtures_are_found():
    assert any(p.suffix == ".nemo" for p in FILES) and any(p.suffix == ".ckpt" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_machine_path(path: Path):
    bad = {name: hits for name, data in _members(path.relative_to(REPO).as_posix(), path.read_bytes())
           if (hits := _hits(data))}
    assert not bad, f"machine paths recorded: {bad}"


def test_markers_catch_what_they_should():
    """The scan sees a path in a config member of a .nemo, and in the pickle of a zip inside it."""
    cfg = b"codecmodel_path: /home/someone/fixtures/data/codec_2cb.nemo\n"
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02X\x0e\x00\x00\x00C:\\Users\\me\\x.")
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in [("./model_config.yaml", cfg), ("./model_weights.ckpt", zbuf.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    named = {n for n, d in _members("x.nemo", tbuf.getvalue()) if _hits(d)}
    assert {"x.nemo:./model_config.yaml", "x.nemo:./model_weights.ckpt:archive/data.pkl"} <= named


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.nemo")), ids=lambda p: p.name)
def test_nemo_tar_headers_are_fixed(path: Path):
    """Reproducible archives: fixed times and owners, no user name, no extended headers."""
    with tarfile.open(path, "r:") as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.pax_headers) == (0, 0, 0, "", "", {}), (path.name, m.name)


@pytest.mark.parametrize("path", sorted(p for p in FIXTURES.glob("*.nemo") if not p.name.startswith("codec_")),
                         ids=lambda p: p.name)
def test_codec_is_recorded_relative_to_the_fixture_folder(path: Path):
    with tarfile.open(path, "r:") as tf:
        cfg = yaml.safe_load(tf.extractfile("./model_config.yaml").read())
    recorded = cfg["codecmodel_path"]
    assert not Path(recorded).is_absolute() and "\\" not in recorded, recorded
    assert (path.parent / recorded).is_file(), recorded


@pytest.mark.nemo
def test_nemo_restores_with_the_codec_beside_the_archive(tmp_path, monkeypatch):
    """``magpie-parity``'s NeMo loader resolves the recorded codec against the archive's folder, not the working
    directory: a same-named file in the working directory is not taken for the codec."""
    from parity.commands import _load_nemo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "codec_2cb.nemo").write_bytes(b"not a codec")
    model = _load_nemo(str(FIXTURES / "released_small.nemo"), None)
    assert Path(model.cfg.codecmodel_path) == FIXTURES.resolve() / "codec_2cb.nemo"
