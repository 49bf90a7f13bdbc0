"""One NF4 MoE layer at one token (routed top-4 + shared expert), package configs, for ncu:

    ncu --clock-control none -k regex:_gemv --launch-skip 4 --launch-count 4 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
        python benchmarks/tuning/nf4_ncu_probe.py

benchmarks/results/ncu_nf4_gemv_2026-12-06_h100.txt: the H100 report (the configs before that day's sweep)."""
import torch
from moelab.kernels import experts as EK
from moelab.quant import quantize_nf4
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, I, E, K, IS = 2048, 1408, 60, 4, 5632
q = lambda w: quantize_nf4(w, backend="torch")
gu, dn = q(torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02), q(torch.randn(E, H, I, device=dev, dtype=dt) * 0.02)
sgu, sdn = q(torch.randn(1, 2 * IS, H, device=dev, dtype=dt) * 0.02), q(torch.randn(1, H, IS, device=dev, dtype=dt) * 0.02)
layer = type("L", (), dict(gate_up_proj=gu, down_proj=dn, act_fn=torch.nn.SiLU()))()
x = torch.randn(1, H, device=dev, dtype=dt)
w = torch.rand(1, K, device=dev, dtype=dt)
for it in range(6):
    ids = torch.randperm(E, device=dev)[:K].view(1, K)
    EK.fused_experts_forward(x, w, ids, layer)
    EK.nf4_shared_expert(x, sgu, sdn, torch.randn(1, device=dev, dtype=dt))
torch.cuda.synchronize()
