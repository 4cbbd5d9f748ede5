"""Human and machine views of a :class:`parity.compare.DumpCompareResult`: table, JSON, PNG."""

from __future__ import annotations

import math
import os
import pathlib
import re
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------ growth factor

AMPLIFIES = 10.0  # output error / input error from which a failing layer is said to amplify what it inherited
# Capture points that start a chain of the residual stream: what feeds them is not captured (token embeddings,
# the context prefix), so they have no input to compare with.
_CHAIN_STARTS = ("text_embedding", "decoder_input", "context_encoder.layers.0")


@dataclass(frozen=True)
class Growth:
    """A tensor's error next to its input's (the previous point of the residual stream at the same step)."""

    input: str | None  # the input's canonical name; None: a chain start or a name outside the table
    input_max_abs: float | None  # None: the input was not compared (absent from one dump)
    input_passed: bool | None
    factor: float | None  # max_abs / input max_abs (inf: error from a bit-identical input); None: no figure

    @property
    def origin(self) -> str | None:
        """For a failing tensor: "born" (its input within tolerance: it introduces the error), "amplifies" (input
        failing, factor >= AMPLIFIES), "inherits" (input failing, smaller factor); None when unknown."""
        if self.input_passed is None:
            return None
        if self.input_passed:
            return "born"
        return "amplifies" if self.factor is not None and self.factor >= AMPLIFIES else "inherits"


def residual_inputs(names) -> dict[str, str | None]:
    """Canonical name -> the capture point its input is (the name table's execution order, parity/names.py): a layer
    takes the previous layer (the stack's first layer: the embedding or ``decoder_input``), its sublayers take the
    layer's input, ``norm_out`` the stack's last layer, ``final_proj`` the decoder's ``norm_out``, ``logits``
    ``final_proj``. Names outside the table (inference-loop values, codes) are left out."""
    from parity.names import DEFAULT as NAMES
    from parity.names import canonical_names

    names = list(dict.fromkeys(names))
    counts = {"encoder": 0, "decoder": 0, "context_encoder": 0}
    points = {}
    for n in names:
        try:
            p = NAMES.point(n)
        except (KeyError, ValueError):
            continue
        points[n] = p
        if p.stack is not None:
            i = int(n.split(".")[2])
            counts[p.stack] = max(counts[p.stack], i + 1)
    order = canonical_names(counts["encoder"], counts["decoder"], counts["context_encoder"])
    out: dict[str, str | None] = {}
    prev = None  # the last residual-stream point in execution order
    for n in order:
        p = NAMES.point(n)
        owner = ".".join(n.split(".")[:3]) if p.stack is not None else n  # a sublayer takes its layer's input
        out[n] = None if owner in _CHAIN_STARTS else prev
        if owner == n:
            prev = n
    for stack, k in counts.items():  # a stack none of whose layers is named: its norm_out's input is unknown
        if k == 0:
            out[f"{stack}.norm_out"] = None
    return {n: out.get(n) for n in points}


def growth(result: DumpCompareResult) -> dict[tuple[str, int | None], Growth]:
    """Per compared tensor (name, step): its :class:`Growth`. The input is looked up at the same step, else
    without a step (the encoder runs once)."""
    inputs = residual_inputs(t.name for t in result.tensors)
    by_key = {t.key: t for t in result.tensors}
    out = {}
    for t in result.tensors:
        src = inputs.get(t.name)
        if src is None or t.reason is not None or t.max_abs is None:
            out[t.key] = Growth(src, None, None, None)
            continue
        i = by_key.get((src, t.step))  # (a result's truth value is its verdict: compare with None)
        if i is None:
            i = by_key.get((src, None))
        if i is None or i.reason is not None or i.max_abs is None:
            out[t.key] = Growth(src, None, None, None)
            continue
        if i.max_abs > 0:
            factor = t.max_abs / i.max_abs
        else:
            factor = math.inf if t.max_abs > 0 else None
        out[t.key] = Growth(src, i.max_abs, i.passed, factor)
    return out


def _factor(g: Growth | None) -> str:
    if g is None or g.input is None:
        return "-"
    if g.input_max_abs is None:
        return "n/a"
    if g.factor is None:
        return "-"
    return "from 0" if math.isinf(g.factor) else f"{g.factor:.3g}"


def _where(t: TensorCompareResult) -> str:
    idx = getattr(t, "worst_index", None)
    return "-" if idx is None or t.passed else "[" + ",".join(map(str, idx)) + "]"


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
            where = _where(t)
            lines.append(f"  {_worst(t):>10}  {t.name} step {_step(t.step)}"
                         + ("" if where == "-" else f" at {where}"))
    grow = growth(result)
    born = [t for t in ts if not t.passed and grow[t.key].origin == "born"]
    amp = [t for t in ts if not t.passed and grow[t.key].origin == "amplifies"]
    for label, sel in (("error born (input within tolerance, output not)", born),
                       (f"error amplified (output / input error >= {AMPLIFIES:g})", amp)):
        if sel:
            shown = ", ".join(f"{t.name}@{_step(t.step)} (x {_factor(grow[t.key])} of {grow[t.key].input})"
                              for t in sel[:MISSING_SHOWN])
            more = f" and {len(sel) - MISSING_SHOWN} more" if len(sel) > MISSING_SHOWN else ""
            lines.append(f"{label}: {shown}{more}")

    rows = ts
    if len(ts) > max_rows:
        fails = [t for t in ts if not t.passed][:max_rows]
        passes = [t for t in ts if t.passed][: max(0, max_rows - len(fails))]
        keep = {id(t) for t in fails} | {id(t) for t in passes}
        rows = [t for t in ts if id(t) in keep]
    header = ("", "name", "step", "shape", "max_abs", "max_rel", "cosine", "x in", "worst at", "failed")
    body = [
        (
            "ok" if t.passed else "XX",
            t.name,
            _step(t.step),
            "x".join(map(str, t.shape)) or "scalar",
            _num(t.max_abs) if t.reason is None else "-",
            _num(t.max_rel) if t.reason is None else "-",
            _cos(t.cosine) if t.reason is None else "-",
            _factor(grow[t.key]),
            _where(t),
            str(t.n_failed) if t.reason is None else t.reason,
        )
        for t in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    left = (0, 1, 3, 8, 9)
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(header).rstrip())
    lines.extend(fmt(r).rstrip() for r in body)
    if len(rows) < len(ts):
        lines.append(f"... {len(ts) - len(rows)} tensors not shown")
    if ts:
        lines.append("x in: max_abs / the max_abs of the tensor's input at the same step (the previous layer; a "
                     "sublayer's: its layer's input): 'from 0' = error from a bit-identical input, n/a = input not "
                     "compared, - = none (a chain start or no error); worst at: index of the largest |a - b| of a "
                     "failing tensor, in its shape")
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


def _tensor_dict(t: TensorCompareResult, g: Growth) -> dict:
    from parity.compare import result_to_dict

    d = result_to_dict(t)
    idx = getattr(t, "worst_index", None)
    d["worst_index"] = None if idx is None else list(idx)
    d["growth"] = {"input": g.input, "input_max_abs": g.input_max_abs, "input_passed": g.input_passed,
                   "factor": g.factor, "origin": None if t.passed else g.origin}
    return d


def to_json(result: DumpCompareResult) -> dict:
    grow = growth(result)
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
            "tensors": [_tensor_dict(t, grow[t.key]) for t in result.tensors],
            "missing_in_a": [{"name": n, "step": s} for n, s in result.missing_in_a],
            "missing_in_b": [{"name": n, "step": s} for n, s in result.missing_in_b],
            "warnings": list(result.warnings),
        }
    )


MAX_PLOT_STEPS = 12
MAX_PLOT_WIDTH = 60.0  # inches (6000 px at 100 dpi): a dump with thousands of names labels every k-th one
MAX_LABEL_CHARS = 80
_SHORT = ((r"^context_encoder\.", "ctx."), (r"^encoder\.", "enc."), (r"^decoder\.", "dec."), (r"layers\.(\d+)", r"\1"),
          (r"self_attention", "self_attn"), (r"cross_attention", "cross_attn"), (r"attn_probs", "probs"))


def short_label(name: str) -> str:
    """A capture point's name as an axis label: ``decoder.layers.3.cross_attention`` -> ``dec.3.cross_attn``; other
    names as they are; cut at :data:`MAX_LABEL_CHARS`."""
    for pat, rep in _SHORT:
        name = re.sub(pat, rep, name)
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "\u2026"


def _label(name: str) -> str:  # kept for callers of the earlier name
    return short_label(name)


@dataclass
class PlotData:
    """What :func:`plot` draws, in data units: errors as measured (an exact zero stays 0.0, drawn on the axis' zero
    row), per name its tolerance (atol) and, with a calibrated policy, its noise envelope (max over steps)."""

    names: list[str]
    labels: list[str]
    series: list[tuple[str, list[int], list[float]]]  # (legend label, x positions, max |a - b|) per step
    steps: list[int | None]
    atol: list[float]
    envelope: list[float | None]
    failed: tuple[list[int], list[float]]
    title: str


def plot_data(result: DumpCompareResult) -> PlotData:
    ts = [t for t in result.tensors if t.reason is None and t.max_abs is not None]
    names = list(dict.fromkeys(t.name for t in result.tensors))
    xpos = {n: i for i, n in enumerate(names)}
    steps = list(dict.fromkeys(t.step for t in ts))
    err = lambda t: float(min(t.max_abs, 1e38))  # noqa: E731  (inf/nan drawn at the top)
    series = []
    for s in steps:
        sel = [t for t in ts if t.step == s]
        series.append((f"step {_step(s)}", [xpos[t.name] for t in sel], [err(t) for t in sel]))
    atol = {}
    env: dict[str, float | None] = {}
    for t in result.tensors:
        atol[t.name] = max(atol.get(t.name, 0.0), t.tolerance.atol)
        e = getattr(t, "envelope", None)
        if e is not None and not t.exact:
            env[t.name] = max(env.get(t.name) or 0.0, float(e))
    fails = [t for t in ts if not t.passed]
    verdict_word = "PASS" if result.passed else "FAIL"
    return PlotData(names, [short_label(n) for n in names], series, steps, [atol[n] for n in names],
                    [env.get(n) for n in names], ([xpos[t.name] for t in fails], [err(t) for t in fails]),
                    f"max |a - b| per tensor: a = {result.source_a}, b = {result.source_b} ({verdict_word})")


def _zero_row(d: PlotData) -> float:
    """Where an exact zero is drawn on the log axis: a decade below the smallest positive value drawn."""
    pos = [y for _l, _x, ys in d.series for y in ys if y > 0] + [a for a in d.atol if a > 0]
    pos += [e for e in d.envelope if e]
    return 10 ** (math.floor(math.log10(min(pos))) - 1) if pos else 1e-12


def plot(result: DumpCompareResult, png_path: str | os.PathLike) -> pathlib.Path:
    """Max abs error per tensor in execution order (log y), one line per step (points coloured by step beyond
    ``MAX_PLOT_STEPS`` steps), the tolerance (atol) as a dashed line and, with calibrated tolerances, the noise
    envelope as a shaded band; failing tensors crossed. Exact zeros sit on their own bottom row labelled
    "0 (bit-identical)" (a log axis has no zero). Names are shortened (``dec.3.cross_attn``) and drawn literally
    (never as TeX or mathtext); the width is capped at :data:`MAX_PLOT_WIDTH` inches, labelling every k-th name."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = plot_data(result)
    zero = _zero_row(d)
    at = lambda ys: [y if y > 0 else zero for y in ys]  # noqa: E731  (0 -> the zero row, nothing else moves)
    n = len(d.names)
    # our figures never go through TeX, whatever the user's matplotlibrc says
    with matplotlib.rc_context({"text.usetex": False}):
        width = min(MAX_PLOT_WIDTH, max(8.0, 0.25 * n + 4))
        every = max(1, math.ceil(n / ((width - 4) / 0.25)))
        fig, ax = plt.subplots(figsize=(width, 5.5))
        try:
            xs = list(range(n))
            if any(e is not None for e in d.envelope):
                env = [e if e is not None else 0.0 for e in d.envelope]
                ax.fill_between(xs, [zero] * n, at(env), step="mid", color="0.8", alpha=0.7,
                                label="calibrated noise envelope (reduced-precision reference vs float32)")
            ax.step(xs, at(d.atol), where="mid", color="red", ls="--", lw=1, label="tolerance (atol)")
            if len(d.steps) <= MAX_PLOT_STEPS:
                for label, x, ys in d.series:
                    ax.plot(x, at(ys), marker="o", ms=3, lw=1, label=f"max |a - b|, {label}")
            else:
                allx = [x for _l, xx, _y in d.series for x in xx]
                ally = [y for _l, _x, yy in d.series for y in yy]
                cs = [-1 if s is None else s for s, (_l, xx, _y) in zip(d.steps, d.series) for _ in xx]
                sc = ax.scatter(allx, at(ally), c=cs, s=8, cmap="viridis", label="max |a - b| (colour: step)")
                fig.colorbar(sc, ax=ax, label="decoder step")
            if d.failed[0]:
                ax.scatter(d.failed[0], at(d.failed[1]), marker="x", color="red", s=30, zorder=5,
                           label="beyond tolerance")
            ax.set_yscale("log")
            ax.axhline(zero, color="0.6", lw=0.5)
            lo, hi = ax.get_ylim()
            ax.set_ylim(zero / 3, max(hi, zero * 10))
            ticks = [t for t in ax.get_yticks() if zero * 5 <= t <= ax.get_ylim()[1]]
            ax.set_yticks([zero] + ticks)
            ax.set_yticklabels(["0 (bit-identical)"] + [f"1e{round(math.log10(t))}" for t in ticks])
            ax.set_ylabel("max |a - b| over the tensor's elements")
            ax.set_xlabel("capture point, in execution order (enc = encoder, dec = decoder, N = layer)")
            xt = list(range(0, n, every))
            ax.set_xticks(xt)
            ax.set_xticklabels([d.labels[i] for i in xt], rotation=60, ha="right", fontsize=7, parse_math=False)
            ax.set_xlim(-0.5, n - 0.5)
            ax.set_title(d.title, parse_math=False)
            ax.grid(axis="y", color="0.9", lw=0.5)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})
        finally:
            plt.close(fig)
    pathlib.Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(png_path, buf.getvalue())
    return pathlib.Path(png_path)
