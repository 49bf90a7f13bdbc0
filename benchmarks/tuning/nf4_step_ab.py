"""The decode step at batch 1 (NF4; PRECISIONS=bf16,nf4 for both) under launch-config variants,
alternating in one process, three rounds (the step-level check of a layer-level sweep). A variant is
"package" (the package's configs as they are) or names joined by "+", at most one of each kind:

- a gate_up shape (`tuning_common.ONE_TOKEN_GATE_UP`) for the experts' one-token gate_up: "n8w4" (8 rows on 4 warps,
  the config before 2026-12-06's eighth session), "n16w8" (16 rows on 8 warps, 512-value K-steps,
  64 registers: the eighth session's; with the shared expert its 704 programs fit 4 an SM, two
  waves), "r48" / "r40" (that capped at 48 / 40 registers: 5 / 6 an SM; 6 is the most the 33 KB of
  shared memory a program takes allows; compiled for sm_90, 40 spills 56 bytes a thread),
  "k256r40" (40 registers with 256-value K-steps: no spills), "n16w4k256" / "n16w4r80" (4-warp
  programs, 6 an SM), each also with the shared expert; nf4_t1_sweep.py times them at the layer;
- a config of the NF4 linears (q/k/v, o_proj): "lin" (the winners of `nf4_linear_sweep.py`'s run:
  LIN_FILE, default $OUT/nf4_linear_sweep_<LIN_TAG>.json, lowest mean time with outputs within 2e-2)
  or "lin8w4" (8 rows on 4 warps with `prmt`, the config before the ninth session).

"n16w8+lin8w4" is the package as the ninth session found it. Measured (H100): the eighth session's
n8w4 / n16w8 step A/B, benchmarks/results/n16w8_decode_ab_2026-12-06_h100.json (594.1-595.6 against
602.3-604.3 tokens/s); the ninth session's, nf4_step_ab_2026-12-06_h100.json (run at commit b8f474d,
whose decode attention merged its split-K partials in the last split program; its "merge2" variant
was the merge kernel, as the package is again; 596.3 against 598.9 tokens/s, so it was reverted).

VARIANTS (a comma list) picks them; default "package,n16w8+lin8w4". Writes $OUT/nf4_step_ab.json.

    LIN_TAG=run VARIANTS=package,lin python benchmarks/tuning/nf4_step_ab.py
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.kernels.gemv as G
from tuning_common import ONE_TOKEN_GATE_UP, build_models_once, decode_step_with, nf4_gemv_config_with

OUT = os.environ.get("OUT", "/tmp")
VARIANTS = os.environ.get("VARIANTS", "package,n16w8+lin8w4").split(",")
PACKAGE_LINEAR_CONFIG = G.gemv_config
GATE_UP = ONE_TOKEN_GATE_UP


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


def lin8w4_config(n_out, on_gpu, nf4=False, num_tokens=1):
    """The NF4 linears' config before 2026-12-06's ninth session: 8 rows, 4 warps, `prmt`."""
    if nf4 and on_gpu:
        return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1, NF4_SMEM=0)
    return PACKAGE_LINEAR_CONFIG(n_out, on_gpu, nf4, num_tokens)


LINEAR = {"lin": linear_config, "lin8w4": lin8w4_config}


def use(variant):
    parts = variant.split("+")
    unknown = [p for p in parts if p not in GATE_UP and p not in LINEAR and p != "package"]
    if unknown:
        raise ValueError(f"unknown variant part(s) {unknown}: known {sorted(GATE_UP) + sorted(LINEAR)} and package")
    gate_up = next((GATE_UP[p] for p in parts if p in GATE_UP), {})
    EK.gemv_config = nf4_gemv_config_with(gate_up, max_rows=EK.NF4_GATE_UP_ONE_TOKEN_ROWS)
    G.gemv_config = next((LINEAR[p] for p in parts if p in LINEAR), PACKAGE_LINEAR_CONFIG)


build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "linears": {str(k): v for k, v in LINEARS.items()},
       "decode": []}
for precision, rep in [(p, r) for p in os.environ.get("PRECISIONS", "nf4").split(",") for r in range(3)]:
    for variant in VARIANTS:
        for row in decode_step_with(use, variant, None if precision == "bf16" else precision, reset="package"):
            res["decode"].append({**row, "rep": rep})
            print("decode", res["decode"][-1], flush=True)
        json.dump(res, open(os.path.join(OUT, "nf4_step_ab.json"), "w"), indent=1)
