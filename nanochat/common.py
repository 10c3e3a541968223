"""Shared plumbing: base directory, device and precision, distributed init, printing,
logging, clear user-facing errors, atomic writes and downloads."""

import contextlib
import gzip
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import warnings

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Errors a user can fix: one sentence, non-zero exit, no traceback.


class NanochatError(Exception):
    """An expected failure (missing data, bad flag, corrupt file). The message says what is
    wrong and what to do; scripts print it as one line and exit with status 2."""


def run_main(main):
    """Run a script's main(), turning NanochatError into one line on stderr and exit 2."""
    try:
        main()
    except NanochatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def require(module, extra, what):
    """Import an optional dependency, or fail with the one command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NanochatError(f"{what} needs the `{module.split('.')[0]}` package: install nanochat's [{extra}] extra "
                            f"with `pip install -e '.[{extra}]'` from the nanochat checkout.") from None


# -----------------------------------------------------------------------------
# Where artifacts live


def get_base_dir():
    """Everything a run writes lives here: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


# -----------------------------------------------------------------------------
# Printing and logging


def print0(*args, **kwargs):
    """print() on rank 0 only (RANK unset counts as rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


class _ColorFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[35m"}

    def format(self, record):
        msg = super().format(record)
        color = self.COLORS.get(record.levelname)
        if color and sys.stderr.isatty():
            msg = msg.replace(record.levelname, f"{color}{record.levelname}\033[0m", 1)
        return msg


def setup_default_logging(level=logging.INFO):
    handler = logging.StreamHandler()
    handler.setFormatter(_ColorFormatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


setup_default_logging()
logger = logging.getLogger("nanochat")


# -----------------------------------------------------------------------------
# Device and precision


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def _detect_compute_dtype():
    """bf16 on SM80+ GPUs (native bf16 matmuls), fp32 elsewhere; NANOCHAT_DTYPE overrides.
    fp16 is opt-in only (it needs a GradScaler). A half dtype asked for on a machine whose only
    device is the CPU is checked first (see check_cpu_half_dtype)."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        if env not in _DTYPES:
            raise NanochatError(f"NANOCHAT_DTYPE={env!r} is not a dtype nanochat knows; use bfloat16, float16 or float32.")
        dtype = _DTYPES[env]
        if dtype != torch.float32 and autodetect_device_type() == "cpu":
            force = os.environ.get("NANOCHAT_FORCE_DTYPE", "0") not in ("", "0") or "--force-dtype" in sys.argv
            dtype = check_cpu_half_dtype(dtype, lambda d: measure_matmul_flops("cpu", d, size=256, seconds=0.1, trials=2),
                                         force)
        return dtype
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        return torch.bfloat16
    return torch.float32


def check_cpu_half_dtype(dtype, measure, force=False):
    """The dtype to train in when `dtype` (bf16 or fp16) is asked for on a CPU. A CPU without
    native half-precision matmuls emulates them, often 100x slower than fp32: when `measure(dtype)`
    (FLOP/s) is under half of `measure(torch.float32)`, warn with the figures and return float32,
    unless `force` keeps the dtype asked for."""
    half, full = measure(dtype), measure(torch.float32)
    if half >= full / 2:
        return dtype
    name = str(dtype).removeprefix("torch.")
    figures = (f"{name} matmuls run at {half / 1e9:.1f} GFLOP/s on this CPU against {full / 1e9:.1f} GFLOP/s in "
               f"float32 ({full / max(half, 1.0):.0f}x slower: no native {name} support)")
    if force:
        logger.warning(f"{figures}; keeping {name} as --force-dtype / NANOCHAT_FORCE_DTYPE asks.")
        return dtype
    logger.warning(f"{figures}; training in float32 instead (pass --force-dtype or set NANOCHAT_FORCE_DTYPE=1 "
                   f"to keep {name}).")
    return torch.float32


# -----------------------------------------------------------------------------
# Distributed


def is_ddp_requested():
    """True when launched by torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()


def dist_rank_world():
    """(rank, world_size) of the initialized process group, or (0, 1): for library code that may
    run under torchrun or inside a test's own process group."""
    if is_ddp_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def get_dist_info():
    """(ddp, rank, local_rank, world_size); (False, 0, 0, 1) outside torchrun."""
    if is_ddp_requested():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def enable_tf32():
    """TF32 for fp32 matmuls on CUDA (all of an fp32 run's, the fp32 ones of a bf16 run).
    Set through torch.set_float32_matmul_precision, the one TF32 API that every torch this project
    supports (2.9 to 2.13) accepts together with inductor: the per-backend `fp32_precision`
    settings make inductor on 2.9-2.12 stop with "mix of the legacy and new APIs" in some
    lowerings, and make torch.get_float32_matmul_precision() raise on 2.13. (Some of those
    versions warn that this API will be deprecated: that is the advice not to follow yet.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*(TF32|going to be deprecated)", category=UserWarning)
        torch.set_float32_matmul_precision("high")


def compute_init(device_type=""):
    """Seed, pick the device, and join the process group when under torchrun.
    nccl on CUDA, gloo on CPU (and MPS, which has no collective backend of its own).
    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise NanochatError("--device-type=cuda was asked for but no CUDA device is visible; use --device-type=cpu.")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise NanochatError("--device-type=mps was asked for but MPS is not available; use --device-type=cpu.")
    if device_type not in ("cuda", "mps", "cpu"):
        raise NanochatError(f"unknown device type {device_type!r}; use cuda, mps or cpu.")

    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        enable_tf32()

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info(f"Distributed world size: {world_size}, device: {device}, dtype: {COMPUTE_DTYPE}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Leave the process group. Every rank first meets the others at a barrier: a rank that tears
    its connections down while a peer is still sending to it (rank 0 done first, the others
    finishing a save) makes gloo raise in that peer's I/O thread, which aborts it (SIGABRT)."""
    if is_ddp_initialized():
        dist.barrier()
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for wandb when logging is off (--run=dummy, or ranks other than 0)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


# -----------------------------------------------------------------------------
# Peak rates for MFU / MBU


# bf16 dense peak FLOP/s by GPU model. A key is the words that must all appear in the device name
# (lowercased, split at anything but letters and digits), so "a40" never matches "RTX A4000" nor
# "l4" "L40S"; the longest matching key wins ("h100 pcie" over "h100").
_PEAK_FLOPS = {
    ("gb200",): 2.5e15, ("b200",): 2.25e15, ("b100",): 1.75e15,
    ("h200",): 989e12, ("h200", "nvl"): 835e12, ("gh200",): 989e12,
    ("h100",): 989e12, ("h100", "pcie"): 756e12, ("h100", "nvl"): 835e12,
    ("h800",): 989e12, ("h800", "pcie"): 756e12, ("h20",): 148e12,
    ("a100",): 312e12, ("a800",): 312e12, ("a40",): 149.7e12, ("a30",): 165e12, ("a10",): 125e12,
    ("l40s",): 362e12, ("l40",): 181e12, ("l4",): 121e12,
    ("a6000",): 154.8e12, ("6000", "ada"): 364.2e12,
    ("5090",): 209.5e12, ("4090",): 165.2e12, ("3090",): 71e12, ("3090", "ti"): 80e12,
    ("mi355x",): 2.5e15, ("mi325x",): 1.3074e15, ("mi300x",): 1.3074e15, ("mi300a",): 980.6e12,
    ("mi250x",): 383e12, ("mi250",): 362.1e12,
}

# memory bytes/s, same keys
_PEAK_BANDWIDTH = {
    ("gb200",): 8.0e12, ("b200",): 8.0e12, ("b100",): 8.0e12,
    ("h200",): 4.8e12, ("h100",): 3.35e12, ("h100", "pcie"): 2.0e12, ("h100", "nvl"): 3.9e12,
    ("h800",): 3.35e12, ("h800", "pcie"): 2.0e12, ("h20",): 4.0e12,
    ("a100",): 1.555e12, ("a100", "80gb"): 2.039e12, ("a100", "80gb", "pcie"): 1.935e12,
    ("a40",): 696e9, ("a30",): 933e9, ("a10",): 600e9, ("l40s",): 864e9, ("l40",): 864e9, ("l4",): 300e9,
    ("5090",): 1.792e12, ("4090",): 1.008e12, ("3090",): 936e9, ("3090", "ti"): 1.008e12,
    ("mi355x",): 8.0e12, ("mi325x",): 6.0e12, ("mi300x",): 5.3e12,
}


def _lookup(table, device_name):
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    if words & {"laptop", "mobile"}:  # a desktop card's model name at a fraction of its rate
        return float("inf")
    keys = [key for key in table if words.issuperset(key)]
    return table[max(keys, key=len)] if keys else float("inf")


def get_peak_flops(device_name):
    """bf16 dense peak of a known GPU, by torch.cuda.get_device_name(); inf when unknown (MFU is
    then reported as n/a; --peak-flops gives it)."""
    return _lookup(_PEAK_FLOPS, device_name)


def get_peak_bandwidth(device_name):
    """Memory bandwidth of a known GPU in bytes/s; inf when unknown."""
    return _lookup(_PEAK_BANDWIDTH, device_name)


# -----------------------------------------------------------------------------
# Files: JSONL, atomic writes, downloads


def iter_jsonl(path, skip_bad=False):
    """(line number, value) for each non-blank line of a .jsonl or .jsonl.gz file; a stray bad
    byte becomes U+FFFD. A line that is not JSON raises NanochatError naming the file and line, or
    with skip_bad is skipped (a log whose last line a crash cut short)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    continue
                raise NanochatError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                    f"fix or remove that line.") from None
            yield lineno, value


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure
    remove it. A crash at any moment leaves either the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_free_space(path, need_bytes, what):
    """NanochatError now, rather than a failed write hours from now, when the disk holding `path`
    has less than `need_bytes` free for `what`."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise NanochatError(f"only {free / 1e9:.2f} GB free under {path} but {what} needs about {need_bytes / 1e9:.2f} GB; "
                            f"free some space or point NANOCHAT_BASE_DIR at a larger disk.")


def is_url(source):
    return urllib.parse.urlparse(str(source)).scheme in ("http", "https", "file")


def download_file(source, dest, *, attempts=5, timeout=30, desc=None, progress=True, session=None, verify=None):
    """Fetch `source` (http(s) URL, file:// URL or local path) to `dest`, atomically, under a
    file lock so concurrent ranks download once. Retries with exponential backoff (2, 4, 8,
    16 s); returns `dest`. An existing `dest` is trusted (it only ever appears complete).
    A 4xx answer (other than 408/429) fails at once: retrying cannot fix a wrong URL.
    `verify(tmp_path)`, when given, checks the fetched file before it is renamed into place and
    raises on bad content: a bad download counts as a failed attempt, a bad local file fails at once."""
    import requests
    from filelock import FileLock
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with FileLock(dest + ".lock"):
        if os.path.exists(dest):
            return dest
        parsed = urllib.parse.urlparse(str(source))
        if parsed.scheme in ("", "file"):
            local = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else str(source)
            if not os.path.exists(local):
                raise NanochatError(f"{local} does not exist; check the path you gave.")
            with atomic_path(dest) as tmp:
                shutil.copyfile(local, tmp)
                if verify is not None:
                    try:
                        verify(tmp)
                    except Exception as e:
                        raise NanochatError(f"{local} is not a valid file ({e}); replace it with a good copy.") from e
            return dest
        http = session or requests
        last_error = None
        for attempt in range(1, attempts + 1):
            try:
                with http.get(source, stream=True, timeout=timeout) as r:
                    if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                        raise NanochatError(f"{source} answered {r.status_code} {r.reason}; check the URL "
                                            f"(retrying will not help).")
                    r.raise_for_status()
                    total = int(r.headers.get("content-length", 0)) or None
                    with atomic_path(dest) as tmp:
                        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, leave=False,
                                                        desc=desc or os.path.basename(dest), disable=not progress) as bar:
                            for chunk in r.iter_content(chunk_size=1 << 20):
                                f.write(chunk)
                                bar.update(len(chunk))
                            written = f.tell()
                        if total is not None and written != total:  # raising here discards the temp file
                            raise OSError(f"short read: {written} of {total} bytes")
                        if verify is not None:
                            try:
                                verify(tmp)
                            except Exception as e:
                                raise OSError(f"the downloaded file is invalid: {e}") from e
                return dest
            except (requests.RequestException, OSError) as e:
                last_error = e
                if attempt < attempts:
                    wait = 2 ** attempt
                    logger.warning(f"download of {source} failed ({e}); retry {attempt}/{attempts - 1} in {wait}s")
                    time.sleep(wait)
        raise NanochatError(f"could not download {source} after {attempts} attempts ({last_error}); "
                            f"check the network or give a local copy.")


def synchronize(device):
    """Wait for the work queued on `device` (CUDA and MPS run asynchronously; timings need this)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(device, dtype=torch.float32, size=1024, seconds=0.3, trials=5):
    """Measured dense matmul rate (FLOP/s) of this device, the best of a few short trials: the
    honest MFU denominator on CPUs and unknown GPUs, where no datasheet peak applies."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    for _ in range(3):  # warm up
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        synchronize(device)
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0))
    return best


COMPUTE_DTYPE = _detect_compute_dtype()  # here: the check of a CPU half dtype measures with the function above


def fit_horizon(num_iterations, total_batch_size, data_tokens, max_passes=0, warn_passes=2.0):
    """The horizon, shortened to `max_passes` passes over `data_tokens` when that is set (> 0).
    A run that would still see its data more than `warn_passes` times is told so, with the
    numbers: a small model memorizes repeated text (its train loss falls, its val loss rises)."""
    if data_tokens <= 0:
        return num_iterations
    passes = num_iterations * total_batch_size / data_tokens
    if max_passes > 0 and passes > max_passes:
        fitted = max(1, int(max_passes * data_tokens // total_batch_size))
        print0(f"Horizon: {num_iterations:,} steps x {total_batch_size:,} tokens would pass over the ~{data_tokens:,} "
               f"training tokens {passes:.1f} times; shortened to {fitted:,} steps ({max_passes:g} passes, "
               f"--max-data-passes)")
        num_iterations, passes = fitted, fitted * total_batch_size / data_tokens
    if passes > warn_passes:
        print0(f"warning: this run trains on {num_iterations * total_batch_size:,} tokens but the training data holds "
               f"about {data_tokens:,}: {passes:.1f} passes over it. Repeated data is memorized (the val loss stops "
               f"falling, then rises); add data, or lower --num-iterations to about "
               f"{max(1, int(warn_passes * data_tokens // total_batch_size)):,} ({warn_passes:g} passes).")
    return num_iterations


def init_wandb(run, master, project, config):
    """A wandb run when --run names one (rank 0 only), else a no-op stand-in."""
    if run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        raise NanochatError("--run needs wandb: `pip install wandb`, or use --run=dummy.") from None
    return wandb.init(project=project, name=run, config=config)


def _machine_key(device, dtype):
    """What a measured matmul rate belongs to: this host, its processor, threads, torch and dtype."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return f"{platform.node()}|{cpu}|{device.type}|{torch.get_num_threads()} threads|torch {torch.__version__}|{dtype}"


def mfu_denominator(device, override=0.0, dtype=None):
    """Peak FLOP/s for MFU: --peak-flops when given; the GPU table (inf = unknown, shown as n/a);
    on CPU/MPS the best matmul rate ever measured on this machine. One measurement taken while
    something else runs comes out low and would inflate MFU, so each run measures again and the
    best so far is kept per machine in base_dir/matmul_peak.json."""
    if override > 0:
        return override
    if device.type == "cuda":
        return get_peak_flops(torch.cuda.get_device_name(device))
    dtype = dtype or COMPUTE_DTYPE
    rate = measure_matmul_flops(device, dtype)
    path, key = os.path.join(get_base_dir(), "matmul_peak.json"), _machine_key(device, dtype)
    cache = {}
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            cache = json.load(f)
    best = max(rate, float(cache.get(key, 0.0)))
    if best > cache.get(key, 0.0) and int(os.environ.get("RANK", 0)) == 0:
        cache[key] = best
        with contextlib.suppress(OSError), atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
    print0(f"Measured {device.type} matmul rate ({dtype}): {rate / 1e9:.1f} GFLOP/s now, {best / 1e9:.1f} GFLOP/s "
           f"the best on this machine (the MFU denominator)")
    return best


_mfu_clamp_noted = False


def mfu_percent(flops_per_sec, peak_flops):
    """Model FLOPs utilization in percent, None when the peak is unknown. Never above 100: a higher
    figure means the denominator was measured low (the machine was busy then); it is clamped and
    a note says so once."""
    global _mfu_clamp_noted
    if not math.isfinite(peak_flops) or peak_flops <= 0:
        return None
    mfu = 100 * flops_per_sec / peak_flops
    if mfu > 100:
        if not _mfu_clamp_noted:
            print0(f"note: MFU came out at {mfu:.0f}%, above the measured peak: the machine was busy while the peak "
                   f"was measured; shown as 100 (pass --peak-flops to set the peak yourself)")
            _mfu_clamp_noted = True
        mfu = 100.0
    return mfu
