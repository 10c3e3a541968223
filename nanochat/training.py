"""What the three training loops (base_train, chat_sft, chat_rl) share around their step: a
`Checkpointer` that resumes a run with every check, decides when to save, saves and stops on a
signal, and a `StepMeter` that times a step and logs it (the printed line, train_log.jsonl,
wandb) and keeps the garbage collector out of the way. Each loop body stays in its script.
Formats and the resume guarantee are in docs/training.md."""

import contextlib
import gc
import os
import signal
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    append_log,
    check_state_dict_fits,
    find_last_step,
    load_checkpoint,
    patch_model_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
    truncate_log,
)
from nanochat.common import (
    NanochatError,
    check_free_space,
    compute_cleanup,
    get_base_dir,
    mfu_denominator,
    mfu_percent,
    print0,
)


def accumulation_steps(total_batch_size, device_batch_size, max_seq_len, world_size, fix):
    """Forward/backward passes per optimizer step: each rank's passes of device_batch_size x
    max_seq_len tokens must add up to total_batch_size exactly, else NanochatError ending in `fix`
    (which flags the script takes to change it)."""
    tokens_per_micro = device_batch_size * max_seq_len
    if total_batch_size % (tokens_per_micro * world_size) != 0:
        raise NanochatError(
            f"--total-batch-size={total_batch_size} is not divisible by device_batch_size*max_seq_len*world_size "
            f"= {device_batch_size}*{max_seq_len}*{world_size} = {tokens_per_micro * world_size}; {fix}.")
    steps = total_batch_size // (tokens_per_micro * world_size)
    print0(f"Tokens per micro-batch per rank: {tokens_per_micro:,}; gradient accumulation steps: {steps}")
    return steps


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint at the end of the current step and exit."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    def requested(self, device, ddp):
        flag = torch.tensor(1 if self.signum is not None else 0, device=device)
        if ddp:  # every rank stops at the same step
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextlib.contextmanager
def interpreter_restored():
    """Give an in-process caller (a test, a notebook) its interpreter back as it was: a loop
    installs StopRequest's signal handlers and freezes the garbage collector (StepMeter)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gc_enabled = gc.isenabled()
    try:
        yield
    finally:
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)
        gc.unfreeze()
        if gc_enabled:
            gc.enable()


class Checkpointer:
    """One run's checkpoint folder: check_space(), resume(), due(), save(), exit_if_stopping()."""

    def __init__(self, checkpoint_dir, stop, *, rank, world_size, device, ddp, save_every=-1, keep_last=-1):
        self.dir, self.stop, self.rank, self.world_size = checkpoint_dir, stop, rank, world_size
        self.device, self.ddp, self.save_every, self.keep_last = device, ddp, save_every, keep_last
        self.log_path = os.path.join(checkpoint_dir, "train_log.jsonl")
        self.resume_step, self.stopping = 0, False

    def check_space(self, model):
        """Refuse now, rather than at a save hours in, when the disk cannot hold the checkpoints this
        run keeps: each is the fp32 weights plus about twice that in optimizer state."""
        n_params = sum(p.numel() for p in model.parameters())
        check_free_space(get_base_dir(), 12 * n_params * max(1, self.keep_last), "a checkpoint of this model")

    def resume(self, from_step, model, optimizer, config, hint):
        """Load `from_step` (-1: the latest) into `model` and `optimizer` and restore the RNGs;
        returns (step, meta, extra state). Refuses, saying what differs and `hint` on what to
        pass, a checkpoint of another world size, model config, state dict or optimizer layout.
        Forgets the log lines of the steps about to be redone."""
        step = find_last_step(self.dir) if from_step < 0 else from_step
        model_data, optim_data, meta, extra = load_checkpoint(self.dir, step, self.device, load_optimizer=True,
                                                              rank=self.rank, load_state=True)
        saved_world = meta.get("world_size", self.world_size)
        if saved_world != self.world_size:
            raise NanochatError(f"the checkpoint at step {step} was written by {saved_world} process(es) but this "
                                f"run has {self.world_size}; resume with the same number of processes (the "
                                f"optimizer state is sharded per rank).")
        saved_config = patch_model_config(meta["model_config"])
        if saved_config != config.__dict__:
            diff = ", ".join(f"{k}: saved {saved_config.get(k)!r} vs now {v!r}" for k, v in config.__dict__.items()
                             if saved_config.get(k) != v)
            if "vocab_size" in diff:
                hint = "the tokenizer changed: resume with the tokenizer the run started with"
            raise NanochatError(f"the checkpoint's model config differs from this run's ({diff}); {hint}.")
        model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
        check_state_dict_fits(model_data, model, f"the checkpoint at step {step} in {self.dir}")
        # copy into the existing parameters (no assign=True): the optimizer holds these very tensors
        model.load_state_dict(model_data, strict=True)
        try:
            optimizer.load_state_dict(optim_data)  # NanochatError itself if the shard has another rank layout
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise NanochatError(f"the optimizer shard of rank {self.rank} at step {step} does not fit this run's "
                                f"optimizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"resume with the same flags, or start a new run from the weights.") from None
        extra = extra or {}
        if "rng" in extra:
            set_rng_state(extra["rng"], self.device)
        if self.rank == 0:
            truncate_log(self.log_path, meta["step"])
        print0(f"Resumed from step {meta['step']} of {self.dir}")
        self.resume_step = meta["step"]
        return meta["step"], meta, extra

    def due(self, step, last_step):
        """Whether to save at `step`: the last step, a stop request (agreed by every rank), or the
        --save-every cadence (not the step just resumed from, which is on disk already)."""
        self.stopping = self.stop.requested(self.device, self.ddp) and step > self.resume_step
        return last_step or self.stopping or (self.save_every > 0 and step > 0 and step % self.save_every == 0
                                              and step != self.resume_step)

    def save(self, step, model, optimizer, meta, extra_state=None):
        """The model (rank 0), this rank's optimizer shard, its RNG states (and whatever
        `extra_state` adds, e.g. the loader position) and `meta`, written last."""
        save_checkpoint(self.dir, step, model.state_dict(), optimizer.state_dict(),
                        {"step": step, "world_size": self.world_size, **meta}, rank=self.rank,
                        extra_state={**(extra_state or {}), "rng": rng_state(self.device)}, keep_last=self.keep_last)

    def exit_if_stopping(self, step, wandb_run):
        """After a stop request's save: finish wandb, leave the process group, exit 128 + signal."""
        if self.stopping:
            print0(f"Stopped at step {step}; resume with --resume-from-step=-1")
            wandb_run.finish()
            compute_cleanup()
            raise SystemExit(128 + self.stop.signum)


class StepMeter:
    """Times each step and logs it: one printed line, one train_log.jsonl record (rank 0), and
    wandb every `wandb_every` steps. Also the smoothed loss, the train loss averaged over ranks,
    the training time and the ETA, each computed one way for every loop."""

    WARMUP_STEPS = 10  # steps 0..10 stay out of the training time: they include compilation and warm-up
    EMA_BETA = 0.9

    def __init__(self, log_path, *, device, ddp, world_size, master, wandb_run, peak_flops=-1.0, wandb_every=1,
                 start_step=0, loop_state=None):
        loop_state = loop_state or {}
        self.log_path, self.device, self.ddp, self.world_size = log_path, device, ddp, world_size
        self.master, self.wandb_run, self.wandb_every = master, wandb_run, wandb_every
        self.peak_flops = mfu_denominator(device, peak_flops)
        self.start_step = start_step
        self.smooth_loss = loop_state.get("smooth_train_loss", 0.0)
        self.training_time = loop_state.get("total_training_time", 0.0)
        self.session_time, self.session_steps, self.t0 = 0.0, 0, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self.t0 = time.time()

    def mean_over_ranks(self, value):
        """A 0-D float tensor averaged over the ranks, as a float (SUM then divide: gloo has no AVG)."""
        if self.ddp:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world_size
        return value.item()

    def smoothed(self, loss, step):
        """The exponential moving average of the loss, debiased for its zero start."""
        self.smooth_loss = self.EMA_BETA * self.smooth_loss + (1 - self.EMA_BETA) * loss
        return self.smooth_loss / (1 - self.EMA_BETA ** (step + 1))

    def log(self, step, done, shown, record, tokens, flops, horizon=None):
        """End the step's timing and log it. `done` is the fraction of the run finished after this
        step; `shown` the script's own fields for the printed line (name -> text), `record` its
        fields for train_log.jsonl and wandb; `tokens` and `flops` the step's work on all ranks.
        The ETA is the mean step time of this session, its first step left out (compilation),
        times the steps left: N - step - 1 when the horizon N is known, else as many as the
        progress so far took per fraction done."""
        self._sync()
        dt = time.time() - self.t0
        if step > self.WARMUP_STEPS:
            self.training_time += dt
        if step > self.start_step:
            self.session_time, self.session_steps = self.session_time + dt, self.session_steps + 1
        avg_dt = self.session_time / self.session_steps if self.session_steps else float("nan")
        steps_left = horizon - step - 1 if horizon else (step + 1) * (1 - done) / max(done, 1e-9)
        tok_per_sec = int(tokens / dt)
        mfu = mfu_percent(flops / dt, self.peak_flops * self.world_size)
        position = f"{step:05d}/{horizon:05d}" if horizon else f"{step:05d}"
        print0(f"step {position} ({100 * done:.2f}%) | " + " | ".join(f"{k}: {v}" for k, v in shown.items()) +
               f" | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,} | mfu: {'n/a' if mfu is None else f'{mfu:.2f}'} | "
               f"total time: {self.training_time / 60:.2f}m | eta: {steps_left * avg_dt / 60:.1f}m")
        record = {"step": step, **record, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu}
        if self.master:
            append_log(self.log_path, record)
        if step % self.wandb_every == 0:
            self.wandb_run.log({"step": step, "total_training_time": self.training_time,
                                **{f"train/{k}": v for k, v in record.items() if k != "step"}})
        self._collect_garbage(step + 1)

    def _collect_garbage(self, next_step):
        # After the session's first step, everything long-lived exists (model, optimizer state,
        # loader, compiled graphs): millions of objects an automatic full collection would walk
        # again and again, pausing a random step for a noticeable time while finding almost
        # nothing, since a step creates few reference cycles. Freeze them out of the collector's
        # sight and collect by hand, rarely.
        if next_step == self.start_step + 1:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif next_step % 5000 == 0:
            gc.collect()

    def loop_state(self):
        return {"smooth_train_loss": self.smooth_loss, "total_training_time": self.training_time}
