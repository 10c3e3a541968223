"""The inference Engine: greedy decoding equals the naive full-forward sampler token
for token (smear, value embeddings, GQA, sliding windows, several prompts, batch 1 and N, one
prompt or several of different lengths), sampling semantics (independent first tokens, seeds,
temperature 0, top_k), the calculator tool state machine, generate_batch, context limits, and
the compiled decode step against the eager one."""

import math

import pytest
import torch

from nanochat.common import COMPUTE_DTYPE, NanochatError
from nanochat.engine import Engine, KVCache, sample_next_token
from nanochat.gpt import GPT, DecodeStep, DecodeWeights, GPTConfig

torch.set_num_threads(1)

# token-for-token equality with the full forward is exact math only in fp32 (bf16 rounds the
# prefill and decode paths differently); CI runs fp32
exact = pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="exact token equality needs NANOCHAT_DTYPE=float32")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from helpers import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


def build(vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_kv_head=None, sequence_len=128, window_pattern="L", seed=0,
          head_std=0.7):
    """A tiny model whose every parameter is random, so smear, value embeddings, backout and the
    output projections (all switched off or zero at init) shape the logits."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight":
                p.normal_(0.0, head_std / math.sqrt(p.size(1)) * 8)
            elif p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 0.7 / math.sqrt(p.size(1)))
            elif p.ndim == 2:
                p.normal_(0.0, 1.0)
        model.resid_lambdas.uniform_(0.8, 1.2)
        model.x0_lambdas.uniform_(0.1, 0.3)
        model.smear_lambda.fill_(0.6)
        model.backout_lambda.fill_(0.3)
    model.eval()
    assert len(model.value_embeds) > 0
    return model


def terminal_ids(tok):
    return {tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")}


def naive_greedy(model, tok, prompt, max_tokens):
    """model.generate (full forward per token) cut the way the Engine stops: at the terminal token."""
    out = []
    for t in model.generate(prompt, max_tokens, temperature=0.0):
        out.append(t)
        if t in terminal_ids(tok):
            break
    return out


def columns(engine, prompt, **kw):
    return [c for c, _ in engine.generate(prompt, **kw)]


PROMPTS = [[5], [291, 40, 41, 42, 43], list(range(60, 77))]


@exact
@pytest.mark.parametrize("kw", [dict(), dict(n_head=4, n_kv_head=2)])
def test_greedy_equals_naive_generate_batch_1_and_n(tokenizer, kw):
    model = build(**kw)
    engine = Engine(model, tokenizer, compile=False)
    long_enough = 0
    for prompt in PROMPTS:
        ref = naive_greedy(model, tokenizer, prompt, 24)
        long_enough += len(ref) >= 10
        got = [c[0] for c in columns(engine, prompt, max_tokens=24, temperature=0.0)]
        assert got == ref
        cols = columns(engine, prompt, num_samples=3, max_tokens=24, temperature=0.0)
        assert cols == [[t] * 3 for t in ref]
    assert long_enough >= 2  # the comparison covers real decoding, not just a first token


@exact
def test_sliding_window_decode_equals_full_forward(tokenizer):
    """Window pattern SL at sequence_len 384: the S layers see 128 keys, and decoding goes past that."""
    model = build(n_layer=2, n_head=4, n_kv_head=2, sequence_len=384, window_pattern="SL")
    assert model.window_sizes == [(128, 0), (384, 0)]
    # teacher-forced: every decode step's logits equal the full forward's at that position
    T0, T = 9, 200
    idx = torch.randint(0, 290, (2, T), generator=torch.Generator().manual_seed(3))
    c = model.config
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(2, c.n_kv_head, T, c.n_embd // c.n_head, c.n_layer, "cpu", COMPUTE_DTYPE)
        outs = [model(idx[:, :T0], kv_cache=cache)[:, -1]]
        prev = cache.prev_embedding.clone()
        for p in range(T0, T - 1):
            step = DecodeStep(cache.k_cache, cache.v_cache, prev, torch.full((2,), p, dtype=torch.long), min(T, 256))
            outs.append(model(idx[:, p:p + 1], kv_cache=step)[:, -1])
    torch.testing.assert_close(torch.stack(outs, 1), full[:, T0 - 1:T - 1], atol=2e-5, rtol=2e-5)
    # and greedy generation well past the short window matches the naive sampler
    engine = Engine(model, tokenizer, compile=False)
    prompt = list(range(100, 120))
    ref = [t for t in model.generate(prompt, 180, temperature=0.0)]
    got = [col[0] for col in columns(engine, prompt, max_tokens=180, temperature=0.0)]
    n = len(got)
    assert got == ref[:n]
    assert n == 180 or got[-1] in terminal_ids(tokenizer)


def test_multi_sample_first_tokens_differ_and_seeds(tokenizer):
    model = build(head_std=0.05)  # flat-ish logits: many tokens are likely
    engine = Engine(model, tokenizer, compile=False)
    prompt = [291, 40, 41]
    first = columns(engine, prompt, num_samples=16, max_tokens=1, temperature=1.0, seed=1)
    assert len(first) == 1 and len(set(first[0])) > 1  # each row drew its own first token
    a = columns(engine, prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    b = columns(engine, prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    assert a == b
    assert any(columns(engine, prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=s) != a for s in (8, 9))
    g0 = columns(engine, prompt, num_samples=2, max_tokens=12, temperature=0.0, seed=1)
    g1 = columns(engine, prompt, num_samples=2, max_tokens=12, temperature=0.0, seed=999, top_k=3)
    assert g0 == g1 and all(c[0] == c[1] for c in g0)


def test_top_k_zero_means_no_filtering(tokenizer):
    model = build(head_std=0.05)
    engine = Engine(model, tokenizer, compile=False)
    prompt = [291, 50, 51]
    none = columns(engine, prompt, num_samples=3, max_tokens=10, temperature=1.0, top_k=None, seed=5)
    zero = columns(engine, prompt, num_samples=3, max_tokens=10, temperature=1.0, top_k=0, seed=5)
    assert zero == none
    one = columns(engine, prompt, num_samples=3, max_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert one == columns(engine, prompt, num_samples=3, max_tokens=10, temperature=0.0)


def test_sample_next_token_top_k_stays_in_top_k():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ids = sample_next_token(logits, g, temperature=5.0, top_k=3)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == ids[:, None]).any(dim=1).all()
    assert torch.equal(sample_next_token(logits, g, 0.0, top_k=3), logits.argmax(-1))


# -----------------------------------------------------------------------------
# a stub model that emits a fixed script, for the tool state machine and stopping rules


class ScriptedModel:
    """Emits script[i] as the i-th generated token (then script[-1] forever), whatever it is fed.
    It has only forward(ids, kv_cache=...), the contract of the reference implementation's
    models, so the Engine drives it row by row; it leaves prev_embedding None."""

    def __init__(self, script, vocab_size, sequence_len=64):
        self.script = script
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.prompt_len = None
        self.fed = []

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        pos = kv_cache.get_pos()
        if pos == 0:
            self.prompt_len = T
        else:
            self.fed.append(ids[:, 0].tolist())
        assert pos + T <= kv_cache.k_cache.size(2) and kv_cache.prev_embedding is None
        kv_cache.advance(T)
        token = self.script[min(pos + T - self.prompt_len, len(self.script) - 1)]
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        logits[:, :, token] = 10.0
        return logits


def test_tool_state_machine_inserts_calculator_result(tokenizer):
    s = tokenizer.encode_special
    script = [s("<|python_start|>"), *tokenizer.encode("2+2"), s("<|python_end|>"), s("<|assistant_end|>")]
    model = ScriptedModel(script, tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer, compile=False)
    prompt = [tokenizer.get_bos_token_id(), s("<|user_start|>"), *tokenizer.encode("hi"), s("<|user_end|>"),
              s("<|assistant_start|>")]
    cols = list(engine.generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    tokens = [c[0] for c, _ in cols]
    masks = [m[0] for _, m in cols]
    assert tokens[-1] == s("<|assistant_end|>")
    text = tokenizer.decode(tokens[:-1])
    assert text == "<|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>"
    n_call = len(script) - 1  # python_start, the expression, python_end: sampled
    forced = len(tokens) - 1 - n_call
    assert forced == 2 + len(tokenizer.encode("4"))
    assert masks == [1] * n_call + [0] * forced + [1]
    assert all(c[0] == c[1] and m[0] == m[1] for c, m in cols)  # both rows went through the tool
    # the forced tokens were fed back to the model
    assert [f[0] for f in model.fed[::2]] == tokens[:-1]  # one call per row and step
    # generate_batch: prompt + generated without the terminal token, mask 0 on the prompt
    results, result_masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert results == [prompt + tokens[:-1]] * 2
    assert result_masks == [[0] * len(prompt) + masks[:-1]] * 2
    # forced tokens count toward max_tokens
    assert len(list(engine.generate(prompt, max_tokens=n_call + 1, temperature=0.0))) == n_call + 1


def test_calculator_failure_forces_nothing(tokenizer, monkeypatch):
    import nanochat.execution

    monkeypatch.setattr(nanochat.execution, "use_calculator", lambda expr: None)
    s = tokenizer.encode_special
    script = [s("<|python_start|>"), *tokenizer.encode("2+2"), s("<|python_end|>"), s("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tokenizer.get_vocab_size()), tokenizer, compile=False)
    results, masks = engine.generate_batch([1, 2], max_tokens=30, temperature=0.0)
    assert results[0] == [1, 2] + script[:-1] and masks[0] == [0, 0] + [1] * (len(script) - 1)


def test_stops_on_bos_and_at_the_context_limit(tokenizer):
    vocab = tokenizer.get_vocab_size()
    bos = tokenizer.get_bos_token_id()
    engine = Engine(ScriptedModel([7, 8, bos, 9], vocab), tokenizer, compile=False)
    assert [c[0] for c in columns(engine, [1], max_tokens=10, temperature=0.0)] == [7, 8, bos]
    # a model that never stops: generation ends when prompt + output fill the context (64)
    engine = Engine(ScriptedModel([7], vocab, sequence_len=64), tokenizer, compile=False)
    assert len(columns(engine, list(range(60)), max_tokens=100, temperature=0.0)) == 4
    assert len(columns(engine, list(range(10)), temperature=0.0)) == 54  # max_tokens=None: up to the context
    assert len(columns(engine, [1, 2], max_tokens=3, temperature=0.0)) == 3


def test_prompt_errors(tokenizer):
    engine = Engine(build(sequence_len=32), tokenizer, compile=False)
    with pytest.raises(NanochatError, match="empty"):
        next(engine.generate([], max_tokens=3))
    with pytest.raises(NanochatError, match="context"):
        next(engine.generate(list(range(32)), max_tokens=3))
    with pytest.raises(NanochatError, match="context"):
        engine.generate_batch(list(range(40)), max_tokens=3)
    with pytest.raises(NanochatError, match="context"):
        next(engine.generate_multi([[1, 2], list(range(32))], max_tokens=3))


# -----------------------------------------------------------------------------
# several different prompts in one batch


@exact
def test_generate_multi_greedy_equals_generate_per_prompt(tokenizer):
    model = build(n_head=4, n_kv_head=2, sequence_len=96)
    engine = Engine(model, tokenizer, compile=False)
    prompts = [[5], list(range(60, 77)), [291, 40, 41, 42, 43], list(range(10, 90))]  # the last has 16 tokens of room
    cols = list(engine.generate_multi(prompts, max_tokens=20, temperature=0.0))
    for b, prompt in enumerate(prompts):
        alone = [c[0] for c in columns(engine, prompt, max_tokens=20, temperature=0.0)]
        row = [c[b] for c, _ in cols]
        got = [t for t in row if t is not None]
        assert got == alone
        assert all(t is None for t in row[len(got):])  # once finished, a row only yields None
    assert len([c[3] for c, _ in cols if c[3] is not None]) <= 16  # stopped at the context limit


def test_generate_multi_rows_stop_independently(tokenizer):
    vocab = tokenizer.get_vocab_size()
    end = tokenizer.encode_special("<|assistant_end|>")
    model = ScriptedModel([7, 8, end, 9], vocab)
    engine = Engine(model, tokenizer, compile=False)
    cols = list(engine.generate_multi([[1, 2], [3, 4]], max_tokens=10, temperature=0.5, seeds=[1, 2]))
    assert [c for c, _ in cols] == [[7, 7], [8, 8], [end, end]]
    cols = list(engine.generate_multi([[1, 2], [3, 4]], max_tokens=2, temperature=0.0))
    assert [c for c, _ in cols] == [[7, 7], [8, 8]]


# -----------------------------------------------------------------------------
# the compiled decode step


@exact
def test_compiled_decode_gives_the_same_tokens(tokenizer):
    pytest.importorskip("torch._inductor")
    model = build(n_layer=1, sequence_len=64)
    eager = Engine(model, tokenizer, compile=False)
    compiled = Engine(model, tokenizer, compile=True)
    prompt = [291, 40, 41, 42]
    ref = columns(eager, prompt, num_samples=2, max_tokens=20, temperature=0.0)
    assert columns(compiled, prompt, num_samples=2, max_tokens=20, temperature=0.0) == ref
    assert compiled.compile  # it compiled, rather than falling back to eager
    sampled = columns(eager, prompt, num_samples=2, max_tokens=20, temperature=1.0, seed=3)
    assert columns(compiled, prompt, num_samples=2, max_tokens=20, temperature=1.0, seed=3) == sampled


@exact
def test_compiled_decode_compiles_once_per_shape_across_caches_and_engines(tokenizer):
    """The compiled step's cache is full length from the start and its shapes are static, so
    nothing that used to make a new cache recompiles: a second call, a position past where the
    cache used to grow (256), more rows within the same row bucket, a second Engine on the model."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = build(n_layer=1, sequence_len=2048)  # spans of 512, 1024 and 2048 positions
    eager = Engine(model, tokenizer, compile=False)
    first = Engine(model, tokenizer, compile=True)
    prompt = [291] + list(range(40, 289))  # 250 tokens: decoding runs from position 250 to 261
    kw = dict(num_samples=2, max_tokens=12, temperature=0.0)
    ref = columns(eager, prompt, **kw)

    def compiles(engine, **over):
        before = counters["frames"]["total"]
        assert columns(engine, prompt, **{**kw, **over}) == columns(eager, prompt, **{**kw, **over})
        assert engine.compile  # it compiled, rather than falling back to eager
        return counters["frames"]["total"] - before

    assert columns(first, prompt, **kw) == ref
    assert counters["frames"]["total"] >= 1
    sess = first.session()
    sess.add(prompt, n=3, max_tokens=2, temperature=0.0)
    sess.step()
    assert tuple(sess.k.shape[1:3]) == (4, 2048)  # three rows in a bucket of 4, the full length at once
    cache = sess.k
    sess.close()
    sess = first.session()
    sess.add(prompt, n=2, max_tokens=2, temperature=0.0)
    sess.step()
    assert sess.k is cache  # a closed session's cache is reused: the CUDA graphs replay on its addresses
    sess.close()
    sess = first.session()  # five rows (a bucket of 8), then one: the cache shrinks to a lone row's
    ids = sess.add(prompt, n=5, max_tokens=6, temperature=0.0)
    got = [sess.step()[0][1], sess.step()[0][1]]
    for row_id in ids[1:]:
        sess.cancel(row_id)
    while len(sess):
        got += [token for _, token, _, _ in sess.step()]
    assert sess.k.size(1) == 1 and got == [c[0] for c in ref[:6]]
    sess.close()
    assert compiles(first) == 0  # the second call
    assert compiles(first, num_samples=3) == 0  # three rows: the same bucket of 4
    second = Engine(model, tokenizer, compile=True)  # chat_sft builds one per ChatCORE run
    assert compiles(second) == 0
    assert compiles(second, num_samples=3, temperature=1.0, seed=5) == 0


@exact
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_failing_compile_falls_back_to_eager_with_the_same_tokens(tokenizer, monkeypatch, batch_invariant):
    """The compiled session's cache (one row for a lone row) stays in use after the fallback:
    the eager step, which pads a batch-invariant lone row to MIN_DECODE_ROWS, gets its rows."""
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    model = build(n_layer=1, sequence_len=64)
    ref = columns(Engine(model, tokenizer, compile=False, batch_invariant=batch_invariant), [291, 40], max_tokens=10,
                  temperature=0.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    engine = Engine(model, tokenizer, compile=True, batch_invariant=batch_invariant)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        assert columns(engine, [291, 40], max_tokens=10, temperature=0.0) == ref
    assert not engine.compile


@exact
def test_weight_copies_follow_in_place_updates(tokenizer):
    """When the masters are wider than the compute dtype, the engine decodes with cached
    compute-dtype copies; an in-place update of the masters (an RL step) must reach them."""
    model = build()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.data = m.weight.data.double()  # wider masters than the fp32 compute dtype
    engine = Engine(model, tokenizer, compile=False)
    prompt = [291, 40, 41, 42, 43]
    ref = naive_greedy(model, tokenizer, prompt, 16)
    assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref
    assert engine._weights and all(w.dtype == COMPUTE_DTYPE for w in engine._weights.values())
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place, like an optimizer step
    new_ref = naive_greedy(model, tokenizer, prompt, 16)
    assert new_ref != ref
    assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == new_ref


def test_lean_decode_step_matches_the_plain_one():
    """DecodeWeights (stacked q/k/v, scalars as floats) change how the step is computed, not what:
    logits, the written keys/values and the carried embeddings agree with the parameter path (to
    float rounding: one stacked matmul may sum in another order than three)."""
    model = build(n_head=4, n_kv_head=2, n_layer=3, sequence_len=256)
    c = model.config
    k = torch.randn(c.n_layer, 4, 256, c.n_kv_head, c.n_embd // c.n_head)
    v, prev = torch.randn_like(k), torch.randn(4, 1, c.n_embd)
    ids, pos = torch.tensor([[3], [40], [7]]), torch.tensor([5, 30, 0])
    with torch.inference_mode():
        out = {}
        for lean in (False, True):
            kk, vv, pp = k.clone(), v.clone(), prev.clone()
            weights = DecodeWeights(model, COMPUTE_DTYPE) if lean else None
            out[lean] = (model(ids, kv_cache=DecodeStep(kk, vv, pp, pos, 64, weights)), kk, vv, pp)
    for plain, lean in zip(out[False], out[True]):
        torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[True][3], out[False][3])  # the carried embeddings are no matmul's output


@exact
def test_decode_weights_follow_in_place_updates(tokenizer):
    """The eager step reads stacked q/k/v and the scalars as floats, made once; an in-place
    update of the parameters (an RL step) must reach them before the next step."""
    model = build()
    engine = Engine(model, tokenizer, compile=False)
    prompt = [291, 40, 41, 42, 43]
    ref = naive_greedy(model, tokenizer, prompt, 16)
    assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref
    for change in (lambda: model.transformer.h[0].attn.c_v.weight.mul_(-3.0), lambda: model.resid_lambdas.mul_(0.3)):
        with torch.no_grad():
            change()
        old, ref = ref, naive_greedy(model, tokenizer, prompt, 16)
        assert ref != old  # the change matters to the tokens
        assert [c[0] for c in columns(engine, prompt, max_tokens=16, temperature=0.0)] == ref


def test_interleaved_generations_do_not_share_a_cache(tokenizer):
    engine = Engine(build(), tokenizer, compile=False)
    p1, p2 = [291, 40, 41, 42, 43], list(range(60, 77))
    alone1 = columns(engine, p1, num_samples=2, max_tokens=12, temperature=0.0)
    alone2 = columns(engine, p2, num_samples=2, max_tokens=12, temperature=0.0)
    g1 = engine.generate(p1, num_samples=2, max_tokens=12, temperature=0.0)
    g2 = engine.generate(p2, num_samples=2, max_tokens=12, temperature=0.0)
    got1, got2 = [], []
    for a, b in zip(g1, g2):
        got1.append(a[0])
        got2.append(b[0])
    got1 += [c for c, _ in g1]
    got2 += [c for c, _ in g2]
    assert got1 == alone1 and got2 == alone2


# -----------------------------------------------------------------------------
# sessions: rows that join, leave and share a batch


def sampled_alone(engine, prompt, seed, **kw):
    return [c[0] for c in columns(engine, prompt, temperature=kw.pop("temperature", 1.0), seed=seed, **kw)]


def run_session(sess, joins=()):
    """Step until the session is empty; joins = [(step, add kwargs)] adds rows at those steps.
    Returns {row id: [tokens]} and the ids of the joined rows in order."""
    out, joined, step = {}, [], 0
    joins = list(joins)
    while len(sess) or joins:
        while joins and joins[0][0] == step:
            joined += sess.add(**joins.pop(0)[1])
        for rid, token, _, _ in sess.step():
            out.setdefault(rid, []).append(token)
        step += 1
    return out, joined


@exact
@pytest.mark.parametrize("lean", [False, True])
def test_decode_step_logits_of_a_row_do_not_depend_on_the_batch(tokenizer, lean):
    """Bit for bit: a row decoded beside idle rows (what a lone row's step is: the session pads
    the batch to MIN_DECODE_ROWS) and beside rows at other positions, 4 or 5 of them, whatever
    the attention span; with the parameters or with the engine's DecodeWeights."""
    from nanochat.engine import MIN_DECODE_ROWS

    assert MIN_DECODE_ROWS == 4  # what a lone row is padded to with batch_invariant=True
    model = build(n_head=4, n_kv_head=2, sequence_len=256)
    weights = DecodeWeights(model, COMPUTE_DTYPE) if lean else None
    c = model.config
    prompts = [list(range(5, 25)), [7, 8, 9], list(range(40, 140)), [291, 3], [4, 5, 6]]
    B, T = len(prompts), 256
    k = torch.zeros(c.n_layer, B, T, c.n_kv_head, c.n_embd // c.n_head)
    v, prev = torch.zeros_like(k), torch.zeros(B, 1, c.n_embd)
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            cache = KVCache.from_tensors(k[:, b:b + 1], v[:, b:b + 1])
            model(torch.tensor([p]), kv_cache=cache)
            prev[b] = cache.prev_embedding[0]
        ids = torch.tensor([[11], [12], [13], [14], [15]])
        pos = torch.tensor([len(p) for p in prompts])

        def decode(rows, span):
            kk, vv, pp = k[:, rows].clone(), v[:, rows].clone(), prev[rows].clone()
            return model(ids[rows], kv_cache=DecodeStep(kk, vv, pp, pos[rows], span, weights))[0], kk[:, 0], pp[0]

        idle = torch.zeros_like(pos)
        kk, vv, pp = k[:, [0, 1, 1, 1]].clone(), v[:, [0, 1, 1, 1]].clone(), prev[[0, 1, 1, 1]].clone()
        alone = model(torch.tensor([[11], [0], [0], [0]]),
                      kv_cache=DecodeStep(kk, vv, pp, torch.cat((pos[:1], idle[:3])), 64, weights))
        for rows, span in [([0, 1, 2, 3], 128), ([0, 1, 2, 3, 4], 256), ([0, 1, 3, 4], 64)]:
            logits, k0, p0 = decode(rows, span)
            assert torch.equal(logits, alone[0]) and torch.equal(k0, kk[:, 0]) and torch.equal(p0, pp[0])


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_session_rows_batched_or_joining_give_the_tokens_they_give_alone(tokenizer, batch_invariant):
    model = build(head_std=0.3)  # flat-ish logits: many tokens are likely
    engine = Engine(model, tokenizer, compile=False, batch_invariant=batch_invariant)
    a, b, c = list(range(60, 77)), [291, 40, 41], [5]
    alone_a = sampled_alone(engine, a, seed=3, max_tokens=25)
    alone_b = [sampled_alone(engine, b, seed=10 + i, max_tokens=20, top_k=20) for i in range(2)]
    alone_c = sampled_alone(engine, c, seed=9, max_tokens=30, top_p=0.8)
    sess = engine.session()
    (ra,) = sess.add(a, max_tokens=25, seed=3)
    rb = sess.add(b, n=2, max_tokens=20, top_k=20, seed=10)  # row i samples with seed 10 + i
    out, (rc,) = run_session(sess, joins=[(4, dict(tokens=c, max_tokens=30, top_p=0.8, seed=9))])
    assert len(alone_a) == 25 and len(alone_c) > 4  # they really overlapped
    assert out[ra] == alone_a and [out[r] for r in rb] == alone_b and out[rc] == alone_c
    assert alone_b[0] != alone_b[1]


def test_session_events_report_masks_and_finishing(tokenizer):
    vocab = tokenizer.get_vocab_size()
    end = tokenizer.encode_special("<|assistant_end|>")
    engine = Engine(ScriptedModel([7, 8, end, 9], vocab), tokenizer, compile=False)
    sess = engine.session()
    (r1,) = sess.add([1, 2], temperature=0.0)
    (r2,) = sess.add([3, 4], max_tokens=2, temperature=0.0)
    assert sess.active == [r1, r2] and len(sess) == 2
    assert sess.step() == [(r1, 7, 1, False), (r2, 7, 1, False)]
    assert sess.step() == [(r1, 8, 1, False), (r2, 8, 1, True)]  # r2 reached max_tokens
    assert sess.step() == [(r1, end, 1, True)]
    assert len(sess) == 0 and sess.step() == []


def test_session_cancel_drops_a_row_and_leaves_the_others_alone(tokenizer):
    engine = Engine(build(head_std=0.3), tokenizer, compile=False)
    p, q = [291, 40, 41], list(range(60, 70))
    alone = sampled_alone(engine, q, seed=2, max_tokens=20)
    sess = engine.session()
    (rp,) = sess.add(p, max_tokens=20, seed=1)
    (rq,) = sess.add(q, max_tokens=20, seed=2)
    got = []
    for i in range(20):
        if i == 3:
            sess.cancel(rp)
            assert sess.active == [rq]
        events = sess.step()
        assert all(rid == rq for rid, *_ in events) or i < 3
        got += [t for rid, t, _, _ in events if rid == rq]
    assert got == alone and len(sess) == 0


def test_session_limits_and_errors(tokenizer):
    engine = Engine(build(), tokenizer, compile=False)
    sess = engine.session(max_rows=3)
    sess.add([1, 2], n=2)
    with pytest.raises(NanochatError, match="at most 3 rows"):
        sess.add([1, 2], n=2)
    with pytest.raises(NanochatError, match="top_p"):
        sess.add([1, 2], top_p=0.0)
    with pytest.raises(NanochatError, match="max_tokens"):
        sess.add([1, 2], max_tokens=0)
    assert sess.k is None  # nothing is allocated before the first step
    sess.step()
    assert sess.k.dtype == COMPUTE_DTYPE and sess.k.size(1) >= 2


# -----------------------------------------------------------------------------
# prefix reuse


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_reuse_gives_the_tokens_of_a_fresh_prefill(tokenizer, temperature):
    model = build(head_std=0.3)
    reuse = Engine(model, tokenizer, compile=False)
    fresh = Engine(model, tokenizer, compile=False, prefix_cache_bytes=0)
    end = tokenizer.encode_special("<|assistant_end|>")
    convo = [tokenizer.get_bos_token_id(), 40, 41, 42]
    for turn in range(3):
        sess = reuse.session()
        (r,) = sess.add(convo, max_tokens=12, temperature=temperature, seed=turn, keep=True)
        out, _ = run_session(sess)
        assert out[r] == sampled_alone(fresh, convo, seed=turn, max_tokens=12, temperature=temperature)
        assert reuse.prefix_store.hits == turn  # every follow-up turn reused the conversation so far
        convo = convo + [t for t in out[r] if t != end] + [end, 50 + turn, 51]
    assert len(reuse.prefix_store.entries) == 3


def test_prefix_store_is_bounded_and_drops_the_least_recently_used():
    from nanochat.engine import PrefixStore

    kv = torch.zeros(2, 4, 1, 8)  # 256 bytes each for k and v
    store = PrefixStore(max_bytes=3 * 512)
    for first in (1, 2, 3):
        store.put([first, 0, 0, 0], kv, kv, None)
    assert store.longest([1, 0, 0, 0, 9], limit=4)[0] == 4  # touches [1, ...]
    store.put([4, 0, 0, 0], kv, kv, None)
    assert set(store.entries) == {(1, 0, 0, 0), (3, 0, 0, 0), (4, 0, 0, 0)} and store.bytes == 3 * 512
    assert store.longest([1, 0, 0, 0], limit=3) is None  # the whole prompt is never taken: its logits are needed


# -----------------------------------------------------------------------------
# top_p


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    ids = sample_next_token(logits, g, temperature=1.0, top_p=0.75)
    counts = torch.bincount(ids, minlength=4)
    assert counts[0] == 0 and counts[2] == 0  # 0.5 + 0.3 reaches 0.75: tokens 1 and 3 only
    share = counts[1].item() / 4000  # renormalized: 0.5 / 0.8 = 0.625, binomial sd 0.008
    assert abs(share - 0.625) < 0.04
    assert torch.equal(sample_next_token(logits[:3], g, 1.0, top_p=0.4), torch.tensor([1, 1, 1]))
    with pytest.raises(NanochatError, match="top_p"):
        sample_next_token(logits, g, 1.0, top_p=1.5)


def test_rows_with_different_top_p_in_one_step():
    from nanochat.engine import _Row, _sample_rows

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    rows = [_Row(i, [1], 10, 1.0, None, p, i, False, "cpu") for i, p in enumerate([0.4, 0.75, 1.0] * 300)]
    tokens = torch.tensor(_sample_rows(probs.log().expand(len(rows), -1), rows)).view(300, 3)
    assert (tokens[:, 0] == 1).all()
    assert set(tokens[:, 1].tolist()) == {1, 3}
    assert set(tokens[:, 2].tolist()) == {0, 1, 2, 3}


def test_session_cache_grows_in_rows_and_positions_without_changing_tokens(tokenizer):
    engine = Engine(build(sequence_len=512, head_std=0.3), tokenizer, compile=False)
    short, long = [291, 40, 41], list(range(1, 290))
    alone_short = [sampled_alone(engine, short, seed=s, max_tokens=12) for s in range(5)]
    alone_long = sampled_alone(engine, long, seed=7, max_tokens=12)
    sess = engine.session()
    first = sess.add(short, n=5, max_tokens=12, seed=0)
    sess.step()
    assert tuple(sess.k.shape[1:3]) == (5, 256)
    out, (late,) = run_session(sess, joins=[(0, dict(tokens=long, max_tokens=12, seed=7))])
    assert sess.k is not None and tuple(sess.k.shape[1:3]) == (10, 512)  # doubled rows, a longer context
    assert [alone_short[i][:1] + out[r] for i, r in enumerate(first)] == alone_short
    assert out[late] == alone_long


# -----------------------------------------------------------------------------
# the thread count of CPU decode steps


def test_thread_picker_uses_the_faster_count_and_tries_the_other_again(monkeypatch):
    """Each count is timed first; then the faster one is used, and the other is timed again every
    PROBE steps, so a machine that gets busy (two threads suddenly slow) moves to one thread."""
    import nanochat.engine as engine_mod

    picker = engine_mod._ThreadPicker(True)
    picker.counts = [1, 2]
    cost = {1: 3.0, 2: 1.0}  # seconds per step by thread count: a quiet machine
    clock = [0.0]

    def perf_counter():
        return clock[0]

    monkeypatch.setattr(engine_mod.time, "perf_counter", perf_counter)
    before = torch.get_num_threads()

    def steps(n, rows=1):
        used = []
        for _ in range(n):
            with picker.pick(rows):
                used.append(torch.get_num_threads())
                clock[0] += cost[used[-1]]
        return used

    used = steps(picker.PROBE * 2 - 2)
    assert used[:2] == [1, 2] and set(used[2:picker.PROBE - 1]) == {2}
    assert used.count(1) == 2  # the first timing and one probe at step PROBE
    assert torch.get_num_threads() == before  # restored after each step
    cost[2] = 10.0  # load arrives: two threads now wait for a core at every op
    used = steps(picker.PROBE * 2)
    assert used[-picker.PROBE:].count(2) <= 1  # back to one thread after the next probe
    assert steps(3, rows=8)[:2] == [1, 2]  # batches are timed on their own


def test_decode_step_numbers_do_not_depend_on_the_thread_count(tokenizer):
    """The picker may change the thread count between steps: a batch's numbers must not change
    with it; a lone row's matrix-vector products may sum in another order (float rounding)."""
    model = build(n_head=4, n_kv_head=2, sequence_len=256)
    engine = Engine(model, tokenizer, compile=False)
    engine._refresh_weights()
    c = model.config
    k = torch.randn(c.n_layer, 4, 256, c.n_kv_head, c.n_embd // c.n_head)
    v, prev = torch.randn_like(k), torch.randn(4, 1, c.n_embd)
    ids, pos = torch.tensor([[3], [40], [7], [9]]), torch.tensor([5, 30, 0, 70])
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for rows in (1, 4):
                    kk, vv, pp = k.clone(), v.clone(), prev.clone()
                    out[threads, rows] = (engine._decode_step(ids[:rows], pos[:rows], kk, vv, pp, 128), kk, vv, pp)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1, 4], out[2, 4]))
    for a, b in zip(out[1, 1], out[2, 1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
