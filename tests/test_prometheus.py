"""A real Prometheus (Debian's `prometheus` package, with promtool) scraping a real fleet,
queried through its HTTP API with PromQL; and the example scrape configuration and alert
rules of deploy/prometheus checked and unit-tested with promtool."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from edvit.broker.local import LocalBroker, find_free_port
from edvit.bundle import Bundle
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import deploy
from edvit.fleet.ops.local import LocalFleet
from edvit.mqtt import MqttClient
from edvit.process import stop_process
from edvit.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "prometheus"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
WHY = "Debian's prometheus package is not installed (make system-packages)"
ALERTS = (
    "EdvitServiceDown", "EdvitDegradedAnswers", "EdvitBadPayloads", "EdvitRefusedByBroker",
    "EdvitPlanRefused",
)  # fmt: skip


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(PROMTOOL is None, reason=WHY)
@pytest.mark.broker  # runs promtool
def test_the_example_config_and_its_rules_check() -> None:
    done = _promtool("check", "config", "prometheus.yml")  # checks its rule files too
    assert done.returncode == 0, done.stdout + done.stderr
    done = _promtool("check", "rules", "edvit-rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ALERTS)} rules found" in done.stdout
    rules = (EXAMPLE / "edvit-rules.yml").read_text()
    assert set(re.findall(r"alert: (\w+)", rules)) == set(ALERTS)


@pytest.mark.skipif(PROMTOOL is None, reason=WHY)
@pytest.mark.broker  # runs promtool
def test_the_alert_rules_pass_their_unit_tests() -> None:
    """edvit-rules.test.yml: each alert fires on the series it is about, and only then."""
    done = _promtool("test", "rules", "edvit-rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (EXAMPLE / "edvit-rules.test.yml").read_text()))
    assert tested == set(ALERTS)


class Prometheus:
    """A prometheus child process on a free port, with the given config (JSON is YAML)."""

    def __init__(self, config: dict, folder: Path) -> None:
        assert PROMETHEUS is not None
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / "prometheus.json"
        config_path.write_text(json.dumps(config, indent=1))
        self.url = f"http://127.0.0.1:{find_free_port()}"
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config_path}",
                 f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log_path.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> object:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]  # type: ignore[index]

    def scalar(self, expr: str) -> float | None:
        """The value of a query with at most one result (None: no result)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.process, grace_s=10)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:g} s")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason=WHY)
def test_a_real_prometheus_scrapes_the_fleet(mosquitto_broker: LocalBroker, tmp_path: Path) -> None:
    """Two nodes, an aggregator started without --id and a camera, each with --metrics-port,
    scraped every second by Prometheus with the example alert rules loaded."""
    topics = Topics(f"prom{int(time.time() * 1000) % 100000}")
    nodes = ("node-0", "node-1")
    plan = deploy(Bundle.load(DEFAULT_BUNDLE), mosquitto_broker.url, list(nodes), topics)
    ports = {name: find_free_port() for name in (*nodes, "aggregator", "cam0")}
    jobs = {"edvit-nodes": nodes, "edvit-aggregators": ("aggregator",), "edvit-cameras": ("cam0",)}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(EXAMPLE / "edvit-rules.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [
                {"targets": [f"127.0.0.1:{ports[name]}" for name in names]}
            ]}
            for job, names in jobs.items()
        ],
    }  # fmt: skip
    # The aggregator's default id is held in TMPDIR: a folder of this test's own, so that
    # aggregators other tests run meanwhile on this machine do not take its number.
    slots = tmp_path / "slots"
    slots.mkdir()

    def metrics(name: str) -> tuple[str, ...]:
        return ("--metrics-port", str(ports[name]), "--metrics-host", "127.0.0.1")

    def start_aggregator() -> None:
        fleet.spawn(
            "aggregator", "aggregator", "--no-planner", *metrics("aggregator"),
            env={"TMPDIR": str(slots)},
        )  # fmt: skip

    prometheus = Prometheus(config, tmp_path / "prometheus")
    try:
        with LocalFleet(mosquitto_broker.url, tmp_path / "fleet", topics) as fleet:
            for node in nodes:
                fleet.spawn(node, "node", "--id", node, "--keep-all-frames", *metrics(node))
            start_aggregator()
            fleet.wait_ready(plan)
            fleet.spawn(
                "cam0", "camera", "--id", "cam0", "--source", "dataset:fashion-mnist",
                "--fps", "10", "--loop", *metrics("cam0"),
            )  # fmt: skip

            # Every target is up, under Prometheus's own instance label.
            wait_for("4 targets up", lambda: prometheus.scalar("count(up == 1)") == 4)
            assert prometheus.scalar("count(up == 0)") is None

            # Predictions rise.
            answered = 'sum(edvit_frames_total{service="aggregator"})'
            wait_for("answers", lambda: (prometheus.scalar(answered) or 0) > 0)
            before = prometheus.scalar(answered)
            wait_for("more answers", lambda: (prometheus.scalar(answered) or 0) > before)
            received = 'sum by (id) (edvit_frames_total{service="node",outcome="received"})'
            assert {r["metric"]["id"] for r in prometheus.query(received)} == set(nodes)

            # No label renamed: edvit's series carry service and id, Prometheus adds instance.
            assert prometheus.query('{exported_instance=~".+"}') == []
            assert prometheus.query('{__name__=~"edvit_.+", instance=""}') == []
            assert prometheus.query('{__name__=~"edvit_.+", id=""}') == []
            targets = {f"127.0.0.1:{port}" for port in ports.values()}
            stage = "count by (instance) (edvit_stage_seconds_count)"
            assert {r["metric"]["instance"] for r in prometheus.query(stage)} == targets

            # The standard process metrics of every service.
            for name in ("process_resident_memory_bytes", "process_open_fds",
                         "process_cpu_seconds_total"):  # fmt: skip
                assert prometheus.scalar(f"count({name} > 0)") == 4, name

            # One metadata entry (type and HELP) per metric, whichever service exports it.
            metadata = prometheus.api("metadata")
            edvit = {
                name: entries for name, entries in metadata.items() if name.startswith("edvit_")
            }  # type: ignore[union-attr]
            # (Prometheus scrapes OpenMetrics, whose counter families are named without _total.)
            assert {"edvit_stage_seconds", "edvit_bad_payloads", "edvit_frames"} <= set(edvit)
            assert {name: len(entries) for name, entries in edvit.items() if len(entries) > 1} == {}
            # Not exported: duplicates of edvit_frames_total, the batch size outside nodes.
            names = set(prometheus.api("label/__name__/values"))  # type: ignore[arg-type]
            assert not {"edvit_predictions_total", "edvit_frames_served_total"} & names
            batch = "count by (job) (edvit_batch_size_count)"
            assert {r["metric"]["job"] for r in prometheus.query(batch)} == {"edvit-nodes"}
            assert prometheus.scalar('count(edvit_plan_info{service="node"})') == 2
            assert prometheus.scalar(f'count(edvit_plan_info{{plan_id="{plan.plan_id}"}})') == 3

            # The example rules evaluate, over metrics that exist.
            rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]  # type: ignore[index]
            assert {r["name"] for r in rules} == {
                "EdvitServiceDown", "EdvitDegradedAnswers", "EdvitBadPayloads",
                "EdvitRefusedByBroker", "EdvitPlanRefused",
            }  # fmt: skip
            wait_for("rules evaluated", lambda: all(
                r["health"] == "ok" for g in prometheus.api("rules")["groups"]  # type: ignore[index]
                for r in g["rules"]
            ))  # fmt: skip
            used = {n for r in rules for n in re.findall(r"edvit_\w+", r["query"])}
            assert used and used <= names, used - names

            # A bad payload on a node fires EdvitBadPayloads for that node.
            sender = MqttClient("prom-test-sender", mosquitto_broker.url)
            sender.start(required=True)
            try:
                sender.publish_and_wait(topics.frame("cam9"), b"\x93garbage")
            finally:
                sender.stop()

            def firing() -> set[tuple[str, str]]:
                alerts = prometheus.api("alerts")["alerts"]  # type: ignore[index]
                return {
                    (a["labels"]["alertname"], a["labels"].get("id", ""))
                    for a in alerts if a["state"] == "firing"
                }  # fmt: skip

            # Both nodes take every frame: both count it.
            bad = {("EdvitBadPayloads", node) for node in nodes}
            wait_for("EdvitBadPayloads firing for both nodes", lambda: bad <= firing())

            # The aggregator restarted (no --id) keeps its id: its series go on, none start.
            ids = "count(count by (id) (last_over_time(edvit_pending_frames[10m])))"
            assert prometheus.scalar(ids) == 1
            process = fleet.processes["aggregator"]
            process.send_signal(signal.SIGINT)
            assert process.wait(15) == 0
            start_aggregator()
            restarted = (
                'count(up{job="edvit-aggregators"} == 1 and '
                "on (instance) (time() - process_start_time_seconds < 60))"
            )
            wait_for("the aggregator scraped again", lambda: prometheus.scalar(restarted) == 1)
            # The restarted aggregator's counters start again, and a series starts with its
            # first frame: until then the sum has no result.
            before = prometheus.scalar(answered) or 0
            wait_for("answers again", lambda: (prometheus.scalar(answered) or 0) > before)
            assert prometheus.scalar(ids) == 1
    finally:
        prometheus.stop()
