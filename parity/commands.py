"""``magpie-parity`` sub-commands that run models: ``check`` (the main job), ``dump`` and ``infer``.

They are registered by :func:`register` (called from ``parity.cli``); heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The bundled fixtures live in the checkout; a non-editable install finds them from the working directory.
DEFAULT_FIXTURES = next((p for p in (REPO / "fixtures" / "data", Path.cwd() / "fixtures" / "data") if p.is_dir()),
                        REPO / "fixtures" / "data")


def _bad(msg: str):
    from parity.cli import BadInput

    return BadInput(msg)


def _load_batch(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise _bad(f"{p}: no such batch file")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(f"{p}: not a readable safetensors batch ({e})") from None


def _load_reference(path: str, device: str = "cpu", dtype: str = "float32"):
    import torch

    from reference import CheckpointError, ConfigError, MagpieTTS

    try:
        model = MagpieTTS.from_nemo(path)
    except (CheckpointError, ConfigError) as e:
        raise _bad(str(e)) from None
    return model.to(device=device, dtype=getattr(torch, dtype))


def _load_nemo(path: str, codec: str | None):
    try:
        from nemo.collections.tts.models import MagpieTTSModel
    except Exception as e:  # ImportError, or NeMo's own import-time failures
        raise _bad(f"--source nemo needs NeMo 3.0.0 (pip install '.[nemo]'): {type(e).__name__}: {e}") from None
    cfg = MagpieTTSModel.restore_from(path, return_config=True, map_location="cpu")
    codec_path = Path(codec) if codec else Path(cfg.codecmodel_path)
    if not codec and not codec_path.is_absolute():  # a recorded relative path is relative to the archive's folder
        codec_path = Path(path).resolve().parent / codec_path
    if not codec_path.exists():
        beside = Path(path).resolve().parent / codec_path.name
        if not beside.exists():
            raise _bad(f"{path}: its codec {cfg.codecmodel_path} is not found; pass --codec PATH")
        codec_path = beside
    cfg.codecmodel_path = str(codec_path)
    model = MagpieTTSModel.restore_from(path, override_config_path=cfg, map_location="cpu")
    return model.eval()


def _params(pairs: list[str] | None) -> dict[str, Any]:
    """``--param topk=1 --param apply_prior_to_layers=[1,2]`` -> dict (values parsed as JSON when they parse)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise _bad(f"--param {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------- check


def _configure_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixtures", default=str(DEFAULT_FIXTURES), help="folder of <case>.nemo, <case>.batch.safetensors, <case>.nemo_dump")
    p.add_argument("--cases", nargs="+", help="cases to check (default: every <case>.nemo_dump in --fixtures)")
    p.add_argument("--plot", metavar="DIR", help="write <case>.png error plots here")
    p.add_argument("--layers", action="store_true", help="print every tensor, not only the summary per case")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = the bit-reproducible setting)")


def _run_check(args: argparse.Namespace) -> int:
    """Run the reference on each bundled NeMo-made model and compare every capture point with NeMo's dump."""
    import torch

    from parity.compare import compare_dumps
    from parity.dump import DumpError
    from parity.reference_capture import dump_reference_process_batch
    from parity.report import format_table, plot

    torch.set_num_threads(args.threads)
    fx = Path(args.fixtures)
    cases = args.cases or sorted(p.name[: -len(".nemo_dump")] for p in fx.glob("*.nemo_dump"))
    if not cases:
        raise _bad(f"{fx}: no <case>.nemo_dump folders found")
    rows, all_ok = [], True
    per_layer: dict[str, dict] = {}
    order: list[str] = []
    with tempfile.TemporaryDirectory(prefix="magpie-parity-check-") as tmp:
        for case in cases:
            ckpt, batch_path, nemo_dump = fx / f"{case}.nemo", fx / f"{case}.batch.safetensors", fx / f"{case}.nemo_dump"
            for need in (ckpt, batch_path, nemo_dump):
                if not need.exists():
                    raise _bad(f"{need}: missing (case {case})")
            model = _load_reference(str(ckpt))
            ref_dump = Path(tmp) / f"{case}.reference_dump"
            dump_reference_process_batch(model, _load_batch(str(batch_path)), ref_dump)
            try:
                res = compare_dumps(ref_dump, nemo_dump, progress=False)
            except DumpError as e:
                raise _bad(str(e)) from None
            if args.layers:
                print(f"\n== {case}")
                print(format_table(res, max_rows=10_000))
            if args.plot:
                Path(args.plot).mkdir(parents=True, exist_ok=True)
                plot(res, str(Path(args.plot) / f"{case}.png"))
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
    return 0 if all_ok else 1


# -------------------------------------------------------------------------------------------------- dump


def _configure_dump(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt")
    p.add_argument("--batch", required=True, help="safetensors file holding NeMo's batch keys")
    p.add_argument("--out", required=True, help="dump folder to create")
    p.add_argument("--source", choices=["reference", "nemo"], default="reference")
    p.add_argument("--mode", choices=["teacher-forced", "infer"], default="teacher-forced")
    p.add_argument("--use-cfg", action="store_true", help="infer mode: classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="infer mode: torch.manual_seed before decoding")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="infer mode: NeMo inference_parameters field")
    p.add_argument("--layers", action="store_true", help="infer mode: also dump every layer each step")
    p.add_argument("--kv-cache", choices=["checkpoint", "on", "off"], default="checkpoint",
                   help="reference infer mode: decoding path (engines always cache: use 'on' to line steps up)")
    p.add_argument("--codec", help="--source nemo: codec .nemo (default: the recorded path, or beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true")


def _run_dump(args: argparse.Namespace) -> int:
    import torch

    batch = _load_batch(args.batch)
    params = _params(args.param)
    infer_inputs = {k: v for k, v in batch.items() if k.startswith(("text", "context"))}
    if args.source == "reference":
        from parity.reference_capture import dump_reference_infer, dump_reference_process_batch

        model = _load_reference(args.checkpoint)
        if args.mode == "teacher-forced":
            dump_reference_process_batch(model, batch, args.out, overwrite=args.overwrite)
        else:
            kv = {"checkpoint": None, "on": True, "off": False}[args.kv_cache]
            dump_reference_infer(model, infer_inputs, args.out, use_cfg=args.use_cfg, seed=args.seed,
                                 capture_layers=args.layers, overwrite=args.overwrite, progress=True,
                                 use_kv_cache=kv, **params)
    else:
        from parity.nemo_capture import dump_nemo_infer, dump_nemo_process_batch

        model = _load_nemo(args.checkpoint, args.codec)
        with torch.no_grad():
            if args.mode == "teacher-forced":
                dump_nemo_process_batch(model, batch, args.out, overwrite=args.overwrite)
            else:
                dump_nemo_infer(model, infer_inputs, args.out, use_cfg=args.use_cfg, seed=args.seed,
                                capture_layers=args.layers, overwrite=args.overwrite, **params)
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------- infer


def _configure_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=".nemo or .ckpt")
    p.add_argument("--inputs", required=True, help="safetensors with text, text_lens, context_audio_codes, context_audio_codes_lens")
    p.add_argument("--out", required=True, help="safetensors file to write predicted_codes and predicted_codes_lens to")
    p.add_argument("--use-cfg", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache", choices=["checkpoint", "on", "off"], default="checkpoint",
                   help="decoding path (default: the checkpoint's use_kv_cache_for_inference, as NeMo)")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="NeMo inference_parameters field, e.g. topk=1")
    p.add_argument("--dump", metavar="DIR", help="also write every step's captured tensors to this dump")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _run_infer(args: argparse.Namespace) -> int:
    import os

    import torch
    from safetensors.torch import save_file

    from reference.inference import InferenceError

    batch = {k: v.to(args.device) for k, v in _load_batch(args.inputs).items() if k.startswith(("text", "context"))}
    model = _load_reference(args.checkpoint, args.device, args.dtype)
    kv = {"checkpoint": None, "on": True, "off": False}[args.kv_cache]
    params = _params(args.param)
    try:
        if args.dump:
            from parity.reference_capture import dump_reference_infer

            out = dump_reference_infer(model, batch, args.dump, use_cfg=args.use_cfg, seed=args.seed, capture_layers=True,
                                       progress=True, use_kv_cache=kv, **params)
        else:
            torch.manual_seed(args.seed)
            out = model.infer_batch(batch, use_cfg=args.use_cfg, use_kv_cache=kv, progress=True, **params)
    except (InferenceError, ValueError) as e:
        raise _bad(str(e)) from None
    tmp = args.out + ".tmp"
    save_file({"predicted_codes": out.predicted_codes.cpu().contiguous(),
               "predicted_codes_lens": out.predicted_codes_lens.cpu().contiguous()}, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: codes {tuple(out.predicted_codes.shape)}, lengths {out.predicted_codes_lens.tolist()}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- diagnose


def _configure_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("dump", help="engine dump in canonical form (e.g. from 'magpie-parity ingest-trtllm')")
    p.add_argument("--checkpoint", required=True, help="the .nemo/.ckpt the engine was converted from")
    p.add_argument("--batch", required=True, help="safetensors with the inputs the engine ran on")
    p.add_argument("--cfg", choices=["dump", "on", "off"], default="dump", help="CFG setting (default: from the dump's layout)")
    p.add_argument("--tolerance", type=float, help="max |dlogit| accepted (default from the dump's dtype)")
    p.add_argument("--codes", help="safetensors with the engine's predicted_codes (default: the dump's own)")


def _run_diagnose(args: argparse.Namespace) -> int:
    from parity.dump import DumpError
    from trt.diagnose import DiagnoseError, diagnose

    model = _load_reference(args.checkpoint)
    batch = {k: v for k, v in _load_batch(args.batch).items() if k.startswith(("text", "context"))}
    use_cfg = {"dump": None, "on": True, "off": False}[args.cfg]
    codes = _load_batch(args.codes).get("predicted_codes") if args.codes else None
    if args.codes and codes is None:
        raise _bad(f"{args.codes}: no 'predicted_codes' tensor")
    try:
        d = diagnose(model, args.dump, batch, use_cfg=use_cfg, tolerance=args.tolerance, codes=codes)
    except (DumpError, DiagnoseError, ValueError) as e:
        raise _bad(str(e)) from None
    print(d.report())
    return 0 if d.explained or (not d.explanation and d.baseline.max_abs <= d.tolerance) else 1


def register(add_subcommand) -> None:
    add_subcommand("diagnose", _configure_diagnose, _run_diagnose,
                   help="which known TensorRT-LLM behaviours explain an engine dump, and where the rest starts")
    add_subcommand("check", _configure_check, _run_check,
                   help="the main job: reference vs NeMo's dumps on the bundled fixture models, layer by layer")
    add_subcommand("dump", _configure_dump, _run_dump, help="capture a reference or live-NeMo run into a dump")
    add_subcommand("infer", _configure_infer, _run_infer, help="autoregressive inference with the reference")
