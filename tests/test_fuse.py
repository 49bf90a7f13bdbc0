"""moelab.fuse: q/k/v and the MoE block's inputs as one GEMM each, with no copy of the weights."""

import pytest
import torch

import moelab
from moelab.fuse import fuse_attention_input, fuse_moe_input, fuse_projections
from moelab.model import MoeForward

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_tiny(dtype=torch.float32):
    """A model of its own per test: fusing re-seats its parameters."""
    model, _ = moelab.load("tiny")
    return model.to(dtype)


def storage_bytes(model) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def greedy(fwd, prompts, new_tokens):
    cache = fwd.new_cache(num_slots=len(prompts) + 1, max_seq_len=64)
    slots = [cache.allocate(64) for _ in prompts]
    logits = [fwd.prefill(cache, prompts, slots)]
    token = logits[0].argmax(-1)
    tokens = [token]
    for _ in range(new_tokens - 1):
        logits.append(fwd.decode(cache, token, torch.tensor(slots)))
        token = logits[-1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1), logits


def test_fused_params_are_views_and_transformers_output_is_unchanged():
    model = fresh_tiny()
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bytes_before = storage_bytes(model)
    layers = model.config.num_hidden_layers
    assert fuse_projections(model) == 2 * layers
    assert storage_bytes(model) == bytes_before  # no copy kept
    for name, p in model.named_parameters():
        assert torch.equal(p, weights_before[name]), name
    layer = model.model.layers[1]
    qkv = fuse_attention_input(layer.self_attn)  # idempotent: the same fused tensors come back
    assert qkv is layer.self_attn._moelab_fused_qkv
    assert layer.self_attn.k_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    moe = fuse_moe_input(layer.mlp)
    cfg = model.config
    assert moe.sizes == (cfg.shared_expert_intermediate_size, cfg.shared_expert_intermediate_size, cfg.num_experts, 1)
    assert layer.mlp.gate.weight.untyped_storage().data_ptr() == moe.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_fused_forward_matches_separate_and_keeps_greedy_tokens():
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 19, 1, 33)]
    model = fresh_tiny()
    separate_tokens, separate_logits = greedy(MoeForward(model, projections="separate"), prompts, 12)
    fwd = MoeForward(model, projections="fused")
    assert all(f is not None for f in fwd.fused_qkv + fwd.fused_moe_input)
    fused_tokens, fused_logits = greedy(fwd, prompts, 12)
    assert torch.equal(fused_tokens, separate_tokens)
    for a, b in zip(fused_logits, separate_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_model_cast_after_its_forward_was_built_is_fused_again():
    """model.double() replaces the parameters with copies that are no longer views of the
    fused tensors: the next step fuses again, in the new dtype, and stays right."""
    model = fresh_tiny()
    prompts = [[4, 8, 15, 16, 23, 42], [1, 2]]
    fwd = MoeForward(model, projections="fused")
    old = fwd.fused_qkv[0].weight
    model.double()
    new = fwd.fused_qkv[0].weight
    assert new.dtype == torch.float64 and new.data_ptr() != old.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr() == new.untyped_storage().data_ptr()
    tokens, logits = greedy(fwd, prompts, 6)
    expected_tokens, expected_logits = greedy(MoeForward(model, projections="separate"), prompts, 6)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits[-1], expected_logits[-1], rtol=1e-9, atol=1e-9)


def test_memory_report_counts_fused_weights_once():
    model = fresh_tiny()
    before = moelab.memory_report(model)
    fuse_projections(model)
    after = moelab.memory_report(model)
    for part in ("attention", "shared expert", "other"):
        assert after[part]["bytes"] == before[part]["bytes"], part


def test_auto_fuses_only_on_cuda_and_bad_values_are_named():
    model = fresh_tiny()
    assert MoeForward(model).projections == "separate"  # CPU
    assert not hasattr(model.model.layers[0].self_attn, "_moelab_fused_qkv")
    with pytest.raises(ValueError, match="projections must be"):
        MoeForward(model, projections="merged")


def test_quantized_layers_fuse_only_where_quantized_jointly_and_still_run():
    """NF4 Linear4bit layers cannot be concatenated after the fact; moelab quantizes q/k/v and
    the shared gate/up jointly where block sizes allow (quant.JointNF4). tiny's k/v rows (64 x
    128 values) do not fill a 256-block of absmax values: its q/k/v stay separate. Its shared
    gate/up are joint: the MoE input is that NF4 tensor beside the router and shared gate, fused
    in full precision. On the CPU the NF4 layers then run one by one, with the same tokens."""
    pytest.importorskip("bitsandbytes")
    model, _ = moelab.load("tiny", quantize="nf4")
    fwd = MoeForward(model, projections="fused", route_backend="torch", attention="sdpa")
    assert fwd.fused_qkv == [None] * len(fwd.layers)
    for layer, fused in zip(fwd.layers, fwd.fused_moe_input):
        assert fused.nf4_gate_up.shape == (1, 768, 128) and fused.sizes == (16, 1)
        assert fused.weight.shape == (17, 128) and layer.mlp.gate.weight.data_ptr() == fused.weight.data_ptr()
    prompts = [[1, 2, 3, 4], [7, 8]]
    tokens, _ = greedy(fwd, prompts, 4)
    reference, _ = greedy(MoeForward(model, projections="separate", route_backend="torch", attention="sdpa"),
                          prompts, 4)
    assert torch.equal(tokens, reference)


def test_save_pretrained_after_fusing_reloads_the_same_model(tmp_path):
    model = fresh_tiny()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    fuse_projections(model)
    model.save_pretrained(tmp_path)
    reloaded, _ = moelab.load(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded.float()(ids).logits, expected)


def test_auto_fuses_small_steps_only():
    model = fresh_tiny()
    fwd = MoeForward(model, projections="fused")
    fwd.projections = "auto"  # what "auto" resolves to on CUDA
    assert fwd._fuse(1) and fwd._fuse(moelab.model.FUSED_MAX_TOKENS)
    assert not fwd._fuse(moelab.model.FUSED_MAX_TOKENS + 1)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6]]  # batch 1: prefill separate (8 tokens), decode fused
    tokens, _ = greedy(fwd, prompts, 8)
    assert torch.equal(tokens, greedy(MoeForward(model, projections="separate"), prompts, 8)[0])


@pytest.mark.gpu
def test_gpu_fused_decode_matches_separate():
    """fp32 greedy tokens of the fused projections equal the separate ones on CUDA."""
    model, _ = moelab.load("tiny", device="cuda")
    model = model.float()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    separate, _ = greedy(MoeForward(model, projections="separate"), prompts, 16)
    assert MoeForward(model).projections == "auto"
    fused, _ = greedy(MoeForward(model, projections="fused"), prompts, 16)
    assert torch.equal(fused, separate)


def test_nf4_qkv_quantized_jointly_where_the_blocks_allow():
    """With as many k/v heads as query heads, tiny's q/k/v (128 rows each, 256 absmax blocks)
    are quantized as one NF4 tensor: each Linear4bit holds views of it, the joint weight
    dequantizes to exactly the three modules' weights stacked, and MoeForward's fused path (on
    the CPU: the joint weight dequantized, one GEMM) gives the logits of the separate one."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from moelab.models import preset_config, random_nf4_model
    from moelab.quant import dequantize_nf4

    config = preset_config("tiny")
    config.num_key_value_heads = config.num_attention_heads
    model = random_nf4_model(config, "cpu", torch.float32, seed=5)
    attn = model.model.layers[1].self_attn
    fwd = MoeForward(model, projections="fused", route_backend="torch", attention="sdpa")
    fused = fwd.fused_qkv[1]
    assert fused.sizes == (128, 128, 128) and fused.weight.shape == (1, 384, 128)
    parts = [bnbf.dequantize_4bit(p.weight.data, p.weight.quant_state) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert torch.equal(dequantize_nf4(fused.weight)[0], torch.cat(parts))
    assert fused.bias.data_ptr() == attn.q_proj.bias.data_ptr()
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    got = MoeForward(model, projections="fused", route_backend="torch", attention="sdpa")
    ref = MoeForward(model, projections="separate", route_backend="torch", attention="sdpa")
    logits = []
    for f in (got, ref):
        cache = f.new_cache(2, 16)
        slots = [cache.allocate(8), cache.allocate(8)]
        logits.append(torch.cat(f.prefill(cache, prompts, slots, all_logits=True)))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_nf4_shared_expert_folds_through_moeforward(monkeypatch):
    """MoeForward hands an NF4 layer's shared expert to the experts function as a `SharedExpert`
    of NF4 weights (the joint gate/up, down_proj seen as NF4; `model._foldable_shared`), as it
    does a bf16 one; the CPU path keeps its modules. Forced here (nf4_ok) with moelab's fused
    experts function under the interpreter: the logits of the separate modules."""
    pytest.importorskip("bitsandbytes")
    import moelab.model as model_module
    from moelab.kernels.experts import fused_experts_forward
    from moelab.quant import linear4bit_nf4

    model, _ = moelab.load("tiny", quantize="nf4")
    mlp = model.model.layers[0].mlp
    fused = fuse_moe_input(mlp)
    assert model_module._foldable_shared(mlp, fused, nf4_ok=False) is None
    gate_up, down, router_weight, sizes = model_module._foldable_shared(mlp, fused, nf4_ok=True)
    assert gate_up is fused.nf4_gate_up and down is linear4bit_nf4(mlp.shared_expert.down_proj)
    assert router_weight is fused.weight and sizes == (16, 1)
    calls = []
    original = model_module._foldable_shared
    monkeypatch.setattr(model_module, "_foldable_shared",
                        lambda m, f, nf4_ok: calls.append(1) or original(m, f, nf4_ok=True))
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    logits = []
    for projections in ("fused", "separate"):
        f = MoeForward(model, experts_fn=fused_experts_forward, projections=projections, route_backend="torch",
                       attention="sdpa")
        cache = f.new_cache(2, 16)
        slots = [cache.allocate(8), cache.allocate(8)]
        logits.append(torch.cat(f.prefill(cache, prompts, slots, all_logits=True)))
    assert len(calls) == len(model.model.layers)  # the fused run folded every layer's shared expert
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_nf4_fused_decode_matches_the_separate_modules():
    """On CUDA, one token per step: the NF4 fused path (joint q/k/v as one NF4 GEMV, o_proj and
    the shared down through moelab's GEMV, the shared expert in the experts' decode kernels)
    gives the logits of the separate bitsandbytes modules within bf16 noise, for a model whose
    q/k/v are joint and for tiny (shared gate/up joint only)."""
    pytest.importorskip("bitsandbytes")
    from moelab.models import preset_config, random_nf4_model

    config = preset_config("tiny")
    config.num_key_value_heads = config.num_attention_heads
    for model in (random_nf4_model(config, "cuda", torch.bfloat16, seed=5),
                  moelab.load("tiny", quantize="nf4", device="cuda", dtype=torch.bfloat16)[0]):
        runs = []
        for projections in ("fused", "separate"):
            fwd = MoeForward(model, projections=projections)
            cache = fwd.new_cache(2, 32)
            slot = cache.allocate(16)
            fwd.prefill(cache, [[3, 1, 4, 1, 5]], [slot])
            steps = [fwd.decode(cache, torch.tensor([t], device="cuda"), torch.tensor([slot], device="cuda"))
                     for t in (9, 2, 6)]
            runs.append(torch.cat(steps).float())
        err = float((runs[0] - runs[1]).norm() / runs[1].norm())
        assert err < 2e-2, f"fused NF4 decode differs from the modules by {err:.2e}"


def test_nf4_joint_groups_stop_fusing_once_a_module_no_longer_holds_views():
    """A JointNF4 is used only while every module still holds its views: a weight replaced
    (as a move or a cast would) makes fusing fall back to the separate modules."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model, _ = moelab.load("tiny", quantize="nf4")
    mlp = model.model.layers[0].mlp
    assert fuse_moe_input(mlp).nf4_gate_up is not None
    gate = mlp.shared_expert.gate_proj
    gate.weight = bnb.nn.Params4bit(gate.weight.data.clone(), requires_grad=False, quant_state=gate.weight.quant_state,
                                    blocksize=64, compress_statistics=True, quant_type="nf4", bnb_quantized=True,
                                    module=gate)
    assert not mlp.shared_expert._moelab_nf4_gate_up.seats([gate, mlp.shared_expert.up_proj])
    assert fuse_moe_input(mlp) is None  # Linear4bit: not fusable on their own
