"""The NF4 lm_head (151,936 x 2,048, `moelab.load(..., quantize="nf4_head")`) at one token: launch
shapes of `moelab.kernels.gemv.linear_gemv` on bitsandbytes' codes, against the bf16 head through
the same GEMV and through cuBLAS; each timed in a CUDA graph of 4 calls, two rounds alternating.
Then the head at 16 and 64 tokens (a decode batch): the tensor-core path (`nf4_mma.linear`) against
dequantize-then-cuBLAS and the bf16 head.

It extends `lm_head_probe.py` (the sixteenth session's, on moelab's own quantizer) to bitsandbytes'
codes, as `quantize="nf4_head"` stores them, more launch shapes and the 16- and 64-token paths.

    python benchmarks/tuning/nf4_head_sweep.py   # writes $OUT/nf4_head_sweep.json (default /tmp)
"""
import json
import os

import torch
import torch.nn.functional as F

import moelab.bench as B
from moelab.kernels import nf4_mma
from moelab.kernels.experts import nf4_to_dense
from moelab.kernels.gemv import gemv_config, linear_gemv
from moelab.quant import dequantize_nf4, linear4bit_nf4, linear_to_nf4
from tuning_common import graph_timed

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
V, H = 151936, 2048
head = torch.nn.Linear(H, V, bias=False, device="cuda", dtype=torch.bfloat16)
torch.nn.init.normal_(head.weight, std=0.02)
w = head.weight.detach()
nf4 = linear4bit_nf4(linear_to_nf4(head, torch.bfloat16))
dense = dequantize_nf4(nf4)[0].to(torch.bfloat16)
res = {"card": B.card_name(), "versions": B.versions(), "default_config": gemv_config(V, True, True), "one_token": [],
       "tokens": []}


def cfg(n, k, warps, pipe=1, smem=0):
    return dict(BLOCK_N=n, BLOCK_K=k, num_warps=warps, PIPELINE=pipe, **({} if smem else {"NF4_SMEM": 0}))


configs = {"bf16_cublas": None, "bf16_gemv": None, "nf4_default": {},
           "n16w4k512": cfg(16, 512, 4), "n16w4k512_table": cfg(16, 512, 4, smem=1),
           "n16w4k256": cfg(16, 256, 4), "n16w4k256_table": cfg(16, 256, 4, smem=1),
           "n16w4k512_p2": cfg(16, 512, 4, 2), "n16w8k512_p2": cfg(16, 512, 8, 2), "n8w4k512_p2": cfg(8, 512, 4, 2),
           "n16w4k256_p3": cfg(16, 256, 4, 3), "n32w4k256": cfg(32, 256, 4), "n16w2k512": cfg(16, 512, 2),
           "n8w2k512": cfg(8, 512, 2), "n16w4k1024": cfg(16, 1024, 4), "n32w8k512": cfg(32, 512, 8)}
xs = [torch.randn(1, H, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
ref = [F.linear(x, dense).float() for x in xs]
for rnd in range(2):
    for name, c in configs.items():
        if name == "bf16_cublas":
            fn, r = (lambda i: F.linear(xs[i % 4], w)), None
        elif name == "bf16_gemv":
            fn, r = (lambda i: linear_gemv(xs[i % 4], w)), None
        else:
            fn, r = (lambda c: (lambda i: linear_gemv(xs[i % 4], nf4, config=c or None)))(c), ref
        us, err, _ = graph_timed(fn, 4, r)
        res["one_token"].append({"round": rnd, "name": name, "config": c, "us": us, "err": err})
        print(rnd, name, us, err, flush=True)

for tokens in (16, 64):
    xt = [torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    reft = [F.linear(x, dense).float() for x in xt]
    systems = {"bf16_cublas": (lambda i: F.linear(xt[i % 4], w), None),
               "nf4_mma": (lambda i: nf4_mma.linear(xt[i % 4], nf4), reft),
               "nf4_dequant_cublas": (lambda i: F.linear(xt[i % 4], nf4_to_dense(nf4)[0]), reft)}
    for rnd in range(2):
        for name, (fn, r) in systems.items():
            us, err, _ = graph_timed(fn, 4, r)
            res["tokens"].append({"round": rnd, "tokens": tokens, "name": name, "us": us, "err": err})
            print(tokens, rnd, name, us, err, flush=True)
with open(os.path.join(OUT, "nf4_head_sweep.json"), "w") as f:
    json.dump(res, f, indent=1)
