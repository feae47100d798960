"""A sliced bundle over a real broker: cameras sending frames and cameras running head
slices are served by one node with either strategy, and the fused answers equal the
offline ones."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.inference import OfflinePredictor, softmax
from edvit.mqtt import MqttClient
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import TokensMsg, encode
from edvit.topics import Topics
from helpers import assert_exit_codes, collect_predictions

FRAMES = 15


@pytest.mark.fleet
@pytest.mark.parametrize("strategy", ["per-entry", "merged"])
def test_frames_and_tokens_give_the_offline_answers(
    strategy: str, mosquitto_broker: LocalBroker, sliced_digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle = mosquitto_broker, Bundle.load(sliced_digits_bundle)
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    plan = deploy(bundle, broker.url, nodes=["node-0"], topics=topics)
    assert plan.stem is not None and plan.stem.blocks == 1
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        fleet.spawn("node-0", "node", "--id", "node-0", "--strategy", strategy,
                    "--keep-all-frames")  # fmt: skip
        fleet.spawn("aggregator", "aggregator")
        stream = PredictionStream(broker.url, topics=topics)
        stream.start()
        try:
            fleet.wait_ready(plan)
            common = ["--source", "dataset:digits", "--count", str(FRAMES), "--fps", "30"]
            fleet.spawn("cam-frames", "camera", "--id", "cam-frames", *common)
            fleet.spawn("cam-tokens", "camera", "--id", "cam-tokens", "--head-slices", "1",
                        *common)  # fmt: skip
            predictions = collect_predictions(stream, 2 * FRAMES, timeout=60)
        finally:
            stream.stop()
    assert_exit_codes(fleet)  # node, aggregator and both cameras: 0
    test = load_dataset("digits", "test")
    images = dataset_to_model_input(test.images[:FRAMES], bundle.manifest.preprocessing)
    offline = softmax(OfflinePredictor(bundle).fused_logits(images))
    for camera in ("cam-frames", "cam-tokens"):
        mine = sorted((p for p in predictions if p.camera == camera), key=lambda p: p.seq)
        assert [p.seq for p in mine] == list(range(FRAMES)), camera
        np.testing.assert_array_equal([p.label for p in mine], offline.argmax(axis=1))
        np.testing.assert_allclose([p.score for p in mine], offline.max(axis=1), atol=1e-4)


@pytest.mark.fleet
def test_bad_tokens_are_dropped_with_one_line_each(
    mosquitto_broker: LocalBroker, sliced_digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle = mosquitto_broker, Bundle.load(sliced_digits_bundle)
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    plan = deploy(bundle, broker.url, nodes=["node-0"], topics=topics)
    assert plan.stem is not None
    width = plan.stem.token_shape[1]
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        fleet.spawn("node-0", "node", "--id", "node-0")
        fleet.wait_ready(plan, include_aggregator=False)
        sender = MqttClient(f"bad-{uuid.uuid4().hex[:6]}", broker.url)
        sender.start(required=True)
        try:
            wrong_shape = np.zeros((3, width), dtype=np.float32)
            right_shape = np.zeros(plan.stem.token_shape, dtype=np.float32)
            # Two cameras: one camera's second message would replace its first in the queue.
            for camera, block, tokens in (("c1", 1, wrong_shape), ("c2", 5, right_shape)):
                message = TokensMsg(
                    camera=camera, seq=0, ts=time.time(), block=block, dtype="float32",
                    shape=tokens.shape, data=tokens.tobytes(),
                )  # fmt: skip
                sender.publish(topics.tokens(camera), encode(message))
            time.sleep(1.0)
        finally:
            sender.stop()
        fleet.check_alive()
    assert_exit_codes(fleet)
    log = fleet.log_path("node-0").read_text()
    assert log.count("tokens of shape (3, 32); the stem's are (17, 32)") == 1, log
    assert log.count("tokens at block 5; the stem has 1") == 1, log


@pytest.mark.fleet
def test_camera_asking_for_more_head_slices_than_the_stem_fails_at_start(
    mosquitto_broker: LocalBroker, sliced_digits_bundle: Path
) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    deploy(Bundle.load(sliced_digits_bundle), mosquitto_broker.url, topics=topics)
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "camera", "--id", "c", "--source", "dataset:digits",
         "--head-slices", "2", "--broker", mosquitto_broker.url, "--prefix", topics.prefix,
         "--log-level", "ERROR"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "more blocks than the bundle's stem has (1)" in lines[0], done.stderr
