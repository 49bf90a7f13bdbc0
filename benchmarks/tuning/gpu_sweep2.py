"""GPU sweep 2 (run2 of benchmarks/results/sweep_experts_2026-11-29_h200.json): pipelined GEMV (NF4 table /
byte permutes, bf16), the align kernel's GROUP, more prefill tiles. Its prefill section is run 1's harness
(gpu_sweep.py) again with other tiles and token counts: both scripts are kept as they ran."""
import json, os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch, triton
from moelab.bench import _time_graph, matmul_tflops
from moelab.kernels import experts as EK
from moelab.models import preset_config
from moelab.quant import NF4Experts
from moelab.routing import route
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts
import nf4v

OUT = os.environ.get("OUT", "/tmp")
res = {"nf4": [], "bf16": [], "align": [], "prefill": []}
def save(): json.dump(res, open(f"{OUT}/sweep2.json", "w"), indent=1)
torch.manual_seed(0)
config = preset_config("qwen1.5-moe-a2.7b")
E, K, H, I = config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size
experts = Qwen2MoeExperts(config).to("cuda", torch.bfloat16)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.02); experts.down_proj.normal_(0, 0.02)
nf4 = NF4Experts.from_experts(experts, backend="torch").to("cuda")
gu, dn = nf4.gate_up, nf4.down
code = EK._nf4_code(torch.device("cuda"))
R = 8
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
def inputs(T, n=R):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rts = [route(torch.randn(T, E, device="cuda"), K) for _ in range(n)]
    return x, [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in rts]

def pkg_gemv(x, w, ids, g, d, cg, cd, act, out):
    """moelab's two GEMV kernels with separate configs (as _gemv_forward)."""
    T_, K_ = ids.shape; P = T_ * K_
    flat = ids.reshape(-1); rw = w.reshape(-1)
    ptrs, strides, flags = EK._weight_args(g, E)
    EK._gemv_gate_up_kernel[(P * triton.cdiv(I, cg["BLOCK_N"]),)](
        x, ptrs[0], flat, act, *ptrs[1:], I, H, E, K_, x.stride(0), strides[0], strides[1], act.stride(0),
        strides[3], strides[4], **flags, **cg)
    ptrs, strides, flags = EK._weight_args(d, E)
    EK._gemv_down_kernel[(T_ * triton.cdiv(H, cd["BLOCK_N"]),)](
        act, ptrs[0], flat, rw, out, *ptrs[1:], H, I, E, act.stride(0), strides[0], strides[1], out.stride(0),
        strides[3], strides[4], TOP_K=K_, **flags, **cd)

# ---------------------------------------------------------------- A/B: GEMV decode, pipelined
for T in (1, 4, 16):
    x, ins = inputs(T)
    act = torch.empty(T * K, I, dtype=torch.bfloat16, device="cuda"); out = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
    flats = [ids.reshape(-1).contiguous() for _, ids in ins]; rws = [w.reshape(-1).contiguous() for w, _ in ins]
    with torch.no_grad():
        base_nf4 = _time_graph(lambda i: EK.fused_experts_forward(x, *ins[i], nf4), R)
        base_bf16 = _time_graph(lambda i: EK.fused_experts_forward(x, *ins[i], experts), R) if T * K <= EK.GEMV_MAX_PAIRS else None
    print(f"T={T} package nf4 {base_nf4:.1f} us, bf16 {base_bf16}", flush=True)
    ref = [EK.fused_experts_forward(x, *ins[i], nf4) for i in range(R)]
    res["nf4"].append(dict(T=T, package=base_nf4, package_bf16=base_bf16))
    for lookup in (1, 0):
        best = {}
        for name, cfgs in (("gate_up", [(8, 256, 2), (8, 512, 4), (4, 512, 4), (16, 512, 8), (8, 256, 4), (4, 256, 2)]),
                           ("down", [(8, 512, 4), (16, 256, 8), (4, 512, 4), (8, 256, 4), (4, 256, 2)])):
            for st in (1, 2, 3, 4):
                for bn, bk, nw in cfgs:
                    def run(i, bn=bn, bk=bk, nw=nw, name=name, st=st):
                        if name == "gate_up":
                            nf4v.gate_up_kernel[(T * K * triton.cdiv(I, bn),)](
                                x, gu.codes, flats[i], act, gu.absmax, gu.absmax_code, gu.absmax_scale, gu.absmax_offset, code,
                                I, H, H // 2, K, x.stride(0), gu.codes.stride(0), act.stride(0), gu.absmax.stride(0),
                                gu.absmax_scale.stride(0), LOOKUP=lookup, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=nw)
                        else:
                            nf4v.down_kernel[(T * triton.cdiv(H, bn),)](
                                act, dn.codes, flats[i], rws[i], out, dn.absmax, dn.absmax_code, dn.absmax_scale,
                                dn.absmax_offset, code, H, I, I // 2, act.stride(0), dn.codes.stride(0), out.stride(0),
                                dn.absmax.stride(0), dn.absmax_scale.stride(0), TOP_K=K, LOOKUP=lookup, BLOCK_N=bn,
                                BLOCK_K=bk, STAGES=st, num_warps=nw)
                    try:
                        us = _time_graph(run, R)
                    except Exception as e:
                        print(f"T={T} lookup={lookup} {name} {bn},{bk},{nw},{st} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, STAGES=st)
                    res["nf4"].append(dict(T=T, lookup=lookup, kernel=name, us=us, **c))
                    print(f"T={T} lookup={lookup} {name:8s} BN={bn:<3} BK={bk:<5} w={nw} st={st}: {us:7.1f} us", flush=True)
                    if name not in best or us < best[name][0]:
                        best[name] = (us, c)
        errs = [rel(nf4v.forward(x, *ins[i], gu, dn, code, lookup, best["gate_up"][1], best["down"][1]), ref[i]) for i in range(R)]
        print(f"T={T} lookup={lookup} BEST {best} total {best['gate_up'][0] + best['down'][0]:.1f} us "
              f"(package {base_nf4:.1f}) err {max(errs):.2e}", flush=True)
        res["nf4"].append(dict(T=T, lookup=lookup, best=best, err=max(errs)))
    save()
    if T * K > 16:
        continue
    # package bf16 GEMV kernels, pipelined
    best = {}
    for name, cfgs in (("gate_up", [(8, 512, 4), (8, 256, 4), (4, 512, 4), (16, 256, 4), (8, 256, 2), (8, 1024, 8)]),
                       ("down", [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 8), (4, 256, 2)])):
        for st in (1, 2, 3, 4):
            for bn, bk, nw in cfgs:
                c = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PIPELINE=st)
                d0 = dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, PIPELINE=1)
                g0 = dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1)
                if name == "gate_up":
                    run = lambda i, c=c: pkg_gemv(x, *ins[i], experts.gate_up_proj, experts.down_proj, c, d0, act, out)
                else:
                    run = lambda i, c=c: pkg_gemv(x, *ins[i], experts.gate_up_proj, experts.down_proj, g0, c, act, out)
                try:
                    us = _time_graph(run, R)
                except Exception as e:
                    print(f"T={T} bf16 {name} {c} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                res["bf16"].append(dict(T=T, kernel=name, us_pair=us, **c))
                print(f"T={T} bf16 {name:8s} {c} pair total {us:7.1f} us", flush=True)
                if name not in best or us < best[name][0]:
                    best[name] = (us, c)
    print(f"T={T} bf16 BEST {best} (package {base_bf16})", flush=True)
    save()

# ---------------------------------------------------------------- C: align GROUP
for T in (4096, 512, 64, 1):
    x, ins = inputs(T, 4)
    for group in (1, 2, 4, 8):
        for bs in (256, 1024):
            def run(i, group=group, bs=bs):
                flat = ins[i][1].reshape(-1)
                P = flat.numel()
                counts = torch.empty(E + 1, dtype=torch.int32, device="cuda"); pairs = torch.empty(P, dtype=torch.int32, device="cuda")
                EK._align_kernel[(triton.cdiv(E + 1, group),)](flat, counts, pairs, P, E, BLOCK_S=min(bs, triton.next_power_of_2(P)), GROUP=group)
            us = _time_graph(run, 4)
            res["align"].append(dict(T=T, GROUP=group, BLOCK_S=bs, us=us))
            print(f"T={T} align GROUP={group} BLOCK_S={bs}: {us:.1f} us", flush=True)
save()

# ---------------------------------------------------------------- D: prefill tiles
tf = matmul_tflops(); print(f"matmul {tf:.0f} TFLOP/s", flush=True)
for T in (4096, 2048, 1024):
    x, ins = inputs(T, 4)
    P = T * K; flops = P * 2 * 3 * H * I
    aligned = [EK.align_by_expert(ids, E) for _, ids in ins]; rws = [w.reshape(-1).contiguous() for w, _ in ins]
    act = torch.empty(P, I, dtype=torch.bfloat16, device="cuda"); out = torch.empty(P, H, dtype=torch.bfloat16, device="cuda")
    gcs = [None, (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3), (256, 64, 64, 8, 4), (128, 64, 128, 8, 4),
           (64, 256, 64, 8, 4), (128, 128, 64, 8, 3)]
    dcs = [None, (128, 256, 64, 8, 4), (128, 256, 64, 8, 5), (128, 256, 32, 8, 5), (128, 128, 128, 8, 3), (256, 128, 64, 8, 4),
           (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]
    for name, cfgs in (("gate_up", gcs), ("down", dcs)):
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
                print(f"T={T} {name} {c} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True); continue
            frac = flops / 3 * (2 if name == "gate_up" else 1) / us / 1e6 / tf
            res["prefill"].append(dict(T=T, kernel=name, cfg=c, us=us, matmul_fraction=frac))
            print(f"T={T} {name:8s} {str(c):24s} {us:8.1f} us = {frac:.3f} of matmul", flush=True)
    save()
print("done")
