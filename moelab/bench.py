"""Benchmarks: `python -m moelab.bench <what>`, results as JSON (+ PNG) under benchmarks/results/.

Built in notebooks/02_triton_router_kernel (router), 06_kv_cache_slots and
08_cuda_graphs_and_decode_attention (decode). Benchmarks are not tests: they time real
runs, name the card, and compare systems side by side in one run on one machine.

    python -m moelab.bench router                  # on CUDA: eager, graphs, compile, Triton
    python -m moelab.bench router --json out.json --plot out.png
    python -m moelab.bench launch                  # on CUDA: where one router call's host time goes
    python -m moelab.bench decode                  # CPU or CUDA: decode step, 1..8 slots
    python -m moelab.bench decode --model qwen1.5-moe-a2.7b --batches 1 8 64 --prompt-len 16 64 \
        --max-seq-len 2048 --profile                # CUDA: SDPA / kernel / graphs / fused rope vs the bound
    python -m moelab.bench attention               # CUDA: decode attention alone, SDPA vs kernel, split-K
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
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def floor_us(nbytes: int, bandwidth_gbs: float) -> float:
    """The physical limit of a memory-bound op: its bytes over the measured copy bandwidth."""
    return nbytes / (bandwidth_gbs * 1e9) * 1e6


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
        }
        if sweep:
            for bt in (1, 2, 4, 8, 16):
                for nw in (1, 2, 4):
                    if bt <= max(1, t) * 2:
                        systems[f"triton_graph_b{bt}_w{nw}"] = (
                            lambda i, bt=bt, nw=nw: router_topk(inputs[i], top_k, block_t=bt, num_warps=nw), _time_graph)
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
    for system in ("torch_eager", "torch_graph", "torch_compile_graph", "triton", "triton_graph"):
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

# mode: (decode attention, rotary + cache write, CUDA graph); each adds one optimisation.
DECODE_MODES = {
    "eager_sdpa": ("sdpa", "torch", False),      # notebook 06's step: SDPA over whole cache rows
    "eager_kernel": ("kernel", "torch", False),  # + the decode-attention kernel
    "graph_kernel": ("kernel", "torch", True),   # + the whole step replayed from a CUDA graph
    "graph_fused": ("kernel", "kernel", True),   # + rotary and cache write fused into one kernel
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
    from .model import experts_forward

    if impl not in ("auto", "torch", "fused"):
        raise ValueError(f"experts must be 'auto', 'torch' or 'fused', got {impl!r}")
    if impl == "torch" or (impl == "auto" and not on_cuda):
        return experts_forward, "torch"
    try:
        from .kernels.experts import fused_experts_forward
    except ImportError as err:
        if impl == "fused":
            raise SystemExit(f"--experts fused: moelab.kernels.experts.fused_experts_forward is missing ({err})")
        return experts_forward, "torch"
    return fused_experts_forward, "fused"


def _profile_step(step, steps: int, timeline: bool) -> dict:
    """Kernels of `steps` decode steps under torch.profiler: the top ones by device time
    per step, GPU busy time per step, and optionally one step's kernel timeline."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()  # outside the profile: nothing lazy inside it
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()

    def device_us(evt, self_time=True):
        for name in (("self_device_time_total", "self_cuda_time_total") if self_time
                     else ("device_time_total", "cuda_time_total")):
            if hasattr(evt, name):
                return getattr(evt, name)
        return 0.0

    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
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
        events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
        if events:
            t0 = events[0].time_range.start
            per_step = len(events) // steps
            out["timeline_one_step"] = [[e.name[:80], round(e.time_range.start - t0, 2),
                                         round(e.time_range.elapsed_us(), 2)] for e in events[:per_step]]
    return out


def bench_decode(model_name: str = "tiny", batches=(1, 2, 4, 8), prompt_len=(64,), steps: int = 32,
                 repeats: int = 5, device: str | None = None, modes=None, experts: str = "auto",
                 max_seq_len: int | None = None, profile: bool = False, seed: int = 0) -> dict:
    """Time moelab's decode step for B sequences at once, B in `batches`, in several modes
    side by side (notebooks 06 and 08), each adding one optimisation (`DECODE_MODES`):
    `eager_sdpa` (MoeForward.decode with SDPA over the masked cache rows), `eager_kernel`
    (the decode-attention kernel), `graph_kernel` (the same step replayed from a CUDA graph,
    `moelab.graphs`), `graph_fused` (rotary + cache write in one kernel as well).

    Each sequence is prefilled with a random prompt (`prompt_len`: one length, or a
    (low, high) range drawn per sequence), then `steps` steps run, each ending with one
    copy of the new ids to the host, as an engine does; the median of `repeats` runs (each
    from the same prefilled state) is kept. On CUDA the run also measures the copy
    bandwidth and reports each figure against the weight-bandwidth bound of ANCHORS.md.
    On the CPU this measures per-op overhead more than arithmetic.
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
        if DECODE_MODES[mode][2] and not on_cuda:
            raise ValueError(f"the {mode} mode needs CUDA (CUDA graphs); on the CPU use eager_sdpa / eager_kernel")
    low, high = (prompt_len[0], prompt_len[-1]) if not isinstance(prompt_len, int) else (prompt_len, prompt_len)
    warmup = 3
    max_seq_len = max_seq_len or high + warmup + steps + 1
    if high + warmup + steps + 1 > max_seq_len:
        raise ValueError(f"max_seq_len {max_seq_len} cannot hold {high} prompt tokens + {warmup + steps} steps")
    load_kwargs = {"device": device}
    if model_name != "tiny":
        load_kwargs["random_weights"] = True
    model, _ = load(model_name, **load_kwargs)
    experts_fn, experts_impl = _experts_fn(experts, on_cuda)
    forwards = {mode: MoeForward(model, experts_fn=experts_fn, attention=DECODE_MODES[mode][0],
                                 rope=DECODE_MODES[mode][1]) for mode in modes}
    reference = MoeForward(model, experts_fn=experts_fn, attention="sdpa", rope="torch")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    bandwidth = copy_bandwidth_gbs() if on_cuda else None
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 256) if model_name == "tiny" else model.config.vocab_size
    rows, profiles = [], []
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
                if DECODE_MODES[mode][2]:
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
            row = {"system": f"moelab_{mode}", "mode": mode, "experts_impl": experts_impl, "batch": batch,
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
                    prof = _profile_step(step, 3, timeline=batch in (batches[0], batches[-1]))
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
        "workload": {"model": model_name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "random_weights": model_name != "tiny", "prompt_len": [low, high], "steps": steps,
                     "warmup_steps": warmup, "repeats": repeats, "batches": list(batches), "modes": list(modes),
                     "max_seq_len": max_seq_len, "experts_impl": experts_impl,
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
                               ("graph_fused", "graph_kernel", "fused rope {:.2f}x")):
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
    ax.set_title(f"moelab decode, {result['workload']['model']} {result['workload']['dtype']}, "
                 f"experts {result['workload']['experts_impl']}, {result['card']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- decode attention

def bench_attention(batches=(1, 8, 64), contexts=(64, 512, 2048), heads: int = 16, kv_heads: int = 16,
                    head_dim: int = 128, max_seq_len: int = 2048, layers: int = 24,
                    splits=(1, 2, 4, 8, 16), dtype=torch.bfloat16) -> dict:
    """Decode attention alone on CUDA, Qwen1.5-MoE's shapes: SDPA over the whole masked cache
    rows (MoeForward's `sdpa` path) against the Triton kernel with its default split-K and
    forced splits, every sequence at `context` keys, each timed inside a CUDA graph and
    rotating over `layers` layers of a full-size cache (so small cases are not all in L2)."""
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


# ---------------------------------------------------------------------------- CLI

def default_path(kind: str, card: str, suffix: str) -> Path:
    return RESULTS_DIR / f"{kind}_{_dt.date.today().isoformat()}_{card_tag(card)}.{suffix}"


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
    attention.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
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
                        help="default: all four on CUDA, eager_sdpa on the CPU")
    decode.add_argument("--experts", choices=["auto", "torch", "fused"], default="auto",
                        help="routed experts: moelab's PyTorch path or the fused kernel (auto: fused when present)")
    decode.add_argument("--profile", action="store_true", help="CUDA: add a torch.profiler kernel table per mode")
    decode.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    decode.add_argument("--plot", type=Path, default=None, help="where to write the PNG (default: beside the JSON)")
    args = parser.parse_args(argv)

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
        result = bench_attention(tuple(args.batches), tuple(args.contexts))
        json_path = args.json or default_path("attention", result["card"], "json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")

    if args.what == "decode":
        if len(args.prompt_len) > 2:
            parser.error("--prompt-len takes one length or LOW HIGH")
        result = bench_decode(args.model, tuple(args.batches), tuple(args.prompt_len), args.steps, args.repeats,
                              modes=args.modes, experts=args.experts, max_seq_len=args.max_seq_len,
                              profile=args.profile)
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
