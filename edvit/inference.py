"""ONNX Runtime sessions for sub-models and fusion, shared by the node, the aggregator and
offline evaluation, so the distributed path and the offline path run the same code."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edvit.bundle import (
    FEATURES_OUTPUT,
    FUSION_FEATURES_INPUT,
    FUSION_PRESENT_INPUT,
    IMAGE_INPUT,
    LOGITS_OUTPUT,
    Bundle,
)
from edvit.errors import ConfigError

# One input's full shape, a shape per input name, or None (every symbolic dim set to 1).
ShapeArg = Sequence[int] | Mapping[str, Sequence[int]] | None


def make_session(model: bytes | str | Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise ConfigError(f"ONNX Runtime cannot load the model: {exc}".splitlines()[0]) from None


class FeatureExtractor:
    """A sub-model: image [B, C, H, W] -> features [B, D]."""

    def __init__(self, model: bytes | Path, threads: int = 1) -> None:
        self.session = make_session(model, threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([FEATURES_OUTPUT], {IMAGE_INPUT: images})[0]


class Classifier:
    """The original model: image [B, C, H, W] -> logits [B, K]."""

    def __init__(self, model: bytes | Path, threads: int = 1) -> None:
        self.session = make_session(model, threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([LOGITS_OUTPUT], {IMAGE_INPUT: images})[0]


class Fusion:
    """The fusion MLP: per-sub-model feature blocks (None where missing) -> logits [B, K]."""

    def __init__(self, model: bytes | Path, feature_dims: tuple[int, ...], threads: int = 1):
        self.session = make_session(model, threads)
        self.feature_dims = feature_dims

    def __call__(self, blocks: list[np.ndarray | None]) -> np.ndarray:
        if len(blocks) != len(self.feature_dims):
            raise ValueError(f"fusion expects {len(self.feature_dims)} feature blocks")
        batch = next(b.shape[0] for b in blocks if b is not None)
        parts, present = [], np.zeros((batch, len(blocks)), dtype=np.float32)
        for i, (block, dim) in enumerate(zip(blocks, self.feature_dims, strict=True)):
            if block is None:
                parts.append(np.zeros((batch, dim), dtype=np.float32))
            else:
                parts.append(block.astype(np.float32, copy=False))
                present[:, i] = 1.0
        features = np.concatenate(parts, axis=1)
        return self.session.run(
            [LOGITS_OUTPUT], {FUSION_FEATURES_INPUT: features, FUSION_PRESENT_INPUT: present}
        )[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class OfflinePredictor:
    """Runs a whole bundle in one process: what the fleet computes, without the fleet."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.extractors = [FeatureExtractor(bundle.path(s.file), threads) for s in m.submodels]
        self.fusion = Fusion(bundle.path(m.fusion.file), m.fusion.feature_dims, threads)

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        return [extract(images) for extract in self.extractors]

    def fused_logits(self, images: np.ndarray, missing: frozenset[int] = frozenset()) -> np.ndarray:
        blocks = self.features(images)
        return self.fusion([None if i in missing else b for i, b in enumerate(blocks)])


def random_feed(session: ort.InferenceSession, input_feed_shape: ShapeArg) -> dict:
    inputs = session.get_inputs()
    if input_feed_shape is None or isinstance(input_feed_shape, Mapping):
        given = dict(input_feed_shape or {})
        shapes = {
            i.name: given.get(i.name, [d if isinstance(d, int) else 1 for d in i.shape])
            for i in inputs
        }
    elif len(inputs) == 1:
        shapes = {inputs[0].name: list(input_feed_shape)}
    else:
        raise ValueError("the model has several inputs: give a shape per input name")
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def measure_latency_ms(
    path: str | Path,
    input_feed_shape: ShapeArg = None,
    runs: int = 200,
    warmup: int = 20,
    threads: int = 1,
    idle_s: float = 0.0,
) -> float:
    """Median wall time in ms of one ``session.run`` on random float32 input.

    input_feed_shape: like :func:`onnx_flops`; None means batch 1 for every input.
    idle_s: sleep this long before each timed run, as a node does between one camera's
    frames: caches and CPU clocks have gone cold, which back-to-back runs never see.
    """
    if runs < 1:
        raise ConfigError(f"latency needs at least one run, got {runs}")
    session = make_session(Path(path), threads)
    feed = random_feed(session, input_feed_shape)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        if idle_s:
            time.sleep(idle_s)
        start = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6
