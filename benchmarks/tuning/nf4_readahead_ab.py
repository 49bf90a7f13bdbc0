"""A/B of the NF4 decode GEMVs on one machine: c63dc4d's kernels ("head"), and the read-ahead
variant's kernels with the stream off ("plain": each word's absmax read in the words' layout)
and on ("stream": the next K-step's codes, absmax and x issued before this one is multiplied,
two K-steps per loop trip), each kernel alone in a CUDA graph at Qwen1.5-MoE's routed shapes
(60 experts, top-4, H 2048, I 1408), weights rotating beyond L2, at 1 and 4 tokens.

Ran on an H100 at commit ec14122 (moelab/kernels/experts.py with NF4_STREAM; removed since),
with c63dc4d's experts.py copied beside it as moelab/kernels/experts_head.py:

    git show c63dc4d:moelab/kernels/experts.py > moelab/kernels/experts_head.py
    python benchmarks/tuning/nf4_readahead_ab.py      # writes $OUT/nf4_readahead_ab.json

Result (benchmarks/results/sweep_nf4_readahead_2026-12-06_h100.json): head fastest in every
config at the package's (gate_up 11.3 us, down 7.9 at one token; plain 14.4 / 10.4, stream
14.7 / 12.2), so the variant was removed. Why, from the sm_90 SASS: ptxas moves the next
K-step's loads below this step's arithmetic (the PTX has them above), so the read-ahead covers
at most every other step, and the registers it holds (125 against 56 for gate_up) cost more
than it hides; the per-word absmax reads (8x more load instructions) slowed the plain path.
"""
import json
import os

import torch
import triton

from moelab import bench
from moelab.kernels import experts as NEW
from moelab.kernels import experts_head as OLD
from moelab.quant import quantize_nf4

OUT = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K = 2048, 1408, 60, 4
R = 6
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
print(res["card"], flush=True)
gu_w = quantize_nf4(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02, backend="torch")
dn_w = quantize_nf4(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02, backend="torch")


def launch_gate_up(mod, x, w, ids, act, cfg):
    num_pairs = ids.numel()
    ptrs, strides, flags = mod._weight_args(w, w.shape[0])
    mod._gemv_gate_up_kernel[(num_pairs * triton.cdiv(I, cfg["BLOCK_N"]),)](
        x, ptrs[0], ids, act, x, *ptrs[1:], *ptrs[1:5], I, H, w.shape[0], K, num_pairs, 0, 1,
        x.stride(0), strides[0], strides[1], act.stride(0), x.stride(0), strides[3], strides[4],
        HAS_SHARED=False, **flags, **cfg)


def launch_down(mod, act, w, ids, route_w, out, cfg):
    num_tokens = ids.numel() // K
    ptrs, strides, flags = mod._weight_args(w, w.shape[0])
    mod._gemv_down_kernel[(num_tokens * triton.cdiv(H, cfg["BLOCK_N"]),)](
        act, ptrs[0], ids, route_w, out, out, out, *ptrs[1:], *ptrs[1:5], H, I, w.shape[0], 0, ids.numel(), 1,
        act.stride(0), strides[0], strides[1], out.stride(0), out.stride(0), 1, strides[3], strides[4],
        TOP_K=K, HAS_SHARED=False, **flags, **cfg)


def run_all(T):
    x = torch.randn(T, H, device=dev, dtype=dt)
    ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int().reshape(-1) for _ in range(R)]
    route_w = [torch.rand(T * K, device=dev, dtype=dt) for _ in range(R)]
    act = torch.randn(T * K, I, device=dev, dtype=dt) * 0.1
    acts = [torch.empty(T * K, I, device=dev, dtype=dt) for _ in range(R)]
    outs = [torch.empty(T, H, device=dev, dtype=dt) for _ in range(R)]
    variants = [("head", OLD, {}), ("plain", NEW, {"NF4_STREAM": False}), ("stream", NEW, {"NF4_STREAM": True})]
    gu_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1) for bn, bk, nw in
               [(8, 512, 4), (8, 512, 2), (4, 512, 2), (8, 256, 2), (8, 256, 4), (16, 512, 4), (4, 256, 2)]]
    dn_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=1) for bn, bk, nw in
               [(8, 512, 8), (8, 512, 4), (8, 1024, 4), (8, 1024, 8), (4, 512, 4), (8, 256, 4)]]
    for kernel, cfgs in (("gate_up", gu_cfgs), ("down", dn_cfgs)):
        ref = None
        for c in cfgs:
            for name, mod, extra in variants:
                cfg = {**c, **extra}
                if kernel == "gate_up":
                    fn, o = (lambda i: launch_gate_up(mod, x, gu_w, ids[i], acts[i], cfg)), acts
                else:
                    fn, o = (lambda i: launch_down(mod, act, dn_w, ids[i], route_w[i], outs[i], cfg)), outs
                us = bench._time_graph(fn, R)
                got = o[0].float().clone()
                ref = got if ref is None else ref
                err = ((got - ref).norm() / ref.norm()).item()
                res["rows"].append(dict(T=T, kernel=kernel, variant=name, us=us, err=err, **c))
                print(f"T={T} {kernel:7s} {name:6s} {us:7.2f} us err {err:.1e} {c}", flush=True)
    json.dump(res, open(f"{OUT}/nf4_readahead_ab.json", "w"), indent=1)


with torch.no_grad():
    run_all(1)
    run_all(4)
