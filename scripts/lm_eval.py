"""Evaluate a nanochat model with EleutherAI's lm-evaluation-harness.

    python -m scripts.lm_eval -i base --tasks hellaswag,arc_easy --limit 500
    python -m scripts.lm_eval -i sft -g d20 --tasks gsm8k --num-fewshot 5 --batch-size 16
    python -m scripts.lm_eval --hf-path out/d20 --tasks my_task --include-path my_tasks/

Chat models (sft, rl) see each request in the chat format (--chat-template auto: on for sft/rl,
off for base). Results go to base_dir/lm_eval/<source>_<tag>_step<step>.json (--output to change)
and to the report ("lm-eval <source>" section); the last line printed is {"lm_eval": {...}}.
The same numbers from the exported model with the harness's own backend:
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks hellaswag
Needs the [eval] extra (lm-eval). Tasks the harness downloads need the network once.
"""

import argparse
import json
import os
import time

from nanochat.common import NanochatError, atomic_path, autodetect_device_type, get_base_dir, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="base", choices=["base", "sft", "rl"], help="which checkpoints to load")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--hf-path", default=None, help="an exported model folder (scripts/export.py) instead of a checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward when scoring")
    p.add_argument("--max-gen-toks", type=int, default=256, help="longest generation when a task sets none")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="render requests in the chat format (auto: on for sft and rl)")
    p.add_argument("--include-path", default=None, help="a folder with task YAMLs of your own")
    p.add_argument("--log-samples", action="store_true", help="keep every request and answer in the JSON")
    p.add_argument("--output", default=None, help="results JSON (default: base_dir/lm_eval/<model>.json)")
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise NanochatError("--tasks is empty; name at least one lm-eval task, e.g. --tasks hellaswag.")
    if args.batch_size < 1:
        raise NanochatError(f"--batch-size must be at least 1, not {args.batch_size}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    from nanochat.common import require

    require("lm_eval", "eval", "scripts.lm_eval")  # before loading a model
    import torch
    from lm_eval.utils import make_table

    from nanochat.checkpoint import load_model
    from nanochat.lm_harness import NanochatLM, run, summarize
    from nanochat.report import get_report

    t0 = time.time()
    device = torch.device(args.device_type or autodetect_device_type())
    model_tag = os.path.abspath(args.hf_path) if args.hf_path else args.model_tag
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=model_tag, step=args.step)
    source = (meta.get("source") or args.source) if args.hf_path else args.source
    chat = {"on": True, "off": False, "auto": source in ("sft", "rl")}[args.chat_template]
    tag = os.path.basename(os.path.normpath(model_tag)) if model_tag else meta.get("model_tag") or "model"
    step = meta.get("step")
    lm = NanochatLM(model, tokenizer, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    results = run(lm, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                  chat=chat, log_samples=args.log_samples)
    print(make_table(results))
    scores = summarize(results)
    name = f"{source}_{tag}_step{step}" if step is not None else f"{source}_{tag}"
    out = args.output or os.path.join(get_base_dir(), "lm_eval", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    record = {"model": {"source": source, "model_tag": tag, "step": step, "hf_path": args.hf_path},
              "settings": {"tasks": args.tasks, "num_fewshot": args.num_fewshot, "limit": args.limit,
                           "chat_template": chat, "batch_size": args.batch_size},
              "scores": scores, **results}
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    print(f"Wrote {out}")
    get_report().log(f"lm-eval {source}", [record["model"], record["settings"], *[{task: values} for task, values
                                                                                  in scores.items()]])
    summary = {"model": record["model"], "scores": scores, "output": out, "seconds": round(time.time() - t0, 1)}
    print(json.dumps({"lm_eval": summary}))
    return summary


if __name__ == "__main__":
    run_main(main)
