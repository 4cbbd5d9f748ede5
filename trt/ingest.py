"""TensorRT-LLM ``tllm_debug`` trees -> canonical magpie-parity dumps (``source="trtllm"``).

Two on-disk layouts are read (trtllm.md 1.2, 1.3):

* **C++ executor** (``ModelRunnerCpp(debug_mode=True)``, ``DebugConfig`` dump-to-file mode):
  ``<root>/PP_<pp>/TP_<tp>/iteration_<N>/<name>.npy``, one folder per executor iteration, always with
  ``request_ids.npy``; context and generation requests can share an iteration.
* **Python GenerationSession** (``debug_mode=True``): ``<root>/PP_<p>/TP_<t>/<name>-step<N>.npy`` (plus ``.txt``
  copies, ignored). Older versions wrote ``<name>.npy`` without ``-step<N>`` (overwritten every step): rejected.

``tree`` may be the ``tllm_debug`` folder, its parent, a ``PP_*`` or ``TP_*`` folder.

Packed activations (``remove_input_padding`` engines) are ``[num_tokens, hidden]``: the context sequences'
tokens first (each sequence's chunk contiguous), then one token per generation sequence, in the order of
``request_ids``. With the fork's CFG a request contributes two consecutive sequences (cond, uncond). Per-request
metadata of the same iteration slices the rows: ``host_request_types`` (0 context, 1 generation; if absent, a
request's first iteration is its context iteration) and ``host_context_lengths`` / ``context_lengths`` (prompt
length per sequence or per request). ``request_ids`` may list one id per request or one per sequence (the fork
gives the uncond slot the id ``UINT64_MAX - id``); both are accepted.

Canonical layout written (what ``parity.reference_capture.dump_reference_infer(..., use_kv_cache=True)`` writes):

* rows: all cond sequences ordered by request id, then (CFG) all uncond sequences in the same order - the
  reference's ``[cond rows 0..B-1; uncond rows B..2B-1]``;
* steps: a request's context iteration is step 0, each of its generation iterations adds 1 (so requests scheduled
  in different iterations still line up). A step is written only when every request has a row there; others are
  listed in ``meta["partial_steps"]`` (a request that finished early);
* step 0 of packed tensors is ``[rows, T, hidden]`` with ``T`` the longest prompt: a prompt's tokens sit at
  positions ``0..n-2`` and its last token (the BOS frame) at ``T-1``, zero elsewhere - the reference's layout,
  which pads the context in front of the BOS frame (equal only where every prompt has the same length: with
  different lengths the engine also puts the BOS frame at a different position, a real difference);
  generation steps are ``[rows, 1, hidden]``;
* last-token outputs (``logits``, ``logits_before_lmhead``) are ``[rows, 1, N]``; ``decoder.norm_out`` and
  ``final_proj`` are written from step 1 on only (the reference captures every prompt position at step 0, the
  engine gathers the last one); the reference's ``logits`` are the CFG-combined rows ``(B, 1, C*V)``: without CFG
  the engine's ``logits`` are written as ``logits`` at every step, with CFG only when ``cfg_scale`` is given
  (combined here as the reference does, ``(1 - s) * uncond + s * cond``, in the engine dtype);
* the decoder engine's ``encoder_output`` input (cond rows of the context iterations) becomes ``encoder.norm_out``
  ``(B, T_text, D)`` (step ``None``, zero padded) when ``encoder_input_lengths`` / ``encoder_output_lengths``
  give the per-sequence lengths;
* prior I/O (``parity.names.ENGINE_IO``): ``attention_prior_focus`` -> ``inference.attention_prior_focus``
  ``(rows,)`` and ``attention_prior_scores`` -> ``inference.attention_prior_scores`` ``(rows, lookahead)``
  (fork_497d0e69: every sequence has them; fork_19ff87be: generation sequences only, so they start at step 1);
  fork_e7109d5's ``scores`` -> ``inference.cross_attention_logits_mean`` ``(rows, T, T_text)`` at step 0 and
  ``(rows, 1, T_text)`` after, each sequence's rows against its own encoder columns (split with
  ``encoder_input_lengths`` / ``encoder_output_lengths``), zero padded to the longest text; none has a reference
  counterpart: compare them with ``--names`` or against another engine dump;
* decoder_ce runs: the decoder engine's ``decoder_context_features`` input (with
  ``decoder_context_features_mask``) of the context iterations becomes ``decoder_input`` at step 0, each sequence's
  prompt rows as above: the feature rows where the mask is set; an unconditional prompt without features is the
  zero service-token embedding (BOS row included); see :func:`_context_feature_rows`. The reference's
  ``decoder_input`` at step 0 of a KV-cached infer dump is [context prefix | BOS frame]: equal where every prompt has
  one length (baked speakers of one table);
* ``embedding_layer_output`` is skipped: it holds the learned position embedding added to the canonical
  ``decoder_input``. Engine I/O that are not activations (KV pool pointers, lengths, ids, ...) are skipped and
  listed in ``meta["skipped"]``; a name that is neither is an error listing every such name.

Every tensor is held in memory until the dump is written (a long debug run needs RAM for all of its activations);
CFG detection reads one activation per iteration an extra time.
Limitations: chunked context (a prompt split over iterations) and beam search are rejected, not unpacked.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from parity.names import GENERATIONS, NameMap, TrtInfo, UnknownNameError, engine_io, is_engine_io_name

UINT64_MAX = 2**64 - 1
CONTEXT, GENERATION = 0, 1

_ITER_RE = re.compile(r"^iteration_(.*)$")
_STEP_RE = re.compile(r"^(?P<name>.+)-step(?P<step>[0-9]+)\.npy$")  # ASCII digits: int() reads them
_RANK_RE = re.compile(r"^(PP|TP)_(\d+)$")

# Per-iteration bookkeeping tensors the ingest reads itself.
_META = {"request_ids", "host_request_types", "host_context_lengths", "context_lengths", "sequence_length",
         "encoder_input_lengths", "encoder_output_lengths", "decoder_context_features_mask"}
# Engine I/O that are not activations (trtllm.md 1.2-1.3, architecture.md 10): skipped, listed in the manifest.
_SKIP_EXACT = {
    "input_ids", "position_ids", "last_token_ids", "cache_indirection", "encoder_max_input_length",
    "cross_attention_mask", "cross_attention_packed_mask", "cross_kv_cache_gen", "skip_cross_attn_blocks",
    "attention_mask",
    "hidden_states_input", "hidden_states_output", "scores", "runtime_perf_knobs", "language_adapter_routings",
}
_SKIP_RE = re.compile(
    r"^(host_.*|.*kv_cache.*|.*key_value.*|.*pool_pointers.*|.*pool_mapping.*|.*block_offsets.*"
    r"|spec_decoding_.*|lora_.*|.*_lora_.*|mrope_.*|prompt_.*|tasks|medusa_.*|.*_debug_.*)$"
)


class IngestError(ValueError):
    """A tree that cannot be ingested; the message names the file or folder."""


class UnreadableFile(IngestError):
    """A .npy file that cannot be loaded (not a question of how the tree is laid out)."""


# --------------------------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Seq:
    """One engine sequence of one iteration, in packed order."""

    request_id: int
    cfg_index: int  # 0 = cond (or no CFG), 1 = uncond
    phase: int  # CONTEXT or GENERATION
    n_tokens: int  # rows it owns in a packed tensor


def _pair_of(cond: int, other: int) -> bool:
    """Is ``other`` the uncond slot id of request ``cond`` (UINT64_MAX - id, its int64 view, or the same id)?"""
    return other in (cond, UINT64_MAX - cond, -1 - cond)


def normalise_request_ids(ids: Sequence[int], use_cfg: bool, where: str = "") -> list[int]:
    """Per-request ids from a ``request_ids`` array that lists one id per request or (CFG) one per sequence."""
    ids = [int(i) for i in ids]
    if use_cfg and len(ids) % 2 == 0 and ids and all(_pair_of(ids[k], ids[k + 1]) for k in range(0, len(ids), 2)) \
            and any(ids[k] != ids[k + 1] for k in range(0, len(ids), 2)):
        ids = ids[0::2]
    if use_cfg and len(ids) % 2 == 0 and ids and all(ids[k] == ids[k + 1] for k in range(0, len(ids), 2)) \
            and len(set(ids)) == len(ids) // 2:
        ids = ids[0::2]
    if len(set(ids)) != len(ids):
        raise IngestError(f"{where}: request_ids {ids} repeat an id")
    return ids


def _per_request(values: Optional[Sequence[int]], n_req: int, use_cfg: bool, what: str,
                 where: str) -> Optional[list[list[int]]]:
    """A per-request or per-sequence array -> per request, the values of its sequences."""
    if values is None:
        return None
    v = [int(x) for x in values]
    k = 2 if use_cfg else 1
    if len(v) == n_req * k:
        return [v[i * k:(i + 1) * k] for i in range(n_req)]
    if len(v) == n_req:
        return [[x] * k for x in v]
    raise IngestError(f"{where}: {what} has {len(v)} entries; expected {n_req} (requests) or {n_req * k} "
                      f"(sequences) for request_ids {n_req} request(s){' with CFG' if use_cfg else ''}")


def batch_sequences(request_ids: Sequence[int], *, use_cfg: bool, request_types: Optional[Sequence[int]] = None,
                    context_lengths: Optional[Sequence[int]] = None, seen: Optional[set] = None,
                    where: str = "") -> list[Seq]:
    """The sequences of one engine batch, in packed order.

    request_types / context_lengths: per request or per sequence. Without request_types a request is in its
    context phase the first time it appears (``seen``: ids already seen). Context sequences must come first.
    """
    ids = normalise_request_ids(request_ids, use_cfg, where)
    n = len(ids)
    types = _per_request(request_types, n, use_cfg, "host_request_types", where)
    lens = _per_request(context_lengths, n, use_cfg, "context lengths", where)
    seqs: list[Seq] = []
    for r, rid in enumerate(ids):
        if types is not None:
            if len(set(types[r])) != 1:
                raise IngestError(f"{where}: request {rid}: its cond and uncond sequences have different "
                                  f"request types {types[r]}")
            phase = types[r][0]
            if phase not in (CONTEXT, GENERATION):
                raise IngestError(f"{where}: request {rid}: unknown request type {phase} (0 context, 1 generation)")
        else:
            phase = GENERATION if seen is not None and rid in seen else CONTEXT
        for ci in range(2 if use_cfg else 1):
            if phase == CONTEXT:
                if lens is None:
                    raise IngestError(f"{where}: request {rid} is in its context phase but the iteration has no "
                                      "host_context_lengths/context_lengths to split its tokens")
                nt = lens[r][ci]
                if nt < 1:
                    raise IngestError(f"{where}: request {rid}: context length {nt}")
            else:
                nt = 1
            seqs.append(Seq(rid, ci, phase, nt))
    phases = [s.phase for s in seqs]
    if phases != sorted(phases):
        raise IngestError(f"{where}: context requests must precede generation requests in the batch "
                          f"(request types in order: {phases})")
    return seqs


def split_packed(arr: np.ndarray, seqs: Sequence[Seq], where: str = "") -> list[np.ndarray]:
    """Split a packed ``[num_tokens, ...]`` tensor into each sequence's rows."""
    total = sum(s.n_tokens for s in seqs)
    if arr.shape[0] != total:
        desc = ", ".join(f"{s.request_id}{'u' if s.cfg_index else ''}:{s.n_tokens}" for s in seqs)
        raise IngestError(f"{where}: inconsistent token counts: {arr.shape[0]} rows, but the batch holds {total} "
                          f"tokens (request[u=uncond]:tokens = {desc})")
    out, pos = [], 0
    for s in seqs:
        out.append(arr[pos:pos + s.n_tokens])
        pos += s.n_tokens
    return out


def pack_rows(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_packed` (used to write trees in tests)."""
    return np.concatenate(list(chunks), axis=0)


def canonical_order(request_ids: Iterable[int], use_cfg: bool) -> list[tuple[int, int]]:
    """(request id, cfg index) of each canonical row: all cond rows by id, then all uncond rows by id."""
    ids = sorted(set(request_ids))
    return [(r, 0) for r in ids] + ([(r, 1) for r in ids] if use_cfg else [])


def place_prompts(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-row prompt chunks ``[n_b, ...]`` -> ``[rows, T, ...]`` (T = max n_b): tokens ``0..n_b-2`` at the
    front, the last token at ``T-1`` (the reference's layout), zeros elsewhere."""
    T = max(c.shape[0] for c in chunks)
    out = np.zeros((len(chunks), T) + chunks[0].shape[1:], dtype=chunks[0].dtype)
    for r, c in enumerate(chunks):
        n = c.shape[0]
        out[r, :n - 1] = c[:n - 1]
        out[r, T - 1] = c[n - 1]
    return out


def unplace_prompts(values: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    """Inverse of :func:`place_prompts` for the given prompt lengths."""
    T = values.shape[1]
    return [np.concatenate([values[r, :n - 1], values[r, T - 1:T]], axis=0) for r, n in enumerate(lengths)]


# --------------------------------------------------------------------------------------------- tree reading


@dataclass
class Iteration:
    index: int  # executor iteration number or GenerationSession step
    where: Path  # folder (executor) or rank folder (python)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Tree:
    layout: str  # "executor" or "python"
    root: Path  # the PP_*/TP_* folder read
    iterations: list[Iteration]
    notes: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted({n for it in self.iterations for n in it.files})


def _entries(d: Path) -> list[Path]:
    """A folder's entries, every one a regular file or a real folder: a link could pull in files from outside the
    tree, and a FIFO or device named like a tensor would block the read."""
    out = []
    for p in sorted(d.iterdir()):
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise IngestError(f"{p}: a symbolic link inside the debug tree; refusing to follow it (copy the target in)")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise IngestError(f"{p}: not a regular file or folder (a FIFO, device or socket) inside the debug tree")
        out.append(p)
    return out


def _rank_dirs(d: Path, kind: str) -> list[Path]:
    out = []
    for p in _entries(d):
        m = _RANK_RE.match(p.name)
        if m and m.group(1) == kind and p.is_dir():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name.split("_")[1]))


def _leaf(tree: Path, notes: list[str]) -> Path:
    d = tree
    if (d / "tllm_debug").is_dir() and not (d / "tllm_debug").is_symlink():
        d = d / "tllm_debug"
    for kind in ("PP", "TP"):
        if _RANK_RE.match(d.name) and d.name.startswith(kind):
            continue
        dirs = _rank_dirs(d, kind)
        if not dirs:
            if kind == "PP" and _RANK_RE.match(d.name):  # a TP_* folder given directly
                continue
            if kind == "TP" and d.name.startswith("PP_"):
                raise IngestError(f"{d}: no TP_<n> folder inside")
            continue
        if len(dirs) > 1:
            notes.append(f"{d}: several {kind} folders {[p.name for p in dirs]}; read {dirs[0].name} (activations "
                         "are replicated across tensor-parallel ranks)")
        d = dirs[0]
    return d


def scan_tree(tree: str | os.PathLike) -> Tree:
    """Find the layout and the iteration/step files of a ``tllm_debug`` tree."""
    tree = Path(tree)
    if not tree.is_dir():
        raise IngestError(f"{tree}: not a folder (expected a tllm_debug tree)")
    notes: list[str] = []
    leaf = _leaf(tree, notes)
    iter_dirs, npys, bad_iters = [], [], []
    for p in _entries(leaf):
        m = _ITER_RE.match(p.name)
        if m and p.is_dir():
            if not re.fullmatch(r"[0-9]+", m.group(1)):  # not isdigit(): '²' is a digit int() cannot read
                bad_iters.append(p.name)
            else:
                iter_dirs.append((int(m.group(1)), p))
        elif p.suffix == ".npy" and p.is_file():
            npys.append(p)
    if bad_iters:
        raise IngestError(f"{leaf}: iteration folders with a non-numeric iteration: {bad_iters}")
    if iter_dirs and npys:
        raise IngestError(f"{leaf}: mixed layouts: iteration_<N>/ folders (C++ executor) next to "
                          f"{len(npys)} .npy files such as {npys[0].name} (Python GenerationSession)")
    if iter_dirs:
        its = []
        for n, p in sorted(iter_dirs):
            files = {f.name[:-4]: f for f in _entries(p) if f.name.endswith(".npy")}
            if files:
                its.append(Iteration(n, p, files))
        if not its:
            raise IngestError(f"{leaf}: iteration folders hold no .npy files")
        return Tree("executor", leaf, its, notes)
    if npys:
        steps: dict[int, Iteration] = {}
        unstepped = []
        for f in npys:
            m = _STEP_RE.match(f.name)
            if not m:
                unstepped.append(f.name)
                continue
            s = int(m.group("step"))
            steps.setdefault(s, Iteration(s, leaf)).files[m.group("name")] = f
        if unstepped:
            raise IngestError(f"{leaf}: step info is missing: {len(unstepped)} .npy file(s) without a '-step<N>' "
                              f"suffix (e.g. {unstepped[:3]}); older GenerationSession versions overwrite one file per "
                              "tensor every step, so the steps cannot be told apart - dump with a version that writes "
                              "<name>-step<N>.npy")
        return Tree("python", leaf, [steps[k] for k in sorted(steps)], notes)
    raise IngestError(f"{tree}: no tllm_debug data found (expected PP_<p>/TP_<t>/iteration_<N>/*.npy or "
                      "PP_<p>/TP_<t>/<name>-step<N>.npy)")


def load_npy(path: Path) -> np.ndarray:
    """A regular ``.npy`` file of a plain numeric array (bool, integer, float of native byte order, at most 8 bytes an
    element), whose header's shape matches its bytes; read without pickles, without blocking, within its size."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{path}: not a regular file (a link, FIFO or device)")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = reader(fh)
            except Exception as exc:  # ValueError for a garbled header, of several kinds
                raise UnreadableFile(f"{path}: unreadable .npy header ({str(exc).splitlines()[0][:120]})") from None
            if dtype.hasobject or dtype.names or dtype.subdtype or dtype.kind not in "biuf" or dtype.itemsize > 8 \
                    or not dtype.isnative:
                raise UnreadableFile(f"{path}: .npy dtype {dtype.str!r} is not a plain native-endian bool/int/float "
                                     "array (structured, object, unicode, datetime, complex, float128 or big-endian)")
            need = math.prod(shape) * dtype.itemsize
            have = st.st_size - fh.tell()
            if need != have:
                raise UnreadableFile(f"{path}: .npy header declares {need} bytes of data, the file holds {have}")
            data = fh.read(need)
    except OSError as exc:
        raise UnreadableFile(f"{path}: cannot read ({exc.strerror or exc})") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


# --------------------------------------------------------------------------------------------- classification


_PRIOR_IO = {"attention_prior_focus", "attention_prior_scores"}
_CONTEXT_FEATURES = {"decoder_context_features", "decoder_context_features_mask"}


def detect_generation(names: Iterable[str], shapes: Optional[Mapping[str, Sequence[int]]] = None) -> str:
    """Which engine generation wrote these debug names (``parity.names.GENERATION_INFO``'s detection column).

    shapes: name -> shape of some dumped tensors; only ``logits`` and ``encoder_output`` are read, to tell
    fork_497d0e69 (``logits`` is the hidden state, as wide as ``encoder_output``) from fork_19ff87be (real
    logits) when the dump lacks the ``decoder_context_features`` inputs that only fork_497d0e69 has among the
    generations of parity/names.py, and to refuse a dump with those inputs and real logits (a later anand-nv engine,
    anand-nv@0c0df9f0 runtimeBuffers.cpp, which parity/names.py does not describe).
    """
    names = set(names)
    if names & (_PRIOR_IO | _CONTEXT_FEATURES):
        widths = {n: tuple(shapes[n])[-1] for n in ("logits", "encoder_output")
                  if shapes and n in shapes and len(tuple(shapes[n])) >= 2}
        if names & _CONTEXT_FEATURES:
            if len(widths) == 2 and widths["logits"] != widths["encoder_output"]:
                raise IngestError(
                    "decoder_context_features with 'logits' wider than 'encoder_output' (real logits, not "
                    "fork_497d0e69's hidden state): an anand-nv engine after 19ff87be (runtimeBuffers.cpp@0c0df9f0 "
                    "takes context features and the prior buffers), which no generation of parity/names.py "
                    "describes; pass generation= to read it as one of them knowingly")
            return "fork_497d0e69"
        if len(widths) == 2:
            return "fork_497d0e69" if widths["logits"] == widths["encoder_output"] else "fork_19ff87be"
        raise IngestError("attention_prior_focus/attention_prior_scores are in the dump but neither "
                          "decoder_context_features (only fork_497d0e69 has that input) nor both 'logits' and "
                          "'encoder_output' (hidden-state logits: fork_497d0e69, real logits: fork_19ff87be) tell "
                          "the generation; pass generation='fork_497d0e69' or 'fork_19ff87be'")
    if any(n.startswith("transformer.layers.") for n in names):
        return "upstream_new"
    if any(re.match(r"^decoder_layers\.\d+\.pos_ff_output$", n) for n in names):
        return "fork_c6ff2312"
    if any(re.match(r"^decoder_layers\.\d+\.mlp_output$", n) for n in names):
        return "upstream_old"
    if "scores" in names or "logits" in names:
        return "fork_e7109d5"
    raise IngestError("cannot tell the engine generation from the debug tensor names; pass generation= "
                      f"(one of {list(GENERATIONS)})")


@dataclass(frozen=True)
class Kind:
    what: str  # "meta", "activation", "engine_io", "encoder_output", "skip"
    canonical: Optional[str] = None
    info: Optional[TrtInfo] = None
    reason: str = ""
    layout: str = ""  # engine_io: parity.names.EngineIO.layout


def classify(name: str, generation: str, names: NameMap) -> Optional[Kind]:
    """How the ingest treats one debug tensor name (None: unknown)."""
    if name in _META:
        return Kind("meta")
    io = engine_io(name, generation)
    if io is not None:
        return Kind("engine_io", io.canonical, layout=io.layout)
    if name == "encoder_output":
        return Kind("encoder_output", "encoder.norm_out")
    if name == "decoder_context_features":  # every generation that takes it (fork_497d0e69, anand-nv after 19ff87be)
        return Kind("context_features", "decoder_input")
    try:
        canon, _i, info = names.to_canonical(name, generation, engine="decoder")
    except UnknownNameError:
        canon = None
    if canon is not None:
        if info.add_positions:
            return Kind("skip", reason="includes the learned position embedding added to the canonical "
                                       f"'{canon}' (no reference capture point)")
        return Kind("activation", canon, info)
    if name in _SKIP_EXACT or _SKIP_RE.match(name) or is_engine_io_name(name):
        return Kind("skip", reason="engine I/O, not an activation")
    return None


# --------------------------------------------------------------------------------------------- ingest


class _Collector:
    def __init__(self) -> None:
        # canonical -> step -> (rid, ci) -> array
        self.data: dict[str, dict[int, dict[tuple[int, int], np.ndarray]]] = {}
        self.encoder: dict[int, np.ndarray] = {}

    def put(self, canon: str, step: int, key: tuple[int, int], arr: np.ndarray, where: str) -> None:
        slot = self.data.setdefault(canon, {}).setdefault(step, {})
        if key in slot:
            raise IngestError(f"{where}: {canon} for request {key[0]} step {step} appears twice")
        slot[key] = arr


def _squeeze_packed(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim < 1:
        raise IngestError(f"{path}: scalar where a packed [num_tokens, hidden] tensor was expected")
    return arr


def _iteration_seqs(tree: Tree, it: Iteration, use_cfg: bool, seen: set, cache: dict) -> list[Seq]:
    where = str(it.where if tree.layout == "executor" else it.where / f"*-step{it.index}.npy")

    def get(name: str) -> Optional[np.ndarray]:
        p = it.files.get(name)
        if p is None:
            return None
        if p not in cache:
            cache[p] = load_npy(p)
        return cache[p]

    types = get("host_request_types")
    lens = get("host_context_lengths")
    if lens is None:
        lens = get("context_lengths")
    if tree.layout == "executor":
        rids = get("request_ids")
        if rids is None:
            raise IngestError(f"{it.where}: no request_ids.npy (the C++ executor always writes it; "
                              "is this a complete iteration folder?)")
        rids = rids.reshape(-1).tolist()
    else:
        n_seq = len(lens.reshape(-1)) if lens is not None else (len(types.reshape(-1)) if types is not None else None)
        if n_seq is None:
            raise IngestError(f"{where}: no context_lengths/host_context_lengths/host_request_types to count the "
                              "sequences of this step")
        k = 2 if use_cfg else 1
        if n_seq % k:
            raise IngestError(f"{where}: {n_seq} sequences cannot be CFG (cond, uncond) pairs")
        rids = list(range(n_seq // k))
        if types is None:
            types = np.full(n_seq, CONTEXT if it.index == 0 else GENERATION)
    return batch_sequences(rids, use_cfg=use_cfg,
                           request_types=None if types is None else types.reshape(-1).tolist(),
                           context_lengths=None if lens is None else lens.reshape(-1).tolist(),
                           seen=seen, where=where)


def _infer_cfg(tree: Tree, kinds: dict[str, Kind]) -> bool:
    """CFG or not, from ids paired as (id, UINT64_MAX - id) or from which choice makes the row counts agree."""
    for it in tree.iterations:
        p = it.files.get("request_ids")
        if p is not None:
            ids = [int(x) for x in load_npy(p).reshape(-1).tolist()]
            if len(ids) % 2 == 0 and ids and all(_pair_of(ids[k], ids[k + 1]) and ids[k] != ids[k + 1]
                                                 for k in range(0, len(ids), 2)):
                return True
    verdicts, errors = [], []
    for cfg in (False, True):
        ok, seen, cache = True, set(), {}
        try:
            for it in tree.iterations:
                seqs = _iteration_seqs(tree, it, cfg, seen, cache)
                seen |= {s.request_id for s in seqs}
                for name, p in it.files.items():
                    k = kinds[name]
                    if k.what not in ("activation", "context_features"):
                        continue
                    arr = _squeeze_packed(load_npy(p), p)
                    packed = k.what == "context_features" or k.info.layout == "packed_tokens"
                    want = sum(s.n_tokens for s in seqs) if packed else len(seqs)
                    if arr.shape[0] != want:
                        ok = False
                    break
                if not ok:
                    break
        except UnreadableFile:
            raise
        except IngestError as exc:
            ok = False
            errors.append(f"{'with' if cfg else 'without'} CFG: {exc}")
        verdicts.append(ok)
    if verdicts == [True, False]:
        return False
    if verdicts == [False, True]:
        return True
    why = f" ({'; '.join(errors)})" if errors else ""
    raise IngestError(f"{tree.root}: cannot tell whether the run used CFG from the row counts; pass use_cfg={why}")


def ingest_trtllm(tree: str | os.PathLike, out_dir: str | os.PathLike, *, generation: Optional[str] = None,
                  batch_size: Optional[int] = None, use_cfg: Optional[bool] = None,
                  cfg_scale: Optional[float] = None, overwrite: bool = False,
                  config_hash: Optional[str] = None) -> Path:
    """Read a ``tllm_debug`` tree (either layout) and write a canonical dump to ``out_dir``. See the module doc.

    generation: one of ``parity.names.GENERATIONS`` (default: detected from the tensor names).
    batch_size: expected number of requests (checked). use_cfg: default detected (C++ layout) or False (Python).
    cfg_scale: with CFG, also write the reference's CFG-combined ``logits``.
    config_hash: the reference config hash of the checkpoint the engine was converted from
    (``MagpieConfig.hash()``), recorded so ``compare`` refuses a dump of another model.
    """
    from parity.dump import DumpWriter

    t = scan_tree(tree)
    all_names = t.names()
    if generation is None:
        needs_widths = bool(set(all_names) & (_PRIOR_IO | _CONTEXT_FEATURES))
        generation = detect_generation(all_names, _shapes(t, ("logits", "encoder_output")) if needs_widths else None)
    elif generation not in GENERATIONS:
        raise IngestError(f"unknown generation {generation!r}; known: {list(GENERATIONS)}")
    nm = NameMap()
    kinds: dict[str, Kind] = {}
    unknown = []
    for n in all_names:
        k = classify(n, generation, nm)
        if k is None:
            unknown.append(n)
        else:
            kinds[n] = k
    if unknown:
        raise IngestError(f"{t.root}: {len(unknown)} debug tensor name(s) unknown for generation {generation}: "
                          f"{unknown} (not activations of parity.names nor known engine I/O; pass the right "
                          "generation= or extend parity/names.py)")
    if t.layout == "executor":
        for it in t.iterations:
            if "request_ids" not in it.files:
                raise IngestError(f"{it.where}: no request_ids.npy (the C++ executor always writes it; "
                                  "is this a complete iteration folder?)")
    if use_cfg is None:
        use_cfg = _infer_cfg(t, kinds) if t.layout == "executor" else False
        cfg_note = f"use_cfg={use_cfg} ({'detected' if t.layout == 'executor' else 'assumed; pass use_cfg'})"
    else:
        cfg_note = f"use_cfg={use_cfg} (given)"

    col = _Collector()
    next_step: dict[int, int] = {}
    prompt_len: dict[tuple[int, int], int] = {}
    skipped: dict[str, str] = {}
    seen: set = set()
    dtype_seen: Optional[np.dtype] = None
    layout_of: dict[str, str] = {}
    ragged: set[str] = set()  # canonical names whose per-row chunks may differ in their trailing sizes
    for it in t.iterations:
        cache: dict[Path, np.ndarray] = {}
        seqs = _iteration_seqs(t, it, use_cfg, seen, cache)
        where_it = it.where if t.layout == "executor" else it.where / f"<name>-step{it.index}.npy"
        steps = {}
        for s in seqs:
            if s.cfg_index:  # the uncond sequence follows its cond sequence and shares its step
                continue
            if s.phase == CONTEXT:
                if s.request_id in next_step:
                    raise IngestError(f"{where_it}: request {s.request_id} is in its context phase again (chunked "
                                      "context or a reused request id: not supported)")
                steps[s.request_id] = 0
            else:
                if s.request_id not in next_step:
                    raise IngestError(f"{where_it}: request {s.request_id} generates before any context iteration "
                                      "of it was seen (is the tree missing its first iterations?)")
                steps[s.request_id] = next_step[s.request_id]
        for s in seqs:
            if s.phase == CONTEXT:
                prompt_len[(s.request_id, s.cfg_index)] = s.n_tokens
        for name, path in sorted(it.files.items()):
            k = kinds[name]
            if k.what == "meta":
                continue
            if k.what == "skip":
                skipped.setdefault(name, k.reason)
                continue
            arr = cache.get(path)
            if arr is None:
                arr = load_npy(path)
            if k.what == "encoder_output":
                _encoder_rows(arr, path, it, seqs, cache, col, skipped)
                continue
            if k.what == "context_features":
                for s, c in _context_feature_rows(arr, path, it, seqs, cache, skipped):
                    col.put(k.canonical, steps[s.request_id], (s.request_id, s.cfg_index), c, str(path))
                    layout_of[k.canonical] = "packed_tokens"
                    if dtype_seen is None and c.dtype.kind == "f":
                        dtype_seen = c.dtype
                continue
            if k.what == "engine_io":
                if k.layout == "per_sequence_block":
                    for s, c in _block_rows(arr, path, it, seqs, use_cfg, cache, skipped, name):
                        col.put(k.canonical, steps[s.request_id], (s.request_id, s.cfg_index), c, str(path))
                    layout_of[k.canonical] = "packed_tokens"
                    ragged.add(k.canonical)
                    continue
                owners = [s for s in seqs if s.phase == GENERATION] if k.layout.startswith("per_gen_") else seqs
                flat = arr.reshape(-1)
                if not owners:
                    if flat.shape[0]:
                        raise IngestError(f"{path}: {flat.shape[0]} values but no generation sequence in the "
                                          f"iteration ({k.layout}: only generation sequences have them)")
                    continue
                what = "generation sequences" if owners is not seqs else "sequences"
                if flat.shape[0] % len(owners):
                    raise IngestError(f"{path}: inconsistent token counts: {flat.shape[0]} values for "
                                      f"{len(owners)} {what}")
                per = flat.reshape(len(owners), -1)
                if k.layout in ("per_sequence", "per_gen_sequence"):
                    if per.shape[1] != 1:
                        raise IngestError(f"{path}: {flat.shape[0]} values, expected one per {what[:-1]} "
                                          f"({len(owners)})")
                    per = per[:, 0]
                for s, row in zip(owners, per):
                    col.put(k.canonical, steps[s.request_id], (s.request_id, s.cfg_index), np.array(row), str(path))
                continue
            arr = _squeeze_packed(arr, path)
            if dtype_seen is None and arr.dtype.kind == "f":
                dtype_seen = arr.dtype
            if k.info.layout == "packed_tokens":
                chunks = split_packed(arr, seqs, str(path))
            else:
                if arr.shape[0] != len(seqs):
                    raise IngestError(f"{path}: inconsistent token counts: {arr.shape[0]} rows for the last tokens "
                                      f"of {len(seqs)} sequences")
                chunks = [arr[i:i + 1] for i in range(len(seqs))]
            layout_of[k.canonical] = k.info.layout
            for s, c in zip(seqs, chunks):
                col.put(k.canonical, steps[s.request_id], (s.request_id, s.cfg_index), c, str(path))
        for rid, st in steps.items():
            next_step[rid] = st + 1
        seen |= {s.request_id for s in seqs}

    rids = sorted(next_step)
    if batch_size is not None and len(rids) != batch_size:
        raise IngestError(f"{t.root}: {len(rids)} request(s) {rids} in the tree, batch_size={batch_size}")
    order = canonical_order(rids, use_cfg)
    B = len(rids)

    # Which canonical names each engine tensor feeds, and in which steps.
    out: list[tuple[str, Optional[int], torch.Tensor]] = []
    partial: dict[str, list[int]] = {}
    rank = {n: i for i, n in enumerate(nm.all_canonical(64, 64))}
    if col.encoder:
        missing = [r for r in rids if r not in col.encoder]
        if missing:
            skipped["encoder_output"] = f"no context-iteration rows for request(s) {missing}"
        else:
            out.append(("encoder.norm_out", None, torch.from_numpy(place_left([col.encoder[r] for r in rids]))))
    for canon in sorted(col.data, key=lambda c: rank.get(c, len(rank))):
        per_step = col.data[canon]
        targets = [canon]
        packed = layout_of.get(canon) == "packed_tokens"
        if canon == "logits":
            targets = ["final_proj"]
            if not use_cfg:
                targets.insert(0, "logits")
            elif cfg_scale is not None:
                targets.insert(0, "logits(cfg)")
            else:
                skipped["logits"] = ("CFG run without cfg_scale: the engine's (cond, uncond) rows are written as "
                                     "final_proj; pass cfg_scale to also write the CFG-combined logits")
        for step in sorted(per_step):
            rows = per_step[step]
            if any(key not in rows for key in order):
                partial.setdefault(canon, []).append(step)
                continue
            chunks = [rows[key] for key in order]
            if canon in ragged:  # per-sequence text lengths differ: zero pad to the longest
                chunks = pad_trailing(chunks)
            for tgt in targets:
                if step == 0 and tgt in ("final_proj", "decoder.norm_out"):
                    skipped[f"{tgt}@0"] = ("the engine gathers only the last prompt token at step 0; the reference "
                                           "captures every prompt position")
                    continue
                if packed and step == 0:
                    val = place_prompts(chunks)
                else:
                    val = np.stack(chunks)  # [rows, 1, ...] (activations) or [rows, ...] (engine I/O)
                ten = torch.from_numpy(np.ascontiguousarray(val))
                name = tgt
                if tgt == "logits(cfg)":
                    name = "logits"
                    s = float(cfg_scale)
                    ten = (1 - s) * ten[B:] + s * ten[:B]
                out.append((name, step, ten))
    if not out:
        raise IngestError(f"{t.root}: no activations to ingest (names found: {all_names})")
    out.sort(key=lambda x: (-1 if x[1] is None else x[1], rank.get(x[0], len(rank))))

    meta = {
        "tree": str(Path(tree)),
        "read": str(t.root),
        "tree_layout": t.layout,
        "generation": generation,
        "request_ids": rids,
        "row_order": [f"{r}{':uncond' if ci else ''}" for r, ci in order],
        "prompt_lengths": {f"{r}{':uncond' if ci else ''}": n for (r, ci), n in sorted(prompt_len.items())},
        "cfg": cfg_note,
        "iterations": [it.index for it in t.iterations],
        "skipped": dict(sorted(skipped.items())),
        "partial_steps": partial,
        "engine_only": sorted({n for n, _, _ in out if n.startswith("inference.")}),
        "notes": t.notes,
    }
    layout = {"mode": "infer", "use_cfg": bool(use_cfg), "use_kv_cache": True}
    dtype = str(torch.from_numpy(np.zeros(0, dtype=dtype_seen)).dtype).replace("torch.", "") if dtype_seen else "float32"
    with DumpWriter(out_dir, source="trtllm", config_hash=config_hash, dtype=dtype, layout=layout, meta=meta,
                    overwrite=overwrite) as w:
        for name, step, ten in out:
            w.add(name, ten, step=step)
    return Path(out_dir)


def place_left(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Right-pad ``[n_b, ...]`` chunks with zeros to ``[rows, max n_b, ...]``."""
    T = max(c.shape[0] for c in chunks)
    out = np.zeros((len(chunks), T) + chunks[0].shape[1:], dtype=chunks[0].dtype)
    for r, c in enumerate(chunks):
        out[r, :c.shape[0]] = c
    return out


def _encoder_rows(arr: np.ndarray, path: Path, it: Iteration, seqs: list[Seq], cache: dict, col: _Collector,
                  skipped: dict) -> None:
    """The decoder engine's ``encoder_output`` input: packed encoder rows of the context sequences."""
    arr = _squeeze_packed(arr, path)
    ctx = [s for s in seqs if s.phase == CONTEXT]
    if arr.shape[0] == 0 or not ctx:
        return
    lens = None
    for n in ("encoder_input_lengths", "encoder_output_lengths"):
        p = it.files.get(n)
        if p is not None:
            lens = [int(x) for x in (cache[p] if p in cache else load_npy(p)).reshape(-1)]
            break
    if lens is None:
        skipped.setdefault("encoder_output", "no encoder_input_lengths/encoder_output_lengths to split it")
        return
    if len(lens) == len(seqs):
        lens = [n for n, s in zip(lens, seqs) if s.phase == CONTEXT]
    elif len(lens) != len(ctx):
        raise IngestError(f"{path}: {len(lens)} encoder lengths for {len(seqs)} sequences ({len(ctx)} in context)")
    if sum(lens) != arr.shape[0]:
        raise IngestError(f"{path}: inconsistent token counts: {arr.shape[0]} encoder rows, the encoder lengths "
                          f"{lens} of the context sequences sum to {sum(lens)}")
    pos = 0
    for s, n in zip(ctx, lens):
        if s.cfg_index == 0:
            col.encoder[s.request_id] = arr[pos:pos + n]
        pos += n


def _context_feature_rows(arr: np.ndarray, path: Path, it: Iteration, seqs: list[Seq], cache: dict,
                          skipped: dict) -> list[tuple[Seq, np.ndarray]]:
    """The decoder engine's ``decoder_context_features`` input ``[num_tokens, D]`` -> per context sequence its prompt
    rows as the decoder's input before the learned positions (canonical ``decoder_input`` at step 0).

    The engine's embedding takes the feature row where ``decoder_context_features_mask`` is set, else the mean of the
    token embeddings (architecture.md 4.1, rmittal 497d0e69 model.py); the runtime sets the mask over a context
    request's prompt rows, for the unconditional sequence too when given ``[cond; uncond]`` rows, and leaves it
    cleared elsewhere (anand-nv@0c0df9f0 runtimeBuffers.cpp ``setFromInputs``). An unconditional prompt without
    features holds the service token ``vocab_size`` in every row, whose embedding row is zero (convert_checkpoint.py
    appends it): those rows are zeros here, BOS row included (the known difference from NeMo, which keeps the BOS
    frame). A conditional prompt without features (context given as ids) or a partly set mask is skipped with the
    reason: its token embeddings are not in the dump. Generation tokens' rows are never the decoder's input."""
    ctx = [s for s in seqs if s.phase == CONTEXT]
    if not ctx:
        return []
    mp = it.files.get("decoder_context_features_mask")
    if mp is None:
        skipped.setdefault("decoder_context_features", "no decoder_context_features_mask to tell the feature rows from "
                                                       "the token-embedding rows")
        return []
    arr = _squeeze_packed(arr, path)
    mask = (cache[mp] if mp in cache else load_npy(mp)).reshape(-1).astype(bool)
    if arr.ndim != 2:
        raise IngestError(f"{path}: expected a 2-D [num_tokens, hidden] tensor, got shape {arr.shape}")
    if mask.shape[0] != arr.shape[0]:
        raise IngestError(f"{mp}: inconsistent token counts: {mask.shape[0]} mask entries for the {arr.shape[0]} rows "
                          f"of {path.name}")
    out = []
    for s, rows, m in zip(seqs, split_packed(arr, seqs, str(path)), split_packed(mask, seqs, str(mp))):
        if s.phase != CONTEXT:
            continue
        if m.all():
            out.append((s, rows))
        elif not m.any() and s.cfg_index == 1:
            out.append((s, np.zeros_like(rows)))  # the zero service-token row in every position
        else:
            why = ("the conditional prompt has no feature rows (context given as ids)" if not m.any() else
                   f"the mask is set on {int(m.sum())} of the prompt's {m.shape[0]} rows")
            skipped["decoder_context_features"] = f"{mp.parent.name}: request {s.request_id}: {why}"
            return []
    return out


def pad_trailing(chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Zero-pad every chunk's dimensions after the first to the largest among the chunks."""
    if len({c.shape[1:] for c in chunks}) <= 1:
        return list(chunks)
    ndim = {c.ndim for c in chunks}
    if len(ndim) != 1:
        raise IngestError(f"chunks of different ranks {sorted(ndim)} cannot be stacked")
    top = [max(c.shape[d] for c in chunks) for d in range(1, chunks[0].ndim)]
    out = []
    for c in chunks:
        p = np.zeros((c.shape[0], *top), dtype=c.dtype)
        p[(slice(None),) + tuple(slice(0, n) for n in c.shape[1:])] = c
        out.append(p)
    return out


def _shapes(tree: Tree, names: Sequence[str]) -> dict[str, tuple]:
    """The shape of the first dump of each of ``names`` (read from the .npy header only)."""
    out: dict[str, tuple] = {}
    for it in tree.iterations:
        for n in names:
            if n not in out and n in it.files:
                try:
                    out[n] = tuple(np.load(it.files[n], mmap_mode="r", allow_pickle=False).shape)
                except Exception as exc:  # garbled header: let the ingest itself report the file later
                    raise UnreadableFile(f"{it.files[n]}: unreadable .npy: {type(exc).__name__}: {exc}") from None
        if len(out) == len(names):
            break
    return out


def _sequence_encoder_lengths(it: Iteration, seqs: list[Seq], use_cfg: bool, cache: dict) -> Optional[list[int]]:
    """Each sequence's encoder length in this iteration, from encoder_input_lengths / encoder_output_lengths (one
    per sequence or one per request), or None if the iteration has neither."""
    for n in ("encoder_input_lengths", "encoder_output_lengths"):
        p = it.files.get(n)
        if p is None:
            continue
        vals = [int(x) for x in (cache[p] if p in cache else load_npy(p)).reshape(-1)]
        k = 2 if use_cfg else 1
        per_req = _per_request(vals, len(seqs) // k, use_cfg, n, str(p))
        return [x for r in per_req for x in r]
    return None


def _block_rows(arr: np.ndarray, path: Path, it: Iteration, seqs: list[Seq], use_cfg: bool, cache: dict,
                skipped: dict, name: str) -> list[tuple[Seq, np.ndarray]]:
    """A ``[num_tokens, sum of the sequences' encoder lengths]`` tensor (fork_e7109d5 ``scores``) -> per sequence
    its own block: the rows of its tokens against the columns of its encoder positions."""
    arr = _squeeze_packed(arr, path)
    if arr.ndim != 2:
        raise IngestError(f"{path}: expected a 2-D [num_tokens, encoder tokens] tensor, got shape {arr.shape}")
    lens = _sequence_encoder_lengths(it, seqs, use_cfg, cache)
    if lens is None:
        if len(seqs) != 1:
            skipped.setdefault(name, "no encoder_input_lengths/encoder_output_lengths to split its columns")
            return []
        lens = [arr.shape[1]]
    if sum(lens) != arr.shape[1]:
        raise IngestError(f"{path}: inconsistent token counts: {arr.shape[1]} columns, the sequences' encoder "
                          f"lengths {lens} sum to {sum(lens)}")
    out, col = [], 0
    for s, rows, n in zip(seqs, split_packed(arr, seqs, str(path)), lens):
        out.append((s, np.ascontiguousarray(rows[:, col:col + n])))
        col += n
    return out
