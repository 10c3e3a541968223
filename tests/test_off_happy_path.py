"""Issue 15, off the happy path: runs that die late or crawl, figures that lie, teardown and the
multi-node launch. Each test is named after the numbered item of the issue it covers."""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from helpers import (
    REPO,
    make_tiny_base_checkpoint,
    make_tiny_data,
    run_base_train,
    subprocess_env,
    synthetic_texts,
    tiny_train_args,
)

from nanochat import common
from nanochat.common import fit_horizon
from nanochat.dataloader import estimate_split_tokens, split_batches
from nanochat.tokenizer import get_tokenizer

SEQ = 64


def _write_chats(path, n, seed):
    texts = synthetic_texts(n, seed=seed, min_sentences=1, max_sentences=1)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps([{"role": "user", "content": "Say: " + t}, {"role": "assistant", "content": t}]) + "\n")
    return str(path)


# -----------------------------------------------------------------------------
# item 2: an evaluation budget never cycles a small validation split


def test_item2_base_val_budget_is_at_most_one_pass_of_the_split():
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    tok = get_tokenizer(os.path.join(base, "tokenizer"))
    val_docs = synthetic_texts(400, seed=0)[-32:]  # make_tiny_data's validation documents
    tokens = sum(len(t) for t in tok.encode(val_docs, prepend=tok.get_bos_token_id()))
    one_pass = tokens // (2 * (SEQ + 1))
    assert one_pass >= 3
    assert split_batches(tok, 2, SEQ, "val", 10**6, data_dir) == one_pass  # a budget of a million batches
    assert split_batches(tok, 2, SEQ, "val", 2, data_dir) == 2  # a budget the split fills is kept
    # two ranks: each counts the row groups it reads (rank r reads groups r, r+2, ...)
    halves = [split_batches(tok, 2, SEQ, "val", 10**6, data_dir, rank=r, world_size=2) for r in (0, 1)]
    assert sum(halves) in (one_pass - 1, one_pass, one_pass + 1)


def test_item2_sft_default_eval_tokens_read_each_val_conversation_once(tmp_path, monkeypatch):
    from scripts import chat_sft

    base = os.environ["NANOCHAT_BASE_DIR"]
    info = make_tiny_base_checkpoint(base, seq_len=SEQ)
    train = _write_chats(tmp_path / "train.jsonl", 60, seed=1)
    val = _write_chats(tmp_path / "val.jsonl", 40, seed=2)
    passes = []
    real = chat_sft.evaluate_bpb

    def counting(model, batches, steps, token_bytes, **kw):
        states = []

        def spy():
            for batch in batches:
                states.append(batch[2]["consumed"])
                yield batch
        out = real(model, spy(), steps, token_bytes, **kw)
        passes.append((steps, states))
        return out

    monkeypatch.setattr(chat_sft, "evaluate_bpb", counting)
    with contextlib.redirect_stdout(io.StringIO()):  # default --eval-tokens: 40 x 524288 tokens
        chat_sft.main([f"--model-tag={info['model_tag']}", f"--mixture={train}", f"--val-mixture={val}",
                       "--num-iterations=2", "--device-batch-size=4", f"--total-batch-size={4 * SEQ}",
                       "--eval-every=1", "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12",
                       "--device-type=cpu", "--output-tag=item2"])
    assert len(passes) == 3  # steps 0, 1 and 2
    for steps, consumed in passes:
        assert steps == 40 * 524288 // (4 * SEQ)  # the budget asked for ...
        # ... but the pass stops at the batch that takes the 40th conversation
        assert consumed[-1] >= 40 and all(c < 40 for c in consumed[:-1])


# -----------------------------------------------------------------------------
# item 4: bf16/fp16 on a CPU that emulates them falls back to fp32 with the figures


def test_item4_slow_cpu_half_dtype_falls_back_to_fp32_unless_forced(caplog):
    rates = {torch.bfloat16: 0.9e9, torch.float32: 90e9}
    assert common.check_cpu_half_dtype(torch.bfloat16, rates.get) == torch.float32
    assert "0.9 GFLOP/s" in caplog.text and "90.0 GFLOP/s" in caplog.text and "100x slower" in caplog.text
    assert "--force-dtype" in caplog.text
    assert common.check_cpu_half_dtype(torch.bfloat16, rates.get, force=True) == torch.bfloat16
    # a CPU with native bf16 (AVX512-BF16, AMX) keeps it, and says nothing
    caplog.clear()
    fast = {torch.bfloat16: 600e9, torch.float32: 200e9}
    assert common.check_cpu_half_dtype(torch.bfloat16, fast.get) == torch.bfloat16 and caplog.text == ""
    # the boundary: exactly half the fp32 rate is still accepted
    assert common.check_cpu_half_dtype(torch.float16, {torch.float16: 1.0, torch.float32: 2.0}.get) == torch.float16


# -----------------------------------------------------------------------------
# item 5: MFU never above 100%; the CPU denominator is the best measurement on this machine


def test_item5_cpu_mfu_denominator_is_the_best_measurement_cached_per_machine(monkeypatch):
    measured = iter([50e9, 200e9, 80e9])
    monkeypatch.setattr(common, "measure_matmul_flops", lambda device, dtype: next(measured))
    cpu = torch.device("cpu")
    assert common.mfu_denominator(cpu, dtype=torch.float32) == 50e9
    assert common.mfu_denominator(cpu, dtype=torch.float32) == 200e9
    assert common.mfu_denominator(cpu, dtype=torch.float32) == 200e9  # a busy measurement does not lower it
    with open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "matmul_peak.json")) as f:
        cache = json.load(f)
    assert list(cache.values()) == [200e9] and "float32" in next(iter(cache))
    assert common.mfu_denominator(cpu, override=7e12) == 7e12


def test_item5_mfu_is_clamped_at_100_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(common, "_mfu_clamp_noted", False)
    assert common.mfu_percent(25e9, 100e9) == 25.0
    assert common.mfu_percent(270e9, 100e9) == 100.0
    assert common.mfu_percent(300e9, 100e9) == 100.0
    out = capsys.readouterr().out
    assert out.count("note: MFU came out at 270%") == 1 and "busy" in out  # noted once
    assert common.mfu_percent(1e9, float("inf")) is None


# -----------------------------------------------------------------------------
# item 6: the final JSON line is strict JSON


def test_item6_base_train_summary_has_null_not_infinity_without_evaluation():
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    out = run_base_train(base, tiny_train_args(data_dir, steps=2, seq_len=SEQ, eval_every=-1))
    last = out.strip().splitlines()[-1]

    def refuse(constant):
        raise AssertionError(f"{constant} in the summary line")
    summary = json.loads(last, parse_constant=refuse)["base_train"]
    assert summary["min_val_bpb"] is None and summary["final_val_bpb"] is None and summary["steps"] == 2


# -----------------------------------------------------------------------------
# item 1: offline without task data, SFT trains on identity + spelling and validates on held-out identity


def test_item1_sft_offline_without_task_data_holds_out_identity(tmp_path, monkeypatch):
    from nanochat.tasks import spellingbee
    from scripts import chat_sft, gen_identity

    base = os.environ["NANOCHAT_BASE_DIR"]
    info = make_tiny_base_checkpoint(base, seq_len=SEQ)
    with contextlib.redirect_stdout(io.StringIO()):
        gen_identity.main(["--num=20"])  # base_dir/identity_conversations.jsonl, as runcpu.sh makes it
    assert spellingbee.words_from_data(info["data_dir"], os.path.join(base, spellingbee.CORPUS_WORDS)) > 20

    def offline(*args, **kwargs):
        raise common.NanochatError("offline")
    monkeypatch.setattr(common, "download_file", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_TASK_DATA_DIR", str(tmp_path / "no_task_data"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = chat_sft.main([f"--model-tag={info['model_tag']}", "--num-iterations=2", "--device-batch-size=4",
                                 f"--total-batch-size={4 * SEQ}", "--eval-every=1", "--chatcore-every=-1",
                                 "--compile=0", "--peak-flops=1e12", "--device-type=cpu", "--output-tag=item1"])
    assert summary["components"] == ("train: identity conversations x2, SimpleSpelling 200K, SpellingBee 80K; "
                                  "validation: identity conversations[18:] (held out)")
    assert summary["conversations"] == 2 * 18 + 200000 + 80000  # the 2 held-out conversations are not trained on
    assert summary["final_val_bpb"] is not None and summary["steps"] == 2
    assert "validating on the last 2 of the 20 identity conversations" in out.getvalue()


# -----------------------------------------------------------------------------
# item 3: a horizon that fits the data


def test_item3_estimate_of_the_training_tokens_is_close():
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    tok = get_tokenizer(os.path.join(base, "tokenizer"))
    texts = synthetic_texts(400, seed=0)  # make_tiny_data's documents; the last 32 are the val split
    exact = {split: sum(len(t) for t in tok.encode(docs, prepend=tok.get_bos_token_id()))
             for split, docs in (("train", texts[:-32]), ("val", texts[-32:]))}
    for split in ("train", "val"):  # bound: within 3% (bytes per token of a 256-document sample)
        assert abs(estimate_split_tokens(tok, split, data_dir) - exact[split]) <= 0.03 * exact[split]


def test_item3_horizon_over_two_passes_is_said_up_front_and_can_be_fitted(capsys):
    assert fit_horizon(100, 1000, 200_000) == 100  # half a pass: nothing to say
    assert capsys.readouterr().out == ""
    assert fit_horizon(1200, 4096, 500_000) == 1200  # the run: ~10 passes, said with the numbers
    out = capsys.readouterr().out
    assert "4,915,200 tokens" in out and "about 500,000" in out and "9.8 passes" in out and "to about 244" in out
    assert fit_horizon(1200, 4096, 500_000, max_passes=2) == 244  # 2 x 500,000 // 4096
    out = capsys.readouterr().out
    assert "shortened to 244 steps" in out and "warning" not in out


def test_item3_sft_with_a_fixed_horizon_over_a_small_mixture_says_so(tmp_path):
    from scripts import chat_sft

    base = os.environ["NANOCHAT_BASE_DIR"]
    info = make_tiny_base_checkpoint(base, seq_len=SEQ)
    chats = _write_chats(tmp_path / "few.jsonl", 10, seed=4)  # ~50 tokens each: ~500 tokens in all
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        chat_sft.main([f"--model-tag={info['model_tag']}", f"--mixture={chats}", "--num-iterations=8",
                       "--device-batch-size=4", f"--total-batch-size={4 * SEQ}", "--eval-every=-1",
                       "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12", "--device-type=cpu",
                       "--output-tag=item3"])
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("warning: this run trains on"))
    passes = float(re.search(r"([0-9.]+) passes over it", line).group(1))
    assert f"trains on {8 * 4 * SEQ:,} tokens" in line and 2 < passes < 10, line


def test_item3_base_train_max_data_passes_shortens_the_run():
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    tok = get_tokenizer(os.path.join(base, "tokenizer"))
    expected = int(0.02 * estimate_split_tokens(tok, "train", data_dir) // (2 * SEQ))
    assert 3 <= expected <= 10
    out = run_base_train(base, tiny_train_args(data_dir, steps=1000, seq_len=SEQ, extra=["--max-data-passes=0.02"]))
    assert json.loads(out.strip().splitlines()[-1])["base_train"]["steps"] == expected


# -----------------------------------------------------------------------------
# item 12: the gloo teardown order


def test_item12_cleanup_waits_for_every_rank_before_leaving_the_group(tmp_path):
    """Rank 1 finishes 2 s after rank 0; rank 0's cleanup must wait for it (a rank that left while
    a peer still talked to it made gloo abort that peer). Both exit 0."""
    script = tmp_path / "teardown.py"
    script.write_text(
        "import sys, time, torch, torch.distributed as dist\n"
        "from nanochat.common import compute_cleanup, compute_init\n"
        "_, rank, _, _, _ = compute_init('cpu')\n"
        "x = torch.ones(4)\n"
        "dist.all_reduce(x)\n"
        "if rank == 1:\n"
        "    time.sleep(2)\n"
        "t0 = time.time()\n"
        "compute_cleanup()\n"
        "print(f'rank {rank} cleanup {time.time() - t0:.2f}s sum {x.sum().item():.0f}', flush=True)\n")
    proc = _torchrun(["--standalone", "--nproc_per_node=2", str(script)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    waits = dict(re.findall(r"rank (\d) cleanup ([0-9.]+)s sum 8", proc.stdout))
    assert set(waits) == {"0", "1"}
    assert float(waits["0"]) >= 1.5 and float(waits["1"]) < 1.5  # rank 0 waited for rank 1 at the barrier


# -----------------------------------------------------------------------------
# multi-node: two torchrun launches joined by a c10d rendezvous on this machine


def _torchrun(args, timeout=300, env=None):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun beside {sys.executable}")
    return subprocess.run([torchrun, *args], cwd=REPO, env=env or subprocess_env(os.environ["NANOCHAT_BASE_DIR"]),
                          capture_output=True, text=True, timeout=timeout)


def _two_nodes(module, argv, timeout=300):
    """`module` on two 1-process 'nodes' (--nnodes=2, c10d rendezvous on 127.0.0.1): both must exit 0."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun beside {sys.executable}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(os.environ["NANOCHAT_BASE_DIR"])
    procs = [subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node-rank={node}",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=item9",
                               "-m", module, "--", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return "".join(out for out, _ in outs)


def _losses(kind, tag):
    path = os.path.join(os.environ["NANOCHAT_BASE_DIR"], kind, tag, "train_log.jsonl")
    return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if "loss" in r]


@pytest.mark.slow
def test_multinode_two_nodes_train_checkpoint_and_resume_like_one_two_process_run():
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    steps = 4
    argv = tiny_train_args(data_dir, depth=1, steps=steps, seq_len=SEQ, total_batch_size=2 * 2 * SEQ)
    argv = [a for a in argv if not a.startswith("--model-tag")]
    # the reference: one launch of 2 processes
    ref = _torchrun(["--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", "--", *argv, "--model-tag=ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    # two nodes: train with a checkpoint at step 2, then resume from it and train steps 2-3 again
    _two_nodes("scripts.base_train", [*argv, "--model-tag=nodes", "--save-every=2"])
    _two_nodes("scripts.base_train", [*argv, "--model-tag=nodes", "--resume-from-step=2"])
    one, two = _losses("base_checkpoints", "ref"), _losses("base_checkpoints", "nodes")
    assert [s for s, _ in two] == list(range(steps))
    # bound: the same rows on the same 2 ranks; the sharded Muon may block its arithmetic differently
    # from run to run only in the last bits (see test_base_train's 2-rank test)
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-5, abs=0), (s1, a, b)

    # SFT on top of each, 2 steps: the same losses again
    chats = _write_chats(os.path.join(base, "chats.jsonl"), 40, seed=3)
    sft = ["--num-iterations=2", "--device-batch-size=2", f"--total-batch-size={2 * 2 * SEQ}", "--eval-every=-1",
           "--chatcore-every=-1", "--compile=0", "--peak-flops=1e12", "--device-type=cpu", f"--mixture={chats}"]
    ref = _torchrun(["--standalone", "--nproc_per_node=2", "-m", "scripts.chat_sft", "--", *sft, "--model-tag=ref",
                     "--output-tag=ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    _two_nodes("scripts.chat_sft", [*sft, "--model-tag=nodes", "--output-tag=nodes"])
    one, two = _losses("chatsft_checkpoints", "ref"), _losses("chatsft_checkpoints", "nodes")
    assert len(one) == len(two) == 2
    for (s1, a), (s2, b) in zip(one, two):
        assert s1 == s2 and b == pytest.approx(a, rel=1e-5, abs=0), (s1, a, b)


# -----------------------------------------------------------------------------
# item 1: the preflight finds in seconds what would stop a pipeline hours in


def _preflight(monkeypatch, argv, is_online=False):
    from nanochat import preflight

    monkeypatch.setattr(preflight, "online", lambda host, timeout=5: is_online)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            preflight.main(argv)
            error = None
        except common.NanochatError as e:
            error = str(e)
    return out.getvalue(), error


def test_item1_preflight_offline_without_data_is_one_error_with_the_fix(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    out, error = _preflight(monkeypatch, ["--task-data-dir="])
    assert error is not None and "set NANOCHAT_DATA_DIR" in error and "--from-text" in error
    assert "preflight (offline)" in out
    # without task data: a note of what SFT will do instead, not an error
    assert "validates on a held-out slice of the identity conversations" in out


def test_item1_preflight_names_every_problem(monkeypatch, tmp_path):
    base = os.environ["NANOCHAT_BASE_DIR"]
    data_dir = make_tiny_data(base)
    out, error = _preflight(monkeypatch, [f"--data-dir={data_dir}", "--task-data-dir=", "--bundle-dir="])
    assert error is None and "ok    data   pretraining shards: 3 files" in out
    assert "CORE is skipped" in out and "made from the words of your shards" in out
    bad_bundle, no_tasks = tmp_path / "bundle", tmp_path / "nowhere"
    bad_bundle.mkdir()
    out, error = _preflight(monkeypatch, [f"--data-dir={data_dir}", f"--bundle-dir={bad_bundle}",
                                          f"--task-data-dir={no_tasks}", "--min-free-gb=1e9", "--gpus=64"])
    assert error.startswith("4 problems")  # disk, GPUs, bundle, task data dir (the word list is only a note)
    for fix in ("point NANOCHAT_BASE_DIR at a larger disk", "set NPROC=", "no core.yaml", f"NANOCHAT_TASK_DATA_DIR={no_tasks}"):
        assert fix in error, fix
    one_shard = tmp_path / "one"
    one_shard.mkdir()
    os.link(os.path.join(data_dir, "shard_00000.parquet"), one_shard / "shard_00000.parquet")
    _, error = _preflight(monkeypatch, [f"--data-dir={one_shard}", "--task-data-dir=", "--bundle-dir="])
    assert "at least 2 are needed" in error
