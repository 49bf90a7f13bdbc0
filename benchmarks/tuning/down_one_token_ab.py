"""The NF4 down kernel at one token, the package's config (16 rows per program on 32 warps,
2,048-value K-steps) against the one before it (8 rows on 8 warps, 512-value steps for the
routed rows, 1,024 for the shared expert's), alternating on one machine:
`bench_experts` at 1 and 8 tokens (moelab bf16 and NF4) three times each, and `bench_decode`
(graph_fused_proj, batches 1 and 64) twice each in NF4, bf16 twice beside them.

    python benchmarks/tuning/down_one_token_ab.py   # on the GPU machine; writes $OUT/down_one_token_ab.json
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
from tuning_common import build_models_once

OUT = os.environ.get("OUT", "/tmp")
PACKAGE = EK.gemv_config


def before(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
    """The NF4 one-token down config of commit 053c27c."""
    c = PACKAGE(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
    if nf4 and on_gpu and not gated and num_rows == 1:
        c = dict(BLOCK_N=8, BLOCK_K=512, num_warps=8, PIPELINE=1, **({"SHARED_BLOCK_K": 1024} if shared else {}))
    return c


build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "experts": [], "decode": []}
for rep in range(3):
    for variant in ("before", "package"):
        EK.gemv_config = before if variant == "before" else PACKAGE
        r = B.bench_experts(tokens=(1, 8), systems=("moelab_bf16", "moelab_nf4"))
        EK.gemv_config = PACKAGE
        res["copy_gbs"] = r["copy_bandwidth_gbs"]
        for row in r["results"]:
            res["experts"].append(dict(rep=rep, variant=variant, copy_gbs=r["copy_bandwidth_gbs"], **row))
        json.dump(res, open(os.path.join(OUT, "down_one_token_ab.json"), "w"), indent=1)
for quant, variants in (("nf4", ("before", "package") * 2), (None, ("package",) * 2)):
    for variant in variants:
        EK.gemv_config = before if variant == "before" else PACKAGE
        try:
            r = B.bench_decode("qwen1.5-moe-a2.7b", batches=(1, 64), prompt_len=(16, 64), max_seq_len=2048,
                               modes=("graph_fused_proj",), quantize=quant, profile=False)
        finally:
            EK.gemv_config = PACKAGE
        for row in r["results"]:
            res["decode"].append(dict(precision=quant or "bf16", variant=variant, batch=row["batch"],
                                      tokens_per_s=row.get("tokens_per_s"), ms_per_step=row.get("ms_per_step"),
                                      bound_tokens_per_s=row.get("bound_tokens_per_s"), error=row.get("error")))
            print("decode", res["decode"][-1], flush=True)
        json.dump(res, open(os.path.join(OUT, "down_one_token_ab.json"), "w"), indent=1)
