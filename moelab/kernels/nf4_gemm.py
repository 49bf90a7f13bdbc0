"""An NF4 dense projection of a prompt's tokens as one Triton GEMM: y = x @ dequant(W)^T (+ bias).

Built in notebooks/05_fused_expert_kernel (its "prefill" section). A prefill of tens of tokens
reads every weight of a dense projection once for all its tokens. bitsandbytes' `Linear4bit`
does it in two kernels: it dequantizes the whole of W into a bf16 copy (reading 0.5 byte a
weight, writing 2), then cuBLAS multiplies by that copy (reading the 2 bytes again): 4.5 bytes of
HBM traffic a weight where the NF4 codes alone are 0.5, and a bf16 model reads 2. Here each
program dequantizes its [BLOCK_N rows, 64 values] NF4 blocks in registers, straight into the
tensor cores' operands (the experts' grouped GEMM does the same: `_nf4_block_dot`), so W is read
once, as codes. The block absmax scales the [M, N] product, not each weight.

`linear_nf4_gemm(x, w, bias)`: x [T, K] in bf16/fp16/fp32, w an `moelab.quant.NF4Tensor`
[1, N, K] (one "expert": a bitsandbytes `Linear4bit` seen through `moelab.quant.linear4bit_nf4`,
or a jointly quantized weight, `moelab.quant.JointNF4`) whose rows are whole 64-value blocks
(K % 64 == 0). `moelab.model` runs the NF4 linears of a prefill of up to `MAX_TOKENS` tokens
through it; above, the tensor cores are the limit and dequantize + cuBLAS wins again.
"""

import torch
import triton
import triton.language as tl

from .experts import _nf4_block_dot, _nf4_lut, _weight_args

MAX_TOKENS = 256  # longer prompts: dequantize once, then cuBLAS (compute-bound, its tiles win)


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
    """F.linear(x, dequantize_nf4(weight)[0], bias) for x [T, K] and an NF4Tensor weight [1, N, K]
    computing in x's dtype, in one kernel (no host sync: capturable). bias [N] or None.
    `config` overrides `nf4_gemm_config` (keys BLOCK_M, BLOCK_N, BLOCK_K, num_warps, NUM_STAGES)."""
    if not (hasattr(weight, "codes") and hasattr(weight, "absmax")):
        raise ValueError(f"weight must be an NF4Tensor [1, N, K], got {type(weight).__name__}")
    if len(weight.shape) != 3 or weight.shape[0] != 1:
        raise ValueError(f"weight must be one NF4 matrix [1, N, K], got shape {tuple(weight.shape)}")
    _, n_out, k_dim = weight.shape
    if x.dim() != 2 or x.shape[1] != k_dim:
        raise ValueError(f"x must be [T, {k_dim}], got {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the NF4 weight computes in {weight.dtype}")
    if k_dim % 64:
        raise ValueError(f"the NF4 GEMM takes rows of whole 64-value blocks, got K = {k_dim}")
    if bias is not None and (bias.shape != (n_out,) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n_out}], got shape {tuple(bias.shape)}")
    if x.device != weight.codes.device:
        raise ValueError(f"x is on {x.device} but the NF4 weight is on {weight.codes.device}")
    x = x if x.stride(1) == 1 else x.contiguous()
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, n_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = {**nf4_gemm_config(num_tokens, n_out, x.is_cuda, num_sms), **(config or {})}
    if cfg["BLOCK_K"] % 64:
        raise ValueError(f"BLOCK_K must be a multiple of 64 (whole NF4 blocks), got {cfg['BLOCK_K']}")
    ptrs, _, flags = _weight_args(weight, 1)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _nf4_gemm_kernel[grid](
        x, ptrs[0], ptrs[0] if bias is None else bias, out, *ptrs[1:], num_tokens, n_out, k_dim, x.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, DOUBLE_QUANT=flags["DOUBLE_QUANT"], NF4_ASM=flags["NF4_ASM"],
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg)
    return out
