"""The Engine: requests in, tokens and text out, many requests sharing one batched step.

Built in notebooks/07_continuous_batching. Each `step()` reads as its own summary:
schedule (admit waiting requests into free slots, split the token budget), run the prompt
chunks (chunked prefill) and one batched decode step, copy the new token ids to the host
once, then append, stream and retire.

The decode step (`decode_step`) takes device tensors only (slot ids; each slot's last token,
sampling parameters and seed live in per-slot device tensors) and returns the next ids on
the device: sampling runs there too, with noise derived from a hash of (seed, position,
token id), so a request's draw never depends on its batch companions, and nothing inside
talks to the host. That is what notebooks/08_cuda_graphs_and_decode_attention captures in
CUDA graphs: on CUDA (`cuda_graphs`), every pure decode step (no prompt chunk in it) replays
a `moelab.graphs.DecodeGraphs` graph of the smallest batch bucket holding the live batch,
sampling included (greedy argmax when every row is greedy, else `sample` per row). A step
that prefills one whole prompt alone replays a `moelab.graphs.PrefillGraphs` graph of its
padded length; other steps with prompt chunks stay eager. The graphs pad a batch with rows decoding in one extra
scratch slot of the KV cache, which the Engine allocates beyond `num_slots` and never hands
to a request.

Overlap (`overlap`, on by default on CUDA; notebook 08): a pure decode step is left running
while `step()` returns, and the next `step()` launches the step after it *before* reading the
first one's tokens back. The next step needs nothing from the host: each slot's last token is
already on the device, and who decodes next is known from lengths alone (a request that ends
by EOS or a stop is found one step late, and that step's token for it is dropped). So the
host's bookkeeping (appending tokens, stop checks, text, the next launch) runs while the GPU
works, instead of between its steps. A step that admits or prefills waits for the step in
flight first, as without overlap.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .graphs import DEFAULT_BUCKETS, DEFAULT_PREFILL_BUCKETS, DecodeGraphs, PrefillGraphs, greedy
from .model import MoeForward, experts_forward
from .scheduler import Request, Scheduler

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), with no int64 overflow: c is split in
    16-bit halves, so every product stays below 2^49 (signed overflow would be undefined)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Chris Wellons' lowbias32) on int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform numbers in (0, 1), [B, vocab]: entry (b, v) is a hash of (seeds[b], positions[b], v).

    A counter-based generator: no state, so a request's noise at a position is the same
    whichever batch it runs in, on any device."""
    row = hash32(seeds & _M32)
    row = hash32(row ^ ((seeds >> 32) & _M32))
    row = hash32(row ^ (positions & _M32))
    ids = torch.arange(vocab_size, device=seeds.device)
    bits = hash32(hash32(row[:, None] ^ ids[None, :]))
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 bits: exact in float32


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab], all on the device, one row per request.

    Rows with temperature 0 take the argmax. The others keep the `top_k` most likely tokens
    (0: all) and, of those, the smallest set whose probability reaches `top_p`, then draw
    from softmax(logits / temperature) over what is kept by the Gumbel-max trick:
    argmax(logits / T - log(-log(u))) with u = uniform_noise(seed, position).
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    values, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab)
    keep = torch.arange(vocab, device=logits.device)[None, :] < k[:, None]
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    keep &= probs.cumsum(-1) - probs < top_p[:, None]  # the most likely token is always kept
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, positions, vocab)))
    noisy = values.masked_fill(~keep, float("-inf")) + gumbel.gather(1, order)  # noise follows the token id
    drawn = order.gather(1, noisy.argmax(-1, keepdim=True))[:, 0]
    return torch.where(greedy, logits.argmax(-1), drawn)


@dataclass
class StreamEvent:
    """What one step produced for one request: its new token (None when only finishing,
    e.g. cancelled), the text that became safe to show, and the finish reason if it ended."""

    request: Request
    token: int | None
    text: str
    finish_reason: str | None


# Tokens per step by default. On a CPU a step's cost grows with its tokens, so small chunks
# keep decodes flowing (notebook 07). On a GPU a prefill step of two thousand tokens costs
# little more than one of 256 (it reads every expert once either way, and an eager step's
# launches cost the same: benchmarks/results/prefill_2026-11-29_h200.json, 56.7 ms eager at 512
# tokens, 59.4 ms at 2048). In the H200 serving run at 64 concurrent requests of 16-64-token
# prompts, time to first token p50 went 320 ms -> 33 ms (256 -> 2048, with the other changes
# of that run: benchmarks/results/serve_2026-11-29_h200.json, runs 1-4 against 5).
DEFAULT_TOKEN_BUDGET = {"cpu": 256, "cuda": 2048}


@dataclass
class _InFlight:
    """A decode step launched and not yet read back (overlap): who it decodes, the host buffer
    its new ids are being copied to, the event that says the copy is done (None on the CPU),
    when it was launched and how many requests were waiting then (for its `StepStats`)."""

    requests: list[Request]
    ids: torch.Tensor
    ready: torch.cuda.Event | None
    start: float
    waiting: int


@dataclass
class StepStats:
    """One step: when it ran, how many slots were busy, tokens prefilled and decoded."""

    start: float
    end: float
    slots_busy: int
    prefill_tokens: int
    decode_tokens: int
    waiting: int


class IncrementalDetokenizer:
    """Incremental text of a growing list of token ids: text is released only once it does not
    end in U+FFFD, so a multi-byte character split across tokens is never shown broken."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prefix, self.read = tokenizer, 0, 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int], final: bool = False) -> str:
        """`ids`: every token id so far. Returns the text that became safe to show (with
        `final`, also an unfinished character, as U+FFFD)."""
        before = self._decode(ids[self.prefix:self.read])
        after = self._decode(ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before):]
        return ""


class Engine:
    """Serve many requests over `num_slots` KV-cache slots of the HF model `model` (as returned
    by `moelab.load`), in the model's dtype and on its device.

    tokenizer: needed for text streaming and stop strings (token ids work without it).
    policy: "continuous" or "static" (see moelab.scheduler). token_budget: tokens per step
    (decodes plus prompt chunks), default `DEFAULT_TOKEN_BUDGET` for the model's device.
    experts_fn, route_backend: passed to `MoeForward`.

    cuda_graphs: how pure decode steps run (notebooks/08_cuda_graphs_and_decode_attention):
    "auto" (CUDA graphs when the model is on CUDA, eager otherwise), True (graphs; needs
    CUDA), False (eager), or "static" (the graphs' padded static-buffer step run without
    capture, on any device: for checking the padding on the CPU). With graphs, the cache
    holds one more slot than `num_slots`, the graphs' scratch slot (the last one, always
    allocated, never given to a request). graph_buckets: the batch sizes captured (default
    1, 2, 4, ... below num_slots, and num_slots itself); a live batch runs in the smallest
    bucket that holds it. `graphs` is the `DecodeGraphs` (None when eager). With graphs, a
    step that is one whole prompt and nothing else (every prefill at one request at a time)
    replays `prefill_graphs`, a `moelab.graphs.PrefillGraphs` graph of its length bucket
    (16 ... 2048 tokens, at most token_budget), captured at the first prompt of that bucket.

    overlap: "auto" (on when the model is on CUDA), True or False. With overlap a pure decode
    step's tokens are reported by the *next* `step()` call, which first launches the step after
    it (see the module docstring); `idle` stays False until the last step in flight is read.
    """

    def __init__(self, model, num_slots: int, max_seq_len: int, tokenizer=None, policy: str = "continuous",
                 token_budget: int | None = None, experts_fn=experts_forward, route_backend: str = "auto",
                 cuda_graphs="auto", graph_buckets: Sequence[int] | None = None, overlap="auto"):
        if cuda_graphs not in ("auto", "static") and not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be 'auto', True, False or 'static', got {cuda_graphs!r}")
        if overlap != "auto" and not isinstance(overlap, bool):
            raise ValueError(f"overlap must be 'auto', True or False, got {overlap!r}")
        self.forward = MoeForward(model, experts_fn=experts_fn, route_backend=route_backend)
        on_cuda = next(model.parameters()).device.type == "cuda"
        if token_budget is None:
            token_budget = max(DEFAULT_TOKEN_BUDGET["cuda" if on_cuda else "cpu"], num_slots + 1)
        self.scheduler = Scheduler(num_slots, policy, token_budget)
        if cuda_graphs is True and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on CUDA; "
                             "use 'static' to check the padded step on the CPU")
        mode = {"auto": "graph" if on_cuda else None, True: "graph", False: None, "static": "static"}[cuda_graphs]
        if graph_buckets is None:
            graph_buckets = [b for b in DEFAULT_BUCKETS if b < num_slots] + [num_slots]
        elif mode is not None and max(graph_buckets, default=0) < num_slots:
            raise ValueError(f"graph_buckets {list(graph_buckets)} must include a bucket of at least "
                             f"num_slots ({num_slots}), so every decode batch has a graph")
        # With graphs, one slot more than num_slots: the padding scratch slot.
        self.cache = self.forward.new_cache(num_slots + (mode is not None), max_seq_len)
        self.tokenizer = tokenizer
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.vocab_size = model.config.vocab_size
        eos = model.config.eos_token_id
        self.eos_ids = frozenset(() if eos is None else (eos,) if isinstance(eos, int) else eos)
        device = self.cache.device
        # Per-slot state the decode step reads on the device, written when a request is admitted.
        self._last_token = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._temperature = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._seed = torch.zeros(num_slots, dtype=torch.int64, device=device)
        if mode is not None:  # the scratch slot's row: greedy (temperature 0), never written
            for name in ("_last_token", "_temperature", "_top_k", "_top_p", "_seed"):
                row = getattr(self, name)
                setattr(self, name, torch.cat([row, row[:1]]))
        # Takes the cache's highest free slot, num_slots, as its scratch slot: the graphs run
        # the Engine's two samplers, so a greedy-only batch never pays for the sampling sort.
        self.graphs = None if mode is None else DecodeGraphs(
            self.forward, self.cache, graph_buckets, mode=mode,
            sample_fn={"greedy": greedy, "sample": self._per_slot_sampler()})
        # Whole-prompt prefills of one request replay a graph per length bucket (notebook 08).
        prefill_buckets = [b for b in DEFAULT_PREFILL_BUCKETS if b <= min(token_budget, max_seq_len)]
        self.prefill_graphs = None if mode is None or not prefill_buckets else PrefillGraphs(
            self.forward, self.cache, prefill_buckets, mode=mode)
        self.overlap = on_cuda if overlap == "auto" else overlap
        # Two host buffers (pinned on CUDA, so the copy is asynchronous) and their events: the
        # step in flight reads back into one while the step launched after it copies into the other.
        self._host_ids = [torch.zeros(num_slots, dtype=torch.int64, pin_memory=on_cuda) for _ in range(2)]
        self._copied = [torch.cuda.Event() for _ in range(2)] if on_cuda else [None, None]
        self._flip = 0
        self._inflight: _InFlight | None = None
        self._slot_ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._sent: dict[int, int] = {}  # characters of text already streamed, per request
        self._pending: list[StreamEvent] = []
        self.requests: dict[int, Request] = {}
        self.finished: list[Request] = []
        self.steps: list[StepStats] = []

    # ---- submitting -------------------------------------------------------------------

    def make_request(self, prompt, max_new_tokens: int, stop_ids: Sequence[int] = (),
                     stop_strings: Sequence[str] = (), temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False) -> Request:
        """A validated `Request` (not yet queued): bad input raises a ValueError naming it."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"a prompt must be a list of token ids (ints), got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty: a request needs at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{len(prompt) + max_new_tokens} exceeds max_seq_len {self.max_seq_len}"
            )
        bad = [t for t in list(prompt) + list(stop_ids)
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if isinstance(stop_strings, str):
            raise ValueError("stop_strings must be a sequence of strings, not one string")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need text: create the Engine with tokenizer=...")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no cut), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        return Request(prompt=list(prompt), max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                       stop_strings=tuple(stop_strings), temperature=float(temperature), top_k=top_k,
                       top_p=float(top_p), seed=seed, ignore_eos=ignore_eos)

    def submit(self, prompt, max_new_tokens: int, arrival_time: float | None = None, **sampling) -> Request:
        """Queue one request (validated first: bad input raises and queues nothing). Keyword
        arguments are `make_request`'s. Returns the live `Request`."""
        request = self.make_request(prompt, max_new_tokens, **sampling)
        self.add(request, arrival_time)
        return request

    def add(self, request: Request, arrival_time: float | None = None) -> None:
        """Queue a request built by `make_request`."""
        request.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.requests[request.id] = request
        self.scheduler.add(request)

    def cancel(self, request: Request | int) -> bool:
        """Stop a waiting or running request now; its slot is free for the next step. False
        if it had already finished."""
        if isinstance(request, int):
            if request not in self.requests:
                raise ValueError(f"no request with id {request} was submitted to this engine")
            request = self.requests[request]
        if request.finished:
            return False
        self.scheduler.cancel_waiting(request)  # a running request leaves in _finish
        self._finish(request, "cancelled", time.perf_counter())
        self._pending.append(StreamEvent(request, None, self._flush_text(request), "cancelled"))
        return True

    # ---- running ----------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing waits, runs, or is still in flight."""
        return self.scheduler.idle and self._inflight is None

    def step(self) -> list[StreamEvent]:
        """Run one scheduler step; returns what it produced, one event per request that got a
        token or finished. With overlap, a pure decode step's tokens come with the next call."""
        events, self._pending = self._pending, []
        start = time.perf_counter()
        if self._inflight is not None:
            # Launch the next decode step before reading the one in flight, when nothing needs
            # the scheduler first (no admission, no prompt chunk): the GPU never waits for us.
            following = self._launch_following(start)
            events += self._read_back(self._inflight)
            self._inflight = following
            if following is not None:
                return events
        plan = self.scheduler.schedule(self.cache.free_slots)
        for request in plan.admitted:
            self._admit(request, start)
        if plan.prefill:
            got, logits = self._prefill(plan)
            new_ids = None
            if got:
                slots = self._slots_tensor(tuple(r.slot for r in got))
                new_ids = self._sample(logits, slots, all(r.greedy for r in got))
                self._last_token[slots] = new_ids
        elif plan.decode:
            got = plan.decode
            slots = self._slots_tensor(tuple(r.slot for r in got))
            new_ids = self.decode_step(slots, greedy_only=all(r.greedy for r in got))
            if self.overlap:  # read back by the next call, after it launches the step after this one
                self._inflight = self._in_flight(got, new_ids, start)
                return events
        else:
            got, new_ids = [], None
        tokens = new_ids.tolist() if got else []  # the one copy to the host per step
        now = time.perf_counter()
        for request, token in zip(got, tokens):
            events.append(self._append(request, token, now))
        self.steps.append(StepStats(start, now, len(plan.decode) + len(plan.prefill),
                                    sum(n for _, _, n in plan.prefill), len(plan.decode), len(self.scheduler.waiting)))
        return events

    def _launch_following(self, start: float) -> _InFlight | None:
        """With a decode step in flight, launch the one after it if the schedule is already
        known: every request in flight that still wants a token after this one decodes again,
        and no waiting request could take a slot (a request ending by length frees one). None
        if the next step needs the scheduler (it then runs after the read-back). No running
        request is mid-prompt here: a step goes in flight only when its plan has no prompt
        chunk, and none is admitted until the scheduler runs again."""
        following = [r for r in self._inflight.requests if not r.finished and len(r.output) + 1 < r.max_new_tokens]
        if not following:
            return None
        slot_frees = self.cache.free_slots or len(following) < len(self.scheduler.running)
        if self.scheduler.waiting and slot_frees and self.scheduler.policy == "continuous":
            return None
        slots = self._slots_tensor(tuple(r.slot for r in following))
        new_ids = self.decode_step(slots, greedy_only=all(r.greedy for r in following))
        return self._in_flight(following, new_ids, start)

    def _in_flight(self, requests: list[Request], new_ids: torch.Tensor, start: float) -> _InFlight:
        """Start copying a launched step's new ids to a host buffer (asynchronously on CUDA: the
        copy is queued behind the step and before the next one, which may overwrite them)."""
        ids = self._host_ids[self._flip][: len(requests)]
        ids.copy_(new_ids, non_blocking=True)
        ready = self._copied[self._flip]
        if ready is not None:
            ready.record()
        self._flip ^= 1
        return _InFlight(requests, ids, ready, start, len(self.scheduler.waiting))

    def _read_back(self, inflight: _InFlight) -> list[StreamEvent]:
        """Wait for a step in flight and append its tokens; a request that finished meanwhile
        (EOS or a stop found one step late, or cancelled) drops its token."""
        if inflight.ready is not None:
            inflight.ready.synchronize()
        tokens = inflight.ids.tolist()
        now = time.perf_counter()
        events = [self._append(r, t, now) for r, t in zip(inflight.requests, tokens) if not r.finished]
        n = len(inflight.requests)
        self.steps.append(StepStats(inflight.start, now, n, 0, n, inflight.waiting))
        return events

    def _prefill(self, plan) -> tuple[list[Request], torch.Tensor]:
        """Run the step's prompt chunks; returns the requests whose prompt is now complete and
        their last prompt position's logits, one row each, in that order."""
        if self._graphable_prefill(plan):
            # One whole prompt and nothing else: replay its length bucket's prefill graph.
            request = plan.prefill[0][0]
            request.prefilled = len(request.prompt)
            return [request], self.prefill_graphs.prefill(request.prompt, request.slot)
        # A mixed step: prompt chunks and the decoding requests' last tokens (chunks of one at
        # their current length) share one forward pass.
        parts = [(r, r.prompt[s:s + n], s) for r, s, n in plan.prefill]
        parts += [(r, r.output[-1:], len(r.prompt) + len(r.output) - 1) for r in plan.decode]
        logits = self.forward.prefill(self.cache, [c for _, c, _ in parts], [r.slot for r, _, _ in parts],
                                      offsets=[o for _, _, o in parts])
        for r, s, n in plan.prefill:
            r.prefilled = s + n
        rows = [i for i, (r, c, o) in enumerate(parts) if o + len(c) >= len(r.prompt)]
        return [parts[i][0] for i in rows], logits[torch.tensor(rows, dtype=torch.long, device=self.cache.device)]

    def _graphable_prefill(self, plan) -> bool:
        """Whether this step is one whole prompt from position 0 with no decodes beside it (at
        one request at a time, every prefill): `prefill_graphs` can run it."""
        if self.prefill_graphs is None or plan.decode or len(plan.prefill) != 1:
            return False
        request, start, count = plan.prefill[0]
        return start == 0 and count == len(request.prompt) and self.prefill_graphs.fits(count)

    def decode_step(self, slots: torch.Tensor, greedy_only: bool = True) -> torch.Tensor:
        """One batched decode step for the requests in `slots` (int64 [B] on the device):
        feeds each slot's last token, samples the next, returns its ids [B] on the device
        (with graphs, a view of the graph's output, valid until the next step). No host sync
        inside: with `graphs`, it replays the CUDA graph of its batch bucket (notebook 08)."""
        if self.graphs is not None:
            next_ids = self.graphs.step(self._last_token[slots], slots, "greedy" if greedy_only else "sample")
        else:
            logits = self.forward.decode(self.cache, self._last_token[slots], slots, check=False)
            next_ids = self._sample(logits, slots, greedy_only)
        self._last_token[slots] = next_ids
        return next_ids

    def _sample(self, logits, slots, greedy_only):
        if greedy_only:  # known on the host from the requests' parameters
            return logits.argmax(-1)
        return self._per_slot_sampler()(logits, slots)

    def _per_slot_sampler(self):
        """sample_fn(logits, slots) reading each slot's sampling parameters from the per-slot
        device tensors (fixed addresses, so a graph can capture it). It closes over the
        tensors, not the Engine, so the graphs keep no reference cycle to the Engine."""
        temperature, top_k, top_p, seed, lengths = (self._temperature, self._top_k, self._top_p, self._seed,
                                                    self.cache.lengths)

        def sample_slots(logits, slots):
            # The new token's position is the slot's length after the forward pass.
            return sample(logits, temperature[slots], top_k[slots], top_p[slots], seed[slots], lengths[slots])

        return sample_slots

    def stream(self) -> Iterator[StreamEvent]:
        """Step until idle, yielding every event as it happens."""
        while not self.idle or self._pending:
            yield from self.step()

    def run_until_idle(self) -> list[Request]:
        """Step until nothing waits or runs; returns the requests finished meanwhile."""
        count = len(self.finished)
        for _ in self.stream():
            pass
        return self.finished[count:]

    def generate(self, prompts: Sequence, max_new_tokens: int, **sampling) -> list[list[int]]:
        """The new token ids of each prompt, in prompt order (greedy unless sampling is asked
        for); more prompts than slots simply queue. Every prompt is validated before any runs."""
        requests = [self.make_request(p, max_new_tokens, **sampling) for p in prompts]
        for request in requests:
            self.add(request)
        while not all(r.finished for r in requests):
            self.step()
        return [r.output for r in requests]

    # ---- bookkeeping ------------------------------------------------------------------

    def _slots_tensor(self, slots: tuple[int, ...]) -> torch.Tensor:
        """The device tensor of a set of slot ids, built once per distinct set."""
        if slots not in self._slot_ids:
            if len(self._slot_ids) > 4096:
                self._slot_ids.clear()
            self._slot_ids[slots] = torch.tensor(slots, dtype=torch.int64, device=self.cache.device)
        return self._slot_ids[slots]

    def _admit(self, request: Request, now: float) -> None:
        slot = self.cache.allocate(len(request.prompt) + request.max_new_tokens)
        assert slot == request.slot, (slot, request.slot)  # both take the lowest free slot
        request.admit_time = now
        if not request.greedy:
            self._temperature[slot] = request.temperature
            self._top_k[slot] = request.top_k
            self._top_p[slot] = request.top_p
            self._seed[slot] = request.seed
        else:
            self._temperature[slot] = 0.0
        if self.tokenizer is not None:
            self._detok[request.id] = IncrementalDetokenizer(self.tokenizer)
            self._sent[request.id] = 0

    def _append(self, request: Request, token: int, now: float) -> StreamEvent:
        request.output.append(token)
        request.token_times.append(now)
        reason = None
        if token in self.eos_ids and not request.ignore_eos:
            reason = "eos"
        elif token in request.stop_ids:
            reason = "stop_id"
        if self.tokenizer is not None:
            seen = len(request.text)
            request.text += self._detok[request.id].add(request.output)
            hits = [at for stop in request.stop_strings
                    if (at := request.text.find(stop, max(0, seen - len(stop) + 1))) >= 0]
            if hits and reason is None:
                request.text, reason = request.text[:min(hits)], "stop_string"
        if reason is None and len(request.output) >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._finish(request, reason, now)
            return StreamEvent(request, token, self._flush_text(request), reason)
        return StreamEvent(request, token, self._stream_text(request), None)

    def _stream_text(self, request: Request) -> str:
        """Text safe to show while running: hold back what could still become a stop string."""
        if self.tokenizer is None:
            return ""
        hold = max((len(s) for s in request.stop_strings), default=1) - 1
        upto = max(self._sent[request.id], len(request.text) - hold)
        text = request.text[self._sent[request.id]:upto]
        self._sent[request.id] = upto
        return text

    def _flush_text(self, request: Request) -> str:
        if self.tokenizer is None or request.id not in self._sent:
            return ""
        if request.finish_reason != "stop_string":  # bytes of an unfinished character, as U+FFFD
            request.text += self._detok[request.id].add(request.output, final=True)
        text = request.text[self._sent.pop(request.id):]
        del self._detok[request.id]
        return text

    def _finish(self, request: Request, reason: str, now: float) -> None:
        request.finish_reason, request.finish_time = reason, now
        if request in self.scheduler.running:
            self.scheduler.retire(request)
            self.cache.free(request.slot)
        self.finished.append(request)


def summarize(requests: Sequence[Request], seconds: float) -> dict:
    """Throughput and latency of finished requests over a run of `seconds`: output tokens/s,
    time to first token and inter-token latency p50 / p99 in milliseconds."""
    tokens = sum(len(r.output) for r in requests)
    ttft = [r.ttft * 1e3 for r in requests if r.ttft is not None]
    itl = [x * 1e3 for r in requests for x in r.itls]
    return {"requests": len(requests), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
