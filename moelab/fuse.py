"""One GEMM where a decode step had several: q/k/v, and everything the MoE block reads from x.

Built in notebooks/08_cuda_graphs_and_decode_attention. At batch 1 every dense projection of
a decode step is a GEMV of a few MB, and cuBLAS runs each as its own kernel, well under the
copy bandwidth; the router (60 output rows) and the shared expert's gate (1 row) each cost a
whole kernel that moves almost nothing. Per layer this module fuses

- q_proj, k_proj, v_proj (each with its bias) into one [q + k + v, H] weight and one bias;
- the shared expert's gate_proj and up_proj, the router and `shared_expert_gate` (all read
  the same normalised x) into one [2 I + E + 1, H] weight,

so `MoeForward(projections="fused")` runs 2 GEMMs where it ran 7. No second copy of the
weights is kept: each module's parameter is re-seated as a row slice (a view) of the fused
tensor, so transformers' own forward still runs on the same numbers, memory does not grow, and
`save_pretrained` still writes the usual per-module checkpoint (tests/test_fuse.py).

The fused tensors hang on the modules as plain attributes (not parameters or buffers: memory
reports and state dicts see each weight once, through its parameter). `model.to(...)` or
`.half()` replaces the parameters with copies that are no longer views, so each call of the
`fuse_*` functions first checks that every parameter still lives in the fused tensor and fuses
again if not; `MoeForward` calls them at every step (a few pointer comparisons per layer), so a
model moved or cast after its `MoeForward` was built still runs right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FusedAttentionInput:
    """q/k/v of one layer as one GEMM: x @ weight.T + bias, split into `sizes` columns."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]


@dataclass
class FusedMoeInput:
    """Shared gate / shared up / router / shared_expert_gate of one layer as one GEMM
    (no bias), split into `sizes` columns in that order. In an NF4 model (`nf4_gate_up` set:
    the shared expert's jointly quantized gate/up, `moelab.quant.JointNF4`) `weight` holds only
    the router and shared_expert_gate rows, `sizes` = (experts, 1)."""

    weight: torch.Tensor
    sizes: tuple[int, ...]
    nf4_gate_up: object = None


def _plain_linear(module) -> bool:
    """An unquantized nn.Linear (bitsandbytes' Linear4bit subclasses nn.Linear: not fusable)."""
    return type(module) is nn.Linear and module.weight.device.type != "meta"


def _reseat(fused: torch.Tensor, parts: list[tuple[nn.Module, str]]) -> None:
    """Make each (module, name) parameter a row slice of `fused`, in order."""
    start = 0
    for module, name in parts:
        old = getattr(module, name)
        rows = old.shape[0]
        setattr(module, name, nn.Parameter(fused[start:start + rows], requires_grad=old.requires_grad))
        start += rows


def _is_view_of(tensor: torch.Tensor, fused: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def fuse_attention_input(attn) -> FusedAttentionInput | None:
    """Fuse one attention layer's q/k/v (idempotent). None when they cannot be fused
    (on the meta device, mixed dtypes or biases, quantized separately). NF4 layers that
    `moelab.quant.quantize_layer_` quantized jointly come back as their joint NF4 weight."""
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    joint = getattr(attn, "_moelab_nf4_qkv", None)
    if joint is not None and joint.seats(projs):
        return FusedAttentionInput(joint.weight, joint.bias, joint.sizes)
    cached = getattr(attn, "_moelab_fused_qkv", None)
    if cached is not None and all(_is_view_of(p.weight, cached.weight) for p in projs):
        return cached
    if not all(_plain_linear(p) for p in projs):
        return None
    if len({(p.weight.dtype, p.weight.device) for p in projs}) != 1 or len({p.bias is None for p in projs}) != 1:
        return None
    with torch.no_grad():
        weight = torch.cat([p.weight for p in projs])
        bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
    _reseat(weight, [(p, "weight") for p in projs])
    if bias is not None:
        _reseat(bias, [(p, "bias") for p in projs])
    attn._moelab_fused_qkv = FusedAttentionInput(weight, bias, tuple(p.weight.shape[0] for p in projs))
    return attn._moelab_fused_qkv


def fuse_moe_input(mlp) -> FusedMoeInput | None:
    """Fuse one sparse MoE block's shared gate_proj / up_proj, router and shared_expert_gate
    (idempotent). None for a dense-MLP layer or when they cannot be fused."""
    if not hasattr(mlp, "experts") or not hasattr(mlp, "shared_expert"):
        return None
    shared = mlp.shared_expert
    joint = getattr(shared, "_moelab_nf4_gate_up", None)
    if joint is not None and joint.seats([shared.gate_proj, shared.up_proj]):
        return _fuse_router_nf4(mlp, joint)
    parts = [shared.gate_proj.weight, shared.up_proj.weight, mlp.gate.weight, mlp.shared_expert_gate.weight]
    cached = getattr(mlp, "_moelab_fused_input", None)
    if cached is not None and all(_is_view_of(t, cached.weight) for t in parts):
        return cached
    linears = [shared.gate_proj, shared.up_proj, mlp.shared_expert_gate]
    if not all(_plain_linear(p) and p.bias is None for p in linears):
        return None
    router = mlp.gate.weight
    if getattr(mlp.gate, "bias", None) is not None:
        return None
    tensors = [shared.gate_proj.weight, shared.up_proj.weight, router, mlp.shared_expert_gate.weight]
    if len({(t.dtype, t.device) for t in tensors}) != 1 or router.device.type == "meta":
        return None
    with torch.no_grad():
        weight = torch.cat(tensors)
    _reseat(weight, [(shared.gate_proj, "weight"), (shared.up_proj, "weight"), (mlp.gate, "weight"),
                     (mlp.shared_expert_gate, "weight")])
    mlp._moelab_fused_input = FusedMoeInput(weight, tuple(t.shape[0] for t in tensors))
    return mlp._moelab_fused_input


def _fuse_router_nf4(mlp, joint) -> FusedMoeInput | None:
    """An NF4 layer's MoE inputs: the router and shared_expert_gate (full precision) fused as
    one [E + 1, H] weight, beside the shared expert's joint NF4 gate/up."""
    parts = [mlp.gate.weight, mlp.shared_expert_gate.weight]
    cached = getattr(mlp, "_moelab_fused_router", None)
    if cached is None or not all(_is_view_of(t, cached.weight) for t in parts):
        if (not _plain_linear(mlp.shared_expert_gate) or mlp.shared_expert_gate.bias is not None
                or getattr(mlp.gate, "bias", None) is not None or len({(t.dtype, t.device) for t in parts}) != 1):
            return None
        with torch.no_grad():
            weight = torch.cat(parts)
        _reseat(weight, [(mlp.gate, "weight"), (mlp.shared_expert_gate, "weight")])
        cached = mlp._moelab_fused_router = FusedMoeInput(weight, tuple(t.shape[0] for t in parts))
    return FusedMoeInput(cached.weight, cached.sizes, joint.weight)


def fuse_projections(model) -> int:
    """Fuse every layer of a Qwen2MoeForCausalLM in place (see the module docstring).
    Returns how many groups were fused (two per sparse layer when nothing is quantized)."""
    count = 0
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        count += fuse_attention_input(layer.self_attn) is not None
        count += fuse_moe_input(layer.mlp) is not None
    return count
