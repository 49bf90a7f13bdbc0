"""Two probes of the NF4 decode GEMVs on one machine, each kernel alone in a CUDA graph at
Qwen1.5-MoE's routed shapes (60 experts, top-4, H 2048, I 1408), weights rotating beyond L2:

- PREFETCH_LINES: one `prefetch.global.L2` per 128-byte line of the program's code tiles at its
  start ("l2_prefetch": the tile's lines; "plain": none);
- ROTATE_K: each program starts its K loop at step pid % steps, so that programs do not all
  load, then all compute, in step ("rotate_k").

Runs only at the commit that holds both flags (moelab/kernels/experts.py; removed the commit
after). Results: benchmarks/results/sweep_nf4_readahead_2026-12-06_h100.json, l2_prefetch_rows
(variants off / on) and rotate_k_rows (plain / rotate), each measured in a call of its own.

    python benchmarks/tuning/nf4_prefetch_rotate_ab.py     # on the GPU machine; writes $OUT/nf4_prefetch_rotate_ab.json
"""
import json
import os

import torch
import triton

from moelab import bench
from moelab.kernels import experts as EK
from moelab.quant import quantize_nf4

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K = 2048, 1408, 60, 4
R = 6
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
gu_w = quantize_nf4(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02, backend="torch")
dn_w = quantize_nf4(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02, backend="torch")


def launch_gate_up(x, ids, act, cfg):
    ptrs, strides, flags = EK._weight_args(gu_w, E)
    EK._gemv_gate_up_kernel[(ids.numel() * triton.cdiv(I, cfg["BLOCK_N"]),)](
        x, ptrs[0], ids, act, x, *ptrs[1:], *ptrs[1:5], I, H, E, K, ids.numel(), 0, 1,
        x.stride(0), strides[0], strides[1], act.stride(0), x.stride(0), strides[3], strides[4],
        HAS_SHARED=False, **flags, **cfg)


def launch_down(act, ids, route_w, out, cfg):
    ptrs, strides, flags = EK._weight_args(dn_w, E)
    EK._gemv_down_kernel[(ids.numel() // K * triton.cdiv(H, cfg["BLOCK_N"]),)](
        act, ptrs[0], ids, route_w, out, out, out, *ptrs[1:], *ptrs[1:5], H, I, E, 0, ids.numel(), 1,
        act.stride(0), strides[0], strides[1], out.stride(0), out.stride(0), 1, strides[3], strides[4],
        TOP_K=K, HAS_SHARED=False, **flags, **cfg)


def run_all(T):
    x = torch.randn(T, H, device=dev, dtype=dt)
    ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int().reshape(-1) for _ in range(R)]
    route_w = [torch.rand(T * K, device=dev, dtype=dt) for _ in range(R)]
    act = torch.randn(T * K, I, device=dev, dtype=dt) * 0.1
    acts = [torch.empty(T * K, I, device=dev, dtype=dt) for _ in range(R)]
    outs = [torch.empty(T, H, device=dev, dtype=dt) for _ in range(R)]
    gu_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1) for bn, bk, nw in
               [(8, 512, 4), (8, 512, 2), (4, 512, 2), (16, 512, 4), (8, 256, 2), (8, 256, 4), (8, 1024, 4),
                (16, 1024, 8)]]
    dn_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1) for bn, bk, nw in
               [(8, 512, 8), (8, 512, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4), (8, 1024, 8), (16, 1024, 8)]]
    for kernel, cfgs, row_bytes in (("gate_up", gu_cfgs, H // 2), ("down", dn_cfgs, I // 2)):
        ref = None
        for c in cfgs:
            tile_lines = triton.next_power_of_2(triton.cdiv(c["BLOCK_N"] * row_bytes, 128))
            for name, extra in (("plain", {}), ("l2_prefetch", {"PREFETCH_LINES": tile_lines}),
                                ("rotate_k", {"ROTATE_K": True})):
                cfg = {**c, **extra}
                if kernel == "gate_up":
                    fn, o = (lambda i: launch_gate_up(x, ids[i], acts[i], cfg)), acts
                else:
                    fn, o = (lambda i: launch_down(act, ids[i], route_w[i], outs[i], cfg)), outs
                us = bench._time_graph(fn, R)
                got = o[0].float().clone()
                ref = got if ref is None else ref
                err = ((got - ref).norm() / ref.norm()).item()
                res["rows"].append(dict(T=T, kernel=kernel, variant=name, us=us, err=err, **c))
                print(f"T={T} {kernel:7s} {name:11s} {us:7.2f} us err {err:.1e} {c}", flush=True)
    json.dump(res, open(f"{OUT}/nf4_prefetch_rotate_ab.json", "w"), indent=1)


with torch.no_grad():
    run_all(1)
    run_all(4)
