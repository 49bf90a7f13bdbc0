"""The one-token NF4 experts kernels with x staged in shared memory (`NF4_XSMEM_KERNELS`), against
the package's (x read from global memory), alternating in one process: the routed layer at one
token with and without the NF4 shared expert folded in (CUDA graphs of 8 routings, outputs checked
against the package's), then the batch-1 NF4 decode step (three rounds; bf16 once beside them).

Why: in the decode step's profile (decode_profile_nf4_2026-12-07_h100.json) NF4 down with the shared
expert takes 13.9 us a layer for 11.5 MB of codes (0.83 TB/s) where gate_up streams twice that in
16.7 us: down's one program per SM runs the routed experts' rows in one K-step, then the shared
expert's 5,632 values in three more, each waiting for its loads. Every thread also holds x for each
of its code words in registers (4 a word), so ptxas cannot keep more than one or two experts' loads
in flight. With x in shared memory (read at its use by one 16-byte `ld.shared`) and the experts and
the shared expert's four chunks as item axes of two tiles, compiled for sm_90 every code word of
the layer's down is loaded before the first product (64 registers, 32 warps).

Variants: "package"; "down" (x in shared memory, one K-step for every item); "gate_up" (x in shared
memory for gate_up only); "gate_up_k512" (that in 512-value K-steps: compiled for sm_90 with x out of
the registers, 64 registers and no spills); "both"; "items" (both, and gate_up as one 32-warp program
per 8-row N-tile over every pair and shared chunk, all their words of the 2,048-value row loaded
before the first product: 176 programs where the package's launches 704).
VARIANTS (a comma list) picks them, STEP_VARIANTS those of the decode step (default package, down, items), STEP_REPS its rounds (3).
Writes $OUT/nf4_xsmem_ab.json.

    python benchmarks/tuning/nf4_xsmem_ab.py
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
from moelab.kernels.experts import SharedExpert, fused_experts_forward
from moelab.quant import quantize_nf4
from tuning_common import (build_models_once, decode_step_with, nf4_gemv_config_with,
                           routed_layer_at_one_token)

OUT = os.environ.get("OUT", "/tmp")
PACKAGE_XSMEM = EK.NF4_XSMEM_KERNELS
VARIANTS = {"package": (PACKAGE_XSMEM, {}, {}), "down": ({"down"}, {}, {}), "gate_up": ({"gate_up"}, {}, {}),
            "gate_up_k512": ({"gate_up"}, {"BLOCK_K": 512}, {}), "both": ({"gate_up", "down"}, {}, {}),
            "items": ({"gate_up", "down", "items"}, {}, {})}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["VARIANTS"].split(",") or k == "package"}
res = {"card": B.card_name(), "versions": B.versions(), "variants": {k: sorted(v[0]) for k, v in VARIANTS.items()},
       "gate_up_configs": {k: v[1] for k, v in VARIANTS.items()}, "down_configs": {k: v[2] for k, v in VARIANTS.items()},
       "layer": [], "step": []}
print(res["card"], flush=True)


def use(name: str) -> None:
    kernels, gate_up, down = VARIANTS[name]
    EK.NF4_XSMEM_KERNELS = frozenset(kernels)
    EK.gemv_config = nf4_gemv_config_with(gate_up, down, max_rows=EK.NF4_GATE_UP_ONE_TOKEN_ROWS)


def save() -> None:
    json.dump(res, open(os.path.join(OUT, "nf4_xsmem_ab.json"), "w"), indent=1)


def timed(fn, n, ref=None):
    """(us, max relative difference from ref, outputs) of fn(i) for i < n, in a CUDA graph."""
    try:
        with torch.no_grad():
            outs = [fn(i).float() for i in range(n)]
            us = B._time_graph(fn, n)
    except Exception as e:  # noqa: BLE001  (a config the compiler or the launcher refuses)
        torch.cuda.synchronize()
        return repr(e)[:300], None, None
    err = None if ref is None else max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))
    return round(us, 2), err, outs


torch.manual_seed(0)
experts, nf4, x, inputs = routed_layer_at_one_token()
q = lambda shape: quantize_nf4(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02,  # noqa: E731
                               backend="torch")
shared = [SharedExpert(q((1, 2 * 5632, 2048)), q((1, 2048, 5632)),
                       torch.randn(1, 1, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
layer = lambda extra: (lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)))  # noqa: E731
shapes = {"routed": lambda i: {}, "with_shared": lambda i: {"shared": shared[i % 2]}}
use("package")
refs = {shape: timed(layer(extra), 8)[2] for shape, extra in shapes.items()}
for rep in range(3):
    for name in VARIANTS:
        use(name)
        for shape, extra in shapes.items():
            us, err, _ = timed(layer(extra), 8, refs[shape])
            res["layer"].append(dict(rep=rep, variant=name, shape=shape, us=us, err=err))
            print("layer", res["layer"][-1], flush=True)
    save()
use("package")

build_models_once()
res["step"] += decode_step_with(lambda v: None, "bf16", None)
print(res["step"][-1], flush=True)
STEP = [v for v in os.environ.get("STEP_VARIANTS", "package,down,items").split(",") if v in VARIANTS]
for rep in range(int(os.environ.get("STEP_REPS", "3"))):
    for name in STEP:
        for row in decode_step_with(use, name, "nf4", reset="package"):
            res["step"].append(dict(row, rep=rep))
            print(res["step"][-1], flush=True)
    save()
print("done", flush=True)
