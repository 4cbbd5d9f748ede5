"""Calibrated tolerances: how far a reduced-precision run of the reference strays from its float32 run, per capture
point and decode step, measured rather than guessed (``magpie-parity calibrate``).

For each seed the float32 reference runs ``infer_batch`` freely (every capture point each step, as ``dump
--layers`` records them), then the same model cast to ``dtype`` runs teacher-forced on the float32 run's codes with
the same seed, so both runs condition on the same frames step by step (a free-running bfloat16 run samples other
tokens sooner or later, after which a comparison means nothing). The two dumps are compared as ``magpie-parity
compare`` compares them. Recorded per (name, step) in ``per_step`` (where the error occurs) and per name in
``per_name`` (the envelope over every step and seed, which sets the tolerance):

* floating tensors: the largest ``max |a - b|`` and the largest 0.99 quantile of ``|a - b|`` over elements;
  the tolerance ``atol`` = the name's largest max x :data:`SAFETY_FACTOR` (``rtol`` 0);
* exact tensors (attended text positions, codes, lengths): the most elements that differed at one step; none seen
  means exact, otherwise that count x the safety factor (at most every element) may differ.

Why the tolerance is per name, not per step: a reduced-precision run's error is rounding (alike at every step) plus
discrete decisions that flip now and then: the most attended text position (which moves the attention prior and so
every later cross-attention), the EOS frame. When they flip differs from seed to seed, so a per-step envelope of a
few seeds misses the flips a new seed makes at other steps: on the bundled ``released_small`` with four seeds,
per-step envelopes passed 11 of 30 unseen seeds in bfloat16, per-name envelopes all 30 (float16: 27 and 30).
A per-step entry with its own ``atol`` (or ``mismatches``) in the file overrides the name's (to tighten a step by
hand). ``mode="teacher-forced"``: one ``process_batch`` pair (no sampling, no steps; ``seeds`` unused).

The file (:data:`parity.tolerances.CALIBRATION_FORMAT`) is read by ``compare --tolerances`` through
:class:`parity.tolerances.CalibratedPolicy`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from parity.tolerances import CALIBRATION_FORMAT, CALIBRATION_VERSION, step_key

# The safety factor on the largest error seen: on the bundled released_small, 30 unseen seeds reached at most 1.5x
# (bfloat16) and 2.1x (float16) the four-seed per-name maximum; 4x covers that spread twice over, while a real defect
# (a wrong op, a missing scale, a skipped norm) lands 10x-1000x beyond a precision's rounding.
SAFETY_FACTOR = 4.0
QUANTILE = 0.99  # the high quantile recorded beside the max (compare's streaming histogram, q99_abs)
PRECISIONS = ("bfloat16", "float16")
MODES = ("infer", "teacher-forced")


class CalibrationError(ValueError):
    """A calibration that cannot be made (a run that does not line up with its float32 twin)."""


def calibrate(model, batch: dict[str, torch.Tensor], dtype: str, *, seeds: Sequence[int] = (0, 1, 2, 3),
              mode: str = "infer", use_cfg: bool = False, capture_layers: bool = True,
              use_kv_cache: Optional[bool] = None, safety_factor: float = SAFETY_FACTOR, progress: bool = False,
              workdir: str | Path | None = None, **params: Any) -> dict:
    """The error envelope of ``model`` (float32) cast to ``dtype`` against itself, as a calibration file's dict.

    ``batch``: infer inputs (``mode="infer"``) or a full teacher-forcing batch; ``params``: NeMo
    ``inference_parameters`` overrides; ``workdir``: where the temporary dumps go (default: the system's)."""
    from parity.compare import compare_dumps
    from parity.reference_capture import dump_reference_infer, dump_reference_process_batch
    from parity.tolerances import policy

    if dtype not in PRECISIONS:
        raise CalibrationError(f"dtype {dtype!r}: calibrate a reduced precision, one of {PRECISIONS}")
    if mode not in MODES:
        raise CalibrationError(f"mode {mode!r}: one of {MODES}")
    if not (math.isfinite(safety_factor) and safety_factor >= 1):
        raise CalibrationError(f"safety factor must be a finite number >= 1, got {safety_factor}")
    seeds = [int(s) for s in seeds] if mode == "infer" else []
    if mode == "infer" and not seeds:
        raise CalibrationError("at least one seed")
    ref_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if ref_dtype != "float32":
        raise CalibrationError(f"the model to calibrate against must be float32, got {ref_dtype}")
    low = copy.deepcopy(model).to(getattr(torch, dtype))
    per_step: dict[tuple[str, int | None], dict] = {}
    runs = seeds if mode == "infer" else [None]
    bar = _bar(len(runs), progress)
    resolved = None
    with tempfile.TemporaryDirectory(prefix="magpie-parity-calibrate-", dir=workdir) as tmp:
        for seed in runs:
            ref, lo = Path(tmp) / "float32", Path(tmp) / dtype
            with torch.no_grad():
                if mode == "infer":
                    out = dump_reference_infer(model, batch, ref, use_cfg=use_cfg, seed=seed,
                                               capture_layers=capture_layers, use_kv_cache=use_kv_cache, **params)
                    dump_reference_infer(low, batch, lo, use_cfg=use_cfg, seed=seed, capture_layers=capture_layers,
                                         use_kv_cache=use_kv_cache, forced_codes=out.predicted_codes,
                                         layout_extra={"teacher_forced_codes": "the float32 run's"}, **params)
                else:
                    dump_reference_process_batch(model, batch, ref)
                    dump_reference_process_batch(low, batch, lo)
            if resolved is None and mode == "infer":
                from parity.dump import DumpReader

                resolved = DumpReader(ref).layout.get("params")
            res = compare_dumps(lo, ref, policy=policy(""), progress=False, workers=1)
            if res.missing_in_a or res.missing_in_b:
                miss = (res.missing_in_a + res.missing_in_b)[0]
                raise CalibrationError(f"seed {seed}: the {dtype} run and the float32 run do not line up "
                                       f"({miss[0]} step {miss[1]} only in one)")
            for t in res.tensors:
                _record(per_step, t, seed)
            shutil.rmtree(ref)
            shutil.rmtree(lo)
            bar.update(1)
    bar.close()
    return _calibration_dict(per_step, dtype=dtype, seeds=seeds, mode=mode, use_cfg=use_cfg,
                             config_hash=model.config.hash(), params=resolved or dict(params),
                             safety_factor=safety_factor, capture_layers=capture_layers)


def _record(per_step: dict, t, seed) -> None:
    """One compared tensor of one seed into the running envelope of its (name, step)."""
    e = per_step.setdefault(t.key, {"exact": t.exact})
    if t.exact:
        n = t.numel if t.reason is not None else t.n_failed  # a shape that differs: every element
        e["observed"] = max(e.get("observed", 0), int(n))
        e["numel"] = max(e.get("numel", 0), int(t.numel))
        return
    if t.reason is not None or t.nan_a or t.nan_b or not math.isfinite(t.max_abs):
        raise CalibrationError(f"seed {seed}: {t.name} step {t.step} cannot be calibrated "
                               f"({t.reason or 'NaN or Inf in a run'})")
    e["max"] = max(e.get("max", 0.0), float(t.max_abs))
    e["q"] = max(e.get("q", 0.0), float(t.q99_abs))


def _entry(e: dict, factor: float | None) -> dict:
    """A file entry: the observed figures, with the bound (``atol`` / ``mismatches``) when ``factor`` is given."""
    if e["exact"]:
        seen = {"observed": e["observed"]}
        return seen if factor is None else {"mismatches": min(e["numel"], math.ceil(e["observed"] * factor)), **seen}
    seen = {"max": e["max"], "q": e["q"]}
    return seen if factor is None else {"atol": e["max"] * factor, **seen}


def _calibration_dict(per_step: dict, *, dtype: str, seeds: list[int], mode: str, use_cfg: bool,
                      config_hash: str, params: dict, safety_factor: float, capture_layers: bool) -> dict:
    steps: dict[str, dict[str, dict]] = {}
    by_name: dict[str, dict] = {}
    for (name, step), e in per_step.items():
        steps.setdefault(name, {})[step_key(step)] = _entry(e, None)
        n = by_name.setdefault(name, {"exact": e["exact"]})
        for k in ("observed", "numel", "max", "q"):
            if k in e:
                n[k] = max(n.get(k, 0), e[k])
    return {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "precision": dtype,
        "reference_precision": "float32",
        "safety_factor": safety_factor,
        "safety_factor_note": "per_name atol = the largest max |error| over every step and seed x safety_factor "
                              "(30 unseen seeds of the bundled fixture reached at most 2.1x the four-seed maximum); "
                              "exact tensors: mismatches = the most differing elements seen at one step x "
                              "safety_factor; per_step: where the errors occur (a per-step atol or mismatches "
                              "there overrides the name's)",
        "quantile": QUANTILE,
        "seeds": seeds,
        "mode": mode,
        "use_cfg": use_cfg,
        "layers": capture_layers,
        "config_hash": config_hash,
        "params": params,
        "per_step": steps,
        "per_name": {name: _entry(e, safety_factor) for name, e in by_name.items()},
        "default": None,
    }


def calibration_bytes(data: dict) -> bytes:
    """The file's bytes: JSON, its ``format`` key first (what ``--out`` recognises before replacing a file)."""
    return (json.dumps(data, indent=1, allow_nan=False) + "\n").encode()


def is_calibration_file(path) -> bool:
    """A calibration file ``calibrate`` wrote (its first key is ``"format": CALIBRATION_FORMAT``)."""
    import re

    from parity.files import read_head

    head = read_head(path, 256)
    return head is not None and re.match(rb'\A\{\s*"format"\s*:\s*"' + CALIBRATION_FORMAT.encode() + rb'"',
                                         head) is not None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="seed", desc="calibrate", file=sys.stderr, leave=False)


def envelope_table(data: dict, names: Iterable[str] | None = None) -> str:
    """A short summary of a calibration: per name, the largest max |error| over steps and its tolerance."""
    rows = [(n, e) for n, e in data["per_name"].items() if names is None or n in names]
    width = max((len(n) for n, _ in rows), default=4)
    lines = [f"{'name':<{width}}  {'max |err|':>10}  {'atol':>10}"]
    for n, e in rows:
        if "atol" in e:
            lines.append(f"{n:<{width}}  {e['max']:>10.3e}  {e['atol']:>10.3e}")
        else:
            lines.append(f"{n:<{width}}  {e['observed']:>10} differ  (allowed {e['mismatches']})")
    return "\n".join(lines)
