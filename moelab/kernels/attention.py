"""Decode attention over the slot KV cache: one query per sequence, keys up to its length.

Built in notebooks/08_cuda_graphs_and_decode_attention. A decode step has one query token
per running sequence; sequence b lives in cache slot `slots[b]` and has `lengths[b]` keys
(the token just written included). SDPA over the cache reads every slot's whole
`max_seq_len` row and masks the tail: at 64 slots of 2048 positions that is about 26 GB per
step for Qwen1.5-MoE, as much as the weights. This kernel stops at each sequence's length,
so the cache costs what it holds, not what it reserves.

Program (b, kv_head, split) loads the GROUP = heads / kv_heads query heads that share its
KV head, walks its part of the keys in blocks of BLOCK_N with an fp32 online softmax
(running max, running sum, rescaled accumulator), and reads each key and value once for
the whole group. The lengths are read from device memory inside the kernel and the grid
depends only on B and the shapes, so the launch needs no host sync and a CUDA graph can
replay it while the lengths change.

Split-K (flash-decoding): when B * kv_heads programs are too few to fill the GPU and the
sequences are long, NUM_SPLITS programs share one sequence's keys (each takes an equal,
BLOCK_N-aligned share of its actual length) and write a partial (max, sum, accumulator);
a second small kernel merges the partials. With NUM_SPLITS = 1 the first kernel writes
the output itself.

`rope_decode_attention` (notebook 08, section 12) is what a decode step runs: the same scan with
the step's rotary and cache write folded in (`moelab.kernels.rope_cache` does them apart for a
prefill), the new token's key and value taken from registers rather than read back.
"""

import os

import torch
import triton
import triton.language as tl

from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the GPU's native one


@triton.jit
def _scan_keys_grouped(q, k_base, v_base, start, end, stride_kn, stride_vn, d, d_ok,
                       BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of the G query rows q [G, D] over keys [start, end): (max, sum, acc)."""
    n = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + n
        n_ok = keys < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    return m, l, acc


@triton.jit
def _scan_keys_single(q, k_base, v_base, start, end, stride_kn, stride_vn, d, d_ok, BLOCK_N: tl.constexpr):
    """The same for one query row q [D] (no grouped heads): 2-D tiles only, which keeps the
    compiled kernel at about 60% of the grouped version's registers (sm_90, 64 keys)."""
    n = tl.arange(0, BLOCK_N)
    m = tl.max(tl.full([1], float("-inf"), dtype=tl.float32), axis=0)
    l = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    acc = tl.zeros([d.shape[0]], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + n
        n_ok = keys < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(n_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [N]
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        v = tl.load(v_base + keys[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    return m, l, acc


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr,
    max_seq_len, qk_scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kn,
    stride_vs, stride_vh, stride_vn,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    # Clamp to the cache: a length past max_seq_len can only be a caller's bug, and an
    # out-of-bounds read would be worse than attending over the whole row.
    length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), max_seq_len)
    # This split's share of the keys, aligned to whole blocks: [start, end).
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q_rows = q_ptr + b.to(tl.int64) * stride_qb
    k_base = k_ptr + slot * stride_ks + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head.to(tl.int64) * stride_vh
    # Load in the input dtype, compute in fp32 (the interpreter's bf16 arithmetic is wrong).
    # The softmax scale and log2(e) are folded into q once.
    if BLOCK_G == 1:
        q = tl.load(q_rows + kv_head * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
        m1, l1, acc1 = _scan_keys_single(q, k_base, v_base, start, end, stride_kn, stride_vn, d, d_ok, BLOCK_N)
        m = tl.zeros([BLOCK_G], dtype=tl.float32) + m1
        l = tl.zeros([BLOCK_G], dtype=tl.float32) + l1
        acc = acc1[None, :]
    else:
        q_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        m, l, acc = _scan_keys_grouped(q * qk_scale, k_base, v_base, start, end, stride_kn, stride_vn, d, d_ok,
                                       BLOCK_G, BLOCK_N, BLOCK_D)
    let_next_kernel_start(USE_PDL)

    if NUM_SPLITS == 1:
        # length 0 (no keys): output 0 rather than 0 / 0.
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # Partials laid out [B, heads, NUM_SPLITS, ...]; an empty split leaves m = -inf, l = 0.
        row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # [G]
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=g_ok)
        tl.store(part_ml_ptr + row * 2 + 1, l, mask=g_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr,
    num_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    row = (b.to(tl.int64) * num_heads + head) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)  # no keys at all: weights stay 0
    w = tl.exp2(m - m_all)                                # empty splits: exp2(-inf) = 0
    total = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    let_next_kernel_start(USE_PDL)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_sm() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 / H200)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def choose_splits(batch: int, kv_heads: int, max_seq_len: int, sm_count: int | None) -> int:
    """Split-K factor from what the host knows without a sync: the batch, the heads, the
    cache's capacity and the SM count (None: not on a GPU, one split). Split only when
    B * kv_heads programs would leave most SMs idle and a row can hold long sequences;
    each split keeps at least 256 keys of capacity, at most 16 splits. The lengths
    themselves are on the device, so a short sequence in a long cache still pays the
    second (merge) kernel: `python -m moelab.bench attention` measures where this pays."""
    if sm_count is None:
        return 1
    programs = batch * kv_heads
    if 2 * programs > sm_count:
        return 1
    return max(1, min(16, sm_count // programs, max_seq_len // 256))


def launch_config(head_dim: int, group: int, on_gpu: bool) -> tuple[int, int]:
    """(keys per block, warps). On the GPU a block's fp32 [group, keys, head_dim] tile is
    kept near 4096 values: 32 keys at head_dim 128 and one query head per KV head
    (Qwen1.5-MoE), which compiles for sm_90 to about 125 registers a thread at 4 warps (64
    keys: about 240), so four programs share an SM. `python -m moelab.bench attention
    --sweep` times the alternatives. In the interpreter every block is a numpy call: big
    blocks, fewer iterations."""
    if not on_gpu:
        return 128, 4
    per_key = triton.next_power_of_2(group) * triton.next_power_of_2(head_dim)
    return max(16, min(128, 4096 // per_key)), 4


def _check_index_tensors(batch: int, named: dict) -> None:
    """The launchers' per-sequence index tensors (slots, lengths or positions): each [B], of integers."""
    if any(t.shape != (batch,) for t in named.values()):
        shapes = " and ".join(f"{name} {tuple(t.shape)}" for name, t in named.items())
        raise ValueError(f"{shapes} must be [B={batch}]")
    for name, t in named.items():
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_one_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _plan(q: torch.Tensor, kv_heads: int, max_seq_len: int, scale, num_splits, block_n, num_warps):
    """(group, num_splits, block_n, num_warps, block_d, scale * log2(e)) of a decode-attention
    launch: the caller's choices where given (num_splits checked), else `choose_splits`,
    `launch_config` and 1/sqrt(head_dim)."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    batch, heads, head_dim = q.shape
    group = heads // kv_heads
    default_n, default_w = launch_config(head_dim, group, q.is_cuda)
    if num_splits is None:
        num_splits = choose_splits(batch, kv_heads, max_seq_len, num_sm() if q.is_cuda else None) if batch else 1
    scale = head_dim ** -0.5 if scale is None else scale
    return (group, num_splits, block_n or default_n, num_warps or default_w, triton.next_power_of_2(head_dim),
            scale * _LOG2E)


def _partials(out: torch.Tensor, num_splits: int, block_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (accumulators, (max, sum) pairs) for split-K partials of out [B, heads, D]; with one
    split, `out` twice (the kernel writes `out` itself and never touches them)."""
    if num_splits == 1:
        return out, out
    rows = out.shape[0] * out.shape[1] * num_splits
    return (torch.empty(rows, block_d, dtype=torch.float32, device=out.device),
            torch.empty(rows, 2, dtype=torch.float32, device=out.device))


def _merge(part_acc: torch.Tensor, part_ml: torch.Tensor, out: torch.Tensor, num_splits: int, block_d: int) -> None:
    """The split-K partials merged into out [B, heads, D] (`_merge_splits_kernel`)."""
    batch, heads, head_dim = out.shape
    _merge_splits_kernel[(batch, heads)](
        part_acc, part_ml, out, heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=block_d, num_warps=1 if out.is_cuda else 4, **launch_args(out),
    )


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per sequence, over its slot's first keys.

    q [B, heads, head_dim]; k_cache, v_cache [slots, kv_heads, max_seq_len, head_dim] (one
    layer of `moelab.KVCache`); slots int [B]: each query's cache slot; lengths int [B] on
    the device: how many keys query b attends to (the token just written included; clamped
    to max_seq_len; 0 gives a zero output). heads must be a multiple of kv_heads (grouped
    query heads share a KV head). scale defaults to 1/sqrt(head_dim). num_splits: split-K
    factor, None picks `choose_splits`. Returns [B, heads, head_dim] in q's dtype.
    Shapes are checked on the host; slot and length values are not (that would sync).
    """
    for name, t, dim in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                         ("slots", slots, 1), ("lengths", lengths, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    batch, heads, head_dim = q.shape
    num_slots, kv_heads, max_seq_len, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if cache_dim != head_dim:
        raise ValueError(f"q's head_dim {head_dim} differs from the cache's {cache_dim}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    _check_index_tensors(batch, {"slots": slots, "lengths": lengths})
    if not q.dtype.is_floating_point or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one float dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    _check_one_device(q, k_cache, v_cache, slots, lengths)
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    group, num_splits, block_n, num_warps, block_d, qk_scale = _plan(q, kv_heads, max_seq_len, scale, num_splits,
                                                                     block_n, num_warps)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    part_acc, part_ml = _partials(out, num_splits, block_d)
    _decode_attention_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, slots, lengths,
        out, part_acc, part_ml,
        max_seq_len, qk_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, **launch_args(q),
    )
    if num_splits > 1:
        _merge(part_acc, part_ml, out, num_splits, block_d)
    return out


# ---------------------------------------------------------------------------- rotary + cache write + attention

# MOELAB_ROPE_ATTENTION=0: decode runs `rope_and_cache_write` and `decode_attention` as two kernels, as
# before `rope_decode_attention` (comparisons). On an H100, six alternating rounds of the batch-1 step
# (benchmarks/results/rope_attention_ab_run2_2026-12-07_h100.json): NF4 1.597 -> 1.570 ms, bf16 2.216 ->
# 2.206 (medians); at batch 64, three rounds (rope_attention_ab_2026-12-07_h100.json), 24.38 -> 24.03 and
# 11.33 -> 11.21 ms.
FUSE_ROPE = os.environ.get("MOELAB_ROPE_ATTENTION", "1") != "0"


@triton.jit
def _rotated(row_ptr, d, partner, d_ok, cos, sin_signed):
    """x[d] cos[d] + sign(d) x[partner(d)] sin[d] of one head's row (float32): transformers'
    rotate_half convention, the partner of dim d being d +- head_dim / 2."""
    x = tl.load(row_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    x_partner = tl.load(row_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)
    return x * cos + x_partner * sin_signed


@triton.jit
def _rope_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, positions_ptr,
    k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    max_seq_len, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb,
    stride_cs, stride_ch, stride_cn, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Program (b, kv_head, split) of `rope_decode_attention`: rotate the GROUP query heads of
    sequence b; if this split holds the new token's position, rotate its key, write key and value
    into the cache and fold them into the softmax from registers; scan the cached keys of its
    share below the position; then write the output (one split) or its partial for
    `_merge_splits_kernel` (an empty split's: m = -inf, l = 0, acc = 0)."""
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    # The new token's position; one past the cache can only be a caller's bug: clamp rather than
    # write out of bounds.
    position = tl.minimum(tl.load(positions_ptr + b).to(tl.int32), max_seq_len - 1)
    length = position + 1
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    if NUM_SPLITS > 1 and start >= length:  # an empty split's partial for the merge kernel
        g = tl.arange(0, BLOCK_G)
        row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + kv_head * GROUP + g) * NUM_SPLITS + split
        tl.store(part_ml_ptr + row * 2, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g < GROUP)
        tl.store(part_ml_ptr + row * 2 + 1, tl.zeros([BLOCK_G], tl.float32), mask=g < GROUP)
        d = tl.arange(0, BLOCK_D)  # and its accumulator: 0 x garbage could be NaN
        tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], tl.zeros([BLOCK_G, BLOCK_D], tl.float32),
                 mask=(g < GROUP)[:, None])
    if start < length:  # a split past the sequence's keys has nothing to do
        end = tl.minimum(start + chunk, length)
        HALF: tl.constexpr = HEAD_DIM // 2
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        cos = tl.load(cos_ptr + b.to(tl.int64) * stride_cb + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b.to(tl.int64) * stride_cb + d, mask=d_ok, other=0.0).to(tl.float32)
        sin_signed = tl.where(d < HALF, -sin, sin)
        # The new key and value, rounded to the cache's dtype as the cache holds them.
        k_new = _rotated(k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh, d, partner, d_ok, cos,
                         sin_signed).to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh + d, mask=d_ok,
                        other=0.0).to(v_cache_ptr.dtype.element_ty)
        k_base = k_cache_ptr + slot * stride_cs + kv_head.to(tl.int64) * stride_ch
        v_base = v_cache_ptr + slot * stride_cs + kv_head.to(tl.int64) * stride_ch
        has_new = end == length  # this split's share ends with the new token
        if has_new:
            tl.store(k_base + position.to(tl.int64) * stride_cn + d, k_new, mask=d_ok)
            tl.store(v_base + position.to(tl.int64) * stride_cn + d, v_new, mask=d_ok)
        scan_end = tl.minimum(end, position)  # cached keys only: the new one comes from registers
        g = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        q_rows = q_ptr + b.to(tl.int64) * stride_qb
        # q rotated, rounded to its dtype (as the separate rotary kernel stores it), then scaled
        # by softmax scale * log2(e) once.
        if BLOCK_G == 1:
            q1 = _rotated(q_rows + kv_head * stride_qh, d, partner, d_ok, cos, sin_signed)
            q1 = q1.to(q_ptr.dtype.element_ty).to(tl.float32) * qk_scale
            m1, l1, acc1 = _scan_keys_single(q1, k_base, v_base, start, scan_end, stride_cn, stride_cn, d, d_ok,
                                             BLOCK_N)
            m = tl.zeros([BLOCK_G], dtype=tl.float32) + m1
            l = tl.zeros([BLOCK_G], dtype=tl.float32) + l1
            acc = acc1[None, :]
            q = q1[None, :]
        else:
            q_mask = g_ok[:, None] & d_ok[None, :]
            q_heads = q_rows + heads[:, None] * stride_qh
            qa = tl.load(q_heads + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
            qb = tl.load(q_heads + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
            q = qa * cos[None, :] + qb * sin_signed[None, :]
            q = q.to(q_ptr.dtype.element_ty).to(tl.float32) * qk_scale
            m, l, acc = _scan_keys_grouped(q, k_base, v_base, start, scan_end, stride_cn, stride_cn, d, d_ok,
                                           BLOCK_G, BLOCK_N, BLOCK_D)
        # The new key, one more step of the online softmax (a no-op where this split lacks it).
        s_new = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1)  # [G]
        s_new = tl.where(has_new, s_new, float("-inf"))
        m_new = tl.maximum(m, s_new)  # finite: the split holds a cached key or the new one
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s_new - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new
        let_next_kernel_start(USE_PDL)

        o_mask = g_ok[:, None] & d_ok[None, :]
        if NUM_SPLITS == 1:
            o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:  # partials [B, heads, NUM_SPLITS, ...], as decode_attention's
            row = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split  # [G]
            tl.store(part_acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ml_ptr + row * 2, m, mask=g_ok)
            tl.store(part_ml_ptr + row * 2 + 1, l, mask=g_ok)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                          scale: float | None = None, num_splits: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    """One decode step's attention with its rotary and cache write: `rope_and_cache_write` then
    `decode_attention` over keys 0..positions[b], in one launch (no rotated q in memory, the new
    key and value taken from registers), then with split-K the same merge kernel.

    q [B, heads, D], k and v [B, kv_heads, D] (the new token's projections, any token and head
    strides, contiguous in D); cos, sin [B, D]; k_cache, v_cache one layer of `moelab.KVCache`
    [slots, kv_heads, max_seq_len, D]; slots, positions int [B] on the device (sequence b's new
    token goes to position positions[b] of slot slots[b] and attends to keys 0..positions[b]).
    Returns [B, heads, D] in q's dtype; the caches are written in place."""
    for name, t, dim in (("q", q, 3), ("k", k, 3), ("v", v, 3), ("cos", cos, 2), ("sin", sin, 2),
                         ("k_cache", k_cache, 4), ("v_cache", v_cache, 4), ("slots", slots, 1),
                         ("positions", positions, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    batch, heads, head_dim = q.shape
    num_slots, kv_heads, max_seq_len, cache_dim = k_cache.shape
    if k.shape != (batch, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={batch}, kv_heads={kv_heads}, "
                         f"{head_dim}]")
    if v_cache.shape != k_cache.shape or cache_dim != head_dim or k_cache.stride() != v_cache.stride():
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if heads % kv_heads or head_dim % 2:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}) and head_dim ({head_dim}) even")
    if cos.shape != (batch, head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [B={batch}, {head_dim}] "
                         "with the same strides")
    _check_index_tensors(batch, {"slots": slots, "positions": positions})
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q, k, v must share one float dtype and the caches another, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    _check_one_device(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("q, k, v, cos, sin and the caches must be contiguous in their last dim")
    group, num_splits, block_n, num_warps, block_d, qk_scale = _plan(q, kv_heads, max_seq_len, scale, num_splits,
                                                                     block_n, num_warps)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    part_acc, part_ml = _partials(out, num_splits, block_d)
    _rope_decode_attention_kernel[(batch, kv_heads, num_splits)](
        q, k, v, cos, sin, slots, positions,
        k_cache, v_cache, out, part_acc, part_ml,
        max_seq_len, qk_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, **launch_args(q),
    )
    if num_splits > 1:
        _merge(part_acc, part_ml, out, num_splits, block_d)
    return out
