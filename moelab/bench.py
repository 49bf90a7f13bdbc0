"""Benchmarks: `python -m moelab.bench <what>`, results as JSON (+ PNG) under benchmarks/results/.

Built in notebooks/02_triton_router_kernel (router), 05_fused_expert_kernel (experts), 06_kv_cache_slots and
08_cuda_graphs_and_decode_attention (decode). Benchmarks are not tests: they time real
runs, name the card, and compare systems side by side in one run on one machine.

    python -m moelab.bench router                  # on CUDA: eager, graphs, compile, Triton
    python -m moelab.bench router --json out.json --plot out.png
    python -m moelab.bench nf4                     # CUDA: NF4 load memory + decode, moelab vs transformers+bnb
    python -m moelab.bench launch                  # on CUDA: where one router call's host time goes
    python -m moelab.bench experts [--sweep]       # CUDA: one routed-experts layer, HF's three vs moelab bf16/NF4
    python -m moelab.bench decode                  # CPU or CUDA: decode step, 1..8 slots
    python -m moelab.bench decode --model qwen1.5-moe-a2.7b --batches 1 8 64 --prompt-len 16 64 \
        --max-seq-len 2048 --profile                # CUDA: SDPA / kernel / graphs / fused ops vs the bound
    python -m moelab.bench attention               # CUDA: decode attention alone, SDPA vs kernel, split-K
    python -m moelab.bench prefill                 # CUDA: prefill tokens/s against the measured matmul rate
    python -m moelab.bench                         # the full benchmark (= serve), CPU tiny fp32 + NF4
    python -m moelab.bench --model qwen1.5-moe-a2.7b --random-weights --concurrency 1 8 64   # CUDA, bf16 + NF4
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


# ---------------------------------------------------------------------------- shared helpers

def card_name() -> str:
    """The accelerator's name (e.g. 'NVIDIA H100 80GB HBM3'), or the CPU's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def card_tag(card: str) -> str:
    """Short tag for file names: h100, h200, cpu, or the card's name in lower case."""
    low = card.lower()
    for tag in ("h100", "h200", "a100", "l40s", "l4", "rtx"):
        if tag in low:
            return tag
    return "cpu" if low.startswith("cpu") else "".join(c for c in low if c.isalnum())[:16]


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:  # transformers' NF4 rows run on it
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def median_seconds(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one fn() on the GPU (CUDA events around each call, timed alone), after
    `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def floor_us(nbytes: int, bandwidth_gbs: float) -> float:
    """The physical limit of a memory-bound op: its bytes over the measured copy bandwidth."""
    return nbytes / (bandwidth_gbs * 1e9) * 1e6


def _pdl_fields(on_cuda: bool) -> dict:
    """The workload's PDL fields (`moelab.kernels.pdl`): whether moelab's decode kernels launch
    with it in this run, and where each kernel lets the next be placed."""
    from .kernels import pdl
    on = on_cuda and pdl.uses_pdl(torch.device("cuda"))
    return {"pdl": on, "pdl_next_at": pdl.NEXT_AT if on else None}


def _time_eager(fn, n_inputs: int, repeats: int = 7) -> float:
    """Median microseconds per call of fn(i), rotating i over the inputs, host overhead included."""
    for i in range(min(n_inputs, 8)):
        fn(i)
    torch.cuda.synchronize()
    calls = max(n_inputs, 50)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for c in range(calls):
            fn(c % n_inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def _time_graph(fn, n_inputs: int, repeats: int = 7) -> float:
    """Median microseconds per call with fn(0..n-1) captured in one CUDA graph (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(n_inputs, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    calls = max(n_inputs, 20)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(c % n_inputs)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


# ---------------------------------------------------------------------------- router

def hf_router_math(logits: torch.Tensor, top_k: int):
    """What transformers' Qwen2MoeTopKRouter does after the linear layer: the baseline."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.topk(probs, top_k, dim=-1)


def bench_router(tokens=(1, 64, 4096, 65536), experts: int = 60, top_k: int = 4,
                 dtype=torch.bfloat16, sweep: bool = False) -> dict:
    """Time the router systems side by side on CUDA; returns the JSON-ready dict."""
    if not torch.cuda.is_available():
        raise SystemExit("the router benchmark needs a CUDA device (the kernel's CPU path is the interpreter)")
    from .kernels.router import router_topk

    bandwidth = copy_bandwidth_gbs()
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    elt = torch.tensor([], dtype=dtype).element_size()
    compiled = torch.compile(hf_router_math, fullgraph=True, dynamic=False)
    rows = []
    for t in tokens:
        in_bytes = t * experts * elt
        # Rotate through enough inputs to exceed the L2 cache four times over.
        n_inputs = max(2, min(4096, math.ceil(4 * l2_bytes / in_bytes)))
        inputs = [torch.randn(t, experts, device="cuda").to(dtype) for _ in range(n_inputs)]
        moved = in_bytes + t * top_k * (4 + 4)  # logits in; fp32 weights + int32 ids out
        floor = floor_us(moved, bandwidth)
        systems = {
            "torch_eager": (lambda i: hf_router_math(inputs[i], top_k), _time_eager),
            "torch_graph": (lambda i: hf_router_math(inputs[i], top_k), _time_graph),
            "torch_compile_graph": (lambda i: compiled(inputs[i], top_k), _time_graph),
            "triton": (lambda i: router_topk(inputs[i], top_k), _time_eager),
            "triton_graph": (lambda i: router_topk(inputs[i], top_k), _time_graph),
            # router.py's kernel, where Triton chose the layout (the default picks router_rows.py's)
            "triton_tl_graph": (lambda i: router_topk(inputs[i], top_k, kernel="tl"), _time_graph),
        }
        if sweep:
            for bt in (1, 2, 4, 8, 16):
                for nw in (1, 2, 4):
                    if bt <= max(1, t) * 2:
                        systems[f"triton_graph_b{bt}_w{nw}"] = (
                            lambda i, bt=bt, nw=nw: router_topk(inputs[i], top_k, block_t=bt, num_warps=nw, kernel="tl"), _time_graph)
            from .kernels.router_rows import router_topk_rows
            for tpr in (1, 2, 8, 32):
                for nw in (1, 2):
                    systems[f"rows_graph_t{tpr}_w{nw}"] = (
                        lambda i, tpr=tpr, nw=nw: router_topk_rows(inputs[i], top_k, threads_per_row=tpr, num_warps=nw), _time_graph)
        for name, (fn, timer) in systems.items():
            us = timer(fn, n_inputs)
            rows.append({"tokens": t, "system": name, "us": round(us, 3), "bytes": moved,
                         "floor_us": round(floor, 5), "floor_fraction": round(floor / us, 5)})
            print(f"T={t:>6} {name:<28} {us:9.2f} us   floor {floor:7.2f} us", flush=True)
        del inputs
    return {
        "benchmark": "router",
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "versions": versions(),
        "workload": {"experts": experts, "top_k": top_k, "dtype": str(dtype).replace("torch.", ""),
                     "tokens": list(tokens), "normalize": False,
                     "note": "inputs rotate through buffers over 4x the L2 cache; graph rows are "
                             "per call inside one captured CUDA graph"},
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "results": rows,
    }


def router_summary(result: dict) -> list[str]:
    """The targets, checked against one result dict: one line per token count.

    Ratios: PyTorch eager / kernel (the kernel timed in a CUDA graph, i.e. its GPU time with
    no launch gaps, and launched eagerly from Python), compile+graph / kernel-in-graph, and
    kernel-in-graph / the bytes-over-bandwidth floor.
    """
    by = {(r["tokens"], r["system"]): r for r in result["results"]}
    lines = []
    for t in result["workload"]["tokens"]:
        eager = by[(t, "torch_eager")]["us"]
        comp = by[(t, "torch_compile_graph")]["us"]
        tri, trig = by[(t, "triton")]["us"], by[(t, "triton_graph")]["us"]
        floor = floor_us(by[(t, "triton_graph")]["bytes"], result["copy_bandwidth_gbs"])
        lines.append(f"T={t:>6}: kernel {trig:6.2f} us in a graph = {eager / trig:5.1f}x faster than torch eager "
                     f"({eager:.1f} us), {comp / trig:4.2f}x torch.compile+graph ({comp:.1f} us), "
                     f"{trig / floor:6.1f}x the floor ({floor:.2f} us); launched from Python {tri:.1f} us "
                     f"({eager / tri:.1f}x eager)")
    return lines


def plot_router(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tokens = result["workload"]["tokens"]
    systems = ("torch_eager", "torch_graph", "torch_compile_graph", "triton", "triton_tl_graph", "triton_graph")
    for system in (s for s in systems if any(r["system"] == s for r in result["results"])):
        ys = [next(r["us"] for r in result["results"] if r["tokens"] == t and r["system"] == system) for t in tokens]
        ax.plot(tokens, ys, marker="o", label=system)
    floor = [next(r["floor_us"] for r in result["results"] if r["tokens"] == t) for t in tokens]
    ax.plot(tokens, floor, "k--", label=f"bytes / copy bandwidth ({result['copy_bandwidth_gbs']:.0f} GB/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("microseconds per call")
    ax.set_title(f"Router, E={result['workload']['experts']} top-{result['workload']['top_k']} "
                 f"{result['workload']['dtype']}, {result['card']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_launch(experts: int = 60, top_k: int = 4, calls: int = 3000) -> dict:
    """Host time per call of the router at T=1, where launching is all there is to time.

    Splits `router_topk` into its parts: the output allocations, Triton's JIT launch (argument
    binding, specialisation, cache lookup) and, for comparison, launching the already-compiled
    kernel directly through `CompiledKernel` (Triton internals: None where they differ).
    """
    if not torch.cuda.is_available():
        raise SystemExit("the launch benchmark needs a CUDA device")
    import triton

    from .kernels.router import _router_kernel, launch_config, router_topk

    x = torch.randn(1, experts, device="cuda").to(torch.bfloat16)
    weights = torch.empty(1, top_k, device="cuda")
    ids = torch.empty(1, top_k, device="cuda", dtype=torch.int32)
    block_t, num_warps = launch_config(1, on_gpu=True)
    args = (x, weights, ids, 1, experts, x.stride(0), x.stride(1))
    meta = dict(TOP_K=top_k, NORMALIZE=False, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(experts),
                BLOCK_K=triton.next_power_of_2(top_k))

    def host_us(fn):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return round((time.perf_counter() - start) / calls * 1e6, 2)

    rows = {
        "torch_eager_router": host_us(lambda: hf_router_math(x, top_k)),
        "router_topk": host_us(lambda: router_topk(x, top_k)),
        "two_torch_empty": host_us(lambda: (torch.empty(1, top_k, device="cuda"),
                                            torch.empty(1, top_k, device="cuda", dtype=torch.int32))),
        "triton_jit_launch": host_us(lambda: _router_kernel[(1,)](*args, **meta, num_warps=num_warps)),
    }
    try:  # constexprs are passed as arguments too; the grid is 3-D at this level
        compiled = _router_kernel.warmup(*args, grid=(1,), **meta, num_warps=num_warps)
        full = args + tuple(meta.values())
        rows["compiled_kernel_direct_launch"] = host_us(lambda: compiled[(1, 1, 1)](*full))
    except Exception as err:  # noqa: BLE001  (internals differ between Triton versions)
        rows["compiled_kernel_direct_launch"] = None
        print(f"direct launch not available: {err!r}", file=sys.stderr)
    for name, us in rows.items():
        print(f"{name:<32} {us} us per call" if us is not None else f"{name:<32} n/a", flush=True)
    return {"benchmark": "launch", "card": card_name(), "date": _dt.date.today().isoformat(),
            "versions": versions(), "workload": {"tokens": 1, "experts": experts, "top_k": top_k, "calls": calls,
                                                 "note": "host microseconds per call, loop of calls then one sync"},
            "results": rows}


# ---------------------------------------------------------------------------- decode step

# mode: MoeForward's (attention, rope, norm, projections) and whether a CUDA graph replays the
# step; each mode adds one optimisation to the one before.
DECODE_MODES = {
    "eager_sdpa": ("sdpa", "torch", "torch", "separate", False),      # notebook 06's step: SDPA over whole rows
    "eager_kernel": ("kernel", "torch", "torch", "separate", False),  # + the decode-attention kernel
    "graph_kernel": ("kernel", "torch", "torch", "separate", True),   # + the step replayed from a CUDA graph
    "graph_rope": ("kernel", "kernel", "torch", "separate", True),    # + rotary and cache write in one kernel
    "graph_fused": ("kernel", "kernel", "kernel", "separate", True),  # + each residual add and RMSNorm in one
    "graph_fused_proj": ("kernel", "kernel", "kernel", "fused", True),  # + q/k/v and the MoE inputs as 2 GEMMs
}


def expected_distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts one layer touches when `batch` tokens each pick `top_k` of
    `num_experts` uniformly: E * (1 - ((E - K) / E) ** B). 4 at B=1, 59.3 of 60 at B=64."""
    return num_experts * (1 - ((num_experts - top_k) / num_experts) ** batch)


def _tensor_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def decode_weight_bytes(model, batch: int) -> dict:
    """Weight bytes one decode step of `batch` tokens must read (ANCHORS.md's bound): every
    dense weight once (attention, shared experts, routers, norms, lm_head; the embedding
    table is only gathered, B rows) plus each distinct routed expert touched, from the
    model's actual tensors (so bf16, fp32 or quantized experts count what they hold)."""
    config = model.config
    routed, moe_layers = 0, 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            routed += _tensor_bytes(experts)
            moe_layers += 1
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    dense = _tensor_bytes(model) - routed - (0 if tied else embed.numel() * embed.element_size())
    per_expert = routed / max(moe_layers, 1) / config.num_experts
    distinct = expected_distinct_experts(config.num_experts, config.num_experts_per_tok, batch)
    return {"dense_bytes": dense, "bytes_per_expert": per_expert, "moe_layers": moe_layers,
            "experts_per_layer": distinct, "bytes": dense + moe_layers * distinct * per_expert}


def _experts_fn(impl: str, on_cuda: bool):
    """(experts_fn, name): moelab's PyTorch experts, or the fused kernel when asked for
    ("fused") or, on CUDA, when present ("auto")."""
    from .model import experts_torch

    if impl not in ("auto", "torch", "fused"):
        raise ValueError(f"experts must be 'auto', 'torch' or 'fused', got {impl!r}")
    if impl == "torch" or (impl == "auto" and not on_cuda):
        return experts_torch, "torch"
    try:
        from .kernels.experts import fused_experts_forward
    except ImportError as err:
        if impl == "fused":
            raise SystemExit(f"--experts fused: moelab.kernels.experts.fused_experts_forward is missing ({err})")
        return experts_torch, "torch"
    return fused_experts_forward, "fused"


def _profile_step(step, steps: int, timeline: bool, on_cuda: bool = True) -> dict:
    """Kernels of `steps` decode steps under torch.profiler: the top ones by device time
    per step, GPU busy time per step, and optionally one step's kernel timeline.
    on_cuda=False profiles CPU ops instead (their device time is 0): for testing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    kind = DeviceType.CUDA if on_cuda else DeviceType.CPU
    step()  # outside the profile: nothing lazy inside it
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])) as prof:
        for _ in range(steps):
            step()
        sync()

    def device_us(evt, self_time=True):
        for name in (("self_device_time_total", "self_cuda_time_total") if self_time
                     else ("device_time_total", "cuda_time_total")):
            if hasattr(evt, name):
                return getattr(evt, name)
        return 0.0

    kernels = [e for e in prof.key_averages() if e.device_type == kind]
    kernels.sort(key=device_us, reverse=True)
    busy = sum(device_us(e) for e in kernels) / steps
    top = [{"kernel": e.key[:120], "us_per_step": round(device_us(e) / steps, 2),
            "calls_per_step": round(e.count / steps, 2),
            "share": round(device_us(e) / steps / busy, 4) if busy else None} for e in kernels[:20]]
    out = {"gpu_busy_ms_per_step": round(busy / 1e3, 3), "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
           "top_kernels": top}
    out["table"] = None
    for sort in ("self_device_time_total", "self_cuda_time_total"):  # the name differs between torch versions
        try:
            out["table"] = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
            break
        except Exception:  # noqa: BLE001, S112
            continue
    if timeline:
        events = sorted((e for e in prof.events() if e.device_type == kind),
                        key=lambda e: e.time_range.start)
        if events:
            t0 = events[0].time_range.start
            per_step = len(events) // steps
            out["timeline_one_step"] = [[e.name[:80], round(e.time_range.start - t0, 2),
                                         round(e.time_range.elapsed_us(), 2)] for e in events[:per_step]]
    return out


def bench_decode(model_name: str = "tiny", batches=(1, 2, 4, 8), prompt_len=(64,), steps: int = 32,
                 repeats: int = 5, device: str | None = None, modes=None, experts: str = "auto",
                 max_seq_len: int | None = None, profile: bool = False, seed: int = 0,
                 quantize: str | None = None) -> dict:
    """Time moelab's decode step for B sequences at once, B in `batches`, in several modes
    side by side (notebooks 06 and 08), each adding one optimisation (`DECODE_MODES`):
    `eager_sdpa` (MoeForward.decode with SDPA over the masked cache rows), `eager_kernel`
    (the decode-attention kernel), `graph_kernel` (the same step replayed from a CUDA graph,
    `moelab.graphs`), `graph_rope` (rotary + cache write in one kernel), `graph_fused`
    (residual add + RMSNorm in one kernel as well), `graph_fused_proj` (q/k/v as one GEMM and
    the shared expert's gate/up, the router and the shared gate as another: `moelab.fuse`).

    Each sequence is prefilled with a random prompt (`prompt_len`: one length, or a
    (low, high) range drawn per sequence), then `steps` steps run, each ending with one
    copy of the new ids to the host, as an engine does; the median of `repeats` runs (each
    from the same prefilled state) is kept. On CUDA the run also measures the copy
    bandwidth and reports each figure against the weight-bandwidth bound of ANCHORS.md.
    On the CPU this measures per-op overhead more than arithmetic. quantize="nf4" loads the
    model with moelab's NF4 experts (`moelab.load(..., quantize="nf4")`; "nf4_head" with lm_head in
    NF4 too); the bound then counts the bytes the quantized tensors hold.
    """
    from .graphs import DecodeGraphs
    from .model import MoeForward
    from .models import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device == "cuda"
    modes = tuple(modes or (tuple(DECODE_MODES) if on_cuda else ("eager_sdpa",)))
    for mode in modes:
        if mode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {mode!r}: choose from {tuple(DECODE_MODES)}")
        if DECODE_MODES[mode][4] and not on_cuda:
            raise ValueError(f"the {mode} mode needs CUDA (CUDA graphs); on the CPU use eager_sdpa / eager_kernel")
    low, high = (prompt_len[0], prompt_len[-1]) if not isinstance(prompt_len, int) else (prompt_len, prompt_len)
    warmup = 3
    max_seq_len = max_seq_len or high + warmup + steps + 1
    if high + warmup + steps + 1 > max_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} cannot hold {high} prompt tokens + {warmup + steps} steps")
    load_kwargs = {"device": device}
    if model_name != "tiny":
        load_kwargs["random_weights"] = True
    if quantize:
        load_kwargs["quantize"] = quantize
    model, _ = load(model_name, **load_kwargs)
    experts_fn, experts_impl = _experts_fn(experts, on_cuda)
    forwards = {mode: MoeForward(model, experts_fn=experts_fn, attention=DECODE_MODES[mode][0],
                                 rope=DECODE_MODES[mode][1], norm=DECODE_MODES[mode][2],
                                 projections=DECODE_MODES[mode][3]) for mode in modes}
    reference = MoeForward(model, experts_fn=experts_fn, attention="sdpa", rope="torch", norm="torch",
                           projections="separate")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    bandwidth = copy_bandwidth_gbs() if on_cuda else None
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 256) if model_name == "tiny" else model.config.vocab_size
    rows, profiles = [], []
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    for batch in batches:
        cache = reference.new_cache(num_slots=batch + 1, max_seq_len=max_seq_len)  # + the scratch slot
        slots = [cache.allocate(max_seq_len) for _ in range(batch)]
        lens = torch.randint(low, high + 1, (batch,), generator=gen).tolist()
        prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
        first = reference.prefill(cache, prompts, slots).argmax(-1)
        slots_t = torch.tensor(slots, device=cache.device)
        lengths = cache.lengths.clone()
        weights = decode_weight_bytes(model, batch) if on_cuda else None
        seen = {}  # mode -> the ids of the first timed run, to compare modes
        for mode in modes:
            fwd = forwards[mode]
            graphs, capture_s = None, None
            try:
                if DECODE_MODES[mode][4]:
                    graphs = DecodeGraphs(fwd, cache, buckets=(batch,), mode="graph")
                    capture_s = round(sum(graphs.capture_seconds.values()), 3)
                    step_ids = graphs.step
                else:
                    def step_ids(tokens, slots, fwd=fwd):
                        return fwd.decode(cache, tokens, slots, check=False).argmax(-1)
                state = {"tokens": first, "log": []}

                def step():
                    state["tokens"] = step_ids(state["tokens"], slots_t)
                    state["log"].append(state["tokens"].tolist())  # the engine's one copy of new ids to the host

                if on_cuda:
                    torch.cuda.reset_peak_memory_stats()
                per_step = []
                for _ in range(repeats):
                    cache.lengths.copy_(lengths)
                    state["tokens"], state["log"] = first, []
                    for _ in range(warmup):
                        step()
                    sync()
                    start = time.perf_counter()
                    for _ in range(steps):
                        step()
                    sync()
                    per_step.append((time.perf_counter() - start) / steps * 1e3)
                    seen.setdefault(mode, state["log"])
            except Exception as err:  # noqa: BLE001  (one failing mode must not lose the others' timings)
                rows.append({"system": f"moelab_{mode}", "mode": mode, "batch": batch, "error": repr(err)[:500]})
                print(f"batch {batch:>3} {mode:<13}: FAILED {err!r}", file=sys.stderr, flush=True)
                if graphs is not None:
                    graphs.release()
                continue
            ms = statistics.median(per_step)
            row = {"system": f"moelab_{mode}", "mode": mode, "precision": quantize or dtype_name,
                   "experts_impl": experts_impl, "batch": batch,
                   "concurrency": batch, "ms_per_step": round(ms, 3), "tokens_per_s": round(batch / ms * 1e3, 1),
                   "mean_context": round(sum(lens) / batch + warmup + steps / 2, 1)}
            base = seen.get(modes[0])
            if base is not None and mode != modes[0]:
                # Random weights give near-tied logits: rounding differences between modes flip a few
                # argmaxes (and a sequence diverges after one). A low match means a broken mode.
                row["ids_match_first_mode"] = round(sum(a == b for x, y in zip(base, seen[mode])
                                                        for a, b in zip(x, y)) / (len(base) * batch), 4)
            if on_cuda:
                bound = batch * bandwidth * 1e9 / weights["bytes"]
                row.update(peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                           bound_tokens_per_s=round(bound, 1), roofline_fraction=round(batch / ms * 1e3 / bound, 4),
                           capture_s=capture_s)
            if graphs is not None:
                row["graph_captured"] = graphs.captured  # False: capture failed, these are eager figures
            rows.append(row)
            print(f"batch {batch:>3} {mode:<13}: {ms:8.2f} ms per step, {batch / ms * 1e3:8.1f} tokens/s"
                  + (f", {row['roofline_fraction']:.1%} of the bound ({row['bound_tokens_per_s']:.0f})"
                     if on_cuda else ""), flush=True)
            if profile and on_cuda:
                cache.lengths.copy_(lengths)
                state["tokens"] = first
                try:
                    prof = _profile_step(step, 3, timeline=batch == batches[0])
                except Exception as err:  # noqa: BLE001  (a profiler failure must not lose the timings)
                    prof = {"error": repr(err)}
                profiles.append({"mode": mode, "batch": batch, "wall_ms_per_step": round(ms, 3), **prof})
                if "gpu_busy_ms_per_step" in prof:
                    print(f"    profile: GPU busy {prof['gpu_busy_ms_per_step']:.2f} ms of {ms:.2f} ms per step, "
                          f"{prof['kernels_per_step']:.0f} kernels", flush=True)
            if graphs is not None:
                graphs.release()
                del graphs
        del cache
        if on_cuda:
            torch.cuda.empty_cache()
    for mode in modes:
        mode_rows = [r for r in rows if r["mode"] == mode and "error" not in r]
        for row in mode_rows:
            row["step_cost_vs_batch_1"] = round(row["ms_per_step"] / mode_rows[0]["ms_per_step"], 3)
    result = {
        "benchmark": "decode",
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "versions": versions(),
        "workload": {"model": model_name, "dtype": dtype_name, "quantize": quantize,
                     "random_weights": model_name != "tiny", "prompt_len": [low, high], "steps": steps,
                     "warmup_steps": warmup, "repeats": repeats, "batches": list(batches), "modes": list(modes),
                     "max_seq_len": max_seq_len, "experts_impl": experts_impl, **_pdl_fields(on_cuda),
                     "note": "moelab decode step over a slot KV cache, greedy on the device, one copy of the new "
                             "ids to the host per step; median ms per step. step_cost_vs_batch_1 is relative to "
                             "the mode's first batch. Random weights measure speed, never quality."},
        "results": rows,
    }
    if on_cuda:
        result["copy_bandwidth_gbs"] = round(bandwidth, 1)
        result["weight_bytes_per_step"] = {b: decode_weight_bytes(model, b) for b in batches}
    if profiles:
        result["profiles"] = profiles
    return result


def prefill_flops(config, prompt_len: int) -> float:
    """Matmul FLOPs of prefilling one prompt of `prompt_len` tokens (2 per multiply-add): per
    token the dense projections, the router, the shared expert and top-k routed experts of
    every layer; per layer causal attention, QK^T and PV over L(L+1)/2 query-key pairs. The
    lm_head is left out (prefill projects only the last token)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn_proj = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q and o, k and v
    experts = config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
    shared = 3 * h * config.shared_expert_intermediate_size + h  # + its gate
    per_token = 2 * layers * (attn_proj + h * config.num_experts + experts + shared)
    attention = 2 * 2 * layers * heads * head_dim * prompt_len * (prompt_len + 1) / 2
    return per_token * prompt_len + attention


def bench_prefill(model_name: str = "qwen1.5-moe-a2.7b", lengths=(64, 512, 2048, 4096), repeats: int = 5,
                  seed: int = 0) -> dict:
    """Prefill throughput on CUDA: one prompt of each length through `MoeForward.prefill`
    (eager: SDPA, the grouped experts kernels) and replayed from a `PrefillGraphs` graph of
    that length, timed with CUDA events (median of `repeats`), as tokens/s and as a fraction
    of the card's measured bf16 matmul rate (`matmul_tflops`): a long prefill is
    compute-bound, so that is its roofline; a short eager one waits on its launches (notebook 08)."""
    from .graphs import PrefillGraphs
    from .model import MoeForward
    from .models import load

    model, _ = load(model_name, device="cuda", **({} if model_name == "tiny" else {"random_weights": True}))
    fwd = MoeForward(model)
    tflops = matmul_tflops()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = []
    for n in lengths:
        cache = fwd.new_cache(num_slots=1, max_seq_len=n)
        prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()

        slot = cache.allocate(n)

        def run():
            cache.lengths.zero_()
            return fwd.prefill(cache, [prompt], [slot])

        graphs = PrefillGraphs(fwd, cache, buckets=(n,))
        for mode, step in (("eager", run), ("graph", lambda: graphs.prefill(prompt, slot))):
            sec = median_seconds(step, repeats, warmup=2)
            flops = prefill_flops(model.config, n)
            rows.append({"prompt_len": n, "mode": mode, "ms": round(sec * 1e3, 3), "tokens_per_s": round(n / sec, 1),
                         "tflops": round(flops / sec / 1e12, 1),
                         "matmul_fraction": round(flops / sec / 1e12 / tflops, 4)})
            print(f"prefill {n:>5} tokens {mode:<5}: {sec * 1e3:8.2f} ms, {n / sec:9.0f} tokens/s, "
                  f"{flops / sec / 1e12:6.1f} TFLOP/s = {rows[-1]['matmul_fraction']:.0%} of the measured matmul rate "
                  f"({tflops:.0f})", flush=True)
        graphs.release()
        del cache, graphs
    return {"benchmark": "prefill", "card": card_name(), "date": _dt.date.today().isoformat(), "versions": versions(),
            "workload": {"model": model_name, "lengths": list(lengths), "repeats": repeats,
                         "note": "one prompt per prefill from position 0: eager MoeForward.prefill (SDPA, grouped "
                                 "experts kernels) and the same length replayed from a PrefillGraphs graph"},
            "matmul_tflops": round(tflops, 1), "results": rows}


def decode_summary(result: dict) -> list[str]:
    """One line per batch: each mode's tokens/s, its fraction of the bound, graph vs eager."""
    lines = []
    for batch in result["workload"]["batches"]:
        by = {r["mode"]: r for r in result["results"] if r["batch"] == batch and "error" not in r}
        parts = [f"{m} {r['tokens_per_s']:.0f} tok/s" + (f" ({r['roofline_fraction']:.0%} of "
                 f"{r['bound_tokens_per_s']:.0f})" if r.get("roofline_fraction") is not None else "")
                 for m, r in by.items()]
        parts += [f"{r['mode']} FAILED" for r in result["results"] if r["batch"] == batch and "error" in r]
        for new, old, what in (("eager_kernel", "eager_sdpa", "kernel {:.2f}x SDPA"),
                               ("graph_kernel", "eager_kernel", "graphs {:.2f}x eager"),
                               ("graph_rope", "graph_kernel", "fused rope {:.2f}x"),
                               ("graph_fused", "graph_rope", "fused norm {:.2f}x"),
                               ("graph_fused_proj", "graph_fused", "fused projections {:.2f}x")):
            if new in by and old in by:
                parts.append(what.format(by[new]["tokens_per_s"] / by[old]["tokens_per_s"]))
        lines.append(f"batch {batch:>3}: " + ", ".join(parts))
    return lines


def plot_decode(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = result["workload"]["batches"]
    for mode in result["workload"]["modes"]:
        points = [(b, r["tokens_per_s"]) for b in batches for r in result["results"]
                  if r["batch"] == b and r["mode"] == mode and "error" not in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=mode)
    bounds = [next((r["bound_tokens_per_s"] for r in result["results"] if r["batch"] == b and "bound_tokens_per_s" in r),
                   None) for b in batches]
    if all(b is not None for b in bounds):
        ax.plot(batches, bounds, "k--", label=f"weight-bandwidth bound ({result['copy_bandwidth_gbs']:.0f} GB/s)")
        ax.plot(batches, [b / 2 for b in bounds], "k:", label="50% of the bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences decoded together (batch)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"moelab decode, {result['workload']['model']} "
                 f"{result['workload'].get('quantize') or result['workload']['dtype']}, "
                 f"experts {result['workload']['experts_impl']}, {result['card']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- decode attention

def bench_attention(batches=(1, 8, 64), contexts=(64, 512, 2048), heads: int = 16, kv_heads: int = 16,
                    head_dim: int = 128, max_seq_len: int = 2048, layers: int = 24,
                    splits=(1, 2, 4, 8, 16), dtype=torch.bfloat16, sweep: bool = False) -> dict:
    """Decode attention alone on CUDA, Qwen1.5-MoE's shapes: SDPA over the whole masked cache
    rows (MoeForward's `sdpa` path) against the Triton kernel with its default split-K and
    forced splits, every sequence at `context` keys, each timed inside a CUDA graph and
    rotating over `layers` layers of a full-size cache (so small cases are not all in L2).
    `sweep` adds keys-per-block x warps variants of the one-split kernel."""
    if not torch.cuda.is_available():
        raise SystemExit("the attention benchmark needs a CUDA device")
    import torch.nn.functional as F

    from .kernels.attention import choose_splits, decode_attention, num_sm

    bandwidth = copy_bandwidth_gbs()
    num_slots = max(batches)
    k = torch.randn(layers, num_slots, kv_heads, max_seq_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    rows = []
    for batch in batches:
        slots = torch.randperm(num_slots, device="cuda")[:batch]
        q = torch.randn(layers, batch, heads, head_dim, device="cuda", dtype=dtype)
        for context in contexts:
            lengths = torch.full((batch,), context, device="cuda", dtype=torch.int64)
            mask = torch.arange(max_seq_len, device="cuda")[None, None, None, :] < lengths[:, None, None, None]

            def sdpa(i):
                kk, vv = k[i].index_select(0, slots), v[i].index_select(0, slots)
                return F.scaled_dot_product_attention(q[i][:, :, None], kk, vv, attn_mask=mask,
                                                      enable_gqa=heads != kv_heads)

            auto = choose_splits(batch, kv_heads, max_seq_len, num_sm())
            systems = {"sdpa_full_rows": sdpa,
                       f"kernel_auto_s{auto}": lambda i: decode_attention(q[i], k[i], v[i], slots, lengths)}
            for n in splits:
                systems[f"kernel_s{n}"] = lambda i, n=n: decode_attention(q[i], k[i], v[i], slots, lengths,
                                                                          num_splits=n)
            for block_n in (16, 32, 64, 128) if sweep else ():
                for warps in (2, 4, 8):
                    systems[f"kernel_s1_n{block_n}_w{warps}"] = (
                        lambda i, bn=block_n, w=warps: decode_attention(q[i], k[i], v[i], slots, lengths, num_splits=1,
                                                                        block_n=bn, num_warps=w))
            moved = 2 * batch * kv_heads * context * head_dim * k.element_size() + 2 * q[0].nbytes
            floor = floor_us(moved, bandwidth)
            for name, fn in systems.items():
                us = _time_graph(fn, layers)
                rows.append({"batch": batch, "context": context, "system": name, "us": round(us, 2),
                             "bytes": moved, "floor_us": round(floor, 3), "floor_fraction": round(floor / us, 4)})
                print(f"B={batch:>3} context={context:>5} {name:<16} {us:9.2f} us   floor {floor:8.2f} us", flush=True)
    return {"benchmark": "attention", "card": card_name(), "date": _dt.date.today().isoformat(),
            "versions": versions(),
            "workload": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "max_seq_len": max_seq_len,
                         "layers_rotated": layers, "dtype": str(dtype).replace("torch.", ""),
                         "batches": list(batches), "contexts": list(contexts), "sm_count": num_sm(),
                         "note": "one decode-attention call per layer, timed inside a CUDA graph; bytes = the keys "
                                 "and values each sequence holds, which is all the kernel reads"},
            "copy_bandwidth_gbs": round(bandwidth, 1), "results": rows}


# ---------------------------------------------------------------------------- serving (the full benchmark)

DEFAULT_SERVE_SYSTEMS = ("hf_serial", "hf_static", "hf_compiled", "hf_continuous", "moelab_static",
                         "moelab_continuous")
# moelab_continuous_sync: the continuous Engine without overlap (each decode step read back before the
# next is launched), for measuring what overlap buys (notebook 08).
SERVE_SYSTEMS = DEFAULT_SERVE_SYSTEMS + ("moelab_continuous_sync",)
SERVE_PRESETS = {"tiny": "cpu", "qwen1.5-moe-a2.7b": "cuda"}
SERVE_PRECISIONS = ("fp32", "bf16", "nf4", "nf4_head")  # nf4_head: lm_head in NF4 too (an opt-in)
SERIAL_EXPERTS = ("eager", "grouped_mm")  # hf_serial runs once with each of transformers' experts paths
LOGITS_TOLERANCE = 0.05  # teacher-forced logits: |moelab - transformers| / |transformers| (L2, per prompt)
DECODE_AGREEMENT = 0.8  # served greedy tokens, teacher-forced through transformers: least top-1 agreement


def serve_workload(num_requests: int = 32, prompt_len=(16, 64), output_len=(8, 128), rate: float | None = None,
                   vocab: int = 256, seed: int = 0) -> dict:
    """A seeded serving workload: random prompts and output lengths drawn uniformly from the
    inclusive ranges, arrival offsets in seconds (all 0, or a Poisson process of `rate`
    requests per second). Every system gets the same one and must produce exactly
    `outputs[i]` tokens for request i (EOS ignored)."""
    import random

    for name, (lo, hi) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be 1 <= LOW <= HIGH, got {lo} {hi}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))] for _ in range(num_requests)]
    outputs = [rng.randint(*output_len) for _ in range(num_requests)]
    arrivals, t = [], 0.0
    for _ in range(num_requests):
        arrivals.append(t)
        if rate is not None:
            t += rng.expovariate(rate)
    return {"num_requests": num_requests, "prompt_len": list(prompt_len), "output_len": list(output_len),
            "rate": rate, "seed": seed, "prompts": prompts, "outputs": outputs, "arrivals": arrivals}


def first_requests(wl: dict, n: int) -> dict:
    """The workload's first `n` requests (the slow serial baselines run on fewer)."""
    n = min(n, wl["num_requests"])
    return {**wl, "num_requests": n, **{k: wl[k][:n] for k in ("prompts", "outputs", "arrivals")}}


def warm_workload(wl: dict, n: int, new_tokens: int = 4) -> dict:
    """The workload's first `n` requests, all arriving at once, each cut to at most `new_tokens`
    outputs: a warm-up that runs the prefill batches and decode batch sizes a timed run of `n` at
    once will (Triton kernels compile for those token counts, CUDA graphs capture their buckets),
    without its length."""
    w = first_requests(wl, n)
    return {**w, "outputs": [min(o, new_tokens) for o in w["outputs"]], "arrivals": [0.0] * w["num_requests"]}


def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


class _TokenClock:
    """A transformers StoppingCriteria that notes when each generate step ends and marks each
    row done once it has its own number of new tokens (a padded batch keeps computing the
    finished rows until the longest ends, as static batching does)."""

    def __init__(self, prompt_width: int, wanted: list[int]):
        self.prompt_width, self.wanted, self.times = prompt_width, torch.tensor(wanted), []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return (input_ids.shape[1] - self.prompt_width >= self.wanted).to(input_ids.device)


def _hf_generate(model, prompts: list[list[int]], wanted: list[int], pad_id: int, **generate_kwargs):
    """HF generate on a left-padded batch, greedy, EOS ignored; returns per-row (token times, tokens)."""
    from transformers import StoppingCriteriaList

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = next(model.parameters()).device
    clock = _TokenClock(width, wanted)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(wanted), do_sample=False,
                         eos_token_id=None, pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([clock]),
                         **generate_kwargs)
    new = out[:, width:].tolist()
    return [(clock.times[:n], new[i][:n]) for i, n in enumerate(wanted)]


def _run_hf_batches(model, wl, batch, pad_id, **generate_kwargs):
    """Requests in arrival order, `batch` at a time (1: HF serial); a batch starts when its
    last request has arrived and the previous batch is done. Returns (start, records) with a
    record (arrival, token times, tokens) per request."""
    records, start = [], time.perf_counter()
    for i in range(0, wl["num_requests"], batch):
        idx = list(range(i, min(i + batch, wl["num_requests"])))
        _wait_until(start + wl["arrivals"][idx[-1]])
        rows = _hf_generate(model, [wl["prompts"][j] for j in idx], [wl["outputs"][j] for j in idx], pad_id,
                            **generate_kwargs)
        records += [(start + wl["arrivals"][j], t, tokens) for j, (t, tokens) in zip(idx, rows)]
    return start, records


def _run_hf_continuous(model, wl, concurrency):
    """HF's continuous batching (the manager behind `generate_batch`), each request with its
    own max_new_tokens and EOS off, submitted at its arrival time. The manager persists on
    the model between calls, so a first (untimed) call leaves it warm and sized."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(wl["outputs"]))
    # At most `concurrency` requests per batch: the same concurrency as the other systems.
    # Its paged cache sized like moelab's slots (left alone it sizes itself from free memory:
    # on the CPU that is gigabytes to zero, ~20 s before the first request), and the same
    # per-step token budget as moelab's Engine (256; transformers 5.17 needs both numbers).
    longest = max(len(p) + n for p, n in zip(wl["prompts"], wl["outputs"]))
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=concurrency, max_batch_tokens=256,
                                         num_blocks=2 * concurrency * math.ceil(longest / 256) + 4)
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb_config,
                                                   block=True, timeout=60, persistent_manager=True) as manager:
        ids, start = {}, time.perf_counter()  # the clock starts once the manager is up
        for i in range(wl["num_requests"]):
            _wait_until(start + wl["arrivals"][i])
            rid = manager.add_request(wl["prompts"][i], max_new_tokens=wl["outputs"][i], record_timestamps=True,
                                      eos_token_id=-1)
            ids[rid] = i
        results = {}
        while len(results) < len(ids):
            out = manager.get_result(timeout=60)
            if out is None:
                raise RuntimeError("HF continuous batching stopped before finishing every request")
            if out.is_finished():
                results[ids[out.request_id]] = out
    records = []
    for i in range(wl["num_requests"]):
        out = results[i]
        if len(out.generated_tokens) != wl["outputs"][i] or out.error:
            raise RuntimeError(f"HF continuous batching gave {len(out.generated_tokens)} tokens for request {i}, "
                               f"wanted {wl['outputs'][i]} ({out.error})")
        records.append((start + wl["arrivals"][i], list(out.timestamps), [int(t) for t in out.generated_tokens]))
    return start, records


def _run_moelab(engine, wl):
    """Submit each request at its arrival time and step the engine meanwhile."""
    n, submitted, requests, start = wl["num_requests"], 0, [], time.perf_counter()
    while submitted < n or not engine.idle:
        now = time.perf_counter()
        while submitted < n and start + wl["arrivals"][submitted] <= now:
            requests.append(engine.submit(wl["prompts"][submitted], wl["outputs"][submitted],
                                          arrival_time=start + wl["arrivals"][submitted], ignore_eos=True))
            submitted += 1
        if engine.idle:
            _wait_until(start + wl["arrivals"][submitted])
            continue
        engine.step()
    return start, [(r.arrival_time, r.token_times, list(r.output)) for r in requests]


def serve_metrics(records, seconds: float) -> dict:
    """tokens/s over the run, TTFT (arrival to first token) and inter-token latency p50/p99 in ms."""
    from .engine import percentile

    tokens = sum(len(t) for _, t, *_ in records)
    ttft = [(t[0] - arrival) * 1e3 for arrival, t, *_ in records if t]
    itl = [(b - a) * 1e3 for _, t, *_ in records for a, b in zip(t, t[1:])]
    r2 = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_ms": r2(percentile(ttft, 50)), "ttft_p99_ms": r2(percentile(ttft, 99)),
            "itl_p50_ms": r2(percentile(itl, 50)), "itl_p99_ms": r2(percentile(itl, 99))}


def teacher_forced_check(model, prompts: list[list[int]], experts_fn, tolerance: float = LOGITS_TOLERANCE) -> dict:
    """Logits of every prompt position from moelab's forward (`MoeForward.prefill`) against
    transformers' own forward of the same model and weights. The measure is the relative L2
    error per prompt, |moelab - transformers| / |transformers| over all its positions and the
    vocabulary; it must stay under `tolerance` for every prompt. On `tiny` in bf16 it is at
    most 0.015 (3 significant digits, rounded at different places); experts scaled by 1.1
    give 0.02-0.035, by 1.5 about 0.1 (measured 2026-11-28). Also reported: the largest
    single-logit difference over max |transformers|, and the fraction of positions whose top-1
    token agrees (bf16 near-ties may flip a few)."""
    from .model import MoeForward

    forward = MoeForward(model, experts_fn=experts_fn)
    cache = forward.new_cache(len(prompts), max(len(p) for p in prompts))
    device = cache.device
    worst, worst_abs, agree, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        slots = [cache.allocate(len(p)) for p in prompts]
        ours = forward.prefill(cache, prompts, slots, all_logits=True)
        for prompt, got in zip(prompts, ours):
            ref = model(torch.tensor([prompt], device=device)).logits[0].float()
            diff = got.float() - ref
            worst = max(worst, (diff.norm() / ref.norm()).item())
            worst_abs = max(worst_abs, (diff.abs().max() / ref.abs().max()).item())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(prompt)
    return {"rel_l2_error": float(f"{worst:.3g}"), "tolerance": tolerance,
            "max_abs_diff_rel": float(f"{worst_abs:.3g}"), "top1_agreement": round(agree / total, 4),
            "positions": total, "ok": worst < tolerance}


def served_tokens_check(model, prompts: list[list[int]], outputs: list[list[int]],
                        threshold: float = DECODE_AGREEMENT) -> dict:
    """The greedy tokens a moelab system served, fed back through transformers' own forward of
    the same model: the fraction of generated positions where transformers' argmax is the token
    served. `teacher_forced_check` runs moelab's prefill only; this is the check that sees the
    decode steps (their kernels, CUDA graphs and sampling). Teacher-forcing on the served tokens
    keeps both on one context, so a correct run disagrees only at near-ties (bf16 and NF4 flip a
    few); a wrong decode path agrees almost nowhere. A decode kernel that returned garbage on an
    H100 (2026-12-07) passed the prompt-logits check at 0.0198 and served tokens at full speed:
    this is what catches it."""
    agree = total = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            if not out:
                continue
            seq = torch.tensor([list(prompt) + list(out[:-1])], device=model.device)
            predicted = model(seq).logits[0, len(prompt) - 1:].argmax(-1).tolist()
            agree += sum(int(p == t) for p, t in zip(predicted, out))
            total += len(out)
    fraction = agree / total if total else 1.0
    return {"top1_agreement": round(fraction, 4), "threshold": threshold, "positions": total,
            "ok": fraction >= threshold, "required": True}


def tokens_check(tokens: dict) -> dict:
    """Every system's greedy tokens for the requests they all served, against the first system's."""
    names = list(tokens)
    if len(names) < 2:
        return {"systems": names, "ok": True, "mismatches": []}
    ref_name = names[0]
    mismatches = []
    for name in names[1:]:
        n = min(len(tokens[ref_name]), len(tokens[name]))
        for i in range(n):
            if tokens[name][i] != tokens[ref_name][i]:
                a, b = tokens[ref_name][i], tokens[name][i]
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                mismatches.append(f"{name} vs {ref_name}: request {i} differs at output token {at}")
                break
    return {"systems": names, "reference": ref_name, "ok": not mismatches, "mismatches": mismatches}


def _dtype_of(precision: str, on_cuda: bool) -> torch.dtype:
    if precision.startswith("nf4"):
        return torch.bfloat16 if on_cuda else torch.float32  # NF4's compute dtype
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


class _ProgressBar:
    """A one-line text progress bar on stderr (no dependency); `note` prints a line above it."""

    def __init__(self, total: int, enabled: bool = True):
        enabled = enabled and sys.stderr.isatty()  # a log file gets the plain lines only
        self.total, self.done, self.enabled, self.start = max(total, 1), 0, enabled, time.perf_counter()

    def _draw(self, label: str = "") -> None:
        if self.enabled:
            filled = int(30 * self.done / self.total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                  f"{time.perf_counter() - self.start:6.0f} s {label[:40]:<40}", end="", file=sys.stderr, flush=True)

    def advance(self, label: str) -> None:
        self.done += 1
        self._draw(label)

    def note(self, line: str) -> None:
        if self.enabled:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr)
        print(line, file=sys.stderr if self.enabled else sys.stdout, flush=True)
        self._draw()

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


class CompileTimeCap(TimeoutError):
    """An hf_compiled run went past `compile_time_cap` seconds (raised from SIGALRM)."""


_CAP = {"fired": None}  # the message of the time cap that went off during the current run, if one did


def _time_cap_start(seconds: float, label: str) -> None:
    """Raise CompileTimeCap in the main thread after `seconds`, and again every second until
    `_time_cap_stop` (SIGALRM; a no-op where there is none, e.g. Windows or a worker thread).
    torch.compile works in the main thread (its Triton compile workers are processes), so this
    stops a compilation that runs long. Dynamo wraps the exception in its own (TorchRuntimeError,
    seen on torch 2.13), or may swallow one, so `_CAP["fired"]` is what the caller checks."""
    import signal
    import threading

    _CAP["fired"] = None
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return

    def expired(signum, frame):
        _CAP["fired"] = (f"{label} went past the compile time cap ({seconds:.0f} s were left of it at its start) "
                         "(warm-up with torch.compile + timed run); stopped")
        raise CompileTimeCap(_CAP["fired"])

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01), 1.0)


def _time_cap_stop() -> None:
    import signal
    import threading

    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _drop_compiled(model) -> None:
    """Forget what HF's generate compiled on `model` (its `_compiled_call`, dynamo's caches and
    the CUDA graph pools of mode reduce-overhead), so that memory is not in the next rows' peak."""
    if getattr(model, "_compiled_call", None) is None:
        return
    del model._compiled_call
    torch._dynamo.reset()
    _free_memory(torch.cuda.is_available())


def _error_row(system: str, precision: str, experts_impl: str, concurrency: int, why: str) -> dict:
    """A result row for a run that did not produce figures (failed, skipped, not installed): it
    keeps its place in the table with the reason."""
    return {"system": system, "precision": precision, "experts_impl": experts_impl, "concurrency": concurrency,
            "error": why[:300]}


def _free_memory(on_cuda: bool) -> None:
    """Collect cycles (an Engine holds some) and give cached CUDA blocks back."""
    import gc

    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def bench_serve(model_name: str = "tiny", device: str = "cpu", systems=DEFAULT_SERVE_SYSTEMS, num_requests: int = 32,
                prompt_len=(16, 64), output_len=(8, 128), rate: float | None = None, concurrency=(8,),
                seed: int = 0, precisions=None, serial_requests: int | None = None, random_weights: bool = False,
                serial_experts=SERIAL_EXPERTS, threads: int | None = 1, repeats: int = 1,
                progress_bar: bool = True, max_seq_len: int | None = None,
                compile_time_cap: float | None = None) -> dict:
    """The full benchmark (notebooks/09_full_benchmark): one seeded workload served by each
    system, precision and concurrency in turn, same prompts, EOS ignored by all.

    hf_serial: HF generate one request at a time (on the first `serial_requests`), once with
    each experts path in `serial_experts`; every HF system at concurrency 1 is one request at a
    time too, and serves the same first `serial_requests` (moelab serves them all); hf_static: HF generate on left-padded batches of
    `concurrency`; hf_compiled: the same with HF's static cache, which HF compiles with
    torch.compile on CUDA (on the CPU it stays eager: `compiled` says which); hf_continuous:
    HF's continuous batching (generate_batch's manager), at most `concurrency` requests per
    batch; moelab_static / moelab_continuous: the Engine with `concurrency` slots under each
    policy (overlapped decode steps where the Engine's default has them: on CUDA);
    moelab_continuous_sync: the continuous Engine with overlap off. Precisions: fp32 / bf16 load the model in that dtype; nf4 runs moelab on
    `moelab.load(..., quantize="nf4")` and, on CUDA, transformers on its own bitsandbytes
    4-bit path (on the CPU the HF systems have no NF4 row); nf4_head is the same with lm_head in
    NF4 too, for both (an opt-in: `moelab.quant.quantize_head_`). Every system is warmed up first.

    Checks (in `result["checks"]`): at fp32 every system's greedy tokens must be identical;
    at every precision the teacher-forced logits of moelab's forward and transformers' agree
    within LOGITS_TOLERANCE. With `repeats` > 1 each run is repeated, keeping the fastest (every
    run's tokens/s in the row's `tokens_per_s_runs`); the moelab systems of a precision then run
    round by round in alternating order (A B, then B A, each round on a fresh Engine), because
    the first Engine served after a model build ran 2-3 % slower on an H100 whatever it was
    (notebook 08, section 14).

    max_seq_len: the KV-cache row length of moelab's Engine (default: just enough for the
    workload; the GPU runs use 2048, like the decode benchmark). compile_time_cap: seconds all
    hf_compiled runs of one precision together (warm-ups with their compilation, timed runs)
    may take; the run that goes past is stopped and recorded as an error row, the later ones as
    skipped (None: no cap; needs the main thread, Unix).
    """
    from .engine import Engine
    from .models import load

    concurrency = (concurrency,) if isinstance(concurrency, int) else tuple(concurrency)
    on_cuda = device == "cuda"
    precisions = tuple(precisions or (("bf16", "nf4") if on_cuda else ("fp32", "nf4")))
    unknown = [s for s in systems if s not in SERVE_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; systems are {list(SERVE_SYSTEMS)}")
    bad = [p for p in precisions if p not in SERVE_PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; precisions are {list(SERVE_PRECISIONS)}")
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency must be one or more integers >= 1, got {list(concurrency)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but this machine has no CUDA device")
    if not on_cuda and threads:
        torch.set_num_threads(threads)
    vocab = 256  # byte-level ids below every preset's vocab (tiny: no EOS in prompts)
    wl = serve_workload(num_requests, prompt_len, output_len, rate, vocab, seed)
    serial_wl = first_requests(wl, serial_requests or num_requests)
    # Warm-up requests with prompt lengths drawn from the workload's range (not the short prompts of
    # before), so the prefill paths those lengths take compile before the timed runs; 8 draws need
    # not meet every Triton specialisation by token count.
    warm = serve_workload(min(8, num_requests), prompt_len, (2, 4), None, vocab, seed + 1)
    needed = max(len(p) + n for w in (wl, warm) for p, n in zip(w["prompts"], w["outputs"]))
    if max_seq_len is not None and max_seq_len < needed:
        raise ValueError(f"max_seq_len {max_seq_len} is below the workload's longest request ({needed} tokens)")
    max_seq_len = max_seq_len or needed
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    bandwidth = copy_bandwidth_gbs() if on_cuda else None
    experts_fn, experts_name = _experts_fn("auto", on_cuda)
    hf_systems = [s for s in systems if s.startswith("hf_")]
    moelab_systems = [s for s in systems if s.startswith("moelab_")]

    def runs_for(precision):  # (system, concurrency, experts_impl) in order, HF first
        hf_ok = not precision.startswith("nf4") or on_cuda
        out = []
        for s in hf_systems if hf_ok else []:
            if s == "hf_serial":
                out += [(s, 1, impl) for impl in serial_experts]
            else:
                out += [(s, c, "grouped_mm") for c in concurrency]
        out += [(s, c, f"moelab_{experts_name}") for s in moelab_systems for c in concurrency]
        return out

    plan = {p: runs_for(p) for p in precisions}
    bar = _ProgressBar(repeats * sum(len(v) for v in plan.values()), progress_bar)
    rows, checks, pad_id = {}, {}, 0
    every_run = {}  # key -> tokens/s of each repeat, in the order run (the row keeps the fastest)

    def build(precision, for_hf):
        dtype = _dtype_of(precision, on_cuda)
        if not precision.startswith("nf4"):
            return load(model_name, device=device, dtype=dtype, random_weights=random_weights)[0]
        if not for_hf:
            return load(model_name, device=device, dtype=dtype, random_weights=random_weights, quantize=precision)[0]
        model = load(model_name, device=device, dtype=dtype, random_weights=random_weights)[0]
        return transformers_bnb_4bit_(model, compute_dtype=dtype, quantize_head=precision == "nf4_head")

    for precision in precisions:
        tokens = {}
        groups = [(True, [r for r in plan[precision] if r[0].startswith("hf_")]),
                  (False, [r for r in plan[precision] if r[0].startswith("moelab_")])]
        # One model for all systems unless HF's NF4 is a different model (bitsandbytes).
        shared = build(precision, False) if not precision.startswith("nf4") else None
        for for_hf, group in groups:
            if not group:
                continue
            try:
                model = shared if shared is not None else build(precision, for_hf)
            except ImportError as err:  # HF's NF4 needs bitsandbytes: its rows say so, the rest still run
                for system, conc, experts_impl in group:
                    rows[(system, precision, experts_impl, conc)] = _error_row(
                        system, precision, experts_impl, conc, f"ImportError: {err}")
                    bar.advance(system)
                continue
            pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
            weights_gb = round(_tensor_bytes(model) / 1e9, 4)
            attention = model.config._attn_implementation  # HF's continuous batching may leave it "paged|..."
            capped = None  # why hf_compiled's remaining rows are skipped (a run went past compile_time_cap)
            compile_deadline = None
            if for_hf:
                schedule = [run_spec for run_spec in group for _ in range(repeats)]
            else:  # round by round in alternating order (A B, B A, ...): no Engine always runs first after the build
                schedule = [run_spec for r in range(repeats) for run_spec in (group if r % 2 == 0 else group[::-1])]
            for system, conc, experts_impl in schedule:
                label = f"{system} {precision} c{conc}" + (f" {experts_impl}" if system == "hf_serial" else "")
                key = (system, precision, experts_impl, conc)
                if system.startswith("hf_"):
                    model.set_experts_implementation(experts_impl)
                if system != "hf_compiled":
                    _drop_compiled(model)  # its CUDA graph pool would count in the next rows' peak memory
                if system == "hf_compiled" and capped:
                    if key not in rows:
                        rows[key] = _error_row(system, precision, experts_impl, conc, f"skipped: {capped}")
                        bar.note(f"{label:<40} SKIPPED: {capped}"[:200])
                    bar.advance(label)
                    continue
                work = serial_wl if system.startswith("hf_") and conc == 1 else wl
                if system in ("hf_serial", "hf_static"):
                    run = lambda w, c=conc: _run_hf_batches(model, w, c, pad_id)  # noqa: E731
                elif system == "hf_compiled":
                    run = lambda w, c=conc: _run_hf_batches(model, w, c, pad_id,  # noqa: E731
                                                            cache_implementation="static")
                elif system == "hf_continuous":
                    run = lambda w, c=conc: _run_hf_continuous(model, w, c)  # noqa: E731
                else:  # a fresh Engine each round, so the alternating order holds
                    engine = run = None  # the previous Engine's cache and graphs go before the next is built
                    _free_memory(on_cuda)
                    try:
                        engine = Engine(model, conc, max_seq_len,
                                        policy=system.removeprefix("moelab_").removesuffix("_sync"),
                                        experts_fn=experts_fn, overlap=False if system.endswith("_sync") else "auto")
                    except Exception as err:  # noqa: BLE001  (e.g. out of memory for the cache: an error row)
                        rows.setdefault(key, _error_row(system, precision, experts_impl, conc, f"{type(err).__name__}: {err}"))
                        bar.note(f"{label:<40} FAILED: {type(err).__name__}: {err}"[:200])
                        bar.advance(label)
                        continue
                    run = lambda w, e=engine: _run_moelab(e, w)  # noqa: E731
                try:
                    # Warm-up: HF's manager is sized, and hf_compiled compiled, by the real workload.
                    if system == "hf_compiled" and compile_time_cap:
                        if compile_deadline is None:  # one budget for all of this precision's hf_compiled runs
                            compile_deadline = time.perf_counter() + compile_time_cap
                        _time_cap_start(compile_deadline - time.perf_counter(), label)
                    run(work if system in ("hf_continuous", "hf_compiled") else warm)
                    if system.startswith("moelab_") and conc > warm["num_requests"]:
                        run(warm_workload(work, conc))  # the timed run's batch sizes, compiled first
                    sync()
                    if on_cuda:
                        torch.cuda.reset_peak_memory_stats()
                    cpu_start = time.process_time()
                    start, records = run(work)
                    sync()
                    cpu_seconds = time.process_time() - cpu_start
                    _time_cap_stop()
                    if _CAP["fired"]:  # went off, but something caught it and the run went on
                        raise CompileTimeCap(_CAP["fired"])
                except Exception as err:  # noqa: BLE001  (a system that does not run here is a row, not a crash)
                    _time_cap_stop()
                    if _CAP["fired"]:  # the next concurrencies would compile again: skip them
                        err = CompileTimeCap(_CAP["fired"])
                        capped = f"an earlier hf_compiled {precision} run went past the cap"
                        _CAP["fired"] = None
                        _drop_compiled(model)
                    rows.setdefault(key, _error_row(system, precision, experts_impl, conc, f"{type(err).__name__}: {err}"))
                    bar.note(f"{label:<40} FAILED: {type(err).__name__}: {err}"[:200])
                    bar.advance(label)
                    continue
                finally:
                    _time_cap_stop()
                    if system == "hf_continuous":
                        model.destroy_cached_continuous_batching_manager()
                        if model.config._attn_implementation != attention:
                            model.set_attn_implementation(attention)
                seconds = max(t[-1] for _, t, _ in records) - start
                row = {"system": system, "precision": precision, "experts_impl": experts_impl,
                       "concurrency": conc, "num_requests": work["num_requests"], **serve_metrics(records, seconds),
                       "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if on_cuda else None,
                       "weights_gb": weights_gb, "roofline_fraction": None,
                       "cpu_seconds": round(cpu_seconds, 3),
                       "tokens_per_cpu_s": round(sum(len(t) for _, t, _ in records) / cpu_seconds, 1)}
                if system == "hf_compiled":
                    # whether HF's generate did compile the model (on CUDA, with a static cache)
                    row["compiled"] = hasattr(model, "_compiled_call")
                if bandwidth is not None:
                    bound = conc * bandwidth * 1e9 / decode_weight_bytes(model, conc)["bytes"]
                    row["roofline_fraction"] = round(row["tokens_per_s"] / bound, 4)
                every_run.setdefault(key, []).append(row["tokens_per_s"])
                if key not in rows or row["tokens_per_s"] > rows[key].get("tokens_per_s", -1):
                    rows[key] = row
                tokens[label] = [t for _, _, t in records]
                bar.note(f"{label:<40} {row['tokens_per_s']:9.1f} tokens/s  TTFT p50 {row['ttft_p50_ms']} ms  "
                         f"ITL p50 {row['itl_p50_ms']} ms")
                bar.advance(label)
            if shared is not None or not for_hf:
                # moelab's forward vs transformers' forward of the very same model (at NF4:
                # moelab's NF4 model, whose experts are a drop-in transformers runs too): its
                # prefill, then the tokens a moelab system served (this precision's, once one ran).
                if f"logits_{precision}" not in checks:
                    checks[f"logits_{precision}"] = teacher_forced_check(model, wl["prompts"][:4], experts_fn)
                served = next((t for name, t in tokens.items() if name.startswith("moelab")), None)
                if f"decode_{precision}" not in checks and served is not None:
                    checks[f"decode_{precision}"] = served_tokens_check(model, wl["prompts"][:4], served[:4])
            _drop_compiled(model)
            engine = run = None
            if shared is None:
                del model
            _free_memory(on_cuda)
        token_check = tokens_check(tokens)
        token_check["required"] = precision == "fp32"  # bf16 near-ties may flip free-running tokens
        checks[f"tokens_{precision}"] = token_check
        del shared
        _free_memory(on_cuda)
    bar.close()
    for key, runs in every_run.items():  # every repeat's figure beside the fastest: medians, spread
        rows[key]["tokens_per_s_runs"] = runs
    required = [c for name, c in checks.items() if name.startswith("logits_") or c.get("required")]
    workload = {k: v for k, v in wl.items() if k not in ("prompts", "outputs", "arrivals")}
    workload.update(model=model_name, random_weights=random_weights or model_name != "tiny", device=device,
                    concurrency=list(concurrency), precisions=list(precisions), serial_requests=serial_wl["num_requests"],
                    max_seq_len=max_seq_len, compile_time_cap=compile_time_cap, eos="ignored", total_output_tokens=sum(wl["outputs"]), repeats=repeats,
                    note="same prompts for every system; tokens/s = output tokens / (last token - start); "
                         "HF at concurrency 1 (hf_serial and the others' c1 rows) on the first serial_requests requests "
                         "(num_requests per row); each run's fastest of `repeats`")
    result = {"benchmark": "serve", "card": card_name(), "date": _dt.date.today().isoformat(),
              "versions": versions(), "workload": {**workload, **_pdl_fields(on_cuda)},
              "results": list(rows.values()), "checks": checks,
              "checks_ok": all(c["ok"] for c in required)}
    if bandwidth is not None:
        result["copy_bandwidth_gbs"] = round(bandwidth, 1)
    return result


def _row_key(row: dict) -> tuple:
    return row["system"], row.get("precision"), row.get("experts_impl"), row["concurrency"]


def merge_serve(old: dict, new: dict) -> dict:
    """Fold the rows of `new` into `old` (same card only): a row of the same system, precision,
    experts path and concurrency is replaced, others are added; each run's workload and checks
    are kept under `runs` (so a serial run on fewer requests stays visible)."""
    if old.get("card") != new.get("card"):
        raise ValueError(f"cannot merge a run on {new.get('card')!r} into results from {old.get('card')!r}")
    rows = {_row_key(r): r for r in old["results"]}
    rows.update({_row_key(r): r for r in new["results"]})
    runs = old.get("runs") or [{"date": old.get("date"), "workload": old.get("workload"), "checks": old.get("checks")}]
    runs = runs + [{"date": new["date"], "workload": new["workload"], "checks": new.get("checks")}]
    merged = {**new, "results": list(rows.values()), "runs": runs,
              "checks_ok": bool(old.get("checks_ok", True) and new.get("checks_ok", True))}
    if "copy_bandwidth_gbs" in old and "copy_bandwidth_gbs" not in new:
        merged["copy_bandwidth_gbs"] = old["copy_bandwidth_gbs"]
    return merged


def _ratio_base(rows: list[dict], row: dict, system: str):
    """The HF row a moelab row is compared with: same precision and concurrency (serial: any
    concurrency, grouped_mm experts)."""
    for r in rows:
        if r["system"] != system or r.get("precision") != row.get("precision") or "error" in r:
            continue
        if system == "hf_serial":
            if r["experts_impl"] == "grouped_mm":
                return r
        elif r["concurrency"] == row["concurrency"]:
            return r
    return None


def serve_summary(result: dict) -> list[str]:
    """The table (one row per system, precision, experts path and concurrency), each moelab row's
    tokens/s as a ratio of HF's at the same precision and concurrency, and the checks."""
    rows = result["results"]
    lines = [f"{'system':<22} {'prec':<5} {'experts':<13} {'conc':>4} {'tokens/s':>9} {'TTFT p50':>9} "
             f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'mem GB':>7} {'bound':>6}  (ms)"]
    fmt = lambda x, f="{:.1f}": "-" if x is None else f.format(x)  # noqa: E731
    for r in rows:
        head = f"{r['system']:<22} {r.get('precision', '-'):<5} {r.get('experts_impl', '-'):<13} {r['concurrency']:>4}"
        if "error" in r:
            lines.append(f"{head} FAILED: {r['error']}")
            continue
        mem = r.get("peak_mem_gb") if r.get("peak_mem_gb") is not None else r.get("weights_gb")
        lines.append(f"{head} {r['tokens_per_s']:>9.1f} {fmt(r['ttft_p50_ms']):>9} {fmt(r['ttft_p99_ms']):>9} "
                     f"{fmt(r['itl_p50_ms']):>8} {fmt(r['itl_p99_ms']):>8} {fmt(mem, '{:.3f}'):>7} "
                     f"{fmt(r.get('roofline_fraction'), '{:.0%}'):>6}")
    lines.append("mem GB: peak on CUDA, the weights on the CPU; bound: fraction of the decode bandwidth bound")
    for r in rows:
        if r["system"].startswith("moelab_") and "error" not in r:
            parts = []
            for hf in ("hf_serial", "hf_static", "hf_compiled", "hf_continuous"):
                base = _ratio_base(rows, r, hf)
                if base:
                    parts.append(f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x {hf}")
            if parts:
                lines.append(f"{r['system']} {r['precision']} c{r['concurrency']}: {', '.join(parts)}")
    for name, check in (result.get("checks") or {}).items():
        if name.startswith("decode_"):
            lines.append(f"check {name}: served tokens = transformers' teacher-forced argmax at "
                         f"{check['top1_agreement']:.1%} of {check['positions']} positions "
                         f"(>= {check['threshold']:.0%}: {'ok' if check['ok'] else 'FAILED'})")
        elif name.startswith("tokens_"):
            state = "identical" if check["ok"] else "DIFFER: " + "; ".join(check["mismatches"][:3])
            lines.append(f"check {name}: {len(check['systems'])} runs' tokens {state}"
                         + ("" if check.get("required") else " (informational: bf16/NF4 near-ties may flip)"))
        else:
            lines.append(f"check {name}: |moelab - transformers| / |transformers| = {check['rel_l2_error']} "
                         f"(< {check['tolerance']}: {'ok' if check['ok'] else 'FAILED'}), "
                         f"top-1 agreement {check['top1_agreement']:.1%}")
    return lines


def plot_serve(result: dict, path) -> None:
    """Throughput per run (bars), latency percentiles (log scale) and, on CUDA, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if "error" not in r]
    most = max((r.get("num_requests") or 0 for r in rows), default=0)
    names = [f"{r['system']} {r.get('precision', '')} c{r['concurrency']}"
             + (f" {r['experts_impl']}" if r["system"] == "hf_serial" else "")
             + (f" ({r['num_requests']} req)" if r.get("num_requests", most) != most else "") for r in rows]
    colors = ["#1f77b4" if r["system"].startswith("moelab") else "#999999" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.9 + 0.3 * max(len(rows), 4)), sharey=True)
    y = list(range(len(rows)))
    axes[0].barh(y, [r["tokens_per_s"] for r in rows], color=colors)
    axes[0].set(xlabel="output tokens / s", title="throughput", yticks=y, yticklabels=names)
    axes[0].invert_yaxis()
    for key, marker in (("ttft_p50_ms", "o"), ("ttft_p99_ms", "s"), ("itl_p50_ms", "^"), ("itl_p99_ms", "v")):
        axes[1].scatter([r[key] for r in rows], y, marker=marker, label=key.replace("_ms", ""))
    axes[1].set(xscale="log", xlabel="ms", title="latency")
    axes[1].legend(fontsize=8)
    mem_key = "peak_mem_gb" if any(r.get("peak_mem_gb") for r in rows) else "weights_gb"
    axes[2].barh(y, [r.get(mem_key) or 0 for r in rows], color=colors)
    axes[2].set(xlabel="GB", title="peak memory" if mem_key == "peak_mem_gb" else "weights")
    w = result["workload"]
    concurrency = sorted({r["concurrency"] for r in rows})  # a merged file: every run's, not the last one's
    fig.suptitle(f"Serving up to {most} requests (rows marked otherwise: fewer), {w['model']}, "
                 f"concurrency {concurrency}, {result['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- routed experts

EXPERTS_SYSTEMS = ("eager", "batched_mm", "grouped_mm", "moelab_bf16", "moelab_nf4")
BATCHED_MM_LIMIT_GB = 40.0  # batched_mm gathers one expert's weights per (token, k) pair
EXPERTS_SWEEP = {  # tuning candidates for `--sweep` (kernel_config's choice is always timed too)
    "decode": [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
               for bn, bk, w, st in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 3),
                                     (32, 256, 4, 3), (32, 64, 4, 6), (64, 64, 4, 5), (32, 128, 8, 4),
                                     (16, 128, 4, 6), (32, 128, 4, 6)]],
    "prefill": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=w, num_stages=st)
                for bm, bn, w, st in [(64, 64, 4, 4), (64, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 4),
                                      (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)]],
}


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16, repeats: int = 10) -> float:
    """The card's measured dense matmul rate (torch.mm, n x n x n) in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), repeats) / 1e12


def _timed(fn, n_inputs: int, capturable: bool = True) -> tuple[float, str]:
    """Microseconds per call inside a CUDA graph, or launched eagerly where it cannot be
    captured (transformers' eager loop reads the touched experts on the host: `nonzero`)."""
    if not capturable:
        return _time_eager(fn, n_inputs), "eager"
    try:
        return _time_graph(fn, n_inputs), "graph"
    except Exception as err:  # noqa: BLE001  (capture errors come from many layers)
        print(f"    (not capturable: {type(err).__name__}: {str(err).splitlines()[0][:100]}; timed eagerly)", flush=True)
        torch.cuda.synchronize()
        return _time_eager(fn, n_inputs), "eager"


def bench_experts(tokens=(1, 8, 64, 512, 4096), systems=EXPERTS_SYSTEMS, n_routings: int = 8,
                  sweep: bool = False, seed: int = 0, paths: bool = False) -> dict:
    """One routed-experts layer of Qwen1.5-MoE-A2.7B (random bf16 weights) on CUDA, T tokens:
    transformers' experts implementations side by side with moelab's fused kernel (bf16, NF4).

    Each T rotates through `n_routings` random routings so consecutive calls touch different
    experts (the touched weights, up to 69 MB at T=1, do not stay in L2). Reports time per call,
    the bytes of the distinct experts touched over the time as a fraction of the copy bandwidth
    measured in the same run, and the routed FLOPs over the time as a fraction of the measured
    bf16 matmul rate. Random weights: speed only. `paths`: also time each moelab system with
    its decode path forced (rows `<system>_gemv` and `<system>_grouped`), which is how the
    GEMV_MAX_PAIRS thresholds of `moelab.kernels.experts` are chosen.
    """
    if not torch.cuda.is_available():
        raise SystemExit("the experts benchmark needs a CUDA device")
    from .kernels import experts as experts_kernels
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    from .kernels.experts import DECODE_MAX_PAIRS, fused_experts_forward
    from .models import preset_config
    from .quant import NF4Experts
    from .routing import route

    torch.manual_seed(seed)
    config = preset_config("qwen1.5-moe-a2.7b")
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    experts = Qwen2MoeExperts(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    nf4 = NF4Experts.from_experts(experts, backend="torch").to("cuda")
    expert_bytes = {"bf16": _tensor_bytes(experts) / num_experts, "nf4": _tensor_bytes(nf4) / num_experts}
    flops_per_pair = 2 * (2 * inter * hidden + hidden * inter)
    bandwidth = copy_bandwidth_gbs()
    tflops = matmul_tflops()
    print(f"copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s; bytes per expert "
          f"bf16 {expert_bytes['bf16'] / 1e6:.1f} MB, nf4 {expert_bytes['nf4'] / 1e6:.1f} MB", flush=True)

    def hf(impl):
        def run(x, w, ids):
            config._experts_implementation = impl
            return experts(x, ids, w)
        return run

    runners = {"eager": hf("eager"), "batched_mm": hf("batched_mm"), "grouped_mm": hf("grouped_mm"),
               "moelab_bf16": lambda x, w, ids, **kw: fused_experts_forward(x, w, ids, experts, **kw),
               "moelab_nf4": lambda x, w, ids, **kw: fused_experts_forward(x, w, ids, nf4, **kw)}
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
        routings = [route(torch.randn(t, num_experts, device="cuda"), top_k) for _ in range(n_routings)]
        inputs = [(w.to(torch.bfloat16), ids.to(torch.int64)) for w, ids in routings]
        touched = statistics.mean(len(torch.unique(ids)) for _, ids in inputs)
        pairs = t * top_k
        for system in systems:
            if system == "batched_mm" and pairs * expert_bytes["bf16"] / 1e9 > BATCHED_MM_LIMIT_GB:
                print(f"T={t:>5} {system:<12} skipped: it would gather {pairs * expert_bytes['bf16'] / 1e9:.0f} GB "
                      "of expert weights", flush=True)
                rows.append({"tokens": t, "system": system, "us": None, "skipped": "gathers too many weights"})
                continue
            configs = [None]
            if sweep and system.startswith("moelab"):
                configs += EXPERTS_SWEEP["decode" if pairs <= DECODE_MAX_PAIRS else "prefill"]
            if paths and system.startswith("moelab"):
                configs += ["gemv", "grouped"]
            for cfg in configs:
                fn = runners[system]
                kw = {} if cfg is None or isinstance(cfg, str) else {"config": cfg}
                name = system if cfg is None else f"{system}_{cfg}" if isinstance(cfg, str) else f"{system}_sweep"
                limits = experts_kernels.GEMV_MAX_PAIRS, experts_kernels.GEMV_MAX_PAIRS_NF4
                if isinstance(cfg, str):  # force one decode path: both thresholds to 0 (grouped) or unlimited
                    limit = 1 << 30 if cfg == "gemv" else 0
                    experts_kernels.GEMV_MAX_PAIRS = experts_kernels.GEMV_MAX_PAIRS_NF4 = limit
                try:
                    with torch.no_grad():
                        us, timing = _timed(lambda i, fn=fn, kw=kw: fn(x, *inputs[i], **kw), n_routings,
                                            capturable=system != "eager")
                except Exception as err:  # noqa: BLE001  (out of memory, or a tile the card cannot hold)
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    why = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    print(f"T={t:>5} {system:<18} failed: {why}" + (f"  {cfg}" if cfg else ""), flush=True)
                    rows.append({"tokens": t, "system": name, "config": cfg, "us": None, "skipped": why})
                    continue
                finally:
                    experts_kernels.GEMV_MAX_PAIRS, experts_kernels.GEMV_MAX_PAIRS_NF4 = limits
                precision = "nf4" if system == "moelab_nf4" else "bf16"
                nbytes = touched * expert_bytes[precision]
                row = {"tokens": t, "system": name, "config": cfg, "timing": timing, "us": round(us, 2),
                       "touched_experts": touched, "bytes": round(nbytes), "gb_per_s": round(nbytes / us / 1e3, 1),
                       "bandwidth_fraction": round(nbytes / us / 1e3 / bandwidth, 4),
                       "tflops": round(pairs * flops_per_pair / us / 1e6, 2),
                       "matmul_fraction": round(pairs * flops_per_pair / us / 1e6 / tflops, 4)}
                rows.append(row)
                print(f"T={t:>5} {row['system']:<18} {us:10.1f} us ({timing})  {row['gb_per_s']:7.0f} GB/s "
                      f"= {row['bandwidth_fraction']:.2f} of copy  {row['tflops']:6.1f} TFLOP/s = "
                      f"{row['matmul_fraction']:.2f} of matmul" + (f"  {cfg}" if isinstance(cfg, dict) else ""),
                      flush=True)
        del x, routings, inputs
    return {
        "benchmark": "experts",
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "versions": versions(),
        "workload": {"model": "qwen1.5-moe-a2.7b", "layer": "routed experts of one MoE layer",
                     "experts": num_experts, "top_k": top_k, "hidden": hidden, "intermediate": inter,
                     "dtype": "bfloat16", "tokens": list(tokens), "routings": n_routings, **_pdl_fields(True),
                     "bytes_per_expert": {k: round(v) for k, v in expert_bytes.items()},
                     "note": "random weights (speed only); each call's routing is one of `routings` random "
                             "ones; 'graph' rows are per call inside one captured CUDA graph, 'eager' rows "
                             "launched from Python; bytes = distinct experts touched x bytes per expert"},
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "matmul_tflops": round(tflops, 1),
        "results": rows,
    }


def experts_summary(result: dict) -> list[str]:
    """The issue's targets, checked against one result: bandwidth at T <= 64, matmul rate at
    T=4096 (when timed), NF4 vs bf16 at T=1; and the kernel against each transformers implementation."""
    by = {(r["tokens"], r["system"]): r for r in result["results"] if r.get("us") is not None}
    lines = []
    for t in result["workload"]["tokens"]:
        ml = by.get((t, "moelab_bf16"))
        if ml is None:
            continue
        peers = ", ".join(f"{s} {by[(t, s)]['us'] / ml['us']:.1f}x" for s in ("eager", "batched_mm", "grouped_mm")
                          if (t, s) in by)
        nf = by.get((t, "moelab_nf4"))
        nf_text = f"; nf4 {nf['us']:.1f} us ({ml['us'] / nf['us']:.2f}x bf16)" if nf else ""
        lines.append(f"T={t:>5}: moelab bf16 {ml['us']:8.1f} us = {ml['bandwidth_fraction']:.2f} of copy bandwidth, "
                     f"{ml['matmul_fraction']:.2f} of matmul{nf_text}; faster than {peers}")
    small = [by[(t, "moelab_bf16")] for t in result["workload"]["tokens"] if t <= 64 and (t, "moelab_bf16") in by]
    if small:
        worst = min(r["bandwidth_fraction"] for r in small)
        lines.append(f"target T<=64 bf16 >= 0.60 of copy bandwidth: worst {worst:.2f} "
                     f"({'met' if worst >= 0.6 else 'MISSED'})")
    if (4096, "moelab_bf16") in by:  # the target is set at T=4096 only (a file of T <= 64 has no verdict)
        frac = by[(4096, "moelab_bf16")]["matmul_fraction"]
        lines.append(f"target T=4096 bf16 >= 0.50 of matmul rate: {frac:.2f} ({'met' if frac >= 0.5 else 'MISSED'})")
    if (1, "moelab_bf16") in by and (1, "moelab_nf4") in by:
        ratio = by[(1, "moelab_bf16")]["us"] / by[(1, "moelab_nf4")]["us"]
        lines.append(f"target T=1 nf4 >= 2x faster than bf16: {ratio:.2f}x ({'met' if ratio >= 2 else 'MISSED'})")
    sweeps = [r for r in result["results"] if r["system"].endswith("_sweep") and r.get("us")]
    for t in result["workload"]["tokens"]:
        for system in ("moelab_bf16", "moelab_nf4"):
            cands = [r for r in sweeps if r["tokens"] == t and r["system"] == f"{system}_sweep"]
            if cands and (t, system) in by:
                best = min(cands, key=lambda r: r["us"])
                lines.append(f"sweep T={t:>5} {system}: best {best['us']:.1f} us vs default {by[(t, system)]['us']:.1f} "
                             f"with {best['config']}")
    return lines


def plot_experts(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = result["workload"]["tokens"]
    rows = {(r["tokens"], r["system"]): r for r in result["results"] if r.get("us") is not None}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system in EXPERTS_SYSTEMS:
        pts = [(t, rows[(t, system)]["us"]) for t in tokens if (t, system) in rows]
        if pts:
            timing = {rows[(t, system)]["timing"] for t, _ in pts}
            left.plot(*zip(*pts), marker="o", label=f"{system} ({'/'.join(sorted(timing))})")
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="microseconds per call",
             title="one routed-experts layer, Qwen1.5-MoE shape")
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)
    for system in ("moelab_bf16", "moelab_nf4", "grouped_mm"):
        bw = [(t, rows[(t, system)]["bandwidth_fraction"]) for t in tokens if (t, system) in rows and t <= 64]
        mm = [(t, rows[(t, system)]["matmul_fraction"]) for t in tokens if (t, system) in rows and t > 64]
        if bw:
            right.plot(*zip(*bw), marker="o", label=f"{system}: bytes / copy bandwidth")
        if mm:
            right.plot(*zip(*mm), marker="s", linestyle="--", label=f"{system}: FLOPs / matmul rate")
    right.axhline(0.6, color="grey", linewidth=0.8)
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    right.set(xscale="log", xlabel="tokens", ylabel="fraction of the card's measured rate",
              title=f"{result['card']}: copy {result['copy_bandwidth_gbs']:.0f} GB/s, "
                    f"matmul {result['matmul_tflops']:.0f} TFLOP/s")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- NF4 loading

def transformers_bnb_4bit_(model, compute_dtype=torch.bfloat16, double_quant: bool = True,
                           quantize_head: bool = False):
    """transformers' own 4-bit path, applied to a model already built: its module replacement
    (`replace_with_bnb_linear`, which swaps `nn.Linear` only) and, for each new `Linear4bit`, the
    old weight through bitsandbytes' `Params4bit` as transformers' `Bnb4bitQuantize` does.
    `from_pretrained(quantization_config=BitsAndBytesConfig(...))` does the same while reading a
    checkpoint (and needs accelerate); the fused routed experts are untouched either way.
    Router (not a Linear in v5), `shared_expert_gate` and `lm_head` are skipped (lm_head converted
    too with `quantize_head`, as moelab's "nf4_head"). In place."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_use_double_quant=double_quant,
                                llm_int8_skip_modules=["shared_expert_gate"] + ([] if quantize_head else ["lm_head"]))
    linears = {name: m for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    replace_with_bnb_linear(model, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    for name, old in linears.items():
        new = model.get_submodule(name)
        if new is old:  # skipped: stays full precision
            continue
        kwargs = dict(new.weight.__dict__)
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, **kwargs).to(old.weight.device)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
    return model


def serial_decode(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Batch-1 greedy decode with HF `generate`, one prompt at a time, EOS ignored
    (min_new_tokens = max_new_tokens). TTFT is a 1-token generate; ITL = (T(N) - T(1)) / (N - 1)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0

    def run(prompt, n):
        ids = torch.tensor([prompt], device=device)
        sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad)
        sync()
        return time.perf_counter() - start

    run(prompts[0], 4)  # warm-up
    firsts, fulls = [], []
    for prompt in prompts:
        firsts.append(run(prompt, 1))
        fulls.append(run(prompt, new_tokens))
    itl = [(full - first) / (new_tokens - 1) for first, full in zip(firsts, fulls)]
    return {"tokens_per_s": round(len(prompts) * new_tokens / sum(fulls), 2),
            "ttft_p50_ms": round(statistics.median(firsts) * 1e3, 2),
            "itl_p50_ms": round(statistics.median(itl) * 1e3, 2)}


def _loaded(build) -> tuple:
    """Run build() on a clean CUDA allocator: (result, GB allocated after, GB peak during, s)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = build()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return (out, (torch.cuda.memory_allocated() - base) / 1e9, (torch.cuda.max_memory_allocated() - base) / 1e9,
            seconds)


def bench_nf4(model_name: str = "qwen1.5-moe-a2.7b", num_prompts: int = 3, prompt_len=(16, 64),
              new_tokens: int = 48, seed: int = 0) -> dict:
    """NF4 on CUDA, side by side in one run (notebook 04): moelab's layer-by-layer NF4 load
    (memory after and peak during the load, `memory_report`, serial decode) against transformers
    + bitsandbytes 4-bit on the same random model (its experts stay bf16), and that model in bf16
    before conversion. Random weights: speed and memory, never quality."""
    if not torch.cuda.is_available():
        raise SystemExit("the NF4 benchmark needs a CUDA device")
    import bitsandbytes

    from .models import load, preset_config, random_model
    from .quant import memory_report

    gen = torch.Generator().manual_seed(seed)
    vocab = preset_config(model_name).vocab_size
    prompts = [torch.randint(0, vocab, (int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(num_prompts)]
    rows, memory = [], {}

    def row(system, precision, experts_impl, decode, peak):
        rows.append({"system": system, "precision": precision, "experts_impl": experts_impl, "concurrency": 1,
                     **decode, "ttft_p99_ms": None, "itl_p99_ms": None, "peak_mem_gb": round(peak, 3)})
        print(f"{system:<26} {experts_impl:<12} {decode['tokens_per_s']:7.2f} tokens/s  "
              f"itl p50 {decode['itl_p50_ms']:.1f} ms  peak {peak:.2f} GB", flush=True)

    # 1. moelab: quantized layer by layer as it is built.
    model, after, peak, seconds = _loaded(
        lambda: load(model_name, random_weights=True, device="cuda", quantize="nf4", seed=seed)[0])
    report = memory_report(model)
    memory["moelab_nf4"] = {"allocated_after_load_gb": round(after, 3), "peak_during_load_gb": round(peak, 3),
                            "load_s": round(seconds, 1), "report": report.as_dict()}
    print(f"moelab NF4 load: {after:.2f} GB allocated after, {peak:.2f} GB peak during, {seconds:.0f} s\n{report}")
    torch.cuda.reset_peak_memory_stats()
    decode = serial_decode(model, prompts, new_tokens)
    row("moelab_nf4_hf_generate", "nf4 (experts: moelab, linears: bnb)", "moelab_nf4", decode,
        torch.cuda.max_memory_allocated() / 1e9)
    del model

    # 2. The same architecture in bf16, built on the GPU, then transformers' own 4-bit conversion.
    model, after, peak, seconds = _loaded(lambda: random_model(preset_config(model_name), "cuda", torch.bfloat16, seed))
    memory["bf16"] = {"allocated_after_load_gb": round(after, 3), "peak_during_load_gb": round(peak, 3),
                      "load_s": round(seconds, 1), "report": memory_report(model).as_dict()}
    model.set_experts_implementation("grouped_mm")
    torch.cuda.reset_peak_memory_stats()
    row("hf_bf16", "bf16", "grouped_mm", serial_decode(model, prompts, new_tokens), torch.cuda.max_memory_allocated() / 1e9)
    _, after, peak, seconds = _loaded(lambda: transformers_bnb_4bit_(model, torch.bfloat16))
    report = memory_report(model)
    memory["transformers_bnb_4bit"] = {
        "allocated_after_load_gb": round(torch.cuda.memory_allocated() / 1e9, 3), "conversion_s": round(seconds, 1),
        "note": "built in bf16 on the GPU, then converted in place (transformers' replace_with_bnb_linear + "
                "Params4bit): allocated after = what stays on the GPU", "report": report.as_dict()}
    print(f"transformers + bitsandbytes 4-bit: {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated\n{report}")
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        torch.cuda.reset_peak_memory_stats()
        row("hf_bnb_4bit", "nf4 linears, bf16 experts", impl, serial_decode(model, prompts, new_tokens),
            torch.cuda.max_memory_allocated() / 1e9)
    del model
    torch.cuda.empty_cache()
    out_versions = versions()
    out_versions["bitsandbytes"] = bitsandbytes.__version__
    return {
        "benchmark": "nf4",
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "versions": out_versions,
        "workload": {"model": model_name, "weights": "random (seeded): speed and memory, never quality",
                     "prompts": num_prompts, "prompt_lens": [len(p) for p in prompts], "new_tokens": new_tokens,
                     "decoding": "greedy, batch 1, one prompt at a time, EOS ignored (min_new_tokens)",
                     "quantization": "NF4, block 64, double quantisation, bf16 compute; router, "
                                     "shared_expert_gate and lm_head full precision"},
        "targets": {"allocated_after_load_gb_max": 9.0, "peak_during_load_gb_max": 11.0},
        "memory": memory,
        "results": rows,
    }


def nf4_summary(result: dict) -> list[str]:
    """The bounds checked, and the memory and speed ratios of one nf4 result."""
    mem = result["memory"]
    ours, theirs, bf16 = mem["moelab_nf4"], mem["transformers_bnb_4bit"], mem["bf16"]
    experts = {k: next(p for p in v["report"]["parts"] if p["part"] == "routed experts")["bytes"] / 1e9
               for k, v in mem.items()}
    by = {(r["system"], r["experts_impl"]): r["tokens_per_s"] for r in result["results"]}
    ok = lambda value, bound: "ok" if value <= bound else "OVER"  # noqa: E731
    return [
        f"moelab NF4: {ours['allocated_after_load_gb']:.2f} GB after load ({ok(ours['allocated_after_load_gb'], 9)}, "
        f"<= 9), peak {ours['peak_during_load_gb']:.2f} GB during load ({ok(ours['peak_during_load_gb'], 11)}, <= 11)",
        f"transformers + bnb 4-bit: {theirs['allocated_after_load_gb']:.2f} GB, routed experts "
        f"{experts['transformers_bnb_4bit']:.2f} GB (bf16: {experts['bf16']:.2f} GB; moelab NF4: "
        f"{experts['moelab_nf4']:.2f} GB): {theirs['allocated_after_load_gb'] / ours['allocated_after_load_gb']:.1f}x "
        f"moelab's footprint",
        f"serial decode tokens/s: moelab NF4 {by[('moelab_nf4_hf_generate', 'moelab_nf4')]:.1f}, transformers + bnb "
        f"{by[('hf_bnb_4bit', 'eager')]:.1f} (eager) / {by[('hf_bnb_4bit', 'grouped_mm')]:.1f} (grouped_mm), "
        f"bf16 {by[('hf_bf16', 'grouped_mm')]:.1f} (grouped_mm)",
    ]


def plot_nf4(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .quant import MemoryReport, plot_memory

    labels = {"bf16": "bf16", "transformers_bnb_4bit": "transformers + bnb 4-bit", "moelab_nf4": "moelab NF4"}
    reports = {label: MemoryReport(result["memory"][key]["report"]["parts"]) for key, label in labels.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.5, 1]},
                                      layout="constrained")
    plot_memory(reports, ax=left)
    if left.get_xlim()[1] > 12:
        left.axvline(12, color="k", ls="--", lw=1)
        left.text(12, 2.45, " a 12 GB card", fontsize=8)
    left.set_title(f"{result['workload']['model']} (random weights) on {result['card']}", fontsize=10)
    names = [f"{r['system']}\n{r['experts_impl']}" for r in result["results"]]
    right.barh(names, [r["tokens_per_s"] for r in result["results"]], color="tab:gray")
    right.invert_yaxis()
    right.set_xlabel("serial decode tokens/s (batch 1, greedy)")
    right.tick_params(axis="y", labelsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI

def default_path(kind: str, card: str, suffix: str) -> Path:
    return RESULTS_DIR / f"{kind}_{_dt.date.today().isoformat()}_{card_tag(card)}.{suffix}"


def _serve_problem(args, device: str) -> str | None:
    """What is wrong with the full benchmark's arguments, in words (None: nothing)."""
    preset = args.model in SERVE_PRESETS
    if not preset and "/" not in args.model and not Path(args.model).is_dir():
        return (f"unknown preset {args.model!r}; serve presets are {sorted(SERVE_PRESETS)} "
                f"(or give a hub id org/name or a local checkpoint directory)")
    if [s for s in args.systems if s not in SERVE_SYSTEMS]:
        return f"unknown system(s) {[s for s in args.systems if s not in SERVE_SYSTEMS]}; systems are {list(SERVE_SYSTEMS)}"
    if args.precisions and [p for p in args.precisions if p not in SERVE_PRECISIONS]:
        return (f"unknown precision(s) {[p for p in args.precisions if p not in SERVE_PRECISIONS]}; "
                f"precisions are {list(SERVE_PRECISIONS)}")
    if device not in ("cpu", "cuda"):
        return f"--device must be cpu or cuda, got {device!r}"
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda was asked for, but this machine has no CUDA device"
    if device == "cpu" and args.model not in ("tiny",):
        return f"{args.model!r} is too large for the CPU: use --device cuda"
    if args.model == "qwen1.5-moe-a2.7b" and not args.random_weights:
        return "the qwen1.5-moe-a2.7b preset has no checkpoint here: pass --random-weights (or a hub id / directory)"
    if args.random_weights and not preset:
        return f"--random-weights needs a preset ({sorted(SERVE_PRESETS)}), got {args.model!r}"
    if min(args.concurrency) < 1 or (args.serial_requests is not None and args.serial_requests < 1):
        return "--concurrency and --serial-requests must be >= 1"
    if args.merge is not None and not args.merge.is_file():
        return f"--merge {args.merge}: no such file (run once with --json first)"
    return None


def _serve_main(args) -> int:
    """`python -m moelab.bench [serve]`: run, print the table, write JSON (+ merge) and PNG.
    Exit 2 on bad arguments, 1 when a correctness check failed (the JSON is written anyway)."""
    device = args.device or SERVE_PRESETS.get(args.model, "cuda")
    problem = _serve_problem(args, device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = bench_serve(args.model, device, tuple(args.systems), args.requests, tuple(args.prompt_len),
                             tuple(args.output_len), args.rate, tuple(args.concurrency), args.seed,
                             args.precisions, args.serial_requests, args.random_weights, tuple(args.serial_experts),
                             args.threads, args.repeats, progress_bar=not args.no_progress,
                             max_seq_len=args.max_seq_len, compile_time_cap=args.compile_time_cap)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    json_path = args.merge or args.json or default_path("serve", result["card"], "json")
    if args.merge is not None:
        try:
            result = merge_serve(json.loads(args.merge.read_text()), result)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    plot_path = args.plot or json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot_serve(result, plot_path)
    print("\n".join(serve_summary(result)))
    print(f"wrote {json_path} and {plot_path}")
    if not result["checks_ok"]:
        print("error: CORRECTNESS CHECK FAILED (see the check lines above and `checks` in the JSON)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    router = sub.add_parser("router", help="the router: torch eager / graph / compile vs the Triton kernel")
    router.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 65536])
    router.add_argument("--experts", type=int, default=60)
    router.add_argument("--top-k", type=int, default=4)
    router.add_argument("--sweep", action="store_true", help="also time block sizes / warps of the kernel")
    router.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    router.add_argument("--plot", type=Path, default=None, help="where to write the PNG")
    attention = sub.add_parser("attention", help="decode attention alone: SDPA vs the kernel and its split-K (CUDA)")
    attention.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    attention.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    attention.add_argument("--sweep", action="store_true", help="also time keys-per-block x warps of the kernel")
    attention.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    experts = sub.add_parser("experts", help="one routed-experts layer: transformers' eager / batched_mm / "
                                             "grouped_mm vs moelab's fused kernel, bf16 and NF4 (CUDA)")
    experts.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    experts.add_argument("--systems", nargs="+", choices=EXPERTS_SYSTEMS, default=list(EXPERTS_SYSTEMS))
    experts.add_argument("--sweep", action="store_true", help="also time a few kernel configurations per T")
    experts.add_argument("--paths", action="store_true", help="also time moelab's GEMV and grouped decode paths, "
                         "each forced (how GEMV_MAX_PAIRS* are chosen)")
    experts.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    experts.add_argument("--plot", type=Path, default=None, help="where to write the PNG")
    launch = sub.add_parser("launch", help="where the host time of one router call goes (CUDA)")
    launch.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    decode = sub.add_parser("decode", help="moelab's decode step for B sequences at once, eager / kernel / graphs "
                                           "(CPU or CUDA)")
    decode.add_argument("--model", default="tiny", help="tiny, or qwen1.5-moe-a2.7b (random weights, bf16)")
    decode.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    decode.add_argument("--prompt-len", type=int, nargs="+", default=[64],
                        help="one prompt length, or LOW HIGH: lengths drawn per sequence")
    decode.add_argument("--steps", type=int, default=32)
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--max-seq-len", type=int, default=None, help="cache row length (default: just enough)")
    decode.add_argument("--modes", nargs="+", choices=list(DECODE_MODES), default=None,
                        help="default: all on CUDA, eager_sdpa on the CPU")
    decode.add_argument("--experts", choices=["auto", "torch", "fused"], default="auto",
                        help="routed experts: moelab's PyTorch path or the fused kernel (auto: fused when present)")
    decode.add_argument("--profile", action="store_true", help="CUDA: add a torch.profiler kernel table per mode")
    decode.add_argument("--quantize", choices=["nf4", "nf4_head"], default=None,
                        help="load with moelab's NF4 experts (nf4_head: lm_head in NF4 too)")
    decode.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    decode.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: beside the JSON)")
    prefill = sub.add_parser("prefill", help="CUDA: prefill throughput against the measured matmul rate")
    prefill.add_argument("--model", default="qwen1.5-moe-a2.7b")
    prefill.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048, 4096])
    prefill.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    serve = sub.add_parser("serve", help="the full benchmark (the default): a seeded workload through HF generate "
                                         "(serial, static, compiled, continuous) and moelab's Engine (static, "
                                         "continuous), per precision and concurrency")
    serve.add_argument("--model", default="tiny", help=f"a preset ({', '.join(SERVE_PRESETS)}), a hub id or a local "
                                                       "checkpoint directory")
    serve.add_argument("--random-weights", action="store_true", help="seeded random weights (needed for "
                                                                      "qwen1.5-moe-a2.7b: no checkpoint is shipped)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cpu for tiny, cuda otherwise)")
    serve.add_argument("--systems", nargs="+", default=list(DEFAULT_SERVE_SYSTEMS),
                       help=f"any of {', '.join(SERVE_SYSTEMS)} (default: all but moelab_continuous_sync)")
    serve.add_argument("--precisions", nargs="+", default=None,
                       help="any of fp32, bf16, nf4, nf4_head (lm_head in NF4 too) (default: fp32 nf4 on the "
                            "CPU, bf16 nf4 on CUDA)")
    serve.add_argument("--requests", type=int, default=32)
    serve.add_argument("--serial-requests", type=int, default=None,
                       help="hf_serial, and every HF system at concurrency 1, serves only the first N requests "
                            "(default: all)")
    serve.add_argument("--serial-experts", nargs="+", choices=list(SERIAL_EXPERTS), default=list(SERIAL_EXPERTS),
                       help="transformers' experts paths hf_serial runs with")
    serve.add_argument("--prompt-len", type=int, nargs=2, default=[16, 64], metavar=("LOW", "HIGH"))
    serve.add_argument("--output-len", type=int, nargs=2, default=[8, 128], metavar=("LOW", "HIGH"))
    serve.add_argument("--rate", type=float, default=None, help="Poisson arrivals, requests/s (default: all at once)")
    serve.add_argument("--concurrency", type=int, nargs="+", default=[8],
                       help="slots / batch sizes of the batched systems, one run each")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-seq-len", type=int, default=None,
                       help="moelab's KV-cache row length (default: just enough for the workload)")
    serve.add_argument("--compile-time-cap", type=float, default=None, metavar="SECONDS",
                       help="time for all hf_compiled runs of one precision (compilation included); the run "
                            "past it is stopped (an error row), later ones skipped (default: no cap)")
    serve.add_argument("--threads", type=int, default=1, help="CPU threads for every system (default 1)")
    serve.add_argument("--repeats", type=int, default=1,
                       help="run each N times, keep the fastest (moelab systems: round by round, order alternating)")
    serve.add_argument("--no-progress", action="store_true", help="no progress bar (one line per run instead)")
    serve.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    serve.add_argument("--merge", type=Path, default=None,
                       help="fold this run's rows into an existing JSON of the same card, and write it there")
    serve.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: beside the JSON)")
    nf4 = sub.add_parser("nf4", help="NF4 loading on CUDA: moelab's memory and decode vs transformers + bitsandbytes")
    nf4.add_argument("--model", default="qwen1.5-moe-a2.7b")
    nf4.add_argument("--prompts", type=int, default=3)
    nf4.add_argument("--new-tokens", type=int, default=48)
    nf4.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    nf4.add_argument("--plot", type=Path, default=None, help="where to write the PNG")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in sub.choices and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")  # the full benchmark is the default
    args = parser.parse_args(argv)

    if args.what == "nf4":
        if not torch.cuda.is_available():
            print("error: the NF4 benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_nf4(args.model, num_prompts=args.prompts, new_tokens=args.new_tokens)
        json_path = args.json or default_path("nf4", result["card"], "json")
        plot_path = args.plot or json_path.with_suffix(".png")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        plot_nf4(result, plot_path)
        print("\n".join(nf4_summary(result)))
        print(f"wrote {json_path} and {plot_path}")

    if args.what == "serve":
        return _serve_main(args)

    if args.what == "experts":
        if not torch.cuda.is_available():
            print("error: the experts benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_experts(tuple(args.tokens), tuple(args.systems), sweep=args.sweep, paths=args.paths)
        json_path = args.json or default_path("experts", result["card"], "json")
        plot_path = args.plot or json_path.with_suffix(".png")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        plot_experts(result, plot_path)
        print("\n".join(experts_summary(result)))
        print(f"wrote {json_path} and {plot_path}")

    if args.what == "launch":
        if not torch.cuda.is_available():
            print("error: the launch benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_launch()
        json_path = args.json or default_path("launch", result["card"], "json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")

    if args.what == "attention":
        if not torch.cuda.is_available():
            print("error: the attention benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_attention(tuple(args.batches), tuple(args.contexts), sweep=args.sweep)
        json_path = args.json or default_path("attention", result["card"], "json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")

    if args.what == "prefill":
        if not torch.cuda.is_available():
            print("error: the prefill benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_prefill(args.model, tuple(args.lengths))
        json_path = args.json or default_path("prefill", result["card"], "json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")

    if args.what == "decode":
        if len(args.prompt_len) > 2:
            parser.error("--prompt-len takes one length or LOW HIGH")
        result = bench_decode(args.model, tuple(args.batches), tuple(args.prompt_len), args.steps, args.repeats,
                              modes=args.modes, experts=args.experts, max_seq_len=args.max_seq_len,
                              profile=args.profile, quantize=args.quantize)
        json_path = args.json or default_path("decode", result["card"], "json")
        plot_path = args.plot or json_path.with_suffix(".png")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        plot_decode(result, plot_path)
        last = result["results"][-1]
        print("\n".join(decode_summary(result)))
        print(f"batch {last['batch']} step = {last['step_cost_vs_batch_1']:.2f}x a batch-{result['workload']['batches'][0]}"
              f" step on {result['card']}")
        print(f"wrote {json_path} and {plot_path}")

    if args.what == "router":
        if not torch.cuda.is_available():
            print("error: the router benchmark needs a CUDA device", file=sys.stderr)
            return 2
        result = bench_router(tuple(args.tokens), args.experts, args.top_k, sweep=args.sweep)
        json_path = args.json or default_path("router", result["card"], "json")
        plot_path = args.plot or json_path.with_suffix(".png")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        plot_router(result, plot_path)
        print("\n".join(router_summary(result)))
        print(f"wrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
