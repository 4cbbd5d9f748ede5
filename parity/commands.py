"""``magpie-parity`` commands of the parity side: ``check`` (the main job), ``compare``, ``dump``, ``infer``,
``batch`` (text -> the chunk file of NeMo's ``do_tts``) and ``diagnose``. Each is a ``configure_<name>(parser)``
and a ``run_<name>(args) -> exit status`` pair listed in ``parity.cli``'s command table; heavy imports happen
inside ``run_*``. User errors raise :class:`parity.cli_support.BadInput` (one line, exit 2), checked before any
work where they can be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

from parity.cli_support import (
    DUMP_FOLDER,
    EXIT_MISMATCH,
    EXIT_OK,
    BadInput,
    Replaceable,
    check_batch_fits,
    check_device,
    check_replaceable_file,
    infer_inputs,
    integer_tensor,
    load_batch,
    load_reference,
    output_dir,
    output_file,
    parse_assignments,
    read_codes,
    separate,
    user_errors,
    write_output_file,
    writing,
)

REPO = Path(__file__).resolve().parent.parent
# The bundled fixtures live in the checkout; a non-editable install finds them from the working directory.
DEFAULT_FIXTURES = next((p for p in (REPO / "fixtures" / "data", Path.cwd() / "fixtures" / "data") if p.is_dir()),
                        REPO / "fixtures" / "data")

KV_CACHE = {"checkpoint": None, "on": True, "off": False}


def _report_kinds() -> tuple[Replaceable, Replaceable]:
    """What ``--json`` and ``--plot`` replace: a report / a plot this tool wrote (parity.report's markers)."""
    from parity.report import is_report_json, is_report_png

    return (("a magpie-parity compare JSON report", is_report_json),
            ("a plot magpie-parity drew (a PNG whose Software text is magpie-parity's)", is_report_png))


# infer --out: a safetensors file of predicted codes, marked in its metadata
CODES_FORMAT = "magpie-parity-codes"
_CODES_KEYS = {"predicted_codes", "predicted_codes_lens"}


def is_codes_file(path) -> bool:
    """A codes file ``infer`` wrote: a safetensors file whose metadata names :data:`CODES_FORMAT`, or (as earlier
    versions wrote it) one holding exactly ``predicted_codes`` and ``predicted_codes_lens``. Only its header is
    read (at most 64 KB)."""
    from parity.files import read_safetensors_header

    header = read_safetensors_header(path, 65536)
    if header is None:
        return False
    meta = header.get("__metadata__")
    if isinstance(meta, dict) and meta.get("format") == CODES_FORMAT:
        return True
    return set(header) - {"__metadata__"} == _CODES_KEYS


CODES_FILE: Replaceable = ("a codes file magpie-parity infer wrote", is_codes_file)


def check_params(config, params: dict, flag: str = "--param") -> None:
    """Before any work: the inference parameters are NeMo ``inference_parameters`` fields with usable values."""
    from reference.inference import InferenceError, check_parameters, resolve_parameters

    try:
        check_parameters(resolve_parameters(config.inference, **params), config)
    except InferenceError as e:  # names the field
        raise BadInput(f"{flag}: {e}") from None
    except (TypeError, ValueError) as e:  # this call only validates the user's values: one has the wrong type
        given = " ".join(f"{k}={v!r}" for k, v in params.items())
        raise BadInput(f"{flag} {given}: a value of the wrong type ({e})") from None


def _nemo_archive_config(path: str, what: str = "--source nemo"):
    """Before NeMo is imported: a readable .nemo archive (NeMo restores no .ckpt); its config as the reference reads
    it (config and weight shapes, without NeMo), or None for a model the reference does not build (NeMo alone
    decides then)."""
    import tarfile

    from reference.checkpoint import CheckpointError, read_checkpoint
    from reference.config import ConfigError, MagpieConfig

    try:
        raw = read_checkpoint(path)
    except CheckpointError as e:
        raise BadInput(str(e)) from None
    if not tarfile.is_tarfile(path):
        raise BadInput(f"{path}: a Lightning .ckpt; {what} restores .nemo archives only "
                       "(--source reference reads both)")
    try:
        return MagpieConfig.from_nemo(raw.config, raw.state_dict, where=str(path))
    except ConfigError:
        return None


def _nemo_checks(path: str, batch: dict, batch_path: str, *, teacher_forced: bool, params: dict) -> None:
    """--source nemo, before NeMo is imported: a readable .nemo archive, and a batch and parameters that fit it."""
    config = _nemo_archive_config(path)
    if config is None:
        return
    check_batch_fits(batch if teacher_forced else infer_inputs(batch), config, batch_path, path,
                     require_audio=teacher_forced)
    if not teacher_forced:
        check_params(config, params)


def _nemo_restore(restore, path, what: str, **kw):
    """``MagpieTTSModel.restore_from`` with the archive errors NeMo raises (tar, missing member, I/O) as one line."""
    import tarfile

    try:
        return restore(path, map_location="cpu", **kw)
    except (tarfile.TarError, OSError, EOFError) as e:
        detail = f"{Path(e.filename).name} missing" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        raise BadInput(f"{what}: NeMo cannot restore it ({type(e).__name__}: {detail})") from None


def _nemo_model_class(who: str = "--source nemo"):
    """NeMo's ``MagpieTTSModel``, or one line saying NeMo is missing (``who`` needs it)."""
    try:
        from nemo.collections.tts.models import MagpieTTSModel
    except Exception as e:  # ImportError, or NeMo's own import-time failures
        raise BadInput(f"{who} needs NeMo 3.0.0 (pip install '.[nemo]'): {type(e).__name__}: {e}") from None
    return MagpieTTSModel


def _load_nemo(path: str, codec: str | None, who: str = "--source nemo"):
    MagpieTTSModel = _nemo_model_class(who)
    if codec and not Path(codec).is_file():
        raise BadInput(f"--codec {codec}: no such file")
    cfg = _nemo_restore(MagpieTTSModel.restore_from, path, path, return_config=True)
    codec_path = Path(codec) if codec else Path(cfg.codecmodel_path)
    if not codec and not codec_path.is_absolute():  # a recorded relative path is relative to the archive's folder
        codec_path = Path(path).resolve().parent / codec_path
    if not codec_path.exists():
        beside = Path(path).resolve().parent / codec_path.name
        if not beside.exists():
            raise BadInput(f"{path}: its codec {cfg.codecmodel_path} is not found; pass --codec PATH")
        codec_path = beside
    cfg.codecmodel_path = str(codec_path)
    model = _nemo_restore(MagpieTTSModel.restore_from, path, f"{path} (codec {codec_path})", override_config_path=cfg)
    return model.eval()


# ------------------------------------------------------------------------------------ generate_speech (do_tts)

# generate_speech's MaskGit arguments, given as --param maskgit_<name>=VALUE
MASKGIT_ARGS = ("n_steps", "noise_scale", "fixed_schedule", "dynamic_cfg_scale", "sampling_type")
GENERATE_ONLY = (("chunk_set", "--chunk-set"), ("no_local_transformer", "--no-local-transformer"),
                 ("no_steps", "--no-steps"))


def _split_maskgit(params: dict, flag: str = "--param") -> tuple[dict, dict]:
    """``--param`` assignments -> (inference_parameters fields, generate_speech's maskgit_* arguments without the
    prefix)."""
    maskgit = {k[len("maskgit_"):]: v for k, v in params.items() if k.startswith("maskgit_")}
    unknown = sorted(set(maskgit) - set(MASKGIT_ARGS))
    if unknown:
        raise BadInput(f"{flag}: unknown MaskGit argument(s) {['maskgit_' + k for k in unknown]}; known: "
                       f"{', '.join('maskgit_' + k for k in MASKGIT_ARGS)}")
    return {k: v for k, v in params.items() if not k.startswith("maskgit_")}, maskgit


def _read_chunks(path: str, name: str | None, flag: str):
    """The chunk set of a chunk file (``parity.chunks``), or one line naming the flag."""
    from parity.chunks import ChunkFileError, read_chunk_set

    try:
        return read_chunk_set(path, name)
    except ChunkFileError as e:
        raise BadInput(f"{flag} {e}") from None


def _generate_speech_checks(config, chunk_set, chunks_path: str, checkpoint: str, params: dict, maskgit: dict, *,
                            use_cfg: bool, local_transformer: bool, flag: str) -> None:
    """Before any work: the parameters are usable, the local transformer exists when do_tts's default asks for it,
    NeMo's MaskGit crashes are refused, every chunk fits the checkpoint (token ids, speakers or context codes) and
    every text window its text encoder's positions (the reference's checks, one line each)."""
    from parity.chunks import text_windows
    from reference.inference import InferenceError, MaskGitOptions

    check_params(config, params)
    lt_type = config.local_transformer_type
    if local_transformer and lt_type not in ("autoregressive", "maskgit"):
        raise BadInput(f"{checkpoint}: has no local transformer (local_transformer_type={lt_type!r}); generate-speech "
                       "samples with it by default, as do_tts: pass --no-local-transformer")
    try:
        opts = MaskGitOptions.from_args(**maskgit)
        if local_transformer and lt_type == "maskgit":
            opts.check(config.num_audio_codebooks * config.frame_stacking_factor, use_cfg)
    except InferenceError as e:
        raise BadInput(f"--param: {e}") from None
    where = f"{flag} {chunks_path} (chunk set {chunk_set.name!r}, chunk {{k}})"
    for k, c in enumerate(chunk_set.chunks):
        check_batch_fits(c["batch"], config, where.format(k=k), checkpoint, require_audio=False)
    enc = config.encoder
    if enc.use_learnable_pos_emb or enc.is_causal:  # positions (or the causal mask) end at max_length_causal_mask
        for k, w in enumerate(text_windows(chunk_set.chunks)):
            if w > enc.max_length_causal_mask:
                raise BadInput(
                    f"{where.format(k=k)}: generate_speech encodes a text window of {w} tokens there (the chunk and "
                    f"up to 20 tokens before it), more than the {enc.max_length_causal_mask} positions of "
                    f"{checkpoint}'s text encoder (max_length_causal_mask; NeMo fails too); shorter sentences make "
                    "shorter chunks")


# NeMo 3.0.0's generate_speech fails on some runs (both NeMo and the reference, which reproduces it): the
# multi-chunk prior indexes the window at attended position - left_offset, out of range once the attention lags
# more than a window behind (tiny random models do; a seed or text changes it).
_CHUNK_PRIOR_FRAMES = {"construct_multi_chunk_prior", "_set_attention_prior_weights"}  # NeMo's (the reference raises InferenceError)


@contextlib.contextmanager
def _generation_failures():
    """That failure as one line (exit 2) instead of a traceback: it is NeMo's, for this input and seed; and the
    reference's refusal of a decoder input longer than its learned positions (NeMo: IndexError in the embedding)."""
    try:
        yield
    except ValueError as e:
        if "learned positions (max_length_causal_mask)" not in str(e):
            raise
        raise BadInput(f"generate_speech: {e} (fewer max_decoder_steps, or a shorter context, fit it)") from None
    except IndexError as e:
        frames = {f.name for f in traceback.extract_tb(e.__traceback__)}
        if not frames & _CHUNK_PRIOR_FRAMES:
            raise
        raise BadInput(f"generate_speech cannot run these chunks with this seed: the multi-chunk prior indexes past "
                       f"the text window (IndexError: {e}); NeMo 3.0.0 fails the same way (construct_multi_chunk_prior "
                       "at attended position - left_offset, an attention lagging a window behind): another --seed "
                       "or text avoids it") from None


def _generate_only_flags(args: argparse.Namespace) -> None:
    """The generate-speech flags are refused in the other modes rather than ignored."""
    for attr, flag in GENERATE_ONLY:
        if getattr(args, attr, None):
            raise BadInput(f"{flag}: only with --mode generate-speech")


# ------------------------------------------------------------------------------------------------- check


def configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixtures", default=str(DEFAULT_FIXTURES), help="folder of <case>.nemo, <case>.batch.safetensors, <case>.nemo_dump")
    p.add_argument("--cases", nargs="+", help="cases to check (default: every <case>.nemo_dump in --fixtures)")
    p.add_argument("--plot", metavar="DIR", help="write <case>.png error plots here")
    p.add_argument("--layers", action="store_true", help="print every tensor, not only the summary per case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = the bit-reproducible setting)")


def run_check(args: argparse.Namespace) -> int:
    """Run the reference on each bundled NeMo-made model and compare every capture point with NeMo's dump, with the
    tolerance policy "parity" (parity.tolerances)."""
    fx = Path(args.fixtures)
    separate({"--fixtures": fx}, {"--plot": args.plot})
    import torch

    from parity.compare import compare_dumps
    from parity.reference_capture import dump_reference_process_batch
    from parity.report import format_table, plot
    from parity.tolerances import policy

    if args.threads < 1:
        raise BadInput(f"--threads must be >= 1, got {args.threads}")
    if not fx.is_dir():
        raise BadInput(f"--fixtures {fx}: not a folder")
    if args.plot:
        output_dir(args.plot, "--plot", overwrite=None)
    torch.set_num_threads(args.threads)
    cases = args.cases or sorted(p.name[: -len(".nemo_dump")] for p in fx.glob("*.nemo_dump"))
    if not cases:
        raise BadInput(f"{fx}: no <case>.nemo_dump folders found")
    for case in cases:
        for need in (fx / f"{case}.nemo", fx / f"{case}.batch.safetensors", fx / f"{case}.nemo_dump"):
            if not need.exists():
                raise BadInput(f"{need}: missing (case {case})")
    png_kind = _report_kinds()[1]
    if args.plot:
        for case in cases:
            output_file(Path(args.plot) / f"{case}.png", "--plot", png_kind)
    parity_policy = policy("parity")
    rows, all_ok = [], True
    per_layer: dict[str, dict] = {}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="magpie-parity-check-") as tmp:
        for case in cases:
            ckpt, batch_path, nemo_dump = fx / f"{case}.nemo", fx / f"{case}.batch.safetensors", fx / f"{case}.nemo_dump"
            model = load_reference(str(ckpt))
            batch = load_batch(str(batch_path))
            check_batch_fits(batch, model.config, batch_path, ckpt, require_audio=True)
            ref_dump = Path(tmp) / f"{case}.reference_dump"
            dump_reference_process_batch(model, batch, ref_dump)
            with user_errors():
                res = compare_dumps(ref_dump, nemo_dump, policy=parity_policy, progress=False)
            if args.layers:
                print(f"\n== {case}")
                print(format_table(res, max_rows=10_000))
            if args.plot:
                png = Path(args.plot) / f"{case}.png"
                if os.path.lexists(png):
                    check_replaceable_file(png, "--plot", png_kind)
                with writing(png, "--plot"):
                    plot(res, str(png))
            per_layer[case] = {t.name: t for t in res.tensors}
            for t in res.tensors:
                if t.name not in order:
                    order.append(t.name)
            worst = max(res.tensors, key=lambda t: t.max_abs if t.max_abs is not None else float("inf"))
            fd = res.first_divergence
            rows.append((case, len(res.tensors), worst.max_abs, worst.name, max(t.max_rel or 0.0 for t in res.tensors),
                         f"{fd[0]}@{fd[1]}" if fd else "-", res.passed))
            all_ok &= bool(res.passed)
    print("Layer by layer: max |reference - NeMo| per capture point (float32, CPU, teacher-forced process_batch)")
    width = max(len(n) for n in order) + 2
    print(f"{'tensor':<{width}}" + "".join(f"{c[:14]:>15}" for c in per_layer))
    for name in order:
        cells = []
        for case in per_layer:
            t = per_layer[case].get(name)
            cells.append("-" if t is None else (f"{t.max_abs:.2e}" if t.passed else f"{t.max_abs:.2e}!"))
        print(f"{name:<{width}}" + "".join(f"{c:>15}" for c in cells))
    print("\nSummary (worst figure per case; '!' above marks a tensor outside tolerance)")
    hdr = f"{'case':<18} {'tensors':>7} {'worst max|abs|':>15} {'at':<36} {'worst max|rel|':>14} {'first divergence':<20} ok"
    print(hdr)
    print("-" * len(hdr))
    for case, n, worst_abs, at, worst_rel, fd, ok in rows:
        at = at if worst_abs else "(all tensors bit-identical)"
        print(f"{case:<18} {n:>7} {worst_abs:>15.3g} {at:<36} {worst_rel:>14.3g} {fd:<20} {'PASS' if ok else 'FAIL'}")
    return EXIT_OK if all_ok else EXIT_MISMATCH


# ------------------------------------------------------------------------------------------------ compare


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="dump under test (directory with manifest.json)")
    p.add_argument("b", help="expected/reference dump")
    p.add_argument("--json", metavar="OUT", help="write the JSON report here ('-' for stdout)")
    p.add_argument("--plot", metavar="OUT.png", help="write a max-abs-error-per-layer plot")
    p.add_argument("--tolerances", metavar="FILE|NAME",
                   help='JSON: {"default": {"atol":..,"rtol":..}, "per_name": {glob: {...}}}, a calibration file '
                        "('magpie-parity calibrate': each tensor within the precision's own noise or beyond it), or "
                        "a policy name of parity.tolerances (parity, fixtures, steps); default: the defaults of the "
                        "precision the runs computed in (the dumps' manifests)")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="only compare tensors whose name matches a glob")
    p.add_argument("--intersect", action="store_true",
                   help="compare only tensors both dumps hold (an engine dump is a subset of a reference dump); "
                        "the others are listed but do not fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, help="comparison threads (default: min(2, cpus))")
    p.add_argument("--max-rows", type=int, default=60, help="per-tensor rows in the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")


def run_compare(args: argparse.Namespace) -> int:
    """Exit 0: every tensor within tolerance; 1: a mismatch (or tensors missing on one side without
    --intersect, counted apart from the numeric check); 2: bad input (missing/corrupt/truncated file, incompatible
    manifests or dumps of different models, nothing to compare, bad tolerance file, bad arguments)."""
    tolerance_file = args.tolerances if args.tolerances and os.path.lexists(args.tolerances) else None
    separate({"dump a": args.a, "dump b": args.b, "--tolerances": tolerance_file},
             {"--json": args.json, "--plot": args.plot})

    json_kind, png_kind = _report_kinds()
    if args.json and args.json != "-":
        output_file(args.json, "--json", json_kind)
    if args.plot:
        output_file(args.plot, "--plot", png_kind)

    from parity.compare import compare_dumps
    from parity.report import format_table, plot, to_json, verdict
    from parity.tolerances import load_policy
    with user_errors():
        policy = load_policy(args.tolerances, default="")
        result = compare_dumps(
            args.a,
            args.b,
            policy=policy,
            names=args.names,
            progress=False if args.no_progress else None,
            workers=args.workers,
            intersect=args.intersect,
        )
    if not result.tensors:
        _nothing_compared(args, result)
    report = to_json(result)
    noise = getattr(policy, "envelope", None) is not None
    if noise:
        report["calibration"] = _json_safe(calibration_summary(policy, result, args.tolerances))
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    if not args.quiet and args.json != "-":
        if noise:
            print(report["calibration"]["verdict"])
        print(format_table(result, max_rows=args.max_rows))
    elif not result.passed:  # no table: the verdict still says why it failed, in one line
        print(report["calibration"]["verdict"] if noise else verdict(result), file=sys.stderr)
    if args.json == "-":
        sys.stdout.write(text)
    elif args.json:
        write_output_file(args.json, "--json", text.encode(), json_kind)
    if args.plot:
        if os.path.lexists(args.plot):
            check_replaceable_file(args.plot, "--plot", png_kind)
        with writing(args.plot, "--plot"):
            plot(result, args.plot)
    return EXIT_OK if result.passed else EXIT_MISMATCH


def _json_safe(x):
    """Strict JSON: non-finite floats as the strings "nan", "inf", "-inf" (as the report writes them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _where(t) -> str:
    return f"worst element {list(t.worst_index)}" if t.worst_index is not None else "no element differs"


def calibration_summary(policy, result, path: str) -> dict:
    """A calibrated compare in words and figures: each tensor within the precision's own noise (its calibrated
    envelope) or beyond it, and the headline: the first tensor and step beyond it in execution order."""
    prec = policy.precision
    ts = result.tensors
    calibrated = [t for t in ts if t.envelope is not None]
    beyond = [t for t in ts if not t.passed]
    within = sum(t.passed for t in calibrated)
    fd = result.first_divergence
    head = next((t for t in ts if t.key == fd), None) if fd else None
    source = f"{path}: {prec} against {policy.reference_precision}, safety factor {policy.safety_factor:g}"
    counts = f"{within}/{len(calibrated)} calibrated tensors within {prec} noise"
    uncal = len(ts) - len(calibrated)
    if uncal:
        counts += f", {uncal} not calibrated (judged by the {prec} defaults)"
    missing = len(result.missing_in_a) + len(result.missing_in_b)
    if missing and not result.intersect:
        counts += f", {missing} tensors missing on one side"
    if head is None:
        line = f"{'PASS' if result.passed else 'FAIL'}: {counts} ({source})"
    else:
        if head.envelope is None:
            why = "outside the default tolerance, not calibrated"
        elif head.reason is not None:
            why = head.reason
        elif head.exact:
            why = f"{head.n_failed} elements differ, {head.envelope:g} allowed; {_where(head)}"
        else:
            why = (f"max |a - b| {head.max_abs:.3e} = x {head.envelope_ratio:.1f} of the envelope "
                   f"{head.envelope:.3e}; {_where(head)}")
        line = (f"FAIL: beyond {prec} noise first at {head.name} step {'-' if head.step is None else head.step} "
                f"({why}); {counts} ({source})")
    return {
        "file": str(path),
        "precision": prec,
        "reference_precision": policy.reference_precision,
        "safety_factor": policy.safety_factor,
        "within": within,
        "calibrated": len(calibrated),
        "headline": None if head is None else {"name": head.name, "step": head.step,
                                               "envelope_ratio": head.envelope_ratio,
                                               "worst_index": None if head.worst_index is None
                                               else list(head.worst_index)},
        "beyond": [{"name": t.name, "step": t.step, "envelope_ratio": t.envelope_ratio,
                    "worst_index": None if t.worst_index is None else list(t.worst_index)} for t in beyond],
        "verdict": line,
    }


def _nothing_compared(args: argparse.Namespace, result) -> None:
    """No tensor present in both dumps: no verdict to give (never "0/0 tensors"), one line saying why."""
    def some(keys) -> str:
        names = list(dict.fromkeys(n for n, _ in keys))
        return f"{len(keys)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if keys else "none"

    sel = f" matching --names {' '.join(args.names)}" if args.names else ""
    if not result.missing_in_a and not result.missing_in_b:
        if args.names:
            raise BadInput(f"--names {' '.join(args.names)}: matches no tensor of either dump; nothing compared "
                           f"(inspect a dump's names with 'magpie-parity inspect {args.b}')")
        raise BadInput(f"{args.a} and {args.b}: neither dump holds a tensor; nothing compared")
    raise BadInput(f"{args.a} and {args.b}: no tensor{sel} is present in both (a holds {some(result.missing_in_b)}, "
                   f"b holds {some(result.missing_in_a)}); nothing compared (dumps of different runs?)")


# ------------------------------------------------------------------------------------------------- inspect


def configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", help="dump folder (a manifest.json and its shards)")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="only the tensor rows whose name matches a glob")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _total(n: int) -> str:
    return _size(n) if n < 1024 else f"{_size(n)} ({n} bytes)"


def _steps(steps: list[int]) -> str:
    """``0..13`` for a contiguous range, ``0..20 (12 steps)`` for one with gaps; ``-`` for none."""
    if not steps:
        return "-"
    lo, hi = min(steps), max(steps)
    if len(steps) == 1:
        return str(lo)
    return f"{lo}..{hi}" if len(set(steps)) == hi - lo + 1 else f"{lo}..{hi} ({len(set(steps))} steps)"


def _value(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def inspect_table(reader, names=None) -> str:
    """A dump's manifest as a table: what it is (source, mode, config hash, precision, inputs, layout), then its
    tensors per name (steps, entries, shape, dtype, bytes)."""
    layout = dict(reader.layout)
    params = layout.pop("params", None)
    entries = reader.entries
    all_steps = [e.step for e in entries if e.step is not None]
    rows = [("dump", str(reader.path)), ("source", reader.source), ("mode", str(layout.pop("mode", "-"))),
            ("config hash", reader.config_hash or "none recorded (compare cannot check the model)"),
            ("precision", reader.dtype),
            ("tensors", f"{len(entries)} in {len(reader.names())} names, steps {_steps(all_steps)}, "
                        f"{_total(sum(e.nbytes for e in entries))}")]
    if reader.inputs:
        rows.append(("inputs", ", ".join(f"{k} {_value(v)}" for k, v in reader.inputs.items())))
    for k in ("use_cfg", "seed"):
        rows.append((k, _value(layout.pop(k)) if k in layout else "-"))
    for k, v in layout.items():
        rows.append((k, _value(v)))
    if isinstance(params, dict):
        rows.append(("params", " ".join(f"{k}={_value(v)}" for k, v in params.items()) or "-"))
    elif params is not None:
        rows.append(("params", _value(params)))
    else:
        rows.append(("params", "- (none recorded)"))
    if reader.meta:
        rows.append(("meta", ", ".join(reader.meta)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    by_name: dict[str, list] = {}
    for e in entries:
        if names is None or _matches(e.name, names):
            by_name.setdefault(e.name, []).append(e)
    header = ("name", "steps", "entries", "shape", "dtype", "bytes")
    body = []
    for name, es in by_name.items():
        shapes = {e.shape for e in es}
        shape = "x".join(map(str, es[0].shape)) or "scalar"
        if len(shapes) > 1:
            shape += f" (+{len(shapes) - 1} other)"
        dtypes = ",".join(dict.fromkeys(e.dtype for e in es))
        body.append((name, _steps([e.step for e in es if e.step is not None]), str(len(es)), shape, dtypes,
                     _size(sum(e.nbytes for e in es))))
    w = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines.append("")
    lines.extend("  ".join(c.rjust(w[i]) if i in (2, 5) else c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
                 for r in [header, *body])
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    """Print a dump's manifest and tensors as a table; a folder that is not a readable dump is one line, exit 2."""
    from parity.dump import open_dump

    with user_errors():
        reader = open_dump(args.dump)
    if args.names and not any(_matches(e.name, args.names) for e in reader.entries):
        raise BadInput(f"--names {' '.join(args.names)}: matches no tensor of {args.dump}")
    print(inspect_table(reader, args.names))
    return EXIT_OK


def _matches(name: str, globs) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, g) for g in globs)


# -------------------------------------------------------------------------------------------------- dump


def configure_dump(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt (--source nemo: .nemo)")
    p.add_argument("--batch", required=True,
                   help="safetensors file holding NeMo's batch keys (generate-speech: a chunk file, "
                        "'magpie-parity batch' writes them)")
    p.add_argument("--out", required=True, help="dump folder to create")
    p.add_argument("--source", choices=["reference", "nemo"], default="reference")
    p.add_argument("--mode", choices=["teacher-forced", "infer", "generate-speech"], default="teacher-forced",
                   help="teacher-forced: process_batch; infer: infer_batch; generate-speech: NeMo's generate_speech "
                        "over the chunks of --batch sharing one ChunkState (do_tts's loop)")
    p.add_argument("--use-cfg", action="store_true", help="infer / generate-speech: classifier-free guidance")
    p.add_argument("--seed", type=int, default=0,
                   help="infer / generate-speech: torch.manual_seed before decoding (generate-speech: once, before "
                        "the first chunk, as do_tts and NeMo's dumps)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="infer / generate-speech: NeMo inference_parameters field; generate-speech also takes "
                        "generate_speech's MaskGit arguments: " + ", ".join(f"maskgit_{a}" for a in MASKGIT_ARGS))
    p.add_argument("--layers", action="store_true", help="infer mode: also dump every layer each step")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="--source reference, teacher-forced / infer: the precision the reference runs in (the model "
                        "cast, as infer --dtype; the manifest records it and compare's tolerances follow it)")
    p.add_argument("--codes", metavar="DUMP|CODES.safetensors",
                   help="--source reference --mode infer: teacher forcing: feed these codes back instead of the "
                        "sampled ones (another dump's predicted_codes, e.g. NeMo's float32 run with the same --seed, "
                        "or a codes file infer wrote), so a reduced-precision run follows that run step by step")
    p.add_argument("--kv-cache", choices=list(KV_CACHE), default="checkpoint",
                   help="reference infer / generate-speech: decoding path (engines always cache: use 'on' to line "
                        "steps up; generate-speech's 'checkpoint' is NeMo's runner: the checkpoint's "
                        "use_kv_cache_for_inference for one chunk, recompute for several)")
    p.add_argument("--chunk-set", metavar="NAME",
                   help="generate-speech: the chunk set of --batch (default: its only set)")
    p.add_argument("--no-local-transformer", action="store_true",
                   help="generate-speech: sample the decoder's logits (default: the local transformer, as do_tts)")
    p.add_argument("--no-steps", action="store_true",
                   help="generate-speech: only each chunk's inputs, codes and attended positions (no per-step "
                        "logits and priors)")
    p.add_argument("--codec", help="--source nemo: codec .nemo (default: the recorded path, or beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run_dump(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint, "--batch": args.batch, "--codec": args.codec, "--codes": args.codes},
             {"--out": args.out})
    output_dir(args.out, "--out", args.overwrite, replaces=DUMP_FOLDER)
    if args.source == "nemo" and args.dtype != "float32":
        raise BadInput(f"--dtype {args.dtype}: --source nemo dumps NeMo's float32 run; the flag is the reference's")
    if args.codes and (args.source != "reference" or args.mode != "infer"):
        raise BadInput("--codes: only with --source reference --mode infer (teacher forcing of infer_batch)")
    if args.mode == "generate-speech":
        if args.dtype != "float32":
            raise BadInput(f"--dtype {args.dtype}: only with --mode teacher-forced or infer")
        return _dump_generate_speech(args)
    _generate_only_flags(args)
    import torch

    batch = load_batch(args.batch)
    params = parse_assignments(args.param, "--param")
    teacher_forced = args.mode == "teacher-forced"
    inputs = infer_inputs(batch)
    if args.source == "reference":
        from parity.reference_capture import dump_reference_infer, dump_reference_process_batch

        model = load_reference(args.checkpoint, dtype=args.dtype)
        check_batch_fits(batch if teacher_forced else inputs, model.config, args.batch, args.checkpoint,
                         require_audio=teacher_forced)
        if not teacher_forced:
            check_params(model.config, params)
        forced = {}
        if args.codes:
            forced = {"forced_codes": forced_codes(args.codes, model.config, inputs),
                      "layout_extra": {"teacher_forced": True}}
        with user_errors(), writing(args.out, "--out"):
            if teacher_forced:
                dump_reference_process_batch(model, batch, args.out, overwrite=args.overwrite)
            else:
                dump_reference_infer(model, inputs, args.out, use_cfg=args.use_cfg, seed=args.seed,
                                     capture_layers=args.layers, overwrite=args.overwrite,
                                     progress=sys.stderr.isatty(), use_kv_cache=KV_CACHE[args.kv_cache], **forced,
                                     **params)
    else:
        from parity.nemo_capture import dump_nemo_infer, dump_nemo_process_batch

        _nemo_checks(args.checkpoint, batch, args.batch, teacher_forced=teacher_forced, params=params)
        model = _load_nemo(args.checkpoint, args.codec)
        with torch.no_grad(), user_errors(), writing(args.out, "--out"):
            if teacher_forced:
                dump_nemo_process_batch(model, batch, args.out, overwrite=args.overwrite)
            else:
                dump_nemo_infer(model, inputs, args.out, use_cfg=args.use_cfg, seed=args.seed,
                                capture_layers=args.layers, overwrite=args.overwrite, **params)
    print(f"wrote {args.out}")
    return EXIT_OK


def forced_codes(path: str, config, inputs: dict, flag: str = "--codes"):
    """``--codes``: the codes that teacher-force ``infer_batch`` (:func:`parity.cli_support.read_codes`: a dump's or a
    codes file's), (B, C, T) integers that fit the checkpoint and the batch; else one line."""
    codes = read_codes(path, flag).codes
    B = int(inputs["text"].shape[0])
    C = config.num_audio_codebooks
    if codes.shape[0] != B or codes.shape[1] != C or codes.shape[2] < 1:
        raise BadInput(f"{flag} {path}: predicted_codes of shape {tuple(codes.shape)}; the batch and checkpoint "
                       f"need ({B}, {C}, T >= 1)")
    hi = config.num_all_tokens_per_codebook
    if int(codes.min()) < 0 or int(codes.max()) >= hi:
        raise BadInput(f"{flag} {path}: predicted_codes outside [0, {hi}) (num_all_tokens_per_codebook)")
    return codes


def _dump_generate_speech(args: argparse.Namespace) -> int:
    """dump --mode generate-speech: NeMo's generate_speech loop (or the reference's) over the chunks of --batch,
    in one dump layout for both sources (``parity.nemo_capture.dump_nemo_generate_speech``,
    ``parity.reference_capture.dump_reference_generate_speech``)."""
    if args.layers:
        raise BadInput("--layers: only with --mode infer (generate-speech records every step's logits, priors and "
                       "attended positions)")
    if args.source == "nemo" and args.kv_cache != "checkpoint":
        raise BadInput(f"--kv-cache {args.kv_cache}: --source nemo runs NeMo's runner rule (the checkpoint's "
                       "use_kv_cache_for_inference for one chunk, recompute for several); the flag is the "
                       "reference's")
    chunk_set = _read_chunks(args.batch, args.chunk_set, "--batch")
    params, maskgit = _split_maskgit(parse_assignments(args.param, "--param"))
    lt = not args.no_local_transformer
    run = dict(use_cfg=args.use_cfg, seed=args.seed, use_local_transformer_for_inference=lt, maskgit=maskgit,
               capture_steps=not args.no_steps, overwrite=args.overwrite)
    if args.source == "reference":
        from parity.reference_capture import dump_reference_generate_speech

        model = load_reference(args.checkpoint)
        _generate_speech_checks(model.config, chunk_set, args.batch, args.checkpoint, params, maskgit,
                                use_cfg=args.use_cfg, local_transformer=lt, flag="--batch")
        with user_errors(), writing(args.out, "--out"), _generation_failures():
            outs = dump_reference_generate_speech(model, chunk_set.chunks, args.out,
                                                  use_kv_cache=KV_CACHE[args.kv_cache], **run, **params)
    else:
        import torch

        from parity.nemo_capture import dump_nemo_generate_speech

        config = _nemo_archive_config(args.checkpoint)
        if config is not None:
            _generate_speech_checks(config, chunk_set, args.batch, args.checkpoint, params, maskgit,
                                    use_cfg=args.use_cfg, local_transformer=lt, flag="--batch")
        model = _load_nemo(args.checkpoint, args.codec)
        with torch.no_grad(), user_errors(), writing(args.out, "--out"), _generation_failures():
            outs = dump_nemo_generate_speech(model, chunk_set.chunks, args.out, **run, **params)
    lens = [o.predicted_codes_lens.tolist() for o in outs]
    print(f"wrote {args.out}: {len(outs)} chunk(s) of chunk set {chunk_set.name!r}, codes per chunk {lens}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- infer


def configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt")
    p.add_argument("--inputs", required=True,
                   help="safetensors with text, text_lens, context_audio_codes, context_audio_codes_lens (or a baked "
                        "checkpoint's speaker_indices); generate-speech: a chunk file ('magpie-parity batch')")
    p.add_argument("--out", required=True, help="safetensors file to write predicted_codes and predicted_codes_lens to")
    p.add_argument("--mode", choices=["infer", "generate-speech"], default="infer",
                   help="infer: infer_batch; generate-speech: NeMo's generate_speech over the chunks of --inputs "
                        "(do_tts's loop), each item's codes concatenated over its chunks as do_tts and NeMo's "
                        "long-form runner do")
    p.add_argument("--use-cfg", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before decoding (generate-speech: once)")
    p.add_argument("--kv-cache", choices=list(KV_CACHE), default="checkpoint",
                   help="decoding path (default: the checkpoint's use_kv_cache_for_inference, as NeMo; "
                        "generate-speech: NeMo's runner, recompute for several chunks)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="NeMo inference_parameters field, e.g. topk=1; generate-speech also "
                        + ", ".join(f"maskgit_{a}" for a in MASKGIT_ARGS))
    p.add_argument("--chunk-set", metavar="NAME",
                   help="generate-speech: the chunk set of --inputs (default: its only set)")
    p.add_argument("--no-local-transformer", action="store_true",
                   help="generate-speech: sample the decoder's logits (default: the local transformer, as do_tts)")
    p.add_argument("--dump", metavar="DIR", help="also write every step's captured tensors to this dump (a new folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def run_infer(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint, "--inputs": args.inputs}, {"--out": args.out, "--dump": args.dump})

    output_file(args.out, "--out", CODES_FILE)
    if args.dump:
        output_dir(args.dump, "--dump", overwrite_flag=None)
    if args.mode == "generate-speech":
        return _infer_generate_speech(args)
    _generate_only_flags(args)
    import torch

    check_device(args.device)
    params = parse_assignments(args.param, "--param")
    batch = infer_inputs(load_batch(args.inputs, "--inputs"))
    model = load_reference(args.checkpoint, args.device, args.dtype)
    check_batch_fits(batch, model.config, args.inputs, args.checkpoint, require_audio=False)
    check_params(model.config, params)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    kv = KV_CACHE[args.kv_cache]
    with user_errors():
        if args.dump:
            from parity.reference_capture import dump_reference_infer

            with writing(args.dump, "--dump"):
                out = dump_reference_infer(model, batch, args.dump, use_cfg=args.use_cfg, seed=args.seed,
                                           capture_layers=True, progress=sys.stderr.isatty(), use_kv_cache=kv, **params)
        else:
            torch.manual_seed(args.seed)
            out = model.infer_batch(batch, use_cfg=args.use_cfg, use_kv_cache=kv, progress=sys.stderr.isatty(),
                                    **params)
    from reference.inference import resolve_parameters

    _write_codes(args.out, out.predicted_codes, out.predicted_codes_lens,
                 max_decoder_steps=resolve_parameters(model.config.inference, **params).max_decoder_steps)
    return EXIT_OK


def codes_metadata(max_decoder_steps: int | None = None, **extra: str) -> dict:
    """A codes file's safetensors metadata: its format and, for a whole infer_batch run, the run's
    ``max_decoder_steps`` (an item without EOS has exactly that length: closed-loop tells "EOS never fired" by it)."""
    meta = {"format": CODES_FORMAT, **extra}
    if max_decoder_steps is not None:
        meta["max_decoder_steps"] = str(int(max_decoder_steps))
    return meta


def _write_codes(path: str, codes, lens, note: str = "", max_decoder_steps: int | None = None) -> None:
    from safetensors.torch import save

    data = save({"predicted_codes": codes.cpu().contiguous(), "predicted_codes_lens": lens.cpu().contiguous()},
                metadata=codes_metadata(max_decoder_steps))
    write_output_file(path, "--out", data, CODES_FILE)
    print(f"wrote {path}: codes {tuple(codes.shape)}, lengths {lens.tolist()}{note}", file=sys.stderr)


def _infer_generate_speech(args: argparse.Namespace) -> int:
    """infer --mode generate-speech: the reference's generate_speech over the chunks of --inputs (one ChunkState,
    seeded once before the first chunk), each item's codes concatenated over its chunks
    (``parity.chunks.concatenate_chunk_codes``: do_tts's and NeMo's long-form runner's rule)."""
    check_device(args.device)
    chunk_set = _read_chunks(args.inputs, args.chunk_set, "--inputs")
    params, maskgit = _split_maskgit(parse_assignments(args.param, "--param"))
    lt = not args.no_local_transformer
    import torch

    from parity.chunks import concatenate_chunk_codes
    from parity.reference_capture import dump_reference_generate_speech, generate_speech_kv_cache

    model = load_reference(args.checkpoint, args.device, args.dtype)
    _generate_speech_checks(model.config, chunk_set, args.inputs, args.checkpoint, params, maskgit,
                            use_cfg=args.use_cfg, local_transformer=lt, flag="--inputs")
    chunks = [{**c, "batch": {k: v.to(args.device) for k, v in c["batch"].items()}} for c in chunk_set.chunks]
    cached = generate_speech_kv_cache(model, len(chunks), KV_CACHE[args.kv_cache])
    with user_errors(), _generation_failures():
        if args.dump:
            with writing(args.dump, "--dump"):
                outs = dump_reference_generate_speech(model, chunks, args.dump, use_cfg=args.use_cfg, seed=args.seed,
                                                      use_local_transformer_for_inference=lt, maskgit=maskgit,
                                                      use_kv_cache=cached, **params)
        else:
            state = model.create_chunk_state(int(chunks[0]["batch"]["text"].shape[0]))
            gen = {f"maskgit_{k}": v for k, v in maskgit.items()}
            torch.manual_seed(args.seed)
            outs = [model.generate_speech(c["batch"], state, c["end_of_text"], c["beginning_of_text"],
                                          use_cfg=args.use_cfg, use_local_transformer_for_inference=lt,
                                          use_kv_cache=cached, **gen, **params) for c in chunks]
    codes, lens = concatenate_chunk_codes(chunk_set.chunks, outs)
    _write_codes(args.out, codes, lens, f" over {len(outs)} chunk(s) of chunk set {chunk_set.name!r}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- batch

# What `batch --out` replaces: a chunk file (parity.chunks), whoever wrote it.
def _chunk_file_kind() -> Replaceable:
    from parity.chunks import is_chunk_file

    return ("a chunk file (safetensors with 'chunks' metadata, as magpie-parity batch writes)", is_chunk_file)


BATCH_SET = "do_tts"  # the chunk set `batch` writes
_LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


def configure_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo archive; its tokenizer is restored with NeMo")
    p.add_argument("--text", required=True, help="the text to speak (as given: no text normalisation, do_tts's "
                                                  "default apply_TN=False)")
    p.add_argument("--language", default="en",
                   help="picks NeMo's tokenizer (get_tokenizer_for_language) and sentence-split threshold "
                        "(chunk_text_for_inference: en splits from 45 words on)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--speaker-index", type=int, metavar="N",
                     help="a baked checkpoint's speaker (default: 0, as do_tts)")
    who.add_argument("--context-audio", metavar="CODES.safetensors",
                     help="a checkpoint without baked speakers: the speaker's codec codes, 'context_audio_codes' "
                          "(C, T) or (1, C, T) and optionally 'context_audio_codes_lens' (the frames to use)")
    p.add_argument("--codec", help="codec .nemo NeMo restores with the model (default: the recorded path, or beside "
                                   "the checkpoint)")
    p.add_argument("--out", required=True, metavar="B.chunks.safetensors",
                   help=f"chunk file to write (one chunk set, {BATCH_SET!r}; replaces only a chunk file)")


def _speaker(args: argparse.Namespace, checkpoint: str, baked_speakers: int | None) -> None:
    """The speaker flags against the checkpoint: a baked checkpoint takes --speaker-index in [0, N) and ignores
    context audio; any other needs --context-audio."""
    if baked_speakers:
        if args.context_audio:
            raise BadInput(f"--context-audio {args.context_audio}: {checkpoint} bakes {baked_speakers} speakers and "
                           "ignores context audio; pick one with --speaker-index")
        if args.speaker_index is not None and not 0 <= args.speaker_index < baked_speakers:
            raise BadInput(f"--speaker-index {args.speaker_index}: {checkpoint} bakes {baked_speakers} speakers "
                           f"(0..{baked_speakers - 1})")
    else:
        if args.speaker_index is not None:
            raise BadInput(f"--speaker-index {args.speaker_index}: {checkpoint} has no baked speakers; give the "
                           "speaker's codes with --context-audio CODES.safetensors")
        if not args.context_audio:
            raise BadInput(f"{checkpoint} has no baked speakers: --context-audio CODES.safetensors is required "
                           "(the speaker's codec codes)")


def _context_audio(path: str) -> dict:
    """--context-audio: ``context_audio_codes`` (C, T) or (1, C, T) integer codes and an optional length (cut to
    it) -> the batch keys (1, C, T) / (1,) int64."""
    import torch

    t = load_batch(path, "--context-audio")
    codes = t.get("context_audio_codes")
    if codes is None:
        raise BadInput(f"--context-audio {path}: no 'context_audio_codes' tensor (it holds {sorted(t)})")
    if not integer_tensor(codes):
        raise BadInput(f"--context-audio {path}: context_audio_codes must hold integer codes, got {codes.dtype}")
    if codes.dim() == 2:
        codes = codes[None]
    if codes.dim() != 3 or codes.shape[0] != 1 or codes.shape[2] < 1:
        raise BadInput(f"--context-audio {path}: context_audio_codes must be (C, T) or (1, C, T) with T >= 1, got "
                       f"shape {tuple(t['context_audio_codes'].shape)}")
    n = int(codes.shape[2])
    lens = t.get("context_audio_codes_lens")
    if lens is not None:
        if not integer_tensor(lens) or lens.numel() != 1 or lens.dim() > 1:
            raise BadInput(f"--context-audio {path}: context_audio_codes_lens must be one integer, got "
                           f"{lens.dtype} of shape {tuple(lens.shape)}")
        n = int(lens.reshape(-1)[0])
        if not 1 <= n <= codes.shape[2]:
            raise BadInput(f"--context-audio {path}: context_audio_codes_lens {n} outside [1, {codes.shape[2]}] "
                           "(the frames context_audio_codes holds)")
    return {"context_audio_codes": codes[:, :, :n].to(torch.long).contiguous(),
            "context_audio_codes_lens": torch.tensor([n], dtype=torch.long)}


def run_batch(args: argparse.Namespace) -> int:
    """The chunks NeMo's do_tts runs for --text: NeMo's tokenizer for the language (restored from the checkpoint),
    chunk_text_for_inference (sentence chunks from the language's word threshold on, each + EOS), per chunk
    text (1, T) int32, text_lens (1,) int64, end_of_text [last chunk], beginning_of_text (first chunk), and the
    speaker: speaker_indices (1,) (baked) or the context codes; written as a chunk file (parity.chunks)."""
    separate({"--checkpoint": args.checkpoint, "--context-audio": args.context_audio, "--codec": args.codec},
             {"--out": args.out})
    kind = _chunk_file_kind()
    output_file(args.out, "--out", kind)
    text = args.text
    if not text.strip():
        raise BadInput("--text: nothing to speak (empty)")
    if not _LANGUAGE.match(args.language):
        raise BadInput(f"--language {args.language!r}: expected a language code such as en, de, es")
    if args.codec and not Path(args.codec).is_file():
        raise BadInput(f"--codec {args.codec}: no such file")
    config = _nemo_archive_config(args.checkpoint, "batch (NeMo's tokenizer)")
    if config is not None:
        _speaker(args, args.checkpoint, config.baked_speakers)
    cond = _context_audio(args.context_audio) if args.context_audio else {}
    model = _load_nemo(args.checkpoint, args.codec, who="batch (NeMo's tokenizer and chunk_text_for_inference)")
    if config is None:
        baked = bool(getattr(model, "has_baked_context_embedding", False))
        _speaker(args, args.checkpoint, int(model.num_baked_speakers) if baked else None)
    import torch
    from nemo.collections.tts.parts.utils.tts_dataset_utils import (chunk_text_for_inference,
                                                                    get_tokenizer_for_language)

    from parity.chunks import ChunkSet, chunk_file_bytes

    if args.language == "ja":  # do_tts: the ja normaliser does not take spaces
        text = re.sub(r"\s+", "", text)
    try:
        tokenizer = get_tokenizer_for_language(args.language, list(model.tokenizer.tokenizers))
        tokens, lens, chunk_texts = chunk_text_for_inference(text=text, language=args.language,
                                                             tokenizer_name=tokenizer, text_tokenizer=model.tokenizer,
                                                             eos_token_id=model.eos_id)
    except Exception as e:  # the tokenizer's own refusals (a language it lacks, a phonemizer missing, ...)
        raise BadInput(f"--text: NeMo's tokenizer for {args.language!r} cannot encode it: {type(e).__name__}: "
                       f"{e}") from None
    if not tokens:
        raise BadInput("--text: NeMo's chunker made no chunk of it")
    if not cond:  # a baked checkpoint: do_tts's speaker_index (None is speaker 0)
        cond = {"speaker_indices": torch.tensor([args.speaker_index or 0], dtype=torch.long)}
    chunks = []
    for k, (t, n) in enumerate(zip(tokens, lens)):
        batch = {"text": t.unsqueeze(0), "text_lens": torch.tensor([int(n)], dtype=torch.long),
                 **{key: v.clone() for key, v in cond.items()}}
        chunks.append({"batch": batch, "end_of_text": [k == len(tokens) - 1], "beginning_of_text": k == 0})
    if config is not None:
        for k, c in enumerate(chunks):
            check_batch_fits(c["batch"], config, f"chunk {k} of --text", args.checkpoint, require_audio=False)
    data = chunk_file_bytes([ChunkSet(name=BATCH_SET, chunks=chunks, texts=[args.text], chunk_texts=[list(chunk_texts)],
                                      language=args.language, tokenizer=tokenizer)])
    write_output_file(args.out, "--out", data, kind)
    speaker = (f"context audio {args.context_audio} ({int(cond['context_audio_codes_lens'][0])} frames)"
               if args.context_audio else f"speaker {args.speaker_index or 0}")
    print(f"wrote {args.out}: chunk set {BATCH_SET!r}, {len(chunks)} chunk(s) of {[int(n) for n in lens]} tokens "
          f"(tokenizer {tokenizer}, language {args.language}), {speaker}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- diagnose


def configure_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", help="engine dump in canonical form (e.g. from 'magpie-parity ingest-trtllm')")
    p.add_argument("--checkpoint", required=True, help="the .nemo/.ckpt the engine was converted from")
    p.add_argument("--batch", required=True, help="safetensors with the inputs the engine ran on")
    p.add_argument("--cfg", choices=["dump", "on", "off"], default="dump", help="CFG setting (default: from the dump's layout)")
    p.add_argument("--tolerance", type=float,
                   help="max |dlogit| accepted (default: parity.tolerances.DIAGNOSE for the dump's dtype)")
    p.add_argument("--tolerances", metavar="TOL.json",
                   help="a calibration file of the engine's precision ('magpie-parity calibrate'): max |dlogit| "
                        "accepted = the logits' calibrated noise envelope (instead of --tolerance)")
    p.add_argument("--codes", metavar="CODES.safetensors",
                   help="the engine's predicted_codes (B, C, T), which teacher-force the reference (default: the "
                        "dump's own; an ingested engine dump holds none)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a NeMo inference_parameters field the engine ran with, as infer takes them (cfg_scale, "
                        "topk, temperature, the attention prior's settings); default: the dump's layout params, "
                        "else the checkpoint's inference_parameters")


def engine_dump_of(path: str, model, checkpoint: str):
    """The engine dump to replay against ``model`` (the reference of ``checkpoint``), opened; one line if it is not a
    dump or records another model's config hash."""
    from parity.dump import open_dump

    with user_errors():
        reader = open_dump(path)
    if reader.config_hash is not None and reader.config_hash != model.config.hash():
        raise BadInput(f"{path}: records config_hash {reader.config_hash!r}, --checkpoint {checkpoint} has "
                       f"{model.config.hash()!r}: the dump is of another model (give the checkpoint the engine was "
                       "converted from)")
    return reader


def diagnose_params(config, reader, given: dict) -> tuple[dict, str]:
    """The inference parameters to teacher-force with: the dump's layout ``params`` (the fields the checkpoint's
    config knows), overridden by ``--param``; checked before any work, an error naming where the value came from
    and the flag that sets it. Returns them and where they came from, in words."""
    import dataclasses

    from reference.inference import InferenceError, check_parameters, resolve_parameters

    known = {f.name for f in dataclasses.fields(config.inference)}
    recorded = reader.layout.get("params") if isinstance(reader.layout.get("params"), dict) else {}
    from_dump = {k: v for k, v in recorded.items() if k in known}
    params = {**from_dump, **given}
    try:
        check_parameters(resolve_parameters(config.inference, **params), config)
    except InferenceError as e:
        m = re.match(r"\w+", str(e))
        key = m.group(0) if m and m.group(0) in known else None
        if key is None or key in given:
            raise BadInput(f"--param: {e}") from None
        origin = (f"{reader.path}'s layout params" if key in from_dump
                  else "the checkpoint's inference_parameters (the dump records none)")
        raise BadInput(f"{key} from {origin}: {e}; pass the engine's value with --param {key}=VALUE") from None
    except (TypeError, ValueError) as e:
        shown = " ".join(f"{k}={v!r}" for k, v in given.items())
        raise BadInput(f"--param {shown}: a value of the wrong type ({e})") from None
    parts = []
    if from_dump:
        parts.append(f"the dump's layout params ({len(from_dump)})")
    if given:
        parts.append("--param " + " ".join(f"{k}={v}" for k, v in given.items()))
    if not from_dump:
        parts.append("the checkpoint's inference_parameters for the rest (the dump records none)")
    return params, ", ".join(parts)


def _diagnose_calibration(path: str):
    """--tolerances of diagnose: a calibration file (a named policy or a plain policy file has no logit noise)."""
    from parity.tolerances import CalibratedPolicy, load_policy

    with user_errors():
        policy = load_policy(path)
    if not isinstance(policy, CalibratedPolicy):
        raise BadInput(f"--tolerances {path}: not a calibration file ('magpie-parity calibrate --out' writes one); "
                       "diagnose takes one number with --tolerance otherwise")
    return policy


def _calibrated_logit_tolerance(calibration, path: str, reader, config_hash: str) -> float:
    """The largest calibrated envelope of the logits, after checking the file describes this engine dump: its
    precision and model."""
    if reader.dtype != calibration.precision:
        raise BadInput(f"--tolerances {path}: calibrated for {calibration.precision}, but {reader.path} computed in "
                       f"{reader.dtype} (magpie-parity calibrate --dtype {reader.dtype})")
    with user_errors():
        calibration.check_model(config_hash, "--checkpoint has")
    steps = sorted(e.step for e in reader.entries if e.name == "logits" and e.step is not None)
    bound = calibration.largest_envelope("logits", steps)
    if bound is None:
        raise BadInput(f"--tolerances {path}: holds no envelope for 'logits' (calibrated without them?)")
    return bound


def run_diagnose(args: argparse.Namespace) -> int:
    from trt.diagnose import DiagnoseError, diagnose

    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise BadInput(f"--tolerance must be a finite number > 0, got {args.tolerance}")
    if args.tolerance is not None and args.tolerances:
        raise BadInput("--tolerance and --tolerances: give one (a number, or a calibration file)")
    calibration = _diagnose_calibration(args.tolerances) if args.tolerances else None
    given = parse_assignments(args.param, "--param")
    batch = infer_inputs(load_batch(args.batch))
    model = load_reference(args.checkpoint)
    check_batch_fits(batch, model.config, args.batch, args.checkpoint, require_audio=False)
    codes = forced_codes(args.codes, model.config, batch) if args.codes else None
    reader = engine_dump_of(args.dump, model, args.checkpoint)
    if codes is None and ("predicted_codes", None) not in reader:
        raise BadInput(f"{args.dump}: holds no 'predicted_codes' (an engine dump ingested from a tllm_debug tree has "
                       "none): pass the engine's codes with --codes CODES.safetensors (predicted_codes (B, C, T)); "
                       "they teacher-force the reference")
    params, origin = diagnose_params(model.config, reader, given)
    tolerance, why = args.tolerance, ""
    if calibration is not None:
        tolerance = _calibrated_logit_tolerance(calibration, args.tolerances, reader, model.config.hash())
        why = f"; logit tolerance: the calibrated {calibration.precision} noise of the logits ({args.tolerances})"
    use_cfg = {"dump": None, "on": True, "off": False}[args.cfg]
    with user_errors(DiagnoseError, ValueError):
        d = diagnose(model, reader, batch, use_cfg=use_cfg, tolerance=tolerance, codes=codes, params=params)
    print(f"codes: {'--codes ' + args.codes if args.codes else 'the dump'}; inference parameters: {origin}{why}")
    print(d.report())
    return EXIT_OK if d.explained or (not d.explanation and d.baseline.max_abs <= d.tolerance) else EXIT_MISMATCH


# ---------------------------------------------------------------------------------------------- calibrate


def _calibration_kind() -> Replaceable:
    from parity.calibrate import is_calibration_file

    return ("a calibration file magpie-parity calibrate wrote", is_calibration_file)


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt")
    p.add_argument("--batch", required=True,
                   help="safetensors with the inputs (infer: text, text_lens and the speaker's context or index; "
                        "teacher-forced: NeMo's whole batch)")
    p.add_argument("--dtype", required=True, choices=["bfloat16", "float16"],
                   help="the reduced precision to calibrate (the reference cast to it, against its float32 run)")
    p.add_argument("--seeds", type=int, default=4, metavar="N",
                   help="infer: seeds 0..N-1, each a float32 run and a teacher-forced run in --dtype (default 4)")
    p.add_argument("--mode", choices=["infer", "teacher-forced"], default="infer",
                   help="infer: infer_batch, every step (default); teacher-forced: one process_batch pair")
    p.add_argument("--use-cfg", action="store_true", help="infer: classifier-free guidance")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="infer: NeMo inference_parameters field, as infer takes them (e.g. topk=80)")
    p.add_argument("--no-layers", action="store_true",
                   help="infer: only logits, priors, attended positions and codes (default: every layer each step, "
                        "as dump --layers)")
    p.add_argument("--kv-cache", choices=list(KV_CACHE), default="checkpoint",
                   help="infer: decoding path (as dump's; engines always cache)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (TF32 off)")
    p.add_argument("--out", required=True, metavar="TOL.json", help="calibration file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file --out")


def run_calibrate(args: argparse.Namespace) -> int:
    """The reference in --dtype against its float32 run, per capture point and step: the error envelope over the
    seeds, written as a calibration file that 'compare --tolerances' reads (parity.calibrate)."""
    separate({"--checkpoint": args.checkpoint, "--batch": args.batch}, {"--out": args.out})
    kind = _calibration_kind()
    if os.path.lexists(args.out) and not args.overwrite:
        raise BadInput(f"--out {args.out}: already exists (pass --overwrite to replace it)")
    output_file(args.out, "--out", kind)
    if args.seeds < 1:
        raise BadInput(f"--seeds must be >= 1, got {args.seeds}")
    infer = args.mode == "infer"
    if not infer and (args.param or args.use_cfg or args.no_layers or args.kv_cache != "checkpoint"):
        raise BadInput("--param, --use-cfg, --no-layers, --kv-cache: only with --mode infer")
    check_device(args.device)
    import torch

    from parity.calibrate import CalibrationError, calibrate, calibration_bytes, envelope_table

    if args.device.startswith("cuda"):  # float32 means float32: no TF32 matmuls in the reference run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    params = parse_assignments(args.param, "--param")
    batch = load_batch(args.batch)
    model = load_reference(args.checkpoint, args.device)
    if infer:
        batch = infer_inputs(batch)
        check_params(model.config, params)
    check_batch_fits(batch, model.config, args.batch, args.checkpoint, require_audio=not infer)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    with user_errors(CalibrationError):
        data = calibrate(model, batch, args.dtype, seeds=range(args.seeds), mode=args.mode, use_cfg=args.use_cfg,
                         capture_layers=not args.no_layers, use_kv_cache=KV_CACHE[args.kv_cache],
                         progress=sys.stderr.isatty(), **params)
    write_output_file(args.out, "--out", calibration_bytes(data), kind)
    print(envelope_table(data))
    seeds = f"seeds 0..{args.seeds - 1}" if infer else "one process_batch pair"
    print(f"wrote {args.out}: {args.dtype} against float32, {len(data['per_name'])} names, {seeds}, safety factor "
          f"{data['safety_factor']:g}", file=sys.stderr)
    return EXIT_OK
