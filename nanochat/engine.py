"""Inference: the KV cache (SPEC §10.1). The batched Engine (sampling, tool calls) lives here too."""

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences that all sit at the same position.

    k_cache / v_cache are (n_layers, B, T_max, H_kv, D); cache_seqlens is int32 (B,) as FA3
    wants it. The attention call writes new keys/values in place at the current position; the
    model calls advance(T) once its last layer has seen the chunk. prev_embedding holds the last
    position's pre-smear normalized token embedding, (B, 1, n_embd), for smear at decode."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    def reset(self):
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self):
        """Current position (the number of tokens already cached); rows are assumed uniform."""
        return int(self.cache_seqlens[0])

    def get_layer_cache(self, layer_idx):
        """(k, v) views of one layer, each (B, T_max, H_kv, D)."""
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens

    def prefill(self, other):
        """Copy a (usually batch-1) cache into this one, broadcasting over the batch: the prompt
        is prefilled once and then sampled num_samples times."""
        assert self.get_pos() == 0, "prefill into a cache that is already in use"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim)
        assert other.batch_size in (1, self.batch_size)
        pos = other.get_pos()
        assert pos <= self.max_seq_len, f"cannot prefill {pos} positions into a cache of {self.max_seq_len}"
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()
        else:
            self.prev_embedding = None
