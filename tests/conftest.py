"""Shared fixtures: real brokers on free ports (never 1883) and a probe to observe them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.broker.nats_cluster import NatsCluster, nats_server_path
from helpers import MqttProbe

__all__ = ["MqttProbe"]


def _session_broker(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    log_path = tmp_path_factory.mktemp(f"{kind}-broker") / "broker.log"
    broker = LocalBroker(kind=kind, log_path=log_path)  # type: ignore[arg-type]
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A mosquitto child process on a free port for the whole session (skipped if absent)."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    yield from _session_broker("mosquitto", tmp_path_factory)


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """An amqtt child process on a free port for the whole session."""
    yield from _session_broker("embedded", tmp_path_factory)


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> LocalBroker:
    """Each test using this runs once per broker kind; the broker is up when the test starts."""
    local: LocalBroker = request.getfixturevalue(f"{request.param}_broker")
    if not local.running:
        # A previous test killed it and failed before restarting it.
        local.start()
    return local


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS servers routed into one cluster, MQTT on each (tests/nats_cluster.py);
    one per test, since a test may kill a node. Skipped without a recent nats-server."""
    binary, why_not = nats_server_path()
    if binary is None:
        pytest.skip(why_not)
    cluster = NatsCluster(binary, tmp_path / "nats")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def mqtt_probe(broker: LocalBroker) -> Iterator[Callable[[str], MqttProbe]]:
    """A factory: `mqtt_probe("edvit/#")` returns a started probe, stopped after the test."""
    probes: list[MqttProbe] = []

    def make(topic_filter: str = "#") -> MqttProbe:
        probe = MqttProbe(broker.host, broker.port, topic_filter).start()
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.stop()


def _build_digits_bundle(out: Path, *extra: str) -> Path:
    """A 3-sub-model digits bundle made by the real `edvit build` command (tiny settings)."""
    command = [
        sys.executable, "-m", "edvit", "build", "--dataset", "digits", "--num-devices", "3",
        "--out", str(out), "--size", "test", "--epochs", "15", "--sub-epochs", "3",
        "--fusion-epochs", "20",
        *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_digits_bundle(tmp_path_factory.mktemp("fleet-bundle") / "digits-3")


@pytest.fixture(scope="session")
def sliced_digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with a 1-block stem shared by every sub-model (`--shared-blocks 1`)."""
    out = tmp_path_factory.mktemp("sliced-bundle") / "digits-3-k1"
    return _build_digits_bundle(out, "--shared-blocks", "1")
