"""NF4 experts on the tensor cores for a few tokens per expert: a prefill's or a batch's routed experts.

Built in notebooks/05_fused_expert_kernel (section 14). Between one token (the decode GEMVs of
`experts`) and long prefills (dequantize once, then the dense grouped GEMM) sit 2 to 64 tokens:
a short prompt, or a batch of decoding requests. There each touched expert meets a handful of
tokens, and both earlier NF4 paths pay for it: the GEMVs read and decode an expert's codes once
per (token, expert) pair; the grouped GEMM decodes each tile into `tl.dot` operands, which its
16-row NF4 kernel (compiled for sm_90) stages through shared memory behind barriers before its
`mma.sync`.

Here the pairs are grouped by expert on the device (`experts.align_by_expert`), and each program
takes a block of up to 8 pairs of one expert and 16 x WARPS output rows, one 16-row tile per
warp, over all of K. Per 64-value NF4 block a warp loads its tile's codes once, turns each code
byte into a bf16 level pair with one look-up in the shared-memory pair table
(`experts.nf4_pair_table`), and four `mma.sync.aligned.m16n8k16` multiply the 16 weight rows by
the block's x of all 8 pairs at once: the weights are the MMA's A operand, the 8 tokens its 8
columns of B. The look-ups are paid once for up to 8 tokens.

The PTX ISA fixes which lane holds what: lane l = 4g + t holds rows g and g + 8 of A at K slots
2t, 2t + 1 and 2t + 8, 2t + 9, column g of B at the same slots, and of the result rows g, g + 8
at columns 2t, 2t + 1. A dot product does not care in which order its K runs, so the slots may
mean any values of K as long as A and B agree: in step s (0-3) of a block, lane t's slots hold
values 16t + 4s .. 16t + 4s + 3 (`BLOCK_STEPS`). Lane t then reads 8 contiguous code bytes of each
of its two rows per block (one 8-byte load; the package's NF4 format as it is, no repacking) and
16 contiguous values of x of its column's token, and each code byte is one A register. The four
steps stay inside one block, so the block's absmax scales its sum once, in float32.
tests/test_nf4_mma.py checks that mapping on the CPU, lane by lane, against the ISA's layout.

`experts.fused_experts_forward` takes this path on CUDA from 8 tokens at top-4
(`experts.NF4_MMA_FROM_PAIRS`): at 2-4 tokens it measured slower, most blocks holding a single
pair, so 7 of B's 8 columns go empty. CUDA only (inline PTX; the interpreter keeps the other NF4
paths).

`linear` runs the same tile against a dense NF4 weight (one "expert", every token routed to it): a
prefill's or a decode batch's q/k/v, o_proj and shared expert (5 to LINEAR_MAX_TOKENS tokens), which
`moelab.model` otherwise dequantizes into a bf16 copy for cuBLAS (0.5 byte a weight read, 2 written,
2 read again). Its programs take 8 or 16 tokens (`_mma_block_asm(2)`: each look-up of a step feeds
two MMAs, one per group of 8 columns), and the programs of one row tile are neighbours in the grid,
so after the first token block the codes come from L2. The epilogue adds a bias, or applies
SiLU(gate) * up, or (a shared expert's down) adds sigmoid(gate logit) times the result into the
routed experts' output. A dense weight has few row tiles (o_proj: 32 of 64 rows), and a warp keeps
one block of codes in flight, so with few tokens K is split (`linear_splits`): each share's
programs write float32 partials that a second launch sums, in split order, before the epilogue.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .experts import _block_rows, _nf4_absmax, _nf4_lut, _weight_args

ENABLED = os.environ.get("MOELAB_NF4_MMA", "1") != "0"  # MOELAB_NF4_MMA=0: the previous NF4 paths (comparisons)
WARPS = 4  # warps per program: 4 tiles of 16 rows, one shared-memory table
# Up to this many tokens `moelab.model` runs a CUDA NF4 linear above the GEMV's few tokens as `linear`
# (and `experts.fused_experts_forward` a shared expert behind its grouped kernels); 0 keeps the earlier
# paths (dequantize then cuBLAS; the shared expert through the GEMVs; MOELAB_NF4_MMA_LINEAR_MAX_TOKENS=0).
# On one H100 (2026-12-07, nf4_mma_linear_ab_split_2026-12-07_h100.json, K then split below 4 programs an
# SM) NF4 prefills of 16 / 32 / 48 / 64 tokens went from 6.36 / 6.98 / 8.13 / 8.60 to 4.67 / 5.54 / 7.30 /
# 8.69 ms and the decode step at batch 16 / 64 from 10.45 / 24.04 to 6.45 / 10.08 ms. Its first version, without split-K, was slower.
LINEAR_MAX_TOKENS = int(os.environ.get("MOELAB_NF4_MMA_LINEAR_MAX_TOKENS", "64"))
SPLIT_PROGRAMS_PER_SM = 4  # see linear_splits
# Split K only below this many programs per SM (linear_splits). Of 1, 2 and 4, alternating on one H100
# (nf4_linear_split_ab_2026-12-07_h100.json), 2 was never more than 0.3 ms from the best prefill: 1 left
# the 32-token prefill at 6.02 ms (2: 5.59), 4 took the 64-token one to 8.70 (2: 8.25-8.29).
SPLIT_BELOW_PROGRAMS_PER_SM = float(os.environ.get("MOELAB_NF4_MMA_SPLIT_BELOW", "2"))
SPLIT_MIN_BLOCKS = 4

# Step s of a 64-value block: A register -> (row half, code byte of the lane's 8); B registers ->
# (x pair of the lane's 8). Lane t's 8 code bytes of a row hold values 16t .. 16t + 15 of the block
# (byte j: values 16t + 2j, 16t + 2j + 1), its 8 x pairs the same values.
# A register 0: row g, slots 2t, 2t+1; 1: row g+8, same slots; 2: row g, slots 2t+8, 2t+9; 3: row g+8.
# Slots (2t, 2t+1) mean values 16t + 4s + (0, 1): byte 2s; slots (2t+8, 2t+9) values 16t + 4s + (2, 3): byte 2s + 1.
BLOCK_STEPS = tuple(
    {"a": ((0, 2 * s), (1, 2 * s), (0, 2 * s + 1), (1, 2 * s + 1)), "b": (2 * s, 2 * s + 1)} for s in range(4)
)


def _mma_block_asm(nb: int = 1) -> str:
    """PTX for one lane's share of a 16-row x 64-value NF4 block times nb groups of 8 columns of x:
    $0-$3 = $13-$16 + the block's products (rows g, g, g + 8, g + 8 at columns 2t, 2t + 1),
    rows g scaled by $11, rows g + 8 by $12 (their absmax).

    $4, $5: the lane's 8 code bytes of rows g and g + 8 (64-bit); $6-$9: the 8 bf16 pairs of x of
    column g's token, two per 64-bit register; $10: the lane's address in the shared pair table
    (`experts._nf4_lut`: entry e at byte 128 e from it).

    With nb > 1 (`linear`: a dense weight against 8 nb tokens) each look-up of a step feeds nb
    MMAs, one per column group c: outputs $4c-$4c+3, code words $4nb, $4nb+1, group c's x pairs
    $4nb+2+4c .. +3, table address $8nb+2, scales $8nb+3, $8nb+4, accumulators $8nb+5+4c .. +3."""
    code, x_at, tbl, scale, acc_at = 4 * nb, 4 * nb + 2, 8 * nb + 2, 8 * nb + 3, 8 * nb + 5
    lines = [".reg .b32 w<4>, x<2>, t, q, a<4>;", f".reg .f32 d<{4 * nb}>, z, sg, sh, c<{4 * nb}>;",
             "mov.f32 z, 0f00000000;", f"mov.b64 {{w0, w1}}, ${code};", f"mov.b64 {{w2, w3}}, ${code + 1};"]
    for s, step in enumerate(BLOCK_STEPS):
        lines.append(f"mov.b64 {{x0, x1}}, ${x_at + s};")  # pairs 2s (low word) and 2s + 1 (high word)
        for reg, (half, byte) in enumerate(step["a"]):
            word = f"w{2 * half + byte // 4}"  # row g: w0 (bytes 0-3), w1 (4-7); row g + 8: w2, w3
            lines += [f"prmt.b32 t, {word}, 0, 0x444{byte % 4};", f"mad.lo.u32 q, t, 128, ${tbl};",
                      f"ld.shared.b32 a{reg}, [q];"]
        for c in range(nb):
            d = ", ".join(f"d{4 * c + i}" for i in range(4))
            if c:  # group 0's x moved in before the look-ups: the one-group PTX exactly as it was
                lines.append(f"mov.b64 {{x0, x1}}, ${x_at + 4 * c + s};")
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                         f"{{{d}}}, {{a0, a1, a2, a3}}, {{x0, x1}}, {{{'z, z, z, z' if s == 0 else d}}};")
    lines += [f"mov.b32 sg, ${scale};", f"mov.b32 sh, ${scale + 1};"]
    for i in range(4 * nb):
        lines += [f"mov.b32 c{i}, ${acc_at + i};", f"fma.rn.f32 c{i}, d{i}, {'sg' if i % 4 < 2 else 'sh'}, c{i};",
                  f"mov.b32 ${i}, c{i};"]
    return "{\n" + "\n".join(lines) + "\n}"


MMA_BLOCK_ASM = tl.constexpr(_mma_block_asm())
MMA_BLOCK2_ASM = tl.constexpr(_mma_block_asm(2))


@triton.jit
def _thread_ids(NT: tl.constexpr):
    """[NT] tensors (NT = the program's threads, one element each): each element's hardware lane
    and warp, read from the thread that holds it, as the MMA's fragments are per hardware lane.
    Not pure, like the MMA's asm, so that Triton never recomputes them in another layout (where
    an element sits in another thread). Nothing here sums across lanes; the one-token version
    (notebook 05, section 13) did, keyed on this lane, and Triton miscompiled that masked sum
    (every row's sum in row 0; on an H100, triton 3.6): a sum has to take the lane from the
    element's index."""
    idx = tl.arange(0, NT)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [idx], dtype=tl.int32, is_pure=False, pack=1)
    warp = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;\nshr.u32 $0, $0, 5;", "=r,r", [idx], dtype=tl.int32,
                                     is_pure=False, pack=1)
    return lane, warp


@triton.jit
def _block_mma(acc0, acc1, acc2, acc3, c_g, c_h, x0, x1, x2, x3, tbl, scale_g, scale_h):
    """The accumulators plus one block's scaled products (see `_mma_block_asm`)."""
    return tl.inline_asm_elementwise(MMA_BLOCK_ASM, "=r,=r,=r,=r,l,l,l,l,l,l,r,r,r,r,r,r,r",
                                     [c_g, c_h, x0, x1, x2, x3, tbl, scale_g, scale_h, acc0, acc1, acc2, acc3],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=False, pack=1)


@triton.jit
def _block_mma2(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, c_g, c_h, x0, x1, x2, x3, y0, y1, y2, y3, tbl,
                scale_g, scale_h):
    """`_block_mma` for two groups of 8 columns (x: the first, y: the second) sharing each look-up."""
    return tl.inline_asm_elementwise(
        MMA_BLOCK2_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,l,l,l,l,l,l,l,l,l,l,r,r,r,r,r,r,r,r,r,r,r",
        [c_g, c_h, x0, x1, x2, x3, y0, y1, y2, y3, tbl, scale_g, scale_h, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7],
        dtype=(tl.float32,) * 8, is_pure=False, pack=1)


@triton.jit
def _x_loads(x64, blk, t, num_blocks, col_ok):
    """The lane's 4 words of x (16 values of its column's token) of block blk (zeros past num_blocks)."""
    p = x64 + blk * 16 + 4 * t
    ok = (blk < num_blocks) & col_ok
    return (tl.load(p, mask=ok, other=0), tl.load(p + 1, mask=ok, other=0), tl.load(p + 2, mask=ok, other=0),
            tl.load(p + 3, mask=ok, other=0))


@triton.jit
def _block_loads(codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, blk, t,
                 num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr):
    """Block blk's inputs for rows row_g, row_g + 8 (zeros past num_blocks): the lane's code words
    of both rows, its 4 words of x (16 values of its column's token) and the rows' absmax."""
    ok = blk < num_blocks
    x0, x1, x2, x3 = _x_loads(x64, blk, t, num_blocks, col_ok)
    word = blk * 4 + t
    c_g = tl.load(codes + row_g.to(tl.int64) * (k_dim // 16) + word, mask=ok & ok_g, other=0)
    c_h = tl.load(codes + (row_g + 8).to(tl.int64) * (k_dim // 16) + word, mask=ok & ok_h, other=0)
    s_g = _nf4_absmax(am, am_code, am_scale, am_offset, expert, row_g * (k_dim // 64) + blk, ok & ok_g,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    s_h = _nf4_absmax(am, am_code, am_scale, am_offset, expert, (row_g + 8) * (k_dim // 64) + blk, ok & ok_h,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    return c_g, c_h, x0, x1, x2, x3, s_g, s_h


@triton.jit
def _tile_dot(codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, t, blk_lo,
              num_blocks, tbl, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr, NT: tl.constexpr):
    """One warp's 16-row tile over K blocks blk_lo .. num_blocks - 1 against its 8 columns: the
    lane's 4 float32 results. The next block's loads are issued before this block's MMAs
    (pipelined by hand)."""
    a0 = tl.zeros([NT], dtype=tl.float32)
    a1 = tl.zeros([NT], dtype=tl.float32)
    a2 = tl.zeros([NT], dtype=tl.float32)
    a3 = tl.zeros([NT], dtype=tl.float32)
    c_g, c_h, x0, x1, x2, x3, s_g, s_h = _block_loads(
        codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, blk_lo, t, num_blocks,
        absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    for blk in range(blk_lo, num_blocks):
        n_g, n_h, y0, y1, y2, y3, u_g, u_h = _block_loads(
            codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, blk + 1, t,
            num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
        a0, a1, a2, a3 = _block_mma(a0, a1, a2, a3, c_g, c_h, x0, x1, x2, x3, tbl, s_g, s_h)
        c_g, c_h, x0, x1, x2, x3, s_g, s_h = n_g, n_h, y0, y1, y2, y3, u_g, u_h
    return a0, a1, a2, a3


@triton.jit
def _tile_dot2(codes, xa, xb, am, am_code, am_scale, am_offset, row_g, ok_g, ok_h, ok_a, ok_b, k_dim, t, blk_lo,
               num_blocks, tbl, scales_per_expert, DOUBLE_QUANT: tl.constexpr, NT: tl.constexpr):
    """`_tile_dot` of a one-expert weight against two groups of 8 columns (tokens at xa and xb):
    the lane's 8 float32 results, 4 per group. Each code word is looked up once for both."""
    a0 = tl.zeros([NT], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    c_g, c_h, x0, x1, x2, x3, s_g, s_h = _block_loads(
        codes, xa, am, am_code, am_scale, am_offset, 0, row_g, ok_g, ok_h, ok_a, k_dim, blk_lo, t, num_blocks,
        0, scales_per_expert, DOUBLE_QUANT)
    y0, y1, y2, y3 = _x_loads(xb, blk_lo, t, num_blocks, ok_b)
    for blk in range(blk_lo, num_blocks):
        n_g, n_h, m0, m1, m2, m3, u_g, u_h = _block_loads(
            codes, xa, am, am_code, am_scale, am_offset, 0, row_g, ok_g, ok_h, ok_a, k_dim, blk + 1, t,
            num_blocks, 0, scales_per_expert, DOUBLE_QUANT)
        v0, v1, v2, v3 = _x_loads(xb, blk + 1, t, num_blocks, ok_b)
        a0, a1, a2, a3, a4, a5, a6, a7 = _block_mma2(a0, a1, a2, a3, a4, a5, a6, a7, c_g, c_h, x0, x1, x2, x3,
                                                     y0, y1, y2, y3, tbl, s_g, s_h)
        c_g, c_h, x0, x1, x2, x3, s_g, s_h = n_g, n_h, m0, m1, m2, m3, u_g, u_h
        y0, y1, y2, y3 = v0, v1, v2, v3
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _nf4_mma_grouped_kernel(
    x_ptr, w_ptr, out_ptr, pairs_ptr, counts_ptr, route_w_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    n_out, k_dim, num_experts, x_row_div, stride_xm, stride_we, stride_om, absmax_per_expert, scales_per_expert,
    GATED: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_E: tl.constexpr, WARPS: tl.constexpr,
):
    """out[pair, n] for the up to 8 pairs of one row block (all of one expert, as `_block_rows`
    finds them in the sorted pairs) and 16 x WARPS rows n, one 16-row tile per warp.

    GATED (gate_up): x row = pair // x_row_div (the token); out = SiLU(gate) * up, gate rows n and
    up rows n_out + n; pairs of invalid ids (the bucket E) are not written. Otherwise (down): x row
    = pair; out = routing weight (rounded to out's dtype, as transformers rounds it) * (x @ W^T);
    the invalid bucket writes zeros."""
    NT: tl.constexpr = 32 * WARPS
    pid = tl.program_id(0)
    n_groups = tl.cdiv(n_out, 16 * WARPS)
    expert, row_lo, row_hi = _block_rows(counts_ptr, pid // n_groups, num_experts, 8, BLOCK_E)
    if row_hi > row_lo:  # blocks past the last one (the grid is sized for the worst case) do nothing
        lut = _nf4_lut(nf4_code_ptr, True, WARPS)
        lane, warp = _thread_ids(NT)
        g = lane // 4
        t = lane % 4
        valid = expert < num_experts
        expert = tl.minimum(expert, num_experts - 1)
        num_blocks = tl.where(valid, k_dim // 64, 0)
        row_g = ((pid % n_groups) * WARPS + warp) * 16 + g  # this warp's tile
        ok_g = row_g < n_out
        ok_h = row_g + 8 < n_out
        col_ok = row_lo + g < row_hi  # B column g: pair row_lo + g
        pair = tl.load(pairs_ptr + row_lo + g, mask=col_ok, other=0).to(tl.int64)
        x64 = (x_ptr + (pair // x_row_div) * stride_xm).to(tl.pointer_type(tl.int64), bitcast=True)
        codes = (w_ptr + expert.to(tl.int64) * stride_we).to(tl.pointer_type(tl.int64), bitcast=True)
        d0, d1, d2, d3 = _tile_dot(codes, x64, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                   expert, row_g, ok_g, ok_h, col_ok, k_dim, t, 0, num_blocks, lut[0],
                                   absmax_per_expert, scales_per_expert, DOUBLE_QUANT, NT)
        if GATED:
            u0, u1, u2, u3 = _tile_dot(codes, x64, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                       expert, row_g + n_out, ok_g, ok_h, col_ok, k_dim, t, 0, num_blocks,
                                       lut[0], absmax_per_expert, scales_per_expert, DOUBLE_QUANT, NT)
            d0 = d0 * tl.sigmoid(d0) * u0
            d1 = d1 * tl.sigmoid(d1) * u1
            d2 = d2 * tl.sigmoid(d2) * u2
            d3 = d3 * tl.sigmoid(d3) * u3
        # This lane's results: rows row_g (d0, d1) and row_g + 8 (d2, d3) of columns 2t, 2t + 1.
        ok0 = row_lo + 2 * t < row_hi
        ok1 = row_lo + 2 * t + 1 < row_hi
        if GATED:
            ok0 = ok0 & valid
            ok1 = ok1 & valid
        p0 = tl.load(pairs_ptr + row_lo + 2 * t, mask=ok0, other=0).to(tl.int64)
        p1 = tl.load(pairs_ptr + row_lo + 2 * t + 1, mask=ok1, other=0).to(tl.int64)
        if not GATED:
            rw0 = tl.load(route_w_ptr + p0, mask=ok0, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
            rw1 = tl.load(route_w_ptr + p1, mask=ok1, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
            d0, d2 = d0 * rw0, d2 * rw0
            d1, d3 = d1 * rw1, d3 * rw1
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + p0 * stride_om + row_g, d0.to(dtype), mask=ok0 & ok_g)
        tl.store(out_ptr + p1 * stride_om + row_g, d1.to(dtype), mask=ok1 & ok_g)
        tl.store(out_ptr + p0 * stride_om + row_g + 8, d2.to(dtype), mask=ok0 & ok_h)
        tl.store(out_ptr + p1 * stride_om + row_g + 8, d3.to(dtype), mask=ok1 & ok_h)


def usable(x: torch.Tensor, gate_up, down) -> bool:
    """Whether this path can run these NF4 experts: CUDA (not ROCm), rows of whole 64-value
    blocks (H and I multiples of 64), 64-value NF4 blocks, and ENABLED."""
    return (ENABLED and x.is_cuda and torch.version.hip is None and gate_up.shape[2] % 64 == 0
            and down.shape[2] % 64 == 0 and gate_up.blocksize == 64 and down.blocksize == 64)


def grouped(x: torch.Tensor, w, out: torch.Tensor, pairs: torch.Tensor, counts: torch.Tensor, route_w: torch.Tensor,
            x_row_div: int, gated: bool) -> None:
    """One grouped NF4 GEMM of `experts.fused_experts_forward` (gate_up: gated, x the tokens,
    x_row_div top-k; down: x the pairs' activations, x_row_div 1) into out [pairs, n_out]."""
    num_experts, rows, k_dim = w.shape
    n_out = rows // 2 if gated else rows
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 8 or x.data_ptr() % 8:
        x = x.clone(memory_format=torch.contiguous_format)  # lanes read x rows as 8-byte words
    ptrs, strides, flags = _weight_args(w, num_experts)
    num_pairs = pairs.numel()
    num_blocks = triton.cdiv(num_pairs, 8) + min(num_experts + 1, num_pairs)  # the worst case: no host sync
    _nf4_mma_grouped_kernel[(num_blocks * triton.cdiv(n_out, 16 * WARPS),)](
        x, ptrs[0], out, pairs, counts, route_w, *ptrs[1:],
        n_out, k_dim, num_experts, x_row_div, x.stride(0), strides[0], out.stride(0), strides[3], strides[4],
        GATED=gated, DOUBLE_QUANT=flags["DOUBLE_QUANT"], BLOCK_E=triton.next_power_of_2(num_experts + 1),
        WARPS=WARPS, num_warps=WARPS)


@triton.jit
def _linear_epilogue(d0, d1, d2, d3, out_ptr, bias_ptr, gate_ptr, add_ptr, tok, row_g, ok_g, ok_h, num_tokens,
                     stride_om, stride_gm, stride_am, HAS_BIAS: tl.constexpr, SHARED: tl.constexpr):
    """Store one group's results: rows row_g (d0, d1) and row_g + 8 (d2, d3) of tokens tok, tok + 1,
    plus the bias (before the one rounding, as cuBLAS adds it); SHARED (a shared expert's down):
    add + sigmoid(gate logit) * result, rounded at each step as transformers computes it."""
    ok0 = tok < num_tokens
    ok1 = tok + 1 < num_tokens
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        b_g = tl.load(bias_ptr + row_g, mask=ok_g, other=0.0).to(tl.float32)
        b_h = tl.load(bias_ptr + row_g + 8, mask=ok_h, other=0.0).to(tl.float32)
        d0, d1, d2, d3 = d0 + b_g, d1 + b_g, d2 + b_h, d3 + b_h
    if SHARED:
        s0 = tl.sigmoid(tl.load(gate_ptr + tok * stride_gm, mask=ok0, other=0.0).to(tl.float32)).to(dtype)
        s1 = tl.sigmoid(tl.load(gate_ptr + (tok + 1) * stride_gm, mask=ok1, other=0.0).to(tl.float32)).to(dtype)
        d0 = tl.load(add_ptr + tok * stride_am + row_g, mask=ok0 & ok_g, other=0.0) + s0 * d0.to(dtype)
        d1 = tl.load(add_ptr + (tok + 1) * stride_am + row_g, mask=ok1 & ok_g, other=0.0) + s1 * d1.to(dtype)
        d2 = tl.load(add_ptr + tok * stride_am + row_g + 8, mask=ok0 & ok_h, other=0.0) + s0 * d2.to(dtype)
        d3 = tl.load(add_ptr + (tok + 1) * stride_am + row_g + 8, mask=ok1 & ok_h, other=0.0) + s1 * d3.to(dtype)
    tl.store(out_ptr + tok * stride_om + row_g, d0.to(dtype), mask=ok0 & ok_g)
    tl.store(out_ptr + (tok + 1) * stride_om + row_g, d1.to(dtype), mask=ok1 & ok_g)
    tl.store(out_ptr + tok * stride_om + row_g + 8, d2.to(dtype), mask=ok0 & ok_h)
    tl.store(out_ptr + (tok + 1) * stride_om + row_g + 8, d3.to(dtype), mask=ok1 & ok_h)


@triton.jit
def _store_partial(d0, d1, d2, d3, part_ptr, tok, row_g, ok_g, ok_h, num_tokens, stride_pt):
    """Store one group's float32 split-K partials, as `_linear_epilogue` would store its results."""
    ok0 = tok < num_tokens
    ok1 = tok + 1 < num_tokens
    tl.store(part_ptr + tok * stride_pt + row_g, d0, mask=ok0 & ok_g)
    tl.store(part_ptr + (tok + 1) * stride_pt + row_g, d1, mask=ok1 & ok_g)
    tl.store(part_ptr + tok * stride_pt + row_g + 8, d2, mask=ok0 & ok_h)
    tl.store(part_ptr + (tok + 1) * stride_pt + row_g + 8, d3, mask=ok1 & ok_h)


@triton.jit
def _finish_group(d0, d1, d2, d3, u0, u1, u2, u3, out_ptr, bias_ptr, gate_ptr, add_ptr, part_ptr, tok, row_g, ok_g,
                  ok_h, num_tokens, n_out, stride_om, stride_gm, stride_am, stride_pt, GATED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SHARED: tl.constexpr, PARTIAL: tl.constexpr):
    """One group of 8 tokens' results (d; u: the up rows' where GATED): PARTIAL, float32 split-K
    partials for `_linear_split_sum_kernel` (gate columns n, up columns n_out + n); otherwise
    SiLU(gate) * up where GATED, then `_linear_epilogue`."""
    if PARTIAL:
        if GATED:
            _store_partial(u0, u1, u2, u3, part_ptr + n_out, tok, row_g, ok_g, ok_h, num_tokens, stride_pt)
        _store_partial(d0, d1, d2, d3, part_ptr, tok, row_g, ok_g, ok_h, num_tokens, stride_pt)
    else:
        if GATED:
            d0, d1, d2, d3 = d0 * tl.sigmoid(d0) * u0, d1 * tl.sigmoid(d1) * u1, d2 * tl.sigmoid(d2) * u2, \
                d3 * tl.sigmoid(d3) * u3
        _linear_epilogue(d0, d1, d2, d3, out_ptr, bias_ptr, gate_ptr, add_ptr, tok, row_g, ok_g, ok_h, num_tokens,
                         stride_om, stride_gm, stride_am, HAS_BIAS, SHARED)


@triton.jit
def _nf4_mma_linear_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, gate_ptr, add_ptr, part_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    num_tokens, n_out, k_dim, splits, blocks_per_split, stride_xm, stride_om, stride_gm, stride_am, stride_ps,
    stride_pt, scales_per_expert,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SHARED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    NB: tl.constexpr, WARPS: tl.constexpr, PARTIAL: tl.constexpr,
):
    """out[token, n] = x[token] @ W[n]^T for a one-expert NF4 weight W [1, rows, K]: 16 x WARPS
    rows n (a 16-row tile per warp) against 8 NB tokens (NB groups of 8 MMA columns, each code
    word looked up once for all of them), over one of `splits` equal shares of K's 64-value blocks.
    The programs of one (row tile, split) are neighbours, so its codes come from L2 after the
    first token block. PARTIAL (splits > 1): the float32 sums go to part[split, token, column]
    (GATED: gate columns n, up columns n_out + n) for `_linear_split_sum_kernel`; otherwise GATED:
    out = SiLU(gate) * up, gate rows n, up rows n_out + n; see `_linear_epilogue` for HAS_BIAS and
    SHARED."""
    NT: tl.constexpr = 32 * WARPS
    pid = tl.program_id(0)
    token_blocks = tl.cdiv(num_tokens, 8 * NB)
    tile_split = pid // token_blocks
    tile = tile_split // splits
    split = tile_split % splits
    tok0 = (pid % token_blocks) * (8 * NB)
    lut = _nf4_lut(nf4_code_ptr, True, WARPS)
    lane, warp = _thread_ids(NT)
    g = lane // 4
    t = lane % 4
    row_g = (tile * WARPS + warp) * 16 + g
    ok_g = row_g < n_out
    ok_h = row_g + 8 < n_out
    blk_lo = split * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, k_dim // 64)
    codes = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    part = part_ptr + split.to(tl.int64) * stride_ps
    ok_a = tok0 + g < num_tokens  # B column g of group 0: token tok0 + g
    xa = (x_ptr + tl.where(ok_a, tok0 + g, 0).to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int64), bitcast=True)
    if NB == 1:
        d0, d1, d2, d3 = _tile_dot(codes, xa, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, 0,
                                   row_g, ok_g, ok_h, ok_a, k_dim, t, blk_lo, blk_hi, lut[0], 0, scales_per_expert,
                                   DOUBLE_QUANT, NT)
        u0, u1, u2, u3 = d0, d1, d2, d3  # the up rows' results where GATED, unused otherwise
        if GATED:
            u0, u1, u2, u3 = _tile_dot(codes, xa, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                       0, row_g + n_out, ok_g, ok_h, ok_a, k_dim, t, blk_lo, blk_hi, lut[0], 0,
                                       scales_per_expert, DOUBLE_QUANT, NT)
        _finish_group(d0, d1, d2, d3, u0, u1, u2, u3, out_ptr, bias_ptr, gate_ptr, add_ptr, part, tok0 + 2 * t, row_g,
                      ok_g, ok_h, num_tokens, n_out, stride_om, stride_gm, stride_am, stride_pt, GATED, HAS_BIAS,
                      SHARED, PARTIAL)
    else:
        ok_b = tok0 + 8 + g < num_tokens  # group 1: tokens tok0 + 8 ...
        xb = (x_ptr + tl.where(ok_b, tok0 + 8 + g, 0).to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int64),
                                                                                    bitcast=True)
        d0, d1, d2, d3, e0, e1, e2, e3 = _tile_dot2(
            codes, xa, xb, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, row_g, ok_g, ok_h,
            ok_a, ok_b, k_dim, t, blk_lo, blk_hi, lut[0], scales_per_expert, DOUBLE_QUANT, NT)
        u0, u1, u2, u3, v0, v1, v2, v3 = d0, d1, d2, d3, e0, e1, e2, e3
        if GATED:
            u0, u1, u2, u3, v0, v1, v2, v3 = _tile_dot2(
                codes, xa, xb, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, row_g + n_out, ok_g,
                ok_h, ok_a, ok_b, k_dim, t, blk_lo, blk_hi, lut[0], scales_per_expert, DOUBLE_QUANT, NT)
        _finish_group(d0, d1, d2, d3, u0, u1, u2, u3, out_ptr, bias_ptr, gate_ptr, add_ptr, part, tok0 + 2 * t, row_g,
                      ok_g, ok_h, num_tokens, n_out, stride_om, stride_gm, stride_am, stride_pt, GATED, HAS_BIAS,
                      SHARED, PARTIAL)
        _finish_group(e0, e1, e2, e3, v0, v1, v2, v3, out_ptr, bias_ptr, gate_ptr, add_ptr, part, tok0 + 8 + 2 * t,
                      row_g, ok_g, ok_h, num_tokens, n_out, stride_om, stride_gm, stride_am, stride_pt, GATED,
                      HAS_BIAS, SHARED, PARTIAL)


@triton.jit
def _linear_split_sum_kernel(part_ptr, out_ptr, bias_ptr, gate_ptr, add_ptr, splits, n_out, stride_ps, stride_pt,
                             stride_om, stride_gm, stride_am, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             SHARED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token, BLOCK columns): the split-K partials of `_nf4_mma_linear_kernel` summed in
    split order (deterministic), then `linear`'s epilogue with the same roundings as
    `_linear_epilogue` (GATED: SiLU(gate) * up in float32 first)."""
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_out
    row = part_ptr + tok * stride_pt
    d = tl.zeros([BLOCK], dtype=tl.float32)
    u = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        d += tl.load(row + s * stride_ps + cols, mask=ok, other=0.0)
        if GATED:
            u += tl.load(row + s * stride_ps + n_out + cols, mask=ok, other=0.0)
    if GATED:
        d = d * tl.sigmoid(d) * u
    if HAS_BIAS:
        d += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if SHARED:
        sg = tl.sigmoid(tl.load(gate_ptr + tok * stride_gm).to(tl.float32)).to(dtype)
        d = tl.load(add_ptr + tok * stride_am + cols, mask=ok, other=0.0) + sg * d.to(dtype)
    tl.store(out_ptr + tok * stride_om + cols, d.to(dtype), mask=ok)


def linear_splits(programs: int, num_blocks: int, sm_count: int) -> int:
    """Split-K factor of a `linear` launch of `programs` (row tile, token block) programs over
    num_blocks 64-value blocks of K: without it a prefill's o_proj or shared down is 32 programs
    on 132 SMs, each walking all of K with one block of codes in flight per warp, latency-bound
    (16 tokens on an H100, codes from HBM: the shared down 57.8 us unsplit, 14.3 split, against
    24.9 for dequantize-then-cuBLAS; nf4_dense_mma_probe_split_2026-12-07_h100.json). Below
    SPLIT_BELOW_PROGRAMS_PER_SM programs per SM, splits until about SPLIT_PROGRAMS_PER_SM, each
    share keeping at least SPLIT_MIN_BLOCKS blocks of K (each program fills its shared-memory table
    once); above it the token blocks keep the SMs busy and the partials' traffic costs more."""
    if programs >= SPLIT_BELOW_PROGRAMS_PER_SM * sm_count:  # the SMs busy already: partials cost more
        return 1
    return max(1, min(num_blocks // SPLIT_MIN_BLOCKS, triton.cdiv(SPLIT_PROGRAMS_PER_SM * sm_count, programs)))


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, gated: bool = False,
           shared_gate: torch.Tensor | None = None, add: torch.Tensor | None = None, nb: int | None = None,
           warps: int = WARPS, splits: int | None = None) -> torch.Tensor:
    """x [T, K] @ W^T (+ bias) for a one-expert NF4 weight W [1, rows, K] (`moelab.quant.NF4Tensor`,
    64-value blocks, K a multiple of 64) on the tensor cores: a prefill's dense NF4 linears without
    a dequantized copy. gated: W holds gate rows then up rows, returns SiLU(gate) * up [T, rows / 2].
    shared_gate [T, 1] and add [T, N] (a shared expert's down): returns add + sigmoid(shared_gate) *
    (x @ W^T), written into add. nb: groups of 8 tokens a program (default: 2 above 8 tokens).
    splits: shares of K run by separate programs, their float32 partials summed by a second launch
    (default `linear_splits`; 1: one launch)."""
    _, rows, k_dim = w.shape
    n_out = rows // 2 if gated else rows
    if x.dim() != 2 or x.shape[1] != k_dim or k_dim % 64 or w.blocksize != 64:
        raise ValueError(f"x must be [T, {k_dim}] with K a multiple of 64 and 64-value NF4 blocks, got "
                         f"{tuple(x.shape)}, blocksize {w.blocksize}")
    if (shared_gate is None) != (add is None) or (gated and add is not None):
        raise ValueError("shared_gate and add come together, and not with gated")
    if nb not in (None, 1, 2) or warps not in (2, 4, 8):
        raise ValueError(f"nb takes 1 or 2 groups of 8 tokens and warps 2, 4 or 8, got nb={nb}, warps={warps}")
    num_blocks = k_dim // 64
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= num_blocks):
        raise ValueError(f"splits must be an int from 1 to K / 64 = {num_blocks}, got {splits!r}")
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 8 or x.data_ptr() % 8:
        x = x.clone(memory_format=torch.contiguous_format)  # lanes read x rows as 8-byte words
    num_tokens = x.shape[0]
    out = add if add is not None else torch.empty(num_tokens, n_out, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    nb = nb or (1 if num_tokens <= 8 else 2)
    programs = triton.cdiv(n_out, 16 * warps) * triton.cdiv(num_tokens, 8 * nb)
    if splits is None:
        splits = linear_splits(programs, num_blocks, torch.cuda.get_device_properties(x.device).multi_processor_count)
    blocks_per_split = triton.cdiv(num_blocks, splits)
    splits = triton.cdiv(num_blocks, blocks_per_split)  # none empty
    n_cols = 2 * n_out if gated else n_out
    part = torch.empty(splits, num_tokens, n_cols, dtype=torch.float32, device=x.device) if splits > 1 else out
    ptrs, strides, flags = _weight_args(w, 1)
    gate = shared_gate if shared_gate is not None else out
    _nf4_mma_linear_kernel[(programs * splits,)](
        x, ptrs[0], out, bias if bias is not None else out, gate, out, part, *ptrs[1:], num_tokens, n_out, k_dim,
        splits, blocks_per_split, x.stride(0), out.stride(0), gate.stride(0), out.stride(0),
        part.stride(0) if splits > 1 else 0, part.stride(1) if splits > 1 else 0, strides[4],
        GATED=gated, HAS_BIAS=bias is not None, SHARED=shared_gate is not None, DOUBLE_QUANT=flags["DOUBLE_QUANT"],
        NB=nb, WARPS=warps, PARTIAL=splits > 1, num_warps=warps)
    if splits > 1:
        block = 1024
        _linear_split_sum_kernel[(num_tokens, triton.cdiv(n_out, block))](
            part, out, bias if bias is not None else out, gate, out, splits, n_out, part.stride(0), part.stride(1),
            out.stride(0), gate.stride(0), out.stride(0), GATED=gated, HAS_BIAS=bias is not None,
            SHARED=shared_gate is not None, BLOCK=block, num_warps=4)
    return out
