"""One causal attention call, two entry points, several backends (SPEC §2).

This module owns *how* attention is computed; the model only says what it wants:

    flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))              training / full forward
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, ...)   inference with a KV cache

Tensors are (B, T, H, D) throughout (FlashAttention-3's native layout). `window_size` is
(left, right) with left = -1 meaning unlimited; a window of `left` lets a query see itself and
the `left` tokens before it. Both functions also take `softmax_scale` (default 1/sqrt(D)),
as FA3 does.

The backend is chosen once, at import:
- "fa3":  FlashAttention-3 from the `kernels` package, only on CUDA Hopper with bf16 compute
          (the kernels are bf16/fp8 only). Never required; any failure to load means no FA3.
- "flex": FlexAttention for sliding windows on CUDA without FA3 (full-window layers still use
          SDPA's causal kernels). Block masks are cached per (T, window).
- "sdpa": torch's scaled_dot_product_attention everywhere else (CPU, MPS, older GPUs).
`BACKEND` holds the name; `set_backend(name)` overrides it (tests), `set_backend(None)` restores
the automatic choice.
"""

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# Backend selection


def _load_fa3():
    """FA3's `flash_attn_interface` on a Hopper GPU, else None. Loading may need the network
    (the kernel is fetched from the HF hub), so every failure simply means "no FA3"."""
    if not torch.cuda.is_available():
        return None
    try:
        if torch.cuda.get_device_capability()[0] != 9:
            return None
        from kernels import get_kernel
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception:
        return None


_fa3 = _load_fa3()
HAS_FA3 = _fa3 is not None


def _auto_backend():
    if HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16:
        return "fa3"
    if torch.cuda.is_available():
        return "flex"
    return "sdpa"


BACKEND = _auto_backend()


def set_backend(name=None):
    """Force 'fa3' | 'flex' | 'sdpa' (tests, benchmarks); None restores the automatic choice."""
    global BACKEND
    if name is None:
        BACKEND = _auto_backend()
        return BACKEND
    if name not in ("fa3", "flex", "sdpa"):
        raise ValueError(f"unknown attention backend {name!r}; use 'fa3', 'flex' or 'sdpa'")
    if name == "fa3" and not HAS_FA3:
        raise RuntimeError("FlashAttention-3 is not available on this machine")
    BACKEND = name
    return BACKEND


# -----------------------------------------------------------------------------
# SDPA (reference semantics for all backends)

_mask_cache = {}


def _window_mask(Tq, Tk, left, device):
    """Boolean (Tq, Tk) mask, True = may attend. Query row r sits at absolute position
    (Tk - Tq) + r; it sees column c iff c <= row and (windowed) row - c <= left (SPEC §2)."""
    key = (Tq, Tk, left, str(device))
    mask = _mask_cache.get(key)
    if mask is None:
        row = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        col = torch.arange(Tk, device=device)[None, :]
        mask = col <= row
        if left >= 0:
            mask = mask & (row - col <= left)
        if Tq == Tk and len(_mask_cache) < 64:  # only the training shapes recur; decode shapes don't
            _mask_cache[key] = mask
    return mask


def _sdpa(q, k, v, causal, left, scale):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D) -> (B, Tq, H, D). SDPA wants (B, H, T, D); the
    transposes are views (the CPU and CUDA kernels take strided inputs), and the output's
    memory is already (B, T, H, D) on CPU, so no copies are made here."""
    Tq, Tk = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not causal:
        y = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    elif (left < 0 or left >= Tq) and Tq == Tk:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif Tq == 1:
        # decode: the single query is the newest position; keep only the keys in its window
        if 0 <= left < Tk:
            k, v = k[:, :, Tk - left - 1:], v[:, :, Tk - left - 1:]
        y = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    else:
        mask = _window_mask(Tq, Tk, left, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# FlexAttention (CUDA sliding windows without FA3)

_flex = None
_block_masks = {}


def _flex_attention(q, k, v, left, scale):
    global _flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)  # uncompiled flex is a slow reference
    T = q.size(1)
    key = (T, left, str(q.device))
    block_mask = _block_masks.get(key)
    if block_mask is None:
        def sliding_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)
        block_mask = create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=q.device)
        _block_masks[key] = block_mask
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = _flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Public API


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), softmax_scale=None):
    """Attention over a whole sequence (no cache). q (B, T, H, D), k/v (B, T, Hkv, D)."""
    if BACKEND == "fa3":
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale)
    left = window_size[0]
    T = q.size(1)
    if BACKEND == "flex" and causal and 0 <= left < T - 1 and q.is_cuda:
        return _flex_attention(q, k, v, left, softmax_scale)
    return _sdpa(q, k, v, causal, left, softmax_scale)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            window_size=(-1, -1), softmax_scale=None):
    """Attention for new queries against a KV cache. k_cache/v_cache (B, T_max, Hkv, D) are
    written in place at [pos, pos + T_new) with the new k/v, where pos = cache_seqlens[0] (all
    rows at the same position); queries then attend over cache[:pos + T_new]. cache_seqlens is
    *not* advanced here: the model does that after its last layer (SPEC §2, §10.1)."""
    if BACKEND == "fa3":
        return _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                            causal=causal, window_size=window_size, softmax_scale=softmax_scale)
    pos = int(cache_seqlens[0])
    end = pos
    if k is not None:
        end = pos + k.size(1)
        if end > k_cache.size(1):
            raise RuntimeError(f"KV cache overflow: {end} positions needed, the cache holds {k_cache.size(1)}")
        k_cache[:, pos:end] = k
        v_cache[:, pos:end] = v
    return _sdpa(q, k_cache[:, :end], v_cache[:, :end], causal, window_size[0], softmax_scale)


def decode_attention(q, k, v, k_cache, v_cache, layer, pos, mask, enable_gqa=None):
    """Static-shape decode: one new token per row, each row at its own position. Made for
    torch.compile and CUDA graphs (no host sync, no data-dependent shapes).

    q (B, 1, H, D), k/v (B, 1, Hkv, D). k_cache/v_cache are the whole caches (n_layer, B, T_max,
    Hkv, D); row b's new key/value are written in place at [layer, b, pos[b]] (pos: int64 (B,)).
    The write indexes the full tensor rather than a per-layer view, so the compiler updates the
    cache in place instead of copying it back every step. `mask` is a boolean (B, L) saying which
    of the first L cache slots each row may see (the caller builds it from pos and the layer's
    window, once per step); only those L slots are read, so the caller keeps L a bucket above
    the longest row instead of T_max."""
    B = q.size(0)
    rows = torch.arange(B, device=q.device)
    layer_idx = torch.full((B,), layer, dtype=torch.long, device=q.device)
    k_cache.index_put_((layer_idx, rows, pos), k[:, 0])
    v_cache.index_put_((layer_idx, rows, pos), v[:, 0])
    L = mask.size(1)
    if enable_gqa is None:
        enable_gqa = q.size(2) != k.size(2)
    keys, values = k_cache[layer, :, :L], v_cache[layer, :, :L]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                       attn_mask=mask[:, None, None, :], enable_gqa=enable_gqa)
    return y.transpose(1, 2)


def decode_mask(pos, kv_len, left):
    """(B, kv_len) boolean: slot c is visible to a query at pos[b] iff c <= pos[b] and, with a
    window, pos[b] - c <= left (the same rule as the full forward, SPEC §2)."""
    delta = pos[:, None] - torch.arange(kv_len, device=pos.device)[None, :]
    mask = delta >= 0
    if left >= 0:
        mask = mask & (delta <= left)
    return mask
