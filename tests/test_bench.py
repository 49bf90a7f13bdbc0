"""moelab.bench: the CLI refuses clearly without CUDA, the decode runner and the summary math."""

import json

import pytest
import torch

from moelab import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("what", ["router", "launch", "attention"])
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
    (["serve", "--model", "llama-7b"], "unknown preset 'llama-7b'"),
    (["serve", "--model", "qwen1.5-moe-a2.7b", "--device", "cpu"], "too large for the CPU"),
    (["serve", "--device", "tpu"], "--device must be cpu or cuda"),
    (["serve", "--output-len", "9", "3"], "output_len must be 1 <= LOW <= HIGH"),
])
def test_serve_rejects_bad_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_serve_refuses_cuda_without_cuda(capsys):
    assert bench.main(["serve", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_serve_workload_is_seeded_and_in_range():
    a = bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=4)
    assert a == bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=4)
    assert a != bench.serve_workload(20, (3, 9), (2, 5), rate=50.0, seed=5)
    assert all(3 <= len(p) <= 9 for p in a["prompts"]) and all(2 <= n <= 5 for n in a["outputs"])
    assert a["arrivals"][0] == 0 and all(x < y for x, y in zip(a["arrivals"], a["arrivals"][1:]))
    assert bench.serve_workload(5, (1, 2), (1, 1))["arrivals"] == [0.0] * 5


def test_serve_runs_every_system_end_to_end(tmp_path, capsys):
    path = tmp_path / "serve.json"
    assert bench.main(["serve", "--requests", "3", "--prompt-len", "3", "6", "--output-len", "2", "5",
                       "--concurrency", "2", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert (tmp_path / "serve.png").exists()
    assert [r["system"] for r in result["results"]] == list(bench.SERVE_SYSTEMS)
    total = result["workload"]["total_output_tokens"]
    import transformers
    from packaging.version import Version

    # transformers 5.17's continuous batching sizes its cache from GPU memory, 0 on the CPU, and
    # fails there (recorded as an error row, the others still run); 5.24 runs on the CPU.
    if Version(transformers.__version__) < Version("5.24"):
        failed = result["results"].pop(2)
        assert failed["system"] == "hf_continuous" and ("error" in failed or failed["tokens"] == total)
    else:
        assert "error" not in result["results"][2]
    for row in result["results"]:
        assert row["tokens"] == total  # EOS ignored: every system makes exactly the asked tokens
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["itl_p50_ms"] <= row["itl_p99_ms"] and row["roofline_fraction"] is None
        assert row["concurrency"] == (1 if row["system"] == "hf_serial" else 2)
    out = capsys.readouterr().out
    assert "moelab_continuous: " in out and "x hf_serial" in out


def test_profile_step_plumbing_on_cpu_ops():
    x = torch.randn(64, 64)
    prof = bench._profile_step(lambda: (x @ x).relu().sum(), 2, timeline=True, on_cuda=False)
    names = [row["kernel"] for row in prof["top_kernels"]]
    assert "aten::matmul" in names or "aten::mm" in names
    assert all(row["calls_per_step"] > 0 for row in prof["top_kernels"])
    assert prof["gpu_busy_ms_per_step"] == 0  # CPU ops have no device time
    assert prof["timeline_one_step"] and all(len(e) == 3 and e[2] >= 0 for e in prof["timeline_one_step"])
    assert prof["table"] and "Name" in prof["table"]
