"""CORE evaluation: prompt rendering, token spans, centering, the bundle reader,
stub models with known answers, packed-vs-unpacked equality and left cropping on a tiny GPT,
and an integration run on the real eval bundle when ../shared/data is present."""

import csv
import json
import os
import random

import pytest
import torch

from nanochat import core_eval as ce
from nanochat.common import NanochatError

REAL_BUNDLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "eval_bundle")


# -----------------------------------------------------------------------------
# A character-level tokenizer and stub models with exactly known behaviour

class CharTokenizer:
    """id = ord(c) (ASCII), BOS = 0; enough of the Tokenizer interface for core_eval."""

    def get_bos_token_id(self):
        return 0

    def get_vocab_size(self):
        return 128

    def encode(self, text, prepend=None, num_threads=1):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        ids = [ord(c) for c in text]
        assert all(0 < i < 128 for i in ids)
        return ([prepend] if prepend is not None else []) + ids


MARK = ord("#")  # wrong answers carry '#'


class _Stub(torch.nn.Module):
    def __init__(self, max_seq_len=None):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.calls = 0


class UniformModel(_Stub):
    """All logits zero: every loss is ln V, every argmax is token 0 (BOS)."""

    def forward(self, idx):
        self.calls += 1
        return torch.zeros(*idx.shape, 128)


class OracleModel(_Stub):
    """Predicts the next token with confidence until a '#' appears in the row (up to and
    including the target); after that it is uniform. So gold answers (no '#') have low loss
    and full argmax matches, and wrong answers or contexts (with '#') do not."""

    def forward(self, idx):
        self.calls += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, 128)
        nxt = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1)
        tainted = torch.cumsum((idx == MARK).long(), dim=1)[:, 1:]
        tainted = torch.cat([tainted, tainted[:, -1:]], dim=1) > 0
        logits.scatter_(2, nxt[..., None], 10.0)
        logits[tainted] = 0.0
        return logits


def write_bundle(root, tasks, extra_yaml_tasks=()):
    """A bundle dir: tasks = {label: (type, shots, delim, baseline, rows)}."""
    os.makedirs(os.path.join(root, "eval_data", "cat"), exist_ok=True)
    lines = ["icl_tasks:"]
    for label, (ttype, shots, delim, _b, rows) in tasks.items():
        with open(os.path.join(root, "eval_data", "cat", f"{label}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        lines += [f"- label: {label}", f"  dataset_uri: cat/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {ttype}", f"  continuation_delimiter: {json.dumps(delim)}"]
    for label in extra_yaml_tasks:  # listed but its file is absent
        lines += [f"- label: {label}", f"  dataset_uri: cat/{label}.jsonl", "  num_fewshot: [0]",
                  "  icl_task_type: multiple_choice"]
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        for label, (_t, _s, _d, b, _r) in tasks.items():
            w.writerow([label, b])
        for label in extra_yaml_tasks:
            w.writerow([label, 25])
    return root


def mc_rows(n=12):
    """4 choices, gold cycling 0..3 (so always-first scores exactly 25%); wrong choices carry '#'."""
    rows = []
    for i in range(n):
        gold = i % 4
        choices = [f"answer {i} wrong {j} #" if j != gold else f"answer {i} right" for j in range(4)]
        rows.append({"query": f"Question {i}: what is it?", "choices": choices, "gold": gold})
    return rows


def schema_rows(n=10):
    """2 context options, gold alternating (always-first = 50%); the wrong context carries '#'."""
    rows = []
    for i in range(n):
        gold = i % 2
        opts = [f"Story {i}, so the bad # one", f"Story {i}, so the good one"]
        if gold == 0:
            opts.reverse()
        rows.append({"context_options": opts, "continuation": f"went home {i}.", "gold": gold})
    return rows


def lm_rows(n=10):
    return [{"context": f"  Count to {i}:  ", "continuation": " ".join(str(k) for k in range(i + 1))} for i in range(n)]


def stub_bundle(root):
    return write_bundle(root, {
        "copa": ("multiple_choice", 2, " ", 25, mc_rows()),
        "winograd": ("schema", 1, " ", 50, schema_rows()),
        "lambada_openai": ("language_modeling", 3, "\nAnswer: ", 0, lm_rows()),
    })


# -----------------------------------------------------------------------------
# Rendering and spans


def test_render_mc_fewshot_blocks_and_choices():
    fs = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["x", "y"], "gold": 0}
    assert ce.render_prompts_mc(item, "\nAnswer: ", fs) == ["Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: x",
                                                           "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: y"]
    assert ce.render_prompts_mc(item, " ") == ["Q3 x", "Q3 y"]


def test_render_schema_and_lm():
    fs = [{"context_options": ["A1", "A2"], "continuation": "c0", "gold": 1}]
    item = {"context_options": ["B1", "B2"], "continuation": "ends.", "gold": 0}
    assert ce.render_prompts_schema(item, " ", fs) == ["A2 c0\n\nB1 ends.", "A2 c0\n\nB2 ends."]
    fs = [{"context": "  ctx one \n", "continuation": "one"}]
    item = {"context": " ctx two  ", "continuation": "two"}
    assert ce.render_prompts_lm(item, "\nAnswer: ", fs) == ["ctx one\nAnswer: one\n\nctx two\nAnswer:",
                                                            "ctx one\nAnswer: one\n\nctx two\nAnswer: two"]


def test_common_prefix_and_suffix():
    assert ce.common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert ce.common_prefix_length([[5, 1], [6, 1]]) == 0
    assert ce.common_suffix_length([[1, 7, 8, 9], [2, 3, 8, 9]]) == 2
    assert ce.common_suffix_length([[1, 2], [1, 2]]) == 2


def test_spans_on_hand_made_examples():
    tok = CharTokenizer()
    # MC: choices share the leading "c", so the span starts after it (only where choices differ is scored)
    rows = tok.encode(ce.render_prompts_mc({"query": "Q", "choices": ["cat", "cow"], "gold": 0}, " "), prepend=0)
    starts, ends = ce.spans_mc(rows)
    assert rows[0][:starts[0]] == [0] + tok.encode("Q c") and ends == [6, 6]
    # schema: the shared continuation is the common suffix
    rows = tok.encode(ce.render_prompts_schema({"context_options": ["He ran", "She sat"],
                                                "continuation": "fast", "gold": 0}, " "), prepend=0)
    starts, ends = ce.spans_schema(rows)
    assert [r[s:e] for r, s, e in zip(rows, starts, ends)] == [tok.encode(" fast")] * 2  # ' n'/' t' differ
    # LM: the stripped prompt is a token prefix; the span is the continuation
    without, with_ = tok.encode(ce.render_prompts_lm({"context": "Sky is", "continuation": "blue"}, " "), prepend=0)
    s, e, ok = ce.spans_lm(without, with_)
    assert ok and with_[s:e] == tok.encode(" blue")
    s, e, ok = ce.spans_lm([0, 5, 6], [0, 5, 7, 8])  # not a prefix: score from the divergence
    assert (s, e, ok) == (2, 4, False)


def test_crop_left_shifts_span():
    toks = list(range(10))
    assert ce.crop_left(toks, 6, 10, 4) == ([6, 7, 8, 9], 1, 4)  # start kept >= 1
    assert ce.crop_left(toks, 8, 10, 5) == ([5, 6, 7, 8, 9], 3, 5)
    assert ce.crop_left(toks, 8, 10, 20) == (toks, 8, 10)


def test_fewshot_sampling_and_shuffle_are_seeded():
    assert ce.few_shot_indices(3, 10, 4) == random.Random(1237).sample([0, 1, 2, 4, 5, 6, 7, 8, 9], 4)
    assert 3 not in ce.few_shot_indices(3, 10, 9) and ce.few_shot_indices(0, 5, 0) == []
    data = list(range(50))
    expected = list(range(50))
    random.Random(1337).shuffle(expected)
    assert ce.shuffle_and_truncate(data, 7) == expected[:7]  # shuffle before truncation
    assert ce.shuffle_and_truncate(data, -1) == expected


def test_centered_accuracy():
    assert ce.centered_accuracy(0.25, 25) == 0.0
    assert ce.centered_accuracy(1.0, 62) == pytest.approx(1.0)
    assert ce.centered_accuracy(0.5, 0) == 0.5
    assert ce.centered_accuracy(0.62 + 0.38 / 2, 62) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.0, 50) == -1.0


# -----------------------------------------------------------------------------
# Stub models through the whole evaluate_model path


def test_oracle_scores_one_and_uniform_scores_baseline(tmp_path):
    bundle = stub_bundle(str(tmp_path / "bundle"))
    tok = CharTokenizer()
    for batch_tokens in (0, 300):
        out = ce.evaluate_model(OracleModel(), tok, "cpu", bundle_dir=bundle, batch_tokens=batch_tokens, progress=False)
        assert out["results"] == {"copa": 1.0, "winograd": 1.0, "lambada_openai": 1.0}
        assert all(v == pytest.approx(1.0) for v in out["centered_results"].values())
        out = ce.evaluate_model(UniformModel(), tok, "cpu", bundle_dir=bundle, batch_tokens=batch_tokens, progress=False)
        assert out["results"] == {"copa": 0.25, "winograd": 0.5, "lambada_openai": 0.0}
        assert out["centered_results"] == {"copa": 0.0, "winograd": 0.0, "lambada_openai": 0.0}
        assert out["core_metric"] == 0.0
    assert out["partial"] and len(out["tasks_missing"]) == 19 and "hellaswag" in out["tasks_missing"]
    assert ce.core_label(out) == "CORE (partial: 3/22 tasks)"


def test_packing_reduces_forwards(tmp_path):
    bundle = stub_bundle(str(tmp_path / "bundle"))
    one, packed = OracleModel(), OracleModel()
    ce.evaluate_model(one, CharTokenizer(), "cpu", bundle_dir=bundle, batch_tokens=0, progress=False)
    ce.evaluate_model(packed, CharTokenizer(), "cpu", bundle_dir=bundle, batch_tokens=20_000, progress=False)
    assert one.calls == 32 and packed.calls == 3  # one forward per task


def test_max_per_task_and_task_subset(tmp_path):
    bundle = stub_bundle(str(tmp_path / "bundle"))
    out = ce.evaluate_model(OracleModel(), CharTokenizer(), "cpu", bundle_dir=bundle, max_per_task=4,
                            tasks=["copa"], progress=False)
    assert out["num_examples"] == {"copa": 4} and out["tasks_evaluated"] == ["copa"] and out["partial"]
    with pytest.raises(NanochatError, match="unknown CORE task"):
        ce.evaluate_model(OracleModel(), CharTokenizer(), "cpu", bundle_dir=bundle, tasks=["nope"], progress=False)
    with pytest.raises(NanochatError, match="not in the eval bundle"):
        ce.evaluate_model(OracleModel(), CharTokenizer(), "cpu", bundle_dir=bundle, tasks=["squad"], progress=False)


# -----------------------------------------------------------------------------
# Bad input


def test_missing_bundle_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(NanochatError, match="no core.yaml"):
        ce.get_eval_bundle(str(tmp_path))
    with pytest.raises(NanochatError, match="does not exist"):
        ce.get_eval_bundle(str(tmp_path / "nothing.zip"))

    def offline(*a, **k):
        raise NanochatError("could not download it after 5 attempts")
    monkeypatch.setattr(ce, "download_file", offline)
    with pytest.raises(NanochatError, match="--bundle-dir"):
        ce.get_eval_bundle(None, progress=False)


def test_bundle_from_zip_and_file_url(tmp_path):
    import shutil
    src = stub_bundle(str(tmp_path / "src" / "eval_bundle"))
    zip_path = shutil.make_archive(str(tmp_path / "eval_bundle"), "zip", str(tmp_path / "src"))
    got = ce.get_eval_bundle(zip_path, progress=False)
    assert got == os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle")
    assert sorted(os.listdir(got)) == sorted(os.listdir(src))
    shutil.rmtree(got)
    got = ce.get_eval_bundle("file://" + zip_path, progress=False)  # the URL path (download + unzip)
    assert os.path.isfile(os.path.join(got, "core.yaml"))
    assert os.path.isfile(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "eval_bundle.zip"))


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "q", "choices": ["a"], "gold": 0}\n\n{"query": "q", "choices": [\n')
    with pytest.raises(NanochatError, match=r"t\.jsonl:3: not valid JSON"):
        ce.load_jsonl(str(path))
    path.write_text('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": "q"}\n')
    with pytest.raises(NanochatError, match=r"t\.jsonl:2: lacks choices, gold"):
        ce.load_jsonl(str(path), "multiple_choice")
    path.write_text('{"context_options": ["a", "b"], "continuation": "c", "gold": 2}\n')
    with pytest.raises(NanochatError, match=r"t\.jsonl:1: gold must index"):
        ce.load_jsonl(str(path), "schema")


def test_bundle_missing_files_are_listed(tmp_path):
    bundle = write_bundle(str(tmp_path / "b"), {"copa": ("multiple_choice", 0, " ", 50, mc_rows(4))},
                          extra_yaml_tasks=["piqa"])
    tasks, missing = ce.load_bundle_tasks(bundle)
    assert [t.label for t in tasks] == ["copa"] and "piqa" in missing and "hellaswag" in missing
    assert len(missing) == 21


# -----------------------------------------------------------------------------
# A tiny real GPT: packed equals unpacked, long prompts are cropped


def _tiny_gpt(vocab_size, sequence_len=64, seed=0):
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=1, n_kv_head=1,
                    n_embd=64, window_pattern="L")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # random-init output layers are zero or tiny: give the model opinions
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    texts = [json.dumps(r) for r in mc_rows(40) + schema_rows(40) + lm_rows(40)]
    return Tokenizer.train_from_iterator(iter(texts * 5), vocab_size=300)


SETS = [("multiple_choice", mc_rows(16), 2), ("schema", schema_rows(16), 1), ("language_modeling", lm_rows(16), 2)]


@pytest.fixture(scope="module")
def trained_tiny(tiny_tokenizer):
    """A tiny GPT fitted for 50 steps on the gold prompts, so its answers are a mix of right
    and wrong (a random-init model gets every LM example wrong, which would test little)."""
    model = _tiny_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=256)
    seqs = []
    for task_type, data, shots in SETS:
        for i in range(len(data)):
            ex = ce.prepare_example(i, data, task_type, shots, " ", tiny_tokenizer)
            seqs.append(ex.rows[0] if task_type == "language_modeling" else ex.rows[ex.gold])
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        targets[i, :len(seq) - 1] = torch.tensor(seq[1:])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(50):
        loss = model(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_packed_equals_one_example_per_forward(tiny_tokenizer, trained_tiny):
    accs = {}
    for task_type, data, shots in SETS:
        ref_acc, ref = ce.evaluate_task(trained_tiny, tiny_tokenizer, data, "cpu", task_type, shots, " ",
                                        batch_tokens=0, share_prefix=False, return_details=True)
        accs[task_type] = ref_acc
        for budget in (256, 1024, 100_000):
            acc, got = ce.evaluate_task(trained_tiny, tiny_tokenizer, data, "cpu", task_type, shots, " ",
                                        batch_tokens=budget, return_details=True)
            assert acc == ref_acc
            assert [got[i][0] for i in range(len(data))] == [ref[i][0] for i in range(len(data))]
            for i in range(len(data)):
                assert got[i][1] == pytest.approx(ref[i][1], abs=1e-5, rel=0)
    assert 0.0 < accs["language_modeling"] < 1.0  # a mix of right and wrong answers was compared
    assert accs["multiple_choice"] > 0.5


def _assert_same_details(got, ref, n, tol=1e-5):
    assert [got[i][0] for i in range(n)] == [ref[i][0] for i in range(n)]
    for i in range(n):
        assert got[i][1] == pytest.approx(ref[i][1], abs=tol, rel=0)


def _count_prefix_passes(monkeypatch):
    """Count the caches the prefix scorer wraps around its buffer (two per example it scores)."""
    made = []
    orig = ce.KVCache.from_tensors

    def from_tensors(*args, **kwargs):
        made.append(1)
        return orig(*args, **kwargs)
    monkeypatch.setattr(ce.KVCache, "from_tensors", from_tensors)
    return made


@pytest.mark.parametrize("min_prefix", [1, ce.MIN_PREFIX])
def test_shared_prefix_equals_one_example_per_forward(tiny_tokenizer, trained_tiny, monkeypatch, min_prefix):
    """The CPU default (prefix once without the lm_head, then each row's remainder against its
    cached keys/values) gives the one-forward results: same answers, losses to float rounding.
    MC rows share their prefix (batch-1 prefix pass), schema rows do not (batch-of-rows pass)."""
    monkeypatch.setattr(ce, "MIN_PREFIX", min_prefix)
    made = _count_prefix_passes(monkeypatch)
    for task_type, data, shots in SETS:
        ref_acc, ref = ce.evaluate_task(trained_tiny, tiny_tokenizer, data, "cpu", task_type, shots, " ",
                                        batch_tokens=0, share_prefix=False, return_details=True)
        assert not made
        acc, got = ce.evaluate_task(trained_tiny, tiny_tokenizer, data, "cpu", task_type, shots, " ",
                                    return_details=True)  # CPU default: share_prefix on
        assert acc == ref_acc
        _assert_same_details(got, ref, len(data))
        assert made, f"{task_type}: the prefix scorer was not used"
        made.clear()
    last = trained_tiny.transformer.h[-1]
    assert not last.attn.c_proj._forward_pre_hooks and not last._forward_hooks  # hooks removed


def test_shared_prefix_with_sliding_window_and_gqa(tiny_tokenizer):
    """Short-window layers and grouped KV heads through the cached path: prompts longer than the
    short window (128 at sequence_len 256), so the window masks matter."""
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=256, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=3, n_head=2,
                    n_kv_head=1, n_embd=64, window_pattern="SL")
    torch.manual_seed(3)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    assert model.window_sizes[0][0] == 128
    data = mc_rows(12)
    ex = ce.prepare_example(0, data, "multiple_choice", 8, " ", tiny_tokenizer)
    assert max(len(r) for r in ex.rows) > 140
    for task_type, rows, shots in [("multiple_choice", data, 8), ("language_modeling", lm_rows(12), 10)]:
        ref_acc, ref = ce.evaluate_task(model, tiny_tokenizer, rows, "cpu", task_type, shots, " ",
                                        batch_tokens=0, share_prefix=False, return_details=True)
        acc, got = ce.evaluate_task(model, tiny_tokenizer, rows, "cpu", task_type, shots, " ",
                                    batch_tokens=0, share_prefix=True, return_details=True)
        assert acc == ref_acc
        _assert_same_details(got, ref, len(rows))


def test_long_prompts_are_cropped_to_the_model_context(tiny_tokenizer):
    model = _tiny_gpt(tiny_tokenizer.get_vocab_size(), sequence_len=8)  # rotary cache: 80 positions
    data = mc_rows(8)
    ex = ce.prepare_example(0, data, "multiple_choice", 4, " ", tiny_tokenizer)
    assert max(len(r) for r in ex.rows) > 80  # uncropped, the model cannot run these
    with pytest.raises(AssertionError):
        model(torch.tensor([ex.rows[0]]))
    acc, got = ce.evaluate_task(model, tiny_tokenizer, data, "cpu", "multiple_choice", 4, " ",
                                return_details=True)  # max_len defaults to config.sequence_len
    assert 0.0 <= acc <= 1.0 and len(got) == 8
    cropped = ce.prepare_example(0, data, "multiple_choice", 4, " ", tiny_tokenizer, max_len=8)
    assert all(len(r) == 8 for r in cropped.rows)
    for r, full, s, e, s0, e0 in zip(cropped.rows, ex.rows, cropped.starts, cropped.ends, ex.starts, ex.ends):
        assert r == full[-8:] and e == 8 and r[s:e] == full[max(s0, len(full) - 8 + 1):e0]
    losses, _ = ce._score_rows(model, cropped.rows, cropped.starts, cropped.ends, 0, "cpu")
    assert got[0][1] == pytest.approx(losses, abs=1e-6)


# -----------------------------------------------------------------------------
# The real bundle (18 of 22 tasks in ../shared/data)


@pytest.mark.skipif(not os.path.isdir(REAL_BUNDLE), reason="../shared/data/eval_bundle is absent")
def test_real_bundle_partial_core_with_tiny_model(tmp_path):
    from nanochat.tokenizer import Tokenizer
    tasks, missing = ce.load_bundle_tasks(REAL_BUNDLE)
    assert {"hellaswag", "hellaswag_zeroshot", "squad", "coqa"} <= set(missing)
    texts = []
    for t in tasks:
        texts += [json.dumps(r) for r in ce.load_jsonl(t.path)[:20]]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=512)
    model = _tiny_gpt(tok.get_vocab_size(), sequence_len=128)
    out = ce.evaluate_model(model, tok, "cpu", max_per_task=4, bundle_dir=REAL_BUNDLE, progress=False)
    assert len(out["results"]) == len(tasks) and out["partial"]
    assert sorted(out["tasks_missing"]) == sorted(missing)
    assert all(0.0 <= a <= 1.0 for a in out["results"].values())
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / len(tasks))
    assert ce.core_label(out) == f"CORE (partial: {len(tasks)}/22 tasks)"


@pytest.mark.skipif(not os.path.isdir(REAL_BUNDLE), reason="../shared/data/eval_bundle is absent")
def test_real_tasks_shared_prefix_and_packed_equal_one_forward():
    """On real prompts (10-shot MC, 0-shot schema, LM) the default scoring and packing give the
    per-example results of one forward per example over the full rows."""
    from nanochat.tokenizer import Tokenizer
    tasks = {t.label: t for t in ce.load_bundle_tasks(REAL_BUNDLE)[0]}
    labels = [x for x in ("arc_easy", "winograd", "lambada_openai") if x in tasks]
    texts = [json.dumps(r) for x in labels for r in ce.load_jsonl(tasks[x].path)[:30]]
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=400)
    model = _tiny_gpt(tok.get_vocab_size(), sequence_len=512, seed=2)
    for label in labels:
        t = tasks[label]
        data = ce.shuffle_and_truncate(ce.load_jsonl(t.path, t.task_type), 6)
        args = (model, tok, data, "cpu", t.task_type, t.num_fewshot, t.delimiter)
        _, ref = ce.evaluate_task(*args, batch_tokens=0, share_prefix=False, return_details=True)
        for kwargs in ({"batch_tokens": 0, "share_prefix": True}, {"batch_tokens": 4096}):
            _, got = ce.evaluate_task(*args, return_details=True, **kwargs)
            _assert_same_details(got, ref, len(data))


# -----------------------------------------------------------------------------
# Two ranks (gloo) give the one-rank accuracy


def _rank_worker(rank, world, init_file, bundle, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _tiny_gpt(128, sequence_len=64, seed=1)
        out = ce.evaluate_model(model, CharTokenizer(), "cpu", bundle_dir=bundle, batch_tokens=512, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out["results"], f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank(tmp_path):
    import torch.multiprocessing as mp
    bundle = stub_bundle(str(tmp_path / "bundle"))
    single = ce.evaluate_model(_tiny_gpt(128, sequence_len=64, seed=1), CharTokenizer(), "cpu", bundle_dir=bundle,
                               progress=False)["results"]
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rdzv"), bundle, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == single
    assert 0.0 < single["copa"] < 1.0 or 0.0 < single["winograd"] < 1.0  # not a trivial all-same answer
