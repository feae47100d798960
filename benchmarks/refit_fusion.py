"""Retrain only the fusion MLP of a built bundle at other widths, on its sub-models' ONNX
features, and print the fused test accuracy: how much of a fused model's gap to the original
the fusion accounts for, and how much the sub-models' features (README "ED-ViT at N=10").

    python benchmarks/refit_fusion.py runs/ed_vit_n10/budget-9900 --hidden 12 24 64 256

The fusion trains as `edvit build` trains it (distilled from the original's logits, whole
sub-model blocks dropped at random, the dataset's fusion epochs unless --epochs), seeded
alike for every width. Nothing in the bundle is changed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edvit.bundle import Bundle  # noqa: E402
from edvit.inference import make_session  # noqa: E402
from edvit.models.build import (  # noqa: E402
    accuracy,
    default_settings,
    extract_features,
    load_data,
    model_inputs,
    train_config,
)
from edvit.models.train import Distillation, fit, set_threads  # noqa: E402
from edvit.models.vit import FusionMLP, count_params  # noqa: E402


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
    chunks = [
        session.run(None, {name: images[i : i + 1000]})[0] for i in range(0, len(images), 1000)
    ]
    return np.concatenate(chunks)


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
    train_features = torch.from_numpy(np.concatenate(train_parts, axis=1))
    dims = tuple(part.shape[1] for part in train_parts)
    classes = int(teacher.shape[1])
    labels = inputs.y_train
    print(f"{args.bundle}: {len(dims)} sub-models, features {sum(dims)} wide, {dataset}")
    print("| fusion hidden | fusion params | fused test accuracy |")
    print("|---:|---:|---:|")
    for hidden in args.hidden:
        config = train_config(settings, settings.fusion_epochs, settings.fusion_lr, 100)
        torch.manual_seed(config.seed)
        fusion = FusionMLP(dims, classes, hidden, drop_prob=settings.fusion_drop_prob)
        criterion = Distillation(tuple(range(classes)), settings.kd_alpha, settings.kd_temperature)
        present = torch.ones(len(train_features), len(dims))
        fit(fusion, fusion, [train_features, present], labels, config, None,
            criterion=criterion, targets=[teacher])  # fmt: skip
        with torch.no_grad():
            logits = fusion.eval()(
                torch.from_numpy(test_features), torch.ones(len(test_features), len(dims))
            ).numpy()
        fused = accuracy(logits, data.test.labels)
        print(f"| {hidden} | {count_params(fusion):,} | {100 * fused:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
