"""Autoregressive inference equal to NeMo 3.0.0's ``MagpieTTSModel.infer_batch`` (``decoder_context_tts``,
``decoder_ce``), and the rules its chunked twin ``generate_speech`` (:mod:`reference.chunked`) shares with it.

NeMo has two decoding paths and picks one from the checkpoint's ``use_kv_cache_for_inference``:

* **recompute** (released checkpoints): every step re-runs the decoder over the whole sequence and applies the
  newest prior row to *every* query position, past ones included;
* **cached**: step 0 runs the context prefix + BOS frame, later steps only the new frame. NeMo's cached path
  does not mask padded context keys at steps >= 1 (``query_mask[:, -1:]`` builds a 1x1 mask); the reference
  masks them by default and reproduces NeMo with ``nemo_unmasked_padded_keys=True``.

Both paths share the attention-prior state machine, CFG and per-codebook sampling, written here in the same
order as NeMo so that random numbers are drawn in the same order and shapes (codes match NeMo's on the CPU for
the same ``torch.manual_seed``). Each rule exists once here and both loops use it: the decoder step
(:class:`DecoderSteps`), the prior state machine (:class:`PriorState`, with NeMo's three prior builders), the
samplers (:func:`sample_step`; the local transformer's, autoregressive :func:`sample_local_transformer` and
MaskGit :func:`sample_maskgit`; dispatched by :func:`sample_frame`) and EOS (:func:`eos_frames`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from reference.batch import lengths_to_mask, validate_batch
from reference.config import InferenceParameters

EOS_METHODS = {
    "argmax_any": ("argmax", "any"),
    "argmax_or_multinomial_any": ("argmax_or_multinomial", "any"),
    "argmax_all": ("argmax", "all"),
    "argmax_or_multinomial_all": ("argmax_or_multinomial", "all"),
    "argmax_zero_cb": ("argmax", "zero_cb"),
    "argmax_or_multinomial_zero_cb": ("argmax_or_multinomial", "zero_cb"),
}
MIN_FRAMES_FOR_CODEC = 4  # NeMo stops only once >= 4 frames exist: "Codec must be of at least 4 timesteps"


@dataclass
class InferOutput:
    predicted_codes: torch.Tensor  # (B, C, T) as NeMo returns them (EOS frame included where it fell inside T)
    predicted_codes_lens: torch.Tensor  # (B,) EOS frame index, or max_decoder_steps when none was found
    num_steps: int
    attended_text_positions: list[list[int]] = field(default_factory=list)  # per prior step, per item
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (B, C*V) CFG-combined, if keep_logits
    step_priors: list[Optional[torch.Tensor]] = field(default_factory=list)  # prior used at each step
    built_priors: dict[int, torch.Tensor] = field(default_factory=dict)  # step k -> prior built after step k
    attended_by_step: dict[int, list[int]] = field(default_factory=dict)  # step k -> attended text position


class InferenceError(ValueError):
    """Invalid inference parameters or inputs."""


def resolve_parameters(defaults: InferenceParameters, **overrides: Any) -> InferenceParameters:
    names = {f.name for f in dataclasses.fields(InferenceParameters)}
    unknown = set(overrides) - names
    if unknown:
        raise InferenceError(f"unknown inference parameter(s) {sorted(unknown)}; known: {sorted(names)}")
    for k in ("estimate_alignment_from_layers", "apply_prior_to_layers"):
        if overrides.get(k) is not None:
            overrides[k] = tuple(int(i) for i in overrides[k])
    p = dataclasses.replace(defaults, **overrides)
    if not isinstance(p.topk, int) or p.topk < 1:
        raise InferenceError(f"topk must be an integer >= 1, got {p.topk!r}")
    if not (isinstance(p.temperature, (int, float)) and math.isfinite(p.temperature) and p.temperature > 0):
        raise InferenceError(f"temperature must be a finite number > 0, got {p.temperature!r}")
    if not math.isfinite(p.cfg_scale):
        raise InferenceError(f"cfg_scale must be finite, got {p.cfg_scale!r}")
    if p.max_decoder_steps < 1:
        raise InferenceError(f"max_decoder_steps must be >= 1, got {p.max_decoder_steps}")
    if p.min_generated_frames < 0 or p.max_decoder_steps < p.min_generated_frames:
        raise InferenceError(
            f"max_decoder_steps ({p.max_decoder_steps}) must be >= min_generated_frames ({p.min_generated_frames}) >= 0"
        )
    if not (math.isfinite(p.attention_prior_epsilon) and 0 <= p.attention_prior_epsilon):
        raise InferenceError(f"attention_prior_epsilon must be finite and >= 0, got {p.attention_prior_epsilon!r}")
    if p.attention_prior_lookahead_window < 1:
        raise InferenceError(f"attention_prior_lookahead_window must be >= 1, got {p.attention_prior_lookahead_window}")
    if p.eos_detection_method not in EOS_METHODS:
        raise InferenceError(f"eos_detection_method must be one of {sorted(EOS_METHODS)}, got {p.eos_detection_method!r}")
    return p


def check_parameters(p: InferenceParameters, cfg) -> None:
    """The checks of resolved parameters that need the model's sizes: layer indices inside the decoder, top-k
    within a codebook's tokens (torch.topk would fail deep inside sampling: "selected index k out of range").
    Every loop (NeMo's, the fast path's) calls this after :func:`resolve_parameters`, so that those errors come
    first."""
    for k in ("estimate_alignment_from_layers", "apply_prior_to_layers"):
        bad = [i for i in (getattr(p, k) or ()) if not 0 <= i < cfg.decoder.n_layers]
        if bad:
            raise InferenceError(f"{k} names layer(s) {bad} outside 0..{cfg.decoder.n_layers - 1}")
    if p.topk > cfg.num_all_tokens_per_codebook:
        raise InferenceError(f"topk ({p.topk}) exceeds the {cfg.num_all_tokens_per_codebook} tokens of a codebook "
                             "(num_all_tokens_per_codebook); pass a smaller topk")


# ---- the attention-prior state machine (NeMo: get_cross_attention_scores, get_most_attended_text_timestep,
# ---- construct_inference_prior) -------------------------------------------------------------------------------


def cross_attention_scores(probs: list[torch.Tensor], layers: Optional[tuple[int, ...]]) -> torch.Tensor:
    """Mean over heads, then over the chosen layers, of the last query row: (B', T_text)."""
    # the mean over one head is that head, exactly (x / 1): a view instead of a reduction per layer
    per_layer = [p[:, 0] if p.shape[1] == 1 else p.mean(dim=1) for i, p in enumerate(probs)
                 if layers is None or i in layers]
    return torch.stack(per_layer, dim=1).mean(dim=1)[:, -1, :]


@dataclass
class PriorState:
    """NeMo's bookkeeping across steps, per batch item. One copy for both loops: ``infer_batch`` and every
    ``generate_speech`` call (:mod:`reference.chunked`) run :meth:`most_attended`; the first chunk (and
    ``infer_batch``) builds NeMo's ``construct_inference_prior`` (:meth:`build_prior`), later chunks
    ``construct_multi_chunk_prior`` (:meth:`build_chunk_prior`); a later chunk's first prior is
    :func:`chunk_initial_prior`."""

    last_attended: list[int]
    counters: list[dict[int, int]]
    unfinished: dict[int, bool] = field(default_factory=dict)
    finished_counter: dict[int, int] = field(default_factory=dict)
    # per item, 1 + the last position counted >= 10 times (0: none). Counts only grow, so this is where NeMo's
    # loop over every counter ends up suppressing the prior up to; kept as the counters change.
    stuck_end: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, batch: int, first_attended: int = 1) -> "PriorState":
        return cls([first_attended] * batch, [{} for _ in range(batch)])  # NeMo starts every item at position 1

    def most_attended(self, scores: torch.Tensor, text_lens: list[int], lookahead: int,
                      left_offset: Optional[Sequence[int]] = None) -> list[int]:
        """NeMo's ``get_most_attended_text_timestep``: per item, the most attended text position in the window
        ``[last, min(last + lookahead, text_len - 3))`` (moved on by one past a position counted >= 8 times),
        or ``text_len - 1`` when that window is empty; counts it.

        left_offset (chunked generation; None = zeros): the absolute text position of each item's window start.
        Positions (``last_attended``, the counters, the result) stay absolute; the window is searched from
        ``last - left_offset``, which NeMo does not clamp: a negative start counts from the padded row's end
        (Python's slice semantics), usually giving an empty window and the jump to ``text_len - 1 + left_offset``.
        The reference slices the same way (numpy's slices are Python's).
        """
        self._sync_stuck_end()
        attended = []
        # numpy on the host copy: the same first-maximum index (NaN counts as the maximum in both) without a
        # torch op per item
        rows = scores.float().cpu().numpy()  # float32 holds every bf16/fp16 value exactly: same order
        for b in range(len(text_lens)):
            off = left_offset[b] if left_offset else 0
            last = self.last_attended[b]
            if self.counters[b].get(last, 0) >= 8:  # an attention sink: move on by one
                last += 1
            start = last - off  # window-relative; may be negative (see above)
            window_end = min(start + lookahead, text_lens[b] - 3)  # the last 3 positions are never searched
            window = rows[b, start:window_end]
            t = text_lens[b] - 1 + off if window.shape[0] == 0 else int(window.argmax()) + last
            attended.append(t)
            count = self.counters[b][t] = self.counters[b].get(t, 0) + 1
            if count >= 10 and t + 1 > self.stuck_end[b]:
                self.stuck_end[b] = t + 1
        self.last_attended = attended
        return attended

    def _sync_stuck_end(self) -> None:
        if len(self.stuck_end) != len(self.counters):  # counters set from outside: derive it once
            self.stuck_end = [max((t + 1 for t, c in d.items() if c >= 10), default=0) for d in self.counters]

    def build_prior(self, rows: int, T_text: int, text_lens: list[int], attended: list[int], epsilon: float,
                    lookahead: int, end_indices: dict, device) -> torch.Tensor:
        """NeMo's ``construct_inference_prior``: (rows, 1, T_text) prior for the next step; rows past the batch
        (CFG unconditional) stay epsilon. Counts the steps near the text's end (:meth:`advance_finished`, limit 5)."""
        # Built in numpy on the host (NeMo builds it with per-element torch indexing: the same float32 values,
        # epsilon rounded once, at a fraction of the cost), then copied to the device once.
        self._sync_stuck_end()
        prior = np.full((rows, 1, T_text), np.float32(epsilon), dtype=np.float32)
        for b in range(len(text_lens)):
            n = text_lens[b]
            if n <= 5:
                prior[b, 0, :] = 1.0  # very short text: no prior
            else:
                prior[b, 0, max(1, attended[b] - 1)] = 1.0
                prior[b, 0, attended[b]] = 1.0
                for i in range(1, lookahead + 1):
                    prior[b, 0, min(attended[b] + i, n - 1)] = 1.0
            if self.stuck_end[b]:  # stuck on a position (>= 10 visits): suppress it and everything before it
                prior[b, 0, : self.stuck_end[b]] = np.float32(epsilon)
            self.unfinished[b] = attended[b] < n - 3 and b not in end_indices
            if attended[b] >= n - 2 or b in end_indices:
                self.finished_counter.setdefault(b, 0)
        self.advance_finished(5)
        return _prior_to_device(prior, device)

    def build_chunk_prior(self, rows: int, T_text: int, text_lens: list[int], attended: list[int], epsilon: float,
                          left_offset: Sequence[int], finished_items, device, weights=(0.2, 1.0, 0.6, 0.4, 0.2, 0.2),
                          short_text: int = 35, sink_threshold: int = 10, near_end: int = 3) -> torch.Tensor:
        """NeMo's ``construct_multi_chunk_prior`` (``generate_speech`` after the first chunk): (rows, 1, T_text).

        ``attended`` is absolute; ``attended - left_offset`` indexes the window and may be negative (NeMo indexes
        with it as is: from the row's end). finished_items: the items ended (``ChunkState.end_indices``) or at
        their chunk's end in this call. The defaults are NeMo's ``ChunkedInferenceConfig`` (prior_weights,
        short_sentence_threshold, attention_sink_threshold, near_end_threshold). Differences from
        :meth:`build_prior`: fixed weights around the position, everything before it and from +5 on at eps**2
        (a Python double, rounded once to float32 on store, as NeMo), text <= ``short_text`` unconstrained, the
        sink penalty at eps**2 and skipped for finished items, "near the end" from ``text_len - near_end``, and
        no step counted here (the loop counts with :meth:`advance_finished`)."""
        eps_sq = epsilon * epsilon
        prior = np.full((rows, 1, T_text), np.float32(epsilon), dtype=np.float32)
        for b in range(min(rows, len(text_lens))):
            n = text_lens[b]
            pos = attended[b] - left_offset[b]
            finished = b in finished_items
            if n <= short_text:
                prior[b, 0, :] = 1.0
            else:  # NeMo's _set_attention_prior_weights
                if pos < -T_text:  # NeMo indexes prior[b, 0, pos] and raises IndexError; Python wraps smaller lags
                    raise InferenceError(f"item {b}: the attended text position {attended[b]} lies more than the "
                                         f"{T_text}-token window behind its start {left_offset[b]}: NeMo 3.0.0 fails the "
                                         "same way (construct_multi_chunk_prior, IndexError); another seed or text avoids it")
                history_end = max(1, pos - 1)
                prior[b, 0, :history_end] = eps_sq
                prior[b, 0, history_end] = weights[0]
                prior[b, 0, pos] = weights[1]
                for offset, w in enumerate(weights[2:], start=1):
                    if pos + offset < n:
                        prior[b, 0, pos + offset] = w
                future_start = pos + len(weights) - 1
                if future_start < n:
                    prior[b, 0, future_start:] = eps_sq
            if not finished:  # NeMo's _penalize_attention_sinks
                for t, count in self.counters[b].items():
                    if t > left_offset[b] and count >= sink_threshold:
                        prior[b, 0, : t - left_offset[b] + 1] = eps_sq
            near = pos >= n - near_end  # NeMo's _update_text_completion_state
            self.unfinished[b] = not near and not finished
            if near or finished:
                self.finished_counter.setdefault(b, 0)
        return _prior_to_device(prior, device)

    def advance_finished(self, limit) -> None:
        """NeMo's count of the steps an item has spent near its text's end: every counted item + 1, and one
        counted past ``limit`` (an int, or item -> int) may end (no longer unfinished)."""
        for b in self.finished_counter:
            self.finished_counter[b] += 1
            if self.finished_counter[b] > (limit if isinstance(limit, int) else limit(b)):
                self.unfinished[b] = False


def chunk_initial_prior(rows: int, T_text: int, chunk_starts: Sequence[Optional[int]], epsilon: float, device,
                        weights=(0.5, 1.0, 0.8, 0.2, 0.2)) -> torch.Tensor:
    """The prior of a later chunk's first step (NeMo's ``_initialize_chunked_attn_prior``, whose ``left_offset``
    update :func:`reference.chunked.generate_speech` does): epsilon, then per item the text before its new chunk
    (``chunk_starts[b]``, the history's length in the window) at eps**2 and ``weights`` (NeMo's
    ``prior_weights_init``, the first 5) from the chunk's start on; None = an ended item (left at epsilon)."""
    prior = np.full((rows, 1, T_text), np.float32(epsilon), dtype=np.float32)
    for b, start in enumerate(chunk_starts):
        if start is None:
            continue
        prior[b, :, :start] = epsilon * epsilon
        for offset, w in enumerate(weights[:5]):
            if start + offset < T_text:
                prior[b, :, start + offset] = w
    return _prior_to_device(prior, device)


def _prior_to_device(prior: np.ndarray, device) -> torch.Tensor:
    host = torch.from_numpy(prior)
    if torch.device(device).type == "cuda":  # pinned + non_blocking: no stream sync for the copy
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# ---- sampling (NeMo: sample_codes_from_logits) ----------------------------------------------------------------


def forbidden_tokens(cfg, forbid_audio_eos: bool, device=None) -> torch.Tensor:
    """NeMo's SpecialAudioToken.get_forbidden_tokens as a (V,) bool mask: every special token, EOS too while EOS
    is forbidden. Made once per (sizes, device): a host-to-device copy per sampling pass would sync the GPU.
    Callers must not write to it."""
    key = (cfg.codebook_size, cfg.audio_eos_id, cfg.num_all_tokens_per_codebook, bool(forbid_audio_eos),
           str(torch.device(device)) if device is not None else "cpu")
    mask = _FORBIDDEN.get(key)
    if mask is None:
        ids = [cfg.codebook_size + off for off in range(8)
               if forbid_audio_eos or cfg.codebook_size + off != cfg.audio_eos_id]
        mask = torch.zeros(cfg.num_all_tokens_per_codebook, dtype=torch.bool)
        mask[ids] = True
        mask = _FORBIDDEN[key] = mask.to(device) if device is not None else mask
    return mask


_FORBIDDEN: dict = {}


def edit_logits(lg: torch.Tensor, cfg, unfinished: dict, finished: dict, forbidden: torch.Tensor) -> torch.Tensor:
    """NeMo's edits before sampling one codebook, in its order: EOS ban for unfinished items, forced EOS for
    finished ones, forbidden specials. Edits ``lg`` (B, V), or (B, J, V) for J codebooks at once (every edit is
    per codebook row, so the values are the same), in place like NeMo, and returns it."""
    for b in unfinished:
        lg[b, ..., cfg.audio_eos_id] = float("-inf")
    for b in finished:
        lg[b, ...] = float("-inf")
        lg[b, ..., cfg.audio_eos_id] = 0.0
    return lg.masked_fill_(forbidden, float("-inf"))  # (V,) bool, from forbidden_tokens


def restrict_logits(lg: torch.Tensor, cfg, topk: int, unfinished: dict, finished: dict,
                    forbidden: torch.Tensor) -> torch.Tensor:
    """:func:`edit_logits` (in place), then top-k (ties kept): returns the top-k-masked logits."""
    lg = edit_logits(lg, cfg, unfinished, finished, forbidden)
    kth = torch.topk(lg, topk, dim=-1)[0][..., -1:]
    return lg.masked_fill(lg < kth, float("-inf"))


def _edited_logits(logits: torch.Tensor, cfg, unfinished: dict, finished: dict, forbid_audio_eos: bool) -> torch.Tensor:
    """(B, C*V*S) logits -> an edited copy (B, S*C, V); row j = c + C*s is NeMo's slice (c + C*s) * V."""
    C, V, S = cfg.num_audio_codebooks, cfg.num_all_tokens_per_codebook, cfg.frame_stacking_factor
    forbidden = forbidden_tokens(cfg, forbid_audio_eos, logits.device)
    return edit_logits(logits.reshape(logits.shape[0], S * C, V).clone(), cfg, unfinished, finished, forbidden)


def _topk_probs(lg: torch.Tensor, kth: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of the logits below the k-th largest masked out, at this temperature (NeMo's maths)."""
    return torch.softmax(lg.masked_fill(lg < kth, float("-inf")) / temperature, dim=-1)


def dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask):
    """NeMo's prepare_dummy_cond_for_cfg, appended as the unconditional rows: zero memory with only position 0
    valid; zero context prefix, all positions valid. Returns (cond, cond_mask, ctx_emb, ctx_mask) with 2B rows."""
    dummy_mask = torch.zeros_like(cond_mask)
    dummy_mask[:, 0] = True
    return (torch.cat([cond, torch.zeros_like(cond)]), torch.cat([cond_mask, dummy_mask]),
            torch.cat([ctx_emb, torch.zeros_like(ctx_emb)]), torch.cat([ctx_mask, torch.ones_like(ctx_mask)]))


def draw_codes(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.multinomial(probs[:, j], 1)`` for j = 0, 1, ... in turn, for (B, J, V) probabilities -> (B, J),
    without its host-side validity checks (two ``.item()`` syncs a call on a GPU).

    ATen draws one sample as ``argmax(probs / q)`` with ``q ~ Exp(1)`` of probs' shape. Each codebook's q is
    still drawn by its own generator call on a contiguous (B, V) block, so the random numbers are those of J
    multinomial calls on the CPU and on CUDA; the division and the argmax then run once for all J. Validity is
    checked once a step instead (:func:`invalid_probabilities`, :func:`sample_step`).
    """
    B, J, V = probs.shape
    q = torch.empty((J, B, V), dtype=probs.dtype, device=probs.device)
    for j in range(J):
        q[j].exponential_(1, generator=generator)
    return (probs / q.transpose(0, 1)).argmax(dim=-1)


def invalid_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor on probs' device: True where ``torch.multinomial`` would refuse some row of these
    softmax outputs. A softmax gives values in [0, 1], or NaN for a row with +inf/NaN logits or no finite one,
    so "some row does not sum to > 0" covers every refusal (NaN, Inf, < 0, zero sum).
    Read on the host with the step's other results, not here."""
    return ~(_min_row_sum(probs) > 0)


def _min_row_sum(probs: torch.Tensor) -> torch.Tensor:
    """0-dim: the smallest row sum, NaN if any row has a NaN (amin propagates it); > 0 exactly when valid."""
    return probs.sum(dim=-1).amin()


def sample_codes(logits: torch.Tensor, cfg, temperature: float, topk: int, unfinished: dict, finished: dict,
                 forbid_audio_eos: bool, generator: Optional[torch.Generator] = None,
                 invalid: Optional[list] = None) -> torch.Tensor:
    """(B, C*V*S) logits -> (B, C, S) codes; one multinomial draw per codebook, in NeMo's order.

    The edits, top-k and softmax run on all codebooks at once (row-wise ops: the same values as NeMo's
    per-codebook calls); the draws keep one generator call per codebook so the random stream is NeMo's.
    ``invalid``, if given, receives :func:`invalid_probabilities` of this pass (else it is checked here, with a
    host sync).
    """
    B, S, C = logits.shape[0], cfg.frame_stacking_factor, cfg.num_audio_codebooks
    lg = _edited_logits(logits, cfg, unfinished, finished, forbid_audio_eos)
    probs = _topk_probs(lg, torch.topk(lg, topk, dim=-1)[0][..., -1:], temperature)
    bad = invalid_probabilities(probs)
    if invalid is not None:
        invalid.append(bad)
    elif bool(bad):
        raise InferenceError("probability tensor contains either inf, nan or element < 0 (non-finite logits?)")
    return draw_codes(probs, generator).view(B, S, C).transpose(1, 2)  # (B, C, S)


@dataclass
class StepCodes:
    sampled: torch.Tensor  # (B, C, S): the sampled pass
    argmax: torch.Tensor  # (B, C, S): NeMo's "argmax" pass (temperature 0.01, top-1, still a multinomial draw)
    valid: torch.Tensor  # (2,) bool on the device: each pass's probabilities were valid (read with the codes)


def sample_step(logits: torch.Tensor, cfg, temperature: float, topk: int, unfinished: dict, finished: dict,
                forbid_audio_eos: bool, generator: Optional[torch.Generator] = None,
                argmax_temperature: float = 0.01) -> StepCodes:
    """NeMo's two sampling passes of a step, ``sample_codes(temperature, topk)`` then ``sample_codes(0.01, 1)``
    (``argmax_temperature``: generate_speech's ``ChunkedInferenceConfig.argmax_temperature``, also 0.01),
    sharing what they compute alike: the two passes edit the same logits the same way, and top-1's threshold
    is the first of top-k's sorted values (the row maximum, the same float). The draws are made in NeMo's order
    (every codebook of the sampled pass, then every codebook of the argmax pass), so codes and generator state
    equal the two separate calls'."""
    B, S, C = logits.shape[0], cfg.frame_stacking_factor, cfg.num_audio_codebooks
    lg = _edited_logits(logits, cfg, unfinished, finished, forbid_audio_eos)
    top = torch.topk(lg, topk, dim=-1)[0]  # (B, S*C, topk), descending
    probs = _topk_probs(lg, top[..., -1:], temperature)
    probs_argmax = _topk_probs(lg, top[..., :1], argmax_temperature)
    valid = torch.stack([_min_row_sum(probs), _min_row_sum(probs_argmax)]) > 0
    sampled = draw_codes(probs, generator).view(B, S, C).transpose(1, 2)
    argmax = draw_codes(probs_argmax, generator).view(B, S, C).transpose(1, 2)
    return StepCodes(sampled, argmax, valid)


def sample_local_transformer(model, dec_last: torch.Tensor, temperature: float, topk: int, unfinished: dict,
                             finished: dict, use_cfg: bool, cfg_scale: float, use_kv_cache: bool,
                             forbid_audio_eos: bool) -> torch.Tensor:
    """NeMo's ``LocalTransformerHelper.sample_autoregressive``: codebook by codebook, each code fed back.

    dec_last: (rows, D) decoder output of the newest position (CFG: cond rows, then uncond rows). The multinomial
    draws cover every row (uncond rows included), as NeMo's do. Returns (B, C, S).
    """
    cfg = model.config
    C, S = cfg.num_audio_codebooks, cfg.frame_stacking_factor
    lt = model.local_transformer
    rows = dec_last.shape[0]
    B = rows // 2 if use_cfg else rows
    forbidden = forbidden_tokens(cfg, forbid_audio_eos, dec_last.device)
    x = model.local_transformer_in_projection(dec_last[:, None])  # (rows, 1, H)
    state = lt.new_state(rows, C * S + 1, None, x.device, x.dtype) if use_kv_cache else None
    new = x
    preds = []
    for cb in range(C * S):
        if state is not None:
            ones = torch.ones(rows, new.shape[1], dtype=torch.bool, device=x.device)
            out = lt.forward_cached(new, ones, state, torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=x.device))
        else:
            out = lt(x, torch.ones(rows, x.shape[1], dtype=torch.bool, device=x.device))
        logits = model.local_transformer_out_projections[cb](out[:, -1, :])
        if use_cfg:
            logits[:B] = cfg_scale * logits[:B] + (1.0 - cfg_scale) * logits[B:]  # NeMo's order in the LT path
        logits = restrict_logits(logits, cfg, topk, unfinished, finished, forbidden)
        if temperature <= 0.0:
            pred = logits.argmax(dim=-1, keepdim=True)
        else:
            pred = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
        if use_cfg:
            pred[B:] = pred[:B]
        preds.append(pred)
        new = model.local_transformer_in_projection(model.audio_embeddings[cb](pred.squeeze(-1)).unsqueeze(1))
        x = torch.cat([x, new], dim=1)
    codes = torch.cat(preds, dim=1).reshape(-1, S, C).permute(0, 2, 1)  # (rows, C, S)
    return codes[:B]


# ---- MaskGit (NeMo: LocalTransformerHelper.sample_maskgit) -----------------------------------------------------

MASKGIT_CAUSAL = ("causal", "purity_causal")  # sampling types that unmask frame by frame
MASKGIT_PURITY = ("purity_causal", "purity_default")  # sampling types whose confidence is the row's top probability
_MAX_CONFIDENCE = 5  # NeMo's max_confidence: what already unmasked positions are given, so they stay chosen


@dataclass(frozen=True)
class MaskGitOptions:
    """NeMo's MaskGit arguments of ``infer_batch`` / ``generate_speech`` (``maskgit_n_steps``, ...), defaults NeMo's.

    sampling_type: None (NeMo's default), "causal", "purity_causal" or "purity_default"; NeMo treats any other
    value as None, and so does the reference.
    """

    n_steps: int = 3
    noise_scale: float = 0.0
    fixed_schedule: Optional[tuple[int, ...]] = None
    dynamic_cfg_scale: bool = False
    sampling_type: Optional[str] = None

    @classmethod
    def from_args(cls, n_steps=3, noise_scale=0.0, fixed_schedule=None, dynamic_cfg_scale=False,
                  sampling_type=None) -> "MaskGitOptions":
        if fixed_schedule is not None:
            try:
                fixed_schedule = tuple(int(n) for n in fixed_schedule)
            except (TypeError, ValueError):
                raise InferenceError(f"maskgit_fixed_schedule must be a list of integers, got {fixed_schedule!r}") from None
        return cls(n_steps, noise_scale, fixed_schedule, bool(dynamic_cfg_scale), sampling_type)

    def check(self, L: int, use_cfg: bool) -> None:
        """Refuse, in one line, what NeMo 3.0.0 crashes on (its exception is named in each message); ``L`` is the
        codes per decoder step (codebooks x frame stacking). NeMo's other MaskGit crash, temperature <= 0 (NaN
        probabilities), is refused for every sampler by :func:`resolve_parameters`; its crash on unfinished
        items is reported where it happens (:func:`sample_maskgit`)."""
        if self.fixed_schedule is None:
            if not isinstance(self.n_steps, int) or isinstance(self.n_steps, bool) or self.n_steps < 1:
                raise InferenceError(f"maskgit_n_steps must be an integer >= 1, got {self.n_steps!r} (NeMo: with no "
                                     "step, MASK tokens are left: AssertionError)")
        else:
            fs = self.fixed_schedule
            if not fs or fs[0] != 0 or any(not 0 <= n <= L for n in fs):
                raise InferenceError(
                    f"maskgit_fixed_schedule must be a non-empty list of the positions already unmasked at each step, "
                    f"starting at 0, each in [0, {L}]; got {list(fs)} (NeMo: a first entry > 0 leaves MASK tokens, "
                    "AssertionError; an entry outside [0, L] fails in torch.topk)")
        if not (isinstance(self.noise_scale, (int, float)) and not isinstance(self.noise_scale, bool)):
            raise InferenceError(f"maskgit_noise_scale must be a number, got {self.noise_scale!r}")
        if self.noise_scale > 0.0 and not use_cfg:
            raise InferenceError(f"maskgit_noise_scale={self.noise_scale} needs use_cfg=True (NeMo 3.0.0 fails "
                                 "without CFG: UnboundLocalError 'actual_batch_size')")
        if self.dynamic_cfg_scale and use_cfg and self.steps() == 1:
            raise InferenceError("maskgit_dynamic_cfg_scale needs at least 2 MaskGit steps (maskgit_n_steps or "
                                 "maskgit_fixed_schedule); NeMo 3.0.0 divides by n_steps - 1: ZeroDivisionError")

    def steps(self) -> int:
        return len(self.fixed_schedule) if self.fixed_schedule is not None else self.n_steps


def maskgit_unmasked_counts(L: int, n_steps: int = 3, fixed_schedule: Optional[Sequence[int]] = None,
                            sampling_type: Optional[str] = None) -> list[int]:
    """NeMo's MaskGit schedule: per step, how many of the L positions keep their code from earlier steps.

    The cosine schedule is NeMo's ``cosine_schedule(torch.tensor(step / n_steps))``, in float32 on the CPU:
    float64 maths gives other counts (L=4, 3 steps: masked 4, 4, 2 in float32; 4, 4, 3 in float64)."""
    if fixed_schedule is not None:
        n_steps = len(fixed_schedule)
    counts = []
    for step in range(n_steps):
        progress = step / n_steps
        frac_masked = torch.cos(torch.tensor(progress, dtype=torch.float32) * (torch.pi / 2))
        if sampling_type in MASKGIT_CAUSAL:
            frac_masked = torch.ones_like(frac_masked) * (1.0 - progress)
        if fixed_schedule is None:
            n_masked = int(torch.ceil(L * frac_masked).long())
        else:
            n_masked = L - fixed_schedule[step]
        counts.append(L - n_masked)
    return counts


def sample_maskgit(model, dec_last: torch.Tensor, temperature: float, topk: int, unfinished: dict, finished: dict,
                   use_cfg: bool, cfg_scale: float, forbid_audio_eos: bool,
                   options: MaskGitOptions = MaskGitOptions()) -> torch.Tensor:
    """NeMo's ``LocalTransformerHelper.sample_maskgit``: all C*S codes of a step from MASK, over
    :func:`maskgit_unmasked_counts` refinement steps of the bidirectional local transformer.

    Each step keeps the ``n_unmasked`` most confident codes so far (``torch.topk`` of the confidences, ties broken
    as torch breaks them; kept codes have confidence 5 and stay chosen), runs the LT over [decoder output | codes,
    MASK where not kept], combines CFG rows (``s*cond + (1-s)*uncond``; with ``dynamic_cfg_scale`` s goes from 1
    at the first step to ``cfg_scale`` at the last), edits the logits in NeMo's MaskGit order -- forbidden
    specials first, then forced EOS for finished items (the reverse of the AR sampler's order) --, keeps the
    top-k (ties kept), draws ONE ``torch.multinomial`` over all rows x positions (row-major: row r, position j),
    copies the conditional rows' draws and probabilities to the unconditional rows, and takes as confidence the
    drawn code's probability (or the top probability for the "purity" types), plus ``(rand_like - 0.5) *
    noise_scale * (1 - (step + 2) / n_steps)`` noise when ``noise_scale > 0``. Codes are returned (B, C, S):
    position j = c + C*s.

    The random numbers are NeMo's: per refinement step one multinomial over (rows*C*S, V), then the noise's
    ``rand_like`` (rows, C*S) if any. Where NeMo 3.0.0 crashes the reference raises a one-line
    :class:`InferenceError` naming the argument instead (:meth:`MaskGitOptions.check`, and here): unfinished
    items (``ignore_finished_sentence_tracking=False`` while the attention prior runs: NeMo indexes the codebook
    axis with the EOS id, IndexError), noise without CFG (UnboundLocalError), dynamic CFG with one step
    (ZeroDivisionError), a fixed schedule not starting at 0 (AssertionError: MASK tokens left), noise pushing a
    confidence to 4.9 (AssertionError), temperature <= 0 (NaN probabilities; refused by
    :func:`resolve_parameters`). NeMo's confidences are float32; a model in another dtype gets its confidences
    in the probabilities' dtype (NeMo's scatter of a float32 source would fail there).
    """
    cfg = model.config
    C, S = cfg.num_audio_codebooks, cfg.frame_stacking_factor
    L = C * S
    options.check(L, use_cfg)
    if unfinished:
        raise InferenceError(
            "MaskGit sampling with unfinished items (ignore_finished_sentence_tracking=False while the attention prior "
            f"runs, items {sorted(unfinished)}): NeMo 3.0.0 fails here (IndexError: logits[i, audio_eos_id] indexes "
            "the codebook axis); use ignore_finished_sentence_tracking=True")
    rows = dec_last.shape[0]
    B = rows // 2 if use_cfg else rows
    device = dec_last.device
    forbidden = forbidden_tokens(cfg, forbid_audio_eos, device)
    lt_init = model.local_transformer_in_projection(dec_last[:, None])  # (rows, 1, H)
    confidences = 0 * torch.ones(rows, L, device=device)  # NeMo's min_confidence * ones: float32
    codes = cfg.mask_token_id * torch.ones((rows, L), device=device, dtype=torch.long)
    sampled = codes.clone()
    counts = maskgit_unmasked_counts(L, options.n_steps, options.fixed_schedule, options.sampling_type)
    n_steps = len(counts)
    all_valid = torch.ones(rows, L + 1, dtype=torch.bool, device=device)
    for step, n_unmasked in enumerate(counts):
        progress = step / n_steps
        if options.sampling_type in MASKGIT_CAUSAL:
            n_frames_to_allow = int(math.floor(progress * S + 1))  # NeMo: int(np.floor(...)), the same double
            confidences[:, n_frames_to_allow * C :] = -1  # min_confidence - 1
        _, topk_indices = torch.topk(confidences, k=n_unmasked, dim=1)
        unmasked = torch.gather(sampled, dim=1, index=topk_indices)
        codes.scatter_(dim=1, index=topk_indices, src=unmasked)
        x = lt_init
        for j in range(L):  # one embedding + projection per position, as NeMo (no audio_in_projection: identity)
            x = torch.cat([x, model.local_transformer_in_projection(model.audio_embeddings[j](codes[:, j]).unsqueeze(1))],
                          dim=1)
        out = model.local_transformer(x, all_valid)
        logits = torch.stack([model.local_transformer_out_projections[j](out[:, j + 1, :]) for j in range(L)], dim=1)
        if use_cfg:
            s = cfg_scale if not options.dynamic_cfg_scale else (cfg_scale - 1) * (step / (n_steps - 1)) + 1.0
            logits[:B] = s * logits[:B] + (1.0 - s) * logits[B:]
        logits.masked_fill_(forbidden, float("-inf"))  # NeMo's clear_forbidden_logits, first ...
        for b in finished:  # ... then the forced EOS (a finished item gets EOS even while EOS is forbidden)
            logits[b, :, :] = float("-inf")
            logits[b, :, cfg.audio_eos_id] = 0.0
        kth = torch.topk(logits, topk, dim=-1)[0][:, :, -1].unsqueeze(-1)
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")) / temperature, dim=-1)
        sampled = torch.multinomial(probs.view(rows * L, -1), 1).view(rows, L)
        if use_cfg:
            sampled[B:] = sampled[:B]
            probs[B:] = probs[:B]
        if options.sampling_type not in MASKGIT_PURITY:
            confidences = torch.gather(probs, dim=2, index=sampled.unsqueeze(-1)).squeeze(-1)
        else:
            confidences = probs.max(dim=2)[0]
        sampled.scatter_(dim=1, index=topk_indices, src=unmasked)  # what was kept stays
        if options.noise_scale > 0.0:
            noise = (torch.rand_like(confidences) - 0.5) * options.noise_scale * (1 - (step + 2) / n_steps)
            confidences += noise
            confidences[B:] = confidences[:B]
        if not bool(confidences.max() + 0.1 < _MAX_CONFIDENCE):  # NeMo's assertion, the same float32 maths
            raise InferenceError(f"maskgit_noise_scale={options.noise_scale} pushed a MaskGit confidence to "
                                 f"{float(confidences.max())} (>= {_MAX_CONFIDENCE} - 0.1); NeMo 3.0.0 fails its "
                                 "assertion here: use a smaller noise scale")
        confidences.scatter_(dim=1, index=topk_indices,
                             src=_MAX_CONFIDENCE * torch.ones_like(topk_indices, dtype=confidences.dtype))
    if bool((sampled == cfg.mask_token_id).any()):
        raise InferenceError("MaskGit sampling left MASK tokens (NeMo 3.0.0: AssertionError); check "
                             "maskgit_fixed_schedule")
    return sampled.reshape(rows, S, C).permute(0, 2, 1)[:B]


def maskgit_process_batch_draws(batch: dict, cfg, generator: Optional[torch.Generator] = None) -> None:
    """Advance the random stream as NeMo's ``process_batch`` does for a MaskGit model, in eval mode too.

    NeMo's ``process_batch`` masks the targets at random for the MaskGit local transformer's logits
    (``LocalTransformerHelper.apply_random_mask``: ``torch.rand(B, T)`` then ``torch.rand(B, C, T)``, T = the
    padded audio frames + 1, EOS). Those draws feed only ``local_transformer_logits`` / ``_loss``, which the
    reference's ``process_batch`` does not compute; its ``logits`` do not depend on them, so it draws nothing.
    A caller chaining a teacher-forced pass and seeded sampling on one generator (as NeMo's global RNG would be)
    calls this after the reference's ``process_batch`` to be where NeMo's RNG is."""
    codes = batch["audio_codes"]
    B, T = codes.shape[0], codes.shape[2] + 1
    torch.rand(B, T, device=codes.device, generator=generator)
    torch.rand(B, cfg.num_audio_codebooks, T, device=codes.device, generator=generator)


# ---- one decoding step, shared by infer_batch and generate_speech ------------------------------------------------


def local_transformer_mode(cfg, use_local_transformer_for_inference: bool) -> Optional[str]:
    """The sampler NeMo dispatches to: None (the decoder's logits), "autoregressive" or "maskgit"."""
    if not use_local_transformer_for_inference:
        return None
    if cfg.local_transformer_type not in ("autoregressive", "maskgit"):
        raise InferenceError(
            f"use_local_transformer_for_inference needs a local transformer; this checkpoint has "
            f"local_transformer_type={cfg.local_transformer_type!r} (NeMo: ValueError)")
    return cfg.local_transformer_type


def sample_frame(model, dec_last: torch.Tensor, logits: torch.Tensor, p: InferenceParameters, unfinished: dict,
                 finished: dict, forbid_audio_eos: bool, use_cfg: bool, local_transformer: Optional[str] = None,
                 maskgit: MaskGitOptions = MaskGitOptions(), argmax_temperature: float = 0.01) -> StepCodes:
    """The codes of one decoder step, NeMo's dispatch in both loops: the local transformer's sampler (AR:
    :func:`sample_local_transformer`, MaskGit: :func:`sample_maskgit`) on the decoder output ``dec_last`` (rows,
    D), or the sampled pass on the (CFG-combined) ``logits`` (B, C*V*S); then, always, the "argmax" pass on those
    logits (temperature ``argmax_temperature``, top-1), whose codes decide EOS with the sampled ones."""
    cfg = model.config
    if local_transformer is None:
        return sample_step(logits, cfg, p.temperature, p.topk, unfinished, finished, forbid_audio_eos,
                           argmax_temperature=argmax_temperature)
    if local_transformer == "maskgit":
        sampled = sample_maskgit(model, dec_last, p.temperature, p.topk, unfinished, finished, use_cfg, p.cfg_scale,
                                 forbid_audio_eos, maskgit)
    else:
        sampled = sample_local_transformer(model, dec_last, p.temperature, p.topk, unfinished, finished, use_cfg,
                                           p.cfg_scale, p.use_LT_kv_cache, forbid_audio_eos)
    invalid: list[torch.Tensor] = []
    argmax = sample_codes(logits, cfg, argmax_temperature, 1, unfinished, finished, forbid_audio_eos, invalid=invalid)
    return StepCodes(sampled, argmax, ~invalid[0].reshape(1))


def read_codes(codes: StepCodes, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's two code tensors on the host, with one device-to-host copy for both and the validity flags (a
    GPU sync each otherwise); invalid sampling probabilities -> InferenceError. Returns (argmax, sampled)."""
    n = codes.sampled.numel()
    host = torch.cat([codes.argmax.reshape(-1), codes.sampled.reshape(-1), codes.valid.long()]).cpu()
    if not host[2 * n :].all():
        raise InferenceError(f"step {step}: the sampling probabilities contain NaN, Inf or negative values "
                             "(non-finite logits?); torch.multinomial would refuse them")
    return host[:n].view(codes.argmax.shape), host[n : 2 * n].view(codes.sampled.shape)


def eos_frames(argmax: torch.Tensor, sampled: torch.Tensor, eos_id: int, method: str) -> list[float]:
    """NeMo's ``detect_eos`` for every item: the first frame of the stack with EOS in the argmax codes (and, for
    the "argmax_or_multinomial" methods, the earlier of that and the sampled codes'), or inf."""
    sampling_type, detection = EOS_METHODS[method]
    found = find_eos(argmax, eos_id, detection)
    if sampling_type == "argmax_or_multinomial":
        found = [min(a, s) for a, s in zip(found, find_eos(sampled, eos_id, detection))]
    return found


def find_eos(codes: torch.Tensor, eos_id: int, detection: str) -> list[float]:
    """codes (B, C, S) -> per item, the index within the stack of the first frame with EOS, or inf
    (NeMo's find_eos_frame_index, for the whole batch at once)."""
    m = codes == eos_id
    per_frame = {"any": lambda: m.any(dim=1), "all": lambda: m.all(dim=1), "zero_cb": lambda: m[:, :1].any(dim=1)}[detection]()
    first = per_frame.int().argmax(dim=1).tolist()  # argmax of a 0/1 row = its first 1
    return [float(f) if hit else float("inf") for f, hit in zip(first, per_frame.any(dim=1).tolist())]


# ---- the hook set -----------------------------------------------------------------------------------------------


class LoopHooks:
    """The few places where a runtime may legitimately differ from NeMo's loop, each NeMo 3.0.0's own behaviour
    here. The reference never overrides them; ``trt.engine`` subclasses them to emulate a TensorRT-LLM engine
    (zero CFG prompt, bias-less lm_head, another encoder, the in-kernel prior), so the loop below stays NeMo's
    and the emulation lives beside the engine tooling.

    encode_text(model, text, text_lens) -> EncoderOutput: the text encoder.
    lm_head(model, dec_out) -> logits: the output projection of the decoder's output.
    uncond_audio_embedding(emb) -> emb: CFG's unconditional rows' audio-frame embeddings (B, T, D), frame 0 the BOS
    frame, before positions are added (NeMo feeds the conditional rows' own).
    first_attended_position() -> int: the text position the prior state machine starts from (NeMo: 1).
    build_prior(state, rows, T_text, text_lens, attended, p, end_indices, device) -> (rows, 1, T_text): the prior
    of the next step, from the state machine's bookkeeping (NeMo: :meth:`PriorState.build_prior`).
    """

    def encode_text(self, model, text: torch.Tensor, text_lens: torch.Tensor):
        return model.encode_text(text, text_lens)

    def lm_head(self, model, dec_out: torch.Tensor) -> torch.Tensor:
        return model.final_proj(dec_out)

    def uncond_audio_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        return emb

    def first_attended_position(self) -> int:
        return 1

    def build_prior(self, state: "PriorState", rows: int, T_text: int, text_lens: list[int], attended: list[int],
                    p: InferenceParameters, end_indices: dict, device) -> torch.Tensor:
        return state.build_prior(rows, T_text, text_lens, attended, p.attention_prior_epsilon,
                                 p.attention_prior_lookahead_window, end_indices, device)


NEMO_HOOKS = LoopHooks()


class DecoderSteps:
    """The decoder's forward of one decoding step, as NeMo's loops run it (``infer_batch``, ``generate_speech``):
    over [context prefix | the frames so far], with CFG's unconditional rows appended, on either of NeMo's
    paths (recompute, or cached: see the module docstring). One copy for both loops.

    cond, cond_mask, ctx_emb, ctx_mask: with the CFG rows already appended (:func:`dummy_cfg_conditioning`) when
    ``use_cfg``. Calling it with the step index, the codes so far (B, C, S*(idx+1)) and the per-layer prior returns
    the decoder output (rows, T, D) and the newest position's CFG-combined float32 logits (B, C*V*S)."""

    def __init__(self, model, cond, cond_mask, ctx_emb, ctx_mask, B: int, use_cfg: bool, cfg_scale: float,
                 cached: bool, max_steps: int, nemo_unmasked_padded_keys: bool = False, hooks: LoopHooks = NEMO_HOOKS):
        self.model, self.cond, self.cond_mask, self.ctx_emb, self.ctx_mask = model, cond, cond_mask, ctx_emb, ctx_mask
        self.B, self.use_cfg, self.cfg_scale, self.hooks = B, use_cfg, cfg_scale, hooks
        self.rows = ctx_emb.shape[0]
        self.device = ctx_emb.device
        dtype = next(model.parameters()).dtype
        T_ctx = ctx_mask.shape[1]
        self.state = model.decoder.new_state(self.rows, T_ctx + max_steps + 1, cond, self.device, dtype) if cached else None
        # Cached decode steps attend the valid context keys and every frame since: one mask for all steps, sliced;
        # no mask at all where nothing is masked (NeMo's 1x1 mask of ones, or no padded context): masked_fill with
        # an all-False mask changes nothing.
        self.valid_keys = None
        if cached and not nemo_unmasked_padded_keys and not bool(ctx_mask.all()):
            self.valid_keys = torch.cat(
                [ctx_mask, torch.ones(self.rows, max_steps + 1, dtype=torch.bool, device=self.device)], 1)

    def __call__(self, idx: int, codes_in: torch.Tensor, layer_prior: list,
                 probs: list) -> tuple[torch.Tensor, torch.Tensor]:
        model, hooks, B, S = self.model, self.hooks, self.B, self.model.config.frame_stacking_factor
        device, rows = self.device, self.rows
        if self.state is None:
            audio_emb, audio_lens = model.embed_audio_tokens(codes_in, torch.full((B,), codes_in.shape[2], device=device))
            audio_mask = lengths_to_mask(audio_lens)
            if self.use_cfg:
                audio_emb = torch.cat([audio_emb, hooks.uncond_audio_embedding(audio_emb)])
                audio_mask = torch.cat([audio_mask, audio_mask])
            x = model.decoder_input(torch.cat([self.ctx_emb, audio_emb], dim=1))
            x_mask = torch.cat([self.ctx_mask, audio_mask], dim=1)
            dec = model.decoder(x, x_mask, self.cond, self.cond_mask, layer_prior, probs_out=probs)
        else:
            if idx == 0:
                bos_emb, _ = model.embed_audio_tokens(codes_in, torch.full((B,), S, device=device))
                if self.use_cfg:
                    bos_emb = torch.cat([bos_emb, hooks.uncond_audio_embedding(bos_emb)])
                x = model.decoder_input(torch.cat([self.ctx_emb, bos_emb], dim=1))
                x_mask = torch.cat([self.ctx_mask, torch.ones(rows, bos_emb.shape[1], dtype=torch.bool, device=device)], 1)
                key_mask = (x_mask.unsqueeze(1) * x_mask.unsqueeze(2)).unsqueeze(1)
            else:
                new_emb, _ = model.embed_audio_tokens(codes_in[:, :, -S:], None)
                if self.use_cfg:
                    new_emb = torch.cat([new_emb, new_emb])
                x = model.decoder_input(new_emb)
                x_mask = None  # one new, valid frame per row: NeMo's multiplications by ones are skipped
                key_mask = None if self.valid_keys is None else self.valid_keys[:, None, None, : self.state.length + 1]
            dec = model.decoder.forward_cached(x, x_mask, self.state, key_mask, self.cond_mask, layer_prior,
                                               probs_out=probs)
        all_logits = hooks.lm_head(model, dec)
        logits_t = all_logits[:, -1, :]
        logits_t = logits_t.float()
        if self.use_cfg:
            logits_t = (1 - self.cfg_scale) * logits_t[B:] + self.cfg_scale * logits_t[:B]
        model.logits(logits_t[:, None])
        return dec, logits_t


def layer_priors(prior: Optional[torch.Tensor], p: InferenceParameters, n_layers: int) -> list:
    """The prior per decoder layer: every layer, or those of ``apply_prior_to_layers``."""
    if p.apply_prior_to_layers is not None:
        return [prior if i in p.apply_prior_to_layers else None for i in range(n_layers)]
    return [prior] * n_layers


# ---- the loop ---------------------------------------------------------------------------------------------------


def checked_call(cfg, batch: dict, params: dict, use_cfg: bool, use_local_transformer_for_inference: bool,
                 maskgit_n_steps, maskgit_noise_scale, maskgit_fixed_schedule, maskgit_dynamic_cfg_scale,
                 maskgit_sampling_type) -> tuple:
    """What every NeMo loop (``infer_batch``, ``generate_speech``) checks before any work, in this order: the
    parameters resolved, the batch, the parameters against the model, the local transformer, MaskGit's options.
    Returns (parameters, local-transformer mode, MaskGit options)."""
    p = resolve_parameters(cfg.inference, **params)
    validate_batch(batch, cfg, require_audio=False)
    check_parameters(p, cfg)
    lt_mode = local_transformer_mode(cfg, use_local_transformer_for_inference)
    maskgit = MaskGitOptions.from_args(maskgit_n_steps, maskgit_noise_scale, maskgit_fixed_schedule,
                                       maskgit_dynamic_cfg_scale, maskgit_sampling_type)
    if lt_mode == "maskgit":
        maskgit.check(cfg.num_audio_codebooks * cfg.frame_stacking_factor, use_cfg)
    return p, lt_mode, maskgit


@torch.inference_mode()  # no autograd bookkeeping at all: less host time per op than no_grad
def infer_batch(
    model,
    batch: dict[str, torch.Tensor],
    use_cfg: bool = False,
    use_kv_cache: Optional[bool] = None,
    nemo_unmasked_padded_keys: bool = False,
    forced_codes: Optional[torch.Tensor] = None,
    keep_logits: bool = False,
    progress: bool = False,
    hooks: LoopHooks = NEMO_HOOKS,
    use_local_transformer_for_inference: bool = False,
    maskgit_n_steps: int = 3,
    maskgit_noise_scale: float = 0.0,
    maskgit_fixed_schedule: Optional[Sequence[int]] = None,
    maskgit_dynamic_cfg_scale: bool = False,
    maskgit_sampling_type: Optional[str] = None,
    **params: Any,
) -> InferOutput:
    """NeMo's ``infer_batch`` for this model. ``params`` are NeMo's ``inference_parameters`` fields.

    use_kv_cache: None = the checkpoint's ``use_kv_cache_for_inference`` (as NeMo chooses).
    forced_codes: (B, C, T) teacher forcing: these codes are fed back instead of the sampled ones (sampling
    still runs, so random numbers are drawn as in a free run); decoding continues until they run out or
    max_decoder_steps, ignoring EOS.
    hooks: :class:`LoopHooks` (default: NeMo 3.0.0's behaviour); ``trt.engine`` passes an engine's.
    use_local_transformer_for_inference: sample with the checkpoint's local transformer (NeMo's argument of the
    same name; off by default, as in NeMo): autoregressive, or MaskGit with NeMo's ``maskgit_*`` arguments
    (:class:`MaskGitOptions`; ignored otherwise, as NeMo ignores them). Where NeMo's MaskGit crashes the
    reference raises a one-line :class:`InferenceError` (see :func:`sample_maskgit`).
    """
    cfg = model.config
    p, lt_mode, maskgit = checked_call(cfg, batch, params, use_cfg, use_local_transformer_for_inference,
                                       maskgit_n_steps, maskgit_noise_scale, maskgit_fixed_schedule,
                                       maskgit_dynamic_cfg_scale, maskgit_sampling_type)
    cached = cfg.use_kv_cache_for_inference if use_kv_cache is None else bool(use_kv_cache)
    C, S = cfg.num_audio_codebooks, cfg.frame_stacking_factor
    device = next(model.parameters()).device
    capture = getattr(model, "_active_capture", None)

    text_lens_t = batch["text_lens"]
    text_lens = [int(n) for n in text_lens_t.tolist()]  # one device read, not one per item
    B = len(text_lens)
    enc = hooks.encode_text(model, batch["text"], text_lens_t)
    ctx_emb, ctx_mask = model.decoder_context(batch)
    T_text = enc.output.shape[1]
    cond, cond_mask = enc.output, enc.mask
    if use_cfg:
        cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask)
    rows = ctx_emb.shape[0]

    codes_in = torch.full((B, C, S), cfg.audio_bos_id, dtype=torch.long, device=device)
    max_steps = p.max_decoder_steps // S
    decode = DecoderSteps(model, cond, cond_mask, ctx_emb, ctx_mask, B, use_cfg, p.cfg_scale, cached, max_steps,
                          nemo_unmasked_padded_keys, hooks)
    prior_state = PriorState.new(B, hooks.first_attended_position())
    prior: Optional[torch.Tensor] = None
    end_indices: dict[int, int] = {}
    predictions: list[torch.Tensor] = []
    out = InferOutput(torch.empty(0), torch.empty(0), 0)

    def next_prior(scores_host: torch.Tensor, idx: int) -> torch.Tensor:
        """NeMo's prior bookkeeping after step idx -> the prior of step idx + 1."""
        attended = prior_state.most_attended(scores_host, text_lens, p.attention_prior_lookahead_window)
        out.attended_text_positions.append(attended)
        out.attended_by_step[idx] = list(attended)
        built = hooks.build_prior(prior_state, rows, T_text, text_lens, attended, p, end_indices, device)
        out.built_priors[idx] = built
        return built

    steps = range(max_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="decoding", unit="frame")
    for idx in steps:
        if capture is not None:
            capture.step = idx
        layer_prior = layer_priors(prior, p, cfg.decoder.n_layers)
        out.step_priors.append(prior)
        probs: list[torch.Tensor] = []
        dec, logits_t = decode(idx, codes_in, layer_prior, probs)
        if keep_logits:
            out.step_logits.append(logits_t.clone())

        prior_due = p.apply_attention_prior and idx >= p.start_prior_after_n_audio_steps
        scores_host = None
        if prior_due:
            # The per-item bookkeeping runs on a host copy of the scores (no sync per item). With sentence tracking
            # this step's sampling depends on it, so it is read now (a sync). Without (NeMo's default) the sampling
            # does not, so the copy is queued and read with the codes' copy below: one sync a step, and the host
            # launches the sampling while the GPU is still finishing the decoder. The bookkeeping itself still
            # runs before this step's EOS detection, as in NeMo.
            scores = cross_attention_scores(probs, p.estimate_alignment_from_layers)
            if p.ignore_finished_sentence_tracking:
                scores_host = scores.to("cpu", non_blocking=True)  # pinned on CUDA: ready after the sync below
            else:
                prior = next_prior(scores.cpu(), idx)
        if p.ignore_finished_sentence_tracking:
            finished, unfinished = {}, {}
        else:
            finished = {k: v for k, v in prior_state.finished_counter.items() if v >= 20}
            unfinished = {k: v for k, v in prior_state.unfinished.items() if v}
        forbid_eos = idx * S < p.min_generated_frames
        codes = sample_frame(model, dec[:, -1, :], logits_t, p, unfinished, finished, forbid_eos, use_cfg, lt_mode,
                             maskgit)
        codes_next = codes.sampled
        argmax_host, sampled_host = read_codes(codes, idx)
        if scores_host is not None:
            prior = next_prior(scores_host, idx)
        eos = eos_frames(argmax_host, sampled_host, cfg.audio_eos_id, p.eos_detection_method)
        for b in range(B):
            if b not in end_indices and eos[b] != float("inf"):
                end_indices[b] = idx * S + int(eos[b])
        if forced_codes is not None:
            if forced_codes.shape[2] < (idx + 1) * S:
                # The forced run ends here: this step's logits depended only on earlier frames.
                predictions.append(codes_next)
                break
            codes_next = forced_codes[:, :, idx * S : (idx + 1) * S].to(codes_next)
        predictions.append(codes_next)
        codes_in = torch.cat([codes_in, codes_next], dim=-1)
        # A teacher-forced run follows the forced codes to their end, whatever EOS its own logits would signal.
        if forced_codes is None and len(end_indices) == B and len(predictions) >= MIN_FRAMES_FOR_CODEC:
            break
    if capture is not None:
        capture.step = None
    codes = torch.cat(predictions, dim=-1)
    lens = torch.tensor([end_indices.get(b, p.max_decoder_steps) for b in range(B)], dtype=torch.long)
    out.predicted_codes = codes[:, :, : int(lens.max())]
    out.predicted_codes_lens = lens
    out.num_steps = len(predictions)
    return out
