"""Capture a live NeMo ``MagpieTTSModel`` through forward hooks into magpie-parity's dump format.

This is the "dump NeMo tensors" utility: it runs NVIDIA's own code and records, under the reference's canonical
names (parity/names.py), what NeMo's modules returned. NeMo is imported lazily by the caller; nothing here
imports it, so this module loads anywhere.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch


def _nemo_capture_points(model) -> list[tuple[str, object, Callable, str]]:
    """(canonical name, NeMo module, output selector, hook kind "fwd"/"pre") in execution order, all taken from the
    name table (``parity.names.nemo_hook_points``): the module path, and how the tensor is picked from the hook."""
    from parity.names import nemo_hook_points

    kinds = {"forward": "fwd", "forward_pre": "pre"}
    return [(name, model.get_submodule(p.module), p.pick, kinds[p.hook])
            for name, p in nemo_hook_points(len(model.encoder.layers), len(model.decoder.layers))]


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


def dump_nemo_process_batch(model, batch: dict[str, torch.Tensor], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Run NeMo's teacher-forced ``process_batch`` under hooks and write every capture point to a dump."""
    from parity.dump import DumpWriter
    from parity.names import nemo_return_points

    model.eval()
    inputs = {k: list(v.shape) for k, v in batch.items()}
    with DumpWriter(out_dir, source="nemo", dtype="float32", inputs=inputs,
                    layout={"mode": "teacher-forced", "tensors": "B,T,... as NeMo's modules return them"},
                    meta={"nemo_class": type(model).__name__}, overwrite=overwrite) as writer:
        with torch.no_grad(), NemoCapture(model, lambda n, t, s: writer.add(n, t, step=s)):
            out = model.process_batch(batch)
        for name, point in nemo_return_points():  # 'logits': NeMo's return value, not a module's
            writer.add(name, point.pick(out), step=None)
    return Path(out_dir)


def dump_nemo_infer(model, batch: dict[str, torch.Tensor], out_dir: str | Path, *, use_cfg: bool, seed: int,
                    capture_layers: bool = False, overwrite: bool = False, infer_kwargs: dict | None = None,
                    **params):
    """Run NeMo's ``infer_batch`` and record, per decoding step, what the reference must reproduce.

    Per step k: ``logits`` (B, 1, C*V) the CFG-combined logits before NeMo's in-place sampling edits,
    ``inference.attn_prior`` (rows, 1, T_text) the prior built at step k (used at k+1), and
    ``inference.attended_text_position`` (B,) int64. With ``capture_layers`` every layer's tensors are captured
    too (use it with the recompute path, where each step's tensors are whole sequences). Returns NeMo's output.
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
    with DumpWriter(out_dir, source="nemo", dtype="float32", inputs=inputs, overwrite=overwrite,
                    layout={"mode": "infer", "use_cfg": use_cfg, "seed": seed,
                            "use_local_transformer_for_inference": bool((infer_kwargs or {}).get(
                                "use_local_transformer_for_inference", False)),
                            "use_kv_cache": bool(model.use_kv_cache_for_inference),
                            "params": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in
                                       vars(model.inference_parameters).items()}}) as writer:
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
            if step["k"] not in recorded:
                writer.add("logits", logits[:, None].clone(), step=step["k"])
                recorded.add(step["k"])
            return orig_sample(logits, *a, **kw)

        def attend(*a, **kw):
            attended, counter = orig_attend(*a, **kw)
            writer.add("inference.attended_text_position", torch.tensor(attended[:B], dtype=torch.long), step=step["k"])
            return attended, counter

        def prior(*a, **kw):
            res = orig_prior(*a, **kw)
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
