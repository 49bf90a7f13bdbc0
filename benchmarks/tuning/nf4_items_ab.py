"""The one-token NF4 experts kernels as item tiles (`NF4_ITEMS_KERNELS`) against the package's, alternating
in one process: the routed layer at one token with and without the NF4 shared expert folded in (CUDA
graphs of 8 routings, outputs checked against the package's), then the batch-1 NF4 decode step
(STEP_REPS rounds, default 3; bf16 once beside them).

Why: in the decode step's profile (decode_profile_nf4_2026-12-07_h100.json) NF4 down with the shared
expert takes 13.9 us a layer for 11.5 MB of codes (0.83 TB/s) where gate_up streams twice that in
16.7 us: down's one program per SM runs the routed experts' rows in one K-step, then the shared
expert's 5,632 values in three more, each waiting for its loads; gate_up's 704 programs run eight
256-value K-steps each, load then multiply. Each thread also holds x for each of its code words in
registers (4 a word), so ptxas keeps one or two experts' loads in flight. As item tiles (the experts
and the shared expert's four chunks as a tile axis, x loaded by the product itself at its use),
compiled for sm_90 every code word of a one-token down or gate_up is loaded before the first product
(64 registers, 32 warps; some spills).

Variants: "package"; "down"; "gate_up" (one 32-warp program per 8-row N-tile, 176 programs where the
package launches 704); "both". VARIANTS (a comma list) picks them, STEP_VARIANTS those of the decode
step (default package, down, both). Writes $OUT/nf4_items_ab.json.

    python benchmarks/tuning/nf4_items_ab.py

Not yet run on a GPU (2026-12-07: the device refused every start after it was written). Its first
form staged x in shared memory (commit 8e0a640, then nf4_xsmem_ab.py): that run is
benchmarks/results/nf4_xsmem_ab_2026-12-07_h100.json (gate_up slower, down not buildable).
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
VARIANTS = {"package": EK.NF4_ITEMS_KERNELS, "down": {"down"}, "gate_up": {"gate_up"}, "both": {"gate_up", "down"}}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["VARIANTS"].split(",") or k == "package"}
res = {"card": B.card_name(), "versions": B.versions(), "variants": {k: sorted(v) for k, v in VARIANTS.items()},
       "layer": [], "step": []}
print(res["card"], flush=True)


def use(name: str) -> None:
    EK.NF4_ITEMS_KERNELS = frozenset(VARIANTS[name])


def save() -> None:
    json.dump(res, open(os.path.join(OUT, "nf4_items_ab.json"), "w"), indent=1)


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
            us, err, _ = graph_timed(layer(extra), 8, refs[shape])
            res["layer"].append(dict(rep=rep, variant=name, shape=shape, us=us, err=err))
            print("layer", res["layer"][-1], flush=True)
    save()
use("package")

if os.environ.get("STEP_REPS") == "0":  # the layer only
    raise SystemExit(0)
build_models_once()
res["step"] += decode_step_with(lambda v: None, "bf16", None)
print(res["step"][-1], flush=True)
STEP = [v for v in os.environ.get("STEP_VARIANTS", "package,down,both").split(",") if v in VARIANTS]
for rep in range(int(os.environ.get("STEP_REPS", "3"))):
    for name in STEP:
        for row in decode_step_with(use, name, "nf4", reset="package"):
            res["step"].append(dict(row, rep=rep))
            print(res["step"][-1], flush=True)
    save()
print("done", flush=True)
