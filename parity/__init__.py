"""magpie-parity: layer-by-layer numerical parity between NeMo MagpieTTS, the PyTorch reference and TensorRT-LLM.

Kept deliberately empty of imports: ``magpie-parity --help`` and ``import parity.names`` must not pay
for torch. Import the submodules you need (``parity.dump``, ``parity.compare``, ``parity.report``).
"""

__version__ = "0.1.0"
