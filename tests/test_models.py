"""`moelab.load`: the presets, the shipped `tiny` checkpoint and the from_pretrained path."""

import collections
import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

import moelab
from moelab.models import PRESETS, TINY_DIR, byte_tokenizer, random_model
from moelab.train import eval_windows, evaluate

# Held out for sure: written for this test, not taken from the standard library.
SNIPPET = '''import os
from pathlib import Path


def find_files(root, suffix=".py"):
    """Yield every file under root whose name ends with suffix, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffix):
                yield Path(dirpath) / name


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key, value=1):
        self.counts[key] = self.counts.get(key, 0) + value
        return self.counts[key]
'''


pytestmark = pytest.mark.usefixtures("one_thread")



def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ tiny, trained


def test_tiny_is_the_shipped_checkpoint_with_the_preset_shape(tiny):
    model, tok = tiny
    assert type(model) is Qwen2MoeForCausalLM
    assert (TINY_DIR / "model.safetensors").exists() and (TINY_DIR / "training.json").exists()
    cfg, preset = model.config, PRESETS["tiny"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                "num_attention_heads", "num_key_value_heads"):
        assert getattr(cfg, key) == preset[key], key
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok == 4 and cfg.num_hidden_layers >= 4
    assert cfg.norm_topk_prob is False
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    for layer in model.model.layers:  # every layer is a routed MoE block with a gated shared expert
        mlp = layer.mlp
        assert isinstance(mlp, Qwen2MoeSparseMoeBlock)
        assert tuple(mlp.gate.weight.shape) == (cfg.num_experts, cfg.hidden_size)
        assert tuple(mlp.experts.gate_up_proj.shape) == (cfg.num_experts, 2 * cfg.moe_intermediate_size,
                                                         cfg.hidden_size)
        assert mlp.shared_expert.gate_proj.out_features == cfg.shared_expert_intermediate_size
        assert tuple(mlp.shared_expert_gate.weight.shape) == (1, cfg.hidden_size)
    # The weights are the checkpoint's, shipped rounded to bf16: every float32 value is a bf16 value.
    w = model.model.layers[0].mlp.gate.weight
    assert torch.equal(w, w.bfloat16().float()) and w.abs().sum() > 0


TRICKY_SOURCE = "def f(x):\n\treturn x  # café → 😀\r\n    s = '\\x00' if a != b else \"\"\n  .  , ''"


@pytest.mark.parametrize("which", ["AutoTokenizer", "load", "byte_tokenizer"])
def test_tokenizer_is_bytes_and_round_trips(tiny, which):
    tok = {"AutoTokenizer": lambda: AutoTokenizer.from_pretrained(TINY_DIR), "load": lambda: tiny[1],
           "byte_tokenizer": byte_tokenizer}[which]()
    for text in (SNIPPET, TRICKY_SOURCE):
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8")), "token id must equal byte value, with no BOS added"
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 256 and tok.pad_token_id == 256
    assert tok.decode([256]) == "<|endoftext|>" and tok.convert_tokens_to_ids("<|endoftext|>") == 256


def test_trained_tiny_predicts_held_out_python(tiny):
    model, _ = tiny
    info = json.loads((TINY_DIR / "training.json").read_text())
    data = list(SNIPPET.encode())
    counts = collections.Counter(data)
    # The snippet's own byte-unigram entropy: a unigram fitted to the very text it scores, so
    # a bound no unigram model can beat.
    unigram = -sum(c / len(data) * math.log2(c / len(data)) for c in counts.values())
    windows = eval_windows(torch.tensor(data), info["seq_len"], count=4)  # training-length windows
    trained, _ = evaluate(model, windows)
    untrained, _ = evaluate(moelab.load("tiny", random_weights=True)[0], windows)
    print(f"held-out snippet: trained {trained:.3f}, random {untrained:.3f}, unigram {unigram:.3f} bits/byte")
    assert unigram > 4.0
    assert trained < 0.5 * unigram and trained < 2.0
    assert untrained > 7.0  # about log2(257): the bound above is not trivially met


def test_trained_tiny_greedy_completion_of_def_is_an_identifier(tiny):
    model, tok = tiny
    ids = tok("def ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert re.match(r"[A-Za-z_]\w*\(", text), text


# ------------------------------------------------------------------ random weights


def test_random_tiny_is_seeded_and_not_the_trained_weights(tiny):
    a, b = moelab.load("tiny", random_weights=True)[0], moelab.load("tiny", random_weights=True)[0]
    c = moelab.load("tiny", random_weights=True, seed=1)[0]
    pa, pb, pc, trained = params(a), params(b), params(c), params(tiny[0])
    assert pa.keys() == pb.keys() == pc.keys() == trained.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "same seed must give identical weights"
    random_keys = [k for k in pa if pa[k].std() > 0]  # norms start at ones, biases at zeros
    assert random_keys and all(not torch.equal(pa[k], pc[k]) for k in random_keys)
    assert all(not torch.equal(pa[k], trained[k]) for k in random_keys)
    assert a.config.num_experts == tiny[0].config.num_experts


def test_full_size_preset_on_meta_has_the_real_shape():
    model, tok = moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta")
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (60, 4, 24)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (2048, 1408, 5632)
    assert cfg.norm_topk_prob is False and cfg.vocab_size == 151936
    assert all(p.is_meta for p in model.parameters()) and model.dtype == torch.bfloat16
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert routed == 24 * 60 * 3 * 2048 * 1408
    # Each token runs top_k of the num_experts routed experts and everything else.
    active = total - routed + routed * cfg.num_experts_per_tok // cfg.num_experts
    print(f"qwen1.5-moe-a2.7b: {total:,} parameters, {active:,} active per token")
    assert abs(total - 14.3e9) / 14.3e9 < 0.01
    assert abs(active - 2.7e9) / 2.7e9 < 0.02
    assert tok("def ")["input_ids"] == [100, 101, 102, 32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name,kwargs", [("qwen1.5-moe-a2.7b", dict(random_weights=True)),
                                         ("tiny", {}), ("tiny", dict(random_weights=True))])
def test_cuda_without_cuda_is_a_clear_error(name, kwargs):
    with pytest.raises(RuntimeError, match=f"device='cuda' was asked for '{name}', but this machine has no CUDA"):
        moelab.load(name, device="cuda", **kwargs)


def test_full_size_preset_refuses_cpu_and_checkpoint_loading():
    with pytest.raises(RuntimeError, match="14.3 B parameters.*device='meta'"):
        moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="cpu")
    if not torch.cuda.is_available():  # the default device is the CPU here
        with pytest.raises(RuntimeError, match="14.3 B parameters"):
            moelab.load("qwen1.5-moe-a2.7b", random_weights=True)
    with pytest.raises(ValueError, match="pass random_weights=True.*Qwen/Qwen1.5-MoE-A2.7B"):
        moelab.load("qwen1.5-moe-a2.7b")
    with pytest.raises(ValueError, match="random_weights=True needs a preset.*'Qwen/Qwen1.5-MoE-A2.7B'"):
        moelab.load("Qwen/Qwen1.5-MoE-A2.7B", random_weights=True)
    with pytest.raises(ValueError, match="quantize='nf5'"):
        moelab.load("tiny", quantize="nf5")


# ------------------------------------------------------------------ from_pretrained


def small_config(**overrides) -> Qwen2MoeConfig:
    # initializer_range 0.1: weights large enough that the logits differ visibly between layers.
    return Qwen2MoeConfig(**{**PRESETS["tiny"], "num_hidden_layers": 4, "initializer_range": 0.1, **overrides})


def save(tmp_path, config, seed=3):
    model = random_model(config, seed=seed)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    return model


INPUT = torch.tensor([list(b"for i in range(10):\n    print(i)\n")])


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("overrides,sparse", [
    ({}, [0, 1, 2, 3]),
    ({"mlp_only_layers": [1]}, [0, 2, 3]),
    ({"decoder_sparse_step": 2}, [1, 3]),
    ({"mlp_only_layers": [3], "decoder_sparse_step": 2, "norm_topk_prob": True}, [1]),
])
def test_local_directory_loads_through_from_pretrained(tmp_path, overrides, sparse):
    original = save(tmp_path, small_config(**overrides))
    model, tok = moelab.load(str(tmp_path), dtype=torch.float32)
    assert type(model) is Qwen2MoeForCausalLM and model.device.type == "cpu" and not model.training
    assert model.dtype == torch.float32
    # Dense layers (mlp_only_layers, decoder_sparse_step) stay plain MLPs, as in transformers.
    kinds = [isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in model.model.layers]
    assert [i for i, k in enumerate(kinds) if k] == sparse
    assert all(isinstance(layer.mlp, Qwen2MoeMLP) for i, layer in enumerate(model.model.layers) if i not in sparse)
    assert model.config.norm_topk_prob == overrides.get("norm_topk_prob", False)
    # Bit-identical to transformers' own loading path. The in-memory original agrees to float32
    # rounding only: loaded tensors sit at other memory alignments (mmap'd safetensors), and
    # the CPU matmul kernels round differently there.
    got = logits(model)
    hf = Qwen2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(got, logits(hf))
    torch.testing.assert_close(got, logits(original), rtol=0, atol=1e-5)
    assert tok("é\n")["input_ids"] == [0xC3, 0xA9, 10]
    # Without dtype a checkpoint loads in bfloat16 (the docstring's default), like transformers'.
    bf16, _ = moelab.load(tmp_path)
    assert bf16.dtype == torch.bfloat16
    hf16 = Qwen2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(bf16), logits(hf16))


def test_missing_or_wrong_models_raise_clear_errors(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=re.escape(repr(str(missing))) + " is neither a moelab preset"):
        moelab.load(str(missing))
    # Not a valid hub id either, so this fails at once, with or without a network.
    with pytest.raises(ValueError, match=r"'tiny!' is neither a moelab preset.*presets: \['qwen1.5-moe-a2.7b', 'tiny'\]"):
        moelab.load("tiny!")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(repr(str(empty))) + " local directory holds no loadable config"):
        moelab.load(str(empty))
    dense = tmp_path / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(dense)
    with pytest.raises(ValueError, match="moelab runs Qwen2-MoE models; this config is model_type='qwen2'"):
        moelab.load(str(dense))
    bad_k = tmp_path / "bad_k"
    small_config(num_experts=4, num_experts_per_tok=8).save_pretrained(bad_k)
    with pytest.raises(ValueError, match="num_experts_per_tok=8 > num_experts=4"):
        moelab.load(str(bad_k))
