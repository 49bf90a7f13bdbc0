"""The NF4 gate_up K-loop's instructions by pipe, per code word, counted from sm_90 SASS on any machine.

Compiles `_gemv_gate_up_kernel` as the package launches it at one token (NF4 word path, 8 gate + 8
up rows per program, 512-value K-steps, 4 warps, shared expert folded in) with the code bytes looked
up by `prmt` in registers (`NF4_DOT_ASM`) and from the shared-memory pair table (`NF4_SMEM`:
`NF4_DOT_SMEM_ASM`), finds the K-loop (the SASS between the loop's backward branch and its target)
and sorts its instructions by the pipe that runs them. An H100 SM sub-partition retires 32 lanes a
clock of float (and IMAD) instructions but 16 of integer ones (PRMT, LOP3, SHF, LEA, IADD3, ...),
so a loop made mostly of integer instructions issues at most one every two clocks.

    python benchmarks/tuning/nf4_pipe_count.py

2026-12-06 (triton 3.6): per code word, prmt 43.2 instructions (27.0 integer, 12.4 float or IMAD,
3 LDG), 56 registers; table 33.2 (11.0 integer, 15.1 float or IMAD of which 6.1 IMAD, 4 LDS, 3
LDG), 95 registers. The table variant's fill adds 2 x 64 shfl / st.shared per thread and program
at 4 warps.
"""
import collections
import inspect
import os
import re

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, do not interpret

import moelab.kernels.experts as experts  # noqa: E402
from sass_count import compile_sass  # noqa: E402
INTEGER = {"PRMT", "LOP3", "SHF", "LEA", "IADD3", "ISETP", "SEL", "VIADD", "IABS", "BMSK", "SGXT", "FLO", "POPC",
           "BREV", "IMNMX", "VIMNMX"}
FLOAT = {"IMAD", "FFMA", "FADD", "FMUL", "HFMA2", "HMUL2", "HADD2", "FSEL", "FSETP", "MOV", "CS2R"}
MEMORY = {"LDG", "LDS", "STS", "LDC", "SHFL"}


def loop_ops(smem: bool) -> tuple[list[str], int]:
    """(opcodes of the K-loop body, registers per thread) of gate_up with or without the table."""
    fn = experts._gemv_gate_up_kernel
    consts = dict(NF4=True, DOUBLE_QUANT=True, ROW_ALIGNED=True, NF4_ASM=True, HAS_SHARED=True, BLOCK_N=8,
                  BLOCK_K=512, PIPELINE=1, NF4_SMEM=4 if smem else 0)
    types = {"x_ptr": "*bf16", "act_ptr": "*bf16", "ids_ptr": "*i32", "absmax_code_ptr": "*fp32",
             "absmax_scale_ptr": "*fp32", "absmax_offset_ptr": "*fp32", "nf4_code_ptr": "*fp32",
             "shared_absmax_code_ptr": "*fp32", "shared_absmax_scale_ptr": "*fp32",
             "shared_absmax_offset_ptr": "*fp32"}
    types = {n: types.get(n, "*u8" if n.endswith("_ptr") else "i32") for n in inspect.signature(fn.fn).parameters}
    sass, usage = compile_sass(fn, consts, types, num_warps=4)
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)]
    back = [(a, int(t, 16)) for a, t in re.findall(r"/\*([0-9a-f]{4})\*/\s+@!?P\d\s+BRA\s+0x([0-9a-f]+)", sass)]
    end, start = max(((int(a, 16), t) for a, t in back if t < int(a, 16)), key=lambda p: p[0] - p[1])
    return [op for a, op in ins if start <= a <= end], int(re.search(r"REG:(\d+)", usage).group(1))


if __name__ == "__main__":
    words_per_step = 2 * 8 * (512 // 8) // 128  # gate + up rows x code words per row / threads
    for smem in (False, True):
        ops, regs = loop_ops(smem)
        count = collections.Counter(ops)
        pipes = collections.Counter("integer" if op in INTEGER else "float/IMAD" if op in FLOAT
                                    else op if op in MEMORY else "other" for op in ops)
        per_word = {k: round(v / words_per_step, 1) for k, v in sorted(pipes.items())}
        print(f"{'table' if smem else 'prmt'}: {len(ops)} instructions a K-step ({len(ops) / words_per_step:.1f} "
              f"per code word), {regs} registers; per word {per_word}; IMAD {count['IMAD'] / words_per_step:.1f}")
