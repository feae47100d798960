"""The local brokers, both kinds, seen only from the outside through paho clients."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edvit.broker import cli
from edvit.broker.local import LocalBroker, find_free_port, port_is_free, wait_for_port
from edvit.errors import BrokerError, ConfigError
from helpers import MqttProbe, clear_retained

TIMEOUT = 5.0
MODEL_SIZE = 4 * 1024 * 1024


def unique_topic(name: str) -> str:
    return f"edvit-test/{name}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def events_client(broker: LocalBroker) -> Iterator[tuple[mqtt.Client, queue.Queue[str]]]:
    """A paho client with automatic reconnect that queues "connect"/"disconnect" events."""
    events: queue.Queue[str] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
    # Floats work at runtime; the short delay keeps the test fast.
    client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
    client.on_connect = lambda c, u, f, rc, p: events.put(
        "connect" if not rc.is_failure else "fail"
    )
    client.on_disconnect = lambda c, u, f, rc, p: events.put("disconnect")
    client.connect_async(broker.host, broker.port, keepalive=5)
    client.loop_start()
    try:
        yield client, events
    finally:
        client.disconnect()
        client.loop_stop()


def expect_event(events: queue.Queue[str], wanted: str, timeout: float = TIMEOUT) -> None:
    try:
        got = events.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {wanted!r} event within {timeout:g} s") from None
    assert got == wanted


def test_retained_qos1_4mb_reaches_late_subscriber(
    broker: LocalBroker, mqtt_probe: Callable[[str], MqttProbe]
) -> None:
    topic = unique_topic("model")
    payload = os.urandom(MODEL_SIZE)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2)
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    try:
        info = publisher.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(TIMEOUT)  # returns once the broker's PUBACK is in
        assert info.is_published()
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    try:
        # Subscribed only after the publisher is gone: only a retained copy can arrive.
        message = mqtt_probe(topic).get(TIMEOUT)
        assert message.topic == topic
        assert message.retain
        assert message.qos == 1
        assert message.payload == payload
    finally:
        clear_retained(broker.host, broker.port, topic)


def publish(broker: LocalBroker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 from a short-lived client, returning once the broker has acked it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()


def test_cleared_retained_message_is_not_delivered(
    broker: LocalBroker, mqtt_probe: Callable[[str], MqttProbe]
) -> None:
    topic = unique_topic("cleared")
    publish(broker, topic, b"old", retain=True)
    clear_retained(broker.host, broker.port, topic)
    probe = mqtt_probe(topic)
    # Retained copies are sent on subscribe, before anything published later: if "old" were
    # still retained it would come before this live marker.
    publish(broker, topic, b"marker")
    message = probe.get()
    assert (message.payload, message.retain) == (b"marker", False)


def test_client_reconnects_after_broker_is_killed(
    broker: LocalBroker,
    events_client: tuple[mqtt.Client, queue.Queue[str]],
    mqtt_probe: Callable[[str], MqttProbe],
) -> None:
    client, events = events_client
    expect_event(events, "connect")

    broker.restart(hard=True)  # SIGKILL, then a fresh process on the same port

    expect_event(events, "disconnect")
    expect_event(events, "connect", timeout=10)
    # Connected again for real: a message published through it reaches a new subscriber.
    topic = unique_topic("after-restart")
    probe = mqtt_probe(topic)
    client.publish(topic, b"back", qos=1).wait_for_publish(TIMEOUT)
    assert probe.get().payload == b"back"


def test_start_on_busy_port_raises_broker_error(broker: LocalBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        LocalBroker(port=broker.port, host=broker.host, kind=broker.kind).start()


def test_run_with_port_in_use_raises_config_error(broker: LocalBroker) -> None:
    args = argparse.Namespace(host=broker.host, port=broker.port, kind=broker.kind)
    with pytest.raises(ConfigError, match="already in use"):
        cli.run(args)


@pytest.mark.parametrize("port", [-1, 0, 65536])
def test_run_with_port_out_of_range_raises_config_error(port: int) -> None:
    args = argparse.Namespace(host="127.0.0.1", port=port, kind="auto")
    with pytest.raises(ConfigError, match="out of range"):
        cli.run(args)


def test_add_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "1884", "--kind", "embedded"])
    assert (args.host, args.port, args.kind) == ("127.0.0.1", 1884, "embedded")


@pytest.mark.broker
def test_run_prints_one_line_and_stops_on_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    port = find_free_port()
    args = argparse.Namespace(host="127.0.0.1", port=port, kind="embedded")
    reached = threading.Event()

    def terminate_when_listening() -> None:
        if wait_for_port("127.0.0.1", port, deadline=_deadline(10)):
            reached.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_listening, daemon=True).start()
    assert cli.run(args) == 0
    assert reached.is_set()
    out = capsys.readouterr().out
    assert out == f"edvit broker (embedded) listening on mqtt://127.0.0.1:{port}\n"
    assert port_is_free("127.0.0.1", port)  # stopped for real


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def test_stop_is_clean_and_gives_exit_code_0(
    broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    local = LocalBroker(kind=broker.kind)  # a fresh one: the session's broker stays up
    local.start()
    port = local.port
    assert local.stop() == 0
    assert "still running" not in caplog.text  # SIGINT was enough: no SIGTERM, no SIGKILL
    assert local.stop() is None  # nothing left to stop
    assert port_is_free("127.0.0.1", port)
