"""The plan follower (edvit/retained.py), alone and inside the node and the aggregator, over
the in-memory transport: fast tests of plan switches, refusals and joins without a broker.
The same paths run against a real mosquitto in test_plan_switch.py."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
from memory_transport import MemoryBroker, MemoryTransport

from edvit.aggregator.service import Aggregator, DeadlinePolicy
from edvit.bundle import Bundle
from edvit.edge_node.node import EdgeNode, aligns_drops
from edvit.errors import ConfigError
from edvit.fleet.ops.deploy import make_plan, publish_bundle, round_robin
from edvit.mqtt import MqttClient
from edvit.retained import PlanFollower
from edvit.schemas import (
    FeaturesMsg,
    FrameMsg,
    ModelMsg,
    PlanMsg,
    PredictionMsg,
    Preprocessing,
    StatusMsg,
    SubmodelRef,
    decode,
    encode,
)
from edvit.topics import Topics
from helpers import dataset_pngs, wait_until

SHA_A = "a" * 64


def _model(payload: bytes) -> bytes:
    from edvit.bundle import sha256_bytes

    return encode(ModelMsg(sha256=sha256_bytes(payload), onnx=payload))


def _plan(plan_id: str, models: dict[str, bytes]) -> PlanMsg:
    from edvit.bundle import sha256_bytes

    refs = tuple(
        SubmodelRef(id=mid, classes=(i,), sha256=sha256_bytes(blob), feature_dim=2)
        for i, (mid, blob) in enumerate(models.items())
    )
    return PlanMsg(
        plan_id=plan_id, bundle_sha256=SHA_A, classes=tuple(str(i) for i in range(len(refs))),
        submodels=refs, assignments={"n": tuple(models)}, fusion_sha256=SHA_A,
        preprocessing=Preprocessing(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,)),
    )  # fmt: skip


class _Recorder:
    """A loader that records what it loaded and on which thread."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.loads: list[tuple[str, dict[str, bytes], str]] = []
        self.fail_on = fail_on

    def __call__(self, plan: PlanMsg, blobs: dict[str, bytes]) -> dict[str, bytes]:
        self.loads.append((plan.plan_id, blobs, threading.current_thread().name))
        if self.fail_on is not None and self.fail_on in blobs.values():
            raise ConfigError("cannot load this one")
        return blobs


def _follower(broker: MemoryBroker, loader: _Recorder) -> tuple[PlanFollower, MemoryTransport]:
    client = MemoryTransport(broker)
    follower: PlanFollower[dict[str, bytes]] = PlanFollower(
        client, Topics(), lambda plan: {s.id: s.sha256 for s in plan.submodels}, loader
    )
    follower.start()
    return follower, client


def test_follower_loads_off_the_network_thread_and_swaps_atomically() -> None:
    broker, topics, loader = MemoryBroker(), Topics(), _Recorder()
    follower, client = _follower(broker, loader)
    try:
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        plan = _plan("p1", {"m0": b"zero", "m1": b"one"})
        broker.publish(topics.plan(), encode(plan), retain=True)
        assert follower.target == plan and follower.active is None  # m1 not here yet
        assert follower.received() == {"m0"}
        broker.publish(topics.model("m1"), _model(b"one"), retain=True)
        wait_until(lambda: follower.ready)
        active = follower.active
        assert active is not None and active.plan == plan
        assert active.runtime == {"m0": b"zero", "m1": b"one"}
        assert [(pid, thread) for pid, _, thread in loader.loads] == [("p1", "loader")]
        assert set(client.routes) == {topics.plan(), topics.model("m0"), topics.model("m1")}
    finally:
        follower.stop()


def test_follower_refuses_bad_bytes_and_keeps_models_of_the_next_plan() -> None:
    broker, topics, loader = MemoryBroker(), Topics(), _Recorder()
    follower, client = _follower(broker, loader)
    try:
        broker.publish(topics.plan(), encode(_plan("p1", {"m0": b"zero"})), retain=True)
        # Bytes that do not hash to what their message says: refused, counted, not stored.
        tampered = encode(ModelMsg(sha256=decode(ModelMsg, _model(b"zero")).sha256, onnx=b"zer0"))
        broker.publish(topics.model("m0"), tampered, retain=True)
        assert client.counters["models_refused"] == 1 and client.counters["bad_payloads"] == 1
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        wait_until(lambda: follower.ready)
        # A deploy publishes the next plan's model first: sound bytes, kept, not refused.
        broker.publish(topics.model("m0"), _model(b"zero v2"), retain=True)
        assert client.counters["models_refused"] == 1
        assert follower.active is not None and follower.active.runtime == {"m0": b"zero"}
        broker.publish(topics.plan(), encode(_plan("p2", {"m0": b"zero v2"})), retain=True)
        wait_until(lambda: follower.ready and follower.active.plan.plan_id == "p2")
        assert follower.active.runtime == {"m0": b"zero v2"}
    finally:
        follower.stop()


def test_same_models_switch_without_loading_and_dropped_models_are_unsubscribed() -> None:
    broker, topics, loader = MemoryBroker(), Topics(), _Recorder()
    follower, client = _follower(broker, loader)
    try:
        for mid, blob in (("m0", b"zero"), ("m1", b"one")):
            broker.publish(topics.model(mid), _model(blob), retain=True)
        broker.publish(topics.plan(), encode(_plan("p1", {"m0": b"zero"})), retain=True)
        wait_until(lambda: follower.ready)
        p1_runtime = follower.active.runtime
        broker.publish(topics.plan(), encode(_plan("p2", {"m0": b"zero"})), retain=True)
        wait_until(lambda: follower.ready and follower.active.plan.plan_id == "p2")
        assert follower.active.runtime is p1_runtime and len(loader.loads) == 1
        broker.publish(topics.plan(), encode(_plan("p3", {"m1": b"one"})), retain=True)
        wait_until(lambda: follower.ready and follower.active.plan.plan_id == "p3")
        assert topics.model("m0") not in client.routes and topics.model("m1") in client.routes
        broker.publish(topics.plan(), b"", retain=True)  # cleared
        wait_until(lambda: follower.active is None)
        assert set(client.routes) == {topics.plan()}
    finally:
        follower.stop()


def test_a_plan_that_cannot_load_is_refused_and_the_old_one_keeps_serving() -> None:
    broker, topics, loader = MemoryBroker(), Topics(), _Recorder(fail_on=b"broken")
    follower, client = _follower(broker, loader)
    try:
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        broker.publish(topics.plan(), encode(_plan("p1", {"m0": b"zero"})), retain=True)
        wait_until(lambda: follower.ready)
        broker.publish(topics.model("m1"), _model(b"broken"), retain=True)
        broker.publish(topics.plan(), encode(_plan("p2", {"m1": b"broken"})), retain=True)
        wait_until(lambda: follower.refused is not None)
        assert follower.refused == "plan p2: cannot load this one"
        assert follower.active.plan.plan_id == "p1" and not follower.ready
        assert client.counters["plans_refused"] == 1
    finally:
        follower.stop()


def test_network_thread_keeps_delivering_while_a_slow_model_loads(mosquitto_broker) -> None:
    """The real client: a load taking 2 s never holds up other messages."""
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    started, loaded = threading.Event(), threading.Event()

    def slow_load(plan: PlanMsg, blobs: dict[str, bytes]) -> dict[str, bytes]:
        started.set()
        time.sleep(2.0)
        loaded.set()
        return blobs

    arrivals: list[float] = []
    client = MqttClient(f"slow-{uuid.uuid4().hex[:6]}", mosquitto_broker.url)
    follower: PlanFollower[dict[str, bytes]] = PlanFollower(
        client, topics, lambda plan: {s.id: s.sha256 for s in plan.submodels}, slow_load
    )
    client.route(f"{topics.prefix}/ping", lambda _t, _p: arrivals.append(time.monotonic()))
    follower.start()
    client.start(required=True)
    sender = MqttClient(f"ping-{uuid.uuid4().hex[:6]}", mosquitto_broker.url)
    sender.start(required=True)
    try:
        sender.publish_and_wait(topics.model("m0"), _model(b"zero"), retain=True)
        sender.publish_and_wait(topics.plan(), encode(_plan("p1", {"m0": b"zero"})), retain=True)
        assert started.wait(10)
        sent = 0
        while not loaded.is_set():
            sender.publish(f"{topics.prefix}/ping", b"x")
            sent += 1
            time.sleep(0.02)
        wait_until(lambda: len(arrivals) == sent, 5)
        gaps = np.diff(arrivals)
        assert sent > 50 and gaps.max() < 0.5, (sent, gaps.max())
        wait_until(lambda: follower.ready)
    finally:
        sender.publish_and_wait(topics.plan(), b"", retain=True)
        sender.publish_and_wait(topics.model("m0"), b"", retain=True)
        follower.stop()
        client.stop()
        sender.stop()


# -- node and aggregator over the in-memory transport, with the real digits bundle ----------


class _MemoryFleet:
    """Three nodes and an aggregator on one in-memory broker."""

    def __init__(self, nodes: list[str]) -> None:
        self.broker = MemoryBroker()
        self.topics = Topics()
        self.nodes = [
            EdgeNode(n, client=MemoryTransport(self.broker, n), max_wait_ms=0, newest_only=False)
            for n in nodes
        ]
        self.aggregator = Aggregator(
            client=MemoryTransport(self.broker, "aggregator"),
            deadline=DeadlinePolicy(floor_s=0.3, cap_s=0.3),  # fixed: see test_handlers_fuzz
        )
        self.deployer = MemoryTransport(self.broker, "deploy")

    def __enter__(self) -> _MemoryFleet:
        for service in (*self.nodes, self.aggregator):
            service.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for service in (*self.nodes, self.aggregator):
            service.stop()

    def deploy(self, bundle: Bundle, nodes: list[str]) -> PlanMsg:
        plan = make_plan(bundle, round_robin([s.id for s in bundle.manifest.submodels], nodes))
        publish_bundle(
            lambda t, p: self.deployer.publish(t, p, retain=True), bundle, plan, self.topics
        )
        return plan

    def serving(self, plan: PlanMsg) -> bool:
        followers = [n.follower for n in self.nodes] + [self.aggregator.follower]
        return all(f.ready and f.active.plan.plan_id == plan.plan_id for f in followers)

    def send(self, seq: int, png: bytes, label: int) -> None:
        frame = FrameMsg(camera="c", seq=seq, ts=time.time(), enc="png", data=png, label=label)
        self.deployer.publish(self.topics.frame("c"), encode(frame))

    def predictions(self) -> list[PredictionMsg]:
        return [
            decode(PredictionMsg, p) for p in self.broker.messages(self.topics.all_predictions())
        ]


def test_plan_switch_in_memory_loses_and_repeats_no_frame(digits_bundle: Path) -> None:
    bundle = Bundle.load(digits_bundle)
    frames = dataset_pngs("digits", 60)
    with _MemoryFleet(["n0", "n1", "n2"]) as fleet:
        first = fleet.deploy(bundle, ["n0", "n1", "n2"])
        wait_until(lambda: fleet.serving(first) and fleet.aggregator.answering)
        for seq, (png, label) in enumerate(frames[:20]):
            fleet.send(seq, png, label)
        second = fleet.deploy(bundle, ["n2", "n0", "n1"])  # every sub-model moves
        assert second.plan_id != first.plan_id
        for seq, (png, label) in enumerate(frames[20:], start=20):
            fleet.send(seq, png, label)  # while the nodes load the new plan
            time.sleep(0.002)
        wait_until(lambda: fleet.serving(second))
        wait_until(lambda: len(fleet.predictions()) >= 60 and not fleet.aggregator._pending, 10)
        time.sleep(0.4)  # past the deadline: anything else would show up now
        predictions = fleet.predictions()
    seqs = sorted(p.seq for p in predictions)
    assert seqs == list(range(60))
    assert {p.plan_id for p in predictions} <= {first.plan_id, second.plan_id}
    assert all(p.plan_id == first.plan_id for p in predictions if p.seq < 20)
    accuracy = np.mean([p.label == p.true_label for p in predictions])
    assert accuracy > 0.7


def test_aggregator_answers_a_frame_whose_features_came_under_the_previous_plan(
    digits_bundle: Path,
) -> None:
    """Features computed under the old plan after the aggregator switched still complete."""
    bundle = Bundle.load(digits_bundle)
    broker, topics = MemoryBroker(), Topics()
    aggregator = Aggregator(
        client=MemoryTransport(broker, "aggregator"), deadline=DeadlinePolicy(cap_s=5.0)
    )
    deployer = MemoryTransport(broker, "deploy")
    aggregator.start()
    try:
        ids = [s.id for s in bundle.manifest.submodels]
        old = make_plan(bundle, round_robin(ids, ["a"]))
        new = make_plan(bundle, round_robin(ids, ["b"]))
        publish = lambda t, p: deployer.publish(t, p, retain=True)  # noqa: E731
        publish_bundle(publish, bundle, old, topics)
        wait_until(lambda: aggregator.follower.ready and aggregator.answering)

        def features(plan: PlanMsg, sid: str) -> None:
            dim = plan.submodel(sid).feature_dim
            node = next(n for n, served in plan.assignments.items() if sid in served)
            msg = FeaturesMsg(
                camera="c", seq=7, ts=123.0, submodel=sid, plan_id=plan.plan_id, node=node,
                dtype="float32", data=np.ones(dim, np.float32).tobytes(), dim=dim, infer_ms=0.1,
            )  # fmt: skip
            deployer.publish(topics.features("c", sid, node), encode(msg))

        features(old, ids[0])
        publish_bundle(publish, bundle, new, topics)
        wait_until(lambda: aggregator.follower.active.plan.plan_id == new.plan_id)
        for sid in ids[1:]:
            features(old, sid)
        features(new, ids[0])  # the same frame under the new plan: late, not a second answer
        answers = [decode(PredictionMsg, p) for p in broker.messages(topics.all_predictions())]
        assert [(p.seq, p.plan_id, p.degraded) for p in answers] == [(7, old.plan_id, False)]
        assert aggregator.counters["features_late"] == 1
    finally:
        aggregator.stop()


def _aggregator_for_two_nodes(
    digits_bundle: Path, deadline: DeadlinePolicy
) -> tuple[MemoryBroker, Topics, Aggregator, MemoryTransport, PlanMsg]:
    """A started aggregator following a plan that splits the digits bundle over nodes `a`
    and `b`, and a client to send as them."""
    bundle = Bundle.load(digits_bundle)
    broker, topics = MemoryBroker(), Topics()
    aggregator = Aggregator(client=MemoryTransport(broker, "aggregator"), deadline=deadline)
    sender = MemoryTransport(broker, "sender")
    aggregator.start()
    plan = make_plan(bundle, round_robin([s.id for s in bundle.manifest.submodels], ["a", "b"]))
    publish_bundle(lambda t, p: sender.publish(t, p, retain=True), bundle, plan, topics)
    return broker, topics, aggregator, sender, plan


def test_aggregator_takes_features_only_from_the_node_the_plan_names(
    digits_bundle: Path,
) -> None:
    """The topic names the node (the broker's ACL pins it to the login); the plan the features
    name must give that node the sub-model. Anything else is one bad payload, never a join,
    so no node can answer for, or get suspected for, another node's sub-model. Features on
    the older topic without the node level still join."""
    broker, topics, aggregator, sender, plan = _aggregator_for_two_nodes(
        digits_bundle, DeadlinePolicy(cap_s=5.0)
    )
    try:
        ids = [s.id for s in plan.submodels]
        wait_until(lambda: aggregator.follower.ready and aggregator.answering)
        owner = {sid: node for node, served in plan.assignments.items() for sid in served}

        def send(seq: int, sid: str, node: str, topic_node: str | None) -> None:
            dim = plan.submodel(sid).feature_dim
            msg = FeaturesMsg(
                camera="c", seq=seq, ts=123.0, submodel=sid, plan_id=plan.plan_id, node=node,
                dtype="float32", data=np.ones(dim, np.float32).tobytes(), dim=dim, infer_ms=0.1,
            )  # fmt: skip
            topic = (
                topics.features("c", sid, topic_node)
                if topic_node is not None
                else f"{topics.prefix}/features/c/{sid}"
            )
            sender.publish(topic, encode(msg))

        other = {"a": "b", "b": "a"}
        send(1, ids[0], other[owner[ids[0]]], other[owner[ids[0]]])  # not its sub-model
        send(1, ids[0], owner[ids[0]], other[owner[ids[0]]])  # topic names another node
        assert aggregator.client.counters["bad_payloads"] == 2
        for sid in ids:
            send(2, sid, owner[sid], None if sid == ids[0] else owner[sid])
        answers = [decode(PredictionMsg, p) for p in broker.messages(topics.all_predictions())]
        assert [(p.seq, p.degraded) for p in answers] == [(2, False)]
    finally:
        aggregator.stop()


def test_a_node_that_is_behind_is_not_suspected_but_a_silent_one_is(
    digits_bundle: Path,
) -> None:
    """Node `a` sends features for one frame in four (a node behind its cameras, dropping
    the rest) and is never suspected: its work stays. Node `b` then sends nothing at all and
    is suspected after SUSPECT_AFTER misses and a silence of SUSPECT_AFTER times the longer
    of the deadline and its usual gap between features."""
    _, topics, aggregator, sender, plan = _aggregator_for_two_nodes(
        digits_bundle, DeadlinePolicy(floor_s=0.03, cap_s=0.03)
    )
    try:
        ids = [s.id for s in plan.submodels]
        for node in ("a", "b"):
            status = StatusMsg(state="ready", plan_id=plan.plan_id, serving_plan_id=plan.plan_id)
            sender.publish(topics.node_status(node), encode(status), retain=True)
        wait_until(lambda: aggregator.follower.ready and aggregator.answering)
        owner = {sid: node for node, served in plan.assignments.items() for sid in served}

        def send(seq: int, sid: str) -> None:
            dim = plan.submodel(sid).feature_dim
            msg = FeaturesMsg(
                camera="c", seq=seq, ts=float(seq), submodel=sid, plan_id=plan.plan_id,
                node=owner[sid], dtype="float32", data=np.ones(dim, np.float32).tobytes(),
                dim=dim, infer_ms=0.1,
            )  # fmt: skip
            sender.publish(topics.features("c", sid, owner[sid]), encode(msg))

        for seq in range(24):  # a frame every 20 ms; `a` serves every fourth
            for sid in ids:
                if owner[sid] == "b" or seq % 4 == 0:
                    send(seq, sid)
            time.sleep(0.02)
        wait_until(lambda: not aggregator._pending)
        assert aggregator.suspect_nodes() == set()
        for seq in range(24, 40):  # `b` falls silent
            for sid in ids:
                if owner[sid] == "a" and seq % 4 == 0:
                    send(seq, sid)
            time.sleep(0.02)
        wait_until(lambda: "b" in aggregator.suspect_nodes())
        assert "a" not in aggregator.suspect_nodes()
    finally:
        aggregator.stop()


def test_only_a_node_with_a_share_of_the_plan_aligns_its_drops(digits_bundle: Path) -> None:
    bundle = Bundle.load(digits_bundle)
    ids = [s.id for s in bundle.manifest.submodels]
    split = make_plan(bundle, round_robin(ids, ["a", "b"]))
    whole = make_plan(bundle, round_robin(ids, ["a"]))
    assert aligns_drops(split, "a") and aligns_drops(split, "b")
    assert not aligns_drops(whole, "a")
