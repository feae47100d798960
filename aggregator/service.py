"""Aggregator: joins the feature vectors of one frame across sub-models, runs the fusion
MLP and publishes exactly one prediction per frame.

A frame whose features are not all in after `timeout_ms` is fused with what arrived
(the fusion model takes a presence mask) and published as degraded; features that
arrive for an already answered frame are counted and ignored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from edvit.bundle import sha256_bytes
from edvit.errors import BadPayload, ConfigError, IntegrityError
from edvit.inference import Fusion, softmax
from edvit.mqtt import MqttClient
from edvit.schemas import FeaturesMsg, ModelMsg, PlanMsg, PredictionMsg, StatusMsg, decode, encode
from edvit.topics import Topics

log = logging.getLogger("edvit.aggregator")

FrameKey = tuple[str, int, float]  # camera, seq, capture ts (seq restarts with the camera)
ANSWERED_MEMORY = 4096


@dataclass
class _Pending:
    first_seen: float
    ts: float
    label: int | None
    blocks: dict[str, np.ndarray] = field(default_factory=dict)


class Aggregator:
    def __init__(
        self,
        broker: str,
        *,
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
        self.client = MqttClient(
            "edvit-aggregator", broker, status_topic=self.topics.aggregator_status(), logger=log
        )
        self.counters = self.client.counters
        self._plan: PlanMsg | None = None
        self._fusion: Fusion | None = None
        self._pending: dict[FrameKey, _Pending] = {}
        self._answered: OrderedDict[FrameKey, None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="timeouts", daemon=True)

    def start(self) -> None:
        self.client.set_status(StatusMsg(state="online"))
        self.client.route(self.topics.plan(), self._on_plan, qos=1)
        self.client.route(self.topics.fusion_model(), self._on_fusion, qos=1)
        self.client.route(self.topics.all_features(), self._on_features, qos=0)
        self._sweeper.start()
        self.client.start()

    def stop(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=2)
        self.client.stop()
        log.info("stopped; counters %s", dict(self.counters))

    # -- plan and fusion model ------------------------------------------------------------
    def _on_plan(self, _topic: str, payload: bytes) -> None:
        plan = decode(PlanMsg, payload)
        with self._lock:
            same_fusion = (
                plan is not None
                and self._plan is not None
                and self._plan.fusion_sha256 == plan.fusion_sha256
            )
            self._plan = plan
            if not same_fusion:
                self._fusion = None
            self._pending.clear()
        if plan is None:
            log.info("plan cleared; answering nothing")
        else:
            log.info("plan %s: fusing %s", plan.plan_id, [s.id for s in plan.submodels])
        self._publish_status()
        if plan is not None and not same_fusion:
            # The retained fusion model may have arrived before this plan: ask for it again.
            self.client.unroute(self.topics.fusion_model())
            self.client.route(self.topics.fusion_model(), self._on_fusion, qos=1)

    def _on_fusion(self, _topic: str, payload: bytes) -> None:
        msg = decode(ModelMsg, payload)
        with self._lock:
            plan = self._plan
        if msg is None or plan is None:
            return
        actual = sha256_bytes(msg.onnx)
        if actual != plan.fusion_sha256 or msg.sha256 != plan.fusion_sha256:
            self.counters["models_refused"] += 1
            raise IntegrityError(
                f"refusing fusion model: its bytes hash to {actual[:12]}…, "
                f"the plan says {plan.fusion_sha256[:12]}…"
            )
        dims = tuple(s.feature_dim for s in plan.submodels)
        try:
            fusion = Fusion(msg.onnx, dims, self.threads)
        except ConfigError as exc:
            raise BadPayload(f"fusion model: {exc}") from None
        with self._lock:
            if self._plan is plan:
                self._fusion = fusion
        log.info("loaded fusion model (sha256 %s…)", actual[:12])
        self._publish_status()

    def _publish_status(self) -> None:
        with self._lock:
            plan, ready = self._plan, self._fusion is not None
        self.client.set_status(
            StatusMsg(
                state="ready" if ready else "online",
                plan_id=plan.plan_id if plan else None,
                submodels=tuple(s.id for s in plan.submodels) if plan else (),
            )
        )

    # -- features -------------------------------------------------------------------------
    def _on_features(self, topic: str, payload: bytes) -> None:
        msg = decode(FeaturesMsg, payload)
        if msg is None:
            return
        _, camera, submodel_id = self.topics.parts(topic)
        if (msg.camera, msg.submodel) != (camera, submodel_id):
            raise BadPayload(f"features for {msg.camera}/{msg.submodel} came on {topic}")
        with self._lock:
            plan, fusion = self._plan, self._fusion
            if plan is None or fusion is None:
                self.counters["features_before_ready"] += 1
                return
            if msg.plan_id != plan.plan_id:
                self.counters["features_other_plan"] += 1
                return
            try:
                expected_dim = plan.submodel(msg.submodel).feature_dim
            except KeyError:
                raise BadPayload(f"sub-model {msg.submodel!r} is not in the plan") from None
            if msg.dim != expected_dim:
                raise BadPayload(
                    f"{msg.submodel} features have dim {msg.dim}, plan says {expected_dim}"
                )
            key = (msg.camera, msg.seq, msg.ts)
            if key in self._answered:
                self.counters["features_late"] += 1
                return
            pending = self._pending.setdefault(key, _Pending(time.monotonic(), msg.ts, msg.label))
            pending.blocks[msg.submodel] = np.frombuffer(msg.data, dtype=msg.dtype).astype(
                np.float32
            )
            if len(pending.blocks) < len(plan.submodels):
                return
            del self._pending[key]
            self._remember(key)
        self._answer(key, pending, plan, fusion)

    def _remember(self, key: FrameKey) -> None:
        self._answered[key] = None
        while len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)

    def _sweep(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                plan, fusion = self._plan, self._fusion
                expired = [
                    (key, p)
                    for key, p in self._pending.items()
                    if now - p.first_seen > self.timeout_s
                ]
                for key, _ in expired:
                    del self._pending[key]
                    self._remember(key)
            if plan is None or fusion is None:
                continue
            for key, pending in expired:
                self.counters["predictions_degraded"] += 1
                self._answer(key, pending, plan, fusion)

    def _answer(self, key: FrameKey, pending: _Pending, plan: PlanMsg, fusion: Fusion) -> None:
        camera, seq, ts = key
        ids = [s.id for s in plan.submodels]
        blocks = [pending.blocks.get(sid) for sid in ids]
        logits = fusion([None if b is None else b[None] for b in blocks])[0]
        probs = softmax(logits)
        order = np.argsort(-probs)[: self.topk]
        label = int(order[0])
        missing = tuple(sid for sid, b in zip(ids, blocks, strict=True) if b is None)
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
            true_label=pending.label,
        )
        self.client.publish(self.topics.predictions(camera), encode(prediction), qos=1)
        self.counters["predictions"] += 1
