"""`edvit build`: the ED-ViT pipeline. Train (or load) the original ViT, split its classes over
N devices, prune one class-specific sub-model per subset, fine-tune it with distillation,
place the sub-models on the devices, train the fusion MLP, export everything to ONNX and
write a verified bundle with its report.

Sub-models (``make_submodel``). For a class subset S, the data is every training image (or,
with ``other_ratio``, the images of S plus a sample of the rest); its task is |S| classes +
'other'. A sub-model
keeps the original's 10-way head during training and reads it *folded* to the sub-task
(``train.fold_log_probs``: the classes of S, then 'other' = the sum of the rest), so the
teacher and the student speak the same sub-task with no new head to learn.

1. Branch dropping. The original's heads and MLP neurons are scored on the subset's data
   (first-order Taylor, ``prune.score_units``) with the *sub-task cross-entropy*: at this
   point the student is the teacher, so a distillation loss would have zero gradient. Whole
   attention / MLP branches with the lowest summed scores are removed until
   ``keep_branches`` remain (default ``max(2, floor(2 * branches / N))``, at least one
   attention branch). Why: on the ORT CPU runtime at batch 1 the latency of these small ViTs
   is mostly per-operator overhead (measured: the 'small' preset pruned to 1/10 of its
   parameters but keeping all 12 branches is only 2.3x faster; keeping 4 branches 4.7x), so
   the latency target (original / slowest sub-model >= N/2) needs fewer operators, not only
   fewer parameters.
2. Parameter budget. Then ``prune.iterative_prune`` removes heads and neurons (ranked by
   Taylor score per parameter freed) and embedding channels in ``prune_steps`` geometric
   steps down to ``param_budget`` (default ``floor(0.95 * original_params / N)``: every
   sub-model is at least N times smaller and their sum stays below the original), with
   ``recover_epochs`` of distillation fine-tuning after each step. The embedding keeps
   ``embed_keep_ratio`` of its channels (by N: 1.0 up to 2 devices, 0.75 up to 4, else 0.5),
   narrowed further if the budget cannot be met otherwise.
3. Recovery. Fine-tuning with knowledge distillation from the original:
   ``alpha * CE + (1 - alpha) * T^2 * KL`` on the folded probabilities (``train.Distillation``),
   for ``sub_steps`` optimizer steps (``recover_steps`` after each pruning step) whatever the
   dataset size (default ``default_sub_steps(N)``: 3000 up to N=3, 1200 per device beyond),
   unless ``sub_epochs`` / ``recover_epochs`` fix the epochs.

Placement. Each exported sub-model is an item (ONNX file MB, measured ORT latency at batch 1,
one thread) for ``assignment.assign`` on the inventory (``--devices`` file or N identical
devices). When nothing fits, ``assignment.shrink_budgets`` gives smaller memory budgets; the
sub-models concerned are pruned again from the original to the matching parameter budget
(MB over the sub-model's bytes per parameter) and retrained, up to ``budget_rounds`` times.

Fusion. The MLP over the concatenated features is distilled from the original's logits with
whole sub-model blocks dropped at random (``fusion_drop_prob``), so the fleet still answers
with a node down. Its hidden width is the widest that keeps it at most ``FUSION_SHARE`` of the
largest sub-model (``vit.fusion_hidden_for``): it runs on a board too.

Preprocessing: the dataset's own channels (grey or RGB) and size, normalised with the
per-channel mean and std of the training images, through
``edvit.preprocess.dataset_to_model_input`` exactly as the edge nodes do.

A user's own model (``--model NAME --checkpoint FILE``): the original is timm's registered
``NAME`` with the input size, patch size, channels and classes its checkpoint's tensors say
(``vit.load_timm_checkpoint``); it is never trained or downloaded. Its head must have one
class per dataset class. Preprocessing is then the model's, not the data's: images resized to
its input size, normalised with the mean and std of the name's pretrained config (what timm
fine-tunes with). The rest (pruning budgets, placement, fusion) is read from the model itself.
"""

from __future__ import annotations

import ctypes
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
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
from edvit.datasets import Dataset, load_dataset
from edvit.errors import ConfigError
from edvit.inference import FeatureExtractor
from edvit.placement.assignment import Infeasible, Item, assign, shrink_budgets
from edvit.placement.devices import Inventory, identical_devices, load_inventory
from edvit.placement.plan import write_assignment
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import Preprocessing

from .export import export_fusion, export_image_model
from .prune import (
    PruneSpec,
    check_supported,
    count_params_after,
    describe,
    full_spec,
    iterative_prune,
    prune_vit,
    score_units,
)
from .slices import export_stem
from .train import (
    Augment,
    Distillation,
    SubtaskCrossEntropy,
    TrainConfig,
    fit,
    fold_log_probs,
    predict,
    resolve_device,
    set_threads,
)
from .vit import (
    SIZES,
    FusionMLP,
    SubModel,
    TimmModel,
    architecture_name,
    check_patch_size,
    count_params,
    fusion_hidden_for,
    load_checkpoint,
    load_timm_checkpoint,
    make_vit,
)

ORIGINAL_FILE = "original.onnx"
ORIGINAL_WEIGHTS = "original.pt"  # the original's state_dict, for --checkpoint reuse
FUSION_FILE = "fusion.onnx"
SUBMODEL_DIR = "submodels"
PARITY_SAMPLES = 64
EVAL_BATCH = 500
SCORE_BATCHES = 8  # batches of scoring data per Taylor importance estimate
SCORE_BATCH_SIZE = 128
BUDGET_SHARE = 0.95  # default budget: this share of original_params / N
PR_SET_PDEATHSIG = 1  # linux/prctl.h
FUSION_SHARE = 0.5  # default fusion: at most this share of the largest sub-model's params
MIN_EMBED = 8


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
    latency_runs: int = 50
    seed: int = 0
    threads: int | None = None
    jobs: int = 1  # sub-models trained at once, each in its own process
    device: str = "auto"  # where torch trains: auto (CUDA if present), cpu, cuda[:N]
    data_dir: str | None = None
    command: tuple[str, ...] = field(default=())


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
DROP_WARNING_PT = 1.0  # the build warns when the fused model is further below the original


def default_settings(dataset: str, **overrides: object) -> BuildSettings:
    """The dataset's default settings with ``overrides`` (None values are ignored)."""
    if dataset not in DEFAULTS:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(DEFAULTS)}")
    values = dict(DEFAULTS[dataset])
    if overrides.get("model") is not None:
        values["size"] = None  # the model is the user's: no preset (an explicit size is an error)
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


def default_param_budget(original_params: int, num_devices: int) -> int:
    return math.floor(BUDGET_SHARE * original_params / num_devices)


def default_sub_steps(num_devices: int) -> int:
    """Distillation steps per sub-model: 3000 up to N=3, then 1200 per device (6000 at N=5).
    From N=5 the embedding is halved (default_embed_keep_ratio) and the narrower sub-models
    need longer: Fashion-MNIST N=5 ended 1.3 points below the original after 3000 steps,
    0.5 points after 6000 (README, "ED-ViT")."""
    return 3000 if num_devices <= 3 else 1200 * num_devices


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


def compute_preprocessing(train: Dataset) -> Preprocessing:
    """Channels and size from the data; per-channel mean and std of the training images."""
    images = train.images
    if images.ndim == 3:
        images = images[..., None]
    _, height, width, channels = images.shape
    pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
    return Preprocessing(
        channels=channels,
        height=height,
        width=width,
        mean=tuple(float(m) for m in pixels.mean(axis=0)),
        std=tuple(float(max(s, 1e-6)) for s in pixels.std(axis=0)),
        interpolation="area",
    )


def model_preprocessing(model: TimmModel, train: Dataset) -> Preprocessing:
    """A user's model: its channels and input size, normalised as its pretrained config says;
    images are resized to it (area when shrinking, linear when enlarging)."""
    side = model.img_size
    mean, std = model.mean_std
    shrinking = min(train.images.shape[1:3]) >= side
    return Preprocessing(
        channels=model.in_chans,
        height=side,
        width=side,
        mean=mean,
        std=std,
        interpolation="area" if shrinking else "linear",
    )


def validate(settings: BuildSettings) -> None:
    if settings.model is not None:
        if settings.checkpoint is None:
            raise ConfigError(
                f"--model {settings.model} needs --checkpoint: the weights you fine-tuned "
                "(edvit does not download weights)"
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


def own_task_labels(labels: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """Class c of ``subset`` -> its position in the subset; every other class -> len(subset)."""
    mapped = np.full(len(labels), len(subset), dtype=np.int64)
    for i, c in enumerate(subset):
        mapped[labels == c] = i
    return mapped


def balanced_subset_indices(
    labels: np.ndarray,
    subset: tuple[int, ...],
    rng: np.random.Generator,
    other_ratio: float | None = 1.0,
) -> np.ndarray:
    """All images of ``subset`` plus an 'other' sample ``other_ratio`` times as large as one of
    its classes on average (every 'other' image when that is more than there are, or when
    ``other_ratio`` is None)."""
    own = np.flatnonzero(np.isin(labels, subset))
    other = np.flatnonzero(~np.isin(labels, subset))
    if len(other) == 0 or other_ratio is None:
        return np.sort(np.concatenate([own, other]))
    n_other = min(len(other), max(1, round(other_ratio * len(own) / len(subset))))
    return np.sort(np.concatenate([own, rng.choice(other, n_other, replace=False)]))


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


def load_inventory_for(settings: BuildSettings) -> Inventory:
    """The --devices file's inventory, or --num-devices identical devices."""
    if settings.devices_file is not None:
        return load_inventory(settings.devices_file)
    return identical_devices(settings.num_devices)


# ---------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class BuildData:
    """The datasets, the device inventory, the class subsets (one per device) and the
    preprocessing of one build."""

    train: Dataset
    test: Dataset
    inventory: Inventory
    subsets: list[tuple[int, ...]]
    preprocessing: Preprocessing

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)

    @property
    def num_devices(self) -> int:
        return len(self.inventory.devices)


def load_data(settings: BuildSettings, user: TimmModel | None = None) -> BuildData:
    """The inventory and the datasets; the class split and preprocessing they give (the
    ``user`` model's preprocessing when there is one)."""
    inventory = load_inventory_for(settings)
    train = load_dataset(settings.dataset, "train", settings.data_dir)
    test = load_dataset(settings.dataset, "test", settings.data_dir)
    if user is None:
        pp = compute_preprocessing(train)
        check_patch_size(str(settings.size), pp.height, pp.width)
    else:
        check_class_count(settings, user, train)
        pp = model_preprocessing(user, train)
    subsets = split_classes(len(train.class_names), len(inventory.devices))
    return BuildData(train=train, test=test, inventory=inventory, subsets=subsets, preprocessing=pp)


def load_user_model(settings: BuildSettings) -> TimmModel | None:
    """With --model, timm's model for the --checkpoint (see ``vit.load_timm_checkpoint``),
    checked to be prunable. Loaded before the data and any output: a wrong checkpoint fails
    in one line, before the images are read."""
    if settings.model is None or settings.checkpoint is None:
        return None
    user = load_timm_checkpoint(settings.checkpoint, settings.model)
    try:
        check_supported(user.vit)
    except NotImplementedError as exc:
        raise ConfigError(f"--model {settings.model}: edvit cannot prune it: {exc}") from None
    validate_shared_blocks(settings, len(user.vit.blocks), f"--model {settings.model}")
    return user


def check_class_count(settings: BuildSettings, user: TimmModel, train: Dataset) -> None:
    """The checkpoint's head must classify exactly the dataset's classes."""
    heads, classes = int(user.vit.num_classes), len(train.class_names)
    if heads != classes:
        where = f"--data-dir {settings.data_dir}" if settings.data_dir else settings.dataset
        folders = " class folders" if settings.dataset == "imagefolder" else " classes"
        raise ConfigError(
            f"checkpoint {settings.checkpoint} has a {heads}-class head but {where} has "
            f"{classes}{folders} ({', '.join(train.class_names[:5])}"
            f"{', ...' if classes > 5 else ''}): the model must be fine-tuned on these classes"
        )


def load_original_checkpoint(settings: BuildSettings, data: BuildData) -> VisionTransformer | None:
    """The --checkpoint's ViT of a --size preset, if any. Loaded before any output, so that a
    wrong checkpoint fails in one line."""
    if settings.checkpoint is None or settings.size is None:
        return None
    pp = data.preprocessing
    return load_checkpoint(
        settings.checkpoint, settings.size, pp.height, pp.channels, data.num_classes
    )


def original_call(settings: BuildSettings, data: BuildData, user: TimmModel | None) -> str:
    """What the manifest names the original: the timm call that builds it."""
    if user is not None:
        return user.architecture
    pp = data.preprocessing
    return architecture_name(str(settings.size), pp.height, pp.channels)


@dataclass(frozen=True)
class ModelInputs:
    """The datasets through the build's preprocessing: what the models see."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: np.ndarray


def model_inputs(data: BuildData) -> ModelInputs:
    x_train = dataset_to_model_input(data.train.images, data.preprocessing)
    x_test = dataset_to_model_input(data.test.images, data.preprocessing)
    return ModelInputs(
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(data.train.labels),
        x_test=x_test,
    )


# ---------------------------------------------------------------------------------------------
# The original


def make_original(
    settings: BuildSettings,
    data: BuildData,
    inputs: ModelInputs,
    loaded: VisionTransformer | None,
    out: Path,
) -> VisionTransformer:
    """The --checkpoint's ViT (``loaded``), or a new one trained on every class; its weights
    are saved into ``out`` for --checkpoint reuse."""
    if loaded is not None:
        log(f"the original ViT is {settings.checkpoint} ({count_params(loaded)} params)")
        vit = loaded
    else:
        vit = train_original(settings, data, inputs)
    torch.save(vit.state_dict(), out / ORIGINAL_WEIGHTS)
    return vit


def train_original(
    settings: BuildSettings, data: BuildData, inputs: ModelInputs
) -> VisionTransformer:
    """A new ViT of the settings' size trained on every class with the settings' recipe
    (epochs, learning rate, label smoothing, augmentation)."""
    pp = data.preprocessing
    vit = make_vit(str(settings.size), pp.height, pp.channels, data.num_classes)
    log(
        f"training the original ViT ({count_params(vit)} params, {settings.epochs} epochs "
        f"on {settings.device})"
    )
    config = train_config(settings, settings.epochs, settings.lr, 0, augment=True)
    fit(vit, vit, [inputs.x_train], inputs.y_train, config, "original")
    return vit.eval()


# ---------------------------------------------------------------------------------------------
# Sub-models: prune, recover, fine-tune


@dataclass(frozen=True)
class SubsetData:
    """One subset's training data: images, sub-task labels and the teacher's 10-way logits."""

    subset: tuple[int, ...]
    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor


def subset_data(
    subset: tuple[int, ...],
    x_train: torch.Tensor,
    labels: np.ndarray,
    teacher_logits: torch.Tensor,
    rng: np.random.Generator,
    other_ratio: float | None = None,
) -> SubsetData:
    chosen = balanced_subset_indices(labels, subset, rng, other_ratio)
    index = torch.from_numpy(chosen)
    return SubsetData(
        subset=subset,
        images=x_train[index],
        labels=torch.from_numpy(own_task_labels(labels[chosen], subset)),
        teacher_logits=teacher_logits[index],
    )


def scoring_batches(data: SubsetData, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A few random batches of the subset's data for one importance estimate."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=generator)
    for b in range(SCORE_BATCHES):
        idx = order[b * SCORE_BATCH_SIZE : (b + 1) * SCORE_BATCH_SIZE]
        if len(idx) == 0:
            return
        yield data.images[idx], data.labels[idx]


def branch_spec(
    vit: VisionTransformer,
    heads: list[torch.Tensor],
    mlp: list[torch.Tensor],
    keep: int,
    frozen_blocks: int = 0,
) -> PruneSpec:
    """Keep the ``keep`` branches (attention or MLP of a block) with the highest summed
    Taylor scores, at least one of them attention; every unit of a kept branch stays.
    Blocks before ``frozen_blocks`` (a shared stem) are kept whole and not counted."""
    spec = full_spec(vit)
    branches = [(float(s.sum()), "heads", b) for b, s in enumerate(heads) if len(s)]
    branches += [(float(s.sum()), "mlp", b) for b, s in enumerate(mlp) if len(s)]
    branches = [branch for branch in branches if branch[2] >= frozen_blocks]
    branches.sort(key=lambda branch: branch[0], reverse=True)
    kept = branches[:keep]
    if not any(kind == "heads" for _, kind, _ in kept):
        best_attention = next(branch for branch in branches if branch[1] == "heads")
        kept = [*kept[: max(0, keep - 1)], best_attention]
    chosen = {(kind, b) for _, kind, b in kept}
    for _, kind, b in branches:
        if (kind, b) not in chosen:
            getattr(spec, kind)[b] = []
    return spec


def stem_parameters(vit: VisionTransformer, shared_blocks: int) -> list[torch.nn.Parameter]:
    """The patch embedding, tokens, position embedding and the first blocks."""
    params = [*vit.patch_embed.parameters(), *vit.norm_pre.parameters()]
    params += [p for p in (vit.cls_token, vit.reg_token, vit.pos_embed) if p is not None]
    for block in vit.blocks[:shared_blocks]:
        params += list(block.parameters())
    return params


def freeze_stem(vit: VisionTransformer, shared_blocks: int) -> None:
    """Sub-models of a sliced build share the original's stem: it must not train."""
    for param in stem_parameters(vit, shared_blocks):
        param.requires_grad_(False)


def count_branches(vit: VisionTransformer) -> int:
    arch = describe(vit)
    return sum(int(blk["heads"] > 0) + int(blk["mlp"] > 0) for blk in arch["blocks"])


def minimum_params(vit: VisionTransformer) -> int:
    """Parameters of the smallest sub-model pruning can make: the narrowest embedding and
    one attention head, nothing else."""
    spec = full_spec(vit)
    spec.embed = spec.embed[:MIN_EMBED]
    spec.heads = [h[:1] if b == 0 else [] for b, h in enumerate(spec.heads)]
    spec.mlp = [[] for _ in spec.mlp]
    return count_params_after(vit, spec)


@dataclass(frozen=True)
class PrunePlan:
    """How far to prune one sub-model."""

    param_budget: int
    embed_keep_ratio: float
    keep_branches: int


def make_submodel(
    original: VisionTransformer,
    data: SubsetData,
    plan: PrunePlan,
    settings: BuildSettings,
    seed_offset: int,
    name: str,
) -> VisionTransformer:
    """Prune ``original`` for ``data``'s sub-task to ``plan`` and fine-tune it (see module doc).

    Raises ValueError when the budget cannot be met even with the narrowest embedding.
    """
    smallest = minimum_params(original)
    if plan.param_budget < smallest:
        raise ValueError(f"{plan.param_budget} params is below the smallest sub-model, {smallest}")
    criterion = Distillation(data.subset, settings.kd_alpha, settings.kd_temperature)
    score_loss = SubtaskCrossEntropy(data.subset)
    frozen = settings.shared_blocks
    recover_epochs, fine_tune_epochs = subset_epochs(settings, len(data.labels))

    def tune(vit: VisionTransformer, epochs: int, what: str) -> VisionTransformer:
        freeze_stem(vit, frozen)
        config = train_config(settings, epochs, settings.sub_lr, seed_offset)
        fit(vit, vit, [data.images], data.labels, config, f"{name} {what}",
            criterion=criterion, targets=[data.teacher_logits])  # fmt: skip
        return vit.eval()

    importance = score_units(
        original, scoring_batches(data, settings.seed), score_loss, embed=False
    )
    spec = branch_spec(
        original, importance.heads, importance.mlp, max(1, plan.keep_branches - 2 * frozen), frozen
    )
    vit = prune_vit(original, spec)
    if count_branches(vit) < count_branches(original):
        vit = tune(vit, recover_epochs, "recover")
    step = iter(range(1, 1000))
    embed_ratio = plan.embed_keep_ratio
    while True:
        try:
            vit = iterative_prune(
                vit,
                lambda: scoring_batches(data, settings.seed + next(step)),
                score_loss,
                param_budget=plan.param_budget,
                steps=settings.prune_steps,
                embed_keep_ratio=embed_ratio,
                min_embed=MIN_EMBED,
                recover=lambda v: tune(v, recover_epochs, "recover"),
                frozen_blocks=frozen,
            )
            break
        except ValueError:
            narrower = max(MIN_EMBED / int(vit.embed_dim), embed_ratio * 0.75)
            if narrower >= embed_ratio:
                raise
            log(f"{name}: budget {plan.param_budget} needs a narrower embedding ({narrower:.2f})")
            embed_ratio = narrower
    return tune(vit, fine_tune_epochs, "fine-tune")


def default_plan(
    settings: BuildSettings, original: VisionTransformer, original_params: int, num_devices: int
) -> PrunePlan:
    """Every sub-model's first plan: the settings, else the defaults by N (see module doc)."""
    total_branches = count_branches(original)
    shared = settings.shared_blocks
    stem_params = sum(p.numel() for p in stem_parameters(original, shared)) if shared else 0
    # With a shared stem only what follows it is split N ways.
    budget = stem_params + default_param_budget(original_params - stem_params, num_devices)
    embed_ratio = settings.embed_keep_ratio or default_embed_keep_ratio(num_devices)
    return PrunePlan(
        param_budget=settings.param_budget or budget,
        embed_keep_ratio=1.0 if shared else embed_ratio,
        keep_branches=settings.keep_branches or default_keep_branches(total_branches, num_devices),
    )


@dataclass
class SubModels:
    """One pruned sub-model per class subset, with the data and the plan it was made from.
    Placement replaces the ``plans`` and ``vits`` of those it has to shrink."""

    ids: list[str]
    data: list[SubsetData]
    plans: dict[str, PrunePlan]
    vits: list[VisionTransformer]

    @property
    def files(self) -> list[str]:
        """Each sub-model's ONNX file, relative to the bundle."""
        return [f"{SUBMODEL_DIR}/{sid}.onnx" for sid in self.ids]


def make_submodels(
    settings: BuildSettings,
    original: VisionTransformer,
    original_params: int,
    data: BuildData,
    inputs: ModelInputs,
    teacher_logits: torch.Tensor,
    threads: int,
) -> SubModels:
    """One pruned, distilled sub-model per class subset (``settings.jobs`` at a time)."""
    ids = [f"sub{i}" for i in range(len(data.subsets))]
    rng = np.random.default_rng(settings.seed)
    training = [
        subset_data(s, inputs.x_train, data.train.labels, teacher_logits, rng, settings.other_ratio)
        for s in data.subsets
    ]
    plan = default_plan(settings, original, original_params, data.num_devices)
    plans = {sid: plan for sid in ids}
    log(f"pruning plan per sub-model: {asdict(plan)} (original {original_params} params)")
    jobs = [
        SubmodelJob(original, subset, plans[sid], settings, i + 1, sid)
        for i, (sid, subset) in enumerate(zip(ids, training, strict=True))
    ]
    workers = min(settings.jobs, len(jobs))
    if workers > 1:
        vits = make_submodels_in_parallel(jobs, workers, threads)
    else:
        vits = [job.run() for job in jobs]
    return SubModels(ids=ids, data=training, plans=plans, vits=vits)


@dataclass(frozen=True)
class SubmodelJob:
    """The arguments of one ``make_submodel`` call, picklable for a worker process."""

    original: VisionTransformer
    data: SubsetData
    plan: PrunePlan
    settings: BuildSettings
    seed_offset: int
    name: str

    def run(self, threads: int | None = None) -> VisionTransformer:
        if threads is not None:  # in a worker process: its share of the cores
            set_threads(threads)
        subset = list(self.data.subset)
        log(f"{self.name}: classes {subset} + other ({len(self.data.labels)} images)")
        vit = make_submodel(
            self.original, self.data, self.plan, self.settings, self.seed_offset, self.name
        )
        if threads is not None:
            log(f"{self.name}: done ({count_params(vit)} params)")
        return vit


def stop_with_parent() -> None:
    """In a worker: be sent SIGTERM when the build's process dies, also when it is killed
    rather than interrupted (Ctrl-C reaches the workers anyway), instead of training on for
    nobody. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def make_submodels_in_parallel(
    jobs: list[SubmodelJob], workers: int, threads: int
) -> list[VisionTransformer]:
    """Train the sub-models ``workers`` at a time, each process with ``threads / workers``
    threads: small sub-models use one core poorly through torch's threads but train
    independently (``--jobs``). Spawned, not forked: a forked torch thread pool can hang."""
    per_worker = max(1, threads // workers)
    log(f"training {len(jobs)} sub-models {workers} at a time, {per_worker} thread(s) each")
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=stop_with_parent) as pool:
        futures = [pool.submit(job.run, per_worker) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------
# Placement


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
        items = measure_items(out, subs.ids, subs.files, image_shape, settings.latency_runs)
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


# ---------------------------------------------------------------------------------------------
# The build


def check_stem_shared(
    original: VisionTransformer, sub_vits: list[VisionTransformer], shared_blocks: int
) -> None:
    """Every sub-model must carry the original's stem bit for bit, or slices would lie."""
    reference = stem_parameters(original, shared_blocks)
    for sub in sub_vits:
        for a, b in zip(reference, stem_parameters(sub, shared_blocks), strict=True):
            if not torch.equal(a, b):
                raise RuntimeError("a sub-model's stem drifted from the original's")


def feature_params(vit: VisionTransformer) -> int:
    """Parameters of the exported feature extractor (the training head is not shipped)."""
    return count_params(vit) - count_params(vit.head)


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
    manifest = Manifest(
        name=f"{settings.dataset}-{len(data.subsets)}",
        dataset=settings.dataset,
        class_names=data.train.class_names,
        class_subsets=tuple(data.subsets),
        preprocessing=pp,
        input_shape=(pp.channels, pp.height, pp.width),
        original={
            "file": ORIGINAL_FILE,
            "architecture": original_architecture,
            "params": params["original"],
            "source": settings.checkpoint or "trained",
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
        bundle, images=x_test, labels=test.labels, threads=1, latency_runs=settings.latency_runs
    )
    own = own_task_accuracies(bundle, x_test, test.labels, sub_vits, threads)
    return Evaluation(figures=figures, own_task=own)


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
        "prune_plans": {sid: asdict(p) for sid, p in subs.plans.items()},
        "placement_rounds": rounds,
        "assignment": json.loads((out / ASSIGNMENT_NAME).read_text()),
        "bytes": {rel: (out / rel).stat().st_size for rel in files},
        "bytes_total": int(sum((out / rel).stat().st_size for rel in files)),
        "onnx_parity_max_abs_diff": exports.parity,
        "onnx_exporter": exports.exporters,
        "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
        "train_seconds": round(sum(v for k, v in timings.items() if k != "evaluate"), 1),
        "build_seconds": round(time.time() - started, 1),
        "threads": threads,
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("command",)},
    }
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


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Record the seconds the ``with`` body takes as ``timings[phase]``."""
    mark = time.time()
    yield
    timings[phase] = time.time() - mark


def build_bundle(settings: BuildSettings, out: str | Path, *, force: bool = False) -> dict:
    """Build a bundle into ``out``; returns the report (also written to report.json)."""
    validate(settings)
    try:
        settings = replace(settings, device=resolve_device(settings.device))
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    out = Path(out)
    started = time.time()
    threads = set_threads(settings.threads)
    user = load_user_model(settings)
    data = load_data(settings, user)
    loaded = user.vit if user is not None else load_original_checkpoint(settings, data)
    prepare_out_dir(out, force)
    log(
        f"{settings.dataset}: {len(data.train)} train and {len(data.test)} test images, "
        f"N={data.num_devices}"
    )
    inputs = model_inputs(data)
    torch.manual_seed(settings.seed)
    timings: dict[str, float] = {}

    # 1. The original ViT on all classes (trained, or the user's checkpoint).
    with timed(timings, "original"):
        original = make_original(settings, data, inputs, loaded, out)
    original_params = count_params(original)
    teacher_logits = torch.from_numpy(
        predict(original, inputs.x_train, desc="teacher logits", device=settings.device)
    )

    # 2. One pruned, distilled sub-model per class subset.
    with timed(timings, "submodels"):
        subs = make_submodels(
            settings, original, original_params, data, inputs, teacher_logits, threads
        )

    # 3. Export the sub-models and place them; shrink and rebuild what does not fit.
    exports = Exports(out=out, sample=inputs.x_test[:PARITY_SAMPLES])
    with timed(timings, "placement"):
        export_submodels(subs, exports)
        rounds = place_submodels(settings, original, subs, data, exports)
    extractors = [SubModel(v) for v in subs.vits]
    stem = export_stem_slices(settings, original, subs, exports)

    # 4. Fusion MLP on the cached features of every training image, blocks dropped at random.
    with timed(timings, "fusion"):
        fusion = train_fusion(
            settings, extractors, subs.ids, inputs.x_train, inputs.y_train, teacher_logits
        )

    # 5. Export the original and the fusion; parity-check on real test inputs.
    export_original_and_fusion(original, fusion, extractors, exports)
    files = shipped_files(out, subs, stem)

    # 6. Manifest.
    params = param_counts(original_params, subs, fusion)
    architectures = {sid: describe(v) for sid, v in zip(subs.ids, subs.vits, strict=True)}
    write_manifest(
        settings,
        out,
        data=data,
        subs=subs,
        extractors=extractors,
        fusion=fusion,
        stem=stem,
        files=files,
        params=params,
        architectures=architectures,
        original_architecture=original_call(settings, data, user),
    )

    # 7. Evaluate the exported files on the full test split, as the fleet would run them.
    with timed(timings, "evaluate"):
        evaluation = evaluate_onnx(settings, out, data.test, inputs.x_test, subs.vits, threads)
    return write_report(
        settings,
        out,
        data=data,
        subs=subs,
        rounds=rounds,
        exports=exports,
        files=files,
        params=params,
        architectures=architectures,
        evaluation=evaluation,
        timings=timings,
        started=started,
        threads=threads,
    )


def train_fusion(
    settings: BuildSettings,
    submodels: list[SubModel],
    ids: list[str],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> FusionMLP:
    """The fusion MLP over every sub-model's features of the training images, distilled from
    the original's logits like the sub-models (on the sub-models' own training images the
    hard labels are too easy to fit: the teacher's soft targets say which classes look
    alike)."""
    num_classes = int(teacher_logits.shape[1])
    features = np.concatenate(
        [
            predict(s, x_train, desc=f"{sid} features", device=settings.device)
            for s, sid in zip(submodels, ids, strict=True)
        ],
        axis=1,
    )
    dims = tuple(s.feature_dim for s in submodels)
    largest = max(feature_params(s.vit) for s in submodels)
    hidden = settings.fusion_hidden or fusion_hidden_for(
        dims, num_classes, int(FUSION_SHARE * largest)
    )
    return fit_fusion(settings, features, dims, hidden, y_train, teacher_logits)


def fit_fusion(
    settings: BuildSettings,
    features: np.ndarray,
    dims: tuple[int, ...],
    hidden: int,
    y_train: torch.Tensor,
    teacher_logits: torch.Tensor,
) -> FusionMLP:
    """A ``hidden``-wide fusion MLP trained on the sub-models' concatenated ``features`` (of
    widths ``dims``) of the training images, distilled from the original's logits."""
    num_classes = int(teacher_logits.shape[1])
    # Seeded here, not by what trained before: a build with --jobs trained its sub-models in
    # other processes, and the fusion must start from the same weights either way.
    config = train_config(settings, settings.fusion_epochs, settings.fusion_lr, 100)
    torch.manual_seed(config.seed)
    fusion = FusionMLP(
        dims,
        num_classes,
        hidden,
        drop_prob=settings.fusion_drop_prob if len(dims) > 1 else 0.0,
    )
    present = torch.ones(len(features), len(dims))
    log(f"training the fusion MLP ({count_params(fusion)} params, {settings.fusion_epochs} epochs)")
    criterion = Distillation(tuple(range(num_classes)), settings.kd_alpha, settings.kd_temperature)
    fit(fusion, fusion, [torch.from_numpy(features), present], y_train, config, "fusion",
        criterion=criterion, targets=[teacher_logits])  # fmt: skip
    return fusion.eval()


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


TINY_DIGITS = dict(size="test", epochs=15, sub_epochs=3, fusion_epochs=20, batch_size=64, lr=2e-3)


def build_tiny_digits_bundle(out: str | Path, **overrides: object) -> dict:
    """A small digits bundle in a few seconds, for tests; returns its report."""
    values = {**TINY_DIGITS, **overrides}
    force = bool(values.pop("force", False))
    command = ("edvit", "build", "--dataset", "digits", "--out", str(out))
    settings = default_settings("digits", command=command, **values)
    return build_bundle(settings, out, force=force)
