"""Which known engine behaviours explain an engine dump's departure from NeMo, and where the rest begins.

The engine's own codes are fed back to the reference (teacher forcing), so every candidate policy is scored
on the same inputs step by step. Starting from NeMo's behaviour, a forward search adds the behaviour that lowers
the mean per-step logit error most; where several behaviours interact so that none helps alone, a backward
search starts from all of them and drops each one the dump does not need. The report lists every candidate's
error alone, the smallest explanation found, and the first step where any remaining error exceeds the tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from parity.tolerances import diagnose_tolerance
from trt.engine import EnginePolicy, infer

# Candidate deviations (name, EnginePolicy fields). Every field is a documented engine behaviour (trt/engine.py).
CANDIDATES: list[tuple[str, dict]] = [
    ("kv_cache", dict(kv_cache=True)),
    ("prior=kernel", dict(prior="kernel")),
    ("multi_block_mode (prior skipped)", dict(multi_block_mode=True)),
    ("cfg_prompt=zeros", dict(cfg_prompt="zeros")),
    ("lm_head_bias=False", dict(lm_head_bias=False)),
    ("encoder=bidirectional", dict(encoder="bidirectional")),
    ("packed_encoder_conv", dict(packed_encoder_conv=True)),
    ("unpadded_requests", dict(unpadded_requests=True)),
    ("dtype=float16", dict(dtype="float16")),
    ("dtype=bfloat16", dict(dtype="bfloat16")),
]


def not_applicable(model, batch: dict[str, torch.Tensor], fields: dict, use_cfg: bool) -> Optional[str]:
    """Why the candidate ``fields`` cannot change this checkpoint's run on this batch (it is left out of the search,
    and the report says why in one line), or None. Each reason is an identity of the emulation, not a guess: the
    behaviour's code path gives NeMo's numbers here (up to the rounding of unpadded text)."""
    if fields.get("unpadded_requests"):
        if batch["text"].shape[0] == 1:
            return "one request: nothing to pack"
        with torch.no_grad():
            _, mask = model.decoder_context(batch)
        if bool(mask.all()):
            n = mask.shape[1]
            what = ("baked speaker" if model.config.baked else "request")
            return (f"every {what} of the batch has {n} context rows, so no prompt is padded and no decoder position "
                    "shifts (the text's padding is masked, as in NeMo)")
    if fields.get("encoder") == "bidirectional" and not model.encoder.cfg.is_causal:
        return "the checkpoint's text encoder is bidirectional already"
    if fields.get("lm_head_bias") is False and model.final_proj.bias is None:
        return "the checkpoint's final_proj has no bias"
    if fields.get("cfg_prompt") == "zeros" and not use_cfg:
        return "the run has no CFG, so no unconditional prompt"
    return None


class DiagnoseError(ValueError):
    """The engine dump cannot be diagnosed (missing tensors, inconsistent inputs)."""


@dataclass
class Score:
    name: str
    policy: EnginePolicy
    max_abs: float  # worst |engine - reference| over steps and logits
    per_step: list[float]
    first_bad_step: Optional[int]  # first step whose error exceeds the tolerance

    def __str__(self) -> str:
        fb = "-" if self.first_bad_step is None else str(self.first_bad_step)
        return f"{self.name:<40} {self.max_abs:>12.3e} {fb:>14}"


@dataclass
class Diagnosis:
    baseline: Score
    singles: list[Score]
    explanation: list[str]
    final: Score
    tolerance: float
    steps: int
    notes: list[str] = field(default_factory=list)
    stacking: int = 1  # frames per decoder step (the checkpoint's frame_stacking_factor)

    @property
    def explained(self) -> bool:
        return self.final.max_abs <= self.tolerance

    def report(self) -> str:
        frames = f" ({self.steps * self.stacking} frames, {self.stacking} a step)" if self.stacking > 1 else ""
        lines = [f"engine dump vs reference, teacher-forced with the engine's codes over {self.steps} steps{frames} "
                 f"(tolerance {self.tolerance:.1e} on logits)", ""]
        lines.append(f"{'engine behaviours emulated':<40} {'max |dlogit|':>12} {'first bad step':>14}")
        lines.append(str(self.baseline) + "   <- NeMo 3.0.0")
        for s in sorted(self.singles, key=lambda s: s.max_abs):
            lines.append(str(s))
        lines.append("")
        if not self.explanation and self.baseline.max_abs <= self.tolerance:
            lines.append("No deviation: the engine matches NeMo's behaviour within tolerance.")
        else:
            lines.append("Explained by: " + (", ".join(self.explanation) if self.explanation else "none of the known behaviours"))
            lines.append(str(self.final) + "   <- with the explanation applied")
            if self.explained:
                lines.append("Nothing remains: every step is within tolerance once these behaviours are emulated.")
            else:
                lines.append(f"Unexplained error remains from step {self.final.first_bad_step} "
                             f"(max {self.final.max_abs:.3e}); compare that step's layers to locate it.")
        lines += self.notes
        return "\n".join(lines)


def _score(model, batch, codes, engine_logits, use_cfg, params, name, sem, tol) -> Score:
    # one decoder step per engine step; with frame stacking a step is frame_stacking_factor frames
    frames = len(engine_logits) * model.config.frame_stacking_factor
    out = infer(model, batch, sem, use_cfg=use_cfg, forced_codes=codes, keep_logits=True,
                max_decoder_steps=frames, **params)
    per_step = []
    for k, ref in enumerate(engine_logits):
        if k >= len(out.step_logits):
            per_step.append(float("inf"))
            continue
        got = out.step_logits[k]
        if not torch.isfinite(ref).all():
            per_step.append(float("inf"))  # NaN/Inf in the engine output never passes
            continue
        per_step.append((got.float() - ref.float()).abs().max().item())
    first = next((k for k, e in enumerate(per_step) if e > tol), None)
    return Score(name, sem, max(per_step) if per_step else 0.0, per_step, first)


def _mean(s: Score) -> float:
    return sum(s.per_step) / max(1, len(s.per_step))


def diagnose(model, engine_dump, batch: dict[str, torch.Tensor], *, use_cfg: Optional[bool] = None,
             tolerance: Optional[float] = None, candidates=CANDIDATES,
             params: Optional[dict] = None, codes: Optional[torch.Tensor] = None) -> Diagnosis:
    """``engine_dump``: a canonical dump (DumpReader or path) with per-step ``logits`` (B, 1, C*V), e.g. from
    ``magpie-parity ingest-trtllm``; the engine's codes (B, C, T) come from ``codes`` or the dump's
    ``predicted_codes``. ``batch``: the inputs it ran on."""
    from parity.dump import DumpReader

    dump = engine_dump if isinstance(engine_dump, DumpReader) else DumpReader(engine_dump)
    steps = sorted(e.step for e in dump.entries if e.name == "logits" and e.step is not None)
    if not steps:
        raise DiagnoseError(f"{dump.path}: no per-step 'logits' to diagnose")
    if steps != list(range(len(steps))):
        raise DiagnoseError(f"{dump.path}: 'logits' steps are not 0..N-1: {steps[:8]}")
    if codes is None:
        if ("predicted_codes", None) not in dump:
            raise DiagnoseError(f"{dump.path}: no 'predicted_codes'; pass the engine's codes (needed to teacher-force "
                                "the reference)")
        codes = dump.load("predicted_codes")
    engine_logits = [dump.load("logits", k)[:, 0] for k in steps]
    S = model.config.frame_stacking_factor
    B = batch["text"].shape[0]
    if codes.shape[0] != B or engine_logits[0].shape[0] != B:
        raise DiagnoseError(f"{dump.path}: dump holds {codes.shape[0]} requests, the batch {B}")
    notes = []
    # Step k is teacher-forced from frames [0, k*S): codes cut where EOS fired leave the dump's last steps unforced.
    usable = codes.shape[2] // S + 1
    if len(engine_logits) > usable:
        last = len(engine_logits) - 1
        which = f"Step {last}" if last == usable else f"Steps {usable}..{last}"
        notes.append(f"{which} left out: the codes hold {codes.shape[2]} frames"
                     + (f" ({S} a step)" if S > 1 else "") + f", which teacher-force steps 0..{usable - 1} only")
        engine_logits = engine_logits[:usable]
    layout = dump.manifest.get("layout") or {}
    if use_cfg is None:
        use_cfg = bool(layout.get("use_cfg", False))
    if params is None:
        known = {f.name for f in dataclasses.fields(model.config.inference)}
        params = {k: v for k, v in (layout.get("params") or {}).items() if k in known}
    params = {k: v for k, v in params.items() if k != "max_decoder_steps"}  # the dump's step count decides
    if tolerance is None:
        scale = max(x.abs().max().item() for x in engine_logits)
        tolerance = diagnose_tolerance(dump.manifest.get("dtype", "float32"), scale)  # why: parity/tolerances.py

    def score(name, sem):
        return _score(model, batch, codes, engine_logits, use_cfg, params, name, sem, tolerance)

    left_out = [(name, why) for name, fields in candidates
                if (why := not_applicable(model, batch, fields, use_cfg)) is not None]
    candidates = [c for c in candidates if c[0] not in {n for n, _ in left_out}]
    notes += [f"Left out (cannot change this run): {name}: {why}" for name, why in left_out]
    base_sem = EnginePolicy()
    baseline = score("nemo", base_sem)
    singles = [score(name, dataclasses.replace(base_sem, **fields)) for name, fields in candidates]
    if baseline.max_abs <= tolerance:
        return Diagnosis(baseline, singles, [], baseline, tolerance, len(engine_logits), notes, S)

    def apply(names):
        sem = base_sem
        for name, fields in candidates:
            if name in names:
                sem = dataclasses.replace(sem, **fields)
        return score(" + ".join(names) or "nemo", sem)

    # Forward: add the behaviour that lowers the mean per-step error most, while it lowers it by more than the
    # tolerance. Several behaviours can each move the error only a little while others dominate, so ...
    chosen, best = [], baseline
    while best.max_abs > tolerance:
        trials = [(apply(chosen + [n]), n) for n, _ in candidates if n not in chosen]
        if not trials:
            break
        trial, name = min(trials, key=lambda t: _mean(t[0]))
        if _mean(trial) >= _mean(best) - tolerance and trial.max_abs > tolerance:
            break
        chosen, best = chosen + [name], trial
    # ... backward as well: from every behaviour at once (one dtype at a time), drop each one whose removal keeps
    # the dump explained. The smaller explanation within tolerance wins.
    if best.max_abs > tolerance:
        for dtype_name in [n for n, f in candidates if "dtype" in f] + [None]:
            names = [n for n, f in candidates if "dtype" not in f or n == dtype_name]
            full = apply(names)
            if full.max_abs > tolerance:
                continue
            for n in list(names):
                rest = [m for m in names if m != n]
                trial = apply(rest)
                if trial.max_abs <= tolerance:
                    names, full = rest, trial
            if full.max_abs <= tolerance and (best.max_abs > tolerance or len(names) < len(chosen)):
                chosen, best = names, full
    chosen = [n for n, _ in candidates if n in chosen]  # report in the table's order
    # another single behaviour that explains the dump as well (within tolerance itself, not merely close to the
    # explanation's error: with a loose tolerance every candidate is "close")
    ties = [s.name for s in singles if len(chosen) == 1 and s.name not in chosen and s.max_abs <= tolerance
            and best.max_abs <= tolerance]
    if ties:
        notes.append("Indistinguishable on this dump from: " + ", ".join(ties))
    return Diagnosis(baseline, singles, chosen, best, tolerance, len(engine_logits), notes, S)
