"""The wire contract: payload codecs, validation of bad input, topics, preprocessing."""

from __future__ import annotations

import json

import cv2
import msgpack
import numpy as np
import pytest

from edvit.errors import BadPayload, ConfigError
from edvit.mqtt import BrokerAddress
from edvit.preprocess import dataset_to_model_input, decode_frame, to_model_input
from edvit.schemas import (
    FeaturesMsg,
    FrameMsg,
    PlanMsg,
    PredictionMsg,
    Preprocessing,
    StatusMsg,
    decode,
    encode,
)
from edvit.topics import Topics

GRAY = Preprocessing(channels=1, height=8, width=8, mean=(0.5,), std=(0.25,))


def _frame(**overrides) -> FrameMsg:
    fields = dict(camera="cam0", seq=3, ts=1.5, enc="raw", data=bytes(64), shape=(8, 8),
                  dtype="uint8", label=4)  # fmt: skip
    fields.update(overrides)
    return FrameMsg(**fields)


def test_frame_roundtrip_is_msgpack_with_version() -> None:
    payload = encode(_frame())
    raw = msgpack.unpackb(payload)
    assert raw["v"] == 1 and raw["label"] == 4
    assert decode(FrameMsg, payload) == _frame()


def test_prediction_is_json_with_class_key() -> None:
    prediction = PredictionMsg.model_validate(
        {"camera": "c", "seq": 1, "ts": 2.0, "label": 3, "class": "Dress", "score": 0.9,
         "topk": [["Dress", 0.9]], "latency_ms": 4.0, "submodels": ["sub0"], "plan_id": "p"}
    )  # fmt: skip
    as_json = json.loads(encode(prediction))
    assert as_json["class"] == "Dress" and as_json["missing"] == [] and not as_json["degraded"]
    assert decode(PredictionMsg, encode(prediction)) == prediction


def test_empty_payload_means_cleared() -> None:
    assert decode(PlanMsg, b"") is None
    assert decode(FrameMsg, b"") is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1not msgpack", "not valid msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (msgpack.packb({"v": 2, "camera": "c"}), "unsupported wire version 2"),
        (msgpack.packb({"v": 1, "camera": "c"}), "FrameMsg: seq"),
        (
            msgpack.packb(
                {
                    "v": 1,
                    "camera": "c",
                    "seq": -1,
                    "ts": 1.0,
                    "enc": "raw",
                    "data": b"",
                    "shape": [1, 1],
                    "dtype": "uint8",
                }
            ),
            "seq",
        ),  # fmt: skip
        (
            msgpack.packb({"v": 1, "camera": "c", "seq": 0, "ts": 1.0, "enc": "raw", "data": b""}),
            "raw frames need shape",
        ),  # fmt: skip
        (
            msgpack.packb({"v": 1, "camera": "c", "seq": 0, "ts": 1.0, "enc": "gif", "data": b""}),
            "enc",
        ),  # fmt: skip
    ],
)
def test_bad_frames_are_refused_with_one_line(payload: bytes, reason: str) -> None:
    with pytest.raises(BadPayload, match=reason) as caught:
        decode(FrameMsg, payload)
    assert "\n" not in str(caught.value)


def test_features_size_must_match_dim() -> None:
    fields = dict(camera="c", seq=0, ts=1.0, submodel="sub0", plan_id="p", node="n",
                  dtype="float32", data=bytes(12), dim=4, infer_ms=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="expected dim"):
        FeaturesMsg(**fields)
    assert FeaturesMsg(**{**fields, "data": bytes(16)}).dim == 4


def test_status_json_and_offline_will() -> None:
    status = decode(StatusMsg, b'{"state": "offline"}')
    assert status is not None and status.state == "offline"
    with pytest.raises(BadPayload, match="state"):
        decode(StatusMsg, b'{"state": "sleeping"}')


def test_plan_rejects_unknown_assignment() -> None:
    plan = {"v": 1, "plan_id": "p", "bundle_sha256": "b", "classes": ["a", "b"],
            "submodels": [{"id": "sub0", "classes": [0, 1], "sha256": "s", "feature_dim": 4}],
            "assignments": {"node-0": ["sub9"]}, "fusion_sha256": "f",
            "preprocessing": GRAY.model_dump()}  # fmt: skip
    with pytest.raises(BadPayload, match="unknown sub-models"):
        decode(PlanMsg, json.dumps(plan).encode())
    plan["assignments"] = {"node-0": ["sub0"]}
    assert decode(PlanMsg, json.dumps(plan).encode()).submodels_of("node-0") == ("sub0",)


def test_topics_prefix_added_and_removed_in_one_place() -> None:
    topics = Topics("lab")
    assert topics.frame("cam0") == "lab/cameras/cam0/frame"
    assert topics.features("cam0", "sub1", "n0") == "lab/features/cam0/sub1/n0"
    assert topics.all_features() == "lab/features/+/+/+"
    assert topics.all_legacy_features() == "lab/features/+/+"
    assert topics.fusion_model() == "lab/models/fusion"
    assert topics.parts("lab/predictions/cam0") == ["predictions", "cam0"]
    with pytest.raises(ValueError):
        topics.parts("other/predictions/cam0")
    with pytest.raises(ValueError):
        Topics("bad/")


def test_broker_address_forms() -> None:
    assert str(BrokerAddress.parse("mqtt://10.0.0.2:1884")) == "mqtt://10.0.0.2:1884"
    assert BrokerAddress.parse("broker").port == 1883
    with pytest.raises(ConfigError, match="bad broker address"):
        BrokerAddress.parse("http://x:1")


def test_node_input_equals_dataset_input_for_lossless_frames() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    offline = dataset_to_model_input(images, GRAY)
    for image, expected in zip(images, offline, strict=True):
        ok, png = cv2.imencode(".png", image)
        assert ok
        node_input = to_model_input(decode_frame(_frame(enc="png", data=png.tobytes())), GRAY)
        np.testing.assert_array_equal(node_input, expected)


def test_colour_frame_of_other_size_becomes_model_input() -> None:
    colour = np.zeros((32, 24, 3), dtype=np.uint8)
    colour[..., 2] = 255  # pure red in BGR
    ok, jpeg = cv2.imencode(".jpg", colour)
    tensor = to_model_input(decode_frame(_frame(enc="jpeg", data=jpeg.tobytes())), GRAY)
    assert tensor.shape == (1, 8, 8) and tensor.dtype == np.float32
    red_as_gray = (0.299 * 255 / 255 - 0.5) / 0.25
    assert abs(float(tensor.mean()) - red_as_gray) < 0.05


def test_undecodable_or_inconsistent_frames() -> None:
    with pytest.raises(BadPayload, match="not a decodable png"):
        decode_frame(_frame(enc="png", data=b"garbage"))
    with pytest.raises(BadPayload, match="shape needs 64"):
        decode_frame(_frame(data=bytes(10)))


@pytest.mark.fleet
def test_runtime_services_import_neither_torch_nor_timm() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edvit.cli; edvit.cli.build_parser();"
        "import edvit.edge_node.node, edvit.aggregator.service, edvit.camera_source.camera,"
        " edvit.fleet.ops.deploy, edvit.fleet.ops.demo, edvit.fleet.ops.watch,"
        " edvit.placement.plan,"
        " edvit.models.evaluate;"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
