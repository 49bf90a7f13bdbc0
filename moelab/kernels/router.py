"""The fused router kernel: softmax, top-k and optional renormalisation in one pass.

Built in notebooks/02_triton_router_kernel. Each program reads a block of rows of logits
once, keeps them in registers, and writes only the k weights and ids of each row:
T * E * 2 bytes in (bf16) and T * K * 8 bytes out, nothing in between. PyTorch's eager
version launches about ten kernels and writes the probabilities, the sort and the gathers
to memory between them.

Two ideas keep the work per row small (cross-thread reductions are what this kernel pays for):
- top-k runs on the logits, not the probabilities (softmax is monotonic), so the softmax
  needs no max pass of its own: the first pick is the row max;
- each pick is ONE reduction, `tl.max(..., return_indices=True)` with ties to the left
  (lowest id), over int32 keys that sort like the float32 logits. Taken experts and the
  padding get a key below every float, including -inf, so a row of -inf logits still takes
  its free ids in order 0, 1, 2, ...
"""

import torch
import triton
import triton.language as tl

_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # globals used in a kernel must be constexpr
_TAKEN = tl.constexpr(-2147483648)  # int32 min: below the key of every float, -inf included


@triton.jit
def _sortable_key(x):
    """float32 -> int32 with the same order: flip the magnitude bits of negative floats.

    Positive floats already compare like their bit patterns; negative ones compare in reverse,
    so xor-ing their low 31 bits turns larger magnitudes into smaller ints. Its own inverse.
    """
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


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
    x = tl.where(x != x, float("-inf"), x)            # NaN counts as -inf
    x = tl.minimum(x, _FLOAT32_MAX)                   # +inf counts as the largest float

    # Top-k by repeated arg-max on the keys; lowest id wins ties (return_indices_tie_break_left).
    key = tl.where(col_ok[None, :], _sortable_key(x), _TAKEN)
    kcols = tl.arange(0, BLOCK_K)
    top_x = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    row_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for k in tl.static_range(TOP_K):
        best, best_id = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
        key = tl.where(cols[None, :] == best_id[:, None], _TAKEN, key)
        best_x = _key_to_float(best)
        if k == 0:
            row_max = best_x                          # the first pick is the row max
        top_x = tl.where(kcols[None, :] == k, best_x[:, None], top_x)
        top_i = tl.where(kcols[None, :] == k, best_id[:, None], top_i)

    # Softmax over all experts, evaluated only at the k picks; padding adds exp(-inf) = 0.
    has_finite = row_max > float("-inf")
    safe_max = tl.where(has_finite, row_max, 0.0)     # empty rows: no inf - inf anywhere
    denom = tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
    denom = tl.where(has_finite, denom, 1.0)
    top_w = tl.where(has_finite[:, None], tl.exp(top_x - safe_max[:, None]) / denom[:, None], 0.0)

    if NORMALIZE:
        total = tl.sum(top_w, axis=1)
        total = tl.where(total > 0, total, 1.0)       # all-zero rows stay zero
        top_w = top_w / total[:, None]

    out = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=out_mask)
    tl.store(ids_ptr + out, top_i, mask=out_mask)


def launch_config(num_tokens: int, on_gpu: bool) -> tuple[int, int]:
    """(rows per program, warps per program).

    On the GPU the kernel is bound by its cross-thread reductions, not by bytes: one warp per
    program and few rows each measured fastest on an H200 (moelab.bench router --sweep).
    Under the interpreter every program instance costs about half a millisecond, so there
    fewer, larger programs win.
    """
    if not on_gpu:
        return min(256, triton.next_power_of_2(max(num_tokens, 1))), 4
    return (1 if num_tokens <= 4096 else 4), 1


def router_topk(logits: torch.Tensor, top_k: int, normalize: bool = False,
                block_t: int | None = None, num_warps: int | None = None):
    """Launch the kernel on [T, E] logits (any strides, any float dtype).

    Returns weights fp32 [T, K] and ids int32 [T, K]. Arguments are checked by
    `moelab.route`; call that instead. `block_t` and `num_warps` are tuning knobs for the
    benchmark's sweep; None picks `launch_config`.
    """
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
