"""NF4 decode GEMVs with the code bytes looked up in a shared-memory table (`MOELAB_NF4_SMEM=1`:
`NF4_DOT_SMEM_ASM`, one `ld.shared` per byte from a 256-entry table of bf16 level pairs, one copy
per lane) against the package's `prmt` look-up in registers, side by side on one machine.

Why: compiled for sm_90, the package's gate_up K-step issues 346 instructions per thread, ~214 of
them on the integer pipe (which retires half as many per clock as the float pipe): about 27
integer instructions per code word, and the NF4 kernels run at an IPC of ~0.5 per scheduler. With
the table: 266 instructions, ~84 integer (10.5 per word), 32 `ld.shared`; each program first fills
its 32 KB table (2 instructions per entry and thread for 4 warps).

1. one routed-experts layer at one token (`bench experts`' shape), package / table / table with
   gate_up capped at 64 registers (95 without), alternating, outputs checked against the package's;
2. the same layer with the NF4 shared expert folded in (the decode step's shape);
3. the NF4 linear GEMV at q/k/v (6,144 x 2,048) and o_proj (2,048 x 2,048);
4. the decode step at batch 1 (NF4, graph_fused_proj), package / table alternating, bf16 once.

    python benchmarks/tuning/nf4_smem_ab.py    # on the GPU machine; writes $OUT/nf4_smem_ab.json
"""
import json
import os

import torch

import moelab.bench as B
import moelab.kernels.experts as EK
import moelab.kernels.gemv as G
from moelab.kernels.experts import SharedExpert, fused_experts_forward
from moelab.quant import quantize_nf4
from tuning_common import build_models_once, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
res = {"card": B.card_name(), "copy_gbs": B.copy_bandwidth_gbs(), "versions": B.versions(), "layer": [],
       "layer_shared": [], "linear": [], "decode": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
VARIANTS = {"package": (False, None), "table": (True, None), "table_reg64": (True, 64)}


def use(variant):
    EK.NF4_SMEM_TABLE, EK.NF4_SMEM_MAXNREG = VARIANTS[variant]


def save():
    json.dump(res, open(os.path.join(OUT, "nf4_smem_ab.json"), "w"), indent=1)


def timed(fn, n, ref=None):
    """(us, max relative error against ref, outputs) of fn(i) for i < n, in a CUDA graph."""
    try:
        with torch.no_grad():
            outs = [fn(i).float() for i in range(n)]
            us = B._time_graph(fn, n)
    except Exception as e:  # noqa: BLE001  (a config the compiler refuses)
        torch.cuda.synchronize()
        return repr(e)[:200], None, None
    err = None if ref is None else max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))
    return round(us, 2), err, outs


# ---- 1, 2. the routed-experts layer at one token, without and with the shared expert
experts, nf4, x, inputs = routed_layer_at_one_token()
q = lambda shape: quantize_nf4(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02,  # noqa: E731
                               backend="torch")
shared = [SharedExpert(q((1, 2 * 5632, 2048)), q((1, 2048, 5632)), torch.randn(1, 1, device="cuda",
                                                                              dtype=torch.bfloat16))
          for _ in range(2)]
for key, extra in (("layer", lambda i: {}), ("layer_shared", lambda i: {"shared": shared[i % 2]})):
    use("package")
    _, _, ref = timed(lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)), 8)
    for rep in range(3):
        for variant in VARIANTS:
            use(variant)
            us, err, _ = timed(lambda i: fused_experts_forward(x, *inputs[i], nf4, **extra(i)), 8, ref)
            res[key].append(dict(rep=rep, variant=variant, us=us, err=err))
            print(key, res[key][-1], flush=True)
        use("package")
        us, _, _ = timed(lambda i: fused_experts_forward(x, *inputs[i], experts), 8)
        res[key].append(dict(rep=rep, variant="bf16", us=us, err=None))
        print(key, res[key][-1], flush=True)
        save()
use("package")
del experts, nf4, shared
torch.cuda.empty_cache()

# ---- 3. the NF4 linear GEMV alone
for name, n in (("qkv", 6144), ("o_proj", 2048)):
    ws = [q((1, n, 2048)) for _ in range(12)]
    xl = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    _, _, ref = timed(lambda i: G.linear_gemv(xl, ws[i]), 12)
    for rep in range(2):
        for variant in ("package", "table"):
            use(variant)
            us, err, _ = timed(lambda i: G.linear_gemv(xl, ws[i]), 12, ref)
            res["linear"].append(dict(shape=name, rep=rep, variant=variant, us=us, err=err))
            print("linear", res["linear"][-1], flush=True)
    use("package")
    del ws
save()

# ---- 4. the decode step at batch 1, alternating
build_models_once()
best_reg = min(("table", "table_reg64"), key=lambda v: sum(
    r["us"] for r in res["layer_shared"] if r["variant"] == v and isinstance(r["us"], float)) or 1e9)
print("decode with", best_reg, flush=True)
for quant, names in (("nf4", ["package", best_reg, "package", best_reg]), (None, ["package"])):
    for name in names:
        use(name)
        try:
            r = B.bench_decode("qwen1.5-moe-a2.7b", batches=(1,), prompt_len=(16, 64), max_seq_len=2048,
                               modes=("graph_fused_proj",), quantize=quant, profile=False)
        finally:
            use("package")
        for row in r["results"]:
            res["decode"].append(dict(precision=quant or "bf16", variant=name, batch=row["batch"],
                                      tokens_per_s=row.get("tokens_per_s"), ms_per_step=row.get("ms_per_step"),
                                      error=row.get("error")))
            print("decode", res["decode"][-1], flush=True)
        save()
