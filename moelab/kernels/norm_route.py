"""The residual add, the post-attention RMSNorm, the router product and its top-k in one launch.

Built in notebooks/08_cuda_graphs_and_decode_attention. Between attention and the experts a
decode step ran three kernels a layer: `rmsnorm.add_rms_norm` (one program per token), the
router and shared-gate product (`gemv.linear_gemv`, 61 rows of 2,048) and the top-k
(`router_rows`). Each reads a few kilobytes; what they cost is the wait at each kernel
boundary, three times a layer, 72 times a step at batch 1.

Here program (t, j) adds token t's attention output to its residual row, normalises the sum
(each program redundantly: 2,048 values, from L2), and multiplies it by ROWS rows of the router
weight: the product needs only its own rows, so the programs are independent. Program (t, 0)
also writes the new residual row and the normalised row that the experts read. Then every
program stores its logits and takes a ticket for its token (an atomic add after every thread's
store); the token's last program finds all logits in memory and routes them with the router
kernel's own code (`router.route_rows`: softmax, top-k with ties to the lower id, optional
renormalisation), then puts the ticket back to 0, so the next call (and the next replay of a
CUDA graph) finds it ready.

It rounds where the separate kernels round (the sum, the normalised row and its product with
the norm weight, each logit to the input dtype before routing), so the norm's outputs are the
add_rms_norm kernel's and the logits differ from the GEMV's only in the order of an fp32 sum.
"""

import functools

import torch
import triton
import triton.language as tl

from .pdl import launch_args, wait_for_previous_kernel
from .router import route_rows

MAX_HIDDEN = 8192  # a program holds the whole normalised row in registers
MAX_EXPERTS = 128  # the last program holds a token's logits in registers
MAX_TOKENS = 64  # one ticket per token (`_tickets`)
ENABLED = True  # False: moelab.model runs the three kernels instead (comparisons)


@triton.jit
def _add_norm_route_kernel(
    x_ptr, delta_ptr, norm_w_ptr, router_w_ptr, sum_ptr, normed_ptr, logits_ptr, weights_ptr, ids_ptr,
    ticket_ptr, hidden_dim, num_rows, num_experts, eps,
    stride_x, stride_delta, stride_sum, stride_normed, stride_rw, stride_logits,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < hidden_dim
    rows = part * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    # The router rows first: their load does not depend on the norm, so it is in flight meanwhile.
    w = tl.load(router_w_ptr + rows[:, None].to(tl.int64) * stride_rw + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x = tl.load(x_ptr + token * stride_x + cols, mask=col_ok, other=0.0)
    delta = tl.load(delta_ptr + token * stride_delta + cols, mask=col_ok, other=0.0)
    dtype = x.dtype
    x = (x.to(tl.float32) + delta.to(tl.float32)).to(dtype)  # the residual add, rounded as torch rounds it
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / hidden_dim + eps)
    norm_w = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    normed = (norm_w * (h * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    if part == 0:
        tl.store(sum_ptr + token * stride_sum + cols, x, mask=col_ok)
        tl.store(normed_ptr + token * stride_normed + cols, normed, mask=col_ok)
    logit = tl.sum(w.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1).to(dtype)
    tl.store(logits_ptr + token * stride_logits + rows, logit, mask=row_ok)

    tl.debug_barrier()  # every thread's logits stored before the ticket is taken (its release covers them)
    ticket = tl.atomic_add(ticket_ptr + token, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(1) - 1:  # the token's last program: all its logits are in memory
        e = tl.arange(0, BLOCK_E)
        e_ok = e < num_experts
        one = tl.arange(0, 1)
        logits = tl.load(logits_ptr + token * stride_logits + e[None, :], mask=e_ok[None, :],
                         other=float("-inf"), cache_modifier=".cg").to(tl.float32)  # from L2: other SMs wrote them
        top_w, top_i = route_rows(logits, e, e_ok, one, TOP_K, NORMALIZE, BLOCK_E, BLOCK_K)
        k = tl.arange(0, BLOCK_K)
        out = token * TOP_K + k[None, :]
        tl.store(weights_ptr + out, top_w, mask=k[None, :] < TOP_K)
        tl.store(ids_ptr + out, top_i, mask=k[None, :] < TOP_K)
        tl.atomic_xchg(ticket_ptr + token, 0)


@functools.lru_cache(maxsize=8)
def _tickets(device: torch.device) -> torch.Tensor:
    """int32 [MAX_TOKENS] zeros, one ticket counter per token, each put back to 0 by the kernel.
    Made at the first call, which must not be inside a CUDA graph capture (`moelab.graphs` warms
    up eagerly first): a capture would record the zero fill instead of running it. Every call on
    the device shares them, which is safe while its launches run one after another (one stream, as
    the Engine's); two running at once on different streams would mix their tickets."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("add_norm_route's ticket counters must be made outside a CUDA graph capture: "
                           "call it once eagerly first (moelab.graphs warms up before capturing)")
    return torch.zeros(MAX_TOKENS, dtype=torch.int32, device=device)


def config(num_rows: int, on_gpu: bool) -> dict:
    """Router rows per program and warps. On an H100 (benchmarks/results/norm_route_ab_2026-12-07_h100.json,
    the batch-1 decode step, three rounds alternating) one row a program on 2 warps beat 4 warps at
    every precision (bf16 2.203 against 2.238 ms, NF4 with its head 1.427 against 1.462; the three
    kernels it replaces 2.229 and 1.485). Under the interpreter one program per token."""
    if not on_gpu:
        return dict(ROWS=triton.next_power_of_2(num_rows), num_warps=4)
    return dict(ROWS=1, num_warps=2)


def add_norm_route(hidden: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   router_weight: torch.Tensor, num_experts: int, top_k: int, normalize: bool = False,
                   cfg: dict | None = None):
    """hidden + delta, its RMSNorm, the router product and the routing, in one launch.

    hidden, delta [T, H] (contiguous in H, one dtype), norm_weight [H] in that dtype,
    router_weight [R, H] (R >= num_experts: the router's rows first, then any more rows the same
    product serves, such as Qwen2-MoE's shared-expert gate). Returns (hidden + delta, its norm
    [T, H], logits [T, R] in the input dtype, routing weights fp32 [T, K], ids int32 [T, K]):
    what `rmsnorm.add_rms_norm`, `x @ router_weight.T` and `moelab.route` on the first
    num_experts logits give. `cfg` overrides `config` (a tuning knob)."""
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"hidden must be [T, H] and contiguous in H, got shape {tuple(hidden.shape)}")
    num_tokens, hidden_dim = hidden.shape
    if delta.shape != hidden.shape or delta.dtype != hidden.dtype or delta.stride(1) != 1:
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype} must match hidden {tuple(hidden.shape)} "
                         f"{hidden.dtype} (contiguous in H)")
    if norm_weight.shape != (hidden_dim,) or norm_weight.dtype != hidden.dtype:
        raise ValueError(f"norm_weight must be [{hidden_dim}] {hidden.dtype}, got {tuple(norm_weight.shape)} "
                         f"{norm_weight.dtype}")
    if (router_weight.dim() != 2 or router_weight.shape[1] != hidden_dim or router_weight.dtype != hidden.dtype
            or router_weight.stride(1) != 1):
        raise ValueError(f"router_weight must be [R, {hidden_dim}] {hidden.dtype} with unit stride along H, got "
                         f"{tuple(router_weight.shape)} {router_weight.dtype}")
    num_rows = router_weight.shape[0]
    if not 1 <= num_experts <= min(num_rows, MAX_EXPERTS):
        raise ValueError(f"num_experts must be in [1, min(router rows={num_rows}, {MAX_EXPERTS})], got {num_experts}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if num_tokens > MAX_TOKENS or hidden_dim > MAX_HIDDEN:
        raise ValueError(f"add_norm_route takes up to {MAX_TOKENS} tokens of up to {MAX_HIDDEN} values, got "
                         f"{tuple(hidden.shape)}")
    total = torch.empty_like(hidden)
    normed = torch.empty_like(hidden)
    logits = torch.empty(num_tokens, num_rows, dtype=hidden.dtype, device=hidden.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=hidden.device)
    if num_tokens == 0:
        return total, normed, logits, weights, ids
    cfg = {**config(num_rows, hidden.is_cuda), **(cfg or {})}
    rows = cfg.pop("ROWS")
    _add_norm_route_kernel[(num_tokens, triton.cdiv(num_rows, rows))](
        hidden, delta, norm_weight, router_weight, total, normed, logits, weights, ids, _tickets(hidden.device),
        hidden_dim, num_rows, num_experts, eps,
        hidden.stride(0), delta.stride(0), total.stride(0), normed.stride(0), router_weight.stride(0),
        logits.stride(0),
        TOP_K=top_k, NORMALIZE=normalize, ROWS=rows, BLOCK_H=triton.next_power_of_2(hidden_dim),
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        **cfg, **launch_args(hidden))
    return total, normed, logits, weights, ids
