"""Accuracy at real scale: a timm ViT trained from scratch at 224x224, split N = 3 and 10 ways
(docs/benchmarks/real-scale.md, "Accuracy").

    python benchmarks/real_scale_gpu.py            # one GPU
    python benchmarks/real_scale_gpu.py --smoke    # a few steps on the CPU, to check it runs

1. ``deit_tiny_patch16_224`` with random weights (never downloaded) is trained on a
   Fashion-MNIST subset resized to 224x224 and 3 channels, as the bundle's preprocessing
   gives a gray image to an RGB model (the build's own ``model_preprocessing``,
   ``dataset_to_model_input`` and ``fit``).
2. Its weights are the checkpoint of two builds, `edvit build --model deit_tiny_patch16_224
   --checkpoint ...` for N = 3 and N = 10 (``build_bundle``), on the same subset.
3. Each build evaluates its bundle (``evaluate_bundle``, in the build's report): original
   and fused accuracy on the test subset, the size cut (original parameters over the
   largest sub-model's) and the latency cut (ONNX Runtime, batch 1, one thread, on the
   machine's CPU).

Writes real_scale_gpu.json and real_scale_gpu.md to --out-dir. The subset is the first
images of each split (Fashion-MNIST's files are shuffled), written as IDX files that the
build reads with --data-dir. ``--smoke``: 64 training and 64 test images at 32x32 pixels
(the input size is read from the checkpoint), one epoch, a few distillation steps and N = 3
only, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edvit.datasets import Dataset, load_dataset
from edvit.models.build import build_bundle
from edvit.models.build_data import model_preprocessing
from edvit.models.build_settings import BuildSettings, default_settings, train_config
from edvit.models.train import fit, resolve_device, set_threads
from edvit.models.vit import count_params, untrained_timm_model
from edvit.preprocess import dataset_to_model_input

MODEL = "deit_tiny_patch16_224"
DEVICE_COUNTS = (3, 10)
SMOKE_DEVICE_COUNTS = (3,)
REPO = Path(__file__).resolve().parent.parent
FULL = dict(train_images=20_000, test_images=2_000, img_size=224, epochs=10, batch_size=128,
            sub_steps=600, fusion_epochs=5, recover_steps=100, prune_steps=2,
            latency_runs=50, lr=1e-3)  # fmt: skip
SMOKE = dict(train_images=64, test_images=64, img_size=32, epochs=1, batch_size=16,
             sub_steps=2, fusion_epochs=1, recover_steps=1, prune_steps=1,
             latency_runs=3, lr=1e-3)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on the CPU")
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results (smoke: a tmp)")
    parser.add_argument("--data-dir", help="the Fashion-MNIST IDX files (default: the usual)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (smoke: cpu)")
    parser.add_argument(
        "--num-devices", type=int, nargs="+",
        help=f"the builds' N (default {' '.join(map(str, DEVICE_COUNTS))}; smoke "
        f"{' '.join(map(str, SMOKE_DEVICE_COUNTS))})",
    )  # fmt: skip
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value),
                            help=f"default {value} (smoke {SMOKE[key]})")  # fmt: skip
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_devices is None:
        args.num_devices = list(SMOKE_DEVICE_COUNTS if args.smoke else DEVICE_COUNTS)
    if args.smoke and args.device == "auto":
        args.device = "cpu"
    return args


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, as Fashion-MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_subset(data_dir: str | None, out: Path, train: int, test: int) -> Path:
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        dataset = load_dataset("fashion-mnist", split, data_dir)
        write_idx(out / f"{prefix}-images-idx3-ubyte", dataset.images[:count])
        write_idx(out / f"{prefix}-labels-idx1-ubyte", dataset.labels[:count])
    return out


def settings_for(args: argparse.Namespace, num_devices: int, subset: Path,
                 checkpoint: Path | None) -> BuildSettings:  # fmt: skip
    return default_settings(
        "fashion-mnist", num_devices=num_devices, model=MODEL,
        checkpoint=str(checkpoint) if checkpoint else None, data_dir=str(subset),
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, sub_steps=args.sub_steps,
        fusion_epochs=args.fusion_epochs, recover_steps=args.recover_steps,
        prune_steps=args.prune_steps, latency_runs=args.latency_runs,
        device=resolve_device(args.device),
    )  # fmt: skip


def train_original(args: argparse.Namespace, subset: Path, checkpoint: Path) -> dict[str, Any]:
    """The timm model from scratch on the subset; its state_dict saved to ``checkpoint``."""
    settings = settings_for(args, args.num_devices[0], subset, None)
    torch.manual_seed(settings.seed)
    model = untrained_timm_model(MODEL, num_classes=10, img_size=args.img_size)
    train: Dataset = load_dataset("fashion-mnist", "train", subset)
    pp = model_preprocessing(model, train)
    x = torch.from_numpy(dataset_to_model_input(train.images, pp))
    y = torch.from_numpy(train.labels)
    started = time.time()
    config = train_config(settings, args.epochs, args.lr, 0, augment=True)
    losses = fit(model.vit, model.vit, [x], y, config, "original")
    seconds = time.time() - started
    torch.save(model.vit.cpu().state_dict(), checkpoint)
    return {"params": count_params(model.vit), "epochs": args.epochs, "seconds": round(seconds, 1),
            "losses": [round(v, 4) for v in losses], "device": settings.device}  # fmt: skip


def row(num_devices: int, figures: dict[str, Any], seconds: float) -> dict[str, Any]:
    accuracy = figures["accuracy"]
    return {
        "N": num_devices,
        "original_accuracy": round(accuracy["original"], 4),
        "fused_accuracy": round(accuracy["fused"], 4),
        "size_cut": round(figures["ratios"]["size"], 2),
        "latency_cut": round(figures["ratios"]["latency"], 2),
        "original_latency_ms": round(figures["original"]["latency_ms"], 3),
        "slowest_submodel_ms": round(
            max(s["latency_ms"] for s in figures["submodels"].values()), 3
        ),
        "build_seconds": round(seconds, 1),
        "build_phases_seconds": {
            k: round(v, 1) for k, v in figures.get("timings_seconds", {}).items()
        },
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}, {report['img_size']}x{report['img_size']} RGB, trained from scratch "
        f"on {report['train_images']} Fashion-MNIST images ({report['original']['epochs']} "
        f"epochs on {report['original']['device']}, {report['original']['seconds']} s); "
        f"tested on {report['test_images']}.",
        "",
        "| N | original acc | fused acc | size cut | latency cut | original ms | slowest "
        "sub-model ms | build s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["builds"]:
        lines.append(
            f"| {r['N']} | {r['original_accuracy']:.4f} | {r['fused_accuracy']:.4f} | "
            f"{r['size_cut']:g}x | {r['latency_cut']:g}x | {r['original_latency_ms']:g} | "
            f"{r['slowest_submodel_ms']:g} | {r['build_seconds']:g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(None)
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="real-scale-smoke-")) if args.smoke
        else REPO / "benchmarks" / "results"
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="real-scale-gpu-") as tmp:
        work = Path(tmp)
        subset = write_subset(args.data_dir, work, args.train_images, args.test_images)
        checkpoint = work / "original.pt"
        original = train_original(args, subset, checkpoint)
        builds = []
        for n in args.num_devices:
            started = time.time()
            bundle_dir = work / f"n{n}"
            figures = build_bundle(
                settings_for(args, n, subset, checkpoint), bundle_dir, force=True
            )
            builds.append(row(n, figures, time.time() - started))
    report = {
        "model": MODEL, "img_size": args.img_size, "smoke": args.smoke,
        "train_images": args.train_images, "test_images": args.test_images,
        "original": original, "builds": builds,
        "settings": {k: getattr(args, k) for k in FULL},
    }  # fmt: skip
    (out_dir / "real_scale_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "real_scale_gpu.md").write_text(markdown(report))
    print(markdown(report), end="")
    print(f"wrote {out_dir / 'real_scale_gpu.json'} and {out_dir / 'real_scale_gpu.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
