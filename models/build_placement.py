"""Placement: export the sub-models, measure them (ONNX file MB, ORT latency at batch 1, one
thread) and place them on the inventory; when nothing fits, prune the sub-models concerned
again to smaller budgets, up to ``budget_rounds`` times."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from edvit.placement.assignment import Infeasible, Item, assign, shrink_budgets
from edvit.placement.plan import write_assignment

from .build_data import BuildData
from .build_settings import BuildSettings, log, runs_of
from .build_submodels import PrunePlan, SubModels, feature_params, make_submodel
from .export import export_image_model
from .vit import SubModel


def measure_items(
    out: Path, ids: list[str], files: list[str], input_shape: tuple[int, ...], runs: int
) -> list[Item]:
    from edvit.inference import measure_latency_ms

    return [
        Item(
            id=sid,
            memory_mb=(out / rel).stat().st_size / 1e6,
            latency_ms=measure_latency_ms(out / rel, input_shape, runs=runs, warmup=10, threads=1),
        )
        for sid, rel in zip(ids, files, strict=True)
    ]


def budget_from_mb(budget_mb: float, file_bytes: int, params: int) -> int:
    """A parameter budget for ``budget_mb`` at the sub-model's own bytes per parameter."""
    bytes_per_param = file_bytes / max(1, params)
    return int(budget_mb * 1e6 / bytes_per_param)


@dataclass
class Exports:
    """The ONNX files exported into ``out`` so far: the exporter that wrote each, and its
    largest difference from torch on ``sample`` (real test inputs)."""

    out: Path
    sample: np.ndarray
    exporters: dict[str, str] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)

    def image_model(self, module: torch.nn.Module, rel: str, *, features: bool) -> None:
        self.exporters[rel], self.parity[rel] = export_image_model(
            module, self.out / rel, self.sample, features=features
        )


def export_submodel(subs: SubModels, i: int, exports: Exports) -> None:
    exports.image_model(SubModel(subs.vits[i]), subs.files[i], features=True)


def export_submodels(subs: SubModels, exports: Exports) -> None:
    for i in range(len(subs.ids)):
        export_submodel(subs, i, exports)


def place_submodels(
    settings: BuildSettings,
    original: VisionTransformer,
    subs: SubModels,
    data: BuildData,
    exports: Exports,
) -> list[dict]:
    """Place the exported sub-models on the inventory and write the assignment. When nothing
    fits, prune those concerned again from ``original`` to smaller budgets and export them
    again, up to ``budget_rounds`` times. Returns the rounds that did not fit."""
    out = exports.out
    inventory = data.inventory
    pp = data.preprocessing
    image_shape = (1, pp.channels, pp.height, pp.width)
    rounds: list[dict] = []
    for round_index in range(settings.budget_rounds + 1):
        items = measure_items(out, subs.ids, subs.files, image_shape, runs_of(settings))
        try:
            placed = assign(items, inventory)
            break
        except Infeasible as exc:
            if round_index == settings.budget_rounds:
                raise
            budgets_mb = shrink_budgets(items, inventory, exc)
            rounds.append({"infeasible": str(exc), "budgets_mb": budgets_mb})
            log(f"placement: {exc}; shrinking {sorted(budgets_mb)}")
            for sid, mb in budgets_mb.items():
                i = subs.ids.index(sid)
                plan = subs.plans[sid]
                params = budget_from_mb(
                    mb, (out / subs.files[i]).stat().st_size, feature_params(subs.vits[i])
                )
                params = min(params, plan.param_budget - 1)
                subs.plans[sid] = PrunePlan(params, plan.embed_keep_ratio, plan.keep_branches)
                try:
                    subs.vits[i] = make_submodel(
                        original, subs.data[i], subs.plans[sid], settings, i + 1, sid
                    )
                except ValueError:
                    log(f"{sid}: cannot be pruned to {params} params")
                    raise exc from None
                export_submodel(subs, i, exports)
    write_assignment(out, inventory, placed)
    return rounds
