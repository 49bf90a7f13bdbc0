"""Pieces the GPU tuning scripts share (imported from beside them: `python benchmarks/tuning/<script>.py`
puts this folder on the path)."""
import os

import torch

import moelab.kernels.experts as EK
import moelab.models as M
from moelab.models import preset_config
from moelab.quant import NF4Experts
from moelab.routing import route


PACKAGE_GEMV_CONFIG = EK.gemv_config  # the experts' decode configs as the package has them

# Whole launch shapes of the experts' one-token NF4 gate_up (not relative to the package's config,
# which changes): 16 rows on 8 warps in 512-value K-steps at 64 registers (the eighth session's, 4
# programs an SM), capped at 48 / 40 (5 / 6 an SM), 40 in 256-value steps, and 4-warp programs.
EIGHT_WARPS = {"BLOCK_N": 16, "num_warps": 8, "BLOCK_K": 512}
ONE_TOKEN_GATE_UP = {"n8w4": {"BLOCK_N": 8, "num_warps": 4, "BLOCK_K": 512, "maxnreg": 64},
                     "n16w8": {**EIGHT_WARPS, "maxnreg": 64}, "r48": {**EIGHT_WARPS, "maxnreg": 48},
                     "r40": {**EIGHT_WARPS, "maxnreg": 40}, "k256r40": {**EIGHT_WARPS, "BLOCK_K": 256, "maxnreg": 40},
                     "n16w4k256": {"BLOCK_N": 16, "num_warps": 4, "BLOCK_K": 256, "maxnreg": 64},
                     "n16w4r80": {"BLOCK_N": 16, "num_warps": 4, "BLOCK_K": 512, "maxnreg": 80}}


def nf4_gemv_config_with(gate_up: dict | None = None, down: dict | None = None, max_rows: int | None = None):
    """The package's `gemv_config` with its NF4 CUDA configs updated: gate_up's by `gate_up` (only up to
    `max_rows` rows when given), down's at one token by `down`. An A/B sets
    `moelab.kernels.experts.gemv_config` to it, and back to PACKAGE_GEMV_CONFIG after."""
    def cfg(num_rows, n_out, gated, nf4, on_gpu, num_sms=132, shared=False):
        c = PACKAGE_GEMV_CONFIG(num_rows, n_out, gated, nf4, on_gpu, num_sms, shared)
        if not (nf4 and on_gpu):
            return c
        if gated:
            return {**c, **(gate_up or {})} if max_rows is None or num_rows <= max_rows else c
        return {**c, **(down or {})} if num_rows == 1 else c
    return cfg


def keep_variants(tables: dict, baseline: str) -> None:
    """Restrict each {ENV_NAME: {variant: config}} table, in place, to the variants its environment
    variable lists (a comma list; unset: all), always keeping `baseline`."""
    for name, table in tables.items():
        if os.environ.get(name):
            keep = os.environ[name].split(",")
            for key in list(table):
                if key not in keep and key != baseline:
                    del table[key]


def timed_row(measure, **keys) -> dict:
    """keys with the us and err that measure() returns; a config the compiler or the launcher
    refuses gives us and err None and the error instead."""
    try:
        with torch.no_grad():
            us, err = measure()
        return dict(keys, us=us, err=err)
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return dict(keys, us=None, err=None, error=repr(e)[:200])


def build_models_once():
    """Make `moelab.models.load` build each (model, quantization) once and keep only the latest:
    `bench_decode` loads the model on every call, and a script alternating variants calls it often."""
    orig_load, cache = M.load, {}

    def load(name, **kw):
        key = (name, kw.get("quantize"))
        if key not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[key] = orig_load(name, **kw)
        return cache[key]

    M.load = load


def nf4_prefill(n: int, first_logits: dict | None = None) -> tuple[float, float | None]:
    """An n-token NF4 prefill of Qwen1.5-MoE-A2.7B (random weights, prompt seeded by n) replayed
    from a fresh Engine's prefill graph, so the kernel choices in force now are the ones captured:
    (median ms, relative L2 difference of its last-token logits from those of the first call for
    this n, kept in `first_logits`; None without it)."""
    import moelab.bench as B
    from moelab.engine import Engine
    from moelab.kernels.experts import fused_experts_forward

    model, _ = M.load("qwen1.5-moe-a2.7b", device="cuda", random_weights=True, quantize="nf4")
    engine = Engine(model, num_slots=1, max_seq_len=2048, experts_fn=fused_experts_forward)
    prompt = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    ms = B.median_seconds(lambda: engine.prefill_graphs.prefill(prompt, 0)) * 1e3
    if first_logits is None:
        return ms, None
    logits = engine.prefill_graphs.prefill(prompt, 0).float().clone()
    ref = first_logits.setdefault(n, logits)
    return ms, float((logits - ref).norm() / ref.norm())


def routed_layer_at_one_token(routings: int = 8, dtype=torch.bfloat16):
    """One routed-experts layer of Qwen1.5-MoE-A2.7B on CUDA as `bench experts` builds it (random
    bf16 weights, N(0, 0.02)) and its NF4 copy, one token x and `routings` random routings:
    (experts, nf4, x, [(weights, ids)])."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = preset_config("qwen1.5-moe-a2.7b")
    experts = Qwen2MoeExperts(config).to("cuda", dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    nf4 = NF4Experts.from_experts(experts, backend="torch").to("cuda")
    x = torch.randn(1, config.hidden_size, device="cuda", dtype=dtype)
    inputs = [route(torch.randn(1, config.num_experts, device="cuda"), config.num_experts_per_tok)
              for _ in range(routings)]
    return experts, nf4, x, [(w.to(dtype), ids.to(torch.int64)) for w, ids in inputs]


def nf4_shared_experts(count: int = 2) -> list:
    """`count` random NF4 shared experts of Qwen1.5-MoE-A2.7B's shape on CUDA (one-expert NF4Tensors of gate/up
    [1, 2 x 5,632, 2,048] and down [1, 2,048, 5,632], N(0, 0.02) weights, a random gate logit), to fold
    into `routed_layer_at_one_token`'s layer."""
    from moelab.kernels.experts import SharedExpert
    from moelab.quant import quantize_nf4

    def q(shape):
        return quantize_nf4(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02, backend="torch")

    return [SharedExpert(q((1, 2 * 5632, 2048)), q((1, 2048, 5632)),
                         torch.randn(1, 1, device="cuda", dtype=torch.bfloat16)) for _ in range(count)]


def graph_timed(fn, n: int, ref=None):
    """(us, max relative difference from ref, outputs) of fn(i) for i < n, timed in a CUDA graph; a
    config the compiler or the launcher refuses gives (its error, None, None)."""
    import moelab.bench as B

    try:
        with torch.no_grad():
            outs = [fn(i).float() for i in range(n)]
            us = B._time_graph(fn, n)
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return repr(e)[:300], None, None
    err = None if ref is None else max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))
    return round(us, 2), err, outs


def decode_step(variant: str, quantize, batches=(1,)) -> list[dict]:
    """One `bench_decode` run of Qwen1.5-MoE-A2.7B as the tuning scripts time it (prompts of 16-64
    tokens, max_seq_len 2048, graph_fused_proj, no profile): its rows as dicts of precision,
    variant, batch, tokens_per_s, ms_per_step and error. The caller puts its variant in force."""
    import moelab.bench as B

    r = B.bench_decode("qwen1.5-moe-a2.7b", batches=batches, prompt_len=(16, 64), max_seq_len=2048,
                       modes=("graph_fused_proj",), quantize=quantize, profile=False)
    return [dict(precision=quantize or "bf16", variant=variant, batch=row["batch"], tokens_per_s=row.get("tokens_per_s"),
                 ms_per_step=row.get("ms_per_step"), error=row.get("error")) for row in r["results"]]


def alternate_decode_steps(variants, use, precisions, batches, rounds: int, out_path: str,
                           reverse_odd_rounds: bool = False) -> dict:
    """The decode-step A/B the step scripts share: for each precision and round, each variant in turn
    with `use(variant)` in force (in reverse order on odd rounds with `reverse_odd_rounds`), one
    `decode_step` at `batches`; every row printed as it comes and the results written to out_path
    after each variant. Returns them ({"card", "versions", "variants", "rows"})."""
    import json

    import moelab.bench as B

    build_models_once()
    res = {"card": B.card_name(), "versions": B.versions(), "variants": list(variants), "rows": []}
    print(res["card"], flush=True)
    for precision in precisions:
        for rep in range(rounds):
            for variant in variants[::-1] if reverse_odd_rounds and rep % 2 else variants:
                use(variant)
                for row in decode_step(variant, None if precision == "bf16" else precision, batches):
                    res["rows"].append(dict(row, rep=rep))
                    print(precision, rep, variant, row["batch"], row["ms_per_step"], row["tokens_per_s"], row["error"],
                          flush=True)
                json.dump(res, open(out_path, "w"), indent=1)
    return res


def alternate_nf4_prefills(variants: dict, use, rounds: int, batches, out_path: str) -> dict:
    """The NF4 A/B the prefill scripts share: for each of `rounds` rounds and each variant in turn,
    `use(value)` in force, whole NF4 prefills of 16 / 32 / 48 / 64 tokens (`nf4_prefill`, last-token
    logits compared with the first variant's) and the decode step at `batches` (none: skipped), then
    `use` of the first variant's value again; every row printed, and the results written to out_path
    after each variant. Returns them ({"card", "versions", "rows"})."""
    import json

    import moelab.bench as B

    build_models_once()
    res = {"card": B.card_name(), "versions": B.versions(), "rows": []}
    print(res["card"], flush=True)
    first_logits, reset = {}, next(iter(variants.values()))

    def add(row):
        res["rows"].append(row)
        print(row, flush=True)

    for rep in range(rounds):
        for variant, value in variants.items():
            use(value)
            try:
                for n in (16, 32, 48, 64):
                    ms, rel = nf4_prefill(n, first_logits)
                    add(dict(rep=rep, variant=variant, what=f"prefill {n}", ms=round(ms, 3),
                             logits_rel_diff_vs_first=rel))
                for r in decode_step(variant, "nf4", batches=batches) if batches else []:
                    add(dict(rep=rep, variant=variant, what=f"decode batch {r['batch']}",
                             tokens_per_s=r["tokens_per_s"], ms=r["ms_per_step"], error=r["error"]))
            finally:
                use(reset)
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)
    return res


def decode_step_with(use, variant: str, quantize, reset: str = "none") -> list[dict]:
    """`decode_step` with `use(variant)` in force, then `use(reset)` whatever happens."""
    use(variant)
    try:
        return decode_step(variant, quantize)
    finally:
        use(reset)
