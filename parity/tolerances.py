"""Every tolerance of the project, in one place: the types, the per-dtype defaults and the named policies.

Two kinds of tolerance live here:

* :class:`Tolerance` (``atol``/``rtol`` applied Polygraphy's way) and :class:`TolerancePolicy` (per-tensor
  tolerances by name or glob, with a ``""`` default key like Polygraphy's comparator, then the per-dtype
  defaults :data:`DTYPE_DEFAULTS`). ``parity.compare`` applies them tensor by tensor.
* :class:`ScaledTolerance`: one absolute bound on a whole run's logits, relative to their scale
  (``rel * max(1, max|logits|)``). ``trt.diagnose`` scores engine behaviours with it.

Named policies (:data:`POLICIES`, :func:`policy`; ``--tolerances NAME`` on the command line):

``""``
    the per-dtype defaults alone: ``magpie-parity compare`` without ``--tolerances``.
``"parity"``
    the float32 reference against NeMo (``magpie-parity check``, the pytest plugin's ``parity_compare``): float32
    tensors at ``1e-5``/``1e-5``, integer tensors exact, other dtypes at their defaults.
``"fixtures"``
    the bundled fixtures reproduced by the reference (tests): ``atol 1e-6``, ``rtol 0``, every tensor.
``"steps"``
    per-step logits of an autoregressive run against another run of the same model (tests): ``atol 1e-5``,
    ``rtol 0``.

and for diagnose, :data:`DIAGNOSE` (by the dump's dtype, ``""`` for every other): :func:`diagnose_tolerance`.

This module imports nothing of the project (torch is not needed either), so every layer can use it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import pathlib
import stat
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

CHECKS = ("elemwise", "max", "mean", "median", "quantile")


class PolicyError(ValueError):
    """A tolerance policy (file, name) that cannot be used. The message names the file or the name."""


@dataclass(frozen=True)
class Tolerance:
    """``atol``/``rtol`` and how they are applied (Polygraphy's ``check_error_stat``).

    ``elemwise`` fails if any element fails; ``max``/``mean``/``median``/``quantile`` fail iff that
    statistic of the absolute error exceeds ``atol`` *and* the same statistic of the relative error
    exceeds ``rtol``. NaN and mismatched Inf always fail, whatever the check.
    """

    atol: float
    rtol: float
    check: str = "elemwise"
    quantile: float = 0.99  # used by check="quantile"

    def __post_init__(self) -> None:
        for k in ("atol", "rtol"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, k, float(v))
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {self.check!r}")
        if not (0.0 < float(self.quantile) <= 1.0):
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile!r}")

    def to_dict(self) -> dict:
        d = {"atol": self.atol, "rtol": self.rtol, "check": self.check}
        if self.check == "quantile":
            d["quantile"] = self.quantile
        return d


# float32 reference against NeMo's float32 run (same op order, different kernels and reduction orders).
PARITY_FLOAT32 = Tolerance(1e-5, 1e-5)

# Defaults when a policy has nothing for a tensor, chosen by the less precise of the two dtypes.
DTYPE_DEFAULTS: dict[str, Tolerance] = {
    # eps 1.2e-7; layer outputs carry O(100) roundings from reductions and differently ordered kernels.
    "float32": PARITY_FLOAT32,
    # eps 2.2e-16, but a float64 run is usually compared with float32 references: stay at ~100 f32 ulps.
    "float64": Tolerance(1e-5, 1e-5),
    # eps 9.8e-4; about ten accumulated half-precision roundings per layer output.
    "float16": Tolerance(1e-2, 1e-2),
    # eps 7.8e-3 (8-bit mantissa); about six roundings, i.e. a couple of bf16 ulps of slack.
    "bfloat16": Tolerance(5e-2, 5e-2),
    # eps 0.125 / 0.25: one fp8 rounding of the reference value.
    "float8_e4m3fn": Tolerance(1.25e-1, 1.25e-1),
    "float8_e5m2": Tolerance(2.5e-1, 2.5e-1),
}
_PRECISION_ORDER = ["float8_e5m2", "float8_e4m3fn", "bfloat16", "float16", "float32", "float64"]
EXACT = Tolerance(0.0, 0.0)  # integers and bools must match exactly


def loosest_precision(*names: str | None) -> str | None:
    """The least precise of the floating dtype names given (None when none is one)."""
    floats = [d for d in names if d in DTYPE_DEFAULTS]
    return min(floats, key=_PRECISION_ORDER.index) if floats else None


def dtype_default(dtype_a: str | None, dtype_b: str | None, precision: str | None = None) -> Tolerance:
    """The default tolerance for a pair of stored dtype names and the precision the runs computed in.

    ``precision``: the less precise of the two dumps' manifest ``dtype`` (the precision each run computed in): a
    float32-stored tensor of a bfloat16 run carries bfloat16 error, so a floating tensor gets the loosest of its
    stored dtypes and ``precision``. Integer/bool dtypes are exact; no dtype at all (``None, None``) gets the
    default of ``precision`` (float32 without one)."""
    floats = [d for d in (dtype_a, dtype_b) if d in DTYPE_DEFAULTS]
    if not floats and (dtype_a or dtype_b):
        return EXACT
    loosest = loosest_precision(*floats, precision) or "float32"
    return DTYPE_DEFAULTS[loosest]


@dataclass
class TolerancePolicy:
    """Per-tensor tolerances.

    ``per_name`` maps exact names or :mod:`fnmatch` globs (``*`` also matches dots) to tolerances.
    Lookup order: exact name, then the first matching glob in insertion (file) order, then the key
    ``""`` or ``default``, then :data:`DTYPE_DEFAULTS` for the tensor's dtypes and the runs' precision.
    """

    per_name: dict[str, Tolerance] = field(default_factory=dict)
    default: Tolerance | None = None

    def lookup(self, name: str, dtype_a: str | None = None, dtype_b: str | None = None, *,
               step: int | None = None, precision: str | None = None) -> Tolerance:
        """The tolerance of tensor ``name`` (``step``: its decode step, for per-step policies; ignored here) stored
        as ``dtype_a``/``dtype_b`` by runs whose less precise computed in ``precision`` (see :func:`dtype_default`)."""
        if name in self.per_name and name != "":
            return self.per_name[name]
        for pattern, tol in self.per_name.items():
            if pattern and fnmatch.fnmatchcase(name, pattern):
                return tol
        if "" in self.per_name:
            return self.per_name[""]
        if self.default is not None:
            return self.default
        return dtype_default(dtype_a, dtype_b, precision)

    __call__ = lookup

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict() if self.default else None,
            "per_name": {k: v.to_dict() for k, v in self.per_name.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "tolerance policy") -> "TolerancePolicy":
        """A policy from parsed JSON: ``{"default": TOL or null, "per_name": {pattern: TOL}}`` where TOL is
        ``{"atol": number, "rtol": number, "check": one of CHECKS, "quantile": number in (0, 1]}`` (check and
        quantile optional). Anything else (a string, bool, list, NaN, Infinity or negative number where a number
        belongs, an unknown key, a non-object) is one :class:`PolicyError` naming ``where`` and the key."""
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: top level must be a JSON object, got {_kind(data)}")
        unknown = [k for k in data if k not in ("default", "per_name")]
        if unknown:
            raise PolicyError(f"{where}: unknown key {_short(unknown[0])} (expected 'default', 'per_name')")
        default = _tolerance(data["default"], "default", where) if data.get("default") is not None else None
        per = data.get("per_name", {})
        if per is None:
            per = {}
        if not isinstance(per, dict):
            raise PolicyError(f"{where}: per_name must be an object of pattern -> tolerance, got {_kind(per)}")
        return cls({str(k): _tolerance(v, f"per_name[{_short(k)}]", where) for k, v in per.items()}, default)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TolerancePolicy":
        """A JSON policy file: a regular file (a FIFO or device is refused without blocking) of at most
        :data:`MAX_POLICY_BYTES`, UTF-8 JSON, then :meth:`from_dict`."""
        p = pathlib.Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            why = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
            raise PolicyError(f"{p}: cannot read tolerance file: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PolicyError(f"{p}: tolerance file is not a regular file")
            if st.st_size > MAX_POLICY_BYTES:
                raise PolicyError(f"{p}: tolerance file of {st.st_size} bytes is larger than {MAX_POLICY_BYTES}")
            with os.fdopen(os.dup(fd), "rb") as fh:
                raw = fh.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyError(f"{p}: cannot read tolerance file: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(f"{p}: tolerance file is larger than {MAX_POLICY_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolicyError(f"{p}: tolerance file is not UTF-8 text") from None
        except RecursionError:
            raise PolicyError(f"{p}: tolerance file is not valid JSON: nested too deeply") from None
        except ValueError as exc:
            raise PolicyError(f"{p}: tolerance file is not valid JSON: {exc}") from None
        if isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT:
            return CalibratedPolicy.from_calibration(data, where=str(p))
        return cls.from_dict(data, where=str(p))


MAX_POLICY_BYTES = 16 * 2**20
_TOLERANCE_KEYS = ("atol", "rtol", "check", "quantile")


def _short(x: Any, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def _kind(x: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


def _number(obj: dict, key: str, what: str, where: str, default: float | None = None) -> float:
    if key not in obj:
        if default is not None:
            return default
        raise PolicyError(f"{where}: {what}.{key}: missing (a tolerance needs atol and rtol)")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"{where}: {what}.{key}: must be a number, got {_kind(v)} {_short(v)}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise PolicyError(f"{where}: {what}.{key}: must be finite, got {_short(v)}")
    if key == "quantile":
        if not 0.0 < f <= 1.0:
            raise PolicyError(f"{where}: {what}.quantile: must lie in (0, 1], got {_short(v)}")
    elif f < 0:
        raise PolicyError(f"{where}: {what}.{key}: must be >= 0, got {_short(v)}")
    return f


def _tolerance(obj: Any, what: str, where: str) -> Tolerance:
    if not isinstance(obj, dict):
        raise PolicyError(f"{where}: {what}: must be an object with atol and rtol, got {_kind(obj)}")
    extra = [k for k in obj if k not in _TOLERANCE_KEYS]
    if extra:
        raise PolicyError(f"{where}: {what}: unknown key {_short(extra[0])} (expected atol, rtol, check, quantile)")
    check = obj.get("check", "elemwise")
    if not isinstance(check, str) or check not in CHECKS:
        raise PolicyError(f"{where}: {what}.check: must be one of {list(CHECKS)}, got {_short(check)}")
    atol, rtol = _number(obj, "atol", what, where), _number(obj, "rtol", what, where)
    return Tolerance(atol, rtol, check, _number(obj, "quantile", what, where, default=0.99))


# ------------------------------------------------------------------------------------- calibrated policies

CALIBRATION_FORMAT = "magpie-parity-calibration"  # the first key of a file `magpie-parity calibrate` writes
CALIBRATION_VERSION = 1


def step_key(step: int | None) -> str:
    """A decode step as a calibration file's key ("-" for a tensor without steps)."""
    return "-" if step is None else str(step)


@dataclass
class CalibratedPolicy(TolerancePolicy):
    """Tolerances measured by ``magpie-parity calibrate`` (:mod:`parity.calibrate`): per name (and, where the file
    gives one, per (name, step)) the error envelope of a reduced-precision reference run against its float32 run,
    times the file's safety factor.

    A floating tensor gets ``atol`` = its envelope (``rtol`` 0): within it the difference is that precision's
    noise, beyond it is not. An exact tensor (attended positions, codes) may differ in at most the calibrated
    number of elements (:meth:`envelope`). A name the calibration never saw gets the per-dtype defaults of the runs'
    precision (no envelope: it is judged, but not called noise)."""

    precision: str = "bfloat16"
    reference_precision: str = "float32"
    safety_factor: float = 1.0
    config_hash: str | None = None
    where: str = "calibration"
    steps: dict = field(default_factory=dict)  # (name, step_key) -> float atol | int allowed mismatches
    names: dict = field(default_factory=dict)  # name -> float atol | int allowed mismatches

    def envelope(self, name: str, step: int | None = None, *, exact: bool = False) -> float | None:
        """The calibrated bound of (name, step): max |a - b| for a floating tensor, differing elements for an
        exact one; None where the calibration has nothing of that kind."""
        for v in (self.steps.get((name, step_key(step))), self.names.get(name)):
            if v is not None and isinstance(v, int) == exact:
                return v
        return None

    def largest_envelope(self, name: str, steps: Sequence[int] = ()) -> float | None:
        """The largest floating envelope of ``name`` over ``steps`` and the name's own: the one bound a check that
        takes a single tolerance for a whole run (diagnose's logits) can use; None if the calibration has none."""
        found = [v for v in [self.envelope(name, k) for k in steps] + [self.envelope(name)] if v is not None]
        return max(found) if found else None

    def lookup(self, name: str, dtype_a: str | None = None, dtype_b: str | None = None, *,
               step: int | None = None, precision: str | None = None) -> Tolerance:
        env = self.envelope(name, step)
        if env is not None:
            return Tolerance(env, 0.0)
        return dtype_default(dtype_a, dtype_b, precision)

    __call__ = lookup

    def check_dumps(self, a: Any, b: Any) -> None:
        """Refuse dumps this calibration does not describe: the less precise run's precision (its manifest
        ``dtype``) must be the calibrated one and the other the float32 reference's, and a recorded config hash
        the calibrated model's."""
        pa, pb = a.dtype, b.dtype
        low = loosest_precision(pa, pb) or pa
        high = pb if low == pa else pa
        if (low, high) != (self.precision, self.reference_precision):
            raise PolicyError(
                f"{self.where}: calibrated for {self.precision} against {self.reference_precision}, but the dumps "
                f"computed in {pa} (a) and {pb} (b): calibrate {low} (magpie-parity calibrate --dtype {low}) or "
                "compare without it")
        for r in (a, b):
            self.check_model(r.config_hash, f"{r.path} records")

    def check_model(self, config_hash: str | None, who: str) -> None:
        """Refuse another model's calibration: ``who`` (e.g. "DUMP records") has ``config_hash`` (None: unknown)."""
        if self.config_hash is not None and config_hash is not None and config_hash != self.config_hash:
            raise PolicyError(f"{self.where}: calibrated on the model of config hash {self.config_hash!r}, {who} "
                              f"{config_hash!r}: another model's calibration")

    @classmethod
    def from_calibration(cls, data: dict, *, where: str = "calibration") -> "CalibratedPolicy":
        """The policy of a parsed calibration file; anything malformed is one :class:`PolicyError` naming it."""
        def bad(msg: str) -> PolicyError:
            return PolicyError(f"{where}: calibration file {msg}")

        if data.get("version") != CALIBRATION_VERSION:
            raise bad(f"version {_short(data.get('version'))} (this magpie-parity reads {CALIBRATION_VERSION})")
        prec, ref = data.get("precision"), data.get("reference_precision", "float32")
        for k, v in (("precision", prec), ("reference_precision", ref)):
            if v not in DTYPE_DEFAULTS:
                raise bad(f"{k}: {_short(v)} is not a floating dtype name")
        factor = _number(data, "safety_factor", "top level", where)
        h = data.get("config_hash")
        if h is not None and not isinstance(h, str):
            raise bad(f"config_hash must be a string or null, got {_kind(h)}")

        def bound(e: Any, what: str, required: bool = True) -> float | int | None:
            if not isinstance(e, dict):
                raise bad(f"{what}: must be an object, got {_kind(e)}")
            if "atol" in e:
                return _number(e, "atol", what, where)
            if "mismatches" in e:
                m = e["mismatches"]
                if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                    raise bad(f"{what}.mismatches: must be an integer >= 0, got {_short(m)}")
                return m
            if required:
                raise bad(f"{what}: needs atol (a floating tensor) or mismatches (an exact one)")
            return None

        steps, names = {}, {}
        per_step, per_name = data.get("per_step", {}), data.get("per_name", {})
        for k, v in (("per_step", per_step), ("per_name", per_name)):
            if not isinstance(v, dict):
                raise bad(f"{k} must be an object, got {_kind(v)}")
        for name, by_step in per_step.items():
            if not isinstance(by_step, dict):
                raise bad(f"per_step[{_short(name)}]: must be an object of step -> envelope")
            for s, e in by_step.items():  # observed figures; a bound here overrides the name's
                v = bound(e, f"per_step[{_short(name)}][{_short(s)}]", required=False)
                if v is not None:
                    steps[(name, s)] = v
        for name, e in per_name.items():
            names[name] = bound(e, f"per_name[{_short(name)}]")
        return cls(precision=prec, reference_precision=ref, safety_factor=factor, config_hash=h, where=where,
                   steps=steps, names=names)


# ------------------------------------------------------------------------------------------ named policies

POLICIES: Mapping[str, TolerancePolicy] = {
    "": TolerancePolicy(),
    # DTYPE_DEFAULTS["float32"] is PARITY_FLOAT32: the per-dtype defaults are the parity figures.
    "parity": TolerancePolicy(),
    "fixtures": TolerancePolicy(default=Tolerance(1e-6, 0.0)),
    "steps": TolerancePolicy(default=Tolerance(1e-5, 0.0)),
}


def policy(name: str = "") -> TolerancePolicy:
    """The named policy (a fresh copy: callers may add per-name entries). Unknown names raise PolicyError."""
    if name not in POLICIES:
        raise PolicyError(f"unknown tolerance policy {name!r}; known: {sorted(POLICIES)}")
    p = POLICIES[name]
    return TolerancePolicy(dict(p.per_name), p.default)


def load_policy(spec: str | os.PathLike | None, default: str = "") -> TolerancePolicy:
    """``--tolerances`` / ``--parity-tolerances``: a JSON policy file, or the name of a policy in :data:`POLICIES`
    (a file of that name wins); ``None`` gives the policy named ``default``."""
    if spec is None:
        return policy(default)
    p = pathlib.Path(spec)
    if p.is_file():
        return TolerancePolicy.from_file(p)
    if isinstance(spec, str) and spec in POLICIES:
        return policy(spec)
    if not p.exists():
        raise PolicyError(f"{spec}: no such tolerance file (or policy name; known: {sorted(POLICIES)})")
    return TolerancePolicy.from_file(p)  # not a file: its error names it


# ------------------------------------------------------------------------------------------- diagnose


@dataclass(frozen=True)
class ScaledTolerance:
    """An absolute bound on logits relative to their scale: ``rel * max(1, scale)``, ``scale`` = max |logit|."""

    rel: float

    def atol(self, scale: float) -> float:
        return self.rel * max(1.0, scale)


DIAGNOSE: Mapping[str, ScaledTolerance] = {
    # float32 engines: rounding of the logits over a dozen layers stays near 1e-6 of their scale, so 1e-5 of it
    # separates rounding from behaviour (the KV cache's prior effect is ~1e-4).
    "float32": ScaledTolerance(1e-5),
    # reduced-precision engines (every other dtype) need ~2e-2 of the scale.
    "": ScaledTolerance(2e-2),
}


def diagnose_tolerance(dtype: str | None, scale: float) -> float:
    """Max |dlogit| that ``trt.diagnose`` accepts for an engine dump of this dtype whose logits reach ``scale``."""
    return DIAGNOSE.get(dtype, DIAGNOSE[""]).atol(scale)
