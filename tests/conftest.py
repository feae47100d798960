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

import fcntl
import multiprocessing.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.broker.nats_cluster import NatsCluster, nats_server_path
from helpers import TIER_ATTRIBUTE, MqttProbe, tier

__all__ = ["MqttProbe"]

HEAVY_TIERS = ("broker", "fleet", "slow")
# Threads of the session itself (BundleBuilds), whose processes belong to no test.
BACKGROUND_THREADS: set[int] = set()


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
    # Whole modules, in this order: unit tests only (their failures show first), the others,
    # then those that need the session's bundles, which BundleBuilds builds meanwhile.
    rank: dict[Path, int] = {}
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "sliced_digits_bundle" in names:
            kind = 3
        elif "digits_bundle" in names:
            kind = 2
        else:
            kind = 0 if item.get_closest_marker("unit") is not None else 1
        rank[item.path] = max(rank.get(item.path, 0), kind)
    items.sort(key=lambda item: rank[item.path])


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
                self._record(f"subprocess {args!r}"[:200])
            original_execute_child(popen, args, *rest)

        original_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
        self._wrap(subprocess.Popen, "_execute_child", execute_child)
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                self._wrap(os, name, self._recording(f"os.{name}", getattr(os, name)))
        spawnv = self._recording("multiprocessing", multiprocessing.util.spawnv_passfds)
        self._wrap(multiprocessing.util, "spawnv_passfds", spawnv)

    def _record(self, what: str) -> None:
        if threading.get_ident() not in BACKGROUND_THREADS:
            self.started.append(what)

    def _recording(self, what: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._record(what)
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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Torch on one intra-op thread in this process (the builds the tests run pass --threads 1
    for the same reason). The tests' models are tiny: a second thread gains nothing on them,
    and while the fleet processes and the background builds share the cores every operation
    waits for the thread that is off its core (a tiny build took 345 s on 2 threads beside
    other work, 40 s on 1, with the same weights)."""
    torch = sys.modules.get("torch")  # imported by the test modules that use it
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _own_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The services the tests start keep their state (the newest signed plan, edvit/replay.py)
    under the session's own folder, not the user's ~/.local/state, so that no run sees what
    another left there."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


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


# -- the digits bundles the fleet tests share ------------------------------------------------
# Tiny settings through the real `edvit build`, on one thread: the build runs beside the
# tests (BundleBuilds) and leaves them the other core.
DIGITS_BUILD = (
    "--dataset", "digits", "--num-devices", "3", "--size", "test", "--epochs", "15",
    "--sub-epochs", "3", "--recover-epochs", "4", "--fusion-epochs", "20", "--batch-size", "64",
    "--threads", "1",
)  # fmt: skip
ORIGINAL_WEIGHTS = "original.pt"  # models/build.py saves the original's weights under it
BUILD_TIMEOUT_S = 600.0
BUILD_NICENESS = 10
BUNDLE_FIXTURES = ("digits_bundle", "sliced_digits_bundle")


class BundleBuilds:
    """The digits bundle, then the sliced one (`--shared-blocks 1`, from the digits bundle's
    trained original), each built once per session by `edvit build` in a process of its own,
    one after the other on a background thread. Started as soon as the tests are collected
    when one of them needs a bundle, so that the build overlaps the tests that run first
    (pytest_collection_modifyitems orders the modules that need a bundle last)."""

    def __init__(self, root: Path, sliced: bool, owner: bool = True) -> None:
        self.root, self.sliced, self.owner = root, sliced, owner
        self.paths: dict[str, Path] = {}
        self.errors: dict[str, str] = {}
        self._done = {fixture: threading.Event() for fixture in BUNDLE_FIXTURES}
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._running = False  # a thread is on its way to building what is wanted
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bundle-builds", daemon=True)

    def start(self) -> BundleBuilds:
        with self._lock:
            self._running = True
            self._thread.start()
        return self

    def want_sliced(self) -> None:
        """Build the sliced bundle too: after the digits one, or now if that is done."""
        with self._lock:
            if self.sliced:
                return
            self.sliced = True
            if self._running:
                return  # _run sees it once the digits bundle is built
            self._running = True
            self._thread = threading.Thread(target=self._run, name="bundle-builds", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        BACKGROUND_THREADS.add(threading.get_ident())
        try:
            if not self._done["digits_bundle"].is_set():
                self._build("digits_bundle", "digits-3")
            with self._lock:
                build_sliced = self.sliced and not self._done["sliced_digits_bundle"].is_set()
                self._running = build_sliced  # from here on want_sliced starts a thread
            if build_sliced:
                extra: tuple[str, ...] = ("--shared-blocks", "1")
                digits = self.paths.get("digits_bundle")
                if digits is not None:  # else the sliced build trains an original of its own
                    extra += ("--checkpoint", str(digits / ORIGINAL_WEIGHTS))
                self._build("sliced_digits_bundle", "digits-3-k1", *extra)
                with self._lock:
                    self._running = False
        finally:
            BACKGROUND_THREADS.discard(threading.get_ident())

    def _build(self, fixture: str, name: str, *extra: str) -> None:
        out, log_path = self.root / name, self.root / f"{name}.log"
        command = [sys.executable, "-m", "edvit", "build", *DIGITS_BUILD, "--out", str(out), *extra]
        built = self.root / f"{name}.built"
        try:
            # Parallel workers share the root: the first to get here builds, the rest wait.
            with (self.root / f"{name}.lock").open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                code = 0 if built.exists() else self._run_build(command, log_path)
                if code == 0:
                    built.touch()
            if code == 0:
                self.paths[fixture] = out
            elif self._stopping.is_set():
                self.errors[fixture] = "the session ended before the build did"
            else:
                why = f"exited {code}" if code is not None else f"ran over {BUILD_TIMEOUT_S:.0f} s"
                tail = log_path.read_text()[-3000:]
                self.errors[fixture] = f"{' '.join(command)} {why}:\n{tail}"
        except Exception as exc:
            self.errors[fixture] = f"{' '.join(command)} could not run: {exc!r}"
        finally:
            self._done[fixture].set()

    def _run_build(self, command: list[str], log_path: Path) -> int | None:
        """The build's exit code; None when it ran over its time (it is killed) or the
        session ended first."""
        with log_path.open("w") as log, self._lock:
            if self._stopping.is_set():
                return None
            # At a lower priority: the fleets of the tests that run meanwhile keep the CPU
            # they need to answer every frame in time.
            process = self._process = subprocess.Popen(
                ["nice", "-n", str(BUILD_NICENESS), *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            return process.wait(BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None

    def get(self, fixture: str) -> Path:
        """The bundle's folder, once built; the build's error and log tail otherwise."""
        if fixture == "sliced_digits_bundle":
            self.want_sliced()
        self._done[fixture].wait()
        if fixture in self.errors:
            pytest.fail(self.errors[fixture], pytrace=False)
        return self.paths[fixture]

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
        self._thread.join()
        if self.owner:
            shutil.rmtree(self.root, ignore_errors=True)


BUILDS = pytest.StashKey[BundleBuilds]()
SHARED_ROOT = pytest.StashKey[Path]()


def _bundle_builds(config: pytest.Config, sliced: bool = False) -> BundleBuilds:
    """The session's builds: started at collection (pytest_collection_finish), or by the first
    fixture that asks for a bundle."""
    builds = config.stash.get(BUILDS, None)
    if builds is None:
        shared = getattr(config, "workerinput", {}).get(SHARED_BUNDLES)
        root = Path(shared) if shared else Path(tempfile.mkdtemp(prefix="edvit-test-bundles-"))
        builds = config.stash[BUILDS] = BundleBuilds(root, sliced, owner=not shared).start()
    return builds


# Under pytest-xdist (`make test` runs `pytest -n 2`) the workers share one folder of
# bundles, made and removed by the controller; the first worker to need a bundle builds it.
SHARED_BUNDLES = "edvit_bundles"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    config = node.config
    if SHARED_ROOT not in config.stash:
        config.stash[SHARED_ROOT] = Path(tempfile.mkdtemp(prefix="edvit-test-bundles-"))
    node.workerinput[SHARED_BUNDLES] = str(config.stash[SHARED_ROOT])


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(SHARED_ROOT, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    wanted = {f for item in session.items for f in getattr(item, "fixturenames", ())}
    if wanted & set(BUNDLE_FIXTURES):
        _bundle_builds(session.config, sliced="sliced_digits_bundle" in wanted)


def pytest_sessionfinish(session: pytest.Session) -> None:
    builds = session.config.stash.get(BUILDS, None)
    if builds is not None:
        builds.stop()


@pytest.fixture(scope="session")
@tier("slow")
def digits_bundle(request: pytest.FixtureRequest) -> Path:
    """A 3-sub-model digits bundle made by the real `edvit build` command (tiny settings)."""
    return _bundle_builds(request.config).get("digits_bundle")


@pytest.fixture(scope="session")
@tier("slow")
def sliced_digits_bundle(request: pytest.FixtureRequest) -> Path:
    """The same with a 1-block stem shared by every sub-model (`--shared-blocks 1`)."""
    return _bundle_builds(request.config).get("sliced_digits_bundle")
