"""The batch-1 decode step with the post-attention add + RMSNorm, the router product and its top-k as
one launch (`moelab.kernels.norm_route`) against the three kernels it replaces, variants
alternating in one process, ROUNDS rounds, bf16, NF4 and NF4 with an NF4 lm_head.

- "three": `add_rms_norm`, the router + shared-gate GEMV and `router_rows` (the package before);
- "one": `add_norm_route`, one router row a program on 4 warps (its first config);
- "one_w2": on 2 warps (the package's config since this run), "one_r2", "one_r4", "one_w8", "one_w1":
  other rows a program / warps;
- at commit 2f04c6c also "one_w2_early", "one_w1_early": the router and norm weights read before the
  PDL wait (no kernel writes them), so their load overlaps the end of o_proj (the package's kernel
  there has WEIGHTS_BEFORE_WAIT; it leaves the package until timed).

Measured on an H100 (benchmarks/results/norm_route_ab_2026-12-07_h100.json, VARIANTS=three,one,one_w2,
ROUNDS=3), medians of the batch-1 step: bf16 2.229 / 2.238 / 2.203 ms, NF4 1.693 / 1.672 / 1.553
(noisy rounds; the order one_w2 < one < three held in each), NF4 with its head 1.485 / 1.462 / 1.427.

VARIANTS (comma list), PRECISIONS, BATCHES and ROUNDS pick them. Writes $OUT/norm_route_ab.json.

    python benchmarks/tuning/norm_route_ab.py
"""
import os

import moelab.kernels.norm_route as NR
from tuning_common import alternate_decode_steps

OUT = os.environ.get("OUT", "/tmp")
CONFIGS = {"one": {"num_warps": 4}, "one_w2": {"num_warps": 2}, "one_r2": {"ROWS": 2}, "one_r4": {"ROWS": 4},
           "one_w8": {"num_warps": 8}, "one_w1": {"num_warps": 1}}
VARIANTS = os.environ.get("VARIANTS", "three,one,one_w2").split(",")
PRECISIONS = os.environ.get("PRECISIONS", "bf16,nf4,nf4_head").split(",")
BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "1").split(","))
PACKAGE_CONFIG = NR.config


def use(variant: str):
    if variant != "three" and variant not in CONFIGS:
        raise ValueError(f"unknown variant {variant!r}: three or one of {sorted(CONFIGS)}")
    NR.ENABLED = variant != "three"
    override = CONFIGS.get(variant, {})
    NR.config = lambda num_rows, on_gpu: {**PACKAGE_CONFIG(num_rows, on_gpu), **(override if on_gpu else {})}


alternate_decode_steps(VARIANTS, use, PRECISIONS, BATCHES, int(os.environ.get("ROUNDS", "3")),
                       os.path.join(OUT, "norm_route_ab.json"), reverse_odd_rounds=True)
use("one_w2")  # the package's config
