"""Frozen configuration of a MagpieTTS model, built from NeMo's omegaconf config and the weight shapes.

Nothing here is a constant of the released model: every size comes from the checkpoint. Where NeMo reads a
value from the codec (codebook size) and the codec is not inside the ``.nemo``, the value is derived from the
weight shapes instead (``num_all_tokens_per_codebook = codebook_size + 8`` special tokens, NeMo's
``SpecialAudioToken`` layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

# NeMo's SpecialAudioToken enum: ids are codebook_size + offset (magpietts_modules.SpecialAudioToken).
_SPECIAL_OFFSETS = {
    "audio_bos_id": 0,
    "audio_eos_id": 1,
    "context_audio_bos_id": 2,
    "context_audio_eos_id": 3,
    "mask_token_id": 4,
}
NUM_SPECIAL_AUDIO_TOKENS = 8

SUPPORTED_MODEL_TYPES = ("decoder_context_tts", "decoder_ce")


class ConfigError(ValueError):
    """The checkpoint's config is not a MagpieTTS config this reference supports, or disagrees with its weights."""


# Sizes above this are not a MagpieTTS (the released model's largest is d_ffn 3072); the weights bound the real
# size anyway (:func:`_check_layer_counts`, ``reference.model.check_weights``), this keeps arithmetic on typos sane.
MAX_SIZE = 1 << 20


def _typed(value: Any, kind: str, where: str, key: str, minimum: Optional[int] = 1) -> Any:
    """One config value checked against its declared kind ("int", "bool", "float", "str", "layers"); ints are
    bounded by ``minimum`` and :data:`MAX_SIZE`. The message names the key, never echoes a long value."""
    shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {shown}")
        if (minimum is not None and value < minimum) or value > MAX_SIZE:
            raise ConfigError(f"{where}: '{key}' must lie in [{minimum}, {MAX_SIZE}], got {value}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {shown}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be a finite number, got {shown}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {shown}")
    elif kind == "layers":
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or len(value) > MAX_SIZE:
            raise ConfigError(f"{where}: '{key}' must be a list of layer indices, got {shown}")
        return tuple(_typed(i, "int", where, f"{key}[{n}]", minimum=0) for n, i in enumerate(value))
    return value


def _kind(annotation: str) -> str:
    """A dataclass field's annotation (a string under postponed evaluation) -> a :func:`_typed` kind."""
    if "tuple" in annotation:
        return "layers"
    for kind in ("bool", "int", "float", "str"):
        if annotation in (kind, f"Optional[{kind}]"):
            return kind
    raise AssertionError(annotation)


def _mapping(value: Any, where: str, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: '{key}' must be a mapping, got a {type(value).__name__}")
    return value


def _check_layer_counts(stack: str, t: "TransformerConfig", state_dict: Mapping[str, Any], where: str) -> None:
    """n_layers against the layers the weights hold, before anything is built from it."""
    pat = re.compile(rf"{re.escape(stack)}\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
    n = max(found) + 1 if found else 0
    if n != t.n_layers:
        raise ConfigError(f"{where}: {stack}.n_layers is {t.n_layers} but the weights hold {n} {stack} layers")


@dataclass(frozen=True)
class TransformerConfig:
    """One ``transformer_2501.Transformer`` (NeMo's ``cfg.encoder`` / ``cfg.decoder``)."""

    n_layers: int
    d_model: int
    d_ffn: int
    sa_n_heads: int
    kernel_size: int
    is_causal: bool = True
    apply_norm_out: bool = False
    max_length_causal_mask: int = 4096
    use_learnable_pos_emb: bool = False
    has_xattn: bool = False
    xa_d_memory: Optional[int] = None
    xa_n_heads: Optional[int] = None
    xa_d_head: Optional[int] = None
    apply_norm_to_cond: bool = True
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default; NeMo never overrides it

    @property
    def sa_d_head(self) -> int:
        return self.d_model // self.sa_n_heads

    @property
    def xa_head_dim(self) -> int:
        # NeMo's Attention: d_head defaults to d_model // n_heads when xa_d_head is null.
        assert self.xa_n_heads is not None
        return self.xa_d_head if self.xa_d_head is not None else self.d_model // self.xa_n_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "TransformerConfig":
        d = _mapping(d, where.rsplit(": ", 1)[0], where.rsplit(": ", 1)[-1])
        unsupported = {k for k in ("use_moe",) if d.get(k)}
        if unsupported:
            raise ConfigError(f"{where}: {sorted(unsupported)} is not supported by the reference")
        known = {f.name for f in dataclasses.fields(cls)}
        # p_dropout, p_dropout_out, conv_non_linearity, make_prior_window_strict only matter in training.
        ignored = {"p_dropout", "p_dropout_out", "make_prior_window_strict", "conv_non_linearity",
                   "num_experts", "top_k_experts", "router_jitter_noise", "routing_strategy", "use_moe",
                   "router_load_balancing_loss_coeff", "router_z_loss_coeff"}
        unknown = set(d) - known - ignored
        if unknown:
            raise ConfigError(f"{where}: unknown transformer keys {sorted(unknown)}")
        for req in ("n_layers", "d_model", "d_ffn", "sa_n_heads", "kernel_size"):
            if req not in d:
                raise ConfigError(f"{where}: missing required key '{req}'")
        fields = dataclasses.fields(cls)
        kinds = {f.name: _kind(f.type) for f in fields}
        optional = {f.name for f in fields if f.type.startswith("Optional")}
        kw = {k: v if v is None and k in optional else _typed(v, kinds[k], where, k) for k, v in d.items() if k in known}
        if "layer_norm_eps" in kw and not kw["layer_norm_eps"] > 0:
            raise ConfigError(f"{where}: 'layer_norm_eps' must be > 0, got {kw['layer_norm_eps']}")
        cfg = cls(**kw)
        if cfg.d_model % cfg.sa_n_heads:
            raise ConfigError(f"{where}: d_model {cfg.d_model} is not divisible by sa_n_heads {cfg.sa_n_heads}")
        if cfg.has_xattn and (cfg.xa_d_memory is None or cfg.xa_n_heads is None):
            raise ConfigError(f"{where}: has_xattn needs xa_d_memory and xa_n_heads")
        if not cfg.is_causal and cfg.kernel_size % 2 == 0:
            raise ConfigError(f"{where}: a non-causal conv FFN needs an odd kernel_size, got {cfg.kernel_size}")
        return cfg


@dataclass(frozen=True)
class InferenceParameters:
    """NeMo 3.0.0's ``ModelInferenceParameters``, field for field (names and defaults)."""

    max_decoder_steps: int = 500
    temperature: float = 0.7
    topk: int = 80
    cfg_scale: float = 2.5
    apply_attention_prior: bool = True
    attention_prior_epsilon: float = 0.1
    attention_prior_lookahead_window: int = 5
    estimate_alignment_from_layers: Optional[tuple[int, ...]] = None
    apply_prior_to_layers: Optional[tuple[int, ...]] = None
    start_prior_after_n_audio_steps: int = 0
    use_LT_kv_cache: bool = True
    ignore_finished_sentence_tracking: bool = True
    eos_detection_method: str = "argmax_or_multinomial_any"
    min_generated_frames: int = 4

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "inference_parameters") -> "InferenceParameters":
        """From a checkpoint's ``inference_parameters``: types checked here, ranges by the loop's
        ``resolve_parameters`` (where overrides are checked too)."""
        kinds = {f.name: _kind(f.type) for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in _mapping(d, where, "inference_parameters").items() if k in kinds}
        # Renamed fields, as NeMo's from_dict accepts them (released checkpoint 291da79 uses the old names).
        if "prior_epsilon" in d:
            kw["attention_prior_epsilon"] = d["prior_epsilon"]
        if "lookahead_window_size" in d:
            kw["attention_prior_lookahead_window"] = d["lookahead_window_size"]
        return cls(**{k: _typed(v, kinds[k], where, f"inference_parameters.{k}", minimum=None) for k, v in kw.items()})


@dataclass(frozen=True)
class MagpieConfig:
    """Everything the reference needs to rebuild a ``decoder_context_tts`` MagpieTTS."""

    model_type: str
    d_model: int  # NeMo's embedding_dim
    num_text_tokens: int  # tokenizer tokens + BOS + EOS
    num_audio_codebooks: int
    codebook_size: int
    num_all_tokens_per_codebook: int
    frame_stacking_factor: int
    audio_bos_id: int
    audio_eos_id: int
    context_audio_bos_id: int
    context_audio_eos_id: int
    mask_token_id: int
    encoder: TransformerConfig
    decoder: TransformerConfig
    final_proj_bias: bool = True
    ctc_prior_layer_ids: Optional[tuple[int, ...]] = None  # None = every decoder layer (transcript layers)
    use_kv_cache_for_inference: bool = False
    local_transformer_type: str = "none"  # "none" | "autoregressive" | "maskgit"
    local_transformer: Optional[TransformerConfig] = None  # NeMo builds it from local_transformer_* keys
    inference: InferenceParameters = field(default_factory=InferenceParameters)
    # decoder_ce: the context encoder over the context audio's embeddings gives the decoder's prefix (zero-shot);
    # a baked checkpoint instead stores that prefix per speaker (NeMo: the key baked_context_embedding.weight,
    # (speakers, frames * d_model)), and the context encoder is neither stored nor run.
    context_encoder: Optional[TransformerConfig] = None
    baked_speakers: int = 0
    baked_frames: int = 0

    @property
    def baked(self) -> bool:
        return self.baked_speakers > 0

    @property
    def text_bos_id(self) -> int:
        return self.num_text_tokens - 2

    @property
    def text_eos_id(self) -> int:
        return self.num_text_tokens - 1

    @property
    def prior_layers(self) -> tuple[int, ...]:
        """Decoder layers that receive ``align_prior_matrix`` in ``process_batch``."""
        if self.ctc_prior_layer_ids is None:
            return tuple(range(self.decoder.n_layers))
        return self.ctc_prior_layer_ids

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A stable short hash of the architecture, recorded in dumps so mismatched models are caught."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_nemo(cls, cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], where: str = "config") -> "MagpieConfig":
        """Build from NeMo's model config (a plain dict or an omegaconf DictConfig) and the weights.

        Sizes NeMo takes from the codec (codebook count and size) come from the weight shapes here.
        """
        cfg = _to_plain_dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {model_type!r} is not supported (the reference implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for flag in ("use_text_conditioning_encoder", "use_bpe_char_tokenizer", "legacy_text_conditioning", "use_moe"):
            if cfg.get(flag):
                raise ConfigError(f"{where}: '{flag}: true' is not supported by the reference")
        for req in ("embedding_dim", "encoder", "decoder"):
            if req not in cfg:
                raise ConfigError(f"{where}: missing required key '{req}' (is this a MagpieTTS config?)")
        encoder = TransformerConfig.from_dict(cfg["encoder"], f"{where}: encoder")
        decoder = TransformerConfig.from_dict(cfg["decoder"], f"{where}: decoder")
        _check_layer_counts("encoder", encoder, state_dict, where)
        _check_layer_counts("decoder", decoder, state_dict, where)
        if not decoder.has_xattn:
            raise ConfigError(f"{where}: decoder.has_xattn must be true for decoder_context_tts")
        if encoder.has_xattn:
            raise ConfigError(f"{where}: encoder.has_xattn must be false")
        d_model = _typed(cfg["embedding_dim"], "int", where, "embedding_dim")
        context_encoder, baked_speakers, baked_frames = None, 0, 0
        if model_type == "decoder_ce":
            if "context_encoder" not in cfg:  # NeMo builds it even for a baked checkpoint
                raise ConfigError(f"{where}: decoder_ce needs the key 'context_encoder'")
            context_encoder = TransformerConfig.from_dict(cfg["context_encoder"], f"{where}: context_encoder")
            if context_encoder.has_xattn:
                raise ConfigError(f"{where}: context_encoder.has_xattn must be false (it runs without a memory)")
            if "baked_context_embedding.weight" in state_dict:
                context_encoder = None  # NeMo builds it with random weights and never runs it
                baked_speakers, baked_frames = _baked_table(state_dict, d_model, where)
            else:
                _check_layer_counts("context_encoder", context_encoder, state_dict, where)
        for name, t in (("encoder", encoder), ("decoder", decoder), ("context_encoder", context_encoder)):
            if t is not None and t.d_model != d_model:
                raise ConfigError(f"{where}: {name}.d_model {t.d_model} != embedding_dim {d_model}")

        def shape(key: str) -> tuple[int, ...]:
            if key not in state_dict:
                raise ConfigError(f"{where}: the weights have no '{key}' (not a MagpieTTS checkpoint?)")
            return tuple(state_dict[key].shape)

        num_text_tokens = shape("text_embedding.weight")[0]
        fsf = _typed(cfg.get("frame_stacking_factor", 1), "int", where, "frame_stacking_factor")
        n_tables = 0
        while f"audio_embeddings.{n_tables}.weight" in state_dict:
            n_tables += 1
        if n_tables == 0:
            raise ConfigError(f"{where}: the weights have no audio_embeddings.0.weight")
        if n_tables % fsf:
            raise ConfigError(f"{where}: {n_tables} audio embedding tables is not a multiple of frame_stacking_factor {fsf}")
        num_codebooks = n_tables // fsf
        num_all = shape("audio_embeddings.0.weight")[0]
        forced_all = cfg.get("forced_num_all_tokens_per_codebook")
        if forced_all is not None and int(forced_all) != num_all:
            raise ConfigError(f"{where}: forced_num_all_tokens_per_codebook {forced_all} != embedding rows {num_all}")
        if "vector_quantizer" in cfg and cfg["vector_quantizer"]:
            vq = cfg["vector_quantizer"]
            levels = vq.get("num_levels_per_group")
            codebook_size = int(torch.tensor(levels).prod()) if levels else num_all - NUM_SPECIAL_AUDIO_TOKENS
        else:
            codebook_size = num_all - NUM_SPECIAL_AUDIO_TOKENS
        ids = {}
        for key, off in _SPECIAL_OFFSETS.items():
            forced = cfg.get(f"forced_{key}")
            ids[key] = _typed(forced, "int", where, f"forced_{key}", minimum=0) if forced is not None else codebook_size + off
            if not 0 <= ids[key] < num_all:
                raise ConfigError(f"{where}: special token {key}={ids[key]} is outside the {num_all}-row audio embedding")
        proj = shape("final_proj.weight")
        if proj != (num_codebooks * num_all * fsf, d_model):
            raise ConfigError(
                f"{where}: final_proj.weight has shape {proj}, expected "
                f"({num_codebooks} codebooks x {num_all} tokens x stacking {fsf}, {d_model})"
            )
        ctc = _typed(cfg.get("ctc_prior_layer_ids"), "layers", where, "ctc_prior_layer_ids")
        if ctc is not None and any(i >= decoder.n_layers for i in ctc):
            raise ConfigError(f"{where}: 'ctc_prior_layer_ids' names layers outside 0..{decoder.n_layers - 1}")
        inf = InferenceParameters.from_dict(cfg.get("inference_parameters") or {}, where)
        lt_type = str(cfg.get("local_transformer_type", "none")).lower()
        if lt_type not in ("none", "autoregressive", "maskgit"):
            raise ConfigError(f"{where}: unknown local_transformer_type {lt_type!r}")
        lt = None
        if lt_type != "none":
            # NeMo's MagpieTTSModel.__init__: a causal (AR) or bidirectional (MaskGit) kernel-1 stack with learned
            # positions over C * stacking + 2 positions, FFN 4x, no output norm.
            hidden = _typed(cfg.get("local_transformer_hidden_dim", 256), "int", where, "local_transformer_hidden_dim")
            heads = _typed(cfg.get("local_transformer_n_heads", 1), "int", where, "local_transformer_n_heads")
            if hidden % heads:
                raise ConfigError(f"{where}: local_transformer_hidden_dim {hidden} is not divisible by "
                                  f"local_transformer_n_heads {heads}")
            lt = TransformerConfig(
                n_layers=_typed(cfg.get("local_transformer_n_layers", 2), "int", where, "local_transformer_n_layers"),
                d_model=hidden, d_ffn=4 * hidden, sa_n_heads=heads, kernel_size=1,
                is_causal=lt_type == "autoregressive", apply_norm_out=False,
                max_length_causal_mask=fsf * num_codebooks + 2, use_learnable_pos_emb=True,
            )
            _check_layer_counts("local_transformer", lt, state_dict, where)
        return cls(
            model_type=model_type,
            d_model=d_model,
            num_text_tokens=num_text_tokens,
            num_audio_codebooks=num_codebooks,
            codebook_size=codebook_size,
            num_all_tokens_per_codebook=num_all,
            frame_stacking_factor=fsf,
            encoder=encoder,
            decoder=decoder,
            final_proj_bias="final_proj.bias" in state_dict,
            ctc_prior_layer_ids=tuple(int(i) for i in ctc) if ctc is not None else None,
            use_kv_cache_for_inference=_typed(cfg.get("use_kv_cache_for_inference", False), "bool", where,
                                              "use_kv_cache_for_inference"),
            local_transformer_type=lt_type,
            local_transformer=lt,
            inference=inf,
            context_encoder=context_encoder,
            baked_speakers=baked_speakers,
            baked_frames=baked_frames,
            **ids,
        )


def _baked_table(state_dict: Mapping[str, Any], d_model: int, where: str) -> tuple[int, int]:
    """(speakers N, frames T) of a baked speaker table, its four entries checked against each other: the weight
    (N, T*D), ``_baked_embedding_T`` / ``_baked_embedding_D`` (one integer each, NeMo reads them with .item()),
    ``baked_context_embedding_len`` (N,) with lengths in [1, T]."""
    def scalar(key: str) -> int:
        t = state_dict.get(key)
        if t is None:
            raise ConfigError(f"{where}: a baked speaker table needs '{key}' in the weights")
        if t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ConfigError(f"{where}: '{key}' must hold one integer, got {t.dtype} of shape {tuple(t.shape)}")
        return int(t.reshape(()))

    T, D = scalar("_baked_embedding_T"), scalar("_baked_embedding_D")
    w = state_dict["baked_context_embedding.weight"]
    if w.dim() != 2:
        raise ConfigError(f"{where}: baked_context_embedding.weight must be (speakers, T*D), got {tuple(w.shape)}")
    N = int(w.shape[0])
    if D != d_model or T < 1 or w.shape[1] != T * D:
        raise ConfigError(f"{where}: baked_context_embedding.weight is {tuple(w.shape)} but _baked_embedding_T x "
                          f"_baked_embedding_D = {T} x {D} (embedding_dim {d_model})")
    lens = state_dict.get("baked_context_embedding_len")
    if lens is None or tuple(lens.shape) != (N,) or lens.is_floating_point() or lens.dtype == torch.bool:
        raise ConfigError(f"{where}: baked_context_embedding_len must be {N} integers (one per speaker), got "
                          f"{None if lens is None else (lens.dtype, tuple(lens.shape))}")
    if N < 1 or int(lens.min()) < 1 or int(lens.max()) > T:
        raise ConfigError(f"{where}: baked_context_embedding_len values must lie in [1, {T}]")
    return N, T


def _to_plain_dict(cfg: Any) -> dict:
    """omegaconf DictConfig -> resolved plain dict; plain mappings pass through."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a base requirement
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"expected a mapping for the model config, got {type(cfg).__name__}")
    return dict(cfg)
