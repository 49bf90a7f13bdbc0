"""NF4 experts: up to how many (token, expert) pairs the decode GEMVs run instead of the grouped
NF4 GEMM (`moelab.kernels.experts.GEMV_MAX_PAIRS_NF4`), timed in what it decides: prefills of 16
and 32 tokens (replayed from the Engine's prefill graphs: `tuning_common.nf4_prefill`) and the
decode step at batch 16 and 32 (`bench_decode`), thresholds alternating, ROUNDS rounds.

Why: in benchmarks/results/prefill_probe_2026-12-06_h100.json an NF4 prefill of 32 tokens (128
pairs: the GEMVs) took 13.9 ms and one of 48 (192 pairs: the grouped GEMM) 10.6 ms; the threshold
dated from an H200 measurement of older kernels (experts_paths_2026-11-29_h200.json).
Measured (H100, nf4_gemv_threshold_ab_2026-12-06_h100.json, thresholds 128 / 64 / 32): the
32-token prefill 13.7 / 9.4 / 9.6 ms, the batch-16 step 14.7 / 14.8 / 17.5, the batch-32 step 23.2 /
23.1 / 22.8; the package's threshold has been 64 since.

    THRESHOLDS=128,64 ROUNDS=2 python benchmarks/tuning/nf4_gemv_threshold_ab.py   # $OUT/nf4_gemv_threshold_ab.json
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
from tuning_common import build_models_once, decode_step, nf4_prefill

OUT = os.environ.get("OUT", "/tmp")
THRESHOLDS = [int(t) for t in os.environ.get("THRESHOLDS", "128,64").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "2"))
PACKAGE = EK.GEMV_MAX_PAIRS_NF4
build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "package": PACKAGE, "rows": []}
print(res["card"], flush=True)


for rep in range(ROUNDS):
    for threshold in THRESHOLDS:
        EK.GEMV_MAX_PAIRS_NF4 = threshold
        try:
            for n in (16, 32):
                row = dict(rep=rep, threshold=threshold, what=f"prefill {n}", ms=round(nf4_prefill(n)[0], 3))
                res["rows"].append(row)
                print(row, flush=True)
            for r in decode_step(f"t{threshold}", "nf4", batches=(16, 32)):
                row = dict(rep=rep, threshold=threshold, what=f"decode batch {r['batch']}",
                           tokens_per_s=r["tokens_per_s"], ms=r["ms_per_step"], error=r["error"])
                res["rows"].append(row)
                print(row, flush=True)
        finally:
            EK.GEMV_MAX_PAIRS_NF4 = PACKAGE
        json.dump(res, open(os.path.join(OUT, "nf4_gemv_threshold_ab.json"), "w"), indent=1)
