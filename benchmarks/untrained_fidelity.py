"""How close the sub-models of `edvit build --untrained` come to a trained build's: shapes and
ONNX Runtime latency at the same budget (docs/benchmarks/real-scale.md).

    python benchmarks/untrained_fidelity.py

Three ways to prune the `small` preset (Fashion-MNIST, 28x28) with the build's own code
(``build_submodels.prune_submodels``, no training step), at N=3 (default budget) and N=10
(a 9,900-parameter budget, as README "ED-ViT at N=10"):

- trained: the shipped converged original (benchmarks/checkpoints/fashion-mnist-small.pt)
  scored on 1,024 of its training images: the shapes a trained build starts its recovery
  fine-tuning from (fine-tuning changes weights, not shapes);
- untrained: random weights scored on the synthetic batch, as `--untrained` does;
- raw: random weights and the synthetic batch, without ``balance_kinds`` and the branch
  halves (what the scores of random weights do taken as they are).

Each sub-model is exported; latencies are medians of --runs at batch 1 on one thread, the
files measured in turn --rounds times and the median of those kept. Writes
benchmarks/results/untrained_fidelity.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edvit.inference import measure_latency_ms
from edvit.models.build_data import load_data, load_original_checkpoint
from edvit.models.build_settings import default_settings
from edvit.models.build_submodels import prune_submodels, subset_data
from edvit.models.build_untrained import (
    SCORE_IMAGES,
    pruned_summary,
    synthetic_images,
    synthetic_subset,
)
from edvit.models.export import export_image_model
from edvit.models.train import predict, set_threads
from edvit.models.vit import SubModel, count_params, make_vit
from edvit.preprocess import dataset_to_model_input

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-small.pt"
SCORING_IMAGES = 1024  # what one importance estimate of the trained build reads at most
CASES = {"N=3, default budget": (3, None), "N=10, budget 9,900": (10, 9900)}
WAYS = ("trained", "untrained", "raw")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the scoring")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def pruned(way: str, num_devices: int, budget: int | None, threads: int) -> tuple[Any, list]:
    """(the original, its sub-models) pruned ``way``."""
    settings = default_settings(
        "fashion-mnist", num_devices=num_devices, checkpoint=str(CHECKPOINT), sub_epochs=0,
        recover_epochs=0, param_budget=budget, threads=threads,
    )  # fmt: skip
    data = load_data(settings)
    if way == "trained":
        original = load_original_checkpoint(settings, data)
        images = data.train.images[:SCORING_IMAGES]
        x = torch.from_numpy(dataset_to_model_input(images, data.preprocessing))
        labels = data.train.labels[:SCORING_IMAGES]
        teacher = torch.from_numpy(predict(original, x))
        rng = np.random.default_rng(0)
        training = [subset_data(s, x, labels, teacher, rng) for s in data.subsets]
    else:
        torch.manual_seed(settings.seed)
        original = make_vit("small", 28, 1, 10).eval()
        images = synthetic_images(SCORE_IMAGES, data.preprocessing, settings.seed)
        training = [synthetic_subset(s, 10, images) for s in data.subsets]
        settings = replace(settings, untrained=way == "untrained")
    subs = prune_submodels(settings, original, count_params(original), training, threads)
    return original, subs.vits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    sample = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[tuple[str, str], list[Path]] = {}
        for case, (n, budget) in CASES.items():
            for way in WAYS:
                set_threads(args.threads)
                original, vits = pruned(way, n, budget, args.threads)
                shapes = [pruned_summary(original, v) for v in vits]
                paths = []
                for i, vit in enumerate(vits):
                    path = Path(tmp) / f"{n}-{way}-{i}.onnx"
                    export_image_model(SubModel(vit), path, sample, features=True)
                    paths.append(path)
                files[(case, way)] = paths
                rows.append(
                    {
                        "case": case,
                        "way": way,
                        **{
                            key: [s[key][0] for s in shapes]
                            for key in ("embed", "attention_branches", "mlp_branches", "heads")
                        },
                        "mlp_neurons": [s["mlp_neurons"][0] for s in shapes],
                        "params": [s["params"][0] for s in shapes],
                    }
                )
                print(rows[-1], flush=True)
        set_threads(1)
        latencies: dict[Path, list[float]] = {p: [] for ps in files.values() for p in ps}
        for _ in range(args.rounds):
            for path in latencies:
                ms = measure_latency_ms(path, (1, 1, 28, 28), runs=args.runs, warmup=30)
                latencies[path].append(ms)
        for row in rows:
            per_file = [statistics.median(latencies[p]) for p in files[(row["case"], row["way"])]]
            row["latency_ms"] = [round(ms, 4) for ms in per_file]
            row["slowest_ms"] = round(max(per_file), 4)
    out = Path(args.results)
    (out / "untrained_fidelity.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (out / "untrained_fidelity.md").write_text(markdown(rows, args) + "\n")
    print(markdown(rows, args))
    return 0


def spread(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Untrained against trained sub-model shapes (`small` preset, Fashion-MNIST)",
        "",
        f"Command: `python benchmarks/untrained_fidelity.py --runs {args.runs} "
        f"--rounds {args.rounds}`. Ranges over the sub-models; latency: ONNX Runtime, batch 1, "
        "one thread, the slowest sub-model.",
        "",
        "| case | pruned as | embed | attention / MLP branches | heads | MLP neurons | params "
        "| slowest ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['way']} | {spread(row['embed'])} "
            f"| {spread(row['attention_branches'])} / {spread(row['mlp_branches'])} "
            f"| {spread(row['heads'])} | {spread(row['mlp_neurons'])} "
            f"| {spread(row['params'])} | {row['slowest_ms']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
