"""Issue 15, items 7-11 and 14: no float64 on the device (Apple's MPS has none), fp16 loss
scaling in SFT/RL, the batch-size/weight-decay rule for every tokens:params ratio, optimizer
shards from ranks that own no rows, the loss under no_grad, and the initial weights' draw order.
Tiny models on CPU."""

import contextlib
import io
import os

import pytest
import torch
from helpers import make_tiny_base_checkpoint
from test_chat_rl import EvenFirstChar
from test_chat_sft import _conversations, _write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scripts import chat_rl, chat_sft


class NoFloat64(TorchDispatchMode):
    """Fails the first op that makes a float64 tensor. The code has no device-dependent branch
    for these dtypes, so what runs here on CPU is what would run on MPS."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor; MPS has no float64")
        return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("i15_base"))
    info = make_tiny_base_checkpoint(base_dir, seq_len=128)
    info["train"] = _write_jsonl(os.path.join(base_dir, "train.jsonl"), _conversations(60, seed=1))
    info["val"] = _write_jsonl(os.path.join(base_dir, "val.jsonl"), _conversations(20, seed=2))
    return info


@pytest.fixture
def base_env(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base["base_dir"])
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return base


def _sft_args(base, tag, steps, extra=()):
    return [f"--model-tag={base['model_tag']}", f"--mixture={base['train']}", f"--val-mixture={base['val']}",
            f"--num-iterations={steps}", "--device-batch-size=2", "--total-batch-size=256", "--eval-every=1",
            "--eval-tokens=512", "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12",
            "--device-type=cpu", f"--output-tag={tag}", *extra]


def _rl_args(tag, steps, extra=()):
    return ["-i", "base", "--model-tag=tiny", f"--num-iterations={steps}", "--device-batch-size=4", "--num-samples=4",
            "--examples-per-step=1", "--max-new-tokens=2", "--eval-every=1", "--eval-examples=2",
            "--save-every=-1", "--device-type=cpu", "--peak-flops=1e12", f"--output-tag={tag}", *extra]


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# -----------------------------------------------------------------------------
# item 7: float64 never reaches the device


def test_item7_sft_stop_flags_and_bpb_make_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_sft.main, _sft_args(base_env, "f64", 2))  # eval at steps 0, 1, 2
    assert summary["steps"] == 2


def test_item7_sft_epoch_mode_makes_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_sft.main, _sft_args(base_env, "f64epoch", 0, ["--eval-every=-1", "--total-batch-size=2048"]))
    assert summary["steps"] >= 1


def test_item7_rl_stats_and_pass_at_k_make_no_float64(base_env):
    with NoFloat64():
        summary = _quiet(chat_rl.main, _rl_args("f64", 1), train_task=EvenFirstChar(4), val_task=EvenFirstChar(4))
    assert summary["steps"] == 1
