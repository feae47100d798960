"""An in-memory stand-in for the MQTT client, for fast unit tests of a service's logic.

It keeps retained messages and routes by MQTT topic filters like a broker, and delivers
through `edvit.mqtt.deliver`, exactly as the real client does, but synchronously in the
publisher's thread. Integration tests use a real mosquitto instead.
"""

from __future__ import annotations

import logging
from collections import Counter

from paho.mqtt.client import topic_matches_sub

from edvit.mqtt import Handler, deliver
from edvit.schemas import StatusMsg


class MemoryBroker:
    def __init__(self) -> None:
        self.clients: list[MemoryTransport] = []
        self.retained: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes]] = []  # every publish, in order

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.log.append((topic, payload))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for client in list(self.clients):
            client.receive(topic, payload)

    def messages(self, topic_filter: str) -> list[bytes]:
        return [p for t, p in self.log if topic_matches_sub(topic_filter, t)]


class MemoryTransport:
    """Implements edvit.mqtt.Transport over a MemoryBroker."""

    def __init__(self, broker: MemoryBroker, name: str = "memory") -> None:
        self.broker = broker
        self.counters: Counter[str] = Counter()
        self.routes: dict[str, list[Handler]] = {}
        self.statuses: list[StatusMsg] = []
        self.mirrored: str | None = None
        self.log = logging.getLogger(f"memory.{name}")
        self.connected = True  # a test sets False to model a lost broker
        self.connection_epoch = 1  # a test adds 1 to model a reconnect
        broker.clients.append(self)

    def route(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        self.routes.setdefault(topic_filter, []).append(handler)
        for topic, payload in list(self.broker.retained.items()):
            if topic_matches_sub(topic_filter, topic):
                deliver([handler], topic, payload, self.counters, self.log)

    def unroute(self, topic_filter: str, handler: Handler | None = None) -> None:
        kept = [
            h for h in self.routes.get(topic_filter, []) if handler is not None and h != handler
        ]
        if kept:
            self.routes[topic_filter] = kept
        else:
            self.routes.pop(topic_filter, None)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False):
        data = payload.encode() if isinstance(payload, str) else payload
        self.broker.publish(topic, data, retain)
        self.counters["messages_out"] += 1

    def publish_now(
        self, topic: str, payload: bytes | str, *, retain: bool = False, epoch: int | None = None
    ) -> bool:
        if not self.connected or (epoch is not None and epoch != self.connection_epoch):
            return False
        self.publish(topic, payload, 0, retain)
        return True

    def subscribed(self, topic_filter: str) -> bool:
        return self.connected and topic_filter in self.routes

    def reconnect(self) -> None:
        """A new connection: subscribed again, the broker sends what it retains again."""
        self.connected, self.connection_epoch = True, self.connection_epoch + 1
        for topic, payload in list(self.broker.retained.items()):
            self.receive(topic, payload)

    def receive(self, topic: str, payload: bytes) -> None:
        for topic_filter, handlers in list(self.routes.items()):
            if topic_matches_sub(topic_filter, topic):
                deliver(list(handlers), topic, payload, self.counters, self.log)

    def set_status(self, status: StatusMsg) -> None:
        self.statuses.append(status)

    @property
    def shared_subscriptions(self) -> bool:
        return False  # every client gets every message, like a broker without `$share`

    def mirror_status(self, topic: str | None) -> None:
        self.mirrored = topic

    def start(self, wait: float | None = 10.0, required: bool = False) -> bool:
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self.broker.clients.remove(self)
