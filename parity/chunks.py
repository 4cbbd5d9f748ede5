"""Chunk files: the inputs of consecutive ``generate_speech`` calls sharing one ``ChunkState`` (what NeMo's
``do_tts`` and long-form runner run), in one format for the fixtures (``fixtures/make_fixtures.py``:
``<case>.chunks.safetensors``) and ``magpie-parity batch``; ``dump --mode generate-speech`` and
``infer --mode generate-speech`` read it.

The format, one safetensors file holding one or more chunk *sets* (a set = the calls of one run):

* tensors ``<set>.chunk<k>.<key>`` for chunk k = 0 .. n-1: ``text`` (B, T_chunk) integer token ids (this chunk's
  tokens, EOS included, zero padded), ``text_lens`` (B,) integer, the speaker conditioning -- ``speaker_indices``
  (B,) int64 (a baked checkpoint) or ``context_audio_codes`` (B, C, T_ctx) / ``context_audio_codes_lens`` (B,)
  int64 --, ``end_of_text`` (B,) bool and ``beginning_of_text`` () bool (as NeMo's ``generate_speech`` takes them);
* one metadata key, ``chunks``: a JSON object ``{"language", "tokenizer" (NeMo's tokenizer name), "sets": {<set>:
  {"n_chunks", "texts" (per item), "chunk_texts" (per item, its sentence chunks before padding)}}}``, written with
  sorted keys (safetensors writes several metadata keys in a random order; the file must be reproducible).

A chunk file is input like any other: :func:`read_chunk_set` checks what a run needs before any work (keys,
dtypes, shapes, one batch size for every chunk, ``end_of_text`` per item, a first chunk that begins the text)
and says what is wrong in one line (:class:`ChunkFileError`). Imports nothing of the project at module level.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

# The batch keys of one generate_speech chunk, as a dump records them (``chunk.<key>``); NeMo reads these and
# nothing else.
CHUNK_KEYS = ("text", "text_lens", "speaker_indices", "context_audio_codes", "context_audio_codes_lens")
FLAG_KEYS = ("end_of_text", "beginning_of_text")
METADATA_KEY = "chunks"
# A set name is a key prefix: no dots (the key separator), printable.
_SET_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_KEY = re.compile(r"^(?P<set>[^.]+)\.chunk(?P<k>0|[1-9][0-9]{0,5})\.(?P<key>[a-z_]+)$")
MAX_CHUNKS = 100_000


class ChunkFileError(ValueError):
    """A chunk file that cannot be read or does not describe runnable generate_speech calls (one line)."""


@dataclass
class ChunkSet:
    """One set of a chunk file. ``chunks``: per call ``{"batch": {key: tensor}, "end_of_text": [bool] * B,
    "beginning_of_text": bool}`` (the form ``parity.nemo_capture.dump_nemo_generate_speech`` and
    ``parity.reference_capture.dump_reference_generate_speech`` take); ``texts`` / ``chunk_texts`` per item."""

    name: str
    chunks: list[dict]
    texts: list[str] = field(default_factory=list)
    chunk_texts: list[list[str]] = field(default_factory=list)
    language: str = "en"
    tokenizer: str = ""

    @property
    def batch_size(self) -> int:
        return int(self.chunks[0]["batch"]["text"].shape[0])


# ------------------------------------------------------------------------------------------------ writing


def chunk_file_bytes(sets: Sequence[ChunkSet]) -> bytes:
    """The bytes of a chunk file holding ``sets`` (all tokenized by one tokenizer for one language)."""
    import torch
    from safetensors.torch import save

    if not sets:
        raise ValueError("a chunk file needs at least one chunk set")
    langs = {s.language for s in sets}
    tokenizers = {s.tokenizer for s in sets}
    if len(tokenizers) != 1:
        raise ValueError(f"chunk sets tokenized by different tokenizers: {sorted(tokenizers)}")
    if len(langs) != 1:
        raise ValueError(f"chunk sets of different languages: {sorted(langs)}")
    names = [s.name for s in sets]
    if len(set(names)) != len(names) or not all(_SET_NAME.match(n) for n in names):
        raise ValueError(f"chunk set names must be distinct and match {_SET_NAME.pattern}: {names}")
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {"language": langs.pop(), "tokenizer": tokenizers.pop(), "sets": {}}
    for s in sets:
        meta["sets"][s.name] = {"n_chunks": len(s.chunks), "texts": list(s.texts),
                                "chunk_texts": [list(x) for x in s.chunk_texts]}
        for k, c in enumerate(s.chunks):
            for key, v in c["batch"].items():
                tensors[f"{s.name}.chunk{k}.{key}"] = v.detach().cpu().clone().contiguous()  # no shared storage
            tensors[f"{s.name}.chunk{k}.end_of_text"] = torch.tensor(c["end_of_text"], dtype=torch.bool)
            tensors[f"{s.name}.chunk{k}.beginning_of_text"] = torch.tensor(c["beginning_of_text"], dtype=torch.bool)
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def write_chunk_file(path: str | os.PathLike, sets: Sequence[ChunkSet]) -> Path:
    """Write a chunk file atomically (``parity.files``: a temp file beside it, renamed into place)."""
    from parity.files import atomic_write_bytes

    return atomic_write_bytes(path, chunk_file_bytes(sets))


def is_chunk_file(path: str | os.PathLike) -> bool:
    """A chunk file this format describes: a safetensors file whose metadata holds a ``chunks`` JSON object with
    ``sets``. Only its header is read (at most 1 MiB); how ``batch --out`` recognises a file it may replace."""
    from parity.files import read_safetensors_header

    header = read_safetensors_header(path, 1 << 20)
    if header is None:
        return False
    try:
        meta = json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, RecursionError, KeyError, TypeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("sets"), dict)


# ------------------------------------------------------------------------------------------------ reading


def _metadata(f, where: str) -> dict:
    raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ChunkFileError(f"{where}: not a chunk file (no '{METADATA_KEY}' metadata; `magpie-parity batch` writes "
                             "them)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise ChunkFileError(f"{where}: its '{METADATA_KEY}' metadata is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sets"), dict) or not meta["sets"]:
        raise ChunkFileError(f"{where}: its '{METADATA_KEY}' metadata has no chunk sets")
    return meta


def chunk_set_names(path: str | os.PathLike) -> list[str]:
    """The set names of a chunk file (sorted)."""
    with _open(path) as f:
        return sorted(_metadata(f, str(path))["sets"])


def _open(path):
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ChunkFileError(f"{p}: no such chunk file" if not p.exists() else f"{p}: not a file")
    try:
        return safe_open(str(p), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ChunkFileError(f"{p}: not a readable safetensors chunk file ({e})") from None


def read_chunk_set(path: str | os.PathLike, name: Optional[str] = None) -> ChunkSet:
    """The chunk set ``name`` of a chunk file (``None``: the file's only set), checked: every key of the set known,
    chunks 0 .. n_chunks-1 each with ``text``, ``text_lens``, ``end_of_text`` and ``beginning_of_text``; integer
    inputs, bool flags; one batch size B for every chunk (one ``ChunkState`` carries them), ``end_of_text`` (B,),
    ``beginning_of_text`` a scalar, true for chunk 0 (a later chunk needs the state of the call before it), and
    the same conditioning keys in every chunk. Whether the tensors fit a checkpoint is the caller's check
    (``reference.batch.validate_batch`` per chunk). Raises :class:`ChunkFileError` (one line naming the file, set,
    chunk and key)."""
    import torch
    from safetensors import SafetensorError

    where = str(path)
    with _open(path) as f:
        meta = _metadata(f, where)
        sets = meta["sets"]
        if name is None:
            if len(sets) != 1:
                raise ChunkFileError(f"{where}: holds the chunk sets {sorted(sets)}; name one (--chunk-set)")
            name = next(iter(sets))
        if name not in sets:
            raise ChunkFileError(f"{where}: no chunk set {name!r} (it holds {sorted(sets)})")
        info = sets[name]
        n = info.get("n_chunks") if isinstance(info, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHUNKS:
            raise ChunkFileError(f"{where}: chunk set {name!r} has n_chunks {n!r}; expected an integer in "
                                 f"[1, {MAX_CHUNKS}]")
        keys: dict[int, set[str]] = {}
        for full in f.keys():
            if not full.startswith(f"{name}."):
                continue
            m = _KEY.match(full)
            if m is None or m["set"] != name:
                raise ChunkFileError(f"{where}: key {full!r} is not <set>.chunk<k>.<key>")
            k, key = int(m["k"]), m["key"]
            if key not in CHUNK_KEYS + FLAG_KEYS:
                raise ChunkFileError(f"{where}: key {full!r}: unknown input {key!r} (known: "
                                     f"{', '.join(CHUNK_KEYS + FLAG_KEYS)})")
            if k >= n:
                raise ChunkFileError(f"{where}: key {full!r}: chunk {k} beyond n_chunks {n} of set {name!r}")
            keys.setdefault(k, set()).add(key)
        chunks: list[dict] = []
        B: Optional[int] = None
        conditioning: Optional[set[str]] = None
        for k in range(n):
            here = f"{where}: chunk set {name!r} chunk {k}"
            have = keys.get(k, set())
            missing = [key for key in ("text", "text_lens") + FLAG_KEYS if key not in have]
            if missing:
                raise ChunkFileError(f"{here}: missing {', '.join(missing)}")
            try:
                t = {key: f.get_tensor(f"{name}.chunk{k}.{key}") for key in sorted(have)}
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise ChunkFileError(f"{here}: unreadable tensor ({e})") from None
            for key, v in t.items():
                if key in FLAG_KEYS:
                    if v.dtype != torch.bool:
                        raise ChunkFileError(f"{here}: {key} must be bool, got {v.dtype}")
                elif v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                    raise ChunkFileError(f"{here}: {key} must hold integers, got {v.dtype}")
            if t["text"].dim() != 2:
                raise ChunkFileError(f"{here}: text must be (B, T), got shape {tuple(t['text'].shape)}")
            b = int(t["text"].shape[0])
            if B is None:
                B = b
            elif b != B:
                raise ChunkFileError(f"{here}: a batch of {b} items, chunk 0 has {B}; the chunks of one run share "
                                     "one ChunkState, made for one batch size")
            if tuple(t["end_of_text"].shape) != (B,):
                raise ChunkFileError(f"{here}: end_of_text must hold one bool per item, shape ({B},), got "
                                     f"{tuple(t['end_of_text'].shape)}")
            if t["beginning_of_text"].dim() != 0:
                raise ChunkFileError(f"{here}: beginning_of_text must be one bool (shape ()), got "
                                     f"{tuple(t['beginning_of_text'].shape)}")
            bot = bool(t["beginning_of_text"])
            if k == 0 and not bot:
                raise ChunkFileError(f"{here}: beginning_of_text is false; the first chunk begins the text (a later "
                                     "chunk needs the state of the call before it)")
            cond = {key for key in t if key in CHUNK_KEYS[2:]}
            if conditioning is None:
                conditioning = cond
            elif cond != conditioning:
                raise ChunkFileError(f"{here}: conditioning {sorted(cond)}, chunk 0 has {sorted(conditioning)}")
            chunks.append({"batch": {key: t[key] for key in sorted(t) if key not in FLAG_KEYS},
                           "end_of_text": [bool(x) for x in t["end_of_text"].tolist()],
                           "beginning_of_text": bot})
        texts = info.get("texts", [])
        chunk_texts = info.get("chunk_texts", [])
        return ChunkSet(name=name, chunks=chunks,
                        texts=list(texts) if isinstance(texts, list) else [],
                        chunk_texts=list(chunk_texts) if isinstance(chunk_texts, list) else [],
                        language=str(meta.get("language", "")), tokenizer=str(meta.get("tokenizer", "")))


def chunk_inputs(chunks: Sequence[Mapping]) -> dict[str, list[int]]:
    """A dump manifest's ``inputs`` of a generate_speech run: ``chunk<k>.<key>`` -> shape."""
    return {f"chunk{k}.{key}": list(v.shape) for k, c in enumerate(chunks) for key, v in c["batch"].items()}


def concatenate_chunk_codes(chunks: Sequence[Mapping], outputs: Sequence[Any]):
    """Each item's codes over all chunks, as NeMo's long-form runner (and, for one item, ``do_tts``) puts them
    together: per chunk the first ``predicted_codes_lens[b]`` frames, skipping an item's padding chunk (its text
    ended and this chunk is one token); zero padded to the longest item (at least 1 frame wide, as the runner).
    Returns ``(codes (B, C, T), lens (B,) int64)``."""
    import torch

    B = int(outputs[0].predicted_codes.shape[0])
    C = int(outputs[0].predicted_codes.shape[1])
    parts: list[list] = [[] for _ in range(B)]
    for c, out in zip(chunks, outputs):
        lens = c["batch"]["text_lens"].tolist()
        for b in range(B):
            if c["end_of_text"][b] and int(lens[b]) == 1:
                continue
            n = int(out.predicted_codes_lens[b])
            if n > 0:
                parts[b].append(out.predicted_codes[b, :, :n].cpu())
    lens = torch.tensor([sum(int(p.shape[-1]) for p in ps) for ps in parts], dtype=torch.long)
    codes = torch.zeros(B, C, max(int(lens.max()), 1), dtype=outputs[0].predicted_codes.dtype)
    for b, ps in enumerate(parts):
        if ps:
            cat = torch.cat(ps, dim=-1)
            codes[b, :, : cat.shape[-1]] = cat
    return codes, lens


def text_windows(chunks: Sequence[Mapping], history_len: int = 20) -> list[int]:
    """Per chunk, the longest text window ``generate_speech`` encodes (NeMo's ``_prepare_chunked_text_tensors``):
    the previous window followed by the chunk, cut after the first chunk to the chunk plus at most
    ``history_len`` (NeMo's ``history_len_heuristic``) tokens before it. Items that ended in an earlier call get a
    window of 1, which this bound does not assume: exact for one item (``do_tts``), an upper bound otherwise."""
    prev: Optional[list[int]] = None
    out = []
    for c in chunks:
        lens = [int(x) for x in c["batch"]["text_lens"].tolist()]
        cur = [(prev[i] if prev is not None else 0) + n for i, n in enumerate(lens)]
        if not c["beginning_of_text"]:
            cur = [min(w, n + min(n, history_len)) for w, n in zip(cur, lens)]
        out.append(max(cur))
        prev = cur
    return out
