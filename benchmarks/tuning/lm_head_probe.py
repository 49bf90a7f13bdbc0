"""How long lm_head (151,936 x 2,048) takes at one token: bf16 through cuBLAS and through moelab's
GEMV, and NF4 (random weights quantized here) through the GEMV in several launch shapes, each timed
in a CUDA graph, three rounds; then decode attention at batch 1 (16 heads, head_dim 128) over
17-512 keys with the default split-K and with 1 / 2 / 4 splits, alone and after the rotary kernel.

Measured on an H100 (benchmarks/results/lm_head_probe_2026-12-07_h100.json): bf16 lm_head 205 us
through cuBLAS, 195 through the GEMV (the decode step's lm_head at one token since); NF4 98-101 us.
Attention: at 17 keys one split beat the default 8 (2.9 against 3.9 us), at 64 keys 2-8 splits tied
(4.2-4.4), from 80 keys on the default was as fast as any (one split at 128 keys: 8.8 against 4.4 us);
the rotary kernel in front of it added about 1.5 us, back to back in a graph.

    python benchmarks/tuning/lm_head_probe.py
"""
import json, os, torch
import torch.nn.functional as F
import moelab.bench as B
from moelab.quant import quantize_nf4, dequantize_nf4
from moelab.kernels.gemv import linear_gemv
from tuning_common import graph_timed

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
V, H = 151936, 2048
w = (torch.randn(V, H, device="cuda") * 0.02).to(torch.bfloat16)
nf4 = quantize_nf4(w[None], backend="torch")
xs = [torch.randn(1, H, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
ref = [F.linear(x, dequantize_nf4(nf4)[0]).float() for x in xs]
res = {"card": B.card_name(), "rows": []}
configs = {"bf16_cublas": None, "bf16_gemv": {}, "nf4_default": {},
           "nf4_n8w4": dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1, NF4_SMEM=0),
           "nf4_n16w4": dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, PIPELINE=1, NF4_SMEM=0),
           "nf4_n32w8": dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, PIPELINE=1, NF4_SMEM=0),
           "nf4_n16w8k1024": dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8, PIPELINE=1, NF4_SMEM=0),
           "nf4_n16w8k2048": dict(BLOCK_N=16, BLOCK_K=2048, num_warps=8, PIPELINE=1, NF4_SMEM=0),
           "nf4_n16w16k2048": dict(BLOCK_N=16, BLOCK_K=2048, num_warps=16, PIPELINE=1, NF4_SMEM=0),
           "nf4_n8w4k1024": dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4, PIPELINE=1, NF4_SMEM=0)}
for rep in range(3):
    for name, cfg in configs.items():
        if name == "bf16_cublas":
            fn = lambda i: F.linear(xs[i % 4], w)
            r = None
        elif name == "bf16_gemv":
            fn = lambda i: linear_gemv(xs[i % 4], w)
            r = None
        else:
            fn = (lambda c: (lambda i: linear_gemv(xs[i % 4], nf4, config=c or None)))(cfg)
            r = ref
        us, err, _ = graph_timed(fn, 4, r)
        res["rows"].append({"rep": rep, "name": name, "us": us, "err": err})
        print(rep, name, us, err, flush=True)
json.dump(res, open(os.path.join(OUT, "lm_head_probe.json"), "w"), indent=1)

# Decode attention at batch 1 over short contexts: the default split-K (+ merge) against fewer splits,
# and rope_and_cache_write before it, as a decode step runs them (in a graph, PDL as the package launches).
from moelab.kernels.attention import decode_attention
from moelab.kernels.rope_cache import rope_and_cache_write
heads, D, S = 16, 128, 2048
kc = torch.randn(4, heads, S, D, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
qkv = torch.randn(1, 3 * heads * D, device="cuda", dtype=torch.bfloat16)
cos = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
sin = torch.randn_like(cos)
slots = torch.tensor([1], device="cuda")
res["attention"] = []
for length in (17, 64, 80, 128, 512):
    pos = torch.tensor([length - 1], device="cuda")
    lengths = pos + 1
    for splits in (None, 1, 2, 4):
        def fn(i, splits=splits, pos=pos, lengths=lengths):
            q, k, v = qkv.split(heads * D, dim=-1)
            q = rope_and_cache_write(q.view(1, heads, D), k.view(1, heads, D), v.view(1, heads, D), cos, sin,
                                     kc, vc, slots, pos)
            return decode_attention(q, kc, vc, slots, lengths, num_splits=splits)
        def att(i, splits=splits, lengths=lengths):
            return decode_attention(qkv[:, :heads * D].view(1, heads, D), kc, vc, slots, lengths, num_splits=splits)
        for rep in range(2):
            us, _, _ = graph_timed(fn, 4)
            us_a, _, _ = graph_timed(att, 4)
            res["attention"].append({"rep": rep, "length": length, "splits": splits, "rope_attn_us": us,
                                     "attn_us": us_a})
            print("attn", rep, length, splits, us, us_a, flush=True)
json.dump(res, open(os.path.join(OUT, "lm_head_probe.json"), "w"), indent=1)
