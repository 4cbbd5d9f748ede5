"""The CUDA fast path: :class:`FastDecoder` (static KV cache, CUDA graphs, torch.compile, Triton kernels) decodes
what ``reference.inference.infer_batch(use_kv_cache=True)`` decodes, reusing the reference's prior state machine,
EOS rules, parameter checks and sampling edits. Its Triton kernels (:mod:`fastpath.kernels`) are built on first
use, so importing this package needs no Triton."""

from fastpath.decoder import FastDecoder

__all__ = ["FastDecoder"]
