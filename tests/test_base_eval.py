"""scripts/base_eval end to end on a tiny random checkpoint: CORE table + CSV + JSON line,
bpb on tiny shards, samples, the partial label, and clear errors for bad input."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import NanochatError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_BUNDLE = os.path.join(REPO, "..", "shared", "data", "eval_bundle")
if REPO not in sys.path:  # `scripts` is not installed (only `nanochat` is): import it from the checkout
    sys.path.insert(0, REPO)

_WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "red", "blue", "runs", "sleeps"]


def _texts(n, seed):
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(n)]


def _bundle(root):
    """Three small tasks, one of each type."""
    tasks = {
        "copa": ("multiple_choice", 0, [{"query": f"The {w} is", "choices": ["red.", "blue."], "gold": i % 2}
                                         for i, w in enumerate(_WORDS)]),
        "winograd": ("schema", 0, [{"context_options": [f"The {w} runs", f"The {w} sleeps"],
                                     "continuation": "today.", "gold": i % 2} for i, w in enumerate(_WORDS)]),
        "bigbench_operators": ("language_modeling", 2, [{"context": f"The {w}", "continuation": "runs"}
                                                         for w in _WORDS]),
    }
    os.makedirs(os.path.join(root, "eval_data", "x"), exist_ok=True)
    lines = ["icl_tasks:"]
    for label, (ttype, shots, rows) in tasks.items():
        with open(os.path.join(root, "eval_data", "x", label + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        lines += [f"- label: {label}", f"  dataset_uri: x/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {ttype}", '  continuation_delimiter: " "']
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\ncopa,50\nwinograd,50\nbigbench_operators,0\n")
    return root


@pytest.fixture
def tiny_run(tmp_path):
    """Tokenizer + shards + a random-init d1 checkpoint under this test's NANOCHAT_BASE_DIR."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.dataset import write_shard
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    base = os.environ["NANOCHAT_BASE_DIR"]
    texts = _texts(120, 0)
    tok = Tokenizer.train_from_iterator(iter(texts), vocab_size=300)
    tok.save(os.path.join(base, "tokenizer"))
    data_dir = os.path.join(base, "tiny_data")
    os.makedirs(data_dir)
    write_shard(os.path.join(data_dir, "shard_00000.parquet"), texts[:100], 16)
    write_shard(os.path.join(data_dir, "shard_00001.parquet"), texts[100:], 16)
    config = GPTConfig(sequence_len=32, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64, window_pattern="L")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    meta = {"step": 7, "model_config": dict(config.__dict__), "user_config": {}}
    save_checkpoint(os.path.join(base, "base_checkpoints", "d1"), 7, model.state_dict(), None, meta)
    return {"base": base, "data_dir": data_dir, "bundle": _bundle(str(tmp_path / "bundle"))}


def _run(argv, capsys):
    from scripts import base_eval
    summary = base_eval.main(argv)
    out = capsys.readouterr().out
    last = json.loads(out.strip().splitlines()[-1])
    return summary, out, last


def test_all_three_evals_in_process(tiny_run, capsys):
    summary, out, last = _run(["--device-type=cpu", f"--bundle-dir={tiny_run['bundle']}", f"--data-dir={tiny_run['data_dir']}",
                               "--device-batch-size=2", "--split-tokens=128"], capsys)
    res = last["base_eval"]
    assert res["step"] == 7 and res["model"] == "base/d1@7" and set(res["results"]) == {"copa", "winograd", "bigbench_operators"}
    assert res["core_partial"] and len(res["tasks_missing"]) == 19
    assert 0 < res["train_bpb"] < 20 and 0 < res["val_bpb"] < 20
    assert len(res["samples"]["greedy"]) == 7 and len(res["samples"]["unconditioned"]) == 8
    assert "CORE (partial: 3/22 tasks)" in out
    path = os.path.join(tiny_run["base"], "base_eval", "base_model_000007.csv")
    assert res["csv"] == path
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Task", "Accuracy", "Centered"] and [r[0] for r in rows[1:4]] == list(res["results"])
    assert rows[-1][0] == "CORE (partial: 3/22 tasks)" and float(rows[-1][2]) == pytest.approx(res["core_metric"], abs=1e-6)
    for r in rows[1:4]:
        assert float(r[1]) == pytest.approx(res["results"][r[0]], abs=1e-6)


def test_core_modes_agree(tiny_run, capsys):
    """The original nanochat's one full forward per example, the CPU default (shared prefix) and packing give
    the same CORE results."""
    common = ["--device-type=cpu", "--eval=core", f"--bundle-dir={tiny_run['bundle']}"]
    results = []
    for extra in (["--core-batch-tokens=0", "--core-share-prefix=off"], [], ["--core-batch-tokens=2048"]):
        _, _, last = _run(common + extra, capsys)
        results.append(last["base_eval"]["results"])
    assert results[0] == results[1] == results[2]


def test_bad_input(tiny_run, capsys, tmp_path):
    from scripts import base_eval
    with pytest.raises(NanochatError, match="unknown evaluation"):
        base_eval.main(["--eval=core,nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanochatError, match="no core.yaml"):
        base_eval.main(["--device-type=cpu", "--eval=core", f"--bundle-dir={tmp_path / 'empty'}"])
    with pytest.raises(NanochatError, match="unknown CORE task"):
        base_eval.main(["--device-type=cpu", "--eval=core", f"--bundle-dir={tiny_run['bundle']}", "--core-tasks=copa,xyz"])
    with pytest.raises(NanochatError, match="less than one batch"):
        base_eval.main(["--device-type=cpu", "--eval=bpb", f"--data-dir={tiny_run['data_dir']}", "--split-tokens=10"])
    with open(os.path.join(tiny_run["bundle"], "eval_data", "x", "copa.jsonl"), "a") as f:
        f.write("{broken\n")
    with pytest.raises(NanochatError, match=r"copa\.jsonl:13: not valid JSON"):
        base_eval.main(["--device-type=cpu", "--eval=core", f"--bundle-dir={tiny_run['bundle']}"])


def test_hf_path_without_transformers_is_a_clear_error(tiny_run, monkeypatch):
    from scripts import base_eval
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(NanochatError, match=r"pip install -e '\.\[hf\]'"):
        base_eval.main(["--device-type=cpu", "--hf-path=gpt2", "--eval=core"])


def test_cli_subprocess_and_real_bundle(tiny_run):
    """python -m scripts.base_eval as a user runs it: exit 0 and the JSON line; on the real bundle
    (18 of 22 tasks) when ../shared/data is present, else on the small one."""
    bundle = REAL_BUNDLE if os.path.isdir(REAL_BUNDLE) else tiny_run["bundle"]
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_DTYPE="float32", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "scripts.base_eval", "--device-type=cpu", "--eval=core", "--max-per-task=2",
           f"--bundle-dir={bundle}"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])["base_eval"]
    assert res["core_partial"]
    if bundle == REAL_BUNDLE:
        assert len(res["results"]) == 18 and {"hellaswag", "squad", "coqa"} <= set(res["tasks_missing"])
        with open(res["csv"], newline="") as f:
            assert list(csv.reader(f))[-1][0] == "CORE (partial: 18/22 tasks)"
    # an expected failure: one line on stderr, exit status 2
    p = subprocess.run(cmd[:-1] + [f"--bundle-dir={tiny_run['base']}/nowhere.zip"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:") and "does not exist" in p.stderr


class _FakeHFTokenizer:
    """Byte-level stand-in for a transformers tokenizer: ids 0..255 are bytes, 256 is <eos>."""
    bos_token_id = None
    eos_token_id = 256
    all_special_ids = [256]

    def __len__(self):
        return 257

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _FakeHFModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"n_positions": 24, "vocab_size": 257})()
        self.emb = torch.nn.Embedding(257, 257)

    def forward(self, input_ids):
        assert input_ids.size(1) <= 24, "longer than n_positions"
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_hf_path_with_a_stand_in_transformers(tiny_run, capsys, monkeypatch):
    """The HF wrapper: logits from .logits, context cropped to n_positions, EOS as BOS, token_bytes
    from decoded strings, bpb through the same loader, samples skipped."""
    import types
    fake = types.ModuleType("transformers")
    fake.AutoModelForCausalLM = type("A", (), {"from_pretrained": staticmethod(lambda path: _FakeHFModel())})
    fake.AutoTokenizer = type("B", (), {"from_pretrained": staticmethod(lambda path: _FakeHFTokenizer())})
    monkeypatch.setitem(sys.modules, "transformers", fake)
    from scripts import base_eval
    model, tok, token_bytes, seq_len = base_eval.load_hf_model("org/fake", "cpu")
    assert seq_len == 24 and tok.get_bos_token_id() == 256
    assert token_bytes[256] == 0 and token_bytes[ord("a")] == 1 and token_bytes[200] == 3  # '\ufffd' is 3 bytes
    summary, out, last = _run(["--device-type=cpu", "--hf-path=org/fake", f"--bundle-dir={tiny_run['bundle']}",
                               f"--data-dir={tiny_run['data_dir']}", "--device-batch-size=2", "--split-tokens=96"],
                              capsys)
    res = last["base_eval"]
    assert res["model"] == "org/fake" and "samples" not in res and res["train_bpb"] > 0
    assert res["csv"].endswith(os.path.join("base_eval", "org-fake.csv")) and os.path.exists(res["csv"])


def test_report_hook(tiny_run, capsys, monkeypatch):
    import types
    logged = []
    fake = types.ModuleType("nanochat.report")
    fake.get_report = lambda: type("R", (), {"log": staticmethod(lambda section, data: logged.append((section, data)))})()
    monkeypatch.setitem(sys.modules, "nanochat.report", fake)
    _run(["--device-type=cpu", "--eval=core", f"--bundle-dir={tiny_run['bundle']}"], capsys)
    assert len(logged) == 1 and logged[0][0] == "Base model evaluation"
    assert any(isinstance(d, dict) and "CORE (partial: 3/22 tasks)" in d for d in logged[0][1])
