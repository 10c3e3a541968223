"""Inference benchmark (SPEC §16): time to first token, per-step decode latency, tokens/s,
memory and (on GPU) memory-bandwidth utilisation of the Engine, swept over batch sizes, with a
naive peer timed in the same run.

    python -m scripts.infer_bench                              # random-init depth 4, width 256, vocab 8192
    NANOCHAT_DTYPE=bfloat16 python -m scripts.infer_bench      # the compute dtype is fixed at import
    python -m scripts.infer_bench -i sft -g d20 --batch-sizes 1,8,32,128   # a checkpoint

The peer ("eager") is an upstream-style engine: prefill at batch 1, copy into a batch-N
KVCache, then one eager model.forward per token that slices the cache to the current length.
It is run on the same model, prompt and seed; with greedy decoding (the default) both must
produce the same tokens, which is checked. Upstream nanochat's own engine, measured on a
2-core CPU of this kind at depth 4 / width 256 / vocab 8192, decoded about 210 tok/s at batch 1
and 1,050 tok/s at 8 samples; those recorded figures are printed for reference (its code cannot
be fetched here). Prints a table and a final JSON line.
"""

import argparse
import json
import resource
import time

import torch

from nanochat.common import COMPUTE_DTYPE, NanochatError, autodetect_device_type, get_peak_bandwidth, run_main

UPSTREAM_TOK_S = {1: 210.0, 8: 1050.0}  # upstream engine, CPU, depth 4 / width 256 / vocab 8192 (recorded)


class _NoSpecialsTokenizer:
    """For random-init models: no token is special, so generation always runs max_tokens steps."""

    def encode_special(self, text):
        return -1

    def get_bos_token_id(self):
        return -1

    def encode(self, text):
        return []

    def decode(self, ids):
        return ""


def build_random_model(args, device):
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig.from_depth(args.depth, args.aspect_ratio, args.head_dim, sequence_len=args.seq_len,
                                  vocab_size=args.vocab, window_pattern=args.window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # init leaves output projections at zero; give every path real numbers
        g = torch.Generator(device="cpu").manual_seed(0)
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
    model.eval()
    return model


@torch.inference_mode()
def eager_generate(model, tokens, num_samples, max_tokens, temperature=0.0, top_k=None, seed=42):
    """The peer: upstream's engine loop (eager forward per token, cache sliced to the current length)."""
    from nanochat.engine import KVCache, sample_next_token

    c = model.config
    device = model.get_device()
    hd = c.n_embd // c.n_head
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    one = KVCache(1, c.n_kv_head, len(tokens), hd, c.n_layer, device, COMPUTE_DTYPE)
    logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=one)[:, -1, :]
    cache = KVCache(num_samples, c.n_kv_head, len(tokens) + max_tokens, hd, c.n_layer, device, COMPUTE_DTYPE)
    cache.prefill(one)
    logits = logits.expand(num_samples, -1)
    for step in range(max_tokens):
        ids = sample_next_token(logits, rng, temperature, top_k)
        column = ids.tolist()
        yield column, [1] * num_samples
        if step == max_tokens - 1:
            break
        logits = model(ids.view(num_samples, 1), kv_cache=cache)[:, -1, :]


def memory_now(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_run(gen_fn, device):
    """Run one generation; (tokens per row, ttft seconds, decode seconds per step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    t_first = None
    rows = None
    steps = 0
    for column, _ in gen_fn():
        if t_first is None:
            sync()
            t_first = time.perf_counter()
            rows = [[] for _ in column]
        for r, t in zip(rows, column):
            r.append(t)
        steps += 1
    sync()
    t_end = time.perf_counter()
    per_step = (t_end - t_first) / max(steps - 1, 1)
    return rows, t_first - t0, per_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default=None, help="load a checkpoint (base|sft|rl) instead of a random model")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--window", default="L")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default=None, help="comma list; default 1,8 on CPU, 1,8,32,128 on GPU")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (tokens are compared with the peer)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (the best is kept)")
    p.add_argument("--no-peer", action="store_true", help="skip the eager peer")
    p.add_argument("--compile", type=int, default=1, choices=[0, 1], help="compile the engine's decode step (1) or not (0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device-type", default="")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from nanochat.engine import Engine

    device = torch.device(args.device_type or autodetect_device_type())
    torch.manual_seed(0)
    if args.source:
        from nanochat.checkpoint import load_model

        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    else:
        model, tokenizer = build_random_model(args, device), _NoSpecialsTokenizer()
    cfg = model.config
    if args.prompt_len + args.max_tokens > cfg.sequence_len:
        raise NanochatError(f"--prompt-len + --max-tokens = {args.prompt_len + args.max_tokens} exceeds the model's "
                            f"context of {cfg.sequence_len}; lower them or raise --seq-len.")
    default_batches = "1,8,32,128" if device.type == "cuda" else "1,8"
    batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, seed=42)
    engine = Engine(model, tokenizer, compile=bool(args.compile))
    peak_bw = get_peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    # an ideal decode step reads every matmul weight once in the compute dtype (the engine keeps
    # compute-dtype copies of the fp32 masters) plus the KV cache within each layer's window
    itemsize = torch.empty((), dtype=COMPUTE_DTYPE).element_size()
    weight_bytes = sum(m.weight.numel() * itemsize for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(f"device {device}, dtype {str(COMPUTE_DTYPE).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"layers {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, prompt {args.prompt_len}, "
          f"max tokens {args.max_tokens}, compile {engine.compile}")

    # the recorded upstream figures are only comparable on the configuration they were taken at
    same_config_as_upstream = (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (4, 256, 8192)
    results = []
    for B in batches:
        point = {"batch": B}
        for name in ([] if args.no_peer else ["eager"]) + ["engine"]:
            if name == "engine":
                fn = lambda B=B: engine.generate(prompt, num_samples=B, **kw)  # noqa: E731
            else:
                fn = lambda B=B: eager_generate(model, prompt, B, **kw)  # noqa: E731
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            rows, _, _ = time_run(fn, device)  # warm-up (compiles on first use)
            warm = time.perf_counter() - t0
            best = None
            for _ in range(args.repeats):
                rows, ttft, per_step = time_run(fn, device)
                if best is None or per_step < best[1]:
                    best = (ttft, per_step)
            ttft, per_step = best
            steps = len(rows[0])
            stats = {"ttft_ms": 1e3 * ttft, "step_ms": 1e3 * per_step, "tok_s": B / per_step, "steps": steps,
                     "warmup_s": warm, "memory_mb": memory_now(device) / 2**20}
            if peak_bw:
                ctx = args.prompt_len + steps // 2
                bytes_step = weight_bytes + B * model.kv_bytes_read(ctx)
                stats["mbu"] = bytes_step / per_step / peak_bw
            point[name] = stats
            point[name + "_tokens"] = rows
        if "eager" in point:
            point["speedup"] = point["engine"]["tok_s"] / point["eager"]["tok_s"]
            ours, peer = point.pop("engine_tokens"), point.pop("eager_tokens")
            # the engine stops a row at <|assistant_end|>/<|bos|> (real tokenizers); the peer never does
            point["same_tokens"] = all(a == b[:len(a)] for a, b in zip(ours, peer))
        else:
            point.pop("engine_tokens")
        if B in UPSTREAM_TOK_S and device.type == "cpu" and same_config_as_upstream:
            point["vs_upstream_recorded"] = point["engine"]["tok_s"] / UPSTREAM_TOK_S[B]
        results.append(point)
        engine.release()

    hdr = f"{'batch':>5} {'engine':>7} {'ttft ms':>8} {'ms/step':>8} {'tok/s':>9} {'mem MB':>8} {'mbu':>6} {'warmup s':>8}"
    print(hdr)
    for point in results:
        for name in ("eager", "engine"):
            if name in point:
                s = point[name]
                mbu = f"{100 * s['mbu']:.1f}%" if "mbu" in s else "-"
                print(f"{point['batch']:>5} {name:>7} {s['ttft_ms']:>8.2f} {s['step_ms']:>8.3f} {s['tok_s']:>9.1f} "
                      f"{s['memory_mb']:>8.0f} {mbu:>6} {s['warmup_s']:>8.1f}")
        extra = []
        if "speedup" in point:
            extra.append(f"engine/eager {point['speedup']:.2f}x, same tokens: {point['same_tokens']}")
        if "vs_upstream_recorded" in point:
            extra.append(f"engine/upstream(recorded {UPSTREAM_TOK_S[point['batch']]:.0f} tok/s) "
                         f"{point['vs_upstream_recorded']:.2f}x")
        if extra:
            print(f"{'':>5} " + "; ".join(extra))
    print(json.dumps({"bench": "infer", "device": str(device), "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
                      "threads": torch.get_num_threads(), "compile": engine.compile, "depth": cfg.n_layer,
                      "width": cfg.n_embd, "vocab": cfg.vocab_size, "prompt_len": args.prompt_len,
                      "max_tokens": args.max_tokens, "upstream_recorded_tok_s": UPSTREAM_TOK_S, "results": results}))


if __name__ == "__main__":
    run_main(main)
