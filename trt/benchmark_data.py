"""Benchmark datasets in the JSON format of the fork's ``prepare_benchmark.py`` (read by ``gptManagerBenchmark``).

Format (rmittal-github/TensorRT-LLM examples/models/contrib/t5tts/prepare_benchmark.py @e7109d5)::

    {"metadata": {"workload_type": "token-norm-dist", "input_mean", "input_stdev", "output_mean",
                  "output_stdev", "num_requests", "tokenize_vocabsize" (= audio_vocab_size * num_vocabs),
                  "max_input_len", "max_output_len", "workload_name"},
     "samples": [{"input_len", "output_len", "task_id": -1,
                  "input_ids": [input_len ints]  |  "input_feat": [input_len * dim floats, row-major],
                  "context_ids": [context_len * num_vocabs ints, frame-major; codebook k offset by
                                  k * audio_vocab_size; the first frame is all codebooks' code 0]}]}

``output_len`` is the number of decoder iterations (generated frames; "no need to multiply by num_vocabs" in the
fork). We add ``num_vocabs``, ``audio_vocab_size`` and (for features) ``feature_dim`` to the metadata so a file
can be read back without side information; ``gptManagerBenchmark`` is assumed to ignore metadata keys it does
not know (not verified: TensorRT-LLM is not installable here).

Seed defaults: 512 samples, 128 text tokens, 160 context frames, 480 generated frames, 768-dim features. The
fork's script defaults to ``audio_vocab_size`` 2048; for a MagpieTTS engine the stride must be the decoder's
per-codebook vocabulary (``num_all_tokens_per_codebook``, 2024 for the released model), which
:func:`generate_dataset` takes from a MagpieConfig when one is given.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

SEED_NUM_SAMPLES = 512
SEED_TEXT_LEN = 128
SEED_CONTEXT_FRAMES = 160
SEED_OUTPUT_FRAMES = 480
SEED_FEATURE_DIM = 768
FORK_AUDIO_VOCAB_SIZE = 2048


class BenchmarkDataError(ValueError):
    """A benchmark JSON is malformed; the message names the file, sample index and field."""


@dataclass
class BenchmarkSample:
    input_len: int
    output_len: int
    context_ids: list[int]
    input_ids: Optional[list[int]] = None
    input_feat: Optional[list[float]] = None
    task_id: int = -1

    def to_json(self) -> dict:
        d: dict[str, Any] = {"input_len": self.input_len, "output_len": self.output_len, "task_id": self.task_id}
        if self.input_ids is not None:
            d["input_ids"] = list(self.input_ids)
        if self.input_feat is not None:
            d["input_feat"] = list(self.input_feat)
        d["context_ids"] = list(self.context_ids)
        return d

    def context_codes(self, num_vocabs: int, audio_vocab_size: int) -> np.ndarray:
        """(num_vocabs, context_len) per-codebook codes, offsets removed."""
        m = np.asarray(self.context_ids, dtype=np.int64).reshape(-1, num_vocabs)
        return (m - np.arange(num_vocabs) * audio_vocab_size).T


@dataclass
class BenchmarkDataset:
    samples: list[BenchmarkSample]
    num_vocabs: int
    audio_vocab_size: int
    feature_dim: Optional[int] = None
    metadata: dict = field(default_factory=dict)


def make_metadata(samples: Sequence[BenchmarkSample], num_vocabs: int, audio_vocab_size: int,
                  feature_dim: Optional[int]) -> dict:
    ins = [s.input_len for s in samples]
    outs = [s.output_len for s in samples]
    im, isd = (float(np.mean(ins)), float(np.std(ins))) if ins else (0.0, 0.0)
    om, osd = (float(np.mean(outs)), float(np.std(outs))) if outs else (0.0, 0.0)
    vocab = audio_vocab_size * num_vocabs
    md = {
        "workload_type": "token-norm-dist",
        "input_mean": im, "input_stdev": isd, "output_mean": om, "output_stdev": osd,
        "num_requests": len(samples),
        "tokenize_vocabsize": vocab,
        "max_input_len": max(ins, default=0),
        "max_output_len": max(outs, default=0),
        "workload_name": (f"workload_type:token-norm-dist__input_mean:{im}__input_stdev:{isd}__output_mean:{om}"
                          f"__output_stdev:{osd}__num_requests:{len(samples)}__tokenize_vocabsize:{vocab}"
                          f"__max_input_len:{max(ins, default=0)}__max_output_len:{max(outs, default=0)}"),
        "num_vocabs": num_vocabs,
        "audio_vocab_size": audio_vocab_size,
    }
    if feature_dim is not None:
        md["feature_dim"] = feature_dim
    return md


def generate_dataset(num_samples: int = SEED_NUM_SAMPLES, text_len: int = SEED_TEXT_LEN,
                     context_frames: int = SEED_CONTEXT_FRAMES, output_frames: int = SEED_OUTPUT_FRAMES,
                     config=None, num_vocabs: Optional[int] = None, audio_vocab_size: Optional[int] = None,
                     text_vocab_size: Optional[int] = None, feature_dim: Optional[int] = None,
                     max_code: Optional[int] = None, seed: int = 0) -> BenchmarkDataset:
    """Fixed-length samples as the seed workload (the fork's script with std 0).

    With ``config`` (a MagpieConfig): num_vocabs = codebooks, stride = tokens per codebook, text ids drawn from the
    model's text vocabulary, codes from the raw codec range. Without it: the fork's defaults (8 codebooks, stride
    2048) and ``feature_dim`` (768) input features unless ``text_vocab_size`` is given.
    """
    if config is not None:
        num_vocabs = num_vocabs or config.num_audio_codebooks * config.frame_stacking_factor
        audio_vocab_size = audio_vocab_size or config.num_all_tokens_per_codebook
        if text_vocab_size is None and feature_dim is None:
            text_vocab_size = config.num_text_tokens
        max_code = max_code or config.codebook_size
    num_vocabs = num_vocabs or 8
    audio_vocab_size = audio_vocab_size or FORK_AUDIO_VOCAB_SIZE
    max_code = max_code or audio_vocab_size
    if text_vocab_size is None and feature_dim is None:
        feature_dim = SEED_FEATURE_DIM
    for name, v in (("num_samples", num_samples), ("text_len", text_len), ("context_frames", context_frames),
                    ("output_frames", output_frames), ("num_vocabs", num_vocabs)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        ctx = rng.integers(0, max_code, size=(context_frames, num_vocabs))
        ctx[0, :] = 0  # the fork's first-frame rule
        ctx = ctx + np.arange(num_vocabs) * audio_vocab_size
        s = BenchmarkSample(input_len=text_len, output_len=output_frames, context_ids=ctx.reshape(-1).tolist())
        if text_vocab_size is not None:
            s.input_ids = rng.integers(0, text_vocab_size, size=text_len).tolist()
        else:
            s.input_feat = rng.standard_normal((text_len, feature_dim)).astype(np.float32).reshape(-1).tolist()
        samples.append(s)
    fd = None if text_vocab_size is not None else feature_dim
    return BenchmarkDataset(samples, num_vocabs, audio_vocab_size, fd, make_metadata(samples, num_vocabs, audio_vocab_size, fd))


def write_dataset(ds: BenchmarkDataset, path: Union[str, os.PathLike]) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    md = dict(ds.metadata) or make_metadata(ds.samples, ds.num_vocabs, ds.audio_vocab_size, ds.feature_dim)
    md.update(make_metadata(ds.samples, ds.num_vocabs, ds.audio_vocab_size, ds.feature_dim))
    blob = {"metadata": md, "samples": [s.to_json() for s in ds.samples]}
    from parity.files import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, json.dumps(blob).encode())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_dataset(path: Union[str, os.PathLike], num_vocabs: Optional[int] = None,
                 audio_vocab_size: Optional[int] = None, feature_dim: Optional[int] = None) -> BenchmarkDataset:
    """Read and validate; arguments override (or supply, for files from the fork's script) the metadata."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BenchmarkDataError(f"{path}: no such file") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(blob, dict):
        raise BenchmarkDataError(f"{path}: top level must be an object with 'metadata' and 'samples'")
    md, samples = blob.get("metadata"), blob.get("samples")
    if not isinstance(md, dict):
        raise BenchmarkDataError(f"{path}: 'metadata' must be an object")
    if not isinstance(samples, list):
        raise BenchmarkDataError(f"{path}: 'samples' must be a list")
    num_vocabs = num_vocabs or md.get("num_vocabs")
    audio_vocab_size = audio_vocab_size or md.get("audio_vocab_size")
    if num_vocabs is None or audio_vocab_size is None:
        raise BenchmarkDataError(f"{path}: metadata lacks num_vocabs/audio_vocab_size (a file from the fork's "
                                 "script): pass num_vocabs= and audio_vocab_size=")
    for name, v in (("num_vocabs", num_vocabs), ("audio_vocab_size", audio_vocab_size)):
        if not _is_int(v) or v < 1:
            raise BenchmarkDataError(f"{path}: metadata.{name} must be a positive integer, got {v!r}")
    if md.get("tokenize_vocabsize") not in (None, num_vocabs * audio_vocab_size):
        raise BenchmarkDataError(f"{path}: metadata.tokenize_vocabsize {md['tokenize_vocabsize']} != num_vocabs "
                                 f"{num_vocabs} x audio_vocab_size {audio_vocab_size}")
    feature_dim = feature_dim or md.get("feature_dim")
    out = []
    for i, s in enumerate(samples):
        where = f"{path}: samples[{i}]"
        if not isinstance(s, dict):
            raise BenchmarkDataError(f"{where}: must be an object")
        unknown = set(s) - {"input_len", "output_len", "task_id", "input_ids", "input_feat", "context_ids"}
        if unknown:
            raise BenchmarkDataError(f"{where}: unknown fields {sorted(unknown)}")
        for f_ in ("input_len", "output_len"):
            if f_ not in s:
                raise BenchmarkDataError(f"{where}.{f_}: missing")
            if not _is_int(s[f_]) or s[f_] < 1:
                raise BenchmarkDataError(f"{where}.{f_}: must be a positive integer, got {s[f_]!r}")
        task = s.get("task_id", -1)
        if not _is_int(task):
            raise BenchmarkDataError(f"{where}.task_id: must be an integer, got {task!r}")
        n = s["input_len"]
        has_ids, has_feat = "input_ids" in s, "input_feat" in s
        if has_ids == has_feat:
            raise BenchmarkDataError(f"{where}: needs exactly one of 'input_ids' and 'input_feat'")
        ids = feat = None
        if has_ids:
            ids = s["input_ids"]
            if not isinstance(ids, list) or not all(_is_int(v) and v >= 0 for v in ids):
                raise BenchmarkDataError(f"{where}.input_ids: must be a list of non-negative integers")
            if len(ids) != n:
                raise BenchmarkDataError(f"{where}.input_ids: {len(ids)} ids but input_len is {n}")
        else:
            feat = s["input_feat"]
            if not isinstance(feat, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and math.isfinite(v) for v in feat):
                raise BenchmarkDataError(f"{where}.input_feat: must be a list of finite numbers")
            dim = feature_dim or (len(feat) // n if len(feat) % n == 0 else None)
            if dim is None or len(feat) != n * dim or dim < 1:
                raise BenchmarkDataError(
                    f"{where}.input_feat: {len(feat)} values is not input_len {n} x feature_dim {feature_dim}")
            feature_dim = dim
        ctx = s.get("context_ids")
        if ctx is None:
            raise BenchmarkDataError(f"{where}.context_ids: missing")
        if not isinstance(ctx, list) or not all(_is_int(v) for v in ctx):
            raise BenchmarkDataError(f"{where}.context_ids: must be a list of integers")
        if len(ctx) % num_vocabs:
            raise BenchmarkDataError(f"{where}.context_ids: length {len(ctx)} is not a multiple of num_vocabs {num_vocabs}")
        if ctx:
            m = np.asarray(ctx, dtype=np.int64).reshape(-1, num_vocabs) - np.arange(num_vocabs) * audio_vocab_size
            bad = np.argwhere((m < 0) | (m >= audio_vocab_size))
            if len(bad):
                t, k = (int(x) for x in bad[0])
                raise BenchmarkDataError(
                    f"{where}.context_ids: frame {t} codebook {k} id {ctx[t * num_vocabs + k]} is outside "
                    f"[{k * audio_vocab_size}, {(k + 1) * audio_vocab_size})")
        out.append(BenchmarkSample(n, s["output_len"], ctx, ids, feat, task))
    if md.get("num_requests") not in (None, len(out)):
        raise BenchmarkDataError(f"{path}: metadata.num_requests {md['num_requests']} != {len(out)} samples")
    return BenchmarkDataset(out, num_vocabs, audio_vocab_size, feature_dim, md)


def to_reference_batch(ds: BenchmarkDataset, config, audio_seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Samples with ``input_ids`` -> a reference batch (``text``, ``context_audio_codes``, their lengths).

    Context frames are used as raw codec codes (the first all-zero frame included); the reference adds NeMo's
    CONTEXT_BOS/EOS frames itself. With ``audio_seed``, ``audio_codes`` of ``output_len`` random frames are added
    so ``process_batch`` can run teacher-forced.
    """
    C = config.num_audio_codebooks * config.frame_stacking_factor
    if ds.num_vocabs != C:
        raise BenchmarkDataError(f"dataset has num_vocabs {ds.num_vocabs}, the model {C} codebooks")
    if ds.audio_vocab_size != config.num_all_tokens_per_codebook:
        raise BenchmarkDataError(f"dataset offsets codebooks by {ds.audio_vocab_size}, the model's per-codebook "
                                 f"vocabulary is {config.num_all_tokens_per_codebook}")
    if not ds.samples:
        raise BenchmarkDataError("dataset has no samples")
    B = len(ds.samples)
    for i, s in enumerate(ds.samples):
        if s.input_ids is None:
            raise BenchmarkDataError(f"samples[{i}]: has input_feat, not input_ids; the reference needs text ids")
        if max(s.input_ids) >= config.num_text_tokens:
            raise BenchmarkDataError(f"samples[{i}].input_ids: id {max(s.input_ids)} >= text vocabulary "
                                     f"{config.num_text_tokens}")
    T = max(s.input_len for s in ds.samples)
    T_ctx = max(len(s.context_ids) // C for s in ds.samples)
    text = torch.zeros(B, T, dtype=torch.long)
    ctx = torch.zeros(B, C, T_ctx, dtype=torch.long)
    ctx_lens = torch.zeros(B, dtype=torch.long)
    for b, s in enumerate(ds.samples):
        text[b, : s.input_len] = torch.tensor(s.input_ids)
        codes = torch.from_numpy(s.context_codes(C, ds.audio_vocab_size))
        ctx[b, :, : codes.shape[1]] = codes
        ctx_lens[b] = codes.shape[1]
    batch = {"text": text, "text_lens": torch.tensor([s.input_len for s in ds.samples]),
             "context_audio_codes": ctx, "context_audio_codes_lens": ctx_lens}
    if audio_seed is not None:
        g = torch.Generator().manual_seed(audio_seed)
        lens = torch.tensor([s.output_len for s in ds.samples])
        audio = torch.randint(0, config.codebook_size, (B, C, int(lens.max())), generator=g)
        audio = audio * (torch.arange(audio.shape[2]) < lens[:, None]).unsqueeze(1)
        batch.update(audio_codes=audio, audio_codes_lens=lens)
    return batch
