"""Test doubles for the server tests: a tiny real tokenizer and scripted engines with the
Engine interface (generate / generate_multi), so replies are exact and timing is controllable."""

import re
import threading
import time

from helpers import synthetic_texts

_TOKENIZER = None


def tiny_tokenizer():
    """A 300-token BPE tokenizer trained in-process (~10 ms); shared, it is read-only."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from nanochat.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.train_from_iterator(iter(synthetic_texts(200, seed=1)), vocab_size=300)
    return _TOKENIZER


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
    delay: seconds per step; gate: a threading.Event every step waits on (to hold a worker busy)."""

    def __init__(self, tokenizer, reply=None, delay=0.0, gate=None, takes=False):
        self.tokenizer = tokenizer
        self.takes = takes
        self.reply = reply or self.echo
        self.delay = delay
        self.gate = gate
        self.calls = []
        self.steps = 0
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
        self.running.set()
        if self.gate is not None:
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
