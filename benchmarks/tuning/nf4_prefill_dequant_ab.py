"""NF4 prefills: a dense NF4 linear (q/k/v, o_proj, the shared expert) as moelab's one dequantize
kernel + cuBLAS (`moelab.model.NF4_DEQUANT_MIN_TOKENS`, 16) against bitsandbytes' own path (its
absmax, weight and cast kernels + cuBLAS, or its gemm_4bit), alternating, ROUNDS rounds: whole
prefills of 16-64 tokens replayed from the Engine's prefill graphs (`tuning_common.nf4_prefill`),
their last-token logits compared, and the decode step at batch 16 and 64 (where the dense linears
take the same path).

Why: benchmarks/results/prefill_probe_2026-12-06_h100.json's profile of a 16-token NF4 prefill
spends 2.6 ms of 9.1 in bitsandbytes' kernels (120 absmax + 120 weight dequantizes, 120 casts,
48 gemm_4bit) where bf16's dense GEMMs take about 1.4.
Measured (H100, nf4_prefill_dequant_ab_2026-12-06_h100.json): prefills of 16 / 32 / 48 / 64 tokens
8.87 / 8.89 / 10.14 / 11.14 ms against bitsandbytes' 9.40 / 9.44 / 10.72 / 11.63, the decode step at
batch 16 and 64 14.59 / 32.17 against 14.72 / 32.41 ms; the package's path since.

    ROUNDS=2 python benchmarks/tuning/nf4_prefill_dequant_ab.py   # $OUT/nf4_prefill_dequant_ab.json
"""
import json
import os

import moelab.bench as B
import moelab.model as MM
from tuning_common import build_models_once, decode_step, nf4_prefill

OUT = os.environ.get("OUT", "/tmp")
ROUNDS = int(os.environ.get("ROUNDS", "2"))
VARIANTS = {"moelab": MM.NF4_DEQUANT_MIN_TOKENS, "bitsandbytes": 1 << 30}
build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
print(res["card"], flush=True)
first_logits = {}


for rep in range(ROUNDS):
    for variant, min_tokens in VARIANTS.items():
        MM.NF4_DEQUANT_MIN_TOKENS = min_tokens
        try:
            for n in (16, 32, 48, 64):
                ms, rel = nf4_prefill(n, first_logits)
                row = dict(rep=rep, variant=variant, what=f"prefill {n}", ms=round(ms, 3), logits_rel_diff_vs_first=rel)
                res["rows"].append(row)
                print(row, flush=True)
            for r in decode_step(variant, "nf4", batches=(16, 64)):
                row = dict(rep=rep, variant=variant, what=f"decode batch {r['batch']}",
                           tokens_per_s=r["tokens_per_s"], ms=r["ms_per_step"], error=r["error"])
                res["rows"].append(row)
                print(row, flush=True)
        finally:
            MM.NF4_DEQUANT_MIN_TOKENS = VARIANTS["moelab"]
        json.dump(res, open(os.path.join(OUT, "nf4_prefill_dequant_ab.json"), "w"), indent=1)
