"""`edvit deploy --wait-nodes N`: placement over the nodes that announce themselves."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.errors import ConfigError
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy, make_plan, over_nodes
from edvit.mqtt import MqttClient
from edvit.schemas import StatusMsg, encode
from edvit.topics import Topics


def _announce(broker: LocalBroker, topics: Topics, statuses: dict[str, str]) -> None:
    client = MqttClient(f"announce-{uuid.uuid4().hex[:6]}", broker.url)
    client.start(required=True)
    try:
        for node, state in statuses.items():
            payload = encode(StatusMsg(state=state))
            client.publish_and_wait(topics.node_status(node), payload, qos=1, retain=True)
    finally:
        client.stop()


def test_deploy_places_over_the_nodes_that_announced_themselves(
    mosquitto_broker: LocalBroker,
) -> None:
    topics = Topics(f"w{uuid.uuid4().hex[:8]}")
    bundle = Bundle.load(DEFAULT_BUNDLE)
    _announce(mosquitto_broker, topics, {"node-a": "online", "node-gone": "offline"})
    # The second node comes while deploy waits.
    later = threading.Timer(0.5, _announce, (mosquitto_broker, topics, {"node-b": "ready"}))
    later.start()
    started = time.monotonic()
    plan = deploy(bundle, mosquitto_broker.url, topics=topics, wait_nodes=2, wait_timeout=20)
    later.join()
    assert time.monotonic() - started >= 0.5
    assert set(plan.assignments) == {"node-a", "node-b"}
    placed = sorted(sid for ids in plan.assignments.values() for sid in ids)
    assert placed == sorted(s.id for s in bundle.manifest.submodels)


def test_deploy_gives_up_when_too_few_nodes_announce(mosquitto_broker: LocalBroker) -> None:
    topics = Topics(f"w{uuid.uuid4().hex[:8]}")
    _announce(mosquitto_broker, topics, {"node-a": "online"})
    with pytest.raises(ConfigError, match=r"1 of 3 nodes announced themselves .*node-a"):
        deploy(
            Bundle.load(DEFAULT_BUNDLE), mosquitto_broker.url, topics=topics,
            wait_nodes=3, wait_timeout=0.5,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="not both"):
        deploy(Bundle.load(DEFAULT_BUNDLE), mosquitto_broker.url, ["node-a"], topics, wait_nodes=1)


def test_nodes_beyond_the_submodels_are_replicas() -> None:
    ids = ["sub0", "sub1", "sub2"]
    assert over_nodes(ids, ["a", "b"]) == {"a": ("sub0", "sub2"), "b": ("sub1",)}
    five = over_nodes(ids, ["a", "b", "c", "d", "e"])
    assert five == {"a": ("sub0",), "b": ("sub1",), "c": ("sub2",), "d": ("sub0",), "e": ("sub1",)}
    make_plan(Bundle.load(DEFAULT_BUNDLE), five)  # identical shares: a valid plan
    with pytest.raises(ConfigError, match="unique"):
        over_nodes(ids, ["a", "b", "c", "a"])


def test_a_model_too_large_for_its_message_is_refused_before_anything_is_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edvit.fleet.ops import deploy as deploy_module

    bundle = Bundle.load(DEFAULT_BUNDLE)
    plan = make_plan(bundle, deploy_module.bundle_assignments(bundle, None))
    sizes = [bundle.path(s.file).stat().st_size for s in bundle.manifest.submodels]
    # A limit below the largest sub-model file, as ViT-B whole (344 MB) is over the real one.
    monkeypatch.setattr(
        deploy_module, "max_payload_bytes", lambda kind: max(sizes) - 1, raising=False
    )
    published: list[str] = []
    with pytest.raises(ConfigError) as caught:
        deploy_module.publish_bundle(
            lambda topic, payload: published.append(topic), bundle, plan, Topics("t")
        )
    assert published == []
    message = str(caught.value)
    assert "\n" not in message and "a model message carries at most" in message
    assert "edvit build --num-devices" in message
