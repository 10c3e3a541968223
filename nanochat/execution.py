"""Running untrusted model output: the calculator tool and the Python sandbox (SPEC §10.3, §10.4).

use_calculator(expr)
    Evaluates the small expressions the model writes between <|python_start|> and
    <|python_end|>: plain arithmetic, or string methods ending in `.count(...)`. Everything
    that could be slow or large is rejected before eval (see the comment at the function), so
    it needs no signal-based timeout and works from any thread.

execute_code(code, timeout=5.0, maximum_memory_bytes=256 MiB) -> ExecutionResult
    Runs a Python program (HumanEval completions, tool code) in a fresh interpreter:
      - `sys.executable -I` (isolated mode: no PYTHON* variables, no user site, no cwd on
        sys.path), started in a new session (its own process group), stdin from /dev/null;
      - environment scrubbed to PATH=/usr/bin:/bin plus single-thread BLAS settings;
      - a fresh temporary working directory (also HOME and TMPDIR), removed afterwards;
      - when the parent runs as root, the child drops to the `nobody` user (no supplementary
        groups) before any user code runs, so root-only files, the parent's /proc entries and
        the parent process itself are out of reach (if the drop itself fails, the run fails).
        Import directories nobody cannot reach (an interpreter under /root, as pyenv and uv
        install it) are opened before the drop and imported from through /proc/self/fd/N;
      - a new network namespace where the kernel allows it (unshare(CLONE_NEWNET) as root, or
        CLONE_NEWUSER|CLONE_NEWNET unprivileged): no interface is up, so nothing can be
        connected to, not even 127.0.0.1. `ExecutionResult.network_isolated` says whether this
        run got one; it is tried on every run (one syscall), so the flag is always the truth;
      - rlimits: RLIMIT_AS = maximum_memory_bytes, RLIMIT_CPU ≈ timeout, RLIMIT_FSIZE (files
        of at most MAX_FILE_BYTES), RLIMIT_CORE 0, RLIMIT_NPROC = the user's current task count
        + NPROC_HEADROOM (RLIMIT_NPROC is per user; root ignores it, hence the drop to nobody);
      - a wall-clock deadline, after which the whole process group is SIGKILLed; the group is
        also killed when the program exits, so no forked leftovers survive it;
      - stdout and stderr read through pipes with a cap of MAX_OUTPUT_BYTES each; past it the
        group is killed and the run fails with error "output too large";
      - the reliability guard of SPEC §10.4: os.kill/system/fork/remove/... and shutil.rmtree,
        subprocess.Popen, exit/quit/help set to None, some modules blocked, faulthandler off;
      - the user code runs as module `__main__` with fresh globals and sees none of the guard's
        names; sys.argv is ["<sandbox>"].

What it does NOT stop (this is a seat belt against accidents, not a security boundary):
  - The Python-level guard is trivially undone: `import posix; posix.fork()`,
    importlib.reload(os / subprocess), ctypes, etc. Only the OS-level measures above hold.
  - As root → nobody: world-readable files (the repository, /etc/passwd, ...) are readable,
    world-writable places (/tmp, /dev/shm) are writable, unix-domain sockets in the file
    system that allow everyone can be connected to, and kernel bugs are not defended.
  - When not run as root the child keeps the caller's user: it can read and write whatever
    that user can (absolute paths outside the temporary directory), read the parent's
    /proc/<pid>/environ, and signal the parent through `posix.kill` (only `os.kill` is
    guarded). RLIMIT_NPROC then counts the caller's own processes.
  - Without a network namespace (containers that forbid unshare), the network is open.
  - Processes that leave the process group (posix.setsid, ctypes) escape the final kill.
  - Disk use is bounded per file (RLIMIT_FSIZE), not in total: many files can be written
    until the deadline; they are deleted with the temporary directory.
  - RLIMIT_NPROC is per user, so concurrent sandboxes share one budget.
"""

import ast
import inspect
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Calculator (SPEC §10.3)

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

    SPEC §10.3 bounds the eval with a 3 s SIGALRM, which only works on the main thread, while
    the engine runs in web-server worker threads. So instead every accepted expression is cheap
    by construction, checked before eval:
      - at most CALCULATOR_MAX_CHARS characters;
      - arithmetic: only digits, + - * / . ( ) and spaces, no `**`. Without a power operator
        and without names, n characters can only build integers of at most n digits, so the
        work is polynomial in n (microseconds at n = 1000) and str() of the result stays under
        Python's 4300-digit limit; deep nesting is a SyntaxError from the parser;
      - string expressions: the SPEC allow-list (characters, forbidden substrings, `.count(`)
        plus an AST check that allows only constants and non-growing string methods, so no
        call can allocate more than the expression's own length (`'a'.ljust(10**10)`,
        nested `.join`/`.replace` are refused). Commas are removed first (SPEC), so no call
        has more than one argument.
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
# Sandbox (SPEC §10.4)

MAX_OUTPUT_BYTES = 1024 * 1024  # per stream
MAX_FILE_BYTES = 64 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
NPROC_HEADROOM = 64  # processes/threads the program may add to its user's current count
SANDBOX_MARKER = "nanochat-sandbox"  # in the child's argv, to recognise sandbox processes
_KILL_GRACE_S = 0.5  # after the program exits, how long to drain output held by stragglers


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    network_isolated: bool = False


def _sandbox_child():
    """The guard. Runs first thing in the fresh interpreter (its source is passed with -c);
    never called in the parent. Everything it needs is imported before the guard disables it."""
    import builtins
    import ctypes
    import faulthandler
    import json
    import os
    import resource
    import shutil
    import subprocess
    import sys
    import types

    cfg = json.loads(sys.argv[2])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()

    def set_limit(which, soft, hard=None):  # never above an existing hard limit
        hard = soft if hard is None else hard
        try:
            current_hard = resource.getrlimit(which)[1]
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):
            pass

    def tasks_of(uid):  # processes + threads whose real uid is uid (what RLIMIT_NPROC counts)
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    total += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                pass
        return total

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None

    def unshare(flags):
        try:
            return libc is not None and libc.unshare(flags) == 0
        except AttributeError:  # no unshare(2) (not Linux)
            return False

    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    network_isolated = False
    if cfg["drop_to"] is not None:  # running as root: new netns while we may, then become nobody
        network_isolated = unshare(clone_newnet)
        # The interpreter may live where nobody cannot read (pyenv/uv under /root, mode 700):
        # open every import directory now and, if nobody is locked out of it after the drop,
        # import through /proc/self/fd/N, which needs no permission on the parent directories.
        import_dirs = {}
        for entry in sys.path:
            try:
                import_dirs[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            except (OSError, TypeError):
                pass
        uid, gid = cfg["drop_to"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        try:
            libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: keep /proc/self usable after setuid
        except AttributeError:
            pass
        moved = {}
        for entry, fd in import_dirs.items():
            if os.access(entry, os.R_OK | os.X_OK):
                os.close(fd)
            else:
                moved[entry] = f"/proc/self/fd/{fd}"

        def relocate(path):
            for old, new in moved.items():
                if path == old or path.startswith(old + os.sep):
                    return new + path[len(old):]
            return path

        if moved:
            sys.path[:] = [relocate(p) for p in sys.path]
            for module in list(sys.modules.values()):  # packages already imported by startup/guard
                package_path = getattr(module, "__path__", None)
                if isinstance(package_path, list):
                    package_path[:] = [relocate(p) for p in package_path]
            sys.path_importer_cache.clear()
    # Count before any user namespace: inside an unmapped one every uid reads as 65534.
    nproc_limit = tasks_of(os.getuid()) + cfg["nproc_headroom"] if os.path.isdir("/proc") else None
    if not network_isolated:  # unprivileged: a user namespace owning a new netns
        network_isolated = unshare(clone_newuser | clone_newnet)
    os.write(cfg["status_fd"], b"1" if network_isolated else b"0")
    os.close(cfg["status_fd"])

    if nproc_limit is not None:
        set_limit(resource.RLIMIT_NPROC, nproc_limit)
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    set_limit(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)

    # The reliability guard (SPEC §10.4).
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

    main = types.ModuleType("__main__")  # fresh globals; `import __main__` finds the user's module
    sys.modules["__main__"] = main
    sys.argv = ["<sandbox>"]
    code = compile(source, "<sandbox>", "exec")
    del source
    set_limit(resource.RLIMIT_AS, cfg["memory_bytes"])  # last: the guard itself is not limited
    exec(code, main.__dict__)


_CHILD_PROGRAM = inspect.getsource(_sandbox_child) + "\n_sandbox_child()\n"


def _nobody():
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


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


def _collect_output(proc, timeout):
    """Read stdout/stderr until EOF, the deadline or the cap; kill the process group when done.
    Returns (stdout_bytes, stderr_bytes, timed_out, too_large)."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    deadline = time.monotonic() + timeout
    timed_out = too_large = exited = False
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            now = time.monotonic()
            if not exited and _exited_unreaped(proc):
                exited = True  # kill leftovers that may still hold the pipes open, then drain
                _kill_group(proc.pid)
                deadline = min(deadline, now + _KILL_GRACE_S)
            if now >= deadline:
                timed_out = not exited
                break
            for key, _ in selector.select(timeout=min(deadline - now, 0.1)):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                buffer = buffers[key.fd]
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
            exited = _exited_unreaped(proc)
            if not exited:
                time.sleep(min(remaining, 0.01))
    _kill_group(proc.pid)  # the leader is alive or a zombie here, so the group id is still ours
    proc.wait()
    out, err = (bytes(buffers[f.fileno()][:MAX_OUTPUT_BYTES]) for f in (proc.stdout, proc.stderr))
    return out, err, timed_out, too_large


def _remove_tree(path):
    """Delete the run's directory. Root ignores permissions; otherwise the program may have left
    directories without read/write permission (os.mkdir('d', 0)), so open those up first. Only
    our own user's files are touched then, and symbolic links are never followed."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
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
    """Run `code` in a fresh, limited Python process (see the module docstring); never raises."""
    base = tempfile.mkdtemp(prefix="nanochat_exec_")
    status_read = status_write = None
    try:
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        program = os.path.join(base, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(program, 0o600)
        drop_to = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            drop_to = _nobody()
            os.chown(workdir, *drop_to)
            os.chmod(base, 0o711)  # nobody may pass through to work/, not read program.py
        status_read, status_write = os.pipe()
        cfg = {
            "program": program,
            "status_fd": status_write,
            "drop_to": drop_to,
            "memory_bytes": int(maximum_memory_bytes),
            "cpu_seconds": int(timeout) + 1,
            "max_file_bytes": MAX_FILE_BYTES,
            "nproc_headroom": NPROC_HEADROOM,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENBLAS_MAIN_FREE": "1"}  # numpy would os.putenv it, which the guard disables
        argv = [sys.executable, "-I", "-X", "utf8", "-c", _CHILD_PROGRAM, SANDBOX_MARKER, json.dumps(cfg)]
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, pass_fds=(status_write,))
        os.close(status_write)
        status_write = None
        with proc:
            out, err, timed_out, too_large = _collect_output(proc, timeout)
        os.set_blocking(status_read, False)
        try:
            network_isolated = os.read(status_read, 1) == b"1"
        except BlockingIOError:
            network_isolated = False
    except OSError as e:  # could not even start (no interpreter, no temp space, ...)
        return ExecutionResult(success=False, stdout="", stderr="", error=f"sandbox failed to start: {e}")
    finally:
        for fd in (status_read, status_write):
            if fd is not None:
                os.close(fd)
        _remove_tree(base)

    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    returncode = proc.returncode
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
                           memory_exceeded=memory_exceeded, network_isolated=network_isolated)
