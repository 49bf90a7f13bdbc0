"""moelab.bench: the CLI refuses clearly without CUDA, the decode runner and the summary math."""

import json
import time

import pytest
import torch

import moelab
from moelab import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("what", ["router", "launch", "attention", "prefill"])
def test_gpu_benches_refuse_without_cuda(what, capsys):
    assert bench.main([what]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_decode_bench_runs_and_reports_ratios(tmp_path):
    path = tmp_path / "decode.json"
    assert bench.main(["decode", "--batches", "1", "3", "--prompt-len", "8", "--steps", "4", "--repeats", "1",
                       "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["benchmark"] == "decode" and result["workload"]["model"] == "tiny"
    rows = result["results"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert rows[0]["step_cost_vs_batch_1"] == 1.0
    # batch 3's step relative to batch 1's (both rounded in the JSON)
    assert rows[1]["step_cost_vs_batch_1"] == pytest.approx(rows[1]["ms_per_step"] / rows[0]["ms_per_step"], abs=1e-3)
    for r in rows:
        assert r["ms_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["ms_per_step"] * 1e3, rel=1e-2, abs=0.06)  # rounded to 0.1


def test_router_summary_ratios():
    rows = []
    for system, us in (("torch_eager", 40.0), ("torch_compile_graph", 12.0), ("triton", 30.0), ("triton_graph", 2.0)):
        rows.append({"tokens": 64, "system": system, "us": us, "bytes": 64 * 60 * 2 + 64 * 4 * 8})
    result = {"workload": {"tokens": [64]}, "copy_bandwidth_gbs": 4000.0, "results": rows}
    (line,) = bench.router_summary(result)
    assert "20.0x faster than torch eager" in line
    assert "6.00x torch.compile+graph" in line
    floor_us = (64 * 60 * 2 + 64 * 4 * 8) / 4000e3
    assert f"({floor_us:.2f} us)" in line and "launched from Python 30.0 us (1.3x eager)" in line


@pytest.mark.parametrize("card,tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                      ("cpu (x86_64, 2 threads)", "cpu")])
def test_card_tag(card, tag):
    assert bench.card_tag(card) == tag


def test_decode_weight_bytes_match_anchors():
    """The bound's bytes from the meta-device Qwen1.5-MoE: ANCHORS.md's 4.76 / 13.66 / 27.71 GB."""
    import moelab

    model, _ = moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta")
    for batch, experts, gb in ((1, 4.0, 4.76), (8, 25.5, 13.66), (64, 59.3, 27.71)):
        got = bench.decode_weight_bytes(model, batch)
        assert round(got["experts_per_layer"], 1) == experts
        assert round(got["bytes"] / 1e9, 2) == gb
    assert got["moe_layers"] == 24 and got["bytes_per_expert"] == 3 * 2048 * 1408 * 2
    assert bench.expected_distinct_experts(60, 4, 0) == 0


def test_decode_weight_bytes_nf4_head_on_meta():
    """The NF4 models' bound: "nf4_head" reads the head's 4-bit codes where "nf4" reads 622 MB of bf16."""
    pytest.importorskip("bitsandbytes")
    import moelab

    got = {q: bench.decode_weight_bytes(moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta",
                                                    quantize=q)[0], 1) for q in ("nf4", "nf4_head")}
    head_bf16, head_codes = 151936 * 2048 * 2, 151936 * 2048 // 2
    assert got["nf4"]["dense_bytes"] - got["nf4_head"]["dense_bytes"] == head_bf16 - head_codes
    assert got["nf4"]["bytes_per_expert"] == got["nf4_head"]["bytes_per_expert"]


def test_moelab_warms_up_at_the_timed_runs_concurrency(monkeypatch):
    """Above the 8-request warm-up, a moelab system first serves the workload's first `concurrency`
    requests at once, cut to 4 tokens: its batch sizes compile before the clock starts (a batch-64
    run that compiled inside its timed requests read a quarter of its speed on an H100)."""
    wl = bench.serve_workload(12, (3, 9), (2, 30), rate=5.0, seed=2)
    warm = bench.warm_workload(wl, 10)
    assert warm["prompts"] == wl["prompts"][:10] and warm["num_requests"] == 10
    assert warm["outputs"] == [min(o, 4) for o in wl["outputs"][:10]] and warm["arrivals"] == [0.0] * 10
    seen = []
    real = bench._run_moelab
    monkeypatch.setattr(bench, "_run_moelab", lambda e, w: seen.append(w["num_requests"]) or real(e, w))
    bench.bench_serve("tiny", "cpu", ("moelab_continuous",), num_requests=12, prompt_len=(3, 9), output_len=(2, 6),
                      concurrency=(2, 10), precisions=("fp32",), progress_bar=False)
    assert seen == [8, 12, 8, 10, 12]  # c2: warm-up, timed; c10: warm-up, the first 10 at once, timed


def test_moelab_repeats_alternate_their_order_on_fresh_engines(monkeypatch):
    """With repeats, moelab's systems run round by round, A B then B A: the first Engine after a
    model build ran 2-3 % slower on an H100, so no system may always be the one that runs first."""
    timed = []
    real = bench._run_moelab
    monkeypatch.setattr(bench, "_run_moelab", lambda e, w: (w["num_requests"] == 12 and timed.append(
        (e.scheduler.policy, e))) or real(e, w))  # the Engine itself: kept alive, no id is reused
    result = bench.bench_serve("tiny", "cpu", ("moelab_static", "moelab_continuous"), num_requests=12,
                               prompt_len=(3, 9), output_len=(2, 6), concurrency=(2,), precisions=("fp32",),
                               repeats=3, progress_bar=False)
    assert [policy for policy, _ in timed] == ["static", "continuous", "continuous", "static", "static", "continuous"]
    assert len({id(engine) for _, engine in timed}) == 6  # a fresh Engine each round
    rows = {r["system"]: r for r in result["results"]}
    assert sorted(rows) == ["moelab_continuous", "moelab_static"]
    assert all("error" not in r and r["tokens"] == result["workload"]["total_output_tokens"] for r in rows.values())
    assert all(len(r["tokens_per_s_runs"]) == 3 and r["tokens_per_s"] == max(r["tokens_per_s_runs"])
               for r in rows.values())


def test_serve_nf4_head_precision_on_the_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    path = tmp_path / "s.json"
    assert bench.main(["--requests", "2", "--prompt-len", "3", "4", "--output-len", "2", "2", "--systems",
                       "hf_static", "moelab_continuous", "--precisions", "nf4_head", "--concurrency", "2",
                       "--no-progress", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["system"], r["precision"]) for r in rows] == [("moelab_continuous", "nf4_head")]  # no HF NF4 on CPU
    assert rows[0]["tokens"] == 4 and "error" not in rows[0]


def test_decode_bench_modes_and_summary(tmp_path):
    path = tmp_path / "decode.json"
    assert bench.main(["decode", "--batches", "2", "--prompt-len", "3", "9", "--steps", "2", "--repeats", "1",
                       "--modes", "eager_sdpa", "eager_kernel", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [r["mode"] for r in result["results"]] == ["eager_sdpa", "eager_kernel"]
    assert result["results"][1]["ids_match_first_mode"] == 1.0  # float32: the kernel gives SDPA's tokens
    assert result["results"][0]["precision"] == "float32" and result["workload"]["quantize"] is None
    assert result["workload"]["prompt_len"] == [3, 9] and result["workload"]["experts_impl"] == "torch"
    assert path.with_suffix(".png").stat().st_size > 0
    rows = [{"batch": 4, "mode": m, "tokens_per_s": t, "bound_tokens_per_s": 400.0, "roofline_fraction": t / 400}
            for m, t in (("eager_sdpa", 50.0), ("eager_kernel", 100.0), ("graph_kernel", 250.0), ("graph_rope", 300.0),
                         ("graph_fused", 330.0))]
    (line,) = bench.decode_summary({"workload": {"batches": [4]}, "results": rows})
    assert line == ("batch   4: eager_sdpa 50 tok/s (12% of 400), eager_kernel 100 tok/s (25% of 400), "
                    "graph_kernel 250 tok/s (62% of 400), graph_rope 300 tok/s (75% of 400), graph_fused 330 tok/s "
                    "(82% of 400), kernel 2.00x SDPA, graphs 2.50x eager, fused rope 1.20x, fused norm 1.10x")
    if not torch.cuda.is_available():
        for mode in ("graph_kernel", "graph_rope", "graph_fused"):
            with pytest.raises(ValueError, match="needs CUDA"):
                bench.bench_decode(batches=(1,), modes=(mode,))


def test_decode_bench_keeps_going_when_a_mode_fails(monkeypatch, tmp_path):
    import moelab.kernels.attention

    def broken(*args, **kwargs):
        raise RuntimeError("kernel does not compile")

    monkeypatch.setattr(moelab.kernels.attention, "decode_attention", broken)
    result = bench.bench_decode(batches=(1, 2), prompt_len=(4,), steps=1, repeats=1,
                                modes=("eager_sdpa", "eager_kernel"))
    failed = [r for r in result["results"] if "error" in r]
    assert [r["batch"] for r in failed] == [1, 2] and "kernel does not compile" in failed[0]["error"]
    assert [r["batch"] for r in result["results"] if "error" not in r] == [1, 2]
    assert bench.decode_summary(result)[0].endswith("eager_kernel FAILED")
    bench.plot_decode(result, tmp_path / "decode.png")


@pytest.mark.parametrize("argv,message", [
    (["serve", "--systems", "hf_serial", "vllm"], "unknown system(s) ['vllm']"),
    (["--systems", "hf_static", "sglang"], "unknown system(s) ['sglang']"),  # no subcommand: the full benchmark
    (["serve", "--model", "llama-7b"], "unknown preset 'llama-7b'"),
    (["--model", "llama-7b"], "unknown preset 'llama-7b'"),
    (["serve", "--model", "qwen1.5-moe-a2.7b", "--device", "cpu"], "too large for the CPU"),
    (["serve", "--device", "tpu"], "--device must be cpu or cuda"),
    (["serve", "--output-len", "9", "3"], "output_len must be 1 <= LOW <= HIGH"),
    (["--precisions", "fp32", "int3"], "unknown precision(s) ['int3']"),
    (["--concurrency", "4", "0"], "--concurrency and --serial-requests must be >= 1"),
    (["--merge", "/nonexistent/serve.json"], "no such file"),
])
def test_serve_rejects_bad_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("argv", [["serve", "--device", "cuda"], ["--model", "qwen1.5-moe-a2.7b", "--random-weights"]])
def test_serve_refuses_cuda_without_cuda(argv, capsys):
    assert bench.main(argv) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_random_weights_flag_is_required_for_the_full_size_preset_and_only_for_presets(capsys, monkeypatch):
    # On "cuda" (reported as present), so the CPU's size check cannot answer first: each refusal for its own reason.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["--model", "qwen1.5-moe-a2.7b", "--device", "cuda"]) == 2
    assert "no checkpoint here: pass --random-weights" in capsys.readouterr().err
    assert bench.main(["--model", "someorg/some-moe", "--device", "cuda", "--random-weights"]) == 2
    assert "--random-weights needs a preset" in capsys.readouterr().err
    assert bench.main(["--model", "qwen1.5-moe-a2.7b", "--device", "cpu", "--random-weights"]) == 2
    assert "too large for the CPU" in capsys.readouterr().err


def test_serve_workload_is_seeded_and_in_range():
    a = bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=4)
    assert a == bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=4)
    assert a != bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=5)
    assert all(3 <= len(p) <= 9 for p in a["prompts"]) and all(2 <= n <= 5 for n in a["outputs"])
    assert a["arrivals"][0] == 0 and all(x < y for x, y in zip(a["arrivals"], a["arrivals"][1:]))
    assert bench.serve_workload(5, (1, 2), (1, 1))["arrivals"] == [0.0] * 5
    first = bench.first_requests(a, 7)
    assert first["num_requests"] == 7 and first["prompts"] == a["prompts"][:7] and first["outputs"] == a["outputs"][:7]


def test_tokens_check_names_the_first_difference():
    g = torch.Generator().manual_seed(11)
    runs = [[torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 3, 7)]]
    runs += [[list(r) for r in runs[0]] for _ in range(2)]
    runs[2][2][4] = (runs[2][2][4] + 1) % 256
    ok = bench.tokens_check({"a": runs[0], "b": runs[1]})
    assert ok["ok"] and ok["mismatches"] == []
    bad = bench.tokens_check({"a": runs[0], "b": runs[1], "c": runs[2]})
    assert not bad["ok"] and bad["mismatches"] == ["c vs a: request 2 differs at output token 4"]
    # a serial run on fewer requests is compared on the requests it served
    assert bench.tokens_check({"a": runs[0], "serial": runs[0][:2]})["ok"]


def test_teacher_forced_check_passes_bf16_and_catches_a_wrong_forward():
    import moelab
    from moelab.model import experts_torch

    model, _ = moelab.load("tiny", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 2)]
    good = bench.teacher_forced_check(model, prompts, experts_torch)
    # On the CPU both forwards run the routed experts through torch._grouped_mm in the same order,
    # so the error may be exactly 0; the wrong forward below shows the check can fail.
    assert good["ok"] and good["positions"] == 18 and 0 <= good["rel_l2_error"] < bench.LOGITS_TOLERANCE
    wrong = bench.teacher_forced_check(model, prompts, lambda *a: 1.5 * experts_torch(*a))
    assert not wrong["ok"] and wrong["rel_l2_error"] > bench.LOGITS_TOLERANCE


def test_served_tokens_check_passes_the_engines_tokens_and_catches_wrong_ones():
    import moelab
    from moelab.engine import Engine

    model, _ = moelab.load("tiny")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 9, 1)]
    served = Engine(model, num_slots=2, max_seq_len=32).generate(prompts, max_new_tokens=6)
    good = bench.served_tokens_check(model, prompts, served)
    assert good["ok"] and good["required"] and good["positions"] == 18 and good["top1_agreement"] == 1.0
    # one wrong last token (nothing is predicted from it) in 18: 17 agree; every token off by one id: few do
    nudged = [list(t) for t in served]
    nudged[1][-1] = (nudged[1][-1] + 1) % 256
    assert bench.served_tokens_check(model, prompts, nudged)["top1_agreement"] == round(17 / 18, 4)
    wrong = bench.served_tokens_check(model, prompts, [[(t + 1) % 256 for t in out] for out in served])
    assert not wrong["ok"] and wrong["top1_agreement"] < bench.DECODE_AGREEMENT


def _continuous_runs_here() -> bool:
    import transformers
    from packaging.version import Version

    # transformers 5.17's continuous batching sizes its cache from GPU memory, 0 on the CPU, and
    # fails there (recorded as an error row, the others still run); 5.24 runs on the CPU.
    return torch.cuda.is_available() or Version(transformers.__version__) >= Version("5.24")


def test_full_benchmark_runs_every_system_end_to_end_then_merges(tmp_path, capsys, monkeypatch):
    path = tmp_path / "serve.json"
    assert bench.main(["--requests", "3", "--serial-requests", "2", "--prompt-len", "3", "6", "--output-len", "2", "4",
                       "--concurrency", "1", "2", "--no-progress", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert (tmp_path / "serve.png").exists()
    assert set(result) >= {"card", "versions", "workload", "results", "checks"} and result["checks_ok"]
    rows = {(r["system"], r["precision"], r["experts_impl"], r["concurrency"]): r for r in result["results"]}
    expected = {("hf_serial", "fp32", impl, 1) for impl in ("eager", "grouped_mm")}
    expected |= {(s, "fp32", "grouped_mm", c) for s in ("hf_static", "hf_compiled", "hf_continuous") for c in (1, 2)}
    expected |= {(s, p, "moelab_torch", c) for s in ("moelab_static", "moelab_continuous") for p in ("fp32", "nf4")
                 for c in (1, 2)}  # the CPU has no transformers NF4 (bitsandbytes) rows
    assert set(rows) == expected and len(result["results"]) == len(expected)
    outputs = bench.serve_workload(3, (3, 6), (2, 4), vocab=256, seed=0)["outputs"]
    for key, row in rows.items():
        if key[0] == "hf_continuous" and not _continuous_runs_here():
            assert "error" in row or row["tokens"] == sum(outputs[:2] if key[3] == 1 else outputs)
            continue
        # EOS ignored by all; every HF run at concurrency 1 serves the first --serial-requests
        serial = key[0] == "hf_serial" or key[0].startswith("hf_") and key[3] == 1
        assert row["tokens"] == sum(outputs[:2] if serial else outputs) and row["num_requests"] == (2 if serial else 3)
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["itl_p50_ms"] <= row["itl_p99_ms"] and row["roofline_fraction"] is None
        assert set(row) >= {"system", "precision", "experts_impl", "concurrency", "tokens_per_s", "ttft_p50_ms",
                            "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "peak_mem_gb", "roofline_fraction"}
    assert all(r["compiled"] is torch.cuda.is_available() for k, r in rows.items() if k[0] == "hf_compiled")
    assert rows[("moelab_static", "nf4", "moelab_torch", 2)]["weights_gb"] < rows[
        ("moelab_static", "fp32", "moelab_torch", 2)]["weights_gb"]
    checks = result["checks"]
    assert checks["tokens_fp32"]["ok"] and checks["tokens_fp32"]["required"]
    # every fp32 run that ran, tokens identical
    assert len(checks["tokens_fp32"]["systems"]) == (12 if _continuous_runs_here() else 10)
    assert checks["logits_fp32"]["ok"] and checks["logits_fp32"]["rel_l2_error"] < 1e-4
    assert checks["logits_nf4"]["ok"]
    # the served tokens of moelab's decode path, teacher-forced through transformers
    assert checks["decode_fp32"]["ok"] and checks["decode_fp32"]["top1_agreement"] == 1.0 and checks["decode_nf4"]["ok"]
    out = capsys.readouterr().out
    assert "moelab_continuous fp32 c2: " in out and "x hf_serial" in out and "x hf_static" in out

    # A second run merged into the same file: a new row is added, a same-key row replaced, and a
    # failed check is loud (exit 1) while the JSON is still written.
    monkeypatch.setattr(bench, "teacher_forced_check", lambda *a, **k: {
        "rel_l2_error": 0.5, "tolerance": 0.05, "top1_agreement": 0.5, "positions": 1, "ok": False})
    assert bench.main(["--requests", "3", "--prompt-len", "3", "6", "--output-len", "2", "4", "--systems",
                       "moelab_continuous", "--precisions", "fp32", "--concurrency", "2", "3", "--no-progress",
                       "--merge", str(path)]) == 1
    assert "CORRECTNESS CHECK FAILED" in capsys.readouterr().err
    merged = json.loads(path.read_text())
    keys = [(r["system"], r["precision"], r["experts_impl"], r["concurrency"]) for r in merged["results"]]
    assert set(keys) == expected | {("moelab_continuous", "fp32", "moelab_torch", 3)} and len(keys) == len(set(keys))
    assert len(merged["runs"]) == 2 and not merged["checks_ok"]


def test_merge_refuses_another_card():
    old = {"card": "NVIDIA H200", "date": "2026-11-28", "workload": {}, "results": []}
    with pytest.raises(ValueError, match="cannot merge a run on 'cpu'"):
        bench.merge_serve(old, {"card": "cpu", "date": "2026-11-28", "workload": {}, "results": []})


def test_profile_step_plumbing_on_cpu_ops():
    x = torch.randn(64, 64)
    prof = bench._profile_step(lambda: (x @ x).relu().sum(), 2, timeline=True, on_cuda=False)
    names = [row["kernel"] for row in prof["top_kernels"]]
    assert "aten::matmul" in names or "aten::mm" in names
    assert all(row["calls_per_step"] > 0 for row in prof["top_kernels"])
    assert prof["gpu_busy_ms_per_step"] == 0  # CPU ops have no device time
    assert prof["timeline_one_step"] and all(len(e) == 3 and e[2] >= 0 for e in prof["timeline_one_step"])
    assert prof["table"] and "Name" in prof["table"]


def test_serve_max_seq_len_sizes_moelab_cache_and_is_checked(tmp_path, capsys, monkeypatch):
    from moelab import engine as engine_module

    seen = []

    class Spy(engine_module.Engine):
        def __init__(self, model, num_slots, max_seq_len, **kw):
            seen.append(max_seq_len)
            super().__init__(model, num_slots, max_seq_len, **kw)

    monkeypatch.setattr(engine_module, "Engine", Spy)  # bench_serve imports it when called
    path = tmp_path / "s.json"
    assert bench.main(["--requests", "2", "--prompt-len", "3", "4", "--output-len", "2", "2", "--systems",
                       "moelab_continuous", "--precisions", "fp32", "--concurrency", "2", "--max-seq-len", "64",
                       "--no-progress", "--json", str(path)]) == 0
    assert seen == [64] and json.loads(path.read_text())["workload"]["max_seq_len"] == 64
    assert bench.main(["--requests", "2", "--prompt-len", "3", "4", "--output-len", "2", "2", "--systems",
                       "moelab_continuous", "--max-seq-len", "5", "--no-progress", "--json", str(path)]) == 2
    assert "below the workload's longest request" in capsys.readouterr().err


def test_compile_time_cap_records_an_error_row_and_skips_the_rest(tmp_path, monkeypatch):
    """A run past the cap (here: a stand-in compile that sleeps) is stopped by SIGALRM, recorded
    as an error row, and that precision's later hf_compiled rows are skipped with the reason."""
    real = bench._run_hf_batches

    def slow(model, wl, batch, pad_id, **kw):
        if kw.get("cache_implementation") == "static":
            time.sleep(60)
        return real(model, wl, batch, pad_id, **kw)

    monkeypatch.setattr(bench, "_run_hf_batches", slow)
    start = time.perf_counter()
    result = bench.bench_serve("tiny", "cpu", ("hf_static", "hf_compiled", "moelab_static"), num_requests=2,
                               prompt_len=(3, 4), output_len=(2, 2), concurrency=(1, 2), precisions=("fp32",),
                               compile_time_cap=0.5, progress_bar=False)
    assert time.perf_counter() - start < 45  # the 60 s sleep was cut short
    rows = {(r["system"], r["concurrency"]): r for r in result["results"]}
    assert rows[("hf_compiled", 1)]["error"].startswith("CompileTimeCap: hf_compiled fp32 c1 went past the compile")
    assert rows[("hf_compiled", 2)]["error"].startswith("skipped: an earlier hf_compiled fp32 run went past the cap")
    assert all("error" not in rows[(s, c)] for s in ("hf_static", "moelab_static") for c in (1, 2))
    assert result["checks_ok"] and result["workload"]["compile_time_cap"] == 0.5


def test_experts_summary_sets_the_matmul_target_at_4096_only():
    row = dict(timing="graph", bytes=1, gb_per_s=1.0, tflops=1.0, matmul_fraction=0.01)
    small = {"workload": {"tokens": [1, 8, 64]}, "results": [
        {**row, "tokens": t, "system": "moelab_bf16", "us": 10.0 * t, "bandwidth_fraction": 0.7} for t in (1, 8, 64)]}
    lines = bench.experts_summary(small)
    assert any("T<=64" in line and "(met)" in line for line in lines)
    assert not any("matmul rate" in line for line in lines)
    big = {"workload": {"tokens": [64, 4096]}, "results": small["results"][2:] + [
        {**row, "tokens": 4096, "system": "moelab_bf16", "us": 900.0, "bandwidth_fraction": 0.1, "matmul_fraction": 0.37}]}
    assert any("T=4096 bf16 >= 0.50 of matmul rate: 0.37 (MISSED)" in line for line in bench.experts_summary(big))


def test_serve_summary_compares_with_serial_grouped_mm_and_same_concurrency():
    """moelab's ratio against hf_serial uses HF's faster grouped_mm experts (not eager), and
    against a batched HF system its row at the same precision and concurrency."""
    from moelab.bench import serve_summary

    def row(system, impl, conc, tps, precision="bf16"):
        return {"system": system, "precision": precision, "experts_impl": impl, "concurrency": conc,
                "tokens_per_s": tps, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0, "itl_p50_ms": 1.0, "itl_p99_ms": 1.0,
                "peak_mem_gb": 1.0, "roofline_fraction": None}

    rows = [row("hf_serial", "eager", 1, 10.0), row("hf_serial", "grouped_mm", 1, 20.0),
            row("hf_static", "grouped_mm", 1, 25.0), row("hf_static", "grouped_mm", 8, 50.0),
            row("hf_static", "grouped_mm", 8, 999.0, precision="nf4"),
            row("moelab_continuous", "moelab_fused", 1, 100.0), row("moelab_continuous", "moelab_fused", 8, 400.0)]
    lines = serve_summary({"results": rows, "checks": {}})
    c1 = next(line for line in lines if line.startswith("moelab_continuous bf16 c1:"))
    c8 = next(line for line in lines if line.startswith("moelab_continuous bf16 c8:"))
    assert "5.00x hf_serial" in c1 and "4.00x hf_static" in c1
    assert "20.00x hf_serial" in c8 and "8.00x hf_static" in c8


def test_prefill_flops_count_the_weights_a_token_multiplies():
    """2 FLOPs per weight each prompt token multiplies (attention projections, router, shared
    expert and its gate, top-k routed experts; not the lm_head), counted here from tiny's
    actual tensors, plus causal attention's L(L+1)/2 query-key pairs of QK^T and PV."""
    model = moelab.load("tiny")[0]
    config = model.config
    per_token = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        per_token += sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        per_token += mlp.gate.weight.numel() + mlp.shared_expert_gate.weight.numel()
        per_token += sum(m.weight.numel() for m in (mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj,
                                                    mlp.shared_expert.down_proj))
        per_expert = (mlp.experts.gate_up_proj.numel() + mlp.experts.down_proj.numel()) / config.num_experts
        per_token += config.num_experts_per_tok * per_expert
    head_dim = config.hidden_size // config.num_attention_heads
    for n in (1, 7, 64):
        attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * n * (n + 1) / 2
        assert bench.prefill_flops(config, n) == pytest.approx(2 * per_token * n + attention)
