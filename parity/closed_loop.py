"""The closed-loop report: an engine's free-running codes against the reference's (same inputs, same seeds).

Pure functions over codes tensors ``(B, C, T)`` and lengths ``(B,)`` as ``infer_batch`` returns them
(``predicted_codes``, ``predicted_codes_lens``: the EOS frame index, or ``max_decoder_steps`` when no EOS came).

Per item: the first differing (decoder step, frame, codebook, (engine token, reference token)) within the common
length, or, where the common frames agree but one run stopped earlier, a ``"length"`` divergence at the first frame
only one run has; the code-match rate over the common length; the length difference; whether EOS never fired (the
length reaches the run's width, i.e. the run hit its step limit); the frames repeating at the end (how many frames
before the last are equal to it: a run stuck on one frame). Over several runs (seeds): the distribution of the
first-divergence steps. A decoder step produces ``frame_stacking`` frames, so ``step = frame // frame_stacking``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

CLOSED_LOOP_FORMAT = "magpie-parity-closed-loop-report"


@dataclass(frozen=True)
class Divergence:
    step: int  # decoder step that produced the frame
    frame: int
    kind: str  # "token": a code differs; "length": one run stopped (EOS) where the other went on
    codebook: Optional[int] = None
    engine_token: Optional[int] = None
    reference_token: Optional[int] = None

    def __str__(self) -> str:
        if self.kind == "length":
            return f"step {self.step} frame {self.frame}: one run ended (EOS) here, the other went on"
        return (f"step {self.step} frame {self.frame} codebook {self.codebook}: engine {self.engine_token} vs "
                f"reference {self.reference_token}")


@dataclass(frozen=True)
class ItemReport:
    run: str
    item: int
    engine_len: int
    reference_len: int
    match_rate: Optional[float]  # equal codes / (C * common length); None when the common length is 0
    first: Optional[Divergence]
    # the length is the run's max_decoder_steps (NeMo's length of an item without EOS); None: the file records no
    # max_decoder_steps, so it cannot be told (a length at the codes' width is not enough: NeMo cuts the width)
    engine_eos_missing: Optional[bool]
    reference_eos_missing: Optional[bool]
    engine_repeats: int  # frames before the last equal to the last one (within the length)
    reference_repeats: int

    @property
    def common(self) -> int:
        return min(self.engine_len, self.reference_len)

    @property
    def length_diff(self) -> int:
        return self.engine_len - self.reference_len

    @property
    def identical(self) -> bool:
        return self.first is None


def trailing_repeats(codes: torch.Tensor, length: int) -> int:
    """``codes`` (C, T) of one item: how many frames before frame ``length - 1`` equal it, counting back."""
    n = 0
    for t in range(length - 2, -1, -1):
        if not torch.equal(codes[:, t], codes[:, length - 1]):
            break
        n += 1
    return n


def eos_missing(length: int, max_steps: Optional[int]) -> Optional[bool]:
    """Whether an item's EOS never fired: NeMo's ``infer_batch`` gives such an item the length ``max_decoder_steps``
    (in decoder steps, even with frame stacking; an EOS at exactly that frame reads the same: NeMo's own ambiguity);
    None when the run's ``max_decoder_steps`` is not known."""
    return None if max_steps is None else int(length) == int(max_steps)


def compare_item(engine: torch.Tensor, engine_len: int, reference: torch.Tensor, reference_len: int, *,
                 frame_stacking: int = 1, run: str = "", item: int = 0,
                 max_steps: tuple[Optional[int], Optional[int]] = (None, None)) -> ItemReport:
    """One item: ``engine`` / ``reference`` (C, T) codes with their lengths (clamped to their widths); ``max_steps``:
    each run's ``max_decoder_steps`` where known."""
    if engine.shape[0] != reference.shape[0]:
        raise ValueError(f"engine codes have {engine.shape[0]} codebooks, the reference's {reference.shape[0]}")
    le, lr = min(int(engine_len), engine.shape[1]), min(int(reference_len), reference.shape[1])
    n = min(le, lr)
    diff = engine[:, :n] != reference[:, :n]
    first = None
    if diff.any():
        frame = int(diff.any(0).nonzero()[0])
        cb = int(diff[:, frame].nonzero()[0])
        first = Divergence(frame // frame_stacking, frame, "token", cb, int(engine[cb, frame]),
                           int(reference[cb, frame]))
    elif le != lr:
        first = Divergence(n // frame_stacking, n, "length")
    rate = None if n == 0 else 1.0 - int(diff.sum()) / diff.numel()
    return ItemReport(run, item, le, lr, rate, first,
                      engine_eos_missing=eos_missing(engine_len, max_steps[0]),
                      reference_eos_missing=eos_missing(reference_len, max_steps[1]),
                      engine_repeats=trailing_repeats(engine, le) if le else 0,
                      reference_repeats=trailing_repeats(reference, lr) if lr else 0)


def compare_codes(engine: torch.Tensor, engine_lens: Optional[torch.Tensor], reference: torch.Tensor,
                  reference_lens: Optional[torch.Tensor], *, frame_stacking: int = 1, run: str = "",
                  max_steps: tuple[Optional[int], Optional[int]] = (None, None)) -> list[ItemReport]:
    """Every item of one run: codes (B, C, T) and lengths (B,) (None: every item the codes' full width)."""
    if engine.dim() != 3 or reference.dim() != 3:
        raise ValueError(f"codes must be (B, C, T), got {tuple(engine.shape)} and {tuple(reference.shape)}")
    if engine.shape[:2] != reference.shape[:2]:
        raise ValueError(f"engine codes {tuple(engine.shape)} and reference codes {tuple(reference.shape)} differ in "
                         "batch or codebooks (B, C, T)")
    if frame_stacking < 1:
        raise ValueError(f"frame_stacking must be >= 1, got {frame_stacking}")
    B = engine.shape[0]
    el = engine_lens if engine_lens is not None else torch.full((B,), engine.shape[2])
    rl = reference_lens if reference_lens is not None else torch.full((B,), reference.shape[2])
    if el.shape != (B,) or rl.shape != (B,):
        raise ValueError(f"lengths must be ({B},), got {tuple(el.shape)} and {tuple(rl.shape)}")
    return [compare_item(engine[b], int(el[b]), reference[b], int(rl[b]), frame_stacking=frame_stacking, run=run,
                         item=b, max_steps=max_steps) for b in range(B)]


@dataclass(frozen=True)
class Summary:
    runs: int
    items: int
    diverged: int
    first_steps: tuple[int, ...]  # the first-divergence step of every diverging item
    min_step: Optional[int]
    median_step: Optional[float]
    max_step: Optional[int]
    histogram: tuple[tuple[int, int, int], ...]  # (first step, last step, items) per bin
    mean_match_rate: Optional[float]
    eos_missing_engine: int
    eos_missing_reference: int


def histogram(steps: Sequence[int], bins: int = 8) -> tuple[tuple[int, int, int], ...]:
    """Integer bins of equal width covering min..max: ((lo, hi, count), ...), every step in exactly one bin."""
    if not steps:
        return ()
    lo, hi = min(steps), max(steps)
    width = max(1, math.ceil((hi - lo + 1) / bins))
    out = []
    for start in range(lo, hi + 1, width):
        end = min(hi, start + width - 1)
        out.append((start, end, sum(start <= s <= end for s in steps)))
    return tuple(out)


def summarize(items: Sequence[ItemReport]) -> Summary:
    steps = sorted(i.first.step for i in items if i.first is not None)
    rates = [i.match_rate for i in items if i.match_rate is not None]
    median = None
    if steps:
        k = len(steps)
        median = float(steps[k // 2]) if k % 2 else (steps[k // 2 - 1] + steps[k // 2]) / 2
    return Summary(
        runs=len(dict.fromkeys(i.run for i in items)), items=len(items), diverged=len(steps),
        first_steps=tuple(steps), min_step=steps[0] if steps else None, median_step=median,
        max_step=steps[-1] if steps else None, histogram=histogram(steps),
        mean_match_rate=sum(rates) / len(rates) if rates else None,
        eos_missing_engine=sum(bool(i.engine_eos_missing) for i in items),
        eos_missing_reference=sum(bool(i.reference_eos_missing) for i in items))


def first_divergence(items: Sequence[ItemReport]) -> Optional[ItemReport]:
    """The item that diverges earliest (by step, then frame), or None when every item is identical."""
    div = [i for i in items if i.first is not None]
    return min(div, key=lambda i: (i.first.step, i.first.frame)) if div else None


def format_report(items: Sequence[ItemReport]) -> str:
    s = summarize(items)
    lines = [f"closed loop: engine codes vs reference codes, {s.items} items over {s.runs} run"
             f"{'' if s.runs == 1 else 's'}: {s.diverged} diverge"]
    header = ("run", "item", "first divergence", "match", "len e/r", "EOS never fired", "repeats at end e/r")
    rows = []
    for i in items:
        eos = ",".join(w + ("?" if m is None else "") for w, m in
                       (("engine", i.engine_eos_missing), ("reference", i.reference_eos_missing)) if m is not False)
        rows.append((i.run, str(i.item), "identical" if i.first is None else str(i.first),
                     "-" if i.match_rate is None else f"{i.match_rate:.3f}",
                     f"{i.engine_len}/{i.reference_len}", eos or "-", f"{i.engine_repeats}/{i.reference_repeats}"))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append("('match': equal codes over the common length; 'EOS never fired': the length is the run's "
                 "max_decoder_steps, NeMo's length of an item without EOS ('?': the file records no "
                 "max_decoder_steps, so it cannot be told); 'repeats at end': frames before the last equal to it)")
    if s.diverged:
        lines.append(f"first-divergence step over {s.diverged} diverging items: min {s.min_step}, median "
                     f"{s.median_step:g}, max {s.max_step}")
        if s.diverged >= 3:  # a distribution worth drawing
            peak = max(c for _lo, _hi, c in s.histogram)
            for lo, hi, c in s.histogram:
                span = str(lo) if lo == hi else f"{lo}-{hi}"
                lines.append(f"  steps {span:>9}  {'#' * round(20 * c / peak):<20} {c}")
    return "\n".join(lines)


def to_dict(items: Sequence[ItemReport]) -> dict:
    """The report as JSON-ready data (lists, not tuples)."""
    s = summarize(items)
    return json.loads(json.dumps({"format": CLOSED_LOOP_FORMAT, "version": 1,
                                  "items": [{**asdict(i), "common": i.common, "length_diff": i.length_diff}
                                            for i in items],
                                  "summary": asdict(s)}))


def is_report_json(path) -> bool:
    """A closed-loop JSON report this tool wrote (its ``format`` key), which ``--json`` may replace. At most 64 MiB
    are read; anything unreadable is not one."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(64 * 2**20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == CLOSED_LOOP_FORMAT

