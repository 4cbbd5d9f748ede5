"""parity.report: the growth factor (a tensor's error next to its input's), worst index, and the plot's data."""

from __future__ import annotations

import json
import math

import torch

from parity.compare import compare_dumps
from parity.dump import write_dump
from parity.report import (AMPLIFIES, format_table, growth, is_report_png, plot, plot_data, residual_inputs,
                           short_label, to_json)


def _pair(tmp_path, errors: dict[str, float], steps=(0,)):
    """Dumps a (b + error at one element) and b over a decoder chain, every tensor (2, 1, 4)."""
    g = torch.Generator().manual_seed(0)
    ea, eb = [], []
    for s in steps:
        for name, e in errors.items():
            b = torch.randn(2, 1, 4, generator=g)
            a = b.clone()
            a[1, 0, 2] += e
            ea.append((name, s, a))
            eb.append((name, s, b))
    return compare_dumps(write_dump(tmp_path / "a", ea, source="trtllm"),
                         write_dump(tmp_path / "b", eb, source="reference"), progress=False)


CHAIN = {"decoder_input": 0.0, "decoder.layers.0.self_attention": 0.0, "decoder.layers.0.cross_attention": 1e-3,
         "decoder.layers.0": 1e-3, "decoder.layers.1": 0.5, "decoder.norm_out": 0.6}


def test_residual_inputs_follow_the_name_table():
    names = ["encoder.layers.0", "encoder.layers.1.pos_ff", "encoder.layers.1", "encoder.norm_out", *CHAIN,
             "final_proj", "logits", "inference.attn_prior"]
    got = residual_inputs(names)
    assert got["encoder.layers.0"] == "text_embedding" and got["encoder.layers.1.pos_ff"] == "encoder.layers.0"
    assert got["encoder.norm_out"] == "encoder.layers.1" and got["decoder_input"] is None
    assert got["decoder.layers.0.cross_attention"] == "decoder_input" and got["decoder.layers.1"] == "decoder.layers.0"
    assert got["decoder.norm_out"] == "decoder.layers.1" and got["final_proj"] == "decoder.norm_out"
    assert got["logits"] == "final_proj" and "inference.attn_prior" not in got


def test_growth_tells_born_from_amplified_and_inherited(tmp_path):
    res = _pair(tmp_path, CHAIN)
    g = growth(res)
    born = g[("decoder.layers.0.cross_attention", 0)]
    assert born.input == "decoder_input" and born.input_max_abs == 0 and math.isinf(born.factor)
    assert born.origin == "born"
    amp = g[("decoder.layers.1", 0)]
    # float32 storage: the planted 1e-3 and 0.5 come back to ~1e-7 relative (the ratio to 1e-3 of it)
    assert amp.origin == "amplifies" and abs(amp.factor - 500) < 0.5 and amp.factor >= AMPLIFIES
    inh = g[("decoder.norm_out", 0)]
    assert inh.origin == "inherits" and abs(inh.factor - 1.2) < 1e-3  # 0.6 / 0.5, same float32 rounding
    assert g[("decoder_input", 0)].input is None and g[("decoder_input", 0)].factor is None
    table = format_table(res)
    assert "x in" in table and "from 0" in table and "worst at" in table
    assert "error born (input within tolerance, output not): decoder.layers.0.cross_attention@0" in table
    assert "error amplified (output / input error >= 10): decoder.layers.1@0 (x 500 of decoder.layers.0)" in table
    rep = json.loads(json.dumps(to_json(res)))  # strict JSON: inf as a string
    t = next(t for t in rep["tensors"] if t["name"] == "decoder.layers.1")
    assert t["growth"]["origin"] == "amplifies" and t["growth"]["input"] == "decoder.layers.0"
    xattn = next(t for t in rep["tensors"] if t["name"] == "decoder.layers.0.cross_attention")
    assert xattn["growth"]["factor"] == "inf"


def test_worst_index_is_shown_where_compare_gives_it(tmp_path):
    res = _pair(tmp_path, CHAIN)
    t = next(t for t in res.tensors if t.name == "decoder.layers.1")
    if getattr(t, "worst_index", None) is None:  # parity.compare before worst_index: nothing to show
        return
    assert tuple(t.worst_index) == (1, 0, 2)
    assert "decoder.layers.1 step 0 at [1,0,2]" in format_table(res)
    assert next(x for x in to_json(res)["tensors"] if x["name"] == "decoder.layers.1")["worst_index"] == [1, 0, 2]


def test_plot_keeps_exact_zeros_as_zeros_and_draws_the_envelope(tmp_path):
    res = _pair(tmp_path, CHAIN, steps=(0, 1))
    d = plot_data(res)
    assert d.labels[d.names.index("decoder.layers.0.cross_attention")] == "dec.0.cross_attn"
    zeros = [y for _l, x, ys in d.series for xx, y in zip(x, ys) if d.names[xx] == "decoder_input"]
    assert zeros == [0.0, 0.0]  # not 1e-12: drawn on the axis' "0 (bit-identical)" row
    assert [label for label, _x, _y in d.series] == ["step 0", "step 1"]
    assert all(e is None for e in d.envelope)
    for t in res.tensors:  # a calibrated policy sets each result's envelope
        t.envelope = 2e-3
    assert plot_data(res).envelope == [2e-3] * len(d.names)
    png = plot(res, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and is_report_png(png)


def test_short_labels():
    assert short_label("encoder.layers.11.self_attention") == "enc.11.self_attn"
    assert short_label("context_encoder.norm_out") == "ctx.norm_out"
    assert short_label("decoder.layers.2.cross_attention.attn_probs") == "dec.2.cross_attn.probs"
    assert short_label("logits") == "logits"
