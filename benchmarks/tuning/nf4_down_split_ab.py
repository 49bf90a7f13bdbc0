"""One token's NF4 down as one program per (N-tile, item) (`NF4_DOWN_SPLIT`,
`_gemv_down_split_kernel`) against the package's `_gemv_down_kernel`, alternating in one process:
the routed layer at one token with and without the NF4 shared expert folded in (CUDA graphs of 8
routings, outputs checked against the package's), then the batch-1 NF4 decode step (STEP_REPS
rounds, default 2; bf16 once beside them).

Why: in the batch-1 NF4 decode step's profile (decode_profile_nf4_2026-12-07_h100.json) down with
the shared expert streams 11.5 MB in 13.9 us a layer (0.83 TB/s) where gate_up streams 23 MB in
16.7 (1.4 TB/s). gate_up runs one program per (pair, N-tile), 704 small programs, several an SM;
down runs one 32-warp program per 16-row N-tile that walks the four experts and then the shared
expert's 5,632 values in turn. Two designs that kept more of one program's loads in flight lost
(notebooks/05 section 12); this one gives down gate_up's shape instead: the items (the top-k
experts, the shared expert's K in chunks of 1,536 values) as separate programs, each tile's
partials summed by its last program (an atomic ticket).

Variants: "package"; "split" (16 rows, 512-value steps, 4 warps: 1,024 programs); "split_n32w8"
(32 rows, 8 warps: 512); "split_n8" (8 rows: 2,048); "split_k256" (256-value steps). VARIANTS (a
comma list) picks them, STEP_VARIANTS those of the decode step (default package, split,
split_n32w8). Writes $OUT/nf4_down_split_ab.json.

    python benchmarks/tuning/nf4_down_split_ab.py
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
from moelab.kernels.experts import fused_experts_forward
from tuning_common import (build_models_once, decode_step_with, graph_timed, nf4_shared_experts,
                           routed_layer_at_one_token)

OUT = os.environ.get("OUT", "/tmp")
PACKAGE_CONFIG = dict(EK.NF4_DOWN_SPLIT_CONFIG)
VARIANTS = {"package": None, "split": {}, "split_n32w8": dict(BLOCK_N=32, num_warps=8),
            "split_n8": dict(BLOCK_N=8), "split_k256": dict(BLOCK_K=256)}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["VARIANTS"].split(",") or k == "package"}
res = {"card": B.card_name(), "versions": B.versions(), "variants": VARIANTS, "layer": [], "step": []}
print(res["card"], flush=True)


def use(name: str) -> None:
    EK.NF4_DOWN_SPLIT = VARIANTS[name] is not None
    EK.NF4_DOWN_SPLIT_CONFIG = {**PACKAGE_CONFIG, **(VARIANTS[name] or {})}


def save() -> None:
    json.dump(res, open(os.path.join(OUT, "nf4_down_split_ab.json"), "w"), indent=1)


torch.manual_seed(0)
experts, nf4, x, inputs = routed_layer_at_one_token()
shared = nf4_shared_experts(2)
layer = lambda extra: (lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)))  # noqa: E731
shapes = {"routed": lambda i: {}, "with_shared": lambda i: {"shared": shared[i % 2]}}
use("package")
refs = {shape: graph_timed(layer(extra), 8)[2] for shape, extra in shapes.items()}
for rep in range(3):
    for name in VARIANTS:
        use(name)
        for shape, extra in shapes.items():
            us, err, _ = graph_timed(layer(extra), 8, refs[shape])  # a config that does not build: its error
            res["layer"].append(dict(rep=rep, variant=name, shape=shape, us=us, err=err))
            print("layer", res["layer"][-1], flush=True)
    save()
use("package")

if os.environ.get("STEP_REPS") == "0":  # the layer only
    raise SystemExit(0)
build_models_once()
res["step"] += decode_step_with(lambda v: None, "bf16", None)
print(res["step"][-1], flush=True)
STEP = [v for v in os.environ.get("STEP_VARIANTS", "package,split,split_n32w8").split(",") if v in VARIANTS]
for rep in range(int(os.environ.get("STEP_REPS", "2"))):
    for name in STEP:
        for row in decode_step_with(use, name, "nf4", reset="package"):
            res["step"].append(dict(row, rep=rep))
            print(res["step"][-1], flush=True)
    save()
print("done", flush=True)
