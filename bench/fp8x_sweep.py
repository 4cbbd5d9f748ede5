"""The float8 decode attention alone, at the seed's mean step (128 rows, 12 heads x 64, ~402 keys of a 643-key
head-major cache, CFG's shared prefix, this step's key/value written by the kernel): float32 products
(``split_kernel``, the fast path's float8 kernel until round 9) against packed half products
(``decode_attention(packed=True)``, ``split_fp8x_kernel``), microseconds per call (CUDA-graph replays) and the error
against float64 attention over the same (dequantized) cache. For the packed kernel also its PTX against its own
plain-Triton statement (``packed_asm=False``, compiled on the card): the same half operations, so they should agree
bit for bit. Each tile runs in a process of its own (Triton 3.6's LLVM aborts on some float8 tiles).

    python bench/fp8x_sweep.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference import kernels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import replay_us  # noqa: E402

# (kernel, keys_per_split, block_n, num_warps)
CONFIGS = [("f32", 64, 64, 1), ("f32", 32, 32, 1), ("packed", 32, 32, 1), ("packed", 64, 64, 1),
           ("packed", 64, 64, 2), ("packed", 128, 64, 1), ("packed", 128, 128, 1), ("packed", 128, 128, 2),
           ("packed", 256, 128, 2), ("packed", 64, 32, 1), ("packed", 128, 32, 1)]


def one(cfg: tuple) -> dict:
    kind, kps, bn, nw = cfg
    torch.manual_seed(0)
    rows, L, H, D, mean = 128, 643, 12, 64, 402
    K = torch.randn(rows, L, H, D, device="cuda") * torch.logspace(-1, 0.5, D, device="cuda")
    V = torch.randn(rows, L, H, D, device="cuda")
    qkv = torch.randn(rows, 3, H, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((rows,), mean, device="cuda", dtype=torch.int32)
    pre = torch.zeros(rows, device="cuda", dtype=torch.int32)
    pre[rows // 2:] = 163
    K[rows // 2:, :163] = K[rows // 2, :163]  # the unconditional rows' shared prefix, as the fast path has it
    V[rows // 2:, :163] = V[rows // 2, :163]
    (k8, ke), (v8, ve) = kernels.fp8_quantize(K), kernels.fp8_quantize(V)
    ke, ve = ke.transpose(1, 2).contiguous(), ve.transpose(1, 2).contiguous()
    k8, v8 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k8, v8))  # head-major storage
    Lb = -(-mean // 64) * 64

    def call(**kw):
        return kernels.decode_attention(qkv[:, 0], k8, v8, lens, D**-0.5, kps, bn, max_keys=Lb, k_new=qkv[:, 1],
                                        v_new=qkv[:, 2], num_warps=nw, prefix_len=pre, prefix_row=rows // 2,
                                        k_exp=ke, v_exp=ve, **kw)

    kw = {"packed": True} if kind == "packed" else {}
    out = call(**kw)
    torch.cuda.synchronize()
    # float64 attention over the cache as it is now (this step's key/value written)
    Kd = kernels.fp8_dequantize(k8, ke.transpose(1, 2)).double()
    Vd = kernels.fp8_dequantize(v8, ve.transpose(1, 2)).double()
    idx = torch.arange(L, device="cuda")
    src = torch.where((idx[None, :] < pre[:, None]), rows // 2, torch.arange(rows, device="cuda")[:, None])  # (rows, L)
    Kr, Vr = Kd[src, idx[None, :]], Vd[src, idx[None, :]]  # (rows, L, H, D)
    s = torch.einsum("rhd,rlhd->rhl", qkv[:, 0].double(), Kr) * D**-0.5
    s = s.masked_fill(idx[None, None, :] >= lens[:, None, None], float("-inf"))
    ref = torch.einsum("rhl,rlhd->rhd", s.softmax(-1), Vr)
    res = {"kind": kind, "kps": kps, "bn": bn, "nw": nw,
           "max_abs_vs_f64": (out.double() - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item()}
    if kind == "packed":
        plain = call(packed=True, packed_asm=False)
        res["asm_vs_plain_max_abs"] = (out.float() - plain.float()).abs().max().item()
        res["asm_vs_plain_equal"] = bool(torch.equal(out, plain))
    res["us"] = replay_us(lambda i: call(**kw), calls=20, reps=10)
    res["gbps"] = rows * mean * H * (D + 1) * 2 / 1e9 / (res["us"] * 1e-6)
    return res


def main() -> int:
    if "--one" in sys.argv:
        k, kps, bn, nw = sys.argv[sys.argv.index("--one") + 1].split(",")
        print("RESULT " + json.dumps(one((k, int(kps), int(bn), int(nw)))), flush=True)
        return 0
    print(f"{torch.cuda.get_device_name(0)}\n| kernel | keys_per_split | block_n | warps | us/call | GB/s (K+V+scales) | "
          f"max abs vs float64 (max |out|) | PTX vs its plain statement |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
          flush=True)
    for cfg in CONFIGS:
        p = subprocess.run([sys.executable, __file__, "--one", ",".join(map(str, cfg))], capture_output=True,
                           text=True, timeout=300)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
            print(f"| {' | '.join(map(str, cfg))} | failed: {err} | | | |", flush=True)
            continue
        r = json.loads(line[0][7:])
        cmp = "-"
        if r["kind"] == "packed":
            cmp = "bit-equal" if r["asm_vs_plain_equal"] else f"max abs {r['asm_vs_plain_max_abs']:.1e}"
        print(f"| {r['kind']} | {r['kps']} | {r['bn']} | {r['nw']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{r['max_abs_vs_f64']:.2e} ({r['max_abs_ref']:.2f}) | {cmp} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
