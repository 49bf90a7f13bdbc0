"""The NF4 experts on the tensor cores (moelab.kernels.nf4_mma).

Its PTX runs only on CUDA. On the CPU this checks the part that is easy to get wrong and hard
to see on the GPU: which code bytes and x pairs each lane puts into which MMA register
(`BLOCK_STEPS`), emulated lane by lane against the fragment layout of `mma.m16n8k16` that the
PTX ISA documents, with 8 different tokens in B's 8 columns, and the PTX text generated from it.
The `gpu` tests run the path against dequantize-then-matmul on the full Qwen1.5-MoE layer.
"""

import re
import types

import pytest
import torch

import moelab
from moelab.kernels import experts as experts_kernels
from moelab.kernels import nf4_mma
from moelab.kernels.experts import fused_experts_forward, nf4_pair_table
from moelab.quant import NF4_CODE, NF4Experts, dequantize_nf4

from test_experts_kernel import QWEN, experts_module, routed

PAIRS = torch.tensor(nf4_pair_table(), dtype=torch.int64)
PAIR_LEVELS = torch.stack([PAIRS & 0xFFFF, PAIRS >> 16], -1).to(torch.int32).to(torch.int16).view(torch.bfloat16).double()


def _emulated_block(codes: torch.Tensor, x: torch.Tensor, steps=None) -> torch.Tensor:
    """[16, 8]: one 16-row x 64-value block (codes uint8 [16, 32], byte j of a row holding values
    2j, 2j + 1) times 8 columns of x ([64, 8]) through 4 emulated MMAs. Each lane fills its
    registers as `steps` (BLOCK_STEPS) says; the ISA's layout of m16n8k16 places them in A and B."""
    out = torch.zeros(16, 8, dtype=torch.float64)
    for step in steps or nf4_mma.BLOCK_STEPS:
        a = torch.full((16, 16), float("nan"), dtype=torch.float64)
        b = torch.full((16, 8), float("nan"), dtype=torch.float64)
        for lane in range(32):
            g, t = divmod(lane, 4)
            for reg, (half, byte) in enumerate(step["a"]):
                # A (ISA): register 0 row g, cols 2t, 2t+1; 1 row g+8; 2 row g, cols 2t+8, 2t+9; 3 row g+8.
                row, col = g + 8 * (reg % 2), 2 * t + 8 * (reg // 2)
                a[row, col:col + 2] = PAIR_LEVELS[int(codes[g + 8 * half, 8 * t + byte])]
            for reg, pair in enumerate(step["b"]):
                # B (ISA): register 0 rows (K) 2t, 2t+1 of column g; register 1 rows 2t+8, 2t+9.
                k = 2 * t + 8 * reg
                b[k:k + 2, g] = x[16 * t + 2 * pair:16 * t + 2 * pair + 2, g]
        assert not a.isnan().any() and not b.isnan().any(), "a fragment slot was never filled"
        out += a @ b
    return out


def _block(seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (16, 32), generator=gen, dtype=torch.int32)
    x = torch.randn(64, 8, generator=gen).bfloat16().double()
    levels = NF4_CODE.to(torch.bfloat16).double()
    w = torch.stack([codes.long() >> 4, codes.long() & 15], dim=-1).reshape(16, 64)  # value 2j: the high nibble
    return codes, x, levels[w] @ x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_steps_give_every_row_and_column_its_dot_product(seed):
    codes, x, expected = _block(seed)
    assert torch.allclose(_emulated_block(codes, x), expected, rtol=1e-12, atol=1e-12)


def test_a_wrong_mapping_is_caught():
    """The emulation is not vacuous: swapping two A registers, or two x pairs, changes the sums."""
    codes, x, expected = _block(3)
    for key, i, j in (("a", 0, 2), ("b", 0, 1)):
        steps = [dict(s) for s in nf4_mma.BLOCK_STEPS]
        regs = list(steps[1][key])
        regs[i], regs[j] = regs[j], regs[i]
        steps[1][key] = tuple(regs)
        assert not torch.allclose(_emulated_block(codes, x, steps), expected, rtol=1e-6, atol=1e-6)


def test_the_ptx_follows_block_steps():
    """Each step's 4 look-ups take the code bytes BLOCK_STEPS names (row g: words w0, w1; row
    g + 8: w2, w3), and its MMA takes x pairs 2s, 2s + 1 (64-bit operand 6 + s); rows g are
    scaled by operand 11, rows g + 8 by operand 12."""
    ptx = nf4_mma.MMA_BLOCK_ASM.value
    picks = re.findall(r"prmt\.b32 t, (w\d), 0, 0x444(\d);", ptx)
    assert len(picks) == 16
    for s, step in enumerate(nf4_mma.BLOCK_STEPS):
        assert step["b"] == (2 * s, 2 * s + 1)
        for reg, (half, byte) in enumerate(step["a"]):
            assert picks[4 * s + reg] == (f"w{2 * half + byte // 4}", str(byte % 4))
    assert re.findall(r"mov\.b64 \{x0, x1\}, \$(\d+);", ptx) == ["6", "7", "8", "9"]
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 4
    assert re.findall(r"fma\.rn\.f32 c(\d), d\1, (s[gh]), c\1;", ptx) == [("0", "sg"), ("1", "sg"), ("2", "sh"),
                                                                          ("3", "sh")]
    # Two groups of 8 columns (`nf4_mma.linear`): the same 16 look-ups, each step's feeding both MMAs,
    # group c's x from operands 10 + 4c + s and its accumulators d4c..d4c+3.
    ptx2 = nf4_mma.MMA_BLOCK2_ASM.value
    assert re.findall(r"prmt\.b32 t, (w\d), 0, 0x444(\d);", ptx2) == picks
    assert re.findall(r"mov\.b64 \{x0, x1\}, \$(\d+);", ptx2) == ["10", "14", "11", "15", "12", "16", "13", "17"]
    mmas = re.findall(r"mma\.sync\S+ \{(d\d+), d\d+, d\d+, d\d+\}", ptx2)
    assert mmas == ["d0", "d4"] * 4
    assert re.findall(r"fma\.rn\.f32 c(\d), d\1, (s[gh]), c\1;", ptx2) == [
        (str(i), "sg" if i % 4 < 2 else "sh") for i in range(8)]


def test_dense_linear_rejects_bad_input():
    """`nf4_mma.linear` names the problem before any launch: K that does not match or is not whole
    64-value blocks, a shared gate without the output to add into (or with gated)."""
    from moelab.quant import quantize_nf4

    w = quantize_nf4(torch.randn(1, 32, 128) * 0.02, backend="torch")
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match=r"x must be \[T, 128\]"):
        nf4_mma.linear(torch.randn(3, 64), w)
    with pytest.raises(ValueError, match="come together"):
        nf4_mma.linear(x, w, shared_gate=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="not with gated"):
        nf4_mma.linear(x, w, gated=True, shared_gate=torch.zeros(3, 1), add=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="nb takes 1 or 2"):
        nf4_mma.linear(x, w, nb=4)
    for splits in (0, 3, 1.0, True):  # K = 128: two 64-value blocks, so 1 or 2 shares
        with pytest.raises(ValueError, match="splits must be an int from 1 to K / 64 = 2"):
            nf4_mma.linear(x, w, splits=splits)
    odd = quantize_nf4(torch.randn(1, 32, 96) * 0.02, backend="torch")
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_mma.linear(torch.randn(3, 96), odd)


def test_linear_splits_fill_the_gpu_and_keep_whole_shares_of_k():
    """`nf4_mma.linear_splits`: no split from SPLIT_BELOW_PROGRAMS_PER_SM programs an SM on; below it
    enough shares of K for about SPLIT_PROGRAMS_PER_SM programs an SM, none under SPLIT_MIN_BLOCKS blocks."""
    target = nf4_mma.SPLIT_PROGRAMS_PER_SM * 132
    below = int(nf4_mma.SPLIT_BELOW_PROGRAMS_PER_SM * 132)
    assert nf4_mma.linear_splits(below, 88, 132) == 1 and nf4_mma.linear_splits(below - 1, 88, 132) > 1
    assert nf4_mma.linear_splits(10 * target, 2, 132) == 1
    for programs, blocks in ((32, 88), (32, 32), (96, 32), (88, 32), (200, 88), (32, 5), (1, 3), (7, 1000)):
        splits = nf4_mma.linear_splits(programs, blocks, 132)
        assert splits >= 1 and (splits == 1 or blocks // splits >= nf4_mma.SPLIT_MIN_BLOCKS)
        assert programs * splits >= target or splits == max(1, blocks // nf4_mma.SPLIT_MIN_BLOCKS)
        assert programs * (splits - 1) < target  # no more than needed


def test_not_usable_on_the_cpu():
    layer = NF4Experts.from_experts(experts_module(4, 128, 64, torch.float32, "cpu"))
    assert not nf4_mma.usable(torch.zeros(1, 128), layer.gate_up, layer.down)  # the interpreter's paths


# ---------------------------------------------------------------------------- GPU


def _reference(layer, x, weights, ids):
    ref = types.SimpleNamespace(gate_up_proj=dequantize_nf4(layer.gate_up).float(),
                                down_proj=dequantize_nf4(layer.down).float(), act_fn=torch.nn.SiLU(),
                                num_experts=layer.gate_up.shape[0])
    return moelab.model.experts_torch(x.float(), weights.float(), ids, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(2, 4), (3, 3), (5, 4), (16, 4), (33, 4), (64, 4), (20, 6)])
def test_gpu_mma_path_matches_dequantize_then_matmul(tokens, top_k, monkeypatch):
    """The full layer through the MMA path against dequantize-then-matmul (float32) and against the
    previous NF4 paths; one id out of range adds nothing; deterministic."""
    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda", seed=tokens)
    layer = NF4Experts.from_experts(experts)
    x = torch.randn(tokens, QWEN["hidden"], generator=torch.Generator().manual_seed(tokens)).to("cuda").bfloat16()
    weights, ids = routed(tokens, QWEN["num_experts"], top_k, tokens + 11, torch.bfloat16, "cuda")
    bad = ids.clone()
    bad[-1, -1] = QWEN["num_experts"] + 2
    kept = weights.clone()
    kept[-1, -1] = 0
    expected = _reference(layer, x, kept, ids)
    monkeypatch.setattr(experts_kernels, "NF4_MMA_FROM_PAIRS", 1)  # every case here takes the path
    calls = []
    monkeypatch.setattr(nf4_mma, "grouped", lambda *a, _f=nf4_mma.grouped, **k: calls.append(1) or _f(*a, **k))
    got = fused_experts_forward(x, weights, bad, layer)
    assert len(calls) == 2  # gate_up and down took this path
    err = float((got.float() - expected).norm() / expected.norm())
    # A wrong lane mapping or scale is off by O(1). A right one is off by the bf16 roundings of the
    # activations between the two GEMMs and of the output: below 5e-3 in the first runs, 5.06e-3 at T=2
    # in a later one (gpu_tests_rope_attention_final_2026-12-07_h100.log: x then came from the global
    # generator, after other test files; it is seeded here now). The previous paths are held to 1e-2.
    assert err < 8e-3, f"relative error {err:.2e} at T={tokens}, top-{top_k}"
    assert torch.equal(got, fused_experts_forward(x, weights, bad, layer))
    monkeypatch.setattr(nf4_mma, "ENABLED", False)
    before = fused_experts_forward(x, weights, bad, layer)
    assert float((before.float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_mma_path_in_a_cuda_graph():
    """No host sync: captured once, replayed on new routings, equal to an eager call."""
    from moelab.graphs import capture_graph

    experts = experts_module(QWEN["num_experts"], QWEN["hidden"], QWEN["inter"], torch.bfloat16, "cuda")
    layer = NF4Experts.from_experts(experts)
    x = torch.randn(16, QWEN["hidden"], device="cuda").bfloat16()
    weights, ids = routed(16, QWEN["num_experts"], QWEN["top_k"], 1, torch.bfloat16, "cuda")
    eager = fused_experts_forward(x, weights, ids, layer)
    graph, out = capture_graph(lambda: fused_experts_forward(x, weights, ids, layer), None)
    new_w, new_ids = routed(16, QWEN["num_experts"], QWEN["top_k"], 2, torch.bfloat16, "cuda")
    weights.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, fused_experts_forward(x, weights, ids, layer)) and not torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 8, 13, 16, 33, 64])
@pytest.mark.parametrize("nb, warps", [(1, 4), (2, 4), (2, 2)])
@pytest.mark.parametrize("splits", [1, 3, 7])
def test_gpu_dense_linear_matches_dequantize_then_matmul(tokens, nb, warps, splits):
    """`nf4_mma.linear` (a dense NF4 weight against a prefill's tokens) against dequantize-then-matmul
    in float32: with a bias, gated (SiLU(gate) * up), and as a shared expert's down (add +
    sigmoid(gate logit) * result, written into add); token counts that fill no group of 8; K (7
    blocks) in one share, in 3 uneven ones (3, 3, 1 blocks) and one block a share, the split-K
    partials then summed by the second launch with each epilogue."""
    from moelab.quant import quantize_nf4

    gen = torch.Generator().manual_seed(tokens)
    w = quantize_nf4((torch.randn(1, 320, 448, generator=gen) * 0.02).to("cuda", torch.bfloat16), backend="torch")
    dense = dequantize_nf4(w)[0].float()
    x = torch.randn(tokens, 448, generator=gen).to("cuda", torch.bfloat16)
    bias = torch.randn(320, generator=gen).to("cuda", torch.bfloat16)

    def rel(got, want):  # a right kernel: bf16 roundings (the output, the reference's weights), ~2e-3
        return float((got.float() - want).norm() / want.norm())  # a wrong lane mapping or scale: O(1)

    cfg = dict(nb=nb, warps=warps, splits=splits)
    assert rel(nf4_mma.linear(x, w, bias, **cfg), x.float() @ dense.T + bias.float()) < 8e-3
    gate, up = (x.float() @ dense.T).chunk(2, dim=-1)
    assert rel(nf4_mma.linear(x, w, gated=True, **cfg), torch.nn.functional.silu(gate) * up) < 8e-3
    logits = torch.randn(tokens, 3, generator=gen).to("cuda", torch.bfloat16)
    routed = torch.randn(tokens, 320, generator=gen).to("cuda", torch.bfloat16)
    want = routed.float() + torch.sigmoid(logits[:, 1:2].float()) * (x.float() @ dense.T)
    got = nf4_mma.linear(x, w, shared_gate=logits[:, 1:2], add=routed.clone(), **cfg)
    assert rel(got, want) < 8e-3
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4_mma.linear(x[:, :100], w)


@pytest.mark.gpu
def test_gpu_nf4_model_on_the_mma_linears_matches_the_dequantized_path(monkeypatch):
    """A whole NF4 prefill of 5, 13 and 40 tokens and a batch-6 decode step (q/k/v joint, the shared
    expert behind the routed experts, o_proj: `moelab.kernels.nf4_mma.linear`) give the logits of
    the paths before it (dequantize then cuBLAS, bitsandbytes' modules) within bf16 noise."""
    pytest.importorskip("bitsandbytes")
    from moelab.model import MoeForward
    from moelab.models import preset_config, random_nf4_model

    config = preset_config("tiny")
    config.num_key_value_heads = config.num_attention_heads  # q/k/v quantized jointly
    model = random_nf4_model(config, "cuda", torch.bfloat16, seed=3)
    calls = []
    monkeypatch.setattr(nf4_mma, "linear", lambda *a, _f=nf4_mma.linear, **k: calls.append(1) or _f(*a, **k))
    runs = []
    for limit in (64, 0):
        monkeypatch.setattr(nf4_mma, "LINEAR_MAX_TOKENS", limit)
        fwd = MoeForward(model)
        cache = fwd.new_cache(6, 64)
        slots = [cache.allocate(48) for _ in range(6)]
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 13, 40, 7, 9, 11)]
        logits = list(fwd.prefill(cache, prompts[:3], slots[:3], all_logits=True))
        logits += [fwd.prefill(cache, [p], [s]) for p, s in zip(prompts[3:], slots[3:])]
        logits.append(fwd.decode(cache, torch.arange(6, device="cuda") + 40, torch.tensor(slots, device="cuda")))
        runs.append(torch.cat(logits).float())
        if limit:
            assert calls, "the tensor-core linears did not run"
            calls.clear()
    assert not calls
    err = float((runs[0] - runs[1]).norm() / runs[1].norm())
    assert err < 2e-2, f"the NF4 tensor-core linears differ from the previous paths by {err:.2e}"
