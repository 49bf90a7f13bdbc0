"""A prefill's dense NF4 linears: bitsandbytes' Linear4bit (dequantize W into a bf16 copy, then
cuBLAS) against an NF4 GEMM that dequantizes in registers (`linear_nf4_gemm` below) under
launch-config variants, with bf16 F.linear on the same weights as the bandwidth reference.

Why: served one request at a time, NF4 spends ~12 ms a request outside decode against bf16's
~6.4 ms (benchmarks/results/serve_c1_2026-12-06_h100_run10.json), and a prefill's NF4 q/k/v,
o_proj and shared expert run through bitsandbytes: 4.5 bytes of HBM traffic a weight (0.5
read, 2 written, 2 read again) against bf16's 2 and the codes' 0.5.

The kernel is the grouped NF4 GEMM's K-loop (`moelab.kernels.experts._nf4_block_dot`: one
64-value block a step, codes turned into bf16 levels in registers for `tl.dot`, the product
scaled by each row's block absmax) for one matrix. It was in the package for one commit
(4585b9d) and measured on an H100 (2026-12-06, tenth session,
benchmarks/results/nf4_prefill_linear_sweep_2026-12-06_h100.json): 2-10x SLOWER than
bitsandbytes (q/k/v/o at 16 tokens 33-36 us against 16.9, bf16 6.8), so it left the package;
it stays here, runnable, for the next attempt (notebook 05, section 11). What the numbers
suggest: each 64-value step waits on its own codes and then on its absmax (a dependent gather
through the double-quant code book), 32 such steps a 2,048-value row, with too few programs to
hide them; and the time grows with the tokens (36 / 98 / 357 us at 16 / 64 / 256), where 64-row
tiles compile to sm_90 `wgmma`, whose operands pass through shared memory with barriers every
step (scratch compile: 7-8 bar.sync a 128-value step). Loading the absmax of several blocks at
once, longer K-steps with x read once a step, or split-K are the leads.

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
import triton
import triton.language as tl

import moelab.bench as B
from moelab.kernels.experts import _nf4_block_dot, _nf4_lut, _weight_args
from moelab.quant import dequantize_nf4, linear4bit_nf4, linear_to_nf4
from tuning_common import keep_variants, timed_row


@triton.jit
def _nf4_gemm_kernel(x_ptr, codes_ptr, bias_ptr, out_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                     absmax_offset_ptr, nf4_code_ptr, num_tokens, n_out, k_dim, stride_xm, stride_om,
                     HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NF4_ASM: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[m, n] for one [BLOCK_M tokens, BLOCK_N rows] tile; the M-tiles of one N-tile are
    neighbouring programs, so the codes one of them reads are in L2 for the others."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(num_tokens, BLOCK_M)
    m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (pid // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < num_tokens, n < n_out
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lut = _nf4_lut(nf4_code_ptr, NF4_ASM)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=NUM_STAGES):
        for b in tl.static_range(BLOCK_K // 64):  # one 64-value block (one absmax a row) at a time
            kb = k0 + 64 * b
            cols = kb + 2 * tl.arange(0, 32)
            x_mask = m_ok[:, None] & (cols < k_dim)[None, :]
            x_even = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + (cols + 1)[None, :], mask=x_mask, other=0.0)
            acc = _nf4_block_dot(acc, x_even, x_odd, codes_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                                 absmax_offset_ptr, nf4_code_ptr, lut, 0, n, n_ok, kb, k_dim, 0, 0, DOUBLE_QUANT,
                                 NF4_ASM, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def nf4_gemm_config(num_tokens: int, n_out: int, on_gpu: bool, num_sms: int = 132) -> dict:
    """One M-tile for up to 64 tokens (16 at least: the smallest tl.dot), 64 above; the widest
    N-tile (16 to 64 rows) that still gives every SM two programs, so enough code bytes are in
    flight; 128-value K-steps, 4 warps. Under the interpreter: few large programs."""
    block_m = min(64, max(16, triton.next_power_of_2(num_tokens)))
    if not on_gpu:
        return dict(BLOCK_M=block_m, BLOCK_N=min(128, triton.next_power_of_2(n_out)), BLOCK_K=64, num_warps=4,
                    NUM_STAGES=1)
    m_tiles = triton.cdiv(num_tokens, block_m)
    block_n = next((bn for bn in (64, 32) if m_tiles * triton.cdiv(n_out, bn) >= 2 * num_sms), 16)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, NUM_STAGES=3)


def linear_nf4_gemm(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """F.linear(x, dequantize_nf4(weight)[0], bias) for x [T, K] (unit stride along K) and an
    NF4Tensor weight [1, N, K] with rows of whole 64-value blocks, computing in x's dtype, in one
    kernel. bias [N] or None. `config` overrides `nf4_gemm_config`'s keys."""
    _, n_out, k_dim = weight.shape
    assert x.shape[1] == k_dim and k_dim % 64 == 0 and x.stride(1) == 1 and weight.dtype == x.dtype
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, n_out, dtype=x.dtype, device=x.device)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = {**nf4_gemm_config(num_tokens, n_out, x.is_cuda, num_sms), **(config or {})}
    ptrs, _, flags = _weight_args(weight, 1)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _nf4_gemm_kernel[grid](
        x, ptrs[0], ptrs[0] if bias is None else bias, out, *ptrs[1:], num_tokens, n_out, k_dim, x.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, DOUBLE_QUANT=flags["DOUBLE_QUANT"], NF4_ASM=flags["NF4_ASM"],
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return out


OUT = os.environ.get("OUT", "/tmp")
TOKENS = [int(t) for t in os.environ.get("TOKENS", "16,32,64,128,256").split(",")]
SHAPES = {"qkvo": (2048, 2048, True), "shared_gate_up": (5632, 2048, False), "shared_down": (2048, 5632, False),
          "joint_qkv": (6144, 2048, True)}
# "package": nf4_gemm_config's choice, as the package had it at 4585b9d
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
    dense = [dequantize_nf4(v)[0] for v in views]  # bf16: the bandwidth reference, and copy 0 the exact one
    for tokens in TOKENS:
        x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
        exact = F.linear(x.double(), dense[0].double(), None if not has_bias else linears[0].bias.double())
        systems = {"bnb": lambda i: linears[i](x), "bf16": lambda i: F.linear(x, dense[i], linears[i].bias)}
        for name, cfg in GEMM.items():
            systems[name] = lambda i, cfg=cfg: linear_nf4_gemm(x, views[i], linears[i].bias, config=cfg)
        for name, fn in systems.items():
            def measure(fn=fn):
                err = float((fn(0).double() - exact).norm() / exact.norm())
                return round(B._time_graph(fn, copies), 2), err

            row = timed_row(measure, shape=shape, tokens=tokens, system=name)
            res["rows"].append(row)
            print(row, flush=True)
        json.dump(res, open(os.path.join(OUT, "nf4_prefill_linear_sweep.json"), "w"), indent=1)  # so far
