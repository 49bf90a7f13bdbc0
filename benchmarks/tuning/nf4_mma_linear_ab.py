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

2026-12-07, one H100, one round each (benchmarks/results/nf4_mma_linear_ab_*2026-12-07_h100.json): without
split-K prefills of 16-64 tokens 6.31 / 6.89 / 8.16 / 8.66 -> 7.07 / 7.26 / 8.49 / 9.21 ms (slower);
with it (split below 4 programs an SM) 6.36 / 6.98 / 8.13 / 8.60 -> 4.67 / 5.54 / 7.30 / 8.69 ms and the
decode step at batch 16 / 64 10.45 / 24.04 -> 6.45 / 10.08 ms; split below 1 program an SM 4.68 / 5.96 /
7.44 / 8.28 ms, 6.43 / 9.71 ms. The package now runs it up to 64 tokens, split below 2.
"""
import os

from moelab.kernels import nf4_mma
from tuning_common import alternate_nf4_prefills

BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "8,16,64").split(",") if b)


def use(limit):
    nf4_mma.LINEAR_MAX_TOKENS = limit


alternate_nf4_prefills({"before": 0, "mma_linear": 64}, use, int(os.environ.get("ROUNDS", "2")), BATCHES,
                       os.path.join(os.environ.get("OUT", "/tmp"), "nf4_mma_linear_ab.json"))
