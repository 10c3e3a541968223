"""Attention backends (SPEC §2) and the KV cache (SPEC §10.1), checked against attention
computed by hand with an explicit mask."""

import math

import pytest
import torch

import nanochat.attention as attention
from nanochat.attention import flash_attn_func, flash_attn_with_kvcache
from nanochat.engine import KVCache

torch.set_num_threads(1)


def reference_attention(q, k, v, left=-1, scale=None):
    """Dense attention in float64 with the SPEC §2 mask: query row r sits at absolute position
    (Tk - Tq) + r and sees key c iff c <= row and (if left >= 0) row - c <= left."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else 1 / math.sqrt(D))
    row = torch.arange(Tk - Tq, Tk)[:, None]
    col = torch.arange(Tk)[None, :]
    allowed = col <= row
    if left >= 0:
        allowed &= row - col <= left
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def qkv(B=2, T=24, H=4, Hkv=4, D=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def test_cpu_backend_is_sdpa():
    assert attention.BACKEND == "sdpa"
    assert not attention.HAS_FA3


def test_backend_override():
    try:
        assert attention.set_backend("sdpa") == "sdpa"
        assert attention.BACKEND == "sdpa"
        with pytest.raises(ValueError):
            attention.set_backend("triton")
        with pytest.raises(RuntimeError):
            attention.set_backend("fa3")
    finally:
        auto = attention.set_backend(None)
    assert auto == attention.BACKEND
    assert (auto == "fa3") == (attention.HAS_FA3 and attention.COMPUTE_DTYPE == torch.bfloat16)


@pytest.mark.parametrize("window", [(-1, 0), (24, 0), (100, 0), (8, 0), (0, 0), (1, 0)])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_full_sequence_matches_reference(window, Hkv):
    q, k, v = qkv(Hkv=Hkv)
    y = flash_attn_func(q, k, v, causal=True, window_size=window)
    assert y.shape == q.shape
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, window[0]), atol=1e-5, rtol=1e-5)


def test_window_zero_sees_only_itself():
    q, k, v = qkv()
    y = flash_attn_func(q, k, v, causal=True, window_size=(0, 0))
    torch.testing.assert_close(y, v, atol=1e-6, rtol=1e-6)


def test_softmax_scale():
    q, k, v = qkv()
    y = flash_attn_func(q, k, v, causal=True, window_size=(5, 0), softmax_scale=0.5)
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, 5, scale=0.5), atol=1e-5, rtol=1e-5)


def test_windowed_gradients_match_reference():
    q, k, v = qkv(Hkv=2, requires_grad=True)
    y = flash_attn_func(q, k, v, causal=True, window_size=(6, 0))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    ref = reference_attention(q, k, v, 6)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("left", [-1, 5, 30])
def test_kvcache_prefill_chunks_and_decode_match_full(left):
    """Prefill 10 tokens into an empty cache, a chunk of 6 (Tq != Tk), then decode one at a
    time: every output equals full-sequence attention, the cache holds the keys in place, and
    cache_seqlens is left for the caller to advance."""
    B, T, H, Hkv, D = 2, 24, 4, 2, 16
    q, k, v = qkv(B, T, H, Hkv, D)
    full = reference_attention(q, k, v, left)
    k_cache = torch.zeros(B, 32, Hkv, D)
    v_cache = torch.zeros(B, 32, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    outs = []
    for start, end in [(0, 10), (10, 16)] + [(t, t + 1) for t in range(16, T)]:
        y = flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k=k[:, start:end], v=v[:, start:end],
                                    cache_seqlens=seqlens, causal=True, window_size=(left, 0))
        assert int(seqlens[0]) == start  # not advanced by the attention call
        seqlens += end - start
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1).double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :T], k)
    torch.testing.assert_close(v_cache[:, :T], v)
    assert k_cache[:, T:].abs().sum() == 0


def test_kvcache_overflow_is_an_error():
    q, k, v = qkv(B=1, T=4)
    k_cache = torch.zeros(1, 3, 4, 16)
    v_cache = torch.zeros(1, 3, 4, 16)
    with pytest.raises(RuntimeError, match="overflow"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=torch.zeros(1, dtype=torch.int32))


@pytest.mark.skipif(not attention.HAS_FA3, reason="FlashAttention-3 needs a Hopper GPU and the kernels package")
def test_fa3_matches_sdpa():
    q, k, v = (t.cuda().bfloat16() for t in qkv(B=2, T=128, H=8, Hkv=2, D=64))
    outs = {}
    for name in ("fa3", "sdpa"):
        attention.set_backend(name)
        outs[name] = flash_attn_func(q, k, v, causal=True, window_size=(32, 0))
    attention.set_backend(None)
    torch.testing.assert_close(outs["fa3"], outs["sdpa"], atol=1e-2, rtol=1e-2)


# -----------------------------------------------------------------------------
# KVCache (SPEC §10.1)


def test_kvcache_shapes_views_advance_reset():
    cache = KVCache(batch_size=3, num_heads=2, seq_len=16, head_dim=8, num_layers=4, device="cpu", dtype=torch.float32)
    assert cache.k_cache.shape == (4, 3, 16, 2, 8) and cache.v_cache.shape == (4, 3, 16, 2, 8)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.shape == (3,)
    assert cache.get_pos() == 0 and cache.prev_embedding is None
    k1, v1 = cache.get_layer_cache(1)
    assert k1.shape == (3, 16, 2, 8)
    k1[0, 0, 0, 0] = 7.0  # a view: writes land in the cache
    assert cache.k_cache[1, 0, 0, 0, 0] == 7.0
    cache.advance(5)
    assert cache.get_pos() == 5
    cache.prev_embedding = torch.ones(3, 1, 4)
    cache.reset()
    assert cache.get_pos() == 0 and cache.prev_embedding is None


def test_kvcache_prefill_broadcasts_batch_one():
    src = KVCache(1, 2, 8, 4, 3, "cpu", torch.float32)
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(5)
    src.prev_embedding = torch.randn(1, 1, 6)
    dst = KVCache(4, 2, 12, 4, 3, "cpu", torch.float32)
    dst.prefill(src)
    assert dst.get_pos() == 5 and (dst.cache_seqlens == 5).all()
    for b in range(4):
        torch.testing.assert_close(dst.k_cache[:, b, :5], src.k_cache[:, 0, :5])
        torch.testing.assert_close(dst.v_cache[:, b, :5], src.v_cache[:, 0, :5])
    assert dst.k_cache[:, :, 5:].abs().sum() == 0
    assert dst.prev_embedding.shape == (4, 1, 6)
    torch.testing.assert_close(dst.prev_embedding, src.prev_embedding.expand(4, 1, 6))
    dst.prev_embedding[0] += 1  # a real copy per row, not a broadcast view
    torch.testing.assert_close(dst.prev_embedding[1], src.prev_embedding[0])
