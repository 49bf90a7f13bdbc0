"""Does programmatic dependent launch (PDL) shorten the gap between dependent small kernels in a
captured CUDA graph on this stack? A chain of 200 dependent copy-add kernels, with and without PDL:
benchmarks/results/pdl_probe_2026-12-06_h100.json.

    python benchmarks/tuning/pdl_probe.py      # on the GPU machine; writes $OUT/pdl_probe.json
"""
import json
import os
import statistics

import torch
import triton
import triton.language as tl

from moelab import bench


@triton.jit
def add_one(src, dst, n, USE_GDC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    x = tl.load(src + offs, mask=offs < n)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(dst + offs, x + 1, mask=offs < n)

res = {"card": bench.card_name(), "triton": triton.__version__, "torch": torch.__version__, "rows": []}
print(res)
for n in (1 << 12, 1 << 16, 1 << 20):
    for pdl in (False, True):
        a = torch.zeros(n, device="cuda"); b = torch.zeros(n, device="cuda")
        BLOCK = 1024
        grid = (triton.cdiv(n, BLOCK),)
        def chain():
            for i in range(100):
                add_one[grid](a, b, n, USE_GDC=pdl, BLOCK=BLOCK, launch_pdl=pdl)
                add_one[grid](b, a, n, USE_GDC=pdl, BLOCK=BLOCK, launch_pdl=pdl)
        try:
            chain(); torch.cuda.synchronize()
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain()
            torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
            a.zero_(); b.zero_()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain()
            a.zero_(); torch.cuda.synchronize()
            g.replay(); torch.cuda.synchronize()
            ok = bool((a == 200).all())
            times = []
            for _ in range(7):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(); g.replay(); e1.record(); e1.synchronize()
                times.append(e0.elapsed_time(e1) * 1e3 / 200)
            row = dict(n=n, pdl=pdl, us_per_kernel=statistics.median(times), correct=ok)
        except Exception as e:
            row = dict(n=n, pdl=pdl, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(row, flush=True)
        res["rows"].append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "pdl_probe.json"), "w"), indent=1)
