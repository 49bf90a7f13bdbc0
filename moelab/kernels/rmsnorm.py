"""Residual add and RMSNorm in one kernel.

Built in notebooks/08_cuda_graphs_and_decode_attention. Every decoder layer adds a block's
output to the residual stream and normalises the sum, twice. In PyTorch that is the add and
about seven kernels for RMSNorm as transformers computes it (upcast, square, mean, add eps,
rsqrt, scale, downcast, times the weight), each reading and writing the [T, hidden] rows:
at decode a few kilobytes each, so launches, not bytes, set their cost. Program t reads
row t of the residual and of the block's output once, and writes the new residual and its
normalised copy.

It rounds where transformers rounds (the sum and the normalised row to the input dtype,
then the product with the weight), so it differs from PyTorch only in the order of the
fp32 sum of squares.
"""

import torch
import triton
import triton.language as tl

from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr,
    num_cols, eps,
    stride_x, stride_delta, stride_sum, stride_out,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(USE_PDL)
    let_next_kernel_start(USE_PDL)  # a row per program: the next kernel may be placed at once
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0)
        # Add in fp32, round once to the input dtype, as torch's add does.
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(dtype)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / num_cols + eps)
    normed = (h * inv_rms).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(hidden + delta, rms_norm(hidden + delta) * weight), or with delta None
    (hidden, rms_norm(hidden) * weight): `moelab.model.rms_norm` after the residual add.

    hidden, delta [T, H] in one dtype, contiguous in H; weight [H]. Returns new tensors
    (hidden itself when delta is None) in hidden's dtype (the weight's dtype if it differs,
    as PyTorch's type promotion gives)."""
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"hidden must be [T, H] and contiguous in H, got shape {tuple(hidden.shape)}")
    if weight.shape != (hidden.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden {tuple(hidden.shape)}")
    if delta is not None and (delta.shape != hidden.shape or delta.dtype != hidden.dtype or delta.stride(1) != 1):
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} must match hidden {tuple(hidden.shape)} "
                         f"{hidden.dtype} (contiguous in H)")
    rows, cols = hidden.shape
    total = torch.empty_like(hidden) if delta is not None else hidden
    out = torch.empty((rows, cols), dtype=torch.promote_types(hidden.dtype, weight.dtype), device=hidden.device)
    if rows == 0:
        return total, out
    block = triton.next_power_of_2(cols)
    num_warps = (1 if block <= 256 else 4 if block <= 2048 else 8) if hidden.is_cuda else 1
    _add_rms_norm_kernel[(rows,)](
        hidden, delta if delta is not None else hidden, weight, total, out,
        cols, eps,
        hidden.stride(0), (delta if delta is not None else hidden).stride(0), total.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=num_warps, **launch_args(hidden),
    )
    return total, out
