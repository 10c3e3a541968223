"""Serving under load: clients arriving at random (Poisson) times against the web server
(nanochat.server under uvicorn) with a tiny random-init model, in three scheduling modes, plus the
time to first token along one long multi-turn chat.

    python -m bench.serve                                 # CPU: depth 2, 32 clients at 32/s, 32 tokens each
    python -m bench.serve --depth 4 --rate 20 --max-batch 16 --device cuda

Modes (the same arrival times and seeds in each):
  one at a time   --max-batch 1: each request decodes alone
  admission       requests that wait while a batch decodes start together once it has drained
  step            a request joins the running batch at the next step (continuous batching)
Per mode: p50/p99 time to first token, p50 latency, total generated tokens/s (first arrival to
last reply), each the best of --repeats runs (the modes take turns, so load drifts hit them alike). Then the multi-turn series: TTFT of turns 1..6 of a chat whose every user message is long,
best of --chats chats, with the engine's prefix store (each turn reuses the KV cache of the
turns before it) and without; the goal is turn 6 within 1.5x of turn 1 with reuse. The clients run in the same process (an asyncio loop
beside uvicorn's), so absolute numbers include their overhead. Prints tables and a final JSON line.
"""

import argparse
import asyncio
import json
import random
import statistics
import time

from tqdm import tqdm


def build_engine(args):
    import torch

    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(400)]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=args.vocab)
    torch.manual_seed(0)
    dim = args.depth * 64
    model = GPT(GPTConfig(sequence_len=args.seq_len, vocab_size=tok.get_vocab_size(), n_layer=args.depth,
                          n_head=dim // 64, n_kv_head=dim // 64, n_embd=dim, window_pattern="L"))
    model.to(args.device)
    model.init_weights()
    model.eval()
    return Engine(model, tok, compile=bool(args.compile)), tok, texts


def best_of(runs):
    """Each figure at its best over the runs (the machine's load only ever slows a run down)."""
    best = {key: min(r[key] for r in runs) for key in ("ttft_p50_s", "ttft_p99_s", "latency_p50_s", "wall_s")}
    best.update(tok_per_s=max(r["tok_per_s"] for r in runs), max_batch_rows=max(r["max_batch_rows"] for r in runs),
                batching_mode=runs[0]["batching_mode"], runs=runs)
    return best


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fresh_connections(url):
    """An HTTP client that opens a new connection per request: on a reused one the request body's
    small second write can wait for the server's delayed ACK (~40 ms on Linux), which would pose as
    time to first token."""
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


async def stream_reply(http, messages, max_tokens, seed):
    """One streaming request -> (time to first token, latency, reply text, completion tokens)."""
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "top_k": 0,
            "seed": seed, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - t0
                text.append(event["choices"][0]["delta"]["content"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return (first or latency), latency, "".join(text), tokens


async def arrivals(url, args, prompts, times):
    """Client i sends prompts[i] at times[i] seconds after the start."""
    results = [None] * len(times)

    async def client(i, http):
        await asyncio.sleep(times[i])
        messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
        results[i] = await stream_reply(http, messages, args.max_tokens, 1000 + i)

    async with fresh_connections(url) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(len(times))))
        wall = time.perf_counter() - t0 - times[0]
        stats = (await http.get("/stats")).json()
    ttfts = [r[0] for r in results]
    tokens = sum(r[3] for r in results)
    return {"requests": len(times), "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": percentile(ttfts, 0.99),
            "latency_p50_s": statistics.median(r[1] for r in results),
            "max_batch_rows": stats["workers"][0]["max_batch_rows"], "batching_mode": stats["batching_mode"]}


async def chat_series(url, args, texts, chat):
    """TTFT of each turn of one chat: every user message is --turn-words words long."""
    rng = random.Random(chat)
    messages, ttfts = [], []
    for turn in range(args.turns):
        words = []
        while len(words) < args.turn_words:
            words += rng.choice(texts).split()
        messages.append({"role": "user", "content": " ".join(words[:args.turn_words])})
        async with fresh_connections(url) as http:
            ttft, _latency, reply, _tokens = await stream_reply(http, messages, args.turn_tokens, 7 * chat + turn)
        messages.append({"role": "assistant", "content": reply or "ok"})
        ttfts.append(ttft)
    return ttfts


async def wait_ready(url):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not (await http.get("/health")).json()["ready"]:
            await asyncio.sleep(0.05)


def serve(engine, tok, args, max_batch, batching):
    from nanochat.server import BackgroundServer, create_app

    app = create_app([engine], tok, model_name="bench", devices=[args.device], max_batch=max_batch,
                     batching=batching, max_queue=args.clients * 2, request_timeout=None,
                     max_tokens=max(args.max_tokens, args.turn_tokens))
    return BackgroundServer(app)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048, help="the model's context (the multi-turn chat must fit)")
    p.add_argument("--clients", type=int, default=32, help="requests, one per client")
    p.add_argument("--rate", type=float, default=32.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="rows per batch in the batching modes")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--turn-words", type=int, default=120, help="words in each user message of the multi-turn chat")
    p.add_argument("--turn-tokens", type=int, default=32, help="max tokens of each reply in the multi-turn chat")
    p.add_argument("--chats", type=int, default=5, help="multi-turn chats (each turn's best is reported)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the arrivals per mode (each figure's best is reported)")
    p.add_argument("--skip-modes", action="store_true", help="only the multi-turn series")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", type=int, default=0, help="compile the engine's decode step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)

    import logging

    import torch

    logging.getLogger("nanochat.server").setLevel(logging.WARNING)  # one line per request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, tok, texts = build_engine(args)
    if not hasattr(engine, "session"):
        raise SystemExit("this Engine has no session(); step-level batching needs it")
    rng = random.Random(0)
    times, t = [], 0.0
    for _ in range(args.clients):
        t += rng.expovariate(args.rate)
        times.append(t)

    modes = {"one at a time": (1, "step"), "admission": (args.max_batch, "admission"), "step": (args.max_batch, "step")}
    if args.skip_modes:
        modes = {}
    runs = {name: [] for name in modes}
    for r in tqdm(range(args.repeats), desc="arrival runs", disable=not modes):  # modes interleaved: same load drift
        for k, (name, (max_batch, batching)) in enumerate(modes.items()):
            # each run's prompts start differently, so none finds another run's replies in the prefix store
            prompts, warm = [f"run {r}.{k}. {t}" for t in texts], [f"warm {r}.{k}. {t}" for t in texts]
            with serve(engine, tok, args, max_batch, batching) as server:
                asyncio.run(wait_ready(server.url))
                asyncio.run(arrivals(server.url, args, warm, [0.0] * min(4, args.clients)))
                runs[name].append(asyncio.run(arrivals(server.url, args, prompts, times)))
    results = {name: best_of(rs) for name, rs in runs.items()}
    # the multi-turn series with the engine's prefix store, then without it (every turn prefilled whole)
    multi = {}
    store = engine.prefix_store
    for name, prefix_store in (("prefix reuse", store), ("no reuse", None)):
        engine.prefix_store = prefix_store
        with serve(engine, tok, args, args.max_batch, "step") as server:
            asyncio.run(wait_ready(server.url))
            asyncio.run(chat_series(server.url, args, texts, -1))  # warm-up
            hits = store.hits
            series = [asyncio.run(chat_series(server.url, args, texts, chat)) for chat in range(args.chats)]
        multi[name] = {"ttft_best_s": [min(s[t] for s in series) for t in range(args.turns)],
                       "ttft_median_s": [statistics.median(s[t] for s in series) for t in range(args.turns)],
                       "prefix_hits": store.hits - hits}
    engine.prefix_store = store

    print(f"\nserve bench: depth {args.depth}, vocab {args.vocab}, {args.clients} clients at {args.rate:g}/s (Poisson), "
          f"{args.max_tokens} tokens max, max batch {args.max_batch}, device {args.device}, compile {args.compile}, "
          f"best of {args.repeats}")
    print(f"{'mode':14s} {'ttft p50 s':>11s} {'ttft p99 s':>11s} {'latency p50 s':>14s} {'tok/s':>8s} {'rows max':>9s}")
    for name, r in results.items():
        print(f"{name:14s} {r['ttft_p50_s']:11.3f} {r['ttft_p99_s']:11.3f} {r['latency_p50_s']:14.3f} "
              f"{r['tok_per_s']:8.1f} {r['max_batch_rows']:9d}")
    base = results.get("one at a time")
    for name in ("admission", "step") if base else ():
        r = results[name]
        print(f"{name} / one at a time: tok/s x{r['tok_per_s'] / base['tok_per_s']:.2f}, "
              f"ttft p50 x{r['ttft_p50_s'] / base['ttft_p50_s']:.2f}, ttft p99 x{r['ttft_p99_s'] / base['ttft_p99_s']:.2f}")
    print(f"\nmulti-turn chat ({args.turn_words}-word user messages, {args.turn_tokens}-token replies): "
          f"TTFT by turn, best of {args.chats} chats")
    for name, m in multi.items():
        turns = m["ttft_best_s"]
        print(f"{name:13s}" + "  ".join(f"{t * 1000:6.0f} ms" for t in turns)
              + f"   turn {args.turns} / turn 1: x{turns[-1] / turns[0]:.2f}")
    print(f"follow-up turns that reused the conversation's cache: {multi['prefix reuse']['prefix_hits']} of "
          f"{args.chats * (args.turns - 1)}; goal: turn {args.turns} within 1.5x of turn 1 with reuse")
    print(json.dumps({"bench": "serve", "config": vars(args), "modes": results, "multi_turn": multi}))


if __name__ == "__main__":
    main()
