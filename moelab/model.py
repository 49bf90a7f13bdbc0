"""moelab's own Qwen2-MoE forward pass over a slot KV cache.

Built in notebooks/06_kv_cache_slots. `MoeForward` runs a transformers Qwen2MoeForCausalLM
with the model's own weight tensors (no copies), but owns the computation: RMSNorm, rotary
embeddings (cos/sin from the model's own `rotary_emb`, so RoPE matches transformers exactly),
q/k/v with bias, attention over `moelab.KVCache` slots each with its own length, the MoE block
through `moelab.route`, and the shared expert behind its sigmoid gate. Dense-MLP layers
(`mlp_only_layers`, `decoder_sparse_step`) run their plain MLP.

Two entry points: `prefill` packs prompts of different lengths into given slots in one pass;
`decode` runs one token for each of a set of slots in one batch. The decode step reads slot
ids, positions and lengths from device tensors and writes the cache with indexed writes: no
host sync inside it (with `check=False`), which is what lets a CUDA graph capture it later.

`experts_forward` is the seam for the routed experts: the PyTorch path (`experts_torch`) on the CPU, the fused
(bf16 / NF4) kernel later, passed as `MoeForward(model, experts_fn=...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fuse import fuse_attention_input, fuse_moe_input
from .kv_cache import KVCache
from .models import check_supported
from .quant import NF4Experts, NF4Tensor, dequantize_nf4
from .routing import route

# Where `experts_torch` does not take the grouped GEMM (`torch._grouped_mm`; CUDA, float64, several
# CPU threads: `_grouped_mm_wins`), up to this many tokens it runs every expert on every token
# (device-only, fixed shapes: a decode batch of up to 64 slots); longer inputs (prefill) are sorted
# by expert, through the grouped GEMM on the CPU, else in a loop. 64 is where the dense path and
# the loop crossed for `tiny` on a CPU core (0.2 vs 0.3 ms at 1 token, 1.4 vs 1.5 ms at 64, 5.1 vs
# 1.8 ms at 128).
DENSE_MAX_TOKENS = 64

# projections="auto" runs the fused projections (moelab.fuse) on CUDA up to this many tokens per
# step: benchmarks/results/decode_proj_2026-11-29_h200.json (graph_fused_proj vs graph_fused).
FUSED_MAX_TOKENS = 1

# From this many tokens (a prefill) a bitsandbytes NF4 Linear4bit on CUDA runs as moelab's one
# dequantize kernel (`moelab.kernels.experts.nf4_to_dense`: codes and double-quantized absmax
# decoded in one pass, bitsandbytes' exact bf16 weight) and cuBLAS, in place of bitsandbytes' own
# path (its absmax, weight and cast kernels before cuBLAS, or its gemm_4bit). On an H100 whole NF4
# prefills of 16 / 32 / 48 / 64 tokens took 8.87 / 8.89 / 10.14 / 11.14 ms against 9.40 / 9.44 /
# 10.72 / 11.63 (benchmarks/results/nf4_prefill_dequant_ab_2026-12-06_h100.json); the decode step
# at batch 16 and 64, whose dense linears take the same path, 14.59 / 32.17 against 14.72 / 32.41 ms.
NF4_DEQUANT_MIN_TOKENS = 16


# A dense lm_head at up to this many tokens runs through moelab's GEMV (`moelab.kernels.gemv`)
# rather than cuBLAS: on an H100 at one token, 151,936 x 2,048 bf16 in 195 against 205 us
# (benchmarks/results/lm_head_probe_2026-12-07_h100.json). Above one token the GEMV would read the
# 622 MB weight once per token.
HEAD_GEMV_MAX_TOKENS = 1


def _fuse_rope_attention() -> bool:
    """Whether decode with both kernels (rotary + cache write, decode attention) runs them as one:
    `moelab.kernels.attention.rope_decode_attention` (MOELAB_ROPE_ATTENTION=0: two, for comparisons)."""
    from .kernels import attention

    return attention.FUSE_ROPE


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalise in float32, scale in the input dtype.

    In float32 both casts are no-ops and the formula is exactly PyTorch's fused
    `F.rms_norm` (one op instead of six; bit-identical, tests/test_model.py checks)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim: RoPE pairs dim i with dim i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] by its tokens' angles; cos, sin: [tokens, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, once: cos and a signed sin, [tokens, 1, head_dim], for `apply_rope_tables`.

    rotate_half(x) * sin = (-x2 * s1, x1 * s2) = roll(x) * (-s1, s2) with roll(x) = (x2, x1):
    negating the sine once per step instead of x in every layer gives the very same numbers."""
    half = cos.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None]


def apply_rope_tables(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`apply_rope` with the tables of `rope_tables`: bit-identical, four ops instead of seven."""
    cos, signed_sin = tables
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _experts_dense(hidden, weights, ids, experts):
    """Every expert on every token, combined with a dense [T, E] weight matrix that is zero
    outside each token's top-k. No host sync and fixed shapes; E/K times the FLOPs of the
    routed work, but a decode step is bound by reading the expert weights, which happens
    once per expert here.

    Three big ops instead of one per expert: gate/up of all E experts as one GEMM against
    `gate_up_proj` viewed as [E * 2I, H] (a free view), the routing weights folded into the
    activations (zero for unrouted experts), then one batched GEMM through each expert's
    `down_proj` summed over experts. The weights are scatter-added: a token whose top-k
    names one expert twice gets it twice (`scatter_` would keep only one of the two)."""
    num_tokens, num_experts = hidden.shape[0], experts.num_experts
    dense_w = hidden.new_zeros(num_tokens, num_experts).scatter_add_(1, ids.long(), weights.to(hidden.dtype))
    gate_up = F.linear(hidden, experts.gate_up_proj.reshape(-1, hidden.shape[1]))  # [T, E * 2I]
    gate, up = gate_up.view(num_tokens, num_experts, -1).chunk(2, dim=-1)  # [T, E, I] each
    act = experts.act_fn(gate).mul_(up).mul_(dense_w[:, :, None])  # weight 0: the expert adds 0
    return torch.bmm(act.transpose(0, 1), experts.down_proj.transpose(1, 2)).sum(0)  # [E, T, H] -> [T, H]


def _pairs_by_expert(ids: torch.Tensor, num_experts: int):
    """The (token, k) pairs sorted by expert: `order` (pair indices, stable), `rows` (the token
    of each sorted pair) and `counts` (pairs per expert, a device tensor)."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    return order, order // ids.shape[1], torch.bincount(flat, minlength=num_experts)


def _experts_grouped(hidden, weights, ids, experts):
    """Sort the (token, k) pairs by expert and run each expert once on its rows. One host
    sync (the per-expert counts), fine for prefill."""
    order, rows, counts = _pairs_by_expert(ids, experts.num_experts)
    x = hidden[rows]
    out = torch.empty_like(x)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        gate, up = F.linear(x[start : start + n], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        out[start : start + n] = F.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
        start += n
    out = out * weights.reshape(-1)[order, None].to(hidden.dtype)
    return torch.zeros_like(hidden).index_add_(0, rows, out)


def _experts_grouped_mm(hidden, weights, ids, experts):
    """`_experts_grouped` without its Python loop: each projection of all experts is one
    `torch._grouped_mm` call over the sorted rows, told where each expert's rows end. Only the
    routed FLOPs, no host sync.

    On one CPU thread a whole `tiny` step ran at most ~2 % slower (a tie) and mostly faster than
    with the dense path (up to 64 tokens) and the loop (above): decode of 1 / 8 / 64 slots 2.40 /
    4.02 / 10.28 ms against 3.13 / 4.31 / 12.81 in one run of alternating rounds, up to ~25 %
    faster at 1-8 slots in others (notebook 06: a step reads cold weights, and the dense path reads every expert's).
    PyTorch's CPU grouped GEMM is one small product per expert, each on one thread, while the
    dense path's three big GEMMs spread over threads: on two threads the dense path was ~10 %
    faster at 8-32 slots, hence `_grouped_mm_wins`."""
    order, rows, counts = _pairs_by_expert(ids, experts.num_experts)
    ends = counts.cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(hidden[rows], experts.gate_up_proj.transpose(1, 2), offs=ends).chunk(2, dim=-1)
    out = torch._grouped_mm(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), offs=ends)
    out = out * weights.reshape(-1)[order, None].to(hidden.dtype)
    return torch.zeros_like(hidden).index_add_(0, rows, out)


def _has_grouped_mm(hidden: torch.Tensor) -> bool:
    """Whether `_experts_grouped_mm` can run here: PyTorch's CPU grouped GEMM (torch >= 2.9; before
    2.11 it also wanted 16-byte aligned tensors, which moelab's floor of 2.11 makes moot) takes
    float32, bfloat16 and float16. CUDA keeps the dense path: fixed shapes a graph can capture."""
    return (hidden.device.type == "cpu" and hasattr(torch, "_grouped_mm")
            and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _grouped_mm_wins(hidden: torch.Tensor) -> bool:
    """Where `experts_torch` takes the grouped GEMM: on one CPU thread at every token count, with
    more threads only above DENSE_MAX_TOKENS (see `_experts_grouped_mm`)."""
    return _has_grouped_mm(hidden) and (torch.get_num_threads() == 1 or hidden.shape[0] > DENSE_MAX_TOKENS)


def experts_forward(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer_experts,
                    shared=None) -> torch.Tensor:
    """The routed experts of one layer, MoeForward's default: on CUDA moelab's fused Triton
    kernel (`moelab.kernels.experts`, notebook 05: grouped by expert on the device, each
    touched expert's weights read once, bf16 or NF4, no host sync), elsewhere
    `experts_torch` (the interpreter would be far slower than PyTorch on a CPU).

    shared: a `moelab.kernels.experts.SharedExpert` to add (the fused kernel streams it in its
    decode launches, notebook 08); weights may be float32: every path rounds them to the
    hidden dtype itself, as transformers does."""
    if hidden.is_cuda:
        from .kernels.experts import fused_experts_forward
        return fused_experts_forward(hidden, weights, ids, layer_experts, shared=shared)
    out = experts_torch(hidden, weights, ids, layer_experts)
    if shared is not None:
        from .kernels.experts import shared_expert_torch
        out = out + shared_expert_torch(hidden, shared)
    return out


# MoeForward passes float32 router weights and the shared expert to functions marked so.
experts_forward.takes_shared_expert = True


def experts_torch(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layer_experts) -> torch.Tensor:
    """The routed experts of one layer in PyTorch: sum_k weights[t, k] * expert_{ids[t, k]}(hidden[t]).

    hidden [T, H]; weights [T, K] and ids int [T, K] from `moelab.route` (MoeForward rounds the
    weights to the hidden dtype first, as transformers does); layer_experts is transformers'
    `Qwen2MoeExperts` (fused `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`). On the CPU it
    runs grouped by expert through PyTorch's grouped GEMM (with several threads only above
    DENSE_MAX_TOKENS tokens: `_experts_grouped_mm`); otherwise up to DENSE_MAX_TOKENS tokens
    dense (no host sync), above that grouped by expert in a loop (CUDA, float64).
    moelab's NF4 experts (`moelab.quant.NF4Experts`, notebook 04) run their own forward.
    This is the seam a fused kernel (bf16 or NF4) replaces, with the same signature.
    """
    if isinstance(layer_experts, NF4Experts):
        return layer_experts(hidden, ids, weights)
    if _grouped_mm_wins(hidden) and ids.numel():
        return _experts_grouped_mm(hidden, weights, ids, layer_experts)
    if hidden.shape[0] <= DENSE_MAX_TOKENS:
        return _experts_dense(hidden, weights, ids, layer_experts)
    return _experts_grouped(hidden, weights, ids, layer_experts)


def _foldable_shared(mlp, fused, nf4_ok: bool):
    """What the experts kernels need to stream a layer's shared expert (`SharedExpert`), from its
    fused MoE inputs (`moelab.fuse.FusedMoeInput`): (gate_up, down, router weight, router sizes),
    the router weight being the router and shared-gate rows that stay one small product. Dense:
    row slices of the fused weight and down_proj's weight. NF4 (only where `nf4_ok`: the CUDA
    kernels fold it, the CPU path does not): the jointly quantized gate/up and down_proj seen as
    NF4 (`moelab.quant.linear4bit_nf4`). None where it cannot fold (not SiLU, other modules)."""
    from .kernels.experts import is_silu
    from .quant import linear4bit_nf4

    shared = mlp.shared_expert
    if not is_silu(shared.act_fn):
        return None
    if fused.nf4_gate_up is not None:
        down = linear4bit_nf4(shared.down_proj) if nf4_ok else None
        return None if down is None else (fused.nf4_gate_up, down, fused.weight, fused.sizes)
    if type(shared.down_proj) is not nn.Linear:
        return None
    inter = fused.sizes[0]
    return fused.weight[: 2 * inter], shared.down_proj.weight, fused.weight[2 * inter:], fused.sizes[2:]


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a plain nn.Linear as one `F.linear`, skipping nn.Module's call machinery
    (a few microseconds a call, which add up in a small model's step); a bitsandbytes NF4
    Linear4bit on CUDA through moelab's kernels on its own storage (`moelab.quant.linear4bit_nf4`):
    for a few tokens the GEMV (`moelab.kernels.gemv`: the experts' NF4 decode path, in place of
    bitsandbytes' gemm_4bit), above those the tensor cores where `_nf4_mma_linear` allows (up to
    `nf4_mma.LINEAR_MAX_TOKENS`), beyond them from NF4_DEQUANT_MIN_TOKENS tokens `_dequantized` then
    cuBLAS; anything else through its own forward."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    if x.is_cuda and type(module).__name__ == "Linear4bit" and x.dim() == 2:
        from .kernels.gemv import MAX_TOKENS, linear_gemv
        from .quant import linear4bit_nf4

        nf4 = linear4bit_nf4(module)
        if nf4 is not None and nf4.dtype == x.dtype and (module.bias is None or module.bias.dtype == x.dtype):
            if x.shape[0] <= MAX_TOKENS:
                return linear_gemv(x, nf4, module.bias)
            if _nf4_mma_linear(x, nf4):
                from .kernels import nf4_mma

                return nf4_mma.linear(x, nf4, module.bias)
            if x.shape[0] >= NF4_DEQUANT_MIN_TOKENS:
                return F.linear(x, _dequantized(nf4, x), module.bias)
    return module(x)


def _nf4_mma_linear(x: torch.Tensor, weight: NF4Tensor | None = None) -> bool:
    """Whether an NF4 linear of x's tokens runs as `moelab.kernels.nf4_mma.linear`: on CUDA, above the
    GEMV's few tokens (`moelab.kernels.gemv.MAX_TOKENS`) and up to `nf4_mma.LINEAR_MAX_TOKENS` (q/k/v
    then as their joint weight in one launch, the shared expert in two behind the routed experts);
    with `weight`, also whether that weight fits it."""
    if not (x.is_cuda and x.dim() == 2):  # first: this runs every layer, on the CPU too
        return False
    from .kernels import nf4_mma
    from .kernels.gemv import MAX_TOKENS

    if not (MAX_TOKENS < x.shape[0] <= nf4_mma.LINEAR_MAX_TOKENS and nf4_mma.ENABLED and torch.version.hip is None):
        return False
    return weight is None or (weight.shape[0] == 1 and weight.shape[2] % 64 == 0 and weight.blocksize == 64
                              and weight.dtype == x.dtype)


def _dequantized(weight: NF4Tensor, x: torch.Tensor) -> torch.Tensor:
    """A one-expert NF4 weight [1, N, K] as a dense [N, K] in x's dtype, for a GEMM over many
    tokens: on CUDA moelab's one dequantize kernel (`moelab.kernels.experts.nf4_to_dense`, see
    NF4_DEQUANT_MIN_TOKENS), elsewhere PyTorch's `dequantize_nf4` (the interpreter would be slow)."""
    if x.is_cuda:
        from .kernels.experts import nf4_to_dense

        return nf4_to_dense(weight)[0].to(x.dtype)
    return dequantize_nf4(weight)[0].to(x.dtype)


def _project(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for the fused projections: on CUDA, for a few tokens, moelab's
    GEMV kernel (`moelab.kernels.gemv`: it streams W faster than cuBLAS's GEMM tiles at one
    token, in one launch), else F.linear. weight may be a jointly quantized NF4 weight
    [1, N, K] (`moelab.quant.JointNF4`): elsewhere than that GEMV it is dequantized first (`_dequantized`)."""
    if isinstance(weight, NF4Tensor):
        from .kernels.gemv import MAX_TOKENS, linear_gemv

        if x.is_cuda and x.shape[0] <= MAX_TOKENS and weight.dtype == x.dtype:
            return linear_gemv(x, weight, bias)
        if _nf4_mma_linear(x, weight) and (bias is None or bias.dtype == x.dtype):
            from .kernels import nf4_mma

            return nf4_mma.linear(x, weight, bias)
        return F.linear(x, _dequantized(weight, x), bias)
    if x.is_cuda and weight.dtype == x.dtype and weight.stride(1) == 1:
        from .kernels.gemv import MAX_TOKENS, linear_gemv
        if x.shape[0] <= MAX_TOKENS:
            return linear_gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    """A SwiGLU MLP (the shared expert, or a dense layer's MLP) through its own Linear layers."""
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _as_index(values, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, device=device)
    if t.numel() == 0:
        t = t.to(torch.int64)  # torch.as_tensor([]) is float32
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got shape {tuple(t.shape)} dtype {t.dtype}")
    return t.to(torch.int64)


class MoeForward:
    """moelab's forward pass for a transformers Qwen2MoeForCausalLM over a `KVCache`.

    experts_fn: the routed-experts seam, `fn(hidden, weights, ids, layer_experts) -> [T, H]`.
    A function marked `takes_shared_expert = True` (moelab's `experts_forward` and
    `fused_experts_forward`) also takes `shared=` (a `SharedExpert` to add) and float32 router
    weights (it rounds them itself); any other gets bf16-rounded weights and no shared expert.
    route_backend: passed to `moelab.route` ("auto": the Triton kernel on CUDA).
    attention: decode attention, "kernel" (moelab's Triton decode-attention kernel, which
    reads only each slot's filled keys), "sdpa" (PyTorch's SDPA over the whole masked cache
    rows) or "auto": the kernel on CUDA, SDPA on the CPU (faster there than the interpreter).
    Prefill always runs SDPA.
    rope: "kernel" rotates q and k and writes the cache in one Triton kernel
    (`moelab.kernels.rope_cache`), "torch" in PyTorch ops, "auto": the kernel on CUDA.
    norm: "kernel" runs each residual add and the RMSNorm after it as one Triton kernel
    (`moelab.kernels.rmsnorm`), "torch" in PyTorch ops, "auto": the kernel on CUDA. With the
    fused projections and a folded shared expert, a step of up to 4 tokens runs the
    post-attention add and norm, the router product and the top-k as one kernel instead
    (`moelab.kernels.norm_route`; on the CPU only with route_backend="triton").
    projections: "fused" runs q/k/v as one GEMM and the shared expert's gate and up, the
    router and the shared expert's gate as another (`moelab.fuse`: the model's parameters are
    re-seated as views of the fused weights, no copies); with moelab's experts function the
    shared expert then runs inside the experts kernels and the router with the shared gate
    is one small product, and on CUDA these products and o_proj run as moelab's GEMV kernel
    (`moelab.kernels.gemv`) for up to 4 tokens. "separate": one GEMM per Linear,
    "auto": on CUDA fused for steps of up to FUSED_MAX_TOKENS tokens, separate above (on an
    H200, fused decode was 1.17x at batch 1 but 0.87x at 8 and 0.91x at 64); on the CPU
    separate. NF4 (bitsandbytes) layers fuse only where `moelab.quant.quantize_layer_` quantized
    them jointly (`moelab.quant.JointNF4`: q/k/v, the shared expert's gate/up); on CUDA their
    decode then runs moelab's NF4 GEMV and the shared expert inside the experts' decode kernels
    (a `SharedExpert` of NF4 weights, as in bf16), and any other NF4 Linear4bit of a few tokens
    moelab's GEMV too.
    """

    def __init__(self, model, experts_fn=experts_forward, route_backend: str = "auto", attention: str = "auto",
                 rope: str = "auto", norm: str = "auto", projections: str = "auto"):
        check_supported(model.config)
        if route_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"route_backend must be 'auto', 'triton' or 'torch', got {route_backend!r}")
        if attention not in ("auto", "kernel", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'kernel' or 'sdpa', got {attention!r}")
        if projections not in ("auto", "fused", "separate"):
            raise ValueError(f"projections must be 'auto', 'fused' or 'separate', got {projections!r}")
        for name, value in (("rope", rope), ("norm", norm)):
            if value not in ("auto", "kernel", "torch"):
                raise ValueError(f"{name} must be 'auto', 'kernel' or 'torch', got {value!r}")
        self.attention, self.rope, self.norm = attention, rope, norm
        self.model = model
        self.config = model.config
        self.experts_fn = experts_fn
        self.route_backend = route_backend
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.num_heads = model.config.num_attention_heads
        self.num_kv_heads = model.config.num_key_value_heads
        on_cuda = model.lm_head.weight.device.type == "cuda"
        if projections == "auto" and not on_cuda:
            projections = "separate"
        self.projections = projections
        for index in range(len(self.layers)) if self.projections != "separate" else ():
            self._fused_qkv(index)  # fuse now, not in the first step
            self._fused_moe_input(index)

    @property
    def fused_qkv(self) -> list:
        """Per layer, its fused q/k/v (`moelab.fuse.FusedAttentionInput`), or None where the
        projections run separately (projections="separate", or quantized layers)."""
        return [self._fused_qkv(i) for i in range(len(self.layers))]

    @property
    def fused_moe_input(self) -> list:
        """Per layer, its fused MoE-block inputs (`moelab.fuse.FusedMoeInput`), or None."""
        return [self._fused_moe_input(i) for i in range(len(self.layers))]

    def _fused_qkv(self, index):
        # fuse_* is idempotent and fuses again if the model was moved or cast since.
        return None if self.projections == "separate" else fuse_attention_input(self.layers[index].self_attn)

    def _fused_moe_input(self, index):
        return None if self.projections == "separate" else fuse_moe_input(self.layers[index].mlp)

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        """A slot cache shaped for this model, in its dtype and on its device."""
        return KVCache.for_model(self.model, num_slots, max_seq_len)

    # ---- entry points -------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, cache: KVCache, prompts: Sequence, slots: Sequence[int], all_logits: bool = False,
                offsets: Sequence[int] | None = None):
        """Run whole prompts (token-id lists or 1-D tensors, any lengths) into their allocated
        `slots` in one pass, from position 0. Returns the last token's logits [B, vocab], or
        with `all_logits` a list of [len_i, vocab], one per prompt.

        offsets: for chunked prefill (notebooks/07_continuous_batching), where each prompt
        chunk starts in its slot; it must be the slot's current length (checked), so a long
        prompt can be fed over several calls. Default: every prompt starts at position 0."""
        self._check_cache(cache)
        slots = [int(s) if isinstance(s, torch.Tensor) else s for s in slots]
        if len(prompts) != len(slots):
            raise ValueError(f"got {len(prompts)} prompts for {len(slots)} slots")
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots must be distinct, got {slots}")
        tokens = [_as_index(p, cache.device, "each prompt") for p in prompts]
        lens = [t.numel() for t in tokens]
        offsets = [0] * len(slots) if offsets is None else [int(o) for o in offsets]
        if len(offsets) != len(slots):
            raise ValueError(f"got {len(offsets)} offsets for {len(slots)} slots")
        for slot, n, offset in zip(slots, lens, offsets):
            cache.check_slot(slot)
            if n == 0:
                raise ValueError(f"the prompt for slot {slot} is empty")
            if offset + n > cache.reserved(slot):
                raise ValueError(
                    f"a prompt of {offset + n} tokens does not fit slot {slot}, allocated for {cache.reserved(slot)}"
                )
        if any(offsets):
            current = cache.lengths[torch.tensor(slots, device=cache.device)].tolist()
            if current != offsets:
                raise ValueError(f"offsets {offsets} must equal the slots' current lengths {current}")
        flat = torch.cat(tokens)
        self._check_tokens(flat)

        device = cache.device
        lens_t = torch.tensor(lens, device=device)
        slots_t = torch.tensor(slots, device=device)
        offsets_t = torch.tensor(offsets, device=device)
        batch_of = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)  # [N]
        starts = torch.cumsum(lens_t, 0) - lens_t
        rows = torch.arange(flat.numel(), device=device) - starts[batch_of]  # [N] index within its prompt
        positions = rows + offsets_t[batch_of]  # [N] position in its slot
        max_len = max(lens)
        key_len = max(o + n for o, n in zip(offsets, lens))
        # Queries sit in a padded [B, max_len] grid; query j of prompt b sees keys
        # 0..offset_b + j of its slot. Padding rows see keys too (never empty, so no NaN) and
        # are dropped.
        grid_pos = offsets_t[:, None] + torch.arange(max_len, device=device)[None, :]  # [B, max_len]
        mask = torch.arange(key_len, device=device)[None, None, None, :] <= grid_pos[:, None, :, None]

        def attend(layer, q):  # q [N, heads, head_dim] -> [N, heads * head_dim]
            q_grid = q.new_zeros(len(lens), max_len, self.num_heads, self.head_dim)
            q_grid[batch_of, rows] = q
            k = cache.k[layer, :, :, :key_len].index_select(0, slots_t)  # [B, kv_heads, key_len, head_dim]
            v = cache.v[layer, :, :, :key_len].index_select(0, slots_t)
            out = self._sdpa(q_grid.transpose(1, 2), k, v, mask)  # [B, heads, max_len, head_dim]
            return out.transpose(1, 2)[batch_of, rows].reshape(flat.numel(), -1)

        hidden = self._run(cache, flat, slots_t[batch_of], positions, attend)
        cache.lengths[slots_t] = offsets_t + lens_t
        if all_logits:
            return list(_linear(self.model.lm_head, hidden).split(lens))
        last = starts + lens_t - 1
        return _linear(self.model.lm_head, hidden[last])

    @torch.no_grad()
    def prefill_padded(self, cache: KVCache, tokens: torch.Tensor, slot: torch.Tensor,
                       length: torch.Tensor) -> torch.Tensor:
        """One whole prompt into one slot from position 0, padded to a fixed length: the
        capturable prefill that `moelab.graphs.PrefillGraphs` records (notebook 08).

        tokens: int64 [L] on the cache's device, the prompt in tokens[:length], any ids after;
        slot, length: int64 [1] device tensors. No host sync and every shape fixed by L. The
        padding rows run too: they write keys at positions length..L-1 of the slot, past its
        length (never read, overwritten by decode) and their outputs are dropped. Sets the
        slot's length; returns the last prompt token's logits [1, vocab]. Checks nothing: the
        caller (the Engine) validated the prompt and allocated the slot for at least L tokens'
        room in its row (L <= max_seq_len)."""
        self._check_cache(cache)
        n = tokens.numel()
        positions = torch.arange(n, device=cache.device)

        def attend(layer, q):  # q [L, heads, head_dim], causal over the slot's first L keys
            k = cache.k[layer, :, :, :n].index_select(0, slot)  # [1, kv_heads, L, head_dim]
            v = cache.v[layer, :, :, :n].index_select(0, slot)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, scale=self.scaling,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
            return out[0].transpose(0, 1).reshape(n, -1)

        hidden = self._run(cache, tokens, slot.repeat(n), positions, attend)
        cache.lengths[slot] = length
        return _linear(self.model.lm_head, hidden.index_select(0, length - 1))

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens, slots, check: bool = True) -> torch.Tensor:
        """One decode step: token i is appended to slot i's sequence. Returns logits [B, vocab].

        tokens, slots: [B] int (device tensors on the hot path). `check` validates the slots
        and their room on the host (one sync); the engine's graph path turns it off.
        """
        self._check_cache(cache)
        tokens = _as_index(tokens, cache.device, "tokens")
        slots = _as_index(slots, cache.device, "slots")
        if tokens.shape != slots.shape or tokens.numel() == 0:
            raise ValueError(
                f"tokens and slots must have one equal, non-empty shape [B]: got {tuple(tokens.shape)} "
                f"and {tuple(slots.shape)}"
            )
        if check:
            self._check_decode(cache, tokens, slots)
        positions = cache.lengths[slots]  # [B] the position of each new token
        if self._decode_kernel(cache) and self._rope_kernel(cache) and _fuse_rope_attention():
            from .kernels.attention import rope_decode_attention

            def attend(layer, q, k, v, rope):  # the new token's q, k, v; rope: (cos, sin) [B, head_dim]
                out = rope_decode_attention(q, k, v, *rope, cache.k[layer], cache.v[layer], slots, positions,
                                            scale=self.scaling)
                return out.reshape(q.shape[0], -1)

            attend.writes_cache = True  # rotary, cache write and attention: one kernel (notebook 08)
        elif self._decode_kernel(cache):
            from .kernels.attention import decode_attention

            lengths = positions + 1  # keys each query sees, its own included (a device tensor)

            def attend(layer, q):  # q [B, heads, head_dim]; reads keys 0..position of each slot only
                out = decode_attention(q, cache.k[layer], cache.v[layer], slots, lengths, scale=self.scaling)
                return out.reshape(q.shape[0], -1)
        elif 2 * slots.numel() >= cache.num_slots:
            # Most slots decode: attend over every slot of the cache in place rather than copy
            # the batch's keys and values out of it first. Each query sits in its slot's row of
            # a zero grid and sees keys 0..position (slots outside the batch see up to their own
            # length, at least key 0, so no row is empty; their outputs are dropped).
            # SDPA reads the whole [slot, max_seq_len] rows, padding included.
            key_pos = torch.arange(cache.max_seq_len, device=cache.device)[None, None, None, :]
            mask = key_pos <= cache.lengths[:, None, None, None]  # lengths[slots] == positions here

            def attend(layer, q):  # q [B, heads, head_dim]
                grid = q.new_zeros(cache.num_slots, q.shape[1], 1, q.shape[2])
                grid[slots] = q[:, :, None]
                out = self._sdpa(grid, cache.k[layer], cache.v[layer], mask)  # [slots, heads, 1, head_dim]
                return out[slots].reshape(q.shape[0], -1)
        else:
            # A few slots of many: copy the batch's rows out of the cache, attend over those.
            key_pos = torch.arange(cache.max_seq_len, device=cache.device)[None, None, None, :]
            mask = key_pos <= positions[:, None, None, None]

            def attend(layer, q):  # q [B, heads, head_dim]
                k = cache.k[layer].index_select(0, slots)  # [B, kv_heads, max_seq_len, head_dim]
                v = cache.v[layer].index_select(0, slots)
                out = self._sdpa(q[:, :, None], k, v, mask)
                return out.reshape(q.shape[0], -1)

        hidden = self._run(cache, tokens, slots, positions, attend)
        cache.lengths[slots] = positions + 1
        return self._head(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head of a decode step's hidden states (see HEAD_GEMV_MAX_TOKENS)."""
        head = self.model.lm_head
        if (type(head) is nn.Linear and hidden.is_cuda and hidden.shape[0] <= HEAD_GEMV_MAX_TOKENS
                and head.weight.dtype == hidden.dtype and head.weight.stride(1) == 1):
            from .kernels.gemv import linear_gemv

            return linear_gemv(hidden, head.weight, head.bias)
        return _linear(head, hidden)

    # ---- the layers -----------------------------------------------------------------------

    def _run(self, cache, tokens, slots, positions, attend):
        """Embed, run every decoder layer on N tokens (writing their keys and values at
        (slots[i], positions[i])), final norm. Tokens are rows of one [N, hidden] matrix."""
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)
        # The model's own rotary module, so cos/sin are bit-identical to transformers'.
        cos, sin = inner.rotary_emb(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        rope = (cos, sin) if self._rope_kernel(cache) else rope_tables(cos, sin)
        fused = self.norm == "kernel" or (self.norm == "auto" and hidden.is_cuda)
        delta = None  # each block's output, added to the residual stream by the next norm
        for index, layer in enumerate(self.layers):
            hidden, x = self._add_norm(hidden, delta, layer.input_layernorm, fused)
            delta = self._attention(index, layer.self_attn, x, cache, slots, positions, rope, attend)
            hidden, delta = self._norm_and_moe(index, hidden, delta, layer, fused)
        return self._add_norm(hidden, delta, inner.norm, fused)[1]

    def _rope_kernel(self, cache) -> bool:
        """Whether RoPE and the cache write run as moelab's Triton kernel (see `rope`)."""
        return self.rope == "kernel" or (self.rope == "auto" and cache.device.type == "cuda")

    def _add_norm(self, hidden, delta, norm, fused):
        """(hidden + delta, its RMSNorm); delta None: no add. `fused`: one Triton kernel."""
        if fused and (delta is None or delta.dtype == hidden.dtype):
            from .kernels.rmsnorm import add_rms_norm

            return add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
        if delta is not None:
            hidden = hidden + delta
        return hidden, rms_norm(hidden, norm.weight, norm.variance_epsilon)

    def _attention(self, index, attn, x, cache, slots, positions, rope, attend):
        """q/k/v, RoPE, the cache write, attention, o_proj. rope: (cos, sin) for the kernel,
        else `rope_tables`."""
        n, heads, kv_heads, head_dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        fused = self._fused_for(self._fused_qkv, index, x)
        if fused is not None:  # one GEMM, split into column views
            qkv = _project(x, fused.weight, fused.bias)
            q, k, v = qkv.split(fused.sizes, dim=-1)
        else:
            q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
        v = v.view(n, kv_heads, head_dim)
        if getattr(attend, "writes_cache", False):  # decode: rotary, cache write and attention in one kernel
            out = attend(index, q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v, rope)
            return self._o_proj(attn, out, fused)
        # Keys are cached after RoPE, as in transformers.
        if self._rope_kernel(cache):
            from .kernels.rope_cache import rope_and_cache_write

            q = rope_and_cache_write(q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v, *rope,
                                     cache.k[index], cache.v[index], slots, positions)
        else:
            if fused is not None:  # q and k are adjacent columns: rotate them as one tensor
                qk = apply_rope_tables(qkv[:, : (heads + kv_heads) * head_dim].view(n, heads + kv_heads, head_dim),
                                       rope)
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q = apply_rope_tables(q.view(n, heads, head_dim), rope)
                k = apply_rope_tables(k.view(n, kv_heads, head_dim), rope)
            cache.write(index, slots, positions, k, v)
        return self._o_proj(attn, attend(index, q), fused)

    def _o_proj(self, attn, out, fused):
        if fused is not None and type(attn.o_proj) is nn.Linear:
            return _project(out, attn.o_proj.weight, attn.o_proj.bias)
        return _linear(attn.o_proj, out)

    def _fused_for(self, fused_inputs, index, x):
        """Layer `index`'s fused inputs (`fused_inputs`: `_fused_qkv` or `_fused_moe_input`) where this
        step takes them: at the fused projections' token counts (`_fuse`), and at the NF4 tensor-core
        linear's (`_nf4_mma_linear`) only an NF4 layer's joint weights (q/k/v, or the shared gate/up)."""
        if self._fuse(x.shape[0]):
            return fused_inputs(index)
        if not _nf4_mma_linear(x):
            return None
        fused = fused_inputs(index)
        joint_nf4 = (isinstance(getattr(fused, "weight", None), NF4Tensor)  # q/k/v
                     or getattr(fused, "nf4_gate_up", None) is not None)     # the MoE inputs
        return fused if joint_nf4 else None

    def _fuse(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` runs the fused projections (see `projections`)."""
        return self.projections == "fused" or (self.projections == "auto" and num_tokens <= FUSED_MAX_TOKENS)

    def _decode_kernel(self, cache) -> bool:
        """Whether decode attention runs moelab's kernel (see `attention`)."""
        return self.attention == "kernel" or (self.attention == "auto" and cache.device.type == "cuda")

    def _sdpa(self, q, k, v, mask):
        """q [B, heads, Lq, D] over k, v [B, kv_heads, Lk, D]; grouped-query heads share K/V
        (enable_gqa reads each KV head for its query group instead of copying it)."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads
        )

    def _norm_and_moe(self, index, hidden, delta, layer, fused_norm):
        """The residual add, the post-attention norm and the MoE block: (new residual, block output).
        Where the router and the shared gate are one small product beside a folded shared expert
        (`_shared_parts`) and the norm runs as a kernel, a few tokens' add, norm, router product and
        top-k run as one launch (`moelab.kernels.norm_route`, notebook 08): two kernel boundaries
        fewer per layer."""
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        parts = self._norm_route_parts(index, hidden, delta, norm, mlp, fused_norm)
        if parts is not None:
            from .kernels.experts import SharedExpert
            from .kernels.norm_route import add_norm_route

            gate_up, down, router_weight, router_sizes = parts
            num_experts = router_sizes[0]
            hidden, x, logits, weights, ids = add_norm_route(
                hidden, delta, norm.weight, norm.variance_epsilon, router_weight, num_experts, mlp.gate.top_k,
                mlp.gate.norm_topk_prob)
            shared = SharedExpert(gate_up, down, logits[:, num_experts:])
            return hidden, self.experts_fn(x, weights, ids, mlp.experts, shared=shared)
        hidden, x = self._add_norm(hidden, delta, norm, fused_norm)
        return hidden, self._moe(index, x, mlp)

    def _shared_parts(self, mlp, fused, x):
        """`_foldable_shared`'s parts for this MoE layer, given its fused inputs at x's token count
        (`_fused_for`), or None (separate projections, an experts function that does not take the
        shared expert)."""
        if fused is None or not getattr(self.experts_fn, "takes_shared_expert", False):
            return None
        return _foldable_shared(mlp, fused, nf4_ok=x.is_cuda)

    def _norm_route_parts(self, index, hidden, delta, norm, mlp, fused_norm):
        """`_shared_parts` where `_norm_and_moe` runs the one launch, else None: the norm as a kernel,
        the router as moelab's kernel (on CUDA, or forced to Triton), up to `gemv.MAX_TOKENS` tokens
        (where the router product is a GEMV), one dtype, a dense router weight in it, and
        `norm_route.ENABLED`."""
        if not (fused_norm and self.route_backend != "torch" and (hidden.is_cuda or self.route_backend == "triton")):
            return None  # first: this runs every layer, on the CPU too
        from .kernels import norm_route
        from .kernels.gemv import MAX_TOKENS

        if not (norm_route.ENABLED and hasattr(mlp, "experts") and hidden.shape[0] <= MAX_TOKENS
                and hidden.shape[1] <= norm_route.MAX_HIDDEN and delta.dtype == norm.weight.dtype == hidden.dtype):
            return None
        parts = self._shared_parts(mlp, self._fused_for(self._fused_moe_input, index, hidden), hidden)
        if parts is None:
            return None
        router_weight, router_sizes = parts[2], parts[3]
        dense = (isinstance(router_weight, torch.Tensor) and router_weight.dtype == hidden.dtype
                 and router_weight.stride(1) == 1)
        return parts if dense and len(router_sizes) == 2 and router_sizes[0] <= norm_route.MAX_EXPERTS else None

    def _moe(self, index, x, mlp):
        if not hasattr(mlp, "experts"):  # a dense layer (mlp_only_layers / decoder_sparse_step)
            return _mlp(x, mlp)
        gate = mlp.gate
        fused = self._fused_for(self._fused_moe_input, index, x)
        parts = self._shared_parts(mlp, fused, x)
        if parts is not None:
            from .kernels.experts import SharedExpert

            # The router and the shared gate logit as one small product; the shared expert's gate/up
            # and down run inside the experts kernels (notebook 08: seven fewer launches per layer).
            gate_up, down, router_weight, router_sizes = parts
            logits, gate_logit = _project(x, router_weight).split(router_sizes, dim=-1)
            weights, ids = route(logits, gate.top_k, normalize=gate.norm_topk_prob, backend=self.route_backend)
            return self.experts_fn(x, weights, ids, mlp.experts, shared=SharedExpert(gate_up, down, gate_logit))
        folds = getattr(self.experts_fn, "takes_shared_expert", False)
        if fused is not None and fused.nf4_gate_up is not None:
            fused = None  # an NF4 layer whose shared expert does not fold: each module runs on its own
        if fused is not None:  # shared gate, shared up, router logits, shared gate logit: one GEMM
            shared_gate, shared_up, logits, gate_logit = _project(x, fused.weight).split(fused.sizes, dim=-1)
        else:
            # Router logits from the router's own weight, then moelab's routing (with or without
            # moelab.patch installed on the HF model: its forward is never called here).
            logits = F.linear(x, gate.weight)
        weights, ids = route(logits, gate.top_k, normalize=gate.norm_topk_prob, backend=self.route_backend)
        # transformers rounds the routing weights to the model dtype before using them (moelab's
        # own experts functions do it themselves, with no extra kernel).
        routed = self.experts_fn(x, weights if folds else weights.to(x.dtype), ids, mlp.experts)
        if fused is not None:
            shared = _linear(mlp.shared_expert.down_proj, mlp.shared_expert.act_fn(shared_gate) * shared_up)
        else:
            gate_logit, shared = _linear(mlp.shared_expert_gate, x), _mlp(x, mlp.shared_expert)
        return routed + torch.sigmoid(gate_logit) * shared

    # ---- checks ---------------------------------------------------------------------------

    def _check_cache(self, cache):
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a moelab KVCache, got {type(cache).__name__}")
        shape = (self.config.num_hidden_layers, self.num_kv_heads, self.head_dim)
        if (cache.num_layers, cache.k.shape[2], cache.k.shape[4]) != shape:
            raise ValueError(
                f"cache shape {tuple(cache.k.shape)} does not fit this model (layers, kv_heads, head_dim = {shape})"
            )

    def _check_tokens(self, tokens):
        vocab = self.config.vocab_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}), got {int(tokens.min())}..{int(tokens.max())}")

    def _check_decode(self, cache, tokens, slots):
        host_slots = slots.tolist()
        if len(set(host_slots)) != len(host_slots):
            raise ValueError(f"slots must be distinct, got {host_slots}")
        for slot in host_slots:
            cache.check_slot(slot)
        self._check_tokens(tokens)
        for slot, length in zip(host_slots, cache.lengths[slots].tolist()):
            if length == 0:
                raise ValueError(f"slot {slot} has no prompt yet: prefill it before decoding")
            if length >= cache.reserved(slot):
                raise ValueError(
                    f"slot {slot} is full: it holds {length} tokens and was allocated for {cache.reserved(slot)} "
                    f"(prompt + max_new_tokens; max_seq_len is {cache.max_seq_len})"
                )
