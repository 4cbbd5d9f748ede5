"""The one name table: canonical capture names <-> NeMo module paths <-> TensorRT-LLM debug tensor names.

Canonical names are the reference's module paths (``MagpieTTS.capture_points()``). For each one this table
gives the NeMo 3.0.0 module and how the tensor is selected from its hook (as ``parity/nemo_capture.py`` does),
and, per TensorRT-LLM generation, the debug tensor name and the layout transform it needs.

Generations (trtllm.md 1.4, architecture.md 10; fork = rmittal-github/TensorRT-LLM
``tensorrt_llm/models/t5tts/model.py``, upstream = NVIDIA/TensorRT-LLM ``tensorrt_llm/models/enc_dec/model.py``):

``fork_c6ff2312``  oldest t5tts model: encoder ``embedding_layer_output``, ``encoder_layers.{i}.attention_output``,
                   ``encoder_layers.{i}.pos_ff_output``; decoder ``embedding_layer_output``,
                   ``decoder_layers.{i}.{self_attention,cross_attention,pos_ff}_output``, ``decoder_layer_{i}_output``,
                   ``logits_before_lmhead``; real outputs ``encoder_output``, ``logits``.
``fork_e7109d5``   encoder layer outputs only (+ ``encoder_output``); the decoder registers none; ``logits``.
``fork_497d0e69``  as e7109d5, but the lm_head is commented out: the ``logits`` output is the final-LN hidden state.
``upstream_old``   enc_dec ``encoder_layers.{i}.{attention,mlp}_output``, ``decoder_layers.{i}.*_output``
                   (``mlp_output`` for the FFN), ``decoder_layer_{i}_output``, ``logits_before_lmhead``.
``upstream_new``   the same under ``transformer.layers.{i}.*`` in both engines (``attention_output`` in the encoder,
                   ``self_attention_output`` / ``cross_attention_output`` in the decoder, ``mlp_output`` in both:
                   ambiguous without the engine side).

Layout of engine values (``remove_input_padding`` engines): packed ``[num_tokens, hidden]``, context requests'
tokens first, then one token per generating sequence; slice with ``host_context_lengths`` /
``host_request_types`` / ``request_ids`` from the same dump, then ``[B, T, hidden]``. Decoder rows come in
(cond, uncond) pairs when CFG is on (fork). Gathered tensors (``logits_before_lmhead``, ``logits``) hold one row
per sequence per step (the last token). Debug outputs are cast to the model dtype.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional

GENERATIONS = ("fork_c6ff2312", "fork_e7109d5", "fork_497d0e69", "upstream_old", "upstream_new")


class UnknownNameError(KeyError):
    """A name is not in the table; the message lists near matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class NemoPoint:
    module: Optional[str]  # dotted path in NeMo's MagpieTTSModel (None: the process_batch return value)
    select: str  # how the tensor is taken: "output", "output[0]", "output[1][0]", "output['output']", "args[0]", ...
    hook: str  # "forward", "forward_pre" or "return"


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


_ENC = dict(engine="encoder", layout="packed_tokens", cfg_pairs=False, per_step=False)
_DEC = dict(engine="decoder", layout="packed_tokens", cfg_pairs=True, per_step=True)
_LAST = dict(engine="decoder", layout="last_token", cfg_pairs=True, per_step=True)

# (canonical template, generation, trt template, info). Templates use {i} for the layer index.
_ROWS: list[tuple[str, str, str, TrtInfo]] = []


def _add(canonical: str, gens, trt: str, info: TrtInfo) -> None:
    for g in gens:
        _ROWS.append((canonical, g, trt, info))


_ALL = GENERATIONS
_FORK = ("fork_c6ff2312", "fork_e7109d5", "fork_497d0e69")
_EMB_NOTE = "EncoderDecoderEmbedding output: token embedding plus the learned position embedding"
_add("text_embedding", ("fork_c6ff2312", "upstream_old", "upstream_new"), "embedding_layer_output",
     TrtInfo(**_ENC, final_ln="pre", add_positions=True, note=_EMB_NOTE))
_add("encoder.layers.{i}.self_attention", _FORK + ("upstream_old",), "encoder_layers.{i}.attention_output",
     TrtInfo(**_ENC, final_ln="pre", note="BertAttention dense output, before the residual add"))
_add("encoder.layers.{i}.self_attention", ("upstream_new",), "transformer.layers.{i}.attention_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"))
_add("encoder.layers.{i}.pos_ff", _FORK, "encoder_layers.{i}.pos_ff_output",
     TrtInfo(**_ENC, final_ln="pre", note="conv FFN output before the residual add; the fork convolves the packed "
                                          "stream, so k>1 mixes neighbouring requests at their borders"))
_add("encoder.layers.{i}.pos_ff", ("upstream_old",), "encoder_layers.{i}.mlp_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"))
_add("encoder.layers.{i}.pos_ff", ("upstream_new",), "transformer.layers.{i}.mlp_output",
     TrtInfo(**_ENC, final_ln="pre", note="before the residual add"))
_add("encoder.norm_out", _ALL, "encoder_output",
     TrtInfo(**_ENC, final_ln="post", note="engine output after final_layernorm"))
_add("decoder_input", ("fork_c6ff2312", "upstream_old", "upstream_new"), "embedding_layer_output",
     TrtInfo(**_DEC, final_ln="pre", add_positions=True,
             note=_EMB_NOTE + "; mean of the per-codebook embeddings; CFG uncond rows use the zero service token"))
for _kind in ("self_attention", "cross_attention"):
    _add(f"decoder.layers.{{i}}.{_kind}", ("fork_c6ff2312", "upstream_old"), f"decoder_layers.{{i}}.{_kind}_output",
         TrtInfo(**_DEC, final_ln="pre", note="dense output, before the residual add"))
    _add(f"decoder.layers.{{i}}.{_kind}", ("upstream_new",), f"transformer.layers.{{i}}.{_kind}_output",
         TrtInfo(**_DEC, final_ln="pre", note="dense output, before the residual add"))
_add("decoder.layers.{i}.pos_ff", ("fork_c6ff2312",), "decoder_layers.{i}.pos_ff_output",
     TrtInfo(**_DEC, final_ln="pre", note="conv FFN output, before the residual add"))
_add("decoder.layers.{i}.pos_ff", ("upstream_old",), "decoder_layers.{i}.mlp_output",
     TrtInfo(**_DEC, final_ln="pre", note="before the residual add"))
_add("decoder.layers.{i}.pos_ff", ("upstream_new",), "transformer.layers.{i}.mlp_output",
     TrtInfo(**_DEC, final_ln="pre", note="before the residual add"))
_add("decoder.layers.{i}", ("fork_c6ff2312", "upstream_old", "upstream_new"), "decoder_layer_{i}_output",
     TrtInfo(**_DEC, final_ln="pre", note="residual stream after the layer (registered on the root model)"))
_add("decoder.norm_out", ("fork_c6ff2312", "upstream_old", "upstream_new"), "logits_before_lmhead",
     TrtInfo(**_LAST, final_ln="post", note="after final_layernorm and gather_last_token_logits"))
_add("decoder.norm_out", ("fork_497d0e69",), "logits",
     TrtInfo(**_LAST, final_ln="post", note="lm_head commented out: the 'logits' output is the final-LN hidden state"))
_add("logits", ("fork_c6ff2312", "fork_e7109d5", "upstream_old", "upstream_new"), "logits",
     TrtInfo(**_LAST, final_ln="post",
             note="lm_head output of the last token before CFG combination (cond, uncond rows); step s <-> "
                  "reference logits[:, s]; the fork drops final_proj.bias unless converted with it"))

_NEMO: dict[str, NemoPoint] = {
    "text_embedding": NemoPoint("text_embedding", "output", "forward"),
    "encoder.layers.{i}.self_attention": NemoPoint("encoder.layers.{i}.self_attention", "output[0]", "forward"),
    "encoder.layers.{i}.pos_ff": NemoPoint("encoder.layers.{i}.pos_ff", "output", "forward"),
    "encoder.layers.{i}": NemoPoint("encoder.layers.{i}", "output['output']", "forward"),
    "encoder.norm_out": NemoPoint("encoder.norm_out", "output", "forward"),
    "decoder_input": NemoPoint("decoder", "args[0]", "forward_pre"),
    "decoder.layers.{i}.self_attention": NemoPoint("decoder.layers.{i}.self_attention", "output[0]", "forward"),
    "decoder.layers.{i}.cross_attention.attn_probs": NemoPoint("decoder.layers.{i}.cross_attention", "output[1][0]",
                                                               "forward"),
    "decoder.layers.{i}.cross_attention": NemoPoint("decoder.layers.{i}.cross_attention", "output[0]", "forward"),
    "decoder.layers.{i}.pos_ff": NemoPoint("decoder.layers.{i}.pos_ff", "output", "forward"),
    "decoder.layers.{i}": NemoPoint("decoder.layers.{i}", "output['output']", "forward"),
    "decoder.norm_out": NemoPoint("decoder.norm_out", "output", "forward"),
    "final_proj": NemoPoint("final_proj", "output", "forward"),
    "logits": NemoPoint(None, "process_batch(batch)['logits']", "return"),
}


def _regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _fill(template: str, i: Optional[int]) -> str:
    return template.replace("{i}", str(i)) if "{i}" in template else template


class NameMap:
    """Lookups over the table. Layer-indexed names are matched by regex; indices are checked against the model's
    layer counts when given."""

    def __init__(self, n_enc_layers: Optional[int] = None, n_dec_layers: Optional[int] = None):
        self.n_enc_layers, self.n_dec_layers = n_enc_layers, n_dec_layers
        self._canon = [(t, _regex(t)) for t in _NEMO]
        self._trt = [(c, g, t, _regex(t), info) for c, g, t, info in _ROWS]

    # ---- canonical ------------------------------------------------------------------------------------------
    def all_canonical(self, n_enc_layers: Optional[int] = None, n_dec_layers: Optional[int] = None) -> list[str]:
        """Every canonical name in execution order (= ``MagpieTTS.capture_points()``)."""
        ne = n_enc_layers if n_enc_layers is not None else self.n_enc_layers
        nd = n_dec_layers if n_dec_layers is not None else self.n_dec_layers
        if ne is None or nd is None:
            raise ValueError("all_canonical needs the encoder and decoder layer counts")
        names = ["text_embedding"]
        for i in range(ne):
            names += [f"encoder.layers.{i}.self_attention", f"encoder.layers.{i}.pos_ff", f"encoder.layers.{i}"]
        names += ["encoder.norm_out", "decoder_input"]
        for i in range(nd):
            p = f"decoder.layers.{i}"
            names += [f"{p}.self_attention", f"{p}.cross_attention.attn_probs", f"{p}.cross_attention", f"{p}.pos_ff", p]
        return names + ["decoder.norm_out", "final_proj", "logits"]

    def _parse_canonical(self, name: str) -> tuple[str, Optional[int]]:
        for template, rx in self._canon:
            m = rx.match(name)
            if m:
                i = int(m.group(1)) if m.groups() else None
                self._check_layer(name, template, i)
                return template, i
        raise UnknownNameError(self._unknown("canonical name", name, self._examples_canonical()))

    def _check_layer(self, name: str, template: str, i: Optional[int]) -> None:
        if i is None:
            return
        n = self.n_enc_layers if template.startswith("encoder") else self.n_dec_layers
        if n is not None and i >= n:
            raise UnknownNameError(f"'{name}': layer {i} does not exist (the model has {n} layers there)")

    def nemo_path(self, canonical: str) -> NemoPoint:
        template, i = self._parse_canonical(canonical)
        p = _NEMO[template]
        return NemoPoint(_fill(p.module, i) if p.module else None, p.select, p.hook)

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
        if g not in GENERATIONS:
            raise UnknownNameError(f"unknown generation {g!r}; known: {list(GENERATIONS)}")

    def _examples_canonical(self) -> list[str]:
        return self.all_canonical(self.n_enc_layers or 1, self.n_dec_layers or 1)

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


# Engine I/O tensors that are not layer activations but carry parity-relevant values (trt/ingest.py writes them
# under these canonical names; the reference has no capture point for them). Per generation (architecture.md 6.3,
# 10): gen B (fork_497d0e69) has the input ``attention_prior_focus`` [num_seq] int32 and the output
# ``attention_prior_scores`` [num_seq * lookahead] (probabilities at [focus, focus + lookahead)); gen A
# (fork_e7109d5) exports raw averaged cross-attention logits as ``scores``.
ENGINE_IO: dict[str, tuple[str, tuple[str, ...], str]] = {
    # trt name: (canonical name, generations, layout: "per_sequence" [num_seq] or "per_sequence_rows" [num_seq*k])
    "attention_prior_focus": ("inference.attention_prior_focus", ("fork_497d0e69",), "per_sequence"),
    "attention_prior_scores": ("inference.attention_prior_scores", ("fork_497d0e69",), "per_sequence_rows"),
}


DEFAULT = NameMap()
