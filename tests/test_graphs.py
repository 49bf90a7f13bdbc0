"""DecodeGraphs: the same tokens as plain decode steps, padded rows never touch a live or an
idle slot, the scratch slot is the highest free one, samplers picked by name; CUDA-graph
replay (GPU) against eager over several buckets and padded batches."""

import warnings

import pytest
import torch

import moelab
from moelab.graphs import DecodeGraphs, PrefillGraphs, greedy
from moelab.model import MoeForward

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 9, 200, 7, 1], list(range(40, 71)), [42] * 17]
# Live rows per step: 3 (bucket 4, one padded row), 2 (bucket 2), 1 (bucket 2, one padded).
SCHEDULE = [3, 3, 2, 1, 1]


def setup(model):
    """A cache with an idle bystander slot (prefilled, never decoded), the three prompts, and
    one slot left free for DecodeGraphs' scratch slot."""
    fwd = MoeForward(model)
    cache = fwd.new_cache(num_slots=len(PROMPTS) + 2, max_seq_len=64)
    bystander = cache.allocate(20)
    slots = [cache.allocate(60) for _ in PROMPTS]
    first = fwd.prefill(cache, [[3, 1, 4, 1, 5, 9, 2, 6]] + PROMPTS, [bystander] + slots)[1:].argmax(-1)
    return fwd, cache, bystander, slots, first


def run(model, step_fn_factory, schedule=SCHEDULE):
    """Decode `schedule` with the step function; returns tokens per step, the cache, slots."""
    fwd, cache, bystander, slots, token = setup(model)
    before = (cache.k[:, bystander].clone(), cache.v[:, bystander].clone(), int(cache.lengths[bystander]))
    step, graphs = step_fn_factory(fwd, cache)
    tokens = [token.tolist()]
    for live in schedule:
        token = step(token[:live], torch.tensor(slots[:live], device=cache.device))
        tokens.append(token.tolist())
        if graphs is not None and graphs.scratch_slot is not None:
            assert int(cache.lengths[graphs.scratch_slot]) in (0, 1)  # 0 when no row was padded
    after = (cache.k[:, bystander], cache.v[:, bystander], int(cache.lengths[bystander]))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
    return tokens, cache, slots, graphs


def plain(fwd, cache):
    return (lambda tokens, slots: greedy(fwd.decode(cache, tokens, slots), slots)), None


def with_graphs(mode, buckets=(2, 4)):
    def factory(fwd, cache):
        graphs = DecodeGraphs(fwd, cache, buckets=buckets, mode=mode)
        return graphs.step, graphs
    return factory


def assert_same_run(got, ref, atol):
    tokens, cache, slots, _ = got
    ref_tokens, ref_cache, ref_slots, _ = ref
    assert tokens == ref_tokens
    assert slots == ref_slots
    assert cache.lengths[slots].tolist() == ref_cache.lengths[slots].tolist()
    n = int(ref_cache.lengths[slots].max())
    torch.testing.assert_close(cache.k[:, slots, :, :n], ref_cache.k[:, slots, :, :n], rtol=0, atol=atol)
    torch.testing.assert_close(cache.v[:, slots, :, :n], ref_cache.v[:, slots, :, :n], rtol=0, atol=atol)


def test_cpu_fallback_is_plain_decode(tiny):
    ref = run(tiny[0], plain)
    got = run(tiny[0], with_graphs("auto"))
    graphs = got[3]
    assert graphs.mode == "eager" and not graphs.captured and graphs.scratch_slot is None
    assert got[0] == ref[0]
    assert torch.equal(got[1].k, ref[1].k) and torch.equal(got[1].lengths, ref[1].lengths)
    assert len(set(map(tuple, ref[0]))) > 1  # the tokens move, so equal runs mean something


def test_padded_static_step_leaves_live_and_idle_slots_alone(tiny):
    ref = run(tiny[0], plain)
    got = run(tiny[0], with_graphs("static"))
    graphs, cache = got[3], got[1]
    assert graphs.scratch_slot == len(PROMPTS) + 1  # the one slot left free
    assert cache.reserved(graphs.scratch_slot) == cache.max_seq_len
    assert_same_run(got, ref, atol=1e-5)
    # Padded rows wrote only position 0 of the scratch slot.
    assert cache.k[:, graphs.scratch_slot, :, 1:].abs().max() == 0
    assert cache.k[:, graphs.scratch_slot, :, 0].abs().max() > 0
    graphs.release()
    assert graphs.scratch_slot is None and len(cache.free_slots) == 1


def test_scratch_slot_is_the_highest_free_slot_and_samplers_are_picked_by_name(tiny):
    fwd = MoeForward(tiny[0])
    cache = fwd.new_cache(num_slots=6, max_seq_len=64)
    slots = [cache.allocate(40), cache.allocate(40)]
    cache.free(slots.pop(0))  # slot 0 free again, below the live slot 1
    first = fwd.prefill(cache, [PROMPTS[1]], slots).argmax(-1)

    def worst(logits, slots):
        return logits.argmin(-1)

    graphs = DecodeGraphs(fwd, cache, buckets=(4,), mode="static", sample_fn={"best": greedy, "worst": worst})
    assert graphs.scratch_slot == 5 and cache.free_slots == [0, 2, 3, 4]
    assert cache.allocate(10) == 0  # the caller's slots still come lowest first
    lengths = cache.lengths.clone()
    best = graphs.step(first, slots)  # default: the first sampler
    cache.lengths.copy_(lengths)
    logits = fwd.decode(cache, first, slots)
    cache.lengths.copy_(lengths)
    low = graphs.step(first, slots, sampler="worst")
    assert best.tolist() == logits.argmax(-1).tolist() and low.tolist() == logits.argmin(-1).tolist()
    assert best.tolist() != low.tolist()
    with pytest.raises(ValueError, match="unknown sampler 'top'"):
        graphs.step(first, slots, sampler="top")
    with pytest.raises(ValueError, match="sample_fn must be"):
        DecodeGraphs(fwd, cache, buckets=(4,), mode="static", sample_fn={})


def test_batches_past_the_largest_bucket_run_eagerly(tiny):
    fwd, cache, _, slots, token = setup(tiny[0])
    graphs = DecodeGraphs(fwd, cache, buckets=(1, 2), mode="static")
    assert graphs.bucket_for(1) == 1 and graphs.bucket_for(2) == 2 and graphs.bucket_for(3) is None
    lengths = cache.lengths.clone()
    got = graphs.step(token, slots)  # 3 rows > 2: eager, unpadded
    cache.lengths.copy_(lengths)
    assert torch.equal(got, fwd.decode(cache, token, slots).argmax(-1))


def test_bad_arguments(tiny):
    fwd, cache, _, slots, token = setup(tiny[0])
    with pytest.raises(ValueError, match="mode must be"):
        DecodeGraphs(fwd, cache, mode="cuda")
    with pytest.raises(ValueError, match="buckets"):
        DecodeGraphs(fwd, cache, buckets=(0, 4))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA cache"):
            DecodeGraphs(fwd, cache, mode="graph")
    graphs = DecodeGraphs(fwd, cache, buckets=(4,), mode="static")
    with pytest.raises(ValueError, match="no free slot"):
        DecodeGraphs(fwd, cache, buckets=(4,), mode="static")
    with pytest.raises(ValueError, match="one equal, non-empty shape"):
        graphs.step(token[:2], slots)
    with pytest.raises(ValueError, match="one equal, non-empty shape"):
        graphs.step(token[:0], slots[:0])


# ---------------------------------------------------------------------------- GPU

@pytest.fixture(scope="module")
def cuda_tiny():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return moelab.load("tiny", device="cuda")[0]


@pytest.mark.gpu
@pytest.mark.parametrize("buckets", [(2, 4), (1, 2, 4, 8, 16, 32, 64), (4,)])
def test_gpu_graph_replay_gives_eager_tokens(cuda_tiny, buckets):
    ref = run(cuda_tiny, plain)
    got = run(cuda_tiny, with_graphs("graph", buckets))
    graphs = got[3]
    assert graphs.captured and graphs.mode == "graph"
    assert sorted(graphs.capture_seconds) == sorted(buckets)
    assert_same_run(got, ref, atol=1e-4)


def test_pdl_only_on_cuda_and_only_when_enabled(monkeypatch):
    from moelab.kernels import pdl
    assert pdl.launch_args(torch.zeros(2)) == {"USE_PDL": False}  # the interpreter has no grid dependencies
    if torch.cuda.is_available():
        monkeypatch.setattr(pdl, "ENABLED", False)
        assert pdl.launch_args(torch.zeros(2, device="cuda")) == {"USE_PDL": False}


def test_pdl_places_the_next_kernel_where_each_launch_asks(monkeypatch):
    """USE_PDL 1: the next kernel is placed from this one's start; 2: from the end of its main
    loop. `auto` follows each launch's `late`, MOELAB_PDL_NEXT=start / end overrides it."""
    from moelab.kernels import pdl
    monkeypatch.setattr(pdl, "uses_pdl", lambda device: True)
    t = torch.zeros(2)
    monkeypatch.setattr(pdl, "NEXT_AT", "auto")
    assert pdl.launch_args(t) == {"USE_PDL": 1, "launch_pdl": True}
    assert pdl.launch_args(t, late=True) == {"USE_PDL": 2, "launch_pdl": True}
    monkeypatch.setattr(pdl, "NEXT_AT", "start")
    assert pdl.launch_args(t, late=True)["USE_PDL"] == 1
    monkeypatch.setattr(pdl, "NEXT_AT", "end")
    assert pdl.launch_args(t)["USE_PDL"] == 2
    monkeypatch.setattr(pdl, "NEXT_AT", "middle")
    with pytest.raises(ValueError, match="MOELAB_PDL_NEXT"):
        pdl.launch_args(t)


@pytest.mark.gpu
def test_gpu_graph_replay_with_pdl_gives_the_eager_tokens_without(cuda_tiny, monkeypatch):
    from moelab.kernels import pdl
    if not pdl.uses_pdl(torch.device("cuda")):
        pytest.skip("PDL needs an sm_90 GPU (and MOELAB_PDL unset)")
    monkeypatch.setattr(pdl, "ENABLED", False)
    ref = run(cuda_tiny, plain)
    monkeypatch.setattr(pdl, "ENABLED", True)
    got = run(cuda_tiny, with_graphs("graph", (1, 2, 4)))
    assert got[3].captured
    assert_same_run(got, ref, atol=1e-4)


@pytest.mark.gpu
def test_gpu_graph_replay_bf16_random_weights():
    model = moelab.load("tiny", random_weights=True, device="cuda", dtype=torch.bfloat16, seed=3)[0]
    # One padded step (3 live rows in bucket 4): untrained bf16 logits nearly tie, so a
    # different rounding at another batch size may flip an argmax; compare what the step
    # wrote into the live slots, loosely, and that nothing else changed (run checks that).
    ref = run(model, plain, schedule=[3])
    got = run(model, with_graphs("graph", (4,)), schedule=[3])
    assert got[3].captured
    assert got[1].lengths[got[2]].tolist() == ref[1].lengths[ref[2]].tolist()
    for name in ("k", "v"):
        a, b = getattr(got[1], name)[:, ref[2]].float(), getattr(ref[1], name)[:, ref[2]].float()
        assert (a - b).abs().max() < 0.02 * b.abs().max()


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back_with_a_warning(cuda_tiny):
    def syncing_sampler(logits, slots):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("this sampler syncs with the host")
        return logits.argmax(-1)

    def factory(fwd, cache):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphs = DecodeGraphs(fwd, cache, buckets=(4,), sample_fn=syncing_sampler)
        assert any("capture failed" in str(w.message) and "syncs with the host" in str(w.message) for w in caught)
        assert graphs.mode == "eager" and not graphs.captured
        return graphs.step, graphs

    ref = run(cuda_tiny, plain)
    got = run(cuda_tiny, factory)
    assert got[0] == ref[0]


# ------------------------------------------------------------------ whole-prompt prefill graphs

def prefill_run(model, mode, lengths=(1, 5, 8, 9, 30, 48)):
    """Each prompt through PrefillGraphs (buckets 8 / 16 / 48) and through plain prefill, in
    two caches with an idle bystander slot; then two decode steps each. Returns (graph
    results, plain results) as [(logits, first decoded logits)], the caches and slots."""
    fwd = MoeForward(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    out = []
    for use_graphs in (True, False):
        cache = fwd.new_cache(num_slots=3, max_seq_len=64)
        bystander = cache.allocate(20)
        fwd.prefill(cache, [[3, 1, 4, 1, 5]], [bystander])
        before = (cache.k[:, bystander].clone(), int(cache.lengths[bystander]))
        graphs = PrefillGraphs(fwd, cache, buckets=(8, 16, 48), mode=mode) if use_graphs else None
        results = []
        for prompt in prompts:
            slot = cache.allocate(len(prompt) + 2)
            if use_graphs:
                logits = graphs.prefill(prompt, slot).clone()
            else:
                logits = fwd.prefill(cache, [prompt], [slot])
            assert int(cache.lengths[slot]) == len(prompt)
            after = fwd.decode(cache, logits.argmax(-1), [slot])  # reads only the prompt's keys
            results.append((logits, after, cache.k[:, slot, :, :len(prompt) + 1].clone()))
            cache.free(slot)
        assert torch.equal(cache.k[:, bystander], before[0]) and int(cache.lengths[bystander]) == before[1]
        out.append((results, graphs))
    return out


def test_padded_prefill_equals_plain_prefill(tiny):
    """Prompts padded to a bucket (1 -> 8, 9 -> 16, 30 -> 48, 48 exactly): the same logits, the
    same keys for the prompt and the decoded token, the slot's length the prompt's; the
    padding's keys past the length are never read and no other slot is touched."""
    (got, graphs), (ref, _) = prefill_run(tiny[0], "static")
    for (logits, after, keys), (ref_logits, ref_after, ref_keys) in zip(got, ref):
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(after, ref_after, rtol=0, atol=1e-4)
        torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-5)
    assert [int(r[0].argmax()) for r in got] == [int(r[0].argmax()) for r in ref]
    assert graphs.fits(48) and not graphs.fits(49) and not graphs.fits(0)
    with pytest.raises(ValueError, match="no prefill bucket"):
        graphs.prefill(list(range(49)), 1)
    with pytest.raises(ValueError, match="mode must be"):
        PrefillGraphs(graphs.fwd, graphs.cache, mode="eager")
    with pytest.raises(ValueError, match="up to max_seq_len"):
        PrefillGraphs(graphs.fwd, graphs.cache, buckets=(128,), mode="static")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA cache"):
            PrefillGraphs(graphs.fwd, graphs.cache)


@pytest.mark.gpu
def test_gpu_prefill_graph_replay_equals_plain_prefill(cuda_tiny):
    (got, graphs), (ref, _) = prefill_run(cuda_tiny, "graph")
    assert graphs.mode == "graph" and sorted(graphs.capture_seconds) == [8, 16, 48]
    for (logits, after, keys), (ref_logits, ref_after, ref_keys) in zip(got, ref):
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-3)
        torch.testing.assert_close(after, ref_after, rtol=0, atol=1e-3)
        torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-4)
    assert [int(r[0].argmax()) for r in got] == [int(r[0].argmax()) for r in ref]
