"""NF4 decode GEMVs: levels from a per-lane table in shared memory, products on the tensor cores (Gluon).

Built in notebooks/05_fused_expert_kernel, section 10. The NF4 word path of
`moelab.kernels.experts` is bound by its integer pipe: the `prmt` look-up of a code word's 8
levels takes 21 integer instructions, and an SM's integer pipe retires half as many per clock as
its float pipe. Here a code byte (two nibbles) is an index into a 256-entry table of bf16 level
pairs in shared memory, one copy per lane (32 KB, so that the 32 lanes of a warp always hit 32
different banks): per byte one shift, one `lop3` for the address and one `ld.shared`, 12
instructions per word of which 8 on the integer pipe and 4 on the load/store unit. The codes are
repacked once (`repack`) so that the pairs a lane looks up are exactly its A fragment of an
`mma.m16n8k16` (16 weight rows by 16 values of K); x is the B fragment (every column the same
vector), one `mma` does the 256 multiply-adds of the warp's 32 words, and after a block's 4 words
(64 values of K) its absmax scales the two rows each lane holds.

Repacked format, per NF4 weight [E, R, K] (R % 16 == 0, K % 64 == 0): `frag` int32
[E, R / 16, K / 64, 32, 4], word j of lane l for row tile t and block b; `scale` float16
[E, R / 16, K / 64, 16], the block absmax of the tile's 16 rows (decoded from the double
quantisation once). CUDA only.
"""

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl




TABLE_DECL = gl.constexpr(".shared .align 32768 .b32 nf4_pairs[8192];\nmov.u32 $0, 0;")


def _fill_asm() -> str:
    """PTX: thread b (one table entry each) writes entry $1 to the 32 lane copies of row $2,
    copy (c + b) % 32 at step c, so a warp's 32 stores hit 32 banks."""
    lines = [".reg .b32 a, i, row;", "mov.u32 row, nf4_pairs;", "shl.b32 a, $2, 7;", "add.u32 row, row, a;"]
    for c in range(32):
        lines += [f"add.u32 i, $2, {c};", "and.b32 i, i, 31;", "shl.b32 i, i, 2;", "add.u32 a, row, i;",
                  "st.shared.b32 [a], $1;"]
    return "{\n" + "\n".join(lines + ["mov.u32 $0, 0;"]) + "\n}"


def _block_asm() -> str:
    """PTX for one lane's 64-value block: $0, $1 = $17 + $15 * (row r), $18 + $16 * (row r + 8),
    where row r / r + 8 are the two rows this lane holds of the 16-row tile, summed over the
    block's 4 code words ($2-$5) against x's B fragments ($6-$13, two bf16 pairs per word);
    $14: this lane's table address (the 32 KB-aligned table plus 4 * lane); $15, $16: the rows'
    absmax (float32 bits). Byte i of a word indexes the pair table: its
    entry (at 128 * byte + 4 * lane) is A-fragment register i."""
    lines = [".reg .b32 t, p, a0, a1, a2, a3;", ".reg .f32 d0, d1, d2, d3, z, f, g, acc0, acc1;",
             "mov.f32 z, 0f00000000;"]
    for w in range(4):
        word = f"${2 + w}"
        for i, (op, amount) in enumerate((("shl", 7), ("shr", 1), ("shr", 9), ("shr", 17))):
            lines += [f"{op}.b32 t, {word}, {amount};", "and.b32 p, t, 0x7F80;", "add.u32 p, p, $14;",
                      f"ld.shared.b32 a{i}, [p];"]
        c = "{z, z, z, z}" if w == 0 else "{d0, d1, d2, d3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{d0, d1, d2, d3}}, "
                     f"{{a0, a1, a2, a3}}, {{${6 + 2 * w}, ${7 + 2 * w}}}, {c};")
    lines += ["mov.b32 f, $15;", "mov.b32 acc0, $17;", "fma.rn.f32 acc0, d0, f, acc0;", "mov.b32 $0, acc0;",
              "mov.b32 g, $16;", "mov.b32 acc1, $18;", "fma.rn.f32 acc1, d2, g, acc1;", "mov.b32 $1, acc1;"]
    return "{\n" + "\n".join(lines) + "\n}"


_FILL_ASM = gl.constexpr(_fill_asm())
_BLOCK_ASM = gl.constexpr(_block_asm())
_BLOCK_CONSTRAINTS = gl.constexpr("=r,=r," + ",".join(["r"] * 17))


@gluon.jit
def _table(pairs_ptr, NUM_WARPS: gl.constexpr):
    """Declare and fill the per-lane pair table (one entry per thread and round), then the lane's
    address in it. Every thread of the program reaches the barrier."""
    gl.inline_asm_elementwise(TABLE_DECL, "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    FILL: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])  # past 256 threads, entries repeat
    b = gl.arange(0, 256, layout=FILL)
    gl.inline_asm_elementwise(_FILL_ASM, "=r,r,r", [gl.load(pairs_ptr + b), b], dtype=gl.int32, is_pure=False, pack=1)
    gl.inline_asm_elementwise("bar.sync 0;\nmov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    return gl.inline_asm_elementwise("mov.u32 $0, %laneid;\nshl.b32 $0, $0, 2;\n{\n.reg .b32 t;\n"
                                     "mov.u32 t, nf4_pairs;\nadd.u32 $0, $0, t;\n}", "=r,r", [gl.program_id(0)],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _words(frag_ptr, tile_blk, lane, ok):
    """The 4 code words of one 64-value block per element (lane's A fragments of 4 mmas)."""
    words = frag_ptr + tile_blk * 128 + lane * 4
    return (gl.load(words, mask=ok, other=0), gl.load(words + 1, mask=ok, other=0),
            gl.load(words + 2, mask=ok, other=0), gl.load(words + 3, mask=ok, other=0))


@gluon.jit
def _block(acc0, acc1, w0, w1, w2, w3, scale_ptr, tile_blk, x_pairs, pair0, lane, ok, scale_mul, table):
    """Accumulate one 64-value block per element (rows of the element tensor: any mix of tiles,
    blocks and x rows) from its code words: tile_blk = the (expert, tile, block) index,
    x_pairs + pair0 = x's first bf16 pair of the block."""
    xb = x_pairs + pair0 + lane % 4  # B fragment: x[2 (l % 4) + {0, 1}] and 8 further, per 16-value chunk
    x0 = gl.load(xb, mask=ok, other=0)
    x1 = gl.load(xb + 4, mask=ok, other=0)
    x2 = gl.load(xb + 8, mask=ok, other=0)
    x3 = gl.load(xb + 12, mask=ok, other=0)
    x4 = gl.load(xb + 16, mask=ok, other=0)
    x5 = gl.load(xb + 20, mask=ok, other=0)
    x6 = gl.load(xb + 24, mask=ok, other=0)
    x7 = gl.load(xb + 28, mask=ok, other=0)
    s = scale_ptr + tile_blk * 16 + lane // 4
    s0 = gl.load(s, mask=ok, other=0.0).to(gl.float32) * scale_mul
    s1 = gl.load(s + 8, mask=ok, other=0.0).to(gl.float32) * scale_mul
    return gl.inline_asm_elementwise(
        _BLOCK_ASM, _BLOCK_CONSTRAINTS,
        [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7,
         table, s0, s1, acc0, acc1],
        dtype=(gl.float32, gl.float32), is_pure=False, pack=1)  # not pure: it reads the table, kept after the fill


@gluon.jit
def _gate_up_kernel(x_ptr, frag_ptr, scale_ptr, ids_ptr, act_ptr, pairs_ptr,
                    n_out, num_blocks, num_experts, top_k, stride_xm, stride_am,
                    BLOCK_B: gl.constexpr, LAYOUT: gl.constexpr, NUM_WARPS: gl.constexpr):
    """act[pair, 16 t .. 16 t + 15] = SiLU(gate) * up for one (pair, 16-row tile t)."""
    pid = gl.program_id(0)
    tiles = n_out // 16
    pair = pid // tiles
    tile = pid % tiles
    expert = gl.load(ids_ptr + pair).to(gl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    expert = gl.where(valid, expert, 0)
    blocks = gl.where(valid, num_blocks, 0)
    b = gl.expand_dims(gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, LAYOUT)), 1)
    lane = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)), 0)
    x_pairs = (x_ptr + (pair // top_k).to(gl.int64) * stride_xm).to(gl.pointer_type(gl.int32), bitcast=True)
    gate_tile = (expert.to(gl.int64) * (2 * tiles) + tile) * num_blocks
    up_tile = gate_tile + tiles * num_blocks
    table = _table(pairs_ptr, NUM_WARPS)
    zero = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    g0, g1, u0, u1 = zero, zero, zero, zero
    ok = (b < blocks) & (lane >= 0)
    gw0, gw1, gw2, gw3 = _words(frag_ptr, gate_tile + b, lane, ok)   # step 0's words; each step loads the next's
    uw0, uw1, uw2, uw3 = _words(frag_ptr, up_tile + b, lane, ok)
    for b0 in range(0, blocks, BLOCK_B):
        blk = b0 + b
        ok = (blk < blocks) & (lane >= 0)
        ahead = (blk + BLOCK_B < blocks) & (lane >= 0)
        ng0, ng1, ng2, ng3 = _words(frag_ptr, gate_tile + blk + BLOCK_B, lane, ahead)
        nu0, nu1, nu2, nu3 = _words(frag_ptr, up_tile + blk + BLOCK_B, lane, ahead)
        g0, g1 = _block(g0, g1, gw0, gw1, gw2, gw3, scale_ptr, gate_tile + blk, x_pairs, 32 * blk, lane, ok, 1.0,
                        table)
        u0, u1 = _block(u0, u1, uw0, uw1, uw2, uw3, scale_ptr, up_tile + blk, x_pairs, 32 * blk, lane, ok, 1.0,
                        table)
        gw0, gw1, gw2, gw3 = ng0, ng1, ng2, ng3
        uw0, uw1, uw2, uw3 = nu0, nu1, nu2, nu3
    rows = gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)) // 4
    out = act_ptr + pair.to(gl.int64) * stride_am + tile * 16 + rows
    gate = gl.sum(g0, axis=0)
    gl.store(out, (gate / (1.0 + gl.exp(-gate)) * gl.sum(u0, axis=0)).to(act_ptr.dtype.element_ty))
    gate = gl.sum(g1, axis=0)
    gl.store(out + 8, (gate / (1.0 + gl.exp(-gate)) * gl.sum(u1, axis=0)).to(act_ptr.dtype.element_ty))


@gluon.jit
def _down_item(ids_ptr, token, tile, tiles, item, num_blocks, num_experts, items, lane, TOP_K: gl.constexpr):
    """(tile_blk, ok) of down's work items: item = k * num_blocks + block over the token's top-k."""
    k = gl.minimum(item // num_blocks, TOP_K - 1)
    expert = gl.load(ids_ptr + token.to(gl.int64) * TOP_K + k).to(gl.int32)
    ok = (item < items) & (expert >= 0) & (expert < num_experts) & (lane >= 0)
    expert = gl.where(ok, expert, 0)
    return (expert.to(gl.int64) * tiles + tile) * num_blocks + item % num_blocks, ok


@gluon.jit
def _down_kernel(act_ptr, frag_ptr, scale_ptr, ids_ptr, route_w_ptr, out_ptr, pairs_ptr,
                 n_out, num_blocks, num_experts, stride_am, stride_om,
                 TOP_K: gl.constexpr, BLOCK_B: gl.constexpr, LAYOUT: gl.constexpr, NUM_WARPS: gl.constexpr):
    """out[token, 16 t .. 16 t + 15] = sum_k route_w * (W_down[ids[k]] @ act[pair k]) for one
    (token, 16-row tile t): the top-k experts' blocks are one list of TOP_K * num_blocks items."""
    pid = gl.program_id(0)
    tiles = n_out // 16
    token = pid // tiles
    tile = pid % tiles
    i = gl.expand_dims(gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, LAYOUT)), 1)
    lane = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)), 0)
    table = _table(pairs_ptr, NUM_WARPS)
    acc0 = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    acc1 = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    items = TOP_K * num_blocks
    tile_blk, ok = _down_item(ids_ptr, token, tile, tiles, i, num_blocks, num_experts, items, lane, TOP_K)
    w0, w1, w2, w3 = _words(frag_ptr, tile_blk, lane, ok)   # step 0's words; each step loads the next's
    for i0 in range(0, items, BLOCK_B):
        item = i0 + i
        tile_blk, ok = _down_item(ids_ptr, token, tile, tiles, item, num_blocks, num_experts, items, lane, TOP_K)
        next_blk, next_ok = _down_item(ids_ptr, token, tile, tiles, item + BLOCK_B, num_blocks, num_experts, items,
                                       lane, TOP_K)
        n0, n1, n2, n3 = _words(frag_ptr, next_blk, lane, next_ok)
        pair = token.to(gl.int64) * TOP_K + gl.minimum(item // num_blocks, TOP_K - 1)
        route_w = gl.load(route_w_ptr + pair).to(out_ptr.dtype.element_ty).to(gl.float32)
        x_pairs = (act_ptr + pair * stride_am).to(gl.pointer_type(gl.int32), bitcast=True)
        acc0, acc1 = _block(acc0, acc1, w0, w1, w2, w3, scale_ptr, tile_blk, x_pairs, 32 * (item % num_blocks), lane,
                            ok, route_w, table)
        w0, w1, w2, w3 = n0, n1, n2, n3
    rows = gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)) // 4
    out = out_ptr + token.to(gl.int64) * stride_om + tile * 16 + rows
    gl.store(out, gl.sum(acc0, axis=0).to(out_ptr.dtype.element_ty))
    gl.store(out + 8, gl.sum(acc1, axis=0).to(out_ptr.dtype.element_ty))


def repack(w) -> tuple[torch.Tensor, torch.Tensor]:
    """(frag, scale) of an NF4Tensor [E, R, K]: see the module docstring. One pass on w's device."""
    from ..quant import block_absmax

    num_experts, rows, k = w.shape
    if rows % 16 or k % 64:
        raise ValueError(f"the mma layout needs rows % 16 == 0 and K % 64 == 0, got [{rows}, {k}]")
    codes = w.codes.reshape(num_experts, rows, k // 2)
    nib = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(num_experts, rows // 16, 2, 8, k // 64, 4, 2, 4, 2)
    # dims: e, tile, h (row + 8), g (row in half), block, j (16-chunk), c8 (col + 8), t, p (col + 1)
    nib = nib.permute(0, 1, 4, 3, 7, 5, 6, 2, 8)  # e, tile, block, g, t, j, c8, h, p
    byte = (nib[..., 0] << 4) | nib[..., 1]       # byte (c8, h): slots (4 c8 + 2 h, 4 c8 + 2 h + 1)
    frag = byte.reshape(num_experts, rows // 16, k // 64, 32, 4, 4).contiguous().view(torch.int32)
    frag = frag.reshape(num_experts, rows // 16, k // 64, 32, 4)
    absmax = block_absmax(w).reshape(num_experts, rows // 16, 16, k // 64)
    scale = absmax.permute(0, 1, 3, 2).to(torch.float16).contiguous()
    return frag, scale


@functools.lru_cache(maxsize=None)
def pair_table(device: torch.device) -> torch.Tensor:
    """int32 [256]: entry v = bf16 level of nibble v >> 4 (low half) and of v & 15 (high half),
    on `device` once (a host-to-device copy inside a CUDA graph capture would fail)."""
    from ..quant import NF4_CODE

    bits = NF4_CODE.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    v = torch.arange(256)
    return (bits[v >> 4] | (bits[v & 15] << 16)).to(torch.int32).to(device)


def _layout(num_warps: int, block_b: int):
    return gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[num_warps, 1],
                            order=[1, 0])


def gate_up(x, packed, ids_flat, act, n_out, num_experts, block_b=8, num_warps=8):
    frag, scale = packed
    num_blocks = frag.shape[2]
    _gate_up_kernel[(ids_flat.numel() * (n_out // 16),)](
        x, frag, scale, ids_flat, act, pair_table(x.device), n_out, num_blocks, num_experts,
        ids_flat.numel() // x.shape[0], x.stride(0), act.stride(0),
        BLOCK_B=block_b, LAYOUT=_layout(num_warps, block_b), NUM_WARPS=num_warps, num_warps=num_warps)
    return act


def down(act, packed, ids, route_w, out, num_experts, block_b=16, num_warps=16):
    frag, scale = packed
    num_tokens, top_k = ids.shape
    n_out = out.shape[1]
    _down_kernel[(num_tokens * (n_out // 16),)](
        act, frag, scale, ids, route_w, out, pair_table(act.device), n_out, frag.shape[2], num_experts,
        act.stride(0), out.stride(0), TOP_K=top_k, BLOCK_B=block_b, LAYOUT=_layout(num_warps, block_b),
        NUM_WARPS=num_warps, num_warps=num_warps)
    return out
