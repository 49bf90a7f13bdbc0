"""Weights loaded before the PDL wait (`PREFETCH`): the decode GEMVs' first K-step of weights comes
from memory while the kernel before finishes, since no kernel writes weights (and the down
kernel's expert ids come from the router, which finished before gate_up let it start).

Timed side by side on one machine, in CUDA graphs with PDL as the package launches them:
1. one routed-experts layer at one token (`fused_experts_forward`, like `bench experts`): the down
   kernel's config (BLOCK_N, BLOCK_K, num_warps) with and without PREFETCH, NF4 and bf16, every
   output checked against the package's;
2. the linear GEMV alone at q/k/v (6,144 x 2,048) and o_proj (2,048 x 2,048), NF4 and bf16;
3. the decode step at batch 1 (`bench_decode`, graph_fused_proj), NF4 and bf16: the package, with
   PREFETCH in down and the linears, and with the best configs of 1 and 2, alternating.

    python benchmarks/tuning/nf4_prefetch_sweep.py   # on the GPU machine; writes $OUT/nf4_prefetch_sweep.json

benchmarks/results/sweep_nf4_prefetch_2026-12-06_h100.json (H100) ran this script at commit 888d849, the
only commit whose kernels take PREFETCH (`_gemv_tile` / `_gemv_step`): the layer with it 19.9 / 20.4 us
against 19.8 / 19.9 without, bf16 29.7 against 28.1; the NF4 linears no faster; the NF4 decode step
562.1 / 558.2 against 549.6 / 557.6 tokens/s (within run-to-run spread), bf16 421 against 440 / 424. The
weights' first K-step was not what the kernels wait for, so the next commit removed PREFETCH again.
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
from tuning_common import build_models_once, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
res = {"card": B.card_name(), "copy_gbs": B.copy_bandwidth_gbs(), "versions": B.versions(), "layer": [],
       "linear": [], "decode": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
ORIG_EK, ORIG_G = EK.gemv_config, G.gemv_config


def save():
    json.dump(res, open(os.path.join(OUT, "nf4_prefetch_sweep.json"), "w"), indent=1)


def cfg_of(c):
    """(BLOCK_N, BLOCK_K, num_warps, PREFETCH) or {"PREFETCH": p} -> a config override."""
    if isinstance(c, dict):
        return c
    bn, bk, nw, pf = c
    return dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1, PREFETCH=pf)


def patch(down=None, linear=None, nf4_only=True):
    """Override the one-token down and linear configs (None: the package's)."""
    def ek(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
        c = ORIG_EK(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
        if gated or down is None or num_rows != 1 or (nf4_only and not nf4) or not on_gpu:
            return c
        o = cfg_of(down)
        c = {**c, **o}
        if shared and "BLOCK_K" in o and nf4:
            c["SHARED_BLOCK_K"] = o["BLOCK_K"]
        return c

    def g(n_out, on_gpu, nf4=False):
        c = ORIG_G(n_out, on_gpu, nf4)
        if linear is None or (nf4_only and not nf4) or not on_gpu:
            return c
        return {**c, **cfg_of(linear)}
    EK.gemv_config, G.gemv_config = ek, g


def unpatch():
    EK.gemv_config, G.gemv_config = ORIG_EK, ORIG_G


# ---- 1. the routed-experts layer at one token
experts, nf4, x, inputs = routed_layer_at_one_token()
refs = {}


def layer_us(layer, name, **over):
    patch(nf4_only=False, **over)
    try:
        with torch.no_grad():
            outs = [fused_experts_forward(x, *inputs[i], layer).float() for i in range(8)]
            us = B._time_graph(lambda i: fused_experts_forward(x, *inputs[i], layer), 8)
        ref = refs.setdefault(name, outs)
        return us, max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))
    except Exception as e:  # noqa: BLE001  (a config the compiler refuses)
        torch.cuda.synchronize()
        return repr(e)[:160], None
    finally:
        unpatch()


DOWN = [(8, 512, 8), (16, 2048, 32), (16, 2048, 16), (8, 2048, 16), (8, 1024, 8), (32, 2048, 32), (16, 1024, 16)]
for rep in range(2):
    for c in [None, {"PREFETCH": True}] + [d + (pf,) for d in DOWN for pf in (False, True)]:
        us, e = layer_us(nf4, "nf4", down=c)
        row = dict(rep=rep, precision="nf4", down=c, us=us, err=e)
        res["layer"].append(row)
        print("layer", row, flush=True)
    for c in [None, {"PREFETCH": True}]:
        us, e = layer_us(experts, "bf16", down=c)
        row = dict(rep=rep, precision="bf16", down=c, us=us, err=e)
        res["layer"].append(row)
        print("layer", row, flush=True)
    save()


def best_of(rows, key):
    by = {}
    for r in rows:
        if isinstance(r["us"], float) and (r["err"] or 0) < 1e-2:
            by.setdefault(json.dumps(r[key]), []).append(r["us"])
    means = {k: statistics.mean(v) for k, v in by.items()}
    return json.loads(min(means, key=means.get)), means


best_down, dm = best_of([r for r in res["layer"] if r["precision"] == "nf4"], "down")
print("best nf4 down", best_down, dm[json.dumps(best_down)], "package", dm["null"], flush=True)
del experts, nf4
torch.cuda.empty_cache()

# ---- 2. the linear GEMV alone
LIN = [(8, 512, 4), (8, 1024, 8), (8, 2048, 16)]
for precision in ("nf4", "bf16"):
    for name, n in (("qkv", 6144), ("o_proj", 2048)):
        raw = [torch.randn(n, 2048, device=dev, dtype=dt) * 0.02 for _ in range(12)]
        ws = [quantize_nf4(w[None], backend="torch") for w in raw] if precision == "nf4" else raw
        xl = torch.randn(1, 2048, device=dev, dtype=dt)
        base = [G.linear_gemv(xl, w).float() for w in ws]
        cands = [None, {"PREFETCH": True}] + ([c + (pf,) for c in LIN for pf in (False, True)] if precision == "nf4" else [])
        for c in cands:
            try:
                outs = [G.linear_gemv(xl, w, config=c and cfg_of(c)).float() for w in ws]
                us = B._time_graph(lambda i, c=c: G.linear_gemv(xl, ws[i], config=c and cfg_of(c)), 12)
                e = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, base))
            except Exception as ex:  # noqa: BLE001
                us, e = repr(ex)[:160], None
            row = dict(precision=precision, shape=name, config=c, us=us, err=e)
            res["linear"].append(row)
            print("linear", row, flush=True)
        del ws, raw
    save()
tot = {}
for r in res["linear"]:
    if r["precision"] == "nf4" and isinstance(r["us"], float):
        tot.setdefault(json.dumps(r["config"]), []).append(r["us"])
tot = {k: sum(v) for k, v in tot.items() if len(v) == 2}
best_lin = json.loads(min(tot, key=tot.get))
print("best nf4 linear", best_lin, tot[json.dumps(best_lin)], "package", tot["null"], flush=True)

# ---- 3. the decode step at batch 1, alternating
build_models_once()
PF = {"PREFETCH": True}
variants = {"package": {}, "prefetch": dict(down=PF, linear=PF), "prefetch_best": dict(down=best_down, linear=best_lin)}
res["decode_variants"] = variants
plan = (("nf4", ["package", "prefetch", "prefetch_best"] * 2), (None, ["package", "prefetch"] * 2))
for quant, names in plan:
    for name in names:
        patch(nf4_only=False, **variants[name])
        try:
            r = B.bench_decode("qwen1.5-moe-a2.7b", batches=(1,), prompt_len=(16, 64), max_seq_len=2048,
                               modes=("graph_fused_proj",), quantize=quant, profile=False)
        finally:
            unpatch()
        for row in r["results"]:
            res["decode"].append(dict(precision=quant or "bf16", variant=name, batch=row["batch"],
                                      tokens_per_s=row.get("tokens_per_s"), ms_per_step=row.get("ms_per_step"),
                                      error=row.get("error")))
            print("decode", res["decode"][-1], flush=True)
        save()
