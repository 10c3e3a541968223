"""The whole pipeline, end to end: `NANOCHAT_QUICK=1 bash runs/runcpu.sh` on fixture data made here
(pretraining text from the Python standard library's sources, a two-task CORE bundle, a few GSM8K
lines), offline. It must finish, leave every stage's checkpoint, and write a report with the
expected sections, summary table and plots."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def make_text_corpus(out_dir, max_bytes=3_000_000):
    """Deterministic English-and-code text from the interpreter's own stdlib sources."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    os.makedirs(out_dir)
    total = 0
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as f:
            text = f.read()
        with open(os.path.join(out_dir, os.path.basename(path) + ".txt"), "w") as f:
            f.write(text)
        total += len(text)
        if total > max_bytes:
            break


def make_core_bundle(out_dir):
    """Two tasks in the official bundle layout: one multiple choice, one language modelling."""
    os.makedirs(os.path.join(out_dir, "eval_data", "toy"))
    with open(os.path.join(out_dir, "core.yaml"), "w") as f:
        f.write("icl_tasks:\n"
                "- label: copa\n  dataset_uri: toy/copa.jsonl\n  num_fewshot: [0]\n"
                "  icl_task_type: multiple_choice\n  continuation_delimiter: \" \"\n"
                "- label: lambada_openai\n  dataset_uri: toy/lambada.jsonl\n  num_fewshot: [0]\n"
                "  icl_task_type: language_modeling\n  continuation_delimiter: \" \"\n")
    with open(os.path.join(out_dir, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\ncopa,50\nlambada_openai,0\n")
    with open(os.path.join(out_dir, "eval_data", "toy", "copa.jsonl"), "w") as f:
        for i in range(8):
            f.write(json.dumps({"query": f"def function_{i}(x):", "gold": i % 2,
                                "choices": ["return x", "import os"]}) + "\n")
    with open(os.path.join(out_dir, "eval_data", "toy", "lambada.jsonl"), "w") as f:
        for i in range(8):
            f.write(json.dumps({"context": f"for i in range({i}):", "continuation": "pass"}) + "\n")


def make_task_data(out_dir):
    os.makedirs(os.path.join(out_dir, "gsm8k"))
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in [(2, 3), (4, 5), (1, 1), (7, 2), (3, 3), (6, 1)]]
    for split in ("train", "test"):
        with open(os.path.join(out_dir, "gsm8k", f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_quick_pipeline_end_to_end(tmp_path):
    text_dir, shards = tmp_path / "text", tmp_path / "shards"
    make_text_corpus(str(text_dir))
    bundle, task_data, base = tmp_path / "bundle", tmp_path / "tasks", tmp_path / "base"
    make_core_bundle(str(bundle))
    make_task_data(str(task_data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "HF_"))}
    env.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_QUICK="1", NANOCHAT_DATA_DIR=str(shards),
               NANOCHAT_EVAL_BUNDLE=str(bundle), NANOCHAT_TASK_DATA_DIR=str(task_data),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", VIRTUAL_ENV=os.path.dirname(os.path.dirname(sys.executable)),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    subprocess.run([sys.executable, "-m", "nanochat.dataset", "--from-text", str(text_dir), "--out", str(shards)],
                   env=env, check=True, capture_output=True, cwd=REPO)
    proc = subprocess.run(["bash", "runs/runcpu.sh"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # every stage left its artifact
    assert glob.glob(str(base / "tokenizer" / "tokenizer.pkl"))
    assert glob.glob(str(base / "base_checkpoints" / "d2" / "model_000020.pt"))
    assert glob.glob(str(base / "base_eval" / "base_model_000020.csv"))
    assert glob.glob(str(base / "chatsft_checkpoints" / "d2" / "model_*.pt"))
    assert "python -m scripts.chat_cli" in proc.stdout and "python -m scripts.chat_web" in proc.stdout

    report = (base / "report" / "report.md").read_text()
    for section in ("## Tokenizer training", "## Tokenizer evaluation", "## Base model training",
                    "## Base model evaluation", "## Chat SFT", "## Chat evaluation sft", "## Summary"):
        assert section in report, f"{section} missing from the report"
    summary = report.split("## Summary")[1]
    assert "| CORE | " in summary and "(partial)" in summary  # 2 of the 22 tasks
    assert "| ChatCORE | - | " in summary
    pngs = sorted(p.name for p in (base / "report").glob("*.png"))
    assert "base-curves.png" in pngs and "sft-curves.png" in pngs, pngs
    for name in pngs:
        assert (base / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
    html = (base / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
