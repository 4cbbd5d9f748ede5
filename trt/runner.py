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
  ``**kwargs`` - ``context_as_features=True`` needs a fork version that forwards it (not found; assumption).
  ``from_dir(..., debug_mode=True)`` gives ``DebugConfig(debug_input_tensors=True, debug_output_tensors=True)``,
  which dumps every iteration to ``std::filesystem::temp_directory_path()/tllm_debug`` (trtllm.md 1.3): the
  runner points ``TMPDIR`` at a fresh folder for the run (assumed to be read when the executor dumps).

Prompt (architecture.md 5): the context codes framed as the reference does (``CONTEXT_BOS`` frame, codes,
``CONTEXT_EOS`` frame), then one ``BOS`` frame; frame ``t`` contributes ``code_c + c * V`` for ``c = 0..C-1``
(``V`` = tokens per codebook, 2024 for the released model). With ``context_as_features`` the prompt rows are the
reference's context embeddings followed by the BOS-frame embedding ("Magpie's Riva path bakes the generated-audio
BOS into decoder_context_features", ANV runtimeBuffers comment). Encoder outputs come from the reference model's
encoder (the decoder engine runs alone, as in the fork's runner).
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


class RunnerInputError(ValueError):
    """A batch or setting the engine run cannot take."""


# ------------------------------------------------------------------------------------------ pure: ids


def flat_ids(codes: torch.Tensor, vocab_per_codebook: int) -> torch.Tensor:
    """``(C, T)`` codes -> ``(T * C,)`` int32 flat ids, frame-major, codebook ``c`` offset by ``c * V``."""
    if codes.dim() != 2:
        raise RunnerInputError(f"codes must be (C, T), got shape {tuple(codes.shape)}")
    C = codes.shape[0]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_per_codebook):
        raise RunnerInputError(f"codes must lie in [0, {vocab_per_codebook}), got [{int(codes.min())}, "
                               f"{int(codes.max())}]")
    offs = torch.arange(C, dtype=torch.long).unsqueeze(1) * vocab_per_codebook
    return (codes.long() + offs).T.reshape(-1).to(torch.int32)


def unflatten_ids(ids: torch.Tensor, num_codebooks: int, vocab_per_codebook: int) -> torch.Tensor:
    """Inverse of :func:`flat_ids`: ``(T * C,)`` -> ``(C, T)`` de-offset codes."""
    ids = ids.reshape(-1).long()
    if ids.numel() % num_codebooks:
        raise RunnerInputError(f"{ids.numel()} ids are not whole frames of {num_codebooks} codebooks")
    frames = ids.reshape(-1, num_codebooks)
    return (frames - torch.arange(num_codebooks) * vocab_per_codebook).T.contiguous()


def prompt_codes(config, context_codes: torch.Tensor, context_len: int) -> torch.Tensor:
    """``(C, T_ctx)`` raw context codes -> ``(C, context_len + 3)``: ``CONTEXT_BOS``, the codes, ``CONTEXT_EOS``,
    then the ``BOS`` frame the engine's prompt ends with (the reference's step-0 decoder input)."""
    if config.frame_stacking_factor != 1:
        raise RunnerInputError(f"frame_stacking_factor={config.frame_stacking_factor}: the fork's engines take one "
                               "frame per position")
    C = config.num_audio_codebooks
    codes = context_codes[:, :context_len].long()
    col = lambda v: torch.full((C, 1), v, dtype=torch.long)  # noqa: E731
    return torch.cat([col(config.context_audio_bos_id), codes, col(config.context_audio_eos_id),
                      col(config.audio_bos_id)], dim=1)


# ------------------------------------------------------------------------------------------ pure: requests


@dataclass
class EngineRequest:
    """One ``generate`` request (list element of each ``generate`` argument)."""

    input_ids: torch.Tensor  # (T_prompt * C,) int32
    encoder_input_features: torch.Tensor  # (T_text, D)
    encoder_output_length: int
    decoder_context_features: Optional[torch.Tensor] = None  # (T_prompt, D) with context_as_features

    @property
    def prompt_frames(self) -> int:
        return int(self.input_ids.numel())


def reference_encoder_features(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per item, the reference encoder output ``(text_len, D)`` (the decoder engine's ``encoder_input_features``)."""
    with torch.no_grad():
        enc = model.encode_text(batch["text"], batch["text_lens"])
    return [enc.output[b, :int(n)].clone() for b, n in enumerate(batch["text_lens"])]


def reference_context_features(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per item, the prompt embeddings ``(context_len + 3, D)``: the reference's context embedding rows (framed by
    the context specials) followed by the BOS-frame embedding, positions not added (the engine adds them)."""
    c = model.config
    out = []
    with torch.no_grad():
        for b, n in enumerate(batch["context_audio_codes_lens"]):
            codes = prompt_codes(c, batch["context_audio_codes"][b], int(n))
            emb, _ = model.embed_audio_tokens(codes.unsqueeze(0), torch.tensor([codes.shape[1]]))
            out.append(emb[0].clone())
    return out


def build_requests(config, batch: dict[str, torch.Tensor], encoder_features: Sequence[torch.Tensor], *,
                   context_features: Optional[Sequence[torch.Tensor]] = None, context_as_features: bool = False,
                   dtype: torch.dtype = torch.float16) -> list[EngineRequest]:
    """Requests as the fork's runner builds them, one per batch item."""
    B = int(batch["text_lens"].shape[0])
    if len(encoder_features) != B:
        raise RunnerInputError(f"{len(encoder_features)} encoder feature tensors for a batch of {B}")
    if context_as_features and (context_features is None or len(context_features) != B):
        raise RunnerInputError("context_as_features needs one context feature tensor per item")
    V, C = config.num_all_tokens_per_codebook, config.num_audio_codebooks
    reqs = []
    for b in range(B):
        codes = prompt_codes(config, batch["context_audio_codes"][b], int(batch["context_audio_codes_lens"][b]))
        enc = encoder_features[b]
        if enc.dim() != 2 or enc.shape[0] != int(batch["text_lens"][b]):
            raise RunnerInputError(f"item {b}: encoder features {tuple(enc.shape)}, expected "
                                   f"({int(batch['text_lens'][b])}, D)")
        if context_as_features:
            feats = context_features[b]
            if feats.shape[0] != codes.shape[1]:
                raise RunnerInputError(f"item {b}: {feats.shape[0]} context feature rows for a prompt of "
                                       f"{codes.shape[1]} frames")
            ids = torch.zeros(codes.shape[1] * C, dtype=torch.int32)  # the fork's dummy ids
            reqs.append(EngineRequest(ids, enc.to(dtype), enc.shape[0], feats.to(dtype)))
        else:
            reqs.append(EngineRequest(flat_ids(codes, V), enc.to(dtype), enc.shape[0]))
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
                   num_codebooks: int, vocab_per_codebook: int, eos_id: int) -> list[torch.Tensor]:
    """``[B, beams, L]`` flat output ids -> per item ``(C, T)`` generated codes, cut before the first frame with
    EOS in any codebook (the fork runner's rule)."""
    out = []
    for b in range(output_ids.shape[0]):
        end = int(sequence_lengths[b][0]) if sequence_lengths is not None else output_ids.shape[-1]
        gen = output_ids[b, 0, int(prompt_ids[b]):end]
        gen = gen[: gen.numel() - gen.numel() % num_codebooks]
        codes = unflatten_ids(gen, num_codebooks, vocab_per_codebook)
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
               encoder_features: Optional[Sequence[torch.Tensor]] = None) -> EngineRun:
    """Run the decoder engine on ``batch`` (NOT EXECUTED HERE: see the module docstring).

    model: the reference :class:`reference.MagpieTTS` of the same checkpoint; it supplies the config, the encoder
    outputs (unless ``encoder_features`` is given) and, with ``context_as_features``, the prompt embeddings.
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
    end_id = config.audio_eos_id if end_id is None else end_id
    sampling = sampling_kwargs(use_cfg=use_cfg, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                               end_id=end_id, max_new_tokens=max_new_tokens)
    enc = encoder_features if encoder_features is not None else reference_encoder_features(model, batch)
    ctx = reference_context_features(model, batch) if context_as_features else None
    reqs = build_requests(config, batch, enc, context_features=ctx, context_as_features=context_as_features)
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
                           config.num_all_tokens_per_codebook, end_id)
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
