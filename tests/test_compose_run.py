"""compose.yaml run as containers, with `--scale node=3` (opt-in: EDVIT_DOCKER_TESTS=1).

Builds the images with scripts/docker-local.sh (or reuses them: the build is cached), starts
the fleet, and checks from the host, through the broker container's address on the compose
network, that the plan places the bundle over the three scaled nodes and that predictions
arrive. Minutes the first time (the base image and pip), about a minute after that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edvit.schemas import PlanMsg, PredictionMsg, StatusMsg, decode
from edvit.topics import Topics
from helpers import MqttProbe, tier

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "edvit-compose-test"
NODES = 3
COMPOSE = ["docker-compose", "-p", PROJECT, "-f", str(ROOT / "compose.yaml")]
MEASURE_S = 20.0


def _why_not() -> str | None:
    if os.environ.get("EDVIT_DOCKER_TESTS") != "1":
        return "set EDVIT_DOCKER_TESTS=1 to build the images and run compose.yaml (minutes)"
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io docker-compose)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"no Docker daemon answers (scripts/docker-local.sh starts one): {info.stderr}"
    return None


@pytest.fixture(scope="module")
@tier("broker", "fleet", "slow")
def fleet() -> Iterator[str]:
    """The broker container's address, with the fleet up."""
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    subprocess.run([str(ROOT / "scripts" / "docker-local.sh")], cwd=ROOT, check=True)
    env = {**os.environ, "EDVIT_NODES": str(NODES)}
    # A fresh broker volume: no retained plan or statuses from an earlier run.
    subprocess.run([*COMPOSE, "down", "-v", "-t", "5"], env=env, check=True)
    try:
        subprocess.run(
            [*COMPOSE, "up", "-d", "--scale", f"node={NODES}"], env=env, check=True, timeout=300
        )
        broker = subprocess.run(
            [*COMPOSE, "ps", "-q", "broker"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        address = subprocess.run(
            ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}"
             "{{end}}", broker],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        yield address
    finally:
        subprocess.run([*COMPOSE, "logs", "--tail", "20"], env=env)
        subprocess.run([*COMPOSE, "down", "-v", "-t", "5"], env=env)


def test_the_scaled_fleet_serves_predictions(fleet: str) -> None:
    topics = Topics()
    with MqttProbe(fleet, 1883, topics.plan()) as probe:
        plan = decode(PlanMsg, probe.get(timeout=180).payload)
    assert plan is not None
    nodes = set(plan.assignments)
    assert len(nodes) == NODES, plan.assignments
    assert all(n.startswith("node-") and len(n) == len("node-") + 12 for n in nodes), nodes
    assert all(len(ids) == 1 for ids in plan.assignments.values()), plan.assignments

    with MqttProbe(fleet, 1883, topics.all_node_statuses()) as probe:
        ready: set[str] = set()
        deadline = time.monotonic() + 120
        while ready != nodes and time.monotonic() < deadline:
            message = probe.get(timeout=max(0.1, deadline - time.monotonic()))
            status = decode(StatusMsg, message.payload)
            if status is not None and status.state == "ready" and status.plan_id == plan.plan_id:
                ready.add(topics.node_of(message.topic))
    assert ready == nodes

    with MqttProbe(fleet, 1883, topics.predictions("+")) as probe:
        probe.get(timeout=120)  # the first answer: the aggregator and camera are up
        predictions: list[PredictionMsg] = []
        started = time.monotonic()
        while (left := started + MEASURE_S - time.monotonic()) > 0:
            try:
                message = probe.get(timeout=left)
            except TimeoutError:
                break
            prediction = decode(PredictionMsg, message.payload)
            if prediction is not None:
                predictions.append(prediction)
    whole = [p for p in predictions if not p.degraded]
    correct = sum(p.label == p.true_label for p in whole)
    print(
        f"\n{len(predictions)} predictions in {MEASURE_S:.0f} s "
        f"({len(predictions) / MEASURE_S:.1f}/s), {len(whole)} not degraded, "
        f"{correct} correct; nodes {sorted(nodes)}"
    )
    assert len(whole) >= MEASURE_S  # the camera sends 5 frames per second
