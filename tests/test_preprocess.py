"""The node's frame path: large JPEGs decoded only as large as the model's input needs, and
the lookup-table normalisation, against every step done plainly."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edvit.broker.local import LocalBroker
from edvit.camera_source.camera import Camera
from edvit.errors import BadPayload, ConfigError
from edvit.placement.calibrate import synthetic_frame
from edvit.preprocess import (
    decode_frame,
    frame_to_model_input,
    jpeg_reduction,
    normalize,
    to_model_input,
)
from edvit.schemas import FrameMsg, Preprocessing, decode
from edvit.topics import Topics
from helpers import MqttProbe

RGB = Preprocessing(channels=3, height=224, width=224, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))  # fmt: skip
GRAY = Preprocessing(channels=1, height=28, width=28, mean=(0.286,), std=(0.353,))


def plainly(image: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """Colour first, resize, then normalize's arithmetic."""
    if pp.channels == 1:
        image = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    else:
        code = cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    image = cv2.resize(image, (pp.width, pp.height), interpolation=cv2.INTER_AREA)
    image = image[:, :, None] if image.ndim == 2 else image
    return normalize(image.transpose(2, 0, 1)[None], pp)[0]


def jpeg(width: int, height: int) -> FrameMsg:
    ok, data = cv2.imencode(".jpg", synthetic_frame(width, height), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return FrameMsg(camera="c", seq=0, ts=0.0, enc="jpeg", data=data.tobytes())


@pytest.mark.parametrize("pp", [RGB, GRAY], ids=["rgb", "gray"])
@pytest.mark.parametrize("shape", [(480, 640, 3), (480, 640), (224, 224, 3), (20, 24, 3)])
def test_the_lookup_table_gives_the_arithmetic_values(pp: Preprocessing, shape: tuple) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(to_model_input(image, pp), plainly(image, pp))


def test_reduction_keeps_the_decoded_image_at_least_the_input() -> None:
    assert jpeg_reduction(1920, 1080, RGB) == 4  # 480x270
    assert jpeg_reduction(1280, 720, RGB) == 2  # 640x360; by 4, 180 rows < 224
    assert jpeg_reduction(447, 1000, RGB) == 1
    assert jpeg_reduction(1920, 1080, GRAY) == 8


def test_a_large_jpeg_is_decoded_reduced_and_gives_nearly_the_same_input() -> None:
    frame = jpeg(1280, 720)
    assert decode_frame(frame, for_input=RGB).shape == (360, 640, 3)
    assert decode_frame(frame, for_input=GRAY).shape == (90, 160)
    assert decode_frame(frame).shape == (720, 1280, 3)
    fast, full = frame_to_model_input(frame, RGB), to_model_input(decode_frame(frame), RGB)
    levels = np.abs(fast - full) * np.asarray(RGB.std, np.float32)[:, None, None] * 255
    assert levels.mean() < 1.0 and np.percentile(levels, 99) < 8


def test_small_jpegs_and_pngs_take_the_full_decode() -> None:
    frame = jpeg(320, 240)
    full = to_model_input(decode_frame(frame), RGB)
    assert np.array_equal(frame_to_model_input(frame, RGB), full)
    ok, png = cv2.imencode(".png", synthetic_frame(1280, 720))
    png_frame = FrameMsg(camera="c", seq=0, ts=0.0, enc="png", data=png.tobytes())
    assert decode_frame(png_frame, for_input=RGB).shape == (720, 1280, 3)


def test_a_cut_jpeg_is_still_a_bad_payload() -> None:
    frame = jpeg(1280, 720)
    cut = frame.model_copy(update={"data": frame.data[: len(frame.data) // 8]})
    with pytest.raises(BadPayload):
        frame_to_model_input(cut, RGB)


@pytest.mark.fleet
def test_bench_frame_prints_each_path_and_refuses_a_bad_size() -> None:
    command = [sys.executable, "-m", "edvit", "bench", "frame", "--repeats", "2", "--no-mqtt"]
    done = subprocess.run(
        [*command, "--sizes", "640x480", "--inference-ms", "14"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 640x480 |"))
    assert len(row.split("|")) == 11  # frame, KB, 5 timings, mqtt, 2 shares
    bad = subprocess.run([*command, "--sizes", "640by480"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2
    assert "argument --sizes: expected WIDTHxHEIGHT, like 224x224, not '640by480'" in bad.stderr


def test_a_camera_sized_to_the_input_sends_frames_of_that_size(
    mosquitto_broker: LocalBroker, tmp_path: Path
) -> None:
    """`edvit camera --size WxH`: every frame resized before it is encoded."""
    probe = MqttProbe(mosquitto_broker.host, mosquitto_broker.port, Topics().frame("cam0")).start()
    try:
        camera = Camera("cam0", mosquitto_broker.url, "dataset:digits", fps=50.0, count=2,
                        enc="jpeg", size=(32, 24))  # fmt: skip
        assert camera.run(threading.Event()) == 2
        frame = decode(FrameMsg, probe.get().payload)
        assert frame is not None and frame.enc == "jpeg"
        assert decode_frame(frame).shape == (24, 32)  # digits are gray; 8x8 unsized
    finally:
        probe.stop()
    with pytest.raises(ConfigError, match="--size needs positive sides"):
        Camera("cam1", mosquitto_broker.url, "dataset:digits", size=(0, 24))
