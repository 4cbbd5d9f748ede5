"""``magpie-parity`` console script (entry point ``parity.cli:main``).

Subcommands are registered, not hard-wired, so other modules can add theirs without editing this file:

* call :func:`add_subcommand` (``configure`` and ``run`` may be callables or lazy ``"module:attr"``
  strings, so nothing heavy is imported until that subcommand runs), or
* expose an entry point in the group ``magpie_parity.subcommands`` whose object is a callable
  ``register(add_subcommand)``; it is loaded when the parser is built.

``run(args)`` returns the exit status. Exit statuses of ``compare``: 0 all within tolerance,
1 a mismatch, 2 bad input (missing/corrupt/truncated file, incompatible manifests, bad tolerance
file, bad arguments), 3 internal error (a bug: traceback on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
ENTRY_POINT_GROUP = "magpie_parity.subcommands"

Configure = Union[Callable[[argparse.ArgumentParser], None], str]
Run = Union[Callable[[argparse.Namespace], int], str]


@dataclass(frozen=True)
class Subcommand:
    name: str
    configure: Configure
    run: Run
    help: str = ""


SUBCOMMANDS: list[Subcommand] = []


def add_subcommand(name: str, configure: Configure, run: Run, *, help: str = "") -> None:
    """Register (or replace) a subcommand. See the module docstring."""
    SUBCOMMANDS[:] = [s for s in SUBCOMMANDS if s.name != name]
    SUBCOMMANDS.append(Subcommand(name, configure, run, help))


def _resolve(obj: Any) -> Any:
    if isinstance(obj, str):
        mod, _, attr = obj.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return obj


class BadInput(Exception):
    """Raised by subcommands for user errors that map to exit status 2."""


# ----------------------------------------------------------------------------------------- compare


def _configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="dump under test (directory with manifest.json)")
    p.add_argument("b", help="expected/reference dump")
    p.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    p.add_argument("--plot", metavar="OUT.png", help="write a max-abs-error-per-layer plot")
    p.add_argument("--tolerances", metavar="FILE", help='JSON: {"default": {"atol":..,"rtol":..}, "per_name": {glob: {...}}}')
    p.add_argument("--names", nargs="+", metavar="GLOB", help="only compare tensors whose name matches a glob")
    p.add_argument("--intersect", action="store_true",
                   help="compare only tensors both dumps hold (an engine dump is a subset of a reference dump); "
                        "the others are listed but do not fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, help="comparison threads (default: min(2, cpus))")
    p.add_argument("--max-rows", type=int, default=60, help="per-tensor rows in the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")


def _run_compare(args: argparse.Namespace) -> int:
    import json

    from parity.compare import PolicyError, TolerancePolicy, compare_dumps
    from parity.dump import DumpError
    from parity.report import atomic_write_bytes, format_table, plot, to_json

    try:
        policy = TolerancePolicy.from_file(args.tolerances) if args.tolerances else None
        result = compare_dumps(
            args.a,
            args.b,
            policy=policy,
            names=args.names,
            progress=False if args.no_progress else None,
            workers=args.workers,
            intersect=args.intersect,
        )
    except (DumpError, PolicyError) as exc:
        raise BadInput(str(exc)) from None
    report = to_json(result)
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    if not args.quiet and args.json != "-":
        print(format_table(result, max_rows=args.max_rows))
    try:
        if args.json == "-":
            sys.stdout.write(text)
        elif args.json:
            atomic_write_bytes(args.json, text.encode())
        if args.plot:
            plot(result, args.plot)
    except OSError as exc:
        raise BadInput(f"{exc.filename or args.json or args.plot}: cannot write: {exc.strerror or exc}") from None
    return EXIT_OK if result.passed else EXIT_MISMATCH


add_subcommand("compare", _configure_compare, _run_compare, help="compare two dumps tensor by tensor")


def _register_builtin() -> None:
    """Sub-commands that live in other modules (model runs, TensorRT-LLM tools); their imports stay lazy."""
    from parity.commands import register

    register(add_subcommand)
    try:
        from trt.commands import register as register_trt
    except ImportError:  # trt/ is optional for the parity core
        return
    register_trt(add_subcommand)


_register_builtin()


# ---------------------------------------------------------------------------------------- plumbing


def _load_entry_points() -> None:
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # no metadata (running from a checkout): nothing to load
        return
    for ep in eps:
        ep.load()(add_subcommand)


def build_parser() -> argparse.ArgumentParser:
    _load_entry_points()
    parser = argparse.ArgumentParser(
        prog="magpie-parity",
        description="Layer-by-layer numerical parity between NeMo MagpieTTS, the PyTorch reference and TensorRT-LLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for sc in SUBCOMMANDS:
        p = sub.add_parser(sc.name, help=sc.help, description=sc.help)
        _resolve(sc.configure)(p)
        p.set_defaults(_subcommand=sc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); return instead of exiting
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_BAD_INPUT
    sc: Subcommand = args._subcommand
    try:
        return int(_resolve(sc.run)(args))
    except BadInput as exc:
        one_line = " ".join(str(exc).split())  # CI greps a single line
        print(f"magpie-parity {sc.name}: error: {one_line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        print(f"magpie-parity {sc.name}: internal error (exit {EXIT_INTERNAL})", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
