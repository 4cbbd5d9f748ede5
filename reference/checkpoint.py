"""Reading NeMo MagpieTTS checkpoints (``.nemo`` archives, Lightning ``.ckpt``) without importing NeMo.

Checkpoints are untrusted input:

* pickles are loaded with ``torch.load(weights_only=True)``; a Lightning ``.ckpt`` whose hyper-parameters hold
  omegaconf objects is loaded with a small allowlist of omegaconf's container classes, never with arbitrary
  globals;
* archive members are read into memory, never extracted, so a member name like ``../../etc/x`` or a link can
  never write or read outside the archive; links and special files are refused;
* the path given is resolved and must be a regular file (a FIFO or device is refused before it is opened, so
  nothing can block);
* sizes are budgeted before anything is read: a member may declare no more bytes than the archive holds (times
  :data:`MAX_EXPANSION` where it is compressed), sparse members are refused, the whole never exceeds
  :data:`MAX_CHECKPOINT_BYTES`; the model config is parsed by a YAML loader that refuses more than
  :data:`MAX_YAML_ALIASES` aliases, and never resolves an omegaconf resolver (``${oc.env:...}`` and the like:
  a checkpoint must not read the environment); every tensor's storage must back its shape (no expanded views);
* every failure is a :class:`CheckpointError` naming the file and the member or key.

The limits can be raised for a trusted file through the environment variables named beside them.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

import torch

def _limit(env: str, default: int) -> int:
    value = os.environ.get(env)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise CheckpointError(f"environment variable {env}={value!r} is not an integer") from None


# The released 357M checkpoint's weights are ~1.4 GB in float32: 8 GiB leaves room for larger models.
MAX_CHECKPOINT_BYTES = _limit("MAGPIE_PARITY_MAX_CHECKPOINT_BYTES", 8 * 2**30)
# Weights compress by ~10% at most (float mantissas are noise); text configs by ~5x. A member that declares more
# than 16x its compressed share is a decompression bomb, not a checkpoint.
MAX_EXPANSION = _limit("MAGPIE_PARITY_MAX_EXPANSION", 16)
EXPANSION_SLACK = 1 << 20  # tiny archives: headers and a small config may expand more than 16x
MAX_YAML_ALIASES = _limit("MAGPIE_PARITY_MAX_YAML_ALIASES", 64)  # NeMo's configs use none


class CheckpointError(ValueError):
    """A checkpoint could not be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class RawCheckpoint:
    path: Path
    config: dict  # NeMo model config as a plain dict
    state_dict: dict[str, torch.Tensor]


# Keys NeMo keeps in MagpieTTS state dicts that carry no reference weights.
_IGNORED_PREFIXES = ("_codec_model.", "_speaker_verification_model.")


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read a ``.nemo`` or ``.ckpt`` file into (config, state_dict)."""
    p = Path(path)
    data = _read_regular_file(p)
    if tarfile.is_tarfile(io.BytesIO(data)):
        return _read_nemo(p, data)
    return _read_ckpt(p, data)


def _read_regular_file(p: Path) -> bytes:
    """The file's bytes, if ``p`` names a regular file within the size budget (links are resolved: a hub cache's
    snapshot links to its blob; FIFOs, devices and sockets are refused before being opened, so nothing blocks)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{p}: is a directory, expected a .nemo or .ckpt file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{p}: not a regular file (a FIFO, device or socket); expected a .nemo or .ckpt file")
    if st.st_size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{p}: {st.st_size} bytes is more than MAGPIE_PARITY_MAX_CHECKPOINT_BYTES "
                              f"({MAX_CHECKPOINT_BYTES}); raise it for a trusted file")
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, open() does not wait for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode):
                raise CheckpointError(f"{p}: not a regular file")
            # read() allocates the size it is asked for up front: ask for what the file holds (+1 to see it grow),
            # never the whole budget (an 8 GB allocation fails under a memory limit or strict overcommit)
            size = min(fst.st_size, MAX_CHECKPOINT_BYTES)
            data = f.read(size + 1)
            if len(data) > size:
                raise CheckpointError(f"{p}: grew while being read (or exceeds MAGPIE_PARITY_MAX_CHECKPOINT_BYTES "
                                      f"{MAX_CHECKPOINT_BYTES})")
            return data
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None


def _expansion_budget(compressed: int) -> int:
    return min(MAX_CHECKPOINT_BYTES, compressed * MAX_EXPANSION + EXPANSION_SLACK)


class _BoundedAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects) counting aliases: a few nested anchors referenced many
    times ("billion laughs") expand exponentially once omegaconf copies them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases (MAGPIE_PARITY_MAX_YAML_ALIASES)")
        return super().compose_node(parent, index)


# ${name:...}: an omegaconf resolver call (oc.env, oc.decode, custom ones); ${a.b} / ${..a} are node references
_RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.\-]*\s*:")


def _refuse_resolvers(node: Any, where: str, path: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_resolvers(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_resolvers(v, where, f"{path}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        # the value itself is not printed: resolving it is what must not happen, and it may name a secret
        raise CheckpointError(f"{where}: '{path}' calls an omegaconf resolver; a checkpoint's config may only "
                              "refer to its own keys")


def _load_yaml(text: str, where: str) -> dict:
    from omegaconf import OmegaConf

    try:
        data = yaml.load(text, Loader=_BoundedAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise CheckpointError(f"{where}: cannot parse the model config: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: the model config is not a mapping")
    _refuse_resolvers(data, where)
    try:
        out = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except Exception as e:  # omegaconf raises several error types for bad interpolations
        raise CheckpointError(f"{where}: cannot resolve the model config: {str(e).splitlines()[0]}") from None
    return out


def _check_zip_budget(data: bytes, where: str) -> None:
    """torch.save's zip format only (the legacy format allocates each storage at its declared size before reading
    it); every record's declared size within the archive's bytes (x MAX_EXPANSION where compressed)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise CheckpointError(f"{where}: not a torch.save zip archive (truncated, or the legacy pre-1.6 format, "
                              "which is not read)") from None
    declared = sum(i.file_size for i in infos)
    stored = sum(i.compress_size for i in infos)
    if declared > _expansion_budget(stored) or any(i.flag_bits & 0x1 for i in infos):
        raise CheckpointError(f"{where}: declares {declared} bytes in {len(data)} (compressed more than "
                              f"{MAX_EXPANSION}x, or encrypted): refused as a decompression bomb "
                              "(MAGPIE_PARITY_MAX_EXPANSION)")


def _torch_load(data: bytes, where: str, safe_globals: Optional[list] = None) -> Any:
    _check_zip_budget(data, where)
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot unpickle safely ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _read_nemo(p: Path, data: bytes) -> RawCheckpoint:
    members: dict[str, tarfile.TarInfo] = {}
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CheckpointError(f"{p}: not a readable .nemo archive ({e})") from e
    with tf:
        try:
            infos = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CheckpointError(f"{p}: truncated or corrupt .nemo archive ({e})") from e
        for info in infos:
            name = os.path.normpath(info.name)  # "./model_config.yaml" -> "model_config.yaml"
            if name == ".":
                continue
            if info.issym() or info.islnk():
                # Links are never followed: they could point outside the archive.
                if name in ("model_config.yaml", "model_weights.ckpt"):
                    raise CheckpointError(f"{p}: member '{info.name}' is a link; refusing to follow it")
                continue
            if info.issparse():
                raise CheckpointError(f"{p}: member '{info.name}' is a sparse file (NeMo never writes one)")
            members[name] = info
        declared = sum(i.size for i in members.values())
        if declared > _expansion_budget(len(data)):
            raise CheckpointError(f"{p}: members declare {declared} bytes in a {len(data)}-byte archive: refused as a "
                                  "decompression bomb (MAGPIE_PARITY_MAX_EXPANSION, MAGPIE_PARITY_MAX_CHECKPOINT_BYTES)")
        cfg_info = members.get("model_config.yaml")
        w_info = members.get("model_weights.ckpt")
        if cfg_info is None or w_info is None:
            missing = [m for m, i in (("model_config.yaml", cfg_info), ("model_weights.ckpt", w_info)) if i is None]
            raise CheckpointError(f"{p}: not a NeMo archive: missing member(s) {missing}")
        cfg_text = _read_member(tf, cfg_info, p).decode("utf-8", errors="replace")
        weights = _read_member(tf, w_info, p)
    config = _load_yaml(cfg_text, f"{p}:model_config.yaml")
    sd = _torch_load(weights, f"{p}:model_weights.ckpt")
    if isinstance(sd, Mapping) and "state_dict" in sd and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = sd["state_dict"]
    return RawCheckpoint(p, config, _clean_state_dict(sd, f"{p}:model_weights.ckpt"))


def _read_member(tf: tarfile.TarFile, info: tarfile.TarInfo, p: Path) -> bytes:
    if not info.isfile():
        raise CheckpointError(f"{p}: member '{info.name}' is not a regular file")
    try:
        f = tf.extractfile(info)
        assert f is not None
        data = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CheckpointError(f"{p}: member '{info.name}' is truncated or corrupt ({e})") from e
    if len(data) != info.size:
        raise CheckpointError(f"{p}: member '{info.name}' is truncated ({len(data)} of {info.size} bytes)")
    return data


def _omegaconf_safe_globals() -> list:
    """The classes a Lightning checkpoint's pickled ``hyper_parameters`` need: omegaconf containers only."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode, IntegerNode,
            StringNode, typing.Any, dict, list, int, float, str, bool, collections.defaultdict]


def _read_ckpt(p: Path, data: bytes) -> RawCheckpoint:
    if len(data) < 64:
        raise CheckpointError(f"{p}: {len(data)} bytes is too short for a checkpoint (truncated?)")
    try:
        obj = _torch_load(data, str(p), _omegaconf_safe_globals())
    except CheckpointError as e:
        raise CheckpointError(f"{e} (a Lightning .ckpt is read with weights_only=True and the omegaconf "
                              "allowlist)") from None
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    hp = obj.get("hyper_parameters") or {}
    cfg = hp.get("cfg") if isinstance(hp, Mapping) else None
    if cfg is None:
        raise CheckpointError(f"{p}: Lightning checkpoint without hyper_parameters.cfg (cannot build the config)")
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):  # the same checks as a .nemo's YAML: no aliases bomb, no resolvers
        cfg = _load_yaml(OmegaConf.to_yaml(cfg, resolve=False), f"{p}:hyper_parameters.cfg")
    elif not isinstance(cfg, Mapping):
        raise CheckpointError(f"{p}: hyper_parameters.cfg is a {type(cfg).__name__}, not a mapping")
    else:
        _refuse_resolvers(dict(cfg), f"{p}:hyper_parameters.cfg")
    return RawCheckpoint(p, dict(cfg), _clean_state_dict(obj["state_dict"], f"{p}:state_dict"))


# float weights and the integer buffers NeMo keeps (counts, lengths); not bool, complex or float8
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32)


def _needed_bytes(t: torch.Tensor) -> int:
    """Bytes of storage a view must have to back its elements without repeating any: from the storage's start to
    its last element, and at least numel x size (fewer would mean overlapping or zero strides)."""
    if t.numel() == 0:
        return 0
    last = t.storage_offset() + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return max(last + 1, t.storage_offset() + t.numel()) * t.element_size()


def _clean_state_dict(sd: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{where}: expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: entry {k!r} is not a tensor")
        if k.startswith(_IGNORED_PREFIXES):
            continue
        # NeMo's update_ckpt: very old checkpoints named the stacks t5_encoder / t5_decoder.
        k = k.replace("t5_encoder", "encoder").replace("t5_decoder", "decoder")
        if v.layout != torch.strided or v.is_meta or v.is_quantized:
            raise CheckpointError(f"{where}: weight '{k}' is a {v.layout} / meta / quantized tensor, not a dense one")
        if v.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(f"{where}: weight '{k}' has dtype {str(v.dtype).replace('torch.', '')}; "
                                  f"expected one of {', '.join(str(d).replace('torch.', '') for d in _WEIGHT_DTYPES)}")
        if _needed_bytes(v) > v.untyped_storage().nbytes():
            # an expanded or overlapping view: a tiny file that materialises into gigabytes
            raise CheckpointError(f"{where}: weight '{k}' of shape {tuple(v.shape)} is a view its storage does not back "
                                  f"({v.untyped_storage().nbytes()} bytes for {v.numel()} elements)")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{where}: weight '{k}' holds NaN or Inf")
        out[k] = v
    return out
