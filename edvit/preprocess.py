"""Frame decoding and preprocessing: any frame in, the model's input tensor out.

The build pipeline uses the same functions on dataset images, so the distributed
path and the offline evaluation compute identical inputs.
"""

from __future__ import annotations

import cv2
import numpy as np

from edvit.errors import BadPayload
from edvit.schemas import FrameMsg, Preprocessing

_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def decode_frame(frame: FrameMsg) -> np.ndarray:
    """Return the frame's pixels as uint8 [H, W] or [H, W, 3] (colour in OpenCV's BGR order)."""
    if frame.enc == "raw":
        assert frame.shape is not None  # guaranteed by FrameMsg validation
        expected = int(np.prod(frame.shape))
        if len(frame.data) != expected:
            raise BadPayload(f"raw frame has {len(frame.data)} bytes, shape needs {expected}")
        image = np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    else:
        image = cv2.imdecode(np.frombuffer(frame.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
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
    if image.dtype != np.uint8:
        raise BadPayload(f"frame has dtype {image.dtype}, expected uint8")
    return image


def to_model_input(image: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] (BGR) -> float32 [C, H', W'] as the bundle's preprocessing says."""
    if pp.channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif pp.channels == 3:
        image = (
            cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
            if image.ndim == 2
            else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        )
    if image.shape[:2] != (pp.height, pp.width):
        image = cv2.resize(
            image, (pp.width, pp.height), interpolation=_INTERPOLATION[pp.interpolation]
        )
    if image.ndim == 2:
        image = image[:, :, None]
    return normalize(image.transpose(2, 0, 1)[None], pp)[0]


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
