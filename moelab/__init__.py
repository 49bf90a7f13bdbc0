"""moelab: a Mixture-of-Experts inference engine for Qwen2-MoE, built notebook by notebook."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined; moelab's kernel modules are
# imported after this line, so on a machine without CUDA they run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .engine import Engine  # noqa: E402
from .kv_cache import KVCache, kv_bytes_per_token, kv_cache_bytes, slots_that_fit  # noqa: E402
from .model import MoeForward, experts_forward  # noqa: E402
from .models import PRESETS, load  # noqa: E402
from .patch import patch  # noqa: E402
from .quant import NF4Tensor, dequantize_nf4, memory_report, quantize_nf4  # noqa: E402
from .routing import route, route_reference  # noqa: E402
from .scheduler import Request  # noqa: E402

__all__ = ["PRESETS", "load", "patch", "NF4Tensor", "quantize_nf4", "dequantize_nf4", "memory_report", "route", "route_reference", "KVCache", "MoeForward",
           "experts_forward", "kv_bytes_per_token", "kv_cache_bytes", "slots_that_fit",
           "Engine", "Request"]
__version__ = "0.1.0"
