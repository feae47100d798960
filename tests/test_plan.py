"""`edvit plan` re-places an existing bundle on another fleet; `edvit deploy` follows it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edvit.bundle import ASSIGNMENT_NAME, Bundle
from edvit.errors import ConfigError
from edvit.fleet.ops.deploy import bundle_assignments
from edvit.placement.plan import read_assignment

SHIPPED = Path(__file__).resolve().parents[1] / "fleet" / "bundles" / "fashion-mnist-3"


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(SHIPPED, copy, ignore=shutil.ignore_patterns(ASSIGNMENT_NAME))
    return copy


def _edvit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edvit", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.fleet
def test_plan_writes_assignment_that_deploy_uses(bundle_copy: Path, tmp_path: Path) -> None:
    devices = tmp_path / "devices.yaml"
    # One big slow board and two small fast ones: each small one can hold one sub-model
    # (the shipped sub-models are 0.56-0.60 MB).
    devices.write_text(
        "devices:\n"
        "  - {id: pi-zero-a, memory_mb: 0.7, speed: 2.0}\n"
        "  - {id: pi-zero-b, memory_mb: 0.7, speed: 2.0}\n"
        "  - {id: jetson, memory_mb: 8, speed: 0.5}\n"
    )
    done = _edvit("plan", str(bundle_copy), "--devices", str(devices), "--runs", "10")
    assert done.returncode == 0, done.stderr
    assert "slowest device finishes in" in done.stdout

    bundle = Bundle.load(bundle_copy)  # the models' identity is unchanged by re-planning
    placed = read_assignment(bundle)
    assert placed is not None
    assert {d.id for d in placed.devices} == {"pi-zero-a", "pi-zero-b", "jetson"}
    assert len(placed.assignments["pi-zero-a"]) == 1 and len(placed.assignments["pi-zero-b"]) == 1
    assert len(placed.assignments["jetson"]) == 1  # the fastest finish puts one on each
    assert bundle_assignments(bundle, None) == placed.assignments
    # Naming nodes on the command line still wins over the file.
    assert bundle_assignments(bundle, ["a"]) == {"a": ("sub0", "sub1", "sub2")}


@pytest.mark.fleet
def test_plan_refuses_a_fleet_that_is_too_small(bundle_copy: Path, tmp_path: Path) -> None:
    devices = tmp_path / "devices.json"
    devices.write_text('{"devices": [{"id": "tiny", "memory_mb": 1.0, "speed": 1}]}')
    done = _edvit("plan", str(bundle_copy), "--devices", str(devices), "--runs", "5")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny" in lines[0] and "MB short" in lines[0], done.stderr
    assert not (bundle_copy / ASSIGNMENT_NAME).exists()


def test_stale_assignment_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / ASSIGNMENT_NAME).write_text(
        '{"devices": [{"id": "a", "memory_mb": 9}], "assignments": {"a": ["sub0"]},'
        ' "makespan_ms": 1.0}'
    )
    with pytest.raises(ConfigError, match="run `edvit plan` again"):
        bundle_assignments(Bundle.load(bundle_copy), None)
