"""Dumps of the reference model in the same names and layout as ``parity.nemo_capture`` writes for NeMo."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def dump_reference_process_batch(model, batch: dict[str, torch.Tensor], out_dir: str | Path, *,
                                 overwrite: bool = False, names: Optional[list[str]] = None) -> Path:
    """Teacher-forced ``process_batch`` with every capture point (or ``names``) written to a dump."""
    from parity.dump import DumpWriter

    inputs = {k: list(v.shape) for k, v in batch.items()}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    with DumpWriter(out_dir, source="reference", config_hash=model.config.hash(), dtype=dtype, inputs=inputs,
                    layout={"mode": "teacher-forced"}, overwrite=overwrite) as writer:
        with torch.no_grad(), model.capture(names, sink=lambda n, t, s: writer.add(n, t, step=s)):
            model.process_batch(batch)
    return Path(out_dir)


def dump_reference_infer(model, batch: dict[str, torch.Tensor], out_dir: str | Path, *, use_cfg: bool, seed: int,
                         capture_layers: bool = False, overwrite: bool = False, progress: bool = False,
                         run: Optional[Callable[..., Any]] = None, dtype: Optional[str] = None,
                         layout_extra: Optional[dict] = None, **kw):
    """``infer_batch`` with per-step ``logits`` (B, 1, C*V), ``inference.attn_prior``,
    ``inference.attended_text_position`` and, with ``capture_layers``, every capture point each step.

    run(model, batch, use_cfg=..., progress=..., **kw): the loop to run (default: ``model.infer_batch``; the engine
    emulation passes its own); dtype: the precision the run computes in, recorded in the manifest (default: the
    model's); layout_extra: more layout fields (e.g. the policy that produced it).
    Returns the loop's :class:`~reference.inference.InferOutput`."""
    from parity.dump import DumpWriter
    from reference.inference import resolve_parameters

    inputs = {k: list(v.shape) for k, v in batch.items()}
    dtype = dtype or str(next(model.parameters()).dtype).replace("torch.", "")
    params = {k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(model.config.inference)}}
    resolved = dataclasses.asdict(resolve_parameters(model.config.inference, **params))
    kv = kw.get("use_kv_cache")
    layout = {"mode": "infer", "use_cfg": use_cfg, "seed": seed,
              "use_kv_cache": model.config.use_kv_cache_for_inference if kv is None else bool(kv),
              "params": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in resolved.items()},
              **(layout_extra or {})}
    if run is None:
        run = model.infer_batch
    else:
        run = functools.partial(run, model)
    with DumpWriter(out_dir, source="reference", config_hash=model.config.hash(), dtype=dtype, inputs=inputs,
                    layout=layout, overwrite=overwrite) as writer:
        names = None if capture_layers else ["logits"]
        cap = model.capture(names, sink=lambda n, t, s: writer.add(n, t, step=s))
        torch.manual_seed(seed)
        with cap:
            out = run(batch, use_cfg=use_cfg, progress=progress, **kw)
        for k in sorted(out.built_priors):
            writer.add("inference.attn_prior", out.built_priors[k], step=k)
            writer.add("inference.attended_text_position", torch.tensor(out.attended_by_step[k]), step=k)
        writer.add("predicted_codes", out.predicted_codes, step=None)
        writer.add("predicted_codes_lens", out.predicted_codes_lens, step=None)
    return out


def generate_speech_kv_cache(model, n_chunks: int, use_kv_cache: Optional[bool] = None) -> bool:
    """The decoder path of a generate_speech run: ``use_kv_cache`` if given, else NeMo's long-form runner's rule
    (``parity.nemo_capture.dump_nemo_generate_speech`` follows it): the checkpoint's
    ``use_kv_cache_for_inference`` for a single chunk, recompute for several."""
    if use_kv_cache is not None:
        return bool(use_kv_cache)
    return bool(model.config.use_kv_cache_for_inference) if n_chunks == 1 else False


def dump_reference_generate_speech(model, chunks: list[dict], out_dir: str | Path, *, use_cfg: bool, seed: int,
                                   use_local_transformer_for_inference: bool = True, maskgit: dict | None = None,
                                   capture_steps: bool = True, overwrite: bool = False,
                                   use_kv_cache: Optional[bool] = None, **params):
    """The reference's chunked ``generate_speech`` over consecutive chunks sharing one ``ChunkState``, written
    in the names, steps and layout ``parity.nemo_capture.dump_nemo_generate_speech`` writes for NeMo, so that
    ``magpie-parity compare`` lines the two up.

    ``chunks``: one dict per call, ``{"batch": {...}, "end_of_text": [bool] * B, "beginning_of_text": bool}``
    (``parity.chunks.read_chunk_set``). ``params``: NeMo ``inference_parameters`` fields (overrides of the
    checkpoint's); ``maskgit``: ``generate_speech``'s ``maskgit_*`` arguments without the prefix. Seeding as
    NeMo's dump and ``do_tts``: ``torch.manual_seed(seed)`` once, before the first chunk (the random stream runs
    on across chunks). ``use_kv_cache``: the decoder path (default: NeMo's runner rule,
    :func:`generate_speech_kv_cache`).

    Written per chunk k (step = k): ``chunk.<key>`` (the inputs as given), ``chunk.end_of_text``,
    ``chunk.beginning_of_text``, ``predicted_codes`` / ``predicted_codes_lens``,
    ``inference.chunk_attended_text_positions`` (steps of the chunk, B) and, from the second chunk on,
    ``inference.chunk_initial_prior``; with ``capture_steps``, per decoder step g counted over all chunks:
    ``logits`` (B, 1, C * V, CFG-combined), ``inference.attended_text_position`` (B,) and ``inference.attn_prior``
    (the prior built at step g). The layout holds ``chunk_steps`` and ``chunk_states`` as NeMo's.
    Returns the loop's outputs, one :class:`~reference.inference.InferOutput` per chunk."""
    from parity.chunks import CHUNK_KEYS, chunk_inputs
    from parity.dump import DumpWriter
    from reference.inference import resolve_parameters

    if not chunks:
        raise ValueError("dump_reference_generate_speech needs at least one chunk")
    B = int(chunks[0]["batch"]["text"].shape[0])
    cached = generate_speech_kv_cache(model, len(chunks), use_kv_cache)
    maskgit = dict(maskgit or {})
    gen_kwargs = {f"maskgit_{k}": v for k, v in maskgit.items()}
    resolved = dataclasses.asdict(resolve_parameters(model.config.inference, **params))
    layout = {"mode": "generate_speech", "use_cfg": use_cfg, "seed": seed, "n_chunks": len(chunks),
              "use_local_transformer_for_inference": bool(use_local_transformer_for_inference),
              "maskgit": maskgit, "use_kv_cache": cached,
              "seeding": "torch.manual_seed(seed) once, before the first chunk",
              "steps": {"chunk.*, predicted_codes, predicted_codes_lens, inference.chunk_initial_prior, "
                        "inference.chunk_attended_text_positions": "chunk index",
                        "logits, inference.attended_text_position, inference.attn_prior":
                        "decoder step counted over all chunks (chunk_steps: [first step, steps] per chunk)"},
              "params": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in resolved.items()}}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    records: list[tuple[str, torch.Tensor, int]] = []  # the layout is known at the end: run first, write after
    chunk_steps: list[list[int]] = []
    chunk_states: list[dict] = []
    outputs = []
    first = 0

    def add(name, t, s):
        records.append((name, t.detach().clone(), s))

    state = model.create_chunk_state(B)
    torch.manual_seed(seed)
    for k, c in enumerate(chunks):
        batch, eot, bot = c["batch"], [bool(x) for x in c["end_of_text"]], bool(c["beginning_of_text"])
        for key in CHUNK_KEYS:
            if key in batch:
                add(f"chunk.{key}", batch[key], k)
        add("chunk.end_of_text", torch.tensor(eot, dtype=torch.bool), k)
        add("chunk.beginning_of_text", torch.tensor(bot, dtype=torch.bool), k)
        step_logits: dict[int, torch.Tensor] = {}
        cap = (model.capture(["logits"], sink=lambda n, t, s: step_logits.setdefault(s, t)) if capture_steps
               else contextlib.nullcontext())
        with cap:
            out = model.generate_speech(batch, state, eot, bot, use_cfg=use_cfg,
                                        use_local_transformer_for_inference=use_local_transformer_for_inference,
                                        use_kv_cache=cached, **gen_kwargs, **params)
        if out.step_priors and out.step_priors[0] is not None:
            add("inference.chunk_initial_prior", out.step_priors[0], k)
        if capture_steps:
            for idx in range(out.num_steps):
                if idx < len(out.attended_text_positions):
                    add("inference.attended_text_position",
                        torch.tensor(out.attended_text_positions[idx], dtype=torch.long), first + idx)
                if idx in out.built_priors:
                    add("inference.attn_prior", out.built_priors[idx], first + idx)
                add("logits", step_logits[idx], first + idx)
        add("predicted_codes", out.predicted_codes, k)
        add("predicted_codes_lens", out.predicted_codes_lens, k)
        add("inference.chunk_attended_text_positions",
            torch.tensor(out.attended_text_positions, dtype=torch.long).reshape(len(out.attended_text_positions), B),
            k)
        chunk_steps.append([first, out.num_steps])
        first += out.num_steps
        chunk_states.append({
            "left_offset": [int(x) for x in state.left_offset],
            "end_indices": {str(i): int(v) for i, v in sorted(state.end_indices.items())},
            "overall_idx": int(state.overall_idx),
            "previous_attn_len": [int(x) for x in state.previous_attn_len],
            "window_text_lens": [int(x) for x in state.history_text_lens],
        })
        outputs.append(out)
    layout["chunk_steps"] = chunk_steps
    layout["chunk_states"] = chunk_states
    with DumpWriter(out_dir, source="reference", config_hash=model.config.hash(), dtype=dtype,
                    inputs=chunk_inputs(chunks), layout=layout, overwrite=overwrite) as writer:
        for name, t, s in records:
            writer.add(name, t, step=s)
    return outputs
