"""The layering of the tree, as a test (see README, "Architecture").

- `edvit/` is the wire contract and shared runtime (placement included): it imports no other
  folder; only `edvit/cli.py`, the composition root, wires the others together.
- Services (`broker/ edge_node/ aggregator/ camera_source/`) import the contract, never the
  operator's tools (`fleet/`) nor the training folder (`models/`).
- `fleet/` (the operator's wing) is torch-free: it never imports `models/`; and `models/`
  never imports `fleet/`: what both need (placement) lives in `edvit/`.
- torch, torchvision, timm, onnx and onnxscript are imported in `models/` only.
- No module imports another's private (`_name`) names.
- No two modules import each other, directly or through others; nor do two of the fleet's
  rooms (`fleet/ops`, `fleet/bench`, `fleet/chaos`, ...).

Every import counts, including the ones inside functions and under TYPE_CHECKING.
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
COMPOSITION_ROOT = Path("edvit/cli.py")


def module_name(root: Path, path: Path) -> str:
    """The installed name of a .py file of the tree (a package's __init__.py: the package)."""
    folder, *rest = path.relative_to(root).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every name `path` (installed as `module`) imports: modules, and module.name for each
    name a `from` import takes."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
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


def project_imports(root: Path) -> dict[Path, tuple[str, set[str]]]:
    """Each .py file of the tree: its module name and every name it imports."""
    found = {}
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_name(root, path)
            found[path.relative_to(root)] = (module, imported_modules(path, module))
    return found


def violations(root: Path) -> list[str]:
    files = project_imports(root)
    modules = {module for module, _ in files.values()}
    found = []
    for relative, (own, imported) in files.items():
        folder = relative.parts[0]
        for module in sorted(imported):
            top = module.split(".")[0]
            target = folder_of(module)
            owner, _, name = module.rpartition(".")
            private = name.startswith("_") and not name.startswith("__")
            if top in HEAVY and folder != "models":
                found.append(f"{relative} imports {module}: heavy imports live in models/")
            if folder == "edvit" and relative != COMPOSITION_ROOT and target not in (None, "edvit"):
                found.append(f"{relative} imports {module}: the contract imports no folder")
            if folder in SERVICES and target in ("fleet", "models"):
                found.append(f"{relative} imports {module}: a service imports {target}/")
            if folder == "fleet" and target == "models":
                found.append(f"{relative} imports {module}: fleet/ is torch-free")
            if folder == "models" and target == "fleet":
                found.append(f"{relative} imports {module}: models/ does not import fleet/")
            if private and owner in modules and owner != own:
                found.append(f"{relative} imports {module}: a private name of another module")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of nodes that reach each other (strongly connected, more than one node)."""
    found, order, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Modules that import each other, directly or not, and fleet rooms that do."""
    files = project_imports(root)
    modules = {module for module, _ in files.values()}
    graph = {own: {m for m in imported if m in modules} - {own} for own, imported in files.values()}
    rooms: dict[str, set[str]] = {}
    for own, imported in graph.items():
        if own.startswith("edvit.fleet."):
            room = own.split(".")[2]
            rooms.setdefault(room, set()).update(
                m.split(".")[2] for m in imported if m.startswith("edvit.fleet.")
            )
    room_graph = {f"fleet/{room}": {f"fleet/{o}" for o in others - {room}}
                  for room, others in rooms.items()}  # fmt: skip
    return cycles(graph) + cycles(room_graph)


def test_the_tree_keeps_its_layers() -> None:
    assert violations(ROOT) == []


def test_no_modules_import_each_other() -> None:
    assert import_cycles(ROOT) == []


def test_the_check_finds_each_kind_of_violation(tmp_path: Path) -> None:
    for folder in PACKAGES:
        (tmp_path / folder).mkdir()
    for room in ("ops", "chaos", "bench"):
        (tmp_path / "fleet" / room).mkdir()
    (tmp_path / "edvit" / "placement").mkdir()
    files = {
        "edvit/topics.py": "from edvit.fleet.ops.deploy import deploy\n",
        "edvit/cli.py": "from edvit.fleet.ops import deploy\n",  # allowed: composition root
        "edvit/placement/plan.py": "from edvit.models import build\n",
        "edge_node/node.py": "def f():\n    import edvit.models.vit\n",
        "aggregator/service.py": "from edvit.fleet.ops import watch\n",
        "aggregator/planner.py": "from edvit.placement.assignment import assign\n",  # allowed
        "fleet/ops/plan.py": "from edvit.models import evaluate\n",
        "fleet/ops/demo.py": "import torch.nn\n",
        "fleet/bench/common.py": "def percentile(values, q):\n    return 0\n",
        "fleet/bench/batching.py": "from .common import percentile\n",  # allowed
        "fleet/bench/scale.py": "from edvit.fleet.bench.batching import _generate\n",
        "models/build.py": "import torch\nfrom .vit import make\nfrom edvit import __version__\n",
        "models/cli.py": "from edvit.fleet.ops.deploy import deploy\n",
        "broker/local.py": "from ..models import vit\n",
        "camera_source/head.py": "import onnxruntime\n",  # allowed
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    found = violations(tmp_path)
    assert sorted({line.split(" imports ")[0] for line in found}) == [
        "aggregator/service.py",
        "broker/local.py",
        "edge_node/node.py",
        "edvit/placement/plan.py",
        "edvit/topics.py",
        "fleet/bench/scale.py",
        "fleet/ops/demo.py",
        "fleet/ops/plan.py",
        "models/cli.py",
    ], found
    assert import_cycles(tmp_path) == []

    (tmp_path / "fleet/chaos/scenarios.py").write_text("def run():\n    from .fuzz import f\n")
    (tmp_path / "fleet/chaos/fuzz.py").write_text("from edvit.fleet.chaos.scenarios import X\n")
    (tmp_path / "fleet/ops/local.py").write_text("from edvit.fleet.bench import common\n")
    (tmp_path / "fleet/bench/e2e.py").write_text("from edvit.fleet.ops.local import LocalFleet\n")
    assert import_cycles(tmp_path) == [
        ["edvit.fleet.chaos.fuzz", "edvit.fleet.chaos.scenarios"],
        ["fleet/bench", "fleet/ops"],
    ]
