"""The report card (nanochat/report.py), the JSON-line reader the run scripts use, and the run
scripts themselves (syntax, and the research loops end to end with a stand-in torchrun)."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import report as R
from nanochat.common import NanochatError

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = ["runs/speedrun.sh", "runs/miniseries.sh", "runs/scaling_laws.sh"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def base_dir():
    return Path(os.environ["NANOCHAT_BASE_DIR"])


def write_log(path, records, torn_tail=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        if torn_tail:
            f.write('{"step": 99, "lo')  # a crash mid-write
    return path


def fake_pipeline(bd):
    """Train logs of the three stages, in the layout the training scripts write."""
    base = [{"step": s, "loss": 5.0 - 0.1 * s, "smooth_loss": 5.0 - 0.09 * s, "lrm": 1.0} for s in range(20)]
    base += [{"step": s, "val_bpb": 2.0 - 0.05 * s} for s in (0, 10, 20)]
    write_log(bd / "base_checkpoints" / "d4" / "train_log.jsonl", base, torn_tail=True)
    # an older, unrelated run the report must not pick over the named tag
    write_log(bd / "base_checkpoints" / "zz_old" / "train_log.jsonl", [{"step": 0, "loss": 9.0}])
    os.utime(bd / "base_checkpoints" / "d4" / "train_log.jsonl", (1, 1))
    sft = [{"step": s, "loss": 2.0 - 0.05 * s} for s in range(10)] + [{"step": 9, "val_bpb": 1.1}]
    sft += [{"step": 9, "chatcore": 0.11, "chatcore_cat": 0.2, "results": {"MMLU": 0.3}}]
    write_log(bd / "chatsft_checkpoints" / "sft_d4" / "train_log.jsonl", sft)
    write_log(bd / "chatsft_checkpoints" / "newer" / "train_log.jsonl", [{"step": 0, "loss": 9.0}])
    os.utime(bd / "chatsft_checkpoints" / "sft_d4" / "train_log.jsonl", (1, 1))
    rl = [{"step": s, "reward": 0.1 * s} for s in range(5)]
    rl += [{"step": 0, "pass@1": 0.1, "pass@8": 0.3}, {"step": 4, "pass@1": 0.2, "pass@8": 0.5}]
    write_log(bd / "chatrl_checkpoints" / "d4" / "train_log.jsonl", rl)


def log_sections(rep):
    rep.log("Tokenizer training", [{"vocab_size": 32768, "train_time_s": 12.3456789}])
    rep.log("Base model training", [{"model_tag": "d4", "min_val_bpb": 0.8123456, "steps": 20}])
    rep.log("Base model evaluation", [
        {"train bpb": 0.81, "val bpb": 0.82}, {"CORE": 0.22191},
        {"arc_easy": 0.55, "mmlu": 0.77},  # CORE's centered per-task results, as base_eval logs them
        {"centered_results": {"arc_easy": 0.55, "gsm8k": 0.77}},  # nested: never a summary value
        "Sample: the model said GSM8K: 0.99 and MMLU: 0.98 in prose.",
    ])
    # as chat_sft logs it: its flags, then a summary naming the base tag and its own output tag
    rep.log("SFT", [{"model_tag": None, "device_batch_size": 4},  # the original nanochat's section title
                    {"model_tag": "d4", "output_tag": "sft_d4", "final_val_bpb": 1.1, "chatcore": 0.11}])
    rep.log("Chat evaluation (SFT)", [{"ARC-Easy": 0.4, "ARC-Challenge": 0.3, "MMLU": 0.31, "GSM8K": 0.05,
                                       "HumanEval": 0.06, "ChatCORE metric": 0.2}])
    rep.log("Chat evaluation rl", [{"GSM8K": 0.1}])


# -----------------------------------------------------------------------------


def test_slugs_and_aliases_land_in_one_file(tmp_path):
    assert R.section_slug("SFT") == R.section_slug("Chat SFT") == "chat-sft"
    assert R.section_slug("Chat evaluation (SFT)") == "chat-evaluation-sft"
    assert R.section_slug("Base model training") == "base-model-training"
    assert R.section_slug("RL") == "chat-rl"
    rep = R.Report(base_dir=str(tmp_path))
    rep.log("SFT", [{"a": 1}])
    rep.log("Chat SFT", [{"a": 2}])
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["chat-sft.md"]
    text = (tmp_path / "report" / "chat-sft.md").read_text()
    assert text.startswith("## Chat SFT\ntimestamp: ")
    assert "- a: 2" in text and "- a: 1" not in text


def test_render_section_formats_values():
    text = R.render_section("X", [{"f": 0.123456, "big": 1234567, "small": 9999, "flag": True, "none": None},
                                  None, "", "verbatim *text*\n", {"nested": {"k": 1.5}}], timestamp="2026-01-01 00:00:00")
    lines = text.splitlines()
    assert lines[:2] == ["## X", "timestamp: 2026-01-01 00:00:00"]
    for expected in ["- f: 0.1235", "- big: 1,234,567", "- small: 9999", "- flag: True", "- none: None",
                     "verbatim *text*", "- nested:", "  - k: 1.5000"]:
        assert expected in lines
    kv = R.parse_kv_lines(text)
    assert kv["big"] == "1,234,567" and R.to_number(kv["big"]) == 1234567
    assert "k" not in kv and "nested" not in kv  # nested lines are not top-level metrics


def test_full_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bd = base_dir()
    rep = R.get_report()
    assert isinstance(rep, R.Report)
    rep.reset()
    fake_pipeline(bd)
    log_sections(rep)
    md_path = Path(rep.generate())
    rdir = bd / "report"
    assert md_path == rdir / "report.md"
    md = md_path.read_text()
    assert (tmp_path / "report.md").read_text() == md  # copied to the working directory

    # every section, in the fixed order, the SFT one included; missing ones noted
    headings = [ln[3:] for ln in md.splitlines() if ln.startswith("## ")]
    order = ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
             "Base model evaluation", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl", "Summary"]
    assert headings == order
    assert "_Not run: no tokenizer-evaluation.md" in md
    assert "_Not run: no base-model-loss.md" in md
    assert "- chatcore: 0.1100" in md and "- output_tag: sft_d4" in md  # the SFT section made it into report.md
    assert "_No section logged; training log found._" in md  # Chat RL: log but no section

    # the summary table, from the "- key: value" lines only
    summary = md.split("## Summary", 1)[1]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]]
            for ln in summary.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert rows["CORE"] == ["0.2219", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "0.4000", "-"]  # not CORE's centered arc_easy
    assert rows["ARC-Challenge"] == ["-", "0.3000", "-"]
    assert rows["MMLU"] == ["-", "0.3100", "-"]  # not the 0.98 from the prose sample, nor CORE's mmlu
    assert rows["GSM8K"] == ["-", "0.0500", "0.1000"]
    assert rows["HumanEval"] == ["-", "0.0600", "-"]
    assert rows["ChatCORE"] == ["-", "0.2000", "-"]  # the eval section wins over SFT's own
    assert "SpellingBee" not in rows  # optional row, nobody reported it
    assert "- Total wall clock time: " in summary and "- Estimated cost: " in summary
    assert "- Characters: " in summary  # bloat block from the header

    # plots: valid PNGs, embedded in the markdown, the named tag's log used
    pngs = sorted(p.name for p in rdir.glob("*.png"))
    assert pngs == ["base-curves.png", "rl-curves.png", "sft-curves.png"]
    for name in pngs:
        assert (rdir / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in md

    # the HTML stands alone: every image is a data URI holding a PNG
    page = (rdir / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 3
    assert all(base64.b64decode(u)[:8] == PNG_SIGNATURE for u in uris)
    assert "![" not in page and ".png\"" not in page
    assert "<table>" in page and "<th>Metric</th>" in page and "<h2>Summary</h2>" in page


def test_plots_use_the_logged_tags(monkeypatch):
    fake_pipeline(base_dir())
    rep = R.Report()
    log_sections(rep)
    used = []
    real = R.read_train_log
    monkeypatch.setattr(R, "read_train_log", lambda p: used.append(Path(p).parent.name) or real(p))
    rep.generate(copy_to_cwd=False)
    assert used == ["d4", "sft_d4", "d4"]  # named tags over newer logs; RL (no section) takes the newest


def test_partial_and_fallback_summary_values(tmp_path):
    rep = R.Report(base_dir=str(tmp_path))
    rep.log("Base model evaluation", [{"CORE (partial: 18/22 tasks)": 0.21}])
    rep.log("Chat SFT", [{"chatcore": 0.11}])
    rep.log("Chat evaluation rl", [{"GSM8K": 0.1, "ChatCORE metric (partial)": 0.05}])
    md = Path(rep.generate(copy_to_cwd=False)).read_text()
    assert "| CORE | 0.2100 (partial) | - | - |" in md
    assert "| ChatCORE | - | 0.1100 | 0.0500 (partial) |" in md


def test_plot_panels_follow_the_log(tmp_path):
    rl = [{"step": s, "reward": 0.1 * s} for s in range(5)] + [{"step": 4, "pass@k": {"1": 0.2, "8": 0.4}}]
    assert R.plot_train_log(rl, "RL", str(tmp_path / "rl.png")) == ["Reward", "pass@k"]
    base = [{"step": s, "loss": 1.0, "mfu": None} for s in range(3)] + [{"step": 2, "val_bpb": float("nan")}]
    assert R.plot_train_log(base, "base", str(tmp_path / "b.png")) == ["Training loss"]
    assert R.plot_train_log([{"step": 1, "dt": 0.1}], "none", str(tmp_path / "n.png")) == []
    assert not (tmp_path / "n.png").exists()
    assert (tmp_path / "rl.png").read_bytes()[:8] == PNG_SIGNATURE


def test_missing_everything_is_tolerated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = R.Report()
    md = Path(rep.generate(copy_to_cwd=False)).read_text()
    assert not (tmp_path / "report.md").exists()
    assert "_No header: run `python -m nanochat.report reset`" in md
    for _, title in R.SECTIONS:
        assert f"## {title}\n\n_Not run:" in md
    assert "| CORE | - | - | - |" in md
    assert "Total wall clock time: unknown" in md
    assert not list((base_dir() / "report").glob("*.png"))


def test_wall_clock_and_cost(tmp_path):
    rep = R.Report(base_dir=str(tmp_path))
    rep._write("header.md", "# nanochat training report\n\n### Hardware\n- GPUs: 8 x NVIDIA H100\n"
                            "- Hourly rate: $24.00\n\nRun started: 2026-01-01 00:00:00\n")
    rep._write("chat-sft.md", R.render_section("Chat SFT", [{"x": 1}], timestamp="2026-01-01 01:30:00"))
    rep._write("base-model-training.md", R.render_section("Base model training", [{"x": 1}], timestamp="2026-01-01 00:45:00"))
    md = Path(rep.generate(copy_to_cwd=False)).read_text()
    assert "- Total wall clock time: 1h30m00s" in md
    assert "- Estimated cost: $36.00 (at $24.00/hour)" in md
    assert "- Hardware: GPUs 8 x NVIDIA H100" in md


def test_extra_sections_are_kept(tmp_path):
    rep = R.Report(base_dir=str(tmp_path))
    rep.log("Inference benchmark", [{"tok_per_sec": 1234.5}])
    md = Path(rep.generate(copy_to_cwd=False)).read_text()
    assert md.index("## Inference benchmark") < md.index("## Summary")
    assert "- tok_per_sec: 1234.5000" in md


def test_reset_header_and_clears_old_run(tmp_path, monkeypatch):
    rep = R.Report()
    rep.log("Base model training", [{"a": 1}])
    rdir = base_dir() / "report"
    (rdir / "old-curves.png").write_bytes(PNG_SIGNATURE)
    rep.reset()
    assert sorted(p.name for p in rdir.iterdir()) == ["header.md"]
    header = (rdir / "header.md").read_text()
    for needle in ["### Git", "### Hardware", "- Platform: ", "- CPUs: ", "- Memory: ", "- GPUs: ", "- Hourly rate: ",
                   "### Software", "- Python: ", "- PyTorch: ", "### Bloat", "- Characters: ", "Run started: "]:
        assert needle in header
    # outside a git checkout: a note, not a crash
    monkeypatch.setattr(R, "REPO_ROOT", str(tmp_path))
    assert R.git_info() is None and R.bloat_metrics() is None
    header = R.render_header()
    assert "- Git: not a git checkout" in header and "- Bloat: not a git checkout" in header


def test_non_rank0_is_a_noop(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rep = R.get_report()
    assert isinstance(rep, R.DummyReport)
    assert rep.reset() is None and rep.log("Chat SFT", [{"a": 1}]) is None and rep.generate() is None
    assert not (base_dir() / "report").exists()


def test_gpu_hourly_rate(monkeypatch):
    monkeypatch.delenv("NANOCHAT_GPU_HOURLY_RATE", raising=False)
    assert R.gpu_hourly_rate("NVIDIA H100 80GB HBM3") == 3.00
    assert R.gpu_hourly_rate("NVIDIA A100-SXM4-40GB") == 1.79
    assert R.gpu_hourly_rate("NVIDIA GeForce RTX 4090") == R.DEFAULT_GPU_RATE
    monkeypatch.setenv("NANOCHAT_GPU_HOURLY_RATE", "$2.50")
    assert R.gpu_hourly_rate("NVIDIA H100 80GB HBM3") == 2.50


def test_markdown_to_html(tmp_path):
    (tmp_path / "p.png").write_bytes(PNG_SIGNATURE + b"rest")
    md = ("# Title\n\nSome **bold** and `a<b` text\nsecond line\n\n- one\n  - nested\n- two: `x`\n\n"
          "| A | B |\n|---|---|\n| 1 | <2> |\n\n```\nif a < b:\n    pass\n```\n\n![plot](p.png)\n![gone](missing.png)\n\n"
          "<script>alert(1)</script>\n")
    page = R.markdown_to_html(md, image_root=str(tmp_path))
    assert "<h1>Title</h1>" in page
    assert "<p>Some <strong>bold</strong> and <code>a&lt;b</code> text<br>\nsecond line</p>" in page
    assert "<ul>\n<li>one\n<ul>\n<li>nested</li>\n</ul>\n</li>\n<li>two: <code>x</code></li>\n</ul>" in page
    assert "<thead>\n<tr>\n<th>A</th>\n<th>B</th>\n</tr>\n</thead>" in page and "<td>&lt;2&gt;</td>" in page
    assert "<pre><code>if a &lt; b:\n    pass\n</code></pre>" in page
    data = base64.b64encode(PNG_SIGNATURE + b"rest").decode()
    assert f'<img src="data:image/png;base64,{data}" alt="plot">' in page
    assert '<img src="missing.png" alt="gone">' in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # raw HTML is escaped


def test_read_train_log_skips_a_torn_line(tmp_path):
    path = write_log(tmp_path / "l.jsonl", [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], torn_tail=True)
    assert [r["step"] for r in R.read_train_log(path)] == [0, 1]


# -----------------------------------------------------------------------------
# JSON result lines

MIXED = """step 00019/00020 | loss: 4.1 | {not json}
Minimum validation bpb: 1.5
{"base_train": {"depth": 2, "min_val_bpb": 1.9}}
[rank0]: {"base_train": {"depth": 4, "min_val_bpb": 1.5, "total_tokens": 20480, "nested": {"x": 3}}}
{"chat_eval": {"GSM8K": 0.1}}
trailing prose
"""


def test_parse_json_lines_last_match_from_mixed_output(tmp_path):
    got = R.parse_json_lines(MIXED, "base_train")
    assert got == {"depth": 4, "min_val_bpb": 1.5, "total_tokens": 20480, "nested": {"x": 3}}
    log = tmp_path / "run.log"
    log.write_text(MIXED)
    assert R.parse_json_lines(str(log), "chat_eval") == {"GSM8K": 0.1}
    assert R.parse_json_lines(log, "base_train")["depth"] == 4  # a Path works too
    # a train_log.jsonl value (a scalar)
    jl = write_log(tmp_path / "t.jsonl", [{"step": 0, "core_metric": 0.1}, {"step": 5, "loss": 1}, {"step": 9, "core_metric": 0.2}])
    assert R.parse_json_lines(str(jl), "core_metric") == 0.2


def test_parse_json_lines_errors_clearly(tmp_path):
    with pytest.raises(NanochatError, match="no JSON line with the key 'chat_sft'"):
        R.parse_json_lines(MIXED, "chat_sft")
    with pytest.raises(NanochatError, match="does not exist"):
        R.parse_json_lines(str(tmp_path / "nope.log"), "base_train")


def test_parse_json_cli(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text(MIXED)
    R.main(["parse-json", "base_train", str(log), "--fields", "depth,min_val_bpb,missing,nested.x"])
    assert capsys.readouterr().out == "4,1.5,,3\n"
    R.main(["parse-json", "base_train", str(log)])
    assert json.loads(capsys.readouterr().out)["total_tokens"] == 20480
    R.main(["parse-json", "chat_sft", str(log), "--default", ""])
    assert capsys.readouterr().out == "\n"
    with pytest.raises(NanochatError):
        R.main(["parse-json", "chat_sft", str(log)])


def test_parse_json_cli_exit_code(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("no json here\n")
    out = subprocess.run([sys.executable, "-m", "nanochat.report", "parse-json", "base_train", str(log)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: no JSON line with the key 'base_train'")


# -----------------------------------------------------------------------------
# Run scripts


@pytest.mark.parametrize("script", RUN_SCRIPTS)
def test_run_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (REPO / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    if script != "runs/speedrun.sh":
        assert 'torchrun --standalone --nproc_per_node="$NPROC"' in text
        assert "python -m nanochat.report parse-json base_train" in text
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        out = subprocess.run([shellcheck, str(REPO / script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# stands in for torchrun: records its arguments, prints prose and the final JSON line
echo "$*" >> "$FAKE_CALLS"
depth=""; tag=""; flops="-1"
for a in "$@"; do
  case "$a" in
    --depth=*) depth="${a#--depth=}" ;;
    --model-tag=*) tag="${a#--model-tag=}" ;;
    --target-flops=*) flops="${a#--target-flops=}" ;;
  esac
done
[ "$depth" = 13 ] && { echo "boom" >&2; exit 1; }
mkdir -p "$NANOCHAT_BASE_DIR/base_checkpoints/$tag"
echo '{"step": 10, "core_metric": 0.'"$depth"'}' > "$NANOCHAT_BASE_DIR/base_checkpoints/$tag/train_log.jsonl"
echo "step 00009/00010 | loss: 3.2"
echo "[rank0]: {\"base_train\": {\"depth\": $depth, \"model_tag\": \"$tag\", \"steps\": 10, \"total_batch_size\": 524288, \"total_tokens\": 5242880, \"scaling_params\": 1000, \"total_params\": 2000, \"flops_per_token\": 6000.0, \"total_flops\": $flops, \"min_val_bpb\": 1.$depth, \"final_val_bpb\": 1.$depth, \"training_time_s\": 60.0}}"
echo "done"
"""


def _fake_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text(FAKE_TORCHRUN)
    (bindir / "torchrun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               FAKE_CALLS=str(tmp_path / "calls.txt"), NPROC="2", SKIP_SETUP="1", SKIP_PREFLIGHT="1",
               WANDB_RUN="dummy")  # a fake torchrun: no GPUs or data for the preflight to find
    return env


def test_miniseries_collects_results(tmp_path):
    env = _fake_env(tmp_path)
    env.update(SERIES="t", DEPTHS="12 13 20")
    out = subprocess.run(["bash", str(REPO / "runs/miniseries.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    rows = (base_dir() / "t_miniseries_results" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("depth,model_tag,steps,") and rows[0].endswith(",core_metric")
    assert rows[1:] == ["12,t_miniseries_d12,10,524288,5242880,1000,2000,6000.0,-1,1.12,1.12,60.0,0.12",
                        "20,t_miniseries_d20,10,524288,5242880,1000,2000,6000.0,-1,1.2,1.2,60.0,0.2"]
    assert "depth 13 failed" in out.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert "--nproc_per_node=2 -m scripts.base_train -- --depth=12 --device-batch-size=32" in calls[0]
    assert "--device-batch-size=16" in calls[2]
    # a second run skips the depths already in the CSV
    out = subprocess.run(["bash", str(REPO / "runs/miniseries.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 4  # only depth 13 retried
    assert len((base_dir() / "t_miniseries_results" / "results.csv").read_text().splitlines()) == 3


def test_scaling_laws_collects_results(tmp_path):
    env = _fake_env(tmp_path)
    env.update(LABEL="s", FLOPS_BUDGETS="1e18 2.15e18", DEPTHS="10")
    out = subprocess.run(["bash", str(REPO / "runs/scaling_laws.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    rows = (base_dir() / "s_results" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("flops_budget,depth,model_tag,")
    assert rows[1] == "1e18,10,s_1e18_d10,10,524288,5242880,1000,2000,6000.0,1e+18,1.1,1.1,60.0,0.1"
    assert rows[2].startswith("2.15e18,10,s_2.15e18_d10,")
    call = (tmp_path / "calls.txt").read_text().splitlines()[0]
    for flag in ["--target-flops=1e18", "--target-param-data-ratio=-1", "--total-batch-size=524288",
                 "--eval-tokens=52428800", "--core-metric-every=999999", "--save-every=-1"]:
        assert flag in call


def test_cli_reset_and_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "elsewhere"
    R.main(["--base-dir", str(other), "reset"])
    assert (other / "report" / "header.md").exists()
    R.main(["generate", "--base-dir", str(other), "--no-copy"])
    assert (other / "report" / "report.md").exists() and (other / "report" / "report.html").exists()
    assert not (tmp_path / "report.md").exists()
    R.main(["generate", "--base-dir", str(other)])
    assert (tmp_path / "report.md").read_text() == (other / "report" / "report.md").read_text()


def test_real_base_train_output_feeds_the_scripts_and_plots():
    """A tiny real base_train run: its final JSON line has every field the run scripts put in
    their CSVs, and its train_log.jsonl becomes the base plot."""
    from helpers import make_tiny_data, run_base_train, tiny_train_args

    bd = str(base_dir())
    data_dir = make_tiny_data(bd)
    stdout = run_base_train(bd, tiny_train_args(data_dir, steps=4, eval_every=2, model_tag="tiny"))
    fields = re.search(r'^FIELDS="([^"]+)"', (REPO / "runs/miniseries.sh").read_text(), re.MULTILINE).group(1)
    assert fields == re.search(r'^FIELDS="([^"]+)"', (REPO / "runs/scaling_laws.sh").read_text(), re.MULTILINE).group(1)
    result = R.parse_json_lines(stdout, "base_train")
    missing = [f for f in fields.split(",") if f not in result]
    assert not missing, f"base_train's JSON line lacks {missing}"
    assert result["model_tag"] == "tiny" and result["steps"] == 4

    rep = R.Report()
    rep.log("Base model training", [{"model_tag": result["model_tag"], "min_val_bpb": result["min_val_bpb"]}])
    md = Path(rep.generate(copy_to_cwd=False)).read_text()
    assert "![Base model training curves](base-curves.png)" in md
    records = R.read_train_log(Path(bd) / "base_checkpoints" / "tiny" / "train_log.jsonl")
    assert R.plot_train_log(records, "t", str(base_dir() / "t.png")) == ["Training loss", "Validation bpb"]


@pytest.mark.parametrize("script", ["runs/miniseries.sh", "runs/scaling_laws.sh", "runs/speedrun.sh"])
def test_gpu_scripts_stop_at_the_preflight_before_any_work(tmp_path, script):
    env = _fake_env(tmp_path)
    del env["SKIP_PREFLIGHT"]
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_DATA_DIR=str(tmp_path / "nowhere"))
    out = subprocess.run(["bash", str(REPO / script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "but 0 CUDA GPU(s) are visible" in out.stderr
    assert not (tmp_path / "calls.txt").exists()  # torchrun never started
