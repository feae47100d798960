"""Limits of the wire contract (v1): what any service refuses before it spends work on it.

Anything on the network can publish anything, so every size that becomes memory or CPU
time is bounded here, in one place: payload bytes per topic kind (checked before a payload
is decoded), frame pixels (checked from the image header before it is decoded), and the
ints of the schemas that become array sizes, loop counts or keys.
"""

from __future__ import annotations

from typing import Literal

KiB = 1024
MiB = 1024 * KiB

# 4K UHD (3840 x 2160). A node resizes every frame to the model's input (28x28 to 384x384),
# so more pixels only cost decode time: a 100 MP PNG of 97 KB took 0.5-1 s to decode.
MAX_FRAME_PIXELS = 3840 * 2160
# Per side, raw shape entries included: JPEG's own maximum (16-bit dimensions).
MAX_FRAME_SIDE = 65_535
# Token rows/width, feature widths, the model's input height/width: 8192 is 10x ViT-H's
# width (1280) and 20x the largest usual input side (384).
MAX_TENSOR_DIM = 8192
# Blocks of a shared stem (ViT-H has 32, ViT-22B 48); a plan's validation loops over them.
MAX_STEM_BLOCKS = 256
# How many frames one inference call may have served (the node's --max-batch).
MAX_BATCH = 4096

# Capture times are unix seconds; 1e10 is the year 2286.
MAX_TIMESTAMP_S = 1e10
# A feature vector's largest magnitude. Sub-model features are LayerNorm outputs (tens at
# most); beyond this the fusion's logits can overflow to infinity.
MAX_FEATURE_ABS = 1e6

PayloadKind = Literal[
    "frame",
    "tokens",
    "features",
    "plan",
    "status",
    "prediction",
    "model",
    "health",
    "lease",
    "stats",
]

# Largest payload (bytes) per topic kind; anything longer is dropped before decoding.
MAX_PAYLOAD_BYTES: dict[PayloadKind, int] = {
    # A grey raw frame at MAX_FRAME_PIXELS (8.3 MB) fits, and any JPEG/PNG of a 4K camera;
    # a colour raw 4K frame (25 MB) must be sent encoded. Kept this low because a client
    # reads a whole packet before it can drop it: a node's network thread stalls ~60 ms on
    # an 8 MiB frame, ~0.25 s on a 32 MiB one (measured with edvit bench chaos, hostile).
    "frame": 8 * MiB,
    # 577 tokens x 1024 float32 (ViT-L at 384 px) is 2.4 MB.
    "tokens": 4 * MiB,
    # MAX_TENSOR_DIM float32 values are 32 KiB, plus ids.
    "features": 64 * KiB,
    # JSON: class names (ImageNet-1k's are ~20 KB), sub-models, assignments.
    "plan": 1 * MiB,
    "status": 64 * KiB,
    "prediction": 64 * KiB,
    # JSON: the planner's view of the fleet, a line per node and moved sub-model.
    "health": 256 * KiB,
    # JSON: {holder, ttl_s, ts}.
    "lease": 4 * KiB,
    # JSON: counters, frames per camera (at most 256), stage percentiles.
    "stats": 256 * KiB,
    # One ONNX file. ViT-Base split in two (~165 MB fp32 per sub-model) fits; MQTT itself
    # caps a packet at 256 MiB, and the broker keeps retained model files in memory.
    "model": 192 * MiB,
}

# MQTT 5 message expiry (seconds) per topic kind: the broker discards a message older than
# this instead of delivering it, so a node that reconnects, or falls behind, is not handed
# a backlog of frames nobody waits for any more (the aggregator answers within ~10 ms).
MESSAGE_EXPIRY_S: dict[PayloadKind, int] = {"frame": 2, "tokens": 2}

# The broker's `max_packet_size`: the largest payload plus room for the topic and headers.
MAX_PACKET_BYTES = max(MAX_PAYLOAD_BYTES.values()) + 1 * MiB


def max_payload_bytes(kind: PayloadKind) -> int:
    """The largest payload (bytes) the contract accepts on a topic of this kind."""
    return MAX_PAYLOAD_BYTES[kind]


def topic_kind(parts: list[str] | tuple[str, ...]) -> PayloadKind | None:
    """The payload kind of a topic, given its parts after the prefix (`Topics.parts`);
    None for a topic that is not in the contract."""
    match tuple(parts):
        case ("cameras", _, "frame"):
            return "frame"
        case ("cameras", _, "tokens"):
            return "tokens"
        case (
            ("cameras", _, "status")
            | ("nodes", _, "status")
            | ("aggregator", "status")
            | ("aggregators", _, "status")
        ):
            return "status"
        case ("aggregator", "lease") | ("aggregator", "lease", _):
            return "lease"
        case ("fleet", "health"):
            return "health"
        case ("stats", "nodes" | "aggregators" | "cameras", _):
            return "stats"
        case ("plan",):
            return "plan"
        case ("models", _):
            return "model"
        case ("features", _, _) | ("features", _, _, _):
            return "features"
        case ("predictions", _):
            return "prediction"
    return None
