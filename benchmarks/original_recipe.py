"""Train only the original ViT with one recipe and print its test accuracy: the evidence
behind each dataset's default recipe for the original (README "ED-ViT: class-wise pruning at
the defaults").

    python benchmarks/original_recipe.py --dataset fashion-mnist --out runs/fm-small.pt

Unset recipe flags take the dataset's `edvit build` defaults, so a bare run measures exactly
what `edvit build` trains; the saved state_dict is a valid `edvit build --checkpoint`.
Prints one JSON line (and writes it to --json): accuracy, seconds, seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edvit.models.build import (
    default_settings,
    load_data,
    log,
    model_inputs,
    train_original,
)
from edvit.models.cli import yes_no
from edvit.models.train import predict, resolve_device, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir")
    parser.add_argument("--size")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--augment-shift", type=int)
    parser.add_argument("--augment-flip", type=yes_no, metavar="yes|no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", required=True, help="state_dict file to write")
    parser.add_argument("--json", help="also write the result line here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = default_settings(
        args.dataset,
        data_dir=args.data_dir,
        size=args.size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        label_smoothing=args.label_smoothing,
        augment_shift=args.augment_shift,
        augment_flip=args.augment_flip,
        seed=args.seed,
        device=resolve_device(args.device),
        threads=args.threads,
    )
    set_threads(settings.threads)
    data = load_data(settings)
    inputs = model_inputs(data)
    torch.manual_seed(settings.seed)
    started = time.time()
    vit = train_original(settings, data, inputs)
    seconds = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), out)
    logits = predict(vit, torch.from_numpy(inputs.x_test), device=settings.device)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == data.test.labels))
    result = {
        "dataset": settings.dataset,
        "size": settings.size,
        "epochs": settings.epochs,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "label_smoothing": settings.label_smoothing,
        "augment_shift": settings.augment_shift,
        "augment_flip": settings.augment_flip,
        "device": settings.device,
        "test_accuracy": round(accuracy, 4),
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / settings.epochs, 2),
        "checkpoint": str(out),
    }
    line = json.dumps(result)
    log(f"original recipe: {line}")
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
