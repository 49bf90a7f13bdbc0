"""The grouped NF4 GEMM (the experts at 33-255 tokens of Qwen1.5-MoE: prefill of short prompts,
decode of many requests) with its codes looked up as bf16 levels and each 64-value block's absmax
applied to the product (`_nf4_block_dot`), against the kernels before (per-value fp32 levels times
the absmax, `moelab/kernels/experts_before.py`, a copy of commit 4efaabc's module carried for this run).

Side by side on one machine: one routed-experts layer at T tokens in a CUDA graph (both NF4 paths
forced onto the grouped kernel, bf16 beside them), outputs checked against each other and against
dequantize-then-matmul; then the decode step at batch 64 (NF4, 256 pairs a layer: the grouped kernel),
alternating.

    git show 4efaabc:moelab/kernels/experts.py > moelab/kernels/experts_before.py
    python benchmarks/tuning/nf4_grouped_ab.py   # on the GPU machine; writes $OUT/nf4_grouped_ab.json

(LAYER_ONLY=1 skips the decode steps.) The kernels it measures are those of commit 18879b9 (then
kept out of the package until measured, brought back by the session that ran it).

benchmarks/results/nf4_grouped_ab_2026-12-06_h100.json (H100, sixth session of the day): one layer
at 16 / 64 / 128 / 256 / 512 tokens, bf16 levels 282 / 402 / 1,327 / 1,484 / 1,805 us against
352 / 509 / 1,493 / 1,650 / 2,009 before (dequantize-first 920-1,054, bf16 238-398); relative error
against dequantize-then-matmul 5.6e-3 (before 2.7e-4: the levels are rounded to bf16 before the
product, as in the decode GEMVs); decode at batch 64 (NF4) 1,832 -> 1,981 tokens/s.
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as NEW
import moelab.kernels.experts_before as OLD
from moelab.quant import dequantize_nf4
from moelab.routing import route
from tuning_common import build_models_once, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
res = {"card": B.card_name(), "versions": B.versions(), "layer": [], "decode": []}
experts, nf4, _, _ = routed_layer_at_one_token()
dense = [dequantize_nf4(nf4.gate_up), dequantize_nf4(nf4.down)]
ref_layer = type("L", (), dict(gate_up_proj=dense[0].to(torch.bfloat16), down_proj=dense[1].to(torch.bfloat16),
                               act_fn=torch.nn.SiLU()))()
DEFAULTS = NEW.GEMV_MAX_PAIRS, NEW.GEMV_MAX_PAIRS_NF4, NEW.NF4_DENSE_FROM_PAIRS
for mod in (NEW, OLD):
    mod.GEMV_MAX_PAIRS = mod.GEMV_MAX_PAIRS_NF4 = 0  # grouped at every T ...
    mod.NF4_DENSE_FROM_PAIRS = 1 << 30  # ... and NF4 never dequantized first (row nf4_dense_first: always)
for t in (16, 64, 128, 256, 512):
    x = torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16)
    inputs = [route(torch.randn(t, 60, device="cuda"), 4) for _ in range(6)]
    inputs = [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in inputs]
    refs = [NEW.fused_experts_forward(x, w, ids, ref_layer).float() for w, ids in inputs]
    row = {"tokens": t}
    for name, mod, layer in (("nf4_new", NEW, nf4), ("nf4_before", OLD, nf4), ("nf4_dense_first", NEW, nf4),
                             ("bf16", NEW, experts)):
        NEW.NF4_DENSE_FROM_PAIRS = 0 if name == "nf4_dense_first" else 1 << 30
        with torch.no_grad():
            outs = [mod.fused_experts_forward(x, w, ids, layer).float() for w, ids in inputs]
            row[name + "_us"] = round(B._time_graph(lambda i: mod.fused_experts_forward(x, *inputs[i], layer), 6), 2)
        if name != "bf16":
            row[name + "_err"] = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, refs))
    res["layer"].append(row)
    print(row, flush=True)
    json.dump(res, open(os.path.join(OUT, "nf4_grouped_ab.json"), "w"), indent=1)
for mod in (NEW, OLD):
    mod.GEMV_MAX_PAIRS, mod.GEMV_MAX_PAIRS_NF4, mod.NF4_DENSE_FROM_PAIRS = DEFAULTS
del experts, nf4, dense, ref_layer
torch.cuda.empty_cache()

build_models_once()
new_grouped = NEW._grouped_gemm
for variant in () if os.environ.get("LAYER_ONLY") else ("before", "new"):
    NEW._grouped_gemm = OLD._grouped_gemm if variant == "before" else new_grouped
    try:
        r = B.bench_decode("qwen1.5-moe-a2.7b", batches=(64,), prompt_len=(16, 64), max_seq_len=2048,
                           modes=("graph_fused_proj",), quantize="nf4", profile=False)
    finally:
        NEW._grouped_gemm = new_grouped
    for row in r["results"]:
        res["decode"].append(dict(variant=variant, batch=row["batch"], tokens_per_s=row.get("tokens_per_s"),
                                  ms_per_step=row.get("ms_per_step"), error=row.get("error")))
        print("decode", res["decode"][-1], flush=True)
    json.dump(res, open(os.path.join(OUT, "nf4_grouped_ab.json"), "w"), indent=1)
