"""Requests, the waiting queue and the batching policies: who runs in the next step.

Built in notebooks/07_continuous_batching. The scheduler is host bookkeeping only: it never
touches a tensor. Each step it admits waiting requests into free slots (FIFO), then splits a
per-step token budget: one token for every running request that decodes, the rest for prompt
chunks of requests still being prefilled, oldest first. A long prompt is therefore fed over
several steps instead of stalling every running decode behind it.

Two policies:
- `continuous`: a waiting request takes any free slot at the next step;
- `static`: requests are admitted only when every slot is free, so a batch runs until its
  longest request ends (the baseline notebook 07 compares against).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("continuous", "static")
FINISH_REASONS = ("eos", "stop_id", "stop_string", "length", "cancelled")

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request: what to generate, how to sample, and what happened to it.

    temperature 0 is greedy; otherwise the next token is drawn from softmax(logits /
    temperature) cut to the `top_k` most likely tokens (0: no cut) and to the smallest set
    whose probability reaches `top_p`, with noise derived from (`seed`, position), so the
    draw never depends on the other requests in the batch. Token ids of a stop (EOS, a stop
    id) are part of `output`; a stop string ends the request on the token that completes it
    and is cut from `text`.
    """

    prompt: list[int]
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    # Filled in as the request runs (host side).
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    # Metrics, perf_counter seconds.
    arrival_time: float | None = None
    admit_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first new token, seconds."""
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: seconds between consecutive new tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class StepPlan:
    """What one step runs: prompt chunks `(request, start, length)` and the decoding requests."""

    prefill: list[tuple[Request, int, int]]
    decode: list[Request]
    admitted: list[Request]


class Scheduler:
    """The waiting queue and the running set of `num_slots` slots, under a policy.

    token_budget: the most tokens one step processes (decode tokens plus prompt-chunk
    tokens). It must exceed num_slots, so prefill always makes progress.
    """

    def __init__(self, num_slots: int, policy: str = "continuous", token_budget: int = 256):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= num_slots:
            raise ValueError(
                f"token_budget must be an int above num_slots ({num_slots}) so prefill always progresses, "
                f"got {token_budget!r}"
            )
        self.num_slots, self.policy, self.token_budget = num_slots, policy, token_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self, free_slots: list[int]) -> StepPlan:
        """Admit waiting requests into `free_slots` (assigning `request.slot`), then split the
        token budget between decodes and prompt chunks."""
        admitted = []
        if self.policy == "continuous" or not self.running:
            for slot in free_slots:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
                request.slot, request.prefilled = slot, 0
                self.running.append(request)
                admitted.append(request)
        decode = [r for r in self.running if r.prefilled == len(r.prompt)]
        budget = self.token_budget - len(decode)
        prefill = []
        for r in self.running:
            if budget == 0:
                break
            left = len(r.prompt) - r.prefilled
            if left:
                chunk = min(left, budget)
                prefill.append((r, r.prefilled, chunk))
                budget -= chunk
        return StepPlan(prefill=prefill, decode=decode, admitted=admitted)

    def retire(self, request: Request) -> None:
        """Drop a finished request from the running set (its slot is freed by the engine)."""
        self.running.remove(request)

    def cancel_waiting(self, request: Request) -> bool:
        """Remove a request that has not been admitted yet; False if it is not waiting."""
        try:
            self.waiting.remove(request)
        except ValueError:
            return False
        return True
