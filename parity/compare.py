"""Tensor and dump comparison, Polygraphy-style, streaming with bounded memory.

Conventions (``a`` = the dump under test, ``b`` = the expected/reference dump):

* ``abs = |a - b|``, ``rel = abs / max(|b|, TINY)`` with ``TINY`` = smallest normal float32
  (1.1754944e-38). The floor keeps ``rel`` finite where the reference is 0; the quotient is then
  clamped to the largest finite value of the math dtype, so finite inputs never give NaN/Inf stats.
* An element fails iff ``abs > atol and abs > rtol * |b|`` (Polygraphy's elementwise rule).
* Any NaN, in either tensor, fails -- including NaN against NaN at the same position: a NaN in a
  reference dump is a bug to surface, not a value to match. NaN positions are counted
  (``nan_a``/``nan_b``) and excluded from the error statistics.
* An Inf passes only against an Inf of the same sign at the same position (error 0 there); it is
  counted in ``inf_a``/``inf_b``. Inf against a finite value or the opposite Inf fails with error Inf.
* ``cosine`` is over the positions where both sides are finite, accumulated in float64 across chunks;
  two all-zero vectors have cosine 1, one all-zero vector against a non-zero one has cosine 0.
* Quantiles (``median_abs``, ``q99_abs``) come from a streaming histogram of the float32 bit pattern
  of the error shifted right by 20 bits: sign, exponent and 3 mantissa bits, i.e. 8 log-spaced bins per
  octave. The reported value is the bin's upper edge (at most 12.5 % above the exact quantile) capped
  at ``max_abs``; it is exact for zero errors.

Integer and bool tensors (codes, lengths, masks) are exact: when both sides are integer or bool they are compared
by equality in their own values (widened to int64 where the dtypes differ; never through float64, which would
equate ``2**62`` and ``2**62 + 100``), whatever tolerance the policy names: the result's tolerance is
:data:`~parity.tolerances.EXACT`, ``exact`` is set, ``n_failed`` is the count of differing elements and
``tol_ratio`` is None (no ratio to a zero tolerance). Their error figures are exact differences shown as float64.
The same holds, by value in float64, for an integer tensor against a floating one (codes an engine stored as
floats) and for floating tensors given a zero tolerance (``atol`` = ``rtol`` = 0, elementwise): a ratio to a zero
tolerance means nothing, the count of differing elements does.

``worst_index`` locates the error: the multi-index (in the tensor's shape: batch item, step, position, head or
codebook, as the tensor is laid out) of the element of largest ``|a - b|`` (NaN and a mismatched Inf count as
infinite; the first such element on ties), or for exact tensors of the first differing element; None when no
element differs.

Default tolerances follow the precision the runs computed in (each dump's manifest ``dtype``, the less precise of
the two), not the dtype a tensor is stored in: a float32-stored tensor of a bfloat16 run gets the bfloat16 default.

Math runs in float32 for float inputs that float32 holds exactly (fp16, bf16, fp8) and in float64 otherwise.
Per-chunk sums are float32 (torch's cascaded summation) and are accumulated in float64; a chunk whose float32 sums
or differences overflow is redone in float64.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from parity.dump import DumpError, DumpReader, TensorEntry, open_dump
# The tolerance types and policies live in parity.tolerances; re-exported here for existing imports.
from parity.tolerances import (  # noqa: F401
    CHECKS,
    DTYPE_DEFAULTS,
    EXACT,
    PolicyError,
    Tolerance,
    TolerancePolicy,
    dtype_default,
    loosest_precision,
)
from parity.tolerances import policy as default_policy

TINY = float(torch.finfo(torch.float32).tiny)
DEFAULT_CHUNK_ELEMS = 1 << 20

_HIST_SHIFT = 20
_HIST_BINS = 1 << (31 - _HIST_SHIFT)  # non-negative float32 bit patterns only: 2048 bins
_EXACT_IN_F32 = {
    torch.float16,
    torch.bfloat16,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.float32,
}
for _n in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _n):
        _EXACT_IN_F32.add(getattr(torch, _n))
# float32 inputs still get float64 math: parity checks at 1e-5 want the difference itself unrounded.
_F32_MATH = _EXACT_IN_F32 - {torch.float32}


# ------------------------------------------------------------------------------------------- results


@dataclass
class TensorCompareResult:
    name: str
    step: int | None
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    passed: bool
    numel: int
    tolerance: Tolerance
    max_abs: float | None = None
    mean_abs: float | None = None
    median_abs: float | None = None
    q99_abs: float | None = None
    max_rel: float | None = None
    mean_rel: float | None = None
    cosine: float | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    n_failed: int = 0
    # max over elements of abs / max(atol, rtol*|b|): > 1 means failing. Exact when > 1; for chunks
    # entirely within atol it is the upper bound max_abs/atol (ranking only; no extra pass).
    tol_ratio: float | None = None
    reason: str | None = None  # set when the tensors could not be compared (shape/length mismatch)
    shape_a: tuple[int, ...] | None = None  # a's shape when it differs from ``shape`` (b's)
    exact: bool = False  # integer/bool on both sides: equality decides, n_failed counts the differing elements
    worst_index: tuple[int, ...] | None = None  # where the largest |a - b| is (exact: the first differing element)
    # a calibrated policy's bound for this (name, step) (parity.tolerances.CalibratedPolicy): max |a - b| allowed
    # for a floating tensor (its tolerance's atol), elements allowed to differ for an exact one; None otherwise
    envelope: float | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.name, self.step)

    @property
    def envelope_ratio(self) -> float | None:
        """Error over the calibrated envelope (> 1: beyond the precision's noise): max |a - b| / envelope, or for
        exact tensors differing elements / allowed ones (inf when none are allowed); None without an envelope."""
        if self.envelope is None or self.reason is not None:
            return None if self.reason is None else math.inf
        err = float(self.n_failed) if self.exact else self.max_abs
        if err is None or math.isnan(err):
            return math.inf
        if self.envelope == 0:
            return 0.0 if err == 0 else math.inf
        return err / self.envelope


@dataclass
class DumpCompareResult:
    a: str
    b: str
    source_a: str
    source_b: str
    tensors: list[TensorCompareResult]
    missing_in_a: list[tuple[str, int | None]] = field(default_factory=list)
    missing_in_b: list[tuple[str, int | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_compared: int = 0
    # An engine dump holds a subset of what the reference captures (no attention probabilities, last-token
    # outputs only): with intersect=True the tensors only one side has are reported but do not fail.
    intersect: bool = False
    precision_a: str | None = None  # the manifests' dtype: the precision each run computed in
    precision_b: str | None = None

    @property
    def passed(self) -> bool:
        missing_ok = self.intersect or (not self.missing_in_a and not self.missing_in_b)
        return missing_ok and bool(self.tensors) and all(t.passed for t in self.tensors)

    @property
    def failed(self) -> list[TensorCompareResult]:
        return [t for t in self.tensors if not t.passed]

    @property
    def first_divergence(self) -> tuple[str, int | None] | None:
        """First failing compared tensor in execution order (of dump b); missing tensors are listed apart."""
        for t in self.tensors:
            if not t.passed:
                return t.key
        return None

    def __bool__(self) -> bool:
        return self.passed


# ------------------------------------------------------------------------------------ streaming core


def _math_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float32 if a in _F32_MATH and b in _F32_MATH else torch.float64


def _bins(x: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each non-negative value: top 11 bits of its float32 pattern (see module doc)."""
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return torch.bitwise_right_shift(x.view(torch.int32), _HIST_SHIFT)


def _hist_quantile(hist: torch.Tensor, q: float, cap: float) -> float:
    n = int(hist.sum())
    if n == 0:
        return math.nan
    target = max(1, math.ceil(q * n - 1e-9))
    k = int(torch.searchsorted(torch.cumsum(hist, 0), target))
    if k == 0:
        return 0.0  # bin 0 is zero (and float32 subnormals below 1.5e-39)
    upper_bits = (k + 1) << _HIST_SHIFT
    if upper_bits >= 0x7F800000:
        upper = math.inf
    else:
        upper = float(torch.tensor([upper_bits], dtype=torch.int32).view(torch.float32))
    return min(upper, cap)


class _Accumulator:
    """One pass of statistics over aligned chunk pairs. Memory: a few chunk-sized temporaries."""

    def __init__(self, tol: Tolerance, math_dtype: torch.dtype):
        self.tol = tol
        self.m = math_dtype
        self.numel = 0
        self.n_valid = 0  # positions where neither side is NaN
        self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0
        self.inf_bad = 0
        self.n_failed = 0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.max_rel = 0.0
        self.sum_rel = 0.0
        self.dot_ab = self.dot_aa = self.dot_bb = 0.0
        self.tol_ratio = 0.0
        self.worst_flat: int | None = None  # flat index of the largest error so far (see worst_index)
        self.worst_key = 0.0
        self.hist_abs = torch.zeros(_HIST_BINS, dtype=torch.int64)
        self.want_rel_hist = tol.check in ("median", "quantile")
        self.hist_rel = torch.zeros(_HIST_BINS, dtype=torch.int64) if self.want_rel_hist else None

    def _worst(self, key: torch.Tensor) -> None:
        """Track the flat index of the largest per-element error ``key`` of the chunk just counted in ``numel``
        (the first maximal element: argmax returns the first; a later chunk must be strictly larger)."""
        k = key.amax().item()
        if k > self.worst_key:
            self.worst_key = k
            self.worst_flat = self.numel - key.numel() + int(torch.argmax(key))

    def update(self, ca: torch.Tensor, cb: torch.Tensor) -> None:
        n = ca.numel()
        if n == 0:
            return
        self.numel += n
        a = ca.to(self.m)
        b = cb.to(self.m)
        # The three dot products double as a NaN/Inf detector: they are finite iff both chunks are
        # (no finite input overflows them in the chosen math dtype, except extreme bf16 -> slow path).
        dab, daa, dbb = torch.dot(a, b).item(), torch.dot(a, a).item(), torch.dot(b, b).item()
        if not (math.isfinite(dab) and math.isfinite(daa) and math.isfinite(dbb)):
            self._slow(a, b)
            return
        d = torch.sub(a, b).abs_()
        mx = d.amax().item()
        if not math.isfinite(mx):  # a finite - finite overflow (bf16 near its max): redo in float64
            self._slow(a.double(), b.double())
            return
        if mx > self.worst_key:
            self._worst(d)
        s_abs = d.sum().item()
        if not math.isfinite(s_abs):
            s_abs = d.sum(dtype=torch.float64).item()
        self.n_valid += n
        self.dot_ab += dab
        self.dot_aa += daa
        self.dot_bb += dbb
        self.max_abs = max(self.max_abs, mx)
        self.sum_abs += s_abs
        self.hist_abs += torch.bincount(_bins(d), minlength=_HIST_BINS)
        absb = b.abs()
        atol, rtol = self.tol.atol, self.tol.rtol
        if mx > atol:
            thr = torch.mul(absb, rtol).clamp_min_(atol)
            self.n_failed += int(torch.count_nonzero(d > thr))
            self.tol_ratio = max(self.tol_ratio, torch.div(d, thr.clamp_min_(TINY)).amax().item())
        else:
            self.tol_ratio = max(self.tol_ratio, mx / atol if atol > 0 else 0.0)
        rel = torch.div(d, absb.clamp_min_(TINY), out=absb).clamp_max_(torch.finfo(self.m).max)
        self.max_rel = max(self.max_rel, rel.amax().item())
        s_rel = rel.sum().item()
        if not math.isfinite(s_rel):
            s_rel = rel.sum(dtype=torch.float64).item()
        self.sum_rel += s_rel
        if self.hist_rel is not None:
            self.hist_rel += torch.bincount(_bins(rel), minlength=_HIST_BINS)

    def _slow(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Chunks holding NaN/Inf (or overflowing): the same statistics with explicit masks."""
        nan_a, nan_b, inf_a, inf_b = torch.isnan(a), torch.isnan(b), torch.isinf(a), torch.isinf(b)
        nan = nan_a | nan_b
        fin = ~(nan | inf_a | inf_b)
        d = torch.sub(a, b).abs_()
        overflow = bool((torch.isinf(d) & fin).any())
        if overflow and a.dtype != torch.float64:
            self._slow(a.double(), b.double())  # finite - finite overflowed float32: use float64
            return
        fmax = torch.finfo(a.dtype).max
        if overflow:
            d = torch.where(fin, d.clamp_max(fmax), d)  # float64 overflow: report the largest double
        inf_match = inf_a & inf_b & (a == b)  # same-signed Inf at the same position
        inf_bad = (inf_a | inf_b) & ~inf_match & ~nan
        self._worst(d.masked_fill(inf_match, 0.0).masked_fill_(nan, math.inf))
        self.nan_a += int(nan_a.sum())
        self.nan_b += int(nan_b.sum())
        self.inf_a += int(inf_a.sum())
        self.inf_b += int(inf_b.sum())
        self.inf_bad += int(inf_bad.sum())
        d = d.masked_fill_(nan | inf_match, 0.0)
        valid = ~nan
        self.n_valid += int(valid.sum())
        self.max_abs = max(self.max_abs, d.amax().item())
        self.sum_abs += d.sum(dtype=torch.float64).item()
        self.hist_abs += torch.bincount(_bins(d[valid]), minlength=_HIST_BINS)
        absb = b.abs()
        thr = torch.mul(absb, self.tol.rtol).clamp_min_(self.tol.atol)
        failed = nan | inf_bad | (fin & (d > thr))
        self.n_failed += int(failed.sum())
        ratio = torch.div(d, thr.clamp_min(TINY)).masked_fill_(nan | inf_bad, math.inf).masked_fill_(inf_match, 0.0)
        self.tol_ratio = max(self.tol_ratio, ratio.amax().item())
        rel = torch.div(d, absb.clamp_min(TINY))
        rel = torch.where(fin, rel.clamp_max(fmax), rel)
        rel = rel.masked_fill_(nan | inf_match, 0.0).masked_fill_(inf_bad, math.inf)
        self.max_rel = max(self.max_rel, rel.amax().item())
        self.sum_rel += rel.sum(dtype=torch.float64).item()
        if self.hist_rel is not None:
            self.hist_rel += torch.bincount(_bins(rel[valid]), minlength=_HIST_BINS)
        af = torch.where(fin, a, 0.0).double()
        bf = torch.where(fin, b, 0.0).double()
        self.dot_ab += torch.dot(af, bf).item()
        self.dot_aa += torch.dot(af, af).item()
        self.dot_bb += torch.dot(bf, bf).item()

    def finish(self, **ident: Any) -> TensorCompareResult:
        tol = self.tol
        nv = self.n_valid
        mean_abs = self.sum_abs / nv if nv else math.nan
        mean_rel = self.sum_rel / nv if nv else math.nan
        median_abs = _hist_quantile(self.hist_abs, 0.5, self.max_abs)
        q99_abs = _hist_quantile(self.hist_abs, 0.99, self.max_abs)
        nan_any = self.nan_a + self.nan_b > 0
        if tol.check == "elemwise":
            passed = self.n_failed == 0
        else:
            if tol.check == "max":
                s_abs, s_rel = self.max_abs, self.max_rel
            elif tol.check == "mean":
                s_abs, s_rel = mean_abs, mean_rel
            else:
                q = 0.5 if tol.check == "median" else tol.quantile
                s_abs = _hist_quantile(self.hist_abs, q, self.max_abs)
                s_rel = _hist_quantile(self.hist_rel, q, self.max_rel)
            within = (s_abs <= tol.atol) or (s_rel <= tol.rtol)
            passed = within and not nan_any and self.inf_bad == 0
        return TensorCompareResult(
            passed=bool(passed),
            numel=self.numel,
            tolerance=tol,
            max_abs=self.max_abs if nv or not self.numel else math.nan,
            mean_abs=mean_abs if self.numel else 0.0,
            median_abs=median_abs if self.numel else 0.0,
            q99_abs=q99_abs if self.numel else 0.0,
            max_rel=self.max_rel if nv or not self.numel else math.nan,
            mean_rel=mean_rel if self.numel else 0.0,
            cosine=_cosine(self.dot_ab, self.dot_aa, self.dot_bb),
            nan_a=self.nan_a,
            nan_b=self.nan_b,
            inf_a=self.inf_a,
            inf_b=self.inf_b,
            n_failed=self.n_failed,
            tol_ratio=self.tol_ratio,
            worst_index=None if self.worst_flat is None else unravel(self.worst_flat, ident.get("shape", ())),
            **ident,
        )


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The multi-index of flat (row-major) element ``flat`` of a tensor of ``shape``."""
    idx = []
    for n in reversed(tuple(shape)):
        flat, i = divmod(flat, n) if n else (flat, 0)
        idx.append(i)
    return tuple(reversed(idx))


def is_exact_dtype(dtype: torch.dtype) -> bool:
    """Integer and bool dtypes: compared by equality, never within a tolerance."""
    return not (dtype.is_floating_point or dtype.is_complex)


def _int64_bits(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every integer/bool dtype as int64 (exact), except uint64: its bit pattern, with a flag for values >= 2**63."""
    if t.dtype == torch.uint64:
        bits = t.view(torch.int64)
        return bits, bits < 0
    return t.to(torch.int64), None


def _as_float64(bits: torch.Tensor, big: torch.Tensor | None) -> torch.Tensor:
    f = bits.to(torch.float64)
    return f if big is None else torch.where(big, f + 2.0**64, f)


def exact_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``a != b`` by value, ``|a - b|`` as float64) for flat integer/bool tensors. Equality is decided in integers
    (never through float64); the difference is computed in int64 and only a difference that overflows int64
    (``|a - b| >= 2**63``) is taken from float64, where it is huge and rounding cannot hide it."""
    a64, big_a = _int64_bits(a)
    b64, big_b = _int64_bits(b)
    ne = a64 != b64
    if big_a is not None or big_b is not None:
        no = torch.zeros_like(ne)
        ne |= (no if big_a is None else big_a) != (no if big_b is None else big_b)
    d64 = a64 - b64  # wraps where the true difference leaves int64
    wrapped = ((a64 ^ b64) & (a64 ^ d64)) < 0
    if big_a is not None:
        wrapped |= big_a
    if big_b is not None:
        wrapped |= big_b
    d = d64.to(torch.float64).abs_()
    if bool(wrapped.any()):
        far = (_as_float64(a64, big_a) - _as_float64(b64, big_b)).abs_()
        d = torch.where(wrapped, far, d)
    return ne, d


class _ExactAccumulator(_Accumulator):
    """Integer/bool chunk pairs: ``n_failed`` counts the elements that differ; the error figures are exact.
    A pair with a floating side (codes stored as floats, or a zero tolerance) is compared by value in float64
    (NaN differs from everything; an Inf equals the same Inf)."""

    def __init__(self) -> None:
        super().__init__(EXACT, torch.float64)

    def update(self, ca: torch.Tensor, cb: torch.Tensor) -> None:
        n = ca.numel()
        if n == 0:
            return
        self.numel += n
        self.n_valid += n
        if ca.is_floating_point() or cb.is_floating_point():
            self._update_float(ca.to(torch.float64), cb.to(torch.float64))
            return
        ne, d = exact_difference(ca, cb)
        n_ne = int(torch.count_nonzero(ne))
        if n_ne and self.worst_flat is None:
            self.worst_flat = self.numel - n + int(torch.argmax(ne.to(torch.uint8)))
        self.n_failed += n_ne
        self.max_abs = max(self.max_abs, d.amax().item())
        self.sum_abs += d.sum().item()
        self.hist_abs += torch.bincount(_bins(d), minlength=_HIST_BINS)
        a = _as_float64(*_int64_bits(ca))
        b = _as_float64(*_int64_bits(cb))
        rel = torch.div(d, b.abs().clamp_min_(TINY))
        self.max_rel = max(self.max_rel, rel.amax().item())
        self.sum_rel += rel.sum().item()
        self.dot_ab += torch.dot(a, b).item()
        self.dot_aa += torch.dot(a, a).item()
        self.dot_bb += torch.dot(b, b).item()

    def _update_float(self, a: torch.Tensor, b: torch.Tensor) -> None:
        ne = a != b  # NaN differs from everything, itself included
        n_ne = int(torch.count_nonzero(ne))
        if n_ne and self.worst_flat is None:
            self.worst_flat = self.numel - a.numel() + int(torch.argmax(ne.to(torch.uint8)))
        self.n_failed += n_ne
        self.nan_a += int(torch.isnan(a).sum())
        self.nan_b += int(torch.isnan(b).sum())
        self.inf_a += int(torch.isinf(a).sum())
        self.inf_b += int(torch.isinf(b).sum())
        d = torch.where(ne, (a - b).abs(), 0.0).nan_to_num_(nan=math.inf)
        self.max_abs = max(self.max_abs, d.amax().item())
        self.sum_abs += d.sum().item()
        self.hist_abs += torch.bincount(_bins(d), minlength=_HIST_BINS)
        rel = torch.div(d, b.abs().clamp_min_(TINY)).nan_to_num_(nan=math.inf)
        self.max_rel = max(self.max_rel, rel.amax().item())
        self.sum_rel += rel.sum().item()
        fin = torch.isfinite(a) & torch.isfinite(b)
        af, bf = torch.where(fin, a, 0.0), torch.where(fin, b, 0.0)
        self.dot_ab += torch.dot(af, bf).item()
        self.dot_aa += torch.dot(af, af).item()
        self.dot_bb += torch.dot(bf, bf).item()

    def finish(self, **ident: Any) -> TensorCompareResult:
        r = super().finish(**ident)  # EXACT is elemwise: passed iff no element differs
        r.tol_ratio = None
        r.exact = True
        return r


def _cosine(ab: float, aa: float, bb: float) -> float:
    if aa == 0.0 and bb == 0.0:
        return 1.0  # both all-zero (on their finite positions): identical
    if aa == 0.0 or bb == 0.0:
        return 0.0
    c = ab / (math.sqrt(aa) * math.sqrt(bb))  # sqrt first: aa*bb may overflow a double
    return max(-1.0, min(1.0, c))


def _aligned(it_a: Iterable[torch.Tensor], it_b: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pair up two chunk streams whose chunk boundaries may differ; yields equal-length views."""
    ia, ib = iter(it_a), iter(it_b)
    ca = cb = None
    while True:
        if ca is None or ca.numel() == 0:
            ca = next(ia, None)
            if ca is not None:
                ca = ca.reshape(-1)
                continue
        if cb is None or cb.numel() == 0:
            cb = next(ib, None)
            if cb is not None:
                cb = cb.reshape(-1)
                continue
        if ca is None and cb is None:
            return
        if ca is None or cb is None:
            raise ValueError("chunk streams have different total lengths")
        n = min(ca.numel(), cb.numel())
        yield ca[:n], cb[:n]
        ca, cb = ca[n:], cb[n:]


def is_exact_comparison(dtype_a: torch.dtype, dtype_b: torch.dtype, tol: Tolerance) -> bool:
    """Compared by equality (a count of differing elements, never a ratio): integer/bool on either side (codes,
    positions, lengths; an engine may store them as floats), or a zero elementwise tolerance."""
    return (is_exact_dtype(dtype_a) or is_exact_dtype(dtype_b)
            or (tol.atol == 0 and tol.rtol == 0 and tol.check == "elemwise"))


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def compare_streams(
    chunks_a: Iterable[torch.Tensor],
    chunks_b: Iterable[torch.Tensor],
    tol: Tolerance,
    *,
    dtype_a: torch.dtype,
    dtype_b: torch.dtype,
    shape: Sequence[int],
    name: str = "",
    step: int | None = None,
    on_chunk: Any = None,
) -> TensorCompareResult:
    """Compare two streams of flat chunks in one pass; memory is bounded by the chunk size.

    ``on_chunk(n_elems)`` is called after each aligned chunk pair (progress reporting).
    """
    exact = is_exact_comparison(dtype_a, dtype_b, tol)
    if exact:
        tol = EXACT
    acc = _ExactAccumulator() if exact else _Accumulator(tol, _math_dtype(dtype_a, dtype_b))
    ident = dict(name=name, step=step, shape=tuple(shape), dtype_a=_dtype_name(dtype_a), dtype_b=_dtype_name(dtype_b))
    try:
        for ca, cb in _aligned(chunks_a, chunks_b):
            acc.update(ca, cb)
            if on_chunk is not None:
                on_chunk(ca.numel())
    except ValueError as exc:
        if "different total lengths" not in str(exc):
            raise
        return TensorCompareResult(passed=False, numel=math.prod(shape), tolerance=tol, reason=str(exc), exact=exact,
                                   **ident)
    return acc.finish(**ident)


def compare_tensors(
    a: torch.Tensor,
    b: torch.Tensor,
    tol: Tolerance | None = None,
    *,
    name: str = "",
    step: int | None = None,
    chunk_elems: int | None = None,
) -> TensorCompareResult:
    """Compare ``a`` (under test) with ``b`` (expected). ``tol`` defaults to the dtype-aware default.

    ``chunk_elems`` splits the work like the streaming path does (default: one chunk).
    Inputs are never modified.
    """
    if tol is None:
        tol = dtype_default(_dtype_name(a.dtype), _dtype_name(b.dtype))
    if tuple(a.shape) != tuple(b.shape):
        return _shape_mismatch(name, step, tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, tol)
    fa = a.detach().cpu().reshape(-1)
    fb = b.detach().cpu().reshape(-1)
    size = chunk_elems or max(1, fa.numel())
    return compare_streams(
        (fa[i : i + size] for i in range(0, fa.numel(), size)),
        (fb[i : i + size] for i in range(0, fb.numel(), size)),
        tol,
        dtype_a=a.dtype,
        dtype_b=b.dtype,
        shape=tuple(b.shape),
        name=name,
        step=step,
    )


def _shape_mismatch(name, step, shape_a, shape_b, dtype_a, dtype_b, tol) -> TensorCompareResult:
    da = dtype_a if isinstance(dtype_a, str) else _dtype_name(dtype_a)
    db = dtype_b if isinstance(dtype_b, str) else _dtype_name(dtype_b)
    exact = is_exact_comparison(getattr(torch, da), getattr(torch, db), tol)
    if exact:
        tol = EXACT
    return TensorCompareResult(
        name=name,
        step=step,
        shape=tuple(shape_b),
        shape_a=tuple(shape_a),
        dtype_a=da,
        dtype_b=db,
        passed=False,
        numel=math.prod(shape_b),
        tolerance=tol,
        reason=f"shape mismatch: a {list(shape_a)} vs b {list(shape_b)}",
        exact=exact,
    )


# ------------------------------------------------------------------------------------------- dumps


def _check_compatible(a: DumpReader, b: DumpReader) -> list[str]:
    """Raise DumpError for manifests that must not be compared; return warnings for softer mismatches."""
    if a.config_hash is not None and b.config_hash is not None and a.config_hash != b.config_hash:
        raise DumpError(
            f"dumps of different models: {a.manifest_path} has config_hash {a.config_hash!r}, "
            f"{b.manifest_path} has {b.config_hash!r} (the reference config hash of the checkpoint each was made "
            "from); nothing compared"
        )
    for k in sorted(set(a.layout) & set(b.layout)):
        if a.layout[k] != b.layout[k]:
            raise DumpError(
                f"incompatible manifests: layout[{k!r}] is {a.layout[k]!r} in {a.manifest_path} "
                f"but {b.layout[k]!r} in {b.manifest_path}"
            )
    warnings = []
    for k in sorted(set(a.inputs) & set(b.inputs)):
        if a.inputs[k] != b.inputs[k]:
            warnings.append(f"inputs[{k!r}] differs: {a.inputs[k]!r} (a) vs {b.inputs[k]!r} (b)")
    return warnings


def _selected(name: str, names: Sequence[str] | None) -> bool:
    return names is None or any(fnmatch.fnmatchcase(name, p) for p in names)


def compare_dumps(
    a: DumpReader | str | os.PathLike,
    b: DumpReader | str | os.PathLike,
    policy: TolerancePolicy | None = None,
    names: Sequence[str] | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    *,
    progress: bool | None = None,
    workers: int | None = None,
    intersect: bool = False,
) -> DumpCompareResult:
    """Compare every (name, step) present in both dumps, in dump b's execution order.

    ``policy``: per-tensor tolerances (default: the ``""`` policy of :mod:`parity.tolerances`, the per-dtype
    defaults). ``names``: fnmatch globs selecting tensors (default: all). ``workers``: threads comparing tensors
    concurrently (torch releases the GIL inside its kernels and reads use ``pread``); default
    ``min(2, cpu_count)``. ``progress``: tqdm bar on stderr; ``None`` = only when stderr is a tty.
    Raises DumpError for unreadable/corrupt dumps and incompatible manifests.
    """
    ra, rb = open_dump(a), open_dump(b)
    policy = policy or default_policy("")
    warnings = _check_compatible(ra, rb)
    precision = loosest_precision(ra.dtype, rb.dtype)  # the runs' precision: what the default tolerances follow
    check_policy = getattr(policy, "check_dumps", None)  # a calibrated policy refuses dumps it was not made for
    if check_policy is not None:
        check_policy(ra, rb)
    ea = {(e.name, e.step): e for e in ra.entries if _selected(e.name, names)}
    eb = [e for e in rb.entries if _selected(e.name, names)]
    keys_b = {(e.name, e.step) for e in eb}
    missing_in_a = [(e.name, e.step) for e in eb if (e.name, e.step) not in ea]
    missing_in_b = [k for k in ea if k not in keys_b]
    pairs = [(ea[(e.name, e.step)], e) for e in eb if (e.name, e.step) in ea]
    total_bytes = sum(x.nbytes + y.nbytes for x, y in pairs)

    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    bar = _progress_bar(total_bytes, progress)
    lock = threading.Lock()

    def one(pair: tuple[TensorEntry, TensorEntry]) -> TensorCompareResult:
        x, y = pair
        tol = policy.lookup(y.name, x.dtype, y.dtype, step=y.step, precision=precision)
        if x.shape != y.shape:
            with lock:
                bar.update(x.nbytes + y.nbytes)
            return _shape_mismatch(y.name, y.step, x.shape, y.shape, x.dtype, y.dtype, tol)
        per_elem = x.itemsize + y.itemsize

        def tick(n: int) -> None:
            with lock:
                bar.update(n * per_elem)

        return compare_streams(
            ra._chunks(x, chunk_elems, reuse=True),
            rb._chunks(y, chunk_elems, reuse=True),
            tol,
            dtype_a=x.torch_dtype,
            dtype_b=y.torch_dtype,
            shape=y.shape,
            name=y.name,
            step=y.step,
            on_chunk=tick,
        )

    try:
        if workers <= 1 or len(pairs) <= 1:
            results = [one(p) for p in pairs]
        else:
            # map() returns results in execution order; only `workers` tensors are being read at once
            # (queued tasks hold no data), so memory stays bounded by workers x chunk temporaries.
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="parity-compare") as pool:
                results = list(pool.map(one, pairs))
    finally:
        bar.close()
    envelope = getattr(policy, "envelope", None)
    if envelope is not None:
        for r in results:
            r.envelope = envelope(r.name, r.step, exact=r.exact)
            if r.exact and r.envelope is not None and r.reason is None and not (r.nan_a or r.nan_b):
                r.passed = r.n_failed <= r.envelope  # integer tensors within the mismatches calibration saw
    return DumpCompareResult(
        a=str(ra.path),
        b=str(rb.path),
        source_a=ra.source,
        source_b=rb.source,
        tensors=results,
        missing_in_a=missing_in_a,
        missing_in_b=missing_in_b,
        warnings=warnings,
        bytes_compared=total_bytes,
        intersect=intersect,
        precision_a=ra.dtype,
        precision_b=rb.dtype,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="compare", file=sys.stderr, leave=False)


def result_to_dict(r: TensorCompareResult) -> dict:
    d = asdict(r)
    d["tolerance"] = r.tolerance.to_dict()
    d["shape"] = list(r.shape)
    if r.shape_a is not None:
        d["shape_a"] = list(r.shape_a)
    if r.worst_index is not None:
        d["worst_index"] = list(r.worst_index)
    if r.envelope is not None:
        d["envelope_ratio"] = r.envelope_ratio
    return d
