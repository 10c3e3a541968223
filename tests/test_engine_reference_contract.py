"""Issue 15 item 13: the Engine drives any model with the reference implementation's contract,
forward(ids, kv_cache=...) and nothing else, including models that leave kv_cache.prev_embedding
None (people bring notebooks, mocks and custom models written for the reference)."""

import pytest
import torch
from test_engine import build, tokenizer  # noqa: F401  (the module-scoped tokenizer fixture)

from nanochat.common import COMPUTE_DTYPE
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig


class ForwardOnly:
    """Our GPT seen through the reference contract only: no get_device, no DecodeStep, no parameters."""

    def __init__(self, model):
        self._model = model
        self.config = model.config
        self.calls = 0

    def forward(self, ids, kv_cache=None):
        self.calls += 1
        return self._model.forward(ids, kv_cache=kv_cache)


class CountingModel:
    """A mock in the reference's style: logits favour (last token + 1) mod vocab; it never sets
    prev_embedding and reads the cache only through get_pos/advance."""

    def __init__(self, vocab_size=300, sequence_len=64):
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=4)

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        kv_cache.advance(T)
        logits = torch.full((B, T, self.config.vocab_size), -5.0)
        logits.scatter_(2, ((ids + 1) % self.config.vocab_size).unsqueeze(-1), 5.0)
        return logits


@pytest.mark.skipif(COMPUTE_DTYPE != torch.float32, reason="exact token equality needs NANOCHAT_DTYPE=float32")
def test_item13_forward_only_model_gives_the_tokens_of_our_fast_path(tokenizer):  # noqa: F811
    model = build(head_std=0.3)
    fast = Engine(model, tokenizer, compile=False)
    slow = Engine(ForwardOnly(model), tokenizer, compile=False)
    assert slow.reference_contract and not fast.reference_contract
    prompt = [291, 40, 41, 42]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        want = [c for c, _ in fast.generate(prompt, num_samples=3, max_tokens=15, **kw)]
        assert [c for c, _ in slow.generate(prompt, num_samples=3, max_tokens=15, **kw)] == want
    assert slow.model.calls > 15  # it really went through forward, token by token


def test_item13_prev_embedding_none_and_sessions(tokenizer):  # noqa: F811
    engine = Engine(CountingModel(), tokenizer, compile=False)
    results, masks = engine.generate_batch([10, 11], num_samples=2, max_tokens=5, temperature=0.0)
    assert results == [[10, 11, 12, 13, 14, 15, 16]] * 2 and masks == [[0, 0, 1, 1, 1, 1, 1]] * 2
    sess = engine.session()
    (a,) = sess.add([20], max_tokens=3, temperature=0.0, keep=True)
    sess.step()
    (b,) = sess.add([40, 41], max_tokens=2, temperature=0.0)  # joins at the next step
    events = sess.step() + sess.step()
    assert [(r, t) for r, t, _, _ in events] == [(a, 22), (b, 42), (a, 23), (b, 43)]
    (c,) = sess.add([20, 21, 22, 23, 24], max_tokens=1, temperature=0.0)  # reuses the kept [20, 21, 22]
    assert sess.step() == [(c, 25, 1, True)] and engine.prefix_store.hits == 1
