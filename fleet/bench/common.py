"""What the benches share: the sample frames, the camera load generator, the warm-up and
collection of predictions, percentiles, tables and JSON reports.

A bench's cameras are one generator process (`generate_load`) that publishes frames (or
tokens, for head slices) for K cameras at a fixed rate per camera, spread evenly over each
period. Processes' memory and CPU time are read with edvit.process.rss_mb and cpu_seconds.
"""

from __future__ import annotations

import itertools
import json
import queue
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import cv2
import numpy as np

from edvit.bundle import Bundle
from edvit.datasets import Dataset, load_dataset
from edvit.errors import EdvitError
from edvit.fleet.ops.local import LocalFleet
from edvit.fleet.ops.watch import PredictionStream
from edvit.mqtt import MqttClient, unique_client_id
from edvit.schemas import FrameMsg, PredictionMsg, TokensMsg, encode
from edvit.topics import Topics

SAMPLE_IMAGES = 64
WARMUP_FRAMES = 5  # per run, before the cameras start: first ONNX Runtime calls are slow
WARMUP_CAMERA = "warmup"
WARMUP_TIMEOUT_S = 30.0  # for each warm-up frame's answer
QUIET_S = 3.0  # after the cameras stop, give up once no prediction came for this long
DRAIN_S = 20.0  # and in any case after this long

# What the generator sends: ("frame", png bytes, label) or ("tokens", tokens, block, label).
Sample = tuple
# What each camera sends: camera i replays mix[i % len(mix)]; one list for all cameras, or one
# per entry block to load a node with requests that enter at different blocks.
CameraMix = list[list[Sample]]
# Makes the monolithic bundle (the original served whole) from a bundle, in a folder. It is
# edvit.models.monolithic's, which needs onnx: edvit/cli.py passes it in, fleet/ never
# imports models/.
MakeMonolithic = Callable[[Bundle, Path], Bundle]
ONNX_MISSING = "the onnx package is not installed (pip install onnx, or the build extra)"


def load_test_split(bundle: Bundle) -> Dataset:
    return load_dataset(bundle.manifest.dataset, "test")


def frame_samples(test: Dataset) -> list[Sample]:
    samples = []
    for image, label in zip(test.images[:SAMPLE_IMAGES], test.labels[:SAMPLE_IMAGES], strict=True):
        ok, png = cv2.imencode(".png", image if image.ndim == 2 else image[..., ::-1])
        assert ok
        samples.append(("frame", png.tobytes(), int(label)))
    return samples


def camera_message(sample: Sample, camera: str, seq: int, topics: Topics) -> tuple[str, bytes]:
    """The topic and payload a camera publishes for one sample, stamped now."""
    ts = time.time()
    if sample[0] == "frame":
        _, data, label = sample
        frame = FrameMsg(camera=camera, seq=seq, ts=ts, enc="png", data=data, label=label)
        return topics.frame(camera), encode(frame)
    _, tokens, block, label = sample
    message = TokensMsg(camera=camera, seq=seq, ts=ts, block=block, dtype="float32",
                        shape=tokens.shape, data=tokens.tobytes(), label=label)  # fmt: skip
    return topics.tokens(camera), encode(message)


def generate_load(broker_url: str, prefix: str, cameras: int, fps: float, mix: CameraMix,
                  stop: EventType, sent: Synchronized[int] | None = None) -> None:  # fmt: skip
    """Runs in its own process; cameras are not synchronised, so their messages are spread
    evenly over each period. `sent`, when given, counts the messages published so far."""
    topics = Topics(prefix)
    client = MqttClient(unique_client_id("bench-cams"), broker_url)
    client.start(required=True)
    step = 1.0 / (fps * cameras)
    next_at = time.monotonic()
    try:
        for tick in itertools.count():
            if stop.is_set():
                return
            camera, seq = tick % cameras, tick // cameras
            samples = mix[camera % len(mix)]
            topic, payload = camera_message(
                samples[seq % len(samples)], f"cam{camera}", seq, topics
            )
            client.publish(topic, payload)
            if sent is not None:
                sent.value = tick + 1
            next_at += step
            delay = next_at - time.monotonic()
            if delay > 0.0005:
                stop.wait(delay)
            elif delay < -0.1:
                next_at = time.monotonic()  # far behind: do not burst to catch up
    finally:
        client.stop()


def warm_up(broker_url: str, topics: Topics, samples: list[Sample], stream: PredictionStream,
            fleet: LocalFleet, timeout: float = WARMUP_TIMEOUT_S) -> None:  # fmt: skip
    """A few frames through the whole fleet before the cameras start, answered and dropped.
    One at a time, each sent once the one before is answered: a node slower than the gap
    between two frames keeps only the newest waiting one, and would drop the rest."""
    client = MqttClient(unique_client_id("e2e-warmup"), broker_url)
    client.start(required=True)
    try:
        for seq in range(WARMUP_FRAMES):
            client.publish(*camera_message(samples[seq % len(samples)], WARMUP_CAMERA, seq, topics))
            deadline = time.monotonic() + timeout
            while True:
                fleet.check_alive()
                if time.monotonic() > deadline:
                    raise EdvitError(
                        f"the fleet answered {seq} of {WARMUP_FRAMES} warm-up frames "
                        f"(none within {timeout:g} s of frame {seq})"
                    )
                try:
                    prediction = stream.queue.get(timeout=0.25)
                except queue.Empty:
                    continue
                if prediction.camera == WARMUP_CAMERA and prediction.seq == seq:
                    break
    finally:
        client.stop()


def collect_predictions(stream: PredictionStream, sent: int,
                        fleet: LocalFleet) -> list[PredictionMsg]:  # fmt: skip
    """Predictions of the cameras' frames: every one there is, or what came until the fleet
    went quiet."""
    predictions: list[PredictionMsg] = []
    frames: set[tuple[str, int]] = set()
    deadline, last = time.monotonic() + DRAIN_S, time.monotonic()
    while len(frames) < sent and time.monotonic() < deadline and time.monotonic() - last < QUIET_S:
        fleet.check_alive()
        try:
            prediction = stream.queue.get(timeout=0.25)
        except queue.Empty:
            continue
        last = time.monotonic()
        if prediction.camera != WARMUP_CAMERA:
            predictions.append(prediction)
            frames.add((prediction.camera, prediction.seq))
    while True:  # whatever else already arrived
        try:
            prediction = stream.queue.get_nowait()
        except queue.Empty:
            return predictions
        if prediction.camera != WARMUP_CAMERA:
            predictions.append(prediction)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), to 2 decimals; NaN for no values."""
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for row in rows:
        cells = (f"{row[c]:g}" if isinstance(row[c], float | int) else str(row[c]) for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path | None, report: dict) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
