"""Inference (SPEC §10): the KV cache, sampling, the tool-call state machine and the batched
Engine with a static cache and a compiled single-token decode step.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                     # one token (and its mask) per sample row
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

`python -m nanochat.engine` checks the engine against the naive full-forward sampler.
"""

import os
import warnings
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, NanochatError


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

    @classmethod
    def from_tensors(cls, k_cache, v_cache, pos=0, prev_embedding=None):
        """A cache over caller-owned (n_layers, B, T_max, H_kv, D) tensors (views are fine), all
        rows at `pos`: CORE scoring reuses one buffer across examples this way."""
        self = cls.__new__(cls)
        self.n_layers, self.batch_size, self.max_seq_len, self.n_heads, self.head_dim = k_cache.shape
        self.k_cache, self.v_cache = k_cache, v_cache
        self.cache_seqlens = torch.full((self.batch_size,), pos, dtype=torch.int32, device=k_cache.device)
        self.prev_embedding = prev_embedding
        return self

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


# -----------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """One token id per row of fp32 logits (B, V) -> int64 (B,) (SPEC §10.2): temperature 0 is
    argmax (top_k ignored); otherwise top_k (None or 0 = no filtering) before temperature, then
    a multinomial draw from `rng`."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice).squeeze(1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng).squeeze(1)


# -----------------------------------------------------------------------------
# The tool-call state machine (one per row)


class _RowState:
    """Per row: tokens forced on it (a calculator result being spliced in), whether it is
    inside a <|python_start|> ... <|python_end|> block and the expression tokens seen so far,
    and whether it has finished."""

    def __init__(self):
        self.forced = deque()
        self.in_python = False
        self.expr = []
        self.completed = False


def _use_calculator(expr):
    from nanochat.execution import use_calculator  # lazy: the sandbox module is optional at import time

    return use_calculator(expr)


# -----------------------------------------------------------------------------
# The engine


def _decode_step(model, weights, ids, decode):
    """model.forward_decode, with the compute-dtype weight copies swapped in when there are any."""
    if weights:
        return torch.func.functional_call(model, weights, (ids,), {"decode": decode}, strict=False)
    return model.forward_decode(ids, *decode)

_BUCKET_MIN = 64  # smallest attention span a decode step reads; spans grow in powers of two
_KEEP_CACHES = 4  # decode caches kept between calls (each is batch x context x layers)
_CACHE_ROUND = 256  # decode caches are allocated in multiples of this (reused while they fit)


def _compile_default(device):
    """NANOCHAT_ENGINE_COMPILE=1|0 forces compiling the decode step either way. By default it is
    compiled on CUDA (with CUDA graphs), where it costs seconds and pays back at once; on CPU
    the compile takes 10-30 s of the first call, which only long runs (benchmarks, RL on CPU)
    win back, so there it is opt-in (Engine(..., compile=True) or the env var)."""
    env = os.environ.get("NANOCHAT_ENGINE_COMPILE", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise NanochatError(f"NANOCHAT_ENGINE_COMPILE={env!r} is not understood; use 1 (compile) or 0 (eager).")
    return device.type == "cuda"


class Engine:
    """Batched generation from one prompt (generate, generate_batch) or several prompts of
    different lengths (generate_multi), with a static KV cache and a compiled single-token
    decode step (SPEC §10.2).

    Speed comes from doing no per-token work that scales with the vocabulary or the cache:
    the decode step (model.forward_decode) has static shapes, writes the cache in place and
    reads only a power-of-two bucket of it, so torch.compile turns it into one graph (CUDA:
    replayed as a CUDA graph); sampling is a handful of tensor ops; per token the host only
    moves B token ids. compile=None picks the default (compiled on CUDA, eager on CPU; the env var
    NANOCHAT_ENGINE_COMPILE=1|0 overrides); compile=False runs the same step eagerly, and any
    failure to compile falls back to it with a warning."""

    def __init__(self, model, tokenizer, compile=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        self.compile = _compile_default(self.device) if compile is None else bool(compile)
        self._decode_fn = None
        self._caches = {}  # batch size -> KVCache reused across calls (stable addresses for CUDA graphs)
        self._busy = set()  # ids of decode caches held by running generations
        self._weights = None  # compute-dtype copies of the matmul weights (see _refresh_weights)
        self._weight_versions = None
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")

    # --- pieces --------------------------------------------------------------------

    def _check_prompt(self, tokens):
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) for t in tokens):
            raise NanochatError("the prompt must be a list of token ids (ints); encode the text with the tokenizer first.")
        if len(tokens) == 0:
            raise NanochatError("the prompt is empty; give at least one token (a chat prompt starts with <|bos|>).")
        seq_len = self.model.config.sequence_len
        if len(tokens) >= seq_len:
            raise NanochatError(f"the prompt has {len(tokens)} tokens but the model's context is {seq_len}, which "
                                f"leaves no room to generate; shorten the prompt or drop old turns.")

    def _prefill(self, tokens):
        """Run the prompt once at batch 1: (last-position logits (1, V), its batch-1 KVCache)."""
        c = self.model.config
        cache = KVCache(1, c.n_kv_head, len(tokens), c.n_embd // c.n_head, c.n_layer, self.device, COMPUTE_DTYPE)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self.model.forward(ids, kv_cache=cache)
        return logits[:, -1, :], cache

    def _decode_cache(self, batch_size, needed):
        """A (batch_size, >= needed) decode cache, reused across calls while it fits. A cache held
        by a generation still running (two generators open on one engine) is never handed out
        twice: the second gets a private one."""
        cache = self._caches.pop(batch_size, None)  # re-inserted below: the dict's order is recency
        if cache is not None and id(cache) in self._busy:
            self._caches[batch_size] = cache
            return self._new_cache(batch_size, needed, static=False)
        if cache is None or cache.max_seq_len < needed:
            cache = self._new_cache(batch_size, needed, static=True)
        self._caches[batch_size] = cache
        # a server sees many batch sizes: keep the few most recently used caches, not one per size forever
        for size in [b for b, c in self._caches.items() if id(c) not in self._busy][:-_KEEP_CACHES]:
            del self._caches[size]
        return cache

    def _new_cache(self, batch_size, needed, static):
        c = self.model.config
        capacity = min(c.sequence_len, -(-needed // _CACHE_ROUND) * _CACHE_ROUND)
        cache = KVCache(batch_size, c.n_kv_head, capacity, c.n_embd // c.n_head, c.n_layer, self.device, COMPUTE_DTYPE)
        cache.prev_embedding = torch.zeros(batch_size, 1, c.n_embd, device=self.device, dtype=COMPUTE_DTYPE)
        if static and self.compile and self.device.type == "cuda":
            from torch import _dynamo
            for t in (cache.k_cache, cache.v_cache, cache.prev_embedding):
                _dynamo.mark_static_address(t)  # CUDA graphs may then update them in place
        return cache

    def release(self):
        """Free the decode caches (they are otherwise kept for the next call)."""
        self._caches.clear()

    def _refresh_weights(self):
        """Copies of the matmul weights in the compute dtype, made once and refreshed only when a
        master changed (RL updates the model between rollouts). Without them every decode step
        would cast every fp32 master to bf16 again: 3x the weight traffic of a memory-bound step.
        Empty when the compute dtype is the masters' dtype (nothing to cast)."""
        if not isinstance(self.model, torch.nn.Module):
            return
        linears = [(name + ".weight", m.weight) for name, m in self.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.weight.dtype != COMPUTE_DTYPE]
        versions = [(w.data_ptr(), w._version) for _, w in linears]
        if versions == self._weight_versions:
            return
        if self._weights is not None and list(self._weights) == [n for n, _ in linears]:
            for (name, w) in linears:
                self._weights[name].copy_(w.detach())  # in place: CUDA graphs keep their addresses
        else:
            self._weights = {name: w.detach().to(COMPUTE_DTYPE) for name, w in linears}
            if self.compile and self.device.type == "cuda":
                from torch import _dynamo
                for t in self._weights.values():
                    _dynamo.mark_static_address(t)
        self._weight_versions = versions

    def _decode(self, ids, pos, cache, kv_len):
        decode = (pos, cache.k_cache, cache.v_cache, cache.prev_embedding, kv_len)
        if self.compile:
            if self._decode_fn is None:
                from torch import _dynamo
                _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
                if self.device.type == "cuda":
                    self._decode_fn = torch.compile(_decode_step, mode="reduce-overhead")  # CUDA graphs
                else:
                    # one token's elementwise work is far too small to split over threads: an OpenMP
                    # barrier per kernel costs more than the kernel (and stalls on a busy core);
                    # the matmuls still use torch's threads
                    self._decode_fn = torch.compile(_decode_step, options={"cpp.threads": 1})
            try:
                return self._decode_fn(self.model, self._weights, ids, decode)
            except Exception as e:  # no compiler toolchain, an unsupported op ...: the same math, eagerly
                warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
                self.compile = False
        return _decode_step(self.model, self._weights, ids, decode)

    def _kv_len(self, max_pos, capacity):
        """Attention span for a step whose furthest row sits at max_pos: a power of two >= max_pos + 1."""
        span = _BUCKET_MIN
        while span < max_pos + 1:
            span *= 2
        return min(span, capacity)

    def _step_row(self, row, sampled):
        """Apply forced tokens and the tool state machine to one row: (token, mask)."""
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = sampled, 1
        if token == self.assistant_end or token == self.bos:
            row.completed = True
        if token == self.python_start:
            row.in_python, row.expr = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            if row.expr:
                result = _use_calculator(self.tokenizer.decode(row.expr))
                if result is not None:
                    row.forced.append(self.output_start)
                    row.forced.extend(self.tokenizer.encode(str(result)))
                    row.forced.append(self.output_end)
            row.expr = []
        elif row.in_python:
            row.expr.append(token)
        return token, mask

    # --- public API ------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, token_masks), one entry per sample row, until every row has
        emitted <|assistant_end|> or <|bos|>, max_tokens tokens were produced (forced tool
        tokens included), or the model's context is full (SPEC §10.2). The prompt is run once
        at batch 1; its last logits are expanded so every row draws its own first token."""
        self._check_prompt(tokens)
        if temperature < 0:
            raise NanochatError(f"temperature must be >= 0, not {temperature}.")
        if num_samples < 1:
            raise NanochatError(f"num_samples must be at least 1, not {num_samples}.")
        seq_len = self.model.config.sequence_len
        T = len(tokens)
        limit = seq_len - T if max_tokens is None else min(max_tokens, seq_len - T)  # never past the context
        if limit <= 0:
            return
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        self._refresh_weights()
        logits, prefill_cache = self._prefill(list(tokens))
        logits = logits.expand(num_samples, -1)
        B = num_samples
        rows = [_RowState() for _ in range(B)]
        cache = None
        if limit > 1:
            cache = self._decode_cache(B, T + limit - 1)
            self._busy.add(id(cache))
            cache.k_cache[:, :, :T] = prefill_cache.k_cache[:, :, :T]  # broadcast over the rows
            cache.v_cache[:, :, :T] = prefill_cache.v_cache[:, :, :T]
            cache.prev_embedding.copy_(prefill_cache.prev_embedding.expand(B, -1, -1))
            pos = torch.full((B,), T, dtype=torch.long, device=self.device)
        del prefill_cache
        try:
            for step in range(limit):
                sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
                column, masks = [], []
                for row, s in zip(rows, sampled):
                    token, mask = self._step_row(row, s)
                    column.append(token)
                    masks.append(mask)
                yield column, masks
                if step == limit - 1 or all(r.completed for r in rows):
                    break
                ids = torch.tensor(column, dtype=torch.long, device=self.device).view(B, 1)
                logits = self._decode(ids, pos, cache, self._kv_len(T + step, cache.max_seq_len))
                pos += 1
        finally:
            self._busy.discard(id(cache))

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming generate: (results, masks), each a list of num_samples lists holding the
        prompt then the generated tokens, without the terminal token; masks are 0 on the prompt
        and on forced tool tokens, 1 on sampled tokens."""
        terminal = (self.assistant_end, self.bos)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in terminal:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    @torch.inference_mode()
    def generate_multi(self, prompts, max_tokens=None, temperature=1.0, top_k=None, seeds=None):
        """Decode several different prompts (of different lengths) together, one row each.
        Each prompt is prefilled alone and copied into its row of a shared cache; rows then
        decode together at their own positions and stop independently. Every row samples from
        its own generator (seeds[i], default 42), so a row's tokens are those generate() gives
        for that prompt alone. Yields (token_column, token_masks) with None for rows that have
        already finished."""
        if not prompts:
            raise NanochatError("generate_multi needs at least one prompt.")
        for p in prompts:
            self._check_prompt(p)
        if temperature < 0:
            raise NanochatError(f"temperature must be >= 0, not {temperature}.")
        B = len(prompts)
        seeds = [42] * B if seeds is None else list(seeds)
        if len(seeds) != B:
            raise NanochatError(f"got {len(seeds)} seeds for {B} prompts; give one seed per prompt.")
        seq_len = self.model.config.sequence_len
        lengths = [len(p) for p in prompts]
        limits = [seq_len - n if max_tokens is None else min(max_tokens, seq_len - n) for n in lengths]
        rngs = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(s)
            rngs.append(g)
        self._refresh_weights()
        cache = self._decode_cache(B, max(n + lim - 1 for n, lim in zip(lengths, limits)))
        first_logits, prefilled = [], {}
        for b, p in enumerate(prompts):
            key = tuple(p)
            if key not in prefilled:  # rows that share a prompt (n samples of one request) prefill it once
                prefilled[key] = self._prefill(list(p))
            logits, pc = prefilled[key]
            n = len(p)
            cache.k_cache[:, b, :n] = pc.k_cache[:, 0, :n]
            cache.v_cache[:, b, :n] = pc.v_cache[:, 0, :n]
            cache.prev_embedding[b] = pc.prev_embedding[0]
            first_logits.append(logits)
        logits = torch.cat(first_logits, dim=0)
        del first_logits, prefilled
        self._busy.add(id(cache))
        try:
            rows = [_RowState() for _ in range(B)]
            finished = [lim <= 0 for lim in limits]
            count = [0] * B
            positions = list(lengths)  # position of each row's next input token
            while not all(finished):
                if temperature == 0.0:
                    sampled = torch.argmax(logits, dim=-1).tolist()
                else:
                    sampled = [int(sample_next_token(logits[b:b + 1], rngs[b], temperature, top_k)) if not finished[b] else 0
                               for b in range(B)]
                column, masks, inputs = [], [], []
                for b in range(B):
                    if finished[b]:
                        column.append(None)
                        masks.append(None)
                        inputs.append(0)
                        continue
                    token, mask = self._step_row(rows[b], sampled[b])
                    column.append(token)
                    masks.append(mask)
                    inputs.append(token)
                    count[b] += 1
                    if rows[b].completed or count[b] >= limits[b]:
                        finished[b] = True
                yield column, masks
                if all(finished):
                    break
                # finished rows keep a frozen, in-range position: their writes land on their own dead slot
                pos_list = []
                for b in range(B):
                    if not finished[b]:
                        pos_list.append(positions[b])
                        positions[b] += 1
                    else:
                        pos_list.append(min(positions[b], cache.max_seq_len - 1))
                ids = torch.tensor(inputs, dtype=torch.long, device=self.device).view(B, 1)
                pos = torch.tensor(pos_list, dtype=torch.long, device=self.device)
                logits = self._decode(ids, pos, cache, self._kv_len(max(pos_list), cache.max_seq_len))

        finally:
            self._busy.discard(id(cache))

def main(argv=None):
    """Greedy decoding of a prompt by the naive full-forward sampler and by the Engine (eager
    and compiled): they should agree token for token (exactly in fp32)."""
    import argparse
    import time

    from nanochat.checkpoint import load_model
    from nanochat.common import autodetect_device_type

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("-i", "--source", default="base", choices=["base", "sft", "rl"])
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-p", "--prompt", default="The chemical formula of water is")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    prompt = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    stop = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    t0 = time.perf_counter()
    ref = []
    for t in model.generate(prompt, args.max_tokens, temperature=0.0):
        ref.append(t)
        if t in stop:
            break
    timings = {"naive": time.perf_counter() - t0}
    outputs = {}
    for name, compile in (("engine (eager)", False), ("engine (compiled)", True)):
        engine = Engine(model, tokenizer, compile=compile)
        t0 = time.perf_counter()
        outputs[name] = [c[0] for c, _ in engine.generate(prompt, max_tokens=args.max_tokens, temperature=0.0)]
        timings[name] = time.perf_counter() - t0
    print(f"naive: {tokenizer.decode(ref)!r} ({timings['naive']:.2f} s)")
    for name, out in outputs.items():
        print(f"{name}: match={out == ref} ({timings[name]:.2f} s, the compiled one includes compiling)")


if __name__ == "__main__":
    from nanochat.common import run_main

    run_main(main)
