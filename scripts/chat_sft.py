"""Supervised finetuning: teach the base model the chat format on a mixture of conversations,
training only on what the assistant writes (the render mask of Tokenizer.render_conversation).

    python -m scripts.chat_sft                                   # the full mixture, sizes inherited from the base run
    python -m scripts.chat_sft --mixture=my_chats.jsonl --num-iterations=200 --device-type=cpu
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --run=sft

Mixture: SmolTalk train, identity conversations x2, MMLU auxiliary_train x3, GSM8K x4,
SimpleSpelling 200K, SpellingBee 80K; validation: SmolTalk test, MMLU test[:5200], GSM8K
test[:420]. A component whose data is absent offline is skipped with one warning line
(--strict-data makes that an error). --mixture trains on your own conversations instead (JSONL,
each line a JSON array of messages, or an object with a "messages" array).

Conversations are packed best-fit into rows of max_seq_len+1 tokens and the rest of a row is
padded with BOS, never cropped; targets are -1 outside the assistant's tokens and on padding.
Interrupt it (SIGTERM/Ctrl-C) and it checkpoints at the end of the step; --resume-from-step=-1
continues exactly (the loader position is in the per-rank state file).
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nanochat.checkpoint import append_log, build_model, get_checkpoints_root, load_optimizer_state, resolve_checkpoint  # noqa: E402
from nanochat.common import (  # noqa: E402
    COMPUTE_DTYPE,
    NanochatError,
    compute_cleanup,
    compute_init,
    fit_horizon,
    get_base_dir,
    init_wandb,
    iter_jsonl,
    print0,
    run_main,
)
from nanochat.loss_eval import evaluate_bpb, one_pass  # noqa: E402
from nanochat.optim import grad_scaler, lr_multiplier_by_progress, muon_momentum, optimizer_step, scale_loss  # noqa: E402
from nanochat.tokenizer import check_conversation, get_token_bytes  # noqa: E402
from nanochat.training import Checkpointer, StepMeter, StopRequest, accumulation_steps, interpreter_restored  # noqa: E402

MAX_CONVERSATION_TOKENS = 2048  # render_conversation's default cut: a longer conversation is truncated
MUON_MOMENTUM_RAMP = 300  # steps for Muon momentum 0.85 -> 0.95: finetuning starts from trained weights

# ChatCORE tasks and whether each is categorical (docs/evaluation.md)
CHATCORE_TASKS = [("ARC-Easy", True), ("ARC-Challenge", True), ("MMLU", True), ("GSM8K", False),
                  ("HumanEval", False), ("SpellingBee", False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    p.add_argument("--force-dtype", action="store_true",
                   help="keep NANOCHAT_DTYPE even on a CPU that runs it far slower than float32")
    # the base model to start from
    p.add_argument("--model-tag", default=None, help="base model tag (default: the largest d<N>)")
    p.add_argument("--model-step", type=int, default=None, help="base model step (default: the last)")
    p.add_argument("--load-optimizer", type=int, default=1, help="start from the base run's optimizer buffers (1) or fresh (0)")
    # horizon and sizes (None = inherit from the base run)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the mixture)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--device-batch-size", type=int, default=None)
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--embedding-lr", type=float, default=None)
    p.add_argument("--unembedding-lr", type=float, default=None)
    p.add_argument("--matrix-lr", type=float, default=None)
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="every LR is multiplied by this")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.5)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    # evaluation
    p.add_argument("--eval-every", type=int, default=200, help="val bpb cadence (-1: off)")
    p.add_argument("--eval-tokens", type=int, default=40 * 524288)
    p.add_argument("--chatcore-every", type=int, default=200, help="ChatCORE cadence (-1: off)")
    p.add_argument("--chatcore-max-cat", type=int, default=-1, help="problems per categorical task (-1: all)")
    p.add_argument("--chatcore-max-sample", type=int, default=24, help="problems per generative task")
    # data
    p.add_argument("--mmlu-epochs", type=int, default=3)
    p.add_argument("--gsm8k-epochs", type=int, default=4)
    p.add_argument("--identity-file", default=None, help="identity conversations (default base_dir/identity_conversations.jsonl)")
    p.add_argument("--mixture", default=None, help="train on these conversation JSONL files only (comma-separated)")
    p.add_argument("--val-mixture", default=None, help="validate on these JSONL files (with --mixture; default: the train files)")
    p.add_argument("--data-dir", default=None, help="task data folder (default: $NANOCHAT_TASK_DATA_DIR)")
    p.add_argument("--strict-data", action="store_true", help="a mixture component whose data is missing is an error")
    # checkpoints and resume
    p.add_argument("--output-tag", default=None, help="chatsft_checkpoints/<tag> (default: the base model tag)")
    p.add_argument("--resume-from-step", type=int, default=None, help="resume this SFT run from a step; -1 = the latest")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint cadence in steps (-1: only at the end)")
    p.add_argument("--keep-last", type=int, default=-1, help="keep only the last K checkpoints (-1: all)")
    # compute and measurement
    p.add_argument("--compile", type=int, default=-1,
                   help="torch.compile the model (1) or not (0); -1: on CUDA only (on a CPU compiling takes "
                        "minutes, longer than a short finetune gains from it)")
    p.add_argument("--peak-flops", type=float, default=-1.0, help="device peak FLOP/s for MFU (default: GPU table, measured on CPU)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Conversation files


def read_conversations(path):
    """The conversations of a JSONL file as [{"messages": [...]}, ...]. Each non-blank line is a
    JSON array of messages (CustomJSON's format) or an object with a "messages" array. A bad
    line raises NanochatError naming the file and the line."""
    if not os.path.exists(path):
        raise NanochatError(f"{path} does not exist; give an existing conversations file.")
    conversations = []
    for lineno, item in iter_jsonl(path):
        messages = item.get("messages") if isinstance(item, dict) else item
        check_conversation(messages, f"{path}:{lineno}", reply_needed=True)
        conversations.append({"messages": messages})
    if not conversations:
        raise NanochatError(f"{path} holds no conversations.")
    return conversations


class ConversationList:
    """A Task-like view of in-memory conversations: len() and [i]."""

    def __init__(self, conversations):
        self.conversations = conversations

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i]


# -----------------------------------------------------------------------------
# The mixture


def _build_components(components, strict):
    """Instantiate (name, factory) pairs; returns (tasks, names of the components that have data).
    A component whose data is absent is skipped with one warning naming it (an error with
    --strict-data); a name repeated for epochs warns once. len() forces lazy datasets to load
    here, not in the middle of training."""
    from nanochat.tasks.common import TaskDataMissing

    tasks, names, missing = [], [], set()
    for name, factory in components:
        if name in missing:
            continue
        try:
            task = factory()
            n = len(task)
        except (TaskDataMissing, FileNotFoundError) as e:
            if strict:
                raise NanochatError(f"mixture component {name} has no data ({e}); fetch it or drop --strict-data.") from None
            print0(f"warning: skipping mixture component {name}: {e}")
            missing.add(name)
            continue
        if n == 0:
            if strict:
                raise NanochatError(f"mixture component {name} is empty; fetch its data or drop --strict-data.")
            print0(f"warning: skipping mixture component {name}: it is empty")
            missing.add(name)
            continue
        tasks.append(task)
        names.append(name)
    return tasks, names


def _counted(names):
    """'a x2, b' for ['a', 'a', 'b']: the components that ran, in order, with their repeats."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        counts[name] += 1
    return ", ".join(name if k == 1 else f"{name} x{k}" for name, k in counts.items())


def build_mixtures(args):
    """(train dataset, val dataset, description) for the run."""
    if args.mixture:
        train_files = [p for p in args.mixture.split(",") if p]
        val_files = [p for p in (args.val_mixture or args.mixture).split(",") if p]
        if not args.val_mixture:
            print0("note: no --val-mixture given; validating on the training conversations")
        train = ConversationList([c for path in train_files for c in read_conversations(path)])
        val = ConversationList([c for path in val_files for c in read_conversations(path)])
        return train, val, f"files {train_files}"

    from nanochat.tasks.common import TaskDataMissing, TaskMixture
    from nanochat.tasks.customjson import CustomJSON
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.mmlu import MMLU
    from nanochat.tasks.smoltalk import SmolTalk
    from nanochat.tasks.spellingbee import SimpleSpelling, SpellingBee

    identity_path = args.identity_file or os.path.join(get_base_dir(), "identity_conversations.jsonl")
    d = args.data_dir  # every task gets it; None falls back to $NANOCHAT_TASK_DATA_DIR
    val_components = [
        ("SmolTalk test", lambda: SmolTalk(split="test", data_dir=d)),
        ("MMLU test[:5200]", lambda: MMLU(subset="all", split="test", stop=5200, data_dir=d)),
        ("GSM8K main test[:420]", lambda: GSM8K(subset="main", split="test", stop=420, data_dir=d)),
    ]
    val_tasks, val_names = _build_components(val_components, args.strict_data)
    # Offline without task data the identity conversations are still there (the pipeline generates
    # them): validate on their last tenth and train on the rest, rather than stop.
    held_out = 0
    if not val_tasks:
        with contextlib.suppress(TaskDataMissing):
            n = len(CustomJSON(filepath=identity_path))
            held_out = max(1, n // 10) if n >= 2 else 0
        if held_out:
            val_tasks = [CustomJSON(filepath=identity_path, start=n - held_out)]
            val_names = [f"identity conversations[{n - held_out}:] (held out)"]
            print0(f"note: no validation task data; validating on the last {held_out} of the {n} identity "
                   f"conversations, held out of training")

    def identity():  # CustomJSON: TaskDataMissing when the file is absent, an error naming the line when malformed
        return CustomJSON(filepath=identity_path, stop=n - held_out) if held_out else CustomJSON(filepath=identity_path)

    train_components = [
        ("SmolTalk train", lambda: SmolTalk(split="train", data_dir=d)),
        ("identity conversations", identity),
        ("identity conversations", identity),  # x2: oversampled
        *[("MMLU auxiliary_train", lambda: MMLU(subset="auxiliary_train", split="train", data_dir=d))] * args.mmlu_epochs,
        *[("GSM8K main train", lambda: GSM8K(subset="main", split="train", data_dir=d))] * args.gsm8k_epochs,
        ("SimpleSpelling 200K", lambda: SimpleSpelling(size=200000, split="train", data_dir=d)),
        ("SpellingBee 80K", lambda: SpellingBee(size=80000, split="train", data_dir=d)),
    ]
    train_tasks, train_names = _build_components(train_components, args.strict_data)
    if not train_tasks:
        raise NanochatError("no training data: every mixture component is missing; fetch the task data "
                            "(or point --data-dir at it), or train on your own file with --mixture=FILE.jsonl.")
    if not val_tasks:
        raise NanochatError("no validation data: every validation component is missing and there are no identity "
                            "conversations to hold out; fetch the task data, run `python -m scripts.gen_identity`, "
                            "or use --mixture/--val-mixture.")
    description = f"train: {_counted(train_names)}; validation: {_counted(val_names)}"
    return TaskMixture(train_tasks), TaskMixture(val_tasks), description


# -----------------------------------------------------------------------------
# The SFT loader: best-fit packing with padding, masked targets, exact resume state


def to_device(t, device):
    """Host -> device. On CUDA through pinned memory, so the copy is asynchronous and overlaps
    the step already queued on the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SFTLoader:
    """Infinite iterator of (inputs (B, T) int64, targets (B, T) int64, state) over a dataset of
    conversations (anything with len() and [i] -> {"messages": [...]}).

    Rank r reads conversations r, r+W, r+2W, ... (wrapping around, epoch += 1), renders them
    into a buffer, and fills each row of T+1 tokens with the largest buffered conversation
    that fits entirely; when none fits, the rest of the row is BOS padding (pad, never crop:
    a cropped conversation would teach replies that stop mid-sentence). A conversation longer than a row is truncated to the row when rendered (the
    only way it can be placed; at T=2048 this is render_conversation's own 2048 cut).
    Targets are -1 where the render mask is 0 (everything but the assistant's tokens) and on
    the padding. The state after each batch records the cursor, the epoch, the consumption
    count and which conversations sit in the buffer, so resuming from it is exact."""

    def __init__(self, dataset, tokenizer, batch_size, seq_len, rank=0, world_size=1, device="cpu", state=None,
                 buffer_size=100):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.size = len(dataset)
        if self.size == 0:
            raise NanochatError("the conversation mixture is empty.")
        self.B, self.capacity = batch_size, seq_len + 1
        self.max_tokens = min(MAX_CONVERSATION_TOKENS, self.capacity)
        self.rank, self.world_size, self.device, self.buffer_size = rank, world_size, torch.device(device), buffer_size
        self.bos = tokenizer.get_bos_token_id()
        state = state or {"cursor": rank % self.size, "epoch": 1, "consumed": rank, "batches": 0, "buffer": []}
        self.cursor, self.epoch = state["cursor"], state["epoch"]
        self.consumed, self.batches = state["consumed"], state["batches"]
        self.buffer = [(idx, *self._render(idx)) for idx in state["buffer"]]

    def _render(self, idx):
        try:
            return self.tokenizer.render_conversation(self.dataset[idx], max_tokens=self.max_tokens)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise NanochatError(f"conversation {idx} of the mixture cannot be rendered ({e}); fix or drop it.") from None

    def state_dict(self):
        return {"cursor": self.cursor, "epoch": self.epoch, "consumed": self.consumed, "batches": self.batches,
                "buffer": [idx for idx, _, _ in self.buffer]}

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            idx = self.cursor
            self.buffer.append((idx, *self._render(idx)))
            self.cursor += self.world_size
            if self.cursor >= self.size:
                self.cursor %= self.size
                self.epoch += 1

    def _fill_row(self):
        ids, mask = [], []
        while len(ids) < self.capacity:
            self._refill()
            remaining = self.capacity - len(ids)
            best, best_len = -1, 0
            for i, (_, conv, _) in enumerate(self.buffer):
                if best_len < len(conv) <= remaining:
                    best, best_len = i, len(conv)
            if best < 0:
                break  # nothing fits: pad the rest
            _, conv, conv_mask = self.buffer.pop(best)
            ids.extend(conv)
            mask.extend(conv_mask)
            self.consumed += self.world_size
        return ids, mask

    def __iter__(self):
        return self

    def __next__(self):
        rows = torch.full((self.B, self.capacity), self.bos, dtype=torch.long)
        masks = torch.zeros((self.B, self.capacity), dtype=torch.bool)
        for b in range(self.B):
            ids, mask = self._fill_row()
            rows[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            masks[b, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
        self.batches += 1
        inputs = rows[:, :-1]
        targets = rows[:, 1:].clone()
        targets[~masks[:, 1:]] = -1  # user turns, tool outputs, <|assistant_start|> and the BOS padding
        return to_device(inputs, self.device), to_device(targets, self.device), self.state_dict()


# -----------------------------------------------------------------------------
# ChatCORE


def run_chatcore(model, tokenizer, args, batch_size):
    """{"results": {task: acc}, "chatcore": float|None, "chatcore_cat": float|None}. Tasks whose
    data is missing are skipped with a note."""
    from nanochat.chat_eval import chatcore, chatcore_is_complete, run_chat_eval
    from nanochat.engine import Engine
    from nanochat.tasks.common import TaskDataMissing

    engine = Engine(model, tokenizer)
    results = {}
    for name, categorical in CHATCORE_TASKS:
        limit = (None if args.chatcore_max_cat < 0 else args.chatcore_max_cat) if categorical else args.chatcore_max_sample
        try:
            results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=batch_size, num_samples=1,
                                          max_new_tokens=512, temperature=0.0, top_k=50, max_problems=limit,
                                          data_dir=args.data_dir)
        except TaskDataMissing as e:
            print0(f"note: ChatCORE task {name} skipped: no data offline ({e})")
        except NanochatError as e:  # e.g. prompts longer than a small model's context: report it, keep training
            print0(f"note: ChatCORE task {name} failed: {e}")
    out = {"results": results, "chatcore": None, "chatcore_cat": None}
    if chatcore_is_complete(results):
        out["chatcore"] = chatcore(results)
    categorical = [name for name, is_cat in CHATCORE_TASKS if is_cat]
    if all(name in results for name in categorical):
        out["chatcore_cat"] = chatcore({name: results[name] for name in categorical})
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    with interpreter_restored():
        return train(args)


def train(args):
    user_config = dict(vars(args))
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    print0(f"COMPUTE_DTYPE: {COMPUTE_DTYPE}")
    wandb_run = init_wandb(args.run, master, "nanochat-sft", user_config)

    # the base model, and what SFT inherits from its run: sizes and LRs (without its batch scaling)
    try:
        base_dir, base_step = resolve_checkpoint("base", args.model_tag, args.model_step)
    except NanochatError as e:
        raise NanochatError(f"no base model to finetune: {e}") from None
    model, tokenizer, base_meta = build_model(base_dir, base_step, device, phase="train")
    model_tag = os.path.basename(base_dir)
    output_tag = args.output_tag or model_tag
    base_user = base_meta.get("user_config") or {}
    max_seq_len = args.max_seq_len or base_meta.get("max_seq_len", 2048)
    device_batch_size = args.device_batch_size or base_meta.get("device_batch_size", 32)
    total_batch_size = args.total_batch_size or base_meta.get("total_batch_size", 524288)
    embedding_lr = args.embedding_lr if args.embedding_lr is not None else base_user.get("embedding_lr", 0.3)
    unembedding_lr = args.unembedding_lr if args.unembedding_lr is not None else base_user.get("unembedding_lr", 0.004)
    matrix_lr = args.matrix_lr if args.matrix_lr is not None else base_user.get("matrix_lr", 0.02)
    print0(f"Base model {model_tag} step {base_step}: max_seq_len {max_seq_len}, device_batch_size {device_batch_size}, "
           f"total_batch_size {total_batch_size:,}; LRs embedding {embedding_lr}, unembedding {unembedding_lr}, "
           f"matrix {matrix_lr} (x{args.init_lr_frac})")
    token_bytes = get_token_bytes(device=device)
    config = model.config

    tokens_per_micro = device_batch_size * max_seq_len
    grad_accum_steps = accumulation_steps(total_batch_size, device_batch_size, max_seq_len, world_size,
                                          "pass --total-batch-size or --device-batch-size to fix it")

    # optimizer: fresh SFT LRs, no weight decay; optionally the base run's moment buffers
    optimizer = model.setup_optimizer(unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                      matrix_lr=matrix_lr, weight_decay=0.0)
    fresh_hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    base_world = base_meta.get("world_size", world_size)
    if args.load_optimizer and args.resume_from_step is None and base_world != world_size:
        raise NanochatError(f"the base run used {base_world} processes and this one {world_size}: its per-rank optimizer "
                            f"shards do not split differently; run with {base_world} processes or pass --load-optimizer=0.")
    if args.load_optimizer and args.resume_from_step is None:
        base_optim = load_optimizer_state("base", device, rank, model_tag, base_step)
        if base_optim is not None:
            try:
                optimizer.load_state_dict(base_optim)
            except (ValueError, KeyError, NanochatError) as e:
                raise NanochatError(f"the base optimizer state does not fit this run ({e}); "
                                    f"pass --load-optimizer=0 to start the optimizer fresh.") from None
            # load_state_dict brought the base run's end-of-warmdown LRs and weight decay: restore ours
            for group, hp in zip(optimizer.param_groups, fresh_hparams):
                group.update(hp)
            print0("Loaded the base optimizer's moment buffers")
            del base_optim
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * args.init_lr_frac
        group["initial_lr"] = group["lr"]

    # resume this SFT run
    checkpoint_dir = os.path.join(get_checkpoints_root("sft"), output_tag)
    ckpt = Checkpointer(checkpoint_dir, StopRequest(), rank=rank, world_size=world_size, device=device, ddp=ddp,
                        save_every=args.save_every, keep_last=args.keep_last)
    ckpt.check_space(model)
    step, meta, loader_state = 0, {}, None
    if args.resume_from_step is not None:
        step, meta, extra = ckpt.resume(args.resume_from_step, model, optimizer, config,
                                        "pass the --model-tag the run started from")
        if "loader" not in extra:
            raise NanochatError(f"step {step} in {checkpoint_dir} has no loader state for rank {rank}; "
                                f"resume from another step.")
        loader_state = extra["loader"]
    loop_state = meta.get("loop_state", {})

    orig_model = model
    if args.compile == 1 or (args.compile < 0 and device.type == "cuda"):
        model = torch.compile(model, dynamic=False)

    # data
    train_data, val_data, description = build_mixtures(args)
    dataset_size = len(train_data)
    print0(f"Mixture: {description}; {dataset_size:,} training and {len(val_data):,} validation conversations")
    train_loader = SFTLoader(train_data, tokenizer, device_batch_size, max_seq_len, rank, world_size, device,
                             state=loader_state)

    eval_steps = max(1, args.eval_tokens // (tokens_per_micro * world_size))

    def build_val_loader():  # at most one pass over the validation conversations, whatever --eval-tokens asks
        loader = SFTLoader(val_data, tokenizer, device_batch_size, max_seq_len, rank, world_size, device)
        return one_pass(loader, lambda state: state["consumed"] >= len(val_data))

    horizon = args.num_iterations if args.num_iterations > 0 else None  # None: one pass over the mixture
    if horizon:  # a fixed horizon may cycle a small mixture: say so up front, with the numbers
        sample = range(0, dataset_size, max(1, dataset_size // 200))
        mean = sum(len(train_loader._render(i)[0]) for i in sample) / len(sample)
        fit_horizon(horizon, total_batch_size, int(mean * dataset_size))
    x, y, next_loader_state = next(train_loader)
    trained_loader_state = loader_state  # the position after the last batch trained on

    flops_per_token = orig_model.estimate_flops()
    meter = StepMeter(ckpt.log_path, device=device, ddp=ddp, world_size=world_size, master=master, wandb_run=wandb_run,
                      peak_flops=args.peak_flops, wandb_every=10, start_step=step, loop_state=loop_state)
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    initial_val_bpb = loop_state.get("initial_val_bpb")
    chatcore_value = loop_state.get("chatcore")
    val_bpb = None
    scaler, skipped_steps = grad_scaler(device), 0  # loss scaling under fp16

    while True:
        # when to stop, and where the next batch sits in the data: the same on every rank
        if horizon:
            last_step, progress = step >= horizon, step / horizon
        else:
            # ranks consume conversations at different rates: the furthest one decides. Whole
            # counts travel as int64 (exact, and Apple's MPS has no float64).
            done = trained_loader_state is not None and trained_loader_state["consumed"] >= dataset_size
            flags = torch.tensor([done, next_loader_state["consumed"]], dtype=torch.int64, device=device)
            if ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            last_step, progress = bool(flags[0].item()), flags[1].item() / dataset_size
        progress = min(progress, 1.0)

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            model.eval()
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            if initial_val_bpb is None:
                initial_val_bpb = val_bpb
            print0(f"Step {step:05d} | Validation bpb: {val_bpb:.6f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
            if master:
                append_log(ckpt.log_path, {"step": step, "val_bpb": val_bpb})
            model.train()

        if args.chatcore_every > 0 and (last_step or (step > 0 and step % args.chatcore_every == 0)):
            orig_model.eval()
            core = run_chatcore(orig_model, tokenizer, args, device_batch_size)
            orig_model.train()
            chatcore_value = core["chatcore"]
            shown = ", ".join(f"{k}: {v:.4f}" for k, v in core["results"].items())
            print0(f"Step {step:05d} | ChatCORE: {core['chatcore']} | ChatCORE_cat: {core['chatcore_cat']} | {shown}")
            wandb_run.log({"step": step, "chatcore_metric": core["chatcore"], "chatcore_cat": core["chatcore_cat"],
                           **{f"chatcore/{k}": v for k, v in core["results"].items()}})
            if master:
                append_log(ckpt.log_path, {"step": step, **core})

        if ckpt.due(step, last_step):
            ckpt.save(step, orig_model, optimizer, {
                "val_bpb": val_bpb,
                "model_config": config.__dict__,
                "user_config": user_config,
                "device_batch_size": device_batch_size,
                "max_seq_len": max_seq_len,
                "total_batch_size": total_batch_size,
                "base": {"model_tag": model_tag, "step": base_step},
                "dataloader_state_dict": trained_loader_state,
                "loop_state": {"min_val_bpb": min_val_bpb, "initial_val_bpb": initial_val_bpb,
                               "chatcore": chatcore_value, **meter.loop_state()},
            }, extra_state={"loader": trained_loader_state})
        if last_step:
            break
        ckpt.exit_if_stopping(step, wandb_run)

        # ---- one optimizer step ----
        meter.start()
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        for _ in range(grad_accum_steps):
            # mean over the supervised targets; a micro-batch with none contributes 0, not nan
            num_valid = (y >= 0).sum().clamp(min=1)
            loss = model(x, y, loss_reduction="sum") / num_valid
            loss_sum += loss.detach().float()
            scale_loss(loss / grad_accum_steps, scaler).backward()
            trained_loader_state = next_loader_state
            x, y, next_loader_state = next(train_loader)  # prefetch while the device works
        # by progress through the data, not by step: with no --num-iterations the step count is unknown
        lrm = lr_multiplier_by_progress(progress, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        momentum = muon_momentum(step, warmup=MUON_MOMENTUM_RAMP, peak=0.95)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
        if not optimizer_step(optimizer, scaler, step):
            skipped_steps += 1
        model.zero_grad(set_to_none=True)
        train_loss = meter.mean_over_ranks(loss_sum / grad_accum_steps)

        # ---- logging ----
        debiased = meter.smoothed(train_loss, step)
        done = (step + 1) / horizon if horizon else progress
        meter.log(step, done, {"loss": f"{debiased:.6f}", "lrm": f"{lrm:.2f}", "epoch": next_loader_state["epoch"]},
                  {"loss": train_loss, "smooth_loss": debiased, "lrm": lrm, "progress": progress}, total_batch_size,
                  flops_per_token * total_batch_size, horizon=horizon)
        step += 1

    total_training_time = meter.training_time
    print0(f"Total training time: {total_training_time / 60:.2f}m")
    print0(f"Minimum validation bpb: {min_val_bpb:.6f}")
    summary = {"model_tag": model_tag, "base_step": base_step, "output_tag": output_tag, "steps": step,
               "components": description, "conversations": dataset_size, "training_time_s": total_training_time,
               "initial_val_bpb": initial_val_bpb, "min_val_bpb": min_val_bpb if math.isfinite(min_val_bpb) else None,
               "final_val_bpb": val_bpb, "chatcore": chatcore_value, "checkpoint_dir": checkpoint_dir,
               "skipped_steps": skipped_steps}
    if master:
        from nanochat.report import get_report
        get_report().log(section="Chat SFT", data=[user_config, summary])
    print0(json.dumps({"chat_sft": summary}))
    wandb_run.finish()
    compute_cleanup()
    return summary


if __name__ == "__main__":
    run_main(main)
