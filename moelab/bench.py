"""Benchmarks: `python -m moelab.bench <what>`, results as JSON (+ PNG) under benchmarks/results/.

Built in notebooks/02_triton_router_kernel (router) and 06_kv_cache_slots (decode). Benchmarks are not tests: they time real
runs, name the card, and compare systems side by side in one run on one machine.

    python -m moelab.bench router                  # on CUDA: eager, graphs, compile, Triton
    python -m moelab.bench router --json out.json --plot out.png
    python -m moelab.bench launch                  # on CUDA: where one router call's host time goes
    python -m moelab.bench decode                  # CPU or CUDA: decode step, 1..8 slots
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

def bench_decode(model_name: str = "tiny", batches=(1, 2, 4, 8), prompt_len: int = 64,
                 steps: int = 32, repeats: int = 5, device: str | None = None) -> dict:
    """Time one `MoeForward.decode` step for B slots at once, B in `batches` (notebook 06).

    Each slot is prefilled with `prompt_len` random tokens, then `steps` decode steps run and
    the median per-step time of `repeats` runs is kept. On the CPU this measures per-op
    overhead more than arithmetic; on a GPU, a step of the real model is bound by weight bytes.
    """
    from .model import MoeForward
    from .models import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load(model_name, device=device)
    fwd = MoeForward(model)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in batches:
        per_step = []
        for _ in range(repeats):
            cache = fwd.new_cache(num_slots=batch, max_seq_len=prompt_len + steps + 1)
            slots = [cache.allocate(prompt_len + steps + 1) for _ in range(batch)]
            prompts = [torch.randint(0, 256, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
            tokens = fwd.prefill(cache, prompts, slots).argmax(-1)
            slots_t = torch.tensor(slots, device=cache.device)
            tokens = fwd.decode(cache, tokens, slots_t).argmax(-1)  # warm-up step
            sync()
            start = time.perf_counter()
            for _ in range(steps - 1):
                tokens = fwd.decode(cache, tokens, slots_t, check=False).argmax(-1)
            sync()
            per_step.append((time.perf_counter() - start) / (steps - 1) * 1e3)
        ms = statistics.median(per_step)
        rows.append({"system": "moelab_forward", "batch": batch, "ms_per_step": round(ms, 3),
                     "tokens_per_s": round(batch / ms * 1e3, 1)})
        print(f"batch {batch:>3}: {ms:7.2f} ms per decode step, {batch / ms * 1e3:8.1f} tokens/s", flush=True)
    single = rows[0]["ms_per_step"]
    for row in rows:
        row["step_cost_vs_batch_1"] = round(row["ms_per_step"] / single, 3)
    return {
        "benchmark": "decode",
        "card": card_name(),
        "date": _dt.date.today().isoformat(),
        "versions": versions(),
        "workload": {"model": model_name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "prompt_len": prompt_len, "steps": steps, "repeats": repeats, "batches": list(batches),
                     "note": "moelab.MoeForward.decode over a slot KV cache, greedy; median ms per step"},
        "results": rows,
    }


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
    launch = sub.add_parser("launch", help="where the host time of one router call goes (CUDA)")
    launch.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
    decode = sub.add_parser("decode", help="moelab's decode step for 1..8 slots at once (CPU or CUDA)")
    decode.add_argument("--model", default="tiny")
    decode.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    decode.add_argument("--prompt-len", type=int, default=64)
    decode.add_argument("--steps", type=int, default=32)
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: benchmarks/results/)")
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

    if args.what == "decode":
        result = bench_decode(args.model, tuple(args.batches), args.prompt_len, args.steps, args.repeats)
        json_path = args.json or default_path("decode", result["card"], "json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        last = result["results"][-1]
        print(f"batch {last['batch']} step = {last['step_cost_vs_batch_1']:.2f}x a batch-1 step on {result['card']}")
        print(f"wrote {json_path}")

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
