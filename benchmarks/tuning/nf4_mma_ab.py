"""NF4 experts on the tensor cores for 2-64 tokens (`moelab.kernels.nf4_mma`) against the paths
they replace (the decode GEMVs up to 16 tokens, the grouped NF4 GEMM above), alternating in one
process (MOELAB_NF4_MMA's switch, `nf4_mma.ENABLED`):

1. the routed NF4 layer of Qwen1.5-MoE-A2.7B at T tokens (CUDA graphs of 8 random routings,
   outputs checked against dequantize-then-matmul), 3 rounds;
2. whole NF4 prefills of 16 / 32 / 48 / 64 tokens replayed from a fresh Engine's prefill graph
   (`tuning_common.nf4_prefill`), 2 rounds;
3. the NF4 decode step at batch 4 / 16 / 64 (`bench_decode`, graph_fused_proj), 1 round.

Writes $OUT/nf4_mma_ab.json.

    python benchmarks/tuning/nf4_mma_ab.py
"""
import json
import os
import types

import torch

import moelab
import moelab.bench as B
import moelab.kernels.nf4_mma as MMA
from moelab.kernels.experts import fused_experts_forward
from moelab.models import preset_config
from moelab.quant import dequantize_nf4
from moelab.routing import route
from tuning_common import build_models_once, decode_step, graph_timed, nf4_prefill, routed_layer_at_one_token

OUT = os.environ.get("OUT", "/tmp")
TOKENS = [int(t) for t in os.environ.get("TOKENS", "2,3,4,8,16,32,48,64").split(",")]
res = {"card": B.card_name(), "versions": B.versions(), "layer": [], "prefill": [], "step": []}
print(res["card"], flush=True)


def save():
    json.dump(res, open(os.path.join(OUT, "nf4_mma_ab.json"), "w"), indent=1)


torch.manual_seed(0)
experts, nf4, _, _ = routed_layer_at_one_token(1)
config = preset_config("qwen1.5-moe-a2.7b")
ref = types.SimpleNamespace(gate_up_proj=dequantize_nf4(nf4.gate_up).float(), down_proj=dequantize_nf4(nf4.down).float(),
                            act_fn=torch.nn.SiLU(), num_experts=config.num_experts)
for rep in range(3):
    for T in TOKENS:
        x = torch.randn(T, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(T))
        inputs = []
        for i in range(8):
            w, ids = route(torch.randn(T, config.num_experts, device="cuda"), config.num_experts_per_tok)
            inputs.append((w.to(torch.bfloat16), ids.to(torch.int64)))
        expected = [moelab.model.experts_torch(x.float(), w.float(), ids, ref) for w, ids in inputs]
        for on in (False, True):
            MMA.ENABLED = on
            us, err, _ = graph_timed(lambda i: fused_experts_forward(x, *inputs[i], nf4), 8, expected)
            res["layer"].append(dict(rep=rep, T=T, mma=on, us=us, err=err))
            print("layer", res["layer"][-1], flush=True)
    save()
MMA.ENABLED = True

build_models_once()
first = {}
for rep in range(2):
    for n in (16, 32, 48, 64):
        for on in (False, True):
            MMA.ENABLED = on
            ms, diff = nf4_prefill(n, first)
            res["prefill"].append(dict(rep=rep, tokens=n, mma=on, ms=round(ms, 3), logits_diff=diff))
            print("prefill", res["prefill"][-1], flush=True)
    save()
MMA.ENABLED = True
for on in (False, True):
    MMA.ENABLED = on
    for row in decode_step("mma" if on else "before", "nf4", batches=(4, 16, 64)):
        res["step"].append(row)
        print("step", row, flush=True)
    save()
MMA.ENABLED = True
print("done", flush=True)
