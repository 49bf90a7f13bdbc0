"""moelab.load(..., quantize="nf4"): what gets quantized, memory, quality against float32,
layer-by-layer loading from random weights and from checkpoints, and memory_report.
GPU tests (`-m gpu`): the full-size preset's memory bounds and bitsandbytes-identical codes on CUDA."""

import json

import pytest
import torch
from torch import nn

import moelab
from moelab.models import preset_config
from moelab.quant import (NF4Experts, dequantize_nf4, memory_report, quantize_layer_, quantize_nf4)
from moelab.train import build_corpus, eval_windows

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_nf4():
    return moelab.load("tiny", quantize="nf4")


def test_what_is_quantized(tiny_nf4):
    model, _ = tiny_nf4
    for layer in model.model.layers:
        assert isinstance(layer.mlp.experts, NF4Experts)
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.shared_expert.down_proj):
            assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.quant_state.quant_type == "nf4"
            assert linear.weight.quant_state.nested and linear.weight.quant_state.blocksize == 64
        assert type(layer.mlp.shared_expert_gate) is nn.Linear and layer.mlp.shared_expert_gate.weight.dtype == torch.float32
        assert layer.mlp.gate.weight.dtype == torch.float32  # the router
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32


def test_routed_expert_bytes_at_most_0_3_of_fp16(tiny_nf4):
    model, _ = tiny_nf4
    report = memory_report(model)
    experts = report["routed experts"]
    config = model.config
    weights = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    assert experts["weights"] == weights
    assert experts["bytes"] <= 0.3 * 2 * weights
    assert 4.1 < experts["bits_per_weight"] < 4.2 and experts["storage"] == "nf4"
    assert report["attention"]["storage"] == "float32+nf4"  # 4-bit weights, float32 biases
    assert report["embeddings and head"]["bits_per_weight"] == 32


def test_codes_are_those_of_the_float32_checkpoint(tiny_nf4):
    model, _ = tiny_nf4
    reference, _ = moelab.load("tiny")
    for layer, ref in zip(model.model.layers, reference.model.layers):
        expected = quantize_nf4(ref.mlp.experts.gate_up_proj.data, backend="bitsandbytes")
        assert torch.equal(layer.mlp.experts.gate_up.codes, expected.codes)
        assert torch.equal(layer.mlp.experts.gate_up.absmax, expected.absmax)
        packed, _ = bnb.functional.quantize_4bit(ref.self_attn.q_proj.weight.data, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
        assert torch.equal(layer.self_attn.q_proj.weight.data, packed)


def held_out_windows():
    """Windows of stdlib files tiny never trained on (moelab.train's split), under 256 positions."""
    corpus = build_corpus(max_bytes=150_000)
    return eval_windows(corpus.held_out, seq_len=200, count=8)


def test_quality_against_float32_on_held_out_text(tiny_nf4):
    model, _ = tiny_nf4
    reference, _ = moelab.load("tiny")
    windows = held_out_windows()
    with torch.no_grad():
        ref = reference(windows[:, :-1]).logits
        got = model(windows[:, :-1]).logits
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    rel_error = ((got - ref).norm() / ref.norm()).item()
    print(f"teacher-forced on {windows.numel()} held-out bytes: top-1 agreement {agreement:.4f}, "
          f"relative logit error {rel_error:.4f}")
    assert agreement >= 0.90
    assert rel_error <= 0.10
    # ...and the error is the quantization's, not noise: random weights disagree almost everywhere.
    random_model, _ = moelab.load("tiny", random_weights=True)
    with torch.no_grad():
        rand = random_model(windows[:, :-1]).logits
    assert (rand.argmax(-1) == ref.argmax(-1)).float().mean() < 0.2


def test_quantized_tiny_generates_and_moelab_forward_runs_it(tiny_nf4):
    model, tok = tiny_nf4
    ids = tok("def ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert len(out[0]) == ids.shape[1] + 12 and text.strip(), text
    # MoeForward runs the same quantized modules: prefill (grouped experts) and decode (pairs).
    fwd = moelab.MoeForward(model, route_backend="torch", attention="sdpa")
    prompts = [list(b"import os\nimport sys\nfrom collections import"), list(b"class A:\n    def __init__(self")]
    cache = fwd.new_cache(num_slots=2, max_seq_len=64)
    slots = [cache.allocate(60), cache.allocate(60)]
    logits = fwd.prefill(cache, prompts, slots, all_logits=True)
    with torch.no_grad():
        for got, prompt in zip(logits, prompts):
            torch.testing.assert_close(got, model(torch.tensor([prompt])).logits[0], rtol=1e-4, atol=1e-4)
    nxt = torch.stack([lg[-1].argmax() for lg in logits])
    step = fwd.decode(cache, nxt, torch.tensor(slots))
    with torch.no_grad():
        for row, prompt, token in zip(step, prompts, nxt.tolist()):
            torch.testing.assert_close(row, model(torch.tensor([prompt + [token]])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_nf4_head_is_an_opt_in_that_moelab_forward_runs(tiny_nf4):
    """quantize="nf4_head": lm_head in NF4 too, the rest as "nf4"; transformers and moelab's forward
    run the same quantized head (prefill and decode), whose codes are bitsandbytes' of the fp32 head."""
    import bitsandbytes.functional as bnbf

    model, tok = moelab.load("tiny", quantize="nf4_head")
    plain, _ = tiny_nf4
    head = model.lm_head
    assert isinstance(head, bnb.nn.Linear4bit) and head.weight.quant_state.quant_type == "nf4"
    assert head.weight.quant_state.nested and tuple(head.weight.quant_state.shape) == (257, 128)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings stay: a look-up per token
    fp32_head = plain.lm_head.weight.detach()
    codes, _ = bnbf.quantize_4bit(fp32_head, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(head.weight.data, codes)
    from moelab.bench import transformers_bnb_4bit_

    theirs = transformers_bnb_4bit_(moelab.load("tiny")[0], torch.float32, quantize_head=True).lm_head
    assert isinstance(theirs, bnb.nn.Linear4bit) and torch.equal(theirs.weight.data, codes)  # transformers' nf4_head
    for a, b in zip(model.model.layers, plain.model.layers):  # everything but the head as "nf4"
        assert torch.equal(a.mlp.experts.gate_up.codes, b.mlp.experts.gate_up.codes)
    ours, theirs = memory_report(model)["embeddings and head"], memory_report(plain)["embeddings and head"]
    assert ours["bytes"] < 0.65 * theirs["bytes"]  # the head at ~4.5 of 32 bits, the embeddings unchanged
    fwd = moelab.MoeForward(model, route_backend="torch", attention="sdpa")
    prompt = list(b"for i in range(")
    cache = fwd.new_cache(num_slots=1, max_seq_len=32)
    slot = cache.allocate(20)
    logits = fwd.prefill(cache, [prompt], [slot], all_logits=True)[0]
    step = fwd.decode(cache, logits[-1:].argmax(-1), torch.tensor([slot]))
    with torch.no_grad():
        ref = model(torch.tensor([prompt + [logits[-1].argmax().item()]])).logits[0]
        torch.testing.assert_close(logits, ref[:-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[0], ref[-1], rtol=1e-4, atol=1e-4)
        # Close to the bf16-head "nf4" model, not equal: 4-bit logits.
        other = plain(torch.tensor([prompt])).logits[0]
    rel = ((ref[:-1] - other).norm() / other.norm()).item()
    assert 0 < rel < 0.1, rel


def test_nf4_head_tied_and_bad_input():
    import bitsandbytes.functional as bnbf

    from moelab.models import random_nf4_model
    from moelab.quant import quantize_head_

    config = preset_config("tiny")
    config.tie_word_embeddings = True
    model = random_nf4_model(config, "cpu", torch.float32, seed=1, head=True)
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)  # its own NF4 copy of the tied table
    embed = model.model.embed_tokens.weight
    assert embed.dtype == torch.float32
    codes, state = bnbf.quantize_4bit(embed.detach(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(model.lm_head.weight.data, codes)  # quantized from the tied table itself
    with torch.no_grad():
        out = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
        final = out.hidden_states[-1][0]  # after the final norm
        torch.testing.assert_close(out.logits[0], final @ bnbf.dequantize_4bit(codes, state).T, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out.logits[0], final @ embed.T, atol=1e-3)  # 4-bit logits, not the table's
    with pytest.raises(ValueError, match="nn.Linear lm_head"):
        quantize_head_(model, torch.float32)  # already quantized
    with pytest.raises(ValueError, match="nf4_head"):
        moelab.load("tiny", quantize="nf4-head")


def test_random_weights_layer_by_layer_seeded():
    a, _ = moelab.load("tiny", random_weights=True, quantize="nf4", seed=3)
    b, _ = moelab.load("tiny", random_weights=True, quantize="nf4", seed=3)
    c, _ = moelab.load("tiny", random_weights=True, quantize="nf4", seed=4)
    ea, eb, ec = (m.model.layers[2].mlp.experts for m in (a, b, c))
    assert torch.equal(ea.gate_up.codes, eb.gate_up.codes) and not torch.equal(ea.gate_up.codes, ec.gate_up.codes)
    w = dequantize_nf4(ea.gate_up)
    assert abs(w.std().item() - preset_config("tiny").initializer_range) < 0.002  # N(0, 0.02), as transformers
    assert torch.equal(a.model.norm.weight, torch.ones(128)) and a.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    assert (a.model.embed_tokens.weight[256] == 0).all()  # the padding row
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(a(ids).logits).all()


def save_tiny(tmp_path, **kwargs):
    model, tok = moelab.load("tiny")
    model.save_pretrained(tmp_path, **kwargs)
    tok.save_pretrained(tmp_path)
    return model


def same_quantized(a, b):
    for la, lb in zip(a.model.layers, b.model.layers):
        for name in ("gate_up", "down"):
            ta, tb = getattr(la.mlp.experts, name), getattr(lb.mlp.experts, name)
            assert torch.equal(ta.codes, tb.codes) and torch.equal(ta.absmax, tb.absmax)
        assert torch.equal(la.self_attn.k_proj.weight.data, lb.self_attn.k_proj.weight.data)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_checkpoint_sharded_and_per_expert_layouts(tmp_path, tiny_nf4):
    from safetensors.torch import save_file

    reference, _ = tiny_nf4
    # 1. save_pretrained in small shards: an index plus several files, read lazily.
    sharded = tmp_path / "sharded"
    save_tiny(sharded, max_shard_size="300KB")
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(sharded.glob("*.safetensors"))) > 3
    model, tok = moelab.load(str(sharded), quantize="nf4", device="cpu", dtype=torch.float32)
    same_quantized(model, reference)
    assert tok.eos_token_id == 256
    # 2. One matrix per expert, as the hub's Qwen1.5-MoE-A2.7B stores them: fused on load.
    per_expert = tmp_path / "per_expert"
    fp32 = save_tiny(per_expert)
    (per_expert / "model.safetensors").unlink()
    state = {}
    for key, value in fp32.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                state[key.replace("gate_up_proj", f"{e}.gate_proj.weight")] = value[e, :inter].contiguous()
                state[key.replace("gate_up_proj", f"{e}.up_proj.weight")] = value[e, inter:].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(value.shape[0]):
                state[key.replace("down_proj", f"{e}.down_proj.weight")] = value[e].contiguous()
        else:
            state[key] = value.contiguous()
    save_file(state, per_expert / "model.safetensors", metadata={"format": "pt"})
    model, _ = moelab.load(str(per_expert), quantize="nf4", device="cpu", dtype=torch.float32)
    same_quantized(model, reference)


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    save_tiny(broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        moelab.load(str(broken), quantize="nf4", device="cpu")
    empty = tmp_path / "no_weights"
    save_tiny(empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        moelab.load(str(empty), quantize="nf4", device="cpu")
    with pytest.raises(ValueError, match="quantize"):
        moelab.load("tiny", quantize="int4")
    with pytest.raises(RuntimeError, match="CUDA"):
        moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="cpu", quantize="nf4")


def test_memory_report_counts_every_byte_once():
    model, _ = moelab.load("tiny")
    report = memory_report(model)
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert report.total_bytes == everything
    assert report["routed experts"]["bytes"] == 4 * sum(
        layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel() for layer in model.model.layers)
    assert sum(r["weights"] for r in report.rows) == sum(p.numel() for p in model.parameters())
    assert "routed experts" in report.table() and report.as_dict()["total_bytes"] == everything


def test_meta_report_equals_the_materialized_one(tiny_nf4):
    """The full architecture's report is computed on the meta device: check on tiny that the
    meta build weighs exactly what the real one does, part by part."""
    model, _ = tiny_nf4
    meta, _ = moelab.load("tiny", random_weights=True, device="meta", quantize="nf4")
    assert meta.model.layers[0].mlp.experts.gate_up.codes.device.type == "meta"
    assert memory_report(meta).rows == memory_report(model).rows


def test_full_architecture_on_meta_fits_a_12_gb_card():
    bf16 = memory_report(moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta")[0])
    nf4 = memory_report(moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta", quantize="nf4")[0])
    assert 28.6e9 < bf16.total_bytes < 28.7e9  # 14.3 B parameters in bf16
    assert 24.9e9 < bf16["routed experts"]["bytes"] < 25.0e9  # what transformers + bnb leaves in bf16
    assert nf4.total_bytes < 9e9 and 4.12 < nf4["routed experts"]["bits_per_weight"] < 4.14
    assert nf4["embeddings and head"]["bytes"] == bf16["embeddings and head"]["bytes"]


def test_quantize_layer_keeps_the_gates_and_quantizes_as_bitsandbytes():
    """The torch backend's layer quantization: the gates untouched, every other weight's codes
    those bitsandbytes gives the original weight (expert by expert, and v_proj out of the joint q/k/v)."""
    import bitsandbytes.functional as bnbf

    config = preset_config("tiny")
    model = moelab.models.random_model(config)
    layer = model.model.layers[0]
    gate, router = layer.mlp.shared_expert_gate, layer.mlp.gate
    router_w = router.weight.detach().clone()
    experts_w = layer.mlp.experts.gate_up_proj.detach().clone()
    v_w = layer.self_attn.v_proj.weight.detach().clone()
    quantize_layer_(layer, torch.float32, backend="torch")
    assert layer.mlp.shared_expert_gate is gate and layer.mlp.gate is router
    assert router.weight.dtype == torch.float32 and torch.equal(router.weight, router_w)
    assert isinstance(layer.mlp.experts, NF4Experts) and isinstance(layer.self_attn.v_proj, bnb.nn.Linear4bit)

    def nf4(w):  # bitsandbytes' NF4 codes of w
        return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")[0].flatten()

    codes = layer.mlp.experts.gate_up.codes.reshape(config.num_experts, -1)
    for e in (0, 7, config.num_experts - 1):
        assert torch.equal(codes[e], nf4(experts_w[e]))
    assert torch.equal(layer.self_attn.v_proj.weight.data.flatten(), nf4(v_w))


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_nf4_head_through_moelab_kernels_and_graph_replay():
    """On CUDA the NF4 head takes moelab's kernels by token count (GEMV, tensor cores, dequantize
    then cuBLAS), each against dequantize-then-matmul; a decode step replayed from a CUDA graph
    gives the eager step's tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import torch.nn.functional as F

    from moelab.graphs import DecodeGraphs
    from moelab.model import _linear
    from moelab.quant import linear4bit_nf4

    model, _ = moelab.load("tiny", quantize="nf4_head", device="cuda", dtype=torch.bfloat16)
    head = model.lm_head
    w = dequantize_nf4(linear4bit_nf4(head))[0].to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(11)
    for tokens in (1, 3, 16, 48, 300):
        x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = F.linear(x, w).float()
        err = float((_linear(head, x).float() - ref).norm() / ref.norm())
        assert err < 1e-2, f"{tokens} tokens: {err:.2e}"
    prompts = [list(b"def main(args):"), list(b"import numpy as np\nx = np.")]
    runs = []
    for graph in (False, True):
        fwd = moelab.MoeForward(model)
        cache = fwd.new_cache(num_slots=3, max_seq_len=64)
        slots = torch.tensor([cache.allocate(40) for _ in prompts], device="cuda")
        token = torch.stack([lg.argmax() for lg in fwd.prefill(cache, prompts, slots.tolist())])
        step = DecodeGraphs(fwd, cache, buckets=(2,), mode="graph").step if graph else (
            lambda t, s: fwd.decode(cache, t, s).argmax(-1))
        out = [token.tolist()]
        for _ in range(4):
            token = step(token, slots)
            out.append(token.tolist())
        runs.append(out)
    assert runs[0] == runs[1]


@pytest.mark.gpu
def test_full_size_nf4_memory_bounds_on_cuda():
    """qwen1.5-moe-a2.7b, random weights, NF4: <= 9 GB allocated after load, <= 11 GB peak."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="cuda", quantize="nf4")
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    report = memory_report(model)
    print(f"allocated after load {after / 1e9:.2f} GB, peak during load {peak / 1e9:.2f} GB, "
          f"report total {report.total_bytes / 1e9:.2f} GB")
    assert after <= 9e9 and peak <= 11e9
    assert abs(after - report.total_bytes) < 0.05e9  # the report accounts for what is allocated
    ids = torch.randint(0, 151936, (1, 16), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)
    del model
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codes_identical_to_bitsandbytes_on_cuda(dtype):
    """moelab's PyTorch quantizer against bitsandbytes' CUDA kernel, expert by expert. The
    kernel is compiled with --use_fast_math, so its 1/absmax may be an approximate reciprocal
    (1 ulp): a value within a few ulps of a rounding threshold could then land one level over.
    The test pins any such difference to those values and prints the count (expected 0 or a few
    in 35 M)."""
    from moelab.quant import NF4_CODE, midpoints

    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    w = (torch.randn(6, 2 * 1408, 2048, device="cuda", generator=gen) * 0.02).to(dtype)
    ours = quantize_nf4(w, double_quant=False)  # moelab's PyTorch code, on the GPU
    thresholds = midpoints(NF4_CODE).cuda()
    differing = 0
    for e in range(w.shape[0]):
        packed, state = bnb.functional.quantize_4bit(w[e].flatten(), blocksize=64, quant_type="nf4")
        assert torch.equal(ours.absmax[e], state.absmax)
        if torch.equal(ours.codes[e], packed.flatten()):
            reference = bnb.functional.dequantize_4bit(packed, state).reshape(w.shape[1:])
            assert torch.equal(dequantize_nf4(ours, experts=e)[0], reference)
            continue
        mine = torch.stack([ours.codes[e] >> 4, ours.codes[e] & 15], 1).flatten().int()
        flat = packed.flatten()
        theirs = torch.stack([flat >> 4, flat & 15], 1).flatten().int()
        diff = (mine != theirs).nonzero().flatten()
        scaled = w[e].flatten()[diff].float() / state.absmax[diff // 64]
        ulps = (scaled[:, None] - thresholds).abs().min(dim=1).values / torch.finfo(torch.float32).eps
        assert ((mine[diff] - theirs[diff]).abs() == 1).all(), "codes differ by more than one level"
        assert (ulps <= 8).all(), f"codes differ away from a threshold (up to {ulps.max().item():.0f} ulps)"
        differing += diff.numel()
    print(f"{dtype}: {differing} of {2 * ours.codes.numel()} 4-bit codes differ from bitsandbytes' CUDA kernel, "
          f"each within 8 ulps of a threshold")
    # Double quantisation on the GPU: same scales and offsets, 8-bit codes within one step.
    dq, theirs = quantize_nf4(w), quantize_nf4(w, backend="bitsandbytes")
    assert torch.equal(dq.absmax_scale, theirs.absmax_scale) and torch.equal(dq.absmax_offset, theirs.absmax_offset)
    differ = dq.absmax != theirs.absmax
    assert differ.float().mean() < 0.02 and ((dq.absmax.int() - theirs.absmax.int()).abs() <= 1).all()
    print(f"{dtype}: double quantisation: {int(differ.sum())} of {differ.numel()} absmax codes differ by one step")


def test_transformers_bnb_4bit_leaves_the_fused_experts_in_full_precision(tiny_nf4):
    """The trap notebook 04 shows: transformers' 4-bit path replaces nn.Linear only."""
    from moelab.bench import transformers_bnb_4bit_

    model, _ = moelab.load("tiny")
    before = memory_report(model)
    transformers_bnb_4bit_(model, torch.float32)
    after = memory_report(model)
    assert after["routed experts"] == before["routed experts"] and after["routed experts"]["storage"] == "float32"
    assert after["attention"]["bytes"] < 0.2 * before["attention"]["bytes"]
    assert type(model.model.layers[0].mlp.shared_expert_gate) is nn.Linear and type(model.lm_head) is nn.Linear
    # Its 4-bit Linears hold the very codes moelab's loader gives them. moelab quantizes the
    # shared expert's gate and up as one tensor (quant.JointNF4): same 4-bit codes and block
    # absmax, but their 8-bit double quantisation shares one offset, so those 8-bit codes differ
    # and the decoded absmax agree within the 8-bit step (3%).
    import bitsandbytes.functional as bnbf

    ours, _ = tiny_nf4
    for name in ("self_attn.q_proj", "mlp.shared_expert.up_proj"):
        theirs_w = model.model.layers[3].get_submodule(name).weight
        ours_w = ours.model.layers[3].get_submodule(name).weight
        assert torch.equal(theirs_w.data, ours_w.data)
        absmax = [bnbf.dequantize_blockwise(w.quant_state.absmax, w.quant_state.state2) + w.quant_state.offset
                  for w in (theirs_w, ours_w)]
        assert torch.allclose(absmax[0], absmax[1], rtol=0.03, atol=0)  # measured: at most 2.4%
        if name.startswith("self_attn"):  # quantized alone (tiny's k/v rows do not fill 256-blocks)
            assert torch.equal(theirs_w.quant_state.absmax, ours_w.quant_state.absmax)
    assert memory_report(ours)["routed experts"]["bytes"] < 0.15 * after["routed experts"]["bytes"]


def test_nf4_summary_and_plot(tmp_path, tiny_nf4):
    from moelab.bench import nf4_summary, plot_nf4

    reports = {"moelab_nf4": memory_report(tiny_nf4[0]), "bf16": memory_report(moelab.load("tiny")[0])}
    reports["transformers_bnb_4bit"] = reports["bf16"]
    result = {"card": "cpu", "workload": {"model": "tiny"},
              "memory": {k: {"allocated_after_load_gb": gb, "peak_during_load_gb": gb + 2.5, "report": r.as_dict()}
                         for (k, r), gb in zip(reports.items(), (8.4, 28.6, 26.9))},
              "results": [{"system": s, "experts_impl": i, "tokens_per_s": t} for s, i, t in (
                  ("moelab_nf4_hf_generate", "moelab_nf4", 20.0), ("hf_bf16", "grouped_mm", 26.0),
                  ("hf_bnb_4bit", "eager", 7.9), ("hf_bnb_4bit", "grouped_mm", 27.6))]}
    lines = nf4_summary(result)
    assert "8.40 GB after load (ok, <= 9), peak 10.90 GB during load (ok, <= 11)" in lines[0]
    assert "3.2x moelab's footprint" in lines[1] and "moelab NF4 20.0" in lines[2]
    result["memory"]["moelab_nf4"]["peak_during_load_gb"] = 11.2
    assert "(OVER, <= 11)" in nf4_summary(result)[0]
    plot_nf4(result, tmp_path / "nf4.png")
    assert (tmp_path / "nf4.png").stat().st_size > 10_000


@pytest.mark.parametrize("source", ["random", "checkpoint"])
def test_at_most_one_layer_in_full_precision_while_loading(source, tmp_path, monkeypatch):
    """The property behind the 11 GB peak on a GPU: when a layer is quantized, every other
    layer is either already NF4 or not yet materialized (meta)."""
    import moelab.quant

    seen = []
    original = moelab.quant.quantize_layer_

    def watching(layer, *args, **kwargs):
        model_layers = watching.model_layers
        full = [i for i, other in enumerate(model_layers) if not isinstance(other.mlp.experts, NF4Experts)
                and other.mlp.experts.gate_up_proj.device.type != "meta"]
        seen.append(full)
        return original(layer, *args, **kwargs)

    real_skeleton = moelab.models._skeleton

    def skeleton(config, dtype):
        model = real_skeleton(config, dtype)
        watching.model_layers = model.model.layers
        return model

    monkeypatch.setattr(moelab.quant, "quantize_layer_", watching)
    monkeypatch.setattr(moelab.models, "_skeleton", skeleton)
    if source == "random":
        moelab.load("tiny", random_weights=True, quantize="nf4")
    else:
        save_tiny(tmp_path, max_shard_size="1MB")
        moelab.load(str(tmp_path), quantize="nf4", device="cpu", dtype=torch.float32)
    assert seen == [[0], [1], [2], [3]]
