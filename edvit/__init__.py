"""edvit: Vision Transformers split across IoT boards that talk only over MQTT.

This package is the shared wire contract: topic names, payload schemas, the bundle
manifest, frame preprocessing and the one MQTT client wrapper every service uses.
The services live in edvit.broker, edvit.edge_node, edvit.aggregator,
edvit.camera_source; model building in edvit.models.
"""

__version__ = "0.1.0"
WIRE_VERSION = 1
