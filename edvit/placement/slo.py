"""Split or replicate? Per-frame latency, fleet throughput and memory per board of three
ways to serve a bundle on a fleet, predicted from per-model latencies measured once per
board type (a calibration file), for `edvit plan --slo-ms`.

The three options, for a bundle of N sub-models on B boards:

- ``split``: the sub-models placed over all B boards by ``assign`` (one each when B = N);
  every frame needs every sub-model, so a frame waits for the slowest board.
- ``replicas``: the whole original on every board that can hold it; the boards share the
  camera's frames (an MQTT shared subscription hands each frame to one of them).
- ``split-groups``: when B >= 2N, k = B // N copies of the split; each sub-model's k copies
  share its frames, so the fleet serves k times the frames at the split's latency.

The model of a board: it decodes a frame once (``frame_ms``, measured on the board type)
and runs its sub-models one after another, so its time per frame is ``frame_ms`` plus the
sum of their latencies on its type, divided by its ``speed``. A frame crosses the board's
link twice (the frame in, the features out): ``2 * delay_ms`` plus its bytes at the link
rate. The fusion runs where the aggregator runs, at its calibrated host latency.
Throughput: a board serves ``1000 / time per frame`` frames per second; a sub-model served
by several boards serves the sum; the fleet serves what its least served sub-model does.
Memory: a node's runtime (the Python process with ONNX Runtime loaded) plus, per model it
holds, what loading it from bytes and running it once added to the process's peak; both
measured with the calibration, or else ``DEFAULT_OVERHEAD_MB`` plus the ONNX files' sizes.
The latency is the one of a lone frame (no queueing, no batching); how far the predictions
are from `edvit bench boards` is measured in docs, "Real scale".
No torch here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edvit.errors import ConfigError
from edvit.limits import max_payload_bytes
from edvit.placement.assignment import Assignment, Infeasible, Item, assign
from edvit.placement.devices import Device, Inventory

CALIBRATION_NAME = "calibration.json"
HOST_TYPE = "host"  # the machine `edvit plan` runs on, no quota: what --devices speeds scale
# A node's resident memory before any sub-model: Python, ONNX Runtime, paho and the node's
# code, measured as 135 MiB (VmRSS of an interpreter that imported the node and opened one
# 0.6 MB session, 2026-12-07, x86-64); rounded up.
DEFAULT_OVERHEAD_MB = 140.0
MB = 1_000_000
OPTIONS = ("split", "replicas", "split-groups")


class TypeCalibration(BaseModel):
    """Latencies of a bundle's ONNX files on one board type, median of ``runs`` at batch 1,
    one thread. ``method``: ``cgroup`` measured under the type's CPU quota on this machine,
    ``scaled`` measured unlimited and divided by the type's core share, ``host`` unlimited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: float = Field(gt=0, allow_inf_nan=False)
    method: Literal["cgroup", "scaled", "host"]
    measured: str
    runs: int = Field(ge=1)
    frame_ms: float = Field(ge=0, allow_inf_nan=False)
    latency_ms: dict[str, float]
    runtime_mb: float | None = None  # the process before any model
    memory_mb: dict[str, float] = {}  # file -> peak growth of loading and running it


class Calibration(BaseModel):
    """calibration.json: board type -> its latencies (file path in the bundle -> ms)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    board_types: dict[str, TypeCalibration] = {}


def load_calibration(path: Path) -> Calibration:
    """The calibration at ``path``; a one-line ConfigError when missing or malformed."""
    try:
        return Calibration.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no calibration; measure one with `edvit plan BUNDLE --calibrate`"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def save_calibration(path: Path, calibration: Calibration) -> None:
    path.write_text(calibration.model_dump_json(indent=2) + "\n")


@dataclass(frozen=True)
class Board:
    """One board of the fleet: its type names its calibration; ``speed`` scales that
    type's latencies (1.0 for a board of a calibrated type, an inventory's speed over
    the host's)."""

    id: str
    type: str
    memory_mb: float
    speed: float = 1.0
    delay_ms: float = 0.0  # added each way on its link
    rate_mbit: float | None = None  # None: not limited


@dataclass(frozen=True)
class BundleModels:
    """What a prediction needs of a bundle: each model's file (path in the bundle) and size."""

    submodels: dict[str, str]  # sub-model id -> file
    original: str
    fusion: str
    size_mb: dict[str, float]  # file -> MB (10^6 bytes)
    frame_bytes: int  # one frame on the wire
    features_bytes: int  # one sub-model's features on the wire


@dataclass
class Option:
    name: str
    fits: bool
    boards_used: int = 0
    p50_ms: float = float("inf")
    fps: float = 0.0
    memory_mb: dict[str, float] = field(default_factory=dict)  # board -> need
    assignments: dict[str, tuple[str, ...]] = field(default_factory=dict)
    note: str = ""

    def meets(self, slo_ms: float) -> bool:
        return self.fits and self.p50_ms <= slo_ms


class Predictor:
    """The three options for one bundle, fleet and calibration."""

    def __init__(
        self,
        models: BundleModels,
        boards: Sequence[Board],
        calibration: Calibration,
        overhead_mb: float | None = None,
        fusion_type: str | None = None,
    ) -> None:
        if not boards:
            raise ConfigError("a fleet needs at least one board")
        self.models, self.boards, self.overhead_mb = models, tuple(boards), overhead_mb
        self.by_id = {b.id: b for b in self.boards}
        self.calibration = calibration
        for board in self.boards:
            self._type(board.type)
        fusion_types = [fusion_type] if fusion_type else [HOST_TYPE, self.boards[0].type]
        known = [t for t in fusion_types if t in calibration.board_types]
        if not known:
            raise ConfigError(f"the calibration has no type {fusion_types[0]!r} for the fusion")
        self.fusion_ms = self._latency(known[0], models.fusion)

    def _type(self, name: str) -> TypeCalibration:
        found = self.calibration.board_types.get(name)
        if found is None:
            types = ", ".join(sorted(self.calibration.board_types)) or "none"
            raise ConfigError(
                f"the calibration has no board type {name!r} (it has: {types}); "
                "run `edvit plan BUNDLE --calibrate` with these boards"
            )
        return found

    def _latency(self, type_name: str, file: str) -> float:
        latencies = self._type(type_name).latency_ms
        if file not in latencies:
            raise ConfigError(
                f"the calibration of {type_name!r} has no latency for {file}; calibrate again"
            )
        return latencies[file]

    def board_ms(self, board: Board, files: Sequence[str]) -> float:
        """A board's time per frame: decode once, then its models one after another."""
        if not files:
            return 0.0
        work = self._type(board.type).frame_ms + sum(self._latency(board.type, f) for f in files)
        return work / board.speed

    def link_ms(self, board: Board) -> float:
        wire = self.models.frame_bytes + self.models.features_bytes
        rate = 0.0 if board.rate_mbit is None else wire * 8 / (board.rate_mbit * 1000)
        return 2 * board.delay_ms + rate

    def runtime_mb(self, board_type: str) -> float:
        """A node's memory before any model: given, else calibrated, else the default."""
        if self.overhead_mb is not None:
            return self.overhead_mb
        measured = self._type(board_type).runtime_mb
        return DEFAULT_OVERHEAD_MB if measured is None else measured

    def file_mb(self, board_type: str, file: str) -> float:
        """A model's memory on a node: calibrated, else its file's size."""
        return self._type(board_type).memory_mb.get(file, self.models.size_mb[file])

    def memory_need(self, board: Board, files: Sequence[str]) -> float:
        return self.runtime_mb(board.type) + sum(self.file_mb(board.type, f) for f in files)

    def items(self, board_type: str) -> list[Item]:
        """The sub-models as placement items, latencies on ``board_type``."""
        return [
            Item(id=sid, memory_mb=self.file_mb(board_type, file),
                 latency_ms=self._latency(board_type, file))
            for sid, file in self.models.submodels.items()
        ]  # fmt: skip

    def inventory(self, boards: Sequence[Board]) -> Inventory:
        """The boards as devices: memory left after the runtime, speed relative to the
        first board (the items' latencies are the first board's type's)."""
        reference = self._total_ms(boards[0])
        return Inventory(devices=tuple(
            Device(id=b.id, memory_mb=max(b.memory_mb - self.runtime_mb(b.type), 1e-6),
                   speed=reference / self._total_ms(b))
            for b in boards
        ))  # fmt: skip

    def _total_ms(self, board: Board) -> float:
        return sum(self._latency(board.type, f) for f in self.models.submodels.values()) / (
            board.speed
        )

    def split_on(self, boards: Sequence[Board]) -> Assignment:
        return assign(self.items(boards[0].type), self.inventory(boards))

    def undeployable(self, files: Sequence[str]) -> str:
        """Why `edvit deploy` would refuse these files (one is over what a model message
        carries), or ""."""
        limit_mb = max_payload_bytes("model") / 1e6
        too_large = [f for f in files if self.models.size_mb[f] > limit_mb]
        return "; ".join(
            f"{f} is {self.models.size_mb[f]:.0f} MB, over the {limit_mb:.0f} MB a model "
            "message carries: it cannot be deployed"
            for f in too_large
        )

    def split(self) -> Option:
        why_not = self.undeployable(list(self.models.submodels.values()))
        if why_not:
            return Option("split", fits=False, note=why_not)
        try:
            assignment = self.split_on(self.boards)
        except Infeasible as exc:
            return Option("split", fits=False, note=self._infeasible_note(exc))
        return self._served("split", assignment.as_plan_assignments())

    def split_groups(self) -> Option:
        n = len(self.models.submodels)
        k = len(self.boards) // n
        if k < 2:
            return Option(
                "split-groups", fits=False,
                note=f"needs at least {2 * n} boards (2 x {n} sub-models), the fleet has "
                f"{len(self.boards)}",
            )  # fmt: skip
        why_not = self.undeployable(list(self.models.submodels.values()))
        if why_not:
            return Option("split-groups", fits=False, note=why_not)
        placed: dict[str, tuple[str, ...]] = {}
        for g in range(k):  # strided: each group gets its share of every board type
            try:
                placed |= self.split_on(self.boards[g::k]).as_plan_assignments()
            except Infeasible as exc:
                return Option("split-groups", fits=False, note=self._infeasible_note(exc))
        option = self._served("split-groups", placed)
        option.note = f"{k} copies of the split"
        return option

    def _served(self, name: str, placed: dict[str, tuple[str, ...]]) -> Option:
        """Latency and throughput of sub-models placed on boards, copies sharing frames."""
        files = self.models.submodels
        per_board = {
            bid: self.board_ms(self.by_id[bid], [files[s] for s in ids])
            for bid, ids in placed.items()
        }
        fps = min(
            sum(1000.0 / per_board[bid] for bid, ids in placed.items() if sid in ids)
            for sid in files
        )
        # A frame waits for every sub-model; each is served by one of its copies.
        p50 = max(
            statistics.median(
                per_board[bid] + self.link_ms(self.by_id[bid])
                for bid, ids in placed.items()
                if sid in ids
            )
            for sid in files
        )
        used = {bid: ids for bid, ids in placed.items() if ids}
        return Option(
            name, fits=True, boards_used=len(used), p50_ms=p50 + self.fusion_ms, fps=fps,
            memory_mb={
                bid: self.memory_need(self.by_id[bid], [files[s] for s in ids])
                for bid, ids in used.items()
            },
            assignments=placed,
        )  # fmt: skip

    def replicas(self) -> Option:
        original = self.models.original
        why_not = self.undeployable([original])
        if why_not:
            return Option("replicas", fits=False, note=why_not)
        need = {b.id: self.memory_need(b, [original]) for b in self.boards}
        fitting = [b for b in self.boards if b.memory_mb >= need[b.id]]
        note = "; ".join(
            f"{b.id} ({b.memory_mb:g} MB) cannot hold the original (needs {need[b.id]:.0f} MB)"
            for b in self.boards
            if b.memory_mb < need[b.id]
        )
        if not fitting:
            return Option("replicas", fits=False, note=note)
        times = {b.id: self.board_ms(b, [original]) for b in fitting}
        return Option(
            "replicas", fits=True, boards_used=len(fitting),
            p50_ms=statistics.median(times[b.id] + self.link_ms(b) for b in fitting),
            fps=sum(1000.0 / t for t in times.values()),
            memory_mb={b.id: need[b.id] for b in fitting}, note=note,
        )  # fmt: skip

    def options(self) -> list[Option]:
        return [self.split(), self.replicas(), self.split_groups()]

    def _infeasible_note(self, exc: Infeasible) -> str:
        board = self.by_id[exc.device_id]
        return (
            f"{board.id} ({board.memory_mb:g} MB) cannot hold {exc.item_id} "
            f"(needs {exc.needed_mb + self.runtime_mb(board.type):.0f} MB with the runtime)"
        )


def recommend(options: Sequence[Option], slo_ms: float) -> Option | None:
    """The option that meets the SLO at the highest throughput (lower latency on ties);
    None when none does."""
    meeting = [o for o in options if o.meets(slo_ms)]
    if not meeting:
        return None
    return max(meeting, key=lambda o: (o.fps, -o.p50_ms))


def fastest(options: Sequence[Option]) -> Option | None:
    """The option with the lowest latency among those that fit; None when none fits."""
    fitting = [o for o in options if o.fits]
    return min(fitting, key=lambda o: (o.p50_ms, -o.fps)) if fitting else None


def format_options(options: Sequence[Option], boards: Sequence[Board], slo_ms: float) -> str:
    memory = {b.id: b.memory_mb for b in boards}
    lines = [
        "| option | boards | p50 ms | fps | memory MB per board (need / has) "
        f"| meets {slo_ms:g} ms | note |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for o in options:
        if o.fits:
            worst = max(o.memory_mb, key=lambda b: o.memory_mb[b] / memory[b])
            mem = f"{o.memory_mb[worst]:.0f} / {memory[worst]:g} ({worst})"
            figures = f"{o.boards_used} | {o.p50_ms:.1f} | {o.fps:.1f} | {mem}"
        else:
            figures = "- | - | - | does not fit"
        lines.append(f"| {o.name} | {figures} | {'yes' if o.meets(slo_ms) else 'no'} | {o.note} |")
    return "\n".join(lines)
