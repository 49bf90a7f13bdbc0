"""The NF4 decode GEMVs two ways on one machine: the Triton word path of `moelab.kernels.experts`
(package configs) against `moelab.kernels.nf4_stream` (codes copied ahead through shared memory
with cp.async) over its configs, each kernel alone in a CUDA graph at Qwen1.5-MoE's routed
shapes (60 experts, top-4, hidden 2048, intermediate 1408), weights rotating beyond L2 (other
experts each call). Every stream output is checked against the Triton kernel's on the same input.

    python benchmarks/tuning/nf4_stream_ab.py        # on the GPU machine; writes $OUT/nf4_stream_ab.json
"""
import json
import os

import torch
import triton

from moelab import bench
from moelab.kernels import experts as EK
from moelab.kernels import nf4_stream as NS
from moelab.quant import quantize_nf4

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K = 2048, 1408, 60, 4
R = 8
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)
gu_w = quantize_nf4(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02, backend="torch")
dn_w = quantize_nf4(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02, backend="torch")


def triton_gate_up(x, ids, act):
    cfg = EK.gemv_config(ids.numel(), I, True, True, True)
    ptrs, strides, flags = EK._weight_args(gu_w, E)
    EK._gemv_gate_up_kernel[(ids.numel() * triton.cdiv(I, cfg["BLOCK_N"]),)](
        x, ptrs[0], ids, act, x, *ptrs[1:], *ptrs[1:5], I, H, E, K, ids.numel(), 0, 1,
        x.stride(0), strides[0], strides[1], act.stride(0), x.stride(0), strides[3], strides[4],
        HAS_SHARED=False, **flags, **cfg)


def triton_down(act, ids, route_w, out):
    num_tokens = ids.numel() // K
    cfg = EK.gemv_config(num_tokens, H, False, True, True, k_dim=I)
    ptrs, strides, flags = EK._weight_args(dn_w, E)
    EK._gemv_down_kernel[(num_tokens * triton.cdiv(H, cfg["BLOCK_N"]),)](
        act, ptrs[0], ids, route_w, out, out, out, *ptrs[1:], *ptrs[1:5], H, I, E, 0, ids.numel(), 1,
        act.stride(0), strides[0], strides[1], out.stride(0), out.stride(0), 1, strides[3], strides[4],
        TOP_K=K, HAS_SHARED=False, **flags, **cfg)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(T):
    x = torch.randn(T, H, device=dev, dtype=dt)
    ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int() for _ in range(R)]
    route_w = [torch.rand(T * K, device=dev, dtype=torch.float32) for _ in range(R)]
    act_in = torch.randn(T * K, I, device=dev, dtype=dt) * 0.1
    acts = [torch.empty(T * K, I, device=dev, dtype=dt) for _ in range(R)]
    outs = [torch.empty(T, H, device=dev, dtype=dt) for _ in range(R)]
    ref_act, ref_out = torch.empty_like(acts[0]), torch.empty_like(outs[0])
    triton_gate_up(x, ids[0].reshape(-1), ref_act)
    triton_down(act_in, ids[0].reshape(-1), route_w[0], ref_out)
    systems = [("triton", "gate_up", {}, lambda i, c: triton_gate_up(x, ids[i].reshape(-1), acts[i])),
               ("triton", "down", {}, lambda i, c: triton_down(act_in, ids[i].reshape(-1), route_w[i], outs[i]))]
    for bn in (4, 8, 16):
        for bk in (256, 512):
            for st in (2, 4, 8):
                c = dict(BLOCK_N=bn, BLOCK_K=bk, STAGES=st)
                systems.append(("stream", "gate_up", c, lambda i, c: NS.gate_up(x, gu_w, ids[i].reshape(-1), acts[i], c)))
                systems.append(("stream", "down", c, lambda i, c: NS.down(act_in, dn_w, ids[i], route_w[i], outs[i], c)))
    for name, kernel, cfg, fn in systems:
        try:
            us = bench._time_graph(lambda i: fn(i, cfg), R)
        except Exception as e:  # a config that does not fit (shared memory) is skipped
            print(T, name, kernel, cfg, "FAILED", str(e)[:300], flush=True)
            continue
        fn(0, cfg)
        got, ref = (acts[0], ref_act) if kernel == "gate_up" else (outs[0], ref_out)
        err = rel(got, ref)
        nbytes = (2 * I if kernel == "gate_up" else H) * (H if kernel == "gate_up" else I) // 2 * T * K
        row = dict(T=T, system=name, kernel=kernel, us=us, err=err, tbs=nbytes / us / 1e6, **cfg)
        res["rows"].append(row)
        print(f"T={T} {name:6s} {kernel:7s} {us:7.2f} us err {err:.1e} {cfg}", flush=True)


with torch.no_grad():
    for T in (1, 4):
        run(T)
json.dump(res, open(f"{OUT}/nf4_stream_ab.json", "w"), indent=1)
