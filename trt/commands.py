"""``magpie-parity`` commands of the TensorRT-LLM side: ``convert``, ``build``, ``ingest-trtllm``, ``bench-data``.
Each is a ``configure_<name>(parser)`` and ``run_<name>(args) -> exit status`` pair listed in ``parity.cli``'s
command table; heavy imports happen inside each command. User errors (missing/corrupt files, bad settings,
TensorRT-LLM missing for ``build --run``) raise :class:`parity.cli_support.BadInput`: exit 2 with one line naming
the file or flag; a failing ``trtllm-build`` exits 1."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from parity.cli_support import (
    DUMP_FOLDER,
    EXIT_MISMATCH,
    EXIT_OK,
    BadInput,
    Replaceable,
    check_replaceable_file,
    empty_folder,
    output_dir,
    output_file,
    parse_assignments,
    read_codes,
    separate,
    write_output_file,
    writing,
)


def _is_converted_or_empty(p: Path) -> bool:
    from trt.convert import is_converted

    return is_converted(p) or empty_folder(p)


# What convert --overwrite replaces: what trt.convert.write_converted itself accepts, checked before the work.
CONVERTED_FOLDER: Replaceable = ("a checkpoint magpie-parity converted or an empty folder", _is_converted_or_empty)
_DATASET_HEAD = re.compile(rb'\A\s*\{\s*"metadata"\s*:\s*\{')


def is_dataset_json(path: Path) -> bool:
    """A benchmark dataset JSON (``{"metadata": {...}, "samples": [...]}``, bench-data's and prepare_benchmark.py's
    format), recognised from its first bytes: what ``bench-data --out`` replaces."""
    from parity.files import read_head

    head = read_head(path, 256)
    return head is not None and _DATASET_HEAD.match(head) is not None


DATASET_FILE: Replaceable = ("a benchmark dataset JSON (bench-data's format)", is_dataset_json)


# ------------------------------------------------------------------------------------------------ convert


def configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="NeMo MagpieTTS .nemo or Lightning .ckpt")
    p.add_argument("--out", required=True, metavar="DIR", help="TensorRT-LLM checkpoint folder to write")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--tp-size", type=int, default=1, metavar="N")
    p.add_argument("--drop-lm-head-bias", action="store_true",
                   help="drop final_proj.bias as the fork's converter does (the engine then differs from NeMo)")
    p.add_argument("--without-local-transformer", action="store_true",
                   help="convert the decoder of a checkpoint with a local transformer alone (the forks' decoder engine "
                        "has none; the engine then samples as NeMo with use_local_transformer_for_inference=False)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run_convert(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint}, {"--out": args.out})
    from reference.checkpoint import CheckpointError, read_checkpoint
    from reference.config import ConfigError, MagpieConfig
    from trt.convert import (OUTSIDE_ENGINE_FILE, ConversionError, context_kind, convert_state_dict, fork_deviations,
                             outside_engine_parts, write_converted)

    if args.tp_size < 1:
        raise BadInput(f"--tp-size must be >= 1, got {args.tp_size}")
    output_dir(args.out, "--out", args.overwrite, replaces=CONVERTED_FOLDER)
    try:
        raw = read_checkpoint(args.checkpoint)
        where = str(raw.path)
        cfg = MagpieConfig.from_nemo(raw.config, raw.state_dict, where=where)
        conv = convert_state_dict(cfg, raw.state_dict, dtype=args.dtype, tp_size=args.tp_size,
                                  drop_lm_head_bias=args.drop_lm_head_bias, where=where,
                                  without_local_transformer=args.without_local_transformer)
    except (CheckpointError, ConfigError, ConversionError) as exc:
        raise BadInput(str(exc).replace("without_local_transformer=True", "--without-local-transformer")) from None
    from safetensors import SafetensorError

    with writing(args.out, "--out"):
        try:
            out = write_converted(conv, args.out, overwrite=args.overwrite)
        except ConversionError as exc:  # the folder appeared meanwhile
            raise BadInput(str(exc).replace("overwrite=True", "--overwrite")) from None
        except SafetensorError as exc:  # safetensors' writer reports a full disk as its own error, not an OSError
            why = str(exc).partition("I/O error: ")[2]
            if not why:
                raise
            raise BadInput(f"--out {args.out}: cannot write: {why}") from None
    print(f"wrote {out} (encoder/, decoder/; dtype {args.dtype}, tp {args.tp_size}"
          f"{', lm_head bias dropped' if args.drop_lm_head_bias else ''})")
    devs = fork_deviations(cfg)
    conv_devs = []
    if cfg.final_proj_bias and not args.drop_lm_head_bias:
        conv_devs.append("final_proj.bias kept as lm_head.bias (has_lm_head_bias: true); the fork's converter drops "
                         "it (--drop-lm-head-bias reproduces that)")
    elif cfg.final_proj_bias:
        devs.append("final_proj.bias dropped as the fork's converter does: the engine's logits lack NeMo's bias")
    kind = context_kind(cfg)
    if kind != "codes":
        print(f"decoder_ce ({'baked speaker table' if kind == 'baked' else 'context encoder'}): the engine takes the "
              "context prefix as decoder_context_features (use_context_embeddings: true); the runner feeds the "
              "reference's decoder_context rows and the BOS-frame embedding, with dummy zero ids")
    parts = outside_engine_parts(cfg)
    if parts:
        print(f"kept beside the engine for the reference: {', '.join(parts)} -> {out / OUTSIDE_ENGINE_FILE}")
    if cfg.local_transformer is not None:
        print(f"differs from NeMo's default sampling: the {cfg.local_transformer_type} local transformer is not in the "
              "engine (--without-local-transformer): it samples every codebook on its own, as NeMo with "
              "use_local_transformer_for_inference=False")
    for d in conv_devs:
        print(f"differs from the fork's converter: {d}")
    if devs:
        print("checkpoint vs the fork's hard-coded model (the engine will not match NeMo here):")
        for d in devs:
            print(f"  - {d}")
    else:
        print("checkpoint vs the fork's hard-coded model: no differences found")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ build


def configure_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-dir", required=True, metavar="DIR", help="converted checkpoint (magpie-parity convert)")
    p.add_argument("--engine-dir", required=True, metavar="DIR", help="where trtllm-build writes encoder/ decoder/")
    p.add_argument("--profile", default="seed", choices=["seed", "parity"])
    p.add_argument("--debug-output", action="store_true", help="add --enable_debug_output")
    p.add_argument("--run", action="store_true", help="run trtllm-build (needs TensorRT-LLM) instead of printing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a trtllm-build flag (decoder_KEY / encoder_KEY for one engine; VALUE none removes)")


def _cli_words(msg: str) -> str:
    """trt.build's messages name its Python arguments; on the command line the user runs commands."""
    msg = re.sub(r"convert with dtype='(\w+)'", r"convert with 'magpie-parity convert --dtype \1'", msg)
    return re.sub(r"--(\w+_plugin) (\S+) but (.*) or use 'auto'", r"--\1 \2 but \3 or pass --set \1=auto", msg)


def run_build(args: argparse.Namespace) -> int:
    separate({"--ckpt-dir": args.ckpt_dir}, {"--engine-dir": args.engine_dir})
    from trt.build import BackendUnavailable, BuildConfigError, BuildError, build_commands
    from trt.build import run_build as build_engines

    overrides = {}
    for key, value in parse_assignments(args.set, "--set").items():
        # trtllm-build spells booleans as the words given (enable/disable mostly): JSON true/false stay words
        overrides[key.replace("-", "_")] = str(value).lower() if isinstance(value, bool) else value
    ckpt = Path(args.ckpt_dir)
    for comp in ("encoder", "decoder"):
        cfg = ckpt / comp / "config.json"
        if not cfg.is_file():
            raise BadInput(f"--ckpt-dir {cfg}: missing; convert the checkpoint first: "
                           f"magpie-parity convert --checkpoint CKPT --out {ckpt}")
    try:
        cmds = build_commands(args.ckpt_dir, args.engine_dir, args.profile, args.debug_output, **overrides)
    except BuildConfigError as exc:
        raise BadInput(_cli_words(str(exc))) from None
    for cmd in cmds:
        print(shlex.join(cmd))
    if args.run:
        if shutil.which("trtllm-build") is None:
            raise BadInput("trtllm-build is not on the PATH: install TensorRT-LLM (the t5tts fork) to build engines, "
                           "or run the commands printed above where it is installed")
        output_dir(args.engine_dir, "--engine-dir", overwrite=None)
        try:
            with writing(args.engine_dir, "--engine-dir"):
                build_engines(args.ckpt_dir, args.engine_dir, args.profile, args.debug_output, **overrides)
        except BackendUnavailable as exc:
            raise BadInput(str(exc)) from None
        except BuildError as exc:
            print(f"magpie-parity build: {exc}", file=sys.stderr)
            return EXIT_MISMATCH
        print(f"built {args.engine_dir}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ ingest


def configure_ingest(p: argparse.ArgumentParser) -> None:
    from parity.names import GENERATIONS

    p.add_argument("tree", metavar="TREE", help="tllm_debug folder (or its parent, a PP_*/TP_* folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="canonical dump to write")
    p.add_argument("--generation", choices=list(GENERATIONS), default=None,
                   help="engine generation (default: detected from the tensor names)")
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--cfg", dest="use_cfg", action="store_const", const=True, default=None,
                     help="rows come in (cond, uncond) pairs (default: detected for C++ executor trees)")
    cfg.add_argument("--no-cfg", dest="use_cfg", action="store_const", const=False)
    p.add_argument("--cfg-scale", type=float, default=None, help="with CFG, also write the combined logits")
    p.add_argument("--batch-size", type=int, default=None, help="expected number of requests (checked)")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="the .nemo/.ckpt the engine was converted from: its config hash is recorded, so compare "
                        "refuses the dump against a dump of another model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _checkpoint_config(path: str):
    """The reference config of a checkpoint (its hash is what the reference's dumps of it record), or one line."""
    from reference.checkpoint import CheckpointError, read_checkpoint
    from reference.config import ConfigError, MagpieConfig

    try:
        raw = read_checkpoint(path)
        return MagpieConfig.from_nemo(raw.config, raw.state_dict, where=str(path))
    except (CheckpointError, ConfigError) as e:
        raise BadInput(f"--checkpoint {e}" if str(path) not in str(e) else str(e)) from None


def run_ingest(args: argparse.Namespace) -> int:
    separate({"TREE": args.tree, "--checkpoint": args.checkpoint}, {"--out": args.out})
    from parity.dump import DumpError, DumpReader
    from trt.ingest import IngestError, ingest_trtllm

    output_dir(args.out, "--out", args.overwrite, replaces=DUMP_FOLDER)
    config = _checkpoint_config(args.checkpoint) if args.checkpoint else None
    config_hash = config.hash() if config is not None else None
    try:
        with writing(args.out, "--out"):
            out = ingest_trtllm(args.tree, args.out, generation=args.generation, batch_size=args.batch_size,
                                use_cfg=args.use_cfg, cfg_scale=args.cfg_scale, overwrite=args.overwrite,
                                config_hash=config_hash)
        d = DumpReader(out)
    except (IngestError, DumpError) as exc:
        raise BadInput(str(exc).replace("overwrite=True", "--overwrite")) from None
    steps = sorted({e.step for e in d.entries if e.step is not None})
    m = d.meta
    S = config.frame_stacking_factor if config is not None else 1
    frames = f" (decoder steps of {S} frames: {len(steps) * S} frames)" if S > 1 and steps else ""
    print(f"wrote {out}: {len(d)} tensors, {len(d.names())} names, steps {steps[:1]}..{steps[-1:]}{frames} "
          f"({m['tree_layout']} tree, generation {m['generation']}, requests {m['request_ids']}, {m['cfg']})")
    by_reason: dict[str, list[str]] = {}
    for name, why in sorted(m["skipped"].items()):
        by_reason.setdefault(str(why), []).append(name)
    for why, names in by_reason.items():  # each with its reason: an engine property, not a failure of the ingest
        print(f"not ingested: {', '.join(names)}: {why}")
    if m["partial_steps"]:
        print(f"steps left out (not every request had a row): {m['partial_steps']}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ bench-data


def configure_bench(p: argparse.ArgumentParser) -> None:
    # defaults (None) are the seed benchmark's, filled in by run_bench: the table imports no torch to parse
    p.add_argument("--out", required=True, metavar="FILE", help="prepare_benchmark.py-style JSON to write")
    p.add_argument("--samples", type=int, default=None, help="default: the seed benchmark's")
    p.add_argument("--text-len", type=int, default=None, help="default: the seed benchmark's")
    p.add_argument("--context-frames", type=int, default=None, help="default: the seed benchmark's")
    p.add_argument("--output-frames", type=int, default=None, help="default: the seed benchmark's")
    p.add_argument("--checkpoint", metavar="CKPT", default=None,
                   help="take codebooks, vocabulary and text ids from this checkpoint (default: the fork's defaults); "
                        "a decoder_ce checkpoint gives input_feat/context_feat samples (the reference's encoder "
                        "output and context prefix + BOS row)")
    p.add_argument("--speakers", default=None, metavar="K,K,...",
                   help="decoder_ce with baked speakers: the speaker indices, cycled over the samples (default: all)")
    p.add_argument("--seed", type=int, default=0)


def run_bench(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint}, {"--out": args.out})
    output_file(args.out, "--out", DATASET_FILE)
    speakers = None
    if args.speakers is not None:
        try:
            speakers = [int(k) for k in args.speakers.split(",")]
        except ValueError:
            raise BadInput(f"--speakers {args.speakers!r}: expected comma-separated speaker indices") from None
        if not args.checkpoint:
            raise BadInput("--speakers needs --checkpoint (a decoder_ce checkpoint with baked speakers)")
    from trt.benchmark_data import (SEED_CONTEXT_FRAMES, SEED_NUM_SAMPLES, SEED_OUTPUT_FRAMES, SEED_TEXT_LEN,
                                    BenchmarkDataError, decoder_ce_dataset, generate_dataset, read_dataset,
                                    write_dataset)

    for name, seed in (("samples", SEED_NUM_SAMPLES), ("text_len", SEED_TEXT_LEN),
                       ("context_frames", SEED_CONTEXT_FRAMES), ("output_frames", SEED_OUTPUT_FRAMES)):
        if getattr(args, name) is None:
            setattr(args, name, seed)
    config = raw = None
    if args.checkpoint:
        from reference.checkpoint import CheckpointError, read_checkpoint
        from reference.config import ConfigError, MagpieConfig

        try:
            raw = read_checkpoint(args.checkpoint)
            config = MagpieConfig.from_nemo(raw.config, raw.state_dict, where=str(raw.path))
        except (CheckpointError, ConfigError) as exc:
            raise BadInput(str(exc)) from None
        if speakers is not None and not config.baked:
            raise BadInput(f"--speakers: {args.checkpoint} bakes no speakers (model_type {config.model_type}"
                           f"{', context encoder' if config.context_encoder is not None else ''})")
    try:
        if config is not None and config.model_type == "decoder_ce":
            from reference.batch import BatchError
            from reference.checkpoint import CheckpointError
            from reference.model import MagpieTTS

            try:
                model = MagpieTTS.from_state_dict(raw.config, raw.state_dict, where=str(raw.path))
                ds = decoder_ce_dataset(model, args.samples, args.text_len, args.context_frames, args.output_frames,
                                        speakers=speakers, seed=args.seed)
            except (CheckpointError, BatchError) as exc:
                raise BadInput(str(exc)) from None
        else:
            ds = generate_dataset(args.samples, args.text_len, args.context_frames, args.output_frames,
                                  config=config, seed=args.seed)
        if os.path.lexists(args.out):
            check_replaceable_file(args.out, "--out", DATASET_FILE)
        with writing(args.out, "--out"):
            path = write_dataset(ds, args.out)
        back = read_dataset(path)
    except (ValueError, BenchmarkDataError) as exc:
        raise BadInput(str(exc)) from None
    kind = f"input_feat dim {back.feature_dim}" if back.feature_dim else "input_ids"
    if back.metadata.get("model_type") == "decoder_ce":
        kind += f" + context_feat ({back.metadata['context']}, conditional rows: context prefix + BOS row)"
    print(f"wrote {path}: {len(back.samples)} samples, {kind}, num_vocabs {back.num_vocabs}, "
          f"audio_vocab_size {back.audio_vocab_size}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ emulate


def configure_emulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="NeMo MagpieTTS .nemo or Lightning .ckpt")
    p.add_argument("--batch", required=True, metavar="B.safetensors", help="the inputs (NeMo's batch keys)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="dump of the emulated run (every step's logits, its codes; with --layers or --debug-tree every "
                        "layer), its layout recording the policy and that it is an emulation")
    p.add_argument("--engine", action="append", default=[], metavar="BEHAVIOUR=VALUE",
                   help="an engine behaviour of trt/engine.py's EnginePolicy (multi_block_mode=true, prior=kernel, "
                        "cfg_prompt=zeros, lm_head_bias=false, encoder=bidirectional, packed_encoder_conv=true, "
                        "dtype=float16, kernel_prior.first_focus=4, ...); default: NeMo's behaviour, KV-cached as "
                        "engines decode (kv_cache=true)")
    p.add_argument("--use-cfg", action="store_true", help="classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before decoding")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="a NeMo inference_parameters field")
    p.add_argument("--layers", action="store_true", help="also dump every layer each step")
    p.add_argument("--debug-tree", metavar="DIR",
                   help="also write DIR/tllm_debug: the run as a TensorRT-LLM C++ executor debug tree (generation "
                        "fork_c6ff2312, every prompt the reference's padded one), for ingest-trtllm")
    p.add_argument("--codes-out", metavar="CODES.safetensors",
                   help="also write the run's predicted_codes and predicted_codes_lens (infer --out's format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out dump")


def run_emulate(args: argparse.Namespace) -> int:
    separate({"--checkpoint": args.checkpoint, "--batch": args.batch},
             {"--out": args.out, "--debug-tree": args.debug_tree, "--codes-out": args.codes_out})
    from parity.cli_support import (check_batch_fits, infer_inputs, load_batch, load_reference, user_errors,
                                    write_output_file)
    from parity.commands import CODES_FILE, check_params, codes_metadata

    settings = parse_assignments(args.engine, "--engine")
    settings.setdefault("kv_cache", True)
    from trt.engine import EMULATED_NOTE, dump_engine_emulation, policy_from_settings

    try:
        policy = policy_from_settings(settings)
    except ValueError as exc:
        raise BadInput(f"--engine: {exc}") from None
    if args.debug_tree is not None:
        if not policy.kv_cache:
            raise BadInput("--debug-tree needs a KV-cached run (an engine's steps: the prompt, then one frame a step); "
                           "drop --engine kv_cache=false")
        if policy.unpadded_requests:
            raise BadInput("--debug-tree with --engine unpadded_requests=true: the emulation decodes every request "
                           "alone and captures no layers; drop one of them")
        output_dir(args.debug_tree, "--debug-tree", overwrite=None)
        if os.path.lexists(Path(args.debug_tree) / "tllm_debug"):
            raise BadInput(f"--debug-tree {args.debug_tree}: already holds a tllm_debug folder (name a new folder)")
    output_dir(args.out, "--out", args.overwrite, replaces=DUMP_FOLDER)
    if args.codes_out:
        output_file(args.codes_out, "--codes-out", CODES_FILE)
    params = parse_assignments(args.param, "--param")
    batch = infer_inputs(load_batch(args.batch))
    model = load_reference(args.checkpoint)
    check_batch_fits(batch, model.config, args.batch, args.checkpoint, require_audio=False)
    check_params(model.config, params)
    layers = args.layers or args.debug_tree is not None
    with user_errors(), writing(args.out, "--out"):
        out = dump_engine_emulation(model, batch, args.out, policy, use_cfg=args.use_cfg, seed=args.seed,
                                    capture_layers=layers, overwrite=args.overwrite, progress=sys.stderr.isatty(),
                                    **params)
    emulated = ", ".join(f"{k}={v}" for k, v in settings.items()) or "none"
    S = model.config.frame_stacking_factor
    cut = ", cut where EOS fired" if out.predicted_codes.shape[2] < out.num_steps * S else ""
    stacked = f" ({out.num_steps} decoder steps of {S} frames{cut})" if S > 1 else ""
    print(f"wrote {args.out}: EMULATED engine ({EMULATED_NOTE}); behaviours: {emulated}; codes "
          f"{tuple(out.predicted_codes.shape)}{stacked}, lengths {out.predicted_codes_lens.tolist()}")
    if model.config.model_type == "decoder_ce":
        print("decoder_ce: the prompt is the decoder_context rows + the BOS-frame embedding, as the engine takes "
              "decoder_context_features" + (" (CFG's unconditional rows: zeros everywhere, the zero service token)"
                                            if args.use_cfg and policy.cfg_prompt == "zeros" else
                                            " (CFG's unconditional rows: NeMo's zero prefix, BOS kept)"
                                            if args.use_cfg else ""))
    if args.codes_out:
        from safetensors.torch import save

        from reference.inference import resolve_parameters

        meta = codes_metadata(resolve_parameters(model.config.inference, **params).max_decoder_steps,
                              emulated=EMULATED_NOTE, engine=emulated, seed=str(args.seed))
        data = save({"predicted_codes": out.predicted_codes.cpu().contiguous(),
                     "predicted_codes_lens": out.predicted_codes_lens.cpu().contiguous()}, metadata=meta)
        write_output_file(args.codes_out, "--codes-out", data, CODES_FILE)
        print(f"wrote {args.codes_out}: the emulated engine's codes")
    if args.debug_tree is not None:
        from trt.debug_tree import write_debug_tree

        with writing(args.debug_tree, "--debug-tree"):
            tree = write_debug_tree(args.out, args.debug_tree)
            (Path(args.debug_tree) / "EMULATED.txt").write_text(
                f"Written by magpie-parity emulate from {args.out}: {EMULATED_NOTE}.\nBehaviours: {emulated}\n")
        scale = ""
        if args.use_cfg:
            from reference.inference import resolve_parameters

            cfg_scale = resolve_parameters(model.config.inference, **params).cfg_scale
            scale = f" --cfg-scale {cfg_scale}"
        print(f"wrote {tree}: a TensorRT-LLM debug tree of the emulated run (ingest it: magpie-parity ingest-trtllm "
              f"{tree} --out DUMP --checkpoint {args.checkpoint}{scale})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ closed-loop


def configure_closed_loop(p: argparse.ArgumentParser) -> None:
    p.add_argument("codes", nargs="+", metavar="ENGINE REF",
                   help="pairs of codes: the engine's, then the reference's of the same inputs and seed (a codes file "
                        "as infer --out / emulate --codes-out write it, or a dump holding predicted_codes); several "
                        "pairs (seeds) give the distribution of first-divergence steps")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="the model (its frame stacking turns frames into decoder steps; needed by --dump)")
    p.add_argument("--dump", metavar="ENGINE_DUMP",
                   help="then replay: the engine's dump (per-step logits, e.g. from ingest-trtllm); the reference is "
                        "teacher-forced with the first pair's engine codes under every known engine behaviour "
                        "(diagnose), and, where the dump holds layers, the first layer beyond tolerance at the first "
                        "divergence step is named")
    p.add_argument("--batch", metavar="B.safetensors", help="with --dump: the inputs the engine ran on")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="with --dump: a NeMo inference_parameters field the engine ran with (default: the dump's "
                        "layout params, else the checkpoint's)")
    p.add_argument("--cfg", choices=["dump", "on", "off"], default="dump",
                   help="with --dump: CFG setting (default: from the dump's layout)")
    p.add_argument("--tolerances", metavar="FILE|NAME",
                   help="with --dump: the tolerance policy for the layers (e.g. a calibrated file); default: the "
                        "per-dtype defaults")
    p.add_argument("--json", metavar="OUT",
                   help="also write the closed-loop report (per item and the summary) as JSON ('-' for stdout)")


def run_closed_loop(args: argparse.Namespace) -> int:
    if len(args.codes) % 2:
        raise BadInput(f"closed-loop takes pairs ENGINE REF: {len(args.codes)} codes files given")
    if args.dump is not None and (args.checkpoint is None or args.batch is None):
        raise BadInput("--dump (the teacher-forced replay) needs --checkpoint and --batch")
    extra = {"--param": args.param, "--tolerances": args.tolerances}
    used = [flag for flag, v in extra.items() if v] + (["--cfg"] if args.cfg != "dump" else [])
    if args.dump is None and used:
        raise BadInput(f"{used[0]} is for the replay: give --dump ENGINE_DUMP --batch B too")
    from parity.closed_loop import compare_codes, first_divergence, format_report, is_report_json, to_dict

    json_kind = ("a magpie-parity closed-loop JSON report", is_report_json)
    if args.json and args.json != "-":
        output_file(args.json, "--json", json_kind)

    model = None
    stacking = 1
    if args.checkpoint:
        from parity.cli_support import load_reference

        model = load_reference(args.checkpoint)
        stacking = model.config.frame_stacking_factor
    per_pair, engine_codes = [], []
    pairs = list(zip(args.codes[::2], args.codes[1::2]))
    for k, (e, r) in enumerate(pairs):
        ec, el, e_steps = read_codes(e, "ENGINE")
        rc, rl, r_steps = read_codes(r, "REF")
        engine_codes.append(ec)
        try:
            per_pair.append(compare_codes(ec, el, rc, rl, frame_stacking=stacking, max_steps=(e_steps, r_steps),
                                          run=os.path.basename(e.rstrip("/"))))
        except ValueError as exc:
            raise BadInput(f"{e} vs {r}: {exc}") from None
    items = [i for p in per_pair for i in p]
    text = json.dumps(to_dict(items), indent=1, allow_nan=False) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
    else:
        print(format_report(items))
        if args.json:
            write_output_file(args.json, "--json", text.encode(), json_kind)
    if args.dump is not None:
        first = first_divergence(per_pair[0])
        _replay(args, model, engine_codes[0], None if first is None else first.first.step)
    return EXIT_OK if first_divergence(items) is None else EXIT_MISMATCH


def _replay(args: argparse.Namespace, model, codes, step) -> None:
    """Teacher-forced replay from the engine's codes: diagnose, then the first layer beyond tolerance at ``step``
    (the first pair's first divergence step) where the engine dump holds layers."""
    import tempfile

    from parity.cli_support import check_batch_fits, infer_inputs, load_batch, user_errors
    from parity.commands import diagnose_params, engine_dump_of
    from parity.tolerances import CalibratedPolicy, load_policy
    from trt.diagnose import DiagnoseError, diagnose

    batch = infer_inputs(load_batch(args.batch))
    check_batch_fits(batch, model.config, args.batch, args.checkpoint, require_audio=False)
    reader = engine_dump_of(args.dump, model, args.checkpoint)
    policy = None
    if args.tolerances:
        with user_errors():
            policy = load_policy(args.tolerances, default="")
    params, _ = diagnose_params(model.config, reader, parse_assignments(args.param, "--param"))
    use_cfg = {"dump": None, "on": True, "off": False}[args.cfg]
    steps = sorted(e.step for e in reader.entries if e.name == "logits" and e.step is not None)
    tolerance, why = None, "the default for the dump's precision"
    if isinstance(policy, CalibratedPolicy):  # the logits' noise is measured, not assumed
        bound = policy.largest_envelope("logits", steps)
        if bound is not None:
            tolerance, why = bound, f"the calibrated noise envelope of the logits ({args.tolerances})"
    print()
    print(f"teacher-forced replay from the engine's codes (the first pair's); logit tolerance: {why}")
    with user_errors(DiagnoseError, ValueError):
        d = diagnose(model, reader, batch, use_cfg=use_cfg, codes=codes, params=params, tolerance=tolerance)
    print(d.report())
    if not any(n.startswith(("decoder.layers.", "encoder.layers.")) for n in reader.names()):
        print("(the engine dump holds no layers: no layer to name)")
        return
    from parity.compare import compare_dumps
    from parity.reference_capture import dump_reference_infer

    with tempfile.TemporaryDirectory(prefix="magpie-parity-replay-") as tmp:
        with user_errors():
            dump_reference_infer(model, batch, os.path.join(tmp, "ref"), use_cfg=bool(reader.layout.get(
                "use_cfg", False)) if use_cfg is None else use_cfg, seed=0, capture_layers=True, use_kv_cache=True,
                forced_codes=codes, **{**params, "max_decoder_steps": len(steps)})
            res = compare_dumps(reader, os.path.join(tmp, "ref"), policy, progress=False, intersect=True)
    noise = "calibrated noise" if args.tolerances else "tolerance"
    bad = [t for t in res.tensors if not t.passed]
    if not bad:
        print(f"layers, teacher-forced with the engine's codes (NeMo's behaviour): every tensor within {noise}")
        return
    first = bad[0]
    print(f"layers, teacher-forced with the engine's codes (NeMo's behaviour): first tensor beyond {noise}: "
          f"{first.name} at step {first.step} (max |err| {first.max_abs:.3e}, atol {first.tolerance.atol:.1e})")
    if step is not None:
        at = [t for t in bad if t.step == step]
        if at:
            t = at[0]
            print(f"at the first divergence step {step}: first layer beyond {noise}: {t.name} "
                  f"(max |err| {t.max_abs:.3e}, atol {t.tolerance.atol:.1e})")
        else:
            print(f"at the first divergence step {step}: every layer within {noise}")
