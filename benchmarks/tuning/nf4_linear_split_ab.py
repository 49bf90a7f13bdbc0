"""When `moelab.kernels.nf4_mma.linear` splits K: whole NF4 prefills of 16-64 tokens (replayed from
the Engine's prefill graphs, `tuning_common.alternate_nf4_prefills`) with `linear_splits` splitting
only below 1, 2 or 4 programs per SM (`nf4_mma.SPLIT_BELOW_PROGRAMS_PER_SM`), alternating, ROUNDS rounds.

Why: on one H100 (nf4_dense_mma_probe_split_2026-12-07_h100.json) splitting K took a 16-token q/k/v
from 21.6 to 13-15 us and the shared down from 57.8 to 14.3, but at 64 tokens, where the token
blocks already give 352-384 programs, the unsplit q/k/v (27.9) and shared gate/up (58.6) beat the
split ones (35-36, 61-67).

    ROUNDS=2 python benchmarks/tuning/nf4_linear_split_ab.py   # $OUT/nf4_linear_split_ab.json
"""
import os

from moelab.kernels import nf4_mma
from tuning_common import alternate_nf4_prefills


def use(below):
    nf4_mma.SPLIT_BELOW_PROGRAMS_PER_SM = below


alternate_nf4_prefills({"below_2": 2, "below_1": 1, "below_4": 4}, use, int(os.environ.get("ROUNDS", "2")), (),
                       os.path.join(os.environ.get("OUT", "/tmp"), "nf4_linear_split_ab.json"))
