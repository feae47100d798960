"""Home Assistant MQTT discovery (aggregator/ha.py, `edvit aggregator --ha-discovery`).

The payloads against the keys of https://www.home-assistant.io/integrations/sensor.mqtt/,
their templates rendered with jinja2 (Home Assistant's template engine) against real
messages, then the aggregator announcing cameras over the in-memory transport and against
a real mosquitto. The aggregator runs the shipped bundle's fusion model; features are made
up (ones), so no model is built or run but the fusion MLP.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from memory_transport import MemoryBroker, MemoryTransport

from edvit import __version__
from edvit.aggregator.ha import (
    ATTRIBUTES_TEMPLATE,
    AVAILABILITY_TEMPLATE,
    MAX_CAMERAS,
    STATE_INTERVAL_S,
    STATE_TEMPLATE,
    HaDiscovery,
    config_topic,
    safe_id,
    sensor_config,
)
from edvit.aggregator.service import Aggregator, DeadlinePolicy
from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.bundle import Bundle
from edvit.cli import main
from edvit.errors import ConfigError
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import make_plan, publish_bundle, round_robin
from edvit.mqtt import MqttClient
from edvit.schemas import FeaturesMsg, PlanMsg, PredictionMsg, StatusMsg, encode
from edvit.topics import Topics
from helpers import MqttProbe, wait_until

try:
    import jinja2
except ImportError:  # a runtime-only venv: the templates are checked as strings only
    jinja2 = None

# The sensor's documented configuration keys (full names) and the device block's.
SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "device", "device_class", "enabled_by_default", "encoding", "entity_category",
    "entity_picture", "expire_after", "force_update", "icon", "json_attributes_template",
    "json_attributes_topic", "last_reset_value_template", "name", "object_id", "options",
    "origin", "payload_available", "payload_not_available", "platform",
    "suggested_display_precision", "qos", "state_class", "state_topic", "unique_id",
    "unit_of_measurement", "value_template", "default_entity_id",
}  # fmt: skip
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
# <discovery_prefix>/<component>/[<node_id>/]<object_id>/config, ids of [a-zA-Z0-9_-]+.
CONFIG_TOPIC = re.compile(r"^homeassistant/sensor/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config$")


def render(template: str, payload: bytes) -> str:
    """A value template as Home Assistant renders it: `value_json` is the parsed payload."""
    if jinja2 is None:
        pytest.skip("jinja2 is not installed")
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


def prediction(camera: str = "cam0", seq: int = 3) -> PredictionMsg:
    return PredictionMsg(
        camera=camera, seq=seq, ts=time.time(), label=1, class_name="Trouser", score=0.93,
        topk=(("Trouser", 0.93), ("Dress", 0.05)), latency_ms=12.5, submodels=("sub0", "sub1"),
        missing=("sub2",), degraded=True, plan_id="p1", true_label=1,
    )  # fmt: skip


# -- the payload ---------------------------------------------------------------------------


def test_the_config_has_the_documented_keys_only() -> None:
    config = sensor_config(Topics(), "cam0")
    assert set(config) <= SENSOR_KEYS
    for key in ("name", "unique_id", "state_topic", "value_template", "availability", "device"):
        assert config[key], key
    state = "homeassistant/sensor/edvit/cam0/state"
    assert config["state_topic"] == config["json_attributes_topic"] == state
    [availability] = config["availability"]
    assert set(availability) <= AVAILABILITY_KEYS
    assert availability["topic"] == "edvit/aggregator/status"
    device = config["device"]
    assert set(device) <= DEVICE_KEYS
    assert device["identifiers"] == [config["unique_id"]]
    assert device["manufacturer"] == "edvit" and "cam0" in device["name"]
    assert set(config["origin"]) <= ORIGIN_KEYS
    assert config["origin"]["sw_version"] == __version__
    json.dumps(config)  # plain JSON


def test_the_device_model_names_the_bundle() -> None:
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), {"n": ("sub0", "sub1", "sub2")})
    model = sensor_config(Topics(), "cam0", plan)["device"]["model"]
    assert plan.bundle_sha256[:12] in model and "untrained" not in model
    untrained = plan.model_copy(update={"untrained": True})
    assert "(untrained" in sensor_config(Topics(), "cam0", untrained)["device"]["model"]


def test_the_templates_read_the_prediction_fields() -> None:
    assert STATE_TEMPLATE == "{{ value_json['class'] }}"
    for field in ("score", "latency_ms", "degraded", "seq"):
        assert f"value_json.{field}" in ATTRIBUTES_TEMPLATE
    assert "value_json.state == 'ready'" in AVAILABILITY_TEMPLATE


def test_the_state_is_the_class_and_the_attributes_the_score() -> None:
    payload = encode(prediction())
    assert render(STATE_TEMPLATE, payload) == "Trouser"
    attributes = json.loads(render(ATTRIBUTES_TEMPLATE, payload))
    assert attributes == {
        "score": 0.93, "latency_ms": 12.5, "degraded": True, "seq": 3, "plan_id": "p1",
        "untrained": False,
    }  # fmt: skip
    # An answer from an untrained bundle says so; one from before the field reads as trained.
    untrained = encode(prediction().model_copy(update={"untrained": True}))
    assert json.loads(render(ATTRIBUTES_TEMPLATE, untrained))["untrained"] is True
    older = json.loads(payload)
    del older["untrained"]
    assert json.loads(render(ATTRIBUTES_TEMPLATE, json.dumps(older).encode()))["untrained"] is False


@pytest.mark.parametrize(
    ("status", "available"),
    [
        (StatusMsg(state="ready", plan_id="p1", serving_plan_id="p1"), "online"),
        # a newer plan loads, the previous one still answers
        (StatusMsg(state="online", plan_id="p2", serving_plan_id="p1"), "online"),
        (StatusMsg(state="online"), "offline"),  # no plan loaded: nothing answers
        (StatusMsg(state="offline", ts=0.0), "offline"),  # the Will
        # a clean stop: the offline status keeps the plans it served
        (StatusMsg(state="offline", plan_id="p1", serving_plan_id="p1"), "offline"),
        (StatusMsg(state="offline", plan_id="p2", serving_plan_id="p1"), "offline"),
    ],
)
def test_availability_follows_the_aggregator_status(status: StatusMsg, available: str) -> None:
    assert render(AVAILABILITY_TEMPLATE, encode(status)) == available


@pytest.mark.parametrize("camera", ["cam0", "cam 0", "cam.1", "cam_1", "café", "a:b", "-_-"])
def test_topics_and_ids_are_ha_safe(camera: str) -> None:
    topic = config_topic("homeassistant", Topics(), camera)
    assert CONFIG_TOPIC.match(topic), topic
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", sensor_config(Topics(), camera)["unique_id"])


def test_ids_made_safe_stay_distinct() -> None:
    cameras = ["cam.1", "cam_1", "cam 1", "cam:1", "cam1"]
    assert len({safe_id(c) for c in cameras}) == len(cameras)
    assert safe_id("cam_1") == "cam_1"  # safe ids are kept as they are
    assert config_topic("ha", Topics("site/a"), "c").startswith("ha/sensor/site_a_")


@pytest.mark.parametrize(
    "prefix", ["", "a/#", "ha/+", "/ha", "ha/", "ha//x", "home assistant", "ha\n"]
)
def test_a_bad_discovery_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError):
        HaDiscovery(MemoryTransport(MemoryBroker()), Topics(), prefix)


def test_the_command_names_a_bad_discovery_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["aggregator", "--ha-discovery", "--ha-prefix", "ha/#", "--broker", "127.0.0.1:1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "invalid Home Assistant discovery prefix 'ha/#'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ha-discovery", "--ha-prefix", ""], "invalid Home Assistant discovery prefix ''"),
        (["--ha-prefix", "site/ha"], "--ha-prefix without --ha-discovery announces nothing"),
    ],
)
def test_the_command_refuses_a_prefix_it_would_not_use(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["aggregator", "--id", "a", "--broker", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_each_camera_is_announced_once_retained() -> None:
    broker = MemoryBroker()
    discovery = HaDiscovery(MemoryTransport(broker), Topics())
    sent = [discovery.saw(camera) for _ in range(50) for camera in ("cam0", "cam1")]
    assert sum(sent) == 2
    assert sorted(broker.retained) == [
        "homeassistant/sensor/edvit/cam0/config", "homeassistant/sensor/edvit/cam1/config",
    ]  # fmt: skip
    assert len(broker.messages("homeassistant/#")) == 2


def test_a_new_bundle_updates_the_config_and_ids_no_topic_can_have_are_skipped() -> None:
    broker = MemoryBroker()
    discovery = HaDiscovery(MemoryTransport(broker), Topics())
    bundle = Bundle.load(DEFAULT_BUNDLE)
    plan = make_plan(bundle, {"n": ("sub0", "sub1", "sub2")})
    other = plan.model_copy(update={"bundle_sha256": "b" * 64})
    assert discovery.saw("cam0", plan)
    assert not discovery.saw("cam0", make_plan(bundle, {"m": ("sub0", "sub1", "sub2")}))
    assert discovery.saw("cam0", other)  # the device model changes with the bundle
    assert [discovery.saw(c) for c in ("", " cam", "a+b")] == [False] * 3
    assert len(broker.messages("homeassistant/#")) == 2


def test_no_more_than_max_cameras_are_announced() -> None:
    broker = MemoryBroker()
    discovery = HaDiscovery(MemoryTransport(broker), Topics())
    for i in range(MAX_CAMERAS + 10):
        discovery.saw(f"cam{i}")
    assert len(broker.retained) == MAX_CAMERAS


# -- in the aggregator, over the in-memory transport -------------------------------------------


def _features(topics: Topics, plan: PlanMsg, camera: str, seq: int) -> list[tuple[str, bytes]]:
    """One frame's feature vectors, every sub-model's (made-up values)."""
    out, ts = [], time.time()  # (camera, seq, ts) names the frame
    owner = {sid: node for node, served in plan.assignments.items() for sid in served}
    for ref in plan.submodels:
        msg = FeaturesMsg(
            camera=camera, seq=seq, ts=ts, submodel=ref.id, plan_id=plan.plan_id,
            node=owner[ref.id], dtype="float32",
            data=np.ones(ref.feature_dim, np.float32).tobytes(), dim=ref.feature_dim,
            infer_ms=0.1,
        )  # fmt: skip
        out.append((topics.features(camera, ref.id, owner[ref.id]), encode(msg)))
    return out


@pytest.fixture(scope="module")
def shipped() -> tuple[Bundle, PlanMsg]:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    return bundle, make_plan(bundle, round_robin([s.id for s in bundle.manifest.submodels], ["n0"]))


@pytest.fixture
def memory_fleet(
    shipped: tuple[Bundle, PlanMsg],
) -> Iterator[tuple[MemoryBroker, Aggregator, MemoryTransport]]:
    bundle, plan = shipped
    broker, topics = MemoryBroker(), Topics()
    aggregator = Aggregator(
        client=MemoryTransport(broker, "aggregator"), deadline=DeadlinePolicy(cap_s=5.0),
        ha_prefix="homeassistant",
    )  # fmt: skip
    injector = MemoryTransport(broker, "injector")
    aggregator.start()
    try:
        publish_bundle(lambda t, p: injector.publish(t, p, retain=True), bundle, plan, topics)
        wait_until(lambda: aggregator.follower.ready and aggregator.answering, 20)
        yield broker, aggregator, injector
    finally:
        aggregator.stop()


def test_the_aggregator_announces_each_camera_it_answers_once(
    memory_fleet: tuple[MemoryBroker, Aggregator, MemoryTransport],
    shipped: tuple[Bundle, PlanMsg],
) -> None:
    broker, aggregator, injector = memory_fleet
    topics, plan = Topics(), shipped[1]
    for seq in range(20):
        for camera in ("cam0", "cam.1"):
            for topic, payload in _features(topics, plan, camera, seq):
                injector.publish(topic, payload)
    wait_until(lambda: aggregator.counters["predictions"] == 40, 10)
    configs = broker.messages("homeassistant/sensor/+/+/config")
    assert len(configs) == 2 and aggregator.counters["ha_configs"] == 2
    by_topic = {t: json.loads(p) for t, p in broker.retained.items() if t.startswith("home")}
    cam0 = by_topic["homeassistant/sensor/edvit/cam0/config"]
    assert cam0 == sensor_config(topics, "cam0", plan)
    # Each camera's state is retained: one per camera here, since the features (all ones)
    # give every frame the same class within STATE_INTERVAL_S.
    states = [t for t, _ in broker.log if t.endswith("/state")]
    assert sorted(states) == [
        "homeassistant/sensor/edvit/cam0/state",
        f"homeassistant/sensor/edvit/{safe_id('cam.1')}/state",
    ]
    assert aggregator.counters["ha_states"] == 2
    state = broker.retained[cam0["state_topic"]]
    assert PredictionMsg.model_validate_json(state).camera == "cam0"
    # The templates render the class of the prediction the aggregator published.
    if jinja2 is not None:
        assert render(cam0["value_template"], state) in plan.classes
    # The prediction stream itself stays unretained.
    assert not [t for t in broker.retained if t.startswith(f"{topics.prefix}/predictions/")]


def test_the_state_follows_class_changes_at_once_and_repeats_at_most_each_interval() -> None:
    broker = MemoryBroker()
    discovery = HaDiscovery(MemoryTransport(broker), Topics())
    plan = make_plan(Bundle.load(DEFAULT_BUNDLE), {"n": ("sub0", "sub1", "sub2")})
    topic = "homeassistant/sensor/edvit/cam0/state"

    def answer(seq: int, class_name: str, degraded: bool = False) -> None:
        msg = prediction("cam0", seq).model_copy(
            update={"class_name": class_name, "degraded": degraded}
        )
        discovery.answered(msg, encode(msg), plan)

    answer(0, "Trouser")
    answer(1, "Trouser")  # same class within the interval: not published
    answer(2, "Dress")  # a new class: at once
    answer(3, "Dress", degraded=True)  # degraded now: at once
    assert [json.loads(p)["seq"] for p in broker.messages(topic)] == [0, 2, 3]
    time.sleep(STATE_INTERVAL_S + 0.05)
    answer(4, "Dress", degraded=True)  # the interval passed: the latest score and seq
    assert json.loads(broker.retained[topic])["seq"] == 4
    answer(5, "", degraded=True)
    assert [json.loads(p)["class"] for p in broker.messages(topic)][-1] == ""
    discovery.answered(prediction("a+b", 0), encode(prediction("a+b", 0)), plan)
    assert len(broker.messages("homeassistant/sensor/+/+/state")) == 5  # no state unannounced


def test_bad_payloads_on_the_prediction_topics_change_nothing(
    memory_fleet: tuple[MemoryBroker, Aggregator, MemoryTransport],
    shipped: tuple[Bundle, PlanMsg],
) -> None:
    broker, aggregator, injector = memory_fleet
    topics, plan = Topics(), shipped[1]
    for payload in (b"\xff\x00", b"{}", b'{"camera": "x"}', b"[]", b"null", b"{" * 100):
        injector.publish(topics.predictions("evil"), payload)
        injector.publish(topics.predictions("cam0"), payload)
    injector.publish(topics.predictions("evil"), encode(prediction("evil")))
    assert broker.messages("homeassistant/#") == []  # only answered cameras are announced
    for topic, payload in _features(topics, plan, "cam0", 0):
        injector.publish(topic, payload)
    wait_until(lambda: aggregator.counters["predictions"] == 1, 10)
    topics_sent = [t for t, _ in broker.log if t.startswith("homeassistant/")]
    assert topics_sent == [
        "homeassistant/sensor/edvit/cam0/config", "homeassistant/sensor/edvit/cam0/state",
    ]  # fmt: skip
    assert aggregator.counters["handler_errors"] == 0


def test_without_the_flag_nothing_is_announced(shipped: tuple[Bundle, PlanMsg]) -> None:
    bundle, plan = shipped
    broker, topics = MemoryBroker(), Topics()
    aggregator = Aggregator(client=MemoryTransport(broker, "aggregator"))
    injector = MemoryTransport(broker, "injector")
    aggregator.start()
    try:
        publish_bundle(lambda t, p: injector.publish(t, p, retain=True), bundle, plan, topics)
        wait_until(lambda: aggregator.follower.ready and aggregator.answering, 20)
        for topic, payload in _features(topics, plan, "cam0", 0):
            injector.publish(topic, payload)
        wait_until(lambda: aggregator.counters["predictions"] == 1, 10)
    finally:
        aggregator.stop()
    assert aggregator.ha is None and broker.messages("homeassistant/#") == []


# -- against a real mosquitto ---------------------------------------------------------------


def _retained(broker: LocalBroker, topic_filter: str, quiet_s: float = 1.0) -> dict[str, bytes]:
    """What a subscriber that comes now (Home Assistant restarting) gets retained."""
    found: dict[str, bytes] = {}
    with MqttProbe(broker.host, broker.port, topic_filter) as probe:
        while True:
            try:
                message = probe.get(quiet_s)
            except TimeoutError:
                return found
            if message.retain:
                found[message.topic] = message.payload


@pytest.mark.broker
def test_config_and_state_are_retained_on_a_real_broker_and_come_back_after_its_restart(
    shipped: tuple[Bundle, PlanMsg], tmp_path: Path
) -> None:
    """A Home Assistant that subscribes later gets each camera's config and latest
    prediction; a subscriber to the prediction stream (standby, dashboard, `edvit watch`) gets
    nothing retained; a broker restarted without persistence lost both, and the aggregator
    publishes them again once connected again."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    bundle, plan = shipped
    run = uuid.uuid4().hex[:8]
    topics, ha_prefix = Topics(f"t{run}"), f"ha{run}/x"
    config_at = f"{ha_prefix}/sensor/t{run}/cam0/config"
    state_at = f"{ha_prefix}/sensor/t{run}/cam0/state"
    with LocalBroker(kind="mosquitto", log_path=tmp_path / "broker.log") as broker:
        sender = MqttClient(f"sender-{run}", broker.url)
        sender.start(required=True)
        aggregator = Aggregator(
            broker.url, topics=topics, deadline=DeadlinePolicy(cap_s=5.0), lease_ttl_s=0.5,
            ha_prefix=ha_prefix,
        )  # fmt: skip

        def answer(seq: int) -> None:
            answered = aggregator.counters["predictions"]
            for topic, payload in _features(topics, plan, "cam0", seq):
                sender.publish(topic, payload, qos=1)
            wait_until(lambda: aggregator.counters["predictions"] == answered + 1, 10)

        try:
            publish_bundle(
                lambda t, p: sender.publish_and_wait(t, p, retain=True), bundle, plan, topics
            )
            aggregator.start()
            wait_until(lambda: aggregator.follower.ready and aggregator.answering, 30)
            answer(0)
            wait_until(
                lambda: set(_retained(broker, f"{ha_prefix}/#", 0.3)) == {config_at, state_at}, 5
            )
            retained = _retained(broker, f"{ha_prefix}/#")
            config = json.loads(retained[config_at])
            assert config == sensor_config(topics, "cam0", plan, ha_prefix)
            assert config["state_topic"] == state_at
            assert config["availability"][0]["topic"] == f"t{run}/aggregator/status"
            state = PredictionMsg.model_validate_json(retained[state_at])
            assert (state.camera, state.seq) == ("cam0", 0)
            assert _retained(broker, f"t{run}/predictions/#") == {}

            broker.restart()
            assert _retained(broker, f"{ha_prefix}/#", 0.3) == {}  # no persistence
            # Features sent before the aggregator has subscribed again are lost (QoS 0 to it).
            wait_until(
                lambda: (
                    aggregator.client.counters["connects"] == 2
                    and aggregator.client.subscribed(topics.all_features())
                    and sender.connected
                ),
                15,
                "aggregator subscribed again and sender connected",
            )
            answer(1)
            wait_until(
                lambda: set(_retained(broker, f"{ha_prefix}/#", 0.3)) == {config_at, state_at}, 5
            )
            state = PredictionMsg.model_validate_json(_retained(broker, f"{ha_prefix}/#")[state_at])
            assert state.seq == 1
            assert aggregator.counters["ha_configs"] == 2
        finally:
            aggregator.stop()
            sender.stop()
