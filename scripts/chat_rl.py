"""Reinforcement learning on GSM8K: on-policy REINFORCE with group-mean
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
import json  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from nanochat.checkpoint import append_log, build_model, get_checkpoints_root, resolve_checkpoint  # noqa: E402
from nanochat.common import NanochatError, compute_cleanup, compute_init, dist_rank_world, init_wandb, print0, run_main  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.optim import grad_scaler, lr_multiplier_by_progress, optimizer_step, scale_loss  # noqa: E402
from nanochat.training import Checkpointer, StepMeter, StopRequest, interpreter_restored  # noqa: E402


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
    p.add_argument("--data-dir", default=None, help="task data folder (default: $NANOCHAT_TASK_DATA_DIR)")
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
    """Seeds depend only on where we are, so a resumed run samples the same answers.
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
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    total = max(counts[0].item(), 1)
    return {f"pass@{j}": counts[j].item() / total for j in range(1, k + 1)}


# -----------------------------------------------------------------------------


def main(argv=None, train_task=None, val_task=None):
    """train_task / val_task replace GSM8K train / test (anything with len(), [i], reward and
    evaluate): tests use a toy task."""
    args = parse_args(argv)
    with interpreter_restored():
        return train(args, train_task, val_task)


def train(args, train_task=None, val_task=None):
    user_config = dict(vars(args))
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
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
        train_task = GSM8K(subset="main", split="train", data_dir=args.data_dir)
    if val_task is None and args.eval_every > 0:
        from nanochat.tasks.gsm8k import GSM8K
        val_task = GSM8K(subset="main", split="test", data_dir=args.data_dir)
    if any(getattr(task, "executes_code", False) for task in (train_task, val_task)):
        from nanochat.execution import check_sandbox

        check_sandbox(args.sandbox)  # rewards from model code: fail now if the sandbox cannot start, not reward 0 forever
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
    ckpt = Checkpointer(checkpoint_dir, StopRequest(), rank=rank, world_size=world_size, device=device, ddp=ddp,
                        save_every=args.save_every, keep_last=args.keep_last)
    step, meta = 0, {}
    if args.resume_from_step is not None:
        step, meta, _ = ckpt.resume(args.resume_from_step, model, optimizer, config,
                                    "pass the -i/--model-tag the run started from")
    loop_state = meta.get("loop_state", {})

    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # masked anyway; never a trained target
    flops_per_token = model.estimate_flops()  # forward + backward; a generated token costs about a third
    meter = StepMeter(ckpt.log_path, device=device, ddp=ddp, world_size=world_size, master=master, wandb_run=wandb_run,
                      peak_flops=args.peak_flops, start_step=step, loop_state=loop_state)
    first_reward = loop_state.get("first_reward")
    last_reward, pass_at_k = loop_state.get("last_reward"), loop_state.get("pass_at_k")
    scaler, skipped_steps = grad_scaler(device), 0  # loss scaling under fp16

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
                append_log(ckpt.log_path, {"step": step, **pass_at_k})

        if ckpt.due(step, last_step):
            ckpt.save(step, model, optimizer, {
                "model_config": config.__dict__,
                "user_config": user_config,
                "source": {"phase": args.source, "model_tag": model_tag, "step": source_step},
                "loop_state": {"first_reward": first_reward, "last_reward": last_reward, "pass_at_k": pass_at_k,
                               **meter.loop_state()},
            })
        if last_step:
            break
        ckpt.exit_if_stopping(step, wandb_run)

        # ---- one step: rollouts, then the policy gradient ----
        meter.start()
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
        lrm = lr_multiplier_by_progress(step / num_steps, 0.0, 1.0, 0.0)  # linear to 0 over the run; momentum stays 0.95
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        if not optimizer_step(optimizer, scaler, step):
            skipped_steps += 1
        model.zero_grad(set_to_none=True)
        # fp32 (MPS has no float64): the counts stay far below 2^24, where fp32 is still exact
        stats = torch.tensor([reward_sum, examples_per_rank * args.num_samples, generated, trained],
                             dtype=torch.float32, device=device)
        if ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        mean_reward = stats[0].item() / stats[1].item()
        mean_length = stats[2].item() / stats[1].item()

        # ---- logging ----
        if first_reward is None:
            first_reward = mean_reward
        last_reward = mean_reward
        flops = flops_per_token * stats[3].item() + flops_per_token / 3 * stats[2].item()
        meter.log(step, (step + 1) / num_steps, {"reward": f"{mean_reward:.4f}", "len": f"{mean_length:.1f}",
                                                 "lrm": f"{lrm:.3f}"},
                  {"reward": mean_reward, "sequence_length": mean_length, "lrm": lrm},
                  stats[2].item() + stats[3].item(), flops, horizon=num_steps)
        step += 1

    total_training_time = meter.training_time
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
