"""chat_rl: the REINFORCE loss (zero gradient for a tied group, pushes up a rewarded sequence),
rollout masking, learning a toy reward, exact resume, GSM8K end to end on the shared data, and
clear errors. Tiny models on CPU; the Engine's decode step runs eagerly."""

import contextlib
import io
import json
import os

import pytest
import torch
from helpers import SHARED_DATA, make_tiny_base_checkpoint

from nanochat.checkpoint import load_checkpoint
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig
from scripts import chat_rl


@pytest.fixture(autouse=True)
def _eager_engine(monkeypatch):
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")  # compiling the decode step costs more than these runs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_gpt(seed=0, vocab=64):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=64, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    # a non-trivial head so log-probs differ between sequences
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model


def _group(vocab=64, rows=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length + 1), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, :4] = -1  # the prompt
    targets[1, 8:] = -1  # a shorter answer, padded
    return inputs, targets


def _seq_logp(model, inputs, targets, row):
    return -model(inputs[row:row + 1], targets[row:row + 1], loss_reduction="none").sum()


def test_rl_loss_gradient_is_zero_when_the_group_ties():
    model = _tiny_gpt()
    inputs, targets = _group()
    for reward in (0.0, 1.0):
        rewards = torch.full((4,), reward)
        advantages = rewards - rewards.mean()
        model.zero_grad(set_to_none=True)
        loss = chat_rl.rl_loss(model, inputs, targets, advantages, normalizer=2.0)
        loss.backward()
        assert loss.item() == 0.0
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


def test_rl_loss_pushes_up_the_rewarded_sequence():
    model = _tiny_gpt()
    inputs, targets = _group()
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    advantages = rewards - rewards.mean()
    loss = chat_rl.rl_loss(model, inputs, targets, advantages)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # gradient descent on the loss moves along the rewarded sequence's log-prob gradient ...
    logp0 = _seq_logp(model, inputs, targets, 0)
    g0 = torch.autograd.grad(logp0, list(model.parameters()))
    assert sum((a * b).sum() for a, b in zip(g0, grads)).item() < 0
    # ... so a small step raises its log-prob and lowers the unrewarded ones' on average
    with torch.no_grad():
        before = [_seq_logp(model, inputs, targets, r).item() for r in range(4)]
        for p, g in zip(model.parameters(), grads):
            p -= 0.05 * g
        after = [_seq_logp(model, inputs, targets, r).item() for r in range(4)]
    assert after[0] > before[0]
    assert sum(after[1:]) < sum(before[1:])
    # the normalisation: per valid token, times the normaliser
    valid = (targets >= 0).sum()
    loss_n = chat_rl.rl_loss(model, inputs, targets, advantages, normalizer=3.0)
    with torch.no_grad():
        logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)
        expected = -(logp * advantages[:, None]).sum() / (valid * 3.0)
    assert torch.allclose(loss_n, expected, rtol=1e-6, atol=0)


def test_rollout_tensors_mask_prompt_tool_output_and_padding():
    # prompt of 3 (mask 0), then sampled 1, forced tool output 0 0, sampled 1; the second row is shorter
    seqs = [[10, 11, 12, 20, 21, 22, 23], [10, 11, 12, 30]]
    masks = [[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1]]
    inputs, targets, rewards, adv = chat_rl.rollout_tensors(seqs, masks, [1.0, 0.0], pad_id=99, device="cpu")
    assert inputs.tolist() == [[10, 11, 12, 20, 21, 22], [10, 11, 12, 30, 99, 99]]
    assert targets.tolist() == [[-1, -1, 20, -1, -1, 23], [-1, -1, 30, -1, -1, -1]]
    assert rewards.tolist() == [1.0, 0.0] and adv.tolist() == [0.5, -0.5]


def test_example_index_strides_ranks_and_wraps():
    got = [[chat_rl.example_index(s, i, 2, r, 2, 7) for s in range(3) for i in range(2)] for r in range(2)]
    assert got == [[0, 2, 4, 6, 0, 2], [1, 3, 5, 1, 3, 5]]
    assert chat_rl.sampling_seed(3, 5, 1) == chat_rl.sampling_seed(3, 5, 1) != chat_rl.sampling_seed(3, 5, 0)


class EvenFirstChar:
    """A toy task: reward 1 when the answer's first character has an even code point. Half the
    tokens qualify, so the untrained model earns about 0.5 and can learn to earn more."""

    def __init__(self, n=16):
        self.prompts = [f"Say anything number {i}." for i in range(n)]

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": self.prompts[i]}, {"role": "assistant", "content": "b"}]}

    def evaluate(self, conversation, response):
        return int(len(response) > 0 and ord(response[0]) % 2 == 0)

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("rl_base"))
    return make_tiny_base_checkpoint(base_dir, seq_len=128)


@pytest.fixture
def base_env(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base["base_dir"])
    return base


def _rl_args(tag, steps, extra=()):
    return ["-i", "base", "--model-tag=tiny", f"--num-iterations={steps}", "--device-batch-size=8", "--num-samples=8",
            "--examples-per-step=2", "--max-new-tokens=3", "--init-lr-frac=1.0", "--eval-every=-1",
            "--save-every=-1", "--device-type=cpu", "--peak-flops=1e12", f"--output-tag={tag}", *extra]


def _run_rl(argv, **tasks):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = chat_rl.main(argv, **tasks)
    return summary, out.getvalue()


def _log(base, tag, key):
    path = os.path.join(base["base_dir"], "chatrl_checkpoints", tag, "train_log.jsonl")
    return [(r["step"], r[key]) for r in map(json.loads, open(path)) if key in r]


def test_rl_learns_a_toy_reward(base_env):
    steps = 12
    summary, out = _run_rl(_rl_args("toy", steps, ["--eval-every=6", "--eval-examples=4"]),
                           train_task=EvenFirstChar(), val_task=EvenFirstChar())
    rewards = [r for _, r in _log(base_env, "toy", "reward")]
    assert len(rewards) == steps
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"toy reward: first 3 steps {early:.3f}, last 3 steps {late:.3f}")
    # bound (seeded, so the run is reproducible): the last 3 steps earn >= 0.3 more than the
    # first 3, and at least 0.8 (measured here: 0.354 -> 0.917)
    assert late >= early + 0.3 and late >= 0.8, rewards
    passk = [v for _, v in _log(base_env, "toy", "pass@1")]
    assert len(passk) == 3  # steps 0, 6 and the last
    last = json.loads(out.strip().splitlines()[-1])["chat_rl"]
    assert last["steps"] == steps and last["last_reward"] == rewards[-1]
    _, _, meta = load_checkpoint(os.path.join(base_env["base_dir"], "chatrl_checkpoints", "toy"), steps, "cpu")
    assert meta["step"] == steps and len(meta["model_config"]) == 7


def test_rl_resume_is_exact(base_env, monkeypatch):
    steps = 4
    _run_rl(_rl_args("full", steps), train_task=EvenFirstChar())
    calls = {"n": 0}

    def requested(self, device, ddp):
        calls["n"] += 1
        self.signum = 15
        return calls["n"] > 2  # stop at step 2, after two updates

    monkeypatch.setattr(chat_rl.StopRequest, "requested", requested)
    with pytest.raises(SystemExit):
        _run_rl(_rl_args("split", steps), train_task=EvenFirstChar())
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_env["base_dir"])
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")
    _run_rl(_rl_args("split", steps, ["--resume-from-step=-1"]), train_task=EvenFirstChar())
    assert _log(base_env, "full", "reward") == _log(base_env, "split", "reward")
    root = os.path.join(base_env["base_dir"], "chatrl_checkpoints")
    a, oa, _ = load_checkpoint(os.path.join(root, "full"), steps, "cpu", load_optimizer=True)
    b, ob, _ = load_checkpoint(os.path.join(root, "split"), steps, "cpu", load_optimizer=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")),
                    reason="needs ../shared/data/gsm8k")
def test_rl_on_gsm8k_end_to_end(tmp_path, monkeypatch):
    # GSM8K prompts run to ~400 tokens with the tiny tokenizer: this model has a 512 context
    info = make_tiny_base_checkpoint(str(tmp_path), seq_len=512, steps=1)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    summary, out = _run_rl(["-i", "base", "--model-tag=tiny", "--num-iterations=2", "--device-batch-size=2",
                            "--num-samples=2", "--examples-per-step=1", "--max-new-tokens=4", "--eval-every=2",
                            "--eval-examples=1", "--device-type=cpu", "--peak-flops=1e12",
                            f"--data-dir={SHARED_DATA}"])
    assert summary["steps"] == 2 and 0.0 <= summary["last_reward"] <= 1.0
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert os.path.exists(os.path.join(info["base_dir"], "chatrl_checkpoints", "tiny", "meta_000002.json"))


def test_missing_source_and_bad_flags_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(NanochatError, match="no sft model to start RL from"):
        chat_rl.main(["--device-type=cpu"])
    with pytest.raises(NanochatError, match="must be a multiple of --device-batch-size"):
        chat_rl.main(["--device-type=cpu", "--num-samples=6", "--device-batch-size=4"])


def test_two_gloo_ranks(base_env, tmp_path):
    import subprocess
    import sys

    from helpers import REPO, subprocess_env
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun beside {sys.executable}")
    data_dir = tmp_path / "task_data"
    (data_dir / "gsm8k").mkdir(parents=True)
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"<<{a}+{b}={a + b}>>\n#### {a + b}"}
            for a in range(1, 5) for b in range(1, 5)]
    for split in ("train", "test"):
        (data_dir / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["-i", "base", "--model-tag=tiny", "--num-iterations=2", "--device-batch-size=2", "--num-samples=4",
            "--examples-per-step=4", "--max-new-tokens=3", "--eval-every=2", "--eval-examples=4", "--device-type=cpu",
            "--peak-flops=1e12", "--output-tag=two", f"--data-dir={data_dir}"]
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_rl", "--", *argv],
                          cwd=REPO, env=subprocess_env(base_env["base_dir"], NANOCHAT_ENGINE_COMPILE="0"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()][:5]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["chat_rl"]
    assert summary["steps"] == 2 and set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert "2 problems x 4 samples per rank per step" in proc.stdout
    ckpt = os.path.join(base_env["base_dir"], "chatrl_checkpoints", "two")
    assert all(os.path.exists(os.path.join(ckpt, f"optim_000002_rank{r}.pt")) for r in (0, 1))
