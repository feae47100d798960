"""Replayed plans (edvit/replay.py): a signed plan older than the newest a follower took is
refused, by a running follower and by one restarted with its state folder; the planner's
derived plans follow their base; deploy picks a sequence above the retained plan's and
refuses to publish an unsigned plan over a signed one.

The fleet tests run a real mosquitto and real `edvit node` processes."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from memory_transport import MemoryTransport
from test_retained import _plan

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.cli import main
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy, make_plan, next_sequence, round_robin
from edvit.mqtt import MqttClient, unique_client_id
from edvit.replay import STATE_NAME, PlanSequence, default_state_dir
from edvit.retained import PlanFollower
from edvit.schemas import PlanMsg, StatusMsg, decode, encode
from edvit.signing import SigningKey
from edvit.topics import Topics
from helpers import planner_with_ready_nodes

PRIVATE = ed25519.Ed25519PrivateKey.generate()
KEY = SigningKey(PRIVATE)
TIMEOUT = 60.0


def _signed(plan_id: str, seq: int | None) -> PlanMsg:
    return KEY.sign(_plan(plan_id, {"m0": b"zero"}).model_copy(update={"seq": seq}))


# -- the sequence and its state file --------------------------------------------------------


def test_the_sequence_is_signed() -> None:
    plan = _signed("p1", 5)
    KEY.trust.verify(plan)
    with pytest.raises(Exception, match="bad signature"):
        KEY.trust.verify(plan.model_copy(update={"seq": 6}))


def test_an_older_sequence_is_a_replay_across_restarts(tmp_path: Path) -> None:
    first = PlanSequence(tmp_path / "state")
    assert first.replayed(_signed("p1", 5)) is None
    first.advance(_signed("p1", 5))
    first.advance(_signed("p0", 3))  # an older one never moves the newest back
    assert json.loads((tmp_path / "state" / STATE_NAME).read_text())["plan_seq"] == 5
    again = PlanSequence(tmp_path / "state")
    assert again.newest == 5
    kept = decode(PlanMsg, again.newest_plan or b"")
    assert kept is not None and (kept.plan_id, kept.seq) == ("p1", 5)
    KEY.trust.verify(kept)  # kept as signed
    reason = again.replayed(_signed("p0", 4))
    assert reason is not None and "older than 5" in reason and "(p1)" in reason
    assert again.replayed(_signed("p-old", None)) is not None  # signed before sequences
    assert again.replayed(_signed("p1", 5)) is None  # the same plan again is not older
    assert again.replayed(_signed("p2", 6)) is None


def test_an_unreadable_state_file_starts_from_nothing(tmp_path: Path, caplog) -> None:
    (tmp_path / STATE_NAME).write_text("{not json")
    sequence = PlanSequence(tmp_path)
    assert sequence.newest is None
    assert "unreadable plan state" in caplog.text


def test_the_state_folder_defaults_under_xdg_state_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir("node", "node-0") == tmp_path / "edvit" / "node-node-0"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir("camera", "cam0") == (
        Path.home() / ".local" / "state" / "edvit" / "camera-cam0"
    )


def test_an_unwritable_state_folder_is_named_once(tmp_path: Path, caplog) -> None:
    (tmp_path / "file").write_text("")
    sequence = PlanSequence(tmp_path / "file" / "state")  # under a file: never a folder
    sequence.advance(_signed("p1", 1))
    sequence.advance(_signed("p2", 2))
    assert caplog.text.count("cannot write the plan state") == 1
    assert sequence.replayed(_signed("p1", 1)) is not None  # still refused in memory


def test_deploy_sequences_grow_past_the_retained_plan() -> None:
    assert next_sequence(None, now_s=10.0) == 10_000
    assert next_sequence(_signed("p1", 5), now_s=10.0) == 10_000
    assert next_sequence(_signed("p1", 20_000), now_s=10.0) == 20_001


def test_the_planner_s_plans_follow_their_base_and_it_ignores_a_replay() -> None:
    """A derived plan has its base's sequence + 1 and the restored one + 2: a trusting
    follower takes both; an older signed plan replayed is ignored by the planner too."""
    bundle = Bundle.load(DEFAULT_BUNDLE)
    ids = [s.id for s in bundle.manifest.submodels]
    placed = round_robin(ids, ["node-0", "node-1", "node-2"])
    old = KEY.sign(make_plan(bundle, placed).model_copy(update={"seq": 500}))
    deployed = KEY.sign(make_plan(bundle, placed).model_copy(update={"seq": 1000}))
    planner, broker, _client = planner_with_ready_nodes(deployed, sign_key=KEY)
    topics = Topics()
    watcher = MemoryTransport(broker, "follower")
    follower: PlanFollower[dict[str, bytes]] = PlanFollower(
        watcher, topics, lambda _plan: {}, lambda _plan, blobs: blobs, trust_key=KEY.trust
    )
    follower.start()
    try:
        assert follower.target == deployed
        broker.publish(topics.node_status("node-2"), encode(StatusMsg(state="offline")))
        healed = planner.tick()
        assert healed is not None and healed.seq == 1001 and follower.target == healed
        broker.publish(topics.node_status("node-2"), encode(StatusMsg(state="ready")))
        restored = planner.tick()
        assert restored is not None and restored.plan_id == deployed.plan_id
        assert restored.seq == 1002 and follower.target == restored
        assert watcher.counters["plans_replayed"] == 0 and follower.refused is None
        broker.publish(topics.plan(), encode(old), retain=True)
        assert watcher.counters["plans_replayed"] == 1 and follower.target == restored
        broker.publish(topics.node_status("node-1"), encode(StatusMsg(state="offline")))
        healed = planner.tick()  # healed from the restored plan, not from the replayed one
        assert healed is not None and healed.seq == 1003 and follower.target == healed
    finally:
        follower.stop()
        planner.stop()


# -- real processes ---------------------------------------------------------------------------


class _Statuses:
    """The statuses published on one topic, awaited one condition at a time."""

    def __init__(self, broker: LocalBroker, topic: str) -> None:
        self.queue: queue.Queue[StatusMsg] = queue.Queue()
        self.topic = topic
        self.client = MqttClient(unique_client_id("t-replay"), broker.url)
        self.client.route(topic, self._on_status, qos=1)
        self.client.start(required=True)

    def _on_status(self, _topic: str, payload: bytes) -> None:
        if (status := decode(StatusMsg, payload)) is not None:
            self.queue.put(status)

    def until(self, what: str, condition: Callable[[StatusMsg], bool]) -> StatusMsg:
        while True:
            try:
                status = self.queue.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no status on {self.topic} with {what}") from None
            if condition(status):
                return status


def _write_pub(path: Path) -> str:
    pem = PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(pem)
    return str(path)


def _refused_running(status: StatusMsg) -> bool:
    return status.counters.get("plans_replayed") == 1 and status.error is not None


@pytest.mark.fleet
@pytest.mark.slow
def test_a_replayed_plan_is_refused_running_and_after_a_restart(
    mosquitto_broker: LocalBroker, tmp_path: Path
) -> None:
    """A node and an aggregator with the fleet's trust key: an older plan the key signed,
    published again, is refused (a) while they run and (b) by the restarted processes, which
    find it retained on the broker; each counts it and serves the newest plan (after the
    restart, the one its state folder kept)."""
    from edvit.fleet.ops.local import LocalFleet

    topics = Topics(f"r{uuid.uuid4().hex[:8]}")
    pub = _write_pub(tmp_path / "plan.pub")
    bundle = Bundle.load(DEFAULT_BUNDLE)
    old = deploy(bundle, mosquitto_broker.url, ["node-0", "node-1"], topics, sign_key=KEY)
    newest = deploy(bundle, mosquitto_broker.url, ["node-0"], topics, sign_key=KEY)
    assert old.seq is not None and newest.seq is not None and newest.seq > old.seq
    watched = {
        "node-0": _Statuses(mosquitto_broker, topics.node_status("node-0")),
        "aggregator": _Statuses(mosquitto_broker, topics.aggregator_status()),
    }
    services = {
        "node-0": ("node", "--id", "node-0"),
        "aggregator": ("aggregator", "--id", "agg-0", "--no-planner"),
    }
    publisher = MqttClient(unique_client_id("t-replayer"), mosquitto_broker.url)
    publisher.start(required=True)

    def spawn(fleet: LocalFleet, suffix: str) -> None:
        for name, argv in services.items():
            state = tmp_path / "state" / name
            fleet.spawn(name + suffix, *argv, "--trust-key", pub, "--state-dir", str(state))

    try:
        with LocalFleet(mosquitto_broker.url, tmp_path / "logs", topics) as fleet:
            spawn(fleet, "")
            fleet.wait_ready(newest, timeout=TIMEOUT)
            # (a) the old plan, signed by the fleet's key, replayed to the running services
            publisher.publish_and_wait(topics.plan(), encode(old), qos=1, retain=True)
            sessions = {}
            for name, statuses in watched.items():
                status = statuses.until("the replay refused", _refused_running)
                assert status.error.startswith(f"plan {old.plan_id}: replayed"), status.error
                assert status.state == "ready", (name, status)
                assert status.serving_plan_id == newest.plan_id, (name, status)
                sessions[name] = status.session
            assert set(fleet.stop().values()) == {0}
            for name in services:
                saved = json.loads((tmp_path / "state" / name / STATE_NAME).read_text())
                assert (saved["plan_seq"], saved["plan_id"]) == (newest.seq, newest.plan_id)
            # (b) restarted while the broker still holds the replayed plan
            spawn(fleet, "-again")
            for name, statuses in watched.items():
                status = statuses.until(
                    "the replay refused after the restart",
                    lambda s, first=sessions[name]: (
                        s.session != first
                        and s.counters.get("plans_replayed") == 1
                        and s.state == "ready"
                    ),
                )
                assert status.error is not None, status
                assert status.error.startswith(f"plan {old.plan_id}: replayed"), status.error
                assert status.serving_plan_id == newest.plan_id, (name, status)
            assert set(fleet.stop().values()) == {0}
    finally:
        publisher.stop()
        for statuses in watched.values():
            statuses.client.stop()


@pytest.mark.fleet
def test_deploy_without_the_key_over_a_signed_plan_is_refused(
    mosquitto_broker: LocalBroker, capsys
) -> None:
    topics = Topics(f"r{uuid.uuid4().hex[:8]}")
    signed = deploy(Bundle.load(DEFAULT_BUNDLE), mosquitto_broker.url, None, topics, sign_key=KEY)
    argv = ["deploy", str(DEFAULT_BUNDLE), "--broker", mosquitto_broker.url]
    argv += ["--prefix", topics.prefix]
    code = main([*argv, "--log-level", "ERROR"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and f"plan {signed.plan_id} is signed" in err[0], err
    assert "no --sign-key" in err[0]
    assert main([*argv, "--log-level", "ERROR", "--force"]) == 0
