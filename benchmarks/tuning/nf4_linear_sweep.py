"""The batch-1 decode step's two NF4 linears per layer (q/k/v as one [6144, 2048] GEMV with its bias,
o_proj [2048, 2048]) under other launch configs of `moelab.kernels.gemv`, against the package's.

Why: in the H100 decode profile the linears are about a fifth of the NF4 step
(benchmarks/results/decode_nf4_2026-12-06_h100_run4.json: 72 calls, 348 us a step, the router's 61
bf16 rows included), and they kept the configs of 2026-12-06's third session (8 rows on 4 warps, the
`prmt` look-up: the shared-memory table made them slower at that shape), while the experts' NF4 GEMVs
have since gone to 16-row programs on 8 warps (gate_up) and to one 16-row program per SM on 32 warps
over whole rows (down), both with the table. This times those shapes on the linears.

Each variant runs 24 layers' worth of distinct weights (as one step reads them: 201 MB of codes, no
L2 reuse) in one CUDA graph, q/k/v and o_proj timed apart, alternating variants, three rounds; the
outputs are checked against the package's config. Writes $OUT/nf4_linear_sweep_<TAG>.json.

    TAG=run python benchmarks/tuning/nf4_linear_sweep.py
"""
import json
import os

import torch

import moelab.bench as B
from moelab.kernels.gemv import linear_gemv
from moelab.quant import quantize_nf4
from tuning_common import keep_variants, timed_row

OUT, TAG = os.environ.get("OUT", "/tmp"), os.environ.get("TAG", "run")
LAYERS, O_COPIES, H = 24, 72, 2048  # o_proj: 72 copies (151 MB), so that none stays in the 50 MB L2
QKV = {"package": None,
       "table": {"NF4_SMEM": 4},
       "n16w8": {"BLOCK_N": 16, "num_warps": 8},
       "n16w8t": {"BLOCK_N": 16, "num_warps": 8, "NF4_SMEM": 8, "maxnreg": 64},
       "n16w8t48": {"BLOCK_N": 16, "num_warps": 8, "NF4_SMEM": 8, "maxnreg": 48},
       "n8w8k1024": {"BLOCK_N": 8, "num_warps": 8, "BLOCK_K": 1024},
       "n4w4": {"BLOCK_N": 4, "num_warps": 4},
       "n16w16k2048t": {"BLOCK_N": 16, "num_warps": 16, "BLOCK_K": 2048, "NF4_SMEM": 16}}
O = {"package": None,
     "table": {"NF4_SMEM": 4},
     "n16w8t": {"BLOCK_N": 16, "num_warps": 8, "NF4_SMEM": 8, "maxnreg": 64},
     "n16w32k2048t": {"BLOCK_N": 16, "num_warps": 32, "BLOCK_K": 2048, "NF4_SMEM": 32},
     "n16w32k2048": {"BLOCK_N": 16, "num_warps": 32, "BLOCK_K": 2048},
     "n8w16k2048t": {"BLOCK_N": 8, "num_warps": 16, "BLOCK_K": 2048, "NF4_SMEM": 16},
     "n4w4": {"BLOCK_N": 4, "num_warps": 4},
     "n8w8k1024": {"BLOCK_N": 8, "num_warps": 8, "BLOCK_K": 1024}}
keep_variants({"QKV": QKV, "O": O}, "package")

torch.manual_seed(0)
q = lambda rows: quantize_nf4(torch.randn(1, rows, H, device="cuda", dtype=torch.bfloat16) * 0.02,  # noqa: E731
                              backend="torch")
qkv_w = [q(3 * H) for _ in range(LAYERS)]
qkv_b = [torch.randn(3 * H, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
o_w = [q(H) for _ in range(O_COPIES)]
x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
res = {"card": B.card_name(), "versions": B.versions(), "qkv": QKV, "o": O, "rows": []}
print(res["card"], flush=True)


def run(kind, cfg):
    """One call of one linear on each of its weight copies: their outputs."""
    if kind == "qkv":
        return [linear_gemv(x, qkv_w[i], qkv_b[i], config=cfg) for i in range(LAYERS)]
    return [linear_gemv(x, o_w[i], None, config=cfg) for i in range(O_COPIES)]


def stacked(kind, cfg):
    return torch.stack(run(kind, cfg)).float()


refs = {kind: stacked(kind, None) for kind in ("qkv", "o")}
for rep in range(3):
    for kind, table in (("qkv", QKV), ("o", O)):
        for name, cfg in table.items():
            def measure(kind=kind, cfg=cfg):
                out = stacked(kind, cfg)
                us = B._time_graph(lambda i: run(kind, cfg), 1) / len(out)
                return round(us, 3), ((out - refs[kind]).norm() / refs[kind].norm()).item()

            row = timed_row(measure, rep=rep, kind=kind, variant=name)
            res["rows"].append(row)
            print(row, flush=True)
    json.dump(res, open(os.path.join(OUT, f"nf4_linear_sweep_{TAG}.json"), "w"), indent=1)
