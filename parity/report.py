"""Human and machine views of a :class:`parity.compare.DumpCompareResult`: table, JSON, PNG."""

from __future__ import annotations

import math
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any

from parity.files import atomic_write_bytes, png_text, read_head

if TYPE_CHECKING:  # parity.compare imports torch: the CLI's output checks use this module without it
    from parity.compare import DumpCompareResult, TensorCompareResult

# The JSON report's first key, and the PNG plot's Software text: what `compare --json/--plot` recognise as their
# own output before replacing an existing file (they replace nothing else).
REPORT_FORMAT = "magpie-parity-compare-report"
REPORT_VERSION = 1
PNG_SOFTWARE = "magpie-parity compare"
_REPORT_HEAD = re.compile(rb'\A\{\s*"format"\s*:\s*"' + REPORT_FORMAT.encode() + rb'"')


def is_report_json(path: str | os.PathLike) -> bool:
    """A JSON report :func:`to_json` wrote (its first key is ``"format": REPORT_FORMAT``): what ``--json`` replaces."""
    head = read_head(path, 256)
    return head is not None and _REPORT_HEAD.match(head) is not None


def is_report_png(path: str | os.PathLike) -> bool:
    """A PNG :func:`plot` wrote (its ``Software`` text is :data:`PNG_SOFTWARE`): what ``--plot`` replaces."""
    head = read_head(path, 65536)
    return head is not None and png_text(head).get("Software") == PNG_SOFTWARE


def _step(step: int | None) -> str:
    return "-" if step is None else str(step)


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3e}"


def _cos(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6f}"


def _ratio_key(t: TensorCompareResult) -> float:
    if t.reason is not None:
        return math.inf
    if t.exact:  # no ratio to a zero tolerance: any differing element ranks first
        return math.inf if t.n_failed else 0.0
    r = t.tol_ratio
    return math.inf if r is None or math.isnan(r) else r


def _worst(t: TensorCompareResult) -> str:
    if t.exact and t.reason is None:
        return f"{t.n_failed} differ" if t.n_failed else "equal"
    return _num(_ratio_key(t))


MISSING_SHOWN = 5  # missing tensors named in the table (the rest are counted)


def _n(k: int, what: str = "tensor") -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def verdict(result: DumpCompareResult) -> str:
    """The one-line verdict: PASS/FAIL, missing tensors counted apart from the numeric comparison (with the
    ``--intersect`` hint), and the compared tensors within tolerance, e.g. ``FAIL: 27 tensors missing in b (pass
    --intersect to compare the 59 present in both); 59/59 present tensors within tolerance``."""
    ts = result.tensors
    n_ok = sum(t.passed for t in ts)
    head = "PASS" if result.passed else "FAIL"
    missing = ", ".join(f"{_n(len(m))} missing in {side}"
                        for side, m in (("a", result.missing_in_a), ("b", result.missing_in_b)) if m)
    if not missing:
        return f"{head}: {n_ok}/{len(ts)} tensors within tolerance"
    within = f"{n_ok}/{len(ts)} present tensors within tolerance"
    if result.intersect:
        return f"{head}: {within} (--intersect: {missing}, not compared)"
    return f"{head}: {missing} (pass --intersect to compare the {len(ts)} present in both); {within}"


def format_table(result: DumpCompareResult, max_rows: int = 60, worst: int = 5) -> str:
    """Terminal report: summary, first divergence, worst tensors by error/tolerance ratio, per-tensor rows.

    With more than ``max_rows`` tensors, failing rows are kept first (in execution order), then the
    rest up to the limit; the table says how many were left out.
    """
    ts = result.tensors
    lines = [f"{verdict(result)} ({result.source_a} {result.a}  vs  {result.source_b} {result.b})"]
    for label, other, miss in (("a", "b", result.missing_in_a), ("b", "a", result.missing_in_b)):
        if miss:
            shown = ", ".join(f"{name}@{_step(step)}" for name, step in miss[:MISSING_SHOWN])
            more = f" and {len(miss) - MISSING_SHOWN} more" if len(miss) > MISSING_SHOWN else ""
            lines.append(f"missing in {label} ({len(miss)}, only in {other}): {shown}{more}")
    fd = result.first_divergence
    if fd is not None:
        t = next(t for t in ts if t.key == fd)
        if t.reason:
            why = t.reason
        elif t.exact:
            why = (f"{t.n_failed}/{t.numel} elements differ (exact {t.dtype_a} vs {t.dtype_b}), "
                   f"max_abs {_num(t.max_abs)}")
        else:
            why = f"max_abs {_num(t.max_abs)}, {t.n_failed}/{t.numel} elements out of tolerance"
        if t.nan_a or t.nan_b:
            why += f", NaN a={t.nan_a} b={t.nan_b}"
        lines.append(f"first divergence: {fd[0]} step {_step(fd[1])} ({why})")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    if ts:
        ranked = sorted(ts, key=_ratio_key, reverse=True)[:worst]
        lines.append("worst (error / tolerance; integer tensors: elements that differ):")
        for t in ranked:
            lines.append(f"  {_worst(t):>10}  {t.name} step {_step(t.step)}")

    rows = ts
    if len(ts) > max_rows:
        fails = [t for t in ts if not t.passed][:max_rows]
        passes = [t for t in ts if t.passed][: max(0, max_rows - len(fails))]
        keep = {id(t) for t in fails} | {id(t) for t in passes}
        rows = [t for t in ts if id(t) in keep]
    header = ("", "name", "step", "shape", "max_abs", "max_rel", "cosine", "failed")
    body = [
        (
            "ok" if t.passed else "XX",
            t.name,
            _step(t.step),
            "x".join(map(str, t.shape)) or "scalar",
            _num(t.max_abs) if t.reason is None else "-",
            _num(t.max_rel) if t.reason is None else "-",
            _cos(t.cosine) if t.reason is None else "-",
            str(t.n_failed) if t.reason is None else t.reason,
        )
        for t in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in (0, 1, 3, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines.append(fmt(header).rstrip())
    lines.extend(fmt(r).rstrip() for r in body)
    if len(rows) < len(ts):
        lines.append(f"... {len(ts) - len(rows)} tensors not shown")
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def to_json(result: DumpCompareResult) -> dict:
    from parity.compare import result_to_dict

    fd = result.first_divergence
    return _json_safe(
        {
            "format": REPORT_FORMAT,  # first: is_report_json reads only the head of the file
            "version": REPORT_VERSION,
            "passed": result.passed,
            "first_divergence": None if fd is None else {"name": fd[0], "step": fd[1]},
            "a": {"path": result.a, "source": result.source_a},
            "b": {"path": result.b, "source": result.source_b},
            "bytes_compared": result.bytes_compared,
            "tensors": [result_to_dict(t) for t in result.tensors],
            "missing_in_a": [{"name": n, "step": s} for n, s in result.missing_in_a],
            "missing_in_b": [{"name": n, "step": s} for n, s in result.missing_in_b],
            "warnings": list(result.warnings),
        }
    )


MAX_PLOT_STEPS = 12
MAX_PLOT_WIDTH = 60.0  # inches (6000 px at 100 dpi): a dump with thousands of names labels every k-th one
MAX_LABEL_CHARS = 80


def _label(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "\u2026"


def plot(result: DumpCompareResult, png_path: str | os.PathLike) -> pathlib.Path:
    """Max abs error per layer in execution order (log y), one line per step, with the atol line.

    With more than ``MAX_PLOT_STEPS`` distinct steps, steps are drawn as points coloured by step. Tensor names are
    drawn literally (never as TeX or mathtext: a name such as ``$\\frac{a}{`` is text, not markup); the figure's
    width is capped at :data:`MAX_PLOT_WIDTH` inches, labelling every k-th name beyond that.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # our figures never go through TeX, whatever the user's matplotlibrc says
    with matplotlib.rc_context({"text.usetex": False}):
        ts = [t for t in result.tensors if t.reason is None and t.max_abs is not None]
        names = list(dict.fromkeys(t.name for t in result.tensors))
        xpos = {n: i for i, n in enumerate(names)}
        steps = list(dict.fromkeys(t.step for t in ts))
        floor = 1e-12  # zero error cannot sit on a log axis
        width = min(MAX_PLOT_WIDTH, max(8.0, 0.25 * len(names) + 4))
        every = max(1, math.ceil(len(names) / ((width - 4) / 0.25)))
        fig, ax = plt.subplots(figsize=(width, 5))
        try:
            ys = lambda sel: [min(max(t.max_abs, floor), 1e38) for t in sel]  # noqa: E731
            if len(steps) <= MAX_PLOT_STEPS:
                for s in steps:
                    sel = [t for t in ts if t.step == s]
                    ax.plot([xpos[t.name] for t in sel], ys(sel), marker="o", ms=3, lw=1, label=f"step {_step(s)}")
            else:
                sc = ax.scatter([xpos[t.name] for t in ts], ys(ts), c=[-1 if t.step is None else t.step for t in ts],
                                s=8, cmap="viridis")
                fig.colorbar(sc, ax=ax, label="step")
            tol_x = list(range(len(names)))
            tol_by_name = {t.name: t.tolerance.atol for t in result.tensors}
            ax.step(tol_x, [max(tol_by_name[n], floor) for n in names], where="mid", color="red", ls="--", lw=1,
                    label="atol")
            fails = [t for t in ts if not t.passed]
            if fails:
                ax.scatter([xpos[t.name] for t in fails], ys(fails), marker="x", color="red", s=30, zorder=5,
                           label="failed")
            ax.set_yscale("log")
            ax.set_ylabel("max |a - b|")
            ticks = list(range(0, len(names), every))
            ax.set_xticks(ticks)
            ax.set_xticklabels([_label(names[i]) for i in ticks], rotation=90, fontsize=6, parse_math=False)
            ax.set_title(f"{result.source_a} vs {result.source_b}: {'PASS' if result.passed else 'FAIL'}",
                         parse_math=False)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})
        finally:
            plt.close(fig)
    pathlib.Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(png_path, buf.getvalue())
    return pathlib.Path(png_path)
