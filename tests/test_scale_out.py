"""Scale-out (README, "Scale-out"): node replicas split frames through shared subscriptions,
aggregator shards split cameras. Real mosquitto, real processes, the shipped bundle."""

from __future__ import annotations

import json
import queue
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest

from edvit.aggregator.planner import heal
from edvit.aggregator.service import Shard
from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.errors import ConfigError
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import make_plan, publish_bundle, with_replicas
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.mqtt import MqttClient, matching_filter, shared_filter, unique_client_id
from edvit.schemas import FeaturesMsg, decode
from edvit.topics import Topics
from helpers import assert_exit_codes, collect_predictions

FRAMES = 40


# -- pieces, no broker --------------------------------------------------------------------
def test_shared_filters_match_their_topics() -> None:
    shared = shared_filter("g1", "edvit/cameras/+/frame")
    assert shared == "$share/g1/edvit/cameras/+/frame"
    assert matching_filter(shared) == "edvit/cameras/+/frame"
    assert matching_filter("edvit/cameras/+/frame") == "edvit/cameras/+/frame"
    with pytest.raises(ValueError):
        shared_filter("a/b", "x")


def test_shards_parse_and_split_cameras_stably() -> None:
    assert Shard.parse("1/2") == Shard(1, 2)
    assert str(Shard(1, 2)) == "1-of-2"
    for bad in ("2/2", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)
    owners = [[s for s in range(3) if Shard(s, 3).owns(f"cam{i}")] for i in range(50)]
    assert all(len(o) == 1 for o in owners), "every camera has exactly one shard"
    assert Shard(zlib.crc32(b"cam7") % 3, 3).owns("cam7")
    assert Topics("p").aggregator_lease() == "p/aggregator/lease"
    assert Topics("p").aggregator_lease("0-of-2") == "p/aggregator/lease/0-of-2"


def test_replicas_are_nodes_with_the_same_share() -> None:
    placed = with_replicas({"a": ("s0", "s2"), "b": ("s1",)}, 2)
    assert placed == {"a": ("s0", "s2"), "a-r1": ("s0", "s2"), "b": ("s1",), "b-r1": ("s1",)}
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), with_replicas({"n": ("sub0", "sub1", "sub2")}, 3))
    assert set(plan.assignments) == {"n", "n-r1", "n-r2"}
    with pytest.raises(ConfigError):  # sub0 twice, in two different shares
        make_plan(Bundle.load(DEFAULT_BUNDLE), {"a": ("sub0", "sub1"), "b": ("sub0", "sub2")})


def test_planner_does_not_move_what_a_live_replica_runs() -> None:
    from edvit.placement.devices import Device

    base = {"a": ("s0",), "a-r1": ("s0",), "b": ("s1",)}
    live = {n: Device(id=n, memory_mb=100.0) for n in ("a-r1", "b")}
    placed, unplaced = heal(base, base, live, {"s0": 1.0, "s1": 1.0})
    assert placed == {"a-r1": ("s0",), "b": ("s1",)}
    assert unplaced == ()


# -- real processes -----------------------------------------------------------------------
def _publish_plan(broker: LocalBroker, topics: Topics, assignments: dict) -> object:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    plan = make_plan(bundle, assignments)
    client = MqttClient(unique_client_id("test-deploy"), broker.url)
    client.start(required=True)
    try:
        publish = lambda t, p: client.publish_and_wait(t, p, qos=1, retain=True)  # noqa: E731
        publish_bundle(publish, bundle, plan, topics)
    finally:
        client.stop()
    return plan


@pytest.mark.fleet
def test_replicas_split_the_frames_and_every_frame_is_answered_once(
    mosquitto_broker: LocalBroker, tmp_path: Path
) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    plan = _publish_plan(
        mosquitto_broker, topics,
        {"node-0": ("sub0",), "node-0-r1": ("sub0",), "node-1": ("sub1",), "node-2": ("sub2",)},
    )  # fmt: skip
    features: Counter[tuple[str, str]] = Counter()  # (sub-model, node)

    def on_features(_topic: str, payload: bytes) -> None:
        msg = decode(FeaturesMsg, payload)
        if msg is not None:
            features[(msg.submodel, msg.node)] += 1

    probe = MqttClient(unique_client_id("test-features"), mosquitto_broker.url)
    probe.route(topics.all_features(), on_features)
    probe.start(required=True)
    stream = PredictionStream(mosquitto_broker.url, topics=topics)
    stream.start()
    try:
        with LocalFleet(mosquitto_broker.url, tmp_path, topics) as fleet:
            for node in plan.assignments:
                fleet.spawn(node, "node", "--id", node, "--keep-all-frames")
            fleet.spawn("aggregator", "aggregator", "--timeout-ms", "1000")
            fleet.wait_ready(plan, timeout=60)
            fleet.spawn(
                "camera", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
                "--count", str(FRAMES), "--fps", "40",
            )  # fmt: skip
            predictions = collect_predictions(stream, FRAMES, timeout=40)
            predictions += collect_predictions(stream, 1, timeout=1.0)  # anything answered twice
            time.sleep(0.3)  # the last features on their way to the probe
        assert_exit_codes(fleet)
    finally:
        stream.stop()
        probe.stop()

    assert sorted(p.seq for p in predictions) == list(range(FRAMES)), "each frame once"
    assert not any(p.degraded for p in predictions)
    # The broker gave each frame to one replica: both served some, none computed a frame twice.
    assert features[("sub0", "node-0")] > 0 and features[("sub0", "node-0-r1")] > 0, features
    assert features[("sub0", "node-0")] + features[("sub0", "node-0-r1")] == FRAMES, features
    assert features[("sub1", "node-1")] == features[("sub2", "node-2")] == FRAMES, features


def _cameras_for_two_shards() -> tuple[str, str]:
    names = [f"cam{i}" for i in range(20)]
    first = next(n for n in names if Shard(0, 2).owns(n))
    second = next(n for n in names if Shard(1, 2).owns(n))
    return first, second


def _retained(broker: LocalBroker, topic: str, timeout: float = 10.0) -> dict:
    got: queue.Queue[bytes] = queue.Queue()
    client = MqttClient(unique_client_id("test-retained"), broker.url)
    client.route(topic, lambda _t, p: got.put(p) if p else None, qos=1)
    client.start(required=True)
    try:
        return json.loads(got.get(timeout=timeout))
    finally:
        client.stop()


@pytest.mark.fleet
def test_shards_answer_their_own_cameras_once_and_same_id_nodes_stay_connected(
    mosquitto_broker: LocalBroker, tmp_path: Path
) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    plan = _publish_plan(mosquitto_broker, topics, {"node-0": ("sub0", "sub1", "sub2")})
    cameras = _cameras_for_two_shards()
    stream = PredictionStream(mosquitto_broker.url, topics=topics)
    stream.start()
    try:
        with LocalFleet(mosquitto_broker.url, tmp_path, topics) as fleet:
            # Two processes with one id: unique client ids keep both on the broker (and, one
            # share, they split the frames).
            for name in ("node-0-a", "node-0-b"):
                fleet.spawn(name, "node", "--id", "node-0", "--keep-all-frames")
            for shard in (0, 1):
                fleet.spawn(
                    f"agg-s{shard}", "aggregator", "--shard", f"{shard}/2", "--id",
                    f"agg-s{shard}", "--timeout-ms", "1000", "--stats-interval-s", "1",
                )  # fmt: skip
            fleet.wait_ready(plan, timeout=60)
            for shard in (0, 1):
                lease = _retained(mosquitto_broker, topics.aggregator_lease(f"{shard}-of-2"))
                assert lease["holder"] == f"agg-s{shard}", lease
            for camera in cameras:
                fleet.spawn(
                    camera, "camera", "--id", camera, "--source", "dataset:fashion-mnist",
                    "--count", str(FRAMES), "--fps", "20",
                )  # fmt: skip
            predictions = collect_predictions(stream, 2 * FRAMES, timeout=40)
            predictions += collect_predictions(stream, 1, timeout=1.0)
            time.sleep(1.5)  # a stats interval, for the counters below
            stats = {
                shard: _retained(mosquitto_broker, topics.stats("aggregators", f"agg-s{shard}"))
                for shard in (0, 1)
            }
        assert_exit_codes(fleet)
    finally:
        stream.stop()

    for camera in cameras:
        seqs = sorted(p.seq for p in predictions if p.camera == camera)
        assert seqs == list(range(FRAMES)), f"{camera}: each frame once"
    for shard, camera in enumerate(cameras):
        answered = stats[shard]["frames"]
        assert set(answered) == {camera}, answered  # only its own camera
        assert sum(answered[camera].values()) == FRAMES, answered
        assert stats[shard]["counters"]["features_other_shard"] > 0
    for name in ("node-0-a", "node-0-b"):
        log = fleet.log_path(name).read_text()
        assert log.count("connected to ") == 1 and "lost broker" not in log, log[-2000:]
