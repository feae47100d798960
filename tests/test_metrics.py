"""Metrics: what each service measures, on /metrics for Prometheus and on the retained stats
topics; a real fleet scraped over HTTP."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, find_free_port
from edvit.bundle import Bundle
from edvit.cli import main
from edvit.errors import ConfigError
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.identity import HostSlot
from edvit.metrics import COUNTER_HELP, GAUGE_COUNTERS, MAX_CAMERAS, NOT_EXPORTED, Metrics
from edvit.topics import Topics
from helpers import MqttProbe, wait_until

try:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # the tests that need it skip
    Metric = object  # type: ignore[assignment,misc]


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
    with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1"):
        Metrics("node", "b", Counter()).serve(port, "127.0.0.1")


@pytest.mark.parametrize("service", ["node", "aggregator"])
def test_a_service_given_a_busy_port_stops_with_one_line(
    service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 before connecting anywhere: nothing runs without the metrics it was asked for."""
    pytest.importorskip("prometheus_client")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [service, "--id", "x0", "--broker", "127.0.0.1:1", "--metrics-host", "127.0.0.1",
                "--metrics-port", str(port)]  # fmt: skip
        assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--metrics-port {port}: cannot listen" in err[0], err
    assert "in use" in err[0]


def _families(port: int) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(_scrape(port))}


def _served(service: str, ident: str, counters: Counter[str], **options: object) -> Metrics:
    metrics = Metrics(service, ident, counters, **options)  # type: ignore[arg-type]
    metrics.serve(find_free_port(), "127.0.0.1")
    return metrics


def _port(metrics: Metrics) -> int:
    assert metrics.port is not None
    return metrics.port


def test_every_series_is_labelled_service_and_id_never_instance() -> None:
    pytest.importorskip("prometheus_client")
    counters = Counter(bad_payloads=2, degraded_missing_sub1=3, loader_errors=1, model_bytes=9)
    metrics = _served("node", "n0", counters, batch_sizes=True)
    metrics.observe("infer", 0.002)
    metrics.frame("cam0", "served")
    metrics.batch(4)
    metrics.plan("p1")
    families = _families(_port(metrics))
    edvit = [f for f in families.values() if f.name.startswith("edvit_")]
    assert edvit
    for family in edvit:
        for sample in family.samples:
            assert "instance" not in sample.labels, sample
            assert sample.labels["service"] == "node" and sample.labels["id"] == "n0", sample
    [info] = families["edvit_plan_info"].samples
    assert info.labels["plan_id"] == "p1" and info.value == 1
    [missing] = families["edvit_degraded_missing"].samples
    assert missing.labels["submodel"] == "sub1" and missing.value == 3
    [errors] = families["edvit_worker_errors"].samples
    assert errors.labels["worker"] == "loader"
    assert families["edvit_model_bytes"].type == "gauge"
    assert families["edvit_batch_size"].type == "histogram"
    # prometheus-client's standard collectors: CPU, memory, open fds; the Python version
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "python_info"):  # fmt: skip
        assert name in families, name


def test_one_help_per_metric_whichever_service_exports_it() -> None:
    pytest.importorskip("prometheus_client")
    counters: Counter[str] = Counter(bad_payloads=1, disconnects=2, connects=1)
    services = [_served(s, f"{s}0", counters) for s in ("node", "aggregator", "camera")]
    for metrics in services:
        metrics.observe("encode", 0.001)
        metrics.frame("cam0", "published")
    helps: dict[str, set[str]] = {}
    for metrics in services:
        text = _scrape(_port(metrics))
        for line in text.splitlines():
            if line.startswith("# HELP edvit_"):
                name, help_text = line.removeprefix("# HELP ").split(" ", 1)
                helps.setdefault(name, set()).add(help_text)
    assert "edvit_bad_payloads_total" in helps and "edvit_stage_seconds" in helps
    for name, texts in helps.items():
        assert len(texts) == 1, (name, texts)
        [text] = texts
        assert not any(service in text.split()[0].lower() for service in ("node", "camera")), text


def test_what_a_service_does_not_do_it_does_not_export() -> None:
    """No batch histogram outside the node, no plan info without a plan, and no counter that
    repeats edvit_frames_total or the batch histogram's count."""
    pytest.importorskip("prometheus_client")
    counters = Counter(predictions=5, predictions_degraded=1, frames_served=5, batches=2)
    for service in ("aggregator", "camera"):
        families = _families(_port(_served(service, "x", counters)))
        assert "edvit_batch_size" not in families
        assert "edvit_plan_info" not in families
        for name in ("predictions", "predictions_degraded", "frames_served", "batches"):
            assert f"edvit_{name}" not in families, name


def test_every_counter_the_code_keeps_has_a_help_text() -> None:
    """Each counter a service increments by name is described (or deliberately left out)."""
    root = Path(__file__).resolve().parents[1]
    names: set[str] = set()
    for folder in ("edvit", "aggregator", "edge_node", "camera_source", "fleet", "broker"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r'counters\["([a-z_]+)"\]', path.read_text()))
    assert len(names) > 20
    described = set(COUNTER_HELP) | NOT_EXPORTED | GAUGE_COUNTERS
    assert names - described == set()


@pytest.mark.fleet  # processes that hold and release an id
def test_a_default_id_is_stable_across_restarts_and_unique_among_running(tmp_path: Path) -> None:
    first = HostSlot("aggregator", tmp_path)
    second = HostSlot("aggregator", tmp_path)
    assert first.id != second.id and first.id.endswith("-1") and second.id.endswith("-2")
    first.release()  # the first one stops; started again it gets its id back
    again = HostSlot("aggregator", tmp_path)
    assert again.id == first.id
    assert HostSlot("aggregator-0-of-2", tmp_path).id.endswith("-1")  # per kind
    # Another process holds it the same way.
    code = (
        "import sys; from pathlib import Path; from edvit.identity import HostSlot; "
        f"print(HostSlot('aggregator', Path({str(tmp_path)!r})).id)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("-3")
    second.release()
    again.release()


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
        bad = 'edvit_bad_payloads_total{id="node-0",service="node"}'
        assert _value(_scrape(ports["node-0"]), bad) == 0  # exported before it moves
        assert _value(_scrape(ports["aggregator"]), "edvit_features_late_total{") == 0
        probe.client.publish(topics.frame("cam9"), b"\x93garbage", qos=1)
        wait_until(lambda: _value(_scrape(ports["node-0"]), bad) == 1, 10, "a counted bad frame")
        fleet.spawn(
            "cam0", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
            "--count", str(frames), "--fps", "10", "--loop", *metrics_args("cam0"),
        )  # fmt: skip
        answered = (
            f'edvit_frames_total{{camera="cam0",id="agg0",outcome="answered",'
            f'service="aggregator"}} {frames}.0'
        )
        wait_until(lambda: answered in _scrape(ports["aggregator"]), 30, "every frame answered")
        for node in ("node-0", "node-1"):
            text = _scrape(ports[node])
            base = f'camera="cam0",id="{node}"'
            assert _value(text, f'edvit_frames_total{{{base},outcome="received"') == frames
            assert _value(text, f'edvit_frames_total{{{base},outcome="served"') == frames
            stage = f'edvit_stage_seconds_count{{id="{node}",service="node",stage='
            for name in ("decode", "queue", "infer", "publish"):
                assert _value(text, f'{stage}"{name}"') == frames
            assert f'plan_id="{plan.plan_id}"' in text
            assert "edvit_queue_depth{" in text and "edvit_messages_in_total{" in text
        text = _scrape(ports["aggregator"])
        stage = 'edvit_stage_seconds_count{id="agg0",service="aggregator",stage='
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
