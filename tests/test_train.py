"""moelab.train: a short CPU run learns, reports, and saves a checkpoint that reloads exactly."""

import json

import pytest
import torch

import moelab
from moelab.train import build_corpus, eval_windows, train, unigram_bits_per_byte

CORPUS_BYTES = 200_000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train(steps=30, batch_size=8, seq_len=64, lr=3e-3, device="cpu", out=out,
                 max_corpus_bytes=CORPUS_BYTES, eval_every=15, seed=0, eval_count=16, progress=False)


def test_loss_falls(run):
    assert len(run.losses) == 30
    first, last = run.losses[0], sum(run.losses[-5:]) / 5
    assert first > 5.0  # about ln(257) = 5.55 nats at random init
    assert last < first - 1.5, (first, last)
    assert run.held_out_bpb < run.unigram_bpb + 0.5  # already near the byte-frequency baseline


def test_training_json_has_the_fields(run):
    info = json.loads((run.out_dir / "training.json").read_text())
    for key in ("corpus", "device", "steps", "batch_size", "seq_len", "lr", "seed", "wall_time_s",
                "held_out_bits_per_byte", "unigram_bits_per_byte", "load_balance", "versions"):
        assert key in info, key
    for key in ("python_version", "sha256", "train_bytes", "held_out_bytes"):
        assert key in info["corpus"], key
    assert info["device"] == "cpu" and info["steps"] == 30
    assert info["corpus"]["train_bytes"] > 0 and info["corpus"]["held_out_bytes"] > 0
    assert info["held_out_bits_per_byte"] == pytest.approx(run.held_out_bpb, abs=1e-4)
    table = info["load_balance"]
    assert [row["layer"] for row in table] == [0, 1, 2, 3]
    for row in table:
        assert len(row["share"]) == 16 and sum(row["share"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= row["min_over_uniform"] <= 1.0 <= row["max_over_uniform"]
    assert (run.out_dir / "loss_curve.png").stat().st_size > 1000


def test_corpus_is_deterministic_and_split_by_file(run):
    again = build_corpus(CORPUS_BYTES)
    assert again.sha256 == run.corpus.sha256
    assert torch.equal(again.train, run.corpus.train) and torch.equal(again.held_out, run.corpus.held_out)
    assert again.held_out_files and again.train_files
    assert not set(again.held_out_files) & set(again.train_files)
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for name in again.train_files + again.held_out_files for part in name.split("/")[:-1])
    # token ids are bytes, files end with EOS
    assert int(again.train.max()) == 256 and int(again.train.min()) >= 0
    assert int((again.held_out == 256).sum()) == len(again.held_out_files)
    assert build_corpus(20_000).sha256 != again.sha256  # fewer files, another hash


def test_unigram_baseline():
    stream = torch.tensor([0, 0, 0, 1])
    # add-one smoothing over 257 symbols: p(0) = 4 / 261
    expected = -torch.log2(torch.tensor(4 / 261.0)).item()
    assert unigram_bits_per_byte(stream, torch.tensor([0, 0])) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"fewer than seq_len \+ 1 = 11"):
        eval_windows(torch.arange(10), seq_len=10)


def test_saved_checkpoint_reloads_exactly(run):
    assert run.out_dir.joinpath("model.safetensors").stat().st_size < 8_000_000  # stored in bf16
    config = json.loads((run.out_dir / "config.json").read_text())
    assert config["eos_token_id"] == 256 and config["pad_token_id"] == 256 and config["vocab_size"] == 257
    model, tok = moelab.load(str(run.out_dir), dtype=torch.float32, device="cpu")
    assert tok.eos_token_id == 256 and tok.encode("def f():") == list(b"def f():")
    trained = run.model
    assert next(trained.parameters()).dtype == torch.float32
    for p in trained.parameters():  # the in-memory weights are the rounded ones
        assert torch.equal(p, p.to(torch.bfloat16).float())
    ids = torch.tensor([list(b"import os\nprint(os.getcwd())\n")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)


def test_balance_loss_is_one_when_even_and_grows_when_skewed():
    from moelab.train import balance_loss

    torch.manual_seed(1)
    even = torch.zeros(64, 16)  # every expert equally likely: loss exactly 1
    assert balance_loss([even, even], top_k=4).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.randn(64, 16)
    skewed[:, 3] += 8.0  # one layer sends nearly everything to expert 3
    mixed = balance_loss([even, skewed], top_k=4).item()
    assert mixed > 1.5
    # averaged over layers, not pooled: the skewed layer alone costs twice as much
    assert balance_loss([skewed], top_k=4).item() == pytest.approx(2 * mixed - 1.0, rel=1e-5)
    logits = skewed.clone().requires_grad_(True)
    balance_loss([logits], top_k=4).backward()
    assert logits.grad[:, 3].mean() > 0  # gradient descent lowers the over-used expert
