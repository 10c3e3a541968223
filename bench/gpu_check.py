"""GPU readiness check: one step per process, one JSON line per step on stdout (bench/gpu_check.sh
runs them all, each under its own timeout, and adds a summary line).

    bash bench/gpu_check.sh                      # on the GPU machine: at most 8 minutes (a time budget)
    bash bench/gpu_check.sh --dry-run            # every step at tiny size on CPU (the test suite runs this)
    python -m bench.gpu_check --step train       # one step

The steps, numbered as in the issue that asked for them:
  0 env              backend, FA3 present (or why not), compute dtype, shared memory, peak FLOPs/bandwidth
  1 tf32             TF32 set as compute_init sets it, then torch.compile in default and max-autotune modes
  2 train            d4 width 768 SSSL at T=2048: eager SDPA vs the compiled automatic backend (FA3 on
                     Hopper): loss and grad norm for 4 steps, step time, graphs, recompiles, peak memory
  2 train_flex       the same with FlexAttention where it is not the automatic backend, and as a
                     ~100 KB shared-memory card (RTX 3090/4090) runs it where this GPU's tiles differ:
                     smaller tiles, with activation checkpointing
  3 eval_lengths     the uncompiled model at lengths 528..688 (CORE's padded rows): no compiles; a mask
                     cached under inference_mode then used for training
  4 decode           eager vs compiled (CUDA-graph) Engine at batch 1/8/64: same tokens, tok/s, memory
                     bandwidth utilization, compiles in a first and a second Engine
  5 optimizer        MuonAdamW step compiled vs eager: same parameters, step time
  6 base_train       4 steps of scripts.base_train end to end (compile, bpb evals, sample, checkpoint)
  6 throughput_d12   train tok/s and MFU at d12
  6 throughput_d20   d20 with the 24 GB card flags (batch 8, activation checkpointing): tok/s, MFU, peak memory

Every line has "step", "name", "ok", "seconds" and "dry_run"; a step that fails has "error" and the
others still run. In --dry-run the model compiles use the "eager" dynamo backend and base_train and
the optimizer run uncompiled (inductor on a CPU takes minutes per graph; the dry run's tiny decode
step takes seconds, so the Engine does compile): the plumbing is checked, not the GPU.
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as base_train runs

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from nanochat import attention  # noqa: E402
from nanochat.common import (  # noqa: E402
    COMPUTE_DTYPE,
    enable_tf32,
    get_peak_bandwidth,
    get_peak_flops,
    synchronize,
)
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

CONSUMER_SHARED_MEMORY = 101376  # bytes per block on RTX 30xx/40xx/50xx, A10, L4, L40


class Check:
    """What every step needs: the device (the CPU in a dry run) with its name and memory, and
    sync, compile and peak memory as the run calls for them."""

    def __init__(self, dry_run):
        self.dry = dry_run
        if dry_run:
            torch.set_num_threads(1)  # tiny tensors: threads only contend (the test machine is shared)
            os.environ["NANOCHAT_COMPILE_OPTIM"] = "0"  # inductor compiles each optimizer shape for a minute
        else:
            enable_tf32()  # as compute_init does for every training script
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.name = "cpu" if dry_run else torch.cuda.get_device_name()
        self.memory_gib = 0 if dry_run else torch.cuda.get_device_properties(self.device).total_memory / 2**30

    def sync(self):
        synchronize(self.device)

    def compile(self, fn, **kwargs):
        """torch.compile as the training scripts use it; the "eager" dynamo backend in a dry run."""
        if self.dry:
            return torch.compile(fn, dynamic=False, backend="eager")
        return torch.compile(fn, dynamic=False, **kwargs)

    def reset_memory(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self):
        """(allocated, reserved) peak GiB since reset_memory (None on CPU)."""
        if self.device.type != "cuda":
            return None, None
        return (torch.cuda.max_memory_allocated(self.device) / 2**30, torch.cuda.max_memory_reserved(self.device) / 2**30)


def finite(x):
    return x if x is not None and math.isfinite(x) else None


def compiles():
    """Frames dynamo has converted so far in this process: each compile and each recompile counts."""
    return counters["frames"]["total"]


def rel_diff(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def model_for(check, depth, width, seq_len, vocab, head_dim=128, window="SSSL"):
    """A freshly initialized GPT on the check's device (seed 0: every call gives the same weights)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=width // head_dim,
                       n_kv_head=width // head_dim, n_embd=width, window_pattern=window)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=check.device)
    model.init_weights()
    return model


def batches_for(check, n, batch, seq_len, vocab):
    g = torch.Generator().manual_seed(1)
    return [tuple(torch.randint(0, vocab, (batch, seq_len), generator=g).to(check.device) for _ in range(2))
            for _ in range(n)]


def train_run(check, model, batches, backend, compiled, train=True):
    """Optimizer steps of `model` on `batches` with attention `backend`: per-step loss and gradient
    norm, the median step time after the first, compiles after the first step, peak memory.
    train=False runs forward passes only (flex has no CPU backward: dry runs)."""
    attention.set_backend(backend)
    try:
        optimizer = model.setup_optimizer()
        step_model = check.compile(model) if compiled else model
        check.reset_memory()
        losses, norms, times, after_first = [], [], [], None
        for x, y in batches:
            check.sync()
            t0 = time.perf_counter()
            if train:
                loss = step_model(x, y)
                loss.backward()
                norms.append(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                                   if p.grad is not None])).item())
                optimizer.step()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    loss = step_model(x, y)
            losses.append(loss.item())
            check.sync()
            times.append(time.perf_counter() - t0)
            if after_first is None:
                after_first = compiles()
        allocated, reserved = check.peak_memory()
        later = sorted(times[1:]) or times
        return {"loss": losses, "grad_norm": norms or None, "first_step_s": times[0], "step_s": later[len(later) // 2],
                "recompiles_after_step_1": compiles() - after_first, "peak_allocated_gib": allocated,
                "peak_reserved_gib": reserved}
    finally:
        attention.set_backend(None)


def compare(result, reference, loss_tol=0.01, norm_tol=0.05):
    """Add the largest relative loss / grad-norm differences to `result`; True when within tolerance."""
    result["max_rel_loss_diff"] = rel_diff(result["loss"], reference["loss"])
    ok = result["max_rel_loss_diff"] <= loss_tol
    if result["grad_norm"] and reference["grad_norm"]:
        result["max_rel_grad_norm_diff"] = rel_diff(result["grad_norm"], reference["grad_norm"])
        ok = ok and result["max_rel_grad_norm_diff"] <= norm_tol
    return ok and result["recompiles_after_step_1"] == 0


# -----------------------------------------------------------------------------
# Steps


def step_env(check):
    import importlib.metadata as metadata

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    out = {
        "device": check.name, "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "memory_gib": round(check.memory_gib, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": version("triton"), "kernels": version("kernels"),
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."), "backend": attention.BACKEND, "fa3": attention.HAS_FA3,
        "fa3_error": attention.FA3_ERROR, "attention": attention.describe(128),
        "shared_memory_per_block": attention.SHARED_MEMORY,
        "flex_options_hd128": attention.flex_kernel_options(128, 2) if cuda else None,
        "peak_flops": finite(get_peak_flops(check.name)), "peak_bandwidth": finite(get_peak_bandwidth(check.name)),
    }
    warnings = []
    if cuda and torch.cuda.get_device_capability()[0] == 9 and not attention.HAS_FA3:
        warnings.append(f"Hopper without FA3: {attention.FA3_ERROR}")
    if cuda and out["peak_flops"] is None:
        warnings.append(f"no datasheet peak for {check.name!r}: MFU shows n/a (pass --peak-flops)")
    out["warnings"] = warnings
    return out


def step_tf32(check):
    enable_tf32()  # what compute_init does on CUDA
    n = 64 if check.dry else 2048
    a, b = torch.randn(n, n, device=check.device), torch.randn(n, n, device=check.device)

    def fn(a, b):
        return torch.relu(a @ b) + 1.0

    ref = (torch.relu(a.double() @ b.double()) + 1.0).float()
    out = {"size": n}
    ok = True
    for mode in ("default", "max-autotune"):
        torch._dynamo.reset()
        f = torch.compile(fn, mode=mode, dynamic=False)
        t0 = time.perf_counter()
        y = f(a, b)
        check.sync()
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        out[mode] = {"compile_s": time.perf_counter() - t0, "max_rel_err": err}
        ok = ok and err < 1e-2  # TF32 keeps ~1e-3; a wrong result would be far off
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # raises on a mixed-API setting
    out["cuda_matmul_fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    out["ok"] = ok and out["float32_matmul_precision"] == "high"
    return out


def train_sizes(check):
    if check.dry:  # S window 128 < T: the windowed path runs
        return dict(depth=2, width=64, seq_len=256, vocab=256, head_dim=32, batch=1)
    return dict(depth=4, width=768, seq_len=2048, vocab=32768, head_dim=128, batch=8)


def step_train(check):
    s = train_sizes(check)
    batches = batches_for(check, 4, s["batch"], s["seq_len"], s["vocab"])
    build = lambda: model_for(check, s["depth"], s["width"], s["seq_len"], s["vocab"], s["head_dim"])  # noqa: E731
    reference = train_run(check, build(), batches, "sdpa", compiled=False)
    backend = attention.BACKEND
    compiled = train_run(check, build(), batches, backend, compiled=True)
    ok = compare(compiled, reference)
    return {"ok": ok, "backend": backend, "tokens_per_step": s["batch"] * s["seq_len"], "eager_sdpa": reference,
            "compiled": compiled, "graphs": counters["stats"]["unique_graphs"]}


def step_train_flex(check):
    s = train_sizes(check)
    batches = batches_for(check, 4, s["batch"], s["seq_len"], s["vocab"])
    build = lambda: model_for(check, s["depth"], s["width"], s["seq_len"], s["vocab"], s["head_dim"])  # noqa: E731
    train = not check.dry  # flex has no CPU backward
    reference = train_run(check, build(), batches, "sdpa", compiled=False, train=train)
    out = {"eager_sdpa": reference}
    ok = True
    variants = {}  # flex at this GPU's tiles is step "train" already where flex is the automatic backend
    if attention.BACKEND != "flex":
        variants["this_gpu"] = attention.SHARED_MEMORY
    if not check.dry and attention.flex_kernel_options(s["head_dim"], 2, CONSUMER_SHARED_MEMORY) != \
            attention.flex_kernel_options(s["head_dim"], 2):
        variants["consumer_99kb"] = CONSUMER_SHARED_MEMORY
    for name, smem in variants.items():
        model = build()
        # a 24 GB card trains with activation checkpointing (README), so its variant does too
        model.activation_checkpointing = name == "consumer_99kb"
        saved = attention.SHARED_MEMORY
        attention.SHARED_MEMORY = smem  # the tiles a card with this much shared memory gets
        try:
            run = train_run(check, model, batches, "flex", compiled=True, train=train)
        finally:
            attention.SHARED_MEMORY = saved
        run["activation_checkpointing"] = model.activation_checkpointing
        run["kernel_options"] = None if check.dry else attention.flex_kernel_options(s["head_dim"], 2, smem)
        ok = compare(run, reference) and ok
        out[name] = run
    if not variants:
        out["note"] = "flex at this GPU's tiles is the automatic backend: step train ran it"
    out["ok"] = ok
    return out


def step_eval_lengths(check):
    s = train_sizes(check)
    model = model_for(check, s["depth"], s["width"], s["seq_len"], s["vocab"], s["head_dim"])
    model.eval()
    before = compiles()
    g = torch.Generator().manual_seed(2)
    times = {}
    x = torch.randint(0, s["vocab"], (2, 528), generator=g).to(check.device)
    with torch.inference_mode():
        for T in range(528, 689, 16):  # CORE pads its rows to multiples of 16
            rows = torch.randint(0, s["vocab"], (4, T), generator=g).to(check.device)
            check.sync()
            t0 = time.perf_counter()
            model(rows)
            check.sync()
            times[T] = time.perf_counter() - t0
        auto = model(x)
        attention.set_backend("sdpa")
        try:
            sdpa = model(x)
        finally:
            attention.set_backend(None)
    new_compiles = compiles() - before
    # a sliding-window mask first built under inference_mode, then used by a training step (CUDA's
    # SDPA saves the mask for backward; an inference tensor cannot be saved)
    model.train()
    attention.set_backend("sdpa")
    try:
        with torch.inference_mode():
            model(x)
        model(x, x).backward()
        mask_then_train = "ok"
    except Exception as e:
        mask_then_train = f"{type(e).__name__}: {e}"
    finally:
        attention.set_backend(None)
    diff = (auto - sdpa).abs().max().item()
    return {"ok": new_compiles == 0 and mask_then_train == "ok" and diff < 0.25, "backend": attention.BACKEND,
            "compiles": new_compiles, "seconds_per_length": times, "max_abs_logit_diff_vs_sdpa": diff,
            "inference_mask_then_train": mask_then_train}


def step_decode(check):
    from nanochat.engine import Engine
    from scripts.infer_bench import _NoSpecialsTokenizer, build_random_model, time_run

    sizes = types.SimpleNamespace(depth=2 if check.dry else 4, aspect_ratio=32 if check.dry else 192,
                                  head_dim=64 if check.dry else 128, seq_len=256 if check.dry else 2048,
                                  vocab=512 if check.dry else 32768, window="SSSL")
    model = build_random_model(sizes, check.device)
    prompt = torch.randint(0, sizes.vocab, (32,), generator=torch.Generator().manual_seed(3)).tolist()
    max_tokens = 8 if check.dry else 32  # contexts 32..63: one attention span, one graph per row bucket
    batch_sizes = (1, 2) if check.dry else (1, 8, 64)
    tokenizer = _NoSpecialsTokenizer()
    itemsize = torch.empty((), dtype=COMPUTE_DTYPE).element_size()
    weight_bytes = sum(m.weight.numel() * itemsize for m in model.modules() if isinstance(m, torch.nn.Linear))
    peak_bw = finite(get_peak_bandwidth(check.name))

    def run(engine, B):
        kw = dict(num_samples=B, max_tokens=max_tokens, temperature=0.0)
        time_run(lambda: engine.generate(prompt, **kw), check.device)  # warm-up (compiles)
        rows, ttft, per_step, _ = time_run(lambda: engine.generate(prompt, **kw), check.device)
        stats = {"tok_s": B / per_step, "step_ms": 1e3 * per_step, "ttft_ms": 1e3 * ttft}
        if peak_bw:
            bytes_step = weight_bytes + B * model.kv_bytes_read(len(prompt) + len(rows[0]) // 2)
            stats["mbu"] = bytes_step / per_step / peak_bw
        return rows, stats

    eager = Engine(model, tokenizer, compile=False)
    first = Engine(model, tokenizer, compile=True)  # at the dry run's size inductor takes seconds
    points, same = [], True
    before = compiles()
    for B in batch_sizes:
        eager_rows, eager_stats = run(eager, B)
        rows, stats = run(first, B)
        agree = sum(a == b for r, e in zip(rows, eager_rows) for a, b in zip(r, e)) / sum(len(r) for r in rows)
        same = same and rows == eager_rows
        points.append({"batch": B, "eager": eager_stats, "compiled": stats, "token_agreement": agree})
    first_compiles = compiles() - before
    before = compiles()
    second = Engine(model, tokenizer, compile=True)  # e.g. chat_sft builds one per ChatCORE run
    for B in batch_sizes:
        run(second, B)
    second_compiles = compiles() - before
    # a second Engine on the same model must reuse every graph the first one compiled
    return {"ok": all(p["token_agreement"] >= 0.9 for p in points) and second_compiles == 0,
            "compiled": first.compile and second.compile,
            "same_tokens": same, "points": points, "compiles_first_engine": first_compiles,
            "compiles_second_engine": second_compiles, "peak_bandwidth": peak_bw}


def step_optimizer(check):
    s = train_sizes(check)
    model = model_for(check, s["depth"], s["width"], s["seq_len"], s["vocab"], s["head_dim"])
    models = {"eager": model, "compiled": copy.deepcopy(model)}
    g = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=g).to(check.device, p.dtype) * 1e-2 for p in model.parameters()]
             for _ in range(3)]
    out = {}
    old = os.environ.get("NANOCHAT_COMPILE_OPTIM")
    try:
        for name, m in models.items():
            os.environ["NANOCHAT_COMPILE_OPTIM"] = "1" if name == "compiled" and not check.dry else "0"
            optimizer = m.setup_optimizer()
            times = []
            for step_grads in grads:
                for p, grad in zip(m.parameters(), step_grads):
                    p.grad = grad.clone()
                check.sync()
                t0 = time.perf_counter()
                optimizer.step()
                check.sync()
                times.append(time.perf_counter() - t0)
            out[name] = {"first_step_s": times[0], "step_s": min(times[1:])}
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_COMPILE_OPTIM", None)
        else:
            os.environ["NANOCHAT_COMPILE_OPTIM"] = old
    # relative to each parameter's largest entry: bf16 embeddings may differ by an ulp (2^-8 relative)
    diff = max(((a.float() - b.float()).abs().max() / a.float().abs().max().clamp(min=1e-12)).item()
               for a, b in zip(models["eager"].parameters(), models["compiled"].parameters()))
    out["max_rel_param_diff"] = diff
    out["speedup"] = out["eager"]["step_s"] / out["compiled"]["step_s"]
    out["ok"] = diff < 1e-2
    return out


WORDS = ("the cat dog king river bird ship teacher sees likes follows paints remembers carries finds answers "
         "moon apple hill door town letter sea star red green quiet long cold bright old small today again").split()


def synthetic_docs(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 400))) + "." for _ in range(n)]


def step_base_train(check):
    from nanochat.dataset import write_shard
    from nanochat.tokenizer import Tokenizer
    from scripts import base_train

    seq = 64 if check.dry else 512
    batch = 2 if check.dry else 8
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as base:
        docs = synthetic_docs(400 if check.dry else 2000)
        Tokenizer.train_from_iterator(iter(docs), vocab_size=384).save(os.path.join(base, "tokenizer"))
        data = os.path.join(base, "data")
        os.makedirs(data)
        write_shard(os.path.join(data, "shard_00000.parquet"), docs[:-100])
        write_shard(os.path.join(data, "shard_00001.parquet"), docs[-100:])  # the last file is val
        argv = [f"--depth={1 if check.dry else 4}", f"--head-dim={64 if check.dry else 128}", f"--max-seq-len={seq}",
                "--window-pattern=SSSL", f"--device-batch-size={batch}", f"--total-batch-size={batch * seq}",
                "--num-iterations=4", "--eval-every=2", f"--eval-tokens={2 * batch * seq}", "--core-metric-every=-1",
                "--sample-every=4", f"--data-dir={data}", f"--compile={0 if check.dry else 1}", "--model-tag=gpu_check",
                f"--device-type={check.device.type}"]
        if check.dry:
            argv.append("--peak-flops=1e12")  # skip measuring this CPU
        old = os.environ.get("NANOCHAT_BASE_DIR")
        os.environ["NANOCHAT_BASE_DIR"] = base
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                base_train.main(argv)
        finally:
            sys.stderr.write(printed.getvalue())
            if old is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old
        summary = next(json.loads(line)["base_train"] for line in printed.getvalue().splitlines()
                       if line.startswith('{"base_train"'))
        checkpoints = sorted(os.listdir(summary["checkpoint_dir"]))
    val_bpb = {int(step): float(bpb) for step, bpb in re.findall(r"Step (\d+) \| Validation bpb: ([\d.]+)", printed.getvalue())}
    ok = (summary["steps"] == 4 and sorted(val_bpb) == [0, 2, 4] and all(map(math.isfinite, val_bpb.values()))
          and "model_000004.pt" in checkpoints)
    tok_s = [int(t.replace(",", "")) for t in re.findall(r"tok/sec: ([\d,]+)", printed.getvalue())]
    return {"ok": ok, "compiled": not check.dry, "val_bpb": val_bpb, "tok_s_per_step": tok_s,
            "peak_memory_mib": summary["peak_memory_mib"], "checkpoint_files": checkpoints,
            "core": "skipped (no eval bundle offline)"}


def throughput(check, depth, batch, activation_checkpointing):
    seq, vocab, steps = (128, 512, 3) if check.dry else (2048, 32768, 6)
    depth = min(depth, 2) if check.dry else depth
    config = GPTConfig.from_depth(depth, 64, 64 if check.dry else 128, sequence_len=seq, vocab_size=vocab)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=check.device)
    model.init_weights()
    model.activation_checkpointing = activation_checkpointing
    run = train_run(check, model, batches_for(check, steps, batch, seq, vocab), attention.BACKEND, compiled=True)
    tokens = batch * seq
    peak = finite(get_peak_flops(check.name))
    run.update({"depth": depth, "batch": batch, "seq_len": seq, "activation_checkpointing": activation_checkpointing,
                "tok_s": tokens / run["step_s"], "backend": attention.BACKEND,
                "mfu": model.estimate_flops() * tokens / run["step_s"] / peak if peak else None})
    run["ok"] = all(math.isfinite(x) for x in run["loss"]) and run["recompiles_after_step_1"] == 0
    return run


def step_throughput_d12(check):
    return throughput(check, 12, 2 if check.dry else 16 if check.memory_gib >= 40 else 4, False)


def step_throughput_d20(check):
    """README: a 24 GB card trains d20 with --device-batch-size=8 --activation-checkpointing."""
    run = throughput(check, 20, 2 if check.dry else 8, True)
    if run["peak_reserved_gib"] is not None:
        run["fits_24gb_card"] = run["peak_reserved_gib"] < 22.5  # the card's 24 GB less the CUDA context
        run["ok"] = run["ok"] and run["fits_24gb_card"]
    return run


STEPS = {  # name -> (the step number, function)
    "env": (0, step_env), "tf32": (1, step_tf32), "train": (2, step_train), "train_flex": (2, step_train_flex),
    "eval_lengths": (3, step_eval_lengths), "decode": (4, step_decode), "optimizer": (5, step_optimizer),
    "base_train": (6, step_base_train), "throughput_d12": (6, step_throughput_d12),
    "throughput_d20": (6, step_throughput_d20),
}


def tidy(value):
    """Floats to 4 significant digits, all the way down: a readable line."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: tidy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v) for v in value]
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", required=True, choices=list(STEPS))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    args = p.parse_args(argv)
    number, fn = STEPS[args.step]
    result = {"step": number, "name": args.step, "dry_run": args.dry_run}
    t0 = time.perf_counter()
    try:
        if not args.dry_run and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; run with --dry-run on a CPU")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON line
            out = fn(Check(args.dry_run))
        result.update(out)
        result.setdefault("ok", True)
    except Exception as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4)[-2000:])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(tidy(result), default=str), flush=True)


if __name__ == "__main__":
    main()
