"""Named behaviour options: NeMo 3.0.0 by default, each TensorRT-LLM engine behaviour one switch away.

A divergence between an engine and NeMo is *explained* when running the reference with the engine's known
behaviours turned on reproduces the engine. ``trt/diagnose.py`` searches these switches. Every option cites
where the behaviour comes from (``../shared/spec/architecture.md`` sections; fork files by commit).

=======================  ==============================================================================================
option                   engine behaviour (source)
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
                         frame included; NeMo keeps the BOS frame (arch. 7, 11.6; runtimeBuffers.cpp).
``lm_head_bias=False``   The fork's converter drops ``final_proj.bias`` (arch. 4.3, 11.1; convert_checkpoint.py e7109d5).
``encoder="bidirectional"``  The fork's encoder is BertAttention (bidirectional) with symmetric conv padding, whatever
                         the checkpoint's ``is_causal`` (arch. 3, 11.2; t5tts/model.py).
``packed_encoder_conv``  With remove_input_padding and several requests, the encoder conv runs over the packed token
                         stream and mixes neighbouring requests' edge tokens (arch. 3 "TRT packing caveat", 11.3).
``unpadded_requests``    The engine packs requests without padding: each request's prompt starts at position 0 and has
                         its own length; NeMo pads contexts to the batch's longest, which shifts positions.
``dtype``                Engine compute precision (float16 / bfloat16 engines).
=======================  ==============================================================================================
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

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
class Semantics:
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
        """Names of the options that differ from NeMo's defaults."""
        base = Semantics()
        return [f.name for f in dataclasses.fields(self) if f.name != "kernel_prior" and getattr(self, f.name) != getattr(base, f.name)]

    @classmethod
    def engine(cls, **kw) -> "Semantics":
        """What a fork engine does by default: cached, kernel prior, zero CFG prompt, no lm_head bias, bidirectional
        encoder, packed requests. Override fields to describe a specific build."""
        base = dict(kv_cache=True, prior="kernel", cfg_prompt="zeros", lm_head_bias=False, encoder="bidirectional",
                    packed_encoder_conv=True, unpadded_requests=True)
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_trtllm_config(cls, decoder_config: dict, **kw) -> "Semantics":
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


def _tuple(x) -> Optional[tuple[int, ...]]:
    return tuple(int(i) for i in x) if x is not None else None


# ---- model-level transforms ----------------------------------------------------------------------------------


def prepare_model(model, sem: Semantics):
    """``model`` itself, or a copy in the semantics' dtype when it names another one; the original is untouched."""
    if sem.dtype is None or getattr(torch, sem.dtype) == next(model.parameters()).dtype:
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
    return m.to(getattr(torch, sem.dtype))


def lm_head(model, dec_out: torch.Tensor, sem: Semantics) -> torch.Tensor:
    if sem.lm_head_bias or model.final_proj.bias is None:
        return model.final_proj(dec_out)
    return F.linear(dec_out, model.final_proj.weight)  # the fork's lm_head: same weight, no bias


def encode_text(model, text: torch.Tensor, text_lens: torch.Tensor, sem: Semantics):
    """The encoder under the semantics: the model's own when nothing differs, else an explicit pass that can
    force bidirectional attention with symmetric conv padding, and convolve the packed token stream."""
    from reference.model import EncoderOutput, _attend, lengths_to_mask, self_attention_masked

    if sem.encoder == "checkpoint" and not sem.packed_encoder_conv:
        return model.encode_text(text, text_lens)
    enc = model.encoder
    causal = enc.cfg.is_causal and sem.encoder == "checkpoint"
    mask = lengths_to_mask(text_lens)
    x = enc.add_positions(model.text_embedding(text))
    for layer in enc.layers:
        x = x * mask.unsqueeze(-1)
        sa = layer.self_attention
        B, T, _ = x.shape
        qkv = sa.qkv_net(layer.norm_self(x)).reshape(B, T, 3, sa.n_heads, sa.d_head)
        q, k, v = (t.squeeze(2).transpose(1, 2) for t in qkv.chunk(3, dim=2))
        y, _ = _attend(q, k, v, sa.scale, self_attention_masked(mask), causal, None)
        x = x + sa.o_net(y.transpose(1, 2).reshape(B, T, -1))
        h = layer.norm_pos_ff(x)
        x = x + _conv_ff(layer.pos_ff, h, mask, causal, sem.packed_encoder_conv)
        x = x * mask.unsqueeze(-1)
    return EncoderOutput(enc.norm_out(x), mask)


def _conv(conv: torch.nn.Conv1d, x: torch.Tensor, mask: torch.Tensor, causal: bool, packed: bool) -> torch.Tensor:
    """x: (B, T, C) -> (B, T, C_out), masked like NeMo's ConvolutionLayer; ``packed`` convolves the valid tokens
    of all requests as one stream (TensorRT-LLM with remove_input_padding)."""
    k = conv.kernel_size[0]
    pad = (k - 1, 0) if causal else ((k - 1) // 2, (k - 1) // 2)
    x = x * mask.unsqueeze(-1)
    if not packed:
        y = F.conv1d(F.pad(x.transpose(1, 2), pad), conv.weight)
        return y.transpose(1, 2) * mask.unsqueeze(-1)
    stream = x[mask]  # (num_tokens, C): requests back to back, as the engine packs them
    y = F.conv1d(F.pad(stream.t()[None], pad), conv.weight)[0].t()
    out = x.new_zeros(x.shape[0], x.shape[1], y.shape[1])
    out[mask] = y
    return out


def _conv_ff(ff, h: torch.Tensor, mask: torch.Tensor, causal: bool, packed: bool) -> torch.Tensor:
    a = F.gelu(_conv(ff.proj.conv, h, mask, causal, packed), approximate="tanh")
    return _conv(ff.o_net.conv, a, mask, causal, packed)


# ---- the kernel prior -------------------------------------------------------------------------------------------


def kernel_prior_rows(rows: int, T_text: int, focus: list[int], kp: KernelPrior, device) -> torch.Tensor:
    """(rows, 1, T_text) multiplicative weights: 1 inside [focus-1, focus+5], epsilon outside; rows past the
    batch (CFG unconditional, negative focus in the engine) are all ones (no masking)."""
    prior = torch.ones(rows, 1, T_text)
    for b, f in enumerate(focus):
        lo, hi = f - kp.window_left, f + kp.window_right
        idx = torch.arange(T_text)
        prior[b, 0] = torch.where((idx >= lo) & (idx <= hi), 1.0, kp.epsilon)
    return prior.to(device)
