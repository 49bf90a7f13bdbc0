"""Instructions per weight value in the decode GEMV loop, counted from sm_90 SASS on any machine.

Compiles moelab's `_gemv_gate_up_kernel` for sm_90 (no GPU needed: Triton's compiler and the
`cuobjdump` it ships) at two K-steps, BLOCK_K = 256 and 512, no pipelining, and divides the
difference in SASS instructions by the difference in weight values each thread handles per
K-step: what one more weight value costs in the loop body, prologue and epilogue cancelled out.
Each program streams 8 gate + 8 up rows with 2 warps (64 threads), so 256 more values per row
are 16 x 256 / 64 = 64 more values per thread.

    TRITON_INTERPRET=0 python benchmarks/tuning/sass_count.py
    TRITON_INTERPRET=0 python benchmarks/tuning/sass_count.py --mix   # by opcode, the decode step's gate_up

2026-12-07 (--mix, triton 3.9): 4.5 instructions per value, of which the pair table's look-ups take
~1.7 (LDS 0.56, PRMT 0.52, IMAD + LEA addresses 0.69), the bf16x2 products 0.63 (HFMA2, HMUL2,
HADD2), and each word's bf16-to-float32 sum and absmax FMA ~0.9 (FADD, FFMA, LOP3, SHF); the
rest is the epilogue's reduction (SHFL) and per-block absmax decoding.

On triton 3.9 (this course's CPU machine, 2026-11-29): NF4 (double-quantised absmax, byte
permutes to float32 levels) 13.2 instructions per value, bf16 8.1; per byte read 26.5 against 4.1.
2026-12-06, with the NF4 word path (`NF4_DOT_ASM`: bf16 levels, bf16x2 products): NF4 5.2 per
value (10.5 per byte), bf16 8.1. The difference also counts the epilogue's larger reduction,
so the loop itself costs a little less.
"""

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import moelab.kernels.experts as experts  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def compile_sass(fn, consts: dict, types: dict, num_warps: int) -> tuple[str, str]:
    """(SASS, cuobjdump's resource usage) of a moelab kernel compiled for sm_90: constexprs
    `consts`, pointer types from `types` (other arguments i32), pointers and the usual sizes and
    strides marked 16-divisible as the JIT specialises them."""
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ("k_dim", "n_out", "stride_xm", "stride_we",
                                                                "stride_wn", "stride_am", "stride_swn")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        run = lambda *a: subprocess.run([CUOBJDUMP, *a, f.name], capture_output=True, text=True, check=True).stdout  # noqa: E731
        return run("-sass"), run("-res-usage")


def sass_instructions(nf4: bool, block_k: int) -> int:
    consts = dict(NF4=nf4, DOUBLE_QUANT=nf4, ROW_ALIGNED=nf4, NF4_ASM=nf4, HAS_SHARED=False, BLOCK_N=8,
                  BLOCK_K=block_k, PIPELINE=1, NF4_SMEM=0)
    types = {"x_ptr": "*bf16", "act_ptr": "*bf16", "shared_w_ptr": "*bf16", "w_ptr": "*u8" if nf4 else "*bf16",
             "ids_ptr": "*i32", "absmax_ptr": "*u8", "absmax_code_ptr": "*fp32", "absmax_scale_ptr": "*fp32",
             "absmax_offset_ptr": "*fp32", "nf4_code_ptr": "*fp32"}
    sass, _ = compile_sass(experts._gemv_gate_up_kernel, consts, types, num_warps=2)
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/\s+\S", line))

def opcode_mix(block_k: int) -> collections.Counter:
    """Static SASS opcodes of the one-token NF4 gate_up as the decode step runs it with the shared
    expert folded in (16 rows, 4 warps, the shared-memory pair table, PDL), at K-steps of block_k."""
    consts = dict(NF4=True, DOUBLE_QUANT=True, ROW_ALIGNED=True, NF4_ASM=True, HAS_SHARED=True, BLOCK_N=16,
                  BLOCK_K=block_k, PIPELINE=1, USE_PDL=2, NF4_SMEM=4)
    types = {"x_ptr": "*bf16", "act_ptr": "*bf16", "ids_ptr": "*i32", "absmax_code_ptr": "*fp32",
             "absmax_scale_ptr": "*fp32", "absmax_offset_ptr": "*fp32", "nf4_code_ptr": "*fp32",
             "shared_absmax_code_ptr": "*fp32", "shared_absmax_scale_ptr": "*fp32", "shared_absmax_offset_ptr": "*fp32"}
    types.update({n: "*u8" for n in ("w_ptr", "shared_w_ptr", "absmax_ptr", "shared_absmax_ptr")})
    sass, _ = compile_sass(experts._gemv_gate_up_kernel, consts, types, num_warps=4)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


if __name__ == "__main__":
    if "--mix" in sys.argv:  # which instructions one more weight value costs, by opcode
        extra_values = 16 * 2 * 256 / 128  # a thread's values: 256 more on 16 gate + 16 up rows over 128 threads
        small, large = opcode_mix(256), opcode_mix(512)
        extra = {op: large[op] - small[op] for op in large if large[op] != small[op]}
        print(f"one-token NF4 gate_up (shared expert folded in): {sum(extra.values()) / extra_values:.2f} instructions "
              "per weight value")
        for op, n in sorted(extra.items(), key=lambda kv: -kv[1]):
            print(f"  {op:8s} {n / extra_values:5.2f}")
        raise SystemExit(0)
    values_per_thread = 16 * 256 // 64
    for nf4, bytes_per_value in ((True, 0.5), (False, 2)):
        per_value = (sass_instructions(nf4, 512) - sass_instructions(nf4, 256)) / values_per_thread
        print(f"{'NF4' if nf4 else 'bf16'}: {per_value:.1f} instructions per weight value, "
              f"{per_value / bytes_per_value:.1f} per byte read")
