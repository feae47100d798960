"""Head slices on the camera: run the patch embedding and the first J stem blocks here and
send tokens instead of the frame (`edvit camera --head-slices J`).

The camera learns the stem from the retained plan and fetches the slices it needs from
the retained model topics, verifying each sha256, exactly as a node does.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from edvit.bundle import IMAGE_INPUT, TOKENS_INPUT, TOKENS_OUTPUT, sha256_bytes
from edvit.errors import ConfigError, IntegrityError
from edvit.inference import make_session
from edvit.mqtt import MqttClient
from edvit.preprocess import to_model_input
from edvit.schemas import FeatureDtype, ModelMsg, PlanMsg, StemRef, decode
from edvit.topics import Topics

log = logging.getLogger("edvit.camera")


class HeadSlices:
    """The first `count` stem blocks, fetched over MQTT: image -> tokens at block `count`."""

    def __init__(self, count: int, dtype: FeatureDtype = "float32", threads: int = 1) -> None:
        if count < 1:
            raise ConfigError("--head-slices must be at least 1 to send tokens")
        self.count, self.dtype, self.threads = count, dtype, threads
        self.plan: PlanMsg | None = None
        self._blobs: dict[str, bytes] = {}
        self._needed: dict[str, str] = {}
        self._plan_seen = threading.Event()
        self._complete = threading.Event()
        self._error: ConfigError | None = None

    def fetch(self, client: MqttClient, topics: Topics, timeout: float = 30.0) -> None:
        """Wait for the plan and the slices; raise ConfigError if they do not fit or come."""

        def on_model(topic: str, payload: bytes) -> None:
            model_id = topics.parts(topic)[1]
            msg = decode(ModelMsg, payload)
            if msg is None or model_id not in self._needed:
                return
            actual = sha256_bytes(msg.onnx)
            if actual != self._needed[model_id] or msg.sha256 != actual:
                raise IntegrityError(f"refusing slice {model_id}: sha256 does not match the plan")
            self._blobs[model_id] = msg.onnx
            if set(self._blobs) == set(self._needed):
                self._complete.set()

        def on_plan(_topic: str, payload: bytes) -> None:
            plan = decode(PlanMsg, payload)
            if plan is None or self._plan_seen.is_set():
                return
            self.plan = plan
            stem = plan.stem
            if stem is None:
                self._error = ConfigError(
                    "the deployed bundle has no shared stem; build it with --shared-blocks K "
                    "to use --head-slices"
                )
            elif self.count > stem.blocks:
                self._error = ConfigError(
                    f"--head-slices {self.count} asks for more blocks than the bundle's stem "
                    f"has ({stem.blocks})"
                )
            else:
                ids = [StemRef.EMBED_ID, *(StemRef.block_id(i) for i in range(self.count))]
                self._needed = {i: stem.slices[i] for i in ids}
                for model_id in ids:
                    client.route(topics.model(model_id), on_model, qos=1)
            self._plan_seen.set()

        client.route(topics.plan(), on_plan, qos=1)
        if not self._plan_seen.wait(timeout):
            raise ConfigError(f"no plan on {topics.plan()} within {timeout:.0f} s; deploy first")
        if self._error is not None:
            raise self._error
        if not self._complete.wait(timeout):
            missing = sorted(set(self._needed) - set(self._blobs))
            raise ConfigError(f"stem slices {missing} did not arrive within {timeout:.0f} s")
        self._embed = make_session(self._blobs[StemRef.EMBED_ID], self.threads)
        self._blocks = [
            make_session(self._blobs[StemRef.block_id(i)], self.threads) for i in range(self.count)
        ]
        log.info("running %d head slices here; sending tokens", self.count)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 image (BGR or grey) -> tokens [T, D] at block `count`, in `dtype`."""
        assert self.plan is not None
        x = to_model_input(image, self.plan.preprocessing)[None]
        tokens = self._embed.run([TOKENS_OUTPUT], {IMAGE_INPUT: x})[0]
        for block in self._blocks:
            tokens = block.run([TOKENS_OUTPUT], {TOKENS_INPUT: tokens})[0]
        return tokens[0].astype(np.float16 if self.dtype == "float16" else np.float32)
