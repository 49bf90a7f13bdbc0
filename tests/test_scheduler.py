"""moelab.scheduler: admission, the per-step token budget, chunking and the two policies,
driven without a model (the scheduler is host bookkeeping only)."""

import random

import pytest

from moelab.scheduler import Request, Scheduler


def req(prompt_len, new=4):
    return Request(prompt=list(range(1, prompt_len + 1)), max_new_tokens=new)


def run_plan(plan):
    """What the engine does with a plan, minus the model: prompts advance by their chunks."""
    for r, start, n in plan.prefill:
        assert start == r.prefilled
        r.prefilled = start + n


def test_continuous_admits_fifo_into_free_slots_and_splits_the_budget():
    s = Scheduler(num_slots=3, token_budget=10)
    a, b, c, d = req(4), req(25), req(3), req(2)
    for r in (a, b, c, d):
        s.add(r)
    plan = s.schedule([0, 1, 2])
    assert plan.admitted == [a, b, c] and [r.slot for r in (a, b, c)] == [0, 1, 2]
    assert list(s.waiting) == [d]
    # No decodes yet: a gets its whole prompt, b the remaining 6 of the budget, c nothing.
    assert [(r, st, n) for r, st, n in plan.prefill] == [(a, 0, 4), (b, 0, 6)]
    assert plan.decode == []
    run_plan(plan)
    plan = s.schedule([])
    # a decodes (1 token), b continues its prompt with 9, c waits for budget.
    assert plan.decode == [a]
    assert [(r, st, n) for r, st, n in plan.prefill] == [(b, 6, 9)]
    run_plan(plan)
    plan = s.schedule([])
    assert plan.decode == [a] and [(r, st, n) for r, st, n in plan.prefill] == [(b, 15, 9)]
    run_plan(plan)
    plan = s.schedule([])
    assert [(r, st, n) for r, st, n in plan.prefill] == [(b, 24, 1), (c, 0, 3)]
    run_plan(plan)
    s.retire(a)  # a finished; its slot comes back
    plan = s.schedule([0])
    assert plan.admitted == [d] and d.slot == 0
    assert plan.decode == [b, c] and [(r, st, n) for r, st, n in plan.prefill] == [(d, 0, 2)]


def test_static_admits_only_when_every_slot_is_free():
    s = Scheduler(num_slots=2, policy="static", token_budget=64)
    rs = [req(3) for _ in range(5)]
    for r in rs:
        s.add(r)
    assert s.schedule([0, 1]).admitted == rs[:2]
    s.retire(rs[0])
    assert s.schedule([0]).admitted == []  # rs[1] still runs: the free slot stays idle
    s.retire(rs[1])
    assert s.schedule([0, 1]).admitted == rs[2:4]


def test_cancel_waiting():
    s = Scheduler(num_slots=1)
    a, b = req(2), req(2)
    s.add(a)
    s.add(b)
    assert s.cancel_waiting(b) and not s.cancel_waiting(b)
    assert list(s.waiting) == [a]


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_random_traffic_keeps_the_invariants(policy):
    """Random arrivals and lengths: the budget is never exceeded, a slot is never shared,
    admission is FIFO, prompts are fed exactly once in order, and everyone finishes."""
    rng = random.Random(7)
    num_slots, budget = 4, 12
    s = Scheduler(num_slots, policy, budget)
    pending = [req(rng.randint(1, 40), rng.randint(1, 9)) for _ in range(300)]
    admitted, finished, free = [], [], list(range(num_slots))
    generated = {}
    for step in range(100_000):
        while pending and rng.random() < 0.3:
            s.add(pending.pop(0))
        if s.idle and not pending:
            break
        plan = s.schedule(sorted(free))
        for r in plan.admitted:
            free.remove(r.slot)
        admitted += plan.admitted
        assert len(plan.decode) + sum(n for _, _, n in plan.prefill) <= budget
        slots = [r.slot for r in plan.decode] + [r.slot for r, _, _ in plan.prefill]
        assert len(slots) == len(set(slots)) and len(s.running) <= num_slots
        assert plan.prefill or plan.decode or not s.running  # progress whenever something runs
        run_plan(plan)
        done_prefill = [r for r, st, n in plan.prefill if st + n == len(r.prompt)]
        for r in plan.decode + done_prefill:
            generated[r.id] = generated.get(r.id, 0) + 1
            if generated[r.id] == r.max_new_tokens:
                s.retire(r)
                free.append(r.slot)
                finished.append(r)
    assert not pending and s.idle and sorted(free) == list(range(num_slots))
    assert len(finished) == 300 and len({r.id for r in finished}) == 300
    assert [r.id for r in admitted] == sorted(r.id for r in admitted)  # FIFO
    assert all(r.prefilled == len(r.prompt) for r in finished)


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        Scheduler(2, policy="fifo")
    with pytest.raises(ValueError, match="token_budget"):
        Scheduler(8, token_budget=8)
    with pytest.raises(ValueError, match="num_slots"):
        Scheduler(0)
