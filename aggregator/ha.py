"""Home Assistant MQTT discovery: one sensor per camera (README, "Home Assistant").

Each camera gets one retained config under `{ha_prefix}/sensor/{node_id}/{object_id}/config`
(node_id from the topic prefix, object_id from the camera id), published by the answering
aggregator when it answers the camera's first frame, and again after it reconnects to the
broker (a broker restarted without persistence has lost it) or when the deployed bundle
changes.

The sensor's state topic is `{ha_prefix}/sensor/{node_id}/{object_id}/state`: the camera's
latest prediction (the PredictionMsg JSON), retained, so that a Home Assistant that
(re)starts shows the current class at once. It is a topic of its own, not the prediction
stream: the stream stays unretained, so the standby aggregator (which drops the frames it
sees answered), the dashboard and `edvit watch` never get an old prediction delivered as a
new one when they subscribe. The state is published when the class or the degraded flag
changes and otherwise at most once every `STATE_INTERVAL_S`, so Home Assistant's recorder
does not write a row per frame; the class shown is always the latest, the attributes (score,
latency, seq, untrained) at most that old. A bundle of random weights
(untrained) is also named in the device model.

A sensor is available while the serving aggregator's retained status says it answers: not
after a clean stop (status `offline`), a crash or a network cut (the broker sends the Will,
`offline`, at once or after the keepalive, ~8 s), nor while Home Assistant is cut off from
the broker. Key names follow https://www.home-assistant.io/integrations/sensor.mqtt/ (full
names, no abbreviations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time

from edvit import __version__
from edvit.errors import ConfigError
from edvit.mqtt import Transport
from edvit.schemas import PlanMsg, PredictionMsg
from edvit.topics import DEFAULT_HA_PREFIX, Topics, validate_id

log = logging.getLogger("edvit.aggregator.ha")

# More cameras than this are not announced: a node may publish features for any camera id,
# and every config stays retained in the broker and becomes an entity in Home Assistant.
MAX_CAMERAS = 256
# A camera's retained state is published when its class or degraded flag changes, else at
# most this often.
STATE_INTERVAL_S = 1.0

STATE_TEMPLATE = "{{ value_json['class'] }}"
ATTRIBUTES_TEMPLATE = (
    "{{ {'score': value_json.score, 'latency_ms': value_json.latency_ms, "
    "'degraded': value_json.degraded, 'seq': value_json.seq, "
    "'plan_id': value_json.plan_id, "
    "'untrained': value_json.untrained | default(false)} | tojson }}"
)
# The aggregator status (edvit.schemas.StatusMsg) says "ready" when it serves the newest
# plan and "online" with a serving_plan_id while a newer one loads: both answer frames. A
# clean stop keeps the serving_plan_id it had in its "offline" status: the state decides.
AVAILABILITY_TEMPLATE = (
    "{{ 'online' if value_json.state != 'offline' and "
    "(value_json.state == 'ready' or value_json.serving_plan_id) else 'offline' }}"
)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]")


def check_ha_prefix(prefix: str) -> str:
    """The discovery prefix as Home Assistant's `discovery_prefix` setting names it: topic
    levels without wildcards, empty levels or spaces (it also becomes an ACL line)."""
    levels = prefix.split("/")
    bad = (
        not prefix
        or any(not level for level in levels)
        or any(c in prefix for c in "+#")
        or any(c.isspace() or not c.isprintable() for c in prefix)
    )
    if bad:
        raise ConfigError(
            f"invalid Home Assistant discovery prefix {prefix!r}: use topic levels such as "
            "'homeassistant', without '+', '#', spaces or empty levels"
        )
    return prefix


def safe_id(value: str) -> str:
    """A discovery topic level Home Assistant accepts ([a-zA-Z0-9_-]+) for any edvit id.

    Ids that need changing get a short hash of the original, so that e.g. `cam.1` and
    `cam_1` stay two sensors."""
    safe = _UNSAFE.sub("_", value)
    if safe == value:
        return value
    return f"{safe}_{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def sensor_topic(ha_prefix: str, topics: Topics, camera: str) -> str:
    """`{ha_prefix}/sensor/{node_id}/{object_id}`: the config and state topics' stem."""
    return f"{ha_prefix}/sensor/{safe_id(topics.prefix)}/{safe_id(camera)}"


def config_topic(ha_prefix: str, topics: Topics, camera: str) -> str:
    return f"{sensor_topic(ha_prefix, topics, camera)}/config"


def state_topic(ha_prefix: str, topics: Topics, camera: str) -> str:
    """Retained: the camera's latest prediction, for Home Assistant only."""
    return f"{sensor_topic(ha_prefix, topics, camera)}/state"


def acl_topics(ha_prefix: str, topics: Topics) -> str:
    """The filter of every topic the aggregator publishes for Home Assistant."""
    return f"{ha_prefix}/sensor/{safe_id(topics.prefix)}/#"


def model_name(plan: PlanMsg | None) -> str:
    """The device model: the bundle the camera's answers come from (a plan names no bundle
    by name; its sha256 is stable across the plans a planner re-places)."""
    if plan is None:
        return "ED-ViT"
    untrained = " (untrained: random weights)" if plan.untrained else ""
    return f"ED-ViT bundle {plan.bundle_sha256[:12]}{untrained}"


def sensor_config(
    topics: Topics, camera: str, plan: PlanMsg | None = None, ha_prefix: str = DEFAULT_HA_PREFIX
) -> dict[str, object]:
    """The discovery config of the sensor for `camera`'s predictions."""
    node_id, object_id = safe_id(topics.prefix), safe_id(camera)
    unique_id = f"edvit_{node_id}_{object_id}"
    predictions = state_topic(ha_prefix, topics, camera)
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
    """Announces each camera and keeps its retained state (module docstring). Thread-safe:
    the aggregator answers from two threads."""

    def __init__(
        self, client: Transport, topics: Topics, ha_prefix: str = DEFAULT_HA_PREFIX
    ) -> None:
        self.client = client
        self.topics = topics
        self.ha_prefix = check_ha_prefix(ha_prefix)
        self._announced: dict[str, str] = {}  # camera -> the model its config names
        # camera -> (class, degraded, monotonic time) of its last published state
        self._states: dict[str, tuple[str, bool, float]] = {}
        self._connects = -1  # the client's connect count when announced: a reconnect forgets
        self._full_warned = False
        self._lock = threading.Lock()

    def answered(self, prediction: PredictionMsg, payload: bytes, plan: PlanMsg) -> None:
        """The aggregator published `prediction` (encoded as `payload`): announce its camera
        if that is new, and publish the camera's state if it is due."""
        camera = prediction.camera
        self.saw(camera, plan)
        now = time.monotonic()
        with self._lock:
            if camera not in self._announced:
                return  # not announced (an id no topic can have, too many cameras)
            last = self._states.get(camera)
            key = (prediction.class_name, prediction.degraded)
            if last is not None and last[:2] == key and now - last[2] < STATE_INTERVAL_S:
                return
            self._states[camera] = (*key, now)
        self.client.publish(
            state_topic(self.ha_prefix, self.topics, camera), payload, qos=1, retain=True
        )
        self.client.counters["ha_states"] += 1

    def saw(self, camera: str, plan: PlanMsg | None = None) -> bool:
        """A camera was answered: announce it if that is new. Whether a config was sent."""
        try:
            validate_id("camera", camera)
        except ValueError:
            return False  # answered all the same, on a topic no sensor can name
        model = model_name(plan)
        with self._lock:
            connects = self.client.counters["connects"]
            if connects != self._connects:
                # Connected again: the broker may have lost what was retained (no
                # persistence). Announce every camera and publish its state again.
                self._connects = connects
                self._announced.clear()
                self._states.clear()
            if self._announced.get(camera) == model:
                return False
            if camera not in self._announced and len(self._announced) >= MAX_CAMERAS:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("%d cameras announced; not announcing more", MAX_CAMERAS)
                return False
            self._announced[camera] = model
        config = sensor_config(self.topics, camera, plan, self.ha_prefix)
        self.client.publish(
            config_topic(self.ha_prefix, self.topics, camera),
            json.dumps(config, separators=(",", ":")),
            qos=1,
            retain=True,
        )
        self.client.counters["ha_configs"] += 1
        log.info("announced camera %s to Home Assistant", camera)
        return True
