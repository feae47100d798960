"""The names of the chaos bench's scenarios, apart from their code, so that building the
command line loads none of it."""

from __future__ import annotations

# The partition matrix (partitions.py); `--scenarios partitions` runs all of it.
PARTITIONS = (
    "broker-restart", "broker-crash", "aggregator-cut", "nodes-cut", "switch-cut",
    "failover-broker", "cluster-switch",
)  # fmt: skip
SCENARIO_NAMES = [
    "kill", "freeze", "cut", "failover", *PARTITIONS, "partitions", "hostile", "soak",
]  # fmt: skip
DEFAULT_SCENARIO_NAMES = ["kill", "freeze", "cut", "failover", "partitions", "hostile"]
