"""The CORE metric (docs/evaluation.md): 22 in-context tasks from DCLM, scored by a base model's
losses on rendered few-shot prompts, each accuracy centered on its random baseline, averaged.

    from nanochat.core_eval import evaluate_model
    out = evaluate_model(model, tokenizer, device, max_per_task=500)   # downloads the bundle once
    out["core_metric"], out["partial"], out["tasks_missing"]

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl) is
authoritative for each task's few-shot count, type, delimiter and baseline; CORE_TASKS below is
the list of the 22 used to tell when a bundle lacks some of the 22 tasks (the result is then
labelled partial rather than refused).

Three task types:
- multiple_choice: one prompt per choice; score the tokens after the longest common token
  prefix of all choices' prompts; predicted = lowest mean loss.
- schema: one prompt per context option, all ending in the same continuation; score the longest
  common token suffix; predicted = lowest mean loss.
- language_modeling: the prompt with and without the continuation; correct iff greedy argmax
  reproduces every continuation token.

Speed (each path checked against one forward per example over the full rows, per example, in
tests/test_core_eval.py; measured by bench/core_eval.py):
- CPU default (`share_prefix`, nanochat GPTs): an example's positions before its first scored
  one are run once through the blocks only (no lm_head), into a KV cache; when the rows share
  them (multiple choice: the few-shot prompt and query) that is one batch-1 pass instead of one per
  choice. Then each row's remainder runs against a copy of the cache and only it reaches the
  lm_head. A 10-shot 4-choice example costs ~1/4 of the plain forwards (10x faster on arc_easy
  in the bench); short 0-shot tasks gain up to ~1.5x from skipping unscored positions' logits.
- CUDA default (`batch_tokens`): the rows of several examples are packed into one right-padded
  forward up to a token budget, longest examples first, to amortize per-forward overhead.
With a causal model neither padding nor the cache changes a scored position's inputs, so every
example's result equals the one-forward result up to float rounding. Only the scored positions'
logits are used for the losses. Prompts longer than the model's context are cropped from the
left, keeping the scored end (uncropped, they would outrun the model's 10x rotary cache).
"""

import csv
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import (
    COMPUTE_DTYPE,
    NanochatError,
    dist_rank_world,
    download_file,
    get_base_dir,
    is_url,
    iter_jsonl,
    logger,
    print0,
)
from nanochat.engine import KVCache

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# The 22 CORE tasks (DCLM's low-variance set): label -> (few-shot, type, delimiter,
# random baseline %). For checking a bundle only: its core.yaml / eval_meta_data.csv override these.
_MC, _SC, _LM = TASK_TYPES
CORE_TASKS = {
    "hellaswag_zeroshot": (0, _MC, " ", 25.0),
    "jeopardy": (10, _LM, "\nAnswer: ", 0.0),
    "bigbench_qa_wikidata": (10, _LM, " ", 0.0),
    "arc_easy": (10, _MC, "\nAnswer: ", 25.0),
    "arc_challenge": (10, _MC, "\nAnswer: ", 25.0),
    "copa": (0, _MC, " ", 50.0),
    "commonsense_qa": (10, _MC, " ", 20.0),
    "piqa": (10, _MC, "\nAnswer: ", 50.0),
    "openbook_qa": (0, _MC, " ", 25.0),
    "lambada_openai": (0, _LM, " ", 0.0),
    "hellaswag": (10, _MC, " ", 25.0),
    "winograd": (0, _SC, " ", 50.0),
    "winogrande": (0, _SC, " ", 50.0),
    "bigbench_dyck_languages": (10, _LM, " ", 0.0),
    "agi_eval_lsat_ar": (3, _MC, " ", 20.0),
    "bigbench_cs_algorithms": (10, _LM, " ", 0.0),
    "bigbench_operators": (10, _LM, " ", 0.0),
    "bigbench_repeat_copy_logic": (10, _LM, " ", 0.0),
    "squad": (10, _LM, " ", 0.0),
    "coqa": (0, _LM, " ", 0.0),
    "boolq": (10, _MC, "\nAnswer: ", 62.0),
    "bigbench_language_identification": (10, _MC, " ", 9.1),
}

# Tokens per packed forward (rows x padded length). On CUDA packing amortizes the per-forward launch
# overhead of small prompts; logits take rows*T*V*4 bytes (1 GiB at 8192 tokens and V=32768). On CPU
# packing gains nothing (compute-bound: bench/core_eval.py, packed ~= plain to within a few %,
# sometimes slower from padding and the big logits tensor), while sharing the prefix cuts the
# compute itself, so on CPU the default is one example at a time with share_prefix.
DEFAULT_BATCH_TOKENS = 8192
PAD_MULTIPLE = 16  # packed rows are padded to a multiple of this (fewer distinct shapes to compile)


def default_batch_tokens(device):
    return DEFAULT_BATCH_TOKENS if torch.device(device).type == "cuda" else 0


# -----------------------------------------------------------------------------
# The bundle: find, download, unzip, read


def _bundle_root(directory):
    """The folder holding core.yaml: `directory` itself or a single subfolder (the zip has one)."""
    if os.path.isfile(os.path.join(directory, "core.yaml")):
        return directory
    for name in sorted(os.listdir(directory)):
        sub = os.path.join(directory, name)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, "core.yaml")):
            return sub
    return None


def _unzip_bundle(zip_path, dest):
    """Extract zip_path so that dest/core.yaml exists, atomically (extract beside, then rename)."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".eval_bundle.", suffix=".tmp")
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise NanochatError(f"{zip_path} is not a valid zip file ({e}); delete it and retry, or pass "
                                f"--bundle-dir with an unzipped eval bundle.") from None
        root = _bundle_root(tmp)
        if root is None:
            raise NanochatError(f"{zip_path} holds no core.yaml; it is not the CORE eval bundle.")
        if os.path.exists(dest):
            raise NanochatError(f"{dest} exists but has no core.yaml (an old or broken copy); remove it and retry.")
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def get_eval_bundle(bundle=None, progress=True):
    """Directory of an unzipped eval bundle. `bundle` may be None (use base_dir/eval_bundle,
    downloading BUNDLE_URL once under a file lock), an unzipped directory, a local .zip or a URL."""
    from filelock import FileLock

    if bundle is not None and os.path.isdir(bundle):
        root = _bundle_root(bundle)
        if root is None:
            raise NanochatError(f"{bundle} has no core.yaml; point --bundle-dir at an unzipped CORE eval bundle.")
        return root
    base_dir = get_base_dir()
    dest = os.path.join(base_dir, "eval_bundle")
    if bundle is not None and not is_url(bundle) and not os.path.isfile(bundle):
        raise NanochatError(f"eval bundle {bundle} does not exist; give an unzipped directory, a .zip or a URL.")
    with FileLock(dest + ".lock"):
        if os.path.isfile(os.path.join(dest, "core.yaml")):
            return dest
        if bundle is not None and not is_url(bundle):  # a local zip
            return _unzip_bundle(bundle, dest)
        url = bundle or BUNDLE_URL
        zip_path = os.path.join(base_dir, "eval_bundle.zip")
        try:
            download_file(url, zip_path, desc="eval_bundle.zip", progress=progress,
                          verify=lambda p: zipfile.ZipFile(p).close())
        except NanochatError as e:
            raise NanochatError(f"the CORE eval bundle is not in {dest} and could not be downloaded ({e}); "
                                f"pass --bundle-dir with a local copy (directory or eval_bundle.zip) or "
                                f"connect to the network.") from None
        return _unzip_bundle(zip_path, dest)


@dataclass
class TaskSpec:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # percent
    path: str


def load_bundle_tasks(bundle_dir):
    """(tasks present, labels missing) from core.yaml + eval_meta_data.csv. A task is missing when
    it is one of the 22 but core.yaml lacks it, or its jsonl file is absent."""
    import yaml

    yaml_path = os.path.join(bundle_dir, "core.yaml")
    csv_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    try:
        with open(yaml_path) as f:
            config = yaml.safe_load(f)
        baselines = {}
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                try:  # a row we do not need may be blank; a task we need without one fails below
                    baselines[row["Eval Task"]] = float(row["Random baseline"])
                except (TypeError, ValueError):
                    pass
    except FileNotFoundError as e:
        raise NanochatError(f"the eval bundle in {bundle_dir} lacks {os.path.basename(e.filename)}; re-download it.") from None
    except (yaml.YAMLError, KeyError, ValueError) as e:
        raise NanochatError(f"the eval bundle in {bundle_dir} has a malformed core.yaml or eval_meta_data.csv "
                            f"({type(e).__name__}: {e}); re-download it.") from None
    entries = (config or {}).get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list):
        raise NanochatError(f"{yaml_path} has no `icl_tasks` list; it is not a CORE eval bundle.")
    tasks, missing = [], []
    for entry in entries:
        label = entry.get("label")
        task_type = entry.get("icl_task_type")
        if task_type not in TASK_TYPES:
            raise NanochatError(f"{yaml_path}: task {label!r} has icl_task_type {task_type!r}; expected one of {TASK_TYPES}.")
        if label not in baselines:
            raise NanochatError(f"{csv_path} has no random baseline for task {label!r}; the bundle is inconsistent.")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots
        path = os.path.join(bundle_dir, "eval_data", entry["dataset_uri"])
        if not os.path.isfile(path):
            missing.append(label)
            continue
        tasks.append(TaskSpec(label, task_type, int(shots), entry.get("continuation_delimiter", " "),
                              baselines[label], path))
    listed = {e.get("label") for e in entries}
    missing += [label for label in CORE_TASKS if label not in listed]
    return tasks, missing


_REQUIRED = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
             "language_modeling": ("context", "continuation")}


def load_jsonl(path, task_type=None):
    """Rows of a jsonl file; a bad line is reported with its file and line number."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if task_type is not None:
            lacking = [k for k in _REQUIRED[task_type] if k not in row] if isinstance(row, dict) else ["an object"]
            if lacking:
                raise NanochatError(f"{path}:{lineno}: lacks {', '.join(lacking)} for a {task_type} task.")
            options = row.get("choices", row.get("context_options"))
            if task_type != "language_modeling" and not (
                    isinstance(options, list) and options and isinstance(row["gold"], int)
                    and 0 <= row["gold"] < len(options)):
                raise NanochatError(f"{path}:{lineno}: gold must index its non-empty list of options.")
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Prompts (Jinja; few-shot blocks separated by a blank line)

_TEMPLATES = {
    "multiple_choice": (
        "{% for ex in fewshot %}{{ ex.query }}{{ delim }}{{ ex.choices[ex.gold] }}\n\n{% endfor %}"
        "{{ item.query }}{{ delim }}{{ choice }}"),
    "schema": (
        "{% for ex in fewshot %}{{ ex.context_options[ex.gold] }}{{ delim }}{{ ex.continuation }}\n\n{% endfor %}"
        "{{ context }}{{ delim }}{{ item.continuation }}"),
    "language_modeling": (
        "{% for ex in fewshot %}{{ ex.context | trim }}{{ delim }}{{ ex.continuation }}\n\n{% endfor %}"
        "{{ item.context | trim }}{{ delim }}{% if with_continuation %}{{ item.continuation }}{% endif %}"),
}
_compiled = {}


def _template(task_type):
    if task_type not in _compiled:
        import jinja2
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
        _compiled[task_type] = env.from_string(_TEMPLATES[task_type])
    return _compiled[task_type]


def render_prompts_mc(item, delimiter, fewshot=()):
    """One prompt per choice."""
    t = _template("multiple_choice")
    return [t.render(fewshot=list(fewshot), delim=delimiter, item=item, choice=c) for c in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot=()):
    """One prompt per context option, each followed by the shared continuation."""
    t = _template("schema")
    return [t.render(fewshot=list(fewshot), delim=delimiter, item=item, context=c) for c in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot=()):
    """[prompt without the continuation (stripped), prompt with it]."""
    t = _template("language_modeling")
    without = t.render(fewshot=list(fewshot), delim=delimiter, item=item, with_continuation=False).strip()
    with_ = t.render(fewshot=list(fewshot), delim=delimiter, item=item, with_continuation=True)
    return [without, with_]


# -----------------------------------------------------------------------------
# Token spans


def common_prefix_length(seqs):
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def common_suffix_length(seqs):
    n = min(len(s) for s in seqs)
    for i in range(1, n + 1):
        if any(s[-i] != seqs[0][-i] for s in seqs[1:]):
            return i - 1
    return n


def spans_mc(token_rows):
    """Score each choice from the first token where the prompts differ to its end."""
    start = common_prefix_length(token_rows)
    return [start] * len(token_rows), [len(r) for r in token_rows]


def spans_schema(token_rows):
    """Score the shared continuation: the common token suffix."""
    n = common_suffix_length(token_rows)
    return [len(r) - n for r in token_rows], [len(r) for r in token_rows]


def spans_lm(without, with_):
    """(start, end) of the continuation; `without` must be a token prefix of `with_`. When a
    tokenizer merges across the boundary it is not, and scoring starts where the two diverge."""
    if with_[:len(without)] == without:
        return len(without), len(with_), True
    return common_prefix_length([without, with_]), len(with_), False


def crop_left(tokens, start, end, max_len):
    """Keep the last max_len tokens; shift the span (start stays >= 1 so a position predicts it)."""
    cut = len(tokens) - max_len
    if cut <= 0:
        return tokens, start, end
    return tokens[cut:], max(start - cut, 1), end - cut


@dataclass
class Example:
    index: int  # position in the (shuffled, truncated) task list
    rows: list  # token lists, one per choice (one for LM)
    starts: list
    ends: list
    gold: int  # -1 for LM
    prefix_ok: bool = True


def few_shot_indices(idx, n, k):
    """random.Random(1234 + idx).sample(all other indices, k): the fixed draw that makes CORE
    scores comparable between runs and nanochat checkouts."""
    if k <= 0:
        return []
    others = [i for i in range(n) if i != idx]
    return random.Random(1234 + idx).sample(others, min(k, len(others)))


def prepare_example(idx, data, task_type, num_fewshot, delimiter, tokenizer, max_len=None):
    """Render, tokenize (BOS first), find the scored spans and crop one example."""
    item = data[idx]
    fewshot = [data[i] for i in few_shot_indices(idx, len(data), num_fewshot)]
    bos = tokenizer.get_bos_token_id()

    def encode(prompts):  # one string at a time: a batch call starts a thread pool per example
        return [tokenizer.encode(p, prepend=bos) for p in prompts]

    prefix_ok = True
    if task_type == "multiple_choice":
        rows = encode(render_prompts_mc(item, delimiter, fewshot))
        starts, ends = spans_mc(rows)
        gold = item["gold"]
    elif task_type == "schema":
        rows = encode(render_prompts_schema(item, delimiter, fewshot))
        starts, ends = spans_schema(rows)
        gold = item["gold"]
    elif task_type == "language_modeling":
        without, with_ = encode(render_prompts_lm(item, delimiter, fewshot))
        s, e, prefix_ok = spans_lm(without, with_)
        rows, starts, ends, gold = [with_], [s], [e], -1
    else:
        raise NanochatError(f"unknown CORE task type {task_type!r}; expected one of {TASK_TYPES}.")
    if max_len is not None:
        cropped = [crop_left(r, s, e, max_len) for r, s, e in zip(rows, starts, ends)]
        rows, starts, ends = (list(x) for x in zip(*cropped))
    return Example(idx, rows, starts, ends, gold, prefix_ok)


# -----------------------------------------------------------------------------
# Scoring


def model_context_length(model):
    """The longest input the model was made for: `max_seq_len` (HF wrappers) or config.sequence_len."""
    n = getattr(model, "max_seq_len", None)
    if n is None and hasattr(model, "config"):
        n = getattr(model.config, "sequence_len", None)
    return n


@torch.no_grad()
def _score_rows(model, rows, starts, ends, pad_id, device, max_len=None, pad_multiple=1, kv_cache=None):
    """One forward over right-padded rows -> (mean loss over each span, whether greedy argmax
    reproduces each span). Position t predicts token t+1, so span [s, e) reads logits [s-1, e-1).
    Only the scored positions' logits are gathered, and results cross to the host once."""
    T = max(len(r) for r in rows)
    if pad_multiple > 1 and max_len is not None:  # round up, never past the model's context
        T = max(T, min(-(-T // pad_multiple) * pad_multiple, max_len))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    row_idx, pos_idx = [], []
    for i, (r, s, e) in enumerate(zip(rows, starts, ends)):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        row_idx.extend([i] * (e - s))
        pos_idx.extend(range(s - 1, e - 1))
    ids = ids.to(device)
    row_idx = torch.tensor(row_idx, dtype=torch.long, device=device)
    pos_idx = torch.tensor(pos_idx, dtype=torch.long, device=device)
    logits = model(ids) if kv_cache is None else model(ids, kv_cache=kv_cache)
    lg = logits[row_idx, pos_idx].float()
    tgt = ids[row_idx, pos_idx + 1]
    losses = F.cross_entropy(lg, tgt, reduction="none").cpu()
    hits = (lg.argmax(dim=-1) == tgt).cpu()
    mean_losses, exact, k = [], [], 0
    for s, e in zip(starts, ends):
        # an empty span (a choice that is a prefix of another) can never win
        mean_losses.append(losses[k:k + e - s].mean().item() if e > s else float("inf"))
        exact.append(bool(hits[k:k + e - s].all()))
        k += e - s
    return mean_losses, exact


class _StopForward(Exception):
    """Raised by a hook to end a forward once the KV cache is written (the prefix pass)."""


MIN_PREFIX = 4  # with fewer unscored leading positions an example is scored in one forward


class _PrefixScorer:
    """Scores one example in two forwards of a nanochat GPT: positions [0, P) before the first
    scored one (P = min(starts) - 1) through the blocks only, stopped by a hook as soon as the last
    layer has written its keys/values (so no lm_head, no logits): once at batch 1 when all rows
    share them (MC), else for every row; then every row's remainder against a copy of that cache,
    its logits covering the scored spans and little else. A 10-shot 4-choice prompt thus costs ~1x
    its length instead of 4x, and the lm_head runs on a few positions per row instead of all.
    Causal attention makes the cached keys/values the same as in one full forward, so results
    equal the one-forward ones up to float rounding (tests/test_core_eval.py checks this). The
    hook is registered for one evaluate_task call and removed by close()."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.n_layer, self.n_kv_head, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        last = model.transformer.h[-1]
        proj = getattr(getattr(last, "attn", None), "c_proj", None)
        self.armed, self.buf = False, None
        if proj is not None:  # after the last attention call: the cache is complete
            self.handle = proj.register_forward_pre_hook(self._stop)
        else:
            self.handle = last.register_forward_hook(self._stop)

    @staticmethod
    def supports(model):
        from nanochat.gpt import GPT
        return isinstance(model, GPT)

    def _cache_tensors(self, shape, device):
        """k and v of `shape`, carved from one buffer kept across examples (a fresh large tensor per
        example costs page faults on CPU); the buffer grows to the largest example seen."""
        n = 1
        for d in shape:
            n *= d
        if self.buf is None or self.buf.numel() < 2 * n or self.buf.device != torch.device(device):
            self.buf = torch.empty(2 * n, dtype=COMPUTE_DTYPE, device=device)
        return self.buf[:n].view(shape), self.buf[n:2 * n].view(shape)

    def _stop(self, *args):
        if self.armed:
            raise _StopForward

    def close(self):
        self.handle.remove()
        self.buf = None

    @torch.no_grad()
    def score(self, rows, starts, ends, pad_id, device):
        # positions [0, P) are never read as logits (span [s, e) reads [s-1, e-1)): run them
        # without the lm_head, once if all rows share them (MC prompts), else as a batch (schema)
        P = min(starts) - 1
        if P < MIN_PREFIX:
            return _score_rows(self.model, rows, starts, ends, pad_id, device)
        shared = common_prefix_length(rows) >= P
        B, S = len(rows), max(len(r) for r in rows) - P
        k, v = self._cache_tensors((self.n_layer, B, P + S, self.n_kv_head, self.head_dim), device)
        n = 1 if shared else B
        head = KVCache.from_tensors(k[:, :n], v[:, :n])  # the prefix pass writes row 0 (or every row)
        self.armed = True
        try:
            self.model(torch.tensor([r[:P] for r in rows[:n]], dtype=torch.long, device=device), kv_cache=head)
        except _StopForward:
            pass
        finally:
            self.armed = False
        if n < B:
            k[:, n:, :P] = k[:, :n, :P]
            v[:, n:, :P] = v[:, :n, :P]
        prev = head.prev_embedding
        cache = KVCache.from_tensors(k, v, P, None if prev is None else prev.expand(B, -1, -1))
        rest = [r[P:] for r in rows]
        return _score_rows(self.model, rest, [s - P for s in starts], [e - P for e in ends], pad_id, device,
                           kv_cache=cache)


def _batches(examples, batch_tokens):
    """Pack whole examples, longest first, while rows x padded length stays within the budget
    (an example bigger than the budget goes alone). batch_tokens <= 0: one example per batch."""
    if not batch_tokens or batch_tokens <= 0:
        for ex in examples:
            yield [ex]
        return
    order = sorted(examples, key=lambda ex: -max(len(r) for r in ex.rows))
    batch, n_rows, T = [], 0, 0
    for ex in order:
        t = max(T, max(len(r) for r in ex.rows))
        if batch and (n_rows + len(ex.rows)) * t > batch_tokens:
            yield batch
            batch, n_rows, t = [], 0, max(len(r) for r in ex.rows)
        batch.append(ex)
        n_rows += len(ex.rows)
        T = t
    if batch:
        yield batch


def _score_batch(model, scorer, batch, task_type, pad_id, device, max_len, pad_multiple, correct, details):
    """Score a batch of examples (one forward, or the prefix scorer's two for a single example)
    and record each one's correctness and per-row mean losses."""
    rows = [r for ex in batch for r in ex.rows]
    starts = [s for ex in batch for s in ex.starts]
    ends = [e for ex in batch for e in ex.ends]
    if scorer is not None and len(batch) == 1:
        losses, exact = scorer.score(rows, starts, ends, pad_id, device)
    else:
        losses, exact = _score_rows(model, rows, starts, ends, pad_id, device, max_len, pad_multiple)
    k = 0
    for ex in batch:
        ex_losses, ex_exact = losses[k:k + len(ex.rows)], exact[k:k + len(ex.rows)]
        k += len(ex.rows)
        if task_type == "language_modeling":
            ok = ex_exact[0]
        else:  # lowest mean loss wins; the first on a tie (as argmin)
            ok = min(range(len(ex_losses)), key=ex_losses.__getitem__) == ex.gold
        correct[ex.index] = float(ok)
        details[ex.index] = (ok, ex_losses)


def evaluate_task(model, tokenizer, data, device, task_type, num_fewshot=0, delimiter=" ",
                  batch_tokens=None, max_len=None, progress=False, desc=None, return_details=False,
                  share_prefix=None):
    """Accuracy of `model` on `data` (already shuffled/truncated). Examples are strided over
    ranks and the correctness vector is summed across them. max_len defaults to the model's
    context. batch_tokens: the packing budget (None: default_batch_tokens(device); 0: one example
    at a time). share_prefix (with batch_tokens 0; None: on for nanochat GPTs): score each example
    as its shared prompt prefix once plus the rows' remainders (_PrefixScorer) instead of one
    forward over the full rows. return_details adds per-example correctness and mean losses (this
    rank's)."""
    from tqdm import tqdm

    rank, world = dist_rank_world()
    if max_len is None:
        max_len = model_context_length(model)
    pad_id = tokenizer.get_bos_token_id()
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(device)
    examples = [prepare_example(i, data, task_type, num_fewshot, delimiter, tokenizer, max_len)
                for i in range(rank, len(data), world)]
    if not all(ex.prefix_ok for ex in examples):
        bad = sum(not ex.prefix_ok for ex in examples)
        logger.warning(f"{desc or task_type}: in {bad} example(s) the prompt without the continuation is not a token "
                       f"prefix of the prompt with it; scoring from where they diverge")
    correct = torch.zeros(len(data), dtype=torch.float32)
    details = {}
    pad_multiple = PAD_MULTIPLE if batch_tokens > 0 else 1
    base = getattr(model, "_orig_mod", model)  # torch.compile'd: the cache pass runs eagerly
    if share_prefix is None:
        share_prefix = _PrefixScorer.supports(base)
    scorer = _PrefixScorer(base) if share_prefix and batch_tokens <= 0 else None
    bar = tqdm(total=len(examples), desc=desc, leave=False, disable=not (progress and rank == 0))
    try:
        for batch in _batches(examples, batch_tokens):
            _score_batch(model, scorer, batch, task_type, pad_id, device, max_len, pad_multiple, correct, details)
            bar.update(len(batch))
    finally:
        if scorer is not None:
            scorer.close()
    bar.close()
    if world > 1:
        correct = correct.to(device)
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    accuracy = correct.mean().item() if len(data) else float("nan")
    if return_details:
        return accuracy, details
    return accuracy


def centered_accuracy(accuracy, baseline_percent):
    """(acc - b) / (1 - b) with the baseline b given in percent: 0 = chance, 1 = perfect."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def shuffle_and_truncate(data, max_per_task):
    """Shuffle with Random(1337) first, then keep max_per_task (if > 0): every run scores the same
    subset, so CORE at a given max_per_task compares across runs."""
    data = list(data)
    random.Random(1337).shuffle(data)
    if max_per_task is not None and max_per_task > 0:
        data = data[:max_per_task]
    return data


def evaluate_model(model, tokenizer, device, max_per_task=-1, bundle_dir=None, tasks=None,
                   batch_tokens=None, max_len=None, progress=True, share_prefix=None):
    """CORE of a model. `bundle_dir`: None (download once to base_dir/eval_bundle), a directory,
    a .zip or a URL. `tasks`: optional subset of labels. `max_len`: crop prompts to this many tokens
    (default: the model's context, so no position is scored beyond what the model was trained on). `batch_tokens`, `share_prefix`: see
    evaluate_task (defaults: packing on CUDA, shared prefix on CPU). Returns {results, centered_results,
    core_metric, partial, tasks_missing, tasks_evaluated, num_examples, seconds}; core_metric is the
    mean centered accuracy over the tasks evaluated, and `partial` says it is not over all 22."""
    bundle = get_eval_bundle(bundle_dir, progress=progress)
    specs, missing = load_bundle_tasks(bundle)
    if tasks is not None:
        known = {s.label for s in specs} | set(missing) | set(CORE_TASKS)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise NanochatError(f"unknown CORE task(s) {', '.join(unknown)}; known tasks: {', '.join(sorted(known))}.")
        missing_asked = [t for t in tasks if t not in {s.label for s in specs}]
        if missing_asked:
            raise NanochatError(f"CORE task(s) {', '.join(missing_asked)} are not in the eval bundle at {bundle}; "
                                f"use the full bundle (drop --bundle-dir to download it).")
        specs = [s for s in specs if s.label in tasks]
    if missing:
        print0(f"note: {len(missing)} CORE task(s) absent from the eval bundle ({', '.join(missing)}); "
               f"the CORE metric will be partial")
    was_training = model.training
    model.eval()
    results, centered, counts, seconds = {}, {}, {}, {}
    t_all = time.time()
    for spec in specs:
        t0 = time.time()
        data = shuffle_and_truncate(load_jsonl(spec.path, spec.task_type), max_per_task)
        acc = evaluate_task(model, tokenizer, data, device, spec.task_type, spec.num_fewshot, spec.delimiter,
                            batch_tokens=batch_tokens, max_len=max_len, progress=progress, desc=spec.label,
                            share_prefix=share_prefix)
        results[spec.label] = acc
        centered[spec.label] = centered_accuracy(acc, spec.baseline)
        counts[spec.label] = len(data)
        seconds[spec.label] = time.time() - t0
        print0(f"{spec.label:<35} ({spec.num_fewshot:>2}-shot, {len(data):>5} ex): accuracy {acc:.4f} | "
               f"centered {centered[spec.label]:+.4f} | {seconds[spec.label]:.1f}s")
    if was_training:
        model.train()
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    all_labels = set(CORE_TASKS) | {s.label for s in specs}
    tasks_missing = sorted(all_labels - set(results))
    return {
        "results": results,
        "centered_results": centered,
        "core_metric": core,
        "partial": bool(tasks_missing),
        "tasks_missing": tasks_missing,
        "tasks_evaluated": list(results),
        "num_examples": counts,
        "seconds": seconds,
        "total_seconds": time.time() - t_all,
        "bundle_dir": bundle,
    }


def core_label(out):
    """'CORE' or 'CORE (partial: 18/22 tasks)' for tables and CSVs."""
    if not out["partial"]:
        return "CORE"
    n = len(out["tasks_evaluated"])
    return f"CORE (partial: {n}/{n + len(out['tasks_missing'])} tasks)"
