"""The decode step at batch 1 (NF4; PRECISIONS=bf16,nf4 for both) under launch-config variants,
alternating in one process, three rounds (the step-level check of a layer-level sweep):

- "package": the package's configs as they are;
- a gate_up variant (GATE_UP below): the experts' one-token gate_up (16 rows, 8 warps, 64 registers,
  512-value K-steps: 4 programs an SM, so the decode step's 704 programs with the shared expert take
  two waves) with another register cap or shape: "r48" (5 an SM), "r40" (6, the most the 33 KB of
  shared memory a program takes allows: one wave; spills 56 bytes a thread compiled for sm_90),
  "k256r40" (that with 256-value K-steps: no spills), "n16w4k256" / "n16w4r80" (4-warp programs,
  6 an SM: one wave); nf4_t1_sweep.py times them at the layer;
- "lin": the NF4 linears (q/k/v, o_proj) at the configs that won `nf4_linear_sweep.py`'s run
  (LIN_FILE, default $OUT/nf4_linear_sweep_<LIN_TAG>.json: lowest mean time with outputs within 2e-2);
- "merge2": decode attention's split-K partials merged by a second kernel (the package's way) where
  commit b8f474d's kernel had the last split program merge them (the package at that commit);
- "prev": the configs before 2026-12-06's ninth session, which made "n16w4k256" (with the shared
  expert) and "lin" the package's: gate_up at one token 16 rows on 8 warps in 512-value steps
  whatever the shared expert, the NF4 linears 8 rows on 4 warps with `prmt`;
- "r48+lin": both (any variants joined by "+").

VARIANTS (a comma list) picks them; default "package,r48,lin,r48+lin". Writes $OUT/nf4_step_ab.json.

    LIN_TAG=run python benchmarks/tuning/nf4_step_ab.py
"""
import json
import os

import moelab.bench as B
import moelab.kernels.attention as A  # MERGE_IN_LAST_SPLIT: only at commit b8f474d
import moelab.kernels.experts as EK
import moelab.kernels.gemv as G
from tuning_common import build_models_once, decode_step_with, nf4_gemv_config_with

OUT = os.environ.get("OUT", "/tmp")
VARIANTS = os.environ.get("VARIANTS", "package,r48,lin,r48+lin").split(",")
PACKAGE_LINEAR_CONFIG = G.gemv_config
GATE_UP = {"r48": {"maxnreg": 48}, "r40": {"maxnreg": 40}, "k256r40": {"BLOCK_K": 256, "maxnreg": 40},
           "n16w4k256": {"num_warps": 4, "BLOCK_K": 256}, "n16w4r80": {"num_warps": 4, "maxnreg": 80}}


def best_linears(path):
    """{n_out: config} of the winning q/k/v (6,144 rows) and o_proj (2,048) variants of a sweep file."""
    sweep = json.load(open(path))
    best = {}
    for kind, n_out in (("qkv", 6144), ("o", 2048)):
        means = {}
        for r in sweep["rows"]:
            if r["kind"] == kind and r["us"] is not None and r["err"] is not None and r["err"] < 2e-2:
                means.setdefault(r["variant"], []).append(r["us"])
        name = min(means, key=lambda v: sum(means[v]) / len(means[v]))
        best[n_out] = (name, sweep[kind][name])
    return best


LIN_FILE = os.environ.get("LIN_FILE") or os.path.join(OUT, f"nf4_linear_sweep_{os.environ.get('LIN_TAG', 'run')}.json")
LINEARS = best_linears(LIN_FILE) if any("lin" in v.split("+") for v in VARIANTS) else {}
print("linears", LINEARS, flush=True)


def linear_config(n_out, on_gpu, nf4=False, num_tokens=1):
    cfg = PACKAGE_LINEAR_CONFIG(n_out, on_gpu, nf4, num_tokens)
    if nf4 and on_gpu and n_out in LINEARS and LINEARS[n_out][1]:
        return {**cfg, **LINEARS[n_out][1]}
    return cfg


def prev_linear_config(n_out, on_gpu, nf4=False, num_tokens=1):
    """The NF4 linears' config before 2026-12-06's ninth session: 8 rows, 4 warps, `prmt`."""
    if nf4 and on_gpu:
        return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1, NF4_SMEM=0)
    return PACKAGE_LINEAR_CONFIG(n_out, on_gpu, nf4, num_tokens)


def use(variant):
    parts = variant.split("+")
    gate_up = next((GATE_UP[p] for p in parts if p in GATE_UP), {})
    EK.gemv_config = nf4_gemv_config_with(gate_up, max_rows=EK.NF4_GATE_UP_ONE_TOKEN_ROWS)
    G.gemv_config = linear_config if "lin" in parts else PACKAGE_LINEAR_CONFIG
    if "prev" in parts:  # the ninth session's baseline: its gate_up and linears
        EK.gemv_config = nf4_gemv_config_with({"num_warps": 8, "BLOCK_K": 512}, max_rows=EK.NF4_GATE_UP_ONE_TOKEN_ROWS)
        G.gemv_config = prev_linear_config
    if hasattr(A, "MERGE_IN_LAST_SPLIT"):
        A.MERGE_IN_LAST_SPLIT = "merge2" not in parts


build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "linears": {str(k): v for k, v in LINEARS.items()},
       "decode": []}
for precision, rep in [(p, r) for p in os.environ.get("PRECISIONS", "nf4").split(",") for r in range(3)]:
    for variant in VARIANTS:
        for row in decode_step_with(use, variant, None if precision == "bf16" else precision, reset="package"):
            res["decode"].append({**row, "rep": rep})
            print("decode", res["decode"][-1], flush=True)
        json.dump(res, open(os.path.join(OUT, "nf4_step_ab.json"), "w"), indent=1)
