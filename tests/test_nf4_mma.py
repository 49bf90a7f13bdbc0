"""The NF4 tensor-core GEMV (moelab.kernels.nf4_mma).

Its PTX runs only on CUDA. On the CPU this checks the part that is easy to get wrong and hard
to see on the GPU: which code bytes and x pairs each lane puts into which MMA register
(`BLOCK_STEPS`), emulated lane by lane against the fragment layout of `mma.m16n8k16` that the
PTX ISA documents, and the PTX text generated from it. The `gpu` tests run the kernels against
dequantize-then-matmul on the full Qwen1.5-MoE layer, with and without the shared expert.
"""

import re
import types

import pytest
import torch

import moelab
from moelab.kernels import experts as experts_kernels
from moelab.kernels import nf4_mma
from moelab.kernels.experts import SharedExpert, fused_experts_forward, nf4_pair_table
from moelab.quant import NF4_CODE, NF4Experts, dequantize_nf4, quantize_nf4

from test_experts_kernel import QWEN, experts_module, routed


def _pair_levels(byte: int) -> tuple[float, float]:
    """(low half, high half) of the pair table's entry for a code byte, as floats."""
    word = nf4_pair_table()[byte]
    halves = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return float(halves[0]), float(halves[1])


def _emulated_block(codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[16] row sums of one 16-row x 64-value block through 4 emulated MMAs: codes uint8 [16, 32]
    (byte j of a row: values 2j, 2j + 1), x float [64]. Each lane's registers are filled as
    BLOCK_STEPS says; the ISA's layout of m16n8k16 then places them in A [16, 16] and B [16, 8]."""
    out = torch.zeros(16, 8, dtype=torch.float64)
    for step in nf4_mma.BLOCK_STEPS:
        a = torch.full((16, 16), float("nan"), dtype=torch.float64)
        b = torch.full((16, 8), float("nan"), dtype=torch.float64)
        for lane in range(32):
            g, t = divmod(lane, 4)
            lane_bytes = {half: codes[g + 8 * half, 8 * t:8 * t + 8] for half in (0, 1)}
            regs = [_pair_levels(int(lane_bytes[half][byte])) for half, byte in step["a"]]
            # A (ISA): register 0 row g, cols 2t, 2t+1; 1 row g+8; 2 row g, cols 2t+8, 2t+9; 3 row g+8.
            for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                a[row, col], a[row, col + 1] = regs[reg]
            # B (ISA): register 0 rows (K) 2t, 2t+1 of column g; register 1 rows 2t+8, 2t+9.
            xs = x[16 * t:16 * t + 16].double()  # the lane's 8 pairs
            for reg, k in enumerate((2 * t, 2 * t + 8)):
                pair = step["b"][reg]
                b[k, g], b[k + 1, g] = xs[2 * pair], xs[2 * pair + 1]
        assert not a.isnan().any() and not b.isnan().any(), "a fragment slot was never filled"
        out += a @ b
    assert torch.equal(out, out[:, :1].expand(16, 8)), "every column of B is x: all result columns agree"
    return out[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_steps_give_each_row_its_dot_product(seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (16, 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    x = torch.randn(64, generator=gen).bfloat16().double()
    levels = NF4_CODE.to(torch.bfloat16).double()
    w = torch.stack([(codes.long() >> 4), (codes.long() & 15)], dim=-1).reshape(16, 64)  # value 2j: high nibble
    expected = levels[w] @ x
    assert torch.allclose(_emulated_block(codes, x), expected, rtol=1e-12, atol=1e-12)


def test_a_wrong_mapping_is_caught(monkeypatch):
    """The emulation is not vacuous: swapping two A registers of one step changes the sums."""
    steps = [dict(s) for s in nf4_mma.BLOCK_STEPS]
    a = list(steps[1]["a"])
    a[0], a[2] = a[2], a[0]
    steps[1]["a"] = tuple(a)
    monkeypatch.setattr(nf4_mma, "BLOCK_STEPS", tuple(steps))
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (16, 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    x = torch.randn(64, generator=gen).bfloat16().double()
    levels = NF4_CODE.to(torch.bfloat16).double()
    w = torch.stack([(codes.long() >> 4), (codes.long() & 15)], dim=-1).reshape(16, 64)
    assert not torch.allclose(_emulated_block(codes, x), levels[w] @ x, rtol=1e-6, atol=1e-6)


def test_the_ptx_follows_block_steps():
    """Each step's 4 look-ups take the code bytes BLOCK_STEPS names (row g: words w0, w1; row
    g + 8: w2, w3), and its MMA takes x pairs 2s, 2s + 1 (64-bit operand 4 + s)."""
    ptx = nf4_mma.MMA_BLOCK_ASM.value
    picks = re.findall(r"prmt\.b32 t, (w\d), 0, 0x444(\d);", ptx)
    assert len(picks) == 16
    for s, step in enumerate(nf4_mma.BLOCK_STEPS):
        for reg, (half, byte) in enumerate(step["a"]):
            assert picks[4 * s + reg] == (f"w{2 * half + byte // 4}", str(byte % 4))
    assert re.findall(r"mov\.b64 \{x0, x1\}, \$(\d+);", ptx) == ["4", "5", "6", "7"]
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 4


def test_usable_needs_cuda_and_whole_blocks():
    experts = experts_module(4, 128, 64, torch.float32, "cpu")
    layer = NF4Experts.from_experts(experts)
    assert not nf4_mma.usable(torch.zeros(1, 128), layer.gate_up, layer.down, 0)  # CPU: the interpreter's paths


# ---------------------------------------------------------------------------- GPU


def _reference(layer, x, weights, ids):
    ref = types.SimpleNamespace(gate_up_proj=dequantize_nf4(layer.gate_up).float(),
                                down_proj=dequantize_nf4(layer.down).float(), act_fn=torch.nn.SiLU(),
                                num_experts=layer.gate_up.shape[0])
    return moelab.model.experts_torch(x.float(), weights.float(), ids, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(1, 4), (2, 4), (5, 3), (16, 4)])
def test_gpu_mma_path_matches_dequantize_then_matmul(tokens, top_k, monkeypatch):
    """The full layer, the MMA path against dequantize-then-matmul (float32) and against the word
    path; one id out of range adds nothing."""
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    layer = NF4Experts.from_experts(experts)
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], top_k, tokens + 11, torch.bfloat16, "cuda")
    bad = ids.clone()
    bad[-1, -1] = -1
    kept = weights.clone()
    kept[-1, -1] = 0
    expected = _reference(layer, x, kept, ids)
    assert nf4_mma.usable(x, layer.gate_up, layer.down, 0)
    got = fused_experts_forward(x, weights, bad, layer)
    err = float((got.float() - expected).norm() / expected.norm())
    assert err < 5e-3, f"relative error {err:.2e}"
    assert torch.equal(got, fused_experts_forward(x, weights, bad, layer))  # deterministic
    monkeypatch.setattr(nf4_mma, "ENABLED", False)
    words = fused_experts_forward(x, weights, bad, layer)
    assert float((words.float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3])
def test_gpu_mma_path_folds_the_shared_expert(tokens):
    """With an NF4 shared expert folded in (its gate/up as 4 chunks of act, its down in the sum)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    layer = NF4Experts.from_experts(experts)
    shared_inter = 4 * QWEN["inter"]
    s_gate_up = (torch.randn(1, 2 * shared_inter, QWEN["hidden"], device="cuda", generator=gen) * 0.02).bfloat16()
    s_down = (torch.randn(1, QWEN["hidden"], shared_inter, device="cuda", generator=gen) * 0.02).bfloat16()
    q_gate_up, q_down = quantize_nf4(s_gate_up), quantize_nf4(s_down)
    x = torch.randn(tokens, QWEN["hidden"], device="cuda").bfloat16()
    gate_logit = torch.randn(tokens, 1, device="cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], QWEN["top_k"], tokens, torch.bfloat16, "cuda")
    got = fused_experts_forward(x, weights, ids, layer, shared=SharedExpert(q_gate_up, q_down, gate_logit))
    sg, su = dequantize_nf4(q_gate_up)[0].float().chunk(2, dim=0)
    h = torch.nn.functional.silu(x.float() @ sg.T) * (x.float() @ su.T)
    shared = torch.sigmoid(gate_logit.float()) * (h @ dequantize_nf4(q_down)[0].float().T)
    expected = _reference(layer, x, weights, ids) + shared
    err = float((got.float() - expected).norm() / expected.norm())
    assert err < 5e-3, f"relative error {err:.2e}"
    assert experts_kernels._can_fold_shared(SharedExpert(q_gate_up, q_down, gate_logit), x, layer.gate_up, layer.down)
