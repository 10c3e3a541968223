"""The GPT model (docs/model.md): shapes, causality, parameter and FLOP accounting, windows, value
embeddings, initialization, the KV-cache path against the full forward, the fused loss, activation
checkpointing, the naive sampler and the optimizer parameter groups."""

import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from nanochat.common import COMPUTE_DTYPE, NanochatError
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig

torch.set_num_threads(1)


def build(n_layer=2, n_embd=64, n_head=2, n_kv_head=None, sequence_len=64, vocab_size=100, window_pattern="L",
          device="cpu", randomize=True, seed=0):
    """A tiny model built the way callers build it (meta device, to_empty, init_weights). With
    `randomize`, every parameter gets random values, so that paths the init switches off
    (zero output projections, smear_lambda = 0) carry signal in the tests."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                    p.normal_(0.0, 0.7 / math.sqrt(p.size(1)))
                elif p.ndim == 2:
                    p.normal_(0.0, 1.0)
            model.resid_lambdas.uniform_(0.8, 1.2)
            model.x0_lambdas.uniform_(0.1, 0.3)
            model.smear_lambda.fill_(0.6)
            model.backout_lambda.fill_(0.3)
    model.eval()
    return model


def tokens(B, T, vocab=100, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def depth_model_meta(depth, head_dim=128, sequence_len=2048, window_pattern="SSSL", vocab_size=32768):
    """--depth's shape: model_dim = ceil(depth*64/head_dim)*head_dim, n_head = n_kv_head = model_dim/head_dim."""
    dim = math.ceil(depth * 64 / head_dim) * head_dim
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=dim // head_dim,
                       n_kv_head=dim // head_dim, n_embd=dim, window_pattern=window_pattern)
    with torch.device("meta"):
        return GPT(config)


# -----------------------------------------------------------------------------
# config, structure, accounting


def test_config_defaults():
    c = GPTConfig()
    assert (c.sequence_len, c.vocab_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.window_pattern) == \
        (2048, 32768, 12, 6, 6, 768, "SSSL")


def test_state_dict_names_match_the_original_nanochat():
    model = build(n_layer=3, randomize=False)
    expected = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas", "smear_gate.weight",
                "smear_lambda", "backout_lambda"}
    for i in range(3):
        expected |= {f"transformer.h.{i}.attn.{n}.weight" for n in ("c_q", "c_k", "c_v", "c_proj")}
        expected |= {f"transformer.h.{i}.mlp.{n}.weight" for n in ("c_fc", "c_proj")}
    for i in (0, 2):  # VE layers of a depth-3 model
        expected |= {f"transformer.h.{i}.attn.ve_gate.weight", f"value_embeds.{i}.weight"}
    sd = model.state_dict()
    assert set(sd) == expected  # rotary cos/sin are non-persistent
    assert sd["smear_lambda"].shape == (1,) and sd["backout_lambda"].shape == (1,)
    assert sd["smear_gate.weight"].shape == (1, 24)
    assert sd["transformer.h.0.attn.ve_gate.weight"].shape == (2, 12)
    assert sd["transformer.wte.weight"].shape == (128, 64)  # vocab 100 padded to 128
    assert sd["value_embeds.0.weight"].shape == (128, 64)
    clone = build(n_layer=3, randomize=False, seed=5)
    clone.load_state_dict(sd, strict=True)


def test_gqa_shapes():
    model = build(n_layer=1, n_embd=64, n_head=4, n_kv_head=2, randomize=False)
    attn = model.transformer.h[0].attn
    assert attn.c_q.weight.shape == (64, 64) and attn.c_k.weight.shape == (32, 64) and attn.c_v.weight.shape == (32, 64)
    assert model.value_embeds["0"].weight.shape == (128, 32)


@pytest.mark.parametrize("n_layer,expected", [(1, [0]), (2, [1]), (3, [0, 2]), (4, [1, 3]), (6, [1, 3, 5])])
def test_value_embedding_layers(n_layer, expected):
    model = depth_model_meta(n_layer, head_dim=64, vocab_size=512)
    assert sorted(int(k) for k in model.value_embeds) == expected
    assert [i for i, b in enumerate(model.transformer.h) if b.attn.ve_gate is not None] == expected


def test_window_sizes():
    sizes = gpt.compute_window_sizes(GPTConfig(sequence_len=2048, n_layer=12, window_pattern="SSSL"))
    assert [w for w, _ in sizes] == [512, 512, 512, 2048] * 3
    sizes = gpt.compute_window_sizes(GPTConfig(sequence_len=512, n_layer=6, window_pattern="SSSL"))
    assert [w for w, _ in sizes] == [128, 128, 128, 512, 128, 512]  # last layer forced to L
    sizes = gpt.compute_window_sizes(GPTConfig(sequence_len=2048, n_layer=3, window_pattern="S"))
    assert [w for w, _ in sizes] == [512, 512, 2048]
    sizes = gpt.compute_window_sizes(GPTConfig(sequence_len=1000, n_layer=2, window_pattern="sl"))
    assert sizes == [(256, 0), (1000, 0)]  # ceil(1000/4/128)*128 = 256; L is sequence_len, not -1
    with pytest.raises(NanochatError):
        depth_model_meta(2, head_dim=64, window_pattern="SXL")


def test_bad_head_counts_are_clear_errors():
    with pytest.raises(NanochatError):
        GPT(GPTConfig(n_layer=1, n_embd=64, n_head=3, n_kv_head=3))
    with pytest.raises(NanochatError):
        GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=3))


@pytest.mark.parametrize("args,table", [
    # wte, VE, lm_head, matrices, total, scaling (millions), FLOPs/token (docs/model.md, "Accounting")
    (dict(depth=6, head_dim=64, sequence_len=512, window_pattern="L"), (12.58, 37.75, 12.58, 10.62, 73.53, 23.20, 1.534e8)),
    (dict(depth=12), (25.2, 151.0, 25.2, 84.9, 286.3, 110.1, 7.597e8)),
    (dict(depth=20), (41.9, 419.4, 41.9, 393.2, 896.5, 435.2, 2.886e9)),
])
def test_param_counts_and_flops_match_spec_table(args, table):
    model = depth_model_meta(**args)
    counts = model.num_scaling_params()
    wte, ve, lm_head, matrices, total, scaling, flops = table
    digits = 2 if args["depth"] == 6 else 1
    for key, want in [("wte", wte), ("value_embeds", ve), ("lm_head", lm_head), ("transformer_matrices", matrices),
                      ("total", total)]:
        assert round(counts[key] / 1e6, digits) == want, key
    assert round((counts["transformer_matrices"] + counts["lm_head"]) / 1e6, digits) == scaling
    assert counts["scalars"] == 2 * args["depth"] + 24 + 1 + 1
    assert float(f"{model.estimate_flops():.4g}") == flops


def test_flops_formula_is_structural():
    model = depth_model_meta(4, head_dim=64, sequence_len=256, window_pattern="L", vocab_size=8192)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert n_linear == model.num_scaling_params()["transformer_matrices"] + model.num_scaling_params()["lm_head"] + 24
    assert model.estimate_flops() == 6 * n_linear + 4 * 12 * 256 * 256
    assert model.decode_flops(100) == 2 * n_linear + 4 * 4 * 256 * 100
    assert model.decode_flops(1000) == 2 * n_linear + 4 * 4 * 256 * 256  # window caps the context
    assert model.kv_bytes_per_token(torch.bfloat16) == 4 * 2 * 4 * 64 * 2
    assert model.prefill_flops(3) == 3 * 2 * n_linear + 4 * 4 * 256 * (1 + 2 + 3)


# -----------------------------------------------------------------------------
# initialization and precision


def test_init_statistics():
    model = build(n_layer=4, n_embd=128, n_head=2, vocab_size=4096, randomize=False)
    s = math.sqrt(3) / math.sqrt(128)
    wte = model.transformer.wte.weight.float()
    assert abs(wte.std().item() - 0.8) < 0.02 and abs(wte.mean().item()) < 0.01
    assert abs(model.lm_head.weight.std().item() - 0.001) < 5e-5
    for block in model.transformer.h:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
            w = lin.weight
            assert w.abs().max() <= s and abs(w.std().item() - 1 / math.sqrt(128)) < 0.005
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
        assert block.mlp.c_fc.weight.abs().max() <= 0.4 * s
        assert block.mlp.c_fc.weight.abs().max() > 0.35 * s
        if block.attn.ve_gate is not None:
            g = block.attn.ve_gate.weight
            assert g.min() >= 0 and g.max() <= 0.02
    for table in model.value_embeds.values():
        assert table.weight.abs().max() <= s
    i = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(model.resid_lambdas.data, 1.15 - 0.10 * i / 3)
    torch.testing.assert_close(model.x0_lambdas.data, 0.20 - 0.15 * i / 3)
    assert model.smear_lambda.item() == 0.0
    assert abs(model.backout_lambda.item() - 0.2) < 1e-7
    assert model.smear_gate.weight.min() >= 0 and model.smear_gate.weight.max() <= 0.02
    single = build(n_layer=1, randomize=False)
    assert single.resid_lambdas.item() == pytest.approx(1.15) and single.x0_lambdas.item() == pytest.approx(0.20)


def test_rotary_tables():
    model = build(n_layer=1, sequence_len=32, randomize=False)
    hd = 32
    assert model.cos.shape == (1, 320, 1, hd // 2)  # 10 x sequence_len positions
    assert model.cos.device.type == "cpu" and model.cos.dtype == COMPUTE_DTYPE
    inv_freq = 1.0 / (100000 ** (torch.arange(0, hd, 2).float() / hd))
    torch.testing.assert_close(model.cos[0, 7, 0].float(), torch.cos(7 * inv_freq))
    torch.testing.assert_close(model.sin[0, 7, 0].float(), torch.sin(7 * inv_freq))


def test_rotary_sign_and_pairing():
    """Half-split pairs (i, i + D/2), rotated by -theta: y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin."""
    x = torch.randn(1, 3, 2, 8)
    cos, sin = torch.rand(1, 3, 1, 4), torch.rand(1, 3, 1, 4)
    y = gpt.apply_rotary_emb(x, cos, sin)
    x1, x2 = x[..., :4], x[..., 4:]
    torch.testing.assert_close(y[..., :4], x1 * cos + x2 * sin)
    torch.testing.assert_close(y[..., 4:], x2 * cos - x1 * sin)


@pytest.mark.parametrize("dtype,embed_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_embedding_dtypes(monkeypatch, dtype, embed_dtype):
    monkeypatch.setattr(gpt, "COMPUTE_DTYPE", dtype)
    model = build(n_layer=2, randomize=False)
    assert model.transformer.wte.weight.dtype == embed_dtype
    assert all(t.weight.dtype == embed_dtype for t in model.value_embeds.values())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)  # fp32 masters
    for p in (model.resid_lambdas, model.x0_lambdas, model.smear_lambda, model.backout_lambda):
        assert p.dtype == torch.float32
    if dtype == torch.bfloat16:  # a bf16 forward runs and returns fp32 logits
        logits = model(tokens(1, 8))
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


# -----------------------------------------------------------------------------
# forward


def test_forward_shapes_and_softcap():
    model = build()
    idx = tokens(2, 16)
    logits = model(idx)
    assert logits.shape == (2, 16, 100) and logits.dtype == torch.float32  # padding sliced off
    assert logits.abs().max() < 15.0
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx, idx, loss_reduction="none").shape == (32,)
    torch.testing.assert_close(model(idx, idx, loss_reduction="sum"), loss * 32)


def test_forward_matches_a_literal_transcription_of_the_spec():
    """Re-derive the logits from the parameters with plain ops, in the order docs/model.md gives."""
    model = build(n_layer=3, n_embd=64, n_head=4, n_kv_head=2, sequence_len=32)
    idx = tokens(2, 12)
    cfg, B, T = model.config, 2, 12
    H, Hkv, D = 4, 2, 16
    norm = lambda t: F.rms_norm(t, (t.size(-1),))
    x = norm(model.transformer.wte(idx).float())
    gate = model.smear_lambda * torch.sigmoid(x[:, 1:, :24] @ model.smear_gate.weight.t())
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
    x0 = x
    cos, sin = model.cos[:, :T], model.sin[:, :T]

    def rope(t):
        t1, t2 = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([t1 * cos + t2 * sin, -t1 * sin + t2 * cos], -1)

    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        a = block.attn
        h = norm(x)
        q = (h @ a.c_q.weight.t()).view(B, T, H, D)
        k = (h @ a.c_k.weight.t()).view(B, T, Hkv, D)
        v = (h @ a.c_v.weight.t()).view(B, T, Hkv, D)
        if str(i) in model.value_embeds:
            ve = model.value_embeds[str(i)](idx).view(B, T, Hkv, D)
            v = v + 3 * torch.sigmoid(h[..., :12] @ a.ve_gate.weight.t()).unsqueeze(-1) * ve
        q, k = norm(rope(q)) * 1.2, norm(rope(k)) * 1.2
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                           v.repeat_interleave(2, 2).transpose(1, 2), is_causal=True)
        x = x + y.transpose(1, 2).reshape(B, T, -1) @ a.c_proj.weight.t()
        m = block.mlp
        x = x + (F.relu(norm(x) @ m.c_fc.weight.t()) ** 2) @ m.c_proj.weight.t()
        if i == cfg.n_layer // 2:
            x_mid = x
    x = norm(x - model.backout_lambda * x_mid)
    logits = (x @ model.lm_head.weight.t())[..., :cfg.vocab_size]
    logits = 15 * torch.tanh(logits / 15)
    torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=1e-5)


def test_last_only_gives_the_last_positions_logits():
    """A prefill asks for the last position's logits only; they are those of the full output (to
    float rounding: one row's lm_head product may sum in another order than many rows')."""
    model = build(n_layer=3)
    idx = tokens(2, 20)
    with torch.inference_mode():
        full, last = model(idx), model(idx, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


def test_causality_is_exact():
    model = build(n_layer=2, window_pattern="L")
    idx = tokens(1, 20)
    base = model(idx)
    for t in (5, 13, 19):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 100
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])  # bit-identical before the change
        assert not torch.equal(out[:, t], base[:, t])


def test_loss_ignore_index_and_fused_head_matches_plain_ops():
    model = build()
    model.train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    targets[0, :5] = -1
    targets[1, 10:] = -1
    results = {}
    for fused in (True, False):
        model.fused_loss = fused
        for reduction in ("mean", "sum", "none"):
            model.zero_grad(set_to_none=True)
            loss = model(idx, targets, loss_reduction=reduction)
            weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
            (loss * weights).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[(fused, reduction)] = (loss.detach(), grads)
    model.fused_loss = None
    for reduction in ("mean", "sum", "none"):
        (l1, g1), (l0, g0) = results[(True, reduction)], results[(False, reduction)]
        torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
        assert g1.keys() == g0.keys()
        for name in g1:
            torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-4, msg=name)
    per_token = results[(True, "none")][0]
    assert (per_token.view(2, 16)[targets == -1] == 0).all()
    torch.testing.assert_close(results[(True, "mean")][0], per_token.sum() / (targets != -1).sum())
    # against F.cross_entropy on the model's own logits
    logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, 100), targets.view(-1), ignore_index=-1)
    torch.testing.assert_close(results[(True, "mean")][0], ref, atol=1e-5, rtol=1e-5)


def test_loss_without_grad_and_with_large_logits():
    model = build()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # logits far beyond the softcap
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    with torch.no_grad():
        fused = model(idx, targets, loss_reduction="none")
    logits = model(idx)
    assert logits.abs().max() > 14.0
    ref = F.cross_entropy(logits.view(-1, 100), targets.view(-1), reduction="none")
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_identical_loss_and_grads():
    model = build(n_layer=2)
    model.train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    out = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        loss = model(idx, targets)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(out[0][0], out[1][0])
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, atol=0, rtol=0, msg=name)


def test_every_parameter_gets_a_gradient():
    model = build(n_layer=3)
    model.train()
    model(tokens(2, 16), tokens(2, 16, seed=3)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -----------------------------------------------------------------------------
# KV cache path equals the full forward


def new_cache(model, batch_size, seq_len):
    c = model.config
    return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, "cpu", torch.float32)


@pytest.mark.parametrize("kw,T,chunks", [
    # two layers with windows 128 (S) and 512 (L): decode runs past the short window
    (dict(n_layer=2, n_head=4, n_kv_head=2, sequence_len=512, window_pattern="SL"), 160, [100, 30]),
    # "L" is sequence_len, not unlimited: beyond it every layer slides
    (dict(n_layer=3, sequence_len=16, window_pattern="L"), 40, [7, 1, 12]),
])
def test_kv_cache_prefill_and_decode_match_full_forward(kw, T, chunks):
    model = build(**kw)
    idx = tokens(2, T)
    with torch.no_grad():
        full = model(idx)
        cache = new_cache(model, 2, T)
        outs, pos = [], 0
        for n in chunks:  # prefill in chunks (T > 1 with pos > 0 uses the explicit mask)
            outs.append(model(idx[:, pos:pos + n], kv_cache=cache))
            pos += n
            assert cache.get_pos() == pos
        while pos < T:  # then one token at a time
            outs.append(model(idx[:, pos:pos + 1], kv_cache=cache))
            pos += 1
        assert cache.get_pos() == T
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_batch_prefill_then_decode():
    """The Engine's pattern: prefill a batch-1 cache, copy it into a batch-N cache, decode N rows."""
    model = build(n_layer=2, sequence_len=64)
    prompt = tokens(1, 10)
    with torch.no_grad():
        one = new_cache(model, 1, 20)
        model(prompt, kv_cache=one)
        many = new_cache(model, 3, 20)
        many.prefill(one)
        nxt = tokens(3, 1, seed=9)
        out = model(nxt, kv_cache=many)
        for b in range(3):
            full = model(torch.cat([prompt, nxt[b:b + 1]], 1))
            torch.testing.assert_close(out[b, -1], full[0, -1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# naive sampler


def test_generate_is_deterministic_and_greedy_at_temperature_zero():
    model = build(n_layer=2)
    prompt = [1, 2, 3, 4]
    a = list(model.generate(prompt, 8, temperature=1.0, seed=7))
    b = list(model.generate(prompt, 8, temperature=1.0, seed=7))
    assert a == b and len(a) == 8 and all(0 <= t < 100 for t in a)
    assert any(list(model.generate(prompt, 8, temperature=1.0, seed=s)) != a for s in range(8, 12))
    greedy = list(model.generate(prompt, 5, temperature=0.0))
    ids = list(prompt)
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    assert list(model.generate(prompt, 5, temperature=1.0, top_k=1, seed=3)) == greedy
    assert list(model.generate([5], 2, temperature=0.0))  # a one-token prompt works


# -----------------------------------------------------------------------------
# optimizer parameter groups


def test_param_groups():
    model = build(n_layer=2, n_embd=64, n_head=2, randomize=False)
    groups = model.param_groups(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1, scalar_lr=0.5)
    dscale = (64 / 768) ** -0.5
    adam = [g for g in groups if g["kind"] == "adamw"]
    muon = [g for g in groups if g["kind"] == "muon"]
    assert len(adam) == 6
    expected = [  # params, lr, betas, weight decay
        ([model.lm_head.weight], 0.004 * dscale, (0.8, 0.96), 0.01),
        ([model.transformer.wte.weight], 0.2 * dscale, (0.8, 0.995), 0.001),
        ([model.value_embeds["1"].weight], 0.2 * dscale * 0.5, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], 0.5 * 0.01, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], 0.5, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    for g, (params, lr, betas, wd) in zip(adam, expected):
        assert [id(p) for p in g["params"]] == [id(p) for p in params]
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"]
        assert g["betas"] == betas and g["eps"] == 1e-10 and g["weight_decay"] == wd
    shapes = [tuple(g["params"][0].shape) for g in muon]
    assert shapes == sorted(shapes) == [(2, 12), (64, 64), (64, 256), (256, 64)]
    assert [len(g["params"]) for g in muon] == [1, 8, 2, 2]
    for g in muon:
        assert all(tuple(p.shape) == tuple(g["params"][0].shape) for p in g["params"])
        assert (g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.02, 0.95, 5, 0.9, 0.1)
        assert g["initial_lr"] == 0.02
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    # the smear group ignores the LRs the caller passes
    other = model.param_groups(unembedding_lr=1, embedding_lr=1, matrix_lr=1, scalar_lr=1)
    assert other[5]["lr"] == 0.2


def test_setup_optimizer_uses_muonadamw():
    optim = pytest.importorskip("nanochat.optim")
    if not hasattr(optim, "MuonAdamW"):
        pytest.skip("nanochat.optim.MuonAdamW is not written yet")
    model = build(n_layer=1, randomize=False)
    opt = model.setup_optimizer()
    assert isinstance(opt, optim.MuonAdamW)
    assert all("initial_lr" in g and g["kind"] in ("adamw", "muon") for g in opt.param_groups)


def test_from_depth_rounds_the_width_up_to_whole_heads():
    c = GPTConfig.from_depth(12, sequence_len=2048, vocab_size=32768)  # d12, the shape the hyperparameters were tuned at
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (12, 768, 6, 6)
    assert (GPTConfig.from_depth(6, head_dim=64).n_embd, GPTConfig.from_depth(6, head_dim=64).n_head) == (384, 6)
    c = GPTConfig.from_depth(5, aspect_ratio=64, head_dim=128, window_pattern="L")  # 320 -> 384: 3 heads of 128
    assert (c.n_embd, c.n_head, c.window_pattern) == (384, 3, "L")
