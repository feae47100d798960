"""A broker restart or a cut link does not cripple the fleet: statuses ordered by connection
and sequence, a planner that acts only on what it knows, followers that never strand
themselves, and the partition matrix of the chaos bench on real processes."""

from __future__ import annotations

import os
import queue
import time

import pytest
from memory_transport import MemoryBroker, MemoryTransport

from edvit.aggregator.planner import Planner
from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.fleet.chaos.partitions import Fault, expectations, plans_published, whole_again
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.mqtt import MqttClient, unique_client_id
from edvit.retained import MISSING_REPORT_S, REFETCH_FIRST_S, PlanFollower
from edvit.schemas import (
    Capacity,
    ModelMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    decode,
    encode,
    supersedes,
)
from edvit.topics import Topics

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")


# -- statuses: the newer wins by connection and sequence --------------------------------------
def _status(state: str = "ready", session: float | None = 100.0, seq: int | None = 1) -> StatusMsg:
    return StatusMsg(state=state, session=session, seq=seq)  # type: ignore[arg-type]


def test_within_a_connection_the_higher_sequence_wins() -> None:
    assert supersedes(_status(seq=2), _status(seq=1))
    assert not supersedes(_status(seq=1), _status(seq=2))


def test_a_status_sent_before_the_will_and_delivered_after_it_is_stale() -> None:
    will = _status("offline", seq=None)
    assert supersedes(will, _status(seq=7))
    assert not supersedes(_status(seq=7), will)
    assert not supersedes(_status(seq=8), will)  # nothing follows a connection's last word


def test_a_new_connection_supersedes_the_last_one_and_an_old_one_does_not() -> None:
    will = _status("offline", session=100.0, seq=None)
    assert supersedes(_status(session=101.0, seq=1), will)
    assert not supersedes(_status(session=99.0, seq=5), _status(session=100.0, seq=1))
    # A board whose clock went back on reboot is still heard once its old connection ended.
    assert supersedes(_status(session=50.0, seq=1), will)


def test_statuses_without_a_connection_stamp_go_by_arrival() -> None:
    assert supersedes(StatusMsg(state="ready"), _status())
    assert supersedes(_status(), StatusMsg(state="offline"))
    assert supersedes(None, _status())


# -- the planner acts only on what it knows -----------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fleet(plan: PlanMsg, **settings: float) -> tuple[Planner, MemoryBroker, MemoryTransport,
                                                      Clock, Topics]:  # fmt: skip
    broker, topics, clock = MemoryBroker(), Topics(), Clock()
    client = MemoryTransport(broker, "planner")
    planner = Planner(
        client, topics, instance="p", hold_off_s=0.0, min_interval_s=0.0, clock=clock,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    client.route(topics.plan(), planner._on_plan, qos=1)
    client.route(topics.all_node_statuses(), planner._on_status, qos=1)
    broker.publish(topics.plan(), encode(plan), retain=True)
    for seq, node in enumerate(plan.assignments, start=1):
        _announce(broker, topics, node, "ready", session=10.0, seq=seq)
    planner.tick()  # the first connection
    clock.now += 2.0  # past the start-up settle
    return planner, broker, client, clock, topics


def _announce(broker: MemoryBroker, topics: Topics, node: str, state: str, session: float,
              seq: int | None) -> None:  # fmt: skip
    status = StatusMsg(state=state, session=session, seq=seq,  # type: ignore[arg-type]
                       capacity=Capacity(memory_mb=512.0))  # fmt: skip
    broker.publish(topics.node_status(node), encode(status), retain=True)


def _plans(broker: MemoryBroker, topics: Topics) -> list[PlanMsg]:
    plans = [decode(PlanMsg, payload) for payload in broker.messages(topics.plan())]
    return [p for p in plans if p is not None]


@pytest.fixture
def three_node_plan() -> PlanMsg:
    from edvit.bundle import Bundle
    from edvit.fleet.ops.deploy import make_plan

    bundle = Bundle.load(DEFAULT_BUNDLE)
    return make_plan(bundle, {"node-0": ("sub0",), "node-1": ("sub1",), "node-2": ("sub2",)})


def test_the_planner_plans_nothing_while_its_connection_is_down(three_node_plan: PlanMsg) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan)
    client.connected = False
    _announce(broker, topics, "node-1", "offline", session=10.0, seq=None)
    clock.now += 10.0
    assert planner.tick() is None
    assert len(_plans(broker, topics)) == 1  # the deployed plan only


def test_wills_delivered_as_the_broker_shuts_down_move_nothing(three_node_plan: PlanMsg) -> None:
    """mosquitto delivers every client's Will as it stops, then drops the planner: the
    offline statuses are not acted on before they are confirmed, and after the reconnect the
    nodes have the grace to announce themselves again."""
    planner, broker, client, clock, topics = _fleet(three_node_plan)
    for node in ("node-0", "node-1"):
        _announce(broker, topics, node, "offline", session=10.0, seq=None)
    clock.now += 0.2
    assert planner.tick() is None  # not confirmed yet
    client.connected = False  # the broker is gone
    clock.now += 2.0
    assert planner.tick() is None
    client.reconnect()  # back, on a new connection
    clock.now += 1.0
    assert planner.tick() is None  # the grace: node-0 and node-1 are unknown
    for seq, node in enumerate(("node-0", "node-1", "node-2"), start=1):
        _announce(broker, topics, node, "ready", session=20.0, seq=seq)
    clock.now += 10.0
    assert planner.tick() is None  # everyone is back: nothing to change
    assert [p.plan_id for p in _plans(broker, topics)] == [three_node_plan.plan_id]
    assert client.counters["plans_published"] == 0


def test_a_node_whose_status_is_gone_and_does_not_come_back_is_moved_after_the_grace(
    three_node_plan: PlanMsg,
) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, reconnect_grace_s=6.0)
    broker.retained.pop(topics.node_status("node-1"))  # gone with the broker's store
    client.reconnect()  # and node-1 never announces itself again
    assert planner.tick() is None
    for seq, node in enumerate(("node-0", "node-2"), start=1):
        _announce(broker, topics, node, "ready", session=20.0, seq=seq)
    clock.now += 5.0
    assert planner.tick() is None
    clock.now += 1.5
    healed = planner.tick()
    assert healed is not None and "node-1" not in healed.assignments
    assert sorted(sid for ids in healed.assignments.values() for sid in ids) == [
        "sub0", "sub1", "sub2",
    ]  # fmt: skip


def test_a_node_connected_throughout_is_heard_from_the_broker_s_copy(
    three_node_plan: PlanMsg,
) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, reconnect_grace_s=1.0)
    client.reconnect()  # only the planner lost the broker; the nodes' statuses are retained
    planner.tick()
    clock.now += 5.0
    assert planner.tick() is None
    assert client.counters["plans_published"] == 0


def test_a_node_that_goes_offline_is_moved_once_confirmed(three_node_plan: PlanMsg) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, down_confirm_s=0.5)
    _announce(broker, topics, "node-1", "offline", session=10.0, seq=None)
    assert planner.tick() is None
    clock.now += 0.6
    healed = planner.tick()
    assert healed is not None and "sub1" not in healed.assignments.get("node-1", ())


def test_a_stale_up_status_after_the_will_does_not_bring_a_node_back(
    three_node_plan: PlanMsg,
) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, down_confirm_s=0.0)
    _announce(broker, topics, "node-1", "offline", session=10.0, seq=None)
    _announce(broker, topics, "node-1", "ready", session=10.0, seq=9)  # sent before, late
    healed = planner.tick()
    assert healed is not None and "node-1" not in healed.assignments
    assert client.counters["statuses_out_of_order"] == 1


def test_a_standby_taking_over_after_a_reconnect_gives_the_grace(
    three_node_plan: PlanMsg,
) -> None:
    active = False
    planner, broker, client, clock, topics = _fleet(three_node_plan, reconnect_grace_s=6.0)
    planner._is_active = lambda: active
    broker.retained.pop(topics.node_status("node-1"))
    client.reconnect()
    planner.tick()  # a standby: counts the reconnect, plans nothing
    clock.now += 3.0
    active = True  # the answering aggregator was lost meanwhile: this one takes over
    assert planner.tick() is None  # node-1 is unknown until the grace ends
    clock.now += 3.5
    assert planner.tick() is not None  # now it is down


def test_a_plan_decided_on_a_lost_connection_is_never_published(
    three_node_plan: PlanMsg,
) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, down_confirm_s=0.0)
    _announce(broker, topics, "node-1", "offline", session=10.0, seq=None)
    publish_now = client.publish_now

    def reconnect_meanwhile(*args: object, **kwargs: object) -> bool:
        client.connection_epoch += 1  # the connection dropped and came back while deciding
        return publish_now(*args, **kwargs)  # type: ignore[arg-type]

    client.publish_now = reconnect_meanwhile  # type: ignore[method-assign]
    assert planner.tick() is None
    assert client.counters["plans_withheld"] == 1
    assert len(_plans(broker, topics)) == 1


def test_the_planner_publishes_a_plan_the_broker_lost_again(three_node_plan: PlanMsg) -> None:
    planner, broker, client, clock, topics = _fleet(three_node_plan, reconnect_grace_s=1.0)
    broker.retained.clear()  # the broker came back without its store
    client.reconnect()
    for seq, node in enumerate(three_node_plan.assignments, start=1):
        _announce(broker, topics, node, "ready", session=20.0, seq=seq)
    planner.tick()
    clock.now += 1.5
    assert planner.tick() == three_node_plan  # the same plan, id and all
    assert decode(PlanMsg, broker.retained[topics.plan()]) == three_node_plan
    assert client.counters["plans_republished"] == 1


# -- a follower never strands itself -----------------------------------------------------
def _follower(clock: Clock) -> tuple[PlanFollower, MemoryBroker, MemoryTransport, Topics]:
    broker, topics = MemoryBroker(), Topics()
    client = MemoryTransport(broker, "follower")

    def model_ids(plan: PlanMsg) -> dict[str, str]:
        return {s.id: s.sha256 for s in plan.submodels if s.id in plan.assignments.get("n", ())}

    follower: PlanFollower = PlanFollower(
        client, topics, model_ids, lambda plan, blobs: dict(blobs), clock=clock
    )
    return follower, broker, client, topics


def _bundle_models(broker: MemoryBroker, topics: Topics, plan: PlanMsg) -> None:
    for s in plan.submodels:
        onnx = (DEFAULT_BUNDLE / "submodels" / f"{s.id}.onnx").read_bytes()
        msg = ModelMsg(sha256=s.sha256, onnx=onnx)
        broker.publish(topics.model(s.id), encode(msg), retain=True)


def test_a_flip_away_and_back_needs_no_fetch(three_node_plan: PlanMsg) -> None:
    from edvit.bundle import Bundle
    from edvit.fleet.ops.deploy import make_plan

    clock = Clock()
    follower, broker, client, topics = _follower(clock)
    mine = three_node_plan.model_copy(update={"assignments": {"n": ("sub0",)}})
    _bundle_models(broker, topics, mine)
    client.route(topics.plan(), follower._on_plan, qos=1)
    broker.publish(topics.plan(), encode(mine), retain=True)
    follower._step()
    assert follower.ready
    elsewhere = make_plan(Bundle.load(DEFAULT_BUNDLE), {"m": ("sub0", "sub1", "sub2")})
    broker.publish(topics.plan(), encode(elsewhere), retain=True)
    follower._step()
    broker.retained.clear()  # the broker lost every file meanwhile
    broker.publish(topics.plan(), encode(mine), retain=True)
    follower._step()
    assert follower.ready and follower.active is not None and follower.active.plan == mine
    assert client.counters["models_from_kept"] == 1


def test_a_missing_file_is_asked_for_again_reported_and_recovered(
    three_node_plan: PlanMsg,
) -> None:
    clock = Clock()
    follower, broker, client, topics = _follower(clock)
    mine = three_node_plan.model_copy(update={"assignments": {"n": ("sub1",)}})
    client.route(topics.plan(), follower._on_plan, qos=1)
    broker.publish(topics.plan(), encode(mine), retain=True)
    follower._chase_missing()
    assert follower.problem is None
    clock.now += max(MISSING_REPORT_S, REFETCH_FIRST_S) + 0.1
    follower._chase_missing()
    assert follower.problem is not None and "sub1" in follower.problem
    assert client.counters["model_refetches"] == 1
    _bundle_models(broker, topics, mine)  # published again (edvit deploy)
    follower._step()
    follower._chase_missing()
    assert follower.ready and follower.problem is None


# -- figures of the partition matrix ---------------------------------------------------------
def _answer(seq: int, ts: float, degraded: bool = False) -> tuple[float, PredictionMsg]:
    p = PredictionMsg(
        camera="c", seq=seq, ts=ts, label=0, class_name="a", score=1.0, topk=(("a", 1.0),),
        latency_ms=1.0, submodels=(), missing=("s",) if degraded else (), degraded=degraded,
        plan_id="p",
    )  # fmt: skip
    return ts + 0.01, p


def test_whole_again_is_when_every_later_frame_is_answered_whole() -> None:
    answers = [_answer(0, 100.0), _answer(2, 100.2, degraded=True), _answer(3, 100.3),
               _answer(4, 100.4), _answer(4, 100.4)]  # fmt: skip
    figures = whole_again(answers, frames=5, fault=Fault(100.05, 100.1))
    assert figures["whole_again_s"] == pytest.approx(0.2)
    assert (figures["degraded"], figures["unanswered"], figures["duplicates"]) == (1, 1, 1)
    assert whole_again(answers[:3], frames=5, fault=Fault(0, 0))["whole_again_s"] is None
    lone = [_answer(0, 100.0), _answer(1, 100.1), _answer(2, 100.2, degraded=True),
            _answer(3, 100.3), _answer(4, 100.4)]  # fmt: skip
    figures = whole_again(lone, frames=5, fault=Fault(99.9, 99.95))
    assert figures["whole_again_s"] == pytest.approx(0.35)
    assert figures["settled_again_s"] == pytest.approx(0.05)
    assert figures["lone_degraded_after"] == 1
    # The stream's last frame has no successor: degraded after a whole one, it is lone.
    last = [*lone[:2], _answer(2, 100.2), _answer(3, 100.3), _answer(4, 100.4, degraded=True)]
    figures = whole_again(last, frames=5, fault=Fault(99.9, 99.95))
    assert figures["whole_again_s"] is None
    assert figures["settled_again_s"] == pytest.approx(0.05)
    assert figures["lone_degraded_after"] == 1
    twice = [*last[:3], _answer(3, 100.3, degraded=True), last[4]]
    assert whole_again(twice, frames=5, fault=Fault(99.9, 99.95))["settled_again_s"] is None


def test_a_plan_delivered_again_unchanged_is_not_a_publication(three_node_plan: PlanMsg) -> None:
    plan = three_node_plan
    assert plans_published([(1.0, plan), (5.0, plan)], since=2.0) == []
    newer = plan.model_copy(update={"created": plan.created + 1})
    assert plans_published([(1.0, plan), (5.0, newer)], since=2.0) == [plan.plan_id]


# -- the connection guard on a real broker -------------------------------------------------
@needs_mosquitto
@pytest.mark.broker
def test_publish_now_never_reaches_a_later_connection() -> None:
    with LocalBroker(kind="mosquitto") as broker:
        seen: queue.Queue[bytes] = queue.Queue()
        listener = MqttClient(unique_client_id("listener"), broker.url)
        listener.route("t/x", lambda _t, payload: seen.put(payload), qos=1)
        listener.start(required=True)
        client = MqttClient(unique_client_id("guarded"), broker.url, status_topic="t/status")
        client.set_status(StatusMsg(state="online"))
        client.start(required=True)
        epoch = client.connection_epoch
        assert client.publish_now("t/x", b"first", epoch=epoch)
        assert seen.get(timeout=5) == b"first"
        broker.restart()
        deadline = time.monotonic() + 15
        while client.connection_epoch == epoch and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.connection_epoch == epoch + 1
        assert not client.publish_now("t/x", b"decided before", epoch=epoch)
        assert client.publish_now("t/x", b"decided now", epoch=client.connection_epoch)
        got = []
        while True:
            try:
                got.append(seen.get(timeout=2))
            except queue.Empty:
                break
        assert b"decided now" in got and b"decided before" not in got
        client.stop()
        listener.stop()


# -- the partition matrix, on real processes -------------------------------------------------
def _partition(name: str) -> dict:
    from edvit.fleet.chaos.scenarios import run_chaos

    (result,) = run_chaos(DEFAULT_BUNDLE, scenarios=(name,), hold_off_s=2.0, say=print)
    assert result["broken"] == [], result
    return result


@needs_mosquitto
@pytest.mark.fleet
def test_a_broker_restart_with_its_store_leaves_answers_whole_on_one_plan() -> None:
    r = _partition("broker-restart")
    assert r["plans_published_after_fault"] == []  # at most one; none while disconnected


@needs_mosquitto
@pytest.mark.fleet
def test_a_broker_that_lost_its_store_still_serves_the_deployed_plan() -> None:
    r = _partition("broker-crash")
    assert r["counters"]["plans_republished"] == 1


@pytest.mark.fleet
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("EDVIT_PARTITION_MATRIX") != "1",
    reason="the rest of the partition matrix takes minutes: EDVIT_PARTITION_MATRIX=1",
)
@pytest.mark.parametrize("name", ["aggregator-cut", "nodes-cut", "switch-cut", "failover-broker"])
def test_the_rest_of_the_partition_matrix(name: str) -> None:
    _partition(name)


def test_expectations_name_what_is_broken() -> None:
    result = {
        "settled_again_s": 12.0, "final_plan": "b", "deployed_plan": "a", "duplicates": 2,
        "nodes_on_deployed_plan": ["node-0"], "services_running": False, "stopped": ["x"],
    }  # fmt: skip
    assert len(expectations(result)) == 5
