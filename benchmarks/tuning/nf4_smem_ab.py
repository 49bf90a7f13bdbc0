"""NF4 decode GEMVs with the code bytes looked up in a shared-memory table (`MOELAB_NF4_SMEM=1`:
`NF4_DOT_SMEM_ASM`, one `ld.shared` per byte from a 256-entry table of bf16 level pairs, one copy
per lane) against the package's `prmt` look-up in registers, side by side on one machine.

Why: compiled for sm_90, the package's gate_up K-step issues 346 instructions per thread, 216 of
them on the integer pipe (which retires half as many per clock as the float pipe): about 27
integer instructions per code word, and the NF4 kernels run at an IPC of ~0.5 per scheduler. With
the table: 266 instructions, ~84 integer (10.5 per word), 32 `ld.shared`; each program first fills
its 32 KB table (2 instructions per entry and thread for 4 warps).

1. one routed-experts layer at one token (`bench experts`' shape), with the table in no kernel, in
   gate_up (capped at 64 registers: 95 without), in down, in both, and in both with gate_up at 16
   rows a program, alternating, outputs checked against the prmt path's;
2. the same layer with the NF4 shared expert folded in (the decode step's shape);
3. the NF4 linear GEMV at q/k/v (6,144 x 2,048) and o_proj (2,048 x 2,048), prmt / table (LINEAR=1);
4. the decode step at batch 1 (NF4, graph_fused_proj), no table / the best set of 2. alternating,
   bf16 once with BF16=1; the best set goes to $OUT/nf4_smem_best.txt (for MOELAB_NF4_SMEM in later commands).

    python benchmarks/tuning/nf4_smem_ab.py    # on the GPU machine; writes $OUT/nf4_smem_ab.json

benchmarks/results/nf4_smem_ab_2026-12-06_h100.json (H100, an earlier version of this script, its
variants "table" = all three kernels, "table_reg64" = the same with gate_up capped at 64 registers):
layer at one token 18.8 us (prmt) / 19.3-19.9 (table) / 17.7 (capped); with the shared expert 33.7 /
32.7 / 31.2; linears slower with the table (q/k/v 6.6 -> 8.0 us, o_proj 3.3 -> 3.7); decode step NF4
571.4 / 572.0 -> 582.4 / 582.3 tokens/s (capped, linears included), bf16 443.8.
benchmarks/results/nf4_smem_ab_2026-12-06_h100_run2.json (this version, H100): layer at one token
none 18.8-19.2, gate_up 18.2-18.5, down 18.2-18.5, both 17.8-18.1, both with 16-row gate_up programs
22.6-22.9 us (bf16 28.2-28.4); with the shared expert 33.6-34.2 / 31.7-32.6 / 32.5-33.2 / 31.5 /
38.9-39.1; decode step NF4 none 544.1 / 572.1, both 583.7 / 592.9 tokens/s. The package takes both.
The 16-row gate_up was slow because the 64-register cap made it spill (compiled for sm_90: 144 bytes
of stack, 43 local loads); on 8 warps it compiles to 48 registers without spills, the same code words
per thread and half the table fills of the package's 8 rows on 4: "gate_up16w8,down", added after that
run, not yet timed.
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.kernels.gemv as G
from moelab.kernels.experts import fused_experts_forward
from moelab.quant import quantize_nf4
from tuning_common import (build_models_once, decode_step_with, graph_timed, nf4_gemv_config_with, nf4_shared_experts,
                           routed_layer_at_one_token)

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
res = {"card": B.card_name(), "copy_gbs": B.copy_bandwidth_gbs(), "versions": B.versions(), "layer": [],
       "layer_shared": [], "linear": [], "decode": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
VARIANTS = {"none": (), "gate_up": ("gate_up",), "down": ("down",), "gate_up,down": ("gate_up", "down"),
            "gate_up16,down": ("gate_up", "down"), "gate_up16w8,down": ("gate_up", "down")}
GATE_UP_CONFIG = {"gate_up16,down": {"BLOCK_N": 16}, "gate_up16w8,down": {"BLOCK_N": 16, "num_warps": 8}}


def use(variant):
    EK.NF4_SMEM_KERNELS = frozenset(VARIANTS[variant])
    EK.gemv_config = nf4_gemv_config_with(GATE_UP_CONFIG.get(variant))  # 16 rows a program: half the table fills


def save():
    json.dump(res, open(os.path.join(OUT, "nf4_smem_ab.json"), "w"), indent=1)


# ---- 1, 2. the routed-experts layer at one token, without and with the shared expert
experts, nf4, x, inputs = routed_layer_at_one_token()
q = lambda shape: quantize_nf4(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02,  # noqa: E731
                               backend="torch")
shared = nf4_shared_experts(2)
for key, extra in (("layer", lambda i: {}), ("layer_shared", lambda i: {"shared": shared[i % 2]})):
    use("none")
    _, _, ref = graph_timed(lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)), 8)
    for rep in range(3):
        for variant in VARIANTS:
            use(variant)
            us, err, _ = graph_timed(lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)), 8, ref)
            res[key].append(dict(rep=rep, variant=variant, us=us, err=err))
            print(key, res[key][-1], flush=True)
        use("none")
        us, _, _ = graph_timed(lambda i: fused_experts_forward(x, *inputs[i], experts), 8)
        res[key].append(dict(rep=rep, variant="bf16", us=us, err=None))
        print(key, res[key][-1], flush=True)
        save()
use("none")
del experts, nf4, shared
torch.cuda.empty_cache()

# ---- 3. the NF4 linear GEMV alone (LINEAR=1)
for name, n in (("qkv", 6144), ("o_proj", 2048)) if os.environ.get("LINEAR") == "1" else ():
    ws = [q((1, n, 2048)) for _ in range(12)]
    xl = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    _, _, ref = graph_timed(lambda i: G.linear_gemv(xl, ws[i], config={"NF4_SMEM": 0}), 12)
    for rep in range(2):
        for variant, over in (("prmt", {"NF4_SMEM": 0}), ("table", {"NF4_SMEM": 4})):
            us, err, _ = graph_timed(lambda i: G.linear_gemv(xl, ws[i], config=over), 12, ref)
            res["linear"].append(dict(shape=name, rep=rep, variant=variant, us=us, err=err))
            print("linear", res["linear"][-1], flush=True)
    del ws
save()

# ---- 4. the decode step at batch 1, alternating
shared_us = {v: [r["us"] for r in res["layer_shared"] if r["variant"] == v] for v in VARIANTS}
shared_us = {v: sum(t) if all(isinstance(u, float) for u in t) else float("inf") for v, t in shared_us.items()}
best = min((v for v in VARIANTS if v != "none"), key=shared_us.get)
res["best"] = best
open(os.path.join(OUT, "nf4_smem_best.txt"), "w").write(",".join(VARIANTS[best]))
print("decode with", best, flush=True)
build_models_once()
for quant, names in (("nf4", ["none", best, "none", best]),) + (((None, ["none"]),) if os.environ.get("BF16") else ()):
    for name in names:
        for row in decode_step_with(use, name, quant):
            res["decode"].append(row)
            print("decode", row, flush=True)
        save()
