"""`edvit fleet up|down|status`: edge nodes on emulated boards on this machine.

Each board is a node process in its own network namespace, joined to the host (where the
broker runs) by a veth pair in a private /30, with a `tc tbf` rate limit on both ends of
the link, a CPU quota and a memory limit (a cgroup), and a one-way delay each way added by
a user-space proxy in front of the broker (`tc netem` is not in every kernel): the node
talks to `mqtt://HOST_SIDE_IP:PROXY_PORT`, the proxy forwards to the broker. emulation.py
makes the kernel parts.

BOARDS.yaml::

    broker: {host: 127.0.0.1, port: 1883}   # optional; the broker the proxies forward to
    prefix: edvit                            # optional topic prefix
    boards:
      - {id: node-0, preset: rpi4}
      - {id: node-1, cpu: 0.3, memory_mb: 512, rate_mbit: 20, delay_ms: 3}
      - {id: node-2, preset: rpi-zero2, delay_ms: 10}   # a preset with an override

`up` writes what it made to RUN_DIR/state.json (pids, namespaces, cgroups), so `status` and
`down` work from another shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edvit.broker.local import find_free_port, wait_for_port
from edvit.errors import ConfigError, EdvitError
from edvit.fleet.boards import emulation
from edvit.fleet.boards.emulation import Link
from edvit.process import cpu_seconds, edvit_command, rss_mb
from edvit.topics import Topics, validate_id

DEFAULT_RUN_DIR = Path("/tmp/edvit-fleet")
SUBNET_PREFIX = "10.213"  # boards get 10.213.X.4i/30, X the first block no interface uses
MAX_BOARDS = 64  # /30s in one /24
STOP_GRACE_S = 5.0


class BoardOutOfMemory(EdvitError):
    """A board's memory limit killed its node: what it serves does not fit the board."""

    def __init__(self, board_id: str, memory_mb: int) -> None:
        super().__init__(f"{board_id}: the node was killed by the board's {memory_mb} MB limit")
        self.board_id = board_id
        self.memory_mb = memory_mb


@dataclass(frozen=True)
class Preset:
    """A real board, emulated. `cpu`: its one core's speed as a share of one core of the
    machine running the emulation (a node serves on one thread, so one core is what counts)."""

    cpu: float
    memory_mb: int
    rate_mbit: float
    delay_ms: float  # added one way, each direction
    about: str


# CPU shares: a board's single-thread `sysbench cpu --threads=1 run` (primes to 10,000) over
# this machine's. Published for the boards (leoncode.co.uk, "Raspberry Pi CPU Benchmarks",
# sysbench 1.0.20): Pi 4 1,478 events/s, Pi 3 B+ (Cortex-A53 1.4 GHz) 687; measured here
# (AMD EPYC, one core, 2026-11-30): 5,135. Pi 4: 0.29. Pi 3 B and Zero 2 W have the Pi 3 B+'s
# core at 1.2 and 1.0 GHz: 687 scaled by the clock gives 0.115 and 0.096. The Jetson Nano
# (Cortex-A57 1.43 GHz) has no published figure of the same test: 0.20 puts it between the
# Pi 3 and the Pi 4, as their cores are; override `cpu` where you have measured it. sysbench
# counts integer work; that the quota makes ONNX Runtime as much slower is measured in
# README, "Emulated boards".
PRESETS: dict[str, Preset] = {
    "rpi4": Preset(0.29, 2048, 1000.0, 0.5, "Raspberry Pi 4 B 2 GB, gigabit Ethernet"),
    "rpi3": Preset(0.12, 1024, 100.0, 0.5, "Raspberry Pi 3 B, 100 Mbit Ethernet"),
    "rpi-zero2": Preset(0.10, 512, 20.0, 3.0, "Raspberry Pi Zero 2 W, 2.4 GHz Wi-Fi"),
    "jetson-nano": Preset(0.20, 4096, 1000.0, 0.5, "Jetson Nano 4 GB (CPU only), Ethernet"),
}
SHAPE_KEYS = ("cpu", "memory_mb", "rate_mbit", "delay_ms")
BOARD_KEYS = {"id", "preset", *SHAPE_KEYS}


@dataclass(frozen=True)
class BoardSpec:
    id: str
    cpu: float  # cores of this machine
    memory_mb: int
    rate_mbit: float
    delay_ms: float
    preset: str | None = None


@dataclass(frozen=True)
class FleetSpec:
    boards: tuple[BoardSpec, ...]
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    prefix: str = "edvit"


# -- BOARDS.yaml ----------------------------------------------------------------------------


def _number(where: str, key: str, value: object, low: float, high: float | None) -> float:
    """`value` as a number in (low, high], or [0, high] when low is 0 for delays."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    too_low = value < 0 if key == "delay_ms" else value <= low
    if too_low or (high is not None and value > high):
        bounds = f"[0, {high:g}]" if key == "delay_ms" else f"({low:g}, {high or 'inf'}]"
        raise ConfigError(f"{where}: {key} must be in {bounds}, got {value!r}")
    return float(value)


def board_spec(entry: object, where: str) -> BoardSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a board is a mapping with an id, got {entry!r}")
    unknown = set(entry) - BOARD_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {sorted(unknown)}; a board has {sorted(BOARD_KEYS)}"
        )
    board_id = entry.get("id")
    if not isinstance(board_id, str):
        raise ConfigError(f"{where}: every board needs an id (a node id), got {board_id!r}")
    try:
        validate_id("node", board_id)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    where = f"{where} ({board_id})"
    values: dict[str, Any] = {}
    preset = entry.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        values = {key: getattr(PRESETS[preset], key) for key in SHAPE_KEYS}
    values |= {key: entry[key] for key in SHAPE_KEYS if key in entry}
    missing = [key for key in SHAPE_KEYS if key not in values]
    if missing:
        raise ConfigError(f"{where}: needs a preset or {', '.join(missing)}")
    memory = values["memory_mb"]
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 16:
        raise ConfigError(f"{where}: memory_mb must be an integer of at least 16, got {memory!r}")
    return BoardSpec(
        id=board_id,
        cpu=_number(where, "cpu", values["cpu"], 0.0, float(os.cpu_count() or 1)),
        memory_mb=memory,
        rate_mbit=_number(where, "rate_mbit", values["rate_mbit"], 0.0, 100_000.0),
        delay_ms=_number(where, "delay_ms", values["delay_ms"], 0.0, 10_000.0),
        preset=preset,
    )


def parse_fleet(data: object, source: str = "BOARDS.yaml") -> FleetSpec:
    """A FleetSpec from BOARDS.yaml's content; ConfigError naming the first thing wrong."""
    if not isinstance(data, dict) or "boards" not in data:
        raise ConfigError(f"{source}: expected a mapping with a `boards` list")
    unknown = set(data) - {"boards", "broker", "prefix"}
    if unknown:
        raise ConfigError(
            f"{source}: unknown keys {sorted(unknown)}; expected boards, broker, prefix"
        )
    entries = data["boards"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: `boards` must be a non-empty list")
    if len(entries) > MAX_BOARDS:
        raise ConfigError(f"{source}: at most {MAX_BOARDS} boards, got {len(entries)}")
    boards = tuple(board_spec(e, f"{source}: boards[{i}]") for i, e in enumerate(entries))
    ids = [b.id for b in boards]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: board ids must be unique: {ids}")
    broker = data.get("broker") or {}
    if not isinstance(broker, dict) or set(broker) - {"host", "port"}:
        raise ConfigError(f"{source}: broker must be a mapping of host and port, got {broker!r}")
    host, port = broker.get("host", "127.0.0.1"), broker.get("port", 1883)
    if (
        not isinstance(host, str)
        or isinstance(port, bool)
        or not isinstance(port, int)
        or not (0 < port < 65536)
    ):
        raise ConfigError(
            f"{source}: broker host must be a string and port 1-65535, got {broker!r}"
        )
    prefix = data.get("prefix", "edvit")
    try:
        Topics(prefix)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: prefix: {exc}") from None
    return FleetSpec(boards=boards, broker_host=host, broker_port=port, prefix=prefix)


def load_fleet(path: Path) -> FleetSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_fleet(data, str(path))


# -- the run folder -------------------------------------------------------------------------


@dataclass
class BoardState:
    spec: BoardSpec
    link: Link
    cgroups: list[str] = field(default_factory=list)
    proxy_pid: int | None = None
    proxy_port: int | None = None
    node_pid: int | None = None
    log: str = ""

    @property
    def node_broker(self) -> str:
        return f"mqtt://{self.link.host_ip}:{self.proxy_port}"

    @property
    def proxy_log(self) -> Path:
        return Path(self.log).with_suffix(".proxy.log")


@dataclass
class RunState:
    token: str
    cgroup_version: str
    broker: str
    prefix: str
    boards: list[BoardState] = field(default_factory=list)


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def save_state(run_dir: Path, state: RunState) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(run_dir)
    path.with_suffix(".tmp").write_text(json.dumps(asdict(state), indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)


def load_state(run_dir: Path) -> RunState | None:
    path = state_path(run_dir)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    boards = [
        BoardState(**(b | {"spec": BoardSpec(**b["spec"]), "link": Link(**b["link"])}))
        for b in data.pop("boards")
    ]
    return RunState(**data, boards=boards)


# -- processes ------------------------------------------------------------------------------


def alive(pid: int | None) -> bool:
    """Running (a zombie, exited but not yet reaped, is not)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# waitpid statuses of this process's children reaped here, by pid: how a node ended is read
# after the fact (killed_by_memory_limit).
_EXITS: dict[int, int] = {}


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            _EXITS[pid] = status


def stop_pids(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT (a node's clean offline status), then SIGKILL after `grace_s`."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            for pid in pids:
                _reap(pid)
            time.sleep(0.05)
    for pid in pids:
        _reap(pid)


def _spawn(command: list[str], log_path: Path, cgroups: list[Path] | None = None) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def enter_cgroup() -> None:  # in the child, before exec: nothing runs unlimited
        for folder in cgroups or []:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=enter_cgroup if cgroups else None,
        )  # fmt: skip
    return process.pid


# -- up, down, status -----------------------------------------------------------------------


def unavailable_message(missing: list[str]) -> str:
    return (
        f"emulated boards need {', '.join(missing)} (missing here); "
        "`edvit demo` runs the same fleet unshaped, as local processes"
    )


def up(fleet: FleetSpec, run_dir: Path = DEFAULT_RUN_DIR, node_args: tuple[str, ...] = (),
       ready_timeout: float = 30.0) -> RunState:  # fmt: skip
    """Make every board and start its proxy and node; return once every node's process runs
    and its proxy listens. Whatever fails, what was made is taken down again."""
    missing = emulation.missing_features()
    if missing:
        raise EdvitError(unavailable_message(missing))
    existing = load_state(run_dir)
    if existing is not None:
        raise EdvitError(f"a fleet is already up in {run_dir}: `edvit fleet down` first")
    version = emulation.cgroup_version()
    assert version is not None
    used = emulation.used_subnets(SUBNET_PREFIX)
    block = next((x for x in range(256) if x not in used), None)
    if block is None:
        raise EdvitError(f"no free {SUBNET_PREFIX}.X.0/24 block for the boards' links")
    state = RunState(
        token=secrets.token_hex(2), cgroup_version=version, prefix=fleet.prefix,
        broker=f"mqtt://{fleet.broker_host}:{fleet.broker_port}",
    )  # fmt: skip
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        for i, spec in enumerate(fleet.boards):
            base = f"{SUBNET_PREFIX}.{block}.{4 * i}"
            link = Link(
                netns=f"edvit-{state.token}-{spec.id}",
                host_if=f"ev{state.token}h{i}",
                board_if=f"ev{state.token}b{i}",
                host_ip=base.rsplit(".", 1)[0] + f".{4 * i + 1}",
                board_ip=base.rsplit(".", 1)[0] + f".{4 * i + 2}",
            )
            board = BoardState(spec=spec, link=link, log=str(run_dir / "logs" / f"{spec.id}.log"))
            state.boards.append(board)
            _make_board(run_dir, state, board, fleet, node_args)
        _wait_listening(state, ready_timeout)
    except BaseException:
        save_state(run_dir, state)  # all that was made, for `down` to undo
        down(run_dir)
        raise
    return state


def _make_board(run_dir: Path, state: RunState, board: BoardState, fleet: FleetSpec,
                node_args: tuple[str, ...]) -> None:  # fmt: skip
    """Make the board's link, cgroup, proxy and node. Each is written to the state before
    it is made (a process's pid right after): an `up` killed at any point leaves a state
    from which `down` finds everything."""
    spec, link = board.spec, board.link
    folders = emulation.cgroup_dirs(state.cgroup_version, f"{state.token}-{spec.id}")
    board.cgroups = [str(f) for f in folders]
    save_state(run_dir, state)
    emulation.create_link(link, spec.rate_mbit)
    emulation.create_cgroup(state.cgroup_version, folders, spec.cpu, spec.memory_mb)
    board.proxy_port = find_free_port(link.host_ip)
    save_state(run_dir, state)
    board.proxy_pid = _spawn(
        edvit_command(
         "fleet", "proxy", "--listen", f"{link.host_ip}:{board.proxy_port}",
         "--target", f"{fleet.broker_host}:{fleet.broker_port}",
         "--delay-ms", f"{spec.delay_ms:g}"),
        board.proxy_log,
    )  # fmt: skip
    save_state(run_dir, state)
    if not wait_for_port(link.host_ip, board.proxy_port, time.monotonic() + 10):
        raise EdvitError(
            f"{spec.id}: the link proxy did not listen ({_last_line(board.proxy_log)}; "
            f"log {board.proxy_log})"
        )
    board.node_pid = _spawn(
        ["ip", "netns", "exec", link.netns, *edvit_command(
         "node", "--id", spec.id, "--broker", board.node_broker, "--prefix", state.prefix,
         "--memory-mb", str(spec.memory_mb), *node_args)],
        Path(board.log), folders,
    )  # fmt: skip
    save_state(run_dir, state)


def _last_line(path: Path) -> str:
    """The last line of a log (a traceback's exception), or why there is none."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError as exc:
        return f"no log: {exc.strerror}"
    return lines[-1] if lines else "its log is empty"


def _wait_listening(state: RunState, timeout: float) -> None:
    """Until every node has an MQTT connection through its proxy (one ESTABLISHED socket
    to the proxy port), or one died."""
    deadline = time.monotonic() + timeout
    waiting = {b.spec.id: b for b in state.boards}
    while waiting:
        for board_id, board in list(waiting.items()):
            check_board(board)
            if _connected(board):
                del waiting[board_id]
        if waiting and time.monotonic() > deadline:
            raise EdvitError(f"not connected after {timeout:.0f} s: {sorted(waiting)}")
        time.sleep(0.2)


def check_board(board: BoardState) -> None:
    """BoardOutOfMemory when the memory limit killed the node, EdvitError when it died of
    anything else; nothing while it runs."""
    if alive(board.node_pid):
        return
    if killed_by_memory_limit(board):
        raise BoardOutOfMemory(board.spec.id, board.spec.memory_mb)
    tail = "\n".join(Path(board.log).read_text().splitlines()[-10:])
    raise EdvitError(f"{board.spec.id}: the node exited:\n{tail}")


def killed_by_memory_limit(board: BoardState) -> bool:
    """Whether the board's memory limit killed its node: the cgroup counts an OOM kill, or
    (a kernel that does not count them) the node, a child of this process, ended by SIGKILL
    after the cgroup hit its limit (memory.failcnt)."""
    folders = [Path(f) for f in board.cgroups]
    if not folders or not all(f.exists() for f in folders):
        return False
    if emulation.oom_kills(folders):
        return True
    if board.node_pid is None or alive(board.node_pid):
        return False
    _reap(board.node_pid)
    status = _EXITS.get(board.node_pid)
    return (
        status is not None
        and os.WIFSIGNALED(status)
        and os.WTERMSIG(status) == signal.SIGKILL
        and (emulation.memory_failcnt(folders) or 0) > 0
    )


# What `load_on_board` runs: the node's own loader on the file's bytes (as a node gets them),
# then frames of zeros through the session, one at a time; prints the median of the timed
# frames' wall time in ms.
PROBE_FRAMES = 3  # timed, after one untimed
_LOAD_CODE = (
    "import sys, time, statistics; from pathlib import Path; import numpy as np; "
    "from edvit.inference import make_session; "
    "s = make_session(Path(sys.argv[1]).read_bytes()); i = s.get_inputs()[0]; "
    "x = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)}; "
    "s.run(None, x); t = []\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    a = time.perf_counter(); s.run(None, x); t.append(time.perf_counter() - a)\n"
    "print(round(1000 * statistics.median(t), 1))"
)


@dataclass(frozen=True)
class LoadProbe:
    """How loading one model file went in a cgroup of a board's CPU quota and memory."""

    loaded: bool
    oom_killed: bool
    cgroup_peak_mb: float | None
    failcnt: int | None
    seconds: float
    frame_ms: float | None  # median wall time of one frame on the board, once loaded
    detail: str  # one line: what happened


def load_on_board(spec: BoardSpec, model: Path, timeout: float = 300.0) -> LoadProbe:
    """Load `model` with ONNX Runtime and run it once, in a process held to the board's CPU
    quota and memory limit (no network, no broker): whether the model fits the board
    whatever the way it is delivered. The cgroup is removed afterwards."""
    missing = emulation.missing_features()
    if missing:
        raise EdvitError(unavailable_message(missing))
    version = emulation.cgroup_version()
    assert version is not None
    name = f"probe-{os.getpid()}-{secrets.token_hex(2)}"
    folders = emulation.cgroup_dirs(version, name)
    emulation.create_cgroup(version, folders, spec.cpu, spec.memory_mb)

    def enter_cgroup() -> None:
        for folder in folders:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _LOAD_CODE, str(model), str(PROBE_FRAMES)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=enter_cgroup,
        )  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
            stderr = f"not loaded and run within {timeout:g} s"
        seconds = round(time.monotonic() - started, 1)
        oom = emulation.oom_kills(folders) > 0 or (
            process.returncode == -signal.SIGKILL and (emulation.memory_failcnt(folders) or 0) > 0
        )
        peak = emulation.memory_peak_mb(folders)
        failcnt = emulation.memory_failcnt(folders)
    finally:
        emulation.delete_cgroup(folders)
        for parent in {f.parent for f in folders}:
            with contextlib.suppress(OSError):  # another fleet's boards may still be in it
                parent.rmdir()
    loaded = process.returncode == 0
    frame_ms = float(stdout.split()[-1]) if loaded and stdout.split() else None
    if loaded:
        detail = f"loaded and ran in {seconds:g} s, {frame_ms:g} ms a frame"
    elif oom:
        detail = f"killed by the board's {spec.memory_mb} MB limit after {seconds:g} s"
    else:
        lines = [line for line in (stderr or "").splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {process.returncode}"
    return LoadProbe(
        loaded=loaded, oom_killed=oom, cgroup_peak_mb=None if peak is None else round(peak, 1),
        failcnt=failcnt, seconds=seconds, frame_ms=frame_ms, detail=detail,
    )  # fmt: skip


def _connected(board: BoardState) -> bool:
    """The proxy has accepted a connection from the board's address."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", "src", f"{board.link.host_ip}:{board.proxy_port}"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.returncode == 0 and board.link.board_ip in out.stdout


def down(run_dir: Path = DEFAULT_RUN_DIR) -> list[str]:
    """Stop every node and proxy, delete cgroups and namespaces, remove the state; returns
    the boards taken down (none when no fleet is up)."""
    state = load_state(run_dir)
    if state is None:
        return []
    pids = [p for b in state.boards for p in (b.node_pid, b.proxy_pid) if p is not None]
    # An `up` killed between starting a process and writing its pid: the process is still
    # found, in the board's namespace or cgroup, or by the proxy's listen address.
    pids += [p for b in state.boards for p in _unrecorded_pids(b) if p not in pids]
    stop_pids(pids)
    problems = []
    for board in state.boards:
        try:
            emulation.delete_cgroup([Path(f) for f in board.cgroups])
        except emulation.EmulationError as exc:
            problems.append(str(exc))
        emulation.delete_link(board.link)
    for parent in {Path(f).parent for b in state.boards for f in b.cgroups}:
        with contextlib.suppress(OSError):  # another fleet's boards may still be in it
            parent.rmdir()
    if problems:
        raise EdvitError("; ".join(problems))
    state_path(run_dir).unlink()
    return [b.spec.id for b in state.boards]


def _unrecorded_pids(board: BoardState) -> list[int]:
    """Processes of the board: in its network namespace or its cgroup, or the proxy
    listening on its link (`edvit fleet proxy --listen HOST_IP:PORT`)."""
    found: set[int] = set()
    if emulation.netns_exists(board.link.netns):
        with contextlib.suppress(emulation.EmulationError):
            listed = emulation.run("ip", "netns", "pids", board.link.netns)
            found |= {int(p) for p in listed.split()}
    for folder in map(Path, board.cgroups):
        with contextlib.suppress(OSError, ValueError):
            found |= {int(p) for p in (folder / "cgroup.procs").read_text().split()}
    if board.proxy_port is not None:
        listen = f"{board.link.host_ip}:{board.proxy_port}".encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                args = cmdline.read_bytes().split(b"\0")
                if b"proxy" in args and listen in args:
                    found.add(int(cmdline.parent.name))
    found.discard(os.getpid())
    return sorted(found)


def board_status(board: BoardState) -> dict[str, Any]:
    folders = [Path(f) for f in board.cgroups]
    peak = emulation.memory_peak_mb(folders) if all(f.exists() for f in folders) else None
    return {
        "id": board.spec.id,
        "preset": board.spec.preset,
        "cpu": board.spec.cpu,
        "memory_mb": board.spec.memory_mb,
        "rate_mbit": board.spec.rate_mbit,
        "delay_ms": board.spec.delay_ms,
        "netns": board.link.netns if emulation.netns_exists(board.link.netns) else None,
        "address": board.link.board_ip,
        "broker": board.node_broker,
        "node_pid": board.node_pid,
        "node_alive": alive(board.node_pid),
        "proxy_alive": alive(board.proxy_pid),
        "rss_mb": rss_mb(board.node_pid),
        "cpu_s": cpu_seconds(board.node_pid),
        "cgroup_peak_mb": peak,
        "oom_kills": emulation.oom_kills(folders) if all(f.exists() for f in folders) else None,
        "throttled": emulation.throttled(folders) if all(f.exists() for f in folders) else None,
        "log": board.log,
    }


def status(run_dir: Path = DEFAULT_RUN_DIR) -> list[dict[str, Any]]:
    state = load_state(run_dir)
    return [] if state is None else [board_status(b) for b in state.boards]


def format_status(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no emulated boards are up"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        "| board | preset | cpu | memory MB | Mbit/s | delay ms | address | node | RSS MB "
        "| CPU s | OOM kills |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        node = f"{r['node_pid']} {'up' if r['node_alive'] else 'DOWN'}"
        if not r["proxy_alive"]:
            node += ", link proxy DOWN"
        lines.append(
            f"| {r['id']} | {r['preset'] or '-'} | {r['cpu']:g} | {r['memory_mb']} | "
            f"{r['rate_mbit']:g} | {r['delay_ms']:g} | {r['address']} ({r['netns'] or 'no netns'}) "
            f"| {node} | {num(r['rss_mb'])} | {num(r['cpu_s'])} | {r['oom_kills']} |"
        )
    return "\n".join(lines)


def serve_proxy(listen: str, target: str, delay_ms: float) -> None:
    """`edvit fleet proxy`: a board's link proxy, in the foreground until interrupted."""
    from edvit.fleet.boards.proxy import CuttableProxy

    listen_host, listen_port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)
    proxy = CuttableProxy(target_host, int(target_port), listen_host, int(listen_port), delay_ms)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.serve_forever()
