"""Capture a live NeMo ``MagpieTTSModel`` through forward hooks into magpie-parity's dump format.

This is the "dump NeMo tensors" utility: it runs NVIDIA's own code and records, under the reference's canonical
names (parity/names.py), what NeMo's modules returned. NeMo is imported lazily by the caller; nothing here
imports it, so this module loads anywhere.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

# The batch keys of one generate_speech chunk, as recorded (``chunk.<key>``); NeMo reads these and nothing else.
from parity.chunks import CHUNK_KEYS  # one definition, shared with the chunk files


def _nemo_capture_points(model) -> list[tuple[str, object, Callable, str]]:
    """(canonical name, NeMo module, output selector, hook kind "fwd"/"pre") in execution order, all taken from the
    name table (``parity.names.nemo_hook_points``): the module path, and how the tensor is picked from the hook."""
    from parity.names import nemo_hook_points

    kinds = {"forward": "fwd", "forward_pre": "pre"}
    return [(name, model.get_submodule(p.module), p.pick, kinds[p.hook])
            for name, p in nemo_hook_points(len(model.encoder.layers), len(model.decoder.layers),
                                            nemo_context_encoder_layers(model))]


def nemo_context_encoder_layers(model) -> int:
    """The layers of the context encoder a NeMo ``MagpieTTSModel`` runs: ``decoder_ce`` models only, and 0 when
    the speaker context is baked (NeMo still builds the module, randomly initialised, and never calls it)."""
    if getattr(model, "model_type", None) != "decoder_ce" or getattr(model, "has_baked_context_embedding", False):
        return 0
    return len(model.context_encoder.layers)


def nemo_config_hash(model) -> Optional[str]:
    """The reference's config hash of a live NeMo model (what the reference's dumps of the same checkpoint record:
    ``MagpieConfig.from_nemo`` of its config and weights), so ``compare`` refuses dumps of different models; None
    for a model the reference does not build (nothing to check against)."""
    from omegaconf import OmegaConf

    from reference.config import ConfigError, MagpieConfig

    try:
        cfg = OmegaConf.to_container(model.cfg, resolve=True)
        with warnings.catch_warnings():  # NeMo's state_dict warns about its own positional call
            warnings.simplefilter("ignore", FutureWarning)
            state = model.state_dict()
        return MagpieConfig.from_nemo(cfg, state, where=type(model).__name__).hash()
    except ConfigError:
        return None


class NemoCapture:
    """Context manager: hooks on a NeMo MagpieTTSModel that hand (name, tensor, step) to a sink in execution order."""

    def __init__(self, model, sink: Callable[[str, torch.Tensor, Optional[int]], None]):
        self.model = model
        self.sink = sink
        self.step: Optional[int] = None
        self._handles = []

    def __enter__(self):
        for name, module, select, kind in _nemo_capture_points(self.model):
            if kind == "pre":
                def pre(_m, args, _name=name, _sel=select):
                    self.sink(_name, _sel(args).detach().clone(), self.step)

                self._handles.append(module.register_forward_pre_hook(pre))
            else:
                def fwd(_m, _args, out, _name=name, _sel=select):
                    self.sink(_name, _sel(out).detach().clone(), self.step)

                self._handles.append(module.register_forward_hook(fwd))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def dump_nemo_process_batch(model, batch: dict[str, torch.Tensor], out_dir: str | Path, overwrite: bool = False,
                            seed: Optional[int] = None) -> Path:
    """Run NeMo's teacher-forced ``process_batch`` under hooks and write every capture point to a dump.

    ``seed``: ``torch.manual_seed(seed)`` right before the call, recorded as the layout's ``seed``. NeMo draws random
    numbers in ``process_batch`` even in eval mode when the local transformer is MaskGit (``apply_random_mask``:
    ``torch.rand(B, T)`` then ``torch.rand(B, C, T)``); other models draw none and need no seed."""
    from parity.dump import DumpWriter
    from parity.names import nemo_return_points

    model.eval()
    inputs = {k: list(v.shape) for k, v in batch.items()}
    layout = {"mode": "teacher-forced", "tensors": "B,T,... as NeMo's modules return them"}
    if seed is not None:
        layout["seed"] = seed
    with DumpWriter(out_dir, source="nemo", config_hash=nemo_config_hash(model), dtype="float32", inputs=inputs,
                    layout=layout,
                    meta={"nemo_class": type(model).__name__}, overwrite=overwrite) as writer:
        with torch.no_grad(), NemoCapture(model, lambda n, t, s: writer.add(n, t, step=s)):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.process_batch(batch)
        for name, point in nemo_return_points():  # 'logits': NeMo's return value, not a module's
            writer.add(name, point.pick(out), step=None)
    return Path(out_dir)


def _params_json(model) -> dict:
    """``model.inference_parameters`` as JSON values: lists for the layer lists (a restored NeMo model holds them as
    omegaconf ListConfig)."""
    def value(v):
        if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
            return v
        return [int(x) for x in v]

    return {k: value(v) for k, v in vars(model.inference_parameters).items()}


def dump_nemo_infer(model, batch: dict[str, torch.Tensor], out_dir: str | Path, *, use_cfg: bool, seed: int,
                    capture_layers: bool = False, overwrite: bool = False, infer_kwargs: dict | None = None,
                    capture_steps: bool = True, **params):
    """Run NeMo's ``infer_batch`` and record, per decoding step, what the reference must reproduce.

    Per step k: ``logits`` (B, 1, C*V) the CFG-combined logits before NeMo's in-place sampling edits,
    ``inference.attn_prior`` (rows, 1, T_text) the prior built at step k (used at k+1), and
    ``inference.attended_text_position`` (B,) int64. With ``capture_layers`` every layer's tensors are captured
    too (use it with the recompute path, where each step's tensors are whole sequences); with ``capture_steps``
    false only the returned ``predicted_codes`` / ``predicted_codes_lens`` are written. Returns NeMo's output.
    """
    import contextlib
    import io

    from parity.dump import DumpWriter

    model.eval()
    for k, v in params.items():
        setattr(model.inference_parameters, k, v)
    step = {"k": -1}
    orig_forward = model.forward
    orig_sample = model.sample_codes_from_logits
    orig_prior = model.construct_inference_prior
    orig_attend = model.get_most_attended_text_timestep
    B = batch["text"].shape[0]
    inputs = {k: list(v.shape) for k, v in batch.items()}
    with DumpWriter(out_dir, source="nemo", config_hash=nemo_config_hash(model), dtype="float32", inputs=inputs,
                    overwrite=overwrite,
                    layout={"mode": "infer", "use_cfg": use_cfg, "seed": seed,
                            "use_local_transformer_for_inference": bool((infer_kwargs or {}).get(
                                "use_local_transformer_for_inference", False)),
                            "use_kv_cache": bool(model.use_kv_cache_for_inference),
                            "params": _params_json(model),
                            **({} if capture_steps else {"steps": "none (capture_steps=False)"})}) as writer:
        cap = NemoCapture(model, lambda n, t, s: writer.add(n, t, step=s)) if capture_layers else contextlib.nullcontext()

        def forward(*a, **kw):
            step["k"] += 1
            if capture_layers:
                cap.step = step["k"]
            return orig_forward(*a, **kw)

        recorded: set[int] = set()

        def sample(logits, *a, **kw):
            # NeMo calls this once or twice a step (sampled unless a local transformer samples, then argmax);
            # the first call of a step sees the logits before NeMo's in-place edits.
            if capture_steps and step["k"] not in recorded:
                writer.add("logits", logits[:, None].clone(), step=step["k"])
                recorded.add(step["k"])
            return orig_sample(logits, *a, **kw)

        def attend(*a, **kw):
            attended, counter = orig_attend(*a, **kw)
            if capture_steps:
                writer.add("inference.attended_text_position", torch.tensor(attended[:B], dtype=torch.long),
                           step=step["k"])
            return attended, counter

        def prior(*a, **kw):
            res = orig_prior(*a, **kw)
            if capture_steps:
                writer.add("inference.attn_prior", res[0].clone(), step=step["k"])
            return res

        model.forward, model.sample_codes_from_logits = forward, sample
        model.construct_inference_prior, model.get_most_attended_text_timestep = prior, attend
        try:
            torch.manual_seed(seed)
            with cap, contextlib.redirect_stdout(io.StringIO()):
                out = model.infer_batch(batch, use_cfg=use_cfg, **(infer_kwargs or {}))
        finally:
            del model.forward, model.sample_codes_from_logits, model.construct_inference_prior
            del model.get_most_attended_text_timestep
        writer.add("predicted_codes", out.predicted_codes, step=None)
        writer.add("predicted_codes_lens", out.predicted_codes_lens, step=None)
    return out


def dump_nemo_generate_speech(model, chunks: list[dict], out_dir: str | Path, *, use_cfg: bool, seed: int,
                              use_local_transformer_for_inference: bool = True, maskgit: dict | None = None,
                              capture_steps: bool = True, overwrite: bool = False, **params):
    """Run NeMo's chunked ``generate_speech`` over consecutive chunks sharing one ``ChunkState`` and record it.

    ``chunks``: one dict per call, in order, ``{"batch": {...}, "end_of_text": [bool] * B, "beginning_of_text":
    bool}``; ``batch`` holds tensors only (``text``, ``text_lens`` and ``speaker_indices`` (baked speaker table)
    or ``context_audio_codes`` / ``context_audio_codes_lens``), built as NeMo's ``do_tts`` / long-form runner build
    them. ``params`` are set on ``model.inference_parameters`` first (they stay set); ``maskgit`` holds
    ``generate_speech``'s ``maskgit_*`` keyword arguments (without the prefix), used as given.

    The run is NeMo's: ``model.decoder.reset_cache(use_cache=...)`` as the long-form runner does it (the model's
    ``use_kv_cache_for_inference`` for a single chunk, else off), ``chunk_state = model.create_chunk_state(B)``,
    ``torch.manual_seed(seed)`` once before the first chunk (the RNG stream runs on across chunks, as in
    ``do_tts``), then one ``generate_speech`` call per chunk. NeMo edits the caller's batch in place
    (``text_lens``, ``text``); the dump records each chunk's inputs as given, before the call, and NeMo gets copies.

    Written per chunk k (step = k): ``chunk.<key>`` for the batch keys present, ``chunk.end_of_text`` (B,) bool,
    ``chunk.beginning_of_text`` () bool, ``predicted_codes`` / ``predicted_codes_lens`` (NeMo's return value),
    ``inference.chunk_attended_text_positions`` (steps of the chunk, B) int64 (the absolute text position NeMo
    found attended at each decoder step: cheap, and it follows the text windows and priors where the sampled codes
    of a tiny random model hardly do) and, from the second chunk on, ``inference.chunk_initial_prior``. With
    ``capture_steps``, per decoder step g counted over all chunks (step = g; layout ``chunk_steps`` gives each
    chunk's first step and step count): ``logits`` (B, 1, C * V, CFG-combined, before NeMo's in-place sampling
    edits), ``inference.attended_text_position`` (B,) (absolute text positions, as NeMo keeps them) and
    ``inference.attn_prior`` (the prior built at step g for step g + 1). The layout also records ChunkState after
    each chunk (``chunk_states``: left_offset, end_indices, overall_idx, previous_attn_len, window_text_lens).
    Returns NeMo's outputs, one per chunk.
    """
    import contextlib
    import io

    from parity.dump import DumpWriter

    model.eval()
    for k, v in params.items():
        setattr(model.inference_parameters, k, v)
    if not chunks:
        raise ValueError("dump_nemo_generate_speech needs at least one chunk")
    B = int(chunks[0]["batch"]["text"].shape[0])
    use_cache = bool(model.use_kv_cache_for_inference) if len(chunks) == 1 else False
    maskgit = dict(maskgit or {})
    gen_kwargs = {f"maskgit_{k}": v for k, v in maskgit.items()}
    inputs = {f"chunk{k}.{key}": list(v.shape) for k, c in enumerate(chunks) for key, v in c["batch"].items()}
    step = {"g": -1, "chunk": -1}
    chunk_steps: list[list[int]] = []
    chunk_states: list[dict] = []
    layout = {"mode": "generate_speech", "use_cfg": use_cfg, "seed": seed, "n_chunks": len(chunks),
              "use_local_transformer_for_inference": bool(use_local_transformer_for_inference),
              "maskgit": maskgit, "use_kv_cache": use_cache,
              "seeding": "torch.manual_seed(seed) once, before the first chunk",
              "steps": {"chunk.*, predicted_codes, predicted_codes_lens, inference.chunk_initial_prior, "
                        "inference.chunk_attended_text_positions": "chunk index",
                        "logits, inference.attended_text_position, inference.attn_prior":
                        "decoder step counted over all chunks (chunk_steps: [first step, steps] per chunk)"},
              "params": _params_json(model)}
    orig = {name: getattr(model, name) for name in (
        "forward", "sample_codes_from_logits", "construct_inference_prior", "construct_multi_chunk_prior",
        "get_most_attended_text_timestep", "_initialize_chunked_attn_prior")}
    outputs = []
    # The layout is written when the writer opens; chunk_steps / chunk_states are known only at the end, so the
    # run happens first (tensors kept in order) and the dump is written after it.
    records: list[tuple[str, torch.Tensor, int]] = []

    def add(name, t, s):
        records.append((name, t.detach().clone(), s))

    def forward(*a, **kw):
        step["g"] += 1
        return orig["forward"](*a, **kw)

    seen: set[int] = set()

    def sample(logits, *a, **kw):
        if capture_steps and step["g"] not in seen:
            add("logits", logits[:, None], step["g"])
            seen.add(step["g"])
        return orig["sample_codes_from_logits"](logits, *a, **kw)

    chunk_attended: list[list[int]] = []

    def attend(*a, **kw):
        attended, counter = orig["get_most_attended_text_timestep"](*a, **kw)
        positions = [int(x) for x in list(attended)[:B]]
        chunk_attended.append(positions)
        if capture_steps:
            add("inference.attended_text_position", torch.tensor(positions, dtype=torch.long), step["g"])
        return attended, counter

    def prior_first(*a, **kw):
        res = orig["construct_inference_prior"](*a, **kw)
        if capture_steps:
            add("inference.attn_prior", res[0], step["g"])
        return res

    def prior_multi(*a, **kw):
        res = orig["construct_multi_chunk_prior"](*a, **kw)
        if capture_steps:
            add("inference.attn_prior", res[0], step["g"])
        return res

    def initial_prior(*a, **kw):
        res = orig["_initialize_chunked_attn_prior"](*a, **kw)
        if res is not None:
            add("inference.chunk_initial_prior", res, step["chunk"])
        return res

    model.forward, model.sample_codes_from_logits = forward, sample
    model.construct_inference_prior, model.construct_multi_chunk_prior = prior_first, prior_multi
    model.get_most_attended_text_timestep, model._initialize_chunked_attn_prior = attend, initial_prior
    try:
        model.decoder.reset_cache(use_cache=use_cache)
        chunk_state = model.create_chunk_state(B)
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            for k, c in enumerate(chunks):
                step["chunk"] = k
                batch, eot, bot = c["batch"], [bool(x) for x in c["end_of_text"]], bool(c["beginning_of_text"])
                unknown = set(batch) - set(CHUNK_KEYS)
                if unknown:
                    raise ValueError(f"chunk {k}: unexpected batch keys {sorted(unknown)} (known: {CHUNK_KEYS})")
                if len(eot) != B:
                    raise ValueError(f"chunk {k}: end_of_text has {len(eot)} entries for a batch of {B}")
                for key in CHUNK_KEYS:
                    if key in batch:
                        add(f"chunk.{key}", batch[key], k)
                add("chunk.end_of_text", torch.tensor(eot, dtype=torch.bool), k)
                add("chunk.beginning_of_text", torch.tensor(bot, dtype=torch.bool), k)
                first = step["g"] + 1
                chunk_attended.clear()
                out = model.generate_speech({key: v.clone() for key, v in batch.items()}, chunk_state=chunk_state,
                                            end_of_text=eot, beginning_of_text=bot, use_cfg=use_cfg,
                                            use_local_transformer_for_inference=use_local_transformer_for_inference,
                                            **gen_kwargs)
                chunk_steps.append([first, step["g"] + 1 - first])
                add("predicted_codes", out.predicted_codes, k)
                add("predicted_codes_lens", out.predicted_codes_lens, k)
                add("inference.chunk_attended_text_positions",
                    torch.tensor(chunk_attended, dtype=torch.long).reshape(len(chunk_attended), B), k)
                chunk_states.append({
                    "left_offset": [int(x) for x in chunk_state.left_offset],
                    "end_indices": {str(i): int(v) for i, v in sorted(chunk_state.end_indices.items())},
                    "overall_idx": int(chunk_state.overall_idx),
                    "previous_attn_len": [int(x) for x in chunk_state.previous_attn_len],
                    "window_text_lens": [int(x) for x in chunk_state.history_text_lens],
                })
                outputs.append(out)
    finally:
        for name in orig:
            delattr(model, name)
    layout["chunk_steps"] = chunk_steps
    layout["chunk_states"] = chunk_states
    with DumpWriter(out_dir, source="nemo", config_hash=nemo_config_hash(model), dtype="float32", inputs=inputs,
                    overwrite=overwrite, layout=layout,
                    meta={"nemo_class": type(model).__name__}) as writer:
        for name, t, s in records:
            writer.add(name, t, step=s)
    return outputs


def load_nemo_transformer_2501():
    """NeMo's ``nemo.collections.tts.modules.transformer_2501`` (the MagpieTTS encoder/decoder stack) from an
    installed nemo-toolkit wheel, without importing the collection's packages (which pull in Lightning, Hydra, ...):
    enough to run NeMo's own decoder where only the bare wheel is installed (the GPU machine)."""
    import importlib.util

    spec = importlib.util.find_spec("nemo")
    if spec is None:
        raise ImportError("nemo-toolkit is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for name in ("nemo.collections", "nemo.collections.tts", "nemo.collections.tts.modules"):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = mod
    from nemo.collections.tts.modules import transformer_2501

    return transformer_2501


def nemo_decoder(model):
    """NeMo's ``transformer_2501.Transformer`` built with a reference model's decoder config and loaded with its
    decoder weights (NeMo's causal-mask buffers are NeMo's own), on the model's device, eval mode."""
    t2501 = load_nemo_transformer_2501()
    d = model.config.decoder
    dec = t2501.Transformer(
        n_layers=d.n_layers, d_model=d.d_model, d_ffn=d.d_ffn, sa_n_heads=d.sa_n_heads, kernel_size=d.kernel_size,
        p_dropout=0.0, has_xattn=d.has_xattn, xa_d_memory=d.xa_d_memory, xa_n_heads=d.xa_n_heads,
        xa_d_head=d.xa_d_head, is_causal=d.is_causal, apply_norm_to_cond=d.apply_norm_to_cond,
        apply_norm_out=d.apply_norm_out, max_length_causal_mask=d.max_length_causal_mask,
        use_learnable_pos_emb=d.use_learnable_pos_emb,
    )
    missing, unexpected = dec.load_state_dict(model.decoder.state_dict(), strict=False)
    if unexpected or not all(k.endswith("causal_mask") for k in missing):
        raise ValueError(f"NeMo decoder does not take the reference's weights: missing {missing}, unexpected {unexpected}")
    return dec.to(device=next(model.parameters()).device).eval()
