"""Each NF4 decode GEMV kernel on its own, per config, at Qwen1.5-MoE's shapes: the routed experts
(60 experts, top-4, hidden 2048, intermediate 1408) and the shared expert run as one expert
(intermediate 5632, `nf4_shared_expert`), at 1 and 4 tokens. Each kernel is timed alone in a CUDA
graph (gate_up, then down on a fixed activation), weights rotating beyond L2 (routed: other experts
each call; shared: R copies). Every timed config's output is checked against the package's default.

benchmarks/results/sweep_nf4_gemv_2026-12-06_h100.json (H100) ran this script at commit 0cedce8 (the kernels
have since gained the shared expert's NF4 absmax pointers, passed here unused), whose
down kernel also had TOPK_TILE (the top-k experts as one more tile dimension, all their code words
of a K-step loaded together): its rows with TOPK_TILE true were all slower (best 8.5 us against
7.2 looped at one token), so the variant was removed and this script no longer sweeps it.

    python benchmarks/tuning/nf4_gemv_sweep.py          # on the GPU machine; writes $OUT/nf4_gemv_sweep.json
"""
import itertools
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
H, I, E, K, IS = 2048, 1408, 60, 4, 5632
R = 6
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
print(res["card"], f"copy {res['copy_gbs']:.0f} GB/s", flush=True)


def q(w):
    return quantize_nf4(w, backend="torch")


routed = dict(gate_up=[q(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02)],
              down=[q(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02)], top_k=K, inter=I, experts=E)
shared = dict(gate_up=[q(torch.randn(1, 2 * IS, H, device=dev, dtype=dt) * 0.02) for _ in range(R)],
              down=[q(torch.randn(1, H, IS, device=dev, dtype=dt) * 0.02) for _ in range(R)], top_k=1, inter=IS,
              experts=1)


def launch_gate_up(x, w, ids, act, inter, top_k, cfg):
    num_pairs = ids.numel()
    ptrs, strides, flags = EK._weight_args(w, w.shape[0])
    EK._gemv_gate_up_kernel[(num_pairs * triton.cdiv(inter, cfg["BLOCK_N"]),)](
        x, ptrs[0], ids, act, x, *ptrs[1:], *ptrs[1:5], inter, H, w.shape[0], top_k, num_pairs, 0, 1,
        x.stride(0), strides[0], strides[1], act.stride(0), x.stride(0), strides[3], strides[4],
        HAS_SHARED=False, **flags, **cfg)


def launch_down(act, w, ids, route_w, out, inter, top_k, cfg):
    num_tokens = ids.numel() // top_k
    ptrs, strides, flags = EK._weight_args(w, w.shape[0])
    EK._gemv_down_kernel[(num_tokens * triton.cdiv(H, cfg["BLOCK_N"]),)](
        act, ptrs[0], ids, route_w, out, out, out, *ptrs[1:], *ptrs[1:5], H, inter, w.shape[0], 0, ids.numel(), 1,
        act.stride(0), strides[0], strides[1], out.stride(0), out.stride(0), 1, strides[3], strides[4],
        TOP_K=top_k, HAS_SHARED=False, **flags, **cfg)


def sweep(name, spec, T, kernel, configs):
    top_k, inter = spec["top_k"], spec["inter"]
    x = torch.randn(T, H, device=dev, dtype=dt)
    if spec["experts"] > 1:
        ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int().reshape(-1) for _ in range(R)]
    else:
        ids = [torch.zeros(T, dtype=torch.int32, device=dev)] * R
    route_w = [torch.rand(T * top_k, device=dev, dtype=dt) for _ in range(R)]
    act = torch.randn(T * top_k, inter, device=dev, dtype=dt) * 0.1
    wsel = lambda part, i: spec[part][i % len(spec[part])]  # noqa: E731
    if kernel == "gate_up":
        outs = [torch.empty(T * top_k, inter, device=dev, dtype=dt) for _ in range(R)]
        run = lambda i, c: launch_gate_up(x, wsel("gate_up", i), ids[i], outs[i], inter, top_k, c)  # noqa: E731
        base_cfg = EK.gemv_config(T * top_k, inter, True, True, True)
        nbytes = T * top_k * 2 * inter * H // 2
    else:
        outs = [torch.empty(T, H, device=dev, dtype=dt) for _ in range(R)]
        run = lambda i, c: launch_down(act, wsel("down", i), ids[i], route_w[i], outs[i], inter, top_k, c)  # noqa: E731
        base_cfg = EK.gemv_config(T, H, False, True, True)
        nbytes = T * top_k * H * inter // 2
    ref = []
    for i in range(R):
        run(i, base_cfg)
        ref.append(outs[i].float().clone())
    rows = []
    for c in [base_cfg] + configs:
        try:
            us = bench._time_graph(lambda i, c=c: run(i, c), R)
            err = max(((outs[i].float() - ref[i]).norm() / ref[i].norm()).item() for i in range(R))
        except Exception as e:  # a config the compiler refuses (shared memory, registers)
            print(name, T, kernel, c, "FAILED", type(e).__name__, str(e)[:160], flush=True)
            continue
        row = dict(shape=name, T=T, kernel=kernel, us=us, tbs=nbytes / us / 1e6, err=err,
                   package=c is base_cfg, **c)
        rows.append(row)
        print(f"{name:6s} T={T} {kernel:7s} {us:7.2f} us {row['tbs']:.2f} TB/s err {err:.1e} "
              f"{'PACKAGE ' if c is base_cfg else ''}{c}", flush=True)
    best = min(rows, key=lambda r: r["us"])
    print(f"BEST {name} T={T} {kernel}: {best['us']:.2f} us (package {rows[0]['us']:.2f}) {best}", flush=True)
    res["rows"] += rows
    json.dump(res, open(f"{OUT}/nf4_gemv_sweep.json", "w"), indent=1)


gate_up_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
                for bn, bk, nw, pl in itertools.product((4, 8, 16), (256, 512), (2, 4), (1, 3))]
down_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
             for bn, bk, nw, pl in itertools.product((4, 8), (256, 512), (4, 8), (1, 3))]
shared_down_cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
                    for bn, bk, nw, pl in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3))]
with torch.no_grad():
    for T in (1, 4):
        sweep("routed", routed, T, "gate_up", gate_up_cfgs)
        sweep("routed", routed, T, "down", down_cfgs)
        sweep("shared", shared, T, "gate_up", gate_up_cfgs)
        sweep("shared", shared, T, "down", shared_down_cfgs)
