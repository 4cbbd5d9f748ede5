"""The bundled fixtures are NeMo's own output: regenerating them with live NeMo reproduces them."""

from __future__ import annotations

import pytest
import torch

import make_fixtures
from conftest import FIXTURES

pytestmark = [pytest.mark.nemo, pytest.mark.slow]
CASES = make_fixtures.ALL_CASES  # the decoder_context_tts cases and the decoder_ce ones (make_fixtures.DCE_CASES)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    import make_fixtures

    out = tmp_path_factory.mktemp("fixtures")
    assert make_fixtures.main(["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", CASES)
def test_weights_config_and_batch_reproduce_exactly(regenerated, case):
    from safetensors.torch import load_file

    from reference.checkpoint import read_checkpoint

    a, b = read_checkpoint(FIXTURES / f"{case}.nemo"), read_checkpoint(regenerated / f"{case}.nemo")
    assert a.config == b.config  # codecmodel_path included: both record the codec relative to their folder
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    ba, bb = load_file(FIXTURES / f"{case}.batch.safetensors"), load_file(regenerated / f"{case}.batch.safetensors")
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)


@pytest.mark.parametrize("case", list(make_fixtures.DCE_CASES))
def test_generate_speech_chunks_reproduce_exactly(regenerated, case):
    """The chunk inputs of the generate_speech runs (NeMo's tokenizer, chunker and runner) are the same tensors,
    dtypes and metadata (texts, chunk texts)."""
    from safetensors import safe_open

    name = f"{case}.chunks.safetensors"
    with safe_open(str(FIXTURES / name), "pt") as a, safe_open(str(regenerated / name), "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x, y), k


@pytest.mark.parametrize("case", CASES)
def test_nemo_dumps_reproduce(regenerated, case):
    from parity.compare import compare_dumps
    from parity.tolerances import policy as named_policy

    # Same NeMo code, same weights and inputs, same single-threaded CPU maths: the "fixtures" policy's 1e-6 absorbs
    # only BLAS kernel differences between machines (observed: identical).
    policy = named_policy("fixtures")
    for dump in sorted(p.name for p in FIXTURES.glob(f"{case}.*") if p.is_dir()):
        res = compare_dumps(regenerated / dump, FIXTURES / dump, policy=policy, progress=False)
        assert res and not res.missing_in_a and not res.missing_in_b, (dump, res.first_divergence)
