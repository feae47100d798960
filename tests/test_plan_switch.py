"""Plans change under a running fleet (real mosquitto, real processes): nothing is lost or
answered twice, answers name their plan, the camera head follows every plan, and
`deploy --clear` removes everything a deploy published."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.schemas import FrameMsg, PredictionMsg, TokensMsg, decode
from edvit.topics import Topics
from helpers import MqttProbe, assert_exit_codes

FPS = 20
FRAMES = 120  # 6 s of stream; the switch happens in the middle


def _topics() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:8]}")


def _drain(stream: PredictionStream, until: float) -> list[PredictionMsg]:
    got = []
    while time.monotonic() < until:
        with contextlib.suppress(queue.Empty):
            got.append(stream.queue.get(timeout=0.1))
    return got


@pytest.mark.fleet
def test_redeploying_another_bundle_under_a_20_fps_stream_loses_and_repeats_nothing(
    mosquitto_broker: LocalBroker, digits_bundle: Path, sliced_digits_bundle: Path, tmp_path: Path
) -> None:
    broker, topics = mosquitto_broker, _topics()
    nodes = ["node-0", "node-1", "node-2"]
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        first = deploy(Bundle.load(digits_bundle), broker.url, nodes, topics)
        for node in nodes:
            fleet.spawn(node, "node", "--id", node, "--keep-all-frames")
        fleet.spawn("aggregator", "aggregator")
        stream = PredictionStream(broker.url, topics=topics)
        stream.start()
        try:
            fleet.wait_ready(first, timeout=60)
            fleet.spawn(
                "camera", "camera", "--id", "cam0", "--source", "dataset:digits",
                "--count", str(FRAMES), "--fps", str(FPS),
            )  # fmt: skip
            # Switch once the stream is flowing: a loaded machine can take over 2 s to start
            # the camera, and then no frame would be answered under the first plan.
            predictions: list[PredictionMsg] = []
            flowing = time.monotonic() + 20.0
            while not predictions and time.monotonic() < flowing:
                predictions += _drain(stream, time.monotonic() + 0.2)
            predictions += _drain(stream, time.monotonic() + 1.0)
            switch_started = time.time()
            # A different bundle: the nodes now need stem slices and tails, the aggregator
            # another fusion model.
            second = deploy(Bundle.load(sliced_digits_bundle), broker.url, nodes, topics)
            fleet.wait_ready(second, timeout=30)
            switched = time.time()
            deadline = time.monotonic() + 30
            while len(predictions) < FRAMES and time.monotonic() < deadline:
                predictions += _drain(stream, time.monotonic() + 0.2)
            predictions += _drain(stream, time.monotonic() + 1.5)  # any second answer
        finally:
            stream.stop()
    assert_exit_codes(fleet)

    seqs = sorted(p.seq for p in predictions)
    assert seqs == list(range(FRAMES)), "every frame exactly once across the switch"
    assert first.plan_id != second.plan_id
    assert {p.plan_id for p in predictions} == {first.plan_id, second.plan_id}
    before = [p for p in predictions if p.ts < switch_started]
    after = [p for p in predictions if p.ts > switched]
    assert before and after
    assert all(p.plan_id == first.plan_id for p in before)
    assert all(p.plan_id == second.plan_id for p in after)
    assert sum(p.degraded for p in predictions) <= 3, "only frames caught mid-switch degrade"


@pytest.mark.fleet
def test_camera_head_follows_every_plan_and_falls_back_to_frames(
    mosquitto_broker: LocalBroker, digits_bundle: Path, sliced_digits_bundle: Path, tmp_path: Path
) -> None:
    broker, topics = mosquitto_broker, _topics()
    sliced = Bundle.load(sliced_digits_bundle)
    first = deploy(sliced, broker.url, ["node-0"], topics)
    camera = "cam-head"
    with (
        LocalFleet(broker.url, tmp_path, topics) as fleet,
        MqttProbe(broker.host, broker.port, f"{topics.prefix}/cameras/{camera}/+") as probe,
    ):
        fleet.spawn("node-0", "node", "--id", "node-0")
        fleet.spawn("node-1", "node", "--id", "node-1")
        fleet.spawn("aggregator", "aggregator")
        fleet.wait_ready(first, timeout=60)
        fleet.spawn(
            "camera", "camera", "--id", camera, "--source", "dataset:digits", "--loop",
            "--fps", "20", "--head-slices", "1",
        )  # fmt: skip

        def sent_under(plan_id: str | None, kind: str, timeout: float = 20.0) -> None:
            def matches(message) -> bool:
                if message.topic == topics.tokens(camera):
                    tokens = decode(TokensMsg, message.payload)
                    return kind == "tokens" and tokens is not None and tokens.plan_id == plan_id
                if message.topic == topics.frame(camera):
                    return kind == "frame" and decode(FrameMsg, message.payload) is not None
                return False

            probe.wait_for(matches, timeout=timeout)

        sent_under(first.plan_id, "tokens")
        # Same stem, sub-models on another node: the head switches to the second plan.
        second = deploy(sliced, broker.url, ["node-1"], topics)
        fleet.wait_ready(second, timeout=30)
        sent_under(second.plan_id, "tokens")
        # A bundle without a stem: the camera cannot run head slices for it and sends frames.
        third = deploy(Bundle.load(digits_bundle), broker.url, ["node-0"], topics)
        fleet.wait_ready(third, timeout=30)
        sent_under(None, "frame")
        # And back: tokens again, under the newest plan.
        fourth = deploy(sliced, broker.url, ["node-0"], topics)
        fleet.wait_ready(fourth, timeout=30)
        sent_under(fourth.plan_id, "tokens")
    assert_exit_codes(fleet)
    assert fleet.log_tail("camera", 200).count("refused plan") == 1


@pytest.mark.fleet
def test_deploy_clear_on_a_sliced_bundle_leaves_no_retained_message(
    mosquitto_broker: LocalBroker, sliced_digits_bundle: Path
) -> None:
    broker, topics = mosquitto_broker, _topics()
    plan = deploy(Bundle.load(sliced_digits_bundle), broker.url, topics=topics)

    def retained_count() -> int:
        with MqttProbe(broker.host, broker.port, f"{topics.prefix}/#") as probe:
            count = 0
            with contextlib.suppress(TimeoutError):
                while True:
                    probe.get(timeout=1.0)
                    count += 1
            return count

    # Sub-models, fusion, embed, K block slices, K from-slices, one tail per sub-model; plan.
    assert retained_count() == len(plan.model_ids()) + 1
    assert len(plan.model_ids()) == 3 + 1 + 1 + 1 + 1 + 3
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "deploy", str(sliced_digits_bundle), "--clear",
         "--broker", broker.url, "--prefix", topics.prefix],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert retained_count() == 0
