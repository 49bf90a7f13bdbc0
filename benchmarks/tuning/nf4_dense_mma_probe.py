"""Dense NF4 linears at 8-64 tokens: dequantize-then-cuBLAS (`moelab.model._dequantized`, the path
before `moelab.kernels.nf4_mma.linear`) against `nf4_mma.linear` (the experts' NF4 MMA tile on a dense
weight) at several shares of K, and bf16 cuBLAS on the same weight.

Why: a served NF4 request's prefill (16-64 tokens) took 8.9-11.1 ms on an H100 where bf16 took
5.4-6.6 (benchmarks/results/prefill_probe_2026-12-06_h100.json, nf4_prefill_dequant_ab_2026-12-06_h100.json):
each NF4 linear of a prefill is dequantized into a dense bf16 copy (0.5 bytes a weight read, 2
written) that cuBLAS then reads again, where the MMA kernel reads the codes once per 8 tokens
(from L2 after the first). Shapes of Qwen1.5-MoE-A2.7B: q/k/v jointly (6,144 x 2,048, bias),
o_proj (2,048 x 2,048), the shared expert's gate/up (2 x 5,632 x 2,048, SiLU(gate) * up) and
down (2,048 x 5,632). Times in a CUDA graph of 20 calls on 20 inputs, us per call. `mma_linear_*` is
`moelab.kernels.nf4_mma.linear` (8 or 16 tokens a program, 4 or 2 warps; `_s<n>`: K in n shares,
`auto`: `nf4_mma.linear_splits`). The calls cycle through copies of the weight that together
exceed the 50 MB L2 (COLD=0: one copy), so each call reads its codes from HBM as a prefill does.

2026-12-07, eighteenth session, one H100, one weight (COLD did not exist; nf4_dense_mma_probe_2026-12-07_h100.json):
without split-K, the NF4 MMA linear beat dequantize+cuBLAS on q/k/v (14.4 against 25.7 us at 16
tokens) and the shared gate/up (27-30 against 54) but lost on o_proj and the shared down (32 programs
walking all of K: 46.5 against 25.1 us), and whole NF4 prefills got slower with it on
(6.31 -> 7.07 ms at 16 tokens; nf4_mma_linear_ab_2026-12-07_h100.json).

    python benchmarks/tuning/nf4_dense_mma_probe.py   # writes $OUT/nf4_dense_mma_probe.json
"""
import json
import os

import torch
import torch.nn.functional as F

import moelab.bench as B
from moelab.kernels import nf4_mma
from moelab.kernels.experts import nf4_to_dense
from moelab.quant import quantize_nf4

OUT = os.environ.get("OUT", "/tmp")
TOKENS = [int(t) for t in os.environ.get("TOKENS", "8,16,32,48,64").split(",")]
SHAPES = {"qkv": (6144, 2048, False), "o_proj": (2048, 2048, False), "shared_gate_up": (2 * 5632, 2048, True),
          "shared_down": (2048, 5632, False)}
N_INPUTS = 20
COLD_BYTES = 120_000_000 if os.environ.get("COLD", "1") != "0" else 0
SPLITS = [int(n) for n in os.environ.get("SPLITS", "1,2,4,8,16").split(",")]
res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
gen = torch.Generator().manual_seed(0)
for name, (rows, k_dim, gated) in SHAPES.items():
    w_dense = (torch.randn(1, rows, k_dim, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    copies = max(1, -(-COLD_BYTES // (rows * k_dim // 2))) if COLD_BYTES else 1  # NF4 codes past L2
    ws = [quantize_nf4(w_dense, backend="torch") for _ in range(copies)]
    w = ws[0]
    w_deq = nf4_to_dense(w)[0]
    bias = (torch.randn(rows, generator=gen) * 0.1).to("cuda", torch.bfloat16) if name == "qkv" else None
    n_out = rows // 2 if gated else rows
    for tokens in TOKENS:
        xs = [torch.randn(tokens, k_dim, generator=gen).to("cuda", torch.bfloat16) for _ in range(N_INPUTS)]

        def glu(y):
            return F.silu(y[:, :n_out]) * y[:, n_out:] if gated else y

        systems = {
            "dequant_cublas": lambda i: glu(F.linear(xs[i % N_INPUTS], nf4_to_dense(ws[i % copies])[0], bias)),
            "mma_linear_auto": lambda i: nf4_mma.linear(xs[i % N_INPUTS], ws[i % copies], bias, gated=gated),
            "mma_linear_auto_w2": lambda i: nf4_mma.linear(xs[i % N_INPUTS], ws[i % copies], bias, gated=gated, warps=2),
            "bf16_cublas": lambda i: glu(F.linear(xs[i % N_INPUTS], w_dense[0], bias)),  # one copy: L2 helps it
        }
        for n in SPLITS:
            if n <= k_dim // 64:
                systems[f"mma_linear_s{n}"] = lambda i, n=n: nf4_mma.linear(xs[i % N_INPUTS], ws[i % copies], bias, gated=gated,
                                                                          splits=n)
        ref = [glu(F.linear(xs[i].float(), w_deq.float(), None if bias is None else bias.float()))
               for i in range(N_INPUTS)]
        for system, fn in systems.items():
            try:
                got = [fn(i).float() for i in range(N_INPUTS)]
                err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
                us = B._time_graph(fn, max(N_INPUTS, copies))  # every copy once a replay
                row = dict(shape=name, tokens=tokens, system=system, us=round(us, 2), err=err)
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                row = dict(shape=name, tokens=tokens, system=system, us=None, err=None, error=repr(e)[:300])
            res["rows"].append(row)
            print(row, flush=True)
json.dump(res, open(os.path.join(OUT, "nf4_dense_mma_probe.json"), "w"), indent=1)
