"""NF4 prefills: a dense NF4 linear (q/k/v, o_proj, the shared expert) as moelab's one dequantize
kernel + cuBLAS (`moelab.model.NF4_DEQUANT_MIN_TOKENS`, 16) against bitsandbytes' own path (its
absmax, weight and cast kernels + cuBLAS, or its gemm_4bit), alternating, ROUNDS rounds: whole
prefills of 16-64 tokens replayed from the Engine's prefill graphs (`tuning_common.nf4_prefill`),
their last-token logits compared, and the decode step at batch 16 and 64 (where the dense linears
take the same path).

Why: benchmarks/results/prefill_probe_2026-12-06_h100.json's profile of a 16-token NF4 prefill
spends 2.6 ms of 9.1 in bitsandbytes' kernels (120 absmax + 120 weight dequantizes, 120 casts,
48 gemm_4bit) where bf16's dense GEMMs take about 1.4.
Measured (H100, nf4_prefill_dequant_ab_2026-12-06_h100.json): prefills of 16 / 32 / 48 / 64 tokens
8.87 / 8.89 / 10.14 / 11.14 ms against bitsandbytes' 9.40 / 9.44 / 10.72 / 11.63, the decode step at
batch 16 and 64 14.59 / 32.17 against 14.72 / 32.41 ms; the package's path since.

    ROUNDS=2 python benchmarks/tuning/nf4_prefill_dequant_ab.py   # $OUT/nf4_prefill_dequant_ab.json
"""
import os

import moelab.model as MM
from tuning_common import alternate_nf4_prefills


def use(min_tokens):
    MM.NF4_DEQUANT_MIN_TOKENS = min_tokens


alternate_nf4_prefills({"moelab": MM.NF4_DEQUANT_MIN_TOKENS, "bitsandbytes": 1 << 30}, use,
                       int(os.environ.get("ROUNDS", "2")), (16, 64),
                       os.path.join(os.environ.get("OUT", "/tmp"), "nf4_prefill_dequant_ab.json"))
