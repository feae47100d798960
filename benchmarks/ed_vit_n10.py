"""ED-ViT at N=10 on Fashion-MNIST, pushed past the defaults: what each change of the pruning
budget buys in size, latency and accuracy (the ablation of README "ED-ViT at N=10").

    python benchmarks/ed_vit_n10.py --jobs 2 --threads 2

Every variant is one `edvit build --num-devices 10` from the shipped converged original
(benchmarks/checkpoints/fashion-mnist-small.pt), differing only in the flags listed in
VARIANTS. --jobs trains the sub-models side by side and does not change the bundle. Writes
benchmarks/results/ed_vit_n10.json and .md after every variant; --reuse reads a variant's
bundle already in --out. 14 to 30 minutes per variant on 2 cores with --jobs 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ed_vit import row_of

from edvit.bundle import REPORT_NAME
from edvit.models.build import build_bundle, default_settings

REPO = Path(__file__).resolve().parent.parent

CHECKPOINT = REPO / "benchmarks" / "checkpoints" / "fashion-mnist-small.pt"
# name -> (what it changes, build settings on top of the defaults)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "defaults": ("the defaults: 0.95 x original / N parameters per sub-model", {}),
    "budget-9900": ("a 9,900-parameter budget (1/20.8 of the original)", {"param_budget": 9900}),
    "budget-9900-longer": (
        "the same budget, 24,000 distillation steps (twice the default at N=10) and a "
        "24-wide fusion (8,194 parameters, below the largest sub-model)",
        {"param_budget": 9900, "sub_steps": 24000, "fusion_hidden": 24},
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="runs/ed_vit_n10", help="folder for the bundles")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --out")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# ED-ViT at N=10 on fashion-mnist",
        "",
        f"Command: `{command}` (a variant's own build command is in its bundle's",
        "report.json). Latency: ONNX Runtime, batch 1, one thread, median, original over the",
        "slowest sub-model, as each build measured it; size: ONNX parameters of the original",
        "over the largest sub-model.",
        "",
        "| variant | original | fused | delta | size cut | latency cut | sum params / orig "
        "| largest sub-model params | fusion params | worst missing-one | build min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}: {r['what']} | {100 * r['original_accuracy']:.2f}% "
            f"| {100 * r['fused_accuracy']:.2f}% | {100 * r['delta']:+.2f} pt "
            f"| {r['size_reduction']:.2f}x | {r['latency_reduction']:.2f}x "
            f"| {r['sum_params_over_original']:.3f} | {r['largest_submodel_params']:,} "
            f"| {r['fusion_params']:,} | {100 * r['worst_missing_one_accuracy']:.2f}% "
            f"| {r['build_seconds'] / 60:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/ed_vit_n10.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[dict[str, Any]] = []
    for name in args.variants:
        what, flags = VARIANTS[name]
        out = Path(args.out) / name
        print(f"[ed_vit_n10] {name}: {out} ({time.time() - started:.0f} s so far)", flush=True)
        if args.reuse and (out / REPORT_NAME).is_file():
            report = json.loads((out / REPORT_NAME).read_text())
        else:
            settings = default_settings(
                "fashion-mnist", num_devices=10, checkpoint=str(CHECKPOINT), threads=args.threads,
                jobs=args.jobs, device=args.device, **flags,
                command=("python", "benchmarks/ed_vit_n10.py", "--variants", name),
            )  # fmt: skip
            report = build_bundle(settings, out, force=True)
        rows.append({"variant": name, "what": what, **row_of(10, report)})
        (results / "ed_vit_n10.json").write_text(
            json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
        )
        (results / "ed_vit_n10.md").write_text(markdown(rows, command))
        print(f"[ed_vit_n10] {name}: {json.dumps(rows[-1])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
