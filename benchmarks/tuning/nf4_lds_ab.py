"""NF4 decode GEMVs with the levels from a shared-memory pair table and the products on the tensor cores
(`moelab.kernels.nf4_lds`, codes repacked
into mma fragments) against the package's word path, on one machine, at Qwen1.5-MoE's routed
shapes (60 experts, top-4, hidden 2048, intermediate 1408). Each kernel alone and the whole layer
(gate_up then down) in a CUDA graph, weights rotating beyond L2 (other experts each call); outputs
checked against dequantize-then-matmul in float32.

    python benchmarks/tuning/nf4_lds_ab.py       # on the GPU machine; writes $OUT/nf4_lds_ab.json
"""
import json
import os
import types

import torch
import triton

import moelab.model
from moelab import bench
from moelab.kernels import experts as EK
from moelab.kernels import nf4_lds as NM
from moelab.kernels import pdl
from moelab.quant import dequantize_nf4, quantize_nf4

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K = 2048, 1408, 60, 4
R = 8
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
gu_w = quantize_nf4(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02, backend="torch")
dn_w = quantize_nf4(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02, backend="torch")
gu_p, dn_p = NM.repack(gu_w), NM.repack(dn_w)
layer = types.SimpleNamespace(gate_up_proj=gu_w, down_proj=dn_w, act_fn=torch.nn.SiLU())
ref_layer = types.SimpleNamespace(gate_up_proj=dequantize_nf4(gu_w).float(), down_proj=dequantize_nf4(dn_w).float(),
                                  act_fn=torch.nn.SiLU(), num_experts=E)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def mma_layer(x, ids, route_w, act, out, gu_cfg, dn_cfg):
    NM.gate_up(x, gu_p, ids.reshape(-1), act, I, E, *gu_cfg)
    return NM.down(act, dn_p, ids, route_w, out, E, *dn_cfg)


def run(T):
    xs = [torch.randn(T, H, device=dev, dtype=dt) for _ in range(R)]
    ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int() for _ in range(R)]
    route_w = [torch.rand(T, K, device=dev, dtype=torch.float32) for _ in range(R)]
    acts = [torch.empty(T * K, I, device=dev, dtype=dt) for _ in range(R)]
    outs = [torch.empty(T, H, device=dev, dtype=dt) for _ in range(R)]
    expected = moelab.model.experts_torch(xs[0].float(), route_w[0].to(dt).float(), ids[0], ref_layer)
    got = EK.fused_experts_forward(xs[0], route_w[0], ids[0], layer)
    print(f"T={T} package layer err {rel(got, expected):.1e}", flush=True)
    systems = []
    for flag in (True, False):
        systems.append((f"package_pdl{int(flag)}", flag, None, None,
                        lambda i: EK.fused_experts_forward(xs[i], route_w[i], ids[i], layer)))
    for gu_cfg in ((8, 8), (8, 4), (16, 8), (16, 4), (4, 4), (4, 2)):
        for dn_cfg in ((16, 16), (32, 16), (8, 8), (16, 8), (4, 4)):
            if gu_cfg != (8, 8) and dn_cfg != (16, 16):
                continue  # the default of one kernel against the other's variants
            systems.append(("mma", None, gu_cfg, dn_cfg,
                            lambda i, g=gu_cfg, d=dn_cfg: mma_layer(xs[i], ids[i], route_w[i], acts[i], outs[i], g, d)))
    for name, flag, gu_cfg, dn_cfg, fn in systems:
        if flag is not None:
            pdl.ENABLED = flag
        try:
            got = fn(0)
            err = rel(got, expected)
            us = bench._time_graph(fn, R)
        except Exception as e:
            print(T, name, gu_cfg, dn_cfg, "FAILED", str(e)[:400], flush=True)
            continue
        row = dict(T=T, system=name, us=us, err=err, gate_up_cfg=gu_cfg, down_cfg=dn_cfg)
        if name == "mma":  # each kernel alone too
            row["gate_up_us"] = bench._time_graph(lambda i: NM.gate_up(xs[i], gu_p, ids[i].reshape(-1), acts[i], I, E,
                                                                        *gu_cfg), R)
            row["down_us"] = bench._time_graph(lambda i: NM.down(acts[i], dn_p, ids[i], route_w[i], outs[i], E, *dn_cfg), R)
        res["rows"].append(row)
        print(f"T={T} {name:13s} {us:7.2f} us err {err:.1e} gate_up {gu_cfg} {row.get('gate_up_us', 0):6.2f} us, "
              f"down {dn_cfg} {row.get('down_us', 0):6.2f} us", flush=True)
    pdl.ENABLED = True


with torch.no_grad():
    for T in (1, 4):
        run(T)
json.dump(res, open(f"{OUT}/nf4_lds_ab.json", "w"), indent=1)
