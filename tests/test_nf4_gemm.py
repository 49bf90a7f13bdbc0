"""moelab.kernels.nf4_gemm.linear_nf4_gemm against F.linear on the dequantized weight: irregular
token counts (partial M-tiles), rows that are not a whole N-tile, bias, a bitsandbytes
Linear4bit's own storage and a row slice of a joint weight, bad input; bf16 on the GPU."""

import pytest
import torch
import torch.nn.functional as F

import moelab  # noqa: F401  (sets the Triton interpreter up on a machine without CUDA)
from moelab.kernels.nf4_gemm import MAX_TOKENS, linear_nf4_gemm, nf4_gemm_config
from moelab.quant import dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors); see the gpu test")


@interpreter
@pytest.mark.parametrize("tokens,n_out,k_dim,bias,double", [(5, 40, 128, True, True), (19, 72, 192, False, False),
                                                            (33, 24, 64, True, False)])
def test_matches_f_linear_on_the_dequantized_weight(tokens, n_out, k_dim, bias, double):
    gen = torch.Generator().manual_seed(tokens * 1000 + n_out)
    w = quantize_nf4(torch.randn(1, n_out, k_dim, generator=gen) * 0.05, double_quant=double)
    x = torch.randn(tokens, k_dim, generator=gen)
    b = torch.randn(n_out, generator=gen) if bias else None
    got = linear_nf4_gemm(x, w, b)
    expected = F.linear(x.double(), dequantize_nf4(w)[0].double(), None if b is None else b.double())
    assert got.shape == (tokens, n_out) and got.dtype == torch.float32
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@interpreter
def test_linear4bit_storage_and_a_row_slice_of_a_joint_weight():
    """A bitsandbytes Linear4bit through `linear4bit_nf4` (its own storage, double-quantized
    absmax) equals its own forward; a jointly quantized weight's row slice (k_proj of q/k/v)
    equals that slice of the dequantized whole."""
    pytest.importorskip("bitsandbytes")
    from moelab.quant import linear4bit_nf4, linear_to_nf4, linears_to_nf4_jointly

    gen = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=gen) * 0.05)
    q = linear_to_nf4(linear, torch.float32)
    x = torch.randn(21, 128, generator=gen)
    got = linear_nf4_gemm(x, linear4bit_nf4(q), q.bias)
    torch.testing.assert_close(got, q(x), rtol=1e-5, atol=1e-5)

    linears = [torch.nn.Linear(256, rows) for rows in (64, 64, 32)]  # whole nested absmax blocks a linear
    modules, joint = linears_to_nf4_jointly(linears, torch.float32)
    x = torch.randn(21, 256, generator=gen)
    whole = F.linear(x, dequantize_nf4(joint.weight)[0], joint.bias)
    torch.testing.assert_close(linear_nf4_gemm(x, joint.weight, joint.bias), whole, rtol=1e-5, atol=1e-5)
    k = linear_nf4_gemm(x, linear4bit_nf4(modules[1]), modules[1].bias)
    torch.testing.assert_close(k, whole[:, 64:128], rtol=1e-5, atol=1e-5)


@interpreter
def test_bad_input_is_named():
    w = quantize_nf4(torch.randn(1, 16, 128) * 0.05)
    x = torch.randn(3, 128)
    assert linear_nf4_gemm(x[:0], w).shape == (0, 16)
    with pytest.raises(ValueError, match=r"x must be \[T, 128\]"):
        linear_nf4_gemm(x[:, :64], w)
    with pytest.raises(ValueError, match="NF4Tensor"):
        linear_nf4_gemm(x, torch.randn(16, 128))
    with pytest.raises(ValueError, match=r"one NF4 matrix \[1, N, K\]"):
        linear_nf4_gemm(x, quantize_nf4(torch.randn(2, 16, 128)))
    with pytest.raises(ValueError, match="whole 64-value blocks"):
        linear_nf4_gemm(torch.randn(3, 96), quantize_nf4(torch.randn(1, 16, 96) * 0.05))
    with pytest.raises(ValueError, match="computes in"):
        linear_nf4_gemm(x.double(), w)
    with pytest.raises(ValueError, match="bias must be"):
        linear_nf4_gemm(x, w, torch.randn(15))
    with pytest.raises(ValueError, match="multiple of 64"):
        linear_nf4_gemm(x, w, config=dict(BLOCK_K=96))


def test_configs():
    """One M-tile up to 64 tokens (16 at least), 64-row tiles above; the N-tile shrinks until
    every SM has two programs."""
    assert nf4_gemm_config(5, 2048, True)["BLOCK_M"] == 16
    assert nf4_gemm_config(48, 2048, True)["BLOCK_M"] == 64
    assert nf4_gemm_config(200, 2048, True)["BLOCK_M"] == 64
    assert nf4_gemm_config(16, 2048, True)["BLOCK_N"] == 16  # 128 programs of 16 rows
    assert nf4_gemm_config(16, 5632, True)["BLOCK_N"] == 16  # 352 of 16 (32 rows: 176 < 264)
    assert nf4_gemm_config(200, 5632, True)["BLOCK_N"] == 64  # 4 M-tiles x 88
    assert nf4_gemm_config(200, 2048, True)["BLOCK_N"] == 16  # 4 x 64 of 32 rows: 256 < 264
    assert nf4_gemm_config(MAX_TOKENS, 2048, True, num_sms=100)["BLOCK_N"] == 32
    for tokens in (1, 64, MAX_TOKENS):
        assert nf4_gemm_config(tokens, 2048, True)["BLOCK_K"] % 64 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("out_features, in_features", [(2048, 2048), (5632, 2048), (2048, 5632), (6144, 2048)])
def test_gpu_bf16_matches_dequantize_then_matmul(out_features, in_features):
    """Qwen1.5-MoE's NF4 projections (q/k/v/o, the shared expert's gate, up and down, the joint
    q/k/v) at prefill token counts, against F.linear on bitsandbytes' dequantized weight in
    float32: within 1e-2 relative, and no worse than bf16 F.linear on that weight."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from moelab.quant import linear4bit_nf4, linear_to_nf4

    torch.manual_seed(out_features + in_features)
    linear = torch.nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    q = linear_to_nf4(linear, torch.bfloat16)
    view = linear4bit_nf4(q)
    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    for tokens in (5, 16, 37, 64, 200):
        x = torch.randn(tokens, in_features, device="cuda").bfloat16()
        got = linear_nf4_gemm(x, view, q.bias)
        exact = F.linear(x.double(), weight.double(), q.bias.double())
        err = float((got.double() - exact).norm() / exact.norm())
        ref = float((F.linear(x, weight, q.bias).double() - exact).norm() / exact.norm())
        assert err < 1e-2 and err <= 1.5 * ref + 1e-6, f"relative error {err:.2e} (cuBLAS {ref:.2e}) at {tokens}"
