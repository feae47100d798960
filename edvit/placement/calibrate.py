"""Measure what a board type does per frame with a bundle: each ONNX file's latency (ONNX
Runtime, batch 1, one thread, median) and the frame path (a JPEG frame decoded and turned
into the model's input, as a node does). Run in this process for the host, or as
``python -m edvit.placement.calibrate BUNDLE --runs R`` inside a board's CPU quota
(fleet/boards/calibrate.py starts it there), which prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import cv2
import numpy as np

from edvit.bundle import Bundle
from edvit.inference import ShapeArg, make_session, measure_latency_ms, random_feed
from edvit.placement.slo import TypeCalibration
from edvit.preprocess import frame_to_model_input
from edvit.process import rss_mb
from edvit.schemas import FrameMsg

JPEG_QUALITY = 90  # the camera's (camera_source.camera.encode_image)
FRAME_RUNS_PER_MODEL_RUN = 4  # the frame path is cheap: time more of it for a stable median


def synthetic_frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A BGR uint8 image that compresses like a photograph: smooth gradients and shapes with
    some sensor noise (plain noise would make a JPEG many times larger than a camera's)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127 + 100 * np.sin(x / (width / (2 + c)) + c) * np.cos(y / (height / (3 + c)))
        for c in range(3)
    ]
    image = np.stack(channels, axis=2)
    for _ in range(12):  # a few flat rectangles: edges for the encoder to keep
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        image[y0 : y0 + height // 6, x0 : x0 + width // 6] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_frame(width: int, height: int) -> FrameMsg:
    ok, data = cv2.imencode(".jpg", synthetic_frame(width, height),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])  # fmt: skip
    assert ok
    return FrameMsg(camera="calibrate", seq=0, ts=time.time(), enc="jpeg", data=data.tobytes())


def median_ms(action: Callable[[], object], runs: int, warmup: int = 3) -> float:
    """Median wall time in ms of ``action()`` over ``runs`` calls, after ``warmup`` untimed."""
    for _ in range(warmup):
        action()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        action()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def frame_path_ms(bundle: Bundle, frame: FrameMsg, runs: int) -> float:
    """Median time of decode_frame + to_model_input for ``frame`` with the bundle's input."""
    pp = bundle.manifest.preprocessing
    return median_ms(lambda: frame_to_model_input(frame, pp), runs)


def measure_memory(bundle: Bundle, files: dict[str, ShapeArg]) -> dict[str, object]:
    """{"runtime_mb", "memory_mb": {file: MB}}: for each file in turn, how far loading it
    from bytes (as a node gets it) and running it once raised the process's peak above what
    it held before; the sessions are kept until all are measured, so no model reuses memory
    another freed. The first file loaded also pays for ONNX Runtime's own start: its memory
    is counted in ``runtime_mb``, the process's after it. MB = 10^6 bytes."""
    pid = os.getpid()
    sessions = []
    memory = {}
    runtime = 0.0
    for index, (file, shape) in enumerate(files.items()):
        before = _mb(rss_mb(pid))
        session = make_session(bundle.path(file).read_bytes())
        session.run(None, random_feed(session, shape))
        memory[file] = max(_mb(rss_mb(pid, "VmHWM")) - before, 0.0)
        sessions.append(session)
        if index == 0:
            runtime = _mb(rss_mb(pid))
    return {"runtime_mb": runtime, "memory_mb": memory}


def _mb(mib: float | None) -> float:
    assert mib is not None  # this process is alive
    return mib * 2**20 / 1e6


def measure_bundle(bundle: Bundle, runs: int) -> dict[str, object]:
    """{"frame_ms": ..., "latency_ms": {file: ms}, "runtime_mb", "memory_mb"} for every
    sub-model, the original and the fusion; the frame is a JPEG at the model's input size
    (a camera that sends what the model takes)."""
    m = bundle.manifest
    cv2.setNumThreads(1)
    shape = (1, *m.input_shape)
    files: dict[str, ShapeArg] = {m.fusion.file: None}  # the smallest first; None: batch 1
    files |= {spec.file: shape for spec in m.submodels} | {m.original.file: shape}
    memory = measure_memory(bundle, files)
    latencies = {
        spec.file: measure_latency_ms(bundle.path(spec.file), shape, runs=runs)
        for spec in m.submodels
    }
    latencies[m.original.file] = measure_latency_ms(bundle.path(m.original.file), shape, runs=runs)
    latencies[m.fusion.file] = measure_latency_ms(bundle.path(m.fusion.file), None, runs=runs)
    frame = jpeg_frame(m.preprocessing.width, m.preprocessing.height)
    return {
        "frame_ms": frame_path_ms(bundle, frame, runs * FRAME_RUNS_PER_MODEL_RUN),
        "latency_ms": latencies,
        **memory,
    }


def host_calibration(bundle: Bundle, runs: int) -> TypeCalibration:
    """``measure_bundle`` on this machine, unlimited, as the calibration's host type."""
    return TypeCalibration(
        cpu=1.0, method="host", runs=runs,
        measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **measure_bundle(bundle, runs),  # type: ignore[arg-type]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edvit.placement.calibrate")
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    json.dump(measure_bundle(Bundle.load(args.bundle), args.runs), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
