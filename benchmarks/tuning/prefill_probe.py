"""Where a served request's prefill goes, bf16 against NF4: one prompt per length bucket of the
serving workload (16-64 tokens: buckets 16, 32, 48, 64) replayed from the Engine's prefill
graphs (`moelab.graphs.PrefillGraphs`), median ms of 10 replays, and the kernels of one replay
at 16 and 64 tokens (torch profiler, top 12; PROFILE_AT and ROWS change both).

Why: served one request at a time (benchmarks/results/serve_c1_2026-12-06_h100_run10.json), a
request takes 117.4 ms in NF4 (4,096 tokens / 545.0 tokens/s over 64 requests) of which 63
decode steps at the ITL p50 of 1.67 ms are 105.2, leaving ~12 ms for its prefill and first
token, against ~6.4 ms in bf16 (146.9 - 63 x 2.23): NF4 is ahead in decode and behind in prefill.

Measured on an H100 (benchmarks/results/prefill_probe_2026-12-06_h100.json, 2026-12-06's tenth
session; its "nf4_bnb" rows are NF4 as the package runs it, its "nf4" rows NF4 with the dense
linears through the in-register NF4 GEMM of benchmarks/tuning/nf4_prefill_linear_sweep.py, slower
and dropped): buckets 16/32/48/64 bf16 5.4/6.1/6.2/6.6 ms, NF4 9.5/13.9/10.6/11.5 ms. In NF4 the
routed experts take about half of it: at 16 tokens (64 pairs) their decode GEMVs 4.5 ms against
bf16's grouped GEMM 2.3 ms; at 64 tokens the grouped NF4 GEMM 6.2 ms against bf16's 3.5 ms; at 32
tokens (128 pairs, still the GEMV path: GEMV_MAX_PAIRS_NF4) the prefill is slower than at 48.
bitsandbytes' dequantize kernels and its gemm_4bit take most of the rest (2.4 ms at 16 tokens).
Since the eleventh session the package runs neither of those: GEMV_MAX_PAIRS_NF4 is 64 (the 32-token
prefill on the grouped GEMM) and a prefill's NF4 linears are dequantized by moelab's own kernel
(moelab.model.NF4_DEQUANT_MIN_TOKENS; nf4_gemv_threshold_ab_2026-12-06_h100.json and
nf4_prefill_dequant_ab_2026-12-06_h100.json). PRECISIONS takes bf16 and nf4 (the package as it is).

    PRECISIONS=bf16,nf4 python benchmarks/tuning/prefill_probe.py   # writes $OUT/prefill_probe.json
"""
import json
import os

import torch

import moelab.bench as B
from moelab.engine import Engine
from moelab.kernels.experts import fused_experts_forward
from moelab.models import load

OUT = os.environ.get("OUT", "/tmp")
PROFILE_AT = [int(n) for n in os.environ.get("PROFILE_AT", "16,64").split(",")]
ROWS = int(os.environ.get("ROWS", "12"))
res = {"card": B.card_name(), "versions": B.versions(), "rows": [], "profiles": {}}
for precision in os.environ.get("PRECISIONS", "bf16,nf4").split(","):
    if precision not in ("bf16", "nf4"):
        raise SystemExit(f"PRECISIONS takes bf16 and nf4, got {precision!r}")
    model, _ = load("qwen1.5-moe-a2.7b", device="cuda", random_weights=True,
                    **({"quantize": "nf4"} if precision == "nf4" else {}))
    engine = Engine(model, num_slots=1, max_seq_len=2048, experts_fn=fused_experts_forward)
    graphs, slot = engine.prefill_graphs, 0
    gen = torch.Generator().manual_seed(0)
    for n in (16, 32, 48, 64):
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        ms = B.median_seconds(lambda: graphs.prefill(prompt, slot)) * 1e3  # its bucket captured at the first call
        res["rows"].append(dict(precision=precision, tokens=n, ms=round(ms, 3)))
        print(res["rows"][-1], flush=True)
        if n in PROFILE_AT:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                graphs.prefill(prompt, slot)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=ROWS, max_name_column_width=70)
            res["profiles"][f"{precision}_{n}"] = table
            print(table, flush=True)
    json.dump(res, open(os.path.join(OUT, "prefill_probe.json"), "w"), indent=1)
    del engine, graphs, model
    torch.cuda.empty_cache()
