"""Where `tiny`'s decode step goes on a CPU core: the matrix products against everything else.

Issue 6 asks moelab continuous with 8 slots for 3x the tokens/s of transformers' `generate_batch`
on the CPU. This probe times moelab's batch-8 decode step (`MoeForward.decode`, 8 slots filled
with 40-token prompts, median of STEPS steps) and profiles STEPS more with torch.profiler, summing
the self time of the products (`aten::mm`, `bmm`, `addmm`, and the CPU flash attention) and of
every other op. Those products are the step's arithmetic: if every other op cost nothing, the
step would still take the products' time, so step_ms / products_ms bounds what trimming moelab's
other ops (Python, views, small kernels) can buy.

The routed experts run through `torch._grouped_mm` on the CPU (`moelab.model._experts_grouped_mm`,
since the twenty-first session; before, a dense path ran all 16 experts on every token, 4x the routed
FLOPs at top-4 of 16). PyTorch's CPU grouped GEMM is a C++ loop of one `aten::mm` per touched expert,
so those count among the products. The probe also records how many of the 16 experts one step's 8
tokens touch per layer (`experts_touched_per_layer`, from the routing ids of one step) and the
products' rate (`products_gflops`, the profiler's FLOP count of mm / bmm / addmm over their time).

    python benchmarks/tuning/cpu_step_breakdown.py   # writes $OUT/cpu_step_breakdown.json (default /tmp)
"""
import json
import os
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

import moelab
import moelab.bench as B
import moelab.model as model_module
from moelab.model import MoeForward

OUT = os.environ.get("OUT", "/tmp")
STEPS = int(os.environ.get("STEPS", "50"))
SLOTS, PROMPT, MAX_SEQ_LEN = 8, 40, 162
PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu")

torch.set_num_threads(1)  # as the serving benchmark runs every system on the CPU
model, _ = moelab.load("tiny")
forward = MoeForward(model)
cache = forward.new_cache(SLOTS, MAX_SEQ_LEN)
rng = random.Random(0)
for slot in range(SLOTS):
    cache.allocate(MAX_SEQ_LEN)
forward.prefill(cache, [[rng.randrange(256) for _ in range(PROMPT)] for _ in range(SLOTS)], list(range(SLOTS)))
tokens, slots = torch.randint(0, 256, (SLOTS,)), torch.arange(SLOTS)


def step():
    """One decode step of every slot, then the slots' lengths back, so every step sees the same cache."""
    forward.decode(cache, tokens, slots, check=False)
    cache.lengths[slots] -= 1


for _ in range(5):
    step()
times = []
for _ in range(STEPS):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
step_ms = sorted(times)[len(times) // 2] * 1e3

with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
    for _ in range(STEPS):
        step()
events = prof.key_averages()
ops = {e.key: (e.self_cpu_time_total / STEPS / 1e3, e.count / STEPS) for e in events}
products_ms = sum(ops[k][0] for k in PRODUCTS if k in ops)
gemm = [e for e in events if e.key in PRODUCTS[:3]]
products_gflops = sum(e.flops for e in gemm) / (sum(e.self_cpu_time_total for e in gemm) / 1e6) / 1e9

touched = []  # distinct experts of each layer's routing in one step
route = model_module.route
model_module.route = lambda *a, **kw: (lambda out: touched.append(out[1].unique().numel()) or out)(route(*a, **kw))
try:
    step()
finally:
    model_module.route = route
profiled_ms = sum(ms for ms, _ in ops.values())
res = {
    "benchmark": "cpu_step_breakdown", "card": "cpu", "versions": B.versions(),
    "workload": {"model": "tiny", "dtype": "float32", "threads": 1, "batch": SLOTS, "prompt_len": PROMPT,
                 "max_seq_len": MAX_SEQ_LEN, "steps": STEPS},
    "step_ms": round(step_ms, 3),
    "profiled_step_ms": round(profiled_ms, 3),
    "products_ms": round(products_ms, 3),
    "products": {k: {"ms": round(ops[k][0], 3), "calls": ops[k][1]} for k in PRODUCTS if k in ops},
    "products_gflops": round(products_gflops, 1),
    "experts_touched_per_layer": touched,
    "num_experts": model.config.num_experts,
    "ops_per_step": round(sum(c for _, c in ops.values())),
    "note": "ms per decode step of 8 slots; products_ms: self time of the matrix products and attention "
            "under the profiler (which adds per-op overhead to the rest, not to them); step_ms unprofiled",
}
print(json.dumps(res, indent=1))
with open(os.path.join(OUT, "cpu_step_breakdown.json"), "w") as f:
    json.dump(res, f, indent=1)
