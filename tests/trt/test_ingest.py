"""trt.ingest: tllm_debug trees written here from a real reference run (KV-cached, CFG) in both layouts are
ingested back into the reference's canonical dump with zero error; perturbations are located; bad trees fail
with messages naming the file."""

from __future__ import annotations

import io
import re

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crafted import small_tree as _small_tree  # shared with the CLI tests
from parity.compare import compare_dumps
from parity.dump import DumpReader
from trt.debug_tree import exported_names  # what an engine exports: the writer's own rule
from trt.ingest import (CONTEXT, GENERATION, UINT64_MAX, IngestError, Seq, batch_sequences, canonical_order,
                        detect_generation, ingest_trtllm, pack_rows, pad_trailing, place_prompts, scan_tree,
                        split_packed, unplace_prompts)

GEN = "fork_c6ff2312"  # the generation with per-layer decoder debug outputs
CFG_SCALE = 2.5  # the reference's default, used by the reference run below


# ------------------------------------------------------------------------------------ reference run


def _equal_context_batch(case: str) -> dict[str, torch.Tensor]:
    """The fixture batch (3 items, different text lengths) with every context cut to the shortest one: the engine
    and the reference lay prompts out the same way only when all prompts have one length."""
    from conftest import infer_inputs, load_batch

    b = infer_inputs(load_batch(case))
    n = int(b["context_audio_codes_lens"].min())
    b["context_audio_codes"] = b["context_audio_codes"][:, :, :n].contiguous()
    b["context_audio_codes_lens"] = torch.full_like(b["context_audio_codes_lens"], n)
    return b


_REF: dict = {}


def reference_dump(case: str, tmp_root: Path, use_cfg: bool = True, steps: int = 4) -> Path:
    from conftest import reference_model

    from parity.reference_capture import dump_reference_infer

    key = (case, use_cfg, steps)
    if key not in _REF:
        out = tmp_root / f"ref_{case}_{int(use_cfg)}"
        dump_reference_infer(reference_model(case), _equal_context_batch(case), out, use_cfg=use_cfg, seed=0,
                             capture_layers=True, use_kv_cache=True, topk=1, max_decoder_steps=steps)
        _REF[key] = out
    return _REF[key]


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ingest_ref")


# ------------------------------------------------------------------------------------ fake engine trees


def sequence_rows(ref: DumpReader, B: int, use_cfg: bool, generation: str = GEN):
    """(b, cfg index, step) -> {debug name: rows as the engine holds them} for one sequence, from the reference."""
    exp = exported_names(ref.names(), generation)
    steps = sorted({e.step for e in ref.entries if e.step is not None and e.name == "decoder.layers.0"})
    rows = {}
    enc = ref.load("encoder.norm_out").numpy()
    text_lens = [int(n) for n in (enc != 0).any(-1).sum(-1)]
    for s in steps:
        for trt, (canon, layout) in exp.items():
            val = ref.load("final_proj" if canon == "logits" else canon, s).numpy()
            for ci in range(2 if use_cfg else 1):
                for b in range(B):
                    r = b + ci * B
                    rows.setdefault((b, ci, s), {})[trt] = val[r, -1:] if layout == "last_token" else val[r]
        for ci in range(2 if use_cfg else 1):
            for b in range(B):
                e = enc[b, :text_lens[b]]
                if s == 0:
                    rows[(b, ci, s)]["encoder_output"] = e if ci == 0 else np.zeros_like(e)
    return rows, steps, text_lens


def executor_schedule(B: int, steps: list[int], late: int | None = None) -> list[list[tuple[int, int]]]:
    """Iterations of (b, step) in packed order (context first). Request ``late`` starts one iteration later, so
    contexts and generations mix in one iteration."""
    start = {b: (1 if b == late else 0) for b in range(B)}
    its = []
    for i in range(len(steps) + (1 if late is not None else 0)):
        entries = [(b, i - start[b]) for b in range(B) if 0 <= i - start[b] < len(steps)]
        entries.sort(key=lambda e: (e[1] != 0, -e[0]))  # contexts first; reverse batch order inside
        its.append(entries)
    return its


def write_executor_tree(root: Path, rows, B: int, use_cfg: bool, schedule, rids, *, per_seq_ids=False,
                        text_lens=None, extra=None, drop=()) -> Path:
    leaf = root / "tllm_debug" / "PP_1" / "TP_1"
    names = sorted({n for v in rows.values() for n in v if n != "encoder_output"})
    for it, entries in enumerate(schedule):
        d = leaf / f"iteration_{it}"
        d.mkdir(parents=True)
        seqs = [(b, ci, s) for b, s in entries for ci in range(2 if use_cfg else 1)]
        ids = []
        for b, _s in entries:
            ids += [rids[b], UINT64_MAX - rids[b]] if (use_cfg and per_seq_ids) else [rids[b]]
        if "request_ids" not in drop:
            np.save(d / "request_ids.npy", np.array(ids, dtype=np.uint64))
        np.save(d / "host_request_types.npy", np.array([CONTEXT if s == 0 else GENERATION for _b, _c, s in seqs],
                                                       dtype=np.int32))
        np.save(d / "host_context_lengths.npy", np.array([rows[q]["decoder_layer_0_output"].shape[0]
                                                          if q[2] == 0 else 8 for q in seqs], dtype=np.int32))
        np.save(d / "sequence_length.npy", np.arange(len(seqs), dtype=np.int32))
        np.save(d / "host_kv_cache_pool_pointers.npy", np.array([[123456, 0]], dtype=np.int64))
        np.save(d / "input_ids.npy", np.arange(5, dtype=np.int32))
        for n in names:
            np.save(d / f"{n}.npy", pack_rows(rows[q][n] for q in seqs))
        ctx = [q for q in seqs if q[2] == 0]
        if text_lens is not None:
            np.save(d / "encoder_input_lengths.npy", np.array([text_lens[q[0]] for q in seqs], dtype=np.int32))
            enc = [rows[q]["encoder_output"] for q in ctx]
            np.save(d / "encoder_output.npy", pack_rows(enc) if enc else np.zeros((0, 1), np.float32))
        for n, v in (extra or {}).items():
            np.save(d / f"{n}.npy", v)
    return root / "tllm_debug"


def write_python_tree(root: Path, rows, B: int, use_cfg: bool, steps, text_lens=None) -> Path:
    leaf = root / "tllm_debug" / "PP_0" / "TP_0"
    leaf.mkdir(parents=True)
    names = sorted({n for v in rows.values() for n in v if n != "encoder_output"})
    for s in steps:
        seqs = [(b, ci, s) for b in range(B) for ci in range(2 if use_cfg else 1)]
        save = lambda n, v: (np.save(leaf / f"{n}-step{s}.npy", v),  # noqa: E731
                             np.savetxt(leaf / f"{n}-step{s}.txt", v.reshape(v.shape[0], -1) if v.ndim else v[None]))
        save("host_request_types", np.array([CONTEXT if s == 0 else GENERATION] * len(seqs), dtype=np.int32))
        save("context_lengths", np.array([rows[(b, ci, 0)]["decoder_layer_0_output"].shape[0] for b, ci, _ in seqs],
                                         dtype=np.int32))
        save("cache_indirection", np.zeros((len(seqs), 1, 4), dtype=np.int32))
        for n in names:
            save(n, pack_rows(rows[q][n] for q in seqs))
        if text_lens is not None and s == 0:
            save("encoder_input_lengths", np.array([text_lens[q[0]] for q in seqs], dtype=np.int32))
            save("encoder_output", pack_rows(rows[q]["encoder_output"] for q in seqs))
    return root / "tllm_debug"


def assert_exact(ingested: Path, ref: Path, expect_names: set[str]) -> None:
    res = compare_dumps(ingested, ref, progress=False)
    assert res.missing_in_b == [], res.missing_in_b  # every ingested tensor has a reference counterpart
    # the engine holds a subset of the reference's tensors: the full comparison fails on them, the intersection passes
    assert not res.passed and compare_dumps(ingested, ref, progress=False, intersect=True).passed
    assert res.tensors, "nothing compared"
    bad = [(t.name, t.step, t.max_abs, t.reason) for t in res.tensors if t.max_abs != 0 or t.reason]
    assert not bad, bad
    assert {t.name for t in res.tensors} == expect_names
    for t in res.tensors:  # never an all-zero comparison
        assert ingested and DumpReader(ingested).load(t.name, t.step).abs().max() > 0, (t.name, t.step)


def expected_names(ref: DumpReader, use_cfg: bool, cfg_scale) -> set[str]:
    names = {c for c, _l in exported_names(ref.names(), GEN).values()} | {"encoder.norm_out", "final_proj"}
    names.discard("logits")
    if not use_cfg or cfg_scale is not None:
        names.add("logits")
    return names


# ------------------------------------------------------------------------------------ acceptance


@pytest.mark.parametrize("case", ["released_small", "four_codebooks"])
@pytest.mark.parametrize("per_seq_ids", [False, True])
def test_executor_tree_round_trip_is_exact(case, per_seq_ids, ref_root, tmp_path):
    ref_path = reference_dump(case, ref_root)
    ref = DumpReader(ref_path)
    B = 3
    rows, steps, text_lens = sequence_rows(ref, B, use_cfg=True)
    rids = [4, 9, 17]  # ascending with the batch index; scheduled out of order below
    sched = executor_schedule(B, steps, late=1)
    assert any(any(s == 0 for _b, s in it) and any(s > 0 for _b, s in it) for it in sched)  # mixed iterations
    tree = write_executor_tree(tmp_path / "t", rows, B, True, sched, rids, per_seq_ids=per_seq_ids,
                               text_lens=text_lens)
    out = ingest_trtllm(tree, tmp_path / "ing", batch_size=B, cfg_scale=CFG_SCALE)  # generation and CFG detected
    got = DumpReader(out)
    assert got.source == "trtllm" and got.meta["generation"] == GEN and got.layout["use_cfg"] is True
    assert got.meta["request_ids"] == rids
    assert "host_kv_cache_pool_pointers" in got.meta["skipped"] and "input_ids" in got.meta["skipped"]
    assert_exact(out, ref_path, expected_names(ref, True, CFG_SCALE))
    # step s of every request lines up although request 1 ran one iteration behind
    assert {e.step for e in got.entries if e.name == "decoder.layers.0"} == set(steps)


def test_python_tree_round_trip_is_exact(ref_root, tmp_path):
    ref_path = reference_dump("released_small", ref_root)
    ref = DumpReader(ref_path)
    rows, steps, text_lens = sequence_rows(ref, 3, use_cfg=True)
    tree = write_python_tree(tmp_path / "t", rows, 3, True, steps, text_lens=text_lens)
    assert scan_tree(tree).layout == "python"
    out = ingest_trtllm(tree, tmp_path / "ing", use_cfg=True, batch_size=3, generation=GEN)
    assert "logits" in DumpReader(out).meta["skipped"]  # CFG without cfg_scale: no combined logits
    assert_exact(out, ref_path, expected_names(ref, True, None))


def test_no_cfg_round_trip_is_exact(ref_root, tmp_path):
    ref_path = reference_dump("released_small", ref_root, use_cfg=False)
    ref = DumpReader(ref_path)
    rows, steps, text_lens = sequence_rows(ref, 3, use_cfg=False)
    tree = write_executor_tree(tmp_path / "t", rows, 3, False, executor_schedule(3, steps), [0, 1, 2],
                               text_lens=text_lens)
    out = ingest_trtllm(tree, tmp_path / "ing")
    assert DumpReader(out).layout["use_cfg"] is False
    assert_exact(out, ref_path, expected_names(ref, False, None))


def test_perturbed_row_is_found_at_its_name_and_step(ref_root, tmp_path):
    ref_path = reference_dump("released_small", ref_root)
    ref = DumpReader(ref_path)
    B = 3
    rows, steps, text_lens = sequence_rows(ref, B, use_cfg=True)
    rows[(1, 1, 2)] = dict(rows[(1, 1, 2)])  # request 1's uncond sequence at step 2
    bumped = rows[(1, 1, 2)]["decoder_layers.1.cross_attention_output"].copy()
    bumped[0, 3] += 0.25
    rows[(1, 1, 2)]["decoder_layers.1.cross_attention_output"] = bumped
    tree = write_executor_tree(tmp_path / "t", rows, B, True, executor_schedule(B, steps, late=2), [1, 2, 3])
    out = ingest_trtllm(tree, tmp_path / "ing", cfg_scale=CFG_SCALE)
    res = compare_dumps(out, ref_path, progress=False)
    failed = [(t.name, t.step) for t in res.tensors if t.max_abs != 0]
    assert failed == [("decoder.layers.1.cross_attention", 2)]
    assert res.first_divergence == ("decoder.layers.1.cross_attention", 2)
    got = DumpReader(out).load("decoder.layers.1.cross_attention", 2)
    want = ref.load("decoder.layers.1.cross_attention", 2)
    diff = (got - want).abs()
    assert diff.max().item() == pytest.approx(0.25, abs=1e-6) and diff[B + 1, 0, 3] == diff.max()  # uncond row B+1


def test_request_that_finished_early_leaves_partial_steps_out(ref_root, tmp_path):
    ref_path = reference_dump("released_small", ref_root)
    ref = DumpReader(ref_path)
    rows, steps, _ = sequence_rows(ref, 3, use_cfg=True)
    sched = executor_schedule(3, steps)
    sched[-1] = [e for e in sched[-1] if e[0] != 0]  # request 0 ended before the last step
    tree = write_executor_tree(tmp_path / "t", rows, 3, True, sched, [0, 1, 2])
    got = DumpReader(ingest_trtllm(tree, tmp_path / "ing"))
    last = steps[-1]
    assert last in got.meta["partial_steps"]["decoder.layers.0"]
    assert ("decoder.layers.0", last) not in got and ("decoder.layers.0", last - 1) in got


def test_gen_b_prior_io_and_hidden_state_logits(tmp_path):
    """fork_497d0e69: 'logits' is the final hidden state; focus/scores are per sequence, rows reordered."""
    d = tmp_path / "tllm_debug" / "PP_1" / "TP_1"
    rng = np.random.default_rng(0)
    hid = {}
    for it, (ids, types) in enumerate([([8, 5], [0, 0]), ([8, 5], [1, 1])]):
        p = d / f"iteration_{it}"
        p.mkdir(parents=True)
        n_seq = 2 * len(ids)
        np.save(p / "request_ids.npy", np.array(ids, dtype=np.uint64))
        np.save(p / "host_request_types.npy", np.repeat(np.array(types, np.int32), 2))
        np.save(p / "host_context_lengths.npy", np.array([3, 3, 3, 3], np.int32))
        hid[it] = rng.standard_normal((n_seq, 6)).astype(np.float16)
        np.save(p / "logits.npy", hid[it])
        np.save(p / "attention_prior_focus.npy", np.arange(n_seq, dtype=np.int32) + 10 * it)
        np.save(p / "attention_prior_scores.npy", rng.random(n_seq * 5).astype(np.float32))
        np.save(p / "decoder_context_features.npy", np.zeros((n_seq * (3 if it == 0 else 1), 6), np.float16))
    got = DumpReader(ingest_trtllm(tmp_path / "tllm_debug", tmp_path / "ing", use_cfg=True))
    assert got.meta["generation"] == "fork_497d0e69"
    # packed order: request 8 (cond, uncond), request 5 (cond, uncond); canonical: 5c, 8c, 5u, 8u
    perm = [2, 0, 3, 1]
    assert got.load("inference.attention_prior_focus", 1).tolist() == [12, 10, 13, 11]
    assert got.load("inference.attention_prior_scores", 0).shape == (4, 5)
    assert torch.equal(got.load("decoder.norm_out", 1), torch.from_numpy(hid[1][perm][:, None]))
    assert ("decoder.norm_out", 0) not in got and got.dtype == "float16"
    assert got.meta["engine_only"] == ["inference.attention_prior_focus", "inference.attention_prior_scores"]


def test_gen_c_19ff87be_prior_inputs_cover_generation_sequences_only(tmp_path):
    """anand-nv@19ff87be: attention_prior_focus [n_gen_seq] / attention_prior_scores [5 * n_gen_seq] are engine
    inputs sized by the generation sequences (context sequences have none); 'logits' are real lm_head logits."""
    d = tmp_path / "tllm_debug" / "PP_1" / "TP_1"
    rng = np.random.default_rng(1)
    V, D, enc = 16, 6, [4, 3]  # logits wider than the encoder output: real logits
    logits, focus, scores = {}, {}, {}
    for it, (ids, types) in enumerate([([8, 5], [0, 0]), ([8, 5], [1, 1]), ([8, 5], [1, 1])]):
        p = d / f"iteration_{it}"
        p.mkdir(parents=True)
        n_seq = 2 * len(ids)
        n_gen = 0 if it == 0 else n_seq
        np.save(p / "request_ids.npy", np.array(ids, dtype=np.uint64))
        np.save(p / "host_request_types.npy", np.repeat(np.array(types, np.int32), 2))
        np.save(p / "host_context_lengths.npy", np.array([3, 3, 3, 3], np.int32))
        np.save(p / "encoder_input_lengths.npy", np.repeat(np.array(enc, np.int32), 2))
        n_enc = sum(np.repeat(enc, 2)) if it == 0 else 0
        np.save(p / "encoder_output.npy", rng.standard_normal((n_enc, D)).astype(np.float16))
        logits[it] = rng.standard_normal((n_seq, V)).astype(np.float16)
        np.save(p / "logits.npy", logits[it])
        focus[it] = np.arange(n_gen, dtype=np.int32) + 10 * it
        scores[it] = rng.random(n_gen * 5).astype(np.float32)
        np.save(p / "attention_prior_focus.npy", focus[it])
        np.save(p / "attention_prior_scores.npy", scores[it])
    got = DumpReader(ingest_trtllm(tmp_path / "tllm_debug", tmp_path / "ing", use_cfg=True, cfg_scale=2.0))
    assert got.meta["generation"] == "fork_19ff87be"
    perm = [2, 0, 3, 1]  # packed 8c, 8u, 5c, 5u -> canonical 5c, 8c, 5u, 8u
    for step in (1, 2):
        assert got.load("inference.attention_prior_focus", step).tolist() == focus[step][perm].tolist()
        assert torch.equal(got.load("inference.attention_prior_scores", step),
                           torch.from_numpy(scores[step].reshape(4, 5)[perm]))
        lg = torch.from_numpy(logits[step][perm][:, None])
        assert torch.equal(got.load("final_proj", step), lg)  # the real logits, not a hidden state
        assert torch.equal(got.load("logits", step), (1 - 2.0) * lg[2:] + 2.0 * lg[:2])
    assert ("inference.attention_prior_focus", 0) not in got and ("inference.attention_prior_scores", 0) not in got
    assert got.load("encoder.norm_out").shape == (2, 4, D)
    assert got.meta["engine_only"] == ["inference.attention_prior_focus", "inference.attention_prior_scores"]


def test_gen_c_prior_values_without_generation_sequences_are_refused(tmp_path):
    d = _small_tree(tmp_path, attention_prior_focus=np.array([3], np.int32), logits=np.zeros((1, 5), np.float16))
    (d / "decoder_layer_0_output.npy").unlink()  # the fork_19ff87be decoder registers no debug outputs
    with pytest.raises(IngestError, match=r"attention_prior_focus.npy: 1 values but no generation sequence"):
        ingest_trtllm(d.parent, tmp_path / "ing", generation="fork_19ff87be")


def _scores_tree(tmp_path: Path, enc: list[int], cols: int | None = None):
    """fork_e7109d5: a context iteration (prompts of 3 and 2 tokens, CFG) and a generation iteration, with the
    'scores' output [num_tokens, sum of the sequences' encoder lengths] holding distinct values everywhere."""
    d = tmp_path / "tllm_debug" / "PP_1" / "TP_1"
    seq_enc = np.repeat(np.array(enc, np.int32), 2)  # cond, uncond of requests 4 and 2
    trees = {}
    for it, (types, ctx) in enumerate([([0, 0], [3, 3, 2, 2]), ([1, 1], [3, 3, 2, 2])]):
        p = d / f"iteration_{it}"
        p.mkdir(parents=True)
        np.save(p / "request_ids.npy", np.array([4, 2], dtype=np.uint64))
        np.save(p / "host_request_types.npy", np.repeat(np.array(types, np.int32), 2))
        np.save(p / "host_context_lengths.npy", np.array(ctx, np.int32))
        np.save(p / "encoder_input_lengths.npy", seq_enc)
        n_tok = sum(ctx) if it == 0 else 4
        c = int(seq_enc.sum()) if cols is None else cols
        trees[it] = (np.arange(n_tok * c, dtype=np.float32).reshape(n_tok, c) / 7).astype(np.float16)
        np.save(p / "scores.npy", trees[it])
        np.save(p / "logits.npy", np.zeros((4, 5), np.float16))
    return tmp_path / "tllm_debug", trees, seq_enc


def test_gen_a_scores_become_each_sequences_own_block(tmp_path):
    """rmittal@e7109d5 'scores' -> inference.cross_attention_logits_mean: per sequence, its own rows x its own
    encoder columns (as RuntimeBuffers::setAttentionPriorIdx reads them), prompts placed like activations."""
    tree, raw, seq_enc = _scores_tree(tmp_path, enc=[5, 3])
    got = DumpReader(ingest_trtllm(tree, tmp_path / "ing", use_cfg=True))
    assert got.meta["generation"] == "fork_e7109d5"
    rows0, cols = [3, 3, 2, 2], np.concatenate([[0], np.cumsum(seq_enc)])
    row0 = np.concatenate([[0], np.cumsum(rows0)])

    def block(it, k, rows):  # packed sequence k (4c, 4u, 2c, 2u)
        return raw[it][rows[k]:rows[k + 1], cols[k]:cols[k + 1]]

    order = [2, 0, 3, 1]  # canonical 2c, 4c, 2u, 4u
    want0 = place_prompts(pad_trailing([block(0, k, row0) for k in order]))
    v0 = got.load("inference.cross_attention_logits_mean", 0)
    assert v0.shape == (4, 3, 5) and torch.equal(v0, torch.from_numpy(want0))
    assert torch.equal(v0[0, :, 3:], torch.zeros(3, 2, dtype=v0.dtype))  # request 2's 3 text positions, padded
    want1 = np.stack(pad_trailing([block(1, k, list(range(5))) for k in order]))
    assert torch.equal(got.load("inference.cross_attention_logits_mean", 1), torch.from_numpy(want1))
    assert "inference.cross_attention_logits_mean" in got.meta["engine_only"]


def test_gen_a_scores_with_wrong_columns_name_the_file(tmp_path):
    tree, _, _ = _scores_tree(tmp_path, enc=[5, 3], cols=17)
    with pytest.raises(IngestError, match=r"iteration_0/scores.npy: inconsistent token counts: 17 columns, the "
                                          r"sequences' encoder lengths \[5, 5, 3, 3\] sum to 16"):
        ingest_trtllm(tree, tmp_path / "ing", use_cfg=True)


def test_detect_generation_rules():
    prior = {"attention_prior_focus", "attention_prior_scores", "logits", "request_ids"}
    assert detect_generation(prior | {"decoder_context_features"}) == "fork_497d0e69"
    assert detect_generation(prior, {"logits": (4, 768), "encoder_output": (20, 768)}) == "fork_497d0e69"
    assert detect_generation(prior, {"logits": (4, 16192), "encoder_output": (0, 768)}) == "fork_19ff87be"
    with pytest.raises(IngestError, match="pass generation='fork_497d0e69' or 'fork_19ff87be'"):
        detect_generation(prior, {"logits": (4, 768)})
    ctx = {"decoder_context_features", "decoder_context_features_mask", "logits", "request_ids"}
    assert detect_generation(ctx, {"logits": (4, 768), "encoder_output": (20, 768)}) == "fork_497d0e69"
    assert detect_generation(ctx | prior) == "fork_497d0e69"
    with pytest.raises(IngestError, match=r"^decoder_context_features with 'logits' wider than 'encoder_output' "
                                          r"\(real logits, not fork_497d0e69's hidden state\): an anand-nv engine "
                                          r"after 19ff87be \(runtimeBuffers.cpp@0c0df9f0.*pass generation= to read"):
        detect_generation(ctx | prior, {"logits": (4, 16192), "encoder_output": (20, 768)})
    assert detect_generation({"scores", "logits"}) == "fork_e7109d5"
    assert detect_generation({"decoder_layers.3.pos_ff_output"}) == "fork_c6ff2312"
    assert detect_generation({"decoder_layers.3.mlp_output"}) == "upstream_old"
    assert detect_generation({"transformer.layers.0.mlp_output"}) == "upstream_new"
    with pytest.raises(IngestError, match="cannot tell the engine generation"):
        detect_generation({"request_ids"})


def test_pad_trailing():
    a, b = np.ones((2, 3), np.float16), np.full((1, 5), 2, np.float16)
    pa, pb = pad_trailing([a, b])
    assert pa.shape == (2, 5) and pb.shape == (1, 5) and pa[:, 3:].sum() == 0 and (pa[:, :3] == 1).all()
    assert pad_trailing([a, a])[0] is a


# ------------------------------------------------------------------------------------ errors




def test_small_tree_ingests(tmp_path):
    _small_tree(tmp_path)
    got = DumpReader(ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN))
    assert got.load("decoder.layers.0", 0).shape == (1, 3, 4)


def test_missing_request_ids(tmp_path):
    d = _small_tree(tmp_path)
    (d / "request_ids.npy").unlink()
    with pytest.raises(IngestError, match=r"iteration_0: no request_ids\.npy"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_inconsistent_token_counts(tmp_path):
    d = _small_tree(tmp_path)
    np.save(d / "decoder_layers.0.self_attention_output.npy", np.ones((4, 4), np.float32))
    with pytest.raises(IngestError, match=r"decoder_layers\.0\.self_attention_output\.npy: inconsistent token "
                                          r"counts: 4 rows.*3 tokens"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN, use_cfg=False)


def test_mixed_layouts(tmp_path):
    d = _small_tree(tmp_path)
    np.save(d.parent / "logits-step0.npy", np.ones((1, 4), np.float32))
    with pytest.raises(IngestError, match="mixed layouts"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_non_numeric_iteration_folder(tmp_path):
    d = _small_tree(tmp_path)
    (d.parent / "iteration_last").mkdir()
    with pytest.raises(IngestError, match=r"non-numeric iteration: \['iteration_last'\]"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


@pytest.mark.parametrize("content", [b"not a numpy file at all", "pickle"])
def test_unreadable_npy_names_the_file(tmp_path, content):
    d = _small_tree(tmp_path)
    bad = d / "decoder_layer_1_output.npy"
    if content == "pickle":
        np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        bad.write_bytes(content)
    with pytest.raises(IngestError, match=r"decoder_layer_1_output\.npy: (unreadable \.npy|\.npy dtype '\|O')"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


@pytest.mark.parametrize("arr, match", [
    (np.ones(3, ">f4"), "'>f4' is not a plain native-endian"),
    (np.ones(3, np.longdouble), ".* is not a plain native-endian"),
    (np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]), ".* is not a plain native-endian"),
    (np.array(["2020-01-01"], dtype="datetime64[D]"), "'<M8\\[D\\]' is not a plain"),
    (np.array(["abc"]), "'<U3' is not a plain"),
    (np.ones(3, np.complex64), "'<c8' is not a plain"),
])
def test_npy_kinds_that_are_not_plain_numbers_are_one_error(tmp_path, arr, match):
    d = _small_tree(tmp_path)
    np.save(d / "decoder_layer_1_output.npy", arr)
    with pytest.raises(IngestError, match=r"decoder_layer_1_output\.npy: \.npy dtype " + match):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_npy_header_declaring_more_than_the_file_holds(tmp_path):
    """A 100-byte file whose header declares a billion floats is refused before anything is allocated."""
    d = _small_tree(tmp_path)
    bad = d / "decoder_layer_1_output.npy"
    head = np.lib.format.header_data_from_array_1_0(np.ones(2, np.float32))
    head["shape"] = (10**9,)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, head)
    bad.write_bytes(buf.getvalue() + np.ones(2, np.float32).tobytes())
    with pytest.raises(IngestError, match="declares 4000000000 bytes of data, the file holds 8"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_links_inside_the_tree_are_refused(tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.save(outside / "x.npy", np.ones(3, np.float32))
    d = _small_tree(tmp_path / "tree")
    if where == "file":
        (d / "decoder_layer_1_output.npy").symlink_to(outside / "x.npy")
    else:
        (d.parent / "iteration_9").symlink_to(outside, target_is_directory=True)
    with pytest.raises(IngestError, match="a symbolic link inside the debug tree; refusing to follow it"):
        ingest_trtllm(tmp_path / "tree", tmp_path / "ing", generation=GEN)
    assert not (tmp_path / "ing").exists()


def test_a_fifo_named_like_a_tensor_never_blocks(tmp_path):
    import os

    d = _small_tree(tmp_path)
    os.mkfifo(d / "decoder_layer_1_output.npy")
    with pytest.raises(IngestError, match="not a regular file or folder \\(a FIFO"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_unicode_digit_iteration_folder_is_one_error(tmp_path):
    d = _small_tree(tmp_path)
    (d.parent / "iteration_\u00b2").mkdir()
    with pytest.raises(IngestError, match="non-numeric iteration"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_unknown_names_are_listed(tmp_path):
    _small_tree(tmp_path, my_custom_probe=np.ones(3, np.float32), decoder_layers_7_typo=np.ones(3, np.float32))
    with pytest.raises(IngestError, match=r"unknown.*\['decoder_layers_7_typo', 'my_custom_probe'\]"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_python_layout_without_step_suffix(tmp_path):
    d = tmp_path / "tllm_debug" / "PP_0" / "TP_0"
    d.mkdir(parents=True)
    np.save(d / "decoder_layer_0_output.npy", np.ones((3, 4), np.float32))
    with pytest.raises(IngestError, match="step info is missing"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_context_twice_and_generation_without_context(tmp_path):
    d = _small_tree(tmp_path)
    d2 = d.parent / "iteration_1"
    d2.mkdir()
    np.save(d2 / "request_ids.npy", np.array([0], dtype=np.uint64))
    np.save(d2 / "host_request_types.npy", np.array([0], np.int32))
    np.save(d2 / "host_context_lengths.npy", np.array([3], np.int32))
    np.save(d2 / "decoder_layer_0_output.npy", np.ones((3, 4), np.float32))
    with pytest.raises(IngestError, match="context phase again"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)
    np.save(d2 / "request_ids.npy", np.array([5], dtype=np.uint64))
    np.save(d2 / "host_request_types.npy", np.array([1], np.int32))
    np.save(d2 / "decoder_layer_0_output.npy", np.ones((1, 4), np.float32))
    with pytest.raises(IngestError, match="request 5 generates before any context"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN)


def test_not_a_tree_and_batch_size_mismatch(tmp_path):
    with pytest.raises(IngestError, match="not a folder"):
        ingest_trtllm(tmp_path / "nope", tmp_path / "ing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no tllm_debug data"):
        ingest_trtllm(tmp_path / "empty", tmp_path / "ing")
    _small_tree(tmp_path)
    with pytest.raises(IngestError, match="batch_size=2"):
        ingest_trtllm(tmp_path, tmp_path / "ing", generation=GEN, batch_size=2)


# ------------------------------------------------------------------------------------ pack / unpack (pure)


@st.composite
def batches(draw):
    use_cfg = draw(st.booleans())
    n = draw(st.integers(1, 6))
    rids = draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n, unique=True))
    n_ctx = draw(st.integers(0, n))
    lens = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    per_seq_ids = draw(st.booleans())
    return use_cfg, rids, n_ctx, lens, per_seq_ids


@settings(max_examples=150, deadline=None)
@given(batches(), st.integers(1, 5))
def test_pack_unpack_round_trip(b, hidden):
    use_cfg, rids, n_ctx, lens, per_seq_ids = b
    k = 2 if use_cfg else 1
    types = [CONTEXT] * n_ctx + [GENERATION] * (len(rids) - n_ctx)
    rng = np.random.default_rng(len(rids) * 31 + hidden)
    chunks = {}
    for r, rid in enumerate(rids):
        for ci in range(k):
            nt = lens[r] if types[r] == CONTEXT else 1
            chunks[(rid, ci)] = rng.standard_normal((nt, hidden)).astype(np.float32) + 1.0
    packed = pack_rows(chunks[(rid, ci)] for rid in rids for ci in range(k))
    ids = [x for rid in rids for x in ([rid, UINT64_MAX - rid] if use_cfg and per_seq_ids else [rid])]
    seqs = batch_sequences(ids, use_cfg=use_cfg, request_types=np.repeat(types, k).tolist(),
                           context_lengths=np.repeat(lens, k).tolist())
    assert [(s.request_id, s.cfg_index) for s in seqs] == [(rid, ci) for rid in rids for ci in range(k)]
    parts = split_packed(packed, seqs)
    for s, p in zip(seqs, parts):
        assert np.array_equal(p, chunks[(s.request_id, s.cfg_index)])
    order = canonical_order(rids, use_cfg)
    assert order[:len(rids)] == [(r, 0) for r in sorted(rids)]
    ctx = [chunks[key] for key in order if key[0] in rids[:n_ctx]]
    if ctx:
        placed = place_prompts(ctx)
        back = unplace_prompts(placed, [c.shape[0] for c in ctx])
        assert all(np.array_equal(a, c) for a, c in zip(back, ctx))
        assert all(np.array_equal(placed[i, -1], c[-1]) for i, c in enumerate(ctx))  # BOS token aligned last
    with pytest.raises(IngestError, match="inconsistent token counts"):
        split_packed(np.concatenate([packed, packed[:1]]), seqs)


def test_batch_sequences_rejects_generation_before_context_and_bad_lengths():
    with pytest.raises(IngestError, match="must precede"):
        batch_sequences([1, 2], use_cfg=False, request_types=[1, 0], context_lengths=[1, 3])
    with pytest.raises(IngestError, match="has 3 entries"):
        batch_sequences([1, 2], use_cfg=True, request_types=[0, 0, 0], context_lengths=[2, 2])
    with pytest.raises(IngestError, match="no host_context_lengths"):
        batch_sequences([1], use_cfg=False, request_types=[0])
    assert batch_sequences([3], use_cfg=True, request_types=[1]) == [Seq(3, 0, 1, 1), Seq(3, 1, 1, 1)]


def test_pickled_npy_is_not_loaded(tmp_path):
    """allow_pickle=False: an object array is refused, never unpickled."""
    from trt.ingest import load_npy

    p = tmp_path / "x.npy"
    with open(p, "wb") as fh:
        np.lib.format.write_array(fh, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(IngestError, match=r"x.npy: .npy dtype .\|O. is not a plain"):
        load_npy(p)


# ------------------------------------------------------------------------------------ decoder_ce


def _dce_reference_dump(case: str, root: Path, steps: int = 4) -> Path:
    from conftest import infer_inputs, load_batch, reference_model

    from parity.reference_capture import dump_reference_infer

    key = ("dce", case, steps)
    if key not in _REF:
        out = root / f"ref_{case}"
        dump_reference_infer(reference_model(case), infer_inputs(load_batch(case)), out, use_cfg=True, seed=0,
                             capture_layers=True, use_kv_cache=True, topk=1, max_decoder_steps=steps)
        _REF[key] = out
    return _REF[key]


def write_context_feature_tree(root: Path, ref: DumpReader, B: int, rids, *, uncond_features: bool,
                               drop_mask: bool = False, partial_mask: bool = False) -> Path:
    """A fork_497d0e69-style executor tree of a decoder_ce CFG run: iteration 0 holds every request's context (cond,
    uncond), later ones one token per sequence. decoder_context_features carry the prompt rows where the mask is set:
    the conditional rows always, the unconditional rows only with ``uncond_features`` ([cond; uncond] given to the
    runtime); generation tokens' rows are noise with the mask cleared. 'logits' is the final-LN hidden state."""
    rng = np.random.default_rng(0)
    prompt = ref.load("decoder_input", 0).numpy()  # (2B, T, D): cond rows, then uncond rows
    T, D = prompt.shape[1:]
    steps = sorted({e.step for e in ref.entries if e.name == "decoder.norm_out" and e.step})
    leaf = root / "tllm_debug" / "PP_1" / "TP_1"
    order = [2, 0, 1]  # packed request order differs from the canonical one
    for it, step in enumerate([0] + steps):
        d = leaf / f"iteration_{it}"
        d.mkdir(parents=True)
        seqs = [(b, ci) for b in order for ci in (0, 1)]
        np.save(d / "request_ids.npy", np.array([rids[b] for b in order], dtype=np.uint64))
        np.save(d / "host_request_types.npy", np.full(len(seqs), CONTEXT if step == 0 else GENERATION, np.int32))
        np.save(d / "host_context_lengths.npy", np.full(len(seqs), T, np.int32))
        feats, mask = [], []
        for b, ci in seqs:
            if step == 0:
                keep = ci == 0 or uncond_features
                feats.append(prompt[b + ci * B] if keep else rng.standard_normal((T, D)).astype(np.float32))
                m = np.full(T, keep)
                if partial_mask and ci == 0 and b == order[0]:
                    m[0] = False
                mask.append(m)
            else:
                feats.append(rng.standard_normal((1, D)).astype(np.float32))
                mask.append(np.zeros(1, bool))
        np.save(d / "decoder_context_features.npy", pack_rows(feats))
        if not drop_mask:
            np.save(d / "decoder_context_features_mask.npy", np.concatenate(mask))
        if step:
            hid = ref.load("decoder.norm_out", step).numpy()[:, -1]  # (2B, D)
            np.save(d / "logits.npy", np.stack([hid[b + ci * B] for b, ci in seqs]))
    return root / "tllm_debug"


@pytest.mark.parametrize("case", ["dce_baked_v2602", "dce_baked_v2607"])
def test_decoder_ce_context_features_become_the_decoder_input(case, ref_root, tmp_path):
    """decoder_ce: the engine's decoder_context_features (where the mask is set) are the reference's step-0
    decoder_input, cond and uncond rows, when the runtime gets [cond; uncond] rows; the engine's hidden-state
    'logits' are decoder.norm_out. Exact."""
    ref_path = _dce_reference_dump(case, ref_root)
    ref = DumpReader(ref_path)
    B, rids = 3, [4, 9, 17]
    tree = write_context_feature_tree(tmp_path / "t", ref, B, rids, uncond_features=True)
    got = DumpReader(ingest_trtllm(tree, tmp_path / "ing", generation="fork_497d0e69", use_cfg=True, batch_size=B))
    assert got.load("decoder_input", 0).shape == ref.load("decoder_input", 0).shape
    assert ("decoder_input", 1) not in got  # generation tokens' feature rows are not the decoder input
    assert "decoder_context_features" not in got.meta["skipped"]
    res = compare_dumps(got.path, ref_path, progress=False, intersect=True)
    assert res.passed and {t.name for t in res.tensors} == {"decoder_input", "decoder.norm_out"}
    assert all(t.max_abs == 0 for t in res.tensors)


def test_decoder_ce_uncond_prompt_without_features_is_the_zero_service_token(ref_root, tmp_path):
    """Conditional rows only (run_decoder_multiling(_executor).py): the runtime leaves the unconditional prompt to the
    zero service-token row, BOS included; NeMo keeps the BOS frame there, so exactly those rows differ."""
    ref_path = _dce_reference_dump("dce_baked_v2602", ref_root)
    ref = DumpReader(ref_path)
    B = 3
    tree = write_context_feature_tree(tmp_path / "t", ref, B, [1, 2, 3], uncond_features=False)
    got = DumpReader(ingest_trtllm(tree, tmp_path / "ing", generation="fork_497d0e69", use_cfg=True))
    a, b = got.load("decoder_input", 0), ref.load("decoder_input", 0)
    diff = (a != b).any(-1)  # (2B, T)
    assert diff[B:, -1].all() and diff.sum() == B  # only the unconditional BOS rows
    assert (a[B:] == 0).all() and b[B:, -1].abs().max() > 0


def test_decoder_ce_context_features_without_a_usable_mask_are_skipped_with_the_reason(ref_root, tmp_path):
    ref = DumpReader(_dce_reference_dump("dce_baked_v2602", ref_root))
    for kw, why in (({"drop_mask": True}, "no decoder_context_features_mask"),
                    ({"partial_mask": True}, r"iteration_0: request 3: the mask is set on 8 of the prompt's 9 rows")):
        tree = write_context_feature_tree(tmp_path / str(len(why)), ref, 3, [1, 2, 3], uncond_features=True, **kw)
        got = DumpReader(ingest_trtllm(tree, tmp_path / f"ing{len(why)}", generation="fork_497d0e69", use_cfg=True))
        assert ("decoder_input", 0) not in got
        assert re.search(why, got.meta["skipped"]["decoder_context_features"])
        assert ("decoder.norm_out", 1) in got
