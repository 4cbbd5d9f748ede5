"""Thin glue around the fork's ``ModelRunnerCpp``: run a MagpieTTS decoder engine on a reference batch.

**Not executed here**: TensorRT-LLM (the t5tts fork) cannot be installed in this environment, so
:func:`run_engine` has never run; everything it needs that does not import TensorRT-LLM is split out into pure
functions below, which are tested (``tests/trt/test_runner.py``).

What it mirrors (sources read, not run):

* ``rmittal-github/TensorRT-LLM@ae81c0781cc4336c67aaeed8a6fe7e9ef1c081c0``
  ``examples/models/contrib/t5tts/run_decoder_multiling.py``: ``ModelRunnerCpp.from_dir(engine_dir=<decoder>,
  is_enc_dec=False, max_input_len=512, rank=0, multi_block_mode=False, debug_mode=..., cross_kv_cache_fraction=0.5,
  kv_cache_free_gpu_memory_fraction=0.7)``; ``generate(batch_input_ids=[int32 ids], encoder_input_features=[fp16
  [T, D]], decoder_context_features=[fp16 [T_prompt, D]], max_new_tokens, end_id=2017, pad_id=2017,
  temperature=0.6, top_k=80, streaming=False, cfg_scale=2.5)``; with context features the ids are dummy zeros,
  ``T_prompt * num_codebooks`` of them; outputs ``[B, beams, L]`` flat ids, the prompt skipped, reshaped to
  ``[frames, C]``, codebook ``c`` de-offset by ``c * 2024`` and cut at the first frame holding EOS (2017) in any
  codebook; a commented ``shutil.move("/tmp/tllm_debug/PP_1/TP_1/", ...)`` after each run.
* ``rmittal-github/TensorRT-LLM@e7109d5b53686dda8363697e3ffb54eccac84197`` ``tensorrt_llm/runtime/model_runner_cpp.py``
  ``generate(batch_input_ids, *, position_ids, encoder_input_ids, encoder_input_features, encoder_output_lengths,
  cross_attention_masks, ..., max_new_tokens, end_id, pad_id, ..., return_dict, output_sequence_lengths, ...,
  **kwargs)``: ``cfg_scale`` is one of the ``accepted_parameters`` copied into ``trtllm.SamplingConfig``;
  ``num_vocabs = len(model_config.vocab_sizes)`` is set on every ``trtllm.Request``. A ``decoder_context_features``
  kwarg is NOT forwarded to ``trtllm.Request`` in this version (nor in ``@51f4e2637c2e``): it is swallowed by
  ``**kwargs`` in this version (nor in ``@51f4e2637c2e``). It is forwarded in
  ``anand-nv/TensorRT-LLM@2d11190d961cda67ff4d7d290f2b816789285d2f`` ``tensorrt_llm/runtime/model_runner_cpp.py``
  (``generate(..., decoder_context_features: List[torch.Tensor] = None, ...)`` ->
  ``trtllm.Request(..., decoder_context_features=decoder_context_features[i].contiguous(), ...,
  num_vocabs=len(self.model_config.vocab_sizes))``): ``context_as_features=True`` needs that fork generation.
  ``from_dir(..., debug_mode=True)`` gives ``DebugConfig(debug_input_tensors=True, debug_output_tensors=True)``,
  which dumps every iteration to ``std::filesystem::temp_directory_path()/tllm_debug`` (trtllm.md 1.3): the
  runner points ``TMPDIR`` at a fresh folder for the run (assumed to be read when the executor dumps).
* ``anand-nv/TensorRT-LLM@0c0df9f0deddec40b2a8fab78da04a8e20f2c5f8``
  ``examples/models/contrib/t5tts/run_decoder_multiling_executor.py`` (v2607: 8 codebooks, stacking 2):
  ``num_vocabs = 16`` ("must match engine's num_vocabs ... = books_num*stacking_factor"), dummy ids
  ``[0] * ctx_positions * books_num * stacking_factor``, ``decoder_context_features`` = NeMo's decoder prefix with the
  BOS embedding appended ("218 positions = 217 context + 1 BOS"), ``end_id = pad_id = 2017``; the output is reshaped
  to ``(-1, books_num)`` rows (frames), frame ``f`` of a step de-offset by ``(i + f * books_num) * book_size`` for
  codebook ``i``, cut at the first row holding EOS.
* ``anand-nv@0c0df9f0`` ``cpp/tensorrt_llm/batch_manager/runtimeBuffers.cpp`` ``setFromInputs``: a context request's
  features are copied for every CFG sequence when the tensor holds ``numSequences * promptLen`` rows ([cond; uncond]),
  otherwise for the conditional sequence only, the unconditional rows staying masked: their ids are the service token
  ``vocab_size`` (``dummyTokens.assign(..., getVocabSize())``), a zero embedding row, BOS frame included. The Riva
  Triton backend builds the unconditional half as zeros with the BOS row kept ("The unconditional half has zero
  context but must keep the BOS row"; a Triton ``model.py`` found by content in the code index, repository not named
  by it), which is NeMo's ``prepare_dummy_cond_for_cfg`` (zero prefix, BOS and audio frames kept).

Prompt (architecture.md 5): the context codes framed as the reference does (``CONTEXT_BOS`` frame, codes,
``CONTEXT_EOS`` frame, padded to whole stacks), then the ``BOS`` stack; a position holds ``C * S`` ids (S =
``frame_stacking_factor``), frame ``s`` codebook ``c`` contributing ``code + (c + s * C) * V`` (``V`` = tokens per
codebook, 2024 for the released model; ``S = 1`` is rmittal's layout ``code_c + c * V``). With
``context_as_features`` the prompt rows are the reference's context embeddings followed by the BOS-frame embedding
("Magpie's Riva path bakes the generated-audio BOS into decoder_context_features", anand-nv runtimeBuffers.cpp
comment), with dummy zero ids. ``decoder_ce`` models always run so: the engine runs neither the context encoder
nor holds the baked table (``trt.convert``), so their rows are the reference's ``decoder_context(batch)`` rows of
valid length. Encoder outputs come from the reference model's encoder (the decoder engine runs alone, as in the
fork's runner).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from trt.build import BackendUnavailable

FORK_RUNNER = ("rmittal-github/TensorRT-LLM@ae81c0781cc4336c67aaeed8a6fe7e9ef1c081c0:"
               "examples/models/contrib/t5tts/run_decoder_multiling.py")
FORK_MODEL_RUNNER_CPP = ("rmittal-github/TensorRT-LLM@e7109d5b53686dda8363697e3ffb54eccac84197:"
                         "tensorrt_llm/runtime/model_runner_cpp.py")
FORK_EXECUTOR_RUNNER = ("anand-nv/TensorRT-LLM@0c0df9f0deddec40b2a8fab78da04a8e20f2c5f8:"
                        "examples/models/contrib/t5tts/run_decoder_multiling_executor.py")


class RunnerInputError(ValueError):
    """A batch or setting the engine run cannot take."""


# ------------------------------------------------------------------------------------------ pure: ids


def flat_ids(codes: torch.Tensor, vocab_per_codebook: int, stacking: int = 1) -> torch.Tensor:
    """``(C, T)`` codes -> ``(T * C,)`` int32 flat ids, position-major: a position is ``stacking`` frames, frame ``s``
    codebook ``c`` offset by ``(c + s * C) * V`` (NeMo's ``audio_embeddings[c + s * C]``; with ``stacking=1``
    codebook ``c`` is offset by ``c * V``, the fork's layout). ``T`` must be whole stacks."""
    if codes.dim() != 2:
        raise RunnerInputError(f"codes must be (C, T), got shape {tuple(codes.shape)}")
    C, T = codes.shape
    if stacking < 1 or T % stacking:
        raise RunnerInputError(f"{T} frames are not whole stacks of {stacking}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_per_codebook):
        raise RunnerInputError(f"codes must lie in [0, {vocab_per_codebook}), got [{int(codes.min())}, "
                               f"{int(codes.max())}]")
    offs = torch.arange(C, dtype=torch.long).unsqueeze(1) * vocab_per_codebook
    frames = codes.long().T + offs.T  # (T, C): frame t, codebook c -> code + c * V
    shift = (torch.arange(T) % stacking) * C * vocab_per_codebook  # frame s of its stack: + s * C * V
    return (frames + shift.unsqueeze(1)).reshape(-1).to(torch.int32)


def unflatten_ids(ids: torch.Tensor, num_codebooks: int, vocab_per_codebook: int, stacking: int = 1) -> torch.Tensor:
    """Inverse of :func:`flat_ids`: ``(T * C,)`` -> ``(C, T)`` de-offset codes (the de-offset of anand-nv@0c0df9f0
    run_decoder_multiling_executor.py: rows ``f::S`` minus ``(i + f * C) * V``)."""
    ids = ids.reshape(-1).long()
    C = num_codebooks
    if ids.numel() % (C * stacking):
        raise RunnerInputError(f"{ids.numel()} ids are not whole frames of {C} codebooks"
                               + (f" x {stacking} stacked frames" if stacking > 1 else ""))
    frames = ids.reshape(-1, C)
    s = (torch.arange(frames.shape[0]) % stacking).unsqueeze(1)
    return (frames - (torch.arange(C) + s * C) * vocab_per_codebook).T.contiguous()


def prompt_codes(config, context_codes: torch.Tensor, context_len: int) -> torch.Tensor:
    """A batch row of raw context codes ``(C, T_max)`` -> the prompt frames ``(C, (P + 1) * S)``: ``CONTEXT_BOS``,
    the ``context_len`` codes, ``CONTEXT_EOS``, padded to whole stacks of ``S = frame_stacking_factor`` as NeMo pads
    them (``add_special_tokens`` keeps the row's later frames, ``embed_audio_tokens`` pads with 0), then the ``BOS``
    stack the engine's prompt ends with: the reference's step-0 decoder input. ``S = 1``: ``(C, context_len + 3)``."""
    C, S = config.num_audio_codebooks, config.frame_stacking_factor
    row = context_codes.long()
    n = int(context_len)
    col = lambda v, k=1: torch.full((C, k), v, dtype=torch.long)  # noqa: E731
    framed = torch.cat([col(config.context_audio_bos_id), row[:, :n], col(config.context_audio_eos_id)], dim=1)
    pad = (-framed.shape[1]) % S
    if pad:
        # frame j >= n + 2 of NeMo's framed row is the batch row's frame j - 1 (zeros past its end)
        tail = row[:, n + 1:n + 1 + pad]
        framed = torch.cat([framed, tail, col(0, pad - tail.shape[1])], dim=1)
    return torch.cat([framed, col(config.audio_bos_id, S)], dim=1)


def bos_embedding(model) -> torch.Tensor:
    """The BOS stack's embedding ``(1, D)``: the reference's step-0 audio input (``DecoderSteps``)."""
    c = model.config
    S = c.frame_stacking_factor
    bos = torch.full((1, c.num_audio_codebooks, S), c.audio_bos_id, dtype=torch.long)
    with torch.no_grad():
        emb, _ = model.embed_audio_tokens(bos, torch.full((1,), S))
    return emb[0]


# ------------------------------------------------------------------------------------------ pure: requests


@dataclass
class EngineRequest:
    """One ``generate`` request (list element of each ``generate`` argument)."""

    input_ids: torch.Tensor  # (P * C * S,) int32: P prompt positions of C codebooks x S stacked frames
    encoder_input_features: torch.Tensor  # (T_text, D)
    encoder_output_length: int
    # (P, D) with context_as_features; (2P, D) [cond; uncond] with CFG (cfg_uncond_features)
    decoder_context_features: Optional[torch.Tensor] = None

    @property
    def prompt_frames(self) -> int:
        """The prompt's length in ids (what the engine's output repeats before the generated ids)."""
        return int(self.input_ids.numel())


def decoder_ce_refusal(config) -> str:
    """The one line for context-as-ids on a decoder_ce model."""
    what = "holds no baked speaker table" if config.baked else "cannot run the context encoder"
    return (f"decoder_ce: the engine {what}; its prompt is decoder_context_features (the reference's decoder_context "
            "rows and the BOS-frame embedding, dummy zero ids): pass context_as_features=True")


def reference_encoder_features(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per item, the reference encoder output ``(text_len, D)`` (the decoder engine's ``encoder_input_features``)."""
    with torch.no_grad():
        enc = model.encode_text(batch["text"], batch["text_lens"])
    return [enc.output[b, :int(n)].clone() for b, n in enumerate(batch["text_lens"])]


def reference_context_features(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per item, the prompt embeddings ``(P + 1, D)``, positions not added (the engine adds them): the context
    prefix rows, then the BOS-frame embedding (:func:`bos_embedding`).

    decoder_context_tts: the context codes framed by the context specials (:func:`prompt_codes`), embedded.
    decoder_ce: the reference's ``decoder_context(batch)`` rows of valid length (the context encoder's output, or the
    baked rows of ``batch['speaker_indices']``), as the forks feed the baked context (``zh_es_en_fr.pt`` /
    ``additional_decoder_input.pt`` rows with the BOS row appended, module docstring)."""
    c = model.config
    out = []
    with torch.no_grad():
        if c.model_type == "decoder_ce":
            emb, mask = model.decoder_context(batch)
            bos = bos_embedding(model).to(emb.dtype)
            for b in range(emb.shape[0]):
                n = int(mask[b].sum())
                out.append(torch.cat([emb[b, :n], bos]).clone())
            return out
        for b, n in enumerate(batch["context_audio_codes_lens"]):
            codes = prompt_codes(c, batch["context_audio_codes"][b], int(n))
            emb, _ = model.embed_audio_tokens(codes.unsqueeze(0), torch.tensor([codes.shape[1]]))
            out.append(emb[0].clone())
    return out


def uncond_context_features(features: torch.Tensor) -> torch.Tensor:
    """CFG's unconditional prompt rows for ``features`` ``(P, D)``: zeros, the last (BOS) row kept: NeMo's
    ``prepare_dummy_cond_for_cfg`` (zero context prefix; the BOS frame is embedded as for the conditional rows) and the
    Riva Triton backend's ``uncond_features[-1] = cond_features[-1]``."""
    u = torch.zeros_like(features)
    u[-1] = features[-1]
    return u


def build_requests(config, batch: dict[str, torch.Tensor], encoder_features: Sequence[torch.Tensor], *,
                   context_features: Optional[Sequence[torch.Tensor]] = None, context_as_features: bool = False,
                   dtype: torch.dtype = torch.float16, use_cfg: bool = False,
                   cfg_uncond_features: bool = True) -> list[EngineRequest]:
    """Requests as the forks' runners build them, one per batch item.

    Context as ids (decoder_context_tts): :func:`prompt_codes` flattened by :func:`flat_ids`. Context as features
    (``context_as_features``, always for decoder_ce): ``context_features`` rows (:func:`reference_context_features`)
    with ``P * C * S`` dummy zero ids. With ``use_cfg`` and ``cfg_uncond_features`` the features hold ``[cond;
    uncond]`` (:func:`uncond_context_features`), which anand-nv@0c0df9f0's runtime copies to the unconditional
    sequence (NeMo's unconditional prompt); ``cfg_uncond_features=False`` passes the conditional rows only, as
    run_decoder_multiling(_executor).py do, and that runtime then feeds the zero service token to every
    unconditional prompt row, BOS included (``trt.engine``'s ``cfg_prompt="zeros"``)."""
    B = int(batch["text_lens"].shape[0])
    if config.model_type == "decoder_ce" and not context_as_features:
        raise RunnerInputError(decoder_ce_refusal(config))
    if len(encoder_features) != B:
        raise RunnerInputError(f"{len(encoder_features)} encoder feature tensors for a batch of {B}")
    if context_as_features and (context_features is None or len(context_features) != B):
        raise RunnerInputError("context_as_features needs one context feature tensor per item")
    V, C, S = config.num_all_tokens_per_codebook, config.num_audio_codebooks, config.frame_stacking_factor
    reqs = []
    for b in range(B):
        enc = encoder_features[b]
        if enc.dim() != 2 or enc.shape[0] != int(batch["text_lens"][b]):
            raise RunnerInputError(f"item {b}: encoder features {tuple(enc.shape)}, expected "
                                   f"({int(batch['text_lens'][b])}, D)")
        codes = None
        if config.model_type != "decoder_ce":
            codes = prompt_codes(config, batch["context_audio_codes"][b], int(batch["context_audio_codes_lens"][b]))
        if context_as_features:
            feats = context_features[b]
            if feats.dim() != 2 or feats.shape[0] < 1:
                raise RunnerInputError(f"item {b}: context features must be (P, D) with P >= 1, got "
                                       f"{tuple(feats.shape)}")
            if codes is not None and feats.shape[0] * S != codes.shape[1]:
                raise RunnerInputError(f"item {b}: {feats.shape[0]} context feature rows for a prompt of "
                                       f"{codes.shape[1] // S} positions")
            if use_cfg and cfg_uncond_features:
                feats = torch.cat([feats, uncond_context_features(feats)])
            rows = context_features[b].shape[0]
            ids = torch.zeros(rows * C * S, dtype=torch.int32)  # the forks' dummy ids
            reqs.append(EngineRequest(ids, enc.to(dtype), enc.shape[0], feats.to(dtype)))
        else:
            reqs.append(EngineRequest(flat_ids(codes, V, S), enc.to(dtype), enc.shape[0]))
    return reqs


def sampling_kwargs(*, use_cfg: bool, cfg_scale: float, temperature: float, top_k: int, end_id: int,
                    max_new_tokens: int) -> dict:
    """``generate`` keyword arguments for sampling and stopping. The fork treats a request as CFG iff
    ``cfg_scale`` is set and != 1.0 (``LlmRequest::isCfg``); without CFG the key is left out."""
    if max_new_tokens < 1:
        raise RunnerInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0 or temperature <= 0:
        raise RunnerInputError(f"top_k must be >= 0 and temperature > 0 (got {top_k}, {temperature})")
    kw = dict(max_new_tokens=int(max_new_tokens), end_id=int(end_id), pad_id=int(end_id),
              temperature=float(temperature), top_k=int(top_k), streaming=False,
              return_dict=True, output_sequence_lengths=True)
    if use_cfg:
        if cfg_scale == 1.0:
            raise RunnerInputError("cfg_scale=1.0 turns CFG off in the fork (isCfg is cfgScale != 1.0); "
                                   "pass use_cfg=False instead")
        if cfg_scale <= -10:
            raise RunnerInputError(f"cfg_scale must be > -10 (the runtime's check), got {cfg_scale}")
        kw["cfg_scale"] = float(cfg_scale)
    return kw


def generate_kwargs(requests: Sequence[EngineRequest], sampling: dict, context_as_features: bool) -> dict:
    kw = dict(batch_input_ids=[r.input_ids for r in requests],
              encoder_input_features=[r.encoder_input_features for r in requests],
              encoder_output_lengths=[r.encoder_output_length for r in requests], **sampling)
    if context_as_features:
        kw["decoder_context_features"] = [r.decoder_context_features for r in requests]
    return kw


def decoder_engine_dir(engine_dir: str | os.PathLike) -> Path:
    """The decoder engine folder: ``engine_dir/decoder`` if present, else ``engine_dir`` itself."""
    d = Path(engine_dir)
    if (d / "decoder" / "config.json").is_file():
        return d / "decoder"
    if (d / "config.json").is_file():
        return d
    raise RunnerInputError(f"{d}: no decoder engine (config.json in it or in decoder/)")


def runner_kwargs(engine_dir: str | os.PathLike, *, multi_block_mode: bool, debug: bool,
                  max_input_len: int = 512) -> dict:
    """``ModelRunnerCpp.from_dir`` arguments as the fork's runner passes them (decoder engine alone)."""
    return dict(engine_dir=str(decoder_engine_dir(engine_dir)), is_enc_dec=False, max_input_len=max_input_len,
                rank=0, multi_block_mode=bool(multi_block_mode), debug_mode=bool(debug),
                cross_kv_cache_fraction=0.5, kv_cache_free_gpu_memory_fraction=0.7)


def decode_outputs(output_ids: torch.Tensor, sequence_lengths: Optional[torch.Tensor], prompt_ids: Sequence[int],
                   num_codebooks: int, vocab_per_codebook: int, eos_id: int, stacking: int = 1) -> list[torch.Tensor]:
    """``[B, beams, L]`` flat output ids -> per item ``(C, T)`` generated codes, cut before the first frame with
    EOS in any codebook (the forks' runners' rule; with ``stacking`` S a step is S frames, de-offset as
    :func:`unflatten_ids`)."""
    out = []
    step = num_codebooks * stacking
    for b in range(output_ids.shape[0]):
        end = int(sequence_lengths[b][0]) if sequence_lengths is not None else output_ids.shape[-1]
        gen = output_ids[b, 0, int(prompt_ids[b]):end]
        gen = gen[: gen.numel() - gen.numel() % step]
        codes = unflatten_ids(gen, num_codebooks, vocab_per_codebook, stacking)
        hit = (codes == eos_id).any(0).nonzero()
        if hit.numel():
            codes = codes[:, : int(hit[0])]
        out.append(codes)
    return out


# ------------------------------------------------------------------------------------------ the run


@dataclass
class EngineRun:
    codes: list[torch.Tensor]  # per item (C, T)
    dump: Optional[Path]  # canonical dump (debug runs with dump_out)
    tree: Optional[Path]  # the moved tllm_debug tree (debug runs)


def _import_runner():
    try:
        from tensorrt_llm.runtime import ModelRunnerCpp  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT-LLM is not importable here ({exc}); run_engine needs the t5tts fork of TensorRT-LLM "
            "(NVIDIA's container + the fork's wheel) and a GPU") from None
    return ModelRunnerCpp


@contextlib.contextmanager
def _tmpdir_env(path: Path):
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old


def run_engine(engine_dir, batch: dict[str, torch.Tensor], *, use_cfg: bool, cfg_scale: float,
               multi_block_mode: bool = False, debug: bool = False, max_new_tokens: int, temperature: float,
               top_k: int, end_id: Optional[int] = None, context_as_features: bool = False,
               dump_out: Optional[str | os.PathLike] = None, model=None,
               encoder_features: Optional[Sequence[torch.Tensor]] = None,
               cfg_uncond_features: bool = True) -> EngineRun:
    """Run the decoder engine on ``batch`` (NOT EXECUTED HERE: see the module docstring).

    model: the reference :class:`reference.MagpieTTS` of the same checkpoint (for a converted checkpoint:
    ``trt.convert.reference_from_trtllm``); it supplies the config, the encoder outputs (unless
    ``encoder_features`` is given) and, with ``context_as_features``, the prompt embeddings. decoder_ce models need
    ``context_as_features=True`` (their ``decoder_context`` rows; baked batches name ``speaker_indices``).
    cfg_uncond_features: with CFG, also pass the unconditional prompt rows (:func:`build_requests`).
    debug: build the executor with ``debug_mode=True``; the ``tllm_debug`` tree is moved to
    ``<dump_out>.tllm_debug`` (or a temp folder) and, with ``dump_out``, ingested into a canonical dump.
    multi_block_mode defaults to False: the fork applies the attention prior only in the single-block kernel.
    """
    if model is None:
        raise RunnerInputError("run_engine needs model= (the reference model of the same checkpoint) for the "
                               "config, the encoder outputs and the context embeddings")
    if dump_out is not None and not debug:
        raise RunnerInputError("dump_out needs debug=True (the dump comes from the engine's debug tensors)")
    config = model.config
    if config.model_type == "decoder_ce" and not context_as_features:
        raise RunnerInputError(decoder_ce_refusal(config))
    end_id = config.audio_eos_id if end_id is None else end_id
    sampling = sampling_kwargs(use_cfg=use_cfg, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                               end_id=end_id, max_new_tokens=max_new_tokens)
    enc = encoder_features if encoder_features is not None else reference_encoder_features(model, batch)
    ctx = reference_context_features(model, batch) if context_as_features else None
    reqs = build_requests(config, batch, enc, context_features=ctx, context_as_features=context_as_features,
                          use_cfg=use_cfg, cfg_uncond_features=cfg_uncond_features)
    gen_kw = generate_kwargs(reqs, sampling, context_as_features)
    from_dir_kw = runner_kwargs(engine_dir, multi_block_mode=multi_block_mode, debug=debug)

    ModelRunnerCpp = _import_runner()
    work = Path(tempfile.mkdtemp(prefix="magpie-trt-"))
    env = _tmpdir_env(work) if debug else contextlib.nullcontext()
    with env, torch.no_grad():
        runner = ModelRunnerCpp.from_dir(**from_dir_kw)
        outputs = runner.generate(**gen_kw)
        del runner
    codes = decode_outputs(outputs["output_ids"].cpu(), outputs.get("sequence_lengths"),
                           [r.prompt_frames for r in reqs], config.num_audio_codebooks,
                           config.num_all_tokens_per_codebook, end_id, config.frame_stacking_factor)
    tree = dump = None
    if debug:
        src = work / "tllm_debug"
        if not src.is_dir():
            raise RuntimeError(f"debug run wrote no {src}: the executor did not dump (TMPDIR not honoured?)")
        tree = Path(f"{dump_out}.tllm_debug") if dump_out is not None else work / "kept_tllm_debug"
        shutil.move(str(src), str(tree))
        if dump_out is not None:
            from trt.ingest import ingest_trtllm

            dump = ingest_trtllm(tree, dump_out, batch_size=len(reqs), use_cfg=use_cfg,
                                 cfg_scale=cfg_scale if use_cfg else None)
    return EngineRun(codes, dump, tree)
