"""Signed plans (edvit/signing.py): sign and verify, the plan follower and the planner with
keys (in-memory transport), bad key files at the CLI, and one fleet on a real TLS mosquitto
where an identity holding the deploy password but not the signing key is refused."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from memory_transport import MemoryBroker, MemoryTransport
from test_retained import _follower, _model, _plan, _Recorder

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.bundle import Bundle
from edvit.cli import main
from edvit.errors import ConfigError
from edvit.fleet.ops import secure
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy, make_plan, round_robin
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.retained import PlanFollower
from edvit.schemas import (
    HealthMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    decode,
    encode,
)
from edvit.signing import PlanSignatureError, SigningKey, TrustKey, signed_bytes
from edvit.topics import Topics
from helpers import planner_with_ready_nodes, tier, wait_until

KEY = SigningKey(ed25519.Ed25519PrivateKey.generate())
OTHER = SigningKey(ed25519.Ed25519PrivateKey.generate())


def _signed(plan_id: str = "p1", key: SigningKey = KEY) -> PlanMsg:
    return key.sign(_plan(plan_id, {"m0": b"zero"}))


def _reason(plan: PlanMsg, trust: TrustKey = KEY.trust) -> str:
    with pytest.raises(PlanSignatureError) as caught:
        trust.verify(plan)
    return str(caught.value)


# -- sign and verify ---------------------------------------------------------------------------


def test_a_signed_plan_verifies_after_the_wire() -> None:
    plan = _signed()
    assert plan.key_id == KEY.key_id and plan.signature
    wire = decode(PlanMsg, encode(plan))
    assert wire is not None
    KEY.trust.verify(wire)
    assert signed_bytes(wire) == signed_bytes(plan)


def test_a_tampered_field_breaks_the_signature() -> None:
    plan = _signed()
    for change in (
        {"assignments": {"evil": ("m0",)}},
        {"fusion_sha256": "b" * 64},
        {"plan_id": "p2"},
        {"created": plan.created + 1},
    ):
        assert _reason(plan.model_copy(update=change)).startswith("bad signature")


def test_unsigned_other_key_and_garbage_are_refused() -> None:
    assert _reason(_plan("p1", {"m0": b"zero"})).startswith("unsigned")
    assert "another key" in _reason(_signed(key=OTHER))
    # Another key that claims the trusted key's id: the signature itself fails.
    forged = _signed(key=OTHER).model_copy(update={"key_id": KEY.key_id})
    assert _reason(forged).startswith("bad signature")
    for garbage in ("not base64!", "", "AAAA", "=" * 8):
        assert _reason(_signed().model_copy(update={"signature": garbage})).startswith("bad")


def test_signing_again_replaces_the_signature() -> None:
    resigned = KEY.sign(_signed(key=OTHER))
    KEY.trust.verify(resigned)


def test_key_files_load_and_bad_ones_are_named(tmp_path: Path) -> None:
    directory = tmp_path / "fleet"
    secure.init(directory, secure.parse_identities(["node-0"], []), port=8883)
    key_path = directory / "signing/plan.key"
    key = SigningKey.load(key_path)
    trust = TrustKey.load(directory / "signing/plan.pub")
    assert key.key_id == trust.key_id
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    cases = [
        (SigningKey.load, tmp_path / "missing.key"),
        (TrustKey.load, tmp_path / "missing.pub"),
        (SigningKey.load, directory / "signing/plan.pub"),  # the public half as a sign key
        (TrustKey.load, directory / "signing/plan.key"),
        (SigningKey.load, ec_key),
    ]
    for load, path in cases:
        with pytest.raises(ConfigError, match=str(path)):
            load(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["node", "--id", "node-0", "--trust-key", "/nonexistent/plan.pub"],
        ["aggregator", "--trust-key", "/nonexistent/plan.pub"],
        ["aggregator", "--sign-key", "/nonexistent/plan.key"],
        [
            "camera",
            "--id",
            "cam0",
            "--source",
            "dataset:digits",
            "--trust-key",
            "/nonexistent/plan.pub",
        ],  # fmt: skip
        ["deploy", str(DEFAULT_BUNDLE), "--sign-key", "/nonexistent/plan.key"],
    ],
)
def test_a_missing_key_file_is_named(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    # The broker is never reached: the key is read first (port 1: nothing listens).
    assert main([*argv, "--broker", "mqtt://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/plan." in err and len(err.strip().splitlines()) == 1


def test_a_sign_key_that_is_not_the_trusted_pair_is_refused(tmp_path: Path, capsys) -> None:
    key, pub = tmp_path / "plan.key", tmp_path / "other.pub"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    pub.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    argv = ["aggregator", "--sign-key", str(key), "--trust-key", str(pub)]
    assert main([*argv, "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "is not the pair of" in capsys.readouterr().err


# -- the plan follower with a trust key --------------------------------------------------------


def _trusting_follower(broker: MemoryBroker) -> tuple[PlanFollower, MemoryTransport]:
    client = MemoryTransport(broker)
    follower: PlanFollower[dict[str, bytes]] = PlanFollower(
        client, Topics(), lambda plan: {s.id: s.sha256 for s in plan.submodels}, _Recorder(),
        trust_key=KEY.trust,
    )  # fmt: skip
    follower.start()
    return follower, client


def test_a_follower_with_a_trust_key_refuses_and_keeps_serving_the_old_plan() -> None:
    broker, topics = MemoryBroker(), Topics()
    follower, client = _trusting_follower(broker)
    try:
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        broker.publish(topics.plan(), encode(_signed("p1")), retain=True)
        wait_until(lambda: follower.ready, what="the signed plan served")
        refusals = [
            (_plan("p2", {"m0": b"zero"}), "plan p2: unsigned"),
            (_signed("p3", key=OTHER), "plan p3: bad signature"),
            (_signed("p4").model_copy(update={"assignments": {}}), "plan p4: bad signature"),
            (None, "plan (cleared): unsigned"),
        ]
        for count, (plan, reason) in enumerate(refusals, start=1):
            broker.publish(topics.plan(), encode(plan) if plan else b"", retain=True)
            assert follower.refused is not None and follower.refused.startswith(reason)
            assert follower.active is not None and follower.active.plan.plan_id == "p1"
            assert follower.target is not None and follower.target.plan_id == "p1"
            assert client.counters["plan_signatures_refused"] == count
            assert client.counters["plans_refused"] == count
        # The next signed plan is taken, and the refusal is forgotten.
        broker.publish(topics.plan(), encode(_signed("p5")), retain=True)
        wait_until(lambda: follower.ready and follower.active.plan.plan_id == "p5")
        assert follower.refused is None
    finally:
        follower.stop()


def test_the_signed_plan_again_after_a_refused_one_clears_the_error() -> None:
    broker, topics = MemoryBroker(), Topics()
    follower, _client = _trusting_follower(broker)
    try:
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        good = encode(_signed("p1"))
        broker.publish(topics.plan(), good, retain=True)
        wait_until(lambda: follower.ready)
        forged = _signed("p1", key=OTHER)  # the same plan id, not our key
        broker.publish(topics.plan(), encode(forged), retain=True)
        assert follower.refused is not None
        broker.publish(topics.plan(), good, retain=True)  # the operator deploys again
        assert follower.refused is None and follower.ready
    finally:
        follower.stop()


def test_without_a_trust_key_unsigned_plans_are_served_as_before() -> None:
    broker, topics = MemoryBroker(), Topics()
    follower, _client = _follower(broker, _Recorder())
    try:
        broker.publish(topics.model("m0"), _model(b"zero"), retain=True)
        broker.publish(topics.plan(), encode(_plan("p1", {"m0": b"zero"})), retain=True)
        wait_until(lambda: follower.ready)
        broker.publish(topics.plan(), encode(_signed("p2", key=OTHER)), retain=True)
        wait_until(lambda: follower.ready and follower.active.plan.plan_id == "p2")
    finally:
        follower.stop()


# -- the planner re-places only with the sign key ----------------------------------------------


def _three_node_plan() -> PlanMsg:
    bundle = Bundle.load(Path(DEFAULT_BUNDLE))
    ids = [s.id for s in bundle.manifest.submodels]
    return make_plan(bundle, round_robin(ids, ["node-0", "node-1", "node-2"]))


def test_the_planner_signs_the_plans_it_heals_and_restores() -> None:
    deployed = KEY.sign(_three_node_plan())
    planner, broker, _client = planner_with_ready_nodes(deployed, sign_key=KEY)
    topics = Topics()
    try:
        broker.publish(topics.node_status("node-2"), encode(StatusMsg(state="offline")))
        healed = planner.tick()
        assert healed is not None and "node-2" not in healed.assignments
        KEY.trust.verify(decode(PlanMsg, broker.retained[topics.plan()]))
        broker.publish(topics.node_status("node-2"), encode(StatusMsg(state="ready")))
        restored = planner.tick()
        assert restored is not None and restored.plan_id == deployed.plan_id
        KEY.trust.verify(decode(PlanMsg, broker.retained[topics.plan()]))
    finally:
        planner.stop()


def test_the_planner_without_the_sign_key_does_not_publish_and_says_why() -> None:
    deployed = KEY.sign(_three_node_plan())
    planner, broker, client = planner_with_ready_nodes(deployed, trust_key=KEY.trust)
    topics = Topics()
    try:
        broker.publish(topics.node_status("node-2"), encode(StatusMsg(state="offline")))
        assert planner.tick() is None and planner.tick() is None
        assert decode(PlanMsg, broker.retained[topics.plan()]) == deployed
        health = decode(HealthMsg, broker.retained[topics.fleet_health()])
        assert health is not None and "--sign-key" in (health.error or "")
        assert set(health.degraded) == set(deployed.assignments["node-2"])
        assert client.counters["plans_not_signed"] == 1  # logged once, not every tick
    finally:
        planner.stop()


def test_the_planner_ignores_a_plan_its_key_did_not_sign() -> None:
    deployed = KEY.sign(_three_node_plan())
    planner, broker, client = planner_with_ready_nodes(deployed, sign_key=KEY)
    topics = Topics()
    try:
        rogue = make_plan(Bundle.load(Path(DEFAULT_BUNDLE)), {"evil": ("sub0", "sub1", "sub2")})
        broker.publish(topics.plan(), encode(rogue), retain=True)
        assert client.counters["plan_signatures_refused"] == 1
        assert planner.tick() is None  # still the deployed placement: nothing to heal
        assert decode(PlanMsg, broker.retained[topics.plan()]) == rogue  # not re-signed
    finally:
        planner.stop()


# -- a fleet on a TLS mosquitto: the deploy password without the key is not enough ------------


@pytest.fixture(scope="module")
@tier("broker")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LocalBroker]]:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    directory = tmp_path_factory.mktemp("signed") / "fleet"
    secure.init(directory, secure.parse_identities(["node-0", "node-1"], ["cam0"]), port=8883)
    broker = LocalBroker(
        kind="mosquitto", log_path=directory.parent / "broker.log",
        secure_config=directory / "broker/mosquitto.conf",
    )  # fmt: skip
    broker.start()
    try:
        yield directory, broker
    finally:
        broker.stop()


def _login(directory: Path, identity: str) -> dict[str, str]:
    return secure.login_env(directory, identity)


def _connection(directory: Path, broker: LocalBroker, identity: str) -> Connection:
    return secure.login(directory, identity, f"mqtts://localhost:{broker.port}")


@pytest.mark.fleet
@pytest.mark.slow
def test_a_plan_from_the_password_without_the_key_is_refused_by_the_node(
    secured: tuple[Path, LocalBroker], tmp_path: Path
) -> None:
    from edvit.fleet.ops.local import LocalFleet

    directory, broker = secured
    topics = Topics()  # the ACL secure init wrote is for the default prefix
    key_path = directory / "signing/plan.key"
    key = SigningKey.load(key_path)
    pub = str(directory / "signing/plan.pub")
    deployer, dashboard = (_connection(directory, broker, i) for i in ("deploy", "dashboard"))
    bundle = Bundle.load(DEFAULT_BUNDLE)
    first = deploy(bundle, deployer, ["node-0"], topics, sign_key=key)
    statuses: queue.Queue[StatusMsg] = queue.Queue()
    predictions: queue.Queue[PredictionMsg] = queue.Queue()

    def on_status(_topic: str, payload: bytes) -> None:
        if (status := decode(StatusMsg, payload)) is not None:
            statuses.put(status)

    def on_prediction(_topic: str, payload: bytes) -> None:
        if (prediction := decode(PredictionMsg, payload)) is not None:
            predictions.put(prediction)

    def node_status_says(text: str) -> StatusMsg:
        while True:
            status = statuses.get(timeout=20)
            if status.error and text in status.error:
                return status

    watcher = MqttClient(unique_client_id("watch"), dashboard)
    watcher.route(topics.node_status("node-0"), on_status, qos=1)
    watcher.route(topics.predictions("cam0"), on_prediction, qos=1)
    with LocalFleet(dashboard, tmp_path / "logs", topics) as fleet:
        try:
            watcher.start(required=True)
            fleet.spawn("node-0", "node", "--id", "node-0", "--trust-key", pub,
                        env=_login(directory, "node-0"))  # fmt: skip
            fleet.spawn("aggregator", "aggregator", "--sign-key", str(key_path),
                        env=_login(directory, "aggregator"))  # fmt: skip
            fleet.wait_ready(first, timeout=90)
            # The deploy identity's own login (password, certificate), but no signing key
            # (--force: deploy itself refuses to put an unsigned plan over a signed one);
            # then a key that is not the fleet's. Both would move every sub-model off node-0.
            for sign_key, reason in ((None, "unsigned"), (OTHER, "bad signature")):
                rogue = deploy(bundle, deployer, ["node-1"], topics, sign_key=sign_key, force=True)
                status = node_status_says(f"plan {rogue.plan_id}: {reason}")
                assert status.state == "ready" and status.plan_id == first.plan_id
                assert status.serving_plan_id == first.plan_id
                assert status.submodels == first.assignments["node-0"]
            # The node keeps answering under the deployed plan.
            fleet.spawn(
                "cam0", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
                "--count", "3", "--fps", "5", "--trust-key", pub, env=_login(directory, "cam0"),
            )  # fmt: skip
            answered = [predictions.get(timeout=30) for _ in range(3)]
            assert {p.plan_id for p in answered} == {first.plan_id}
            assert not any(p.degraded for p in answered)
        finally:
            watcher.stop()
        codes = fleet.stop()
    assert all(code == 0 for code in codes.values()), codes
