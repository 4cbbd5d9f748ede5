"""Premise test for a persistent per-layer kernel: can one launch that keeps every SM busy run a decoder layer's GEMM
chain faster than cuBLAS's six launches? No model code: 12 layers with their own weights (the seed's shapes: o_net,
cross-attention q / o, FFN proj + GELU, FFN o_net, next qkv; 128 rows throughout, so the cross-attention products are
pessimistic by their 64 unconditional rows), bf16 in, float32 accumulation, bf16 out of every product.

One program per SM walks every phase of every layer; phases are separated by a grid-wide barrier (an atomic counter
and a spin; all programs are resident, one per SM). A product is split over (column block, K slice) tiles so that
~100 programs take part; with more than one K slice the float32 partials are summed in a fixed order by a reduce
phase (deterministic), which costs a second barrier.

Prints microseconds per layer: cuBLAS's chain (the fast path's GEMMs today), the floors of six dependent launches
(elementwise kernels, empty kernels), and for each tiling the persistent kernel as is, with each program also issuing
L2 prefetches of its next product's weight tile before it waits at a barrier, and with its products skipped (the
barriers' own cost). Checks the kernel's output against the same chain in PyTorch. ``--floors-only``: cuBLAS and the
launch floors; ``--warps N``: warps a program (8).

    python bench/persistent_chain.py [--warps 4] [--floors-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

D, FF, XD, M = 768, 3072, 128, 128
MR = tl.constexpr(M)  # rows, as the kernels see it
# (name, N out, K in) in chain order; each product's input is the previous one's output (the first layer's: a0,
# later layers': the first D columns of the previous layer's qkv)
CHAIN = [("o_net", D, D), ("xq", XD, D), ("xo", D, XD), ("ffn1", FF, D), ("ffn2", D, FF), ("qkv", 3 * D, D)]
LAYERS = 12


@triton.jit
def _grid_sync(BAR, target):
    # every program arrives (release: its stores before the barrier are visible to whoever acquires after), then
    # spins until all have; the cap only turns a hang into a wrong result the host check reports
    tl.debug_barrier()
    tl.atomic_add(BAR, 1, sem="release", scope="gpu")
    cnt = tl.load(BAR, volatile=True)
    it = 0
    while (cnt < target) & (it < 100_000):
        cnt = tl.load(BAR, volatile=True)
        it += 1
    tl.atomic_add(BAR + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _empty_kernel(X):
    pass


@triton.jit
def _gelu(x):
    # tanh approximation, as the CUDA epilogue the fast path uses
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0))


@triton.jit
def _prefetch_tile(W, pid, NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr,
                   S: tl.constexpr, LINES: tl.constexpr):
    # L2 prefetch of this program's first tile of a product: rows n of W, its K slice (128-byte lines)
    NT: tl.constexpr = N // BN
    KS: tl.constexpr = K // S
    if pid < NT * S:
        nt = pid % NT
        s = pid // NT
        LPR: tl.constexpr = (KS * 2 + 127) // 128  # lines a weight row's slice spans
        i = tl.minimum(tl.arange(0, LINES), BN * LPR - 1)
        addr = W + (nt * BN + i // LPR).to(tl.int64) * K + s * KS + (i % LPR) * 64
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemm_phase(X, sx, W, Y, P, pid, NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, S: tl.constexpr, GELU: tl.constexpr, MROWS: tl.constexpr):
    # Y[:, :N] = X[:, :K] @ W.T for MROWS rows. One tile = (column block of BN, K slice of K // S). S == 1: the tile
    # writes bf16 (GELU applied); else float32 partials P[s] for the reduce phase.
    NT: tl.constexpr = N // BN
    KS: tl.constexpr = K // S
    m = tl.arange(0, MROWS)
    for t in range(pid, NT * S, NPROG):
        nt = t % NT
        s = t // NT
        n = nt * BN + tl.arange(0, BN)
        acc = tl.zeros([MROWS, BN], dtype=tl.float32)
        for k0 in range(0, KS, BK):
            k = s * KS + k0 + tl.arange(0, BK)
            x = tl.load(X + m[:, None] * sx + k[None, :], cache_modifier=".cg")
            w = tl.load(W + n[:, None] * K + k[None, :])
            acc = tl.dot(x, tl.trans(w), acc)
        if S == 1:
            if GELU:
                acc = _gelu(acc)
            tl.store(Y + m[:, None] * N + n[None, :], acc.to(tl.bfloat16))
        else:
            tl.store(P + s * MROWS * N + m[:, None] * N + n[None, :], acc)


@triton.jit
def _reduce_phase(P, Y, pid, NPROG: tl.constexpr, N: tl.constexpr, S: tl.constexpr, GELU: tl.constexpr,
                  RB: tl.constexpr, MROWS: tl.constexpr):
    for c in range(pid, MROWS * N // RB, NPROG):
        o = c * RB + tl.arange(0, RB)
        acc = tl.load(P + o, cache_modifier=".cg")
        for s in tl.static_range(1, S):  # fixed order: deterministic
            acc += tl.load(P + s * MROWS * N + o, cache_modifier=".cg")
        if GELU:
            acc = _gelu(acc)
        tl.store(Y + o, acc.to(tl.bfloat16))


@triton.jit
def _product(X, sx, W, Y, P, BAR, nsync, pid, NPROG: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr, S: tl.constexpr, RB: tl.constexpr, GELU: tl.constexpr,
             SKIP: tl.constexpr, W_NEXT, N2: tl.constexpr, K2: tl.constexpr, BN2: tl.constexpr, S2: tl.constexpr,
             PF: tl.constexpr, PF_LINES2: tl.constexpr):
    if not SKIP:
        _gemm_phase(X, sx, W, Y, P, pid, NPROG, N, K, BN, BK, S, GELU, MR)
    if S > 1:
        nsync += 1
        _grid_sync(BAR, nsync * NPROG)
        if not SKIP:
            _reduce_phase(P, Y, pid, NPROG, N, S, GELU, RB, MR)
    if PF:
        _prefetch_tile(W_NEXT, pid, NPROG, N2, K2, BN2, S2, PF_LINES2)
    nsync += 1
    _grid_sync(BAR, nsync * NPROG)
    return nsync


@triton.jit
def chain_kernel(WS, layer_stride, OUT0, OUT1, OUT2, OUT3, OUT4, QKV, P, BAR, NPROG: tl.constexpr,
                 LAYERS: tl.constexpr, SKIP: tl.constexpr, PF: tl.constexpr,
                 BN0: tl.constexpr, BK0: tl.constexpr, S0: tl.constexpr, RB0: tl.constexpr, L0: tl.constexpr,
                 BN1: tl.constexpr, BK1: tl.constexpr, S1: tl.constexpr, RB1: tl.constexpr, L1: tl.constexpr,
                 BN2: tl.constexpr, BK2: tl.constexpr, S2: tl.constexpr, RB2: tl.constexpr, L2: tl.constexpr,
                 BN3: tl.constexpr, BK3: tl.constexpr, S3: tl.constexpr, RB3: tl.constexpr, L3: tl.constexpr,
                 BN4: tl.constexpr, BK4: tl.constexpr, S4: tl.constexpr, RB4: tl.constexpr, L4: tl.constexpr,
                 BN5: tl.constexpr, BK5: tl.constexpr, S5: tl.constexpr, RB5: tl.constexpr, L5: tl.constexpr):
    pid = tl.program_id(0)
    nsync = pid * 0
    W_O: tl.constexpr = 0
    W_XQ: tl.constexpr = W_O + 768 * 768
    W_XO: tl.constexpr = W_XQ + 128 * 768
    W_F1: tl.constexpr = W_XO + 768 * 128
    W_F2: tl.constexpr = W_F1 + 3072 * 768
    W_QKV: tl.constexpr = W_F2 + 768 * 3072
    for layer in range(LAYERS):
        w = WS + layer * layer_stride
        w_next = WS + tl.minimum(layer + 1, LAYERS - 1) * layer_stride
        nsync = _product(QKV, 2304, w + W_O, OUT0, P, BAR, nsync, pid, NPROG, 768, 768, BN0, BK0, S0, RB0, False,
                         SKIP, w + W_XQ, 128, 768, BN1, S1, PF, L1)
        nsync = _product(OUT0, 768, w + W_XQ, OUT1, P, BAR, nsync, pid, NPROG, 128, 768, BN1, BK1, S1, RB1, False,
                         SKIP, w + W_XO, 768, 128, BN2, S2, PF, L2)
        nsync = _product(OUT1, 128, w + W_XO, OUT2, P, BAR, nsync, pid, NPROG, 768, 128, BN2, BK2, S2, RB2, False,
                         SKIP, w + W_F1, 3072, 768, BN3, S3, PF, L3)
        nsync = _product(OUT2, 768, w + W_F1, OUT3, P, BAR, nsync, pid, NPROG, 3072, 768, BN3, BK3, S3, RB3, True,
                         SKIP, w + W_F2, 768, 3072, BN4, S4, PF, L4)
        nsync = _product(OUT3, 3072, w + W_F2, OUT4, P, BAR, nsync, pid, NPROG, 768, 3072, BN4, BK4, S4, RB4, False,
                         SKIP, w + W_QKV, 2304, 768, BN5, S5, PF, L5)
        nsync = _product(OUT4, 768, w + W_QKV, QKV, P, BAR, nsync, pid, NPROG, 2304, 768, BN5, BK5, S5, RB5, False,
                         SKIP, w_next + W_O, 768, 768, BN0, S0, PF, L0)


def run_chain(ws, bufs, tiles, nprog, skip=False, pf=False, warps=8):
    kw = {}
    for i, ((name, n, k), (bn, bk, s)) in enumerate(zip(CHAIN, tiles)):
        assert n % bn == 0 and k % (s * bk) == 0, (name, bn, bk, s)
        rb = triton.next_power_of_2(-(-M * n // nprog))
        lines = triton.next_power_of_2(bn * (k // s) * 2 // 128)
        kw.update({f"BN{i}": bn, f"BK{i}": bk, f"S{i}": s, f"RB{i}": rb, f"L{i}": lines})
    bufs["bar"].zero_()
    chain_kernel[(nprog,)](ws, ws.stride(0), bufs["o"], bufs["q"], bufs["xo"], bufs["h"], bufs["f"], bufs["qkv"],
                           bufs["p"], bufs["bar"], NPROG=nprog, LAYERS=LAYERS, SKIP=skip, PF=pf, num_warps=warps,
                           **kw)


def weight_views(ws) -> list:
    """Per layer: product name -> its (N, K) view of that layer's row of ``ws`` (products in CHAIN order)."""
    views = []
    for layer in range(LAYERS):
        off, v = 0, {}
        for name, n, k in CHAIN:
            v[name] = ws[layer, off:off + n * k].view(n, k)
            off += n * k
        views.append(v)
    return views


def torch_chain(ws, a0):
    """The same chain in PyTorch with the kernel's rounding points (bf16 out of every product)."""
    x = a0
    for v in weight_views(ws):
        for name, n, k in CHAIN:
            y = x[:, :k].float() @ v[name].float().t()
            if name == "ffn1":
                y = F.gelu(y, approximate="tanh")
            x = y.bfloat16()
    return x


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--floors-only", action="store_true", help="cuBLAS and the launch floors, no persistent kernel")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    nprog = torch.cuda.get_device_properties(0).multi_processor_count
    n_w = sum(n * k for _, n, k in CHAIN)
    # weights scaled so that activations keep unit size through 72 products
    ws = torch.empty(LAYERS, n_w, device=dev, dtype=dt)
    off = 0
    for name, n, k in CHAIN:
        gain = 1.6 if name == "ffn2" else 1.0  # after the GELU halves the spread
        ws[:, off:off + n * k] = (torch.randn(LAYERS, n * k, device=dev) / k ** 0.5 * gain).to(dt)
        off += n * k
    a0 = torch.randn(M, D, device=dev, dtype=dt)
    bufs = {"o": torch.empty(M, D, device=dev, dtype=dt), "q": torch.empty(M, XD, device=dev, dtype=dt),
            "xo": torch.empty(M, D, device=dev, dtype=dt), "h": torch.empty(M, FF, device=dev, dtype=dt),
            "f": torch.empty(M, D, device=dev, dtype=dt), "qkv": torch.empty(M, 3 * D, device=dev, dtype=dt),
            "p": torch.empty(16 * M * FF, device=dev, dtype=torch.float32),
            "bar": torch.zeros(2, device=dev, dtype=torch.int32)}
    print(f"{torch.cuda.get_device_name(0)}, {nprog} programs, {args.warps} warps, "
          f"weights {ws.numel() * 2 / 1e6:.0f} MB")

    # cuBLAS, as the fast path runs these products (the FFN proj with the GELU epilogue), weights of layer i % 12
    views = weight_views(ws)
    zb = torch.zeros(FF, device=dev, dtype=dt)
    t = {}

    def cublas(i):
        v = views[i % LAYERS]
        t["o"] = F.linear(a0, v["o_net"])
        t["q"] = F.linear(t["o"], v["xq"])
        t["xo"] = F.linear(t["q"], v["xo"])
        t["h"] = torch._addmm_activation(zb, t["xo"], v["ffn1"].t(), use_gelu=True)
        t["f"] = F.linear(t["h"], v["ffn2"])
        t["qkv"] = F.linear(t["f"], v["qkv"])

    print("| variant | tiles (BN, BK, S) per product | us a layer |\n| --- | --- | --- |")
    print(f"| cuBLAS, 6 launches | - | {replay_us(cublas, calls=LAYERS, reps=50):.2f} |", flush=True)
    # the floor of a chain of 6 dependent launches without weights: elementwise kernels on the activations, and
    # one-program kernels that do nothing
    acts = [torch.randn(M, n, device=dev, dtype=dt) for _, n, _ in CHAIN]

    def elementwise(i):
        for a in acts:
            a.mul_(1.0)
    print(f"| 6 dependent elementwise kernels on the products' outputs (no weights) | - | "
          f"{replay_us(elementwise, calls=LAYERS, reps=50):.2f} |", flush=True)

    def empty(i):
        for _ in CHAIN:
            _empty_kernel[(1,)](bufs["bar"])
    print(f"| 6 empty one-program kernels | - | {replay_us(empty, calls=LAYERS, reps=50):.2f} |", flush=True)

    ref = torch_chain(ws, a0)
    configs = {
        "A": [(64, 32, 8), (32, 32, 8), (32, 128, 1), (128, 64, 4), (64, 64, 8), (128, 64, 4)],
        "B": [(32, 64, 4), (32, 64, 4), (16, 128, 1), (64, 128, 3), (64, 128, 6), (64, 128, 3)],
        "C": [(64, 64, 6), (32, 64, 6), (32, 128, 1), (128, 64, 6), (128, 64, 8), (128, 64, 6)],
        "D": [(32, 128, 2), (16, 128, 3), (16, 128, 1), (32, 256, 3), (32, 256, 3), (32, 256, 3)],
    }
    for name, tiles in (configs.items() if not args.floors_only else []):
        try:
            bufs["qkv"][:, :D].copy_(a0)
            run_chain(ws, bufs, tiles, nprog, warps=args.warps)
            torch.cuda.synchronize()
            got = bufs["qkv"]
            rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            bar = bufs["bar"][0].item()
            line = []
            for skip, pf in ((False, False), (False, True), (True, False)):
                def fn(i, skip=skip, pf=pf):
                    bufs["qkv"][:, :D].copy_(a0)
                    run_chain(ws, bufs, tiles, nprog, skip=skip, pf=pf, warps=args.warps)
                us = replay_us(fn, calls=1, reps=20) / LAYERS
                line.append(us)
            print(f"| persistent {name} (rel L2 vs PyTorch {rel:.1e}, barrier count {bar}) | {tiles} | "
                  f"{line[0]:.2f}; with L2 prefetch {line[1]:.2f}; barriers only {line[2]:.2f} |", flush=True)
        except Exception as e:  # a tiling that does not compile: say so, try the next
            print(f"| persistent {name} | {tiles} | failed: {type(e).__name__}: {str(e)[:300]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
