"""Inference: the KV cache, sampling (temperature, top_k, top_p), the calculator tool's state
machine, a store of reusable prefixes, and the Engine with its sessions (a decode batch whose
rows come and go between steps).

    engine = Engine(model, tokenizer)
    sess = engine.session()
    (row,) = sess.add(prompt_ids, max_tokens=64, temperature=0.8, seed=1)
    while len(sess):
        for row_id, token, mask, finished in sess.step():
            ...
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=64, temperature=0.8):
        ...                                     # one token (and its mask) per sample row
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)

`python -m nanochat.engine` checks the engine against the naive full-forward sampler.
"""

import os
import secrets
import sys
import threading
import time
import warnings
from collections import OrderedDict, deque
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nanochat import aot as nanochat_aot
from nanochat.common import COMPUTE_DTYPE, NanochatError
from nanochat.gpt import GPT, DecodeStep, DecodeWeights


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


def _filter(logits, temperature, top_k, top_p):
    """(probabilities (B, K), token ids (B, K) or None): top_k (None or 0 = off) before temperature,
    then nucleus filtering: a token stays while the probability mass ranked above it is < top_p."""
    V = logits.size(-1)
    idx = None
    if (top_k and 0 < top_k < V) or top_p < 1.0:
        k = top_k if top_k and 0 < top_k < V else V
        logits, idx = torch.topk(logits, k, dim=-1)  # sorted, largest first
    probs = F.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # x / 1 == x exactly
    if top_p < 1.0:
        above = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        probs = probs.masked_fill(above >= top_p, 0.0)
    return probs, idx


def _draw(probs, uniforms):
    """Inverse-CDF draw: the first index whose cumulative probability exceeds u * total. A token
    of probability 0 is never drawn (its cumulative value equals its predecessor's)."""
    cdf = probs.cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=1.0):
    """One token id per row of fp32 logits (B, V) -> int64 (B,): temperature 0 is argmax (top_k and
    top_p ignored); otherwise top_k (None or 0 = no filtering) before temperature, then top_p
    (nucleus: the smallest set of most likely tokens whose mass reaches top_p), then a
    multinomial draw from `rng`."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise NanochatError(f"top_p must be in (0, 1], not {top_p}.")
    probs, idx = _filter(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, num_samples=1, generator=rng)
    return (choice if idx is None else idx.gather(1, choice)).squeeze(1)


def _sample_rows(logits, rows):
    """One token per row of logits (B, V), row i drawn with rows[i]'s settings and generator.
    Rows with the same settings are sampled together; the draw of a row depends only on its own
    logits, settings and generator, never on which other rows share the batch."""
    out = [0] * len(rows)
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
    for (temperature, top_k, top_p), members in groups.items():
        sub = logits if len(members) == len(rows) else logits[members]
        if temperature == 0.0:
            tokens = torch.argmax(sub, dim=-1)
        else:
            probs, idx = _filter(sub, temperature, top_k, top_p)
            u = [torch.rand(1, generator=rows[i].rng, device=logits.device) for i in members]
            u = u[0] if len(u) == 1 else torch.cat(u)
            tokens = _draw(probs, u)
            if idx is not None:
                tokens = idx.gather(1, tokens.unsqueeze(1)).squeeze(1)
        for i, t in zip(members, tokens.tolist()):
            out[i] = t
    return out


def _use_calculator(expr):
    from nanochat.execution import use_calculator  # lazy: the sandbox module is optional at import time

    return use_calculator(expr)


# -----------------------------------------------------------------------------
# Prefix store: KV of token sequences already computed, for follow-up turns of a chat


class PrefixStore:
    """KV caches of token sequences, least recently used dropped first once they hold more than
    max_bytes. A new row reuses the longest stored sequence that starts its prompt and prefills
    only the rest (a follow-up chat turn reuses the whole conversation so far)."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries = OrderedDict()  # tuple(tokens) -> (k, v, prev_embedding, nbytes)
        self.lock = threading.Lock()  # sessions on several threads may share one engine
        self.hits = 0

    def put(self, tokens, k, v, prev):
        """Store k/v (n_layer, len(tokens), Hkv, D) and the last pre-smear embedding (1, 1, C) or None."""
        nbytes = k.nbytes + v.nbytes + (0 if prev is None else prev.nbytes)
        if nbytes > self.max_bytes or not tokens:
            return
        key = tuple(tokens)
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old[3]
            self.entries[key] = (k, v, prev, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.bytes -= dropped[3]

    def longest(self, tokens, limit):
        """The longest stored sequence that is a prefix of tokens and at most `limit` long:
        (length, k, v, prev), or None."""
        best = None
        with self.lock:
            for key in self.entries:
                n = len(key)
                if n <= limit and (best is None or n > len(best)) and tuple(tokens[:n]) == key:
                    best = key
            if best is None:
                return None
            self.entries.move_to_end(best)
            self.hits += 1
            k, v, prev, _ = self.entries[best]
        return len(best), k, v, prev

    def clear(self):
        with self.lock:
            self.entries.clear()
            self.bytes = 0


# -----------------------------------------------------------------------------
# Session: a decode batch whose rows come and go between steps


class _Row:
    """One sequence being generated: its settings and generator, the tokens whose keys/values are
    cached (`fed`), the token to feed at the next step, and the tool-call state machine (tokens
    forced on it while a calculator result is spliced in; the expression inside a python block)."""

    def __init__(self, row_id, tokens, limit, temperature, top_k, top_p, seed, keep, device):
        self.id = row_id
        self.prompt = tokens
        self.fed = []  # tokens whose keys/values are in the cache (prompt included once prefilled)
        self.pending = None  # token to feed at the next step (None: the prompt still needs a prefill)
        self.logits = None  # (1, V) logits after a prefill, sampled from at this step
        self.limit = limit
        self.count = 0
        self.temperature, self.top_k, self.top_p, self.keep = temperature, top_k, top_p, keep
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(seed)
        self.forced = deque()
        self.in_python = False
        self.expr = []
        self.prev = None  # pre-smear embedding after the fed tokens (reference-contract models only)


class Session:
    """A decode batch whose rows come and go between steps (continuous batching).

        sess = engine.session()
        a, = sess.add(prompt, max_tokens=64, seed=1)
        while len(sess):
            for row_id, token, mask, finished in sess.step():
                ...

    step() prefills the rows added since the last step (each alone, reusing stored prefixes),
    decodes the rows that continue in one batch, then samples one token for every active row.
    Rows live in the first slots of one cache (a finishing row's slot is refilled by moving the
    last row), so the eager decode batch is exactly the active rows (a compiled one is every row
    of the cache, for its static shapes). A row's tokens do not depend on
    the rows it shares the batch with: it has its own generator and every step computes each row
    with the same operations whatever the batch holds (the tests check this exactly)."""

    def __init__(self, engine, max_rows=None):
        self.engine = engine
        self.max_rows = max_rows
        self.rows = []  # slot order: rows[i] lives in cache slot i
        self.next_id = 0
        self.k = self.v = self.prev = None  # (n_layer, R, T, Hkv, D), (R, 1, C): grown on demand
        self.pooled = False  # the cache is the engine's, given back at close (a compiled step's)

    def __len__(self):
        return len(self.rows)

    @property
    def active(self):
        """Ids of the rows still generating."""
        return [r.id for r in self.rows]

    def add(self, tokens, n=1, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=None, keep=False):
        """Add n rows sampling from one prompt; they join at the next step. Row i draws from a
        generator seeded with seed + i (a random seed when None), so a row gives the same tokens
        as add(tokens, seed=seed + i) alone. max_tokens (forced tool tokens included) is capped
        by the model's context. keep=True stores the row's keys/values when it finishes, for a
        follow-up turn to reuse. Returns the new rows' ids."""
        eng = self.engine
        eng._check_prompt(tokens)
        if temperature < 0:
            raise NanochatError(f"temperature must be >= 0, not {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise NanochatError(f"top_p must be in (0, 1], not {top_p}.")
        if n < 1:
            raise NanochatError(f"n must be at least 1, not {n}.")
        if max_tokens is not None and max_tokens < 1:
            raise NanochatError(f"max_tokens must be at least 1, not {max_tokens}.")
        if self.max_rows is not None and len(self.rows) + n > self.max_rows:
            raise NanochatError(f"the session holds {len(self.rows)} of at most {self.max_rows} rows; "
                                f"wait for rows to finish before adding {n} more.")
        room = eng.seq_len - len(tokens)
        limit = room if max_tokens is None else min(max_tokens, room)
        if seed is None:
            seed = secrets.randbelow(2**62)
        ids = []
        for i in range(n):
            row = _Row(self.next_id, list(tokens), limit, float(temperature), top_k or None, float(top_p), seed + i,
                       keep, eng.device)
            self.next_id += 1
            self.rows.append(row)
            ids.append(row.id)
        return ids

    @torch.inference_mode()
    def cancel(self, row_id):
        """Drop a row now; it yields nothing more. Unknown or finished ids are ignored."""
        self._remove({r.id for r in self.rows if r.id == row_id})

    def close(self):
        self.rows = []
        self._give_back()
        self.k = self.v = self.prev = None

    # --- the step ------------------------------------------------------------------

    def _reserve(self, rows, length):
        """Make the cache hold at least `rows` rows of `length` positions, keeping what it holds."""
        eng = self.engine
        if not eng.compile:
            rows = max(rows, MIN_DECODE_ROWS)  # the eager step pads a small batch to this many rows
        R, T = (0, 0) if self.k is None else (self.k.size(1), self.k.size(2))
        if eng.compile:
            # full length at once and a power of two of rows: few shapes, never a regrowth. A
            # compiled step decodes every row of the cache, so it shrinks once a quarter would do
            bucket = _row_bucket(rows)
            if bucket <= R < 4 * bucket:
                return
            k, v, prev = eng._take_cache(bucket)
        else:
            if rows <= R and length <= T:
                return
            R2 = max(rows, min(2 * R, self.max_rows or 2 * R))
            T2 = max(T, min(eng.seq_len, -(-length // _CACHE_ROUND) * _CACHE_ROUND))
            k, v, prev = eng._new_cache(R2, T2)
        if self.k is not None:
            n = min(R, k.size(1))  # the rows in use: the first len(self.rows) slots
            k[:, :n, :T] = self.k[:, :n]
            v[:, :n, :T] = self.v[:, :n]
            prev[:n] = self.prev[:n]
            self._give_back()
        self.k, self.v, self.prev = k, v, prev
        self.pooled = eng.compile

    def _give_back(self):
        if self.pooled and self.k is not None:
            self.engine._give_cache((self.k, self.v, self.prev))

    def _move(self, src, dst):
        n = len(self.rows[src].fed)
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.prev[dst] = self.prev[src]

    def _remove(self, ids):
        """Drop rows and compact: the rows that remain keep their order in the first slots."""
        if not ids:
            return
        kept = []
        for slot, r in enumerate(self.rows):
            if r.id in ids:
                continue
            if r.fed and slot != len(kept):
                self._move(slot, len(kept))  # len(kept) < slot: a slot already vacated
            kept.append(r)
        self.rows = kept

    def _order(self):
        """Continuing rows first (they decode as one batch in slots [0, m)), new rows after."""
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].pending is None)
        if order == list(range(len(self.rows))):
            return
        rows = [self.rows[i] for i in order]
        for dst, src in enumerate(order):  # a continuing row only moves to a lower slot
            if rows[dst].pending is not None and src != dst:
                self._move(src, dst)
        self.rows = rows

    def _prefill(self, slot, row, done):
        """Fill `slot` with row's prompt: copied from a row prefilled this step with the same
        prompt, or from the longest stored prefix plus a forward over the rest."""
        eng = self.engine
        key = tuple(row.prompt)
        T = len(row.prompt)
        if key in done:
            src = done[key]
            self.k[:, slot, :T] = self.k[:, src, :T]
            self.v[:, slot, :T] = self.v[:, src, :T]
            self.prev[slot] = self.prev[src]
            other = self.rows[src]
            row.logits, row.prev, row.fed = other.logits, other.prev, list(row.prompt)
            return
        start, prev = 0, None
        hit = eng.prefix_store.longest(row.prompt, T - 1) if eng.prefix_store else None
        if hit is not None:
            start, k, v, prev = hit
            self.k[:, slot, :start] = k
            self.v[:, slot, :start] = v
        cache = KVCache.from_tensors(self.k[:, slot:slot + 1], self.v[:, slot:slot + 1], pos=start, prev_embedding=prev)
        ids = torch.tensor([row.prompt[start:]], dtype=torch.long, device=eng.device)
        row.logits = eng._forward(ids, cache)
        row.prev = cache.prev_embedding
        if row.prev is not None:
            self.prev[slot] = row.prev[0]
        row.fed = list(row.prompt)
        done[key] = slot

    def _decode(self, rows):
        """Feed each row its pending token; logits (m, V) for rows in slots [0, m)."""
        eng = self.engine
        m = len(rows)
        if eng.reference_contract:  # the slow path: one forward per row through its own cache view
            out = []
            ids = torch.tensor([r.pending for r in rows], dtype=torch.long, device=eng.device).view(m, 1)
            for slot, r in enumerate(rows):
                cache = KVCache.from_tensors(self.k[:, slot:slot + 1], self.v[:, slot:slot + 1], pos=len(r.fed),
                                             prev_embedding=r.prev)
                out.append(eng._forward(ids[slot:slot + 1], cache))
                r.prev = cache.prev_embedding
            logits = torch.cat(out)
        else:
            positions = [len(r.fed) for r in rows]
            if eng.compile:  # static shapes: every row of the cache, one of a few fixed spans
                span = _static_span(max(positions), self.k.size(2))
                pad = self.k.size(1) - m
            else:
                span = _kv_len(max(positions), self.k.size(2))
                pad = 0 if m == 1 and not eng.batch_invariant else max(0, MIN_DECODE_ROWS - m)
            # padding rows sit at position 0 of slots that are free or that this step's prefill overwrites
            ids = torch.tensor([r.pending for r in rows] + [0] * pad, dtype=torch.long, device=eng.device).view(-1, 1)
            pos = torch.tensor(positions + [0] * pad, dtype=torch.long, device=eng.device)
            logits = eng._decode_step(ids, pos, self.k, self.v, self.prev, span)[:m]
        for r in rows:
            r.fed.append(r.pending)
            r.pending = None
        return logits

    @torch.inference_mode()
    def step(self):
        """Prefill the new rows, decode the others, sample one token for every row. Returns
        [(row_id, token, mask, finished)]: mask 1 for a sampled token, 0 for a forced tool token;
        finished on <|assistant_end|> or <|bos|> (the token is reported) or at the row's limit."""
        if not self.rows:
            return []
        eng = self.engine
        eng._refresh_weights()
        self._order()
        cont = [r for r in self.rows if r.pending is not None]
        need = max([len(r.fed) + 1 for r in cont] + [len(r.prompt) for r in self.rows])
        self._reserve(len(self.rows), need)
        parts = []
        if cont:
            parts.append(self._decode(cont))
        done = {}
        for slot in range(len(cont), len(self.rows)):
            self._prefill(slot, self.rows[slot], done)
            parts.append(self.rows[slot].logits)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        sampled = _sample_rows(logits, self.rows)
        events, finished = [], set()
        for r, s in zip(self.rows, sampled):
            r.logits = None
            token, mask = eng._advance_tools(r, s)
            r.count += 1
            end = token in eng.terminal or r.count >= r.limit
            events.append((r.id, token, mask, end))
            if end:
                finished.add(r.id)
                if r.keep and eng.prefix_store is not None:
                    self._store(r)
            else:
                r.pending = token
        self._remove(finished)
        return events

    def _store(self, row):
        slot = self.rows.index(row)
        n = len(row.fed)
        prev = row.prev if self.engine.reference_contract else self.prev[slot:slot + 1].clone()
        self.engine.prefix_store.put(row.fed, self.k[:, slot, :n].clone(), self.v[:, slot, :n].clone(), prev)


# CPU BLAS multiplies 1-3 rows with other kernels than 4 or more (whose results agree bit for bit
# whatever the count). Batches of 2-3 rows are padded to 4, so a row's numbers are the same in any
# batch of 2 or more rows; a lone row uses the matrix-vector kernel, ~3x cheaper than 4 rows, and
# differs in the last bits unless the engine is batch_invariant (then it is padded too)
MIN_DECODE_ROWS = 4
_BUCKET_MIN = 64  # smallest attention span a decode step reads; spans grow in powers of two
_CACHE_ROUND = 256  # session caches grow in multiples of this many positions


def _kv_len(max_pos, capacity):
    """Attention span for a step whose furthest row sits at max_pos: a power of two >= max_pos + 1."""
    span = _BUCKET_MIN
    while span < max_pos + 1:
        span *= 2
    return min(span, capacity)


def _row_bucket(rows):
    """Rows of a compiled session's cache: one for a lone row (the common chat, which then reads
    no padding rows' keys), otherwise a power of two >= rows and >= MIN_DECODE_ROWS."""
    return 1 if rows == 1 else max(MIN_DECODE_ROWS, 1 << (rows - 1).bit_length())


def _static_span(max_pos, capacity):
    """Attention span of a compiled step: a quarter, a half or all of the capacity (the smallest
    > max_pos). Each span is a graph of its own, compiled once; a quarter of a full-length cache
    keeps a short chat from reading the whole of it at every step."""
    for span in (capacity // 4, capacity // 2):
        if max_pos < span:
            return span
    return capacity


def _env_switch(name, what):
    """$name=1|0 forces `what` on or off; unset: None (the caller's default)."""
    env = os.environ.get(name, "").strip()
    if env and env not in ("0", "1"):
        raise NanochatError(f"{name}={env!r} is not understood; use 1 ({what}) or 0 (eager).")
    return None if not env else env == "1"


def _compile_default(device):
    """NANOCHAT_ENGINE_COMPILE=1|0 forces torch.compile of the decode step either way. By default
    it is compiled on CUDA (with CUDA graphs), where it costs seconds and pays back at once; the
    CPU uses the ahead-of-time step instead (see _aot_default)."""
    forced = _env_switch("NANOCHAT_ENGINE_COMPILE", "compile")
    return device.type == "cuda" if forced is None else forced


def _aot_default(device):
    """NANOCHAT_ENGINE_AOT=1|0 forces the ahead-of-time compiled step either way; by default the
    CPU uses it (once built; see nanochat/aot.py) and CUDA uses torch.compile with CUDA graphs."""
    forced = _env_switch("NANOCHAT_ENGINE_AOT", "compiled ahead of time")
    return device.type == "cpu" if forced is None else forced


def _step_fn(model, weights, ids, step):
    """The decode step: our model's forward on a DecodeStep, with the compute-dtype weight copies
    swapped in when there are any."""
    if weights:
        return torch.func.functional_call(model, weights, (ids,), {"kv_cache": step}, strict=False)
    return model(ids, kv_cache=step)


class _ThreadPicker:
    """The thread count for CPU decode steps, chosen by timing the steps. Two cores stream a
    step's weights about twice as fast as one (d4, one row, a quiet 2-core Xeon: 0.7 against
    1.55 ms of matmuls), but on a busy machine every multi-threaded op ends at a barrier that
    waits for a core to be free (a lone row's step measured 10x slower on 2 loaded cores). So
    each count (1 and torch's setting) is timed, per kind of step (one row or several), the
    faster one is used, and the other is timed again every PROBE steps as load comes and goes.
    A batch's numbers do not depend on the thread count (its matmuls are split over the
    output); a lone row's matrix-vector products may split a sum, so its logits can differ in
    the last bits, like a lone row's against its batched self. batch_invariant=True keeps the
    thread count fixed (tests/test_engine.py checks both on the machine)."""

    PROBE = 50

    def __init__(self, enabled):
        self.counts = sorted({1, torch.get_num_threads()}) if enabled else []
        self.seconds = {}  # (several rows, threads) -> smoothed seconds per step
        self.steps = {}

    @contextmanager
    def pick(self, rows):
        if len(self.counts) < 2:
            yield
            return
        kind = rows > 1
        n = self.steps[kind] = self.steps.get(kind, 0) + 1
        timed = [(self.seconds[kind, c], c) for c in self.counts if (kind, c) in self.seconds]
        if len(timed) < len(self.counts):
            threads = self.counts[len(timed)]
        else:
            best = min(timed)[1]
            threads = next(c for c in self.counts if c != best) if n % self.PROBE == 0 else best
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            torch.set_num_threads(before)
            old = self.seconds.get((kind, threads))
            self.seconds[kind, threads] = dt if old is None else 0.5 * (old + dt)


def _device_of(model):
    if hasattr(model, "get_device"):
        return torch.device(model.get_device())
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    return params[0].device if params else torch.device("cpu")


class Engine:
    """Generation with a KV cache, sampling and the calculator tool: sessions (continuous
    batching: rows join and leave between steps), and on top of them generate (one prompt, n
    samples, streamed), generate_batch (the same, collected) and generate_multi (several prompts).

    Any model with forward(ids, kv_cache=KVCache) works; for nanochat's GPT the decode step runs
    every row at its own position in one batch (a DecodeStep), eagerly by default on CPU and
    compiled (CUDA graphs) on CUDA; other models decode row by row. A compiled step sees only a
    few shapes (cache rows in powers of two, each cache full length from the start, a few
    attention spans), each compiled once per process however many sessions and Engines decode
    with the model; closed sessions hand their caches back for reuse, so the CUDA graphs replay
    on the addresses they were recorded on. compile=None picks the
    default (the env var NANOCHAT_ENGINE_COMPILE=1|0 overrides); any failure to compile falls
    back to eager with a warning. prefix_cache_bytes bounds the store of reusable keys/values
    (0 turns prefix reuse off). batch_invariant=True makes a row's numbers bit for bit the same
    alone as in any batch (see MIN_DECODE_ROWS) at the price of a slower lone row; without it a
    lone row may differ from its batched self in the last bits of its logits, which changes a
    sampled token only when a draw falls within ~1e-7 of a boundary between two tokens."""

    def __init__(self, model, tokenizer, compile=None, prefix_cache_bytes=256 << 20, batch_invariant=False, aot=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = _device_of(model)
        self.seq_len = model.config.sequence_len
        self.reference_contract = not isinstance(model, GPT)
        self.compile = (_compile_default(self.device) if compile is None else bool(compile)) and not self.reference_contract
        self._compiled = None
        # on the CPU the decode step is compiled ahead of time once per model shape and kept on disk
        self.aot = ((_aot_default(self.device) if aot is None else bool(aot)) and not self.compile
                    and nanochat_aot.supported(model))
        self._aot_build = self._aot_run = self._aot_weights = None
        self._spans = {}  # attention span L -> the (L,) tensor that carries it into the compiled step
        self.batch_invariant = batch_invariant
        self._threads = _ThreadPicker(self.device.type == "cpu" and not batch_invariant)
        self.prefix_store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes else None
        self._params = self._linears = None
        self._weights = None  # compute-dtype copies of the matmul weights (see _refresh_weights)
        self._decode_weights = None
        self._weight_versions = None
        self._free_caches = {}  # rows -> caches of closed compiled sessions, reused (see _take_cache)
        self._cache_lock = threading.Lock()  # sessions on several threads may share one engine
        special = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = special("<|assistant_end|>")
        self.python_start = special("<|python_start|>")
        self.python_end = special("<|python_end|>")
        self.output_start = special("<|output_start|>")
        self.output_end = special("<|output_end|>")
        self.terminal = (self.assistant_end, self.bos)

    def session(self, max_rows=None):
        return Session(self, max_rows)

    # --- pieces --------------------------------------------------------------------

    def _check_prompt(self, tokens):
        if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) for t in tokens):
            raise NanochatError("the prompt must be a list of token ids (ints); encode the text with the tokenizer first.")
        if len(tokens) == 0:
            raise NanochatError("the prompt is empty; give at least one token (a chat prompt starts with <|bos|>).")
        if len(tokens) >= self.seq_len:
            raise NanochatError(f"the prompt has {len(tokens)} tokens but the model's context is {self.seq_len}, which "
                                f"leaves no room to generate; shorten the prompt or drop old turns.")

    def _forward(self, ids, cache):
        """Logits (B, V) of the last position after feeding ids through the cache."""
        kwargs = {"kv_cache": cache} if self.reference_contract else {"kv_cache": cache, "last_only": True}
        if self._weights:
            return torch.func.functional_call(self.model, self._weights, (ids,), kwargs, strict=False)[:, -1, :]
        return self.model.forward(ids, **kwargs)[:, -1, :]

    def _decode_step(self, ids, pos, k, v, prev, kv_len):
        if self.compile:
            step = DecodeStep(k, v, prev, pos, kv_len)
            if self._compiled is None:
                from torch import _dynamo
                _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
                mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
                # dynamic=False: row counts and spans are a few fixed values, each its own graph
                self._compiled = torch.compile(_step_fn, mode=mode, dynamic=False)
            try:
                return self._compiled(self.model, self._weights, ids, step)[:, -1, :]
            except Exception as e:  # no compiler toolchain, an unsupported op ...: the same math, eagerly
                warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {e}); decoding eagerly", stacklevel=2)
                self.compile = False
                self._weight_versions = None  # remade with the eager step's DecodeWeights
                self._refresh_weights()
        run = self._aot_step() if self.aot else None
        if run is not None:
            span = self._spans.get(kv_len)
            if span is None:
                span = self._spans[kv_len] = torch.empty(kv_len, dtype=torch.int8, device=self.device)
            try:
                with self._threads.pick(ids.size(0)):
                    return run(ids, pos, span, k, v, prev, self._aot_weights)
            except Exception as e:  # e.g. a package from another build of torch: the same math, eagerly
                warnings.warn(f"the ahead-of-time compiled decode step failed ({type(e).__name__}: {e}); "
                              f"decoding eagerly", stacklevel=2)
                self.aot = False
        step = DecodeStep(k, v, prev, pos, kv_len, self._decode_weights)
        with self._threads.pick(ids.size(0)):
            return _step_fn(self.model, self._weights, ids, step)[:, -1, :]

    def _aot_step(self):
        """The ahead-of-time compiled step once its package exists (see nanochat/aot.py), else None;
        the first call starts the build in the background."""
        if self._aot_run is not None:
            return self._aot_run
        path = self._builder().ready()
        if path is None:
            if self._aot_build.error is not None:
                warnings.warn(f"no ahead-of-time compiled decode step: {self._aot_build.error}; decoding eagerly",
                              stacklevel=3)
                self.aot = False
            return None
        try:
            self._aot_run = nanochat_aot.Compiled(path)
        except Exception as e:
            warnings.warn(f"loading the compiled decode step {path} failed ({type(e).__name__}: {e}); decoding "
                          f"eagerly (delete the file to rebuild it)", stacklevel=3)
            self.aot = False
        return self._aot_run

    def _builder(self):
        """The package's Build, made at first use (it starts a build when there is no package)."""
        if self._aot_build is None:
            self._aot_build = nanochat_aot.Build(self.model)
        return self._aot_build

    def wait_for_compile(self, timeout=None):
        """Block until the ahead-of-time step is built (or its build failed, or timeout seconds
        passed); a no-op when the engine does not use one. Returns whether it is ready."""
        if not self.aot:
            return False
        if self._builder().proc is not None:
            print(f"compiling the decode step for this model shape once (a minute or so on a few CPU cores); "
                  f"cached in {self._aot_build.path}", file=sys.stderr, flush=True)
        self._aot_build.wait(timeout)
        return self._aot_step() is not None

    def _new_cache(self, rows, length):
        """Zeroed keys, values (n_layer, rows, length, Hkv, D) and previous embeddings (rows, 1, C)."""
        c = self.model.config
        shape = (c.n_layer, rows, length, c.n_kv_head, c.n_embd // c.n_head)
        return (torch.zeros(shape, device=self.device, dtype=COMPUTE_DTYPE),
                torch.zeros(shape, device=self.device, dtype=COMPUTE_DTYPE),
                torch.zeros(rows, 1, c.n_embd, device=self.device, dtype=COMPUTE_DTYPE))

    def _take_cache(self, rows):
        """A full-length cache of `rows` rows for a compiled session: one that a closed session gave
        back, or a new one. Reuse keeps the addresses the CUDA graphs were recorded on, so they
        replay as they are. What the last session left in it weighs nothing, as the stale slots of a
        finished row do within a session: attention masks every slot past a row's position, and
        a prefill writes a row's slots before it decodes."""
        with self._cache_lock:
            free = self._free_caches.get(rows)
            if free:
                return free.pop()
        from torch import _dynamo

        cache = self._new_cache(rows, self.seq_len)
        for t in cache:
            # CUDA graphs update the cache in place rather than a copy of it. Unguarded: a new cache
            # (a new row bucket, a second Engine) re-records a graph instead of recompiling it
            _dynamo.mark_static_address(t, guard=False)
        return cache

    def _give_cache(self, cache):
        with self._cache_lock:
            self._free_caches.setdefault(cache[0].size(1), []).append(cache)

    def _refresh_weights(self):
        """What the decode step reads instead of the parameters, made once and remade only when a
        parameter changed (RL updates the model between rollouts): copies of the matmul weights
        in the compute dtype when the masters are wider (otherwise every step would cast every
        fp32 master to bf16 again: 3x the weight traffic of a memory-bound step), and for an
        eager step the DecodeWeights (stacked q/k/v matrices, scalars as Python floats)."""
        if self.reference_contract or not isinstance(self.model, torch.nn.Module):
            return
        if self._params is None:  # the model's structure is fixed; its values are not
            self._params = list(self.model.parameters())
            self._linears = [(name + ".weight", m) for name, m in self.model.named_modules()
                             if isinstance(m, torch.nn.Linear) and m.weight.dtype != COMPUTE_DTYPE]
        versions = [(p.data_ptr(), p._version) for p in self._params]
        if versions == self._weight_versions:
            return
        if self._linears:
            linears = [(name, m.weight) for name, m in self._linears]
            if self._weights is not None and list(self._weights) == [n for n, _ in linears]:
                for (name, w) in linears:
                    self._weights[name].copy_(w.detach())  # in place: CUDA graphs keep their addresses
            else:
                self._weights = {name: w.detach().to(COMPUTE_DTYPE) for name, w in linears}
        # a compiled step fuses by itself, and would recompile whenever a scalar changed
        self._decode_weights = None if self.compile else DecodeWeights(self.model, COMPUTE_DTYPE)
        self._aot_weights = nanochat_aot.weights_of(self.model) if self.aot else None
        self._weight_versions = versions

    def _advance_tools(self, row, sampled):
        """Apply forced tokens and the tool state machine to one row: (token, mask)."""
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = sampled, 1
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

    def release(self):
        """Forget the stored prefixes and free the caches closed sessions left for reuse."""
        if self.prefix_store is not None:
            self.prefix_store.clear()
        with self._cache_lock:
            self._free_caches.clear()

    @torch.inference_mode()
    def warmup(self):
        """Run prefill, batched decode and sampling once, so the first request pays no one-time
        costs (allocator, a compile when enabled). On the CPU it first waits for the ahead-of-time
        compiled step (seconds to a minute the first time a model shape is seen, then a file
        load). A server calls it before it says it is ready."""
        self.wait_for_compile()
        store, self.prefix_store = self.prefix_store, None
        try:
            for n in (1, 2):  # a lone row and a batch: each kind of step once per thread count
                sess = self.session()
                sess.add([0, 1], n=n, max_tokens=4, temperature=1.0, top_k=5, top_p=0.9, seed=0)
                while len(sess):
                    sess.step()
        finally:
            self.prefix_store = store
        self._threads.seconds.clear()  # first steps pay one-time costs: no guide to the thread count

    # --- public API ------------------------------------------------------------------

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seed=42):
        """Yield (token_column, token_masks), one entry per sample row, until every row has
        emitted <|assistant_end|> or <|bos|>, max_tokens tokens were produced (forced tool
        tokens included), or the model's context is full. Row i samples with seed + i. A row that
        has finished repeats its terminal token (mask 0) while the others go on."""
        self._check_prompt(tokens)
        if num_samples < 1:
            raise NanochatError(f"num_samples must be at least 1, not {num_samples}.")
        if max_tokens is not None and max_tokens <= 0:
            return
        sess = self.session()
        ids = sess.add(list(tokens), n=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed)
        slot = {rid: i for i, rid in enumerate(ids)}
        last = [None] * num_samples
        try:
            while len(sess):
                column, masks = list(last), [0] * num_samples
                for rid, token, mask, _ in sess.step():
                    column[slot[rid]], masks[slot[rid]] = token, mask
                    last[slot[rid]] = token
                yield column, masks
        finally:
            sess.close()

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming generate: (results, masks), each a list of num_samples lists holding the
        prompt then the generated tokens, without the terminal token; masks are 0 on the prompt
        and on forced tool tokens, 1 on sampled tokens."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if done[i]:
                    continue
                if token in self.terminal:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    def generate_multi(self, prompts, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0, seeds=None):
        """Decode several prompts (of any lengths) together, one row each, rows stopping
        independently. Row i samples with seeds[i] (default 42), so its tokens are those
        generate() gives for that prompt alone. Yields (token_column, token_masks) with None for
        rows that have finished."""
        if not prompts:
            raise NanochatError("generate_multi needs at least one prompt.")
        for p in prompts:
            self._check_prompt(p)
        B = len(prompts)
        seeds = [42] * B if seeds is None else list(seeds)
        if len(seeds) != B:
            raise NanochatError(f"got {len(seeds)} seeds for {B} prompts; give one seed per prompt.")
        if max_tokens is not None and max_tokens <= 0:
            return
        sess = self.session()
        slot = {}
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            (rid,) = sess.add(list(p), max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
            slot[rid] = i
        try:
            while len(sess):
                column, masks = [None] * B, [None] * B
                for rid, token, mask, _ in sess.step():
                    column[slot[rid]], masks[slot[rid]] = token, mask
                yield column, masks
        finally:
            sess.close()


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
