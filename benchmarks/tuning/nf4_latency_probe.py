"""What limits the NF4 decode kernels at one token? An H200 probe of one Qwen1.5-MoE layer's routed
experts (60 x [2816, 2048] gate_up, 60 x [2048, 1408] down, top-4) through moelab's GEMV kernels.

The 2026-11-29 sweep found the code-book look-up is not it (a free fake look-up ran no faster).
Hypothesis tested here: the double-quantised absmax, a dependent load chain per K-step (the 8-bit
absmax code, then its 256-entry code book, then the block scale) that software pipelining does not
hide. Timed side by side in one run, CUDA-graph timing over 6 rotating layers (beyond L2):
bf16; NF4 with double quantisation (the package's format); NF4 with float32 absmax (no chain);
each at the package's configs and over a small config grid per kernel.

Run on the GPU machine: python benchmarks/tuning/nf4_latency_probe.py (writes $OUT/nf4_latency_probe.json);
committed as benchmarks/results/probe_nf4_latency_2026-12-06_h100.json (H100: double quantisation or
float32 absmax made no difference: 31.4 / 30.9 us at one token, bf16 28.9 us). With `--words` it
sweeps the package's NF4 word kernels (bf16 look-up and products, `NF4_DOT_ASM`) instead, double
quantisation only, writing $OUT/nf4_words_sweep.json.
"""
import sys
import itertools
import json
import os

import torch

import moelab.kernels.experts as EX
from moelab import bench
from moelab.kernels.experts import fused_experts_forward
from moelab.quant import NF4Experts, quantize_nf4

out_dir = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K = 2048, 1408, 60, 4
R = 6  # rotating layers: 6 x 18 MB of NF4 touched per call set, beyond the 50 MB L2
TOKENS = (1, 4, 16)


def layer(double_quant: bool):
    gu = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    dn = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    q = NF4Experts(quantize_nf4(gu, double_quant), quantize_nf4(dn, double_quant), torch.nn.SiLU())
    return q, type("L", (), dict(gate_up_proj=gu, down_proj=dn, act_fn=torch.nn.SiLU()))()


WORDS = "--words" in sys.argv
layers = {"nf4_dq": [], "bf16": []} if WORDS else {"nf4_dq": [], "nf4_f32": [], "bf16": []}
for i in range(R):
    q, dense = layer(True)
    layers["nf4_dq"].append(q)
    layers["bf16"].append(dense)
    if not WORDS:
        layers["nf4_f32"].append(layer(False)[0])
    torch.cuda.empty_cache()

res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs(), "rows": []}
print(res, flush=True)
orig = EX.gemv_config


def timed(kind, T, gate_cfg=None, down_cfg=None):
    def cfg(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
        c = orig(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
        return {**c, **((gate_cfg if gated else down_cfg) or {})}
    x = torch.randn(T, H, device=dev, dtype=dt)
    ids = [torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).int() for _ in range(R)]
    w = torch.rand(T, K, device=dev)
    EX.gemv_config = cfg
    try:
        return bench._time_graph(lambda i: fused_experts_forward(x, w, ids[i], layers[kind][i]), R)
    except Exception as err:  # noqa: BLE001  (a config that does not compile is recorded, not fatal)
        return repr(err)[:200]
    finally:
        EX.gemv_config = orig


def record(**row):
    res["rows"].append(row)
    print(row, flush=True)
    name = "nf4_words_sweep.json" if WORDS else "nf4_latency_probe.json"
    json.dump(res, open(os.path.join(out_dir, name), "w"), indent=1)  # each row: a cut-short run keeps its rows


for T in TOKENS:
    for kind in layers:
        record(kind=kind, T=T, what="package", us=timed(kind, T))
grid = itertools.product((8, 16, 32), (256, 512), (2, 4), (1, 3)) if WORDS else \
    itertools.product((8, 16), (256, 1024), (2, 4), (1, 3))
grid = list(grid)
for kind in ("nf4_dq",) if WORDS else ("nf4_dq", "nf4_f32"):
    for what in ("gate_up", "down"):
        for bn, bk, nw, pl in grid:
            c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
            us = timed(kind, 1, c, None) if what == "gate_up" else timed(kind, 1, None, c)
            record(kind=kind, T=1, what=what, **c, us=us)
