"""Is the one-token experts layer waiting on HBM or on its own chain? One routed-experts layer of
Qwen1.5-MoE at T = 1 (bf16 and NF4, with and without the shared expert folded in), timed in one CUDA
graph two ways: 'cold', each call one of 8 random routings (the touched weights do not stay in L2),
and 'hot', the same routing every call (NF4's 17.9 MB routed, 35.7 MB with the shared expert, stay in
the H100's 50 MB L2; bf16's 69 MB do not). If hot is much faster the kernels wait on HBM; if not, on
their own chain of loads, look-ups and arithmetic. Writes $OUT/l2_hot_probe.json. Written on
2026-12-08 for the next session with a GPU (none was lent that day): about a minute on an H100.

    python benchmarks/tuning/l2_hot_probe.py
"""
import json
import os
import statistics

import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
from moelab import bench
from moelab.kernels.experts import SharedExpert, fused_experts_forward
from moelab.models import preset_config
from moelab.quant import NF4Experts
from moelab.routing import route

torch.manual_seed(0)
cfg = preset_config("qwen1.5-moe-a2.7b")
E, K, H = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
IS = cfg.shared_expert_intermediate_size
experts = Qwen2MoeExperts(cfg).to("cuda", torch.bfloat16)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.02)
    experts.down_proj.normal_(0, 0.02)
nf4 = NF4Experts.from_experts(experts, backend="torch").to("cuda")
cfg1 = preset_config("qwen1.5-moe-a2.7b")  # the shared expert as a one-expert layer of its width
cfg1.num_experts, cfg1.moe_intermediate_size = 1, IS
sh = Qwen2MoeExperts(cfg1).to("cuda", torch.bfloat16)
with torch.no_grad():
    sh.gate_up_proj.normal_(0, 0.02)
    sh.down_proj.normal_(0, 0.02)
sh_nf4 = NF4Experts.from_experts(sh, backend="torch").to("cuda")
x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
gate_logit = torch.randn(1, 1, device="cuda", dtype=torch.bfloat16)
routings = [route(torch.randn(1, E, device="cuda"), K) for _ in range(8)]
routings = [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in routings]
shared = {"bf16": SharedExpert(sh.gate_up_proj[0], sh.down_proj[0], gate_logit),
          "nf4": SharedExpert(sh_nf4.gate_up, sh_nf4.down, gate_logit)}
layers = {"bf16": experts, "nf4": nf4}
rows = []
for rep in range(3):
    for precision in ("nf4", "bf16"):
        for with_shared in (False, True):
            for mode, n in (("cold", 8), ("hot", 1)):
                kw = {"shared": shared[precision]} if with_shared else {}
                fn = lambda i: fused_experts_forward(x, *routings[i % n], layers[precision], **kw)
                with torch.no_grad():
                    us = bench._time_graph(fn, 8, repeats=7)
                rows.append(dict(rep=rep, precision=precision, shared=with_shared, mode=mode, us=round(us, 2)))
                print(rows[-1], flush=True)
summary = {}
for r in rows:
    summary.setdefault(f"{r['precision']}{'+shared' if r['shared'] else ''} {r['mode']}", []).append(r["us"])
summary = {k: statistics.median(v) for k, v in summary.items()}
print(json.dumps(summary, indent=1))
json.dump({"card": torch.cuda.get_device_name(), "rows": rows, "median_us": summary},
          open(os.path.join(os.environ.get("OUT", "/tmp"), "l2_hot_probe.json"), "w"), indent=1)
