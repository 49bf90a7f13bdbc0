"""moelab.kernels.gemv.linear_gemv against F.linear: irregular shapes, row slices of a larger
weight (the fused projections' router rows), bias, float16, bad input; bf16 on the GPU."""

import pytest
import torch
import torch.nn.functional as F

import moelab  # noqa: F401  (sets the Triton interpreter up on a machine without CUDA)
from moelab.kernels.experts import nf4_to_dense
from moelab.kernels.gemv import linear_gemv

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors); see the gpu test")


@interpreter
@pytest.mark.parametrize("tokens,n_out,k_dim,bias", [(1, 61, 96, False), (3, 200, 130, True), (4, 8, 512, True),
                                                     (2, 1, 33, False)])
def test_matches_f_linear_float32(tokens, n_out, k_dim, bias):
    gen = torch.Generator().manual_seed(tokens * 100 + n_out)
    x = torch.randn(tokens, k_dim, generator=gen)
    big = torch.randn(n_out + 40, k_dim, generator=gen)
    weight = big[17:17 + n_out]  # a row slice: the router rows of the fused MoE-input weight
    b = torch.randn(n_out, generator=gen) if bias else None
    got = linear_gemv(x, weight, b)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_configs_per_shape():
    """At one token the NF4 q/k/v (thousands of rows) runs 16-row programs on 8 warps with the
    shared-memory table, o_proj (2,048 rows) one 16-row program per SM on 32 warps over whole
    2,048-value rows with `prmt` (NF4_SMEM=0); a vocabulary head 16-row programs on 2 warps; 2-4
    tokens keep 8 rows on 4 warps, `prmt`; bf16 and the interpreter are unchanged."""
    from moelab.kernels.experts import with_nf4_table
    from moelab.kernels.gemv import gemv_config

    words = dict(NF4=True, NF4_ASM=True, ROW_ALIGNED=True)
    qkv, o = gemv_config(6144, True, nf4=True), gemv_config(2048, True, nf4=True)
    assert (qkv["BLOCK_N"], qkv["BLOCK_K"], qkv["num_warps"]) == (16, 512, 8)
    assert with_nf4_table(qkv, words, "linear") == {**qkv, "NF4_SMEM": 8, "maxnreg": 48}
    assert (o["BLOCK_N"], o["BLOCK_K"], o["num_warps"], o["NF4_SMEM"]) == (16, 2048, 32, 0)
    assert with_nf4_table(o, words, "linear") == o
    for n_out in (6144, 2048):
        few = gemv_config(n_out, True, nf4=True, num_tokens=3)
        assert (few["BLOCK_N"], few["BLOCK_K"], few["num_warps"], few["NF4_SMEM"]) == (8, 512, 4, 0)
        assert gemv_config(n_out, True, num_tokens=3) == gemv_config(n_out, True)  # bf16: one config
        for cfg in (gemv_config(n_out, True, nf4=True), few):
            assert cfg["BLOCK_K"] % 64 == 0 and cfg["BLOCK_K"] // 8 < 32 * cfg["num_warps"] <= 1024
    assert gemv_config(6144, False, nf4=True) == gemv_config(6144, False)  # the interpreter's one config
    head = gemv_config(151936, True, nf4=True)  # an NF4 lm_head: 16 rows on 2 warps, `prmt`
    assert (head["BLOCK_N"], head["BLOCK_K"], head["num_warps"], head["NF4_SMEM"]) == (16, 512, 2, 0)
    assert with_nf4_table(head, words, "linear") == head and gemv_config(65535, True, nf4=True) == qkv


@interpreter
def test_float16_rounds_once_and_bad_input_is_named():
    gen = torch.Generator().manual_seed(1)
    x, weight, b = torch.randn(2, 64, generator=gen), torch.randn(24, 64, generator=gen) * 0.1, torch.randn(24)
    got = linear_gemv(x.half(), weight.half(), b.half())
    exact = F.linear(x.half().double(), weight.half().double(), b.half().double())
    assert got.dtype == torch.float16 and (got.double() - exact).abs().max() <= 2e-3 * exact.abs().max()
    assert linear_gemv(x[:0], weight).shape == (0, 24)
    with pytest.raises(ValueError, match="same K"):
        linear_gemv(x, weight[:, :63])
    with pytest.raises(ValueError, match="unit stride"):
        linear_gemv(x, weight.t().contiguous().t())
    with pytest.raises(ValueError, match="must be torch.float32"):
        linear_gemv(x, weight.half())
    with pytest.raises(ValueError, match="bias must be"):
        linear_gemv(x, weight, b[:5])


@pytest.mark.gpu
def test_gpu_bf16_matches_f_linear():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(2)
    for tokens, n_out, k_dim in ((1, 6144, 2048), (1, 61, 2048), (4, 2048, 2048), (2, 100, 1000)):
        x = torch.randn(tokens, k_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        weight = torch.randn(n_out, k_dim, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
        b = torch.randn(n_out, device="cuda", generator=gen, dtype=torch.bfloat16)
        exact = F.linear(x.double(), weight.double(), b.double())
        got = linear_gemv(x, weight, b)
        assert (got.double() - exact).norm() / exact.norm() < 1e-2
        assert (got.double() - exact).norm() <= 1.5 * (F.linear(x, weight, b).double() - exact).norm() + 1e-6


@interpreter
@pytest.mark.parametrize("out_features, in_features, tokens", [(96, 128, 1), (40, 192, 3), (24, 320, 2)])
def test_nf4_linear4bit_through_the_gemv_equals_bitsandbytes_dequantize(out_features, in_features, tokens):
    """A bitsandbytes NF4 Linear4bit seen through `linear4bit_nf4` (a view of its own storage):
    it dequantizes to exactly bitsandbytes' weight, and `linear_gemv` on it equals F.linear on
    that weight. Rows that are not whole 64-blocks get no view (bitsandbytes' own CPU
    dequantization of such a [24, 96] weight disagrees with its forward), so the module's own
    forward runs them."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from moelab.quant import dequantize_nf4, linear4bit_nf4, linear_to_nf4

    gen = torch.Generator().manual_seed(out_features + in_features)
    linear = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.05)
    q = linear_to_nf4(linear, torch.float32)
    view = linear4bit_nf4(q)
    assert view.shape == (1, out_features, in_features) and view.codes.data_ptr() == q.weight.data_ptr()
    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    assert torch.equal(dequantize_nf4(view)[0], weight)
    assert torch.equal(nf4_to_dense(view)[0], weight)  # the one-kernel dequantize NF4 prefills use on CUDA
    assert linear4bit_nf4(q) is view  # cached
    x = torch.randn(tokens, in_features, generator=gen)
    got = linear_gemv(x, view, q.bias)
    expected = F.linear(x.double(), weight.double(), q.bias.double())
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert linear4bit_nf4(linear) is None  # not a Linear4bit
    assert linear4bit_nf4(linear_to_nf4(torch.nn.Linear(96, 24), torch.float32)) is None
    with pytest.raises(ValueError, match="same K"):
        linear_gemv(x[:, :-2], view)


@pytest.mark.gpu
@pytest.mark.parametrize("out_features, in_features", [(2048, 2048), (5632, 2048), (2048, 5632), (61, 2048)])
def test_gpu_nf4_linear4bit_matches_dequantize_then_matmul(out_features, in_features):
    """Qwen1.5-MoE's NF4 projections (q/k/v/o, the shared expert's gate, up and down, a
    61-row one) through the CUDA word path (`NF4_DOT_ASM`: bf16 levels and products) against
    F.linear on bitsandbytes' dequantized bf16 weight, within 1e-2 relative, at 1-4 tokens;
    the bias is added once."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from moelab.quant import linear4bit_nf4, linear_to_nf4

    torch.manual_seed(out_features)
    linear = torch.nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    q = linear_to_nf4(linear, torch.bfloat16)
    view = linear4bit_nf4(q)
    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    for tokens in (1, 3, 4):
        x = torch.randn(tokens, in_features, device="cuda").bfloat16()
        got = linear_gemv(x, view, q.bias)
        expected = F.linear(x.float(), weight, q.bias.float())
        err = float((got.float() - expected).norm() / expected.norm())
        assert err < 1e-2, f"relative error {err:.2e} at {tokens} tokens"


@pytest.mark.gpu
@pytest.mark.parametrize("out_features, in_features", [(2048, 2048), (5632, 2048), (2048, 5632)])
def test_gpu_nf4_prefill_linear_dequantizes_to_bitsandbytes_weight(out_features, in_features, monkeypatch):
    """A prefill's NF4 Linear4bit (`moelab.model._linear`, from NF4_DEQUANT_MIN_TOKENS tokens, with
    the tensor-core linear off): moelab's one-kernel dequantize gives exactly bitsandbytes' bf16
    weight, so the product matches F.linear on it (cuBLAS both ways) and bitsandbytes' own forward
    within 1e-2 relative, at 16, 37 and 64 tokens; below the threshold the module's own forward
    runs. With it on (`moelab.kernels.nf4_mma.linear`) within 1e-2 too."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    import moelab.model as model_module
    from moelab.kernels import nf4_mma
    from moelab.quant import linear4bit_nf4, linear_to_nf4

    torch.manual_seed(out_features + 7)
    linear = torch.nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    q = linear_to_nf4(linear, torch.bfloat16)
    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    assert torch.equal(nf4_to_dense(linear4bit_nf4(q))[0], weight)
    for tokens in (16, 37, 64):
        x = torch.randn(tokens, in_features, device="cuda").bfloat16()
        monkeypatch.setattr(nf4_mma, "LINEAR_MAX_TOKENS", 64)
        mma = model_module._linear(q, x)
        monkeypatch.setattr(nf4_mma, "LINEAR_MAX_TOKENS", 0)
        got = model_module._linear(q, x)
        assert torch.equal(got, F.linear(x, weight, q.bias))
        exact = F.linear(x.float(), weight.float(), q.bias.float())
        for other in (got, mma, q(x)):
            err = float((other.float() - exact).norm() / exact.norm())
            assert err < 1e-2, f"relative error {err:.2e} at {tokens} tokens"
    monkeypatch.setattr(nf4_mma, "LINEAR_MAX_TOKENS", 0)
    x = torch.randn(8, in_features, device="cuda").bfloat16()
    assert torch.equal(model_module._linear(q, x), q(x))
