"""Edge node agent: loads the models its plan names and publishes one feature vector per
frame per sub-model.

Network callbacks decode, check and prepare each request (once: a frame whose message,
encoding or image header is bad is dropped there and never displaces a camera's good
frame; its pixels are decoded when it is served) and enqueue it; one
worker thread runs inference and the plan follower (edvit/retained.py) builds sessions on
a thread of its own, so neither a slow model nor a large model file stalls the MQTT
network thread. Frames (and, for sliced bundles,
tokens) from all cameras are batched (batcher.py) and run with one ONNX Runtime call per
model per batch (runners.py); when requests arrive faster than the node can serve them, a
camera's waiting request is replaced by its newest one and counted.

On a plan change a batch already taken runs under the plan it was taken under; every batch
taken after the swap runs under the new plan. Each feature vector names its plan. A request
prepared under the old plan is served under the new one when its input is still valid
there (same preprocessing; tokens: the same stem blocks), else dropped and counted.

A node advertises its capacity (memory for model files, relative speed) in its status, for
the planner; it refuses a plan whose model files exceed its memory and keeps serving the
one before.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edvit.errors import BadPayload, ConfigError
from edvit.metrics import STATS_INTERVAL_S, Metrics, StatsPublisher
from edvit.mqtt import (
    Connection,
    MqttClient,
    Transport,
    drop_bad_payload,
    shared_filter,
    unique_client_id,
)
from edvit.preprocess import check_frame, frame_to_model_input
from edvit.replay import PlanSequence
from edvit.retained import Active, PlanFollower
from edvit.schemas import (
    NODE_STRATEGIES,
    Capacity,
    FeaturesMsg,
    FrameMsg,
    NodeStrategy,
    PlanMsg,
    StatusMsg,
    StemRef,
    TokensMsg,
    decode,
    encode,
)
from edvit.service import Worker
from edvit.signing import TrustKey
from edvit.topics import Topics, validate_id

from .batcher import DynamicBatcher
from .runners import IMAGE_ENTRY, Merged, PerEntry, Request, WholeModels

log = logging.getLogger("edvit.node")

Runner = WholeModels | PerEntry | Merged
STEMS_REMEMBERED = 8
# A frame is served on the network thread only while frames arrive at least this many
# serving times apart (see _enqueue), and the average serving time follows this weight.
QUIET_FACTOR = 3.0
SERVE_SMOOTHING = 0.2
BYTES_PER_MB = 1_000_000


def make_runner(plan: PlanMsg, assigned: tuple[str, ...], blobs: dict[str, bytes],
                strategy: NodeStrategy, threads: int) -> Runner:  # fmt: skip
    stem = plan.stem
    if stem is None:
        return WholeModels({sid: blobs[sid] for sid in assigned}, threads)
    tails = {sid: blobs[StemRef.tail_id(sid)] for sid in assigned}
    embed = blobs[StemRef.EMBED_ID]
    if strategy == "per-entry":
        slices = [blobs[StemRef.from_id(i)] for i in range(stem.blocks)]
        return PerEntry(embed, slices, tails, threads)
    return Merged(embed, [blobs[StemRef.block_id(i)] for i in range(stem.blocks)], tails, threads)


def share_group(plan: PlanMsg, assigned: tuple[str, ...]) -> str:
    """The shared-subscription group of every node that runs exactly `assigned` of this
    bundle: replicas (nodes the plan gives the same sub-models) split the frames between
    them. The bundle, not the plan id, names it, so a re-plan that leaves a node's share
    alone leaves its subscription alone too."""
    key = "\n".join((plan.bundle_sha256, *sorted(assigned)))
    return "edvit-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def check_runner(runner: Runner, plan: PlanMsg, assigned: tuple[str, ...]) -> None:
    """Run one blank image through the loaded models: a plan whose preprocessing does not fit
    its models, or whose feature dims are wrong, is refused before anyone switches to it."""
    pp = plan.preprocessing
    blank = Request(IMAGE_ENTRY, np.zeros((pp.channels, pp.height, pp.width), np.float32))
    try:
        features = runner([blank])
    except Exception as exc:  # ORT raises its own types for shape mismatches
        message = str(exc).splitlines()[0]
        raise ConfigError(
            f"the models reject a {pp.height}x{pp.width}x{pp.channels} input: {message}"
        ) from None
    for sid in assigned:
        dim = plan.submodel(sid).feature_dim
        got = features[sid].shape
        if got != (1, dim):
            raise ConfigError(f"sub-model {sid} gives features of shape {got}, the plan says {dim}")


@dataclass(frozen=True)
class Share:
    """What this node runs for one plan: its sub-models and their runner (None: nothing)."""

    assigned: tuple[str, ...]
    runner: Runner | None


@dataclass
class _Pending:
    camera: str
    seq: int
    ts: float
    label: int | None
    # A frame's image is decoded when the frame is served (`frame` until then, `request`
    # after): under overload most frames are replaced by newer ones before that, and
    # decoding them on the network thread is what made it fall behind.
    request: Request | None
    plan: PlanMsg  # the plan it was prepared under
    received_ts: float  # wall clock, when the message came off the wire
    decode_ms: float
    enqueued: float  # monotonic
    topic: str = ""
    frame: FrameMsg | None = None
    size: int = 0  # the message's bytes, for the line that drops it if it turns out bad


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / BYTES_PER_MB
    except (OSError, ValueError, IndexError):
        pass
    return None


def aligns_drops(plan: PlanMsg, node_id: str) -> bool:
    """Whether the node keeps aligned frames when behind (batcher.py): only where other
    nodes compute the rest of a frame. A node with the whole plan keeps each camera's newest
    frame, the freshest answer."""
    return len(plan.submodels_of(node_id)) < len(plan.submodels)


class EdgeNode:
    def __init__(
        self,
        node_id: str,
        broker: str | Connection = "",
        *,
        client: Transport | None = None,
        topics: Topics | None = None,
        threads: int = 1,
        queue_size: int = 64,
        max_batch: int = 4,
        max_wait_ms: float = 1.0,
        newest_only: bool = True,
        batch_wait: str = "adaptive",
        strategy: NodeStrategy = "per-entry",
        memory_mb: float | None = None,
        speed: float = 1.0,
        trust_key: TrustKey | None = None,
        stats_interval_s: float = STATS_INTERVAL_S,
        state_dir: Path | None = None,
    ) -> None:
        try:
            self.node_id = validate_id("node", node_id)
            self._batcher: DynamicBatcher[_Pending] = DynamicBatcher(
                max_batch=max_batch, max_wait_ms=max_wait_ms, capacity=queue_size,
                newest_only=newest_only, adaptive=batch_wait == "adaptive",
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if strategy not in NODE_STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}: choose {', '.join(NODE_STRATEGIES)}")
        self.strategy = strategy
        memory_mb = memory_mb if memory_mb is not None else available_memory_mb()
        try:
            self.capacity = Capacity(memory_mb=memory_mb, speed=speed) if memory_mb else None
        except ValueError as exc:
            raise ConfigError(f"--memory-mb/--speed: {exc}".splitlines()[0]) from None
        self.topics = topics or Topics()
        self.threads = threads
        # A unique client id: two processes started with the same --id must not take each
        # other's session (the broker would disconnect one, which reconnects, and so on).
        self.client = client or MqttClient(
            unique_client_id(f"node-{node_id}"), broker,
            status_topic=self.topics.node_status(node_id), logger=log,
        )  # fmt: skip
        self.counters = self.client.counters
        self.metrics = Metrics(
            "node", self.node_id, self.counters,
            always=("requests_replaced_overload",), batch_sizes=True,
        )  # fmt: skip
        self.metrics.gauge("queue_depth", lambda: len(self._batcher))
        self.stats = StatsPublisher(
            self.metrics, self.client, self.topics.stats("nodes", self.node_id),
            stats_interval_s, log,
        )  # fmt: skip
        self.follower: PlanFollower[Share] = PlanFollower(
            self.client, self.topics, self._model_ids, self._load, check=self._check,
            on_update=self._on_update, logger=log, trust_key=trust_key,
            sequence=PlanSequence(state_dir, log),
        )  # fmt: skip
        # Stem slices of the plans seen lately (plan id -> slice id -> sha256): tokens a camera
        # computed under another plan are served when their blocks are the same files.
        self._stems: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._update_lock = threading.Lock()
        self._request_filters: tuple[str, str] | None = None  # routed frames, tokens
        self._serving = threading.Lock()  # held while a batch is served, on either thread
        self._serve_s = 0.0  # moving average of the time a batch takes to serve
        self._worker = Worker("inference", self._serve_once, self.counters, log)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.client.set_status(StatusMsg(state="online", capacity=self.capacity))
        self.follower.start()
        self._worker.start()
        self.client.start()
        self.stats.start()

    def stop(self) -> None:
        self.stats.stop()
        self._worker.stop()
        self.follower.stop()
        self.client.stop()
        log.info("stopped; counters %s", dict(self.counters))

    # -- plan and models (the follower calls these) ---------------------------------------
    def _model_ids(self, plan: PlanMsg) -> dict[str, str]:
        if plan.stem is not None:
            self._stems[plan.plan_id] = plan.stem.slices
            while len(self._stems) > STEMS_REMEMBERED:
                self._stems.popitem(last=False)
        return plan.node_models(self.node_id, self.strategy)

    def _load(self, plan: PlanMsg, blobs: dict[str, bytes]) -> Share:
        assigned = plan.submodels_of(self.node_id)
        if not assigned:
            log.warning("plan %s assigns nothing to node %s", plan.plan_id, self.node_id)
            return Share(assigned, None)
        need_mb = sum(len(blob) for blob in blobs.values()) / BYTES_PER_MB
        if self.capacity is not None and need_mb > self.capacity.memory_mb:
            raise ConfigError(
                f"its model files need {need_mb:.1f} MB; this node offers "
                f"{self.capacity.memory_mb:.1f} MB (--memory-mb)"
            )
        runner = make_runner(plan, assigned, blobs, self.strategy, self.threads)
        self.counters["model_bytes"] = runner.model_bytes
        log.info("plan %s: serving %s with %d model files (%s)",
                 plan.plan_id, list(assigned), len(blobs), self.strategy)  # fmt: skip
        return Share(assigned, runner)

    @staticmethod
    def _check(plan: PlanMsg, share: Share) -> None:
        if share.runner is not None:
            check_runner(share.runner, plan, share.assigned)

    def _on_update(self) -> None:
        with self._update_lock:
            active, target = self.follower.active, self.follower.target
            serving = active is not None and active.runtime.runner is not None
            self.metrics.plan(active.plan.plan_id if serving and active else None)
            self._route_requests(active.plan if serving and active else None)
            if target is None:
                status = StatusMsg(
                    state="online", error=self.follower.problem, capacity=self.capacity
                )
            else:
                received = self.follower.received()
                ready = self.follower.ready and serving
                status = StatusMsg(
                    state="ready" if ready else "online",
                    plan_id=target.plan_id,
                    submodels=tuple(
                        sid for sid in target.submodels_of(self.node_id)
                        if sid in received or StemRef.tail_id(sid) in received
                    ),
                    serving_plan_id=active.plan.plan_id if serving and active else None,
                    error=self.follower.problem,
                    capacity=self.capacity,
                )  # fmt: skip
            self.client.set_status(status)

    def _route_requests(self, plan: PlanMsg | None) -> None:
        """Subscribe to frames and tokens while serving `plan`: through the share group of
        this node's sub-models when the broker takes shared subscriptions, so replicas split
        the frames; plainly otherwise (each replica then computes every frame, and the
        aggregator keeps the first of each). The new filters are routed before the old ones
        go, so a change of group loses no frame (a frame may arrive twice meanwhile)."""
        filters = None
        if plan is not None:
            frames, tokens = self.topics.all_frames(), self.topics.all_tokens()
            assigned = plan.submodels_of(self.node_id)
            if self.client.shared_subscriptions:
                group = share_group(plan, assigned)
                frames, tokens = shared_filter(group, frames), shared_filter(group, tokens)
            elif any(n != self.node_id and ids == assigned for n, ids in plan.assignments.items()):
                log.warning(
                    "plan %s has replicas of this node, but the broker takes no shared "
                    "subscriptions (MQTT 3.1.1: amqtt, NATS, --mqtt-version 3.1.1): every "
                    "replica computes every frame", plan.plan_id,
                )  # fmt: skip
            filters = (frames, tokens)
        if filters == self._request_filters:
            return
        if filters is not None:
            self.client.route(filters[0], self._on_frame, qos=0)
            self.client.route(filters[1], self._on_tokens, qos=0)
            log.info("taking frames and tokens on %s and %s", *filters)
        if self._request_filters is not None:
            for topic_filter in self._request_filters:
                self.client.unroute(topic_filter)
        self._request_filters = filters

    # -- requests: prepared on the network thread, served by the worker ---------------------
    def _on_frame(self, topic: str, payload: bytes) -> None:
        received_ts, started = time.time(), time.perf_counter()
        message = decode(FrameMsg, payload)
        active = self._accept(topic, message)
        if message is None or active is None:
            return
        check_frame(message)  # a bad frame is refused here and never replaces a good one
        self._enqueue(message, None, active.plan, received_ts, started, topic, len(payload))

    def _on_tokens(self, topic: str, payload: bytes) -> None:
        received_ts, started = time.time(), time.perf_counter()
        message = decode(TokensMsg, payload)
        active = self._accept(topic, message)
        if message is None or active is None:
            return
        request = self._tokens_request(message, active.plan)
        self._enqueue(message, request, active.plan, received_ts, started, topic, len(payload))

    def _accept(self, topic: str, message: FrameMsg | TokensMsg | None) -> Active[Share] | None:
        if message is None:
            return None
        if message.camera != self.topics.parts(topic)[1]:
            raise BadPayload(f"message says camera {message.camera!r} but came on {topic}")
        active = self.follower.active
        if active is None or active.runtime.runner is None:
            self.counters["requests_not_serving"] += 1
            return None
        return active

    def _enqueue(
        self, message: FrameMsg | TokensMsg, request: Request | None, plan: PlanMsg,
        received_ts: float, started: float, topic: str, size: int,
    ) -> None:  # fmt: skip
        now = time.perf_counter()
        self.metrics.frame(message.camera, "received")
        if request is not None:  # tokens: decoded now; a frame's image when it is served
            self.metrics.observe("decode", now - started)
        pending = _Pending(
            message.camera, message.seq, message.ts, message.label, request, plan,
            received_ts=received_ts, decode_ms=(now - started) * 1000.0, enqueued=now,
            topic=topic, frame=message if request is None else None, size=size,
        )  # fmt: skip
        seq = message.seq if aligns_drops(plan, self.node_id) else None
        # An idle node serves a lone request right here, on the network thread: handing it
        # to the inference thread costs a wake-up (0.1-2 ms on a busy board) and batching has
        # nothing to gain from it. Under load requests queue and are batched as before.
        if not self._serving.acquire(blocking=False):
            self._batcher.put(message.camera, pending, seq=seq)  # a batch is being served: queue
            return
        try:
            min_gap_s = QUIET_FACTOR * self._serve_s
            if self._batcher.put_unless_quiet(
                message.camera, pending, min_gap_s=min_gap_s, seq=seq
            ):
                self.counters["requests_served_inline"] += 1
                try:
                    self._serve([pending])
                finally:
                    self._batcher.finished()
        finally:
            self._serving.release()

    def _tokens_request(self, message: TokensMsg, plan: PlanMsg) -> Request:
        stem = plan.stem
        if stem is None:
            raise BadPayload("tokens for a plan without a shared stem")
        if not 1 <= message.block <= stem.blocks:
            raise BadPayload(f"tokens at block {message.block}; the stem has {stem.blocks}")
        if message.shape != stem.token_shape:
            raise BadPayload(f"tokens of shape {message.shape}; the stem's are {stem.token_shape}")
        if message.plan_id is not None and not self._same_stem(
            message.plan_id, plan, message.block
        ):
            # Another stem's tokens would go through this stem's blocks: never mix them.
            raise BadPayload(
                f"tokens computed by plan {message.plan_id}'s stem; serving {plan.plan_id}"
            )
        tokens = np.frombuffer(message.data, dtype=message.dtype).reshape(message.shape)
        return Request(message.block, tokens.astype(np.float32))

    def _same_stem(self, plan_id: str, plan: PlanMsg, block: int) -> bool:
        """Whether plan `plan_id` computes tokens at `block` with the same files as `plan`."""
        if plan_id == plan.plan_id:
            return True
        stem = plan.stem
        theirs = self._stems.get(plan_id, {})
        return stem is not None and all(
            theirs.get(mid) == stem.slices[mid] for mid in stem.head_ids(block)
        )

    def _still_valid(self, pending: _Pending, plan: PlanMsg) -> bool:
        """A request prepared under another plan can be served under `plan` when its input
        means the same there."""
        if pending.plan.plan_id == plan.plan_id:
            return True
        if pending.request is None or pending.request.entry == IMAGE_ENTRY:
            return pending.plan.preprocessing == plan.preprocessing
        return self._same_stem(pending.plan.plan_id, plan, pending.request.entry) and (
            plan.stem is not None and plan.stem.token_shape == pending.request.array.shape
        )

    def _serve_once(self) -> None:
        batch = self._batcher.take(timeout=0.2)
        self.counters["requests_replaced_overload"] = self._batcher.dropped
        if not batch:
            return
        try:
            with self._serving:
                self._serve(batch)
        finally:
            self._batcher.finished()

    def _serve(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            self._serve_batch(batch, started)
        finally:
            took = time.perf_counter() - started
            self._serve_s += SERVE_SMOOTHING * (took - self._serve_s)

    def _serve_batch(self, batch: list[_Pending], serve_started: float) -> None:
        active = self.follower.active
        if active is None or active.runtime.runner is None:
            self.counters["requests_not_serving"] += len(batch)
            return
        valid = [p for p in batch if self._still_valid(p, active.plan)]
        if len(valid) < len(batch):
            self.counters["requests_prepared_for_other_plan"] += len(batch) - len(valid)
        decoded = [p for p in valid if self._decoded(p, active.plan)]
        if decoded:
            self._infer(decoded, active, serve_started)

    def _decoded(self, pending: _Pending, plan: PlanMsg) -> bool:
        """Decode a frame's image into its request; a frame that does not decode is dropped
        and counted as a bad payload, as the network thread counts the others."""
        if pending.request is not None:
            return True
        assert pending.frame is not None
        started = time.perf_counter()
        try:
            image = frame_to_model_input(pending.frame, plan.preprocessing)
        except BadPayload as exc:
            drop_bad_payload(pending.topic, pending.size, exc, self.counters, log)
            return False
        pending.request, pending.frame = Request(IMAGE_ENTRY, image), None
        took = time.perf_counter() - started
        pending.decode_ms += took * 1000.0
        self.metrics.observe("decode", pending.decode_ms / 1000.0)
        return True

    def _infer(self, prepared: list[_Pending], active: Active[Share], serve_started: float) -> None:
        runner = active.runtime.runner
        assert runner is not None
        started = time.perf_counter()
        features = runner([pending.request for pending in prepared])  # type: ignore[misc]
        done = time.perf_counter()
        infer_ms = round((done - started) * 1000.0, 3)
        sent_ts = time.time()
        self.metrics.observe("infer", done - started)
        self.metrics.batch(len(prepared))
        queued_s = [serve_started - pending.enqueued for pending in prepared]
        for pending, queued in zip(prepared, queued_s, strict=True):
            self.metrics.observe("queue", queued)
            self.metrics.frame(pending.camera, "served")
        # Counted before the features go out: whoever sees an answer sees it counted.
        self.counters["frames_served"] += len(prepared)
        self.counters["batches"] += 1
        for submodel_id, vectors in features.items():
            for pending, queued, vector in zip(prepared, queued_s, vectors, strict=True):
                vector = vector.astype(np.float32, copy=False)
                msg = FeaturesMsg(
                    camera=pending.camera,
                    seq=pending.seq,
                    ts=pending.ts,
                    submodel=submodel_id,
                    plan_id=active.plan.plan_id,
                    node=self.node_id,
                    dtype="float32",
                    data=vector.tobytes(),
                    dim=vector.shape[0],
                    infer_ms=infer_ms,
                    batch=len(prepared),
                    label=pending.label,
                    received_ts=pending.received_ts,
                    decode_ms=round(pending.decode_ms, 3),
                    queue_ms=round(queued * 1000.0, 3),
                    sent_ts=sent_ts,
                )
                topic = self.topics.features(pending.camera, submodel_id, self.node_id)
                self.client.publish(topic, encode(msg))
        self.metrics.observe("publish", time.perf_counter() - done)
