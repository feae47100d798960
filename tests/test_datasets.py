"""Dataset loaders on tiny files written here in each format's real layout."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from edvit.datasets import CIFAR10_TRAIN_FILES, DATASETS, load_dataset, read_idx
from edvit.errors import ConfigError

CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")  # fmt: skip
CIFAR_PER_BATCH = 4
CIFAR_TEST_SIZE = 20


# --- CIFAR-10 ------------------------------------------------------------------------


def cifar_batch(first_label: int, count: int) -> tuple[np.ndarray, list[int]]:
    """Rows of 3072 bytes (R plane, G plane, B plane); image i's pixel (y=1, x=2) is
    R=i, G=100+i, B=200+i minus nothing else, so the layout can be checked exactly."""
    rows = np.zeros((count, 3, 32, 32), dtype=np.uint8)
    for i in range(count):
        rows[i, :, 1, 2] = (i, 100 + i, 200 + i)
    labels = [(first_label + i) % 10 for i in range(count)]
    return rows.reshape(count, 3072), labels


def write_cifar_pickle(path: Path, content: dict[bytes, object]) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def make_cifar(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for number, name in enumerate(CIFAR10_TRAIN_FILES):
        data, labels = cifar_batch(number, CIFAR_PER_BATCH)
        write_cifar_pickle(folder / name, {b"batch_label": b"x", b"data": data, b"labels": labels})
    data, labels = cifar_batch(7, CIFAR_TEST_SIZE)
    write_cifar_pickle(folder / "test_batch", {b"data": data, b"labels": labels})
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    write_cifar_pickle(folder / "batches.meta", meta)
    return folder


def test_cifar10_shapes_labels_and_pixels(tmp_path: Path) -> None:
    make_cifar(tmp_path / "cifar-10-batches-py")
    train = load_dataset("cifar10", "train", tmp_path)  # the parent folder works too
    assert train.images.shape == (5 * CIFAR_PER_BATCH, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.images.flags.c_contiguous
    expected = [(batch + i) % 10 for batch in range(5) for i in range(CIFAR_PER_BATCH)]
    assert train.labels.tolist() == expected  # batches 1..5 in order
    assert train.class_names == CIFAR_NAMES
    test = load_dataset("cifar10", "test", tmp_path / "cifar-10-batches-py")
    assert len(test) == CIFAR_TEST_SIZE
    assert test.images[3, 1, 2].tolist() == [3, 103, 203]  # RGB at row 1, column 2
    assert int(test.images[3].sum()) == 3 + 103 + 203  # and nowhere else


def test_cifar10_reads_numpy1_pickles(tmp_path: Path) -> None:
    # The real files were written by numpy 1, whose arrays name numpy.core.multiarray.
    folder = make_cifar(tmp_path / "c")
    old = (folder / "test_batch").read_bytes().replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in old
    (folder / "test_batch").write_bytes(old)
    assert load_dataset("cifar10", "test", folder).images[5, 1, 2].tolist() == [5, 105, 205]


def test_cifar10_needs_data_dir_and_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cifar10 needs --data-dir.*data_batch_1.*test_batch"):
        load_dataset("cifar10", "train")
    folder = make_cifar(tmp_path / "c")
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=f"not found in {folder}: missing data_batch_3;"):
        load_dataset("cifar10", "train", folder)
    assert len(load_dataset("cifar10", "test", folder)) == CIFAR_TEST_SIZE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all", "is not a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "needs 'data' and 'labels'"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            "uint8 rows of 3072 bytes, not uint8",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
            "2 images but 1 labels",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
            r"labels must be 0\.\.9",
        ),
        (pickle.dumps({b"data": os.getcwd, b"labels": []}), "refusing to load posix.getcwd"),
    ],
)
def test_cifar10_corrupt_batch(tmp_path: Path, content: bytes, message: str) -> None:
    folder = make_cifar(tmp_path / "c")
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ConfigError, match=message) as caught:
        load_dataset("cifar10", "test", folder)
    assert str(folder / "test_batch") in str(caught.value)


# --- ImageFolder ----------------------------------------------------------------------


def write_image(path: Path, rgb: tuple[int, int, int] | int, size: tuple[int, int] = (6, 4)):
    """A solid image of width x height; an int is grey. Written as OpenCV wants it (BGR)."""
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rgb, int):
        image = np.full((height, width), rgb, np.uint8)
    else:
        image = np.full((height, width, 3), rgb[::-1], np.uint8)
    assert cv2.imwrite(str(path), image)


def make_class_tree(root: Path, counts: dict[str, int]) -> None:
    """Class c's image i is RGB (10 * class index, i, 200), so its origin can be read back."""
    for label, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            write_image(root / name / f"img{i:02d}.png", (10 * label, i, 200))


def test_imagefolder_splits_80_20_per_class_with_seeded_order(tmp_path: Path) -> None:
    make_class_tree(tmp_path, {"cat": 10, "dog": 5, "ant": 5})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    train = load_dataset("imagefolder", "train", tmp_path)
    test = load_dataset("imagefolder", "test", tmp_path)
    assert train.class_names == ("ant", "cat", "dog")
    assert train.images.shape == (16, 4, 6, 3) and test.images.shape == (4, 4, 6, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.labels.tolist() == [0] * 4 + [1] * 8 + [2] * 4
    assert test.labels.tolist() == [0, 1, 1, 2]
    # Pixels round-trip as RGB, and train and test are disjoint and cover every image.
    seen = {
        (int(px[0]) // 10, int(px[1]))
        for px in np.concatenate([train.images, test.images])[:, 0, 0]
    }
    assert seen == {(0, i) for i in range(5)} | {(1, i) for i in range(10)} | {
        (2, i) for i in range(5)
    }
    assert all(int(px[2]) == 200 for px in train.images[:, 0, 0])
    again = load_dataset("imagefolder", "test", tmp_path)
    assert np.array_equal(again.images, test.images)


def test_imagefolder_uses_train_and_test_folders(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "train", {"a": 2, "b": 3})
    make_class_tree(tmp_path / "test", {"b": 1})  # a test folder may lack a class
    test = load_dataset("imagefolder", "test", tmp_path)
    assert test.class_names == ("a", "b")
    assert test.labels.tolist() == [1]
    assert test.images[0, 0, 0].tolist() == [0, 0, 200]  # written as class 0 of its own tree
    assert len(load_dataset("imagefolder", "train", tmp_path)) == 5
    make_class_tree(tmp_path / "test", {"c": 1})
    with pytest.raises(ConfigError, match="class folder 'c' is not in train"):
        load_dataset("imagefolder", "test", tmp_path)


def test_imagefolder_grey_stays_grey_only_when_all_are(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "train" / "a" / f"{i}.png", 50 + i)
        write_image(tmp_path / "train" / "b" / f"{i}.jpg", 128)
    write_image(tmp_path / "test" / "a" / "grey.png", 7)
    write_image(tmp_path / "test" / "b" / "colour.png", (1, 2, 3))
    grey = load_dataset("imagefolder", "train", tmp_path)
    assert grey.images.shape == (6, 4, 6)
    assert grey.images[:3, 0, 0].tolist() == [50, 51, 52]
    mixed = load_dataset("imagefolder", "test", tmp_path)
    assert mixed.images.shape == (2, 4, 6, 3)
    assert mixed.images[:, 0, 0].tolist() == [[7, 7, 7], [1, 2, 3]]


def test_imagefolder_errors_name_the_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="imagefolder needs --data-dir"):
        load_dataset("imagefolder", "train")
    with pytest.raises(ConfigError, match="image folder .*missing not found"):
        load_dataset("imagefolder", "train", tmp_path / "missing")
    make_class_tree(tmp_path / "sizes", {"a": 3})
    odd = tmp_path / "sizes" / "a" / "img99.png"
    write_image(odd, (1, 1, 1), size=(7, 4))
    with pytest.raises(ConfigError, match=f"{odd} is 7x4 but .*img00.png is 6x4"):
        load_dataset("imagefolder", "train", tmp_path / "sizes")
    odd.write_bytes(b"\x89PNG broken")
    with pytest.raises(ConfigError, match=f"{odd}: OpenCV cannot read this image"):
        load_dataset("imagefolder", "train", tmp_path / "sizes")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="class folder .*empty/a holds no images"):
        load_dataset("imagefolder", "train", tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png", 1)
    with pytest.raises(ConfigError, match="has no class folders"):
        load_dataset("imagefolder", "train", tmp_path / "flat")


# --- Fashion-MNIST (IDX) ---------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(np.uint8).tobytes()


def make_fashion(folder: Path, *, gz: bool) -> np.ndarray:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 251
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (
        ("t10k-images-idx3-ubyte", images),
        ("t10k-labels-idx1-ubyte", np.array([9, 0, 4])),
    ):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images.astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    images = make_fashion(tmp_path, gz=gz)
    test = load_dataset("fashion-mnist", "test", tmp_path)
    assert test.images.shape == (3, 28, 28) and test.images.dtype == np.uint8
    assert np.array_equal(test.images, images)
    assert test.labels.tolist() == [9, 0, 4] and test.labels.dtype == np.int64
    assert test.class_names[9] == "Ankle boot"
    monkeypatch.setenv("EDVIT_FASHION_MNIST_DIR", str(tmp_path))
    assert np.array_equal(load_dataset("fashion-mnist", "test").images, images)
    with pytest.raises(ConfigError, match=f"Fashion-MNIST train images not found in {tmp_path}"):
        load_dataset("fashion-mnist", "train")


def test_idx_corrupt_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ConfigError, match="bad magic"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8))[:-1])
    with pytest.raises(ConfigError, match=r"header says \(2, 2\) but holds 3 bytes"):
        read_idx(short)
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8)))[:-6])
    with pytest.raises(ConfigError, match="cannot read IDX file"):
        read_idx(truncated)


def test_unknown_names_list_every_dataset() -> None:
    assert {"cifar10", "imagefolder"} <= set(DATASETS)
    with pytest.raises(
        ConfigError, match="choose one of fashion-mnist, digits, cifar10, imagefolder"
    ):
        load_dataset("mnist", "train")
    with pytest.raises(ConfigError, match="unknown split"):
        load_dataset("cifar10", "val")
