"""The `edvit build` subcommand. Imports no torch until it runs, so that the CLI can build its
parser on machines without the [build] extra."""

from __future__ import annotations

import argparse
import importlib.util

from edvit.errors import ConfigError

DATASETS = ("fashion-mnist", "digits")
SIZES = ("test", "small")  # keep in step with edvit.models.vit.SIZES (checked by the tests)
_BUILD_MODULES = ("torch", "timm", "onnx", "onnxscript", "tqdm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="dataset to train on")
    parser.add_argument("--data-dir", help="folder of the dataset's IDX files (Fashion-MNIST)")
    parser.add_argument(
        "--num-devices", type=int, default=3, help="number of sub-models (class subsets)"
    )
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument(
        "--size", choices=SIZES, help="ViT size preset (default: small, test for digits)"
    )
    parser.add_argument("--epochs", type=int, help="epochs for the original ViT")
    parser.add_argument("--sub-epochs", type=int, help="fine-tuning epochs per sub-model")
    parser.add_argument("--fusion-epochs", type=int, help="epochs for the fusion MLP")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")


def command_line(args: argparse.Namespace) -> tuple[str, ...]:
    """The `edvit build` argv equivalent to ``args`` (what the manifest records)."""
    argv = ["edvit", "build", "--dataset", args.dataset]
    options = (
        ("--data-dir", "data_dir"),
        ("--num-devices", "num_devices"),
        ("--out", "out"),
        ("--size", "size"),
        ("--epochs", "epochs"),
        ("--sub-epochs", "sub_epochs"),
        ("--fusion-epochs", "fusion_epochs"),
        ("--batch-size", "batch_size"),
        ("--seed", "seed"),
        ("--threads", "threads"),
    )
    for flag, name in options:
        value = getattr(args, name, None)
        if value is not None:
            argv += [flag, str(value)]
    if getattr(args, "force", False):
        argv.append("--force")
    return tuple(argv)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in _BUILD_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"edvit build needs {', '.join(missing)}: pip install 'edvit[build]'")
    if args.num_devices is None or args.num_devices < 1:
        raise ConfigError(f"--num-devices must be at least 1, got {args.num_devices}")
    from edvit.models.build import build_bundle, default_settings

    settings = default_settings(
        args.dataset,
        num_devices=args.num_devices,
        size=args.size,
        epochs=args.epochs,
        sub_epochs=args.sub_epochs,
        fusion_epochs=args.fusion_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        data_dir=args.data_dir,
        command=command_line(args),
    )
    build_bundle(settings, args.out, force=args.force)
    return 0
