"""Hot-swap moelab's router and routed-experts kernel into a transformers Qwen2-MoE model.

Built in notebooks/03_patching_transformers (router) and 05_fused_expert_kernel (experts).
Every `Qwen2MoeTopKRouter` gets an instance `forward` that computes the same router logits
and hands the softmax / top-k / renormalise part to `moelab.route`, keeping transformers'
return contract: (router_logits in the model dtype, top-k weights in the model dtype, top-k
ids int64). The routed experts go through transformers' own experts interface
(`ExpertsInterface`, `@use_experts_implementation`, transformers 5.17 and later): moelab's
fused kernel is registered there under the name "moelab", and the patch sets the model
config's `_experts_implementation` to it (moelab.quant.NF4Experts, which transformers does
not dispatch, get an instance forward instead). Removing the patch restores the original
forwards and implementation names exactly.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts, Qwen2MoeTopKRouter

from .kernels.experts import moelab_experts_forward
from .routing import route

_MISSING = object()

# A name transformers accepts wherever it takes an experts implementation, e.g.
# `model.set_experts_implementation("moelab")` or `from_pretrained(..., experts_implementation="moelab")`.
EXPERTS_IMPLEMENTATION = "moelab"
ExpertsInterface.register(EXPERTS_IMPLEMENTATION, moelab_experts_forward)


def _nf4_fused_forward(self, hidden_states, top_k_index, top_k_weights):
    return moelab_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _experts_on_cuda(module) -> bool:
    return any(t.is_cuda for t in module.buffers()) or any(p.is_cuda for p in module.parameters())


def _routed_forward(self, hidden_states, backend: str = "auto"):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = route(router_logits, self.top_k, normalize=self.norm_topk_prob, backend=backend)
    return router_logits, weights.to(router_logits.dtype), ids.to(torch.int64)


class RouterPatch:
    """Handle returned by `moelab.patch`: `.remove()` it, or use it as a context manager.

    `.routers`: the patched routers; `.experts`: the experts modules now running moelab's
    fused kernel (empty when transformers' own implementation was kept)."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto", experts: str = "auto"):
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if experts not in ("auto", "triton", "torch"):
            raise ValueError(f"experts must be 'auto', 'triton' or 'torch', got {experts!r}")
        self.routers = [m for m in model.modules() if isinstance(m, Qwen2MoeTopKRouter)]
        if not self.routers:
            raise ValueError(f"no Qwen2MoeTopKRouter found in {type(model).__name__}: nothing to patch")
        if any(getattr(m, "_moelab_patched", False) for m in self.routers):
            raise RuntimeError("this model is already patched by moelab; remove that patch first")
        self._saved = []
        for router in self.routers:
            # An instance may already carry its own forward (hub kernels do this): keep it.
            self._saved.append(router.__dict__.get("forward", _MISSING))
            # A bound method, not a closure over `router`: copy.deepcopy(model) then rebinds
            # each copied router's forward to the copy (a closure kept calling the original).
            router.forward = types.MethodType(functools.partial(_routed_forward, backend=backend), router)
            router._moelab_patched = True
        self._patch_experts(model, experts)
        self.active = True

    def _patch_experts(self, model, experts: str) -> None:
        """Point the experts at moelab's kernel: through each config's `_experts_implementation`
        for transformers' experts, through an instance forward for moelab's NF4Experts."""
        from .quant import NF4Experts

        candidates = [m for m in model.modules() if isinstance(m, (Qwen2MoeExperts, NF4Experts))]
        if experts == "torch" or (experts == "auto" and not any(_experts_on_cuda(m) for m in candidates)):
            candidates = []
        self.experts = candidates
        self._configs = {}
        self._nf4_saved = []
        for module in candidates:
            if isinstance(module, NF4Experts):
                self._nf4_saved.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = types.MethodType(_nf4_fused_forward, module)
            else:
                self._configs.setdefault(id(module.config), (module.config, module.config._experts_implementation))
        for config, _ in self._configs.values():
            config._experts_implementation = EXPERTS_IMPLEMENTATION

    def remove(self) -> None:
        """Restore every router's original forward (idempotent)."""
        if not self.active:
            return
        for router, saved in zip(self.routers, self._saved):
            if saved is _MISSING:
                del router.forward
            else:
                router.forward = saved
            del router._moelab_patched
        for config, saved in self._configs.values():
            config._experts_implementation = saved
        for module, saved in self._nf4_saved:
            if saved is _MISSING:
                del module.forward
            else:
                module.forward = saved
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def patch(model: torch.nn.Module, backend: str = "auto", experts: str = "auto") -> RouterPatch:
    """Route every Qwen2-MoE router of `model` through `moelab.route`, and its routed experts
    through moelab's fused kernel, until removed.

    backend: the router ("auto": the Triton kernel on CUDA tensors, the reference on the CPU).
    experts: "auto" runs the fused kernel when the experts live on CUDA and leaves
    transformers' implementation on the CPU (where the kernel is the slow interpreter);
    "triton" always runs it; "torch" keeps transformers' own experts implementation.
    """
    return RouterPatch(model, backend, experts)
