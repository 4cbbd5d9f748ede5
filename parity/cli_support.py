"""What the ``magpie-parity`` commands share: the user-error type and exit statuses, the one ``KEY=VALUE`` parser,
the output checks (run before any work), and loading a batch or a checkpoint.

It imports nothing of the CLI: ``parity.cli`` (the command table) imports the command modules
(``parity.commands``, ``trt.commands``), and they import this. Heavy imports (torch, the reference) happen inside
the functions.

Every user error is a :class:`BadInput`: ``parity.cli.main`` prints it as one line naming the file, flag or field,
and exits 2.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

EXIT_OK, EXIT_MISMATCH, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class BadInput(Exception):
    """A user error (missing/corrupt file, bad flag value, inputs that do not fit): one line, exit status 2."""


# ------------------------------------------------------------------------------------------------- KEY=VALUE


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value: ``none``/``null`` (any case) -> None; JSON where it parses (numbers, ``true``/``false``,
    lists such as ``[1,2]``); otherwise the text itself."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``[--param] topk=1 [--param] apply_prior_to_layers=[1,2]`` -> ``{"topk": 1, "apply_prior_to_layers": [1, 2]}``.
    Later items win. ``flag`` names the option in the error."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


# ------------------------------------------------------------------------------------------------- outputs


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_folder(folder: Path, flag: str, path: Path) -> None:
    if not folder.is_dir():
        raise BadInput(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: the folder {folder} is not writable")


# What an existing output file may be for a command to replace it: (what it is, in words; a recogniser).
Replaceable = tuple[str, Callable[[Path], bool]]


def output_file(path: str | os.PathLike, flag: str, replaces: Replaceable | None = None) -> Path:
    """Check, before any work, that the file ``path`` can be written: its folder exists and is writable, and the
    path is not a folder. An existing file is replaced only if ``replaces`` recognises it as this tool's own kind of
    file (a report, a plot, a codes file it wrote); anything else there (a user's file, a link, a FIFO) is refused,
    naming ``flag``."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        raise BadInput(f"{flag} {p}: is a folder; expected a file path")
    parent = p.parent
    if not parent.exists():
        found = _first_existing(parent)
        if found.exists() and not found.is_dir():
            raise BadInput(f"{flag} {p}: {found} is a file, not a folder")
        raise BadInput(f"{flag} {p}: the folder {parent} does not exist")
    _writable_folder(parent, flag, p)
    if os.path.lexists(p):
        check_replaceable_file(p, flag, replaces)
    return p


def check_replaceable_file(path: str | os.PathLike, flag: str, replaces: Replaceable | None) -> None:
    """An existing ``path`` is replaced only if it is a regular file (not a link) that ``replaces`` recognises."""
    p = Path(path)
    what = replaces[0] if replaces else "a file this command wrote"
    if p.is_symlink():
        raise BadInput(f"{flag} {p}: is a symbolic link; refusing to replace it (choose another path)")
    if not p.is_file():
        raise BadInput(f"{flag} {p}: exists and is not a regular file; refusing to replace it (choose another path)")
    if replaces is None or not replaces[1](p):
        raise BadInput(f"{flag} {p}: exists and is not {what}; refusing to replace it (remove it or choose "
                       "another path)")


def output_dir(path: str | os.PathLike, flag: str, overwrite: bool | None = False,
               overwrite_flag: str | None = "--overwrite", replaces: Replaceable | None = None) -> Path:
    """Check, before any work, that the folder ``path`` can be created (missing parents are created by the writer):
    it does not exist (unless ``overwrite``; ``None`` = an existing folder is written into), and its first
    existing ancestor is a writable folder. ``overwrite_flag``: the command's flag that replaces it (None: none).
    ``replaces``: with ``overwrite``, what an existing folder must be to be replaced (a dump, a converted
    checkpoint, an empty folder): anything else is refused now, before the work, not when the writer publishes."""
    p = Path(path)
    if os.path.lexists(p) and not p.exists():
        raise BadInput(f"{flag} {p}: is a dangling symbolic link; refusing to write through it (choose another path)")
    if p.exists():
        if not p.is_dir():
            raise BadInput(f"{flag} {p}: is a file, not a folder")
        if overwrite is False:
            how = f"pass {overwrite_flag} to replace it" if overwrite_flag else "name a new folder"
            raise BadInput(f"{flag} {p}: already exists ({how})")
        if overwrite and (p.is_symlink() or (replaces is not None and not replaces[1](p))):
            what = "a symbolic link" if p.is_symlink() else f"not {replaces[0]}"
            raise BadInput(f"{flag} {p}: exists and is {what}; {overwrite_flag} only replaces what magpie-parity "
                           "wrote (choose another folder)")
        _writable_folder(p if overwrite is None else p.parent, flag, p)
        return p
    _writable_folder(_first_existing(p.parent), flag, p)
    return p


PathArg = Union[str, os.PathLike, None]


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _inside(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or lies below it (both resolved)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def separate(inputs: Mapping[str, PathArg], outputs: Mapping[str, PathArg]) -> None:
    """Before any work: no output (``{flag: path}``, links followed) is, lies inside or contains an input, and no two
    outputs overlap; else one line naming both flags and paths. ``None`` and ``-`` (stdout) are skipped. An output
    equal to an input would overwrite it; an input inside an output folder would be deleted when ``--overwrite``
    replaces that folder; an output inside an input folder would change that input (a dump, a debug tree)."""
    ins = [(f, os.fspath(p), _real(p)) for f, p in inputs.items() if p is not None and os.fspath(p) != "-"]
    outs = [(f, os.fspath(p), _real(p)) for f, p in outputs.items() if p is not None and os.fspath(p) != "-"]
    for oflag, o, ro in outs:
        for iflag, i, ri in ins:
            if ro == ri or _same_file(ro, ri):
                raise BadInput(f"{oflag} {o}: is the input {iflag} {i}; an output must never overwrite an input "
                               "(choose another path)")
            if _inside(ro, ri):
                raise BadInput(f"{oflag} {o}: lies inside the input {iflag} {i}; an output must not be written "
                               "into an input (choose a path outside it)")
            if _inside(ri, ro):
                raise BadInput(f"{oflag} {o}: contains the input {iflag} {i}; replacing it would delete that "
                               "input (choose another path)")
    for k, (f1, p1, r1) in enumerate(outs):
        for f2, p2, r2 in outs[k + 1:]:
            if _inside(r1, r2) or _inside(r2, r1):
                raise BadInput(f"{f1} {p1} and {f2} {p2}: the same or nested paths; give each output its own path")


@contextmanager
def writing(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """Write errors (full disk, permissions, a path that turned into a file) as one line naming the user's path."""
    try:
        yield
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise BadInput(f"{flag} {path}: cannot write: {why}") from None


def write_output_file(path: str | os.PathLike, flag: str, data: bytes, replaces: Replaceable | None) -> Path:
    """Write ``data`` to ``path`` atomically (umask-honouring), checking again just before that an existing file
    is still one ``replaces`` recognises; write errors name the user's path, no temporary file is left behind."""
    from parity.files import atomic_write_bytes

    if os.path.lexists(path):
        check_replaceable_file(path, flag, replaces)
    with writing(path, flag):
        return atomic_write_bytes(path, data)


def empty_folder(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and not any(p.iterdir())
    except OSError:
        return False


def _is_dump_or_empty(p: Path) -> bool:
    from parity.dump import is_dump

    return is_dump(p) or empty_folder(p)


# What --overwrite may replace of a dump's folder: what the writer itself accepts (parity.dump.check_replaceable),
# checked here before the work rather than when the result is published.
DUMP_FOLDER: Replaceable = ("a magpie-parity dump or an empty folder", _is_dump_or_empty)


# ------------------------------------------------------------------------------------------------- inputs


def load_batch(path: str | os.PathLike, flag: str = "--batch") -> dict:
    """A safetensors batch (NeMo's batch keys) as a dict of tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{flag} {p}: no such batch file" if not p.exists() else f"{flag} {p}: not a file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{flag} {p}: not a readable safetensors batch ({e})") from None


def integer_tensor(t) -> bool:
    """Whether a tensor read from a user's file holds integers (codes, lengths, indices): not float, complex or bool."""
    import torch

    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class RunCodes(NamedTuple):
    codes: Any  # (B, C, T) long
    lens: Any  # (B,) long, or None
    # the run's max_decoder_steps where the file records it (a codes file's metadata, a dump's layout params): NeMo
    # gives an item without EOS exactly this length, so "EOS never fired" can be told (None: not recorded)
    max_decoder_steps: int | None


def read_codes(path: str | os.PathLike, flag: str) -> RunCodes:
    """The one reader of a run's codes: :class:`RunCodes` of a dump holding a whole run's ``predicted_codes`` (an
    infer dump; an ingested engine dump holds none) or of a codes file (``infer --out``, ``emulate --codes-out``);
    anything else is one line naming ``flag`` and the file."""
    import torch

    from parity.dump import DumpError, is_dump, open_dump

    p = Path(path)
    if p.is_dir():
        if not is_dump(p):
            raise BadInput(f"{flag} {p}: a folder that is not a dump (a manifest.json and its shards)")
        try:
            reader = open_dump(p)
            if ("predicted_codes", None) not in reader:
                raise BadInput(f"{flag} {p}: the dump holds no predicted_codes of a whole run (an infer dump does; a "
                               "generate-speech dump has them per chunk, an ingested engine dump none: give the "
                               "engine's codes file)")
            codes = reader.load("predicted_codes")
            lens = reader.load("predicted_codes_lens") if ("predicted_codes_lens", None) in reader else None
            params = reader.layout.get("params")
            steps = params.get("max_decoder_steps") if isinstance(params, dict) else None
        except DumpError as e:
            raise BadInput(f"{flag} {e}") from None
    else:
        data = load_batch(p, flag)
        codes, lens = data.get("predicted_codes"), data.get("predicted_codes_lens")
        if codes is None:
            raise BadInput(f"{flag} {p}: no 'predicted_codes' tensor (a codes file infer wrote, or a dump)")
        from parity.files import read_safetensors_header

        meta = (read_safetensors_header(p, 65536) or {}).get("__metadata__")
        steps = meta.get("max_decoder_steps") if isinstance(meta, dict) else None
        steps = int(steps) if isinstance(steps, str) and steps.isdigit() else None

    if not integer_tensor(codes) or codes.dim() != 3:
        raise BadInput(f"{flag} {p}: predicted_codes must be integer (B, C, T), got {tuple(codes.shape)} {codes.dtype}")
    if lens is not None and (not integer_tensor(lens) or tuple(lens.shape) != tuple(codes.shape[:1])):
        raise BadInput(f"{flag} {p}: predicted_codes_lens must be integer ({codes.shape[0]},), got "
                       f"{tuple(lens.shape)} {lens.dtype}")
    steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
    return RunCodes(codes.to(torch.long), None if lens is None else lens.to(torch.long), steps)


def infer_inputs(batch: dict) -> dict:
    """The keys autoregressive inference takes (text, context codes, a baked checkpoint's ``speaker_indices``),
    without the teacher-forcing targets."""
    return {k: v for k, v in batch.items() if k.startswith(("text", "context")) or k == "speaker_indices"}


def load_reference(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
    """The reference model of a .nemo/.ckpt (CheckpointError / ConfigError -> one line naming the file)."""
    import torch

    from reference import CheckpointError, ConfigError, MagpieTTS

    try:
        model = MagpieTTS.from_nemo(path)
    except (CheckpointError, ConfigError) as e:
        raise BadInput(str(e)) from None
    return model.to(device=device, dtype=getattr(torch, dtype))


def check_batch_fits(batch: dict, config, batch_path, checkpoint_path, *, require_audio: bool) -> None:
    """Before any work: the batch's shapes, lengths and token ids fit the checkpoint's config (the reference's one
    batch validation)."""
    from reference.batch import BatchError, validate_batch

    try:
        validate_batch(batch, config, require_audio=require_audio)
    except BatchError as e:
        raise BadInput(f"{batch_path}: does not fit {checkpoint_path}: {e}") from None


def check_device(spec: str, flag: str = "--device") -> str:
    """``--device``: a device torch knows and this machine has (``cuda`` without CUDA is a user error)."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise BadInput(f"{flag} {spec}: not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BadInput(f"{flag} {spec}: CUDA is not available here ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:
            raise BadInput(f"{flag} {spec}: not usable here ({str(e).splitlines()[0]})") from None
    return spec


@contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """The library errors that are the user's (bad checkpoint, config, batch, inference parameters, dump, tolerance
    file; plus ``extra``) as :class:`BadInput` with their message, which names the file or field."""
    try:
        yield
    except BadInput:
        raise
    except Exception as exc:
        if isinstance(exc, _user_error_types() + tuple(extra)):
            raise BadInput(str(exc).replace("overwrite=True", "--overwrite")) from None
        raise


def _user_error_types() -> tuple[type[BaseException], ...]:
    from parity.dump import DumpError
    from parity.tolerances import PolicyError
    from reference import BatchError, CheckpointError, ConfigError
    from reference.inference import InferenceError

    return (CheckpointError, ConfigError, BatchError, InferenceError, DumpError, PolicyError)
