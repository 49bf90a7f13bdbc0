"""The NF4 decode step at batch 1 with the experts' gate_up at one token in 8-row programs on 4
warps ("n8w4", the config before 2026-12-06's eighth session) or in 16-row programs on 8 warps
("n16w8", `gemv_config`'s since: half the programs, so half the fills of the shared-memory table),
alternating in one process, three rounds.

Measured (H100, benchmarks/results/n16w8_decode_ab_2026-12-06_h100.json): n8w4 594.1 / 595.6 / 595.0,
n16w8 602.3 / 604.3 / 602.8 tokens/s. The layer alone: nf4_t1_sweep.py (GATE_UP=n16w8 SHARED=1).

    python benchmarks/tuning/nf4_gate_up16_ab.py     # on the GPU machine; writes $OUT/n16w8_decode_ab.json
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
from tuning_common import build_models_once, decode_step_with

OUT = os.environ.get("OUT", "/tmp")
ORIG = EK.gemv_config


def use(variant):
    """gemv_config as the package has it, or with NF4 gate_up back at 8 rows on 4 warps ("n8w4")."""
    EK.gemv_config = ORIG
    if variant == "n8w4":
        def cfg(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
            c = ORIG(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
            return {**c, "BLOCK_N": 8, "num_warps": 4} if (gated and nf4 and on_gpu) else c
        EK.gemv_config = cfg


build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "decode": []}
for rep in range(3):
    for variant in ("n8w4", "n16w8"):
        for row in decode_step_with(use, variant, "nf4", reset="n16w8"):
            res["decode"].append({**row, "rep": rep})
            print("decode", res["decode"][-1], flush=True)
        json.dump(res, open(os.path.join(OUT, "n16w8_decode_ab.json"), "w"), indent=1)
