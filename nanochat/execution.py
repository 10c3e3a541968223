"""Running untrusted model output: the calculator tool, the Python sandbox, and checks whose
verdict the checked program cannot forge.

use_calculator(expr)
    Evaluates the small expressions the model writes between <|python_start|> and
    <|python_end|>: plain arithmetic, or string methods ending in `.count(...)`. Everything
    that could be slow or large is rejected before eval (see the comment at the function), so
    it needs no signal-based timeout and works from any thread.

execute_code(code, timeout=5.0, maximum_memory_bytes=256 MiB) -> ExecutionResult
    Runs a Python program in a fresh interpreter (`-I`: no PYTHON* variables, no user site, no
    cwd on sys.path), isolated as well as this machine allows. The isolation level is chosen
    once per process (the best one whose self-test passes), logged once, and returned with every
    result as ExecutionResult.isolation:
      "bwrap"          bubblewrap (apt-get install bubblewrap) is on PATH and works;
      "namespaces"     no bwrap, but the kernel lets us create the same namespaces ourselves;
      "per-run-uid"    no namespaces (a typical container), but we are root: degraded;
      "process-group"  none of the above (a non-root user in a container): degraded; never
                       chosen as the machine's root (model code would run as root).
    The two full levels give every run new PID, network, mount, IPC and UTS namespaces. Its file
    system is a read-only view of the interpreter (/usr, the Python prefixes it imports from),
    a minimal /dev, its own /proc, and one empty writable directory (/tmp, also its cwd and
    HOME); the home directory, the data folder and other runs do not exist there. Its network
    is at most its own loopback: nothing outside, not even the host's 127.0.0.1, can be reached.
    Its PID 1 is our own small init, which waits for the program and then exits: the kernel then
    kills everything left in the namespace, so no process of a run outlives it, and runs cannot
    see each other.
    As root the program runs as a uid of its own (a per-run uid, so RLIMIT_NPROC bounds this
    run only and its files belong to no one else); otherwise as the caller's user inside a user
    namespace, with every capability dropped. Always: no new privileges (setuid binaries do not
    elevate), not dumpable (nothing can ptrace it or read its /proc entries), no inherited file
    descriptors, environment reduced to PATH, HOME, TMPDIR, LANG and single-thread BLAS settings,
    stdin from /dev/null, rlimits (RLIMIT_AS = maximum_memory_bytes, RLIMIT_CPU ~ timeout,
    RLIMIT_FSIZE = MAX_FILE_BYTES, RLIMIT_CORE 0, RLIMIT_NPROC), a wall-clock deadline, output
    capped at MAX_OUTPUT_BYTES per stream, and a Python-level guard against accidents
    (os.kill/system/fork/remove/... and subprocess.Popen set to None, exit/quit/help removed).
    The degraded levels keep the process group, rlimits, deadline and guard, and lack this:
      per-run-uid    the host's PID, network and mount namespaces: the program can see other
                     processes (not signal or trace them), use the network, read
                     world-readable files and leave files in world-writable places (/tmp).
                     Its processes are found by uid and killed after the run. An interpreter in a directory other users cannot enter (pyenv or uv
                     under /root) is imported through descriptors opened before the drop, which
                     also expose that directory's world-readable parents.
      process-group  everything: the program runs as the caller, can read and write the
                     caller's files, use the network, signal the caller's processes, and a
                     process that leaves the process group (setsid) can outlive the run.
    NANOCHAT_SANDBOX=strict (or --sandbox strict on chat_eval, chat_rl, chat_web) refuses to run
    model code at a degraded level; check_sandbox() fails loudly when no level can start at all.

check_function(code, function, check_source, timeout) -> CheckResult
    Grades `function` defined by untrusted `code` against trusted tests (`check_source`, which
    defines check(candidate)). The tests run in a second, unsandboxed process that holds only
    check_source; `candidate` there is a proxy that sends each call's arguments to the sandboxed
    program over a pipe and reads back its return value as plain data (None, bool, int, float,
    str, bytes, complex, list, tuple, set, dict). The verdict is what check() does with those
    values, printed by the trusted process to a pipe the program has no handle to: an object
    whose __eq__ is always True cannot cross, and a patched sys.exit or builtins, a printed
    marker, an early exit, a kill or a sleep past the deadline can only make the check fail.

What the sandbox does not defend: kernel bugs (it is namespaces and rlimits, not a VM), the
total memory of many processes and the total size of many files (the limits are per process and
per file; the deadline ends both), and the degraded levels' gaps above.
"""

import ast
import fcntl
import inspect
import json
import os
import platform
import pwd
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from nanochat.common import NanochatError, logger

# ---------------------------------------------------------------------------------------------
# Calculator (docs/security.md#the-calculator)

CALCULATOR_MAX_CHARS = 1000
_ARITHMETIC_CHARS = frozenset("0123456789+-*/.() ")
_STRING_EXPR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS_SUBSTRINGS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
                         "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
# String methods whose result is never larger than their receiver (no join/replace/ljust/zfill/
# center/expandtabs/format, which can grow a string exponentially when chained).
_SAFE_STRING_METHODS = frozenset({
    "count", "lower", "upper", "casefold", "strip", "lstrip", "rstrip", "title", "capitalize",
    "swapcase", "find", "rfind", "index", "rindex", "startswith", "endswith", "split", "rsplit",
    "isalpha", "isdigit", "isalnum", "isupper", "islower", "isspace", "isnumeric", "isdecimal",
})


def _only_safe_method_calls(expr):
    """True if expr is built from constants and calls of _SAFE_STRING_METHODS only."""
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if node.keywords or not isinstance(node.func, ast.Attribute):
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _SAFE_STRING_METHODS:
                return False
        elif not isinstance(node, (ast.Expression, ast.Constant, ast.Load)):
            return False
    return True


def use_calculator(expr):
    """Evaluate a calculator expression; the result (rendered by the caller with str()) or None.

    A SIGALRM timeout around the eval would only work on the main thread, while the engine runs
    in web-server worker threads. So instead every accepted expression is cheap by construction,
    checked before eval:
      - at most CALCULATOR_MAX_CHARS characters;
      - arithmetic: only digits, + - * / . ( ) and spaces, no `**`. Without a power operator
        and without names, n characters can only build integers of at most n digits, so the
        work is polynomial in n (microseconds at n = 1000) and str() of the result stays under
        Python's 4300-digit limit; deep nesting is a SyntaxError from the parser;
      - string expressions: an allow-list (characters, forbidden substrings, `.count(`)
        plus an AST check that allows only constants and non-growing string methods, so no
        call can allocate more than the expression's own length (`'a'.ljust(10**10)`,
        nested `.join`/`.replace` are refused). Commas are removed first (the model writes
        numbers like 1,000), so no call has more than one argument.
    Any exception → None."""
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if len(expr) > CALCULATOR_MAX_CHARS:
        return None
    if all(c in _ARITHMETIC_CHARS for c in expr):
        if "**" in expr:
            return None
    else:
        if not all(c in _STRING_EXPR_CHARS for c in expr):
            return None
        lowered = expr.lower()
        if any(bad in lowered for bad in _DANGEROUS_SUBSTRINGS):
            return None
        if ".count(" not in expr:
            return None
        if not _only_safe_method_calls(expr):
            return None
    try:
        result = eval(expr, {"__builtins__": {}}, {})
        str(result)  # the caller renders it; make sure that cannot raise
    except Exception:
        return None
    return result


# ---------------------------------------------------------------------------------------------
# Sandbox

MAX_OUTPUT_BYTES = 1024 * 1024  # per stream
MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
MAX_REPLY_BYTES = 1024 * 1024  # largest return value (as JSON) check_function accepts from the program
NPROC_HEADROOM = 64  # processes/threads a run may have (on top of the caller's own when it has no uid of its own)
SANDBOX_MARKER = "nanochat-sandbox"  # in the child's argv, to recognise sandbox processes
LEVELS = ("bwrap", "namespaces", "per-run-uid", "process-group")  # best first
FULL_ISOLATION = ("bwrap", "namespaces")
# Per-run uids: above systemd's container ranges (up to 1879048191) and below 2^31, which some
# tools mishandle; where this user namespace does not map them, the fallback range is used.
PER_RUN_UID_RANGES = ((1_879_048_192, 1024), (60_000, 1024))
_KILL_GRACE_S = 0.5  # after the program exits, how long to drain output held by stragglers
_STOP_WAIT_S = 2.0  # after killing a run's init, how long its namespace may take to empty
_GRADER_GRACE_S = 5.0  # after the program is gone, how long the trusted check may take to report
_SELF_TEST = "print(6 * 7)"
# pivot_root(2) has no libc wrapper; the namespaces level needs its number on this architecture
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: str = "none"  # the level this run got (one of LEVELS; "none" if it could not start)

    @property
    def network_isolated(self):
        return self.isolation in FULL_ISOLATION


@dataclass
class CheckResult:
    passed: bool
    error: str | None  # why the check failed (the trusted side's exception), None when it passed
    execution: ExecutionResult  # the sandboxed program's run (its output, timeout, isolation)


# ---------------------------------------------------------------------------------------------
# Choosing the isolation level

_isolation = None  # (level, missing) once probed
_isolation_lock = threading.Lock()
_LACKS = {
    "per-run-uid": "no PID, network or mount namespace: the program can see other processes, use the network, "
                   "read world-readable files and leave files in world-writable places like /tmp",
    "process-group": "no namespaces and no uid of its own: the program runs as this user, can use the network, "
                     "touch this user's files and processes, and escape the final kill with setsid",
}


def sandbox_mode():
    """'auto' (run model code at the best level available) or 'strict' (refuse a degraded level),
    from NANOCHAT_SANDBOX."""
    mode = os.environ.get("NANOCHAT_SANDBOX") or "auto"
    if mode not in ("auto", "strict"):
        raise NanochatError(f"NANOCHAT_SANDBOX={mode!r} is not a sandbox mode; use 'auto' or 'strict'.")
    return mode


def isolation():
    """(level, missing): the best level whose self-test passes here, probed once per process and
    logged once; missing says what a degraded level lacks and why the better ones failed (empty
    at a full level). level is "none" when even the weakest level cannot start."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
            level, missing = _isolation
            if level in FULL_ISOLATION:
                logger.info(f"sandbox isolation: {level}")
            else:
                logger.warning(f"sandbox isolation: {level} (degraded: {missing}); apt-get install bubblewrap, "
                               f"or run where user namespaces are enabled, for full isolation")
        return _isolation


def _probe():
    failures = []
    for level in LEVELS:
        reason = _unavailable(level)
        if reason is None:
            result = _execute(_SELF_TEST, 30.0, 256 * 1024 * 1024, level)
            if result.success and result.stdout == "42\n":
                lacks = _LACKS.get(level, "")
                return level, (f"{lacks} ({'; '.join(failures)})" if lacks and failures else lacks)
            reason = result.error or f"the self-test printed {result.stdout[:80]!r}"
        failures.append(f"{level}: {reason}")
    return "none", "; ".join(failures)


def _unavailable(level):
    """Why `level` cannot work here without trying it, or None."""
    if level != "process-group" and sys.platform != "linux":
        return "not Linux"
    if level == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed"
    if level == "namespaces" and platform.machine() not in _SYS_PIVOT_ROOT:
        return f"no pivot_root syscall number for {platform.machine()}"
    if level == "per-run-uid" and not (_IS_ROOT and _uid_pool()):
        return "not root" if not _IS_ROOT else "no spare uid is mapped in this user namespace"
    if level == "process-group" and _IS_ROOT and any(line.split()[:2] == ["0", "0"]
                                                     for line in _id_maps()[0].splitlines()):
        # our root is the machine's (uid_map "0 0 ..."); a rootless container's root is no one outside
        return "it would run model code as the machine's root"
    return None


def _allowed_level(mode=None):
    level, missing = isolation()
    if level == "none":
        return level
    if (mode or sandbox_mode()) == "strict" and level not in FULL_ISOLATION:
        raise NanochatError(f"NANOCHAT_SANDBOX=strict refuses to run model code with '{level}' isolation ({missing}); "
                            f"apt-get install bubblewrap, or run where user namespaces are enabled.")
    return level


def check_sandbox(mode=None):
    """For scripts about to grade model code: the (level, missing) isolation() found, after its
    self-test. NanochatError when the sandbox cannot start at all (every answer would score 0)
    or when `mode` (a --sandbox flag; default NANOCHAT_SANDBOX) is strict and the level is
    degraded. The level is probed once per process, so a run that passes this check keeps it."""
    level = _allowed_level(mode)
    if level == "none":
        raise NanochatError(f"the code sandbox cannot start here ({isolation()[1]}), so every code answer would "
                            f"score 0; fix the cause above or evaluate without code tasks.")
    return isolation()


# ---------------------------------------------------------------------------------------------
# Plain data across the check_function pipes (both sides include these two functions' source)


def _to_wire(value):
    """value as JSON-ready plain data: None, bool, int, str, finite floats and lists as they are;
    tuples, sets, dicts, bytes, complex and non-finite floats as one-key tagged objects.
    Subclasses become their base type; any other type is a TypeError."""
    import math

    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_to_wire(v) for v in value]}
    if isinstance(value, frozenset):
        return {"frozenset": [_to_wire(v) for v in value]}
    if isinstance(value, set):
        return {"set": [_to_wire(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_to_wire(k), _to_wire(v)] for k, v in value.items()]}
    if isinstance(value, bytes):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [float(value.real), float(value.imag)]}
    raise TypeError(f"a {type(value).__name__} is not plain data")


def _from_wire(data):
    """The value _to_wire encoded; ValueError for anything it cannot have produced."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [_from_wire(v) for v in data]
    if type(data) is dict and len(data) == 1:
        tag, body = next(iter(data.items()))
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(v) is float for v in body):
            return complex(*body)
        if type(body) is list:
            items = [_from_wire(v) for v in body]
            if tag == "tuple":
                return tuple(items)
            if tag == "set":
                return set(items)
            if tag == "frozenset":
                return frozenset(items)
            if tag == "dict" and all(type(i) is list and len(i) == 2 for i in items):
                return {k: v for k, v in items}
    raise ValueError("not plain data")


# ---------------------------------------------------------------------------------------------
# The processes of a run (sources passed with -c; never called in the parent)


def _sandbox_child():
    """What every sandbox runs first. By level:
      bwrap          bwrap made the namespaces and the view; this process is their PID 1 (init);
      namespaces     this process (S) unshares them and forks the init, which mounts the view
                     and pivots into it; S waits for it outside;
      per-run-uid, process-group: no init, this process is the program.
    The init forks the program, reports its wait status on the status pipe and exits; the kernel
    then kills whatever is left in the PID namespace. The program drops to its user, sets its
    limits, reports "ready", closes every other descriptor, disables the usual footguns and runs
    the code (and, for check_function, then answers calls). A setup failure is reported as
    "error ..." on the status pipe and ends the run before any user code."""
    import builtins
    import ctypes
    import faulthandler
    import json
    import os
    import resource
    import select
    import shutil
    import signal
    import subprocess
    import sys
    import types

    cfg = json.loads(sys.argv[2])
    level, run_as, status_fd = cfg["level"], cfg["run_as"], cfg["status_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    linux = sys.platform == "linux"  # elsewhere only the process-group level runs, without prctl and capabilities
    # <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
    CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME = 1, 2, 4, 8, 32, 1024, 2048
    MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 4096, 16384, 1 << 18, 1 << 21, 1 << 24
    MNT_DETACH = 2
    PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47

    def report(line):
        os.write(status_fd, (line.replace("\n", " ") + "\n").encode())

    def check(result, what):  # libc calls return -1 and set errno on failure
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def prctl(option, arg=0):
        if linux:
            args = (ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
            check(libc.prctl(option, *args), f"prctl({option})")

    def die_with_parent(parent):  # SIGKILL when the process that started us goes (set again after each setuid)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    def enter_namespaces():
        """S: unshare, fork the init and stay outside as its parent. Returns in the init only."""
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if run_as is None:  # not root: a user namespace of our own makes the rest possible
            flags |= CLONE_NEWUSER
        uid, gid = os.getuid(), os.getgid()
        check(libc.unshare(flags), "unshare")
        if flags & CLONE_NEWUSER:  # our own ids inside (the program's capabilities go, bounding set included)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        lifeline, keep_alive = os.pipe()  # EOF on lifeline once S is gone
        init = os.fork()
        if init:
            os.close(lifeline)
            report(f"init {init}")  # the parent ends a run early by killing it
            os.waitpid(init, 0)  # returns once the init has exited and its namespace is empty
            os._exit(0)
        os.close(keep_alive)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([lifeline], [], [], 0)[0]:  # S died before the line above
            os._exit(1)
        os.close(lifeline)
        build_root(cfg["newroot"], cfg["view"])

    def bind(source, target, readonly):
        check(libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {source}")
        # a bind remount may add flags but must keep those of the source mount (locked in a user namespace)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
        have = os.statvfs(target).f_flag
        for st_flag, ms_flag in ((1, MS_RDONLY), (8, MS_NOEXEC), (1024, MS_NOATIME), (2048, MS_NODIRATIME),
                                 (4096, MS_RELATIME)):
            if have & st_flag:
                flags |= ms_flag
        if not have & (1024 | 4096):
            flags |= MS_STRICTATIME
        check(libc.mount(None, target.encode(), None, flags, None), f"remount {source}")

    def build_root(new, view):
        """The init: a tmpfs at `new` holding the view, made the root; the old root detached."""
        os.umask(0o022)
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        check(libc.mount(b"tmpfs", new.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m"), "mount tmpfs")
        for kind, source, dest in view:
            target = new + dest
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if kind == "symlink":
                os.symlink(source, target)
            elif kind == "proc":
                os.mkdir(target)
                check(libc.mount(b"proc", target.encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount proc")
            elif kind == "dev":
                os.mkdir(target)
                for name in ("null", "zero", "full", "random", "urandom"):
                    os.close(os.open(f"{target}/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
                    check(libc.mount(f"/dev/{name}".encode(), f"{target}/{name}".encode(), None, MS_BIND, None),
                          f"bind /dev/{name}")
                for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                   ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                    os.symlink(link, f"{target}/{name}")
            else:  # "ro" or "rw": a directory or a file from the host
                if os.path.isdir(source):
                    os.makedirs(target, exist_ok=True)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                bind(source, target, readonly=kind == "ro")
        check(libc.mount(None, new.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None), "remount / ro")
        os.chdir(new)
        check(libc.syscall(cfg["sys_pivot_root"], b".", b"."), "pivot_root")
        check(libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")

    def become_init():
        """The init: fork the program (which returns from here), reap until it exits, report its
        wait status and exit, taking the rest of the namespace with us."""
        prctl(PR_SET_DUMPABLE, 0)
        program = os.fork()
        if program == 0:
            return
        for fd in cfg["serve_fds"]:
            os.close(fd)
        while True:
            pid, wait_status = os.wait()
            if pid == program:
                break
        report(f"exit {wait_status}")
        os._exit(0)

    def drop_capabilities():  # a user namespace of our own gave us all of them (or we are root): none for the program
        if not linux:
            return
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) != 0:
                break  # EINVAL past the last capability this kernel knows
        prctl(PR_CAP_AMBIENT, 4)  # PR_CAP_AMBIENT_CLEAR_ALL

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")

    def set_limit(which, soft, hard=None):  # never above an existing hard limit
        hard = soft if hard is None else hard
        try:
            current_hard = resource.getrlimit(which)[1]
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass

    try:
        if level != "bwrap":  # under bwrap our parent is outside the PID namespace; --die-with-parent covers it
            die_with_parent(cfg["parent_pid"])
        with os.fdopen(cfg["program_fd"], encoding="utf-8") as f:
            source = f.read()
        if level == "namespaces":
            enter_namespaces()
        if level in ("bwrap", "namespaces"):
            become_init()
        # From here on: the program.
        moved, import_fds = {}, {}
        if run_as is not None and level == "per-run-uid":
            # No view of our own: the interpreter may live where the run's uid cannot read (pyenv/uv
            # under /root, mode 700). Open every import directory now and, if the uid is locked out
            # of it after the drop, import through /proc/self/fd/N, which needs no permission on
            # the parent directories.
            for entry in sys.path:
                try:
                    import_fds[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
                except (OSError, TypeError):
                    pass
        if run_as is not None:
            os.setgroups([])
            os.setgid(run_as[1])
            os.setuid(run_as[0])
        elif level != "bwrap":  # bwrap already dropped them
            drop_capabilities()
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if level not in ("bwrap", "namespaces"):
            die_with_parent(cfg["parent_pid"])
        for entry, fd in import_fds.items():
            if os.access(entry, os.R_OK | os.X_OK):
                os.close(fd)
            else:
                moved[entry] = f"/proc/self/fd/{fd}"
        if moved:
            def relocate(path):
                for old, new in moved.items():
                    if path == old or path.startswith(old + os.sep):
                        return new + path[len(old):]
                return path

            sys.path[:] = [relocate(p) for p in sys.path]
            for module in list(sys.modules.values()):  # packages already imported by startup/guard
                package_path = getattr(module, "__path__", None)
                if isinstance(package_path, list):
                    package_path[:] = [relocate(p) for p in package_path]
            sys.path_importer_cache.clear()
        # /proc/self/fd/N needs a dumpable process; nothing else of this uid exists to use that
        prctl(PR_SET_DUMPABLE, 1 if moved else 0)
        os.chdir(cfg["workdir"])
        set_limit(resource.RLIMIT_NPROC, cfg["nproc"])
        set_limit(resource.RLIMIT_CORE, 0)
        set_limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
        set_limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
        report("ready")
        keep = {0, 1, 2, *cfg["serve_fds"], *(int(p[len("/proc/self/fd/"):]) for p in moved.values())}
        for fd in [int(name) for name in os.listdir("/proc/self/fd" if linux else "/dev/fd")]:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the descriptor listdir used
    except BaseException as e:
        try:
            report(f"error {type(e).__name__}: {e}")
        finally:
            os._exit(125)

    # The reliability guard against accidents (undone by `import posix`: the OS-level limits above hold).
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
                 "setsid", "setpgid", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execle",
                 "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None

    serve = cfg["serve"]
    if serve is not None:  # what check_function needs after the code ran, held before the code can patch it
        exit_now, loads, dumps, to_wire, from_wire = os._exit, json.loads, json.dumps, _to_wire, _from_wire
        calls = os.fdopen(serve["call_fd"], "rb")
        replies = os.fdopen(serve["reply_fd"], "wb")
    main = types.ModuleType("__main__")  # fresh globals; `import __main__` finds the user's module
    sys.modules["__main__"] = main
    sys.argv = ["<sandbox>"]
    code = compile(source, "<sandbox>", "exec")
    del source
    set_limit(resource.RLIMIT_AS, cfg["memory_bytes"])  # last: the setup itself is not limited
    exec(code, main.__dict__)
    if serve is None:
        return
    # Answer the trusted side's calls until it hangs up. Whatever comes back is only data to it.
    for line in calls:
        try:
            function = main.__dict__[serve["function"]]
            args, kwargs = from_wire(loads(line))
            reply = {"ok": to_wire(function(*args, **kwargs))}
        except BaseException as e:  # SystemExit too: the function cannot end the run early
            reply = {"error": f"{type(e).__name__}: {e}"[:1000]}
        try:
            replies.write(dumps(reply).encode() + b"\n")
            replies.flush()
        except BaseException:
            break
    exit_now(0)


def _grader_child():
    """The trusted side of check_function (runs outside the sandbox, as the caller's user). Reads
    the check source from its pipe, runs it, and calls its check(candidate), where candidate sends
    each call to the sandboxed program and returns its answer as plain data. Prints the verdict
    as one JSON line: nothing the program does reaches this process's stdout."""
    import json
    import os
    import sys

    cfg = json.loads(sys.argv[1])
    with os.fdopen(cfg["source_fd"], encoding="utf-8") as f:
        check_source = f.read()
    verdict_out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # (/dev/null) what the check prints cannot mix with the verdict or fill a pipe
    calls = os.fdopen(cfg["call_fd"], "w", encoding="utf-8")
    replies = os.fdopen(cfg["reply_fd"], "rb")

    class CandidateFailed(BaseException):  # BaseException: a test's `except Exception` cannot swallow it
        pass

    def candidate(*args, **kwargs):
        calls.write(json.dumps(_to_wire([list(args), kwargs])) + "\n")
        calls.flush()
        line = replies.readline(cfg["max_reply_bytes"] + 1)
        if not line.endswith(b"\n"):
            raise CandidateFailed("no answer from the program (it exited, was killed, or answered too much)")
        reply = json.loads(line)
        if type(reply) is not dict or len(reply) != 1 or not ({"ok", "error"} & reply.keys()):
            raise CandidateFailed("a malformed answer from the program")
        if "error" in reply:
            raise CandidateFailed(f"the function raised {str(reply['error'])[:300]}")
        return _from_wire(reply["ok"])

    try:
        namespace = {"__name__": "__check__"}
        exec(compile(check_source, "<check>", "exec"), namespace)
        namespace[cfg["function"]] = candidate  # tests that call the function by name get the proxy too
        namespace["check"](candidate)
        verdict = {"passed": True, "error": None}
    except BaseException as e:
        verdict = {"passed": False, "error": f"{type(e).__name__}: {e}"[:500]}
    verdict_out.write(json.dumps(verdict) + "\n")
    verdict_out.flush()
    os._exit(0)  # do not wait on anything the check may have started


_WIRE_SOURCE = inspect.getsource(_to_wire) + "\n" + inspect.getsource(_from_wire) + "\n"
_CHILD_PROGRAM = _WIRE_SOURCE + inspect.getsource(_sandbox_child) + "\n_sandbox_child()\n"
_GRADER_PROGRAM = _WIRE_SOURCE + inspect.getsource(_grader_child) + "\n_grader_child()\n"


# ---------------------------------------------------------------------------------------------
# The parent side

_view_cache = None


def _view():
    """What the program sees at the full levels, as (kind, source, destination) in mount order:
    /usr and its companions, the Python prefixes the interpreter imports from (read-only), /proc,
    a minimal /dev, and the run's work directory as /tmp (source filled in per run)."""
    global _view_cache
    if _view_cache is None:
        view, read_only = [], ["/usr"]
        for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(name):
                view.append(("symlink", os.readlink(name), name))
            elif os.path.isdir(name):
                read_only.append(name)
        if os.path.isfile("/etc/ld.so.cache"):  # where the dynamic loader finds libssl & co
            read_only.append("/etc/ld.so.cache")
        executable_prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
        for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, executable_prefix):
            if prefix and os.path.isabs(prefix) and os.path.dirname(prefix) != prefix:  # never "/"
                read_only.append(os.path.normpath(prefix))
        kept = []
        for path in sorted(set(read_only)):  # sorted: a directory comes before what is inside it
            if not any(path.startswith(k + "/") for k in kept):
                kept.append(path)
        view += [("ro", path, path) for path in kept]
        view += [("proc", None, "/proc"), ("dev", None, "/dev"), ("rw", None, "/tmp")]
        _view_cache = view
    return _view_cache


def _bwrap_argv(run_as, workdir, info_fd):
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--as-pid-1"]
    if run_as is None:
        argv += ["--unshare-all", "--cap-drop", "ALL"]
    else:
        # As root, --unshare-all's user namespace would map the program to root (uid 0, which
        # RLIMIT_NPROC ignores). Instead: no user namespace, every other one, and only the two
        # capabilities our init needs to hand the program its per-run uid.
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    made = set()
    for kind, source, dest in _view():
        parents = []
        parent = os.path.dirname(dest)
        while parent != "/" and parent not in made:
            parents.append(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):  # --dir makes them 0755; bwrap would make a bind's parents 0700
            argv += ["--dir", parent]
            made.add(parent)
        if kind == "ro":
            argv += ["--ro-bind", source, dest]
        elif kind == "symlink":
            argv += ["--symlink", source, dest]
        elif kind == "proc":
            argv += ["--proc", dest]
        elif kind == "dev":
            argv += ["--dev", dest]
        else:
            argv += ["--bind", workdir, dest]
    return argv + ["--remount-ro", "/", "--info-fd", str(info_fd), "--chdir", "/", "--"]


_pool_cache = None


def _id_maps():
    """This user namespace's /proc/self/uid_map and gid_map texts (lines: inside outside count)."""
    maps = []
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as f:
                maps.append(f.read())
        except OSError:  # no user namespaces: every id is itself
            maps.append(f"0 0 {2**32 - 1}")
    return maps


def _uid_pool():
    """uids a run may take here (cached): see _pool_from_maps."""
    global _pool_cache
    if _pool_cache is None:
        _pool_cache = _pool_from_maps(*_id_maps(), taken={entry.pw_uid for entry in pwd.getpwall()})
    return _pool_cache


def _pool_from_maps(uid_map, gid_map, taken=()):
    """The first of PER_RUN_UID_RANGES whose ids this user namespace maps as both uid and gid
    (/proc/self/uid_map and gid_map lines: inside outside count), minus the uids in `taken`
    (passwd entries). Empty when none is mapped: a rootless container that maps only root."""
    ranges = [[tuple(map(int, line.split()))[::2] for line in text.splitlines() if line.strip()]
              for text in (uid_map, gid_map)]
    for start, count in PER_RUN_UID_RANGES:
        ids = [i for i in range(start, start + count) if all(any(a <= i < a + c for a, c in r) for r in ranges)]
        if ids:
            return [i for i in ids if i not in taken]
    return []


def _lease_uid():
    """(uid, lock fd): a per-run uid no other run holds, in this process or any other (a lock file
    per uid, held for the run and released when the fd closes, also if the process dies)."""
    folder = os.path.join(tempfile.gettempdir(), "nanochat-sandbox-uids")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a private directory of this user; remove it")
    pool = _uid_pool()
    start = random.randrange(len(pool))
    for k in range(len(pool)):
        uid = pool[(start + k) % len(pool)]
        fd = os.open(os.path.join(folder, str(uid)), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise OSError(f"all {len(pool)} sandbox uids are in use")


def _tasks_of(uid):
    """pids (not zombies) whose real uid is uid, and their total thread count."""
    pids, threads = [], 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                pids.append(int(pid))
                threads += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            pass
    return pids, threads


def _kill_uid(uid):
    """SIGKILL every process of a per-run uid. kill(-1) sent as that uid reaches all of them at
    once (a process being killed cannot fork), so one that keeps forking to change its pid cannot
    stay ahead, as it could of a scan-and-kill loop. /bin/sh, because the uid may not be able to
    read our interpreter."""
    deadline = time.monotonic() + _STOP_WAIT_S
    while _tasks_of(uid)[0] and time.monotonic() < deadline:
        subprocess.run(["/bin/sh", "-c", "kill -s KILL -- -1"], user=uid, group=uid, extra_groups=[], cwd="/",
                       env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10, check=False)
        time.sleep(0.005)  # SIGKILLed processes take a moment to become zombies


def _exited_unreaped(proc):
    """True once the child has exited, without reaping it: while it is a zombie its pid (and so
    its process group id) cannot be reused, which makes the os.killpg below safe."""
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Run:
    """One started sandbox seen from the parent: its pipes, what its status pipes said, and how
    to end it so that nothing of it is left."""

    def __init__(self, proc, level, run_as, control_fds):
        self.proc, self.level, self.run_as = proc, level, run_as
        self.streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        self.control = {fd: bytearray() for fd in control_fds}  # our status pipe, bwrap's info pipe

    def said(self):
        """{"init": pid, "ready": True, "exit": wait status, "error": text} from the status pipes."""
        facts = {}
        for buffer in self.control.values():
            text = buffer.decode("utf-8", errors="replace")
            if text.lstrip().startswith("{"):  # bwrap's --info-fd JSON
                try:
                    facts["init"] = int(json.loads(text)["child-pid"])
                except (ValueError, KeyError, TypeError):
                    pass
                continue
            for line in text.splitlines():
                word, _, rest = line.partition(" ")
                if word in ("init", "exit") and rest.lstrip("-").isdigit():
                    facts[word] = int(rest)
                elif word == "ready":
                    facts["ready"] = True
                elif word == "error":
                    facts["error"] = rest
        return facts

    def collect(self, timeout):
        """Read output until EOF, the deadline or the cap, then stop the run.
        Returns (stdout, stderr, timed_out, too_large)."""
        deadline = time.monotonic() + timeout
        timed_out = too_large = exited = False
        with selectors.DefaultSelector() as selector:
            for fd in (*self.streams, *self.control):
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                now = time.monotonic()
                if not exited and _exited_unreaped(self.proc):
                    exited = True  # at a degraded level leftovers may hold the pipes: kill them, then drain
                    if self.level not in FULL_ISOLATION:
                        _kill_group(self.proc.pid)
                    deadline = min(deadline, now + _KILL_GRACE_S)
                if now >= deadline:
                    timed_out = not exited
                    break
                for key, _ in selector.select(timeout=min(deadline - now, 0.1)):
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    if key.fd in self.control:
                        self.control[key.fd] += data[: 65536 - len(self.control[key.fd])]
                        continue
                    buffer = self.streams[key.fd]
                    buffer += data[: MAX_OUTPUT_BYTES + 1 - len(buffer)]
                    if len(buffer) > MAX_OUTPUT_BYTES:
                        too_large = True
                if too_large:
                    break
            while not exited and not timed_out and not too_large:  # pipes closed, program still running
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                exited = _exited_unreaped(self.proc)
                if not exited:
                    time.sleep(min(remaining, 0.01))
        self.stop()
        out, err = (bytes(self.streams[f.fileno()][:MAX_OUTPUT_BYTES]) for f in (self.proc.stdout, self.proc.stderr))
        return out, err, timed_out, too_large

    def stop(self):
        """End the run; on return no process of it exists. At a full level: SIGKILL the init (the
        kernel then kills its whole PID namespace, and our child, bwrap or S, exits once it is
        empty). At a degraded level: the process group, then (per-run uid) every process of the uid."""
        init = self.said().get("init")
        if self.level in FULL_ISOLATION and init is not None and not _exited_unreaped(self.proc):
            try:
                os.kill(init, signal.SIGKILL)  # still our child's unreaped child: the pid cannot be reused yet
            except OSError:
                pass
            deadline = time.monotonic() + _STOP_WAIT_S
            while not _exited_unreaped(self.proc) and time.monotonic() < deadline:
                time.sleep(0.005)
        _kill_group(self.proc.pid)  # the leader is alive or a zombie here, so the group id is still ours
        self.proc.wait()
        if self.level == "per-run-uid" and self.run_as is not None:
            _kill_uid(self.run_as[0])
        for fd, buffer in self.control.items():  # what the status pipes still hold ("exit", "ready")
            os.set_blocking(fd, False)
            try:
                while len(buffer) < 65536 and (data := os.read(fd, 65536)):
                    buffer += data
            except BlockingIOError:
                pass


def _remove_tree(path):
    """Delete the run's directory. Root ignores permissions; otherwise the program may have left
    directories without read/write permission (os.mkdir('d', 0)), so open those up first. Only
    our own user's files are touched then, and symbolic links are never followed."""
    if not _IS_ROOT:
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                sub = os.path.join(root, name)
                try:
                    if not os.path.islink(sub):
                        os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` in a fresh, isolated, limited Python process (see the module docstring). Never
    raises, except NanochatError when NANOCHAT_SANDBOX=strict and the isolation is degraded."""
    return _execute(code, timeout, maximum_memory_bytes, _allowed_level())


def _execute(code, timeout, maximum_memory_bytes, level, serve=None):
    if level == "none":
        return ExecutionResult(success=False, stdout="", stderr="", isolation=level,
                               error=f"sandbox failed to start: {isolation()[1]}")
    full = level in FULL_ISOLATION
    base = tempfile.mkdtemp(prefix="nanochat_exec_")
    mine = []  # descriptors to close here
    lease = None
    try:
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        program = os.path.join(base, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        program_fd = os.open(program, os.O_RDONLY)
        mine.append(program_fd)
        run_as = None
        if _IS_ROOT and level != "process-group" and _uid_pool():
            uid, lock_fd = lease = _lease_uid()
            run_as = (uid, uid)
            os.chown(workdir, uid, uid)
            if level == "per-run-uid":
                os.chmod(base, 0o711)  # the uid may pass through to work/ (and not read program.py)
                _kill_uid(uid)  # leftovers of a crashed earlier user of this uid
        if run_as is not None:
            nproc = NPROC_HEADROOM  # a fresh uid: the run's own processes are all it has
        else:  # RLIMIT_NPROC counts the caller's processes too
            nproc = _tasks_of(os.getuid())[1] + NPROC_HEADROOM if os.path.isdir("/proc") else NPROC_HEADROOM
        status_r, status_w = os.pipe()
        mine += [status_r, status_w]
        newroot = os.path.join(base, "root")
        if level == "namespaces":
            os.mkdir(newroot, 0o700)
        home = "/tmp" if full else workdir
        serve_fds = [serve["call_fd"], serve["reply_fd"]] if serve else []
        cfg = {"level": level, "run_as": run_as, "parent_pid": os.getpid(), "program_fd": program_fd,
               "status_fd": status_w, "serve": serve, "serve_fds": serve_fds, "workdir": home,
               "newroot": newroot, "sys_pivot_root": _SYS_PIVOT_ROOT.get(platform.machine()),
               "view": [(k, workdir if k == "rw" else s, d) for k, s, d in _view()] if level == "namespaces" else [],
               "memory_bytes": int(maximum_memory_bytes), "cpu_seconds": int(timeout) + 1,
               "max_file_bytes": MAX_FILE_BYTES, "nproc": nproc}
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENBLAS_MAIN_FREE": "1"}  # numpy would os.putenv it, which the guard disables
        argv = [sys.executable, "-I", "-X", "utf8", "-c", _CHILD_PROGRAM, SANDBOX_MARKER, json.dumps(cfg)]
        child_ends, control = [program_fd, status_w], [status_r]
        if level == "bwrap":
            info_r, info_w = os.pipe()
            mine += [info_r, info_w]
            argv = _bwrap_argv(run_as, workdir, info_w) + argv
            child_ends.append(info_w)
            control.append(info_r)
        proc = subprocess.Popen(argv, cwd="/" if full else workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=child_ends + serve_fds, umask=0o022)
        for fd in child_ends:  # only the child holds these now: EOF on the status pipes means it is gone
            mine.remove(fd)
            os.close(fd)
        run = _Run(proc, level, run_as, control)
        with proc:
            out, err, timed_out, too_large = run.collect(timeout)
        said = run.said()
    except OSError as e:  # could not even start (no interpreter, no temp space, no free uid, ...)
        return ExecutionResult(success=False, stdout="", stderr="", error=f"sandbox failed to start: {e}",
                               isolation=level)
    finally:
        for fd in mine:
            os.close(fd)
        if lease is not None:
            os.close(lease[1])
        _remove_tree(base)

    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    returncode = proc.returncode
    if "exit" in said:  # the init's report of the program's own wait status
        status = said["exit"]
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    if not said.get("ready") and not timed_out:  # it never got as far as the user code
        reason = said.get("error") or (stderr.strip().splitlines() or [f"exit code {returncode}"])[-1]
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr, error=f"sandbox failed to start: {reason}",
                               isolation=level)
    if returncode == -signal.SIGXCPU:
        timed_out = True  # the CPU rlimit fired before the wall clock
    memory_exceeded = "MemoryError" in stderr
    success = returncode == 0 and not timed_out and not too_large
    error = None
    if timed_out:
        error = "timeout"
    elif too_large:
        error = "output too large"
    elif not success:
        if memory_exceeded:
            error = "memory limit exceeded"
        else:
            lines = stderr.strip().splitlines()
            if lines:
                error = lines[-1]
            elif returncode < 0:
                error = f"killed by signal {signal.Signals(-returncode).name}"
            else:
                error = f"exit code {returncode}"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error, timeout=timed_out,
                           memory_exceeded=memory_exceeded, isolation=level)


def check_function(code, function, check_source, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` in the sandbox and grade its `function` with the trusted `check_source` (which
    defines check(candidate)) in a separate process (see the module docstring). Never raises,
    except NanochatError when NANOCHAT_SANDBOX=strict and the isolation is degraded."""
    level = _allowed_level()
    source_r, source_w = os.pipe()
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    open_fds = {source_r, source_w, call_r, call_w, reply_r, reply_w}
    grader = None
    try:
        cfg = {"function": function, "source_fd": source_r, "call_fd": call_w, "reply_fd": reply_r,
               "max_reply_bytes": MAX_REPLY_BYTES}
        grader = subprocess.Popen([sys.executable, "-I", "-X", "utf8", "-c", _GRADER_PROGRAM, json.dumps(cfg)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  pass_fds=(source_r, call_w, reply_r), start_new_session=True,
                                  env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        for fd in (source_r, call_w, reply_r):  # the grader's ends: each side sees EOF once the other is gone
            os.close(fd)
            open_fds.discard(fd)
        open_fds.discard(source_w)
        try:
            with os.fdopen(source_w, "wb") as f:  # the grader reads it all first thing
                f.write(check_source.encode("utf-8"))
        except BrokenPipeError:  # it died at once: no verdict, a failed check
            pass
        execution = _execute(code, timeout, maximum_memory_bytes, level,
                             serve={"function": function, "call_fd": call_r, "reply_fd": reply_w})
    except OSError as e:
        execution = ExecutionResult(success=False, stdout="", stderr="", error=f"sandbox failed to start: {e}",
                                    isolation=level)
    finally:
        for fd in open_fds:
            os.close(fd)
    if grader is None:
        return CheckResult(passed=False, error=execution.error, execution=execution)
    try:
        out, _ = grader.communicate(timeout=_GRADER_GRACE_S)
    except subprocess.TimeoutExpired:
        grader.kill()
        out, _ = grader.communicate()
    try:
        verdict = json.loads(out.decode("utf-8").strip().splitlines()[-1])
        passed, error = verdict["passed"] is True, verdict["error"]
    except (ValueError, IndexError, KeyError, TypeError):
        passed, error = False, f"the check gave no verdict (exit code {grader.returncode})"
    return CheckResult(passed=passed, error=error, execution=execution)
