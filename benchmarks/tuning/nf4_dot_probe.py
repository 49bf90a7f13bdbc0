"""A probe, kept with its result: the NF4 decode gate_up at one token on the tensor cores.

Question: moelab's NF4 GEMV (`moelab.kernels.experts._gemv_gate_up_kernel`) issues about 13
instructions per weight value (benchmarks/tuning/sass_count.py), 6 of them for its fp32 look-up.
Would bf16 levels (a byte-permute look-up of about 3 instructions per value, checked here by
emulating the PTX in Python) fed to `tl.dot` against x padded to 16 rows do better? Compiled for
sm_90 the loop came to about 6.7 instructions per value, but Triton converts the looked-up tile
into the mma operand layout (shuffles, repacking) and pads x in shared memory.

Measured on an H200 (benchmarks/results/probe_nf4_dot_2026-11-29_h200.json, Qwen1.5-MoE gate_up,
4 pairs): the package's kernel 18.0 us; this probe at best 24.8 us (interleaved levels, one dot per
64-value block, 32 rows, 2 warps), 33-88 us otherwise. Not adopted: fewer instructions in the
loop did not make it faster; the layout conversions and synchronisation around the dot cost more.

    TRITON_INTERPRET=0 python benchmarks/tuning/nf4_dot_probe.py       # on a CUDA machine
    python -c "import benchmarks.tuning.nf4_dot_probe as p; p.check_lookup()"   # anywhere
"""
import json
import os
import random
import struct

import torch
import triton
import triton.language as tl

from moelab.kernels.experts import _nf4_absmax
from moelab.quant import NF4_CODE


def nf4_bf16_asm():
    bits = [b & 0xFFFF for b in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    lo = [b & 0xFF for b in bits]; hi = [b >> 8 for b in bits]
    w = lambda t, n0: f"0x{sum(t[n0 + i] << (8 * i) for i in range(4)):08X}"
    L = [w(lo, n) for n in (0, 4, 8, 12)]; H = [w(hi, n) for n in (0, 4, 8, 12)]
    lines = [".reg .b32 q, c, s, la, lb, ha, hb, l, h;"]
    for half in (0, 1):
        src = "$4" if half == 0 else "q"
        if half == 1:
            lines.append("shr.b32 q, $4, 16;")
        lines += [f"and.b32 c, {src}, 0x7777;",                       # 3-bit indices, sign mode off
                  f"shr.b32 s, {src}, 1;",
                  "lop3.b32 s, s, 0x4444, 0x3210, 0xEA;",             # (s & 0x4444) | 0x3210: byte i from b if bit 3
                  f"prmt.b32 la, {L[0]}, {L[1]}, c;", f"prmt.b32 lb, {L[2]}, {L[3]}, c;", "prmt.b32 l, la, lb, s;",
                  f"prmt.b32 ha, {H[0]}, {H[1]}, c;", f"prmt.b32 hb, {H[2]}, {H[3]}, c;", "prmt.b32 h, ha, hb, s;",
                  # l, h bytes: [lo(b0), hi(b0), lo(b1), hi(b1)] of this half's two code bytes
                  f"prmt.b32 ${half}, l, h, 0x7351;",                 # high nibbles: bf16 of values 2i
                  f"prmt.b32 ${2 + half}, l, h, 0x6240;"]             # low nibbles: bf16 of values 2i + 1
    return "{\n" + "\n".join(lines) + "\n}"

M = 0xFFFFFFFF
def prmt(a, b, c):
    pool = (a & M) | ((b & M) << 32); out = 0
    for i in range(4):
        s = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (s & 7))) & 0xFF
        if s & 8: byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out
def lop3(a, b, c, lut):
    r = 0
    for bit in range(32):
        i = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        r |= ((lut >> i) & 1) << bit
    return r
def run(asm, word):
    regs = {"$4": word}
    val = lambda t: regs[t] if t in regs else int(t, 0)
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(("{", "}", ".reg")): continue
        op, args = line.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        d, s = a[0], [val(t) for t in a[1:]]
        r = {"and.b32": lambda: s[0] & s[1], "or.b32": lambda: s[0] | s[1], "shr.b32": lambda: s[0] >> s[1],
             "prmt.b32": lambda: prmt(*s), "lop3.b32": lambda: lop3(*s)}[op]()
        regs[d] = r & M
    return [regs[f"${i}"] for i in range(4)]

def check_lookup():
    """The byte-permute look-up emulated in Python against the bf16 code book (runs anywhere)."""
    asm = nf4_bf16_asm(); print(asm); print(len([l for l in asm.splitlines() if "." in l and not l.startswith(".reg")]), "instr")
    bits = [b & 0xFFFF for b in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    bad = 0
    for _ in range(3000):
        bs = [random.randrange(256) for _ in range(4)]
        out = run(asm, bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24)
        hi = [bits[b >> 4] for b in bs]; lo = [bits[b & 15] for b in bs]
        exp = [hi[0] | hi[1] << 16, hi[2] | hi[3] << 16, lo[0] | lo[1] << 16, lo[2] | lo[3] << 16]
        bad += out != exp
    print("bad", bad)



ASM = tl.constexpr(nf4_bf16_asm())

@triton.jit
def _levels(byte, code_ptr, ASM_ON: tl.constexpr):
    if ASM_ON:
        hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [byte], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=4)
    else:
        b = byte.to(tl.int32)
        hi = tl.load(code_ptr + (b >> 4)).to(tl.bfloat16)
        lo = tl.load(code_ptr + (b & 15)).to(tl.bfloat16)
    return hi, lo

@triton.jit
def _block(w_e, rows, row_ok, k0, row_bytes, x_row, code_ptr, ASM_ON: tl.constexpr, JOIN: tl.constexpr):
    """[BN, 16] = W_levels[rows, k0:k0+64] @ x[k0:k0+64] padded to 16 columns (column 0 real)."""
    j = tl.arange(0, 32)
    r = tl.arange(0, 16)
    byte = tl.load(w_e + rows[:, None].to(tl.int64) * row_bytes + (k0 // 2 + j)[None, :], mask=row_ok[:, None], other=0)
    hi, lo = _levels(byte, code_ptr, ASM_ON)
    if JOIN:
        w = tl.reshape(tl.join(hi, lo), (rows.shape[0], 64))
        kk = tl.arange(0, 64)
        xt = tl.load(x_row + k0 + kk[:, None] + 0 * r[None, :], mask=(r == 0)[None, :], other=0.0)  # [64, 16]
        return tl.dot(w, xt)
    xe = tl.load(x_row + k0 + 2 * j[:, None] + 0 * r[None, :], mask=(r == 0)[None, :], other=0.0)  # [32, 16]
    xo = tl.load(x_row + k0 + 1 + 2 * j[:, None] + 0 * r[None, :], mask=(r == 0)[None, :], other=0.0)
    return tl.dot(lo, xo, tl.dot(hi, xe))

@triton.jit
def gate_up_dot(x_ptr, w_ptr, ids_ptr, act_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                code_ptr, n_out, k_dim, top_k, stride_xm, stride_we, stride_am, absmax_per_expert, scales_per_expert,
                ASM_ON: tl.constexpr, JOIN: tl.constexpr, BLOCK_N: tl.constexpr, PIPELINE: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    pair = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + pair).to(tl.int32)
    row_bytes = k_dim // 2
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    blocks_per_row = k_dim // 64
    for k0 in tl.range(0, k_dim, 64, num_stages=PIPELINE):
        g = _block(w_e, n, n_ok, k0, row_bytes, x_row, code_ptr, ASM_ON, JOIN)
        u = _block(w_e, n + n_out, n_ok, k0, row_bytes, x_row, code_ptr, ASM_ON, JOIN)
        am_g = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                           n.to(tl.int64) * blocks_per_row + k0 // 64, n_ok, absmax_per_expert, scales_per_expert, True)
        am_u = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                           (n + n_out).to(tl.int64) * blocks_per_row + k0 // 64, n_ok, absmax_per_expert,
                           scales_per_expert, True)
        acc += g * am_g[:, None]
        acc_up += u * am_u[:, None]
    gate = tl.sum(acc, axis=1)   # columns 1..15 are zero
    up = tl.sum(acc_up, axis=1)
    out = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + pair.to(tl.int64) * stride_am + n, out.to(act_ptr.dtype.element_ty), mask=n_ok)


def main():

    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
    import moelab.kernels.experts as E
    from moelab.bench import _time_graph
    from moelab.models import preset_config
    from moelab.quant import NF4Experts, dequantize_nf4

    torch.manual_seed(0)
    cfg = preset_config("qwen1.5-moe-a2.7b")
    NE, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    experts = Qwen2MoeExperts(cfg).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02); experts.down_proj.normal_(0, 0.02)
    nf4 = NF4Experts.from_experts(experts).to("cuda")
    gu = nf4.gate_up
    R = 8
    xs = [torch.randn(1, H, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
    idss = [torch.randperm(NE, device="cuda")[:4].to(torch.int32) for _ in range(R)]
    deq = dequantize_nf4(gu).float()
    ptrs, strides, flags = E._weight_args(gu, NE)
    act = torch.empty(4, I, device="cuda", dtype=torch.bfloat16)
    rows = []
    def ref(i):
        w = deq[idss[i].long()]                      # [4, 2I, H]
        h = torch.einsum("ph,prh->pr", xs[i].float().expand(4, H), w)
        g, u = h[:, :I], h[:, I:]
        return torch.nn.functional.silu(g) * u

    def package(i, cfgd):
        E._gemv_gate_up_kernel[(4 * triton.cdiv(I, cfgd["BLOCK_N"]),)](
            xs[i], ptrs[0], idss[i], act, xs[i], *ptrs[1:], I, H, NE, 4, 4, 0, 1,
            xs[i].stride(0), strides[0], strides[1], act.stride(0), 0, strides[3], strides[4], HAS_SHARED=False, **flags, **cfgd)

    def proto(i, bn, warps, stages, join=False):
        gate_up_dot[(4 * triton.cdiv(I, bn),)](
            xs[i], ptrs[0], idss[i], act, ptrs[1], ptrs[2], ptrs[3], ptrs[4], ptrs[5], I, H, 4, xs[i].stride(0), strides[0],
            act.stride(0), strides[3], strides[4], ASM_ON=True, JOIN=join, BLOCK_N=bn, PIPELINE=stages, num_warps=warps)

    def check_and_time(name, fn):
        try:
            fn(0); torch.cuda.synchronize()
            err = float((act.float() - ref(0)).norm() / ref(0).norm())
            us = _time_graph(fn, R)
            rows.append(dict(kernel=name, us=round(us, 2), rel_err=err)); print(rows[-1], flush=True)
        except Exception as e:
            rows.append(dict(kernel=name, error=f"{type(e).__name__}: {str(e)[:150]}")); print(rows[-1], flush=True)

    base = E.gemv_config(4, I, True, True, True)
    check_and_time(f"package {base}", lambda i: package(i, dict(base)))
    for bn in (16, 32, 64):
        for warps in (1, 2, 4):
            if bn // 16 < warps and bn < 64: continue
            for stages in (1, 3, 6):
                check_and_time(f"proto BN={bn} w={warps} st={stages}", lambda i, bn=bn, w=warps, st=stages: proto(i, bn, w, st))
    for bn, warps, stages in ((32, 1, 3), (32, 2, 3), (64, 4, 3)):
        check_and_time(f"proto join BN={bn} w={warps} st={stages}", lambda i, bn=bn, w=warps, st=stages: proto(i, bn, w, st, True))
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_nf4_dot.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
