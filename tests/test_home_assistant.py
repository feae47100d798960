"""A real Home Assistant against a real mosquitto and a real aggregator process: the sensor
appears, follows the predictions, goes unavailable when the aggregator stops (cleanly, killed,
frozen as on a network cut) and comes back after a restart, a Home Assistant restart and a
broker restart.

Opt-in, since it takes a minute or more: install Home Assistant 2024.1 with
scripts/install-home-assistant.sh, then

    EDVIT_HA_VENV=~/.cache/edvit/home-assistant .venv/bin/pytest -s tests/test_home_assistant.py

(docs/operations/home-assistant.md). The features are made up in this process, two sets
that the shipped bundle's fusion model tells apart, so that the state has two classes to
move between; no node runs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edvit.broker.local import LocalBroker, mosquitto_path
from edvit.bundle import Bundle
from edvit.fleet.ops.demo import DEFAULT_BUNDLE
from edvit.fleet.ops.deploy import make_plan, publish_bundle, round_robin
from edvit.fleet.ops.local import LocalFleet
from edvit.inference import Fusion
from edvit.mqtt import KEEPALIVE_S, MqttClient
from edvit.schemas import FeaturesMsg, PlanMsg, PredictionMsg, decode, encode
from edvit.topics import Topics
from helpers import MqttProbe
from home_assistant import HomeAssistant, venv_hass

HASS = venv_hass(os.environ.get("EDVIT_HA_VENV"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        HASS is None,
        reason="a real Home Assistant: set EDVIT_HA_VENV to a virtualenv made by "
        "scripts/install-home-assistant.sh (docs/operations/home-assistant.md)",
    ),
]
UNAVAILABLE_WITHIN_S = 10.0
# A frozen or cut-off client: the broker sends its Will once it has heard nothing for 1.5
# keepalives, at its next keepalive check (9 to 12 s measured with mosquitto 2.0.11).
CUT_OFF_WITHIN_S = 3 * KEEPALIVE_S
FRIENDLY_NAME = "edvit cam0 Prediction"


def two_feature_sets(bundle: Bundle, plan: PlanMsg) -> tuple[tuple[list[np.ndarray], str], ...]:
    """Two sets of feature vectors the fusion model gives different classes, and those."""
    dims = bundle.manifest.fusion.feature_dims
    fusion = Fusion(bundle.path(bundle.manifest.fusion.file), dims)
    rng = np.random.default_rng(0)
    found: dict[str, list[np.ndarray]] = {}
    while len(found) < 2:
        blocks = [rng.normal(0, 3, d).astype(np.float32) for d in dims]
        label = int(np.argmax(fusion([b[None] for b in blocks])[0]))
        found.setdefault(plan.classes[label], blocks)
    return tuple((blocks, name) for name, blocks in found.items())


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` holds; fails the test naming `what` after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:g} s")


def test_a_real_home_assistant_follows_the_fleet(tmp_path: Path) -> None:
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")
    assert HASS is not None
    bundle = Bundle.load(DEFAULT_BUNDLE)
    plan = make_plan(bundle, round_robin([s.id for s in bundle.manifest.submodels], ["n0"]))
    (first, first_class), (second, second_class) = two_feature_sets(bundle, plan)
    topics = Topics()
    timings: dict[str, float] = {}
    started = time.monotonic()
    with (
        LocalBroker(kind="mosquitto", log_path=tmp_path / "broker.log") as broker,
        LocalFleet(broker.url, tmp_path / "fleet", topics) as fleet,
    ):
        ha = HomeAssistant(HASS, tmp_path / "home-assistant")
        sender = MqttClient("ha-test-sender", broker.url)
        sender.start(required=True)
        try:
            timings["home assistant up"] = ha.start()
            ha.onboard()
            ha.add_mqtt(broker.host, broker.port)
            publish_bundle(
                lambda t, p: sender.publish_and_wait(t, p, retain=True), bundle, plan, topics
            )
            run = _Run(ha, fleet, broker, sender, topics, plan)
            run.start_aggregator()

            # The entity appears with the class of the first answer, then follows the next.
            run.answer(first)
            timings["entity appears"] = wait_for(
                "the sensor appears", lambda: run.state() == first_class, 30
            )
            entity = run.entity()
            assert entity["attributes"]["score"] > 0
            assert entity["attributes"]["plan_id"] == plan.plan_id
            run.answer(second)
            timings["state follows"] = wait_for(
                f"the state becomes {second_class}", lambda: run.state() == second_class, 10
            )

            # A clean stop (SIGTERM): unavailable; a restart: available again.
            process = fleet.processes["aggregator"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0, fleet.log_tail("aggregator")
            timings["unavailable after a clean stop"] = run.wait_unavailable()
            run.start_aggregator()
            timings["available after a restart"] = wait_for(
                "available after a restart", lambda: run.state() == second_class, 30
            )
            run.answer(first)
            wait_for("the state follows again", lambda: run.state() == first_class, 10)

            # Home Assistant restarts: the retained state shows the class at once, without a
            # new answer.
            ha.stop()
            ha.start()
            timings["state after a home assistant restart"] = wait_for(
                "the class after Home Assistant restarted", lambda: run.state() == first_class, 30
            )

            # Killed (SIGKILL): the broker sends the Will.
            fleet.processes["aggregator"].kill()
            fleet.processes["aggregator"].wait(10)
            timings["unavailable after a kill"] = run.wait_unavailable()
            run.start_aggregator()
            wait_for("available after a restart", lambda: run.state() == first_class, 30)

            # Frozen, as behind a cut network link: the broker gives up after its keepalive.
            process = fleet.processes["aggregator"]
            process.send_signal(signal.SIGSTOP)
            try:
                timings["unavailable when frozen (network cut)"] = run.wait_unavailable(
                    CUT_OFF_WITHIN_S
                )
            finally:
                process.send_signal(signal.SIGCONT)
            timings["available when it answers again"] = wait_for(
                "available after SIGCONT", lambda: run.state() == first_class, 30
            )

            # The broker restarts (nothing persisted): the aggregator and Home Assistant
            # connect again, the aggregator announces the camera again with its next answer,
            # and the availability still follows its status.
            broker.restart()
            run.answer(second)
            timings["follows after a broker restart"] = wait_for(
                "follows after a broker restart", lambda: run.state() == second_class, 30
            )
            fleet.processes["aggregator"].send_signal(signal.SIGTERM)
            timings["unavailable after a broker restart and a stop"] = run.wait_unavailable()
            timings["total"] = time.monotonic() - started
        finally:
            sender.stop()
            ha.stop()
        print("\nHome Assistant test timings (s):")
        for what, seconds in timings.items():
            print(f"  {what:48s} {seconds:6.1f}")


class _Run:
    """The fleet side of the test: the aggregator process and made-up features."""

    def __init__(
        self, ha: HomeAssistant, fleet: LocalFleet, broker: LocalBroker, sender: MqttClient,
        topics: Topics, plan: PlanMsg,
    ) -> None:  # fmt: skip
        self.ha, self.fleet, self.broker, self.sender = ha, fleet, broker, sender
        self.topics, self.plan = topics, plan
        self.seq = 0
        self._entity_id: str | None = None

    def start_aggregator(self) -> None:
        self.fleet.spawn(
            "aggregator", "aggregator", "--ha-discovery", "--no-planner", "--lease-ttl-s", "1"
        )

    def answer(self, blocks: list[np.ndarray]) -> PredictionMsg:
        """Publish one frame's features until the aggregator answers it (it may still be
        loading its plan); the prediction."""
        with MqttProbe(
            self.broker.host, self.broker.port, self.topics.predictions("cam0")
        ) as probe:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                self.seq += 1
                ts = time.time()
                for ref, data in zip(self.plan.submodels, blocks, strict=True):
                    msg = FeaturesMsg(
                        camera="cam0", seq=self.seq, ts=ts, submodel=ref.id,
                        plan_id=self.plan.plan_id, node="n0", dtype="float32",
                        data=data.tobytes(), dim=ref.feature_dim, infer_ms=0.1,
                    )  # fmt: skip
                    self.sender.publish(self.topics.features("cam0", ref.id, "n0"), encode(msg), 1)
                try:
                    message = probe.wait_for(
                        lambda m: (
                            (p := decode(PredictionMsg, m.payload)) is not None
                            and p.seq == self.seq
                        ),
                        timeout=1.0,
                    )
                except TimeoutError:
                    self.fleet.check_alive()
                    continue
                prediction = decode(PredictionMsg, message.payload)
                assert prediction is not None
                return prediction
        pytest.fail(f"no answer in 30 s:\n{self.fleet.log_tail('aggregator')}")

    def entity(self) -> dict:
        if self._entity_id is None:
            for state in self.ha.states():
                if state["attributes"].get("friendly_name") == FRIENDLY_NAME:
                    self._entity_id = state["entity_id"]
            if self._entity_id is None:
                return {}
        return self.ha.state(self._entity_id) or {}

    def state(self) -> str | None:
        return self.entity().get("state")

    def wait_unavailable(self, within_s: float = UNAVAILABLE_WITHIN_S) -> float:
        return wait_for("the sensor unavailable", lambda: self.state() == "unavailable", within_s)
