"""The fused residual add + RMSNorm kernel against moelab.model.rms_norm and transformers'
Qwen2MoeRMSNorm (interpreter on the CPU, fp32), bf16 on a GPU."""

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRMSNorm

from moelab.kernels.rmsnorm import add_rms_norm
from moelab.model import rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def case(rows, cols, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # hidden is a column slice of a wider tensor: its rows are strided, its columns contiguous.
    wide = (torch.randn(rows, cols + 7, generator=g) * 3).to(device, dtype)
    delta = torch.randn(rows, cols, generator=g).to(device, dtype)
    weight = (1 + torch.randn(cols, generator=g) / 4).to(device, dtype)
    return wide[:, :cols], delta, weight


@pytest.mark.parametrize("rows,cols", [(1, 128), (7, 100), (3, 33)])
def test_add_rms_norm_matches_torch(rows, cols):
    hidden, delta, weight = case(rows, cols, seed=rows)
    total, out = add_rms_norm(hidden, delta, weight, 1e-6)
    ref_total = hidden + delta
    assert torch.equal(total, ref_total)  # one fp32 add, rounded once, in both
    torch.testing.assert_close(out, rms_norm(ref_total, weight, 1e-6), rtol=0, atol=2e-6)
    same, normed = add_rms_norm(hidden, None, weight, 1e-5)
    assert same is hidden
    torch.testing.assert_close(normed, rms_norm(hidden, weight, 1e-5), rtol=0, atol=2e-6)
    hf = Qwen2MoeRMSNorm(cols, eps=1e-5)
    hf.weight.data.copy_(weight)
    with torch.no_grad():
        torch.testing.assert_close(normed, hf(hidden), rtol=0, atol=2e-6)


def test_add_rms_norm_bad_input():
    hidden, delta, weight = case(2, 16)
    with pytest.raises(ValueError, match="contiguous in H"):
        add_rms_norm(hidden.t(), None, weight, 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(hidden, delta, weight[:8], 1e-6)
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(hidden, delta.double(), weight, 1e-6)
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(hidden, delta[:1], weight, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_gpu_add_rms_norm_bf16(rows):
    hidden, delta, weight = case(rows, 2048, dtype=torch.bfloat16, device="cuda", seed=rows)
    total, out = add_rms_norm(hidden, delta, weight, 1e-6)
    assert torch.equal(total, hidden + delta)
    ref = rms_norm(hidden + delta, weight, 1e-6)
    # The same roundings; only the order of the fp32 sum of squares differs: at most 1 bf16 ulp.
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-2)
    assert (out != ref).float().mean() < 0.01
