"""``trtllm-build`` command lines for a converted MagpieTTS checkpoint, checked before anything runs.

Profiles:

``seed``
    The fork README's two builds, flag for flag (rmittal-github/TensorRT-LLM examples/t5tts/README.md @c6ff2312,
    anand-nv examples/models/contrib/t5tts/README.md): encoder ``--max_batch_size 256 --max_input_len 128``,
    decoder ``--max_batch_size 64 --max_input_len 192 --max_seq_len 512 --max_encoder_input_len 512``, float16
    gemm / bert-attention / gpt-attention plugins, ``--remove_input_padding enable``,
    ``--use_paged_context_fmha enable``, ``--moe_plugin disable``, ``--max_beam_width 1``; the encoder build also
    passes ``--paged_kv_cache enable`` (the README's decoder build relies on trtllm-build's default). It needs a
    float16 checkpoint (``convert_checkpoint(..., dtype="float16")``).
``parity``
    The seed settings with plugin dtypes ``auto`` (= the checkpoint dtype, so a float32 checkpoint builds a
    float32 engine), a small batch and ``--paged_kv_cache enable`` stated for both engines.

``debug_output=True`` adds ``--enable_debug_output`` (every ``register_network_output`` tensor becomes an engine
output; the engine is then not bit-identical to the production build, trtllm.md 1.1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

COMPONENTS = ("encoder", "decoder")

_COMMON_SEED = {
    "moe_plugin": "disable",
    "max_beam_width": 1,
    "gemm_plugin": "float16",
    "bert_attention_plugin": "float16",
    "gpt_attention_plugin": "float16",
    "remove_input_padding": "enable",
    "use_paged_context_fmha": "enable",
}

PROFILES: dict[str, dict[str, dict[str, object]]] = {
    "seed": {
        "encoder": {"paged_kv_cache": "enable", **_COMMON_SEED, "max_batch_size": 256, "max_input_len": 128},
        "decoder": {**_COMMON_SEED, "max_batch_size": 64, "max_input_len": 192, "max_seq_len": 512,
                    "max_encoder_input_len": 512},
    },
    "parity": {
        "encoder": {"paged_kv_cache": "enable", **_COMMON_SEED, "gemm_plugin": "auto", "bert_attention_plugin": "auto",
                    "gpt_attention_plugin": "auto", "max_batch_size": 8, "max_input_len": 128},
        "decoder": {"paged_kv_cache": "enable", **_COMMON_SEED, "gemm_plugin": "auto", "bert_attention_plugin": "auto",
                    "gpt_attention_plugin": "auto", "max_batch_size": 8, "max_input_len": 192, "max_seq_len": 512,
                    "max_encoder_input_len": 128},
    },
}

# The trtllm-build options an override may set (others are refused, so a typo cannot silently do nothing).
KNOWN_FLAGS = {
    "max_batch_size", "max_input_len", "max_seq_len", "max_encoder_input_len", "max_beam_width", "max_num_tokens",
    "gemm_plugin", "bert_attention_plugin", "gpt_attention_plugin", "moe_plugin", "remove_input_padding",
    "paged_kv_cache", "context_fmha", "use_paged_context_fmha", "tokens_per_block", "workers", "log_level",
    "enable_debug_output", "multiple_profiles", "use_fused_mlp", "kv_cache_type", "strongly_typed",
}
_PLUGIN_FLAGS = ("gemm_plugin", "bert_attention_plugin", "gpt_attention_plugin")


class BuildConfigError(ValueError):
    """The build settings cannot work with this checkpoint or workload; the message names the flag."""


class BackendUnavailable(RuntimeError):
    """``trtllm-build`` is not installed here (TensorRT-LLM is needed to build engines)."""


class BuildError(RuntimeError):
    """``trtllm-build`` ran and failed."""


@dataclass(frozen=True)
class Workload:
    """The longest request an engine must serve: text tokens, context frames, generated frames."""

    text_len: int
    context_frames: int
    output_frames: int


# The benchmark workload of the seed (trt.benchmark_data defaults).
SEED_WORKLOAD = Workload(text_len=128, context_frames=160, output_frames=480)


def _read_config(ckpt_dir: Path, comp: str) -> dict:
    p = ckpt_dir / comp / "config.json"
    if not p.is_file() or p.is_symlink():
        raise BuildConfigError(f"{p}: missing or not a regular file (convert the checkpoint first: "
                               "magpie-parity convert --checkpoint MODEL.nemo --out CKPT_DIR)")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise BuildConfigError(f"{p}: {p.stat().st_size} bytes is too large for a converted config.json")
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BuildConfigError(f"{p}: not UTF-8 text (not a converted config.json)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise BuildConfigError(f"{p}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise BuildConfigError(f"{p}: a JSON {type(cfg).__name__}, not the object a converted config.json holds")
    return cfg


MAX_CONFIG_BYTES = 16 * 2**20  # a converted config.json is a few KB


def resolve_settings(profile: Union[str, dict], debug_output: bool = False, **overrides) -> dict[str, dict]:
    """Profile + overrides -> {component: {flag: value}}.

    An override ``flag=value`` applies to every component whose profile has the flag (or to both when neither
    has it); ``encoder_flag=value`` / ``decoder_flag=value`` applies to one component. ``value=None`` removes it.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise BuildConfigError(f"unknown build profile {profile!r}; known: {sorted(PROFILES)}")
        base = PROFILES[profile]
    else:
        base = profile
    settings = {c: dict(base.get(c, {})) for c in COMPONENTS}
    for key, value in overrides.items():
        comps: Sequence[str] = COMPONENTS
        flag = key
        for c in COMPONENTS:
            if key.startswith(c + "_"):
                comps, flag = (c,), key[len(c) + 1:]
        if flag not in KNOWN_FLAGS:
            raise BuildConfigError(f"unknown trtllm-build option {flag!r} (from override {key!r}); known: {sorted(KNOWN_FLAGS)}")
        targets = [c for c in comps if flag in settings[c]] or list(comps)
        if flag in ("max_encoder_input_len",) and comps == COMPONENTS:
            targets = ["decoder"]
        for c in targets:
            if value is None:
                settings[c].pop(flag, None)
            else:
                settings[c][flag] = value
    if debug_output:
        for c in COMPONENTS:
            settings[c]["enable_debug_output"] = True
    return settings


def validate(settings: dict[str, dict], enc_cfg: dict, dec_cfg: dict, workload: Optional[Workload] = None) -> None:
    """Raise :class:`BuildConfigError` naming the flag when the settings cannot serve this model/workload."""
    e, d = settings["encoder"], settings["decoder"]
    for comp, s in settings.items():
        for flag in ("max_batch_size", "max_input_len", "max_seq_len", "max_encoder_input_len", "max_beam_width"):
            if flag in s and (not isinstance(s[flag], int) or isinstance(s[flag], bool) or s[flag] < 1):
                raise BuildConfigError(f"{comp}: --{flag} must be a positive integer, got {s[flag]!r}")
        cfg = enc_cfg if comp == "encoder" else dec_cfg
        dtype = cfg.get("dtype")
        if not isinstance(dtype, str):
            raise BuildConfigError(f"{comp}/config.json: dtype must be a string such as 'float32', got {dtype!r}")
        for flag in _PLUGIN_FLAGS:
            v = s.get(flag)
            if v not in (None, "auto", "disable") and v != dtype:
                raise BuildConfigError(
                    f"{comp}: --{flag} {v} but the checkpoint dtype is {dtype}; convert with dtype={v!r} or use "
                    "'auto' (the checkpoint dtype)")
        if s.get("max_beam_width", 1) != 1:
            raise BuildConfigError(f"{comp}: --max_beam_width must be 1 (the multi-vocab fork has no beam search)")
    for comp, s, cfg in (("encoder", e, enc_cfg), ("decoder", d, dec_cfg)):
        if "max_input_len" not in s:
            raise BuildConfigError(f"{comp}: --max_input_len is required")
    enc_pos, dec_pos = _positions(enc_cfg, "encoder"), _positions(dec_cfg, "decoder")
    if enc_pos is not None and e["max_input_len"] > enc_pos:
        raise BuildConfigError(
            f"encoder: --max_input_len {e['max_input_len']} exceeds the encoder's max_position_embeddings {enc_pos} "
            f"(pass --set encoder_max_input_len={enc_pos})")
    if "max_seq_len" not in d:
        raise BuildConfigError("decoder: --max_seq_len is required")
    if d["max_input_len"] > d["max_seq_len"]:
        raise BuildConfigError(f"decoder: --max_input_len {d['max_input_len']} > --max_seq_len {d['max_seq_len']}")
    if dec_pos is not None and d["max_seq_len"] > dec_pos:
        raise BuildConfigError(
            f"decoder: --max_seq_len {d['max_seq_len']} exceeds the decoder's max_position_embeddings {dec_pos} "
            f"(pass --set max_seq_len={dec_pos}, and max_input_len / max_encoder_input_len within it)")
    if "max_encoder_input_len" not in d:
        raise BuildConfigError("decoder: --max_encoder_input_len is required for the cross-attention inputs")
    if d["max_encoder_input_len"] < e["max_input_len"]:
        raise BuildConfigError(
            f"decoder: --max_encoder_input_len {d['max_encoder_input_len']} < encoder --max_input_len "
            f"{e['max_input_len']}: the decoder could not attend to every encoder output")
    ours = dec_cfg.get("magpie_parity")
    baked = ours.get("baked_context_frames") if isinstance(ours, dict) else None
    if isinstance(baked, int) and not isinstance(baked, bool) and baked > 0:
        # a baked-speaker checkpoint fixes its prompt: the speaker's frames (at most the table's) + the BOS position
        if d["max_input_len"] < baked + 1:
            raise BuildConfigError(
                f"decoder: --max_input_len {d['max_input_len']} < the baked speakers' {baked} context frames + the BOS "
                f"position = {baked + 1} (pass --set decoder_max_input_len={baked + 1})")
        if d["max_seq_len"] < baked + 2:
            raise BuildConfigError(
                f"decoder: --max_seq_len {d['max_seq_len']} leaves no room to generate after a {baked + 1}-position "
                f"prompt (pass --set max_seq_len=N with N > {baked + 1}: the prompt + the decoder steps to generate)")
    if workload is not None:
        w = workload
        if e["max_input_len"] < w.text_len:
            raise BuildConfigError(f"encoder: --max_input_len {e['max_input_len']} < longest text {w.text_len} tokens")
        if d["max_encoder_input_len"] < w.text_len:
            raise BuildConfigError(
                f"decoder: --max_encoder_input_len {d['max_encoder_input_len']} < longest text {w.text_len} tokens")
        need_in = w.context_frames + 1
        if d["max_input_len"] < need_in:
            raise BuildConfigError(
                f"decoder: --max_input_len {d['max_input_len']} < context frames + 1 = {need_in}")
        need_seq = w.context_frames + 1 + w.output_frames
        if d["max_seq_len"] < need_seq:
            raise BuildConfigError(
                f"decoder: --max_seq_len {d['max_seq_len']} < context frames + 1 + generated frames = {need_seq}")


def _positions(cfg: dict, comp: str) -> Optional[int]:
    v = cfg.get("max_position_embeddings")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise BuildConfigError(f"{comp}/config.json: max_position_embeddings must be a positive integer, got {v!r}")
    return v


def _flags(s: dict) -> list[str]:
    out = []
    for k, v in s.items():
        if v is True and k == "enable_debug_output":
            out.append(f"--{k}")
        else:
            out += [f"--{k}", str(v)]
    return out


def build_commands(ckpt_dir, engine_dir, profile: Union[str, dict] = "seed", debug_output: bool = False,
                   workload: Optional[Workload] = None, **overrides) -> list[list[str]]:
    """The encoder and decoder ``trtllm-build`` argument lists (encoder first), validated against the
    converted ``config.json`` files (and ``workload`` when given)."""
    ckpt_dir, engine_dir = Path(ckpt_dir), Path(engine_dir)
    enc_cfg, dec_cfg = _read_config(ckpt_dir, "encoder"), _read_config(ckpt_dir, "decoder")
    settings = resolve_settings(profile, debug_output, **overrides)
    validate(settings, enc_cfg, dec_cfg, workload)
    return [["trtllm-build", "--checkpoint_dir", str(ckpt_dir / c), "--output_dir", str(engine_dir / c),
             *_flags(settings[c])] for c in COMPONENTS]


def run_build(ckpt_dir, engine_dir, profile: Union[str, dict] = "seed", debug_output: bool = False,
              workload: Optional[Workload] = None, **overrides) -> list[list[str]]:
    """Run the two builds. Raises :class:`BackendUnavailable` where ``trtllm-build`` is not on the PATH
    (checked after validation, so bad settings are reported even here)."""
    cmds = build_commands(ckpt_dir, engine_dir, profile, debug_output, workload, **overrides)
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise BackendUnavailable(
            "trtllm-build is not on the PATH: install TensorRT-LLM (the t5tts fork) to build engines; "
            "build_commands() gives the command lines to run elsewhere")
    Path(engine_dir).mkdir(parents=True, exist_ok=True)
    for cmd in cmds:
        proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-4000:]
            raise BuildError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    return cmds
