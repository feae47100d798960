"""What a build writes: the output folder, the ONNX files of the stem slices, original and
fusion, the manifest, the evaluation of the exported files and report.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

import edvit
from edvit.bundle import (
    ASSIGNMENT_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    Bundle,
    Manifest,
    StemSpec,
    sha256_file,
)
from edvit.datasets import Dataset
from edvit.errors import ConfigError
from edvit.inference import FeatureExtractor

from .build_data import BuildData, own_task_labels
from .build_placement import Exports
from .build_settings import (
    FUSION_FILE,
    ORIGINAL_FILE,
    ORIGINAL_WEIGHTS,
    SUBMODEL_DIR,
    BuildSettings,
    log,
    runs_of,
    sub_steps_of,
)
from .build_submodels import SubModels, check_stem_shared, feature_params
from .export import export_fusion
from .prune import describe
from .slices import export_stem
from .train import fold_log_probs
from .vit import FusionMLP, SubModel, count_params

EVAL_BATCH = 500
DROP_WARNING_PT = 1.0  # the build warns when the fused model is further below the original


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force``; with it, remove only bundle files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out} is not empty; pass --force to overwrite the bundle")
        for name in (
            MANIFEST_NAME,
            REPORT_NAME,
            ASSIGNMENT_NAME,
            ORIGINAL_FILE,
            ORIGINAL_WEIGHTS,
            FUSION_FILE,
        ):
            (out / name).unlink(missing_ok=True)
        sub_dir = out / SUBMODEL_DIR
        if sub_dir.is_dir():
            for onnx_file in sub_dir.glob("*.onnx"):
                onnx_file.unlink()
    out.mkdir(parents=True, exist_ok=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [fn(images[i : i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)]
    )


def export_stem_slices(
    settings: BuildSettings, original: VisionTransformer, subs: SubModels, exports: Exports
) -> StemSpec | None:
    """With --shared-blocks, the stem and tail slices for cameras and nodes."""
    if not settings.shared_blocks:
        return None
    check_stem_shared(original, subs.vits, settings.shared_blocks)
    stem, stem_parity = export_stem(
        original,
        dict(zip(subs.ids, subs.vits, strict=True)),
        settings.shared_blocks,
        exports.out,
        exports.sample,
    )
    exports.parity.update(stem_parity)
    return stem


def export_original_and_fusion(
    original: VisionTransformer, fusion: FusionMLP, extractors: list[SubModel], exports: Exports
) -> None:
    """Export the original and the fusion; parity-check them on real test inputs."""
    log("exporting ONNX files and checking parity with torch")
    exports.image_model(original, ORIGINAL_FILE, features=False)
    sample = exports.sample
    with torch.no_grad():
        sample_features = np.concatenate(
            [s(torch.from_numpy(sample)).numpy() for s in extractors], axis=1
        )
    sample_present = np.ones((len(sample), len(extractors)), dtype=np.float32)
    sample_present[1::3, len(extractors) - 1] = 0.0  # check the masking path too
    exports.exporters[FUSION_FILE], exports.parity[FUSION_FILE] = export_fusion(
        fusion, exports.out / FUSION_FILE, sample_features, sample_present
    )


def shipped_files(out: Path, subs: SubModels, stem: StemSpec | None) -> dict[str, str]:
    """The sha256 of every file the manifest ships, by path relative to ``out``."""
    shipped = (ORIGINAL_FILE, *subs.files, FUSION_FILE, *(stem.all_files() if stem else ()))
    return {rel: sha256_file(out / rel) for rel in shipped}


def param_counts(original_params: int, subs: SubModels, fusion: FusionMLP) -> dict:
    return {
        "original": original_params,
        "submodels": {sid: feature_params(v) for sid, v in zip(subs.ids, subs.vits, strict=True)},
        "fusion": count_params(fusion),
    }


def write_manifest(
    settings: BuildSettings,
    out: Path,
    *,
    data: BuildData,
    subs: SubModels,
    extractors: list[SubModel],
    fusion: FusionMLP,
    stem: StemSpec | None,
    files: dict[str, str],
    params: dict,
    architectures: dict[str, dict],
    original_architecture: str,
) -> None:
    pp = data.preprocessing
    untrained = "-untrained" if settings.untrained else ""
    manifest = Manifest(
        name=f"{settings.dataset}-{len(data.subsets)}{untrained}",
        dataset=settings.dataset,
        class_names=data.train.class_names,
        class_subsets=tuple(data.subsets),
        preprocessing=pp,
        input_shape=(pp.channels, pp.height, pp.width),
        original={
            "file": ORIGINAL_FILE,
            "architecture": original_architecture,
            "params": params["original"],
            "source": "untrained" if settings.untrained else settings.checkpoint or "trained",
        },
        submodels=tuple(
            {
                "id": sid,
                "classes": subset,
                "file": rel,
                "feature_dim": s.feature_dim,
                "params": params["submodels"][sid],
                "architecture": architectures[sid],
            }
            for sid, subset, rel, s in zip(
                subs.ids, data.subsets, subs.files, extractors, strict=True
            )
        ),
        fusion={
            "file": FUSION_FILE,
            "feature_dims": tuple(s.feature_dim for s in extractors),
            "hidden_dim": fusion.hidden_dim,
            "params": params["fusion"],
        },
        stem=stem,
        files=files,
        command=settings.command or ("edvit", "build", "--dataset", settings.dataset),
        seed=settings.seed,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edvit_version=edvit.__version__,
        untrained=settings.untrained,
    )
    (out / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")


@dataclass(frozen=True)
class Evaluation:
    """The bundle's figures (``evaluate.evaluate_bundle``) and each sub-model's accuracy on
    its own sub-task."""

    figures: dict
    own_task: dict[str, float]


def evaluate_onnx(
    settings: BuildSettings,
    out: Path,
    test: Dataset,
    x_test: np.ndarray,
    sub_vits: list[VisionTransformer],
    threads: int,
) -> Evaluation:
    """Evaluate the exported files on the full test split, as the fleet would run them."""
    from .evaluate import evaluate_bundle

    log(f"evaluating the ONNX files on {len(test)} test images")
    bundle = Bundle.load(out)
    figures = evaluate_bundle(
        bundle, images=x_test, labels=test.labels, threads=1, latency_runs=runs_of(settings)
    )
    own = own_task_accuracies(bundle, x_test, test.labels, sub_vits, threads)
    return Evaluation(figures=figures, own_task=own)


def write_bundle_manifest(
    settings: BuildSettings,
    out: Path,
    *,
    data: BuildData,
    subs: SubModels,
    extractors: list[SubModel],
    fusion: FusionMLP,
    stem: StemSpec | None,
    original_params: int,
    original_architecture: dict,
) -> tuple[dict[str, str], dict, dict[str, dict]]:
    """The manifest of a bundle whose files are exported; returns the shipped files, the
    parameter counts and each sub-model's architecture, which the report repeats."""
    files = shipped_files(out, subs, stem)
    params = param_counts(original_params, subs, fusion)
    architectures = {sid: describe(v) for sid, v in zip(subs.ids, subs.vits, strict=True)}
    write_manifest(
        settings, out, data=data, subs=subs, extractors=extractors, fusion=fusion, stem=stem,
        files=files, params=params, architectures=architectures,
        original_architecture=original_architecture,
    )  # fmt: skip
    return files, params, architectures


def build_record(
    settings: BuildSettings,
    out: Path,
    *,
    subs: SubModels,
    rounds: list[dict],
    exports: Exports,
    files: dict[str, str],
    timings: dict[str, float],
    started: float,
    threads: int,
) -> dict:
    """What every report says of how the bundle was made: pruning, placement, files,
    export parity, timings and settings."""
    return {
        "prune_plans": {sid: asdict(p) for sid, p in subs.plans.items()},
        "placement_rounds": rounds,
        "assignment": json.loads((out / ASSIGNMENT_NAME).read_text()),
        "bytes": {rel: (out / rel).stat().st_size for rel in files},
        "bytes_total": int(sum((out / rel).stat().st_size for rel in files)),
        "onnx_parity_max_abs_diff": exports.parity,
        "onnx_exporter": exports.exporters,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "build_seconds": round(time.time() - started, 1),
        "threads": threads,
        "settings": {k: v for k, v in asdict(settings).items() if k != "command"},
    }


def write_report(
    settings: BuildSettings,
    out: Path,
    *,
    data: BuildData,
    subs: SubModels,
    rounds: list[dict],
    exports: Exports,
    files: dict[str, str],
    params: dict,
    architectures: dict[str, dict],
    evaluation: Evaluation,
    timings: dict[str, float],
    started: float,
    threads: int,
) -> dict:
    """Write report.json, log its headline figures and return it."""
    report = {
        **evaluation.figures,
        "dataset": settings.dataset,
        "num_devices": len(data.subsets),
        "test_images": int(len(data.test)),
        "submodel_accuracy_on_own_task": evaluation.own_task,
        "params": params,
        "architectures": architectures,
        **build_record(
            settings, out, subs=subs, rounds=rounds, exports=exports, files=files,
            timings=timings, started=started, threads=threads,
        ),
        "train_seconds": round(sum(v for k, v in timings.items() if k != "evaluate"), 1),
    }  # fmt: skip
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    acc, ratios = report["accuracy"], report["ratios"]
    log(
        f"done in {report['build_seconds']} s: original {acc['original']:.4f}, fused "
        f"{acc['fused']:.4f}, size {ratios['size']:.1f}x, latency {ratios['latency']:.1f}x"
    )
    warning = accuracy_warning(acc["original"], acc["fused"], settings)
    if warning:
        log(warning)
    return report


def accuracy_warning(original: float, fused: float, settings: BuildSettings) -> str | None:
    """A warning with the flags to try when the fused model lost more than
    ``DROP_WARNING_PT`` points against the original, else None."""
    drop = 100.0 * (original - fused)
    if drop <= DROP_WARNING_PT:
        return None
    longer = (
        f"--sub-epochs {2 * settings.sub_epochs}"
        if settings.sub_epochs is not None
        else f"--sub-steps {2 * sub_steps_of(settings)}"
    )
    return (
        f"WARNING: the fused model is {drop:.1f} points below the original (more than "
        f"{DROP_WARNING_PT:.0f}); train the sub-models longer ({longer}) or prune less (a "
        f"larger --param-budget), and rebuild"
    )


def own_task_accuracies(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray,
    sub_vits: list[VisionTransformer],
    threads: int,
) -> dict[str, float]:
    """Each sub-model's accuracy on its own sub-task: ONNX features through its training head,
    folded to the subset's classes + 'other'."""
    own: dict[str, float] = {}
    for spec, vit in zip(bundle.manifest.submodels, sub_vits, strict=True):
        features = batched(FeatureExtractor(bundle.path(spec.file), threads), images)
        with torch.no_grad():
            logits = vit.head(torch.from_numpy(features))
            folded = fold_log_probs(logits, spec.classes).numpy()
        own[spec.id] = accuracy(folded, own_task_labels(labels, tuple(spec.classes)))
    return own


def extract_features(bundle: Bundle, images: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """Every sub-model's ONNX features of ``images``, in manifest order."""
    return [
        batched(FeatureExtractor(bundle.path(s.file), threads), images)
        for s in bundle.manifest.submodels
    ]
