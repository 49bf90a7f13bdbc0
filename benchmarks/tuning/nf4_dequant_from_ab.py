"""Dequantize-then-cuBLAS for a step's dense NF4 linears from LINEAR_DEQUANT_FROM tokens, against the
16-token tensor-core tile (`moelab.kernels.nf4_mma.linear`, the package's path up to 64 tokens): whole
NF4 prefills of 16-64 tokens and the decode step at batch 32 and 64, alternating `nf4_mma.LINEAR_DEQUANT_FROM`
= 65 (off), 48 and 33, ROUNDS rounds (`tuning_common.alternate_nf4_prefills`).

Why: in the twentieth session's probe of each dense linear alone on an H200 (codes from HBM,
nf4_nb4_probe_2026-12-07_h200.json), dequantize-then-cuBLAS beat the tile at 48 and 64 tokens for every
dense NF4 linear (the shared expert's gate/up 45.6 against 57.5 us at 64 tokens) and lost at 24-32.
Written in the twentieth session, never run on a GPU.

    ROUNDS=2 python benchmarks/tuning/nf4_dequant_from_ab.py   # $OUT/nf4_dequant_from_ab.json
"""
import os

from moelab.kernels import nf4_mma
from tuning_common import alternate_nf4_prefills

OUT = os.environ.get("OUT", "/tmp")


def use(start):
    nf4_mma.LINEAR_DEQUANT_FROM = start


alternate_nf4_prefills({"tile": 65, "dequant_from_48": 48, "dequant_from_33": 33}, use,
                       int(os.environ.get("ROUNDS", "2")), (32, 64), os.path.join(OUT, "nf4_dequant_from_ab.json"))
