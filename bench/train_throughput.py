"""Pretraining throughput: tokens/s and MFU of full optimizer steps (forward, backward,
MuonAdamW) for a fixed small config, in fp32 and bf16, each in a fresh process (the compute
dtype is fixed at import).

    python -m bench.train_throughput                    # CPU: depth 4, hd 64, L, seq 256, 4096 tok/step, vocab 8192
    python -m bench.train_throughput --depth 12 --seq-len 2048 --batch 16 --vocab 32768 --window SSSL   # a GPU

MFU is against the device's datasheet bf16 peak on known GPUs, else against the matmul rate
measured here in the same dtype. The original nanochat was measured on a 2-core machine of this
kind at the default config (2,700 tok/s fp32, 4,400 tok/s bf16); those recorded figures are
the peer column, since its code cannot be fetched here. Prints a table and a final JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ORIGINAL_TOK_S = {"float32": 2700.0, "bfloat16": 4400.0}  # recorded on this machine kind (issue 3)


def worker(args):
    import torch

    from nanochat.common import COMPUTE_DTYPE, autodetect_device_type, get_peak_flops, measure_matmul_flops
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    device = torch.device(args.device or autodetect_device_type())
    config = GPTConfig.from_depth(args.depth, 64, args.head_dim, sequence_len=args.seq_len, vocab_size=args.vocab,
                                  window_pattern=args.window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step().item()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    dt = times[len(times) // 2]  # median step
    tokens = args.batch * args.seq_len
    flops_per_token = model.estimate_flops()
    if device.type == "cuda" and get_peak_flops(torch.cuda.get_device_name(device)) != float("inf"):
        peak, peak_kind = get_peak_flops(torch.cuda.get_device_name(device)), "datasheet bf16 peak"
    else:
        peak, peak_kind = measure_matmul_flops(device, COMPUTE_DTYPE), "measured matmul rate"
    result = {
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "device": str(device), "tok_per_s": tokens / dt,
        "step_ms": dt * 1000, "mfu": flops_per_token * tokens / dt / peak, "peak_flops": peak, "peak_kind": peak_kind,
        "flops_per_token": flops_per_token, "warmup_s": warmup_s,
        "threads": torch.get_num_threads(),
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print("RESULT " + json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="rows per step (16 x 256 = 4096 tokens)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--window", default="L")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", type=int, default=1)
    p.add_argument("--device", default="")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    results = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, "-m", "bench.train_throughput", "--worker"] + [a for a in sys.argv[1:] if a != "--worker"]
        out = subprocess.run(cmd, env={**os.environ, "NANOCHAT_DTYPE": dtype}, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {dtype} run failed")
        results.append(json.loads(line[0][len("RESULT "):]))

    default_config = (args.depth, args.head_dim, args.seq_len, args.batch, args.vocab, args.window) == (4, 64, 256, 16, 8192, "L")
    print(f"\nconfig: depth {args.depth}, head dim {args.head_dim}, window {args.window}, seq {args.seq_len}, "
          f"{args.batch * args.seq_len} tokens/step, vocab {args.vocab}, compile {bool(args.compile)}")
    print(f"{'dtype':10s} {'device':8s} {'tok/s':>10s} {'step ms':>9s} {'MFU':>7s} {'vs original':>12s}  MFU denominator")
    for r in results:
        ref = ORIGINAL_TOK_S.get(r["dtype"]) if default_config and r["device"] == "cpu" else None
        r["vs_original"] = r["tok_per_s"] / ref if ref else None
        vs = f"{r['vs_original']:.2f}x" if ref else "n/a"
        print(f"{r['dtype']:10s} {r['device']:8s} {r['tok_per_s']:10,.0f} {r['step_ms']:9.1f} {100 * r['mfu']:6.1f}% {vs:>12s}  "
              f"{r['peak_kind']} {r['peak_flops'] / 1e9:,.0f} GFLOP/s")
    print(json.dumps({"bench": "train_throughput", "config": {k: getattr(args, k) for k in
                      ("depth", "head_dim", "seq_len", "batch", "vocab", "window", "compile")}, "results": results}))


if __name__ == "__main__":
    main()
