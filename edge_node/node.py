"""Edge node agent: loads the sub-models its plan names and publishes one feature vector
per frame per sub-model.

Network callbacks only decode and enqueue; one worker thread runs inference, so a slow
model never stalls the MQTT keepalive. Frames from all cameras are batched (one ONNX
Runtime call per batch per sub-model, see batcher.py); when frames arrive faster than the
node can serve them, a camera's waiting frame is replaced by its newest one and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edvit.bundle import sha256_bytes
from edvit.errors import BadPayload, ConfigError, IntegrityError
from edvit.inference import FeatureExtractor
from edvit.mqtt import MqttClient
from edvit.preprocess import decode_frame, to_model_input
from edvit.schemas import FeaturesMsg, FrameMsg, ModelMsg, PlanMsg, StatusMsg, decode, encode
from edvit.topics import Topics, validate_id

from .batcher import DynamicBatcher

log = logging.getLogger("edvit.node")


@dataclass
class _Loaded:
    """The plan this node serves and the sub-models it has loaded for it."""

    plan: PlanMsg
    assigned: tuple[str, ...]
    extractors: dict[str, FeatureExtractor] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return set(self.extractors) == set(self.assigned)


class EdgeNode:
    def __init__(
        self,
        node_id: str,
        broker: str,
        *,
        topics: Topics | None = None,
        threads: int = 1,
        queue_size: int = 64,
        max_batch: int = 4,
        max_wait_ms: float = 1.0,
        newest_only: bool = True,
    ) -> None:
        try:
            self.node_id = validate_id("node", node_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self._batcher: DynamicBatcher[FrameMsg] = DynamicBatcher(
                max_batch=max_batch, max_wait_ms=max_wait_ms, capacity=queue_size,
                newest_only=newest_only,
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"node batching: {exc}") from None
        self.topics = topics or Topics()
        self.threads = threads
        self.client = MqttClient(
            f"edvit-node-{node_id}",
            broker,
            status_topic=self.topics.node_status(node_id),
            logger=log,
        )
        self.counters = self.client.counters
        self._state: _Loaded | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="inference", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.client.set_status(StatusMsg(state="online"))
        self.client.route(self.topics.plan(), self._on_plan, qos=1)
        self._worker.start()
        self.client.start()

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)
        self.client.stop()
        log.info("stopped; counters %s", dict(self.counters))

    # -- plan and models ------------------------------------------------------------------
    def _on_plan(self, _topic: str, payload: bytes) -> None:
        plan = decode(PlanMsg, payload)
        with self._lock:
            old = self._state
            if plan is None:
                self._state = None
            else:
                assigned = plan.submodels_of(self.node_id)
                kept = {}
                if old is not None:  # keep models whose bytes did not change
                    kept = {
                        sid: ex
                        for sid, ex in old.extractors.items()
                        if sid in assigned
                        and old.plan.submodel(sid).sha256 == plan.submodel(sid).sha256
                    }
                self._state = _Loaded(plan, assigned, kept)
        old_ids = set(old.assigned) if old else set()
        new_ids = set(self._state.assigned) if self._state else set()
        for sid in old_ids - new_ids:
            self.client.unroute(self.topics.model(sid))
        if plan is None:
            log.info("plan cleared; serving nothing")
            self.client.unroute(self.topics.all_frames())
            self.client.set_status(StatusMsg(state="online"))
            return
        if not new_ids:
            log.warning("plan %s assigns nothing to node %s", plan.plan_id, self.node_id)
        log.info("plan %s: this node serves %s", plan.plan_id, sorted(new_ids) or "nothing")
        for sid in sorted(new_ids):
            self.client.route(self.topics.model(sid), self._on_model, qos=1)
        self._publish_status()

    def _on_model(self, topic: str, payload: bytes) -> None:
        submodel_id = self.topics.parts(topic)[1]
        msg = decode(ModelMsg, payload)
        if msg is None:
            return  # model topic cleared; the plan decides what is served
        with self._lock:
            state = self._state
        if state is None or submodel_id not in state.assigned:
            return
        expected = state.plan.submodel(submodel_id).sha256
        actual = sha256_bytes(msg.onnx)
        if actual != expected or msg.sha256 != expected:
            self.counters["models_refused"] += 1
            raise IntegrityError(
                f"refusing model {submodel_id}: its bytes hash to {actual[:12]}…, "
                f"the plan says {expected[:12]}…"
            )
        try:
            extractor = FeatureExtractor(msg.onnx, self.threads)
        except ConfigError as exc:
            raise BadPayload(f"model {submodel_id}: {exc}") from None
        with self._lock:
            if self._state is not state:
                return  # a newer plan arrived while loading
            state.extractors[submodel_id] = extractor
        log.info("loaded sub-model %s (sha256 %s…)", submodel_id, actual[:12])
        self._publish_status()

    def _publish_status(self) -> None:
        with self._lock:
            state = self._state
            ready = state is not None and state.ready and bool(state.assigned)
        if ready:
            self.client.route(self.topics.all_frames(), self._on_frame, qos=0)
        self.client.set_status(
            StatusMsg(
                state="ready" if ready else "online",
                plan_id=state.plan.plan_id if state else None,
                submodels=tuple(sorted(state.extractors)) if state else (),
            )
        )

    # -- frames -------------------------------------------------------------------------
    def _on_frame(self, topic: str, payload: bytes) -> None:
        frame = decode(FrameMsg, payload)
        if frame is None:
            return
        if frame.camera != self.topics.parts(topic)[1]:
            raise BadPayload(f"frame says camera {frame.camera!r} but came on {topic}")
        self._batcher.put(frame.camera, frame)

    def _serve(self) -> None:
        while not self._stop.is_set():
            frames = self._batcher.take(timeout=0.2)
            self.counters["frames_replaced_overload"] = self._batcher.dropped
            with self._lock:
                state = self._state
            if not frames or state is None or not state.extractors:
                continue
            try:
                self._infer(self._decode(frames, state), state)
            except Exception:
                self.counters["inference_errors"] += 1
                log.exception("inference failed on a batch of %d frames", len(frames))

    def _decode(self, frames: list[FrameMsg], state: _Loaded) -> list[tuple[FrameMsg, np.ndarray]]:
        decoded = []
        for frame in frames:
            try:
                image = to_model_input(decode_frame(frame), state.plan.preprocessing)
            except BadPayload as exc:
                self.counters["bad_payloads"] += 1
                log.warning(
                    "dropped frame %s/%d: %s [bad_payloads=%d]",
                    frame.camera, frame.seq, exc, self.counters["bad_payloads"],
                )  # fmt: skip
                continue
            decoded.append((frame, image))
        return decoded

    def _infer(self, decoded: list[tuple[FrameMsg, np.ndarray]], state: _Loaded) -> None:
        if not decoded:
            return
        batch = np.stack([image for _, image in decoded])
        for submodel_id, extract in sorted(state.extractors.items()):
            started = time.perf_counter()
            features = extract(batch).astype(np.float32, copy=False)
            infer_ms = round((time.perf_counter() - started) * 1000.0, 3)
            for (frame, _), vector in zip(decoded, features, strict=True):
                msg = FeaturesMsg(
                    camera=frame.camera,
                    seq=frame.seq,
                    ts=frame.ts,
                    submodel=submodel_id,
                    plan_id=state.plan.plan_id,
                    node=self.node_id,
                    dtype="float32",
                    data=vector.tobytes(),
                    dim=vector.shape[0],
                    infer_ms=infer_ms,
                    batch=len(decoded),
                    label=frame.label,
                )
                self.client.publish(self.topics.features(frame.camera, submodel_id), encode(msg))
        self.counters["frames_served"] += len(decoded)
        self.counters["batches"] += 1
