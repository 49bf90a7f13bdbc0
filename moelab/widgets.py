"""Interactive panels for the notebooks: real Engine runs on `tiny`, not simulations.

Built in notebooks/07_continuous_batching. `serve_run` serves a seeded workload (Poisson
arrivals, prompt and output lengths drawn from ranges) with a real `Engine`; `plot_gantt`
draws slot occupancy over time; `compare_policies` runs static and continuous on the same
workload and draws them side by side with their metrics; `serving_panel` puts sliders on all
of it. Every panel's default view is also what `compare_policies()` returns, so a notebook
can render it in a plain cell.
"""

from __future__ import annotations

import random
import time

from .engine import Engine, summarize

DEFAULTS = dict(num_slots=4, rate=40.0, prompt_len=(4, 48), output_len=(4, 48), num_requests=24, seed=0)


def serve_run(model, policy: str = "continuous", num_slots: int = 4, rate: float | None = 40.0,
              prompt_len=(4, 48), output_len=(4, 48), num_requests: int = 24, seed: int = 0,
              token_budget: int = 256) -> dict:
    """Serve `num_requests` random byte prompts arriving as a Poisson process of `rate`
    requests/s (None or 0: all at once) with a real Engine; EOS ignored, so request i makes
    exactly its drawn number of tokens. Returns the finished requests, the engine's step
    stats, the start time and `moelab.engine.summarize`'s metrics."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(*prompt_len))] for _ in range(num_requests)]
    outputs = [rng.randint(*output_len) for _ in range(num_requests)]
    arrivals, t = [], 0.0
    for _ in range(num_requests):
        arrivals.append(t)
        if rate:
            t += rng.expovariate(rate)
    engine = Engine(model, num_slots, max(prompt_len) + max(output_len), policy=policy,
                    token_budget=max(token_budget, num_slots + 1))
    engine.generate([prompts[0][:4]], 2)  # warm-up
    engine.steps.clear()
    requests, start = [], time.perf_counter()
    while len(requests) < num_requests or not engine.idle:
        now = time.perf_counter()
        while len(requests) < num_requests and start + arrivals[len(requests)] <= now:
            i = len(requests)
            requests.append(engine.submit(prompts[i], outputs[i], arrival_time=start + arrivals[i], ignore_eos=True))
        if engine.idle:
            time.sleep(max(0.0, start + arrivals[len(requests)] - time.perf_counter()))
            continue
        engine.step()
    seconds = max(r.finish_time for r in requests) - start
    return {"policy": policy, "num_slots": num_slots, "requests": requests, "steps": list(engine.steps),
            "start": start, "metrics": summarize(requests, seconds)}


def plot_gantt(ax, run: dict, title: str | None = None) -> None:
    """Slot occupancy over time: one row per slot, one bar per request from admission to
    its last token; the pale part is waiting for the first token (prefill), the dark part
    decoding. Ticks under the axis mark arrivals."""
    cmap = __import__("matplotlib").colormaps["tab20"]
    start = run["start"]
    for i, r in enumerate(run["requests"]):  # colour by arrival order: the same in every run
        color = cmap(i % 20)
        first = r.token_times[0] if r.token_times else r.finish_time
        ax.barh(r.slot, first - r.admit_time, left=r.admit_time - start, color=color, alpha=0.35, height=0.8)
        ax.barh(r.slot, r.finish_time - first, left=first - start, color=color, height=0.8)
    arrivals = [r.arrival_time - start for r in run["requests"]]
    ax.plot(arrivals, [-0.75] * len(arrivals), "|", color="k", markersize=6)
    m = run["metrics"]
    ax.set(xlabel="seconds", ylabel="slot", yticks=range(run["num_slots"]), ylim=(-1.1, run["num_slots"] - 0.4),
           title=title or f"{run['policy']}: {m['tokens_per_s']:.0f} tokens/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms")
    ax.invert_yaxis()


def metrics_table(runs: list[dict]) -> str:
    """The runs' metrics as a small fixed-width text table."""
    lines = [f"{'policy':<11} {'slots':>5} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
             f"{'ITL p99':>8}"]
    for run in runs:
        m = run["metrics"]
        lines.append(f"{run['policy']:<11} {run['num_slots']:>5} {m['tokens_per_s']:>9.1f} {m['ttft_p50_ms']:>9.1f} "
                     f"{m['ttft_p99_ms']:>9.1f} {m['itl_p50_ms']:>8.1f} {m['itl_p99_ms']:>8.1f}")
    return "\n".join(lines) + "\n(times in ms)"


def compare_policies(model, policies=("static", "continuous"), **params):
    """Run each policy on the same workload (DEFAULTS, overridden by `params`) and draw
    their Gantt charts side by side. Returns (figure, runs)."""
    import matplotlib.pyplot as plt

    params = {**DEFAULTS, **params}
    runs = [serve_run(model, policy, **params) for policy in policies]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 0.45 * params["num_slots"] + 2.2),
                             sharex=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        plot_gantt(ax, run)
    fig.tight_layout()
    return fig, runs


def serving_panel(model, run_now: bool = True):
    """Sliders for slots, arrival rate, prompt and output length ranges and the policy; each
    change (or the button) reruns the real Engine on `model` and redraws the Gantt charts and
    metrics. With `run_now=False` nothing runs until then (a notebook shows the default view
    in a plain cell instead)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    style = {"description_width": "140px"}
    common = dict(style=style, continuous_update=False)
    slots = w.IntSlider(DEFAULTS["num_slots"], 1, 8, description="slots", **common)
    rate = w.FloatSlider(DEFAULTS["rate"], min=0, max=200, step=5, description="arrivals / s (0: all)", **common)
    prompt = w.IntRangeSlider(value=DEFAULTS["prompt_len"], min=1, max=128, description="prompt length", **common)
    output = w.IntRangeSlider(value=DEFAULTS["output_len"], min=1, max=128, description="output length", **common)
    policy = w.Dropdown(options=["both", "static", "continuous"], value="both", description="policy", style=style)
    button = w.Button(description="run")
    out = w.Output()

    def redraw(_=None):
        policies = ("static", "continuous") if policy.value == "both" else (policy.value,)
        with out:
            out.clear_output(wait=True)
            fig, runs = compare_policies(model, policies, num_slots=slots.value, rate=rate.value or None,
                                         prompt_len=prompt.value, output_len=output.value)
            display(fig)
            plt.close(fig)
            print(metrics_table(runs))

    for control in (slots, rate, prompt, output, policy):
        control.observe(redraw, names="value")
    button.on_click(redraw)
    if run_now:
        redraw()
    return w.VBox([w.HBox([w.VBox([slots, rate, policy]), w.VBox([prompt, output, button])]), out])
