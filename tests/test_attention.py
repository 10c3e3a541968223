"""Attention backends and the KV cache, checked against attention
computed by hand with an explicit mask."""

import importlib
import logging
import math
import sys
import types

import pytest
import torch

import nanochat.attention as attention
from nanochat.attention import flash_attn_func, flash_attn_with_kvcache
from nanochat.engine import KVCache

torch.set_num_threads(1)


def reference_attention(q, k, v, left=-1, scale=None):
    """Dense attention in float64 with the causal (and windowed) mask: query row r sits at absolute position
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
    assert not attention.HAS_FA3 and attention.FA3_ERROR == "no CUDA device"
    assert attention.describe(128) == "SDPA (sliding windows as masked SDPA)"


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
# Backend choice on (faked) GPUs: FA3 through the `kernels` package, loud when it cannot load


@pytest.fixture
def reimport(monkeypatch):
    """Re-run attention's import-time choices on a faked CUDA GPU: reimport(capability, kernels,
    shared_memory) -> the module. `kernels` is what `import kernels` yields (None: not installed).
    The real module state is restored afterwards."""
    import nanochat.common as common

    def run(capability=(9, 0), kernels=None, shared_memory=232448, dtype=torch.bfloat16):
        props = types.SimpleNamespace(shared_memory_per_block_optin=shared_memory, shared_memory_per_block=49152)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setitem(sys.modules, "kernels", kernels)
        monkeypatch.setattr(common, "COMPUTE_DTYPE", dtype)
        return importlib.reload(attention)

    try:
        yield run
    finally:
        monkeypatch.undo()
        importlib.reload(attention)
        assert attention.BACKEND == "sdpa" and attention.COMPUTE_DTYPE == torch.float32


def fa3_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "FlashAttention-3" in r.getMessage()]


def test_hopper_without_kernels_package_warns_and_uses_flex(reimport, caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        att = reimport(capability=(9, 0), kernels=None)
    assert not att.HAS_FA3 and att.BACKEND == "flex"
    assert att.FA3_ERROR == "the `kernels` package is not installed"
    [msg] = fa3_warnings(caplog)
    assert "kernels` package is not installed" in msg and "pip install 'kernels>=0.14'" in msg
    assert "no FA3: the `kernels` package is not installed" in att.describe(128)


def test_hopper_kernel_that_fails_to_load_warns_with_the_reason(reimport, caplog):
    def get_kernel(repo, version=None, **kwargs):
        raise FileNotFoundError("no build for torch213-cxx11-cu130-x86_64-linux")

    with caplog.at_level(logging.WARNING, logger="nanochat"):
        att = reimport(capability=(9, 0), kernels=types.SimpleNamespace(get_kernel=get_kernel))
    assert att.BACKEND == "flex"
    [msg] = fa3_warnings(caplog)
    assert "FileNotFoundError: no build for torch213" in msg


def test_hopper_loads_fa3_from_kernels_community(reimport, caplog):
    calls = []
    q, k, v = qkv(Hkv=2)

    def fa3_func(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None):
        calls.append((causal, window_size, softmax_scale))
        return q * 2, torch.zeros(1)  # FA3 builds that also return the logsumexp

    def get_kernel(repo, version=None, **kwargs):
        calls.append((repo, version))
        return types.SimpleNamespace(flash_attn_func=fa3_func, flash_attn_with_kvcache=None)

    with caplog.at_level(logging.WARNING, logger="nanochat"):
        att = reimport(capability=(9, 0), kernels=types.SimpleNamespace(get_kernel=get_kernel))
    assert att.HAS_FA3 and att.BACKEND == "fa3" and att.FA3_ERROR is None
    assert fa3_warnings(caplog) == []
    y = att.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))
    torch.testing.assert_close(y, q * 2)
    assert calls == [("kernels-community/flash-attn3", 1), (True, (8, 0), None)]
    assert att.describe(128) == "FlashAttention-3"


def test_fa3_is_not_wanted_off_hopper_or_outside_bf16(reimport, caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        att = reimport(capability=(8, 9), kernels=None, shared_memory=101376)
        assert att.BACKEND == "flex" and "8.9" in att.FA3_ERROR
        assert "64x64 tiles to fit 99 KB" in att.describe(128)
        att = reimport(capability=(9, 0), kernels=None, dtype=torch.float32)
        assert att.BACKEND == "flex"  # fp32 compute: FA3 has no fp32 kernels, so nothing to warn about
    assert fa3_warnings(caplog) == []


# -----------------------------------------------------------------------------
# FlexAttention: tiles sized to shared memory, block masks built in-graph, only in compiled models


@pytest.mark.parametrize("head_dim, itemsize, smem, expected", [
    (128, 2, 232448, None),  # H100/H200/B200 (227 KB): inductor's defaults
    (128, 2, 166912, None),  # A100 (163 KB)
    (128, 2, 101376, "small"),  # RTX 3090/4090/5090, A10, L4, L40 (99 KB): default tile needs 128 KB
    (64, 2, 101376, None),  # head dim 64 fits there with the defaults
    (128, 4, 166912, "small"),  # fp32 on an A100
    (128, 2, 65536, False),  # 64 KB (e.g. T4): not even small tiles, masked SDPA instead
])
def test_flex_kernel_options_fit_shared_memory(head_dim, itemsize, smem, expected):
    options = attention.flex_kernel_options(head_dim, itemsize, shared_memory=smem)
    if expected == "small":
        assert options == {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2, "num_warps": 4}
        assert attention._flex_tile_bytes(head_dim, itemsize, (64, 64, 2)) <= smem
    else:
        assert options is expected
    # the estimate reproduces what Triton asks for with the default tile at head dim 128 in bf16
    assert attention._flex_tile_bytes(128, 2, attention._FLEX_DEFAULT_TILE) == 131072


@pytest.mark.parametrize("T, left", [(T, left) for T in (128, 256, 300, 528, 688)
                                     for left in (0, 1, 100, 127, 128, 129, 255, 256, 300, 511) if left < T - 1])
def test_sliding_block_mask_matches_create_block_mask(T, left):
    """Windows narrower than the sequence (wider ones are plain causal attention), tiles whole and partial."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= left)

    ref = create_block_mask(sliding_causal, None, None, T, T, device="cpu")
    got = attention.sliding_block_mask(T, left, torch.device("cpu"))
    for count, index in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                         ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n_ref, n_got = getattr(ref, count), getattr(got, count)
        assert torch.equal(n_ref, n_got), count
        for row, n in enumerate(n_ref[0, 0].tolist()):
            assert set(getattr(ref, index)[0, 0, row, :n].tolist()) == set(getattr(got, index)[0, 0, row, :n].tolist())
    assert got.seq_lengths == (T, T)


def _graphs_backend(graphs):
    """A torch.compile backend that keeps each FX graph dynamo hands it and runs it eagerly."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_flex_runs_inside_compiled_models_and_matches_reference():
    graphs = []
    q, k, v = qkv(B=1, T=300, H=4, Hkv=2)
    try:
        attention.set_backend("flex")
        f = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, window_size=(100, 0)), backend=_graphs_backend(graphs),
                          fullgraph=True, dynamic=False)
        y = f(q, k, v)
    finally:
        attention.set_backend(None)
    torch.testing.assert_close(y.double(), reference_attention(q, k, v, 100), atol=1e-5, rtol=1e-5)
    [gm] = graphs
    assert any("flex_attention" in str(node.target) for node in gm.graph.nodes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex trains only on CUDA (no CPU backward)")
@pytest.mark.parametrize("shared_memory", [None, 101376])  # this GPU's tiles; an RTX 4090's
def test_compiled_flex_trains_like_sdpa_on_cuda(shared_memory, monkeypatch):
    if shared_memory is not None:
        monkeypatch.setattr(attention, "SHARED_MEMORY", shared_memory)
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in qkv(B=2, T=512, H=4, Hkv=2, D=128))
    g = torch.randn(2, 512, 4, 128, device="cuda", dtype=torch.bfloat16)
    outs = {}
    try:
        for name in ("sdpa", "flex"):
            attention.set_backend(name)
            f = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, window_size=(128, 0)), dynamic=False,
                              fullgraph=True)
            y = f(q, k, v)
            outs[name] = (y, *torch.autograd.grad(y, (q, k, v), g))
    finally:
        attention.set_backend(None)
    for a, b in zip(outs["flex"], outs["sdpa"]):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def _tiny_gpt(window_pattern="SL", seq_len=256):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          window_pattern=window_pattern))
    model.init_weights()
    with torch.no_grad():  # init leaves output projections at zero: give attention a say in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.size(1) ** -0.5)
    return model.eval()


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_compiled_model_compiles_once_and_eval_lengths_compile_nothing(backend):
    """The second call of a compiled model must not recompile (no module state is created or
    filled while tracing), and the uncompiled model, as evaluation calls it at one length after
    another, must not compile anything."""
    from torch._dynamo.utils import counters

    model = _tiny_gpt()  # windows: S = 128 of T = 256, L = 256
    x = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(0))
    try:
        attention.set_backend(backend)
        attention._mask_cache.clear()
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, dynamic=False, backend="eager")
        with torch.no_grad():  # flex has no CPU backward
            first = compiled(x)
            frames = counters["frames"]["total"]
            second = compiled(x)
            assert counters["frames"]["total"] == frames, "the second call recompiled"
            torch.testing.assert_close(second, first, rtol=0, atol=0)
            eager = model(x)
            torch.testing.assert_close(first, eager, atol=2e-4, rtol=2e-4)
            for T in range(528, 689, 16):  # CORE rows padded to multiples of 16
                model(torch.randint(0, 128, (1, T)))
            assert counters["frames"]["total"] == frames, "an eager forward compiled something"
    finally:
        attention.set_backend(None)
        torch._dynamo.reset()


def test_window_mask_first_built_under_inference_mode_still_trains():
    """Evaluation (inference_mode) may be the first to ask for a training length's mask; the
    cached mask must then still be usable by a forward that autograd records (CUDA's SDPA saves
    the mask for backward, and an inference tensor cannot be saved)."""
    attention._mask_cache.clear()
    q, k, v = qkv(T=24, Hkv=2)
    with torch.inference_mode():
        flash_attn_func(q, k, v, causal=True, window_size=(6, 0))
    [mask] = attention._mask_cache.values()
    assert not mask.is_inference()
    q, k, v = qkv(T=24, Hkv=2, requires_grad=True)
    y = flash_attn_func(q, k, v, causal=True, window_size=(6, 0))
    y.sum().backward()
    ref = reference_attention(q, k, v, 6)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert q.grad is not None and torch.isfinite(q.grad).all()


# -----------------------------------------------------------------------------
# KVCache


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
