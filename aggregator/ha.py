"""Home Assistant MQTT discovery: one sensor per camera (README, "Home Assistant").

Each camera gets one retained config under `{ha_prefix}/sensor/{node_id}/{object_id}/config`
(node_id from the topic prefix, object_id from the camera id), published once, by the
answering aggregator, when it answers the camera's first frame. The sensor's state is the
class of the camera's latest prediction, its attributes the score, latency, degraded flag,
seq, plan and untrained flag (a bundle of random weights, also named in the device model);
it is available while the serving aggregator's retained status says it answers.
Key names follow https://www.home-assistant.io/integrations/sensor.mqtt/ (full names, no
abbreviations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading

from edvit import __version__
from edvit.errors import ConfigError
from edvit.mqtt import Transport
from edvit.schemas import PlanMsg
from edvit.topics import DEFAULT_HA_PREFIX, Topics, validate_id

log = logging.getLogger("edvit.aggregator.ha")

# More cameras than this are not announced: a node may publish features for any camera id,
# and every config stays retained in the broker and becomes an entity in Home Assistant.
MAX_CAMERAS = 256

STATE_TEMPLATE = "{{ value_json['class'] }}"
ATTRIBUTES_TEMPLATE = (
    "{{ {'score': value_json.score, 'latency_ms': value_json.latency_ms, "
    "'degraded': value_json.degraded, 'seq': value_json.seq, "
    "'plan_id': value_json.plan_id, "
    "'untrained': value_json.untrained | default(false)} | tojson }}"
)
# The aggregator status (edvit.schemas.StatusMsg) says "ready" when it serves the newest
# plan and "online" with a serving_plan_id while a newer one loads: both answer frames.
AVAILABILITY_TEMPLATE = (
    "{{ 'online' if value_json.state == 'ready' or value_json.serving_plan_id else 'offline' }}"
)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


def check_ha_prefix(prefix: str) -> str:
    """The discovery prefix as Home Assistant's `discovery_prefix` setting names it."""
    if not prefix or any(c in prefix for c in "+#") or prefix.strip("/") != prefix:
        raise ConfigError(f"invalid Home Assistant discovery prefix {prefix!r}")
    return prefix


def safe_id(value: str) -> str:
    """A discovery topic level Home Assistant accepts ([a-zA-Z0-9_-]+) for any edvit id.

    Ids that need changing get a short hash of the original, so that e.g. `cam.1` and
    `cam_1` stay two sensors."""
    safe = _UNSAFE.sub("_", value)
    if safe == value:
        return value
    return f"{safe}_{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def config_topic(ha_prefix: str, topics: Topics, camera: str) -> str:
    return f"{ha_prefix}/sensor/{safe_id(topics.prefix)}/{safe_id(camera)}/config"


def model_name(plan: PlanMsg | None) -> str:
    """The device model: the bundle the camera's answers come from (a plan names no bundle
    by name; its sha256 is stable across the plans a planner re-places)."""
    if plan is None:
        return "ED-ViT"
    untrained = " (untrained: random weights)" if plan.untrained else ""
    return f"ED-ViT bundle {plan.bundle_sha256[:12]}{untrained}"


def sensor_config(topics: Topics, camera: str, plan: PlanMsg | None = None) -> dict[str, object]:
    """The discovery config of the sensor for `camera`'s predictions."""
    node_id, object_id = safe_id(topics.prefix), safe_id(camera)
    unique_id = f"edvit_{node_id}_{object_id}"
    predictions = topics.predictions(camera)
    return {
        "name": "Prediction",
        "unique_id": unique_id,
        "state_topic": predictions,
        "value_template": STATE_TEMPLATE,
        "json_attributes_topic": predictions,
        "json_attributes_template": ATTRIBUTES_TEMPLATE,
        "qos": 1,
        "icon": "mdi:cctv",
        "availability": [
            {
                "topic": topics.aggregator_status(),
                "value_template": AVAILABILITY_TEMPLATE,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ],
        "device": {
            "identifiers": [unique_id],
            "name": f"edvit {camera}",
            "manufacturer": "edvit",
            "model": model_name(plan),
        },
        "origin": {"name": "edvit", "sw_version": __version__},
    }


class HaDiscovery:
    """Publishes each camera's config once (again only when its device model changes, i.e.
    a different bundle is deployed). Thread-safe: the aggregator answers from two threads."""

    def __init__(
        self, client: Transport, topics: Topics, ha_prefix: str = DEFAULT_HA_PREFIX
    ) -> None:
        self.client = client
        self.topics = topics
        self.ha_prefix = check_ha_prefix(ha_prefix)
        self._announced: dict[str, str] = {}  # camera -> the model its config names
        self._full_warned = False
        self._lock = threading.Lock()

    def saw(self, camera: str, plan: PlanMsg | None = None) -> bool:
        """A camera was answered: announce it if that is new. Whether a config was sent."""
        try:
            validate_id("camera", camera)
        except ValueError:
            return False  # answered all the same, on a topic no sensor can name
        model = model_name(plan)
        with self._lock:
            if self._announced.get(camera) == model:
                return False
            if camera not in self._announced and len(self._announced) >= MAX_CAMERAS:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("%d cameras announced; not announcing more", MAX_CAMERAS)
                return False
            self._announced[camera] = model
        config = sensor_config(self.topics, camera, plan)
        self.client.publish(
            config_topic(self.ha_prefix, self.topics, camera),
            json.dumps(config, separators=(",", ":")),
            qos=1,
            retain=True,
        )
        self.client.counters["ha_configs"] += 1
        log.info("announced camera %s to Home Assistant", camera)
        return True
