"""Dumps of the reference model in the same names and layout as ``parity.nemo_capture`` writes for NeMo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
                         **kw):
    """``infer_batch`` with per-step ``logits`` (B, 1, C*V), ``inference.attn_prior``,
    ``inference.attended_text_position`` and, with ``capture_layers``, every capture point each step.
    Returns the reference's :class:`~reference.inference.InferOutput`."""
    from parity.dump import DumpWriter

    inputs = {k: list(v.shape) for k, v in batch.items()}
    sem = kw.get("semantics")
    dtype = (sem.dtype if sem is not None and sem.dtype else None) or str(next(model.parameters()).dtype).replace("torch.", "")
    import dataclasses

    from reference.inference import resolve_parameters

    params = {k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(model.config.inference)}}
    resolved = dataclasses.asdict(resolve_parameters(model.config.inference, **params))
    kv = kw.get("use_kv_cache")
    layout = {"mode": "infer", "use_cfg": use_cfg, "seed": seed,
              "use_kv_cache": model.config.use_kv_cache_for_inference if kv is None else bool(kv),
              "params": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in resolved.items()}}
    if kw.get("semantics") is not None:
        layout["semantics"] = dataclasses.asdict(kw["semantics"])
    with DumpWriter(out_dir, source="reference", config_hash=model.config.hash(), dtype=dtype, inputs=inputs,
                    layout=layout, overwrite=overwrite) as writer:
        names = None if capture_layers else ["logits"]
        cap = model.capture(names, sink=lambda n, t, s: writer.add(n, t, step=s))
        torch.manual_seed(seed)
        with cap:
            out = model.infer_batch(batch, use_cfg=use_cfg, progress=progress, **kw)
        for k in sorted(out.built_priors):
            writer.add("inference.attn_prior", out.built_priors[k], step=k)
            writer.add("inference.attended_text_position", torch.tensor(out.attended_by_step[k]), step=k)
        writer.add("predicted_codes", out.predicted_codes, step=None)
        writer.add("predicted_codes_lens", out.predicted_codes_lens, step=None)
    return out
