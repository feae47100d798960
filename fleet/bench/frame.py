"""`edvit bench frame`: what one camera JPEG frame costs a node before its model runs.

Per frame size, on this machine at one thread (OpenCV's and the node's): the message
decoded (msgpack); the JPEG decoded in full (``decode_frame``); the reference path, every
step done plainly (message, full decode, colour order, area resize, arithmetic
normalisation: ``normalize``); and the node's path (``frame_to_model_input``: a large
JPEG decoded only as large as the input needs, resized before its channels are reordered,
normalised through a lookup table); then the frame message's one-way trip between two
clients of a local mosquitto.
Each figure is a median. Against ``--inference-ms`` (a sub-model's latency on the same
kind of core), and against the slowest sub-model of ``--bundle`` measured in the same run
(ONNX Runtime, batch 1, one thread), each path is also given as a share of the inference.

The frames are synthetic photographs (``jpeg_frame``: gradients, edges, sensor noise)
encoded as the camera encodes them (JPEG quality 90).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edvit.broker.local import LocalBroker
from edvit.bundle import Bundle
from edvit.errors import ConfigError
from edvit.fleet.bench.common import format_table, write_json
from edvit.fleet.bench.e2e import measure_hop_ms
from edvit.inference import measure_latency_ms
from edvit.placement.calibrate import jpeg_frame, median_ms
from edvit.preprocess import decode_frame, frame_to_model_input, normalize
from edvit.schemas import FrameMsg, Preprocessing, decode, encode

# A 224x224 RGB ViT's input, normalised as timm's ViT-B/16 is (mean and std 0.5).
VIT_INPUT = Preprocessing(channels=3, height=224, width=224, mean=(0.5,) * 3, std=(0.5,) * 3)
HOP_MESSAGES = 100


@dataclass
class FrameResult:
    frame: str
    jpeg_kb: float
    message_ms: float
    decode_ms: float  # full decode
    reference_ms: float  # message, full decode, colour, resize, arithmetic normalisation
    node_ms: float  # message + frame_to_model_input
    mqtt_ms: float | None = None


def reference_path(payload: bytes, pp: Preprocessing) -> np.ndarray:
    """Every step plainly: the message, the full JPEG, colour order, area resize of all
    three channels, then ``normalize``'s arithmetic."""
    frame = decode(FrameMsg, payload)
    assert frame is not None
    image = decode_frame(frame)
    if pp.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (pp.width, pp.height), interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = image[:, :, None]
    return normalize(image.transpose(2, 0, 1)[None], pp)[0]


def measure_frame(width: int, height: int, pp: Preprocessing, repeats: int) -> FrameResult:
    frame = jpeg_frame(width, height)
    payload = encode(frame)

    def ms(action: Callable[[], object]) -> float:
        return round(median_ms(action, repeats), 3)

    message_ms = ms(lambda: decode(FrameMsg, payload))
    decode_ms = ms(lambda: decode_frame(frame))
    reference_ms = ms(lambda: reference_path(payload, pp))
    node_ms = ms(lambda: frame_to_model_input(decode(FrameMsg, payload), pp))
    return FrameResult(
        frame=f"{width}x{height}", jpeg_kb=round(len(payload) / 1024, 1), message_ms=message_ms,
        decode_ms=decode_ms, reference_ms=reference_ms, node_ms=node_ms,
    )  # fmt: skip


def bench_frame(sizes: list[tuple[int, int]], bundle_dir: Path | None, inference_ms: list[float],
                repeats: int, mqtt: bool, json_out: Path | None) -> dict:  # fmt: skip
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, not {repeats}")
    if any(not ms > 0 for ms in inference_ms):
        raise ConfigError("--inference-ms takes positive latencies")
    bundle = Bundle.load(bundle_dir) if bundle_dir else None
    pp = bundle.manifest.preprocessing if bundle else VIT_INPUT
    cv2.setNumThreads(1)  # a node's one thread
    measured: dict[str, float] = {}
    if bundle is not None:
        print("frame: the bundle's sub-models ...", file=sys.stderr, flush=True)
        shape = (1, *bundle.manifest.input_shape)
        latencies = {
            s.id: measure_latency_ms(bundle.path(s.file), shape, runs=repeats)
            for s in bundle.manifest.submodels
        }
        slowest = max(latencies, key=lambda sid: latencies[sid])
        measured[f"{slowest} {latencies[slowest]:.1f} ms"] = latencies[slowest]
    shares = {**{f"{ms:g} ms": ms for ms in inference_ms}, **measured}
    results = []
    for width, height in sizes:
        print(f"frame: {width}x{height} ...", file=sys.stderr, flush=True)
        results.append(measure_frame(width, height, pp, repeats))
    if mqtt:
        with LocalBroker(kind="mosquitto") as broker:
            for result in results:
                padding = round(result.jpeg_kb * 1024)
                result.mqtt_ms = round(measure_hop_ms(broker.url, HOP_MESSAGES, 0.005, padding), 3)
    rows = []
    for result in results:
        row = asdict(result)
        for name, ms in shares.items():
            row[f"reference / {name}"] = f"{100 * result.reference_ms / ms:.0f}%"
            row[f"node / {name}"] = f"{100 * result.node_ms / ms:.0f}%"
        rows.append(row)
    columns = tuple(rows[0]) if rows else ()
    print(f"input: {pp.channels}x{pp.height}x{pp.width}, one thread")
    print(format_table([{k: "-" if v is None else v for k, v in r.items()} for r in rows], columns))
    report = {"input": pp.model_dump(), "inference_ms": inference_ms, "repeats": repeats,
              "bundle_slowest_submodel_ms": measured,
              "frames": [asdict(r) for r in results]}  # fmt: skip
    write_json(json_out, report)
    return report
