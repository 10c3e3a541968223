"""Train the BPE tokenizer on the pretraining shards, a folder of parquet shards,
or a folder of text files (.txt/.md/.jsonl), and save it under base_dir/tokenizer/.

    python -m scripts.tok_train                                   # the downloaded pretraining shards
    python -m scripts.tok_train --data-dir ~/my_text --vocab-size 4096
"""

import argparse
import glob
import json
import os
import time

from tqdm import tqdm

from nanochat.common import NanochatError, print0, run_main
from nanochat.report import get_report
from nanochat.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, get_tokenizer_dir

SANITY_TEXT = "Hello world! 12345 1,000,000 — naïve café, 你好世界, 안녕하세요, Привет 🎉🚀 <|bos|> tabs\tand\nnewlines"


def document_source(data_dir):
    """(description, iterator over documents) for the train split of data_dir (or the default shards)."""
    from nanochat import dataset

    if data_dir and not os.path.isdir(data_dir):
        raise NanochatError(f"--data-dir {data_dir} is not a directory.")
    if data_dir and not glob.glob(os.path.join(data_dir, "*.parquet")):
        return f"text files in {data_dir}", dataset.iter_text_documents(data_dir)

    def parquet_docs():
        for texts in dataset.parquets_iter_batched("train", data_dir=data_dir):
            yield from texts
    return f"parquet shards in {data_dir or 'the pretraining data dir'}", parquet_docs()


def capped(docs, max_chars, doc_cap, bar):
    """Crop each document to doc_cap characters and stop once max_chars have been yielded."""
    total = 0
    for doc in docs:
        doc = doc[:doc_cap]
        total += len(doc)
        bar.update(len(doc))
        yield doc
        if total >= max_chars:
            return


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="characters to train on")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="characters kept per document")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="including the 9 special tokens")
    parser.add_argument("--data-dir", default=None, help="parquet shards (text column) or text files; default: pretraining shards")
    parser.add_argument("--tokenizer-dir", default=None, help="where to save (default: base_dir/tokenizer)")
    args = parser.parse_args()
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise NanochatError("--max-chars and --doc-cap must be positive.")

    description, docs = document_source(args.data_dir)
    print0(f"Training a {args.vocab_size:,}-token tokenizer on up to {args.max_chars:,} characters of {description}")
    t0 = time.time()
    with tqdm(total=args.max_chars, unit="char", unit_scale=True, desc="reading") as bar:
        tokenizer = Tokenizer.train_from_iterator(capped(docs, args.max_chars, args.doc_cap, bar), args.vocab_size)
        chars = bar.n
    train_time = time.time() - t0
    print0(f"Trained on {chars:,} characters in {train_time:.2f}s")

    if tokenizer.decode(tokenizer.encode(SANITY_TEXT)) != SANITY_TEXT:
        raise AssertionError("the trained tokenizer does not round-trip its sanity text")

    out_dir = args.tokenizer_dir or get_tokenizer_dir()
    tokenizer.save(out_dir)
    tokenizer.to_huggingface_json(os.path.join(out_dir, "tokenizer.json"))
    print0(f"Saved tokenizer.pkl, token_bytes.pt and tokenizer.json to {out_dir}")

    token_bytes = tokenizer.token_bytes().float()
    regular = token_bytes[token_bytes > 0]
    sample_source, sample = "the first 1M training characters", None
    try:
        _, again = document_source(args.data_dir)
        sample = "\n".join(capped(again, 1_000_000, args.doc_cap, tqdm(disable=True)))
    except NanochatError:
        pass
    ratio = len(sample.encode("utf-8")) / max(1, len(tokenizer.encode(sample))) if sample else float("nan")
    print0(f"Compression on {sample_source}: {ratio:.3f} bytes/token; token bytes min {int(regular.min())} "
           f"max {int(regular.max())} mean {regular.mean():.3f} std {regular.std():.3f}")
    summary = {"vocab_size": args.vocab_size, "chars": chars, "train_time_s": round(train_time, 3),
               "bytes_per_token": round(ratio, 4), "tokenizer_dir": out_dir}
    get_report().log(section="Tokenizer training", data=[vars(args), summary, {
        "token_bytes_min": int(regular.min()), "token_bytes_max": int(regular.max()),
        "token_bytes_mean": regular.mean().item(), "token_bytes_std": regular.std().item()}])
    print0(json.dumps({"tok_train": summary}))


if __name__ == "__main__":
    run_main(main)
