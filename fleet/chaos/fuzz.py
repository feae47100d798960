"""The hostile payloads of the `hostile` chaos scenario (scenarios.scenario_hostile), which
publishes thousands of them on every topic of the fleet's prefix while a good camera streams.

An in-process publisher (a plain `MqttClient` on the chaos broker) sends a mix, spread
over `seconds`, of:

- frames and tokens on other cameras' topics and on the good camera's own topic: random
  bytes, valid messages with one or two fields (nested ones too) replaced by hostile
  values (NaN, infinities, huge ints, empty and very long strings, wrong types, nested
  junk), frames whose encoding, shape and data disagree, frames that declare 4000 x 4000+
  pixels; a few valid odd frames on fake cameras (served and answered: extra load);
- features (malformed, or for plans that do not exist), plans (malformed only, never
  retained, never empty), model files on the plan's model topics (malformed or with a
  sha256 that does not match their bytes; never retained), statuses of fake nodes
  (malformed, or valid and offline), the shared aggregator status, the aggregator lease
  (malformed, or a valid claim by a holder that sorts after the real one), predictions,
  topics nobody follows; and payloads one byte over each topic kind's limit.

What it never sends, because it is not malformed input but a forged message that only an
ACL can stop: a valid plan, a sound model file, a status that makes a fake node live, a
lease that takes the lease away, features of the served plan, or any valid frame on the
good camera's topic (it would be answered as the good camera's).

Each payload is classified when it is made, with the same decoding the services use, by
which service must count it in `bad_payloads`: the nodes (frames, tokens, plans, their
model files), the aggregator (features, plans, the fusion file, node statuses, the shared
status, the lease; the planner shares its client, so once). Not counted, by design:
payloads on topics no service follows (camera and aggregator instance statuses, fleet
health, unknown topics), predictions (the answering aggregator ignores answers without
reading them; only an over-limit one is counted, before any handler), and what is valid
(served frames, features of unknown plans, offline statuses, a lease claim).

At the end the scenario stops the fleet cleanly, so that every service publishes its final
counters in its offline status, and compares them with what it sent. The counts are exact
only while every node follows frames: a node the planner leaves without work unsubscribes
(`plans_during_run` says whether that happened).

The default mix has two frames one byte over the 8 MiB frame limit (OVERSIZED). The
broker accepts them (its max_packet_size is the model limit), and paho reads each whole
before `deliver` can drop it: ~0.25 s of every node's network thread, long enough for the
aggregator to suspect nodes and the planner to re-place them, and glibc may keep tens of MB
of the buffers. `oversized={**OVERSIZED, "frame": 0}` leaves them out.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np

from edvit.bundle import sha256_bytes
from edvit.errors import BadPayload
from edvit.lease import LeaseMsg
from edvit.limits import MAX_PAYLOAD_BYTES, PayloadKind
from edvit.mqtt import MqttClient, payload_limit, unique_client_id
from edvit.preprocess import check_frame, decode_frame
from edvit.process import rss_mb
from edvit.schemas import (
    FeaturesMsg,
    FrameMsg,
    ModelMsg,
    PlanMsg,
    PredictionMsg,
    StatusMsg,
    TokensMsg,
    decode,
    encode,
)
from edvit.topics import FUSION_MODEL_ID, Topics

GOOD_CAMERA = "cam-good"
AGGREGATOR = "agg-a"  # ChaosFleet.start's first aggregator
FAKE_CAMERAS = ("cam-x", "cam-y", "", "ünï", "c" * 200, "cam good")
FAKE_NODES = ("fake-0", "fake-1", "node-9", "", "x" * 300, "ünï")
NAN, INF = float("nan"), float("inf")
LONG = "x" * 70_000  # longer than the features, status, prediction and lease limits
SPECIAL: tuple[Any, ...] = (
    NAN, INF, -INF, 2**62, -1, 0, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -1e308, 5e-324,
    -0.0, True, False, None, "", LONG, "\x00\n\u202e\ufeff", "ünïcödé", [], {}, [[[]]],
    [NAN] * 3, {"a": [1, {"b": NAN}]}, [1, "a", None], {"v": 1},
)  # fmt: skip
# Payloads one byte over their topic kind's limit, how many of each (a frame's is 8 MiB).
OVERSIZED: dict[PayloadKind, int] = {
    "frame": 2, "tokens": 4, "plan": 4, "features": 20, "status": 20, "prediction": 20,
    "lease": 20,
}  # fmt: skip


@dataclass(frozen=True)
class Hostile:
    """One payload to publish, and who must count it as bad."""

    topic: str
    payload: bytes
    kind: str  # what it is: "frame", "frame-valid", "oversized-plan", ...
    counted_by: tuple[str, ...]  # services that must count it in bad_payloads
    seen_by: tuple[str, ...]  # services that subscribe to its topic
    too_large: bool  # over its topic's limit: dropped before decoding (payloads_too_large)


# -- hostile values ----------------------------------------------------------------------------
def _junk(rng: random.Random, json_text: bool, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(SPECIAL)
    if roll < 0.55:
        return rng.choice((rng.randint(-(2**63), 2**64 - 1), rng.randint(-5, 300)))
    if roll < 0.65:
        return rng.choice((rng.uniform(-1e9, 1e9), struct.unpack("<d", rng.randbytes(8))[0]))
    if roll < 0.75:
        return "".join(chr(rng.randint(32, 0x2FF)) for _ in range(rng.randint(0, 20)))
    if roll < 0.85 and not json_text:
        return rng.randbytes(rng.randint(0, 40))
    if depth < 2:
        if rng.random() < 0.5:
            return [_junk(rng, json_text, depth + 1) for _ in range(rng.randint(0, 3))]
        return {str(_junk(rng, True, 2))[:8]: _junk(rng, json_text, depth + 1)
                for _ in range(rng.randint(0, 3))}  # fmt: skip
    return None


def plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def field_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += field_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:4]):
            found += field_paths(item, (*prefix, i))
    return found


def mutate(rng: random.Random, base: dict[str, Any], json_text: bool) -> dict[str, Any]:
    """`base` with one or two fields (nested ones too) replaced, deleted or added."""
    message = copy.deepcopy(base)
    paths = field_paths(message) + [("extra",), ("v",)]
    for _ in range(rng.randint(1, 2)):
        path = rng.choice(paths)
        target: Any = message
        try:
            for key in path[:-1]:
                target = target[key]
            if rng.random() < 0.25:
                del target[path[-1]]
            else:
                target[path[-1]] = _junk(rng, json_text)
        except (KeyError, IndexError, TypeError):
            continue
    return message


def msgpack_bytes(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def png_bytes(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("cv2 could not encode a PNG")
    return data.tobytes()


def png_header(width: int, height: int, depth: int = 8) -> bytes:
    """A PNG that declares width x height and carries no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def frame_outcome(camera: str, payload: bytes) -> bool | None:
    """What a node does with a frame on `camera`'s topic: True refuses it, False serves it,
    None ignores it (empty)."""
    try:
        frame = decode(FrameMsg, payload)
        if frame is None:
            return None
        if frame.camera != camera:
            return True
        decode_frame(frame)
    except BadPayload:
        return True
    return False


def refused_on_arrival(camera: str, payload: bytes) -> bool:
    """Whether a node refuses a frame on `camera`'s topic as it arrives (its message,
    camera, encoding or image header), rather than when it decodes the pixels to serve it:
    a frame of the second kind that a newer frame replaces before it is served is never
    decoded, so it is counted as replaced, not as bad."""
    try:
        frame = decode(FrameMsg, payload)
        if frame is None or frame.camera != camera:
            return frame is not None
        check_frame(frame)
    except BadPayload:
        return True
    return False


# -- the generator ---------------------------------------------------------------------------------
class HostileGenerator:
    """Makes hostile payloads for the fleet of `plan` under `topics`, each classified."""

    def __init__(
        self,
        topics: Topics,
        plan: PlanMsg,
        *,
        good_camera: str = GOOD_CAMERA,
        aggregator: str = AGGREGATOR,
        seed: int = 0,
        oversized: dict[PayloadKind, int] | None = None,
    ) -> None:
        self.topics, self.plan, self.good = topics, plan, good_camera
        self.oversized_counts = OVERSIZED if oversized is None else oversized
        self.aggregator = aggregator
        self.rng = random.Random(seed)
        self.nodes = tuple(sorted(n for n, ids in plan.assignments.items() if ids))
        self.model_readers = {
            sid: (node,) for node, ids in plan.assignments.items() for sid in ids
        } | {FUSION_MODEL_ID: (aggregator,)}
        self._image = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
        self._png = png_bytes(self._image)
        self.makers: list[tuple[float, Callable[[], Hostile | None]]] = [
            (18, lambda: self.frame(self.rng.choice(FAKE_CAMERAS))),
            (10, lambda: self.frame(self.good)),
            (1.5, self.valid_frame),
            (8, self.tokens),
            (12, self.features),
            (3, self.features_of_another_plan),
            (6, self.plan_message),
            (6, self.model),
            (8, self.node_status),
            (1, self.offline_status),
            (3, self.shared_status),
            (5, self.lease),
            (0.5, self.lease_claim),
            (6, self.prediction),
            (4, self.unseen),
        ]

    # -- classification -----------------------------------------------------------------------
    def readers(self, topic: str) -> tuple[str, ...]:
        parts = tuple(self.topics.parts(topic))
        match parts:
            case ("cameras", _, "frame" | "tokens"):
                return self.nodes
            case ("plan",):
                return (*self.nodes, self.aggregator)
            case ("models", model_id):
                return self.model_readers.get(model_id, ())
            case (
                ("nodes", _, "status")
                | ("features", _, _)
                | ("features", _, _, _)
                | ("aggregator", "status" | "lease")
            ):
                return (self.aggregator,)
            case ("predictions", _):
                return ()  # only a standby reads the answers, and this fleet has none
        return ()

    def _hostile(self, topic: str, payload: bytes, kind: str, bad: bool) -> Hostile:
        readers = self.readers(topic)
        too_large = len(payload) > payload_limit(topic)
        counted = readers if (bad or too_large) else ()
        return Hostile(topic, payload, kind, counted, readers, too_large)

    def _bytes_or(self, mutated: Callable[[], bytes]) -> bytes:
        if self.rng.random() < 0.3:
            return self.rng.randbytes(self.rng.randint(1, 300))
        return mutated()

    # -- frames and tokens ---------------------------------------------------------------------
    def _frame_base(self, camera: str) -> dict[str, Any]:
        message = FrameMsg(camera=camera, seq=self.rng.randint(0, 2**40), ts=1.5, enc="png",
                           data=self._png, label=3)  # fmt: skip
        return plain(message.model_dump(mode="python"))

    def _inconsistent_frame(self, camera: str) -> bytes:
        rng = self.rng
        h, w, c = rng.randint(1, 40), rng.randint(1, 40), rng.choice((1, 3, 4))
        fields: dict[str, Any]
        match rng.randrange(7):
            case 0:  # raw, data of the wrong length
                fields = {"enc": "raw", "shape": [h, w, c], "dtype": "uint8",
                          "data": bytes(h * w * c + rng.choice((-1, 1, 7)))}  # fmt: skip
            case 1:  # raw with 2 channels
                fields = {"enc": "raw", "shape": [h, w, 2], "dtype": "uint8",
                          "data": bytes(h * w * 2)}  # fmt: skip
            case 2:  # png called jpeg
                fields = {"enc": "jpeg", "data": self._png}
            case 3:  # png cut short
                fields = {"enc": "png", "data": self._png[: rng.randint(1, len(self._png) - 1)]}
            case 4:  # 16-bit png
                fields = {"enc": "png", "data": png_bytes(self._image.astype(np.uint16) * 257)}
            case 5:  # a tiny file that declares a huge image
                fields = {"enc": "png", "data": png_header(rng.randint(4000, 2**31 - 1), 4000)}
            case _:  # jpeg garbage
                fields = {"enc": "jpeg", "data": b"\xff\xd8" + rng.randbytes(rng.randint(0, 64))}
        return msgpack_bytes({**self._frame_base(camera), "shape": None, "dtype": None, **fields})

    def frame(self, camera: str) -> Hostile | None:
        """A frame the nodes refuse (never a valid one: see valid_frame)."""
        rng = self.rng
        base = self._frame_base(camera if rng.random() < 0.8 else "elsewhere")
        roll = rng.random()
        if roll < 0.2:
            payload = self._inconsistent_frame(camera)
        else:
            payload = self._bytes_or(lambda: msgpack_bytes(mutate(rng, base, json_text=False)))
        if frame_outcome(camera, payload) is not True:
            return None  # valid or empty: not what this category sends
        if not refused_on_arrival(camera, payload):
            # Counted when a node decodes it, unless a newer frame replaced it first.
            return Hostile(self.topics.frame(camera), payload, "frame-bad-pixels", (),
                           self.readers(self.topics.frame(camera)), False)  # fmt: skip
        return self._hostile(self.topics.frame(camera), payload, "frame", True)

    def valid_frame(self) -> Hostile | None:
        """A valid but odd frame on a fake camera: served by every node and answered."""
        rng = self.rng
        h, w = rng.randint(1, 64), rng.randint(1, 64)
        image = np.frombuffer(rng.randbytes(h * w * 3), np.uint8).reshape(h, w, 3)
        ts = rng.choice((0.0, 1.5, 4e9, time.time() - 1e6))  # odd but valid; bad ones elsewhere
        if rng.random() < 0.5:
            pixels: dict[str, Any] = {"enc": "png", "data": png_bytes(image)}
        else:
            pixels = {"enc": "raw", "data": image.tobytes(), "shape": (h, w, 3), "dtype": "uint8"}
        camera = rng.choice(FAKE_CAMERAS)
        frame = FrameMsg(
            camera=camera, seq=rng.choice((0, 2**64 - 1, rng.randint(0, 2**40))), ts=ts,
            label=rng.choice((None, -1, 2**63 - 1)), **pixels,
        )  # fmt: skip
        payload = encode(frame)
        if frame_outcome(camera, payload) is not False:
            return None
        return self._hostile(self.topics.frame(camera), payload, "frame-valid", False)

    def tokens(self) -> Hostile | None:
        rng = self.rng
        camera = rng.choice((*FAKE_CAMERAS, self.good))
        rows, width = rng.randint(1, 64), rng.randint(1, 64)
        base = plain(TokensMsg(camera=camera, seq=1, ts=1.5, block=1, dtype="float32",
                                shape=(rows, width), data=bytes(rows * width * 4), label=2,
                                plan_id=self.plan.plan_id).model_dump(mode="python"))  # fmt: skip
        if rng.random() < 0.2:  # valid but inconsistent with the plan (which has no stem)
            payload = msgpack_bytes({**base, "block": rng.randint(0, 256)})
        else:
            payload = self._bytes_or(lambda: msgpack_bytes(mutate(rng, base, json_text=False)))
        # The shipped bundle has no stem: the nodes refuse every tokens message.
        return self._hostile(self.topics.tokens(camera), payload, "tokens", True)

    # -- features ---------------------------------------------------------------------------------
    def _features_base(self, sid: str, plan_id: str) -> dict[str, Any]:
        dim = self.plan.submodel(sid).feature_dim
        message = FeaturesMsg(
            camera=self.rng.choice(FAKE_CAMERAS), seq=self.rng.randint(0, 2**40), ts=1.5,
            submodel=sid, plan_id=plan_id, node="x", dtype="float32",
            data=np.ones(dim, np.float32).tobytes(), dim=dim, infer_ms=0.1, label=1,
        )  # fmt: skip
        return plain(message.model_dump(mode="python"))

    def _features_outcome(self, topic: str, payload: bytes) -> bool | None:
        """True: refused; False: valid for another plan (counted as such); None: valid for
        the served plan (forged: not sent) or empty."""
        try:
            message = decode(FeaturesMsg, payload)
        except BadPayload:
            return True
        if message is None:
            return None
        parts = self.topics.parts(topic)
        sid = parts[2]
        topic_node = parts[3] if len(parts) == 4 else message.node
        if (message.camera, message.submodel, message.node) != (parts[1], sid, topic_node):
            return True
        if message.plan_id != self.plan.plan_id:
            return False
        if sid not in self.plan.assignments.get(message.node, ()):
            return True  # a node speaking for a sub-model its plan did not give it
        try:
            return message.dim != self.plan.submodel(sid).feature_dim or None
        except KeyError:
            return True

    def features(self) -> Hostile | None:
        rng = self.rng
        sid = rng.choice([s.id for s in self.plan.submodels])
        base = self._features_base(sid, self.plan.plan_id)
        topic_sid = rng.choice((sid, sid, sid, "sub9", ""))
        payload = self._bytes_or(lambda: msgpack_bytes(mutate(rng, base, json_text=False)))
        topic_node = rng.choice(("x", "x", self.nodes[0]))
        topic = self.topics.features(base["camera"], topic_sid, topic_node)
        if self._features_outcome(topic, payload) is not True:
            return None
        return self._hostile(topic, payload, "features", True)

    def features_of_another_plan(self) -> Hostile | None:
        sid = self.rng.choice([s.id for s in self.plan.submodels])
        base = self._features_base(sid, self.rng.choice(("p-gone", "", "x" * 100)))
        topic = self.topics.features(base["camera"], sid, base["node"])
        payload = msgpack_bytes(base)
        if self._features_outcome(topic, payload) is not False:
            return None
        return self._hostile(topic, payload, "features-other-plan", False)

    # -- plan, models ------------------------------------------------------------------------
    def plan_message(self) -> Hostile | None:
        base = plain(json.loads(encode(self.plan)))
        if self.rng.random() < 0.5:
            base["plan_id"] = "fuzzed"
        payload = self._bytes_or(lambda: json_bytes(mutate(self.rng, base, json_text=True)))
        try:
            if decode(PlanMsg, payload) is None:
                return None  # never the empty plan: that is the (legitimate) clear
        except BadPayload:
            return self._hostile(self.topics.plan(), payload, "plan", True)
        return None  # a valid plan is not sent: it would be followed

    def model(self) -> Hostile | None:
        rng = self.rng
        model_id = rng.choice((*self.model_readers, "nope"))
        onnx = rng.randbytes(rng.randint(0, 64))
        sha = sha256_bytes(onnx) if rng.random() < 0.5 else sha256_bytes(onnx + b"!")
        base = plain(ModelMsg(sha256=sha, onnx=onnx).model_dump(mode="python"))
        payload = self._bytes_or(lambda: msgpack_bytes(mutate(rng, base, json_text=False)))
        try:
            message = decode(ModelMsg, payload)
        except BadPayload:
            message, bad = None, True
        else:
            if message is None:
                return None  # an empty payload: a clear, not sent on a real model topic
            bad = sha256_bytes(message.onnx) != message.sha256
        if not bad:
            return None  # a sound model file is not sent: a node would keep it
        return self._hostile(self.topics.model(model_id), payload, "model", True)

    # -- statuses, lease, predictions -----------------------------------------------------------
    def _status_base(self) -> dict[str, Any]:
        status = StatusMsg(
            state="ready", plan_id=self.plan.plan_id, submodels=("sub0",),
            serving_plan_id=self.plan.plan_id, counters={"frames_served": 3},
        )  # fmt: skip
        return plain(json.loads(encode(status)))

    def _bad_status(self) -> bytes | None:
        """A malformed status (None when the mutation happened to make a valid one: a status
        that makes a fake node live is a forgery, not sent)."""
        payload = self._bytes_or(lambda: json_bytes(mutate(self.rng, self._status_base(), True)))
        try:
            decode(StatusMsg, payload)
        except BadPayload:
            return payload
        return None

    def node_status(self) -> Hostile | None:
        payload = self._bad_status()
        if payload is None:
            return None
        topic = self.topics.node_status(self.rng.choice(FAKE_NODES))
        return self._hostile(topic, payload, "status", True)

    def offline_status(self) -> Hostile:
        node = self.rng.choice(FAKE_NODES)
        payload = encode(StatusMsg(state="offline"))
        # Valid, and dropped unseen, unless the topic names no valid node id ("").
        bad = not node or node != node.strip()
        return self._hostile(self.topics.node_status(node), payload, "status-offline", bad)

    def shared_status(self) -> Hostile | None:
        payload = self._bad_status()
        if payload is None:
            return None
        return self._hostile(self.topics.aggregator_status(), payload, "aggregator-status", True)

    def lease(self) -> Hostile | None:
        base = {"holder": "agg-q", "ttl_s": 3.0, "ts": time.time()}
        payload = self._bytes_or(lambda: json_bytes(mutate(self.rng, base, json_text=True)))
        try:
            LeaseMsg.model_validate_json(payload)
        except ValueError:
            return self._hostile(self.topics.aggregator_lease(), payload, "lease", True)
        return None  # valid: a claim that could take the lease away is a forgery

    def lease_claim(self) -> Hostile:
        """A valid claim by a holder that sorts after the real one: the holder renews."""
        payload = json.dumps({"holder": "zz-fake", "ttl_s": 3.0, "ts": time.time()}).encode()
        return self._hostile(self.topics.aggregator_lease(), payload, "lease-claim", False)

    def prediction(self) -> Hostile | None:
        rng = self.rng
        camera = rng.choice((*FAKE_CAMERAS, self.good))
        base = plain(json.loads(encode(PredictionMsg(
            camera=camera, seq=3, ts=1.5, label=1, class_name="Trouser", score=0.5,
            topk=(("Trouser", 0.5),), latency_ms=1.0, submodels=("sub0",),
            plan_id=self.plan.plan_id,
        ))))  # fmt: skip
        payload = self._bytes_or(lambda: json_bytes(mutate(rng, base, json_text=True)))
        if camera == self.good:
            try:
                if decode(PredictionMsg, payload) is not None:
                    return None  # a valid answer for the good camera would be counted as one
            except BadPayload:
                pass
        # The answering aggregator ignores answers without reading them: nobody counts it.
        return self._hostile(self.topics.predictions(camera), payload, "prediction", False)

    def unseen(self) -> Hostile:
        t, rng = self.topics, self.rng
        topic = rng.choice((
            t.camera_status(rng.choice(FAKE_CAMERAS)), t.aggregator_instance_status("fake"),
            t.fleet_health(), f"{t.prefix}/unknown/{rng.randint(0, 9)}", f"{t.prefix}/nodes/x",
        ))  # fmt: skip
        return self._hostile(topic, rng.randbytes(rng.randint(1, 200)), "unseen", True)

    # -- everything --------------------------------------------------------------------------------
    def oversized(self) -> list[Hostile]:
        topics = {
            "frame": self.topics.frame(FAKE_CAMERAS[0]),
            "tokens": self.topics.tokens(self.good),
            "plan": self.topics.plan(),
            "features": self.topics.features(FAKE_CAMERAS[0], "sub0", FAKE_NODES[0]),
            "status": self.topics.node_status(FAKE_NODES[0]),
            "prediction": self.topics.predictions(FAKE_CAMERAS[0]),
            "lease": self.topics.aggregator_lease(),
        }
        made = []
        for kind, count in self.oversized_counts.items():
            payload = b"\x00" * (MAX_PAYLOAD_BYTES[kind] + 1)
            made += [self._hostile(topics[kind], payload, f"oversized-{kind}", True)] * count
        return made

    def make(self, count: int) -> list[Hostile]:
        """`count` hostile payloads in a random order, the oversized ones among them."""
        made = self.oversized()[:count]
        weights = [w for w, _ in self.makers]
        while len(made) < count:
            maker = self.rng.choices(self.makers, weights)[0][1]
            hostile = maker()
            if hostile is not None:
                made.append(hostile)
        self.rng.shuffle(made)
        return made


# -- measuring -------------------------------------------------------------------------------------


class RssSampler:
    """RSS of some processes at the start, at the end and at their peak in between."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25) -> None:
        self.pids, self.interval_s = pids, interval_s
        self.start = {n: rss_mb(p) for n, p in pids.items()}
        self.peak = {n: v or 0.0 for n, v in self.start.items()}
        self.end: dict[str, float | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> dict[str, float | None]:
        now = {n: rss_mb(p) for n, p in self.pids.items()}
        for name, value in now.items():
            if value is not None:
                self.peak[name] = max(self.peak[name], value)
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.end = self._sample()


class CounterWatch:
    """The newest status (with counters) of each node and aggregator instance."""

    def __init__(self, topics: Topics, broker_url: str) -> None:
        self.topics = topics
        self.latest: dict[str, tuple[float, StatusMsg]] = {}
        self.lock = threading.Lock()
        self.client = MqttClient(unique_client_id("fuzz-watch"), broker_url)
        self.client.route(self.topics.all_node_statuses(), self._on_status, qos=1)
        self.client.route(self.topics.aggregator_instance_status("+"), self._on_status, qos=1)
        self.client.start(required=True)

    def _on_status(self, topic: str, payload: bytes) -> None:
        status = decode(StatusMsg, payload)
        if status is not None:
            with self.lock:
                self.latest[self.topics.parts(topic)[1]] = (time.time(), status)

    def counters(self, name: str) -> Counter[str]:
        with self.lock:
            found = self.latest.get(name)
        return Counter(found[1].counters) if found else Counter()

    def offline_since(self, name: str, since: float) -> bool:
        with self.lock:
            found = self.latest.get(name)
        return found is not None and found[0] >= since and found[1].state == "offline"

    def stop(self) -> None:
        self.client.stop()


def publish_spread(
    client: MqttClient, hostiles: list[Hostile], seconds: float, prefix: str
) -> tuple[list[Hostile], int]:
    """Publish at an even pace over `seconds`; returns what went out and the failures."""
    sent, failed = [], 0
    start = time.monotonic()
    period = seconds / max(len(hostiles), 1)
    for i, hostile in enumerate(hostiles):
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        info = client.publish(hostile.topic, hostile.payload, qos=0)
        if info.rc == 0:
            sent.append(hostile)
        else:
            failed += 1
    # QoS 0 goes out in order: once a QoS 1 message behind them is acknowledged, every
    # payload before it has reached the broker.
    client.publish_and_wait(f"{prefix}/fuzz/done", b"1", qos=1)
    return sent, failed


@dataclass
class HostileRun:
    """What one run measured, turned into figures by `figures`."""

    services: list[str]
    nodes: list[str]
    sent: list[Hostile]
    failed: int
    streamed_s: float
    frames: int
    answers: list[PredictionMsg]
    rss: RssSampler
    alive: dict[str, bool]
    camera_exit: int | None
    exit_codes: dict[str, int]
    final: dict[str, Counter[str]]
    final_read: dict[str, bool]
    plans: list[tuple[float, PlanMsg]]  # plans published during the run, seconds into it
    log_dir: Path


def figures(run: HostileRun) -> dict[str, Any]:
    sent, services, final, rss = run.sent, run.services, run.final, run.rss
    expected = Counter(name for h in sent for name in h.counted_by)
    expected_large = Counter(name for h in sent for name in h.counted_by if h.too_large)
    maybe = Counter(name for h in sent if h.kind == "frame-bad-pixels" for name in h.seen_by)
    counted = {n: final[n]["bad_payloads"] for n in services}
    counted_large = {n: final[n]["payloads_too_large"] for n in services}
    seqs = [p.seq for p in run.answers]
    node_deltas = [
        end - start for n in run.nodes
        if (end := rss.end.get(n)) is not None and (start := rss.start.get(n)) is not None
    ]  # fmt: skip
    peak_deltas = [rss.peak[n] - (rss.start[n] or 0.0) for n in run.nodes]
    failures = {
        n: {k: v for k, v in final[n].items()
            if (k.endswith("_errors") or k.endswith("_restarts")) and v}
        for n in services
    }  # fmt: skip
    kinds = Counter(h.kind for h in sent)
    answered = len(set(seqs))

    def mb(values: dict[str, float | None]) -> dict[str, float | None]:
        return {n: None if v is None else round(v, 1) for n, v in values.items()}

    return {
        "scenario": "hostile payloads on every topic while a good camera streams",
        "payloads_sent": len(sent),
        "payloads_failed_to_send": run.failed,
        "streamed_s": round(run.streamed_s, 1),
        "payloads_by_kind": dict(sorted(kinds.items())),
        "good_frames_sent": run.frames,
        "good_frames_answered": answered,
        "good_answered_fraction": round(answered / run.frames, 4) if run.frames else None,
        "good_unanswered": run.frames - answered,
        "good_answered_twice": len(seqs) - answered,
        "good_degraded": sum(p.degraded for p in run.answers),
        "good_p95_latency_ms": (
            round(float(np.percentile([p.latency_ms for p in run.answers], 95)), 1)
            if run.answers
            else None
        ),  # fmt: skip
        "rss_start_mb": mb(dict(rss.start)),
        "rss_end_mb": mb(dict(rss.end)),
        "rss_peak_mb": mb(dict(rss.peak)),
        "node_rss_max_delta_mb": round(max(node_deltas), 1) if node_deltas else None,
        "node_rss_max_peak_delta_mb": round(max(peak_deltas), 1) if peak_deltas else None,
        "all_processes_alive": all(run.alive.values()),
        "alive": run.alive,
        "camera_exit_code": run.camera_exit,
        "exit_codes": run.exit_codes,
        "final_counters_read": run.final_read,
        "handler_errors": sum(final[n]["handler_errors"] for n in services),
        "thread_failures": {n: f for n, f in failures.items() if f},
        "expected_bad_payloads": {n: expected[n] for n in services},
        "counted_bad_payloads": counted,
        "expected_too_large": {n: expected_large[n] for n in services},
        "counted_too_large": counted_large,
        "expected_bad_payloads_total": sum(expected[n] for n in services),
        "bad_payloads_total": sum(counted.values()),
        "uncounted": {n: expected[n] - counted[n] for n in services if counted[n] < expected[n]},
        "counted_beyond_expected": {
            n: counted[n] - expected[n] - maybe[n]
            for n in services
            if counted[n] > expected[n] + maybe[n]
        },
        "not_counted_by_design": {
            "no_subscriber": sum(1 for h in sent if not h.seen_by),
            "predictions_ignored_by_the_answering_aggregator": kinds["prediction"],
            "frames_bad_only_in_their_pixels": kinds["frame-bad-pixels"],
            "valid": sum(
                kinds[k]
                for k in ("frame-valid", "features-other-plan", "status-offline", "lease-claim")
            ),  # fmt: skip
        },
        # A node the planner leaves without work stops following frames (and counting bad
        # ones): the counts are exact only when no plan changed during the run.
        "plans_during_run": [
            {"at_s": round(t, 2), "plan_id": p.plan_id, "assignments": dict(p.assignments)}
            for t, p in run.plans
        ],
        "nodes_suspected": sum(final[n]["nodes_suspected"] for n in services),
        "services_counters": {n: dict(final[n]) for n in services},
        "logs": str(run.log_dir),
    }
