"""The slot KV cache: one preallocated row of keys and values per running sequence.

Built in notebooks/06_kv_cache_slots. Keys and values live in two tensors shaped
`[layers, slots, kv_heads, max_seq_len, head_dim]`, allocated once, so a decode step never
allocates and a CUDA graph can replay over fixed addresses. A slot is one sequence's row; its
filled length is `lengths[slot]`, a device tensor the forward pass reads without a host sync.
Which slots are taken is host bookkeeping (the scheduler's business, never inside a step).

The memory math (`kv_bytes_per_token`, `kv_cache_bytes`, `slots_that_fit`) takes a model or
its config, so the notebook sizes Qwen1.5-MoE-A2.7B from its config alone.
"""

from __future__ import annotations

import torch


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model_or_config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token occupies in the cache: every layer stores a key and a value vector
    for each KV head. Qwen1.5-MoE-A2.7B in bf16: 24 * 2 * 16 * 128 * 2 B = 192 KiB."""
    config = _config(model_or_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * _head_dim(config) * itemsize


def kv_cache_bytes(model_or_config, num_slots: int, max_seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a slot cache: every slot reserves `max_seq_len` tokens up front."""
    return num_slots * max_seq_len * kv_bytes_per_token(model_or_config, dtype)


def slots_that_fit(
    budget_bytes: int, model_or_config, max_seq_len: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """How many slots of `max_seq_len` tokens fit in `budget_bytes` of memory."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    return max(0, int(budget_bytes) // (max_seq_len * kv_bytes_per_token(model_or_config, dtype)))


class KVCache:
    """Preallocated keys and values for `num_slots` sequences of up to `max_seq_len` tokens.

    `k`, `v`: [layers, slots, kv_heads, max_seq_len, head_dim]; `lengths`: int64 [slots] on
    the cache's device. `allocate` / `free` hand slots out on the host; `write` stores the keys
    and values of a whole batch of (slot, position) pairs in one indexed write per tensor.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ):
        for name, value in (("num_layers", num_layers), ("num_slots", num_slots), ("num_kv_heads", num_kv_heads),
                            ("max_seq_len", max_seq_len), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (num_layers, num_slots, num_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: attention multiplies the masked-out (probability 0) positions by
        # their values, and 0 * NaN from uninitialised memory would be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self.num_layers, self.num_slots, self.max_seq_len = num_layers, num_slots, max_seq_len
        self._reserved: list[int | None] = [None] * num_slots  # tokens each taken slot may hold

    @classmethod
    def for_model(cls, model, num_slots: int, max_seq_len: int, dtype: torch.dtype | None = None, device=None):
        """A cache shaped for a Hugging Face Qwen2-MoE model, in its dtype and on its device."""
        config = model.config
        param = next(model.parameters())
        return cls(config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len,
                   _head_dim(config), dtype or param.dtype, device or param.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def free_slots(self) -> list[int]:
        return [s for s, r in enumerate(self._reserved) if r is None]

    @property
    def used_slots(self) -> list[int]:
        return [s for s, r in enumerate(self._reserved) if r is not None]

    def reserved(self, slot: int) -> int:
        """How many tokens (prompt + new tokens) the sequence in `slot` was allocated."""
        self.check_slot(slot)
        return self._reserved[slot]

    def check_slot(self, slot) -> None:
        """Raise a ValueError unless `slot` is a slot id that is currently allocated."""
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ValueError(f"slot ids must be ints, got {slot!r}")
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is out of range: this cache has slots 0..{self.num_slots - 1}")
        if self._reserved[slot] is None:
            raise ValueError(f"slot {slot} is not allocated (allocate it first)")

    def allocate(self, num_tokens: int) -> int:
        """Take the lowest free slot for a sequence of at most `num_tokens` tokens (prompt plus
        max_new_tokens) and return its id. Its length starts at 0."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if num_tokens > self.max_seq_len:
            raise ValueError(
                f"a sequence of {num_tokens} tokens (prompt + max_new_tokens) does not fit: "
                f"max_seq_len is {self.max_seq_len}"
            )
        free = self.free_slots
        if not free:
            raise RuntimeError(f"the KV cache is full: all {self.num_slots} slots are in use; free one first")
        slot = free[0]
        self._reserved[slot] = num_tokens
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give `slot` back. Its keys and values stay in memory but are dead: every read is
        masked by `lengths`, which is reset here and again by the next prefill."""
        self.check_slot(slot)
        self._reserved[slot] = None
        self.lengths[slot] = 0

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store keys and values for N tokens at once: token i goes to (slots[i], positions[i]).

        slots, positions: int64 [N] on the cache's device; k, v: [N, kv_heads, head_dim].
        One `index_put_` per tensor, no host sync, so it can run inside a CUDA graph.
        """
        # Indexing [slots, :, positions] puts the N indexed rows first: [N, kv_heads, head_dim];
        # the assignment is one index_put_ into the layer's view of the cache.
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
