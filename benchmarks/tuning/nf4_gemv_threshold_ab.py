"""NF4 experts: up to how many (token, expert) pairs the decode GEMVs run instead of the grouped
NF4 GEMM (`moelab.kernels.experts.GEMV_MAX_PAIRS_NF4`, 128: 32 tokens at top-4), timed in what it
decides: prefills of 16 and 32 tokens (replayed from the Engine's prefill graphs,
`moelab.bench.median_seconds`)
and the decode step at batch 16 and 32 (`bench_decode`), thresholds alternating, ROUNDS rounds.

Why: in benchmarks/results/prefill_probe_2026-12-06_h100.json an NF4 prefill of 32 tokens (128
pairs: the GEMVs) took 13.9 ms and one of 48 (192 pairs: the grouped GEMM) 10.6 ms; the threshold
dates from an H200 measurement of older kernels (experts_paths_2026-11-29_h200.json).

    THRESHOLDS=128,64 ROUNDS=2 python benchmarks/tuning/nf4_gemv_threshold_ab.py   # $OUT/nf4_gemv_threshold_ab.json
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.models as M
from moelab.engine import Engine
from moelab.kernels.experts import fused_experts_forward
from tuning_common import build_models_once, decode_step

OUT = os.environ.get("OUT", "/tmp")
THRESHOLDS = [int(t) for t in os.environ.get("THRESHOLDS", "128,64").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "2"))
PACKAGE = EK.GEMV_MAX_PAIRS_NF4
build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "package": PACKAGE, "rows": []}
print(res["card"], flush=True)


def prefill_ms(n: int) -> float:
    model, _ = M.load("qwen1.5-moe-a2.7b", device="cuda", random_weights=True, quantize="nf4")
    engine = Engine(model, num_slots=1, max_seq_len=2048, experts_fn=fused_experts_forward)
    prompt = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    return B.median_seconds(lambda: engine.prefill_graphs.prefill(prompt, 0)) * 1e3


for rep in range(ROUNDS):
    for threshold in THRESHOLDS:
        EK.GEMV_MAX_PAIRS_NF4 = threshold
        try:
            for n in (16, 32):
                row = dict(rep=rep, threshold=threshold, what=f"prefill {n}", ms=round(prefill_ms(n), 3))
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
