"""The decode step with rotary + cache write + attention as one kernel (`rope_decode_attention`)
against the two kernels and merge it replaces, and lm_head through moelab's GEMV at one token
against cuBLAS: variants alternating in one process, three rounds, bf16 and NF4, batches 1 and 64.

- "two": `rope_and_cache_write`, `decode_attention` and (split-K) `_merge_splits_kernel`, cuBLAS lm_head
  (the package before this change);
- "merge": the one kernel, partials merged by `_merge_splits_kernel` (the package since);
- "ticket" (run1 only): the one kernel, split-K partials merged by each sequence's last split
  through an atomic ticket; no faster, and its code left the package (it is at commit 3ecb97d);
- "+head" on any of them: lm_head at one token through `moelab.kernels.gemv.linear_gemv`.

VARIANTS (comma list), PRECISIONS, BATCHES and ROUNDS pick them. Writes $OUT/rope_attention_ab.json.

    python benchmarks/tuning/rope_attention_ab.py
"""
import os

import moelab.kernels.attention as A
import moelab.model as MM
from tuning_common import alternate_decode_steps

OUT = os.environ.get("OUT", "/tmp")
VARIANTS = os.environ.get("VARIANTS", "two,two+head,merge,merge+head").split(",")
PRECISIONS = os.environ.get("PRECISIONS", "bf16,nf4").split(",")
BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "1,64").split(","))


def use(variant: str):
    parts = variant.split("+")
    if parts[0] not in ("two", "merge"):
        raise ValueError(f"unknown variant {variant!r}: two or merge, optionally +head")
    A.FUSE_ROPE = parts[0] == "merge"
    MM.HEAD_GEMV_MAX_TOKENS = 1 if "head" in parts else 0


alternate_decode_steps(VARIANTS, use, PRECISIONS, BATCHES, int(os.environ.get("ROUNDS", "3")),
                       os.path.join(OUT, "rope_attention_ab.json"))
use("merge+head")
