"""Tokenizer benchmark: training time of each candidate trainer at the same vocabulary,
encode throughput of ours against tiktoken's cl100k (when it can be loaded), and
compression ratio (UTF-8 bytes per token) on held-out text.

    python -m bench.tokenizer                       # Python standard library sources
    python -m bench.tokenizer --text-dir DIR --vocab-size 8192 --max-chars 20000000

Prints one table and a final JSON line.
"""

import argparse
import glob
import json
import os
import sys
import sysconfig
import time

from nanochat.tokenizer import CONTROL_TOKENS, SPLIT_PATTERN, Tokenizer


def load_documents(text_dir, max_chars, doc_chars=4000):
    """Documents of ~doc_chars from every .txt/.py file under text_dir (sorted, deterministic)."""
    files = sorted(glob.glob(os.path.join(text_dir, "**", "*.txt"), recursive=True)
                   + glob.glob(os.path.join(text_dir, "**", "*.py"), recursive=True))
    docs, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for i in range(0, len(text), doc_chars):
            docs.append(text[i:i + doc_chars])
            total += len(docs[-1])
            if total >= max_chars:
                return docs
    return docs


def train_rustbpe(docs, vocab_size):
    return Tokenizer.train_from_iterator(iter(docs), vocab_size)


def train_hf(docs, vocab_size):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=CONTROL_TOKENS)
    tk.train_from_iterator(iter(docs), trainer)
    return tk


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-dir", default=None, help="folder of .txt/.py files (default: the Python standard library sources)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-chars", type=int, default=20_000_000, help="training text size")
    parser.add_argument("--eval-chars", type=int, default=2_000_000, help="held-out text for encode speed and compression")
    args = parser.parse_args()

    text_dir = args.text_dir or sysconfig.get_paths()["stdlib"]
    docs = load_documents(text_dir, args.max_chars + args.eval_chars)
    split, held, acc = len(docs), [], 0
    while split > 0 and acc < args.eval_chars:  # hold out the last eval_chars for evaluation
        split -= 1
        acc += len(docs[split])
    train_docs, held = docs[:split], docs[split:]
    held_text = "".join(held)
    held_bytes = len(held_text.encode("utf-8"))
    print(f"text: {text_dir}: train {sum(map(len, train_docs)):,} chars in {len(train_docs):,} docs, "
          f"held out {len(held_text):,} chars; vocab {args.vocab_size}")

    rows = []
    ours, t_rust = timed(train_rustbpe, train_docs, args.vocab_size)
    hf, t_hf = timed(train_hf, train_docs, args.vocab_size)

    def encode_speed(encode, text, repeats=3):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ids = encode(text)
            best = min(best, time.perf_counter() - t0)
        return len(ids), held_bytes / best / 1e6

    n_ours, mbs_ours = encode_speed(ours.encode, held_text)
    n_hf, mbs_hf = encode_speed(lambda t: hf.encode(t).ids, held_text)
    rows.append(("rustbpe train + tiktoken encode (ours)", t_rust, mbs_ours, held_bytes / n_ours))
    rows.append(("HF tokenizers train + encode", t_hf, mbs_hf, held_bytes / n_hf))
    try:
        import tiktoken
        cl100k = tiktoken.get_encoding("cl100k_base")
        n_cl, mbs_cl = encode_speed(cl100k.encode_ordinary, held_text)
        rows.append(("tiktoken cl100k_base (100k vocab, reference)", float("nan"), mbs_cl, held_bytes / n_cl))
    except Exception as e:  # offline: tiktoken downloads its encodings on first use
        print(f"note: tiktoken's cl100k_base is unavailable ({type(e).__name__}), so its column is left out")

    print(f"\n{'tokenizer':48s} {'train s':>9s} {'encode MB/s':>12s} {'bytes/token':>12s}")
    for name, t, mbs, ratio in rows:
        print(f"{name:48s} {t:9.2f} {mbs:12.2f} {ratio:12.3f}")
    fastest = min(t_rust, t_hf)
    best_ratio = max(r[3] for r in rows[:2])
    result = {
        "bench": "tokenizer", "vocab_size": args.vocab_size, "train_chars": sum(map(len, train_docs)),
        "train_s": {"rustbpe": round(t_rust, 3), "hf_tokenizers": round(t_hf, 3)},
        "encode_mb_s": {r[0]: round(r[2], 2) for r in rows},
        "bytes_per_token": {r[0]: round(r[3], 4) for r in rows},
        "ours_train_vs_fastest": round(t_rust / fastest, 3),
        "ours_ratio_vs_best": round(rows[0][3] / best_ratio, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
