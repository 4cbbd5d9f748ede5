"""The pytest plugin: a user's parity test for their own checkpoint in a few lines, and backend skips."""

from __future__ import annotations

from conftest import FIXTURES

USER_TEST = '''
import pytest

def test_my_checkpoint_matches_nemo(magpie_reference, nemo_dump, parity_compare):
    result = parity_compare(magpie_reference, nemo_dump)
    assert result, result.report

@pytest.mark.trtllm
def test_needs_an_engine():
    raise AssertionError("must be skipped without TensorRT-LLM")

@pytest.mark.gpu
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()
'''


def _plugin_args(monkeypatch):
    """Load the plugin from this checkout whether or not the package is installed: the entry-point copy (if any)
    is disabled by name and the module is loaded explicitly from the repository."""
    import os

    repo = str(FIXTURES.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    return ["-p", "no:magpie_parity", "-p", "parity.pytest_plugin"]


def test_user_parity_test_passes_and_backends_skip(pytester, monkeypatch):
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest_subprocess(
        *_plugin_args(monkeypatch), "-rs",
        f"--nemo-ckpt={FIXTURES / 'released_small.nemo'}", f"--nemo-dump={FIXTURES / 'released_small.nemo_dump'}",
    )
    res.assert_outcomes(passed=1, skipped=2)
    res.stdout.fnmatch_lines(["*[[]trtllm[]]*", "*[[]gpu[]]*no CUDA GPU*"])


def test_user_parity_test_catches_a_wrong_checkpoint(pytester, monkeypatch):
    """The same test against another model's dump fails, with the report in the message."""
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest_subprocess(
        *_plugin_args(monkeypatch), "-k", "matches_nemo",
        f"--nemo-ckpt={FIXTURES / 'bidir_encoder.nemo'}", f"--nemo-dump={FIXTURES / 'released_small.nemo_dump'}",
        f"--parity-batch={FIXTURES / 'released_small.batch.safetensors'}",
    )
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*first divergence*"])


def test_fixtures_skip_without_options(pytester, monkeypatch):
    pytester.makepyfile(test_user=USER_TEST)
    res = pytester.runpytest_subprocess(*_plugin_args(monkeypatch), "-rs", "-k", "matches_nemo")
    res.assert_outcomes(skipped=1)
    res.stdout.fnmatch_lines(["*no --nemo-ckpt given*"])


def test_parity_tolerances_takes_a_policy_name(pytester, monkeypatch):
    """--parity-tolerances names a policy of parity.tolerances (or a file); an unknown name is an error that says
    which names exist."""
    pytester.makepyfile(test_user=USER_TEST)
    args = [*_plugin_args(monkeypatch), "-k", "matches_nemo", f"--nemo-ckpt={FIXTURES / 'released_small.nemo'}",
            f"--nemo-dump={FIXTURES / 'released_small.nemo_dump'}"]
    pytester.runpytest_subprocess(*args, "--parity-tolerances=fixtures").assert_outcomes(passed=1)
    res = pytester.runpytest_subprocess(*args, "--parity-tolerances=bogus")
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*PolicyError: bogus: no such tolerance file (or policy name; known: *'parity'*"])
