"""Chunked generation equal to NeMo 3.0.0's ``MagpieTTSModel.generate_speech`` (what ``do_tts`` and NeMo's long-form
runner call, one text chunk at a time, with a :class:`ChunkState` carried across the calls).

Per call (NeMo's order): the text window (the last ``min(chunk, 20)`` tokens of the previous window, then the new
chunk), the text encoder over it, the encoder-output splice (the window's history rows replaced by the previous
call's), the context prefix recomputed, a fresh decoder from [prefix | BOS], and NeMo's loop: the prior of a later
chunk's first step (:func:`reference.inference.chunk_initial_prior`), after each step the attention-prior state
machine (:class:`reference.inference.PriorState`; the first chunk builds ``infer_batch``'s prior, later chunks
NeMo's multi-chunk prior), sampling (:func:`reference.inference.sample_frame`: the decoder's logits, the AR local
transformer or MaskGit, then the argmax pass), EOS (:func:`reference.inference.eos_frames`) and NeMo's chunk-end
rules. Every rule above exists once, in :mod:`reference.inference`; this module is the loop only.

NeMo's quirks, reproduced:

* ``start_prior_after_n_audio_steps`` is ignored (the prior runs from step 0), there is no ">= 4 frames" stop
  rule, and an item without EOS gets ``num_steps * S`` frames (``infer_batch``: ``max_decoder_steps``);
* ``left_offset`` (each item's window start, absolute) moves by ``previous window + chunk - this window``, for
  ended items too; the attended positions stay absolute and the window search may start at a negative index
  (Python slicing, as NeMo: see :meth:`PriorState.most_attended`);
* the splice copies, per item, the LAST ``history`` rows of the previous call's padded encoder-output row: with
  unequal window lengths in a batch these include that row's padding (NeMo's behaviour, copied as is);
* an ended item's text becomes its caller row (cropped or zero-padded to the window width) with length 1;
* the decoder restarts each call: no audio crosses calls, only the text window, the spliced encoder output and the
  prior bookkeeping do.

Deliberate differences, none changing what is computed:

* **the caller's batch is not mutated.** NeMo writes the window lengths into ``batch['text_lens']`` in place,
  replaces ``batch['text']`` with the window, and keeps the caller's ``text_lens`` tensor as
  ``chunk_state.history_text_lens``. The reference builds its own window tensors (same values, the caller's
  dtypes) and keeps those in the state. A caller passing a fresh batch per chunk (``do_tts``, the runner) gets
  NeMo's codes; one that reuses a batch dict after a NeMo call would feed NeMo the window as the next chunk.
* **the decoder cache.** NeMo's ``generate_speech`` never resets the decoder's KV cache: a fresh NeMo model
  recomputes (its cache is off); after an ``infer_batch`` of a ``use_kv_cache_for_inference`` checkpoint the
  cache is on and stale, and NeMo's next ``generate_speech`` fails (or, reset by hand with ``use_cache=True``
  before every call, runs the cached path; NeMo's runner resets it per batch to the checkpoint's flag for
  single-chunk batches and to off for multi-chunk ones). The reference decodes each call from a fresh state:
  the cached path when ``use_kv_cache`` (default: the checkpoint's ``use_kv_cache_for_inference``) is true,
  else the recompute path -- NeMo's codes when NeMo's cache was reset to the same mode before the call.
* **bad input** is refused before any work, in one line: a chunk state of another batch size, ``end_of_text`` of
  the wrong length, a later chunk (``beginning_of_text=False``) on a fresh state (NeMo: TypeError in the splice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from reference.batch import BatchError
from reference.inference import (DecoderSteps, InferenceError, InferOutput, PriorState, checked_call,
                                 chunk_initial_prior, cross_attention_scores, dummy_cfg_conditioning, eos_frames,
                                 layer_priors, read_codes, sample_frame)


@dataclass(frozen=True)
class ChunkedInferenceConfig:
    """NeMo 3.0.0's ``ChunkedInferenceConfig``, field for field (names and defaults; NeMo builds it with its
    defaults in ``__init__`` and no config key feeds it)."""

    history_len_heuristic: int = 20
    prior_weights_init: tuple[float, ...] = (0.5, 1.0, 0.8, 0.2, 0.2)
    prior_weights: tuple[float, ...] = (0.2, 1.0, 0.6, 0.4, 0.2, 0.2)
    finished_limit_with_eot: int = 5
    finished_limit_without_eot: int = 1
    finished_limit_first_chunk: int = 20
    forceful_chunk_end_threshold: int = 3
    argmax_temperature: float = 0.01
    short_sentence_threshold: int = 35
    attention_sink_threshold: int = 10
    near_end_threshold: int = 3


@dataclass
class ChunkState:
    """NeMo 3.0.0's ``ChunkState``, field for field: what crosses ``generate_speech`` calls, updated in place.

    history_text / history_text_lens: the previous call's text window (B, T_win) and its lengths;
    history_context_tensor: the previous call's spliced encoder output (B, T_win, D); end_indices: item -> the
    global decoder step (``overall_idx``, not a frame) at which its text's final EOS came; overall_idx: decoder
    steps over all calls; left_offset: each item's window start (absolute text position); previous_attn_len: the
    previous call's window lengths ([] before the first call); last_attended_timesteps: per prior step, the
    absolute attended positions (starts at [[1] * B])."""

    batch_size: int
    history_text: Optional[torch.Tensor] = None
    history_text_lens: Optional[torch.Tensor] = None
    history_context_tensor: Optional[torch.Tensor] = None
    end_indices: dict[int, int] = field(default_factory=dict)
    overall_idx: int = 0
    left_offset: list[int] = field(default_factory=list)
    previous_attn_len: list[int] = field(default_factory=list)
    last_attended_timesteps: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.left_offset:
            self.left_offset = [0] * self.batch_size
        if not self.last_attended_timesteps:
            self.last_attended_timesteps = [[1] * self.batch_size]


def create_chunk_state(batch_size: int) -> ChunkState:
    """NeMo's ``create_chunk_state``: a fresh state for a batch of ``batch_size`` items."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BatchError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return ChunkState(batch_size=batch_size)


def _check_state(state, B: int) -> None:
    """A state made for another batch (or edited into an inconsistent one) -> one line, before any work."""
    names = ("batch_size", "history_text", "history_text_lens", "history_context_tensor", "end_indices", "overall_idx",
             "left_offset", "previous_attn_len", "last_attended_timesteps")
    missing = [n for n in names if not hasattr(state, n)]
    if missing:
        raise InferenceError(f"chunk_state must be a ChunkState (create_chunk_state); {type(state).__name__} has no "
                             f"{missing}")
    if state.batch_size != B:
        raise BatchError(f"chunk_state was made for a batch of {state.batch_size}, this batch has {B} items")
    sizes = {"left_offset": len(state.left_offset),
             "last_attended_timesteps[-1]": len(state.last_attended_timesteps[-1]) if state.last_attended_timesteps else 0}
    if state.previous_attn_len:
        sizes["previous_attn_len"] = len(state.previous_attn_len)
    for name in ("history_text", "history_text_lens", "history_context_tensor"):
        t = getattr(state, name)
        if t is not None:
            sizes[name] = int(t.shape[0])
    bad = {k: n for k, n in sizes.items() if n != B}
    if bad:
        raise BatchError(f"chunk_state does not fit a batch of {B}: {', '.join(f'{k} has {n}' for k, n in bad.items())}")
    if any(not (isinstance(i, int) and 0 <= i < B) for i in state.end_indices):
        raise BatchError(f"chunk_state.end_indices names items {sorted(state.end_indices)} outside 0..{B - 1}")
    if (state.history_text is None) != (state.history_context_tensor is None) or (
            state.history_text is None) != (not state.previous_attn_len):
        raise BatchError("chunk_state is half made: history_text, history_context_tensor and previous_attn_len are "
                         "set by the same generate_speech call")


def _text_window(state: ChunkState, text: torch.Tensor, chunk_lens: list[int], beginning_of_text: bool,
                 history_len: int) -> tuple[torch.Tensor, list[int]]:
    """NeMo's ``_prepare_chunked_text_tensors`` without touching the caller's batch: per item the previous window
    followed by the chunk, cut (after the first chunk) to the chunk and at most ``history_len`` tokens before it;
    an ended item keeps its caller row, length 1. Rows are zero-padded, or cropped, to the longest window
    (NeMo's ``stack_tensors``)."""
    rows, lens = [], []
    for i, n in enumerate(chunk_lens):
        if i in state.end_indices:
            rows.append(text[i])
            lens.append(1)
            continue
        cur = text[i][:n]
        if state.history_text is not None:
            cur = torch.cat([state.history_text[i][: int(state.history_text_lens[i])], cur])
        if not beginning_of_text:
            window = n + min(n, history_len)
            cur = cur[max(0, cur.shape[0] - window):]
        rows.append(cur)
        lens.append(int(cur.shape[0]))
    T = max(lens)
    return torch.stack([F.pad(r, (0, T - r.shape[-1]), value=0.0) for r in rows]), lens


def _splice_history(cond: torch.Tensor, history: torch.Tensor, state: ChunkState, chunk_lens: list[int],
                    window_lens: list[int]) -> None:
    """NeMo's ``_update_context_from_history`` for a later chunk: in place, each item's encoder-output rows before
    its chunk become the last rows of its previous padded row (NeMo's index arithmetic, kept as is)."""
    T = cond.shape[1]
    for i, n in enumerate(chunk_lens):
        if i in state.end_indices:
            continue
        pad = T - window_lens[i]
        cond[i, : -n - pad] = history[i, -(cond[i].shape[0] - n - pad):]


def check_call(chunk_state: ChunkState, B: int, end_of_text: Sequence[bool], beginning_of_text: bool) -> list[bool]:
    """A ``generate_speech`` call's own checks, before any work (one line each): the state fits the batch,
    ``end_of_text`` holds one bool per item, a later chunk has the state of the call before it. -> end_of_text as
    a list of bools."""
    _check_state(chunk_state, B)
    if isinstance(end_of_text, (bool, str, bytes)) or not hasattr(end_of_text, "__len__") or len(end_of_text) != B:
        raise BatchError(f"end_of_text must hold one bool per item ({B}), got {end_of_text!r}")
    eot = [bool(x) for x in end_of_text]
    if not bool(beginning_of_text) and chunk_state.history_text is None:
        raise InferenceError("beginning_of_text=False on a fresh chunk_state: a later chunk needs the state of the "
                             "call before it (NeMo 3.0.0 fails in the encoder-output splice: TypeError)")
    return eot


@dataclass
class ChunkCall:
    """What a ``generate_speech`` call decodes from (:func:`start_call`): per item the chunk's and the window's
    lengths; the spliced encoder output and the context prefix with their masks (CFG's unconditional rows appended
    when ``use_cfg``); the first step's prior (None on the first call)."""

    chunk_lens: list[int]
    window_lens: list[int]
    cond: torch.Tensor
    cond_mask: torch.Tensor
    ctx_emb: torch.Tensor
    ctx_mask: torch.Tensor
    prior: Optional[torch.Tensor]


def start_call(model, batch: dict, chunk_state: ChunkState, beginning_of_text: bool, use_cfg: bool, epsilon: float,
               cc: ChunkedInferenceConfig) -> ChunkCall:
    """A ``generate_speech`` call's setup, NeMo's order: the text window, the text encoder over it, the
    encoder-output splice, the context prefix, CFG's rows; a later chunk's first prior and the window's move
    (NeMo's ``_initialize_chunked_attn_prior``). Updates ``chunk_state``'s history, ``left_offset`` and
    ``previous_attn_len`` in place, as NeMo does before its loop. Shared by every loop that runs a call (the
    reference's :func:`generate_speech`, the fast path's)."""
    device = next(model.parameters()).device
    # ---- the text window, its encoding, the splice and the context prefix (NeMo's setup order) ----
    chunk_lens = [int(n) for n in batch["text_lens"].tolist()]  # NeMo's current_chunk_len (copied before edits)
    text, window_lens = _text_window(chunk_state, batch["text"], chunk_lens, beginning_of_text,
                                     cc.history_len_heuristic)
    T_text = max(window_lens)
    text_lens = torch.tensor(window_lens, dtype=batch["text_lens"].dtype, device=batch["text_lens"].device)
    chunk_state.history_text, chunk_state.history_text_lens = text, text_lens
    window_batch = {**batch, "text": text, "text_lens": text_lens}
    enc = model.encode_text(text, text_lens)
    ctx_emb, ctx_mask = model.decoder_context(window_batch)
    cond, cond_mask = enc.output, enc.mask
    if not beginning_of_text:
        _splice_history(cond, chunk_state.history_context_tensor, chunk_state, chunk_lens, window_lens)
    chunk_state.history_context_tensor = cond
    if use_cfg:
        cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask)
    rows = ctx_emb.shape[0]

    # ---- a later chunk's first prior, and the window's move (NeMo's _initialize_chunked_attn_prior) ----
    prior: Optional[torch.Tensor] = None
    if chunk_state.previous_attn_len:
        starts: list[Optional[int]] = []
        for i in range(len(chunk_lens)):
            chunk_state.left_offset[i] += chunk_state.previous_attn_len[i] + chunk_lens[i] - window_lens[i]
            starts.append(None if i in chunk_state.end_indices else window_lens[i] - chunk_lens[i])
        prior = chunk_initial_prior(rows, T_text, starts, epsilon, device, cc.prior_weights_init)
    chunk_state.previous_attn_len = list(window_lens)
    return ChunkCall(chunk_lens, window_lens, cond, cond_mask, ctx_emb, ctx_mask, prior)


@torch.inference_mode()
def generate_speech(
    model,
    batch: dict,
    chunk_state: ChunkState,
    end_of_text: Sequence[bool],
    beginning_of_text: bool,
    use_cfg: bool = True,
    use_local_transformer_for_inference: bool = False,
    maskgit_n_steps: int = 3,
    maskgit_noise_scale: float = 0.0,
    maskgit_fixed_schedule: Optional[Sequence[int]] = None,
    maskgit_dynamic_cfg_scale: bool = False,
    maskgit_sampling_type: Optional[str] = None,
    use_kv_cache: Optional[bool] = None,
    nemo_unmasked_padded_keys: bool = False,
    chunked_config: Optional[ChunkedInferenceConfig] = None,
    **params: Any,
) -> InferOutput:
    """NeMo's ``generate_speech``: the codes of one text chunk per item, continuing ``chunk_state``.

    batch: ``text`` (B, T) with this chunk's tokens, ``text_lens``, and the context (``context_audio_codes`` /
    ``_lens``, or ``speaker_indices`` for a baked checkpoint); never modified. end_of_text: per item, whether this
    is its text's last chunk; beginning_of_text: whether this is the first chunk (one bool for the batch).
    use_cfg, use_local_transformer_for_inference and the ``maskgit_*`` arguments: as NeMo's (MaskGit:
    :func:`reference.inference.sample_maskgit`). ``params``: NeMo's ``inference_parameters`` fields as overrides
    of the checkpoint's (:func:`reference.inference.resolve_parameters`); ``max_decoder_steps`` bounds each call.
    use_kv_cache / nemo_unmasked_padded_keys: as :func:`reference.inference.infer_batch`'s (see the module
    docstring on NeMo's cache). chunked_config: NeMo's ``ChunkedInferenceConfig`` (default: its defaults).

    Returns an :class:`~reference.inference.InferOutput`: ``predicted_codes`` (B, C, max(lens)) and
    ``predicted_codes_lens`` (B,) int64 as NeMo returns them (an item's frames up to its EOS frame, or up to
    the end of the step of a forced chunk end, or ``num_steps * S``; an item ended in an earlier call gets the
    default and junk codes), ``num_steps`` and the attended positions per step.
    """
    cfg = model.config
    cc = chunked_config if chunked_config is not None else ChunkedInferenceConfig()
    p, lt_mode, maskgit = checked_call(cfg, batch, params, use_cfg, use_local_transformer_for_inference,
                                       maskgit_n_steps, maskgit_noise_scale, maskgit_fixed_schedule,
                                       maskgit_dynamic_cfg_scale, maskgit_sampling_type)
    C, S = cfg.num_audio_codebooks, cfg.frame_stacking_factor
    B = int(batch["text"].shape[0])
    eot = check_call(chunk_state, B, end_of_text, beginning_of_text)
    beginning_of_text = bool(beginning_of_text)
    cached = cfg.use_kv_cache_for_inference if use_kv_cache is None else bool(use_kv_cache)
    device = next(model.parameters()).device
    capture = getattr(model, "_active_capture", None)
    call = start_call(model, batch, chunk_state, beginning_of_text, use_cfg, p.attention_prior_epsilon, cc)
    cond, cond_mask, ctx_emb, ctx_mask = call.cond, call.cond_mask, call.ctx_emb, call.ctx_mask
    window_lens, prior = call.window_lens, call.prior
    T_text, rows = max(window_lens), ctx_emb.shape[0]

    # ---- the loop ----
    max_steps = p.max_decoder_steps // S
    decode = DecoderSteps(model, cond, cond_mask, ctx_emb, ctx_mask, B, use_cfg, p.cfg_scale, cached, max_steps,
                          nemo_unmasked_padded_keys)
    prior_state = PriorState(list(chunk_state.last_attended_timesteps[-1]), [{} for _ in range(B)])
    finished_threshold = cc.finished_limit_first_chunk if beginning_of_text else cc.finished_limit_with_eot
    chunk_end: dict[int, int] = {}  # item -> local step of its chunk's end (EOS, or forced)
    chunk_end_frames: dict[int, int] = {}  # item -> frames to keep from this call
    codes_in = torch.full((B, C, S), cfg.audio_bos_id, dtype=torch.long, device=device)
    predictions: list[torch.Tensor] = []
    out = InferOutput(torch.empty(0), torch.empty(0), 0)
    for idx in range(max_steps):
        if capture is not None:
            capture.step = idx
        forbid_eos = idx * S < p.min_generated_frames  # idx is this call's step: each chunk forbids EOS again
        out.step_priors.append(prior)
        probs: list[torch.Tensor] = []
        dec, logits_t = decode(idx, codes_in, layer_priors(prior, p, cfg.decoder.n_layers), probs)
        if p.apply_attention_prior:  # NeMo: from step 0, whatever start_prior_after_n_audio_steps says
            scores = cross_attention_scores(probs, p.estimate_alignment_from_layers)
            attended = prior_state.most_attended(scores, window_lens, p.attention_prior_lookahead_window,
                                                 chunk_state.left_offset)
            chunk_state.last_attended_timesteps.append(list(attended))
            out.attended_text_positions.append(list(attended))
            if beginning_of_text:
                prior = prior_state.build_prior(rows, T_text, window_lens, attended, p.attention_prior_epsilon,
                                                p.attention_prior_lookahead_window, chunk_state.end_indices, device)
            else:
                prior = prior_state.build_chunk_prior(
                    rows, T_text, window_lens, attended, p.attention_prior_epsilon, chunk_state.left_offset,
                    chunk_state.end_indices.keys() | chunk_end.keys(), device, cc.prior_weights,
                    cc.short_sentence_threshold, cc.attention_sink_threshold, cc.near_end_threshold)
            out.built_priors[idx] = prior
        if not beginning_of_text:  # build_prior counted already; NeMo counts here for later chunks
            prior_state.advance_finished(
                lambda b: cc.finished_limit_with_eot if eot[b] else cc.finished_limit_without_eot)
        if p.ignore_finished_sentence_tracking:
            finished, unfinished = {}, {}
        else:
            finished = {k: v for k, v in prior_state.finished_counter.items() if v >= finished_threshold}
            unfinished = {k: v for k, v in prior_state.unfinished.items() if v}
        codes = sample_frame(model, dec[:, -1, :], logits_t, p, unfinished, finished, forbid_eos, use_cfg, lt_mode,
                             maskgit, argmax_temperature=cc.argmax_temperature)
        argmax_host, sampled_host = read_codes(codes, idx)
        eos = eos_frames(argmax_host, sampled_host, cfg.audio_eos_id, p.eos_detection_method)
        for b in range(B):  # NeMo's _check_eos_and_update_state
            if b in chunk_state.end_indices or b in chunk_end:
                continue
            if eos[b] != float("inf"):
                chunk_end_frames[b] = idx * S + int(eos[b])
                if eot[b]:
                    chunk_state.end_indices[b] = chunk_state.overall_idx
                chunk_end[b] = idx
            elif not eot[b] and prior_state.finished_counter.get(b, -1) >= cc.forceful_chunk_end_threshold:
                chunk_end[b] = idx  # a forced chunk end: the whole step's frames are kept
                chunk_end_frames[b] = (idx + 1) * S
        predictions.append(codes.sampled)
        codes_in = torch.cat([codes_in, codes.sampled], dim=-1)
        if len(chunk_state.end_indices) == B or all(
                (b in chunk_end) if not eot[b] else (b in chunk_state.end_indices) for b in range(B)):
            break  # NeMo's _should_terminate_loop; overall_idx counts only steps it did not break after
        chunk_state.overall_idx += 1
    if capture is not None:
        capture.step = None
    codes = torch.cat(predictions, dim=-1)
    out.num_steps = len(predictions)
    lens = torch.tensor([chunk_end_frames.get(b, out.num_steps * S) for b in range(B)], device=device)
    out.predicted_codes = codes[:, :, : int(lens.max())]
    out.predicted_codes_lens = lens
    return out
