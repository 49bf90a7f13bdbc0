"""NF4: 4-bit NormalFloat quantization of the fused routed experts, and what a model weighs.

Built in notebooks/04_nf4_quantized_loading. transformers v5 stores a layer's routed experts as
two fused 3-D parameters (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`), and
`BitsAndBytesConfig(load_in_4bit=True)` only replaces `nn.Linear`, so those experts (about 87%
of Qwen1.5-MoE's weights) stay bf16. moelab quantizes them itself, per expert, in exactly the
format bitsandbytes uses (same code book, nibble order and absmax layout), so a fused kernel can
read them and bitsandbytes can check them:

- `NF4_CODE`: 16 levels at quantiles of the standard normal, scaled to [-1, 1].
- `quantize_nf4(w [E, R, C]) -> NF4Tensor`: blocks of 64 consecutive values of one expert
  (never crossing an expert), each scaled by its absolute maximum ("absmax") and rounded to
  the nearest level; two 4-bit codes per byte; the absmax values themselves quantized to 8 bits
  in blocks of 256 ("double quantisation") unless asked not to.
- `dequantize_nf4(t, experts=None)`: back to [E, R, C] (or only some experts) in `t.dtype`.
- `NF4Experts`: drop-in for transformers' `Qwen2MoeExperts`; it dequantizes only the experts a
  step touches (the fused kernel of notebook 05 makes this fast).
- `quantize_layer_`: one decoder layer to NF4 (attention and shared-expert Linears through
  bitsandbytes, experts through `NF4Experts`; router and `shared_expert_gate` stay full precision).
- `memory_report(model)`: bytes by part (routed experts, shared expert, attention, embeddings and
  head, other), quantized or not, as a table and a plot.

The storage layout is a contract with the kernel (`.scratch/NF4_FORMAT.md`): for expert e,
`codes[e, j]` holds flat value 2j in its HIGH nibble and 2j+1 in its LOW nibble; value i is
`NF4_CODE[nibble] * absmax_of_block(e, i // 64)`, where the block absmax is `absmax[e, b]`, or
with double quantisation `absmax_code[absmax[e, b]] * absmax_scale[e, b // 256] + absmax_offset[e]`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

NF4_OFFSET = 0.9677083  # the outermost quantile (QLoRA's choice: about 1.85 standard deviations)
NESTED_BLOCKSIZE = 256  # double quantisation: absmax values per 8-bit block, as bitsandbytes
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts


def nf4_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels: 8 positive and 7 negative quantiles of N(0, 1), plus an exact zero,
    scaled so the largest is 1. Equal-probability bins suit weights that are roughly normal.

    The quantiles sit at probabilities evenly spaced from `offset` to 0.5 (float32, as
    bitsandbytes computes them); the result equals bitsandbytes' hard-coded table bit for bit."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    levels = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return levels / levels.max()


def dynamic_code_book() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map()`), used for the absmax
    values in double quantisation: a sign, a run of zero bits that sets the decade (1e-6 to 1),
    and a linear fraction in the remaining bits; plus 0 and 1. 256 sorted float32 values."""
    data: list[float] = []
    for i in range(7):  # decade 10^(i - 6); i + 1 fraction bits
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


NF4_CODE = nf4_code_book()
DYNAMIC_CODE = dynamic_code_book()


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries of round-to-nearest over a sorted code book (a value exactly on a
    boundary goes to the lower level, as bitsandbytes' NF4 kernels do)."""
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two NF4 values (high nibble, low nibble) of every byte, on `device`.
    One gather per byte instead of unpacking nibbles; cached so a step copies nothing to the GPU."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1).to(device)


@functools.lru_cache(maxsize=None)
def _on_device(name: str, device: torch.device) -> torch.Tensor:
    return {"nf4_mid": midpoints(NF4_CODE), "dyn_mid": midpoints(DYNAMIC_CODE), "dyn": DYNAMIC_CODE}[name].to(device)


@dataclass
class NF4Tensor:
    """A fused expert tensor [E, R, C] in NF4, quantized per expert (see the module docstring).

    codes uint8 [E, n // 2] (n = R * C); absmax float32 [E, n // blocksize], or uint8 codes of
    `absmax_code` with double quantisation, which adds absmax_scale float32
    [E, ceil((n // blocksize) / 256)], absmax_offset float32 [E] and absmax_code float32 [256].
    dtype: what `dequantize_nf4` returns (the model's compute dtype)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    absmax_code: torch.Tensor | None
    shape: tuple[int, int, int]
    dtype: torch.dtype
    blocksize: int = 64

    @property
    def double_quant(self) -> bool:
        return self.absmax_code is not None

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and quantization state)."""
        parts = (self.codes, self.absmax, self.absmax_scale, self.absmax_offset, self.absmax_code)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _check_weight(w: torch.Tensor, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_nf4 takes a fused expert tensor [E, R, C], got {shape}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"quantize_nf4 needs a floating-point tensor, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' sizes), got {blocksize}")
    per_expert = w.shape[1] * w.shape[2]
    if per_expert == 0 or per_expert % blocksize:
        raise ValueError(
            f"each expert of shape {tuple(w.shape)} holds {per_expert} values, not a multiple of the block "
            f"size {blocksize}: blocks must not cross experts, and moelab does not pad"
        )


def quantize_nf4(w: torch.Tensor, double_quant: bool = True, blocksize: int = 64, *,
                 backend: str = "torch", dtype: torch.dtype | None = None) -> NF4Tensor:
    """Quantize a fused expert tensor w [E, R, C] to NF4, per expert, bitsandbytes' format.

    backend "torch": moelab's own PyTorch code (what notebook 04 derives); "bitsandbytes":
    `bitsandbytes.functional.quantize_4bit` (its CUDA kernel on a GPU), as `moelab.load` uses.
    The 4-bit codes are identical; the 8-bit absmax codes of double quantisation can differ by
    one step where a value lies within about 1e-5 of a rounding boundary (bitsandbytes' CPU code
    rounds some near-midpoints away from the nearest level). dtype: the dequantized dtype
    (default w's). A shape the block size does not divide raises ValueError (no padding)."""
    _check_weight(w, blocksize)
    if backend not in ("torch", "bitsandbytes"):
        raise ValueError(f"backend must be 'torch' or 'bitsandbytes', got {backend!r}")
    num_experts, rows, cols = w.shape
    n = rows * cols
    if w.device.type == "meta":  # shapes only: what the tensors would weigh
        absmax = torch.empty(num_experts, n // blocksize, device="meta")
        codes = torch.empty(num_experts, n // 2, dtype=torch.uint8, device="meta")
    elif backend == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        # Each expert's n values are a whole number of blocks, so one call over all experts
        # cuts exactly the blocks that one call per expert would.
        packed, state = bnbf.quantize_4bit(w.contiguous().reshape(-1), blocksize=blocksize, quant_type="nf4")
        codes, absmax = packed.reshape(num_experts, n // 2), state.absmax.reshape(num_experts, -1)
    else:
        codes = torch.empty(num_experts, n // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(num_experts, n // blocksize, dtype=torch.float32, device=w.device)
        bounds = _on_device("nf4_mid", w.device)
        for e in range(num_experts):  # one expert at a time: float32 temporaries stay small
            blocks = w[e].reshape(-1, blocksize).float()
            absmax[e] = blocks.abs().amax(dim=1)
            # bitsandbytes multiplies by the reciprocal (it does not divide); a zero block gives 0s
            scaled = blocks * (1.0 / absmax[e].clamp(min=1e-38))[:, None]
            q = torch.bucketize(scaled.reshape(-1), bounds, out_int32=True).to(torch.uint8)
            codes[e] = (q[0::2] << 4) | q[1::2]
    scale = offset = code = None
    if double_quant:
        absmax, scale, offset, code = _quantize_absmax(absmax, backend)
    return NF4Tensor(codes, absmax, scale, offset, code, (num_experts, rows, cols), dtype or w.dtype, blocksize)


def _quantize_absmax(absmax: torch.Tensor, backend: str):
    """Double quantisation of absmax [E, nb] float32, per expert like bitsandbytes'
    `quantize_4bit(compress_statistics=True)`: subtract the expert's mean absmax, then 8-bit
    dynamic codes in blocks of 256 with one float32 scale per block. Returns
    (uint8 codes [E, nb], scale [E, ceil(nb / 256)], offset [E], code book [256])."""
    num_experts, nb = absmax.shape
    nested = math.ceil(nb / NESTED_BLOCKSIZE)
    device = absmax.device
    if device.type == "meta":
        return (torch.empty(num_experts, nb, dtype=torch.uint8, device=device),
                torch.empty(num_experts, nested, device=device), torch.empty(num_experts, device=device),
                torch.empty(256, device=device))
    # One expert at a time: the very reduction bitsandbytes runs on one expert's absmax (a row-wise
    # mean of the 2-D tensor may sum in another order and differ in the last bit).
    offset = torch.stack([absmax[e].mean() for e in range(num_experts)])
    centered = absmax - offset[:, None]
    # Pad each expert to whole blocks of 256 with zeros: a zero never raises a block's absmax,
    # so every block sees what bitsandbytes' own short last block sees.
    padded = torch.zeros(num_experts, nested * NESTED_BLOCKSIZE, device=device)
    padded[:, :nb] = centered
    if backend == "bitsandbytes":
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_blockwise(padded.reshape(-1), code=_on_device("dyn", device),
                                           blocksize=NESTED_BLOCKSIZE)
        q, scale = q.reshape(num_experts, -1), state.absmax.reshape(num_experts, nested)
    else:
        blocks = padded.reshape(num_experts, nested, NESTED_BLOCKSIZE)
        scale = blocks.abs().amax(dim=2)
        scaled = (blocks * (1.0 / scale.clamp(min=1e-38))[..., None]).clamp(-1, 1)
        q = torch.bucketize(scaled, _on_device("dyn_mid", device), out_int32=True).to(torch.uint8)
        q = q.reshape(num_experts, -1)
    return q[:, :nb].contiguous(), scale, offset, _on_device("dyn", device).clone()


def _expert_rows(t: torch.Tensor | None, experts):
    if t is None or experts is None:
        return t
    if isinstance(experts, int):
        return t[experts : experts + 1]
    return t.index_select(0, experts)


def block_absmax(t: NF4Tensor, experts=None) -> torch.Tensor:
    """The float32 absmax of every block, [E, n // blocksize] (or of the chosen experts)."""
    absmax = _expert_rows(t.absmax, experts)
    if not t.double_quant:
        return absmax
    scale = _expert_rows(t.absmax_scale, experts).repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, : absmax.shape[1]]
    return t.absmax_code[absmax.long()] * scale + _expert_rows(t.absmax_offset, experts)[:, None]


def dequantize_nf4(t: NF4Tensor, experts=None) -> torch.Tensor:
    """NF4Tensor -> [E, R, C] in `t.dtype`; with `experts` (an int, a sequence or an int tensor
    of expert ids, repeats allowed) only those, stacked in that order: [len(experts), R, C].
    Computes `NF4_CODE[nibble] * block absmax` in float32, then rounds to `t.dtype`."""
    num_experts, rows, cols = t.shape
    if experts is not None and not isinstance(experts, torch.Tensor):
        ids = [experts] if isinstance(experts, int) else list(experts)
        bad = [e for e in ids if not isinstance(e, int) or not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"expert ids must be ints in [0, {num_experts}), got {bad}")
        if not isinstance(experts, int):
            experts = torch.tensor(ids, dtype=torch.long, device=t.codes.device)
    elif isinstance(experts, torch.Tensor):
        experts = experts.reshape(-1).to(device=t.codes.device, dtype=torch.long)
    codes = _expert_rows(t.codes, experts)
    absmax = block_absmax(t, experts)
    values = _byte_table(codes.device)[codes.long()].reshape(codes.shape[0], -1, t.blocksize)
    return (values * absmax[:, :, None]).reshape(codes.shape[0], rows, cols).to(t.dtype)


_PARTS = ("codes", "absmax", "absmax_scale", "absmax_offset")


class NF4Experts(nn.Module):
    """The routed experts of one layer in NF4: a drop-in for transformers' `Qwen2MoeExperts`.

    Holds `gate_up` ([E, 2I, H]) and `down` ([E, H, I]) as NF4Tensors whose tensors are buffers
    (so `.to(device)` and `state_dict()` see them). `model.to(dtype)` changes only the compute
    dtype: codes and scales keep their own dtypes. forward(hidden [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H], the same contract and result as the module it replaces."""

    def __init__(self, gate_up: NF4Tensor, down: NF4Tensor, act_fn):
        super().__init__()
        (e1, two_i, h1), (e2, h2, i2) = gate_up.shape, down.shape
        if e1 != e2 or two_i != 2 * i2 or h1 != h2:
            raise ValueError(f"gate_up {gate_up.shape} and down {down.shape} are not [E, 2I, H] and [E, H, I]")
        self.num_experts = gate_up.shape[0]
        self.act_fn = act_fn
        self.dtype = gate_up.dtype
        self.blocksize = gate_up.blocksize
        self._shapes = {"gate_up": gate_up.shape, "down": down.shape}
        for name, t in (("gate_up", gate_up), ("down", down)):
            for part in _PARTS:
                self.register_buffer(f"{name}_{part}", getattr(t, part))
        self.register_buffer("absmax_code", gate_up.absmax_code)

    @classmethod
    def from_experts(cls, experts, double_quant: bool = True, blocksize: int = 64, backend: str = "torch",
                     dtype: torch.dtype | None = None) -> "NF4Experts":
        """Quantize a transformers `Qwen2MoeExperts` (fused gate_up_proj, down_proj)."""
        gate_up = quantize_nf4(experts.gate_up_proj.data, double_quant, blocksize, backend=backend, dtype=dtype)
        down = quantize_nf4(experts.down_proj.data, double_quant, blocksize, backend=backend, dtype=dtype)
        return cls(gate_up, down, experts.act_fn)

    def _tensor(self, name: str) -> NF4Tensor:
        parts = [getattr(self, f"{name}_{part}") for part in _PARTS]
        return NF4Tensor(*parts, self.absmax_code, self._shapes[name], self.dtype, self.blocksize)

    @property
    def gate_up(self) -> NF4Tensor:
        return self._tensor("gate_up")

    @property
    def down(self) -> NF4Tensor:
        return self._tensor("down")

    def _apply(self, fn, recurse=True):
        # Move the buffers where fn sends tensors, but never round them to fn's dtype:
        # model.to(torch.bfloat16) must not turn float32 scales into bf16. A float dtype
        # change becomes the compute dtype instead.
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.gate_up_codes.device))
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(probe.device)
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        e, r, c = self._shapes["gate_up"]
        return (f"num_experts={e}, gate_up=[{e}, {r}, {c}], down={list(self._shapes['down'])}, nf4 block "
                f"{self.blocksize}, double_quant={self.absmax_code is not None}, dtype={self.dtype}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        num_tokens, top_k = top_k_index.shape
        if num_tokens * top_k <= self.num_experts:
            return self._forward_pairs(hidden_states, top_k_index, top_k_weights)
        return self._forward_grouped(hidden_states, top_k_index, top_k_weights)

    def _forward_pairs(self, hidden, ids, weights):
        """Few tokens (decode): dequantize the expert of every (token, k) pair and run them as
        one batched matmul. No host sync, fixed shapes; reads each touched expert once per pair."""
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1)
        gate_up = dequantize_nf4(self.gate_up, experts=flat).to(hidden.dtype)  # [T*K, 2I, H]
        down = dequantize_nf4(self.down, experts=flat).to(hidden.dtype)  # [T*K, H, I]
        x = hidden.repeat_interleave(top_k, dim=0)[:, None, :]  # [T*K, 1, H]
        gate, up = torch.bmm(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(self.act_fn(gate) * up, down.transpose(1, 2))[:, 0]  # [T*K, H]
        out = out * weights.reshape(-1, 1).to(out.dtype)
        return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

    def _forward_grouped(self, hidden, ids, weights):
        """Many tokens (prefill): sort the (token, k) pairs by expert, dequantize each touched
        expert once and run it on its rows. One host sync (the per-expert counts), where
        transformers' eager loop syncs once per touched expert."""
        num_tokens, top_k = ids.shape
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = order // top_k
        x = hidden[rows]
        out = torch.empty_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            gate_up = dequantize_nf4(self.gate_up, experts=expert)[0].to(hidden.dtype)
            down = dequantize_nf4(self.down, experts=expert)[0].to(hidden.dtype)
            gate, up = nn.functional.linear(x[start : start + n], gate_up).chunk(2, dim=-1)
            out[start : start + n] = nn.functional.linear(self.act_fn(gate) * up, down)
            start += n
        out = out * weights.reshape(-1)[order, None].to(hidden.dtype)
        return torch.zeros_like(hidden).index_add_(0, rows, out)


# ---------------------------------------------------------------------------- a decoder layer

KEEP_FULL_PRECISION = ("gate", "shared_expert_gate", "lm_head")  # router, shared-expert gate, head


def linear_to_nf4(linear: nn.Linear, compute_dtype: torch.dtype):
    """A bitsandbytes `Linear4bit` (NF4, block 64, double quantisation) holding `linear`'s
    weight, on `linear`'s device; the bias stays in its dtype. On the meta device it builds the
    same tensors shape-only, so `memory_report` can weigh a model that was never materialized.
    (`linears_to_nf4_jointly` with one linear.)"""
    return linears_to_nf4_jointly([linear], compute_dtype)[0][0]


def _keep_format(q):
    """Stop bitsandbytes from repacking this Linear4bit's codes into its own CPU layout at the first
    inference call (it does so in place on CPUs with AVX512-BF16, dropping the nested absmax):
    moelab reads the codes in the format above, and the same model must stay the same bytes."""
    q.support_avx512bf16_for_cpu = False
    return q


def linear4bit_nf4(module) -> NF4Tensor | None:
    """A bitsandbytes NF4 `Linear4bit`'s weight seen as a one-expert NF4Tensor [1, out, in],
    sharing its storage (no copy): bitsandbytes' packed codes, block absmax and nested state
    are this module's format (module docstring). None for anything else (another quant type,
    block size or storage, a module not yet quantized, rows that are not whole 64-blocks: there
    bitsandbytes' CPU dequantization disagrees with its own codes, 2026-12 check in
    tests/test_gemv.py). Cached on the module, keyed by the codes' address so a move to another
    device builds a new view."""
    weight = getattr(module, "weight", None)
    state = getattr(module, "quant_state", None) or getattr(weight, "quant_state", None)
    if (type(module).__name__ != "Linear4bit" or state is None or state.quant_type != "nf4" or state.blocksize != 64
            or weight.dtype != torch.uint8 or weight.device.type == "meta"
            or getattr(state, "packing_format_for_cpu", False)):  # bitsandbytes' own CPU layout
        return None
    cached = module.__dict__.get("_moelab_nf4")
    if cached is not None and cached[0] == weight.data_ptr():
        return cached[1]
    out_features, in_features = state.shape
    if in_features % 64:
        return None
    if state.nested and state.state2.blocksize != NESTED_BLOCKSIZE:
        return None
    view = _nf4_view(weight.data, state, out_features, in_features, state.dtype)
    module.__dict__["_moelab_nf4"] = (weight.data_ptr(), view)
    return view


def _nf4_view(packed: torch.Tensor, state, rows: int, cols: int, dtype: torch.dtype) -> NF4Tensor:
    """bitsandbytes' packed NF4 codes and their QuantState (block 64, nested or not) as a
    one-expert NF4Tensor [1, rows, cols] on the same storage: no copy."""
    nested = state.state2 if state.nested else None
    return NF4Tensor(
        codes=packed.reshape(1, rows * cols // 2),
        absmax=state.absmax.reshape(1, -1),
        absmax_scale=None if nested is None else nested.absmax.reshape(1, -1),
        absmax_offset=None if nested is None else state.offset.reshape(1).float(),
        absmax_code=None if nested is None else nested.code,
        shape=(1, rows, cols), dtype=dtype, blocksize=64)


@dataclass
class JointNF4:
    """Linears that read the same input, quantized as ONE NF4 tensor (their weights stacked by
    rows, so one quantization state and one offset): `weight` [1, sum(sizes), in], `bias` the
    stacked biases (or None), `sizes` the rows of each. Each layer's `Linear4bit` holds views of
    these (codes, absmax, nested scales, bias), so nothing is stored twice and each still runs
    on its own; moelab's forward runs them as one GEMV (notebook 08)."""

    weight: NF4Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]

    def seats(self, modules) -> bool:
        """Whether `modules` (in order) still hold views of this tensor (not after a move or cast)."""
        start, in_features = self.weight.codes.data_ptr(), self.weight.shape[2]
        for module, rows in zip(modules, self.sizes):
            weight = getattr(module, "weight", None)
            if weight is None or weight.data_ptr() != start:
                return False
            start += rows * in_features // 2
        return len(modules) == len(self.sizes)


def linears_to_nf4_jointly(linears, compute_dtype: torch.dtype) -> tuple[list, JointNF4] | None:
    """Quantize `linears` (nn.Linear, same input size, device and bias-ness) as one NF4 tensor
    with bitsandbytes (block 64, double quantisation), returning a `Linear4bit` per linear whose
    weight, quantization state and bias are row slices of the joint tensors, and the `JointNF4`.
    None (nothing done) where a layer boundary would cut a nested block of 256 absmax values
    (64 x 256 weights): then each quantizes alone (`linear_to_nf4`, this with one linear). On the
    meta device it builds the same tensors shape-only (for `memory_report`)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    in_features = linears[0].in_features
    device = linears[0].weight.device
    rows = [lin.out_features for lin in linears]
    if (any(lin.in_features != in_features or lin.weight.device != device for lin in linears)
            or len({lin.bias is None for lin in linears}) != 1
            or any(r * in_features % (64 * NESTED_BLOCKSIZE) for r in rows[:-1])):
        return None
    n_all = sum(rows) * in_features
    with torch.no_grad():
        if device.type == "meta":  # shapes only
            meta = dict(device="meta")
            nested = QuantState(absmax=torch.empty(math.ceil(n_all // 64 / NESTED_BLOCKSIZE), **meta),
                                code=torch.empty(256, **meta), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            state = QuantState(absmax=torch.empty(n_all // 64, dtype=torch.uint8, **meta), code=torch.empty(16, **meta),
                               blocksize=64, quant_type="nf4", dtype=linears[0].weight.dtype,
                               offset=torch.empty((), **meta), state2=nested)
            packed = torch.empty(n_all // 2, 1, dtype=torch.uint8, **meta)
        else:
            packed, state = bnbf.quantize_4bit(torch.cat([lin.weight.data for lin in linears]), blocksize=64,
                                               compress_statistics=True, quant_type="nf4")
        bias = None if linears[0].bias is None else torch.cat([lin.bias.data for lin in linears])
    modules, byte, block, row = [], 0, 0, 0
    for lin, r in zip(linears, rows):
        n = r * in_features
        nested = QuantState(absmax=state.state2.absmax[block // NESTED_BLOCKSIZE:
                                                       math.ceil((block + n // 64) / NESTED_BLOCKSIZE)],
                            code=state.state2.code, blocksize=NESTED_BLOCKSIZE, dtype=state.state2.dtype)
        sub = QuantState(absmax=state.absmax[block:block + n // 64], shape=torch.Size([r, in_features]),
                         code=state.code, blocksize=64, quant_type="nf4", dtype=state.dtype, offset=state.offset,
                         state2=nested)
        q = bnb.nn.Linear4bit(in_features, r, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(packed[byte:byte + n // 2], requires_grad=False, quant_state=sub, blocksize=64,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=q)
        q.quant_state = sub
        _keep_format(q)
        if bias is not None:
            q.bias = nn.Parameter(bias[row:row + r], requires_grad=False)
        modules.append(q)
        byte, block, row = byte + n // 2, block + n // 64, row + r
    return modules, JointNF4(_nf4_view(packed, state, sum(rows), in_features, compute_dtype), bias, tuple(rows))


JOINT_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj"), "_moelab_nf4_qkv"),
                ("mlp.shared_expert", ("gate_proj", "up_proj"), "_moelab_nf4_gate_up"))


def quantize_layer_(layer: nn.Module, compute_dtype: torch.dtype, backend: str = "bitsandbytes") -> nn.Module:
    """Quantize one Qwen2-MoE decoder layer in place, as `moelab.load(..., quantize="nf4")` does:
    every `nn.Linear` (attention, shared expert, a dense layer's MLP) becomes an NF4 `Linear4bit`
    except the gates (`mlp.gate`, `shared_expert_gate`: one output row, and routing is where
    precision matters most); the fused routed experts become `NF4Experts`. Returns the layer.

    q/k/v, and the shared expert's gate and up, are quantized jointly where their sizes allow
    (`linears_to_nf4_jointly`; the `JointNF4` hangs on the attention / shared-expert module as
    `_moelab_nf4_qkv` / `_moelab_nf4_gate_up`), so moelab's decode runs each group as one GEMV."""
    for path, names, attr in JOINT_GROUPS:
        parent = _submodule(layer, path)
        linears = [getattr(parent, n, None) for n in names] if parent is not None else []
        if not linears or not all(type(lin) is nn.Linear for lin in linears):
            continue
        joint = linears_to_nf4_jointly(linears, compute_dtype)
        if joint is not None:
            for n, q in zip(names, joint[0]):
                setattr(parent, n, q)
            setattr(parent, attr, joint[1])
    for name, module in list(layer.named_modules()):
        child = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and child not in KEEP_FULL_PRECISION:  # Linear4bit subclasses nn.Linear
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, child, linear_to_nf4(module, compute_dtype))
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and hasattr(mlp, "experts") and not isinstance(mlp.experts, NF4Experts):
        mlp.experts = NF4Experts.from_experts(mlp.experts, backend=backend, dtype=compute_dtype)
    return layer


def quantize_head_(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """lm_head as a bitsandbytes NF4 `Linear4bit`, in place (`moelab.load(..., quantize="nf4_head")`).

    An opt-in, not part of "nf4": transformers' 4-bit loading keeps the head in full precision
    (its logits decide every token), and so does `quantize_layer_`. But one decode step reads
    the whole head for every token batch: Qwen1.5-MoE's 151,936 x 2,048 head is 622 MB in bf16,
    as many bytes as all the NF4 layers of a batch-1 step together. A head tied to the input
    embeddings gets an NF4 copy of its own; the embeddings stay in full precision (a look-up
    reads one row per token). Returns the model."""
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        raise ValueError(f"quantize_head_ needs an nn.Linear lm_head, got {type(head).__name__}")
    model.lm_head = linear_to_nf4(head, compute_dtype)
    return model


def _submodule(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


# ---------------------------------------------------------------------------- memory report

PARTS = ("routed experts", "shared expert", "attention", "embeddings and head", "other")


def _part_of(name: str) -> str:
    if ".mlp.experts" in f".{name}":
        return "routed experts"
    if ".mlp.shared_expert" in f".{name}":  # the shared expert and its gate
        return "shared expert"
    if ".self_attn" in f".{name}":
        return "attention"
    if name.endswith("embed_tokens") or name.startswith("lm_head"):
        return "embeddings and head"
    return "other"  # norms, routers, rotary tables, a dense layer's MLP


def _held_tensors(module: nn.Module):
    """(tensor, logical weights it stands for, storage label) for what `module` itself holds:
    parameters, buffers, and the quantization state bitsandbytes keeps outside them."""
    if isinstance(module, NF4Experts):
        for t_name, (e, r, c) in module._shapes.items():
            yield getattr(module, f"{t_name}_codes"), e * r * c, "nf4"
            for part in _PARTS[1:]:
                t = getattr(module, f"{t_name}_{part}")
                if t is not None:
                    yield t, 0, "nf4"
        if module.absmax_code is not None:
            yield module.absmax_code, 0, "nf4"
        return
    for p in module.parameters(recurse=False):
        state = getattr(p, "quant_state", None)
        if state is None:
            yield p, p.numel(), str(p.dtype).replace("torch.", "")
            continue
        yield p, math.prod(state.shape), "nf4"  # a bitsandbytes Params4bit: packed codes
        for t in (state.absmax, state.code, state.offset):
            if isinstance(t, torch.Tensor):
                yield t, 0, "nf4"
        if getattr(state, "state2", None) is not None:
            yield state.state2.absmax, 0, "nf4"
            yield state.state2.code, 0, "nf4"
    for b in module.buffers(recurse=False):
        yield b, 0, str(b.dtype).replace("torch.", "")


@dataclass
class MemoryReport:
    """Bytes a model holds, by part. rows: one dict per part (`part`, `weights` (logical
    parameter count), `bytes`, `bits_per_weight`, `storage`); `total_bytes`. Print it for a table."""

    rows: list[dict]

    @property
    def total_bytes(self) -> int:
        return sum(r["bytes"] for r in self.rows)

    def __getitem__(self, part: str) -> dict:
        for row in self.rows:
            if row["part"] == part:
                return row
        raise KeyError(f"no part {part!r}; parts are {[r['part'] for r in self.rows]}")

    def table(self) -> str:
        lines = [f"{'part':<20} {'weights (M)':>12} {'GB':>9} {'bits/weight':>12}  storage"]
        for r in self.rows:
            bits = f"{r['bits_per_weight']:.2f}" if r["weights"] else "-"
            lines.append(f"{r['part']:<20} {r['weights'] / 1e6:>12.2f} {r['bytes'] / 1e9:>9.4f} {bits:>12}  "
                         f"{r['storage']}")
        weights = sum(r["weights"] for r in self.rows)
        lines.append(f"{'total':<20} {weights / 1e6:>12.2f} {self.total_bytes / 1e9:>9.4f} "
                     f"{8 * self.total_bytes / max(weights, 1):>12.2f}")
        return "\n".join(lines)

    __str__ = table

    def as_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "parts": self.rows}

    def plot(self, ax=None, label: str = "model"):
        """A stacked bar of bytes by part (see `plot_memory` to compare several reports)."""
        return plot_memory({label: self}, ax=ax)


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes held by a transformers Qwen2-MoE model, by part: routed experts, shared expert
    (with its gate), attention, embeddings and head, other (norms, routers, rotary tables).
    Counts parameters, buffers and bitsandbytes' quantization state (absmax, code books) that
    lives outside them, each tensor once; works on the meta device (shapes only)."""
    seen: set = set()
    totals = {part: {"weights": 0, "bytes": 0, "storage": set()} for part in PARTS}
    for name, module in model.named_modules():
        part = _part_of(name)
        for tensor, weights, storage in _held_tensors(module):
            key = id(tensor) if tensor.device.type == "meta" else (tensor.device, tensor.data_ptr(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            row = totals[part]
            row["weights"] += weights
            row["bytes"] += tensor.numel() * tensor.element_size()
            if weights:
                row["storage"].add(storage)
    rows = [{"part": part, "weights": t["weights"], "bytes": t["bytes"],
             "bits_per_weight": round(8 * t["bytes"] / t["weights"], 3) if t["weights"] else None,
             "storage": "+".join(sorted(t["storage"]))} for part, t in totals.items()]
    return MemoryReport(rows)


def plot_memory(reports: dict, ax=None):
    """Stacked bars of GB by part, one bar per report ({label: MemoryReport}). Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.8 + 0.7 * len(reports)))
    labels = list(reports)
    left = [0.0] * len(labels)
    for part in PARTS:
        sizes = [reports[label][part]["bytes"] / 1e9 for label in labels]
        ax.barh(labels, sizes, left=left, label=part)
        left = [a + b for a, b in zip(left, sizes)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.3g} GB", va="center")
    ax.set_xlabel("GB (10^9 bytes)")
    ax.set_xlim(0, max(left) * 1.2)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return ax
