"""The NF4 decode step at batch 1 with the experts' gate_up at one token under other configs,
alternating in one process, three rounds: "n8w4" (8-row programs on 4 warps, the config before
2026-12-06's eighth session), "n16w8" (16-row programs on 8 warps: half the programs, so half the
fills of the shared-memory table), "r48" (those capped at 48 registers, not 64: 5 programs an SM
instead of 4, so the decode step's 704 gate_up programs with the shared expert in about one wave;
compiled for sm_90, 48 registers and no spills; not yet timed), "package" (the package's config as
it is). VARIANTS (a comma list) picks them; default "n8w4,package".

Measured (H100, benchmarks/results/n16w8_decode_ab_2026-12-06_h100.json, VARIANTS=n8w4,n16w8 before
n16w8 was the package's): n8w4 594.1 / 595.6 / 595.0, n16w8 602.3 / 604.3 / 602.8 tokens/s. The
layer alone: nf4_t1_sweep.py (GATE_UP=n16w8 SHARED=1).

    python benchmarks/tuning/nf4_gate_up16_ab.py     # on the GPU machine; writes $OUT/nf4_gate_up16_ab.json
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
from tuning_common import build_models_once, decode_step_with, nf4_gemv_config_with

OUT = os.environ.get("OUT", "/tmp")


CONFIGS = {"n8w4": {"BLOCK_N": 8, "num_warps": 4}, "n16w8": {"BLOCK_N": 16, "num_warps": 8},
           "r48": {"BLOCK_N": 16, "num_warps": 8, "maxnreg": 48}, "package": {}}
VARIANTS = os.environ.get("VARIANTS", "n8w4,package").split(",")


def use(variant):
    """gemv_config with NF4 gate_up at one token under CONFIGS[variant]."""
    EK.gemv_config = nf4_gemv_config_with(CONFIGS[variant], max_rows=EK.NF4_GATE_UP_ONE_TOKEN_ROWS)


build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "decode": []}
for rep in range(3):
    for variant in VARIANTS:
        for row in decode_step_with(use, variant, "nf4", reset="package"):
            res["decode"].append({**row, "rep": rep})
            print("decode", res["decode"][-1], flush=True)
        json.dump(res, open(os.path.join(OUT, "nf4_gate_up16_ab.json"), "w"), indent=1)
