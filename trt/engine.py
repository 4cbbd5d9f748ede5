"""TensorRT-LLM engine behaviours as a policy for NeMo's loop: NeMo 3.0.0 by default, each behaviour one field away.

A divergence between an engine and NeMo is *explained* when running NeMo's loop (``reference.inference``) with the
engine's known behaviours switched on reproduces the engine. The loop stays the reference's: this module only
supplies its documented hook set (:class:`reference.inference.LoopHooks`), the parameters and the loop options an
engine implies, and the request packing an engine does. ``trt/diagnose.py`` searches these fields.

What this emulation proves is self-consistency (the reference under a policy vs the reference under another);
no TensorRT-LLM engine was run to produce it (``tests/trt`` says so; the real-engine tests are marked ``trtllm``).
Every field cites where the behaviour comes from (``shared/spec/architecture.md`` sections; fork files by commit).

=======================  ==============================================================================================
field                    engine behaviour (source)
=======================  ==============================================================================================
``kv_cache``             The engine always decodes with a KV cache; released NeMo configs recompute the sequence each step
                         and re-apply the newest prior row to every past query (arch. 6.2, 11.7; NeMo infer_batch).
``prior="kernel"``       The fork's in-kernel prior (gen C, anand-nv decoderMaskedMultiheadAttentionTemplate.h; arch.
                         6.3): probabilities outside [focus-1, focus+5] scaled by epsilon 0.1 and renormalised, window
                         not clamped at index 1; focus moved by the argmax of the lookahead scores (host side,
                         runtimeBuffers processAttentionPriorScores); no short-text or stuck-position rule.
``multi_block_mode``     With ``multi_block_mode=True`` the kernel's prior branch is skipped: no prior at all
                         (trtllm.md fact 7; arch. 6.3 "Why multi_block_mode=False").
``cfg_prompt="zeros"``   The fork's unconditional prompt is the zero "service token" embedding everywhere, the BOS
                         frame included; NeMo keeps the BOS frame (arch. 7, 11.6; runtimeBuffers.cpp). decoder_ce: a
                         runtime given the conditional ``decoder_context_features`` rows only; given [cond; uncond]
                         rows (``trt.runner``'s default, which anand-nv@0c0df9f0 copies) the engine runs NeMo's.
``lm_head_bias=False``   The fork's converter drops ``final_proj.bias`` (arch. 4.3, 11.1; convert_checkpoint.py e7109d5).
``encoder="bidirectional"``  The fork's encoder is BertAttention (bidirectional) with symmetric conv padding, whatever
                         the checkpoint's ``is_causal`` (arch. 3, 11.2; t5tts/model.py).
``packed_encoder_conv``  With remove_input_padding and several requests, the encoder conv runs over the packed token
                         stream and mixes neighbouring requests' edge tokens (arch. 3 "TRT packing caveat", 11.3).
``unpadded_requests``    The engine packs requests without padding: each request's prompt starts at position 0 and has
                         its own length; NeMo pads contexts to the batch's longest, which shifts positions. decoder_ce:
                         the prompt is the request's ``decoder_context`` rows of valid length (context encoder output;
                         baked rows, all ``baked_frames`` long unless a speaker was baked shorter, so a baked batch has
                         no context padding and this changes nothing but the rounding of unpadded text).
``dtype``                Engine compute precision (float16 / bfloat16 engines).
=======================  ==============================================================================================
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from reference.batch import lengths_to_mask
from reference.inference import InferOutput, LoopHooks, infer_batch
from reference.model import EncoderOutput, Transformer

PRIOR_CHOICES = ("nemo", "kernel", "off")


@dataclass(frozen=True)
class KernelPrior:
    """Parameters of the fork's in-kernel prior (anand-nv convert_checkpoint.py defaults, arch. 6.3)."""

    epsilon: float = 0.1  # hard-coded in the kernel
    window_left: int = 1
    window_right: int = 5
    lookahead: int = 5
    compute_layers: Optional[tuple[int, ...]] = None  # None = the reference's estimate_alignment_from_layers
    apply_layers: Optional[tuple[int, ...]] = None  # None = the reference's apply_prior_to_layers
    first_focus: int = 1  # NeMo starts at 1; anand-nv's runtime uses kDefaultFirstFocus = 4


@dataclass(frozen=True)
class EnginePolicy:
    """Which engine behaviours to emulate; ``EnginePolicy()`` is NeMo 3.0.0 itself (see the module's table)."""

    kv_cache: Optional[bool] = None  # None: as the checkpoint says (NeMo's choice)
    prior: str = "nemo"
    multi_block_mode: bool = False
    cfg_prompt: str = "nemo"
    lm_head_bias: bool = True
    encoder: str = "checkpoint"
    packed_encoder_conv: bool = False
    unpadded_requests: bool = False
    dtype: Optional[str] = None  # None: the model's own dtype; a name: run a copy of the model in that precision
    kernel_prior: KernelPrior = field(default_factory=KernelPrior)

    def __post_init__(self):
        if self.prior not in PRIOR_CHOICES:
            raise ValueError(f"prior must be one of {PRIOR_CHOICES}, got {self.prior!r}")
        if self.cfg_prompt not in ("nemo", "zeros"):
            raise ValueError(f"cfg_prompt must be 'nemo' or 'zeros', got {self.cfg_prompt!r}")
        if self.encoder not in ("checkpoint", "bidirectional"):
            raise ValueError(f"encoder must be 'checkpoint' or 'bidirectional', got {self.encoder!r}")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be None, float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def effective_prior(self) -> str:
        """An engine in multi-block mode applies no prior, whichever variant it was built with."""
        return "off" if self.multi_block_mode else self.prior

    def differences(self) -> list[str]:
        """Names of the fields that differ from NeMo's behaviour."""
        base = EnginePolicy()
        return [f.name for f in dataclasses.fields(self)
                if f.name != "kernel_prior" and getattr(self, f.name) != getattr(base, f.name)]

    @classmethod
    def engine(cls, **kw) -> "EnginePolicy":
        """What a fork engine does by default: cached, kernel prior, zero CFG prompt, no lm_head bias, bidirectional
        encoder, packed requests. Override fields to describe a specific build."""
        base = dict(kv_cache=True, prior="kernel", cfg_prompt="zeros", lm_head_bias=False, encoder="bidirectional",
                    packed_encoder_conv=True, unpadded_requests=True)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_trtllm_config(cls, decoder_config: dict, **kw) -> "EnginePolicy":
        """Preset from a converted decoder ``config.json`` (trt/convert.py writes the fork's keys)."""
        kp = KernelPrior(
            lookahead=int(decoder_config.get("attention_prior_lookahead", 5)),
            window_left=int(decoder_config.get("attention_prior_window_left", 1)),
            window_right=int(decoder_config.get("attention_prior_window_right", 5)),
            compute_layers=_tuple(decoder_config.get("compute_attention_prior_from_layers")),
            apply_layers=_tuple(decoder_config.get("apply_attention_prior_to_layers")),
        )
        lm_bias = bool(decoder_config.get("has_lm_head_bias", False))
        prior = "kernel" if decoder_config.get("use_attention_prior", False) else "off"
        return cls.engine(kernel_prior=kp, lm_head_bias=lm_bias, prior=prior, **kw)


_BOOL_FIELDS = ("multi_block_mode", "lm_head_bias", "packed_encoder_conv", "unpadded_requests")


def policy_from_settings(settings: dict[str, Any], base: Optional[EnginePolicy] = None) -> EnginePolicy:
    """``{"multi_block_mode": True, "prior": "kernel", "kernel_prior.first_focus": 4}`` -> an :class:`EnginePolicy`
    (fields of ``base``, default NeMo's, replaced). ValueError naming the key for an unknown field or a value of
    the wrong kind."""
    base = base or EnginePolicy()
    fields = {f.name for f in dataclasses.fields(EnginePolicy)} - {"kernel_prior"}
    kp_fields = {f.name: f.type for f in dataclasses.fields(KernelPrior)}
    top, kp = {}, {}
    for key, value in settings.items():
        if key in fields:
            if key in _BOOL_FIELDS and not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: expected true or false")
            if key == "kv_cache" and value is not None and not isinstance(value, bool):
                raise ValueError(f"kv_cache={value!r}: expected true, false or none")
            top[key] = value
        elif key.startswith("kernel_prior.") and key.partition(".")[2] in kp_fields:
            name = key.partition(".")[2]
            if name.endswith("_layers"):
                ok = value is None or (isinstance(value, list) and all(type(i) is int for i in value))
                value = tuple(value) if isinstance(value, list) else value
            else:
                ok = type(value) is (float if name == "epsilon" else int) or (name == "epsilon" and type(value) is int)
            if not ok:
                raise ValueError(f"{key}={value!r}: a value of the wrong kind")
            kp[name] = value
        else:
            known = sorted(fields) + [f"kernel_prior.{n}" for n in kp_fields]
            raise ValueError(f"unknown engine behaviour {key!r}; known: {', '.join(known)}")
    if kp:
        top["kernel_prior"] = dataclasses.replace(base.kernel_prior, **kp)
    return dataclasses.replace(base, **top)


def _tuple(x) -> Optional[tuple[int, ...]]:
    return tuple(int(i) for i in x) if x is not None else None


# ---- the hooks: where the engine's loop departs from NeMo's ------------------------------------------------------


class EngineHooks(LoopHooks):
    """:class:`reference.inference.LoopHooks` under a policy; NeMo's behaviour wherever the policy keeps it."""

    def __init__(self, policy: EnginePolicy, encoder_output: Optional[EncoderOutput] = None):
        self.policy = policy
        self.encoder_output = encoder_output  # set per request by the unpadded-request loop

    def encode_text(self, model, text, text_lens):
        if self.encoder_output is not None:
            return self.encoder_output
        return encode_text(model, text, text_lens, self.policy)

    def lm_head(self, model, dec_out):
        proj = model.final_proj
        if self.policy.lm_head_bias or proj.bias is None:
            return proj(dec_out)
        # The fork's lm_head: the same weight, no bias. Run through the module (F.linear without a bias), so that a
        # capture's hook on final_proj records the engine's lm_head output as it does NeMo's.
        bias = proj.bias
        proj.bias = None
        try:
            return proj(dec_out)
        finally:
            proj.bias = bias

    def uncond_audio_embedding(self, emb):
        if self.policy.cfg_prompt != "zeros":
            return emb
        emb = emb.clone()
        emb[:, :1] = 0  # the engine's zero service token replaces the BOS frame too
        return emb

    def first_attended_position(self) -> int:
        return self.policy.kernel_prior.first_focus if self.policy.effective_prior == "kernel" else 1

    def build_prior(self, state, rows, T_text, text_lens, attended, p, end_indices, device):
        built = super().build_prior(state, rows, T_text, text_lens, attended, p, end_indices, device)
        if self.policy.effective_prior != "kernel":
            return built
        # NeMo's bookkeeping (finished / unfinished items) still ran above; only the prior rows are the kernel's
        return kernel_prior_rows(rows, T_text, attended, self.policy.kernel_prior, device)


def kernel_prior_rows(rows: int, T_text: int, focus: list[int], kp: KernelPrior, device) -> torch.Tensor:
    """(rows, 1, T_text) multiplicative weights: 1 inside [focus-1, focus+5], epsilon outside; rows past the
    batch (CFG unconditional, negative focus in the engine) are all ones (no masking)."""
    prior = torch.ones(rows, 1, T_text)
    idx = torch.arange(T_text)
    for b, f in enumerate(focus):
        lo, hi = f - kp.window_left, f + kp.window_right
        prior[b, 0] = torch.where((idx >= lo) & (idx <= hi), 1.0, kp.epsilon)
    return prior.to(device)


# ---- the encoder an engine runs: the reference's own layers, rebuilt ----------------------------------------------


class _PackedConvFF(nn.Module):
    """The reference's ``PositionwiseConvFF`` run over the valid tokens of all requests as one stream, as the
    engine convolves its packed input (remove_input_padding)."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.ff = ff

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], state=None) -> torch.Tensor:
        if mask is None:
            return self.ff(x, None)
        y = self.ff(x[mask][None], None)[0]  # (num_tokens, C): requests back to back
        out = x.new_zeros(x.shape[0], x.shape[1], y.shape[-1])
        out[mask] = y
        return out


def engine_encoder(model, policy: EnginePolicy) -> nn.Module:
    """The model's encoder, or a copy of it built from the reference's ``Transformer`` with the engine's attention
    (bidirectional, symmetric conv padding) and packed conv, sharing the model's weights."""
    enc = model.encoder
    if policy.encoder == "checkpoint" and not policy.packed_encoder_conv:
        return enc
    cfg = dataclasses.replace(enc.cfg, is_causal=enc.cfg.is_causal and policy.encoder == "checkpoint")
    p = next(enc.parameters())
    rebuilt = Transformer(cfg).to(device=p.device, dtype=p.dtype)
    rebuilt.load_state_dict(enc.state_dict())
    if policy.packed_encoder_conv:
        for layer in rebuilt.layers:
            layer.pos_ff = _PackedConvFF(layer.pos_ff)
    return rebuilt.eval()


def encode_text(model, text: torch.Tensor, text_lens: torch.Tensor, policy: EnginePolicy) -> EncoderOutput:
    if policy.encoder == "checkpoint" and not policy.packed_encoder_conv:
        return model.encode_text(text, text_lens)
    mask = lengths_to_mask(text_lens)
    return EncoderOutput(engine_encoder(model, policy)(model.text_embedding(text), mask), mask)


# ---- the loop under a policy ---------------------------------------------------------------------------------------


def prepare_model(model, policy: EnginePolicy):
    """``model`` itself, or a copy in the policy's dtype when it names another one; the original is untouched."""
    if policy.dtype is None or getattr(torch, policy.dtype) == next(model.parameters()).dtype:
        return model
    # The copy keeps the module hooks (closures over the live Capture) and must share the Capture object itself,
    # not a deep copy of it (which would also copy the whole model it refers to).
    capture = getattr(model, "_active_capture", None)
    model._active_capture = None
    try:
        m = copy.deepcopy(model)
    finally:
        model._active_capture = capture
    m._active_capture = capture
    return m.to(getattr(torch, policy.dtype))


def engine_parameters(model, policy: EnginePolicy, params: dict) -> dict:
    """NeMo's inference parameters as the engine applies them: no prior in multi-block mode or when off, the
    kernel prior's lookahead and layers when it runs."""
    params = dict(params)
    prior = policy.effective_prior
    if prior == "off":
        params["apply_attention_prior"] = False
    elif prior == "kernel":
        kp = policy.kernel_prior
        defaults = model.config.inference
        params["attention_prior_lookahead_window"] = kp.lookahead
        params["estimate_alignment_from_layers"] = (kp.compute_layers or params.get("estimate_alignment_from_layers")
                                                    or defaults.estimate_alignment_from_layers)
        params["apply_prior_to_layers"] = (kp.apply_layers or params.get("apply_prior_to_layers")
                                           or defaults.apply_prior_to_layers)
    return params


def infer(model, batch: dict[str, torch.Tensor], policy: EnginePolicy, *, use_cfg: bool = False,
          use_kv_cache: Optional[bool] = None, **kw: Any) -> InferOutput:
    """NeMo's ``infer_batch`` as the engine described by ``policy`` runs it. ``kw``: ``infer_batch``'s other
    arguments (forced_codes, keep_logits, progress, ...) and NeMo's inference parameters."""
    model = prepare_model(model, policy)
    if use_kv_cache is None:
        use_kv_cache = policy.kv_cache
    kw = engine_parameters(model, policy, kw)
    if policy.unpadded_requests and batch["text"].shape[0] > 1:
        return _infer_unpadded(model, batch, policy, use_cfg=use_cfg, use_kv_cache=use_kv_cache, **kw)
    return infer_batch(model, batch, use_cfg=use_cfg, use_kv_cache=use_kv_cache, hooks=EngineHooks(policy), **kw)


def _infer_unpadded(model, batch, policy: EnginePolicy, *, forced_codes=None, keep_logits=False, **kw) -> InferOutput:
    """Engine packing: every request decoded on its own, unpadded (its prompt starts at position 0). The encoder
    still runs over the whole batch, so ``packed_encoder_conv`` can couple neighbouring requests as it does in
    the engine.

    decoder_ce: the engine's prompt is the request's ``decoder_context_features`` rows of valid length (the context
    encoder's output, or the baked rows of its speaker), computed by the reference over the whole batch as
    ``trt.runner.reference_context_features`` feeds them; each request's run takes those rows (:func:`request_items`)."""
    enc = encode_text(model, batch["text"], batch["text_lens"], policy)
    items = request_items(model, batch)
    # Per-request runs would capture each tensor once per request: capture is paused and only the merged
    # per-step logits are handed to an active capture afterwards.
    capture = getattr(model, "_active_capture", None)
    model._active_capture = None
    if capture is not None:
        capture.paused = True
    outs = []
    try:
        for b, (item, rows) in enumerate(items):
            n_text = int(batch["text_lens"][b])
            hooks = EngineHooks(policy, EncoderOutput(enc.output[b : b + 1, :n_text], enc.mask[b : b + 1, :n_text]))
            fc = forced_codes[b : b + 1] if forced_codes is not None else None
            with _prompt_rows(model, rows):
                outs.append(infer_batch(model, item, forced_codes=fc, keep_logits=True, hooks=hooks, **kw))
    finally:
        model._active_capture = capture
        if capture is not None:
            capture.paused = False
    T = max(o.predicted_codes.shape[2] for o in outs)
    codes = torch.cat([F.pad(o.predicted_codes, (0, T - o.predicted_codes.shape[2])) for o in outs])
    res = InferOutput(codes, torch.cat([o.predicted_codes_lens for o in outs]), max(o.num_steps for o in outs))
    # per step, every request's row (a request that stopped earlier repeats its last row)
    merged = [torch.cat([o.step_logits[min(k, len(o.step_logits) - 1)] for o in outs]) for k in range(res.num_steps)]
    if keep_logits:
        res.step_logits = merged
    if capture is not None:
        for k, logits in enumerate(merged):
            capture.step = k
            model.logits(logits[:, None])
        capture.step = None
    return res


def request_items(model, batch: dict[str, torch.Tensor]) -> list[tuple[dict, Optional[tuple]]]:
    """Per request, its unpadded batch item and, for decoder_ce, its prompt rows ``((1, n, D), (1, n) mask)``.

    decoder_context_tts: the text and context codes cut to their lengths (the prompt is embedded from them).
    decoder_ce: the text cut to its length; the prompt rows are the request's first ``n`` rows of
    ``model.decoder_context(batch)`` (``n`` = its mask's valid count), computed over the whole batch, as the runner
    feeds ``decoder_context_features``. With baked speakers every row is ``baked_frames`` long unless a speaker was
    baked shorter (then its row is cut, where NeMo's padded batch masks it)."""
    B = batch["text"].shape[0]
    ce = model.config.model_type == "decoder_ce"
    if ce:
        with torch.no_grad():
            emb, mask = model.decoder_context(batch)
        lens = mask.sum(1)
        if not torch.equal(mask, lengths_to_mask(lens, mask.shape[1])):
            raise ValueError("decoder_context mask is not a prefix of valid rows: the unpadded prompt is not defined")
    out = []
    for b in range(B):
        n_text = int(batch["text_lens"][b])
        item = {"text": batch["text"][b : b + 1, :n_text], "text_lens": batch["text_lens"][b : b + 1]}
        rows = None
        if "context_audio_codes" in batch and "context_audio_codes_lens" in batch:
            n_ctx = int(batch["context_audio_codes_lens"][b])
            item["context_audio_codes"] = batch["context_audio_codes"][b : b + 1, :, :n_ctx]
            item["context_audio_codes_lens"] = batch["context_audio_codes_lens"][b : b + 1]
        if batch.get("speaker_indices") is not None:
            spk = batch["speaker_indices"]  # a tensor or list per item, else one int for all (NeMo's forms)
            item["speaker_indices"] = (spk.reshape(-1)[b : b + 1] if isinstance(spk, torch.Tensor)
                                       else spk[b : b + 1] if isinstance(spk, (list, tuple)) else spk)
        if ce:
            n = int(lens[b])
            rows = (emb[b : b + 1, :n], mask[b : b + 1, :n])
        out.append((item, rows))
    return out


@contextlib.contextmanager
def _prompt_rows(model, rows: Optional[tuple]):
    """For one decoder_ce request: NeMo's loop takes the decoder's prefix from ``model.decoder_context(batch)``; for
    the duration, that returns the request's own rows (the engine's ``decoder_context_features``), not a per-request
    recomputation (a lone shorter baked speaker is one NeMo itself cannot run). Nothing changes for ``rows=None``."""
    if rows is None:
        yield
        return
    model.decoder_context = lambda _batch: rows  # an instance attribute shadows the method; removed below
    try:
        yield
    finally:
        del model.decoder_context


EMULATED_NOTE = ("the reference under an emulated engine policy (trt/engine.py); no TensorRT-LLM engine ran")


def dump_engine_emulation(model, batch: dict[str, torch.Tensor], out_dir, policy: EnginePolicy, *, use_cfg: bool,
                          seed: int, **kw):
    """An engine-like dump: the reference under ``policy``, written as ``parity.reference_capture`` writes the
    reference's own runs, with the policy recorded in the layout (what produced it, never a real engine)."""
    from parity.reference_capture import dump_reference_infer

    def run(m, b, **run_kw):
        return infer(m, b, policy, **run_kw)

    dtype = policy.dtype or str(next(model.parameters()).dtype).replace("torch.", "")
    extra = {"semantics": dataclasses.asdict(policy), "emulated": EMULATED_NOTE,
             "engine_behaviours": policy.differences()}
    kw.setdefault("use_kv_cache", policy.kv_cache)  # the layout records the decoding path the run took
    return dump_reference_infer(model, batch, out_dir, use_cfg=use_cfg, seed=seed, run=run, dtype=dtype,
                                layout_extra=extra, **kw)
