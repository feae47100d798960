"""What a service measures about itself, for Prometheus and for MQTT-only consumers.

Every service keeps a `Metrics`: its counters (the MQTT client's, already in its status),
frames per camera and outcome, and the seconds each stage of its work took. Observing is
cheap and always on; nothing leaves the process unless asked:

- `serve(port)` (`--metrics-port`) exposes them on http://HOST:PORT/metrics for Prometheus
  (names start with `edvit_`, times in seconds, counters end in `_total`);
- `StatsPublisher` puts `stats()` on the retained topic `{prefix}/stats/{kind}/{id}` every
  few seconds (`--stats-interval-s`, 0: off) for dashboards that only speak MQTT.

Anyone can publish frames for any camera id, so per-camera series are capped at
`MAX_CAMERAS` ids; later ones are counted under the camera label "other".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from edvit.errors import ConfigError
from edvit.service import Worker

# Stage histogram buckets (seconds): fine around a millisecond, where one stage lives.
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Batch sizes: up to the node's largest --max-batch worth telling apart.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)
MAX_CAMERAS = 256
RECENT = 1000  # observations per stage kept for the stats topic's percentiles
STATS_INTERVAL_S = 5.0
# Counters every service exports from the start (at 0 until something happens), so that a
# dashboard or an alert rule sees the series before the first bad payload.
ALWAYS_EXPORTED = (
    "bad_payloads", "payloads_too_large", "handler_errors", "plans_refused",
    "models_refused", "publishes_refused", "subscriptions_refused", "disconnects",
)  # fmt: skip


class Metrics:
    """One service's metrics: `observe` a stage, count `frame` outcomes, name the `plan`,
    register `gauge`s (queue depths); `stats()` for MQTT, `serve()` for Prometheus."""

    def __init__(
        self, service: str, instance: str, counters: Counter[str], always: tuple[str, ...] = ()
    ) -> None:
        """`always`: the service's own counters to export at 0 before they move (on top of
        ALWAYS_EXPORTED)."""
        self.service, self.instance, self.counters = service, instance, counters
        self.always = (*ALWAYS_EXPORTED, *always)
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}
        self._frames: Counter[tuple[str, str]] = Counter()
        self._cameras: set[str] = set()
        self._gauges: dict[str, Callable[[], float]] = {}
        self._plan_id: str | None = None
        self._prometheus: _Prometheus | None = None

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            recent = self._recent.get(stage)
            if recent is None:
                recent = self._recent[stage] = deque(maxlen=RECENT)
            recent.append(seconds)
        if self._prometheus is not None:
            self._prometheus.observe(stage, seconds)

    def batch(self, size: int) -> None:
        if self._prometheus is not None:
            self._prometheus.batch.observe(size)

    def frame(self, camera: str, outcome: str, count: int = 1) -> None:
        """`outcome`: received, served, answered, degraded, ..."""
        with self._lock:
            if camera not in self._cameras:
                if len(self._cameras) >= MAX_CAMERAS:
                    camera = "other"
                else:
                    self._cameras.add(camera)
            self._frames[(camera, outcome)] += count
        if self._prometheus is not None:
            self._prometheus.frame(camera, outcome, count)

    def plan(self, plan_id: str | None) -> None:
        self._plan_id = plan_id
        if self._prometheus is not None:
            self._prometheus.plan.info({"plan_id": plan_id or ""})

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A value read when scraped or reported, e.g. a queue's length."""
        self._gauges[name] = read

    def read_gauges(self) -> dict[str, float | None]:
        return {name: _read(read) for name, read in self._gauges.items()}

    def stats(self) -> dict:
        """The retained stats message: counters, frames per camera, gauges, and each stage's
        count, p50 and p95 (ms) over its last RECENT observations."""
        with self._lock:
            stages = {name: sorted(values) for name, values in self._recent.items() if values}
            frames: dict[str, dict[str, int]] = {}
            for (camera, outcome), count in self._frames.items():
                frames.setdefault(camera, {})[outcome] = count
        return {
            "service": self.service,
            "id": self.instance,
            "ts": round(time.time(), 3),
            "plan_id": self._plan_id,
            "counters": dict(self.counters),
            "frames": frames,
            "gauges": self.read_gauges(),
            "stages": {
                name: {
                    "count": len(values),
                    "p50_ms": _percentile_ms(values, 0.5),
                    "p95_ms": _percentile_ms(values, 0.95),
                }
                for name, values in stages.items()
            },
        }

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics on host:port. ConfigError when prometheus-client is missing or the
        port cannot be bound."""
        self._prometheus = _Prometheus(self)
        self._prometheus.serve(host, port)
        self.plan(self._plan_id)


def _percentile_ms(ordered: list[float], fraction: float) -> float:
    return round(1000.0 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)


def _read(read: Callable[[], float]) -> float | None:
    try:
        return float(read())
    except Exception:  # a gauge must never break a scrape or the stats
        return None


class _Prometheus:
    """The prometheus-client side of a Metrics, with its own registry."""

    def __init__(self, metrics: Metrics) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram, Info
        except ImportError:
            raise ConfigError(
                "--metrics-port needs prometheus-client: pip install prometheus-client"
            ) from None
        self.labels = {"service": metrics.service, "instance": metrics.instance}
        names = list(self.labels)
        self.registry = CollectorRegistry(auto_describe=True)
        self.stages = Histogram(
            "edvit_stage_seconds", "Time one stage of this service's work took",
            [*names, "stage"], buckets=STAGE_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram(
            "edvit_batch_size", "Frames served by one inference call", names,
            buckets=BATCH_BUCKETS, registry=self.registry,
        ).labels(**self.labels)  # fmt: skip
        self.frames = Counter(
            "edvit_frames", "Frames by camera and what became of them",
            [*names, "camera", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.plan = Info(
            "edvit_plan", "The plan this service follows", names, registry=self.registry
        ).labels(**self.labels)
        self.registry.register(_CountersAndGauges(metrics))

    def observe(self, stage: str, seconds: float) -> None:
        self.stages.labels(**self.labels, stage=stage).observe(seconds)

    def frame(self, camera: str, outcome: str, count: int) -> None:
        self.frames.labels(**self.labels, camera=camera, outcome=outcome).inc(count)

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen ({exc.strerror})") from None


class _CountersAndGauges:
    """The service's counters (`edvit_<name>_total`) and gauges, read at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):  # noqa: ANN201 - prometheus-client's collector protocol
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.metrics
        values = [m.service, m.instance]
        counters = dict.fromkeys(m.always, 0) | dict(m.counters)
        for name, value in sorted(counters.items()):
            family = CounterMetricFamily(
                f"edvit_{_metric_name(name)}", f"{m.service} counter {name}",
                labels=["service", "instance"],
            )  # fmt: skip
            family.add_metric(values, value)
            yield family
        for name, value in sorted(m.read_gauges().items()):
            if value is None:
                continue
            family = GaugeMetricFamily(
                f"edvit_{_metric_name(name)}", f"{m.service} {name}", labels=["service", "instance"]
            )
            family.add_metric(values, value)
            yield family


def _metric_name(name: str) -> str:
    """A counter key as a Prometheus name: [a-zA-Z0-9_] only."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


class StatsPublisher:
    """Publishes `metrics.stats()` retained on `topic` every `interval_s` seconds."""

    def __init__(
        self, metrics: Metrics, client: object, topic: str, interval_s: float = STATS_INTERVAL_S,
        logger: logging.Logger | None = None,
    ) -> None:  # fmt: skip
        self.metrics, self.client, self.topic = metrics, client, topic
        log = logger or logging.getLogger("edvit.metrics")
        self._worker = Worker("stats", self._publish, metrics.counters, log, interval_s=interval_s)
        self.enabled = interval_s > 0

    def _publish(self) -> None:
        payload = json.dumps(self.metrics.stats(), separators=(",", ":"))
        self.client.publish(self.topic, payload, qos=0, retain=True)  # type: ignore[attr-defined]

    def start(self) -> None:
        if self.enabled:
            self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
