"""NeMo MagpieTTS -> TensorRT-LLM "t5tts" checkpoint, and back.

Layout written (as the fork's ``examples/models/contrib/t5tts/convert_checkpoint.py``, rmittal-github e7109d5 /
anand-nv 0c0df9f0)::

    out_dir/encoder/config.json   out_dir/encoder/rank{r}.safetensors
    out_dir/decoder/config.json   out_dir/decoder/rank{r}.safetensors

Weight names are the fork's. Differences from the fork, on purpose:

* every hyper-parameter comes from the checkpoint (the fork hard-codes 768/12/3072/6/12 and 98 text tokens);
* ``final_proj.bias`` is kept as ``lm_head.bias`` with ``has_lm_head_bias: true`` (the fork drops it:
  its config never sets ``has_lm_head_bias`` and ``check_config`` defaults it to False);
  ``drop_lm_head_bias=True`` reproduces the fork;
* ``q_scaling`` is 1.0: TensorRT-LLM's softmax scale is ``1/(sqrt(head_size)*q_scaling)``, which then equals
  NeMo's ``d_head**-0.5``. The fork writes ``1/sqrt(head_size)`` ("offset attention scaling"), i.e. no scaling
  at all, which is wrong for NeMo weights (architecture.md 4.3); fork model.py from e7109d5 on ignores it;
* ``encoder_num_heads`` / ``encoder_head_size`` (TensorRT-LLM sizes the cross-attention KV cache with them) are
  the cross-attention's heads and head size; the fork writes the encoder self-attention's 12 / 64 while its
  cross-attention layer is hard-coded to 1 x 128;
* our own metadata sits under ``magpie_parity`` so that :func:`load_converted` rebuilds the exact NeMo config.

``decoder_ce`` checkpoints (the released ``nvidia/magpie_tts_multilingual_357m`` v2602/v2607). What the forks do
(sources read, not run):

* the decoder engine takes the context prefix ready-made: inputs ``decoder_context_features`` ``[num_tokens, D]``
  and ``decoder_context_features_mask`` ``[num_tokens]``; where the mask is set, the row replaces the mean of the
  codebook embeddings, then the learned position is added (``EncoderDecoderEmbedding``, rmittal-github 497d0e69
  ``tensorrt_llm/models/t5tts/model.py``, read for shared/spec/architecture.md 4.1; not stored in this session's
  index, which holds rmittal's c6ff2312 only). The runtime sets the mask over a context request's prompt rows and
  clears it elsewhere (anand-nv/TensorRT-LLM@0c0df9f0deddec40b2a8fab78da04a8e20f2c5f8
  ``cpp/tensorrt_llm/batch_manager/runtimeBuffers.cpp``: ``RuntimeBuffers::reshape`` zeroes
  ``decoderContextFeaturesMask``, ``setFromInputs`` copies the request's rows and sets the mask);
* anand-nv@0c0df9f0 ``examples/models/contrib/t5tts/convert_checkpoint.py`` writes ``use_context_embeddings: True``
  in the decoder config (rmittal e7109d5's converter writes no such key) and converts only the ``encoder.*`` /
  ``decoder.*`` / ``audio_embeddings.*`` / ``final_proj.weight`` / ``text_embedding`` weights it names: neither
  ``baked_context_embedding.*`` nor ``context_encoder.*`` nor ``local_transformer*`` reaches the engine. The baked
  rows travel in a side file instead (rmittal-github@ae81c0781cc4336c67aaeed8a6fe7e9ef1c081c0
  ``run_decoder_multiling.py``: ``torch.load("zh_es_en_fr.pt")[84][0]``; anand-nv@0c0df9f0
  ``run_decoder_multiling_executor.py``: ``additional_decoder_input.pt``, "218 positions = 217 context + 1 BOS");

so :func:`convert_state_dict` writes ``use_context_embeddings: true`` for ``decoder_ce`` and keeps what the engine
does not hold (the baked table with ``_baked_embedding_T/_D`` and ``baked_context_embedding_len``, or the context
encoder's weights) beside the checkpoint in :data:`OUTSIDE_ENGINE_FILE`, NeMo's names, original dtype, so that
:func:`reference_from_trtllm` rebuilds the exact reference model (the runner feeds those rows to the engine).

Local transformer: the forks' decoder engine has none. Their local transformer is a separate engine: rmittal-github
``examples/models/contrib/t5tts/convert_lt_to_trt.py`` (@172392c39aa4100612a6ff16c3050a6d9108b3a9 and
@73e9c59f657f2aa1aa1e4a5d60206ce8b5634098) exports NeMo's module to ONNX and TensorRT with ``cfg_scale=2.5`` inside
the graph and 8 codebooks in the profile (172392c3 applies every output projection to one pass over the decoder
state, no code fed back; 73e9c59 embeds all previous codes with one table); anand-nv@0c0df9f0
``cpp/tensorrt_llm/batch_manager/trtLocalTransformer.cpp`` runs a plan named by the decoder config key
``localtransformer_path`` (``--localtransformer_path``, default None in convert_checkpoint.py) that returns int32
codes, with ``hiddenSize{768}`` and ``vocabSize{1032}`` hard-coded. None of them is built from the checkpoint's
own weights here, so a checkpoint with a local transformer is refused unless ``without_local_transformer=True``:
the decoder alone is converted (``localtransformer_path: null``, as the fork's converter writes it without the
flag), the engine samples every codebook on its own (NeMo's ``use_local_transformer_for_inference=False``), and the
local transformer's weights are kept beside the checkpoint for the reference.

Frame stacking (``frame_stacking_factor`` S > 1): one decoder position is one stacked step of C * S tokens, codebook
c of frame s in vocabulary ``c + s * C`` (NeMo's ``audio_embeddings[c + s * C]``), so the engine needs C * S
vocabularies of V tokens (``vocab_sizes``) and nothing else: anand-nv@0c0df9f0 runs v2607 this way
(convert_checkpoint.py infers ``vocab_sizes`` from the checkpoint's embedding tables; run_decoder_multiling_executor.py
uses ``num_vocabs = 16`` "= books_num * stacking_factor" and de-offsets frame f, codebook i by ``(i + f * 8) * 2024``).
Its converter writes ``stacking_factor: 1``; we write S (the Riva Triton backend divides ``len(vocab_sizes)`` by it).
rmittal-github's converter (@e7109d5) and runner (@ae81c078) hard-code 8 codebooks of one frame.

Tensor parallelism (``tp_size=N``), following what the fork's TensorRT-LLM modules load per rank:

* attention ``qkv`` (``Attention``/``BertAttention``, column-parallel): the fused ``[Q; K; V]`` rows are split
  per head, i.e. rank r keeps heads ``[r*H/N, (r+1)*H/N)`` of each of Q, K and V; ``dense`` (row-parallel)
  keeps the matching input columns. Self- and cross-attention heads must divide by N. A cross-attention with
  fewer heads than N cannot be split: TensorRT-LLM replicates *KV* heads when ``num_kv_heads < tp_size``, but
  the query heads are divided (``num_attention_heads // tp_size``), which is 0 for the released 1-head
  cross-attention, so we raise instead of writing an engine that cannot exist;
* ``lm_head`` is a ``ColumnLinear(gather_output=True)``: weight (and bias) rows split over the flat
  ``C*V`` vocabulary, which must divide by N;
* embeddings are replicated (the fork writes ``use_parallel_embedding: false``), as are all LayerNorms;
* the conv FFN is replicated by default: the fork's ``PositionwiseConvFF`` builds plain ``Conv1d`` layers with no
  tensor-parallel arguments, so every rank holds the full kernels. ``ffn_split="split"`` writes the
  Megatron layout a TP-aware conv FFN would need (``proj`` output channels / ``o_net`` input channels split;
  ``d_ffn`` must divide by N); no fork build consumes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from reference.config import MagpieConfig, TransformerConfig

FORMAT_VERSION = 1
# What the engine does not hold, kept beside the TensorRT-LLM checkpoint for the reference (trtllm-build reads
# encoder/ and decoder/ only).
OUTSIDE_ENGINE_FILE = "magpie_parity/outside_engine.safetensors"
BAKED_KEYS = ("baked_context_embedding.weight", "_baked_embedding_T", "_baked_embedding_D",
              "baked_context_embedding_len")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FFN_SPLITS = ("replicate", "split")
# tensorrt_llm.functional enums, as the fork's converter writes them (IntEnum values).
LAYERNORM_TYPE_LAYERNORM = 0
LAYERNORM_POSITION_PRE = 0
# NeMo's construct_inference_prior window: t-1 .. t+5 (architecture.md 6.2); the fork's defaults are the same.
PRIOR_WINDOW_LEFT = 1
PRIOR_WINDOW_RIGHT = 5


class ConversionError(ValueError):
    """Conversion or loading failed; the message names the file, key or tensor at fault."""


@dataclass
class ConvertedCheckpoint:
    """A TensorRT-LLM checkpoint in memory: one config and one weight dict per rank for each engine."""

    encoder_config: dict
    decoder_config: dict
    encoder_ranks: list = field(default_factory=list)  # list[dict[str, Tensor]]
    decoder_ranks: list = field(default_factory=list)
    # NeMo-named weights the engine does not hold (baked table, context encoder, local transformer): OUTSIDE_ENGINE_FILE
    outside_engine: dict = field(default_factory=dict)

    @property
    def tp_size(self) -> int:
        return len(self.encoder_ranks)


# ----------------------------------------------------------------------------------------------------------------
# MagpieConfig <-> minimal NeMo config
# ----------------------------------------------------------------------------------------------------------------


def _transformer_to_nemo(t: TransformerConfig) -> dict:
    d = {
        "n_layers": t.n_layers, "d_model": t.d_model, "d_ffn": t.d_ffn, "sa_n_heads": t.sa_n_heads,
        "kernel_size": t.kernel_size, "is_causal": t.is_causal, "apply_norm_out": t.apply_norm_out,
        "max_length_causal_mask": t.max_length_causal_mask, "use_learnable_pos_emb": t.use_learnable_pos_emb,
        "has_xattn": t.has_xattn,
    }
    if t.has_xattn:
        d.update(xa_d_memory=t.xa_d_memory, xa_n_heads=t.xa_n_heads, xa_d_head=t.xa_d_head,
                 apply_norm_to_cond=t.apply_norm_to_cond)
    if t.layer_norm_eps != 1e-5:
        d["layer_norm_eps"] = t.layer_norm_eps
    return d


def nemo_config_from_magpie(c: MagpieConfig) -> dict:
    """A minimal NeMo model config that ``MagpieConfig.from_nemo`` maps back to ``c`` (with matching weights)."""
    inf = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(c.inference).items()}
    cfg = {
        "model_type": c.model_type,
        "embedding_dim": c.d_model,
        "frame_stacking_factor": c.frame_stacking_factor,
        "encoder": _transformer_to_nemo(c.encoder),
        "decoder": _transformer_to_nemo(c.decoder),
        # The codec is not in the checkpoint; one FSQ group whose level product is the codebook size is enough.
        "vector_quantizer": {"num_levels_per_group": [c.codebook_size]},
        "forced_num_all_tokens_per_codebook": c.num_all_tokens_per_codebook,
        "forced_audio_bos_id": c.audio_bos_id,
        "forced_audio_eos_id": c.audio_eos_id,
        "forced_context_audio_bos_id": c.context_audio_bos_id,
        "forced_context_audio_eos_id": c.context_audio_eos_id,
        "forced_mask_token_id": c.mask_token_id,
        "use_kv_cache_for_inference": c.use_kv_cache_for_inference,
        "local_transformer_type": c.local_transformer_type,
        "inference_parameters": inf,
    }
    if c.ctc_prior_layer_ids is not None:
        cfg["ctc_prior_layer_ids"] = list(c.ctc_prior_layer_ids)
    if c.model_type == "decoder_ce":
        if c.context_encoder is not None:
            cfg["context_encoder"] = _transformer_to_nemo(c.context_encoder)
        else:
            # Baked: NeMo builds a context encoder from this key and never runs it (its weights are not saved);
            # MagpieConfig keeps none of its sizes, so any valid stack rebuilds the same MagpieConfig.
            cfg["context_encoder"] = {"n_layers": 1, "d_model": c.d_model, "d_ffn": c.d_model, "sa_n_heads": 1,
                                      "kernel_size": 1}
    if c.local_transformer is not None:
        lt = c.local_transformer
        cfg.update(local_transformer_hidden_dim=lt.d_model, local_transformer_n_heads=lt.sa_n_heads,
                   local_transformer_n_layers=lt.n_layers)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


def fork_deviations(c: MagpieConfig) -> list[str]:
    """Where this checkpoint differs from what the fork's model.py hard-codes (the engine would not match NeMo)."""
    out = []
    if c.encoder.is_causal:
        out.append("encoder is_causal=true: the fork's encoder is bidirectional with symmetric conv padding")
    if c.encoder.kernel_size != 3:
        out.append(f"encoder kernel_size={c.encoder.kernel_size}: the fork hard-codes 3 (padding 1)")
    if c.decoder.kernel_size != 1:
        out.append(f"decoder kernel_size={c.decoder.kernel_size}: the fork hard-codes 1")
    if (c.decoder.xa_n_heads, c.decoder.xa_head_dim) != (1, 128):
        out.append(f"cross-attention {c.decoder.xa_n_heads} x {c.decoder.xa_head_dim}: the fork hard-codes 1 x 128")
    if not c.decoder.apply_norm_to_cond:
        out.append("apply_norm_to_cond=false: the fork always applies cross_attention_memory_layernorm")
    if not c.encoder.apply_norm_out or not c.decoder.apply_norm_out:
        out.append("apply_norm_out=false: written as has_model_final_layernorm=false")
    if c.frame_stacking_factor != 1:
        S, C = c.frame_stacking_factor, c.num_audio_codebooks
        out.append(f"frame_stacking_factor={S}: written as {C * S} vocabularies of one decoder position "
                   "(anand-nv@0c0df9f0 runs v2607 so, num_vocabs = books x stacking); rmittal-github's converter and "
                   "runner hard-code 8 codebooks of one frame")
    return out


def context_kind(c: MagpieConfig) -> str:
    """Where the decoder's context prefix comes from: "codes" (decoder_context_tts: the engine embeds the context
    codes, or takes their embeddings as features), "baked" or "context_encoder" (decoder_ce: the engine takes the
    prefix as decoder_context_features)."""
    if c.model_type != "decoder_ce":
        return "codes"
    return "baked" if c.baked else "context_encoder"


def outside_engine_parts(c: MagpieConfig) -> list[str]:
    """What of the checkpoint the engine does not hold (kept in :data:`OUTSIDE_ENGINE_FILE`)."""
    parts = []
    if c.baked:
        parts.append("baked speaker table")
    if c.context_encoder is not None:
        parts.append("context encoder")
    if c.local_transformer is not None:
        parts.append(f"{c.local_transformer_type} local transformer")
    return parts


def outside_engine_names(c: MagpieConfig) -> list[str]:
    """The reference's weight names of :func:`outside_engine_parts`, sorted."""
    from reference.model import MagpieTTS

    if not outside_engine_parts(c):
        return []
    with torch.device("meta"):
        keys = list(MagpieTTS(c).state_dict())
    prefixes = []
    if c.context_encoder is not None:
        prefixes.append("context_encoder.")
    if c.local_transformer is not None:
        prefixes.append("local_transformer")  # local_transformer., _in_projection., _out_projections.
    return sorted(k for k in keys if (c.baked and k in BAKED_KEYS) or k.startswith(tuple(prefixes)))


def _common(t: TransformerConfig, dtype: str, logits_dtype: str, tp_size: int) -> dict:
    return {
        "dtype": dtype,
        "logits_dtype": logits_dtype,
        "num_hidden_layers": t.n_layers,
        "num_attention_heads": t.sa_n_heads,
        "num_key_value_heads": t.sa_n_heads,
        "hidden_size": t.d_model,
        "head_size": t.sa_d_head,
        "intermediate_size": t.d_ffn,
        "norm_epsilon": t.layer_norm_eps,
        "position_embedding_type": "learned_absolute",
        "hidden_act": "gelu",  # TensorRT-LLM's 'gelu' is the tanh approximation, as NeMo's GELU(approximate='tanh')
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "max_position_embeddings": t.max_length_causal_mask,
        "n_positions": t.max_length_causal_mask,
        "has_position_embedding": t.use_learnable_pos_emb,
        "layernorm_type": LAYERNORM_TYPE_LAYERNORM,
        "layernorm_position": LAYERNORM_POSITION_PRE,
        "has_attention_qkvo_bias": False,
        "has_mlp_bias": False,
        "has_pos_ff_bias": False,
        "has_model_final_layernorm": t.apply_norm_out,
        "has_embedding_layernorm": False,
        "has_embedding_scale": False,
        # The fork writes 1/sqrt(head_size) here (0.125 for 64-dim heads); see the module docstring.
        "q_scaling": 1.0,
        "relative_attention": False,
        "max_distance": 0,
        "num_buckets": 0,
        "model_type": "t5tts",
        # The fork writes gated_act=true (configparser fallback); its conv FFN is not gated and ignores it.
        "gated_act": False,
        # Not read by the fork (it hard-codes encoder k=3 bidirectional, decoder k=1 causal): recorded so a
        # patched model.py can build the convolution the checkpoint was trained with.
        "pos_ff_kernel_size": t.kernel_size,
        "is_causal": t.is_causal,
        "conv_is_causal": t.is_causal,
    }


def build_configs(c: MagpieConfig, dtype: str = "float32", tp_size: int = 1, drop_lm_head_bias: bool = False,
                  logits_dtype: str = "float32", ffn_split: str = "replicate",
                  source_hash: Optional[str] = None) -> tuple[dict, dict]:
    """The encoder and decoder ``config.json`` dicts for a MagpieConfig."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if logits_dtype not in ("float16", "float32"):
        raise ConversionError(f"logits_dtype must be float16 or float32, got {logits_dtype!r}")
    if ffn_split not in FFN_SPLITS:
        raise ConversionError(f"ffn_split must be one of {FFN_SPLITS}, got {ffn_split!r}")
    enc_t, dec_t = c.encoder, c.decoder
    n_vocabs = c.num_audio_codebooks * c.frame_stacking_factor
    V = c.num_all_tokens_per_codebook
    has_bias = c.final_proj_bias and not drop_lm_head_bias
    kept = c if has_bias == c.final_proj_bias else _without_bias(c)
    meta_common = {
        "format_version": FORMAT_VERSION,
        "source_config_hash": source_hash or c.hash(),
        "config_hash": kept.hash(),
        "nemo_config": nemo_config_from_magpie(kept),
        "codebook_size": c.codebook_size,
        "num_all_tokens_per_codebook": V,
        "num_codebooks": c.num_audio_codebooks,
        "frame_stacking_factor": c.frame_stacking_factor,
        "text_vocab_size": c.num_text_tokens,
        "special_ids": {
            "audio_bos_id": c.audio_bos_id, "audio_eos_id": c.audio_eos_id,
            "context_audio_bos_id": c.context_audio_bos_id, "context_audio_eos_id": c.context_audio_eos_id,
            "mask_token_id": c.mask_token_id, "text_bos_id": c.text_bos_id, "text_eos_id": c.text_eos_id,
            "cfg_service_token_id": n_vocabs * V,
        },
        "is_causal": {"encoder": enc_t.is_causal, "decoder": dec_t.is_causal},
        "kernel_size": {"encoder": enc_t.kernel_size, "decoder": dec_t.kernel_size},
        "lm_head_bias": "kept" if has_bias else ("dropped" if c.final_proj_bias else "absent"),
        "ffn_split": ffn_split,
        "fork_q_scaling": {"encoder": 1 / math.sqrt(enc_t.sa_d_head), "decoder": 1 / math.sqrt(dec_t.sa_d_head)},
        "fork_deviations": fork_deviations(c),
        "context": context_kind(c),
    }
    if c.baked:  # every request's prompt is at most this many baked frames + the BOS position (build checks it)
        meta_common["baked_context_frames"] = c.baked_frames
    parts = outside_engine_parts(c)
    if parts:
        meta_common["outside_engine"] = {"file": OUTSIDE_ENGINE_FILE, "parts": parts,
                                         "tensors": outside_engine_names(c)}
    if c.local_transformer is not None:
        meta_common["local_transformer"] = (f"{c.local_transformer_type}: not in the engine (converted with "
                                            "without_local_transformer); the engine samples every codebook on its own")
    enc = {"architecture": "T5TTSEncoderModel", **_common(enc_t, dtype, logits_dtype, tp_size),
           "vocab_size": c.num_text_tokens, "magpie_parity": {**meta_common, "component": "encoder"}}
    inf = c.inference
    all_layers = list(range(dec_t.n_layers))
    dec = {
        "architecture": "T5TTSDecoderModel",
        **_common(dec_t, dtype, logits_dtype, tp_size),
        # Flat multi-codebook vocabulary WITHOUT the CFG service row (the embedding table has one more row,
        # as in the fork: "we dont change the config, instead we change usage of the embedding dim").
        "vocab_size": n_vocabs * V,
        "vocab_sizes": [V] * n_vocabs,
        "num_vocabs": n_vocabs,
        "stacking_factor": c.frame_stacking_factor,
        "cross_attention": True,
        "has_encoder_input_layernorm": dec_t.apply_norm_to_cond,
        "encoder_hidden_size": dec_t.xa_d_memory,
        "encoder_num_heads": dec_t.xa_n_heads,
        "encoder_num_kv_heads": dec_t.xa_n_heads,
        "encoder_head_size": dec_t.xa_head_dim,
        "cross_attention_num_heads": dec_t.xa_n_heads,
        "cross_attention_head_size": dec_t.xa_head_dim,
        "has_lm_head_bias": has_bias,
        "rescale_before_lm_head": False,
        "skip_cross_kv": False,
        "use_implicit_relative_attention": False,
        # Per-codebook ids (the fork writes stale T5 values 106337 / 2047 / 2046 / 0; its runner passes
        # end_id = pad_id = EOS per request).
        "decoder_start_token_id": c.audio_bos_id,
        "bos_token_id": c.audio_bos_id,
        "eos_token_id": c.audio_eos_id,
        "pad_token_id": c.audio_eos_id,
        "use_attention_prior": bool(inf.apply_attention_prior),
        "compute_attention_prior_from_layers": list(inf.estimate_alignment_from_layers or all_layers),
        "apply_attention_prior_to_layers": list(inf.apply_prior_to_layers or all_layers),
        "attention_prior_lookahead": inf.attention_prior_lookahead_window,
        "attention_prior_window_left": PRIOR_WINDOW_LEFT,
        "attention_prior_window_right": PRIOR_WINDOW_RIGHT,
        # decoder_ce: the prefix comes in as decoder_context_features (anand-nv@0c0df9f0 convert_checkpoint.py).
        **({"use_context_embeddings": True} if c.model_type == "decoder_ce" else {}),
        # the fork's converter writes the local-transformer engine's path, None without --localtransformer_path
        **({"localtransformer_path": None} if c.local_transformer is not None else {}),
        "magpie_parity": {**meta_common, "component": "decoder"},
    }
    _check_tp(c, tp_size, ffn_split)
    return enc, dec


def _without_bias(c: MagpieConfig) -> MagpieConfig:
    import dataclasses

    return dataclasses.replace(c, final_proj_bias=False)


def _check_tp(c: MagpieConfig, tp: int, ffn_split: str) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise ConversionError(f"tp_size must be a positive integer, got {tp!r}")
    if tp == 1:
        return
    checks = [
        ("encoder.sa_n_heads", c.encoder.sa_n_heads),
        ("decoder.sa_n_heads", c.decoder.sa_n_heads),
        ("decoder.xa_n_heads (cross-attention heads)", c.decoder.xa_n_heads),
        ("lm_head vocabulary (codebooks x tokens per codebook)",
         c.num_audio_codebooks * c.frame_stacking_factor * c.num_all_tokens_per_codebook),
    ]
    if ffn_split == "split":
        checks += [("encoder.d_ffn", c.encoder.d_ffn), ("decoder.d_ffn", c.decoder.d_ffn)]
    for name, n in checks:
        if n % tp:
            hint = ""
            if "xa_n_heads" in name and n < tp:
                hint = (" (TensorRT-LLM divides query heads by tp_size and only replicates KV heads; a "
                        f"{n}-head cross-attention cannot be tensor-parallel over {tp} ranks)")
            raise ConversionError(f"tp_size={tp} does not divide {name}={n}{hint}")


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------


def _split_qkv(w: torch.Tensor, n_heads: int, d_head: int, tp: int, r: int) -> torch.Tensor:
    """Fused [Q; K; V] rows (each n_heads*d_head, head-major) -> rank r's heads of each."""
    w3 = w.reshape(3, n_heads, d_head, -1)
    h = n_heads // tp
    return w3[:, r * h:(r + 1) * h].reshape(3 * h * d_head, -1).contiguous()


def _split_cols_by_head(w: torch.Tensor, n_heads: int, d_head: int, tp: int, r: int) -> torch.Tensor:
    h = n_heads // tp
    return w[:, r * h * d_head:(r + 1) * h * d_head].contiguous()


def _chunk(w: torch.Tensor, dim: int, tp: int, r: int) -> torch.Tensor:
    return torch.chunk(w, tp, dim=dim)[r].contiguous()


def _get(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"{where}: the NeMo state dict has no '{key}'")
    return sd[key]


def encoder_weights(c: MagpieConfig, sd: Mapping[str, torch.Tensor], tp: int, r: int, ffn_split: str,
                    where: str = "checkpoint") -> dict[str, torch.Tensor]:
    t = c.encoder
    w: dict[str, torch.Tensor] = {"embedding.vocab_embedding.weight": _get(sd, "text_embedding.weight", where)}
    if t.use_learnable_pos_emb:
        w["embedding.position_embedding.weight"] = _get(sd, "encoder.position_embeddings.weight", where)
    for i in range(t.n_layers):
        p, q = f"encoder.layers.{i}", f"encoder_layers.{i}"
        _self_attn(w, sd, t, p, f"{q}.attention", tp, r, where)
        w[f"{q}.pos_ff_layernorm.weight"] = _get(sd, f"{p}.norm_pos_ff.weight", where)
        _ffn(w, sd, p, q, tp, r, ffn_split, where)
    if t.apply_norm_out:
        w["final_layernorm.weight"] = _get(sd, "encoder.norm_out.weight", where)
    return w


def _self_attn(w, sd, t: TransformerConfig, p: str, attn: str, tp: int, r: int, where: str) -> None:
    """NeMo's norm_self + fused qkv_net / o_net -> ``<attn>_layernorm``, ``<attn>.qkv``, ``<attn>.dense`` (the
    encoder's ``attention`` and the decoder's ``self_attention`` use the same layout)."""
    w[f"{attn}_layernorm.weight"] = _get(sd, f"{p}.norm_self.weight", where)
    w[f"{attn}.qkv.weight"] = _split_qkv(
        _get(sd, f"{p}.self_attention.qkv_net.weight", where), t.sa_n_heads, t.sa_d_head, tp, r)
    w[f"{attn}.dense.weight"] = _split_cols_by_head(
        _get(sd, f"{p}.self_attention.o_net.weight", where), t.sa_n_heads, t.sa_d_head, tp, r)


def _ffn(w, sd, p, q, tp, r, ffn_split, where):
    proj = _get(sd, f"{p}.pos_ff.proj.conv.weight", where).unsqueeze(3)  # [ffn, d, k, 1]
    o_net = _get(sd, f"{p}.pos_ff.o_net.conv.weight", where).unsqueeze(3)  # [d, ffn, k, 1]
    if ffn_split == "split" and tp > 1:
        proj, o_net = _chunk(proj, 0, tp, r), _chunk(o_net, 1, tp, r)
    w[f"{q}.pos_ff.proj.weight"] = proj
    w[f"{q}.pos_ff.o_net.weight"] = o_net


def decoder_weights(c: MagpieConfig, sd: Mapping[str, torch.Tensor], tp: int, r: int, ffn_split: str,
                    drop_lm_head_bias: bool = False, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    t = c.decoder
    n_tables = c.num_audio_codebooks * c.frame_stacking_factor
    tables = [_get(sd, f"audio_embeddings.{k}.weight", where) for k in range(n_tables)]
    # One extra all-zero row: the CFG unconditional "service token" (id = vocab_size), as the fork appends.
    tables.append(torch.zeros(1, tables[0].shape[1], dtype=tables[0].dtype))
    w: dict[str, torch.Tensor] = {"embedding.vocab_embedding.weight": torch.cat(tables, 0)}
    if t.use_learnable_pos_emb:
        w["embedding.position_embedding.weight"] = _get(sd, "decoder.position_embeddings.weight", where)
    Hx, Dx = t.xa_n_heads, t.xa_head_dim
    for i in range(t.n_layers):
        p, q = f"decoder.layers.{i}", f"decoder_layers.{i}"
        _self_attn(w, sd, t, p, f"{q}.self_attention", tp, r, where)
        w[f"{q}.cross_attention_layernorm.weight"] = _get(sd, f"{p}.norm_xattn_query.weight", where)
        if t.apply_norm_to_cond:
            w[f"{q}.cross_attention_memory_layernorm.weight"] = _get(sd, f"{p}.norm_xattn_memory.weight", where)
        q_net = _get(sd, f"{p}.cross_attention.q_net.weight", where)
        kv_net = _get(sd, f"{p}.cross_attention.kv_net.weight", where)
        if q_net.shape[1] != kv_net.shape[1]:
            raise ConversionError(
                f"{where}: {p}.cross_attention: q_net input {q_net.shape[1]} != kv_net input {kv_net.shape[1]} "
                "(xa_d_memory != d_model); TensorRT-LLM's fused cross-attention qkv needs them equal")
        # NeMo's kv_net rows are [K (all heads); V (all heads)] (reshape(B,T,2,H,Dh)), so [q_net; kv_net] is
        # TensorRT-LLM's fused [Q; K; V].
        w[f"{q}.cross_attention.qkv.weight"] = _split_qkv(torch.cat([q_net, kv_net], 0), Hx, Dx, tp, r)
        w[f"{q}.cross_attention.dense.weight"] = _split_cols_by_head(
            _get(sd, f"{p}.cross_attention.o_net.weight", where), Hx, Dx, tp, r)
        w[f"{q}.pos_ff_layernorm.weight"] = _get(sd, f"{p}.norm_pos_ff.weight", where)
        _ffn(w, sd, p, q, tp, r, ffn_split, where)
    if t.apply_norm_out:
        w["final_layernorm.weight"] = _get(sd, "decoder.norm_out.weight", where)
    w["lm_head.weight"] = _chunk(_get(sd, "final_proj.weight", where), 0, tp, r)
    if c.final_proj_bias and not drop_lm_head_bias:
        w["lm_head.bias"] = _chunk(_get(sd, "final_proj.bias", where), 0, tp, r)
    return w


# ----------------------------------------------------------------------------------------------------------------
# Public API: convert
# ----------------------------------------------------------------------------------------------------------------


def _source(ckpt_path_or_model) -> tuple[MagpieConfig, dict[str, torch.Tensor], str]:
    from reference.model import MagpieTTS

    if isinstance(ckpt_path_or_model, MagpieTTS):
        m = ckpt_path_or_model
        return m.config, {k: v.detach() for k, v in m.state_dict().items()}, f"<{type(m).__name__}>"
    if isinstance(ckpt_path_or_model, (str, os.PathLike)):
        from reference.checkpoint import read_checkpoint

        raw = read_checkpoint(ckpt_path_or_model)
        return MagpieConfig.from_nemo(raw.config, raw.state_dict, where=str(raw.path)), raw.state_dict, str(raw.path)
    raise ConversionError(
        f"expected a .nemo/.ckpt path or a reference MagpieTTS, got {type(ckpt_path_or_model).__name__}")


def convert_in_memory(ckpt_path_or_model, dtype: str = "float32", tp_size: int = 1,
                      drop_lm_head_bias: bool = False, logits_dtype: str = "float32",
                      ffn_split: str = "replicate", without_local_transformer: bool = False) -> ConvertedCheckpoint:
    """Configs and per-rank weights without touching the disk."""
    c, sd, where = _source(ckpt_path_or_model)
    return convert_state_dict(c, sd, dtype=dtype, tp_size=tp_size, drop_lm_head_bias=drop_lm_head_bias,
                              logits_dtype=logits_dtype, ffn_split=ffn_split, where=where,
                              without_local_transformer=without_local_transformer)


def local_transformer_refusal(c: MagpieConfig, where: str) -> str:
    """The one line for a checkpoint whose local transformer the forks' decoder engine cannot hold."""
    return (f"{where}: local_transformer_type={c.local_transformer_type!r}: the forks' decoder engine has no local "
            "transformer (theirs is a separate engine exported from NeMo, convert_lt_to_trt.py / trtLocalTransformer."
            "cpp); convert the decoder alone with without_local_transformer=True (the engine then samples every "
            "codebook on its own, as NeMo with use_local_transformer_for_inference=False)")


def convert_state_dict(c: MagpieConfig, sd: Mapping[str, torch.Tensor], dtype: str = "float32", tp_size: int = 1,
                       drop_lm_head_bias: bool = False, logits_dtype: str = "float32",
                       ffn_split: str = "replicate", where: str = "checkpoint",
                       without_local_transformer: bool = False) -> ConvertedCheckpoint:
    """The TensorRT-LLM checkpoint of a validated NeMo state dict (see the module docstring for decoder_ce, the
    local transformer and frame stacking)."""
    from reference.model import check_weights

    if c.local_transformer is not None and not without_local_transformer:
        raise ConversionError(local_transformer_refusal(c, where))
    sd = check_weights(c, sd, where)  # the reference loader's own validation: the same weights pass both or neither
    enc_cfg, dec_cfg = build_configs(c, dtype, tp_size, drop_lm_head_bias, logits_dtype, ffn_split)
    td = DTYPES[dtype]
    out = ConvertedCheckpoint(enc_cfg, dec_cfg)
    for r in range(tp_size):
        ew = encoder_weights(c, sd, tp_size, r, ffn_split, where)
        dw = decoder_weights(c, sd, tp_size, r, ffn_split, drop_lm_head_bias, where)
        out.encoder_ranks.append({k: v.to(td).contiguous() for k, v in ew.items()})
        out.decoder_ranks.append({k: v.to(td).contiguous() for k, v in dw.items()})
    # not the engine's: the original tensors, the reference's dtype (the runner casts the rows it feeds)
    out.outside_engine = {k: sd[k].detach().contiguous() for k in outside_engine_names(c)}
    return out


def convert_checkpoint(ckpt_path_or_model, out_dir: Union[str, os.PathLike], dtype: str = "float32",
                       tp_size: int = 1, drop_lm_head_bias: bool = False, logits_dtype: str = "float32",
                       ffn_split: str = "replicate", overwrite: bool = False,
                       without_local_transformer: bool = False) -> Path:
    """Write ``out_dir/{encoder,decoder}/{config.json,rank{r}.safetensors}`` (and, for what the engine does not
    hold, ``out_dir/`` :data:`OUTSIDE_ENGINE_FILE`); atomic (temp dir, then rename)."""
    conv = convert_in_memory(ckpt_path_or_model, dtype=dtype, tp_size=tp_size, drop_lm_head_bias=drop_lm_head_bias,
                             logits_dtype=logits_dtype, ffn_split=ffn_split,
                             without_local_transformer=without_local_transformer)
    return write_converted(conv, out_dir, overwrite=overwrite)


def is_converted(path: Union[str, os.PathLike]) -> bool:
    """A real folder holding a checkpoint this tool converted (its config.json files carry ``magpie_parity``)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    for comp in ("encoder", "decoder"):
        cfg = p / comp / "config.json"
        try:
            if cfg.is_symlink() or not cfg.is_file() or cfg.stat().st_size > 16 * 2**20:
                return False
            if not isinstance(json.loads(cfg.read_bytes()).get("magpie_parity"), dict):
                return False
        except (OSError, ValueError, AttributeError, RecursionError):
            return False
    return True


def _check_replaceable(out: Path) -> None:
    """overwrite replaces only what this tool wrote: a converted checkpoint, or an empty folder."""
    if is_converted(out) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    raise ConversionError(f"{out}: exists and is not a checkpoint magpie-parity converted; overwrite only replaces "
                          "one it wrote (choose another output folder)")


def write_converted(conv: ConvertedCheckpoint, out_dir: Union[str, os.PathLike], overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from parity.files import honour_umask

    out = Path(out_dir)
    if os.path.lexists(out):
        if not overwrite:
            raise ConversionError(f"{out}: already exists (pass overwrite=True to replace it)")
        _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        honour_umask(tmp)  # mkdtemp's 0700 -> what a plain mkdir would give
        for comp, cfg, ranks in (("encoder", conv.encoder_config, conv.encoder_ranks),
                                 ("decoder", conv.decoder_config, conv.decoder_ranks)):
            d = tmp / comp
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg, indent=4, sort_keys=False) + "\n")
            for r, w in enumerate(ranks):
                save_file(w, str(d / f"rank{r}.safetensors"), metadata={"format": "pt"})
        if conv.outside_engine:
            f = tmp / OUTSIDE_ENGINE_FILE
            f.parent.mkdir()
            save_file(conv.outside_engine, str(f), metadata={"format": "pt"})
        if os.path.lexists(out):
            _check_replaceable(out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public API: load back
# ----------------------------------------------------------------------------------------------------------------


def _read_component(d: Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path}: missing (not a TensorRT-LLM checkpoint component)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{cfg_path}: expected a JSON object")
    mapping = cfg.get("mapping") or {}
    tp = mapping.get("tp_size", 1)
    pp = mapping.get("pp_size", 1)
    if pp != 1:
        raise ConversionError(f"{cfg_path}: mapping.pp_size={pp}: pipeline-parallel checkpoints are not supported")
    if not isinstance(tp, int) or tp < 1:
        raise ConversionError(f"{cfg_path}: mapping.tp_size={tp!r} is not a positive integer")
    ranks = []
    for r in range(tp):
        f = d / f"rank{r}.safetensors"
        if not f.is_file():
            raise ConversionError(f"{f}: missing shard (mapping.tp_size={tp} in {cfg_path})")
        try:
            ranks.append(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{f}: unreadable safetensors shard ({e})") from e
    extra = sorted(p.name for p in d.glob("rank*.safetensors") if p.name not in {f"rank{r}.safetensors" for r in range(tp)})
    if extra:
        raise ConversionError(f"{d}: shard files {extra} beyond mapping.tp_size={tp}")
    return cfg, ranks


def _merge(name: str, shards: list[torch.Tensor], kind: str, where: str, **kw) -> torch.Tensor:
    tp = len(shards)
    if tp == 1:
        return shards[0]
    if kind == "replicated":
        for r in range(1, tp):
            if shards[r].shape != shards[0].shape or not torch.equal(shards[r], shards[0]):
                raise ConversionError(f"{where}: replicated tensor '{name}' differs between rank0 and rank{r}")
        return shards[0]
    if kind == "qkv":
        d_head = kw["d_head"]
        parts = [s.reshape(3, -1, d_head, s.shape[-1]) for s in shards]
        return torch.cat(parts, 1).reshape(-1, shards[0].shape[-1])
    if kind == "rows":
        return torch.cat(shards, 0)
    if kind == "cols":
        return torch.cat(shards, 1)
    raise AssertionError(kind)


def _expect(cfg: dict, key: str, value: Any, where: str) -> None:
    if key not in cfg:
        raise ConversionError(f"{where}: config key '{key}' is missing")
    if cfg[key] != value:
        raise ConversionError(f"{where}: config key '{key}' is {cfg[key]!r} but the checkpoint metadata implies {value!r}")


def load_converted(ckpt_dir: Union[str, os.PathLike]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A converted checkpoint (any tp_size) -> (NeMo config dict, NeMo state dict), shards merged.

    Raises :class:`ConversionError` naming the missing shard, the config key that disagrees with the metadata or
    the weights, or the unknown tensor names.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a directory")
    enc_cfg, enc_ranks = _read_component(root / "encoder")
    dec_cfg, dec_ranks = _read_component(root / "decoder")
    where_e, where_d = str(root / "encoder" / "config.json"), str(root / "decoder" / "config.json")
    meta = enc_cfg.get("magpie_parity")
    if not isinstance(meta, dict) or "nemo_config" not in meta:
        raise ConversionError(
            f"{where_e}: no 'magpie_parity' metadata; only checkpoints written by trt.convert can be loaded back "
            "losslessly (the fork's own converter hard-codes the hyper-parameters and drops final_proj.bias)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{where_e}: magpie_parity.format_version {meta.get('format_version')!r} != {FORMAT_VERSION}")
    dmeta = dec_cfg.get("magpie_parity") or {}
    if dmeta.get("config_hash") != meta.get("config_hash"):
        raise ConversionError(f"{where_d}: magpie_parity.config_hash differs from the encoder's (mixed checkpoints?)")
    if len(enc_ranks) != len(dec_ranks):
        raise ConversionError(f"{root}: encoder has {len(enc_ranks)} shards, decoder {len(dec_ranks)}")
    nemo_cfg = meta["nemo_config"]
    ffn_split = meta.get("ffn_split", "replicate")
    tp = len(enc_ranks)
    has_bias = meta.get("lm_head_bias") == "kept"

    # Rebuild the MagpieConfig from the metadata (and what is kept beside the engine), then check the TRT-LLM keys
    # against it (names the key).
    outside = _read_outside(root, meta)
    c = _config_from_meta(meta, has_bias, where_e, outside)
    exp_enc, exp_dec = build_configs(c, dtype=enc_cfg.get("dtype", "float32"), tp_size=tp,
                                     logits_dtype=enc_cfg.get("logits_dtype", "float32"), ffn_split=ffn_split)
    for cfg, exp, where in ((enc_cfg, exp_enc, where_e), (dec_cfg, exp_dec, where_d)):
        for key in _CHECKED_KEYS:
            if key in exp:
                _expect(cfg, key, exp[key], where)
    if c.hash() != meta.get("config_hash"):
        raise ConversionError(f"{where_e}: magpie_parity.config_hash does not match magpie_parity.nemo_config")

    want = outside_engine_names(c)
    if sorted(outside) != want:
        extra, missing = sorted(set(outside) - set(want)), sorted(set(want) - set(outside))
        raise ConversionError(f"{root / OUTSIDE_ENGINE_FILE}: tensors do not match the config: missing {missing[:8]}, "
                              f"unknown {extra[:8]}")
    sd: dict[str, torch.Tensor] = {}
    sd.update(_unmap_encoder(c, enc_ranks, ffn_split, str(root / "encoder")))
    sd.update(_unmap_decoder(c, dec_ranks, ffn_split, str(root / "decoder")))
    sd.update(outside)
    return nemo_cfg, sd


def _read_outside(root: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors kept beside the engine (:data:`OUTSIDE_ENGINE_FILE`), if the metadata lists any."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = root / OUTSIDE_ENGINE_FILE
    oe = meta.get("outside_engine")
    if oe is None:
        if os.path.lexists(f):
            raise ConversionError(f"{f}: present, but magpie_parity in config.json lists nothing kept beside the "
                                  "engine (mixed checkpoints?)")
        return {}
    if not isinstance(oe, dict) or not isinstance(oe.get("parts"), list):
        raise ConversionError(f"{root / 'encoder' / 'config.json'}: magpie_parity.outside_engine is malformed")
    if f.is_symlink() or not f.is_file():
        raise ConversionError(f"{f}: missing: the {', '.join(map(str, oe['parts']))} the engine does not hold are "
                              "kept there (convert the checkpoint again)")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{f}: unreadable safetensors file ({e})") from e


# Keys whose value must agree with the metadata (hyper-parameters the engine is built from).
_CHECKED_KEYS = (
    "architecture", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_size",
    "intermediate_size", "norm_epsilon", "vocab_size", "vocab_sizes", "num_vocabs", "max_position_embeddings",
    "has_position_embedding", "has_model_final_layernorm", "encoder_hidden_size", "encoder_num_heads",
    "encoder_head_size", "cross_attention_num_heads", "cross_attention_head_size", "has_encoder_input_layernorm",
    "has_lm_head_bias", "pos_ff_kernel_size", "is_causal", "q_scaling", "mapping", "use_context_embeddings",
)


def _config_from_meta(meta: dict, has_bias: bool, where: str,
                      outside: Optional[Mapping[str, torch.Tensor]] = None) -> MagpieConfig:
    """MagpieConfig from the stored NeMo config, with weight shapes synthesised from it (shape-only tensors) and the
    tensors kept beside the engine (the baked table's sizes and lengths are read from their values)."""
    from reference.config import ConfigError

    try:
        nemo_cfg = meta["nemo_config"]
        enc = TransformerConfig.from_dict(nemo_cfg["encoder"], f"{where}: encoder")
        dec = TransformerConfig.from_dict(nemo_cfg["decoder"], f"{where}: decoder")
        fsf = int(nemo_cfg.get("frame_stacking_factor", 1))
        V = int(nemo_cfg["forced_num_all_tokens_per_codebook"])
        # from_nemo reads sizes from weight shapes; meta tensors give it the shapes without memory.
        n_text = int(meta["text_vocab_size"])
        n_cb = int(meta["num_codebooks"])
        shapes = {"text_embedding.weight": (n_text, enc.d_model), "final_proj.weight": (n_cb * V * fsf, dec.d_model)}
        for k in range(n_cb * fsf):
            shapes[f"audio_embeddings.{k}.weight"] = (V, dec.d_model)
        if has_bias:
            shapes["final_proj.bias"] = (n_cb * V * fsf,)
        for stack, t in (("encoder", enc), ("decoder", dec)):  # from_nemo counts the layers the weights hold
            for i in range(t.n_layers):
                shapes[f"{stack}.layers.{i}.norm_self.weight"] = (t.d_model,)
        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        fake.update(outside or {})
        return MagpieConfig.from_nemo(nemo_cfg, fake, where=where)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: magpie_parity.nemo_config is not a valid MagpieTTS config ({e})") from e


def _take(ranks: list[dict[str, torch.Tensor]], name: str, where: str, used: set) -> list[torch.Tensor]:
    out = []
    for r, w in enumerate(ranks):
        if name not in w:
            raise ConversionError(f"{where}/rank{r}.safetensors: tensor '{name}' is missing")
        out.append(w[name])
    used.add(name)
    return out


def _check_shape(name: str, t: torch.Tensor, shape: tuple, where: str, key: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(
            f"{where}: tensor '{name}' has shape {tuple(t.shape)} but config.json implies {tuple(shape)} "
            f"(check config key '{key}')")
    return t


def _finish(ranks, used, where):
    for r, w in enumerate(ranks):
        unknown = sorted(set(w) - used)
        if unknown:
            raise ConversionError(f"{where}/rank{r}.safetensors: unknown tensor names {unknown[:8]}"
                                  f"{' ...' if len(unknown) > 8 else ''}")


def _unmap_ffn(c_t: TransformerConfig, ranks, p, q, ffn_split, where, used, sd):
    kind_p, kind_o = ("rows", "cols") if ffn_split == "split" else ("replicated", "replicated")
    proj = _merge(f"{q}.pos_ff.proj.weight", _take(ranks, f"{q}.pos_ff.proj.weight", where, used), kind_p, where)
    o_net = _merge(f"{q}.pos_ff.o_net.weight", _take(ranks, f"{q}.pos_ff.o_net.weight", where, used), kind_o, where)
    k = c_t.kernel_size
    _check_shape(f"{q}.pos_ff.proj.weight", proj, (c_t.d_ffn, c_t.d_model, k, 1), where, "intermediate_size")
    _check_shape(f"{q}.pos_ff.o_net.weight", o_net, (c_t.d_model, c_t.d_ffn, k, 1), where, "intermediate_size")
    sd[f"{p}.pos_ff.proj.conv.weight"] = proj.squeeze(3)
    sd[f"{p}.pos_ff.o_net.conv.weight"] = o_net.squeeze(3)


def _unmap_attn_self(t: TransformerConfig, ranks, p, q_attn, where, used, sd):
    H, Dh, d = t.sa_n_heads, t.sa_d_head, t.d_model
    qkv = _merge(f"{q_attn}.qkv.weight", _take(ranks, f"{q_attn}.qkv.weight", where, used), "qkv", where, d_head=Dh)
    dense = _merge(f"{q_attn}.dense.weight", _take(ranks, f"{q_attn}.dense.weight", where, used), "cols", where)
    sd[f"{p}.self_attention.qkv_net.weight"] = _check_shape(f"{q_attn}.qkv.weight", qkv, (3 * H * Dh, d), where,
                                                            "num_attention_heads")
    sd[f"{p}.self_attention.o_net.weight"] = _check_shape(f"{q_attn}.dense.weight", dense, (d, H * Dh), where,
                                                          "num_attention_heads")


def _rep(ranks, name, where, used, shape, key):
    t = _merge(name, _take(ranks, name, where, used), "replicated", where)
    return _check_shape(name, t, shape, where, key)


def _unmap_encoder(c: MagpieConfig, ranks, ffn_split, where) -> dict[str, torch.Tensor]:
    t, used, sd = c.encoder, set(), {}
    d = t.d_model
    sd["text_embedding.weight"] = _rep(ranks, "embedding.vocab_embedding.weight", where, used,
                                       (c.num_text_tokens, d), "vocab_size")
    if t.use_learnable_pos_emb:
        sd["encoder.position_embeddings.weight"] = _rep(ranks, "embedding.position_embedding.weight", where, used,
                                                        (t.max_length_causal_mask, d), "max_position_embeddings")
    for i in range(t.n_layers):
        p, q = f"encoder.layers.{i}", f"encoder_layers.{i}"
        sd[f"{p}.norm_self.weight"] = _rep(ranks, f"{q}.attention_layernorm.weight", where, used, (d,), "hidden_size")
        _unmap_attn_self(t, ranks, p, f"{q}.attention", where, used, sd)
        sd[f"{p}.norm_pos_ff.weight"] = _rep(ranks, f"{q}.pos_ff_layernorm.weight", where, used, (d,), "hidden_size")
        _unmap_ffn(t, ranks, p, q, ffn_split, where, used, sd)
    if t.apply_norm_out:
        sd["encoder.norm_out.weight"] = _rep(ranks, "final_layernorm.weight", where, used, (d,), "hidden_size")
    _finish(ranks, used, where)
    return sd


def _unmap_decoder(c: MagpieConfig, ranks, ffn_split, where) -> dict[str, torch.Tensor]:
    t, used, sd = c.decoder, set(), {}
    d, V = t.d_model, c.num_all_tokens_per_codebook
    n_tables = c.num_audio_codebooks * c.frame_stacking_factor
    table = _rep(ranks, "embedding.vocab_embedding.weight", where, used, (n_tables * V + 1, d), "vocab_size")
    if table[-1].abs().max() != 0:
        raise ConversionError(f"{where}: the last row of 'embedding.vocab_embedding.weight' (CFG service token) "
                              "is not all zeros")
    for k in range(n_tables):
        sd[f"audio_embeddings.{k}.weight"] = table[k * V:(k + 1) * V].clone()
    if t.use_learnable_pos_emb:
        sd["decoder.position_embeddings.weight"] = _rep(ranks, "embedding.position_embedding.weight", where, used,
                                                        (t.max_length_causal_mask, d), "max_position_embeddings")
    Hx, Dx = t.xa_n_heads, t.xa_head_dim
    for i in range(t.n_layers):
        p, q = f"decoder.layers.{i}", f"decoder_layers.{i}"
        sd[f"{p}.norm_self.weight"] = _rep(ranks, f"{q}.self_attention_layernorm.weight", where, used, (d,), "hidden_size")
        _unmap_attn_self(t, ranks, p, f"{q}.self_attention", where, used, sd)
        sd[f"{p}.norm_xattn_query.weight"] = _rep(ranks, f"{q}.cross_attention_layernorm.weight", where, used, (d,),
                                                  "hidden_size")
        if t.apply_norm_to_cond:
            sd[f"{p}.norm_xattn_memory.weight"] = _rep(ranks, f"{q}.cross_attention_memory_layernorm.weight", where,
                                                       used, (t.xa_d_memory,), "encoder_hidden_size")
        name = f"{q}.cross_attention.qkv.weight"
        qkv = _check_shape(name, _merge(name, _take(ranks, name, where, used), "qkv", where, d_head=Dx),
                           (3 * Hx * Dx, d), where, "cross_attention_num_heads")
        sd[f"{p}.cross_attention.q_net.weight"] = qkv[: Hx * Dx].clone()
        sd[f"{p}.cross_attention.kv_net.weight"] = qkv[Hx * Dx:].clone()
        name = f"{q}.cross_attention.dense.weight"
        sd[f"{p}.cross_attention.o_net.weight"] = _check_shape(
            name, _merge(name, _take(ranks, name, where, used), "cols", where), (d, Hx * Dx), where,
            "cross_attention_num_heads")
        sd[f"{p}.norm_pos_ff.weight"] = _rep(ranks, f"{q}.pos_ff_layernorm.weight", where, used, (d,), "hidden_size")
        _unmap_ffn(t, ranks, p, q, ffn_split, where, used, sd)
    if t.apply_norm_out:
        sd["decoder.norm_out.weight"] = _rep(ranks, "final_layernorm.weight", where, used, (d,), "hidden_size")
    out = n_tables * V
    sd["final_proj.weight"] = _check_shape(
        "lm_head.weight", _merge("lm_head.weight", _take(ranks, "lm_head.weight", where, used), "rows", where),
        (out, d), where, "vocab_size")
    if c.final_proj_bias:
        sd["final_proj.bias"] = _check_shape(
            "lm_head.bias", _merge("lm_head.bias", _take(ranks, "lm_head.bias", where, used), "rows", where),
            (out,), where, "has_lm_head_bias")
    _finish(ranks, used, where)
    return sd


def reference_from_trtllm(ckpt_dir: Union[str, os.PathLike]):
    """A reference ``MagpieTTS`` holding the weights of a converted TensorRT-LLM checkpoint (any tp_size).

    Weights stored in float16/bfloat16 are loaded into the float32 reference, i.e. the result carries the
    conversion's rounding but computes in float32.
    """
    from reference.model import MagpieTTS

    nemo_cfg, sd = load_converted(ckpt_dir)
    return MagpieTTS.from_state_dict(nemo_cfg, sd, where=str(ckpt_dir))
