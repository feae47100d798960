"""ONNX export with the contract's input/output names and a dynamic batch dimension, and the
parity check of ONNX Runtime against torch."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edvit.bundle import (
    FEATURES_OUTPUT,
    FUSION_FEATURES_INPUT,
    FUSION_PRESENT_INPUT,
    IMAGE_INPUT,
    LOGITS_OUTPUT,
)

PARITY_TOLERANCE = 1e-4
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript")
OPSET = 18


class ExportError(RuntimeError):
    """An exported model that cannot be loaded or does not match torch."""


@contextmanager
def quiet_exporter_logs() -> Iterator[None]:
    """The dynamo exporter's optimiser logs a line per folded constant at INFO, hundreds per
    model under the CLI's INFO logging: keep only its warnings while it runs."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    module: nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    input_names: Sequence[str],
    output_name: str,
) -> str:
    """Write ``module`` to ``path`` as one self-contained ONNX file; returns the exporter used.

    Tries the dynamo exporter first and falls back to the TorchScript one if it fails.
    """
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    args = tuple(example)
    try:
        with warnings.catch_warnings(), quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                verbose=False,
                input_names=list(input_names),
                output_names=[output_name],
                dynamic_shapes=tuple({0: batch} for _ in args),
                opset_version=OPSET,
                external_data=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
        exporter = "dynamo"
    except Exception as exc:  # the dynamo exporter raises many kinds of errors
        print(
            f"[edvit build] dynamo export failed ({exc!r:.200}); using TorchScript", file=sys.stderr
        )
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes={name: {0: "batch"} for name in (*input_names, output_name)},
            opset_version=OPSET,
        )
        exporter = "torchscript"
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"{path} refers to external data; expected one self-contained file")
    return exporter


@torch.no_grad()
def parity(
    module: nn.Module, path: Path, inputs: Sequence[np.ndarray], input_names: Sequence[str]
) -> float:
    """Max |ONNX Runtime - torch| over ``inputs``; raises ExportError above the tolerance."""
    module.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {
        name: np.ascontiguousarray(x, dtype=np.float32)
        for name, x in zip(input_names, inputs, strict=True)
    }
    onnx_out = session.run(None, feed)[0]
    torch_out = module(*(torch.from_numpy(feed[name]) for name in input_names)).numpy()
    if onnx_out.shape != torch_out.shape:
        raise ExportError(f"{path.name}: ONNX output {onnx_out.shape} vs torch {torch_out.shape}")
    diff = float(np.max(np.abs(onnx_out - torch_out)))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"{path.name}: ONNX Runtime differs from torch by {diff:.3g}")
    return diff


class _ImageModel(nn.Module):
    """Names the input ``image`` for the exporter whatever the wrapped forward calls it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.inner(image)


def export_image_model(
    module: nn.Module, path: Path, images: np.ndarray, *, features: bool
) -> tuple[str, float]:
    """Export an image -> features (sub-model) or image -> logits (original) model and check it.

    ``images`` are real model inputs [B, C, H, W]; returns (exporter, max abs diff).
    """
    wrapped = _ImageModel(module).eval()
    output = FEATURES_OUTPUT if features else LOGITS_OUTPUT
    example = (torch.from_numpy(np.ascontiguousarray(images[:2], dtype=np.float32)),)
    exporter = export_onnx(wrapped, example, path, [IMAGE_INPUT], output)
    return exporter, parity(wrapped, path, [images], [IMAGE_INPUT])


def export_fusion(
    module: nn.Module, path: Path, features: np.ndarray, present: np.ndarray
) -> tuple[str, float]:
    """Export the fusion MLP (features, present) -> logits and check it on real inputs."""
    names = [FUSION_FEATURES_INPUT, FUSION_PRESENT_INPUT]
    example = tuple(
        torch.from_numpy(np.ascontiguousarray(x[:2], dtype=np.float32)) for x in (features, present)
    )
    exporter = export_onnx(module.eval(), example, path, names, LOGITS_OUTPUT)
    return exporter, parity(module, path, [features, present], names)
