"""Shared fixtures: real brokers on free ports (never 1883), a probe to observe them and the
bundles the fleet tests build; and the test tiers.

Tiers. Every test gets the markers of what it starts or builds:

- `broker`: a real broker (mosquitto, amqtt, NATS);
- `fleet`: processes (edvit services, fleets, the edvit command itself);
- `slow`: model builds and long runs;
- `unit`: none of these (`make test-fast` runs them: `pytest -m unit`).

A fixture declares what it starts with `helpers.tier` (under `@pytest.fixture`), and every
test that uses it, directly or through other fixtures, is marked here at collection. A
test that starts something itself carries the marker (`@pytest.mark.fleet`, a module's
`pytestmark`). A test left in the `unit` tier that starts a process anyway (subprocess,
fork, multiprocessing: a broker, a service, the CLI) fails, naming what it started.
"""

from __future__ import annotations

import multiprocessing.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edvit.broker.local import LocalBroker, mosquitto_path
from helpers import TIER_ATTRIBUTE, MqttProbe, tier
from nats_cluster import NatsCluster, nats_server_path

__all__ = ["MqttProbe"]

HEAVY_TIERS = ("broker", "fleet", "slow")


# -- tiers -----------------------------------------------------------------------------------
def _fixture_tiers(item: pytest.Item) -> set[str]:
    """The tiers declared (helpers.tier) by every fixture the test uses, directly or not."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        name
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
        for name in getattr(definition.func, TIER_ATTRIBUTE, ())
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        declared = _fixture_tiers(item)
        unknown = declared - set(HEAVY_TIERS)
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown tier {sorted(unknown)} in a fixture")
        marked = {m.name for m in item.iter_markers()}
        heavy = (declared | marked) & set(HEAVY_TIERS)
        if "unit" in marked and heavy:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but uses {sorted(heavy)}")
        for name in sorted(declared - marked):
            item.add_marker(name)
        if not heavy and "unit" not in marked:
            item.add_marker("unit")


# Programs libraries run on their own, not what a test sets out to start: matplotlib lists
# the system's fonts with fc-list the first time it draws text.
INCIDENTAL_PROGRAMS = ("fc-list",)


class _ProcessStarts:
    """Records every process started in this interpreter while installed: subprocess (and
    what runs on it: the CLI, brokers, LocalFleet), os.fork, posix_spawn, multiprocessing."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        def execute_child(popen: subprocess.Popen, args: Any, *rest: Any) -> None:
            program = args if isinstance(args, str | bytes | os.PathLike) else args[0]
            if os.path.basename(os.fsdecode(program)) not in INCIDENTAL_PROGRAMS:
                self.started.append(f"subprocess {args!r}"[:200])
            original_execute_child(popen, args, *rest)

        original_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        self._wrap(subprocess.Popen, "_execute_child", execute_child)
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                self._wrap(os, name, self._recording(f"os.{name}", getattr(os, name)))
        spawnv = self._recording("multiprocessing", multiprocessing.util.spawnv_passfds)
        self._wrap(multiprocessing.util, "spawnv_passfds", spawnv)

    def _recording(self, what: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.started.append(what)
            return function(*args, **kwargs)

        return recorded

    def _wrap(self, owner: Any, name: str, replacement: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


_STARTS = pytest.StashKey[_ProcessStarts]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A test in the unit tier must start no process, in its fixtures (module and session
    ones it sets up included) or in its body: watch from its setup to its teardown."""
    if item.get_closest_marker("unit") is not None:
        starts = _ProcessStarts()
        item.stash[_STARTS] = starts
        starts.install()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        result = yield
    finally:
        starts = item.stash.get(_STARTS, None)
        if starts is not None:
            starts.uninstall()
    if starts is not None and starts.started:
        pytest.fail(
            f"{item.nodeid} is in the unit tier but started a process: "
            f"{'; '.join(starts.started[:3])}. Use a fixture that declares it (helpers.tier) "
            "or mark the test (@pytest.mark.fleet, broker or slow).",
            pytrace=False,
        )
    return result


def _session_broker(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    log_path = tmp_path_factory.mktemp(f"{kind}-broker") / "broker.log"
    broker = LocalBroker(kind=kind, log_path=log_path)  # type: ignore[arg-type]
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
@tier("broker")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A mosquitto child process on a free port for the whole session (skipped if absent)."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    yield from _session_broker("mosquitto", tmp_path_factory)


@pytest.fixture(scope="session")
@tier("broker")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """An amqtt child process on a free port for the whole session."""
    yield from _session_broker("embedded", tmp_path_factory)


@pytest.fixture(params=["mosquitto", "embedded"])
@tier("broker")
def broker(request: pytest.FixtureRequest) -> LocalBroker:
    """Each test using this runs once per broker kind; the broker is up when the test starts."""
    local: LocalBroker = request.getfixturevalue(f"{request.param}_broker")
    if not local.running:
        # A previous test killed it and failed before restarting it.
        local.start()
    return local


@pytest.fixture
@tier("broker")
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
@tier("slow")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_digits_bundle(tmp_path_factory.mktemp("fleet-bundle") / "digits-3")


@pytest.fixture(scope="session")
@tier("slow")
def sliced_digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with a 1-block stem shared by every sub-model (`--shared-blocks 1`)."""
    out = tmp_path_factory.mktemp("sliced-bundle") / "digits-3-k1"
    return _build_digits_bundle(out, "--shared-blocks", "1")
