"""The NF4 decode GEMVs on the tensor cores (`moelab.kernels.nf4_mma`) against the word path
(`experts._gemv_gate_up_kernel` / `_gemv_down_kernel` with `NF4_DOT_SMEM_ASM`), alternating in one
process: the routed layer at one token with and without the NF4 shared expert folded in (CUDA
graphs of 8 routings, outputs checked against the word path's), then the batch-1 NF4 decode step
(STEP_REPS rounds, default 2; bf16 once beside them).

Variants: "words" (MOELAB_NF4_MMA=0's path), "mma" (the package: gate_up 4 warps, down 16), and
warp counts around it: "mma_g8" (gate_up 8 warps), "mma_d8" / "mma_d32" (down 8 / 32).
Writes $OUT/nf4_mma_ab.json.

    python benchmarks/tuning/nf4_mma_ab.py
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.nf4_mma as MMA
from moelab.kernels.experts import fused_experts_forward
from tuning_common import (build_models_once, decode_step_with, graph_timed, nf4_shared_experts,
                           routed_layer_at_one_token)

OUT = os.environ.get("OUT", "/tmp")
PACKAGE = (MMA.GATE_UP_WARPS, MMA.DOWN_WARPS)
VARIANTS = {"words": None, "mma": PACKAGE, "mma_g8": (8, PACKAGE[1]), "mma_d8": (PACKAGE[0], 8),
            "mma_d32": (PACKAGE[0], 32)}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["VARIANTS"].split(",") or k == "words"}
res = {"card": B.card_name(), "versions": B.versions(), "variants": VARIANTS, "layer": [], "step": []}
print(res["card"], flush=True)


def use(name: str) -> None:
    MMA.ENABLED = VARIANTS[name] is not None
    MMA.GATE_UP_WARPS, MMA.DOWN_WARPS = VARIANTS[name] or PACKAGE


def save() -> None:
    json.dump(res, open(os.path.join(OUT, "nf4_mma_ab.json"), "w"), indent=1)


torch.manual_seed(0)
experts, nf4, x, inputs = routed_layer_at_one_token()
shared = nf4_shared_experts(2)
layer = lambda extra: (lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)))  # noqa: E731
shapes = {"routed": lambda i: {}, "with_shared": lambda i: {"shared": shared[i % 2]}}
use("words")
refs = {shape: graph_timed(layer(extra), 8)[2] for shape, extra in shapes.items()}
for rep in range(3):
    for name in VARIANTS:
        use(name)
        for shape, extra in shapes.items():
            us, err, _ = graph_timed(layer(extra), 8, refs[shape])  # a variant that does not build: its error
            res["layer"].append(dict(rep=rep, variant=name, shape=shape, us=us, err=err))
            print("layer", res["layer"][-1], flush=True)
    save()
use("mma")

if os.environ.get("STEP_REPS") == "0":  # the layer only
    raise SystemExit(0)
build_models_once()
res["step"] += decode_step_with(lambda v: None, "bf16", None)
print(res["step"][-1], flush=True)
STEP = [v for v in os.environ.get("STEP_VARIANTS", "words,mma").split(",") if v in VARIANTS]
for rep in range(int(os.environ.get("STEP_REPS", "2"))):
    for name in STEP:
        for row in decode_step_with(use, name, "nf4", reset="mma"):
            res["step"].append(dict(row, rep=rep))
            print(res["step"][-1], flush=True)
    save()
print("done", flush=True)
