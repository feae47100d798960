"""Replayed plans: the newest signed plan a service followed, kept across restarts.

A signed plan carries a sequence number (`PlanMsg.seq`) that its signature covers.
`edvit deploy` picks one above every plan it knows of (the time in milliseconds, or the
retained plan's sequence + 1 when that is larger); the aggregator's planner gives a plan it
derives its base's sequence + 1, so the plans of one fleet are ordered.

A service given a trust key keeps the newest plan it followed, and its sequence, in
`plan.json` in its state folder (`--state-dir`) and refuses a signed plan whose sequence is
older, including one the broker hands it again after a restart: a restarted service starts
from the kept plan (its signature checked again), so it serves the newest plan even while
the broker holds a replayed one. A plan without a sequence (signed before sequences
existed) counts as sequence 0. The same plan again (a reconnect, a planner that publishes
the plan again) has the same sequence and is not older.

Without a state folder, or when the state file cannot be written, the newest sequence is
kept in memory only (the service says so once in its log).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from edvit.errors import ConfigError
from edvit.schemas import PlanMsg, encode

STATE_NAME = "plan.json"


def default_state_dir(service: str, instance: str) -> Path:
    """Where a service keeps its state unless told otherwise: `$XDG_STATE_HOME/edvit/
    SERVICE-ID` (`~/.local/state/edvit/SERVICE-ID` without XDG_STATE_HOME)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edvit" / f"{service}-{instance}"


def sequence_of(plan: PlanMsg) -> int:
    return plan.seq if plan.seq is not None else 0


class PlanSequence:
    """The newest plan sequence followed (None before any), read from and written to
    `state_dir/plan.json`; shared by the threads that check plans."""

    def __init__(self, state_dir: Path | None = None, logger: logging.Logger | None = None):
        self.log = logger or logging.getLogger("edvit.replay")
        self.path = Path(state_dir) / STATE_NAME if state_dir is not None else None
        self._lock = threading.Lock()
        self._newest: int | None = None
        self._newest_id: str | None = None
        self._newest_plan: bytes | None = None
        self._write_failed = False
        if self.path is not None:
            self._read(self.path)

    def _read(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            newest, plan_id = state["plan_seq"], state.get("plan_id")
            if not isinstance(newest, int) or isinstance(newest, bool) or newest < 0:
                raise ValueError("plan_seq is not a non-negative integer")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refusing to start would strand the service; starting from nothing accepts the
            # retained plan, as on a first start. Say so.
            self.log.warning(
                "%s: unreadable plan state (%s); starting without a known newest plan",
                path, exc,
            )  # fmt: skip
            return
        self._newest, self._newest_id = newest, plan_id if isinstance(plan_id, str) else None
        plan = state.get("plan")
        self._newest_plan = json.dumps(plan).encode() if isinstance(plan, dict) else None

    @property
    def newest(self) -> int | None:
        return self._newest

    @property
    def newest_plan(self) -> bytes | None:
        """The newest plan followed before this process started, as the state file kept it
        (the wire's JSON; its signature still to be checked), or None."""
        return self._newest_plan

    def replayed(self, plan: PlanMsg) -> str | None:
        """Why `plan` is a replay (one line), or None when it is not older than the newest."""
        with self._lock:
            newest, newest_id = self._newest, self._newest_id
        seq = sequence_of(plan)
        if newest is None or seq >= newest:
            return None
        shown = "none" if plan.seq is None else str(seq)
        return (
            f"replayed: its sequence ({shown}) is older than {newest}, the newest plan "
            f"followed here ({newest_id or '?'})"
        )

    def advance(self, plan: PlanMsg) -> None:
        """Remember `plan` as the newest followed when its sequence is newer."""
        seq = sequence_of(plan)
        with self._lock:
            if self._newest is not None and seq <= self._newest:
                return
            self._newest, self._newest_id = seq, plan.plan_id
            if self.path is not None:
                state = {"plan_seq": seq, "plan_id": plan.plan_id, "plan": json.loads(encode(plan))}
                self._write(self.path, state)

    def _write(self, path: Path, state: dict[str, object]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(state) + "\n")
            os.replace(partial, path)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                self.log.warning(
                    "cannot write the plan state %s (%s); a replayed plan is refused only "
                    "until this service restarts", path, exc.strerror or exc,
                )  # fmt: skip


def check_state_dir(path: str | Path) -> Path:
    """A --state-dir that is a folder or can become one; ConfigError names the problem."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--state-dir {folder}: not a folder")
    return folder
