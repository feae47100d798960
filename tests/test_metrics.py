"""Metrics: what each service measures, on /metrics for Prometheus and on the retained stats
topics; a real fleet scraped over HTTP."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, find_free_port
from edvit.bundle import Bundle
from edvit.errors import ConfigError
from edvit.fleet.demo import DEFAULT_BUNDLE
from edvit.fleet.deploy import deploy
from edvit.fleet.local import LocalFleet
from edvit.metrics import MAX_CAMERAS, Metrics
from edvit.topics import Topics
from helpers import MqttProbe, wait_until


def test_stats_report_counters_frames_gauges_and_stage_percentiles() -> None:
    counters: Counter[str] = Counter(bad_payloads=2)
    metrics = Metrics("node", "n0", counters)
    for ms in range(1, 101):
        metrics.observe("infer", ms / 1000.0)
    metrics.frame("cam0", "received", 3)
    metrics.frame("cam0", "served", 2)
    metrics.gauge("queue_depth", lambda: 4)
    metrics.gauge("broken", lambda: 1 / 0)
    metrics.plan("p1")
    stats = metrics.stats()
    assert stats["service"] == "node" and stats["id"] == "n0" and stats["plan_id"] == "p1"
    assert stats["counters"] == {"bad_payloads": 2}
    assert stats["frames"] == {"cam0": {"received": 3, "served": 2}}
    assert stats["gauges"] == {"queue_depth": 4.0, "broken": None}
    assert stats["stages"]["infer"] == {"count": 100, "p50_ms": 51.0, "p95_ms": 96.0}
    json.dumps(stats)  # what the stats topic carries


def test_camera_ids_beyond_the_cap_share_one_label() -> None:
    """Anyone can publish frames under any camera id: series per camera stay bounded."""
    metrics = Metrics("node", "n0", Counter())
    for i in range(MAX_CAMERAS + 50):
        metrics.frame(f"cam{i}", "received")
    frames = metrics.stats()["frames"]
    assert len(frames) == MAX_CAMERAS + 1
    assert frames["other"] == {"received": 50}


def test_a_busy_port_is_one_clear_error() -> None:
    pytest.importorskip("prometheus_client")
    port = find_free_port()
    Metrics("node", "a", Counter()).serve(port, "127.0.0.1")
    with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen"):
        Metrics("node", "b", Counter()).serve(port, "127.0.0.1")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _value(text: str, prefix: str) -> float:
    """The value of the one sample line starting with `prefix`."""
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


@pytest.mark.fleet
@pytest.mark.slow
def test_a_fleet_exposes_its_metrics(mosquitto_broker: LocalBroker, tmp_path: Path) -> None:
    """Two nodes, the aggregator and a camera with --metrics-port: every frame shows up as
    received and served on each node and answered on the aggregator, with stage histograms,
    the plan as an info metric, and the same on the retained stats topics."""
    pytest.importorskip("prometheus_client")
    topics = Topics(f"m{int(time.time() * 1000) % 100000}")
    frames = 6
    plan = deploy(Bundle.load(DEFAULT_BUNDLE), mosquitto_broker.url, ["node-0", "node-1"], topics)
    ports = {name: find_free_port() for name in ("node-0", "node-1", "aggregator", "cam0")}

    def metrics_args(name: str) -> tuple[str, ...]:
        return ("--metrics-port", str(ports[name]), "--metrics-host", "127.0.0.1",
                "--stats-interval-s", "0.5")  # fmt: skip

    with (
        MqttProbe(
            mosquitto_broker.host, mosquitto_broker.port, f"{topics.prefix}/stats/#"
        ) as probe,
        LocalFleet(mosquitto_broker.url, tmp_path, topics) as fleet,
    ):
        for node in ("node-0", "node-1"):
            fleet.spawn(node, "node", "--id", node, "--keep-all-frames", *metrics_args(node))
        fleet.spawn("aggregator", "aggregator", "--id", "agg0", *metrics_args("aggregator"))
        fleet.wait_ready(plan)
        bad = 'edvit_bad_payloads_total{instance="node-0",service="node"}'
        assert _value(_scrape(ports["node-0"]), bad) == 0  # exported before it moves
        assert _value(_scrape(ports["aggregator"]), "edvit_predictions_degraded_total{") == 0
        probe.client.publish(topics.frame("cam9"), b"\x93garbage", qos=1)
        wait_until(lambda: _value(_scrape(ports["node-0"]), bad) == 1, 10, "a counted bad frame")
        fleet.spawn(
            "cam0", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
            "--count", str(frames), "--fps", "10", "--loop", *metrics_args("cam0"),
        )  # fmt: skip
        answered = (
            f'edvit_frames_total{{camera="cam0",instance="agg0",outcome="answered",'
            f'service="aggregator"}} {frames}.0'
        )
        wait_until(lambda: answered in _scrape(ports["aggregator"]), 30, "every frame answered")
        for node in ("node-0", "node-1"):
            text = _scrape(ports[node])
            base = f'camera="cam0",instance="{node}"'
            assert _value(text, f'edvit_frames_total{{{base},outcome="received"') == frames
            assert _value(text, f'edvit_frames_total{{{base},outcome="served"') == frames
            stage = f'edvit_stage_seconds_count{{instance="{node}",service="node",stage='
            for name in ("decode", "queue", "infer", "publish"):
                assert _value(text, f'{stage}"{name}"') == frames
            assert f'plan_id="{plan.plan_id}"' in text
            assert "edvit_queue_depth{" in text and "edvit_messages_in_total{" in text
        text = _scrape(ports["aggregator"])
        stage = 'edvit_stage_seconds_count{instance="agg0",service="aggregator",stage='
        assert _value(text, f'{stage}"fusion"') == _value(text, f'{stage}"join_wait"') == frames
        assert "edvit_pending_frames{" in text

        def served_all(message: object) -> bool:
            stats = json.loads(message.payload)  # type: ignore[attr-defined]
            return (
                message.topic == topics.stats("nodes", "node-0")  # type: ignore[attr-defined]
                and stats["frames"].get("cam0", {}).get("served") == frames
            )

        stats = json.loads(probe.wait_for(served_all, timeout=10).payload)
        assert stats["stages"]["infer"]["count"] == frames and stats["plan_id"] == plan.plan_id
        assert fleet.stop() == dict.fromkeys(fleet.processes, 0)
