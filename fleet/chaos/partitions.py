"""The partition matrix of `edvit bench chaos`: faults that separate services from the
broker, or take the broker's memory with it, each on a fresh fleet (3 nodes, one
aggregator unless said, a camera at the bench's rate, local mosquitto).

- broker-restart:  the broker stops cleanly (its store on disk; it delivers every Will as
                   it goes) and starts again 2 s later.
- broker-crash:    the broker is killed without a store (every retained plan, model file
                   and status is gone) and starts again 2 s later.
- aggregator-cut:  the aggregator's link to the broker is cut for 8 s; the nodes' is not.
- nodes-cut:       every node's link is cut for 8 s; the aggregator's is not.
- switch-cut:      a new placement is deployed and one node is cut 0.2 s later, for 6 s.
- failover-broker: the broker stops, the answering aggregator is killed while it is
                   down, and the broker starts again; the standby takes over.
- cluster-switch:  on a 3-node NATS cluster (each service lists every node, starting at
                   its own, and runs with --max-qos 0), a new placement is deployed and
                   the cluster node the aggregator and node-2 are connected to is killed
                   0.2 s later; the camera runs 20 s past the kill.

For each: when answers are whole again (every frame from then on answered, none
degraded), degraded, unanswered and duplicate answers, the plans published, and the plan
the fleet ends on. `expectations` checks them against the fleet's promises: whole within
10 s of the fault's end (a lone degraded answer between whole ones, a deadline missed on a
loaded machine, is counted apart), on the deployed plan, 0 duplicates, every service
still running.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edvit.broker.nats_cluster import NatsCluster, nats_server_path
from edvit.bundle import Bundle
from edvit.errors import ConfigError
from edvit.fleet.chaos.harness import NODES, ChaosFleet
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.schemas import PlanMsg, PredictionMsg

WARM_S = 4.0  # camera running before the fault
AFTER_S = 14.0  # camera running after the fault ends
# On the NATS cluster the camera runs longer after the fault: JetStream's leader elections
# (4-9 s each) may delay answers past AFTER_S, and "whole again" must still be measured.
CLUSTER_AFTER_S = 20.0
WHOLE_WITHIN_S = 10.0


@dataclass(frozen=True)
class Setup:
    """How a scenario's fleet starts."""

    aggregators: tuple[str, ...] = ("agg-a",)
    proxied: tuple[str, ...] = ()  # services behind the cuttable proxy
    persistence: bool = False  # the broker keeps retained messages across restarts


@dataclass(frozen=True)
class Fault:
    start: float
    end: float


def whole_again(
    answers: list[tuple[float, PredictionMsg]], frames: int, fault: Fault
) -> dict[str, Any]:
    """Figures of one camera's answers around a fault.

    `whole_again_s`: from the fault's end to the capture of the first frame from which on
    every frame was answered, and none degraded (0 when answers never stopped being whole;
    None when they never became whole again); `whole_answer_received_s`: to when that
    frame's answer arrived (later, when a standby answers what it held). `settled_again_s`:
    the same, but a lone degraded answer between two whole ones, or after a whole one as the
    stream's last frame, does not count (a node late past the deadline once, as happens on a
    loaded machine, not the fault); those are counted in `lone_degraded_after`.
    `answers_resumed_s`: to the first answer received after the fault's end."""
    first: dict[int, PredictionMsg] = {}
    for _, p in answers:
        first.setdefault(p.seq, p)
    received = {}
    for t, p in answers:
        received.setdefault(p.seq, t)

    def whole(seq: int) -> bool:
        p = first.get(seq)
        return p is not None and not p.degraded

    def lone(seq: int) -> bool:
        p = first.get(seq)
        last = seq == frames - 1
        return p is not None and p.degraded and whole(seq - 1) and (last or whole(seq + 1))

    def run_start(accept: Callable[[int], bool]) -> int:
        start = frames  # the first seq of the run that ends the stream
        for seq in range(frames - 1, -1, -1):
            if not accept(seq):
                break
            start = seq
        return start

    def since_end(seq: int, times: dict[int, float] | None = None) -> float | None:
        if seq >= frames:
            return None
        t = times[seq] if times is not None else first[seq].ts
        return round(max(0.0, t - fault.end), 3)

    clean_from = run_start(whole)
    settled_from = run_start(lambda seq: whole(seq) or lone(seq))
    seqs = [p.seq for _, p in answers]
    resumed = next((t for t, _ in sorted(answers) if t > fault.end), None)
    return {
        "frames": frames,
        "whole_again_s": since_end(clean_from),
        "whole_answer_received_s": since_end(clean_from, received),
        "settled_again_s": since_end(settled_from),
        "lone_degraded_after": sum(1 for seq in range(settled_from, frames) if lone(seq)),
        "answers_resumed_s": None if resumed is None else round(resumed - fault.end, 3),
        "degraded": sum(1 for p in first.values() if p.degraded),
        "unanswered": frames - len(first),
        "duplicates": len(seqs) - len(first),
        # Where to look when answers never became whole again.
        "last_not_whole_seq": None if clean_from == 0 else clean_from - 1,
        "degraded_seqs": sorted(seq for seq, p in first.items() if p.degraded)[-20:],
    }


def plans_published(plans: list[tuple[float, PlanMsg]], since: float) -> list[str]:
    """The plan publications seen after `since`: a plan received again unchanged (the
    retained copy delivered on a reconnect) is not a new publication."""
    published, last = [], None
    for t, plan in plans:
        key = (plan.plan_id, plan.created)
        if t > since and key != last:
            published.append(plan.plan_id)
        last = key
    return published


def _run(
    cf: ChaosFleet, deployed: PlanMsg, camera: str, fault_s: float, what: str,
    begin: Any, end: Any, after_s: float = AFTER_S,
) -> dict[str, Any]:  # fmt: skip
    """Camera on; after WARM_S `begin()` the fault, `fault_s` later `end()` it; the camera
    goes on for `after_s`; figures."""
    frames = int(cf.fps * (WARM_S + fault_s + after_s))
    cf.camera(camera, frames)
    time.sleep(WARM_S)
    start = time.time()
    deployed = begin() or deployed
    time.sleep(max(0.0, start + fault_s - time.time()))
    end()
    fault = Fault(start, time.time())
    cf.wait_answers(camera, frames, after_s + 20)
    time.sleep(1.0)
    obs = cf.observer
    with obs.lock:
        plans = list(obs.plans)
        statuses = list(obs.statuses)
        aggregators = dict(obs.aggregators)
    final_plan = plans[-1][1].plan_id if plans else None
    newest: dict[str, Any] = {}
    for _, node, status in statuses:
        newest[node] = status
    counters: dict[str, int] = {}
    for status in [*newest.values(), *aggregators.values()]:
        for key in ("plans_published", "plans_withheld", "plans_republished",
                    "statuses_out_of_order", "model_refetches", "models_from_kept"):  # fmt: skip
            counters[key] = counters.get(key, 0) + status.counters.get(key, 0)
    # A camera that sent its frames has ended; every other service must still run.
    alive = {
        name: process.poll() is None or (name == camera and process.returncode == 0)
        for name, process in cf.fleet.processes.items()
    }
    return {
        "scenario": what,
        "fault_s": round(fault.end - fault.start, 2),
        **whole_again(obs.of_camera(camera), frames, fault),
        "deployed_plan": deployed.plan_id,
        "final_plan": final_plan,
        "nodes_on_deployed_plan": sorted(
            n
            for n, s in newest.items()
            if n in NODES and s.state == "ready" and s.serving_plan_id == deployed.plan_id
        ),  # fmt: skip
        "plans_published_after_fault": plans_published(plans, fault.start),
        "counters": counters,
        "services_running": all(alive.values()),
        "stopped": sorted(name for name, up in alive.items() if not up),
    }


def scenario_broker_restart(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    return _run(
        cf, base, "cam-restart", 2.0,
        "broker stops cleanly (store kept), starts again 2 s later",
        begin=cf.broker.stop, end=cf.broker.start,
    )  # fmt: skip


def scenario_broker_crash(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    return _run(
        cf, base, "cam-crash", 2.0,
        "broker killed, no store (retained plan and models lost), starts again 2 s later",
        begin=cf.broker.kill, end=cf.broker.start,
    )  # fmt: skip


def _proxy(cf: ChaosFleet) -> Any:
    if cf.proxy is None:
        raise RuntimeError("this scenario needs services behind the proxy")
    return cf.proxy


def _link_cut(cf: ChaosFleet, base: PlanMsg, camera: str, what: str) -> dict[str, Any]:
    """The proxied services' link cut for 8 s: past the keepalive, so their Wills go out."""
    proxy = _proxy(cf)
    return _run(cf, base, camera, 8.0, what, begin=proxy.cut, end=proxy.restore)


def scenario_aggregator_cut(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    return _link_cut(cf, base, "cam-aggcut", "the aggregator's link cut for 8 s, the nodes' not")


def scenario_nodes_cut(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    return _link_cut(
        cf, base, "cam-nodescut", "every node's link cut for 8 s, the aggregator's not"
    )


def scenario_switch_cut(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    proxy = _proxy(cf)

    def switch_and_cut() -> PlanMsg:
        # Every sub-model moves one node on: each node needs a file it did not have.
        rotated = deploy(cf.bundle, cf.broker.url, [*NODES[1:], NODES[0]], cf.topics)
        time.sleep(0.2)
        proxy.cut()
        return rotated

    return _run(
        cf, base, "cam-switchcut", 6.0,
        "a new placement deployed, node-2's link cut 0.2 s later for 6 s",
        begin=switch_and_cut, end=proxy.restore,
    )  # fmt: skip


def scenario_failover_broker(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    def stop_broker_and_aggregator() -> None:
        with cf.observer.lock:
            holder = cf.observer.leases[-1][1] if cf.observer.leases else "agg-a"
        cf.broker.stop()
        cf.kill(holder, signal.SIGKILL)

    return _run(
        cf, base, "cam-failover-broker", 2.0,
        "broker stops (store kept); the answering aggregator is killed meanwhile; broker back",
        begin=stop_broker_and_aggregator, end=cf.broker.start,
    )  # fmt: skip


class ClusterChaosFleet(ChaosFleet):
    """The chaos fleet on a 3-node NATS cluster instead of one mosquitto: every service gets
    every cluster node, starting at its own (`first`), and fails over along the list."""

    FIRST = {"agg-a": 0, "node-0": 1, "node-1": 2, "node-2": 0}
    # QoS 0, as on any NATS cluster (docs/operations/brokers.md): QoS 1 subscriptions and
    # publishes go through JetStream, which stalls while it elects new leaders after losing
    # a node.
    QOS = ("--max-qos", "0")

    def __init__(self, bundle: Bundle, log_dir: Path, fps: float, hold_off_s: float) -> None:
        super().__init__(bundle, log_dir, fps, hold_off_s)
        binary, why_not = nats_server_path()
        if binary is None:
            raise ConfigError(f"the cluster scenario needs nats-server: {why_not}")
        self.cluster = NatsCluster(binary, log_dir / "nats")

    def __enter__(self) -> ClusterChaosFleet:
        self.cluster.start()
        self.fleet = LocalFleet(self.cluster.urls(), self.log_dir, self.topics)
        self.probe = MqttClient(
            unique_client_id("chaos"), Connection(self.cluster.urls(1), max_qos=0)
        )
        self.observer.attach(self.probe)
        self.probe.start(required=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fleet.stop()
        self.probe.stop()
        self.cluster.stop()

    def start(
        self, aggregators: tuple[str, ...] = ("agg-a",), proxied: tuple[str, ...] = ()
    ) -> PlanMsg:
        plan = deploy(self.bundle, self.cluster.urls(), list(NODES), self.topics)
        for node in NODES:
            self.fleet.spawn(node, "node", "--id", node, *self.QOS,
                             broker_url=self.cluster.urls(self.FIRST[node]))  # fmt: skip
        self.fleet.spawn(
            "agg-a", "aggregator", "--id", "agg-a", "--hold-off-s", str(self.hold_off_s),
            *self.QOS, broker_url=self.cluster.urls(self.FIRST["agg-a"]),
        )  # fmt: skip
        self.fleet.wait_ready(plan, timeout=90)
        return plan

    def camera(self, name: str, frames: int) -> None:
        self.fleet.spawn(
            name, "camera", "--id", name, "--source", f"dataset:{self.bundle.manifest.dataset}",
            "--loop", "--count", str(frames), "--fps", str(self.fps), *self.QOS,
            broker_url=self.cluster.urls(1),
        )  # fmt: skip


def scenario_cluster_switch(cf: ChaosFleet, base: PlanMsg) -> dict[str, Any]:
    if not isinstance(cf, ClusterChaosFleet):
        raise RuntimeError("the cluster scenario runs on a ClusterChaosFleet")
    cluster = cf.cluster

    def switch_and_kill() -> PlanMsg:
        rotated = deploy(cf.bundle, cluster.urls(1), [*NODES[1:], NODES[0]], cf.topics)
        time.sleep(0.2)
        cluster.kill(cluster.nodes[0])
        return rotated

    return _run(
        cf, base, "cam-cluster", 0.0,
        "NATS cluster: a new placement deployed, the aggregator's cluster node killed 0.2 s "
        "later",
        begin=switch_and_kill, end=lambda: None, after_s=CLUSTER_AFTER_S,
    )  # fmt: skip


PARTITION_SCENARIOS = {
    "broker-restart": scenario_broker_restart,
    "broker-crash": scenario_broker_crash,
    "aggregator-cut": scenario_aggregator_cut,
    "nodes-cut": scenario_nodes_cut,
    "switch-cut": scenario_switch_cut,
    "failover-broker": scenario_failover_broker,
    "cluster-switch": scenario_cluster_switch,
}

SETUPS = {
    "broker-restart": Setup(persistence=True),
    "aggregator-cut": Setup(proxied=("agg-a",)),
    "nodes-cut": Setup(proxied=NODES),
    "switch-cut": Setup(proxied=(NODES[2],)),
    "failover-broker": Setup(aggregators=("agg-a", "agg-b"), persistence=True),
}


def expectations(result: dict[str, Any]) -> list[str]:
    """What a partition scenario's result breaks of the fleet's promises (empty: none)."""
    broken = []
    settled = result["settled_again_s"]
    if settled is None or settled > WHOLE_WITHIN_S:
        broken.append(f"answers whole again after {settled} s (at most {WHOLE_WITHIN_S:g})")
    if result["final_plan"] != result["deployed_plan"]:
        broken.append(f"ends on plan {result['final_plan']}, not {result['deployed_plan']}")
    if len(result["nodes_on_deployed_plan"]) != len(NODES):
        broken.append(f"only {result['nodes_on_deployed_plan']} serve the deployed plan")
    if result["duplicates"]:
        broken.append(f"{result['duplicates']} frames answered twice")
    if not result["services_running"]:
        broken.append(f"stopped: {result['stopped']}")
    return broken
