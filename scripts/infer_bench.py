"""Inference benchmark: tokens/s of the Engine against a peer that does the reference
implementation's Engine loop, timed in the same run on the same weights, with the machine's bound.

    python -m scripts.infer_bench                    # random-init d4 (width 256, vocab 8192, context 256)
    python -m scripts.infer_bench -i sft -g d20 --batch-sizes 1,8,32,128   # a checkpoint

The peer runs what the reference Engine runs per token: prefill the prompt at batch 1, copy it
into a batch-N KVCache, then per step sample (temperature, top_k, multinomial), walk each row's
tool state machine (forced tokens, python blocks, the calculator) and call
model.forward(ids, kv_cache=cache) on the (N, 1) column. The engine is timed with its default
settings (what a user gets: on the CPU the ahead-of-time compiled step, whose one-time build
the warm-up waits for, not timed). The floor is the machine's bound per decode step: the bytes of
matmul weights (plus the KV cache read) over the measured memory bandwidth, and the step's FLOPs
over the measured matmul rate; "of bound" is how close each engine gets. Prints a table and a
final JSON line.
"""

import argparse
import json
import os
import resource
import time

import torch

from nanochat.common import (
    COMPUTE_DTYPE,
    NanochatError,
    autodetect_device_type,
    get_peak_bandwidth,
    measure_matmul_flops,
    run_main,
    synchronize,
)


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
def peer_generate(model, tokenizer, tokens, num_samples, max_tokens, temperature=1.0, top_k=None, seed=42):
    """The reference Engine's loop (see the module docstring), yielding (column, masks) per step."""
    from collections import deque

    from nanochat.engine import KVCache, _use_calculator, sample_next_token

    c = model.config
    device = model.get_device()
    hd = c.n_embd // c.n_head
    special = tokenizer.encode_special
    bos, end = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end = special("<|output_start|>"), special("<|output_end|>")
    rng = torch.Generator(device=device)
    rng.manual_seed(seed)
    one = KVCache(1, c.n_kv_head, len(tokens), hd, c.n_layer, device, COMPUTE_DTYPE)
    logits = model.forward(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=one)[:, -1, :]
    cache = KVCache(num_samples, c.n_kv_head, len(tokens) + max_tokens, hd, c.n_layer, device, COMPUTE_DTYPE)
    cache.prefill(one)
    logits = logits.expand(num_samples, -1)
    forced = [deque() for _ in range(num_samples)]
    in_python, expr, completed = [False] * num_samples, [[] for _ in range(num_samples)], [False] * num_samples
    for step in range(max_tokens):
        sampled = sample_next_token(logits, rng, temperature, top_k).tolist()
        column, masks = [], []
        for i in range(num_samples):
            token, mask = (forced[i].popleft(), 0) if forced[i] else (sampled[i], 1)
            column.append(token)
            masks.append(mask)
            completed[i] = completed[i] or token in (end, bos)
            if token == py_start:
                in_python[i], expr[i] = True, []
            elif token == py_end and in_python[i]:
                in_python[i] = False
                result = _use_calculator(tokenizer.decode(expr[i])) if expr[i] else None
                if result is not None:
                    forced[i].extend([out_start, *tokenizer.encode(str(result)), out_end])
                expr[i] = []
            elif in_python[i]:
                expr[i].append(token)
        yield column, masks
        if all(completed) or step == max_tokens - 1:
            break
        ids = torch.tensor(column, dtype=torch.long, device=device).view(num_samples, 1)
        logits = model.forward(ids, kv_cache=cache)[:, -1, :]


def decode_mode(engine):
    """How the engine's decode step runs: 'aot' (compiled ahead of time, CPU), 'compiled'
    (torch.compile, CUDA graphs on GPUs) or 'eager'."""
    return "compiled" if engine.compile else "aot" if engine.aot and engine._aot_run is not None else "eager"


def measure_bandwidth(device, nbytes=256 << 20, trials=5):
    """Memory bandwidth (bytes/s, read + write) of a large copy, the best of a few."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(trials):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


def memory_now(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_run(gen_fn, device):
    """Run one generation; (tokens per row, ttft seconds, decode seconds per step, the process's
    CPU seconds per step). On a shared machine the CPU time is the steadier figure: waiting for
    a core does not count in it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    c0 = time.process_time()
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
    return rows, t_first - t0, per_step, (time.process_time() - c0) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default=None, help="load a checkpoint (base|sft|rl) instead of a random model")
    p.add_argument("-g", "--model-tag", default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", default="L")
    p.add_argument("--prompt-len", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--batch-sizes", default=None, help="comma list; default 1,8 on CPU, 1,8,32,128 on GPU")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (then the tokens are compared with the peer)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (the best is kept)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer")
    p.add_argument("--compile", type=int, default=None, choices=[0, 1],
                   help="compile the engine's decode step (default: the engine's own choice)")
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
    engine = Engine(model, tokenizer, compile=None if args.compile is None else bool(args.compile))
    t0 = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - t0

    # the bound: a decode step reads every matmul weight once (in the compute dtype) and each row's
    # KV cache, and does decode_flops per row; whichever takes longer at the measured rates
    bandwidth = get_peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    bandwidth = bandwidth or measure_bandwidth(device)
    matmul_rate = measure_matmul_flops(device, COMPUTE_DTYPE)
    itemsize = torch.empty((), dtype=COMPUTE_DTYPE).element_size()
    weight_bytes = sum(m.weight.numel() * itemsize for m in model.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes -= (model.padded_vocab_size - cfg.vocab_size) * cfg.n_embd * itemsize  # padding rows are not read
    ctx = args.prompt_len + args.max_tokens // 2
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other processes slow every figure
    print(f"load {load:.2f}, device {device}, dtype {str(COMPUTE_DTYPE).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
          f"layers {cfg.n_layer}, width {cfg.n_embd}, vocab {cfg.vocab_size}, context {cfg.sequence_len}, "
          f"prompt {args.prompt_len}, new tokens {args.max_tokens}, temperature {args.temperature}, "
          f"decode step {decode_mode(engine)}, warm-up {warmup_s:.2f} s")
    print(f"machine: {bandwidth / 1e9:.1f} GB/s memory, {matmul_rate / 1e9:.1f} GFLOP/s matmul; per token "
          f"{weight_bytes / 1e6:.1f} MB of weights, {model.decode_flops(ctx) / 1e6:.1f} MFLOP")

    results = []
    for B in batches:
        step_bytes = weight_bytes + B * model.kv_bytes_read(ctx)
        bound_step = max(step_bytes / bandwidth, B * model.decode_flops(ctx) / matmul_rate)
        point = {"batch": B, "bound_tok_s": B / bound_step,
                 "bound_by": "memory" if step_bytes / bandwidth >= B * model.decode_flops(ctx) / matmul_rate else "compute"}
        runs = {"engine": lambda B=B: engine.generate(prompt, num_samples=B, **kw)}
        if not args.no_peer:
            runs = {"peer": lambda B=B: peer_generate(model, tokenizer, prompt, B, **kw), **runs}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for fn in runs.values():
            time_run(fn, device)  # warm-up
        best, cpu = {}, {}
        for _ in range(args.repeats):  # interleaved, so that a burst of load on a shared machine hits both
            for name, fn in runs.items():
                t0 = time.perf_counter()
                rows, ttft, per_step, cpu_step = time_run(fn, device)
                total = time.perf_counter() - t0
                if name not in best or total < best[name][0]:
                    best[name] = (total, ttft, per_step, rows)
                cpu[name] = min(cpu.get(name, cpu_step), cpu_step)
        for name, (total, ttft, per_step, rows) in best.items():
            n = sum(len(r) for r in rows)
            point[name] = {"tok_s": n / total, "ttft_ms": 1e3 * ttft, "step_ms": 1e3 * per_step,
                           "cpu_step_ms": 1e3 * cpu[name],
                           "steps": len(rows[0]), "memory_mb": memory_now(device) / 2**20,
                           "of_bound": (n / total) / point["bound_tok_s"]}
            point[name + "_tokens"] = rows
        ours = point.pop("engine_tokens")
        if "peer" in point:
            peer = point.pop("peer_tokens")
            point["ratio"] = point["engine"]["tok_s"] / point["peer"]["tok_s"]
            if args.temperature == 0:  # greedy: the same tokens (the engine stops a row at its terminal token)
                point["same_tokens"] = all(a == b[:len(a)] for a, b in zip(ours, peer))
        results.append(point)

    print(f"{'batch':>5} {'engine':>7} {'tok/s':>9} {'ms/step':>8} {'cpu ms':>7} {'ttft ms':>8} {'mem MB':>7} "
          f"{'bound tok/s':>11} {'of bound':>8}")
    for point in results:
        for name in ("peer", "engine"):
            if name in point:
                s = point[name]
                print(f"{point['batch']:>5} {name:>7} {s['tok_s']:>9.1f} {s['step_ms']:>8.3f} {s['cpu_step_ms']:>7.3f} {s['ttft_ms']:>8.2f} "
                      f"{s['memory_mb']:>7.0f} {point['bound_tok_s']:>11.0f} {100 * s['of_bound']:>7.1f}%")
        if "ratio" in point:
            same = f", same tokens: {point['same_tokens']}" if "same_tokens" in point else ""
            print(f"{'':>5} engine/peer {point['ratio']:.2f}x ({point['bound_by']}-bound){same}")
    print(json.dumps({"bench": "infer", "device": str(device), "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
                      "threads": torch.get_num_threads(), "decode_step": decode_mode(engine), "warmup_s": warmup_s, "load": load,
                      "depth": cfg.n_layer, "width": cfg.n_embd, "vocab": cfg.vocab_size,
                      "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "temperature": args.temperature,
                      "bandwidth": bandwidth, "matmul_flops": matmul_rate, "weight_bytes": weight_bytes,
                      "results": results}))


if __name__ == "__main__":
    run_main(main)
