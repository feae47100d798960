"""Retrain only the fusion MLP of a built bundle at other widths, on its sub-models' ONNX
features, and print the fused test accuracy: how much of a fused model's gap to the original
the fusion accounts for, and how much the sub-models' features (README "ED-ViT at N=10").

    python benchmarks/refit_fusion.py runs/ed_vit_n10/budget-9900 --hidden 12 24 64 256

The fusion trains through the build's own `fit_fusion` (distilled from the original's
logits, whole sub-model blocks dropped at random, the dataset's fusion epochs unless
--epochs), seeded alike for every width. Nothing in the bundle is changed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from edvit.bundle import Bundle
from edvit.inference import make_session
from edvit.models.build import (
    accuracy,
    batched,
    default_settings,
    extract_features,
    fit_fusion,
    load_data,
    model_inputs,
)
from edvit.models.train import set_threads
from edvit.models.vit import count_params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--hidden", type=int, nargs="+", default=[12, 24, 64, 256])
    parser.add_argument("--epochs", type=int, help="default: the dataset's fusion epochs")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def original_logits(bundle: Bundle, images: np.ndarray, threads: int) -> np.ndarray:
    session = make_session(bundle.path("original.onnx"), threads)
    name = session.get_inputs()[0].name
    return batched(lambda chunk: session.run(None, {name: chunk})[0], images)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    dataset = bundle.manifest.dataset
    settings = default_settings(dataset, num_devices=len(bundle.manifest.submodels), device="cpu")
    if args.epochs:
        settings = replace(settings, fusion_epochs=args.epochs)
    data = load_data(settings)
    inputs = model_inputs(data)
    x_train = inputs.x_train.numpy()
    teacher = torch.from_numpy(original_logits(bundle, x_train, args.threads))
    train_parts = extract_features(bundle, x_train, args.threads)
    test_features = np.concatenate(extract_features(bundle, inputs.x_test, args.threads), axis=1)
    train_features = np.concatenate(train_parts, axis=1)
    dims = tuple(part.shape[1] for part in train_parts)
    print(f"{args.bundle}: {len(dims)} sub-models, features {sum(dims)} wide, {dataset}")
    print("| fusion hidden | fusion params | fused test accuracy |")
    print("|---:|---:|---:|")
    for hidden in args.hidden:
        fusion = fit_fusion(settings, train_features, dims, hidden, inputs.y_train, teacher)
        with torch.no_grad():
            logits = fusion(
                torch.from_numpy(test_features), torch.ones(len(test_features), len(dims))
            ).numpy()
        fused = accuracy(logits, data.test.labels)
        print(f"| {hidden} | {count_params(fusion):,} | {100 * fused:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
