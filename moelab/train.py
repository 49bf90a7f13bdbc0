"""Train the `tiny` Qwen2-MoE on the running interpreter's own standard library.

Built in notebooks/00_welcome_and_tour. The `tiny` preset ships as a trained checkpoint
(moelab/assets/tiny) so that the course's model writes something that looks like Python
instead of noise. This module is how that checkpoint is made, end to end, in one command:

1. Corpus: every `.py` file of the standard library (`sysconfig.get_paths()["stdlib"]`),
   minus test folders and site-packages, in sorted order, as raw bytes (token id == byte
   value, files separated by EOS id 256). Every 20th file is held out, so held-out text
   is code the model never saw, not just unseen windows of seen files.
2. Model: transformers' own `Qwen2MoeForCausalLM`, randomly initialised (about 3.2 M
   parameters), trained with AdamW, a cosine schedule with warmup and the Switch-style
   load-balancing loss on the router logits that `output_router_logits=True` returns,
   weighted by `router_aux_loss_coef`. We apply it to each layer separately: transformers'
   own version pools all layers' tokens first, so one layer can starve an expert while
   another layer makes up for it in the pooled count.
3. Report: held-out bits per byte against a unigram baseline, how evenly each layer's
   router spreads tokens over the 16 experts, a loss curve and `training.json`.
4. Ship: weights are rounded to bfloat16 (6.4 MB on disk), evaluated as rounded, and saved
   with the byte tokenizer, so `moelab.load("tiny")` reloads exactly what was measured.

GPU (the shipped checkpoint; about 16 steps/s on an H200, so 3-4 minutes):
    python -m moelab.train
CPU recipe (about 0.6 s a step on 2 cores, so half an hour; a quarter of the GPU run's
tokens, so a somewhat weaker model). The GPU defaults on 2 CPU cores take about 2.4 s a
step, two hours in all:
    python -m moelab.train --device cpu --steps 3000 --batch-size 16 --seq-len 256
A quick smoke run:
    python -m moelab.train --steps 30 --batch-size 8 --seq-len 64 --max-corpus-bytes 200000 --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.models import TINY_DIR, byte_tokenizer, preset_config, random_model

EOS = 256
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages"}
HELD_OUT_EVERY = 20  # file i is held out when i % 20 == 0: about 5% of the files


# ---------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    """The byte streams the model trains and is scored on, and where they came from."""

    train: torch.Tensor  # int64 token ids: bytes 0..255, EOS 256 between files
    held_out: torch.Tensor
    train_files: list[str]  # paths relative to the stdlib root
    held_out_files: list[str]
    sha256: str  # of the file names and contents, in order: same interpreter, same hash

    @property
    def train_bytes(self) -> int:
        return len(self.train) - len(self.train_files)  # minus one EOS per file

    @property
    def held_out_bytes(self) -> int:
        return len(self.held_out) - len(self.held_out_files)


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted, without tests and installed packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(max_bytes: int | None = None, root: Path | None = None) -> Corpus:
    """Read the stdlib into train and held-out byte streams, split by file.

    Files that are not valid UTF-8 are skipped (a handful of encoding test fixtures).
    `max_bytes` stops reading once that many bytes are in (for tests); the first file
    is always held out, so even a small corpus has a held-out part.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    streams = {"train": [], "held_out": []}
    names = {"train": [], "held_out": []}
    total = index = 0
    for path in stdlib_files(root):
        if max_bytes is not None and total >= max_bytes:
            break
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        name = path.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + data + b"\0")
        split = "held_out" if index % HELD_OUT_EVERY == 0 else "train"
        streams[split] += list(data) + [EOS]
        names[split].append(name)
        total += len(data)
        index += 1
    as_ids = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    return Corpus(as_ids(streams["train"]), as_ids(streams["held_out"]),
                  names["train"], names["held_out"], digest.hexdigest())


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random contiguous windows of `seq_len` tokens: the training batches."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seq_len: int, count: int = 64) -> torch.Tensor:
    """Up to `count` fixed windows of `seq_len + 1` tokens spread evenly over the held-out
    stream: the same bytes are scored at every evaluation, so the curve is comparable."""
    span = seq_len + 1
    if len(stream) < span:
        raise ValueError(f"held-out stream has {len(stream)} tokens, fewer than seq_len + 1 = {span}")
    count = min(count, len(stream) // span)
    starts = torch.linspace(0, len(stream) - span, count).long()
    return torch.stack([stream[s : s + span] for s in starts.tolist()])


# ---------------------------------------------------------------- measuring


def unigram_bits_per_byte(train: torch.Tensor, targets: torch.Tensor, vocab: int = 257) -> float:
    """Bits per byte of the best context-free guess: the train split's byte histogram
    (add-one smoothed) scored on `targets`. The model must beat this to have learned
    anything beyond letter frequencies."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    log2p = torch.log2(counts / counts.sum())
    return float(-log2p[targets.reshape(-1)].mean())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, list[dict]]:
    """Held-out bits per byte and the per-layer load balance, from one pass over `windows`.

    Bits per byte = mean cross-entropy in nats / ln 2 (one token is one byte). Load balance:
    each layer's share of (token, k) assignments per expert; `min_over_uniform` is the
    least-used expert's share divided by the uniform share 1/E (1.0 = perfectly even,
    0.0 = a dead expert).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    nats, tokens = 0.0, 0
    counts = torch.zeros(model.config.num_hidden_layers, num_experts, dtype=torch.float64)
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        out = model(input_ids=chunk[:, :-1], output_router_logits=True)
        nats += F.cross_entropy(out.logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        tokens += chunk[:, 1:].numel()
        for layer, logits in enumerate(out.router_logits):
            picked = logits.float().topk(top_k, dim=-1).indices  # the router's own top-k
            counts[layer] += torch.bincount(picked.flatten().cpu(), minlength=num_experts).double()
    model.train(was_training)
    share = counts / counts.sum(dim=1, keepdim=True)
    balance = [
        dict(layer=i, min_over_uniform=round(float(s.min() * num_experts), 4),
             max_over_uniform=round(float(s.max() * num_experts), 4),
             share=[round(float(x), 5) for x in s])
        for i, s in enumerate(share)
    ]
    return nats / tokens / math.log(2), balance


# ---------------------------------------------------------------- training


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, averaged over layers (1.0 when perfectly even).

    Per layer: E * sum_e f_e * P_e, with f_e the fraction of (token, k) picks that went to
    expert e and P_e the mean router probability of e. Its gradient flows through P_e and
    pushes probability away from over-used experts.
    """
    per_layer = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        num_experts = probs.shape[-1]
        picks = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        fraction = picks.mean(dim=0) / top_k
        per_layer.append(num_experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(per_layer).mean()


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model (float32, bf16-rounded weights, as saved)
    and the numbers that also go into training.json."""

    model: torch.nn.Module
    corpus: Corpus
    losses: list[float]  # training loss per step (cross-entropy + aux loss)
    evals: list[tuple[int, float]]  # (step, held-out bits per byte)
    held_out_bpb: float  # final, measured on the bf16-rounded weights
    unigram_bpb: float
    load_balance: list[dict]
    out_dir: Path
    info: dict  # the contents of training.json


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_optimizer(model, lr: float, steps: int, weight_decay: float = 0.1):
    """AdamW (no decay on norms and biases) with linear warmup then cosine decay to lr/10."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = max(1, min(200, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def round_to_bf16_(model) -> None:
    """Round every weight to bfloat16 and back, in place: the model now holds exactly the
    values the bf16 checkpoint stores, so what we measure is what ships."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def train(
    steps: int = 3000,
    batch_size: int = 64,
    seq_len: int = 256,
    lr: float = 3e-3,
    device: str | None = None,
    out: str | Path = TINY_DIR,
    max_corpus_bytes: int | None = None,
    eval_every: int = 250,
    seed: int = 0,
    aux_loss_coef: float = 0.01,
    eval_count: int = 64,
    progress: bool = True,
) -> TrainResult:
    """Train the tiny Qwen2-MoE from scratch on the stdlib, save it to `out`, report."""
    from tqdm.auto import tqdm

    device = torch.device(device or default_device())
    torch.manual_seed(seed)
    start = time.perf_counter()
    corpus = build_corpus(max_corpus_bytes)
    held = eval_windows(corpus.held_out, seq_len, eval_count)
    unigram = unigram_bits_per_byte(corpus.train, held[:, 1:])

    config = preset_config("tiny")
    config.router_aux_loss_coef = aux_loss_coef  # Qwen's default is 0.001
    model = random_model(config, device, torch.float32, seed).train()  # fp32 master weights
    default_experts = getattr(model.config, "_experts_implementation", None)
    cpu_eager = device.type == "cpu" and default_experts not in (None, "eager")
    if cpu_eager:
        # transformers' default grouped_mm experts path is ~6x slower than the eager loop
        # on the CPU at batch 64 x 256 (measured); on CUDA grouped_mm is the fast one.
        model.set_experts_implementation("eager")
    opt, sched = make_optimizer(model, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    # bf16 autocast on CUDA for speed; on the CPU plain fp32 (bf16 there is slower, not faster)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    losses, evals = [], []
    bar = tqdm(range(steps), desc="train tiny", disable=not progress)
    for step in bar:
        ids = random_windows(corpus.train, batch_size, seq_len, gen).to(device, non_blocking=True)
        with autocast:
            fwd = model(input_ids=ids, output_router_logits=True)
            ce = F.cross_entropy(fwd.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            aux = balance_loss(fwd.router_logits, model.config.num_experts_per_tok)
            loss = ce + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            with autocast:
                bpb, _ = evaluate(model, held)
            evals.append((step + 1, bpb))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out_bpb=f"{bpb:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

    model.eval()
    if cpu_eager:
        model.set_experts_implementation(default_experts)  # as `moelab.load` will build it
    round_to_bf16_(model)
    bpb, balance = evaluate(model, held)  # fp32 forward over the rounded weights: what ships
    wall = time.perf_counter() - start
    info = _training_info(corpus, device, steps, batch_size, seq_len, lr, seed, aux_loss_coef,
                          wall, bpb, unigram, balance, len(held), evals)
    out = Path(out)
    _save(model, out, info, losses, evals, unigram)
    return TrainResult(model, corpus, losses, evals, bpb, unigram, balance, out, info)


# ---------------------------------------------------------------- saving


def _training_info(corpus, device, steps, batch_size, seq_len, lr, seed, aux_loss_coef,
                   wall, bpb, unigram, balance, eval_windows_used, evals) -> dict:
    """Everything needed to know what the checkpoint is and to reproduce it."""
    import transformers

    return dict(
        corpus=dict(source="python stdlib .py files (no test dirs, no site-packages)",
                    python_version=platform.python_version(), sha256=corpus.sha256,
                    train_bytes=corpus.train_bytes, held_out_bytes=corpus.held_out_bytes,
                    train_files=len(corpus.train_files), held_out_files=len(corpus.held_out_files),
                    held_out_rule=f"file index % {HELD_OUT_EVERY} == 0 in sorted order"),
        device="cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
        router_aux_loss_coef=aux_loss_coef,
        aux_loss="Switch-style load balancing per layer, averaged (moelab.train.balance_loss)",
        wall_time_s=round(wall, 1),
        held_out_bits_per_byte=round(bpb, 4), unigram_bits_per_byte=round(unigram, 4),
        eval_windows=eval_windows_used, eval_curve=[[s, round(b, 4)] for s, b in evals],
        weights="bfloat16 (final evaluation ran on the bf16-rounded weights in float32)",
        load_balance=balance,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
    )


def _save(model, out: Path, info: dict, losses, evals, unigram) -> None:
    """Write the bf16 checkpoint, the tokenizer, training.json and loss_curve.png to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    # A bf16 copy (exact: the weights were already rounded). Casting `model` itself there and
    # back would also round its float32 buffers (RoPE's inv_freq), which the checkpoint
    # does not store: a reloaded model recomputes them in float32.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    plot_curve(losses, evals, unigram, out / "loss_curve.png")


def plot_curve(losses, evals, unigram, path: Path) -> None:
    """Training loss (in bits per byte, like the held-out curve) and held-out bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), [x / math.log(2) for x in losses], lw=0.8, label="train loss (incl. aux)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out")
    ax.axhline(unigram, color="gray", ls="--", label="unigram baseline")
    ax.set(xlabel="step", ylabel="bits per byte", title="tiny Qwen2-MoE on the Python stdlib")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train moelab's tiny Qwen2-MoE on the Python stdlib.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default=default_device())
    p.add_argument("--out", default=str(TINY_DIR))
    p.add_argument("--max-corpus-bytes", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    a = p.parse_args(argv)
    r = train(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, device=a.device,
              out=a.out, max_corpus_bytes=a.max_corpus_bytes, eval_every=a.eval_every, seed=a.seed,
              aux_loss_coef=a.aux_loss_coef)
    c = r.info["corpus"]
    print(f"corpus: {c['train_bytes']:,} train bytes, {c['held_out_bytes']:,} held-out bytes "
          f"(Python {c['python_version']}, sha256 {c['sha256'][:16]}...)")
    print(f"held-out bits/byte: {r.held_out_bpb:.3f}  (unigram baseline {r.unigram_bpb:.3f})")
    print("load balance, least-used expert / uniform share, per layer: "
          + ", ".join(f"{b['min_over_uniform']:.2f}" for b in r.load_balance))
    print(f"saved to {r.out_dir} in {r.info['wall_time_s']:.0f} s on {r.info['device']}")


if __name__ == "__main__":
    main()
