"""The router kernel against the reference, and the reference against first principles."""

import os

import pytest
import torch

import moelab
from moelab.routing import route_reference

INTERP = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_same(logits, top_k, normalize):
    w_ref, i_ref = route_reference(logits, top_k, normalize)
    w, i = moelab.route(logits, top_k, normalize, backend="triton")
    assert w.dtype == torch.float32 and i.dtype == torch.int32
    assert w.shape == i.shape == (logits.shape[0], top_k)
    assert torch.equal(i.cpu(), i_ref.cpu()), "ids differ from the reference"
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=0, atol=1e-6)
    assert int(i.min()) >= 0 and int(i.max()) < logits.shape[1]


# (tokens, experts, top_k): includes Qwen1.5-MoE's (1, 60, 4), the tiny model's 16/4,
# odd sizes that are no power of two, rows that do not fill a block, and 256 experts.
CASES = [(1, 60, 4), (7, 60, 4), (33, 16, 4), (5, 1, 1), (19, 3, 3), (130, 64, 8),
         (3, 256, 8), (70, 100, 6), (2, 256, 256), (1, 2, 1)]


@pytest.mark.parametrize("tokens,experts,top_k", CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_kernel_matches_reference_fp32(tokens, experts, top_k, normalize):
    logits = torch.randn(tokens, experts, device=DEVICE) * 3
    _check_same(logits, top_k, normalize)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_dtypes(dtype):
    # bf16 logits tie often: ids must still agree exactly (lowest id wins).
    logits = torch.randn(97, 60, device=DEVICE).to(dtype)
    _check_same(logits, 4, False)
    _check_same(logits, 4, True)


def test_exact_ties_go_to_lower_id():
    logits = torch.zeros(4, 10, device=DEVICE)
    logits[1, [2, 5, 7]] = 1.0  # three-way tie for first place
    logits[2] = torch.tensor([1.0, 3, 3, 1, 3, 0, 0, 0, 0, 0])
    logits[3, :] = float("-inf")
    logits[3, [4, 9]] = 2.0
    w, i = moelab.route(logits, 4, backend="triton")
    expect = torch.tensor([[0, 1, 2, 3], [2, 5, 7, 0], [1, 2, 4, 0], [4, 9, 0, 1]], dtype=torch.int32)
    assert torch.equal(i.cpu(), expect)
    _check_same(logits, 4, False)
    # rows of all-equal logits: ids 0..K-1 and uniform weights 1/E
    torch.testing.assert_close(w[0].cpu(), torch.full((4,), 0.1), rtol=0, atol=1e-7)


def test_reference_does_not_use_topk_order():
    """torch.topk's order on ties is not the contract; the reference's is."""
    logits = torch.ones(3, 64)
    _, ids = route_reference(logits, 8)
    assert torch.equal(ids, torch.arange(8, dtype=torch.int32).expand(3, 8))


def test_nan_and_inf_rows():
    logits = torch.randn(6, 12, device=DEVICE)
    logits[0, 3] = float("nan")                     # NaN counts as -inf
    logits[1, :] = float("-inf")                    # no finite logit: ids 0..K-1, weight 0
    logits[2, :] = float("nan")
    logits[3, [0, 5]] = float("inf")                # +inf counts as the largest float
    logits[4, :10] = float("-inf")                  # fewer finite logits than K
    _check_same(logits, 4, False)
    _check_same(logits, 4, True)
    w, i = moelab.route(logits, 4, backend="triton")
    w, i = w.cpu(), i.cpu()
    assert 3 not in i[0].tolist()
    assert torch.equal(i[1], torch.arange(4, dtype=torch.int32)) and float(w[1].abs().sum()) == 0
    assert torch.equal(i[2], torch.arange(4, dtype=torch.int32)) and float(w[2].abs().sum()) == 0
    assert i[3, :2].tolist() == [0, 5] and abs(float(w[3, 0]) - 0.5) < 1e-6
    assert i[4, :2].tolist() in ([10, 11], [11, 10]) and i[4, 2:].tolist() == [0, 1]
    assert not torch.isnan(w).any()


def test_strided_input():
    base = torch.randn(60, 41, device=DEVICE)
    logits = base.t()  # [41, 60], stride (1, 41): no copy made
    assert not logits.is_contiguous()
    _check_same(logits, 4, False)
    every_other = torch.randn(50, 120, device=DEVICE)[::2, ::2]
    _check_same(every_other, 5, True)


def test_weights_are_softmax_probabilities():
    logits = torch.randn(21, 60, dtype=torch.float64)
    w, i = route_reference(logits, 60)
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(w.double(), probs.gather(1, i.long()), rtol=0, atol=1e-6)
    assert (w[:, :-1] >= w[:, 1:]).all(), "weights must be sorted descending"
    wn, _ = route_reference(logits, 4, normalize=True)
    torch.testing.assert_close(wn.sum(-1), torch.ones(21), rtol=0, atol=1e-6)


def test_matches_transformers_router_without_ties():
    """On float32 logits without ties our ids equal transformers' topk ids."""
    logits = torch.randn(64, 60)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, 4, dim=-1)
    w, i = moelab.route(logits, 4)
    assert torch.equal(i.long(), top_i)
    torch.testing.assert_close(w, top_w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_raises(backend):
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k"):
        moelab.route(logits, 0, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        moelab.route(logits, 9, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        moelab.route(logits[None], 2, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        moelab.route(logits[0], 2, backend=backend)
    with pytest.raises(ValueError, match="float"):
        moelab.route(torch.ones(4, 8, dtype=torch.int64), 2, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        moelab.route(logits, 2, backend="cuda")


def test_empty_token_batch():
    w, i = moelab.route(torch.randn(0, 60, device=DEVICE), 4, backend="triton")
    assert w.shape == i.shape == (0, 4)


def test_auto_backend_picks_reference_on_cpu():
    logits = torch.randn(5, 60)
    w, i = moelab.route(logits, 4)  # auto on a CPU tensor: the reference
    w_ref, i_ref = route_reference(logits, 4)
    assert torch.equal(w, w_ref) and torch.equal(i, i_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096, 65536])
def test_kernel_gpu_large(tokens):
    logits = torch.randn(tokens, 60, device="cuda", dtype=torch.bfloat16)
    _check_same(logits, 4, False)


def _nasty_bf16(tokens, experts, seed):
    """bf16 logits with many exact ties, -inf rows, NaN of both signs, +inf and -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-8, 8, (tokens, experts), generator=g).float() / 4)
    x[::7] = torch.randn(x[::7].shape, generator=g)
    x[3::11] = float("-inf")
    x[5::13, min(2, experts - 1)] = float("nan")
    x[8::23, min(3, experts - 1)] = -float("nan")
    x[6::17, min(1, experts - 1)] = float("inf")
    x[7::19, 0] = -0.0
    return x.to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("tpr,warps", [(None, None), (1, 1), (2, 1), (8, 1), (32, 2)])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 60, 4), (37, 60, 1), (4097, 60, 4), (20000, 60, 8),
                                                  (300, 16, 4), (129, 128, 8), (65, 3, 3), (9, 100, 6)])
@pytest.mark.parametrize("normalize", [False, True])
def test_row_kernel_gpu_matches_reference(tpr, warps, tokens, experts, top_k, normalize):
    """router_rows.py's Gluon kernel (bf16 on CUDA): exact ids and weights within 1e-6 of the
    reference, for every layout the launcher can pick, on ties, NaN, +-inf and -0.0."""
    from moelab.kernels.router_rows import router_topk_rows
    x = _nasty_bf16(tokens, experts, seed=tokens * 1000 + experts + top_k)
    w, i = router_topk_rows(x.cuda(), top_k, normalize, threads_per_row=tpr, num_warps=warps)
    w_ref, i_ref = route_reference(x, top_k, normalize)
    assert torch.equal(i.cpu(), i_ref), "ids differ from the reference"
    torch.testing.assert_close(w.cpu(), w_ref, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_route_picks_row_kernel_for_bf16_on_gpu():
    from moelab.kernels import router_rows
    x = _nasty_bf16(50, 60, seed=1).cuda()
    assert router_rows.supports(x)
    assert not router_rows.supports(x.float()) and not router_rows.supports(x[:, ::2])
    _check_same(x, 4, False)
    _check_same(x[:, 1:], 4, True)  # a strided view: unit stride along experts, odd row start


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is the CPU's")
def test_kernel_runs_when_triton_was_imported_before_moelab():
    """Importing transformers' Qwen2-MoE code (or triton) before moelab used to break the
    interpreter: Triton's own helpers had been built for a GPU."""
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import triton, transformers.models.qwen2_moe.modeling_qwen2_moe\n"
        "import torch, moelab\n"
        "x = torch.randn(37, 60); x[3] = float('-inf'); x[5, :7] = 1.0\n"
        "w, i = moelab.route(x, 4, backend='triton'); rw, ri = moelab.route_reference(x, 4)\n"
        "assert torch.equal(i, ri) and (w - rw).abs().max() < 1e-6\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
