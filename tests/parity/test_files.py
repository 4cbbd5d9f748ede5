"""parity.files: atomic writes get the umask's mode (not mkstemp's 0600) and errors name the user's path."""

from __future__ import annotations

import os
import stat

import pytest

from parity.files import atomic_write_bytes, current_umask, honour_umask


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_current_umask_reads_without_changing(umask_027):
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_atomic_write_honours_the_umask(tmp_path, umask_027):
    p = tmp_path / "r.json"
    atomic_write_bytes(p, b"{}")
    assert p.read_bytes() == b"{}" and _mode(p) == 0o640
    atomic_write_bytes(p, b"[]")  # replacing keeps the rule
    assert p.read_bytes() == b"[]" and _mode(p) == 0o640
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_honour_umask_fixes_mkstemp_and_mkdtemp_modes(tmp_path, umask_027):
    import tempfile

    fd, f = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    d = tempfile.mkdtemp(dir=tmp_path)
    assert _mode(f) == 0o600 and _mode(d) == 0o700
    honour_umask(f)
    honour_umask(d)
    assert _mode(f) == 0o640 and _mode(d) == 0o750


def test_write_error_names_the_users_path_not_the_temp_file(tmp_path):
    target = tmp_path / "out.json"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty folder cannot be replaced by a file
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"{}")
    assert e.value.filename == str(target) and ".tmp" not in str(e.value)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.json"]  # the temp file is gone
    under_a_file = tmp_path / "out.json" / "keep" / "r.json"
    with pytest.raises(OSError) as e:
        atomic_write_bytes(under_a_file, b"{}")
    assert e.value.filename == str(under_a_file)
