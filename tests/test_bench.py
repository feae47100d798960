"""The benchmark commands run end to end on a small setting (their figures are not judged
here: speed targets live in the benchmark output, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fleet  # every test runs `edvit bench`


def test_bench_batching_runs_and_reports(digits_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "batching", "--bundle", str(digits_bundle),
         "--cameras", "2", "--fps", "20", "--seconds", "1.5", "--warmup-s", "0.5",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["runs"]
    assert [(r["config"], r["cameras"]) for r in results] == [("off", 2), ("on", 2)]
    for r in results:
        assert r["served_fps"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0
        assert r["node_rss_mb"] > 10 and r["node_cpu_ms_per_frame"] > 0
        # Inference is part of the node's CPU, not all of it (messages cost too).
        assert 0 < r["node_infer_ms_per_frame"] < r["node_cpu_ms_per_frame"]
    assert results[0]["mean_batch"] == 1.0
    assert "| config | cameras | head_slices |" in done.stdout


def test_bench_slicing_runs_every_entry_block_and_strategy(
    sliced_digits_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "slicing.json"
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "slicing", str(sliced_digits_bundle),
         "--cameras", "2", "--fps", "20", "--seconds", "1.5", "--warmup-s", "0.5",
         "--json", str(out),
         "--mixed-cameras", "2", "--mixed-fps", "20", "--rounds", "2"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["runs"]
    assert [(r["head_slices"], r["config"]) for r in results] == [
        (0, "per-entry"), (0, "merged"), (1, "per-entry"), (1, "merged"),
        (None, "per-entry"), (None, "merged"),  # cameras spread over J = 0 and 1
    ]  # fmt: skip
    for r in results:
        assert r["served_fps"] > 0 and r["node_cpu_ms_per_frame"] > 0 and r["model_mb"] > 0
    # Tokens of this tiny stem are larger than its 8x8 PNG frames: the figure is measured.
    assert results[2]["bytes_per_frame"] != results[0]["bytes_per_frame"]
    # Each J and strategy ran twice, interleaved; the table keeps one of the two runs.
    assert report["rounds"] == 2 and len(report["every_run"]) == 4 * 2 + 2
    for i, r in enumerate(results[:4]):
        assert r in (report["every_run"][i], report["every_run"][i + 4])
    mixed_bytes = (results[0]["bytes_per_frame"] + results[2]["bytes_per_frame"]) / 2
    assert abs(results[4]["bytes_per_frame"] - mixed_bytes) < 1.0
    assert "| merged | 2 | mixed |" in done.stdout
    # The proportionality check: one row per strategy for J = 1, computed from the runs.
    slice_ms = report["slice_ms"]
    assert {"preprocess", "embed", "block0"} <= set(slice_ms)
    assert all(ms > 0 for ms in slice_ms.values())
    rows = {row["config"]: row for row in report["proportion"]}
    assert set(rows) == {"per-entry", "merged"}
    assert all(row["head_slices"] == 1 for row in rows.values())
    moved = slice_ms["preprocess"] + slice_ms["embed"] + slice_ms["block0"]
    for config, row in rows.items():
        cpu = {
            r["head_slices"]: r["node_cpu_ms_per_frame"] for r in results if r["config"] == config
        }
        assert row["node_cpu_saved_ms"] == round(cpu[0] - cpu[1], 3)
        assert row["work_moved_ms"] == round(moved, 3)
    assert "node CPU saved against J = 0" in done.stdout


def test_bench_slicing_refuses_a_bundle_without_stem(digits_bundle: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "slicing", str(digits_bundle)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "has no shared stem" in done.stderr and "Traceback" not in done.stderr
