"""Write a TensorRT-LLM ``tllm_debug`` tree (C++ executor layout) from a canonical KV-cached infer dump.

The inverse of ``trt.ingest`` for what an engine exports: used by ``magpie-parity emulate --debug-tree`` (a tree of
the reference run under an emulated engine policy, so the walkthrough can ingest it) and by the tests. What is
written is the reference's own numbers in the engine's layout; no engine produced them.

Layout (trt/ingest.py reads it back): ``<root>/tllm_debug/PP_1/TP_1/iteration_<k>/<name>.npy``, one iteration per
decoding step (every request in every iteration, contexts at iteration 0), ``request_ids`` 0..B-1, per sequence
``host_request_types`` and ``host_context_lengths``; packed ``[num_tokens, hidden]`` activations (the prompt's
rows in the context iteration, one row per sequence after), CFG as (cond, uncond) sequence pairs. Every prompt is
the reference's padded prompt, ``T`` rows long (the reference pads contexts to the batch's longest; a real engine
does not pad, see ``EnginePolicy.unpadded_requests``), so the round trip is exact. The decoder engine's
``encoder_output`` input (each sequence's valid text rows; zeros for the unconditional ones, as the fork feeds
them) comes from ``encoder.norm_out``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from parity.names import NameMap, UnknownNameError

DEFAULT_GENERATION = "fork_c6ff2312"  # the generation with per-layer decoder debug outputs
UINT64_MAX = 2**64 - 1
CONTEXT, GENERATION = 0, 1


class DebugTreeError(ValueError):
    """The dump cannot be written as a debug tree (no per-step decoder layers, no KV cache)."""


def exported_names(names, generation: str = DEFAULT_GENERATION) -> dict[str, tuple[str, str]]:
    """debug name -> (canonical name, layout) for the decoder tensors ``generation`` exports among ``names``."""
    nm = NameMap()
    out = {}
    for name in names:
        try:
            trt, info = nm.from_canonical(name, generation)
        except (KeyError, UnknownNameError):
            continue
        if info.engine == "decoder" and not info.add_positions:
            out[trt] = (name, info.layout)
    return out


def write_debug_tree(dump, root: str | os.PathLike, *, generation: str = DEFAULT_GENERATION,
                     use_cfg: Optional[bool] = None) -> Path:
    """``dump``: a DumpReader or path of a KV-cached infer dump with layers (``capture_layers=True``). Writes
    ``root/tllm_debug`` and returns it."""
    from parity.dump import DumpReader

    ref = dump if isinstance(dump, DumpReader) else DumpReader(dump)
    layout = ref.layout or {}
    if not layout.get("use_kv_cache", False):
        raise DebugTreeError(f"{ref.path}: not a KV-cached run (an engine caches: step 0 is the prompt, then one "
                             "frame a step)")
    if use_cfg is None:
        use_cfg = bool(layout.get("use_cfg", False))
    exp = exported_names(ref.names(), generation)
    if "decoder_layer_0_output" not in exp:
        raise DebugTreeError(f"{ref.path}: holds no per-step decoder layers (dump them with the layers captured)")
    steps = sorted({e.step for e in ref.entries if e.step is not None and e.name == "decoder.layers.0"})
    enc = ref.load("encoder.norm_out").numpy()
    B = enc.shape[0]
    text_lens = [int(n) for n in (enc != 0).any(-1).sum(-1)]
    n_cfg = 2 if use_cfg else 1
    seqs = [(b, ci) for b in range(B) for ci in range(n_cfg)]  # per request: cond, then uncond
    leaf = Path(root) / "tllm_debug" / "PP_1" / "TP_1"
    for it, s in enumerate(steps):
        d = leaf / f"iteration_{it}"
        d.mkdir(parents=True)
        np.save(d / "request_ids.npy", np.arange(B, dtype=np.uint64))
        np.save(d / "host_request_types.npy", np.full(len(seqs), CONTEXT if it == 0 else GENERATION, np.int32))
        prompt = ref.load("decoder.layers.0", steps[0]).shape[1]
        np.save(d / "host_context_lengths.npy", np.full(len(seqs), prompt, np.int32))
        for trt, (canon, lay) in exp.items():
            val = ref.load("final_proj" if canon == "logits" else canon, s).numpy()
            rows = [val[b + ci * B, -1:] if lay == "last_token" else val[b + ci * B] for b, ci in seqs]
            np.save(d / f"{trt}.npy", np.concatenate(rows, axis=0))
        if it == 0:
            np.save(d / "encoder_input_lengths.npy", np.array([text_lens[b] for b, _ci in seqs], np.int32))
            np.save(d / "encoder_output.npy", np.concatenate(
                [enc[b, :text_lens[b]] if ci == 0 else np.zeros_like(enc[b, :text_lens[b]]) for b, ci in seqs]))
    return Path(root) / "tllm_debug"
