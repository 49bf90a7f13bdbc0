"""Decode with and without PDL on one machine, bf16 and NF4 (moelab.kernels.pdl), the model built once
per precision, four runs each alternating PDL off / on: benchmarks/results/decode_pdl_2026-12-06_h100.json.
With `next`, PDL stays on and the runs alternate where each kernel lets the next be placed
(pdl.NEXT_AT "start" / "end", or NEXT_A / NEXT_B from the environment): benchmarks/results/decode_pdl_next_2026-12-06_h100.json.

    python benchmarks/tuning/pdl_decode.py [next]   # on the GPU machine; writes $OUT/decode*_pdl*.json
"""
import json
import os
import sys

import moelab.bench as B
from moelab.kernels import pdl
from tuning_common import build_models_once

build_models_once()
OUT = os.environ.get("OUT", "/tmp")
runs = []
compare_next = sys.argv[1:] == ["next"]
settings = (os.environ.get("NEXT_A", "start"), os.environ.get("NEXT_B", "end")) * 2 if compare_next else (False, True, False, True)
for quant in (None, "nf4"):
    for setting in settings:
        if compare_next:
            pdl.ENABLED, pdl.NEXT_AT = True, setting
        else:
            pdl.ENABLED = setting
        r = B.bench_decode("qwen1.5-moe-a2.7b", batches=(1, 64), prompt_len=(16, 64), max_seq_len=2048,
                           modes=("graph_fused_proj",), quantize=quant, profile=False)
        r["workload"]["pdl_next_at"] = pdl.NEXT_AT
        for row in r["results"]:
            print(f"{quant or 'bf16':4s} pdl={setting!s:5s} (recorded {r['workload']['pdl']}) batch {row['batch']:3d}: "
                  f"{row.get('ms_per_step')} ms/step {row.get('tokens_per_s')} tok/s {row.get('error', '')}", flush=True)
        runs.append(r)
        tag = f"next_{setting}" if compare_next else str(int(setting))
        name = f"decode{'_nf4' if quant else ''}_pdl{tag}_{len(runs)}.json"
        json.dump(r, open(os.path.join(OUT, name), "w"), indent=1)
