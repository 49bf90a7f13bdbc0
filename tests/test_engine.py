"""moelab.Engine end to end on the trained `tiny` (float32): greedy tokens equal HF generate
for each prompt alone, online submission, cancellation, seeded sampling independent of the
batch, stop ids and strings, streaming text, bad input, a 1,000-request soak, and decode
steps through DecodeGraphs (padded static step on the CPU, CUDA graphs on the GPU) giving
the eager Engine's tokens."""

import random
import weakref

import pytest
import torch

import moelab
from moelab.engine import Engine, IncrementalDetokenizer, percentile, sample, uniform_noise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def hf(model):
    """HF generate, greedy, one prompt alone (stopping at EOS as generate does), memoised."""
    memo = {}

    def reference(prompt, new, stop_at_eos=True):
        key = (tuple(prompt), new, stop_at_eos)
        if key not in memo:
            eos = {} if stop_at_eos else {"eos_token_id": None}
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=256, **eos)
            memo[key] = out[0, len(prompt):].tolist()
        return memo[key]

    return reference


def random_prompts(n, lo, hi, seed):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def code_prompts(tok):
    texts = ["def fib(n):", "import os\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):",
             "# Return the sum\ndef total(xs):\n    return", "while True:\n    ", "x = [", "print("]
    return [tok(t).input_ids for t in texts]


@pytest.mark.parametrize("overlap", [False, True])
def test_32_mixed_requests_through_3_slots_equal_hf_generate(model, hf, tok, overlap):
    rng = random.Random(0)
    prompts = random_prompts(24, 1, 70, seed=1) + code_prompts(tok)
    news = [1, 1, 2] + [rng.randint(1, 24) for _ in range(len(prompts) - 3)]
    rng.shuffle(news)
    # A small budget chunks the longer prompts over several steps, beside running decodes.
    # With overlap, requests ending at EOS are found a step late (their extra token dropped).
    engine = Engine(model, num_slots=3, max_seq_len=100, token_budget=20, overlap=overlap)
    requests = [engine.submit(p, n) for p, n in zip(prompts, news)]
    finished = engine.run_until_idle()
    assert sorted(r.id for r in finished) == sorted(r.id for r in requests)  # each exactly once
    for r, p, n in zip(requests, prompts, news):
        assert r.output == hf(p, n), f"prompt of {len(p)} tokens, max_new_tokens {n}"
        assert r.finish_reason == ("eos" if r.output[-1] == 256 else "length")
        assert len(r.token_times) == len(r.output) and r.ttft > 0
    assert engine.cache.free_slots == [0, 1, 2] and engine.idle
    chunked = [s for s in engine.steps if s.prefill_tokens and s.decode_tokens]
    assert chunked and max(s.prefill_tokens + s.decode_tokens for s in engine.steps) <= 20
    assert max(s.slots_busy for s in engine.steps) == 3
    # generate() is the same engine: new ids in prompt order.
    assert engine.generate(prompts[:5], max_new_tokens=6) == [hf(p, 6) for p in prompts[:5]]


def test_static_policy_gives_the_same_tokens_and_waits_for_the_whole_batch(model, hf):
    prompts = random_prompts(7, 2, 30, seed=2)
    news = [9, 2, 5, 3, 8, 1, 4]
    engine = Engine(model, num_slots=3, max_seq_len=64, policy="static")
    requests = [engine.submit(p, n, ignore_eos=True) for p, n in zip(prompts, news)]
    engine.run_until_idle()
    for r, p, n in zip(requests, prompts, news):
        assert r.output == hf(p, n, stop_at_eos=False)
    for batch, nxt in ((requests[0:3], requests[3:6]), (requests[3:6], requests[6:])):
        assert min(r.admit_time for r in nxt) >= max(r.finish_time for r in batch)


def test_requests_submitted_while_others_run_are_served(model, hf):
    prompts = random_prompts(6, 3, 20, seed=3)
    engine = Engine(model, num_slots=3, max_seq_len=64)
    first = [engine.submit(p, 12) for p in prompts[:2]]
    for _ in range(4):
        engine.step()
    assert all(len(r.output) == 4 for r in first)
    later = [engine.submit(p, 7) for p in prompts[2:]]
    engine.step()
    assert later[0].slot == 2 and later[1].slot is None  # one free slot, the rest wait
    engine.run_until_idle()
    for r, p in zip(first + later, prompts):
        assert r.output == hf(p, r.max_new_tokens)
    assert engine.cache.free_slots == [0, 1, 2]


def test_cancel_frees_the_slot_and_leaves_the_others_unchanged(model, hf):
    prompts = random_prompts(5, 3, 20, seed=4)
    engine = Engine(model, num_slots=3, max_seq_len=64)
    requests = [engine.submit(p, 10, ignore_eos=True) for p in prompts]
    for _ in range(3):
        engine.step()
    running, waiting = requests[1], requests[4]
    assert running.slot == 1 and waiting.slot is None
    assert engine.cancel(running) and engine.cancel(waiting.id)
    assert 1 in engine.cache.free_slots and running.finish_reason == waiting.finish_reason == "cancelled"
    events = engine.step()  # the cancellations are reported, and slot 1 is taken at once
    assert {e.request.id for e in events if e.finish_reason == "cancelled"} == {running.id, waiting.id}
    assert requests[3].slot == 1
    engine.run_until_idle()
    assert len(running.output) == 3 and waiting.output == []
    assert not engine.cancel(running)  # already finished
    with pytest.raises(ValueError, match="no request with id"):
        engine.cancel(10**9)
    for i in (0, 2, 3):
        assert requests[i].output == hf(prompts[i], 10, stop_at_eos=False)
    assert engine.cache.free_slots == [0, 1, 2]


def test_seeded_sampling_does_not_depend_on_the_batch(model, tok):
    prompt = tok("def parse(line):").input_ids
    params = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234, ignore_eos=True)
    alone = Engine(model, num_slots=4, max_seq_len=96)
    a = alone.submit(prompt, 30, **params)
    alone.run_until_idle()

    busy = Engine(model, num_slots=4, max_seq_len=96)
    others = random_prompts(5, 1, 40, seed=5)
    busy.submit(others[0], 12)  # slot 0, greedy
    busy.submit(others[1], 25, temperature=1.3, seed=99)  # slot 1, sampled with another seed
    busy.step()
    b = busy.submit(prompt, 30, **params)  # joins later, in slot 2, next to other samplers
    busy.submit(others[2], 30, temperature=0.7, top_p=0.5, seed=1234 + 1)
    for p in others[3:]:
        busy.submit(p, 5, temperature=1.0, seed=3)
    busy.run_until_idle()
    assert b.slot == 2 and b.output == a.output
    c = busy.submit(prompt, 30, **{**params, "seed": 1235})
    busy.run_until_idle()
    assert c.output != a.output  # another seed, another draw
    assert len(set(a.output)) > 5  # sampling, not a repeated token


def test_sample_follows_the_distribution_and_its_cuts():
    vocab, rows = 8, 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, 0.2]).expand(rows, vocab)
    seeds = torch.full((rows,), 42, dtype=torch.int64)
    positions = torch.arange(rows)

    def draw(temperature=1.0, top_k=0, top_p=1.0):
        ids = sample(logits, torch.full((rows,), temperature), torch.full((rows,), top_k, dtype=torch.int64),
                     torch.full((rows,), top_p), seeds, positions)
        return torch.bincount(ids, minlength=vocab).float() / rows

    expect = torch.softmax(logits[0] / 0.7, -1)
    torch.testing.assert_close(draw(temperature=0.7), expect, rtol=0, atol=0.012)
    top3 = torch.softmax(logits[0], -1) * (logits[0] >= 1.0)
    torch.testing.assert_close(draw(top_k=3), top3 / top3.sum(), rtol=0, atol=0.012)
    probs = torch.softmax(logits[0], -1)  # sorted: 3.0 (0.54), 2.0 (0.20), 1.0 (0.07), ...
    nucleus = probs * (logits[0] >= 2.0)  # 0.54 + 0.20 reaches 0.7
    torch.testing.assert_close(draw(top_p=0.7), nucleus / nucleus.sum(), rtol=0, atol=0.012)
    assert draw(temperature=0.0)[6] == 1.0 and draw(top_k=1)[6] == 1.0
    # The noise is a pure function of (seed, position, token id): same inputs, same numbers.
    u = uniform_noise(torch.tensor([5, 5, 6]), torch.tensor([9, 9, 9]), 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_ids_and_stop_strings_end_at_the_right_place(model, tok, hf, overlap):
    prompt = tok("def fib(n):").input_ids
    ref = hf(prompt, 40)
    ref_text = tok.decode(ref)
    stop = ref_text[12:15]
    assert stop.strip() and 256 not in ref
    first = ref_text.index(stop)
    # The token that completes the first occurrence of the stop string ends the request.
    end = next(i for i in range(1, len(ref) + 1) if stop in tok.decode(ref[:i]))
    engine = Engine(model, num_slots=2, max_seq_len=96, tokenizer=tok, overlap=overlap)
    r = engine.submit(prompt, 40, stop_strings=["never appears", stop])
    s = engine.submit(prompt, 40, stop_ids=[ref[7]])
    streamed = {r.id: "", s.id: ""}
    for event in engine.stream():
        streamed[event.request.id] += event.text
    assert r.finish_reason == "stop_string" and r.output == ref[:end] and r.text == ref_text[:first]
    assert streamed[r.id] == r.text  # the stop string was held back, never streamed
    assert s.finish_reason == "stop_id" and s.output == ref[: ref.index(ref[7]) + 1]
    assert streamed[s.id] == s.text == tok.decode(s.output)


def test_streaming_never_shows_a_broken_character(tok):
    text = "a€b ñ😀 z£"
    ids = list(text.encode())
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[1:4] == ["", "", "€"]  # the euro sign's three bytes release it once
    cut = IncrementalDetokenizer(tok)
    partial = "".join(cut.add(ids[: i + 1]) for i in range(2)) + cut.add(ids[:2], final=True)
    assert partial == "a\ufffd"  # an unfinished character at the end comes out as U+FFFD


def test_bad_input_is_rejected_at_submission_without_disturbing_others(model, hf):
    prompts = random_prompts(3, 4, 12, seed=6)
    engine = Engine(model, num_slots=2, max_seq_len=32)
    good = [engine.submit(p, 8) for p in prompts]
    engine.step()
    state = (len(engine.scheduler.waiting), [r.slot for r in engine.scheduler.running], len(engine.requests))
    bad = [
        (([], 4), {}, "empty"),
        ((prompts[0], 30), {}, "exceeds max_seq_len 32"),
        (([1, 300], 4), {}, r"token ids must be in \[0, 257\)"),
        ((prompts[0], 0), {}, "max_new_tokens"),
        (("hello", 4), {}, "list of token ids"),
        ((prompts[0], 4), {"temperature": -1.0}, "temperature"),
        ((prompts[0], 4), {"top_p": 0.0}, "top_p"),
        ((prompts[0], 4), {"top_k": -2}, "top_k"),
        ((prompts[0], 4), {"stop_strings": ["x"]}, "tokenizer"),
        ((prompts[0], 4), {"seed": -1}, "seed"),
        ((prompts[0], 4), {"stop_ids": ["a"]}, "token ids"),
    ]
    for args, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.submit(*args, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([prompts[0], []], 4)  # validated before any of them is queued
    assert (len(engine.scheduler.waiting), [r.slot for r in engine.scheduler.running], len(engine.requests)) == state
    engine.run_until_idle()
    assert [r.output for r in good] == [hf(p, 8) for p in prompts]


@pytest.mark.parametrize("overlap", [False, True])
def test_soak_1000_requests_through_3_slots(model, hf, overlap):
    """Random lengths and arrival steps: every request finishes exactly once with the tokens
    HF generate gives for its prompt alone (references computed once per distinct prompt),
    with and without overlapped decode steps."""
    rng = random.Random(11)
    pool = random_prompts(40, 1, 12, seed=12)
    max_new = 5
    refs = [hf(p, max_new) for p in pool]
    engine = Engine(model, num_slots=3, max_seq_len=24, token_budget=8, overlap=overlap)
    arrivals = sorted(rng.randrange(1400) for _ in range(1000))
    submitted, step = [], 0
    while len(submitted) < 1000 or not engine.idle:
        while len(submitted) < 1000 and arrivals[len(submitted)] <= step:
            k = rng.randrange(len(pool))
            submitted.append((engine.submit(pool[k], rng.randint(1, max_new)), k))
        engine.step()
        step += 1
    done = [r.id for r in engine.finished]
    assert len(done) == 1000 == len(set(done))
    for r, k in submitted:
        expect = refs[k][: r.max_new_tokens]
        assert r.output == expect[: expect.index(256) + 1] if 256 in expect else r.output == expect
    assert engine.cache.free_slots == [0, 1, 2] and not engine.cache.used_slots and engine.idle


def test_overlap_reports_a_decode_step_with_the_next_call_and_launches_it_first(model, hf):
    """With overlap a pure decode step stays in flight: its tokens come with the next call,
    which has already launched the step after it; a step that must admit a request reads the
    step in flight back first."""
    prompts = random_prompts(3, 3, 20, seed=13)
    engine = Engine(model, num_slots=2, max_seq_len=64, overlap=True)
    assert engine.overlap and not Engine(model, num_slots=2, max_seq_len=64).overlap  # auto: off on the CPU
    a, b = engine.submit(prompts[0], 6, ignore_eos=True), engine.submit(prompts[1], 3, ignore_eos=True)
    launched = []
    decode_step = engine.decode_step
    engine.decode_step = lambda slots, greedy_only=True: launched.append(slots.tolist()) or decode_step(
        slots, greedy_only)
    events = engine.step()  # both prompts prefilled: their first tokens, read back at once
    assert [len(a.output), len(b.output)] == [1, 1] and len(events) == 2 and engine._inflight is None
    assert engine.step() == [] and launched == [[0, 1]]  # decode 1 in flight, nothing reported yet
    assert not engine.idle and engine._inflight is not None
    events = engine.step()  # decode 2 launched (b needs a third token), then decode 1 read back
    assert launched == [[0, 1], [0, 1]] and [e.request for e in events] == [a, b]
    assert [len(a.output), len(b.output)] == [2, 2]
    engine.step()  # b's last token is in flight: a decodes alone next
    assert launched[-1] == [0] and b.finished and len(a.output) == 3
    c = engine.submit(prompts[2], 2, ignore_eos=True)  # slot 1 is free: the next call admits c
    engine.step()  # reads the step in flight back (a's 4th token) before the scheduler admits c;
    # c's prompt and a's next token then share one forward pass, read back at once
    assert c.slot == 1 and len(c.output) == 1 and len(a.output) == 5 and engine._inflight is None
    engine.run_until_idle()
    assert engine.idle and engine.cache.free_slots == [0, 1]
    for r, p in zip((a, b, c), prompts):
        assert r.output == hf(p, r.max_new_tokens, stop_at_eos=False)


def test_overlap_cancel_drops_the_token_in_flight(model, hf):
    prompts = random_prompts(4, 3, 20, seed=14)
    engine = Engine(model, num_slots=3, max_seq_len=64, overlap=True)
    requests = [engine.submit(p, 10, ignore_eos=True) for p in prompts]
    for _ in range(3):  # prefill, decode 1 launched, decode 2 launched and decode 1 read back
        engine.step()
    victim = requests[1]
    assert len(victim.output) == 2 and engine._inflight is not None and victim in engine._inflight.requests
    assert engine.cancel(victim) and engine.cache.free_slots == [1]
    events = engine.step()  # the step in flight is read back without the victim's token; slot 1 is reused
    assert len(victim.output) == 2 and victim.finish_reason == "cancelled"
    assert [e.finish_reason for e in events if e.request is victim] == ["cancelled"]
    assert requests[3].slot == 1
    engine.run_until_idle()
    for i in (0, 2, 3):
        assert requests[i].output == hf(prompts[i], 10, stop_at_eos=False)
    assert engine.cache.free_slots == [0, 1, 2]
    with pytest.raises(ValueError, match="overlap must be"):
        Engine(model, num_slots=2, max_seq_len=32, overlap="yes")


def test_percentile_matches_numpy_linear():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    assert percentile(values, 50) == 3.5 and percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile(values, 99) == pytest.approx(9.75) and percentile([], 50) is None


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_and_its_decode_step_captures_in_a_graph(model):
    import copy

    prompts = random_prompts(6, 3, 30, seed=8)
    cpu = Engine(model, num_slots=3, max_seq_len=64).generate(prompts, 12)
    cuda_model = copy.deepcopy(model).to("cuda")
    engine = Engine(cuda_model, num_slots=3, max_seq_len=64)  # CUDA graphs and overlap by default on CUDA
    assert engine.graphs is not None and engine.graphs.captured and engine.overlap
    assert engine.generate(prompts, 12) == cpu
    # The eager decode step has no host sync either: capture it (a sync would raise), replay it.
    engine = Engine(cuda_model, num_slots=3, max_seq_len=64, cuda_graphs=False)
    assert engine.graphs is None
    for p in prompts[:3]:
        engine.submit(p, 20, temperature=0.8, seed=1)
    engine.step()
    slots = torch.tensor([0, 1, 2], device="cuda")
    lengths, last = engine.cache.lengths.clone(), engine._last_token.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = engine.decode_step(slots, greedy_only=False).clone()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    engine.cache.lengths.copy_(lengths)
    engine._last_token.copy_(last)
    with torch.cuda.graph(graph):
        out = engine.decode_step(slots, greedy_only=False)
    engine.cache.lengths.copy_(lengths)
    engine._last_token.copy_(last)
    graph.replay()
    assert torch.equal(out, eager)


def test_widgets_run_the_real_engine_and_draw_both_policies(model):
    from moelab import widgets

    params = dict(num_slots=2, rate=None, prompt_len=(2, 6), output_len=(1, 5), num_requests=7, seed=3)
    fig, (static, continuous) = widgets.compare_policies(model, **params)
    for run in (static, continuous):
        assert len(run["requests"]) == 7 and all(r.finish_reason == "length" for r in run["requests"])
        assert run["metrics"]["tokens"] == sum(len(r.output) for r in run["requests"])
        assert {r.slot for r in run["requests"]} == {0, 1}
    # The same workload, so the same greedy tokens whatever the policy.
    assert [r.output for r in static["requests"]] == [r.output for r in continuous["requests"]]
    first, second = static["requests"][:2], static["requests"][2:4]
    assert min(r.admit_time for r in second) >= max(r.finish_time for r in first)
    assert "continuous" in widgets.metrics_table([static, continuous])
    assert len(fig.axes) == 2
    pytest.importorskip("ipywidgets")
    assert widgets.serving_panel(model, run_now=False) is not None


def test_prefill_in_chunks_with_offsets_equals_one_prefill(model):
    """MoeForward.prefill(offsets=...) continues a slot at its current length (chunked prefill)."""
    from moelab.model import MoeForward

    fwd = MoeForward(model)
    prompt = random_prompts(1, 45, 45, seed=9)[0]
    other = random_prompts(1, 7, 7, seed=10)[0]
    whole_cache = fwd.new_cache(num_slots=2, max_seq_len=64)
    slot = whole_cache.allocate(50)
    whole = fwd.prefill(whole_cache, [prompt], [slot], all_logits=True)[0]
    cache = fwd.new_cache(num_slots=3, max_seq_len=64)
    a, b = cache.allocate(50), cache.allocate(50)
    got = fwd.prefill(cache, [prompt[:10], other], [a, b], all_logits=True)[0]
    # Second chunk beside a 1-token "decode" row of slot b, at their own current lengths.
    got2, _ = fwd.prefill(cache, [prompt[10:31], [5]], [a, b], all_logits=True, offsets=[10, 7])
    got3 = fwd.prefill(cache, [prompt[31:]], [a], all_logits=True, offsets=[31])[0]
    torch.testing.assert_close(torch.cat([got, got2, got3]), whole, rtol=0, atol=1e-4)  # logits ~10: fp32 rounding
    assert cache.lengths[[a, b]].tolist() == [45, 8]
    torch.testing.assert_close(cache.k[:, a, :, :45], whole_cache.k[:, slot, :, :45], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must equal the slots' current lengths"):
        fwd.prefill(cache, [[1, 2]], [a], offsets=[40])
    with pytest.raises(ValueError, match="does not fit slot"):
        fwd.prefill(cache, [[1] * 6], [a], offsets=[45])
    with pytest.raises(ValueError, match="offsets for"):
        fwd.prefill(cache, [[1]], [a], offsets=[45, 1])


# ------------------------------------------------------------------ decode through graphs

def scripted_run(model, cuda_graphs, graph_buckets=None, cancel_at=4, overlap=False):
    """Seven requests through 5 slots, greedy and seeded-sampled side by side, ignoring EOS;
    request 2 is cancelled after step `cancel_at`, two more arrive at step 6. Returns the
    outputs, the live batch of every pure decode step, whether it was padded (the graphs'
    scratch slot was decoded in), and the engine."""
    prompts = random_prompts(7, 3, 40, seed=21)
    news = [14, 6, 12, 9, 3, 8, 11]
    sampling = [{}, dict(temperature=0.8, seed=7), dict(temperature=1.1, top_k=30, seed=8), {},
                dict(temperature=0.6, top_p=0.8, seed=9), dict(temperature=0.9, top_k=5, top_p=0.9, seed=10), {}]
    engine = Engine(model, num_slots=5, max_seq_len=64, cuda_graphs=cuda_graphs, graph_buckets=graph_buckets,
                    overlap=overlap)
    requests = [engine.submit(p, n, ignore_eos=True, **kw) for p, n, kw in zip(prompts[:5], news, sampling)]
    decodes, step = [], 0
    while not engine.idle:
        if step == 6:
            requests += [engine.submit(p, n, ignore_eos=True, **kw)
                         for p, n, kw in zip(prompts[5:], news[5:], sampling[5:])]
        seen = len(engine.steps)
        engine.step()
        if step == cancel_at:
            assert engine.cancel(requests[2])
        for stats in engine.steps[seen:]:  # one per call; with overlap none at a launch, one at a read-back
            if stats.decode_tokens and not stats.prefill_tokens:
                # (with overlap: whether the step launched after it was padded)
                padded = engine.graphs is not None and int(engine.cache.lengths[engine.graphs.scratch_slot]) == 1
                decodes.append((stats.decode_tokens, padded))
        step += 1
    assert engine.cache.free_slots == [0, 1, 2, 3, 4] and engine.idle
    return [r.output for r in requests], decodes, engine


def test_static_graph_steps_equal_eager_with_padded_batches_and_a_cancel(model):
    eager, eager_decodes, eager_engine = scripted_run(model, cuda_graphs=False)
    got, decodes, engine = scripted_run(model, cuda_graphs="static")
    assert eager_engine.graphs is None and eager_engine.cache.num_slots == 5
    graphs = engine.graphs
    assert graphs.mode == "static" and graphs.buckets == [1, 2, 4, 5]
    # The scratch slot is the cache's extra last slot, always held, never a request's.
    assert engine.num_slots == 5 and engine.cache.num_slots == 6 and graphs.scratch_slot == 5
    assert engine.cache.used_slots == [5] and all(r.slot != 5 for r in engine.requests.values())
    assert got == eager  # token for token, greedy and seeded sampling
    assert [n for n, _ in decodes] == [n for n, _ in eager_decodes]
    # Live batches of 3 ran padded in bucket 4; full buckets (5, 4, 1) ran unpadded.
    assert {n for n, padded in decodes if padded} == {3}
    assert {n for n, padded in decodes if not padded} == {1, 4, 5}
    requests = list(engine.requests.values())  # in submission order
    assert [r.finish_reason for r in requests] == ["length"] * 2 + ["cancelled"] + ["length"] * 4
    assert [len(o) for o in got] == [14, 6, 5, 9, 3, 8, 11]  # the cancelled one stopped at 5
    assert sum(len(set(o)) for o in got) > 30  # tokens move, so equal outputs mean something
    gone = weakref.ref(engine)
    del engine, graphs
    assert gone() is None  # the graphs' sampler holds no reference cycle back to the Engine


def same_except_cancelled(got, reference):
    """scripted_run's outputs against a run without overlap: equal, but for request 2, cancelled
    after the same step: with overlap its token then in flight is dropped, so it stops one short."""
    assert [o for i, o in enumerate(got) if i != 2] == [o for i, o in enumerate(reference) if i != 2]
    assert got[2] == reference[2][: len(got[2])] and len(got[2]) >= len(reference[2]) - 1


def test_static_graph_steps_with_overlap_equal_eager(model):
    eager = scripted_run(model, cuda_graphs=False)[0]
    got, decodes, engine = scripted_run(model, cuda_graphs="static", overlap=True)
    same_except_cancelled(got, eager)
    assert len(got[2]) == 4 and engine.overlap and any(p for _, p in decodes)


def test_static_graph_steps_with_one_big_bucket_pad_every_batch(model):
    eager = scripted_run(model, cuda_graphs=False)[0]
    got, decodes, engine = scripted_run(model, cuda_graphs="static", graph_buckets=(8,))
    assert got == eager
    assert all(padded for n, padded in decodes) and engine.graphs.bucket_for(1) == 8


def test_one_request_at_a_time_prefills_through_the_prefill_graphs(model, hf):
    """One slot: every prefill is one whole prompt alone, run by `prefill_graphs` (the padded
    static step on the CPU), tokens equal to HF generate; a prompt longer than the largest
    bucket (token budget 16 here) goes the chunked eager way and still matches."""
    prompts = random_prompts(5, 3, 30, seed=33)
    engine = Engine(model, num_slots=1, max_seq_len=64, cuda_graphs="static", token_budget=16)
    calls = []
    run_graph = engine.prefill_graphs.prefill
    engine.prefill_graphs.prefill = lambda prompt, slot: calls.append(len(prompt)) or run_graph(prompt, slot)
    outputs = engine.generate(prompts, 6)
    assert engine.prefill_graphs.buckets == [16]
    assert calls == [len(p) for p in prompts if len(p) <= 16] and len(calls) < len(prompts)
    assert outputs == [hf(p, 6) for p in prompts]
    assert engine.cache.used_slots == [1]  # the decode graphs' scratch slot only
    # Seeded sampling after a padded prefill: the first token is sampled at the prompt's length
    # (the slot's length the padded prefill set), so the draws equal the eager engine's.
    sampled = {}
    for graphs in ("static", False):
        eng = Engine(model, num_slots=1, max_seq_len=64, cuda_graphs=graphs, token_budget=16)
        reqs = [eng.submit(p, 6, temperature=0.9, top_k=20, seed=11 + i, ignore_eos=True)
                for i, p in enumerate(prompts[:3])]
        eng.run_until_idle()
        sampled[graphs] = [r.output for r in reqs]
    assert sampled["static"] == sampled[False] and len({t for o in sampled[False] for t in o}) > 3


def test_cuda_graphs_argument_is_checked(model):
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        Engine(model, num_slots=2, max_seq_len=32, cuda_graphs="yes")
    with pytest.raises(ValueError, match="graph_buckets"):
        Engine(model, num_slots=4, max_seq_len=32, cuda_graphs="static", graph_buckets=(1, 2))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on CUDA"):
            Engine(model, num_slots=2, max_seq_len=32, cuda_graphs=True)
        auto = Engine(model, num_slots=2, max_seq_len=32)
        assert auto.graphs is None and auto.cache.num_slots == 2  # eager on the CPU


@pytest.fixture(scope="module")
def cuda_model(model):
    import copy

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return copy.deepcopy(model).to("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("graph_buckets", [None, (8,)])
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_graph_engine_equals_eager_engine(cuda_model, graph_buckets, overlap):
    """Replayed CUDA graphs (padded buckets, a cancel mid-run, greedy and seeded sampling)
    give the eager Engine's tokens on the trained fp32 tiny, with and without overlap (which
    is on by default on CUDA)."""
    eager, eager_decodes, _ = scripted_run(cuda_model, cuda_graphs=False, overlap=False)
    got, decodes, engine = scripted_run(cuda_model, cuda_graphs=True, graph_buckets=graph_buckets,
                                        overlap=overlap)
    assert engine.graphs.captured and engine.graphs.mode == "graph"
    assert sorted(engine.graphs.capture_seconds) == engine.graphs.buckets
    if overlap:
        same_except_cancelled(got, eager)
        assert any(p for _, p in decodes)
    else:
        assert got == eager
        assert [n for n, _ in decodes] == [n for n, _ in eager_decodes] and any(p for _, p in decodes)


@pytest.mark.gpu
def test_gpu_graph_engine_bf16_is_close_to_eager():
    """bf16 (the trained tiny cast): a padded bucket may round a logit differently from the
    eager batch, so a near tie may flip; nearly every token must still agree."""
    model = moelab.load("tiny", device="cuda", dtype=torch.bfloat16)[0]
    eager = scripted_run(model, cuda_graphs=False, overlap=False)[0]
    got, decodes, engine = scripted_run(model, cuda_graphs=True, overlap=False)
    assert engine.graphs.captured and any(p for _, p in decodes)
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got, eager)]
    assert [len(x) for x in got] == [len(y) for y in eager]
    assert sum(prefix) >= 0.9 * sum(len(y) for y in eager), (prefix, [len(y) for y in eager])
