"""`edvit plan --slo-ms`: split, replicas or copies of the split, predicted from a
calibration, on synthetic fleets (the predictions in the unit tests, the command on a copy
of the shipped bundle with a synthetic calibration)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edvit.bundle import ASSIGNMENT_NAME, Bundle
from edvit.errors import ConfigError
from edvit.placement.plan import read_assignment
from edvit.placement.slo import (
    CALIBRATION_NAME,
    Board,
    BundleModels,
    Calibration,
    Predictor,
    TypeCalibration,
    fastest,
    recommend,
)

SHIPPED = Path(__file__).resolve().parents[1] / "fleet" / "bundles" / "fashion-mnist-3"
SUB_MS, ORIGINAL_MS = 10.0, 24.0  # three sub-models cost more than the original, as cut ViTs do
SUBMODELS = {"sub0": "submodels/sub0.onnx", "sub1": "submodels/sub1.onnx",
             "sub2": "submodels/sub2.onnx"}  # fmt: skip


def calibration(sub_ms: float = SUB_MS, original_ms: float = ORIGINAL_MS) -> Calibration:
    latencies = {file: sub_ms for file in SUBMODELS.values()}
    latencies |= {"original.onnx": original_ms, "fusion.onnx": 0.0}
    board = TypeCalibration(cpu=1.0, method="host", measured="2026-12-07T00:00:00+00:00",
                            runs=1, frame_ms=0.0, latency_ms=latencies)  # fmt: skip
    return Calibration(board_types={"host": board})


MODELS = BundleModels(
    submodels=SUBMODELS, original="original.onnx", fusion="fusion.onnx",
    size_mb={**{f: 10.0 for f in SUBMODELS.values()}, "original.onnx": 30.0, "fusion.onnx": 1.0},
    frame_bytes=0, features_bytes=0,
)  # fmt: skip


def fleet(count: int, memory_mb: float = 1000.0) -> list[Board]:
    return [Board(id=f"b{i}", type="host", memory_mb=memory_mb) for i in range(count)]


def choice(boards: list[Board], slo_ms: float) -> str | None:
    chosen = recommend(Predictor(MODELS, boards, calibration(), overhead_mb=100).options(), slo_ms)
    return None if chosen is None else chosen.name


def test_the_predictions_follow_the_model_of_a_board() -> None:
    options = {o.name: o for o in Predictor(MODELS, fleet(6), calibration(), 100).options()}
    split, replicas, groups = options["split"], options["replicas"], options["split-groups"]
    assert (split.p50_ms, split.fps) == (SUB_MS, pytest.approx(1000 / SUB_MS))
    assert split.memory_mb == {f"b{i}": 110.0 for i in range(3)}  # runtime + one sub-model
    assert (replicas.p50_ms, replicas.fps) == (ORIGINAL_MS, pytest.approx(6000 / ORIGINAL_MS))
    assert (groups.p50_ms, groups.fps) == (SUB_MS, pytest.approx(2000 / SUB_MS))
    assert groups.note == "2 copies of the split"
    assert sorted(groups.assignments.values()) == [("sub0",), ("sub0",), ("sub1",), ("sub1",),
                                                   ("sub2",), ("sub2",)]  # fmt: skip


def test_the_choice_flips_with_the_slo() -> None:
    # Split: 10 ms, 100 fps; replicas: 24 ms, 125 fps on three boards.
    assert choice(fleet(3), slo_ms=30) == "replicas"
    assert choice(fleet(3), slo_ms=15) == "split"
    assert choice(fleet(3), slo_ms=5) is None


def test_the_choice_flips_with_the_board_count() -> None:
    # One board runs the three sub-models in turn (30 ms): only the original, 24 ms, meets 28.
    assert choice(fleet(1), slo_ms=28) == "replicas"
    assert choice(fleet(1), slo_ms=15) is None
    assert choice(fleet(3), slo_ms=15) == "split"
    assert choice(fleet(6), slo_ms=15) == "split-groups"  # 200 fps at the split's latency
    assert choice(fleet(6), slo_ms=30) == "replicas"  # 250 fps


def test_boards_that_cannot_hold_the_original_are_named() -> None:
    boards = [*fleet(3, memory_mb=120.0), Board(id="big", type="host", memory_mb=1000.0)]
    options = {o.name: o for o in Predictor(MODELS, boards, calibration(), 100).options()}
    replicas = options["replicas"]
    assert replicas.boards_used == 1
    assert "b0 (120 MB) cannot hold the original (needs 130 MB)" in replicas.note
    assert recommend(options.values(), slo_ms=30).name == "split"  # 100 fps > 41.7


def test_a_fleet_that_holds_no_sub_model_names_the_board_and_the_need() -> None:
    options = Predictor(MODELS, fleet(3, memory_mb=105.0), calibration(), 100).options()
    assert not any(o.fits for o in options)
    split = options[0]
    assert "(105 MB) cannot hold sub" in split.note and "needs 110 MB" in split.note
    assert fastest(options) is None and recommend(options, 1000) is None


def test_a_board_type_the_calibration_lacks_is_refused() -> None:
    boards = [Board(id="pi", type="rpi4", memory_mb=2048)]
    with pytest.raises(ConfigError, match="no board type 'rpi4'.*--calibrate"):
        Predictor(MODELS, boards, calibration())


# -- the command ----------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(SHIPPED, copy, ignore=shutil.ignore_patterns(ASSIGNMENT_NAME))
    (copy / CALIBRATION_NAME).write_text(calibration().model_dump_json())
    return copy


def _devices(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "devices.yaml"
    path.write_text(
        "devices:\n" + "".join(f"  - {{id: d{i}, memory_mb: 1000}}\n" for i in range(count))
    )
    return path


def _plan(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edvit", "plan", str(bundle), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.fleet
def test_plan_recommends_and_writes_the_split(bundle_copy: Path, tmp_path: Path) -> None:
    done = _plan(bundle_copy, "--devices", str(_devices(tmp_path, 6)), "--slo-ms", "15")
    assert done.returncode == 0, done.stderr
    assert "recommended: split-groups, 10.0 ms p50 (SLO 15 ms), 200.0 fps on 6 boards" in (
        done.stdout
    )
    for name in ("split", "replicas", "split-groups"):
        assert f"| {name} |" in done.stdout
    placed = read_assignment(Bundle.load(bundle_copy))  # replicas of a sub-model count once
    assert placed is not None and sorted(placed.assignments) == [f"d{i}" for i in range(6)]
    assert all(len(ids) == 1 for ids in placed.assignments.values())


@pytest.mark.fleet
def test_plan_says_the_best_it_can_do_when_no_option_meets_the_slo(
    bundle_copy: Path, tmp_path: Path
) -> None:
    done = _plan(bundle_copy, "--devices", str(_devices(tmp_path, 3)), "--slo-ms", "5")
    assert done.returncode == 1
    assert "no option meets 5 ms: the fastest is split at 10.0 ms p50, 100.0 fps" in done.stdout
    assert not (bundle_copy / ASSIGNMENT_NAME).exists()


@pytest.mark.fleet
def test_plan_refuses_bad_input_in_one_line(bundle_copy: Path, tmp_path: Path) -> None:
    devices = str(_devices(tmp_path, 3))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"board_types": {"host": {"cpu": 1}}}))
    boards = tmp_path / "boards.yaml"
    boards.write_text("boards:\n  - {id: pi, preset: rpi4}\n")
    cases = {
        ("--devices", devices, "--slo-ms", "0"): "--slo-ms must be positive, not 0",
        ("--devices", devices, "--slo-ms", "10", "--calibration", str(tmp_path / "none.json")):
            "no calibration; measure one with `edvit plan BUNDLE --calibrate`",
        ("--devices", devices, "--slo-ms", "10", "--calibration", str(broken)):
            "board_types.host.method: Field required",
        ("--boards", str(boards), "--slo-ms", "10"):
            "the calibration has no board type 'rpi4' (it has: host)",
        ("--boards", str(boards),): "--boards needs --slo-ms or --calibrate",
        ("--devices", devices, "--slo-ms", "10", "--overhead-mb", "-1"):
            "--overhead-mb must not be negative",
    }  # fmt: skip
    for args, message in cases.items():
        done = _plan(bundle_copy, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (bundle_copy / ASSIGNMENT_NAME).exists()


@pytest.mark.fleet
def test_calibrate_on_this_machine_writes_every_model(bundle_copy: Path, tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    done = _plan(bundle_copy, "--devices", str(_devices(tmp_path, 3)), "--calibrate",
                 "--runs", "3", "--calibration", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    host = Calibration.model_validate_json(path.read_text()).board_types["host"]
    assert host.method == "host" and host.frame_ms > 0
    assert set(host.latency_ms) == {*SUBMODELS.values(), "original.onnx", "fusion.onnx"}
    assert all(ms > 0 for ms in host.latency_ms.values())


@pytest.mark.fleet
def test_calibrate_board_types_then_plan_for_them(bundle_copy: Path, tmp_path: Path) -> None:
    """Each board type of BOARDS.yaml measured once (under its quota where this machine
    emulates boards), then the plan for those boards."""
    from edvit.fleet.boards import emulation

    boards = tmp_path / "boards.yaml"
    boards.write_text(
        "boards:\n  - {id: pi-a, preset: rpi4}\n  - {id: pi-b, preset: rpi4}\n"
        "  - {id: zero, preset: rpi-zero2, cpu: 0.2}\n"
    )
    path = tmp_path / "calibration.json"
    done = _plan(bundle_copy, "--boards", str(boards), "--calibrate", "--runs", "3",
                 "--calibration", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    types = Calibration.model_validate_json(path.read_text()).board_types
    assert set(types) == {"host", "rpi4", "cpu-0.2"}  # an overridden cpu is a type of its own
    method = "scaled" if emulation.missing_features() else "cgroup"
    assert (types["rpi4"].method, types["rpi4"].cpu) == (method, 0.29)
    assert types["cpu-0.2"].cpu == 0.2 and types["rpi4"].runtime_mb > 0
    assert set(types["rpi4"].memory_mb) == set(types["rpi4"].latency_ms)
    planned = _plan(bundle_copy, "--boards", str(boards), "--calibration", str(path),
                    "--slo-ms", "100000")  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    # Which option wins, and on how many boards, depends on the measured speeds.
    assert "recommended:" in planned.stdout
    assert "| split |" in planned.stdout and "| replicas |" in planned.stdout


def test_an_original_too_large_for_a_model_message_is_never_recommended() -> None:
    """Replicas of a ViT-B whole (344 MB of ONNX) would win this fleet on paper, but deploy
    refuses a model file over what one model message carries: the split is recommended."""
    big = BundleModels(
        submodels=SUBMODELS, original="original.onnx", fusion="fusion.onnx",
        size_mb={**MODELS.size_mb, "original.onnx": 344.0}, frame_bytes=0, features_bytes=0,
    )  # fmt: skip
    options = {o.name: o for o in Predictor(big, fleet(3), calibration(), 100).options()}
    replicas = options["replicas"]
    assert not replicas.fits
    assert "original.onnx is 344 MB, over the 201 MB a model message carries" in replicas.note
    assert recommend(list(options.values()), slo_ms=30).name == "split"
