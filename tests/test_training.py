"""The training recipe's parts: augmentation, step-based epochs, the sized fusion, the
accuracy warning, the sub-models' data and the device choice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

import torch  # noqa: E402

from edvit.errors import ConfigError  # noqa: E402
from edvit.models.build import (  # noqa: E402
    accuracy_warning,
    balanced_subset_indices,
    build_bundle,
    default_settings,
    default_sub_steps,
    epochs_for_steps,
    sub_steps_of,
    subset_epochs,
)
from edvit.models.train import Augment, TrainConfig, fit, resolve_device  # noqa: E402
from edvit.models.vit import FusionMLP, count_params, fusion_hidden_for  # noqa: E402


def test_shift_moves_each_image_within_its_padding_and_keeps_the_shape() -> None:
    images = torch.zeros(64, 1, 8, 8)
    images[:, :, 3, 4] = 1.0  # one bright pixel, away from the border
    shifted = Augment(shift=2)(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in shifted}
    assert len(positions) > 5  # per-sample offsets, not one for the batch
    for row, col in positions:
        assert abs(row - 3) <= 2 and abs(col - 4) <= 2
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # moved, never duplicated


def test_flip_mirrors_about_half_the_batch_and_is_seeded() -> None:
    images = torch.arange(8.0).repeat(200, 1, 8, 1)
    first = Augment(flip=True)(images, torch.Generator().manual_seed(1))
    again = Augment(flip=True)(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    flipped = (first[:, 0, 0, 0] == 7.0).float().mean().item()
    assert 0.35 < flipped < 0.65
    assert not Augment().active and Augment(shift=1).active


def test_fit_with_augmentation_learns_and_returns_the_module_on_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(256, 1, 8, 8, generator=generator)
    labels = images[:, 0, :, :4].mean(dim=(1, 2)) > images[:, 0, :, 4:].mean(dim=(1, 2))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2, augment=Augment(shift=1))
    history = fit(model, model, [images], labels.long(), config, "test")
    assert len(history) == 3 and history[-1] < history[0]
    assert next(model.parameters()).device.type == "cpu"


def test_epochs_follow_a_step_target_whatever_the_data_size() -> None:
    assert epochs_for_steps(3000, 60000, 128) == 7  # 469 steps an epoch
    assert epochs_for_steps(3000, 6000, 128) == 64
    assert epochs_for_steps(10, 60000, 128) == 1
    assert epochs_for_steps(0, 60000, 128) == 0
    settings = default_settings("digits", sub_steps=100, recover_steps=10, batch_size=10)
    assert subset_epochs(settings, 100) == (1, 10)
    fixed = default_settings("digits", sub_epochs=2)
    assert subset_epochs(fixed, 100) == (epochs_for_steps(fixed.recover_steps, 100, 32), 2)


def test_sub_models_train_longer_from_five_devices() -> None:
    """From N=5 the embedding is halved: the default steps grow with N from there."""
    assert [default_sub_steps(n) for n in (2, 3, 4, 5, 10)] == [3000, 3000, 4800, 6000, 12000]
    assert sub_steps_of(default_settings("digits", num_devices=5)) == 6000
    assert sub_steps_of(default_settings("digits", num_devices=5, sub_steps=50)) == 50


@pytest.mark.parametrize(
    ("dims", "classes", "budget"),
    [((32, 32, 32), 10, 2740), ((8,) * 10, 10, 900), ((192, 192), 100, 10**7)],
)
def test_fusion_is_sized_to_its_budget(dims: tuple[int, ...], classes: int, budget: int) -> None:
    hidden = fusion_hidden_for(dims, classes, budget)
    params = count_params(FusionMLP(dims, classes, hidden))
    assert classes <= hidden <= 256
    assert params <= budget or hidden == classes
    if hidden < 256:  # the widest that fits
        assert count_params(FusionMLP(dims, classes, hidden + 1)) > budget


def test_the_build_warns_with_the_flag_to_fix_a_drop_above_one_point() -> None:
    settings = default_settings("digits")
    assert accuracy_warning(0.90, 0.895, settings) is None
    warning = accuracy_warning(0.90, 0.85, settings)
    assert warning is not None and "5.0 points" in warning
    assert f"--sub-steps {2 * sub_steps_of(settings)}" in warning
    fixed_epochs = accuracy_warning(0.9, 0.8, default_settings("digits", sub_epochs=3))
    assert fixed_epochs is not None and "--sub-epochs 6" in fixed_epochs


def test_submodels_see_every_image_by_default_or_a_balanced_sample() -> None:
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(0)
    assert len(balanced_subset_indices(labels, (0, 1), rng, None)) == 500
    balanced = balanced_subset_indices(labels, (0, 1), rng, 1.0)
    assert len(balanced) == 150 and np.sum(labels[balanced] >= 2) == 50
    assert default_settings("fashion-mnist").other_ratio is None


def test_device_choice() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def test_a_bad_device_is_a_config_error_before_any_work(tmp_path) -> None:
    settings = default_settings("digits", device="tpu")
    with pytest.raises(ConfigError, match="--device"):
        build_bundle(settings, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.fleet
@pytest.mark.slow
def test_sub_models_trained_side_by_side_make_the_same_bundle(tmp_path) -> None:
    """--jobs only changes where the sub-models train: the weights, and so the fused
    accuracy, are those of the one-at-a-time build (the fusion is seeded on its own)."""
    import onnx
    from onnx import numpy_helper

    common = dict(
        size="test",
        num_devices=2,
        epochs=1,
        sub_steps=40,
        recover_steps=45,
        fusion_epochs=2,
        threads=1,
    )
    reports = {
        jobs: build_bundle(default_settings("digits", jobs=jobs, **common), tmp_path / str(jobs))
        for jobs in (1, 2)
    }
    assert reports[1]["accuracy"] == reports[2]["accuracy"]
    for sid in ("sub0", "sub1"):
        weights = [
            [
                numpy_helper.to_array(t)
                for t in onnx.load(
                    tmp_path / str(j) / "submodels" / f"{sid}.onnx"
                ).graph.initializer
            ]
            for j in (1, 2)
        ]
        assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    with pytest.raises(ConfigError, match="--jobs"):
        build_bundle(default_settings("digits", jobs=0), tmp_path / "bad")


def _spawned_workers(parent: int) -> list[int]:
    """The sub-model workers of process ``parent`` (its spawned children, not the
    multiprocessing resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and "spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.fleet
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killing_a_parallel_build_stops_its_workers(tmp_path) -> None:
    """SIGKILL leaves no chance to shut the pool down: the workers must not train on."""
    command = [
        sys.executable, "-m", "edvit", "build", "--dataset", "digits", "--size", "test",
        "--num-devices", "2", "--epochs", "1", "--sub-steps", "1000000", "--jobs", "2",
        "--threads", "1", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    log = tmp_path / "build.log"
    with log.open("wb") as stderr:
        build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        training = ("sub0: classes", "sub1: classes")  # logged by the workers as they start
        while time.monotonic() < deadline and build.poll() is None:
            time.sleep(0.2)
            workers = _spawned_workers(build.pid)
            if len(workers) == 2 and all(line in log.read_text() for line in training):
                break
        assert len(workers) == 2, "the build never started its two workers"
        build.kill()
        build.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(w) for w in workers):
            time.sleep(0.2)
        left = [w for w in workers if _running(w)]
        assert not left, f"workers {left} outlived the killed build"
    finally:
        build.kill()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
