"""Dataset loaders shared by the build pipeline and the camera's dataset replay (numpy only).

Every loader returns a Dataset of uint8 images, [N, H, W] for grey or [N, H, W, 3] RGB,
with int64 labels and the class names. Names: ``fashion-mnist``, ``digits``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edvit.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


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
    names = tuple(str(d) for d in range(10))
    return Dataset("digits", split, images[chosen], labels[chosen], names)


DATASETS = ("fashion-mnist", "digits")


def load_dataset(name: str, split: str, root: str | Path | None = None) -> Dataset:
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}: use train or test")
    if name == "fashion-mnist":
        return load_fashion_mnist(split, Path(root) if root else None)
    if name == "digits":
        return load_digits(split)
    raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
