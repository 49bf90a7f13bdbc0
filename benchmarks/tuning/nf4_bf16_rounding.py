"""How far the NF4 word path's bf16 arithmetic (`moelab.kernels.experts.NF4_DOT_ASM`) sits from
dequantize-then-matmul, simulated in PyTorch on the CPU (the asm itself runs only on CUDA).

The kernel rounds each level to bf16, each product of a level and a bf16 x value to bf16 (two
values at a time, the second product fused with the first's sum: `mul`, `fma.rn.bf16x2`), adds
a word's two pairs of pair sums in bf16, and from there works in float32. The reference rounds
each dequantized weight (level x absmax) to bf16 once and accumulates in float32. Random codes,
absmax and x; one [2048, 2048] matrix:

    python benchmarks/tuning/nf4_bf16_rounding.py

2026-12-06 (this course's CPU machine): the word path 2.9e-3 relative L2 from exact and 3.3e-3
from the reference; the reference 1.6e-3 from exact. 2026-12-07, the lead at the end (each word
slot accumulated in bf16x2 across K-steps): 4.9e-3 (256-value steps) and 4.3e-3 (512) from the
reference, inside the kernels' 1e-2 tests; not built.
"""
import torch

from moelab.quant import NF4_CODE

torch.manual_seed(0)
bf16 = torch.bfloat16
N = K = 2048
levels = NF4_CODE.float()[torch.randint(0, 16, (N, K))]
absmax = (torch.rand(N, K // 64) * 0.05 + 0.01).repeat_interleave(64, 1)
x = torch.randn(K).to(bf16).float()
exact = (levels * absmax) @ x
reference = (levels * absmax).to(bf16).float() @ x


def r(t):
    return t.to(bf16).float()


p = r(levels).view(N, K // 8, 4, 2) * x.view(K // 8, 4, 2)  # [row, word, pair, half]
a = r(r(p[:, :, 0]) + p[:, :, 1])  # mul, then fma: pairs 0 and 1
c = r(r(p[:, :, 2]) + p[:, :, 3])  # pairs 2 and 3
halves = r(a + c)  # add.bf16x2: [row, word, half]
word = halves.sum(-1)  # the two halves in float32
words = (word.view(N, K // 64, 8).sum(-1) * absmax[:, ::64]).sum(-1)
rel = lambda got, want: float((got - want).norm() / want.norm())  # noqa: E731
print(f"word path: {rel(words, exact):.1e} from exact, {rel(words, reference):.1e} from the reference; "
      f"the reference {rel(reference, exact):.1e} from exact")

# A lead (sass_count.py --mix): keep each word slot of the [rows, K-step / 64, 8] accumulator in bf16x2
# across K-steps, one HFMA2 a word with the block's absmax rounded to bf16, where the package converts
# each word's pair sums to float32 and FMAs them with the absmax (~0.36 of its 4.5 instructions a value).
for block_k in (256, 512):
    lanes = halves.view(N, K // block_k, block_k // 8, 2)  # [row, K-step, word slot, half]
    am = r(absmax[:, ::8].reshape(N, K // block_k, block_k // 8, 1))  # each word's block absmax, in bf16
    acc = torch.zeros(N, block_k // 8, 2)
    for step in range(K // block_k):
        acc = r(lanes[:, step] * am[:, step] + acc)  # fma.rn.bf16x2 into the slot
    slots = acc.sum((1, 2))  # float32 at the end
    print(f"bf16x2 slots, {block_k}-value K-steps: {rel(slots, exact):.1e} from exact, "
          f"{rel(slots, reference):.1e} from the reference")
