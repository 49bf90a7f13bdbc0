"""moelab.kernels.norm_route: the residual add, RMSNorm, router product and top-k in one launch,
against the three kernels it replaces (interpreter on the CPU, fp32; bf16 and graph replay on a GPU)."""

import pytest
import torch

import moelab
from moelab.kernels import norm_route
from moelab.kernels.norm_route import add_norm_route
from moelab.kernels.rmsnorm import add_rms_norm
from moelab.model import MoeForward
from moelab.routing import route_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def case(tokens, hidden_dim, rows, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # hidden is a column slice of a wider tensor: its rows are strided, its columns contiguous.
    wide = (torch.randn(tokens, hidden_dim + 5, generator=g) * 3).to(device, dtype)
    delta = torch.randn(tokens, hidden_dim, generator=g).to(device, dtype)
    norm_w = (1 + torch.randn(hidden_dim, generator=g) / 4).to(device, dtype)
    router_w = (torch.randn(rows, hidden_dim, generator=g) / hidden_dim ** 0.5).to(device, dtype)
    return wide[:, :hidden_dim], delta, norm_w, router_w


def check(got, hidden, delta, norm_w, router_w, num_experts, top_k, normalize, atol, rtol=0.0):
    total, normed, logits, weights, ids = got
    ref_total, ref_normed = add_rms_norm(hidden, delta, norm_w, 1e-6)
    assert torch.equal(total, ref_total)  # one fp32 add, rounded once, in both
    torch.testing.assert_close(normed, ref_normed, rtol=rtol, atol=atol)
    ref_logits = (normed.float() @ router_w.float().T).to(hidden.dtype)
    torch.testing.assert_close(logits, ref_logits, rtol=rtol, atol=atol)
    # Routed from the kernel's own logits: the same ids exactly, the same weights within exp's rounding.
    ref_weights, ref_ids = route_reference(logits[:, :num_experts], top_k, normalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tokens,hidden_dim,rows,num_experts,top_k,normalize", [
    (1, 128, 17, 16, 4, False), (3, 100, 9, 8, 2, True), (4, 33, 61, 60, 4, False), (2, 64, 8, 8, 8, True)])
def test_matches_add_rms_norm_product_and_route(tokens, hidden_dim, rows, num_experts, top_k, normalize):
    hidden, delta, norm_w, router_w = case(tokens, hidden_dim, rows, seed=hidden_dim)
    got = add_norm_route(hidden, delta, norm_w, 1e-6, router_w, num_experts, top_k, normalize)
    check(got, hidden, delta, norm_w, router_w, num_experts, top_k, normalize, atol=2e-6)
    assert norm_route._tickets(hidden.device).eq(0).all()  # every ticket put back for the next call
    for cfg in ({"ROWS": 1}, {"ROWS": 4}):  # the GPU's one row a program, and uneven parts: the same results
        again = add_norm_route(hidden, delta, norm_w, 1e-6, router_w, num_experts, top_k, normalize, cfg=cfg)
        for a, b in zip(again, got):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        assert torch.equal(again[4], got[4])


def test_ties_go_to_the_lower_expert_and_shared_gate_row_is_not_routed():
    """Two router rows equal (their logits tie): the lower id comes first. The last row (the
    shared gate's) gets the largest logit but is not an expert: it is never picked."""
    hidden, delta, norm_w, router_w = case(2, 64, 9, seed=1)
    _, ref_normed = add_rms_norm(hidden, delta, norm_w, 1e-6)
    direction = ref_normed.sum(0) / ref_normed.sum(0).norm()
    router_w[5] = router_w[2] = direction * 3
    router_w[8] = direction * 9
    total, normed, logits, weights, ids = add_norm_route(hidden, delta, norm_w, 1e-6, router_w, 8, 3)
    assert torch.equal(logits[:, 2], logits[:, 5])
    assert (logits[:, 8] > logits[:, :8].max(1).values).all()
    assert ids[:, :2].tolist() == [[2, 5], [2, 5]]
    assert torch.equal(weights[:, 0], weights[:, 1])


def test_bad_input_is_refused_with_a_clear_error():
    hidden, delta, norm_w, router_w = case(2, 32, 9)
    with pytest.raises(ValueError, match="top_k must be"):
        add_norm_route(hidden, delta, norm_w, 1e-6, router_w, 8, 9)
    with pytest.raises(ValueError, match="num_experts must be"):
        add_norm_route(hidden, delta, norm_w, 1e-6, router_w, 10, 2)
    with pytest.raises(ValueError, match="delta"):
        add_norm_route(hidden, delta[:1], norm_w, 1e-6, router_w, 8, 2)
    with pytest.raises(ValueError, match="router_weight must be"):
        add_norm_route(hidden, delta, norm_w, 1e-6, router_w[:, :16], 8, 2)
    with pytest.raises(ValueError, match="norm_weight must be"):
        add_norm_route(hidden, delta, norm_w.double(), 1e-6, router_w, 8, 2)
    with pytest.raises(ValueError, match="up to 64 tokens"):
        big = case(norm_route.MAX_TOKENS + 1, 32, 9)
        add_norm_route(*big[:3], 1e-6, big[3], 8, 2)


def greedy_decode(fwd, prompts, steps):
    cache = fwd.new_cache(num_slots=len(prompts), max_seq_len=32)
    slots = [cache.allocate(32) for _ in prompts]
    logits = fwd.prefill(cache, prompts, slots)
    token, out = logits.argmax(-1), []
    for _ in range(steps):
        step = fwd.decode(cache, token, torch.tensor(slots))
        out.append(step)
        token = step.argmax(-1)
    return torch.stack(out)


def test_moeforward_decode_runs_it_and_keeps_the_logits(monkeypatch):
    """tiny through MoeForward with the fused projections, the norm and router kernels and moelab's
    experts (the interpreter): steps of up to `gemv.MAX_TOKENS` tokens (a 4-token prefill, decode
    steps of 1 and 3 tokens; not the 6-token prefill) take the one launch in every layer and give
    the logits of the three-kernel path."""
    from moelab.kernels.experts import fused_experts_forward

    model, _ = moelab.load("tiny")
    calls = []
    original = norm_route.add_norm_route
    monkeypatch.setattr(norm_route, "add_norm_route", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    runs = {}
    for enabled in (True, False):
        monkeypatch.setattr(norm_route, "ENABLED", enabled)
        fwd = MoeForward(model, experts_fn=fused_experts_forward, projections="fused", norm="kernel",
                         route_backend="triton", attention="sdpa")
        runs[enabled] = [greedy_decode(fwd, prompts, 2) for prompts in ([[5, 9, 2, 7]], [[1, 2], [3, 4, 5], [6]])]
    layers = model.config.num_hidden_layers
    assert calls == [4] * layers + [1] * 2 * layers + [3] * 2 * layers  # the enabled runs only, every layer
    for got, ref in zip(runs[True], runs[False]):
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_gpu_bf16_matches_and_replays_in_a_graph():
    """bf16 on CUDA at Qwen1.5-MoE's shape (2,048 wide, 60 experts + the shared gate, top-4), then
    the same call captured in a CUDA graph and replayed on new inputs: the tickets reset each time."""
    hidden, delta, norm_w, router_w = case(1, 2048, 61, torch.bfloat16, "cuda", seed=4)
    got = add_norm_route(hidden, delta, norm_w, 1e-6, router_w, 60, 4)
    check(got, hidden, delta, norm_w, router_w, 60, 4, False, atol=2e-2, rtol=1.6e-2)  # a bf16 step either way
    static = [t.clone() for t in (hidden, delta)]
    add_norm_route(*static, norm_w, 1e-6, router_w, 60, 4)  # warm up (and make the tickets) outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = add_norm_route(*static, norm_w, 1e-6, router_w, 60, 4)
    for seed in (5, 6, 7):
        fresh = case(1, 2048, 61, torch.bfloat16, "cuda", seed=seed)
        static[0].copy_(fresh[0])
        static[1].copy_(fresh[1])
        graph.replay()
        eager = add_norm_route(fresh[0], fresh[1], norm_w, 1e-6, router_w, 60, 4)
        for a, b in zip(out, eager):
            assert torch.equal(a, b)
    assert norm_route._tickets(hidden.device).eq(0).all()
