"""Task data without the `datasets` library: local jsonl/parquet files, and the
Hugging Face parquet export downloaded once into base_dir/task_data.

    rows = load_hub_dataset("openai/gsm8k", "main", "test")     # HubDataset, lazy rows
    rows = rows.shuffle(42)                                      # same order as datasets' shuffle(seed=42)
    rows[0]                                                      # {"question": ..., "answer": ...}

`load_task_rows` is what the tasks call: the local copy when the task data dir has one,
else the hub (cached), else TaskDataMissing.
"""

import glob
import json
import os
import time

import numpy as np

from nanochat.common import NanochatError, atomic_path, get_base_dir, iter_jsonl
from nanochat.tasks.common import TaskDataMissing, get_task_data_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = "manifest.json"


class HubDataset:
    """Rows of a table, read lazily as dicts of Python values. Backed by a pyarrow Table (parquet)
    or a list of dicts (jsonl); `order` is an optional index permutation (from shuffle)."""

    def __init__(self, table=None, rows=None, order=None, source=""):
        if (table is None) == (rows is None):
            raise ValueError("HubDataset takes exactly one of table= or rows=")
        self.table, self.rows, self.order, self.source = table, rows, order, source

    def _num_rows(self):
        return self.table.num_rows if self.table is not None else len(self.rows)

    def __len__(self):
        return self._num_rows() if self.order is None else len(self.order)

    def __getitem__(self, i):
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        j = i if self.order is None else int(self.order[i])
        if self.rows is not None:
            return self.rows[j]
        return self.table.slice(j, 1).to_pylist()[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def shuffle(self, seed):
        """A shuffled view: row i is original row default_rng(seed).permutation(n)[i], the
        order `datasets.Dataset.shuffle(seed=seed)` gives, so a task's examples (and scores on a
        subset) are the same with or without that library."""
        perm = np.random.default_rng(seed).permutation(len(self))
        order = perm if self.order is None else np.asarray(self.order)[perm]
        return HubDataset(self.table, self.rows, order, self.source)

    def select(self, indices):
        base = np.arange(self._num_rows()) if self.order is None else np.asarray(self.order)
        return HubDataset(self.table, self.rows, base[np.asarray(indices, dtype=np.int64)], self.source)


# -----------------------------------------------------------------------------
# Local files


def read_parquet(paths):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in paths:
        try:
            tables.append(pq.read_table(p))
        except Exception as e:
            raise NanochatError(f"{p} is not a readable parquet file ({type(e).__name__}: {e}); "
                                f"delete it and fetch it again.") from None
    if not tables:
        raise NanochatError("no parquet files to read")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_rows_file(path):
    """A HubDataset from a jsonl / jsonl.gz / parquet file or a folder of parquet shards."""
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not shards:
            raise NanochatError(f"{path} is a folder with no .parquet files in it.")
        return HubDataset(table=read_parquet(shards), source=path)
    if path.endswith(".parquet"):
        return HubDataset(table=read_parquet([path]), source=path)
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise NanochatError(f"{path}:{lineno}: a JSON {type(row).__name__}, expected an object.")
        rows.append(row)
    return HubDataset(rows=rows, source=path)


SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", "")  # "" = a folder of parquet shards


def find_local(root, stems):
    """The first existing `root/stem{suffix}` for the given stems (paths relative to the task
    data dir, without extension), or None."""
    if not root:
        return None
    for stem in stems:
        for suffix in SPLIT_SUFFIXES:
            path = os.path.join(root, stem + suffix)
            if (suffix and os.path.isfile(path)) or (not suffix and os.path.isdir(path)):
                return path
    return None


# -----------------------------------------------------------------------------
# The Hugging Face parquet export


def hub_endpoint():
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir(repo_id, subset, split):
    return os.path.join(get_base_dir(), "task_data", repo_id.replace("/", "--"), subset, split)


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _shard_number(url):
    """Shard order: the export names shards 0.parquet, 1.parquet, ...; sort them numerically
    (not as strings, where 10 would come before 2) so rows keep the dataset's order."""
    name = url.rsplit("/", 1)[-1].split("?", 1)[0].removesuffix(".parquet")
    return (0, int(name), url) if name.isdigit() else (1, 0, url)


def _list_parquet_urls(repo_id, subset, split, attempts=3, timeout=30):
    """The export's shard URLs. A refused connection or unknown host means offline: no retry.
    Raises OSError (network) or NanochatError (the hub answered, but not with a list)."""
    import requests

    url = f"{hub_endpoint()}/api/datasets/{repo_id}/parquet/{subset}/{split}"
    for attempt in range(1, attempts + 1):
        try:
            r = requests.get(url, timeout=timeout)
            if r.status_code == 404:
                raise NanochatError(f"{url} answered 404: {repo_id} has no parquet export for subset {subset!r} "
                                    f"split {split!r}; check the names.")
            r.raise_for_status()
            urls = r.json()
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise NanochatError(f"{url} did not answer with a list of parquet URLs; "
                                    f"check the dataset, subset and split names.")
            return sorted(urls, key=_shard_number)
        except requests.ConnectionError as e:
            raise OSError(f"cannot connect to {hub_endpoint()} ({type(e).__name__})") from None
        except (requests.Timeout, requests.HTTPError, ValueError) as e:
            if attempt == attempts:
                raise OSError(f"{url} failed: {e}") from None
            time.sleep(2 ** attempt)


def _check_parquet(path):
    import pyarrow.parquet as pq

    pq.read_metadata(path)


def download_hub_dataset(repo_id, subset="default", split="train"):
    """Download the parquet export into the cache (once; other ranks wait on the lock) and
    return the cache folder. manifest.json is written last: its existence marks completion."""
    from filelock import FileLock

    from nanochat.common import download_file

    cache = hub_cache_dir(repo_id, subset, split)
    manifest = os.path.join(cache, MANIFEST)
    if os.path.exists(manifest):
        return cache
    os.makedirs(cache, exist_ok=True)
    with FileLock(os.path.join(cache, ".lock")):
        if os.path.exists(manifest):  # another rank finished while we waited
            return cache
        if _offline():
            raise OSError("HF_HUB_OFFLINE is set")
        urls = _list_parquet_urls(repo_id, subset, split)
        files = []
        for i, url in enumerate(urls):
            name = f"{i:05d}.parquet"
            try:
                download_file(url, os.path.join(cache, name), desc=f"{repo_id} {subset}/{split} {name}",
                              verify=_check_parquet)
            except NanochatError as e:
                raise OSError(str(e)) from None
            files.append(name)
        with atomic_path(manifest) as tmp, open(tmp, "w") as f:
            json.dump({"repo_id": repo_id, "subset": subset, "split": split, "urls": urls, "files": files}, f, indent=2)
    return cache


def load_hub_dataset(repo_id, subset="default", split="train"):
    """HubDataset of a Hugging Face dataset's parquet export (downloaded on first use).
    Raises OSError when the hub cannot be reached and nothing is cached."""
    cache = download_hub_dataset(repo_id, subset, split)
    with open(os.path.join(cache, MANIFEST)) as f:
        files = json.load(f)["files"]
    return HubDataset(table=read_parquet([os.path.join(cache, name) for name in files]), source=cache)


def load_task_rows(task, local_stems, repo_id, subset, split, data_dir=None):
    """Rows for a task: the first local file found under the task data dir (see the package
    docstring for the layout), else the hub export, else TaskDataMissing."""
    root = get_task_data_dir(data_dir)
    path = find_local(root, local_stems)
    if path is not None:
        return read_rows_file(path)
    try:
        return load_hub_dataset(repo_id, subset, split)
    except OSError as e:
        where = os.path.join(root or "$NANOCHAT_TASK_DATA_DIR", local_stems[0]) + ".jsonl"
        raise TaskDataMissing(f"{task} data ({repo_id} {subset}/{split}) is not available offline: put it at {where} "
                              f"(or a .parquet there; --data-dir / NANOCHAT_TASK_DATA_DIR set the folder) or connect "
                              f"to the network ({e}).") from None
