"""What a service measures about itself, for Prometheus and for MQTT-only consumers.

Every service keeps a `Metrics`: its counters (the MQTT client's, already in its status),
frames per camera and outcome, and the seconds each stage of its work took. Observing is
cheap and always on; nothing leaves the process unless asked:

- `serve(port)` (`--metrics-port`) exposes them on http://HOST:PORT/metrics for Prometheus
  (names start with `edvit_`, times in seconds, counters end in `_total`), with the process
  and platform metrics prometheus-client collects (`process_*`, `python_*`);
- `StatsPublisher` puts `stats()` on the retained topic `{prefix}/stats/{kind}/{id}` every
  few seconds (`--stats-interval-s`, 0: off) for dashboards that only speak MQTT.

Every edvit series is labelled `service` (node, aggregator, camera) and `id` (the service's
id). Neither is called `instance`: Prometheus sets that label itself, to the scraped
address, and would rename ours `exported_instance`. Each metric name has one HELP text,
the same in every service, so Prometheus's metadata lists one entry per metric.

Anyone can publish frames for any camera id, so per-camera series are capped at
`MAX_CAMERAS` ids; later ones are counted under the camera label "other".
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator

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
LABELS = ("service", "id")  # on every edvit series
# Counters every service exports from the start (at 0 until something happens), so that a
# dashboard or an alert rule sees the series before the first bad payload.
ALWAYS_EXPORTED = (
    "bad_payloads", "payloads_too_large", "handler_errors", "plans_refused",
    "models_refused", "publishes_refused", "subscriptions_refused", "disconnects",
)  # fmt: skip

# The HELP text of each metric, one per name whichever service exports it.
STAGE_HELP = (
    "Seconds one stage of the service's work took: node decode, queue, infer, publish; "
    "aggregator join_wait (first features to answer), fusion; camera encode, head_slices"
)
FRAMES_HELP = (
    "Frames by camera and what became of them: node received, served; aggregator answered "
    "(every sub-model's features in), degraded (answered without some); camera published"
)
BATCH_HELP = "Frames served by one inference call on a node"
PLAN_HELP = "The plan the service serves (value 1; absent while it serves none)"
COUNTER_HELP = {
    "bad_payloads": "Messages dropped because they did not decode or broke the wire contract",
    "payloads_too_large": "Messages dropped for being over their topic's size limit",
    "handler_errors": "Messages whose handler raised an unexpected error (a bug)",
    "messages_in": "MQTT messages received",
    "messages_out": "MQTT messages handed to the client for publishing",
    "publish_failed": "Publishes the MQTT client could not queue (not connected, queue full)",
    "publishes_refused": "Publishes the broker refused (MQTT 5 reason code, e.g. the ACL)",
    "subscriptions_refused": "Subscriptions the broker refused (the ACL)",
    "connects": "Connections made to the broker, the first one included",
    "disconnects": "Connections to the broker lost (clean stops excluded)",
    "broker_failovers": "Reconnections to another broker of the list given to --broker",
    "plans_refused": "Plans refused (models that do not fit, bad signature, memory)",
    "plan_signatures_refused": "Plans refused for a missing or wrong Ed25519 signature",
    "plans_replayed": "Signed plans refused as older than the newest the service followed",
    "models_refused": "Model files whose sha256 is not the one their plan names",
    "models_for_other_plan": "Sound model files that belong to another plan than the current",
    "requests_not_serving": "Frames or tokens that arrived while the node served no plan",
    "requests_served_inline": "Frames served at once on the receiving thread (idle node)",
    "requests_replaced_overload": "Queued frames replaced by a newer frame of their camera",
    "requests_prepared_for_other_plan": "Decoded frames dropped because the plan changed",
    "features_late": "Feature vectors that came after their frame was answered",
    "features_other_plan": "Feature vectors computed under a plan the aggregator does not know",
    "features_other_shard": "Feature vectors of cameras another aggregator shard answers",
    "frames_unanswerable": "Frames dropped because no fusion model of their plan was loaded",
    "fusion_not_finite": "Frames not answered because the fusion gave non-finite scores",
    "nodes_suspected": "Times a node that says it serves was found sending nothing",
    "ha_configs": "Home Assistant discovery configs published",
    "ha_states": "Home Assistant sensor states (a camera's latest prediction) published",
    "plans_published": "Plans the planner published after re-placing sub-models",
    "plans_not_signed": "Placements the planner could not publish for want of --sign-key",
    "plans_withheld": "Plans the planner decided but did not publish: its connection was lost",
    "plans_republished": "Times the planner published the plan again to a broker that lost it",
    "planner_reconnects": "Reconnects after which the planner gave nodes a grace to re-announce",
    "statuses_out_of_order": "Statuses ignored as older than the one they would replace",
    "model_refetches": "Times a follower asked the broker again for model files that had not come",
    "models_from_kept": "Model files a follower took from those it kept instead of fetching",
}
# Counters with a variable part: exported as one metric with a label.
LABELLED_COUNTERS = (
    (re.compile(r"degraded_missing_(.+)"), "degraded_missing", "submodel",
     "Answers made without this sub-model's features"),
    (re.compile(r"(.+)_restarts"), "worker_restarts", "worker",
     "Times a service's background loop died and was restarted"),
    (re.compile(r"(.+)_errors"), "worker_errors", "worker",
     "Exceptions raised in a service's background loop (counted, logged, the loop goes on)"),
)  # fmt: skip
# Counters in the MQTT status that Prometheus gets from another metric already:
# edvit_frames_total{outcome="served"} (node), {outcome=~"answered|degraded"} (aggregator),
# and edvit_batch_size_count.
NOT_EXPORTED = frozenset({"frames_served", "predictions", "predictions_degraded", "batches"})
# Values the services keep among their counters that are levels, not counts.
GAUGE_COUNTERS = frozenset({"model_bytes"})
OTHER_COUNTER_HELP = "A count the service keeps (docs: operations/metrics)"
OTHER_GAUGE_HELP = "A level the service reports (docs: operations/metrics)"
GAUGE_HELP = {
    "queue_depth": "Frames queued on a node, waiting for the inference worker",
    "pending_frames": "Frames the aggregator is joining (features in, not yet answered)",
    "model_bytes": "Bytes of the sub-model files the node has loaded",
}


class Metrics:
    """One service's metrics: `observe` a stage, count `frame` outcomes, name the `plan`,
    register `gauge`s (queue depths); `stats()` for MQTT, `serve()` for Prometheus."""

    def __init__(
        self,
        service: str,
        instance: str,
        counters: Counter[str],
        always: tuple[str, ...] = (),
        *,
        batch_sizes: bool = False,
    ) -> None:
        """`instance`: the service's id (the `id` label). `always`: the service's own
        counters to export at 0 before they move (on top of ALWAYS_EXPORTED).
        `batch_sizes`: the service calls `batch` (a node), so it exports edvit_batch_size."""
        self.service, self.instance, self.counters = service, instance, counters
        self.always = (*ALWAYS_EXPORTED, *always)
        self.batch_sizes = batch_sizes
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = {}
        self._frames: Counter[tuple[str, str]] = Counter()
        self._cameras: set[str] = set()
        self._gauges: dict[str, Callable[[], float]] = {}
        self._plan_id: str | None = None
        self._prometheus: _Prometheus | None = None
        self.port: int | None = None  # where /metrics is served

    @property
    def plan_id(self) -> str | None:
        return self._plan_id

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            recent = self._recent.get(stage)
            if recent is None:
                recent = self._recent[stage] = deque(maxlen=RECENT)
            recent.append(seconds)
        if self._prometheus is not None:
            self._prometheus.observe(stage, seconds)

    def batch(self, size: int) -> None:
        if self._prometheus is not None and self._prometheus.batch is not None:
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
        """The plan served now (None: none); read at each scrape and stats."""
        self._plan_id = plan_id

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
        port cannot be bound (then nothing is served)."""
        if not 0 < port < 65536:
            raise ConfigError(f"--metrics-port {port}: not a port (1-65535)")
        prometheus = _Prometheus(self)
        prometheus.serve(host, port)
        self._prometheus, self.port = prometheus, port


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
            from prometheus_client import (
                CollectorRegistry,
                Counter,
                GCCollector,
                Histogram,
                PlatformCollector,
                ProcessCollector,
            )
        except ImportError:
            raise ConfigError(
                "--metrics-port needs prometheus-client: pip install prometheus-client"
            ) from None
        self.labels = {"service": metrics.service, "id": metrics.instance}
        self.registry = CollectorRegistry(auto_describe=True)
        # The standard collectors (CPU seconds, resident memory, open fds, start time, the
        # Python version, garbage collections): they read the process when scraped.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.stages = Histogram(
            "edvit_stage_seconds", STAGE_HELP, [*LABELS, "stage"], buckets=STAGE_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.batch = None
        if metrics.batch_sizes:
            self.batch = Histogram(
                "edvit_batch_size", BATCH_HELP, LABELS, buckets=BATCH_BUCKETS,
                registry=self.registry,
            ).labels(**self.labels)  # fmt: skip
        self.frames = Counter(
            "edvit_frames", FRAMES_HELP, [*LABELS, "camera", "outcome"], registry=self.registry
        )
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
            why = exc.strerror or str(exc)
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host} ({why})") from None


def exported_counters(counters: dict[str, int]) -> Iterator[tuple[str, str, dict[str, str], int]]:
    """The counters as Prometheus sees them: (metric name without `edvit_` and `_total`,
    its HELP, the labels of a counter with a variable part, the count). Levels kept among
    the counters and duplicates of other metrics are left out."""
    for name, value in sorted(counters.items()):
        if name in NOT_EXPORTED or name in GAUGE_COUNTERS:
            continue
        if name in COUNTER_HELP:
            yield _metric_name(name), COUNTER_HELP[name], {}, value
            continue
        for pattern, metric, label, help_text in LABELLED_COUNTERS:
            match = pattern.fullmatch(name)
            if match:
                yield metric, help_text, {label: match.group(1)}, value
                break
        else:
            yield _metric_name(name), OTHER_COUNTER_HELP, {}, value


class _CountersAndGauges:
    """The service's counters (`edvit_<name>_total`), its gauges and its plan, read at
    each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.metrics
        values = [m.service, m.instance]
        counters = dict.fromkeys(m.always, 0) | dict(m.counters)
        families: dict[str, CounterMetricFamily] = {}
        for name, help_text, extra, value in exported_counters(counters):
            family = families.get(name)
            if family is None:
                labels = [*LABELS, *extra]
                family = families[name] = CounterMetricFamily(
                    f"edvit_{name}", help_text, labels=labels
                )
            family.add_metric([*values, *extra.values()], value)
        yield from families.values()
        gauges = m.read_gauges() | {
            name: float(m.counters[name]) for name in GAUGE_COUNTERS if name in m.counters
        }
        for name, value in sorted(gauges.items()):
            if value is None:
                continue
            help_text = GAUGE_HELP.get(name, OTHER_GAUGE_HELP)
            family = GaugeMetricFamily(f"edvit_{_metric_name(name)}", help_text, labels=LABELS)
            family.add_metric(values, value)
            yield family
        if m.plan_id:
            info = GaugeMetricFamily("edvit_plan_info", PLAN_HELP, labels=[*LABELS, "plan_id"])
            info.add_metric([*values, m.plan_id], 1.0)
            yield info


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
