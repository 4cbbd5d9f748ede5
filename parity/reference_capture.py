"""Dumps of the reference model in the same names and layout as ``parity.nemo_capture`` writes for NeMo."""

from __future__ import annotations

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
