"""Test helpers that observe a broker from the outside, with plain paho and no sleeps."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edvit.schemas import PlanMsg, Preprocessing, SubmodelRef, plan_id_for

if TYPE_CHECKING:
    from edvit.fleet.ops.local import LocalFleet

DEFAULT_TIMEOUT = 5.0
TIER_ATTRIBUTE = "edvit_tiers"
F = TypeVar("F", bound=Callable[..., Any])


def tier(*markers: str) -> Callable[[F], F]:
    """What a fixture starts or builds, as tier markers ("broker", "fleet", "slow"): every
    test that uses the fixture, directly or through other fixtures, is marked with them
    (tests/conftest.py). Goes under `@pytest.fixture`:

        @pytest.fixture(scope="module")
        @tier("broker")
        def secured_broker(...): ...
    """

    def declare(fixture_function: F) -> F:
        setattr(fixture_function, TIER_ATTRIBUTE, markers)
        return fixture_function

    return declare


class MqttProbe:
    """A paho client that subscribes to `topic_filter` and queues every message it receives.

    Use as a context manager: it is connected and subscribed (SUBACK seen) on entry, so a
    message published after `with` is guaranteed to be observed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic_filter: str = "#",
        qos: int = 1,
        client_id: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_filter = topic_filter
        self.qos = qos
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subscribed: queue.Queue[bool] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> MqttProbe:
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()
        try:
            self._subscribed.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"probe not subscribed to {self.topic_filter!r}") from None
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttProbe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def get(self, timeout: float = DEFAULT_TIMEOUT) -> mqtt.MQTTMessage:
        """The next message; TimeoutError when none arrives in time."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no message on {self.topic_filter!r} within {timeout:g} s"
            ) from None

    def wait_for(
        self,
        predicate: Callable[[mqtt.MQTTMessage], bool],
        timeout: float = DEFAULT_TIMEOUT,
    ) -> mqtt.MQTTMessage:
        """The first message matching `predicate` (others are dropped); TimeoutError if none."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message on {self.topic_filter!r}")
            message = self.get(left)
            if predicate(message):
                return message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        # Subscribe on every connect, so the probe keeps observing across broker restarts.
        if not rc.is_failure:
            client.subscribe(self.topic_filter, self.qos)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any
    ) -> None:
        self._subscribed.put(True)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)


def clear_retained(host: str, port: int, topic: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Delete a retained message (empty retained payload), waiting for the broker's PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def assert_exit_codes(fleet: LocalFleet, killed: Iterable[str] = ()) -> None:
    """Every process of a stopped fleet exited 0 (a clean stop on SIGINT, or done on its own),
    except those the test killed on purpose, which show SIGKILL (-9)."""
    on_purpose = set(killed)
    expected = {name: -9 if name in on_purpose else 0 for name in fleet.processes}
    wrong = "\n".join(
        f"--- {name} exited {code}, expected {expected.get(name)}:\n{fleet.log_tail(name)}"
        for name, code in fleet.exit_codes.items()
        if code != expected.get(name)
    )
    assert fleet.exit_codes == expected, f"{fleet.exit_codes} != {expected}\n{wrong}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s: {what}")
        time.sleep(0.005)


def dataset_pngs(name: str, count: int) -> list[tuple[bytes, int]]:
    """The first `count` test images of a dataset as PNG bytes, with their labels."""
    import cv2

    from edvit.datasets import load_dataset

    data = load_dataset(name, "test")
    out = []
    for i in range(count):
        ok, png = cv2.imencode(".png", data.images[i])
        assert ok
        out.append((png.tobytes(), int(data.labels[i])))
    return out


def small_plan(assignments: dict[str, tuple[str, ...]], submodels: int = 3) -> PlanMsg:
    """A valid plan of `submodels` one-class sub-models (sub0, sub1, ...) with no files
    behind it: enough for whoever only reads plans (the dashboard)."""
    classes = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker")
    refs = tuple(
        SubmodelRef(id=f"sub{i}", classes=(i,), sha256="0" * 64, feature_dim=8)
        for i in range(submodels)
    )
    return PlanMsg(
        plan_id=plan_id_for("b" * 64, assignments), bundle_sha256="b" * 64, classes=classes,
        submodels=refs, assignments=assignments, fusion_sha256="f" * 64,
        preprocessing=Preprocessing(channels=1, height=28, width=28, mean=(0.5,), std=(0.5,)),
    )  # fmt: skip


def collect_predictions(stream: Any, count: int, timeout: float) -> list:
    """Up to `count` predictions from a `PredictionStream`, waiting at most `timeout` s."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(stream.queue.get(timeout=0.2))
        except queue.Empty:
            continue
    return got


def planner_with_ready_nodes(
    plan: PlanMsg, name: str = "planner", **keys: Any
) -> tuple[Any, Any, Any]:
    """A Planner on an in-memory broker (no hold-off, no rate limit, no grace after a
    connection, an offline status acted on at once), started, with `plan` retained and every
    node it names ready: (planner, broker, the planner's transport)."""
    from memory_transport import MemoryBroker, MemoryTransport

    from edvit.aggregator.planner import Planner
    from edvit.schemas import Capacity, StatusMsg, encode
    from edvit.topics import Topics

    broker, topics = MemoryBroker(), Topics()
    client = MemoryTransport(broker, name)
    planner = Planner(
        client, topics, instance="p", hold_off_s=0.0, min_interval_s=0.0,
        reconnect_grace_s=0.0, down_confirm_s=0.0, **keys,
    )  # fmt: skip
    planner.start()
    broker.publish(topics.plan(), encode(plan), retain=True)
    for node in plan.assignments:
        status = StatusMsg(state="ready", capacity=Capacity(memory_mb=512.0))
        broker.publish(topics.node_status(node), encode(status), retain=True)
    return planner, broker, client
