"""Chat evaluation (docs/evaluation.md): the loops that score a chat model on a task, and ChatCORE.
scripts/chat_eval.py is the command line; scripts/chat_sft.py calls run_chat_eval during training.

- categorical tasks (ARC, MMLU): one batched forward per batch of prompts; the answer is the
  allowed letter with the largest logit at the last prompt position (<|assistant_start|>);
- generative tasks (GSM8K, HumanEval, SpellingBee): the Engine samples `num_samples`
  completions per problem; a problem passes when any of them passes (pass@k).

Work is strided over ranks (batch b or problem i goes to rank b % world_size) and the pass /
total counts are summed across ranks, so every rank returns the same accuracy.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import NanochatError, dist_rank_world, is_ddp_initialized, logger

# ChatCORE's six tasks with their random-guess baselines (docs/evaluation.md)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
ALL_TASKS = list(BASELINES)


def make_task(task_name, data_dir=None):
    """The evaluation split of one of ALL_TASKS."""
    from nanochat.tasks.arc import ARC
    from nanochat.tasks.gsm8k import GSM8K
    from nanochat.tasks.humaneval import HumanEval
    from nanochat.tasks.mmlu import MMLU
    from nanochat.tasks.spellingbee import SpellingBee

    factories = {
        "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="test", data_dir=data_dir),
        "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="test", data_dir=data_dir),
        "MMLU": lambda: MMLU(subset="all", split="test", data_dir=data_dir),
        "GSM8K": lambda: GSM8K(subset="main", split="test", data_dir=data_dir),
        "HumanEval": lambda: HumanEval(data_dir=data_dir),
        "SpellingBee": lambda: SpellingBee(size=256, split="test", data_dir=data_dir),
    }
    if task_name not in factories:
        raise NanochatError(f"unknown chat eval task {task_name!r}; choose from {'|'.join(ALL_TASKS)}.")
    return factories[task_name]()


def _sum_across_ranks(passed, total, device):
    if not is_ddp_initialized():
        return passed, total
    t = torch.tensor([passed, total], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t[0]), int(t[1])


def _num_problems(task, max_problems):
    n = len(task)
    return n if max_problems is None or max_problems < 0 else min(n, max_problems)


def _progress(iterable, total, desc, rank):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=rank != 0)


def letter_token_ids(tokenizer, letters, cache=None):
    """The token id of each answer letter, encoded without a leading space (the way it follows
    "=" in the prompt). A letter that is not one token cannot be scored by one logit: error."""
    key = tuple(letters)
    if cache is not None and key in cache:
        return cache[key]
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise NanochatError(f"the answer letter {letter!r} encodes to {len(encoded)} tokens with this tokenizer, "
                                f"not 1; categorical evaluation needs single-token letters.")
        ids.append(encoded[0])
    if cache is not None:
        cache[key] = ids
    return ids


@torch.inference_mode()
def run_categorical_eval(task, tokenizer, model, batch_size, max_problems=None, return_counts=False):
    """Accuracy of `model` on a categorical task (batches strided over ranks). With
    return_counts, (passed, total) instead."""
    rank, world = dist_rank_world()
    device = model.get_device()
    bos = tokenizer.get_bos_token_id()
    n = _num_problems(task, max_problems)
    num_batches = math.ceil(n / batch_size)
    letter_cache = {}
    passed = total = 0
    batches = range(rank, num_batches, world)
    for b in _progress(batches, len(batches), f"{type(task).__name__}", rank):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [bos] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V); right padding never affects earlier positions (causal)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            letter_ids = letter_token_ids(tokenizer, letters, letter_cache)
            scores = logits[row, len(prompt) - 1, letter_ids]
            predicted = letters[int(scores.argmax())]
            passed += int(task.evaluate(conversation, predicted))
            total += 1
    passed, total = _sum_across_ranks(passed, total, device)
    if return_counts:
        return passed, total
    return passed / total if total else 0.0


def run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, return_counts=False):
    """pass@num_samples of a generative task: problems strided over ranks, each sampled with
    engine.generate_batch; a problem passes when any completion passes task.evaluate. With
    return_counts, (passed, total) instead."""
    rank, world = dist_rank_world()
    device = model.get_device()
    n = _num_problems(task, max_problems)
    context = getattr(getattr(model, "config", None), "sequence_len", None)
    passed = total = too_long = 0
    problems = range(rank, n, world)
    bar = _progress(problems, len(problems), f"{type(task).__name__}", rank)
    for i in bar:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        if context is not None and len(prompt) >= context:  # no room to answer: a failure, not a crash
            too_long += 1
            total += 1
            continue
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        outcomes = [task.evaluate(conversation, c) for c in completions]
        passed += int(any(outcomes))
        total += 1
        bar.set_postfix_str(f"{passed}/{total}")
    if too_long:
        logger.warning(f"{type(task).__name__}: {too_long} prompts on rank {rank} do not fit the model's context of "
                       f"{context} tokens; they count as failed")
    passed, total = _sum_across_ranks(passed, total, device)
    if return_counts:
        return passed, total
    return passed / total if total else 0.0


def _make_task_on_every_rank(task_name, data_dir, device):
    """make_task, with the ranks agreeing on whether the data is there: a rank that alone
    lacked it would skip the count all-reduce its peers enter (a hang, or counts summed with
    the next task's), so when any rank lacks it every rank raises TaskDataMissing."""
    from nanochat.tasks.common import TaskDataMissing

    try:
        task, missing = make_task(task_name, data_dir), None
    except TaskDataMissing as e:
        task, missing = None, e
    if is_ddp_initialized():
        flag = torch.tensor([0 if missing else 1], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if missing is None and int(flag[0]) == 0:
            missing = TaskDataMissing(f"{task_name} data is missing on another rank; give every rank the same task data.")
    if missing is not None:
        raise missing
    return task


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, data_dir=None, sandbox=None):
    """Accuracy on one of ALL_TASKS (its test split). Raises TaskDataMissing when the task's
    data is neither local nor downloadable; engine may be None for categorical tasks. sandbox:
    "strict" or "auto" for code tasks (default: $NANOCHAT_SANDBOX)."""
    task = _make_task_on_every_rank(task_name, data_dir, model.get_device())
    if getattr(task, "executes_code", False):
        from nanochat.execution import check_sandbox

        check_sandbox(sandbox)  # a sandbox that cannot start would score every answer 0: fail loudly instead
    if task.eval_type == "categorical":
        passed, total = run_categorical_eval(task, tokenizer, model, batch_size, max_problems, return_counts=True)
    elif task.eval_type == "generative":
        if engine is None:
            raise NanochatError(f"{task_name} is generative and needs an Engine; pass one to run_chat_eval.")
        passed, total = run_generative_eval(task, tokenizer, model, engine, num_samples, max_new_tokens, temperature,
                                            top_k, max_problems, return_counts=True)
    else:
        raise NanochatError(f"{task_name} has eval type {task.eval_type!r}; it cannot be evaluated.")
    accuracy = passed / total if total else 0.0
    if dist_rank_world()[0] == 0:
        logger.info(f"{task_name}: {passed}/{total} = {100 * accuracy:.2f}%")
    return accuracy


def chatcore(results):
    """Mean over the evaluated tasks of (accuracy - baseline) / (1 - baseline). Tasks not in
    BASELINES are ignored; nan when none is known. It is the ChatCORE metric only when every
    task of ALL_TASKS was evaluated (chatcore_is_complete); otherwise a partial mean."""
    centered = [(acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in results.items() if name in BASELINES]
    return sum(centered) / len(centered) if centered else float("nan")


def chatcore_is_complete(results):
    """Whether results covers every ChatCORE task (so chatcore(results) is the full metric)."""
    return all(name in results for name in ALL_TASKS)
