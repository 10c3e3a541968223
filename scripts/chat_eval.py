"""Evaluate a chat model (docs/evaluation.md): ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
SpellingBee, and ChatCORE over them.

    python -m scripts.chat_eval -i sft                              # all six tasks
    python -m scripts.chat_eval -i sft -a "GSM8K|HumanEval" -n 8 -t 0.8   # pass@8 with sampling
    python -m scripts.chat_eval -i sft -a ARC-Easy -x 100 --data-dir ~/task_data
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Task data comes from --data-dir (or $NANOCHAT_TASK_DATA_DIR; layout in nanochat/tasks/__init__.py),
else the Hugging Face parquet export (downloaded once). With the default task list, a task
whose data is unavailable offline is skipped with a warning (ChatCORE is then marked partial);
a task named with -a must have its data. Prints a table, ChatCORE and a final JSON line
{"chat_eval": {...}}.
"""

import argparse
import json
import os
import time

from nanochat.common import NanochatError, compute_cleanup, compute_init, print0, run_main


def parse_args(argv=None):
    from nanochat.chat_eval import ALL_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", required=True, choices=["sft", "rl", "base"], help="checkpoint source")
    p.add_argument("-a", "--task-name", default=None,
                   help=f"tasks separated by | (default: all of {'|'.join(ALL_TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@n)")
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward (categorical tasks)")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    p.add_argument("--hf-path", default=None, help="an exported model folder (scripts/export.py) to load instead of a checkpoint")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most this many problems per task")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    p.add_argument("--force-dtype", action="store_true",
                   help="keep NANOCHAT_DTYPE even on a CPU that runs it far slower than float32")
    p.add_argument("--data-dir", default=None, help="local task data (default: $NANOCHAT_TASK_DATA_DIR, else download)")
    p.add_argument("--sandbox", choices=["auto", "strict"], default=None,
                   help="strict: refuse to run model code without full isolation (default: $NANOCHAT_SANDBOX, else auto)")
    args = p.parse_args(argv)
    if args.task_name is None:
        args.tasks, args.explicit = list(ALL_TASKS), False
    else:
        args.tasks, args.explicit = [t.strip() for t in args.task_name.split("|") if t.strip()], True
    unknown = [t for t in args.tasks if t not in ALL_TASKS]
    if unknown or not args.tasks:
        raise NanochatError(f"-a {args.task_name!r}: unknown task {', '.join(unknown) or '(none)'}; "
                            f"choose from {'|'.join(ALL_TASKS)}.")
    for flag, value, low in (("-b", args.batch_size, 1), ("-n", args.num_samples, 1), ("-m", args.max_new_tokens, 1)):
        if value < low:
            raise NanochatError(f"{flag}={value} must be at least {low}.")
    if args.temperature < 0:
        raise NanochatError(f"-t={args.temperature} must be >= 0.")
    if args.num_samples > 1 and args.temperature == 0:
        print0("note: -n > 1 at temperature 0 draws the same completion n times; use -t > 0 for pass@n")
    return args


def log_report(source, data):
    from nanochat.report import get_report
    get_report().log(f"Chat evaluation {source}", data)


def main(argv=None):
    from nanochat.chat_eval import BASELINES, chatcore, chatcore_is_complete, run_chat_eval
    from nanochat.checkpoint import load_model
    from nanochat.tasks.common import TaskDataMissing

    args = parse_args(argv)
    t0 = time.time()
    if args.data_dir:
        args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model_tag = os.path.abspath(args.hf_path) if args.hf_path else args.model_tag
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=model_tag, step=args.step)
    model.eval()
    step = meta.get("step", args.step)

    engine = None
    results, missing, seconds = {}, {}, {}
    for name in args.tasks:
        if engine is None and name in ("GSM8K", "HumanEval", "SpellingBee"):
            from nanochat.engine import Engine

            engine = Engine(model, tokenizer)
        t = time.time()
        try:
            results[name] = run_chat_eval(name, model, tokenizer, engine, batch_size=args.batch_size,
                                          num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_k=args.top_k,
                                          max_problems=args.max_problems, data_dir=args.data_dir,
                                          sandbox=args.sandbox)
        except TaskDataMissing as e:
            if args.explicit:
                raise
            missing[name] = str(e)
            print0(f"warning: skipping {name}: {e}")
            continue
        seconds[name] = time.time() - t

    print0(f"\n{'task':<16}{'accuracy':>10}{'centered':>10}{'seconds':>10}")
    for name in args.tasks:
        if name in results:
            centered = (results[name] - BASELINES[name]) / (1 - BASELINES[name])
            print0(f"{name:<16}{results[name]:>10.4f}{centered:>10.4f}{seconds[name]:>10.1f}")
        else:
            print0(f"{name:<16}{'missing':>10}")
    score = chatcore(results) if results else None
    complete = chatcore_is_complete(results)
    if score is not None:
        label = "ChatCORE" if complete else f"ChatCORE (partial: {len(results)} of {len(BASELINES)} tasks)"
        print0(f"{label}: {score:.4f}")

    summary = {"source": args.source, "model_tag": args.model_tag, "step": step, "results": results,
               "chatcore": score, "chatcore_complete": complete, "missing": sorted(missing),
               "max_problems": args.max_problems, "num_samples": args.num_samples, "temperature": args.temperature,
               "seconds": time.time() - t0}
    if rank == 0:
        report = [{"source": args.source, "model_tag": args.model_tag, "step": step, "num_samples": args.num_samples,
                   "temperature": args.temperature, "max_problems": args.max_problems}, dict(results)]
        if score is not None:
            report.append({"ChatCORE metric" if complete else "ChatCORE metric (partial)": score})
        if missing:
            report.append(f"Not evaluated (no data): {', '.join(sorted(missing))}")
        log_report(args.source, report)
    print0(json.dumps({"chat_eval": summary}))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    run_main(main)
