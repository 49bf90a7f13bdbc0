"""Fewer, wider K-steps for the NF4 decode GEMVs at one token: does giving each program its
whole row (BLOCK_K up to 2,048 values, more warps per program, so the same code words per
thread as the package's 512-value steps on 4 warps) make the NF4 kernels faster?

The package's NF4 word kernels at one token take four 512-value K-steps per program, each a
load of the code words (and the absmax chain) followed by ~39 instructions per word; an ncu
profile showed 4.7 warps per scheduler, 0.47 instructions issued per cycle and half the stalls
on global loads (benchmarks/results/ncu_nf4_gate_up_2026-12-06_h100.txt). A wider K-step on more
warps keeps each thread's work per step but cuts the steps each program runs one after the
other (and the programs in flight go from one wave to several).

Timed side by side on one machine, in CUDA graphs with PDL as the package launches them:
1. one routed-experts layer at one token (`fused_experts_forward`, like `bench experts`), each
   candidate config for gate_up (down at the package's) and for down (gate_up at the package's);
   every config's output checked against the package's;
2. the NF4 linear GEMV alone at q/k/v (6,144 x 2,048) and o_proj (2,048 x 2,048) shapes;
3. the decode step at batch 1 (`bench_decode`, NF4, graph_fused_proj), package vs the best of 1
   and 2, alternating, and bf16 once for the ratio.

    python benchmarks/tuning/nf4_wide_sweep.py    # on the GPU machine; writes $OUT/nf4_wide_sweep.json

benchmarks/results/sweep_nf4_wide_2026-12-06_h100.json (H100, commit 053c27c): every wider gate_up was
slower (layer 20.7 us with the package's, 22.1 to 36.2 with the others), so the steps a program runs one
after the other are not what holds gate_up back; down in 16-row programs of 32 warps, the whole row in
one 2,048-value step, took the layer from 20.7 to 19.0 us (the package's config since); the linears
gained nothing; the decode step at batch 1 with it 562.6 / 573.5 against 548.8 / 558.6 tokens/s.
"""
import json
import os
import statistics

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.kernels.gemv as G
from moelab.kernels.experts import fused_experts_forward
from moelab.quant import quantize_nf4
from tuning_common import build_models_once, decode_step, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
res = {"card": B.card_name(), "copy_gbs": B.copy_bandwidth_gbs(), "versions": B.versions(), "layer": [],
       "linear": [], "decode": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
ORIG_EK, ORIG_G = EK.gemv_config, G.gemv_config


def save():
    json.dump(res, open(os.path.join(OUT, "nf4_wide_sweep.json"), "w"), indent=1)


def cfg_of(t):
    bn, bk, nw = t
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1)


def patch(gate=None, down=None, shared_bk=None, linear=None):
    """Override the NF4 decode configs (None: the package's)."""
    def ek(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
        c = ORIG_EK(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
        if not (nf4 and on_gpu and num_rows <= 8):
            return c
        o = gate if gated else down
        if o is not None:
            c = {**c, **cfg_of(o)}
            if shared and not gated:
                c["SHARED_BLOCK_K"] = shared_bk or o[1]
        return c

    def g(n_out, on_gpu, nf4=False):
        c = ORIG_G(n_out, on_gpu, nf4)
        return {**c, **cfg_of(linear)} if (nf4 and on_gpu and linear is not None) else c
    EK.gemv_config, G.gemv_config = ek, g


# ---- 1. the routed-experts layer at one token
experts, nf4, x, inputs = routed_layer_at_one_token()


def layer_us(layer, **over):
    patch(**over)
    try:
        with torch.no_grad():
            outs = [fused_experts_forward(x, *inputs[i], layer).float() for i in range(8)]
            us = B._time_graph(lambda i: fused_experts_forward(x, *inputs[i], layer), 8)
        return us, outs
    except Exception as e:  # noqa: BLE001  (a config the compiler refuses)
        torch.cuda.synchronize()
        return repr(e)[:160], None
    finally:
        EK.gemv_config, G.gemv_config = ORIG_EK, ORIG_G


ref_us, ref = layer_us(nf4)
GATE = [(8, 1024, 8), (8, 2048, 16), (4, 1024, 4), (4, 2048, 8), (4, 2048, 16), (8, 1024, 4), (16, 2048, 32),
        (2, 2048, 4), (2, 2048, 8), (4, 512, 2)]
DOWN = [(8, 1024, 8), (8, 1024, 16), (8, 2048, 16), (4, 512, 4), (4, 1024, 8), (4, 2048, 16), (2, 1024, 4),
        (2, 2048, 8), (4, 512, 8), (16, 2048, 32)]


def err(outs):
    return max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))


for rep in range(2):
    for kind, cands in (("gate_up", GATE), ("down", DOWN)):
        for c in [None] + cands:
            us, outs = layer_us(nf4, **({"gate": c} if kind == "gate_up" else {"down": c}))
            row = dict(rep=rep, kernel=kind, config=c, us=us, err=None if outs is None else err(outs))
            res["layer"].append(row)
            print("layer", row, flush=True)
    bf_us, _ = layer_us(experts)
    res["layer"].append(dict(rep=rep, kernel="bf16", config=None, us=bf_us, err=None))
    print("layer bf16", bf_us, flush=True)
    save()


def best(kind):
    by = {}
    for r in res["layer"]:
        if r["kernel"] == kind and isinstance(r["us"], float) and (r["err"] or 0) < 1e-2:
            by.setdefault(r["config"] and tuple(r["config"]), []).append(r["us"])
    means = {k: statistics.mean(v) for k, v in by.items()}
    return min(means, key=means.get), means


best_gate, gm = best("gate_up")
best_down, dm = best("down")
print("best gate_up", best_gate, gm.get(best_gate), "package", gm.get(None), flush=True)
print("best down", best_down, dm.get(best_down), "package", dm.get(None), flush=True)
both_us, outs = layer_us(nf4, gate=best_gate, down=best_down)
res["layer"].append(dict(rep=9, kernel="both_best", config=[best_gate, best_down], us=both_us,
                         err=None if outs is None else err(outs)))
print("layer both best", both_us, flush=True)
save()
del experts, nf4
torch.cuda.empty_cache()

# ---- 2. the NF4 linear GEMV alone
LIN = [(8, 1024, 8), (8, 2048, 16), (4, 1024, 4), (4, 2048, 8), (4, 2048, 16), (2, 2048, 8), (2, 2048, 4)]
for name, n in (("qkv", 6144), ("o_proj", 2048)):
    ws = [quantize_nf4(torch.randn(1, n, 2048, device=dev, dtype=dt) * 0.02, backend="torch") for _ in range(12)]
    xl = torch.randn(1, 2048, device=dev, dtype=dt)
    base = [G.linear_gemv(xl, w).float() for w in ws]
    for c in [None] + LIN:
        try:
            outs = [G.linear_gemv(xl, w, config=c and cfg_of(c)).float() for w in ws]
            us = B._time_graph(lambda i, c=c: G.linear_gemv(xl, ws[i], config=c and cfg_of(c)), 12)
            e = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, base))
        except Exception as ex:  # noqa: BLE001
            us, e = repr(ex)[:160], None
        row = dict(shape=name, config=c, us=us, err=e)
        res["linear"].append(row)
        print("linear", row, flush=True)
    del ws
save()
lin_rows = [r for r in res["linear"] if isinstance(r["us"], float)]
lin_tot = {}
for r in lin_rows:
    lin_tot.setdefault(r["config"] and tuple(r["config"]), []).append(r["us"])
lin_tot = {k: sum(v) for k, v in lin_tot.items() if len(v) == 2}
best_lin = min(lin_tot, key=lin_tot.get)
print("best linear", best_lin, lin_tot[best_lin], "package", lin_tot.get(None), flush=True)

# ---- 3. the decode step at batch 1, package vs the best configs, alternating
build_models_once()
variants = {"package": {}, "wide": dict(gate=best_gate, down=best_down, linear=best_lin)}
res["decode_variants"] = {k: {kk: vv for kk, vv in v.items()} for k, v in variants.items()}
for quant, names in (("nf4", ["package", "wide", "package", "wide"]), (None, ["package"])):
    for name in names:
        patch(**variants[name])
        try:
            rows = decode_step(name, quant)
        finally:
            EK.gemv_config, G.gemv_config = ORIG_EK, ORIG_G
        for row in rows:
            res["decode"].append(row)
            print("decode", row, flush=True)
        save()
