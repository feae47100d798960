"""The fleet heals itself (real mosquitto, real processes, the shipped bundle): the chaos
bench's scenarios, with bounds looser than the figures it measures (README, "Failure
behaviour"), so that a loaded CI machine does not fail them by chance."""

from __future__ import annotations

import pytest

from edvit.broker.local import mosquitto_path
from edvit.fleet.chaos.scenarios import run_chaos
from edvit.fleet.ops.demo import DEFAULT_BUNDLE

pytestmark = [
    pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed"),
    pytest.mark.broker,
    pytest.mark.fleet,
    pytest.mark.slow,  # each scenario runs its own fleet for about 20 s
]


def _run(name: str) -> dict:
    (result,) = run_chaos(DEFAULT_BUNDLE, scenarios=(name,), hold_off_s=2.0, say=print)
    assert result["unanswered"] == 0, result
    assert result["answered_twice"] == 0, result
    return result


def test_a_killed_node_is_routed_around_healed_and_restored() -> None:
    r = _run("kill")
    assert r["offline_status_s"] < 1.0
    assert r["first_degraded_answer_s"] < 1.0
    assert r["full_answers_again_s"] < 3.0
    assert r["placement_restored_after_up_s"] < 2.0 + 8.0


def test_a_frozen_node_costs_at_most_the_deadline_and_is_healed() -> None:
    r = _run("freeze")
    assert r["max_latency_while_silent_ms"] < 250 + 250  # the deadline's cap, plus slack
    assert r["full_answers_again_s"] < 3.0
    assert r["placement_restored_after_recovery_s"] is not None


def test_the_standby_aggregator_takes_over_and_still_heals() -> None:
    r = _run("failover")
    assert r["standby_took_over_s"] is not None, "the standby never took the lease"
    assert r["standby_took_over_s"] < 5.0
    assert r["full_answers_again_after_node_kill_s"] < 3.0


def test_a_node_cut_off_costs_at_most_the_deadline_and_is_healed_before_its_will() -> None:
    r = _run("cut")
    assert r["max_latency_while_silent_ms"] < 250 + 250
    assert r["full_answers_again_s"] < 3.0
    assert r["full_answers_again_s"] < r["will_offline_s"]  # not waiting for the Will
    assert r["placement_restored_after_recovery_s"] is not None
