"""edvit build on the digits: the session's tiny bundle (conftest.py), checked through the ONNX
runtime path."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("sklearn")

from edvit.bundle import (  # noqa: E402
    FUSION_FEATURES_INPUT,
    FUSION_PRESENT_INPUT,
    LOGITS_OUTPUT,
    Bundle,
)
from edvit.datasets import load_dataset  # noqa: E402
from edvit.errors import ConfigError, IntegrityError  # noqa: E402
from edvit.inference import Classifier, FeatureExtractor, OfflinePredictor, make_session  # noqa: E402
from edvit.models import cli  # noqa: E402
from edvit.models.build import split_classes  # noqa: E402
from edvit.preprocess import dataset_to_model_input  # noqa: E402

# Measured on the session's bundle (conftest.py DIGITS_BUILD: 15 epochs, seed 0, pruned
# sub-models): original 0.75, fused 0.82 on 359 test images; chance is 0.1. The bound leaves
# room for platform noise but fails a broken pipeline.
MIN_ACCURACY = 0.6


@pytest.fixture(scope="module")
def bundle_dir(digits_bundle: Path) -> Path:
    """The session's digits bundle: `edvit build` with the tiny settings
    (build_tiny_digits_bundle's), which no test here changes."""
    return digits_bundle


@pytest.fixture(scope="module")
def report(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def test_inputs(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    bundle = Bundle.load(bundle_dir)
    test = load_dataset("digits", "test")
    return dataset_to_model_input(test.images, bundle.manifest.preprocessing), test.labels


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_manifest_validates_and_describes_the_split(bundle_dir: Path) -> None:
    m = Bundle.load(bundle_dir).manifest  # verifies every sha256
    assert m.dataset == "digits"
    assert m.class_subsets == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert [s.id for s in m.submodels] == ["sub0", "sub1", "sub2"]
    assert set(m.files) == {"original.onnx", "fusion.onnx", *(s.file for s in m.submodels)}
    assert m.input_shape == (1, 8, 8)
    assert m.command[:4] == ("edvit", "build", "--dataset", "digits")
    assert m.seed == 0
    assert m.fusion.feature_dims == tuple(s.feature_dim for s in m.submodels)
    assert all(0 < d <= 32 for d in m.fusion.feature_dims)  # pruned from the original's 32
    assert m.original.source == "trained"
    assert all(s.architecture is not None for s in m.submodels)


def test_onnx_parity_is_recorded_for_every_file(bundle_dir: Path, report: dict) -> None:
    m = Bundle.load(bundle_dir).manifest
    diffs = report["onnx_parity_max_abs_diff"]
    assert set(diffs) == set(m.files)
    assert all(0.0 <= d < 1e-4 for d in diffs.values())


def test_models_have_the_contract_shapes(
    bundle_dir: Path, test_inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    bundle = Bundle.load(bundle_dir)
    images = test_inputs[0][:5]
    for spec in bundle.manifest.submodels:
        features = FeatureExtractor(bundle.path(spec.file))(images)
        assert features.shape == (5, spec.feature_dim)
        assert features.dtype == np.float32
    logits = Classifier(bundle.path("original.onnx"))(images[:3])
    assert logits.shape == (3, 10)


def test_fusion_ignores_the_contents_of_missing_blocks(
    bundle_dir: Path, test_inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    bundle = Bundle.load(bundle_dir)
    blocks = OfflinePredictor(bundle).features(test_inputs[0][:16])
    features = np.concatenate(blocks, axis=1)
    present = np.ones((16, 3), dtype=np.float32)
    present[:, 1] = 0.0
    session = make_session(bundle.path("fusion.onnx"))

    def run(f: np.ndarray) -> np.ndarray:
        feed = {FUSION_FEATURES_INPUT: f, FUSION_PRESENT_INPUT: present}
        return session.run([LOGITS_OUTPUT], feed)[0]

    dims = bundle.manifest.fusion.feature_dims
    block = slice(dims[0], dims[0] + dims[1])
    garbage = features.copy()
    garbage[:, block] = 1000.0
    zeroed = features.copy()
    zeroed[:, block] = 0.0
    np.testing.assert_allclose(run(garbage), run(zeroed), atol=1e-5)
    all_present = session.run(
        [LOGITS_OUTPUT],
        {FUSION_FEATURES_INPUT: features, FUSION_PRESENT_INPUT: np.ones_like(present)},
    )[0]
    assert not np.allclose(run(zeroed), all_present, atol=1e-3)


def test_fused_predictions_beat_chance(
    bundle_dir: Path, test_inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_inputs
    fused = OfflinePredictor(Bundle.load(bundle_dir)).fused_logits(images)
    assert np.mean(fused.argmax(axis=1) == labels) > MIN_ACCURACY


def test_report_matches_a_recomputation_from_onnx(
    bundle_dir: Path, report: dict, test_inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_inputs
    for key in (
        "dataset",
        "num_devices",
        "test_images",
        "accuracy",
        "submodel_accuracy_on_own_task",
        "params",
        "bytes",
        "onnx_parity_max_abs_diff",
        "train_seconds",
    ):
        assert key in report
    assert report["test_images"] == len(labels) == 359
    assert set(report["submodel_accuracy_on_own_task"]) == {"sub0", "sub1", "sub2"}
    acc = report["accuracy"]
    assert set(acc["fused_without"]) == {"sub0", "sub1", "sub2"}
    values = (acc["original"], acc["fused"], *acc["fused_without"].values())
    for value in (*values, *report["submodel_accuracy_on_own_task"].values()):
        assert 0.0 <= value <= 1.0
    bundle = Bundle.load(bundle_dir)
    original = Classifier(bundle.path("original.onnx"))(images)
    fused = OfflinePredictor(bundle).fused_logits(images)
    assert report["accuracy"]["original"] == pytest.approx(np.mean(original.argmax(1) == labels))
    assert report["accuracy"]["fused"] == pytest.approx(np.mean(fused.argmax(1) == labels))
    sizes = {rel: bundle.path(rel).stat().st_size for rel in bundle.manifest.files}
    assert report["bytes"] == sizes
    assert report["params"]["original"] == bundle.manifest.original.params


def test_tampered_file_fails_verification(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    target = copy / "submodels" / "sub1.onnx"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sub1.onnx"):
        Bundle.load(copy)


def test_refuses_a_non_empty_out_without_force(bundle_dir: Path) -> None:
    before = (bundle_dir / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        cli.run(parse("--dataset", "digits", "--out", str(bundle_dir)))
    assert (bundle_dir / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("devices", ["0", "11"])
def test_rejects_impossible_device_counts(tmp_path: Path, devices: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="num-devices"):
        cli.run(parse("--dataset", "digits", "--num-devices", devices, "--out", str(out)))
    assert not (out / "manifest.json").exists()


def test_split_classes_is_contiguous_and_near_equal() -> None:
    assert split_classes(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert split_classes(10, 10) == [(c,) for c in range(10)]
    assert split_classes(10, 1) == [tuple(range(10))]


def test_cli_sizes_match_the_presets_and_command_is_recorded() -> None:
    from edvit.models.vit import SIZES

    assert set(cli.SIZES) == set(SIZES)
    args = parse("--dataset", "digits", "--out", "x", "--epochs", "2")
    assert cli.command_line(args) == (
        "edvit", "build", "--dataset", "digits", "--num-devices", "3", "--out", "x",
        "--epochs", "2", "--seed", "0",
    )  # fmt: skip


@pytest.mark.fleet
def test_cli_module_does_not_import_torch() -> None:
    code = (
        "import sys, edvit.models, edvit.models.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
