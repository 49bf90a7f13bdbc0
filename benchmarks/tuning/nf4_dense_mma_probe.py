"""Dense NF4 linears at 8-64 tokens: dequantize-then-cuBLAS (the package's prefill path,
`moelab.model._dequantized`) against the NF4 MMA kernel of the experts (`moelab.kernels.nf4_mma`)
run on the linear as one expert that every token is routed to, and bf16 cuBLAS on the same weight.

Why: a served NF4 request's prefill (16-64 tokens) took 8.9-11.1 ms on an H100 where bf16 took
5.4-6.6 (benchmarks/results/prefill_probe_2026-12-06_h100.json, nf4_prefill_dequant_ab_2026-12-06_h100.json):
each NF4 linear of a prefill is dequantized into a dense bf16 copy (0.5 bytes a weight read, 2
written) that cuBLAS then reads again, where the MMA kernel reads the codes once per 8 tokens
(from L2 after the first). Shapes of Qwen1.5-MoE-A2.7B: q/k/v jointly (6,144 x 2,048, bias),
o_proj (2,048 x 2,048), the shared expert's gate/up (2 x 5,632 x 2,048, SiLU(gate) * up) and
down (2,048 x 5,632). Times in a CUDA graph of 20 calls on 20 inputs, us per call. `mma_linear_*` is
`moelab.kernels.nf4_mma.linear` (8 or 16 tokens a program, 4 or 2 warps).

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
res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
gen = torch.Generator().manual_seed(0)
for name, (rows, k_dim, gated) in SHAPES.items():
    w_dense = (torch.randn(1, rows, k_dim, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    w = quantize_nf4(w_dense, backend="torch")
    w_deq = nf4_to_dense(w)[0]
    bias = (torch.randn(rows, generator=gen) * 0.1).to("cuda", torch.bfloat16) if name == "qkv" else None
    n_out = rows // 2 if gated else rows
    for tokens in TOKENS:
        xs = [torch.randn(tokens, k_dim, generator=gen).to("cuda", torch.bfloat16) for _ in range(N_INPUTS)]
        pairs = torch.arange(tokens, device="cuda", dtype=torch.int32)
        counts = torch.tensor([tokens, 0], device="cuda", dtype=torch.int32)
        ones = torch.ones(tokens, device="cuda", dtype=torch.float32)
        outs = [torch.empty(tokens, n_out, device="cuda", dtype=torch.bfloat16) for _ in range(N_INPUTS)]

        def glu(y):
            return F.silu(y[:, :n_out]) * y[:, n_out:] if gated else y

        systems = {
            "dequant_cublas": lambda i: glu(F.linear(xs[i], nf4_to_dense(w)[0], bias)),
            "mma_as_expert": lambda i: nf4_mma.grouped(xs[i], w, outs[i], pairs, counts, ones, 1, gated) or outs[i],
            "mma_linear_nb1": lambda i: nf4_mma.linear(xs[i], w, bias, gated=gated, nb=1),
            "mma_linear_nb2": lambda i: nf4_mma.linear(xs[i], w, bias, gated=gated, nb=2),
            "mma_linear_nb2_w2": lambda i: nf4_mma.linear(xs[i], w, bias, gated=gated, nb=2, warps=2),
            "bf16_cublas": lambda i: glu(F.linear(xs[i], w_dense[0], bias)),
        }
        ref = [glu(F.linear(xs[i].float(), w_deq.float(), None if bias is None else bias.float()))
               for i in range(N_INPUTS)]
        for system, fn in systems.items():
            if system == "mma_as_expert" and bias is not None:
                continue  # no bias there
            try:
                got = [fn(i).float() for i in range(N_INPUTS)]
                err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
                us = B._time_graph(fn, N_INPUTS)
                row = dict(shape=name, tokens=tokens, system=system, us=round(us, 2), err=err)
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                row = dict(shape=name, tokens=tokens, system=system, us=None, err=None, error=repr(e)[:300])
            res["rows"].append(row)
            print(row, flush=True)
json.dump(res, open(os.path.join(OUT, "nf4_dense_mma_probe.json"), "w"), indent=1)
