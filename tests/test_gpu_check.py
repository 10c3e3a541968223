"""bench/gpu_check.sh, the GPU readiness check: --dry-run runs every step at tiny size on CPU and
passes; a step that crashes, hangs or raises becomes a JSON line with its error and the others run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "tf32", "train", "eval_lengths", "decode", "train_flex", "optimizer", "base_train",
         "throughput_d12", "throughput_d20"]


def run_check(tmp_path, *args, python=sys.executable, timeout=2400, **env):
    """bash bench/gpu_check.sh args -> (CompletedProcess, its JSON lines)."""
    full_env = dict(os.environ, PYTHON=str(python), GPU_CHECK_LOGS=str(tmp_path / "logs"), OMP_NUM_THREADS="1",
                    **{k: str(v) for k, v in env.items()})
    p = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    return p, [json.loads(line) for line in p.stdout.splitlines()]


@pytest.mark.slow
def test_dry_run_passes_every_step(tmp_path):
    p, lines = run_check(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    start, *steps, summary = lines
    assert start["gpu_check"] == "start" and start["dry_run"] is True
    assert [s["name"] for s in steps] == STEPS
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4, 2, 5, 6, 6, 6]
    failed = {s["name"]: s.get("error") for s in steps if not s["ok"]}
    assert failed == {}
    assert summary == {"gpu_check": "summary", "ok": True, "steps": 10, "failed": [], "seconds": summary["seconds"]}
    by_name = {s["name"]: s for s in steps}
    assert all(s["dry_run"] for s in steps)
    assert by_name["env"]["backend"] == "sdpa" and by_name["env"]["fa3_error"] == "no CUDA device"
    assert by_name["tf32"]["float32_matmul_precision"] == "high"
    assert by_name["train"]["compiled"]["recompiles_after_step_1"] == 0
    assert by_name["train"]["compiled"]["max_rel_loss_diff"] < 1e-4  # fp32, the same SDPA math compiled
    assert by_name["eval_lengths"]["compiles"] == 0
    assert sorted(map(int, by_name["eval_lengths"]["seconds_per_length"])) == list(range(528, 689, 16))
    assert by_name["eval_lengths"]["inference_mask_then_train"] == "ok"
    assert by_name["decode"]["same_tokens"] is True and [pt["batch"] for pt in by_name["decode"]["points"]] == [1, 2]
    assert by_name["decode"]["compiled"] is True  # batches 1 and 2: row buckets of 1 and 4 rows, one span
    assert (by_name["decode"]["compiles_first_engine"], by_name["decode"]["compiles_second_engine"]) == (2, 0)
    assert set(by_name["base_train"]["val_bpb"]) == {"0", "2", "4"}
    assert "model_000004.pt" in by_name["base_train"]["checkpoint_files"]
    assert by_name["throughput_d20"]["activation_checkpointing"] is True
    assert (tmp_path / "logs" / "results.jsonl").read_text().count("\n") == 10


def test_crashing_steps_are_reported_and_every_step_still_runs(tmp_path):
    # a stand-in python: every step dies at once with a message on stderr; the helper calls pass through
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "boom in $4" >&2; exit 3; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    p, lines = run_check(tmp_path, python=fake, timeout=300)
    assert p.returncode == 1
    start, *steps, summary = lines
    assert start["dry_run"] is False and start["budget_s"] == 450
    assert [s["name"] for s in steps] == STEPS
    for s in steps:
        assert s["ok"] is False
        assert s["error"].startswith(f"exited with status 3; last log line: boom in {s['name']}; log: ")
    assert summary["ok"] is False and summary["failed"] == STEPS


def test_a_step_past_the_budget_times_out_and_the_rest_are_skipped(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exec sleep 120; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    p, lines = run_check(tmp_path, python=fake, timeout=300, GPU_CHECK_BUDGET=21)
    assert p.returncode == 1
    _, first, *rest, summary = lines
    assert first["name"] == "env" and first["error"].startswith("timed out after ")
    assert [s["error"] for s in rest] == ["skipped: the 21 s budget is spent"] * (len(STEPS) - 1)
    assert summary["failed"] == STEPS


def test_a_step_that_raises_prints_its_error_as_json(capsys, monkeypatch):
    from bench import gpu_check

    monkeypatch.setenv("NANOCHAT_COMPILE_OPTIM", "0")  # a dry run sets it: undone after the test
    gpu_check.main(["--step", "env"])  # not a dry run, and this machine has no GPU
    line = json.loads(capsys.readouterr().out)
    assert line["ok"] is False and line["step"] == 0 and line["name"] == "env"
    assert line["error"] == "RuntimeError: no CUDA device is visible; run with --dry-run on a CPU"

    def broken(check):
        raise ValueError("a bug in a step")

    monkeypatch.setitem(gpu_check.STEPS, "optimizer", (5, broken))
    gpu_check.main(["--step", "optimizer", "--dry-run"])
    line = json.loads(capsys.readouterr().out)
    assert line["ok"] is False and line["error"] == "ValueError: a bug in a step" and "broken" in line["traceback"]
