"""`edvit plan`: place an existing bundle's sub-models on a fleet, without retraining.

A sub-model's memory need is its ONNX file size (weights dominate at these sizes; MB =
10^6 bytes) and its latency is measured here with ONNX Runtime at batch 1 on one thread,
so a device's `speed` is relative to this machine. The result goes to the bundle's
assignment.json, which `edvit deploy` uses for the plan it publishes.

With `--slo-ms MS`, it predicts instead (edvit/placement/slo.py) how the split, replicas of
the whole original, and copies of the split would serve on the fleet, from a calibration
(each model's latency per board type) that `--calibrate` measures; it recommends the option
that meets the latency at the highest throughput and writes its assignment. Boards come from
an inventory (`--devices`: the host's latencies over each device's speed) or from
BOARDS.yaml (`--boards`: each board's type as calibrated, its memory and link). BOARDS.yaml
is read, and board types measured, by fleet/boards/calibrate.py, which edvit/cli.py hands
in as `args.fleet_boards` and `args.calibrate_fleet`.
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
from edvit.placement.slo import (
    CALIBRATION_NAME,
    DEFAULT_OVERHEAD_MB,
    HOST_TYPE,
    Board,
    BundleModels,
    Calibration,
    Option,
    Predictor,
    fastest,
    format_options,
    load_calibration,
    recommend,
    save_calibration,
)

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
    # Devices given the same sub-models are replicas (they share frames) and count once.
    once = {tuple(sorted(ids)) for ids in content.assignments.values() if ids}
    placed = sorted(sid for ids in once for sid in ids)
    expected = sorted(s.id for s in bundle.manifest.submodels)
    if placed != expected:
        raise ConfigError(
            f"{path} places {placed} but the bundle has sub-models {expected}; "
            "run `edvit plan` again"
        )
    return content


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder written by `edvit build`")
    fleet = parser.add_mutually_exclusive_group(required=True)
    fleet.add_argument("--devices", help="device inventory (YAML or JSON)")
    fleet.add_argument(
        "--boards", metavar="BOARDS.yaml",
        help="emulated boards' file (`edvit fleet up`'s): types, memory, links; with --slo-ms "
        "or --calibrate",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=50, help="latency runs per model")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")
    parser.add_argument(
        "--slo-ms", type=float, metavar="MS",
        help="predict split, replicas and copies of the split; recommend the one whose p50 "
        "frame latency is at most MS at the highest throughput (exit 1 when none is)",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate", action="store_true",
        help="measure every model's latency on each board type of --boards (under its CPU "
        "quota where this machine can emulate boards) and on this machine, into the "
        "calibration file",
    )  # fmt: skip
    parser.add_argument(
        "--calibration", metavar="FILE",
        help=f"the calibration file (default: the bundle's {CALIBRATION_NAME})",
    )  # fmt: skip
    parser.add_argument(
        "--overhead-mb", type=float,
        help="a node's memory before any model (default: the calibration's, else "
        f"{DEFAULT_OVERHEAD_MB:g})",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    if args.slo_ms is not None and not args.slo_ms > 0:
        raise ConfigError(f"--slo-ms must be positive, not {args.slo_ms:g}")
    if args.overhead_mb is not None and args.overhead_mb < 0:
        raise ConfigError(f"--overhead-mb must not be negative, not {args.overhead_mb:g}")
    calibration_path = Path(args.calibration or bundle.path(CALIBRATION_NAME))
    if args.calibrate:
        calibrate(args, bundle, calibration_path)
    if args.slo_ms is not None:
        return plan_for_slo(args, bundle, calibration_path)
    if args.calibrate:
        return 0
    if args.devices is None:
        raise ConfigError("--boards needs --slo-ms or --calibrate; place on --devices")
    return place(args, bundle)


def place(args: argparse.Namespace, bundle: Bundle) -> int:
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


def calibrate(args: argparse.Namespace, bundle: Bundle, path: Path) -> None:
    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, not {args.runs}")
    existing = load_calibration(path) if path.is_file() else Calibration()
    if args.boards is not None:
        calibration = args.calibrate_fleet(bundle, args.boards, args.runs, existing)
    else:
        from edvit.placement.calibrate import host_calibration

        host = host_calibration(bundle, args.runs)
        calibration = Calibration(board_types={**existing.board_types, HOST_TYPE: host})
    for name, measured in calibration.board_types.items():
        slowest = max(measured.latency_ms[s.file] for s in bundle.manifest.submodels)
        original = measured.latency_ms[bundle.manifest.original.file]
        print(
            f"{name:<14s} {measured.method:<7s} frame {measured.frame_ms:7.2f} ms  slowest "
            f"sub-model {slowest:8.2f} ms  original {original:8.2f} ms"
        )
    save_calibration(path, calibration)
    print(f"wrote {path}")


def bundle_models(bundle: Bundle) -> BundleModels:
    from edvit.placement.calibrate import jpeg_frame
    from edvit.schemas import encode

    m = bundle.manifest
    files = [*(s.file for s in m.submodels), m.original.file, m.fusion.file]
    frame = jpeg_frame(m.preprocessing.width, m.preprocessing.height)
    return BundleModels(
        submodels={s.id: s.file for s in m.submodels},
        original=m.original.file,
        fusion=m.fusion.file,
        size_mb={f: bundle.path(f).stat().st_size / BYTES_PER_MB for f in files},
        frame_bytes=len(encode(frame)),
        features_bytes=4 * max(s.feature_dim for s in m.submodels),
    )


def fleet_of(args: argparse.Namespace) -> list[Board]:
    if args.boards is not None:
        return list(args.fleet_boards(args.boards))
    inventory = load_inventory(args.devices)
    return [
        Board(id=d.id, type=HOST_TYPE, memory_mb=d.memory_mb, speed=d.speed)
        for d in inventory.devices
    ]


def plan_for_slo(args: argparse.Namespace, bundle: Bundle, calibration_path: Path) -> int:
    boards = fleet_of(args)
    predictor = Predictor(
        bundle_models(bundle), boards, load_calibration(calibration_path), args.overhead_mb
    )
    options = predictor.options()
    print(format_options(options, boards, args.slo_ms))
    chosen = recommend(options, args.slo_ms)
    if chosen is None:
        best = fastest(options)
        if best is None:
            print(f"no option fits the fleet's memory; none meets {args.slo_ms:g} ms")
        else:
            print(
                f"no option meets {args.slo_ms:g} ms: the fastest is {best.name} at "
                f"{best.p50_ms:.1f} ms p50, {best.fps:.1f} fps"
            )
        return 1
    print(
        f"recommended: {chosen.name}, {chosen.p50_ms:.1f} ms p50 (SLO {args.slo_ms:g} ms), "
        f"{chosen.fps:.1f} fps on {chosen.boards_used} boards"
    )
    if chosen.name == "replicas":
        print(
            "the whole original on each board is the monolithic bundle (as `edvit bench "
            "boards` serves it); the bundle's assignment is left as it is"
        )
    elif not args.dry_run:
        path = write_option(bundle.root, boards, chosen, predictor)
        print(f"wrote {path}; `edvit deploy {args.bundle}` now uses it")
    return 0


def write_option(root: Path, boards: list[Board], option: Option, predictor: Predictor) -> Path:
    """assignment.json for a split option: the boards as devices, as placed; sub-models on
    several boards are replicas (`edvit deploy` lets them share the frames)."""
    by_id = {b.id: b for b in boards}
    files = predictor.models.submodels
    loads = {
        bid: predictor.board_ms(by_id[bid], [files[s] for s in ids])
        for bid, ids in option.assignments.items()
    }
    content = AssignmentFile(
        # Speeds relative to the first board, as the placement used them.
        devices=tuple(
            Device(id=d.id, memory_mb=by_id[d.id].memory_mb, speed=d.speed)
            for d in predictor.inventory(boards).devices
        ),
        assignments={b.id: option.assignments.get(b.id, ()) for b in boards},
        makespan_ms=max(loads.values()),
        loads_ms={b.id: loads.get(b.id, 0.0) for b in boards},
        memory_used_mb={b.id: option.memory_mb.get(b.id, 0.0) for b in boards},
    )
    path = Path(root) / ASSIGNMENT_NAME
    path.write_text(content.model_dump_json(indent=2) + "\n")
    return path
