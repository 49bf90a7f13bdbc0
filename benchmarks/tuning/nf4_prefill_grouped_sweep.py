"""The grouped NF4 GEMM's configuration between GEMV_MAX_PAIRS_NF4 and DECODE_MAX_PAIRS pairs
(17-64 tokens at top-4: short prefills, and decode steps of 17-64 sequences), timed where it runs:
whole NF4 prefills of 32, 48 and 64 tokens replayed from the Engine's prefill graphs
(`tuning_common.nf4_prefill`) and the decode step at batch 32 and 64. Each variant overrides `moelab.kernels.experts.kernel_config`'s
choice for NF4 in that range only; variants alternate, ROUNDS rounds; each prefill's last-token
logits are compared with the package's.

Why: the package's decode configuration there (16-row blocks) was chosen on uniform random
routing (one expert per pair at one token); in a prefill the pairs of one expert come in tens
(random-weight Qwen1.5-MoE concentrates them), and every 16-row block of an expert dequantizes
that expert's weights again. In prefill_probe_2026-12-06_h100.json the grouped NF4 GEMM takes 6.2
ms of a 64-token NF4 prefill against bf16's 3.5.

Measured on an H100 (2026-12-07): the lead does not hold. 32-row blocks made the prefills 20-24 %
slower, 64-row blocks 74-88 %, wider tiles 9-12 % (nf4_prefill_grouped_sweep_2026-12-07_h100.json);
two pipeline stages against the 6 the package had were about 1-2 % faster in every row of each of
three rounds (VARIANTS=package,m16_s3,m16_s4,m16_s2 ROUNDS=3: nf4_prefill_grouped_stages_2026-12-07_h100.json),
and the package now runs 2 ("package" in both files is the package as it was then).

    VARIANTS=package,m32,m64 ROUNDS=1 python benchmarks/tuning/nf4_prefill_grouped_sweep.py
"""
import json
import os

import moelab.bench as B
import moelab.kernels.experts as EK
from tuning_common import build_models_once, decode_step, keep_variants, nf4_prefill

OUT = os.environ.get("OUT", "/tmp")
ALL = {
    "package": {},
    "m32": dict(BLOCK_M=32),
    "m32_k128": dict(BLOCK_M=32, BLOCK_K=128),
    "m32_n32_k128": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128),
    "m32_w8": dict(BLOCK_M=32, num_warps=8),
    "m64": dict(BLOCK_M=64, num_warps=8, num_stages=3),
    "m16_n32_k128": dict(BLOCK_N=32, BLOCK_K=128),
    "m16_s3": dict(num_stages=3),
    "m16_s2": dict(num_stages=2),
    "m16_s4": dict(num_stages=4),
}
keep_variants({"VARIANTS": ALL}, "package")  # VARIANTS=a,b: only those (and the package)
VARIANTS = list(ALL)
ROUNDS = int(os.environ.get("ROUNDS", "1"))
PREFILLS = [int(n) for n in os.environ.get("PREFILLS", "32,48,64").split(",")]
BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "32,64").split(","))
package_config = EK.kernel_config
build_models_once()
res = {"card": B.card_name(), "versions": B.versions(), "variants": {v: ALL[v] for v in VARIANTS}, "rows": []}
print(res["card"], flush=True)
first_logits = {}


def use(overrides: dict):
    def kernel_config(num_pairs, n_out, num_experts, gated, nf4, on_gpu, num_sms=132):
        cfg = package_config(num_pairs, n_out, num_experts, gated, nf4, on_gpu, num_sms)
        if nf4 and on_gpu and EK.GEMV_MAX_PAIRS_NF4 < num_pairs <= EK.DECODE_MAX_PAIRS:
            cfg = {**cfg, **overrides}
        return cfg
    EK.kernel_config = kernel_config


for rep in range(ROUNDS):
    for variant in VARIANTS:
        use(ALL[variant])
        try:
            for n in PREFILLS:
                try:
                    ms, rel = nf4_prefill(n, first_logits)
                    row = dict(rep=rep, variant=variant, what=f"prefill {n}", ms=round(ms, 3), logits_rel_diff=rel)
                except Exception as e:  # a config that does not compile or fit: recorded, not fatal
                    row = dict(rep=rep, variant=variant, what=f"prefill {n}", ms=None, error=repr(e)[:200])
                res["rows"].append(row)
                print(row, flush=True)
            for r in decode_step(variant, "nf4", batches=BATCHES):
                row = dict(rep=rep, variant=variant, what=f"decode batch {r['batch']}", ms=r["ms_per_step"],
                           tokens_per_s=r["tokens_per_s"], error=r["error"])
                res["rows"].append(row)
                print(row, flush=True)
        finally:
            EK.kernel_config = package_config
        json.dump(res, open(os.path.join(OUT, "nf4_prefill_grouped_sweep.json"), "w"), indent=1)
