"""Crafted (hostile or careless) inputs shared by the tests: .nemo archives, YAML, debug trees, .npy headers.

Each helper writes one small file or folder and returns its path; none needs NeMo. Used by
tests/reference/test_untrusted_checkpoints.py (the loader's API), tests/trt/test_ingest.py (ingest's API) and
tests/test_untrusted_inputs_cli.py (the same inputs through the command line)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
import yaml
from hypothesis import strategies as st

# ------------------------------------------------------------------------------------------- checkpoints

# Every value a careless or hostile config could hold, in every field of the transformer and the model.
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TRANSFORMER_KEYS = ["n_layers", "d_model", "d_ffn", "sa_n_heads", "kernel_size", "is_causal", "apply_norm_out",
                    "max_length_causal_mask", "use_learnable_pos_emb", "has_xattn", "xa_d_memory", "xa_n_heads",
                    "xa_d_head", "apply_norm_to_cond"]
TOP_KEYS = ["embedding_dim", "frame_stacking_factor", "ctc_prior_layer_ids", "use_kv_cache_for_inference",
            "local_transformer_type", "forced_audio_eos_id", "inference_parameters", "encoder", "decoder"]



def nemo_from_bytes(dst, config_text: str, weights: bytes, mode: str = "w") -> Path:
    """A .nemo (tar) holding ``model_config.yaml`` and the already-serialised ``model_weights.ckpt``."""
    with tarfile.open(dst, mode) as tf:
        for name, data in (("./model_config.yaml", config_text.encode()), ("./model_weights.ckpt", weights)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return Path(dst)


def weights_bytes(weights: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(weights, buf)
    return buf.getvalue()


def write_nemo(dst, config_text: str, weights: dict, mode: str = "w") -> Path:
    """A .nemo of ``config_text`` and ``weights`` (a state dict, saved with torch.save)."""
    return nemo_from_bytes(dst, config_text, weights_bytes(weights), mode)


def sparse_nemo(dst, config: dict) -> Path:
    """A PAX sparse weights member declaring 2.5 GB in a few bytes of archive."""
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:
        cfg = yaml.safe_dump(config).encode()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(cfg)
        tf.addfile(info, io.BytesIO(cfg))
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "model_weights.ckpt",
                            "GNU.sparse.realsize": str(2_500_000_000)}
        sparse_map = b"1\n0\n0\n".ljust(512, b"\0")
        info.size = len(sparse_map)
        tf.addfile(info, io.BytesIO(sparse_map))
    return Path(dst)


class Zeros(io.RawIOBase):
    """``n`` zero bytes, produced as they are read (a bomb's payload is never held in memory)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def gzip_bomb_nemo(dst, n: int = 64 * 2**20) -> Path:
    """A gzip'd .nemo whose weights member declares ``n`` zero bytes (compresses ~1000x)."""
    with tarfile.open(dst, "w:gz") as tf:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = n
        tf.addfile(info, io.BufferedReader(Zeros(n)))
    return Path(dst)


def alias_bomb_yaml(levels: int = 9) -> str:
    """YAML whose nested aliases expand to 9**levels list items (a 'billion laughs')."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    names = "abcdefghijklmnopqrstuvwxyz"
    lines += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip(names[:levels - 1], names[1:levels])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- debug trees


def small_tree(root: Path, **extra: np.ndarray) -> Path:
    """A minimal C++-executor tllm_debug tree under ``root`` (one request, one decoder layer output); returns its
    ``iteration_0`` folder. ``extra``: more ``<name>.npy`` arrays in that folder."""
    d = Path(root) / "tllm_debug" / "PP_1" / "TP_1" / "iteration_0"
    d.mkdir(parents=True)
    np.save(d / "request_ids.npy", np.array([0], dtype=np.uint64))
    np.save(d / "host_context_lengths.npy", np.array([3], np.int32))
    np.save(d / "decoder_layer_0_output.npy", np.arange(12, dtype=np.float32).reshape(3, 4) + 1)
    for k, v in extra.items():
        np.save(d / f"{k}.npy", v)
    return d


def npy_with_header(path: Path, header: dict, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> Path:
    """A .npy whose header dict is ``header`` verbatim (descr/fortran_order/shape, or anything else), then ``data``."""
    buf = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(buf, header)
    Path(path).write_bytes(buf.getvalue() + data)
    return Path(path)


def npy_raw_header(path: Path, header_text: bytes, data: bytes = b"", major: int = 1) -> Path:
    """A .npy whose header is ``header_text`` as given (any bytes, unparsed): magic, version, length, text, data."""
    import struct

    pad = (-(8 + (2 if major == 1 else 4) + len(header_text) + 1)) % 64
    body = header_text + b" " * pad + b"\n"
    size = struct.pack("<H", len(body)) if major == 1 else struct.pack("<I", len(body))
    Path(path).write_bytes(b"\x93NUMPY" + bytes([major, 0]) + size + body + data)
    return Path(path)
