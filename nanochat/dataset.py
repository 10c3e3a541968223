"""Pretraining text shards: where they live, which file belongs to which split,
reading them one row group at a time, downloading them, and building them from your own text.

A data dir is any folder of parquet files with a `text` column (one document per row). Files
are taken in name order, `.tmp` files are ignored, and the **last file is the val split**; all
the others are train. The folder is, in order of precedence: the `data_dir` argument (the
scripts' `--data-dir`), `$NANOCHAT_DATA_DIR`, `base_dir/base_data_climbmix/` (ClimbMix-400B,
what runs train on by default), `base_dir/base_data/` (legacy FineWeb-Edu, with an upgrade banner).

    python -m nanochat.dataset -n 8 -w 4                   # first 8 ClimbMix train shards + the val shard
    python -m nanochat.dataset -n 2 --base-url DIR_OR_URL  # from a mirror, a local folder or file:// URL
    python -m nanochat.dataset --from-text ~/my_text --out ~/my_shards   # .txt/.md/.jsonl -> shards
"""

import argparse
import glob
import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction

from nanochat.common import (
    NanochatError,
    atomic_path,
    download_file,
    get_base_dir,
    is_url,
    iter_jsonl,
    print0,
    run_main,
)

# -----------------------------------------------------------------------------
# Where the data lives

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # shards 0..6542; the last one is the val shard
DATA_DIRNAME = "base_data_climbmix"
LEGACY_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
LEGACY_MAX_SHARD = 1822
LEGACY_DIRNAME = "base_data"

ROW_GROUP_SIZE = 1024  # documents per row group, as in the published ClimbMix shards
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
DEFAULT_DOC_CHARS = 2000  # converter: ~500 tokens per document, so rows of T=2048 pack several


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def default_data_dir():
    """$NANOCHAT_DATA_DIR, else base_dir/base_data_climbmix (whether or not it exists yet)."""
    return os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(get_base_dir(), DATA_DIRNAME)


def resolve_data_dir(data_dir=None, warn_on_legacy=False):
    """The folder to read shards from: the argument, $NANOCHAT_DATA_DIR, the ClimbMix dir, or the
    legacy FineWeb-Edu dir when only that one exists."""
    if data_dir:
        if not os.path.isdir(data_dir):
            raise NanochatError(f"data dir {data_dir} does not exist; pass a folder of parquet shards.")
        return data_dir
    if os.environ.get("NANOCHAT_DATA_DIR"):
        data_dir = os.environ["NANOCHAT_DATA_DIR"]
        if not os.path.isdir(data_dir):
            raise NanochatError(f"NANOCHAT_DATA_DIR={data_dir} does not exist; point it at a folder of parquet shards.")
        return data_dir
    base = get_base_dir()
    climbmix, legacy = os.path.join(base, DATA_DIRNAME), os.path.join(base, LEGACY_DIRNAME)
    if not os.path.isdir(climbmix) and os.path.isdir(legacy):
        if warn_on_legacy:
            print0("=" * 80 + f"\nUsing the legacy FineWeb-Edu shards in {legacy}.\nnanochat now trains on "
                   "ClimbMix-400B; get it with `python -m nanochat.dataset -n 170` (and delete the old dir).\n" + "=" * 80)
        return legacy
    if not os.path.isdir(climbmix):
        raise NanochatError(f"no pretraining shards in {climbmix}; download some with `python -m nanochat.dataset -n 8` "
                            f"or point --data-dir / NANOCHAT_DATA_DIR at a folder of parquet files.")
    return climbmix


def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """Full paths of the parquet files of the data dir, sorted by name (`.tmp` files ignored)."""
    data_dir = resolve_data_dir(data_dir, warn_on_legacy)
    names = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet") and not f.endswith(".tmp"))
    if not names:
        raise NanochatError(f"{data_dir} holds no .parquet files; download shards with `python -m nanochat.dataset` "
                            f"or convert text with `python -m nanochat.dataset --from-text DIR`.")
    return [os.path.join(data_dir, f) for f in names]


def split_parquet_files(split, data_dir=None, warn_on_legacy=False):
    """The files of one split: the last file is val, all others train."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    paths = list_parquet_files(data_dir, warn_on_legacy)
    if len(paths) < 2:
        raise NanochatError(f"{os.path.dirname(paths[0])} holds only {len(paths)} parquet file; at least 2 are needed "
                            f"(the last one is the val split): download or convert more data.")
    return paths[:-1] if split == "train" else paths[-1:]


# -----------------------------------------------------------------------------
# Reading


def open_parquet(path):
    """pyarrow ParquetFile of a shard; NanochatError naming the file if it is corrupt or has no `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise NanochatError(f"{path} is not a readable parquet file ({e}); delete it and download or convert it again.") from e
    if "text" not in pf.schema_arrow.names:
        raise NanochatError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); shards need one document per row in 'text'.")
    return pf


def read_row_group_texts(pf, path, rg_idx):
    """The documents of one row group as a list of str (a null counts as an empty document)."""
    import pyarrow as pa

    try:
        texts = pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise NanochatError(f"{path} is corrupt (row group {rg_idx}: {e}); delete it and download or convert it again.") from e
    return [t if t is not None else "" for t in texts]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the `text` list of every row group of the split, row groups start, start+step, ...
    of each file in order (tokenizer training and evaluation use this)."""
    for path in split_parquet_files(split, data_dir):
        pf = open_parquet(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield read_row_group_texts(pf, path, rg_idx)


def verify_parquet(path):
    """Raise ValueError unless `path` is a parquet file whose `text` column reads in full."""
    try:
        pf = open_parquet(path)
        for rg_idx in range(pf.num_row_groups):  # one row group at a time: bounded memory
            read_row_group_texts(pf, path, rg_idx)
    except NanochatError as e:
        raise ValueError(str(e)) from e


# -----------------------------------------------------------------------------
# Downloading: resumable, retried after 2/4/8/16 s, atomic, verified, several files in parallel


def _source(base_url, name):
    return f"{base_url.rstrip('/')}/{name}" if is_url(base_url) else os.path.join(base_url, name)


def download_shards(num_files=-1, num_workers=4, base_url=None, data_dir=None, max_shard=MAX_SHARD):
    """Download the first `num_files` train shards (-1: all) and always the val shard `max_shard`,
    `num_workers` at a time. Files already present are skipped, so re-running resumes. Every file is
    checked to be a readable parquet with a `text` column before it is renamed into place; a bad
    download is retried. Returns (shards present, shards wanted); NanochatError if any failed."""
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or BASE_URL
    out_dir = data_dir or default_data_dir()
    if num_workers < 1:
        raise NanochatError(f"-w/--num-workers must be at least 1, not {num_workers}.")
    os.makedirs(out_dir, exist_ok=True)
    num_train = max_shard if num_files < 0 else min(num_files, max_shard)
    names = [shard_filename(i) for i in [*range(num_train), max_shard]]
    todo = [n for n in names if not os.path.exists(os.path.join(out_dir, n))]
    print0(f"Downloading {len(todo)} of {len(names)} shards from {base_url} to {out_dir} with {num_workers} workers "
           f"({len(names) - len(todo)} already present)")

    from tqdm import tqdm

    errors = {}
    pool = ThreadPoolExecutor(max_workers=num_workers)  # I/O bound; pyarrow's checks release the GIL
    try:
        futures = {pool.submit(download_file, _source(base_url, n), os.path.join(out_dir, n), progress=False,
                               verify=verify_parquet): n for n in todo}
        with tqdm(total=len(names), initial=len(names) - len(todo), unit="shard", desc="shards") as bar:
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as e:  # report every failure at the end, keep the others going
                    errors[futures[future]] = e
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    ok = len(names) - len(errors)
    print0(f"Done! Downloaded: {ok}/{len(names)} shards to {out_dir}")
    if errors:
        name, error = sorted(errors.items())[0]
        raise NanochatError(f"{len(errors)} of {len(names)} shards could not be downloaded (first, {name}: {error}); "
                            f"fix the cause and run the same command again to resume.")
    return ok, len(names)


# -----------------------------------------------------------------------------
# Converting a folder of text into shards


def split_document(text, max_chars):
    """Cut a document into pieces of at most `max_chars` characters, at line breaks where possible
    (a longer line is cut at its last space in the second half of the limit, else hard). Pieces are
    stripped of surrounding whitespace and empty ones dropped; max_chars <= 0 keeps it whole."""
    text = text.strip()
    if not text:
        return []
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append(current)
                current = ""
            cut = line.rfind(" ", max_chars // 2, max_chars) + 1 or max_chars
            pieces.append(line[:cut])
            line = line[cut:]
        if len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


def list_text_files(src_dir):
    """The .txt/.md/.jsonl files under src_dir (recursively), sorted by relative path."""
    if not os.path.isdir(src_dir):
        raise NanochatError(f"{src_dir} is not a directory; pass a folder of .txt, .md or .jsonl files.")
    files = sorted(p for p in glob.glob(os.path.join(src_dir, "**", "*"), recursive=True)
                   if p.lower().endswith(TEXT_SUFFIXES) and os.path.isfile(p))
    if not files:
        raise NanochatError(f"{src_dir} holds no .txt, .md or .jsonl files; put your text there first.")
    return files


def _file_texts(path):
    """The raw documents of one file: the whole file for .txt/.md, each line's `text` for .jsonl."""
    if not path.lower().endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:  # a stray bad byte becomes U+FFFD
            yield f.read()
        return
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise NanochatError(f"{path}:{lineno}: no string 'text' field; every .jsonl line needs one.")
        yield record["text"]


def iter_text_documents(src_dir, doc_chars=DEFAULT_DOC_CHARS, files=None, progress=None):
    """Documents from a folder of .txt/.md/.jsonl files in sorted file order, each cut into pieces
    of at most doc_chars characters by split_document (0: no cutting)."""
    for path in files or list_text_files(src_dir):
        for text in _file_texts(path):
            yield from split_document(text, doc_chars)
        if progress is not None:
            progress.update(1)


def write_shard(path, texts, row_group_size=ROW_GROUP_SIZE):
    """Write documents as a parquet shard laid out as the published shards are (`text` column,
    zstd 3, no dictionary, no statistics), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", compression_level=3,
                       use_dictionary=False, write_statistics=False)


def convert_text_dir(src_dir, out_dir, val_fraction=0.05, doc_chars=DEFAULT_DOC_CHARS, shard_rows=32 * ROW_GROUP_SIZE,
                     row_group_size=ROW_GROUP_SIZE, overwrite=False):
    """Turn a folder of .txt/.md/.jsonl files into parquet shards a loader can read.

    Documents come in sorted file order (see iter_text_documents). The val split takes an evenly
    spaced `val_fraction` of them: document i (from 0) is val when floor((i+1)·f) > floor(i·f), so
    every part of the corpus is represented; if that picks none, the last document is val. Train
    documents fill shard_00000.parquet, shard_00001.parquet, ... of `shard_rows` rows each, and the
    val documents go to the next (last) shard, so the split rule "last file = val" holds. Returns
    {"train_shards", "train_docs", "val_docs", "out_dir"}."""
    from tqdm import tqdm

    f = Fraction(str(val_fraction))
    if not 0 < f < 1:
        raise NanochatError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}.")
    if shard_rows < 1 or row_group_size < 1:
        raise NanochatError("--shard-rows and the row group size must be positive.")
    files = list_text_files(src_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(out_dir, "*.parquet")))
    if existing and not overwrite:
        raise NanochatError(f"{out_dir} already holds {len(existing)} parquet files; pick an empty --out "
                            f"or pass --overwrite to replace them.")

    written, train, val, num_train_docs = [], [], [], 0

    def flush_train():
        path = os.path.join(out_dir, shard_filename(len(written)))
        write_shard(path, train, row_group_size)
        written.append(path)
        train.clear()

    with tqdm(total=len(files), unit="file", desc="converting") as bar:
        docs = iter_text_documents(src_dir, doc_chars, files=files, progress=bar)
        doc = next(docs, None)
        i = 0
        while doc is not None:
            following = next(docs, None)  # one document of lookahead: the last one may have to be val
            if math.floor(f * (i + 1)) > math.floor(f * i) or (following is None and not val):
                val.append(doc)
            else:
                train.append(doc)
                num_train_docs += 1
                if len(train) == shard_rows:
                    flush_train()
            doc, i = following, i + 1
            if i % 1000 == 0:
                bar.set_postfix(docs=i, refresh=False)
    if train:
        flush_train()
    if not written:
        raise NanochatError(f"{src_dir} yields {len(val)} document(s) but a train and a val split need at least 2; add more text.")
    val_path = os.path.join(out_dir, shard_filename(len(written)))
    write_shard(val_path, val, row_group_size)
    written.append(val_path)
    for stale in set(existing) - set(written):  # --overwrite: only this run's shards may remain
        os.remove(stale)
    return {"train_shards": len(written) - 1, "train_docs": num_train_docs, "val_docs": len(val), "out_dir": out_dir}


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="train shards to download (-1: all); the val shard always comes too")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=None, help=f"where shard_XXXXX.parquet files live: URL, file:// URL or local folder "
                        f"(default: $NANOCHAT_DATA_URL or {BASE_URL})")
    parser.add_argument("--max-shard", type=int, default=MAX_SHARD, help="index of the last (val) shard at --base-url")
    parser.add_argument("--data-dir", default=None, help="where to put downloads (default: $NANOCHAT_DATA_DIR or base_dir/base_data_climbmix)")
    parser.add_argument("--from-text", metavar="DIR", default=None, help="convert a folder of .txt/.md/.jsonl files instead of downloading")
    parser.add_argument("--out", default=None, help="--from-text output folder (default: base_dir/base_data_text)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="--from-text: evenly spaced share of documents for val")
    parser.add_argument("--doc-chars", type=int, default=DEFAULT_DOC_CHARS, help="--from-text: cut documents at line breaks to at most this many characters (0: never)")
    parser.add_argument("--shard-rows", type=int, default=32 * ROW_GROUP_SIZE, help="--from-text: documents per train shard")
    parser.add_argument("--overwrite", action="store_true", help="--from-text: replace parquet files already in --out")
    args = parser.parse_args(argv)

    if args.from_text:
        out_dir = args.out or os.path.join(get_base_dir(), "base_data_text")
        stats = convert_text_dir(args.from_text, out_dir, args.val_fraction, args.doc_chars, args.shard_rows,
                                 overwrite=args.overwrite)
        print0(f"Done! Wrote {stats['train_shards']} train shard(s) with {stats['train_docs']:,} documents and 1 val shard "
               f"with {stats['val_docs']:,} documents to {out_dir}; train on them with --data-dir {out_dir}")
        return
    download_shards(args.num_files, args.num_workers, args.base_url, args.data_dir, args.max_shard)


if __name__ == "__main__":
    run_main(main)
