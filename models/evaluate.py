"""`edvit evaluate`: size, compute, latency and accuracy of a bundle's models (no torch).

What is measured, and how:

- **params**: elements of the floating-point initializers of the ONNX file. Integer
  initializers (shape constants of Reshape/Slice/...) are not parameters, and neither are
  floating-point initializers of at most one element: the dynamo exporter stores the
  constants of GELU (0.5, 1, sqrt 2) and the attention scale as such. It folds each
  Linear's weight transpose into a new ``val_N`` initializer that *replaces* the weight, so
  nothing is counted twice. On the shipped fashion-mnist-3 bundle this gives exactly torch's
  count for the original (205,962) and the fusion (52,746). A sub-model's ONNX file holds
  the feature extractor only, so it has ``(k + 1) * (feature_dim + 1)`` parameters fewer than
  the manifest's count, which includes the (k+1)-way head used to fine-tune it.
- **bytes**: size of the ONNX file (plus its external data files, if any).
- **FLOPs**: 2 x multiply-accumulates of MatMul, Gemm, Conv and Einsum nodes at batch 1,
  from ONNX shape inference with every symbolic input dimension set to 1. Softmax,
  LayerNormalization, GELU, additions and other element-wise work are not counted.
- **latency**: median wall time of ``session.run`` at batch 1 on random float32 input, with
  ``intra_op_num_threads=threads`` (the sessions of :mod:`edvit.inference`).
- **accuracy**: on the dataset's test split (or the images given), the original model, the
  fused prediction with every sub-model present, and the fused prediction with each single
  sub-model missing (its feature block zero and its ``present`` flag 0). None for an untrained
  bundle (``edvit build --untrained``: random weights), whose dataset is not read.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from edvit.bundle import REPORT_NAME, Bundle
from edvit.errors import ConfigError
from edvit.inference import (
    Classifier,
    OfflinePredictor,
    ShapeArg,
    measure_latency_ms,
)

if TYPE_CHECKING:
    import onnx

BATCH = 1000  # test images per ONNX Runtime call when computing accuracies
MATMUL_OPS = ("MatMul", "Gemm", "Conv", "Einsum")


# --- ONNX static figures ------------------------------------------------------------------


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("edvit evaluate needs onnx: pip install 'edvit[build]'") from None
    return onnx


def _load(path: str | Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except OSError as exc:
        raise ConfigError(f"cannot read ONNX file {path}: {exc.strerror}") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConfigError(f"{path} is not an ONNX model: {exc}".splitlines()[0]) from None


def _is_float(data_type: int) -> bool:
    onnx = _onnx()
    T = onnx.TensorProto
    return data_type in (T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE)


def onnx_params(path: str | Path) -> int:
    """Parameters of an ONNX model: elements of its float initializers of 2+ elements."""
    model = _load(path, load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        size = int(np.prod(init.dims, dtype=np.int64))
        if _is_float(init.data_type) and size > 1:
            total += size
    return total


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX file plus the external data files its initializers name."""
    path = Path(path)
    model = _load(path, load_external_data=False)
    external = {
        entry.value
        for init in model.graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)


def _input_shapes(model: onnx.ModelProto, input_shape: ShapeArg) -> dict[str, list[int]]:
    """Concrete shape of every graph input: given ones, else symbolic dims set to 1."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if input_shape is not None and not isinstance(input_shape, Mapping):
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ValueError(f"the model has inputs {names}: give a shape per input name")
        input_shape = {inputs[0].name: input_shape}
    given = dict(input_shape or {})
    shapes = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        default = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        shapes[value.name] = [int(d) for d in given.pop(value.name, default)]
    if given:
        raise ValueError(f"the model has no input named {sorted(given)[0]!r}")
    return shapes


def _with_fixed_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    onnx = _onnx()
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        elem_type = value.type.tensor_type.elem_type
        fixed = onnx.helper.make_tensor_value_info(value.name, elem_type, shapes[value.name])
        value.CopyFrom(fixed)


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    """Shape of every value shape inference resolved (None where a dim is unknown)."""
    shapes: dict[str, list[int] | None] = {}
    graph = model.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else None
        known = dims is not None and all(d.HasField("dim_value") for d in dims)
        shapes[value.name] = [d.dim_value for d in dims] if known else None
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int] | None]) -> int:
    """Multiply-accumulates of one MatMul/Gemm/Conv/Einsum node with resolved shapes."""
    ins = [shapes.get(name) for name in node.input if name]
    out = shapes.get(node.output[0])
    if out is None or any(s is None for s in ins):
        raise ConfigError(f"cannot resolve the shapes of {node.op_type} node {node.name!r}")
    if node.op_type == "MatMul":
        return int(np.prod(out, dtype=np.int64)) * ins[0][-1]
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][1]
        return int(np.prod(out, dtype=np.int64)) * k
    if node.op_type == "Conv":
        # weight [C_out, C_in / groups, *kernel]: each output element costs one kernel window.
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(ins[1][1:], dtype=np.int64))
    return _einsum_macs(node, ins, out)


def _einsum_macs(node: onnx.NodeProto, ins: list[Any], out: list[int]) -> int:
    """Output elements times the sizes of the contracted (summed-over) letters."""
    equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
    equation = equation.replace(" ", "")
    lhs = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, ins, strict=True):
        # An ellipsis stands for the dims that the letters around it do not name.
        head, _, tail = term.partition("...")
        sizes.update(zip(head, shape[: len(head)], strict=True))
        if tail:
            sizes.update(zip(tail, shape[len(shape) - len(tail) :], strict=True))
    if "->" in equation:
        output = equation.split("->")[1]
    else:  # implicit output: the letters that occur once, in alphabetical order
        letters = "".join(lhs).replace(".", "")
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    contracted = set(sizes) - set(output)
    return int(np.prod(out, dtype=np.int64)) * int(
        np.prod([sizes[c] for c in contracted], dtype=np.int64)
    )


def onnx_flops(path: str | Path, input_shape: ShapeArg = None) -> int:
    """2 x multiply-accumulates of the MatMul, Gemm, Conv and Einsum nodes.

    input_shape: the single input's full shape (batch included, e.g. ``(1, 1, 28, 28)``),
    a shape per input name, or None to set every symbolic dimension to 1 (batch 1).
    Element-wise work, Softmax and normalisations are not counted.
    """
    onnx = _onnx()
    model = _load(path)
    _with_fixed_inputs(model, _input_shapes(model, input_shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # InferenceError and checker errors
        raise ConfigError(f"{path}: shape inference failed: {exc}".splitlines()[0]) from None
    shapes = _known_shapes(inferred)
    nodes = [n for n in inferred.graph.node if n.op_type in MATMUL_OPS]
    return 2 * sum(_node_macs(node, shapes) for node in nodes)


# --- latency ------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# --- accuracy -----------------------------------------------------------------------------


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _batched(fn: Any, images: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def _test_split(bundle: Bundle, data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    from edvit.datasets import load_dataset
    from edvit.preprocess import dataset_to_model_input

    m = bundle.manifest
    test = load_dataset(m.dataset, "test", data_dir)
    return dataset_to_model_input(test.images, m.preprocessing), test.labels


def bundle_accuracies(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, threads: int = 1
) -> dict[str, Any]:
    """Original, fused, and fused with each single sub-model missing.

    The sub-models' features are computed once and reused for every missing-one variant.
    """
    m = bundle.manifest
    original = Classifier(bundle.path(m.original.file), threads)
    predictor = OfflinePredictor(bundle, threads)
    blocks = [_batched(extract, images) for extract in predictor.extractors]

    def fused(missing: int | None) -> float:
        def run(start: int) -> np.ndarray:
            part = [
                None if i == missing else b[start : start + BATCH] for i, b in enumerate(blocks)
            ]
            return predictor.fusion(part)

        logits = np.concatenate([run(i) for i in range(0, len(images), BATCH)])
        return _accuracy(logits, labels)

    return {
        "original": _accuracy(_batched(original, images), labels),
        "fused": fused(None),
        "fused_without": {s.id: fused(i) for i, s in enumerate(m.submodels)},
    }


# --- the whole bundle ---------------------------------------------------------------------


def _model_figures(
    path: Path, input_shape: ShapeArg, threads: int, latency_runs: int
) -> dict[str, Any]:
    return {
        "params": onnx_params(path),
        "bytes": onnx_bytes(path),
        "flops": onnx_flops(path, input_shape),
        "latency_ms": measure_latency_ms(
            path, input_shape, runs=latency_runs, warmup=min(20, latency_runs), threads=threads
        ),
    }


def evaluate_bundle(
    bundle: Bundle,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    threads: int = 1,
    latency_runs: int = 200,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Every figure of a bundle as a JSON-able dict (see the module docstring)."""
    _onnx()  # fail early, with the install hint, before the slow parts
    if (images is None) != (labels is None):
        raise ValueError("give both images and labels, or neither")
    m = bundle.manifest
    if (images is None or labels is None) and not m.untrained:
        images, labels = _test_split(bundle, data_dir)
    image_shape = (1, *m.input_shape)
    original = _model_figures(bundle.path(m.original.file), image_shape, threads, latency_runs)
    submodels = {}
    for spec in m.submodels:
        figures = _model_figures(bundle.path(spec.file), image_shape, threads, latency_runs)
        submodels[spec.id] = {"classes": list(spec.classes), **figures}
        submodels[spec.id]["feature_dim"] = spec.feature_dim
    fusion = _model_figures(bundle.path(m.fusion.file), None, threads, latency_runs)
    largest = max(s["params"] for s in submodels.values())
    scored = not m.untrained and images is not None and labels is not None
    return {
        "dataset": m.dataset,
        "untrained": m.untrained,
        "test_images": len(labels) if scored and labels is not None else 0,
        "original": original,
        "submodels": submodels,
        "fusion": fusion,
        "accuracy": bundle_accuracies(bundle, images, labels, threads) if scored else None,
        "ratios": {
            "size": original["params"] / largest,
            "bytes": original["bytes"] / max(s["bytes"] for s in submodels.values()),
            "latency": original["latency_ms"] / max(s["latency_ms"] for s in submodels.values()),
            "sum_params_over_original": sum(s["params"] for s in submodels.values())
            / original["params"],
            "flops": original["flops"] / max(s["flops"] for s in submodels.values()),
            "fusion_params_over_largest_submodel": fusion["params"] / largest,
        },
        "measured_on": {
            "cpu": cpu_name(),
            "threads": threads,
            "onnxruntime": ort.__version__,
        },
    }


# --- presentation -------------------------------------------------------------------------


def format_table(report: Mapping[str, Any]) -> str:
    """The report as markdown: one row per model, then accuracies and ratios."""
    rows = [("original", "all", report["original"])]
    rows += [
        (sid, ",".join(str(c) for c in sub["classes"]), sub)
        for sid, sub in report["submodels"].items()
    ]
    rows.append(("fusion", "-", report["fusion"]))
    lines = [
        "| model | classes | params | MB | MFLOPs | latency ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, classes, fig in rows:
        lines.append(
            f"| {name} | {classes} | {fig['params']:,} | {fig['bytes'] / 1e6:.3f} "
            f"| {fig['flops'] / 1e6:.2f} | {fig['latency_ms']:.3f} |"
        )
    acc, ratios, where = report["accuracy"], report["ratios"], report["measured_on"]
    if acc is None:
        lines += ["", "Accuracy: none, an untrained bundle (random weights): sizes and speed only."]
    else:
        lines += [
            "",
            f"Accuracy on {report['test_images']:,} {report['dataset']} test images:",
            f"- original: {acc['original']:.4f}",
            f"- fused: {acc['fused']:.4f}",
        ]
        lines += [f"- fused without {sid}: {a:.4f}" for sid, a in acc["fused_without"].items()]
    lines += [
        "",
        "Ratios (original / largest or slowest sub-model):",
        f"- size: {ratios['size']:.3f}x",
    ]
    if "bytes" in ratios:  # reports before ONNX sizes were compared
        lines.append(f"- ONNX bytes: {ratios['bytes']:.3f}x")
    lines += [
        f"- latency: {ratios['latency']:.3f}x",
        f"- FLOPs: {ratios['flops']:.3f}x",
        f"- sum of sub-model params / original params: {ratios['sum_params_over_original']:.3f}",
    ]
    if "fusion_params_over_largest_submodel" in ratios:  # reports before the fusion was sized
        lines.append(
            "- fusion params / largest sub-model params: "
            f"{ratios['fusion_params_over_largest_submodel']:.3f}"
        )
    lines += [
        "",
        f"Measured on {where['cpu']}, {where['threads']} thread(s), "
        f"onnxruntime {where['onnxruntime']}, batch 1.",
    ]
    return "\n".join(lines)


def plot_accuracy_vs_size(points: list[dict[str, Any]], path: str | Path) -> None:
    """PNG of fused accuracy against size reduction, one labelled point per N.

    points: dicts with num_devices, size_reduction, fused_accuracy, original_accuracy.
    """
    if not points:
        raise ValueError("no points to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = sorted(points, key=lambda p: p["size_reduction"])
    xs = [p["size_reduction"] for p in points]
    ys = [p["fused_accuracy"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        ax.plot(xs, ys, "o-", color="tab:blue", label="ED-ViT (fused sub-models)")
        for p in points:
            ax.annotate(
                f"N={p['num_devices']}",
                (p["size_reduction"], p["fused_accuracy"]),
                textcoords="offset points",
                xytext=(6, 6),
            )
        originals = {round(float(p["original_accuracy"]), 6) for p in points}
        if len(originals) == 1:
            ax.axhline(originals.pop(), color="tab:gray", ls="--", label="original ViT")
        else:
            ax.scatter(
                xs,
                [p["original_accuracy"] for p in points],
                marker="x",
                color="tab:gray",
                label="original ViT (per point)",
            )
        ax.set_xscale("log")
        # Plain "2x" ticks rather than 2x10^0 on the log axis, minor ticks included.
        ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
        ax.xaxis.set_major_formatter(ticks)
        ax.xaxis.set_minor_formatter(ticks)
        ax.set_xlabel("size reduction (original params / largest sub-model params)")
        ax.set_ylabel("test accuracy")
        ax.set_title("Accuracy vs. model size reduction")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)


# --- CLI ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder written by `edvit build`")
    parser.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)"
    )
    parser.add_argument(
        "--runs", type=int, default=200, help="timed runs per model for the median latency"
    )
    parser.add_argument("--data-dir", help="folder of the bundle's dataset (default: its usual)")
    parser.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
    parser.add_argument(
        "--write-report",
        action="store_true",
        help="merge the figures into the bundle's report.json under 'evaluation'",
    )


def write_report(bundle: Bundle, evaluation: Mapping[str, Any]) -> Path:
    """Merge ``evaluation`` into the bundle's report.json, keeping its other keys."""
    path = bundle.path(REPORT_NAME)
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    report["evaluation"] = evaluation
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")
    bundle = Bundle.load(args.bundle)
    report = evaluate_bundle(
        bundle, threads=args.threads, latency_runs=args.runs, data_dir=args.data_dir
    )
    print(format_table(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise ConfigError(f"cannot write {args.json}: {exc.strerror}") from None
    if args.write_report:
        write_report(bundle, report)
    return 0
