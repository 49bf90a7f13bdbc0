"""CUDA graphs of moelab's decode step, one per batch-size bucket.

Built in notebooks/08_cuda_graphs_and_decode_attention. An eager decode step of
Qwen1.5-MoE launches about forty kernels per layer from Python, and at small batches the
GPU waits for the launches, not for memory. A CUDA graph records the whole step once (every
layer, greedy argmax or a sampling function included) and replays it with one launch.
`moelab.Engine` runs its pure decode steps through `DecodeGraphs` on CUDA (`cuda_graphs`),
with two samplers: greedy argmax and its per-row temperature / top-k / top-p sampler.

What a graph needs, and how `DecodeGraphs` provides it:

- Fixed addresses: token ids and slot ids are copied into static buffers before each
  replay; the cache, its lengths and the weights already live at fixed addresses. The
  logits and the new ids are the graph's own outputs, valid until the next step.
- Fixed shapes: one graph per bucket (1, 2, 4, ..., 64 sequences); a live batch runs in
  the smallest bucket that holds it, its extra rows padded.
- No host syncs and no value-dependent shapes inside the step: `MoeForward.decode` with
  `check=False` reads slot ids, positions and lengths from device tensors only, and its
  attention kernel's grid depends on the batch and the shapes, never on the lengths.

Padding: the rows past the live batch must not touch any live sequence. `DecodeGraphs`
takes one slot of the cache for itself (`scratch_slot`: the highest free slot, allocated at
construction, so the caller's slots below it keep their order; size the cache one slot
larger), and every padded row decodes token 0 in that slot. The graph
first sets the scratch slot's length to 0, so every padded row writes its key and value at
position 0 of the scratch slot and attends over that one key; its length ends at 1, never
growing past the cache. Padded rows share that slot, so their writes race, harmlessly:
nobody reads the scratch slot but padded rows, and their outputs are dropped. Live slots
are written only by their own rows, exactly as in eager decode.

Several samplers (a dict of them) get a graph each per bucket, `step(..., sampler=name)`
picks one: a greedy-only batch then never pays for a sampler's sort over the vocabulary.
All graphs share one memory pool (captured largest first, replayed one at a time), and
warm up on a side stream before capture, as PyTorch requires (that also compiles the
Triton kernels outside the capture). On the CPU, and where capture fails (with a warning
saying why), `step` runs the same decode eagerly on the live rows.
"""

from __future__ import annotations

import time
import warnings

import torch

from .kv_cache import KVCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def greedy(logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The default sampler: the highest logit of each row, on the device."""
    return logits.argmax(-1)


def capture_graph(step, pool):
    """Capture one call of `step()` in a CUDA graph whose memory comes from `pool`; returns
    (graph, what step returned: the graph's static outputs). Two calls on a side stream first,
    as PyTorch asks: they do the one-time work (allocations, Triton compilation, library
    handles) that must not land in the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    torch.cuda.synchronize()
    return graph, out


class DecodeGraphs:
    """Decode steps for up to max(buckets) sequences, replayed from CUDA graphs.

    fwd: a `MoeForward`; cache: its `KVCache` (its highest free slot is taken here as the
    padding scratch slot). sample_fn(logits [B, vocab], slots [B]) -> ids [B] runs on the
    device inside the graph (default greedy argmax; slots lets it read per-slot sampling
    settings, padded rows pass the scratch slot; its randomness must come from device
    tensors or torch's default CUDA generator, which graphs support); or a dict
    {name: sample_fn}, one graph per sampler and bucket, chosen by `step`'s `sampler`
    (default: the first). mode: "auto" (graphs on CUDA,
    eager elsewhere), "graph" (capture, or warn and fall back to eager), "static" (the
    graph's padded static-buffer step run without capture: for checking the padding on any
    device), "eager". `capture_seconds` says what capturing each bucket cost.
    """

    def __init__(self, fwd, cache: KVCache, buckets=DEFAULT_BUCKETS, sample_fn=greedy, mode: str = "auto"):
        if mode not in ("auto", "graph", "static", "eager"):
            raise ValueError(f"mode must be 'auto', 'graph', 'static' or 'eager', got {mode!r}")
        buckets = sorted(set(buckets))
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive ints, got {buckets}")
        if mode == "graph" and cache.device.type != "cuda":
            raise ValueError(f"mode='graph' needs a CUDA cache, this one is on {cache.device}")
        samplers = dict(sample_fn) if isinstance(sample_fn, dict) else {"default": sample_fn}
        if not samplers or not all(callable(f) for f in samplers.values()):
            raise ValueError(f"sample_fn must be a callable or a non-empty dict of callables, got {sample_fn!r}")
        self.fwd, self.cache, self.buckets, self.samplers = fwd, cache, buckets, samplers
        if mode == "auto":
            mode = "graph" if cache.device.type == "cuda" else "eager"
        self.mode = mode
        self.scratch_slot = None
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.capture_seconds: dict[int, float] = {}
        if mode == "eager":
            return
        if not cache.free_slots:
            raise ValueError("the cache has no free slot for padding: size it one slot larger than the live batch")
        self.scratch_slot = self._take_highest_free_slot(cache)
        size = buckets[-1]
        self._tokens = torch.zeros(size, dtype=torch.int64, device=cache.device)
        self._slots = torch.full((size,), self.scratch_slot, dtype=torch.int64, device=cache.device)
        self._scratch_length = cache.lengths[self.scratch_slot : self.scratch_slot + 1]  # a view
        if mode == "graph":
            try:
                self._capture_all()
            except Exception as err:  # noqa: BLE001  (any capture failure falls back, loudly)
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
                self._graphs.clear()
                self.mode = "eager"

    @property
    def captured(self) -> bool:
        """Whether steps replay CUDA graphs."""
        return bool(self._graphs)

    def bucket_for(self, batch: int) -> int | None:
        """The smallest bucket holding `batch` rows (None: larger than every bucket)."""
        return next((b for b in self.buckets if b >= batch), None)

    def step(self, tokens, slots, sampler: str | None = None) -> torch.Tensor:
        """One decode step: token i is appended to slot i's sequence; returns the new ids [B]
        on the cache's device (a view of the graph's output: copy them to the host once per
        step, before the next step overwrites them). tokens, slots: [B] ints (device tensors
        or host sequences); the slots must be distinct allocated slots with room, as for
        `MoeForward.decode(check=False)`: their values are not checked here. sampler: the
        name of one of the samplers (default: the first)."""
        name = next(iter(self.samplers)) if sampler is None else sampler
        if name not in self.samplers:
            raise ValueError(f"unknown sampler {sampler!r}: this DecodeGraphs has {list(self.samplers)}")
        sample_fn = self.samplers[name]
        tokens = torch.as_tensor(tokens, device=self.cache.device)
        slots = torch.as_tensor(slots, device=self.cache.device)
        if tokens.dim() != 1 or tokens.shape != slots.shape or tokens.numel() == 0:
            raise ValueError(f"tokens and slots must have one equal, non-empty shape [B]: got "
                             f"{tuple(tokens.shape)} and {tuple(slots.shape)}")
        batch = tokens.numel()
        bucket = self.bucket_for(batch)
        if self.mode == "eager" or bucket is None:
            return sample_fn(self.fwd.decode(self.cache, tokens, slots, check=False), slots)
        self._tokens[:batch].copy_(tokens)
        self._slots[:batch].copy_(slots)
        self._tokens[batch:bucket].fill_(0)
        self._slots[batch:bucket].fill_(self.scratch_slot)
        if self.mode == "static":
            return self._static_step(bucket, sample_fn)[1][:batch]
        graph, _, ids = self._graphs[name, bucket]
        graph.replay()
        return ids[:batch]

    def release(self) -> None:
        """Drop the graphs and give the scratch slot back to the cache."""
        self._graphs.clear()
        if self.scratch_slot is not None:
            self.cache.free(self.scratch_slot)
            self.scratch_slot = None
        self.mode = "eager"

    @staticmethod
    def _take_highest_free_slot(cache: KVCache) -> int:
        """Allocate the cache's highest free slot (allocate hands out the lowest: the free
        slots below are taken for a moment and given back: free again, length 0, as before)."""
        below = [cache.allocate(1) for _ in cache.free_slots[:-1]]
        slot = cache.allocate(cache.max_seq_len)
        for other in below:
            cache.free(other)
        return slot

    def _static_step(self, bucket: int, sample_fn):
        """The step a graph records: decode the first `bucket` rows of the static buffers."""
        self._scratch_length.fill_(0)  # padded rows write position 0 of the scratch slot
        slots = self._slots[:bucket]
        logits = self.fwd.decode(self.cache, self._tokens[:bucket], slots, check=False)
        return logits, sample_fn(logits, slots)

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        self._slots.fill_(self.scratch_slot)  # warm-up and capture touch only the scratch slot
        self._tokens.zero_()
        for bucket in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            start = time.perf_counter()
            for name, sample_fn in self.samplers.items():
                graph, (logits, ids) = capture_graph(lambda: self._static_step(bucket, sample_fn), pool)
                self._graphs[name, bucket] = (graph, logits, ids)
            self.capture_seconds[bucket] = time.perf_counter() - start  # all samplers of the bucket


# Padded prompt lengths: steps of at most half a bucket, so padding costs under 2x (and a
# prefill of a few hundred tokens costs little more than one of 16: it reads every expert).
DEFAULT_PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class PrefillGraphs:
    """Whole-prompt prefills of one sequence, replayed from CUDA graphs, one per length bucket.

    An eager prefill of Qwen1.5-MoE launches about forty kernels per layer from Python: on an
    H200 a 40-token prompt took 32 ms of host time for 5 ms of GPU work, so at one request at
    a time the prefill, not the decode, set the pace. `MoeForward.prefill_padded` is the same
    prefill with the prompt padded to a bucket length and every shape fixed; this records it
    once per bucket (lazily, at the first prompt that needs it) and replays it. Measured on an
    H200 (benchmarks/results/prefill_2026-11-29_h200.json), one prompt: 64 tokens 57.2 ms eager
    -> 5.8 ms replayed, 512 tokens 56.7 -> 10.0 ms, 2048 tokens 59.4 -> 22.9 ms (50% of the
    measured matmul rate), 4096 tokens 60.8 -> 43.3 ms (56%).

    fwd, cache: as for `DecodeGraphs`. buckets: the padded lengths (a prompt runs in the
    smallest bucket holding it; longer ones are not handled: `fits` says so). mode: "graph"
    (capture; where capture fails, warn once and run eagerly from then on) or "static" (the
    padded step without capture, on any device: for checking the padding on the CPU).
    Graphs share one memory pool; each holds its bucket's activations while it lives.
    """

    def __init__(self, fwd, cache: KVCache, buckets=DEFAULT_PREFILL_BUCKETS, mode: str = "graph"):
        if mode not in ("graph", "static"):
            raise ValueError(f"mode must be 'graph' or 'static', got {mode!r}")
        if mode == "graph" and cache.device.type != "cuda":
            raise ValueError(f"mode='graph' needs a CUDA cache, this one is on {cache.device}")
        buckets = sorted({b for b in buckets if b <= cache.max_seq_len})
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive ints up to max_seq_len {cache.max_seq_len}, got {buckets}")
        self.fwd, self.cache, self.buckets, self.mode = fwd, cache, buckets, mode
        device = cache.device
        self._tokens = torch.zeros(buckets[-1], dtype=torch.int64, device=device)
        self._slot = torch.zeros(1, dtype=torch.int64, device=device)
        self._length = torch.ones(1, dtype=torch.int64, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_seconds: dict[int, float] = {}

    def fits(self, num_tokens: int) -> bool:
        """Whether a prompt of `num_tokens` has a bucket."""
        return 1 <= num_tokens <= self.buckets[-1]

    def prefill(self, prompt, slot: int) -> torch.Tensor:
        """Prefill `prompt` (token ids, 1 <= len <= the largest bucket) into `slot` from position
        0; returns its last token's logits [1, vocab] (with graphs, a view of the graph's
        output, valid until the next replay of that bucket). The slot's row must have room
        for the bucket's length (any row does: buckets never exceed max_seq_len)."""
        n = len(prompt)
        if not self.fits(n):
            raise ValueError(f"a prompt of {n} tokens has no prefill bucket (buckets {self.buckets})")
        bucket = next(b for b in self.buckets if b >= n)
        self._tokens[:n].copy_(torch.as_tensor(prompt, dtype=torch.int64), non_blocking=True)
        self._tokens[n:bucket].zero_()
        self._slot.fill_(slot)
        self._length.fill_(n)
        if self.mode == "static":
            return self._step(bucket)
        if bucket not in self._graphs:
            self._capture(bucket)
        if bucket not in self._graphs:  # capture failed: eager from now on
            return self._step(bucket)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def release(self) -> None:
        """Drop the graphs (and their memory pool)."""
        self._graphs.clear()
        self._pool = None

    def _step(self, bucket: int) -> torch.Tensor:
        return self.fwd.prefill_padded(self.cache, self._tokens[:bucket], self._slot, self._length)

    def _capture(self, bucket: int) -> None:
        start = time.perf_counter()
        lengths = self.cache.lengths.clone()  # the warm-up and capture runs must leave no trace
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[bucket] = capture_graph(lambda: self._step(bucket), self._pool)
        except Exception as err:  # noqa: BLE001  (any capture failure falls back, loudly)
            warnings.warn(f"CUDA graph capture of the {bucket}-token prefill failed ({type(err).__name__}: {err}); "
                          "prefilling eagerly", RuntimeWarning, stacklevel=3)
            self.mode = "static"
        self.cache.lengths.copy_(lengths)
        self.capture_seconds[bucket] = time.perf_counter() - start
