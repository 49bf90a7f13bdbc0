"""`moelab.patch`: transformers' Qwen2-MoE routed through moelab gives the same routers and tokens."""

import importlib

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

import moelab
from moelab.models import PRESETS, random_model

patch_module = importlib.import_module("moelab.patch")  # `moelab.patch` itself is the function
router_module = importlib.import_module("moelab.kernels.router")

PROMPTS = ["def ", "import os\n", "class Foo(", "    return "]
NEW_TOKENS = 32


pytestmark = pytest.mark.usefixtures("one_thread")



def routers(model):
    return [m for m in model.modules() if isinstance(m, Qwen2MoeTopKRouter)]


def is_original(router):
    return ("forward" not in router.__dict__ and router.forward.__func__ is Qwen2MoeTopKRouter.forward
            and not hasattr(router, "_moelab_patched"))


def greedy(model, tok, prompt, new_tokens=NEW_TOKENS):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def router_outputs(model, input_ids):
    """Every router's (router_logits, top_values, top_indices), captured by forward hooks."""
    captured = []
    hooks = [r.register_forward_hook(lambda mod, args, out: captured.append(out)) for r in routers(model)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == len(routers(model))
    return captured


# ------------------------------------------------------------------ same tokens, same routers


def test_greedy_tokens_identical_with_and_without_patch(tiny, monkeypatch):
    model, tok = tiny
    expected = [greedy(model, tok, p) for p in PROMPTS]
    assert len({tuple(t) for t in expected}) == len(PROMPTS), "prompts should give different continuations"
    calls = count_calls(monkeypatch, patch_module, "route")
    with moelab.patch(model):
        got = [greedy(model, tok, p) for p in PROMPTS]
    # Prefill plus every decode step went through moelab's router, in every layer.
    assert len(calls) == len(PROMPTS) * NEW_TOKENS * model.config.num_hidden_layers
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert len(g) == NEW_TOKENS
        assert g == e, f"{prompt!r}: {tok.decode(e)!r} != {tok.decode(g)!r}"
    assert all(is_original(r) for r in routers(model))


def test_greedy_tokens_identical_with_the_triton_kernel(tiny, monkeypatch):
    """The kernel under the Triton interpreter on the CPU: slow, so one short prompt."""
    model, tok = tiny
    expected = greedy(model, tok, "def ", new_tokens=6)
    kernel_calls = count_calls(monkeypatch, router_module, "router_topk")
    with moelab.patch(model, backend="triton"):
        got = greedy(model, tok, "def ", new_tokens=6)
    assert got == expected
    assert len(kernel_calls) == 6 * model.config.num_hidden_layers


def compare_routers(model, input_ids, backend="auto"):
    ref = router_outputs(model, input_ids)
    with moelab.patch(model, backend=backend):
        out = router_outputs(model, input_ids)
    for layer, ((logits_r, w_r, i_r), (logits, w, i)) in enumerate(zip(ref, out)):
        for a, b in ((logits_r, logits), (w_r, w), (i_r, i)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"layer {layer}"
        assert torch.equal(logits, logits_r), f"layer {layer}: router logits differ"
        yield layer, logits_r, (w_r, i_r), (w, i)


@pytest.mark.parametrize("which", ["tiny", "random, norm_topk_prob", "random, dense layers"])
def test_router_outputs_identical_per_layer(tiny, which):
    if which == "tiny":
        model = tiny[0]
    else:
        extra = {"norm_topk_prob": True} if "norm" in which else {"mlp_only_layers": [0], "decoder_sparse_step": 2}
        model = random_model(Qwen2MoeConfig(**{**PRESETS["tiny"], "initializer_range": 0.1, **extra}), seed=7)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (3, 41), generator=g)
    layers = 0
    for layer, _, (w_r, i_r), (w, i) in compare_routers(model, input_ids):
        layers += 1
        assert w.dtype == torch.float32 and i.dtype == torch.int64
        assert torch.equal(i, i_r), f"layer {layer}: top-k ids differ"
        torch.testing.assert_close(w, w_r, rtol=0, atol=1e-6)
        if model.config.norm_topk_prob:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]), rtol=0, atol=1e-6)
    # With decoder_sparse_step=2 layers 1 and 3 are sparse ((i + 1) % 2 == 0), 0 and 2 dense.
    expected_layers = {"tiny": 4, "random, norm_topk_prob": 4, "random, dense layers": 2}[which]
    assert layers == expected_layers


def test_router_outputs_in_bfloat16():
    """bf16 logits tie: where the top-(k+1) probabilities are all distinct the ids must agree.

    Each router gets the same hidden states with and without the patch (captured from the
    unpatched forward): over a whole forward one tie in a layer changes the next layer's input.
    """
    model = moelab.load("tiny", dtype=torch.bfloat16)[0]
    input_ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    inputs = []
    hooks = [r.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for r in routers(model)]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    k, ties = model.config.num_experts_per_tok, 0
    with torch.no_grad():
        expected = [r(x) for r, x in zip(routers(model), inputs)]
        with moelab.patch(model):
            got = [r(x) for r, x in zip(routers(model), inputs)]
    for layer, ((logits_r, w_r, i_r), (logits, w, i)) in enumerate(zip(expected, got)):
        assert logits.dtype == w.dtype == w_r.dtype == torch.bfloat16 and i.dtype == i_r.dtype == torch.int64
        assert torch.equal(logits, logits_r), f"layer {layer}: router logits differ"
        top = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values[:, :k + 1]
        distinct = (top[:, :-1] > top[:, 1:]).all(dim=-1)
        assert distinct.float().mean() > 0.5
        assert torch.equal(i[distinct], i_r[distinct]), f"layer {layer}: ids differ on a row without ties"
        # Elsewhere the ids may differ only among tied experts, so the weights match everywhere
        # (to one bf16 rounding step, in case the float32 softmaxes differ in the last bit).
        torch.testing.assert_close(w.float(), w_r.float(), rtol=2 ** -8, atol=0)
        ties += int((~distinct).sum())
    print(f"bf16: {ties} of {len(inputs) * inputs[0].shape[0]} router rows have a tie in the top {k + 1}")


# ------------------------------------------------------------------ install and remove


def test_remove_restores_the_original_forward(tiny):
    model = tiny[0]
    rs = routers(model)
    assert len(rs) == model.config.num_hidden_layers and all(is_original(r) for r in rs)
    handle = moelab.patch(model)
    assert handle.active and handle.routers == rs
    assert all("forward" in r.__dict__ and r._moelab_patched for r in rs)
    handle.remove()
    assert not handle.active and all(is_original(r) for r in rs)
    handle.remove()  # idempotent
    assert all(is_original(r) for r in rs)
    with moelab.patch(model):  # and it can be installed again
        assert all("forward" in r.__dict__ for r in rs)
    assert all(is_original(r) for r in rs)


def test_context_manager_restores_on_error(tiny):
    model = tiny[0]
    with pytest.raises(KeyError, match="boom"):
        with moelab.patch(model) as handle:
            assert handle.active
            raise KeyError("boom")
    assert not handle.active and all(is_original(r) for r in routers(model))


def test_patching_twice_is_refused_and_leaves_the_first_patch(tiny):
    model = tiny[0]
    with moelab.patch(model) as first:
        patched = [r.__dict__["forward"] for r in routers(model)]
        with pytest.raises(RuntimeError, match="already patched"):
            moelab.patch(model)
        assert [r.__dict__["forward"] for r in routers(model)] == patched
        assert first.active
    assert all(is_original(r) for r in routers(model))


def test_an_instance_forward_is_kept_and_restored(tiny):
    model, tok = tiny
    router = routers(model)[0]
    calls = []

    def own_forward(hidden):
        calls.append(1)
        return Qwen2MoeTopKRouter.forward(router, hidden)

    router.forward = own_forward
    try:
        with moelab.patch(model):
            greedy(model, tok, "x", new_tokens=1)
            assert calls == [], "the patch must replace the instance forward while installed"
        assert router.__dict__["forward"] is own_forward
        greedy(model, tok, "x", new_tokens=1)
        assert calls == [1]
    finally:
        del router.forward
    assert is_original(router)


def test_patch_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="backend must be 'auto', 'triton' or 'torch', got 'cuda'"):
        moelab.patch(tiny[0], backend="cuda")
    assert all(is_original(r) for r in routers(tiny[0]))
    dense = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no Qwen2MoeTopKRouter found in Qwen2ForCausalLM"):
        moelab.patch(dense)
    with pytest.raises(ValueError, match="no Qwen2MoeTopKRouter found in Linear"):
        moelab.patch(torch.nn.Linear(2, 2))
