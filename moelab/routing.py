"""MoE routing: the PyTorch reference and `route`, which dispatches to the Triton kernel.

Built in notebooks/01_moe_routing_in_pytorch (the math) and 02_triton_router_kernel (the kernel).

The routing contract, shared by the reference and the kernel:
- softmax over all experts in float32;
- top-k sorted by weight descending, ties to the lower expert id. Ranking is done on the
  float32 logits, not on the probabilities: softmax is monotonic, so the order is the same,
  but two different logits can round to the same probability and the logits are bit-identical
  in every implementation while `exp` is not;
- NaN logits count as -inf and +inf counts as the largest float32, so a row with no finite
  logit gets ids 0..K-1 with weight 0 and ids never leave [0, E);
- renormalise the k weights to sum to one only when `normalize=True` (Qwen1.5-MoE does not).
"""

import torch

_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_router_args(logits: torch.Tensor, top_k: int) -> None:
    """Raise a ValueError naming the problem, before any work is done."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError("logits has 0 experts (shape [tokens, 0])")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int, got {top_k!r}")
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got top_k={top_k}")


def clean_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy of the logits with NaN -> -inf and +inf -> the largest float32."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))


def route_reference(logits: torch.Tensor, top_k: int, normalize: bool = False):
    """Reference router in plain PyTorch: returns (weights fp32 [T, K], ids int32 [T, K]).

    Built on a stable sort, because `torch.topk` does not give ties to the lower id.
    """
    check_router_args(logits, top_k)
    x = clean_logits(logits)
    # Stable descending sort keeps equal logits in id order: ties go to the lower id.
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :top_k]
    row_max = x.max(dim=-1, keepdim=True).values
    has_finite = row_max > float("-inf")
    # A row with no finite logit would give 0/0 = NaN; its weights are 0 by contract.
    probs = torch.softmax(torch.where(has_finite, x, torch.zeros_like(x)), dim=-1)
    weights = torch.where(has_finite, probs.gather(1, order), torch.zeros((), device=x.device))
    if normalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(torch.float32).tiny), weights)
    return weights, order.to(torch.int32)


def route(logits: torch.Tensor, top_k: int, normalize: bool = False, backend: str = "auto"):
    """Route tokens to experts: returns (weights fp32 [T, K], ids int32 [T, K]).

    backend: "auto" runs the Triton kernel on CUDA tensors and the reference on the CPU,
    "triton" forces the kernel (on the CPU through the Triton interpreter: slow, for
    checking), "torch" forces the reference.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_kernel = backend == "triton" or (backend == "auto" and logits.is_cuda)
    if not use_kernel:
        return route_reference(logits, top_k, normalize)
    check_router_args(logits, top_k)
    from .kernels.router import router_topk

    return router_topk(logits, top_k, normalize)
