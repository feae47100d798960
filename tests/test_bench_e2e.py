"""`edvit bench e2e` on the shipped bundle: the monolithic bundle it makes, the floor it
measures and a short real run of both fleets (real mosquitto, processes and ONNX Runtime).
Its figures are not judged here, only that every part is measured and reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.cli import main
from edvit.datasets import load_dataset
from edvit.errors import ConfigError
from edvit.fleet.bench import e2e as bench_e2e
from edvit.fleet.bench.common import frame_samples
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.inference import Classifier, OfflinePredictor
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import STAGES


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(DEFAULT_BUNDLE)


def test_monolithic_bundle_answers_as_the_original(bundle: Bundle, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from edvit.models.monolithic import monolithic_bundle

    whole = monolithic_bundle(bundle, tmp_path)
    m = whole.manifest
    assert [s.classes for s in m.submodels] == [tuple(range(bundle.manifest.num_classes))]
    assert m.fusion.feature_dims == (bundle.manifest.num_classes,)
    images = load_dataset(bundle.manifest.dataset, "test").images[:32]
    x = dataset_to_model_input(images, bundle.manifest.preprocessing)
    original = Classifier(bundle.path(bundle.manifest.original.file))(x)
    fused = OfflinePredictor(whole).fused_logits(x)
    assert np.array_equal(fused.argmax(axis=1), original.argmax(axis=1))
    np.testing.assert_allclose(fused, original, rtol=1e-5, atol=1e-5)


def test_floor_measures_every_part(bundle: Bundle, mosquitto_broker: LocalBroker) -> None:
    samples = frame_samples(load_dataset(bundle.manifest.dataset, "test"))[:8]
    floor = bench_e2e.measure_floor(
        bundle, mosquitto_broker.url, bench_e2e.frame_payloads(samples), model_runs=10
    )
    assert floor.hop_ms > 0 and floor.decode_ms > 0
    assert floor.fusion_ms > 0 and floor.original_ms > 0
    assert set(floor.submodel_ms) == {s.id for s in bundle.manifest.submodels}
    assert all(ms > 0 for ms in floor.submodel_ms.values())
    for pipeline in bench_e2e.PIPELINES:
        stages = floor.stages(pipeline)
        assert list(stages) == list(STAGES)
        assert floor.total(pipeline) == pytest.approx(sum(stages.values()), abs=1e-3)
    assert floor.stages("split")["infer"] == max(floor.submodel_ms.values())
    assert floor.stages("monolithic")["infer"] == floor.original_ms
    idle = bench_e2e.measure_floor(
        bundle, mosquitto_broker.url, bench_e2e.frame_payloads(samples), idle_s=0.01
    )
    assert idle.hop_ms > 0 and idle.decode_ms > 0 and idle.original_ms > 0


@pytest.mark.slow
@pytest.mark.fleet
def test_short_run_answers_every_frame_through_both_fleets(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    out = tmp_path / "e2e.json"
    # 40 fps: the idle floor runs each part 30 times 1/fps apart, 5 s of it at 40 fps.
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "e2e", "--cameras", "1", "--fps", "40",
         "--seconds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["pipeline"], r["cameras"]) for r in runs] == [("split", 1), ("monolithic", 1)]
    for r in runs:
        assert r["sent"] >= 60 and r["answered"] == r["sent"], r  # 40 fps for 2 s
        assert r["p95_ms"] >= r["p50_ms"] > 0 and r["floor_ms"] > 0
        assert r["over_floor_ms"] == pytest.approx(r["p50_ms"] - r["floor_ms"], abs=0.01)
        assert r["over_idle_floor_ms"] == pytest.approx(r["p50_ms"] - r["idle_floor_ms"], abs=0.01)
        assert list(r["stages"]) == list(STAGES)
        for stage in r["stages"].values():
            assert stage["median"] >= 0 and stage["floor"] >= 0  # NaN fails both
    assert "| split | 1 | 40 |" in done.stdout and "| monolithic | idle floor |" in done.stdout
    assert "e2e [2/2] monolithic" in done.stderr


@pytest.mark.parametrize(
    ("cameras", "fps", "seconds", "message"),
    [
        ([], 10.0, 5.0, "at least one"),
        ([1, 0], 10.0, 5.0, "positive integer, got 0"),
        ([1], 0.0, 5.0, "--fps must be positive"),
        ([1], 10.0, -1.0, "--seconds must be positive"),
    ],
)
def test_bad_arguments_are_refused(
    cameras: list[int], fps: float, seconds: float, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        bench_e2e.check_arguments(cameras, fps, seconds)


def test_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "e2e", "--cameras", "4", "0"]) == 2
    assert capsys.readouterr().err == (
        "edvit bench: error: --cameras: every count must be a positive integer, got 0\n"
    )
    assert main(["bench", "e2e", str(tmp_path)]) == 2
    assert "is not a bundle" in capsys.readouterr().err


@pytest.mark.broker
@pytest.mark.fleet
def test_without_onnx_only_the_split_fleet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    report = bench_e2e.bench_e2e(DEFAULT_BUNDLE, [1], 40.0, 1.0, make_monolithic=None)
    assert [r["pipeline"] for r in report["runs"]] == ["split"]
    assert report["monolithic_skipped"] == bench_e2e.ONNX_MISSING
    err = capsys.readouterr().err
    assert f"e2e: monolithic rows skipped: {bench_e2e.ONNX_MISSING}\n" in err
