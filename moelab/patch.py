"""Hot-swap moelab's router into a transformers Qwen2-MoE model.

Built in notebooks/03_patching_transformers. Every `Qwen2MoeTopKRouter` gets an instance
`forward` that computes the same router logits and hands the softmax / top-k / renormalise
part to `moelab.route`, keeping transformers' return contract: (router_logits in the model
dtype, top-k weights in the model dtype, top-k ids int64). Removing the patch restores
the original forward exactly.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from .routing import route

_MISSING = object()


def _routed_forward(self, hidden_states, backend: str = "auto"):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = route(router_logits, self.top_k, normalize=self.norm_topk_prob, backend=backend)
    return router_logits, weights.to(router_logits.dtype), ids.to(torch.int64)


class RouterPatch:
    """Handle returned by `moelab.patch`: `.remove()` it, or use it as a context manager."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto"):
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
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
        self.active = True

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
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def patch(model: torch.nn.Module, backend: str = "auto") -> RouterPatch:
    """Route every Qwen2-MoE router of `model` through `moelab.route` until removed."""
    return RouterPatch(model, backend)
