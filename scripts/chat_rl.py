"""Reinforcement learning on GSM8K (SPEC §9.3): on-policy REINFORCE with group-mean
advantages, a simplified GRPO with no KL term, no reference model and no ratio clipping.

    python -m scripts.chat_rl                                    # from the latest SFT model
    python -m scripts.chat_rl -i base --num-iterations=20 --device-type=cpu
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=rl

Each step, every rank takes its share of --examples-per-step problems, samples --num-samples
answers per problem with the Engine (calculator tool included), scores them with the task's
reward, and pushes up the log-probability of the tokens the model chose in proportion to
(reward - mean reward of the problem's group). Prompt tokens and the tool outputs the Engine
forced in are not trained, and the loss is normalised per valid token (DAPO style).
Interrupt it (SIGTERM/Ctrl-C) and it checkpoints at the end of the step; --resume-from-step=-1
continues exactly (weights, optimizer, step and RNG; the examples and sampling seeds of a step
depend only on the step).
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanochat.checkpoint import (  # noqa: E402
    append_log,
    build_model,
    find_last_step,
    get_checkpoints_root,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_log,
)
from nanochat.common import (  # noqa: E402
    NanochatError,
    StopRequest,
    compute_cleanup,
    compute_init,
    dist_rank_world,
    init_wandb,
    mfu_denominator,
    mfu_percent,
    print0,
    run_main,
    training_session,
)
from nanochat.engine import Engine  # noqa: E402
from nanochat.optim import grad_scaler, optimizer_step, scale_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    p.add_argument("--force-dtype", action="store_true",
                   help="keep NANOCHAT_DTYPE even on a CPU that runs it far slower than float32")
    p.add_argument("-i", "--source", default="sft", choices=["base", "sft", "rl"], help="which model to start from")
    p.add_argument("--model-tag", default=None, help="model tag to start from (default: the largest d<N>)")
    p.add_argument("--model-step", type=int, default=None, help="step to start from (default: the last)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the GSM8K train split")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the epochs)")
    p.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward pass and per sampling call")
    p.add_argument("--examples-per-step", type=int, default=16, help="problems per optimizer step, over all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="answers sampled per problem (the group)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="every LR is multiplied by this")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k cadence in steps (-1: off)")
    p.add_argument("--eval-examples", type=int, default=400, help="test problems for pass@k")
    p.add_argument("--save-every", type=int, default=60, help="checkpoint cadence in steps (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the last K checkpoints (-1: all)")
    p.add_argument("--output-tag", default=None, help="chatrl_checkpoints/<tag> (default: the source model's tag)")
    p.add_argument("--resume-from-step", type=int, default=None, help="resume this RL run from a step; -1 = the latest")
    p.add_argument("--data-dir", default=None, help="task data folder (sets NANOCHAT_TASK_DATA_DIR)")
    p.add_argument("--peak-flops", type=float, default=-1.0, help="device peak FLOP/s for MFU (default: GPU table, measured on CPU)")
    p.add_argument("--sandbox", choices=["auto", "strict"], default=None,
                   help="strict: refuse to run model code without full isolation (default: $NANOCHAT_SANDBOX, else auto)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The pieces of one step


def rl_loss(model, inputs, targets, advantages, normalizer=1.0):
    """The REINFORCE loss of a pass of sequences: -sum_t logp(target_t) * advantage_row, divided
    by the number of trained (target >= 0) tokens of the pass and by `normalizer` (passes x
    examples per rank, so accumulated gradients average over the step). Targets of -1 (prompt,
    forced tool output, padding) contribute nothing."""
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where the target is -1
    objective = (logp * advantages.unsqueeze(-1)).sum()
    num_valid = (targets >= 0).sum().clamp(min=1)
    return -objective / (num_valid * normalizer)


def sampling_seed(step, example_idx, sampling_step):
    """Seeds depend only on where we are (SPEC §9.3), so a resumed run samples the same answers.
    hash() of a tuple of ints does not depend on PYTHONHASHSEED."""
    return hash((step, example_idx, sampling_step)) & 0x7FFFFFFF


@torch.no_grad()
def rollout(engine, tokenizer, task, example_idx, step, num_samples, device_batch_size, max_new_tokens, temperature,
            top_k):
    """Sample num_samples answers to one problem and score them: (prompt_len, sequences, masks,
    rewards). Sequences are prompt + answer without the terminal token; masks are 0 on the
    prompt and on forced tool-output tokens."""
    conversation = task[example_idx]
    prompt = tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for sampling_step in range(num_samples // device_batch_size):
        seqs, ms = engine.generate_batch(prompt, num_samples=device_batch_size, max_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k,
                                         seed=sampling_seed(step, example_idx, sampling_step))
        sequences.extend(seqs)
        masks.extend(ms)
    rewards = [float(task.reward(conversation, tokenizer.decode(seq[len(prompt):]))) for seq in sequences]
    return len(prompt), sequences, masks, rewards


def rollout_tensors(sequences, masks, rewards, pad_id, device):
    """(inputs, targets, rewards, advantages): sequences padded to one length with pad_id
    (masked), targets -1 wherever the next token was not sampled by the model, and advantages
    = reward - group mean (no division by the std)."""
    length = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long)
    mask = torch.tensor([m + [0] * (length - len(m)) for m in masks], dtype=torch.long)
    inputs = ids[:, :-1]
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    advantages = rewards_t - rewards_t.mean()
    return inputs.to(device), targets.to(device), rewards_t.to(device), advantages.to(device)


def example_index(step, i, examples_per_rank, rank, world_size, num_examples):
    """The i-th problem of rank `rank` at `step`: ranks cycle through r, r+W, r+2W, ... of the
    train split, wrapping around for further epochs."""
    per_rank = len(range(rank, num_examples, world_size))
    if per_rank == 0:
        raise NanochatError(f"the train split has {num_examples} problems, fewer than the {world_size} ranks.")
    local = (step * examples_per_rank + i) % per_rank
    return rank + local * world_size


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, num_examples, k, max_new_tokens, temperature, top_k, device):
    """pass@1..k over the first num_examples problems of `task` (strided over ranks, summed
    across them): the fraction of problems where any of the first j samples is correct."""
    rank, world = dist_rank_world()
    counts = torch.zeros(k + 1, dtype=torch.int64, device=device)  # [problems, pass@1, ..., pass@k]
    for idx in tqdm(range(rank, min(num_examples, len(task)), world), desc="pass@k", leave=False, disable=rank != 0):
        conversation = task[idx]
        prompt = tokenizer.render_for_completion(conversation)
        seqs, _ = engine.generate_batch(prompt, num_samples=k, max_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k)
        outcomes = [bool(task.evaluate(conversation, tokenizer.decode(s[len(prompt):]))) for s in seqs]
        counts[0] += 1
        for j in range(1, k + 1):
            counts[j] += int(any(outcomes[:j]))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    total = max(counts[0].item(), 1)
    return {f"pass@{j}": counts[j].item() / total for j in range(1, k + 1)}


# -----------------------------------------------------------------------------


def main(argv=None, train_task=None, val_task=None):
    """train_task / val_task replace GSM8K train / test (anything with len(), [i], reward and
    evaluate): tests use a toy task."""
    args = parse_args(argv)
    with training_session():
        return train(args, train_task, val_task)


def train(args, train_task=None, val_task=None):
    user_config = dict(vars(args))
    if args.data_dir:
        os.environ["NANOCHAT_TASK_DATA_DIR"] = os.path.abspath(args.data_dir)
    if args.sandbox:
        os.environ["NANOCHAT_SANDBOX"] = args.sandbox
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wandb_run = init_wandb(args.run, master, "nanochat-rl", user_config)

    if args.examples_per_step % world_size != 0:
        raise NanochatError(f"--examples-per-step={args.examples_per_step} must be divisible by the "
                            f"{world_size} processes.")
    if args.num_samples % args.device_batch_size != 0:
        raise NanochatError(f"--num-samples={args.num_samples} must be a multiple of "
                            f"--device-batch-size={args.device_batch_size}.")
    examples_per_rank = args.examples_per_step // world_size
    num_passes = args.num_samples // args.device_batch_size

    # the model to start from (not compiled: rollouts and training alternate shapes every step)
    try:
        source_dir, source_step = resolve_checkpoint(args.source, args.model_tag, args.model_step)
    except NanochatError as e:
        raise NanochatError(f"no {args.source} model to start RL from: {e} (-i/--source picks another phase)") from None
    model, tokenizer, _ = build_model(source_dir, source_step, device, phase="train")
    model_tag = os.path.basename(source_dir)
    output_tag = args.output_tag or model_tag
    config = model.config
    print0(f"Starting from {args.source} model {model_tag} step {source_step}")

    # tasks
    if train_task is None:
        from nanochat.tasks.gsm8k import GSM8K
        train_task = GSM8K(subset="main", split="train")
    if val_task is None and args.eval_every > 0:
        from nanochat.tasks.gsm8k import GSM8K
        val_task = GSM8K(subset="main", split="test")
    if any(getattr(task, "executes_code", False) for task in (train_task, val_task)):
        from nanochat.execution import check_sandbox

        check_sandbox()  # rewards from model code: fail now if the sandbox cannot start, not reward 0 forever
    num_train = len(train_task)
    num_steps = args.num_iterations if args.num_iterations > 0 else (num_train // args.examples_per_step) * args.num_epochs
    if num_steps <= 0:
        raise NanochatError(f"the horizon is {num_steps} steps ({num_train} problems, {args.examples_per_step} per "
                            f"step); lower --examples-per-step or set --num-iterations.")
    print0(f"Train problems: {num_train:,}; steps: {num_steps}; {examples_per_rank} problems x "
           f"{args.num_samples} samples per rank per step")

    optimizer = model.setup_optimizer(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                      matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    checkpoint_dir = os.path.join(get_checkpoints_root("rl"), output_tag)
    log_path = os.path.join(checkpoint_dir, "train_log.jsonl")
    step, loop_state = 0, {}
    if args.resume_from_step is not None:
        resume_at = find_last_step(checkpoint_dir) if args.resume_from_step < 0 else args.resume_from_step
        model_data, optim_data, meta, extra = load_checkpoint(checkpoint_dir, resume_at, device, load_optimizer=True,
                                                              rank=rank, load_state=True)
        if meta.get("world_size", world_size) != world_size:
            raise NanochatError(f"the checkpoint was written by {meta['world_size']} processes but this run has "
                                f"{world_size}; resume with the same number of processes.")
        if meta["model_config"] != config.__dict__:
            raise NanochatError("the checkpoint's model config differs from the source model's; pass the "
                                "-i/--model-tag the run started from.")
        # copy into the existing parameters: the optimizer already holds them
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_data.items()}, strict=True)
        optimizer.load_state_dict(optim_data)
        del model_data, optim_data
        step = meta["step"]
        loop_state = meta.get("loop_state", {})
        if extra and "rng" in extra:
            set_rng_state(extra["rng"], device)
        if master:
            truncate_log(log_path, step)
        print0(f"Resumed from step {step} of {checkpoint_dir}")

    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # masked anyway; never a trained target
    flops_per_token = model.estimate_flops()  # forward + backward; a generated token costs about a third
    peak_flops = mfu_denominator(device, args.peak_flops)

    total_training_time = loop_state.get("total_training_time", 0.0)
    first_reward = loop_state.get("first_reward")
    last_reward, pass_at_k = loop_state.get("last_reward"), loop_state.get("pass_at_k")
    stop = StopRequest()
    resume_step = step
    session_time, session_steps = 0.0, 0
    scaler, skipped_steps = grad_scaler(device), 0  # loss scaling under fp16, as in base_train
    if master:
        os.makedirs(checkpoint_dir, exist_ok=True)

    while True:
        last_step = step == num_steps

        if val_task is not None and args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            pass_at_k = evaluate_pass_at_k(engine, tokenizer, val_task, args.eval_examples, args.device_batch_size,
                                           args.max_new_tokens, 1.0, args.top_k, device)
            model.train()
            print0(f"Step {step:05d} | " + ", ".join(f"{k}: {v:.4f}" for k, v in pass_at_k.items()))
            wandb_run.log({"step": step, **pass_at_k})
            if master:
                append_log(log_path, {"step": step, **pass_at_k})

        stop_now = stop.requested(device, ddp) and step > resume_step
        save_now = last_step or stop_now or (
            args.save_every > 0 and step > 0 and step % args.save_every == 0 and step != resume_step)
        if save_now:
            save_checkpoint(
                checkpoint_dir, step, model.state_dict(), optimizer.state_dict(),
                {
                    "step": step,
                    "model_config": config.__dict__,
                    "user_config": user_config,
                    "world_size": world_size,
                    "source": {"phase": args.source, "model_tag": model_tag, "step": source_step},
                    "loop_state": {"total_training_time": total_training_time, "first_reward": first_reward,
                                   "last_reward": last_reward, "pass_at_k": pass_at_k},
                },
                rank=rank, extra_state={"rng": rng_state(device)}, keep_last=args.keep_last,
            )
        if last_step:
            break
        if stop_now:
            print0(f"Stopped at step {step}; resume with --resume-from-step=-1")
            compute_cleanup()
            raise SystemExit(128 + stop.signum)

        # ---- one step: rollouts, then the policy gradient ----
        sync()
        t0 = time.time()
        reward_sum, generated, trained = 0.0, 0, 0
        for i in tqdm(range(examples_per_rank), desc=f"step {step} rollouts", leave=False, disable=not master):
            idx = example_index(step, i, examples_per_rank, rank, world_size, num_train)
            model.eval()
            prompt_len, seqs, masks, rewards = rollout(engine, tokenizer, train_task, idx, step, args.num_samples,
                                                       args.device_batch_size, args.max_new_tokens, args.temperature,
                                                       args.top_k)
            model.train()
            inputs, targets, rewards_t, advantages = rollout_tensors(seqs, masks, rewards, pad_id, device)
            reward_sum += sum(rewards)
            generated += sum(len(s) - prompt_len for s in seqs)
            for p in range(num_passes):
                rows = slice(p * args.device_batch_size, (p + 1) * args.device_batch_size)
                loss = rl_loss(model, inputs[rows], targets[rows], advantages[rows],
                               normalizer=num_passes * examples_per_rank)
                scale_loss(loss, scaler).backward()
                trained += inputs[rows].numel()
        lrm = 1.0 - step / num_steps
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        if not optimizer_step(optimizer, scaler):
            skipped_steps += 1
            print0(f"step {step:05d}: inf/NaN gradients under fp16, step skipped (loss scale now {scaler.get_scale():g})")
        model.zero_grad(set_to_none=True)
        # fp32 (MPS has no float64): the counts stay far below 2^24, where fp32 is still exact
        stats = torch.tensor([reward_sum, examples_per_rank * args.num_samples, generated, trained],
                             dtype=torch.float32, device=device)
        if ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        mean_reward = stats[0].item() / stats[1].item()
        mean_length = stats[2].item() / stats[1].item()
        sync()
        dt = time.time() - t0

        # ---- logging ----
        if first_reward is None:
            first_reward = mean_reward
        last_reward = mean_reward
        total_training_time += dt
        if step > resume_step:
            session_time += dt
            session_steps += 1
        avg_dt = session_time / session_steps if session_steps else float("nan")
        eta_min = (num_steps - step - 1) * avg_dt / 60
        tokens = stats[2].item() + stats[3].item()
        flops = flops_per_token * stats[3].item() + flops_per_token / 3 * stats[2].item()
        mfu = mfu_percent(flops / dt, peak_flops * world_size)
        mfu_text = f"{mfu:.2f}" if mfu is not None else "n/a"
        print0(f"step {step:05d}/{num_steps:05d} ({100 * step / num_steps:.2f}%) | reward: {mean_reward:.4f} | "
               f"len: {mean_length:.1f} | lrm: {lrm:.3f} | dt: {dt * 1000:.2f}ms | tok/sec: {int(tokens / dt):,} | "
               f"mfu: {mfu_text} | total time: {total_training_time / 60:.2f}m | eta: {eta_min:.1f}m")
        if master:
            append_log(log_path, {"step": step, "reward": mean_reward, "sequence_length": mean_length, "lrm": lrm,
                                  "dt": dt, "mfu": mfu})
        wandb_run.log({"step": step, "reward": mean_reward, "sequence_length": mean_length, "lrm": lrm})
        step += 1
        if step == resume_step + 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:
            gc.collect()

    print0(f"Total training time: {total_training_time / 60:.2f}m")
    summary = {"source": args.source, "model_tag": model_tag, "source_step": source_step, "output_tag": output_tag,
               "steps": step, "training_time_s": total_training_time, "first_reward": first_reward,
               "last_reward": last_reward, "pass_at_k": pass_at_k, "checkpoint_dir": checkpoint_dir,
               "skipped_steps": skipped_steps}
    if master:
        from nanochat.report import get_report
        get_report().log(section="Chat RL", data=[user_config, summary])
    print0(json.dumps({"chat_rl": summary}))
    wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    run_main(main)
