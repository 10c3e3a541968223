"""Test doubles for the server tests: a tiny real tokenizer and scripted engines with the
Engine interface (generate / generate_multi, or session / warmup), so replies are exact and
timing is controllable."""

import re
import threading
import time
from collections import OrderedDict

from helpers import synthetic_texts

_TOKENIZER = None


def tiny_tokenizer():
    """A 300-token BPE tokenizer trained in-process (~10 ms); shared, it is read-only."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from nanochat.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.train_from_iterator(iter(synthetic_texts(200, seed=1)), vocab_size=300)
    return _TOKENIZER


def tiny_gpt(tok):
    """A random-init one-layer GPT for the real Engine."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=64, window_pattern="L"))
    model.init_weights()
    model.eval()
    return model


def byte_tokens(tokenizer, text):
    """One token per UTF-8 byte: multi-byte characters arrive split across tokens."""
    return [tokenizer.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


def last_user_text(tokenizer, prompt):
    text = tokenizer.decode(prompt)
    found = re.findall(r"<\|user_start\|>(.*?)<\|user_end\|>", text, flags=re.S)
    return found[-1] if found else ""


class FakeEngine:
    """generate() yields a scripted reply then <|assistant_end|>, one token per step.

    reply(prompt, row, call) -> list of token ids (default: encode "You said: <last user text>",
    plus " #<row>" for rows after the first and, with takes=True, " (take <call>)" after the first call).
    delay: seconds per step; gate: a threading.Event every step waits on (to hold a worker busy), or
    a threading.Semaphore each step takes one permit of (to let the test pace the steps)."""

    def __init__(self, tokenizer, reply=None, delay=0.0, gate=None, takes=False):
        self.tokenizer = tokenizer
        self.takes = takes
        self.reply = reply or self.echo
        self.delay = delay
        self.gate = gate
        self.calls = []
        self.steps = 0
        self.entered = 0
        self.closed_early = 0
        self.running = threading.Event()
        self.end = tokenizer.encode_special("<|assistant_end|>")

    def echo(self, prompt, row, call):
        text = "You said: " + last_user_text(self.tokenizer, prompt)
        if row:
            text += f" #{row}"
        if call and self.takes:
            text += f" (take {call})"
        return self.tokenizer.encode(text)

    def _step(self):
        self.entered += 1  # steps begun (a paced step may still be waiting for its permit)
        self.running.set()
        if isinstance(self.gate, threading.Semaphore):  # one permit per step: the test paces the steps
            self.gate.acquire(timeout=30)
        elif self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        self.steps += 1

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        call = len(self.calls)
        self.calls.append({"tokens": list(tokens), "num_samples": num_samples, "max_tokens": max_tokens,
                           "temperature": temperature, "top_k": top_k, "seed": seed})
        rows = [list(self.reply(tokens, r, call)) + [self.end] for r in range(num_samples)]
        limit = max_tokens if max_tokens is not None else 10**6
        finished = False
        try:
            for step in range(limit):
                self._step()
                last = step == limit - 1 or all(step >= len(row) - 1 for row in rows)
                finished = last  # closed at this yield = a normal end, not an early stop
                yield [row[step] if step < len(row) else self.end for row in rows], [1] * num_samples
                if last:
                    break
        finally:
            if not finished:
                self.closed_early += 1


class FakeMultiEngine(FakeEngine):
    """Also has generate_multi (different prompts decoded together); records each batch's size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def generate_multi(self, prompts, max_tokens=None, temperature=1.0, top_k=None, seeds=None):
        call = len(self.calls)
        self.calls.append({"prompts": [list(p) for p in prompts], "max_tokens": max_tokens, "seeds": seeds})
        self.batches.append(len(prompts))
        rows = [list(self.reply(p, 0, call)) + [self.end] for p in prompts]
        limit = max_tokens if max_tokens is not None else 10**6
        for step in range(limit):
            if all(step >= len(row) for row in rows):
                break
            self._step()
            yield [row[step] if step < len(row) else None for row in rows], [1] * len(rows)


class FakeSession:
    """The Engine's decode session over scripted replies: add() rows, step() them one token each
    (rows added since the last step first), cancel() a row. Row r of an add() replies
    engine.reply(tokens, r, call) then <|assistant_end|>, cut at max_tokens."""

    def __init__(self, engine, max_rows):
        self.engine = engine
        self.max_rows = max_rows
        self.rows = OrderedDict()  # row id -> dict(prompt, reply, pos, max_tokens, keep)
        self.closed = False

    def __len__(self):
        return len(self.rows)

    @property
    def active(self):
        return list(self.rows)

    def add(self, tokens, n=1, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=None, keep=False):
        engine = self.engine
        call = len(engine.calls)
        engine.calls.append({"tokens": list(tokens), "num_samples": n, "max_tokens": max_tokens,
                             "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "keep": keep,
                             "reused": engine.stored_prefix(tokens)})
        ids = []
        for r in range(n):
            row_id = engine.next_row
            engine.next_row += 1
            reply = list(engine.reply(tokens, r, call)) + [engine.end]
            self.rows[row_id] = {"prompt": list(tokens), "reply": reply, "pos": 0, "keep": keep,
                                 "max_tokens": max_tokens if max_tokens is not None else 10**6}
            ids.append(row_id)
        return ids

    def step(self):
        engine = self.engine
        engine._step()
        engine.step_rows.append(list(self.rows))
        events = []
        for row_id, row in list(self.rows.items()):
            token = row["reply"][row["pos"]]
            row["pos"] += 1
            finished = token == engine.end or row["pos"] >= row["max_tokens"]
            events.append((row_id, token, 1, finished))
            if finished:
                if row["keep"]:  # the KV cache covers the prompt and every generated token fed back
                    engine.keep(row["prompt"] + row["reply"][:row["pos"] - 1])
                del self.rows[row_id]
        return events

    def cancel(self, row_id):
        if self.rows.pop(row_id, None) is not None:
            self.engine.cancelled.append(row_id)

    def close(self):
        self.closed = True
        self.rows.clear()


class FakeSessionEngine(FakeEngine):
    """Has session() and warmup() like the real Engine. Records every step's row ids
    (step_rows), cancelled rows, and for each add() how many leading prompt tokens its bounded
    LRU prefix store held (calls[i]["reused"]). warm_gate: warmup() waits on it."""

    def __init__(self, *args, warm_gate=None, store_size=4, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_rows = []
        self.cancelled = []
        self.next_row = 0
        self.store = OrderedDict()
        self.store_size = store_size
        self.warm_gate = warm_gate
        self.warmed = threading.Event()
        self.sessions = []

    def warmup(self):
        if self.warm_gate is not None:
            self.warm_gate.wait(30)
        self.warmed.set()

    def session(self, max_rows=None):
        self.sessions.append(FakeSession(self, max_rows))
        return self.sessions[-1]

    def keep(self, tokens):
        self.store[tuple(tokens)] = True
        self.store.move_to_end(tuple(tokens))
        while len(self.store) > self.store_size:
            self.store.popitem(last=False)

    def stored_prefix(self, tokens):
        best = 0
        for key in self.store:
            if len(key) <= len(tokens) and tuple(tokens[:len(key)]) == key:
                best = max(best, len(key))
        return best


MODEL = "nanochat-test"


def client_for(engine, tok, **kwargs):
    """A TestClient on an app serving `engine`, addressed to a Host the server answers."""
    from fastapi.testclient import TestClient

    from nanochat.server import create_app
    kwargs.setdefault("model_name", MODEL)
    return TestClient(create_app([engine], tok, **kwargs), base_url="http://localhost")

