"""Dataset loaders shared by the build pipeline and the camera's dataset replay (no torch).

Every loader returns a Dataset of uint8 images, [N, H, W] for grey or [N, H, W, 3] RGB,
with int64 labels and the class names. Names: ``fashion-mnist``, ``digits``, ``cifar10``
(the python pickle batches) and ``imagefolder`` (``root/<class>/<image>``); the last two
need ``root`` (the CLI's ``--data-dir``).
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edvit.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_CLASSES = tuple(str(d) for d in range(10))
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_SIDE = 32
CIFAR10_NUM_CLASSES = 10
# A pickle can name any callable; a CIFAR batch needs only these to rebuild its arrays.
# numpy.core is numpy 1's name (the files were written with it), numpy._core numpy 2's;
# _codecs.encode is how Python 3 writes bytes at pickle protocol 2 (a re-saved batch).
CIFAR10_PICKLE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}

# What unpickling a truncated or foreign file raises (the pickle docs name some, "not
# necessarily limited to" them).
CORRUPT_PICKLE_ERRORS = (
    OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
    AttributeError, ImportError, IndexError, KeyError, OverflowError,
)  # fmt: skip

IMAGEFOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes, as Fashion-MNIST ships them."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ConfigError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"{path} is not an IDX file (bad magic)")
    if data[2] != 0x08:
        raise ConfigError(f"{path}: only unsigned-byte IDX files are supported")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def load_fashion_mnist(split: str, root: Path | None = None) -> Dataset:
    root = Path(root or os.environ.get("EDVIT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = {"train": "train", "test": "t10k"}[split]

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):  # fmt: skip
            if (root / name).is_file():
                return root / name
        raise ConfigError(
            f"Fashion-MNIST {split} {kind} not found in {root}; install the Debian package "
            "dataset-fashion-mnist or pass the folder that holds the IDX files"
        )

    images = read_idx(find("images"))
    labels = read_idx(find("labels")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ConfigError(f"Fashion-MNIST {split} in {root}: images and labels do not match")
    return Dataset("fashion-mnist", split, images, labels, FASHION_MNIST_CLASSES)


def load_digits(split: str) -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled from 0-16 to 0-255, with a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ConfigError(
            "the digits dataset needs scikit-learn: pip install 'edvit[datasets]'"
        ) from None
    raw = sk_load_digits()
    images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)
    labels = raw.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    chosen = order[-n_test:] if split == "test" else order[:-n_test]
    chosen = np.sort(chosen)
    return Dataset("digits", split, images[chosen], labels[chosen], DIGITS_CLASSES)


# --- CIFAR-10 ------------------------------------------------------------------------


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Loads dicts, lists and numpy arrays; refuses every other global (no code from data)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def cifar10_folder(root: Path) -> Path:
    """The folder holding the batches: root/cifar-10-batches-py, or root itself."""
    nested = root / CIFAR10_FOLDER
    return nested if nested.is_dir() else root


def read_cifar10_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR-10 pickle as a dict with str keys (the files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            raw = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except CORRUPT_PICKLE_ERRORS as exc:
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: expected a dict")
    return {_text(key): value for key, value in raw.items()}


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] RGB and labels [N] from one batch file."""
    batch = read_cifar10_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ConfigError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels'")
    data = batch["data"]
    row_bytes = 3 * CIFAR10_SIDE * CIFAR10_SIDE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (row_bytes,):
        found = (
            f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        )
        raise ConfigError(f"{path}: data must be uint8 rows of {row_bytes} bytes, not {found}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{path}: labels must be a list of integers") from None
    if labels.shape != (len(data),):
        raise ConfigError(f"{path}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= CIFAR10_NUM_CLASSES):
        raise ConfigError(f"{path}: labels must be 0..{CIFAR10_NUM_CLASSES - 1}")
    # Each row is the R plane, then G, then B, each 32 rows of 32 pixels.
    planes = data.reshape(len(data), 3, CIFAR10_SIDE, CIFAR10_SIDE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


def read_cifar10_class_names(path: Path) -> tuple[str, ...]:
    meta = read_cifar10_pickle(path)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != CIFAR10_NUM_CLASSES:
        raise ConfigError(f"{path}: expected {CIFAR10_NUM_CLASSES} label_names")
    return tuple(_text(name) for name in names)


def load_cifar10(split: str, root: Path | None) -> Dataset:
    expected = (*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE)
    if root is None:
        raise ConfigError(
            f"cifar10 needs --data-dir: the folder {CIFAR10_FOLDER} (or its parent) holding "
            f"{', '.join(expected)}"
        )
    folder = cifar10_folder(root)
    names = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    missing = [name for name in (*names, CIFAR10_META_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"CIFAR-10 {split} not found in {folder}: missing {', '.join(missing)}; the folder "
            f"{CIFAR10_FOLDER} from cifar-10-python.tar.gz holds {', '.join(expected)}"
        )
    batches = [read_cifar10_batch(folder / name) for name in names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    class_names = read_cifar10_class_names(folder / CIFAR10_META_FILE)
    return Dataset("cifar10", split, images, labels, class_names)


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


# --- ImageFolder ----------------------------------------------------------------------


def load_imagefolder(split: str, root: Path | None) -> Dataset:
    """``root/<class>/<image>`` with classes sorted by name; ``root/train`` and
    ``root/test`` when both exist, else a seeded 80/20 split within each class.

    Images are read with OpenCV and must all have one size. They stay grey [N, H, W] only
    when every image of the split is grey; otherwise grey ones are converted to RGB.
    """
    if root is None:
        raise ConfigError("imagefolder needs --data-dir: a folder of <class_name>/<image> files")
    if not root.is_dir():
        raise ConfigError(f"image folder {root} not found")
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names = imagefolder_classes(root / "train")
        folder = root / split
        # The test folder may lack a class; one it has that train lacks could not be labelled.
        unknown = set(imagefolder_classes(folder)) - set(class_names)
        if unknown:
            raise ConfigError(f"{folder}: class folder {sorted(unknown)[0]!r} is not in train")
        files, labels = imagefolder_files(folder, class_names, every_class=split == "train")
    else:
        folder = root
        class_names = imagefolder_classes(root)
        files, labels = imagefolder_files(root, class_names, every_class=True)
        files, labels = split_per_class(files, labels, split)
    if not files:
        raise ConfigError(f"image folder {folder} has no {split} images")
    images = read_images(files)
    return Dataset("imagefolder", split, images, np.asarray(labels, dtype=np.int64), class_names)


def imagefolder_classes(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p)))
    if not names:
        raise ConfigError(f"{folder} has no class folders: expected {folder}/<class_name>/<image>")
    return names


def imagefolder_files(
    folder: Path, class_names: tuple[str, ...], *, every_class: bool
) -> tuple[list[Path], list[int]]:
    """Image files of each class folder under ``folder`` (recursively, sorted by path).

    every_class: a class folder that is missing or holds no image is an error.
    """
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_folder = folder / name
        class_files = _image_files(class_folder) if class_folder.is_dir() else []
        if every_class and not class_files:
            extensions = ", ".join(IMAGEFOLDER_EXTENSIONS)
            raise ConfigError(f"class folder {class_folder} holds no images ({extensions})")
        files += class_files
        labels += [label] * len(class_files)
    return files, labels


def split_per_class(
    files: list[Path], labels: list[int], split: str
) -> tuple[list[Path], list[int]]:
    """A seeded 80/20 split within each class, in class then path order."""
    rng = np.random.default_rng(IMAGEFOLDER_SPLIT_SEED)
    label_array = np.asarray(labels)
    chosen: list[int] = []
    for label in np.unique(label_array):
        members = np.flatnonzero(label_array == label)
        shuffled = members[rng.permutation(len(members))]
        n_test = int(round(len(members) * IMAGEFOLDER_TEST_FRACTION))
        part = shuffled[:n_test] if split == "test" else shuffled[n_test:]
        chosen += sorted(part.tolist())
    return [files[i] for i in chosen], [labels[i] for i in chosen]


def read_images(files: list[Path]) -> np.ndarray:
    """uint8 [N, H, W] when every image is grey, else [N, H, W, 3] RGB; files not empty."""
    images = [read_image(path) for path in files]
    first_size = images[0].shape[:2]
    for path, image in zip(files, images, strict=True):
        if image.shape[:2] != first_size:
            raise ConfigError(
                f"{path} is {_size(image.shape)} but {files[0]} is {_size(first_size)}: "
                "all images must have one size (resize them first)"
            )
    if all(image.ndim == 2 for image in images):
        return np.stack(images)
    return np.stack([_as_rgb(image) for image in images])


def read_image(path: Path) -> np.ndarray:
    """One 8-bit image: [H, W] grey, or [H, W, 3] RGB (OpenCV reads BGR; alpha dropped)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ConfigError(f"{path}: OpenCV cannot read this image")
    if image.dtype != np.uint8:
        raise ConfigError(f"{path}: only 8-bit images are supported, not {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGEFOLDER_EXTENSIONS and not _hidden(p)
    )  # fmt: skip


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _size(shape: tuple[int, ...]) -> str:
    height, width = shape[:2]
    return f"{width}x{height}"


# --- by name --------------------------------------------------------------------------

DATASETS = ("fashion-mnist", "digits", "cifar10", "imagefolder")


def load_dataset(name: str, split: str, root: str | Path | None = None) -> Dataset:
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}: use train or test")
    root_path = Path(root) if root else None
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root_path)
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        return load_cifar10(split, root_path)
    if name == "imagefolder":
        return load_imagefolder(split, root_path)
    raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def dataset_class_names(name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """A dataset's class names without reading its images: built in for fashion-mnist and
    digits, CIFAR-10's meta file, an image folder's class folders."""
    root_path = Path(root) if root else None
    if name == "fashion-mnist":
        return FASHION_MNIST_CLASSES
    if name == "digits":
        return DIGITS_CLASSES
    if name == "cifar10":
        if root_path is None:
            raise ConfigError(f"cifar10 needs --data-dir: the folder holding {CIFAR10_META_FILE}")
        meta = cifar10_folder(root_path) / CIFAR10_META_FILE
        if not meta.is_file():
            raise ConfigError(f"{meta} not found: cifar10's class names are in it")
        return read_cifar10_class_names(meta)
    if name == "imagefolder":
        if root_path is None or not root_path.is_dir():
            raise ConfigError("imagefolder needs --data-dir: a folder of <class_name>/ folders")
        train = root_path / "train"
        split = train.is_dir() and (root_path / "test").is_dir()
        return imagefolder_classes(train if split else root_path)
    raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
