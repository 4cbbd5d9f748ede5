"""Reading NeMo MagpieTTS checkpoints (``.nemo`` archives, Lightning ``.ckpt``) without importing NeMo.

Checkpoints are untrusted input:

* pickles are loaded with ``torch.load(weights_only=True)``; a Lightning ``.ckpt`` whose hyper-parameters hold
  omegaconf objects is loaded with a small allowlist of omegaconf's container classes, never with arbitrary
  globals;
* archive members are read into memory, never extracted, so a member name like ``../../etc/x`` or a link can
  never write or read outside the archive; links and special files are refused;
* every failure is a :class:`CheckpointError` naming the file and the member or key.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

MAX_MEMBER_BYTES = 8 * 2**30  # refuse absurd members rather than exhausting memory


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
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a .nemo or .ckpt file")
    if tarfile.is_tarfile(p):
        return _read_nemo(p)
    return _read_ckpt(p)


def _load_yaml(text: str, where: str) -> dict:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.create(text)
        out = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # omegaconf raises several error types for bad YAML / interpolations
        raise CheckpointError(f"{where}: cannot parse the model config: {e}") from e
    if not isinstance(out, dict):
        raise CheckpointError(f"{where}: the model config is not a mapping")
    return out


def _torch_load(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot unpickle safely ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def _read_nemo(p: Path) -> RawCheckpoint:
    members: dict[str, tarfile.TarInfo] = {}
    try:
        tf = tarfile.open(p, "r:*")
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
            members[name] = info
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
    if info.size > MAX_MEMBER_BYTES:
        raise CheckpointError(f"{p}: member '{info.name}' is {info.size} bytes, larger than allowed")
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


def _read_ckpt(p: Path) -> RawCheckpoint:
    data = p.read_bytes()
    if len(data) < 64:
        raise CheckpointError(f"{p}: {len(data)} bytes is too short for a checkpoint (truncated?)")
    try:
        with torch.serialization.safe_globals(_omegaconf_safe_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{p}: not a loadable checkpoint with weights_only=True and the omegaconf allowlist "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no 'state_dict')")
    hp = obj.get("hyper_parameters") or {}
    cfg = hp.get("cfg") if isinstance(hp, Mapping) else None
    if cfg is None:
        raise CheckpointError(f"{p}: Lightning checkpoint without hyper_parameters.cfg (cannot build the config)")
    from reference.config import _to_plain_dict

    return RawCheckpoint(p, _to_plain_dict(cfg), _clean_state_dict(obj["state_dict"], f"{p}:state_dict"))


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
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{where}: weight '{k}' holds NaN or Inf")
        out[k] = v
    return out
