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
import os

from moelab.kernels import nf4_mma
from tuning_common import alternate_nf4_prefills

BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "8,16,64").split(",") if b)


def use(limit):
    nf4_mma.LINEAR_MAX_TOKENS = limit


alternate_nf4_prefills({"before": 0, "mma_linear": 64}, use, int(os.environ.get("ROUNDS", "2")), BATCHES,
                       os.path.join(os.environ.get("OUT", "/tmp"), "nf4_mma_linear_ab.json"))
