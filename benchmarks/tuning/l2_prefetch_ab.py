"""The decode step at batch 1 with and without L2 prefetches, alternating on one machine.

Variants: "none"; "layer" (`moelab.model.L2_PREFETCH`: each layer starts with one launch that asks
L2 for its o_proj and shared expert, `moelab.kernels.prefetch`); "gate_up" (the experts' gate_up
kernel asks for its own rows and the down weights of its pair, `PREFETCH=3` in its config); "both".
NF4 (the target of issue 8's NF4/bf16 ratio) and bf16 (where the prefetches must not hurt). The
variants' configs apply to gate_up at one token only (the batch-1 step), $OUT/l2_prefetch_ab.json.

    python benchmarks/tuning/l2_prefetch_ab.py     # NF4=0 / BF16=0 leave a precision out, REPS=1 one round
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.model as MM
from tuning_common import build_models_once, decode_step_with

OUT = os.environ.get("OUT", "/tmp")
GATE_UP_PREFETCH = int(os.environ.get("GATE_UP_PREFETCH", "3"))
VARIANTS = {"none": (False, 0), "layer": (True, 0), "gate_up": (False, GATE_UP_PREFETCH),
            "both": (True, GATE_UP_PREFETCH)}
ORIG = EK.gemv_config
res = {"card": B.card_name(), "versions": B.versions(), "gate_up_prefetch": GATE_UP_PREFETCH, "decode": []}


def use(variant):
    layer, gate_up = VARIANTS[variant]
    MM.L2_PREFETCH = layer

    def cfg(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
        c = ORIG(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
        return {**c, "PREFETCH": gate_up} if gated and on_gpu else c  # 0 too: "none" means none
    EK.gemv_config = cfg


build_models_once()
for quant in [q for q, on in (("nf4", os.environ.get("NF4", "1")), (None, os.environ.get("BF16", "1"))) if on == "1"]:
    for rep in range(int(os.environ.get("REPS", "2"))):
        for variant in VARIANTS:
            for row in decode_step_with(use, variant, quant):
                res["decode"].append({**row, "rep": rep})
                print("decode", res["decode"][-1], flush=True)
            json.dump(res, open(os.path.join(OUT, "l2_prefetch_ab.json"), "w"), indent=1)
