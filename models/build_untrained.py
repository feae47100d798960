"""`edvit build --model TIMM_NAME --untrained`: a bundle of random weights at real scale, for
capacity planning ("will my boards run this model split N ways, at what frame rate?").

The original is timm's ``TIMM_NAME`` with random weights (seeded, never downloaded) for the
classes of ``--dataset`` (their names only: no image is read) or of ``--classes``, at the
model's input size (``--img-size`` to change it) and channels. The sub-models go through the
trained build's own pruning code (``build_submodels.prune_submodels`` and ``make_submodel``)
with no training step: the same plan by N (branches kept, embedding ratio, parameter budget),
the same branch dropping and iterative pruning to the budget. Importance scores need inputs:
they are computed on the model's own random weights with a fixed synthetic batch
(``SCORE_IMAGES`` seeded Gaussian images in the normalised input space, labels cycling over
each sub-task's classes and 'other'). What the budget fixes, the embedding width, the number of
branches kept and the parameter count (at most the budget), is what a trained build gets;
which block keeps which heads and MLP neurons follows the scores, so it is one plausible
layout of that size. The fusion MLP has the build's width and random weights.

Export, placement (``--devices``), manifest and the evaluation of sizes, FLOPs and ONNX
Runtime latencies are the trained build's; the manifest says ``untrained: true`` and the
report has no accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from edvit.bundle import REPORT_NAME, Bundle
from edvit.datasets import Dataset, dataset_class_names
from edvit.errors import ConfigError
from edvit.schemas import Preprocessing

from .build_data import BuildData, load_inventory_for, own_task_labels
from .build_fusion import fusion_width
from .build_output import (
    build_record,
    export_original_and_fusion,
    export_stem_slices,
    prepare_out_dir,
    write_bundle_manifest,
)
from .build_placement import Exports, export_submodels, place_submodels
from .build_settings import (
    BuildSettings,
    log,
    runs_of,
    split_classes,
    timed,
    validate_shared_blocks,
)
from .build_submodels import SubsetData, checked_plan, prune_submodels
from .prune import check_supported, describe
from .train import set_threads
from .vit import FusionMLP, SubModel, TimmModel, count_params, untrained_timm_model

SCORE_IMAGES = 2  # synthetic images per importance estimate: a forward-backward of each
PARITY_IMAGES = 2  # synthetic images for the ONNX parity checks
# Image sides of the datasets with one size, to choose the resize: shrinking larger images
# averages areas, enlarging smaller ones interpolates. Image folders and class lists: camera
# frames, assumed larger than the model's input.
NATIVE_SIDE = {"fashion-mnist": 28, "digits": 8, "cifar10": 32}
FUSION_SEED_OFFSET = 100


def class_names_of(settings: BuildSettings) -> tuple[str, ...]:
    """--classes, else the dataset's class names (read without its images)."""
    if settings.classes is not None:
        return settings.classes
    return dataset_class_names(settings.dataset, settings.data_dir)


def untrained_preprocessing(model: TimmModel, dataset: str) -> Preprocessing:
    """The model's channels and input size, normalised as its pretrained config says (what a
    fine-tuned model of that name would expect)."""
    side = model.img_size
    mean, std = model.mean_std
    enlarging = NATIVE_SIDE.get(dataset, side) < side
    return Preprocessing(
        channels=model.in_chans,
        height=side,
        width=side,
        mean=mean,
        std=std,
        interpolation="linear" if enlarging else "area",
    )


def synthetic_images(count: int, pp: Preprocessing, seed: int) -> torch.Tensor:
    """``count`` seeded Gaussian images in the normalised input space, [count, C, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, pp.channels, pp.height, pp.width, generator=generator)


def synthetic_subset(subset: tuple[int, ...], num_classes: int, images: torch.Tensor) -> SubsetData:
    """A subset's scoring data: ``images`` labelled with the subset's classes in turn and,
    when other classes exist, every second image 'other' (a trained build's data mixes both)."""
    count = len(images)
    others = [c for c in range(num_classes) if c not in subset]
    labels = np.array(
        [
            others[(i // 2) % len(others)] if others and i % 2 else subset[i % len(subset)]
            for i in range(count)
        ]
    )
    return SubsetData(
        subset=subset,
        images=images,
        labels=torch.from_numpy(own_task_labels(labels, subset)),
        teacher_logits=torch.zeros(count, num_classes),  # no distillation step runs
    )


def no_images(name: str, split: str, pp: Preprocessing, classes: tuple[str, ...]) -> Dataset:
    """An empty split that carries the class names: an untrained build reads no image."""
    images = np.zeros((0, pp.height, pp.width, pp.channels), dtype=np.uint8)
    return Dataset(name, split, images, np.zeros(0, dtype=np.int64), classes)


def untrained_original(settings: BuildSettings, num_classes: int) -> TimmModel:
    """The --model with random weights (seeded), checked to be prunable."""
    assert settings.model is not None  # validate() requires it
    torch.manual_seed(settings.seed)
    model = untrained_timm_model(
        settings.model, num_classes, settings.img_size, settings.model_kwargs
    )
    try:
        check_supported(model.vit)
    except NotImplementedError as exc:
        raise ConfigError(f"--model {settings.model}: edvit cannot prune it: {exc}") from None
    validate_shared_blocks(settings, len(model.vit.blocks), f"--model {settings.model}")
    return model


def untrained_fusion(
    settings: BuildSettings, extractors: list[SubModel], num_classes: int
) -> FusionMLP:
    """The fusion MLP a trained build would have (its width rule), with random weights."""
    torch.manual_seed(settings.seed + FUSION_SEED_OFFSET)
    dims = tuple(s.feature_dim for s in extractors)
    return FusionMLP(dims, num_classes, fusion_width(settings, extractors, num_classes)).eval()


def pruned_summary(original: VisionTransformer, sub: VisionTransformer) -> dict[str, list[int]]:
    """What pruning removed from ``original`` to make ``sub``: embedding channels, branches
    (attention and MLP), heads, MLP neurons and whole blocks, each as kept / original."""
    before, after = describe(original), describe(sub)

    def total(arch: dict, key: str) -> int:
        return sum(int(block[key]) for block in arch["blocks"])

    def branches(arch: dict, key: str) -> int:
        return sum(int(block[key] > 0) for block in arch["blocks"])

    depth = len(after["blocks"])
    kept_blocks = sum(int(b["heads"] > 0 or b["mlp"] > 0) for b in after["blocks"])
    return {
        "embed": [after["embed_dim"], before["embed_dim"]],
        "attention_branches": [branches(after, "heads"), branches(before, "heads")],
        "mlp_branches": [branches(after, "mlp"), branches(before, "mlp")],
        "heads": [total(after, "heads"), total(before, "heads")],
        "mlp_neurons": [total(after, "mlp"), total(before, "mlp")],
        "blocks": [kept_blocks, depth],
        "params": [after["params"], before["params"]],
    }


def summary_line(sid: str, pruned: dict[str, list[int]]) -> str:
    parts = [f"{key.replace('_', ' ')} {kept}/{whole}" for key, (kept, whole) in pruned.items()]
    return f"{sid}: kept {', '.join(parts)}"


def build_untrained_bundle(settings: BuildSettings, out: Path, *, force: bool = False) -> dict:
    """Build an untrained bundle into ``out`` (the module's doc); returns the report (also
    written to report.json). ``settings`` are validated by the caller."""
    started = time.time()
    threads = set_threads(settings.threads)
    classes = class_names_of(settings)
    inventory = load_inventory_for(settings)
    subsets = split_classes(len(classes), len(inventory.devices))
    timings: dict[str, float] = {}
    with timed(timings, "original"):
        model = untrained_original(settings, len(classes))
    original = model.vit
    original_params = count_params(original)
    checked_plan(settings, original, original_params, len(subsets))  # before writing anything
    prepare_out_dir(out, force)
    log(f"untrained {settings.model}: random weights, {len(classes)} classes, N={len(subsets)}")
    pp = untrained_preprocessing(model, settings.dataset)
    data = BuildData(
        train=no_images(settings.dataset, "train", pp, classes),
        test=no_images(settings.dataset, "test", pp, classes),
        inventory=inventory,
        subsets=subsets,
        preprocessing=pp,
    )
    images = synthetic_images(SCORE_IMAGES, pp, settings.seed)
    training = [synthetic_subset(subset, len(classes), images) for subset in subsets]
    # The trained build's pruning with every training step at zero.
    pruning = replace(settings, sub_epochs=0, recover_epochs=0)

    with timed(timings, "submodels"):
        subs = prune_submodels(pruning, original, original_params, training, threads)
    pruned = {sid: pruned_summary(original, v) for sid, v in zip(subs.ids, subs.vits, strict=True)}
    for sid, summary in pruned.items():
        log(summary_line(sid, summary))

    sample = synthetic_images(PARITY_IMAGES, pp, settings.seed + 1).numpy()
    exports = Exports(out=out, sample=sample)
    with timed(timings, "placement"):
        log(f"exporting {len(subs.ids)} sub-models and placing them")
        export_submodels(subs, exports)
        rounds = place_submodels(pruning, original, subs, data, exports)
    extractors = [SubModel(v) for v in subs.vits]
    stem = export_stem_slices(settings, original, subs, exports)
    fusion = untrained_fusion(settings, extractors, len(classes))
    with timed(timings, "export"):
        export_original_and_fusion(original, fusion, extractors, exports)
    files, params, architectures = write_bundle_manifest(
        settings, out, data=data, subs=subs, extractors=extractors, fusion=fusion, stem=stem,
        original_params=original_params, original_architecture=model.architecture,
    )  # fmt: skip
    with timed(timings, "evaluate"):
        from .evaluate import evaluate_bundle

        log("measuring the ONNX files (size, FLOPs, ONNX Runtime latency at batch 1, 1 thread)")
        figures = evaluate_bundle(Bundle.load(out), threads=1, latency_runs=runs_of(settings))
    report = {
        **figures,
        "untrained": True,
        "model": model.architecture,
        "num_devices": len(subsets),
        "params": params,
        "pruned": pruned,
        "architectures": architectures,
        **build_record(
            settings, out, subs=subs, rounds=rounds, exports=exports, files=files,
            timings=timings, started=started, threads=threads,
        ),
    }  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    ratios = report["ratios"]
    log(
        f"done in {report['build_seconds']} s: UNTRAINED (random weights, no accuracy); size "
        f"{ratios['size']:.1f}x, ONNX bytes {ratios['bytes']:.1f}x, latency "
        f"{ratios['latency']:.1f}x (original / largest or slowest sub-model)"
    )
    return report
