"""chat_sft: the loss masks of the batches its loader yields, padding, rank striding, that SFT
lowers validation loss, exact resume, and clear errors on bad input. Tiny models on CPU."""

import contextlib
import io
import json
import os
import random
import re

import pytest
import torch
from helpers import make_tiny_base_checkpoint, synthetic_texts

from nanochat.checkpoint import load_checkpoint
from nanochat.common import NanochatError
from scripts import chat_sft

SEQ = 128


def _conversations(n, seed):
    """Chats in the tiny tokenizer's language: the assistant repeats the user's sentence, and a
    few use the python tool (supervised call, unsupervised output)."""
    rng = random.Random(seed)
    texts = synthetic_texts(n, seed=seed, min_sentences=1, max_sentences=1)
    convs = []
    for i, t in enumerate(texts):
        if i % 5 == 4:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            assistant = [{"type": "text", "text": "Let me add. "}, {"type": "python", "text": f"{a}+{b}"},
                         {"type": "python_output", "text": str(a + b)}, {"type": "text", "text": f" It is {a + b}."}]
            convs.append([{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": assistant}])
        elif i % 7 == 6:  # two turns
            convs.append([{"role": "user", "content": "Say: " + t}, {"role": "assistant", "content": t},
                          {"role": "user", "content": "Again."}, {"role": "assistant", "content": t}])
        else:
            convs.append([{"role": "user", "content": "Say: " + t}, {"role": "assistant", "content": t}])
    return convs


def _write_jsonl(path, convs):
    with open(path, "w") as f:
        for c in convs:
            f.write(json.dumps(c) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny base checkpoint (tokenizer + 4 base_train steps) shared by the module."""
    base_dir = str(tmp_path_factory.mktemp("sft_base"))
    info = make_tiny_base_checkpoint(base_dir, seq_len=SEQ)
    info["train"] = _write_jsonl(os.path.join(base_dir, "train.jsonl"), _conversations(160, seed=1))
    info["val"] = _write_jsonl(os.path.join(base_dir, "val.jsonl"), _conversations(40, seed=2))
    return info


@pytest.fixture
def base_env(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base["base_dir"])
    return base


def _tokenizer(base):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer(base["tokenizer_dir"])


def _expected_supervision(tokenizer, row):
    """Which positions of a packed row the loss should train on, derived from the special tokens
    alone: inside an assistant turn (after <|assistant_start|>, through <|assistant_end|>) except
    tool outputs (<|output_start|> ... <|output_end|>); never BOS padding or user turns."""
    s = tokenizer.encode_special
    a_start, a_end, o_start, o_end = (s("<|assistant_start|>"), s("<|assistant_end|>"),
                                      s("<|output_start|>"), s("<|output_end|>"))
    out, in_assistant, in_output = [], False, False
    for tok in row:
        if tok == a_start:
            in_assistant, sup = True, False
        elif tok == a_end:
            sup, in_assistant = in_assistant, False
        elif tok == o_start:
            in_output, sup = True, False
        elif tok == o_end:
            in_output, sup = False, False
        else:
            sup = in_assistant and not in_output
        out.append(sup)
    return out


def test_loader_masks_only_assistant_tokens(base):
    tok = _tokenizer(base)
    data = chat_sft.ConversationList(chat_sft.read_conversations(base["train"]))
    loader = chat_sft.SFTLoader(data, tok, batch_size=4, seq_len=SEQ, buffer_size=16)
    bos = tok.get_bos_token_id()
    python_start, python_end = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
    a_end = tok.encode_special("<|assistant_end|>")
    seen = {"python_start": 0, "python_end": 0, "assistant_end": 0, "padded_rows": 0}
    for _ in range(20):
        x, y, state = next(loader)
        assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.long
        for b in range(4):
            row, tgt = x[b].tolist(), y[b].tolist()
            assert row[0] == bos  # every row starts a conversation
            # the row's last token (index SEQ) only shows up as a target: append it when trained on
            full = row + ([tgt[-1]] if tgt[-1] >= 0 else [])
            expected = _expected_supervision(tok, full)
            for j in range(len(full) - 1):
                if expected[j + 1]:
                    assert tgt[j] == full[j + 1], f"row {b} pos {j}: a supervised target must be the next token"
                else:
                    assert tgt[j] == -1, f"row {b} pos {j}: token {full[j + 1]} must not be trained on"
            # padding: a run of BOS at the end of the row, all of it ignored
            content = len(row)
            while row[content - 1] == bos:
                content -= 1
            if content < SEQ:
                seen["padded_rows"] += 1
                assert all(t == -1 for t in tgt[content - 1:])
            supervised = [tgt[j] for j in range(SEQ) if tgt[j] >= 0]
            seen["python_start"] += supervised.count(python_start)
            seen["python_end"] += supervised.count(python_end)
            seen["assistant_end"] += supervised.count(a_end)
    # the tool call delimiters and the end of turn are trained on; padding occurs
    assert seen["python_start"] > 0 and seen["python_end"] > 0 and seen["assistant_end"] > 0, seen
    assert seen["padded_rows"] > 0


def test_loader_packs_whole_conversations_and_strides_ranks(base):
    tok = _tokenizer(base)
    convs = chat_sft.read_conversations(base["train"])[:30]
    data = chat_sft.ConversationList(convs)
    rendered = {i: tok.render_conversation(c, max_tokens=SEQ + 1)[0] for i, c in enumerate(convs)}
    reads = []
    for rank in range(2):
        loader = chat_sft.SFTLoader(data, tok, batch_size=2, seq_len=SEQ, rank=rank, world_size=2, buffer_size=4)
        read, render = [], loader._render
        loader._render = lambda idx, read=read, render=render: (read.append(idx), render(idx))[1]
        while loader.epoch == 1:
            next(loader)
        reads.append(read[:15])
    # rank r reads conversations r, r+2, r+4, ... in order
    assert reads == [list(range(0, 30, 2)), list(range(1, 30, 2))]
    # every row is a concatenation of whole rendered conversations followed by BOS padding
    loader = chat_sft.SFTLoader(data, tok, batch_size=3, seq_len=SEQ, buffer_size=8)
    bos = tok.get_bos_token_id()
    placed = []
    for _ in range(6):
        x, y, _ = next(loader)
        for b in range(3):
            row = x[b].tolist() + [y[b, -1].item() if y[b, -1] >= 0 else bos]
            pos = 0
            while pos < len(row) and not all(t == bos for t in row[pos:]):
                match = [i for i, r in rendered.items() if row[pos:pos + len(r)] == r]
                assert match, f"row {b} at {pos} is not the start of a whole conversation"
                placed.append(match[0])
                pos += len(rendered[match[0]])
    # every conversation taken from the buffer is in a row, whole
    assert len(placed) == loader.consumed


def test_loader_state_resumes_exactly(base):
    tok = _tokenizer(base)
    data = chat_sft.ConversationList(chat_sft.read_conversations(base["train"]))
    a = chat_sft.SFTLoader(data, tok, batch_size=2, seq_len=SEQ, buffer_size=10)
    for _ in range(5):
        _, _, state = next(a)
    b = chat_sft.SFTLoader(data, tok, batch_size=2, seq_len=SEQ, buffer_size=10, state=state)
    for _ in range(5):
        xa, ya, sa = next(a)
        xb, yb, sb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb


def _run(argv, quiet=True):
    out = io.StringIO()
    with contextlib.redirect_stdout(out if quiet else io.StringIO()):
        summary = chat_sft.main(argv)
    return summary, out.getvalue()


def _args(base, tag, steps, extra=()):
    return [f"--model-tag={base['model_tag']}", f"--mixture={base['train']}", f"--val-mixture={base['val']}",
            f"--num-iterations={steps}", "--device-batch-size=4", f"--total-batch-size={4 * SEQ}",
            "--eval-every=1000", f"--eval-tokens={4 * 4 * SEQ}", "--chatcore-every=-1", "--compile=0",
            "--peak-flops=1e12", "--device-type=cpu", f"--output-tag={tag}", "--init-lr-frac=1.0", *extra]


def test_sft_lowers_val_loss(base_env):
    summary, out = _run(_args(base_env, "lower", 30))
    # bound: 30 steps on the repeat-the-sentence chats take the tiny model's val bpb down by at least 30%
    assert summary["steps"] == 30
    assert summary["final_val_bpb"] < 0.7 * summary["initial_val_bpb"], summary
    last = json.loads(out.strip().splitlines()[-1])
    assert last["chat_sft"]["final_val_bpb"] == summary["final_val_bpb"]
    ckpt = os.path.join(base_env["base_dir"], "chatsft_checkpoints", "lower")
    _, _, meta = load_checkpoint(ckpt, 30, "cpu")
    assert meta["step"] == 30 and meta["val_bpb"] == summary["final_val_bpb"]
    assert len(meta["model_config"]) == 7 and meta["user_config"]["num_iterations"] == 30
    print(f"val bpb {summary['initial_val_bpb']:.4f} -> {summary['final_val_bpb']:.4f}")


def test_sft_inherits_from_base_and_runs_one_epoch(base_env):
    # no sizes given: max_seq_len/device batch/total batch come from the base meta (64, 2, 128);
    # no --num-iterations: one epoch of the mixture by consumption
    summary, out = _run([f"--model-tag={base_env['model_tag']}", f"--mixture={base_env['val']}", "--eval-every=-1",
                         "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12", "--device-type=cpu",
                         "--output-tag=epoch", "--load-optimizer=1"])
    assert "max_seq_len 128, device_batch_size 2, total_batch_size 256" in out
    assert "embedding 0.3, unembedding 0.008, matrix 0.02 (x0.8)" in out
    log = [json.loads(ln) for ln in open(os.path.join(base_env["base_dir"], "chatsft_checkpoints", "epoch", "train_log.jsonl"))]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == summary["steps"] > 0
    # 40 conversations of ~20-40 tokens, 2 rows of 129 per step: one epoch is a bounded number of steps
    assert 5 <= summary["steps"] <= 40
    # the progress-based schedule: flat for the first half, then linear to 0 (final_lr_frac 0)
    assert steps[0]["lrm"] == 1.0 and steps[-1]["lrm"] < 0.2
    # --load-optimizer: the base run's moments (its AdamW step counts continue from the base's 4
    # steps), but fresh SFT hyperparameters: inherited LRs x 0.8 and no weight decay
    assert "Loaded the base optimizer's moment buffers" in out
    n = summary["steps"]
    _, optim, _ = load_checkpoint(os.path.join(base_env["base_dir"], "chatsft_checkpoints", "epoch"), n, "cpu",
                                  load_optimizer=True)
    adamw_steps = {int(v["step"]) for v in optim["state"].values() if "step" in v}
    assert adamw_steps == {base_env["step"] + n}
    muon = [g for g in optim["param_groups"] if g["kind"] == "muon"]
    assert muon and all(g["initial_lr"] == pytest.approx(0.02 * 0.8) and g["weight_decay"] == 0.0 for g in muon)


def test_sft_resume_is_exact(base_env, monkeypatch):
    steps = 8
    accum = ["--eval-every=4", "--device-batch-size=2"]  # 2 micro-batches per step: resume mid-accumulation state
    full, out = _run(_args(base_env, "full", steps, accum))
    assert "gradient accumulation steps: 2" in out

    # interrupted: a stop request arrives after step 3 (as SIGTERM would), it saves and exits
    calls = {"n": 0}

    def requested(self, device, ddp):
        calls["n"] += 1
        self.signum = 15
        return calls["n"] > 3

    monkeypatch.setattr(chat_sft.StopRequest, "requested", requested)
    with pytest.raises(SystemExit) as e:
        _run(_args(base_env, "split", steps, accum))
    assert e.value.code == 128 + 15
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_env["base_dir"])
    resumed, _ = _run(_args(base_env, "split", steps, accum + ["--resume-from-step=-1"]))

    root = os.path.join(base_env["base_dir"], "chatsft_checkpoints")

    def losses(tag):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(root, tag, "train_log.jsonl"))) if "loss" in r]

    assert losses("full") == losses("split") and len(losses("full")) == steps
    a, _, meta_a = load_checkpoint(os.path.join(root, "full"), steps, "cpu")
    b, _, meta_b = load_checkpoint(os.path.join(root, "split"), steps, "cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["val_bpb"] == meta_b["val_bpb"] == full["final_val_bpb"] == resumed["final_val_bpb"]


def test_malformed_mixture_line_names_the_line(base_env, tmp_path):
    convs = _conversations(5, seed=3)
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(c) for c in convs]
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NanochatError, match=r"bad\.jsonl:3: not valid JSON"):
        chat_sft.read_conversations(str(path))
    lines[2] = json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": "hello?"}])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NanochatError, match=r"bad\.jsonl:3: message 1 has role 'user' but 'assistant' was expected"):
        chat_sft.read_conversations(str(path))
    lines[2] = json.dumps([{"role": "user", "content": "hi"}])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(NanochatError, match=r"bad\.jsonl:3: a conversation needs at least a user and an assistant"):
        chat_sft.read_conversations(str(path))
    # through the script: one line on stderr, exit status 2
    with pytest.raises(NanochatError, match=r"bad\.jsonl:3: "):
        _run(_args(base_env, "bad", 2) + [f"--mixture={path}", f"--val-mixture={path}"])


def test_missing_base_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(NanochatError, match="no base model to finetune"):
        chat_sft.main(["--device-type=cpu", "--compile=0", "--mixture=x.jsonl"])




def _task_data(root):
    """A tiny offline task data dir: GSM8K, SmolTalk and a word list; MMLU left out on purpose."""
    os.makedirs(os.path.join(root, "gsm8k"))
    os.makedirs(os.path.join(root, "smoltalk"))
    os.makedirs(os.path.join(root, "spellingbee"))
    gsm = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
            "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a in range(1, 5) for b in range(1, 4)]
    for split in ("train", "test"):
        with open(os.path.join(root, "gsm8k", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in gsm)
        with open(os.path.join(root, "smoltalk", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps({"messages": [{"role": "system", "content": "Be brief."}] + c}) + "\n"
                         for c in _conversations(15, seed=5) if all(isinstance(m["content"], str) for m in c))
    with open(os.path.join(root, "spellingbee", "words_alpha.txt"), "w") as f:
        f.write("\n".join(["apple", "river", "moon", "star", "house", "green", "table", "light"]) + "\n")
    return root


def test_full_mixture_offline_skips_missing_components(base_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # MMLU must be missing, not downloaded
    monkeypatch.setenv("NANOCHAT_ENGINE_COMPILE", "0")
    data_dir = _task_data(str(tmp_path / "task_data"))
    from scripts import gen_identity
    with contextlib.redirect_stdout(io.StringIO()):
        gen_identity.main([f"--output={tmp_path / 'identity.jsonl'}", "--num=20"])
    argv = [f"--model-tag={base_env['model_tag']}", f"--data-dir={data_dir}", f"--identity-file={tmp_path / 'identity.jsonl'}",
            "--num-iterations=2", "--device-batch-size=2", f"--total-batch-size={2 * SEQ}", "--eval-every=1",
            f"--eval-tokens={2 * SEQ}", "--chatcore-every=2", "--chatcore-max-sample=1", "--compile=0",
            "--peak-flops=1e12", "--device-type=cpu", "--output-tag=mix"]
    summary, out = _run(argv)
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    # one line per missing dataset, though MMLU auxiliary_train appears 3 times in the mixture
    # (validation components are resolved first: without any, identity conversations are held out)
    assert len(warnings) == 2 and "MMLU test" in warnings[0] and "MMLU auxiliary_train" in warnings[1], warnings
    # present: SmolTalk 12 + identity 2x20 + GSM8K 4x12 + SimpleSpelling 200K + SpellingBee 80K
    assert summary["conversations"] == 12 + 40 + 48 + 200000 + 80000
    assert summary["steps"] == 2 and summary["final_val_bpb"] is not None
    assert "ChatCORE task ARC-Easy skipped" in out
    # ChatCORE at the last step (2) on the tasks that have data; incomplete, so no ChatCORE value
    assert re.search(r"Step 00002 \| ChatCORE: None \| ChatCORE_cat: None \| GSM8K: [0-9.]+, SpellingBee: [0-9.]+", out), out
    # --strict-data: the missing component is an error
    with pytest.raises(NanochatError, match=r"MMLU test\[:5200\] has no data"):
        _run(argv + ["--strict-data"])
    # a malformed identity file is an error naming the line, never a silent skip
    bad = tmp_path / "bad_identity.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n'
                   '[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]\n')
    with pytest.raises(NanochatError, match=r"bad_identity\.jsonl:2"):
        _run([a for a in argv if not a.startswith("--identity-file")] + [f"--identity-file={bad}"])


def test_two_gloo_ranks(base_env, tmp_path):
    import subprocess
    import sys

    from helpers import REPO, subprocess_env
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun beside {sys.executable}")
    # the base run had one process, so its optimizer shard cannot seed two ranks
    argv = _args(base_env, "two", 6, ["--eval-every=6", "--load-optimizer=0"])
    argv = [a for a in argv if not a.startswith("--total-batch-size")] + [f"--total-batch-size={2 * 4 * SEQ}"]
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.chat_sft", "--", *argv],
                          cwd=REPO, env=subprocess_env(base_env["base_dir"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()][:5]
    assert "gradient accumulation steps: 1" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["chat_sft"]
    assert summary["steps"] == 6 and summary["final_val_bpb"] < summary["initial_val_bpb"]
    ckpt = os.path.join(base_env["base_dir"], "chatsft_checkpoints", "two")
    states = [torch.load(os.path.join(ckpt, f"state_000006_rank{r}.pt"), weights_only=True)["loader"] for r in (0, 1)]
    # each rank read its own stride of the conversations
    assert all(i % 2 == r for r, s in enumerate(states) for i in s["buffer"])
    assert os.path.exists(os.path.join(ckpt, "optim_000006_rank1.pt"))


def test_sigterm_saves_and_resume_continues(base_env):
    import signal
    import subprocess
    import sys

    from helpers import REPO, subprocess_env
    argv = _args(base_env, "term", 400, ["--eval-every=-1"])
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_sft", *argv], cwd=REPO,
                            env=subprocess_env(base_env["base_dir"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("step 00003"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "resume with --resume-from-step=-1" in out
    ckpt = os.path.join(base_env["base_dir"], "chatsft_checkpoints", "term")
    from nanochat.checkpoint import find_last_step
    step = find_last_step(ckpt)
    assert 4 <= step < 400 and os.path.exists(os.path.join(ckpt, f"state_{step:06d}_rank0.pt"))
