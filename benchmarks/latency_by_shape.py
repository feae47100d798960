"""Latency and size cut of ED-ViT sub-model shapes on a preset, without training: how far
the parameter budget, the embedding width and the branches kept move the latency cut on the
`small` preset (where per-operator overhead dominates) and on `medium` (where compute does).

    python benchmarks/latency_by_shape.py --sizes small medium --json runs/latency_by_shape.json

Latency depends on the shapes, not on the weights, so each sub-model here is the preset's
random-initialised ViT pruned the way `edvit build` prunes (``branch_spec`` then
``select_units`` to the budget) with random importance scores. ONNX Runtime, batch 1, one
thread, median of --runs; the original is measured the same way. Accuracy needs a real
build (README, "ED-ViT").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from edvit.inference import measure_latency_ms
from edvit.models.build import branch_spec, feature_params
from edvit.models.export import export_image_model
from edvit.models.prune import (
    Importance,
    _mlp_width,
    _num_heads,
    prune_vit,
    select_units,
)
from edvit.models.train import set_threads
from edvit.models.vit import SubModel, count_params, make_vit

# (budget as a share of the original, embedding kept, branches kept): the N=10 default
# (0.95 / 10, half the embedding, two branches), then budgets for a 20x and a 34x size cut.
SHAPES = [(0.095, 0.5, 2), (0.0485, 0.5, 2), (0.029, 0.5, 2), (0.0485, 0.25, 2), (0.0485, 0.5, 1)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"])
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", help="also write the rows here")
    return parser.parse_args(argv)


def random_importance(vit: torch.nn.Module, generator: torch.Generator) -> Importance:
    return Importance(
        heads=[torch.rand(_num_heads(b), generator=generator) for b in vit.blocks],
        mlp=[torch.rand(_mlp_width(b), generator=generator) for b in vit.blocks],
        embed=torch.rand(int(vit.embed_dim), generator=generator),
        num_batches=1,
    )


def sub_model_shape(
    vit: torch.nn.Module, share: float, embed: float, branches: int, generator: torch.Generator
) -> torch.nn.Module:
    importance = random_importance(vit, generator)
    kept = prune_vit(vit, branch_spec(vit, importance.heads, importance.mlp, branches))
    importance = random_importance(kept, generator)
    budget = int(share * count_params(vit))
    return prune_vit(
        kept, select_units(importance, kept, param_budget=budget, embed_keep_ratio=embed)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = np.random.default_rng(0).random((4, 1, args.img_size, args.img_size), np.float32)
    shape = (1, 1, args.img_size, args.img_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            original = make_vit(size, args.img_size, 1, 10).eval()
            params = count_params(original)
            path = Path(tmp) / f"{size}.onnx"
            export_image_model(original, path, images, features=False)
            base = measure_latency_ms(path, shape, runs=args.runs, warmup=30)
            print(f"\n{size}: {params:,} params, {base:.3f} ms", flush=True)
            print("| budget | embed kept | branches | params | size cut | ms | latency cut |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for share, embed, branches in SHAPES:
                sub = sub_model_shape(original, share, embed, branches, generator)
                path = Path(tmp) / f"{size}-{share}-{embed}-{branches}.onnx"
                export_image_model(SubModel(sub), path, images, features=True)
                ms = measure_latency_ms(path, shape, runs=args.runs, warmup=30)
                sub_params = feature_params(sub)  # what is exported: no training head
                row = dict(
                    size=size, budget_share=share, embed_keep_ratio=embed, branches=branches,
                    original_params=params, original_ms=base, params=sub_params, ms=ms,
                    size_cut=params / sub_params, latency_cut=base / ms,
                )  # fmt: skip
                rows.append(row)
                print(
                    f"| {share} | {embed} | {branches} | {sub_params:,} | "
                    f"{row['size_cut']:.1f}x | {ms:.3f} | {row['latency_cut']:.1f}x |",
                    flush=True,
                )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
