"""decoder_ce as users download it: speaker selection and the baked table's checks (NeMo's rules, one-line errors).
Parity with NeMo itself: test_process_batch.py / test_inference.py (fixtures made by NeMo) and test_chunked.py."""

from __future__ import annotations

import pytest
import torch

from conftest import infer_inputs, load_batch, reference_model
from reference import BatchError, ConfigError, MagpieTTS
from reference.checkpoint import read_checkpoint
from conftest import FIXTURES

CASE = "dce_baked_v2607"


def test_speaker_indices_as_nemo_accepts_them():
    """None (speaker 0 for all), an int, a list and a tensor select the same rows NeMo's _normalize_speaker_indices does."""
    model = reference_model(CASE)
    batch = infer_inputs(load_batch(CASE))
    B = batch["text"].shape[0]
    table = model.baked_context_embedding.weight.view(-1, model.config.baked_frames, model.config.d_model)
    for given, rows in ((None, [0] * B), (1, [1] * B), ([2, 0, 1], [2, 0, 1]), (torch.tensor([3, 3, 0]), [3, 3, 0])):
        emb, mask = model.decoder_context(dict(batch, speaker_indices=given))
        assert torch.equal(emb, table[rows]) and mask.all(), given


@pytest.mark.parametrize("given, match", [
    (4, r"speaker_indices must lie in \[0, 3\] \(the checkpoint bakes 4 speakers\), got \[4, 4, 4\]"),
    (-1, r"must lie in \[0, 3\]"),
    ([0, 1], "speaker_indices has 2 entries, the batch 3 items"),
    (torch.tensor([0.0, 1.0, 2.0]), "speaker_indices must hold integers"),
    ("a", "speaker_indices must be an int, a list or a tensor, got str"),
])
def test_bad_speaker_indices_are_one_batch_error(given, match):
    model = reference_model(CASE)
    batch = dict(infer_inputs(load_batch(CASE)), speaker_indices=given)
    with pytest.raises(BatchError, match=match):
        model.infer_batch(batch, max_decoder_steps=4)


def test_a_baked_table_that_disagrees_with_its_sizes_is_refused():
    raw = read_checkpoint(FIXTURES / f"{CASE}.nemo")
    sd = dict(raw.state_dict)
    sd["_baked_embedding_T"] = sd["_baked_embedding_T"] + 1
    with pytest.raises(ConfigError, match=r"baked_context_embedding.weight is \(4, 160\) but _baked_embedding_T x "
                                          r"_baked_embedding_D = 6 x 32"):
        MagpieTTS.from_state_dict(raw.config, sd, where="crafted.nemo")
    sd = dict(raw.state_dict)
    sd["baked_context_embedding_len"] = sd["baked_context_embedding_len"][:2]
    with pytest.raises(ConfigError, match="baked_context_embedding_len must be 4 integers"):
        MagpieTTS.from_state_dict(raw.config, sd, where="crafted.nemo")


def test_speakers_baked_shorter_than_the_table_are_one_error():
    """NeMo's mask is max(selected lengths) wide while the rows are T long: it crashes deep in the decoder. The
    reference says why instead."""
    raw = read_checkpoint(FIXTURES / f"{CASE}.nemo")
    sd = dict(raw.state_dict)
    sd["baked_context_embedding_len"] = torch.tensor([5, 4, 4, 4])
    model = MagpieTTS.from_state_dict(raw.config, sd)
    batch = dict(infer_inputs(load_batch(CASE)), speaker_indices=[1, 2, 3])
    with pytest.raises(BatchError, match="every selected speaker was baked shorter than the table's 5 frames"):
        model.infer_batch(batch, max_decoder_steps=4)
    model.infer_batch(dict(batch, speaker_indices=[0, 2, 3]), max_decoder_steps=4)  # one full-length speaker: fine
