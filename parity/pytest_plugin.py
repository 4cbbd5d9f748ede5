"""pytest plugin (entry point ``pytest11``): parity tests for your own MagpieTTS checkpoint in a few lines.

    # test_my_model.py
    def test_my_checkpoint_matches_nemo(magpie_reference, nemo_dump, parity_compare):
        result = parity_compare(magpie_reference, nemo_dump)   # runs the reference on the dump's batch
        assert result, result.report

Options: ``--nemo-ckpt PATH`` (.nemo/.ckpt), ``--nemo-dump DIR`` (a ``magpie-parity dump --source nemo``
folder; its batch is read from ``--parity-batch`` or ``<dump>/../<name>.batch.safetensors``), ``--engine-dir``
(a TensorRT-LLM engine folder), ``--parity-tolerances FILE|NAME`` (JSON policy, or a policy name of
``parity.tolerances``; default ``parity``). Markers: ``nemo``, ``gpu``,
``trtllm``: tests carrying them are skipped, with the reason, when the backend is missing.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("magpie-parity")
    g.addoption("--nemo-ckpt", default=None, help="MagpieTTS .nemo or .ckpt to test")
    g.addoption("--nemo-dump", default=None, help="dump folder written by 'magpie-parity dump --source nemo'")
    g.addoption("--parity-batch", default=None, help="safetensors batch the NeMo dump was made from")
    g.addoption("--engine-dir", default=None, help="TensorRT-LLM engine folder (encoder/ and decoder/)")
    g.addoption("--parity-tolerances", default=None,
                help="JSON tolerance policy file, or a policy name of parity.tolerances, for parity_compare "
                     "(default: parity)")


def pytest_configure(config):
    for line in (
        "nemo: needs the NeMo oracle (nemo-toolkit 3.0.0); skipped when it is not installed",
        "gpu: needs a CUDA GPU; skipped without one",
        "trtllm: needs TensorRT-LLM and a built engine (--engine-dir); skipped without them",
    ):
        config.addinivalue_line("markers", line)


def _nemo_missing() -> str | None:
    if importlib.util.find_spec("nemo") is None:
        return "NeMo is not installed (pip install 'magpie-parity[nemo]')"
    try:
        import nemo.collections.tts.models  # noqa: F401
    except Exception as e:  # NeMo's import can fail on missing optional deps
        return f"NeMo does not import here: {type(e).__name__}: {e}"
    return None


def _gpu_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU available"


def _trtllm_missing(config) -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed (it has no usable PyPI package; use NVIDIA's container)"
    if not config.getoption("--engine-dir"):
        return "no --engine-dir given"
    return None


def pytest_collection_modifyitems(config, items):
    cache: dict[str, str | None] = {}
    checks = {"nemo": _nemo_missing, "gpu": _gpu_missing, "trtllm": lambda: _trtllm_missing(config)}
    for item in items:
        for marker, check in checks.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in cache:
                cache[marker] = check()
            if cache[marker]:
                item.add_marker(pytest.mark.skip(reason=f"[{marker}] {cache[marker]}"))


@pytest.fixture(scope="session")
def magpie_reference(pytestconfig):
    """The reference model loaded from ``--nemo-ckpt`` (skips when the option is absent)."""
    path = pytestconfig.getoption("--nemo-ckpt")
    if not path:
        pytest.skip("no --nemo-ckpt given")
    from reference import MagpieTTS

    return MagpieTTS.from_nemo(path)


@pytest.fixture(scope="session")
def nemo_dump(pytestconfig):
    """A :class:`parity.dump.DumpReader` over ``--nemo-dump`` (skips when the option is absent)."""
    path = pytestconfig.getoption("--nemo-dump")
    if not path:
        pytest.skip("no --nemo-dump given")
    from parity.dump import DumpReader

    return DumpReader(path)


@pytest.fixture(scope="session")
def parity_policy(pytestconfig):
    """The tolerance policy of ``parity_compare``: ``--parity-tolerances`` (a JSON file or a policy name of
    :mod:`parity.tolerances`), by default the policy ``"parity"`` (float32 reference vs NeMo)."""
    from parity.tolerances import load_policy

    return load_policy(pytestconfig.getoption("--parity-tolerances"), default="parity")


@dataclass
class ParityOutcome:
    result: object  # parity.compare.DumpCompareResult
    report: str

    def __bool__(self) -> bool:
        return bool(self.result)


@pytest.fixture
def parity_compare(pytestconfig, parity_policy):
    """``parity_compare(model, nemo_dump, batch=None) -> ParityOutcome``: run the reference teacher-forced on the
    dump's batch, compare every tensor the NeMo dump holds, and return the result with a printable report."""

    def run(model, dump, batch=None) -> ParityOutcome:
        from safetensors.torch import load_file

        from parity.compare import compare_dumps
        from parity.reference_capture import dump_reference_process_batch
        from parity.report import format_table

        if batch is None:
            path = pytestconfig.getoption("--parity-batch")
            if path is None:
                name = Path(dump.path).name.replace(".nemo_dump", "")
                path = Path(dump.path).parent / f"{name}.batch.safetensors"
            batch = load_file(str(path))
        with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
            ref = dump_reference_process_batch(model, batch, Path(tmp) / "reference")
            result = compare_dumps(ref, dump, policy=parity_policy, progress=False)
        return ParityOutcome(result, format_table(result))

    return run
