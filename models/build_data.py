"""What a build starts from: the datasets, the device inventory, the class subsets, the
preprocessing, a user's model, and the original ViT (trained, or the --checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from edvit.datasets import Dataset, load_dataset
from edvit.errors import ConfigError
from edvit.placement.devices import Inventory, identical_devices, load_inventory
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import Preprocessing

from .build_settings import (
    ORIGINAL_WEIGHTS,
    BuildSettings,
    log,
    split_classes,
    train_config,
    validate_shared_blocks,
)
from .prune import check_supported
from .train import fit
from .vit import (
    TimmModel,
    architecture_name,
    check_patch_size,
    count_params,
    load_checkpoint,
    load_timm_checkpoint,
    make_vit,
)


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


def load_inventory_for(settings: BuildSettings) -> Inventory:
    """The --devices file's inventory, or --num-devices identical devices."""
    if settings.devices_file is not None:
        return load_inventory(settings.devices_file)
    return identical_devices(settings.num_devices)


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
