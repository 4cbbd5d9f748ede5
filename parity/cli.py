"""``magpie-parity``: the command table (console script ``parity.cli:main``; ``python -m parity.cli`` is the same).

Each command is a ``configure(parser)`` / ``run(args) -> exit status`` pair from a command module
(``parity.commands``, ``trt.commands``). The modules import what they share from ``parity.cli_support`` and
nothing from here, so the arrows point one way: cli -> commands -> cli_support.

Exit statuses: 0 success (``compare``/``check``: all within tolerance), 1 a mismatch (or a failing
``trtllm-build``), 2 a user error (missing/corrupt/truncated file, inputs that do not fit, incompatible manifests,
bad tolerance file, bad arguments): one line on stderr naming the file, flag or field, 3 an internal error (a bug:
traceback on stderr).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence

from parity import commands as parity_commands
from parity.cli_support import EXIT_BAD_INPUT, EXIT_INTERNAL, BadInput
from trt import commands as trt_commands

PROG = "magpie-parity"


@dataclass(frozen=True)
class Command:
    name: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: tuple[Command, ...] = (
    Command("check", parity_commands.configure_check, parity_commands.run_check,
            "the main job: reference vs NeMo's dumps on the bundled fixture models, layer by layer"),
    Command("compare", parity_commands.configure_compare, parity_commands.run_compare,
            "compare two dumps tensor by tensor"),
    Command("inspect", parity_commands.configure_inspect, parity_commands.run_inspect,
            "print a dump's manifest as a table: source, mode, config hash, precision, layout, tensors per name"),
    Command("dump", parity_commands.configure_dump, parity_commands.run_dump,
            "capture a reference or live-NeMo run into a dump"),
    Command("infer", parity_commands.configure_infer, parity_commands.run_infer,
            "autoregressive inference with the reference"),
    Command("calibrate", parity_commands.configure_calibrate, parity_commands.run_calibrate,
            "measure a reduced precision's own noise per capture point and step (a --tolerances file for compare)"),
    Command("batch", parity_commands.configure_batch, parity_commands.run_batch,
            "text -> the chunk file NeMo's do_tts would run (NeMo's tokenizer and chunker)"),
    Command("diagnose", parity_commands.configure_diagnose, parity_commands.run_diagnose,
            "which known TensorRT-LLM behaviours explain an engine dump, and where the rest starts"),
    Command("convert", trt_commands.configure_convert, trt_commands.run_convert,
            "convert a NeMo MagpieTTS checkpoint to a TensorRT-LLM (t5tts fork) checkpoint"),
    Command("build", trt_commands.configure_build, trt_commands.run_build,
            "print (or --run) the trtllm-build commands for a converted checkpoint"),
    Command("ingest-trtllm", trt_commands.configure_ingest, trt_commands.run_ingest,
            "turn a TensorRT-LLM tllm_debug tree into a canonical dump"),
    Command("emulate", trt_commands.configure_emulate, trt_commands.run_emulate,
            "an engine-like run: the reference under emulated engine behaviours (dump, codes, debug tree)"),
    Command("closed-loop", trt_commands.configure_closed_loop, trt_commands.run_closed_loop,
            "engine codes vs reference codes of free-running runs: first divergence per item, over seeds; "
            "then the teacher-forced replay"),
    Command("bench-data", trt_commands.configure_bench, trt_commands.run_bench,
            "write a benchmark dataset JSON in the fork's prepare_benchmark.py format"),
)


class Terminated(BaseException):
    """SIGTERM (a CI timeout, ``kill``) raised in the main thread, so every writer's cleanup runs (temp files and
    folders removed, nothing half-published) before the command exits 143."""


def _terminate(signum, frame) -> NoReturn:
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line too (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Layer-by-layer numerical parity between NeMo MagpieTTS, the PyTorch reference and TensorRT-LLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        c.configure(p)
        p.set_defaults(_command=c)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); return instead of exiting
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_BAD_INPUT
    c: Command = args._command
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(c.run(args))
    except BadInput as exc:
        one_line = " ".join(str(exc).split())  # CI greps a single line
        print(f"{PROG} {c.name}: error: {one_line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Terminated:
        print(f"{PROG} {c.name}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception:
        traceback.print_exc()
        print(f"{PROG} {c.name}: internal error (exit {EXIT_INTERNAL})", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
