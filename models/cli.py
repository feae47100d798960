"""The `edvit build` subcommand. Imports no torch until it runs, so that the CLI can build its
parser on machines without the [build] extra."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edvit.errors import ConfigError

DATASETS = ("fashion-mnist", "digits", "cifar10", "imagefolder")
DEFAULT_NUM_DEVICES = 3
# Keep in step with edvit.models.vit.SIZES (checked by the tests).
SIZES = ("test", "small", "medium")
_BUILD_MODULES = ("torch", "timm", "onnx", "onnxscript", "tqdm")


def yes_no(value: str) -> bool:
    if value.lower() in ("yes", "true", "1", "on"):
        return True
    if value.lower() in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


@dataclass(frozen=True)
class Option:
    """One `edvit build` option: how argparse reads it and the BuildSettings field it sets."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = None  # None: the string as given
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default: Any = None
    required: bool = False
    switch: bool = False  # a flag without a value (store_true)
    exclusive: bool = False  # in the --num-devices | --devices group
    setting: str | None = None  # the default_settings keyword it is passed as, if any

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        if self.switch:
            return {"action": "store_true", "help": self.help}
        return {
            "type": self.type,
            "choices": self.choices,
            "metavar": self.metavar,
            "default": self.default,
            "required": self.required,
            "help": self.help,
        }


# In --help order, which is also the order of the recorded command line (after --dataset and
# --num-devices, which command_line records first).
OPTIONS: tuple[Option, ...] = (
    Option(
        "--dataset",
        "dataset to train on (with --untrained: whose class names to use; its images are not read)",
        choices=DATASETS,
    ),
    Option(
        "--classes",
        "with --untrained, instead of --dataset: the class names, comma-separated",
        metavar="A,B,...",
        setting="classes",
    ),
    Option(
        "--data-dir",
        "dataset folder (Fashion-MNIST IDX files, cifar10, imagefolder root)",
        setting="data_dir",
    ),
    Option(
        "--num-devices",
        f"N identical devices, one sub-model each (default {DEFAULT_NUM_DEVICES})",
        type=int,
        exclusive=True,
    ),
    Option(
        "--devices",
        "device inventory (YAML/JSON: id, memory_mb, speed); N = its devices",
        exclusive=True,
        setting="devices_file",
    ),
    Option(
        "--checkpoint",
        "timm ViT state_dict (torch.save) to use as the original, untrained: of a --size "
        "preset, or of --model",
        setting="checkpoint",
    ),
    Option(
        "--model",
        "your own timm ViT: the registered name (e.g. deit_tiny_patch16_224) the --checkpoint "
        "was fine-tuned from; its input size, patch size, channels and classes are read from "
        "the checkpoint, images are resized and normalised as the model expects (needs "
        "--checkpoint; excludes --size; nothing is downloaded)",
        metavar="TIMM_NAME",
        setting="model",
    ),
    Option(
        "--untrained",
        "with --model: random weights, no training, no images read; prunes to the budget for "
        "N, exports and measures, for capacity planning (sizes and frame rates, no accuracy); "
        "the bundle says it is untrained",
        switch=True,
        setting="untrained",
    ),
    Option(
        "--img-size",
        "with --untrained: the input side in pixels (default: the model's, e.g. 224)",
        type=int,
        metavar="PIXELS",
        setting="img_size",
    ),
    Option("--out", "bundle folder to write", required=True),
    Option(
        "--size",
        "ViT size preset (default: small)",
        choices=SIZES,
        setting="size",
    ),
    Option("--epochs", "epochs for the original ViT", type=int, setting="epochs"),
    Option(
        "--sub-steps",
        "distillation steps per sub-model, turned into epochs by its data size (default "
        "3000 up to 3 devices, 1200 per device beyond)",
        type=int,
        setting="sub_steps",
    ),
    Option(
        "--sub-epochs",
        "fine-tuning epochs per sub-model (overrides --sub-steps)",
        type=int,
        setting="sub_epochs",
    ),
    Option("--fusion-epochs", "epochs for the fusion MLP", type=int, setting="fusion_epochs"),
    Option(
        "--fusion-hidden",
        "fusion MLP hidden width (default: the widest that keeps it at most half the largest "
        "sub-model)",
        type=int,
        setting="fusion_hidden",
    ),
    Option("--batch-size", "training batch size", type=int, setting="batch_size"),
    Option(
        "--augment-shift",
        "original's training: random shifts of up to this many pixels (default by dataset)",
        type=int,
        metavar="PIXELS",
        setting="augment_shift",
    ),
    Option(
        "--augment-flip",
        "original's training: random horizontal flips (default by dataset)",
        type=yes_no,
        metavar="yes|no",
        setting="augment_flip",
    ),
    Option(
        "--param-budget",
        "parameters per sub-model (default 0.95 * original / N)",
        type=int,
        setting="param_budget",
    ),
    Option(
        "--embed-keep-ratio",
        "embedding width kept (default by N)",
        type=float,
        setting="embed_keep_ratio",
    ),
    Option(
        "--keep-branches",
        "attention/MLP branches kept (default by N)",
        type=int,
        setting="keep_branches",
    ),
    Option("--prune-steps", "iterative pruning steps (default 2)", type=int, setting="prune_steps"),
    Option(
        "--recover-epochs",
        "fine-tuning epochs after each pruning step",
        type=int,
        setting="recover_epochs",
    ),
    Option(
        "--fusion-drop-prob",
        "chance to drop each sub-model block while training the fusion (default 0.25)",
        type=float,
        setting="fusion_drop_prob",
    ),
    Option(
        "--shared-blocks",
        "keep the patch embedding and the first K blocks unpruned and identical in every "
        "sub-model, and export them as slices for cameras and nodes (default 0: none)",
        type=int,
        metavar="K",
        setting="shared_blocks",
    ),
    Option(
        "--latency-runs",
        "timed ONNX Runtime runs per model for its median latency (default 50; 20 with "
        "--untrained)",
        type=int,
        metavar="RUNS",
        setting="latency_runs",
    ),
    Option("--seed", "random seed (default 0)", type=int, default=0, setting="seed"),
    Option("--threads", "CPU threads (default: all available)", type=int, setting="threads"),
    Option(
        "--jobs",
        "sub-models trained at once, each in its own process with threads/jobs threads "
        "(default 1; on many cores small sub-models train faster side by side)",
        type=int,
        setting="jobs",
    ),
    Option(
        "--device",
        "where torch trains: auto (a CUDA GPU if torch sees one), cpu, cuda[:N] (default auto)",
        setting="device",
    ),
    Option("--force", "overwrite a non-empty --out", switch=True),
)
RECORDED_FIRST = ("--dataset", "--num-devices")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    for option in OPTIONS:
        container = where if option.exclusive else parser
        container.add_argument(option.flag, **option.argparse_kwargs())


def command_line(args: argparse.Namespace) -> tuple[str, ...]:
    """The `edvit build` argv equivalent to ``args`` (what the manifest records)."""
    argv = ["edvit", "build"]
    if getattr(args, "dataset", None) is not None:
        argv += ["--dataset", args.dataset]
    if getattr(args, "devices", None) is None:
        argv += ["--num-devices", str(resolved_num_devices(args))]
    for option in OPTIONS:
        if option.flag in RECORDED_FIRST:
            continue
        value = getattr(args, option.dest, None)
        if option.switch:
            if value:
                argv.append(option.flag)
        elif value is not None:
            argv += [option.flag, str(value)]
    return tuple(argv)


def class_list(text: str) -> tuple[str, ...]:
    """--classes a,b,c as names, stripped (the checks are the settings')."""
    return tuple(name.strip() for name in text.split(","))


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
    from edvit.models.build_settings import CLASS_LIST

    values = {o.setting: getattr(args, o.dest, None) for o in OPTIONS if o.setting is not None}
    if args.classes is not None:
        if args.dataset is not None:
            raise ConfigError("--dataset and --classes exclude each other: name the classes once")
        values["classes"] = class_list(args.classes)
    elif args.dataset is None:
        raise ConfigError("--dataset is required (or, with --untrained, --classes)")
    settings = default_settings(
        args.dataset or CLASS_LIST, num_devices=num_devices, command=command_line(args), **values
    )
    build_bundle(settings, args.out, force=args.force)
    return 0
