"""Calibrate a bundle for board types: each type's latencies measured once, for
`edvit plan --slo-ms` (edvit/placement/slo.py) to predict from.

With what emulated boards need (root, cgroups), the measurement runs under the type's own
CPU quota, the one `edvit fleet up` gives such a board (`python -m edvit.placement.calibrate`
in a cgroup, one thread): method ``cgroup``. Its memory is measured, not limited. Without,
the latencies are measured here unlimited and divided by the type's core share: method
``scaled``, which assumes ONNX Runtime slows exactly as the quota does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from edvit.bundle import Bundle
from edvit.errors import EdvitError
from edvit.fleet.boards import emulation
from edvit.fleet.boards.boards import PRESETS, BoardSpec, FleetSpec, load_fleet
from edvit.placement.calibrate import host_calibration
from edvit.placement.slo import HOST_TYPE, Board, Calibration, TypeCalibration

CALIBRATE_TIMEOUT_S = 600.0
CALIBRATE_MEMORY_MB = 1 << 20  # 1 TiB: no limit that binds


def board_type(spec: BoardSpec) -> str:
    """A board's type: its preset when its CPU is the preset's, else its core share."""
    if spec.preset is not None and not _cpu_overridden(spec):
        return spec.preset
    return f"cpu-{spec.cpu:g}"


def _cpu_overridden(spec: BoardSpec) -> bool:
    return spec.preset is not None and PRESETS[spec.preset].cpu != spec.cpu


def fleet_boards(path: str | Path) -> list[Board]:
    """BOARDS.yaml's boards for a prediction (type, memory, link)."""
    fleet: FleetSpec = load_fleet(Path(path))
    return [
        Board(id=b.id, type=board_type(b), memory_mb=float(b.memory_mb),
              delay_ms=b.delay_ms, rate_mbit=b.rate_mbit)
        for b in fleet.boards
    ]  # fmt: skip


def _measured_in_cgroup(bundle: Bundle, spec: BoardSpec, runs: int) -> dict:
    version = emulation.cgroup_version()
    assert version is not None
    name = f"calibrate-{os.getpid()}-{board_type(spec)}"
    # The CPU quota only: the measurement holds every model of the bundle at once, which a
    # board that serves one sub-model need not hold.
    folders = emulation.cgroup_dirs(version, name)
    emulation.create_cgroup(version, folders, spec.cpu, CALIBRATE_MEMORY_MB)

    def enter() -> None:  # in the child, before exec: the measurement runs limited
        for folder in folders:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "edvit.placement.calibrate", str(bundle.root),
             "--runs", str(runs)],
            capture_output=True, text=True, env=env, preexec_fn=enter,
            timeout=CALIBRATE_TIMEOUT_S,
        )  # fmt: skip
        killed = emulation.oom_kills(folders)
    finally:
        emulation.delete_cgroup(folders)
    if done.returncode != 0:
        if killed:
            raise EdvitError(f"{board_type(spec)}: the measurement ran out of memory")
        tail = "\n".join(done.stderr.splitlines()[-5:])
        raise EdvitError(f"{board_type(spec)}: the calibration exited {done.returncode}:\n{tail}")
    return json.loads(done.stdout)


def calibrate_fleet(bundle: Bundle, boards_file: str | Path, runs: int,
                    existing: Calibration) -> Calibration:  # fmt: skip
    """``existing`` with every board type of BOARDS.yaml measured (again), and the host."""
    fleet = load_fleet(Path(boards_file))
    types: dict[str, BoardSpec] = {}
    for spec in fleet.boards:
        types.setdefault(board_type(spec), spec)
    limited = not emulation.missing_features()
    measured = dict(existing.board_types)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = measured[HOST_TYPE] = host_calibration(bundle, runs)
    for name, spec in types.items():
        print(f"calibrating {name} ({spec.cpu:g} core, {spec.memory_mb} MB) ...", flush=True)
        if limited:
            figures = _measured_in_cgroup(bundle, spec, runs)
            method = "cgroup"
        else:
            figures = {
                "frame_ms": host.frame_ms / spec.cpu,
                "latency_ms": {f: ms / spec.cpu for f, ms in host.latency_ms.items()},
            }
            method = "scaled"
        measured[name] = TypeCalibration(
            cpu=spec.cpu, method=method, measured=now, runs=runs, **figures
        )
    return Calibration(board_types=measured)
