"""The layering of the tree, as a test (see README, "Architecture").

- `edvit/` is the wire contract and shared runtime: it imports no other folder; only
  `edvit/cli.py`, the composition root, wires the others together.
- Services (`broker/ edge_node/ aggregator/ camera_source/`) import the contract, never the
  operator's tools (`fleet/`) nor the training folder (`models/`).
- `fleet/` (the operator's wing) is torch-free: it never imports `models/`.
- torch, torchvision, timm, onnx and onnxscript are imported in `models/` only.

Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {
    "edvit": "edvit",
    "broker": "edvit.broker",
    "edge_node": "edvit.edge_node",
    "aggregator": "edvit.aggregator",
    "camera_source": "edvit.camera_source",
    "models": "edvit.models",
    "fleet": "edvit.fleet",
}
SERVICES = ("broker", "edge_node", "aggregator", "camera_source")
HEAVY = ("torch", "torchvision", "timm", "onnx", "onnxscript")


def imported_modules(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def folder_of(module: str) -> str | None:
    """The folder a module of this project lives in (None: not this project's)."""
    for folder, package in PACKAGES.items():
        if folder != "edvit" and (module == package or module.startswith(package + ".")):
            return folder
    return "edvit" if module == "edvit" or module.startswith("edvit.") else None


def violations(root: Path) -> list[str]:
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root)
            for module in sorted(imported_modules(path, package)):
                top = module.split(".")[0]
                target = folder_of(module)
                if top in HEAVY and folder != "models":
                    found.append(f"{relative} imports {module}: heavy imports live in models/")
                if folder == "edvit" and path.name != "cli.py" and target not in (None, "edvit"):
                    found.append(f"{relative} imports {module}: the contract imports no folder")
                if folder in SERVICES and target in ("fleet", "models"):
                    found.append(f"{relative} imports {module}: a service imports {target}/")
                if folder == "fleet" and target == "models":
                    found.append(f"{relative} imports {module}: fleet/ is torch-free")
    return found


def test_the_tree_keeps_its_layers() -> None:
    assert violations(ROOT) == []


def test_the_check_finds_each_kind_of_violation(tmp_path: Path) -> None:
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    (tmp_path / "edvit" / "topics.py").write_text("from edvit.fleet.ops.deploy import deploy\n")
    (tmp_path / "edvit" / "cli.py").write_text("from edvit.fleet import deploy\n")  # allowed
    (tmp_path / "edge_node" / "node.py").write_text("def f():\n    import edvit.models.vit\n")
    (tmp_path / "aggregator" / "service.py").write_text("from edvit.fleet import watch\n")
    (tmp_path / "fleet" / "plan.py").write_text("from edvit.models import evaluate\n")
    (tmp_path / "fleet" / "demo.py").write_text("import torch.nn\n")
    (tmp_path / "models" / "build.py").write_text("import torch\nfrom .vit import make\n")
    (tmp_path / "broker" / "local.py").write_text("from ..models import vit\n")
    (tmp_path / "camera_source" / "head.py").write_text("import onnxruntime\n")  # allowed
    found = violations(tmp_path)
    assert sorted({line.split(" imports ")[0] for line in found}) == [
        "aggregator/service.py",
        "broker/local.py",
        "edge_node/node.py",
        "edvit/topics.py",
        "fleet/demo.py",
        "fleet/plan.py",
    ], found
