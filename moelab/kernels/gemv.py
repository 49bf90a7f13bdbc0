"""A dense projection of a few tokens as one Triton GEMV: y = x @ W^T (+ bias).

Built in notebooks/08_cuda_graphs_and_decode_attention. At one token every dense projection
of a decode step is a matrix-vector product, bound by reading W. cuBLAS picks GEMM kernels
tiled for many rows; on an H200 at one token they read q/k/v at ~2.6 TB/s and o_proj at
~1.5 TB/s, and the router's 61-row product took two kernels (a dot and a reduce). This
kernel streams W the way the experts' decode kernels do (`moelab.kernels.experts._gemv_rows`):
one program per (token, 8 output rows), 16-byte loads along K, one FMA per weight into an
fp32 tile summed once at the end, the K-loop software-pipelined; the bias is added before
the one rounding. `MoeForward` runs its fused projections through it (notebook 08). Worth it only while W is read once per token: `MAX_TOKENS`.
"""

import torch
import triton
import triton.language as tl

from .experts import _gemv_rows

MAX_TOKENS = 4  # above this a GEMM reads W once for all tokens, and cuBLAS wins


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, n_out, k_dim, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PIPELINE: tl.constexpr):
    """out[t, n] = sum_k x[t, k] * W[n, k] (+ bias[n]), program (t, N-tile)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    token = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    x_row = x_ptr + token.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=PIPELINE):
        # Dense rows: NF4=False, so the five NF4 pointers (any pointer will do), the expert and the
        # absmax strides are unused.
        acc += _gemv_rows(w_ptr, w_ptr, w_ptr, w_ptr, w_ptr, w_ptr, x_row, 1.0, 0, n, n_ok, k0, k_dim, stride_wn,
                          0, 0, False, False, False, BLOCK_K, False)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n_out: int, on_gpu: bool) -> dict:
    """8 rows per program, 4 warps, 3 stages on the GPU; 256-value K-steps for thousands of
    rows, 512 for fewer (fewer programs: each keeps more bytes in flight). From an H200 sweep
    at one token, H = 2048 (benchmarks/results/sweep_decode_2026-11-29_h200.json): q/k/v (6,144
    rows, bias) 8.4 us against cuBLAS's 9.6, o_proj (2,048) 4.5 against 6.2, router + shared
    gate (61) 2.5 against 4.5 (two kernels). Under the interpreter one wide program per 64 rows."""
    if not on_gpu:
        return dict(BLOCK_N=min(64, triton.next_power_of_2(n_out)), BLOCK_K=128, num_warps=4, PIPELINE=1)
    return dict(BLOCK_N=8, BLOCK_K=256 if n_out >= 4096 else 512, num_warps=4, PIPELINE=3)


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K] with few rows, as one Triton GEMV (no host sync:
    capturable). weight [N, K] with unit stride along K (a row slice of a larger weight is
    fine), in x's dtype; bias [N] or None. `config` overrides `gemv_config`: a tuning knob."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [T, K] and weight [N, K] with the same K, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.stride(1) != 1:
        raise ValueError(f"weight must be {x.dtype} with unit stride along K, got {weight.dtype}, "
                         f"strides {weight.stride()}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    x = x.contiguous()
    num_tokens, n_out = x.shape[0], weight.shape[0]
    out = torch.empty(num_tokens, n_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    cfg = {**gemv_config(n_out, x.is_cuda), **(config or {})}
    _linear_gemv_kernel[(num_tokens * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        x, weight, weight if bias is None else bias, out, n_out, x.shape[1], x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, **cfg)
    return out
