"""`edvit bench chaos`: a 3-node fleet on a local mosquitto, a camera at 20 fps, and the
faults the fleet must survive, one scenario after another, with the figures of each.

Scenarios (each with its own camera stream of a fixed frame count, so that every frame
can be checked for exactly one answer):

- kill:     SIGKILL a node, later start it again.
- freeze:   SIGSTOP a node (alive, connected, silent), later SIGCONT it.
- cut:      cut a node's network (a proxy drops its bytes: no Will until its keepalive
            runs out), later restore it.
- failover: two aggregators; SIGKILL the one answering and planning, then kill a node.
- partitions: the broker restarted with and without its store, links cut between the
            broker and the aggregator or the nodes, during a plan switch, and a failover
            during a broker restart (partitions.py).

Every time is measured here, from the events this process causes to the messages it
receives (predictions, statuses, plans, the aggregator lease), on one clock.
"""

from __future__ import annotations

import functools
import json
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edvit.bundle import Bundle
from edvit.fleet.chaos.catalog import DEFAULT_SCENARIO_NAMES, PARTITIONS
from edvit.fleet.chaos.fuzz import (
    GOOD_CAMERA,
    CounterWatch,
    HostileGenerator,
    HostileRun,
    RssSampler,
    figures,
    publish_spread,
)
from edvit.fleet.chaos.harness import (
    CUT_NODE,
    NODES,
    VICTIM,
    ChaosFleet,
    exactly_once,
    p95_ms,
    seconds_since,
)
from edvit.fleet.chaos.partitions import (
    PARTITION_SCENARIOS,
    SETUPS,
    ClusterChaosFleet,
    Setup,
    expectations,
)
from edvit.limits import PayloadKind
from edvit.mqtt import MqttClient, unique_client_id
from edvit.process import rss_mb
from edvit.schemas import PlanMsg


def scenario_kill(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    frames = int(cf.fps * 18)
    cf.camera("cam-kill", frames)
    time.sleep(4.0)
    killed = cf.kill(VICTIM)
    time.sleep(6.0)
    restarted = time.time()
    cf.fleet.spawn(f"{VICTIM}-restarted", "node", "--id", VICTIM)
    cf.wait_answers("cam-kill", frames, 30)
    obs, answers = cf.observer, cf.observer.of_camera("cam-kill")
    offline = obs.first(
        obs.statuses, lambda t, n, s: t > killed and n == VICTIM and s.state == "offline"
    )
    up_again = obs.first(
        obs.statuses, lambda t, n, s: t > restarted and n == VICTIM and s.state != "offline"
    )
    restored = obs.first(obs.plans, lambda t, p: t > restarted and p.plan_id == base.plan_id)
    return {
        "scenario": "kill a node (SIGKILL), then start it again",
        "pre_fault_p95_ms": p95_ms([p.latency_ms for _, p in answers if p.ts < killed - 0.5]),
        "offline_status_s": seconds_since(offline, killed),
        "first_degraded_answer_s": seconds_since(
            obs.first(answers, lambda t, p: t > killed and p.degraded), killed
        ),
        "degraded_p95_after_offline_ms": p95_ms(
            [p.latency_ms for _, p in answers if offline and p.ts > offline and p.degraded]
        ),
        "full_answers_again_s": seconds_since(
            obs.first(answers, lambda t, p: p.ts > killed + 0.05 and not p.degraded), killed
        ),
        "node_up_again_s": seconds_since(up_again, restarted),
        "placement_restored_after_up_s": seconds_since(restored, up_again) if up_again else None,
        **exactly_once(answers, frames),
    }


def _silenced(
    cf: ChaosFleet, base: PlanMsg, *, camera: str, victim: str, what: str,
    silence: Callable[[], object], restore: Callable[[], object], silent_s: float,
) -> dict[str, Any]:  # fmt: skip
    """A node that stays connected (or seems to) but sends nothing for `silent_s`."""
    frames = int(cf.fps * (silent_s + 10))
    cf.camera(camera, frames)
    time.sleep(4.0)
    silenced = time.time()
    silence()
    time.sleep(silent_s)
    restored_at = time.time()
    restore()
    cf.wait_answers(camera, frames, 30)
    obs, answers = cf.observer, cf.observer.of_camera(camera)
    during = [p.latency_ms for _, p in answers if silenced <= p.ts < restored_at]
    offline = obs.first(
        obs.statuses, lambda t, n, s: t > silenced and n == victim and s.state == "offline"
    )
    restored = obs.first(obs.plans, lambda t, p: t > restored_at and p.plan_id == base.plan_id)
    return {
        "scenario": what,
        "pre_fault_p95_ms": p95_ms([p.latency_ms for _, p in answers if p.ts < silenced - 0.5]),
        "max_latency_while_silent_ms": round(max(during), 1) if during else None,
        "full_answers_again_s": seconds_since(
            obs.first(
                answers,
                lambda t, p: (
                    p.ts > silenced + 0.05 and not p.degraded and p.plan_id != base.plan_id
                ),
            ),
            silenced,
        ),  # fmt: skip
        "will_offline_s": seconds_since(offline, silenced),
        "placement_restored_after_recovery_s": seconds_since(restored, restored_at),
        **exactly_once(answers, frames),
    }


def scenario_freeze(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    victim = "node-2"
    return _silenced(
        cf, base, camera="cam-freeze", victim=victim,
        what="freeze a node (SIGSTOP), then resume it (SIGCONT)",
        silence=lambda: cf.kill(victim, signal.SIGSTOP),
        restore=lambda: cf.kill(victim, signal.SIGCONT), silent_s=6.0,
    )  # fmt: skip


def scenario_cut(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    proxy = cf.proxy
    assert proxy is not None
    # 10 s: past the keepalive, so the broker sends the node's Will meanwhile.
    return _silenced(
        cf, base, camera="cam-cut", victim=CUT_NODE,
        what="cut a node's network (bytes dropped), then restore it",
        silence=proxy.cut, restore=proxy.restore, silent_s=10.0,
    )  # fmt: skip


def scenario_failover(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    frames = int(cf.fps * 16)
    obs = cf.observer
    cf.camera("cam-failover", frames)
    time.sleep(4.0)
    with obs.lock:
        holder = obs.leases[-1][1] if obs.leases else "agg-a"
    killed = cf.kill(holder)
    time.sleep(5.0)
    taken = obs.first(obs.leases, lambda t, h: t > killed and h != holder)
    node_killed = cf.kill("node-0")
    cf.wait_answers("cam-failover", frames, 30)
    answers = obs.of_camera("cam-failover")
    return {
        "scenario": "kill the answering aggregator and planner, then a node",
        "standby_took_over_s": seconds_since(taken, killed),
        "full_answers_again_after_node_kill_s": seconds_since(
            obs.first(answers, lambda t, p: p.ts > node_killed + 0.05 and not p.degraded),
            node_killed,
        ),
        **exactly_once(answers, frames),
    }


def scenario_soak(
    cf: ChaosFleet, base: PlanMsg, *, seconds: float = 600.0, cameras: int = 4,
    fps: float = 200.0, window_s: float = 10.0,
) -> dict[str, Any]:  # fmt: skip
    """Cameras offering far more than the fleet can serve, for a long time: memory must stay
    flat, the queues bounded (newest frames replace waiting ones), answers prompt."""
    names = [f"cam-soak{i}" for i in range(cameras)]
    for name in names:
        cf.fleet.spawn(
            name, "camera", "--id", name, "--source", f"dataset:{cf.bundle.manifest.dataset}",
            "--loop", "--count", str(int(fps * seconds)), "--fps", str(fps),
        )  # fmt: skip
    services = [n for n in cf.fleet.processes if not n.startswith("cam")]
    samples: list[dict[str, Any]] = []
    started = time.time()
    while time.time() - started < seconds:
        time.sleep(window_s)
        now = time.time()
        with cf.observer.lock:
            recent = [p for t, p in cf.observer.predictions if now - window_s <= t < now]
        samples.append({
            "t_s": round(now - started),
            "served_fps": round(len(recent) / window_s, 1),
            "p95_ms": p95_ms([p.latency_ms for p in recent]),
            "rss_mb": {n: rss_mb(cf.fleet.processes[n].pid) for n in services},
        })  # fmt: skip
    for name in names:
        cf.kill(name, signal.SIGINT)
    first, last = samples[0], samples[-1]
    growth = {n: round((last["rss_mb"][n] or 0) - (first["rss_mb"][n] or 0), 1) for n in services}
    with cf.observer.lock:
        keys = [(p.camera, p.seq) for _, p in cf.observer.predictions if p.camera in names]
    return {
        "scenario": f"{cameras} cameras at {fps:g} fps for {seconds:g} s",
        "offered_fps": cameras * fps,
        "served_fps_first_last": (first["served_fps"], last["served_fps"]),
        "p95_ms_first_last": (first["p95_ms"], last["p95_ms"]),
        "rss_growth_mb_first_to_last_window": growth,
        "answered_twice": len(keys) - len(set(keys)),
        "windows": samples,
    }


def scenario_hostile(
    cf: ChaosFleet,
    base: PlanMsg,
    *,
    payloads: int = 10_000,
    seconds: float = 10.0,
    seed: int = 0,
    oversized: dict[PayloadKind, int] | None = None,
) -> dict[str, Any]:
    """`payloads` hostile payloads over `seconds` on every topic while a good camera
    streams; then the fleet is stopped to read its final counters (the payloads, and who
    must count each: edvit.fleet.chaos.fuzz)."""
    nodes = [n for n in NODES if n in cf.fleet.processes]
    aggregators = [n for n in cf.fleet.processes if n.startswith("agg")]
    services = [*nodes, *aggregators]
    generator = HostileGenerator(
        cf.topics, base, aggregator=aggregators[0], seed=seed,
        oversized=oversized,
    )  # fmt: skip
    hostiles = generator.make(payloads)
    watch = CounterWatch(cf.topics, cf.broker.url)
    fuzzer = MqttClient(unique_client_id("fuzz"), cf.broker.url)
    fuzzer.start(required=True)
    try:
        time.sleep(0.5)  # the retained statuses arrive
        baseline = {name: watch.counters(name) for name in services}
        frames = int(cf.fps * (seconds + 4.0))
        camera_start = time.time()
        cf.camera(GOOD_CAMERA, frames)
        deadline = time.monotonic() + 30
        while not cf.observer.of_camera(GOOD_CAMERA) and time.monotonic() < deadline:
            time.sleep(0.05)
        rss = RssSampler({n: cf.fleet.processes[n].pid for n in services})
        started = time.monotonic()
        sent, failed = publish_spread(fuzzer, hostiles, seconds, cf.topics.prefix)
        streamed_s = time.monotonic() - started
        cf.wait_answers(GOOD_CAMERA, frames, 30)
        rss.stop()
        run_end = time.time()
        alive = {n: cf.fleet.processes[n].poll() is None for n in services}
        camera_exit = cf.fleet.processes[GOOD_CAMERA].poll()
        with cf.observer.lock:
            plans = [(t - camera_start, p) for t, p in cf.observer.plans if t >= camera_start]
        # Only the good camera's own frames: its seqs, captured during this run (hostile
        # frames on its topic are all refused, so this only guards the count).
        answers = [
            p for _, p in cf.observer.of_camera(GOOD_CAMERA)
            if 0 <= p.seq < frames and camera_start - 1.0 <= p.ts <= run_end
        ]  # fmt: skip
        stopped_at = time.time() - 1.0
        exit_codes = cf.fleet.stop()  # a clean stop publishes every service's counters
        wait_until = time.monotonic() + 10
        while time.monotonic() < wait_until and not all(
            watch.offline_since(n, stopped_at) for n in services
        ):
            time.sleep(0.1)
        final = {name: watch.counters(name) - baseline[name] for name in services}
        final_read = {n: watch.offline_since(n, stopped_at) for n in services}
    finally:
        fuzzer.stop()
        watch.stop()
    run = HostileRun(services, nodes, sent, failed, streamed_s, frames, answers, rss, alive,
                     camera_exit, exit_codes, final, final_read, plans, cf.log_dir)  # fmt: skip
    return figures(run)


SCENARIOS = {
    "kill": scenario_kill,
    "freeze": scenario_freeze,
    "cut": scenario_cut,
    "failover": scenario_failover,
}

DEFAULT_SCENARIOS = tuple(DEFAULT_SCENARIO_NAMES)


def run_chaos(
    bundle_dir: Path,
    *,
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS,
    fps: float = 20.0,
    hold_off_s: float = 3.0,
    json_path: Path | None = None,
    soak_s: float = 600.0,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    runners = {
        **SCENARIOS,
        **PARTITION_SCENARIOS,
        "hostile": scenario_hostile,
        "soak": functools.partial(scenario_soak, seconds=soak_s),
    }
    setups = {
        "failover": Setup(aggregators=("agg-a", "agg-b")),
        "cut": Setup(proxied=(CUT_NODE,)),
        **SETUPS,
    }
    names = [n for name in scenarios for n in (PARTITIONS if name == "partitions" else (name,))]
    bundle = Bundle.load(bundle_dir)
    results = []
    for name in names:
        log_dir = Path(tempfile.mkdtemp(prefix=f"edvit-chaos-{name}-"))
        setup = setups.get(name, Setup())
        if name == "cluster-switch":
            fleet: ChaosFleet = ClusterChaosFleet(bundle, log_dir, fps, hold_off_s)
        else:
            fleet = ChaosFleet(bundle, log_dir, fps, hold_off_s, persistence=setup.persistence)
        with fleet as cf:
            base = cf.start(setup.aggregators, proxied=setup.proxied)
            if len(setup.aggregators) > 1:
                time.sleep(1.0)  # the standby follows the plan and the lease
            result = {"name": name, **runners[name](cf, base), "logs": str(log_dir)}
        if name in PARTITION_SCENARIOS:
            result["broken"] = expectations(result)
        results.append(result)
        say(_render(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _render(result: dict[str, Any]) -> str:
    lines = [f"{result['name']}: {result['scenario']}"]
    for key, value in result.items():
        if key not in ("name", "scenario", "logs", "windows"):
            lines.append(f"  {key:<40s} {value}")
    return "\n".join(lines)
