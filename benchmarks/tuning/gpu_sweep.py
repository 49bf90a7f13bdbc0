"""GPU sweep: NF4 GEMV variants at T=1/4 and bf16 prefill tiles at T=4096 (scratch, not committed)."""
import json, os, statistics, sys, time
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
from moelab.bench import _time_graph, copy_bandwidth_gbs, matmul_tflops
from moelab.kernels import experts as EK
from moelab.models import preset_config
from moelab.quant import NF4Experts
from moelab.routing import route
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
import nf4v

OUT = os.environ.get("OUT", "/tmp")
res = {"nf4": [], "prefill": []}
torch.manual_seed(0)
config = preset_config("qwen1.5-moe-a2.7b")
E, K, H, I = config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
experts = Qwen2MoeExperts(config).to("cuda", torch.bfloat16)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.02); experts.down_proj.normal_(0, 0.02)
nf4 = NF4Experts.from_experts(experts, backend="torch").to("cuda")
gu, dn = nf4.gate_up, nf4.down
code = EK._nf4_code(torch.device("cuda"))
bw = copy_bandwidth_gbs(); print(f"copy bw {bw:.0f} GB/s", flush=True)
R = 8

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

# ------------------------------------------------------------------ NF4 decode
for T in (1, 4):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rts = [route(torch.randn(T, E, device="cuda"), K) for _ in range(R)]
    ins = [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in rts]
    with torch.no_grad():
        base = _time_graph(lambda i: EK.fused_experts_forward(x, *ins[i], nf4), R)
    print(f"T={T} package nf4 {base:.1f} us", flush=True)
    res["nf4"].append(dict(T=T, variant="package", us=base))
    ref = [EK.fused_experts_forward(x, *ins[i], nf4) for i in range(R)]
    act = torch.empty(T * K, I, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    flats = [ids.reshape(-1).contiguous() for _, ids in ins]
    rws = [w.reshape(-1).contiguous() for w, _ in ins]
    gu_cfgs = [(4, 512, 4), (8, 512, 4), (8, 1024, 4), (4, 1024, 4), (16, 512, 8), (8, 1024, 8), (2, 1024, 2),
               (4, 2048, 8), (8, 256, 2), (16, 1024, 8), (2, 2048, 4)]
    dn_cfgs = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (2, 512, 2), (4, 256, 2), (16, 256, 8), (8, 512, 8), (4, 1024, 4),
               (2, 1024, 4)]
    for lookup in (0, 1, 3, 2):
        best = {}
        for name, cfgs in (("gate_up", gu_cfgs), ("down", dn_cfgs)):
            for bn, bk, nw in (cfgs if lookup != 2 else cfgs[:4]):
                def run(i, bn=bn, bk=bk, nw=nw, name=name):
                    if name == "gate_up":
                        nf4v.gate_up_kernel[(T * K * triton.cdiv(I, bn),)](
                            x, gu.codes, flats[i], act, gu.absmax, gu.absmax_code, gu.absmax_scale, gu.absmax_offset, code,
                            I, H, H // 2, K, x.stride(0), gu.codes.stride(0), act.stride(0), gu.absmax.stride(0),
                            gu.absmax_scale.stride(0), LOOKUP=lookup, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
                    else:
                        nf4v.down_kernel[(T * triton.cdiv(H, bn),)](
                            act, dn.codes, flats[i], rws[i], out, dn.absmax, dn.absmax_code, dn.absmax_scale,
                            dn.absmax_offset, code, H, I, I // 2, act.stride(0), dn.codes.stride(0), out.stride(0),
                            dn.absmax.stride(0), dn.absmax_scale.stride(0), TOP_K=K, LOOKUP=lookup, BLOCK_N=bn,
                            BLOCK_K=bk, num_warps=nw)
                try:
                    us = _time_graph(run, R)
                except Exception as e:
                    print(f"T={T} lookup={lookup} {name} {bn},{bk},{nw} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                res["nf4"].append(dict(T=T, lookup=lookup, kernel=name, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, us=us))
                print(f"T={T} lookup={lookup} {name:8s} BN={bn:<3} BK={bk:<5} w={nw}: {us:7.1f} us", flush=True)
                if name not in best or us < best[name][0]:
                    best[name] = (us, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw))
        if len(best) == 2:
            errs = []
            for i in range(R):
                o = nf4v.forward(x, *ins[i], gu, dn, code, lookup, best["gate_up"][1], best["down"][1])
                errs.append(rel(o, ref[i]))
            tot = best["gate_up"][0] + best["down"][0]
            print(f"T={T} lookup={lookup} BEST gate_up {best['gate_up']} down {best['down']} total {tot:.1f} us "
                  f"(package {base:.1f}); max rel err vs package {max(errs):.2e}", flush=True)
            res["nf4"].append(dict(T=T, lookup=lookup, best=True, total=tot, gate_up=best["gate_up"], down=best["down"],
                                   err=max(errs)))
    json.dump(res, open(f"{OUT}/sweep.json", "w"), indent=1)

# ------------------------------------------------------------------ bf16 prefill tiles
tf = matmul_tflops(); print(f"matmul {tf:.0f} TFLOP/s", flush=True)
for T in (4096, 512):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rts = [route(torch.randn(T, E, device="cuda"), K) for _ in range(4)]
    ins = [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in rts]
    P = T * K
    flops = P * 2 * 3 * H * I
    with torch.no_grad():
        base = _time_graph(lambda i: EK.fused_experts_forward(x, *ins[i], experts), 4)
    print(f"T={T} package bf16 {base:.1f} us = {flops / base / 1e6 / tf:.3f} of matmul", flush=True)
    aligned = [EK.align_by_expert(ids, E) for _, ids in ins]
    rws = [w.reshape(-1).contiguous() for w, _ in ins]
    act = torch.empty(P, I, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(P, H, dtype=torch.bfloat16, device="cuda")
    t_align = _time_graph(lambda i: EK.align_by_expert(ins[i][1], E), 4)
    t_sum = _time_graph(lambda i: out.view(T, K, H).sum(dim=1), 4)
    print(f"T={T} align {t_align:.1f} us, top-k sum {t_sum:.1f} us", flush=True)
    res["prefill"].append(dict(T=T, package=base, align=t_align, sum=t_sum))
    gu_cfgs = [None, (64, 128, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
               (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (64, 128, 32, 4, 5), (128, 128, 32, 8, 4), (64, 64, 64, 4, 4),
               (128, 64, 64, 8, 4), (128, 128, 64, 4, 3)]
    dn_cfgs = [None, (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
               (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 5), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4),
               (128, 128, 64, 4, 4)]
    for name, cfgs in (("gate_up", gu_cfgs), ("down", dn_cfgs)):
        for c in cfgs:
            cfg = None if c is None else dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2], num_warps=c[3], num_stages=c[4])
            def run(i, cfg=cfg, name=name):
                counts, pairs = aligned[i]
                if name == "gate_up":
                    EK._grouped_gemm(x, experts.gate_up_proj, act, pairs, counts, rws[i], P, E, K, True, cfg)
                else:
                    EK._grouped_gemm(act, experts.down_proj, out, pairs, counts, rws[i], P, E, 1, False, cfg)
            try:
                us = _time_graph(run, 4)
            except Exception as e:
                print(f"T={T} {name} {c} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            frac = flops / 3 * (2 if name == "gate_up" else 1) / us / 1e6 / tf
            res["prefill"].append(dict(T=T, kernel=name, cfg=c, us=us, matmul_fraction=frac))
            print(f"T={T} {name:8s} {str(c):24s} {us:8.1f} us = {frac:.3f} of matmul", flush=True)
    json.dump(res, open(f"{OUT}/sweep.json", "w"), indent=1)
print("done")
