"""``magpie-parity`` commands of the parity side: ``check`` (the main job), ``compare``, ``dump``, ``infer`` and
``diagnose``. Each is a ``configure_<name>(parser)`` and a ``run_<name>(args) -> exit status`` pair listed in
``parity.cli``'s command table; heavy imports happen inside ``run_*``. User errors raise
:class:`parity.cli_support.BadInput` (one line, exit 2), checked before any work where they can be.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
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
    load_batch,
    load_reference,
    output_dir,
    output_file,
    parse_assignments,
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
    import struct

    from parity.files import read_head

    head = read_head(path, 8 + 65536)
    if head is None or len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n > len(head) - 8:
        return False
    try:
        header = json.loads(head[8:8 + n])
    except (ValueError, RecursionError):
        return False
    if not isinstance(header, dict):
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


def _nemo_checks(path: str, batch: dict, batch_path: str, *, teacher_forced: bool, params: dict) -> None:
    """--source nemo, before NeMo is imported: a readable .nemo archive (NeMo restores no .ckpt), and a batch and
    parameters that fit it (the reference reads the config and weight shapes without NeMo)."""
    import tarfile

    from reference.checkpoint import CheckpointError, read_checkpoint
    from reference.config import ConfigError, MagpieConfig

    try:
        raw = read_checkpoint(path)
    except CheckpointError as e:
        raise BadInput(str(e)) from None
    if not tarfile.is_tarfile(path):
        raise BadInput(f"{path}: a Lightning .ckpt; --source nemo restores .nemo archives only "
                       "(--source reference reads both)")
    try:
        config = MagpieConfig.from_nemo(raw.config, raw.state_dict, where=str(path))
    except ConfigError:
        return  # a model the reference does not build: NeMo alone decides
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


def _load_nemo(path: str, codec: str | None):
    try:
        from nemo.collections.tts.models import MagpieTTSModel
    except Exception as e:  # ImportError, or NeMo's own import-time failures
        raise BadInput(f"--source nemo needs NeMo 3.0.0 (pip install '.[nemo]'): {type(e).__name__}: {e}") from None
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
                   help='JSON: {"default": {"atol":..,"rtol":..}, "per_name": {glob: {...}}}, or a policy name of '
                        "parity.tolerances (parity, fixtures, steps); default: the per-dtype defaults")
    p.add_argument("--names", nargs="+", metavar="GLOB", help="only compare tensors whose name matches a glob")
    p.add_argument("--intersect", action="store_true",
                   help="compare only tensors both dumps hold (an engine dump is a subset of a reference dump); "
                        "the others are listed but do not fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None, help="comparison threads (default: min(2, cpus))")
    p.add_argument("--max-rows", type=int, default=60, help="per-tensor rows in the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no table on stdout")


def run_compare(args: argparse.Namespace) -> int:
    """Exit 0: every tensor within tolerance; 1: a mismatch; 2: bad input (missing/corrupt/truncated file,
    incompatible manifests, bad tolerance file, bad arguments)."""
    tolerance_file = args.tolerances if args.tolerances and os.path.lexists(args.tolerances) else None
    separate({"dump a": args.a, "dump b": args.b, "--tolerances": tolerance_file},
             {"--json": args.json, "--plot": args.plot})

    json_kind, png_kind = _report_kinds()
    if args.json and args.json != "-":
        output_file(args.json, "--json", json_kind)
    if args.plot:
        output_file(args.plot, "--plot", png_kind)

    from parity.compare import compare_dumps
    from parity.report import format_table, plot, to_json
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
    report = to_json(result)
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    if not args.quiet and args.json != "-":
        print(format_table(result, max_rows=args.max_rows))
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


# -------------------------------------------------------------------------------------------------- dump


def configure_dump(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt (--source nemo: .nemo)")
    p.add_argument("--batch", required=True, help="safetensors file holding NeMo's batch keys")
    p.add_argument("--out", required=True, help="dump folder to create")
    p.add_argument("--source", choices=["reference", "nemo"], default="reference")
    p.add_argument("--mode", choices=["teacher-forced", "infer"], default="teacher-forced")
    p.add_argument("--use-cfg", action="store_true", help="infer mode: classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="infer mode: torch.manual_seed before decoding")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="infer mode: NeMo inference_parameters field")
    p.add_argument("--layers", action="store_true", help="infer mode: also dump every layer each step")
    p.add_argument("--kv-cache", choices=list(KV_CACHE), default="checkpoint",
                   help="reference infer mode: decoding path (engines always cache: use 'on' to line steps up)")
    p.add_argument("--codec", help="--source nemo: codec .nemo (default: the recorded path, or beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run_dump(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint, "--batch": args.batch, "--codec": args.codec}, {"--out": args.out})
    import torch

    output_dir(args.out, "--out", args.overwrite, replaces=DUMP_FOLDER)
    batch = load_batch(args.batch)
    params = parse_assignments(args.param, "--param")
    teacher_forced = args.mode == "teacher-forced"
    inputs = infer_inputs(batch)
    if args.source == "reference":
        from parity.reference_capture import dump_reference_infer, dump_reference_process_batch

        model = load_reference(args.checkpoint)
        check_batch_fits(batch if teacher_forced else inputs, model.config, args.batch, args.checkpoint,
                         require_audio=teacher_forced)
        if not teacher_forced:
            check_params(model.config, params)
        with user_errors(), writing(args.out, "--out"):
            if teacher_forced:
                dump_reference_process_batch(model, batch, args.out, overwrite=args.overwrite)
            else:
                dump_reference_infer(model, inputs, args.out, use_cfg=args.use_cfg, seed=args.seed,
                                     capture_layers=args.layers, overwrite=args.overwrite,
                                     progress=sys.stderr.isatty(), use_kv_cache=KV_CACHE[args.kv_cache], **params)
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


# ------------------------------------------------------------------------------------------------- infer


def configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt")
    p.add_argument("--inputs", required=True, help="safetensors with text, text_lens, context_audio_codes, context_audio_codes_lens")
    p.add_argument("--out", required=True, help="safetensors file to write predicted_codes and predicted_codes_lens to")
    p.add_argument("--use-cfg", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache", choices=list(KV_CACHE), default="checkpoint",
                   help="decoding path (default: the checkpoint's use_kv_cache_for_inference, as NeMo)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="NeMo inference_parameters field, e.g. topk=1")
    p.add_argument("--dump", metavar="DIR", help="also write every step's captured tensors to this dump (a new folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def run_infer(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint, "--inputs": args.inputs}, {"--out": args.out, "--dump": args.dump})

    output_file(args.out, "--out", CODES_FILE)
    if args.dump:
        output_dir(args.dump, "--dump", overwrite_flag=None)
    import torch
    from safetensors.torch import save

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
    data = save({"predicted_codes": out.predicted_codes.cpu().contiguous(),
                 "predicted_codes_lens": out.predicted_codes_lens.cpu().contiguous()},
                metadata={"format": CODES_FORMAT})
    write_output_file(args.out, "--out", data, CODES_FILE)
    print(f"wrote {args.out}: codes {tuple(out.predicted_codes.shape)}, lengths {out.predicted_codes_lens.tolist()}",
          file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- diagnose


def configure_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", help="engine dump in canonical form (e.g. from 'magpie-parity ingest-trtllm')")
    p.add_argument("--checkpoint", required=True, help="the .nemo/.ckpt the engine was converted from")
    p.add_argument("--batch", required=True, help="safetensors with the inputs the engine ran on")
    p.add_argument("--cfg", choices=["dump", "on", "off"], default="dump", help="CFG setting (default: from the dump's layout)")
    p.add_argument("--tolerance", type=float,
                   help="max |dlogit| accepted (default: parity.tolerances.DIAGNOSE for the dump's dtype)")
    p.add_argument("--codes", help="safetensors with the engine's predicted_codes (default: the dump's own)")


def run_diagnose(args: argparse.Namespace) -> int:
    from trt.diagnose import DiagnoseError, diagnose

    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise BadInput(f"--tolerance must be a finite number > 0, got {args.tolerance}")
    batch = infer_inputs(load_batch(args.batch))
    codes = load_batch(args.codes, "--codes").get("predicted_codes") if args.codes else None
    if args.codes and codes is None:
        raise BadInput(f"--codes {args.codes}: no 'predicted_codes' tensor")
    model = load_reference(args.checkpoint)
    check_batch_fits(batch, model.config, args.batch, args.checkpoint, require_audio=False)
    use_cfg = {"dump": None, "on": True, "off": False}[args.cfg]
    with user_errors(DiagnoseError, ValueError):
        d = diagnose(model, args.dump, batch, use_cfg=use_cfg, tolerance=args.tolerance, codes=codes)
    print(d.report())
    return EXIT_OK if d.explained or (not d.explanation and d.baseline.max_abs <= d.tolerance) else EXIT_MISMATCH
