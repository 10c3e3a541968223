"""Helpers for the sandbox tests: the processes a run left behind, and a forced degraded level."""

import os
import shutil

from nanochat import execution

IS_ROOT = os.geteuid() == 0


def survivors(*tokens):
    """pids of live (not zombie) processes that this test process's sandboxes started (their argv
    holds the sandbox marker and our pid as the parent, which forks keep) or whose argv holds one
    of `tokens` (for programs that exec something else). Other processes' sandboxes are ignored."""
    ours = f'"parent_pid": {os.getpid()}'.encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":
            continue
        if (execution.SANDBOX_MARKER.encode() in cmdline and ours in cmdline) or any(t.encode() in cmdline for t in tokens):
            found.append(int(pid))
    return found


def force_degraded(monkeypatch):
    """Probe the sandbox again as if bwrap and our own namespaces were refused (what a typical
    container gives); returns the level obtained: per-run-uid as root, else process-group."""
    return refuse_levels(monkeypatch, execution.FULL_ISOLATION)


def refuse_levels(monkeypatch, refused):
    """Probe the sandbox again as if the levels in `refused` failed here; returns the level obtained."""
    real = execution._unavailable
    monkeypatch.setattr(execution, "_unavailable", lambda level: "refused by the test" if level in refused else real(level))
    monkeypatch.setattr(execution, "_isolation", None)
    return execution.isolation()[0]


def bwrap_installed():
    return shutil.which("bwrap") is not None
