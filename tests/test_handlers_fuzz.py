"""Property tests of every topic handler, through the injectable client.

A node serving all three sub-models of the shipped bundle, two aggregators (one answering,
one standby) and a planner (as `edvit aggregator` runs it; its plans are recorded, not
delivered) run on one in-memory broker (tests/memory_transport.py), which delivers through
`edvit.mqtt.deliver` exactly as the real client does. For each topic kind a hypothesis test
publishes hostile payloads: arbitrary bytes, valid messages with one or two fields (nested
ones too) replaced by hostile values, and valid messages whose sizes and shapes disagree.
After every payload:

- no handler raised anything but BadPayload (`handler_errors` is 0 on every transport), no
  worker thread died or failed (`*_errors`, `*_restarts` are 0) and every one is alive;
- a payload the contract refuses (the same `decode` here says so), or one over its topic's
  limit, is counted in `bad_payloads` by every service that reads its topic, exactly once,
  and by nobody else;
- a frame is either refused (and counted) or served, never lost: a good frame sent after
  it is answered, so everything before it was served.

At the end of each test a good frame gets exactly one prediction. The last test runs the
in-process fuzzer of `edvit.fleet.chaos.fuzz` against real processes and a real mosquitto.

Each bug these tests found has a test of its own (test_bug_*).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from memory_transport import MemoryBroker, MemoryTransport

from edvit.aggregator.planner import Planner, heal
from edvit.aggregator.service import Aggregator, DeadlinePolicy
from edvit.bundle import Bundle, sha256_bytes
from edvit.edge_node.node import EdgeNode
from edvit.errors import BadPayload
from edvit.fleet.chaos.fuzz import (
    INF,
    LONG,
    NAN,
    field_paths,
    frame_outcome,
    json_bytes,
    msgpack_bytes,
    plain,
    png_bytes,
    png_header,
)
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import make_plan, publish_bundle, round_robin
from edvit.lease import LeaseMsg
from edvit.limits import MAX_PAYLOAD_BYTES, PayloadKind
from edvit.mqtt import payload_limit
from edvit.placement.devices import Device
from edvit.schemas import (
    Capacity,
    FeaturesMsg,
    FrameMsg,
    HealthMsg,
    ModelMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    TokensMsg,
    decode,
    encode,
)
from edvit.service import Worker
from edvit.topics import Topics
from helpers import dataset_pngs, planner_with_ready_nodes, wait_until

FUZZ = settings(
    max_examples=int(os.environ.get("EDVIT_FUZZ_EXAMPLES", "60")),  # more for a deeper run
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,  # `fuzz` only checks the module fleet around a test
    ],
)
NODE, ANSWERING, STANDBY, PLANNER = "n0", "agg-a", "agg-z", "planner"
SPARE = "n-spare"
CAMERA = "c"  # hostile frames, tokens, features and predictions name this camera
GOOD = "good"  # the good frames' camera
DEADLINE_S = 0.3
MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)


# -- waiting ---------------------------------------------------------------------------------


# -- the fleet -------------------------------------------------------------------------------


class FuzzFleet:
    """A node serving every sub-model and two aggregators on one in-memory broker. (Not a
    dataclass: hypothesis prints a failing example's arguments, dataclass fields and all.)"""

    def __init__(
        self, broker: MemoryBroker, topics: Topics, node: EdgeNode, answering: Aggregator,
        standby: Aggregator, planner: Planner, injector: MemoryTransport, plan: PlanMsg,
        pngs: list[tuple[bytes, int]],
    ) -> None:  # fmt: skip
        self.broker, self.topics, self.node = broker, topics, node
        self.answering, self.standby, self.planner = answering, standby, planner
        self.injector, self.plan, self.pngs = injector, plan, pngs
        self.seq = 0

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"FuzzFleet(plan {self.plan.plan_id}, {self.seq} good frames sent)"

    @property
    def aggregators(self) -> tuple[Aggregator, Aggregator]:
        return self.answering, self.standby

    @property
    def transports(self) -> dict[str, Any]:
        return {
            NODE: self.node.client,
            ANSWERING: self.answering.client,
            STANDBY: self.standby.client,
            PLANNER: self.planner.client,
            "injector": self.injector,
        }

    def workers(self) -> dict[str, Worker]:
        found = {"node.inference": self.node._worker, "node.loader": self.node.follower._worker}
        for agg in self.aggregators:
            found[f"{agg.instance}.sweeper"] = agg._sweeper
            found[f"{agg.instance}.loader"] = agg.follower._worker
            found[f"{agg.instance}.lease"] = agg.lease._worker
        found["planner"] = self.planner._worker
        return found

    def publish(self, topic: str, payload: bytes) -> None:
        self.injector.publish(topic, payload)

    def send_good(self) -> tuple[int, float]:
        """A good frame from the good camera; returns its (seq, ts)."""
        png, label = self.pngs[self.seq % len(self.pngs)]
        key = (self.seq, time.time())
        frame = FrameMsg(camera=GOOD, seq=key[0], ts=key[1], enc="png", data=png, label=label)
        self.seq += 1
        self.publish(self.topics.frame(GOOD), encode(frame))
        return key

    def answers(self, key: tuple[int, float]) -> list[PredictionMsg]:
        found = []
        for payload in self.broker.messages(self.topics.predictions(GOOD)):
            prediction = decode(PredictionMsg, payload)
            if prediction is not None and (prediction.seq, prediction.ts) == key:
                found.append(prediction)
        return found

    def answered(self, key: tuple[int, float], timeout: float = 10.0) -> PredictionMsg:
        wait_until(lambda: self.answers(key), timeout, f"an answer to good frame {key}")
        return self.answers(key)[0]

    def drain(self) -> None:
        """Wait until everything published so far has been served: a good frame sent now is
        answered after every request queued before it (newest_only=False keeps the order)."""
        self.answered(self.send_good())

    def settle(self) -> None:
        """Wait until the node's queue is empty and the worker has had time to run."""
        wait_until(lambda: len(self.node._batcher) == 0, 10, "the node's queue to empty")
        time.sleep(0.01)

    def check(self) -> None:
        """The invariants after any payload: no handler bug, every worker alive and clean."""
        for name, client in self.transports.items():
            assert client.counters["handler_errors"] == 0, (name, dict(client.counters))
            failures = {
                k: v for k, v in client.counters.items()
                if (k.endswith("_errors") or k.endswith("_restarts")) and v
            }  # fmt: skip
            assert not failures, (name, failures)
        for name, worker in self.workers().items():
            assert worker._thread.is_alive(), f"{name} thread died"

    def bad(self) -> dict[str, int]:
        return {name: c.counters["bad_payloads"] for name, c in self.transports.items()}

    def exactly_once(self) -> None:
        """A good frame gets exactly one prediction (also after the deadline has passed)."""
        key = self.send_good()
        prediction = self.answered(key)
        time.sleep(DEADLINE_S + 0.1)
        assert len(self.answers(key)) == 1
        assert prediction.plan_id == self.plan.plan_id and not prediction.degraded
        self.check()


class StatusTransport(MemoryTransport):
    """Publishes the service's status retained on its topic, with counters, as MqttClient
    does (the aggregator and the planner follow the node's status)."""

    def __init__(self, broker: MemoryBroker, name: str, status_topic: str) -> None:
        super().__init__(broker, name)
        self.status_topic = status_topic

    def set_status(self, status: StatusMsg) -> None:
        super().set_status(status)
        stamped = status.model_copy(update={"ts": time.time(), "counters": dict(self.counters)})
        self.publish(self.status_topic, encode(stamped), retain=True)


class RecordingTransport(MemoryTransport):
    """Hears everything, publishes nothing (records it): a planner whose plans do not change
    the fleet under test."""

    def __init__(self, broker: MemoryBroker, name: str) -> None:
        super().__init__(broker, name)
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False):
        self.published.append((topic, payload.encode() if isinstance(payload, str) else payload))
        self.counters["messages_out"] += 1


@pytest.fixture(scope="module")
def fleet() -> Iterator[FuzzFleet]:
    broker, topics = MemoryBroker(), Topics()
    node = EdgeNode(
        NODE, client=StatusTransport(broker, NODE, topics.node_status(NODE)), max_wait_ms=0,
        newest_only=False,
    )  # fmt: skip
    answering, standby = (
        Aggregator(
            client=MemoryTransport(broker, instance), instance=instance,
            # A fixed deadline: in memory the arrival spreads are microseconds, and a loaded
            # test machine can stall a thread for longer than the adaptive floor.
            deadline=DeadlinePolicy(floor_s=DEADLINE_S, cap_s=DEADLINE_S),
        )
        for instance in (ANSWERING, STANDBY)
    )  # fmt: skip
    injector = MemoryTransport(broker, "injector")
    # As `edvit aggregator` wires it, but on a client of its own that publishes nothing.
    planner = Planner(
        RecordingTransport(broker, PLANNER), topics, instance=ANSWERING,
        is_active=lambda: answering.answering, suspects=answering.suspect_nodes,
        min_interval_s=0.0, tick_s=0.05, reconnect_grace_s=0.0, down_confirm_s=0.0,
    )  # fmt: skip
    bundle = Bundle.load(Path(DEFAULT_BUNDLE))
    plan = make_plan(bundle, round_robin([s.id for s in bundle.manifest.submodels], [NODE]))
    # A live node with room that serves nothing: where the planner moves sub-models when the
    # aggregator suspects n0 (KNOWN_BUGS["planner_no_live_node"] when there is none).
    spare = StatusMsg(state="ready", capacity=Capacity(memory_mb=1e6, speed=1.0))
    injector.publish(topics.node_status(SPARE), encode(spare), retain=True)
    node.start()
    answering.start()
    planner.start()
    publish_bundle(lambda t, p: injector.publish(t, p, retain=True), bundle, plan, topics)
    wait_until(lambda: answering.answering, 10, "the first aggregator to take the lease")
    standby.start()  # hears the retained lease: a standby
    fleet = FuzzFleet(
        broker,
        topics,
        node,
        answering,
        standby,
        planner,
        injector,
        plan,
        dataset_pngs("fashion-mnist", 16),
    )
    followers = [node.follower, answering.follower, standby.follower]
    wait_until(
        lambda: all(f.ready and f.active.plan == plan for f in followers),
        20, "every service to serve the plan",
    )  # fmt: skip
    time.sleep(0.6)  # the standby's start-up grace passes with the lease held by the other
    assert answering.answering and not standby.answering
    fleet.exactly_once()
    try:
        yield fleet
    finally:
        for service in (node, standby, planner, answering):
            service.stop()


@pytest.fixture
def fuzz(fleet: FuzzFleet) -> Iterator[FuzzFleet]:
    """The module's fleet, checked before and after a test (one good frame answered once)."""
    fleet.check()
    yield fleet
    fleet.exactly_once()


# -- hostile values and payloads ---------------------------------------------------------------
SPECIAL: list[Any] = [
    NAN, INF, -INF, 2**62, -1, 0, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -1e308, 5e-324, -0.0,
    True, False, None, "", LONG, "\x00\n\u202e\ufeff", "ünïcödé", [], {}, [[[]]], [NAN] * 3,
    {"a": [1, {"b": NAN}]}, [1, "a", None], {"v": 1},
]  # fmt: skip


def _special(json_text: bool) -> list[Any]:
    return SPECIAL if json_text else [*SPECIAL, b"", b"\x00" * 7, b"x" * 70_000]


def junk(json_text: bool) -> st.SearchStrategy[Any]:
    """Hostile values: specials, any int msgpack can carry, any float, text, nested junk."""
    leaves = st.one_of(
        st.sampled_from(_special(json_text)),
        MSGPACK_INT,
        st.floats(),
        st.text(max_size=30),
        st.booleans(),
        st.none(),
        st.nothing() if json_text else st.binary(max_size=40),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                     max_size=4),
        max_leaves=8,
    )  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], json_text: bool) -> dict[str, Any]:
    """`base` with one or two fields (nested ones too) replaced, deleted, or added."""
    message = copy.deepcopy(base)
    paths = field_paths(message)
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths + [("extra",), ("v",)]))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete"]))
        value = draw(junk(json_text))
        target: Any = message
        try:
            for key in path[:-1]:
                target = target[key]
            if action == "delete":
                del target[path[-1]]
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit of this message removed the field
    return message


def hostile(base: dict[str, Any], json_text: bool, min_size: int = 0) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or `base` mutated and encoded as its topic's format."""
    encoded = mutated(base, json_text).map(json_bytes if json_text else msgpack_bytes)
    return st.one_of(st.binary(min_size=min_size, max_size=300), encoded, encoded)


@st.composite
def inconsistent_frames(draw: st.DrawFn, camera: str = CAMERA) -> bytes:
    """Frames whose encoding, shape and data disagree, or odd but valid images."""
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    c = draw(st.sampled_from([1, 3, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    png = png_bytes(image if c > 1 else image[:, :, 0])
    kind = draw(st.sampled_from(
        ["raw-size", "raw-ok", "png-ok", "png-as-jpeg", "png-cut", "png-16", "png-huge",
         "png-shape", "jpeg-junk", "raw-channels"]
    ))  # fmt: skip
    fields: dict[str, Any] = {"enc": "png", "data": png}
    if kind == "raw-size":
        delta = draw(st.integers(-5, 5).filter(bool))
        fields = {"enc": "raw", "shape": [h, w, c], "dtype": "uint8",
                  "data": bytes(max(h * w * c + delta, 1))}  # fmt: skip
    elif kind == "raw-ok":
        fields = {"enc": "raw", "shape": [h, w, c], "dtype": "uint8", "data": image.tobytes()}
    elif kind == "raw-channels":
        fields = {"enc": "raw", "shape": [h, w, 2], "dtype": "uint8", "data": bytes(h * w * 2)}
    elif kind == "png-as-jpeg":
        fields["enc"] = "jpeg"
    elif kind == "png-cut":
        fields["data"] = png[: draw(st.integers(1, len(png) - 1))]
    elif kind == "png-16":
        fields["data"] = png_bytes(image[:, :, 0].astype(np.uint16) * 257)
    elif kind == "png-huge":
        fields["data"] = png_header(draw(st.integers(4000, 2**31 - 1)), 4000)
    elif kind == "png-shape":
        fields["shape"] = [draw(st.integers(1, 65535)) for _ in range(draw(st.integers(0, 3)))]
    elif kind == "jpeg-junk":
        fields = {"enc": "jpeg", "data": b"\xff\xd8" + draw(st.binary(max_size=64))}
    message = {"v": 1, "camera": camera, "seq": draw(st.integers(0, 2**40)), "ts": 1.5,
               "label": None, "shape": None, "dtype": None, **fields}  # fmt: skip
    return msgpack_bytes(message)


def frame_base(camera: str = CAMERA) -> dict[str, Any]:
    png = png_bytes(np.full((28, 28), 128, np.uint8))
    frame = FrameMsg(camera=camera, seq=7, ts=1.5, enc="png", data=png, label=3)
    return plain(frame.model_dump(mode="python"))


def tokens_base() -> dict[str, Any]:
    tokens = TokensMsg(camera=CAMERA, seq=1, ts=1.5, block=1, dtype="float32", shape=(4, 8),
                       data=bytes(4 * 8 * 4), label=2, plan_id="p")  # fmt: skip
    return plain(tokens.model_dump(mode="python"))


@st.composite
def inconsistent_tokens(draw: st.DrawFn) -> bytes:
    rows, width = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    size = rows * width * (4 if dtype == "float32" else 2) + draw(st.sampled_from([0, 0, 1, -1]))
    message = {**tokens_base(), "shape": [rows, width], "dtype": dtype,
               "data": bytes(max(size, 0)), "block": draw(st.integers(-1, 300))}  # fmt: skip
    return msgpack_bytes(message)


def features_base(plan: PlanMsg, sid: str) -> dict[str, Any]:
    dim = plan.submodel(sid).feature_dim
    features = FeaturesMsg(
        camera=CAMERA, seq=3, ts=1.5, submodel=sid, plan_id=plan.plan_id, node="x",
        dtype="float32", data=np.ones(dim, np.float32).tobytes(), dim=dim, infer_ms=0.1, label=1,
    )  # fmt: skip
    return plain(features.model_dump(mode="python"))


@st.composite
def inconsistent_features(draw: st.DrawFn, plan: PlanMsg, sid: str) -> bytes:
    dim = draw(st.sampled_from([plan.submodel(sid).feature_dim, 1, 8192, 8193, 0]))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    itemsize = 4 if dtype == "float32" else 2
    size = dim * itemsize + draw(st.sampled_from([0, 0, 1, -itemsize]))
    data = draw(st.binary(min_size=max(size, 0), max_size=max(size, 0)))
    message = {
        **features_base(plan, sid), "dim": dim, "dtype": dtype, "data": data,
        "plan_id": draw(st.sampled_from([plan.plan_id, "other", ""])),
        "batch": draw(st.sampled_from([1, 0, 4096, 4097])), "seq": draw(st.integers(0, 2**40)),
    }  # fmt: skip
    return msgpack_bytes(message)


def _fit(plan: PlanMsg) -> tuple[object, ...]:
    """What a plan's models must fit: input, sub-models and their widths, classes."""
    return (
        plan.preprocessing,
        tuple((s.id, s.feature_dim) for s in plan.submodels),
        len(plan.classes),
    )


def _same_files_other_fit(payload: bytes, good: PlanMsg) -> bool:
    """A valid plan with the good plan's model files whose models do not fit it: refused at
    load (plans_refused), not at decode; test_plan_with_the_same_files_and_fewer_classes
    covers it, so the property test leaves it out of its exact bad-payload count."""
    try:
        plan = decode(PlanMsg, payload)
    except BadPayload:
        return False
    if plan is None or plan.plan_id == good.plan_id:
        return False  # the same plan id again is ignored
    same_files = (
        plan.node_models(NODE, "per-entry") == good.node_models(NODE, "per-entry")
        or plan.fusion_sha256 == good.fusion_sha256
    )
    return same_files and _fit(plan) != _fit(good)


def _reuses_the_plan_id(payload: bytes, good: PlanMsg) -> bool:
    """A valid plan under the good plan's id with other content: a forged plan, which only
    the ACL or a signature stops (edvit.fleet.fuzz sends none either). Every service takes a
    plan id for the plan itself (a reconnect delivers the same plan again, which changes
    nothing), so once such a plan is followed, publishing the good plan again changes nothing:
    the fleet would go on serving the forged one after test_plan_end (assignments {}: n0
    serves nothing and no frame is answered)."""
    try:
        plan = decode(PlanMsg, payload)
    except BadPayload:
        return False
    return plan is not None and plan.plan_id == good.plan_id and plan != good


def _valid_node(topic: str, topics: Topics) -> bool:
    try:
        topics.node_of(topic)
    except BadPayload:
        return False
    return True


def refused(kind: type[Any], payload: bytes) -> bool:
    """Whether `decode` refuses the payload (an empty one is a clear, never refused)."""
    try:
        decode(kind, payload)
    except BadPayload:
        return True
    return False


def counters_of(
    topic: str,
    payload: bytes,
    readers: tuple[str, ...],
    bad: bool,
    decoders: tuple[str, ...] | None = None,
) -> tuple[str, ...]:
    """Who counts a payload as bad: every reader of the topic when it is over the topic's
    limit (`deliver` drops it before any handler), else the readers that decode it (all of
    them unless said otherwise) when it is bad."""
    if len(payload) > payload_limit(topic):
        return readers
    return (readers if decoders is None else decoders) if bad else ()


def assert_counted(fleet: FuzzFleet, before: dict[str, int], who: tuple[str, ...]) -> None:
    """Every service in `who` counted the payload as bad exactly once, nobody else did."""
    after = fleet.bad()
    expected = {name: before[name] + (name in who) for name in before}
    assert after == expected, (who, before, after)


# -- the tests -------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_frames(fuzz: FuzzFleet, data: st.DataObject) -> None:
    camera = data.draw(st.sampled_from([CAMERA, CAMERA, "", "other-cam", GOOD]), label="camera")
    payload = data.draw(
        st.one_of(
            hostile(frame_base(camera), json_text=False),
            hostile(frame_base("elsewhere"), json_text=False),
            inconsistent_frames(camera),
        ),
        label="payload",
    )  # fmt: skip
    if camera == GOOD:
        # Never a valid frame on the good camera: it would be answered as the good camera's.
        assume(frame_outcome(camera, payload) is not False)
    before, served = fuzz.bad(), fuzz.node.counters["frames_served"]
    topic = fuzz.topics.frame(camera)
    fuzz.publish(topic, payload)
    outcome = frame_outcome(camera, payload)
    fuzz.drain()
    fuzz.check()
    assert_counted(fuzz, before, counters_of(topic, payload, (NODE,), bool(outcome)))
    # Every frame is refused (and counted) or served, never lost: the +1 is the good frame
    # (counted just after its features went out, so maybe after its answer).
    expected = 1 + (outcome is False)
    wait_until(lambda: fuzz.node.counters["frames_served"] - served >= expected, 5, "served")
    assert fuzz.node.counters["frames_served"] - served == expected


def test_a_busy_node_refuses_a_frame_with_a_broken_header_as_it_arrives(fuzz: FuzzFleet) -> None:
    """A busy node queues frames and decodes their pixels only when it serves them; a newer
    frame from the same camera can replace a queued one first. A frame whose image header is
    broken is refused as it arrives, so it never waits in the queue to be lost uncounted."""
    broken = {**frame_base(CAMERA), "data": b"\x89PNG\r\n\x1a\n" + bytes(40)}
    # While a batch is being served (the lock held), an accepted frame would be queued.
    with fuzz.node._serving, pytest.raises(BadPayload, match="IHDR"):
        fuzz.node._on_frame(fuzz.topics.frame(CAMERA), msgpack_bytes(broken))
    assert len(fuzz.node._batcher) == 0


@FUZZ
@given(data=st.data())
def test_tokens(fuzz: FuzzFleet, data: st.DataObject) -> None:
    camera = data.draw(st.sampled_from([CAMERA, "", GOOD]), label="camera")
    payload = data.draw(
        st.one_of(hostile({**tokens_base(), "camera": camera}, json_text=False),
                  inconsistent_tokens()),
        label="payload",
    )  # fmt: skip
    before = fuzz.bad()
    topic = fuzz.topics.tokens(camera)
    fuzz.publish(topic, payload)
    fuzz.settle()
    fuzz.check()
    # The shipped bundle has no shared stem: every tokens message is refused.
    assert_counted(fuzz, before, counters_of(topic, payload, (NODE,), bool(payload)))


@FUZZ
@given(data=st.data())
def test_features(fuzz: FuzzFleet, data: st.DataObject) -> None:
    plan = fuzz.plan
    sid = data.draw(st.sampled_from([s.id for s in plan.submodels]), label="sub-model")
    topic_sid = data.draw(st.sampled_from([sid, sid, sid, "sub9", ""]), label="topic sub-model")
    base = features_base(plan, sid)
    payload = data.draw(
        st.one_of(hostile(base, json_text=False), inconsistent_features(plan, sid)),
        label="payload",
    )
    before = fuzz.bad()
    topic = fuzz.topics.features(CAMERA, topic_sid, "x")
    fuzz.publish(topic, payload)
    bad = refused(FeaturesMsg, payload)
    fuzz.check()
    if bad:
        assert_counted(fuzz, before, counters_of(topic, payload, (ANSWERING, STANDBY), True))
    else:
        after = fuzz.bad()
        assert after[NODE] == before[NODE] and after["injector"] == before["injector"]


@FUZZ
@given(data=st.data())
def test_plan(fleet: FuzzFleet, data: st.DataObject) -> None:
    """Hostile plans (never an empty one, never retained, never a valid one under the good
    plan's id); a valid one may be followed: the fleet must not break on it, and
    test_plan_end puts the good plan back."""
    fuzz = fleet
    good = plain(json.loads(encode(fuzz.plan)))
    renamed = {**good, "plan_id": "fuzzed"}
    payload = data.draw(
        st.one_of(hostile(good, json_text=True, min_size=1),
                  hostile(renamed, json_text=True, min_size=1)),
        label="payload",
    )  # fmt: skip
    assume(payload)  # an empty plan is the legitimate clear (only an ACL can refuse it)
    assume(not _same_files_other_fit(payload, fuzz.plan))  # counted elsewhere: see there
    assume(not _reuses_the_plan_id(payload, fuzz.plan))  # a forgery: see there
    before = fuzz.bad()
    fuzz.publish(fuzz.topics.plan(), payload)
    bad = refused(PlanMsg, payload)
    fuzz.send_good()  # served under whatever plan is active now, or refused: never a crash
    fuzz.settle()
    fuzz.check()
    if bad:
        readers = (NODE, ANSWERING, STANDBY, PLANNER)
        assert_counted(fuzz, before, counters_of(fuzz.topics.plan(), payload, readers, True))


def test_plan_end(fleet: FuzzFleet) -> None:
    """After the plan fuzzing, the good plan again: everything serves it, the plan itself and
    not only its id (a hostile plan may have reused the id with other assignments)."""
    fleet.publish(fleet.topics.plan(), encode(fleet.plan))
    followers = [fleet.node.follower, *(a.follower for a in fleet.aggregators)]
    wait_until(
        lambda: all(f.ready and f.active.plan == fleet.plan for f in followers),
        20, "every service to serve the good plan again",
    )  # fmt: skip
    fleet.exactly_once()


@FUZZ
@given(data=st.data())
def test_models(fuzz: FuzzFleet, data: st.DataObject) -> None:
    model_id = data.draw(st.sampled_from(["sub0", "sub2", "fusion", "nope"]), label="model")
    onnx = data.draw(st.binary(max_size=64), label="onnx")
    base = plain(ModelMsg(sha256=sha256_bytes(onnx), onnx=onnx).model_dump(mode="python"))
    payload = data.draw(hostile(base, json_text=False), label="payload")
    before = fuzz.bad()
    topic = fuzz.topics.model(model_id)
    fuzz.publish(topic, payload)
    fuzz.check()
    try:
        message = decode(ModelMsg, payload)
        bad = message is not None and sha256_bytes(message.onnx) != message.sha256
    except BadPayload:
        bad = True
    who = {"sub0": (NODE,), "sub2": (NODE,), "fusion": (ANSWERING, STANDBY), "nope": ()}
    assert_counted(fuzz, before, counters_of(topic, payload, who[model_id], bad))


FAKE_NODES = ["fake", "", " ", "ünï", "a" * 300, "n1", "node-9"]


def status_base(plan: PlanMsg) -> dict[str, Any]:
    status = StatusMsg(
        state="ready", plan_id=plan.plan_id, submodels=("sub0",), serving_plan_id=plan.plan_id,
        capacity=Capacity(memory_mb=512.0, speed=1.0), counters={"frames_served": 3},
    )  # fmt: skip
    return plain(json.loads(encode(status)))


@FUZZ
@given(data=st.data())
def test_statuses(fuzz: FuzzFleet, data: st.DataObject) -> None:
    topic = data.draw(
        st.one_of(
            st.sampled_from(FAKE_NODES).map(fuzz.topics.node_status),
            st.just(fuzz.topics.aggregator_status()),
            st.just(fuzz.topics.aggregator_instance_status("fake")),
        ),
        label="topic",
    )
    payload = data.draw(hostile(status_base(fuzz.plan), json_text=True), label="payload")
    before = fuzz.bad()
    fuzz.publish(topic, payload)
    time.sleep(0.06)  # a planner tick, with whatever this status changed
    fuzz.check()
    if topic == fuzz.topics.aggregator_instance_status("fake"):
        who: tuple[str, ...] = ()  # nobody follows another instance's own status
    elif topic == fuzz.topics.aggregator_status():
        who = (ANSWERING, STANDBY)
    else:
        who = (ANSWERING, STANDBY, PLANNER)
    bad = refused(StatusMsg, payload) or (
        topic.startswith(f"{fuzz.topics.prefix}/nodes/") and not _valid_node(topic, fuzz.topics)
    )
    assert_counted(fuzz, before, counters_of(topic, payload, who, bad))


def prediction_base(plan: PlanMsg) -> dict[str, Any]:
    prediction = PredictionMsg(
        camera=CAMERA, seq=3, ts=1.5, label=1, class_name="Trouser", score=0.5,
        topk=(("Trouser", 0.5),), latency_ms=1.0, submodels=("sub0",), plan_id=plan.plan_id,
    )  # fmt: skip
    return plain(json.loads(encode(prediction)))


@FUZZ
@given(data=st.data())
def test_predictions(fuzz: FuzzFleet, data: st.DataObject) -> None:
    camera = data.draw(st.sampled_from([CAMERA, "", "other"]), label="camera")
    payload = data.draw(hostile(prediction_base(fuzz.plan), json_text=True), label="payload")
    before = fuzz.bad()
    topic = fuzz.topics.predictions(camera)
    fuzz.publish(topic, payload)
    fuzz.check()
    # The answering aggregator ignores answers (its own) unread; the standby reads them.
    bad = refused(PredictionMsg, payload)
    # Only the standby subscribes to answers (to drop what the answering one answered).
    assert_counted(fuzz, before, counters_of(topic, payload, (STANDBY,), bad))


def lease_refused(payload: bytes) -> bool:
    if not payload:
        return False
    try:
        LeaseMsg.model_validate_json(payload)
    except ValueError:
        return True
    return False


@FUZZ
@given(data=st.data())
def test_lease(fleet: FuzzFleet, data: st.DataObject) -> None:
    fuzz = fleet
    base = {"holder": "agg-q", "ttl_s": 3.0, "ts": time.time()}
    payload = data.draw(hostile(base, json_text=True), label="payload")
    before = fuzz.bad()
    topic = fuzz.topics.aggregator_lease()
    fuzz.publish(topic, payload)
    fuzz.check()
    bad = lease_refused(payload)
    assert_counted(fuzz, before, counters_of(topic, payload, (ANSWERING, STANDBY), bad))


def test_lease_end(fleet: FuzzFleet) -> None:
    """A valid lease of another holder may have taken the lease away (no ACL yet); once its
    ttl has run out an aggregator answers again."""
    wait_until(lambda: any(a.answering for a in fleet.aggregators), 10, "an answering aggregator")
    fleet.exactly_once()


KIND_TOPICS: dict[PayloadKind, Callable[[Topics], str]] = {
    "frame": lambda t: t.frame(CAMERA),
    "tokens": lambda t: t.tokens(CAMERA),
    "features": lambda t: t.features(CAMERA, "sub0", "x"),
    "plan": lambda t: t.plan(),
    "status": lambda t: t.node_status("fake"),
    "prediction": lambda t: t.predictions(CAMERA),
    "lease": lambda t: t.aggregator_lease(),
}
KIND_READERS: dict[PayloadKind, tuple[str, ...]] = {
    "frame": (NODE,),
    "tokens": (NODE,),
    "features": (ANSWERING, STANDBY),
    "plan": (NODE, ANSWERING, STANDBY, PLANNER),
    "status": (ANSWERING, STANDBY, PLANNER),
    "prediction": (STANDBY,),  # only a standby subscribes to the answers
    "lease": (ANSWERING, STANDBY),
}


@pytest.mark.parametrize("kind", list(KIND_TOPICS))
def test_oversized_payloads_are_dropped_before_decoding(fuzz: FuzzFleet, kind: PayloadKind) -> None:
    topic = KIND_TOPICS[kind](fuzz.topics)
    before = Counter({n: c.counters["payloads_too_large"] for n, c in fuzz.transports.items()})
    bad = fuzz.bad()
    fuzz.publish(topic, b"\x00" * (MAX_PAYLOAD_BYTES[kind] + 1))
    fuzz.check()
    after = Counter({n: c.counters["payloads_too_large"] for n, c in fuzz.transports.items()})
    assert after - before == Counter(KIND_READERS[kind])
    assert_counted(fuzz, bad, KIND_READERS[kind])


# -- the bugs these tests found ---------------------------------------------------------
def _bug_fleet_errors(fleet: FuzzFleet) -> int:
    return sum(
        v for client in fleet.transports.values() for k, v in client.counters.items()
        if k.endswith("_errors")
    )  # fmt: skip


def _reset_errors(fleet: FuzzFleet) -> None:
    for client in fleet.transports.values():
        for key in [k for k in client.counters if k.endswith("_errors")]:
            del client.counters[key]


def test_bug_frame_with_a_huge_ts(fleet: FuzzFleet) -> None:
    """ts = 1e308 is finite, but its latency is not: refused at decode."""
    png, label = fleet.pngs[0]
    frame = FrameMsg(camera=CAMERA, seq=1, ts=1.0, enc="png", data=png, label=label)
    fleet.publish(fleet.topics.frame(CAMERA), msgpack_bytes({**frame.model_dump(), "ts": 1e308}))
    fleet.drain()
    time.sleep(DEADLINE_S + 0.1)
    errors = _bug_fleet_errors(fleet)
    _reset_errors(fleet)  # so that the tests after this one see a clean fleet
    assert errors == 0


def test_bug_features_that_overflow_the_fusion(fleet: FuzzFleet) -> None:
    """Features of huge magnitude would overflow the fusion: refused at decode."""
    ts = time.time()
    for s in fleet.plan.submodels:
        message = FeaturesMsg(
            camera=CAMERA, seq=5, ts=ts, submodel=s.id, plan_id=fleet.plan.plan_id, node="x",
            dtype="float32", data=np.ones(s.feature_dim, np.float32).tobytes(),
            dim=s.feature_dim, infer_ms=0.1,
        )  # fmt: skip
        huge = np.full(s.feature_dim, 3e38, np.float32).tobytes()
        payload = msgpack_bytes({**message.model_dump(), "data": huge})
        fleet.publish(fleet.topics.features(CAMERA, s.id, "x"), payload)
    time.sleep(DEADLINE_S + 0.1)
    errors = _bug_fleet_errors(fleet)
    _reset_errors(fleet)
    assert errors == 0


def test_bug_plan_with_the_same_files_and_fewer_classes(fleet: FuzzFleet) -> None:
    good = fleet.plan
    fewer = good.model_copy(update={
        "plan_id": "fewer-classes", "classes": ("a",),
        "submodels": tuple(s.model_copy(update={"classes": (0,)}) for s in good.submodels),
    })  # fmt: skip
    followers = [fleet.node.follower, *(a.follower for a in fleet.aggregators)]
    try:
        fleet.publish(fleet.topics.plan(), encode(fewer))
        follower = fleet.answering.follower
        wait_until(lambda: follower.refused is not None, 10, "the aggregator refuses the plan")
        key = fleet.send_good()  # the node serves it under the refused plan
        wait_until(lambda: bool(fleet.answers(key)), 10, "answered under the compatible plan")
        assert _bug_fleet_errors(fleet) == 0
    finally:
        fleet.publish(fleet.topics.plan(), encode(good))
        wait_until(lambda: all(f.active.plan == good for f in followers), 10)
        _reset_errors(fleet)


def _three_node_plan(fleet: FuzzFleet) -> PlanMsg:
    bundle = Bundle.load(Path(DEFAULT_BUNDLE))
    ids = [s.id for s in bundle.manifest.submodels]
    return make_plan(bundle, round_robin(ids, ["node-0", "node-1", "node-2"]))


def test_bug_planner_and_a_status_with_an_empty_node_id(fleet: FuzzFleet) -> None:
    planner, broker, client = planner_with_ready_nodes(_three_node_plan(fleet), PLANNER)
    try:
        broker.publish(Topics().node_status(""), encode(StatusMsg(state="ready")))
        planner.tick()
        assert client.counters["bad_payloads"] == 1
    finally:
        planner.stop()


def test_bug_planner_with_every_node_down(fleet: FuzzFleet) -> None:
    planner, broker, client = planner_with_ready_nodes(_three_node_plan(fleet), PLANNER)
    try:
        for node in ("node-0", "node-1", "node-2"):
            broker.publish(Topics().node_status(node), encode(StatusMsg(state="offline")))
        assert planner.tick() is None  # nothing can go anywhere: no new plan
        health = decode(HealthMsg, broker.retained[Topics().fleet_health()])
        assert health is not None and set(health.degraded) == {"sub0", "sub1", "sub2"}
    finally:
        planner.stop()


def test_bug_planner_and_a_plan_whose_base_names_an_unknown_sub_model(fleet: FuzzFleet) -> None:
    plan = _three_node_plan(fleet)
    odd = plan.model_copy(update={
        "plan_id": "odd", "base_plan_id": plan.plan_id,
        "base_assignments": {**plan.assignments, "node-0": ("nope",)},
    })  # fmt: skip
    planner, broker, client = planner_with_ready_nodes(odd, PLANNER)
    try:
        assert planner.tick() is None
        assert client.counters["bad_payloads"] == 1  # refused at decode
    finally:
        planner.stop()


def test_bug_heal_with_a_live_node_over_its_memory() -> None:
    base = {"node-0": ("sub0",), "node-1": ("sub1",)}
    live = {"node-0": Device(id="node-0", memory_mb=0.5)}  # its own sub0 needs 1.3 MB
    placed, unplaced = heal(base, base, live, {"sub0": 1.3, "sub1": 1.3})
    assert unplaced == ("sub1",)


# -- the in-process fuzzer against real processes and a real mosquitto ---------------------------
@pytest.mark.broker
@pytest.mark.fleet
def test_hostile_scenario_on_a_real_broker() -> None:
    """2000 hostile payloads over 6 s on every topic while a good camera streams at 20 fps,
    against 3 node processes and an aggregator on a real mosquitto. Without the two frames
    over the 8 MiB limit of the full mix: each stalls every node's network thread while
    paho reads it (the limit applies once it is in), which can get nodes suspected and
    re-placed on a loaded machine (edvit bench chaos --scenarios hostile measures them)."""
    from edvit.broker.local import mosquitto_path

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    from edvit.fleet.chaos.fuzz import OVERSIZED
    from edvit.fleet.chaos.scenarios import ChaosFleet, scenario_hostile

    log_dir = Path(tempfile.mkdtemp(prefix="edvit-fuzz-"))
    with ChaosFleet(Bundle.load(Path(DEFAULT_BUNDLE)), log_dir, 20.0, 3.0) as cf:
        base = cf.start()
        result = scenario_hostile(
            cf, base, payloads=2000, seconds=6.0, oversized={**OVERSIZED, "frame": 0}
        )
    summary = {k: v for k, v in result.items() if k != "services_counters"}
    assert result["payloads_sent"] == 2000, summary
    assert result["all_processes_alive"] and result["camera_exit_code"] == 0, summary
    assert result["handler_errors"] == 0 and not result["thread_failures"], summary
    assert result["good_answered_fraction"] >= 0.99, summary
    assert result["good_answered_twice"] == 0, summary
    assert result["node_rss_max_delta_mb"] < 20, summary
    assert all(result["final_counters_read"].values()), summary
    if not result["plans_during_run"]:  # every node followed frames all along
        assert result["uncounted"] == {}, summary
        assert result["counted_beyond_expected"] == {}, summary
