"""NF4 decode GEMVs that stream the 4-bit codes through shared memory (Gluon, cp.async).

Built in notebooks/05_fused_expert_kernel, section 10. The Triton NF4 decode kernels of
`moelab.kernels.experts` load a K-step of codes, wait for it, then spend as long again turning
it into products (the NF4 look-up and the bf16 arithmetic of `NF4_DOT_ASM`): with every
program of a launch resident at once and in step, the SMs alternate between waiting for HBM
and computing, and the two times add up. Reading the next K-steps ahead into registers does not
help: ptxas moves those loads back below the arithmetic (benchmarks/results/
sweep_nf4_readahead_2026-12-06_h100.json). Here each thread copies its own code words with
`cp.async` into a ring of STAGES shared-memory slots, STAGES - 1 K-steps ahead of the step it
multiplies: copies have no register to wait on, so nothing moves them, and the memory system
works while the arithmetic runs. Each thread reads back only the words it copied, in the layout
it copied them in.

The block absmax of every K-step (decoded from the 8-bit double quantisation) is worked out
once before the loop and kept in shared memory, so the dependent loads it takes (code, then
level) are not paid at every step. The arithmetic is `experts.NF4_DOT_ASM`, unchanged: the
same results as the Triton word path, bit for bit.

CUDA only (Gluon has no interpreter); `moelab.kernels.experts` picks these kernels for the NF4
word path where `supports()` says so and falls back to its Triton kernels otherwise.
"""

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .experts import NF4_DOT_ASM

# triton 3.6 names the cp.async copy async_copy_global_to_shared; 3.9 renamed it async_load.
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_DOT_ASM = gl.constexpr(NF4_DOT_ASM.value)
ENABLED = os.environ.get("MOELAB_NF4_STREAM", "1") != "0"  # 0: the Triton word path (for comparisons)


@gluon.jit
def _wait_for_previous_kernel(USE_PDL: gl.constexpr):
    """`pdl.wait_for_previous_kernel` for Gluon kernels."""
    if USE_PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _lut(nf4_code_ptr):
    """The 4 table words NF4_DOT_ASM takes in registers, one copy per lane (see experts._nf4_lut)."""
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [gl.program_id(0)], dtype=gl.int32,
                                     is_pure=True, pack=1)
    tab = nf4_code_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + 16 + 4 * lane
    return gl.load(tab), gl.load(tab + 1), gl.load(tab + 2), gl.load(tab + 3)


@gluon.jit
def _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert, blk, mask,
            absmax_per_expert, scales_per_expert, DOUBLE_QUANT: gl.constexpr):
    """fp32 absmax of NF4 blocks `blk` of `expert` (experts._nf4_absmax in Gluon)."""
    q = gl.load(absmax_ptr + expert.to(gl.int64) * absmax_per_expert + blk, mask=mask, other=0)
    if DOUBLE_QUANT:
        scale = gl.load(absmax_scale_ptr + expert.to(gl.int64) * scales_per_expert + blk // 256, mask=mask, other=0.0)
        offset = gl.load(absmax_offset_ptr + expert)
        am = gl.load(absmax_code_ptr + q.to(gl.int32), mask=mask, other=0.0) * scale + offset
        return gl.where(mask, am, 0.0)
    return q.to(gl.float32)


@gluon.jit
def _tile_offsets(BLOCK_N: gl.constexpr, NB: gl.constexpr, LAYOUT: gl.constexpr):
    """Index vectors of a [BLOCK_N, NB, 8] word tile: rows, 64-blocks and words, each in the
    slice of LAYOUT that expands back to it, plus the [NB, 8] pair offsets of x."""
    L_AM: gl.constexpr = gl.SliceLayout(2, LAYOUT)
    L_X: gl.constexpr = gl.SliceLayout(0, LAYOUT)
    r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L_AM))
    b = gl.arange(0, NB, layout=gl.SliceLayout(0, L_AM))
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, L_X))
    xb = gl.arange(0, NB, layout=gl.SliceLayout(1, L_X))
    return r, b, j, xb


@gluon.jit
def _issue(slot, w_words, row_words, b, j, k0, k_end, row_ok):
    """cp.async one K-step of codes ([BLOCK_N, NB, 8] words from k0) into a ring slot; blocks at
    or past k_end are zero-filled without reading memory."""
    rw = gl.expand_dims(gl.expand_dims(row_words, 1), 2)
    bb = gl.expand_dims(gl.expand_dims(b, 0), 2)
    jj = gl.expand_dims(gl.expand_dims(j, 0), 0)
    ptrs = w_words + (rw + (k0 // 8 + 8 * bb + jj))
    ok = gl.expand_dims(gl.expand_dims(row_ok, 1), 2) & ((k0 + 64 * bb) < k_end)
    _async_load(slot, ptrs, mask=ok)


@gluon.jit
def _dot_step(acc, words, x_pairs, k0, k_end, xb, j, am, lut):
    """acc + the products of one K-step: each word's 8 levels times its 4 bf16 pairs of x, scaled
    by its block's absmax, in NF4_DOT_ASM."""
    off = k0 // 2 + 32 * gl.expand_dims(xb, 1) + 4 * gl.expand_dims(j, 0)
    ok = gl.expand_dims((k0 + 64 * xb) < k_end, 1)
    x0 = gl.expand_dims(gl.load(x_pairs + off, mask=ok, other=0), 0)
    x1 = gl.expand_dims(gl.load(x_pairs + off + 1, mask=ok, other=0), 0)
    x2 = gl.expand_dims(gl.load(x_pairs + off + 2, mask=ok, other=0), 0)
    x3 = gl.expand_dims(gl.load(x_pairs + off + 3, mask=ok, other=0), 0)
    return gl.inline_asm_elementwise(_DOT_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r",
                                     [words, x0, x1, x2, x3, lut[0], lut[1], lut[2], lut[3],
                                      gl.expand_dims(am, 2), acc],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, act_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    n_out, k_dim, num_experts, top_k,
    stride_xm, stride_we, stride_am, absmax_per_expert, scales_per_expert,
    DOUBLE_QUANT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
    K_STEPS: gl.constexpr, LAYOUT: gl.constexpr, USE_PDL: gl.constexpr,
):
    """act[pair, n] = SiLU(gate) * up for one (pair, N-tile), as experts._gemv_gate_up_kernel
    (no shared expert): gate rows n and up rows n + n_out of the pair's expert, streamed."""
    _wait_for_previous_kernel(USE_PDL)
    NB: gl.constexpr = BLOCK_K // 64
    L_AM: gl.constexpr = gl.SliceLayout(2, LAYOUT)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])  # per slot: plain row-major
    SMEM_AM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    pid = gl.program_id(0)
    n_tiles = gl.cdiv(n_out, BLOCK_N)
    pair = pid // n_tiles
    r, b, j, xb = _tile_offsets(BLOCK_N, NB, LAYOUT)
    n = (pid % n_tiles) * BLOCK_N + r
    n_ok = n < n_out
    expert = gl.load(ids_ptr + pair).to(gl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    expert = gl.where(valid, expert, 0)
    k_end = gl.where(valid, k_dim, 0)
    w_words = (w_ptr + expert.to(gl.int64) * stride_we).to(gl.pointer_type(gl.int32), bitcast=True)
    x_pairs = (x_ptr + (pair // top_k).to(gl.int64) * stride_xm).to(gl.pointer_type(gl.int32), bitcast=True)
    words_per_row = k_dim // 8
    gate_words = gl.multiple_of(n.to(gl.int64) * words_per_row, 8)          # rows start on 32-byte boundaries
    up_words = gl.multiple_of((n + n_out).to(gl.int64) * words_per_row, 8)

    ring_g = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, NB, 8], SMEM)
    ring_u = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, NB, 8], SMEM)
    for s in gl.static_range(STAGES - 1):
        _issue(ring_g.index(s), w_words, gate_words, b, j, s * BLOCK_K, k_end, n_ok)
        _issue(ring_u.index(s), w_words, up_words, b, j, s * BLOCK_K, k_end, n_ok)
        async_copy.commit_group()

    # Every K-step's absmax, decoded once while the first copies are in flight.
    am_g = gl.allocate_shared_memory(gl.float32, [K_STEPS, BLOCK_N, NB], SMEM_AM)
    am_u = gl.allocate_shared_memory(gl.float32, [K_STEPS, BLOCK_N, NB], SMEM_AM)
    blk_g = gl.expand_dims(n.to(gl.int64) * (k_dim // 64), 1) + gl.expand_dims(b, 0)
    blk_u = gl.expand_dims((n + n_out).to(gl.int64) * (k_dim // 64), 1) + gl.expand_dims(b, 0)
    for s in gl.static_range(K_STEPS):
        ok = gl.expand_dims(n_ok, 1) & gl.expand_dims(s * BLOCK_K + 64 * b < k_end, 0)
        am_g.index(s).store(_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                                    blk_g + s * NB, ok, absmax_per_expert, scales_per_expert, DOUBLE_QUANT))
        am_u.index(s).store(_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                                    blk_u + s * NB, ok, absmax_per_expert, scales_per_expert, DOUBLE_QUANT))
    lut = _lut(nf4_code_ptr)

    acc_g = gl.zeros([BLOCK_N, NB, 8], gl.float32, LAYOUT)
    acc_u = gl.zeros([BLOCK_N, NB, 8], gl.float32, LAYOUT)
    for i in range(gl.cdiv(k_end, BLOCK_K)):
        ahead = i + STAGES - 1
        _issue(ring_g.index(ahead % STAGES), w_words, gate_words, b, j, ahead * BLOCK_K, k_end, n_ok)
        _issue(ring_u.index(ahead % STAGES), w_words, up_words, b, j, ahead * BLOCK_K, k_end, n_ok)
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)  # this thread's copies of step i have landed
        k0 = i * BLOCK_K
        acc_g = _dot_step(acc_g, ring_g.index(i % STAGES).load(LAYOUT), x_pairs, k0, k_end, xb, j,
                          am_g.index(i).load(L_AM), lut)
        acc_u = _dot_step(acc_u, ring_u.index(i % STAGES).load(LAYOUT), x_pairs, k0, k_end, xb, j,
                          am_u.index(i).load(L_AM), lut)
    async_copy.wait_group(0)
    gate = gl.sum(gl.sum(acc_g, axis=2), axis=1)
    up = gl.sum(gl.sum(acc_u, axis=2), axis=1)
    out = gate / (1.0 + gl.exp(-gate)) * up
    gl.store(act_ptr + pair.to(gl.int64) * stride_am + n, out.to(act_ptr.dtype.element_ty), mask=n_ok)


@gluon.jit
def _down_kernel(
    act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    n_out, k_dim, num_experts,
    stride_am, stride_we, stride_om, absmax_per_expert, scales_per_expert,
    TOP_K: gl.constexpr, DOUBLE_QUANT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr, K_STEPS: gl.constexpr, AM_SLOTS: gl.constexpr, LAYOUT: gl.constexpr,
    USE_PDL: gl.constexpr,
):
    """out[t, n] = sum_k route_w[t, k] * (W_down[ids[t, k]] @ act[t * K + k])[n] for one (token,
    N-tile), as experts._gemv_down_kernel (no shared expert): the top-k experts' K-steps are one
    stream of TOP_K * K_STEPS steps through the ring, so copies run ahead across experts too."""
    _wait_for_previous_kernel(USE_PDL)
    NB: gl.constexpr = BLOCK_K // 64
    L_AM: gl.constexpr = gl.SliceLayout(2, LAYOUT)
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])  # per slot: plain row-major
    SMEM_AM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    pid = gl.program_id(0)
    n_tiles = gl.cdiv(n_out, BLOCK_N)
    token = pid // n_tiles
    r, b, j, xb = _tile_offsets(BLOCK_N, NB, LAYOUT)
    n = (pid % n_tiles) * BLOCK_N + r
    n_ok = n < n_out
    words_per_row = k_dim // 8
    row_words = gl.multiple_of(n.to(gl.int64) * words_per_row, 8)
    steps = gl.cdiv(k_dim, BLOCK_K)  # per expert
    ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, NB, 8], SMEM)

    for s in gl.static_range(STAGES - 1):
        first_k = s // steps
        e = gl.load(ids_ptr + token.to(gl.int64) * TOP_K + gl.minimum(first_k, TOP_K - 1)).to(gl.int32)
        ok_e = (e >= 0) & (e < num_experts) & (first_k < TOP_K)
        w_words = (w_ptr + gl.where(ok_e, e, 0).to(gl.int64) * stride_we).to(gl.pointer_type(gl.int32), bitcast=True)
        _issue(ring.index(s), w_words, row_words, b, j, (s % steps) * BLOCK_K, gl.where(ok_e, k_dim, 0), n_ok)
        async_copy.commit_group()

    # Every (expert, K-step)'s absmax times the routing weight, decoded once.
    am_s = gl.allocate_shared_memory(gl.float32, [AM_SLOTS, BLOCK_N, NB], SMEM_AM)
    for k in gl.static_range(TOP_K):
        e = gl.load(ids_ptr + token.to(gl.int64) * TOP_K + k).to(gl.int32)
        ok_e = (e >= 0) & (e < num_experts)
        e = gl.where(ok_e, e, 0)
        route_w = gl.load(route_w_ptr + token.to(gl.int64) * TOP_K + k).to(out_ptr.dtype.element_ty).to(gl.float32)
        blk = gl.expand_dims(n.to(gl.int64) * (k_dim // 64), 1) + gl.expand_dims(b, 0)
        for s in gl.static_range(K_STEPS):
            ok = gl.expand_dims(n_ok, 1) & gl.expand_dims(s * BLOCK_K + 64 * b < gl.where(ok_e, k_dim, 0), 0)
            am = _absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, e, blk + s * NB, ok,
                         absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
            am_s.index(k * K_STEPS + s).store(am * route_w)
    lut = _lut(nf4_code_ptr)

    acc = gl.zeros([BLOCK_N, NB, 8], gl.float32, LAYOUT)
    for g in range(TOP_K * steps):
        ahead = g + STAGES - 1
        slot_k = ahead // steps
        e = gl.load(ids_ptr + token.to(gl.int64) * TOP_K + gl.minimum(slot_k, TOP_K - 1)).to(gl.int32)
        ok_e = (e >= 0) & (e < num_experts) & (slot_k < TOP_K)
        w_words = (w_ptr + gl.where(ok_e, e, 0).to(gl.int64) * stride_we).to(gl.pointer_type(gl.int32), bitcast=True)
        _issue(ring.index(ahead % STAGES), w_words, row_words, b, j, (ahead % steps) * BLOCK_K,
               gl.where(ok_e, k_dim, 0), n_ok)
        async_copy.commit_group()
        async_copy.wait_group(STAGES - 1)
        top = g // steps
        step = g % steps
        x_pairs = (act_ptr + (token.to(gl.int64) * TOP_K + top) * stride_am).to(gl.pointer_type(gl.int32),
                                                                                bitcast=True)
        acc = _dot_step(acc, ring.index(g % STAGES).load(LAYOUT), x_pairs, step * BLOCK_K, k_dim, xb, j,
                        am_s.index(top * K_STEPS + step).load(L_AM), lut)
    async_copy.wait_group(0)
    total = gl.sum(gl.sum(acc, axis=2), axis=1)
    gl.store(out_ptr + token.to(gl.int64) * stride_om + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


@functools.lru_cache(maxsize=None)
def tile_layout(block_n: int, nb: int, num_warps: int):
    """The [block_n, nb, 8] word tile's layout: 4 words (16 bytes) per thread, a block's 8 words
    over 2 threads, then blocks, then rows across the warp; warps over rows."""
    t1 = min(nb, 16)
    t0 = 32 // (2 * t1)
    w0 = max(1, min(num_warps, block_n // t0))
    w1 = num_warps // w0
    return gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[t0, t1, 2],
                            warps_per_cta=[w0, w1, 1], order=[2, 1, 0])


def supports(x: torch.Tensor, w) -> bool:
    """Whether these kernels take this NF4 decode: an NVIDIA GPU of sm_80 or newer (cp.async),
    rows of whole 64-value blocks."""
    return (x.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(x.device)[0] >= 8
            and w.shape[-1] % 64 == 0)


DEFAULT_CONFIG = dict(BLOCK_N=8, BLOCK_K=512, STAGES=4)


def _launch_config(w, config: dict | None) -> dict:
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    nb = cfg["BLOCK_K"] // 64
    num_warps = max(1, cfg["BLOCK_N"] * nb * 2 // 32)  # 4 words per thread, no thread idle or doubled
    k_steps = triton.cdiv(w.shape[-1], cfg["BLOCK_K"])
    return dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], STAGES=cfg["STAGES"], K_STEPS=k_steps,
                LAYOUT=tile_layout(cfg["BLOCK_N"], nb, num_warps), num_warps=num_warps)


def gate_up(x: torch.Tensor, w, ids: torch.Tensor, act: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """act[p] = SiLU(x[p // K] @ gate[ids[p]].T) * (x[p // K] @ up[ids[p]].T) for the flat ids
    [P] (K = P / tokens), w an NF4Tensor [E, 2I, H] (gate rows, then up rows)."""
    from .experts import _weight_args
    from .pdl import launch_args

    num_experts, rows, k_dim = w.shape
    n_out = rows // 2
    cfg = _launch_config(w, config)
    cfg["K_STEPS"] = triton.next_power_of_2(cfg["K_STEPS"])
    ptrs, strides, flags = _weight_args(w, num_experts)
    _gate_up_kernel[(ids.numel() * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        x, ptrs[0], ids, act, *ptrs[1:], n_out, k_dim, num_experts, ids.numel() // x.shape[0],
        x.stride(0), strides[0], act.stride(0), strides[3], strides[4],
        DOUBLE_QUANT=flags["DOUBLE_QUANT"], **cfg, **launch_args(x))
    return act


def down(act: torch.Tensor, w, ids: torch.Tensor, route_w: torch.Tensor, out: torch.Tensor,
         config: dict | None = None) -> torch.Tensor:
    """out[t] = sum_k route_w[t, k] * act[t * K + k] @ down[ids[t, k]].T, ids and route_w [T, K],
    w an NF4Tensor [E, H, I]."""
    from .experts import _weight_args
    from .pdl import launch_args

    num_experts, n_out, k_dim = w.shape
    num_tokens, top_k = ids.shape
    cfg = _launch_config(w, config)
    am_slots = triton.next_power_of_2(top_k * cfg["K_STEPS"])
    ptrs, strides, flags = _weight_args(w, num_experts)
    _down_kernel[(num_tokens * triton.cdiv(n_out, cfg["BLOCK_N"]),)](
        act, ptrs[0], ids, route_w, out, *ptrs[1:], n_out, k_dim, num_experts,
        act.stride(0), strides[0], out.stride(0), strides[3], strides[4],
        TOP_K=top_k, DOUBLE_QUANT=flags["DOUBLE_QUANT"], AM_SLOTS=am_slots, **cfg, **launch_args(act))
    return out
