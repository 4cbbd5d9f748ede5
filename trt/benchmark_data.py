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

decoder_ce (:func:`decoder_ce_dataset`). What the forks' benchmark holds for a context given as features (sources
read, not run): anand-nv/TensorRT-LLM@4de50626df89c7b5182a5ed058d3cae9626749ea
``examples/models/contrib/t5tts/prepare_benchmark.py`` writes, with ``--text_emb_dim``, ``"input_feat"`` and
``"context_feat"`` (``context_len * text_emb_dim`` floats, row-major) beside ``"context_ids"``
(``context_len * num_vocabs``); ``benchmarks/cpp/utils/utils.cpp`` (same commit) ``parseWorkloadJson`` reads
``context_feat`` as a ``[contextLen, hiddenDim]`` tensor whose width it takes from ``input_feat`` (it throws
"hiddenDim is not set" without one); ``benchmarks/cpp/gptManagerBenchmark.cpp``
(anand-nv@049f7c181726741bf378214537ff98e77aa7a98e) casts both to the engine's fp16 and passes them to the
request as ``encoder_input_features`` and ``decoder_context_features``, the prompt ids being ``context_ids`` (a
decoder-only engine, no ``input_ids``), ``num_vocabs`` from ``--num_vocabs``. The runtime replaces every prompt
row by its feature row (mask set over the prompt), so the ids only give the prompt's length: the forks' runners send
dummy zeros (``[0] * ctx_positions * num_vocabs``), which is what we write. A baked speaker's sample therefore
holds:

* ``input_feat``: the reference encoder's output for the sample's text (``input_len x D``);
* ``context_feat``: the speaker's baked rows (its stored length) and the BOS-frame embedding, ``(P + 1) x D``
  (the runner's :func:`trt.runner.reference_context_features`; a context-encoder model: the context encoder's
  output for the sample's context codes);
* ``context_ids``: ``(P + 1) * num_vocabs`` zeros (``num_vocabs = C * S``);
* ``"magpie": {"text_ids": [...], "speaker_index": k}`` (or ``"context_codes": [C lists of frames]``), what
  :func:`to_reference_batch` needs to rebuild the reference batch; ``parseWorkloadJson`` reads only the keys it
  names (``prepare_real_benchmark.py`` @ac5ebb6e relies on that for its extra "id" field).

``context_feat`` holds the conditional rows only, as prepare_benchmark.py writes it (with ``--cfg_scale`` the
anand-nv@0c0df9f0 runtime then feeds the unconditional sequence the zero service token, BOS included). A released
model's dataset is large: (128 + 218) x 768 floats per sample, ~1.6 GB of JSON for the 512 seed samples.
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
    context_feat: Optional[list[float]] = None  # decoder_ce: (context_ids / num_vocabs) x feature_dim, row-major
    magpie: Optional[dict] = None  # ours: {"text_ids", "speaker_index" | "context_codes"} for to_reference_batch

    def to_json(self) -> dict:
        d: dict[str, Any] = {"input_len": self.input_len, "output_len": self.output_len, "task_id": self.task_id}
        if self.input_ids is not None:
            d["input_ids"] = list(self.input_ids)
        if self.input_feat is not None:
            d["input_feat"] = list(self.input_feat)
        d["context_ids"] = list(self.context_ids)
        if self.context_feat is not None:
            d["context_feat"] = list(self.context_feat)
        if self.magpie is not None:
            d["magpie"] = self.magpie
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
                  feature_dim: Optional[int], extra: Optional[dict] = None) -> dict:
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
    md.update(extra or {})
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
    """Write atomically (temp file in the same folder, then rename), one sample at a time (the JSON text of a
    feature dataset is never held whole)."""
    path = Path(path)
    md = dict(ds.metadata) or make_metadata(ds.samples, ds.num_vocabs, ds.audio_vocab_size, ds.feature_dim)
    md.update(make_metadata(ds.samples, ds.num_vocabs, ds.audio_vocab_size, ds.feature_dim))
    from parity.files import atomic_write

    def write(fh) -> None:
        fh.write(b'{"metadata": ' + json.dumps(md).encode() + b', "samples": [')
        for i, s in enumerate(ds.samples):
            fh.write((", " if i else "").encode() + json.dumps(s.to_json()).encode())
        fh.write(b"]}")

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                       for x in v)


def _int_list(v, minimum: int = 0) -> bool:
    return isinstance(v, list) and all(_is_int(x) and x >= minimum for x in v)


def _check_magpie(m, input_len: int, where: str) -> None:
    """Our per-sample extras: ``text_ids`` and one of ``speaker_index`` / ``context_codes``."""
    if not isinstance(m, dict):
        raise BenchmarkDataError(f"{where}: must be an object")
    unknown = set(m) - {"text_ids", "speaker_index", "context_codes"}
    if unknown:
        raise BenchmarkDataError(f"{where}: unknown fields {sorted(unknown)}")
    if not _int_list(m.get("text_ids")) or len(m["text_ids"]) != input_len:
        raise BenchmarkDataError(f"{where}.text_ids: must be input_len {input_len} non-negative integers")
    if ("speaker_index" in m) == ("context_codes" in m):
        raise BenchmarkDataError(f"{where}: needs exactly one of 'speaker_index' and 'context_codes'")
    if "speaker_index" in m and not (_is_int(m["speaker_index"]) and m["speaker_index"] >= 0):
        raise BenchmarkDataError(f"{where}.speaker_index: must be a non-negative integer, got {m['speaker_index']!r}")
    if "context_codes" in m:
        cc = m["context_codes"]
        if (not isinstance(cc, list) or not cc or not all(_int_list(r) for r in cc)
                or len({len(r) for r in cc}) != 1):
            raise BenchmarkDataError(f"{where}.context_codes: must be one list of non-negative codes per codebook, "
                                     "all of one length")


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
        unknown = set(s) - {"input_len", "output_len", "task_id", "input_ids", "input_feat", "context_ids",
                            "context_feat", "magpie"}
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
            if not _finite_list(feat):
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
        if ctx and "context_feat" in s:
            # the features replace every prompt row: the ids are placeholders (the forks' runners send zeros), any
            # row of the engine's table will do
            top = num_vocabs * audio_vocab_size
            if min(ctx) < 0 or max(ctx) >= top:
                raise BenchmarkDataError(f"{where}.context_ids: with context_feat the ids are placeholders but must "
                                         f"lie in [0, {top}), got [{min(ctx)}, {max(ctx)}]")
        elif ctx:
            m = np.asarray(ctx, dtype=np.int64).reshape(-1, num_vocabs) - np.arange(num_vocabs) * audio_vocab_size
            bad = np.argwhere((m < 0) | (m >= audio_vocab_size))
            if len(bad):
                t, k = (int(x) for x in bad[0])
                raise BenchmarkDataError(
                    f"{where}.context_ids: frame {t} codebook {k} id {ctx[t * num_vocabs + k]} is outside "
                    f"[{k * audio_vocab_size}, {(k + 1) * audio_vocab_size})")
        cfeat = s.get("context_feat")
        if cfeat is not None:
            if feat is None:
                raise BenchmarkDataError(f"{where}.context_feat: needs input_feat (the fork's parseWorkloadJson takes "
                                         "the feature width from input_feat)")
            if not _finite_list(cfeat):
                raise BenchmarkDataError(f"{where}.context_feat: must be a list of finite numbers")
            rows = len(ctx) // num_vocabs
            if len(cfeat) not in (rows * feature_dim, 2 * rows * feature_dim) or not rows:
                raise BenchmarkDataError(f"{where}.context_feat: {len(cfeat)} values is not the prompt's {rows} rows "
                                         f"(context_ids / num_vocabs) x feature_dim {feature_dim}")
        magpie = s.get("magpie")
        if magpie is not None:
            _check_magpie(magpie, n, f"{where}.magpie")
        out.append(BenchmarkSample(n, s["output_len"], ctx, ids, feat, task, cfeat, magpie))
    if md.get("num_requests") not in (None, len(out)):
        raise BenchmarkDataError(f"{path}: metadata.num_requests {md['num_requests']} != {len(out)} samples")
    return BenchmarkDataset(out, num_vocabs, audio_vocab_size, feature_dim, md)


def to_reference_batch(ds: BenchmarkDataset, config, audio_seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Samples -> a reference batch (``text`` and its lengths, then the context: ``context_audio_codes`` and lengths,
    or for a baked decoder_ce checkpoint ``speaker_indices``).

    decoder_context_tts: text from ``input_ids``; context frames used as raw codec codes (the first all-zero frame
    included); the reference adds NeMo's CONTEXT_BOS/EOS frames itself. decoder_ce: text and speaker / context codes
    from each sample's ``magpie`` extras (:func:`decoder_ce_dataset`); the features are the engine's, not the
    reference's inputs. With ``audio_seed``, ``audio_codes`` of ``output_len * S`` random frames (``output_len``
    decoder iterations) are added so ``process_batch`` can run teacher-forced.
    """
    C = config.num_audio_codebooks * config.frame_stacking_factor
    if ds.num_vocabs != C:
        raise BenchmarkDataError(f"dataset has num_vocabs {ds.num_vocabs}, the model {C} codebooks")
    if ds.audio_vocab_size != config.num_all_tokens_per_codebook:
        raise BenchmarkDataError(f"dataset offsets codebooks by {ds.audio_vocab_size}, the model's per-codebook "
                                 f"vocabulary is {config.num_all_tokens_per_codebook}")
    if not ds.samples:
        raise BenchmarkDataError("dataset has no samples")
    dce = config.model_type == "decoder_ce"
    md = ds.metadata or {}
    if dce:
        kind = "baked" if config.baked else "context_encoder"
        if md.get("context") not in (None, kind):
            raise BenchmarkDataError(f"dataset metadata.context is {md['context']!r}, the checkpoint's context is "
                                     f"{kind!r}")
        if md.get("config_hash") not in (None, config.hash()):
            raise BenchmarkDataError(f"dataset metadata.config_hash {md['config_hash']} was written for another "
                                     f"checkpoint (this one: {config.hash()}): its features are not this model's")
    elif md.get("model_type") == "decoder_ce":
        raise BenchmarkDataError(f"dataset was written for a decoder_ce checkpoint, the model is {config.model_type}")
    B = len(ds.samples)
    texts = []
    for i, s in enumerate(ds.samples):
        if dce:
            m = s.magpie
            if m is None:
                raise BenchmarkDataError(
                    f"samples[{i}]: no 'magpie' extras (text_ids, speaker_index | context_codes): a decoder_ce batch "
                    "cannot be rebuilt from engine features; write the dataset with bench-data --checkpoint")
            want = "speaker_index" if config.baked else "context_codes"
            if want not in m:
                raise BenchmarkDataError(f"samples[{i}].magpie: no {want!r} (the checkpoint's context is "
                                         f"{'baked speakers' if config.baked else 'a context encoder'})")
            if config.baked and m["speaker_index"] >= config.baked_speakers:
                raise BenchmarkDataError(f"samples[{i}].magpie.speaker_index: {m['speaker_index']} outside [0, "
                                         f"{config.baked_speakers - 1}] (the checkpoint bakes {config.baked_speakers} "
                                         "speakers)")
            if not config.baked:
                cc = m["context_codes"]
                top = max((max(r) for r in cc if r), default=-1)
                if len(cc) != config.num_audio_codebooks or top >= config.codebook_size:
                    raise BenchmarkDataError(
                        f"samples[{i}].magpie.context_codes: must be {config.num_audio_codebooks} lists of codes in "
                        f"[0, {config.codebook_size})")
            texts.append(m["text_ids"])
        else:
            if s.input_ids is None:
                raise BenchmarkDataError(f"samples[{i}]: has input_feat, not input_ids; the reference needs text ids")
            texts.append(s.input_ids)
        if len(texts[-1]) != s.input_len:
            raise BenchmarkDataError(f"samples[{i}]: {len(texts[-1])} text ids but input_len is {s.input_len}")
        if max(texts[-1]) >= config.num_text_tokens:
            raise BenchmarkDataError(f"samples[{i}].{'magpie.text_ids' if dce else 'input_ids'}: id {max(texts[-1])} "
                                     f">= text vocabulary {config.num_text_tokens}")
    T = max(s.input_len for s in ds.samples)
    text = torch.zeros(B, T, dtype=torch.long)
    for b, t in enumerate(texts):
        text[b, :len(t)] = torch.tensor(t)
    batch = {"text": text, "text_lens": torch.tensor([s.input_len for s in ds.samples])}
    if dce and config.baked:
        batch["speaker_indices"] = torch.tensor([s.magpie["speaker_index"] for s in ds.samples])
    else:
        if dce:
            per = [torch.tensor(s.magpie["context_codes"], dtype=torch.long) for s in ds.samples]
        else:
            per = [torch.from_numpy(s.context_codes(C, ds.audio_vocab_size)) for s in ds.samples]
        T_ctx = max(p.shape[1] for p in per)
        ctx = torch.zeros(B, per[0].shape[0], T_ctx, dtype=torch.long)
        for b, codes in enumerate(per):
            ctx[b, :, :codes.shape[1]] = codes
        batch.update(context_audio_codes=ctx, context_audio_codes_lens=torch.tensor([p.shape[1] for p in per]))
    if audio_seed is not None:  # output_len decoder iterations of S stacked frames each
        g = torch.Generator().manual_seed(audio_seed)
        lens = torch.tensor([s.output_len * config.frame_stacking_factor for s in ds.samples])
        audio = torch.randint(0, config.codebook_size, (B, config.num_audio_codebooks, int(lens.max())), generator=g)
        audio = audio * (torch.arange(audio.shape[2]) < lens[:, None]).unsqueeze(1)
        batch.update(audio_codes=audio, audio_codes_lens=lens)
    return batch


def decoder_ce_dataset(model, num_samples: int = SEED_NUM_SAMPLES, text_len: int = SEED_TEXT_LEN,
                       context_frames: int = SEED_CONTEXT_FRAMES, output_frames: int = SEED_OUTPUT_FRAMES,
                       speakers: Optional[Sequence[int]] = None, seed: int = 0) -> BenchmarkDataset:
    """A decoder_ce benchmark (module docstring): random text (and, for a context encoder, random context codes of
    ``context_frames`` frames; for baked speakers ``speakers`` cycled, default every speaker), the reference's
    encoder outputs as ``input_feat`` and the runner's prompt rows as ``context_feat``, computed on the batch
    :func:`to_reference_batch` rebuilds from the written file.

    ``output_len`` = ``output_frames`` decoder iterations (the fork's meaning; each is S stacked frames).
    ``context_frames`` is not used for baked speakers (the table fixes the prefix).
    """
    from trt.runner import reference_context_features, reference_encoder_features

    c = model.config
    if c.model_type != "decoder_ce":
        raise BenchmarkDataError(f"model_type {c.model_type!r} is not decoder_ce; generate_dataset writes its context "
                                 "as codes")
    for name, v in (("num_samples", num_samples), ("text_len", text_len), ("context_frames", context_frames),
                    ("output_frames", output_frames)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    C, S, V, D = c.num_audio_codebooks, c.frame_stacking_factor, c.num_all_tokens_per_codebook, c.d_model
    num_vocabs = C * S
    if c.baked:
        speakers = list(range(c.baked_speakers)) if speakers is None else list(speakers)
        bad = [k for k in speakers if not _is_int(k) or not 0 <= k < c.baked_speakers]
        if not speakers or bad:
            raise BenchmarkDataError(f"speakers {bad or speakers} outside [0, {c.baked_speakers - 1}] (the checkpoint "
                                     f"bakes {c.baked_speakers} speakers)")
    elif speakers is not None:
        raise BenchmarkDataError("speakers: this decoder_ce checkpoint has a context encoder, not baked speakers (it "
                                 "takes context codes: context_frames)")
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        m: dict[str, Any] = {"text_ids": rng.integers(0, c.num_text_tokens, size=text_len).tolist()}
        if c.baked:
            m["speaker_index"] = int(speakers[i % len(speakers)])
        else:
            m["context_codes"] = rng.integers(0, c.codebook_size, size=(C, context_frames)).tolist()
        samples.append(BenchmarkSample(text_len, output_frames, [], magpie=m))
    batch = to_reference_batch(BenchmarkDataset(samples, num_vocabs, V, D), c)
    enc = reference_encoder_features(model, batch)
    ctx = reference_context_features(model, batch)
    for s, e, f in zip(samples, enc, ctx):
        s.input_feat = e.float().reshape(-1).tolist()
        s.context_feat = f.float().reshape(-1).tolist()
        s.context_ids = [0] * (f.shape[0] * num_vocabs)  # the forks' dummy ids: the features replace every row
    extra = {"model_type": "decoder_ce", "context": "baked" if c.baked else "context_encoder", "num_codebooks": C,
             "stacking_factor": S, "config_hash": c.hash()}
    return BenchmarkDataset(samples, num_vocabs, V, D, make_metadata(samples, num_vocabs, V, D, extra))
