"""NF4 decode GEMVs on the tensor cores: `mma.sync` as the multiply-add of a matrix-vector product.

Built in notebooks/05_fused_expert_kernel (section 13). The decode kernels of `experts` (the NF4
word path) spend about 4.5 instructions on each weight value: look its code up, multiply it by
x, add the products, scale by the block's absmax. At one token that work, not the bytes, sets
their speed (~1.2 TB/s where the card copies at ~3). A tensor core does the multiply and the
add of 256 weight values in one instruction, so here the look-up is nearly all that remains.

One `mma.sync.aligned.m16n8k16` multiplies a 16 x 16 tile of weights (A: 16 rows, 16 values
of K) by a 16 x 8 tile of x (B: its 8 columns are all the same x: one token, 7 columns wasted,
which costs nothing the memory system would notice) into a 16 x 8 float32 accumulator. The
PTX ISA fixes which lane holds what: lane l = 4 g + t holds, of A, rows g and g + 8 at
K-slots 2t, 2t + 1 and 2t + 8, 2t + 9 (four 32-bit registers of two bf16 each); of B the same
four K-slots; of the result rows g and g + 8. A dot product does not care in which order its
K runs, so slots are free to mean any values of K as long as A and B agree: here, in step s
(0-3) of a 64-value NF4 block, lane t's slots hold values 16t + 4s .. 16t + 4s + 3. Lane t
thus reads 8 contiguous code bytes of each of its 2 rows per block (one 8-byte load) and 32
contiguous bytes of x, and each code byte (2 values) becomes one A register through the
256-entry table of bf16 level pairs in shared memory (`experts.nf4_pair_table`). The 4 steps
of one block stay inside it, so the block's absmax scales the block's sum once: one FMA per
row and block into the float32 accumulator (`BLOCK_STEPS`: the mapping, checked against the
ISA's fragment layout by tests/test_nf4_mma.py on the CPU).

Per lane and 16 x 64 block: 2 code loads, 16 look-ups (a `prmt`, a multiply-add for the
address, an `ld.shared`), 4 MMAs, 2 FMAs and the absmax: about 1.7 instructions per value.
Warps split K; a program sums its warps' partial rows at the end (deterministic). Products
are exact in float32 (the word path rounds them to bf16), so this path is also closer to
dequantize-then-matmul.

CUDA only (inline PTX; the interpreter takes `experts`' word and nibble paths). Used by
`experts._gemv_forward` for NF4 experts whose rows are whole 64-value blocks (`usable`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .experts import _nf4_absmax, _nf4_lut
from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel

ENABLED = os.environ.get("MOELAB_NF4_MMA", "1") != "0"  # MOELAB_NF4_MMA=0: the word path (comparisons)

# Step s of a 64-value block: (A register -> (row half, code byte of the lane's 8)), B registers'
# x pair (of the lane's 8 bf16 pairs). Lane t's 8 code bytes of a row hold values 16t .. 16t + 15
# of the block (byte j: values 16t + 2j, 16t + 2j + 1), its 8 x pairs the same values.
# A register 0: row g, slots 2t, 2t+1; 1: row g+8, same slots; 2: row g, slots 2t+8, 2t+9; 3: row g+8.
# Slots (2t, 2t+1) mean values 16t + 4s + (0, 1): byte 2s; slots (2t+8, 2t+9) values 16t + 4s + (2, 3): byte 2s + 1.
BLOCK_STEPS = tuple(
    {"a": ((0, 2 * s), (1, 2 * s), (0, 2 * s + 1), (1, 2 * s + 1)), "b": (2 * s, 2 * s + 1)} for s in range(4)
)

GATE_UP_WARPS = 4  # warps per gate_up program (each takes every 4th block of K)
DOWN_WARPS = 16  # warps per down program (each takes every 16th (segment, block) item)
MAXNREG = {"gate_up": 64, "down": None}  # register caps per thread (None: the compiler's choice)
DOWN_SPLIT_LOOPS = True  # down: a loop per expert, then the shared expert's (else one flat item loop)
GATE_UP_PREFETCH = True  # gate_up: the next block's loads issued before this block's MMAs


def _mma_block_asm() -> str:
    """PTX for one 16-row x 64-value NF4 block of one lane: $0, $1 = $11 + $9 * (rows g's dot),
    $12 + $10 * (row g + 8's), the dots over the block's 64 values through 4 MMAs.

    $2, $3: the lane's 8 code bytes of row g and g + 8 (64-bit); $4-$7: its 8 bf16 pairs of x,
    two per 64-bit register; $8: the lane's address in the shared pair table (`experts._nf4_lut`:
    entry e at byte 128 e from it); $9, $10: the rows' absmax (times any scale); $11, $12 the
    running sums. Only column 0 of the result is read (every column of B is x)."""
    lines = [".reg .b32 w<4>, x<2>, t, q, a<4>;", ".reg .f32 d<4>, z, sg, sh, cg, ch;",
             "mov.f32 z, 0f00000000;", "mov.b64 {w0, w1}, $2;", "mov.b64 {w2, w3}, $3;"]
    for s, step in enumerate(BLOCK_STEPS):
        lines.append(f"mov.b64 {{x0, x1}}, ${4 + s};")  # pairs 2s (low word) and 2s + 1 (high word)
        assert step["b"] == (2 * s, 2 * s + 1)
        for reg, (half, byte) in enumerate(step["a"]):
            word = f"w{2 * half + byte // 4}"  # row g: w0 (bytes 0-3), w1 (4-7); row g + 8: w2, w3
            lines += [f"prmt.b32 t, {word}, 0, 0x444{byte % 4};", "mad.lo.u32 q, t, 128, $8;",
                      f"ld.shared.b32 a{reg}, [q];"]
        acc = "z, z, z, z" if s == 0 else "d0, d1, d2, d3"
        lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     f"{{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, {{x0, x1}}, {{{acc}}};")
    lines += ["mov.b32 sg, $9;", "mov.b32 sh, $10;", "mov.b32 cg, $11;", "mov.b32 ch, $12;",
              "fma.rn.f32 cg, d0, sg, cg;", "fma.rn.f32 ch, d2, sh, ch;", "mov.b32 $0, cg;", "mov.b32 $1, ch;"]
    return "{\n" + "\n".join(lines) + "\n}"


MMA_BLOCK_ASM = tl.constexpr(_mma_block_asm())


@triton.jit
def _thread_ids(NT: tl.constexpr):
    """[NT] tensors (NT = the program's threads, one element each): each element's hardware lane
    and warp, read from the thread that holds it (the MMA's fragments are per hardware lane).
    Not pure, like the MMA's asm: a pure one may be recomputed in another layout, where an
    element sits in another thread and reads that thread's lane; an impure one stays put."""
    idx = tl.arange(0, NT)
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [idx], dtype=tl.int32, is_pure=False, pack=1)
    warp = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;\nshr.u32 $0, $0, 5;", "=r,r", [idx], dtype=tl.int32,
                                     is_pure=False, pack=1)
    return lane, warp


@triton.jit
def _block_mma(acc_g, acc_h, c_g, c_h, x0, x1, x2, x3, tbl, scale_g, scale_h):
    """acc_g, acc_h + the scaled dots of rows g and g + 8 of one 16-row tile over one 64-value
    block: c_g, c_h the lane's 8 code bytes of each row (int64), x0-x3 its 8 bf16 pairs of x."""
    return tl.inline_asm_elementwise(MMA_BLOCK_ASM, "=r,=r,l,l,l,l,l,l,r,r,r,r,r",
                                     [c_g, c_h, x0, x1, x2, x3, tbl, scale_g, scale_h, acc_g, acc_h],
                                     dtype=(tl.float32, tl.float32), is_pure=False, pack=1)


@triton.jit
def _x_pairs(x64, blk, t, ok):
    """The lane's 8 bf16 pairs of x in block blk (values 64 blk + 16t ..), as four int64."""
    p = x64 + blk * 16 + 4 * t
    return (tl.load(p, mask=ok, other=0), tl.load(p + 1, mask=ok, other=0),
            tl.load(p + 2, mask=ok, other=0), tl.load(p + 3, mask=ok, other=0))


@triton.jit
def _row_sums(acc_g, acc_h, NT: tl.constexpr):
    """[16] float32: the tile's 16 row sums, each summed over the program's warps (lanes with
    t = 0 hold rows g and g + 8; the other three lanes of a group hold the same values).

    The lane of element i is taken as i % 32 here, from its index, not read from the hardware:
    the same under the one-element-per-thread layout of the [NT] tensors (which is what makes
    `_thread_ids` right), and Triton miscompiled the masked sum below with the asm-read lane
    (every row's sum landed in row 0; on an H100, triton 3.6)."""
    idx = tl.arange(0, NT)
    g = (idx % 32) // 4
    t = idx % 4
    r = tl.arange(0, 16)
    first = (t == 0)[:, None]
    part = tl.where(first & (g[:, None] == r[None, :]), acc_g[:, None], 0.0)
    part += tl.where(first & (g[:, None] + 8 == r[None, :]), acc_h[:, None], 0.0)
    return tl.sum(part, axis=0)


@triton.jit
def _gate_up_block(codes, x64, am, am_code, am_scale, am_offset, expert, gate_row, up_row, ok_g, ok_h, k_dim, blk, t,
                   num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr):
    """What gate_up's block blk needs, loaded (zeros past num_blocks): the lane's code words of
    gate rows g, g + 8 and up rows g, g + 8, its 4 words of x, and the 4 rows' absmax."""
    ok = blk < num_blocks
    x0, x1, x2, x3 = _x_pairs(x64, blk, t, ok)
    word = blk * 4 + t
    rows = (gate_row, gate_row + 8, up_row, up_row + 8)
    oks = (ok & ok_g, ok & ok_h, ok & ok_g, ok & ok_h)
    c_gg = tl.load(codes + rows[0].to(tl.int64) * (k_dim // 16) + word, mask=oks[0], other=0)
    c_gh = tl.load(codes + rows[1].to(tl.int64) * (k_dim // 16) + word, mask=oks[1], other=0)
    c_ug = tl.load(codes + rows[2].to(tl.int64) * (k_dim // 16) + word, mask=oks[2], other=0)
    c_uh = tl.load(codes + rows[3].to(tl.int64) * (k_dim // 16) + word, mask=oks[3], other=0)
    s_gg = _nf4_absmax(am, am_code, am_scale, am_offset, expert, rows[0] * (k_dim // 64) + blk, oks[0],
                       absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    s_gh = _nf4_absmax(am, am_code, am_scale, am_offset, expert, rows[1] * (k_dim // 64) + blk, oks[1],
                       absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    s_ug = _nf4_absmax(am, am_code, am_scale, am_offset, expert, rows[2] * (k_dim // 64) + blk, oks[2],
                       absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    s_uh = _nf4_absmax(am, am_code, am_scale, am_offset, expert, rows[3] * (k_dim // 64) + blk, oks[3],
                       absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    return c_gg, c_gh, c_ug, c_uh, x0, x1, x2, x3, s_gg, s_gh, s_ug, s_uh


@triton.jit
def _nf4_mma_gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, act_ptr, shared_w_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr,
    n_out, k_dim, num_experts, top_k, num_pairs, shared_rows, shared_chunks,
    stride_xm, stride_we, stride_am, absmax_per_expert, scales_per_expert,
    DOUBLE_QUANT: tl.constexpr, HAS_SHARED: tl.constexpr, WARPS: tl.constexpr, USE_PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = True,
):
    """act[item, n0:n0 + 16] = SiLU(gate) * up for one (item, 16-row tile) per program, item a
    (token, expert) pair or (HAS_SHARED) a chunk of the shared expert's intermediate, exactly
    as `experts._gemv_gate_up_kernel` lays them out. Warp w takes blocks w, w + WARPS, .. of K."""
    lut = _nf4_lut(nf4_code_ptr, True, WARPS)  # fills the shared pair table (a constant buffer: before the wait)
    wait_for_previous_kernel(USE_PDL)
    lane, warp = _thread_ids(32 * WARPS)
    g = lane // 4
    t = lane % 4
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, 16)
    item = pid // n_tiles
    n0 = (pid % n_tiles) * 16
    expert = tl.load(ids_ptr + tl.minimum(item, num_pairs - 1)).to(tl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    expert = tl.where(valid, expert, 0)
    num_blocks = tl.where(valid, k_dim // 64, 0)
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    x_row = x_ptr + (item // top_k).to(tl.int64) * stride_xm
    gate_row = n0 + g
    up_row = gate_row + n_out
    limit = n_out
    am, am_code, am_scale, am_offset = absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr
    if HAS_SHARED:  # the shared expert's chunk c: rows c * n_out + n (gate) and shared_rows + c * n_out + n (up)
        shared = item >= num_pairs
        chunk = tl.maximum(item - num_pairs, 0)
        c = chunk % shared_chunks
        w_e = tl.where(shared, shared_w_ptr, w_e)
        expert = tl.where(shared, 0, expert)
        x_row = tl.where(shared, x_ptr + (chunk // shared_chunks).to(tl.int64) * stride_xm, x_row)
        gate_row = tl.where(shared, gate_row + c * n_out, gate_row)
        up_row = tl.where(shared, n0 + g + c * n_out + shared_rows, up_row)
        limit = tl.where(shared, tl.minimum(shared_rows - c * n_out, n_out), n_out)
        num_blocks = tl.where(shared, k_dim // 64, num_blocks)
        am = tl.where(shared, shared_absmax_ptr, am)
        am_code = tl.where(shared, shared_absmax_code_ptr, am_code)
        am_scale = tl.where(shared, shared_absmax_scale_ptr, am_scale)
        am_offset = tl.where(shared, shared_absmax_offset_ptr, am_offset)
    ok_g = n0 + g < limit
    ok_h = n0 + g + 8 < limit
    codes = w_e.to(tl.pointer_type(tl.int64), bitcast=True)
    x64 = x_row.to(tl.pointer_type(tl.int64), bitcast=True)
    acc_gg = tl.zeros([32 * WARPS], dtype=tl.float32)
    acc_gh = tl.zeros([32 * WARPS], dtype=tl.float32)
    acc_ug = tl.zeros([32 * WARPS], dtype=tl.float32)
    acc_uh = tl.zeros([32 * WARPS], dtype=tl.float32)
    if PREFETCH:
        # Software-pipelined by hand: each iteration issues the next block's loads (codes, x, absmax)
        # before it multiplies the ones it holds, so a warp always has a block in flight.
        blk = warp
        c_gg, c_gh, c_ug, c_uh, x0, x1, x2, x3, s_gg, s_gh, s_ug, s_uh = _gate_up_block(
            codes, x64, am, am_code, am_scale, am_offset, expert, gate_row, up_row, ok_g, ok_h, k_dim, blk, t,
            num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
        for i in range(0, tl.cdiv(num_blocks, WARPS)):
            blk += WARPS
            n_gg, n_gh, n_ug, n_uh, n0_, n1_, n2_, n3_, t_gg, t_gh, t_ug, t_uh = _gate_up_block(
                codes, x64, am, am_code, am_scale, am_offset, expert, gate_row, up_row, ok_g, ok_h, k_dim, blk, t,
                num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
            acc_gg, acc_gh = _block_mma(acc_gg, acc_gh, c_gg, c_gh, x0, x1, x2, x3, lut[0], s_gg, s_gh)
            acc_ug, acc_uh = _block_mma(acc_ug, acc_uh, c_ug, c_uh, x0, x1, x2, x3, lut[0], s_ug, s_uh)
            c_gg, c_gh, c_ug, c_uh, x0, x1, x2, x3 = n_gg, n_gh, n_ug, n_uh, n0_, n1_, n2_, n3_
            s_gg, s_gh, s_ug, s_uh = t_gg, t_gh, t_ug, t_uh
    else:
        for i in range(0, tl.cdiv(num_blocks, WARPS)):
            blk = i * WARPS + warp
            c_gg, c_gh, c_ug, c_uh, x0, x1, x2, x3, s_gg, s_gh, s_ug, s_uh = _gate_up_block(
                codes, x64, am, am_code, am_scale, am_offset, expert, gate_row, up_row, ok_g, ok_h, k_dim, blk, t,
                num_blocks, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
            acc_gg, acc_gh = _block_mma(acc_gg, acc_gh, c_gg, c_gh, x0, x1, x2, x3, lut[0], s_gg, s_gh)
            acc_ug, acc_uh = _block_mma(acc_ug, acc_uh, c_ug, c_uh, x0, x1, x2, x3, lut[0], s_ug, s_uh)
    let_next_kernel_start(USE_PDL)
    gate = _row_sums(acc_gg, acc_gh, 32 * WARPS)
    up = _row_sums(acc_ug, acc_uh, 32 * WARPS)
    out = gate * tl.sigmoid(gate) * up
    n = n0 + tl.arange(0, 16)
    tl.store(act_ptr + item.to(tl.int64) * stride_am + n, out.to(act_ptr.dtype.element_ty), mask=n < n_out)


@triton.jit
def _down_item(it, items, token, act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, shared_w_ptr, absmax_ptr,
               absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, shared_absmax_ptr, shared_absmax_code_ptr,
               shared_absmax_scale_ptr, shared_absmax_offset_ptr, gate, row_g, ok_g, ok_h, t, k_dim, num_experts,
               shared_k, shared_act_row, shared_chunks, stride_am, stride_we, absmax_per_expert, scales_per_expert,
               TOP_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_SHARED: tl.constexpr):
    """What down's item `it` needs, loaded (zeros past `items` and for ids outside [0, E)): items
    are (expert k, block) of the top-k experts, then the shared expert's blocks. Returns the lane's
    code words of rows g, g + 8, its 4 words of x (the item's act row) and the rows' absmax times
    the routing weight (rounded to the output dtype, as transformers rounds it) or shared gate."""
    ok = it < items
    blocks = k_dim // 64  # per routed expert
    routed_items = TOP_K * blocks
    k = tl.minimum(it // blocks, TOP_K - 1)
    blk = it % blocks
    pair = token.to(tl.int64) * TOP_K + k
    expert = tl.load(ids_ptr + pair, mask=ok, other=0).to(tl.int32)
    valid = ok & (expert >= 0) & (expert < num_experts)
    expert = tl.where(valid, expert, 0)
    scale = tl.load(route_w_ptr + pair, mask=ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    codes = (w_ptr + expert.to(tl.int64) * stride_we).to(tl.pointer_type(tl.int64), bitcast=True)
    words = k_dim // 16
    row_blocks = blocks
    x_row = act_ptr + pair * stride_am
    x_blk = blk
    am, am_code, am_scale, am_offset = absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr
    if HAS_SHARED:  # items past the routed ones: block j of the shared expert's K (act chunk j * 64 // k_dim)
        shared = it >= routed_items
        j = tl.maximum(it - routed_items, 0)
        valid = tl.where(shared, ok, valid)
        expert = tl.where(shared, 0, expert)
        scale = tl.where(shared, gate, scale)
        codes = tl.where(shared, shared_w_ptr.to(tl.pointer_type(tl.int64), bitcast=True), codes)
        words = tl.where(shared, shared_k // 16, words)
        row_blocks = tl.where(shared, shared_k // 64, row_blocks)
        blk = tl.where(shared, j, blk)
        x_row = tl.where(shared, act_ptr + (shared_act_row + token.to(tl.int64) * shared_chunks
                                            + j // blocks) * stride_am, x_row)
        x_blk = tl.where(shared, j % blocks, x_blk)
        am = tl.where(shared, shared_absmax_ptr, am)
        am_code = tl.where(shared, shared_absmax_code_ptr, am_code)
        am_scale = tl.where(shared, shared_absmax_scale_ptr, am_scale)
        am_offset = tl.where(shared, shared_absmax_offset_ptr, am_offset)
    x0, x1, x2, x3 = _x_pairs(x_row.to(tl.pointer_type(tl.int64), bitcast=True), x_blk, t, valid)
    s_g = _nf4_absmax(am, am_code, am_scale, am_offset, expert, row_g * row_blocks + blk, valid & ok_g,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT) * scale
    s_h = _nf4_absmax(am, am_code, am_scale, am_offset, expert, (row_g + 8) * row_blocks + blk, valid & ok_h,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT) * scale
    c_g = tl.load(codes + row_g * words + blk * 4 + t, mask=valid & ok_g, other=0)
    c_h = tl.load(codes + (row_g + 8) * words + blk * 4 + t, mask=valid & ok_h, other=0)
    return c_g, c_h, x0, x1, x2, x3, s_g, s_h


@triton.jit
def _down_block(codes, words, row_g, ok_g, ok_h, x64, x_blk, blk, t, ok, am, am_code, am_scale, am_offset, expert,
                row_blocks, scale, absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr):
    """Block blk of one segment of down's K (one expert's rows, or the shared expert's), loaded:
    the lane's code words of rows g, g + 8, its x words (block x_blk of the segment's act row
    x64) and the rows' absmax times `scale`; zeros where not ok."""
    x0, x1, x2, x3 = _x_pairs(x64, x_blk, t, ok)
    s_g = _nf4_absmax(am, am_code, am_scale, am_offset, expert, row_g * row_blocks + blk, ok & ok_g,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT) * scale
    s_h = _nf4_absmax(am, am_code, am_scale, am_offset, expert, (row_g + 8) * row_blocks + blk, ok & ok_h,
                      absmax_per_expert, scales_per_expert, DOUBLE_QUANT) * scale
    c_g = tl.load(codes + row_g * words + blk * 4 + t, mask=ok & ok_g, other=0)
    c_h = tl.load(codes + (row_g + 8) * words + blk * 4 + t, mask=ok & ok_h, other=0)
    return c_g, c_h, x0, x1, x2, x3, s_g, s_h


@triton.jit
def _nf4_mma_down_kernel(
    act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, shared_w_ptr, shared_gate_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr,
    n_out, k_dim, num_experts, shared_k, shared_act_row, shared_chunks,
    stride_am, stride_we, stride_om, stride_sg, absmax_per_expert, scales_per_expert,
    TOP_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_SHARED: tl.constexpr, WARPS: tl.constexpr,
    USE_PDL: tl.constexpr = False, SPLIT_LOOPS: tl.constexpr = False,
):
    """out[token, n0:n0 + 16] = sum_k route_w[token, k] * W_down[ids[token, k]] @ act[token * K + k]
    (+ sigmoid(shared_gate[token]) * W_shared_down @ act_shared[token] with HAS_SHARED), as
    `experts._gemv_down_kernel`: one program per (token, 16-row tile). Its K is the top-k
    experts' blocks followed by the shared expert's; warp w takes items w, w + WARPS, .. of it.
    The routing weight (rounded to the output dtype, as transformers rounds it) or the shared
    gate scales each block's absmax. Ids outside [0, E) add nothing."""
    lut = _nf4_lut(nf4_code_ptr, True, WARPS)
    wait_for_previous_kernel(USE_PDL)
    lane, warp = _thread_ids(32 * WARPS)
    g = lane // 4
    t = lane % 4
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, 16)
    token = pid // n_tiles
    n0 = (pid % n_tiles) * 16
    ok_g = n0 + g < n_out
    ok_h = n0 + g + 8 < n_out
    row_g = (n0 + g).to(tl.int64)
    items = TOP_K * (k_dim // 64)
    gate = 0.0
    if HAS_SHARED:
        items += shared_k // 64
        gate = tl.sigmoid(tl.load(shared_gate_ptr + token.to(tl.int64) * stride_sg).to(tl.float32))
    acc_g = tl.zeros([32 * WARPS], dtype=tl.float32)
    acc_h = tl.zeros([32 * WARPS], dtype=tl.float32)
    if SPLIT_LOOPS:  # a loop per expert (its scalars set once), then the shared expert's; two blocks a step
        blocks = k_dim // 64
        for k in tl.static_range(TOP_K):
            pair = token.to(tl.int64) * TOP_K + k
            expert = tl.load(ids_ptr + pair).to(tl.int32)
            valid = (expert >= 0) & (expert < num_experts)
            expert = tl.where(valid, expert, 0)
            seg_blocks = tl.where(valid, blocks, 0)
            scale = tl.load(route_w_ptr + pair).to(out_ptr.dtype.element_ty).to(tl.float32)
            codes = (w_ptr + expert.to(tl.int64) * stride_we).to(tl.pointer_type(tl.int64), bitcast=True)
            x64 = (act_ptr + pair * stride_am).to(tl.pointer_type(tl.int64), bitcast=True)
            for i in range(0, tl.cdiv(seg_blocks, 2 * WARPS)):
                b0 = 2 * i * WARPS + warp
                b1 = b0 + WARPS
                c_g, c_h, x0, x1, x2, x3, s_g, s_h = _down_block(
                    codes, k_dim // 16, row_g, ok_g, ok_h, x64, b0, b0, t, b0 < seg_blocks, absmax_ptr,
                    absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert, blocks, scale,
                    absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
                d_g, d_h, y0, y1, y2, y3, u_g, u_h = _down_block(
                    codes, k_dim // 16, row_g, ok_g, ok_h, x64, b1, b1, t, b1 < seg_blocks, absmax_ptr,
                    absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert, blocks, scale,
                    absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
                acc_g, acc_h = _block_mma(acc_g, acc_h, c_g, c_h, x0, x1, x2, x3, lut[0], s_g, s_h)
                acc_g, acc_h = _block_mma(acc_g, acc_h, d_g, d_h, y0, y1, y2, y3, lut[0], u_g, u_h)
        if HAS_SHARED:
            shared_blocks = shared_k // 64
            codes = shared_w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
            first_row = shared_act_row + token.to(tl.int64) * shared_chunks
            for i in range(0, tl.cdiv(shared_blocks, 2 * WARPS)):
                j0 = 2 * i * WARPS + warp
                j1 = j0 + WARPS
                x0_64 = (act_ptr + (first_row + j0 // blocks) * stride_am).to(tl.pointer_type(tl.int64), bitcast=True)
                x1_64 = (act_ptr + (first_row + j1 // blocks) * stride_am).to(tl.pointer_type(tl.int64), bitcast=True)
                c_g, c_h, x0, x1, x2, x3, s_g, s_h = _down_block(
                    codes, shared_k // 16, row_g, ok_g, ok_h, x0_64, j0 % blocks, j0, t, j0 < shared_blocks,
                    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr, 0,
                    shared_blocks, gate, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
                d_g, d_h, y0, y1, y2, y3, u_g, u_h = _down_block(
                    codes, shared_k // 16, row_g, ok_g, ok_h, x1_64, j1 % blocks, j1, t, j1 < shared_blocks,
                    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr, 0,
                    shared_blocks, gate, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
                acc_g, acc_h = _block_mma(acc_g, acc_h, c_g, c_h, x0, x1, x2, x3, lut[0], s_g, s_h)
                acc_g, acc_h = _block_mma(acc_g, acc_h, d_g, d_h, y0, y1, y2, y3, lut[0], u_g, u_h)
    else:
        it = warp
        c_g, c_h, x0, x1, x2, x3, s_g, s_h = _down_item(
            it, items, token, act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, shared_w_ptr, absmax_ptr, absmax_code_ptr,
            absmax_scale_ptr, absmax_offset_ptr, shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr,
            shared_absmax_offset_ptr, gate, row_g, ok_g, ok_h, t, k_dim, num_experts, shared_k, shared_act_row,
            shared_chunks, stride_am, stride_we, absmax_per_expert, scales_per_expert, TOP_K, DOUBLE_QUANT, HAS_SHARED)
        for i in range(0, tl.cdiv(items, WARPS)):  # pipelined by hand, as in gate_up
            it += WARPS
            n_g, n_h, n0_, n1_, n2_, n3_, t_g, t_h = _down_item(
                it, items, token, act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, shared_w_ptr, absmax_ptr,
                absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, shared_absmax_ptr, shared_absmax_code_ptr,
                shared_absmax_scale_ptr, shared_absmax_offset_ptr, gate, row_g, ok_g, ok_h, t, k_dim, num_experts,
                shared_k, shared_act_row, shared_chunks, stride_am, stride_we, absmax_per_expert, scales_per_expert,
                TOP_K, DOUBLE_QUANT, HAS_SHARED)
            acc_g, acc_h = _block_mma(acc_g, acc_h, c_g, c_h, x0, x1, x2, x3, lut[0], s_g, s_h)
            c_g, c_h, x0, x1, x2, x3, s_g, s_h = n_g, n_h, n0_, n1_, n2_, n3_, t_g, t_h
    let_next_kernel_start(USE_PDL)
    total = _row_sums(acc_g, acc_h, 32 * WARPS)
    n = n0 + tl.arange(0, 16)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + n, total.to(out_ptr.dtype.element_ty), mask=n < n_out)


def usable(hidden: torch.Tensor, gate_up, down, shared_inter: int) -> bool:
    """Whether the MMA path can run these NF4 experts: CUDA (not ROCm), rows of whole 64-value
    blocks (H, I and the shared expert's intermediate multiples of 64) and ENABLED."""
    _, _, hidden_dim = gate_up.shape
    inter = down.shape[2]
    return (ENABLED and hidden.is_cuda and torch.version.hip is None and hidden_dim % 64 == 0 and inter % 64 == 0
            and shared_inter % 64 == 0 and gate_up.blocksize == 64 and down.blocksize == 64)


def gate_up(hidden, flat_ids, act, gate_up_w, ptrs, strides, flags, inter, top_k, num_pairs, rows, shared_args,
            shared_inter, chunks, has_shared):
    """Launch the gate_up kernel over `rows` act rows (pairs, then shared chunks) x 16-row tiles."""
    num_experts, _, hidden_dim = gate_up_w.shape
    shared_w, shared_absmax = shared_args
    _nf4_mma_gate_up_kernel[(rows * triton.cdiv(inter, 16),)](
        hidden, ptrs[0], flat_ids, act, shared_w, *ptrs[1:], *shared_absmax,
        inter, hidden_dim, num_experts, top_k, num_pairs, shared_inter, max(chunks, 1),
        hidden.stride(0), strides[0], act.stride(0), strides[3], strides[4],
        DOUBLE_QUANT=flags["DOUBLE_QUANT"], HAS_SHARED=has_shared, WARPS=GATE_UP_WARPS, num_warps=GATE_UP_WARPS,
        PREFETCH=GATE_UP_PREFETCH,
        **_cap("gate_up"), **launch_args(hidden, late=True))


def down(act, flat_ids, route_w, out, down_w, ptrs, strides, flags, gate_logit, num_tokens, top_k, num_pairs,
         shared_args, shared_inter, chunks, has_shared):
    """Launch the down kernel: one program per (token, 16-row tile of H)."""
    num_experts, hidden_dim, inter = down_w.shape
    shared_w, shared_absmax = shared_args
    _nf4_mma_down_kernel[(num_tokens * triton.cdiv(hidden_dim, 16),)](
        act, ptrs[0], flat_ids, route_w, out, shared_w, gate_logit, *ptrs[1:], *shared_absmax,
        hidden_dim, inter, num_experts, shared_inter, num_pairs, max(chunks, 1),
        act.stride(0), strides[0], out.stride(0), gate_logit.stride(0), strides[3], strides[4],
        TOP_K=top_k, DOUBLE_QUANT=flags["DOUBLE_QUANT"], HAS_SHARED=has_shared, WARPS=DOWN_WARPS,
        SPLIT_LOOPS=DOWN_SPLIT_LOOPS,
        num_warps=DOWN_WARPS, **_cap("down"), **launch_args(act, late=True))


def _cap(kernel: str) -> dict:
    return {} if MAXNREG[kernel] is None else {"maxnreg": MAXNREG[kernel]}
