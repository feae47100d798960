"""The monolithic baseline of `edvit bench e2e`: a bundle whose one sub-model is the whole
original, so the fleet serves it on one node through the same broker and aggregator.

Made from the bundle's original.onnx with onnx alone (no torch): the sub-model is the
original with its logits renamed to the features nodes publish (dim = number of classes);
the fusion passes them through.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edvit.bundle import (
    FEATURES_OUTPUT,
    FUSION_FEATURES_INPUT,
    FUSION_PRESENT_INPUT,
    LOGITS_OUTPUT,
    MANIFEST_NAME,
    Bundle,
    Manifest,
    sha256_file,
)

MONOLITHIC_ID = "whole"


def _monolithic_models(original: Path, num_classes: int) -> tuple[bytes, bytes]:
    """The original as a sub-model (its logits renamed to the features nodes publish) and a
    fusion that passes them through (times `present`, so a missing block stays zeros)."""
    model = onnx.load(str(original))
    graph = model.graph
    (logits,) = [o for o in graph.output if o.name == LOGITS_OUTPUT]
    features = onnx.ValueInfoProto()
    features.CopyFrom(logits)
    features.name = FEATURES_OUTPUT
    graph.node.append(helper.make_node("Identity", [LOGITS_OUTPUT], [FEATURES_OUTPUT]))
    graph.output.remove(logits)
    graph.output.append(features)
    onnx.checker.check_model(model)

    fusion_graph = helper.make_graph(
        [helper.make_node("Mul", [FUSION_FEATURES_INPUT, FUSION_PRESENT_INPUT], [LOGITS_OUTPUT])],
        "identity-fusion",
        [
            helper.make_tensor_value_info(
                FUSION_FEATURES_INPUT, TensorProto.FLOAT, ["batch", num_classes]
            ),
            helper.make_tensor_value_info(FUSION_PRESENT_INPUT, TensorProto.FLOAT, ["batch", 1]),
        ],
        [helper.make_tensor_value_info(LOGITS_OUTPUT, TensorProto.FLOAT, ["batch", num_classes])],
    )
    # The original's opset and IR version: ones this ONNX Runtime is known to load.
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fusion = helper.make_model(fusion_graph, opset_imports=[helper.make_opsetid("", opset)])
    fusion.ir_version = model.ir_version
    onnx.checker.check_model(fusion)
    return model.SerializeToString(), fusion.SerializeToString()


def monolithic_bundle(bundle: Bundle, out: Path) -> Bundle:
    """A bundle in `out` whose one sub-model is the whole original (covering every class)
    and whose fusion is the identity: the original served by one node, through the fleet."""
    m = bundle.manifest
    submodel, fusion = _monolithic_models(bundle.path(m.original.file), m.num_classes)
    sub_file, fusion_file = f"submodels/{MONOLITHIC_ID}.onnx", "fusion.onnx"
    for relative in (m.original.file, sub_file, fusion_file):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.path(m.original.file), out / m.original.file)
    (out / sub_file).write_bytes(submodel)
    (out / fusion_file).write_bytes(fusion)
    all_classes = tuple(range(m.num_classes))
    manifest = Manifest.model_validate({
        **m.model_dump(exclude={"stem", "submodels", "fusion", "class_subsets", "files"}),
        "name": f"{m.name}-monolithic",
        "class_subsets": (all_classes,),
        "submodels": ({
            "id": MONOLITHIC_ID, "classes": all_classes, "file": sub_file,
            "feature_dim": m.num_classes, "params": m.original.params,
        },),
        # hidden_dim must be positive; the identity's "width" is the features it passes on.
        "fusion": {"file": fusion_file, "feature_dims": (m.num_classes,),
                   "hidden_dim": m.num_classes, "params": 0},
        "files": {r: sha256_file(out / r) for r in (m.original.file, sub_file, fusion_file)},
        "command": ("edvit", "bench", "e2e"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    (out / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    return Bundle.load(out)
