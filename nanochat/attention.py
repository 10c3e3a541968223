"""One causal attention call, two entry points, several backends.

This module owns *how* attention is computed; the model only says what it wants:

    flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))              training / full forward
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, ...)   inference with a KV cache

Tensors are (B, T, H, D) throughout (FlashAttention-3's native layout). `window_size` is
(left, right) with left = -1 meaning unlimited; a window of `left` lets a query see itself and
the `left` tokens before it. Both functions also take `softmax_scale` (default 1/sqrt(D)),
as FA3 does.

The backend is chosen once, at import:
- "fa3":  FlashAttention-3 (kernels-community/flash-attn3, fetched once from the Hugging Face
          hub by the `kernels` package) on Hopper GPUs with bf16 compute. When it should load
          but cannot, a warning says why and how to fix it.
- "flex": CUDA without FA3. Sliding-window layers run FlexAttention inside a torch.compile'd
          model, where its kernels are generated with the model's graph; its tiles are sized to
          the GPU's shared memory (masked SDPA where even small tiles do not fit). Full-window
          layers, and every call outside a compiled model (evaluation at changing lengths), use
          SDPA, so nothing is compiled per sequence length.
- "sdpa": torch's scaled_dot_product_attention everywhere else (CPU, MPS, older GPUs).
`BACKEND` holds the name; `set_backend(name)` overrides it (tests), `set_backend(None)` restores
the automatic choice; `describe(head_dim)` says in one line what training will run.
"""

import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nanochat.common import COMPUTE_DTYPE, logger

# -----------------------------------------------------------------------------
# Backend selection

FA3_KERNEL = "kernels-community/flash-attn3"  # a trusted publisher on the hub: no trust_remote_code needed
FA3_VERSION = 1  # the kernel's major version; its API does not change within one


def _load_fa3():
    """(FA3's functions, None) on a Hopper GPU where the kernel loads, else (None, the reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return None, f"FA3 is used on Hopper GPUs (compute capability 9.x), this one is {major}.{minor}"
    try:
        from kernels import get_kernel
    except ImportError:
        return None, "the `kernels` package is not installed"
    try:
        kernel = get_kernel(FA3_KERNEL, version=FA3_VERSION)
        fa3 = kernel if hasattr(kernel, "flash_attn_func") else kernel.flash_attn_interface
    except Exception as e:  # offline without a cached copy, no build for this torch/CUDA, ...
        return None, f"{type(e).__name__}: {e}"
    return fa3, None


_fa3, FA3_ERROR = _load_fa3()
HAS_FA3 = _fa3 is not None

# FA3 is what the speedrun's timings assume on Hopper: training without it still works (on flex and
# SDPA) but markedly slower, which deserves more than the backend name in the log
if (not HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16 and torch.cuda.is_available()
        and torch.cuda.get_device_capability()[0] == 9 and int(os.environ.get("RANK", 0)) == 0):
    logger.warning(f"FlashAttention-3 could not be loaded on this Hopper GPU ({FA3_ERROR}). Attention falls back "
                   f"to FlexAttention/SDPA, which trains markedly slower. FA3 needs the `kernels` package (pip "
                   f"install 'kernels>=0.14'), the Hugging Face hub reachable once to fetch {FA3_KERNEL} (then "
                   f"cached: HF_HUB_OFFLINE=1 uses the cache), and a build of it for this torch and CUDA version.")


def _auto_backend():
    if HAS_FA3 and COMPUTE_DTYPE == torch.bfloat16:
        return "fa3"
    if torch.cuda.is_available():
        return "flex"
    return "sdpa"


BACKEND = _auto_backend()


def set_backend(name=None):
    """Force 'fa3' | 'flex' | 'sdpa' (tests, benchmarks); None restores the automatic choice.
    Forced 'flex' on CPU runs forward passes only (flex has no CPU backward)."""
    global BACKEND
    if name is None:
        BACKEND = _auto_backend()
        return BACKEND
    if name not in ("fa3", "flex", "sdpa"):
        raise ValueError(f"unknown attention backend {name!r}; use 'fa3', 'flex' or 'sdpa'")
    if name == "fa3" and not HAS_FA3:
        raise RuntimeError(f"FlashAttention-3 is not available on this machine ({FA3_ERROR})")
    BACKEND = name
    return BACKEND


def _shared_memory_per_block():
    """The most shared memory one thread block may use on the current GPU, in bytes (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties()
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


SHARED_MEMORY = _shared_memory_per_block()

# A flex forward tile of BLOCK_M queries x BLOCK_N keys with `stages` key/value tiles in flight needs
# about itemsize * head_dim * (BLOCK_M + 2 * BLOCK_N * stages) bytes of shared memory. Inductor's
# default on Ampere and newer (128 x 64, 3 stages) is 128 KB at head dim 128 in bf16: A100, H100 and
# B200 allow 163-227 KB per block, but RTX 30xx/40xx/50xx, A10, L4 and L40 only 99 KB, where Triton
# stops with OutOfResources at the first step. Those get this tile (80 KB); num_stages also caps
# the backward kernels.
_FLEX_DEFAULT_TILE = (128, 64, 3)
_FLEX_SMALL_TILE = (64, 64, 2)


def _flex_tile_bytes(head_dim, itemsize, tile):
    block_m, block_n, stages = tile
    return itemsize * head_dim * (block_m + 2 * block_n * stages)


def flex_kernel_options(head_dim, itemsize, shared_memory=None):
    """FlexAttention's kernel_options on this GPU (or one with `shared_memory` bytes per block):
    None when inductor's defaults fit, smaller tiles when only those fit, False when nothing does
    (windowed layers then run as masked SDPA)."""
    if torch.version.hip:  # inductor's ROCm configs are sized for AMD's shared memory (LDS) already
        return None
    smem = SHARED_MEMORY if shared_memory is None else shared_memory
    if _flex_tile_bytes(head_dim, itemsize, _FLEX_DEFAULT_TILE) <= smem:
        return None
    if _flex_tile_bytes(head_dim, itemsize, _FLEX_SMALL_TILE) <= smem:
        block_m, block_n, stages = _FLEX_SMALL_TILE
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_stages": stages, "num_warps": 4}
    return False


def describe(head_dim):
    """One line for the training log: what attention runs on here, at this head dim."""
    if BACKEND == "fa3":
        return "FlashAttention-3"
    if BACKEND == "sdpa":
        return "SDPA (sliding windows as masked SDPA)"
    itemsize = torch.empty((), dtype=COMPUTE_DTYPE).element_size()
    options = flex_kernel_options(head_dim, itemsize)
    smem = f"{SHARED_MEMORY // 1024} KB of shared memory per block"
    if options is False:
        flex = f"sliding windows as masked SDPA (flex's tiles do not fit in {smem})"
    elif options:
        flex = f"FlexAttention for sliding windows, {options['BLOCK_M']}x{options['BLOCK_N']} tiles to fit {smem}"
    else:
        flex = "FlexAttention for sliding windows"
    fa3 = f"; no FA3: {FA3_ERROR}" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 else ""
    return f"flex ({flex} in compiled models, SDPA otherwise{fa3})"


# -----------------------------------------------------------------------------
# SDPA (reference semantics for all backends)

_mask_cache = {}


def _build_window_mask(Tq, Tk, left, device):
    row = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    col = torch.arange(Tk, device=device)[None, :]
    mask = col <= row
    if left >= 0:
        mask = mask & (row - col <= left)
    return mask


def _window_mask(Tq, Tk, left, device):
    """Boolean (Tq, Tk) mask, True = may attend. Query row r sits at absolute position
    (Tk - Tq) + r; it sees column c iff c <= row and (windowed) row - c <= left."""
    if torch.compiler.is_compiling():
        # part of the graph: filling the cache while tracing would make the next call recompile
        return _build_window_mask(Tq, Tk, left, device)
    key = (Tq, Tk, left, str(device))
    mask = _mask_cache.get(key)
    if mask is None:
        # a normal tensor even when first asked for under inference_mode (evaluation): training at
        # the same length must be able to save it for backward
        with torch.inference_mode(False):
            mask = _build_window_mask(Tq, Tk, left, device)
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
# FlexAttention (sliding windows inside compiled models on CUDA without FA3)

FLEX_BLOCK = 128  # flex's sparse block: the mask is stored per tile of 128 queries x 128 keys


def _ordered_blocks(tiles):
    """A (n_q, n_kv) boolean tile map as BlockMask wants it: per query tile, how many key tiles
    are set, (1, 1, n_q) int32, and their indices first, (1, 1, n_q, n_kv) int32."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


def sliding_block_mask(T, left, device):
    """FlexAttention's BlockMask for causal attention with a window of `left` over T positions,
    built from a few tensor ops rather than create_block_mask: cheap to trace, so each compiled
    call builds its own and no cache (module state read while tracing) makes later calls recompile.
    A tile is skipped when none of its (query, key) pairs is visible, runs unmasked when all are,
    and through the mask otherwise; tiles that run past T always go through the mask (padding)."""
    n = -(-T // FLEX_BLOCK)
    i = torch.arange(n, device=device)[:, None]  # query tile
    j = torch.arange(n, device=device)[None, :]  # key tile
    q_first, q_last = i * FLEX_BLOCK, ((i + 1) * FLEX_BLOCK).clamp(max=T) - 1
    k_first, k_last = j * FLEX_BLOCK, ((j + 1) * FLEX_BLOCK).clamp(max=T) - 1
    some = (k_first <= q_last) & (q_first - k_last <= left)  # the closest pair is visible
    inside = ((i + 1) * FLEX_BLOCK <= T) & ((j + 1) * FLEX_BLOCK <= T)
    every = inside & (k_last <= q_first) & (q_last - k_first <= left)  # the farthest pair is visible

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)

    return BlockMask.from_kv_blocks(*_ordered_blocks(some & ~every), *_ordered_blocks(every),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=sliding_causal, seq_lengths=(T, T))


def _flex_attention(q, k, v, left, scale, kernel_options):
    block_mask = sliding_block_mask(q.size(1), left, q.device)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1),
                       kernel_options=kernel_options)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# Public API


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), softmax_scale=None):
    """Attention over a whole sequence (no cache). q (B, T, H, D), k/v (B, T, Hkv, D)."""
    if BACKEND == "fa3":
        y = _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale)
        return y[0] if isinstance(y, tuple) else y  # older FA3 builds also return the logsumexp
    left = window_size[0]
    T = q.size(1)
    # flex only while torch.compile traces the model: uncompiled, it would need a compile of its
    # own per sequence length (evaluation sees many) or run as a slow dense reference
    if BACKEND == "flex" and causal and 0 <= left < T - 1 and torch.compiler.is_compiling():
        options = flex_kernel_options(q.size(-1), q.element_size()) if q.is_cuda else None
        if options is not False:
            return _flex_attention(q, k, v, left, softmax_scale, options)
    return _sdpa(q, k, v, causal, left, softmax_scale)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, causal=True,
                            window_size=(-1, -1), softmax_scale=None):
    """Attention for new queries against a KV cache. k_cache/v_cache (B, T_max, Hkv, D) are
    written in place at [pos, pos + T_new) with the new k/v, where pos = cache_seqlens[0] (all
    rows at the same position); queries then attend over cache[:pos + T_new]. cache_seqlens is
    *not* advanced here: the model does that after its last layer, since every layer writes at
    the same positions."""
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


def decode_attention(q, k, v, k_cache, v_cache, layer, pos, mask, enable_gqa=None, slots=None):
    """Static-shape decode: one new token per row, each row at its own position. Made for
    torch.compile and CUDA graphs (no host sync, no data-dependent shapes).

    q (B, 1, H, D), k/v (B, 1, Hkv, D). k_cache/v_cache are the whole caches (n_layer, R, T_max,
    Hkv, D) of R >= B rows, of which the first B decode; row b's new key/value are written in
    place at [layer, b, pos[b]] (pos: int64 (B,)). The write indexes the full tensor rather than
    a per-layer view, so the compiler updates the cache in place instead of copying it back every
    step. `slots` (eager steps) is b * T_max + pos[b], made once per step: the write is then one
    index_copy_ into the flattened layer. `mask` (B, L), boolean or additive (0 or -inf), says
    which of the first L cache slots each row may see (the caller builds it from pos and the
    layer's window, once per step); only those L slots are read, so the caller keeps L a bucket
    above the longest row instead of T_max."""
    B = q.size(0)
    if slots is not None:
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache[layer].view(-1, *cache.shape[3:]).index_copy_(0, slots, new.squeeze(1))  # a view: written in place
    else:
        rows = torch.arange(B, device=q.device)
        layer_idx = torch.full((B,), layer, dtype=torch.long, device=q.device)
        k_cache.index_put_((layer_idx, rows, pos), k[:, 0])
        v_cache.index_put_((layer_idx, rows, pos), v[:, 0])
    L = mask.size(1)
    if enable_gqa is None:
        enable_gqa = q.size(2) != k.size(2)
    keys, values = k_cache[layer, :B, :L], v_cache[layer, :B, :L]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                       attn_mask=mask.view(B, 1, 1, L), enable_gqa=enable_gqa)
    return y.transpose(1, 2)


def decode_mask(pos, kv_len, left):
    """(B, kv_len) boolean: slot c is visible to a query at pos[b] iff c <= pos[b] and, with a
    window, pos[b] - c <= left (the same rule as the full forward)."""
    delta = pos[:, None] - torch.arange(kv_len, device=pos.device)[None, :]
    mask = delta >= 0
    if left >= 0:
        mask = mask & (delta <= left)
    return mask
