"""Check a pipeline's inputs in its first seconds, so that it never stops at stage 6 for something
knowable at stage 0: the pretraining shards, the eval bundle, the task data, the spelling word
list, free disk space, the device and the dtype. One line per check; a problem the run cannot
get past is an error (exit status 2) and its line says the fix; an input the run can do without
is a note that says what will be skipped instead.

    python -m nanochat.preflight --data-dir=DIR --min-free-gb=5        # what runs/*.sh call first
"""

import argparse
import os
import shutil
import socket

from nanochat.common import NanochatError, check_free_space, get_base_dir, run_main


def online(host, timeout=5):
    """True when `host` resolves (a cheap test of whether downloads can work)."""
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def check_disk(path, min_free_gb):
    check_free_space(path, min_free_gb * 1e9, "this run")  # the error, with its fix, the training scripts give
    return "ok", f"{shutil.disk_usage(path).free / 1e9:.1f} GB free under {path}"


def check_data(data_dir, is_online):
    from nanochat.dataset import list_parquet_files, open_parquet

    if not data_dir:
        if not is_online:
            return "error", ("no network and no local data; set NANOCHAT_DATA_DIR to a folder of parquet shards "
                             "(python -m nanochat.dataset --from-text DIR makes them from your .txt/.md/.jsonl files).")
        return "ok", "pretraining shards: downloaded from Hugging Face"
    try:
        paths = list_parquet_files(data_dir)
        if len(paths) < 2:
            raise NanochatError(f"{data_dir} holds only 1 parquet file; at least 2 are needed (the last one is the val "
                                f"split): convert more text with `python -m nanochat.dataset --from-text DIR`.")
        rows = sum(open_parquet(p).metadata.num_rows for p in paths)
    except NanochatError as e:
        return "error", str(e)
    return "ok", f"pretraining shards: {len(paths)} files, {rows:,} documents in {data_dir} (the last is the val split)"


def check_bundle(bundle, is_online):
    from nanochat.core_eval import _bundle_root

    if bundle:
        if os.path.isfile(bundle) and bundle.endswith(".zip"):
            return "ok", f"eval bundle: {bundle}"
        if not os.path.isdir(bundle) or _bundle_root(bundle) is None:
            return "error", (f"NANOCHAT_EVAL_BUNDLE={bundle} is not an unzipped eval bundle (no core.yaml in it); point "
                             f"it at the folder that holds core.yaml, or unset it to skip CORE offline.")
        return "ok", f"eval bundle: {bundle}"
    cached = os.path.join(get_base_dir(), "eval_bundle")
    if os.path.isdir(cached) and _bundle_root(cached):
        return "ok", f"eval bundle: {cached}"
    if is_online:
        return "ok", "eval bundle: downloaded on first use"
    return "note", "no network and no NANOCHAT_EVAL_BUNDLE: CORE is skipped (bpb and samples still run)."


def check_task_data(task_dir, is_online):
    """Which SFT/chat-eval task files are present; offline, the absent ones are skipped."""
    if is_online and not task_dir:
        return "ok", "task data: from Hugging Face"
    if task_dir and not os.path.isdir(task_dir):
        return "error", (f"NANOCHAT_TASK_DATA_DIR={task_dir} does not exist; create it with the task folders "
                         f"(gsm8k/, mmlu/, ...) or unset it.")
    found = sorted(name for name in os.listdir(task_dir) if os.path.isdir(os.path.join(task_dir, name))) if task_dir else []
    if found:
        return "note", (f"task data in {task_dir}: {', '.join(found)}; SFT and chat eval skip the other tasks"
                        f"{'' if is_online else ' (offline)'}.")
    return "note", ("no task data offline: SFT trains on the identity conversations and the spelling tasks and "
                    "validates on a held-out slice of the identity conversations; chat eval runs SpellingBee only.")


def check_words(task_dir, data_dir, is_online):
    from nanochat.tasks.spellingbee import CORPUS_WORDS, SYSTEM_WORDS

    candidates = [os.path.join(task_dir, "spellingbee", "words_alpha.txt")] if task_dir else []
    candidates += [os.path.join(get_base_dir(), "words_alpha.txt"), os.path.join(get_base_dir(), CORPUS_WORDS)]
    if is_online or any(os.path.isfile(p) for p in candidates) or os.path.isfile(SYSTEM_WORDS):
        return "ok", "spelling word list: available"
    if data_dir:
        return "note", "no spelling word list offline: one is made from the words of your shards."
    return "note", "no spelling word list offline: the spelling tasks are skipped."


def check_device_dtype(gpus=0):
    import torch

    from nanochat.common import COMPUTE_DTYPE, autodetect_device_type  # importing checks NANOCHAT_DTYPE

    device = autodetect_device_type()
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > visible:
        return "error", (f"this run launches {gpus} processes, one per GPU, but {visible} CUDA GPU(s) are visible; "
                         f"set NPROC={visible}" + (" (and expect a long run)." if visible else
                                                   ", or use runs/runcpu.sh on a machine without GPUs."))
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    return "ok", f"device {device}{threads}, compute dtype {str(COMPUTE_DTYPE).removeprefix('torch.')}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("NANOCHAT_DATA_DIR"), help="local parquet shards")
    p.add_argument("--bundle-dir", default=os.environ.get("NANOCHAT_EVAL_BUNDLE"), help="unzipped CORE eval bundle")
    p.add_argument("--task-data-dir", default=os.environ.get("NANOCHAT_TASK_DATA_DIR"), help="local task data")
    p.add_argument("--min-free-gb", type=float, default=2.0, help="free disk space the run needs in the base dir")
    p.add_argument("--gpus", type=int, default=0, help="CUDA GPUs the run needs (0: any device)")
    p.add_argument("--host", default="huggingface.co", help="whose reachability means 'online'")
    args = p.parse_args(argv)
    is_online = online(args.host)
    checks = [
        ("disk", lambda: check_disk(get_base_dir(), args.min_free_gb)),
        ("device", lambda: check_device_dtype(args.gpus)),
        ("data", lambda: check_data(args.data_dir, is_online)),
        ("bundle", lambda: check_bundle(args.bundle_dir, is_online)),
        ("tasks", lambda: check_task_data(args.task_data_dir, is_online)),
        ("words", lambda: check_words(args.task_data_dir, args.data_dir, is_online)),
    ]
    errors = []
    print(f"preflight ({'online' if is_online else 'offline'}):", flush=True)
    for name, check in checks:
        try:
            level, message = check()
        except NanochatError as e:
            level, message = "error", str(e)
        print(f"  {level:5s} {name:6s} {message}", flush=True)
        if level == "error":
            errors.append(f"{name}: {message}")
    if errors:
        raise NanochatError(errors[0] if len(errors) == 1 else
                            f"{len(errors)} problems, fix them first: " + " | ".join(errors))


if __name__ == "__main__":
    run_main(main)
