"""Evaluate a base model (docs/evaluation.md): the CORE metric, bits per byte on the train and val
splits, and a few samples.

    python -m scripts.base_eval                                   # largest base model, all three
    python -m scripts.base_eval --eval=core --max-per-task=100 --bundle-dir=/data/eval_bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model-tag=d20
    python -m scripts.base_eval --hf-path=openai-community/gpt2 --eval=core,bpb   # needs `transformers`
    python -m scripts.base_eval --hf-path=out/d20    # a nanochat export (scripts/export.py): loaded natively

Rank 0 writes the CORE table to base_dir/base_eval/base_model_{step:06d}.csv and prints a
final JSON line {"base_eval": {...}}. When the eval bundle lacks some of the 22 tasks, CORE is
the mean over the tasks present and is labelled partial everywhere it appears.
"""

import argparse
import csv
import json
import os
import time

import torch

from nanochat import core_eval
from nanochat.common import (
    NanochatError,
    atomic_path,
    compute_cleanup,
    compute_init,
    get_base_dir,
    print0,
    run_main,
)
from nanochat.hf_export import is_export

EVALS = ("core", "bpb", "sample")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    p.add_argument("--hf-path", default=None,
                   help="evaluate a Hugging Face causal LM instead (needs transformers); a nanochat export "
                        "(scripts/export.py) is loaded as a nanochat model")
    p.add_argument("-i", "--source", default="base", help="checkpoint source: base|sft|rl")
    p.add_argument("--model-tag", default=None, help="model tag (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1: all)")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb rows per forward")
    p.add_argument("--split-tokens", type=int, default=40 * 524288, help="bpb tokens per split")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (empty: autodetect)")
    p.add_argument("--force-dtype", action="store_true",
                   help="keep NANOCHAT_DTYPE even on a CPU that runs it far slower than float32")
    p.add_argument("--bundle-dir", default=None,
                   help="CORE eval bundle: unzipped directory, eval_bundle.zip or URL (default: download once)")
    p.add_argument("--core-tasks", default=None, help="comma-separated CORE task labels (default: all in the bundle)")
    p.add_argument("--core-batch-tokens", type=int, default=-1,
                   help=f"tokens per packed CORE forward (0: one full forward per example; "
                        f"-1: {core_eval.DEFAULT_BATCH_TOKENS} on CUDA, 0 elsewhere)")
    p.add_argument("--core-share-prefix", choices=("auto", "on", "off"), default="auto",
                   help="score each CORE example's unscored prompt prefix once, without the lm_head "
                        "(auto: on for nanochat models when not packing, i.e. on CPU; off: "
                        "one full forward per example)")
    p.add_argument("--data-dir", default=None, help="pretraining shards for bpb (default: base_dir/base_data)")
    args = p.parse_args(argv)
    args.evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = [e for e in args.evals if e not in EVALS]
    if unknown or not args.evals:
        raise NanochatError(f"--eval={args.eval!r}: unknown evaluation {', '.join(unknown) or '(none)'}; "
                            f"use a comma-separated subset of {','.join(EVALS)}.")
    return args


# -----------------------------------------------------------------------------
# Hugging Face models (optional)


class HFModel(torch.nn.Module):
    """A transformers causal LM behind nanochat's model interface: forward(idx) -> fp32 logits,
    forward(idx, targets, loss_reduction) -> cross-entropy; max_seq_len bounds the context."""

    def __init__(self, hf_model, max_seq_len):
        super().__init__()
        self.hf = hf_model
        self.max_seq_len = max_seq_len

    def get_device(self):
        return next(self.hf.parameters()).device

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.hf(input_ids=idx).logits.float()
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 ignore_index=-1, reduction=loss_reduction)


class HFTokenizer:
    """The slice of nanochat's Tokenizer that evaluation uses, over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise NanochatError("this Hugging Face tokenizer has neither a BOS nor an EOS token to start prompts with.")
        self.bos = bos

    def get_bos_token_id(self):
        return self.bos

    def get_vocab_size(self):
        return len(self.tok)

    def encode(self, text, prepend=None, append=None, num_threads=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return self.tok.decode(ids)

    def token_bytes(self, vocab_size):
        """UTF-8 length of each token's decoded string, 0 for special tokens so bits per byte ignores them."""
        special = set(self.tok.all_special_ids)
        return torch.tensor([0 if i in special or i >= len(self.tok) else len(self.tok.decode([i]).encode("utf-8"))
                             for i in range(vocab_size)], dtype=torch.int32)


def _import_transformers():
    from nanochat.common import require
    return require("transformers", "hf", "--hf-path")


def load_hf_model(hf_path, device):
    transformers = _import_transformers()
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
    print0(f"Loading Hugging Face model {hf_path}")
    hf = AutoModelForCausalLM.from_pretrained(hf_path).to(device).eval()
    tok = HFTokenizer(AutoTokenizer.from_pretrained(hf_path))
    cfg = hf.config
    max_seq_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
    model = HFModel(hf, max_seq_len).eval()
    token_bytes = tok.token_bytes(cfg.vocab_size).to(device)
    return model, tok, token_bytes, max_seq_len


# -----------------------------------------------------------------------------
# The three evaluations


@torch.no_grad()
def run_samples(model, tokenizer):
    """Greedy 16-token continuations of the fixed prompts and 8 unconditioned samples from BOS."""
    from scripts.base_train import SAMPLE_PROMPTS

    bos = tokenizer.get_bos_token_id()
    greedy, free = [], []
    print0("Samples (greedy):")
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=bos)
        out = list(model.generate(ids, max_tokens=16, temperature=0))
        greedy.append(tokenizer.decode(ids[1:] + out))
        print0(f"  {greedy[-1]!r}")
    print0("Samples (unconditioned, temperature 1.0):")
    for i in range(8):
        out = list(model.generate([bos], max_tokens=128, temperature=1.0, seed=42 + i))
        free.append(tokenizer.decode(out))
        print0(f"  {free[-1]!r}")
    return {"greedy": greedy, "unconditioned": free}


def run_bpb(model, tokenizer, token_bytes, args, seq_len, world_size, device):
    from nanochat.dataloader import split_batches
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as make_loader
    from nanochat.loss_eval import evaluate_bpb

    tokens_per_step = args.device_batch_size * seq_len * world_size
    budget = args.split_tokens // tokens_per_step
    if budget < 1:
        raise NanochatError(f"--split-tokens={args.split_tokens} is less than one batch ({args.device_batch_size} x "
                            f"{seq_len} x {world_size} ranks = {tokens_per_step} tokens); raise it or lower "
                            f"--device-batch-size.")
    out = {}
    for split in ("train", "val"):
        # at most one pass over the split, whatever --split-tokens asks
        steps = split_batches(tokenizer, args.device_batch_size, seq_len, split, budget, args.data_dir)
        loader = make_loader(tokenizer, args.device_batch_size, seq_len, split, device=device, data_dir=args.data_dir)
        out[split] = evaluate_bpb(model, loader, steps, token_bytes, desc=f"{split} bpb")
        print0(f"{split} bpb: {out[split]:.6f} ({steps} batches, {steps * tokens_per_step:,} tokens"
               f"{'; the whole split' if steps < budget else ''})")
    return out


def write_core_csv(path, core):
    """Task, Accuracy, Centered rows and a final CORE row (labelled partial when tasks are missing)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Task", "Accuracy", "Centered"])
        for label, acc in core["results"].items():
            w.writerow([label, f"{acc:.6f}", f"{core['centered_results'][label]:.6f}"])
        w.writerow([core_eval.core_label(core), "", f"{core['core_metric']:.6f}"])


def print_core_table(core):
    print0(f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
    for label, acc in core["results"].items():
        print0(f"{label:<35} {acc:>10.4f} {core['centered_results'][label]:>10.4f}")
    print0(f"{core_eval.core_label(core):<35} {'':>10} {core['core_metric']:>10.4f}")
    if core["partial"]:
        print0(f"note: partial CORE; missing tasks: {', '.join(core['tasks_missing'])}")


def log_report(data):
    from nanochat.report import get_report
    get_report().log("Base model evaluation", data)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    if args.hf_path and is_export(args.hf_path):  # our own export: the native model, samples and all
        args.model_tag, args.hf_path = os.path.abspath(args.hf_path), None
    if args.hf_path:
        _import_transformers()  # fail before any download
    if "core" in args.evals:  # find (or download) the bundle first: a missing one should not cost a bpb run
        args.bundle_dir = core_eval.get_eval_bundle(args.bundle_dir)

    if args.hf_path:
        model, tokenizer, token_bytes, seq_len = load_hf_model(args.hf_path, device)
        name, step = args.hf_path, None
        csv_name = args.hf_path.replace("/", "-") + ".csv"
    else:
        from nanochat.checkpoint import build_model, resolve_checkpoint
        from nanochat.tokenizer import get_token_bytes

        checkpoint_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        print0(f"Loading {args.source} model from {checkpoint_dir} at step {step}")
        model, tokenizer, meta = build_model(checkpoint_dir, step, device, "eval")
        seq_len = model.config.sequence_len
        name = f"{args.source}/{os.path.basename(checkpoint_dir)}@{step}"
        csv_name = f"base_model_{step:06d}.csv"
        token_bytes = None
        if "bpb" in args.evals and is_export(checkpoint_dir):  # an export carries its tokenizer, not token_bytes.pt
            token_bytes = tokenizer.token_bytes().to(device)
        elif "bpb" in args.evals:
            token_bytes = get_token_bytes(device=device)
    model.eval()

    summary = {"model": name, "step": step}
    report = []
    if "sample" in args.evals:
        if args.hf_path:
            print0("note: samples are for nanochat models only; skipping them")
        elif master:
            summary["samples"] = run_samples(model, tokenizer)
    if "bpb" in args.evals:
        bpb = run_bpb(model, tokenizer, token_bytes, args, seq_len, world_size, device)
        summary["train_bpb"], summary["val_bpb"] = bpb["train"], bpb["val"]
        report.append({"train bpb": bpb["train"], "val bpb": bpb["val"]})
    if "core" in args.evals:
        tasks = [t.strip() for t in args.core_tasks.split(",") if t.strip()] if args.core_tasks else None
        batch_tokens = None if args.core_batch_tokens < 0 else args.core_batch_tokens
        share_prefix = {"auto": None, "on": True, "off": False}[args.core_share_prefix]
        core = core_eval.evaluate_model(model, tokenizer, device, max_per_task=args.max_per_task,
                                        bundle_dir=args.bundle_dir, tasks=tasks, batch_tokens=batch_tokens,
                                        share_prefix=share_prefix)
        print_core_table(core)
        summary.update({"core_metric": core["core_metric"], "core_partial": core["partial"],
                        "tasks_missing": core["tasks_missing"], "results": core["results"],
                        "centered_results": core["centered_results"], "core_seconds": core["total_seconds"]})
        if master:
            csv_path = os.path.join(get_base_dir(), "base_eval", csv_name)
            write_core_csv(csv_path, core)
            summary["csv"] = csv_path
            print0(f"Wrote {csv_path}")
        report.append({core_eval.core_label(core): core["core_metric"]})
        report.append(core["centered_results"])
    if "samples" in summary:
        report.append("Samples:\n" + "\n".join(f"- {s!r}" for s in summary["samples"]["greedy"]))
    summary["seconds"] = time.time() - t0
    if master:
        log_report(report)
    print0(json.dumps({"base_eval": summary}))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    run_main(main)
