"""Untrained bundles: `edvit build --model TIMM_NAME --untrained` (models/build_untrained.py).

A small timm ViT (timm's `test_vit`, 64 wide, cut to two blocks, at 32x32) is built with
random weights and no image read; its bundle says it is untrained, `edvit evaluate` measures it
without a dataset, `edvit deploy` warns, the plan and the aggregator's answers carry the flag,
and watch, the dashboard and Home Assistant show it. The pruning shapes are compared with the
trained path's on the shipped Fashion-MNIST checkpoint. Bad input fails in one line, exit 2.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from memory_transport import MemoryBroker, MemoryTransport

pytest.importorskip("torch")
pytest.importorskip("timm")

import torch  # noqa: E402

from edvit.aggregator.service import Aggregator, DeadlinePolicy  # noqa: E402
from edvit.broker.local import LocalBroker  # noqa: E402
from edvit.bundle import MANIFEST_NAME, Bundle  # noqa: E402
from edvit.cli import main  # noqa: E402
from edvit.datasets import FASHION_MNIST_CLASSES, dataset_class_names  # noqa: E402
from edvit.errors import ConfigError  # noqa: E402
from edvit.fleet.dashboard.app import FleetView  # noqa: E402
from edvit.fleet.ops.demo import DEFAULT_BUNDLE  # noqa: E402
from edvit.fleet.ops.deploy import deploy, make_plan, publish_bundle, round_robin  # noqa: E402
from edvit.fleet.ops.watch import format_prediction  # noqa: E402
from edvit.models.build import build_bundle, default_settings  # noqa: E402
from edvit.models.build_data import load_data, load_original_checkpoint  # noqa: E402
from edvit.models.build_settings import CLASS_LIST, default_param_budget  # noqa: E402
from edvit.models.build_submodels import minimum_params, prune_submodels, subset_data  # noqa: E402
from edvit.models.build_untrained import (  # noqa: E402
    pruned_summary,
    synthetic_images,
    synthetic_subset,
)
from edvit.models.train import predict  # noqa: E402
from edvit.models.vit import count_params, make_vit, untrained_timm_model  # noqa: E402
from edvit.preprocess import dataset_to_model_input  # noqa: E402
from edvit.schemas import FeaturesMsg, PlanMsg, PredictionMsg, decode, encode  # noqa: E402
from edvit.signing import DOMAIN, PlanSignatureError, SigningKey  # noqa: E402
from edvit.topics import Topics  # noqa: E402
from helpers import wait_until  # noqa: E402

NAME = "test_vit"  # timm's tiny test ViT: 64 wide, 2 heads, MLP 192, patch 16
SMALL = {"depth": 2}  # timm overrides: two blocks, so that exports take seconds
IMG = 32
CLASSES = ("cat", "dog", "bird", "fish")
CHECKPOINT = (
    Path(__file__).resolve().parent.parent / "benchmarks/checkpoints/fashion-mnist-small.pt"
)


# -- the build ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    """The bundle, its report and the build's seconds; reading any image fails the build."""
    out = tmp_path_factory.mktemp("untrained") / "bundle"
    settings = default_settings(
        CLASS_LIST, model=NAME, untrained=True, img_size=IMG, classes=CLASSES, num_devices=2,
        model_kwargs=SMALL, latency_runs=5, threads=2,
    )  # fmt: skip

    def no_images(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an untrained build must not read images")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("edvit.datasets.load_dataset", no_images)
        patch.setattr("edvit.models.build_data.load_dataset", no_images)
        started = time.monotonic()
        report = build_bundle(settings, out)
        seconds = time.monotonic() - started
    return out, report, seconds


def test_an_untrained_build_prunes_exports_and_says_so(
    untrained: tuple[Path, dict[str, Any], float],
) -> None:
    out, report, seconds = untrained
    print(f"the small untrained build took {seconds:.0f} s")  # a figure, not a bar: load moves it
    bundle = Bundle.load(out)  # every file matches its sha256
    m = bundle.manifest
    assert m.untrained and m.original.source == "untrained"
    assert m.name == f"{CLASS_LIST}-2-untrained" and m.dataset == CLASS_LIST
    assert m.class_names == CLASSES and m.class_subsets == ((0, 1), (2, 3))
    assert m.input_shape == (3, IMG, IMG)  # the model's channels, --img-size
    assert m.preprocessing.mean == (0.5, 0.5, 0.5)  # test_vit's pretrained config
    assert "'test_vit'" in m.original.architecture and "depth=2" in m.original.architecture
    budget = default_param_budget(m.original.params, 2)
    for spec in m.submodels:
        assert report["prune_plans"][spec.id]["param_budget"] == budget
        assert spec.architecture is not None and spec.architecture["params"] <= budget
        pruned = report["pruned"][spec.id]
        assert pruned["params"] == [spec.architecture["params"], m.original.params]
        assert pruned["embed"] == [64, 64]  # N=2 keeps the embedding
    assert report["untrained"] and report["accuracy"] is None and report["test_images"] == 0
    assert report["ratios"]["size"] > 1.9 and report["ratios"]["bytes"] > 1.5
    assert report["original"]["latency_ms"] > 0 and report["fusion"]["params"] > 0
    assert report["assignment"]["assignments"]


def test_evaluate_measures_an_untrained_bundle_without_its_dataset(
    untrained: tuple[Path, dict[str, Any], float], capsys: pytest.CaptureFixture[str]
) -> None:
    out = untrained[0]
    assert main(["evaluate", str(out), "--runs", "3"]) == 0
    table = capsys.readouterr().out
    assert "Accuracy: none, an untrained bundle" in table
    assert "- ONNX bytes:" in table and "| sub1 | 2,3 |" in table


def test_manifests_without_the_field_read_as_trained() -> None:
    raw = json.loads((DEFAULT_BUNDLE / MANIFEST_NAME).read_text())
    assert "untrained" not in raw
    bundle = Bundle.load(DEFAULT_BUNDLE)
    assert bundle.manifest.untrained is False
    assert make_plan(bundle, {"n": ("sub0", "sub1", "sub2")}).untrained is False


def test_untrained_shapes_follow_the_budget_as_the_trained_path_does() -> None:
    """The trained build's pruning, scored on a converged model and real images, against the
    untrained one, scored on random weights and a synthetic batch, at N=3's default budget:
    the same embedding width and number of branches, both within the budget, and heads and
    MLP neurons split alike (measured: 12-13 heads of 24 trained, 10-13 untrained; scores of
    random weights taken as they are would keep 2)."""
    settings = default_settings(
        "fashion-mnist", num_devices=3, checkpoint=str(CHECKPOINT), sub_epochs=0,
        recover_epochs=0, threads=2,
    )  # fmt: skip
    data = load_data(settings)
    trained = load_original_checkpoint(settings, data)
    assert trained is not None
    x = torch.from_numpy(dataset_to_model_input(data.train.images[:128], data.preprocessing))
    labels = data.train.labels[:128]
    teacher = torch.from_numpy(predict(trained, x))
    rng = np.random.default_rng(0)
    real = [subset_data(s, x, labels, teacher, rng) for s in data.subsets]
    params = count_params(trained)
    with_data = prune_submodels(settings, trained, params, real, 2).vits

    torch.manual_seed(0)
    random = make_vit("small", 28, 1, 10).eval()
    images = synthetic_images(4, data.preprocessing, 0)
    synthetic = [synthetic_subset(s, 10, images) for s in data.subsets]
    untrained_settings = replace(settings, untrained=True)
    without = prune_submodels(untrained_settings, random, params, synthetic, 2).vits

    budget = default_param_budget(params, 3)
    for a, b in zip(with_data, without, strict=True):
        shape_a, shape_b = pruned_summary(trained, a), pruned_summary(random, b)
        assert shape_a["embed"] == shape_b["embed"] == [48, 64]  # 0.75 of the width at N=3
        branches = [s["attention_branches"][0] + s["mlp_branches"][0] for s in (shape_a, shape_b)]
        assert branches == [8, 8]  # default_keep_branches(12, 3)
        assert abs(shape_a["attention_branches"][0] - shape_b["attention_branches"][0]) <= 1
        assert abs(shape_a["heads"][0] - shape_b["heads"][0]) <= 3
        for shape in (shape_a, shape_b):
            assert 0.9 * budget <= shape["params"][0] <= budget


# -- bad input at the CLI ----------------------------------------------------------------------


def smallest_budget() -> int:
    model = untrained_timm_model(NAME, len(FASHION_MNIST_CLASSES), IMG)
    return minimum_params(model.vit)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "resnet18", "--untrained"], "is a timm ResNet; edvit prunes plain"),
        (["--model", "vit_base_patch16_22", "--untrained"], "is not a timm model; close names"),
        (["--untrained"], "--untrained needs --model TIMM_NAME"),
        (["--model", NAME, "--untrained", "--checkpoint", "w.pt"], "exclude each other"),
        (["--model", NAME, "--untrained", "--img-size", "33"], "patch size 16: choose 32 or 48"),
        (["--model", NAME, "--img-size", "32", "--checkpoint", "w.pt"], "needs --untrained"),
        (
            ["--model", NAME, "--untrained", "--img-size", str(IMG), "--param-budget", "1000"],
            "the smallest possible budget is {smallest} parameters",
        ),
    ],
)
def test_bad_input_fails_in_one_line_before_any_output(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    argv = ["build", "--dataset", "fashion-mnist", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    if "{smallest}" in message:
        message = message.format(smallest=smallest_budget())
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("edvit build: error: ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--classes", "a,b", "--dataset", "digits"], "--dataset and --classes exclude each other"),
        (["--classes", "a,,b"], "non-empty class names"),
        (["--classes", "a,b,a"], "names a class twice"),
        ([], "--dataset is required (or, with --untrained, --classes)"),
    ],
)
def test_class_lists_are_checked(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["build", "--model", NAME, "--untrained", "--out", str(tmp_path / "b")]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_command_line_reaches_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr("edvit.models.build.build_bundle", lambda s, *a, **k: seen.append(s))
    argv = ["build", "--classes", "cat, dog,bird", "--model", NAME, "--untrained",
            "--img-size", "64", "--num-devices", "3", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(argv) == 0
    [settings] = seen
    assert settings.untrained and settings.model == NAME and settings.img_size == 64
    assert settings.classes == ("cat", "dog", "bird") and settings.dataset == CLASS_LIST
    assert settings.num_devices == 3 and settings.size is None
    command = list(settings.command)
    assert command[:4] == ["edvit", "build", "--num-devices", "3"]
    assert command[command.index("--classes") + 1] == "cat, dog,bird"
    assert "--untrained" in command and "--dataset" not in command


def test_class_names_are_read_without_images(tmp_path: Path) -> None:
    assert dataset_class_names("fashion-mnist") == FASHION_MNIST_CLASSES
    assert dataset_class_names("digits") == tuple(str(d) for d in range(10))
    for name in ("zebra", "ant"):
        (tmp_path / name).mkdir()  # class folders, no image in them
    assert dataset_class_names("imagefolder", tmp_path) == ("ant", "zebra")
    with pytest.raises(ConfigError, match="batches.meta"):
        dataset_class_names("cifar10", tmp_path)


# -- the fleet -----------------------------------------------------------------------------------


def test_deploy_warns_once_and_the_plan_says_untrained(
    untrained: tuple[Path, dict[str, Any], float],
    embedded_broker: LocalBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    with caplog.at_level(logging.INFO, logger="edvit"):
        plan = deploy(Bundle.load(untrained[0]), embedded_broker.url, topics=topics)
        trained = deploy(Bundle.load(DEFAULT_BUNDLE), embedded_broker.url, topics=topics)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "UNTRAINED" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert plan.untrained and not trained.untrained
    wire = decode(PlanMsg, encode(plan))
    assert wire is not None and wire.untrained


def test_a_plan_signed_before_the_field_existed_still_verifies() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    key = SigningKey(private)
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), {"n": ("sub0", "sub1", "sub2")})
    unsigned = plan.model_copy(update={"key_id": key.key_id})
    # The bytes a signer that knew neither `untrained` nor `seq` signed: the plan without them.
    later = {"signature", "untrained", "seq"}
    fields = unsigned.model_dump(mode="json", by_alias=True, exclude=later)
    old = DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    signature = base64.b64encode(private.sign(old)).decode()
    key.trust.verify(unsigned.model_copy(update={"signature": signature}))
    flagged = key.sign(plan.model_copy(update={"untrained": True}))
    key.trust.verify(flagged)  # signed with the flag, which the signature then covers
    with pytest.raises(PlanSignatureError, match="bad signature"):
        key.trust.verify(flagged.model_copy(update={"untrained": False}))


def _features(topics: Topics, plan: PlanMsg, seq: int) -> list[tuple[str, bytes]]:
    """Made-up features (ones) of every sub-model for one frame of cam0."""
    node, ts = next(iter(plan.assignments)), time.time()  # (camera, seq, ts) names the frame
    out = []
    for ref in plan.submodels:
        msg = FeaturesMsg(
            camera="cam0", seq=seq, ts=ts, submodel=ref.id, plan_id=plan.plan_id,
            node=node, dtype="float32", data=np.ones(ref.feature_dim, np.float32).tobytes(),
            dim=ref.feature_dim, infer_ms=0.1,
        )  # fmt: skip
        out.append((topics.features("cam0", ref.id, node), encode(msg)))
    return out


def test_the_aggregator_flags_answers_of_an_untrained_plan() -> None:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    ids = [s.id for s in bundle.manifest.submodels]
    plan = make_plan(bundle, round_robin(ids, ["n0"])).model_copy(update={"untrained": True})
    broker, topics = MemoryBroker(), Topics()
    aggregator = Aggregator(
        client=MemoryTransport(broker, "aggregator"), deadline=DeadlinePolicy(cap_s=5.0),
        ha_prefix="homeassistant",
    )  # fmt: skip
    injector = MemoryTransport(broker, "injector")
    aggregator.start()
    try:
        publish_bundle(lambda t, p: injector.publish(t, p, retain=True), bundle, plan, topics)
        wait_until(lambda: aggregator.follower.ready and aggregator.answering, 20)
        for topic, payload in _features(topics, plan, 0):
            injector.publish(topic, payload)
        wait_until(lambda: aggregator.counters["predictions"] == 1, 10)
    finally:
        aggregator.stop()
    [payload] = broker.messages(topics.predictions("cam0"))
    answer = decode(PredictionMsg, payload)
    assert answer is not None and answer.untrained
    [config] = broker.messages("homeassistant/sensor/+/+/config")
    assert "(untrained" in json.loads(config)["device"]["model"]


def test_watch_and_the_dashboard_show_untrained_answers() -> None:
    answer = PredictionMsg(
        camera="cam0", seq=1, ts=1.0, label=0, class_name="cat", score=0.5,
        topk=(("cat", 0.5),), latency_ms=3.0, submodels=("sub0",), plan_id="p1", untrained=True,
    )  # fmt: skip
    assert "UNTRAINED (random weights)" in format_prediction(answer)
    assert "UNTRAINED" not in format_prediction(answer.model_copy(update={"untrained": False}))
    view = FleetView()
    view.prediction_payload("edvit/predictions/cam0", encode(answer))
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), {"n": ("sub0", "sub1", "sub2")})
    view.plan_payload("edvit/plan", encode(plan.model_copy(update={"untrained": True})))
    state = view.snapshot()
    assert state["cameras"][0]["latest"]["untrained"] is True
    assert state["plan"]["untrained"] is True
