"""scripts/chat_cli.py against a tiny checkpoint: single-shot answers, the
interactive loop through a pipe (clear, EOF), clear errors, and keeping the conversation
within the context."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_tokenizer, subprocess_env

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig


def make_checkpoint(base_dir, tag="d1", vocab_size=300, sequence_len=64):
    tok = make_tokenizer(base_dir, vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64,
                       window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        # init's lm_head is nearly silent: give it opinions, but never for a special token, so
        # the random model answers with text instead of ending at once
        model.lm_head.weight.normal_(0.0, 2.0)
        model.lm_head.weight[tok.get_vocab_size() - 9:] = 0.0
    meta = {"step": 5, "model_config": dataclasses.asdict(config), "user_config": {"depth": 1}}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", tag), 5, model.state_dict(), None, meta)
    return tok


def run_cli(base_dir, args, stdin="", timeout=120):
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO, input=stdin, text=True,
                          capture_output=True, timeout=timeout,
                          env=subprocess_env(base_dir, NANOCHAT_ENGINE_COMPILE="0"))


@pytest.fixture
def base_dir():
    base = os.environ["NANOCHAT_BASE_DIR"]
    make_checkpoint(base)
    return base


def test_single_shot_answers(base_dir):
    r = run_cli(base_dir, ["-i", "base", "-p", "hello", "--max-tokens", "8", "-t", "0"])
    assert r.returncode == 0, r.stderr
    answer = r.stdout.strip()
    assert answer  # the tiny random model says something
    again = run_cli(base_dir, ["-i", "base", "-p", "hello", "--max-tokens", "8", "-t", "0"])
    assert again.stdout.strip() == answer  # greedy: the same answer


def test_top_p(base_dir):
    """--top-p so small that only the most likely token survives gives the greedy answer."""
    greedy = run_cli(base_dir, ["-i", "base", "-p", "hello", "--max-tokens", "8", "-t", "0"])
    nucleus = run_cli(base_dir, ["-i", "base", "-p", "hello", "--max-tokens", "8", "-t", "1", "--top-p", "1e-6"])
    assert nucleus.returncode == 0, nucleus.stderr
    assert nucleus.stdout.strip() == greedy.stdout.strip()
    bad = run_cli(base_dir, ["-i", "base", "-p", "hello", "--top-p", "0"])
    assert bad.returncode != 0 and "--top-p must be in (0, 1]" in bad.stderr


def test_interactive_through_a_pipe(base_dir):
    r = run_cli(base_dir, ["-i", "base", "--max-tokens", "6"], stdin="hi\n\nclear\nhi\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2  # the empty line was ignored
    assert "(conversation cleared)" in r.stdout
    first, second = [part.split("\n")[0] for part in r.stdout.split("Assistant:")[1:]]
    assert first == second  # after clear, the same prompt (and seed) gives the same answer
    r = run_cli(base_dir, ["-i", "base"], stdin="quit\nhi\n")
    assert r.returncode == 0 and "Assistant:" not in r.stdout


def test_missing_checkpoint_is_one_clear_error(base_dir):
    r = run_cli(base_dir, ["-i", "sft", "-p", "hello"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "checkpoints" in lines[-1] and "Traceback" not in r.stderr
    assert sum(line.startswith("error:") for line in lines) == 1


def test_vocab_mismatch_is_one_clear_error(tmp_path):
    base = str(tmp_path)
    make_checkpoint(base, vocab_size=320)  # the model expects 320 tokens, the tokenizer has 300
    r = run_cli(base, ["-i", "base", "-p", "hello"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "300" in r.stderr and "320" in r.stderr


def test_conversation_drops_oldest_turns_to_fit():
    sys.path.insert(0, str(REPO))
    from scripts.chat_cli import Conversation

    tok = make_tokenizer(os.environ["NANOCHAT_BASE_DIR"], vocab_size=300)
    conv = Conversation(tok, sequence_len=64, max_tokens=16)
    end = tok.encode_special("<|assistant_end|>")
    for i in range(6):
        prompt, dropped = conv.prompt_for("the cat sees the moon")
        assert prompt is not None and len(prompt) + 16 <= 64
        assert prompt[0] == tok.get_bos_token_id() and prompt[-1] == tok.encode_special("<|assistant_start|>")
        conv.add_turn(prompt, [40 + i] * 10 + [end])
        if i >= 2:
            assert dropped >= 1  # three turns of ~20 tokens no longer fit with 16 tokens of room
    assert conv.turns[-1][-11:] == [45] * 10 + [end]
    prompt, _ = conv.prompt_for("a " * 80)
    assert prompt is None  # a message that cannot fit even alone


def test_too_long_message_keeps_the_conversation():
    """A message that cannot fit is refused without dropping the turns that came before it."""
    sys.path.insert(0, str(REPO))
    from scripts.chat_cli import Conversation

    tok = make_tokenizer(os.environ["NANOCHAT_BASE_DIR"], vocab_size=300)
    conv = Conversation(tok, sequence_len=64, max_tokens=16)
    prompt, _ = conv.prompt_for("the cat")
    conv.add_turn(prompt, [40] * 5 + [tok.encode_special("<|assistant_end|>")])
    turns = [list(t) for t in conv.turns]
    assert conv.prompt_for("a " * 80) == (None, 0)
    assert conv.turns == turns
