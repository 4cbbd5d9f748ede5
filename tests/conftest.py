"""Shared test fixtures: the bundled NeMo-made models, batches and dumps under fixtures/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # fastpath/kernels.py's Triton kernels run under Triton's interpreter on the CPU; triton.language reads this
    # when it is first imported, so it is set before any test module (or torch) imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _plugin_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "magpie_parity" for ep in entry_points(group="pytest11"))


# The plugin (markers nemo/gpu/trtllm and their skips) is active through its entry point once the package is
# installed; from a bare checkout, load it here instead.
pytest_plugins = ["pytester"] + ([] if _plugin_installed() else ["parity.pytest_plugin"])

REPO = Path(__file__).resolve().parent.parent
import sys  # noqa: E402

sys.path.insert(0, str(REPO / "fixtures"))  # make_fixtures' pure helpers (single_item, make_batch) need no NeMo
FIXTURES = REPO / "fixtures" / "data"
CASES = ["released_small", "bidir_encoder", "multihead_xattn", "decoder_kernel3", "four_codebooks", "stacked_lt"]
# decoder_ce, as users download it (fixtures/make_fixtures.py DCE_CASES): context encoder, baked speakers, MaskGit
DCE_CASES = ["dce_context", "dce_baked_v2607", "dce_baked_v2602", "dce_maskgit"]

# Parity runs compare float32 results bit-for-bit where the op order is the same; keep the CPU math
# deterministic and single-threaded so BLAS blocking does not vary with the machine's core count.
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def load_batch(case: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / f"{case}.batch.safetensors"))


def infer_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k.startswith(("text", "context", "speaker"))}


@pytest.fixture
def repo_cwd(monkeypatch) -> Path:
    """Run the test from the repository root (CLI tests pass repo-relative fixture paths, as the docs do)."""
    monkeypatch.chdir(REPO)
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "provenance.json").exists():
        pytest.fail(f"bundled fixtures missing under {FIXTURES}; run fixtures/make_fixtures.py")
    return FIXTURES


_models: dict[str, object] = {}


def reference_model(case: str):
    """One reference model per case per session (loading is cheap, but tests call this often)."""
    from reference import MagpieTTS

    if case not in _models:
        _models[case] = MagpieTTS.from_nemo(FIXTURES / f"{case}.nemo")
    return _models[case]


def nemo_available() -> bool:
    try:
        import nemo.collections.tts.models  # noqa: F401
    except Exception:
        return False
    return True
