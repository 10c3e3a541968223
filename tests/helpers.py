"""Fixtures shared by test files: a tiny corpus, tokenizer, parquet shards and a trained base
checkpoint, all built in-process in a few seconds on one CPU thread.

    from helpers import make_tiny_base_checkpoint      # pytest puts tests/ on sys.path
    info = make_tiny_base_checkpoint(os.environ["NANOCHAT_BASE_DIR"])
    model, tokenizer, meta = checkpoint.load_model("base", "cpu", "eval", model_tag=info["model_tag"])

Every function takes the base dir explicitly and writes only under it (and the data dir given).
make_tiny_base_checkpoint points NANOCHAT_BASE_DIR at `base_dir` while base_train runs and
restores the previous value afterwards; callers that load the checkpoint through
nanochat.checkpoint.load_model must have NANOCHAT_BASE_DIR set to `base_dir` themselves (the
autouse fixture in conftest.py gives each test its own, so passing os.environ["NANOCHAT_BASE_DIR"]
is the usual call).
"""

import contextlib
import io
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:  # `scripts` is not installed (only `nanochat` is): import it from the checkout
    sys.path.insert(0, str(REPO))

_SUBJECTS = ["the cat", "a dog", "the old king", "my sister", "the river", "a small bird", "the teacher", "our ship"]
_VERBS = ["sees", "likes", "follows", "paints", "remembers", "carries", "finds", "answers"]
_OBJECTS = ["the moon", "a red apple", "the green hill", "an open door", "the quiet town", "a long letter",
            "the cold sea", "a bright star"]
_ENDINGS = [".", " today.", " at night.", " again.", " in the morning.", " with care."]


def synthetic_texts(n_docs, seed=0, min_sentences=2, max_sentences=8):
    """Deterministic English-like documents from a small grammar: learnable, so the loss falls."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(min_sentences, max_sentences)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
            sentences.append(s[0].upper() + s[1:])
        docs.append(" ".join(sentences))
    return docs


def make_tokenizer(base_dir, texts=None, vocab_size=300):
    """Train a tiny BPE tokenizer on `texts` and save it to base_dir/tokenizer. Returns the Tokenizer."""
    from nanochat.tokenizer import Tokenizer

    texts = texts if texts is not None else synthetic_texts(200, seed=123)
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=vocab_size)
    tok.save(os.path.join(str(base_dir), "tokenizer"))
    return tok


def make_shards(data_dir, texts, num_train_files=2, row_group_size=16, val_docs=32):
    """Write `texts` as parquet shards: the last `val_docs` documents go to the last (val) file,
    the rest are spread over `num_train_files` train files. Returns the list of paths."""
    from nanochat.dataset import write_shard

    os.makedirs(str(data_dir), exist_ok=True)
    train, val = texts[:-val_docs], texts[-val_docs:]
    per_file = -(-len(train) // num_train_files)
    paths = []
    for i in range(num_train_files):
        path = os.path.join(str(data_dir), f"shard_{i:05d}.parquet")
        write_shard(path, train[i * per_file:(i + 1) * per_file], row_group_size)
        paths.append(path)
    path = os.path.join(str(data_dir), f"shard_{num_train_files:05d}.parquet")
    write_shard(path, val, row_group_size)
    paths.append(path)
    return paths


def make_tiny_data(base_dir, n_docs=400, seed=0, vocab_size=300):
    """Tokenizer in base_dir/tokenizer and shards in base_dir/tiny_data; returns the data dir."""
    texts = synthetic_texts(n_docs, seed=seed)
    make_tokenizer(base_dir, texts, vocab_size)
    data_dir = os.path.join(str(base_dir), "tiny_data")
    make_shards(data_dir, texts)
    return data_dir


def tiny_train_args(data_dir, depth=1, steps=6, model_tag="tiny", seq_len=64, device_batch_size=2,
                    total_batch_size=None, eval_every=-1, extra=()):
    """base_train flags for a tiny CPU run (no compile, no CORE, no samples, no MFU measurement)."""
    total_batch_size = total_batch_size or device_batch_size * seq_len
    return [
        f"--depth={depth}", "--aspect-ratio=64", "--head-dim=64", f"--max-seq-len={seq_len}", "--window-pattern=L",
        f"--device-batch-size={device_batch_size}", f"--total-batch-size={total_batch_size}",
        f"--num-iterations={steps}", "--warmup-steps=2", f"--eval-every={eval_every}",
        f"--eval-tokens={2 * device_batch_size * seq_len}", "--core-metric-every=-1", "--sample-every=-1",
        f"--model-tag={model_tag}", f"--data-dir={data_dir}", "--compile=0", "--peak-flops=1e12",
        "--device-type=cpu", *extra,
    ]


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_base_train(base_dir, argv, quiet=True):
    """scripts.base_train.main(argv) in this process with NANOCHAT_BASE_DIR=base_dir; returns its stdout."""
    from scripts import base_train

    out = io.StringIO()
    with _env(NANOCHAT_BASE_DIR=base_dir), contextlib.redirect_stdout(out if quiet else sys.stdout):
        base_train.main(list(argv))
    return out.getvalue()


def subprocess_env(base_dir, **extra):
    """The environment a test subprocess needs: its base dir, one thread, no optimizer compile, fp32."""
    env = dict(os.environ)
    env.update({"NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "NANOCHAT_COMPILE_OPTIM": "0", "NANOCHAT_DTYPE": "float32", "PYTHONPATH": str(REPO)})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_base_train_subprocess(base_dir, argv, timeout=120, **popen_kwargs):
    """python -m scripts.base_train argv in a fresh process; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *argv], cwd=REPO, env=subprocess_env(base_dir),
                          capture_output=True, text=True, timeout=timeout, **popen_kwargs)


def make_tiny_base_checkpoint(base_dir, depth=1, steps=4, model_tag="tiny", seq_len=64, vocab_size=300, extra=()):
    """Tokenizer + shards + a few base_train steps under base_dir. Returns a dict with base_dir,
    data_dir, model_tag, checkpoint_dir, step and the tokenizer dir. About 2-4 s on one thread."""
    base_dir = str(base_dir)
    data_dir = make_tiny_data(base_dir, vocab_size=vocab_size)
    run_base_train(base_dir, tiny_train_args(data_dir, depth=depth, steps=steps, model_tag=model_tag,
                                             seq_len=seq_len, extra=extra))
    return {
        "base_dir": base_dir,
        "data_dir": data_dir,
        "model_tag": model_tag,
        "checkpoint_dir": os.path.join(base_dir, "base_checkpoints", model_tag),
        "step": steps,
        "tokenizer_dir": os.path.join(base_dir, "tokenizer"),
    }
