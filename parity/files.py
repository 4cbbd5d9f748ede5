"""Writing output files, the one way: atomically (a temp file in the same folder, then a rename), with the mode a
plain ``open(path, "w")`` would give (``0o666 & ~umask``, where ``mkstemp`` alone gives ``0o600``), and errors
that name the caller's path, never the temporary file. Imports nothing of the project."""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read (set and restore)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode of a new folder: ``0o777 & ~umask`` (``mkdtemp`` alone gives ``0o700``)."""
    return 0o777 & ~current_umask()


def _named(exc: OSError, path: pathlib.Path) -> OSError:
    """The same error, naming ``path`` (the user's) instead of a temporary file."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path)) if exc.errno else OSError(f"{path}: {exc}")


def atomic_write(path: PathLike, write: Callable[[object], None]) -> pathlib.Path:
    """Write ``path`` through ``write(binary_file)`` into a temp file beside it, then rename it into place.

    Readers see the old file or the new one, never a part. The folder must exist. On failure the temp file is
    removed and the OSError names ``path``."""
    p = pathlib.Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
        os.replace(tmp, p)
    except OSError as exc:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
        raise _named(exc, p) from None
    except BaseException:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda fh: fh.write(data))


def honour_umask(path: PathLike) -> pathlib.Path:
    """Give a file or folder made through ``mkstemp``/``mkdtemp`` (0600/0700) the mode a plain create would."""
    p = pathlib.Path(path)
    try:
        os.chmod(p, folder_mode() if p.is_dir() else file_mode())
    except OSError as exc:
        raise _named(exc, p) from None
    return p


def read_head(path: PathLike, n: int = 65536) -> bytes | None:
    """The first ``n`` bytes of ``path`` if it is a regular file (a link is not followed, a FIFO never blocks);
    ``None`` otherwise. How the output checks recognise a file this tool wrote before replacing it."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, n)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_safetensors_header(path: PathLike, limit: int) -> dict | None:
    """The JSON header of a safetensors file, if ``path`` is a regular file whose header fits in ``limit`` bytes and
    parses to an object; ``None`` otherwise. Only the head of the file is read (:func:`read_head`)."""
    import json
    import struct

    head = read_head(path, 8 + limit)
    if head is None or len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n > len(head) - 8:
        return None
    try:
        header = json.loads(head[8:8 + n])
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(head: bytes) -> dict[str, str]:
    """The ``tEXt`` chunks (keyword -> text, Latin-1) found in ``head``, the first bytes of a PNG, before its image
    data; ``{}`` for anything that is not a PNG."""
    import struct

    out: dict[str, str] = {}
    if not head.startswith(PNG_SIGNATURE):
        return out
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        if kind == b"IDAT" or pos + 12 + length > len(head):
            break
        if kind == b"tEXt":
            key, _, text = head[pos + 8:pos + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length
    return out
