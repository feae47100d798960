"""The kernel side of emulated boards (`edvit fleet up`, boards.py): a network
namespace per board joined to the host by a veth pair, a `tc tbf` rate limit on both ends,
and a cgroup with a CPU quota and a memory limit (v1 or v2, whichever is mounted).

Every step is a plain `ip`/`tc` command or a write under /sys/fs/cgroup, so what a board is
made of can be checked by hand (`ip netns list`, `tc qdisc show`, the cgroup folders)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edvit.errors import EdvitError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "edvit-boards"  # every board's cgroup lives under this one
# CFS hands out `cpu` of each period as one slice: a job shorter than the slice runs at full
# speed, so the slice should be short. But a throttled group waits for the scheduler once its
# period restarts, and on a busy host that wait eats a 1 ms slice: with four busy processes
# beside it, a board of 0.5 core got 0.34 with 1 ms slices and 0.50 with 10 ms ones.
QUOTA_SLICE_US = 10_000
# A board's CPU is its own: the host's other work must not take it. A cgroup's quota only caps
# it; under contention CFS divides the CPU by weight, and the boards' parent group, at the
# default weight, would get one process's share for all the boards together. So the parent
# gets the highest weight (the quotas, whose sum `bench boards` keeps within the host's
# cores, still cap it) and each board a weight in proportion to its quota.
V1_MAX_SHARES = 262144
V2_MAX_WEIGHT = 10000
TBF_BURST = "64kb"  # a few full-size frames: enough for the rate, small enough to shape
TBF_LATENCY = "100ms"  # how long a packet may wait in the bucket before it is dropped


class EmulationError(EdvitError):
    """A namespace, link or cgroup could not be made."""


def run(*command: str) -> str:
    """Run a command; EmulationError with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulationError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def cgroup_version() -> str | None:
    """'v2' when the unified hierarchy with cpu and memory is mounted at /sys/fs/cgroup,
    'v1' when the cpu and memory controllers are (a hybrid host's empty unified mount under
    /sys/fs/cgroup/unified does not count), None when neither is."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists():
        found = controllers.read_text().split()
        return "v2" if {"cpu", "memory"} <= set(found) else None
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists() and (
        CGROUP_ROOT / "memory" / "memory.limit_in_bytes"
    ).exists():
        return "v1"
    return None


def missing_features() -> list[str]:
    """What this machine lacks for emulated boards; empty when everything is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command")
    if cgroup_version() is None:
        missing.append("cgroup cpu and memory controllers")
    if not Path("/proc/self/ns/net").exists():
        missing.append("network namespaces")
    return missing


# -- network --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A board's network: namespace `netns`, veth `host_if` (host side, `host_ip`) and
    `board_if` (inside the namespace, `board_ip`), both in one /30."""

    netns: str
    host_if: str
    board_if: str
    host_ip: str
    board_ip: str


def used_subnets(prefix: str) -> set[int]:
    """Third octets of the `prefix`.X.0/24 blocks that some interface already uses."""
    used = set()
    for line in run("ip", "-o", "-4", "addr", "show").splitlines():
        for word in line.split():
            if word.startswith(prefix + "."):
                used.add(int(word.split(".")[2]))
    return used


def create_link(link: Link, rate_mbit: float) -> None:
    """The namespace, the veth pair with its addresses, and the rate limit on both ends."""
    run("ip", "netns", "add", link.netns)
    run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.board_if)
    run("ip", "link", "set", link.board_if, "netns", link.netns)
    run("ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_if)
    run("ip", "link", "set", link.host_if, "up")
    inside = ("ip", "netns", "exec", link.netns)
    run(*inside, "ip", "addr", "add", f"{link.board_ip}/30", "dev", link.board_if)
    run(*inside, "ip", "link", "set", link.board_if, "up")
    run(*inside, "ip", "link", "set", "lo", "up")
    # Egress on each end: host -> board on the host side, board -> host inside.
    tbf = ("root", "tbf", "rate", f"{rate_mbit:g}mbit", "burst", TBF_BURST,
           "latency", TBF_LATENCY)  # fmt: skip
    run("tc", "qdisc", "add", "dev", link.host_if, *tbf)
    run(*inside, "tc", "qdisc", "add", "dev", link.board_if, *tbf)


def delete_link(link: Link) -> None:
    """Deleting the namespace deletes the veth in it, and with it its host-side peer."""
    with contextlib.suppress(EmulationError):
        run("ip", "netns", "del", link.netns)
    with contextlib.suppress(EmulationError):
        run("ip", "link", "del", link.host_if)


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


# -- cgroups --------------------------------------------------------------------------------


def cgroup_dirs(version: str, name: str) -> list[Path]:
    """The folders of the cgroup `name`: one per controller on v1, one on v2."""
    if version == "v1":
        return [CGROUP_ROOT / c / CGROUP_PARENT / name for c in ("cpu", "memory")]
    return [CGROUP_ROOT / CGROUP_PARENT / name]


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise EmulationError(f"cannot write {value!r} to {path}: {exc}") from None


def create_cgroup(version: str, folders: list[Path], cpu: float, memory_mb: int) -> None:
    """The cgroup of `cgroup_dirs` with `cpu` cores of quota, a weight that lets it have them
    on a busy host, and `memory_mb` of memory, swap included."""
    quota, period = cpu_quota(cpu)
    limit = str(memory_mb * 1024 * 1024)
    if version == "v2":
        (folder,) = folders
        folder.parent.mkdir(exist_ok=True)
        _write(CGROUP_ROOT / "cgroup.subtree_control", "+cpu +memory")
        _write(folder.parent / "cgroup.subtree_control", "+cpu +memory")
        _write(folder.parent / "cpu.weight", str(V2_MAX_WEIGHT))
        folder.mkdir()
        _write(folder / "cpu.max", f"{quota} {period}")
        _write(folder / "cpu.weight", str(max(1, min(V2_MAX_WEIGHT, round(cpu * 100)))))
        _write(folder / "memory.max", limit)
        if (folder / "memory.swap.max").exists():
            _write(folder / "memory.swap.max", "0")
        return
    cpu_dir, memory_dir = folders
    for folder in (cpu_dir, memory_dir):
        folder.mkdir(parents=True)
    _write(cpu_dir.parent / "cpu.shares", str(V1_MAX_SHARES))
    _write(cpu_dir / "cpu.shares", str(max(2, round(cpu * 1024))))
    _write(cpu_dir / "cpu.cfs_period_us", str(period))
    _write(cpu_dir / "cpu.cfs_quota_us", str(quota))
    _write(memory_dir / "memory.limit_in_bytes", limit)
    if (memory_dir / "memory.memsw.limit_in_bytes").exists():
        _write(memory_dir / "memory.memsw.limit_in_bytes", limit)


def cpu_quota(cpu: float) -> tuple[int, int]:
    """(quota, period) in µs for `cpu` cores: 10 ms of quota per period below one core."""
    if cpu >= 1:
        return round(cpu * QUOTA_SLICE_US), QUOTA_SLICE_US
    return QUOTA_SLICE_US, min(1_000_000, round(QUOTA_SLICE_US / cpu))


def throttled(folders: list[Path]) -> int:
    """How many periods the CPU quota stopped this cgroup (cpu.stat, v1 and v2)."""
    for folder in folders:
        path = folder / "cpu.stat"
        if path.exists():
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "nr_throttled":
                    return int(value)
    return 0


def join_cgroup(folders: list[Path], pid: int) -> None:
    for folder in folders:
        _write(folder / "cgroup.procs", str(pid))


def delete_cgroup(folders: list[Path], timeout: float = 5.0) -> None:
    """rmdir each folder once its processes are gone (the kernel refuses it before)."""
    deadline = time.monotonic() + timeout
    for folder in folders:
        while folder.exists():
            try:
                folder.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise EmulationError(f"cannot remove cgroup {folder}") from None
                time.sleep(0.05)


def oom_kills(folders: list[Path]) -> int:
    """How many processes the memory limit killed in this cgroup."""
    for folder in folders:
        for name in ("memory.events", "memory.oom_control"):
            path = folder / name
            if path.exists():
                for line in path.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
    return 0


def memory_failcnt(folders: list[Path]) -> int | None:
    """How many times the cgroup's memory use hit its limit (v1: memory.failcnt, or
    memory.memsw.failcnt where the limit includes swap; v2: the `max` count of
    memory.events); None where none of them is there."""
    counts = []
    for folder in folders:
        for name in ("memory.failcnt", "memory.memsw.failcnt"):
            if (folder / name).exists():
                counts.append(int((folder / name).read_text()))
        path = folder / "memory.events"
        if path.exists():
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    counts.append(int(value))
    return max(counts) if counts else None


def memory_peak_mb(folders: list[Path]) -> float | None:
    """The cgroup's peak memory use (v1 max_usage, v2 memory.peak where the kernel has it)."""
    for folder in folders:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            path = folder / name
            if path.exists():
                return int(path.read_text()) / 2**20
    return None
