"""A preallocated KV cache: one (L, B_max, Hkv, S_max, D) tensor each for keys and values.

Sized once from max_batch_size x max_seq_len; prefill and every decode step write into it in place, so
the decode loop allocates nothing per step for its cache. Its size is checked before it is allocated.
"""
from __future__ import annotations

import torch


def kv_cache_bytes(num_layers: int, max_batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of keys plus values for the whole cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * max_batch_size * num_kv_heads * max_seq_len * head_dim * elem


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None


class KVCache:
    def __init__(self, num_layers: int, max_batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        need = kv_cache_bytes(num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim, dtype)
        free = available_bytes(torch.device(device))
        if free is not None and need > free:
            raise MemoryError(
                f"KV cache needs {need:,} bytes ({num_layers} layers x batch {max_batch_size} x {num_kv_heads} kv "
                f"heads x {max_seq_len} positions x head dim {head_dim} x 2 in {dtype}) but only {free:,} are free "
                f"on {device}; lower max_batch_size or max_seq_len")
        shape = (num_layers, max_batch_size, num_kv_heads, max_seq_len, head_dim)
        # zeros, not empty: the static decode step attends to every slot with the unfilled ones masked, and a
        # masked probability of 0 times a NaN that torch.empty happened to hold would still be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B_max, Hkv, S_max, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.nbytes = need

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]  # each (B_max, Hkv, S_max, D)
