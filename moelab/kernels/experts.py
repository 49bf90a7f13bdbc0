"""The fused routed-experts kernels: grouped by expert on the device, bf16 / fp32 and NF4.

Built in notebooks/05_fused_expert_kernel. One MoE layer's routed experts in four launches,
with no host sync (so a CUDA graph can capture them):

1. `_align_kernel` (`align_by_expert`): each program takes a few experts, counts the
   (token, k) pairs routed to each and writes their pair indices, in pair order, into
   `pairs[start_e : start_e + count_e]` (a stable counting sort; `start_e` = the pairs of
   lower experts). Bucket E collects ids outside [0, E).
2. `_grouped_gemm_kernel` (gate_up): each program takes one row block of BLOCK_M sorted
   pairs, all of one expert, and one N-tile. It finds its expert and rows from `counts`
   itself (a cumulative sum over E block counts), so the grid is sized for the worst case,
   cdiv(S, BLOCK_M) + min(E + 1, S) blocks, and the blocks past the end skip their work.
   Programs are ordered in groups of 8 row blocks x all N-tiles, so rows and weights are
   reused from L2. Gate and up tiles share each load of x; SiLU(gate) * up is applied
   before the one store.
3. the same kernel (down): the routing weight of each pair is applied before the store.
4. `_topk_sum_kernel`: the sum over the top-k rows of each token (deterministic: no atomics;
   PyTorch's sum under the interpreter).

Long prefills add three refinements: above 256 pairs NF4 experts are dequantized once per
call into a dense copy (`nf4_to_dense`) that the dense kernels run; above 8,192 pairs the align
step takes two passes over 256-pair chunks (`_align_count_kernel`, `_align_scatter_kernel`)
instead of one scan per expert; and a block holding at most half its rows (an expert's last,
partial block) runs at half the rows (`HALF_TAIL`), so its padding costs half the tensor-core
work.

Decode at the fewest tokens (bf16 up to 16 pairs, NF4 up to 64: GEMV_MAX_PAIRS*) skips
grouping: two launches instead of four. There the layer's shared expert (`SharedExpert`,
notebooks/08 section 7; dense, or NF4 beside NF4 experts) can ride along: its gate/up as C more
rows per token in the first launch, its down behind its sigmoid gate in the second's sum. `_gemv_gate_up_kernel` runs one program per (pair,
N-tile), streaming BLOCK_N gate and up rows of the pair's expert with 16-byte loads and one
FMA per weight into an fp32 [BLOCK_N, BLOCK_K] accumulator summed once at the end (no tl.dot
padding a single token to 16 rows); `_gemv_down_kernel` runs one program per (token,
N-tile) over its top-k experts with the routing weights applied and the top-k sum folded in
(one rounding, no per-pair output, no sum kernel). With few pairs an expert is rarely named
twice, so the bytes read are about those of the touched experts. Between that and 64 tokens
the grouped kernel uses BLOCK_M = 16: a block per touched expert, so every touched expert's
weights are read once and the 16-row padding costs tensor-core work, not bytes. Prefill uses
large blocks. NF4 from 8 to 64 tokens (NF4_MMA_FROM_PAIRS) takes neither on CUDA but
`moelab.kernels.nf4_mma`: grouped by expert the same way, up to 8 pairs of one expert at a time
meet each decoded tile as the 8 columns of an `mma.sync` (notebooks/05 section 14).

The NF4 variant reads the 4-bit codes and dequantizes in registers, following
`moelab.quant`'s storage (notebooks/04): flat value i of expert e sits in byte i // 2 (high
nibble for even i), its block absmax is absmax[e, i // 64], itself 8-bit coded with a
per-256-block scale and a per-expert offset under double quantisation. Even and odd values
of a K-tile come from the high and low nibbles of one byte load; they are multiplied with
the even and odd columns of x (two dots in the grouped kernel, two FMAs in the decode
kernels), so no interleaving is needed. On CUDA the nibbles become fp32 levels through byte
permutes in registers (`_nf4_prmt_asm`: no memory access, where the 16-entry code book in
memory costs a load per value); under the interpreter through that code book. The
decode kernels load the codes as [rows, 64-blocks, 32 bytes] tiles so each block's absmax is
decoded once per row and broadcast over its 32 bytes. On CUDA, where a row is whole 64-blocks,
they go further (`_nf4_words`): 32-bit code words, each meeting its 8 values of x (read as bf16
pairs) in one piece of PTX (`NF4_DOT_ASM`) that looks the levels up in bf16 and multiplies two
at a time in bf16x2: about 5 instructions per value in the compiled loop against about 13.
The experts' two decode GEMVs look each code byte up in a 256-entry table of bf16 level pairs
in shared memory instead (`NF4_DOT_SMEM_ASM`, `NF4_SMEM_KERNELS`): compiled for sm_90, 11
integer-pipe instructions per code word in gate_up's loop where the `prmt` look-up takes 27
(benchmarks/tuning/nf4_pipe_count.py), the integer pipe retiring half as many a clock as the
float pipe.
One token's NF4 GEMV is not bound by its 4x fewer bytes: on an H100 the old path took one
layer 31.4 us against bf16's 28.9, whatever the absmax format
(benchmarks/results/probe_nf4_latency_2026-12-06_h100.json), the word path 22.1 against 29.0
(experts_2026-12-06_h100.json), tuned 21.1 against 28.7 (experts_2026-12-06_h100_run1.json).
ncu (ncu_nf4_gemv_2026-12-06_h100.txt) shows why: a few hundred programs fill 0.38 of one wave,
2.5 warps per scheduler, each waiting on its loads with too little work in between, so the
kernels reach about 1 TB/s of codes where bf16 streams 2.4 TB/s. The NF4 shared expert rides
the same two launches as the bf16 one (`SharedExpert` of one-expert NF4Tensors).
Two ways to keep more of one token's code words in flight were measured on an H100 and dropped
(notebooks/05 section 12): `x` staged in shared memory (gate_up slower, down over the 48 KB of
static shared memory; nf4_xsmem_ab_2026-12-07_h100.json) and the experts and shared chunks as
one tile axis (every code-word load before the first product, but 64 registers with spills and
one 32-warp program an SM: the routed layer at one token 16.5-17.1 -> 22.8 us with down so built,
26.6 with gate_up; the batch-1 step 1.61-1.62 -> 2.10-2.14 ms; nf4_items_ab_2026-12-07_h100.json,
the code at commit 6701b1e). Nor did giving down gate_up's shape help: one program per (16-row
N-tile, item), the top-k experts and the shared expert's K in 1,536-value chunks, each tile's
partials summed by its last program (an atomic ticket), left the layer with the shared expert at
29.3-29.6 against 29.5-29.8 us and made it slower without (nf4_down_split_ab_2026-12-07_h100.json,
the code at commit 6db0997). Nor did the tensor cores, this time in the package's own NF4 format
(notebooks/05 section 13): `mma.m16n8k16` with the weights as A and x in every column of B, K
permuted so that each lane's A registers come from 8 contiguous code bytes of its two rows, each
byte one look-up in the pair table; exact products (4.5e-3 from dequantize-then-matmul against
the word path's 6.2e-3), but the layer with the shared expert 29.4-30.7 against 29.6-30.6 us,
22-27 % slower without it, the batch-1 step 1 % slower (nf4_mma_kernels_*_2026-12-07_h100.json,
nf4_mma_ab_run3_2026-12-07_h100.json; the code at commit 6f4391b).

Decode GEMVs have no data reuse to hide memory latency behind: bytes in flight set their
speed, so their K-loops are software-pipelined (`tl.range(..., num_stages=PIPELINE)`: the
next K-steps' weights are copied into shared memory while this one is multiplied).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pdl import launch_args, let_next_kernel_start, wait_for_previous_kernel


@triton.jit
def _align_kernel(ids_ptr, counts_ptr, pairs_ptr, num_pairs, num_experts,
                  BLOCK_S: tl.constexpr, GROUP: tl.constexpr):
    """Program g handles experts g * GROUP ... (g + 1) * GROUP - 1 (expert E: the bucket of ids
    outside [0, E)): writes counts[e] and the indices of the pairs routed to e, in pair order,
    at pairs[start_e:], start_e = the pairs in lower buckets. A stable counting sort."""
    experts = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    before = tl.zeros((GROUP,), dtype=tl.int32)
    count = tl.zeros((GROUP,), dtype=tl.int32)
    for s0 in range(0, num_pairs, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        bucket = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)[:, None]
        before += tl.sum((ok[:, None] & (bucket < experts[None, :])).to(tl.int32), axis=0)
        count += tl.sum((ok[:, None] & (bucket == experts[None, :])).to(tl.int32), axis=0)
    tl.store(counts_ptr + experts, count, mask=experts <= num_experts)
    for s0 in range(0, num_pairs, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        bucket = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)[:, None]
        match = (ok[:, None] & (bucket == experts[None, :])).to(tl.int32)      # [BLOCK_S, GROUP]
        pos = before[None, :] + tl.cumsum(match, axis=0) - 1
        tl.store(pairs_ptr + pos, offs[:, None] + 0 * pos, mask=match != 0)  # each pair once
        before += tl.sum(match, axis=0)


@triton.jit
def _align_count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, num_experts, BLOCK_S: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """Chunked align, pass 1: program c counts the pairs of chunk c (BLOCK_S pairs) per bucket
    (expert E: ids outside [0, E)) into chunk_counts[c, :]."""
    offs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    bucket = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    b = tl.arange(0, BLOCK_E)
    count = tl.sum((ok[:, None] & (bucket[:, None] == b[None, :])).to(tl.int32), axis=0)
    tl.store(chunk_counts_ptr + tl.program_id(0) * BLOCK_E + b, count)


@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_counts_ptr, counts_ptr, pairs_ptr, num_pairs, num_experts, num_chunks,
                          BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chunked align, pass 2: program c writes each pair of chunk c at start of its bucket + the
    bucket's pairs in earlier chunks + its rank among the bucket's pairs of this chunk (a stable
    counting sort, as `_align_kernel`, with every pair read twice instead of E + 1 times)."""
    c = tl.program_id(0)
    chunk = tl.arange(0, BLOCK_C)
    b = tl.arange(0, BLOCK_E)
    per_chunk = tl.load(chunk_counts_ptr + chunk[:, None] * BLOCK_E + b[None, :], mask=(chunk < num_chunks)[:, None],
                        other=0)
    totals = tl.sum(per_chunk, axis=0)
    base = tl.cumsum(totals, axis=0) - totals + tl.sum(tl.where((chunk < c)[:, None], per_chunk, 0), axis=0)
    offs = c * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    bucket = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    match = (ok[:, None] & (bucket[:, None] == b[None, :])).to(tl.int32)   # [BLOCK_S, BLOCK_E]
    pos = base[None, :] + tl.cumsum(match, axis=0) - 1
    tl.store(pairs_ptr + pos, offs[:, None] + 0 * pos, mask=match != 0)
    tl.store(counts_ptr + b, totals, mask=(b <= num_experts) & (c + 0 * b == 0))  # program 0 writes the totals


@triton.jit
def _topk_sum_kernel(y_ptr, out_ptr, n_cols, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, cols] = sum over k of y[t * TOP_K + k, cols]: the top-k rows of one token added in
    fp32, in k order, and rounded once (what `y.view(T, K, H).sum(1)` computes)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (token * TOP_K + k) * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def topk_sum(y: torch.Tensor, top_k: int, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """[T * K, H] per-pair rows -> [T, H] sums over each token's K rows (contiguous y)."""
    y = y.contiguous()
    num_tokens, n_cols = y.shape[0] // top_k, y.shape[1]
    out = torch.empty(num_tokens, n_cols, dtype=y.dtype, device=y.device)
    block = min(block, triton.next_power_of_2(n_cols))
    _topk_sum_kernel[(num_tokens, triton.cdiv(n_cols, block))](y, out, n_cols, TOP_K=top_k, BLOCK=block,
                                                                num_warps=num_warps)
    return out


@triton.jit
def _block_rows(counts_ptr, block, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) in the sorted pairs of row block `block`; expert E is the
    bucket of invalid ids, E + 1 means past the last block."""
    idx = tl.arange(0, BLOCK_E)
    live = idx <= num_experts
    counts = tl.load(counts_ptr + idx, mask=live, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    # Cumulative block counts as a masked [E, E] sum: E is small, and it avoids a scan.
    ends = tl.sum(tl.where(idx[None, :] <= idx[:, None], blocks[None, :], 0), axis=1)
    expert = tl.sum((live & (ends <= block)).to(tl.int32), axis=0)
    first_block = tl.sum(tl.where(idx == expert, ends - blocks, 0), axis=0)
    start = tl.sum(tl.where(idx < expert, counts, 0), axis=0)
    count = tl.sum(tl.where(idx == expert, counts, 0), axis=0)
    return expert, start + (block - first_block) * BLOCK_M, start + count


def _nf4_prmt_asm() -> str:
    """PTX that looks up the 8 nibbles of 4 code bytes in the NF4 code book without touching memory.

    `prmt.b32 d, a, b, sel` builds d from 4 bytes chosen out of the 8 bytes of (a, b), one
    4-bit selector per output byte: a lookup in an 8-entry byte table, 4 at a time. The fp32
    code book is cut into byte lanes (lane k holds byte k of all 16 levels, 16 bytes = 4
    registers, here immediates), each lane looked up twice (levels 0-7 and 8-15, selector bit 3
    cleared) and the right half picked per byte with a mask (prmt's sign mode turns the bit-3
    selectors into 0xFF bytes). A byte transpose then reassembles the four lanes into exact fp32
    levels. About 6 instructions per value and no load, where the 16-entry table in memory
    costs one load per value (in the H200 sweep of benchmarks/results/sweep_experts_2026-11-29_h200.json
    the decode kernels at one token took 23.0 us with permutes against 31.3 us with the table;
    with the look-up made free they took no less, so the look-up is not what remains; compiled, the
    loop still issues about 13 instructions per value: benchmarks/tuning/sass_count.py). Inputs: the 4 bytes
    in $8 (byte i holds values 2i and 2i + 1 in its high and low nibble); outputs: the levels of
    the high nibbles in $0-$3, of the low nibbles in $4-$7."""
    from ..quant import NF4_CODE

    bits = NF4_CODE.to(torch.float32).view(torch.int32).tolist()
    lane = [[(b >> (8 * k)) & 0xFF for b in bits] for k in range(4)]   # lane[k][n]: byte k of level n
    word = lambda k, n0: f"0x{sum(lane[k][n0 + i] << (8 * i) for i in range(4)):08X}"
    lines = [".reg .b32 c<2>, m<2>, t, a, b, r<4>, p, q, u, v;",
             "and.b32 c0, $8, 0x7777;", "shr.b32 t, $8, 16;", "and.b32 c1, t, 0x7777;"]
    for h, src in ((0, "$8"), (1, "t")):   # m_h: 0xFF in byte i where selector nibble i of half h >= 8
        lines += [f"prmt.b32 m{h}, 0x80808080, 0x80808080, {src};", f"xor.b32 m{h}, m{h}, 0x80808080;",
                  f"shl.b32 a, m{h}, 1;", f"or.b32 m{h}, m{h}, a;"]
    # Selector nibbles of half 0 are (lo0, hi0, lo1, hi1), of half 1 (lo2, hi2, lo3, hi3).
    outs = {0: ("$4", "$0", "$5", "$1"), 1: ("$6", "$2", "$7", "$3")}
    for h in (0, 1):
        for k in range(4):
            lines += [f"prmt.b32 a, {word(k, 0)}, {word(k, 4)}, c{h};", f"prmt.b32 b, {word(k, 8)}, {word(k, 12)}, c{h};",
                      f"lop3.b32 r{k}, a, b, m{h}, 0xD8;"]   # m ? b : a, bit by bit
        o = outs[h]
        lines += ["prmt.b32 p, r0, r1, 0x5140;", "prmt.b32 q, r0, r1, 0x7362;",
                  "prmt.b32 u, r2, r3, 0x5140;", "prmt.b32 v, r2, r3, 0x7362;",
                  f"prmt.b32 {o[0]}, p, u, 0x5410;", f"prmt.b32 {o[1]}, p, u, 0x7632;",
                  f"prmt.b32 {o[2]}, q, v, 0x5410;", f"prmt.b32 {o[3]}, q, v, 0x7632;"]
    return "{\n" + "\n".join(lines) + "\n}"


NF4_PRMT_ASM = tl.constexpr(_nf4_prmt_asm())


def nf4_bf16_tables() -> tuple[list[int], list[int]]:
    """The bf16 NF4 code book as two 16-byte tables, 4 words each: (low bytes, high bytes)."""
    from ..quant import NF4_CODE

    bits = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    pack = lambda table: [sum(table[n0 + i] << (8 * i) for i in range(4)) for n0 in (0, 4, 8, 12)]  # noqa: E731
    return pack([b & 0xFF for b in bits]), pack([b >> 8 for b in bits])


def _nf4_bf16_pair_lines(word: str, outs: tuple[str, str, str, str], table_regs=None) -> list[str]:
    """PTX lines that look up the 8 nibbles of one 32-bit code word as bf16 levels, two per register:
    outs[i] holds the level of value 2i (the high nibble of byte i) in its low half and of value
    2i + 1 (the low nibble) in its high half: the order of x's bf16 pairs in memory.

    The bf16 code book is cut into its low bytes L and high bytes H (16 each, 4 registers each).
    `prmt` looks up 4 nibbles at a time in an 8-byte table, so each table is looked up twice
    (levels 0-7 and 8-15, selector bit 3 cleared) and a third `prmt` keeps, per byte, the half
    that bit 3 names (llama.cpp's get_int_from_table_16 trick); four more `prmt`s interleave the
    L and H bytes into bf16 pairs. 21 instructions per 8 levels, no memory access.

    table_regs: registers holding words 0 and 2 of the low and high tables (`prmt`'s first
    source must be a register: with immediates ptxas copies them into one before every use);
    None writes every table word as an immediate (for the PTX interpreter of the tests)."""
    low, high = nf4_bf16_tables()
    imm = {("l", i): f"0x{w:08X}" for i, w in enumerate(low)} | {("h", i): f"0x{w:08X}" for i, w in enumerate(high)}
    if table_regs is not None:
        imm |= dict(zip((("l", 0), ("l", 2), ("h", 0), ("h", 2)), table_regs))
    lines = [f"and.b32 m, {word}, 0x77777777;", "shr.b32 m1, m, 16;",   # selectors, bit 3 cleared
             f"shr.b32 s, {word}, 1;", "lop3.b32 s, s, 0x44444444, 0x32103210, 0xEA;",  # (s & 0x44..) | 0x3210..
             "shr.b32 s1, s, 16;"]
    for name in ("l", "h"):
        for half, (sel, pick) in enumerate((("m", "s"), ("m1", "s1"))):
            lines += [f"prmt.b32 ta, {imm[name, 0]}, {imm[name, 1]}, {sel};",
                      f"prmt.b32 tb, {imm[name, 2]}, {imm[name, 3]}, {sel};",
                      f"prmt.b32 {name}{half}, ta, tb, {pick};"]
    # l0/h0: L/H bytes of the nibbles [lo0, hi0, lo1, hi1] (byte 0's low nibble first); l1/h1 of bytes 2, 3.
    for i, (src, sel) in enumerate((("0", "0x4051"), ("0", "0x6273"), ("1", "0x4051"), ("1", "0x6273"))):
        lines.append(f"prmt.b32 {outs[i]}, l{src}, h{src}, {sel};")
    return lines


def _word_products_lines(absmax: str, acc: str) -> list[str]:
    """PTX lines that end a code word's dot: the 4 level pairs p0-p3 times x's bf16 pairs $2-$5, two
    at a time in bf16 (`mul`/`fma.rn.bf16x2`), the 4 pairs added in bf16, the two halves in float32,
    then $0 = acc + absmax * that sum."""
    return ["mul.rn.bf16x2 a, p0, $2;", "fma.rn.bf16x2 a, p1, $3, a;",
            "mul.rn.bf16x2 c, p2, $4;", "fma.rn.bf16x2 c, p3, $5, c;", "add.rn.bf16x2 a, a, c;",
            "shl.b32 u, a, 16;", "and.b32 v, a, 0xFFFF0000;", "mov.b32 fa, u;", "mov.b32 fb, v;",
            "add.f32 fa, fa, fb;", f"mov.b32 fb, {absmax};", f"mov.b32 fr, {acc};", "fma.rn.f32 fr, fa, fb, fr;",
            "mov.b32 $0, fr;"]


def _nf4_dot_asm() -> str:
    """PTX for one code word of an NF4 GEMV: $0 = $11 + $10 * (sum over the word's 8 values of
    level * x), float32, with $1 the code word, $2-$5 the 4 bf16 pairs of x it multiplies, $6-$9
    four table words (`_nf4_lut`), $10 the block's absmax (times the x scale) and $11 the
    running sum. The levels come from `_nf4_bf16_pair_lines`; the products are formed two at a
    time in bf16 (`mul`/`fma.rn.bf16x2`), the word's 4 pairs added in bf16, the two halves in
    float32. 30 instructions per 8 values here; compiled into the decode loop about 5.2 per value
    against 13.2 for float32 levels and FMAs (benchmarks/tuning/sass_count.py); the
    bf16 roundings (the level, each product, three additions) put the result about 3e-3
    (relative L2) from dequantize-then-matmul in bf16, which is itself about 2e-3 from exact
    (simulated in PyTorch: benchmarks/tuning/nf4_bf16_rounding.py)."""
    lines = [".reg .b32 m, m1, s, s1, ta, tb, l0, l1, h0, h1, p0, p1, p2, p3, a, c, u, v;",
             ".reg .f32 fa, fb, fr;"]
    lines += _nf4_bf16_pair_lines("$1", ("p0", "p1", "p2", "p3"), ("$6", "$7", "$8", "$9"))
    lines += _word_products_lines("$10", "$11")
    return "{\n" + "\n".join(lines) + "\n}"


NF4_DOT_ASM = tl.constexpr(_nf4_dot_asm())


def _nf4_levels_bf16_asm() -> str:
    """PTX for the levels of 4 code bytes as bf16, 8 values, no memory access: $4 holds the bytes
    (byte i: value 2i in its high nibble, 2i + 1 in its low one), $5, $9, $13, $17 the four table
    words of `_nf4_lut` (each argument comes in 4 registers, one per packed element: the first is
    used). The levels of the high nibbles (the even values) come out as bf16 pairs in $0-$1, of
    the low nibbles (the odd values) in $2-$3, element 2i in the low half. The look-up is
    `_nf4_bf16_pair_lines` (21 instructions per 8 levels), 4 `prmt` more regroup its (even, odd)
    pairs into (even, even) and (odd, odd)."""
    lines = [".reg .b32 m, m1, s, s1, ta, tb, l0, l1, h0, h1, p0, p1, p2, p3;"]
    lines += _nf4_bf16_pair_lines("$4", ("p0", "p1", "p2", "p3"), ("$5", "$9", "$13", "$17"))
    lines += ["prmt.b32 $0, p0, p1, 0x5410;", "prmt.b32 $1, p2, p3, 0x5410;",
              "prmt.b32 $2, p0, p1, 0x7632;", "prmt.b32 $3, p2, p3, 0x7632;"]
    return "{\n" + "\n".join(lines) + "\n}"


NF4_LEVELS_BF16_ASM = tl.constexpr(_nf4_levels_bf16_asm())


def nf4_pair_table() -> list[int]:
    """The 256 bf16 level pairs a code byte decodes to, as 32-bit words: entry b holds the level of
    its high nibble (value 2i) in the low half and of its low nibble (value 2i + 1) in the high
    half, the order of x's bf16 pairs in memory."""
    from ..quant import NF4_CODE

    bits = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    return [bits[b >> 4] | bits[b & 15] << 16 for b in range(256)]


NF4_PAIRS_AT = tl.constexpr(16 + 4 * 32)  # where `_nf4_code`'s buffer holds the pair table (in 32-bit words)
NF4_TABLE_DECL = tl.constexpr(".shared .align 16 .b32 moelab_nf4_pairs[8192];\nmov.u32 $0, 0;")


def _nf4_table_fill_asm(num_warps: int) -> str:
    """PTX that fills the shared-memory pair table (`NF4_TABLE_DECL`: 256 entries, one copy per
    lane, entry e of lane l at word 32 e + l, so a warp's 32 look-ups always hit 32 different
    banks) and returns this lane's address in it. Warp w writes entries [w E, (w + 1) E), E = 256
    / num_warps; its lanes hold them in $1.. (entry w E + 32 j + l in ${1 + j}), and each entry
    reaches every lane by one `shfl` and is stored by one `st.shared`: 2 E instructions per
    thread. Ends with the barrier that makes the table visible to the whole program."""
    per_warp = 256 // num_warps
    lines = [".reg .b32 w, base, lane, v;", "mov.u32 lane, %laneid;", "mov.u32 w, %tid.x;", "shr.u32 w, w, 5;",
             f"mul.lo.u32 w, w, {per_warp * 128};", "mov.u32 base, moelab_nf4_pairs;", "add.u32 base, base, w;",
             "shl.b32 w, lane, 2;", "add.u32 base, base, w;"]
    for k in range(per_warp):
        lines += [f"shfl.sync.idx.b32 v, ${1 + k // 32}, {k % 32}, 31, 0xFFFFFFFF;",
                  f"st.shared.b32 [base+{k * 128}], v;"]
    lines += ["bar.sync 0;", "mov.u32 base, moelab_nf4_pairs;", "shl.b32 w, lane, 2;", "add.u32 $0, base, w;"]
    return "{\n" + "\n".join(lines) + "\n}"


NF4_FILL_ASM = tl.constexpr({w: _nf4_table_fill_asm(w) for w in (2, 4, 8, 16, 32)})  # by the program's warps


def _nf4_dot_smem_asm() -> str:
    """`NF4_DOT_ASM` with the look-up in the shared-memory pair table: $0 = $8 + $7 * (the word's
    8 levels times x), $1 the code word, $2-$5 x's bf16 pairs, $6 this lane's table address. Per
    code byte one `prmt` (the byte, zero-extended), one multiply-add (its entry's address) and
    one `ld.shared`: 4 integer-pipe instructions per word where the `prmt` look-up takes 21."""
    lines = [".reg .b32 t, q, p0, p1, p2, p3, a, c, u, v;", ".reg .f32 fa, fb, fr;"]
    for i in range(4):
        lines += [f"prmt.b32 t, $1, 0, 0x444{i};", "mad.lo.u32 q, t, 128, $6;", f"ld.shared.b32 p{i}, [q];"]
    lines += _word_products_lines("$7", "$8")
    return "{\n" + "\n".join(lines) + "\n}"


NF4_DOT_SMEM_ASM = tl.constexpr(_nf4_dot_smem_asm())

def _nf4_smem_kernels(setting: str) -> frozenset:
    """The kernels a MOELAB_NF4_SMEM value names ("none" or "": no kernel)."""
    kernels = frozenset(k.strip() for k in setting.split(",") if k.strip() not in ("", "none"))
    if not kernels <= {"gate_up", "down", "linear"}:
        raise ValueError(f"MOELAB_NF4_SMEM names kernels among gate_up, down, linear (or none), got {setting!r}")
    return kernels


# Which NF4 decode GEMVs look their code bytes up in the shared-memory pair table
# (`NF4_DOT_SMEM_ASM`) rather than by `prmt` in registers: a set of "gate_up", "down", "linear"
# (MOELAB_NF4_SMEM=gate_up,down,... or "none": comparisons); a launch config that says NF4_SMEM=0
# keeps `prmt` (a shape where the table was slower). With the table, gate_up and the linears are
# capped at NF4_SMEM_MAXNREG registers a thread (gate_up uncapped takes 95: 5 of its 4-warp programs
# fit on an SM, 8 at 64). On an H100 (benchmarks/results/nf4_smem_ab_2026-12-06_h100_run2.json,
# alternating): the routed layer at one token 18.8-19.2 -> 17.8-18.1 us, with the shared expert
# folded in 33.6-34.2 -> 31.5 us, the batch-1 decode step 572.1 -> 592.9 tokens/s; uncapped gate_up
# was slower than none (19.3-19.9 us). At their configs then (8 rows on 4 warps) the table made the
# linears slower (q/k/v 6.6 -> 8.0 us, o_proj 3.3 -> 3.7: _h100.json); at one token q/k/v now runs
# 16-row programs on 8 warps with it, capped at 48 (`moelab.kernels.gemv.gemv_config`).
NF4_SMEM_KERNELS = _nf4_smem_kernels(os.environ.get("MOELAB_NF4_SMEM", "gate_up,down,linear"))
NF4_SMEM_MAXNREG = {"gate_up": 64, "linear": 48}


def with_nf4_table(cfg: dict, flags: dict, kernel: str) -> dict:
    """A decode GEMV's launch config plus NF4_SMEM (its warps) where this kernel's NF4 word path
    uses the shared-memory table (kernel: "gate_up", "down" or "linear")."""
    if kernel not in ("gate_up", "down", "linear"):
        raise ValueError(f"kernel must be gate_up, down or linear, got {kernel!r}")
    if kernel not in NF4_SMEM_KERNELS or not (flags["NF4"] and flags["NF4_ASM"] and flags["ROW_ALIGNED"]):
        return cfg
    if cfg.get("NF4_SMEM") == 0:  # this config keeps the `prmt` look-up
        return cfg
    if "NF4_SMEM" not in cfg and cfg["num_warps"] not in NF4_FILL_ASM.value:
        raise ValueError(f"the NF4 table fills with 2 to 32 warps (a power of two), the {kernel} config has "
                         f"{cfg['num_warps']}: pass NF4_SMEM=0 in its config, or leave {kernel} out of MOELAB_NF4_SMEM")
    cap = NF4_SMEM_MAXNREG.get(kernel)
    return {"NF4_SMEM": cfg["num_warps"], **({"maxnreg": cap} if cap else {}), **cfg}


@triton.jit
def _nf4_lut(nf4_code_ptr, NF4_WORDS: tl.constexpr, NF4_SMEM: tl.constexpr = 0):
    """The 4 table words `NF4_DOT_ASM` takes in registers, loaded once per program from the
    code-book buffer (`_nf4_code`: one copy per lane after the 16 levels); zeros where the NF4
    word path is not taken. Each lane reads its own copy so that ptxas sees per-thread values:
    a value it can prove uniform lives in a uniform register, copied into a regular one before
    every `prmt` (one more instruction per look-up).

    With NF4_SMEM (the program's warps) instead: declares and fills the shared-memory pair table
    of `NF4_DOT_SMEM_ASM` (each warp loads its 256 / NF4_SMEM entries of `nf4_pair_table`, one per
    lane and register, for `_nf4_table_fill_asm`) and returns (this lane's table address, 0, 0, 0)."""
    if NF4_WORDS and NF4_SMEM:  # NF4_SMEM = the program's warps: the pair table in shared memory
        tl.inline_asm_elementwise(NF4_TABLE_DECL, "=r,r", [tl.program_id(0)], dtype=tl.int32, is_pure=False, pack=1)
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                         is_pure=False, pack=1)
        warp = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;\nshr.u32 $0, $0, 5;", "=r,r", [tl.program_id(0)],
                                         dtype=tl.int32, is_pure=False, pack=1)
        PER_WARP: tl.constexpr = 256 // NF4_SMEM
        pairs = nf4_code_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + NF4_PAIRS_AT + warp * PER_WARP
        e = pairs + lane % PER_WARP
        FILL: tl.constexpr = NF4_FILL_ASM[NF4_SMEM]
        if PER_WARP <= 32:  # one entry per lane
            addr = tl.inline_asm_elementwise(FILL, "=r,r", [tl.load(e)], dtype=tl.int32, is_pure=False, pack=1)
        elif PER_WARP == 64:
            addr = tl.inline_asm_elementwise(FILL, "=r,r,r", [tl.load(e), tl.load(e + 32)], dtype=tl.int32,
                                             is_pure=False, pack=1)
        else:
            addr = tl.inline_asm_elementwise(FILL, "=r,r,r,r,r",
                                             [tl.load(e), tl.load(e + 32), tl.load(e + 64), tl.load(e + 96)],
                                             dtype=tl.int32, is_pure=False, pack=1)
        lut = (addr, 0, 0, 0)
    elif NF4_WORDS:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.program_id(0)], dtype=tl.int32,
                                         is_pure=True, pack=1)
        tab = nf4_code_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + 16 + 4 * lane
        lut = (tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3))
    else:
        lut = (0, 0, 0, 0)
    return lut


@triton.jit
def _nf4_levels(byte, nf4_code_ptr, NF4_ASM: tl.constexpr):
    """fp32 NF4 levels of the high and low nibble of each code byte (uint8): byte permutes on
    CUDA (`_nf4_prmt_asm`), the 16-entry code book in memory under the interpreter."""
    if NF4_ASM:
        hi, lo = tl.inline_asm_elementwise(NF4_PRMT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    else:
        b = byte.to(tl.int32)
        hi = tl.load(nf4_code_ptr + (b >> 4))
        lo = tl.load(nf4_code_ptr + (b & 15))
    return hi, lo


@triton.jit
def _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert, blk, mask,
                absmax_per_expert, scales_per_expert, DOUBLE_QUANT: tl.constexpr):
    """The fp32 absmax of NF4 blocks `blk` of `expert` (decoding the 8-bit code if double quantised)."""
    q = tl.load(absmax_ptr + expert * absmax_per_expert + blk, mask=mask, other=0)
    if DOUBLE_QUANT:
        scale = tl.load(absmax_scale_ptr + expert * scales_per_expert + blk // 256, mask=mask, other=0.0)
        offset = tl.load(absmax_offset_ptr + expert)
        am = tl.load(absmax_code_ptr + q.to(tl.int32), mask=mask, other=0.0) * scale + offset
        return tl.where(mask, am, 0.0)
    return q.to(tl.float32)


@triton.jit
def _nf4_dense_kernel(codes_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
                      out_ptr, half_n, blocksize, stride_ce, absmax_per_expert, scales_per_expert,
                      DOUBLE_QUANT: tl.constexpr, NF4_ASM: tl.constexpr, BLOCK: tl.constexpr):
    """out[e, 2j], out[e, 2j + 1] = the levels of code byte j of expert e times its block absmax,
    computed in float32 and rounded once to out's dtype (what `moelab.quant.dequantize_nf4` does)."""
    expert = tl.program_id(1)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < half_n
    byte = tl.load(codes_ptr + expert.to(tl.int64) * stride_ce + j, mask=ok, other=0)
    hi, lo = _nf4_levels(byte, nf4_code_ptr, NF4_ASM)
    am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert, (2 * j) // blocksize,
                     ok, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    values = tl.join(hi * am, lo * am)                                          # [BLOCK, 2]: values 2j, 2j + 1
    out = out_ptr + expert.to(tl.int64) * (2 * half_n) + (2 * j)[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out, values.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _nf4_tiles(codes_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
               expert, rows, row_ok, k0, k_dim, absmax_per_expert, scales_per_expert,
               DOUBLE_QUANT: tl.constexpr, BLOCK_K: tl.constexpr, NF4_ASM: tl.constexpr):
    """W[expert, rows, k0 + 2j] and W[expert, rows, k0 + 2j + 1] for j < BLOCK_K / 2, dequantized
    from NF4 into two fp32 [BLOCK_K / 2, BLOCK_N] tiles (K down, rows across: ready for x @ W^T),
    each value times its own block's absmax: rows that are not whole 64-blocks (a block may
    straddle two rows). codes_ptr points at this expert's codes; k_dim is even, so row r's values
    start at byte r * k_dim / 2 and the bytes of one row are contiguous (wide loads)."""
    j = tl.arange(0, BLOCK_K // 2)
    row_bytes = k_dim // 2
    # The mask in bytes, not values, so Triton sees runs of equal mask bits and loads wide vectors.
    mask = (k0 // 2 + j < row_bytes)[:, None] & row_ok[None, :]
    byte = tl.load(codes_ptr + rows[None, :].to(tl.int64) * row_bytes + (k0 // 2 + j)[:, None], mask=mask, other=0)
    even, odd = _nf4_levels(byte, nf4_code_ptr, NF4_ASM)
    flat = rows[None, :].to(tl.int64) * k_dim + (k0 + 2 * j)[:, None]  # even, so flat + 1 shares its block
    am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                     flat // 64, mask, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
    return even * am, odd * am


@triton.jit
def _nf4_block_dot(acc, x_even, x_odd, codes_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                   nf4_code_ptr, lut, expert, rows, row_ok, kb, k_dim, absmax_per_expert, scales_per_expert,
                   DOUBLE_QUANT: tl.constexpr, NF4_ASM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x[:, kb:kb + 64] @ W[expert, rows, kb:kb + 64]^T for one 64-value NF4 block of every
    row (rows of whole blocks), x given as its even and odd columns ([M, 32] each).

    The codes become levels in x's dtype (bf16 on CUDA: `NF4_LEVELS_BF16_ASM`, about 3
    instructions per value), the tensor cores multiply them by x, and each row's block absmax
    scales the [M, N] product: one multiply per output instead of one per weight, since the
    whole block shares it. Under the interpreter the levels come from the code book in memory."""
    j = tl.arange(0, 32)
    # [rows, 32 bytes]: each row's 32 bytes are contiguous (16-byte loads), transposed in registers.
    byte = tl.trans(tl.load(codes_ptr + rows[:, None].to(tl.int64) * (k_dim // 2) + (kb // 2 + j)[None, :],
                            mask=row_ok[:, None] & (kb // 2 + j < k_dim // 2)[None, :], other=0))
    if NF4_ASM and x_even.dtype == tl.bfloat16:
        even, odd = tl.inline_asm_elementwise(NF4_LEVELS_BF16_ASM, "=r,=r,=r,=r" + ",r" * 17,
                                              [byte, lut[0], lut[1], lut[2], lut[3]],
                                              dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        even, odd = _nf4_levels(byte, nf4_code_ptr, NF4_ASM)
        even, odd = even.to(x_even.dtype), odd.to(x_even.dtype)
    part = tl.dot(x_even, even, input_precision=DOT_PRECISION)
    part = tl.dot(x_odd, odd, part, input_precision=DOT_PRECISION)
    am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                     (rows.to(tl.int64) * k_dim + kb) // 64, row_ok & (kb + 0 * rows < k_dim), absmax_per_expert,
                     scales_per_expert, DOUBLE_QUANT)  # a tensor compare: the interpreter needs one
    return acc + part * am[None, :]


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, pairs_ptr, counts_ptr, route_w_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    n_out, k_dim, num_experts, x_row_div, num_blocks,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    absmax_per_expert, scales_per_expert,
    GATED: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    NF4_ASM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr, HALF_TAIL: tl.constexpr,
):
    """out[pair, n] for the pairs of one row block and one N-tile.

    GATED (gate_up): x row = pair // top_k (the token), W rows n (gate) and n_out + n (up),
    out = SiLU(gate) * up. Otherwise (down): x row = pair, out = routing weight * (x @ W^T).

    HALF_TAIL: a block with at most BLOCK_M / 2 rows (an expert's last, partial block) runs at
    half the rows, so its padding costs half the tensor-core work (long prefills: at 4,096
    tokens of Qwen1.5-MoE an expert's ~273 pairs are 2 x 128 + ~17 rows).
    """
    # Programs run in groups of GROUP_M row blocks x every N-tile: the rows of a group (and the
    # weights of its few experts) are read from L2 while all N-tiles pass over them.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    first_block = (pid // (GROUP_M * n_tiles)) * GROUP_M
    group_size = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % (GROUP_M * n_tiles)) % group_size
    n_tile = (pid % (GROUP_M * n_tiles)) // group_size
    expert, row_lo, row_hi = _block_rows(counts_ptr, block, num_experts, BLOCK_M, BLOCK_E)
    if HALF_TAIL and (row_hi - row_lo <= BLOCK_M // 2):
        _block_gemm(x_ptr, w_ptr, out_ptr, pairs_ptr, route_w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                    absmax_offset_ptr, nf4_code_ptr, expert, row_lo, row_hi, n_tile, n_out, k_dim, num_experts,
                    x_row_div, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                    absmax_per_expert, scales_per_expert, GATED, NF4, DOUBLE_QUANT, ROW_ALIGNED, NF4_ASM,
                    DOT_PRECISION, BLOCK_M // 2, BLOCK_N, BLOCK_K)
    else:
        _block_gemm(x_ptr, w_ptr, out_ptr, pairs_ptr, route_w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                    absmax_offset_ptr, nf4_code_ptr, expert, row_lo, row_hi, n_tile, n_out, k_dim, num_experts,
                    x_row_div, stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                    absmax_per_expert, scales_per_expert, GATED, NF4, DOUBLE_QUANT, ROW_ALIGNED, NF4_ASM,
                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _block_gemm(x_ptr, w_ptr, out_ptr, pairs_ptr, route_w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                absmax_offset_ptr, nf4_code_ptr, expert, row_lo, row_hi, n_tile, n_out, k_dim, num_experts, x_row_div,
                stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on, absmax_per_expert,
                scales_per_expert, GATED: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                ROW_ALIGNED: tl.constexpr, NF4_ASM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The rows row_lo..row_hi (at most BLOCK_M, all of `expert`) x one N-tile of _grouped_gemm_kernel.
    Blocks past the end (expert E + 1) have no rows; the bucket of invalid ids (expert E) runs
    no K-loop, so its pairs get zeros from the down pass. Called from both HALF_TAIL branches,
    the K-loop is compiled twice; Triton software-pipelines both (cp.async in the sm_90 SASS)."""
    m = row_lo + tl.arange(0, BLOCK_M)
    m_ok = m < row_hi
    k_end = tl.where(expert < num_experts, k_dim, 0)
    store_hi = tl.where(expert < num_experts, row_hi, row_lo) if GATED else row_hi
    expert = tl.minimum(expert, num_experts - 1)
    pair = tl.load(pairs_ptr + m, mask=m_ok, other=0).to(tl.int64)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    x_rows = x_ptr + (pair // x_row_div)[:, None] * stride_xm
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED)
    for k0 in range(0, k_end, BLOCK_K):
        if NF4 and ROW_ALIGNED:  # whole 64-value blocks: one absmax per row and block, applied to the product
            for b in tl.static_range(BLOCK_K // 64):
                kb = k0 + 64 * b
                cols = kb + 2 * tl.arange(0, 32)
                x_mask = m_ok[:, None] & (cols < k_dim)[None, :]
                x_even = tl.load(x_rows + cols[None, :] * stride_xk, mask=x_mask, other=0.0)
                x_odd = tl.load(x_rows + (cols + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
                acc = _nf4_block_dot(acc, x_even, x_odd, w_e, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                                     absmax_offset_ptr, nf4_code_ptr, lut, expert, n, n_ok, kb, k_dim,
                                     absmax_per_expert, scales_per_expert, DOUBLE_QUANT, NF4_ASM, DOT_PRECISION)
                if GATED:
                    acc_up = _nf4_block_dot(acc_up, x_even, x_odd, w_e, absmax_ptr, absmax_code_ptr,
                                            absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr, lut, expert,
                                            n + n_out, n_ok, kb, k_dim, absmax_per_expert, scales_per_expert,
                                            DOUBLE_QUANT, NF4_ASM, DOT_PRECISION)
        elif NF4:
            cols = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            x_mask = m_ok[:, None] & (cols < k_dim)[None, :]
            x_even = tl.load(x_rows + cols[None, :] * stride_xk, mask=x_mask, other=0.0)
            x_odd = tl.load(x_rows + (cols + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
            w_even, w_odd = _nf4_tiles(
                w_e, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
                expert, n, n_ok, k0, k_dim, absmax_per_expert, scales_per_expert, DOUBLE_QUANT, BLOCK_K, NF4_ASM)
            acc = tl.dot(x_even, w_even.to(x_even.dtype), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_odd, w_odd.to(x_odd.dtype), acc, input_precision=DOT_PRECISION)
            if GATED:
                u_even, u_odd = _nf4_tiles(
                    w_e, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
                    expert, n + n_out, n_ok, k0, k_dim, absmax_per_expert, scales_per_expert, DOUBLE_QUANT,
                    BLOCK_K, NF4_ASM)
                acc_up = tl.dot(x_even, u_even.to(x_even.dtype), acc_up, input_precision=DOT_PRECISION)
                acc_up = tl.dot(x_odd, u_odd.to(x_odd.dtype), acc_up, input_precision=DOT_PRECISION)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_dim
            x = tl.load(x_rows + ks[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w = tl.load(w_e + n[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            if GATED:
                u = tl.load(w_e + (n + n_out)[None, :] * stride_wn + ks[:, None] * stride_wk,
                            mask=w_mask, other=0.0)
                acc_up = tl.dot(x, u, acc_up, input_precision=DOT_PRECISION)
    if GATED:
        out = acc * tl.sigmoid(acc) * acc_up
    else:
        # The routing weight rounded to the output dtype first, as transformers rounds it.
        route_w = tl.load(route_w_ptr + pair, mask=m_ok, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
        out = acc * route_w[:, None]
    out_ptrs = out_ptr + pair[:, None] * stride_om + n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(m < store_hi)[:, None] & n_ok[None, :])


@triton.jit
def _nf4_words(acc, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, x_row_ptr, x_scale,
               expert, rows, row_ok, k0, k_dim, absmax_per_expert, scales_per_expert, lut,
               DOUBLE_QUANT: tl.constexpr, BLOCK_K: tl.constexpr, NF4_SMEM: tl.constexpr = 0):
    """The NF4 decode step on CUDA: acc [BLOCK_N, BLOCK_K // 64, 8] (float32, one entry per code
    word) plus W[expert, rows, k0:k0 + BLOCK_K] times x, word by word, each word's sum scaled by
    its block's absmax (and x_scale) inside `NF4_DOT_ASM`.

    Word j of NF4 block b of a row holds the codes of values 64b + 8j .. 64b + 8j + 7; x is read
    as bf16 pairs (32-bit words, so x must be 4-byte aligned: the launcher sees to it) and each
    code word meets its 4 pairs in `NF4_DOT_ASM`. Rows are whole 64-blocks (k_dim % 64 == 0).

    x comes as four [NB, 8] loads (pair 0, 1, 2, 3 of every word), which Triton places directly
    in the layout the words use as long as the tile has fewer elements than the program has
    threads (BLOCK_K // 8 < 32 * num_warps: `gemv_config` keeps to it). One [NB, 8, 4] load split
    in registers was laid out otherwise and cost a round trip through shared memory and a
    barrier per K-step and expert (compiled for sm_90 at 512-value steps and 4 warps, the down
    kernel held 18 barriers before, 1 after, its final reduction's). Not timed apart: with the
    configs swept since, the NF4 down kernels of an H100 decode step went from 513 to 426 us
    (decode_nf4_2026-12-06_h100.json, then _run1)."""
    NB: tl.constexpr = BLOCK_K // 64
    b = tl.arange(0, NB)
    j = tl.arange(0, 8)
    blk_ok = k0 + 64 * b < k_dim
    row_words = tl.multiple_of(rows.to(tl.int64) * (k_dim // 8) + k0 // 8, 8)  # rows start on 32-byte boundaries
    word_off = row_words[:, None, None] + (8 * b[:, None] + j[None, :])[None, :, :]
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + word_off,
                    mask=row_ok[:, None, None] & blk_ok[None, :, None], other=0)
    pair = k0 // 2 + 32 * b[:, None] + 4 * j[None, :]  # [NB, 8]: x's first bf16 pair of each word
    xw = x_row_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + pair
    x_ok = blk_ok[:, None]
    x0 = tl.load(xw, mask=x_ok, other=0)
    x1 = tl.load(xw + 1, mask=x_ok, other=0)
    x2 = tl.load(xw + 2, mask=x_ok, other=0)
    x3 = tl.load(xw + 3, mask=x_ok, other=0)
    blk = (rows.to(tl.int64) * k_dim + k0) // 64
    am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                     blk[:, None] + b[None, :], row_ok[:, None] & blk_ok[None, :], absmax_per_expert,
                     scales_per_expert, DOUBLE_QUANT)
    if NF4_SMEM:  # the look-up in the shared-memory pair table (`NF4_DOT_SMEM_ASM`)
        return tl.inline_asm_elementwise(NF4_DOT_SMEM_ASM, "=r,r,r,r,r,r,r,r,r",
                                         [words, x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :],
                                          lut[0], (am * x_scale)[:, :, None], acc],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.inline_asm_elementwise(NF4_DOT_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r",
                                     [words, x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :],
                                      lut[0], lut[1], lut[2], lut[3], (am * x_scale)[:, :, None], acc],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gemv_acc(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NF4: tl.constexpr, WORDS: tl.constexpr):
    """A zero accumulator shaped like `_gemv_rows`' tiles."""
    if NF4 and WORDS:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 64, 8), dtype=tl.float32)
    elif NF4:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 64, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    return acc


@triton.jit
def _gemv_rows(acc, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
               x_row_ptr, x_scale, expert, rows, row_ok, k0, k_dim, stride_wn, absmax_per_expert, scales_per_expert,
               lut, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
               NF4_ASM: tl.constexpr, NF4_SMEM: tl.constexpr = 0):
    """acc + W[expert, rows, k0:k0 + BLOCK_K] * (x_scale * x[k0:k0 + BLOCK_K]) elementwise, in fp32, not yet
    summed (the caller sums the accumulator once at the end: one FMA per weight).

    Dense: a [BLOCK_N, BLOCK_K] tile, contiguous along K (16-byte loads). NF4: a [BLOCK_N,
    BLOCK_K // 64, 32] tile of code bytes (byte j of NF4 block b holds values 64b + 2j and
    64b + 2j + 1), so one block absmax per (row, b) broadcasts over its 32 bytes; the two
    nibbles are looked up in the 16-entry code book and paired with the even and odd x.

    NF4 on CUDA with rows of whole 64-blocks (`_nf4_words`): a [BLOCK_N, BLOCK_K // 64, 8] tile
    of 32-bit code words, each multiplied by its 8 values of x in one piece of PTX."""
    if NF4 and NF4_ASM and ROW_ALIGNED:
        acc = _nf4_words(acc, w_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, x_row_ptr, x_scale,
                          expert, rows, row_ok, k0, k_dim, absmax_per_expert, scales_per_expert, lut, DOUBLE_QUANT,
                          BLOCK_K, NF4_SMEM)
    elif NF4:
        b = tl.arange(0, BLOCK_K // 64)
        j = tl.arange(0, 32)
        col = k0 + 64 * b[:, None] + 2 * j[None, :]                     # [NB, 32] even columns
        col_ok = col < k_dim
        # The mask per whole 64-block (or per byte), not per value, so it is constant over 16-byte runs.
        if ROW_ALIGNED:
            byte_ok = (k0 + 64 * b < k_dim)[:, None] & (j < 32)[None, :]
        else:
            byte_ok = (k0 // 2 + 32 * b[:, None] + j[None, :]) < k_dim // 2
        mask = row_ok[:, None, None] & byte_ok[None, :, :]
        flat = rows.to(tl.int64)[:, None, None] * k_dim + col[None, :, :]  # flat value index (even)
        # Byte offsets as row start + contiguous run (not flat // 2), so the compiler sees 16-byte runs.
        row_start = (rows.to(tl.int64) * k_dim + k0) // 2
        if ROW_ALIGNED:  # rows of whole 64-blocks: every row starts on a 32-byte boundary (16-byte loads)
            row_start = tl.multiple_of(row_start, 16)
        byte_off = row_start[:, None, None] + (32 * b[:, None] + j[None, :])[None, :, :]
        byte = tl.load(w_ptr + byte_off, mask=mask, other=0)
        x_even = tl.load(x_row_ptr + col, mask=col_ok, other=0.0).to(tl.float32) * x_scale
        x_odd = tl.load(x_row_ptr + col + 1, mask=col_ok, other=0.0).to(tl.float32) * x_scale
        hi, lo = _nf4_levels(byte, nf4_code_ptr, NF4_ASM)
        pair_sum = hi * x_even[None, :, :] + lo * x_odd[None, :, :]
        if ROW_ALIGNED:  # each row is whole 64-blocks: one absmax per (row, b)
            blk = (rows.to(tl.int64) * k_dim + k0) // 64
            ok = row_ok[:, None] & (k0 + 64 * b < k_dim)[None, :]
            am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                             blk[:, None] + b[None, :], ok, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
            acc += pair_sum * am[:, :, None]
        else:
            am = _nf4_absmax(absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, expert,
                             flat // 64, mask, absmax_per_expert, scales_per_expert, DOUBLE_QUANT)
            acc += pair_sum * am
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wn + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_row_ptr + ks, mask=k_ok, other=0.0).to(tl.float32) * x_scale
        acc += w.to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _gemv_acc_sum(acc, NF4: tl.constexpr):
    """Row sums of a _gemv_rows accumulator ([BLOCK_N, BLOCK_K] dense, [BLOCK_N, NB, 32] NF4)."""
    if NF4:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    else:
        total = tl.sum(acc, axis=1)
    return total


@triton.jit
def _gemv_gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, act_ptr, shared_w_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr,
    n_out, k_dim, num_experts, top_k, num_pairs, shared_rows, shared_chunks,
    stride_xm, stride_we, stride_wn, stride_am, stride_swn,
    absmax_per_expert, scales_per_expert,
    NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr, NF4_ASM: tl.constexpr,
    HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PIPELINE: tl.constexpr,
    USE_PDL: tl.constexpr = False, NF4_SMEM: tl.constexpr = 0,
):
    """Decode gate_up, one program per (pair, N-tile), no grouping: act[pair, n] =
    SiLU(gate) * up of the pair's token through its expert, with FMAs (no 16-row dot padding).
    A pair whose id is outside [0, E) gets zeros.

    HAS_SHARED: rows num_pairs + t * C + c of act are the shared expert's chunk c of token t
    (its intermediate cut into C chunks of n_out rows; the last one zero-padded): gate rows
    c * n_out + n and up rows shared_rows + c * n_out + n of `shared_w` ([2 Is, H], gate then
    up), so the shared expert's gate/up streams alongside the routed experts in one launch.
    NF4 experts take an NF4 shared expert (one expert, the same format), its absmax and
    scales from the shared_absmax* pointers."""
    if NF4_SMEM:  # the table comes from a buffer no kernel writes: filled while the kernel before finishes
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    wait_for_previous_kernel(USE_PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    pair = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    expert = tl.load(ids_ptr + tl.minimum(pair, num_pairs - 1)).to(tl.int32)
    valid = (expert >= 0) & (expert < num_experts)
    expert = tl.where(valid, expert, 0)
    k_end = tl.where(valid, k_dim, 0)
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
    row_stride = stride_wn
    gate_rows = n
    up_rows = n + n_out
    row_ok = n_ok
    am, am_code, am_scale, am_offset = absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr
    if HAS_SHARED:  # the shared expert's chunk c: its rows c * n_out + n (gate) and shared_rows + c * n_out + n (up)
        shared = pair >= num_pairs
        chunk = tl.maximum(pair - num_pairs, 0)
        c = chunk % shared_chunks
        w_e = tl.where(shared, shared_w_ptr, w_e)
        expert = tl.where(shared, 0, expert)
        x_row = tl.where(shared, x_ptr + (chunk // shared_chunks).to(tl.int64) * stride_xm, x_row)
        row_stride = tl.where(shared, stride_swn, stride_wn)
        gate_rows = tl.where(shared, n + c * n_out, gate_rows)
        up_rows = tl.where(shared, n + c * n_out + shared_rows, up_rows)
        row_ok = n_ok & (n < tl.where(shared, shared_rows - c * n_out, n_out))  # the last chunk may be partial
        k_end = tl.where(shared, k_dim, k_end)
        if NF4:
            am = tl.where(shared, shared_absmax_ptr, am)
            am_code = tl.where(shared, shared_absmax_code_ptr, am_code)
            am_scale = tl.where(shared, shared_absmax_scale_ptr, am_scale)
            am_offset = tl.where(shared, shared_absmax_offset_ptr, am_offset)
    acc = _gemv_acc(BLOCK_N, BLOCK_K, NF4, NF4_ASM and ROW_ALIGNED)
    acc_up = _gemv_acc(BLOCK_N, BLOCK_K, NF4, NF4_ASM and ROW_ALIGNED)
    if not NF4_SMEM:
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    for k0 in tl.range(0, k_end, BLOCK_K, num_stages=PIPELINE):
        acc = _gemv_rows(acc, w_e, am, am_code, am_scale, am_offset, nf4_code_ptr,
                          x_row, 1.0, expert, gate_rows, row_ok, k0, k_dim, row_stride, absmax_per_expert,
                          scales_per_expert, lut, NF4, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K, NF4_ASM, NF4_SMEM)
        acc_up = _gemv_rows(acc_up, w_e, am, am_code, am_scale, am_offset, nf4_code_ptr,
                             x_row, 1.0, expert, up_rows, row_ok, k0, k_dim, row_stride, absmax_per_expert,
                             scales_per_expert, lut, NF4, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K, NF4_ASM, NF4_SMEM)
    let_next_kernel_start(USE_PDL)
    gate = _gemv_acc_sum(acc, NF4)
    out = gate * tl.sigmoid(gate) * _gemv_acc_sum(acc_up, NF4)
    tl.store(act_ptr + pair.to(tl.int64) * stride_am + n, out.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_down_kernel(
    act_ptr, w_ptr, ids_ptr, route_w_ptr, out_ptr, shared_w_ptr, shared_gate_ptr,
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_code_ptr,
    shared_absmax_ptr, shared_absmax_code_ptr, shared_absmax_scale_ptr, shared_absmax_offset_ptr,
    n_out, k_dim, num_experts, shared_k, shared_act_row, shared_chunks,
    stride_am, stride_we, stride_wn, stride_om, stride_swn, stride_sg,
    absmax_per_expert, scales_per_expert,
    TOP_K: tl.constexpr, NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    NF4_ASM: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PIPELINE: tl.constexpr, SHARED_BLOCK_K: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
    NF4_SMEM: tl.constexpr = 0,
):
    """Decode down with the top-k sum folded in, one program per (token, N-tile):
    out[t, n] = sum_k route_w[t, k] * (W_down[ids[t, k]] @ act[t * K + k])[n], FMAs in fp32 and
    one rounding (no per-pair output, no separate sum kernel; deterministic). The routing
    weight, rounded to the output dtype first (as transformers rounds it), scales the
    activation before the product. Ids outside [0, E) add nothing.

    HAS_SHARED adds sigmoid(shared_gate[t]) * (W_shared_down @ act_shared[t])[n], the shared
    expert behind its gate, into the same sum: act_shared[t] is the shared_k values from act
    row shared_act_row + t * C on (the gate_up kernel's C chunks of token t, contiguous); in NF4
    with NF4 experts (its absmax from the shared_absmax* pointers), in K-steps of SHARED_BLOCK_K
    (0: BLOCK_K) values."""
    if NF4_SMEM:  # the table comes from a buffer no kernel writes: filled while the kernel before finishes
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    wait_for_previous_kernel(USE_PDL)
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    token = pid // n_tiles
    n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    if not NF4_SMEM:
        lut = _nf4_lut(nf4_code_ptr, NF4 and NF4_ASM and ROW_ALIGNED, NF4_SMEM)
    acc = _gemv_acc(BLOCK_N, BLOCK_K, NF4, NF4_ASM and ROW_ALIGNED)
    for k0 in tl.range(0, k_dim, BLOCK_K, num_stages=PIPELINE):
        for k in tl.static_range(TOP_K):  # the top-k experts' loads of one K-step are independent
            pair = token.to(tl.int64) * TOP_K + k
            expert = tl.load(ids_ptr + pair).to(tl.int32)
            valid = (expert >= 0) & (expert < num_experts)
            row_ok = n_ok & ((expert + 0 * n) >= 0) & ((expert + 0 * n) < num_experts)  # the interpreter needs tensors
            expert = tl.where(valid, expert, 0)
            route_w = tl.load(route_w_ptr + pair).to(out_ptr.dtype.element_ty).to(tl.float32)
            acc = _gemv_rows(acc, w_ptr + expert.to(tl.int64) * stride_we, absmax_ptr, absmax_code_ptr, absmax_scale_ptr,
                              absmax_offset_ptr, nf4_code_ptr, act_ptr + pair * stride_am, route_w, expert, n, row_ok,
                              k0, k_dim, stride_wn, absmax_per_expert, scales_per_expert,
                              lut, NF4, DOUBLE_QUANT, ROW_ALIGNED, BLOCK_K, NF4_ASM, NF4_SMEM)
    total = _gemv_acc_sum(acc, NF4)
    if HAS_SHARED:
        gate = tl.sigmoid(tl.load(shared_gate_ptr + token.to(tl.int64) * stride_sg).to(tl.float32))
        shared_row = act_ptr + (shared_act_row + token.to(tl.int64) * shared_chunks) * stride_am
        SK: tl.constexpr = SHARED_BLOCK_K if SHARED_BLOCK_K > 0 else BLOCK_K
        acc_s = _gemv_acc(BLOCK_N, SK, NF4, NF4_ASM and ROW_ALIGNED)
        for k0 in tl.range(0, shared_k, SK, num_stages=PIPELINE):  # one expert: expert 0 of shared_w
            acc_s = _gemv_rows(acc_s, shared_w_ptr, shared_absmax_ptr, shared_absmax_code_ptr,
                                shared_absmax_scale_ptr, shared_absmax_offset_ptr, nf4_code_ptr, shared_row, gate, 0,
                                n, n_ok, k0, shared_k, stride_swn, 0, 0, lut, NF4, DOUBLE_QUANT, ROW_ALIGNED, SK,
                                NF4_ASM, NF4_SMEM)
        total += _gemv_acc_sum(acc_s, NF4)
    let_next_kernel_start(USE_PDL)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------------------- launchers

ALIGN_CHUNKED_FROM = 8192  # above this many pairs align_by_expert takes two passes over chunks
DECODE_MAX_PAIRS = 256  # up to here (64 tokens at top-4) the decode configuration is used
EXACT_GRID_ON_CPU = True  # False launches the CUDA path's worst-case grid in the interpreter too (tests)


def kernel_config(num_pairs: int, n_out: int, num_experts: int, gated: bool, nf4: bool, on_gpu: bool,
                  num_sms: int = 132) -> dict:
    """Block sizes, warps and pipeline stages for one grouped GEMM, by shape regime.

    Decode (num_pairs <= DECODE_MAX_PAIRS): 16-row blocks (the smallest tl.dot), and the
    largest N-tile that still gives about four programs per SM when every pair has its own
    expert, so enough loads are in flight to stream the weights. Prefill: large tiles for
    the tensor cores (gate and up each keep a [BLOCK_M, BLOCK_N] fp32 accumulator). NF4
    dequantizes in registers: K-tiles of 64 values and, for its gated GEMM, half the N-tile
    at the larger tiles keep it within 255 registers. The register and shared-memory
    figures behind these choices come from compiling for sm_90; the times are to be measured
    (`python -m moelab.bench experts --sweep`). Under the interpreter: few large programs.
    """
    if not on_gpu:
        return dict(BLOCK_M=16 if num_pairs <= 64 else 32, BLOCK_N=min(128, triton.next_power_of_2(n_out)),
                    BLOCK_K=64, num_warps=4, num_stages=1)
    if num_pairs <= DECODE_MAX_PAIRS:
        blocks = min(num_experts, num_pairs)
        block_n = next((bn for bn in (64, 32) if blocks * triton.cdiv(n_out, bn) >= 4 * num_sms), 16)
        if nf4:  # two stages: on an H100 at 65-256 pairs 1-2 % faster than the six this had (every round of
            # three, logits unchanged; benchmarks/results/nf4_prefill_grouped_stages_2026-12-07_h100.json)
            return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128 if block_n <= 32 else 64, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, num_warps=4, num_stages=4)
    # 64-row blocks: an expert's last block is half empty on average, so with tens of pairs per
    # expert larger blocks compute mostly padding. Gate + up at BLOCK_N = 128 is a 64 x 256 tile.
    if nf4:
        return dict(BLOCK_M=64, BLOCK_N=64 if gated else 128, BLOCK_K=64, num_warps=8, num_stages=3)
    if num_pairs >= 64 * num_experts:
        # Long prefills (64+ pairs per expert: 1,024+ tokens of Qwen1.5-MoE): 128-row blocks pay
        # for their padding with twice the reuse of each weight tile. Measured on an H200 at 4,096
        # tokens: gate_up 577 -> 464 us, down 274 -> 226 us (a 128 x 256 tile; gate_up's two
        # accumulators make 128 x 128 its largest that fits). An expert's last block holds ~17 of
        # its ~273 pairs there: HALF_TAIL runs such a block at 64 rows, and with four stages
        # gate_up takes 419 us, down 215 (473 / 225 without; sweep_prefill_2026-11-29_h200.json).
        # Running the tails as a second launch at 64 rows instead was slower (526 / 272 us:
        # sweep_prefill_split_2026-11-29_h200.json).
        return dict(BLOCK_M=128, BLOCK_N=128 if gated else 256, BLOCK_K=64, num_warps=8, num_stages=4, HALF_TAIL=True)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _is_nf4(w) -> bool:
    return hasattr(w, "codes") and hasattr(w, "absmax")


def is_silu(act_fn) -> bool:
    """Whether an activation module is SiLU (transformers' or torch's): the only one the kernels compute."""
    return type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def _expert_weights(layer_experts):
    """(gate_up, down, num_experts) of transformers' experts module or moelab.quant.NF4Experts."""
    if hasattr(layer_experts, "gate_up_proj") and hasattr(layer_experts, "down_proj"):
        gate_up, down = layer_experts.gate_up_proj, layer_experts.down_proj
    elif _is_nf4(getattr(layer_experts, "gate_up", None)) and _is_nf4(getattr(layer_experts, "down", None)):
        gate_up, down = layer_experts.gate_up, layer_experts.down
    else:
        raise ValueError(
            f"{type(layer_experts).__name__} is neither a transformers experts module (gate_up_proj, "
            "down_proj) nor a moelab.quant.NF4Experts (gate_up, down): the fused kernel cannot run it")
    act = getattr(layer_experts, "act_fn", None)
    if act is not None and not is_silu(act):
        raise ValueError(f"the fused kernel computes SiLU(gate) * up; this layer's activation is {type(act).__name__}")
    return gate_up, down


def _shape(w) -> tuple[int, int, int]:
    return tuple(w.shape)


@functools.lru_cache(maxsize=None)
def _nf4_code(device: torch.device) -> torch.Tensor:
    """float32 [400]: the NF4 code book, then 32 copies (one per lane) of the 4 register table
    words of `NF4_DOT_ASM` and the 256 entries of `nf4_pair_table` (their bits; from word
    NF4_PAIRS_AT), on `device` once (a host-to-device copy inside a CUDA graph capture would fail)."""
    from ..quant import NF4_CODE

    low, high = nf4_bf16_tables()
    words = torch.tensor([low[0], low[2], high[0], high[2]] * 32 + nf4_pair_table(),
                         dtype=torch.int64).to(torch.int32)  # wraps: same bits
    return torch.cat([NF4_CODE.to(torch.float32), words.view(torch.float32)]).to(device)


def _weight_args(w, num_experts: int) -> tuple[list, dict]:
    """Pointer / stride arguments and constexprs of one weight (a dense [E, R, C] tensor or an NF4Tensor)."""
    if not _is_nf4(w):
        none = w  # unused NF4 pointers: any tensor will do
        return ([w, none, none, none, none, none], [w.stride(0), w.stride(1), w.stride(2), 0, 0],
                dict(NF4=False, DOUBLE_QUANT=False, ROW_ALIGNED=False, NF4_ASM=False))
    _, rows, cols = w.shape
    double = w.absmax_scale is not None
    code = _nf4_code(w.codes.device)
    absmax_code = w.absmax_code if double else code
    scale = w.absmax_scale if double else w.absmax
    offset = w.absmax_offset if double else w.absmax
    return ([w.codes, w.absmax, absmax_code, scale, offset, code],
            [w.codes.stride(0), 0, 0, w.absmax.stride(0), scale.stride(0) if double else 0],
            dict(NF4=True, DOUBLE_QUANT=double, ROW_ALIGNED=cols % 64 == 0,
                 NF4_ASM=w.codes.is_cuda and torch.version.hip is None))


def nf4_to_dense(w) -> torch.Tensor:
    """An NF4Tensor [E, R, C] dequantized into a new dense tensor in w.dtype, one kernel (every
    value read once, written once): the long-prefill path of `fused_experts_forward`."""
    num_experts, rows, cols = w.shape
    half_n = rows * cols // 2
    out = torch.empty(num_experts, rows, cols, dtype=w.dtype, device=w.codes.device)
    ptrs, strides, flags = _weight_args(w, num_experts)
    block = 1024 if w.codes.is_cuda else 1 << 16
    _nf4_dense_kernel[(triton.cdiv(half_n, block), num_experts)](
        *ptrs, out, half_n, w.blocksize, strides[0], strides[3], strides[4],
        DOUBLE_QUANT=flags["DOUBLE_QUANT"], NF4_ASM=flags["NF4_ASM"], BLOCK=block)
    return out


def _whole_nf4_blocks(cfg: dict, w) -> dict:
    """An NF4 weight's K-step must cover whole 64-value blocks (one absmax each): round BLOCK_K up."""
    if _is_nf4(w) and cfg["BLOCK_K"] % 64:
        cfg["BLOCK_K"] = triton.cdiv(cfg["BLOCK_K"], 64) * 64
    return cfg


def _grouped_gemm(x, w, out, pairs, counts, route_w, num_pairs, num_experts, x_row_div, gated, config):
    _, rows, k_dim = _shape(w)
    n_out = rows // 2 if gated else rows
    nf4 = _is_nf4(w)
    cfg = kernel_config(num_pairs, n_out, num_experts, gated, nf4, x.is_cuda,
                        torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132)
    cfg = _whole_nf4_blocks({**cfg, **(config or {})}, w)
    ptrs, strides, flags = _weight_args(w, num_experts)
    block_m = cfg.pop("BLOCK_M")
    half_tail = cfg.pop("HALF_TAIL", False)
    if x.is_cuda or not EXACT_GRID_ON_CPU:  # sized for the worst case: no host sync, capturable
        num_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts + 1, num_pairs)
    else:  # the interpreter pays ~0.05 s per program, idle or not, and a host read is free
        num_blocks = sum(triton.cdiv(c, block_m) for c in counts.tolist())
    grid = (num_blocks * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    w_ptr, absmax, absmax_code, scale, offset, code = ptrs
    stride_we, stride_wn, stride_wk, absmax_per_expert, scales_per_expert = strides
    _grouped_gemm_kernel[grid](
        x, w_ptr, out, pairs, counts, route_w,
        absmax, absmax_code, scale, offset, code,
        n_out, k_dim, num_experts, x_row_div, num_blocks,
        x.stride(0), x.stride(1), stride_we, stride_wn, stride_wk, out.stride(0), out.stride(1),
        absmax_per_expert, scales_per_expert,
        GATED=gated, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts + 1), GROUP_M=8, HALF_TAIL=half_tail,
        **flags, **cfg,
    )


# Up to these pair counts decode runs the two ungrouped FMA kernels. Measured on an H200, each path
# forced (`python -m moelab.bench experts --paths`, benchmarks/results/experts_paths_2026-11-29_h200):
# bf16 at top-4, GEMV 27 us vs grouped 42 us at 1 token, equal at 4 tokens (84 vs 82 us), grouped
# ahead from 8 (130 vs 145 us); NF4, GEMV ahead up to 32 tokens (842 vs 1158 us), grouped ahead at
# 64 (1399 vs 1657 us): reading an expert once per pair beats dequantizing into tl.dot tiles until
# the same experts come back too often. NF4 was 128 pairs until timed in whole steps on an H100
# (benchmarks/results/nf4_gemv_threshold_ab_2026-12-06_h100.json, threshold 128 / 64 / 32): a
# 32-token NF4 prefill (128 pairs) took 13.7 ms on the GEMVs and 9.4 on the grouped GEMM, the batch-32
# decode step the same either way (23.2 / 23.1 ms), the batch-16 one (64 pairs) 14.7 on the GEMVs and
# 17.5 grouped: 64.
GEMV_MAX_PAIRS = 16
GEMV_MAX_PAIRS_NF4 = 64
# Above the decode configuration's pairs (DECODE_MAX_PAIRS: 64 tokens at top-4) NF4 experts are
# dequantized once per call into a dense workspace (`nf4_to_dense`: a transient bf16 copy of the
# layer's experts, 1.04 GB on Qwen1.5-MoE) and run through the dense grouped GEMMs: a prefill is
# compute-bound, and dequantizing inside every tile cost more than the bytes it saves. On an H200 one
# layer at 512 / 4,096 tokens went from 2,073 / 11,160 us to 983 / 1,389 us
# (benchmarks/results/experts_nf4_prefill_2026-11-29_h200.json). On an H100
# (nf4_grouped_ab_2026-12-06_h100.json) the grouped NF4 kernel with bf16 levels took 282 / 402 us at
# 16 / 64 tokens (dequantize-first ~920 / 1,029) but 1,327 us at 128 tokens, where its prefill
# configuration starts, against 1,031 dequantizing first: hence the threshold right above 256 pairs
# (it was 1,024).
NF4_DENSE_FROM_PAIRS = DECODE_MAX_PAIRS + 1
# From this many pairs up to NF4_DENSE_FROM_PAIRS, NF4 experts on CUDA run `moelab.kernels.nf4_mma`:
# grouped by expert, up to 8 pairs of one expert multiplied at once on the tensor cores. On an H100
# (benchmarks/results/nf4_mma_grouped_ab_2026-12-07_h100.json, alternating, 3 rounds) the routed layer
# at 2 / 3 / 4 / 8 / 16 / 32 / 64 tokens took 58 / 63 / 70 / 96 / 153 / 177 / 212 us against the
# previous paths' 30 / 47 / 55 / 103 / 198 / 348 / 387: from 8 tokens (32 pairs) on.
NF4_MMA_FROM_PAIRS = 32


# The gate_up rows of one Qwen1.5-MoE token: its 4 (token, expert) pairs and the shared expert's 4
# (5,632 = 4 x 1,408 intermediate rows, `SharedExpert`). Up to this many, NF4 gate_up takes 16-row programs.
NF4_GATE_UP_ONE_TOKEN_ROWS = 8


def gemv_config(num_rows: int, n_out: int, gated: bool, nf4: bool, on_gpu: bool, num_sms: int = 132,
                shared: bool = False) -> dict:
    """N-tile, K-step, warps and pipeline depth of one ungrouped decode kernel (`num_rows`: its
    pairs for gate_up, its tokens for down).

    Each program streams BLOCK_N weight rows (8, except NF4 at one token: 16; gate_up takes
    BLOCK_N gate and BLOCK_N up rows, down BLOCK_N rows of each of the top-k experts) in K-steps of
    BLOCK_K values, one FMA per weight into a [BLOCK_N, BLOCK_K] fp32 accumulator summed once at
    the end. A GEMV has no reuse to hide memory latency behind, so what sets its speed is how many bytes are in flight: PIPELINE > 1 has Triton prefetch the
    next K-steps' weights into shared memory (cp.async) while this one is multiplied. Chosen
    from a sweep on an H200 (benchmarks/results/sweep_experts_2026-11-29_h200.json): bf16 at
    1 token 27.3 -> ~22 us with 256-value K-steps, three stages; NF4 codes (4x fewer bytes per
    step) gain from prefetching only for gate_up at one token (up to 4 pairs). With the shared
    expert folded in (`shared`), down streams 4 x 1,408 + 5,632 values per row and takes
    512-value K-steps (benchmarks/results/sweep_decode_2026-11-29_h200.json: 42.2 -> 39.8 us for the
    whole layer at one token). The NF4 word path (`_nf4_words`) was swept on an H100, each
    kernel alone (benchmarks/results/sweep_nf4_gemv_2026-12-06_h100.json): no prefetching,
    512-value steps, and for down at one token 8 warps (1,024-value steps over the shared
    expert's rows): at one token, against the previous configs on the same
    code, gate_up 15.3 -> 11.4 us and down 7.9 -> 7.2 us (routed), 15.9 -> 11.6 and 9.2 -> 7.1 us
    (shared expert). NF4 down at one token then went to 16 rows per program on 32 warps (one
    program per SM), each of its rows in 2,048-value steps (1,408 of the routed experts' in one,
    the shared expert's 5,632 in three): the layer at one token 20.7 -> 19.0 us, the batch-1 decode
    step +2.6 % (benchmarks/results/sweep_nf4_wide_2026-12-06_h100.json; wider gate_up programs were
    all slower). NF4 gate_up at one token (NF4_GATE_UP_ONE_TOKEN_ROWS) then
    went to 16 rows per program on 8 warps, half the programs and so half the fills of the
    shared-memory table: the layer at one token 17.8 -> 17.0 us, with the shared expert 31.3 -> 30.3
    (benchmarks/results/nf4_t1_sweep_2026-12-06_h100.json, nf4_t1_sweep_n16w8_2026-12-06_h100.log).
    With the shared expert (`shared`: its 4 chunks double the programs to 704, two waves at 4 an
    SM) those 16 rows run on 4 warps in 256-value steps (compiled for sm_90, 64 registers and 33 KB
    of shared memory a program: 6 an SM, one wave): the layer 30.2 -> 29.6 us, the batch-1 decode step
    596 -> 605 tokens/s, where the 8-warp programs capped at 48 or 40 registers (5 or 6 an SM) were
    slower (34.9, 37.4-38.1 us; benchmarks/results/nf4_t1_sweep_waves_2026-12-06_h100.json,
    nf4_step_ab_2026-12-06_h100.json); without the shared expert the 4-warp shape is slower (20.8
    against 16.5-17.1 us). Under the interpreter: one wide program per row."""
    if not on_gpu:
        return dict(BLOCK_N=min(64, triton.next_power_of_2(n_out)), BLOCK_K=128, num_warps=4, PIPELINE=1)
    if nf4:  # the NF4 word path, from H100 sweeps (sweep_nf4_gemv_2026-12-06_h100, sweep_nf4_wide_2026-12-06_h100)
        if gated:
            if num_rows <= NF4_GATE_UP_ONE_TOKEN_ROWS:  # 16 rows a program: half the table fills
                if shared:  # 4 warps, 256-value steps: the 704 programs fit 6 an SM, one wave
                    return dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, PIPELINE=1)
                return dict(BLOCK_N=16, BLOCK_K=512, num_warps=8, PIPELINE=1)
            return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1)
        if num_rows == 1:  # one token: one program per SM, long K-steps (the whole routed row)
            cfg = dict(BLOCK_N=16, BLOCK_K=2048, num_warps=32, PIPELINE=1)
            return {**cfg, "SHARED_BLOCK_K": 2048} if shared else cfg
        return dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1)
    return dict(BLOCK_N=8, BLOCK_K=512 if shared and not gated else 256, num_warps=2 if gated else 4, PIPELINE=3)


@dataclass
class SharedExpert:
    """A layer's shared expert, for the decode kernels to fold in: the layer's output gains
    sigmoid(gate_logit) * down(SiLU(gate) * up) (Qwen2-MoE's gated shared expert).

    gate_up: [2 Is, H], the gate rows then the up rows (`moelab.fuse`'s fused MoE-input weight
    holds them so, a free view); down: [H, Is]; gate_logit: [T] or [T, 1], before the sigmoid.
    With NF4 experts, gate_up and down may be one-expert NF4Tensors [1, 2 Is, H] and [1, H, Is]
    (`moelab.quant.JointNF4`, `linear4bit_nf4`)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_logit: torch.Tensor


def shared_expert_torch(hidden: torch.Tensor, shared: SharedExpert) -> torch.Tensor:
    """The shared expert in PyTorch, rounded as transformers rounds it (each GEMM in the hidden dtype)."""
    gate, up = torch.nn.functional.linear(hidden, shared.gate_up).chunk(2, dim=-1)
    out = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, shared.down)
    return torch.sigmoid(shared.gate_logit.reshape(-1, 1)) * out


def _shared_expert(hidden: torch.Tensor, shared: SharedExpert) -> torch.Tensor:
    """The shared expert on its own (where the kernels do not fold it in): NF4 through the decode kernels."""
    if _is_nf4(shared.gate_up):
        return nf4_shared_expert(hidden, shared.gate_up, shared.down, shared.gate_logit)
    return shared_expert_torch(hidden, shared)


def _add_shared(out: torch.Tensor, hidden: torch.Tensor, shared: SharedExpert) -> torch.Tensor:
    """out + the shared expert, behind the grouped kernels: in NF4 on CUDA up to
    `nf4_mma.LINEAR_MAX_TOKENS` tokens two launches of `moelab.kernels.nf4_mma.linear` (gate/up with
    SiLU, then down adding sigmoid(gate logit) times its result into out, rounded as transformers
    rounds it), else `_shared_expert` and an add."""
    if _is_nf4(shared.gate_up) and hidden.is_cuda:
        from . import nf4_mma  # imported here: it imports this module's helpers

        if (hidden.shape[0] <= nf4_mma.LINEAR_MAX_TOKENS and nf4_mma.usable(hidden, shared.gate_up, shared.down)
                and shared.gate_up.dtype == hidden.dtype):
            act = nf4_mma.linear(hidden, shared.gate_up, gated=True)
            return nf4_mma.linear(act, shared.down, shared_gate=shared.gate_logit.reshape(-1, 1), add=out)
    return out + _shared_expert(hidden, shared)


def _check_shared(shared: SharedExpert, hidden: torch.Tensor) -> None:
    num_tokens, hidden_dim = hidden.shape
    nf4 = _is_nf4(shared.gate_up)
    gate_up, down = _shape(shared.gate_up), _shape(shared.down)
    if nf4 and gate_up[0] == down[0] == 1:  # one-expert NF4Tensors: their [rows, cols]
        gate_up, down = gate_up[1:], down[1:]
    if (_is_nf4(shared.down) != nf4 or len(gate_up) != 2 or gate_up[0] % 2 or gate_up[1] != hidden_dim
            or down != (hidden_dim, gate_up[0] // 2)):
        raise ValueError(f"shared expert weights do not fit: gate_up {_shape(shared.gate_up)}, down "
                         f"{_shape(shared.down)} (expected [2 Is, {hidden_dim}] and [{hidden_dim}, Is], "
                         "or both one-expert NF4Tensors [1, 2 Is, H] and [1, H, Is])")
    if shared.gate_logit.numel() != num_tokens:
        raise ValueError(f"shared gate_logit must hold one logit per token ({num_tokens}), got shape "
                         f"{tuple(shared.gate_logit.shape)}")


def _can_fold_shared(shared: SharedExpert, hidden: torch.Tensor, gate_up, down) -> bool:
    """Whether the decode kernels can stream this shared expert: dense weights in the hidden dtype
    with unit K stride beside dense experts; beside NF4 experts NF4 in their format (block size,
    double quantisation, rows of whole 64-blocks or not: one set of kernel flags serves both)."""
    if _is_nf4(gate_up):
        same = lambda a, b: (a.blocksize, a.double_quant, _shape(a)[2] % 64 == 0) == (  # noqa: E731
            b.blocksize, b.double_quant, _shape(b)[2] % 64 == 0)
        return (_is_nf4(shared.gate_up) and same(shared.gate_up, gate_up) and same(shared.down, down)
                and shared.gate_up.codes.device == hidden.device)
    return (not _is_nf4(shared.gate_up) and shared.gate_up.dtype == shared.down.dtype == hidden.dtype
            and shared.gate_up.stride(1) == 1 and shared.down.stride(1) == 1 and shared.gate_up.device == hidden.device)


@functools.lru_cache(maxsize=64)
def _zero_ids(num_tokens: int, device: torch.device) -> torch.Tensor:
    """int32 [T, 1] zeros: every token routed to expert 0 (made once per size, before a capture)."""
    return torch.zeros(num_tokens, 1, dtype=torch.int32, device=device)


def nf4_shared_expert(hidden: torch.Tensor, gate_up, down, gate_logit: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate_logit) * down(SiLU(gate) * up) of hidden [T, H] for a shared expert in NF4:
    gate_up a one-expert NF4Tensor [1, 2 Is, H] (gate rows, then up: quantized jointly,
    `moelab.quant.JointNF4`), down [1, H, Is]. The routed experts' decode kernels with one
    expert that every token picks and its sigmoid gate as the routing weight: two launches
    (and the sigmoid), where each Linear4bit on its own took five (gate, up, SiLU, product,
    down) and the gating two more."""
    if not _is_nf4(gate_up):
        raise ValueError(f"nf4_shared_expert takes NF4 weights, got gate_up {type(gate_up).__name__}")
    _check_shared(SharedExpert(gate_up, down, gate_logit), hidden)
    ids = _zero_ids(hidden.shape[0], hidden.device)
    return _gemv_forward(hidden, torch.sigmoid(gate_logit.reshape(-1)), ids, gate_up, down, _shape(down)[2], None)


def _gemv_forward(hidden, route_w, ids, gate_up, down, inter, config, shared: SharedExpert | None = None):
    """Decode: gate_up per (pair, N-tile) into act [S, I], then down per (token, N-tile) with
    the top-k sum folded in. No grouping step, no host sync. With `shared`, the shared
    expert's gate/up runs as C more rows per token in the first launch (its intermediate in
    chunks of I) and its down, behind its sigmoid gate, in the second's sum."""
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    num_experts, _, hidden_dim = _shape(gate_up)
    hidden = hidden.contiguous()  # the kernels step along K with unit stride
    if hidden.data_ptr() % 4:  # the NF4 kernels read x as 32-bit bf16 pairs
        hidden = hidden.clone()
    flat_ids = ids.reshape(-1).contiguous()
    on_gpu = hidden.is_cuda
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if on_gpu else 132
    shared_inter = _shape(shared.down)[-1] if shared is not None else 0
    chunks = triton.cdiv(shared_inter, inter)  # shared rows per token in act
    rows = num_pairs + num_tokens * chunks
    act = torch.empty(rows, inter, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty(num_tokens, hidden_dim, dtype=hidden.dtype, device=hidden.device)
    gate_logit = shared.gate_logit.reshape(-1) if shared is not None else hidden  # unused pointer without one

    def shared_args(routed, part):
        """The shared expert's weight pointer, row stride and absmax pointers (dense: the routed ones, unused)."""
        if shared is None:
            return routed[0], 0, routed[1:5]
        w = getattr(shared, part)
        if _is_nf4(w):
            ptrs, _, _ = _weight_args(w, 1)
            return ptrs[0], 0, ptrs[1:5]
        return w, w.stride(0), routed[1:5]

    cfg = _whole_nf4_blocks({**gemv_config(rows, inter, True, _is_nf4(gate_up), on_gpu, sms,
                                           shared=shared is not None), **(config or {})}, gate_up)
    ptrs, strides, flags = _weight_args(gate_up, num_experts)
    shared_w, shared_stride, shared_absmax = shared_args(ptrs, "gate_up")
    cfg = with_nf4_table(cfg, flags, "gate_up")
    _gemv_gate_up_kernel[(rows * triton.cdiv(inter, cfg["BLOCK_N"]),)](
        hidden, ptrs[0], flat_ids, act, shared_w, *ptrs[1:], *shared_absmax,
        inter, hidden_dim, num_experts, top_k, num_pairs, shared_inter, max(chunks, 1),
        hidden.stride(0), strides[0], strides[1], act.stride(0), shared_stride,
        strides[3], strides[4], HAS_SHARED=shared is not None, **flags, **cfg,
        **launch_args(hidden, late=True))  # down's programs would squat beside this kernel's

    cfg = _whole_nf4_blocks({**gemv_config(num_tokens, hidden_dim, False, _is_nf4(down), on_gpu, sms,
                                           shared=shared is not None), **(config or {})}, down)
    ptrs, strides, flags = _weight_args(down, num_experts)
    shared_w, shared_stride, shared_absmax = shared_args(ptrs, "down")
    cfg = with_nf4_table(cfg, flags, "down")
    _gemv_down_kernel[(num_tokens * triton.cdiv(hidden_dim, cfg["BLOCK_N"]),)](
        act, ptrs[0], flat_ids, route_w, out, shared_w, gate_logit, *ptrs[1:], *shared_absmax,
        hidden_dim, inter, num_experts, shared_inter, num_pairs, max(chunks, 1),
        act.stride(0), strides[0], strides[1], out.stride(0), shared_stride, gate_logit.stride(0),
        strides[3], strides[4], TOP_K=top_k, HAS_SHARED=shared is not None, **flags, **cfg,
        **launch_args(hidden, late=flags["NF4"]))
    return out


def align_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, k) pairs of ids [T, K] by expert, on the device, with no host sync.

    Returns counts int32 [E + 1] (pairs per expert; the last entry counts ids outside
    [0, E)) and pairs int32 [T * K]: the flat pair indices t * K + k sorted by expert, in
    pair order within an expert (what a stable argsort of ids.flatten() gives)."""
    flat_ids = ids.reshape(-1).contiguous()
    num_pairs = flat_ids.numel()
    counts = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    pairs = torch.empty(num_pairs, dtype=torch.int32, device=ids.device)
    if num_pairs == 0:
        return counts.zero_(), pairs
    if num_pairs > ALIGN_CHUNKED_FROM:
        # Many pairs: two passes over chunks of 256 pairs (count per chunk, then scatter), so each
        # pair is read twice rather than once per expert. On an H200 (benchmarks/results/
        # sweep_prefill_2026-11-29_h200.json): 16,384 pairs in 12.6 us against 24.3 us for the
        # one-kernel scan below; even at 8,192 pairs (12.4 / 12.8 us); at 4,096 the one kernel's
        # single launch wins (7.1 / 11.6 us).
        block_s, block_e = 256, triton.next_power_of_2(num_experts + 1)
        num_chunks = triton.cdiv(num_pairs, block_s)
        chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=ids.device)
        _align_count_kernel[(num_chunks,)](flat_ids, chunk_counts, num_pairs, num_experts, BLOCK_S=block_s,
                                           BLOCK_E=block_e)
        _align_scatter_kernel[(num_chunks,)](flat_ids, chunk_counts, counts, pairs, num_pairs, num_experts, num_chunks,
                                             BLOCK_S=block_s, BLOCK_E=block_e,
                                             BLOCK_C=triton.next_power_of_2(num_chunks))
        return counts, pairs
    # Otherwise one kernel: on the GPU one expert per program (E + 1 programs scan the pairs side by
    # side; 8 experts per program took 119 us at 16,384 pairs); in the interpreter one program for
    # all of them.
    group = 1 if ids.is_cuda else triton.next_power_of_2(num_experts + 1)
    _align_kernel[(triton.cdiv(num_experts + 1, group),)](
        flat_ids, counts, pairs, num_pairs, num_experts,
        BLOCK_S=min(1024 if ids.is_cuda else 4096, triton.next_power_of_2(num_pairs)), GROUP=group)
    return counts, pairs


def fused_experts_forward(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer_experts,
                          *, config: dict | None = None, shared: SharedExpert | None = None) -> torch.Tensor:
    """The routed experts of one layer with the fused kernels: sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]).

    Same contract as `moelab.model.experts_forward`: hidden [T, H]; weights [T, K] (any float
    dtype) and ids [T, K] (int) from the router; layer_experts is transformers' experts module
    (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, hidden in their dtype) or a
    `moelab.quant.NF4Experts`. Returns [T, H] in hidden's dtype. No host sync on CUDA, so it
    can be captured in a CUDA graph; there a pair whose id is outside [0, E) adds nothing (on
    the CPU, where checking is free, it raises). `config` overrides `kernel_config`'s choice
    (keys BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for both GEMMs: a tuning knob.
    The routing weights are rounded to the hidden dtype inside the kernels, as transformers
    rounds them (a float32 router output needs no cast kernel first).

    shared: the layer's shared expert (`SharedExpert`), added to the result. On the decode
    path (a few tokens, dense weights) the kernels stream it in the same two launches (on
    Qwen1.5-MoE at one token that replaces seven kernels: its down GEMM, the split-K reduce,
    SiLU, product, sigmoid, gating product and the add); elsewhere it runs in PyTorch.
    """
    gate_up, down = _expert_weights(layer_experts)
    num_experts, two_inter, hidden_dim = _shape(gate_up)
    inter = two_inter // 2
    if _shape(down) != (num_experts, hidden_dim, inter) or two_inter % 2:
        raise ValueError(f"expert weights do not fit together: gate_up {_shape(gate_up)}, down {_shape(down)} "
                         "(expected [E, 2I, H] and [E, H, I])")
    if hidden.dim() != 2 or hidden.shape[1] != hidden_dim:
        raise ValueError(f"hidden must be [T, {hidden_dim}], got {tuple(hidden.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"ids and weights must both be [T, K] with T = {hidden.shape[0]}, got "
                         f"{tuple(ids.shape)} and {tuple(weights.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or not weights.dtype.is_floating_point:
        raise ValueError(f"ids must be integers and weights floats, got {ids.dtype} and {weights.dtype}")
    weight_dtype = gate_up.dtype
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16) or hidden.dtype != weight_dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the expert weights compute in {weight_dtype}: they must match "
                         "(float32, float16 or bfloat16)")
    if _is_nf4(gate_up) and (hidden_dim % 2 or inter % 2):
        raise ValueError(f"NF4 experts need even H and I, got H={hidden_dim}, I={inter}")
    for name, t in (("weights", weights), ("ids", ids)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    if shared is not None:
        _check_shared(shared, hidden)
    if num_pairs == 0:
        out = hidden.new_zeros(num_tokens, hidden_dim)
        return out if shared is None else out + _shared_expert(hidden, shared)
    if not hidden.is_cuda and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}), got {int(ids.min())}..{int(ids.max())}")

    device = hidden.device
    route_w = weights.reshape(-1).contiguous()
    dense_k_ok = _is_nf4(gate_up) or (gate_up.stride(2) == 1 and down.stride(2) == 1)
    if _is_nf4(gate_up) and NF4_MMA_FROM_PAIRS <= num_pairs < NF4_DENSE_FROM_PAIRS and config is None:
        from . import nf4_mma  # imported here: it imports this module's helpers

        mma = nf4_mma.usable(hidden, gate_up, down)  # a few tokens per expert: the tensor cores (notebook 05, 14)
    else:
        mma = False
    if num_pairs <= (GEMV_MAX_PAIRS_NF4 if _is_nf4(gate_up) else GEMV_MAX_PAIRS) and dense_k_ok and not mma:
        if shared is not None and _can_fold_shared(shared, hidden, gate_up, down):
            return _gemv_forward(hidden, route_w, ids, gate_up, down, inter, config, shared)
        out = _gemv_forward(hidden, route_w, ids, gate_up, down, inter, config)
        return out if shared is None else out + _shared_expert(hidden, shared)
    if _is_nf4(gate_up) and num_pairs >= NF4_DENSE_FROM_PAIRS:
        gate_up, down = nf4_to_dense(gate_up), nf4_to_dense(down)
    counts, pairs = align_by_expert(ids, num_experts)
    act = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=device)
    out = torch.empty(num_pairs, hidden_dim, dtype=hidden.dtype, device=device)
    if mma:
        nf4_mma.grouped(hidden, gate_up, act, pairs, counts, route_w, top_k, gated=True)
        nf4_mma.grouped(act, down, out, pairs, counts, route_w, 1, gated=False)
    else:
        _grouped_gemm(hidden, gate_up, act, pairs, counts, route_w, num_pairs, num_experts, top_k, True, config)
        _grouped_gemm(act, down, out, pairs, counts, route_w, num_pairs, num_experts, 1, False, config)
    # The top-k sum: a kernel on CUDA (21 us at 4,096 tokens on an H200 against 37 us for PyTorch's
    # sum over the middle dimension), PyTorch in the interpreter.
    out = topk_sum(out, top_k) if device.type == "cuda" else out.view(num_tokens, top_k, hidden_dim).sum(dim=1)
    return out if shared is None else _add_shared(out, hidden, shared)


# MoeForward hands this function the float32 router weights (rounded in the kernels) and, on
# the decode path, the layer's shared expert.
fused_experts_forward.takes_shared_expert = True


def moelab_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-interface signature (registered as "moelab" by `moelab.patch`)."""
    return fused_experts_forward(hidden_states, top_k_weights, top_k_index, self)
