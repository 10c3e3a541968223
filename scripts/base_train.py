"""Pretrain the base model. One dial, --depth, sizes the model; the horizon, batch size,
learning rates and weight decay follow from it (docs/training.md, "Scaling rules").

    python -m scripts.base_train --depth=4 --max-seq-len=256 --device-batch-size=8 --total-batch-size=4096
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=24
    # several nodes: torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m scripts.base_train -- ...

Interrupt it (Ctrl-C, or SIGTERM from a scheduler) and it saves a checkpoint at the end of the
current step; --resume-from-step=-1 continues from the latest one, exactly.
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402

from nanochat.checkpoint import append_log, get_checkpoints_root  # noqa: E402
from nanochat.common import (  # noqa: E402
    COMPUTE_DTYPE,
    NanochatError,
    compute_cleanup,
    compute_init,
    fit_horizon,
    init_wandb,
    print0,
    run_main,
)
from nanochat.dataloader import estimate_split_tokens, split_batches  # noqa: E402
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as make_loader  # noqa: E402
from nanochat.dataset import open_parquet, split_parquet_files  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.loss_eval import evaluate_bpb  # noqa: E402
from nanochat.optim import (  # noqa: E402
    grad_scaler,
    lr_multiplier,
    muon_momentum,
    muon_weight_decay,
    optimizer_step,
    scale_loss,
)
from nanochat.report import get_report  # noqa: E402
from nanochat.tokenizer import get_token_bytes, get_tokenizer  # noqa: E402
from nanochat.training import Checkpointer, StepMeter, StopRequest, accumulation_steps, interpreter_restored  # noqa: E402

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

B_REF = 2**19  # tokens per step of the d12 run the other hyperparameters were tuned at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    p.add_argument("--force-dtype", action="store_true",
                   help="keep NANOCHAT_DTYPE even on a CPU that runs it far slower than float32")
    p.add_argument("--fp8", action="store_true", help="FP8 training (CUDA only)")
    p.add_argument("--fp8-recipe", default="tensorwise", choices=["rowwise", "tensorwise"])
    # model
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio, rounded up to head_dim")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="SSSL", help="S = quarter-context window, L = full; last layer is always L")
    # horizon (first one set wins)
    p.add_argument("--num-iterations", type=int, default=-1)
    p.add_argument("--target-flops", type=float, default=-1.0)
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens per scaling parameter")
    p.add_argument("--max-data-passes", type=float, default=0,
                   help="shorten the horizon to at most this many passes over the training data (0: never shorten)")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per rank per micro-batch")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: from the depth)")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon cautious weight decay at the d12 reference")
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # resume and checkpoints
    p.add_argument("--resume-from-step", type=int, default=None, help="step to resume from; -1 = the latest checkpoint")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint cadence in steps (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the last K checkpoints (-1: all)")
    p.add_argument("--model-tag", default=None, help="checkpoint directory name (default d<depth>)")
    # evaluation
    p.add_argument("--eval-every", type=int, default=250, help="val bpb cadence (-1: off)")
    p.add_argument("--eval-tokens", type=int, default=80 * 524288)
    p.add_argument("--core-metric-every", type=int, default=2000, help="-1: off")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="-1: off")
    p.add_argument("--bundle-dir", default=None, help="CORE eval bundle: unzipped folder, .zip or URL (default: download once)")
    # data, compute and measurement
    p.add_argument("--data-dir", default=None, help="folder of parquet shards (default: NANOCHAT_DATA_DIR or the downloaded ones)")
    p.add_argument("--compile", type=int, default=1, help="torch.compile the model (1) or not (0)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward: less memory, ~30%% more compute")
    p.add_argument("--peak-flops", type=float, default=-1.0, help="device peak FLOP/s for MFU (default: GPU table, measured on CPU)")
    return p.parse_args(argv)


def config_for(args, depth, vocab_size):
    """The GPTConfig --depth stands for: width depth * aspect_ratio, rounded up to whole heads."""
    return GPTConfig.from_depth(depth, args.aspect_ratio, args.head_dim, sequence_len=args.max_seq_len,
                                vocab_size=vocab_size, window_pattern=args.window_pattern)


def scaling_params(config):
    with torch.device("meta"):
        counts = GPT(config).num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


def batch_and_weight_decay(ratio, n_scaling, n_scaling_d12, total_batch_size, weight_decay):
    """(total batch size, Muon weight decay) for a model of n_scaling parameters, scaled from
    the d12 reference (batch B_REF, the given weight_decay). With D = ratio * params tokens of
    training: the batch grows as D^0.383 (Power Lines: B ~ D^0.383), rounded to a power of 2,
    unless total_batch_size > 0 fixes it; the weight decay goes as sqrt(B/B_REF) * D_d12/D, which
    keeps the decay's timescale 1/(lr*wd) the same fraction of the run's D/B steps as at d12 (the
    LR grows as sqrt(B/B_REF)). The ratio cancels in D/D_d12, so a ratio <= 0 (the horizon set by
    --target-flops, as scaling-law sweeps do) scales by the model sizes alone."""
    if ratio > 0:
        tokens, tokens_d12 = int(ratio * n_scaling), ratio * n_scaling_d12
    else:
        tokens, tokens_d12 = n_scaling, n_scaling_d12
    if total_batch_size <= 0:
        total_batch_size = 2 ** round(math.log2(B_REF * (tokens / tokens_d12) ** 0.383))
    return total_batch_size, weight_decay * math.sqrt(total_batch_size / B_REF) * (tokens_d12 / tokens)


def finite_or_none(x):
    """A number for the summary JSON: inf/nan (no evaluation ran, nothing counted) become null."""
    return x if x is not None and math.isfinite(x) else None


@torch.no_grad()
def sample(model, tokenizer, device, max_tokens=16):
    """Greedy continuations of the fixed prompts: a cheap look at what the model knows."""
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        out = list(model.generate(ids, max_tokens=max_tokens, temperature=0))
        print0(f"  {tokenizer.decode(ids[1:] + out)!r}")


def main(argv=None):
    args = parse_args(argv)
    with interpreter_restored():
        return train(args)


def train(args):
    user_config = dict(vars(args))
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0

    # precision / kernels notes
    from nanochat import attention
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE}; attention backend: {attention.BACKEND}: {attention.describe(args.head_dim)}")
    if "S" in args.window_pattern.upper() and attention.BACKEND == "sdpa":
        print0("warning: sliding windows run as a dense masked SDPA here, which is slow; "
               "consider --window-pattern=L on this device")
    if args.fp8:
        if device.type != "cuda":
            print0("warning: --fp8 needs CUDA; training in the compute dtype instead")
            args.fp8 = False
        else:
            raise NanochatError("--fp8 is not implemented in this version; train without it.")
    wandb_run = init_wandb(args.run, master, "nanochat", user_config)

    # tokenizer
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"Vocab size: {vocab_size:,}")

    # model
    config = config_for(args, args.depth, vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.activation_checkpointing = args.activation_checkpointing
    counts = model.num_scaling_params()
    print0(f"Model config: {json.dumps(config.__dict__)}")
    print0("Parameter counts: " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()))
    flops_per_token = model.estimate_flops()
    print0(f"Estimated FLOPs per token: {flops_per_token:e}")

    # Horizon, batch size, LR and weight decay from the one dial. The hyperparameters were tuned
    # for a d12 model at 2^19 tokens per step; a bigger model trains on more data D, and the
    # batch that trains best grows as D^0.383 (Bergsma et al. 2025, "Power Lines"). A larger
    # batch averages away gradient noise, so the LRs grow as sqrt(B / B_REF), the square-root
    # rule of Adam-like optimizers (Malladi et al. 2022); batch_and_weight_decay explains the
    # weight decay. Sources and the derivation: docs/training.md, "Scaling rules".
    n_scaling = counts["transformer_matrices"] + counts["lm_head"]  # embedding lookups cost no matmul
    target_tokens = int(args.target_param_data_ratio * n_scaling)
    total_batch_size, wd_scaled = batch_and_weight_decay(
        args.target_param_data_ratio, n_scaling, scaling_params(config_for(args, 12, vocab_size)),
        args.total_batch_size, args.weight_decay)
    if args.total_batch_size <= 0:
        print0(f"Auto total batch size: {total_batch_size:,} tokens")
    batch_lr_scale = math.sqrt(total_batch_size / B_REF)
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
    elif args.target_param_data_ratio > 0:
        num_iterations = target_tokens // total_batch_size
    else:
        raise NanochatError("no horizon: set --num-iterations, --target-flops or --target-param-data-ratio.")
    if num_iterations <= 0:
        raise NanochatError(f"the horizon is {num_iterations} steps; raise --num-iterations or the data ratio.")
    num_iterations = fit_horizon(num_iterations, total_batch_size, estimate_split_tokens(tokenizer, "train", args.data_dir),
                                 args.max_data_passes)
    total_tokens = total_batch_size * num_iterations
    print0(f"Iterations: {num_iterations:,}; total tokens: {total_tokens:,}; tokens per scaling param: "
           f"{total_tokens / n_scaling:.2f}; total FLOPs: {flops_per_token * total_tokens:e}")
    print0(f"LR scale (batch): {batch_lr_scale:.4f}; Muon weight decay: {wd_scaled:.6f}")

    tokens_per_micro = args.device_batch_size * args.max_seq_len
    grad_accum_steps = accumulation_steps(total_batch_size, args.device_batch_size, args.max_seq_len, world_size,
                                          "change --total-batch-size, --device-batch-size or --max-seq-len")

    optimizer = model.setup_optimizer(
        unembedding_lr=args.unembedding_lr * batch_lr_scale, embedding_lr=args.embedding_lr * batch_lr_scale,
        matrix_lr=args.matrix_lr * batch_lr_scale, weight_decay=wd_scaled, scalar_lr=args.scalar_lr * batch_lr_scale)

    # resume
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_checkpoints_root("base"), model_tag)
    ckpt = Checkpointer(checkpoint_dir, StopRequest(), rank=rank, world_size=world_size, device=device, ddp=ddp,
                        save_every=args.save_every, keep_last=args.keep_last)
    ckpt.check_space(model)
    step, meta, extra = 0, {}, {}
    if args.resume_from_step is not None:
        step, meta, extra = ckpt.resume(args.resume_from_step, model, optimizer, config,
                                        "pass the same --depth/--aspect-ratio/--head-dim/--max-seq-len/--window-pattern")
    loader_state = extra.get("loader", meta.get("dataloader_state_dict"))
    loop_state = meta.get("loop_state", {})

    orig_model = model
    if args.compile:
        model = torch.compile(model, dynamic=False)

    # data: read every shard's footer now, so a truncated file fails here and not hours in
    for split in ("train", "val"):
        for path in split_parquet_files(split, args.data_dir):
            open_parquet(path)
    train_loader = make_loader(tokenizer, args.device_batch_size, args.max_seq_len, split="train", device=device,
                               resume_state_dict=loader_state, data_dir=args.data_dir)

    def build_val_loader():
        return make_loader(tokenizer, args.device_batch_size, args.max_seq_len, split="val", device=device,
                           data_dir=args.data_dir)

    # evaluation budget: --eval-tokens, but never more than one pass over the validation split
    eval_steps = max(1, args.eval_tokens // (tokens_per_micro * world_size))
    if args.eval_every > 0:
        one_pass = split_batches(tokenizer, args.device_batch_size, args.max_seq_len, "val", eval_steps, args.data_dir)
        if one_pass < eval_steps:
            print0(f"Validation: {one_pass} batches per evaluation, one pass over the val split (--eval-tokens "
                   f"asks for {eval_steps}, which would cycle it)")
            eval_steps = one_pass

    x, y, next_loader_state = next(train_loader)
    # the position after the last batch trained on: resuming from it yields the current batch again
    trained_loader_state = loader_state

    meter = StepMeter(ckpt.log_path, device=device, ddp=ddp, world_size=world_size, master=master, wandb_run=wandb_run,
                      peak_flops=args.peak_flops, wandb_every=100, start_step=step, loop_state=loop_state)
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    val_bpb = None
    scaler = grad_scaler(device)  # loss scaling under fp16

    while True:
        last_step = step == num_iterations
        flops_so_far = flops_per_token * total_batch_size * step

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            wandb_run.log({"step": step, "total_training_flops": flops_so_far, "val/bpb": val_bpb})
            if master:
                append_log(ckpt.log_path, {"step": step, "val_bpb": val_bpb})
            model.train()

        if args.core_metric_every > 0 and (last_step or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import core_label, evaluate_model

            orig_model.eval()
            core = evaluate_model(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task,
                                  bundle_dir=args.bundle_dir, progress=master)
            print0(f"Step {step:05d} | {core_label(core)} metric: {core['core_metric']:.4f}")
            wandb_run.log({"step": step, "core_metric": core["core_metric"],
                           "centered_results": core["centered_results"]})
            if master:
                append_log(ckpt.log_path, {"step": step, "core_metric": core["core_metric"], "core_partial": core["partial"]})
            orig_model.train()

        if master and args.sample_every > 0 and (last_step or (step > 0 and step % args.sample_every == 0)):
            orig_model.eval()
            sample(orig_model, tokenizer, device)
            orig_model.train()

        if ckpt.due(step, last_step):
            ckpt.save(step, orig_model, optimizer, {
                "val_bpb": val_bpb,
                "model_config": config.__dict__,
                "user_config": user_config,
                "device_batch_size": args.device_batch_size,
                "max_seq_len": args.max_seq_len,
                "total_batch_size": total_batch_size,
                "dataloader_state_dict": trained_loader_state,
                "loop_state": {"min_val_bpb": min_val_bpb, **meter.loop_state()},
            }, extra_state={"loader": trained_loader_state})
        if last_step:
            break
        ckpt.exit_if_stopping(step, wandb_run)

        # ---- one optimizer step ----
        meter.start()
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        for _ in range(grad_accum_steps):
            loss = model(x, y)
            loss_sum += loss.detach().float()
            loss = loss / grad_accum_steps
            scale_loss(loss, scaler).backward()
            trained_loader_state = next_loader_state
            x, y, next_loader_state = next(train_loader)  # prefetch while the device works
        lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step, num_iterations, args.warmdown_ratio)
        muon_wd = muon_weight_decay(step, num_iterations, wd_scaled)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = muon_wd
        optimizer_step(optimizer, scaler, step)  # under fp16 an inf/NaN step is skipped, and said
        model.zero_grad(set_to_none=True)
        train_loss = meter.mean_over_ranks(loss_sum / grad_accum_steps)

        # ---- logging ----
        debiased = meter.smoothed(train_loss, step)
        epoch = next_loader_state.get("epoch", "?") if isinstance(next_loader_state, dict) else "?"
        meter.log(step, (step + 1) / num_iterations, {"loss": f"{debiased:.6f}", "lrm": f"{lrm:.2f}", "epoch": epoch},
                  {"loss": train_loss, "smooth_loss": debiased, "lrm": lrm}, total_batch_size,
                  flops_per_token * total_batch_size, horizon=num_iterations)
        step += 1

    peak_mem = torch.cuda.max_memory_allocated() / 1024**2 if device.type == "cuda" else float("nan")
    print0(f"Peak memory usage: {peak_mem:.2f}MiB")
    total_training_time = meter.training_time
    print0(f"Total training time: {total_training_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.6f}" if math.isfinite(min_val_bpb) else "No validation ran")
    summary = {
        "depth": args.depth, "model_tag": model_tag, "steps": num_iterations, "total_batch_size": total_batch_size,
        "total_tokens": total_tokens, "scaling_params": n_scaling, "total_params": counts["total"],
        "param_counts": counts, "flops_per_token": flops_per_token, "total_flops": flops_per_token * total_tokens,
        "min_val_bpb": finite_or_none(min_val_bpb), "final_val_bpb": finite_or_none(val_bpb), "training_time_s": total_training_time,
        "peak_memory_mib": peak_mem if device.type == "cuda" else None, "checkpoint_dir": checkpoint_dir}
    get_report().log(section="Base model training", data=[vars(args), {k: v for k, v in summary.items() if k != "param_counts"}])
    print0(json.dumps({"base_train": summary}, allow_nan=False))  # strict JSON: null, never Infinity/NaN
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
