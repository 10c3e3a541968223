"""Serving throughput: N concurrent streaming clients on loopback against the web server
(nanochat.server under uvicorn) with a tiny random-init model, with and without dynamic
batching (--max-batch 1 = one request at a time, as upstream's server).

    python -m bench.serve                                    # CPU: depth 2, 16 clients x 2 requests, 32 tokens each
    python -m bench.serve --depth 4 --clients 32 --max-batch 16 --device cuda

Reported per mode: requests/s, generated tokens/s, median/p95 latency and time to first token;
then the batched/unbatched ratios. The clients run in the same process (an asyncio loop beside
uvicorn's), so absolute numbers include their overhead; the ratio is the measurement. Every
request uses its own seed and temperature 1, so both modes decode the same amount of text.
Prints a table and a final JSON line.
"""

import argparse
import asyncio
import json
import random
import statistics
import time


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


async def drive(url, args, prompts):
    import httpx

    latencies, ttfts, tokens = [], [], 0

    async def client(c, http):
        nonlocal tokens
        for r in range(args.requests):
            i = c * args.requests + r
            body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 1.0, "top_k": 0, "seed": 1000 + i,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - t0
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first if first is not None else latencies[-1])

    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(args.clients)))
        wall = time.perf_counter() - t0
        stats = (await http.get("/stats")).json()
    n = args.clients * args.requests
    lat = sorted(latencies)
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": tokens / wall, "tokens": tokens,
            "latency_p50_s": statistics.median(lat), "latency_p95_s": lat[min(n - 1, int(0.95 * n))],
            "ttft_p50_s": statistics.median(ttfts), "max_batch_rows": stats["workers"][0]["max_batch_rows"],
            "batches": stats["workers"][0]["batches"]}


def run_mode(engine, tok, prompts, args, max_batch):
    from nanochat.server import BackgroundServer, create_app

    app = create_app([engine], tok, model_name="bench", devices=[args.device], max_batch=max_batch,
                     max_queue=args.clients * 2, request_timeout=None, max_tokens=args.max_tokens)
    with BackgroundServer(app) as server:
        warm = argparse.Namespace(**{**vars(args), "clients": min(args.clients, max_batch), "requests": 1})
        asyncio.run(drive(server.url, warm, prompts))  # warm-up: allocations, caches, compile
        return asyncio.run(drive(server.url, args, prompts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="rows per batched decode in the batching mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", type=int, default=0, help="compile the engine's decode step (recompiles per batch size)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)

    import logging

    import torch

    logging.getLogger("nanochat.server").setLevel(logging.WARNING)  # one line per request otherwise
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, tok, texts = build_engine(args)
    if not hasattr(engine, "generate_multi"):
        raise SystemExit("this Engine has no generate_multi; nothing to compare")
    results = {}
    for name, mb in (("one at a time", 1), (f"batched (max {args.max_batch})", args.max_batch)):
        results[name] = r = run_mode(engine, tok, texts, args, mb)
        r["max_batch"] = mb

    print(f"\nserve bench: depth {args.depth}, vocab {args.vocab}, {args.clients} clients x {args.requests} requests, "
          f"{args.max_tokens} tokens max, device {args.device}, compile {args.compile}")
    print(f"{'mode':22s} {'req/s':>8s} {'tok/s':>9s} {'p50 s':>7s} {'p95 s':>7s} {'ttft p50':>9s} {'rows/batch max':>15s}")
    for name, r in results.items():
        print(f"{name:22s} {r['req_per_s']:8.2f} {r['tok_per_s']:9.1f} {r['latency_p50_s']:7.2f} {r['latency_p95_s']:7.2f} "
              f"{r['ttft_p50_s']:9.2f} {r['max_batch_rows']:15d}")
    base, batched = results["one at a time"], list(results.values())[1]
    ratios = {"req_per_s": batched["req_per_s"] / base["req_per_s"], "tok_per_s": batched["tok_per_s"] / base["tok_per_s"],
              "latency_p50": batched["latency_p50_s"] / base["latency_p50_s"]}
    print(f"batched / one at a time: req/s x{ratios['req_per_s']:.2f}, tok/s x{ratios['tok_per_s']:.2f}, "
          f"median latency x{ratios['latency_p50']:.2f}")
    print(json.dumps({"bench": "serve", "config": vars(args), "unbatched": base, "batched": batched, "ratios": ratios}))


if __name__ == "__main__":
    main()
