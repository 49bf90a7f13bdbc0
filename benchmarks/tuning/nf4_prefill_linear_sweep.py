"""A prefill's dense NF4 linears: bitsandbytes' Linear4bit (dequantize W into a bf16 copy, then
cuBLAS) against `moelab.kernels.nf4_gemm.linear_nf4_gemm` under launch-config variants, with
bf16 F.linear on the same weights as the bandwidth reference, at prompt lengths 16-256.

Why: served one request at a time, NF4 spends ~12 ms a request outside decode against bf16's
~6.4 ms (benchmarks/results/serve_c1_2026-12-06_h100_run10.json), and a prefill's NF4 q/k/v,
o_proj and shared expert ran through bitsandbytes, 4.5 bytes of HBM traffic a weight (0.5
read, 2 written, 2 read again) against bf16's 2.

Shapes (Qwen1.5-MoE, bias where the model has one): q/k/v/o [2048, 2048], the shared expert's
gate/up [5632, 2048] and down [2048, 5632], the joint q/k/v [6144, 2048]. Each shape has enough
weight copies (>= 96 MB of codes) that nothing stays in the 50 MB L2; one CUDA graph per
variant, a round of every variant per (shape, tokens). Outputs are checked against F.linear on
the dequantized weight (err: relative). Writes $OUT/nf4_prefill_linear_sweep.json.

    python benchmarks/tuning/nf4_prefill_linear_sweep.py      # TOKENS=16,64 GEMM=package,k64
"""
import json
import os

import torch
import torch.nn.functional as F

import moelab.bench as B
from moelab.kernels.nf4_gemm import linear_nf4_gemm
from moelab.quant import dequantize_nf4, linear4bit_nf4, linear_to_nf4
from tuning_common import keep_variants

OUT = os.environ.get("OUT", "/tmp")
TOKENS = [int(t) for t in os.environ.get("TOKENS", "16,32,64,128,256").split(",")]
SHAPES = {"qkvo": (2048, 2048, True), "shared_gate_up": (5632, 2048, False), "shared_down": (2048, 5632, False),
          "joint_qkv": (6144, 2048, True)}
GEMM = {"package": None, "k64": {"BLOCK_K": 64}, "k256": {"BLOCK_K": 256}, "n16": {"BLOCK_N": 16},
        "n32": {"BLOCK_N": 32}, "n64": {"BLOCK_N": 64}, "w8": {"num_warps": 8}, "w2": {"num_warps": 2},
        "s2": {"NUM_STAGES": 2}, "s4": {"NUM_STAGES": 4}, "m16": {"BLOCK_M": 16}, "m32": {"BLOCK_M": 32}}
keep_variants({"GEMM": GEMM}, "package")

res = {"card": B.card_name(), "versions": B.versions(), "gemm": GEMM, "rows": []}
print(res["card"], flush=True)
torch.manual_seed(0)
for shape, (rows, cols, has_bias) in SHAPES.items():
    copies = max(4, -(-96 * 2**20 // (rows * cols // 2)))
    linears = []
    for _ in range(copies):
        lin = torch.nn.Linear(cols, rows, bias=has_bias, device="cuda", dtype=torch.bfloat16)
        linears.append(linear_to_nf4(lin, torch.bfloat16))
    views = [linear4bit_nf4(q) for q in linears]
    dense = [dequantize_nf4(v)[0] for v in views[:4]]  # bf16 reference weights (4: L2-warm, a floor)
    dense_all = None
    for tokens in TOKENS:
        x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
        exact = F.linear(x.double(), dense[0].double(), None if not has_bias else linears[0].bias.double())
        systems = {"bnb": lambda i: linears[i](x)}
        if dense_all is None:
            dense_all = [dequantize_nf4(v)[0] for v in views]
        systems["bf16"] = lambda i: F.linear(x, dense_all[i], linears[i].bias)
        for name, cfg in GEMM.items():
            systems[name] = lambda i, cfg=cfg: linear_nf4_gemm(x, views[i], linears[i].bias, config=cfg)
        for name, fn in systems.items():
            try:
                with torch.no_grad():
                    out = fn(0)
                    err = float((out.double() - exact).norm() / exact.norm())
                    us = B._time_graph(fn, copies)
                row = dict(shape=shape, tokens=tokens, system=name, us=round(us, 2), err=err)
            except Exception as e:  # noqa: BLE001  (a config the compiler or the launcher refuses)
                torch.cuda.synchronize()
                row = dict(shape=shape, tokens=tokens, system=name, us=None, err=None, error=repr(e)[:200])
            res["rows"].append(row)
            print(row, flush=True)
        json.dump(res, open(os.path.join(OUT, "nf4_prefill_linear_sweep.json"), "w"), indent=1)  # so far
