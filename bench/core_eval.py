"""CORE evaluation speed: the original nanochat's loop (one forward per example over all its rows,
full-vocab logits and cross-entropy at every position) against nanochat's scoring, on the same
prepared examples of real tasks, in one process, with per-example results compared.

    python -m bench.core_eval                                   # CPU, 1 thread, 24 examples per task
    python -m bench.core_eval --max-per-task 64 --threads 2 --tasks copa,arc_easy
    NANOCHAT_DTYPE=bfloat16 python -m bench.core_eval           # bf16 activations (fixed at import)

Model: a fixed small GPT (depth 4, n_embd 256, seq 1024 by default) with a BPE tokenizer trained
in-process on ../shared/data/text, briefly trained on that text so its answers are not all alike.
Variants, each timed best-of-N and interleaved: `peer` (the original's loop, written here),
`plain` (ours, one forward per example), `packed` (ours, several examples per forward, longest
first), `shared` (ours, shared prompt prefix once + each row's remainder; the CPU default).
Prompt preparation (render + tokenize) is timed separately: it is the same for all.
"identical" = same correct/incorrect vector as the peer and every mean loss within --tol.
Skips (exit 0, JSON with "skipped") when ../shared/data is absent. Prints a table and a JSON line.
"""

import argparse
import glob
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
DEFAULT_TASKS = ("copa,arc_easy,arc_challenge,piqa,commonsense_qa,openbook_qa,boolq,winograd,"
                 "lambada_openai,bigbench_qa_wikidata,agi_eval_lsat_ar")


def build_tokenizer(vocab_size, max_chars=600_000):
    from nanochat.tokenizer import Tokenizer
    texts = []
    for path in sorted(glob.glob(os.path.join(DATA, "text", "*.txt"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        texts += [text[i:i + 4000] for i in range(0, len(text), 4000)]
    total, docs = 0, []
    for t in texts:
        docs.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return Tokenizer.train_from_iterator(iter(docs), vocab_size), docs


def build_model(args, tokenizer, docs):
    import torch

    from nanochat.gpt import GPT, GPTConfig
    n_head = max(1, args.n_embd // 128)
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth,
                    n_head=n_head, n_kv_head=n_head, n_embd=args.n_embd, window_pattern=args.window)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if args.train_steps > 0:  # a few AdamW steps on the text: the model has opinions, not all alike
        bos = tokenizer.get_bos_token_id()
        stream = [t for d in docs[:400] for t in tokenizer.encode(d, prepend=bos)]
        T, B = min(256, args.seq_len), 8
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(args.train_steps):
            starts = torch.randint(0, len(stream) - T - 1, (B,), generator=g).tolist()
            x = torch.tensor([stream[s:s + T] for s in starts])
            y = torch.tensor([stream[s + 1:s + T + 1] for s in starts])
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def peer_task(model, examples, task_type, pad_id):
    """The original nanochat's loop: per example, right-pad its rows with BOS, one forward, full logits,
    cross-entropy and argmax at every position, then mean loss / exact match over each span."""
    import torch
    import torch.nn.functional as F
    out = {}
    with torch.no_grad():
        for ex in examples:
            T = max(len(r) for r in ex.rows)
            ids = torch.full((len(ex.rows), T), pad_id, dtype=torch.long)
            for i, r in enumerate(ex.rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            logits = model(ids)
            B, T, V = logits.shape
            target = torch.roll(ids, shifts=-1, dims=1)
            losses = F.cross_entropy(logits.view(B * T, V), target.view(B * T), reduction="none").view(B, T)
            losses[:, -1] = float("nan")
            preds = logits.argmax(dim=-1)
            means = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(ex.starts, ex.ends))]
            if task_type == "language_modeling":
                s, e = ex.starts[0], ex.ends[0]
                ok = bool(torch.all(preds[0, s - 1:e - 1] == ids[0, s:e]).item())
            else:
                ok = min(range(len(means)), key=means.__getitem__) == ex.gold
            out[ex.index] = (ok, means)
    return out


def ours_task(model, examples, task_type, pad_id, batch_tokens, share_prefix, max_len):
    import torch

    from nanochat import core_eval as ce
    correct, details = torch.zeros(len(examples)), {}
    scorer = ce._PrefixScorer(model) if share_prefix else None
    pad_multiple = ce.PAD_MULTIPLE if batch_tokens > 0 else 1
    try:
        for batch in ce._batches(examples, batch_tokens):
            ce._score_batch(model, scorer, batch, task_type, pad_id, "cpu", max_len, pad_multiple, correct, details)
    finally:
        if scorer is not None:
            scorer.close()
    return details


def compare(ref, got, tol):
    """(same correctness vector, max |mean loss difference| over finite losses)."""
    same = all(ref[i][0] == got[i][0] for i in ref)
    diff = 0.0
    for i in ref:
        for a, b in zip(ref[i][1], got[i][1]):
            if a == a and b == b and abs(a) != float("inf"):
                diff = max(diff, abs(a - b))
    return same and diff <= tol, diff


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--max-per-task", type=int, default=24)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (best is reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024,
                   help="context; longer prompts are cropped per row, which leaves no prefix to share")
    p.add_argument("--window", default="L")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--batch-tokens", type=int, default=4096, help="budget of the `packed` variant")
    p.add_argument("--tol", type=float, default=None, help="loss tolerance (default 1e-5 fp32, 5e-2 bf16)")
    args = p.parse_args(argv)

    bundle = os.path.join(DATA, "eval_bundle")
    if not (os.path.isdir(bundle) and glob.glob(os.path.join(DATA, "text", "*.txt"))):
        print(f"skipped: {os.path.normpath(DATA)} (eval_bundle/ and text/) is absent")
        print(json.dumps({"bench": "core_eval", "skipped": True}))
        return 0

    import torch

    from nanochat import core_eval as ce
    from nanochat.common import COMPUTE_DTYPE
    torch.set_num_threads(args.threads)
    dtype = str(COMPUTE_DTYPE).replace("torch.", "")
    tol = args.tol if args.tol is not None else (1e-5 if COMPUTE_DTYPE == torch.float32 else 5e-2)
    t0 = time.perf_counter()
    tok, docs = build_tokenizer(args.vocab_size)
    model = build_model(args, tok, docs)
    print(f"setup {time.perf_counter() - t0:.1f}s | depth {args.depth} n_embd {args.n_embd} seq {args.seq_len} "
          f"vocab {tok.get_vocab_size()} | {dtype} | {args.threads} thread(s) | {args.max_per_task} ex/task")

    specs = {s.label: s for s in ce.load_bundle_tasks(bundle)[0]}
    labels = [t for t in args.tasks.split(",") if t in specs]
    pad_id, max_len = tok.get_bos_token_id(), args.seq_len
    variants = {
        "peer": lambda exs, tt: peer_task(model, exs, tt, pad_id),
        "plain": lambda exs, tt: ours_task(model, exs, tt, pad_id, 0, False, max_len),
        "packed": lambda exs, tt: ours_task(model, exs, tt, pad_id, args.batch_tokens, False, max_len),
        "shared": lambda exs, tt: ours_task(model, exs, tt, pad_id, 0, True, max_len),
    }
    rows, totals = [], {k: 0.0 for k in ["prep"] + list(variants)}
    all_identical = True
    for label in labels:
        spec = specs[label]
        data = ce.shuffle_and_truncate(ce.load_jsonl(spec.path, spec.task_type), args.max_per_task)
        best_prep, examples = float("inf"), None
        for _ in range(max(1, args.reps - 1)):
            t = time.perf_counter()
            examples = [ce.prepare_example(i, data, spec.task_type, spec.num_fewshot, spec.delimiter, tok, max_len)
                        for i in range(len(data))]
            best_prep = min(best_prep, time.perf_counter() - t)
        best, results = {k: float("inf") for k in variants}, {}
        for _ in range(args.reps):  # interleaved: each rep runs every variant once
            for name, fn in variants.items():
                t = time.perf_counter()
                results[name] = fn(examples, spec.task_type)
                best[name] = min(best[name], time.perf_counter() - t)
        checks = {name: compare(results["peer"], results[name], tol) for name in variants if name != "peer"}
        identical = all(ok for ok, _ in checks.values())
        all_identical &= identical
        tokens = sum(len(r) for ex in examples for r in ex.rows)
        cropped = sum(max(len(r) for r in ex.rows) == max_len for ex in examples)
        acc = sum(results["peer"][i][0] for i in results["peer"]) / max(1, len(examples))
        row = {"task": label, "shots": spec.num_fewshot, "examples": len(examples), "cropped": cropped, "tokens": tokens,
               "acc": acc,
               "prep_s": best_prep, **{f"{k}_s": v for k, v in best.items()},
               "max_loss_diff": max(d for _, d in checks.values()),
               "identical": {k: ok for k, (ok, _) in checks.items()}}
        rows.append(row)
        totals["prep"] += best_prep
        for k, v in best.items():
            totals[k] += v

    print(f"\n{'task':<28}{'shots':>5}{'ex':>5}{'crop':>5}{'tokens':>8}{'prep s':>8}{'peer s':>8}{'plain s':>8}"
          f"{'packed s':>9}{'shared s':>9}{'peer/shared':>12}  identical (plain/packed/shared, max |dloss|)")
    for r in rows:
        ident = "/".join("yes" if r["identical"][k] else "NO" for k in ("plain", "packed", "shared"))
        print(f"{r['task']:<28}{r['shots']:>5}{r['examples']:>5}{r['cropped']:>5}{r['tokens']:>8}{r['prep_s']:>8.3f}{r['peer_s']:>8.3f}"
              f"{r['plain_s']:>8.3f}{r['packed_s']:>9.3f}{r['shared_s']:>9.3f}{r['peer_s'] / r['shared_s']:>11.2f}x"
              f"  {ident} {r['max_loss_diff']:.1e}")
    print(f"{'total':<51}{totals['prep']:>8.3f}{totals['peer']:>8.3f}{totals['plain']:>8.3f}{totals['packed']:>9.3f}"
          f"{totals['shared']:>9.3f}{totals['peer'] / totals['shared']:>11.2f}x  {'yes' if all_identical else 'NO'}")
    print(json.dumps({"bench": "core_eval", "dtype": dtype, "threads": args.threads, "max_per_task": args.max_per_task,
                      "model": {"depth": args.depth, "n_embd": args.n_embd, "seq_len": args.seq_len,
                                "vocab": tok.get_vocab_size()},
                      "totals_s": totals, "speedup_peer_over_shared": totals["peer"] / totals["shared"],
                      "identical": all_identical, "tasks": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
