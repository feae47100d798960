"""End to end over a real broker: deploy a bundle, run nodes, aggregator and camera as real
processes, and check every frame gets exactly one prediction equal to the offline one."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy, make_plan, round_robin
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream, watch
from edvit.inference import OfflinePredictor, softmax
from edvit.mqtt import MqttClient, unique_client_id
from edvit.preprocess import dataset_to_model_input
from edvit.schemas import FrameMsg, ModelMsg, PredictionMsg, StatusMsg, decode, encode
from edvit.topics import Topics
from helpers import assert_exit_codes, collect_predictions

FRAMES = 40


def _topics() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:8]}")  # retained state of other tests stays out


def _start_fleet(fleet: LocalFleet, bundle: Bundle, broker: LocalBroker, topics: Topics):
    plan = deploy(bundle, broker.url, topics=topics)
    for node in plan.assignments:
        fleet.spawn(node, "node", "--id", node, "--keep-all-frames")
    fleet.spawn("aggregator", "aggregator")
    stream = PredictionStream(broker.url, topics=topics)
    stream.start()
    fleet.wait_ready(plan, timeout=60)
    return plan, stream


@pytest.mark.fleet
def test_every_frame_gets_one_prediction_equal_to_offline(
    broker: LocalBroker, digits_bundle: Path, tmp_path: Path
) -> None:
    bundle = Bundle.load(digits_bundle)
    topics = _topics()
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        plan, stream = _start_fleet(fleet, bundle, broker, topics)
        try:
            fleet.spawn(
                "camera", "camera", "--id", "cam0", "--source", "dataset:digits",
                "--count", str(FRAMES), "--fps", "40",
            )  # fmt: skip
            predictions = collect_predictions(stream, FRAMES, timeout=60)
            # Anything answered twice would arrive right behind the first answer.
            predictions += collect_predictions(stream, 1, timeout=1.0)
        finally:
            stream.stop()
    assert_exit_codes(fleet)  # nodes, aggregator and camera: 0

    seqs = sorted(p.seq for p in predictions)
    assert seqs == list(range(FRAMES)), "every frame exactly one prediction"
    assert not any(p.degraded for p in predictions)
    assert {p.plan_id for p in predictions} == {plan.plan_id}

    test = load_dataset("digits", "test")
    images = dataset_to_model_input(test.images[:FRAMES], bundle.manifest.preprocessing)
    offline = softmax(OfflinePredictor(bundle).fused_logits(images))
    by_seq = {p.seq: p for p in predictions}
    fleet_labels = np.array([by_seq[i].label for i in range(FRAMES)])
    np.testing.assert_array_equal(fleet_labels, offline.argmax(axis=1))
    fleet_scores = np.array([by_seq[i].score for i in range(FRAMES)])
    np.testing.assert_allclose(fleet_scores, offline.max(axis=1), atol=1e-5)
    assert [by_seq[i].true_label for i in range(FRAMES)] == test.labels[:FRAMES].tolist()
    assert all(p.latency_ms > 0 for p in predictions)


@pytest.mark.fleet
def test_bad_payloads_are_dropped_and_the_fleet_keeps_serving(
    mosquitto_broker: LocalBroker, digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle, topics = mosquitto_broker, Bundle.load(digits_bundle), _topics()
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        plan, stream = _start_fleet(fleet, bundle, broker, topics)
        sender = MqttClient(f"bad-{uuid.uuid4().hex[:6]}", broker.url)
        sender.start(required=True)
        try:
            frame_topic = topics.frame("cam9")
            bad_frames = [
                b"\x00garbage",
                msgpack.packb({"v": 7, "camera": "cam9"}),
                encode(FrameMsg(camera="cam9", seq=0, ts=time.time(), enc="png", data=b"nope")),
            ]
            for payload in bad_frames:
                sender.publish(frame_topic, payload)
            sender.publish(topics.features("cam9", "sub0", "node-0"), b"\x93\x01\x02")
            sender.publish(topics.predictions("cam9"), b"")  # not ours to judge; ignored
            good = load_dataset("digits", "test").images[0]
            frame = FrameMsg(camera="cam9", seq=1, ts=time.time(), enc="raw",
                             data=good.tobytes(), shape=good.shape, dtype="uint8")  # fmt: skip
            sender.publish(frame_topic, encode(frame))
            predictions = [
                p for p in collect_predictions(stream, 1, timeout=20) if p.camera == "cam9"
            ]
        finally:
            sender.stop()
            stream.stop()
        assert [p.seq for p in predictions] == [1]
        fleet.check_alive()
    assert_exit_codes(fleet)
    for node in plan.assignments:
        text = fleet.log_path(node).read_text()
        # Garbage, wrong version, undecodable PNG: each dropped as it arrives, never queued.
        assert text.count("dropped message on") == 3, text
        assert text.count("not a decodable png") == 1, text
    aggregator_log = fleet.log_path("aggregator").read_text()
    assert aggregator_log.count("dropped message on") == 1
    assert "bad_payloads=1" in aggregator_log


@pytest.mark.fleet
def test_node_refuses_a_model_whose_sha256_does_not_match(
    mosquitto_broker: LocalBroker, digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle, topics = mosquitto_broker, Bundle.load(digits_bundle), _topics()
    plan = make_plan(bundle, round_robin(["sub0", "sub1", "sub2"], ["node-0"]))
    client = MqttClient(f"tamper-{uuid.uuid4().hex[:6]}", broker.url)
    client.start(required=True)
    statuses: queue.Queue[StatusMsg] = queue.Queue()
    client.route(topics.node_status("node-0"),
                 lambda _t, p: statuses.put(decode(StatusMsg, p)), qos=1)  # fmt: skip
    try:
        for spec in bundle.manifest.submodels:
            onnx = bundle.path(spec.file).read_bytes()
            if spec.id == "sub1":
                onnx = onnx[:-1] + bytes([onnx[-1] ^ 0xFF])  # one flipped byte in transit
            message = ModelMsg(sha256=bundle.file_sha256(spec.file), onnx=onnx)
            client.publish_and_wait(topics.model(spec.id), encode(message), retain=True)
        client.publish_and_wait(topics.plan(), encode(plan), retain=True)
        with LocalFleet(broker.url, tmp_path, topics) as fleet:
            fleet.spawn("node-0", "node", "--id", "node-0")
            deadline = time.monotonic() + 20
            seen: list[StatusMsg] = []
            while time.monotonic() < deadline:
                try:
                    status = statuses.get(timeout=0.2)
                except queue.Empty:
                    continue
                seen.append(status)
                if status.state == "online" and set(status.submodels) == {"sub0", "sub2"}:
                    break
            else:
                pytest.fail(f"node never settled with sub0 and sub2 only: {seen}")
            time.sleep(0.5)  # let anything else the node would do reach the log
        assert_exit_codes(fleet)
        log = fleet.log_path("node-0").read_text()
        assert log.count("refusing model sub1") == 1, log
        assert not any(s.state == "ready" for s in seen)
        # Clean stop published an explicit offline status.
        offline = _collect_status(statuses, lambda s: s.state == "offline", 10)
        assert offline.plan_id == plan.plan_id
        assert offline.counters["models_refused"] == 1 and offline.counters["bad_payloads"] == 1
    finally:
        client.stop()


def _collect_status(statuses: queue.Queue, predicate, timeout: float) -> StatusMsg:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = statuses.get(timeout=0.2)
        except queue.Empty:
            continue
        if status is not None and predicate(status):
            return status
    raise AssertionError("status not seen")


@pytest.mark.fleet
def test_killed_node_goes_offline_through_its_will(
    mosquitto_broker: LocalBroker, digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle, topics = mosquitto_broker, Bundle.load(digits_bundle), _topics()
    client = MqttClient(f"will-{uuid.uuid4().hex[:6]}", broker.url)
    statuses: queue.Queue[StatusMsg] = queue.Queue()
    client.route(topics.node_status("node-0"),
                 lambda _t, p: statuses.put(decode(StatusMsg, p)), qos=1)  # fmt: skip
    client.start(required=True)
    try:
        deploy(bundle, broker.url, nodes=["node-0"], topics=topics)
        with LocalFleet(broker.url, tmp_path, topics) as fleet:
            node = fleet.spawn("node-0", "node", "--id", "node-0")
            _collect_status(statuses, lambda s: s.state == "ready", 30)
            node.kill()
            assert node.wait() == -9
            assert _collect_status(statuses, lambda s: s.state == "offline", 10).ts == 0.0
        assert_exit_codes(fleet, killed=["node-0"])
    finally:
        client.stop()


@pytest.mark.fleet
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["camera", "--id", "c", "--source", "missing.mp4"], "is not dataset:NAME"),
        (["camera", "--id", "c/x", "--source", "dataset:digits"], "must be non-empty"),
        (["camera", "--id", "c", "--source", "dataset:imagenet"], "unknown dataset"),
        (["deploy", "/nonexistent/bundle"], "manifest.json not found"),
        (["node", "--id", "n", "--prefix", "a/"], "--prefix"),
        (["deploy", "/nonexistent", "--broker", "http://x"], "manifest.json not found"),
        (["demo", "--bundle", "/nonexistent"], "no bundle at /nonexistent"),
    ],
)
def test_bad_cli_input_gives_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edvit", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.fleet
def test_fleet_reconnects_and_resubscribes_after_broker_restart(
    mosquitto_broker: LocalBroker, digits_bundle: Path, tmp_path: Path
) -> None:
    broker, bundle, topics = mosquitto_broker, Bundle.load(digits_bundle), _topics()
    with LocalFleet(broker.url, tmp_path, topics) as fleet:
        _plan, stream = _start_fleet(fleet, bundle, broker, topics)
        stream.stop()
        broker.restart(hard=True)  # a crash: no clean disconnects, retained state gone
        stream = PredictionStream(broker.url, topics=topics)
        stream.start()
        probe = MqttClient(f"restart-{uuid.uuid4().hex[:6]}", broker.url)
        ready: queue.Queue[str] = queue.Queue()

        def on_status(topic: str, payload: bytes) -> None:
            status = decode(StatusMsg, payload)
            if status is not None and status.state == "ready":
                ready.put(topic)

        probe.route(topics.all_node_statuses(), on_status, qos=1)
        probe.route(topics.aggregator_status(), on_status, qos=1)
        probe.start(required=True)
        try:
            # Every service republishes its retained status once it is back.
            back: set[str] = set()
            while len(back) < 4:
                back.add(ready.get(timeout=30))
            fleet.spawn(
                "camera", "camera", "--id", "cam1", "--source", "dataset:digits",
                "--count", "10", "--fps", "20",
            )  # fmt: skip
            predictions = collect_predictions(stream, 10, timeout=30)
        finally:
            probe.stop()
            stream.stop()
    assert_exit_codes(fleet)  # the broker crashed under them; the services did not
    assert sorted(p.seq for p in predictions) == list(range(10))
    for node in ("node-0", "node-1", "node-2"):
        assert "lost broker" in fleet.log_path(node).read_text()


@pytest.mark.fleet
@pytest.mark.parametrize("bundle_kind", ["digits", "shipped"])
def test_demo_command_prints_summary_and_exits_0(
    bundle_kind: str, digits_bundle: Path, tmp_path: Path
) -> None:
    args = ["--bundle", str(digits_bundle)] if bundle_kind == "digits" else []
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "demo", "--frames", "30", "--fps", "30",
         "--log-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("summary") :]
    assert "frames sent          30" in summary
    assert "predictions received 30 (30 distinct frames)" in summary
    assert "accuracy" in summary and "p95" in summary
    bundle_line = next(line for line in done.stdout.splitlines() if line.startswith("bundle "))
    assert "3 sub-models" in bundle_line
    if bundle_kind != "digits":  # the shipped bundle's report states its cuts
        assert "smaller and" in bundle_line and "fused vs" in bundle_line


def test_watch_names_the_true_class_of_a_miss(mosquitto_broker: LocalBroker, capsys) -> None:
    """`edvit watch` follows the plan: a missed answer names its true class, not an index."""
    topics = _topics()
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), {"n": ("sub0", "sub1", "sub2")})
    answer = PredictionMsg(
        camera="cam0", seq=1, ts=time.time(), label=0, class_name=plan.classes[0], score=0.5,
        topk=((plan.classes[0], 0.5),), latency_ms=3.0, submodels=("sub0",),
        plan_id=plan.plan_id, true_label=1,
    )  # fmt: skip
    client = MqttClient(unique_client_id("test-watch"), mosquitto_broker.url)
    client.start(required=True)
    stop, shown = threading.Event(), []
    watcher = threading.Thread(
        target=lambda: shown.append(watch(mosquitto_broker.url, count=1, topics=topics, stop=stop))
    )
    try:
        client.publish_and_wait(topics.plan(), encode(plan), qos=1, retain=True)
        watcher.start()
        deadline = time.monotonic() + 20
        while watcher.is_alive() and time.monotonic() < deadline:  # until watch shows one
            client.publish(topics.predictions("cam0"), encode(answer), qos=1)
            watcher.join(0.5)
    finally:
        stop.set()
        watcher.join()
        client.publish_and_wait(topics.plan(), b"", qos=1, retain=True)
        client.stop()
    out = capsys.readouterr().out
    assert shown == [1] and f"MISS (true {plan.classes[1]})" in out, out
