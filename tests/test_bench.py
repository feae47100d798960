"""The benchmark commands run end to end on a small setting (their figures are not judged
here: speed targets live in the benchmark output, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_batching_runs_and_reports(digits_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    done = subprocess.run(
        [sys.executable, "-m", "edvit", "bench", "batching", "--bundle", str(digits_bundle),
         "--cameras", "2", "--fps", "20", "--seconds", "1.5", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [(r["config"], r["cameras"]) for r in results] == [("off", 2), ("on", 2)]
    for r in results:
        assert r["served_fps"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0
        assert r["node_rss_mb"] > 10 and r["node_cpu_ms_per_frame"] > 0
    assert results[0]["mean_batch"] == 1.0
    assert "| config | cameras | head_slices |" in done.stdout
