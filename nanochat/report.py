"""The run report card: every stage logs its figures as a markdown section, and
`generate` stitches them into report.md (plus a self-contained report.html) with a summary
table, the wall-clock time, a cost estimate and plots of each stage's training curves.

    python -m nanochat.report reset                 # at the start of a run: header.md, old sections gone
    python -m nanochat.report generate [--no-copy]  # at the end: base_dir/report/report.{md,html}, report.md copied to CWD
    python -m nanochat.report parse-json base_train LOG [--fields depth,min_val_bpb]

From a stage (rank 0 writes, every other rank gets a no-op report):

    from nanochat.report import get_report
    get_report().log(section="Base model training", data=[{"min_val_bpb": 0.81}, "free text"])

Section titles map to files by slug *and* alias ("SFT" and "Chat SFT" both land in chat-sft.md);
summary values come from the "- key: value" lines of each section, never from words in prose; a
missing stage becomes a one-line note instead of a crash.

`parse_json_lines` reads the final JSON line each stage prints ({"base_train": {...}}) out of a
log that mixes it with prose; the research run scripts use it (`parse-json`) to fill their CSVs.
"""

import argparse
import base64
import csv
import datetime
import html
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys

from markdown_it import MarkdownIt

from nanochat.common import NanochatError, atomic_path, get_base_dir, get_dist_info, iter_jsonl, run_main

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# The fixed order of report.md: (slug, title). Section files are base_dir/report/<slug>.md.
SECTIONS = [
    ("tokenizer-training", "Tokenizer training"),
    ("tokenizer-evaluation", "Tokenizer evaluation"),
    ("base-model-training", "Base model training"),
    ("base-model-loss", "Base model loss"),
    ("base-model-evaluation", "Base model evaluation"),
    ("chat-sft", "Chat SFT"),
    ("chat-evaluation-sft", "Chat evaluation sft"),
    ("chat-rl", "Chat RL"),
    ("chat-evaluation-rl", "Chat evaluation rl"),
]
SECTION_TITLES = dict(SECTIONS)

# Other names a stage may log under, so that e.g. a section logged as "SFT" still reaches report.md.
ALIASES = {
    "tok-train": "tokenizer-training", "tokenizer": "tokenizer-training",
    "tok-eval": "tokenizer-evaluation",
    "base-train": "base-model-training", "base-training": "base-model-training", "pretraining": "base-model-training",
    "base-loss": "base-model-loss",
    "base-eval": "base-model-evaluation", "base-evaluation": "base-model-evaluation",
    "sft": "chat-sft", "chat-sft-training": "chat-sft", "supervised-finetuning": "chat-sft",
    "chat-eval-sft": "chat-evaluation-sft", "sft-evaluation": "chat-evaluation-sft", "chat-evaluation": "chat-evaluation-sft",
    "rl": "chat-rl", "chat-rl-training": "chat-rl", "reinforcement-learning": "chat-rl",
    "chat-eval-rl": "chat-evaluation-rl", "rl-evaluation": "chat-evaluation-rl",
}

# Training logs to plot: stage -> (checkpoint family, training section that names the model tag, title)
PLOT_STAGES = [
    ("base", "base_checkpoints", "base-model-training", "Base model training"),
    ("sft", "chatsft_checkpoints", "chat-sft", "Chat SFT"),
    ("rl", "chatrl_checkpoints", "chat-rl", "Chat RL"),
]
PLOT_AFTER = {section: stage for stage, _, section, _ in PLOT_STAGES}

# Panels of a stage's figure: title -> log keys plotted in it (the first found is drawn solid)
PANELS = [
    ("Training loss", ["smooth_loss", "loss", "train_loss"]),
    ("Validation bpb", ["val_bpb", "val/bpb"]),
    ("Reward", ["reward", "mean_reward", "train_reward"]),
    ("pass@k", None),  # keys that look like pass@1, pass@8, pass_at_1 ...
    ("CORE", ["core_metric", "chatcore", "ChatCORE", "chatcore_metric", "chatcore_cat"]),
]
PASS_AT_K = re.compile(r"^pass(@|_?at_?)(k[._/])?\d+$", re.IGNORECASE)

# Summary table: metric -> normalized keys that carry it, and where each column looks
SUMMARY_METRICS = [
    ("CORE", ["core", "coremetric"]),
    ("ARC-Easy", ["arceasy"]),
    ("ARC-Challenge", ["arcchallenge"]),
    ("MMLU", ["mmlu"]),
    ("GSM8K", ["gsm8k"]),
    ("HumanEval", ["humaneval"]),
    ("SpellingBee", ["spellingbee"]),  # a row only when some stage reports it
    ("ChatCORE", ["chatcore", "chatcoremetric"]),
]
OPTIONAL_METRICS = {"SpellingBee"}
# (column, sections to look in, first found wins; metrics the column may show, None = all).
# BASE shows CORE only: base_eval also logs CORE's per-task centered results (arc_easy ...),
# which are not the chat accuracies of the rows with the same names.
SUMMARY_COLUMNS = [
    ("BASE", ["base-model-evaluation", "base-model-training"], {"CORE"}),
    ("SFT", ["chat-evaluation-sft", "chat-sft"], None),  # the eval section wins; SFT's own ChatCORE is the fallback
    ("RL", ["chat-evaluation-rl", "chat-rl"], None),
]

GPU_HOURLY_RATES = [("H100", 3.00), ("A100", 1.79), ("V100", 0.55)]  # $/GPU/hour; anything else: DEFAULT_GPU_RATE
DEFAULT_GPU_RATE = 2.00
BLOAT_EXTENSIONS = (".py", ".md", ".rs", ".html", ".toml", ".sh", ".js", ".css")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Names and formatting


def slugify(title):
    """'Chat evaluation (SFT)' -> 'chat-evaluation-sft'."""
    return re.sub(r"[^a-z0-9]+", "-", str(title).lower()).strip("-")


def section_slug(title):
    """The file stem a section title lands in: its slug, with known aliases resolved."""
    slug = slugify(title)
    return ALIASES.get(slug, slug)


def _norm_key(key):
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def format_value(value):
    """Floats with 4 decimals, ints >= 10000 with thousands separators, the rest as str()."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _dict_lines(d, indent=""):
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines.extend(_dict_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}- {key}: {format_value(value)}")
    return lines


def render_section(title, data, timestamp=None):
    """The markdown of one section: heading, timestamp, then strings verbatim and dicts as
    '- key: value' lines (nested dicts indented). Falsy items are skipped."""
    timestamp = timestamp or datetime.datetime.now().strftime(TIME_FORMAT)
    if isinstance(data, (str, dict)):
        data = [data]
    out = [f"## {title}", f"timestamp: {timestamp}", ""]
    for item in data or []:
        if not item:
            continue
        if isinstance(item, dict):
            out.extend(_dict_lines(item))
        else:
            out.append(str(item).rstrip("\n"))
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# "- key: value"; the key may hold a parenthesis with a colon, as in "CORE (partial: 18/22 tasks): 0.21"
_KV_LINE = re.compile(r"^- ((?:[^:\n(]|\([^)\n]*\))+?):[ \t]+(\S.*?)\s*$")


def parse_kv_lines(text):
    """The top-level '- key: value' lines of a section as {key: value string} (last wins).
    Indented (nested) lines and prose are ignored, so a word in a sample never becomes a metric."""
    values = {}
    for line in text.splitlines():
        m = _KV_LINE.match(line)
        if m:
            values[m.group(1).strip()] = m.group(2)
    return values


def to_number(text):
    """'12,345' -> 12345.0, '41.5%' -> 41.5, '$3.00' -> 3.0; None when not a number."""
    if text is None:
        return None
    cleaned = str(text).strip().replace(",", "").lstrip("$").rstrip("%").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def _metric_values(text):
    """{normalized key: value} of a section's top-level lines. A key with a parenthesis
    ("ChatCORE metric (partial)") counts under its bare name, marked partial, unless the
    complete one is also there."""
    out, partial = {}, {}
    for key, value in parse_kv_lines(text).items():
        bare = _norm_key(re.sub(r"\(.*?\)", "", key))
        if "(" in key:
            partial.setdefault(bare, f"{value} (partial)" if "partial" in key.lower() else value)
        else:
            out[bare] = value
    return {**partial, **out}


def _timestamp_of(text, label="timestamp"):
    m = re.search(rf"^{re.escape(label)}: (\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d)\s*$", text, re.MULTILINE)
    return datetime.datetime.strptime(m.group(1), TIME_FORMAT) if m else None


def _format_duration(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# -----------------------------------------------------------------------------
# JSON result lines (what the run scripts read instead of grepping prose)


def parse_json_lines(source, key):
    """The value under `key` in the last JSON-object line of `source` that has it.

    `source` is a path, '-' (stdin), or the text itself (anything with a newline or a '{').
    Lines may carry a prefix before the JSON (torchrun's "[rank0]: "), and may mix with prose.
    Raises NanochatError when no such line exists."""
    name = "stdin"
    if source == "-":
        text = sys.stdin.read()
    elif isinstance(source, os.PathLike) or ("\n" not in source and "{" not in source):
        name = str(source)
        if not os.path.isfile(name):
            raise NanochatError(f"{name} does not exist; give the log file of the stage to read.")
        with open(name, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        name, text = "the given text", source
    found, hit = None, False
    for line in text.splitlines():
        start = line.find("{")
        if start < 0 or key not in line:
            continue
        try:
            obj = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj:
            found, hit = obj[key], True
    if not hit:
        raise NanochatError(f"no JSON line with the key {key!r} in {name}; did the stage finish?")
    return found


def _lookup_field(value, field):
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_train_log(path):
    """Records of a train_log.jsonl; a torn last line (crash mid-write) is skipped."""
    return [rec for _, rec in iter_jsonl(path, skip_bad=True) if isinstance(rec, dict)]


# -----------------------------------------------------------------------------
# Header: git, hardware, software, bloat


def _run(cmd, cwd):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(root=None):
    """Branch, commit, dirty flag and last commit subject; None outside a git checkout."""
    root = root or REPO_ROOT
    commit = _run(["git", "rev-parse", "--short", "HEAD"], root)
    if commit is None:
        return None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root) or ""
    return {
        "branch": (_run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root) or "unknown").strip(),
        "commit": commit.strip(),
        "dirty": bool(status.strip()),
        "message": (_run(["git", "log", "-1", "--format=%s"], root) or "").strip(),
    }


def _cpu_counts():
    logical = os.cpu_count() or 1
    physical = None
    try:
        cores, phys_id = set(), "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys_id = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys_id, line.split(":", 1)[1].strip()))
        physical = len(cores) or None
    except OSError:
        pass
    return physical or logical, logical


def _ram_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info():
    """[(name, vram_bytes)] of the visible CUDA devices, and the CUDA version."""
    try:
        import torch
        if not torch.cuda.is_available():
            return [], None
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append((props.name, props.total_memory))
        return gpus, torch.version.cuda
    except Exception:  # a broken driver must not stop a run from being reported
        return [], None


def gpu_hourly_rate(name):
    """$/hour of one GPU of this name: NANOCHAT_GPU_HOURLY_RATE if set, else a rough cloud price."""
    env = to_number(os.environ.get("NANOCHAT_GPU_HOURLY_RATE"))
    if env is not None:
        return env
    return next((rate for key, rate in GPU_HOURLY_RATES if key.lower() in name.lower()), DEFAULT_GPU_RATE)


def bloat_metrics(root=None):
    """Size of the code base (git-tracked sources): characters, lines, files, tokens ~ chars/4."""
    root = root or REPO_ROOT
    listing = _run(["git", "ls-files"], root)
    if listing is None:
        return None
    texts = []
    for rel in listing.splitlines():
        path = os.path.join(root, rel)
        if rel.endswith(BLOAT_EXTENSIONS) and os.path.isfile(path):  # tracked files may be deleted in the tree
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    chars = sum(len(t) for t in texts)
    return {"Characters": chars, "Lines": sum(t.count("\n") for t in texts), "Files": len(texts),
            "Tokens (approx)": chars // 4}


def render_header(now=None):
    now = now or datetime.datetime.now()
    out = ["# nanochat training report", "", f"Generated: {now.strftime(TIME_FORMAT)}", ""]
    git = git_info()
    out.append("## Environment")
    out.append("")
    out.append("### Git")
    if git:
        out += [f"- Branch: {git['branch']}", f"- Commit: {git['commit']} ({'dirty' if git['dirty'] else 'clean'})",
                f"- Message: {git['message']}"]
    else:
        out.append("- Git: not a git checkout")
    out += ["", "### Hardware", f"- Platform: {platform.system()} {platform.release()} ({platform.machine()})"]
    physical, logical = _cpu_counts()
    out.append(f"- CPUs: {physical} cores ({logical} logical)")
    ram = _ram_bytes()
    out.append(f"- Memory: {ram / 1024**3:.1f} GB" if ram else "- Memory: unknown")
    gpus, cuda = gpu_info()
    if gpus:
        names = sorted({n for n, _ in gpus})
        rate = sum(gpu_hourly_rate(n) for n, _ in gpus)
        out += [f"- GPUs: {len(gpus)} x {', '.join(names)}",
                f"- GPU memory: {sum(v for _, v in gpus) / 1024**3:.1f} GB total",
                f"- CUDA: {cuda}",
                f"- Hourly rate: ${rate:.2f}",
                "- Rate source: " + ("NANOCHAT_GPU_HOURLY_RATE" if os.environ.get("NANOCHAT_GPU_HOURLY_RATE")
                                     else "a typical cloud price per GPU; set NANOCHAT_GPU_HOURLY_RATE to yours")]
    else:
        out += ["- GPUs: none", "- Hourly rate: n/a (no GPU)"]
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    out += ["", "### Software", f"- Python: {platform.python_version()}", f"- PyTorch: {torch_version}", ""]
    bloat = bloat_metrics()
    out.append("### Bloat")
    if bloat:
        out += [f"- {k}: {format_value(v)}" for k, v in bloat.items()]
    else:
        out.append("- Bloat: not a git checkout")
    out += ["", f"Run started: {now.strftime(TIME_FORMAT)}", ""]
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Plots


def find_train_log(base_dir, family, model_tag=None, fallback=True):
    """base_dir/<family>/<tag>/train_log.jsonl: the tag a section names, else (fallback) the newest log."""
    root = os.path.join(base_dir, family)
    if model_tag:
        path = os.path.join(root, str(model_tag), "train_log.jsonl")
        if os.path.isfile(path):
            return path
    if not fallback or not os.path.isdir(root):
        return None
    logs = [os.path.join(root, d, "train_log.jsonl") for d in os.listdir(root)]
    logs = [p for p in logs if os.path.isfile(p)]
    return max(logs, key=os.path.getmtime) if logs else None


def _flatten(record, prefix=""):
    """{"pass@k": {"1": 0.2}} -> {"pass@k.1": 0.2}, so nested metrics can be plotted too."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _series(records, key):
    points = []
    for rec in records:
        value, step = rec.get(key), rec.get("step")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(step, (int, float)):
            continue
        if math.isfinite(value):
            points.append((step, value))
    points.sort()
    return points


def plot_train_log(records, title, path):
    """One PNG with a panel per kind of curve the log has (loss, val bpb, reward, pass@k, CORE).
    Returns the panel titles drawn, or [] (and no file) when the log has no curve."""
    records = [_flatten(rec) for rec in records]
    keys = sorted({k for rec in records for k in rec})
    panels = []
    for panel, candidates in PANELS:
        if candidates is None:
            candidates = sorted((k for k in keys if PASS_AT_K.match(k)), key=lambda k: int(re.sub(r"\D", "", k)))
        series = [(k, _series(records, k)) for k in candidates]
        series = [(k, s) for k, s in series if s]
        if series:
            panels.append((panel, series))
    if not panels:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels):
        for i, (key, points) in enumerate(series):
            xs, ys = zip(*points)
            marker = "o" if len(points) < 30 else None
            ax.plot(xs, ys, label=key, marker=marker, markersize=3, linewidth=1.4 if i == 0 else 0.8,
                    alpha=1.0 if i == 0 or panel == "pass@k" else 0.45)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return [p for p, _ in panels]


# -----------------------------------------------------------------------------
# report.md -> report.html


def _data_uri(src, image_root):
    """A local image as a base64 data URI, so report.html stands alone; other sources unchanged."""
    path = src if os.path.isabs(src) or image_root is None else os.path.join(image_root, src)
    if not os.path.isfile(path):
        return src
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
            ".gif": "image/gif"}.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def markdown_to_html(md, image_root=None, title="nanochat report"):
    """CommonMark with pipe tables, one line break per newline, raw HTML escaped (sections quote
    model samples); local images become data URIs."""
    parser = MarkdownIt("commonmark", {"breaks": True, "html": False, "xhtmlOut": False}).enable("table")
    tokens = parser.parse(md)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", _data_uri(child.attrGet("src"), image_root))
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}"
             "th{background:#f4f4f4}pre{background:#f6f8fa;padding:10px;overflow-x:auto}code{font-size:90%}"
             "img{max-width:100%}h2{border-bottom:1px solid #eee;padding-bottom:4px;margin-top:1.6em}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
            + parser.renderer.render(tokens, parser.options, {}) + "</body>\n</html>\n")


# -----------------------------------------------------------------------------
# The report


class Report:
    """Writes into `report_dir` (base_dir/report by default)."""

    def __init__(self, report_dir=None, base_dir=None):
        self.base_dir = base_dir or get_base_dir()
        self.report_dir = report_dir or os.path.join(self.base_dir, "report")

    def _write(self, name, text):
        os.makedirs(self.report_dir, exist_ok=True)
        path = os.path.join(self.report_dir, name)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def log(self, section, data):
        """Write one section: base_dir/report/<slug>.md, replacing an earlier one of the same name."""
        slug = section_slug(section)
        return self._write(f"{slug}.md", render_section(SECTION_TITLES.get(slug, section), data))

    def reset(self):
        """Forget the previous run (sections, plots, report) and write a fresh header.md."""
        if os.path.isdir(self.report_dir):
            for name in os.listdir(self.report_dir):
                if name.endswith((".md", ".png", ".html")):
                    os.remove(os.path.join(self.report_dir, name))
        path = self._write("header.md", render_header())
        print(f"Report reset; header written to {path}")
        return path

    def _read(self, slug):
        path = os.path.join(self.report_dir, f"{slug}.md")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def _plot(self, stage, family, section_text, title):
        # SFT names its output "output_tag" and the base model it started from "model_tag"
        kv = parse_kv_lines(section_text) if section_text else {}
        tags = [kv[k] for k in ("output_tag", "model_tag") if k in kv]
        log_path = next((p for p in (find_train_log(self.base_dir, family, t, fallback=False) for t in tags) if p), None)
        log_path = log_path or find_train_log(self.base_dir, family)
        if log_path is None:
            return None
        name = f"{stage}-curves.png"
        if not plot_train_log(read_train_log(log_path), f"{title} ({os.path.basename(os.path.dirname(log_path))})",
                              os.path.join(self.report_dir, name)):
            return None
        return f"![{title} curves]({name})\n"

    def generate(self, copy_to_cwd=True):
        """Stitch header + sections (fixed order, then any extra ones) + plots + summary into
        report.md and report.html; returns the path of report.md."""
        os.makedirs(self.report_dir, exist_ok=True)
        header = self._read("header")
        parts = [header.rstrip("\n") + "\n" if header else
                 "# nanochat training report\n\n_No header: run `python -m nanochat.report reset` at the start of a run._\n"]
        texts = {}
        for slug, title in SECTIONS:
            text = self._read(slug)
            texts[slug] = text
            plot = None
            if slug in PLOT_AFTER:
                stage, family, _, plot_title = next(s for s in PLOT_STAGES if s[0] == PLOT_AFTER[slug])
                plot = self._plot(stage, family, text, plot_title)
            if text is None and plot is None:
                parts.append(f"## {title}\n\n_Not run: no {slug}.md in the report directory._\n")
                continue
            parts.append(text.rstrip("\n") + "\n" if text else f"## {title}\n\n_No section logged; training log found._\n")
            if plot:
                parts.append(plot)
        known = {f"{s}.md" for s, _ in SECTIONS} | {"header.md", "report.md"}
        extras = sorted(n for n in os.listdir(self.report_dir) if n.endswith(".md") and n not in known)
        for name in extras:
            with open(os.path.join(self.report_dir, name), encoding="utf-8") as f:
                text = f.read()
            texts[name[:-3]] = text
            parts.append(text.rstrip("\n") + "\n")
        parts.append(self._summary(header, texts))
        md = "\n".join(parts)
        md_path = self._write("report.md", md)
        self._write("report.html", markdown_to_html(md, image_root=self.report_dir))
        if copy_to_cwd:
            dest = os.path.join(os.getcwd(), "report.md")
            if os.path.abspath(dest) != os.path.abspath(md_path):
                with atomic_path(dest) as tmp:
                    shutil.copyfile(md_path, tmp)
        return md_path

    def _summary(self, header, texts):
        values = {slug: _metric_values(t) for slug, t in texts.items() if t}
        rows = []
        for metric, keys in SUMMARY_METRICS:
            cells = []
            for _, sources, allowed in SUMMARY_COLUMNS:
                cell = "-"
                for src in sources if allowed is None or metric in allowed else []:
                    found = next((values[src][k] for k in keys if k in values.get(src, {})), None)
                    if found is not None:
                        cell = found
                        break
                cells.append(cell)
            if metric in OPTIONAL_METRICS and all(c == "-" for c in cells):
                continue
            rows.append(f"| {metric} | " + " | ".join(cells) + " |")
        out = ["## Summary", ""]
        bloat = parse_kv_lines(header.split("### Bloat", 1)[1]) if header and "### Bloat" in header else {}
        out += [f"- {k}: {v}" for k, v in bloat.items() if k != "Bloat"]
        if bloat:
            out.append("")
        out += ["| Metric | BASE | SFT | RL |", "|---|---|---|---|"] + rows + [""]
        started = _timestamp_of(header, "Run started") if header else None
        stamps = [ts for t in texts.values() if t for ts in [_timestamp_of(t)] if ts]
        if started is None and stamps:
            started = min(stamps)
        if started and stamps:
            seconds = max(0.0, (max(stamps) - started).total_seconds())
            out.append(f"- Total wall clock time: {_format_duration(seconds)}")
            rate = to_number(parse_kv_lines(header).get("Hourly rate")) if header else None
            if rate is not None:
                out.append(f"- Estimated cost: ${rate * seconds / 3600:.2f} (at ${rate:.2f}/hour)")
            else:
                out.append("- Estimated cost: n/a (no GPU hourly rate in the header)")
        else:
            out.append("- Total wall clock time: unknown (no timestamps)")
        hw = parse_kv_lines(header) if header else {}
        parts = [f"GPUs {hw['GPUs']}" if hw.get("GPUs") else None, f"CPUs {hw['CPUs']}" if hw.get("CPUs") else None,
                 f"memory {hw['Memory']}" if hw.get("Memory") else None]
        if any(parts):
            out.append("- Hardware: " + "; ".join(p for p in parts if p))
        return "\n".join(out) + "\n"


class DummyReport:
    """What ranks other than 0 get: every call does nothing."""

    def log(self, *args, **kwargs):
        return None

    def reset(self, *args, **kwargs):
        return None

    def generate(self, *args, **kwargs):
        return None


def get_report(base_dir=None):
    """The report of this run: a real one on rank 0, a no-op elsewhere."""
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(base_dir=base_dir)


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description="The nanochat run report card, and the JSON-line reader of the run scripts.")
    base_help = "default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat"
    p.add_argument("--base-dir", default=None, help=base_help)
    # also accepted after the subcommand; SUPPRESS keeps an absent one from hiding the top-level value
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-dir", default=argparse.SUPPRESS, help=base_help)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("reset", parents=[common], help="start a new report: delete old sections, write header.md")
    g = sub.add_parser("generate", parents=[common], help="write report.md and report.html (and copy report.md here)")
    g.add_argument("--no-copy", action="store_true", help="do not copy report.md into the current directory")
    j = sub.add_parser("parse-json", help="print the value under KEY in the last JSON line of LOG having it")
    j.add_argument("key", help="e.g. base_train, chat_eval, or core_metric for a train_log.jsonl")
    j.add_argument("log", nargs="?", default="-", help="log file (default: stdin)")
    j.add_argument("--fields", default=None, help="comma-separated (dotted) fields: print them as one CSV row")
    j.add_argument("--default", default=None, help="print this instead of failing when no such line exists")
    args = p.parse_args(argv)

    if args.command == "parse-json":
        try:
            value = parse_json_lines(args.log, args.key)
        except NanochatError:
            if args.default is None:
                raise
            print(args.default)
            return
        if args.fields:
            row = [_lookup_field(value, f.strip()) for f in args.fields.split(",")]
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(["" if v is None else v for v in row])
            print(buf.getvalue(), end="")
        elif isinstance(value, (dict, list)):
            print(json.dumps(value))
        else:
            print(value)
        return

    report = get_report(base_dir=args.base_dir)
    if args.command == "reset":
        report.reset()
    else:
        path = report.generate(copy_to_cwd=not args.no_copy)
        if path:
            print(f"Report written to {path} (and report.html beside it)")


if __name__ == "__main__":
    run_main(main)
