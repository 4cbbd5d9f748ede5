"""Eager PyTorch MagpieTTS equal to NeMo 3.0.0 layer by layer: the ground truth of magpie-parity.

    from reference import MagpieTTS
    model = MagpieTTS.from_nemo("model.nemo")        # or a Lightning .ckpt; NeMo is not imported
    out = model.process_batch(batch)                  # out["logits"] == NeMo's process_batch(batch)["logits"]
"""

from reference.config import ConfigError, InferenceParameters, MagpieConfig, TransformerConfig
from reference.checkpoint import CheckpointError
from reference.model import BatchError, MagpieTTS

__all__ = [
    "MagpieTTS", "MagpieConfig", "TransformerConfig", "InferenceParameters",
    "ConfigError", "CheckpointError", "BatchError",
]
