"""`edvit dashboard`: the fleet live in a browser.

`FleetView` turns the messages a plain subscriber receives (retained statuses, the plan,
predictions, optionally frames) into one JSON-able snapshot; it needs no broker and no web
server, so it is tested on its own. `Dashboard` feeds a view from the broker through
`MqttClient`; `create_app` serves the snapshot (`/api/state`), a server-sent event stream of
snapshots (`/events`), the latest frame per camera (`/frames/{camera}`, only with `--frames`)
and the static page. Starlette and uvicorn (the `dashboard` extra) are imported only when the
web layer is built.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from edvit.errors import BadPayload, ConfigError
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.schemas import FrameMsg, HealthMsg, PlanMsg, PredictionMsg, StatusMsg, decode
from edvit.topics import Topics

if TYPE_CHECKING:
    from types import FrameType

    from starlette.applications import Starlette

log = logging.getLogger("edvit.fleet.dashboard.app")

WEB_EXTRA_HINT = "edvit dashboard needs starlette and uvicorn: pip install edvit[dashboard]"
DEFAULT_WINDOW = 200  # predictions the rates, histogram and stage latencies are computed over
PLAN_HISTORY_LIMIT = 50
# Upper edges of the latency histogram's buckets, ms; one more bucket holds the rest.
LATENCY_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
# A prediction's optional `timings` (stage -> ms) comes from the wire: bound what is kept.
MAX_STAGES = 32
MAX_STAGE_NAME = 64
SSE_INTERVAL_S = 0.25  # at most this often a client gets a new snapshot
SSE_KEEPALIVE_S = 15.0

M = TypeVar("M", StatusMsg, PlanMsg, PredictionMsg, HealthMsg, FrameMsg)


def node_state(status: StatusMsg) -> str:
    """What a person wants to know of a node: offline, error (it refused the newest plan),
    ready (serving), loading (following a plan it does not serve yet) or idle (no plan)."""
    if status.state == "offline":
        return "offline"
    if status.error:
        return "error"
    if status.state == "ready":
        return "ready"
    return "loading" if status.plan_id else "idle"


def stage_timings(prediction: PredictionMsg) -> dict[str, float]:
    """The prediction's ms per stage (schemas.STAGES), or {} when it has none; a map with a
    negative value or an odd stage name is ignored whole."""
    timings = prediction.timings
    if any(ms < 0 for ms in timings.values()) or any(
        not stage or len(stage) > MAX_STAGE_NAME for stage in timings
    ):
        return {}
    return dict(timings)


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def histogram(values: list[float], edges: tuple[float, ...] = LATENCY_BUCKETS_MS) -> list[dict]:
    """Counts per bucket: `le` is the bucket's upper edge in ms (None: above the last edge)."""
    counts = [0] * (len(edges) + 1)
    for value in values:
        counts[next((i for i, edge in enumerate(edges) if value <= edge), len(edges))] += 1
    return [
        {"le": edges[i] if i < len(edges) else None, "count": count}
        for i, count in enumerate(counts)
    ]


class FleetView:
    """The fleet as the dashboard shows it, built from decoded messages.

    The `*_payload` methods are MQTT handlers: they decode, count what does not decode, and
    never raise. The other methods take decoded messages (None: a cleared retained topic).
    Every change bumps `version`, so a stream sends a snapshot only when something changed.
    Thread-safe: MQTT delivers on paho's thread, the web layer reads on its own.
    """

    def __init__(
        self,
        topics: Topics | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        frames_enabled: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics or Topics()
        self.frames_enabled = frames_enabled
        self.clock = clock
        self.version = 0
        self.bad_payloads: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._nodes: dict[str, StatusMsg] = {}
        self._camera_statuses: dict[str, StatusMsg] = {}
        self._cameras: dict[str, dict[str, Any]] = {}
        self._frames: dict[str, FrameMsg] = {}
        self._aggregator: StatusMsg | None = None
        self._health: HealthMsg | None = None
        self._plan: PlanMsg | None = None
        self._plan_history: deque[dict[str, Any]] = deque(maxlen=PLAN_HISTORY_LIMIT)
        self._predictions_seen = 0
        self._recent_degraded: deque[bool] = deque(maxlen=window)
        self._recent_latency_ms: deque[float] = deque(maxlen=window)
        self._recent_stages: dict[str, deque[float]] = {}
        self._window = window

    # -- MQTT handlers: raw payloads ------------------------------------------------------
    def _decode(self, kind: type[M], payload: bytes, what: str) -> tuple[bool, M | None]:
        """(ok, message): ok is False for a payload that does not decode, which is counted."""
        try:
            return True, decode(kind, payload)
        except BadPayload as exc:
            with self._lock:
                self.bad_payloads[what] += 1
                self.version += 1
            log.debug("bad %s payload: %s", what, exc)
            return False, None

    def _topic_id(self, topic: str, index: int, what: str) -> str | None:
        try:
            name = self.topics.parts(topic)[index]
        except (ValueError, IndexError):
            name = ""
        if not name:
            with self._lock:
                self.bad_payloads[what] += 1
                self.version += 1
            return None
        return name

    def node_status_payload(self, topic: str, payload: bytes) -> None:
        node = self._topic_id(topic, 1, "node_status")
        ok, status = self._decode(StatusMsg, payload, "node_status")
        if node is not None and ok:
            self.node_status(node, status)

    def camera_status_payload(self, topic: str, payload: bytes) -> None:
        camera = self._topic_id(topic, 1, "camera_status")
        ok, status = self._decode(StatusMsg, payload, "camera_status")
        if camera is not None and ok:
            self.camera_status(camera, status)

    def aggregator_status_payload(self, _topic: str, payload: bytes) -> None:
        ok, status = self._decode(StatusMsg, payload, "aggregator_status")
        if ok:
            self.aggregator_status(status)

    def health_payload(self, _topic: str, payload: bytes) -> None:
        ok, health = self._decode(HealthMsg, payload, "fleet_health")
        if ok:
            self.fleet_health(health)

    def plan_payload(self, _topic: str, payload: bytes) -> None:
        ok, plan = self._decode(PlanMsg, payload, "plan")
        if ok:
            self.plan(plan)

    def prediction_payload(self, _topic: str, payload: bytes) -> None:
        ok, prediction = self._decode(PredictionMsg, payload, "prediction")
        if ok and prediction is not None:
            self.prediction(prediction)

    def frame_payload(self, topic: str, payload: bytes) -> None:
        camera = self._topic_id(topic, 1, "frame")
        ok, frame = self._decode(FrameMsg, payload, "frame")
        if camera is not None and ok and frame is not None:
            self.frame(camera, frame)

    # -- decoded messages ------------------------------------------------------------------
    def node_status(self, node: str, status: StatusMsg | None) -> None:
        with self._lock:
            if status is None:
                self._nodes.pop(node, None)
            else:
                self._nodes[node] = status
            self.version += 1

    def camera_status(self, camera: str, status: StatusMsg | None) -> None:
        with self._lock:
            if status is None:
                self._camera_statuses.pop(camera, None)
            else:
                self._camera_statuses[camera] = status
            self.version += 1

    def aggregator_status(self, status: StatusMsg | None) -> None:
        with self._lock:
            self._aggregator = status
            self.version += 1

    def fleet_health(self, health: HealthMsg | None) -> None:
        with self._lock:
            self._health = health
            self.version += 1

    def plan(self, plan: PlanMsg | None) -> None:
        with self._lock:
            self._plan = plan
            latest = self._plan_history[-1]["plan_id"] if self._plan_history else None
            if plan is not None and plan.plan_id != latest:
                self._plan_history.append({"plan_id": plan.plan_id, "seen": self.clock()})
            self.version += 1

    def prediction(self, prediction: PredictionMsg) -> None:
        timings = stage_timings(prediction)
        with self._lock:
            self._predictions_seen += 1
            self._recent_degraded.append(prediction.degraded)
            self._recent_latency_ms.append(prediction.latency_ms)
            for stage, ms in timings.items():
                if stage not in self._recent_stages and len(self._recent_stages) >= MAX_STAGES:
                    continue
                self._recent_stages.setdefault(stage, deque(maxlen=self._window)).append(ms)
            camera = self._cameras.setdefault(prediction.camera, {"predictions": 0})
            camera["predictions"] += 1
            camera["latest"] = {
                "seq": prediction.seq,
                "class": prediction.class_name,
                "score": prediction.score,
                "latency_ms": prediction.latency_ms,
                "degraded": prediction.degraded,
                "missing": list(prediction.missing),
                "plan_id": prediction.plan_id,
                "untrained": prediction.untrained,
                "received": self.clock(),
                "timings": timings,
            }
            self.version += 1

    def frame(self, camera: str, frame: FrameMsg) -> None:
        if not self.frames_enabled:
            return
        with self._lock:
            self._frames[camera] = frame
            self.version += 1

    # -- what the web layer reads ----------------------------------------------------------
    def latest_frame(self, camera: str) -> tuple[bytes, str] | None:
        """The camera's latest frame as (image bytes, media type): png/jpeg as they came,
        raw pixels encoded as PNG here, on request rather than per frame."""
        with self._lock:
            frame = self._frames.get(camera)
        if frame is None:
            return None
        if frame.enc == "png":
            return frame.data, "image/png"
        if frame.enc == "jpeg":
            return frame.data, "image/jpeg"
        import cv2

        from edvit.preprocess import decode_frame

        try:
            ok, png = cv2.imencode(".png", decode_frame(frame))
        except BadPayload:
            return None
        return (png.tobytes(), "image/png") if ok else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            plan = self._plan
            assigned = dict(plan.assignments) if plan is not None else {}
            latencies = list(self._recent_latency_ms)
            recent = len(self._recent_degraded)
            degraded = sum(self._recent_degraded)
            cameras = sorted(set(self._cameras) | set(self._camera_statuses) | set(self._frames))
            return {
                "version": self.version,
                "time": now,
                "frames_enabled": self.frames_enabled,
                "nodes": [
                    self._node_entry(node, self._nodes.get(node), assigned.get(node, ()), now)
                    for node in sorted(set(self._nodes) | set(assigned))
                ],
                "cameras": [self._camera_entry(camera, now) for camera in cameras],
                "aggregator": _status_entry(self._aggregator, now),
                "health": self._health.model_dump(mode="json") if self._health else None,
                "plan": _plan_entry(plan),
                "plan_history": list(self._plan_history),
                "predictions": {
                    "seen": self._predictions_seen,
                    "window": recent,
                    "degraded": degraded,
                    "degraded_rate": degraded / recent if recent else None,
                    "latency_ms": {
                        "p50": percentile(latencies, 0.5),
                        "p95": percentile(latencies, 0.95),
                        "histogram": histogram(latencies),
                    },
                },
                "stages": [
                    {
                        "stage": stage,
                        "count": len(values),
                        "mean_ms": sum(values) / len(values),
                        "p50_ms": percentile(list(values), 0.5),
                        "p95_ms": percentile(list(values), 0.95),
                    }
                    for stage, values in self._recent_stages.items()
                ],
                "bad_payloads": {"total": sum(self.bad_payloads.values()), **self.bad_payloads},
            }

    def _node_entry(
        self, node: str, status: StatusMsg | None, assigned: tuple[str, ...], now: float
    ) -> dict[str, Any]:
        entry = {"id": node, "assigned": list(assigned)}
        if status is None:  # in the plan, never heard of
            return entry | {"state": "unknown", "submodels": [], "counters": {}}
        return entry | _status_entry(status, now) | {"state": node_state(status)}

    def _camera_entry(self, camera: str, now: float) -> dict[str, Any]:
        seen = self._cameras.get(camera, {})
        frame = self._frames.get(camera)
        return {
            "id": camera,
            "status": _status_entry(self._camera_statuses.get(camera), now),
            "predictions": seen.get("predictions", 0),
            "latest": seen.get("latest"),
            "frame_seq": frame.seq if frame is not None else None,
        }


def _status_entry(status: StatusMsg | None, now: float) -> dict[str, Any] | None:
    if status is None:
        return None
    return {
        "state": status.state,
        "plan_id": status.plan_id,
        "serving_plan_id": status.serving_plan_id,
        "submodels": list(status.submodels),
        "error": status.error,
        "counters": dict(status.counters),
        "capacity": status.capacity.model_dump() if status.capacity else None,
        # ts 0 is the Will's offline status: its age says nothing.
        "age_s": max(0.0, now - status.ts) if status.ts else None,
    }


def _plan_entry(plan: PlanMsg | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "plan_id": plan.plan_id,
        "assignments": {node: list(ids) for node, ids in plan.assignments.items()},
        "base_plan_id": plan.base_plan_id,
        "classes": len(plan.classes),
        "submodels": [ref.id for ref in plan.submodels],
        "sliced": plan.stem is not None,
        "signed_by": plan.key_id,
        "untrained": plan.untrained,
        "created": plan.created,
    }


class Dashboard:
    """A FleetView fed from the broker by one plain subscriber."""

    def __init__(
        self,
        broker: str | Connection,
        *,
        topics: Topics | None = None,
        frames: bool = False,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.topics = topics or Topics()
        self.view = FleetView(self.topics, window=window, frames_enabled=frames)
        # Set on shutdown: open event streams end, else the server waits for them to.
        self.closing = threading.Event()
        self.client = MqttClient(unique_client_id("dashboard"), broker, logger=log)
        view, t = self.view, self.topics
        self.client.route(t.all_node_statuses(), view.node_status_payload, qos=1)
        self.client.route(t.camera_status("+"), view.camera_status_payload, qos=1)
        self.client.route(t.aggregator_status(), view.aggregator_status_payload, qos=1)
        self.client.route(t.fleet_health(), view.health_payload, qos=1)
        self.client.route(t.plan(), view.plan_payload, qos=1)
        self.client.route(t.all_predictions(), view.prediction_payload)
        if frames:
            self.client.route(t.all_frames(), view.frame_payload)

    def start(self) -> None:
        self.client.start(required=True)

    def stop(self) -> None:
        self.closing.set()
        self.client.stop()

    def state(self) -> dict[str, Any]:
        """The view's snapshot and this subscriber's own connection counters (a refused
        frame subscription shows there: the identity may not read frames)."""
        counters = self.client.counters
        return self.view.snapshot() | {
            "broker": {
                "connected": self.client.connected,
                "subscriptions_refused": counters["subscriptions_refused"],
                "payloads_too_large": counters["payloads_too_large"],
            }
        }


def require_web() -> None:
    """ConfigError with the install hint when the `dashboard` extra is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(WEB_EXTRA_HINT) from None


def create_app(dashboard: Dashboard) -> Starlette:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    static = StaticFiles(packages=[("edvit.fleet.dashboard", "static")])

    async def index(_request: Request) -> Response:
        path, _stat = static.lookup_path("index.html")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    async def state(_request: Request) -> Response:
        return JSONResponse(dashboard.state())

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            sent_version = -1
            last_sent = 0.0
            while not dashboard.closing.is_set() and not await request.is_disconnected():
                version = dashboard.view.version
                if version != sent_version:
                    sent_version = version
                    last_sent = time.monotonic()
                    yield f"data: {json.dumps(dashboard.state())}\n\n"
                elif time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield ": keepalive\n\n"
                await asyncio.sleep(SSE_INTERVAL_S)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def frame(request: Request) -> Response:
        if not dashboard.view.frames_enabled:
            return Response("frames are off (edvit dashboard --frames)", status_code=404)
        image = dashboard.view.latest_frame(request.path_params["camera"])
        if image is None:
            return Response("no frame from this camera", status_code=404)
        data, media_type = image
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/events", events),
            Route("/frames/{camera}", frame),
            Mount("/static", static, name="static"),
        ]
    )


def listen(host: str, port: int) -> socket.socket:
    """The dashboard's listening socket, bound before anything else starts, so that a port
    in use is one line (ConfigError) rather than uvicorn's traceback after the banner."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"--host {host} --port {port}: cannot listen ({reason})") from None
    return sock


def serve(dashboard: Dashboard, sock: socket.socket) -> None:
    """Serve the dashboard on `sock` until SIGINT/SIGTERM (uvicorn's own handlers)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            dashboard.closing.set()  # the event streams end within SSE_INTERVAL_S
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(dashboard), log_level="warning", timeout_graceful_shutdown=2)
    Server(config).run(sockets=[sock])
