"""Per-kernel times of the NF4 decode GEMVs at one token with the shared expert folded in, the
tensor-core path (`moelab.kernels.nf4_mma`) in several shapes against the word path, from
CUDA kernel records (torch.profiler, 50 eager calls each over 8 routings). Also checks each
variant's output against dequantize-then-matmul. Writes $OUT/nf4_mma_kernels.json.

    python benchmarks/tuning/nf4_mma_kernels.py
"""
import json
import os
import types

import torch

import moelab
import moelab.bench as B
import moelab.kernels.nf4_mma as MMA
from moelab.kernels.experts import fused_experts_forward
from moelab.quant import dequantize_nf4
from tuning_common import nf4_shared_experts, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
def _v(g=4, d=16, rg=64, rd=None, split=True, prefetch=True):
    return {"GATE_UP_WARPS": g, "DOWN_WARPS": d, "MAXNREG": {"gate_up": rg, "down": rd}, "DOWN_SPLIT_LOOPS": split,
            "GATE_UP_PREFETCH": prefetch}


VARIANTS = {"words": None, "mma": {}, "no_prefetch": _v(prefetch=False), "no_prefetch_uncapped": _v(rg=None, prefetch=False),
            "g8_no_prefetch": _v(g=8, prefetch=False), "g8r80_no_prefetch": _v(g=8, rg=80, prefetch=False)}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["VARIANTS"].split(",") or k == "words"}
PACKAGE = {"GATE_UP_WARPS": MMA.GATE_UP_WARPS, "DOWN_WARPS": MMA.DOWN_WARPS, "MAXNREG": dict(MMA.MAXNREG),
           "DOWN_SPLIT_LOOPS": MMA.DOWN_SPLIT_LOOPS, "GATE_UP_PREFETCH": MMA.GATE_UP_PREFETCH}


def use(name):
    MMA.ENABLED = VARIANTS[name] is not None
    for k, v in {**PACKAGE, **(VARIANTS[name] or {})}.items():
        setattr(MMA, k, v)


torch.manual_seed(0)
experts, nf4, x, inputs = routed_layer_at_one_token()
shared = nf4_shared_experts(2)
ref = types.SimpleNamespace(gate_up_proj=dequantize_nf4(nf4.gate_up).float(), down_proj=dequantize_nf4(nf4.down).float(),
                            act_fn=torch.nn.SiLU(), num_experts=nf4.gate_up.shape[0])


def expected(i):
    s = shared[i % 2]
    sg, su = dequantize_nf4(s.gate_up)[0].float().chunk(2, dim=0)
    h = torch.nn.functional.silu(x.float() @ sg.T) * (x.float() @ su.T)
    out = moelab.model.experts_torch(x.float(), inputs[i][0].float(), inputs[i][1], ref)
    return out + torch.sigmoid(s.gate_logit.float()) * (h @ dequantize_nf4(s.down)[0].float().T)


exp = [expected(i) for i in range(8)]
res = {"card": B.card_name(), "versions": B.versions(), "variants": {k: repr(v) for k, v in VARIANTS.items()}, "rows": []}
print(res["card"], flush=True)
for rep in range(2):
    for name in VARIANTS:
        use(name)
        try:
            outs = [fused_experts_forward(x, *inputs[i], nf4, shared=shared[i % 2]).float() for i in range(8)]
            err = max(float((o - e).norm() / e.norm()) for o, e in zip(outs, exp))
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for j in range(50):
                    fused_experts_forward(x, *inputs[j % 8], nf4, shared=shared[j % 2])
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA and ("gemv" in e.key or "mma" in e.key):
                    kernels[e.key] = round(e.device_time_total / e.count, 2)
            us, _, _ = (B._time_graph(lambda i: fused_experts_forward(x, *inputs[i], nf4, shared=shared[i % 2]), 8), 0, 0)
            row = dict(rep=rep, variant=name, err=err, kernels_us=kernels, layer_graph_us=round(us, 2))
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize()
            row = dict(rep=rep, variant=name, error=repr(e)[:300])
        res["rows"].append(row)
        print(row, flush=True)
use("mma")
json.dump(res, open(os.path.join(OUT, "nf4_mma_kernels.json"), "w"), indent=1)
