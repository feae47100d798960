"""edvit evaluate on the shipped Fashion-MNIST bundle (300 test images) and on tiny ONNX graphs."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edvit.bundle import Bundle
from edvit.datasets import load_dataset
from edvit.errors import ConfigError
from edvit.inference import Classifier, OfflinePredictor, measure_latency_ms
from edvit.models import evaluate
from edvit.preprocess import dataset_to_model_input

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

BUNDLE_DIR = Path(__file__).resolve().parents[1] / "fleet" / "bundles" / "fashion-mnist-3"
NUM_IMAGES = 300
LATENCY_RUNS = 20


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(BUNDLE_DIR)


@pytest.fixture(scope="module")
def test_set(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    try:
        test = load_dataset(bundle.manifest.dataset, "test")
    except ConfigError as exc:
        pytest.skip(str(exc))
    images = dataset_to_model_input(test.images[:NUM_IMAGES], bundle.manifest.preprocessing)
    return images, test.labels[:NUM_IMAGES]


@pytest.fixture(scope="module")
def report(bundle: Bundle, test_set: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    images, labels = test_set
    return evaluate.evaluate_bundle(bundle, images=images, labels=labels, latency_runs=LATENCY_RUNS)


def architecture(spec: str) -> dict[str, float]:
    """``timm.VisionTransformer(size=small,img_size=28,...)`` -> its numeric arguments."""
    inside = re.search(r"\((.*)\)", spec)
    assert inside is not None
    pairs = (item.split("=") for item in inside.group(1).split(","))
    return {k: float(v) for k, v in pairs if re.fullmatch(r"[0-9.]+", v)}


def vit_flops(arch: dict[str, float], num_classes: int) -> int:
    """2 x MACs of the patch Conv, every block's Linear layers and attention products, head."""
    side, patch, dim = int(arch["img_size"]), int(arch["patch_size"]), int(arch["embed_dim"])
    patches = (side // patch) ** 2
    tokens = patches + 1  # the class token
    hidden = int(dim * arch["mlp_ratio"])
    conv = patches * dim * int(arch["in_chans"]) * patch * patch
    qkv, proj = tokens * dim * 3 * dim, tokens * dim * dim
    attention = 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
    mlp = 2 * tokens * dim * hidden
    head = dim * num_classes
    return 2 * (conv + int(arch["depth"]) * (qkv + attention + proj + mlp) + head)


def test_report_has_every_field(report: dict[str, Any], bundle: Bundle) -> None:
    json.dumps(report)  # JSON-able
    ids = [s.id for s in bundle.manifest.submodels]
    assert report["dataset"] == "fashion-mnist"
    assert report["test_images"] == NUM_IMAGES
    for fig in (report["original"], report["fusion"], *report["submodels"].values()):
        assert set(fig) >= {"params", "bytes", "flops", "latency_ms"}
        assert fig["latency_ms"] > 0
    assert list(report["submodels"]) == ids
    for spec in bundle.manifest.submodels:
        sub = report["submodels"][spec.id]
        assert sub["classes"] == list(spec.classes)
        assert sub["feature_dim"] == spec.feature_dim
    assert list(report["accuracy"]["fused_without"]) == ids
    assert set(report["ratios"]) == {
        "size",
        "bytes",
        "latency",
        "sum_params_over_original",
        "flops",
        "fusion_params_over_largest_submodel",
    }
    assert report["measured_on"]["threads"] == 1
    assert report["measured_on"]["cpu"] and report["measured_on"]["onnxruntime"]


def test_params_match_torch_counts(report: dict[str, Any], bundle: Bundle) -> None:
    m = bundle.manifest
    assert report["original"]["params"] == m.original.params == 205_962
    assert report["fusion"]["params"] == m.fusion.params
    for spec in m.submodels:
        # The manifest counts what is shipped: the feature extractor, not the training head.
        assert report["submodels"][spec.id]["params"] == spec.params


def test_bytes_are_file_sizes(report: dict[str, Any], bundle: Bundle) -> None:
    m = bundle.manifest
    assert report["original"]["bytes"] == bundle.path(m.original.file).stat().st_size
    assert report["fusion"]["bytes"] == bundle.path(m.fusion.file).stat().st_size
    for spec in m.submodels:
        assert report["submodels"][spec.id]["bytes"] == bundle.path(spec.file).stat().st_size


def test_flops_match_the_vit_formula(report: dict[str, Any], bundle: Bundle) -> None:
    m = bundle.manifest
    arch = architecture(m.original.architecture)
    expected = vit_flops(arch, m.num_classes)
    assert report["original"]["flops"] == pytest.approx(expected, rel=0.05)
    dim = int(arch["embed_dim"])
    for spec in m.submodels:
        flops = report["submodels"][spec.id]["flops"]
        assert 0 < flops <= report["original"]["flops"]
        if spec.architecture is None:  # not pruned: the original without its head
            assert flops == pytest.approx(expected - 2 * dim * m.num_classes, rel=0.05)
    hidden, dims = m.fusion.hidden_dim, m.fusion.feature_dims
    fusion_macs = (sum(dims) + len(dims)) * hidden + hidden * m.num_classes
    assert report["fusion"]["flops"] == 2 * fusion_macs


def test_accuracies_match_direct_recomputation(
    report: dict[str, Any], bundle: Bundle, test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_set
    m = bundle.manifest
    predictor = OfflinePredictor(bundle)
    original = Classifier(bundle.path(m.original.file))

    def accuracy(logits: np.ndarray) -> float:
        return float(np.mean(logits.argmax(axis=1) == labels))

    acc = report["accuracy"]
    assert acc["original"] == pytest.approx(accuracy(original(images)))
    assert acc["fused"] == pytest.approx(accuracy(predictor.fused_logits(images)))
    for i, spec in enumerate(m.submodels):
        direct = accuracy(predictor.fused_logits(images, missing=frozenset({i})))
        assert acc["fused_without"][spec.id] == pytest.approx(direct)
        assert acc["fused_without"][spec.id] != acc["fused"]
    assert acc["fused"] > 0.8


def test_ratios(report: dict[str, Any]) -> None:
    subs = report["submodels"].values()
    original, ratios = report["original"], report["ratios"]
    assert ratios["size"] == pytest.approx(original["params"] / max(s["params"] for s in subs))
    assert ratios["bytes"] == pytest.approx(original["bytes"] / max(s["bytes"] for s in subs))
    assert ratios["latency"] == pytest.approx(
        original["latency_ms"] / max(s["latency_ms"] for s in subs)
    )
    assert ratios["flops"] == pytest.approx(original["flops"] / max(s["flops"] for s in subs))
    assert ratios["sum_params_over_original"] == pytest.approx(
        sum(s["params"] for s in subs) / original["params"]
    )


def test_the_shipped_bundle_is_pruned_and_its_fusion_is_lighter(report: dict[str, Any]) -> None:
    """What `make demo` shows must be ED-ViT, not copies of the original (read from ONNX)."""
    ratios = report["ratios"]
    assert ratios["size"] >= 3.0
    assert ratios["sum_params_over_original"] <= 1.0
    assert ratios["fusion_params_over_largest_submodel"] < 1.0
    assert ratios["fusion_params_over_largest_submodel"] == pytest.approx(
        report["fusion"]["params"] / max(s["params"] for s in report["submodels"].values())
    )


def test_format_table_names_every_model(report: dict[str, Any]) -> None:
    table = evaluate.format_table(report)
    for name in ("original", "fusion", *report["submodels"]):
        assert f"| {name} |" in table
    assert "fused without sub0" in table
    assert "fusion params / largest sub-model params" in table
    assert "205,962" in table


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    points = [
        {"num_devices": n, "size_reduction": r, "fused_accuracy": a, "original_accuracy": 0.88}
        for n, r, a in ((2, 1.8, 0.87), (3, 2.7, 0.86), (5, 4.4, 0.83))
    ]
    path = tmp_path / "accuracy.png"
    evaluate.plot_accuracy_vs_size(points, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


# --- tiny hand-made graphs ------------------------------------------------------------------


def save(tmp_path: Path, nodes: list, inputs: list, output, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "tiny", inputs, [output], initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_matmul_flops(tmp_path: Path) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    path = save(tmp_path, [helper.make_node("MatMul", ["a", "b"], ["y"])], [a, b], y)
    assert evaluate.onnx_flops(path) == 24


@pytest.mark.parametrize("equation", ["ij,jk->ik", "ij,jk", "...j,jk->...k"])
def test_einsum_flops_with_symbolic_batch(tmp_path: Path, equation: str) -> None:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    path = save(tmp_path, [node], [a, b], y)
    assert evaluate.onnx_flops(path) == 24  # batch fixed to 1
    assert evaluate.onnx_flops(path, {"a": [5, 3]}) == 5 * 24


def test_params_ignore_scalars_and_integer_constants(tmp_path: Path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.ones(12).tolist())
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "half"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    path = save(tmp_path, nodes, [x], y, [weight, half, shape])
    assert evaluate.onnx_params(path) == 12
    assert evaluate.onnx_flops(path, (1, 3)) == 24
    assert measure_latency_ms(path, (1, 3), runs=3, warmup=1) > 0


def test_missing_onnx_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ConfigError, match=r"edvit\[build\]"):
        evaluate.onnx_params(tmp_path / "any.onnx")


# --- CLI ---------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_prints_writes_json_and_merges_report(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    test_set: tuple[np.ndarray, np.ndarray],
) -> None:
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, root)
    before = json.loads((root / "report.json").read_text())
    monkeypatch.setattr(evaluate, "_test_split", lambda bundle, data_dir: test_set)
    out = tmp_path / "eval.json"
    args = parse([str(root), "--runs", "3", "--json", str(out), "--write-report"])
    assert evaluate.run(args) == 0
    assert "| sub2 |" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["test_images"] == NUM_IMAGES
    after = json.loads((root / "report.json").read_text())
    assert after["evaluation"] == written
    assert {k: v for k, v in after.items() if k != "evaluation"} == before
    Bundle.load(root)  # report.json is not a verified file: the bundle stays valid


def test_run_on_a_non_bundle_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a bundle"):
        evaluate.run(parse([str(tmp_path)]))
