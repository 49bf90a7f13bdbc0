"""The fused router kernel: softmax, top-k and optional renormalisation in one pass.

Built in notebooks/02_triton_router_kernel. Each program reads a block of rows of logits
once, keeps them in registers, and writes only the k weights and ids of each row:
T * E * 2 bytes in (bf16) and T * K * 8 bytes out, nothing in between. PyTorch's eager
version (fp32 softmax, then topk) launches a kernel per op and writes the fp32
probabilities and top-k's intermediates to memory between them: 7.4x the bytes at E=60.

The row max, the softmax denominator and each of the k picks are reductions across the
threads that hold a row; they, not the bytes, set this kernel's speed on the GPU.
"""

import torch
import triton
import triton.language as tl

_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # globals used in a kernel must be constexpr


@triton.jit
def route_rows(x, cols, col_ok, rows, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The routing contract (`moelab.routing`) on fp32 logits x [BLOCK_T, BLOCK_E] already in
    registers (padding columns, col_ok False, hold -inf): returns (weights, ids), [BLOCK_T,
    BLOCK_K] fp32 and int32, the first TOP_K columns meaningful. Shared by this module's kernel
    and the fused norm + router kernel (`moelab.kernels.norm_route`)."""
    x = tl.where(x != x, float("-inf"), x)            # NaN counts as -inf
    x = tl.minimum(x, _FLOAT32_MAX)                   # +inf counts as the largest float

    # Softmax denominator over all experts; padded columns are -inf and add exp(-inf) = 0.
    row_max = tl.max(x, axis=1)
    has_finite = row_max > float("-inf")
    safe_max = tl.where(has_finite, row_max, 0.0)
    denom = tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
    denom = tl.where(has_finite, denom, 1.0)          # empty rows: no 0/0 anywhere

    # Top-k by repeated max. `avail` marks experts not yet taken (and never the padding),
    # so a row whose remaining logits are all -inf still takes the lowest free ids.
    avail = col_ok[None, :] & (rows[:, None] >= 0)
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([x.shape[0], BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([x.shape[0], BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        cand = tl.where(avail, x, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = avail & (cand == best[:, None])
        best_id = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # lowest id wins ties
        avail = avail & (cols[None, :] != best_id[:, None])
        w = tl.where(has_finite, tl.exp(best - safe_max) / denom, 0.0)
        top_w = tl.where(kcols[None, :] == k, w[:, None], top_w)
        top_i = tl.where(kcols[None, :] == k, best_id[:, None], top_i)

    if NORMALIZE:
        total = tl.sum(top_w, axis=1)
        total = tl.where(total > 0, total, 1.0)       # all-zero rows stay zero
        top_w = top_w / total[:, None]

    return top_w, top_i


@triton.jit
def _router_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts,
    stride_t, stride_e,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e
    # Load in the input dtype, compute in fp32 (the interpreter's bf16 arithmetic is wrong).
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    top_w, top_i = route_rows(x, cols, col_ok, rows, TOP_K, NORMALIZE, BLOCK_E, BLOCK_K)
    kcols = tl.arange(0, BLOCK_K)
    out = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=out_mask)
    tl.store(ids_ptr + out, top_i, mask=out_mask)


def launch_config(num_tokens: int, on_gpu: bool) -> tuple[int, int]:
    """(rows per program, warps per program).

    On the GPU the kernel is bound by its cross-thread reductions and their latency, not by
    bytes: one warp per program and 1-4 rows each measured fastest on an H200
    (`python -m moelab.bench router --sweep`; more warps per program cost shared-memory
    round trips in every reduction).
    Under the interpreter every program instance costs about half a millisecond, so there
    fewer, larger programs win.
    """
    if not on_gpu:
        return min(256, triton.next_power_of_2(max(num_tokens, 1))), 4
    return (1 if num_tokens <= 256 else 2 if num_tokens <= 8192 else 4), 1


def router_topk(logits: torch.Tensor, top_k: int, normalize: bool = False,
                block_t: int | None = None, num_warps: int | None = None, kernel: str = "auto"):
    """Launch the kernel on [T, E] logits (any strides, any float dtype).

    Returns weights fp32 [T, K] and ids int32 [T, K]. Arguments are checked by
    `moelab.route`; call that instead. `kernel="auto"` sends bf16 logits on an NVIDIA GPU
    to the row-per-thread kernel of `router_rows.py` (faster at every T measured) and
    everything else to this module's kernel; "tl" forces this one. `block_t` and
    `num_warps` are tuning knobs for this kernel in the benchmark's sweep.
    """
    if kernel not in ("auto", "tl"):
        raise ValueError(f"kernel must be 'auto' or 'tl', got {kernel!r}")
    if kernel == "auto" and logits.is_cuda:
        from . import router_rows  # Gluon: imported only on a GPU, never in the interpreter
        if router_rows.supports(logits):
            return router_rows.router_topk_rows(logits, top_k, normalize)
    num_tokens, num_experts = logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    default_t, default_w = launch_config(num_tokens, logits.is_cuda)
    block_t, num_warps = block_t or default_t, num_warps or default_w
    grid = (triton.cdiv(num_tokens, block_t),)
    _router_kernel[grid](
        logits, weights, ids,
        num_tokens, num_experts,
        logits.stride(0), logits.stride(1),
        TOP_K=top_k, NORMALIZE=normalize,
        BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=num_warps,
    )
    return weights, ids
