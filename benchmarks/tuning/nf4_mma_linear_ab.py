"""NF4 prefills and decode batches with the dense NF4 linears on the tensor cores
(`moelab.kernels.nf4_mma.linear`, up to `nf4_mma.LINEAR_MAX_TOKENS` = 64 tokens: q/k/v as their
joint weight in one launch, o_proj, the shared expert in two launches behind the routed experts)
against the paths before it (dequantize then cuBLAS from 16 tokens, bitsandbytes' modules below),
alternating, ROUNDS rounds: whole prefills of 16-64 tokens replayed from the Engine's prefill graphs
(`tuning_common.nf4_prefill`, last-token logits compared) and the decode step at batch 8, 16 and 64.

Why: served one request at a time, an NF4 request's prefill (16-64 tokens, 8.9-11.1 ms on an H100)
took longer than bf16's (5.4-6.6 ms; prefill_probe_2026-12-06_h100.json,
nf4_prefill_dequant_ab_2026-12-06_h100.json): each dense NF4 linear wrote a bf16 copy of its weight
that cuBLAS read again, and the shared expert took seven launches.

    ROUNDS=2 python benchmarks/tuning/nf4_mma_linear_ab.py   # $OUT/nf4_mma_linear_ab.json
"""
import json
import os

import moelab.bench as B
from moelab.kernels import nf4_mma
from tuning_common import build_models_once, decode_step, nf4_prefill

OUT = os.environ.get("OUT", "/tmp")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "8,16,64").split(","))
VARIANTS = {"mma_linear": 64, "before": 0}
PACKAGE = nf4_mma.LINEAR_MAX_TOKENS
build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
print(res["card"], flush=True)
first_logits = {}

for rep in range(ROUNDS):
    for variant, limit in VARIANTS.items():
        nf4_mma.LINEAR_MAX_TOKENS = limit
        try:
            for n in (16, 32, 48, 64):
                ms, rel = nf4_prefill(n, first_logits)
                row = dict(rep=rep, variant=variant, what=f"prefill {n}", ms=round(ms, 3), logits_rel_diff_vs_first=rel)
                res["rows"].append(row)
                print(row, flush=True)
            if BATCHES:
                for r in decode_step(variant, "nf4", batches=BATCHES):
                    row = dict(rep=rep, variant=variant, what=f"decode batch {r['batch']}",
                               tokens_per_s=r["tokens_per_s"], ms=r["ms_per_step"], error=r["error"])
                    res["rows"].append(row)
                    print(row, flush=True)
        finally:
            nf4_mma.LINEAR_MAX_TOKENS = PACKAGE
        json.dump(res, open(os.path.join(OUT, "nf4_mma_linear_ab.json"), "w"), indent=1)
