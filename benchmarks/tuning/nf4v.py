"""NF4 GEMV variants (decode, T=1..few) to find what limits the package's NF4 decode kernel."""
import torch, triton
import triton.language as tl

from moelab.kernels.experts import _nf4_absmax  # the package's block-absmax decode

# bf16 bits of the NF4 levels, split into low and high bytes, packed 4 per 32-bit word (entries 0-3, 4-7, 8-11, 12-15)
def _tables():
    from moelab.quant import NF4_CODE
    bits = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    lo = [b & 0xFF for b in bits]; hi = [b >> 8 for b in bits]
    pack = lambda t, i: t[i] | t[i+1] << 8 | t[i+2] << 16 | t[i+3] << 24
    return [pack(lo, i) for i in (0, 4, 8, 12)] + [pack(hi, i) for i in (0, 4, 8, 12)]
T = _tables()

# 4 code bytes in $8 -> high-nibble values $0..$3, low-nibble values $4..$7 (fp32 with bf16 precision).
# prmt selects with the low 16 bits only, so the two 16-bit halves of $8 are looked up separately.
_ASM_FULL = """
{
.reg .b32 c0, c1, m0, m1, t0, t1, la, lb, ha, hb, l0, h0, l1, h1, p, q;
and.b32 c0, $8, 0x7777;
shr.b32 c1, $8, 16;
and.b32 c1, c1, 0x7777;
shr.b32 t1, $8, 16;
prmt.b32 t0, 0x80808080, 0x80808080, $8;
prmt.b32 t1, 0x80808080, 0x80808080, t1;
xor.b32 t0, t0, 0x80808080;
xor.b32 t1, t1, 0x80808080;
shl.b32 m0, t0, 1;
shl.b32 m1, t1, 1;
or.b32 m0, m0, t0;
or.b32 m1, m1, t1;
prmt.b32 la, LO0, LO1, c0;
prmt.b32 lb, LO2, LO3, c0;
lop3.b32 l0, la, lb, m0, 0xD8;
prmt.b32 ha, HI0, HI1, c0;
prmt.b32 hb, HI2, HI3, c0;
lop3.b32 h0, ha, hb, m0, 0xD8;
prmt.b32 la, LO0, LO1, c1;
prmt.b32 lb, LO2, LO3, c1;
lop3.b32 l1, la, lb, m1, 0xD8;
prmt.b32 ha, HI0, HI1, c1;
prmt.b32 hb, HI2, HI3, c1;
lop3.b32 h1, ha, hb, m1, 0xD8;
prmt.b32 p, l0, h0, 0x5140;
prmt.b32 q, l0, h0, 0x7362;
shl.b32 $4, p, 16;
and.b32 $0, p, 0xFFFF0000;
shl.b32 $5, q, 16;
and.b32 $1, q, 0xFFFF0000;
prmt.b32 p, l1, h1, 0x5140;
prmt.b32 q, l1, h1, 0x7362;
shl.b32 $6, p, 16;
and.b32 $2, p, 0xFFFF0000;
shl.b32 $7, q, 16;
and.b32 $3, q, 0xFFFF0000;
}
"""
for name, v in zip(["LO0", "LO1", "LO2", "LO3", "HI0", "HI1", "HI2", "HI3"], T):
    _ASM_FULL = _ASM_FULL.replace(name, str(v))
ASM = _ASM_FULL
ASM_C = tl.constexpr(ASM)
# Selector nibbles of byte i (bits 8i..8i+7 of the word): lo_i at nibble 2i, hi_i at nibble 2i+1 of c.
# prmt takes 4 selector nibbles (low 16 bits): c0 = [lo0, hi0, lo1, hi1], c1 = [lo2, hi2, lo3, hi3].
# l0 = low bytes of the bf16 levels of [lo0, hi0, lo1, hi1], h0 the high bytes.
# p = [l0.b0, h0.b0, l0.b1, h0.b1] = bf16(lo0) | bf16(hi0) << 16 ; q = the same for lo1, hi1.


@triton.jit
def _lookup(byte, code_ptr, LOOKUP: tl.constexpr):
    """fp32 levels of the high and low nibbles of `byte` (uint8)."""
    if LOOKUP == 0:
        b = byte.to(tl.int32)
        return tl.load(code_ptr + (b >> 4)), tl.load(code_ptr + (b & 15))
    elif LOOKUP == 1:
        hi, lo = tl.inline_asm_elementwise(ASM_C, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        return hi, lo
    elif LOOKUP == 2:
        b = byte.to(tl.int32)
        return (b >> 4).to(tl.float32) * 0.125 - 1.0, (b & 15).to(tl.float32) * 0.125 - 1.0
    else:
        b = byte.to(tl.int32)
        return _tree(b >> 4, code_ptr), _tree(b & 15, code_ptr)


@triton.jit
def _tree(n, code_ptr):
    c0 = tl.load(code_ptr + 0); c1 = tl.load(code_ptr + 1); c2 = tl.load(code_ptr + 2); c3 = tl.load(code_ptr + 3)
    c4 = tl.load(code_ptr + 4); c5 = tl.load(code_ptr + 5); c6 = tl.load(code_ptr + 6); c7 = tl.load(code_ptr + 7)
    c8 = tl.load(code_ptr + 8); c9 = tl.load(code_ptr + 9); c10 = tl.load(code_ptr + 10); c11 = tl.load(code_ptr + 11)
    c12 = tl.load(code_ptr + 12); c13 = tl.load(code_ptr + 13); c14 = tl.load(code_ptr + 14); c15 = tl.load(code_ptr + 15)
    b0 = (n & 1) != 0
    b1 = (n & 2) != 0
    b2 = (n & 4) != 0
    b3 = (n & 8) != 0
    v01 = tl.where(b0, c1, c0); v23 = tl.where(b0, c3, c2); v45 = tl.where(b0, c5, c4); v67 = tl.where(b0, c7, c6)
    v89 = tl.where(b0, c9, c8); vab = tl.where(b0, c11, c10); vcd = tl.where(b0, c13, c12); vef = tl.where(b0, c15, c14)
    v03 = tl.where(b1, v23, v01); v47 = tl.where(b1, v67, v45); v8b = tl.where(b1, vab, v89); vcf = tl.where(b1, vef, vcd)
    v07 = tl.where(b2, v47, v03); v8f = tl.where(b2, vcf, v8b)
    return tl.where(b3, v8f, v07)


@triton.jit
def _rows(w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr,
          x_row_ptr, x_scale, expert, rows, row_ok, k0, k_dim, row_bytes, absmax_per_expert, scales_per_expert,
          LOOKUP: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.arange(0, BLOCK_K // 64)
    j = tl.arange(0, 32)
    col = k0 + 64 * b[:, None] + 2 * j[None, :]
    col_ok = col < k_dim
    block_ok = k0 + 64 * b < k_dim
    mask = (row_ok[:, None] & block_ok[None, :])[:, :, None]
    row_start = tl.multiple_of(rows.to(tl.int64) * row_bytes, 16) + k0 // 2
    off = row_start[:, None, None] + (32 * b[:, None] + j[None, :])[None, :, :]
    off = tl.max_contiguous(tl.multiple_of(off, [1, 1, 16]), [1, 1, 16])
    byte = tl.load(w_ptr + off, mask=mask, other=0)
    x_even = tl.load(x_row_ptr + col, mask=col_ok, other=0.0).to(tl.float32) * x_scale
    x_odd = tl.load(x_row_ptr + col + 1, mask=col_ok, other=0.0).to(tl.float32) * x_scale
    hi, lo = _lookup(byte, code_ptr, LOOKUP)
    pair_sum = hi * x_even[None, :, :] + lo * x_odd[None, :, :]
    blk = rows.to(tl.int64) * (k_dim // 64) + k0 // 64
    ok = row_ok[:, None] & block_ok[None, :]
    am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                 blk[:, None] + b[None, :], ok, absmax_per_expert, scales_per_expert, True)
    return pair_sum * am[:, :, None]


@triton.jit
def gate_up_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                   code_ptr, n_out, k_dim, row_bytes, top_k, stride_xm, stride_we, stride_am,
                   absmax_per_expert, scales_per_expert,
                   LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    pair = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int32)
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_K // 64, 32), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K // 64, 32), dtype=tl.float32)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=STAGES):
        acc += _rows(w_e, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr, x_row, 1.0,
                     expert, n, n_ok, k0, k_dim, row_bytes, absmax_per_expert, scales_per_expert, LOOKUP, BLOCK_K)
        acc_up += _rows(w_e, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, code_ptr, x_row, 1.0,
                        expert, n + n_out, n_ok, k0, k_dim, row_bytes, absmax_per_expert, scales_per_expert, LOOKUP, BLOCK_K)
    gate = tl.sum(tl.sum(acc, axis=2), axis=1)
    up = tl.sum(tl.sum(acc_up, axis=2), axis=1)
    tl.store(act_ptr + pair.to(tl.int64) * stride_am + n, (gate * tl.sigmoid(gate) * up).to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def down_kernel(act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                absmax_offset_ptr, code_ptr, n_out, k_dim, row_bytes, stride_am, stride_we, stride_om,
                absmax_per_expert, scales_per_expert,
                TOP_K: tl.constexpr, LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGES: tl.constexpr = 1):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    token = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    acc = tl.zeros((BLOCK_N, BLOCK_K // 64, 32), dtype=tl.float32)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=STAGES):
        for k in tl.static_range(TOP_K):
            pair = token.to(tl.int64) * TOP_K + k
            expert = tl.load(ids_ptr + pair).to(tl.int32)
            acc += _rows(w_ptr + expert.to(tl.int64) * stride_we, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                         absmax_offset_ptr, code_ptr, act_ptr + pair * stride_am, tl.load(route_w_ptr + pair).to(tl.float32),
                         expert, n, n_ok, k0, k_dim, row_bytes, absmax_per_expert, scales_per_expert, LOOKUP, BLOCK_K)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + n, tl.sum(tl.sum(acc, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)


def forward(hidden, route_w, ids, gu, dn, code, lookup, cfg_gu, cfg_dn):
    """hidden [T, H] bf16; gu / dn NF4Tensor (double quant)."""
    T_, K_ = ids.shape
    P = T_ * K_
    E, R, H = gu.shape
    I = R // 2
    flat = ids.reshape(-1).contiguous()
    rw = route_w.reshape(-1).contiguous()
    act = torch.empty(P, I, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty(T_, H, dtype=hidden.dtype, device=hidden.device)
    gate_up_kernel[(P * triton.cdiv(I, cfg_gu["BLOCK_N"]),)](
        hidden, gu.codes, flat, act, gu.absmax, gu.absmax_code, gu.absmax_scale, gu.absmax_offset, code,
        I, H, H // 2, K_, hidden.stride(0), gu.codes.stride(0), act.stride(0), gu.absmax.stride(0), gu.absmax_scale.stride(0),
        LOOKUP=lookup, **cfg_gu)
    down_kernel[(T_ * triton.cdiv(H, cfg_dn["BLOCK_N"]),)](
        act, dn.codes, flat, rw, out, dn.absmax, dn.absmax_code, dn.absmax_scale, dn.absmax_offset, code,
        H, I, I // 2, act.stride(0), dn.codes.stride(0), out.stride(0), dn.absmax.stride(0), dn.absmax_scale.stride(0),
        TOP_K=K_, LOOKUP=lookup, **cfg_dn)
    return out
