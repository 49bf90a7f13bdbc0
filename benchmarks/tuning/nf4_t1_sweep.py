"""The NF4 routed-experts layer at one token (issue 7's T=1 row) under other launch configs of its two
decode kernels, the shared-memory table on: gate_up with prefetched K-steps (`PIPELINE` > 1:
cp.async into shared memory while this step is multiplied), other K-steps, 16 rows on 8 warps (half
the table fills), 8 rows on 8 or 4 warps, other register caps (48: 5 of the one-token 8-warp
programs on an SM instead of 4; 40: 6, the most the 33 KB of shared memory a program takes
allows, so the decode step's 704 gate_up programs run in one wave where 64 registers take two:
compiled for sm_90, 40 registers spill 56 bytes a thread at 512-value K-steps and none at 256;
or 4-warp programs: 6 an SM at 64 registers with 256-value steps, at 80 with 512), down at one token with other rows, warps and K-steps. Each variant
replaces the package's config of one kernel (the other keeps its own), all timed in CUDA graphs,
alternating, outputs checked against the package's; bf16 beside them.

Why: compiled for sm_90 the gate_up K-step is about 266 instructions a thread, and with 704 8-row
programs in one wave (the config before this sweep) every program runs its four 512-value K-steps as load-then-multiply, the loads of the
next step not issued before this step's multiplies are done (PIPELINE 1, chosen when the `prmt`
look-up made the multiplies twice as long).

Measured (H100, 2026-12-06, benchmarks/results/nf4_t1_sweep_2026-12-06_h100.json): gate_up at 16
rows on 8 warps beat the package's 8 rows on 4 (17.8 -> 17.0 us, with the shared expert 31.3 ->
30.3: nf4_t1_sweep_n16w8_2026-12-06_h100.log) and is the package's config since; pipelined K-steps
were the slowest (25-30 us). The same session timed three more leads with this script and
`l2_prefetch_ab.py` (L2 prefetches from gate_up and per layer, x in one 16-byte load per code word):
none gained, and their code left the package; it is in commit dbafd5e. The ninth session timed the
register caps and 4-warp shapes with the shared expert (SHARED=all GATE_UP=r48,r40,k256r40,n16w4k256,
n16w4r80, nf4_t1_sweep_waves_2026-12-06_h100.json): only n16w4k256 gained, with the shared expert
(30.2 -> 29.6 us; routed alone 20.8 against 16.9), and is the package's config there. The "base" variant is the
package's config at the time of the run; the variants from `tuning_common.ONE_TOKEN_GATE_UP` are whole
launch shapes, the others change the package's config at the time of the run. GATE_UP / DOWN (comma lists) restrict the variants;
SHARED=1 also times the best variants with the shared expert folded in, SHARED=all every variant.
Writes $OUT/nf4_t1_sweep_<TAG>.json.

    TAG=run SHARED=1 python benchmarks/tuning/nf4_t1_sweep.py
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
from moelab.kernels.experts import fused_experts_forward
from tuning_common import (ONE_TOKEN_GATE_UP, graph_timed, keep_variants, nf4_gemv_config_with, nf4_shared_experts,
                           routed_layer_at_one_token)

OUT, TAG = os.environ.get("OUT", "/tmp"), os.environ.get("TAG", "run")
GATE_UP = {"base": {}, "p2": {"PIPELINE": 2}, "p2r80": {"PIPELINE": 2, "maxnreg": 80},
           "k256p2": {"BLOCK_K": 256, "PIPELINE": 2}, "k256p3": {"BLOCK_K": 256, "PIPELINE": 3},
           "k1024": {"BLOCK_K": 1024}, "r80": {"maxnreg": 80}, "n16w8": {"BLOCK_N": 16, "num_warps": 8},
           "n16w8p2": {"BLOCK_N": 16, "num_warps": 8, "PIPELINE": 2}, "n8w4": {"BLOCK_N": 8, "num_warps": 4},
           "n8w8": {"BLOCK_N": 8, "num_warps": 8}, "n8w8p2": {"BLOCK_N": 8, "num_warps": 8, "PIPELINE": 2},
           **{k: v for k, v in ONE_TOKEN_GATE_UP.items() if k not in ("n8w4", "n16w8")}}
DOWN = {"base": {}, "n8w16": {"BLOCK_N": 8, "num_warps": 16}, "w16": {"num_warps": 16},
        "k512p2": {"BLOCK_K": 512, "PIPELINE": 2, "SHARED_BLOCK_K": 512},
        "k1024p2": {"BLOCK_K": 1024, "PIPELINE": 2, "SHARED_BLOCK_K": 1024}}
keep_variants({"GATE_UP": GATE_UP, "DOWN": DOWN}, "base")
res = {"card": B.card_name(), "versions": B.versions(),
       "smem_kernels": sorted(EK.NF4_SMEM_KERNELS), "gate_up": GATE_UP, "down": DOWN, "layer": [], "layer_shared": []}
print(res["card"], flush=True)


def use(gate_up: dict, down: dict):
    """gemv_config with gate_up's NF4 config updated by `gate_up`, down's (one token) by `down`."""
    EK.gemv_config = nf4_gemv_config_with(gate_up, down)


def save():
    json.dump(res, open(os.path.join(OUT, f"nf4_t1_sweep_{TAG}.json"), "w"), indent=1)


torch.manual_seed(0)
experts, nf4, x, inputs = routed_layer_at_one_token()
shared = nf4_shared_experts(2)
layer = lambda extra: (lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)))  # noqa: E731
no_shared, with_shared = (lambda i: {}), (lambda i: {"shared": shared[i % 2]})
use({}, {})
_, _, ref = graph_timed(layer(no_shared), 8)
_, _, ref_shared = graph_timed(layer(with_shared), 8)
ref_bf16 = None
variants = [("gate_up", k, v, {}) for k, v in GATE_UP.items()] + [("down", k, {}, v) for k, v in DOWN.items() if k != "base"]
for rep in range(3):
    for kernel, name, gu, dn in variants:
        use(gu, dn)
        us, err, _ = graph_timed(layer(no_shared), 8, ref)
        res["layer"].append(dict(rep=rep, kernel=kernel, variant=name, us=us, err=err))
        print("layer", res["layer"][-1], flush=True)
        if os.environ.get("SHARED") == "all":  # every variant with the shared expert too (the decode step's shape)
            us, err, _ = graph_timed(layer(with_shared), 8, ref_shared)
            res["layer_shared"].append(dict(rep=rep, kernel=kernel, variant=name, us=us, err=err))
            print("layer_shared", res["layer_shared"][-1], flush=True)
    use({}, {})
    us, err, outs = graph_timed(lambda i: fused_experts_forward(x, *inputs[i], experts), 8, ref_bf16)
    ref_bf16 = ref_bf16 or outs
    res["layer"].append(dict(rep=rep, kernel="bf16", variant="bf16", us=us, err=err))
    print("layer", res["layer"][-1], flush=True)
    save()


def best(kernel):
    """The variant of `kernel` with the lowest mean time; "base" (both kernels at the package's
    configs, timed in the gate_up rows) competes for down too."""
    rows = [r for r in res["layer"] if (r["kernel"] == kernel or r["variant"] == "base") and isinstance(r["us"], float)
            and r["err"] is not None and r["err"] < 2e-2]
    means = {}
    for r in rows:
        means.setdefault(r["variant"], []).append(r["us"])
    return min(means, key=lambda v: sum(means[v]) / len(means[v])) if means else "base"


res["best"] = {"gate_up": best("gate_up"), "down": best("down")}
print("best", res["best"], flush=True)
combos = {"base": ({}, {}), "best": (GATE_UP[res["best"]["gate_up"]], DOWN.get(res["best"]["down"], {}))}
for rep in range(3):
    for name, (gu, dn) in combos.items():
        use(gu, dn)
        us, err, _ = graph_timed(layer(no_shared), 8, ref)
        res["layer"].append(dict(rep=rep, kernel="both", variant=name, us=us, err=err))
        print("layer", res["layer"][-1], flush=True)
        if os.environ.get("SHARED") in ("1", "all"):
            us, err, _ = graph_timed(layer(with_shared), 8, ref_shared)
            res["layer_shared"].append(dict(rep=rep, variant=name, us=us, err=err))
            print("layer_shared", res["layer_shared"][-1], flush=True)
    save()
use({}, {})
