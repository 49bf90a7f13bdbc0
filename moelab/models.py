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
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM

ASSETS = Path(__file__).parent / "assets"
TINY_DIR = ASSETS / "tiny"
EOS_TOKEN = "<|endoftext|>"

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
    "tiny", bfloat16 otherwise, unless given.
    """
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not supported yet (NF4 loading comes in notebook 04)")
    name = str(name_or_path)
    if name == "tiny":
        # Through _resolve_device like the other paths, so device="cuda" without CUDA is a
        # clear RuntimeError instead of torch's "Torch not compiled with CUDA enabled".
        device = _resolve_device(device or "cpu", name)
        dtype = dtype or torch.float32
        tok = byte_tokenizer()
        if random_weights or not (TINY_DIR / "model.safetensors").exists():
            return random_model(preset_config("tiny"), device, dtype, seed), tok
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
        return random_model(preset_config(name), device, dtype or torch.bfloat16, seed), byte_tokenizer()
    if random_weights:
        raise ValueError(f"random_weights=True needs a preset ({sorted(PRESETS)}), got {name!r}")
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
