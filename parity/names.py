"""The one name table: canonical names <-> reference code <-> NeMo 3.0.0 modules <-> TensorRT-LLM tensor names.

Canonical names are the reference's module paths (``MagpieTTS.capture_points()`` in ``reference/model.py`` is the
source; :func:`canonical_names` expands this table to the same list, and a test keeps the two equal for every
fixture model). For each canonical template the table gives

* where the reference computes it (``reference/<file>.py: <Class.method>``),
* its NeMo 3.0.0 counterpart: the module path in ``MagpieTTSModel``, the module's class and how the tensor is
  taken from the hook (forward-hook output, a tuple element, the forward-pre-hook's positional argument, the
  ``process_batch`` return value). ``parity/nemo_capture.py`` registers its hooks from this table and nothing
  else,
* per TensorRT-LLM generation (:data:`GENERATION_INFO`), the debug tensor name, the file and commit that
  registers it, and the layout transform it needs (:class:`TrtInfo`).

Engine inputs/outputs that are not layer activations but carry values the parity tools read (the attention prior's
focus and scores) are in :data:`ENGINE_IO`, under the inference-loop names of :data:`INFERENCE`.

``docs/names.md`` is rendered from this module; regenerate it after any edit here (a test compares the two)::

    python -c "from parity.names import markdown_table; print(markdown_table())" > docs/names.md

Layout of engine values (``remove_input_padding`` engines, trtllm.md 1.3): packed ``[num_tokens, hidden]``,
context requests' tokens first, then one token per generating sequence; slice with ``host_context_lengths`` /
``host_request_types`` / ``request_ids`` from the same dump, then ``[B, T, hidden]``. Decoder rows come in
(cond, uncond) pairs when CFG is on (fork). Gathered tensors (``logits_before_lmhead``, ``logits``) hold one row
per sequence per step (the last token). Debug outputs (``register_network_output``, exported only by engines built
with ``--enable_debug_output``) are cast to the model dtype; ``mark_output`` tensors are always engine outputs.

This module imports nothing but the standard library (no torch, no NeMo, nothing from ``trt``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Optional

# ------------------------------------------------------------------------------------------------ generations

RMITTAL = "rmittal-github/TensorRT-LLM"
ANAND = "anand-nv/TensorRT-LLM"
UPSTREAM = "NVIDIA/TensorRT-LLM"
T5TTS_MODEL = "tensorrt_llm/models/t5tts/model.py"
ENC_DEC_MODEL = "tensorrt_llm/models/enc_dec/model.py"
RUNTIME_BUFFERS = "cpp/tensorrt_llm/batch_manager/runtimeBuffers.cpp"


@dataclass(frozen=True)
class Generation:
    """One TensorRT-LLM model version whose tensor names differ from the others."""

    name: str
    repo: str
    commit: str  # full hash where the stored sources give it, else the prefix the specs cite
    path: str
    summary: str
    detection: str  # how trt/ingest.py's detect_generation tells it from the others

    @property
    def source(self) -> str:
        return f"{self.repo}@{self.commit}:{self.path}"


GENERATION_INFO: tuple[Generation, ...] = (
    Generation(
        "fork_c6ff2312", RMITTAL, "c6ff2312a81d4fac25be63b9b965c7d5ad4c01c9", T5TTS_MODEL,
        "oldest t5tts model (`examples/t5tts` era): per-layer debug outputs in both engines; `logits` is the "
        "lm_head output",
        "a `decoder_layers.{i}.pos_ff_output` name"),
    Generation(
        "fork_e7109d5", RMITTAL, "e7109d5b53686dda8363697e3ffb54eccac84197", T5TTS_MODEL,
        "mask-based attention prior: encoder debug outputs only, the decoder registers none; outputs `logits` "
        "(lm_head) and `scores` (layer-averaged raw cross-attention logits). anand-nv/TensorRT-LLM@"
        "0407dc5c7ef45c3fc9ccca0112410879efb10185 has the same decoder I/O",
        "`scores` among the names (a dump holding only `logits` also reads as this generation)"),
    Generation(
        "fork_497d0e69", RMITTAL, "497d0e69", T5TTS_MODEL,
        "in-kernel attention prior: input `attention_prior_focus`, output `attention_prior_scores`, inputs "
        "`decoder_context_features(_mask)`; the lm_head is commented out, so `logits` is the final-LN hidden state",
        "`attention_prior_*` names with `decoder_context_features(_mask)`, or with `logits` as wide as "
        "`encoder_output`"),
    Generation(
        "fork_19ff87be", ANAND, "19ff87beb765923aba3fdfca0606cdb7d1b37802", T5TTS_MODEL,
        "in-kernel attention prior with both prior tensors as engine *inputs* (`attention_prior_focus` int32, "
        "`attention_prior_scores` fp32, one entry / five entries per generation sequence, the scores written by the "
        "cross-attention kernels of layers 4, 6, 10); lm_head present, so `logits` are real logits; no "
        "`decoder_context_features`; the decoder registers no debug outputs",
        "`attention_prior_*` names without `decoder_context_features(_mask)` and with `logits` wider than "
        "`encoder_output`"),
    Generation(
        "upstream_old", UPSTREAM, "04a2cac", ENC_DEC_MODEL,
        "enc_dec model, layers as `encoder_layers.{i}` / `decoder_layers.{i}`, FFN as `mlp_output`",
        "a `decoder_layers.{i}.mlp_output` name"),
    Generation(
        "upstream_new", UPSTREAM, "main", ENC_DEC_MODEL,
        "enc_dec model, layers under `transformer.layers.{i}` in both engines (`mlp_output` is ambiguous "
        "without the engine side)",
        "a `transformer.layers.` name"),
)
GENERATIONS: tuple[str, ...] = tuple(g.name for g in GENERATION_INFO)
_GEN = {g.name: g for g in GENERATION_INFO}


def generation_info(name: str) -> Generation:
    if name not in _GEN:
        raise UnknownNameError(f"unknown generation {name!r}; known: {list(GENERATIONS)}")
    return _GEN[name]


class UnknownNameError(KeyError):
    """A name is not in the table; the message lists near matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------------------------------------ NeMo side

_SELECT_RE = re.compile(r"^(output|args)((?:\[(?:\d+|'[A-Za-z_]\w*')\])*)$")
_SELECT_ITEM = re.compile(r"\[(\d+|'[A-Za-z_]\w*')\]")


@dataclass(frozen=True)
class NemoPoint:
    """Where NeMo 3.0.0 computes a canonical tensor and how a hook takes it.

    hook "forward": ``select`` indexes the module's return value (``output``); "forward_pre": the module's positional
    arguments (``args``); "return": ``output`` is what ``MagpieTTSModel.process_batch(batch)`` returns (module None).
    """

    module: Optional[str]  # dotted path in NeMo's MagpieTTSModel (None: the process_batch return value)
    select: str  # "output", "output[0]", "output[1][0]", "output['output']", "args[0]"
    hook: str  # "forward", "forward_pre" or "return"
    cls: str = ""  # the module's class (or the method) in NeMo 3.0.0, e.g. "transformer_2501.SelfAttention"

    def keys(self) -> tuple:
        m = _SELECT_RE.match(self.select)
        if m is None:
            raise ValueError(f"NeMo selector {self.select!r} is not of the form output[...] / args[...]")
        return tuple(int(k) if k.isdigit() else k.strip("'") for k in _SELECT_ITEM.findall(m.group(2)))

    def pick(self, value: Any) -> Any:
        """Apply ``select`` to what the hook receives (the output, or the positional args of a pre-hook)."""
        for k in self.keys():
            value = value[k]
        return value


# ------------------------------------------------------------------------------------------------ canonical points


@dataclass(frozen=True)
class CanonicalPoint:
    """One canonical capture template (a module path of the reference model; ``{i}`` = layer index)."""

    template: str
    stack: Optional[str]  # "encoder" / "context_encoder" / "decoder": {i} runs over that stack's layers; None: none
    reference: str  # "reference/<file>.py: <Class.method>" (checked to exist by the tests)
    nemo: NemoPoint
    shape: str
    note: str = ""
    # "context_encoder": the point exists only in models that run a context encoder (decoder_ce, not baked)
    requires: Optional[str] = None


_FWD = "forward"
_NO_TRT_CONTEXT = ("No TensorRT-LLM generation runs a context encoder: the forks take its output ready-made as the "
                   "decoder input `decoder_context_features` (fork_497d0e69), so no engine exports these tensors")
CANONICAL: tuple[CanonicalPoint, ...] = (
    CanonicalPoint(
        "text_embedding", None, "reference/model.py: MagpieTTS.encode_text",
        NemoPoint("text_embedding", "output", _FWD, "torch.nn.Embedding"), "(B, T_text, D)",
        "nn.Embedding lookup of the text tokens, before the encoder's learned positions"),
    CanonicalPoint(
        "encoder.layers.{i}.self_attention", "encoder", "reference/model.py: SelfAttention.forward",
        NemoPoint("encoder.layers.{i}.self_attention", "output[0]", _FWD, "transformer_2501.SelfAttention"),
        "(B, T_text, D)", "o_net output before the residual add; NeMo returns (y, [attn_prob, attn_score])"),
    CanonicalPoint(
        "encoder.layers.{i}.pos_ff", "encoder", "reference/model.py: PositionwiseConvFF.forward",
        NemoPoint("encoder.layers.{i}.pos_ff", "output", _FWD, "ffn_modules.PositionwiseConvFF"),
        "(B, T_text, D)", "conv FFN output before the residual add"),
    CanonicalPoint(
        "encoder.layers.{i}", "encoder", "reference/model.py: TransformerLayer.forward",
        NemoPoint("encoder.layers.{i}", "output['output']", _FWD, "transformer_2501.TransformerLayer"),
        "(B, T_text, D)", "residual stream after the layer (masked); NeMo returns a dict"),
    CanonicalPoint(
        "encoder.norm_out", None, "reference/model.py: Transformer.forward",
        NemoPoint("encoder.norm_out", "output", _FWD, "torch.nn.LayerNorm"), "(B, T_text, D)",
        "the encoder's final LayerNorm = the text encoder output (cross-attention memory)"),
    CanonicalPoint(
        "context_encoder.layers.{i}.self_attention", "context_encoder", "reference/model.py: SelfAttention.forward",
        NemoPoint("context_encoder.layers.{i}.self_attention", "output[0]", _FWD, "transformer_2501.SelfAttention"),
        "(B, T_ctx, D)", "decoder_ce only (absent when the speaker context is baked): the context encoder's "
        "self-attention over the embedded context-audio frames (BOS/EOS added, stacked frames averaged); o_net "
        "output before the residual add. " + _NO_TRT_CONTEXT, requires="context_encoder"),
    CanonicalPoint(
        "context_encoder.layers.{i}.pos_ff", "context_encoder", "reference/model.py: PositionwiseConvFF.forward",
        NemoPoint("context_encoder.layers.{i}.pos_ff", "output", _FWD, "ffn_modules.PositionwiseConvFF"),
        "(B, T_ctx, D)", "decoder_ce only: the context encoder's conv FFN output before the residual add",
        requires="context_encoder"),
    CanonicalPoint(
        "context_encoder.layers.{i}", "context_encoder", "reference/model.py: TransformerLayer.forward",
        NemoPoint("context_encoder.layers.{i}", "output['output']", _FWD, "transformer_2501.TransformerLayer"),
        "(B, T_ctx, D)", "decoder_ce only: residual stream after the context-encoder layer (masked)",
        requires="context_encoder"),
    CanonicalPoint(
        "context_encoder.norm_out", None, "reference/model.py: Transformer.forward",
        NemoPoint("context_encoder.norm_out", "output", _FWD, "torch.nn.LayerNorm"), "(B, T_ctx, D)",
        "decoder_ce only: the context encoder's final LayerNorm = the decoder's context prefix (padded rows are "
        "exactly 0 after the mask in decoder_input); a baked checkpoint stores this tensor per speaker "
        "(baked_context_embedding) and runs no context encoder", requires="context_encoder"),
    CanonicalPoint(
        "decoder_input", None, "reference/model.py: MagpieTTS.process_batch",
        NemoPoint("decoder", "args[0]", "forward_pre", "transformer_2501.Transformer"), "(B, T_ctx + T_audio, D)",
        "context prefix + audio-frame embeddings (mean over codebooks) before the decoder's learned positions; "
        "a HookPoint in the reference, the decoder's first positional argument in NeMo"),
    CanonicalPoint(
        "decoder.layers.{i}.self_attention", "decoder", "reference/model.py: SelfAttention.forward",
        NemoPoint("decoder.layers.{i}.self_attention", "output[0]", _FWD, "transformer_2501.SelfAttention"),
        "(B, T, D)", "causal; o_net output before the residual add"),
    CanonicalPoint(
        "decoder.layers.{i}.cross_attention.attn_probs", "decoder", "reference/model.py: CrossAttention.forward",
        NemoPoint("decoder.layers.{i}.cross_attention", "output[1][0]", _FWD, "transformer_2501.CrossAttention"),
        "(B, H, T, T_text)", "post-prior softmax probabilities (a HookPoint inside CrossAttention); no engine "
        "exports them (they live inside the attention plugin)"),
    CanonicalPoint(
        "decoder.layers.{i}.cross_attention", "decoder", "reference/model.py: CrossAttention.forward",
        NemoPoint("decoder.layers.{i}.cross_attention", "output[0]", _FWD, "transformer_2501.CrossAttention"),
        "(B, T, D)", "o_net output before the residual add"),
    CanonicalPoint(
        "decoder.layers.{i}.pos_ff", "decoder", "reference/model.py: PositionwiseConvFF.forward",
        NemoPoint("decoder.layers.{i}.pos_ff", "output", _FWD, "ffn_modules.PositionwiseConvFF"),
        "(B, T, D)", "causal conv FFN output before the residual add"),
    CanonicalPoint(
        "decoder.layers.{i}", "decoder", "reference/model.py: TransformerLayer.forward",
        NemoPoint("decoder.layers.{i}", "output['output']", _FWD, "transformer_2501.TransformerLayer"),
        "(B, T, D)", "residual stream after the layer (masked)"),
    CanonicalPoint(
        "decoder.norm_out", None, "reference/model.py: Transformer.forward",
        NemoPoint("decoder.norm_out", "output", _FWD, "torch.nn.LayerNorm"), "(B, T, D)",
        "the decoder's final LayerNorm, every position"),
    CanonicalPoint(
        "final_proj", None, "reference/model.py: MagpieTTS.process_batch",
        NemoPoint("final_proj", "output", _FWD, "torch.nn.Linear"), "(B, T, C * V)",
        "output projection (with bias) over every decoder position, context prefix included"),
    CanonicalPoint(
        "logits", None, "reference/model.py: MagpieTTS.process_batch",
        NemoPoint(None, "output['logits']", "return", "magpietts.MagpieTTSModel.process_batch"), "(B, T_audio, C * V)",
        "final_proj after the context positions (a HookPoint); in infer dumps one step's CFG-combined logits "
        "(B, 1, C * V) before sampling edits (generate_speech dumps: the same, steps counted over all chunks)"),
)
_POINT = {p.template: p for p in CANONICAL}


def canonical_names(n_enc_layers: int, n_dec_layers: int, n_ctx_layers: int = 0) -> list[str]:
    """The table's canonical templates expanded for a model, in execution order (= ``MagpieTTS.capture_points()``).

    Consecutive templates of one stack form that stack's per-layer block, repeated for each layer.
    ``n_ctx_layers``: the context encoder's layer count in a ``decoder_ce`` model that runs it; 0 (the default) for
    other model types and for baked speaker tables, which drops every ``requires="context_encoder"`` point."""
    counts = {"encoder": n_enc_layers, "decoder": n_dec_layers, "context_encoder": n_ctx_layers}
    points = [p for p in CANONICAL if p.requires is None or (p.requires == "context_encoder" and n_ctx_layers > 0)]
    out: list[str] = []
    k = 0
    while k < len(points):
        stack = points[k].stack
        if stack is None:
            out.append(points[k].template)
            k += 1
            continue
        j = k
        while j < len(points) and points[j].stack == stack:
            j += 1
        for i in range(counts[stack]):
            out += [_fill(p.template, i) for p in points[k:j]]
        k = j
    return out


def nemo_hook_points(n_enc_layers: int, n_dec_layers: int, n_ctx_layers: int = 0) -> list[tuple[str, NemoPoint]]:
    """(canonical name, NeMo point with the layer index filled in) in execution order; forward and pre hooks only
    (the ``return`` points are read from ``process_batch``'s return value: :func:`nemo_return_points`)."""
    return [(n, p) for n, p in _nemo_points(n_enc_layers, n_dec_layers, n_ctx_layers) if p.hook != "return"]


def nemo_return_points() -> list[tuple[str, NemoPoint]]:
    """(canonical name, NeMo point) of the tensors taken from ``MagpieTTSModel.process_batch``'s return value."""
    return [(p.template, p.nemo) for p in CANONICAL if p.nemo.hook == "return"]


def _nemo_points(n_enc_layers: int, n_dec_layers: int, n_ctx_layers: int = 0) -> list[tuple[str, NemoPoint]]:
    nm = NameMap(n_enc_layers, n_dec_layers, n_ctx_layers)
    return [(n, nm.nemo_path(n)) for n in canonical_names(n_enc_layers, n_dec_layers, n_ctx_layers)]


# ------------------------------------------------------------------------------------------------ TensorRT-LLM


@dataclass(frozen=True)
class TrtInfo:
    """How one TensorRT-LLM debug tensor relates to its canonical tensor."""

    engine: str  # "encoder" or "decoder"
    layout: str  # "packed_tokens" ([num_tokens, hidden] -> [B, T, hidden]) or "last_token" ([num_seq, N] per step)
    cfg_pairs: bool  # rows come in (cond, uncond) pairs when CFG is on
    per_step: bool  # decoder: context phase then one token per sequence per generation step
    final_ln: str  # "pre", "post" (value is after the stack's final LayerNorm) or "n/a"
    add_positions: bool = False  # engine value = canonical + learned position embedding
    note: str = ""


@dataclass(frozen=True)
class TrtName:
    """One (canonical template, generation) -> TensorRT-LLM tensor name row."""

    canonical: str
    generation: str
    trt: str
    info: TrtInfo
    where: str  # the symbol in the generation's source file that registers / marks it

    @property
    def source(self) -> str:
        return f"{generation_info(self.generation).source} ({self.where})"


_ENC = dict(engine="encoder", layout="packed_tokens", cfg_pairs=False, per_step=False)
_DEC = dict(engine="decoder", layout="packed_tokens", cfg_pairs=True, per_step=True)
_LAST = dict(engine="decoder", layout="last_token", cfg_pairs=True, per_step=True)

_ROWS: list[TrtName] = []


def _add(canonical: str, gens, trt: str, info: TrtInfo, where) -> None:
    """where: one string for every generation, or {generation: string}."""
    for g in gens:
        _ROWS.append(TrtName(canonical, g, trt, info, where[g] if isinstance(where, dict) else where))


_FORK = ("fork_c6ff2312", "fork_e7109d5", "fork_497d0e69", "fork_19ff87be")
_UP = ("upstream_old", "upstream_new")
_RNO = "register_network_output"
_EMB_NOTE = "EncoderDecoderEmbedding output: token embedding plus the learned position embedding"
_add("text_embedding", ("fork_c6ff2312",) + _UP, "embedding_layer_output",
     TrtInfo(**_ENC, final_ln="pre", add_positions=True, note=_EMB_NOTE),
     {"fork_c6ff2312": f"T5TTSEncoderModel.forward: {_RNO}('embedding_layer_output')",
      "upstream_old": f"EncoderModel.forward: {_RNO}('embedding_layer_output')",
      "upstream_new": f"EncoderModel.forward: {_RNO}('embedding_layer_output')"})
_add("encoder.layers.{i}.self_attention", _FORK + ("upstream_old",), "encoder_layers.{i}.attention_output",
     TrtInfo(**_ENC, final_ln="pre", note="BertAttention dense output, before the residual add"),
     {**{g: f"T5TTSEncoderLayer.forward: {_RNO}('attention_output')" for g in _FORK},
      "upstream_old": f"EncoderLayer.forward: {_RNO}('attention_output')"})
_add("encoder.layers.{i}.self_attention", ("upstream_new",), "transformer.layers.{i}.attention_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"),
     f"EncoderLayer.forward: {_RNO}('attention_output')")
_add("encoder.layers.{i}.pos_ff", _FORK, "encoder_layers.{i}.pos_ff_output",
     TrtInfo(**_ENC, final_ln="pre", note="conv FFN output before the residual add; the fork convolves the packed "
                                          "stream, so k>1 mixes neighbouring requests at their borders"),
     f"T5TTSEncoderLayer.forward: {_RNO}('pos_ff_output')")
_add("encoder.layers.{i}.pos_ff", ("upstream_old",), "encoder_layers.{i}.mlp_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"), f"EncoderLayer.forward: {_RNO}('mlp_output')")
_add("encoder.layers.{i}.pos_ff", ("upstream_new",), "transformer.layers.{i}.mlp_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"), f"EncoderLayer.forward: {_RNO}('mlp_output')")
_add("encoder.norm_out", GENERATIONS, "encoder_output",
     TrtInfo(**_ENC, final_ln="post", note="engine output after final_layernorm"),
     {**{g: "T5TTSEncoderModel.forward: mark_output('encoder_output')" for g in _FORK},
      **{g: "EncoderModel.forward: mark_output('encoder_output')" for g in _UP}})
_add("decoder_input", ("fork_c6ff2312",) + _UP, "embedding_layer_output",
     TrtInfo(**_DEC, final_ln="pre", add_positions=True,
             note=_EMB_NOTE + "; mean of the per-codebook embeddings; CFG uncond rows use the zero service token"),
     {"fork_c6ff2312": f"T5TTSDecoderModel.forward: {_RNO}('embedding_layer_output')",
      "upstream_old": f"DecoderModel.forward: {_RNO}('embedding_layer_output')",
      "upstream_new": f"DecoderModel.forward: {_RNO}('embedding_layer_output')"})
_add("decoder_input", ("fork_497d0e69",), "decoder_context_features",
     TrtInfo(**_DEC, final_ln="pre",
             note="engine input, not a debug output: decoder_ce prompts (context prefix + BOS row), used where "
                  "decoder_context_features_mask is set in place of the mean codebook embedding, before the learned "
                  "positions; ingested at step 0 only (a CFG unconditional prompt without feature rows is the zero "
                  "service token); the generation tokens' rows are not the decoder input"),
     "T5TTSDecoderModel.prepare_inputs: Tensor('decoder_context_features') with use_context_embeddings; "
     "EncoderDecoderEmbedding: where(decoder_context_features_mask, decoder_context_features, x)")
for _kind in ("self_attention", "cross_attention"):
    _add(f"decoder.layers.{{i}}.{_kind}", ("fork_c6ff2312", "upstream_old"), f"decoder_layers.{{i}}.{_kind}_output",
         TrtInfo(**_DEC, final_ln="pre", note="dense output, before the residual add"),
         {"fork_c6ff2312": f"T5TTSDecoderLayer.forward: {_RNO}('{_kind}_output')",
          "upstream_old": f"DecoderLayer.forward: {_RNO}('{_kind}_output')"})
    _add(f"decoder.layers.{{i}}.{_kind}", ("upstream_new",), f"transformer.layers.{{i}}.{_kind}_output",
         TrtInfo(**_DEC, final_ln="pre", note="dense output, before the residual add"),
         f"DecoderLayer.forward: {_RNO}('{_kind}_output')")
_add("decoder.layers.{i}.pos_ff", ("fork_c6ff2312",), "decoder_layers.{i}.pos_ff_output",
     TrtInfo(**_DEC, final_ln="pre", note="conv FFN output, before the residual add"),
     f"T5TTSDecoderLayer.forward: {_RNO}('pos_ff_output')")
_add("decoder.layers.{i}.pos_ff", ("upstream_old",), "decoder_layers.{i}.mlp_output",
     TrtInfo(**_DEC, final_ln="pre", note="before the residual add"), f"DecoderLayer.forward: {_RNO}('mlp_output')")
_add("decoder.layers.{i}.pos_ff", ("upstream_new",), "transformer.layers.{i}.mlp_output",
     TrtInfo(**_DEC, final_ln="pre", note="before the residual add"), f"DecoderLayer.forward: {_RNO}('mlp_output')")
_add("decoder.layers.{i}", ("fork_c6ff2312",) + _UP, "decoder_layer_{i}_output",
     TrtInfo(**_DEC, final_ln="pre", note="residual stream after the layer (registered on the root model)"),
     {"fork_c6ff2312": f"T5TTSDecoderModel.forward: {_RNO}(f'decoder_layer_{{i}}_output')",
      "upstream_old": f"DecoderModel.forward: {_RNO}(f'decoder_layer_{{i}}_output')",
      "upstream_new": f"DecoderModel.forward: {_RNO}(f'decoder_layer_{{i}}_output')"})
_add("decoder.norm_out", ("fork_c6ff2312",) + _UP, "logits_before_lmhead",
     TrtInfo(**_LAST, final_ln="post", note="after final_layernorm and gather_last_token_logits"),
     {"fork_c6ff2312": f"T5TTSDecoderModel.forward: {_RNO}('logits_before_lmhead')",
      "upstream_old": f"DecoderModel.forward: {_RNO}('logits_before_lmhead')",
      "upstream_new": f"DecoderModel.forward: {_RNO}('logits_before_lmhead')"})
_add("decoder.norm_out", ("fork_497d0e69",), "logits",
     TrtInfo(**_LAST, final_ln="post", note="lm_head commented out: the 'logits' output is the final-LN hidden state"),
     "T5TTSDecoderModel.forward: mark_output('logits') of the gathered final-LN hidden state")
_LOGITS_NOTE = ("lm_head output of the last token before CFG combination (cond, uncond rows); step s <-> reference "
                "logits[:, s]; the fork drops final_proj.bias unless converted with it")
_add("logits", ("fork_c6ff2312", "fork_e7109d5") + _UP, "logits", TrtInfo(**_LAST, final_ln="post", note=_LOGITS_NOTE),
     {"fork_c6ff2312": "T5TTSDecoderModel.forward: lm_head, mark_output('logits')",
      "fork_e7109d5": "T5TTSDecoderModel.forward: lm_head, mark_output('logits')",
      "upstream_old": "DecoderModel.forward: lm_head, mark_output('logits')",
      "upstream_new": "DecoderModel.forward: lm_head, mark_output('logits')"})
_add("logits", ("fork_19ff87be",), "logits", TrtInfo(**_LAST, final_ln="post", note=_LOGITS_NOTE),
     "T5TTSDecoderModel.forward: lm_head (ColumnLinear, bias only with has_lm_head_bias, default False) on "
     "gather_last_token_logits, mark_output('logits', logits_dtype)")

TRT_NAMES: tuple[TrtName, ...] = tuple(_ROWS)


# ------------------------------------------------------------------------------------------------ inference loop


@dataclass(frozen=True)
class InferencePoint:
    """A name written by an inference (``--mode infer``) dump that is not a module's output."""

    name: str
    reference: str  # "reference/<file>.py: <Class.method>" (checked to exist by the tests), or "" (engine-only)
    nemo: str  # NeMo 3.0.0 counterpart, or "" (none)
    shape: str
    note: str


INFERENCE: tuple[InferencePoint, ...] = (
    InferencePoint(
        "inference.attn_prior", "reference/inference.py: PriorState.build_prior",
        "MagpieTTSModel.construct_inference_prior return[0], in generate_speech after the first chunk "
        "construct_multi_chunk_prior return[0] (methods wrapped by parity/nemo_capture.py dump_nemo_infer / "
        "dump_nemo_generate_speech)", "(rows, 1, T_text)",
        "the prior built at step k (used at step k+1); CFG uncond rows stay epsilon; in generate_speech dumps k "
        "counts decoder steps over all chunks and T_text is the chunk's text window"),
    InferencePoint(
        "inference.attended_text_position", "reference/inference.py: PriorState.most_attended",
        "MagpieTTSModel.get_most_attended_text_timestep return[0][:B] (method wrapped by parity/nemo_capture.py "
        "dump_nemo_infer)", "(B,)",
        "argmax over the lookahead window of the layer-averaged cross-attention probabilities "
        "(reference/inference.py: cross_attention_scores = NeMo get_cross_attention_scores); an engine's "
        "attention_prior_focus at step k+1 is its own version of this at step k"),
    InferencePoint(
        "predicted_codes", "reference/inference.py: infer_batch",
        "MagpieTTSModel.infer_batch / generate_speech return value .predicted_codes", "(B, C, T_out)",
        "the generated codes (step None); in generate_speech dumps one per chunk (step = chunk index)"),
    InferencePoint(
        "predicted_codes_lens", "reference/inference.py: infer_batch",
        "MagpieTTSModel.infer_batch / generate_speech return value .predicted_codes_lens", "(B,)",
        "the generated lengths (step None); in generate_speech dumps one per chunk (step = chunk index): the "
        "frame of the chunk's EOS, (step + 1) * frame_stacking_factor for a forced chunk end, else the call's "
        "steps * frame_stacking_factor (also for items that ended in an earlier chunk)"),
    InferencePoint(
        "inference.chunk_initial_prior", "",
        "MagpieTTSModel._initialize_chunked_attn_prior return value (wrapped by parity/nemo_capture.py "
        "dump_nemo_generate_speech)", "(rows, 1, T_text)",
        "generate_speech dumps, chunks after the first (step = chunk index): the prior the chunk's first decoder "
        "step uses (the history part of the window eps^2, then 0.5, 1.0, 0.8, 0.2, 0.2 from the chunk's start; "
        "uncond rows eps); the first chunk has none"),
    InferencePoint(
        "inference.chunk_attended_text_positions", "",
        "MagpieTTSModel.get_most_attended_text_timestep return[0][:B] of each decoder step of one generate_speech "
        "call (wrapped by parity/nemo_capture.py dump_nemo_generate_speech)", "(steps, B)",
        "generate_speech dumps (step = chunk index): the absolute text position found attended at each of the "
        "chunk's decoder steps (0 rows without the attention prior); the per-step "
        "inference.attended_text_position of dumps that capture steps, gathered per chunk"),
    InferencePoint(
        "chunk.text", "", "the batch['text'] given to MagpieTTSModel.generate_speech", "(B, T_chunk)",
        "generate_speech dumps (step = chunk index): the chunk's text tokens (EOS-terminated, padded with 0) as "
        "given, before NeMo replaces batch['text'] with the text window; int32 as NeMo's chunker and runner make "
        "them"),
    InferencePoint(
        "chunk.text_lens", "", "the batch['text_lens'] given to MagpieTTSModel.generate_speech", "(B,)",
        "generate_speech dumps (step = chunk index): the chunk lengths as given (NeMo overwrites them in place with "
        "the window lengths); a runner padding chunk is [EOS] of length 1"),
    InferencePoint(
        "chunk.speaker_indices", "", "the batch['speaker_indices'] given to MagpieTTSModel.generate_speech",
        "(B,)", "generate_speech dumps of baked models (step = chunk index): the baked speaker row per item"),
    InferencePoint(
        "chunk.context_audio_codes", "", "the batch['context_audio_codes'] given to "
        "MagpieTTSModel.generate_speech", "(B, C, T_ctx)",
        "generate_speech dumps of models with a context encoder (step = chunk index): raw codec codes, NeMo adds "
        "BOS/EOS"),
    InferencePoint(
        "chunk.context_audio_codes_lens", "", "the batch['context_audio_codes_lens'] given to "
        "MagpieTTSModel.generate_speech", "(B,)",
        "generate_speech dumps of models with a context encoder (step = chunk index)"),
    InferencePoint(
        "chunk.end_of_text", "", "the end_of_text argument of MagpieTTSModel.generate_speech", "(B,)",
        "generate_speech dumps (step = chunk index): bool per item, True on an item's last chunk (and on the "
        "runner's padding chunks)"),
    InferencePoint(
        "chunk.beginning_of_text", "", "the beginning_of_text argument of MagpieTTSModel.generate_speech", "()",
        "generate_speech dumps (step = chunk index): bool, True for the first chunk only"),
    InferencePoint(
        "inference.attention_prior_focus", "", "", "(rows,)",
        "engine-only: the focus text position the engine's prior is centred on this step (reference counterpart: "
        "inference.attended_text_position of the previous step; rules differ: lookahead 5, epsilon 0.1)"),
    InferencePoint(
        "inference.attention_prior_scores", "", "", "(rows, 5)",
        "engine-only: cross-attention probabilities at text positions [focus, focus + 5) written by the prior "
        "kernels (reference counterpart: decoder.layers.{i}.cross_attention.attn_probs[..., -1, focus:focus + 5] of "
        "the score layers; fork_497d0e69 averages over the layers, fork_19ff87be's runtime zeroes the buffer for the "
        "layers to accumulate into)"),
    InferencePoint(
        "inference.cross_attention_logits_mean", "", "", "(rows, T, T_text)",
        "engine-only (fork_e7109d5 `scores`): mean over the score layers (4, 6, 10) of the raw cross-attention "
        "logits q.k^T of head 0, unscaled, before mask, prior and softmax, each sequence's row against its own "
        "text positions. No reference capture point holds logits: per layer they equal NeMo's attn_score "
        "(decoder.layers.{i}.cross_attention output[1][1], i.e. reference/model.py _attend's `score`) divided by "
        "d_head**-0.5, where not masked. The prior state machine of the reference and NeMo reads the mean of the "
        "post-prior probabilities instead (reference/inference.py: cross_attention_scores), so the engine's "
        "argmax can differ; compare this name between engine runs"),
)
_INFERENCE = {p.name: p for p in INFERENCE}


@dataclass(frozen=True)
class EngineIO:
    """An engine input/output that is not a layer activation, ingested under an :data:`INFERENCE` name.

    layout: "per_sequence" ([num_seq]), "per_sequence_rows" ([num_seq * k]), "per_gen_sequence" /
    "per_gen_sequence_rows" (the same over the generation-phase sequences only, context sequences have none),
    "per_sequence_block" ([num_tokens, sum of the sequences' encoder lengths]: each sequence's rows against its own
    encoder columns)."""

    trt: str
    generation: str
    canonical: str
    direction: str  # "input" or "output"
    layout: str
    where: str
    note: str = ""

    @property
    def source(self) -> str:
        return f"{generation_info(self.generation).source} ({self.where})"


ENGINE_IO: tuple[EngineIO, ...] = (
    EngineIO("attention_prior_focus", "fork_497d0e69", "inference.attention_prior_focus", "input", "per_sequence",
             "T5TTSDecoderModel.prepare_inputs: int32 [batch]",
             "focus 0 for context requests, getAttentionPriorIdx() for generation ones (architecture.md 6.3)"),
    EngineIO("attention_prior_scores", "fork_497d0e69", "inference.attention_prior_scores", "output",
             "per_sequence_rows", "T5TTSDecoderModel.forward: per-layer scores stacked, averaged, marked output",
             "[batch * lookahead 5]"),
    EngineIO("attention_prior_focus", "fork_19ff87be", "inference.attention_prior_focus", "input", "per_gen_sequence",
             "T5TTSDecoderModel.prepare_inputs: Tensor('attention_prior_focus', int32, [-1])",
             f"the runtime sizes it [numGenSequences] and fills entry i with genRequests[i]->getAttentionPriorIdx() "
             f"({ANAND}@19ff87be:{RUNTIME_BUFFERS} RuntimeBuffers::reshape / setFromInputs): indexed by request, "
             f"not by sequence, so with CFG (two sequences per request) the entries do not follow the (cond, uncond) "
             f"pairs; ingestion keeps what the kernel reads: entry i belongs to generation sequence i"),
    EngineIO("attention_prior_scores", "fork_19ff87be", "inference.attention_prior_scores", "input",
             "per_gen_sequence_rows",
             "T5TTSDecoderModel.prepare_inputs: Tensor('attention_prior_scores', float32, [-1]) (5 per sequence)",
             f"an input buffer the kernels write: the runtime sizes it [5 * numGenSequences] and zeroes it every "
             f"step ('so scores from different layers can be accumulated': the score layers [4, 6, 10]; whether the "
             f"kernel adds or overwrites is not in the stored sources); processAttentionPriorScores then moves "
             f"the focus by the argmax of the cond row's 5 values ({ANAND}@19ff87be:{RUNTIME_BUFFERS}); the C++ "
             f"executor dumps it after the step's engine run (trtllm.md 1.3), so the dump holds that step's sums"),
    EngineIO("scores", "fork_e7109d5", "inference.cross_attention_logits_mean", "output", "per_sequence_block",
             "T5TTSDecoderModel.forward: mean over layers of T5TTSDecoderLayer's matmul(q, k, transb=True), "
             "mark_output('scores')",
             f"[num_tokens, encoder tokens of every sequence] in the model dtype; the runtime reads each request's "
             f"own block (RuntimeBuffers::setAttentionPriorIdx, {RMITTAL}@e7109d5:{RUNTIME_BUFFERS}): rows of its "
             f"tokens, columns of its encoder positions; ingestion keeps exactly those blocks"),
)


def engine_io(trt_name: str, generation: str) -> Optional[EngineIO]:
    """The engine-I/O row of ``trt_name`` in ``generation`` (None if it is not one there)."""
    for row in ENGINE_IO:
        if row.trt == trt_name and row.generation == generation:
            return row
    return None


def is_engine_io_name(trt_name: str) -> bool:
    """Is ``trt_name`` a known engine-I/O tensor in some generation?"""
    return any(row.trt == trt_name for row in ENGINE_IO)


# ------------------------------------------------------------------------------------------------ lookups


def _regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _fill(template: str, i: Optional[int]) -> str:
    return template.replace("{i}", str(i)) if "{i}" in template else template


class NameMap:
    """Lookups over the table. Layer-indexed names are matched by regex; indices are checked against the model's
    layer counts when given."""

    def __init__(self, n_enc_layers: Optional[int] = None, n_dec_layers: Optional[int] = None,
                 n_ctx_layers: Optional[int] = None):
        # n_ctx_layers: the context encoder's layers (decoder_ce that runs one); 0: the model has none (other
        # model types, baked speaker tables); None: unknown (names are not checked against it)
        self.n_enc_layers, self.n_dec_layers, self.n_ctx_layers = n_enc_layers, n_dec_layers, n_ctx_layers
        self._canon = [(p.template, _regex(p.template)) for p in CANONICAL]
        self._trt = [(r.canonical, r.generation, r.trt, _regex(r.trt), r.info) for r in TRT_NAMES]

    # ---- canonical ------------------------------------------------------------------------------------------
    def all_canonical(self, n_enc_layers: Optional[int] = None, n_dec_layers: Optional[int] = None,
                      n_ctx_layers: Optional[int] = None) -> list[str]:
        """Every canonical name in execution order (= ``MagpieTTS.capture_points()``); the context encoder's
        points only with a context-encoder layer count > 0 (given here or to the constructor)."""
        ne = n_enc_layers if n_enc_layers is not None else self.n_enc_layers
        nd = n_dec_layers if n_dec_layers is not None else self.n_dec_layers
        nc = n_ctx_layers if n_ctx_layers is not None else (self.n_ctx_layers or 0)
        if ne is None or nd is None:
            raise ValueError("all_canonical needs the encoder and decoder layer counts")
        return canonical_names(ne, nd, nc)

    def _parse_canonical(self, name: str) -> tuple[str, Optional[int]]:
        for template, rx in self._canon:
            m = rx.match(name)
            if m:
                i = int(m.group(1)) if m.groups() else None
                self._check_layer(name, template, i)
                return template, i
        raise UnknownNameError(self._unknown("canonical name", name, self._examples_canonical()))

    def _check_layer(self, name: str, template: str, i: Optional[int]) -> None:
        if _POINT[template].requires == "context_encoder" and self.n_ctx_layers == 0:
            raise UnknownNameError(f"'{name}' exists only in decoder_ce models that run a context encoder "
                                   f"(this model has none: another model type, or a baked speaker table)")
        if i is None:
            return
        n = {"encoder": self.n_enc_layers, "decoder": self.n_dec_layers,
             "context_encoder": self.n_ctx_layers}[_POINT[template].stack]
        if n is not None and i >= n:
            raise UnknownNameError(f"'{name}': layer {i} does not exist (the model has {n} layers there)")

    def point(self, canonical: str) -> CanonicalPoint:
        """The table row of a canonical name (layer index filled into the NeMo module path)."""
        template, i = self._parse_canonical(canonical)
        p = _POINT[template]
        return dataclasses.replace(p, nemo=self._nemo(p.nemo, i))

    @staticmethod
    def _nemo(p: NemoPoint, i: Optional[int]) -> NemoPoint:
        return dataclasses.replace(p, module=_fill(p.module, i) if p.module else None)

    def nemo_path(self, canonical: str) -> NemoPoint:
        template, i = self._parse_canonical(canonical)
        return self._nemo(_POINT[template].nemo, i)

    # ---- TensorRT-LLM ---------------------------------------------------------------------------------------
    def from_canonical(self, name: str, generation: str) -> tuple[str, TrtInfo]:
        """(debug tensor name, info) for a canonical name in one generation; UnknownNameError if it has none."""
        self._check_generation(generation)
        template, i = self._parse_canonical(name)
        for c, g, t, _rx, info in self._trt:
            if c == template and g == generation:
                return _fill(t, i), info
        have = sorted({g for c, g, *_ in self._trt if c == template})
        raise UnknownNameError(f"'{name}' has no TensorRT-LLM debug tensor in generation {generation!r}"
                               f" (generations that have it: {have or 'none'})")

    def generations_with(self, name: str) -> list[str]:
        template, _ = self._parse_canonical(name)
        return [g for g in GENERATIONS if any(c == template and gg == g for c, gg, *_ in self._trt)]

    def to_canonical(self, trt_name: str, generation: Optional[str] = None,
                     engine: Optional[str] = None) -> tuple[str, Optional[int], TrtInfo]:
        """A debug tensor name -> (canonical name, layer index or None, info).

        ``generation`` / ``engine`` narrow the search; a name that maps to different canonical tensors in the
        remaining rows (``embedding_layer_output`` on both engines, ``transformer.layers.{i}.mlp_output``, the
        fork-497d0e69 ``logits``) raises and asks for them. Dumped file names may carry ``-step<N>`` / ``.npy``
        suffixes; strip them first.
        """
        if generation is not None:
            self._check_generation(generation)
        if engine not in (None, "encoder", "decoder"):
            raise ValueError(f"engine must be 'encoder' or 'decoder', got {engine!r}")
        hits = {}
        for c, g, t, rx, info in self._trt:
            if generation is not None and g != generation:
                continue
            if engine is not None and info.engine != engine:
                continue
            m = rx.match(trt_name)
            if m:
                i = int(m.group(1)) if m.groups() else None
                hits.setdefault((_fill(c, i), i, info), []).append(g)
        if not hits:
            known = sorted({_fill(t, 0) for c, g, t, _rx, info in self._trt
                            if (generation is None or g == generation) and (engine is None or info.engine == engine)})
            raise UnknownNameError(self._unknown("TensorRT-LLM debug tensor", trt_name, known,
                                                 f" (generation={generation}, engine={engine})"))
        canon = {k[0] for k in hits}
        if len(canon) > 1:
            opts = "; ".join(f"{k[0]} [{k[2].engine}, {'/'.join(v)}]" for k, v in hits.items())
            raise UnknownNameError(f"'{trt_name}' is ambiguous: {opts}; pass engine= and/or generation=")
        (name, i, info), = list(hits)[:1]
        if len({(k[2].engine, k[2].final_ln, k[2].layout) for k in hits}) > 1:
            raise UnknownNameError(f"'{trt_name}' has different layouts across generations; pass generation=")
        self._check_layer(name, self._parse_canonical_template(name), i)
        return name, i, info

    def _parse_canonical_template(self, name: str) -> str:
        for template, rx in self._canon:
            if rx.match(name):
                return template
        raise AssertionError(name)

    # ---- helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_generation(g: str) -> None:
        generation_info(g)

    def _examples_canonical(self) -> list[str]:
        return self.all_canonical(self.n_enc_layers or 1, self.n_dec_layers or 1,
                                  1 if self.n_ctx_layers is None else self.n_ctx_layers)

    @staticmethod
    def _unknown(kind: str, name: str, known: list[str], extra: str = "") -> str:
        # compare with layer indices normalised so 'decoder_layers.7.x' finds 'decoder_layers.0.x'
        norm = lambda s: re.sub(r"\d+", "0", s)  # noqa: E731
        by_norm = {}
        for k in known:
            by_norm.setdefault(norm(k), k)
        near = difflib.get_close_matches(norm(name), list(by_norm), n=4, cutoff=0.5)
        near = [re.sub(r"\d+", "{i}", n_) if re.search(r"\d", n_) else n_ for n_ in near]
        hint = f"; near matches: {near}" if near else ""
        return f"unknown {kind} '{name}'{extra}{hint}"


DEFAULT = NameMap()


# ------------------------------------------------------------------------------------------------ docs/names.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else "—"


def _nemo_cell(p: NemoPoint) -> str:
    where = f"`{p.module}`" if p.module else "`process_batch(batch)` return value"
    how = {"forward": "forward hook", "forward_pre": "forward pre-hook", "return": "return value"}[p.hook]
    return f"{where} ({p.cls}): {how}, `{p.select}`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def markdown_table() -> str:
    """docs/names.md without its final newline: the whole table rendered as Markdown (deterministic; a test
    compares the file with it; ``print(markdown_table())`` writes the file)."""
    lines = [
        "# Names: reference, NeMo 3.0.0 and TensorRT-LLM in one table",
        "",
        "<!-- Generated from parity/names.py; do not edit by hand. Regenerate with:",
        "     python -c \"from parity.names import markdown_table; print(markdown_table())\" > docs/names.md",
        "-->",
        "",
        "Canonical names are the reference model's module paths (`MagpieTTS.capture_points()`, "
        "`reference/model.py`); `{i}` is the layer index. Every dump (reference, NeMo, ingested TensorRT-LLM) "
        "uses them. For each one: where the reference computes it, the NeMo 3.0.0 module of `MagpieTTSModel` and "
        "how `parity/nemo_capture.py` takes it from its hook, and the TensorRT-LLM tensor name per engine "
        "generation (— : that generation does not export it). The source of truth is `parity/names.py`; edit it "
        "and regenerate this page with",
        "",
        "    python -c \"from parity.names import markdown_table; print(markdown_table())\" > docs/names.md",
        "",
        "## Engine generations",
        "",
    ]
    lines += _table(["generation", "source", "what it exports", "detected by (`trt/ingest.py: detect_generation`)"],
                    [[f"`{g.name}`", f"`{g.source}`", g.summary, g.detection] for g in GENERATION_INFO])
    lines += ["", "## Capture points", "",
              "The `context_encoder` rows exist only in `decoder_ce` models that run their context encoder; a baked "
              "speaker table (`baked_context_embedding`) replaces it, and other model types have none: "
              "`canonical_names(n_enc, n_dec, n_ctx)` expands them for `n_ctx` > 0 only.", ""]
    rows = []
    for p in CANONICAL:
        by_gen = {r.generation: r.trt for r in TRT_NAMES if r.canonical == p.template}
        rows.append([f"`{p.template}`", f"`{p.reference}`", _nemo_cell(p.nemo), p.shape]
                    + [_code(by_gen.get(g, "")) for g in GENERATIONS])
    lines += _table(["canonical", "reference code", "NeMo 3.0.0 (module, class: capture)", "shape"]
                    + [f"`{g}`" for g in GENERATIONS], rows)
    lines += ["", "What each capture point holds:", ""]
    lines += [f"- `{p.template}`: {p.note}." for p in CANONICAL]
    lines += ["", "## Inference-loop and engine-I/O names", "",
              "Written by `--mode infer` dumps (reference, NeMo), by NeMo `generate_speech` dumps "
              "(`parity/nemo_capture.py: dump_nemo_generate_speech`; `chunk.*` are the inputs of each chunk's call) "
              "or by `trt/ingest.py` from engine inputs/outputs that are not layer activations.", ""]
    rows = []
    for p in INFERENCE:
        by_gen = {r.generation: f"{r.trt} ({r.direction})" for r in ENGINE_IO if r.canonical == p.name}
        rows.append([f"`{p.name}`", _code(p.reference), p.nemo or "—", p.shape]
                    + [_code(by_gen.get(g, "")) for g in GENERATIONS])
    lines += _table(["name", "reference code", "NeMo 3.0.0", "shape"] + [f"`{g}`" for g in GENERATIONS], rows)
    lines += [""]
    lines += [f"- `{p.name}`: {p.note}." for p in INFERENCE]
    lines += ["", "## TensorRT-LLM rows in detail", "",
              "engine: which engine's dump holds it; layout: `packed_tokens` = `[num_tokens, hidden]` rows of every "
              "sequence's tokens, `last_token` = one row per sequence per step; final LN: value before (`pre`) or "
              "after (`post`) the stack's final LayerNorm; +pos: the engine value includes the learned position "
              "embedding (no reference counterpart, skipped by ingestion).", ""]
    rows = [[f"`{r.canonical}`", f"`{r.generation}`", f"`{r.trt}`", r.info.engine, r.info.layout, r.info.final_ln,
             "yes" if r.info.add_positions else "", f"`{r.source}`", r.info.note] for r in TRT_NAMES]
    lines += _table(["canonical", "generation", "tensor", "engine", "layout", "final LN", "+pos", "source", "note"],
                    rows)
    lines += ["", "## Engine I/O rows in detail", ""]
    rows = [[f"`{r.trt}`", f"`{r.generation}`", f"`{r.canonical}`", r.direction, r.layout, f"`{r.source}`", r.note]
            for r in ENGINE_IO]
    lines += _table(["tensor", "generation", "ingested as", "direction", "layout", "source", "note"], rows)
    lines += ["", "## Layout of engine values", "",
              "`remove_input_padding` engines hold packed `[num_tokens, hidden]` tensors: context requests' tokens "
              "first, then one token per generating sequence; ingestion slices them with `host_context_lengths` / "
              "`host_request_types` / `request_ids` of the same iteration into `[B, T, hidden]`. Decoder rows come "
              "in (cond, uncond) pairs when CFG is on. Gathered tensors (`logits_before_lmhead`, `logits`) hold one "
              "row per sequence per step. `register_network_output` tensors exist only in engines built with "
              "`--enable_debug_output` and are cast to the model dtype; `mark_output` tensors are always outputs."]
    return "\n".join(lines)
