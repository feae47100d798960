"""Placing sub-models on devices: every one must fit its device's memory, and the slowest
device should finish as early as possible.

A device runs its sub-models one after another, so its load is the sum of their
latencies divided by its speed; the makespan is the largest load. Three entry points:

- ``greedy_assign``: largest sub-model first (by memory, ties by latency), each onto the
  device where it finishes earliest among those with room left. Fast at any size. Memory
  first is first-fit-decreasing order, the one that packs tight inventories best; when
  latency grows with memory (as for sub-models cut from one ViT) it is also LPT order. It
  can fail on a tight inventory where a placement exists: it never moves a placed item.
- ``exact_assign``: the optimal makespan by branch and bound, for small instances only.
- ``assign``: greedy, falling back to exact when greedy finds no placement and the
  instance is small enough to search.

When nothing fits, ``Infeasible`` says which sub-model and by how much; ``shrink_budgets``
turns that into smaller memory budgets for a build loop that prunes further and retries.
No torch here: this runs on the boards too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from edvit.errors import ConfigError
from edvit.placement.devices import Device, Inventory

# Above these sizes exact_assign refuses: the search is exponential (devices ** items).
MAX_EXACT_ITEMS = 10
MAX_EXACT_COMBINATIONS = 2_000_000
# Memory sums are float sums of measured sizes; do not call a fit a miss over rounding.
MEMORY_TOLERANCE_MB = 1e-9
# A makespan must beat the best one by more than this to count as better (float sums).
MAKESPAN_TOLERANCE_MS = 1e-9
# shrink_budgets aims this far below a limit, since pruning to a budget lands near it.
DEFAULT_SHRINK_MARGIN = 0.05


class Item(BaseModel):
    """A sub-model to place: its memory need and its latency on a speed-1.0 device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    memory_mb: float = Field(ge=0, allow_inf_nan=False)
    latency_ms: float = Field(ge=0, allow_inf_nan=False)


class Assignment(BaseModel):
    """Where each sub-model runs. Every device is present in every mapping, possibly idle."""

    model_config = ConfigDict(frozen=True)

    placement: dict[str, tuple[str, ...]]
    loads_ms: dict[str, float]
    makespan_ms: float
    memory_used_mb: dict[str, float]

    def as_plan_assignments(self) -> dict[str, tuple[str, ...]]:
        """Device id -> sub-model ids: the MQTT plan's ``assignments`` (node ids = device ids)."""
        return dict(self.placement)


class Infeasible(ConfigError):
    """No placement fits: ``item_id`` needs ``needed_mb`` but the roomiest device left,
    ``device_id``, has only ``available_mb`` free, ``shortfall_mb`` short."""

    def __init__(self, item_id: str, needed_mb: float, device_id: str, available_mb: float):
        self.item_id = item_id
        self.needed_mb = needed_mb
        self.device_id = device_id
        self.available_mb = available_mb
        self.shortfall_mb = needed_mb - available_mb
        super().__init__(
            f"sub-model {item_id} needs {_format_mb(needed_mb)} MB but the roomiest device left, "
            f"{device_id}, has {_format_mb(available_mb)} MB free "
            f"({_format_mb(self.shortfall_mb)} MB short)"
        )

    def __reduce__(self) -> tuple[type[Infeasible], tuple[str, float, str, float]]:
        # Exceptions pickle their args; ours are the structured fields, not the message.
        return (Infeasible, (self.item_id, self.needed_mb, self.device_id, self.available_mb))


def greedy_assign(items: Sequence[Item], inventory: Inventory) -> Assignment:
    """Largest first, each onto the device where it finishes earliest; raises Infeasible
    when an item fits on no device (even if another placement of all items would fit)."""
    _check_unique_item_ids(items)
    devices = inventory.devices
    loads = [0.0] * len(devices)
    free = [d.memory_mb for d in devices]
    chosen: dict[str, int] = {}
    for item in sorted(items, key=lambda it: (-it.memory_mb, -it.latency_ms)):
        index = _earliest_finish(item, devices, loads, free)
        if index is None:
            raise _infeasible(item, devices, free)
        chosen[item.id] = index
        loads[index] += item.latency_ms / devices[index].speed
        free[index] -= item.memory_mb
    return _build_assignment(items, inventory, chosen)


def exact_assign(items: Sequence[Item], inventory: Inventory) -> Assignment:
    """The minimum makespan placement that fits memory, by branch and bound.

    Raises ValueError above MAX_EXACT_ITEMS items or MAX_EXACT_COMBINATIONS placements,
    and Infeasible when no placement fits (reported at the item where greedy got stuck).
    """
    _check_unique_item_ids(items)
    if not fits_exact_limits(len(items), len(inventory.devices)):
        raise ValueError(
            f"exact_assign is limited to {MAX_EXACT_ITEMS} items and {MAX_EXACT_COMBINATIONS} "
            f"placements; {len(items)} items on {len(inventory.devices)} devices is too many"
        )
    try:
        incumbent = greedy_assign(items, inventory)
    except Infeasible:
        chosen = _BranchAndBound(items, inventory.devices, math.inf).run()
        if chosen is None:
            raise
        return _build_assignment(items, inventory, chosen)
    chosen = _BranchAndBound(items, inventory.devices, incumbent.makespan_ms).run()
    return incumbent if chosen is None else _build_assignment(items, inventory, chosen)


def assign(items: Sequence[Item], inventory: Inventory) -> Assignment:
    """Greedy; when greedy finds no placement and the instance is small, exact before giving up."""
    try:
        return greedy_assign(items, inventory)
    except Infeasible:
        if not fits_exact_limits(len(items), len(inventory.devices)):
            raise
    return exact_assign(items, inventory)


def fits_exact_limits(num_items: int, num_devices: int) -> bool:
    return num_items <= MAX_EXACT_ITEMS and num_devices**num_items <= MAX_EXACT_COMBINATIONS


def shrink_budgets(
    items: Sequence[Item],
    inventory: Inventory,
    infeasible: Infeasible,
    margin: float = DEFAULT_SHRINK_MARGIN,
) -> dict[str, float]:
    """Smaller memory budgets (item id -> MB) for the sub-models that should shrink.

    For a build loop that prunes sub-models to budgets and retries the placement::

        budgets = {}
        for _ in range(max_rounds):
            items = build_submodels(budgets)  # prune each to its budget, measure it
            try:
                return assign(items, inventory)
            except Infeasible as exc:
                budgets.update(shrink_budgets(items, inventory, exc))
        # still infeasible: report exc to the user (more devices or smaller sub-models)

    Every returned budget is below that item's current memory, so each round shrinks
    something. Let fair share = the fleet's memory split evenly over the items (at most the
    largest device). Then, in order:

    1. the roomiest device left has at least a fair share free: only the failing item
       shrinks, to what that device can hold;
    2. otherwise the fleet is crowded: every item above a fair share shrinks to it;
    3. every item is already within a fair share (the sizes do not pack): all shrink by
       ``margin``.

    Each target is ``margin`` below its limit, since pruning to a budget lands near it.
    The loop should stop when a budget falls below what it is willing to build.
    """
    by_id = {item.id: item for item in items}
    if infeasible.item_id not in by_id:
        raise ValueError(f"{infeasible.item_id!r} is not one of the items")
    keep = 1.0 - margin
    largest_device_mb = max(d.memory_mb for d in inventory.devices)
    fair_share_mb = min(inventory.total_memory_mb / len(items), largest_device_mb)
    if infeasible.available_mb >= fair_share_mb:
        return {infeasible.item_id: infeasible.available_mb * keep}
    over = {it.id: fair_share_mb * keep for it in items if it.memory_mb > fair_share_mb * keep}
    if over:
        return over
    return {it.id: it.memory_mb * keep for it in items}


class _BranchAndBound:
    """Depth-first over items (longest first), pruning any branch that cannot beat the best."""

    def __init__(self, items: Sequence[Item], devices: Sequence[Device], to_beat_ms: float):
        self.items = sorted(items, key=lambda it: (-it.latency_ms, -it.memory_mb))
        self.devices = devices
        self.loads = [0.0] * len(devices)
        self.free = [d.memory_mb for d in devices]
        self.current: dict[str, int] = {}
        self.best_makespan = to_beat_ms
        self.best: dict[str, int] | None = None
        total_speed = sum(d.speed for d in devices)
        self.lower_bound = sum(it.latency_ms for it in items) / total_speed

    def run(self) -> dict[str, int] | None:
        """The best placement found that beats ``to_beat_ms``, or None."""
        self._place(0, 0.0)
        return self.best

    def _place(self, depth: int, makespan: float) -> None:
        if depth == len(self.items):
            self.best_makespan, self.best = makespan, dict(self.current)
            return
        item = self.items[depth]
        tried: set[tuple[float, float, float]] = set()
        for index, device in enumerate(self.devices):
            if self._done():
                return
            # Devices equal in speed, free memory and load lead to the same subtrees.
            state = (device.speed, self.free[index], self.loads[index])
            if item.memory_mb > self.free[index] + MEMORY_TOLERANCE_MB or state in tried:
                continue
            tried.add(state)
            previous = self.loads[index]
            load = previous + item.latency_ms / device.speed
            if max(makespan, load) >= self.best_makespan - MAKESPAN_TOLERANCE_MS:
                continue
            self._push(item, index, load)
            self._place(depth + 1, max(makespan, load))
            self._pop(item, index, previous)

    def _done(self) -> bool:
        """No placement can beat total work spread perfectly over all devices."""
        return self.best_makespan <= self.lower_bound + MAKESPAN_TOLERANCE_MS

    def _push(self, item: Item, index: int, load: float) -> None:
        self.current[item.id] = index
        self.loads[index] = load
        self.free[index] -= item.memory_mb

    def _pop(self, item: Item, index: int, load: float) -> None:
        del self.current[item.id]
        self.loads[index] = load
        self.free[index] += item.memory_mb


def _earliest_finish(
    item: Item, devices: Sequence[Device], loads: list[float], free: list[float]
) -> int | None:
    """The device with room where the item finishes first; the first such device on ties."""
    best_index, best_finish = None, math.inf
    for index, device in enumerate(devices):
        if item.memory_mb > free[index] + MEMORY_TOLERANCE_MB:
            continue
        finish = loads[index] + item.latency_ms / device.speed
        if finish < best_finish:
            best_index, best_finish = index, finish
    return best_index


def _infeasible(item: Item, devices: Sequence[Device], free: list[float]) -> Infeasible:
    roomiest = max(range(len(devices)), key=lambda i: (free[i], -i))
    return Infeasible(item.id, item.memory_mb, devices[roomiest].id, free[roomiest])


def _build_assignment(
    items: Sequence[Item], inventory: Inventory, chosen: dict[str, int]
) -> Assignment:
    """Per-device totals, with each device's items in the order they were given."""
    placement: dict[str, list[str]] = {d.id: [] for d in inventory.devices}
    latency: dict[str, float] = {d.id: 0.0 for d in inventory.devices}
    memory: dict[str, float] = {d.id: 0.0 for d in inventory.devices}
    for item in items:
        device_id = inventory.devices[chosen[item.id]].id
        placement[device_id].append(item.id)
        latency[device_id] += item.latency_ms
        memory[device_id] += item.memory_mb
    loads = {d.id: latency[d.id] / d.speed for d in inventory.devices}
    return Assignment(
        placement={device_id: tuple(ids) for device_id, ids in placement.items()},
        loads_ms=loads,
        makespan_ms=max(loads.values()),
        memory_used_mb=memory,
    )


def _check_unique_item_ids(items: Sequence[Item]) -> None:
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"item ids must be unique, got {ids}")


def _format_mb(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2g}"
