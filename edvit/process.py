"""Child processes: the one way to start an edvit child (`python_module`), the one SIGINT ->
SIGTERM -> SIGKILL escalation every caller uses to stop them, and what a running process
uses (its memory and CPU time, read from /proc).

A child runs `python -m edvit ...` with the current folder left out of its import path
(`-P`, Python 3.11 and later; a small runner that drops it on 3.10): started from a folder
that holds a directory named `edvit` (the parent of a fresh clone, say), it still imports
the installed edvit, not that directory.

SIGINT first, because every edvit service (and mosquitto) treats it as a clean stop: it
publishes its offline status and exits 0. A child still running `grace_s` seconds later gets
SIGTERM, and one still running `grace_s` after that gets SIGKILL, which always works. The
return codes are Popen's: 0 for a clean stop, -9 for a child that had to be killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# Seconds to wait after SIGINT and again after SIGTERM, unless a caller says otherwise.
DEFAULT_GRACE_S = 5.0
# `python -c` runner for Pythons without -P: drops the current folder ('' for -c) from the
# import path, then runs the module named by the first argument as __main__.
SAFE_PATH_RUNNER = (
    "import runpy, sys; del sys.path[0]; module = sys.argv.pop(1); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
HAS_SAFE_PATH_FLAG = sys.version_info >= (3, 11)


def python_module(module: str, *args: str, safe_path_flag: bool = HAS_SAFE_PATH_FLAG) -> list[str]:
    """The command line running `python -m MODULE ARGS` in this interpreter, importing
    nothing from the folder it starts in (`-P`; without it, `SAFE_PATH_RUNNER`)."""
    if safe_path_flag:
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", SAFE_PATH_RUNNER, module, *args]


def edvit_command(*args: str) -> list[str]:
    """The command line running `edvit ARGS` as a child of this process."""
    return python_module("edvit", *args)


def stop_processes(
    processes: Mapping[str, subprocess.Popen],
    *,
    grace_s: float = DEFAULT_GRACE_S,
    logger: logging.Logger = log,
) -> dict[str, int]:
    """Stop every process in parallel and return each one's exit code, by name.

    Each step signals every process still running before waiting on any of them, so the
    whole stop takes at most about 2 * grace_s, not that per process. Processes that have
    already exited only report their code.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        running = {name: proc for name, proc in processes.items() if proc.poll() is None}
        if not running:
            break
        if sig != signal.SIGINT:
            for name, proc in running.items():
                logger.warning(
                    "%s (pid %d) still running %.3g s after the last signal; sending %s",
                    name, proc.pid, grace_s, sig.name,
                )  # fmt: skip
        for proc in running.values():
            proc.send_signal(sig)  # a no-op for a child that exited meanwhile
        deadline = time.monotonic() + grace_s
        for proc in running.values():
            if sig == signal.SIGKILL:
                proc.wait()  # SIGKILL cannot be ignored
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):  # escalated next step
                    proc.wait(max(0.0, deadline - time.monotonic()))
    return {name: proc.wait() for name, proc in processes.items()}  # all have exited


def stop_process(
    proc: subprocess.Popen,
    *,
    grace_s: float = DEFAULT_GRACE_S,
    name: str | None = None,
    logger: logging.Logger = log,
) -> int:
    """Stop one process (SIGINT, then SIGTERM, then SIGKILL) and return its exit code."""
    label = name or "child"
    return stop_processes({label: proc}, grace_s=grace_s, logger=logger)[label]


def rss_mb(pid: int | None, key: str = "VmRSS") -> float | None:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in MiB; None without a
    pid or once the process is gone."""
    if pid is None:
        return None
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far; None without a pid or once it is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
