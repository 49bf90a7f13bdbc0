"""moelab.bench: the CLI refuses clearly without CUDA, the decode runner and the summary math."""

import json

import pytest
import torch

from moelab import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("what", ["router", "launch"])
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
