"""H200 sweep behind the decode GEMV configs at one token: the experts kernels with the shared expert
folded in (gate_up and down configs), and moelab.kernels.gemv for q/k/v, o_proj and the router rows
against cuBLAS. Run on the GPU machine: python benchmarks/tuning/decode_sweep.py (writes $OUT/sweep_b.json);
the committed result is benchmarks/results/sweep_decode_2026-11-29_h200.json."""
import itertools, json, os, sys, time
import torch
import torch.nn.functional as F
import moelab
from moelab import bench
import moelab.kernels.experts as EX
from moelab.kernels.experts import SharedExpert, fused_experts_forward
from moelab.kernels.gemv import linear_gemv

out_dir = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K, Is = 2048, 1408, 60, 4, 5632
R = 6  # rotating layers (weights beyond L2)
gu = [torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02 for _ in range(R)]
dn = [torch.randn(E, H, I, device=dev, dtype=dt) * 0.02 for _ in range(R)]
sgu = [torch.randn(2 * Is, H, device=dev, dtype=dt) * 0.02 for _ in range(R)]
sdn = [torch.randn(H, Is, device=dev, dtype=dt) * 0.02 for _ in range(R)]
x = torch.randn(1, H, device=dev, dtype=dt)
gl = torch.randn(1, 1, device=dev, dtype=dt)
ids = [torch.randperm(E, device=dev)[:K].view(1, K).int() for _ in range(R)]
w = torch.rand(1, K, device=dev)
layers = [type("L", (), dict(gate_up_proj=gu[i], down_proj=dn[i], act_fn=torch.nn.SiLU()))() for i in range(R)]
res = {"card": bench.card_name(), "copy_gbs": bench.copy_bandwidth_gbs()}
print(res, flush=True)
orig = EX.gemv_config
def run_cfg(gate_cfg, down_cfg):
    def cfg(num_rows, n_out, gated, nf4, on_gpu, num_sms=132):
        c = orig(num_rows, n_out, gated, nf4, on_gpu, num_sms)
        return {**c, **((gate_cfg if gated else down_cfg) or {})}
    EX.gemv_config = cfg
    try:
        fn = lambda i: fused_experts_forward(x, w, ids[i], layers[i], shared=SharedExpert(sgu[i], sdn[i], gl))
        return bench._time_graph(fn, R)
    finally:
        EX.gemv_config = orig
rows = []
base = run_cfg(None, None)
print("package (routed+shared)", base, flush=True); rows.append({"what": "package", "us": base})
routed_only = bench._time_graph(lambda i: fused_experts_forward(x, w, ids[i], layers[i]), R)
print("routed only", routed_only, flush=True); rows.append({"what": "routed_only", "us": routed_only})
for what, warps in (("down", (2, 4, 8)), ("gate_up", (2, 4))):  # each kernel's configs, the other at its default
    for bn, bk, nw, pl in itertools.product((4, 8, 16), (256, 512), warps, (1, 3)):
        c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
        try:
            t = run_cfg(c, None) if what == "gate_up" else run_cfg(None, c)
        except Exception:
            t = None
        rows.append({"what": what, **c, "us": t}); print(what, c, t, flush=True)
# dense GEMV
shapes = {"qkv": (6144, True), "o_proj": (2048, False), "router": (61, False)}
for name, (n, has_b) in shapes.items():
    ws = [torch.randn(n, H, device=dev, dtype=dt) * 0.02 for _ in range(16)]
    b = torch.randn(n, device=dev, dtype=dt) if has_b else None
    t = bench._time_graph(lambda i: F.linear(x, ws[i], b), 16); rows.append({"what": name, "impl": "cublas", "us": t})
    print(name, "cublas", t, flush=True)
    for bn, bk, nw, pl in itertools.product((4, 8, 16), (256, 512), (2, 4, 8), (1, 3)):
        c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=pl)
        try:
            t = bench._time_graph(lambda i: linear_gemv(x, ws[i], b, config=c), 16)
        except Exception as e:
            t = None
        rows.append({"what": name, "impl": "gemv", **c, "us": t}); print(name, c, t, flush=True)
res["rows"] = rows
json.dump(res, open(f"{out_dir}/sweep_b.json", "w"), indent=1)
for what in ("down", "gate_up", "qkv", "o_proj", "router"):
    ok = [r for r in rows if r["what"] == what and r.get("us") and r.get("impl", "gemv") == "gemv"]
    ok.sort(key=lambda r: r["us"])
    print("BEST", what, ok[:3])
