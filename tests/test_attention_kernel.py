"""The decode-attention kernel against a float64 reference: random slot lengths, length 1,
lengths off the block size, grouped-query heads, scattered slots, split-K; the fused
rotary + cache-write kernel against apply_rope + KVCache.write; the one-launch
`rope_decode_attention` against those two; all through MoeForward
on `tiny` (interpreter on the CPU); bf16/fp16 and CUDA-graph replay on a GPU."""

import pytest
import torch

import moelab
from moelab.kernels import attention as attention_kernels
from moelab.kernels.attention import choose_splits, decode_attention, rope_decode_attention
from moelab.kernels.rope_cache import rope_and_cache_write
from moelab.kv_cache import KVCache
from moelab.model import MoeForward, apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(q, k_cache, v_cache, slots, lengths, scale=None):
    """Per query: softmax(q k^T * scale) v over its slot's first `length` keys, in float64."""
    batch, heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = min(int(lengths[b]), k_cache.shape[2])
        if n == 0:
            continue
        k = k_cache[int(slots[b]), :, :n].double().cpu().repeat_interleave(group, 0)  # [heads, n, D]
        v = v_cache[int(slots[b]), :, :n].double().cpu().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hnd->hn", q[b].double().cpu(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v)
    return out


def make_case(batch, heads, kv_heads, head_dim, max_seq_len, num_slots, lengths, dtype=torch.float32,
              device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(num_slots, kv_heads, max_seq_len, head_dim, generator=g).to(device, dtype)
    v = torch.randn(num_slots, kv_heads, max_seq_len, head_dim, generator=g).to(device, dtype)
    slots = torch.randperm(num_slots, generator=g)[:batch].to(device)  # scattered, out of order
    return q, k, v, slots, torch.tensor(lengths, device=device)


# (batch, heads, kv_heads, head_dim, max_seq_len, num_slots, lengths, num_splits, block_n)
CASES = [
    (1, 2, 2, 16, 8, 1, [1], 1, 16),                             # one key, one block, no GQA
    (4, 6, 2, 32, 70, 7, [1, 17, 70, 33], 1, 16),                # group 3 (padded to 4), 5-block loop
    (3, 5, 5, 24, 40, 3, [40, 16, 39], 1, 16),                   # odd heads, head_dim not a power of 2
    (5, 8, 1, 16, 50, 9, [50, 1, 2, 31, 48], 3, 16),             # all heads share one KV head; split-K
    (2, 4, 2, 32, 96, 4, [5, 96], 4, 16),                        # splits past a short sequence stay empty
    (3, 4, 4, 8, 300, 3, [300, 129, 1], 2, None),                # the default (interpreter) block size
]


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,max_seq_len,num_slots,lengths,num_splits,block_n", CASES)
def test_kernel_matches_reference(batch, heads, kv_heads, head_dim, max_seq_len, num_slots, lengths, num_splits,
                                  block_n):
    q, k, v, slots, lens = make_case(batch, heads, kv_heads, head_dim, max_seq_len, num_slots, lengths,
                                     seed=len(lengths) * 7 + head_dim)
    out = decode_attention(q, k, v, slots, lens, num_splits=num_splits, block_n=block_n)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, slots, lens), rtol=0, atol=2e-6)


def test_kernel_random_lengths_agree_with_sdpa_and_ignore_the_tail():
    g = torch.Generator().manual_seed(11)
    batch, lengths = 6, torch.randint(1, 61, (6,), generator=g)
    q, k, v, slots, lens = make_case(batch, 4, 2, 16, 60, 8, lengths.tolist(), seed=3)
    out = decode_attention(q, k, v, slots, lens, scale=0.3, num_splits=2, block_n=16)
    # SDPA with the masked tail, as MoeForward's SDPA path computes it.
    mask = torch.arange(60)[None, None, None, :] < lens[:, None, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k[slots], v[slots], attn_mask=mask, scale=0.3, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    # Garbage (even NaN) past each length is never read.
    k2, v2 = k.clone(), v.clone()
    for b in range(batch):
        k2[slots[b], :, lens[b]:] = float("nan")
        v2[slots[b], :, lens[b]:] = float("nan")
    assert torch.equal(decode_attention(q, k2, v2, slots, lens, scale=0.3, num_splits=2, block_n=16), out)


def test_zero_length_gives_zeros_and_lengths_clamp_to_the_cache():
    q, k, v, slots, lens = make_case(3, 2, 2, 16, 20, 3, [0, 25, 20], seed=5)
    ref = reference(q, k, v, slots, torch.tensor([0, 20, 20]))
    for splits in (1, 3):
        out = decode_attention(q, k, v, slots, lens, num_splits=splits, block_n=16)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


def test_bad_input_is_rejected():
    q, k, v, slots, lens = make_case(2, 4, 2, 16, 8, 2, [3, 4])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        decode_attention(q[:, :3], k, v, slots, lens)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q[..., :8].contiguous(), k, v, slots, lens)
    with pytest.raises(ValueError, match="one float dtype"):
        decode_attention(q.double(), k, v, slots, lens)
    with pytest.raises(ValueError, match=r"must be \[B=2\]"):
        decode_attention(q, k, v, slots[:1], lens)
    with pytest.raises(ValueError, match="integer"):
        decode_attention(q, k, v, slots, lens.float())
    with pytest.raises(ValueError, match="4-D"):
        decode_attention(q, k[0], v, slots, lens)
    with pytest.raises(ValueError, match="differ"):
        decode_attention(q, k, v[:1], slots, lens)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, v, slots, lens, num_splits=0)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, slots, lens)


def test_choose_splits():
    assert choose_splits(1, 16, 2048, None) == 1            # not on a GPU
    assert choose_splits(64, 16, 2048, 132) == 1            # 1024 programs fill 132 SMs
    assert choose_splits(1, 16, 2048, 132) == 8             # 16 programs: 132 // 16
    assert choose_splits(1, 2, 2048, 132) == 8              # capped by 2048 // 256 keys per split
    assert choose_splits(1, 16, 300, 132) == 1              # too short to split
    assert choose_splits(4, 8, 65536, 132) == 4


PROMPTS = [[5, 9, 200, 7, 1], list(range(40, 58)), [42] * 9]  # 32 tokens: the interpreter runs one program each


def greedy_decode(fwd, steps=3):
    """Prefill PROMPTS into slots 1..3 of a fresh cache (slot 0 stays busy and empty), then `steps`
    greedy decode steps: (tokens [3, steps + 1], logits [steps, 3, vocab], the cache)."""
    cache = fwd.new_cache(num_slots=5, max_seq_len=64)
    cache.allocate(8)
    slots = [cache.allocate(50) for _ in PROMPTS]
    token = fwd.prefill(cache, PROMPTS, slots).argmax(-1)
    tokens, logits = [token], []
    for _ in range(steps):
        logits.append(fwd.decode(cache, token, slots))
        token = logits[-1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1), torch.stack(logits), cache


def test_moe_forward_kernel_path_gives_the_sdpa_path_tokens(tiny):
    model = tiny[0]
    runs = {}
    for attention in ("sdpa", "kernel", "auto"):
        kernels = "kernel" if attention == "kernel" else "auto"  # every moelab kernel on this path
        runs[attention] = greedy_decode(MoeForward(model, attention=attention, rope=kernels, norm=kernels))
    assert torch.equal(runs["kernel"][0], runs["sdpa"][0])
    torch.testing.assert_close(runs["kernel"][1], runs["sdpa"][1], rtol=0, atol=1e-4)
    assert not torch.equal(runs["kernel"][1], runs["sdpa"][1])  # the kernel really ran
    assert torch.equal(runs["auto"][1], runs["sdpa"][1])  # "auto" keeps SDPA on the CPU
    with pytest.raises(ValueError, match="attention must be"):
        MoeForward(model, attention="flash")
    with pytest.raises(ValueError, match="rope must be"):
        MoeForward(model, rope="triton")
    with pytest.raises(ValueError, match="norm must be"):
        MoeForward(model, norm="fused")


def rope_case(tokens, heads, kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v as strided views of one fused projection (as q/k/v_proj outputs would be if
    fused), angles like transformers' (the two halves of cos/sin repeat)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    angles = (torch.rand(tokens, head_dim // 2, generator=g) * 50).repeat(1, 2).to(device)
    return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim),
            angles.cos().to(dtype), angles.sin().to(dtype))


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(5, 6, 2, 20), (1, 4, 4, 32), (9, 7, 1, 8)])
def test_rope_cache_kernel_matches_apply_rope_and_cache_write(tokens, heads, kv_heads, head_dim):
    q, k, v, cos, sin = rope_case(tokens, heads, kv_heads, head_dim, seed=tokens)
    g = torch.Generator().manual_seed(1)
    slots = torch.randint(0, 3, (tokens,), generator=g)
    positions = torch.randperm(12, generator=g)[:tokens]  # distinct (slot, position) pairs
    ref_cache, cache = KVCache(2, 3, kv_heads, 12, head_dim), KVCache(2, 3, kv_heads, 12, head_dim)
    ref_cache.write(1, slots, positions, apply_rope(k, cos, sin), v)
    got_q = rope_and_cache_write(q, k, v, cos, sin, cache.k[1], cache.v[1], slots, positions)
    torch.testing.assert_close(got_q, apply_rope(q, cos, sin), rtol=0, atol=1e-6)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=0, atol=1e-6)
    assert torch.equal(cache.v, ref_cache.v)
    assert cache.k[0].abs().max() == 0  # the other layer is untouched


def test_rope_cache_bad_input():
    q, k, v, cos, sin = rope_case(3, 4, 2, 16)
    cache = KVCache(1, 2, 2, 8, 16)
    slots, positions = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="must be \\[T=3"):
        rope_and_cache_write(q, k[:2], v[:2], cos, sin, cache.k[0], cache.v[0], slots, positions)
    with pytest.raises(ValueError, match="do not fit"):
        rope_and_cache_write(q, k, v, cos, sin, KVCache(1, 2, 4, 8, 16).k[0], KVCache(1, 2, 4, 8, 16).v[0], slots,
                             positions)
    with pytest.raises(ValueError, match="cos"):
        rope_and_cache_write(q, k, v, cos[:2], sin, cache.k[0], cache.v[0], slots, positions)
    with pytest.raises(ValueError, match="slots/positions"):
        rope_and_cache_write(q, k, v, cos, sin, cache.k[0], cache.v[0], slots[:2], positions)


def fused_case(batch, heads, kv_heads, head_dim, max_seq_len, num_slots, positions, dtype=torch.float32,
               device="cpu", seed=0):
    """The new tokens' q, k, v (views of one fused projection), their angles, a cache of random keys
    and values, scattered slots and positions: what a decode step hands the attention."""
    q, k, v, cos, sin = rope_case(batch, heads, kv_heads, head_dim, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    kc = torch.randn(num_slots, kv_heads, max_seq_len, head_dim, generator=g).to(device, dtype)
    vc = torch.randn(num_slots, kv_heads, max_seq_len, head_dim, generator=g).to(device, dtype)
    slots = torch.randperm(num_slots, generator=g)[:batch].to(device)
    return q, k, v, cos, sin, kc, vc, slots, torch.tensor(positions, device=device)


def two_kernels(q, k, v, cos, sin, kc, vc, slots, positions, **kw):
    """The reference: rotary + cache write, then decode attention over keys 0..position."""
    q_rot = rope_and_cache_write(q, k, v, cos, sin, kc, vc, slots, positions)
    return decode_attention(q_rot, kc, vc, slots, positions + 1, **kw)


# (batch, heads, kv_heads, head_dim, max_seq_len, num_slots, positions, num_splits, block_n)
FUSED_CASES = [
    (1, 2, 2, 16, 8, 1, [0], 1, 16),                          # the first token: no cached key at all
    (3, 4, 2, 32, 70, 5, [0, 16, 69], 3, 16),                 # group 2; the new key first, past a block, last
    (2, 6, 3, 16, 50, 4, [31, 32], 4, 16),                    # the new key last in a split, first in the next
    (4, 4, 4, 8, 300, 4, [299, 128, 1, 5], 2, None),          # the interpreter's block size; short and long
    (2, 16, 16, 32, 100, 2, [79, 40], 8, 32),                 # Qwen's 16/16 heads, empty splits, the merge
    (3, 5, 1, 24, 40, 3, [39, 7, 20], 3, 16),                 # 5 heads on one KV head (group padded to 8)
]


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,max_seq_len,num_slots,positions,num_splits,block_n",
                         FUSED_CASES)
def test_rope_decode_attention_matches_the_two_kernels(batch, heads, kv_heads, head_dim, max_seq_len, num_slots,
                                                       positions, num_splits, block_n):
    args = fused_case(batch, heads, kv_heads, head_dim, max_seq_len, num_slots, positions, seed=batch + head_dim)
    q, k, v, cos, sin, kc, vc, slots, pos = args
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = two_kernels(q, k, v, cos, sin, ref_kc, ref_vc, slots, pos, num_splits=num_splits, block_n=block_n)
    out = rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos, num_splits=num_splits, block_n=block_n)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(kc, ref_kc, rtol=0, atol=1e-6)  # the rotated new keys, nothing else
    assert torch.equal(vc, ref_vc)
    # And against float64: the cache as the reference wrote it, q rotated in float64.
    q64 = apply_rope(q.double(), cos.double(), sin.double())
    torch.testing.assert_close(out.double(), reference(q64, ref_kc, ref_vc, slots, pos + 1), rtol=0, atol=1e-5)


def test_rope_decode_attention_bad_input():
    q, k, v, cos, sin, kc, vc, slots, pos = fused_case(2, 4, 2, 16, 20, 3, [3, 9])
    with pytest.raises(ValueError, match="k .* and v .* must be"):
        rope_decode_attention(q, k[:, :1], v[:, :1], cos, sin, kc, vc, slots, pos)
    with pytest.raises(ValueError, match="cos"):
        rope_decode_attention(q, k, v, cos[:1], sin, kc, vc, slots, pos)
    with pytest.raises(ValueError, match="caches"):
        rope_decode_attention(q, k, v, cos, sin, kc[..., :8], vc[..., :8], slots, pos)
    with pytest.raises(ValueError, match="positions"):
        rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos[:1])
    with pytest.raises(ValueError, match="integer"):
        rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos.float())
    with pytest.raises(ValueError, match="num_splits"):
        rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos, num_splits=0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        rope_decode_attention(q[:, :3], k, v, cos, sin, kc, vc, slots, pos)


def test_moe_forward_fused_rope_attention_gives_the_two_kernel_tokens(tiny, monkeypatch):
    """MoeForward's decode with the one-launch kernel against the two kernels it replaces: same
    tokens, logits within float32 rounding, and the same cache contents afterwards."""
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(attention_kernels, "FUSE_ROPE", fused)
        runs[fused] = greedy_decode(MoeForward(tiny[0], attention="kernel", rope="kernel", norm="kernel"))
    assert torch.equal(runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=1e-4)
    # Later layers' keys and values carry the attention's float32 differences.
    torch.testing.assert_close(runs[True][2].k, runs[False][2].k, rtol=0, atol=1e-5)
    torch.testing.assert_close(runs[True][2].v, runs[False][2].v, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,num_splits", [(64, 16, 16, None), (1, 16, 16, None),
                                                             (7, 16, 16, 1), (5, 28, 4, 3), (3, 12, 12, 8)])
def test_gpu_kernel_matches_reference(dtype, batch, heads, kv_heads, num_splits):
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 2049, (batch,), generator=g).tolist()
    lengths[0] = 1
    q, k, v, slots, lens = make_case(batch, heads, kv_heads, 128, 2048, batch + 3, lengths, dtype=dtype,
                                     device="cuda", seed=batch)
    out = decode_attention(q, k, v, slots, lens, num_splits=num_splits)
    ref = reference(q, k, v, slots, lens)
    assert out.dtype == dtype
    # Inputs are exact in both; the output is rounded once to bf16 (8 bits) or fp16.
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-2, atol=1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
def test_gpu_kernel_replays_in_a_cuda_graph_with_new_lengths():
    q, k, v, slots, lens = make_case(4, 16, 16, 128, 1024, 6, [1, 100, 1000, 513], dtype=torch.bfloat16,
                                     device="cuda")
    decode_attention(q, k, v, slots, lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, slots, lens)
    for new in ([1, 100, 1000, 513], [1024, 2, 64, 700]):
        lens.copy_(torch.tensor(new))
        graph.replay()
        torch.testing.assert_close(out.double().cpu(), reference(q, k, v, slots, lens), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_moe_forward_kernel_matches_sdpa_bf16():
    model, _ = moelab.load("tiny", device="cuda", dtype=torch.bfloat16)
    prompts = [[1, 2, 3], list(range(30, 90)), [7] * 20]
    logits = {}
    for attention in ("sdpa", "kernel"):
        fwd = MoeForward(model, attention=attention)
        cache = fwd.new_cache(num_slots=4, max_seq_len=128)
        slots = [cache.allocate(100) for _ in prompts]
        token = fwd.prefill(cache, prompts, slots).argmax(-1)
        logits[attention] = fwd.decode(cache, token, slots).float()
    scale = logits["sdpa"].abs().max()
    assert (logits["kernel"] - logits["sdpa"]).abs().max() < 0.03 * scale


@pytest.mark.gpu
def test_gpu_rope_cache_kernel_bf16():
    q, k, v, cos, sin = rope_case(64, 16, 16, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.arange(64, device="cuda")
    positions = torch.randint(0, 2048, (64,), device="cuda")
    cache = KVCache(1, 64, 16, 2048, 128, dtype=torch.bfloat16, device="cuda")
    got_q = rope_and_cache_write(q, k, v, cos, sin, cache.k[0], cache.v[0], slots, positions)
    ref_q, ref_k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
    # fp32 math, one rounding to bf16 (transformers' bf16 ops round three times).
    torch.testing.assert_close(got_q.float(), ref_q, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(cache.k[0, slots, :, positions].float(), ref_k, rtol=8e-3, atol=8e-3)
    assert torch.equal(cache.v[0, slots, :, positions], v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,num_splits", [(1, 16, 16, None), (64, 16, 16, None),
                                                             (5, 28, 4, 3), (3, 12, 12, 8)])
def test_gpu_rope_decode_attention_matches_the_two_kernels(dtype, batch, heads, kv_heads, num_splits):
    g = torch.Generator().manual_seed(batch)
    positions = torch.randint(0, 2048, (batch,), generator=g).tolist()
    positions[0] = 0
    if batch > 1:
        positions[1] = 79  # a short sequence in a long cache: one active split of several
    args = fused_case(batch, heads, kv_heads, 128, 2048, batch + 3, positions, dtype=dtype, device="cuda", seed=batch)
    q, k, v, cos, sin, kc, vc, slots, pos = args
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = two_kernels(q, k, v, cos, sin, ref_kc, ref_vc, slots, pos, num_splits=num_splits)
    out = rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos, num_splits=num_splits)
    assert out.dtype == dtype
    # Same roundings (q and the new key to the input dtype); the scans' float32 sums may differ in
    # order, and the output is rounded once.
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2 if dtype == torch.bfloat16 else 2e-3)
    torch.testing.assert_close(kc.float(), ref_kc.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(vc, ref_vc)


@pytest.mark.gpu
def test_gpu_rope_decode_attention_replays_in_a_cuda_graph():
    """Captured once, replayed with new positions (1 to 1,024 keys): each replay equals an eager
    call on the same inputs, output and caches."""
    q, k, v, cos, sin, kc, vc, slots, pos = fused_case(4, 16, 16, 128, 1024, 6, [0, 99, 999, 512],
                                                       dtype=torch.bfloat16, device="cuda")
    kc0, vc0 = kc.clone(), vc.clone()
    rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope_decode_attention(q, k, v, cos, sin, kc, vc, slots, pos)
    for new in ([0, 99, 999, 512], [1023, 1, 63, 700], [5, 6, 7, 8]):
        pos.copy_(torch.tensor(new))
        kc.copy_(kc0), vc.copy_(vc0)
        graph.replay()
        ekc, evc = kc0.clone(), vc0.clone()
        eager = rope_decode_attention(q, k, v, cos, sin, ekc, evc, slots, pos)
        assert torch.equal(out, eager)
        assert torch.equal(kc, ekc) and torch.equal(vc, evc)
