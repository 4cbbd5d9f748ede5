"""The magpie-parity dump format: a directory of safetensors shards plus ``manifest.json``.

Layout of a dump directory::

    manifest.json          # written last; a dump without it (or without "complete": true) is not a dump
    tensors-00000.safetensors
    tensors-00001.safetensors
    ...

The manifest lists tensors in execution order (the order ``DumpWriter.add`` saw them), each with its
canonical ``name`` (a module path such as ``decoder.layers.0.cross_attention``), its decode ``step``
(``None`` for once-per-run tensors), the shard ``file`` and the ``key`` inside it, ``shape`` and
``dtype`` (torch dtype name).

Integrity, beyond the contract's fields (all optional for readers, written by ``DumpWriter``):

* ``tensors[i].crc32``: CRC-32 of the tensor's raw bytes. A full SHA-256 costs ~0.5 s/GB on one core,
  which would halve the comparison throughput; CRC-32 runs at ~7 GB/s and still catches truncation,
  torn writes and bit rot. (A ``sha256`` written by another producer is verified too.)
* ``files``: per shard ``{"size": bytes, "header_crc32": crc}`` so a damaged safetensors header is
  caught when the dump is opened, not when a tensor is read.
* ``manifest_sha256``: SHA-256 of the canonical JSON of the manifest without this key. Manifests are
  write-once; an edited or damaged manifest is rejected instead of silently comparing something else.

Writers stream each tensor straight into the current shard (memory stays bounded by one tensor): the
shard begins with a fixed-size header area that is filled in, space-padded as the safetensors spec
allows, when the shard is closed. Dumps are published atomically: everything is written into a hidden
sibling directory, fsynced, then renamed to ``out_dir``.

Readers treat every byte on disk as untrusted; all problems raise :class:`DumpError` naming the file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import pathlib
import secrets
import shutil
import struct
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

FORMAT = "magpie-parity-dump"
VERSION = 1
SOURCES = ("reference", "nemo", "trtllm")
MANIFEST_NAME = "manifest.json"

# Fixed header area at the start of each shard. ~130 bytes of header per tensor, so one shard holds
# ~2000 tensors before a new shard is started; the unused part is spaces (valid safetensors padding).
HEADER_RESERVE = 256 * 1024
COMPACT_MAX_DATA = 16 * 2**20
# Every top-level manifest key a reader accepts (what DumpWriter writes).
_MANIFEST_KEYS = {"format", "version", "source", "config_hash", "dtype", "inputs", "layout", "meta", "complete",
                  "tensors", "files", "manifest_sha256"}  # shards with at most this much data are rewritten without the header reserve
# Safetensors headers beyond this are corrupt, not big: refuse before allocating.
_MAX_MANIFEST_BYTES = 256 * 2**20

# torch dtype name -> (safetensors dtype code, torch dtype)
_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float64": ("F64", torch.float64),
    "float32": ("F32", torch.float32),
    "float16": ("F16", torch.float16),
    "bfloat16": ("BF16", torch.bfloat16),
    "int64": ("I64", torch.int64),
    "int32": ("I32", torch.int32),
    "int16": ("I16", torch.int16),
    "int8": ("I8", torch.int8),
    "uint8": ("U8", torch.uint8),
    "bool": ("BOOL", torch.bool),
}
for _n, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _n):
        _DTYPES[_n] = (_code, getattr(torch, _n))
_TORCH_TO_NAME = {dt: name for name, (_, dt) in _DTYPES.items()}
_CODE_TO_NAME = {code: name for name, (code, _) in _DTYPES.items()}


class DumpError(Exception):
    """Any problem with a dump on disk or with how it is being written. The message names the file."""


class DumpExistsError(DumpError, FileExistsError):
    """``out_dir`` already exists and ``overwrite`` was not requested."""


class MissingTensorError(DumpError, KeyError):
    """A (name, step) that the dump does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical dtype name used in manifests ("float32", "bfloat16", ...)."""
    try:
        return _TORCH_TO_NAME[dtype]
    except KeyError:
        raise DumpError(f"unsupported dtype {dtype}; supported: {', '.join(_DTYPES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name][1]
    except KeyError:
        raise DumpError(f"unsupported dtype {name!r}; supported: {', '.join(_DTYPES)}") from None


def tensor_key(name: str, step: int | None) -> str:
    """Key of a tensor inside its safetensors shard."""
    return f"{name}@{'none' if step is None else step}"


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical_json(body)).hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, without a copy (works for bf16/fp8, which numpy lacks)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------- writer


class _Shard:
    """One safetensors file being written: header area reserved up front, data streamed after it."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.fh = open(path, "wb")
        self.fh.seek(8 + HEADER_RESERVE)
        self.header: dict[str, dict] = {}
        self.header_len = len(_canonical_json({"__metadata__": {"format": FORMAT}}))
        self.data_bytes = 0

    def entry_header_len(self, key: str, code: str, shape: list[int], nbytes: int) -> int:
        item = {key: {"dtype": code, "shape": shape, "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}}
        return len(_canonical_json(item)) + 1  # +1 for the separating comma

    def write(self, key: str, code: str, shape: list[int], data: memoryview) -> int:
        nbytes = data.nbytes
        self.header_len += self.entry_header_len(key, code, shape, nbytes)
        self.header[key] = {"dtype": code, "shape": shape, "data_offsets": [self.data_bytes, self.data_bytes + nbytes]}
        if nbytes:
            self.fh.write(data)
        self.data_bytes += nbytes
        return zlib.crc32(data)

    def finish(self) -> dict:
        header = dict(self.header)
        header["__metadata__"] = {"format": FORMAT}
        raw = _canonical_json(header)
        if len(raw) > HEADER_RESERVE:  # guarded by DumpWriter.add; kept as an invariant check
            raise DumpError(f"{self.path}: header of {len(raw)} bytes exceeds the reserved {HEADER_RESERVE}")
        if self.data_bytes <= COMPACT_MAX_DATA:
            # Small shard: rewrite it with a tight header instead of the reserve (the reserve would dominate
            # small dumps such as the test fixtures). Large shards keep the reserve: no second copy of the data.
            raw = raw + b" " * ((-len(raw)) % 8)  # safetensors aligns the data start to 8 bytes
            self.fh.flush()
            with open(self.path, "rb") as src:
                src.seek(8 + HEADER_RESERVE)
                data = src.read(self.data_bytes)
            self.fh.seek(0)
            self.fh.write(struct.pack("<Q", len(raw)))
            self.fh.write(raw)
            self.fh.write(data)
            self.fh.truncate()
        else:
            raw = raw + b" " * (HEADER_RESERVE - len(raw))
            self.fh.seek(0)
            self.fh.write(struct.pack("<Q", len(raw)))
            self.fh.write(raw)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"size": 8 + len(raw) + self.data_bytes, "header_crc32": zlib.crc32(raw)}

    def abort(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


def is_dump(path: str | os.PathLike) -> bool:
    """A real directory (not a link) whose manifest says it is a magpie-parity dump: what ``overwrite`` may replace."""
    p = pathlib.Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    m = p / MANIFEST_NAME
    try:
        if m.is_symlink() or not m.is_file() or m.stat().st_size > _MAX_MANIFEST_BYTES:
            return False
        return json.loads(m.read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_replaceable(path: str | os.PathLike) -> None:
    """``overwrite`` replaces only what this tool wrote: a dump, or an empty directory; never a link, a file, or a
    folder of someone's notes."""
    p = pathlib.Path(path)
    if is_dump(p):
        return
    if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
        return
    raise DumpExistsError(f"{p}: exists and is not a magpie-parity dump; --overwrite only replaces a dump it "
                          "wrote (choose another --out)")


def _cleanup_tmp(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class DumpWriter:
    """Write a dump. Use as a context manager; on an exception nothing is published.

    Tensors are written to disk inside :meth:`add` (after ``detach().cpu().contiguous()``), so later
    in-place changes to a reused buffer (KV caches, hooks) do not leak into the dump.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        source: str,
        config_hash: str | None = None,
        dtype: str = "float32",
        inputs: dict | None = None,
        layout: dict | None = None,
        meta: dict | None = None,
        shard_bytes: int = 512 * 2**20,
        overwrite: bool = False,
    ):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if config_hash is not None and not isinstance(config_hash, str):
            raise TypeError("config_hash must be a str or None")
        if shard_bytes <= 0:
            raise ValueError("shard_bytes must be positive")
        self.out_dir = pathlib.Path(out_dir)
        if os.path.lexists(self.out_dir):
            if not overwrite:
                raise DumpExistsError(f"{self.out_dir}: already exists (pass --overwrite / overwrite=True to replace it)")
            check_replaceable(self.out_dir)
        self._manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "source": source,
            "config_hash": config_hash,
            "dtype": dtype,
            "inputs": dict(inputs or {}),
            "layout": dict(layout or {}),
            "meta": dict(meta or {}),
        }
        # Fail now, not at close(), if the free-form dicts are not JSON.
        try:
            _canonical_json(self._manifest)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"inputs/layout/meta must be JSON-serialisable: {exc}") from None
        self._overwrite = overwrite
        self._shard_bytes = shard_bytes
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{secrets.token_hex(6)}"
        self._tmp.mkdir()
        # An abandoned writer (never closed) must not leave its hidden directory behind.
        self._finalizer = weakref.finalize(self, _cleanup_tmp, str(self._tmp))
        self._entries: list[dict] = []
        self._seen: set[tuple[str, int | None]] = set()
        self._files: dict[str, dict] = {}
        self._shard: _Shard | None = None
        self._n_shards = 0
        self._state = "open"  # open -> closed | aborted

    def __enter__(self) -> "DumpWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()
        return False

    def add(self, name: str, tensor: torch.Tensor, step: int | None = None) -> None:
        if self._state != "open":
            raise ValueError(f"DumpWriter for {self.out_dir} is {self._state}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, got {step!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if (name, step) in self._seen:
            raise ValueError(f"duplicate tensor {name!r} at step {step} in dump {self.out_dir}")
        dname = dtype_name(tensor.dtype)
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        code = _DTYPES[dname][0]
        key = tensor_key(name, step)
        shape = [int(s) for s in t.shape]
        data = _tensor_bytes(t)
        shard = self._shard_for(key, code, shape, data.nbytes)
        try:
            crc = shard.write(key, code, shape, data)
        except BaseException:
            self.abort()
            raise
        self._seen.add((name, step))
        self._entries.append(
            {"name": name, "step": step, "file": shard.path.name, "key": key, "shape": shape, "dtype": dname, "crc32": crc}
        )

    def _shard_for(self, key: str, code: str, shape: list[int], nbytes: int) -> _Shard:
        s = self._shard
        if s is not None:
            too_big = s.data_bytes > 0 and s.data_bytes + nbytes > self._shard_bytes
            header_full = s.header_len + s.entry_header_len(key, code, shape, nbytes) > HEADER_RESERVE
            if too_big or header_full:
                self._close_shard()
                s = None
        if s is None:
            s = _Shard(self._tmp / f"tensors-{self._n_shards:05d}.safetensors")
            self._n_shards += 1
            if s.header_len + s.entry_header_len(key, code, shape, nbytes) > HEADER_RESERVE:
                s.abort()
                raise ValueError(f"tensor name too long for a shard header: {key[:80]}...")
            self._shard = s
        return s

    def _close_shard(self) -> None:
        if self._shard is not None:
            shard, self._shard = self._shard, None
            self._files[shard.path.name] = shard.finish()

    def close(self) -> pathlib.Path:
        """Flush shards, write the manifest, publish ``out_dir`` atomically. Idempotent."""
        if self._state == "closed":
            return self.out_dir
        if self._state != "open":
            raise ValueError(f"DumpWriter for {self.out_dir} was aborted")
        try:
            self._close_shard()
            manifest = dict(self._manifest)
            manifest["complete"] = True
            manifest["tensors"] = self._entries
            manifest["files"] = self._files
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            mpath = self._tmp / MANIFEST_NAME
            with open(mpath, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1, allow_nan=False)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self._tmp)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._finalizer.detach()
        return self.out_dir

    def _publish(self) -> None:
        parent = self.out_dir.parent
        if os.path.lexists(self.out_dir):
            if not self._overwrite:
                raise DumpExistsError(f"{self.out_dir}: appeared while the dump was being written")
            check_replaceable(self.out_dir)
            # Move the old dump aside first: readers see the old complete dump, briefly nothing,
            # then the new complete dump; never a mixture.
            old = parent / f".{self.out_dir.name}.old-{secrets.token_hex(6)}"
            os.rename(self.out_dir, old)
            os.rename(self._tmp, self.out_dir)
            _fsync_dir(parent)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.rename(self._tmp, self.out_dir)
            _fsync_dir(parent)

    def abort(self) -> None:
        """Discard everything written so far; ``out_dir`` is left untouched."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        self._finalizer()  # removes the temp dir


def write_dump(
    out_dir: str | os.PathLike, tensors: Iterable[tuple[str, int | None, torch.Tensor]], **manifest_kw: Any
) -> pathlib.Path:
    """Write ``(name, step, tensor)`` triples, in order, as one dump. Keyword args go to :class:`DumpWriter`."""
    with DumpWriter(out_dir, **manifest_kw) as w:
        for name, step, tensor in tensors:
            w.add(name, tensor, step)
        return w.close()


# --------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class TensorEntry:
    name: str
    step: int | None
    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    crc32: int | None = None
    sha256: str | None = None
    # Filled from the shard header by DumpReader: absolute offset of the first data byte, and length.
    data_offset: int = field(default=-1, compare=False, repr=False)
    nbytes: int = field(default=0, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][1]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(d) and 0 <= d < 2**62 for d in x) and len(x) <= 64


@dataclass
class _ShardInfo:
    path: pathlib.Path
    size: int
    data_start: int  # absolute offset of the data buffer (8 + header length)
    header: dict[str, dict]


class DumpReader:
    """Open and validate a dump. Tensors are read lazily; opening only reads the manifest and headers."""

    def __init__(self, path: str | os.PathLike):
        p = pathlib.Path(path)
        if p.name == MANIFEST_NAME and p.is_file():
            p = p.parent
        self.path = p
        if not p.is_dir():
            raise DumpError(f"{p}: not a dump directory (does not exist or is not a directory)")
        self._real = os.path.realpath(p)
        mpath = p / MANIFEST_NAME
        self.manifest_path = mpath
        if not mpath.is_file():
            raise DumpError(f"{mpath}: missing; {p} is not a complete dump (interrupted writer?)")
        try:
            size = mpath.stat().st_size
            if size > _MAX_MANIFEST_BYTES:
                raise DumpError(f"{mpath}: {size} bytes is too large for a manifest")
            raw = mpath.read_bytes()
        except OSError as exc:
            raise DumpError(f"{mpath}: cannot read: {exc}") from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DumpError(f"{mpath}: not valid JSON: {exc}") from None
        self.manifest: dict[str, Any] = manifest
        try:
            self._validate_manifest()
            self._open_shards()
        except DumpError:
            raise
        except (ValueError, TypeError, KeyError, OverflowError, AttributeError, RecursionError) as exc:
            # Safety net: a malformed manifest must surface as a DumpError, never as a crash.
            raise DumpError(f"{mpath}: malformed manifest: {type(exc).__name__}: {exc}") from None

    # -- validation

    def _bad(self, msg: str) -> DumpError:
        return DumpError(f"{self.manifest_path}: {msg}")

    def _validate_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise self._bad("top level must be a JSON object")
        if m.get("format") != FORMAT:
            raise self._bad(f"format is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("version") != VERSION or not _is_int(m.get("version")):
            raise self._bad(f"unsupported version {m.get('version')!r} (this reader knows {VERSION})")
        if m.get("complete") is not True:
            raise self._bad('not marked "complete": true; the dump was interrupted or is still being written')
        unknown = set(m) - _MANIFEST_KEYS
        if unknown:
            # A corrupted key name (e.g. of manifest_sha256) must not silently switch a check off.
            raise self._bad(f"unknown top-level key(s) {sorted(unknown)}")
        if "manifest_sha256" in m:
            if not isinstance(m["manifest_sha256"], str) or m["manifest_sha256"] != _manifest_digest(m):
                raise self._bad("manifest_sha256 does not match its contents (manifest edited or corrupt)")
        if m.get("source") not in SOURCES:
            raise self._bad(f"source {m.get('source')!r} is not one of {SOURCES}")
        if m.get("config_hash") is not None and not isinstance(m.get("config_hash"), str):
            raise self._bad("config_hash must be a string or null")
        if not isinstance(m.get("dtype"), str):
            raise self._bad("dtype must be a string")
        for k in ("inputs", "layout", "meta"):
            if not isinstance(m.get(k, {}), dict):
                raise self._bad(f"{k} must be an object")
        files = m.get("files", {})
        if not isinstance(files, dict):
            raise self._bad("files must be an object")
        for fname, info in files.items():
            self._check_file_name(fname)
            if not (isinstance(info, dict) and _is_int(info.get("size")) and _is_int(info.get("header_crc32", 0))):
                raise self._bad(f"files[{fname!r}] must hold an int size and header_crc32")
        tensors = m.get("tensors")
        if not isinstance(tensors, list):
            raise self._bad("tensors must be a list")
        entries: list[TensorEntry] = []
        index: dict[tuple[str, int | None], int] = {}
        for i, t in enumerate(tensors):
            where = f"tensors[{i}]"
            if not isinstance(t, dict):
                raise self._bad(f"{where} must be an object")
            name, step, fname, key = t.get("name"), t.get("step"), t.get("file"), t.get("key")
            if not isinstance(name, str) or not name:
                raise self._bad(f"{where}.name must be a non-empty string")
            if step is not None and not _is_int(step):
                raise self._bad(f"{where} ({name}): step must be an int or null")
            if not isinstance(key, str):
                raise self._bad(f"{where} ({name}): key must be a string")
            self._check_file_name(fname)
            if not _is_shape(t.get("shape")):
                raise self._bad(f"{where} ({name}): shape must be a list of non-negative ints")
            if t.get("dtype") not in _DTYPES:
                raise self._bad(f"{where} ({name}): unsupported dtype {t.get('dtype')!r}")
            crc, sha = t.get("crc32"), t.get("sha256")
            if crc is not None and not (_is_int(crc) and 0 <= crc < 2**32):
                raise self._bad(f"{where} ({name}): crc32 must be a 32-bit unsigned int")
            if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
                raise self._bad(f"{where} ({name}): sha256 must be 64 hex digits")
            if (name, step) in index:
                raise self._bad(f"duplicate tensor {name!r} at step {step}")
            index[(name, step)] = len(entries)
            entries.append(TensorEntry(name, step, fname, key, tuple(t["shape"]), t["dtype"], crc, sha))
        self._entries = entries
        self._index = index

    def _check_file_name(self, fname: Any) -> None:
        # The manifest is untrusted: a shard must be a plain file directly inside the dump directory.
        if (
            not isinstance(fname, str)
            or not fname
            or fname in (".", "..")
            or "/" in fname
            or "\\" in fname
            or "\x00" in fname
            or fname == MANIFEST_NAME
            or (os.altsep and os.altsep in fname)
        ):
            raise self._bad(f"file {fname!r} is not a plain file name inside the dump directory")

    def _open_shards(self) -> None:
        shards: dict[str, _ShardInfo] = {}
        for fname in dict.fromkeys(e.file for e in self._entries):
            shards[fname] = self._read_shard(fname)
        resolved = []
        for e in self._entries:
            sh = shards[e.file]
            h = sh.header.get(e.key)
            if h is None:
                raise DumpError(f"{sh.path}: has no tensor {e.key!r} (listed in {MANIFEST_NAME} for {e.name})")
            if _CODE_TO_NAME.get(h["dtype"]) != e.dtype:
                raise DumpError(f"{sh.path}: tensor {e.key!r} is {h['dtype']}, manifest says {e.dtype}")
            if tuple(h["shape"]) != e.shape:
                raise DumpError(f"{sh.path}: tensor {e.key!r} has shape {h['shape']}, manifest says {list(e.shape)}")
            start, end = h["data_offsets"]
            resolved.append(_replace_offsets(e, sh.data_start + start, end - start))
        self._entries = resolved
        self._shards = shards

    def _read_shard(self, fname: str) -> _ShardInfo:
        path = self.path / fname
        if not os.path.lexists(path):
            raise DumpError(f"{path}: missing (referenced by {self.manifest_path})")
        real = os.path.realpath(path)
        if os.path.dirname(real) != self._real or not os.path.isfile(real):
            raise DumpError(f"{path}: not a regular file inside {self.path} (symlink or special file)")
        try:
            with open(real, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(8)
                if len(head) < 8:
                    raise DumpError(f"{path}: truncated ({size} bytes; no safetensors header)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > size - 8:
                    raise DumpError(f"{path}: header length {hlen} exceeds the file ({size} bytes): truncated or corrupt")
                if hlen > HEADER_RESERVE:
                    # DumpWriter never writes more (its reserve): a larger header is crafted, and a header listing a
                    # million empty tensors would cost gigabytes to parse
                    raise DumpError(f"{path}: safetensors header of {hlen} bytes is larger than a dump's "
                                    f"{HEADER_RESERVE}-byte reserve: not written by magpie-parity")
                raw = fh.read(hlen)
        except OSError as exc:
            raise DumpError(f"{path}: cannot read: {exc}") from None
        if len(raw) != hlen:
            raise DumpError(f"{path}: truncated inside the safetensors header")
        info = self.manifest.get("files", {}).get(fname)
        if info is not None:
            if info["size"] != size:
                raise DumpError(f"{path}: {size} bytes, manifest recorded {info['size']}: truncated or replaced")
            if "header_crc32" in info and zlib.crc32(raw) != info["header_crc32"]:
                raise DumpError(f"{path}: safetensors header checksum mismatch (corrupt)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DumpError(f"{path}: safetensors header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise DumpError(f"{path}: safetensors header is not a JSON object")
        spans = []
        tensors: dict[str, dict] = {}
        for key, h in header.items():
            if key == "__metadata__":
                continue
            ok = (
                isinstance(h, dict)
                and h.get("dtype") in _CODE_TO_NAME
                and _is_shape(h.get("shape"))
                and isinstance(h.get("data_offsets"), list)
                and len(h["data_offsets"]) == 2
                and all(_is_int(o) and o >= 0 for o in h["data_offsets"])
            )
            if not ok:
                raise DumpError(f"{path}: malformed safetensors header entry {key!r}")
            start, end = h["data_offsets"]
            itemsize = _DTYPES[_CODE_TO_NAME[h["dtype"]]][1].itemsize
            if end - start != math.prod(h["shape"]) * itemsize:
                raise DumpError(f"{path}: tensor {key!r} byte range does not match its shape and dtype")
            spans.append((start, end))
            tensors[key] = h
        # Safetensors requires the tensors to tile the data buffer exactly: no gaps, no overlaps.
        spans.sort()
        pos = 0
        for start, end in spans:
            if start != pos:
                raise DumpError(f"{path}: safetensors data offsets overlap or leave gaps (corrupt)")
            pos = end
        if 8 + hlen + pos != size:
            what = "truncated" if 8 + hlen + pos > size else "has trailing bytes"
            raise DumpError(f"{path}: {what}: {size} bytes on disk, header describes {8 + hlen + pos}")
        return _ShardInfo(path=path, size=size, data_start=8 + hlen, header=tensors)

    # -- queries

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def config_hash(self) -> str | None:
        return self.manifest.get("config_hash")

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def inputs(self) -> dict:
        return self.manifest.get("inputs", {})

    @property
    def layout(self) -> dict:
        return self.manifest.get("layout", {})

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    @property
    def entries(self) -> list[TensorEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self._entries)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            item = (item, None)
        return isinstance(item, tuple) and item in self._index

    def names(self) -> list[str]:
        """Distinct tensor names in execution order (first appearance)."""
        return list(dict.fromkeys(e.name for e in self._entries))

    def entry(self, name: str, step: int | None = None) -> TensorEntry:
        i = self._index.get((name, step))
        if i is None:
            steps = sorted((s for (n, s) in self._index if n == name), key=lambda s: (s is not None, s or 0))
            if steps:
                hint = f"; {name!r} exists at steps {steps[:10]}{' ...' if len(steps) > 10 else ''}"
            else:
                close = difflib.get_close_matches(name, self.names(), n=5)
                hint = f"; close names: {', '.join(close)}" if close else ""
            raise MissingTensorError(f"{self.path}: no tensor {name!r} at step {step}{hint}")
        return self._entries[i]

    # -- data

    def load(self, name: str, step: int | None = None) -> torch.Tensor:
        """One tensor, read through safetensors' memory map; other tensors are not touched."""
        e = self.entry(name, step)
        path = self.path / e.file
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                t = fh.get_tensor(e.key)
        except Exception as exc:  # safetensors raises its own error types; callers only see DumpError
            raise DumpError(f"{path}: cannot read tensor {e.key!r}: {exc}") from None
        if t.dtype != e.torch_dtype or tuple(t.shape) != e.shape:
            raise DumpError(f"{path}: tensor {e.key!r} changed on disk since the dump was opened")
        self._verify(e, [_tensor_bytes(t.contiguous())])
        return t

    def iter_chunks(self, entry: TensorEntry, chunk_elems: int) -> Iterator[torch.Tensor]:
        """The tensor as flat 1-D chunks of at most ``chunk_elems`` elements, each a fresh tensor.

        Memory is bounded by one chunk: bytes are ``pread`` from the shard (page cache or disk) into
        the chunk, never mapping or loading the rest of the file. The checksum is verified at the end,
        so a corrupt tensor raises :class:`DumpError` before the iterator finishes.
        """
        return self._chunks(entry, chunk_elems, reuse=False)

    def _chunks(self, entry: TensorEntry, chunk_elems: int, reuse: bool) -> Iterator[torch.Tensor]:
        if chunk_elems <= 0:
            raise ValueError("chunk_elems must be positive")
        if isinstance(entry, tuple):
            entry = self.entry(*entry)
        path = self.path / entry.file
        numel, dt, item = entry.numel, entry.torch_dtype, entry.itemsize
        crc = 0 if entry.crc32 is not None else None
        sha = hashlib.sha256() if entry.sha256 is not None else None
        buf: torch.Tensor | None = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise DumpError(f"{path}: cannot open: {exc}") from None
        try:
            done = 0
            while done < numel:
                n = min(chunk_elems, numel - done)
                if buf is None or not reuse or buf.numel() < n:
                    buf = torch.empty(chunk_elems if reuse else n, dtype=dt)
                out = buf[:n]
                mv = memoryview(out.view(torch.uint8).numpy())
                _pread_full(fd, mv, entry.data_offset + done * item, path)
                if crc is not None:
                    crc = zlib.crc32(mv, crc)
                if sha is not None:
                    sha.update(mv)
                done += n
                last = done >= numel
                if last:
                    self._check_digest(entry, crc, sha)
                yield out
            if numel == 0:
                self._check_digest(entry, crc, sha)
        finally:
            os.close(fd)

    def _verify(self, e: TensorEntry, parts: list[memoryview]) -> None:
        crc = 0 if e.crc32 is not None else None
        sha = hashlib.sha256() if e.sha256 is not None else None
        for mv in parts:
            if crc is not None:
                crc = zlib.crc32(mv, crc)
            if sha is not None:
                sha.update(mv)
        self._check_digest(e, crc, sha)

    def _check_digest(self, e: TensorEntry, crc: int | None, sha: Any) -> None:
        if crc is not None and crc != e.crc32:
            raise DumpError(f"{self.path / e.file}: tensor {e.key!r}: crc32 mismatch (corrupt data)")
        if sha is not None and sha.hexdigest() != e.sha256.lower():
            raise DumpError(f"{self.path / e.file}: tensor {e.key!r}: sha256 mismatch (corrupt data)")

    def __repr__(self) -> str:
        return f"DumpReader({str(self.path)!r}, source={self.source!r}, tensors={len(self._entries)})"


def _replace_offsets(e: TensorEntry, data_offset: int, nbytes: int) -> TensorEntry:
    return TensorEntry(e.name, e.step, e.file, e.key, e.shape, e.dtype, e.crc32, e.sha256, data_offset, nbytes)


def _pread_full(fd: int, mv: memoryview, offset: int, path: pathlib.Path) -> None:
    """Fill ``mv`` from ``offset``; the file shrinking underneath us is a DumpError, not a short tensor."""
    got = 0
    total = mv.nbytes
    while got < total:
        try:
            n = os.preadv(fd, [mv[got:]], offset + got)
        except OSError as exc:
            raise DumpError(f"{path}: read failed: {exc}") from None
        if n == 0:
            raise DumpError(f"{path}: truncated (ended at byte {offset + got} while reading a tensor)")
        got += n


def open_dump(path: "str | os.PathLike | DumpReader") -> DumpReader:
    """A DumpReader for ``path`` (or ``path`` itself if it already is one)."""
    return path if isinstance(path, DumpReader) else DumpReader(path)
