"""What decides a build: its settings, their defaults by dataset and by device count, and
their checks; the files a bundle holds."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from edvit.errors import ConfigError

from .train import Augment, TrainConfig
from .vit import SIZES

ORIGINAL_FILE = "original.onnx"
ORIGINAL_WEIGHTS = "original.pt"  # the original's state_dict, for --checkpoint reuse
FUSION_FILE = "fusion.onnx"
SUBMODEL_DIR = "submodels"
BUDGET_SHARE = 0.95  # default budget: this share of original_params / N
CLASS_LIST = "classes"  # the dataset an untrained build names when given --classes
LATENCY_RUNS = 50  # timed ONNX Runtime runs per model and median latency
# An untrained build measures models of real scale (ViT-B: ~0.5 s a run on one core): fewer.
UNTRAINED_LATENCY_RUNS = 20


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides what a build produces (with the seed)."""

    dataset: str
    num_devices: int = 3
    devices_file: str | None = None
    checkpoint: str | None = None
    model: str | None = None  # a registered timm ViT name; needs checkpoint, excludes size
    size: str | None = "test"
    epochs: int = 20
    sub_epochs: int | None = None  # default: enough epochs for sub_steps optimizer steps
    sub_steps: int | None = None  # default: default_sub_steps(num_devices)
    fusion_epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    sub_lr: float = 2e-3
    fusion_lr: float = 2e-3
    label_smoothing: float = 0.1
    augment_shift: int = 0  # original's training: random shifts of up to this many pixels
    augment_flip: bool = False  # original's training: random horizontal flips
    fusion_hidden: int | None = None  # default: sized below the largest sub-model
    fusion_drop_prob: float = 0.25
    param_budget: int | None = None  # per sub-model; default floor(0.95 * original / N)
    embed_keep_ratio: float | None = None  # default by N (default_embed_keep_ratio)
    keep_branches: int | None = None  # default by N (default_keep_branches)
    prune_steps: int = 2
    recover_epochs: int | None = None  # default: enough epochs for recover_steps steps
    recover_steps: int = 300
    # 'other' images per sub-model, in average own-class sizes; None: every image. Measured on
    # digits N=3: all images lift the sub-models' own-task accuracy from 81-88% to 93-96%.
    other_ratio: float | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0
    budget_rounds: int = 3
    shared_blocks: int = 0  # K: stem kept whole, frozen and exported as slices
    latency_runs: int | None = None  # ORT runs per median latency; default by UNTRAINED
    seed: int = 0
    threads: int | None = None
    jobs: int = 1  # sub-models trained at once, each in its own process
    device: str = "auto"  # where torch trains: auto (CUDA if present), cpu, cuda[:N]
    data_dir: str | None = None
    command: tuple[str, ...] = field(default=())
    # --untrained: the --model with random weights, pruned to the budget without training or
    # reading images (models/build_untrained.py), for capacity planning.
    untrained: bool = False
    img_size: int | None = None  # untrained: input side in pixels (default: the model's)
    classes: tuple[str, ...] | None = None  # untrained: class names instead of the dataset's
    model_kwargs: dict[str, object] = field(default_factory=dict)  # untrained: timm overrides


# Measured defaults (README "ED-ViT: class-wise pruning at the defaults"; benchmarks/ed_vit.py
# reproduces them).
# Digits: the "small" preset (98% original; the "test" preset's 93% original left the 5k-param
# sub-models of N=3 1-5 points behind). Fashion-MNIST: 40 epochs with shifts and flips
# converge the original to >= 90%. Sub-models train for --sub-steps steps whatever N and the
# dataset size (epochs_for_steps). cifar10 and imagefolder are not measured here.
DEFAULTS: dict[str, dict[str, object]] = {
    "digits": dict(size="small", epochs=20, fusion_epochs=30, batch_size=32, lr=3e-3),
    "fashion-mnist": dict(
        size="small",
        epochs=40,
        augment_shift=2,
        augment_flip=True,
        fusion_epochs=10,
        batch_size=128,
    ),
    "cifar10": dict(
        size="small",
        epochs=40,
        augment_shift=4,
        augment_flip=True,
        fusion_epochs=10,
        batch_size=128,
    ),
    "imagefolder": dict(size="small", epochs=10, fusion_epochs=10, batch_size=64),
}


def default_settings(dataset: str, **overrides: object) -> BuildSettings:
    """The dataset's default settings with ``overrides`` (None values are ignored).
    ``CLASS_LIST`` stands for the dataset of an untrained build given ``classes``."""
    if dataset == CLASS_LIST:
        values: dict[str, object] = {}
    elif dataset in DEFAULTS:
        values = dict(DEFAULTS[dataset])
    else:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(DEFAULTS)}")
    if overrides.get("model") is not None:
        values["size"] = None  # the model is the user's: no preset (an explicit size is an error)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("latency_runs") is None:
        values["latency_runs"] = UNTRAINED_LATENCY_RUNS if values.get("untrained") else LATENCY_RUNS
    return BuildSettings(dataset=dataset, **values)  # type: ignore[arg-type]


def log(message: str) -> None:
    print(f"[edvit build] {message}", file=sys.stderr, flush=True)


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the seconds the ``with`` body takes as ``timings[phase]``."""
    mark = time.time()
    yield
    timings[phase] = time.time() - mark


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


def default_param_budget(original_params: int, num_devices: int) -> int:
    return math.floor(BUDGET_SHARE * original_params / num_devices)


def default_sub_steps(num_devices: int) -> int:
    """Distillation steps per sub-model: 3000 up to N=3, then 1200 per device (6000 at N=5).
    From N=5 the embedding is halved (default_embed_keep_ratio) and the narrower sub-models
    need longer: Fashion-MNIST N=5 ended 1.3 points below the original after 3000 steps,
    0.5 points after 6000 (README, "ED-ViT")."""
    return 3000 if num_devices <= 3 else 1200 * num_devices


def runs_of(settings: BuildSettings) -> int:
    """Timed runs per latency: the settings', else the default for the kind of build."""
    if settings.latency_runs is not None:
        return settings.latency_runs
    return UNTRAINED_LATENCY_RUNS if settings.untrained else LATENCY_RUNS


def sub_steps_of(settings: BuildSettings) -> int:
    if settings.sub_steps is not None:
        return settings.sub_steps
    return default_sub_steps(settings.num_devices)


def default_embed_keep_ratio(num_devices: int) -> float:
    if num_devices <= 2:
        return 1.0
    return 0.75 if num_devices <= 4 else 0.5


def default_keep_branches(total_branches: int, num_devices: int) -> int:
    return max(2, min(total_branches, math.floor(2 * total_branches / num_devices)))


def validate_untrained(settings: BuildSettings) -> None:
    """--untrained needs a timm --model and no checkpoint; --img-size, --classes and timm
    overrides need --untrained."""
    if not settings.untrained:
        for value, what in (
            (settings.img_size, "--img-size"),
            (settings.classes, "--classes"),
            (settings.model_kwargs or None, "timm overrides (model_kwargs)"),
        ):
            if value is not None:
                raise ConfigError(f"{what} needs --untrained: a checkpoint fixes its model")
        if settings.dataset == CLASS_LIST:
            raise ConfigError(f"dataset {CLASS_LIST!r} is for --untrained builds given --classes")
        return
    if settings.model is None:
        raise ConfigError(
            "--untrained needs --model TIMM_NAME, e.g. vit_base_patch16_224 (timm.list_models("
            "'vit_*') lists them)"
        )
    if settings.checkpoint is not None:
        raise ConfigError(
            "--untrained and --checkpoint exclude each other: --untrained uses random weights"
        )
    if settings.img_size is not None and settings.img_size < 1:
        raise ConfigError("--img-size must be at least 1")
    if settings.classes is not None:
        if settings.dataset != CLASS_LIST:
            raise ConfigError("--dataset and --classes exclude each other: name the classes once")
        names = settings.classes
        if not names or any(not name.strip() for name in names):
            raise ConfigError("--classes needs comma-separated, non-empty class names")
        if len(set(names)) != len(names):
            raise ConfigError(f"--classes names a class twice: {', '.join(names)}")
    elif settings.dataset == CLASS_LIST:
        raise ConfigError("--dataset or --classes is needed: where the class names come from")


def validate(settings: BuildSettings) -> None:
    validate_untrained(settings)
    if settings.model is not None:
        if settings.checkpoint is None and not settings.untrained:
            raise ConfigError(
                f"--model {settings.model} needs --checkpoint: the weights you fine-tuned "
                "(edvit does not download weights), or --untrained for random weights"
            )
        if settings.size is not None:
            raise ConfigError(
                f"--model and --size exclude each other: --model {settings.model} is the "
                f"architecture, --size {settings.size} a preset"
            )
    elif settings.size not in SIZES:
        raise ConfigError(f"unknown --size {settings.size!r}: choose one of {', '.join(SIZES)}")
    for name in ("epochs", "batch_size", "prune_steps", "budget_rounds"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("sub_epochs", "sub_steps", "fusion_epochs", "recover_epochs", "recover_steps"):
        value = getattr(settings, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    if settings.augment_shift < 0:
        raise ConfigError("--augment-shift must not be negative")
    if settings.fusion_hidden is not None and settings.fusion_hidden < 1:
        raise ConfigError("--fusion-hidden must be at least 1")
    if settings.threads is not None and settings.threads < 1:
        raise ConfigError("--threads must be at least 1")
    if settings.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    if runs_of(settings) < 1:
        raise ConfigError("--latency-runs must be at least 1")
    if not 0.0 <= settings.fusion_drop_prob < 1.0:
        raise ConfigError("--fusion-drop-prob must be in [0, 1)")
    if settings.embed_keep_ratio is not None and not 0.0 < settings.embed_keep_ratio <= 1.0:
        raise ConfigError("--embed-keep-ratio must be in (0, 1]")
    if settings.size is not None:
        validate_shared_blocks(settings, SIZES[settings.size].depth, f"--size {settings.size}")
    if settings.shared_blocks and settings.embed_keep_ratio not in (None, 1.0):
        raise ConfigError("--shared-blocks keeps the embedding width: drop --embed-keep-ratio")


def validate_shared_blocks(settings: BuildSettings, depth: int, what: str) -> None:
    if not 0 <= settings.shared_blocks < depth:
        raise ConfigError(f"--shared-blocks must be between 0 and {depth - 1} for {what}")


def train_config(
    settings: BuildSettings, epochs: int, lr: float, seed_offset: int, *, augment: bool = False
) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=settings.batch_size,
        lr=lr,
        label_smoothing=settings.label_smoothing,
        seed=settings.seed + seed_offset,
        device=settings.device,
        augment=Augment(settings.augment_shift, settings.augment_flip) if augment else None,
    )


def epochs_for_steps(steps: int, images: int, batch_size: int) -> int:
    """The epochs that give at least ``steps`` optimizer steps over ``images`` (at least 1,
    or 0 for 0 steps): sub-task data shrinks as N grows, so a fixed number of epochs would
    train the sub-models of a large N far less than those of a small one."""
    if steps <= 0:
        return 0
    return max(1, math.ceil(steps / math.ceil(images / batch_size)))


def subset_epochs(settings: BuildSettings, images: int) -> tuple[int, int]:
    """(recovery epochs after each pruning step, final fine-tuning epochs) for a sub-model
    trained on ``images`` images: the settings' epochs if given, else from their steps."""
    recover = settings.recover_epochs
    if recover is None:
        recover = epochs_for_steps(settings.recover_steps, images, settings.batch_size)
    fine_tune = settings.sub_epochs
    if fine_tune is None:
        fine_tune = epochs_for_steps(sub_steps_of(settings), images, settings.batch_size)
    return recover, fine_tune
