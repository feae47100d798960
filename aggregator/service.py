"""Aggregator: joins the feature vectors of one frame across sub-models, runs the fusion
MLP and publishes exactly one prediction per frame.

A frame whose features are not all in after `timeout_ms` is fused with what arrived
(the fusion model takes a presence mask) and published as degraded; features that
arrive for an already answered frame are counted and ignored.

Plan changes lose no frame: features are joined per plan (each feature vector names the
plan it was computed under), for the plan being served, the one before it and the one
being loaded. A frame is answered under the first plan for which all its features are in;
at the deadline, under the plan that has most of them. So during a switch a frame is
answered under the old plan or under the new one, never under a mix, and never twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from edvit.errors import BadPayload, ConfigError
from edvit.inference import Fusion, softmax
from edvit.mqtt import MqttClient, Transport, unique_client_id
from edvit.retained import PlanFollower
from edvit.schemas import (
    FUSION_MODEL_ID,
    FeaturesMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    decode,
    encode,
)
from edvit.topics import Topics

log = logging.getLogger("edvit.aggregator")

FrameKey = tuple[str, int, float]  # camera, seq, capture ts (seq restarts with the camera)
ANSWERED_MEMORY = 4096
PLANS_KEPT = 2  # the plan served and the one before it, so frames in flight finish
# A frame none of whose plans has a loaded fusion yet waits this many deadlines at most.
UNLOADED_WAIT_FACTOR = 10


def load_fusion(plan: PlanMsg, blob: bytes, threads: int = 1) -> Fusion:
    """The plan's fusion MLP, checked against the plan: its inputs take the sub-models'
    feature widths and it gives one logit per class."""
    dims = tuple(s.feature_dim for s in plan.submodels)
    fusion = Fusion(blob, dims, threads)
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
    return fusion


@dataclass
class _Frame:
    first_seen: float
    ts: float
    label: int | None
    by_plan: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


class Aggregator:
    def __init__(
        self,
        broker: str = "",
        *,
        client: Transport | None = None,
        topics: Topics | None = None,
        timeout_ms: float = 1000.0,
        topk: int = 3,
        threads: int = 1,
    ) -> None:
        if timeout_ms <= 0:
            raise ConfigError("--timeout-ms must be positive")
        self.topics = topics or Topics()
        self.timeout_s = timeout_ms / 1000.0
        self.topk = topk
        self.threads = threads
        self.client = client or MqttClient(
            unique_client_id("aggregator"), broker, status_topic=self.topics.aggregator_status(),
            logger=log,
        )  # fmt: skip
        self.counters = self.client.counters
        self.follower: PlanFollower[Fusion] = PlanFollower(
            self.client, self.topics, lambda plan: {FUSION_MODEL_ID: plan.fusion_sha256},
            lambda plan, blobs: load_fusion(plan, blobs[FUSION_MODEL_ID], self.threads),
            on_update=self._on_update, logger=log,
        )  # fmt: skip
        # Plans whose fusion is loaded, newest last: plan id -> (plan, fusion).
        self._fusions: OrderedDict[str, tuple[PlanMsg, Fusion]] = OrderedDict()
        self._pending: dict[FrameKey, _Frame] = {}
        self._answered: OrderedDict[FrameKey, None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="deadlines", daemon=True)

    def start(self) -> None:
        self.client.set_status(StatusMsg(state="online"))
        self.follower.start()
        self.client.route(self.topics.all_features(), self._on_features, qos=0)
        self._sweeper.start()
        self.client.start()

    def stop(self) -> None:
        self._stop.set()
        self.follower.stop()
        self._sweeper.join(timeout=2)
        self.client.stop()
        log.info("stopped; counters %s", dict(self.counters))

    # -- plan and fusion model ------------------------------------------------------------
    def _on_update(self) -> None:
        active, target = self.follower.active, self.follower.target
        with self._lock:
            if active is None:
                self._fusions.clear()
            elif active.plan.plan_id not in self._fusions:
                self._fusions[active.plan.plan_id] = (active.plan, active.runtime)
                while len(self._fusions) > PLANS_KEPT:
                    self._fusions.popitem(last=False)
        self.client.set_status(
            StatusMsg(
                state="ready" if self.follower.ready else "online",
                plan_id=target.plan_id if target else None,
                submodels=tuple(s.id for s in target.submodels) if target else (),
                serving_plan_id=active.plan.plan_id if active else None,
                error=self.follower.refused,
            )
        )

    def _plan_named(self, plan_id: str) -> PlanMsg | None:
        """A plan features may be joined under: one with a fusion loaded, or the one loading."""
        known = self._fusions.get(plan_id)
        if known is not None:
            return known[0]
        target = self.follower.target
        return target if target is not None and target.plan_id == plan_id else None

    # -- features -------------------------------------------------------------------------
    def _on_features(self, topic: str, payload: bytes) -> None:
        msg = decode(FeaturesMsg, payload)
        if msg is None:
            return
        _, camera, submodel_id = self.topics.parts(topic)
        if (msg.camera, msg.submodel) != (camera, submodel_id):
            raise BadPayload(f"features for {msg.camera}/{msg.submodel} came on {topic}")
        with self._lock:
            plan = self._plan_named(msg.plan_id)
            if plan is None:
                self.counters["features_other_plan"] += 1
                return
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
            if key in self._answered:
                self.counters["features_late"] += 1
                return
            frame = self._pending.setdefault(key, _Frame(time.monotonic(), msg.ts, msg.label))
            blocks = frame.by_plan.setdefault(plan.plan_id, {})
            blocks[msg.submodel] = np.frombuffer(msg.data, dtype=msg.dtype).astype(np.float32)
            loaded = self._fusions.get(plan.plan_id)
            if loaded is None or len(blocks) < len(plan.submodels):
                return
            self._close(key)
        self._answer(key, frame, *loaded)

    def _close(self, key: FrameKey) -> None:
        del self._pending[key]
        self._answered[key] = None
        while len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)

    def _choose(self, frame: _Frame, expired: bool) -> tuple[PlanMsg, Fusion] | None:
        """The plan to answer `frame` under now: one with all its features in (any time), or
        at the deadline the loaded one with most features (the newer plan on a tie)."""
        best = None
        for rank, (plan_id, (plan, fusion)) in enumerate(self._fusions.items()):
            got = len(frame.by_plan.get(plan_id, ()))
            if got == len(plan.submodels) or (expired and got > 0):
                score = (got == len(plan.submodels), got, rank)
                if best is None or score > best[0]:
                    best = (score, (plan, fusion))
        return best[1] if best else None

    def _sweep(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self._sweep_once()
            except Exception:  # the sweeper must outlive any bug
                self.counters["sweeper_errors"] += 1
                log.exception("deadline sweep failed")

    def _sweep_once(self) -> None:
        now = time.monotonic()
        due: list[tuple[FrameKey, _Frame, PlanMsg, Fusion]] = []
        with self._lock:
            for key, frame in list(self._pending.items()):
                age = now - frame.first_seen
                chosen = self._choose(frame, expired=age > self.timeout_s)
                if chosen is not None:
                    self._close(key)
                    due.append((key, frame, *chosen))
                elif age > self.timeout_s * UNLOADED_WAIT_FACTOR:
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
        logits = fusion([None if b is None else b[None] for b in blocks])[0]
        probs = softmax(logits)
        order = np.argsort(-probs)[: self.topk]
        label = int(order[0])
        missing = tuple(sid for sid, b in zip(ids, blocks, strict=True) if b is None)
        if missing:
            self.counters["predictions_degraded"] += 1
        prediction = PredictionMsg(
            camera=camera,
            seq=seq,
            ts=ts,
            label=label,
            class_name=plan.classes[label],
            score=round(float(probs[label]), 6),
            topk=tuple((plan.classes[int(i)], round(float(probs[i]), 6)) for i in order),
            latency_ms=round((time.time() - ts) * 1000.0, 3),
            submodels=tuple(sid for sid in ids if sid not in missing),
            missing=missing,
            degraded=bool(missing),
            plan_id=plan.plan_id,
            true_label=frame.label,
        )
        self.client.publish(self.topics.predictions(camera), encode(prediction), qos=1)
        self.counters["predictions"] += 1
