"""ED-ViT benchmark at the defaults: one original ViT, one `edvit build` per device count N with
no tuning flags, each row checked against the method's targets.

    python benchmarks/ed_vit.py --dataset fashion-mnist --devices 2 3 5 10 \
        --checkpoint benchmarks/checkpoints/fashion-mnist-small.pt

The first build trains the original with the dataset's default recipe (unless --checkpoint:
the shipped checkpoint was trained with that recipe by benchmarks/original_recipe.py) and
saves original.pt; every other N reuses it, so the rows differ only by the split. Writes
benchmarks/results/ed_vit_<dataset>.json and .md after every N (a partial run keeps what it
measured; --reuse takes an N's bundle already in --out instead of building it again) and the
accuracy-vs-size plot at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from edvit.bundle import REPORT_NAME
from edvit.models.build import ORIGINAL_WEIGHTS, build_bundle, default_settings
from edvit.models.evaluate import plot_accuracy_vs_size

REPO = Path(__file__).resolve().parent.parent

MAX_ACCURACY_DROP = 0.01  # fused at most 1.0 point below the original
MIN_MISSING_ONE_ACCURACY_AT_5 = 0.70


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--out", default="runs/ed_vit", help="folder for the bundles")
    parser.add_argument("--checkpoint", help="original ViT state_dict to reuse for every N")
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto", help="where torch trains (auto, cpu, cuda)")
    # Give torch every core only when nothing else runs: on 2 shared cores a second process
    # with its own threads cut a build's speed from ~8 to ~3 steps/s (spinning threads).
    parser.add_argument("--threads", type=int)
    parser.add_argument("--jobs", type=int, default=1, help="sub-models trained at once")
    parser.add_argument("--reuse", action="store_true", help="reuse bundles already in --out")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "accuracy_vs_size.png"))
    return parser.parse_args(argv)


def row_of(n: int, report: dict[str, Any]) -> dict[str, Any]:
    """The table's figures for one bundle, with a PASS/FAIL per target (`markdown` lists them)."""
    acc, ratios = report["accuracy"], report["ratios"]
    missing = acc["fused_without"]
    worst_missing = min(missing.values()) if missing else None
    bars = {
        "accuracy_within_1_point": acc["fused"] >= acc["original"] - MAX_ACCURACY_DROP,
        "size_reduction_at_least_n": ratios["size"] >= n and (n != 10 or ratios["size"] >= 20),
        "latency_reduction_at_least_n_over_2": ratios["latency"] >= n / 2,
        "sum_params_at_most_original": ratios["sum_params_over_original"] <= 1.0,
    }
    if n == 5:
        bars["missing_one_above_70_percent"] = (
            worst_missing is not None and worst_missing > MIN_MISSING_ONE_ACCURACY_AT_5
        )
    return {
        "num_devices": n,
        "original_accuracy": acc["original"],
        "fused_accuracy": acc["fused"],
        "delta": acc["fused"] - acc["original"],
        "size_reduction": ratios["size"],
        "latency_reduction": ratios["latency"],
        "sum_params_over_original": ratios["sum_params_over_original"],
        "worst_missing_one_accuracy": worst_missing,
        "fusion_params": report["fusion"]["params"],
        "largest_submodel_params": max(s["params"] for s in report["submodels"].values()),
        "original_latency_ms": report["original"]["latency_ms"],
        "slowest_submodel_latency_ms": max(s["latency_ms"] for s in report["submodels"].values()),
        "build_seconds": report["build_seconds"],
        "bars": bars,
    }


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def commands_of(rows: list[dict[str, Any]], command: str, seconds: float) -> list[str]:
    """One line per command that made rows of the table (and the last run's wall time)."""
    by_command: dict[str, list[str]] = {}
    for row in rows:
        by_command.setdefault(row.get("command", command), []).append(str(row["num_devices"]))
    lines = [f"Command (N = {', '.join(ns)}): `{cmd}`." for cmd, ns in by_command.items()]
    return [*lines, f"The last run took {seconds / 60:.1f} min of wall time."]


def markdown(dataset: str, rows: list[dict[str, Any]], command: str, seconds: float) -> str:
    lines = [
        f"# ED-ViT on {dataset}",
        "",
        *commands_of(rows, command, seconds),
        "Latency: ONNX Runtime, batch 1, one thread, median; size: ONNX parameters of the",
        "original over the largest sub-model.",
        "",
        "| N | original acc | fused acc | delta | size red. | latency red. | sum params / orig "
        "| worst missing-one acc | fusion params (largest sub-model) "
        "| acc bar | size bar | latency bar | sum bar | missing-one bar |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bars"]
        worst = r["worst_missing_one_accuracy"]
        missing_bar = (
            mark(b["missing_one_above_70_percent"]) if "missing_one_above_70_percent" in b else "-"
        )
        lines.append(
            f"| {r['num_devices']} | {r['original_accuracy']:.4f} | {r['fused_accuracy']:.4f} "
            f"| {100 * r['delta']:+.2f} pt | {r['size_reduction']:.2f}x "
            f"| {r['latency_reduction']:.2f}x | {r['sum_params_over_original']:.3f} "
            f"| {'-' if worst is None else f'{worst:.4f}'} "
            f"| {r['fusion_params']:,} ({r['largest_submodel_params']:,}) "
            f"| {mark(b['accuracy_within_1_point'])} | {mark(b['size_reduction_at_least_n'])} "
            f"| {mark(b['latency_reduction_at_least_n_over_2'])} "
            f"| {mark(b['sum_params_at_most_original'])} | {missing_bar} |"
        )
    lines += [
        "",
        "Bars: fused accuracy at most 1.0 point below the original; size reduction >= N (and",
        ">= 20 at N=10); latency reduction >= N/2; sum of sub-model params <= original; at N=5",
        "fused accuracy with any one sub-model missing > 70%.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    args: argparse.Namespace, rows: list[dict[str, Any]], command: str, started: float
) -> list[dict[str, Any]]:
    """Rows of other N already in the results file stay (each row keeps its command), so a
    run for one N adds or replaces that row only."""
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"ed_vit_{args.dataset.replace('-', '_')}"
    seconds = time.time() - started
    rows = [{**row, "command": row.get("command", command)} for row in rows]
    path = results / f"{stem}.json"
    ran = {row["num_devices"] for row in rows}
    if path.is_file():
        earlier = json.loads(path.read_text())
        kept = [
            {**row, "command": row.get("command", earlier["command"])}
            for row in earlier["rows"]
            if row["num_devices"] not in ran
        ]
        rows = sorted(kept + rows, key=lambda row: row["num_devices"])
    document = {"command": command, "wall_seconds": round(seconds, 1), "rows": rows}
    path.write_text(json.dumps(document, indent=2) + "\n")
    (results / f"{stem}.md").write_text(markdown(args.dataset, rows, command, seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/ed_vit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    checkpoint = args.checkpoint
    rows: list[dict[str, Any]] = []
    for n in args.devices:
        out = Path(args.out) / f"{args.dataset}-{n}"
        print(f"[ed_vit] N={n}: building {out} ({time.time() - started:.0f} s so far)", flush=True)
        if args.reuse and (out / REPORT_NAME).is_file():
            report = json.loads((out / REPORT_NAME).read_text())
        else:
            settings = default_settings(
                args.dataset,
                num_devices=n,
                checkpoint=checkpoint,
                threads=args.threads,
                jobs=args.jobs,
                device=args.device,
                data_dir=args.data_dir,
                command=("python", "benchmarks/ed_vit.py", "--devices", str(n)),
            )
            report = build_bundle(settings, out, force=True)
        checkpoint = checkpoint or str(out / ORIGINAL_WEIGHTS)
        rows.append(row_of(n, report))
        table = write_results(args, rows, command, started)
        print(f"[ed_vit] N={n}: {json.dumps(rows[-1])}", flush=True)
    plot_accuracy_vs_size(table, args.plot)
    print(f"[ed_vit] done in {(time.time() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
