"""`edvit build`: train the original ViT, split it into class-specific sub-models, train the
fusion MLP, export everything to ONNX and write a verified bundle with its report.

No pruning yet: every sub-model is a full copy of the original, fine-tuned to tell its own
classes apart from 'other' (every class outside its subset).

Preprocessing: one grey channel at the dataset's own size, normalised with the mean and std
of the training images (computed here, stored in the manifest), through
``edvit.preprocess.dataset_to_model_input`` exactly as the edge nodes do.

Evaluation runs the exported ONNX files through ``edvit.inference`` on the full test split.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import edvit
from edvit.bundle import MANIFEST_NAME, REPORT_NAME, Bundle, Manifest, sha256_file
from edvit.datasets import Dataset, load_dataset
from edvit.errors import ConfigError
from edvit.inference import Classifier, FeatureExtractor, OfflinePredictor
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import Preprocessing

from .export import export_fusion, export_image_model
from .train import TrainConfig, fit, predict, set_threads
from .vit import (
    SIZES,
    FusionMLP,
    SubModel,
    architecture_name,
    count_params,
    make_vit,
    replace_head,
)

ORIGINAL_FILE = "original.onnx"
FUSION_FILE = "fusion.onnx"
SUBMODEL_DIR = "submodels"
PARITY_SAMPLES = 64
EVAL_BATCH = 500


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides what a build produces (with the seed)."""

    dataset: str
    num_devices: int = 3
    size: str = "test"
    epochs: int = 20
    sub_epochs: int = 5
    fusion_epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    sub_lr: float = 1e-3
    fusion_lr: float = 2e-3
    label_smoothing: float = 0.1
    fusion_hidden: int = 256
    fusion_drop_prob: float = 0.0
    seed: int = 0
    threads: int | None = None
    data_dir: str | None = None
    command: tuple[str, ...] = field(default=())


# Digits: ~17 s for CI and integration tests. Fashion-MNIST: ~18 min on 2 (shared) cores; the
# shipped bundle models/bundles/fashion-mnist-3 was built with these defaults.
DEFAULTS: dict[str, dict[str, object]] = {
    "digits": dict(size="test", epochs=20, sub_epochs=4, fusion_epochs=30, batch_size=32, lr=3e-3),
    "fashion-mnist": dict(size="small", epochs=8, sub_epochs=2, fusion_epochs=10, batch_size=128),
}


def default_settings(dataset: str, **overrides: object) -> BuildSettings:
    """The dataset's default settings with ``overrides`` (None values are ignored)."""
    if dataset not in DEFAULTS:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(DEFAULTS)}")
    values = dict(DEFAULTS[dataset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BuildSettings(dataset=dataset, **values)  # type: ignore[arg-type]


def log(message: str) -> None:
    print(f"[edvit build] {message}", file=sys.stderr, flush=True)


def split_classes(num_classes: int, num_devices: int) -> list[tuple[int, ...]]:
    """Contiguous near-equal class subsets, one per device."""
    if not 1 <= num_devices <= num_classes:
        raise ConfigError(
            f"--num-devices must be between 1 and the number of classes ({num_classes}), "
            f"got {num_devices}"
        )
    return [
        tuple(int(c) for c in part) for part in np.array_split(np.arange(num_classes), num_devices)
    ]


def compute_preprocessing(train: Dataset) -> Preprocessing:
    if train.images.ndim != 3:
        raise ConfigError(f"{train.name}: only grey datasets are supported by edvit build")
    pixels = train.images.astype(np.float64) / 255.0
    _, height, width = train.images.shape
    return Preprocessing(
        channels=1,
        height=height,
        width=width,
        mean=(float(pixels.mean()),),
        std=(float(max(pixels.std(), 1e-6)),),
        interpolation="area",
    )


def validate(settings: BuildSettings) -> None:
    if settings.size not in SIZES:
        raise ConfigError(f"unknown --size {settings.size!r}: choose one of {', '.join(SIZES)}")
    for name in ("epochs", "batch_size"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("sub_epochs", "fusion_epochs"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError("--threads must be at least 1")


def own_task_labels(labels: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """Class c of ``subset`` -> its position in the subset; every other class -> len(subset)."""
    mapped = np.full(len(labels), len(subset), dtype=np.int64)
    for i, c in enumerate(subset):
        mapped[labels == c] = i
    return mapped


def balanced_subset_indices(
    labels: np.ndarray, subset: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """All images of ``subset`` plus an 'other' sample as large as one of its classes on average."""
    own = np.flatnonzero(np.isin(labels, subset))
    other = np.flatnonzero(~np.isin(labels, subset))
    n_other = min(len(other), max(1, len(own) // len(subset)))
    return np.sort(np.concatenate([own, rng.choice(other, n_other, replace=False)]))


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force``; with it, remove only bundle files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out} is not empty; pass --force to overwrite the bundle")
        for name in (MANIFEST_NAME, REPORT_NAME, ORIGINAL_FILE, FUSION_FILE):
            (out / name).unlink(missing_ok=True)
        sub_dir = out / SUBMODEL_DIR
        if sub_dir.is_dir():
            for onnx_file in sub_dir.glob("*.onnx"):
                onnx_file.unlink()
    out.mkdir(parents=True, exist_ok=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def batched(fn, images: np.ndarray) -> np.ndarray:  # noqa: ANN001 - any batch callable
    return np.concatenate(
        [fn(images[i : i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH)]
    )


def build_bundle(settings: BuildSettings, out: str | Path, *, force: bool = False) -> dict:
    """Build a bundle into ``out``; returns the report (also written to report.json)."""
    validate(settings)
    out = Path(out)
    started = time.time()
    threads = set_threads(settings.threads)
    log(f"{settings.dataset}: loading train and test splits")
    train = load_dataset(settings.dataset, "train", settings.data_dir)
    test = load_dataset(settings.dataset, "test", settings.data_dir)
    class_names = train.class_names
    num_classes = len(class_names)
    subsets = split_classes(num_classes, settings.num_devices)
    prepare_out_dir(out, force)

    pp = compute_preprocessing(train)
    if pp.height != pp.width:
        raise ConfigError(f"{settings.dataset}: only square images are supported")
    x_train_np = dataset_to_model_input(train.images, pp)
    x_test_np = dataset_to_model_input(test.images, pp)
    x_train = torch.from_numpy(x_train_np)
    y_train = torch.from_numpy(train.labels)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)

    def config(epochs: int, lr: float, seed_offset: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            batch_size=settings.batch_size,
            lr=lr,
            label_smoothing=settings.label_smoothing,
            seed=settings.seed + seed_offset,
        )

    # 1. The original ViT on all classes.
    vit = make_vit(settings.size, pp.height, pp.channels, num_classes)
    log(f"training the original ViT ({count_params(vit)} params, {settings.epochs} epochs)")
    train_start = time.time()
    fit(vit, vit, [x_train], y_train, config(settings.epochs, settings.lr, 0), "original")

    # 2. One sub-model per class subset: a copy of the original with a (k+1)-way head.
    submodels: list[SubModel] = []
    ids = [f"sub{i}" for i in range(len(subsets))]
    for i, subset in enumerate(subsets):
        sub_vit = copy.deepcopy(vit)
        replace_head(sub_vit, len(subset) + 1)
        sub = SubModel(sub_vit)
        chosen = balanced_subset_indices(train.labels, subset, rng)
        labels = torch.from_numpy(own_task_labels(train.labels[chosen], subset))
        log(f"fine-tuning {ids[i]} on classes {list(subset)} + other ({len(chosen)} images)")
        fit(
            sub,
            sub.logits,
            [x_train[chosen]],
            labels,
            config(settings.sub_epochs, settings.sub_lr, i + 1),
            ids[i],
        )
        submodels.append(sub)

    # 3. Fusion MLP on the cached features of every training image.
    feature_dims = tuple(s.feature_dim for s in submodels)
    train_features = np.concatenate(
        [
            predict(s, x_train, desc=f"{sid} features")
            for s, sid in zip(submodels, ids, strict=True)
        ],
        axis=1,
    )
    fusion = FusionMLP(
        feature_dims, num_classes, settings.fusion_hidden, drop_prob=settings.fusion_drop_prob
    )
    present = torch.ones(len(train_features), len(submodels))
    log(f"training the fusion MLP ({count_params(fusion)} params, {settings.fusion_epochs} epochs)")
    fit(
        fusion,
        fusion,
        [torch.from_numpy(train_features), present],
        y_train,
        config(settings.fusion_epochs, settings.fusion_lr, 100),
        "fusion",
    )
    train_seconds = time.time() - train_start

    # 4. Export and parity-check every model on real test inputs.
    sample = x_test_np[:PARITY_SAMPLES]
    files: dict[str, str] = {}
    parity: dict[str, float] = {}
    exporters: dict[str, str] = {}
    log("exporting ONNX files and checking parity with torch")
    exporters[ORIGINAL_FILE], parity[ORIGINAL_FILE] = export_image_model(
        vit, out / ORIGINAL_FILE, sample, features=False
    )
    sub_files = [f"{SUBMODEL_DIR}/{sid}.onnx" for sid in ids]
    for sub, rel in zip(submodels, sub_files, strict=True):
        exporters[rel], parity[rel] = export_image_model(sub, out / rel, sample, features=True)
    with torch.no_grad():
        sample_features = np.concatenate(
            [s(torch.from_numpy(sample)).numpy() for s in submodels], axis=1
        )
    sample_present = np.ones((len(sample), len(submodels)), dtype=np.float32)
    sample_present[1::3, len(submodels) - 1] = 0.0  # check the masking path too
    exporters[FUSION_FILE], parity[FUSION_FILE] = export_fusion(
        fusion, out / FUSION_FILE, sample_features, sample_present
    )
    for rel in (ORIGINAL_FILE, *sub_files, FUSION_FILE):
        files[rel] = sha256_file(out / rel)

    # 5. Manifest.
    params = {
        "original": count_params(vit),
        "submodels": {sid: count_params(s) for s, sid in zip(submodels, ids, strict=True)},
        "fusion": count_params(fusion),
    }
    manifest = Manifest(
        name=f"{settings.dataset}-{len(subsets)}",
        dataset=settings.dataset,
        class_names=class_names,
        class_subsets=tuple(subsets),
        preprocessing=pp,
        input_shape=(pp.channels, pp.height, pp.width),
        original={
            "file": ORIGINAL_FILE,
            "architecture": architecture_name(settings.size, pp.height, pp.channels),
            "params": params["original"],
        },
        submodels=tuple(
            {
                "id": sid,
                "classes": subset,
                "file": rel,
                "feature_dim": s.feature_dim,
                "params": params["submodels"][sid],
            }
            for sid, subset, rel, s in zip(ids, subsets, sub_files, submodels, strict=True)
        ),
        fusion={
            "file": FUSION_FILE,
            "feature_dims": feature_dims,
            "hidden_dim": fusion.hidden_dim,
            "params": params["fusion"],
        },
        files=files,
        command=settings.command or ("edvit", "build", "--dataset", settings.dataset),
        seed=settings.seed,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edvit_version=edvit.__version__,
    )
    (out / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")

    # 6. Evaluate the exported files on the full test split, as the fleet would run them.
    log(f"evaluating the ONNX files on {len(test)} test images")
    report_data = evaluate(out, x_test_np, test.labels, submodels, subsets, threads)
    report = {
        "dataset": settings.dataset,
        "num_devices": len(subsets),
        "test_images": int(len(test)),
        **report_data,
        "params": params,
        "bytes": {rel: (out / rel).stat().st_size for rel in files},
        "bytes_total": int(sum((out / rel).stat().st_size for rel in files)),
        "onnx_parity_max_abs_diff": parity,
        "onnx_exporter": exporters,
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.time() - started, 1),
        "threads": threads,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("command",)},
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    acc = report["accuracy"]
    seconds = report["build_seconds"]
    log(f"done in {seconds} s: original {acc['original']:.4f}, fused {acc['fused']:.4f}")
    return report


def evaluate(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    submodels: list[SubModel],
    subsets: list[tuple[int, ...]],
    threads: int,
) -> dict:
    """Accuracies from the exported ONNX files (through edvit.inference) on ``images``.

    A sub-model's own-task accuracy uses its ONNX features and its (k+1)-way training head,
    applied here in numpy since the head is not part of the exported sub-model.
    """
    bundle = Bundle.load(out)
    original = Classifier(bundle.path(bundle.manifest.original.file), threads)
    predictor = OfflinePredictor(bundle, threads)
    blocks = [batched(extract, images) for extract in predictor.extractors]
    own: dict[str, float] = {}
    missing: dict[str, float] = {}
    for i, (spec, sub, subset) in enumerate(
        zip(bundle.manifest.submodels, submodels, subsets, strict=True)
    ):
        head = sub.vit.head
        weight = head.weight.detach().numpy()
        bias = head.bias.detach().numpy()
        own[spec.id] = accuracy(blocks[i] @ weight.T + bias, own_task_labels(labels, subset))
        without = [None if j == i else blk for j, blk in enumerate(blocks)]
        if len(blocks) > 1:
            missing[spec.id] = accuracy(predictor.fusion(without), labels)
    fused_logits = np.concatenate(
        [
            predictor.fused_logits(images[i : i + EVAL_BATCH])
            for i in range(0, len(images), EVAL_BATCH)
        ]
    )
    return {
        "accuracy": {
            "original": accuracy(batched(original, images), labels),
            "fused": accuracy(fused_logits, labels),
        },
        "submodel_accuracy_on_own_task": own,
        "fused_accuracy_without_submodel": missing,
    }


def extract_features(bundle: Bundle, images: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """Every sub-model's ONNX features of ``images``, in manifest order."""
    return [
        batched(FeatureExtractor(bundle.path(s.file), threads), images)
        for s in bundle.manifest.submodels
    ]


TINY_DIGITS = dict(size="test", epochs=15, sub_epochs=3, fusion_epochs=20, batch_size=64, lr=2e-3)


def build_tiny_digits_bundle(out: str | Path, **overrides: object) -> dict:
    """A small digits bundle in a few seconds, for tests; returns its report."""
    values = {**TINY_DIGITS, **overrides}
    command = ("edvit", "build", "--dataset", "digits", "--out", str(out))
    settings = default_settings("digits", command=command, **values)
    return build_bundle(settings, out, force=bool(values.get("force", False)))
