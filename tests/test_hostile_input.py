"""Hostile input: anything on the network can publish anything.

Every payload either decodes to a valid message or raises BadPayload (nothing else), every
frame either decodes to a bounded uint8 image or raises BadPayload, and no NaN, infinity or
oversized number gets through. The known hostile frames are explicit tests; hypothesis
covers the rest.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edvit import schemas
from edvit.errors import BadPayload
from edvit.limits import (
    MAX_FRAME_PIXELS,
    MAX_PACKET_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_TENSOR_DIM,
    max_payload_bytes,
    topic_kind,
)
from edvit.preprocess import decode_frame, image_size
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
from edvit.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the tree
    suppress_health_check=[HealthCheck.too_slow],
)
NAN, INF = float("nan"), float("inf")
U64 = 2**64 - 1  # msgpack's int range is [-2**63, 2**64 - 1]
I64 = -(2**63)


# -- building payloads ------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, idat: bytes = b"", depth: int = 8) -> bytes:
    """A PNG whose IHDR says width x height (grey), with whatever IDAT body is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    body = idat or zlib.compress(b"")
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    )


def _zero_png(width: int, height: int) -> bytes:
    """A real all-black grey PNG, compressed row by row so that building it costs no memory."""
    packer = zlib.compressobj(9)
    row = bytes(1 + width)  # filter byte 0, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return _png(width, height, idat)


def _encoded(image: np.ndarray, enc: str, params: tuple[int, ...] = ()) -> bytes:
    ok, buffer = cv2.imencode(".png" if enc == "png" else ".jpg", image, list(params))
    assert ok
    return buffer.tobytes()


SMALL = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
SMALL_PNG = _encoded(SMALL, "png")
SMALL_JPEG = _encoded(np.dstack([SMALL, SMALL[::-1], SMALL[:, ::-1]]), "jpeg")
PROGRESSIVE_JPEG = _encoded(SMALL, "jpeg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))


def _sof_offset(jpeg: bytes) -> int:
    """Where the height (then the width) sits in a JPEG's SOF0 (baseline) or SOF2 segment."""
    found = re.search(rb"\xff[\xc0\xc2]", jpeg)
    assert found is not None
    return found.start() + 5


def _frame(**overrides: Any) -> FrameMsg:
    fields: dict[str, Any] = dict(camera="cam0", seq=0, ts=1.5, enc="raw", data=bytes(4),
                                  shape=(2, 2), dtype="uint8")  # fmt: skip
    fields.update(overrides)
    return FrameMsg(**fields)


def _unchecked_frame(**fields: Any) -> FrameMsg:
    """A FrameMsg that skipped validation: decode_frame must not rely on the schema."""
    base: dict[str, Any] = dict(v=1, camera="cam0", seq=0, ts=1.5, enc="raw", data=b"",
                                shape=None, dtype="uint8", label=None)  # fmt: skip
    return FrameMsg.model_construct(**{**base, **fields})


def _reference_decode(frame: FrameMsg) -> np.ndarray:
    """decode_frame without its size limits: what a frame within them must decode to."""
    if frame.enc == "raw":
        image = np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    else:
        image = cv2.imdecode(np.frombuffer(frame.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _assert_image(image: Any, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    assert image.shape[0] > 0 and image.shape[1] > 0
    assert image.shape[0] * image.shape[1] <= max_pixels


def _floats(value: Any) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _floats(item)


def _assert_sound(kind: type[schemas._Message], message: Any) -> None:
    """What a decoded message promises: its type, finite numbers, a payload that re-encodes."""
    if message is None:
        return
    assert isinstance(message, kind)
    assert all(math.isfinite(f) for f in _floats(message.model_dump()))
    if isinstance(message, FeaturesMsg):
        dtype = "<f4" if message.dtype == "float32" else "<f2"
        assert np.isfinite(np.frombuffer(message.data, dtype=dtype)).all()
    assert decode(kind, encode(message)) == message


def _pack(kind: type[schemas._Message], raw: Any) -> bytes:
    if issubclass(kind, schemas._JSON_MESSAGES):
        return json.dumps(raw, default=lambda b: b.hex()).encode()  # NaN/Infinity allowed
    return msgpack.packb(raw, use_bin_type=True)


# -- valid messages, the starting point of the hostile ones --------------------------------
PREPROCESSING = {"channels": 1, "height": 8, "width": 8, "mean": [0.5], "std": [0.25],
                 "interpolation": "area"}  # fmt: skip
PLAN = {
    "v": 1, "plan_id": "p1", "bundle_sha256": "b" * 64, "classes": ["a", "b", "c"],
    "submodels": [
        {"id": "sub0", "classes": [0, 1], "sha256": "s0", "feature_dim": 4},
        {"id": "sub1", "classes": [2], "sha256": "s1", "feature_dim": 4},
    ],
    "assignments": {"node-0": ["sub0"], "node-1": ["sub1"]},
    "fusion_sha256": "f", "preprocessing": PREPROCESSING,
    "stem": {"blocks": 1, "token_shape": [5, 8],
             "slices": {"stem.embed": "e", "stem.block0": "b0", "stem.from0": "f0"},
             "tails": {"sub0": "t0", "sub1": "t1"}},
    "created": 1.0,
}  # fmt: skip
VALID: dict[type[schemas._Message], dict[str, Any]] = {
    FrameMsg: {"v": 1, "camera": "cam0", "seq": 3, "ts": 1.5, "enc": "raw", "data": bytes(6),
               "shape": [2, 3], "dtype": "uint8", "label": 1},
    TokensMsg: {"v": 1, "camera": "cam0", "seq": 3, "ts": 1.5, "block": 1, "dtype": "float32",
                "shape": [2, 3], "data": np.ones(6, "<f4").tobytes(), "label": 1,
                "plan_id": "p1"},
    FeaturesMsg: {"v": 1, "camera": "cam0", "seq": 3, "ts": 1.5, "submodel": "sub0",
                  "plan_id": "p1", "node": "node-0", "dtype": "float32",
                  "data": np.arange(4, dtype="<f4").tobytes(), "dim": 4, "infer_ms": 1.25,
                  "batch": 2, "label": 1},
    PlanMsg: PLAN,
    ModelMsg: {"v": 1, "sha256": "ab" * 32, "onnx": b"\x08\x07onnx"},
    StatusMsg: {"state": "ready", "plan_id": "p1", "submodels": ["sub0"],
                "serving_plan_id": "p1", "error": None, "ts": 2.5,
                "counters": {"bad_payloads": 2}},
    PredictionMsg: {"camera": "cam0", "seq": 3, "ts": 1.5, "label": 2, "class": "c",
                    "score": 0.75, "topk": [["c", 0.75], ["a", 0.25]], "latency_ms": 3.5,
                    "submodels": ["sub0", "sub1"], "missing": [], "degraded": False,
                    "plan_id": "p1", "true_label": 2},
}  # fmt: skip
KINDS = list(VALID)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_the_valid_samples_decode(kind: type[schemas._Message]) -> None:
    _assert_sound(kind, decode(kind, _pack(kind, VALID[kind])))


# -- frames: the known hostile cases -----------------------------------------------------------
@pytest.mark.parametrize("enc", ["png", "jpeg", "raw"])
def test_empty_frame_data_is_bad_payload(enc: str) -> None:
    frame = decode(FrameMsg, _pack(FrameMsg, {**VALID[FrameMsg], "enc": enc, "data": b""}))
    with pytest.raises(BadPayload, match="frame data is empty"):
        decode_frame(frame)
    with pytest.raises(BadPayload, match="empty"):
        decode_frame(_unchecked_frame(enc=enc, data=b"", shape=(2, 2)))


@pytest.mark.parametrize(
    ("shape", "wire_reason", "reason"),
    [
        ((-2, -2), "shape.0: Input should be greater than or equal to 1", "must be positive"),
        ((2**62, 4, 1), "shape.0: Input should be less than or equal to 65535", "over the limit"),
        ((0, 4), "shape.0: Input should be greater than or equal to 1", "must be positive"),
        ((4, 4, 2), "raw frames have 1, 3 or 4 channels", "channels"),
        ((4,), "raw frames need shape", "need shape"),
        ((1, 1, 1, 1), "shape: Tuple should have at most 3 items", "need shape"),
        ((2**32, 2**32), "shape.0: Input should be less than or equal to 65535", "over the limit"),
        ((MAX_FRAME_PIXELS, 2), "less than or equal to 65535", "over the limit"),
    ],
)
def test_raw_frames_with_impossible_shapes(
    shape: tuple[int, ...], wire_reason: str, reason: str
) -> None:
    # The schema refuses them on the wire ...
    raw = {**VALID[FrameMsg], "shape": list(shape), "data": bytes(16)}
    with pytest.raises(BadPayload, match=f"^FrameMsg: .*{re.escape(wire_reason)}"):
        decode(FrameMsg, _pack(FrameMsg, raw))
    # ... and decode_frame on its own, without allocating anything.
    with pytest.raises(BadPayload, match=reason):
        decode_frame(_unchecked_frame(data=bytes(16), shape=shape))


def test_raw_frame_size_must_match_shape_and_dtype() -> None:
    with pytest.raises(BadPayload, match="shape needs 12"):
        decode_frame(_unchecked_frame(data=bytes(16), shape=(2, 2, 3)))
    with pytest.raises(BadPayload, match="dtype"):
        decode_frame(_unchecked_frame(data=bytes(4), shape=(2, 2), dtype="float32"))
    with pytest.raises(BadPayload, match="unknown frame encoding"):
        decode_frame(_unchecked_frame(enc="gif", data=bytes(4)))


def test_png_that_declares_a_huge_image_is_refused_before_decoding(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1))
    for data in (_png(100_000, 100_000), _png(2**31 - 1, 2**31 - 1), _zero_png(5000, 5000)):
        assert len(data) < 100_000  # a few bytes (or KB) claim up to 4.6e18 pixels
        with pytest.raises(BadPayload, match="over the limit of 8294400 pixels"):
            decode_frame(_frame(enc="png", data=data, shape=None))
    assert calls == []


def test_the_pixel_limit_is_a_parameter() -> None:
    frame = _frame(enc="png", data=_zero_png(100, 50), shape=None)
    assert image_size(frame.data, "png") == (100, 50)
    assert decode_frame(frame, max_pixels=5000).shape == (50, 100)
    with pytest.raises(BadPayload, match="100x50, over the limit of 4999 pixels"):
        decode_frame(frame, max_pixels=4999)
    raw = _frame(data=bytes(5000), shape=(50, 100))
    assert decode_frame(raw, max_pixels=5000).shape == (50, 100)
    with pytest.raises(BadPayload, match="over the limit"):
        decode_frame(raw, max_pixels=4999)


def test_frames_at_the_pixel_limit_pass_and_one_column_more_does_not() -> None:
    for data in (_zero_png(3840, 2160), bytes(3840 * 2160)):
        enc = "raw" if data[:1] == b"\0" else "png"
        assert decode_frame(_frame(enc=enc, data=data, shape=(2160, 3840))).shape == (2160, 3840)
    for data in (_zero_png(3841, 2160), bytes(3841 * 2160)):
        enc = "raw" if data[:1] == b"\0" else "png"
        with pytest.raises(BadPayload, match="3841x2160, over the limit of 8294400 pixels"):
            decode_frame(_frame(enc=enc, data=data, shape=(2160, 3841)))


def test_png_chunks_must_fit_in_the_data(monkeypatch) -> None:
    # OpenCV allocates a chunk's declared length before reading it: 4 GB for 150 bytes.
    calls: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1))
    at = SMALL_PNG.index(b"IDAT") - 4
    liar = SMALL_PNG[:at] + struct.pack(">I", 4_000_000_000) + SMALL_PNG[at + 4 :]
    with pytest.raises(BadPayload, match="chunk longer than the data"):
        decode_frame(_frame(enc="png", data=liar, shape=None))
    with pytest.raises(BadPayload, match="cut short"):
        decode_frame(_frame(enc="png", data=SMALL_PNG[: SMALL_PNG.index(b"IEND") - 4]))
    many = SMALL_PNG[:33] + _chunk(b"tEXt", b"") * 16_384 + SMALL_PNG[33:]
    with pytest.raises(BadPayload, match="more than 16384 chunks"):
        decode_frame(_frame(enc="png", data=many, shape=None))
    assert calls == []


def test_progressive_jpeg_with_too_many_scans_is_refused(monkeypatch) -> None:
    # Each scan is a pass over the whole image: 1000 copies of a 20-byte scan took 6.5 s at 4K.
    scans = [m.start() for m in re.finditer(rb"\xff\xda", PROGRESSIVE_JPEG)]
    assert 2 < len(scans) <= 32
    end = PROGRESSIVE_JPEG.rindex(b"\xff\xd9")
    last = PROGRESSIVE_JPEG[scans[-1] : end]
    bomb = PROGRESSIVE_JPEG[:end] + last * 40 + PROGRESSIVE_JPEG[end:]
    calls: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1))
    with pytest.raises(BadPayload, match="more than 32 scans"):
        decode_frame(_frame(enc="jpeg", data=bomb, shape=None))
    assert calls == []


def test_jpeg_size_is_read_from_its_frame_header(monkeypatch) -> None:
    assert image_size(SMALL_JPEG, "jpeg") == (64, 48)
    assert image_size(PROGRESSIVE_JPEG, "jpeg") == (64, 48)
    at = _sof_offset(SMALL_JPEG)
    huge = SMALL_JPEG[:at] + struct.pack(">HH", 60_000, 60_000) + SMALL_JPEG[at + 4 :]
    calls: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1))
    with pytest.raises(BadPayload, match="60000x60000, over the limit"):
        decode_frame(_frame(enc="jpeg", data=huge, shape=None))
    assert calls == []


UNDECODABLE = [
    (b"garbage", "png", "not a decodable png"),
    (b"garbage", "jpeg", "not a decodable jpeg"),
    (SMALL_JPEG, "png", "not a decodable png"),  # the file must be what enc says
    (SMALL_PNG, "jpeg", "not a decodable jpeg"),
    (SMALL_PNG[:40], "png", "cut short"),  # header fine, pixels missing
    (SMALL_JPEG[:200], "jpeg", "decodable jpeg"),
    (SMALL_PNG[:20], "png", "not a decodable png"),
    (b"\xff\xd8", "jpeg", "no readable frame header"),
    (b"\xff\xd8\xff\xd9", "jpeg", "no readable frame header"),
    (b"\xff\xd8\xff\xda\x00\x02", "jpeg", "no readable frame header"),
    (b"\xff\xd8" + b"\xff" * 100_000, "jpeg", "no readable frame header"),
    (b"\xff\xd8\xff\xfe\x00\x02" * 50_000 + SMALL_JPEG[2:], "jpeg", "no readable frame"),
    (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10", "jpeg", "empty image"),
    (_png(0, 10), "png", "empty image"),
    (_png(4, 4, depth=16), "png", "uint16"),
    (_png(4, 4, zlib.compress(bytes(19))), "png", "not a decodable png"),  # a byte short
]


@pytest.mark.parametrize(
    ("data", "enc", "reason"),
    UNDECODABLE,
    ids=[f"{e}-{i}" for i, (_, e, _) in enumerate(UNDECODABLE)],
)
def test_undecodable_png_and_jpeg(data: bytes, enc: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(BadPayload, match=reason):
        decode_frame(_frame(enc=enc, data=data, shape=None))
    assert time.perf_counter() - started < 0.5  # never a slow path: generous for slow CI


def test_frame_over_the_payload_limit_is_refused_before_parsing() -> None:
    payload = _pack(FrameMsg, {**VALID[FrameMsg], "data": bytes(50_000_000)})
    with pytest.raises(BadPayload, match="over the limit of 8388608 for frame payloads"):
        decode(FrameMsg, payload)


# -- frames: good ones decode exactly as without the limits -------------------------------------
@st.composite
def good_frames(draw: st.DrawFn) -> FrameMsg:
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    enc = draw(st.sampled_from(["png", "jpeg", "raw"]))
    channels = draw(st.sampled_from([None, 1, 3] if enc == "jpeg" else [None, 1, 3, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (height, width) if channels is None else (height, width, channels)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if enc == "raw":
        return _frame(data=image.tobytes(), shape=shape)
    params = draw(
        st.sampled_from([(), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), (cv2.IMWRITE_JPEG_QUALITY, 30)])
        if enc == "jpeg"
        else st.sampled_from(
            [(), (cv2.IMWRITE_PNG_COMPRESSION, 0), (cv2.IMWRITE_PNG_COMPRESSION, 9)]
        )
    )
    return _frame(enc=enc, data=_encoded(image, enc, params), shape=shape)


@HYPOTHESIS
@given(good_frames())
def test_good_frames_decode_exactly_as_before(frame: FrameMsg) -> None:
    image = decode_frame(frame)
    _assert_image(image)
    expected = _reference_decode(frame)
    assert image.shape == expected.shape
    np.testing.assert_array_equal(image, expected)


# -- frames: anything else is BadPayload -------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid file damaged: bytes flipped, cut, inserted, or its declared size rewritten."""
    data = bytearray(base)
    op = draw(st.sampled_from(["flip", "cut", "insert", "size", "as is"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif op == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif op == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif op == "size":
        if base.startswith(b"\x89PNG"):
            data[16:24] = struct.pack(">II", draw(st.integers(0, 2**32 - 1)),
                                      draw(st.integers(0, 2**32 - 1)))  # fmt: skip
        else:
            at = _sof_offset(base)
            data[at : at + 4] = struct.pack(">HH", draw(st.integers(0, 2**16 - 1)),
                                            draw(st.integers(0, 2**16 - 1)))  # fmt: skip
    return bytes(data)


FRAME_DATA = st.one_of(
    st.binary(max_size=64),
    mutated(SMALL_PNG),
    mutated(SMALL_JPEG),
    mutated(PROGRESSIVE_JPEG),
    st.just(b""),
    st.integers(1, 64).map(bytes),
)
HUGE_INTS = st.sampled_from([0, -1, -2, 2**31, 2**32 + 1, 2**62, I64, U64, 10**30])
SHAPE_ENTRIES = st.one_of(st.integers(-3, 16), HUGE_INTS)
SHAPES = st.one_of(st.none(), st.lists(SHAPE_ENTRIES, max_size=5).map(tuple))
MAX_PIXELS = st.sampled_from([MAX_FRAME_PIXELS, 4096, 16, 1])


@HYPOTHESIS
@given(
    enc=st.sampled_from(["png", "jpeg", "raw"]),
    data=FRAME_DATA,
    shape=SHAPES,
    dtype=st.sampled_from(["uint8", None, "float32"]),
    max_pixels=MAX_PIXELS,
)
def test_decode_frame_returns_a_bounded_image_or_bad_payload(
    enc: str, data: bytes, shape: tuple[int, ...] | None, dtype: str | None, max_pixels: int
) -> None:
    frame = _unchecked_frame(enc=enc, data=data, shape=shape, dtype=dtype)
    try:
        image = decode_frame(frame, max_pixels=max_pixels)
    except BadPayload as exc:
        assert "\n" not in str(exc)
    else:
        _assert_image(image, max_pixels)


def _msgpack_int(value: int) -> int:
    return min(max(value, I64), U64)


@HYPOTHESIS
@given(
    enc=st.sampled_from(["png", "jpeg", "raw", "gif", ""]),
    data=FRAME_DATA,
    shape=SHAPES.map(lambda s: None if s is None else [_msgpack_int(d) for d in s]),
    dtype=st.sampled_from(["uint8", None, "float32"]),
    ts=st.floats(allow_nan=True, allow_infinity=True),
    seq=st.integers(I64, U64),
)
def test_frame_payloads_from_the_wire(
    enc: str, data: bytes, shape: list[int] | None, dtype: str | None, ts: float, seq: int
) -> None:
    raw = {"v": 1, "camera": "cam0", "seq": seq, "ts": ts, "enc": enc, "data": data,
           "shape": shape, "dtype": dtype}  # fmt: skip
    try:
        frame = decode(FrameMsg, _pack(FrameMsg, raw))
        _assert_sound(FrameMsg, frame)
        assert frame is not None
        _assert_image(decode_frame(frame))
    except BadPayload as exc:
        assert "\n" not in str(exc)


# -- numbers -----------------------------------------------------------------------------------
def _with(kind: type[schemas._Message], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(VALID[kind])
    target = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return raw


NON_FINITE = [NAN, INF, -INF]
FLOAT_PATHS = [
    (FrameMsg, ("ts",)),
    (TokensMsg, ("ts",)),
    (FeaturesMsg, ("ts",)),
    (FeaturesMsg, ("infer_ms",)),
    (PlanMsg, ("created",)),
    (PlanMsg, ("preprocessing", "mean", 0)),
    (PlanMsg, ("preprocessing", "std", 0)),
    (StatusMsg, ("ts",)),
    (PredictionMsg, ("ts",)),
    (PredictionMsg, ("score",)),
    (PredictionMsg, ("latency_ms",)),
    (PredictionMsg, ("topk", 1, 1)),
]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("kind", "path"),
    FLOAT_PATHS,
    ids=[f"{k.__name__}.{'.'.join(map(str, p))}" for k, p in FLOAT_PATHS],
)
def test_non_finite_numbers_are_refused(
    kind: type[schemas._Message], path: tuple[Any, ...], value: float
) -> None:
    where = ".".join(str(step) for step in path)
    with pytest.raises(BadPayload, match=rf"{kind.__name__}: {re.escape(where)}: .*finite") as e:
        decode(kind, _pack(kind, _with(kind, path, value)))
    assert "\n" not in str(e.value)


def test_nan_std_plan_and_nan_ts_frame_exactly_as_measured() -> None:
    plan = json.loads(json.dumps(PLAN))
    plan["preprocessing"]["std"] = [float("nan")]
    payload = json.dumps(plan).encode()
    assert b"NaN" in payload
    with pytest.raises(BadPayload, match="PlanMsg: preprocessing.std.0: Input should be a finite"):
        decode(PlanMsg, payload)
    frame = msgpack.packb({**VALID[FrameMsg], "ts": float("nan")}, use_bin_type=True)
    with pytest.raises(BadPayload, match="FrameMsg: ts: Input should be a finite number"):
        decode(FrameMsg, frame)
    with pytest.raises(BadPayload, match="finite"):
        decode(StatusMsg, b'{"state": "ready", "ts": Infinity}')
    with pytest.raises(BadPayload, match="finite"):
        decode(StatusMsg, b'{"state": "ready", "ts": 1e999}')


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_features_vector_must_be_finite(dtype: str, bad: float) -> None:
    vector = np.array([0.5, bad, 1.0, 2.0], dtype="<f4" if dtype == "float32" else "<f2")
    raw = {**VALID[FeaturesMsg], "dtype": dtype, "data": vector.tobytes()}
    with pytest.raises(BadPayload, match="features contain NaN or infinity"):
        decode(FeaturesMsg, _pack(FeaturesMsg, raw))
    raw["data"] = np.nan_to_num(vector, nan=0.0, posinf=0.0, neginf=0.0).tobytes()
    _assert_sound(FeaturesMsg, decode(FeaturesMsg, _pack(FeaturesMsg, raw)))


INT_LIMITS = [
    (PlanMsg, ("preprocessing", "height"), 1, MAX_TENSOR_DIM),
    (PlanMsg, ("preprocessing", "width"), 1, MAX_TENSOR_DIM),
    (PlanMsg, ("submodels", 0, "feature_dim"), 1, MAX_TENSOR_DIM),
    (PlanMsg, ("stem", "token_shape", 0), 1, MAX_TENSOR_DIM),
    (PlanMsg, ("stem", "token_shape", 1), 1, MAX_TENSOR_DIM),
    (PlanMsg, ("stem", "blocks"), 1, 256),
    (TokensMsg, ("shape", 0), 1, MAX_TENSOR_DIM),
    (TokensMsg, ("block",), 0, 256),
    (FeaturesMsg, ("dim",), 1, MAX_TENSOR_DIM),
    (FeaturesMsg, ("batch",), 1, 4096),
    (FrameMsg, ("shape", 0), 1, 65_535),
]


@pytest.mark.parametrize(
    ("kind", "path", "low", "high"),
    INT_LIMITS,
    ids=[f"{k.__name__}.{'.'.join(map(str, p))}" for k, p, _, _ in INT_LIMITS],
)
def test_ints_that_become_sizes_are_bounded(
    kind: type[schemas._Message], path: tuple[Any, ...], low: int, high: int
) -> None:
    for value in (high + 1, 10**9, U64):
        started = time.perf_counter()
        with pytest.raises(BadPayload, match=f"less than or equal to {high}"):
            decode(kind, _pack(kind, _with(kind, path, value)))
        assert time.perf_counter() - started < 0.5
    for value in (low - 1, I64):
        with pytest.raises(BadPayload, match=f"greater than or equal to {low}"):
            decode(kind, _pack(kind, _with(kind, path, value)))


def test_huge_ints_beyond_any_machine_word_are_refused() -> None:
    for path in (("preprocessing", "height"), ("stem", "blocks"), ("submodels", 0, "classes", 0)):
        with pytest.raises(BadPayload, match="PlanMsg"):
            decode(PlanMsg, json.dumps(_with(PlanMsg, path, 10**40)).encode())
    with pytest.raises(BadPayload, match="PlanMsg: created"):
        decode(PlanMsg, json.dumps(_with(PlanMsg, ("created",), 10**400)).encode())


def test_plan_class_indices_must_name_plan_classes() -> None:
    with pytest.raises(BadPayload, match="beyond the plan's classes"):
        decode(PlanMsg, _pack(PlanMsg, _with(PlanMsg, ("submodels", 1, "classes", 0), 3)))
    with pytest.raises(BadPayload, match="greater than or equal to 0"):
        decode(PlanMsg, _pack(PlanMsg, _with(PlanMsg, ("submodels", 1, "classes", 0), -1)))


def test_reasons_stay_on_one_short_line() -> None:
    hostile = "x\ny\r\x00" * 1000
    status = {"state": "ready", "counters": {hostile: "many"}}
    with pytest.raises(BadPayload) as caught:
        decode(StatusMsg, json.dumps(status).encode())
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)
    assert len(str(caught.value)) <= 300
    with pytest.raises(BadPayload, match="unsupported wire version") as caught:
        decode(ModelMsg, msgpack.packb({"v": hostile, "sha256": "s", "onnx": b"x"}))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
    plan = _with(PlanMsg, ("assignments",), {hostile: ["nope"]})
    with pytest.raises(BadPayload, match="unknown sub-models") as caught:
        decode(PlanMsg, json.dumps(plan).encode())
    assert "\n" not in str(caught.value)


def test_json_text_with_lone_surrogates_is_refused() -> None:
    # json.loads accepts "\ud800", but no service could publish such a string again.
    with pytest.raises(BadPayload, match="not valid JSON text"):
        decode(StatusMsg, b'{"state": "ready", "plan_id": "\\ud800"}')
    pair = decode(StatusMsg, b'{"state": "ready", "plan_id": "\\ud83d\\ude00"}')
    assert pair is not None and pair.plan_id == "\N{GRINNING FACE}"


# -- every message kind, arbitrary and hostile payloads ---------------------------------------
ALL_KINDS = [
    cls
    for cls in vars(schemas).values()
    if isinstance(cls, type) and issubclass(cls, schemas._Message) and cls.PAYLOAD_KIND
]


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.__name__)
def test_every_message_kind_has_a_payload_limit(kind: type[schemas._Message]) -> None:
    assert max_payload_bytes(kind.PAYLOAD_KIND) > 0
    oversize = b" " * (max_payload_bytes(kind.PAYLOAD_KIND) + 1)
    with pytest.raises(BadPayload, match="over the limit"):
        decode(kind, oversize)


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.__name__)
@HYPOTHESIS
@given(payload=st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_are_bad_payload(
    kind: type[schemas._Message], payload: bytes
) -> None:
    try:
        _assert_sound(kind, decode(kind, payload))
    except BadPayload as exc:
        assert "\n" not in str(exc)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a payload a field could be replaced, containers included."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        yield (*prefix, key)
        if isinstance(item, dict | list):
            yield from _paths(item, (*prefix, key))


PATHS = {kind: list(_paths(VALID[kind])) for kind in KINDS}
HOSTILE = st.one_of(
    st.sampled_from(
        [
            NAN,
            INF,
            -INF,
            -0.0,
            1e308,
            2**63 - 1,
            I64,
            U64,
            2**31,
            -1,
            0,
            "",
            "x\ny",
            "NaN",
            "1e999",
            [],
            {},
            None,
            True,
            [NAN],
            {"a": NAN},
            [U64, U64],
            [-2, -2],
            [2**62, 4, 1],
        ]
    ),  # fmt: skip
    st.text(max_size=8),
    st.integers(I64, U64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=16),
    st.lists(st.one_of(st.integers(I64, U64), st.floats(), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(I64, U64), st.floats()), max_size=3),
)


@st.composite
def hostile_payloads(draw: st.DrawFn, kind: type[schemas._Message]) -> bytes:
    raw = copy.deepcopy(VALID[kind])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS[kind]))
        target = raw
        try:
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = copy.deepcopy(draw(HOSTILE))  # literals are shared objects
        except (KeyError, IndexError, TypeError):  # an earlier replacement changed the tree
            pass
    if draw(st.booleans()):
        raw.pop(draw(st.sampled_from(sorted(raw))), None)
    return _pack(kind, raw)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@HYPOTHESIS
@given(data=st.data())
def test_hostile_fields_decode_or_are_bad_payload(
    kind: type[schemas._Message], data: st.DataObject
) -> None:
    payload = data.draw(hostile_payloads(kind))
    try:
        message = decode(kind, payload)
    except BadPayload as exc:
        assert "\n" not in str(exc)
        return
    _assert_sound(kind, message)
    if isinstance(message, FrameMsg):
        with contextlib.suppress(BadPayload):
            _assert_image(decode_frame(message))


# -- limits ------------------------------------------------------------------------------------
def test_payload_limits_fit_what_the_contract_allows() -> None:
    # The largest grey raw frame the pixel limit allows fits (colour ones go encoded).
    assert max_payload_bytes("frame") >= MAX_FRAME_PIXELS + 1024
    widest = FeaturesMsg(camera="c" * 64, seq=U64, ts=1.5, submodel="s" * 64, plan_id="p" * 64,
                         node="n" * 64, dtype="float32", data=bytes(4 * MAX_TENSOR_DIM),
                         dim=MAX_TENSOR_DIM, infer_ms=1.0, batch=4096, label=U64)  # fmt: skip
    assert len(encode(widest)) <= max_payload_bytes("features")
    vit_l = TokensMsg(camera="c", seq=0, ts=1.0, block=1, dtype="float32", shape=(577, 1024),
                      data=bytes(577 * 1024 * 4))  # fmt: skip
    assert len(encode(vit_l)) <= max_payload_bytes("tokens")
    assert max(MAX_PAYLOAD_BYTES.values()) < MAX_PACKET_BYTES
    assert MAX_PACKET_BYTES <= 268_435_455  # MQTT's largest remaining length


def test_compose_broker_packet_limit_matches_the_contract() -> None:
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    values = re.findall(r"^max_packet_size\s+(\d+)\s*$", conf, re.M)
    assert values == [str(MAX_PACKET_BYTES)]


def test_every_topic_has_a_kind() -> None:
    topics = Topics("lab")
    expected = {
        topics.frame("cam0"): "frame",
        topics.tokens("cam0"): "tokens",
        topics.camera_status("cam0"): "status",
        topics.plan(): "plan",
        topics.model("sub0"): "model",
        topics.fusion_model(): "model",
        topics.model("stem.block0"): "model",
        topics.node_status("node-0"): "status",
        topics.aggregator_status(): "status",
        topics.features("cam0", "sub0", "node-0"): "features",
        topics.predictions("cam0"): "prediction",
    }
    for topic, kind in expected.items():
        assert topic_kind(topics.parts(topic)) == kind, topic
    assert topic_kind(["cameras", "cam0", "other"]) is None
    assert topic_kind([]) is None
