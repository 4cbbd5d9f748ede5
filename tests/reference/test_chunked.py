"""``reference.chunked.generate_speech`` (NeMo's chunked generation, what ``do_tts`` calls) against NeMo 3.0.0.

The live tests build tiny NeMo ``decoder_ce`` models in-process (a context encoder, or a baked speaker table baked the
NeMo way; frame stacking 1 and 2; local transformer AR or MaskGit) and compare NeMo's ``generate_speech`` with the
reference's for one chunk and for three consecutive chunks sharing one state, items ending in different chunks, CFG
on and off, the local transformer off and on, greedy (top-1) and seeded top-k (``torch.manual_seed`` before each
call): the codes, the lengths and every field of the chunk state must be identical. The hypothesis tests check the
prior state machine's chunked rules against direct transcriptions of NeMo's code (and NeMo's own functions).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from reference.batch import BatchError
from reference.chunked import ChunkedInferenceConfig, create_chunk_state
from reference.inference import InferenceError, PriorState, chunk_initial_prior

CODEC = FIXTURES / "codec_2cb.nemo"
# (model name, frame stacking, local transformer, baked): what the live tests build (module scope, ~2 s each)
MODELS = {
    "ctx_ar_s2": dict(fsf=2, lt="autoregressive", seed=7),
    "ctx_maskgit_s1": dict(fsf=1, lt="maskgit", seed=11),
    "baked_ar_s2": dict(fsf=2, lt="autoregressive", seed=5, baked=True),
}
# Text chunk lengths per call (B = 3): windows past 35 tokens, so later chunks build NeMo's multi-chunk prior
# (shorter texts are unconstrained there); item 0's text ends with the first chunk and item 1's with the second
# (then 1-token [eos] padding chunks, end_of_text true, as NeMo's runner pads a batch).
CHUNK_LENS = [[40, 30, 38], [1, 41, 20], [1, 1, 25]]
END_OF_TEXT = [[True, False, False], [True, True, False], [True, True, True]]
PARAMS = dict(max_decoder_steps=32, min_generated_frames=4, temperature=0.7)


# ---- building NeMo models in-process (NeMo's own constructor and load path) -----------------------------------


def dce_config(fsf: int, lt: str) -> dict:
    from make_fixtures import _decoder, magpie_config, transformer_cfg

    extra = dict(
        model_type="decoder_ce",
        context_encoder=transformer_cfg(kernel_size=3, is_causal=False, n_layers=1, apply_norm_out=True,
                                        max_length_causal_mask=64),
        frame_stacking_factor=fsf,
        local_transformer_type=lt,
        local_transformer_hidden_dim=16,
        local_transformer_n_layers=2 if fsf > 1 else 1,
        local_transformer_n_heads=1,
    )
    if fsf > 1:  # NeMo rejects the training prior and the alignment loss with frame stacking
        extra.update(prior_scaling_factor=None, alignment_loss_scale=0.0)
    cfg = magpie_config(str(CODEC), encoder=transformer_cfg(kernel_size=3, is_causal=True, max_length_causal_mask=128),
                        decoder=_decoder(max_length_causal_mask=128), **extra)
    cfg["inference_parameters"]["topk"] = 20
    return cfg


def bake(nemo_model, context_codes: torch.Tensor, context_lens: torch.Tensor) -> None:
    """Bake the context encoder's outputs (one speaker per row) into the model, NeMo's way (NeMo 3.0.0 has no baking
    function): NeMo's prepare_context_tensors, then its load_state_dict with the baked keys."""
    B = context_codes.shape[0]
    with torch.no_grad():
        ct = nemo_model.prepare_context_tensors({
            "text": torch.full((B, 2), nemo_model.eos_id), "text_lens": torch.full((B,), 2),
            "context_audio_codes": context_codes, "context_audio_codes_lens": context_lens})
    emb, mask = ct.additional_decoder_input, ct.additional_decoder_mask
    N, T, D = emb.shape
    sd = dict(nemo_model.state_dict())
    sd["baked_context_embedding.weight"] = emb.reshape(N, T * D).clone()
    sd["_baked_embedding_T"], sd["_baked_embedding_D"] = torch.tensor(T), torch.tensor(D)
    sd["baked_context_embedding_len"] = mask.sum(1)
    nemo_model.load_state_dict(sd)
    assert nemo_model.has_baked_context_embedding


def build_pair(fsf: int, lt: str, seed: int, baked: bool = False):
    """(NeMo model, reference model with NeMo's weights, the context part of a batch of 3)."""
    from make_fixtures import _quiet_nemo, make_batch
    from omegaconf import OmegaConf

    _quiet_nemo()
    from nemo.collections.tts.models import MagpieTTSModel

    from reference import MagpieTTS

    torch.manual_seed(seed)
    nemo = MagpieTTSModel(cfg=OmegaConf.create(dce_config(fsf, lt)))
    nemo.eval()
    batch = make_batch(nemo, seed=seed + 100)
    if baked:
        g = torch.Generator().manual_seed(seed)
        bake(nemo, torch.randint(0, nemo.codebook_size, (3, nemo.num_audio_codebooks, 6), generator=g),
             torch.full((3,), 6))
        context = {"speaker_indices": [2, 0, 1]}
    else:
        context = {k: v for k, v in batch.items() if k.startswith("context")}
    ref = MagpieTTS.from_state_dict(OmegaConf.to_container(nemo.cfg, resolve=True), dict(nemo.state_dict()),
                                    where="nemo")
    return nemo, ref, context


@pytest.fixture(scope="module")
def pairs():
    return {name: build_pair(**spec) for name, spec in MODELS.items()}


def text_chunks(n_text_tokens: int, eos_id: int, lens: list[list[int]], seed: int):
    """Per call a (B, T) text of random tokens, each row ending with EOS (as do_tts's chunks end), and its lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for call in lens:
        text = torch.zeros(len(call), max(call), dtype=torch.long)
        for b, n in enumerate(call):
            text[b, : n - 1] = torch.randint(0, n_text_tokens - 2, (n - 1,), generator=g)
            text[b, n - 1] = eos_id
        out.append((text, torch.tensor(call)))
    return out


@contextlib.contextmanager
def nemo_parameters(nemo, **params):
    saved = copy.deepcopy(nemo.inference_parameters)
    for k, v in params.items():
        setattr(nemo.inference_parameters, k, v)
    try:
        yield
    finally:
        nemo.inference_parameters = saved


def state_fields(s) -> dict:
    return {
        "left_offset": list(s.left_offset), "end_indices": dict(s.end_indices), "overall_idx": s.overall_idx,
        "previous_attn_len": list(s.previous_attn_len),
        "last_attended_timesteps": [list(map(int, x)) for x in s.last_attended_timesteps],
    }


def run_both(nemo, ref, context, chunks, eots, use_cfg, lt, params, seed=0, maskgit=None, cached=False):
    """NeMo's and the reference's generate_speech over the chunks, one state each, seeded before every call; asserts
    identical codes, lengths and chunk state after every call (and the random stream after it). Returns (calls
    compared, NeMo's outputs, NeMo's chunk state after each call)."""
    maskgit = {f"maskgit_{k}": v for k, v in (maskgit or {}).items()}
    B = chunks[0][0].shape[0]
    sn, sr = nemo.create_chunk_state(B), ref.create_chunk_state(B)
    outs, states = [], []
    with nemo_parameters(nemo, **params):
        for k, (text, lens) in enumerate(chunks):
            batch = {**context, "text": text, "text_lens": lens}
            nemo.decoder.reset_cache(use_cache=cached)  # NeMo's generate_speech never resets it
            torch.manual_seed(seed + k)
            with torch.no_grad():
                on = nemo.generate_speech({kk: (v.clone() if torch.is_tensor(v) else v) for kk, v in batch.items()},
                                          chunk_state=sn, end_of_text=eots[k], beginning_of_text=k == 0,
                                          use_cfg=use_cfg, use_local_transformer_for_inference=lt, **maskgit)
            rng_nemo = torch.rand(3)
            torch.manual_seed(seed + k)
            orr = ref.generate_speech(batch, sr, eots[k], k == 0, use_cfg=use_cfg,
                                      use_local_transformer_for_inference=lt, use_kv_cache=cached, **maskgit, **params)
            assert torch.equal(rng_nemo, torch.rand(3)), f"call {k}: the random stream differs after the call"
            assert torch.equal(orr.predicted_codes_lens, on.predicted_codes_lens.cpu()), (
                k, orr.predicted_codes_lens, on.predicted_codes_lens)
            assert torch.equal(orr.predicted_codes, on.predicted_codes), f"call {k}: codes differ"
            assert orr.predicted_codes_lens.dtype == on.predicted_codes_lens.dtype == torch.long
            assert state_fields(sr) == state_fields(sn), f"call {k}"
            assert torch.equal(sr.history_text, sn.history_text) and torch.equal(sr.history_text_lens, sn.history_text_lens)
            assert torch.equal(sr.history_context_tensor, sn.history_context_tensor), f"call {k}: spliced encoder output"
            outs.append(on)
            states.append(state_fields(sn))
    return len(chunks), outs, states


# ---- live: NeMo's generate_speech ------------------------------------------------------------------------------

LIVE = [(m, cfg, lt, topk) for m in MODELS for cfg in (False, True) for lt in (False, True) for topk in (1, 20)]


@pytest.mark.nemo
@pytest.mark.parametrize("model, use_cfg, lt, topk", LIVE,
                         ids=[f"{m}-{'cfg' if c else 'nocfg'}-{'lt' if lt else 'nolt'}-top{k}" for m, c, lt, k in LIVE])
def test_one_and_three_chunks_equal_nemo(pairs, model, use_cfg, lt, topk):
    nemo, ref, context = pairs[model]
    one = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, [[11, 7, 9]], seed=1)
    n1, _, _ = run_both(nemo, ref, context, one, [[True] * 3], use_cfg, lt, dict(PARAMS, topk=topk), seed=3)
    three = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, CHUNK_LENS, seed=2)
    n3, _, _ = run_both(nemo, ref, context, three, END_OF_TEXT, use_cfg, lt, dict(PARAMS, topk=topk), seed=4)
    print(f"{model} cfg={use_cfg} lt={lt} top{topk}: {n1 + n3} generate_speech calls identical")


@pytest.mark.nemo
def test_items_end_in_different_chunks(pairs):
    """The ended-item paths run: an item whose text ended in an earlier call (window = its caller row, length 1,
    left_offset still moving, no splice, epsilon first prior) while others go on; with sentence tracking on too
    (NeMo's finished / unfinished items in chunks), a longer min_generated_frames and max_decoder_steps."""
    nemo, ref, context = pairs["ctx_ar_s2"]
    chunks = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, CHUNK_LENS, seed=2)
    ended_early = 0
    for track in (True, False):
        for seed in range(3):
            params = dict(PARAMS, topk=20, max_decoder_steps=48, min_generated_frames=8,
                          ignore_finished_sentence_tracking=track)
            _, _, states = run_both(nemo, ref, context, chunks, END_OF_TEXT, True, False, params, seed=10 * seed)
            ended_early += bool(states[-2]["end_indices"])  # some item's text ended before the last call
    assert ended_early


@pytest.mark.nemo
def test_cached_decoder_equals_nemo_with_its_cache_reset_on(pairs):
    """use_kv_cache=True equals NeMo whose decoder cache was reset with use_cache=True before each call."""
    nemo, ref, context = pairs["baked_ar_s2"]
    chunks = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, CHUNK_LENS, seed=2)
    run_both(nemo, ref, context, chunks, END_OF_TEXT, True, True, dict(PARAMS, topk=20), seed=5, cached=True)


@pytest.mark.nemo
def test_maskgit_options_in_chunks(pairs):
    nemo, ref, context = pairs["ctx_maskgit_s1"]
    chunks = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, CHUNK_LENS, seed=2)
    for mg in (dict(n_steps=4, noise_scale=0.3), dict(fixed_schedule=[0, 1], dynamic_cfg_scale=True),
               dict(sampling_type="purity_causal")):
        run_both(nemo, ref, context, chunks, END_OF_TEXT, True, True, dict(PARAMS, topk=20), seed=7, maskgit=mg)


@pytest.mark.nemo
def test_prior_off_and_layer_options(pairs):
    """apply_attention_prior off (a later chunk keeps its first prior for every step, no forced chunk end);
    prior / alignment layer subsets."""
    nemo, ref, context = pairs["ctx_ar_s2"]
    chunks = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, CHUNK_LENS, seed=2)
    for extra in (dict(apply_attention_prior=False), dict(apply_prior_to_layers=[1, 2], estimate_alignment_from_layers=[0]),
                  dict(eos_detection_method="argmax_all", attention_prior_lookahead_window=3)):
        run_both(nemo, ref, context, chunks, END_OF_TEXT, True, False, dict(PARAMS, topk=20, **extra), seed=9)


# ---- no NeMo: the reference against NeMo's recorded generate_speech runs (fixtures/data/<case>.gen<N>_<run>) -------


def _generate_dumps():
    return sorted(p.name for p in FIXTURES.glob("dce_*.gen*") if p.is_dir())


@pytest.mark.parametrize("dump", _generate_dumps() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no generate_speech fixtures under fixtures/data (fixtures/make_fixtures.py writes them)"))])
def test_generate_speech_equals_nemos_recorded_runs(dump):
    """Every chunk's codes, lengths, chunk state, first prior and attended positions (and, where recorded, every
    step's prior) equal NeMo's dump of the same calls (seeded once, before the first chunk, as recorded)."""
    from conftest import reference_model
    from parity.dump import DumpReader

    nemo = DumpReader(FIXTURES / dump)
    lay = nemo.layout
    assert lay["mode"] == "generate_speech"
    model = reference_model(dump.split(".")[0])
    params = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in lay["params"].items()}
    maskgit = {f"maskgit_{k}": v for k, v in lay.get("maskgit", {}).items()}
    names = {e.name for e in nemo.entries}
    inputs = sorted(n for n in names if n.startswith("chunk.") and n not in ("chunk.end_of_text", "chunk.beginning_of_text"))
    state = None
    torch.manual_seed(lay["seed"])
    for k in range(lay["n_chunks"]):
        batch = {n[len("chunk."):]: nemo.load(n, k) for n in inputs}
        if state is None:
            state = model.create_chunk_state(int(batch["text"].shape[0]))
        out = model.generate_speech(batch, state, nemo.load("chunk.end_of_text", k).tolist(),
                                    bool(nemo.load("chunk.beginning_of_text", k)), use_cfg=lay["use_cfg"],
                                    use_local_transformer_for_inference=lay["use_local_transformer_for_inference"],
                                    use_kv_cache=lay["use_kv_cache"], **maskgit, **params)
        assert torch.equal(out.predicted_codes_lens, nemo.load("predicted_codes_lens", k)), k
        assert torch.equal(out.predicted_codes, nemo.load("predicted_codes", k)), k
        want = lay["chunk_states"][k]
        assert (state.left_offset, {str(i): v for i, v in state.end_indices.items()}, state.overall_idx,
                state.previous_attn_len, state.history_text_lens.tolist()) == (
            want["left_offset"], want["end_indices"], want["overall_idx"], want["previous_attn_len"],
            want["window_text_lens"]), k
        first, n_steps = lay["chunk_steps"][k]
        assert out.num_steps == n_steps, k
        if "inference.chunk_initial_prior" in names and k > 0:
            assert torch.equal(out.step_priors[0], nemo.load("inference.chunk_initial_prior", k)), k
        if "inference.chunk_attended_text_positions" in names:
            got = torch.tensor(out.attended_text_positions, dtype=torch.long).reshape(-1, state.batch_size)
            assert torch.equal(got, nemo.load("inference.chunk_attended_text_positions", k)), k
        if "inference.attn_prior" in names:
            for idx, prior in out.built_priors.items():
                assert torch.equal(prior, nemo.load("inference.attn_prior", first + idx)), (k, idx)


# ---- no NeMo: the API's contract ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_model():
    from conftest import reference_model

    return reference_model("stacked_lt")


def _chunk(ref, lens, seed=0):
    from conftest import infer_inputs, load_batch

    text, tl = text_chunks(ref.config.num_text_tokens, ref.config.text_eos_id, [lens], seed)[0]
    ctx = {k: v[: len(lens)] for k, v in infer_inputs(load_batch("stacked_lt")).items() if k.startswith("context")}
    ctx["context_audio_codes"] = ctx["context_audio_codes"][..., : int(ctx["context_audio_codes_lens"].max())]
    return {**ctx, "text": text, "text_lens": tl}


def test_chunked_config_and_state_defaults_are_nemos():
    c = ChunkedInferenceConfig()
    assert (c.history_len_heuristic, c.prior_weights_init, c.prior_weights, c.finished_limit_with_eot,
            c.finished_limit_without_eot, c.finished_limit_first_chunk, c.forceful_chunk_end_threshold,
            c.argmax_temperature, c.short_sentence_threshold, c.attention_sink_threshold, c.near_end_threshold) == (
        20, (0.5, 1.0, 0.8, 0.2, 0.2), (0.2, 1.0, 0.6, 0.4, 0.2, 0.2), 5, 1, 20, 3, 0.01, 35, 10, 3)
    s = create_chunk_state(3)
    assert (s.batch_size, s.history_text, s.history_text_lens, s.history_context_tensor, s.end_indices, s.overall_idx,
            s.left_offset, s.previous_attn_len, s.last_attended_timesteps) == (
        3, None, None, None, {}, 0, [0, 0, 0], [], [[1, 1, 1]])


def test_bad_chunk_state_or_arguments_are_one_line_errors(ref_model):
    b3 = _chunk(ref_model, [9, 7, 5])
    cases = [
        (BatchError, "made for a batch of 2", lambda: ref_model.generate_speech(b3, create_chunk_state(2), [True] * 3, True, topk=20)),
        (BatchError, "end_of_text", lambda: ref_model.generate_speech(b3, create_chunk_state(3), [True] * 2, True, topk=20)),
        (BatchError, "end_of_text", lambda: ref_model.generate_speech(b3, create_chunk_state(3), True, True, topk=20)),
        (InferenceError, "beginning_of_text=False on a fresh",
         lambda: ref_model.generate_speech(b3, create_chunk_state(3), [True] * 3, False, topk=20)),
        (InferenceError, "must be a ChunkState", lambda: ref_model.generate_speech(b3, object(), [True] * 3, True, topk=20)),
        (BatchError, "batch_size", lambda: create_chunk_state(0)),
        (InferenceError, "local transformer",  # stacked_lt's LT is AR: MaskGit options are ignored, not refused
         lambda: reference_model_without_lt().generate_speech(b3, create_chunk_state(3), [True] * 3, True, topk=20,
                                                              use_local_transformer_for_inference=True)),
    ]
    # a state used with a batch of 3, then handed a batch of 2 (its batch_size edited too): still refused
    s = create_chunk_state(3)
    ref_model.generate_speech(b3, s, [False] * 3, True, max_decoder_steps=8, topk=20)
    s.batch_size = 2
    cases.append((BatchError, "does not fit a batch of 2",
                  lambda: ref_model.generate_speech(_chunk(ref_model, [9, 7]), s, [True] * 2, False, topk=20)))
    for exc, match, call in cases:
        with pytest.raises(exc, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def reference_model_without_lt():
    from conftest import reference_model

    return reference_model("released_small")


def test_the_callers_batch_is_not_mutated(ref_model):
    s = create_chunk_state(3)
    for k, lens in enumerate([[9, 7, 5], [6, 8, 3]]):
        b = _chunk(ref_model, lens, seed=k)
        before = {kk: v.clone() for kk, v in b.items()}
        ref_model.generate_speech(b, s, [k == 1] * 3, k == 0, max_decoder_steps=8, topk=20)
        assert b.keys() == before.keys() and all(torch.equal(b[kk], before[kk]) for kk in b)
    assert s.history_text_lens is not b["text_lens"]


def test_one_chunk_equals_infer_batch_where_nemo_says_so(ref_model):
    """NeMo (verified on its side): one chunk with start_prior_after_n_audio_steps=0 gives infer_batch's codes. The
    loops differ only in when they stop (infer_batch needs >= 4 steps) and in the length of an item without EOS
    (max_decoder_steps vs the steps run); where every item ended, the lengths are equal too."""
    b = _chunk(ref_model, [9, 7, 5], seed=3)
    for use_cfg in (False, True):
        for lt in (False, True):
            for seed in range(3):
                state = create_chunk_state(3)
                torch.manual_seed(seed)
                g = ref_model.generate_speech(b, state, [True] * 3, True, use_cfg=use_cfg, topk=20,
                                              use_local_transformer_for_inference=lt, start_prior_after_n_audio_steps=0)
                torch.manual_seed(seed)
                i = ref_model.infer_batch(dict(b), use_cfg=use_cfg, topk=20, use_local_transformer_for_inference=lt,
                                          start_prior_after_n_audio_steps=0)
                n = min(g.predicted_codes.shape[2], i.predicted_codes.shape[2])
                assert torch.equal(g.predicted_codes[:, :, :n], i.predicted_codes[:, :, :n])
                if len(state.end_indices) == 3:
                    assert torch.equal(g.predicted_codes_lens, i.predicted_codes_lens)


# ---- the prior state machine's chunked rules, for all inputs -------------------------------------------------------


def nemo_most_attended(scores, last, text_lens, lookahead, counters, left_offset):
    """NeMo 3.0.0's get_most_attended_text_timestep, transcribed (torch slicing, as NeMo)."""
    out = []
    for b in range(len(text_lens)):
        t_last = last[b]
        if counters[b].get(t_last, 0) >= 8:
            t_last += 1
        w0 = t_last - left_offset[b]
        w1 = min(w0 + lookahead, text_lens[b] - 3)
        s = scores[b, w0:w1]
        t = int(text_lens[b].item()) - 1 + left_offset[b] if s.size(0) == 0 else s.argmax().item() + t_last
        out.append(t)
        counters[b][t] = counters[b].get(t, 0) + 1
    return out


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 24))
    lens = [draw(st.integers(1, T)) for _ in range(B)]
    lens[draw(st.integers(0, B - 1))] = T
    offs = [draw(st.integers(0, 40)) for _ in range(B)]
    last = [draw(st.integers(max(0, o - 30), o + T + 4)) for o in offs]
    counters = [{t: draw(st.integers(0, 12)) for t in draw(st.lists(st.integers(0, 60), max_size=6))} for _ in range(B)]
    scores = draw(st.lists(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 0.3]), min_size=T, max_size=T),
                           min_size=B, max_size=B))
    return torch.tensor(scores), lens, offs, last, counters, draw(st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(attention_case())
def test_most_attended_with_left_offset_is_nemos_rule(case):
    """Negative window starts (the attention lagging the window) slice from the row's end, as NeMo's torch slicing."""
    scores, lens, offs, last, counters, lookahead = case
    st_ = PriorState(list(last), copy.deepcopy(counters))
    got = st_.most_attended(scores, lens, lookahead, offs)
    want_counters = copy.deepcopy(counters)
    want = nemo_most_attended(scores, last, torch.tensor(lens), lookahead, want_counters, offs)
    assert got == want and st_.counters == want_counters and st_.last_attended == want
    assert st_.stuck_end == [max((t + 1 for t, c in d.items() if c >= 10), default=0) for d in want_counters]


def nemo_multi_chunk_prior(eps, rows, T, text_lens, attended, counters, unfinished, finished_counter, end_indices,
                           chunk_end, B, left_offset, cc=ChunkedInferenceConfig()):
    """NeMo 3.0.0's construct_multi_chunk_prior with its three helpers, transcribed (torch indexing, as NeMo)."""
    eps_sq = eps * eps
    prior = torch.full((rows, 1, T), eps)
    for b in range(min(rows, B)):
        n = int(text_lens[b])
        pos = attended[b] - left_offset[b]
        fin = b in end_indices or b in chunk_end
        if n <= cc.short_sentence_threshold:
            prior[b, 0, :] = 1.0
        else:
            w = cc.prior_weights
            he = max(1, pos - 1)
            prior[b, 0, :he] = eps_sq
            prior[b, 0, he] = w[0]
            prior[b, 0, pos] = w[1]
            for off, wt in enumerate(w[2:], start=1):
                if pos + off < n:
                    prior[b, 0, pos + off] = wt
            fs = pos + len(w) - 1
            if fs < n:
                prior[b, 0, fs:] = eps_sq
        if not fin:
            for t, c in counters[b].items():
                if t > left_offset[b] and c >= cc.attention_sink_threshold:
                    prior[b, 0, : t - left_offset[b] + 1] = eps_sq
        near = pos >= n - cc.near_end_threshold
        unfinished[b] = not near and not fin
        if near or fin:
            finished_counter.setdefault(b, 0)
    return prior


@st.composite
def chunk_prior_case(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(6, 60))
    lens = [draw(st.integers(1, T)) for _ in range(B)]
    lens[0] = T
    offs = [draw(st.integers(0, 50)) for _ in range(B)]
    # positions inside the window, or lagging it by at most the row (negative indices from the row's end)
    attended = [o + draw(st.integers(-T + 1, max(0, lens[b] - 6))) for b, o in enumerate(offs)]
    counters = [{t: draw(st.integers(1, 12)) for t in draw(st.lists(st.integers(0, 60), max_size=5))} for _ in range(B)]
    ended = set(draw(st.lists(st.integers(0, B - 1), max_size=2)))
    chunk_end = set(draw(st.lists(st.integers(0, B - 1), max_size=2)))
    eps = draw(st.sampled_from([0.1, 0.01, 1e-3, 0.3]))
    return B, T, lens, offs, attended, counters, ended, chunk_end, eps, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(chunk_prior_case())
def test_build_chunk_prior_is_nemos_multi_chunk_prior(case):
    B, T, lens, offs, attended, counters, ended, chunk_end, eps, cfg_rows = case
    rows = 2 * B if cfg_rows else B
    try:
        want_u, want_f = {}, {}
        want = nemo_multi_chunk_prior(eps, rows, T, lens, attended, counters, want_u, want_f, ended, chunk_end, B, offs)
    except IndexError:
        with pytest.raises(IndexError):
            PriorState(attended, counters).build_chunk_prior(rows, T, lens, attended, eps, offs, ended | chunk_end, "cpu")
        return
    st_ = PriorState(attended, counters)
    got = st_.build_chunk_prior(rows, T, lens, attended, eps, offs, ended | chunk_end, "cpu")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert st_.unfinished == want_u and st_.finished_counter == want_f


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.data(), st.sampled_from([0.1, 0.01, 1e-3]), st.booleans())
def test_chunk_initial_prior_is_nemos(B, T, data, eps, cfg_rows):
    rows = 2 * B if cfg_rows else B
    starts = [data.draw(st.one_of(st.none(), st.integers(0, T - 1))) for _ in range(B)]
    want = torch.zeros(rows, 1, T) + eps  # NeMo's _initialize_chunked_attn_prior
    for i, start in enumerate(starts):
        if start is None:
            continue
        want[i, :, :start] = eps * eps
        for off, w in enumerate((0.5, 1.0, 0.8, 0.2, 0.2)):
            if start + off < T:
                want[i, :, start + off] = w
    assert torch.equal(chunk_initial_prior(rows, T, starts, eps, "cpu"), want)


@pytest.mark.nemo
@settings(max_examples=60, deadline=None)
@given(attention_case(), chunk_prior_case())
def test_prior_rules_equal_nemos_own_functions(att, ch):
    """The same two rules against NeMo's own methods (they read nothing of the model but its chunked config)."""
    from types import SimpleNamespace

    from nemo.collections.tts.models.magpietts import ChunkedInferenceConfig as NemoCC
    from nemo.collections.tts.models.magpietts import MagpieTTSModel as M

    scores, lens, offs, last, counters, lookahead = att
    want_counters = copy.deepcopy(counters)
    want, _ = M.get_most_attended_text_timestep(None, scores, [last], torch.tensor(lens), lookahead, want_counters,
                                                len(lens), left_offset=offs)
    st_ = PriorState(list(last), copy.deepcopy(counters))
    assert st_.most_attended(scores, lens, lookahead, offs) == want and st_.counters == want_counters

    B, T, lens, offs, attended, counters, ended, chunk_end, eps, cfg_rows = ch
    fake = SimpleNamespace(chunked_inference_config=NemoCC())
    for name in ("_set_attention_prior_weights", "_penalize_attention_sinks", "_update_text_completion_state"):
        setattr(fake, name, getattr(M, name).__get__(fake))
    rows = 2 * B if cfg_rows else B
    u, f = {}, {}
    try:
        want, u, f = M.construct_multi_chunk_prior(fake, eps, torch.zeros(rows, T), torch.tensor(lens), attended,
                                                   counters, u, f, {i: 0 for i in ended}, {i: 0 for i in chunk_end}, B,
                                                   offs)
    except IndexError:
        return
    st_ = PriorState(attended, counters)
    assert torch.equal(st_.build_chunk_prior(rows, T, lens, attended, eps, offs, ended | chunk_end, "cpu"), want)
    assert st_.unfinished == u and st_.finished_counter == f
