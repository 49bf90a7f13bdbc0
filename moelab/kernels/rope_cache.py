"""Rotary embedding and the KV-cache write in one kernel.

Built in notebooks/08_cuda_graphs_and_decode_attention. In PyTorch, rotating q and k
(`x * cos + rotate_half(x) * sin`: a negation, a concatenation, two products and a sum
each) and writing k and v into their slots (two indexed writes) is about fourteen kernel
launches per layer, each moving a few kilobytes at decode. At batch 1 a step is short
enough (about a millisecond of weight reads) that a thousand such launches per step are
what sets its speed, even inside a CUDA graph. Here program t loads token t's q, k and v
heads once, rotates q and k in fp32, writes k and v at (slots[t], positions[t]) of the
layer's cache and the rotated q to a new tensor: one launch.

RoPE pairs dim i with dim i + head_dim/2 (transformers' `rotate_half` convention):
out[:half] = x[:half] * cos[:half] - x[half:] * sin[:half],
out[half:] = x[half:] * cos[half:] + x[:half] * sin[half:].
"""

import torch
import triton
import triton.language as tl

from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, positions_ptr,
    q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_cs, stride_ch, stride_cn,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(USE_PDL)
    let_next_kernel_start(USE_PDL)  # a row per program: the next kernel may be placed at once
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    # Load in the input dtype, compute in fp32 (the interpreter's bf16 arithmetic is wrong).
    cos1 = tl.load(cos_ptr + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + t * stride_ct + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]

    q_mask = (h < NUM_HEADS)[:, None] & d_ok[None, :]
    q_rows = q_ptr + t * stride_qt + h[:, None] * stride_qh
    q1 = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    # q_out is a fresh contiguous [T, heads, head_dim] tensor.
    out_rows = q_out_ptr + (t * NUM_HEADS + h[:, None]) * (2 * HALF)
    tl.store(out_rows + d[None, :], (q1 * cos1 - q2 * sin1).to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(out_rows + HALF + d[None, :], (q2 * cos2 + q1 * sin2).to(q_out_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slots_ptr + t).to(tl.int64)
    position = tl.load(positions_ptr + t).to(tl.int64)
    kv_mask = (h < NUM_KV_HEADS)[:, None] & d_ok[None, :]
    k_rows = k_ptr + t * stride_kt + h[:, None] * stride_kh
    k1 = tl.load(k_rows + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_rows + HALF + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    cache_rows = slot * stride_cs + h[:, None] * stride_ch + position * stride_cn
    kc = k_cache_ptr + cache_rows
    tl.store(kc + d[None, :], (k1 * cos1 - k2 * sin1).to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(kc + HALF + d[None, :], (k2 * cos2 + k1 * sin2).to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    v_rows = v_ptr + t * stride_vt + h[:, None] * stride_vh
    vc = v_cache_ptr + cache_rows
    v_dtype = v_cache_ptr.dtype.element_ty
    tl.store(vc + d[None, :], tl.load(v_rows + d[None, :], mask=kv_mask, other=0.0).to(v_dtype), mask=kv_mask)
    tl.store(vc + HALF + d[None, :], tl.load(v_rows + HALF + d[None, :], mask=kv_mask, other=0.0).to(v_dtype),
             mask=kv_mask)


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """Rotate q and k by their tokens' angles, store k and v at (slots[t], positions[t]) of one
    layer's cache, return the rotated q.

    q [T, heads, head_dim], k and v [T, kv_heads, head_dim] (any token and head strides,
    contiguous in head_dim); cos, sin [T, head_dim]; k_cache, v_cache [slots, kv_heads,
    max_seq_len, head_dim] in the cache dtype; slots, positions int [T] on the device (not
    checked: that would sync; out-of-range values write out of bounds, as `KVCache.write`'s
    indexing would fail). Returns a new contiguous [T, heads, head_dim] tensor in q's dtype.
    """
    tokens, heads, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != tokens or k.shape[2] != head_dim or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T={tokens}, kv_heads, {head_dim}]")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[1:4:2] != (k.shape[1], head_dim):
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit k {tuple(k.shape)}")
    if cos.shape != (tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [T={tokens}, {head_dim}]")
    if head_dim % 2 or slots.shape != (tokens,) or positions.shape != (tokens,):
        raise ValueError(f"head_dim must be even and slots/positions [T={tokens}], got {head_dim}, "
                         f"{tuple(slots.shape)}, {tuple(positions.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("q, k, v, cos, sin and the caches must be contiguous in their last dim")
    if cos.stride(0) != sin.stride(0) or k_cache.stride() != v_cache.stride():
        raise ValueError("cos and sin (and the two caches) must share strides")
    q_out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    half = head_dim // 2
    _rope_cache_kernel[(tokens,)](
        q, k, v, cos, sin, slots, positions,
        q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=heads, NUM_KV_HEADS=k.shape[1], HALF=half,
        BLOCK_H=triton.next_power_of_2(max(heads, k.shape[1])), BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4 if q.is_cuda else 1, **launch_args(q),
    )
    return q_out
