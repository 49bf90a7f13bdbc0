"""NF4 decode GEMVs whose products run on the tensor cores (Gluon, `mma.sync`).

Built in notebooks/05_fused_expert_kernel, section 10. The NF4 word path of
`moelab.kernels.experts` spends about 39 instructions per 32-bit code word: 21 to look its 8
nibbles up as bf16 levels (`prmt` byte permutes), 9 to multiply them by x and add them up, the
rest on loads and addresses; it is bound by those instructions, not by HBM. Here the 8 levels of
a word are exactly what one lane holds of the A fragment of an `mma.m16n8k16` (16 weight rows by
16 values of K): the codes are repacked once (`repack`) so that lane l's word carries its
fragment's nibbles, the look-up fills the fragment's 4 registers, and one `mma` does the 256
multiply-adds of the warp's 32 words. x is the B fragment (every one of its 8 columns the same
vector, so every column of the result is the same dot product). A block's 4 words (64 values of K)
go through 4 chained `mma`s, then its absmax scales the two rows each lane holds.

Repacked format, per NF4 weight [E, R, K] (R % 16 == 0, K % 64 == 0): `frag` int32
[E, R / 16, K / 64, 32, 4], word j of lane l for row tile t and block b; `scale` float16
[E, R / 16, K / 64, 16], the block absmax of the tile's 16 rows (decoded from the double
quantisation once). CUDA only.
"""

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .experts import _nf4_bf16_pair_lines, _nf4_code, _weight_args

ENABLED = os.environ.get("MOELAB_NF4_MMA", "1") != "0"


def _block_asm() -> str:
    """PTX for one lane's 64-value block: $0, $1 = $20 + $18 * (row r), $21 + $19 * (row r + 8),
    where row r / r + 8 are the two rows this lane holds of the 16-row tile, summed over the
    block's 4 code words ($2-$5) against x's B fragments ($6-$13, two bf16 pairs per word);
    $14-$17: the look-up table registers; $18, $19: the rows' absmax (float32 bits)."""
    lines = [".reg .b32 m, m1, s, s1, ta, tb, l0, l1, h0, h1, a0, a1, a2, a3;",
             ".reg .f32 d0, d1, d2, d3, z, f, g, acc0, acc1;",
             "mov.f32 z, 0f00000000;"]
    for w in range(4):
        lines += _nf4_bf16_pair_lines(f"${2 + w}", ("a0", "a1", "a2", "a3"), ("$14", "$15", "$16", "$17"))
        c = "{z, z, z, z}" if w == 0 else "{d0, d1, d2, d3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{d0, d1, d2, d3}}, "
                     f"{{a0, a1, a2, a3}}, {{${6 + 2 * w}, ${7 + 2 * w}}}, {c};")
    lines += ["mov.b32 f, $18;", "mov.b32 acc0, $20;", "fma.rn.f32 acc0, d0, f, acc0;", "mov.b32 $0, acc0;",
              "mov.b32 g, $19;", "mov.b32 acc1, $21;", "fma.rn.f32 acc1, d2, g, acc1;", "mov.b32 $1, acc1;"]
    return "{\n" + "\n".join(lines) + "\n}"


_BLOCK_ASM = gl.constexpr(_block_asm())
_BLOCK_CONSTRAINTS = gl.constexpr("=r,=r," + ",".join(["r"] * 20))


@gluon.jit
def _lut(nf4_code_ptr):
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [gl.program_id(0)], dtype=gl.int32,
                                     is_pure=True, pack=1)
    tab = nf4_code_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + 16 + 4 * lane
    return gl.load(tab), gl.load(tab + 1), gl.load(tab + 2), gl.load(tab + 3)


@gluon.jit
def _block(acc0, acc1, frag_ptr, scale_ptr, tile_blk, x_pairs, pair0, lane, ok, scale_mul, lut):
    """Accumulate one 64-value block per element (rows of the element tensor: any mix of tiles,
    blocks and x rows): tile_blk = the (expert, tile, block) index, x_pairs + pair0 = x's first
    bf16 pair of the block."""
    words = frag_ptr + tile_blk * 128 + lane * 4
    w0 = gl.load(words, mask=ok, other=0)
    w1 = gl.load(words + 1, mask=ok, other=0)
    w2 = gl.load(words + 2, mask=ok, other=0)
    w3 = gl.load(words + 3, mask=ok, other=0)
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
         lut[0], lut[1], lut[2], lut[3], s0, s1, acc0, acc1],
        dtype=(gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _gate_up_kernel(x_ptr, frag_ptr, scale_ptr, ids_ptr, act_ptr, nf4_code_ptr,
                    n_out, num_blocks, num_experts, top_k, stride_xm, stride_am,
                    BLOCK_B: gl.constexpr, LAYOUT: gl.constexpr):
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
    lut = _lut(nf4_code_ptr)
    zero = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    g0, g1, u0, u1 = zero, zero, zero, zero
    for b0 in range(0, blocks, BLOCK_B):
        blk = b0 + b
        ok = (blk < blocks) & (lane >= 0)
        g0, g1 = _block(g0, g1, frag_ptr, scale_ptr, gate_tile + blk, x_pairs, 32 * blk, lane, ok, 1.0, lut)
        u0, u1 = _block(u0, u1, frag_ptr, scale_ptr, up_tile + blk, x_pairs, 32 * blk, lane, ok, 1.0, lut)
    rows = gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)) // 4
    out = act_ptr + pair.to(gl.int64) * stride_am + tile * 16 + rows
    gate = gl.sum(g0, axis=0)
    gl.store(out, (gate / (1.0 + gl.exp(-gate)) * gl.sum(u0, axis=0)).to(act_ptr.dtype.element_ty))
    gate = gl.sum(g1, axis=0)
    gl.store(out + 8, (gate / (1.0 + gl.exp(-gate)) * gl.sum(u1, axis=0)).to(act_ptr.dtype.element_ty))


@gluon.jit
def _down_kernel(act_ptr, frag_ptr, scale_ptr, ids_ptr, route_w_ptr, out_ptr, nf4_code_ptr,
                 n_out, num_blocks, num_experts, stride_am, stride_om,
                 TOP_K: gl.constexpr, BLOCK_B: gl.constexpr, LAYOUT: gl.constexpr):
    """out[token, 16 t .. 16 t + 15] = sum_k route_w * (W_down[ids[k]] @ act[pair k]) for one
    (token, 16-row tile t): the top-k experts' blocks are one list of TOP_K * num_blocks items."""
    pid = gl.program_id(0)
    tiles = n_out // 16
    token = pid // tiles
    tile = pid % tiles
    i = gl.expand_dims(gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, LAYOUT)), 1)
    lane = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LAYOUT)), 0)
    lut = _lut(nf4_code_ptr)
    acc0 = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    acc1 = gl.zeros([BLOCK_B, 32], gl.float32, LAYOUT)
    items = TOP_K * num_blocks
    for i0 in range(0, items, BLOCK_B):
        item = i0 + i
        k = gl.minimum(item // num_blocks, TOP_K - 1)
        blk = item % num_blocks
        pair = token.to(gl.int64) * TOP_K + k
        expert = gl.load(ids_ptr + pair).to(gl.int32)
        ok = (item < items) & (expert >= 0) & (expert < num_experts) & (lane >= 0)
        expert = gl.where(ok, expert, 0)
        route_w = gl.load(route_w_ptr + pair).to(out_ptr.dtype.element_ty).to(gl.float32)
        tile_blk = (expert.to(gl.int64) * tiles + tile) * num_blocks + blk
        x_pairs = (act_ptr + pair * stride_am).to(gl.pointer_type(gl.int32), bitcast=True)
        acc0, acc1 = _block(acc0, acc1, frag_ptr, scale_ptr, tile_blk, x_pairs, 32 * blk, lane, ok, route_w, lut)
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


def _layout(num_warps: int, block_b: int):
    return gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[num_warps, 1],
                            order=[1, 0])


def gate_up(x, packed, ids_flat, act, n_out, num_experts, block_b=8, num_warps=8):
    frag, scale = packed
    num_blocks = frag.shape[2]
    _gate_up_kernel[(ids_flat.numel() * (n_out // 16),)](
        x, frag, scale, ids_flat, act, _nf4_code(x.device), n_out, num_blocks, num_experts,
        ids_flat.numel() // x.shape[0], x.stride(0), act.stride(0),
        BLOCK_B=block_b, LAYOUT=_layout(num_warps, block_b), num_warps=num_warps)
    return act


def down(act, packed, ids, route_w, out, num_experts, block_b=16, num_warps=16):
    frag, scale = packed
    num_tokens, top_k = ids.shape
    n_out = out.shape[1]
    _down_kernel[(num_tokens * (n_out // 16),)](
        act, frag, scale, ids, route_w, out, _nf4_code(act.device), n_out, frag.shape[2], num_experts,
        act.stride(0), out.stride(0), TOP_K=top_k, BLOCK_B=block_b, LAYOUT=_layout(num_warps, block_b),
        num_warps=num_warps)
    return out
