"""Messages per second through one `MqttClient` publisher and one subscriber on a local
mosquitto, over MQTT 3.1.1 and MQTT 5 (frames carry their expiry property over MQTT 5):
what the protocol costs paho. `python -m edvit.fleet.bench.mqtt_rate [--messages 30000]`."""

from __future__ import annotations

import argparse
import threading
import time

from edvit.broker.local import LocalBroker
from edvit.mqtt import Connection, MqttClient, unique_client_id


def rate(broker_url: str, version: str, messages: int) -> float:
    received = 0
    done = threading.Event()

    def on_frame(_topic: str, _payload: bytes) -> None:
        nonlocal received
        received += 1
        if received == messages:
            done.set()

    connection = Connection(broker_url, mqtt_version=version)
    subscriber = MqttClient(unique_client_id("rate-in"), connection)
    subscriber.route("edvit/cameras/+/frame", on_frame)
    publisher = MqttClient(unique_client_id("rate-out"), connection)
    subscriber.start(required=True)
    publisher.start(required=True)
    time.sleep(0.3)
    started = time.perf_counter()
    for i in range(messages):
        publisher.publish("edvit/cameras/cam0/frame", b"x" * 600)
        if i % 500 == 0:
            time.sleep(0.002)  # let the loops drain: paho queues at most 1000 messages
    done.wait(60)
    elapsed = time.perf_counter() - started
    publisher.stop()
    subscriber.stop()
    return received / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=30_000)
    args = parser.parse_args()
    with LocalBroker(kind="mosquitto") as broker:
        for version in ("3.1.1", "5", "3.1.1", "5"):
            print(f"MQTT {version}: {rate(broker.url, version, args.messages):,.0f} msg/s")


if __name__ == "__main__":
    main()
