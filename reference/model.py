"""MagpieTTS (``decoder_context_tts``) in one readable file: the ground truth of magpie-parity.

Each module mirrors its NeMo 3.0.0 counterpart op for op and keeps its name (``SelfAttention``, ``CrossAttention``,
``PositionwiseConvFF``, ``Transformer``, ``MagpieTTS`` ~ ``MagpieTTSModel``), so float32 results agree with NeMo bit
for bit on the CPU. Capture names are this model's module paths (:meth:`MagpieTTS.capture_points`); the one name
table (``parity/names.py``, rendered in ``docs/names.md``) maps each onto its NeMo module and its TensorRT-LLM debug
name in every fork generation. Weight names are NeMo's state-dict keys, unchanged, so a NeMo checkpoint loads with
``load_state_dict(strict=True)`` after the shape checks in :meth:`MagpieTTS.from_nemo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reference.batch import BatchError, lengths_to_mask, speaker_index_tensor, validate_batch  # noqa: F401
from reference.config import MagpieConfig, TransformerConfig
from reference.chunked import create_chunk_state as _create_chunk_state, generate_speech as _generate_speech
from reference.inference import infer_batch as _infer_batch


class HookPoint(nn.Identity):
    """A named place where a tensor can be captured; an identity, so it costs nothing without hooks."""


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    masked: Optional[torch.Tensor],
    causal: bool,
    attn_prior: Optional[torch.Tensor],
    q_offset: int = 0,
    fill_masked_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's ``Attention.attn_naive`` in eval mode.

    q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh); masked: bool broadcastable to (B, 1|H, Tq, Tk), True where NeMo's
    mask is 0 (key not attended), or None; computed once per forward by the caller, not once per layer.
    attn_prior: (B, 1, Tq, Tk) multiplicative prior applied in probability space (NeMo 2.7+ eval maths), already
    offset by :func:`prepare_prior`.
    q_offset: absolute position of the first query (cached decoding), for the causal mask.
    fill_masked_rows: False when the caller knows every query row attends at least one key; then the masked
    probabilities are exact zeros already (exp(-inf)) and NeMo's zero fill for fully masked rows is skipped.
    Returns y (B, H, Tq, Dh) and the probabilities (B, H, Tq, Tk).
    """
    score = torch.matmul(q, k.transpose(2, 3)) * scale
    if masked is not None:
        score = _masked_fill(score, masked, float("-inf"))
    if causal and k.shape[2] - 1 > q_offset:  # some query would see a later key (never in a one-frame decode step)
        tq, tk = q.shape[2], k.shape[2]
        qpos = torch.arange(q_offset, q_offset + tq, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        score = _masked_fill(score, kpos > qpos, float("-inf"))
    prob = F.softmax(score, dim=-1)
    if attn_prior is not None:
        # Reduced-precision runs renormalise in the prior's float32 (tiny underflows in fp16/bf16).
        if prob.dtype != attn_prior.dtype:
            prob = prob.to(attn_prior.dtype)
        prob = prob * attn_prior
        prob = prob / prob.sum(dim=-1, keepdim=True)
        if prob.dtype != v.dtype:
            prob = prob.to(v.dtype)
    if masked is not None and fill_masked_rows:
        # Fully masked query rows are NaN after softmax; NeMo zeroes them here, and so do we.
        prob = _masked_fill(prob, masked, 0.0)
    return torch.matmul(prob, v), prob


def _masked_fill(t: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """masked_fill on a temporary of ``_attend``: in place when autograd is off (saves a copy per call, same
    values), out of place when it records (softmax's backward needs its output unmodified)."""
    return t.masked_fill(mask, value) if torch.is_grad_enabled() else t.masked_fill_(mask, value)


def prepare_prior(attn_prior: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, Tq, Tk) prior -> (B, 1, Tq, Tk) + tiny, as NeMo adds it inside every layer; tiny keeps an all-zero
    prior row a no-op. Done once per forward for all layers that share the prior."""
    if attn_prior is None:
        return None
    return attn_prior[:, None] + torch.finfo(attn_prior.dtype).tiny


def _prepare_priors(attn_prior: Optional[Sequence[Optional[torch.Tensor]]], n_layers: int) -> list:
    """Per-layer priors -> per-layer prepared priors, each distinct tensor prepared once."""
    if attn_prior is None:
        return [None] * n_layers
    done: dict[int, Optional[torch.Tensor]] = {}
    out = []
    for p in attn_prior:
        if id(p) not in done:
            done[id(p)] = prepare_prior(p)
        out.append(done[id(p)])
    return out


def self_attention_masked(x_mask: torch.Tensor) -> torch.Tensor:
    """NeMo's self-attention mask = query_mask x query_mask, so padded query rows and padded keys are both
    masked: (B, T) -> (B, 1, T, T) bool, True = not attended."""
    return (x_mask.unsqueeze(1) * x_mask.unsqueeze(2)).unsqueeze(1) == 0


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, is_causal: bool):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.scale = self.d_head**-0.5
        self.is_causal = is_causal
        self.qkv_net = nn.Linear(d_model, 3 * n_heads * self.d_head, bias=False)
        self.o_net = nn.Linear(n_heads * self.d_head, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        cache: Optional["LayerKVCache"] = None,
        masked: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x_mask: (B, T) validity of the query positions, used without a cache when ``masked`` is None to build
        NeMo's query x query mask; masked: precomputed (B, 1, T, T_keys) bool, True = key not attended (with a
        cache, None = every key attended)."""
        B, T, _ = x.shape
        # (B, T, 3*H*Dh) -> (3, B, H, T, Dh) -> q, k, v: the views NeMo's chunk / squeeze / transpose make, in
        # three view ops instead of eight (host time per decode step)
        qkv = self.qkv_net(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q_offset = 0
        if cache is not None:
            q_offset = cache.length
            k, v = cache.append(k, v, kv=qkv[1:])
        if masked is None and x_mask is not None and cache is None:
            masked = self_attention_masked(x_mask)
        y, _ = _attend(q, k, v, self.scale, masked, self.is_causal, None, q_offset)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.o_net(y)


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, d_memory: int, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_head
        self.scale = d_head**-0.5
        self.q_net = nn.Linear(d_model, n_heads * d_head, bias=False)
        self.kv_net = nn.Linear(d_memory, 2 * n_heads * d_head, bias=False)
        self.o_net = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.attn_probs = HookPoint()  # (B, H, Tq, T_text), post-prior

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tk, D_mem) -> K, V each (B, H, Tk, Dh); computed once per request when decoding."""
        B, Tk, _ = memory.shape
        # (B, Tk, 2*H*Dh) -> (2, B, H, Tk, Dh): K first, then V, as NeMo
        k, v = self.kv_net(memory).view(B, Tk, 2, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_masked: torch.Tensor,
        attn_prior: Optional[torch.Tensor] = None,
        probs_out: Optional[list] = None,
        fill_masked_rows: bool = True,
    ) -> torch.Tensor:
        """memory_masked: (B, 1, 1, T_mem) bool, True at padded memory positions (``~memory_mask``);
        attn_prior: prepared by :func:`prepare_prior`; fill_masked_rows: see :func:`_attend`."""
        B, T, _ = x.shape
        q = self.q_net(x).reshape(B, T, self.n_heads, self.d_head).transpose(1, 2)
        k, v = memory_kv
        y, prob = _attend(q, k, v, self.scale, memory_masked, False, attn_prior, fill_masked_rows=fill_masked_rows)
        self.attn_probs(prob)
        if probs_out is not None:
            probs_out.append(prob)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.o_net(y)


# --------------------------------------------------------------------------------------------------------------
# Feed-forward: NeMo's PositionwiseConvFF (two masked Conv1d, tanh-GELU between)
# --------------------------------------------------------------------------------------------------------------


class MaskedConv1d(nn.Module):
    """NeMo's ``ConvolutionLayer``: zero the padding, convolve (causal = left pad k-1), zero the padding again."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal
        self.kernel_size = kernel_size
        padding = 0 if is_causal else (kernel_size - 1) // 2
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, C, T); mask: (B, T), or None when every position is valid (x * 1 is x: skipped)
        if mask is not None:
            x = x * mask.unsqueeze(1)
        if self.is_causal and self.kernel_size > 1:
            x = F.pad(x, (self.kernel_size - 1, 0))
        y = self.conv(x)
        return y if mask is None else y * mask.unsqueeze(1)


class PositionwiseConvFF(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, kernel_size: int, is_causal: bool):
        super().__init__()
        self.proj = MaskedConv1d(d_model, d_ffn, kernel_size, is_causal)
        self.o_net = MaskedConv1d(d_ffn, d_model, kernel_size, is_causal)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], state: Optional["ConvFFState"] = None) -> torch.Tensor:
        """x: (B, T, C); mask: (B, T) or None (all valid)."""
        if state is None:
            h = F.gelu(self.proj(x.transpose(1, 2), mask), approximate="tanh")
            return self.o_net(h, mask).transpose(1, 2)
        return self._forward_cached(x, mask, state)

    def _forward_cached(self, x: torch.Tensor, mask: torch.Tensor, state: "ConvFFState") -> torch.Tensor:
        """Causal conv over new positions, reading the k-1 previous (masked) inputs of each conv from ``state``.

        x: (B, T_new, C); mask: (B, T_new) or None. Equals the full-sequence causal conv at those positions.
        """
        k = self.proj.kernel_size
        start = state.length
        end = start + x.shape[1]
        state.ff_in[:, start:end] = x if mask is None else x * mask.unsqueeze(-1)
        lo = max(0, start - (k - 1))
        window = state.ff_in[:, lo:end].transpose(1, 2)  # (B, C, T_window)
        window = F.pad(window, (k - 1 - (start - lo), 0))
        h = F.gelu(F.conv1d(window, self.proj.conv.weight), approximate="tanh")
        if mask is not None:
            h = h * mask.unsqueeze(1)
        state.ff_hidden[:, start:end] = h.transpose(1, 2)
        window = state.ff_hidden[:, lo:end].transpose(1, 2)
        window = F.pad(window, (k - 1 - (start - lo), 0))
        y = F.conv1d(window, self.o_net.conv.weight)
        if mask is not None:
            y = y * mask.unsqueeze(1)
        state.length = end
        return y.transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------
# Transformer stacks
# --------------------------------------------------------------------------------------------------------------


class LayerKVCache:
    """Self-attention keys and values of one layer for cached decoding: a static buffer filled left to right.

    K and V live in one (2, B, H, max_len, Dh) buffer, so a step writes both with one copy; each is a
    (B, H, max_len, Dh) slice laid out exactly as a buffer of its own, so attention reads the same layout."""

    def __init__(self, batch: int, n_heads: int, max_len: int, d_head: int, device, dtype):
        self.kv: Optional[torch.Tensor] = torch.zeros(2, batch, n_heads, max_len, d_head, device=device, dtype=dtype)
        self.k, self.v = self.kv.unbind(0)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, kv: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H, T, Dh) new positions; kv: optionally the same two as one (2, B, H, T, Dh) view (one copy
        instead of two). Returns all keys and values so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.k.shape[2]}")
        if kv is not None and self.kv is not None:
            self.kv[:, :, :, self.length : end] = kv
        else:
            self.k[:, :, self.length : end] = k
            self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class ConvFFState:
    """The (masked) inputs of a causal conv FFN so far, for cached decoding with kernel_size > 1."""

    def __init__(self, batch: int, max_len: int, d_model: int, d_ffn: int, device, dtype):
        self.ff_in = torch.zeros(batch, max_len, d_model, device=device, dtype=dtype)
        self.ff_hidden = torch.zeros(batch, max_len, d_ffn, device=device, dtype=dtype)
        self.length = 0


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.has_xattn = cfg.has_xattn
        self.norm_self = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.self_attention = SelfAttention(cfg.d_model, cfg.sa_n_heads, cfg.is_causal)
        if cfg.has_xattn:
            self.norm_xattn_query = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
            self.cross_attention = CrossAttention(cfg.d_model, cfg.xa_d_memory, cfg.xa_n_heads, cfg.xa_head_dim)
            self.norm_xattn_memory = (
                nn.LayerNorm(cfg.xa_d_memory, eps=cfg.layer_norm_eps, bias=False)
                if cfg.apply_norm_to_cond
                else nn.Identity()
            )
        self.norm_pos_ff = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.pos_ff = PositionwiseConvFF(cfg.d_model, cfg.d_ffn, cfg.kernel_size, cfg.is_causal)

    def memory_kv(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attention.project_memory(self.norm_xattn_memory(cond))

    def forward(
        self,
        x: torch.Tensor,
        x_mask: Optional[torch.Tensor],
        memory_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cond_masked: Optional[torch.Tensor] = None,
        attn_prior: Optional[torch.Tensor] = None,
        cache: Optional[LayerKVCache] = None,
        self_masked: Optional[torch.Tensor] = None,
        probs_out: Optional[list] = None,
        ff_state: Optional[ConvFFState] = None,
        cond_rows_nonempty: bool = False,
    ) -> torch.Tensor:
        """x_mask: (B, T) validity, or None when every position is valid (a decode step: NeMo's multiplications
        by a mask of ones are skipped, which changes no bit). cond_masked / self_masked: True = not attended,
        built once per forward by :class:`Transformer`; attn_prior: prepared by :func:`prepare_prior`.
        cond_rows_nonempty: every row of cond_masked has a False (see :func:`_attend`'s fill_masked_rows)."""
        if x_mask is not None:
            x = x * x_mask.unsqueeze(-1)
        x = x + self.self_attention(self.norm_self(x), x_mask, cache, self_masked)
        if self.has_xattn and memory_kv is not None:
            x = x + self.cross_attention(self.norm_xattn_query(x), memory_kv, cond_masked, attn_prior, probs_out,
                                         fill_masked_rows=not cond_rows_nonempty)
        x = x + self.pos_ff(self.norm_pos_ff(x), x_mask, ff_state)
        return x if x_mask is None else x * x_mask.unsqueeze(-1)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False) if cfg.apply_norm_out else nn.Identity()
        self.position_embeddings = (
            nn.Embedding(cfg.max_length_causal_mask, cfg.d_model) if cfg.use_learnable_pos_emb else None
        )

    def add_positions(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if self.position_embeddings is None:
            return x
        end = start + x.shape[1]
        if end > self.position_embeddings.num_embeddings:  # the input does not fit the checkpoint
            raise BatchError(
                f"sequence of {end} positions exceeds the model's {self.position_embeddings.num_embeddings} "
                "learned positions (max_length_causal_mask)"
            )
        # NeMo looks up arange(start, end); the same rows as a slice of the table (no index tensor, no gather)
        return x + self.position_embeddings.weight[start:end]

    def forward(
        self,
        x: torch.Tensor,
        x_mask: torch.Tensor,
        cond: Optional[torch.Tensor] = None,
        cond_mask: Optional[torch.Tensor] = None,
        attn_prior: Optional[Sequence[Optional[torch.Tensor]]] = None,
        probs_out: Optional[list] = None,
    ) -> torch.Tensor:
        """Full-sequence pass (NeMo's ``Transformer.forward`` without cache); attn_prior is per layer.

        probs_out, if given, receives each layer's cross-attention probabilities (B, H, T, T_mem) in order.
        """
        x = self.add_positions(x)
        self_masked = self_attention_masked(x_mask)
        cond_masked = cond_mask[:, None, None] == 0 if cond_mask is not None else None
        priors = _prepare_priors(attn_prior, len(self.layers))
        for i, layer in enumerate(self.layers):
            kv = layer.memory_kv(cond) if cond is not None and layer.has_xattn else None
            x = layer(x, x_mask, kv, cond_masked, priors[i], self_masked=self_masked, probs_out=probs_out)
        return self.norm_out(x)

    def new_state(self, batch: int, max_len: int, memory: Optional[torch.Tensor], device, dtype) -> "DecoderState":
        """Static per-request state for cached decoding: self-attention KV, conv history, memory K/V once."""
        c = self.cfg
        caches = [LayerKVCache(batch, c.sa_n_heads, max_len, c.sa_d_head, device, dtype) for _ in self.layers]
        ff = [ConvFFState(batch, max_len, c.d_model, c.d_ffn, device, dtype) if c.kernel_size > 1 else None
              for _ in self.layers]
        memory_kv = [layer.memory_kv(memory) if memory is not None and layer.has_xattn else None for layer in self.layers]
        return DecoderState(caches, ff, memory_kv, 0)

    def forward_cached(
        self,
        x_new: torch.Tensor,
        x_mask_new: Optional[torch.Tensor],
        state: "DecoderState",
        key_mask: Optional[torch.Tensor],
        cond_mask: Optional[torch.Tensor] = None,
        attn_prior: Optional[Sequence[Optional[torch.Tensor]]] = None,
        probs_out: Optional[list] = None,
    ) -> torch.Tensor:
        """Incremental pass over the new positions ``x_new`` (B, T_new, D), appending to ``state``.

        x_mask_new: (B, T_new) validity of the new positions (the padded context prefix at step 0), or None when
        all are valid (decode steps).
        key_mask: (B, 1, T_new, T_total) or broadcastable; 0 = key not attended (padding; causality is added
        inside); None = every key attended. Returns (B, T_new, D) after norm_out.
        """
        start = state.length
        x = self.add_positions(x_new, start)
        self_masked = key_mask == 0 if key_mask is not None else None
        # every row has a text position to attend (always, for MagpieTTS): no zero fill of masked rows needed
        cond_masked, cond_rows_nonempty = state.memory_masks(cond_mask)
        priors = _prepare_priors(attn_prior, len(self.layers))
        for i, layer in enumerate(self.layers):
            x = layer(x, x_mask_new, state.memory_kv[i], cond_masked, priors[i], cache=state.kv[i],
                      self_masked=self_masked, probs_out=probs_out, ff_state=state.ff[i],
                      cond_rows_nonempty=cond_rows_nonempty)
        state.length = start + x_new.shape[1]
        return self.norm_out(x)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DecoderState:
    kv: list  # LayerKVCache per layer
    ff: list  # ConvFFState per layer (None for kernel 1)
    memory_kv: list  # (K, V) of the cross-attention memory per layer, computed once
    length: int
    _memory_mask: Optional[torch.Tensor] = field(default=None, repr=False)  # the cond_mask the two below are of
    _memory_masked: Optional[torch.Tensor] = field(default=None, repr=False)
    _memory_rows_nonempty: bool = field(default=False, repr=False)

    def memory_masks(self, cond_mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], bool]:
        """cond_mask (B, T_mem), 1 = valid -> ((B, 1, 1, T_mem) bool, True = not attended; whether every row has
        a valid memory position). Built when a mask is first seen (one host read) and reused by every step."""
        if cond_mask is None:
            return None, True
        if self._memory_mask is not cond_mask:
            self._memory_mask = cond_mask
            self._memory_masked = cond_mask[:, None, None] == 0
            self._memory_rows_nonempty = bool(cond_mask.any(dim=-1).all())
        return self._memory_masked, self._memory_rows_nonempty


@dataclass
class EncoderOutput:
    output: torch.Tensor  # (B, T_text, D) after norm_out
    mask: torch.Tensor  # (B, T_text) bool


class MagpieTTS(nn.Module):
    """Encoder-decoder MagpieTTS with NeMo's weight names. Build with :meth:`from_nemo`."""

    def __init__(self, config: MagpieConfig):
        super().__init__()
        self.config = config
        c = config
        self.text_embedding = nn.Embedding(c.num_text_tokens, c.d_model)
        self.encoder = Transformer(c.encoder)
        if c.context_encoder is not None:  # decoder_ce, zero-shot: the prefix is encoded context audio
            self.context_encoder = Transformer(c.context_encoder)
        if c.baked:  # decoder_ce, baked: the context encoder's output per speaker, stored (NeMo's names)
            self.baked_context_embedding = nn.Embedding(c.baked_speakers, c.baked_frames * c.d_model)
            self.register_buffer("_baked_embedding_T", torch.tensor(c.baked_frames))
            self.register_buffer("_baked_embedding_D", torch.tensor(c.d_model))
            self.register_buffer("baked_context_embedding_len", torch.zeros(c.baked_speakers, dtype=torch.long))
        self.decoder = Transformer(c.decoder)
        self.audio_embeddings = nn.ModuleList(
            nn.Embedding(c.num_all_tokens_per_codebook, c.d_model)
            for _ in range(c.num_audio_codebooks * c.frame_stacking_factor)
        )
        self.final_proj = nn.Linear(
            c.decoder.d_model, c.num_audio_codebooks * c.num_all_tokens_per_codebook * c.frame_stacking_factor,
            bias=c.final_proj_bias,
        )
        if c.local_transformer is not None:
            # Autoregressive over the codebooks of one frame (NeMo's LocalTransformerHelper); optional at inference.
            h = c.local_transformer.d_model
            self.local_transformer_in_projection = nn.Linear(c.d_model, h) if h != c.d_model else nn.Identity()
            self.local_transformer = Transformer(c.local_transformer)
            self.local_transformer_out_projections = nn.ModuleList(
                nn.Linear(h, c.num_all_tokens_per_codebook) for _ in range(c.num_audio_codebooks * c.frame_stacking_factor)
            )
        self.decoder_input = HookPoint()  # (B, T_ctx + T_audio, D): context prefix + audio frames, before positions
        self.logits = HookPoint()  # (B, T_audio, C * V): what NeMo's process_batch returns as 'logits'

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_nemo(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "MagpieTTS":
        """Load a NeMo ``.nemo`` archive or Lightning ``.ckpt`` without importing NeMo (strict, shape-checked)."""
        from reference.checkpoint import read_checkpoint

        raw = read_checkpoint(path)
        return cls.from_state_dict(raw.config, raw.state_dict, where=str(path)).to(map_location)

    @classmethod
    def from_state_dict(cls, nemo_config: dict, state_dict: dict[str, torch.Tensor], where: str = "checkpoint") -> "MagpieTTS":
        config = MagpieConfig.from_nemo(nemo_config, state_dict, where=where)
        sd = check_weights(config, state_dict, where)
        with torch.device("meta"):  # no random initialisation: every weight is loaded next (strict)
            model = cls(config)
        model = model.to_empty(device="cpu")
        expected = model.state_dict()
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
        return model.eval()

    # ---- building blocks (also used by inference) ----------------------------------------------------------

    def encode_text(self, text: torch.Tensor, text_lens: torch.Tensor) -> EncoderOutput:
        mask = lengths_to_mask(text_lens)
        x = self.text_embedding(text)
        out = self.encoder(x, mask)
        return EncoderOutput(out, mask)

    def embed_audio_tokens(self, codes: torch.Tensor, lens: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """NeMo's ``embed_audio_tokens``: mean of the per-codebook (and per-stacked-frame) embeddings, masked.

        codes: (B, C, T) -> (B, ceil(T / stacking), D), lengths ceil(lens / stacking). lens None: every frame is
        valid (a decode step's new frame): the multiplication by a mask of ones is skipped (no bit changes, and no
        host sync for the mask's width); the lengths returned are then None.
        """
        fsf = self.config.frame_stacking_factor
        B, C, T = codes.shape
        pad = (-T) % fsf
        codes = (F.pad(codes, (0, pad)) if pad else codes).long()
        emb = None
        for i in range(fsf):
            for c in range(C):
                e = self.audio_embeddings[c + i * C](codes[:, c, i::fsf])
                emb = e if emb is None else emb + e
        emb = emb / (C * fsf)
        if lens is None:
            return emb, None
        out_lens = torch.ceil(lens / fsf).long()
        return emb * lengths_to_mask(out_lens).unsqueeze(2), out_lens

    def add_special_tokens(self, codes: torch.Tensor, lens: torch.Tensor, bos: int, eos: int, num_bos: int = 1):
        """NeMo's ``add_special_tokens``: BOS frame(s) in front, EOS frame after the last valid frame."""
        codes = F.pad(codes, (num_bos, 0), value=bos)
        lens = lens + num_bos
        codes = F.pad(codes, (0, 1), value=0)
        lens = lens + 1
        for b, n in enumerate(lens.tolist()):  # one device read, not one per item
            codes[b, :, n - 1] = eos
        return codes, lens

    def context_embedding(self, context_codes: torch.Tensor, context_lens: torch.Tensor):
        """Context audio codes (raw codec codes) -> their embeddings (B, T_ctx, D) and mask (NeMo's
        ``_get_context_embeddings``)."""
        c = self.config
        codes, lens = self.add_special_tokens(context_codes, context_lens, c.context_audio_bos_id, c.context_audio_eos_id)
        emb, lens = self.embed_audio_tokens(codes, lens)
        return emb, lengths_to_mask(lens)

    def decoder_context(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's prefix (B, T_ctx, D) and its mask (NeMo's ``prepare_context_tensors``): the context audio's
        embeddings (decoder_context_tts), those through the context encoder (decoder_ce), or the baked rows of
        the speakers ``batch['speaker_indices']`` names (decoder_ce, baked; None = speaker 0, as NeMo)."""
        c = self.config
        if c.baked:
            return self.baked_context(batch.get("speaker_indices"), batch["text"].shape[0])
        emb, mask = self.context_embedding(batch["context_audio_codes"], batch["context_audio_codes_lens"])
        if c.context_encoder is not None:
            emb = self.context_encoder(emb, mask)
        return emb, mask

    def baked_context(self, speaker_indices, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """NeMo's ``get_baked_context_embeddings_batch``: rows of the baked table, viewed (B, T, D), and the mask of
        their stored lengths."""
        c = self.config
        idx = speaker_index_tensor(speaker_indices, batch_size, c.baked_speakers).to(self.baked_context_embedding.weight.device)
        emb = self.baked_context_embedding(idx).view(batch_size, c.baked_frames, c.d_model)
        lens = self.baked_context_embedding_len[idx]
        if int(lens.max()) != c.baked_frames:
            # NeMo's mask is max(lens) wide while the rows are T long: it fails with a shape error inside the decoder
            raise BatchError(f"speaker_indices {idx.tolist()}: every selected speaker was baked shorter than the "
                             f"table's {c.baked_frames} frames (lengths {lens.tolist()}); NeMo cannot run this batch")
        return emb, lengths_to_mask(lens)

    def decoder_prior_layers(self, prior: Optional[torch.Tensor], layers: Sequence[int]) -> Optional[list]:
        if prior is None:
            return None
        return [prior if i in layers else None for i in range(self.config.decoder.n_layers)]

    # ---- teacher-forced forward (NeMo's process_batch in eval mode) ----------------------------------------

    def process_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher-forced pass equal to NeMo's ``MagpieTTSModel.process_batch(batch)`` in eval mode.

        Returns ``logits`` exactly as NeMo returns them: (B, T_in, C * V * stacking), one row per decoder input
        position after the context (the BOS frame and the audio frames, i.e. T_audio + 1 without frame stacking),
        plus the decoder output and the context size. Inputs are validated first (lengths, ranges, dtypes).
        """
        c = self.config
        validate_batch(batch, c, require_audio=True)
        enc = self.encode_text(batch["text"], batch["text_lens"])
        ctx_emb, ctx_mask = self.decoder_context(batch)
        codes, lens = self.add_special_tokens(
            batch["audio_codes"], batch["audio_codes_lens"], c.audio_bos_id, c.audio_eos_id, c.frame_stacking_factor
        )
        emb, emb_lens = self.embed_audio_tokens(codes, lens)
        # Drop the EOS frame from the decoder input (NeMo's remove_embedded_eos_token).
        emb_lens = emb_lens - 1
        emb = emb[:, :-1] * lengths_to_mask(emb_lens).unsqueeze(2)
        dec_in = self.decoder_input(torch.cat([ctx_emb, emb], dim=1))
        dec_mask = torch.cat([ctx_mask, lengths_to_mask(emb_lens)], dim=1)
        prior = batch.get("align_prior_matrix")
        if prior is not None:
            # NeMo pads the prior with zero rows for the context prefix; scale_prior is the identity at
            # global_step 0, which is where an eval-mode NeMo model without a trainer always is.
            T_ctx = ctx_mask.shape[1]
            prior = torch.cat([prior.new_zeros(prior.shape[0], T_ctx, prior.shape[2]), prior.float()], dim=1)
            prior = prior[:, : dec_in.shape[1]]
        dec_out = self.decoder(dec_in, dec_mask, enc.output, enc.mask, self.decoder_prior_layers(prior, c.prior_layers))
        all_logits = self.final_proj(dec_out)
        logits = self.logits(all_logits[:, ctx_mask.shape[1] :])
        return {"logits": logits, "dec_out": dec_out, "dec_context_size": ctx_mask.shape[1], "text_encoder_out": enc.output}

    # ---- inference (NeMo's infer_batch) -------------------------------------------------------------------

    def infer_batch(self, batch: dict[str, torch.Tensor], use_cfg: bool = False, **kw):
        """Autoregressive generation equal to NeMo's ``infer_batch``; see :func:`reference.inference.infer_batch`."""
        return _infer_batch(self, batch, use_cfg=use_cfg, **kw)

    # ---- chunked generation (NeMo's create_chunk_state / generate_speech, what do_tts calls) ---------------

    def create_chunk_state(self, batch_size: int):
        """A fresh :class:`reference.chunked.ChunkState` for :meth:`generate_speech` (NeMo's ``create_chunk_state``)."""
        return _create_chunk_state(batch_size)

    def generate_speech(self, batch: dict, chunk_state, end_of_text, beginning_of_text: bool, use_cfg: bool = True,
                        **kw):
        """One text chunk's codes, equal to NeMo's ``generate_speech``; see :func:`reference.chunked.generate_speech`."""
        return _generate_speech(self, batch, chunk_state, end_of_text, beginning_of_text, use_cfg=use_cfg, **kw)

    # ---- capture ------------------------------------------------------------------------------------------

    def capture_points(self) -> list[str]:
        """Canonical tensor names in execution order (module paths of this model)."""
        names = ["text_embedding"]
        for i in range(self.config.encoder.n_layers):
            names += [f"encoder.layers.{i}.self_attention", f"encoder.layers.{i}.pos_ff", f"encoder.layers.{i}"]
        names += ["encoder.norm_out"]
        if self.config.context_encoder is not None:
            for i in range(self.config.context_encoder.n_layers):
                p = f"context_encoder.layers.{i}"
                names += [f"{p}.self_attention", f"{p}.pos_ff", p]
            names += ["context_encoder.norm_out"]
        names += ["decoder_input"]
        for i in range(self.config.decoder.n_layers):
            p = f"decoder.layers.{i}"
            names += [f"{p}.self_attention", f"{p}.cross_attention.attn_probs", f"{p}.cross_attention",
                      f"{p}.pos_ff", p]
        names += ["decoder.norm_out", "final_proj", "logits"]
        return names

    def capture(self, names: Optional[Sequence[str]] = None, **kw):
        from reference.capture import Capture

        return Capture(self, names, **kw)


# --------------------------------------------------------------------------------------------------------------
# Weight loading and input validation
# --------------------------------------------------------------------------------------------------------------


def check_weights(config: MagpieConfig, state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The one validation of a state dict against its config, before any allocation (the converter runs it too):
    every weight used, every shape the config implies, float weights where floats belong. NeMo's constant buffers
    are checked and dropped. The expected shapes come from the model built on the meta device (no memory), whose
    size the config's own checks against the weights already bound (:meth:`MagpieConfig.from_nemo`).
    Returns the state dict to load."""
    from reference.checkpoint import CheckpointError

    sd = dict(state_dict)
    # NeMo registers each causal SelfAttention's tril(ones) mask as a buffer; it is a constant, so we check it
    # is what it should be and compute causality on the fly instead of storing it.
    for key in [k for k in sd if k.endswith(".self_attention.causal_mask")]:
        m = sd.pop(key)
        n = m.shape[-1] if m.dim() else 0
        if m.dim() != 4 or m.numel() != n * n or not torch.equal(m.reshape(n, n), torch.tril(torch.ones(n, n, dtype=m.dtype))):
            raise CheckpointError(f"{where}: buffer '{key}' is not a lower-triangular causal mask")
    # Training-only modules that do not affect eval logits (alignment encoder) are accepted and ignored, and so is
    # a baked checkpoint's context encoder (NeMo skips it when loading and never runs it).
    ignored = ("alignment_encoder.", "context_encoder.") if config.baked else ("alignment_encoder.",)
    for key in [k for k in sd if k.startswith(ignored)]:
        sd.pop(key)
    with torch.device("meta"):
        expected = MagpieTTS(config).state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(parts))
    for k, v in expected.items():
        if v.dim() == 0 and sd[k].numel() == 1:  # NeMo reads its scalar buffers with .item(): any one-element shape
            sd[k] = sd[k].reshape(())
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: weight '{k}' has shape {tuple(sd[k].shape)}, the config implies {tuple(v.shape)}")
        if sd[k].is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{where}: weight '{k}' has dtype {sd[k].dtype}, expected "
                                  f"{'a float' if v.is_floating_point() else 'an integer'} tensor")
    return sd
