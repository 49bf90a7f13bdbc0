"""Model presets and `load`: the one way moelab gets a Hugging Face Qwen2-MoE model.

Built in notebooks/00_welcome_and_tour. Presets:
- "tiny": a small Qwen2-MoE shaped like the real one (16 routed experts, top-4, a shared
  expert behind a sigmoid gate, norm_topk_prob=False) with a byte-level tokenizer. It ships
  inside the package as a trained checkpoint (moelab/assets/tiny) when one is there, and is
  built from seeded random weights with `random_weights=True`.
- "qwen1.5-moe-a2.7b": the full architecture (14.3 B parameters), random weights only, built
  directly on the GPU (or on the meta device, shape only). Random weights measure speed and
  memory, never quality.
Any other name is a hub id or a local directory and goes through `from_pretrained`.

`quantize="nf4"` (built in notebooks/04_nf4_quantized_loading) loads layer by layer so the
full-precision model never sits in memory at once: the model is built on the meta device
(shapes only), then each decoder layer is materialized (seeded random weights, or its tensors
read from the safetensors checkpoint) and at once quantized by `moelab.quant.quantize_layer_`.
`quantize="nf4_head"` quantizes lm_head as well, at the end (`moelab.quant.quantize_head_`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM)

ASSETS = Path(__file__).parent / "assets"
TINY_DIR = ASSETS / "tiny"
EOS_TOKEN = "<|endoftext|>"
QUANTIZE_CHOICES = (None, "nf4", "nf4_head")  # moelab.load's quantize: see its docstring

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=257,  # 256 bytes + <|endoftext|>: token id == byte value
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so moelab's forward handles it
        max_position_embeddings=1024,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=96,
        shared_expert_intermediate_size=384,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=True,
        bos_token_id=None,
        eos_token_id=256,
        pad_token_id=256,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B's config.json, as transformers reads it.
    "qwen1.5-moe-a2.7b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=8192,
        num_experts=60,
        num_experts_per_tok=4,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=True,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}


def preset_config(name: str) -> Qwen2MoeConfig:
    """The Qwen2MoeConfig of a preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return Qwen2MoeConfig(**PRESETS[name])


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real Hugging Face tokenizer over raw bytes: token id == byte value, 256 = EOS.

    Built with the `tokenizers` library (byte-level BPE with no merges), so it saves and
    loads through AutoTokenizer like any hub tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: byte for byte, ch in bytes_to_unicode().items()}
    vocab[EOS_TOKEN] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def check_supported(config) -> None:
    """Reject configs moelab would mis-run. Dense layers (`mlp_only_layers`,
    `decoder_sparse_step != 1`) are supported: transformers builds them as plain MLPs and
    moelab's router patch only touches the MoE layers."""
    if getattr(config, "model_type", None) != "qwen2_moe":
        raise ValueError(f"moelab runs Qwen2-MoE models; this config is model_type={config.model_type!r}")
    if config.num_experts_per_tok > config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok} > num_experts={config.num_experts}"
        )
    if getattr(config, "decoder_sparse_step", 1) < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {config.decoder_sparse_step}")


def random_model(config: Qwen2MoeConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """Build a Qwen2MoeForCausalLM with seeded random weights, initialised directly on
    `device` (no CPU copy of a 14 B-parameter model; on "meta" only shapes exist)."""
    check_supported(config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = Qwen2MoeForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def _resolve_device(device, name: str) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device='cuda' was asked for {name!r}, but this machine has no CUDA device")
    return device


def load(
    name_or_path: str = "tiny",
    *,
    random_weights: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    quantize: str | None = None,
):
    """Load a Qwen2-MoE model and its tokenizer: returns (model, tokenizer).

    name_or_path: a preset ("tiny", "qwen1.5-moe-a2.7b"), a hub id or a local directory.
    random_weights: build the preset from seeded random weights instead of a checkpoint.
    device: defaults to CUDA when present; "tiny" defaults to the CPU. dtype: float32 for
    "tiny", bfloat16 otherwise, unless given (with quantize, also the compute dtype).
    quantize: None, or "nf4": routed experts in moelab's NF4 (`moelab.quant.NF4Experts`),
    attention and shared-expert Linears in bitsandbytes NF4, router, shared-expert gate,
    embeddings, norms and head in `dtype`; quantized layer by layer (see the module docstring).
    "nf4_head": the same with lm_head in NF4 too (an opt-in: transformers' 4-bit loading and
    moelab's "nf4" keep the head in `dtype`; at batch 1 it is over a third of an NF4 step's bytes).
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r} is not supported: use one of {list(QUANTIZE_CHOICES)}")
    head = quantize == "nf4_head"
    name = str(name_or_path)
    if name == "tiny":
        # Through _resolve_device like the other paths, so device="cuda" without CUDA is a
        # clear RuntimeError instead of torch's "Torch not compiled with CUDA enabled".
        device = _resolve_device(device or "cpu", name)
        dtype = dtype or torch.float32
        tok = byte_tokenizer()
        if random_weights or not (TINY_DIR / "model.safetensors").exists():
            if quantize:
                return random_nf4_model(preset_config("tiny"), device, dtype, seed, head=head), tok
            return random_model(preset_config("tiny"), device, dtype, seed), tok
        if quantize:
            return (checkpoint_nf4_model(TINY_DIR, device, dtype, head=head),
                    AutoTokenizer.from_pretrained(str(TINY_DIR)))
        return _from_pretrained(TINY_DIR, device, dtype)
    if name == "qwen1.5-moe-a2.7b":
        if not random_weights:
            raise ValueError(
                "the 'qwen1.5-moe-a2.7b' preset builds random weights (pass random_weights=True); "
                "for the real checkpoint use its hub id 'Qwen/Qwen1.5-MoE-A2.7B' or a local directory"
            )
        device = _resolve_device(device, name)
        if device.type not in ("cuda", "meta"):
            raise RuntimeError(
                f"{name!r} has 14.3 B parameters (28.6 GB in bf16): build it on a CUDA device, "
                f"or on device='meta' for shapes only, not on {device.type!r}"
            )
        # Random weights stand in for the real checkpoint; so does the byte tokenizer for
        # Qwen's (it cannot be downloaded here): its ids are valid for this vocabulary.
        config, dtype = preset_config(name), dtype or torch.bfloat16
        if quantize:
            return random_nf4_model(config, device, dtype, seed, head=head), byte_tokenizer()
        return random_model(config, device, dtype, seed), byte_tokenizer()
    if random_weights:
        raise ValueError(f"random_weights=True needs a preset ({sorted(PRESETS)}), got {name!r}")
    if quantize:
        path = _local_checkpoint(name)
        model = checkpoint_nf4_model(path, _resolve_device(device, name), dtype or torch.bfloat16, head=head)
        return model, AutoTokenizer.from_pretrained(path)
    return _from_pretrained(name, _resolve_device(device, name), dtype or torch.bfloat16)


def _from_pretrained(name_or_path, device: torch.device, dtype: torch.dtype):
    """The real loading path: a hub id or a local directory through `from_pretrained`."""
    path = str(name_or_path)
    local = os.path.isdir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError, ValueError or HF validation errors
        kind = "local directory holds no loadable config" if local else "is neither a moelab preset nor a loadable model"
        raise ValueError(
            f"{path!r} {kind} (presets: {sorted(PRESETS)}): {type(err).__name__}: {err}"
        ) from err
    check_supported(config)
    model = Qwen2MoeForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


# ---------------------------------------------------------------------------- NF4 loading


def _init_random_(module: torch.nn.Module, std: float) -> None:
    """Seeded random weights as transformers initialises Qwen2-MoE: N(0, std) for every weight
    matrix (experts and router included), zero biases, unit norms, a zero padding row."""
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if name == "bias":
                param.data.zero_()
            elif "Norm" in type(sub).__name__:  # Qwen2MoeRMSNorm
                param.data.fill_(1.0)
            else:
                param.data.normal_(0.0, std)
        if isinstance(sub, torch.nn.Embedding) and sub.padding_idx is not None:
            sub.weight.data[sub.padding_idx].zero_()


def _skeleton(config, dtype):
    """The model on the meta device: every module and shape, no memory."""
    return random_model(config, "meta", dtype)


def _finish(model, device):
    """Rebuild the rotary tables on `device` (a buffer computed at construction, so it cannot be
    loaded) and check that nothing was left on the meta device."""
    inner = model.model
    with torch.device(device):
        inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    if device.type != "meta":
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if left:
            raise ValueError(f"the checkpoint does not hold {len(left)} tensors the model needs, e.g. {left[:4]}")
    return model.eval()


def random_nf4_model(config: Qwen2MoeConfig, device, dtype=torch.bfloat16, seed: int = 0, head: bool = False):
    """Seeded random weights, quantized to NF4 layer by layer on `device` (never the whole
    model in `dtype`: at most one decoder layer plus the embeddings and head). On "meta" only
    shapes exist, which is enough for `moelab.quant.memory_report`. head: lm_head in NF4 too
    (`moelab.quant.quantize_head_`)."""
    from .quant import quantize_head_, quantize_layer_

    device = torch.device(device)
    model = _skeleton(config, dtype)
    std = config.initializer_range
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    parts = [model.model.embed_tokens, *model.model.layers, model.model.norm]
    if not config.tie_word_embeddings:
        parts.append(model.lm_head)
    for part in parts:
        if device.type != "meta":
            part.to_empty(device=device)
            _init_random_(part, std)
        if part in model.model.layers:
            quantize_layer_(part, dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if head:
        quantize_head_(model, dtype)
    return _finish(model, device)


def _local_checkpoint(name: str) -> str:
    """A local directory as is; a hub id through huggingface_hub's cache (config, tokenizer and
    safetensors files only)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"])
    except Exception as err:  # network, unknown repo, gated repo
        raise ValueError(f"{name!r} is neither a moelab preset, a local directory nor a downloadable hub id "
                         f"(presets: {sorted(PRESETS)}): {type(err).__name__}: {err}") from err


class _Checkpoint:
    """Lazy access to a safetensors checkpoint (one file or an index of shards): a tensor is
    read from its memory-mapped shard only when asked for."""

    def __init__(self, path):
        from safetensors import safe_open

        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").exists():
            with safe_open(path / "model.safetensors", framework="pt") as f:
                weight_map = {key: "model.safetensors" for key in f.keys()}
        else:
            raise ValueError(f"{str(path)!r} holds no safetensors checkpoint (model.safetensors or its index): "
                             "NF4 loading reads safetensors shards")
        self.weight_map = weight_map
        self._files = {name: safe_open(path / name, framework="pt") for name in sorted(set(weight_map.values()))}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def get(self, key: str, device, dtype) -> torch.Tensor:
        return self._files[self.weight_map[key]].get_tensor(key).to(device=device, dtype=dtype)


_PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _layer_state(ckpt: _Checkpoint, prefix: str, device, dtype) -> dict:
    """One decoder layer's tensors, keyed as the module names them. Checkpoints that store one
    matrix per expert (`mlp.experts.{e}.gate_proj.weight`, as Qwen/Qwen1.5-MoE-A2.7B on the hub)
    are fused into transformers v5's `gate_up_proj [E, 2I, H]` (gate rows first) and
    `down_proj [E, H, I]`."""
    state, per_expert = {}, {}
    for key in ckpt.keys(prefix):
        local = key[len(prefix):]
        match = _PER_EXPERT.search(local)
        if match:
            per_expert.setdefault(match.group(2), {})[int(match.group(1))] = ckpt.get(key, device, dtype)
        else:
            state[local] = ckpt.get(key, device, dtype)
    if per_expert:
        stacked = {name: torch.stack([mats[e] for e in sorted(mats)]) for name, mats in per_expert.items()}
        state["mlp.experts.gate_up_proj"] = torch.cat([stacked.pop("gate_proj"), stacked.pop("up_proj")], dim=1)
        state["mlp.experts.down_proj"] = stacked.pop("down_proj")
    return state


def _load_part(module: torch.nn.Module, state: dict, name: str, path) -> None:
    """Put a checkpoint's tensors into a meta-device module (assigned, not copied); a shape
    that disagrees with the config, or a tensor the checkpoint lacks, is a ValueError."""
    try:
        module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{name} of {str(path)!r} does not match its config: {err}") from err
    missing = [n for n, t in module.named_parameters() if t.device.type == "meta"]
    if missing:
        raise ValueError(f"the checkpoint {str(path)!r} lacks {name}.{missing[0]} (and {len(missing) - 1} more)")


def checkpoint_nf4_model(path, device, dtype=torch.bfloat16, head: bool = False):
    """A local safetensors checkpoint, quantized to NF4 as it is read: each decoder layer's
    tensors are read from their (memory-mapped) shards onto `device`, then quantized before the
    next layer is read. head: lm_head in NF4 too (`moelab.quant.quantize_head_`)."""
    from .quant import quantize_head_, quantize_layer_

    device = torch.device(device)
    config = AutoConfig.from_pretrained(str(path))
    check_supported(config)
    model = _skeleton(config, dtype)
    ckpt = _Checkpoint(path)
    for i, layer in enumerate(model.model.layers):
        _load_part(layer, _layer_state(ckpt, f"model.layers.{i}.", device, dtype), f"model.layers.{i}", path)
        quantize_layer_(layer, dtype)
    for name in ("model.embed_tokens", "model.norm", "lm_head"):
        if name == "lm_head" and config.tie_word_embeddings:
            continue
        state = {k[len(name) + 1:]: ckpt.get(k, device, dtype) for k in ckpt.keys(name + ".")}
        _load_part(model.get_submodule(name), state, name, path)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if head:
        quantize_head_(model, dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        pass  # no generation_config.json: keep the one built from the config
    return _finish(model, device)
