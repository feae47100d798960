"""Self-healing placement: when a node goes down, its sub-models move to live nodes that
have room; when it is back and healthy, the deployed placement returns.

The planner runs inside the serving aggregator (`edvit aggregator` starts one; only the
instance holding the aggregator lease plans, so exactly one is active and a standby takes
over with the lease). It watches the retained plan and every node's retained status, and
asks the aggregator which nodes say they serve but send nothing (frozen, cut off).

- The deployed plan (published by `edvit deploy`) is the base. A plan the planner derives
  carries `base_plan_id` and `base_assignments`, so the base survives the planner itself.
- A node is live when its status is not offline and the aggregator does not suspect it.
  A node that was dropped must stay live for `hold_off_s` before it gets work again, so a
  flapping node does not flap the plan.
- Sub-models of nodes that are not live are placed on live nodes with memory left, using
  the placement code (edvit.placement.assignment), largest first; where a moved sub-model
  already runs on a live node it stays there; one that a live replica (a node the deployed
  plan gave the same sub-models) still runs is not moved. What fits nowhere stays unplaced: answers
  lack it (degraded), and the fleet health message says so.
- A new plan goes out (retained) only when the placement changes, at most every
  `min_interval_s`; it has the same bundle, so every model file is already on the broker.
- `{prefix}/fleet/health` (retained) says what the planner sees: live, down, unknown,
  suspect and holding nodes, moved and unplaced sub-models.
- The planner acts only on what it knows. While its own connection is down it plans
  nothing, and a plan is published only on the connection it was decided on (QoS 0,
  `MqttClient.publish_now`): nothing decided before a disconnect goes out after it.
  After a reconnect, for `reconnect_grace_s`, no node is judged down: a node not heard
  from on the new connection (its retained status may have gone with the broker's store)
  is `unknown` and keeps its current work. After the grace, a node that has not
  announced itself again is down. A node whose status turns offline is down once it has
  stayed so for `down_confirm_s` (a broker shutting down delivers every Will just before
  it drops the planner). Statuses are ordered by connection and sequence
  (`schemas.supersedes`), so a late stale status never undoes a Will.
- When the broker comes back without the retained plan, the planner publishes the plan
  the fleet follows again, unchanged (same id and signature).
- Signed plans (edvit/signing.py): given a trust key, the planner follows only plans that
  key signed, so an unsigned plan never becomes the base it heals from (and never gets
  signed by it). A healed plan is signed with the sign key. Without one, in a fleet that
  takes signed plans (a trust key here, or a signed deployed plan), the planner publishes
  nothing - every service would refuse the plan - and says why in the log and in health.
- Plans are ordered (edvit/replay.py): a plan the planner derives has its base's sequence
  + 1, so no follower takes it for a replay of the plan it was derived from, and a plan
  `edvit deploy` publishes later (a larger sequence) wins. Given a trust key, the planner
  ignores a plan older than the newest it followed (the aggregator's, from its state file),
  so it never heals from, nor signs again, a replayed plan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edvit.errors import ConfigError
from edvit.mqtt import Transport
from edvit.placement.assignment import Item, assign
from edvit.placement.devices import Device, Inventory
from edvit.replay import PlanSequence, sequence_of
from edvit.schemas import HealthMsg, PlanMsg, StatusMsg, decode, encode, plan_id_for, supersedes
from edvit.service import Worker
from edvit.signing import PlanSignatureError, SigningKey, TrustKey
from edvit.topics import Topics

log = logging.getLogger("edvit.planner")

Assignments = dict[str, tuple[str, ...]]
# After a reconnect no node is judged down for this long: every client republishes its
# status when it reconnects, and reconnects are retried every 1-5 s (edvit/mqtt.py).
RECONNECT_GRACE_S = 6.0
# On the first connection, time for the retained statuses to arrive after the plan.
STARTUP_SETTLE_S = 1.0
# A node whose status says offline is acted on once it has said so this long with the
# planner connected throughout: a broker shutting down delivers every client's Will just
# before it closes the planner's own connection.
DOWN_CONFIRM_S = 0.5
BYTES_PER_MB = 1_000_000
UNKNOWN_SIZE_MB = 1.0  # a sub-model whose plan does not give its size


def heal(
    base: Assignments,
    current: Assignments,
    live: dict[str, Device],
    sizes_mb: dict[str, float],
    unknown: frozenset[str] = frozenset(),
) -> tuple[Assignments, tuple[str, ...]]:
    """The base placement with every sub-model of a node that is not live moved to a live
    node with room. A node in `unknown` (not heard from yet, or not down for long enough to
    be sure) keeps what the current placement gives it and takes nothing new. Returns the
    placement and the sub-models that fit nowhere (left on their base node)."""
    placed: dict[str, list[str]] = {node: list(base.get(node, ())) for node in live}
    for node in unknown - set(live):
        placed[node] = list(current.get(node, ()))
    # A sub-model that a live replica (a node with the same share) still runs needs no move.
    served = {sid for ids in placed.values() for sid in ids}
    orphans = list(
        dict.fromkeys(
            sid for node, ids in base.items() if node not in live for sid in ids
            if sid not in served
        )
    )  # fmt: skip
    free = {
        node: device.memory_mb - sum(sizes_mb[sid] for sid in placed[node])
        for node, device in live.items()
    }
    # Keep a moved sub-model where the current plan already runs it, if that node is live.
    where_now = {sid: node for node, ids in current.items() for sid in ids}
    left = []
    for sid in orphans:
        node = where_now.get(sid)
        if node in live and free[node] >= sizes_mb[sid]:
            placed[node].append(sid)
            free[node] -= sizes_mb[sid]
        else:
            left.append(sid)
    unplaced: list[str] = []
    # Largest first, each onto the live node where it fits and finishes earliest.
    for sid in sorted(left, key=lambda s: (-sizes_mb[s], s)):
        devices = tuple(
            Device(id=n, memory_mb=free[n], speed=live[n].speed)
            for n in sorted(live)
            if free[n] > 0
        )
        if not devices:
            unplaced.append(sid)
            continue
        try:
            choice = assign([Item(id=sid, memory_mb=sizes_mb[sid], latency_ms=sizes_mb[sid])],
                            Inventory(devices=devices))  # fmt: skip
        except ConfigError:  # Infeasible: no live node has room
            unplaced.append(sid)
            continue
        node = next(n for n, ids in choice.placement.items() if sid in ids)
        placed[node].append(sid)
        free[node] -= sizes_mb[sid]
    # What fits nowhere stays where the deployed plan put it: served again when that node is.
    for node, ids in base.items():
        for sid in ids:
            if sid in unplaced and sid not in placed.get(node, ()):
                placed.setdefault(node, []).append(sid)
    return {n: tuple(ids) for n, ids in placed.items() if ids}, tuple(sorted(unplaced))


class Planner:
    def __init__(
        self,
        client: Transport,
        topics: Topics,
        *,
        instance: str,
        is_active: Callable[[], bool] = lambda: True,
        suspects: Callable[[], set[str]] = set,
        hold_off_s: float = 5.0,
        min_interval_s: float = 0.5,
        tick_s: float = 0.2,
        reconnect_grace_s: float = RECONNECT_GRACE_S,
        down_confirm_s: float = DOWN_CONFIRM_S,
        clock: Callable[[], float] = time.monotonic,
        trust_key: TrustKey | None = None,
        sign_key: SigningKey | None = None,
        sequence: PlanSequence | None = None,
    ) -> None:
        if min(hold_off_s, min_interval_s, reconnect_grace_s, down_confirm_s) < 0 or tick_s <= 0:
            raise ConfigError("planner: hold-off, grace and intervals must not be negative")
        if sign_key is not None and trust_key is not None and sign_key.key_id != trust_key.key_id:
            raise ConfigError(
                f"the sign key ({sign_key.key_id}) is not the trusted key ({trust_key.key_id}): "
                "every service would refuse the plans it signs"
            )
        # Holding the sign key means trusting its public half: never re-sign a foreign plan.
        self._trust = trust_key or (sign_key.trust if sign_key is not None else None)
        self._sign = sign_key
        self._sequence = sequence or PlanSequence(logger=log)
        self._unsigned_logged: Assignments | None = None
        self.client, self.topics, self.instance = client, topics, instance
        self.counters = client.counters
        self._is_active, self._suspects = is_active, suspects
        self.hold_off_s, self.min_interval_s, self.tick_s = hold_off_s, min_interval_s, tick_s
        self.reconnect_grace_s, self.down_confirm_s = reconnect_grace_s, down_confirm_s
        self._clock = clock
        self._lock = threading.Lock()
        self._plan: PlanMsg | None = None
        self._nodes: dict[str, StatusMsg] = {}
        self._up_since: dict[str, float] = {}  # node -> since when it is not offline
        # What was heard on which connection (MqttClient.connection_epoch): after a reconnect,
        # a status or plan heard before it may be gone from the broker, or stale.
        self._heard_on: dict[str, int] = {}  # node -> connection its newest status came on
        self._plan_heard_on: int | None = None
        self._epoch: int | None = None  # the connection the planner last planned on
        self._grace_until = -float("inf")
        self._republished_on: int | None = None
        self._down_since: dict[str, float] = {}  # node -> when it was first seen down
        self._last_publish = -float("inf")
        self._last_health: HealthMsg | None = None
        self._worker = Worker("planner", self.tick, self.counters, log, interval_s=tick_s)

    def start(self) -> None:
        self.client.route(self.topics.plan(), self._on_plan, qos=1)
        self.client.route(self.topics.all_node_statuses(), self._on_status, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    # -- what the planner hears -------------------------------------------------------------
    def _on_plan(self, _topic: str, payload: bytes) -> None:
        plan = decode(PlanMsg, payload)
        if self._trust is not None:
            try:
                if plan is None:
                    raise PlanSignatureError("unsigned (a clear cannot be signed)")
                self._trust.verify(plan)
            except PlanSignatureError as exc:
                self.counters["plan_signatures_refused"] += 1
                log.warning("ignoring plan %s: %s", plan.plan_id if plan else "(cleared)", exc)
                return
            # Counted by the aggregator's plan follower, which refuses it too.
            if (replayed := self._sequence.replayed(plan)) is not None:
                log.warning("ignoring plan %s: %s", plan.plan_id, replayed)
                return
            self._sequence.advance(plan)
        with self._lock:
            self._plan = plan
            self._plan_heard_on = self.client.connection_epoch

    def _on_status(self, topic: str, payload: bytes) -> None:
        node = self.topics.node_of(topic)
        status = decode(StatusMsg, payload)
        now = self._clock()
        with self._lock:
            if not supersedes(status, self._nodes.get(node)):
                self.counters["statuses_out_of_order"] += 1
                log.info("ignoring a status of %s older than the one it replaces", node)
                return
            self._heard_on[node] = self.client.connection_epoch
            if status is None:
                self._nodes.pop(node, None)
            else:
                self._nodes[node] = status
            if status is None or status.state == "offline":
                self._up_since.pop(node, None)
            else:
                self._up_since.setdefault(node, now)

    # -- deciding ---------------------------------------------------------------------------------
    def tick(self) -> PlanMsg | None:
        """One planning step; returns the plan it published, if any."""
        if not self.client.connected:
            return None  # what it knows may be gone from the broker: plan nothing
        now = self._clock()
        epoch = self.client.connection_epoch
        if epoch != self._epoch:
            if self._epoch is None:  # the first connection: the retained statuses are coming
                self._grace_until = now + min(STARTUP_SETTLE_S, self.reconnect_grace_s)
            else:
                self._grace_until = now + self.reconnect_grace_s
                self.counters["planner_reconnects"] += 1
                log.warning(
                    "reconnected to the broker: no node is judged down for %.1f s while "
                    "nodes announce themselves again", self.reconnect_grace_s,
                )  # fmt: skip
            self._epoch = epoch
        # A standby keeps count of its connections too: taking over just after a broker
        # restart, it still gives the nodes their grace.
        if not self._is_active():
            return None
        in_grace = now < self._grace_until
        with self._lock:
            plan, nodes, up_since = self._plan, dict(self._nodes), dict(self._up_since)
            heard_on, plan_heard_on = dict(self._heard_on), self._plan_heard_on
        if plan is None:
            return None
        if (
            not in_grace and plan_heard_on != epoch and self._republished_on != epoch
            and self.client.subscribed(self.topics.plan())
        ):  # fmt: skip
            return self._republish(plan, epoch)
        base = plan.base_assignments if plan.base_assignments is not None else plan.assignments
        base_id = plan.base_plan_id or plan.plan_id
        suspects = self._suspects()
        in_use = {n for n, ids in plan.assignments.items() if ids}
        states: dict[str, str] = {}
        live: dict[str, Device] = {}
        for node in sorted(set(base) | set(nodes)):
            status = nodes.get(node)
            heard = heard_on.get(node) == epoch
            if status is None or status.state == "offline" or node not in up_since or not heard:
                down_since = self._down_since.setdefault(node, now)
                if in_grace or (heard and now - down_since < self.down_confirm_s):
                    states[node] = "unknown"  # not heard since the reconnect, or just gone
                else:
                    states[node] = "down"
                continue
            self._down_since.pop(node, None)
            if node in suspects:
                states[node] = "suspect"
                with self._lock:  # once it answers again, it waits out the hold-off too
                    self._up_since[node] = up_since[node] = now
            elif node not in in_use and now - up_since[node] < self.hold_off_s and node in base:
                states[node] = "holding"  # back, but not yet for long enough
            else:
                states[node] = "live"
                memory = status.capacity.memory_mb if status.capacity else float("inf")
                speed = status.capacity.speed if status.capacity else 1.0
                live[node] = Device(id=node, memory_mb=min(memory, 1e12), speed=speed)
        sizes = {
            s.id: (s.bytes / BYTES_PER_MB if s.bytes is not None else UNKNOWN_SIZE_MB)
            for s in plan.submodels
        }
        unknown = frozenset(n for n, state in states.items() if state == "unknown")
        desired, unplaced = heal(base, plan.assignments, live, sizes, unknown)
        moved = {
            sid: node
            for node, ids in desired.items()
            for sid in ids
            if sid not in base.get(node, ())
        }
        unsigned = self._sign is None and (self._trust is not None or plan.signature is not None)
        if unsigned and desired != _nonempty(plan.assignments):
            # Every service would refuse an unsigned plan: keep the current one, and say so.
            error = "cannot publish a new placement: the fleet takes signed plans and this "
            error += "aggregator has no --sign-key"
            lacking = [sid for n, ids in plan.assignments.items() if n not in live for sid in ids]
            self._publish_health(
                HealthMsg(
                    planner=self.instance, plan_id=plan.plan_id, base_plan_id=base_id,
                    healthy=False, degraded=tuple(sorted(lacking)), nodes=states, error=error,
                )
            )  # fmt: skip
            if self._unsigned_logged != desired:
                self._unsigned_logged = desired
                self.counters["plans_not_signed"] += 1
                log.warning("%s; would re-place as %s", error, desired)
            return None
        self._publish_health(
            HealthMsg(
                planner=self.instance, plan_id=plan.plan_id, base_plan_id=base_id,
                healthy=not moved and not unplaced and desired == _nonempty(base),
                degraded=unplaced, moved=moved, nodes=states,
            )
        )  # fmt: skip
        if desired == _nonempty(plan.assignments) or now - self._last_publish < self.min_interval_s:
            return None
        if desired == _nonempty(base):
            new_plan = plan.model_copy(
                update={"plan_id": base_id, "assignments": base, "base_plan_id": None,
                        "base_assignments": None, "created": time.time()}
            )  # fmt: skip
            log.warning("restoring the deployed placement (plan %s)", base_id)
        else:
            new_plan = plan.model_copy(
                update={"plan_id": plan_id_for(plan.bundle_sha256, desired),
                        "assignments": desired, "base_plan_id": base_id,
                        "base_assignments": base, "created": time.time()}
            )  # fmt: skip
            log.warning(
                "re-placing: %s; moved %s; unplaced %s (plan %s)",
                {n: s for n, s in states.items() if s != "live"}, moved, list(unplaced),
                new_plan.plan_id,
            )  # fmt: skip
        new_plan = new_plan.model_copy(
            update={"key_id": None, "signature": None, "seq": sequence_of(plan) + 1}
        )
        if self._sign is not None:
            new_plan = self._sign.sign(new_plan)
        if not self.client.publish_now(
            self.topics.plan(), encode(new_plan), retain=True, epoch=epoch
        ):
            # The connection it was decided on is gone: decide again on the next one.
            self.counters["plans_withheld"] += 1
            log.warning("plan %s not published: the broker connection was lost", new_plan.plan_id)
            return None
        self._last_publish = now
        self.counters["plans_published"] += 1
        with self._lock:
            self._plan = new_plan
        return new_plan

    def _republish(self, plan: PlanMsg, epoch: int) -> PlanMsg | None:
        """The broker came back without the retained plan (its store was lost): publish the
        plan the fleet follows again, as it is (its id and signature unchanged), so that a
        service starting now finds it. Model files the broker lost stay lost: services that
        need one report it in their status (`error`) until `edvit deploy` runs again."""
        self._republished_on = epoch
        if not self.client.publish_now(self.topics.plan(), encode(plan), retain=True, epoch=epoch):
            return None
        self.counters["plans_republished"] += 1
        log.warning(
            "the broker had no retained plan after the reconnect (its store was lost); "
            "published plan %s again", plan.plan_id,
        )  # fmt: skip
        return plan

    def _publish_health(self, health: HealthMsg) -> None:
        last = self._last_health
        comparable = health.model_copy(update={"ts": 0.0})
        if last is not None and last.model_copy(update={"ts": 0.0}) == comparable:
            return
        if self.client.publish_now(self.topics.fleet_health(), encode(health), retain=True):
            self._last_health = health


def _nonempty(assignments: Assignments) -> Assignments:
    return {n: tuple(ids) for n, ids in assignments.items() if ids}
