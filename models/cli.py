"""The `edvit build` subcommand. Imports no torch until it runs, so that the CLI can build its
parser on machines without the [build] extra."""

from __future__ import annotations

import argparse
import importlib.util

from edvit.errors import ConfigError

DATASETS = ("fashion-mnist", "digits", "cifar10", "imagefolder")
DEFAULT_NUM_DEVICES = 3
# Keep in step with edvit.models.vit.SIZES (checked by the tests).
SIZES = ("test", "small", "medium")
_BUILD_MODULES = ("torch", "timm", "onnx", "onnxscript", "tqdm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="dataset to train on")
    parser.add_argument(
        "--data-dir", help="dataset folder (Fashion-MNIST IDX files, cifar10, imagefolder root)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--num-devices",
        type=int,
        help=f"N identical devices, one sub-model each (default {DEFAULT_NUM_DEVICES})",
    )
    where.add_argument(
        "--devices", help="device inventory (YAML/JSON: id, memory_mb, speed); N = its devices"
    )
    parser.add_argument(
        "--checkpoint", help="timm ViT state_dict (torch.save) to use as the original, untrained"
    )
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument(
        "--size", choices=SIZES, help="ViT size preset (default: small, test for digits)"
    )
    parser.add_argument("--epochs", type=int, help="epochs for the original ViT")
    parser.add_argument("--sub-epochs", type=int, help="fine-tuning epochs per sub-model")
    parser.add_argument("--fusion-epochs", type=int, help="epochs for the fusion MLP")
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument(
        "--param-budget", type=int, help="parameters per sub-model (default 0.95 * original / N)"
    )
    parser.add_argument(
        "--embed-keep-ratio", type=float, help="embedding width kept (default by N)"
    )
    parser.add_argument(
        "--keep-branches", type=int, help="attention/MLP branches kept (default by N)"
    )
    parser.add_argument("--prune-steps", type=int, help="iterative pruning steps (default 2)")
    parser.add_argument(
        "--recover-epochs", type=int, help="fine-tuning epochs after each pruning step"
    )
    parser.add_argument(
        "--fusion-drop-prob",
        type=float,
        help="chance to drop each sub-model block while training the fusion (default 0.25)",
    )
    parser.add_argument(
        "--shared-blocks",
        type=int,
        metavar="K",
        help="keep the patch embedding and the first K blocks unpruned and identical in every "
        "sub-model, and export them as slices for cameras and nodes (default 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")


def command_line(args: argparse.Namespace) -> tuple[str, ...]:
    """The `edvit build` argv equivalent to ``args`` (what the manifest records)."""
    argv = ["edvit", "build", "--dataset", args.dataset]
    if getattr(args, "devices", None) is None:
        argv += ["--num-devices", str(resolved_num_devices(args))]
    options = (
        ("--data-dir", "data_dir"),
        ("--devices", "devices"),
        ("--checkpoint", "checkpoint"),
        ("--out", "out"),
        ("--size", "size"),
        ("--epochs", "epochs"),
        ("--sub-epochs", "sub_epochs"),
        ("--fusion-epochs", "fusion_epochs"),
        ("--batch-size", "batch_size"),
        ("--param-budget", "param_budget"),
        ("--embed-keep-ratio", "embed_keep_ratio"),
        ("--keep-branches", "keep_branches"),
        ("--prune-steps", "prune_steps"),
        ("--recover-epochs", "recover_epochs"),
        ("--fusion-drop-prob", "fusion_drop_prob"),
        ("--shared-blocks", "shared_blocks"),
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


def resolved_num_devices(args: argparse.Namespace) -> int:
    value = getattr(args, "num_devices", None)
    return DEFAULT_NUM_DEVICES if value is None else int(value)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in _BUILD_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"edvit build needs {', '.join(missing)}: pip install 'edvit[build]'")
    num_devices = resolved_num_devices(args)
    if num_devices < 1:
        raise ConfigError(f"--num-devices must be at least 1, got {num_devices}")
    from edvit.models.build import build_bundle, default_settings

    settings = default_settings(
        args.dataset,
        num_devices=num_devices,
        devices_file=getattr(args, "devices", None),
        checkpoint=getattr(args, "checkpoint", None),
        param_budget=getattr(args, "param_budget", None),
        embed_keep_ratio=getattr(args, "embed_keep_ratio", None),
        keep_branches=getattr(args, "keep_branches", None),
        prune_steps=getattr(args, "prune_steps", None),
        recover_epochs=getattr(args, "recover_epochs", None),
        fusion_drop_prob=getattr(args, "fusion_drop_prob", None),
        shared_blocks=getattr(args, "shared_blocks", None),
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
