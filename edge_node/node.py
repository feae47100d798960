"""Edge node agent: loads the models its plan names and publishes one feature vector per
frame per sub-model.

Network callbacks only decode and enqueue; one worker thread runs inference, so a slow
model never stalls the MQTT keepalive. Frames (and, for sliced bundles, tokens) from all
cameras are batched (batcher.py) and run with one ONNX Runtime call per model per batch
(runners.py); when requests arrive faster than the node can serve them, a camera's
waiting request is replaced by its newest one and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edvit.bundle import sha256_bytes
from edvit.errors import BadPayload, ConfigError, IntegrityError
from edvit.mqtt import MqttClient
from edvit.preprocess import decode_frame, to_model_input
from edvit.schemas import (
    FeaturesMsg,
    FrameMsg,
    ModelMsg,
    PlanMsg,
    StatusMsg,
    StemRef,
    TokensMsg,
    decode,
    encode,
)
from edvit.topics import Topics, validate_id

from .batcher import DynamicBatcher
from .runners import IMAGE_ENTRY, Merged, PerEntry, Request, WholeModels

log = logging.getLogger("edvit.node")

Strategy = Literal["per-entry", "merged"]
STRATEGIES: tuple[Strategy, ...] = ("per-entry", "merged")
Runner = WholeModels | PerEntry | Merged


def required_models(plan: PlanMsg, node_id: str, strategy: Strategy) -> dict[str, str]:
    """Model id -> sha256 of every ONNX file this node needs for its share of the plan."""
    assigned = plan.submodels_of(node_id)
    if not assigned:
        return {}
    stem = plan.stem
    if stem is None:
        return {sid: plan.submodel(sid).sha256 for sid in assigned}
    per_block = StemRef.from_id if strategy == "per-entry" else StemRef.block_id
    needed = {StemRef.EMBED_ID: stem.slices[StemRef.EMBED_ID]}
    needed |= {per_block(i): stem.slices[per_block(i)] for i in range(stem.blocks)}
    needed |= {StemRef.tail_id(sid): stem.tails[sid] for sid in assigned}
    return needed


def make_runner(plan: PlanMsg, assigned: tuple[str, ...], blobs: dict[str, bytes],
                strategy: Strategy, threads: int) -> Runner:  # fmt: skip
    stem = plan.stem
    if stem is None:
        return WholeModels({sid: blobs[sid] for sid in assigned}, threads)
    tails = {sid: blobs[StemRef.tail_id(sid)] for sid in assigned}
    embed = blobs[StemRef.EMBED_ID]
    if strategy == "per-entry":
        slices = [blobs[StemRef.from_id(i)] for i in range(stem.blocks)]
        return PerEntry(embed, slices, tails, threads)
    return Merged(embed, [blobs[StemRef.block_id(i)] for i in range(stem.blocks)], tails, threads)


@dataclass
class _Loaded:
    """The plan this node serves, the model files it has so far, and the runner once all
    are in."""

    plan: PlanMsg
    assigned: tuple[str, ...]
    required: dict[str, str]
    blobs: dict[str, bytes] = field(default_factory=dict)
    runner: Runner | None = None

    @property
    def complete(self) -> bool:
        return set(self.blobs) == set(self.required)


@dataclass(frozen=True)
class _Pending:
    camera: str
    seq: int
    ts: float
    label: int | None
    message: FrameMsg | TokensMsg


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
        strategy: Strategy = "per-entry",
    ) -> None:
        try:
            self.node_id = validate_id("node", node_id)
            self._batcher: DynamicBatcher[_Pending] = DynamicBatcher(
                max_batch=max_batch, max_wait_ms=max_wait_ms, capacity=queue_size,
                newest_only=newest_only,
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}: choose {', '.join(STRATEGIES)}")
        self.strategy = strategy
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
                required = required_models(plan, self.node_id, self.strategy)
                kept = {}
                if old is not None:  # keep model files whose bytes did not change
                    kept = {
                        mid: blob
                        for mid, blob in old.blobs.items()
                        if required.get(mid) == old.required.get(mid)
                    }
                self._state = _Loaded(plan, plan.submodels_of(self.node_id), required, kept)
        old_ids = set(old.required) if old else set()
        new_ids = set(self._state.required) if self._state else set()
        for model_id in old_ids - new_ids:
            self.client.unroute(self.topics.model(model_id))
        if plan is None:
            log.info("plan cleared; serving nothing")
            self.client.unroute(self.topics.all_frames())
            self.client.unroute(self.topics.all_tokens())
            self.client.set_status(StatusMsg(state="online"))
            return
        assigned = self._state.assigned if self._state else ()
        if not assigned:
            log.warning("plan %s assigns nothing to node %s", plan.plan_id, self.node_id)
        log.info(
            "plan %s: this node serves %s with %d model files (%s)",
            plan.plan_id, list(assigned) or "nothing", len(new_ids), self.strategy,
        )  # fmt: skip
        self._maybe_ready()
        for model_id in sorted(new_ids):
            self.client.route(self.topics.model(model_id), self._on_model, qos=1)

    def _on_model(self, topic: str, payload: bytes) -> None:
        model_id = self.topics.parts(topic)[1]
        msg = decode(ModelMsg, payload)
        if msg is None:
            return  # model topic cleared; the plan decides what is served
        with self._lock:
            state = self._state
        if state is None or model_id not in state.required:
            return
        expected = state.required[model_id]
        actual = sha256_bytes(msg.onnx)
        if actual != expected or msg.sha256 != expected:
            self.counters["models_refused"] += 1
            raise IntegrityError(
                f"refusing model {model_id}: its bytes hash to {actual[:12]}…, "
                f"the plan says {expected[:12]}…"
            )
        with self._lock:
            if self._state is not state:
                return  # a newer plan arrived meanwhile
            state.blobs[model_id] = msg.onnx
        log.info("received model %s (sha256 %s…)", model_id, actual[:12])
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        with self._lock:
            state = self._state
            if state is None:
                return
            if state.complete and state.assigned and state.runner is None:
                try:
                    runner = make_runner(
                        state.plan, state.assigned, state.blobs, self.strategy, self.threads
                    )
                except ConfigError as exc:
                    raise BadPayload(f"cannot load the plan's models: {exc}") from None
                state.runner = runner
                self.counters["model_bytes"] = runner.model_bytes
            ready = state.runner is not None
        if ready:
            self.client.route(self.topics.all_frames(), self._on_frame, qos=0)
            if state.plan.stem is not None:
                self.client.route(self.topics.all_tokens(), self._on_tokens, qos=0)
        self.client.set_status(
            StatusMsg(
                state="ready" if ready else "online",
                plan_id=state.plan.plan_id,
                submodels=tuple(
                    sid for sid in state.assigned
                    if sid in state.blobs or StemRef.tail_id(sid) in state.blobs
                ),
            )
        )  # fmt: skip

    # -- requests -------------------------------------------------------------------------
    def _on_frame(self, topic: str, payload: bytes) -> None:
        self._enqueue(topic, decode(FrameMsg, payload))

    def _on_tokens(self, topic: str, payload: bytes) -> None:
        self._enqueue(topic, decode(TokensMsg, payload))

    def _enqueue(self, topic: str, message: FrameMsg | TokensMsg | None) -> None:
        if message is None:
            return
        if message.camera != self.topics.parts(topic)[1]:
            raise BadPayload(f"message says camera {message.camera!r} but came on {topic}")
        pending = _Pending(message.camera, message.seq, message.ts, message.label, message)
        self._batcher.put(message.camera, pending)

    def _serve(self) -> None:
        while not self._stop.is_set():
            batch = self._batcher.take(timeout=0.2)
            self.counters["requests_replaced_overload"] = self._batcher.dropped
            with self._lock:
                state = self._state
            if not batch or state is None or state.runner is None:
                continue
            prepared = self._prepare(batch, state.plan)
            if not prepared:
                continue
            try:
                self._infer(prepared, state)
            except Exception:
                self.counters["inference_errors"] += 1
                log.exception("inference failed on a batch of %d requests", len(prepared))

    def _prepare(self, batch: list[_Pending], plan: PlanMsg) -> list[tuple[_Pending, Request]]:
        prepared = []
        for pending in batch:
            try:
                prepared.append((pending, self._request(pending.message, plan)))
            except BadPayload as exc:
                self.counters["bad_payloads"] += 1
                log.warning(
                    "dropped %s/%d: %s [bad_payloads=%d]",
                    pending.camera, pending.seq, exc, self.counters["bad_payloads"],
                )  # fmt: skip
        return prepared

    @staticmethod
    def _request(message: FrameMsg | TokensMsg, plan: PlanMsg) -> Request:
        if isinstance(message, FrameMsg):
            image = to_model_input(decode_frame(message), plan.preprocessing)
            return Request(IMAGE_ENTRY, image)
        stem = plan.stem
        assert stem is not None  # tokens are only routed for sliced plans
        if not 1 <= message.block <= stem.blocks:
            raise BadPayload(f"tokens at block {message.block}; the stem has {stem.blocks}")
        if message.shape != stem.token_shape:
            raise BadPayload(f"tokens of shape {message.shape}; the stem's are {stem.token_shape}")
        tokens = np.frombuffer(message.data, dtype=message.dtype).reshape(message.shape)
        return Request(message.block, tokens.astype(np.float32))

    def _infer(self, prepared: list[tuple[_Pending, Request]], state: _Loaded) -> None:
        assert state.runner is not None
        started = time.perf_counter()
        features = state.runner([request for _, request in prepared])
        infer_ms = round((time.perf_counter() - started) * 1000.0, 3)
        for submodel_id, vectors in features.items():
            for (pending, _), vector in zip(prepared, vectors, strict=True):
                vector = vector.astype(np.float32, copy=False)
                msg = FeaturesMsg(
                    camera=pending.camera,
                    seq=pending.seq,
                    ts=pending.ts,
                    submodel=submodel_id,
                    plan_id=state.plan.plan_id,
                    node=self.node_id,
                    dtype="float32",
                    data=vector.tobytes(),
                    dim=vector.shape[0],
                    infer_ms=infer_ms,
                    batch=len(prepared),
                    label=pending.label,
                )
                self.client.publish(self.topics.features(pending.camera, submodel_id), encode(msg))
        self.counters["frames_served"] += len(prepared)
        self.counters["batches"] += 1
