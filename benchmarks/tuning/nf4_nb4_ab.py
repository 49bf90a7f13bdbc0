"""32 tokens a program in `moelab.kernels.nf4_mma.linear` (nb = 4: each code look-up feeds four MMAs)
against 16 (nb = 2, the package's): first each dense NF4 linear of Qwen1.5-MoE-A2.7B alone at 24-64
tokens, codes read from HBM (copies past the 50 MB L2), against dequantize-then-matmul in float32;
then whole NF4 prefills of 16-64 tokens and the decode step at batch 32 and 64, alternating
`nf4_mma.LINEAR_NB4_FROM` = 0 (off) and 17, ROUNDS rounds (`tuning_common.alternate_nf4_prefills`).

Why: in the H100 batch-64 NF4 decode step the dense linears (q/k/v, o_proj, the shared expert) took
~3.4 ms of summed GPU time against bf16's cuBLAS ~1.5 (decode_profile_nf4_b1_b64_2026-12-07_h100.json):
at 64 tokens every code tile is decoded four times, by four 16-token programs. nb = 4 halves the
look-ups (compiled for sm_90 with triton 3.9: 16 LDS and 16 MMAs a K-block where nb = 2 has 16 and 8;
128 registers, 168 gated, no spills). Written in the nineteenth session, never run on a GPU.

    ROUNDS=2 python benchmarks/tuning/nf4_nb4_ab.py   # $OUT/nf4_nb4_probe.json, $OUT/nf4_nb4_ab.json
"""
import json
import os

import torch
import torch.nn.functional as F

import moelab.bench as B
from moelab.kernels import nf4_mma
from moelab.kernels.experts import nf4_to_dense
from moelab.quant import dequantize_nf4, quantize_nf4
from tuning_common import alternate_nf4_prefills

OUT = os.environ.get("OUT", "/tmp")
TOKENS = [int(t) for t in os.environ.get("TOKENS", "24,32,48,64").split(",")]
SHAPES = {"qkv": (6144, 2048, False), "o_proj": (2048, 2048, False), "shared_gate_up": (2 * 5632, 2048, True),
          "shared_down": (2048, 5632, False), "lm_head": (151936, 2048, False)}
N_INPUTS, COLD_BYTES = 8, 120_000_000
res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
gen = torch.Generator().manual_seed(0)
for name, (rows, k_dim, gated) in SHAPES.items():
    w_dense = (torch.randn(1, rows, k_dim, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    copies = max(1, -(-COLD_BYTES // (rows * k_dim // 2)))
    ws = [quantize_nf4(w_dense, backend="torch") for _ in range(copies)]
    dense = dequantize_nf4(ws[0])[0].float()
    del w_dense
    n_out = rows // 2 if gated else rows
    for tokens in TOKENS:
        xs = [torch.randn(tokens, k_dim, generator=gen).to("cuda", torch.bfloat16) for _ in range(N_INPUTS)]
        ref = [F.linear(x.float(), dense) for x in xs]
        if gated:
            ref = [F.silu(r[:, :n_out]) * r[:, n_out:] for r in ref]
        systems = {f"nb{nb}": (lambda i, nb=nb: nf4_mma.linear(xs[i % N_INPUTS], ws[i % copies], gated=gated, nb=nb))
                   for nb in (2, 4)}
        systems["dequant_cublas"] = lambda i: F.linear(xs[i % N_INPUTS], nf4_to_dense(ws[i % copies])[0])
        for system, fn in systems.items():
            try:
                err = None
                if system != "dequant_cublas" or not gated:
                    err = max(float((fn(i).float() - r).norm() / r.norm()) for i, r in enumerate(ref))
                us = B._time_graph(fn, max(N_INPUTS, copies))
                row = dict(shape=name, tokens=tokens, system=system, us=round(us, 2), err=err)
            except Exception as e:  # noqa: BLE001
                torch.cuda.synchronize()
                row = dict(shape=name, tokens=tokens, system=system, us=None, error=repr(e)[:300])
            res["rows"].append(row)
            print(row, flush=True)
    ws = dense = None  # free the copies before the next shape
    torch.cuda.empty_cache()
with open(os.path.join(OUT, "nf4_nb4_probe.json"), "w") as f:
    json.dump(res, f, indent=1)


def use(start):
    nf4_mma.LINEAR_NB4_FROM = start


alternate_nf4_prefills({"nb2": 0, "nb4_from17": 17}, use, int(os.environ.get("ROUNDS", "2")), (32, 64),
                       os.path.join(OUT, "nf4_nb4_ab.json"))
