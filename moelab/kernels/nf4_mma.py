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
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .experts import _block_rows, _nf4_absmax, _nf4_lut, _weight_args

ENABLED = os.environ.get("MOELAB_NF4_MMA", "1") != "0"  # MOELAB_NF4_MMA=0: the previous NF4 paths (comparisons)
WARPS = 4  # warps per program: 4 tiles of 16 rows, one shared-memory table

# Step s of a 64-value block: A register -> (row half, code byte of the lane's 8); B registers ->
# (x pair of the lane's 8). Lane t's 8 code bytes of a row hold values 16t .. 16t + 15 of the block
# (byte j: values 16t + 2j, 16t + 2j + 1), its 8 x pairs the same values.
# A register 0: row g, slots 2t, 2t+1; 1: row g+8, same slots; 2: row g, slots 2t+8, 2t+9; 3: row g+8.
# Slots (2t, 2t+1) mean values 16t + 4s + (0, 1): byte 2s; slots (2t+8, 2t+9) values 16t + 4s + (2, 3): byte 2s + 1.
BLOCK_STEPS = tuple(
    {"a": ((0, 2 * s), (1, 2 * s), (0, 2 * s + 1), (1, 2 * s + 1)), "b": (2 * s, 2 * s + 1)} for s in range(4)
)


def _mma_block_asm() -> str:
    """PTX for one lane's share of a 16-row x 64-value NF4 block times 8 columns of x:
    $0-$3 = $13-$16 + the block's products (rows g, g, g + 8, g + 8 at columns 2t, 2t + 1),
    rows g scaled by $11, rows g + 8 by $12 (their absmax).

    $4, $5: the lane's 8 code bytes of rows g and g + 8 (64-bit); $6-$9: the 8 bf16 pairs of x of
    column g's token, two per 64-bit register; $10: the lane's address in the shared pair table
    (`experts._nf4_lut`: entry e at byte 128 e from it)."""
    lines = [".reg .b32 w<4>, x<2>, t, q, a<4>;", ".reg .f32 d<4>, z, sg, sh, c<4>;",
             "mov.f32 z, 0f00000000;", "mov.b64 {w0, w1}, $4;", "mov.b64 {w2, w3}, $5;"]
    for s, step in enumerate(BLOCK_STEPS):
        lines.append(f"mov.b64 {{x0, x1}}, ${6 + s};")  # pairs 2s (low word) and 2s + 1 (high word)
        for reg, (half, byte) in enumerate(step["a"]):
            word = f"w{2 * half + byte // 4}"  # row g: w0 (bytes 0-3), w1 (4-7); row g + 8: w2, w3
            lines += [f"prmt.b32 t, {word}, 0, 0x444{byte % 4};", "mad.lo.u32 q, t, 128, $10;",
                      f"ld.shared.b32 a{reg}, [q];"]
        acc = "z, z, z, z" if s == 0 else "d0, d1, d2, d3"
        lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     f"{{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, {{x0, x1}}, {{{acc}}};")
    lines += ["mov.b32 sg, $11;", "mov.b32 sh, $12;"]
    for i in range(4):
        lines += [f"mov.b32 c{i}, ${13 + i};", f"fma.rn.f32 c{i}, d{i}, {'sg' if i < 2 else 'sh'}, c{i};",
                  f"mov.b32 ${i}, c{i};"]
    return "{\n" + "\n".join(lines) + "\n}"


MMA_BLOCK_ASM = tl.constexpr(_mma_block_asm())


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
def _block_loads(codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, blk, t,
                 num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr):
    """Block blk's inputs for rows row_g, row_g + 8 (zeros past num_blocks): the lane's code words
    of both rows, its 4 words of x (16 values of its column's token) and the rows' absmax."""
    ok = blk < num_blocks
    p = x64 + blk * 16 + 4 * t
    xo = ok & col_ok
    x0 = tl.load(p, mask=xo, other=0)
    x1 = tl.load(p + 1, mask=xo, other=0)
    x2 = tl.load(p + 2, mask=xo, other=0)
    x3 = tl.load(p + 3, mask=xo, other=0)
    word = blk * 4 + t
    c_g = tl.load(codes + row_g.to(tl.int64) * (k_dim // 16) + word, mask=ok & ok_g, other=0)
    c_h = tl.load(codes + (row_g + 8).to(tl.int64) * (k_dim // 16) + word, mask=ok & ok_h, other=0)
    s_g = _nf4_absmax(am, am_code, am_scale, am_offset, expert, row_g * (k_dim // 64) + blk, ok & ok_g,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    s_h = _nf4_absmax(am, am_code, am_scale, am_offset, expert, (row_g + 8) * (k_dim // 64) + blk, ok & ok_h,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    return c_g, c_h, x0, x1, x2, x3, s_g, s_h


@triton.jit
def _tile_dot(codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, t, num_blocks,
              tbl, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr, NT: tl.constexpr):
    """One warp's 16-row tile over all of K against its 8 columns: the lane's 4 float32 results.
    The next block's loads are issued before this block's MMAs (pipelined by hand)."""
    a0 = tl.zeros([NT], dtype=tl.float32)
    a1 = tl.zeros([NT], dtype=tl.float32)
    a2 = tl.zeros([NT], dtype=tl.float32)
    a3 = tl.zeros([NT], dtype=tl.float32)
    c_g, c_h, x0, x1, x2, x3, s_g, s_h = _block_loads(
        codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, 0, t, num_blocks,
        absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    for blk in range(0, num_blocks):
        n_g, n_h, y0, y1, y2, y3, u_g, u_h = _block_loads(
            codes, x64, am, am_code, am_scale, am_offset, expert, row_g, ok_g, ok_h, col_ok, k_dim, blk + 1, t,
            num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
        a0, a1, a2, a3 = _block_mma(a0, a1, a2, a3, c_g, c_h, x0, x1, x2, x3, tbl, s_g, s_h)
        c_g, c_h, x0, x1, x2, x3, s_g, s_h = n_g, n_h, y0, y1, y2, y3, u_g, u_h
    return a0, a1, a2, a3


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
                                   expert, row_g, ok_g, ok_h, col_ok, k_dim, t, num_blocks, lut[0],
                                   absmax_per_expert, scales_per_expert, DOUBLE_QUANT, NT)
        if GATED:
            u0, u1, u2, u3 = _tile_dot(codes, x64, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                                       expert, row_g + n_out, ok_g, ok_h, col_ok, k_dim, t, num_blocks, lut[0],
                                       absmax_per_expert, scales_per_expert, DOUBLE_QUANT, NT)
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
