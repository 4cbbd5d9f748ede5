"""The batch dict NeMo's ``process_batch`` / ``infer_batch`` take: masks from lengths, and the one validation of
shapes, lengths, token ranges and dtypes that every loop (and the fast path) runs before any work."""

from __future__ import annotations

from typing import Optional

import torch

from reference.config import MagpieConfig


def lengths_to_mask(lengths: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at valid positions; T = max(lengths) like NeMo's get_mask_from_lengths."""
    if max_len is None:
        max_len = int(lengths.max())
    ids = torch.arange(0, max_len, device=lengths.device, dtype=lengths.dtype)
    return ids < lengths.unsqueeze(1)


class BatchError(ValueError):
    """A batch dict is inconsistent (shapes, lengths, token ranges)."""


def speaker_index_tensor(speaker_indices, batch_size: int, num_speakers: int) -> torch.Tensor:
    """NeMo's ``_normalize_speaker_indices``: None -> speaker 0 for every item; an int -> that speaker for every
    item; a list or tensor of ``batch_size`` indices. (B,) long; out-of-range or mis-sized -> BatchError."""
    if speaker_indices is None:
        idx = torch.zeros(batch_size, dtype=torch.long)
    elif isinstance(speaker_indices, int):  # bool included, as NeMo (an int subclass)
        idx = torch.full((batch_size,), int(speaker_indices), dtype=torch.long)
    elif isinstance(speaker_indices, (list, tuple, torch.Tensor)):
        n = speaker_indices.numel() if isinstance(speaker_indices, torch.Tensor) else len(speaker_indices)
        if n != batch_size:
            raise BatchError(f"speaker_indices has {n} entries, the batch {batch_size} items")
        if isinstance(speaker_indices, torch.Tensor):
            if speaker_indices.is_floating_point() or speaker_indices.is_complex():
                raise BatchError(f"speaker_indices must hold integers, got {speaker_indices.dtype}")
            idx = speaker_indices.reshape(-1).long()
        else:
            if not all(isinstance(i, int) for i in speaker_indices):
                raise BatchError("speaker_indices must hold integers")
            idx = torch.tensor(list(speaker_indices), dtype=torch.long)
    else:
        raise BatchError(f"speaker_indices must be an int, a list or a tensor, got {type(speaker_indices).__name__}")
    if batch_size and (int(idx.min()) < 0 or int(idx.max()) >= num_speakers):
        raise BatchError(f"speaker_indices must lie in [0, {num_speakers - 1}] (the checkpoint bakes {num_speakers} "
                         f"speakers), got {idx.tolist()}")
    return idx


def validate_batch(batch: dict, c: MagpieConfig, require_audio: bool) -> None:
    keys = ["text", "text_lens"]
    if not c.baked:  # a baked checkpoint takes its context from speaker_indices; context codes are ignored
        keys += ["context_audio_codes", "context_audio_codes_lens"]
    if require_audio:
        keys += ["audio_codes", "audio_codes_lens"]
    for k in keys:
        if k not in batch:
            raise BatchError(f"batch is missing '{k}'")
        if not isinstance(batch[k], torch.Tensor):
            raise BatchError(f"batch['{k}'] must be a tensor, got {type(batch[k]).__name__}")
        if batch[k].is_floating_point():
            raise BatchError(f"batch['{k}'] must hold integers, got {batch[k].dtype}")
    text, text_lens = batch["text"], batch["text_lens"]
    if text.dim() != 2:
        raise BatchError(f"batch['text'] must be (B, T_text), got shape {tuple(text.shape)}")
    B = text.shape[0]

    def check_lens(name: str, lens: torch.Tensor, T: int, min_len: int = 1):
        if lens.shape != (B,):
            raise BatchError(f"batch['{name}'] must have shape ({B},), got {tuple(lens.shape)}")
        if int(lens.min()) < min_len or int(lens.max()) > T:
            raise BatchError(f"batch['{name}'] values must lie in [{min_len}, {T}], got {lens.tolist()}")

    check_lens("text_lens", text_lens, text.shape[1])
    if int(text_lens.max()) != text.shape[1]:
        raise BatchError(f"batch['text'] is padded to {text.shape[1]} but max(text_lens) is {int(text_lens.max())}")
    if int(text.min()) < 0 or int(text.max()) >= c.num_text_tokens:
        raise BatchError(f"batch['text'] token ids must lie in [0, {c.num_text_tokens}), got [{int(text.min())}, {int(text.max())}]")
    pairs = [] if c.baked else [("context_audio_codes", "context_audio_codes_lens")]
    if c.baked:
        speaker_index_tensor(batch.get("speaker_indices"), B, c.baked_speakers)
    if require_audio:
        pairs.append(("audio_codes", "audio_codes_lens"))
    for codes_key, lens_key in pairs:
        codes = batch[codes_key]
        if codes.dim() != 3 or codes.shape[0] != B or codes.shape[1] != c.num_audio_codebooks:
            raise BatchError(
                f"batch['{codes_key}'] must be (B={B}, C={c.num_audio_codebooks}, T), got {tuple(codes.shape)}"
            )
        check_lens(lens_key, batch[lens_key], codes.shape[2], min_len=0 if codes_key == "context_audio_codes" else 1)
        if int(batch[lens_key].max()) != codes.shape[2]:
            # NeMo builds masks of max(lens) columns and multiplies them with the embeddings: extra padding
            # would be a shape error deep inside; say it here instead.
            raise BatchError(
                f"batch['{codes_key}'] is padded to {codes.shape[2]} frames but max({lens_key}) is {int(batch[lens_key].max())}"
            )
        if int(codes.min()) < 0 or int(codes.max()) >= c.num_all_tokens_per_codebook:
            raise BatchError(
                f"batch['{codes_key}'] codes must lie in [0, {c.num_all_tokens_per_codebook}), "
                f"got [{int(codes.min())}, {int(codes.max())}]"
            )
    prior = batch.get("align_prior_matrix")
    if prior is not None and require_audio:
        T_a = int(batch["audio_codes_lens"].max()) + 1
        if prior.dim() != 3 or prior.shape[0] != B or prior.shape[2] != text.shape[1] or prior.shape[1] < T_a:
            raise BatchError(
                f"batch['align_prior_matrix'] must be (B={B}, >= {T_a}, T_text={text.shape[1]}), got {tuple(prior.shape)}"
            )
        if not torch.isfinite(prior).all():
            raise BatchError("batch['align_prior_matrix'] holds NaN or Inf")
