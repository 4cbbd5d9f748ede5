"""Would the decode step's GEMMs be faster with their weights already in L2, and can the attention's K/V stream
put them there? A model of one step (no model code): per layer, a kernel that streams KV_MB of "cache" through L2
(as the split-KV attention does) and then the layer's cuBLAS GEMM chain at the seed's shapes (o_net, cross-attention
q/o on 64 rows, FFN proj + GELU epilogue, FFN o_net, next qkv), 12 layers with their own weights (14.5 MB a layer,
174 MB in all: 3.5 times what L2 holds), captured in one CUDA graph and replayed.

Variants: the stream's loads plain or ``evict_first``; with or without the stream kernel's programs also issuing
``prefetch.global.L2::evict_last`` for every 128-byte line of the same layer's weights (one contiguous arena a layer).
Prints microseconds per layer for each, and the chain alone with hot / cold weights.

    python bench/l2_prefetch.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

D, FF, XD, ROWS, COND = 768, 3072, 128, 128, 64
SHAPES = {"o_net": (D, D), "xq": (XD, D), "xo": (D, XD), "ffn1": (FF, D), "ffn2": (D, FF), "qkv": (3 * D, D)}
LAYERS = 12
LINE = 64  # bf16 elements in a 128-byte line


@triton.jit
def stream_kernel(X, OUT, W, w_lines, LPP: tl.constexpr, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr,
                  PF: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if EVICT_FIRST:
        x = tl.load(X + offs, eviction_policy="evict_first")
    else:
        x = tl.load(X + offs)
    s = tl.sum(x.to(tl.float32), axis=0)
    if PF:
        line = tl.minimum(pid * LPP + tl.arange(0, LPP), w_lines - 1)
        z = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [W + line.to(tl.int64) * 64], dtype=tl.int32, is_pure=False, pack=1)
        s += tl.sum(z, axis=0).to(tl.float32)
    tl.store(OUT + pid, s)


def main() -> int:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    n_w = sum(a * b for a, b in SHAPES.values())
    arenas = [torch.randn(n_w, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
    weights = []
    for ar in arenas:
        off, ws = 0, {}
        for k, (o, i) in SHAPES.items():
            ws[k] = ar[off:off + o * i].view(o, i)
            off += o * i
        weights.append(ws)
    x = torch.randn(ROWS, D, device=dev, dtype=dt)
    x64 = x[:COND]
    c64 = torch.randn(COND, XD, device=dev, dtype=dt)
    h = torch.randn(ROWS, FF, device=dev, dtype=dt)
    zb = torch.zeros(FF, device=dev, dtype=dt)
    BLOCK = 4096
    out = {}

    def chain(ws):
        out["o"] = F.linear(x, ws["o_net"])
        out["q"] = F.linear(x64, ws["xq"])
        out["xo"] = F.linear(c64, ws["xo"])
        out["f1"] = torch._addmm_activation(zb, x, ws["ffn1"].t(), use_gelu=True)
        out["f2"] = F.linear(h, ws["ffn2"])
        out["qkv"] = F.linear(x, ws["qkv"])

    w_lines = n_w // LINE
    print(f"weights a layer {n_w * 2 / 1e6:.1f} MB ({w_lines} lines), {LAYERS} layers")
    print("| KV MB a layer | variant | us a layer | chain us (minus stream alone) |")
    print("| --- | --- | --- | --- |")
    hot = replay_us(lambda i: chain(weights[0]), calls=LAYERS, reps=50)
    cold = replay_us(lambda i: chain(weights[i % LAYERS]), calls=LAYERS, reps=50)
    print(f"| - | chain alone, hot weights (one layer's, repeated) | {hot:.2f} | {hot:.2f} |")
    print(f"| - | chain alone, 12 layers' weights in turn | {cold:.2f} | {cold:.2f} |")
    for kv_mb in (126, 64):
        n = kv_mb * 2**20 // 2 // BLOCK * BLOCK
        kv = torch.randn(n, device=dev, dtype=dt)
        progs = n // BLOCK
        lpp = triton.next_power_of_2(-(-w_lines // progs))
        sums = torch.empty(progs, device=dev, dtype=torch.float32)

        def stream(i, ef, pf):
            stream_kernel[(progs,)](kv, sums, arenas[i % LAYERS], w_lines, LPP=lpp, BLOCK=BLOCK, EVICT_FIRST=ef,
                                    PF=pf, num_warps=4)

        for ef in (False, True):
            for pf in (False, True):
                alone = replay_us(lambda i: stream(i, ef, pf), calls=LAYERS, reps=50)
                both = replay_us(lambda i: (stream(i, ef, pf), chain(weights[i % LAYERS])), calls=LAYERS, reps=50)
                name = f"stream {'evict_first' if ef else 'plain'}{' + prefetch' if pf else ''}"
                print(f"| {kv_mb} | {name}: alone | {alone:.2f} | |")
                print(f"| {kv_mb} | {name} + chain | {both:.2f} | {both - alone:.2f} |", flush=True)
        del kv
    return 0


if __name__ == "__main__":
    sys.exit(main())
