"""The decode step compiled ahead of time (AOTInductor) and cached on disk: the CPU engine's
default once it is built.

Why: an eager decode step pays PyTorch's dispatch for each of its ~280 small ops, which on a
CPU costs more than the matmuls themselves at batch 1 (d4: ~3 ms of a ~4 ms step on a 2-core
Xeon, where the weights stream in 0.7 ms). torch.export captures the step once (embedding,
the layers, the logits, the cache written in place), inductor turns it into one shared library
of fused C++ kernels, and loading that library later takes milliseconds, not the seconds a
torch.compile warm start spends tracing again.

What is captured: the model's own forward on a DecodeStep (nothing is written twice), with
every parameter an input, so one build serves every checkpoint of a shape and an in-place
weight update (RL) is seen at the next step, and every size that varies between steps
symbolic: rows decoded B, cache rows R and length T, attention span L. So there is one build
per model shape, dtype, torch version, CPU and version of the model code, made by a child
process at low priority (~20-60 s on 2 cores) while the engine decodes eagerly; the engine
switches at the first step after the library appears. Engine.warmup() waits for it instead,
so a server says it is ready only once it decodes at full speed.

Builds live in <base_dir>/aot/<key>.pt2; while one is made, <key>.building holds the builder's
pid and <key>.<pid>.log its output; a failed build leaves <key>.failed (its log) and is not
retried until that file is deleted.

    python -m nanochat.aot --config '{"n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 4}'   # ahead of use
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

from nanochat.common import COMPUTE_DTYPE, NanochatError, get_base_dir, run_main
from nanochat.gpt import GPT, DecodeStep, GPTConfig

_SOURCES = ("gpt.py", "attention.py", "kernels.py", "aot.py")  # the code the library is compiled from


def supported(model):
    """Whether the model's decode step can be built: our GPT on the CPU with every matmul weight
    already in the compute dtype (the fp32 default; a bf16 run with fp32 masters decodes eagerly)."""
    if not isinstance(model, GPT) or model.get_device().type != "cpu":
        return False
    return all(m.weight.dtype == COMPUTE_DTYPE for m in model.modules() if isinstance(m, torch.nn.Linear))


def key(config, padded_vocab):
    """What a build depends on, hashed: the shape, dtype, torch build, CPU and model code."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            code.update(f.read())
    what = {"config": dataclasses.asdict(config), "padded_vocab": padded_vocab,
            "dtype": str(COMPUTE_DTYPE), "torch": torch.__version__, "machine": platform.machine(),
            "isa": torch.backends.cpu.get_cpu_capability(), "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def package_path(model):
    return os.path.join(get_base_dir(), "aot", key(model.config, model.padded_vocab_size) + ".pt2")


class DecodeProgram(torch.nn.Module):
    """The exported step: (ids (B, 1), pos (B,), span (L,), k, v (n_layer, R, T, Hkv, D), prev
    (R, 1, C), weights in named_parameters order) -> fp32 logits (B, V); k, v and prev are
    written in place as the eager step writes them. `span` only carries L in its shape."""

    def __init__(self, model):
        super().__init__()
        self.model = [model]  # in a list: not a submodule, so its parameters are not constants
        self.names = [name for name, _ in model.named_parameters()]

    def forward(self, ids, pos, span, k, v, prev, weights):
        model = self.model[0]
        step = DecodeStep(k, v, prev, pos, span.size(0))
        params = dict(zip(self.names, weights))
        return torch.func.functional_call(model, params, (ids,), {"kv_cache": step}, strict=False)[:, -1, :]


def weights_of(model):
    """The step's weight inputs: the parameters themselves (so in-place updates are seen)."""
    return [p.detach() for p in model.parameters()]


def compile_step(model, path):
    """Export the decode step of `model` with symbolic sizes and compile it to `path` (written
    to a temporary name, then renamed, so a reader never sees half a package)."""
    from torch.export import Dim

    c = model.config
    hd = c.n_embd // c.n_head
    B, R = Dim("B", min=1, max=1 << 16), Dim("R", min=1, max=1 << 16)
    T, L = Dim("T", min=2, max=c.sequence_len), Dim("L", min=2, max=c.sequence_len)  # L <= T: the session's job
    k = torch.zeros(c.n_layer, 8, 128, c.n_kv_head, hd, dtype=COMPUTE_DTYPE)
    example = (torch.zeros(4, 1, dtype=torch.long), torch.arange(4) * 3, torch.empty(64, dtype=torch.int8),
               k, torch.zeros_like(k), torch.zeros(8, 1, c.n_embd, dtype=COMPUTE_DTYPE), weights_of(model))
    dynamic = ({0: B}, {0: B}, {0: L}, {1: R, 2: T}, {1: R, 2: T}, {0: R}, [None] * len(example[-1]))
    with torch.no_grad():
        program = torch.export.export(DecodeProgram(model), example, dynamic_shapes=dynamic, strict=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.pt2"
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Compiled:
    """A built step, called as DecodeProgram is. It talks to the package loader directly: loading
    takes milliseconds and imports neither inductor nor dynamo (together ~1.5 s), and a step
    passes its inputs as one flat list, without the per-call parsing of the packaged call spec
    that torch's generic wrapper does."""

    def __init__(self, path):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)

    def __call__(self, ids, pos, span, k, v, prev, weights):
        return self.loader.boxed_run([ids, pos, span, k, v, prev, *weights])[0]


class Build:
    """A package for a model: found on disk, or being built by a child process at low priority
    (by this process, or by another one that holds <key>.building with its builder's pid: two
    ranks or two scripts never build the same package at once). ready() never blocks; wait() does."""

    def __init__(self, model):
        self.path = package_path(model)
        stem = self.path[:-len(".pt2")]
        self.failed, self.lock, self.log = stem + ".failed", stem + ".building", f"{stem}.{os.getpid()}.log"
        self.proc = None  # our builder
        self.other = None  # the pid of another process's builder
        self.error = None
        self._start(model.config)

    def _start(self, config):
        if os.path.exists(self.path):
            return
        if os.path.exists(self.failed):
            self.error = f"an earlier build failed (log: {self.failed}; delete it to try again)"
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = _pid_in(self.lock)
            if pid is not None and _alive(pid):
                self.other = pid
                return
            if pid is None and time.time() - _mtime(self.lock) < 5:  # its builder is being started
                time.sleep(0.1)
                return self._start(config)
            with contextlib.suppress(FileNotFoundError):  # left by a builder that died: take over
                os.remove(self.lock)
            return self._start(config)
        env = dict(os.environ, NANOCHAT_DTYPE=str(COMPUTE_DTYPE).removeprefix("torch."), NANOCHAT_FORCE_DTYPE="1")
        with open(self.log, "w") as log:
            # its own session: a Ctrl-C that stops a chat does not cut a build short; niced: a
            # build on a busy machine yields to the decoding it is meant to speed up
            self.proc = subprocess.Popen(self.command(config), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=lambda: os.nice(10))
        with os.fdopen(fd, "w") as f:
            f.write(str(self.proc.pid))

    def command(self, config):
        return [sys.executable, "-m", "nanochat.aot", "--out", self.path, "--config",
                json.dumps(dataclasses.asdict(config))]

    def ready(self):
        """The package's path once it exists, else None (self.error says when it never will)."""
        if self.error is not None:
            return None
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                return None
            self.proc = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock)
            if rc != 0 or not os.path.exists(self.path):
                os.replace(self.log, self.failed)
                self.error = f"the build exited with status {rc} (log: {self.failed}; delete it to try again)"
                return None
            os.remove(self.log)
        elif self.other is not None and not os.path.exists(self.path):
            if _alive(self.other):
                return None
            self.other = None
            self.error = f"another process's build (pid in {self.lock}) ended without a package"
            if os.path.exists(self.failed):
                self.error = f"another process's build failed (log: {self.failed}; delete it to try again)"
            return None
        return self.path

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        while self.other is not None and self.ready() is None and self.error is None:
            if end is not None and time.monotonic() > end:
                break
            time.sleep(0.2)
        return self.ready()


def _pid_in(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or "x")
    except (OSError, ValueError):
        return None


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the ahead-of-time compiled decode step for a model shape.")
    p.add_argument("--config", required=True, help="the model's GPTConfig fields as JSON, e.g. '{\"n_layer\": 4}'")
    p.add_argument("--out", default=None, help="package path (default: where the engine looks for it)")
    args = p.parse_args(argv)
    try:
        config = GPTConfig(**json.loads(args.config))
    except (ValueError, TypeError) as e:
        raise NanochatError(f"--config is not a GPTConfig as JSON ({e}); pass the fields of the model's config.") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()  # values are not compiled in; they only have to be numbers
    out = args.out or package_path(model)
    t0 = time.perf_counter()
    compile_step(model, out)
    print(f"built {out} in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    run_main(main)
