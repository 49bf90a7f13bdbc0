"""The router kernel again, with the layout chosen by hand: rows per thread, keys for top-k.

Built in notebooks/02_triton_router_kernel (last section). `router.py`'s kernel lets Triton
lay a row of 60 logits across the 32 lanes of a warp, two values per lane. Every row max,
softmax sum and top-k pick then needs five shuffle rounds, and one warp instruction serves
one row: at T=65536 on an H200 that kernel spends 8x the bytes/bandwidth floor computing.

Here Gluon (Triton's explicit-layout dialect, `triton.experimental.gluon`) puts a whole row
(or a half / an eighth of it) in one thread's registers, so the reductions are plain
register arithmetic, and each warp instruction serves up to 32 rows. Two more ideas cut
the instruction count:

- A bf16 logit is 16 bits, so (its order-preserving bits, 65535 - expert id) packs into one
  int32 key. The largest key is the largest logit, ties going to the lower id: one integer
  max per pick instead of a float max plus an arg-min for the id.
- The first pick is the row max, which the softmax needs; later picks take the largest key
  below the previous one, `min((prev - 1 - key) as uint32)`, with no masking pass between.

bf16 logits on NVIDIA GPUs only (Gluon does not run in the interpreter); everything else
goes to `router.py`'s kernel. Same contract, checked against `route_reference` by the
`gpu` tests.
"""

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_FLOAT32_MAX = gl.constexpr(3.4028234663852886e38)
_INT32_MIN = gl.constexpr(-2147483648)
_NEG_INF_CODE = gl.constexpr(-32640)  # order-preserving code of bf16 -inf (bits 0xFF80)
MAX_EXPERTS = 128  # a row's keys live in registers: 128 per row is where that stays sane


@gluon.jit
def _router_rows_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    num_tokens, stride_in_vecs,
    NUM_EXPERTS: gl.constexpr, VEC: gl.constexpr,
    TOP_K: gl.constexpr, NORMALIZE: gl.constexpr,
    BLOCK_E: gl.constexpr, ROWS: gl.constexpr, LAYOUT: gl.constexpr,
):
    pid = gl.program_id(0)
    rows = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.expand_dims(gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, LAYOUT)), 0)
    row_ok = rows < num_tokens
    # The row stride is passed in units of VEC elements, so the compiler knows every row
    # starts VEC-aligned and loads VEC logits per instruction (8 bytes when E = 60).
    offs = gl.expand_dims(rows.to(gl.int64) * stride_in_vecs * VEC, 1) + cols
    x = gl.load(logits_ptr + offs, mask=gl.expand_dims(row_ok, 1) & (cols < NUM_EXPERTS),
                other=float("-inf"))

    # Order-preserving integer code of each bf16: bits >= 0 stay, negatives flip to
    # -32768 - bits (so -0.0 ties +0.0). NaN, of either sign, counts as -inf.
    bits = x.to(gl.int16, bitcast=True).to(gl.int32)
    code = gl.where(bits < 0, -32768 - bits, bits)
    is_nan = (code > 32640) | (code < _NEG_INF_CODE)
    code = gl.where(is_nan, _NEG_INF_CODE, code)
    key = gl.where(cols < NUM_EXPERTS, code * 65536 + (65535 - cols), _INT32_MIN)
    ukey = key.to(gl.uint32, bitcast=True)
    xf = gl.minimum(gl.where(is_nan, float("-inf"), x.to(gl.float32)), _FLOAT32_MAX)

    out = rows.to(gl.int64) * TOP_K
    best = gl.max(key, axis=1)
    total = gl.zeros_like(best.to(gl.float32))
    for k in gl.static_range(TOP_K):
        if k > 0:
            # Keys below the previous pick give small (prev - 1 - key); keys already taken
            # wrap around to >= 2**31 + prev as uint32 and never win the min.
            below = (best - 1).to(gl.uint32, bitcast=True)
            best = (below - gl.min(gl.expand_dims(below, 1) - ukey, axis=1)).to(gl.int32, bitcast=True)
        best_id = 65535 - (best & 0xFFFF)
        best_code = best >> 16
        best_bits = gl.where(best_code < 0, -32768 - best_code, best_code)
        value = gl.minimum((best_bits << 16).to(gl.float32, bitcast=True), _FLOAT32_MAX)
        if k == 0:  # the first pick is the row max: now the softmax denominator
            has_finite = value > float("-inf")
            safe_max = gl.where(has_finite, value, 0.0)
            denom = gl.sum(gl.exp(xf - gl.expand_dims(safe_max, 1)), axis=1)
            denom = gl.where(has_finite, denom, 1.0)   # empty rows: no 0/0 anywhere
        w = gl.where(has_finite, gl.exp(value - safe_max) / denom, 0.0)
        total += w
        gl.store(weights_ptr + out + k, w, mask=row_ok)
        gl.store(ids_ptr + out + k, best_id, mask=row_ok)

    if NORMALIZE:
        total = gl.where(total > 0, total, 1.0)       # all-zero rows stay zero
        for k in gl.static_range(TOP_K):
            w = gl.load(weights_ptr + out + k, mask=row_ok, other=0.0)
            gl.store(weights_ptr + out + k, w / total, mask=row_ok)


def launch_config(num_tokens: int) -> tuple[int, int]:
    """(threads per row, warps per program), measured on an H200 (notebook 02): few rows
    want a row spread over a warp (short dependency chains), many rows want whole rows per
    thread or two (fewest instructions per row)."""
    if num_tokens <= 512:
        return 32, 2
    if num_tokens <= 16384:
        return 8, 1
    return 2, 1


@functools.lru_cache(maxsize=None)
def _layout(block_e: int, threads_per_row: int, num_warps: int):
    return gl.BlockedLayout(size_per_thread=[1, block_e // threads_per_row],
                            threads_per_warp=[32 // threads_per_row, threads_per_row],
                            warps_per_cta=[num_warps, 1], order=[1, 0])


def supports(logits: torch.Tensor) -> bool:
    """Whether this kernel takes these logits: bf16 on an NVIDIA GPU, at most 128 experts."""
    return (logits.is_cuda and torch.version.hip is None and logits.dtype == torch.bfloat16
            and logits.shape[1] <= MAX_EXPERTS and logits.stride(1) == 1)


def router_topk_rows(logits: torch.Tensor, top_k: int, normalize: bool = False,
                     threads_per_row: int | None = None, num_warps: int | None = None):
    """Launch on bf16 [T, E] logits (unit stride along E). Returns fp32 weights and int32 ids,
    [T, K]. `threads_per_row` / `num_warps` are the benchmark's knobs; None picks
    `launch_config`."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    default_tpr, default_warps = launch_config(num_tokens)
    block_e = triton.next_power_of_2(num_experts)
    tpr = min(threads_per_row or default_tpr, block_e)
    num_warps = num_warps or default_warps
    rows = 32 // tpr * num_warps
    vec = next(v for v in (8, 4, 2, 1) if logits.stride(0) % v == 0)
    _router_rows_kernel[(triton.cdiv(num_tokens, rows),)](
        logits, weights, ids, num_tokens, logits.stride(0) // vec,
        NUM_EXPERTS=num_experts, VEC=vec, TOP_K=top_k, NORMALIZE=normalize,
        BLOCK_E=block_e, ROWS=rows, LAYOUT=_layout(block_e, tpr, num_warps),
        num_warps=num_warps,
    )
    return weights, ids
