import copy

import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf

import moelab
import moelab.model as model_module
from moelab.kv_cache import KVCache
from moelab.model import (DENSE_MAX_TOKENS, MoeForward, apply_rope, apply_rope_tables, experts_forward,
                          rms_norm, rope_tables)
from moelab.models import PRESETS, random_model

PROMPT_LENS = [3, 17, 1, 40, 9, 64, 25, 6]  # eight different lengths
NEW_TOKENS = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def greedy(fwd, cache, prompts, slots, new_tokens):
    """Prefill `prompts` into `slots`, then decode all of them together in one batch per step.
    Returns (tokens [B, new_tokens], prefill logits per prompt, decode logits per step)."""
    prefill_logits = fwd.prefill(cache, prompts, slots, all_logits=True)
    token = torch.stack([lg[-1] for lg in prefill_logits]).argmax(-1)
    tokens, step_logits = [token], []
    slots_t = torch.tensor(slots)
    for _ in range(new_tokens - 1):
        logits = fwd.decode(cache, token, slots_t)
        token = logits.argmax(-1)
        tokens.append(token)
        step_logits.append(logits)
    return torch.stack(tokens, 1), prefill_logits, step_logits


@pytest.fixture(scope="module", params=["tiny", "random-init-0.1"])
def gen_model(request, model):
    """`tiny` as shipped, and random weights drawn 5x wider than transformers' default: these
    give varied greedy tokens (untrained `tiny` repeats a few), so equal tokens mean more."""
    if request.param == "tiny":
        return model
    return random_model(Qwen2MoeConfig(**{**PRESETS["tiny"], "initializer_range": 0.1}), seed=5)


@pytest.fixture(scope="module")
def run(gen_model, prompts):
    """moelab's greedy run of the eight prompts, placed in scattered slots of a 12-slot cache."""
    fwd = MoeForward(gen_model)
    cache = fwd.new_cache(num_slots=12, max_seq_len=PROMPT_LENS[5] + NEW_TOKENS)
    for _ in range(12):
        cache.allocate(8)
    for slot in (11, 2, 7, 0, 5, 9, 3, 10):
        cache.free(slot)
    # Allocate from the last prompt to the first: prompt order no longer follows slot order.
    slots = [cache.allocate(len(p) + NEW_TOKENS) for p in prompts[::-1]][::-1]
    assert sorted(slots) == [0, 2, 3, 5, 7, 9, 10, 11] and slots != sorted(slots)
    tokens, prefill_logits, step_logits = greedy(fwd, cache, prompts, slots, NEW_TOKENS)
    return dict(tokens=tokens, prefill=prefill_logits, steps=step_logits, cache=cache, slots=slots)


def test_prefill_and_every_decode_step_match_transformers_logits(gen_model, prompts, run):
    worst = 0.0
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            full = torch.tensor([prompt + run["tokens"][b].tolist()])
            ref = gen_model(full).logits[0]
            n = len(prompt)
            worst = max(worst, (run["prefill"][b] - ref[:n]).abs().max().item())
            for i, logits in enumerate(run["steps"]):
                worst = max(worst, (logits[b] - ref[n + i]).abs().max().item())
    assert worst < 1e-4, worst
    assert run["cache"].lengths[run["slots"]].tolist() == [n + NEW_TOKENS - 1 for n in PROMPT_LENS]


def test_greedy_tokens_equal_hf_generate_for_each_prompt(gen_model, prompts, run):
    for b, prompt in enumerate(prompts):
        out = gen_model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=256
        )
        assert out[0, len(prompt):].tolist() == run["tokens"][b].tolist(), f"prompt {b} (length {len(prompt)})"


def test_reused_slot_has_no_stale_state(model, prompts):
    fwd = MoeForward(model)
    fresh = fwd.new_cache(num_slots=2, max_seq_len=96)
    expect, *_ = greedy(fwd, fresh, [prompts[4]], [fresh.allocate(40)], 24)

    reused = fwd.new_cache(num_slots=2, max_seq_len=96)
    slot = reused.allocate(96)
    greedy(fwd, reused, [prompts[3]], [slot], 50)  # a longer sequence fills the slot first
    reused.free(slot)
    assert reused.allocate(40) == slot
    got, *_ = greedy(fwd, reused, [prompts[4]], [slot], 24)
    assert got.tolist() == expect.tolist()


def test_a_slot_does_not_see_its_batch_neighbours(model, prompts):
    fwd = MoeForward(model)
    cache = fwd.new_cache(num_slots=3, max_seq_len=64)
    slots = [cache.allocate(40) for _ in range(3)]
    fwd.prefill(cache, prompts[:3], slots)
    token = torch.tensor([65, 66, 67])
    together = fwd.decode(cache, token, slots)
    cache.lengths[torch.tensor(slots)] -= 1  # undo the step, then run slot 1 alone
    alone = fwd.decode(cache, token[1:2], slots[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-5)


def test_errors_are_clear(model, prompts):
    fwd = MoeForward(model)
    cache = fwd.new_cache(num_slots=2, max_seq_len=20)
    with pytest.raises(ValueError, match="does not fit: max_seq_len is 20"):
        cache.allocate(len(prompts[1]) + 4)  # prompt + max_new_tokens > max_seq_len
    a = cache.allocate(10)
    with pytest.raises(ValueError, match="out of range"):
        fwd.prefill(cache, [[1, 2]], [2])
    with pytest.raises(ValueError, match="not allocated"):
        fwd.prefill(cache, [[1, 2]], [1])
    with pytest.raises(ValueError, match="does not fit slot"):
        fwd.prefill(cache, [list(range(11))], [a])
    with pytest.raises(ValueError, match="empty"):
        fwd.prefill(cache, [[]], [a])
    with pytest.raises(ValueError, match="token ids"):
        fwd.prefill(cache, [[1, 999]], [a])
    with pytest.raises(ValueError, match="prefill it"):
        fwd.decode(cache, [1], [a])
    fwd.prefill(cache, [list(range(9))], [a])
    with pytest.raises(ValueError, match="out of range"):
        fwd.decode(cache, [1], [5])
    with pytest.raises(ValueError, match="distinct"):
        fwd.decode(cache, [1, 2], [a, a])
    fwd.decode(cache, [1], [a])  # position 9: the last one this slot has room for
    with pytest.raises(ValueError, match="full"):
        fwd.decode(cache, [1], [a])
    cache.allocate(3)
    with pytest.raises(RuntimeError, match="full"):
        cache.allocate(3)
    with pytest.raises(ValueError, match="does not fit this model"):
        fwd.decode(KVCache(2, 1, 2, 8, 32), [1], [0])


def test_dense_mlp_layers_match_transformers():
    config = Qwen2MoeConfig(**{**PRESETS["tiny"], "mlp_only_layers": [1], "decoder_sparse_step": 2})
    model = random_model(config, seed=3)
    assert not hasattr(model.model.layers[0].mlp, "experts")  # (0 + 1) % 2 != 0: dense
    assert not hasattr(model.model.layers[1].mlp, "experts")  # in mlp_only_layers
    assert hasattr(model.model.layers[3].mlp, "experts")
    fwd = MoeForward(model)
    cache = fwd.new_cache(num_slots=2, max_seq_len=32)
    prompts = [[5, 9, 200, 7, 1], [42] * 11]
    slots = [cache.allocate(16) for _ in prompts]
    tokens, prefill_logits, steps = greedy(fwd, cache, prompts, slots, 5)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            ref = model(torch.tensor([prompt + tokens[b].tolist()])).logits[0]
            got = torch.cat([prefill_logits[b], torch.stack([s[b] for s in steps])])
            torch.testing.assert_close(got, ref[: len(got)], rtol=0, atol=1e-4)


def test_router_patch_does_not_change_moelab_forward(model, prompts):
    fwd = MoeForward(model)

    def logits():
        cache = fwd.new_cache(num_slots=2, max_seq_len=64)
        slots = [cache.allocate(30) for _ in range(2)]
        first = fwd.prefill(cache, prompts[:2], slots)
        return torch.cat([first, fwd.decode(cache, first.argmax(-1), slots)])

    plain = logits()
    with moelab.patch(model, backend="torch"):
        patched = logits()
        with torch.no_grad():
            hf_patched = model(torch.tensor([prompts[0]])).logits[0, -1]
    assert torch.equal(plain, patched)
    torch.testing.assert_close(patched[0], hf_patched, rtol=0, atol=1e-4)


def test_bf16_matches_transformers_bf16(prompts):
    model, _ = moelab.load("tiny", dtype=torch.bfloat16)
    fwd = MoeForward(model)
    cache = fwd.new_cache(num_slots=3, max_seq_len=64)
    assert cache.dtype == torch.bfloat16
    chosen = [prompts[0], prompts[1], prompts[4]]
    slots = [cache.allocate(len(p) + 4) for p in chosen]
    tokens, prefill_logits, steps = greedy(fwd, cache, chosen, slots, 4)
    assert steps[0].dtype == torch.bfloat16
    with torch.no_grad():
        for b, prompt in enumerate(chosen):
            ref = model(torch.tensor([prompt + tokens[b].tolist()])).logits[0].float()
            got = torch.cat([prefill_logits[b], torch.stack([s[b] for s in steps])]).float()
            # bf16 keeps about 3 significant digits; both sides round at different places.
            assert (got - ref[: len(got)]).abs().max() < 0.03 * ref.abs().max()


@pytest.mark.parametrize("num_tokens", [1, 7, DENSE_MAX_TOKENS + 5])
def test_experts_forward_matches_transformers_experts(model, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    block = model.model.layers[2].mlp
    x = torch.randn(num_tokens, model.config.hidden_size, generator=g)
    weights, ids = moelab.route(torch.randn(num_tokens, model.config.num_experts, generator=g), top_k=4)
    with torch.no_grad():
        ref = block.experts(x, ids.long(), weights)
        for path in (experts_forward, model_module._experts_grouped_mm, model_module._experts_dense,
                     model_module._experts_grouped):  # each CPU path by name (one thread: see below)
            torch.testing.assert_close(path(x, weights, ids, block.experts), ref, rtol=0, atol=1e-5, msg=path.__name__)


@pytest.mark.parametrize("num_tokens", [1, 5, DENSE_MAX_TOKENS + 5])
def test_an_expert_repeated_in_a_tokens_top_k_counts_twice(model, num_tokens):
    """Routing never repeats an id, but the experts seam takes any ids: a repeated one is two
    terms of the sum (the dense path scatter-adds its weights; a plain scatter kept one). Every
    CPU path is called by name: on this module's one thread `experts_forward` picks the grouped
    GEMM at every token count, so the dense path and the loop would not be reached through it."""
    g = torch.Generator().manual_seed(7 + num_tokens)
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(num_tokens, model.config.hidden_size, generator=g)
    ids = torch.randint(0, model.config.num_experts, (num_tokens, 4), generator=g, dtype=torch.int32)
    ids[:, 1] = ids[:, 0]  # every token names its first expert twice
    weights = torch.rand(num_tokens, 4, generator=g)

    def one(e, t):  # expert e on token t, from the fused weights
        gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
        return experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)

    with torch.no_grad():
        ref = torch.stack([sum(weights[t, k] * one(int(ids[t, k]), t) for k in range(4)) for t in range(num_tokens)])
        for path in (experts_forward, model_module._experts_grouped_mm, model_module._experts_dense,
                     model_module._experts_grouped):
            got = path(x, weights, ids, experts)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=path.__name__)


@pytest.mark.parametrize("num_tokens", [1, 3, 8, 37, DENSE_MAX_TOKENS + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_experts_paths_agree_with_the_per_pair_sum(model, num_tokens, dtype):
    """The CPU's grouped GEMM, the dense path and the expert loop: each equals the sum over
    (token, k) of weight * expert(token), with ids that leave experts empty, give one expert
    most pairs and repeat an id within a token's top-k."""
    g = torch.Generator().manual_seed(100 + num_tokens)
    experts = model.model.layers[3].mlp.experts
    x = torch.randn(num_tokens, model.config.hidden_size, generator=g)
    ids = torch.randint(0, 5, (num_tokens, 4), generator=g, dtype=torch.int32)  # experts 5..15 get nothing
    ids[:, 3] = 2  # expert 2 in every token's top-k
    ids[0, 1] = ids[0, 0]
    weights = torch.rand(num_tokens, 4, generator=g)

    def one(e, t):
        gate, up = (experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
        return experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)

    ref = torch.stack([sum(weights[t, k].double() * one(int(ids[t, k]), t) for k in range(4))
                       for t in range(num_tokens)])
    xd, wd = x.to(dtype), weights.to(dtype)
    lowered = copy.deepcopy(experts).to(dtype)  # the model's own stay float32
    with torch.no_grad():
        for path in (model_module._experts_grouped_mm, model_module._experts_dense, model_module._experts_grouped):
            got = path(xd, wd, ids, lowered).double()
            tol = 1e-5 if dtype == torch.float32 else 3e-2 * ref.abs().max().item()
            torch.testing.assert_close(got, ref, rtol=0, atol=tol, msg=f"{path.__name__} {dtype}")
    assert model_module._has_grouped_mm(xd)
    assert not model_module._has_grouped_mm(x.double())  # float64 takes the dense path / the loop


def test_experts_torch_takes_the_grouped_gemm_on_one_thread_or_above_the_dense_limit():
    small, large = torch.zeros(8, 16), torch.zeros(DENSE_MAX_TOKENS + 1, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert model_module._grouped_mm_wins(small) and model_module._grouped_mm_wins(large)
        torch.set_num_threads(2)  # the dense path's big GEMMs spread over threads; the grouped GEMM's do not
        assert not model_module._grouped_mm_wins(small) and model_module._grouped_mm_wins(large)
        assert not model_module._grouped_mm_wins(large.double())
    finally:
        torch.set_num_threads(threads)


def test_rope_tables_equal_apply_rope_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, 32, generator=g)
    angles = torch.rand(5, 16, generator=g) * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert torch.equal(apply_rope_tables(x, rope_tables(cos, sin)), apply_rope(x, cos, sin))


def test_rms_norm_and_rope_match_transformers(model):
    g = torch.Generator().manual_seed(0)
    norm = model.model.layers[1].input_layernorm
    x = torch.randn(5, model.config.hidden_size, generator=g)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
        positions = torch.tensor([[0, 3, 17, 200, 1023]])
        cos, sin = model.model.rotary_emb(x, positions)
    q = torch.randn(5, 4, 32, generator=g)
    k = torch.randn(5, 2, 32, generator=g)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(apply_rope(q, cos[0], sin[0]), ref_q[0].transpose(0, 1))
    assert torch.equal(apply_rope(k, cos[0], sin[0]), ref_k[0].transpose(0, 1))


@pytest.mark.gpu
def test_cuda_decode_step_is_sync_free_graph_capturable_and_matches_cpu():
    import copy

    model, _ = moelab.load("tiny")
    cuda_model = copy.deepcopy(model).to("cuda")  # the same weights (CUDA's RNG would differ)
    prompts = [[1, 2, 3, 4], list(range(30, 50))]
    results = []
    for m in (model, cuda_model):
        fwd = MoeForward(m)  # on CUDA, "auto" routes through the Triton kernel
        cache = fwd.new_cache(num_slots=4, max_seq_len=64)
        slots = torch.tensor([cache.allocate(32) for _ in prompts], device=cache.device)
        token = fwd.prefill(cache, prompts, slots.tolist()).argmax(-1)
        results.append(fwd.decode(cache, token, slots).cpu())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-3)

    # Capture the same step in a CUDA graph (a host sync inside it would raise) and replay it.
    cache.lengths[slots] -= 1
    lengths = cache.lengths.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        fwd.decode(cache, token, slots, check=False)
    torch.cuda.current_stream().wait_stream(side)
    cache.lengths.copy_(lengths)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd.decode(cache, token, slots, check=False)
    cache.lengths.copy_(lengths)
    graph.replay()
    torch.testing.assert_close(out.cpu(), results[1], rtol=0, atol=1e-5)
    assert cache.lengths[slots].tolist() == (lengths[slots] + 1).tolist()
