"""Autoregressive inference equal to NeMo 3.0.0's ``MagpieTTSModel.infer_batch`` (``decoder_context_tts``).

NeMo has two decoding paths and picks one from the checkpoint's ``use_kv_cache_for_inference``:

* **recompute** (released checkpoints): every step re-runs the decoder over the whole sequence and applies the
  newest prior row to *every* query position, past ones included;
* **cached**: step 0 runs the context prefix + BOS frame, later steps only the new frame. NeMo's cached path
  does not mask padded context keys at steps >= 1 (``query_mask[:, -1:]`` builds a 1x1 mask); the reference
  masks them by default and reproduces NeMo with ``nemo_unmasked_padded_keys=True``.

Both paths share the attention-prior state machine, CFG and per-codebook sampling, written here in the same
order as NeMo so that random numbers are drawn in the same order and shapes (codes match NeMo's on the CPU for
the same ``torch.manual_seed``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

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
    """NeMo's bookkeeping across steps, per batch item."""

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

    def most_attended(self, scores: torch.Tensor, text_lens: list[int], lookahead: int) -> list[int]:
        self._sync_stuck_end()
        attended = []
        # numpy on the host copy: the same first-maximum index (NaN counts as the maximum in both) without a
        # torch op per item
        rows = scores.float().cpu().numpy()  # float32 holds every bf16/fp16 value exactly: same order
        for b in range(len(text_lens)):
            last = self.last_attended[b]
            if self.counters[b].get(last, 0) >= 8:  # an attention sink: move on by one
                last += 1
            window_end = min(last + lookahead, text_lens[b] - 3)  # the last 3 positions are never searched
            window = rows[b, last:window_end]
            t = text_lens[b] - 1 if window.shape[0] == 0 else int(window.argmax()) + last
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
        """(rows, 1, T_text) prior for the next step; rows past the batch (CFG unconditional) stay epsilon."""
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
        for b in self.finished_counter:
            self.finished_counter[b] += 1
            if self.finished_counter[b] > 5:
                self.unfinished[b] = False
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
                forbid_audio_eos: bool, generator: Optional[torch.Generator] = None) -> StepCodes:
    """NeMo's two sampling passes of a step, ``sample_codes(temperature, topk)`` then ``sample_codes(0.01, 1)``,
    sharing what they compute alike: the two passes edit the same logits the same way, and top-1's threshold
    is the first of top-k's sorted values (the row maximum, the same float). The draws are made in NeMo's order
    (every codebook of the sampled pass, then every codebook of the argmax pass), so codes and generator state
    equal the two separate calls'."""
    B, S, C = logits.shape[0], cfg.frame_stacking_factor, cfg.num_audio_codebooks
    lg = _edited_logits(logits, cfg, unfinished, finished, forbid_audio_eos)
    top = torch.topk(lg, topk, dim=-1)[0]  # (B, S*C, topk), descending
    probs = _topk_probs(lg, top[..., -1:], temperature)
    probs_argmax = _topk_probs(lg, top[..., :1], 0.01)
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


# ---- the loop ---------------------------------------------------------------------------------------------------


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
    **params: Any,
) -> InferOutput:
    """NeMo's ``infer_batch`` for this model. ``params`` are NeMo's ``inference_parameters`` fields.

    use_kv_cache: None = the checkpoint's ``use_kv_cache_for_inference`` (as NeMo chooses).
    forced_codes: (B, C, T) teacher forcing: these codes are fed back instead of the sampled ones (sampling
    still runs, so random numbers are drawn as in a free run); decoding continues until they run out or
    max_decoder_steps, ignoring EOS.
    hooks: :class:`LoopHooks` (default: NeMo 3.0.0's behaviour); ``trt.engine`` passes an engine's.
    use_local_transformer_for_inference: sample with the checkpoint's autoregressive local transformer (NeMo's
    argument of the same name; off by default, as in NeMo).
    """
    cfg = model.config
    p = resolve_parameters(cfg.inference, **params)
    validate_batch(batch, cfg, require_audio=False)
    check_parameters(p, cfg)
    if use_local_transformer_for_inference and cfg.local_transformer_type != "autoregressive":
        raise InferenceError(
            f"use_local_transformer_for_inference needs an autoregressive local transformer; this checkpoint has "
            f"local_transformer_type={cfg.local_transformer_type!r} (MaskGit sampling is not implemented)"
        )
    cached = cfg.use_kv_cache_for_inference if use_kv_cache is None else bool(use_kv_cache)
    C, S = cfg.num_audio_codebooks, cfg.frame_stacking_factor
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    capture = getattr(model, "_active_capture", None)
    sampling_type, detection = EOS_METHODS[p.eos_detection_method]

    text_lens_t = batch["text_lens"]
    text_lens = [int(n) for n in text_lens_t.tolist()]  # one device read, not one per item
    B = len(text_lens)
    enc = hooks.encode_text(model, batch["text"], text_lens_t)
    ctx_emb, ctx_mask = model.decoder_context(batch)
    T_ctx, T_text = ctx_mask.shape[1], enc.output.shape[1]
    cond, cond_mask = enc.output, enc.mask
    if use_cfg:
        cond, cond_mask, ctx_emb, ctx_mask = dummy_cfg_conditioning(cond, cond_mask, ctx_emb, ctx_mask)
    rows = ctx_emb.shape[0]

    codes_in = torch.full((B, C, S), cfg.audio_bos_id, dtype=torch.long, device=device)
    max_steps = p.max_decoder_steps // S
    state = model.decoder.new_state(rows, T_ctx + max_steps + 1, cond, device, dtype) if cached else None
    # Cached decode steps attend the valid context keys and every frame since: one mask for all steps, sliced;
    # no mask at all where nothing is masked (NeMo's 1x1 mask of ones, or no padded context): masked_fill with
    # an all-False mask changes nothing.
    valid_keys = None
    if cached and not nemo_unmasked_padded_keys and not bool(ctx_mask.all()):
        valid_keys = torch.cat([ctx_mask, torch.ones(rows, max_steps + 1, dtype=torch.bool, device=device)], 1)
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
        if p.apply_prior_to_layers is not None:
            layer_prior = [prior if i in p.apply_prior_to_layers else None for i in range(cfg.decoder.n_layers)]
        else:
            layer_prior = [prior] * cfg.decoder.n_layers
        out.step_priors.append(prior)
        probs: list[torch.Tensor] = []
        if not cached:
            audio_emb, audio_lens = model.embed_audio_tokens(codes_in, torch.full((B,), codes_in.shape[2], device=device))
            audio_mask = lengths_to_mask(audio_lens)
            if use_cfg:
                audio_emb = torch.cat([audio_emb, hooks.uncond_audio_embedding(audio_emb)])
                audio_mask = torch.cat([audio_mask, audio_mask])
            x = model.decoder_input(torch.cat([ctx_emb, audio_emb], dim=1))
            x_mask = torch.cat([ctx_mask, audio_mask], dim=1)
            dec = model.decoder(x, x_mask, cond, cond_mask, layer_prior, probs_out=probs)
            all_logits = hooks.lm_head(model, dec)
        else:
            if idx == 0:
                bos_emb, _ = model.embed_audio_tokens(codes_in, torch.full((B,), S, device=device))
                if use_cfg:
                    bos_emb = torch.cat([bos_emb, hooks.uncond_audio_embedding(bos_emb)])
                x = model.decoder_input(torch.cat([ctx_emb, bos_emb], dim=1))
                x_mask = torch.cat([ctx_mask, torch.ones(rows, bos_emb.shape[1], dtype=torch.bool, device=device)], 1)
                key_mask = (x_mask.unsqueeze(1) * x_mask.unsqueeze(2)).unsqueeze(1)
            else:
                new_emb, _ = model.embed_audio_tokens(codes_in[:, :, -S:], None)
                if use_cfg:
                    new_emb = torch.cat([new_emb, new_emb])
                x = model.decoder_input(new_emb)
                x_mask = None  # one new, valid frame per row: NeMo's multiplications by ones are skipped
                key_mask = None if valid_keys is None else valid_keys[:, None, None, : state.length + 1]
            dec = model.decoder.forward_cached(x, x_mask, state, key_mask, cond_mask, layer_prior, probs_out=probs)
            all_logits = hooks.lm_head(model, dec)
        logits_t = all_logits[:, -1, :]
        logits_t = logits_t.float()
        if use_cfg:
            logits_t = (1 - p.cfg_scale) * logits_t[B:] + p.cfg_scale * logits_t[:B]
        model.logits(logits_t[:, None])
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
        if use_local_transformer_for_inference:
            codes_next = sample_local_transformer(model, dec[:, -1, :], p.temperature, p.topk, unfinished, finished,
                                                  use_cfg, p.cfg_scale, p.use_LT_kv_cache, forbid_eos)
            invalid: list[torch.Tensor] = []
            codes_argmax = sample_codes(logits_t, cfg, 0.01, 1, unfinished, finished, forbid_eos, invalid=invalid)
            valid = ~invalid[0].reshape(1)
        else:
            both = sample_step(logits_t, cfg, p.temperature, p.topk, unfinished, finished, forbid_eos)
            codes_next, codes_argmax, valid = both.sampled, both.argmax, both.valid
        # One device-to-host copy for both passes' codes and the validity flags (a GPU sync each otherwise).
        host = torch.cat([codes_argmax.reshape(-1), codes_next.reshape(-1), valid.long()]).cpu()
        if not host[2 * codes_next.numel() :].all():
            raise InferenceError(f"step {idx}: the sampling probabilities contain NaN, Inf or negative values "
                                 "(non-finite logits?); torch.multinomial would refuse them")
        if scores_host is not None:
            prior = next_prior(scores_host, idx)
        eos_argmax = find_eos(host[: codes_next.numel()].view(codes_argmax.shape), cfg.audio_eos_id, detection)
        eos_sampled = find_eos(host[codes_next.numel() : 2 * codes_next.numel()].view(codes_next.shape),
                               cfg.audio_eos_id, detection)
        for b in range(B):
            if b in end_indices:
                continue
            e = eos_argmax[b]
            if sampling_type == "argmax_or_multinomial":
                e = min(e, eos_sampled[b])
            if e != float("inf"):
                end_indices[b] = idx * S + int(e)
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
