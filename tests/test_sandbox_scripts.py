"""The scripts that grade model code refuse to start when the sandbox cannot (instead of scoring
every answer 0), and --sandbox strict refuses a degraded isolation level: chat_eval (HumanEval),
chat_rl (a reward that runs code) and chat_web."""

import gzip
import json
import os
import sys

import pytest
import torch
from helpers import make_tiny_base_checkpoint
from sandbox_helpers import force_degraded

from nanochat import execution
from nanochat.chat_eval import run_chat_eval
from nanochat.common import NanochatError
from scripts import chat_rl, chat_web

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-specific")


@pytest.fixture
def no_sandbox(monkeypatch):
    """A machine where no isolation level can start (like a rootless container where every run
    failed with "Invalid argument")."""
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")


@pytest.fixture
def humaneval_data(tmp_path):
    row = {"task_id": "Toy/0", "prompt": "def f(x):\n    \"\"\"x + 1\"\"\"\n", "canonical_solution": "    return x + 1\n",
           "entry_point": "f", "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    os.makedirs(tmp_path / "humaneval")
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(row) + "\n")
    return str(tmp_path)


class CPUModel:  # run_chat_eval checks the sandbox before it uses the model
    def get_device(self):
        return torch.device("cpu")


def test_chat_eval_humaneval_fails_loudly_without_a_sandbox(no_sandbox, humaneval_data):
    with pytest.raises(NanochatError, match="sandbox cannot start .* every code answer would score 0"):
        run_chat_eval("HumanEval", CPUModel(), None, None, data_dir=humaneval_data)


def test_chat_eval_strict_refuses_a_degraded_sandbox(monkeypatch, humaneval_data):
    force_degraded(monkeypatch)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "strict")
    with pytest.raises(NanochatError, match="strict refuses"):
        run_chat_eval("HumanEval", CPUModel(), None, None, data_dir=humaneval_data)


def test_chat_web_sandbox_strict_refuses_to_start_degraded(monkeypatch):
    force_degraded(monkeypatch)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "auto")  # the flag wins over it, and is not exported
    with pytest.raises(NanochatError, match="strict refuses .*apt-get install bubblewrap"):
        chat_web.main(["--sandbox", "strict", "--device-type", "cpu"])
    assert os.environ["NANOCHAT_SANDBOX"] == "auto"


class RunsCode:
    """A toy RL task whose reward would run model code."""
    executes_code = True

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"write f {i}"}, {"role": "assistant", "content": "x"}]}

    def evaluate(self, conversation, response):
        return 0

    def reward(self, conversation, response):
        return 0.0


def test_chat_rl_with_a_code_reward_fails_loudly_without_a_sandbox(tmp_path, monkeypatch, no_sandbox):
    base = make_tiny_base_checkpoint(str(tmp_path), seq_len=64, steps=1)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base["base_dir"])
    argv = ["-i", "base", "--model-tag=tiny", "--num-iterations=1", "--device-batch-size=2", "--num-samples=2",
            "--examples-per-step=1", "--max-new-tokens=2", "--eval-every=-1", "--device-type=cpu"]
    with pytest.raises(NanochatError, match="sandbox cannot start"):
        chat_rl.main(argv, train_task=RunsCode())
