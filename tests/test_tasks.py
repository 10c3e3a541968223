"""The task library: views and mixtures, the multiple-choice prompt, local and hub
data loading (against a local HTTP server, never the network), and every task's conversions
and grading, on real GSM8K / HumanEval data when ../shared/data has it."""

import gzip
import http.server
import io
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA

from nanochat.common import NanochatError, iter_jsonl
from nanochat.tasks.common import Task, TaskDataMissing, TaskMixture, TaskSequence, get_task_data_dir, render_mc
from nanochat.tasks.hub import HubDataset, load_hub_dataset, load_task_rows, read_rows_file

GSM8K_DIR = os.path.join(SHARED_DATA, "gsm8k")
HUMANEVAL_FILE = os.path.join(SHARED_DATA, "humaneval", "HumanEval.jsonl.gz")
needs_gsm8k = pytest.mark.skipif(not os.path.isfile(os.path.join(GSM8K_DIR, "test.jsonl")),
                                 reason="../shared/data/gsm8k is absent (real GSM8K data)")
needs_humaneval = pytest.mark.skipif(not os.path.isfile(HUMANEVAL_FILE),
                                     reason="../shared/data/humaneval/HumanEval.jsonl.gz is absent (real HumanEval data)")


class Numbers(Task):
    """Example i is {"messages": [], "i": i, "name": name}."""

    def __init__(self, n, name="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.name = n, name

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "i": index, "name": self.name}


def write_jsonl(path, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def parquet_bytes(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# Framework


def test_task_slicing_and_ceil_length():
    t = Numbers(10, start=1, stop=10, step=3)
    assert len(t) == 3 and [ex["i"] for ex in t] == [1, 4, 7]
    t = Numbers(20, start=1, stop=11, step=3)  # ceil(10 / 3) = 4
    assert len(t) == 4 and [t[k]["i"] for k in range(4)] == [1, 4, 7, 10]
    assert t[-1]["i"] == 10
    assert len(Numbers(5, stop=100)) == 5  # stop past the data is clamped
    assert len(Numbers(5, start=5)) == 0
    with pytest.raises(IndexError):
        t[4]
    with pytest.raises(ValueError):
        Numbers(5, step=0)


def test_task_mixture_covers_every_example_once_deterministic_interleaved():
    a, b = Numbers(30, "a"), Numbers(7, "b", stop=5)
    mix = TaskMixture([a, b])
    seen = [(ex["name"], ex["i"]) for ex in mix]
    assert len(mix) == 35 and sorted(seen) == sorted([("a", i) for i in range(30)] + [("b", i) for i in range(5)])
    assert seen == [(ex["name"], ex["i"]) for ex in TaskMixture([Numbers(30, "a"), Numbers(7, "b", stop=5)])]
    # one shuffle with Random(42) of the (task, index) list
    expected = [(t, i) for t, n in enumerate([30, 5]) for i in range(n)]
    random.Random(42).shuffle(expected)
    assert mix.index_map == expected
    names = [name for name, _ in seen]
    assert names[:5] != ["b"] * 5 and "b" in names[:20]  # interleaved, not concatenated


def test_task_mixture_oversamples_by_repetition():
    a, b = Numbers(4, "a"), Numbers(3, "b")
    mix = TaskMixture([a, a, a, b])
    counts = {}
    for ex in mix:
        counts[(ex["name"], ex["i"])] = counts.get((ex["name"], ex["i"]), 0) + 1
    assert len(mix) == 15
    assert all(counts[("a", i)] == 3 for i in range(4)) and all(counts[("b", i)] == 1 for i in range(3))
    assert len(TaskMixture([a, b], start=2, stop=6)) == 4  # a mixture is itself a sliceable Task


def test_task_sequence_concatenates_in_order():
    seq = TaskSequence([Numbers(2, "a"), Numbers(3, "b")])
    assert [(ex["name"], ex["i"]) for ex in seq] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]


def test_render_mc_letter_follows_choice_with_no_space():
    text = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                    "Respond only with the letter of the correct answer.")
    assert "=A\n" in text and "= A" not in text


def test_task_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    assert get_task_data_dir() is None
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(tmp_path / "env"))
    assert get_task_data_dir() == str(tmp_path / "env")
    assert get_task_data_dir(tmp_path / "arg") == str(tmp_path / "arg")  # the argument wins


# -----------------------------------------------------------------------------
# Rows: HubDataset, local files


def test_hub_dataset_rows_and_shuffle_equal_numpy_permutation():
    rows = [{"x": i, "s": f"row{i}", "nested": {"a": [i, i + 1]}} for i in range(50)]
    for ds in (HubDataset(rows=rows), HubDataset(table=pa.Table.from_pylist(rows))):
        assert len(ds) == 50 and ds[3] == rows[3] and ds[-1] == rows[49]
        shuffled = ds.shuffle(42)
        perm = np.random.default_rng(42).permutation(50)
        assert [r["x"] for r in shuffled] == perm.tolist()
        assert shuffled[7] == rows[perm[7]]
        twice = shuffled.shuffle(3)  # composes: row i is shuffled[default_rng(3).permutation(50)[i]]
        assert [r["x"] for r in twice] == perm[np.random.default_rng(3).permutation(50)].tolist()
        assert [r["x"] for r in ds.select([5, 2])] == [5, 2]
        with pytest.raises(IndexError):
            ds[50]


def test_local_files_jsonl_gz_parquet_folder_agree(tmp_path):
    rows = [{"q": f"question {i}", "n": i} for i in range(12)]
    paths = [write_jsonl(str(tmp_path / "a.jsonl"), rows), write_jsonl(str(tmp_path / "b.jsonl.gz"), rows, gz=True)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
    os.makedirs(tmp_path / "d")
    pq.write_table(pa.Table.from_pylist(rows[:5]), str(tmp_path / "d" / "00000.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[5:]), str(tmp_path / "d" / "00001.parquet"))
    paths += [str(tmp_path / "c.parquet"), str(tmp_path / "d")]
    for p in paths:
        assert list(read_rows_file(p)) == rows, p


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": oops}\n')
    with pytest.raises(NanochatError, match=r"bad\.jsonl:4: not valid JSON"):
        list(iter_jsonl(str(path)))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(NanochatError, match=r"bad\.jsonl:2: a JSON list, expected an object"):
        read_rows_file(str(path))


# -----------------------------------------------------------------------------
# The hub loader against a local HTTP server


class FakeHub:
    """A local HTTP server answering the parquet-export listing and serving shards."""

    def __init__(self):
        self.routes, self.requests = {}, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                status, body = hub.routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    yield hub
    hub.close()


def test_hub_loader_downloads_shards_writes_manifest_last_and_caches(fake_hub):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(9)]
    listing = "/api/datasets/org/name/parquet/main/test"
    shard_urls = [f"{fake_hub.url}/files/0.parquet", f"{fake_hub.url}/files/1.parquet"]
    fake_hub.routes[listing] = (200, json.dumps(shard_urls[::-1]).encode())  # shards are put in numeric order
    fake_hub.routes["/files/0.parquet"] = (200, parquet_bytes(rows[:4]))
    # shard 1 missing at first: the download fails and no manifest may exist
    cache = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "task_data", "org--name", "main", "test")
    with pytest.raises(TaskDataMissing, match="GSM8K"):
        load_task_rows("GSM8K", ["gsm8k/test"], "org/name", "main", "test")
    assert os.path.exists(os.path.join(cache, "00000.parquet"))
    assert not os.path.exists(os.path.join(cache, "manifest.json"))

    fake_hub.routes["/files/1.parquet"] = (200, parquet_bytes(rows[4:]))
    ds = load_hub_dataset("org/name", "main", "test")
    assert list(ds) == rows
    assert {"00000.parquet", "00001.parquet", "manifest.json"} <= set(os.listdir(cache))
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["files"] == ["00000.parquet", "00001.parquet"] and manifest["urls"] == shard_urls
    # the manifest is the last file written
    mtimes = {n: os.stat(os.path.join(cache, n)).st_mtime_ns for n in ("00000.parquet", "00001.parquet", "manifest.json")}
    assert mtimes["manifest.json"] >= max(mtimes["00000.parquet"], mtimes["00001.parquet"])

    n_requests = len(fake_hub.requests)
    fake_hub.routes.clear()  # cached: no network needed any more
    assert list(load_hub_dataset("org/name", "main", "test").shuffle(42)) == list(HubDataset(rows=rows).shuffle(42))
    assert len(fake_hub.requests) == n_requests


def test_hub_loader_unknown_split_is_an_error_not_missing_data(fake_hub):
    with pytest.raises(NanochatError, match="404") as info:
        load_hub_dataset("org/name", "main", "nosuchsplit")
    assert not isinstance(info.value, TaskDataMissing)


def test_hub_offline_raises_task_data_missing_quickly(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from nanochat.tasks.arc import ARC

    t0 = time.time()
    with pytest.raises(TaskDataMissing, match=r"ARC-Easy .*arc/ARC-Easy/test"):
        ARC("ARC-Easy", "test", data_dir=str(tmp_path))
    assert time.time() - t0 < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskDataMissing, match="HF_HUB_OFFLINE"):
        ARC("ARC-Easy", "test", data_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# ARC, MMLU, SmolTalk from local files


ARC_ROWS = [
    {"id": f"q{i}", "question": f"Question {i}?", "answerKey": "ABCD"[i % 4],
     "choices": {"text": [f"c{i}{j}" for j in range(4)], "label": ["A", "B", "C", "D"]}}
    for i in range(10)
] + [{"id": "num", "question": "Pick two.", "answerKey": "2", "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}}]


def test_arc_local_jsonl_conversation_and_evaluate(tmp_path, monkeypatch):
    from nanochat.tasks.arc import ARC

    write_jsonl(str(tmp_path / "arc" / "ARC-Challenge" / "validation.jsonl"), ARC_ROWS)
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(tmp_path))  # found through the env var
    task = ARC("ARC-Challenge", "validation")
    assert task.eval_type == "categorical" and len(task) == 11
    perm = np.random.default_rng(42).permutation(11)  # shuffled with seed 42 after loading
    for k in range(11):
        row, ex = ARC_ROWS[perm[k]], task[k]
        user, assistant = ex["messages"]
        assert user["content"] == render_mc(row["question"], row["choices"]["label"], row["choices"]["text"])
        assert assistant["content"] == row["answerKey"] and ex["letters"] == row["choices"]["label"]
        assert task.evaluate(ex, row["answerKey"]) == 1
        wrong = next(letter for letter in ex["letters"] if letter != row["answerKey"])
        assert task.evaluate(ex, wrong) == 0
    with pytest.raises(ValueError):
        task.evaluate(task[0], "Z")


def test_mmlu_local_all_and_nested_auxiliary_train(tmp_path):
    from nanochat.tasks.mmlu import MMLU

    rows = [{"question": f"Q{i}", "subject": "math", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(8)]
    write_jsonl(str(tmp_path / "mmlu" / "all" / "test.jsonl"), rows)
    os.makedirs(tmp_path / "mmlu" / "auxiliary_train")  # the hub nests auxiliary_train rows under "train"
    pq.write_table(pa.Table.from_pylist([{"train": r} for r in rows]),
                   str(tmp_path / "mmlu" / "auxiliary_train" / "train.parquet"))
    for task in (MMLU("all", "test", data_dir=str(tmp_path)), MMLU("auxiliary_train", "train", data_dir=str(tmp_path))):
        assert len(task) == 8 and task.eval_type == "categorical"
        answers = []
        for ex in task:
            q = ex["messages"][0]["content"]
            assert q.startswith("Multiple Choice question: Q") and "- w=A\n- x=B\n- y=C\n- z=D\n" in q
            assert ex["letters"] == ["A", "B", "C", "D"] and ex["subject"] == "math"
            answers.append(ex["messages"][1]["content"])
            assert task.evaluate(ex, answers[-1]) == 1
        assert sorted(answers) == sorted("ABCD" * 2)
    with pytest.raises(ValueError):
        MMLU("all", "train", data_dir=str(tmp_path))


def test_smoltalk_local_parquet_with_system_message(tmp_path):
    from nanochat.tasks.smoltalk import SmolTalk

    rows = [{"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]},
            {"messages": [{"role": "user", "content": "lonely"}]}]
    os.makedirs(tmp_path / "smoltalk")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "smoltalk" / "test.parquet"))
    task = SmolTalk("test", data_dir=str(tmp_path))
    convs = []
    for k in range(3):
        try:
            convs.append(task[k]["messages"])
        except ValueError as e:
            assert "needs at least a user and an assistant message" in str(e)
    assert sorted(convs, key=len) == sorted([rows[0]["messages"], rows[1]["messages"]], key=len)


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_tool_parts_split_at_last_equals():
    from nanochat.tasks.gsm8k import extract_answer, solution_to_parts

    parts = solution_to_parts("He has 3+4=<<3+4=7>>7 apples and <<2==2=True>> and <<5*2>>.\n#### 1,007")
    assert parts == [
        {"type": "text", "text": "He has 3+4="},
        {"type": "python", "text": "3+4"}, {"type": "python_output", "text": "7"},
        {"type": "text", "text": "7 apples and "},
        {"type": "python", "text": "2==2"}, {"type": "python_output", "text": "True"},
        {"type": "text", "text": " and "},
        {"type": "python", "text": "5*2"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": ".\n#### 1,007"},
    ]
    assert extract_answer("so #### 1,007") == "1007" and extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("no answer here") is None


def _reassemble(parts):
    out = []
    for p in parts:
        if p["type"] == "text":
            out.append(p["text"])
        elif p["type"] == "python":
            out.append("<<" + p["text"])
        else:
            out.append(("=" + p["text"] if p["text"] else "") + ">>")
    return "".join(out)


@needs_gsm8k
def test_gsm8k_real_lines_parse_and_grade(monkeypatch):
    from nanochat.tasks.gsm8k import GSM8K, extract_answer, solution_to_parts

    rows = [row for split in ("test", "train") for _, row in iter_jsonl(os.path.join(GSM8K_DIR, f"{split}.jsonl"))]
    assert len(rows) == 1319 + 7473
    for row in rows:
        parts = solution_to_parts(row["answer"])
        assert _reassemble(parts) == row["answer"]  # nothing lost or reordered
        assert parts[-1]["type"] == "text" and extract_answer(parts[-1]["text"]) is not None
        for p, nxt in zip(parts, parts[1:]):
            if p["type"] == "python":
                assert nxt["type"] == "python_output"
    # the first test line, by hand
    first = solution_to_parts(rows[0]["answer"])
    assert first[:3] == [{"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
                         {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"}]

    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", SHARED_DATA)
    task = GSM8K("main", "test")
    assert len(task) == 1319 and task.eval_type == "generative"
    perm = np.random.default_rng(42).permutation(1319)
    for k in range(50):
        ex, row = task[k], rows[perm[k]]
        assert ex["messages"][0]["content"] == row["question"]
        reference = ex["messages"][1]["content"][-1]["text"]
        assert task.evaluate(ex, reference) == 1 and task.reward(ex, reference) == 1.0
        answer = extract_answer(row["answer"])
        assert task.evaluate(ex, f"blah blah\n#### {answer}") == 1
        assert task.evaluate(ex, f"#### {answer}1") == 0
        assert task.evaluate(ex, "I don't know") == 0
    assert len(GSM8K("main", "train", data_dir=SHARED_DATA, stop=100)) == 100


# -----------------------------------------------------------------------------
# HumanEval


def test_humaneval_program_assembly():
    from nanochat.tasks.humaneval import build_check, build_program, extract_imports, extract_program

    prompt = "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n"
    assert extract_imports(prompt) == "from typing import List\nimport math"
    assert extract_program("Sure!\n```python\ndef f(x):\n    return 1\n```\nmore\n```\nnope\n```") == \
        "def f(x):\n    return 1"
    assert extract_program("```\ncode\n```") == "code"
    # inline ``` on a line of prose opens no block: the fenced block after it is the code
    assert extract_program("Use ```f``` like so:\n```python\ndef f(x):\n    return 1\n```") == \
        "def f(x):\n    return 1"
    assert extract_program("  def f(): pass  \n") == "def f(): pass"
    conv = {"messages": [{"role": "user", "content": prompt}], "test": "def check(c):\n    assert c([1]) == 1",
            "entry_point": "f"}
    # the untrusted program holds no test; the trusted check holds the prompt (helpers) and the tests
    assert build_program(conv, "```python\ndef f(x):\n    return 1\n```") == \
        "from typing import List\nimport math\n\ndef f(x):\n    return 1\n"
    assert build_check(conv) == prompt + "\n\ndef check(c):\n    assert c([1]) == 1\n"


def _humaneval_task():
    from nanochat.tasks.humaneval import HumanEval

    return HumanEval(data_dir=SHARED_DATA)


@needs_humaneval
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    """All 164 canonical solutions pass through evaluate (two at a time; each check runs the
    program in the sandbox and its tests in a second process: ~50 s on 2 busy cores);
    NANOCHAT_HUMANEVAL_SAMPLE=N checks only N of them."""
    task = _humaneval_task()
    assert len(task) == 164 and task.eval_type == "generative"
    ids = [row["task_id"] for _, row in iter_jsonl(HUMANEVAL_FILE)]
    perm = np.random.default_rng(42).permutation(164)
    assert [task[k]["task_id"] for k in range(5)] == [ids[j] for j in perm[:5]]
    n = int(os.environ.get("NANOCHAT_HUMANEVAL_SAMPLE", 164))
    examples = [task[k] for k in range(n)]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda ex: task.evaluate(ex, ex["messages"][1]["content"]), examples))
    failed = [ex["task_id"] for ex, ok in zip(examples, outcomes) if not ok]
    assert failed == []
    # the completion alone (as a model answers, in a code fence) also passes
    ex = examples[0]
    prompt, full = ex["messages"][0]["content"], ex["messages"][1]["content"]
    assert task.evaluate(ex, f"Here you go:\n```python\n{full}\n```\nDone.") == 1
    # wrong, crashing and exiting programs fail, and evaluation goes on
    stub = prompt + "\n    return None\n"
    assert task.evaluate(ex, stub) == 0
    assert task.evaluate(ex, "import sys\nsys.exit(0)") == 0  # exiting early is not passing
    assert task.evaluate(ex, "import os\nos._exit(0)") == 0
    assert task.evaluate(ex, "this is not python at all (") == 0
    assert task.evaluate(examples[1], examples[1]["messages"][1]["content"]) == 1


# -----------------------------------------------------------------------------
# CustomJSON


def test_customjson_reads_validates_and_names_bad_lines(tmp_path):
    from nanochat.tasks.customjson import CustomJSON

    good = [[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}],
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in good) + "\n\n")
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[0]["messages"] == good[0] and task[1]["messages"] == good[1]

    cases = {
        '{"role": "user"}': r"conv\.jsonl:3: expected a JSON array",
        '[{"role": "user", "content": "x"}, ': r"conv\.jsonl:3: not valid JSON",
        '[{"role": "user", "content": "x"}]': r"conv\.jsonl:3: a conversation needs at least a user and an assistant message",
        '[{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]': r"conv\.jsonl:3: message 1 has role 'user' but 'assistant' was expected",
        '[{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]': r"conv\.jsonl:3: message 1 \(assistant\) must be a string or a list",
    }
    for bad, pattern in cases.items():
        path.write_text("\n".join(json.dumps(c) for c in good) + "\n" + bad + "\n")
        with pytest.raises(NanochatError, match=pattern):
            CustomJSON(str(path))
    with pytest.raises(TaskDataMissing, match="does not exist.*curl"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# SpellingBee, SimpleSpelling


@pytest.fixture
def words_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("strawberry\r\nbanana\nMississippi\ncan't\nzebra\nmississippi\n\nabracadabra\n")
    return str(path)


def test_spellingbee_deterministic_per_index_and_answer_parses(words_file):
    from nanochat.tasks.gsm8k import extract_answer
    from nanochat.tasks.spellingbee import SpellingBee

    train = SpellingBee(size=200, split="train", words_path=words_file)
    again = SpellingBee(size=200, split="train", words_path=words_file)
    test = SpellingBee(size=200, split="test", words_path=words_file)
    assert set(train.words) == {"strawberry", "banana", "zebra", "mississippi", "abracadabra"}
    assert len(train) == 200 and train.eval_type == "generative"
    assert [train[i] for i in range(200)] == [again[i] for i in range(200)]
    assert [train[i] for i in range(20)] != [test[i] for i in range(20)]
    try:
        from nanochat.execution import use_calculator
    except ImportError:
        use_calculator = None
    templates_seen, misses = set(), 0
    for i in range(200):
        ex = train[i]
        question, parts = ex["messages"][0]["content"], ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        call = parts[1]["text"]
        word, letter = call.split("'")[1], call.split("'")[3]
        assert call == f"'{word}'.count('{letter}')" and word in question and letter in question
        count = word.count(letter)
        misses += count == 0
        assert parts[2]["text"] == str(count)
        assert extract_answer(parts[3]["text"]) == str(count) and parts[3]["text"].endswith(f"#### {count}")
        manual = parts[0]["text"]
        assert f"{word}:{','.join(word)}" in manual and f"This gives us {count}." in manual
        hits = [line for line in manual.split("\n") if " hit! count=" in line]
        assert len(hits) == count and (not hits or hits[-1].endswith(f"count={count}"))
        assert f"1:{word[0]}" in manual  # no space between index and letter
        if use_calculator is not None:
            assert str(use_calculator(call)) == str(count)
        assert train.evaluate(ex, parts[3]["text"]) == 1 and train.reward(ex, f"#### {count + 1}") == 0.0
        templates_seen.add(question.rstrip("?").replace(word, "W").replace(letter, "L"))
    assert 0 < misses < 60 and len(templates_seen) > 30  # ~10% random letters; many templates


def test_simplespelling(words_file):
    from nanochat.tasks.spellingbee import SimpleSpelling

    task = SimpleSpelling(size=50, words_path=words_file)
    ex = task[3]
    assert ex == SimpleSpelling(size=50, words_path=words_file)[3]
    word = ex["messages"][0]["content"].removeprefix("Spell the word: ")
    assert ex["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert task.evaluate(ex, f"{word}:{','.join(word)}\n") == 1 and task.evaluate(ex, word) == 0


def test_word_list_download_and_missing(monkeypatch, tmp_path, words_file):
    from nanochat.tasks import spellingbee

    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    monkeypatch.setattr(spellingbee, "SYSTEM_WORDS", str(tmp_path / "no_dict"))
    monkeypatch.setattr(spellingbee, "WORDS_URL", words_file)  # download_file takes local paths too
    words = spellingbee.load_words()
    assert os.path.isfile(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "words_alpha.txt"))
    assert "strawberry" in words
    monkeypatch.setattr(spellingbee, "WORDS_URL", "file:///nonexistent/words_alpha.txt")
    os.remove(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "words_alpha.txt"))
    with pytest.raises(TaskDataMissing, match="word list"):
        spellingbee.load_words()
    os.makedirs(tmp_path / "td" / "spellingbee")
    (tmp_path / "td" / "spellingbee" / "words_alpha.txt").write_text("kiwi\n")
    assert spellingbee.load_words(data_dir=str(tmp_path / "td")) == ["kiwi"]


def test_word_list_download_comes_before_the_system_dictionary(monkeypatch, tmp_path, words_file, caplog):
    """/usr/share/dict/words is an offline stand-in only: when words_alpha.txt can be fetched, it is
    the list used (SpellingBee examples and scores depend on the list)."""
    from nanochat.tasks import spellingbee

    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)
    system = tmp_path / "system_words"
    system.write_text("kiwi\nKiwi\n")
    monkeypatch.setattr(spellingbee, "SYSTEM_WORDS", str(system))
    monkeypatch.setattr(spellingbee, "WORDS_URL", words_file)
    assert "strawberry" in spellingbee.load_words()
    os.remove(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "words_alpha.txt"))
    monkeypatch.setattr(spellingbee, "WORDS_URL", "file:///nonexistent/words_alpha.txt")
    with caplog.at_level("WARNING", logger="nanochat"):
        assert spellingbee.load_words() == ["kiwi"]  # offline: the stand-in, with a warning
    assert any("system word list" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
