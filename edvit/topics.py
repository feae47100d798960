"""Topic names of the wire contract (v1).

The prefix is added here and removed here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from edvit.errors import BadPayload

DEFAULT_PREFIX = "edvit"
# Home Assistant's default MQTT discovery prefix (`edvit aggregator --ha-discovery`).
DEFAULT_HA_PREFIX = "homeassistant"
FUSION_MODEL_ID = "fusion"  # the fusion MLP's model id


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ValueError(f"invalid topic prefix {self.prefix!r}")

    def _join(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def frame(self, camera: str) -> str:
        return self._join("cameras", camera, "frame")

    def tokens(self, camera: str) -> str:
        return self._join("cameras", camera, "tokens")

    def camera_status(self, camera: str) -> str:
        return self._join("cameras", camera, "status")

    def plan(self) -> str:
        return self._join("plan")

    def model(self, submodel_id: str) -> str:
        return self._join("models", submodel_id)

    def fusion_model(self) -> str:
        return self.model(FUSION_MODEL_ID)

    def node_status(self, node: str) -> str:
        return self._join("nodes", node, "status")

    def aggregator_status(self) -> str:
        """The serving aggregator's status (the leader's, when several run)."""
        return self._join("aggregator", "status")

    def aggregator_instance_status(self, instance: str) -> str:
        return self._join("aggregators", instance, "status")

    def aggregator_lease(self, shard: str | None = None) -> str:
        """Retained: which aggregator instance answers and plans now; with `--shard i/n`,
        which one answers that shard's cameras (`aggregator/lease/{i}-of-{n}`)."""
        if shard is None:
            return self._join("aggregator", "lease")
        return self._join("aggregator", "lease", shard)

    def stats(self, kind: str, service_id: str) -> str:
        """Retained: a service's counters and stage times (edvit/metrics.py); `kind` is
        nodes, aggregators or cameras."""
        return self._join("stats", kind, service_id)

    def fleet_health(self) -> str:
        return self._join("fleet", "health")

    def features(self, camera: str, submodel_id: str, node: str) -> str:
        """Names the node, so that the broker's ACL can let a node write only its own
        features (README, "Security")."""
        return self._join("features", camera, submodel_id, node)

    def predictions(self, camera: str) -> str:
        return self._join("predictions", camera)

    # Subscription filters.
    def all_frames(self) -> str:
        return self.frame("+")

    def all_tokens(self) -> str:
        return self.tokens("+")

    def all_features(self) -> str:
        return self.features("+", "+", "+")

    def all_legacy_features(self) -> str:
        """`features/{camera}/{sub-model}`, as nodes before the node level published them."""
        return self._join("features", "+", "+")

    def all_predictions(self) -> str:
        return self.predictions("+")

    def all_node_statuses(self) -> str:
        return self.node_status("+")

    def node_of(self, topic: str) -> str:
        """The node id of a received `nodes/{node}/...` topic; BadPayload for an id no node
        can have (e.g. the empty one of `nodes//status`)."""
        try:
            return validate_id("node", self.parts(topic)[1])
        except (ValueError, IndexError) as exc:
            raise BadPayload(f"{topic} names no valid node: {exc}") from None

    def parts(self, topic: str) -> list[str]:
        """Split a received topic into its parts after the prefix."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under prefix {self.prefix!r}")
        return topic[len(head) :].split("/")


def validate_id(kind: str, value: str) -> str:
    """Ids become topic levels: refuse what would break a topic."""
    if not value or any(c in value for c in "/+#") or value != value.strip():
        raise ValueError(f"{kind} id {value!r} must be non-empty and contain no '/', '+', '#'")
    return value
