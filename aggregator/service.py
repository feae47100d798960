"""Aggregator: joins the feature vectors of one frame across sub-models, runs the fusion
MLP and publishes exactly one prediction per frame.

A frame whose features are not all in by its deadline is fused with what arrived (the
fusion model takes a presence mask) and published as degraded; features that
arrive for an already answered frame are counted and ignored.

Plan changes lose no frame: features are joined per plan (each feature vector names the
plan it was computed under), for the plan being served, the one before it and the one
being loaded. A frame is answered under the first plan for which all its features are in;
at the deadline, under the plan that has most of them. So during a switch a frame is
answered under the old plan or under the new one, never under a mix, and never twice.

Status-aware fusion: the aggregator follows every node's retained status. A sub-model
whose node is offline, or not serving the frame's plan, is not waited for: a frame is
answered as soon as the features of every sub-model being served are in. A node that says
it serves but sends nothing (frozen, cut off before its keepalive runs out) costs each
frame at most the adaptive deadline, a multiple of the recent feature arrival spread
between a floor and a cap; after `SUSPECT_AFTER` such misses in a row, with nothing at
all from that node for `SUSPECT_AFTER` times the longer of the deadline and its longest
recent gap between features (of its last `FEATURE_GAPS_KEPT`), its sub-models are no longer
waited for either, until it sends features or a fresh status again. The silence is what
tells a stopped node from an overloaded one: a node that is behind skips frames (the ones
the others skip too, edge_node/batcher.py) but keeps sending features for those it serves,
at its own pace, and suspecting it would move its work to nodes that are as busy.

Several aggregators may run: a lease (edvit/lease.py) picks the one that answers; the
others follow the same features as a standby, drop what they see answered, and on taking
over answer what the old one left. With `--shard i/n` an aggregator answers only the
cameras whose id hashes to shard i (crc32 mod n), drops other cameras' features before
decoding them (counted, `features_other_shard`) and holds a lease of its shard's own.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edvit.aggregator.ha import HaDiscovery
from edvit.errors import BadPayload, ConfigError
from edvit.identity import HostSlot
from edvit.inference import Fusion, softmax
from edvit.lease import Lease
from edvit.metrics import STATS_INTERVAL_S, Metrics, StatsPublisher
from edvit.mqtt import Connection, MqttClient, Transport, unique_client_id
from edvit.replay import PlanSequence
from edvit.retained import PlanFollower
from edvit.schemas import (
    FUSION_MODEL_ID,
    FeaturesMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    decode,
    encode,
    supersedes,
)
from edvit.service import Worker
from edvit.signing import TrustKey
from edvit.topics import Topics, validate_id

log = logging.getLogger("edvit.aggregator")

FrameKey = tuple[str, int, float]  # camera, seq, capture ts (seq restarts with the camera)
ANSWERED_MEMORY = 4096
PLANS_KEPT = 2  # the plan served and the one before it, so frames in flight finish
# A frame none of whose plans has a loaded fusion yet waits this long at most.
UNLOADED_WAIT_S = 5.0
# Deadline misses in a row after which a serving node's sub-model is not waited for.
SUSPECT_AFTER = 3
FEATURE_GAPS_KEPT = 32  # per node, for its longest recent gap between features
# A standby keeps frames this long past the lease ttl, to answer them if it takes over.
STANDBY_KEEP_S = 2.0


@dataclass(frozen=True)
class Shard:
    """`--shard i/n`: this aggregator answers only the cameras whose id hashes to i of n."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
        if not 0 <= index < count:
            raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
        return cls(index, count)

    def owns(self, camera: str) -> bool:
        # crc32, not hash(): the same on every machine and in every process.
        return zlib.crc32(camera.encode()) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}-of-{self.count}"


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long a frame waits for a live sub-model's features, measured from its first
    feature vector: `factor` x the `percentile` of the recent arrival spreads (first to
    last feature of complete frames), within [floor_s, cap_s]; the cap until
    `min_samples` spreads are known."""

    floor_s: float = 0.02
    cap_s: float = 0.25
    factor: float = 4.0
    percentile: float = 95.0
    window: int = 256
    min_samples: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.cap_s:
            raise ConfigError("deadline: need 0 < floor <= cap")
        if self.factor <= 0 or not 0 < self.percentile <= 100:
            raise ConfigError("deadline: factor must be positive, percentile in (0, 100]")


class ArrivalDeadline:
    def __init__(self, policy: DeadlinePolicy) -> None:
        self.policy = policy
        self._spreads: deque[float] = deque(maxlen=policy.window)
        self._current = policy.cap_s
        self._since_update = 0

    def observe(self, spread_s: float) -> None:
        self._spreads.append(spread_s)
        self._since_update += 1
        if self._since_update >= 8 and len(self._spreads) >= self.policy.min_samples:
            self._since_update = 0
            p = self.policy
            measured = float(np.percentile(self._spreads, p.percentile)) * p.factor
            self._current = min(max(measured, p.floor_s), p.cap_s)

    @property
    def seconds(self) -> float:
        return self._current


def check_fusion(plan: PlanMsg, fusion: Fusion) -> None:
    """Whether a fusion MLP fits the plan: its inputs take the sub-models' feature widths
    and it gives one logit per class (ConfigError otherwise)."""
    dims = tuple(s.feature_dim for s in plan.submodels)
    if dims != fusion.feature_dims:
        raise ConfigError(f"the plan's feature widths {dims} are not the fusion's")
    try:
        logits = fusion([np.zeros((1, d), np.float32) for d in dims])
    except Exception as exc:  # ORT raises its own types for shape mismatches
        message = str(exc).splitlines()[0]
        raise ConfigError(
            f"the fusion model rejects features of widths {dims}: {message}"
        ) from None
    if logits.shape != (1, len(plan.classes)):
        raise ConfigError(
            f"the fusion model gives {logits.shape[-1]} logits, "
            f"the plan has {len(plan.classes)} classes"
        )


@dataclass
class _Frame:
    first_seen: float
    ts: float
    label: int | None
    by_plan: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # The features that came last (wall clock on arrival): the path the timings describe.
    last: tuple[float, FeaturesMsg] | None = None


def stage_timings(
    frame: _Frame, fusion_started: float, answered: float, fusion_ms: float
) -> dict[str, float]:
    """PredictionMsg.timings (ms, schemas.STAGES) along the path of the last features to
    arrive; wall clocks of two machines meet in to_node and to_aggregator, so each stage is
    floored at 0 and `other` is the rest of the latency."""
    if frame.last is None:
        return {}
    arrived, msg = frame.last
    stages: dict[str, float] = {}
    if msg.received_ts is not None:
        stages["to_node"] = (msg.received_ts - frame.ts) * 1000.0
    if msg.decode_ms is not None:
        stages["decode"] = msg.decode_ms
    if msg.queue_ms is not None:
        stages["queue"] = msg.queue_ms
    stages["infer"] = msg.infer_ms
    if msg.sent_ts is not None:
        stages["to_aggregator"] = (arrived - msg.sent_ts) * 1000.0
    stages["wait"] = (fusion_started - arrived) * 1000.0
    stages["fusion"] = fusion_ms
    stages = {name: max(0.0, value) for name, value in stages.items()}
    stages["other"] = max(0.0, (answered - frame.ts) * 1000.0 - sum(stages.values()))
    return {name: round(value, 3) for name, value in stages.items()}


def same_features(a: PlanMsg, b: PlanMsg) -> bool:
    """Whether two plans' nodes compute the same feature vectors for a frame."""
    return a.preprocessing == b.preprocessing and [
        (s.id, s.sha256, s.feature_dim) for s in a.submodels
    ] == [(s.id, s.sha256, s.feature_dim) for s in b.submodels]


def serves(status: StatusMsg | None, plan_id: str) -> bool:
    """Whether a node with this status is serving the plan now."""
    if status is None or status.state == "offline":
        return False
    if status.serving_plan_id is not None:
        return status.serving_plan_id == plan_id
    return status.state == "ready" and status.plan_id == plan_id  # nodes before v1 additions


class Aggregator:
    def __init__(
        self,
        broker: str | Connection = "",
        *,
        client: Transport | None = None,
        topics: Topics | None = None,
        deadline: DeadlinePolicy | None = None,
        topk: int = 3,
        threads: int = 1,
        instance: str | None = None,
        lease_ttl_s: float = 3.0,
        trust_key: TrustKey | None = None,
        ha_prefix: str | None = None,
        stats_interval_s: float = STATS_INTERVAL_S,
        shard: Shard | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.topics = topics or Topics()
        self.shard = shard
        self.deadline = ArrivalDeadline(deadline or DeadlinePolicy())
        self.topk = topk
        self.threads = threads
        # Without an id: HOST-N, the same after a restart (edvit/identity.py).
        self._slot: HostSlot | None = None
        if not instance:
            self._slot = HostSlot(f"aggregator-{shard}" if shard else "aggregator")
            instance = self._slot.id
        try:
            self.instance = validate_id("aggregator", instance)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.client = client or MqttClient(
            unique_client_id("aggregator"), broker,
            status_topic=self.topics.aggregator_instance_status(self.instance),
            will_topic=self.topics.aggregator_status(), logger=log,
        )  # fmt: skip
        self.counters = self.client.counters
        self.metrics = Metrics(
            "aggregator", self.instance, self.counters,
            always=("features_late", "nodes_suspected"),
        )  # fmt: skip
        self.metrics.gauge("pending_frames", lambda: len(self._pending))
        self.stats = StatsPublisher(
            self.metrics, self.client, self.topics.stats("aggregators", self.instance),
            stats_interval_s, log,
        )  # fmt: skip
        # Home Assistant discovery (aggregator/ha.py), when given its discovery prefix.
        self.ha = None if ha_prefix is None else HaDiscovery(self.client, self.topics, ha_prefix)
        self.follower: PlanFollower[Fusion] = PlanFollower(
            self.client, self.topics, lambda plan: {FUSION_MODEL_ID: plan.fusion_sha256},
            lambda plan, blobs: Fusion(
                blobs[FUSION_MODEL_ID], tuple(s.feature_dim for s in plan.submodels),
                self.threads,
            ),
            check=check_fusion, on_update=self._on_update, logger=log, trust_key=trust_key,
            sequence=PlanSequence(state_dir, log),
        )  # fmt: skip
        # Plans whose fusion is loaded, newest last: plan id -> (plan, fusion).
        self._fusions: OrderedDict[str, tuple[PlanMsg, Fusion]] = OrderedDict()
        self._pending: dict[FrameKey, _Frame] = {}
        self._answered: OrderedDict[FrameKey, None] = OrderedDict()
        self._nodes: dict[str, StatusMsg] = {}
        self._misses: Counter[tuple[str, str]] = Counter()  # (node, sub-model) in a row
        self._suspects: dict[str, float] = {}  # node -> when it was suspected (monotonic)
        self._last_features: dict[str, float] = {}  # node -> its newest features (monotonic)
        self._feature_gaps: dict[str, deque[float]] = {}  # node -> its recent gaps between them
        self._started = time.monotonic()
        self.lease = Lease(
            self.client, self.topics.aggregator_lease(str(shard) if shard else None),
            self.instance, ttl_s=lease_ttl_s,
            on_change=self._on_lease, logger=log,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._sweeper = Worker("sweeper", self._sweep_once, self.counters, log, interval_s=0.02)

    def start(self) -> None:
        self.client.set_status(StatusMsg(state="online"))
        self.follower.start()
        self.client.route(self.topics.all_node_statuses(), self._on_node_status, qos=1)
        self.client.route(self.topics.all_features(), self._on_features, qos=0)
        self.client.route(self.topics.all_legacy_features(), self._on_features, qos=0)
        self.client.route(self.topics.all_predictions(), self._on_prediction, qos=1)
        self.client.route(self.topics.aggregator_status(), self._on_shared_status, qos=1)
        self._sweeper.start()
        self.client.start()
        self.lease.start()
        self.stats.start()

    def stop(self) -> None:
        self.stats.stop()
        self._sweeper.stop()
        self.lease.stop()
        self.follower.stop()
        self.client.stop()
        if self._slot is not None:
            self._slot.release()
        log.info("stopped; counters %s", dict(self.counters))

    # -- plan and fusion model ------------------------------------------------------------
    def _on_update(self) -> None:
        active = self.follower.active
        self.metrics.plan(active.plan.plan_id if active else None)
        with self._lock:
            if active is None:
                self._fusions.clear()
            else:
                known = self._fusions.get(active.plan.plan_id)
                # A plan published again under the same id may differ (its assignments):
                # keep the one served now, which the features' ownership is checked against.
                if known is None or known[0] != active.plan:
                    self._fusions[active.plan.plan_id] = (active.plan, active.runtime)
                    self._fusions.move_to_end(active.plan.plan_id)
                while len(self._fusions) > PLANS_KEPT:
                    self._fusions.popitem(last=False)
        self._publish_status()

    def _publish_status(self) -> None:
        active, target = self.follower.active, self.follower.target
        self.client.set_status(
            StatusMsg(
                state="ready" if self.follower.ready else "online",
                plan_id=target.plan_id if target else None,
                submodels=tuple(s.id for s in target.submodels) if target else (),
                serving_plan_id=active.plan.plan_id if active else None,
                error=self.follower.problem,
            )
        )

    # -- leadership -------------------------------------------------------------------------
    @property
    def answering(self) -> bool:
        return self.lease.held

    def _on_lease(self, held: bool) -> None:
        log.info("aggregator %s %s", self.instance, "answers now" if held else "is a standby")
        self.client.mirror_status(self.topics.aggregator_status() if held else None)
        # Only a standby needs to see the answers (to drop what is answered): the one that
        # answers would receive every prediction it publishes back from the broker.
        if held:
            self.client.unroute(self.topics.all_predictions(), self._on_prediction)
        else:
            self.client.route(self.topics.all_predictions(), self._on_prediction, qos=1)

    def _on_shared_status(self, _topic: str, payload: bytes) -> None:
        status = decode(StatusMsg, payload)
        if self.lease.held and (status is None or status.state == "offline"):
            self._publish_status()  # another instance's Will: the serving one is still here

    def _on_prediction(self, _topic: str, payload: bytes) -> None:
        if self.lease.held:
            return  # our own answers
        prediction = decode(PredictionMsg, payload)
        if prediction is None:
            return
        key = (prediction.camera, prediction.seq, prediction.ts)
        with self._lock:
            if key in self._pending:
                self._close(key)

    # -- node statuses and suspects --------------------------------------------------------
    def _on_node_status(self, topic: str, payload: bytes) -> None:
        node = self.topics.node_of(topic)
        status = decode(StatusMsg, payload)
        with self._lock:
            if not supersedes(status, self._nodes.get(node)):
                self.counters["statuses_out_of_order"] += 1
                return  # an older status delivered late (schemas.supersedes)
            if status is None:
                self._nodes.pop(node, None)
            else:
                self._nodes[node] = status
            suspected = self._suspects.get(node)
            if suspected is not None and time.monotonic() - suspected > 1.0:
                self._clear_suspect(node, "it published a status")

    def _clear_suspect(self, node: str, why: str) -> None:
        if self._suspects.pop(node, None) is not None:
            log.info("node %s is answering again (%s)", node, why)
        for pair in [p for p in self._misses if p[0] == node]:
            del self._misses[pair]

    def suspect_nodes(self) -> set[str]:
        """Nodes that say they serve but whose features stopped coming."""
        with self._lock:
            return set(self._suspects)

    def _expected(self, plan: PlanMsg) -> set[str]:
        """The plan's sub-models whose features may come: their node serves the plan and is
        not suspected of having stopped."""
        return {
            sid
            for node, ids in plan.assignments.items()
            if node not in self._suspects and serves(self._nodes.get(node), plan.plan_id)
            for sid in ids
        }

    def _enough(self, plan: PlanMsg, got: dict[str, np.ndarray]) -> bool:
        """Every sub-model being served has sent its features (and some are served)."""
        expected = self._expected(plan)
        return bool(expected) and expected <= set(got)

    def _note_alive(self, node: str, now: float) -> None:
        last = self._last_features.get(node)
        if last is not None:
            self._feature_gaps.setdefault(node, deque(maxlen=FEATURE_GAPS_KEPT)).append(now - last)
        self._last_features[node] = now

    def _count_misses(self, plan: PlanMsg, got: dict[str, np.ndarray], deadline_s: float) -> None:
        """After a frame was answered at its deadline: which serving nodes sent nothing."""
        now = time.monotonic()
        for node, ids in plan.assignments.items():
            if node in self._suspects or not serves(self._nodes.get(node), plan.plan_id):
                continue
            silent_s = now - self._last_features.get(node, self._started)
            gaps = self._feature_gaps.get(node)
            longest_gap_s = max(gaps) if gaps else 0.0
            for sid in ids:
                if sid in got:
                    continue
                self._misses[(node, sid)] += 1
                if self._misses[(node, sid)] >= SUSPECT_AFTER and (
                    silent_s >= SUSPECT_AFTER * max(deadline_s, longest_gap_s)
                ):
                    self._suspects[node] = now
                    self.counters["nodes_suspected"] += 1
                    log.warning(
                        "node %s says it serves %s but sent nothing for %d frames (%.0f ms); "
                        "not waiting for it until it answers again",
                        node, sid, self._misses[(node, sid)], silent_s * 1000,
                    )  # fmt: skip

    def _assigned(self, plan_id: str, node: str, submodel_id: str) -> bool:
        """Whether the plan `plan_id` (loaded, or the target) has `node` serving the sub-model."""
        # The newest plan of that id first (the follower's target, loaded or refused): the
        # nodes follow it; a kept copy under the same id may be an older publication.
        candidates = [self.follower.target, self._fusions.get(plan_id, (None,))[0]]
        plan = next((p for p in candidates if p is not None and p.plan_id == plan_id), None)
        return plan is not None and submodel_id in plan.assignments.get(node, ())

    def _plan_named(self, plan_id: str) -> PlanMsg | None:
        """The plan features computed under `plan_id` are joined under: that plan when its
        fusion is loaded or loading; for a plan this aggregator refused but nodes serve,
        a loaded plan whose features are the same numbers (same sub-model files, widths and
        preprocessing), so that no frame is lost to a plan only the aggregator refused."""
        known = self._fusions.get(plan_id)
        if known is not None:
            return known[0]
        target = self.follower.target
        if target is None or target.plan_id != plan_id:
            return None
        if self.follower.refused is None:
            return target
        same = [plan for plan, _ in self._fusions.values() if same_features(plan, target)]
        return same[-1] if same else None

    # -- features -------------------------------------------------------------------------
    def _on_features(self, topic: str, payload: bytes) -> None:
        # features/{camera}/{sub-model}/{node}; without the node level from older nodes.
        parts = self.topics.parts(topic)
        if self.shard is not None and not self.shard.owns(parts[1]):
            self.counters["features_other_shard"] += 1  # before decoding: another shard's
            return
        msg = decode(FeaturesMsg, payload)
        if msg is None:
            return
        topic_node = parts[3] if len(parts) == 4 else msg.node
        if (msg.camera, msg.submodel, msg.node) != (parts[1], parts[2], topic_node):
            raise BadPayload(
                f"features for {msg.camera}/{msg.submodel} from {msg.node} came on {topic}"
            )
        with self._lock:
            plan = self._plan_named(msg.plan_id)
            if plan is None:
                self.counters["features_other_plan"] += 1
                return
            if not self._assigned(msg.plan_id, msg.node, msg.submodel):
                # A node may only speak for what its plan gave it: otherwise any node (or
                # anyone with a node's password) could answer for, and get suspected, others.
                raise BadPayload(
                    f"{msg.node} sent {msg.submodel} features, but plan {msg.plan_id} does "
                    f"not assign {msg.submodel} to {msg.node}"
                )
            try:
                expected_dim = plan.submodel(msg.submodel).feature_dim
            except KeyError:
                raise BadPayload(
                    f"sub-model {msg.submodel!r} is not in plan {plan.plan_id}"
                ) from None
            if msg.dim != expected_dim:
                raise BadPayload(
                    f"{msg.submodel} features have dim {msg.dim}, plan says {expected_dim}"
                )
            key = (msg.camera, msg.seq, msg.ts)
            now = time.monotonic()
            self._note_alive(msg.node, now)  # late or not
            if key in self._answered:
                self.counters["features_late"] += 1
                return
            if msg.node in self._suspects:
                self._clear_suspect(msg.node, "its features arrive")
            self._misses.pop((msg.node, msg.submodel), None)
            frame = self._pending.setdefault(key, _Frame(now, msg.ts, msg.label))
            blocks = frame.by_plan.setdefault(plan.plan_id, {})
            blocks[msg.submodel] = np.frombuffer(msg.data, dtype=msg.dtype).astype(np.float32)
            frame.last = (time.time(), msg)
            if len(blocks) == len(plan.submodels):
                self.deadline.observe(now - frame.first_seen)
            loaded = self._fusions.get(plan.plan_id)
            if loaded is None or not self.lease.held:
                return
            if len(blocks) < len(plan.submodels) and not self._enough(plan, blocks):
                return
            self._close(key)
        self._answer(key, frame, *loaded)

    def _close(self, key: FrameKey) -> None:
        del self._pending[key]
        self._answered[key] = None
        while len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)

    def _choose(self, frame: _Frame, expired: bool) -> tuple[PlanMsg, Fusion] | None:
        """The plan to answer `frame` under now: one for which every sub-model being served
        has sent its features (any time), or at the deadline the loaded one with most
        features (the newer plan on a tie)."""
        best = None
        for rank, (plan_id, (plan, fusion)) in enumerate(self._fusions.items()):
            got = frame.by_plan.get(plan_id, {})
            if not got:
                continue
            complete = len(got) == len(plan.submodels)
            enough = complete or self._enough(plan, got)
            if enough or expired:
                score = (complete, enough, len(got), rank)
                if best is None or score > best[0]:
                    best = (score, (plan, fusion))
        return best[1] if best else None

    def _sweep_once(self) -> None:
        now = time.monotonic()
        deadline = self.deadline.seconds
        answering = self.lease.held
        due: list[tuple[FrameKey, _Frame, PlanMsg, Fusion]] = []
        with self._lock:
            for key, frame in list(self._pending.items()):
                age = now - frame.first_seen
                if not answering:
                    if age > self.lease.ttl_s + STANDBY_KEEP_S:
                        self._close(key)  # the serving aggregator had it
                    continue
                expired = age > deadline
                chosen = self._choose(frame, expired)
                if chosen is not None:
                    self._close(key)
                    due.append((key, frame, *chosen))
                    if expired:
                        plan = chosen[0]
                        got = frame.by_plan.get(plan.plan_id, {})
                        self._count_misses(plan, got, deadline)
                elif age > UNLOADED_WAIT_S:
                    self._close(key)
                    self.counters["frames_unanswerable"] += 1
                    log.warning("no fusion loaded for %s/%d's plan; dropped", key[0], key[1])
        for key, frame, plan, fusion in due:
            self._answer(key, frame, plan, fusion)

    def _answer(self, key: FrameKey, frame: _Frame, plan: PlanMsg, fusion: Fusion) -> None:
        camera, seq, ts = key
        ids = [s.id for s in plan.submodels]
        got = frame.by_plan.get(plan.plan_id, {})
        blocks = [got.get(sid) for sid in ids]
        fusion_started, started = time.time(), time.perf_counter()
        logits = fusion([None if b is None else b[None] for b in blocks])[0]
        fusion_s = time.perf_counter() - started
        fusion_ms = fusion_s * 1000.0
        self.metrics.observe("fusion", fusion_s)
        self.metrics.observe("join_wait", time.monotonic() - frame.first_seen)
        probs = softmax(logits)
        if not np.isfinite(probs).all():  # features within limits make this unreachable
            self.counters["fusion_not_finite"] += 1
            log.warning("fusion gave non-finite scores for %s/%d; not answered", camera, seq)
            return
        order = np.argsort(-probs)[: self.topk]
        label = int(order[0])
        missing = tuple(sid for sid, b in zip(ids, blocks, strict=True) if b is None)
        self.metrics.frame(camera, "degraded" if missing else "answered")
        if missing:
            self.counters["predictions_degraded"] += 1
            for sid in missing:
                self.counters[f"degraded_missing_{sid}"] += 1
        answered = time.time()
        prediction = PredictionMsg(
            camera=camera,
            seq=seq,
            ts=ts,
            label=label,
            class_name=plan.classes[label],
            score=round(float(probs[label]), 6),
            topk=tuple((plan.classes[int(i)], round(float(probs[i]), 6)) for i in order),
            latency_ms=round((answered - ts) * 1000.0, 3),
            submodels=tuple(sid for sid in ids if sid not in missing),
            missing=missing,
            degraded=bool(missing),
            plan_id=plan.plan_id,
            true_label=frame.label,
            timings=stage_timings(frame, fusion_started, answered, fusion_ms),
            untrained=plan.untrained,
        )
        payload = encode(prediction)
        self.client.publish(self.topics.predictions(camera), payload, qos=1)
        self.counters["predictions"] += 1
        if self.ha is not None:
            self.ha.answered(prediction, payload, plan)  # its retained state, for HA
