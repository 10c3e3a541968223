"""The hostile-program corpus: each way a model's program could try to outlive its run, reach
other runs, the caller, its files or the network, run at the best isolation level this machine
gives, at our own namespaces (bwrap refused, when bwrap is the best) and at a degraded level the
test forces (bwrap and namespaces refused). Every test asserts the attack's outcome and that,
when execute_code returns, no process of the run exists."""

import os
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sandbox_helpers import IS_ROOT, force_degraded, refuse_levels, survivors

from nanochat import execution
from nanochat.execution import FULL_ISOLATION, execute_code

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's isolation is Linux-specific")


@pytest.fixture(params=["best", "namespaces", "degraded"])
def level(request, monkeypatch):
    if request.param == "namespaces":
        if execution.isolation()[0] != "bwrap":
            pytest.skip("the best level here is not bwrap: 'best' already covers what there is")
        level = refuse_levels(monkeypatch, ("bwrap",))
        if level != "namespaces":
            pytest.skip(f"the kernel refuses our own namespaces here: {execution.isolation()[1]}")
    else:
        level = force_degraded(monkeypatch) if request.param == "degraded" else execution.isolation()[0]
    assert level != "none", f"the sandbox cannot start here: {execution.isolation()[1]}"
    if level == "process-group":
        pytest.skip("without namespaces and without a uid of its own the program runs as this user and nothing "
                    "contains it (documented; strict mode refuses this level, see test_execution)")
    if request.param == "degraded":
        assert level == "per-run-uid" and "no PID, network or mount namespace" in execution.isolation()[1]
    return level


def run(code, level, timeout=15.0, **kwargs):  # generous: interpreters start slowly on a busy machine
    result = execute_code(code, timeout=timeout, **kwargs)
    assert result.isolation == level
    return result


def test_double_fork_and_setsid_leave_nothing(level):
    code = (
        "import posix, time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        hold = bytearray(50 * 1024 * 1024)\n"
        "        time.sleep(60)\n"
        "    posix._exit(0)\n"
        "time.sleep(0.2)\n"
        "print('parent exits')\n"
    )
    result = run(code, level)
    assert result.success and result.stdout == "parent exits\n", result.stderr
    assert survivors() == []


def test_a_leftover_cannot_write_into_the_next_run(level):
    name = f"planted-{os.getpid()}-{random.randrange(10**9)}.txt"
    plant = (
        "import os, posix, time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        "        end = time.time() + 20\n"
        "        while time.time() < end:\n"
        "            dirs = ['/tmp'] + ['/tmp/' + n + '/work' for n in os.listdir('/tmp') if n.startswith('nanochat_exec_')]\n"
        "            for d in dirs:\n"
        "                try:\n"
        f"                    open(d + '/{name}', 'w').write('pwned')\n"
        "                except OSError:\n"
        "                    pass\n"
        "            time.sleep(0.005)\n"
        "    posix._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    try:
        assert run(plant, level).success
        assert survivors() == []
        result = run("import os, posix\nprint(sorted(os.listdir(posix.getcwd())))", level)
        assert result.success and result.stdout == "[]\n", result.stdout + result.stderr
    finally:  # at a degraded level the host's /tmp is shared: what the leftover left there (documented)
        if os.path.exists(f"/tmp/{name}"):
            os.remove(f"/tmp/{name}")


def test_runs_cannot_see_or_touch_each_other(level, tmp_path):
    # the victim lives until the attack is over: a flag file at a degraded level (where it can see
    # the host's /tmp), a few seconds at a full one (where it can see nothing and is never found)
    flag = f"/tmp/nanochat-test-attack-over-{os.getpid()}-{random.randrange(10**9)}"
    victim = (f"import os, time\nend = time.time() + {3 if level in FULL_ISOLATION else 40}\n"
              f"while time.time() < end and not os.path.exists({flag!r}):\n    time.sleep(0.05)\nprint('victim done')")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(victim=run(victim, level, timeout=60)))
    thread.start()
    deadline = time.monotonic() + 20
    while not survivors() and time.monotonic() < deadline:  # wait until the victim runs
        time.sleep(0.02)
    attacker = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"marks = (b'nanochat-sandbox', b'\"parent_pid\": {os.getpid()}')\n"
        "found = attached = killed = read = 0\n"
        "for pid in os.listdir('/proc'):\n"
        "    if not pid.isdigit() or int(pid) in (1, os.getpid()):\n"
        "        continue\n"
        "    try:\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if not all(m in cmd for m in marks):\n"
        "        continue\n"
        "    found += 1\n"
        "    attached += libc.ptrace(16, int(pid), 0, 0) == 0\n"  # PTRACE_ATTACH
        "    try:\n"
        "        open(f'/proc/{pid}/environ', 'rb').read()\n"
        "        read += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "    try:\n"
        "        import posix\n"
        "        posix.kill(int(pid), 9)\n"
        "        killed += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(found, attached, read, killed)\n"
    )
    try:
        result = run(attacker, level)
    finally:
        open(flag, "w").close()
        thread.join(60)
        os.remove(flag)
    assert result.success, result.stderr
    found, attached, read, killed = map(int, result.stdout.split())
    assert (attached, read, killed) == (0, 0, 0)
    assert found == 0 if level in FULL_ISOLATION else found >= 1  # degraded: visible, untouchable (own uid)
    assert outcome["victim"].success and outcome["victim"].stdout == "victim done\n"
    assert survivors() == []


def test_no_inherited_descriptors_and_no_way_to_the_home_directory(level, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    cache = os.path.expanduser("~/.cache")
    code = (
        "import os\n"
        "fds = os.listdir('/proc/self/fd')\n"
        "print(len(fds))\n"
        "reached = []\n"
        "for fd in fds:\n"
        "    for up in range(1, 10):\n"
        f"        path = f'/proc/self/fd/{{fd}}/' + '../' * up + '.cache'\n"
        "        try:\n"
        "            os.listdir(path)\n"
        "            reached.append(path)\n"
        "        except OSError:\n"
        "            pass\n"
        "print(reached)\n"
        f"for path in ({str(secret)!r}, {cache!r}):\n"
        "    try:\n"
        "        print(open(path).read() if os.path.isfile(path) else os.listdir(path))\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
    )
    result = run(code, level)
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    assert "TOPSECRET" not in result.stdout and lines[2] in ("FileNotFoundError", "PermissionError")
    if level in FULL_ISOLATION:  # stdin, stdout, stderr and the one listdir opened; nothing leads home
        assert lines[0] == "4" and lines[1] == "[]" and lines[3] == "FileNotFoundError"
    assert survivors() == []


def test_the_network_is_out_of_reach_or_reported(level):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint('connected')")
        result = run(code, level)
        if level in FULL_ISOLATION:
            assert result.network_isolated
            assert not result.success and "connected" not in result.stdout
            with pytest.raises(TimeoutError):
                listener.accept()
        else:  # no network namespace: reachable, and said so
            assert not result.network_isolated and "network" in execution.isolation()[1]
    assert survivors() == []


def test_the_caller_is_out_of_reach(level, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2-secret")
    me = os.getpid()
    code = (
        "import os, posix\n"
        f"for pid in ({me}, os.getppid()):\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        f"for pid in ({me}, os.getppid()):\n"
        "    if pid > 1:\n"
        "        try:\n"
        "            posix.kill(pid, 9)\n"
        "            print('killed', pid)\n"
        "        except OSError as e:\n"
        "            print(type(e).__name__)\n"
    )
    result = run(code, level)
    assert result.success, result.stderr
    assert "hunter2-secret" not in result.stdout and "killed" not in result.stdout
    assert os.getpid() == me  # still here to say so
    assert survivors() == []


def test_a_fork_bomb_is_contained(level):
    code = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass"
    result = run(code, level, timeout=1.5)
    assert result.timeout and not result.success
    assert survivors() == []


def test_no_new_privileges_and_not_dumpable(level):
    code = (
        "import ctypes\n"
        "status = open('/proc/self/status').read()\n"
        "print(status.split('NoNewPrivs:')[1].split()[0], status.split('CapEff:')[1].split()[0])\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"  # PR_GET_DUMPABLE
    )
    result = run(code, level)
    assert result.success, result.stderr
    privileges, dumpable = result.stdout.splitlines()
    assert privileges == "1 0000000000000000"  # setuid binaries cannot elevate; no capability
    if level in FULL_ISOLATION:  # (degraded, an interpreter others cannot read needs /proc/self/fd)
        assert dumpable == "0"


ESCAPES = [
    # double fork, new session, ignore the polite signals
    "import posix, signal, time\nif posix.fork() == 0:\n    posix.setsid()\n    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n    if posix.fork() == 0:\n        time.sleep(120)\n    posix._exit(0)\n",
    # become another program (argv no longer carries the sandbox marker)
    "import posix\nif posix.fork() == 0:\n    posix.setsid()\n    posix.execv('/bin/sleep', ['sleep', '{token}'])\n",
    # several children, each its own session
    "import posix, time\nfor _ in range(5):\n    if posix.fork() == 0:\n        posix.setsid()\n        time.sleep(120)\n"
    "        posix._exit(0)\n",
    # hop pids: each generation forks the next and exits, so a scan-then-kill loop is always late
    "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    end = time.time() + 30\n    while time.time() < end:\n"
    "        if posix.fork():\n            posix._exit(0)\n",
    # undo the guard and use subprocess with a new session
    "import importlib, subprocess\nimportlib.reload(subprocess)\n"
    "subprocess.Popen(['/bin/sleep', '{token}'], start_new_session=True)\n",
]


def test_50_escape_attempts_leave_no_survivor(level):
    salt = random.randrange(10**6)
    tokens = [f"{1000 + k}.{salt:06d}" for k in range(50)]  # as sleep's argument: findable in ps
    codes = [ESCAPES[k % len(ESCAPES)].replace("{token}", tokens[k]) for k in range(50)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda code: run(code, level), codes))
    failed = [(k, r.error) for k, r in enumerate(results) if not r.success]
    assert failed == []
    assert survivors(*tokens) == []


@pytest.mark.skipif(not IS_ROOT, reason="per-run uids need root")
def test_each_run_gets_its_own_uid(level):
    code = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"
    with ThreadPoolExecutor(3) as pool:
        uids = [int(r.stdout) for r in pool.map(lambda c: run(c, level), [code] * 3)]
    assert len(set(uids)) == 3 and all(uid not in (0, 65534) for uid in uids)
