"""Frame decoding and preprocessing: any frame in, the model's input tensor out.

The build pipeline uses the same functions on dataset images, so the distributed
path and the offline evaluation compute identical inputs.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import Literal

import cv2
import numpy as np

from edvit.errors import BadPayload
from edvit.limits import MAX_FRAME_PIXELS
from edvit.schemas import FrameMsg, Preprocessing

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


# JPEG decoders scale by 1/2, 1/4 or 1/8 inside the inverse DCT, for a fraction of the
# work of a full decode: (colour, grayscale) flags by factor.
_JPEG_REDUCED = {
    2: (cv2.IMREAD_REDUCED_COLOR_2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
    4: (cv2.IMREAD_REDUCED_COLOR_4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    8: (cv2.IMREAD_REDUCED_COLOR_8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
}


def jpeg_reduction(width: int, height: int, pp: Preprocessing) -> int:
    """The largest factor (8, 4, 2, else 1) that a width x height JPEG can be decoded
    smaller by and still cover the model's input on both sides."""
    for factor in (8, 4, 2):
        if width // factor >= pp.width and height // factor >= pp.height:
            return factor
    return 1


def decode_frame(
    frame: FrameMsg, max_pixels: int = MAX_FRAME_PIXELS, for_input: Preprocessing | None = None
) -> np.ndarray:
    """Return the frame's pixels as uint8 [H, W] or [H, W, 3] (colour in OpenCV's BGR order).

    Any bad frame raises BadPayload, nothing else. Sizes are checked before any decoding:
    raw frames from their shape, png/jpeg from the image header, so a small file that
    declares more than `max_pixels` pixels costs nothing.

    With ``for_input``, a JPEG at least twice the model's input on both sides is decoded
    only as large as that input needs (``jpeg_reduction``), in the model's channels: the
    pixels differ from a full decode's by rounding, the area resize that follows gives the
    same image to within a few levels, and a 1080p frame decodes several times faster.
    """
    check_frame(frame, max_pixels)
    flag = cv2.IMREAD_UNCHANGED
    if frame.enc == "jpeg" and for_input is not None:
        factor = jpeg_reduction(*image_size(frame.data, "jpeg"), for_input)
        if factor > 1:
            flag = _JPEG_REDUCED[factor][0 if for_input.channels == 3 else 1]
    if frame.enc == "raw":
        image = _raw_image(frame, max_pixels)
    else:  # png or jpeg, its header checked
        try:
            image = cv2.imdecode(np.frombuffer(frame.data, np.uint8), flag)
        except Exception as exc:  # cv2.error, MemoryError: all about this input
            raise BadPayload(f"{frame.enc} frame does not decode: {type(exc).__name__}") from None
        if image is None:
            raise BadPayload(f"frame data is not a decodable {frame.enc} image")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise BadPayload(f"frame has unsupported shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise BadPayload("frame is empty")
    # The decoder reads the same header; this keeps the promise even if it did not.
    _check_pixels(image.shape[0], image.shape[1], max_pixels)
    if image.dtype != np.uint8:
        raise BadPayload(f"frame has dtype {image.dtype}, expected uint8")
    return image


def check_frame(frame: FrameMsg, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """Everything decode_frame checks before it decodes pixels: the data, the encoding, a
    raw frame's shape and length, a png/jpeg file's header and declared size. Costs
    microseconds, so a receiver can refuse a bad frame on arrival and decode the good ones
    later (or never, when a newer frame replaces it). Raises BadPayload."""
    data = frame.data
    if not isinstance(data, bytes):
        raise BadPayload(f"frame data is {type(data).__name__}, expected bytes")
    if not data:
        raise BadPayload("frame data is empty")
    if frame.enc == "raw":
        _raw_image(frame, max_pixels)
    elif frame.enc in ("png", "jpeg"):
        width, height = image_size(data, frame.enc)
        _check_pixels(height, width, max_pixels)
    else:
        raise BadPayload(f"unknown frame encoding {frame.enc!r}")


def _raw_image(frame: FrameMsg, max_pixels: int) -> np.ndarray:
    shape = frame.shape
    if shape is None or len(shape) not in (2, 3):
        raise BadPayload("raw frames need shape [H, W] or [H, W, C]")
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise BadPayload(f"raw frame has shape {_short(shape)}: every entry must be positive")
    if frame.dtype != "uint8":
        raise BadPayload(f"raw frame has dtype {_short(frame.dtype)}, expected uint8")
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise BadPayload(f"raw frame has {shape[2]} channels, expected 1, 3 or 4")
    _check_pixels(shape[0], shape[1], max_pixels)
    expected = shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1)  # Python ints
    if len(frame.data) != expected:
        raise BadPayload(f"raw frame has {len(frame.data)} bytes, shape needs {expected}")
    return np.frombuffer(frame.data, dtype=np.uint8).reshape(shape)


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise BadPayload(
            f"frame is {_short(width)}x{_short(height)}, over the limit of {max_pixels} pixels"
        )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libpng writes 8 KiB IDAT chunks: a frame within the payload limit has ~4k chunks.
_PNG_MAX_CHUNKS = 16_384
# The markers libjpeg accepts before the frame header, read the way it reads them; any
# other marker (or garbage between segments) is refused, so the size read here is the size
# the decoder will read. Start of frame (carries the size): C0-CF but DHT, JPG and DAC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Without a length field: TEM, RST0-7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# With a length field, skipped: DHT, DAC, DQT, DNL, DRI, APP0-15, COM.
_JPEG_SKIPPED = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})
# Real files have a dozen segments before the frame header (up to ~260 with a chunked ICC
# profile); the bound keeps a file of millions of empty segments from costing seconds.
_JPEG_MAX_SEGMENTS = 1024
_JPEG_FILL = re.compile(rb"\xff+")
# Every scan of a progressive JPEG costs a pass over the whole image: 1000 copies of a
# 20-byte scan made a 52 KB file that took 6.5 s to decode at 4K. Encoders write 1-3 scans
# (baseline) or about 10 (progressive).
_JPEG_MAX_SCANS = 32


def image_size(data: bytes, enc: Literal["png", "jpeg"]) -> tuple[int, int]:
    """(width, height) that a png/jpeg file declares, read from its header without decoding
    the pixels. Raises BadPayload when the data is not a file of that encoding."""
    return _png_size(data) if enc == "png" else _jpeg_size(data)


def _png_size(data: bytes) -> tuple[int, int]:
    # Signature, then the IHDR chunk: length 13, "IHDR", width, height, bit depth, colour type.
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE):
        raise BadPayload("frame data is not a decodable png image")
    length, kind, width, height, depth = struct.unpack(">I4sIIB", data[8:25])
    if length != 13 or kind != b"IHDR":
        raise BadPayload("png frame does not start with its IHDR header")
    if width == 0 or height == 0:
        raise BadPayload("png frame declares an empty image")
    if depth == 16:  # decodes to uint16, which a node refuses anyway: refuse before decoding
        raise BadPayload("frame has dtype uint16, expected uint8")
    # OpenCV allocates each chunk's declared length before reading it: a 150-byte file whose
    # chunk claims 4 GB cost seconds and gigabytes. Every chunk must fit in the data.
    at = len(_PNG_SIGNATURE)
    for _ in range(_PNG_MAX_CHUNKS):
        if at + 12 > len(data):
            raise BadPayload("png frame is cut short (no IEND chunk)")
        (length,) = struct.unpack_from(">I", data, at)
        kind = data[at + 4 : at + 8]
        at += 12 + length  # length, type, data, crc
        if at > len(data):
            raise BadPayload("png frame has a chunk longer than the data")
        if kind == b"IEND":
            return width, height
    raise BadPayload(f"png frame has more than {_PNG_MAX_CHUNKS} chunks")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    if not data.startswith(b"\xff\xd8"):
        raise BadPayload("frame data is not a decodable jpeg image")
    at = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        fill = _JPEG_FILL.match(data, at)
        if fill is None or fill.end() >= len(data):
            break
        marker = data[fill.end()]
        at = fill.end() + 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker not in _JPEG_SOF and marker not in _JPEG_SKIPPED:
            break
        if at + 2 > len(data):
            break
        (length,) = struct.unpack(">H", data[at : at + 2])
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if length < 8 or at + 7 > len(data):
                break
            height, width = struct.unpack(">HH", data[at + 3 : at + 7])
            if width == 0 or height == 0:  # height 0 (set later by a DNL marker): unsupported
                raise BadPayload("jpeg frame declares an empty image")
            # Entropy-coded data stuffs every 0xFF byte, so this counts start-of-scan markers.
            if data.count(b"\xff\xda", at) > _JPEG_MAX_SCANS:
                raise BadPayload(f"jpeg frame has more than {_JPEG_MAX_SCANS} scans")
            return width, height
        at += length
    raise BadPayload("jpeg frame has no readable frame header")


def frame_to_model_input(frame: FrameMsg, pp: Preprocessing) -> np.ndarray:
    """A frame message's pixels as the model's input, as a node computes it: a large JPEG
    decoded only as large as the input needs (``decode_frame``'s ``for_input``)."""
    return to_model_input(decode_frame(frame, for_input=pp), pp)


def to_model_input(image: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] (BGR) -> float32 [C, H', W'] as the bundle's preprocessing says.

    Resized while still uint8 and before any channel is reordered or copied (which commute
    with resizing), then normalised through a lookup table that also puts the channels in
    the model's order: the same values as ``normalize``, for a third of its work."""
    if pp.channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.shape[:2] != (pp.height, pp.width):
        image = cv2.resize(
            image, (pp.width, pp.height), interpolation=_INTERPOLATION[pp.interpolation]
        )
    table = _normalize_table(pp.mean, pp.std)
    out = np.empty((pp.channels, pp.height, pp.width), dtype=np.float32)
    for c in range(pp.channels):
        # RGB channel c is BGR channel 2 - c; a gray image gives every channel.
        plane = image if image.ndim == 2 else image[:, :, 2 - c]
        np.take(table[c], plane, out=out[c])
    return out


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [C, 256]: ``normalize`` of every uint8 value, per channel."""
    values = np.arange(256, dtype=np.float32).reshape(1, 256) / np.float32(255.0)
    mean_ = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(-1, 1)
    return (values - mean_) / std_


def normalize(images: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 [N, C, H, W] already at the model's size -> normalised float32 [N, C, H, W]."""
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) / np.float32(255.0)) - mean) / std


def dataset_to_model_input(images: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """A dataset's uint8 images [N, H, W] or [N, H, W, 3] (RGB) -> float32 [N, C, H, W].

    Fast path for images already at the model's size and channel count; otherwise image
    by image through to_model_input, exactly as a node would.
    """
    gray = images.ndim == 3
    if images.shape[1:3] == (pp.height, pp.width) and (pp.channels == 1) == gray:
        nchw = images[:, None] if gray else images.transpose(0, 3, 1, 2)
        return normalize(nchw, pp)
    bgr = images if gray else images[..., ::-1]
    return np.stack([to_model_input(np.ascontiguousarray(im), pp) for im in bgr])
