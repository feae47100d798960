"""Camera source: publishes frames from a video file, a capture device, an RTSP stream or a
dataset's test split (with true labels) at a fixed rate."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edvit.datasets import load_dataset
from edvit.errors import ConfigError
from edvit.metrics import STATS_INTERVAL_S, Metrics, StatsPublisher
from edvit.mqtt import Connection, MqttClient, unique_client_id
from edvit.schemas import Encoding, FeatureDtype, FrameMsg, StatusMsg, TokensMsg, encode
from edvit.signing import TrustKey
from edvit.topics import Topics, validate_id

from .head import HeadSlices

log = logging.getLogger("edvit.camera")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"}


@dataclass(frozen=True)
class Shot:
    image: np.ndarray  # uint8 [H, W] or [H, W, 3] in BGR order
    label: int | None = None


def open_source(source: str, root: str | None = None) -> Iterator[Shot]:
    """Yield frames from `dataset:NAME`, an image file, a video file, a device index or a URL."""
    if source.startswith("dataset:"):
        return _dataset_shots(source.removeprefix("dataset:"), root)
    path = Path(source)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ConfigError(f"cannot read image file {source}")
        return iter([Shot(image)])
    if source.isdigit():
        capture = cv2.VideoCapture(int(source))
    elif "://" in source:
        capture = cv2.VideoCapture(source)
    elif path.is_file():
        capture = cv2.VideoCapture(str(path))
    else:
        raise ConfigError(
            f"source {source!r} is not dataset:NAME, an existing file, a device index or a URL"
        )
    if not capture.isOpened():
        raise ConfigError(f"OpenCV cannot open video source {source!r}")
    return _capture_shots(capture)


def _dataset_shots(name: str, root: str | None) -> Iterator[Shot]:
    dataset = load_dataset(name, "test", root)  # here, not in the generator: fail at start
    # Datasets hold RGB; frames on the wire are BGR like everything from OpenCV.
    return (
        Shot(image if image.ndim == 2 else image[..., ::-1], int(label))
        for image, label in zip(dataset.images, dataset.labels, strict=True)
    )


def _capture_shots(capture: cv2.VideoCapture) -> Iterator[Shot]:
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                return
            yield Shot(image)
    finally:
        capture.release()


def encode_image(image: np.ndarray, enc: Encoding, jpeg_quality: int = 90) -> tuple[bytes, dict]:
    """Return the frame bytes and the extra FrameMsg fields the encoding needs."""
    if enc == "raw":
        return np.ascontiguousarray(image).tobytes(), {"shape": image.shape, "dtype": "uint8"}
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if enc == "jpeg" else []
    ok, buffer = cv2.imencode(f".{'jpg' if enc == 'jpeg' else 'png'}", image, params)
    if not ok:
        raise ConfigError(f"OpenCV cannot encode a {image.shape} frame as {enc}")
    return buffer.tobytes(), {"shape": image.shape}


class Camera:
    def __init__(
        self,
        camera_id: str,
        broker: str | Connection,
        source: str,
        *,
        fps: float = 10.0,
        count: int | None = None,
        loop: bool = False,
        enc: Encoding | None = None,
        data_dir: str | None = None,
        topics: Topics | None = None,
        head_slices: int = 0,
        tokens_dtype: FeatureDtype = "float32",
        trust_key: TrustKey | None = None,
        stats_interval_s: float = STATS_INTERVAL_S,
        state_dir: Path | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        try:
            self.camera_id = validate_id("camera", camera_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if fps <= 0:
            raise ConfigError("--fps must be positive")
        if count is not None and count < 0:
            raise ConfigError("--count must not be negative")
        self.source, self.data_dir = source, data_dir
        self.fps, self.count, self.loop = fps, count, loop
        if size is not None and min(size) < 1:
            raise ConfigError(f"--size needs positive sides, not {size[0]}x{size[1]}")
        # (width, height) every frame is resized to before it is encoded: the model's input
        # size spares every node the decoding and resizing of a larger frame.
        self.size = size
        # Dataset replay defaults to lossless PNG so fleet and offline results are comparable.
        self.enc: Encoding = enc or ("png" if source.startswith("dataset:") else "jpeg")
        self.topics = topics or Topics()
        self.client = MqttClient(
            unique_client_id(f"camera-{camera_id}"),
            broker,
            status_topic=self.topics.camera_status(camera_id),
            logger=log,
        )
        self.sent = 0
        self.metrics = Metrics("camera", self.camera_id, self.client.counters)
        self.stats = StatsPublisher(
            self.metrics, self.client, self.topics.stats("cameras", self.camera_id),
            stats_interval_s, log,
        )  # fmt: skip
        self._shots = open_source(source, data_dir)  # fail fast on a bad source
        self._head = (
            HeadSlices(head_slices, tokens_dtype, trust_key=trust_key, state_dir=state_dir)
            if head_slices
            else None
        )

    def _frames(self) -> Iterator[Shot]:
        shots = self._shots
        while True:
            produced = False
            for shot in shots:
                produced = True
                yield shot
            if not (self.loop and produced):
                return
            shots = open_source(self.source, self.data_dir)

    def _publish_head_status(self) -> None:
        """The head slices' plan in the camera's status, and why they are not served (a
        refused plan, slices that have not arrived): frames go out whole meanwhile."""
        follower = self._head.follower if self._head is not None else None
        if follower is None:
            return
        target, active = follower.target, follower.active
        self.client.set_status(
            StatusMsg(
                state="online",
                plan_id=target.plan_id if target else None,
                serving_plan_id=active.plan.plan_id if active else None,
                error=follower.problem,
            )
        )

    def run(self, stop: threading.Event) -> int:
        """Publish frames until the source ends, `count` frames are sent or `stop` is set."""
        self.client.set_status(StatusMsg(state="online"))
        self.client.start(required=True)
        self.stats.start()
        if self._head is not None:
            self._head.follow(self.client, self.topics, self._publish_head_status)
            try:
                self._head.wait_first_plan(self.topics)
            except ConfigError:
                self._head.stop()
                self.client.stop()
                raise
        period = 1.0 / self.fps
        next_at = time.monotonic()
        try:
            for seq, shot in enumerate(self._frames()):
                if stop.is_set() or (self.count is not None and seq >= self.count):
                    break
                delay = next_at - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                next_at = max(next_at + period, time.monotonic() - period)
                self._publish(seq, shot)
                self.sent += 1
                if self.sent % 100 == 0:
                    log.info("sent %d frames", self.sent)
        finally:
            log.info("camera %s sent %d frames", self.camera_id, self.sent)
            if self._head is not None:
                self._head.stop()
            self.stats.stop()
            self.client.stop()
        return self.sent

    def _sized(self, image: np.ndarray) -> np.ndarray:
        if self.size is None or image.shape[1::-1] == self.size:
            return image
        return cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)

    def _publish(self, seq: int, shot: Shot) -> None:
        ts = time.time()  # capture time: before the head slices run
        started = time.perf_counter()
        head = self._head(shot.image) if self._head is not None else None
        if head is None:
            data, extra = encode_image(self._sized(shot.image), self.enc)
            message: FrameMsg | TokensMsg = FrameMsg(
                camera=self.camera_id, seq=seq, ts=ts, enc=self.enc, data=data,
                label=shot.label, **extra,
            )  # fmt: skip
            topic = self.topics.frame(self.camera_id)
        else:
            assert self._head is not None
            tokens, plan_id = head
            if plan_id != self.metrics.plan_id:
                self.metrics.plan(plan_id)  # the plan whose stem slices made the tokens
            message = TokensMsg(
                camera=self.camera_id, seq=seq, ts=ts, block=self._head.count,
                dtype=self._head.dtype, shape=tokens.shape, data=tokens.tobytes(),
                label=shot.label, plan_id=plan_id,
            )  # fmt: skip
            topic = self.topics.tokens(self.camera_id)
        self.metrics.observe(
            "encode" if head is None else "head_slices", time.perf_counter() - started
        )
        self.client.publish(topic, encode(message), qos=0)
        self.metrics.frame(self.camera_id, "published")
