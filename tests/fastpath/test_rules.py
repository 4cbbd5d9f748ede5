"""The reference's rules that the fast path restates as device-tensor ops (the reference runs them on the host),
held equal to the reference's own functions on random inputs (hypothesis; CPU, no Triton):

* the prior state machine: ``fastpath.decoder._prior_update`` vs ``PriorState.most_attended`` + ``build_prior``;
  a later ``generate_speech`` chunk's, ``_chunk_prior_update`` vs ``most_attended`` with ``left_offset`` +
  ``build_chunk_prior`` + ``advance_finished`` (NeMo's IndexError flagged);
* the sampling edits: ``_edit_logits`` vs ``edit_logits``;
* the EOS scan: ``_first_eos`` / ``_eos_index`` vs ``find_eos`` / ``eos_frames``;
* a whole sampling step as the decoder runs it (``FastDecoder._post_a`` + ``_post_b``: edits, top-k, temperature,
  the draw, the argmax pass, EOS bookkeeping, the stop step) vs ``sample_step`` + ``eos_frames`` + the loop's
  ``end_indices`` / ``MIN_FRAMES_FOR_CODEC`` rule, over several steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import reference_model
from fastpath.decoder import (BIG, FastDecoder, _chunk_prior_update, _counter_width, _edit_logits, _eos_index,
                              _first_eos, _prior_update)
from reference.chunked import ChunkedInferenceConfig
from reference.inference import (EOS_METHODS, MIN_FRAMES_FOR_CODEC, InferenceError, PriorState, edit_logits,
                                 eos_frames, find_eos, forbidden_tokens, resolve_parameters, sample_step)

SETTINGS = settings(max_examples=60, deadline=None)


def _decoder(case: str = "released_small") -> FastDecoder:
    model = reference_model(case)
    return FastDecoder(model, 4, model.config.decoder.max_length_causal_mask)


@SETTINGS
@given(data=st.data())
def test_prior_state_machine_on_device_equals_prior_state(data):
    """Random attention scores, text lengths (including the n <= 5 and n < 3 edge cases), windows and EOS
    events: _prior_update equals PriorState.most_attended + build_prior over many steps, counters (sinks >= 8,
    stuck >= 10), finished counters and unfinished flags included."""
    fast = _decoder()
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(2, 14))
    lens = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    lens[0] = T
    lookahead = data.draw(st.integers(1, 6))
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    steps = data.draw(st.integers(1, 40))
    p = resolve_parameters(fast.config.inference, attention_prior_lookahead_window=lookahead,
                           attention_prior_epsilon=eps)
    rows = 2 * B
    w = fast._work(B, rows, T, steps)
    w.text_lens.copy_(torch.tensor(lens))
    w.prior.fill_(eps), w.last.fill_(1), w.counters.zero_(), w.fin_present.zero_(), w.fin_count.zero_()
    w.unfinished.zero_(), w.ended.zero_(), w.in_end.zero_(), w.left_offset.zero_(), w.end_idx.fill_(BIG)
    w.step.zero_()
    ref = PriorState.new(B)
    end_indices: dict = {}
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for k in range(steps):
        # peaked scores so that the attended position moves, sticks and sinks
        scores = torch.rand(rows, T, generator=g) ** 8
        if data.draw(st.booleans()):
            scores[:, : max(1, T // 2)] += 1.0
        att = ref.most_attended(scores, lens, lookahead)
        prior = ref.build_prior(rows, T, lens, att, eps, lookahead, end_indices, "cpu")
        _prior_update(w, scores, p)
        assert w.attended[k].tolist() == att, k
        torch.testing.assert_close(w.prior, prior[:, 0], atol=0, rtol=0)
        assert w.fin_present.tolist() == [b in ref.finished_counter for b in range(B)]
        assert w.fin_count.tolist() == [ref.finished_counter.get(b, 0) for b in range(B)]
        assert w.unfinished.tolist() == [bool(ref.unfinished.get(b, False)) for b in range(B)]
        # an EOS event now and then (the fast path's EOS bookkeeping sets `in_end`: NeMo's end_indices)
        b = data.draw(st.integers(0, 3 * B))
        if b < B and b not in end_indices:
            end_indices[b] = k
            w.in_end[b] = True
        w.step.add_(1)


@SETTINGS
@given(data=st.data())
def test_chunk_prior_on_device_equals_build_chunk_prior(data):
    """A later generate_speech chunk: random scores, window lengths (short texts <= the short-sentence threshold
    and longer ones), left offsets (window starts far ahead of the last attended position too: negative window
    starts, Python slicing), the first position from the chunk state, items ended in earlier calls or at their
    chunk's end in this one, end_of_text per item, NeMo's ChunkedInferenceConfig or another: _chunk_prior_update
    equals PriorState.most_attended(left_offset) + build_chunk_prior + advance_finished over many steps (attended
    positions, prior, finished counters, unfinished flags), and flags the step where the reference raises NeMo's
    IndexError."""
    fast = _decoder()
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(2, 50))
    lens = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    lens[0] = T
    lookahead = data.draw(st.integers(1, 8))
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    steps = data.draw(st.integers(1, 30))
    cc = ChunkedInferenceConfig() if data.draw(st.booleans()) else ChunkedInferenceConfig(
        prior_weights=(0.3, 1.0, 0.5, 0.1), short_sentence_threshold=data.draw(st.integers(0, 20)),
        attention_sink_threshold=data.draw(st.integers(2, 6)), near_end_threshold=data.draw(st.integers(1, 5)),
        finished_limit_with_eot=data.draw(st.integers(0, 6)), finished_limit_without_eot=data.draw(st.integers(0, 3)))
    p = resolve_parameters(fast.config.inference, attention_prior_lookahead_window=lookahead,
                           attention_prior_epsilon=eps)
    rows = 2 * B
    off = data.draw(st.lists(st.integers(0, 3 * T), min_size=B, max_size=B))
    first = data.draw(st.lists(st.integers(0, 3 * T), min_size=B, max_size=B))
    eot = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    ended = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    w = fast._work(B, rows, T, steps)
    assert w.counters.shape[1] >= _counter_width(T, lookahead)
    w.text_lens.copy_(torch.tensor(lens))
    w.prior.fill_(eps), w.counters.zero_(), w.fin_present.zero_(), w.fin_count.zero_(), w.unfinished.zero_()
    w.chunk_err.zero_(), w.step.zero_()
    w.left_offset.copy_(torch.tensor(off)), w.last.copy_(torch.tensor(first)), w.eot.copy_(torch.tensor(eot))
    w.ended.copy_(torch.tensor(ended))
    ref = PriorState(list(first), [{} for _ in range(B)])
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for k in range(steps):
        scores = torch.rand(rows, T, generator=g) ** 8
        if data.draw(st.booleans()):
            scores[:, : max(1, T // 2)] += 1.0
        att = ref.most_attended(scores, lens, lookahead, off)
        finished = {b for b in range(B) if ended[b]}
        _chunk_prior_update(w, scores, p, cc)
        assert w.attended[k].tolist() == att, k
        try:
            prior = ref.build_chunk_prior(rows, T, lens, att, eps, off, finished, "cpu", cc.prior_weights,
                                          cc.short_sentence_threshold, cc.attention_sink_threshold,
                                          cc.near_end_threshold)
        except InferenceError:
            assert int(w.chunk_err) == k + 1
            return
        assert int(w.chunk_err) == 0
        ref.advance_finished(lambda b: cc.finished_limit_with_eot if eot[b] else cc.finished_limit_without_eot)
        torch.testing.assert_close(w.prior, prior[:, 0], atol=0, rtol=0)
        assert w.fin_present.tolist() == [b in ref.finished_counter for b in range(B)]
        assert w.fin_count.tolist() == [ref.finished_counter.get(b, 0) for b in range(B)]
        assert w.unfinished.tolist() == [bool(ref.unfinished.get(b, False)) for b in range(B)]
        b = data.draw(st.integers(0, 3 * B))  # an item's chunk ends now and then (the loop's chunk_end)
        if b < B:
            ended[b] = True
            w.ended[b] = True
        w.step.add_(1)


@SETTINGS
@given(data=st.data())
def test_sampling_edits_equal_edit_logits(data):
    """EOS banned for the unfinished items, only EOS for the finished ones (an item may be both: finished wins, as
    in NeMo's order), the forbidden specials (EOS too or not), sentence tracking on or off."""
    B, J = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    cb = data.draw(st.integers(1, 40))
    cfg = SimpleNamespace(codebook_size=cb, audio_eos_id=cb + data.draw(st.integers(0, 7)),
                          num_all_tokens_per_codebook=cb + 8)
    V = cfg.num_all_tokens_per_codebook
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    lg = torch.randn(B, J, V, generator=g)
    unfinished = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    finished = data.draw(st.lists(st.booleans(), min_size=B, max_size=B))
    forbidden = forbidden_tokens(cfg, data.draw(st.booleans()))
    only_eos = torch.arange(V) == cfg.audio_eos_id
    if data.draw(st.booleans()):  # sentence tracking on
        got = _edit_logits(lg, cfg.audio_eos_id, torch.tensor(unfinished), torch.tensor(finished), only_eos, forbidden)
        want = edit_logits(lg.clone(), cfg, {b: True for b in range(B) if unfinished[b]},
                           {b: 20 for b in range(B) if finished[b]}, forbidden)
    else:
        got = _edit_logits(lg, cfg.audio_eos_id, None, None, only_eos, forbidden)
        want = edit_logits(lg.clone(), cfg, {}, {}, forbidden)
    assert torch.equal(got, want)


def _codes_with_eos(data, g, B, C, S, eos):
    codes = torch.randint(0, eos + 3, (B, C, S), generator=g)
    dense = data.draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))  # how often a code is EOS: all-codebook hits happen too
    return torch.where(torch.rand(B, C, S, generator=g) < dense, eos, codes)


@SETTINGS
@given(data=st.data())
def test_eos_scan_equals_find_eos(data):
    """The first frame with EOS per item (any / all / zero_cb codebook), and the step's EOS frame from the two passes
    (the argmax pass's, or the earlier of both), for every eos_detection_method."""
    B, C, S = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4))
    eos = 9
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    am, sm = _codes_with_eos(data, g, B, C, S, eos), _codes_with_eos(data, g, B, C, S, eos)
    as_device = lambda found: [int(e) if e != float("inf") else BIG for e in found]  # noqa: E731
    for name, (_, detection) in EOS_METHODS.items():
        assert _first_eos(am, eos, detection).tolist() == as_device(find_eos(am, eos, detection))
        assert _eos_index(am, sm, eos, name).tolist() == as_device(eos_frames(am, sm, eos, name))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sampling_step_on_device_equals_sample_step(data):
    """A few steps of the decoder's own sampling methods (_post_a: edits, _post_b: top-k, temperature, the draw, the
    argmax pass, EOS bookkeeping) on random logits (EOS made likely now and then), random unfinished / finished
    items and EOS bans, with the noise drawn from a generator: the sampled codes equal sample_step's with the same
    generator seed (one (2*S*C, B, V) draw is its per-codebook stream), and the EOS frames, ended items and stop step
    equal what the reference loop derives from eos_frames on sample_step's two passes."""
    case = data.draw(st.sampled_from(["released_small", "four_codebooks", "stacked_lt"]))  # C 2 / 4, S 1 / 2
    fast = _decoder(case)
    cfg = fast.config
    C, S, V, eos = cfg.num_audio_codebooks, cfg.frame_stacking_factor, cfg.num_all_tokens_per_codebook, cfg.audio_eos_id
    B = data.draw(st.integers(1, 4))
    steps = data.draw(st.integers(1, 6))
    tracking = data.draw(st.booleans())
    p = resolve_parameters(cfg.inference, topk=data.draw(st.integers(1, V)),
                           temperature=data.draw(st.sampled_from([0.05, 0.7, 1.0, 2.0])),
                           eos_detection_method=data.draw(st.sampled_from(sorted(EOS_METHODS))),
                           ignore_finished_sentence_tracking=not tracking)
    w = fast._work(B, B, 8, steps)  # no CFG: rows = B
    w.ended.zero_(), w.end_idx.fill_(BIG), w.done_step.fill_(BIG), w.step.zero_()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    end_indices: dict = {}
    done_step = None
    for k in range(steps):
        logits = torch.randn(B, C * V * S, generator=g) * 3
        if data.draw(st.booleans()):  # EOS ahead in some items' codebooks
            lg3 = logits.view(B, S * C, V)
            lg3[:, :, eos] += torch.where(torch.rand(B, S * C, generator=g) < 0.6, 10.0, 0.0)
        unfinished = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
        fin_present = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
        fin_count = torch.tensor(data.draw(st.lists(st.integers(0, 25), min_size=B, max_size=B)))
        w.unfinished.copy_(unfinished), w.fin_present.copy_(fin_present), w.fin_count.copy_(fin_count)
        forbid_eos = data.draw(st.booleans())
        seed = data.draw(st.integers(0, 2**31 - 1))
        # the reference: NeMo's item sets and both passes, drawn from a generator
        fin = {b: int(fin_count[b]) for b in range(B) if fin_present[b] and fin_count[b] >= 20} if tracking else {}
        unf = {b: True for b in range(B) if unfinished[b]} if tracking else {}
        ref = sample_step(logits, cfg, p.temperature, p.topk, unf, fin, forbid_eos,
                          generator=torch.Generator().manual_seed(seed))
        # the fast path: the same generator stream as its noise, then its own two methods
        w.noise.exponential_(generator=torch.Generator().manual_seed(seed))
        lg = fast._post_a(w, logits, None, p, False, False, forbid_eos)
        fast._post_b(w, lg, None, p, False)
        assert torch.equal(w.out_codes[:, :, k * S: (k + 1) * S], ref.sampled), k
        assert torch.equal(w.codes_in, ref.sampled)
        # the argmax pass is an argmax: NeMo's multinomial over the top-1 set draws the same code (no ties here)
        assert torch.equal(lg.argmax(-1).view(B, S, C).transpose(1, 2), ref.argmax)
        found = eos_frames(ref.argmax, ref.sampled, eos, p.eos_detection_method)
        for b, e in enumerate(found):  # the reference loop's bookkeeping
            if b not in end_indices and e != float("inf"):
                end_indices[b] = k * S + int(e)
        if done_step is None and len(end_indices) == B and k + 1 >= MIN_FRAMES_FOR_CODEC:
            done_step = k
        assert w.ended.tolist() == [b in end_indices for b in range(B)]
        assert w.end_idx.tolist() == [end_indices.get(b, BIG) for b in range(B)]
        assert int(w.done_step) == (BIG if done_step is None else done_step)
