"""A dense projection of a few tokens as one Triton GEMV: y = x @ W^T (+ bias).

Built in notebooks/08_cuda_graphs_and_decode_attention. At one token every dense projection
of a decode step is a matrix-vector product, bound by reading W. cuBLAS picks GEMM kernels
tiled for many rows; on an H200 at one token they read q/k/v at ~2.6 TB/s and o_proj at
~1.5 TB/s, and the router's 61-row product took two kernels (a dot and a reduce). This
kernel streams W the way the experts' decode kernels do (`moelab.kernels.experts._gemv_rows`):
one program per (token, 8 output rows), 16-byte loads along K, one FMA per weight into an
fp32 tile summed once at the end, the K-loop software-pipelined; the bias is added before
the one rounding. `MoeForward` runs its fused projections through it (notebook 08). Worth it only while W is read once per token: `MAX_TOKENS`.

W may also be NF4 (`moelab.quant.NF4Tensor` of one "expert", e.g. a bitsandbytes `Linear4bit`
seen through `moelab.quant.linear4bit_nf4`): the same kernel then streams the 4-bit codes
through the experts' NF4 decode path, in place of bitsandbytes' gemm_4bit.
"""

import torch
import triton
import triton.language as tl

from .experts import (_gemv_acc, _gemv_acc_sum, _gemv_rows, _is_nf4, _nf4_lut, _weight_args, _whole_nf4_blocks,
                      with_nf4_table)
from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel

MAX_TOKENS = 4  # above this a GEMM reads W once for all tokens, and cuBLAS wins
HEAD_ROWS = 65536  # an NF4 weight with this many rows or more is a vocabulary head: its own config


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                        absmax_offset_ptr, nf4_code_ptr, n_out, k_dim, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        ROW_ALIGNED: tl.constexpr, NF4_ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PIPELINE: tl.constexpr, USE_PDL: tl.constexpr = False,
                        NF4_SMEM: tl.constexpr = 0):
    """out[t, n] = sum_k x[t, k] * W[n, k] (+ bias[n]), program (t, N-tile). W dense (the NF4
    pointers unused) or NF4 (one expert: expert index 0, no per-expert absmax strides)."""
    if NF4_SMEM:  # the table comes from a buffer no kernel writes: filled while the kernel before finishes
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    wait_for_previous_kernel(USE_PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    token = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    x_row = x_ptr + token.to(tl.int64) * stride_xm
    acc = _gemv_acc(BLOCK_N, BLOCK_K, NF4, NF4_ASM and ROW_ALIGNED)
    if not NF4_SMEM:
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=PIPELINE):
        acc = _gemv_rows(acc, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
                         x_row, 1.0, 0, n, n_ok, k0, k_dim, stride_wn, 0, 0, lut, NF4, DOUBLE_QUANT, ROW_ALIGNED,
                         BLOCK_K, NF4_ASM, NF4_SMEM)
    let_next_kernel_start(USE_PDL)
    out = _gemv_acc_sum(acc, NF4)
    if HAS_BIAS:
        out += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n_out: int, on_gpu: bool, nf4: bool = False, num_tokens: int = 1) -> dict:
    """8 rows per program, 4 warps, 3 stages on the GPU; 256-value K-steps for thousands of
    rows, 512 for fewer (fewer programs: each keeps more bytes in flight). From an H200 sweep
    at one token, H = 2048 (benchmarks/results/sweep_decode_2026-11-29_h200.json): q/k/v (6,144
    rows, bias) 8.4 us against cuBLAS's 9.6, o_proj (2,048) 4.5 against 6.2, router + shared
    gate (61) 2.5 against 4.5 (two kernels).

    NF4 takes the experts' word path (`moelab.kernels.experts._nf4_words`), no prefetching. At
    one token, from an H100 sweep of the decode step's two NF4 linears
    (benchmarks/results/nf4_linear_sweep_2026-12-06_h100.json): thousands of rows (q/k/v) in
    16-row programs on 8 warps, 512-value steps, the code bytes looked up in the shared-memory
    pair table (capped at 48 registers: `with_nf4_table`), 6.9 -> 6.2 us; fewer rows (o_proj) as
    the experts' down at one token, one 16-row program per SM on 32 warps taking a whole
    2,048-value row in one step, with `prmt` (NF4_SMEM=0: the table was slower there, 3.75 us),
    4.6 -> 3.5 us. The batch-1 NF4 decode step: 596 -> 612 tokens/s
    (nf4_step_ab_2026-12-06_h100.json). At 2-4 tokens: 8 rows, 512-value steps, 4 warps,
    `prmt` (8 warps made those linears slower in H100 decode profiles: 72 calls 408 us a step
    with 8 warps, 348 with 4, decode_nf4_2026-12-06_h100_run1.json and _run2). An NF4 head
    (HEAD_ROWS rows and more: 151,936 for Qwen1.5-MoE) at one token in 16-row programs of 2 warps,
    512-value steps, `prmt`: 88 us against 101 with the q/k/v config, 195 for the bf16 head
    through this GEMV and 205 through cuBLAS (benchmarks/tuning/nf4_head_sweep.py,
    nf4_head_sweep_2026-12-07_h100.json; the table and prefetching were slower).
    Under the interpreter one wide program per 64 rows."""
    if not on_gpu:
        return dict(BLOCK_N=min(64, triton.next_power_of_2(n_out)), BLOCK_K=128, num_warps=4, PIPELINE=1)
    if nf4:
        if num_tokens > 1:
            return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1, NF4_SMEM=0)
        if n_out >= HEAD_ROWS:  # an NF4 lm_head ("nf4_head"): thousands of programs, 2 warps each
            return dict(BLOCK_N=16, BLOCK_K=512, num_warps=2, PIPELINE=1, NF4_SMEM=0)
        if n_out >= 4096:
            return dict(BLOCK_N=16, BLOCK_K=512, num_warps=8, PIPELINE=1)
        return dict(BLOCK_N=16, BLOCK_K=2048, num_warps=32, PIPELINE=1, NF4_SMEM=0)
    return dict(BLOCK_N=8, BLOCK_K=256 if n_out >= 4096 else 512, num_warps=4, PIPELINE=3)


def linear_gemv(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K] with few rows, as one Triton GEMV (no host sync:
    capturable). weight [N, K] with unit stride along K (a row slice of a larger weight is
    fine), in x's dtype, or an NF4Tensor [1, N, K] computing in x's dtype; bias [N] or None.
    `config` overrides `gemv_config`: a tuning knob."""
    nf4 = _is_nf4(weight)
    shape = tuple(weight.shape)
    if nf4 and shape[0] == 1:  # one NF4 "expert": its [N, K]
        shape = shape[1:]
    if x.dim() != 2 or len(shape) != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must be [T, K] and weight [N, K] (NF4: [1, N, K]) with the same K, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype or (not nf4 and weight.stride(1) != 1):
        raise ValueError(f"weight must be {x.dtype} (NF4: compute in it) with unit stride along K, got {weight.dtype}"
                         + ("" if nf4 else f", strides {weight.stride()}"))
    if nf4 and shape[1] % 2:
        raise ValueError(f"NF4 weights need an even K, got {shape[1]}")
    if bias is not None and (bias.shape != (shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{shape[0]}], got shape {tuple(bias.shape)}")
    x = x.contiguous()
    if nf4 and x.data_ptr() % 4:  # the NF4 path reads x as 32-bit bf16 pairs
        x = x.clone()
    num_tokens, n_out = x.shape[0], shape[0]
    out = torch.empty(num_tokens, n_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = _whole_nf4_blocks({**gemv_config(n_out, x.is_cuda, nf4, num_tokens), **(config or {})}, weight)
    ptrs, _, flags = _weight_args(weight if nf4 else weight[None], 1)  # one "expert"
    cfg = with_nf4_table(cfg, flags, "linear")
    _linear_gemv_kernel[(num_tokens * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        x, ptrs[0], ptrs[0] if bias is None else bias, out, *ptrs[1:], n_out, shape[1], x.stride(0),
        0 if nf4 else weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, **flags, **cfg,
        **launch_args(x, late=nf4))
    return out
