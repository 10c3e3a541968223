"""Chat evaluation: the categorical loop (batched = one at a time, logits read at
the last prompt position), the generative pass@k loop, ChatCORE, and scripts/chat_eval end to
end on a tiny model with tiny local task files."""

import gzip
import json
import math
import os

import pytest
import torch
from helpers import make_tiny_base_checkpoint, make_tokenizer

from nanochat.chat_eval import (
    ALL_TASKS,
    chatcore,
    chatcore_is_complete,
    letter_token_ids,
    run_categorical_eval,
    run_chat_eval,
    run_generative_eval,
)
from nanochat.common import NanochatError
from nanochat.tasks.common import TaskDataMissing

try:
    from nanochat.engine import Engine
except ImportError:
    Engine = None
needs_engine = pytest.mark.skipif(Engine is None, reason="nanochat.engine has no Engine yet")


@pytest.fixture(autouse=True)
def _eager_engine(monkeypatch):
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")  # compiling the decode step takes longer than these tests
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    monkeypatch.delenv("NANOCHAT_TASK_DATA_DIR", raising=False)


def write_jsonl(path, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_task_data(root):
    """Tiny ARC-Easy test (13 questions of varied length), GSM8K test (3), HumanEval (3), word list."""
    arc = []
    for i in range(13):
        labels = ["A", "B", "C", "D"] if i % 3 else ["A", "B", "C"]
        arc.append({"id": f"q{i}", "question": "the cat sees the moon " * (1 + i % 4) + f"number {i}?",
                    "choices": {"text": [f"choice {j} of {i}" for j in range(len(labels))], "label": labels},
                    "answerKey": labels[i % len(labels)]})
    write_jsonl(os.path.join(root, "arc", "ARC-Easy", "test.jsonl"), arc)
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
           for a, b in [(2, 3), (10, 7), (1, 1)]]
    write_jsonl(os.path.join(root, "gsm8k", "test.jsonl"), gsm)
    he = [{"task_id": f"Toy/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
           "canonical_solution": f"    return x + {i}\n", "entry_point": f"f{i}",
           "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n"} for i in range(3)]
    write_jsonl(os.path.join(root, "humaneval", "HumanEval.jsonl.gz"), he, gz=True)
    os.makedirs(os.path.join(root, "spellingbee"), exist_ok=True)
    with open(os.path.join(root, "spellingbee", "words_alpha.txt"), "w") as f:
        f.write("apple\nbanana\ncherry\n")
    return root


def build_tiny_model(vocab_size):
    """A random 1-layer model with large logits (so the letters' logits differ clearly)."""
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tokenizer (saved in <base>/tokenizer), the tiny model and tiny task data."""
    base = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer(str(base))
    return build_tiny_model(tok.get_vocab_size()), tok, make_task_data(str(base / "task_data"))


# -----------------------------------------------------------------------------
# Categorical


def test_categorical_batched_equals_one_at_a_time_and_manual(tiny):
    from nanochat.tasks.arc import ARC

    model, tok, data = tiny
    task = ARC("ARC-Easy", "test", data_dir=data)
    expected = 0
    with torch.no_grad():
        for ex in task:  # by hand: one prompt, logits at its last position, allowed letters only
            prompt = tok.render_for_completion(ex)
            assert prompt[-1] == tok.encode_special("<|assistant_start|>")
            logits = model(torch.tensor([prompt]))[0, -1]
            ids = [tok.encode(letter)[0] for letter in ex["letters"]]
            expected += int(ex["letters"][int(logits[ids].argmax())] == ex["messages"][-1]["content"])
    counts = {bs: run_categorical_eval(task, tok, model, bs, return_counts=True) for bs in (1, 4, 13, 32)}
    assert all(c == (expected, 13) for c in counts.values()), counts
    assert run_categorical_eval(task, tok, model, 4) == pytest.approx(expected / 13)
    assert run_categorical_eval(task, tok, model, 4, max_problems=5, return_counts=True)[1] == 5
    assert run_chat_eval("ARC-Easy", model, tok, None, batch_size=3, data_dir=data) == pytest.approx(expected / 13)


class FavorLetter(torch.nn.Module):
    """Logits that favor letter `good` at <|assistant_start|> positions and letter `bad` elsewhere:
    only a loop that reads the last prompt position answers `good`."""

    def __init__(self, tok, good, bad):
        super().__init__()
        self.vocab = tok.get_vocab_size()
        self.start = tok.encode_special("<|assistant_start|>")
        self.good, self.bad = tok.encode(good)[0], tok.encode(bad)[0]
        self.param = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.param.device

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab)
        at_start = idx == self.start
        logits[..., self.good] = at_start.float() * 5
        logits[..., self.bad] = (~at_start).float() * 10
        return logits


def test_categorical_reads_the_last_prompt_position(tiny):
    from nanochat.tasks.arc import ARC

    _, tok, data = tiny
    task = ARC("ARC-Easy", "test", data_dir=data)
    answers = [ex["messages"][-1]["content"] for ex in task]
    passed, total = run_categorical_eval(task, tok, FavorLetter(tok, "B", "A"), batch_size=5, return_counts=True)
    assert (passed, total) == (answers.count("B"), 13)


def test_letters_must_be_single_tokens(tiny):
    _, tok, _ = tiny
    assert len(letter_token_ids(tok, ["A", "B"])) == 2
    with pytest.raises(NanochatError, match="single-token letters"):
        letter_token_ids(tok, ["A", "\u00e9\u00e8\u00ea"])


# -----------------------------------------------------------------------------
# Generative (with a scripted engine, then the real Engine)


class ScriptedEngine:
    """generate_batch returns prompt + the tokens of scripted completions (one per sample)."""

    def __init__(self, tok, completions):
        self.tok, self.completions, self.calls = tok, completions, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append((len(tokens), num_samples, kwargs))
        texts = self.completions(tokens)[:num_samples]
        return [list(tokens) + self.tok.encode(t) for t in texts], [[0] * len(tokens) for _ in texts]


def test_generative_pass_at_k_over_samples(tiny):
    from nanochat.tasks.gsm8k import GSM8K

    model, tok, data = tiny
    task = GSM8K("main", "test", data_dir=data)
    truth = {tuple(tok.render_for_completion(ex)): ex["messages"][-1]["content"][-1]["text"] for ex in task}
    engine = ScriptedEngine(tok, lambda prompt: ["#### 999999", truth[tuple(prompt)]])  # 2nd sample is right
    assert run_generative_eval(task, tok, model, engine, 1, 64, 0.0, 50) == 0.0
    assert run_generative_eval(task, tok, model, engine, 2, 64, 0.7, 20) == 1.0
    assert engine.calls[-1][1:] == (2, {"max_tokens": 64, "temperature": 0.7, "top_k": 20})
    engine.calls.clear()
    assert run_generative_eval(task, tok, model, engine, 2, 64, 0.7, 20, max_problems=2, return_counts=True) == (2, 2)
    assert len(engine.calls) == 2
    # a prompt that does not fit the context leaves no room to answer: it fails, evaluation goes on
    model.config.sequence_len, saved = len(tok.render_for_completion(task[0])), model.config.sequence_len
    try:
        passed, total = run_generative_eval(task, tok, model, engine, 2, 64, 0.7, 20, return_counts=True)
    finally:
        model.config.sequence_len = saved
    assert total == 3 and passed < 3


def test_humaneval_crashes_do_not_stop_evaluation(tiny):
    from nanochat.tasks.humaneval import HumanEval

    model, tok, data = tiny
    task = HumanEval(data_dir=data)
    bad = {"Toy/0": "def f0(x):\n    return f0(x)\n",  # RecursionError
           "Toy/1": "import os\nos._exit(3)\n"}          # kills its interpreter

    def complete(prompt):
        ex = next(e for e in task if tok.render_for_completion(e) == prompt)
        i = int(ex["task_id"].split("/")[1])
        return [bad.get(ex["task_id"], f"```python\ndef f{i}(x):\n    return x + {i}\n```")]

    assert run_generative_eval(task, tok, model, ScriptedEngine(tok, complete), 1, 64, 0.0, 50,
                               return_counts=True) == (1, 3)


@needs_engine
def test_gsm8k_with_the_real_engine_on_a_tiny_model(tiny):
    model, tok, data = tiny
    acc = run_chat_eval("GSM8K", model, tok, Engine(model, tok), max_new_tokens=8, max_problems=2, data_dir=data)
    assert acc == 0.0  # a random model does not do arithmetic; the loop ran end to end


# -----------------------------------------------------------------------------
# Two ranks (gloo on CPU): work is strided and the counts summed, so both ranks get 1-rank's answer


def _rank_counts(tok, model, data):
    from nanochat.tasks.arc import ARC
    from nanochat.tasks.gsm8k import GSM8K

    arc = ARC("ARC-Easy", "test", data_dir=data)
    gsm = GSM8K("main", "test", data_dir=data)
    right = {tuple(tok.render_for_completion(gsm[i])): gsm[i]["messages"][-1]["content"][-1]["text"] for i in (0, 1)}
    engine = ScriptedEngine(tok, lambda prompt: [right.get(tuple(prompt), "#### -1")])  # problems 0 and 1 pass
    return {"cat": run_categorical_eval(arc, tok, model, 4, return_counts=True),
            "gen": run_generative_eval(gsm, tok, model, engine, 1, 16, 0.0, 50, return_counts=True),
            "calls": len(engine.calls)}


def _dist_worker(rank, world, init_file, tok_dir, data, out_dir):
    import torch.distributed as dist

    from nanochat.tokenizer import Tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = Tokenizer.from_directory(tok_dir)
        result = _rank_counts(tok, build_tiny_model(tok.get_vocab_size()), data)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_stride_the_work_and_sum_the_counts(tiny, tmp_path):
    import torch.multiprocessing as mp

    model, tok, data = tiny
    single = _rank_counts(tok, model, data)
    tok_dir = os.path.join(os.path.dirname(data), "tokenizer")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), tok_dir, data, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    for r in ranks:
        assert r["cat"] == list(single["cat"]) and r["gen"] == list(single["gen"]) == [2, 3]
    assert [r["calls"] for r in ranks] == [2, 1]  # problems 0, 2 on rank 0; problem 1 on rank 1


def _missing_on_one_rank_worker(rank, world, init_file, tok_dir, data, out_dir):
    import datetime

    import torch.distributed as dist

    from nanochat.tokenizer import Tokenizer

    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"  # rank 1 must find its data missing at once, not after network retries
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        tok = Tokenizer.from_directory(tok_dir)
        model = build_tiny_model(tok.get_vocab_size())
        try:  # rank 1 has no task data (another node without the files)
            outcome = f"ok {run_chat_eval('ARC-Easy', model, tok, None, data_dir=data if rank == 0 else out_dir)}"
        except TaskDataMissing:
            outcome = "missing"
        except Exception as e:  # a collective that found its peer gone
            outcome = f"error {type(e).__name__}"
        with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


def test_task_missing_on_one_rank_is_missing_on_every_rank(tiny, tmp_path):
    """A rank without the data must not skip the count all-reduce its peers enter: every rank
    agrees the task is missing (so chat_sft / chat_eval skip it together)."""
    import torch.multiprocessing as mp

    _, _, data = tiny
    tok_dir = os.path.join(os.path.dirname(data), "tokenizer")
    mp.spawn(_missing_on_one_rank_worker, args=(2, str(tmp_path / "init"), tok_dir, data, str(tmp_path)), nprocs=2,
             join=True)
    assert [open(tmp_path / f"{r}.txt").read() for r in range(2)] == ["missing", "missing"]


# -----------------------------------------------------------------------------
# ChatCORE and errors


def test_chatcore_centers_on_baselines_and_flags_partial():
    full = {"ARC-Easy": 0.25, "ARC-Challenge": 1.0, "MMLU": 0.625, "GSM8K": 0.5, "HumanEval": 0.0, "SpellingBee": 1.0}
    assert chatcore(full) == pytest.approx((0 + 1 + 0.5 + 0.5 + 0 + 1) / 6) and chatcore_is_complete(full)
    part = {"ARC-Easy": 0.625, "GSM8K": 0.25}
    assert chatcore(part) == pytest.approx((0.5 + 0.25) / 2) and not chatcore_is_complete(part)
    assert math.isnan(chatcore({}))
    assert set(ALL_TASKS) == set(full)


def test_unknown_task_and_missing_data_are_clear_errors(tiny, tmp_path):
    model, tok, _ = tiny
    with pytest.raises(NanochatError, match="unknown chat eval task 'Nope'"):
        run_chat_eval("Nope", model, tok, None)
    with pytest.raises(TaskDataMissing, match="MMLU"):
        run_chat_eval("MMLU", model, tok, None, data_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# scripts/chat_eval


def test_chat_eval_script_end_to_end(tmp_path, capsys, monkeypatch):
    from scripts import chat_eval

    info = make_tiny_base_checkpoint(os.environ["NANOCHAT_BASE_DIR"])
    data = make_task_data(str(tmp_path / "td"))
    tasks = "ARC-Easy|GSM8K" if Engine is not None else "ARC-Easy"
    summary = chat_eval.main(["-i", "base", "-a", tasks, "-x", "2", "-m", "8", "-b", "2", "--device-type", "cpu",
                              "--data-dir", data, "-g", info["model_tag"]])
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["chat_eval"]["results"] == summary["results"] and set(summary["results"]) == set(tasks.split("|"))
    assert last["chat_eval"]["chatcore_complete"] is False and "ChatCORE (partial" in out
    report = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "report", "chat-evaluation-base.md")
    try:
        import nanochat.report  # noqa: F401
        assert os.path.isfile(report)
    except ImportError:
        pass

    # default task list: tasks without data offline are skipped with a warning, not fatal
    summary = chat_eval.main(["-i", "base", "-x", "1", "-m", "4", "--device-type", "cpu", "--data-dir", data])
    if Engine is not None:
        assert set(summary["results"]) == {"ARC-Easy", "GSM8K", "HumanEval", "SpellingBee"}
    assert summary["missing"] == ["ARC-Challenge", "MMLU"]
    assert "warning: skipping MMLU" in capsys.readouterr().out

    with pytest.raises(TaskDataMissing):  # a task named with -a must have its data
        chat_eval.main(["-i", "base", "-a", "MMLU", "--device-type", "cpu", "--data-dir", data])
    with pytest.raises(NanochatError, match="unknown task Nope"):
        chat_eval.parse_args(["-i", "sft", "-a", "ARC-Easy|Nope"])
    with pytest.raises(SystemExit):
        chat_eval.parse_args([])  # -i is required
