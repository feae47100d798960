"""stop_process / stop_processes against real child processes that react to signals as told."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from edvit.process import HAS_SAFE_PATH_FLAG, python_module, stop_process, stop_processes

pytestmark = pytest.mark.fleet  # real child processes

GRACE_S = 0.3

# What the child does on each signal; it prints "ready" once its handlers are in place.
EXITS_0_ON_SIGINT = "signal.signal(signal.SIGINT, lambda *_: sys.exit(0))"
IGNORES_SIGINT = "signal.signal(signal.SIGINT, signal.SIG_IGN)"
IGNORES_BOTH = IGNORES_SIGINT + "; signal.signal(signal.SIGTERM, signal.SIG_IGN)"


@contextmanager
def child(handlers: str) -> Iterator[subprocess.Popen[str]]:
    code = "\n".join(
        (
            f"import signal, sys, time; {handlers}",
            "print('ready', flush=True)",
            "while True: time.sleep(0.05)",
        )
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            if proc.poll() is None:  # a failed test must not leave it running
                proc.kill()


def test_child_that_exits_on_sigint_gives_0_quickly(caplog: pytest.LogCaptureFixture) -> None:
    with child(EXITS_0_ON_SIGINT) as proc:
        started = time.monotonic()
        assert stop_process(proc, grace_s=10, name="polite") == 0
        assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_child_that_ignores_sigint_is_terminated_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with child(IGNORES_SIGINT) as proc:
        started = time.monotonic()
        assert stop_process(proc, grace_s=GRACE_S, name="deaf") == -signal.SIGTERM
        assert time.monotonic() - started >= GRACE_S
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deaf" in warnings[0] and "SIGTERM" in warnings[0]


def test_child_that_ignores_sigint_and_sigterm_is_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with child(IGNORES_BOTH) as proc:
        started = time.monotonic()
        assert stop_process(proc, grace_s=GRACE_S, name="stubborn") == -signal.SIGKILL == -9
        elapsed = time.monotonic() - started
    assert 2 * GRACE_S <= elapsed < 2 * GRACE_S + 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("stubborn" in w for w in warnings)
    assert "SIGTERM" in warnings[0] and "SIGKILL" in warnings[1]


def test_already_exited_process_returns_its_code() -> None:
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]) as proc:
        proc.wait()
        assert stop_process(proc, grace_s=GRACE_S) == 3
        assert stop_process(proc, grace_s=GRACE_S) == 3  # and again: nothing is signalled


def test_exited_but_not_yet_reaped_process_returns_its_code() -> None:
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"]) as proc:
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop_process(proc, grace_s=GRACE_S) == 4


def test_many_processes_are_stopped_in_parallel_each_with_its_own_code() -> None:
    with ExitStack() as stack:
        procs = {
            "polite": stack.enter_context(child(EXITS_0_ON_SIGINT)),
            "stubborn-1": stack.enter_context(child(IGNORES_BOTH)),
            "stubborn-2": stack.enter_context(child(IGNORES_BOTH)),
            "deaf": stack.enter_context(child(IGNORES_SIGINT)),
        }
        killed = stack.enter_context(child(IGNORES_BOTH))
        killed.kill()
        killed.wait()
        procs["killed-before"] = killed
        started = time.monotonic()
        codes = stop_processes(procs, grace_s=1.0)
        elapsed = time.monotonic() - started
    assert codes == {
        "polite": 0,
        "stubborn-1": -9,
        "stubborn-2": -9,
        "deaf": -signal.SIGTERM,
        "killed-before": -9,
    }
    # Both grace periods once for all (2 s), not once per process (5 s in turn).
    assert 2.0 <= elapsed < 3.5


# -- starting children: a stray `edvit` folder in the current folder is not imported ---------

STRAY = "raise ImportError('the stray edvit folder in the current folder was imported')\n"


@pytest.fixture
def stray_edvit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder holds a directory named `edvit` that is not edvit (the parent of a
    fresh clone, say)."""
    (tmp_path / "edvit").mkdir()
    (tmp_path / "edvit" / "__init__.py").write_text(STRAY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("safe_path_flag", [True, False], ids=["-P", "runner"])
def test_a_child_imports_the_installed_edvit(stray_edvit: Path, safe_path_flag: bool) -> None:
    if safe_path_flag and not HAS_SAFE_PATH_FLAG:
        pytest.skip("-P needs Python 3.11")
    command = python_module("edvit", "deploy", "--help", safe_path_flag=safe_path_flag)
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: edvit deploy" in done.stdout
    # The stray folder is there to be found: a plain `python -m edvit` takes it.
    plain = subprocess.run([sys.executable, "-m", "edvit", "--help"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert plain.returncode != 0 and "stray edvit folder" in plain.stderr


def test_a_fleet_spawns_its_services_past_a_stray_edvit(stray_edvit: Path) -> None:
    from edvit.fleet.ops.local import LocalFleet

    fleet = LocalFleet("mqtt://127.0.0.1:1", stray_edvit / "logs")
    process = fleet.spawn("probe", "node", "--help")
    assert process.wait(timeout=60) == 0, fleet.log_tail("probe")
    assert "usage: edvit node" in fleet.log_path("probe").read_text()
