"""Several brokers in --broker: parsing, the round trip through str(), and a client that
moves on to the next broker when it loses the one it is on (two plain mosquittos here; the
NATS cluster and the mosquitto bridge are in test_cluster.py)."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, find_free_port, mosquitto_path
from edvit.errors import BrokerError, ConfigError
from edvit.mqtt import BrokerAddress, Connection, MqttClient
from edvit.schemas import StatusMsg
from helpers import MqttProbe, tier

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")


def test_a_comma_separated_broker_list_round_trips_through_str() -> None:
    connection = Connection("mqtt://10.0.0.1:1884, 10.0.0.2 ,mqtt://10.0.0.3:1885")
    assert connection.addresses == (
        BrokerAddress("10.0.0.1", 1884),
        BrokerAddress("10.0.0.2", 1883),
        BrokerAddress("10.0.0.3", 1885),
    )
    assert connection.address == BrokerAddress("10.0.0.1", 1884)
    text = str(connection)
    assert text == "mqtt://10.0.0.1:1884,mqtt://10.0.0.2:1883,mqtt://10.0.0.3:1885"
    assert Connection(text).addresses == connection.addresses
    assert str(Connection("broker")) == "mqtt://broker:1883"  # one broker: a plain address


def test_a_broker_list_mixing_tls_and_plain_is_refused() -> None:
    with pytest.raises(ConfigError, match="mqtts:// for all brokers or for none"):
        Connection("mqtts://a,mqtt://b").check()
    with pytest.raises(ConfigError, match="no address given"):
        Connection(" , ").check()


@pytest.fixture
@tier("broker")
def two_brokers(tmp_path: Path) -> Iterator[tuple[LocalBroker, LocalBroker]]:
    first = LocalBroker(kind="mosquitto", log_path=tmp_path / "first.log")
    second = LocalBroker(kind="mosquitto", log_path=tmp_path / "second.log")
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def _received(client: MqttClient, topic: str, timeout: float = 10.0) -> bool:
    """Publish on `topic` until the client's own subscription delivers it back."""
    got: queue.Queue[bytes] = queue.Queue()
    client.route(topic, lambda _t, payload: got.put(payload))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.connected:
            client.publish(topic, b"x")
        try:
            got.get(timeout=0.3)
            return True
        except queue.Empty:
            continue
    return False


def test_client_starts_on_the_first_broker_that_answers_and_fails_over(
    two_brokers: tuple[LocalBroker, LocalBroker],
) -> None:
    first, second = two_brokers
    second.start()
    client = MqttClient(f"failover-{uuid.uuid4().hex[:6]}", f"{first.url},{second.url}")
    try:
        assert client.start(wait=10, required=True)  # first is down: second answers
        assert client.address == BrokerAddress.parse(second.url)
        assert client.counters["broker_failovers"] == 0  # not a failover: a first connect
        first.start()
        second.kill()
        started = time.monotonic()
        assert _received(client, f"t{uuid.uuid4().hex[:6]}/ping", timeout=15)
        assert client.address == BrokerAddress.parse(first.url)
        assert client.counters["broker_failovers"] == 1
        assert time.monotonic() - started < 10
    finally:
        client.stop()


def test_a_single_broker_is_retried_as_before(
    two_brokers: tuple[LocalBroker, LocalBroker],
) -> None:
    first, _ = two_brokers
    first.start()
    client = MqttClient(f"single-{uuid.uuid4().hex[:6]}", first.url)
    try:
        assert client.start(wait=10, required=True)
        first.restart(hard=True)
        assert _received(client, f"t{uuid.uuid4().hex[:6]}/ping", timeout=15)
        assert client.counters["broker_failovers"] == 0
        assert client.address == BrokerAddress.parse(first.url)
    finally:
        client.stop()


def test_no_broker_of_the_list_answering_names_them_all() -> None:
    urls = f"mqtt://127.0.0.1:{find_free_port()},mqtt://127.0.0.1:{find_free_port()}"
    client = MqttClient(f"none-{uuid.uuid4().hex[:6]}", urls)
    with pytest.raises(BrokerError, match=f"no MQTT broker answered at {urls}"):
        client.start(wait=2, required=True)


def test_max_qos_0_publishes_what_asks_for_qos_1_at_qos_0(
    two_brokers: tuple[LocalBroker, LocalBroker],
) -> None:
    """--max-qos 0 (a NATS cluster, docs/operations/brokers.md): a QoS 1 publish and the
    retained status go out at QoS 0; a subscriber asking for QoS 1 gets them at QoS 0."""
    first, _ = two_brokers
    first.start()
    topic = f"t{uuid.uuid4().hex[:6]}"
    client = MqttClient(
        f"qos0-{uuid.uuid4().hex[:6]}",
        Connection(first.url, max_qos=0),
        status_topic=f"{topic}/status",
    )
    try:
        with MqttProbe(first.host, first.port, f"{topic}/#", qos=1) as probe:
            assert client.start(wait=10, required=True)
            client.set_status(StatusMsg(state="ready"))
            client.publish(f"{topic}/data", b"x", qos=1)
            got = {}
            while len(got) < 2:
                message = probe.messages.get(timeout=10)
                got[message.topic] = message.qos
        assert got == {f"{topic}/status": 0, f"{topic}/data": 0}
    finally:
        client.stop()


def test_max_qos_takes_0_or_1() -> None:
    with pytest.raises(ConfigError, match=r"--max-qos 2: expected 0 or 1"):
        Connection("mqtt://127.0.0.1:1883", max_qos=2).check()
