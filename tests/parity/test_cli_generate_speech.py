"""The do_tts path through the command line: ``batch`` (text -> NeMo's chunks), ``dump --mode generate-speech``
(reference and NeMo, one layout), ``compare``, ``infer --mode generate-speech``; the chunk-file format
(parity.chunks) shared with the fixtures; every bad input one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reference.inference import InferenceError
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, REPO, reference_model
from parity.cli import main

BAKED = FIXTURES / "dce_baked_v2607.nemo"  # 4 baked speakers, AR local transformer, frame stacking 2
BAKED_CHUNKS = FIXTURES / "dce_baked_v2607.chunks.safetensors"
CONTEXT = FIXTURES / "dce_context.nemo"  # a context encoder: speakers come as context codes
SHORT = "Hello there, how are you?"
# >= 45 words: NeMo's chunker splits it after each sentence (4 chunks)
LONG = ("I am up at six, so I go out to see if my ox is ok. We go to a pub to eat an egg or a bun, as we do! Then I "
        "go to bed and my ox is in his pen by me. So we go in to eat a bun.")


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def no_nemo_load(monkeypatch):
    """Fails the test if a command restores a NeMo model: the error must come before."""
    import parity.commands

    def boom(*a, **k):
        raise AssertionError("NeMo was loaded before the user error was found")

    monkeypatch.setattr(parity.commands, "_load_nemo", boom)


def _dump(tmp_path, source, chunks, out, *extra):
    return main(["dump", "--source", source, "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch",
                 str(chunks), "--out", str(tmp_path / out), *extra])


def _codes(dump):
    from parity.dump import DumpReader

    r = DumpReader(dump)
    return [(r.load("predicted_codes", k), r.load("predicted_codes_lens", k)) for k in range(r.layout["n_chunks"])]


# ---- the chunk-file format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dce_context", "dce_baked_v2607", "dce_baked_v2602", "dce_maskgit"])
def test_the_fixture_chunk_files_are_this_format_byte_for_byte(case):
    """make_fixtures writes its chunk files with parity.chunks: reading every set and writing them again gives the
    committed bytes."""
    from parity.chunks import chunk_file_bytes, chunk_set_names, read_chunk_set

    path = FIXTURES / f"{case}.chunks.safetensors"
    sets = [read_chunk_set(path, n) for n in chunk_set_names(path)]
    assert [s.name for s in sets] == ["gen1", "gen3"]
    assert chunk_file_bytes(sets) == path.read_bytes()


def test_text_windows_are_the_windows_nemo_recorded():
    from parity.chunks import read_chunk_set, text_windows
    from parity.dump import DumpReader

    cs = read_chunk_set(BAKED_CHUNKS, "gen3")
    states = DumpReader(FIXTURES / "dce_baked_v2607.gen3_lt_sampled_cfg").layout["chunk_states"]
    assert text_windows(cs.chunks) == [max(s["window_text_lens"]) for s in states]


# ---- the reference against NeMo's recorded generate_speech runs (no NeMo needed) -------------------------------


@pytest.mark.parametrize("label, chunk_set, extra", [
    ("gen3_lt_sampled_cfg", "gen3", ["--use-cfg"]),  # every step's logits, priors, attended positions
    ("gen3_lt_sampled_nocfg", "gen3", ["--no-steps"]),
    ("gen1_lt_sampled_cfg", "gen1", ["--use-cfg", "--no-steps"]),
])
def test_reference_dump_equals_nemos_recorded_dump(tmp_path, capsys, label, chunk_set, extra):
    """The fixture's seeding (torch.manual_seed once, before chunk 0) is the dump's: the same seed gives NeMo's
    codes, lengths, states and (where recorded) per-step tensors; compare passes with nothing missing."""
    from parity.dump import DumpReader

    nemo = FIXTURES / f"dce_baked_v2607.{label}"
    seed = DumpReader(nemo).layout["seed"]
    assert _dump(tmp_path, "reference", BAKED_CHUNKS, "ref", "--chunk-set", chunk_set, "--seed", str(seed),
                 *extra) == 0
    assert main(["compare", str(tmp_path / "ref"), str(nemo), "-q"]) == 0, capsys.readouterr().out
    for (a, la), (b, lb) in zip(_codes(tmp_path / "ref"), _codes(nemo)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_infer_generate_speech_concatenates_the_chunks_as_the_runner(tmp_path):
    """infer --mode generate-speech: each item's codes over its chunks (runner rule: padding chunks skipped), the
    codes NeMo recorded; --dump writes the same dump as dump --mode generate-speech."""
    from parity.chunks import read_chunk_set
    from parity.dump import DumpReader

    nemo = FIXTURES / "dce_baked_v2607.gen3_lt_sampled_cfg"
    seed = DumpReader(nemo).layout["seed"]
    out = tmp_path / "codes.safetensors"
    assert main(["infer", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--inputs", str(BAKED_CHUNKS),
                 "--chunk-set", "gen3", "--use-cfg", "--seed", str(seed), "--out", str(out),
                 "--dump", str(tmp_path / "d")]) == 0
    got = load_file(str(out))
    cs = read_chunk_set(BAKED_CHUNKS, "gen3")
    for b in range(cs.batch_size):
        parts = [codes[b, :, : int(lens[b])] for k, (codes, lens) in enumerate(_codes(nemo))
                 if not (cs.chunks[k]["end_of_text"][b] and int(cs.chunks[k]["batch"]["text_lens"][b]) == 1)]
        want = torch.cat(parts, dim=-1)
        assert int(got["predicted_codes_lens"][b]) == want.shape[-1]
        assert torch.equal(got["predicted_codes"][b, :, : want.shape[-1]], want)
    assert main(["compare", str(tmp_path / "d"), str(nemo), "-q"]) == 0


# ---- bad input: one line, exit 2 --------------------------------------------------------------------------------


def test_batch_without_nemo_is_one_line(tmp_path):
    """A Python where `import nemo` fails (NeMo not installed): batch says NeMo is needed, in one line, exit 2."""
    code = "import sys; sys.modules['nemo'] = None; from parity.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "b.safetensors"
    p = subprocess.run([sys.executable, "-c", code, "batch", "--checkpoint", str(BAKED), "--text", SHORT,
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "needs NeMo 3.0.0" in lines[0] and lines[0].startswith("magpie-parity batch: error:")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_batch_speaker_flags_against_the_checkpoint(tmp_path, capsys, no_nemo_load):
    out = str(tmp_path / "b.safetensors")
    base = ["batch", "--text", SHORT, "--out", out]
    line = one_line_error(capsys, base + ["--checkpoint", str(BAKED), "--speaker-index", "4"])
    assert "--speaker-index 4" in line and "bakes 4 speakers (0..3)" in line
    assert "--speaker-index -1" in one_line_error(capsys, base + ["--checkpoint", str(BAKED), "--speaker-index", "-1"])
    line = one_line_error(capsys, base + ["--checkpoint", str(CONTEXT), "--speaker-index", "0"])
    assert "--speaker-index 0" in line and "no baked speakers" in line and "--context-audio" in line
    line = one_line_error(capsys, base + ["--checkpoint", str(CONTEXT)])
    assert "no baked speakers" in line and "--context-audio CODES.safetensors is required" in line
    ctx = tmp_path / "ctx.safetensors"
    save_file({"context_audio_codes": torch.zeros(2, 5, dtype=torch.long)}, str(ctx))
    line = one_line_error(capsys, base + ["--checkpoint", str(BAKED), "--context-audio", str(ctx)])
    assert "--context-audio" in line and "bakes 4 speakers" in line
    assert "not allowed with argument" in one_line_error(
        capsys, base + ["--checkpoint", str(BAKED), "--speaker-index", "1", "--context-audio", str(ctx)])
    assert not os.path.exists(out)


@pytest.mark.parametrize("tensors, says", [
    ({"codes": torch.zeros(2, 5, dtype=torch.long)}, "no 'context_audio_codes' tensor"),
    ({"context_audio_codes": torch.zeros(2, 5)}, "must hold integer codes"),
    ({"context_audio_codes": torch.zeros(3, 2, 5, dtype=torch.long)}, "(C, T) or (1, C, T)"),
    ({"context_audio_codes": torch.zeros(2, 5, dtype=torch.long), "context_audio_codes_lens": torch.tensor([6])},
     "context_audio_codes_lens 6 outside [1, 5]"),
    ({"context_audio_codes": torch.zeros(2, 5, dtype=torch.long), "context_audio_codes_lens": torch.tensor([2, 3])},
     "must be one integer"),
])
def test_batch_bad_context_audio(tmp_path, capsys, no_nemo_load, tensors, says):
    ctx = tmp_path / "ctx.safetensors"
    save_file(tensors, str(ctx))
    line = one_line_error(capsys, ["batch", "--checkpoint", str(CONTEXT), "--text", SHORT, "--context-audio",
                                   str(ctx), "--out", str(tmp_path / "b.safetensors")])
    assert f"--context-audio {ctx}" in line and says in line


def test_batch_other_bad_arguments(tmp_path, capsys, no_nemo_load):
    out = tmp_path / "b.safetensors"
    base = ["batch", "--checkpoint", str(BAKED), "--out", str(out)]
    assert "--text: nothing to speak" in one_line_error(capsys, base + ["--text", "  "])
    assert "--language" in one_line_error(capsys, base + ["--text", SHORT, "--language", "../en"])
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    line = one_line_error(capsys, ["batch", "--checkpoint", str(BAKED), "--text", SHORT, "--out", str(notes)])
    assert "--out" in line and "is not a chunk file" in line and notes.read_text() == "my notes"
    line = one_line_error(capsys, ["batch", "--checkpoint", str(BAKED), "--text", SHORT, "--out", str(BAKED)])
    assert "--out" in line and "--checkpoint" in line


def _write_chunks(path, sets):
    from parity.chunks import chunk_file_bytes

    path.write_bytes(chunk_file_bytes(sets))
    return path


def test_chunks_that_one_chunk_state_cannot_carry(tmp_path, capsys):
    """Chunks of different batch sizes, a first chunk that does not begin the text, a plain batch, a file of
    several sets without --chunk-set, an unknown set: one line each, from dump and infer."""
    from parity.chunks import read_chunk_set

    gen3 = read_chunk_set(BAKED_CHUNKS, "gen3")
    mixed = read_chunk_set(BAKED_CHUNKS, "gen3")
    c1 = mixed.chunks[1]
    c1["batch"] = {k: v[:2] for k, v in c1["batch"].items()}
    c1["batch"]["text"] = c1["batch"]["text"][:, : int(c1["batch"]["text_lens"].max())]
    c1["end_of_text"] = c1["end_of_text"][:2]
    late = read_chunk_set(BAKED_CHUNKS, "gen1")
    late.chunks[0]["beginning_of_text"] = False
    cases = [
        (_write_chunks(tmp_path / "mixed.safetensors", [mixed]), "chunk 1: a batch of 2 items, chunk 0 has 3"),
        (_write_chunks(tmp_path / "late.safetensors", [late]), "chunk 0: beginning_of_text is false"),
        (FIXTURES / "dce_baked_v2607.batch.safetensors", "not a chunk file"),
        (BAKED_CHUNKS, "holds the chunk sets ['gen1', 'gen3']; name one (--chunk-set)"),
    ]
    for i, (path, says) in enumerate(cases):
        line = one_line_error(capsys, ["dump", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch",
                                       str(path), "--out", str(tmp_path / f"d{i}")])
        assert line.startswith(f"magpie-parity dump: error: --batch {path}") and says in line, line
        line = one_line_error(capsys, ["infer", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--inputs",
                                       str(path), "--out", str(tmp_path / f"c{i}.safetensors")])
        assert f"--inputs {path}" in line and says in line, line
    line = one_line_error(capsys, ["dump", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch",
                                   str(BAKED_CHUNKS), "--chunk-set", "gen9", "--out", str(tmp_path / "d")])
    assert "no chunk set 'gen9'" in line
    assert len(gen3.chunks) == 3 and not any(tmp_path.glob("d*")) and not any(tmp_path.glob("c*"))


def test_chunks_that_do_not_fit_the_checkpoint(tmp_path, capsys):
    from parity.chunks import ChunkSet, read_chunk_set

    gen1 = read_chunk_set(BAKED_CHUNKS, "gen1")
    gen1.chunks[0]["batch"]["speaker_indices"] = torch.tensor([0, 4, 1])
    path = _write_chunks(tmp_path / "spk.safetensors", [gen1])
    line = one_line_error(capsys, ["dump", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch",
                                   str(path), "--out", str(tmp_path / "d")])
    assert "chunk 0" in line and "speaker_indices" in line and "4 speakers" in line
    # released_small (decoder_context_tts): its text encoder has 64 positions; chunks of 51 then 49 tokens make
    # a second window of 69 (49 + 20 before it)
    rs = load_file(str(FIXTURES / "released_small.batch.safetensors"))
    ctx = {"context_audio_codes": rs["context_audio_codes"][1:2], "context_audio_codes_lens": rs["context_audio_codes_lens"][1:2]}
    chunks = [{"batch": {"text": torch.full((1, n), 5, dtype=torch.int32), "text_lens": torch.tensor([n]), **ctx},
               "end_of_text": [k == 1], "beginning_of_text": k == 0} for k, n in enumerate([51, 49])]
    path = _write_chunks(tmp_path / "long.safetensors", [ChunkSet("do_tts", chunks, tokenizer="english_chars")])
    base = ["dump", "--mode", "generate-speech", "--checkpoint", str(FIXTURES / "released_small.nemo"), "--batch",
            str(path), "--param", "topk=20", "--out", str(tmp_path / "d")]
    line = one_line_error(capsys, base + ["--no-local-transformer"])
    assert "chunk 1" in line and "window of 69 tokens" in line and "64 positions" in line
    line = one_line_error(capsys, base)
    assert "has no local transformer" in line and "--no-local-transformer" in line


def test_generate_speech_flags(tmp_path, capsys):
    out = str(tmp_path / "d")
    base = ["dump", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch", str(BAKED_CHUNKS),
            "--chunk-set", "gen1", "--out", out]
    line = one_line_error(capsys, base + ["--param", "maskgit_steps=4"])
    assert "maskgit_steps" in line and "maskgit_n_steps" in line
    assert "topk" in one_line_error(capsys, base + ["--param", "topk=0"])
    assert "--layers" in one_line_error(capsys, base + ["--layers"])
    assert "--kv-cache on" in one_line_error(capsys, base + ["--source", "nemo", "--kv-cache", "on"])
    line = one_line_error(capsys, ["dump", "--mode", "infer", "--checkpoint", str(BAKED), "--batch",
                                   str(FIXTURES / "dce_baked_v2607.batch.safetensors"), "--chunk-set", "gen1",
                                   "--out", out])
    assert "--chunk-set: only with --mode generate-speech" in line
    line = one_line_error(capsys, ["dump", "--mode", "generate-speech", "--checkpoint", str(FIXTURES / "dce_maskgit.nemo"),
                                   "--batch", str(FIXTURES / "dce_maskgit.chunks.safetensors"), "--chunk-set", "gen1",
                                   "--param", "maskgit_fixed_schedule=[1,3,4]", "--out", out])
    assert "maskgit_fixed_schedule" in line
    assert not os.path.exists(out)


def test_a_chunk_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "chunks.safetensors"
    os.mkfifo(fifo)
    line = one_line_error(capsys, ["dump", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--batch",
                                   str(fifo), "--out", str(tmp_path / "d")])
    assert f"--batch {fifo}: not a file" in line


# ---- end to end with NeMo: batch -> dump (reference, NeMo) -> compare -------------------------------------------


def _batch(tmp_path, name, text, *extra, checkpoint=BAKED):
    out = tmp_path / f"{name}.chunks.safetensors"
    assert main(["batch", "--checkpoint", str(checkpoint), "--text", text, "--out", str(out), *extra]) == 0
    return out


def _both_sources_agree(tmp_path, capsys, chunks, *extra, checkpoint=BAKED):
    for source in ("reference", "nemo"):
        assert main(["dump", "--source", source, "--mode", "generate-speech", "--checkpoint", str(checkpoint),
                     "--batch", str(chunks), "--out", str(tmp_path / source), *extra]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "reference"), str(tmp_path / "nemo")]) == 0
    assert "XX" not in capsys.readouterr().out
    ref, nemo = _codes(tmp_path / "reference"), _codes(tmp_path / "nemo")
    assert len(ref) == len(nemo)
    for (a, la), (b, lb) in zip(ref, nemo):
        assert torch.equal(a, b) and torch.equal(la, lb)
    return ref


@pytest.mark.nemo
def test_do_tts_short_text_reference_equals_nemo(tmp_path, capsys):
    """A short text is one chunk: speaker 2, CFG, the local transformer (do_tts's defaults), seeded top-k."""
    from parity.chunks import read_chunk_set

    path = _batch(tmp_path, "short", SHORT, "--speaker-index", "2")
    cs = read_chunk_set(path)
    assert (cs.name, cs.texts, cs.language, cs.tokenizer) == ("do_tts", [SHORT], "en", "english_chars")
    (c,) = cs.chunks
    assert c["end_of_text"] == [True] and c["beginning_of_text"] is True
    assert c["batch"]["text"].dtype == torch.int32 and c["batch"]["text"].shape == (1, int(c["batch"]["text_lens"][0]))
    assert c["batch"]["text_lens"].dtype == torch.int64 and c["batch"]["speaker_indices"].tolist() == [2]
    assert int(c["batch"]["text"][0, -1]) == reference_model("dce_baked_v2607").config.num_text_tokens - 1  # EOS
    _both_sources_agree(tmp_path, capsys, path, "--use-cfg", "--seed", "7")


@pytest.mark.nemo
def test_do_tts_long_text_chunks_reference_equals_nemo(tmp_path, capsys):
    """>= 45 words: one chunk per sentence, end_of_text on the last, beginning_of_text on the first; the chunks
    share one ChunkState in both loops: every chunk's codes, lengths, state and step tensors equal; infer's codes
    are the chunks' codes put together (do_tts); a run NeMo cannot do (its multi-chunk prior's IndexError) is one
    line from both sources."""
    from parity.chunks import read_chunk_set

    assert len(LONG.split()) >= 45
    path = _batch(tmp_path, "long", LONG)
    cs = read_chunk_set(path)
    n = len(cs.chunks)
    assert n == len(cs.chunk_texts[0]) == 4
    assert [c["end_of_text"] for c in cs.chunks] == [[k == n - 1] for k in range(n)]
    assert [c["beginning_of_text"] for c in cs.chunks] == [k == 0 for k in range(n)]
    assert all(c["batch"]["speaker_indices"].tolist() == [0] for c in cs.chunks)  # do_tts's None: speaker 0
    ref = _both_sources_agree(tmp_path, capsys, path, "--use-cfg", "--seed", "7")
    out = tmp_path / "codes.safetensors"
    assert main(["infer", "--mode", "generate-speech", "--checkpoint", str(BAKED), "--inputs", str(path),
                 "--use-cfg", "--seed", "7", "--out", str(out)]) == 0
    capsys.readouterr()
    got = load_file(str(out))
    want = torch.cat([codes[0, :, : int(lens[0])] for codes, lens in ref], dim=-1)
    assert got["predicted_codes_lens"].tolist() == [want.shape[-1]] and torch.equal(got["predicted_codes"][0], want)

    model = reference_model("dce_baked_v2607")
    for seed in range(32):  # a seed whose run NeMo fails (a lagging attention indexes past the window)
        state = model.create_chunk_state(1)
        torch.manual_seed(seed)
        try:
            for c in cs.chunks:
                model.generate_speech(c["batch"], state, c["end_of_text"], c["beginning_of_text"], use_cfg=True,
                                      use_local_transformer_for_inference=True)
        except InferenceError:  # the reference's one-line form of NeMo's IndexError
            break
    else:
        pytest.skip("no seed in 0..31 makes NeMo's multi-chunk prior fail on this text here")
    for source in ("reference", "nemo"):
        line = one_line_error(capsys, ["dump", "--source", source, "--mode", "generate-speech", "--checkpoint",
                                       str(BAKED), "--batch", str(path), "--use-cfg", "--seed", str(seed),
                                       "--out", str(tmp_path / f"fail_{source}")])
        assert "NeMo 3.0.0 fails the same way" in line and "seed" in line


@pytest.mark.nemo
def test_generate_speech_on_a_decoder_context_tts_checkpoint(tmp_path, capsys):
    """NeMo's generate_speech runs decoder_context_tts checkpoints too (their context codes): allowed, and equal.
    four_codebooks: no local transformer, KV cache on (one chunk: the runner's cached path)."""
    rs = load_file(str(FIXTURES / "four_codebooks.batch.safetensors"))
    ctx = tmp_path / "ctx.safetensors"
    save_file({"context_audio_codes": rs["context_audio_codes"][0], "context_audio_codes_lens": rs["context_audio_codes_lens"][0]}, str(ctx))
    ckpt = FIXTURES / "four_codebooks.nemo"
    path = _batch(tmp_path, "ctx", SHORT, "--context-audio", str(ctx), checkpoint=ckpt)
    c = load_file(str(path))
    n = int(rs["context_audio_codes_lens"][0])
    assert torch.equal(c["do_tts.chunk0.context_audio_codes"], rs["context_audio_codes"][:1, :, :n])
    _both_sources_agree(tmp_path, capsys, path, "--no-local-transformer", "--param", "topk=20", "--seed", "3",
                        checkpoint=ckpt)
    from parity.dump import DumpReader

    assert DumpReader(tmp_path / "nemo").layout["use_kv_cache"] is True
