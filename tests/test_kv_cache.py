import pytest
import torch

import moelab
from moelab.kv_cache import KVCache, kv_bytes_per_token, kv_cache_bytes, slots_that_fit
from moelab.models import preset_config


def small_cache(**kw):
    args = dict(num_layers=3, num_slots=5, num_kv_heads=2, max_seq_len=11, head_dim=4)
    args.update(kw)
    return KVCache(**args)


def test_qwen15_moe_kv_bytes_per_token_is_192_kib():
    config = preset_config("qwen1.5-moe-a2.7b")
    assert kv_bytes_per_token(config) == 24 * 2 * 16 * 128 * 2 == 192 * 1024
    assert kv_bytes_per_token(config, torch.float32) == 2 * 192 * 1024
    # The meta-device model (shapes only) gives the same figure through its config.
    model, _ = moelab.load("qwen1.5-moe-a2.7b", random_weights=True, device="meta")
    assert kv_bytes_per_token(model) == 192 * 1024


def test_memory_math_matches_a_real_cache():
    model, _ = moelab.load("tiny", random_weights=True)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    expect = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    assert kv_bytes_per_token(config, torch.float32) == expect
    cache = KVCache.for_model(model, num_slots=3, max_seq_len=17)
    assert cache.nbytes == kv_cache_bytes(config, 3, 17, torch.float32)
    assert cache.k.shape == (config.num_hidden_layers, 3, config.num_key_value_heads, 17, head_dim)
    assert cache.dtype == torch.float32 and cache.lengths.dtype == torch.int64


def test_slots_that_fit():
    config = preset_config("qwen1.5-moe-a2.7b")
    per_slot = 2048 * 192 * 1024
    assert slots_that_fit(10 * per_slot, config, 2048) == 10
    assert slots_that_fit(10 * per_slot - 1, config, 2048) == 9
    assert slots_that_fit(0, config, 2048) == 0
    with pytest.raises(ValueError, match="max_seq_len"):
        slots_that_fit(per_slot, config, 0)


def test_allocate_free_reuse_and_full_cache():
    cache = small_cache()
    assert [cache.allocate(11) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="full"):
        cache.allocate(3)
    cache.free(3)
    cache.free(1)
    assert cache.free_slots == [1, 3]
    assert cache.allocate(4) == 1  # the lowest free slot
    assert cache.reserved(1) == 4 and cache.used_slots == [0, 1, 2, 4]


def test_freeing_resets_the_length():
    cache = small_cache()
    slot = cache.allocate(6)
    cache.lengths[slot] = 6
    cache.free(slot)
    assert int(cache.lengths[slot]) == 0
    assert cache.allocate(2) == slot and int(cache.lengths[slot]) == 0


def test_bad_slots_and_sizes_raise():
    cache = small_cache()
    with pytest.raises(ValueError, match="does not fit: max_seq_len is 11"):
        cache.allocate(12)
    with pytest.raises(ValueError, match="positive int"):
        cache.allocate(0)
    with pytest.raises(ValueError, match="out of range"):
        cache.free(5)
    with pytest.raises(ValueError, match="out of range"):
        cache.check_slot(-1)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(0)
    with pytest.raises(ValueError, match="num_slots"):
        small_cache(num_slots=0)
    with pytest.raises(ValueError, match="head_dim"):
        small_cache(head_dim=2.0)


def test_vectorised_write_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    cache = small_cache()
    slots = torch.tensor([4, 0, 2, 4, 4, 0])
    positions = torch.tensor([0, 7, 10, 1, 9, 3])
    k = torch.randn(6, 2, 4, generator=g)
    v = torch.randn(6, 2, 4, generator=g)
    cache.write(1, slots, positions, k, v)
    expect_k = torch.zeros_like(cache.k)
    expect_v = torch.zeros_like(cache.v)
    for i in range(6):
        expect_k[1, slots[i], :, positions[i]] = k[i]
        expect_v[1, slots[i], :, positions[i]] = v[i]
    assert torch.equal(cache.k, expect_k) and torch.equal(cache.v, expect_v)
