"""Emulated boards (`edvit fleet up|status|down`, fleet/boards/boards.py): BOARDS.yaml and the
presets, and, where this machine allows it (root, namespaces, cgroups, tc, mosquitto), a
real fleet of shaped boards serving a camera."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.errors import ConfigError, EdvitError
from edvit.fleet.bench.boards import check_cores, parse_pipelines, plan_runs
from edvit.fleet.bench.common import camera_message, frame_samples
from edvit.fleet.boards import boards, emulation
from edvit.fleet.boards.boards import (
    PRESETS,
    BoardOutOfMemory,
    board_spec,
    load_fleet,
    parse_fleet,
)
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.mqtt import MqttClient, unique_client_id
from edvit.process import cpu_seconds
from edvit.topics import Topics

# -- BOARDS.yaml ----------------------------------------------------------------------------


def test_presets_and_custom_boards_parse() -> None:
    fleet = parse_fleet({
        "broker": {"host": "127.0.0.1", "port": 1884},
        "boards": [
            {"id": "node-0", "preset": "rpi4"},
            {"id": "node-1", "cpu": 0.3, "memory_mb": 512, "rate_mbit": 20, "delay_ms": 3},
            {"id": "node-2", "preset": "rpi-zero2", "delay_ms": 10},
        ],
    })  # fmt: skip
    rpi4, custom, zero = fleet.boards
    assert (rpi4.cpu, rpi4.memory_mb, rpi4.preset) == (PRESETS["rpi4"].cpu, 2048, "rpi4")
    assert (custom.cpu, custom.memory_mb, custom.rate_mbit, custom.delay_ms) == (0.3, 512, 20, 3)
    assert zero.delay_ms == 10 and zero.rate_mbit == PRESETS["rpi-zero2"].rate_mbit
    assert (fleet.broker_port, fleet.prefix) == (1884, "edvit")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a mapping with a `boards` list"),
        ({"boards": []}, "non-empty list"),
        ({"boards": [{"id": "node-0", "preset": "rpi9"}]}, "unknown preset 'rpi9'"),
        ({"boards": [{"id": "node-0", "cpu": 0.5}]}, "needs a preset or memory_mb"),
        ({"boards": [{"preset": "rpi4"}]}, "every board needs an id"),
        ({"boards": [{"id": "a/b", "preset": "rpi4"}]}, "boards[0]"),
        ({"boards": [{"id": "n", "preset": "rpi4", "cpu": 0}]}, "cpu must be in (0"),
        ({"boards": [{"id": "n", "preset": "rpi4", "cpu": "fast"}]}, "cpu must be a number"),
        ({"boards": [{"id": "n", "preset": "rpi4", "delay_ms": -1}]}, "delay_ms must be in [0"),
        ({"boards": [{"id": "n", "preset": "rpi4", "memory_mb": 1.5}]}, "memory_mb must be"),
        ({"boards": [{"id": "n", "preset": "rpi4", "ram": 1}]}, "unknown keys ['ram']"),
        ({"boards": [{"id": "n", "preset": "rpi4"}] * 2}, "ids must be unique"),
        ({"boards": [{"id": "n", "preset": "rpi4"}], "broker": {"port": 0}}, "port 1-65535"),
        ({"boards": [{"id": "n", "preset": "rpi4"}], "brokers": {}}, "unknown keys"),
    ],
)
def test_bad_boards_yaml_is_one_clear_error(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_fleet(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.fleet
def test_a_file_that_is_not_yaml_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "boards.yaml"
    bad.write_text("boards: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_fleet(bad)
    result = subprocess.run(
        [sys.executable, "-m", "edvit", "fleet", "up", str(tmp_path / "none.yaml"),
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().startswith("edvit fleet: error: cannot read")


def test_without_the_kernel_features_it_says_so_and_offers_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulation, "missing_features", lambda: ["root"])
    fleet = parse_fleet({"boards": [{"id": "node-0", "preset": "rpi4"}]})
    with pytest.raises(EdvitError) as caught:
        boards.up(fleet, tmp_path)
    assert "need root" in str(caught.value) and "`edvit demo`" in str(caught.value)


# -- a real fleet ---------------------------------------------------------------------------

FRAMES = 20


def _edvit(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edvit", *args], capture_output=True, text=True, timeout=90,
        env=env,
    )  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    missing = emulation.missing_features()
    if missing:
        pytest.skip(f"emulated boards need {', '.join(missing)}")
    if mosquitto_path() is None:
        pytest.skip("needs mosquitto")
    folder = tmp_path / "fleet"
    yield folder
    boards.down(folder)  # whatever the test did: no namespace, cgroup or process is left


def _burst(broker_url: str, topics: Topics, seconds: float) -> None:
    """Frames as fast as one client publishes them, for `seconds`."""
    samples = frame_samples(load_dataset("fashion-mnist", "test"))
    client = MqttClient(unique_client_id("test-burst"), broker_url)
    client.start(required=True)
    try:
        deadline, seq = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            client.publish(*camera_message(samples[seq % len(samples)], "burst", seq, topics))
            seq += 1
            time.sleep(0.001)
    finally:
        client.stop()


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.fleet
def test_fleet_up_serves_through_shaped_boards_and_down_leaves_nothing(
    run_dir: Path, tmp_path: Path
) -> None:
    topics = Topics("boards-test")
    with LocalBroker(kind="mosquitto") as broker:
        spec = tmp_path / "boards.yaml"
        spec.write_text(
            f"broker: {{host: {broker.host}, port: {broker.port}}}\n"
            f"prefix: {topics.prefix}\n"
            "boards:\n"
            "  - {id: node-0, cpu: 1.0, memory_mb: 1024, rate_mbit: 100, delay_ms: 0}\n"
            "  - {id: node-1, preset: rpi4}\n"
            "  - {id: node-2, cpu: 0.1, memory_mb: 512, rate_mbit: 20, delay_ms: 3}\n"
        )
        up = _edvit("fleet", "up", str(spec), "--run-dir", str(run_dir))
        assert up.returncode == 0, up.stderr
        state = boards.load_state(run_dir)
        assert state is not None
        status = _edvit("fleet", "status", "--json", "--run-dir", str(run_dir))
        rows = json.loads(status.stdout)
        assert [r["id"] for r in rows] == ["node-0", "node-1", "node-2"]
        assert all(r["node_alive"] and r["proxy_alive"] and r["netns"] for r in rows)

        plan = deploy(Bundle.load(DEFAULT_BUNDLE), broker.url, topics=topics)
        stream = PredictionStream(broker.url, topics=topics)
        stream.start()
        with LocalFleet(broker.url, tmp_path / "logs", topics) as fleet:
            fleet.spawn("aggregator", "aggregator")

            def check() -> None:
                for board in state.boards:
                    boards.check_board(board)

            fleet.wait_ready(plan, timeout=60, check=check)
            fleet.spawn(
                "camera", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
                "--fps", "10", "--count", str(FRAMES),
            )  # fmt: skip
            seqs: set[int] = set()
            deadline = time.monotonic() + 30
            while len(seqs) < FRAMES and time.monotonic() < deadline:
                try:
                    prediction = stream.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                assert not prediction.degraded, prediction
                seqs.add(prediction.seq)
            stream.stop()
            assert seqs == set(range(FRAMES))
            # A burst: the board with a tenth of a core is held to it (a single frame is
            # shorter than its 10 ms slice, so the quota shows under load, not per frame).
            before = {r["id"]: r for r in boards.status(run_dir)}
            started = time.monotonic()
            _burst(broker.url, topics, seconds=2.0)
            after = {r["id"]: r for r in boards.status(run_dir)}
            elapsed = time.monotonic() - started
        used = {b: (after[b]["cpu_s"] - before[b]["cpu_s"]) / elapsed for b in before}
        assert after["node-2"]["throttled"] > before["node-2"]["throttled"], after
        assert used["node-2"] < 0.2, used

        down = _edvit("fleet", "down", "--run-dir", str(run_dir))
        assert down.returncode == 0, down.stderr
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for board in state.boards:
            assert board.link.netns not in netns
            assert not any(Path(f).exists() for f in board.cgroups)
            assert not boards.alive(board.node_pid) and not boards.alive(board.proxy_pid)
        assert boards.load_state(run_dir) is None


# -- a failed or killed `up` ----------------------------------------------------------------


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> str:
    """A token and a cgroup parent of this test's own (other fleets on this machine share
    `edvit-boards`, and would keep it): the test can tell what is left of its own boards."""
    token = uuid.uuid4().hex[:4]
    monkeypatch.setattr(boards.secrets, "token_hex", lambda _n: token)
    monkeypatch.setattr(emulation, "CGROUP_PARENT", f"edvit-boards-test-{token}")
    return token


def _leftovers(token: str, run_dir: Path) -> list[str]:
    """Namespaces and cgroup folders (the parent included) of the fleet `token`, and live
    processes that write to a log in `run_dir` (the nodes and the link proxies)."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = [line.split()[0] for line in netns.splitlines() if f"edvit-{token}-" in line]
    found += [str(p) for p in emulation.CGROUP_ROOT.glob(f"*/{emulation.CGROUP_PARENT}")]
    found += [str(p) for p in emulation.CGROUP_ROOT.glob(emulation.CGROUP_PARENT)]
    for stdout in Path("/proc").glob("[0-9]*/fd/1"):
        with contextlib.suppress(OSError):
            if os.readlink(stdout).startswith(str(run_dir)) and boards.alive(
                int(stdout.parent.parent.name)
            ):
                found.append(f"pid {stdout.parent.parent.name} ({os.readlink(stdout)})")
    return found


ONE_BOARD = {
    "broker": {"host": "127.0.0.1", "port": 1},
    "boards": [{"id": "node-0", "preset": "rpi4"}],
}


@pytest.mark.broker
@pytest.mark.fleet
def test_a_failed_up_leaves_nothing_and_names_the_proxy_log(
    run_dir: Path, isolated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board's link proxy cannot listen (its port is held): `up` says why and names the
    proxy's log, and takes down the link, the cgroup (and the parent it made) and the proxy."""
    blocker = socket.socket()  # bound, not listening, no SO_REUSEADDR: the proxy's bind fails
    blocker.bind(("0.0.0.0", 0))
    port = blocker.getsockname()[1]
    monkeypatch.setattr(boards, "find_free_port", lambda _host="": port)
    try:
        with pytest.raises(EdvitError) as caught:
            boards.up(parse_fleet(ONE_BOARD), run_dir)
    finally:
        blocker.close()
    proxy_log = run_dir / "logs" / "node-0.proxy.log"
    message = str(caught.value)
    assert f"log {proxy_log}" in message and "Address already in use" in message, message
    assert "Traceback" in proxy_log.read_text()
    assert _leftovers(isolated, run_dir) == []
    assert boards.load_state(run_dir) is None


class Killed(BaseException):
    """`up` stopped where nothing of its own cleans up (SIGKILL, a power cut)."""


@pytest.mark.broker
@pytest.mark.fleet
def test_down_sweeps_what_a_killed_up_left(
    run_dir: Path, isolated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up` killed after it started the node and the proxy, before it wrote their pids:
    `down` finds them (the namespace, the cgroup, the proxy's address) and takes everything
    down, the cgroup parent included; a second `down` finds nothing."""
    real_down = boards.down

    def killed(*_args: object) -> None:
        raise Killed

    monkeypatch.setattr(boards, "_wait_listening", killed)
    monkeypatch.setattr(boards, "down", lambda *_a: [])  # killed: no cleanup of its own
    with pytest.raises(Killed):
        boards.up(parse_fleet(ONE_BOARD), run_dir)
    data = json.loads(boards.state_path(run_dir).read_text())
    (board,) = data["boards"]
    pids = (board["node_pid"], board["proxy_pid"])
    assert all(boards.alive(pid) for pid in pids)
    board["node_pid"] = board["proxy_pid"] = None
    boards.state_path(run_dir).write_text(json.dumps(data))
    assert _leftovers(isolated, run_dir) != []
    assert real_down(run_dir) == ["node-0"]
    assert not any(boards.alive(pid) for pid in pids)
    assert _leftovers(isolated, run_dir) == []
    assert real_down(run_dir) == []


# -- `edvit bench boards` -------------------------------------------------------------------


def test_a_board_killed_by_its_memory_limit_is_an_error_naming_it() -> None:
    error = BoardOutOfMemory("node-3", 512)
    assert isinstance(error, EdvitError)
    assert (error.board_id, error.memory_mb) == ("node-3", 512)
    assert str(error) == "node-3: the node was killed by the board's 512 MB limit"


def test_bench_boards_runs_whole_once_then_split_and_replicas_per_bundle() -> None:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    runs = plan_runs([bundle, bundle], ("whole", "split", "replicas"))
    assert [(r.pipeline, len(r.nodes)) for r in runs] == [
        ("whole", 1), ("split", 3), ("replicas", 3), ("split", 3), ("replicas", 3)
    ]  # fmt: skip
    assert runs[2].nodes == ("node-0", "node-0-r1", "node-0-r2") and runs[2].replicas == 3
    assert parse_pipelines("split, replicas") == ("split", "replicas")
    with pytest.raises(ConfigError, match="choose from whole,split,replicas"):
        parse_pipelines("whole,sharded")


def test_bench_boards_refuses_more_quota_than_the_machine_has_in_one_line() -> None:
    runs = plan_runs([Bundle.load(DEFAULT_BUNDLE)], ("whole", "split"))
    rpi4 = board_spec({"id": "node-0", "preset": "rpi4"}, "test")
    check_cores(runs, rpi4, cores=1)  # 3 x 0.29 fits one core
    heavy = board_spec({"id": "node-0", "preset": "rpi4", "cpu": 0.9}, "test")
    with pytest.raises(ConfigError) as caught:
        check_cores(runs, heavy, cores=2)
    message = str(caught.value)
    assert "\n" not in message
    assert "3 boards x 0.9 core = 2.7 cores of quota, over this machine's 2" in message
    assert "at most 2 boards" in message


def _bench_boards(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "boards.json"
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "boards", "--seconds", "2",
         "--json", str(out), *args],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture
def boards_machine() -> None:
    missing = emulation.missing_features()
    if missing:
        pytest.skip(f"emulated boards need {', '.join(missing)}")
    if mosquitto_path() is None:
        pytest.skip("needs mosquitto")
    pytest.importorskip("onnx", reason="the whole model's bundle is made with onnx")


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.fleet
def test_bench_boards_replicas_share_the_frames_of_the_whole_model(
    boards_machine: None, tmp_path: Path
) -> None:
    report = _bench_boards(tmp_path, "--pipelines", "replicas")
    (row,) = report["runs"]
    assert (row["pipeline"], row["boards"], row["fits"]) == ("replicas", 3, True), row
    assert [b["id"] for b in row["per_board"]] == ["node-0", "node-0-r1", "node-0-r2"]
    # Every replica serves the whole model (the same file) and takes a share of the frames.
    assert len({b["model_mb"] for b in row["per_board"]}) == 1
    assert all(b["cpu_cores"] > 0 and not b["oom_killed"] for b in row["per_board"]), row
    assert row["answered"] == row["sent"] > 0 and row["served_fps"] > 0


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.fleet
def test_bench_boards_reports_a_board_its_memory_limit_kills_and_goes_on(
    boards_machine: None, tmp_path: Path
) -> None:
    report = _bench_boards(tmp_path, "--pipelines", "whole,split", "--memory-mb", "40")
    rows = {r["pipeline"]: r for r in report["runs"]}
    for pipeline in ("whole", "split"):
        row = rows[pipeline]
        assert not row["fits"] and row["oom_killed"], row
        assert "killed by the board's 40 MB limit" in row["note"]
        assert row["served_fps"] == 0


@pytest.mark.fleet
def test_a_model_file_loads_alone_under_a_boards_limits_or_says_why_not(
    boards_machine: None, tmp_path: Path
) -> None:
    bundle = Bundle.load(DEFAULT_BUNDLE)
    model = bundle.path(bundle.manifest.submodels[0].file)
    rpi4 = board_spec({"id": "probe", "preset": "rpi4"}, "test")
    probe = boards.load_on_board(rpi4, model, timeout=60)
    assert probe.loaded and not probe.oom_killed, probe
    assert probe.cgroup_peak_mb is not None and probe.cgroup_peak_mb > 0
    assert probe.frame_ms is not None and probe.frame_ms > 0
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.read_bytes()[:1000])
    probe = boards.load_on_board(rpi4, broken, timeout=60)
    assert not probe.loaded and not probe.oom_killed and probe.frame_ms is None, probe
    assert "ONNX Runtime cannot load the model" in probe.detail


@pytest.mark.fleet
def test_a_board_gets_its_cpu_quota_while_the_host_is_busy(boards_machine: None) -> None:
    """The boards' cgroups outweigh the host's other processes: a board held to half a core
    gets about half a core while four processes outside keep both of the host's cores busy
    (at the default weight the boards' group had one process's share)."""
    version = emulation.cgroup_version()
    assert version is not None
    name = f"test-{os.getpid()}"
    folders = emulation.cgroup_dirs(version, name)
    emulation.create_cgroup(version, folders, 0.5, 256)
    spin = [sys.executable, "-c", "while True: pass"]
    hogs = [subprocess.Popen(spin) for _ in range(2 * (os.cpu_count() or 1))]

    def enter() -> None:
        emulation.join_cgroup(folders, os.getpid())

    board = subprocess.Popen(spin, preexec_fn=enter)
    try:
        time.sleep(1.0)
        before, started = cpu_seconds(board.pid), time.monotonic()
        time.sleep(3.0)
        used = (cpu_seconds(board.pid) or 0.0) - (before or 0.0)
        cores = used / (time.monotonic() - started)
    finally:
        for process in (board, *hogs):
            process.kill()
            process.wait()
        emulation.delete_cgroup(folders)
        for parent in {f.parent for f in folders}:
            with contextlib.suppress(OSError):  # another fleet's boards may still be in it
                parent.rmdir()
    assert 0.35 < cores < 0.6, cores
