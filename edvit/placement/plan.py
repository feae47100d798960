"""`edvit plan`: place an existing bundle's sub-models on a fleet, without retraining.

A sub-model's memory need is its ONNX file size (weights dominate at these sizes; MB =
10^6 bytes) and its latency is measured here with ONNX Runtime at batch 1 on one thread,
so a device's `speed` is relative to this machine. The result goes to the bundle's
assignment.json, which `edvit deploy` uses for the plan it publishes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from edvit.bundle import ASSIGNMENT_NAME, Bundle
from edvit.errors import ConfigError
from edvit.inference import measure_latency_ms
from edvit.placement.assignment import Assignment, Item, assign
from edvit.placement.devices import Device, Inventory, load_inventory

BYTES_PER_MB = 1_000_000


class AssignmentFile(BaseModel):
    """assignment.json: the fleet a bundle was placed on and where each sub-model runs."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    devices: tuple[Device, ...]
    assignments: dict[str, tuple[str, ...]]
    makespan_ms: float
    loads_ms: dict[str, float] = {}
    memory_used_mb: dict[str, float] = {}


def submodel_items(bundle: Bundle, *, latency_runs: int = 50, threads: int = 1) -> list[Item]:
    shape = (1, *bundle.manifest.input_shape)
    items = []
    for spec in bundle.manifest.submodels:
        path = bundle.path(spec.file)
        items.append(
            Item(
                id=spec.id,
                memory_mb=path.stat().st_size / BYTES_PER_MB,
                latency_ms=measure_latency_ms(path, shape, runs=latency_runs, threads=threads),
            )
        )
    return items


def write_assignment(root: Path, inventory: Inventory, assignment: Assignment) -> Path:
    content = AssignmentFile(
        devices=inventory.devices,
        assignments=assignment.as_plan_assignments(),
        makespan_ms=assignment.makespan_ms,
        loads_ms=assignment.loads_ms,
        memory_used_mb=assignment.memory_used_mb,
    )
    path = Path(root) / ASSIGNMENT_NAME
    path.write_text(content.model_dump_json(indent=2) + "\n")
    return path


def read_assignment(bundle: Bundle) -> AssignmentFile | None:
    """The bundle's placement, checked against its sub-models; None when it has none."""
    path = bundle.path(ASSIGNMENT_NAME)
    if not path.is_file():
        return None
    try:
        content = AssignmentFile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    placed = sorted(sid for ids in content.assignments.values() for sid in ids)
    expected = sorted(s.id for s in bundle.manifest.submodels)
    if placed != expected:
        raise ConfigError(
            f"{path} places {placed} but the bundle has sub-models {expected}; "
            "run `edvit plan` again"
        )
    return content


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder written by `edvit build`")
    parser.add_argument("--devices", required=True, help="device inventory (YAML or JSON)")
    parser.add_argument("--runs", type=int, default=50, help="latency runs per sub-model")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    inventory = load_inventory(args.devices)
    items = submodel_items(bundle, latency_runs=args.runs)
    assignment = assign(items, inventory)  # Infeasible names the device and the shortfall
    speeds = {d.id: d for d in inventory.devices}
    for device_id, ids in assignment.placement.items():
        device = speeds[device_id]
        print(
            f"{device_id:<12s} {', '.join(ids) or '(idle)':<24s} "
            f"{assignment.memory_used_mb[device_id]:7.2f} / {device.memory_mb:g} MB  "
            f"{assignment.loads_ms[device_id]:7.3f} ms"
        )
    print(f"slowest device finishes in {assignment.makespan_ms:.3f} ms per frame")
    if not args.dry_run:
        path = write_assignment(bundle.root, inventory, assignment)
        print(f"wrote {path}; `edvit deploy {args.bundle}` now uses it")
    return 0
