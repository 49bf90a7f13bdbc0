"""The fused routed-experts kernels (moelab.kernels.experts) against PyTorch references.

On the CPU the kernels run in the Triton interpreter (float32 / float16, small shapes); the
`gpu` tests check bf16 on the full Qwen1.5-MoE layer shape, NF4, and CUDA-graph capture.
"""

import importlib
import random
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2MoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts, Qwen2MoeTopKRouter

import moelab
from moelab.kernels.experts import align_by_expert, fused_experts_forward, gemv_config, kernel_config
from moelab.quant import NF4Experts, dequantize_nf4, quantize_nf4

patch_module = importlib.import_module("moelab.patch")  # `moelab.patch` itself is the function
experts_kernels = importlib.import_module("moelab.kernels.experts")

pytestmark = pytest.mark.usefixtures("one_thread")
# These run the kernels in the Triton interpreter on CPU tensors; on a CUDA machine Triton
# compiles for the GPU instead, and the `gpu` tests below cover the same ground there.
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors); see the gpu tests")


def experts_module(num_experts, hidden, inter, dtype=torch.float32, device="cpu", seed=0):
    """A module with transformers' expert layout and random weights (std 0.1: outputs of order 1)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.1
    down = torch.randn(num_experts, hidden, inter, generator=gen) * 0.1
    return types.SimpleNamespace(gate_up_proj=gate_up.to(device, dtype), down_proj=down.to(device, dtype),
                                 act_fn=torch.nn.SiLU(), num_experts=num_experts)


def reference(hidden, weights, ids, gate_up, down):
    """sum_k w[t, k] * down[e] @ (SiLU(gate) * up), one (token, k) pair at a time, in float64."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (gate_up[e].double().cpu() @ hidden[t].double().cpu()).chunk(2)
            out[t] += float(weights[t, k]) * (down[e].double().cpu() @ (F.silu(gate) * up))
    return out


def routed(num_tokens, num_experts, top_k, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = moelab.route_reference(logits, top_k)
    return weights.to(device, dtype), ids.to(device)


def rel_err(a, b):
    return float((a.double().cpu() - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------- align

@interpreter
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("num_pairs,num_experts", [(1, 4), (13, 5), (64, 16), (300, 60), (777, 60)])
def test_align_equals_a_stable_argsort(num_pairs, num_experts, chunked, monkeypatch):
    """The one-kernel scan and the two-pass chunked align (256-pair chunks: 777 pairs are four,
    the last partial) give the stable argsort."""
    monkeypatch.setattr(experts_kernels, "ALIGN_CHUNKED_FROM", 0 if chunked else 1 << 30)
    gen = torch.Generator().manual_seed(num_pairs)
    ids = torch.randint(0, num_experts, (num_pairs, 1), generator=gen)
    ids[::7] = 2  # ties: many pairs on one expert keep their pair order
    counts, pairs = align_by_expert(ids, num_experts)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=num_experts).tolist() + [0]
    assert pairs.tolist() == torch.argsort(ids.flatten(), stable=True).tolist()


@interpreter
@pytest.mark.parametrize("chunked", [False, True])
def test_align_puts_ids_outside_the_experts_in_the_last_bucket(chunked, monkeypatch):
    monkeypatch.setattr(experts_kernels, "ALIGN_CHUNKED_FROM", 0 if chunked else 1 << 30)
    ids = torch.tensor([[3, -1], [7, 0], [2, 3]])
    counts, pairs = align_by_expert(ids, 4)
    assert counts.tolist() == [1, 0, 1, 2, 2]
    assert pairs.tolist() == [3, 4, 0, 5, 1, 2]  # buckets 0: pair 3 | 2: 4 | 3: 0, 5 | invalid: 1, 2


# ---------------------------------------------------------------------------- bf16 / fp32 path

@interpreter
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 4, 1, 32, 16),
    (3, 8, 2, 64, 48),
    (17, 5, 4, 48, 40),      # H and I not powers of two; most experts take several blocks
    (40, 16, 4, 128, 96),    # tiny's shape
    (6, 60, 4, 64, 24),      # E = 60 as Qwen1.5-MoE: many experts untouched
])
def test_kernel_matches_the_reference_float32(tokens, num_experts, top_k, hidden, inter):
    seed = tokens * 1000 + num_experts
    experts = experts_module(num_experts, hidden, inter, seed=seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))
    weights, ids = routed(tokens, num_experts, top_k, seed + 2)
    got = fused_experts_forward(x, weights, ids, experts)
    assert got.shape == (tokens, hidden) and got.dtype == torch.float32
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 1e-6
    # and it equals moelab's PyTorch seam, which MoeForward uses by default
    assert torch.allclose(got, moelab.model.experts_torch(x, weights, ids, experts), rtol=1e-5, atol=1e-6)


@interpreter
def test_worst_case_grid_of_the_cuda_path(monkeypatch):
    """On CUDA the grid is sized without reading the counts: blocks past the last one must do
    nothing, and a pair with an invalid id must add nothing (interpreter, same kernel)."""
    monkeypatch.setattr(experts_kernels, "EXACT_GRID_ON_CPU", False)
    experts = experts_module(8, 32, 24, seed=21)
    x = torch.randn(6, 32)
    weights, ids = routed(6, 8, 3, 22)
    got = fused_experts_forward(x, weights, ids, experts)
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 1e-6
    # An id outside [0, E) (which fused_experts_forward refuses on the CPU) goes through the
    # GEMMs as CUDA runs them: its output row must come back zero, over a NaN-filled buffer.
    x2, w2, ids2 = x[:2], torch.rand(2, 2), torch.tensor([[1, 9], [1, 0]])
    counts, pairs = align_by_expert(ids2, 8)
    act, out = torch.full((4, 24), float("nan")), torch.full((4, 32), float("nan"))
    gemm = experts_kernels._grouped_gemm  # (x, w, out, pairs, counts, route_w, S, E, x_row_div, gated, config)
    gemm(x2, experts.gate_up_proj, act, pairs, counts, w2.flatten(), 4, 8, 2, True, None)
    gemm(act, experts.down_proj, out, pairs, counts, w2.flatten(), 4, 8, 1, False, None)
    assert torch.equal(out[1], torch.zeros(32))
    without = reference(x2, w2 * torch.tensor([[1.0, 0.0], [1.0, 1.0]]), ids2.clamp(max=7), experts.gate_up_proj,
                        experts.down_proj)
    assert rel_err(out.view(2, 2, 32).sum(1), without) < 1e-6


@interpreter
@pytest.mark.parametrize("exact_grid", [True, False])
def test_half_row_tail_blocks_cover_every_pair_once(exact_grid, monkeypatch):
    """HALF_TAIL (long prefills): a block with at most half its rows runs at half the rows. With
    32-row blocks and experts of 5, 14, 21, 32, 40 (32 + 8) and 70 (2 x 32 + 6) pairs, both code
    paths run; every pair is written exactly once (over a NaN-filled buffer) and the result is
    that of the reference and of the same configuration without it, on the exact grid and on
    the CUDA path's worst-case grid (idle blocks)."""
    monkeypatch.setattr(experts_kernels, "EXACT_GRID_ON_CPU", exact_grid)
    experts = experts_module(6, 32, 24, seed=31)
    gen = torch.Generator().manual_seed(32)
    ids = torch.cat([torch.full((40,), 0), torch.full((32,), 1), torch.full((21,), 2), torch.full((5,), 3),
                     torch.full((14,), 4), torch.full((70,), 5)])[torch.randperm(182, generator=gen)].view(-1, 2)
    x = torch.randn(ids.shape[0], 32, generator=gen)
    weights = torch.rand(ids.shape, generator=gen)
    counts, pairs = align_by_expert(ids, 6)
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, HALF_TAIL=True)
    gemm = experts_kernels._grouped_gemm  # (x, w, out, pairs, counts, route_w, S, E, x_row_div, gated, config)
    act, out = torch.full((182, 24), float("nan")), torch.full((182, 32), float("nan"))
    gemm(x, experts.gate_up_proj, act, pairs, counts, weights.flatten(), 182, 6, 2, True, config)
    gemm(act, experts.down_proj, out, pairs, counts, weights.flatten(), 182, 6, 1, False, config)
    assert not out.isnan().any()
    expected = reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)
    assert rel_err(out.view(-1, 2, 32).sum(1), expected) < 1e-6
    without = fused_experts_forward(x, weights, ids, experts, config={**config, "HALF_TAIL": False})
    assert torch.allclose(out.view(-1, 2, 32).sum(1), without, rtol=1e-5, atol=1e-6)
    assert rel_err(fused_experts_forward(x, weights, ids, experts, config=config), expected) < 1e-6


@interpreter
def test_topk_sum_adds_each_tokens_rows_in_float32():
    y = torch.randn(5 * 3, 40, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    got = experts_kernels.topk_sum(y, 3, block=16)
    assert got.dtype == torch.float16 and got.shape == (5, 40)
    assert torch.equal(got, y.view(5, 3, 40).float().sum(1).half())


@interpreter
def test_kernel_float16_in_the_interpreter():
    experts = experts_module(8, 64, 48, dtype=torch.float16, seed=3)
    x = torch.randn(9, 64).half()
    weights, ids = routed(9, 8, 2, 4, dtype=torch.float16)
    got = fused_experts_forward(x, weights, ids, experts)
    assert got.dtype == torch.float16
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 3e-3


@interpreter
def test_one_expert_taking_every_token_and_repeated_ids():
    """40 pairs on one expert span three 16-row blocks; a token may name an expert twice
    (the router never does, but the kernel sums pairs, not experts)."""
    experts = experts_module(6, 32, 16, seed=5)
    x = torch.randn(40, 32)
    ids = torch.full((40, 2), 3)
    ids[::3, 1] = 5
    weights = torch.rand(40, 2)
    got = fused_experts_forward(x, weights, ids, experts)
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 1e-6


@interpreter
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 4, 1, 32, 16),
    (2, 60, 4, 64, 24),      # E = 60: most experts untouched
    (5, 6, 3, 48, 40),       # H and I not powers of two, K-steps with a masked tail
    (3, 3, 2, 200, 136),     # several K-steps per row (CPU BLOCK_K = 128)
])
@pytest.mark.parametrize("path", ["gemv", "grouped"])
def test_both_decode_paths_match_the_reference(tokens, num_experts, top_k, hidden, inter, path, monkeypatch):
    """The ungrouped FMA kernels (decode) and the grouped GEMM give the same result on the
    same small inputs, whichever the pair count would pick."""
    monkeypatch.setattr(experts_kernels, "GEMV_MAX_PAIRS", 1 << 20 if path == "gemv" else 0)
    seed = tokens * 100 + hidden
    experts = experts_module(num_experts, hidden, inter, seed=seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))
    weights, ids = routed(tokens, num_experts, top_k, seed + 2)
    if tokens > 1:
        ids[1] = ids[0]  # two tokens on the same experts
    got = fused_experts_forward(x, weights, ids, experts)
    assert got.shape == (tokens, hidden)
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 1e-6


@interpreter
def test_gemv_path_counts_repeated_ids_and_zeros_invalid_ones(monkeypatch):
    """A token naming one expert twice gets both pairs; an id outside [0, E) (what CUDA lets
    through, as the grouped path) adds nothing, over a NaN-filled output buffer."""
    monkeypatch.setattr(experts_kernels, "GEMV_MAX_PAIRS", 1 << 20)
    experts = experts_module(5, 32, 24, seed=31)
    x = torch.randn(3, 32)
    ids = torch.tensor([[2, 2], [4, 0], [1, 3]])
    weights = torch.rand(3, 2)
    got = fused_experts_forward(x, weights, ids, experts)
    assert rel_err(got, reference(x, weights, ids, experts.gate_up_proj, experts.down_proj)) < 1e-6
    bad = torch.tensor([[2, 5], [-1, 0], [1, 3]])
    monkeypatch.setattr(torch, "empty", lambda *a, **k: torch.full(a[0] if len(a) == 1 else a, float("nan"), **k))
    got = experts_kernels._gemv_forward(x, weights.flatten(), bad, experts.gate_up_proj, experts.down_proj, 24, None)
    keep = weights * torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert rel_err(got, reference(x, keep, bad.clamp(0, 4), experts.gate_up_proj, experts.down_proj)) < 1e-6


def shared_expert(hidden, shared_inter, num_tokens, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return experts_kernels.SharedExpert(
        (torch.randn(2 * shared_inter, hidden, generator=gen) * 0.1).to(dtype),
        (torch.randn(hidden, shared_inter, generator=gen) * 0.1).to(dtype),
        torch.randn(num_tokens, 1, generator=gen).to(dtype))


def shared_reference(x, shared):
    gate, up = (x.double() @ shared.gate_up.double().T).chunk(2, dim=-1)
    return torch.sigmoid(shared.gate_logit.double().reshape(-1, 1)) * ((F.silu(gate) * up) @ shared.down.double().T)


@interpreter
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter,shared_inter", [
    (1, 8, 4, 64, 24, 96),     # the shared intermediate a whole number of chunks (Qwen1.5-MoE: 4 x 1408)
    (3, 5, 2, 48, 40, 100),    # a partial last chunk; H, I not powers of two
    (2, 60, 4, 32, 16, 8),     # a shared expert narrower than one chunk
])
def test_decode_kernels_fold_the_shared_expert_in(monkeypatch, tokens, num_experts, top_k, hidden, inter,
                                                  shared_inter):
    """The decode kernels stream the shared expert (gate/up as extra act rows, down behind its
    sigmoid gate in the same sum): routed + gated shared, against float64, float32 routing
    weights rounded to the hidden dtype inside the kernels."""
    seed = 70 + tokens * 10 + shared_inter
    experts = experts_module(num_experts, hidden, inter, seed=seed)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1))
    weights, ids = routed(tokens, num_experts, top_k, seed + 2)
    shared = shared_expert(hidden, shared_inter, tokens, seed + 3)
    launched, original = [], experts_kernels._gemv_forward

    def spy(*args):
        launched.append(args[-1])
        return original(*args)

    monkeypatch.setattr(experts_kernels, "_gemv_forward", spy)
    got = fused_experts_forward(x, weights, ids, experts, shared=shared)
    assert launched and launched[0] is shared  # folded into the two launches, not added afterwards
    expected = reference(x, weights, ids, experts.gate_up_proj, experts.down_proj) + shared_reference(x, shared)
    assert rel_err(got, expected) < 1e-6
    # float16: the routing weights are rounded to float16 as transformers rounds them
    got16 = fused_experts_forward(x.half(), weights, ids, types.SimpleNamespace(
        gate_up_proj=experts.gate_up_proj.half(), down_proj=experts.down_proj.half(), act_fn=torch.nn.SiLU()),
        shared=experts_kernels.SharedExpert(shared.gate_up.half(), shared.down.half(), shared.gate_logit.half()))
    assert got16.dtype == torch.float16 and rel_err(got16, expected) < 5e-3


@interpreter
def test_shared_expert_outside_the_decode_path_runs_in_pytorch():
    """Many tokens (the grouped path) or a shared expert in another dtype: added in PyTorch, same sum."""
    experts = experts_module(6, 32, 16, seed=5)
    x = torch.randn(20, 32)
    weights, ids = routed(20, 6, 2, 6)
    shared = shared_expert(32, 40, 20, 7)
    got = fused_experts_forward(x, weights, ids, experts, shared=shared)
    expected = reference(x, weights, ids, experts.gate_up_proj, experts.down_proj) + shared_reference(x, shared)
    assert rel_err(got, expected) < 1e-6
    with pytest.raises(ValueError, match="one logit per token"):
        fused_experts_forward(x, weights, ids, experts, shared=experts_kernels.SharedExpert(
            shared.gate_up, shared.down, shared.gate_logit[:3]))
    with pytest.raises(ValueError, match="shared expert weights do not fit"):
        fused_experts_forward(x, weights, ids, experts, shared=experts_kernels.SharedExpert(
            shared.gate_up[:, :31], shared.down, shared.gate_logit))


def tiny_config():
    return Qwen2MoeConfig(hidden_size=128, moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4)


@interpreter
def test_transformers_experts_module_and_its_eager_forward():
    config = tiny_config()
    experts = Qwen2MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    config._experts_implementation = "eager"
    x = torch.randn(5, config.hidden_size)
    weights, ids = routed(5, config.num_experts, config.num_experts_per_tok, 6)
    ids = ids.long()  # transformers' router gives int64 (moelab's int32: the kernel takes both)
    with torch.no_grad():
        hf = experts(x, ids, weights)
        got = fused_experts_forward(x, weights, ids, experts)
    assert torch.allclose(got, hf, rtol=1e-5, atol=1e-6)


def test_no_tokens():
    experts = experts_module(4, 32, 16)
    got = fused_experts_forward(torch.empty(0, 32), torch.empty(0, 2), torch.empty(0, 2, dtype=torch.long), experts)
    assert got.shape == (0, 32)


@interpreter
def test_bad_input_raises():
    experts = experts_module(4, 32, 16)
    x, (w, ids) = torch.randn(3, 32), routed(3, 4, 2, 7)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_experts_forward(torch.randn(3, 31), w, ids, experts)
    with pytest.raises(ValueError, match="ids and weights"):
        fused_experts_forward(x, w[:, :1], ids, experts)
    with pytest.raises(ValueError, match="must match"):
        fused_experts_forward(x.double(), w, ids, experts)
    with pytest.raises(ValueError, match="integers"):
        fused_experts_forward(x, w, ids.float(), experts)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        fused_experts_forward(x, w, ids + 3, experts)
    with pytest.raises(ValueError, match="neither"):
        fused_experts_forward(x, w, ids, torch.nn.Linear(2, 2))
    gelu = types.SimpleNamespace(**{**vars(experts), "act_fn": torch.nn.GELU()})
    with pytest.raises(ValueError, match="SiLU"):
        fused_experts_forward(x, w, ids, gelu)
    with pytest.raises(ValueError, match="do not fit"):
        fused_experts_forward(x, w, ids, types.SimpleNamespace(gate_up_proj=experts.gate_up_proj,
                                                               down_proj=experts.down_proj[:, :, :8]))


def test_configs_keep_enough_programs_at_decode_and_tiles_in_registers():
    for pairs, n_out in [(4, 1408), (4, 2048), (32, 1408), (256, 2048)]:
        for nf4 in (False, True):
            cfg = kernel_config(pairs, n_out, 60, gated=n_out == 1408, nf4=nf4, on_gpu=True, num_sms=132)
            assert cfg["BLOCK_M"] == 16 and cfg["BLOCK_K"] == (64 if nf4 and cfg["BLOCK_N"] == 64 else 128)
            programs = min(60, pairs) * -(-n_out // cfg["BLOCK_N"])
            assert programs >= 4 * 132 or cfg["BLOCK_N"] == 16
    # Long prefills (64+ pairs per expert) take 128-row blocks; a 512-token prefill stays at 64.
    big = kernel_config(16384, 1408, 60, gated=True, nf4=False, on_gpu=True)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["num_stages"], big["HALF_TAIL"]) == (128, 128, 4, True)
    assert (kernel_config(16384, 2048, 60, gated=False, nf4=False, on_gpu=True)["BLOCK_N"]) == 256
    mid = kernel_config(2048, 1408, 60, gated=True, nf4=False, on_gpu=True)
    assert (mid["BLOCK_M"], mid["BLOCK_N"]) == (64, 128)
    assert kernel_config(16384, 1408, 60, gated=True, nf4=True, on_gpu=True)["BLOCK_N"] == 64
    assert kernel_config(4, 96, 16, gated=True, nf4=False, on_gpu=False)["num_stages"] == 1


def test_gemv_configs_stream_whole_blocks_with_bounded_accumulators():
    """Decode GEMV: 8 rows per program (16 for NF4 at one token), NF4 K-steps of whole
    64-value blocks, an fp32 accumulator of at most 4,096 values per weight matrix (NF4 words:
    one per 8 values), prefetching (PIPELINE > 1) for bf16 only; NF4's x tile (BLOCK_K // 8
    pairs of each word slot) smaller than the program's threads, so it loads in the words'
    layout (`_nf4_words`); no pipelining under the interpreter."""
    for rows, n_out, gated in [(4, 1408, True), (1, 2048, False), (32, 1408, True), (8, 2048, False), (128, 1408, True)]:
        for nf4 in (False, True):
            for shared in (False, True):
                cfg = gemv_config(rows, n_out, gated, nf4, on_gpu=True, num_sms=132, shared=shared)
                one_token = rows <= 8 if gated else rows == 1  # gate_up: pairs + shared rows; down: tokens
                assert cfg["BLOCK_N"] == (16 if nf4 and one_token else 8)
                assert cfg["BLOCK_K"] % 64 == 0 and cfg.get("SHARED_BLOCK_K", 64) % 64 == 0
                assert cfg["BLOCK_N"] * cfg["BLOCK_K"] // (8 if nf4 else 1) <= 4096
                assert cfg["PIPELINE"] == (1 if nf4 else 3)
                if nf4:
                    assert max(cfg["BLOCK_K"], cfg.get("SHARED_BLOCK_K", 0)) // 8 < 32 * cfg["num_warps"] <= 1024
    # NF4 gate_up at one token: 8 warps, 512-value steps; with the shared expert's 4 chunks (704
    # programs) 4 warps and 256-value steps, so that 6 programs share an SM (one wave)
    assert [gemv_config(8, 1408, True, True, on_gpu=True, shared=shared)[key] for shared in (False, True)
            for key in ("BLOCK_N", "BLOCK_K", "num_warps")] == [16, 512, 8, 16, 256, 4]
    # NF4 down at one token with the shared expert folded in: one 16-row program per SM, 2,048-value steps
    cfg = gemv_config(1, 2048, False, True, on_gpu=True, shared=True)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SHARED_BLOCK_K"], cfg["num_warps"]) == (16, 2048, 2048, 32)
    assert gemv_config(4, 96, True, False, on_gpu=False)["PIPELINE"] == 1
    # the shared expert folded into down: longer rows, 512-value K-steps (still 4,096 accumulators)
    assert gemv_config(1, 2048, False, False, on_gpu=True, shared=True)["BLOCK_K"] == 512


# ---------------------------------------------------------------------------- NF4

@interpreter
@pytest.mark.parametrize("hidden,inter,double_quant,tokens", [
    (128, 64, True, 7),      # rows are whole 64-blocks: one absmax per row per 64 columns
    (128, 96, False, 3),     # tiny's shape: down's rows of 96 cut NF4 blocks in the middle
    (64, 48, True, 1),
])
def test_nf4_kernel_equals_dequantize_then_matmul(hidden, inter, double_quant, tokens, monkeypatch):
    dense = experts_module(8, hidden, inter, seed=hidden + inter)
    quantized = NF4Experts(quantize_nf4(dense.gate_up_proj, double_quant), quantize_nf4(dense.down_proj, double_quant),
                           torch.nn.SiLU())
    gate_up, down = dequantize_nf4(quantized.gate_up), dequantize_nf4(quantized.down)
    x = torch.randn(tokens, hidden)
    weights, ids = routed(tokens, 8, 3, hidden)
    # the grouped GEMM dequantizing in its tiles, the ungrouped decode kernels, and the long-prefill
    # path (every expert dequantized once by nf4_to_dense, then the dense grouped GEMMs)
    dequantized = []
    to_dense = experts_kernels.nf4_to_dense
    monkeypatch.setattr(experts_kernels, "nf4_to_dense", lambda w: dequantized.append(w) or to_dense(w))
    for gemv_limit, dense_from in ((0, 1 << 20), (1 << 20, 1 << 20), (0, 0)):
        monkeypatch.setattr(experts_kernels, "GEMV_MAX_PAIRS_NF4", gemv_limit)
        monkeypatch.setattr(experts_kernels, "NF4_DENSE_FROM_PAIRS", dense_from)
        got = fused_experts_forward(x, weights, ids, quantized)
        assert rel_err(got, reference(x, weights, ids, gate_up, down)) < 1e-6
    assert len(dequantized) == 2  # gate_up and down, on the last path only
    # and NF4 is not the dense result (the test would not notice skipped dequantization otherwise)
    assert rel_err(got, reference(x, weights, ids, dense.gate_up_proj, dense.down_proj)) > 1e-3


@interpreter
@pytest.mark.parametrize("shape,double_quant,dtype", [
    ((3, 96, 128), True, torch.float32),
    ((2, 40, 48), False, torch.float16),    # 960 values a row block: blocks cross rows
])
def test_nf4_to_dense_equals_dequantize_nf4(shape, double_quant, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    quantized = quantize_nf4(w, double_quant, dtype=dtype)
    dense = experts_kernels.nf4_to_dense(quantized)
    assert dense.dtype == dtype and dense.shape == shape
    assert torch.equal(dense, dequantize_nf4(quantized))


# ---------------------------------------------------------------------------- in transformers and MoeForward

def greedy(model, tok, prompt, new_tokens):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_registered_as_a_transformers_experts_implementation(tiny):
    model, _ = tiny
    assert ALL_EXPERTS_FUNCTIONS["moelab"] is patch_module.moelab_experts_forward
    before = model.config._experts_implementation
    model.set_experts_implementation("moelab")  # transformers' own switch accepts the name
    try:
        assert model.model.layers[0].mlp.experts.config._experts_implementation == "moelab"
    finally:
        model.set_experts_implementation(before)


@interpreter
def test_patch_runs_the_kernel_in_transformers_and_tokens_are_unchanged(tiny, monkeypatch):
    model, tok = tiny
    calls = []
    original = patch_module.moelab_experts_forward
    monkeypatch.setattr(patch_module, "moelab_experts_forward", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "moelab", patch_module.moelab_experts_forward)
    before = model.config._experts_implementation
    expected = greedy(model, tok, "def", 2)
    with moelab.patch(model, experts="triton") as handle:
        assert len(handle.experts) == model.config.num_hidden_layers
        assert model.config._experts_implementation == "moelab"
        got = greedy(model, tok, "def", 2)
    assert got == expected
    assert len(calls) == 2 * model.config.num_hidden_layers  # prefill + 1 decode step, every layer
    assert model.config._experts_implementation == before
    with moelab.patch(model) as handle:  # "auto" on the CPU keeps transformers' experts
        assert handle.experts == [] and model.config._experts_implementation == before
    with pytest.raises(ValueError, match="experts must be"):
        moelab.patch(model, experts="cuda")


@interpreter
def test_moe_forward_with_the_kernel_gives_the_same_tokens(tiny):
    model, tok = tiny
    prompt = tok("for", return_tensors="pt").input_ids[0].tolist()
    runs, folded = [], []

    def fused_with_shared(*args, shared=None):  # the kernel, noting when MoeForward hands it the shared expert
        folded.append(shared is not None)
        return fused_experts_forward(*args, shared=shared)

    fused_with_shared.takes_shared_expert = True
    for experts_fn, projections in ((moelab.experts_forward, "auto"), (fused_experts_forward, "auto"),
                                    (fused_with_shared, "fused")):
        fwd = moelab.MoeForward(model, experts_fn=experts_fn, projections=projections)
        cache = fwd.new_cache(num_slots=1, max_seq_len=32)
        slot = cache.allocate(len(prompt) + 2)
        logits = fwd.prefill(cache, [prompt], [slot])
        tokens = []
        for _ in range(2):
            token = logits.argmax(-1)
            tokens.append(int(token))
            logits = fwd.decode(cache, token, [slot])
        runs.append((tokens, logits))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert torch.allclose(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-4)
    # fused projections: the one-token decode steps stream the shared expert in the kernels
    assert torch.allclose(runs[0][1], runs[2][1], rtol=1e-4, atol=1e-4)
    layers = model.config.num_hidden_layers
    assert folded == [True] * 3 * layers  # prefill and both decode steps, every layer


@interpreter
def test_patch_gives_nf4_experts_the_kernel_and_removes_it_exactly():
    quantized = NF4Experts(quantize_nf4(torch.randn(16, 192, 128) * 0.1), quantize_nf4(torch.randn(16, 128, 96) * 0.1),
                           torch.nn.SiLU())
    layer = torch.nn.Module()
    layer.router = Qwen2MoeTopKRouter(tiny_config())
    layer.experts = quantized
    x = torch.randn(4, 128)
    weights, ids = routed(4, 16, 4, 9)
    expected = quantized(x, ids, weights)  # NF4Experts' own PyTorch forward
    with moelab.patch(layer, experts="triton") as handle:
        assert handle.experts == [quantized] and "forward" in quantized.__dict__
        got = quantized(x, ids, weights)
    assert "forward" not in quantized.__dict__
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bench_experts_needs_cuda_and_checks_the_targets(capsys):
    from moelab import bench

    if not torch.cuda.is_available():
        assert bench.main(["experts"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    row = dict(timing="graph", touched_experts=4.0, bytes=1, gb_per_s=1.0, tflops=1.0)
    result = {"workload": {"tokens": [1, 4096]}, "results": [
        {**row, "tokens": 1, "system": "moelab_bf16", "us": 30.0, "bandwidth_fraction": 0.55, "matmul_fraction": 0.0},
        {**row, "tokens": 1, "system": "moelab_nf4", "us": 12.0, "bandwidth_fraction": 0.4, "matmul_fraction": 0.0},
        {**row, "tokens": 1, "system": "grouped_mm", "us": 90.0, "bandwidth_fraction": 0.2, "matmul_fraction": 0.0},
        {**row, "tokens": 4096, "system": "moelab_bf16", "us": 900.0, "bandwidth_fraction": 0.1, "matmul_fraction": 0.52},
        {"tokens": 4096, "system": "batched_mm", "us": None, "skipped": "gathers too many weights"}]}
    lines = bench.experts_summary(result)
    assert "grouped_mm 3.0x" in lines[0]
    assert any("T<=64" in line and "0.55 (MISSED)" in line for line in lines)
    assert any("T=4096" in line and "0.52 (met)" in line for line in lines)
    assert any("2.50x (met)" in line for line in lines)


# ---------------------------------------------------------------------------- GPU

QWEN = dict(num_experts=60, hidden=2048, inter=1408, top_k=4)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 2048, 4096])
def test_gpu_bf16_full_layer_shape_within_1e_2(tokens):
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], QWEN["top_k"], tokens, torch.bfloat16, "cuda")
    got = fused_experts_forward(x, weights, ids, experts)
    fp32 = types.SimpleNamespace(gate_up_proj=experts.gate_up_proj.float(), down_proj=experts.down_proj.float(),
                                 act_fn=torch.nn.SiLU(), num_experts=QWEN["num_experts"])
    expected = moelab.model.experts_torch(x.float(), weights.float(), ids, fp32)
    err = float((got.float() - expected).norm() / expected.norm())
    assert err < 1e-2, f"relative error {err:.2e} at T={tokens}"
    assert torch.equal(got, fused_experts_forward(x, weights, ids, experts))  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_gpu_nf4_equals_dequantize_then_matmul(tokens):
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    quantized = NF4Experts.from_experts(experts)
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], QWEN["top_k"], tokens, torch.bfloat16, "cuda")
    got = fused_experts_forward(x, weights, ids, quantized)
    deq = types.SimpleNamespace(gate_up_proj=dequantize_nf4(quantized.gate_up).float(),
                                down_proj=dequantize_nf4(quantized.down).float(), act_fn=torch.nn.SiLU(),
                                num_experts=QWEN["num_experts"])
    expected = moelab.model.experts_torch(x.float(), weights.float(), ids, deq)
    err = float((got.float() - expected).norm() / expected.norm())
    assert err < 1e-2, f"relative error {err:.2e} at T={tokens}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 8])
@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_gpu_decode_paths_agree_with_the_reference(tokens, precision, monkeypatch):
    """The ungrouped FMA decode kernels and the grouped GEMM, each forced, on the full layer."""
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    layer = experts if precision == "bf16" else NF4Experts.from_experts(experts)
    gate_up = experts.gate_up_proj if precision == "bf16" else dequantize_nf4(layer.gate_up)
    down = experts.down_proj if precision == "bf16" else dequantize_nf4(layer.down)
    ref = types.SimpleNamespace(gate_up_proj=gate_up.float(), down_proj=down.float(), act_fn=torch.nn.SiLU(),
                                num_experts=QWEN["num_experts"])
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], QWEN["top_k"], tokens + 7, torch.bfloat16, "cuda")
    expected = moelab.model.experts_torch(x.float(), weights.float(), ids, ref)
    monkeypatch.setattr(experts_kernels, "NF4_MMA_FROM_PAIRS", 1 << 20)  # that path has its own tests (test_nf4_mma)
    for limit in (0, 1 << 20):
        monkeypatch.setattr(experts_kernels, "GEMV_MAX_PAIRS", limit)
        monkeypatch.setattr(experts_kernels, "GEMV_MAX_PAIRS_NF4", limit)
        got = fused_experts_forward(x, weights, ids, layer)
        err = float((got.float() - expected).norm() / expected.norm())
        assert err < 1e-2, f"relative error {err:.2e} at T={tokens}, {precision}, {'gemv' if limit else 'grouped'}"


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(1, 4), (3, 3), (2, 6)])
def test_gpu_nf4_decode_kernels_match_the_reference_and_skip_bad_ids(tokens, top_k):
    """The NF4 word path of both decode kernels at top-4, 3 and 6, one id out of range (adds nothing)."""
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=top_k)
    layer = NF4Experts.from_experts(experts)
    ref = types.SimpleNamespace(gate_up_proj=dequantize_nf4(layer.gate_up).float(),
                                down_proj=dequantize_nf4(layer.down).float(), act_fn=torch.nn.SiLU(),
                                num_experts=QWEN["num_experts"])
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], top_k, tokens + top_k, torch.bfloat16, "cuda")
    bad = ids.clone()
    bad[-1, -1] = QWEN["num_experts"] + 3
    kept = weights.clone()
    kept[-1, -1] = 0  # what the bad pair must contribute
    expected = moelab.model.experts_torch(x.float(), kept.float(), ids, ref)
    got = fused_experts_forward(x, weights, bad, layer)
    err = float((got.float() - expected).norm() / expected.norm())
    assert err < 1e-2, f"relative error {err:.2e}, tokens {tokens}, top-{top_k}"


@pytest.mark.gpu
def test_gpu_captured_in_a_cuda_graph_and_bad_ids_add_nothing():
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda")
    x = torch.randn(8, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(8, QWEN["num_experts"], QWEN["top_k"], 1, torch.bfloat16, "cuda")
    eager = fused_experts_forward(x, weights, ids, experts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts_forward(x, weights, ids, experts)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_experts_forward(x, weights, ids, experts)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    new_ids = routed(8, QWEN["num_experts"], QWEN["top_k"], 2, torch.bfloat16, "cuda")[1]
    ids.copy_(new_ids)  # the graph follows the new routing: nothing was read on the host
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fused_experts_forward(x, weights, ids, experts))
    bad = ids.clone()
    bad[:, 0] = QWEN["num_experts"]  # out of range on CUDA: that pair contributes nothing
    keep = weights.clone()
    keep[:, 0] = 0
    assert torch.allclose(fused_experts_forward(x, weights, bad, experts).float(),
                          fused_experts_forward(x, keep, ids, experts).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_tiny_float32_greedy_tokens_unchanged_with_the_patch():
    model, tok = moelab.load("tiny", device="cuda")
    model.set_experts_implementation("eager")  # the baseline: transformers' loop, any dtype
    expected = greedy_cuda(model, tok, "def fib(n):", 16)
    with moelab.patch(model) as handle:  # "auto" on CUDA: router and experts kernels
        assert len(handle.experts) == model.config.num_hidden_layers
        assert model.config._experts_implementation == "moelab"
        got = greedy_cuda(model, tok, "def fib(n):", 16)
    assert got == expected
    assert model.config._experts_implementation == "eager"


def greedy_cuda(model, tok, prompt, new_tokens):
    ids = tok(prompt, return_tensors="pt").input_ids.to("cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _run_ptx(asm: str, word: int, outputs: int = 8) -> list[int]:
    """A tiny interpreter for the straight-line PTX of `_nf4_prmt_asm` and the look-up lines of
    `_nf4_bf16_pair_lines` (and, or, xor, shl, shr, prmt in its default mode, lop3): returns the
    32-bit outputs $0..$(outputs - 1) for the input word ${outputs}."""
    mask = 0xFFFFFFFF

    def prmt(a, b, sel):
        pool, out = a | b << 32, 0
        for i in range(4):
            s = sel >> 4 * i & 0xF
            byte = pool >> 8 * (s & 7) & 0xFF
            if s & 8:  # sign mode: replicate the selected byte's top bit
                byte = 0xFF if byte & 0x80 else 0
            out |= byte << 8 * i
        return out

    def lop3(a, b, c, lut):
        return sum(((lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i for i in range(32))

    ops = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "xor.b32": lambda a, b: a ^ b,
           "shl.b32": lambda a, b: a << b, "shr.b32": lambda a, b: a >> b, "prmt.b32": prmt, "lop3.b32": lop3}
    regs = {f"${outputs}": word}
    for line in asm.replace("{", "").replace("}", "").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        regs[dst] = ops[op](*[regs[a] if a in regs else int(a, 0) for a in src]) & mask
    return [regs[f"${i}"] for i in range(outputs)]


def test_nf4_byte_permute_lookup_gives_the_exact_code_book():
    """The PTX the CUDA kernels use instead of a table in memory, run by a small interpreter on
    every byte value: the high and low nibble of each of 4 packed bytes decode to the float32
    NF4 level, bit for bit."""
    from moelab.kernels.experts import _nf4_prmt_asm
    from moelab.quant import NF4_CODE

    asm = _nf4_prmt_asm()
    levels = NF4_CODE.to(torch.float32).view(torch.int32).tolist()
    levels = [v & 0xFFFFFFFF for v in levels]
    rng = random.Random(0)
    words = [[b, (b * 7 + 3) % 256, rng.randrange(256), 255 - b] for b in range(256)]
    for bytes4 in words:
        out = _run_ptx(asm, sum(b << 8 * i for i, b in enumerate(bytes4)))
        assert out[:4] == [levels[b >> 4] for b in bytes4]     # high nibbles: even values
        assert out[4:] == [levels[b & 15] for b in bytes4]     # low nibbles: odd values


def test_nf4_bf16_level_lookup_of_the_grouped_kernel_regroups_even_and_odd_values():
    """`NF4_LEVELS_BF16_ASM` (the grouped NF4 GEMM's dequantization, 4 packed code bytes in, the
    table words substituted by their values) on every byte value in every position: $0-$1 hold
    bf16(level) of the 4 high nibbles (the even values), $2-$3 of the 4 low nibbles (the odd
    values), element 2i in a register's low half, bit for bit."""
    from moelab.kernels.experts import _nf4_levels_bf16_asm, nf4_bf16_tables
    from moelab.quant import NF4_CODE

    low, high = nf4_bf16_tables()
    asm = _nf4_levels_bf16_asm()
    for reg, word in zip(("$17", "$13", "$9", "$5"), (high[2], high[0], low[2], low[0])):
        asm = asm.replace(reg, f"0x{word:08X}")
    bf16 = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    rng = random.Random(2)
    for b in range(256):
        bytes4 = [b, (b * 11 + 5) % 256, rng.randrange(256), 255 - b]
        out = _run_ptx(asm, sum(v << 8 * i for i, v in enumerate(bytes4)), outputs=4)
        even = [bf16[v >> 4] for v in bytes4]
        odd = [bf16[v & 15] for v in bytes4]
        assert out == [even[0] | even[1] << 16, even[2] | even[3] << 16, odd[0] | odd[1] << 16, odd[2] | odd[3] << 16]


def test_nf4_bf16_pair_lookup_gives_the_bf16_code_book_in_x_order():
    """The look-up inside the NF4 decode GEMV's PTX (`_nf4_bf16_pair_lines`, the table written
    as immediates), run by the interpreter on code words covering every nibble in every
    position: register i holds bf16(level) of value 2i (byte i's high nibble) in its low half and
    of value 2i + 1 (its low nibble) in its high half, bit for bit; and the 4 table words the
    kernels load into registers are the ones the immediates spell."""
    from moelab.kernels.experts import NF4_PAIRS_AT, _nf4_bf16_pair_lines, _nf4_code, nf4_bf16_tables, nf4_pair_table
    from moelab.quant import NF4_CODE

    lines = [".reg .b32 m, m1, s, s1, ta, tb, l0, l1, h0, h1;"] + _nf4_bf16_pair_lines("$4", ("$0", "$1", "$2", "$3"))
    asm = "{" + "\n".join(lines) + "}"
    bf16 = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    rng = random.Random(1)
    words = [rng.getrandbits(32) for _ in range(300)] + [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, 0x77777777, 0x88888888]
    words += [sum(((n + i) % 16) << (4 * i) for i in range(8)) for n in range(16)]
    for word in words:
        out = _run_ptx(asm, word, outputs=4)
        for i in range(4):
            byte = word >> (8 * i) & 0xFF
            assert out[i] == bf16[byte >> 4] | bf16[byte & 15] << 16, (hex(word), i)
    low, high = nf4_bf16_tables()
    loaded = [w & 0xFFFFFFFF for w in _nf4_code(torch.device("cpu"))[16:].view(torch.int32).tolist()]
    assert loaded[:128] == [low[0], low[2], high[0], high[2]] * 32  # one copy per lane
    assert loaded[128:] == nf4_pair_table()  # then the shared-memory variant's 256 pairs (NF4_PAIRS_AT)
    assert NF4_PAIRS_AT == 16 + 128


@pytest.mark.parametrize("inter, shared_inter, folds, shared_block_k", [(64, 128, True, 0), (96, 160, True, 0),
                                                                       (64, 320, True, 256), (96, 128, False, 0)])
def test_nf4_shared_expert_folds_into_the_nf4_decode_kernels(inter, shared_inter, folds, shared_block_k, monkeypatch):
    """An NF4 shared expert (one-expert NF4Tensors) beside NF4 routed experts: streamed inside the
    two decode launches where its format matches theirs (rows of whole 64-blocks or not: 160 rows
    make a partial last chunk of 96), on its own otherwise; either way routed + sigmoid(gate) *
    the dequantized shared expert (interpreter, float32). shared_block_k: the down kernel's own
    K-step over the shared rows (SHARED_BLOCK_K, as on CUDA at one token), here 256 against 128."""
    from moelab.kernels.experts import SharedExpert

    if shared_block_k:
        original = experts_kernels.gemv_config
        monkeypatch.setattr(experts_kernels, "gemv_config", lambda *a, **k: {
            **original(*a, **k), **({} if a[2] else {"SHARED_BLOCK_K": shared_block_k})})

    hidden, experts_n, top_k = 128, 8, 2
    gen = torch.Generator().manual_seed(inter + shared_inter)
    w = lambda *shape: torch.randn(*shape, generator=gen) * 0.05  # noqa: E731
    layer = NF4Experts(quantize_nf4(w(experts_n, 2 * inter, hidden)), quantize_nf4(w(experts_n, hidden, inter)),
                       torch.nn.SiLU())
    gate_up, down = quantize_nf4(w(1, 2 * shared_inter, hidden)), quantize_nf4(w(1, hidden, shared_inter))
    gu, dn = dequantize_nf4(gate_up)[0], dequantize_nf4(down)[0]
    if folds:  # the fold must not fall back to running the shared expert on its own
        monkeypatch.setattr(experts_kernels, "_shared_expert", lambda *a: pytest.fail("shared expert not folded"))
    for tokens in (1, 3):
        x = torch.randn(tokens, hidden, generator=gen)
        logit = torch.randn(tokens, 1, generator=gen)
        weights, ids = routed(tokens, experts_n, top_k, tokens)
        got = fused_experts_forward(x, weights, ids, layer, shared=SharedExpert(gate_up, down, logit))
        g, u = (x @ gu.T).chunk(2, dim=-1)
        expected = fused_experts_forward(x, weights, ids, layer) + torch.sigmoid(logit) * ((F.silu(g) * u) @ dn.T)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="shared expert weights do not fit"):
        fused_experts_forward(x, weights, ids, layer, shared=SharedExpert(gate_up, gu, logit))


def test_nf4_shared_expert_through_the_decode_kernels_equals_the_modules():
    """tiny's NF4 shared expert (gate/up quantized jointly, down alone) through
    `nf4_shared_expert` (the routed decode kernels, one expert every token picks, the sigmoid
    gate as routing weight; interpreter) against sigmoid(gate) * its Linear4bit modules; a
    gate_logit of the wrong size is refused."""
    pytest.importorskip("bitsandbytes")
    from moelab.kernels.experts import nf4_shared_expert
    from moelab.quant import linear4bit_nf4

    model, _ = moelab.load("tiny", quantize="nf4")
    mlp = model.model.layers[2].mlp
    gen = torch.Generator().manual_seed(3)
    for tokens in (1, 3):
        x = torch.randn(tokens, 128, generator=gen)
        logit = torch.randn(tokens, 1, generator=gen)
        got = nf4_shared_expert(x, mlp.shared_expert._moelab_nf4_gate_up.weight,
                                linear4bit_nf4(mlp.shared_expert.down_proj), logit)
        with torch.no_grad():
            expected = torch.sigmoid(logit) * mlp.shared_expert(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one logit per token"):
        nf4_shared_expert(x, mlp.shared_expert._moelab_nf4_gate_up.weight,
                          linear4bit_nf4(mlp.shared_expert.down_proj), logit[:1])


def _run_lanes(asm: str, num_warps: int, inputs, shared: dict, base: int = 0x1000) -> list[list[int]]:
    """Runs straight-line PTX on every lane of a program in lock step (the few ops of the NF4
    table fill and look-up: mov from %laneid / %tid.x / the table symbol, shl, shr, add, and,
    mul.lo, mad.lo, prmt, shfl.sync.idx, st.shared, ld.shared, bar.sync). inputs(warp, lane)
    gives each lane's $-operands from $1 on (a dict); `shared` is the shared memory (address ->
    word). Returns $0 of every lane, per warp."""
    mask = 0xFFFFFFFF
    lines = [ln.strip() for ln in asm.replace("{", "").replace("}", "").split(";")]
    lines = [ln for ln in lines if ln and not ln.startswith(".reg")]
    regs = [[dict(inputs(w, lane), **{"%laneid": lane, "%tid.x": 32 * w + lane, "moelab_nf4_pairs": base})
             for lane in range(32)] for w in range(num_warps)]

    def val(r, a):
        return r[a] if a in r else int(a, 0)

    for line in lines:
        op, args = line.split(None, 1) if " " in line else (line, "")
        if op == "bar.sync":
            continue
        if op.startswith("st.shared"):
            addr, src = [a.strip() for a in args.split(",")]
            reg, off = (addr.strip("[]").split("+") + ["0"])[:2]
            for warp in regs:
                for r in warp:
                    shared[val(r, reg) + int(off)] = val(r, src)
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        for warp in regs:
            if op.startswith("shfl"):
                new = [warp[val(r, src[1])][src[0]] for r in warp]
                for r, v in zip(warp, new):
                    r[dst] = v
                continue
            for r in warp:
                if op.startswith("ld.shared"):
                    r[dst] = shared[val(r, src[0].strip("[]"))]
                elif op == "mov.u32":
                    r[dst] = val(r, src[0])
                elif op == "mad.lo.u32":
                    r[dst] = (val(r, src[0]) * val(r, src[1]) + val(r, src[2])) & mask
                elif op == "prmt.b32":
                    pool = val(r, src[0]) | val(r, src[1]) << 32
                    sel = val(r, src[2])
                    r[dst] = sum((pool >> 8 * (sel >> 4 * i & 7) & 0xFF) << 8 * i for i in range(4))
                else:
                    f = {"shl.b32": lambda a, b: a << b, "shr.u32": lambda a, b: a >> b, "add.u32": lambda a, b: a + b,
                         "and.b32": lambda a, b: a & b, "mul.lo.u32": lambda a, b: a * b}[op]
                    r[dst] = f(val(r, src[0]), val(r, src[1])) & mask
    return [[r["$0"] for r in warp] for warp in regs]


@pytest.mark.parametrize("num_warps", [2, 4, 8, 16, 32])
def test_nf4_shared_memory_table_fill_and_lookup(num_warps):
    """The NF4 GEMVs' shared-memory variant (`MOELAB_NF4_SMEM=1`), run lane by lane: the fill
    (`_nf4_table_fill_asm`, each warp's lanes holding their share of `nf4_pair_table` as
    `_nf4_lut` loads it) leaves entry e of lane l at word 32 e + l for all 256 entries and 32
    lanes, returns each lane's own address, and the look-up lines of `NF4_DOT_SMEM_ASM` then
    give, for every byte value in every position of a code word, the bf16 level pair of
    `_nf4_bf16_pair_lines` (high nibble in the low half)."""
    from moelab.kernels.experts import _nf4_dot_smem_asm, _nf4_table_fill_asm, nf4_pair_table
    from moelab.quant import NF4_CODE

    table, base, shared = nf4_pair_table(), 0x1000, {}
    bf16 = [v & 0xFFFF for v in NF4_CODE.to(torch.bfloat16).view(torch.int16).tolist()]
    assert table == [bf16[b >> 4] | bf16[b & 15] << 16 for b in range(256)]
    per_warp = 256 // num_warps
    regs = max(1, per_warp // 32)

    def inputs(w, lane):  # what `_nf4_lut` loads: entry w * per_warp + lane % per_warp + 32 j into $(1 + j)
        return {f"${1 + j}": table[w * per_warp + lane % per_warp + 32 * j] for j in range(regs)}

    addrs = _run_lanes(_nf4_table_fill_asm(num_warps), num_warps, inputs, shared, base)
    assert all(addrs[w][lane] == base + 4 * lane for w in range(num_warps) for lane in range(32))
    assert shared == {base + 4 * (32 * e + lane): table[e] for e in range(256) for lane in range(32)}

    lookup = ";".join(_nf4_dot_smem_asm().replace("{", "").replace("}", "").split(";")[2:14]).replace("p3", "$0")
    rng = random.Random(3)
    for b in range(256):
        word = [b, rng.randrange(256), rng.randrange(256), 255 - b]
        packed = sum(v << 8 * i for i, v in enumerate(word))
        out = _run_lanes(lookup, 1, lambda w, lane: {"$1": packed, "$6": base + 4 * lane}, shared, base)[0]
        assert out == [table[word[3]]] * 32
        for i in range(3):
            got = _run_lanes(lookup.replace("$0", "p3").replace(f"p{i}, [q]", "$0, [q]"), 1,
                             lambda w, lane: {"$1": packed, "$6": base + 4 * lane}, shared, base)[0]
            assert got == [table[word[i]]] * 32


def test_nf4_table_choice_per_kernel(monkeypatch):
    """`with_nf4_table` adds NF4_SMEM (the program's warps) only for the kernels named in
    NF4_SMEM_KERNELS (all three by default) and only on the NF4 word path (CUDA, rows of whole
    64-blocks), caps gate_up's and the linears' registers where it adds the table, leaves a config
    that already says NF4_SMEM alone (0: no table, no cap), and names a bad kernel."""
    import moelab.kernels.experts as EK

    words = dict(NF4=True, NF4_ASM=True, ROW_ALIGNED=True)
    cfg = dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, PIPELINE=1)
    monkeypatch.setattr(EK, "NF4_SMEM_KERNELS", frozenset({"gate_up", "down", "linear"}))  # the default
    assert EK.with_nf4_table(cfg, words, "linear") == {**cfg, "NF4_SMEM": 4, "maxnreg": 48}
    assert EK.with_nf4_table({**cfg, "NF4_SMEM": 0}, words, "linear") == {**cfg, "NF4_SMEM": 0}  # no cap either
    monkeypatch.setattr(EK, "NF4_SMEM_KERNELS", frozenset({"gate_up", "down"}))
    assert EK.with_nf4_table(cfg, words, "gate_up") == {**cfg, "NF4_SMEM": 4, "maxnreg": 64}
    assert EK.with_nf4_table({**cfg, "num_warps": 32}, words, "down") == {**cfg, "num_warps": 32, "NF4_SMEM": 32}
    assert EK.with_nf4_table(cfg, words, "linear") == cfg
    assert EK.with_nf4_table(cfg, {**words, "ROW_ALIGNED": False}, "down") == cfg
    assert EK.with_nf4_table(cfg, {**words, "NF4_ASM": False}, "down") == cfg
    assert EK.with_nf4_table({**cfg, "NF4_SMEM": 0}, words, "down")["NF4_SMEM"] == 0
    with pytest.raises(ValueError, match="gate_up, down or linear"):
        EK.with_nf4_table(cfg, words, "up")
    with pytest.raises(ValueError, match="2 to 32 warps.*has 1"):
        EK.with_nf4_table({**cfg, "num_warps": 1}, words, "down")
    assert EK.with_nf4_table({**cfg, "num_warps": 1, "NF4_SMEM": 0}, words, "down")["NF4_SMEM"] == 0
    assert EK._nf4_smem_kernels("gate_up, down") == {"gate_up", "down"}
    assert EK._nf4_smem_kernels("none") == EK._nf4_smem_kernels("") == frozenset()
    with pytest.raises(ValueError, match="MOELAB_NF4_SMEM.*'gateup'"):
        EK._nf4_smem_kernels("gateup")
